/// @file detail/checks.hpp
/// Option and batch validation shared by every loss; each failure names the function, the
/// argument or option, the rule and the value seen.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "../config.hpp"
#include "../errors.hpp"

namespace prefloss::detail {

/// Shortest round-trippable text of a double, for messages.
inline std::string fmt(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s(buf);
  for (int p = 6; p <= 17; ++p) {  // prefer the shortest form that reads back exactly
    std::snprintf(buf, sizeof buf, "%.*g", p, v);
    if (std::strtod(buf, nullptr) == v) return buf;
  }
  return s;
}

/// Throws option_error("<fn>: option '<name>' must be <rule>, got <value>") unless ok.
inline void require_option(bool ok, const char* fn, const char* name, const char* rule, double value) {
  if (!ok) throw option_error(std::string(fn) + ": option '" + name + "' must be " + rule + ", got " + fmt(value));
}

/// A global normalizer (a token or sequence count the loss divides by): positive, finite, and
/// with a reciprocal finite in the scalar type S that carries the gradient scale (>= 2.9e-39 for
/// float, >= 5.6e-309 for double). Smaller ones are rejected: the scale 1/n would be inf, and inf
/// times a zero token derivative is NaN.
template <class S>
void require_normalizer(const char* fn, const char* name, double value) {
  const bool ok = value > 0 && value < HUGE_VAL && std::isfinite(static_cast<S>(1.0 / value));
  require_option(ok, fn, name,
                 sizeof(S) == 4 ? "finite and >= 2.9e-39 (a reciprocal finite in float, the token type)"
                                : "finite and >= 5.6e-309 (a finite reciprocal)",
                 value);
}

/// Every loss's beta (inverse temperature): positive and finite.
inline void require_beta(const char* fn, double beta) {
  require_option(beta > 0 && beta < HUGE_VAL, fn, "beta", "> 0 and finite", beta);
}

/// A clamp or threshold the kernels apply in the token type S: > 0 as given and still > 0 once
/// rounded to S (1e-50 is positive in double and 0 in float, which would clamp everything).
template <class S>
void require_positive_in(const char* fn, const char* name, double value) {
  const bool ok = value > 0 && static_cast<S>(value) > S(0);
  require_option(ok, fn, name, sizeof(S) == 4 ? "> 0 when set, also in float (the token type)" : "> 0 when set", value);
}

/// Throws option_error for an enum value outside its declared set.
inline void require_enum(bool ok, const char* fn, const char* name, int value) {
  if (!ok) throw option_error(std::string(fn) + ": option '" + name + "' has unknown value " + std::to_string(value));
}

/// Losses average over the batch: an empty batch has no defined loss.
inline void require_nonempty(const char* fn, const char* name, Index batch) {
  if (batch == 0) throw shape_error(std::string(fn) + ": argument '" + name + "' has an empty batch (shape [0])");
}

/// @brief The divisor of a batch-mean loss: the option batch_count (the examples of the global
/// batch, checked: finite, >= 1 and >= this call's batch), else this call's batch, which must
/// then be nonempty. With batch_count an empty shard is allowed: it contributes 0.
inline double batch_divisor(const char* fn, const char* name, Index batch, const std::optional<double>& batch_count) {
  if (!batch_count) {
    require_nonempty(fn, name, batch);
    return static_cast<double>(batch);
  }
  const double n = *batch_count;
  if (!(std::isfinite(n) && n >= 1 && n >= static_cast<double>(batch)))
    throw option_error(std::string(fn) + ": option 'batch_count' must be finite, >= 1 and >= this call's batch (" +
                       std::to_string(batch) + "), got " + fmt(n));
  return n;
}

}  // namespace prefloss::detail
