/// @file detail/simd.hpp
/// The one place that knows xsimd's version-specific API (8.1 here) and raw intrinsics: the
/// architecture in use, horizontal sums, mask loading, streaming stores, exact fused
/// multiply-adds, masked and widening adds, byte counts, 16-bit float conversions and the pieces
/// of the exp and softplus kernels (detail/exp_log.hpp, detail/softplus_kernel.hpp). Moving to a newer xsimd should be
/// a change to this file only. Every intrinsic branch is taken only when the selected
/// architecture (detail::arch, PREFLOSS_SIMD_ARCH) has it, not merely the compiler flags.
///
/// xsimd 8.1 quirks callers must know: on AVX-512 unary minus is 0 - x (a zero keeps its +
/// sign; SSE/AVX flip it), and batch != batch is false for NaN (use isnan).
#pragma once

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../config.hpp"

// See PREFLOSS_KERNELS_BEGIN (config.hpp); it also covers xsimd's intrinsics calls when this is
// the first header to include them.
PREFLOSS_KERNELS_BEGIN
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <xsimd/xsimd.hpp>

namespace prefloss::detail {

/// The instruction set prefloss compiles its kernels for: whatever the translation unit's flags
/// allow (xsimd 8.1 has no runtime dispatch for header-only code). Override by defining
/// PREFLOSS_SIMD_ARCH to an xsimd architecture type.
#ifdef PREFLOSS_SIMD_ARCH
using arch = PREFLOSS_SIMD_ARCH;
#else
using arch = xsimd::default_arch;
#endif

template <class T>
using batch = xsimd::batch<T, arch>;
template <class T>
using batch_bool = xsimd::batch_bool<T, arch>;

template <class T>
inline constexpr std::size_t lanes = batch<T>::size;

/// Sum of the lanes (xsimd 8.1 calls this hadd; later versions reduce_add).
template <class T, class A>
inline T reduce_add(const xsimd::batch<T, A>& b) noexcept {
  return xsimd::hadd(b);
}

template <class T, class A>
inline xsimd::batch<T, A> load_u(const T* p) noexcept {
  return xsimd::batch<T, A>::load_unaligned(p);
}

template <class T, class A>
inline void store_u(T* p, const xsimd::batch<T, A>& b) noexcept {
  b.store_unaligned(p);
}

/// Whether store_stream writes around the cache on A (x86 from SSE2); elsewhere it is a store.
template <class A>
inline constexpr bool has_stream_store =
#if defined(__SSE2__)
    std::is_base_of_v<xsimd::avx512f, A> || std::is_base_of_v<xsimd::avx, A> || std::is_base_of_v<xsimd::sse2, A>;
#else
    false;
#endif

/// Aligned non-temporal store of b to p (p aligned to the batch size). Needs a store fence
/// before another thread reads p (stream_fence).
template <class T, class A>
inline void store_stream(T* p, const xsimd::batch<T, A>& b) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      _mm512_stream_ps(p, b);
    } else {
      _mm512_stream_pd(p, b);
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_base_of_v<xsimd::avx, A>) {
    if constexpr (sizeof(T) == 4) {
      _mm256_stream_ps(p, b);
    } else {
      _mm256_stream_pd(p, b);
    }
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_base_of_v<xsimd::sse2, A>) {
    if constexpr (sizeof(T) == 4) {
      _mm_stream_ps(p, b);
    } else {
      _mm_stream_pd(p, b);
    }
    return;
  }
#endif
  b.store_aligned(p);
}

/// Orders earlier streaming stores before later stores (sfence on x86).
inline void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Whether an output of `count` elements of T goes through streaming stores
/// (PREFLOSS_STREAMING_STORE_BYTES, config.hpp).
template <class T>
inline bool use_stream_store(std::size_t count) noexcept {
  return has_stream_store<arch> && count * sizeof(T) >= std::size_t{PREFLOSS_STREAMING_STORE_BYTES};
}

