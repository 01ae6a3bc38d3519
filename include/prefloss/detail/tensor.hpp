/// @file detail/tensor.hpp
/// Raw views over the Eigen tensors and maps callers hand in, plus the shape checks that turn a
/// mismatch into a prefloss::shape_error naming the argument.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include <unsupported/Eigen/CXX11/Tensor>

#include "../config.hpp"
#include "../errors.hpp"

namespace prefloss::detail {

static_assert(std::is_same_v<Index, Eigen::Index>,
              "prefloss: Index must be Eigen's index type (EIGEN_DEFAULT_DENSE_INDEX_TYPE changed?)");

template <class T>
using remove_cvref_t = std::remove_cv_t<std::remove_reference_t<T>>;

template <class T, class = void>
struct is_tensor : std::false_type {};
template <class T>
struct is_tensor<T, std::void_t<decltype(remove_cvref_t<T>::NumDimensions), decltype(std::declval<T&>().data()),
                                decltype(std::declval<T&>().dimension(0))>> : std::true_type {};

template <class T>
inline constexpr bool is_tensor_v = is_tensor<remove_cvref_t<T>>::value;

template <class T>
using tensor_scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<remove_cvref_t<T>&>().data())>>;

template <class T>
inline constexpr int tensor_rank_v = remove_cvref_t<T>::NumDimensions;

template <class T>
inline constexpr bool tensor_writable_v =
    !std::is_const_v<std::remove_pointer_t<decltype(std::declval<std::remove_reference_t<T>&>().data())>>;

template <class T>
inline constexpr bool is_real_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <class T>
inline constexpr bool is_mask_v = is_real_v<T> || std::is_same_v<T, bool> || std::is_same_v<T, std::uint8_t>;

/// [rows, cols] row-major read view.
template <class T>
struct Matrix {
  const T* data;
  Index rows, cols;
  const T* row(Index i) const noexcept { return data + i * cols; }
};

/// [rows, cols] row-major write view.
template <class T>
struct MatrixOut {
  T* data;
  Index rows, cols;
  T* row(Index i) const noexcept { return data + i * cols; }
};

/// [size] read view.
template <class T>
struct Vector {
  const T* data;
  Index size;
};

inline std::string shape_str(Index a) { return "[" + std::to_string(a) + "]"; }
inline std::string shape_str(Index a, Index b) { return "[" + std::to_string(a) + ", " + std::to_string(b) + "]"; }

template <class T>
std::string shape_of(const T& t) {
  if constexpr (tensor_rank_v<T> == 1) {
    return shape_str(t.dimension(0));
  } else {
    std::string s = "[";
    // Range-for: Tensor::dimension takes std::size_t and TensorMap::dimension a signed Index.
    const char* sep = "";
    for (const auto extent : t.dimensions()) {
      s += sep + std::to_string(extent);
      sep = ", ";
    }
    return s + "]";
  }
}

template <class T>
constexpr void require_token_tensor() {
  static_assert(is_tensor_v<T>, "prefloss: token arguments must be Eigen::Tensor or Eigen::TensorMap");
  static_assert(tensor_rank_v<T> == 2, "prefloss: token tensors are rank 2 [batch, tokens]");
  static_assert(static_cast<int>(remove_cvref_t<T>::Layout) == static_cast<int>(Eigen::RowMajor),
                "prefloss: token tensors must be row-major (Eigen::RowMajor)");
}

/// @brief Throws layout_error unless p is aligned to its element type. C++ reads a T only at a
/// multiple of alignof(T); a map into a byte blob at an odd offset is rejected, not read.
template <class T>
void require_aligned(const T* p, const char* fn, const char* name) {
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  if (addr % alignof(T) != 0)
    throw layout_error(std::string(fn) + ": argument '" + name + "' has data at address " + std::to_string(addr) +
                       ", not a multiple of its element size " + std::to_string(alignof(T)) +
                       "; copy it into an aligned tensor");
}

