/// @file detail/lowp.hpp
/// 16-bit token storage (Eigen::bfloat16, Eigen::half): the type traits that map a storage type
/// to the type prefloss computes in (float), conversions between them that match Eigen's
/// own scalar conversions bit for bit, and the masked row kernels over 16-bit rows.
///
/// Two ways to run a float kernel on 16-bit rows, each where it measured better or was the
/// smaller change. Masked sums convert each batch as it is loaded (row_sums_as with TokenLoad: the float
/// kernel's loop, so a row gives the float row's bits at any length). Token losses and masked
/// adjoints convert rows in chunks of lowp_chunk tokens into float stack buffers and run the float
/// row kernels on them unchanged (sums merged in double per chunk; 16-bit gradients are the float
/// gradient rounded once to nearest even). A chunk of 1024 tokens is 4 KiB per float buffer: a
/// token loss's four inputs and its gradient stay in L1, and the chunk is a multiple of every
/// float kernel's batch and of its float-to-double flush interval. On an AVX-512 guest
/// (bench_reduce, masked_sum/bf16_u8/B64) in-load conversion took 0.12-0.13 ns a token from L2
/// to DRAM against 0.18 chunked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../config.hpp"
#include "eigen.hpp"
#include "masked_kernels.hpp"
#include "simd.hpp"
#include "tensor.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// Whether T is a 16-bit floating-point storage type prefloss converts to float.
template <class T>
inline constexpr bool is_lowp_v = std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>;

/// Element types a token tensor may hold: float, double, Eigen::bfloat16, Eigen::half.
template <class T>
inline constexpr bool is_token_scalar_v = is_real_v<T> || is_lowp_v<T>;

/// The type a token tensor of storage type T is computed in: float for 16-bit storage.
template <class T>
using compute_t = std::conditional_t<is_lowp_v<T>, float, T>;

/// Whether T may appear in a call whose token inputs mix storage types (computed in float).
template <class T>
inline constexpr bool mixes_with_float_v = std::is_same_v<T, float> || is_lowp_v<T>;

/// @brief The compute type of one call's token inputs Ts, or void if they do not go together.
/// All of one type T: compute_t<T>. Otherwise a mix of float, bf16 and half: float. double
/// never mixes (a double call is meant to be computed in double, and a float computation of
/// double inputs would silently lose that).
template <class... Ts>
struct common_token {
  static constexpr bool same = sizeof...(Ts) > 0 &&
                               (std::is_same_v<Ts, std::tuple_element_t<0, std::tuple<Ts...>>> && ...);
  static constexpr bool mixed_ok = (mixes_with_float_v<Ts> && ...);
  using type = std::conditional_t<same, compute_t<std::tuple_element_t<0, std::tuple<Ts...>>>,
                                  std::conditional_t<mixed_ok, float, void>>;
  /// Whether the call runs the 16-bit path (some input is bf16/half).
  static constexpr bool lowp = !std::is_void_v<type> && (is_lowp_v<Ts> || ...);
};

/// Tokens a 16-bit row is converted in at a time (see the file comment).
inline constexpr Index lowp_chunk = 1024;

/// The message every entry point gives for token inputs whose types do not go together.
#define PREFLOSS_DETAIL_MIX_MESSAGE                                                                       \
  "prefloss: the token inputs of one call must all have one scalar type (float, double, Eigen::bfloat16 " \
  "or Eigen::half), or mix only float, Eigen::bfloat16 and Eigen::half (then computed in float); double " \
  "does not mix with other types"

namespace lowp {

/// Whether Eigen::half converts with F16C itself. Eigen 3.4 defines EIGEN_HAS_FP16_C only when
/// EIGEN_COMP_CLANG is undefined or >= 380, and defines EIGEN_COMP_CLANG as 0 under GCC, so with
/// GCC it converts in software even with F16C. Both forms agree on every non-NaN value (RNE,
/// subnormals, overflow to inf); on NaNs the software form keeps a half sNaN's quiet bit clear
/// when widening and narrows every NaN to 0x7e00 with its sign, while vcvtph2ps / vcvtps2ph set
/// the quiet bit and keep the payload. The SIMD paths fix those lanes up to match Eigen.
#if defined(EIGEN_HAS_FP16_C)
inline constexpr bool eigen_half_hw = true;
#else
inline constexpr bool eigen_half_hw = false;
#endif

inline std::uint16_t bits(Eigen::bfloat16 x) noexcept { return Eigen::numext::bit_cast<std::uint16_t>(x); }
inline std::uint16_t bits(Eigen::half x) noexcept { return Eigen::numext::bit_cast<std::uint16_t>(x); }

}  // namespace lowp

/// @brief dst[0, n) = float(src[0, n)), exactly (every bf16 and half value is a float).
/// bf16 is the upper half of a float (a 16-bit shift); half goes through vcvtph2ps (F16C or
/// AVX-512F) and otherwise through Eigen's scalar conversion.
inline void to_float(const Eigen::bfloat16* src, float* dst, Index n) noexcept {
  auto t = static_cast<Index>(
      widen_bf16<arch>(reinterpret_cast<const std::uint16_t*>(src), dst, static_cast<std::size_t>(n)));
  for (; t < n; ++t) dst[t] = static_cast<float>(src[t]);
}

