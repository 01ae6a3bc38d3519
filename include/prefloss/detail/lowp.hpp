/// @file detail/lowp.hpp
/// 16-bit token storage (Eigen::bfloat16, Eigen::half): the type traits that map a storage type
/// to the type prefloss computes in (float), SIMD conversions between them that match Eigen's
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
#include <unsupported/Eigen/CXX11/Tensor>

#include "../config.hpp"
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

/// 8 RNE-rounded bf16 results from 8 float bit patterns in two 4-lane halves (SSE2 has no
/// unsigned 32->16 pack: each lane is sign-extended from its low 16 bits, so the signed pack
/// keeps the bits).
#if defined(__SSE2__)
inline __m128i bf16_round4(__m128i u) noexcept {
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  const __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb), 16);
  // NaN (|u| > inf) becomes the quiet NaN of its sign, as Eigen::bfloat16(float) does: rounding
  // a NaN's payload could carry into the exponent and give an infinity.
  const __m128i mag = _mm_and_si128(u, _mm_set1_epi32(0x7fffffff));
  const __m128i nan = _mm_cmpgt_epi32(mag, _mm_set1_epi32(0x7f800000));
  const __m128i qnan =
      _mm_or_si128(_mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(0x8000)), _mm_set1_epi32(0x7fc0));
  const __m128i v = _mm_or_si128(_mm_and_si128(nan, qnan), _mm_andnot_si128(nan, r));
  return _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);
}
#endif

}  // namespace lowp

/// @brief dst[0, n) = float(src[0, n)), exactly (every bf16 and half value is a float).
/// bf16 is the upper half of a float (a 16-bit shift); half goes through vcvtph2ps (F16C or
/// AVX-512F) and otherwise through Eigen's scalar conversion.
inline void to_float(const Eigen::bfloat16* src, float* dst, Index n) noexcept {
  Index t = 0;
  const auto* s = reinterpret_cast<const std::uint16_t*>(src);
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, arch>) {
    for (; t + 16 <= n; t += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + t)));
      _mm512_storeu_si512(dst + t, _mm512_slli_epi32(w, 16));
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_base_of_v<xsimd::avx2, arch>) {
    for (; t + 8 <= n; t += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t), _mm256_slli_epi32(w, 16));
    }
  }
#endif
#if defined(__SSE2__)
  for (; t + 8 <= n; t += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t));
    const __m128i z = _mm_setzero_si128();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + t), _mm_unpacklo_epi16(z, v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + t + 4), _mm_unpackhi_epi16(z, v));
  }
#endif
  for (; t < n; ++t) dst[t] = static_cast<float>(src[t]);
}

/// @copydoc to_float(const Eigen::bfloat16*, float*, Index)
inline void to_float(const Eigen::half* src, float* dst, Index n) noexcept {
  Index t = 0;
  [[maybe_unused]] const auto* s = reinterpret_cast<const std::uint16_t*>(src);
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, arch>) {
    for (; t + 16 <= n; t += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + t));
      __m512i r = _mm512_castps_si512(_mm512_cvtph_ps(h));
      if constexpr (!lowp::eigen_half_hw) {
        const __m512i m = _mm512_and_si512(_mm512_cvtepu16_epi32(h), _mm512_set1_epi32(0x7fff));
        const __mmask16 sn = _mm512_cmpgt_epi32_mask(m, _mm512_set1_epi32(0x7c00)) &
                             _mm512_cmplt_epi32_mask(m, _mm512_set1_epi32(0x7e00));
        r = _mm512_mask_andnot_epi32(r, sn, _mm512_set1_epi32(0x400000), r);
      }
      _mm512_storeu_si512(dst + t, r);
    }
  }
#endif
#if defined(__F16C__)
  for (; t + 8 <= n; t += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t));
    __m256 r = _mm256_cvtph_ps(h);
    if constexpr (!lowp::eigen_half_hw) {
      const __m128i m = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
      const __m128i sn =
          _mm_and_si128(_mm_cmpgt_epi16(m, _mm_set1_epi16(0x7c00)), _mm_cmplt_epi16(m, _mm_set1_epi16(0x7e00)));
      const __m256i wide = _mm256_set_m128i(_mm_unpackhi_epi16(sn, sn), _mm_unpacklo_epi16(sn, sn));
      r = _mm256_andnot_ps(_mm256_and_ps(_mm256_castsi256_ps(wide), _mm256_castsi256_ps(_mm256_set1_epi32(0x400000))),
                           r);
    }
    _mm256_storeu_ps(dst + t, r);
  }
#endif
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
  Index t = 0;
  auto* d = reinterpret_cast<std::uint16_t*>(dst);
#if defined(__AVX512BW__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, arch>) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i sign = _mm512_set1_epi32(0x8000), qnan = _mm512_set1_epi32(0x7fc0);
    for (; t + 16 <= n; t += 16) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
      // vcvtneps2bf16 rounds to nearest even like Eigen but flushes subnormal inputs to 0 and
      // keeps NaN payloads; batches holding either (fpclass 0x01 | 0x20 | 0x80) take the integer
      // path below, the rest (nearly all) one instruction.
      const __m512 x = _mm512_loadu_ps(src + t);
      if (_mm512_fpclass_ps_mask(x, 0xa1) == 0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), (__m256i)_mm512_cvtneps_pbh(x));
        continue;
      }
#endif
      const __m512i u = _mm512_loadu_si512(src + t);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), lsb), 16);
      const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs), inf);
      const __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), sign), qnan);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, q)));
    }
  }
#endif
#if defined(__SSE2__)
  for (; t + 8 <= n; t += 8) {
    const __m128i lo = lowp::bf16_round4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + t)));
    const __m128i hi = lowp::bf16_round4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + t + 4)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), _mm_packs_epi32(lo, hi));
  }
#endif
  for (; t < n; ++t) dst[t] = Eigen::bfloat16(src[t]);
}

/// @brief dst[0, n) = half(src[0, n)) rounded to nearest even, bit for bit Eigen::half(float):
/// vcvtps2ph with round-to-nearest-even (F16C or AVX-512F; values beyond the half range become
/// +-inf), and without F16C Eigen's scalar conversion.
inline void from_float(const float* src, Eigen::half* dst, Index n) noexcept {
  Index t = 0;
  [[maybe_unused]] auto* d = reinterpret_cast<std::uint16_t*>(dst);
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, arch>) {
    for (; t + 16 <= n; t += 16) {
      const __m512 x = _mm512_loadu_ps(src + t);
      __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
      if constexpr (!lowp::eigen_half_hw) {
        const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        if (nan) {
          const __m512i w = _mm512_cvtepu16_epi32(h);
          const __m512i q = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7e00));
          h = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(w, nan, q));
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), h);
    }
  }
#endif
#if defined(__F16C__)
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(src + t);
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    if constexpr (!lowp::eigen_half_hw) {
      const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
      const __m128i m = _mm_packs_epi32(_mm_castps_si128(_mm256_castps256_ps128(nan)),
                                        _mm_castps_si128(_mm256_extractf128_ps(nan, 1)));
      const __m128i q =
          _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
      h = _mm_or_si128(_mm_and_si128(m, q), _mm_andnot_si128(m, h));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), h);
  }
#endif
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