/// How many of the n elements at p come before the first batch-aligned one (all n if p is not
/// even aligned to T): the head a streaming loop writes with ordinary stores.
template <class T>
inline std::size_t stream_head(const T* p, std::size_t n) noexcept {
  constexpr std::size_t align = lanes<T> * sizeof(T);
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  if (addr % sizeof(T) != 0) return n;
  const std::size_t head = (align - addr % align) % align / sizeof(T);
  return head < n ? head : n;
}

/// store_stream when Stream (p batch-aligned), else store_u.
template <bool Stream, class T, class A>
inline void store_to(T* p, const xsimd::batch<T, A>& b) noexcept {
  if constexpr (Stream) {
    store_stream(p, b);
  } else {
    store_u(p, b);
  }
}

/// lanes<T> mask bytes (bool or uint8, nonzero = selected) as a batch_bool over T.
/// x86 has widening integer loads that xsimd 8.1 does not expose; elsewhere a small buffer.
template <class T, class A, class M>
inline xsimd::batch_bool<T, A> load_byte_mask(const M* m) noexcept {
  static_assert(sizeof(M) == 1, "byte masks only");
  using B = xsimd::batch<T, A>;
  constexpr std::size_t n = B::size;
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (n == 16) {
      __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
      return xsimd::batch_bool<T, A>(_mm512_test_epi32_mask(w, w));
    } else {
      static_assert(n == 8);
      __m512i w = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
      return xsimd::batch_bool<T, A>(_mm512_test_epi64_mask(w, w));
    }
  } else
#endif
#if defined(__AVX2__)
      if constexpr (std::is_base_of_v<xsimd::avx2, A>) {
    __m256i w;
    if constexpr (n == 8) {
      w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
      w = _mm256_cmpeq_epi32(w, _mm256_setzero_si256());
    } else {
      static_assert(n == 4);
      std::int32_t four;
      std::memcpy(&four, m, 4);
      w = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
      w = _mm256_cmpeq_epi64(w, _mm256_setzero_si256());
    }
    // w is all-ones where the mask byte is zero; invert to get "selected".
    w = _mm256_xor_si256(w, _mm256_set1_epi32(-1));
    if constexpr (sizeof(T) == 4) {
      return xsimd::batch_bool<T, A>(_mm256_castsi256_ps(w));
    } else {
      return xsimd::batch_bool<T, A>(_mm256_castsi256_pd(w));
    }
  } else
#endif
  {
    alignas(64) bool sel[n];
    for (std::size_t k = 0; k < n; ++k) sel[k] = m[k] != 0;
    return xsimd::batch_bool<T, A>::load_aligned(sel);
  }
}

/// Whether xsimd::fma / fnma round once on A. xsimd 8.1 has native kernels for the fma3 / fma4
/// architectures; on AVX-512 it falls back to x * y + z, fused only if the compiler contracts
/// it (GCC does in gnu++ modes, not under -std=c++17), so fnma_exact uses intrinsics there.
template <class A>
inline constexpr bool has_fma =
    std::is_base_of_v<xsimd::fma3<xsimd::sse4_2>, A> || std::is_base_of_v<xsimd::fma3<xsimd::avx>, A> ||
    std::is_base_of_v<xsimd::fma3<xsimd::avx2>, A> || std::is_base_of_v<xsimd::fma4, A> ||
    std::is_base_of_v<xsimd::avx512f, A>;

/// z - x * y rounded once, on architectures with has_fma<A>.
template <class T, class A>
inline xsimd::batch<T, A> fnma_exact(const xsimd::batch<T, A>& x, const xsimd::batch<T, A>& y,
                                     const xsimd::batch<T, A>& z) noexcept {
  static_assert(has_fma<A>, "fnma_exact needs a fused multiply-add");
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_fnmadd_ps(x, y, z);
    } else {
      return _mm512_fnmadd_pd(x, y, z);
    }
  } else
#endif
  {
    return xsimd::fnma(x, y, z);
  }
}

/// x * y + z rounded once, on architectures with has_fma<A>.
template <class T, class A>
inline xsimd::batch<T, A> fma_exact(const xsimd::batch<T, A>& x, const xsimd::batch<T, A>& y,
                                    const xsimd::batch<T, A>& z) noexcept {
  static_assert(has_fma<A>, "fma_exact needs a fused multiply-add");
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_fmadd_ps(x, y, z);
    } else {
      return _mm512_fmadd_pd(x, y, z);
    }
  } else