/// @copydoc to_float(const Eigen::bfloat16*, float*, Index)
inline void to_float(const Eigen::half* src, float* dst, Index n) noexcept {
  auto t = static_cast<Index>(widen_half<arch, !lowp::eigen_half_hw>(reinterpret_cast<const std::uint16_t*>(src), dst,
                                                                     static_cast<std::size_t>(n)));
  for (; t < n; ++t) dst[t] = static_cast<float>(src[t]);
}

/// Float tokens need no conversion (lets mixed-type calls treat every input alike).
inline void to_float(const float* src, float* dst, Index n) noexcept {
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
}

/// @brief dst[0, n) = bf16(src[0, n)) rounded to nearest even, bit for bit Eigen::bfloat16(float):
/// NaN becomes the quiet NaN 0x7fc0 of its sign, +-inf stays +-inf, subnormals round like
/// normals (no flush; AVX512_BF16's vcvtneps2bf16 would flush them, so it is not used).
inline void from_float(const float* src, Eigen::bfloat16* dst, Index n) noexcept {
  auto t =
      static_cast<Index>(narrow_bf16<arch>(src, reinterpret_cast<std::uint16_t*>(dst), static_cast<std::size_t>(n)));
  for (; t < n; ++t) dst[t] = Eigen::bfloat16(src[t]);
}

/// @brief dst[0, n) = half(src[0, n)) rounded to nearest even, bit for bit Eigen::half(float):
/// vcvtps2ph with round-to-nearest-even (F16C or AVX-512F; values beyond the half range become
/// +-inf), and without F16C Eigen's scalar conversion.
inline void from_float(const float* src, Eigen::half* dst, Index n) noexcept {
  auto t = static_cast<Index>(
      narrow_half<arch, !lowp::eigen_half_hw>(src, reinterpret_cast<std::uint16_t*>(dst), static_cast<std::size_t>(n)));
  for (; t < n; ++t) dst[t] = Eigen::half(src[t]);
}

/// Float outputs take float results as they are.
inline void from_float(const float* src, float* dst, Index n) noexcept {
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
}

/// @brief A chunk of n tokens at p as float: p itself for float storage, else converted into buf
/// (which holds lowp_chunk floats).
template <class T>
inline const float* as_float(const T* p, Index n, float* buf) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)buf;
    return p;
  } else {
    to_float(p, buf, n);
    return buf;
  }
}

/// @brief A double result rounded to storage type T via float, as every 16-bit output is the
/// float computation's result rounded once (for float and double T: a plain cast).
template <class T>
inline T round_to(double v) noexcept {
  if constexpr (is_lowp_v<T>) {
    return T(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

/// @brief lanes<float> tokens at p as a float batch. The conversion goes through a one-batch
/// stack buffer (to_float's vector body at this width, then an aligned reload that store
/// forwarding serves), so every instruction set gets it without another set of intrinsics.
template <class T>
inline batch<float> load_float(const T* p) noexcept {
  alignas(64) float buf[lanes<float>];
  to_float(p, buf, static_cast<Index>(lanes<float>));
  return batch<float>::load_aligned(buf);
}

/// 16-bit tokens load as float batches, converted on the way (row_sums_as's loader).
template <>
struct TokenLoad<Eigen::bfloat16, float> {
  static batch<float> load(const Eigen::bfloat16* p) noexcept { return load_float(p); }
};
template <>
struct TokenLoad<Eigen::half, float> {
  static batch<float> load(const Eigen::half* p) noexcept { return load_float(p); }
};

/// @brief row_sums for any token storage type (NeedValue = false never reads x).
template <bool NeedValue, bool NeedWeight, class S, class M>
inline RowSums masked_row_sums(const S* x, const M* m, Index n) noexcept {
  if constexpr (!is_lowp_v<S>) {
    return row_sums<NeedValue, NeedWeight>(x, m, n);
  } else if constexpr (!NeedValue) {
    return row_sums<false, NeedWeight>(static_cast<const float*>(nullptr), m, n);
  } else {
    // The float kernel's loop with each batch converted as it is loaded: a row sums to exactly
    // the bits of the same row held as float.
    return row_sums_as<true, NeedWeight, float>(x, m, n);
  }
}

/// @brief row_fill for any token storage type: a 16-bit row gets the float row's values
/// (scale * w, 0 where unselected) each rounded once to nearest even. Stream applies to float
/// and double rows only: a converted 16-bit row is written with ordinary stores.
template <bool Stream, class S, class M>
inline void masked_row_fill(const M* m, Index n, compute_t<S> scale, S* out) noexcept {
  if constexpr (!is_lowp_v<S>) {
    row_fill<Stream, S>(m, n, scale, out);
  } else {
    alignas(64) float buf[lowp_chunk];
    for (Index t = 0; t < n; t += lowp_chunk) {
      const Index len = n - t < lowp_chunk ? n - t : lowp_chunk;
      row_fill<false, float>(m + t, len, scale, buf);
      from_float(buf, out + t, len);
    }
  }
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