template <class T>
Matrix<tensor_scalar_t<T>> matrix_view(const T& t, const char* fn, const char* name) {
  require_token_tensor<T>();
  require_aligned(t.data(), fn, name);
  return {t.data(), static_cast<Index>(t.dimension(0)), static_cast<Index>(t.dimension(1))};
}

template <class T>
Vector<tensor_scalar_t<T>> vector_view(const T& t, const char* fn, const char* name) {
  static_assert(is_tensor_v<T>, "prefloss: sequence arguments must be rank-1 Eigen tensors or sequence expressions");
  static_assert(tensor_rank_v<T> == 1, "prefloss: sequence tensors are rank 1 [batch]");
  require_aligned(t.data(), fn, name);
  return {t.data(), static_cast<Index>(t.dimension(0))};
}

/// Checks a caller-provided output's extents and returns a write view; throws shape_error
/// ("<fn>: argument '<name>' must have shape [..], got [..]") otherwise.
template <class T>
MatrixOut<tensor_scalar_t<T>> matrix_out(T&& t, Index rows, Index cols, const char* fn, const char* name) {
  require_token_tensor<T>();
  static_assert(tensor_writable_v<T>, "prefloss: output tensors must be writable (not const)");
  if (t.dimension(0) != rows || t.dimension(1) != cols)
    throw shape_error(std::string(fn) + ": argument '" + name + "' must have shape " + shape_str(rows, cols) + ", got " +
                      shape_of(t));
  require_aligned(t.data(), fn, name);
  return {t.data(), rows, cols};
}

template <class T>
tensor_scalar_t<T>* vector_out(T&& t, Index size, const char* fn, const char* name) {
  static_assert(is_tensor_v<T> && tensor_rank_v<T> == 1, "prefloss: this output is a rank-1 [batch] tensor");
  static_assert(tensor_writable_v<T>, "prefloss: output tensors must be writable (not const)");
  if (t.dimension(0) != size)
    throw shape_error(std::string(fn) + ": argument '" + name + "' must have shape " + shape_str(size) + ", got " +
                      shape_of(t));
  require_aligned(t.data(), fn, name);
  return t.data();
}

/// @brief Throws layout_error if two output tensors share any byte: each output is written in
/// full, so one would silently overwrite the other. Empty outputs overlap nothing.
template <class A, class B>
void require_disjoint(const char* fn, const char* name_a, const A& a, const char* name_b, const B& b) {
  const auto lo_a = reinterpret_cast<std::uintptr_t>(a.data()), lo_b = reinterpret_cast<std::uintptr_t>(b.data());
  const auto hi_a = lo_a + static_cast<std::uintptr_t>(a.size()) * sizeof(tensor_scalar_t<A>);
  const auto hi_b = lo_b + static_cast<std::uintptr_t>(b.size()) * sizeof(tensor_scalar_t<B>);
  if (lo_a < hi_a && lo_b < hi_b && lo_a < hi_b && lo_b < hi_a)
    throw layout_error(std::string(fn) + ": outputs '" + name_a + "' and '" + name_b +
                       "' overlap in memory; pass two separate tensors");
}

/// Throws shape_error unless a token argument has the shape of the first one.
template <class A, class R>
void require_same_shape(const char* fn, const char* name, const Matrix<A>& a, const char* ref_name, const Matrix<R>& ref) {
  if (a.rows != ref.rows || a.cols != ref.cols)
    throw shape_error(std::string(fn) + ": argument '" + name + "' has shape " + shape_str(a.rows, a.cols) + " but '" +
                      ref_name + "' has shape " + shape_str(ref.rows, ref.cols));
}

/// Throws unless `what` (an argument's extent) equals `expected`.
inline void require_same(const char* fn, const char* a, const std::string& shape_a, const char* b,
                         const std::string& shape_b) {
  if (shape_a != shape_b)
    throw shape_error(std::string(fn) + ": argument '" + a + "' has shape " + shape_a + " but '" + b + "' has shape " +
                      shape_b);
}

}  // namespace prefloss::detail