#endif
  {
    return xsimd::fma(x, y, z);
  }
}

/// x * y - z rounded once, on architectures with has_fma<A>.
template <class T, class A>
inline xsimd::batch<T, A> fms_exact(const xsimd::batch<T, A>& x, const xsimd::batch<T, A>& y,
                                    const xsimd::batch<T, A>& z) noexcept {
  static_assert(has_fma<A>, "fms_exact needs a fused multiply-add");
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_fmsub_ps(x, y, z);
    } else {
      return _mm512_fmsub_pd(x, y, z);
    }
  } else
#endif
  {
    return xsimd::fms(x, y, z);
  }
}

// ---- instruction-set levels ------------------------------------------------------------------
// A kernel compiles for detail::arch, which PREFLOSS_SIMD_ARCH may set below what the flags
// allow (xsimd::sse2 under -march=native). The macro only says the intrinsics exist; each branch
// below is taken only when A is that level too, and callers outside this file ask these traits
// instead of testing macros.

/// A is AVX-512F (and the compiler has its intrinsics).
template <class A>
inline constexpr bool is_avx512f =
#if defined(__AVX512F__)
    std::is_base_of_v<xsimd::avx512f, A>;
#else
    false;
#endif

/// A is AVX-512DQ (vrangeps / vrangepd).
template <class A>
inline constexpr bool is_avx512dq =
#if defined(__AVX512DQ__)
    std::is_base_of_v<xsimd::avx512dq, A>;
#else
    false;
#endif

/// A is AVX-512BW (byte compares into mask registers).
template <class A>
inline constexpr bool is_avx512bw =
#if defined(__AVX512BW__)
    std::is_base_of_v<xsimd::avx512bw, A>;
#else
    false;
#endif

/// A is AVX2 (or AVX2 + FMA3); xsimd's AVX-512 types do not derive from it.
template <class A>
inline constexpr bool is_avx2 =
#if defined(__AVX2__)
    std::is_base_of_v<xsimd::avx2, A>;
#else
    false;
#endif

template <class A>
inline constexpr bool dependent_false = false;

// ---- masked accumulation ---------------------------------------------------------------------

/// acc + (sel ? v : 0): one masked add on AVX-512, select + add elsewhere (the same bits).
template <class T, class A>
inline xsimd::batch<T, A> add_selected(const xsimd::batch<T, A>& acc, const xsimd::batch_bool<T, A>& sel,
                                       const xsimd::batch<T, A>& v) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_mask_add_ps(acc, sel, acc, v);
    } else {
      return _mm512_mask_add_pd(acc, sel, acc, v);
    }
  } else
#endif
  {
    return acc + xsimd::select(sel, v, xsimd::batch<T, A>(T(0)));
  }
}

/// acc[0, lanes) += v lane by lane, widened to double (acc: 64-byte aligned, batch<float, A>::size
/// doubles). Exact conversions, one double rounding per lane.
template <class A>
inline void widen_add(double* acc, const xsimd::batch<float, A>& v) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    const __m512 x = v;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    _mm512_store_pd(acc, _mm512_add_pd(_mm512_load_pd(acc), lo));
    _mm512_store_pd(acc + 8, _mm512_add_pd(_mm512_load_pd(acc + 8), hi));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_base_of_v<xsimd::avx, A>) {
    const __m256 x = v;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    _mm256_store_pd(acc, _mm256_add_pd(_mm256_load_pd(acc), lo));
    _mm256_store_pd(acc + 4, _mm256_add_pd(_mm256_load_pd(acc + 4), hi));
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_base_of_v<xsimd::sse2, A>) {
    const __m128 x = v;
    _mm_store_pd(acc, _mm_add_pd(_mm_load_pd(acc), _mm_cvtps_pd(x)));
    _mm_store_pd(acc + 2, _mm_add_pd(_mm_load_pd(acc + 2), _mm_cvtps_pd(_mm_movehl_ps(x, x))));
    return;
  }
