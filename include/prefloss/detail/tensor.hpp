/// @file detail/tensor.hpp
/// Raw views over the Eigen tensors and maps callers hand in, plus the shape checks that turn a
/// mismatch into a prefloss::shape_error naming the argument.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../errors.hpp"
#include "../packed.hpp"
#include "checks.hpp"
#include "eigen.hpp"

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

/// Row offsets of a packed batch (cu_seqlens, int32 or int64): row i is [at(i), at(i + 1)).
/// `kind == none` marks the padded layout, whose rows all have the matrix's column count.
struct Offsets {
  enum Kind : unsigned char { none, i32, i64 };
  const void* data = nullptr;
  Kind kind = none;
  Index at(Index i) const noexcept {
    return kind == i64 ? static_cast<Index>(static_cast<const std::int64_t*>(data)[i])
                       : static_cast<Index>(static_cast<const std::int32_t*>(data)[i]);
  }
};

/// Row geometry shared by the read and write views: uniform rows of `cols` (padded, row-major
/// [rows, cols]) or packed rows given by offsets (then cols is 0 and count() the total). Every
/// row kernel takes (pointer, length), so code written with begin/len serves both layouts.
struct RowLayout {
  Index rows = 0, cols = 0;
  Offsets off{};
  bool packed() const noexcept { return off.kind != Offsets::none; }
  Index begin(Index i) const noexcept { return packed() ? off.at(i) : i * cols; }
  Index len(Index i) const noexcept { return packed() ? off.at(i + 1) - off.at(i) : cols; }
  /// Number of elements: rows * cols, or the packed total.
  Index count() const noexcept { return packed() ? off.at(rows) : rows * cols; }
};

/// @brief Calls f(i, begin, length) for every row. The padded loop is its own copy: per-row
/// layout branches cost ~4 ns a row, a third of a masked adjoint over 256-token rows.
template <class F>
void for_each_row(const RowLayout& l, F&& f) {
  if (!l.packed()) {
    for (Index i = 0; i < l.rows; ++i) f(i, i * l.cols, l.cols);
  } else {
    for (Index i = 0; i < l.rows; ++i) {
      const Index b = l.off.at(i);
      f(i, b, l.off.at(i + 1) - b);
    }
  }
}

/// [rows, cols] row-major (or packed) read view.
template <class T>
struct Matrix {
  const T* data;
  Index rows, cols;
  Offsets off{};
  RowLayout layout() const noexcept { return {rows, cols, off}; }
  bool packed() const noexcept { return off.kind != Offsets::none; }
  const T* row(Index i) const noexcept { return data + layout().begin(i); }
  Index len(Index i) const noexcept { return layout().len(i); }
  Index count() const noexcept { return layout().count(); }
};

