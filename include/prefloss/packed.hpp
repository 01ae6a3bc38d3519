/// @file packed.hpp
/// Packed (padding-free) token batches: one rank-1 array of every sequence's tokens back to back
/// and cu_seqlens offsets, as flash-attention's varlen kernels, TRL's padding_free and verl's
/// use_remove_padding hand them over. pl::packed(values, cu_seqlens) wraps the two so that every
/// entry point taking a [batch, tokens] token tensor takes it instead.
#pragma once

#include <cstdint>
#include <type_traits>

#include "config.hpp"

// Declared, not included: this header must not be the first to pull in Eigen (and with it the
// intrinsics headers) outside PREFLOSS_KERNELS_BEGIN, see config.hpp.
namespace Eigen {
template <typename Scalar_, int NumIndices_, int Options_, typename IndexType_>
class Tensor;
}  // namespace Eigen

namespace prefloss {

/// @brief A view of a packed token batch: row i is values[cu[i], cu[i+1]) for i < batch, with
/// cu = cu_seqlens of batch + 1 entries (int32_t as flash-attention uses, or int64_t).
///
/// Holds pointers, not copies: the values and the offsets must outlive the view and every
/// expression or result built from it (a loss result reads both again in backward()). Built by
/// prefloss::packed(); the offsets are checked by the entry point that receives the view (so the
/// error names that function and argument): cu[0] == 0, non-decreasing, cu[batch] == the number
/// of values, and the same offsets for every packed argument of one call.
/// @tparam T the value type, const for a read-only view
/// @tparam O std::int32_t or std::int64_t
template <class T, class O>
class Packed {
  static_assert(std::is_same_v<O, std::int32_t> || std::is_same_v<O, std::int64_t>,
                "prefloss: cu_seqlens must hold int32_t or int64_t offsets");

 public:
  using Scalar = std::remove_const_t<T>;
  using Offset = O;

  Packed(T* values, Index total, const O* offsets, Index n_offsets) noexcept
      : values_(values), total_(total), offsets_(offsets), n_offsets_(n_offsets) {}

  /// First value (row 0 starts here).
  T* data() const noexcept { return values_; }
  /// Number of values: total tokens over all rows.
  Index size() const noexcept { return total_; }
  /// The cu_seqlens offsets.
  const O* offsets() const noexcept { return offsets_; }
  /// Number of offsets (batch + 1 when valid).
  Index offsets_size() const noexcept { return n_offsets_; }

 private:
  T* values_;
  Index total_;
  const O* offsets_;
  Index n_offsets_;
};

namespace detail {
template <class T>
struct is_packed : std::false_type {};
template <class T, class O>
struct is_packed<Packed<T, O>> : std::true_type {};
/// True for a Packed view (any cv/ref qualification).
template <class T>
inline constexpr bool is_packed_v = is_packed<std::remove_cv_t<std::remove_reference_t<T>>>::value;

}  // namespace detail

/// @brief Wraps a packed token array and its cu_seqlens offsets for any prefloss entry point
/// that takes a [batch, tokens] tensor or mask (also as an output: pass a writable array).
///
///     auto seq = pl::masked_sum(pl::packed(logp_flat, cu), pl::packed(mask_flat, cu));
///
/// @param values rank-1 Eigen::Tensor or TensorMap [total_tokens] of any type the padded
/// argument allows (tokens: float/double; masks: bool/uint8_t/float/double)
/// @param cu_seqlens rank-1 Eigen::Tensor or TensorMap [batch + 1] of int32_t or int64_t
/// A temporary owning Eigen::Tensor is refused at compile time for either (the view would
/// dangle); temporary TensorMaps are fine. Nothing is checked here: the receiving entry point
/// validates the offsets and names itself in the error.
template <class V, class C>
auto packed(V&& values, const C& cu_seqlens) {
  using VT = std::remove_cv_t<std::remove_reference_t<V>>;
  using CT = std::remove_cv_t<std::remove_reference_t<C>>;
  static_assert(VT::NumDimensions == 1, "prefloss: packed values are a rank-1 [total_tokens] tensor or map");
  static_assert(CT::NumDimensions == 1, "prefloss: cu_seqlens is a rank-1 [batch + 1] tensor or map");
  using T = std::remove_pointer_t<decltype(values.data())>;
  using O = std::remove_const_t<std::remove_pointer_t<decltype(cu_seqlens.data())>>;
  static_assert(std::is_same_v<O, std::int32_t> || std::is_same_v<O, std::int64_t>,
                "prefloss: cu_seqlens must hold int32_t or int64_t offsets");
  return Packed<T, O>(values.data(), static_cast<Index>(values.size()), cu_seqlens.data(),
                      static_cast<Index>(cu_seqlens.size()));
}

// Views of temporary owning tensors would dangle by the end of the statement.
template <class S, int N, int L, class I, class C>
void packed(Eigen::Tensor<S, N, L, I>&& values, const C& cu_seqlens) = delete;
template <class V, class S, int N, int L, class I>
void packed(V&& values, Eigen::Tensor<S, N, L, I>&& cu_seqlens) = delete;

}  // namespace prefloss