#endif
  alignas(64) float a[xsimd::batch<float, A>::size];
  v.store_aligned(a);
  for (std::size_t k = 0; k < xsimd::batch<float, A>::size; ++k) acc[k] += static_cast<double>(a[k]);
}

/// Bytes count_nonzero_block<A> reads at a time: 64 on AVX-512BW, 32 on AVX2, 0 where there is
/// no such kernel (the caller counts byte by byte).
template <class A>
inline constexpr std::size_t nonzero_block = is_avx512bw<A> ? 64 : (is_avx2<A> ? 32 : 0);

/// Number of nonzero bytes among the nonzero_block<A> bytes at p (any alignment).
template <class A>
inline std::size_t count_nonzero_block(const void* p) noexcept {
#if defined(__AVX512BW__)
  if constexpr (std::is_base_of_v<xsimd::avx512bw, A>) {
    const __m512i v = _mm512_loadu_si512(p);
    return std::bitset<64>(_mm512_test_epi8_mask(v, v)).count();
  } else
#endif
#if defined(__AVX2__)
      if constexpr (std::is_base_of_v<xsimd::avx2, A>) {
    const __m256i v = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    const auto zero = static_cast<std::uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
    return 32 - std::bitset<32>(zero).count();
  } else
#endif
  {
    static_assert(dependent_false<A>, "no block count on this architecture (nonzero_block<A> is 0)");
    (void)p;
    return 0;
  }
}

// ---- pieces of the exp / softplus kernels ----------------------------------------------------

/// Whether scale_pow2 / round_even exist on A: AVX-512's vscalefps/pd multiplies by 2^k with one
/// rounding over the whole range (gradual underflow and overflow included).
template <class A>
inline constexpr bool has_scalef = is_avx512f<A>;

/// x rounded to the nearest integer, ties to even, no exceptions (vrndscaleps/pd); has_scalef<A>.
template <class T, class A>
inline xsimd::batch<T, A> round_even(const xsimd::batch<T, A>& x) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
  } else
#endif
  {
    static_assert(dependent_false<A>, "round_even needs has_scalef<A>");
    return x;
  }
}

/// m * 2^k for integral k, rounded once (vscalefps/pd); has_scalef<A>.
template <class T, class A>
inline xsimd::batch<T, A> scale_pow2(const xsimd::batch<T, A>& m, const xsimd::batch<T, A>& k) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_scalef_ps(m, k);
    } else {
      return _mm512_scalef_pd(m, k);
    }
  } else
#endif
  {
    static_assert(dependent_false<A>, "scale_pow2 needs has_scalef<A>");
    (void)k;
    return m;
  }
}

/// min(a, b) by x86's rule: b when either is NaN (vminps), so min(c, x) passes a NaN x through.
template <class T, class A>
inline xsimd::batch<T, A> min_nan_second(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_min_ps(a, b);
    } else {
      return _mm512_min_pd(a, b);
    }
  } else
#endif
  {
    return xsimd::select(xsimd::isnan(a) || xsimd::isnan(b), b, xsimd::min(a, b));
  }
}

/// max(a, b) by x86's rule: b when either is NaN (vmaxps).
template <class T, class A>
inline xsimd::batch<T, A> max_nan_second(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_max_ps(a, b);
    } else {
      return _mm512_max_pd(a, b);
    }
  } else
#endif
  {
    return xsimd::select(xsimd::isnan(a) || xsimd::isnan(b), b, xsimd::max(a, b));
  }
}

/// Whether min_abs and lookup32 exist on A (float): AVX-512DQ's vrangeps and AVX-512F's
/// two-register permute.
template <class A>
inline constexpr bool has_range_lookup = is_avx512dq<A>;

/// min(|x|, c) with the sign cleared, for c > 0, in one vrangeps; a quiet NaN x gives c (the
/// caller brings NaN back some other way). has_range_lookup<A>.
template <class A>
inline xsimd::batch<float, A> min_abs(const xsimd::batch<float, A>& x, float c) noexcept {
#if defined(__AVX512DQ__)
  if constexpr (std::is_base_of_v<xsimd::avx512dq, A>) {
    return _mm512_range_ps(x, _mm512_set1_ps(c), 0x0A);  // imm: min of magnitudes, sign 0
  } else
#endif
  {
    static_assert(dependent_false<A>, "min_abs needs has_range_lookup<A>");
    (void)c;
    return x;
  }
}