/// [rows, cols] row-major (or packed) write view.
template <class T>
struct MatrixOut {
  T* data;
  Index rows, cols;
  Offsets off{};
  RowLayout layout() const noexcept { return {rows, cols, off}; }
  T* row(Index i) const noexcept { return data + layout().begin(i); }
  Index count() const noexcept { return layout().count(); }
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
  static_assert(is_tensor_v<T>,
                "prefloss: token arguments must be Eigen::Tensor, Eigen::TensorMap or pl::packed(values, cu_seqlens)");
  static_assert(tensor_rank_v<T> == 2,
                "prefloss: token tensors are rank 2 [batch, tokens]; wrap a rank-1 packed array as "
                "pl::packed(values, cu_seqlens)");
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

/// "[total] packed in <rows> rows" or "[rows, cols]", for messages.
inline std::string layout_str(const RowLayout& l) {
  return l.packed() ? shape_str(l.count()) + " packed in " + std::to_string(l.rows) + " rows"
                    : shape_str(l.rows, l.cols);
}

/// "[row, token]" of flat element k (packed: the row holding it and the position in that row,
/// plus the flat index), for messages.
inline std::string position_str(const RowLayout& l, Index k) {
  if (!l.packed()) return l.cols ? shape_str(k / l.cols, k % l.cols) : shape_str(k);
  Index lo = 0, hi = l.rows;  // the last row i with begin(i) <= k (empty rows start there too)
  while (hi - lo > 1) {
    const Index mid = lo + (hi - lo) / 2;
    (l.off.at(mid) <= k ? lo : hi) = mid;
  }
  return shape_str(lo, k - l.off.at(lo)) + " (packed index " + std::to_string(k) + ")";
}

/// @brief Throws shape_error unless a packed argument's cu_seqlens are batch + 1 offsets with
/// cu[0] == 0, non-decreasing, and cu[batch] == its number of values; names the bad entry.
template <class T, class O>
void require_offsets(const Packed<T, O>& p, const char* fn, const char* name) {
  const auto who = [&] { return std::string(fn) + ": argument '" + name + "' has "; };  // built on failure only
  const O* cu = p.offsets();
  const Index n = p.offsets_size();
  if (n < 1) throw shape_error(who() + "no cu_seqlens offsets; a batch of B rows needs B + 1, starting at 0");
  if (cu[0] != 0) throw shape_error(who() + "cu_seqlens[0] = " + std::to_string(cu[0]) + "; it must be 0");
  for (Index k = 1; k < n; ++k)
    if (cu[k] < cu[k - 1])
      throw shape_error(who() + "cu_seqlens[" + std::to_string(k) + "] = " + std::to_string(cu[k]) + " < cu_seqlens[" +
                        std::to_string(k - 1) + "] = " + std::to_string(cu[k - 1]) +
                        "; offsets must be non-decreasing");
  if (static_cast<Index>(cu[n - 1]) != p.size())
    throw shape_error(who() + "cu_seqlens[" + std::to_string(n - 1) + "] = " + std::to_string(cu[n - 1]) + " but " +
                      std::to_string(p.size()) + " values; the last offset must be the number of values");
}

/// Layout of a validated packed argument.
template <class T, class O>
RowLayout packed_layout(const Packed<T, O>& p) noexcept {
  return {p.offsets_size() - 1, 0, {p.offsets(), std::is_same_v<O, std::int64_t> ? Offsets::i64 : Offsets::i32}};
}

/// Read view of a packed token argument: checks alignment and the offsets (require_offsets).
template <class T, class O>
Matrix<std::remove_const_t<T>> matrix_view(const Packed<T, O>& p, const char* fn, const char* name) {
  require_aligned(p.data(), fn, name);
  if (reinterpret_cast<std::uintptr_t>(p.offsets()) % alignof(O) != 0)
    require_aligned(p.offsets(), fn, (std::string(name) + " (cu_seqlens)").c_str());
  require_offsets(p, fn, name);
  const RowLayout l = packed_layout(p);
  return {p.data(), l.rows, 0, l.off};
}

template <class T>
Vector<tensor_scalar_t<T>> vector_view(const T& t, const char* fn, const char* name) {
  static_assert(!is_packed_v<T>,
                "prefloss: this argument is a [batch] tensor (one value per sequence); pl::packed is for token "
                "arguments (reduce packed tokens with masked_sum / masked_mean first)");
  static_assert(is_tensor_v<T>, "prefloss: sequence arguments must be rank-1 Eigen tensors or sequence expressions");
  static_assert(tensor_rank_v<T> == 1, "prefloss: sequence tensors are rank 1 [batch]");
  require_aligned(t.data(), fn, name);
  return {t.data(), static_cast<Index>(t.dimension(0))};
}

/// Throws shape_error unless two layouts are the same: equal [rows, cols] when padded; equal
/// rows, total and offsets when packed (the same offsets pointer is the fast path; otherwise
/// the contents are compared and the first differing entry is named); never one of each.
inline void require_same_layout(const char* fn, const char* name, const RowLayout& a, const char* ref_name,
                                const RowLayout& ref) {
  // Messages are built only on failure: entry points run this on every call.
  const auto who = [&] { return std::string(fn) + ": argument '" + name + "' "; };
  if (a.packed() != ref.packed())
    throw shape_error(who() + "is " + (a.packed() ? "packed (" : "padded (") + layout_str(a) + ") but '" + ref_name +
                      "' is " + (ref.packed() ? "packed (" : "padded (") + layout_str(ref) +
                      "); every token argument of one call takes one layout");
  if (!a.packed()) {
    if (a.rows != ref.rows || a.cols != ref.cols)
      throw shape_error(who() + "has shape " + shape_str(a.rows, a.cols) + " but '" + ref_name + "' has shape " +
                        shape_str(ref.rows, ref.cols));
    return;
  }
  if (a.rows != ref.rows || a.count() != ref.count())
    throw shape_error(who() + "has shape " + layout_str(a) + " but '" + ref_name + "' has shape " + layout_str(ref));
  if (a.off.data == ref.off.data && a.off.kind == ref.off.kind) return;
  for (Index k = 1; k < a.rows; ++k)
    if (a.off.at(k) != ref.off.at(k))
      throw shape_error(who() + "has cu_seqlens[" + std::to_string(k) + "] = " + std::to_string(a.off.at(k)) +
                        " but '" + ref_name + "' has cu_seqlens[" + std::to_string(k) +
                        "] = " + std::to_string(ref.off.at(k)) +
                        "; every packed argument of one call must use the same offsets");
}

/// @brief Checks a caller-provided output against the layout of the call's inputs and returns a
/// write view with the inputs' row geometry. Padded: a row-major [rows, cols] tensor or map.
/// Packed: a rank-1 [total] tensor or map, or pl::packed(out, cu) with the inputs' offsets.
/// Throws shape_error ("<fn>: argument '<name>' must have shape [..], got [..]") otherwise.
template <class T>
MatrixOut<tensor_scalar_t<T>> matrix_out(T&& t, const RowLayout& like, const char* fn, const char* name) {
  static_assert(is_tensor_v<T> || is_packed_v<T>, "prefloss: outputs must be Eigen::Tensor, TensorMap or pl::packed");
  static_assert(tensor_writable_v<T>, "prefloss: output tensors must be writable (not const)");
  const auto wrong = [&](const std::string& got) {
    return shape_error(
        std::string(fn) + ": argument '" + name + "' must have shape " +
        (like.packed() ? shape_str(like.count()) + " (the inputs are packed in " + std::to_string(like.rows) + " rows)"
                       : shape_str(like.rows, like.cols)) +
        ", got " + got);
  };
  if constexpr (is_packed_v<T>) {
    if (!like.packed()) throw wrong("packed " + shape_str(t.size()));
    require_offsets(t, fn, name);
    require_same_layout(fn, name, packed_layout(t), "the inputs", like);
  } else {
    static_assert(tensor_rank_v<T> == 1 || tensor_rank_v<T> == 2,
                  "prefloss: token outputs are rank 2 [batch, tokens] (rank 1 [total_tokens] for packed inputs)");
    if constexpr (tensor_rank_v<T> == 2) {
      require_token_tensor<T>();
      if (like.packed() || t.dimension(0) != like.rows || t.dimension(1) != like.cols) throw wrong(shape_of(t));
    } else {
      if (!like.packed() || static_cast<Index>(t.dimension(0)) != like.count()) throw wrong(shape_of(t));
    }
  }
  require_aligned(t.data(), fn, name);
  return {t.data(), like.rows, like.cols, like.off};
}

/// Padded form of matrix_out: a row-major [rows, cols] output.
template <class T>
MatrixOut<tensor_scalar_t<T>> matrix_out(T&& t, Index rows, Index cols, const char* fn, const char* name) {
  return matrix_out(std::forward<T>(t), RowLayout{rows, cols, {}}, fn, name);
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

/// Throws shape_error unless a token argument has the layout of the first one (see
/// require_same_layout).
template <class A, class R>
void require_same_shape(const char* fn, const char* name, const Matrix<A>& a, const char* ref_name,
                        const Matrix<R>& ref) {
  require_same_layout(fn, name, a.layout(), ref_name, ref.layout());
}

/// Throws unless `what` (an argument's extent) equals `expected`.
inline void require_same(const char* fn, const char* a, const std::string& shape_a, const char* b,
                         const std::string& shape_b) {
  if (shape_a != shape_b)
    throw shape_error(std::string(fn) + ": argument '" + a + "' has shape " + shape_a + " but '" + b + "' has shape " +
                      shape_b);
}

/// Throws value_error naming the first non-finite value at a valid token.
template <class T, class M>
void require_finite_at_valid(const Matrix<T>& x, const Matrix<M>& m, const char* fn, const char* name) {
  const Index n = x.count();
  for (Index k = 0; k < n; ++k)
    if (m.data[k] != M(0) && !std::isfinite(static_cast<double>(x.data[k])))
      throw value_error(std::string(fn) + ": argument '" + name + "' must be finite at valid tokens, got " +
                        fmt(static_cast<double>(x.data[k])) + " at " + position_str(x.layout(), k));
}

}  // namespace prefloss::detail
