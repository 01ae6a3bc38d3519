/// @file detail/simd.hpp
/// The one place that knows xsimd's version-specific API (8.1 here): the architecture in use,
/// horizontal sums, mask loading and an exp without xsimd's early flush to zero. Moving to a
/// newer xsimd should be a change to this file only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// GCC 12's AVX-512 intrinsics read a self-initialised dummy (`__m512 __Y = __Y;`) and warn
// about it wherever they are inlined (GCC bug 105593, fixed in 13). The pragma covers those
// headers when this is the first to include them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <xsimd/xsimd.hpp>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

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

/// exp(x) for a batch, down to the true underflow. xsimd 8.1 returns 0 below log(FLT_MIN)
/// (-88.4f / -708.4) although exp(x) is still a positive subnormal until about -103.9f /
/// -745.1; logsigmoid's tail -exp(-x) must not vanish early. Shifting by 64 is exact for x in
/// that window, and the final scaling by 2^-64 rounds once.
template <class T, class A>
inline xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  constexpr T min_normal_log = sizeof(T) == 4 ? T(-88.3762626647949) : T(-708.3964185322641);
  const auto low = x <= B(min_normal_log);
  if (xsimd::none(low)) return xsimd::exp(x);
  const B shifted = xsimd::exp(xsimd::select(low, x + B(T(64)), x));
  return xsimd::select(low, shifted * B(T(5.421010862427522e-20)), shifted);  // 2^-64
}

}  // namespace prefloss::detail