/// table[i] lane-wise for a 64-byte aligned table of 32 floats, i the low 5 bits of each lane's
/// bit pattern in idx (one two-register permute). has_range_lookup<A>.
template <class A>
inline xsimd::batch<float, A> lookup32(const float* table, const xsimd::batch<float, A>& idx) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    return _mm512_permutex2var_ps(_mm512_load_ps(table), _mm512_castps_si512(idx), _mm512_load_ps(table + 16));
  } else
#endif
  {
    static_assert(dependent_false<A>, "lookup32 needs has_range_lookup<A>");
    (void)table;
    return idx;
  }
}

// ---- 16-bit float conversions ----------------------------------------------------------------
// On bit patterns, so this file needs no Eigen: each converts the longest prefix of [0, n) it
// can in whole vectors and returns its length; detail/lowp.hpp converts the rest with Eigen's
// scalar conversions and says why the results match those bit for bit. EigenNan: reproduce
// the NaN bits of Eigen's software half conversion (a widened half sNaN keeps its quiet bit
// clear; every narrowed NaN becomes 0x7e00 with its sign) instead of vcvtph2ps / vcvtps2ph's.

/// SSE2 is part of every x86-64 architecture xsimd selects (SSE2 up, AVX, AVX-512).
template <class A>
inline constexpr bool has_sse2 =
#if defined(__SSE2__)
    std::is_base_of_v<xsimd::sse2, A> || std::is_base_of_v<xsimd::avx, A> || std::is_base_of_v<xsimd::avx512f, A>;
#else
    false;
#endif

/// Whether the half conversions have a vector form on A (F16C or AVX-512F).
template <class A>
inline constexpr bool has_half_convert =
#if defined(__F16C__)
    is_avx512f<A> || std::is_base_of_v<xsimd::avx, A>;
#else
    is_avx512f<A>;
#endif

#if defined(__SSE2__)
/// 4 RNE-rounded bf16 patterns from 4 float bit patterns, each sign-extended from its low 16
/// bits (SSE2 has no unsigned 32->16 pack; the signed pack then keeps the bits).
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

/// d[k] = the float whose upper half is s[k] (bf16 widening is a 16-bit shift).
template <class A>
inline std::size_t widen_bf16(const std::uint16_t* s, float* d, std::size_t n) noexcept {
  std::size_t t = 0;
#if defined(__AVX512F__)
  if constexpr (is_avx512f<A>) {
    for (; t + 16 <= n; t += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + t)));
      _mm512_storeu_si512(d + t, _mm512_slli_epi32(w, 16));
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (is_avx2<A>) {
    for (; t + 8 <= n; t += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), _mm256_slli_epi32(w, 16));
    }
  }
#endif
#if defined(__SSE2__)
  if constexpr (has_sse2<A>) {
    for (; t + 8 <= n; t += 8) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t));
      const __m128i z = _mm_setzero_si128();
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), _mm_unpacklo_epi16(z, v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t + 4), _mm_unpackhi_epi16(z, v));
    }
  }
#endif
  (void)s;
  (void)d;
  (void)n;
  return t;
}

/// d[k] = float(half with bits s[k]) through vcvtph2ps; has_half_convert<A>.
template <class A, bool EigenNan>
inline std::size_t widen_half(const std::uint16_t* s, float* d, std::size_t n) noexcept {
  std::size_t t = 0;
#if defined(__AVX512F__)
  if constexpr (is_avx512f<A>) {
    for (; t + 16 <= n; t += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + t));
      __m512i r = _mm512_castps_si512(_mm512_cvtph_ps(h));
      if constexpr (EigenNan) {
        const __m512i m = _mm512_and_si512(_mm512_cvtepu16_epi32(h), _mm512_set1_epi32(0x7fff));
        const __mmask16 sn = _mm512_cmpgt_epi32_mask(m, _mm512_set1_epi32(0x7c00)) &
                             _mm512_cmplt_epi32_mask(m, _mm512_set1_epi32(0x7e00));
        r = _mm512_mask_andnot_epi32(r, sn, _mm512_set1_epi32(0x400000), r);
      }
      _mm512_storeu_si512(d + t, r);
    }
  }
