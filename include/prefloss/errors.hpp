/// @file errors.hpp
/// Exception types. Every rejection of caller input throws one of these before any output is
/// written; all derive from std::invalid_argument so `catch (const std::invalid_argument&)` works.
#pragma once

#include <stdexcept>
#include <string>

namespace prefloss {

/// Base of all prefloss input errors.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A tensor argument has the wrong rank or extents (message names the argument and both shapes).
class shape_error : public error {
 public:
  using error::error;
};

/// An option or scalar argument is out of its domain (message names the option and its value).
class option_error : public error {
 public:
  using error::error;
};

/// A tensor argument's memory cannot be read or written as it is: its data pointer is not aligned
/// to its element type, or two outputs overlap (message names the argument and the address).
class layout_error : public error {
 public:
  using error::error;
};

/// A tensor argument holds values outside its domain, e.g. a negative or NaN mask weight
/// (message names the argument, the [row, column] position and the value).
class value_error : public error {
 public:
  using error::error;
};

}  // namespace prefloss