#endif
#if defined(__F16C__)
  if constexpr (has_half_convert<A>) {
    for (; t + 8 <= n; t += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t));
      __m256 r = _mm256_cvtph_ps(h);
      if constexpr (EigenNan) {
        const __m128i m = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
        const __m128i sn =
            _mm_and_si128(_mm_cmpgt_epi16(m, _mm_set1_epi16(0x7c00)), _mm_cmplt_epi16(m, _mm_set1_epi16(0x7e00)));
        const __m256i wide = _mm256_set_m128i(_mm_unpackhi_epi16(sn, sn), _mm_unpacklo_epi16(sn, sn));
        r = _mm256_andnot_ps(_mm256_and_ps(_mm256_castsi256_ps(wide), _mm256_castsi256_ps(_mm256_set1_epi32(0x400000))),
                             r);
      }
      _mm256_storeu_ps(d + t, r);
    }
  }
#endif
  (void)s;
  (void)d;
  (void)n;
  return t;
}

/// d[k] = the bf16 pattern of s[k] rounded to nearest even: NaN becomes the quiet NaN 0x7fc0 of
/// its sign, +-inf stays +-inf, subnormals round like normals (no flush).
template <class A>
inline std::size_t narrow_bf16(const float* s, std::uint16_t* d, std::size_t n) noexcept {
  std::size_t t = 0;
#if defined(__AVX512BW__)
  if constexpr (is_avx512bw<A>) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i sign = _mm512_set1_epi32(0x8000), qnan = _mm512_set1_epi32(0x7fc0);
    for (; t + 16 <= n; t += 16) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
      // vcvtneps2bf16 rounds to nearest even too but flushes subnormal inputs to 0 and keeps NaN
      // payloads; batches holding either (fpclass 0x01 | 0x20 | 0x80) take the integer path
      // below, the rest (nearly all) one instruction.
      const __m512 x = _mm512_loadu_ps(s + t);
      if (_mm512_fpclass_ps_mask(x, 0xa1) == 0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), (__m256i)_mm512_cvtneps_pbh(x));
        continue;
      }
#endif
      const __m512i u = _mm512_loadu_si512(s + t);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), lsb), 16);
      const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs), inf);
      const __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), sign), qnan);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, q)));
    }
  }
#endif
#if defined(__SSE2__)
  if constexpr (has_sse2<A>) {
    for (; t + 8 <= n; t += 8) {
      const __m128i lo = bf16_round4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t)));
      const __m128i hi = bf16_round4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t + 4)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), _mm_packs_epi32(lo, hi));
    }
  }
#endif
  (void)s;
  (void)d;
  (void)n;
  return t;
}

/// d[k] = the half pattern of s[k] rounded to nearest even through vcvtps2ph (values beyond the
/// half range become +-inf); has_half_convert<A>.
template <class A, bool EigenNan>
inline std::size_t narrow_half(const float* s, std::uint16_t* d, std::size_t n) noexcept {
  std::size_t t = 0;
#if defined(__AVX512F__)
  if constexpr (is_avx512f<A>) {
    for (; t + 16 <= n; t += 16) {
      const __m512 x = _mm512_loadu_ps(s + t);
      __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
      if constexpr (EigenNan) {
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
  if constexpr (has_half_convert<A>) {
    for (; t + 8 <= n; t += 8) {
      const __m256 x = _mm256_loadu_ps(s + t);
      __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
      if constexpr (EigenNan) {
        const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
        const __m128i m = _mm_packs_epi32(_mm_castps_si128(_mm256_castps256_ps128(nan)),
                                          _mm_castps_si128(_mm256_extractf128_ps(nan, 1)));
        const __m128i q =
            _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
        h = _mm_or_si128(_mm_and_si128(m, q), _mm_andnot_si128(m, h));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), h);
    }
  }
#endif
  (void)s;
  (void)d;
  (void)n;
  return t;
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
