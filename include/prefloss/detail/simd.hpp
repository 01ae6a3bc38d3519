/// @file detail/simd.hpp
/// The one place that knows xsimd's version-specific API (8.1 here): the architecture in use,
/// horizontal sums, mask loading and an exp without xsimd's early flush to zero. Moving to a
/// newer xsimd should be a change to this file only.
///
/// xsimd 8.1 quirks callers must know: on AVX-512 unary minus is 0 - x (a zero keeps its +
/// sign; SSE/AVX flip it), and batch != batch is false for NaN (use isnan).
#pragma once

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

/// 1/n! for n = 2 .. 8 (float) / 2 .. 14 (double): exp(r) - 1 - r = r^2 q(r) on |r| <= log(2)/2,
/// truncated where the remainder is below 0.01 ULP.
template <class T>
inline constexpr T exp_taylor[sizeof(T) == 4 ? 7 : 13] = {};
template <>
inline constexpr float exp_taylor<float>[7] = {1.f / 2,   1.f / 6,    1.f / 24,   1.f / 120,
                                               1.f / 720, 1.f / 5040, 1.f / 40320};
template <>
inline constexpr double exp_taylor<double>[13] = {
    1. / 2,      1. / 6,       1. / 24,       1. / 120,       1. / 720,        1. / 5040,       1. / 40320,
    1. / 362880, 1. / 3628800, 1. / 39916800, 1. / 479001600, 1. / 6227020800, 1. / 87178291200};

/// log(2) = ln2_hi + ln2_lo, ln2_hi with few enough bits that k * ln2_hi is exact for every k an
/// exp reduction meets: float 15 significant bits (|k| <= 150 needs 8), double 32 (|k| <= 1076).
template <class T>
inline constexpr T ln2_hi = sizeof(T) == 4 ? T(0.693145751953125) : T(6.93147180369123816490e-01);
template <class T>
inline constexpr T ln2_lo = sizeof(T) == 4 ? T(1.428606765330187045e-06) : T(1.90821492927058770002e-10);

/// q(r) with exp(r) = 1 + r + r^2 q(r), for |r| <= log(2)/2 (Horner over exp_taylor).
template <class T, class A>
inline xsimd::batch<T, A> exp_q(const xsimd::batch<T, A>& r) noexcept {
  using B = xsimd::batch<T, A>;
  constexpr auto& c = exp_taylor<T>;
  constexpr std::size_t nc = sizeof(c) / sizeof(c[0]);
  B q = B(c[nc - 1]);
  for (std::size_t i = nc - 1; i-- > 0;) q = xsimd::fma(q, r, B(c[i]));
  return q;
}

#if defined(__AVX512F__)
/// Round to nearest integer (ties to even) on AVX-512, no exceptions.
template <class T, class A>
inline xsimd::batch<T, A> exp_round(const xsimd::batch<T, A>& x) noexcept {
  if constexpr (sizeof(T) == 4) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

/// m * 2^k for integral k, rounded once (vscalefps/pd).
template <class T, class A>
inline xsimd::batch<T, A> exp_scale(const xsimd::batch<T, A>& m, const xsimd::batch<T, A>& k) noexcept {
  if constexpr (sizeof(T) == 4) {
    return _mm512_scalef_ps(m, k);
  } else {
    return _mm512_scalef_pd(m, k);
  }
}
#endif

/// An unevaluated sum hi + lo, |lo| <= ULP(hi) / 2 (lo may be 0).
template <class B>
struct HiLo {
  B hi, lo;
};

/// exp(x) for a batch as hi + lo: hi is exp(x) to <= 0.77 ULP (the last rounding included) and
/// hi + lo is exp(x) to about 0.25 ULP of hi, for callers such as sigmoid whose own formula
/// would double hi's rounding error. lo is 0 where hi is subnormal.
///
/// Not xsimd::exp, which in 8.1 (a) returns 0 below log(FLT_MIN) (-88.4f / -708.4) although
/// exp(x) is a positive subnormal down to about -103.9f / -745.1 (logsigmoid's tail -exp(-x)
/// must not vanish early), (b) in float already gives 0 from -87.68f on (its ldexp builds 2^k
/// from exponent bits, so 2^-127 is 0), and (c) is off by up to 1.52 ULP in float (0.88 in
/// double), which the functions built on it turn into more than 2 ULP.
///
/// x = k log(2) + r with |r| <= log(2)/2 and log(2) split so that k * hi is exact and r_hi =
/// x - k * hi is exact (Sterbenz); exp(r) = 1 + r_hi + (r_lo + r^2 q(r)) with 1 + r_hi kept
/// as an exact sum, and the last add split exactly into hi + lo (Fast2Sum). The scaling by 2^k
/// goes in two halves, each 2^(k/2) normal: the first product is exact, the second rounds once,
/// also into the subnormal range. Inputs are clamped to where exp underflows to 0 / overflows
/// to inf (which keeps k in range); NaN is passed through.
template <class T, class A>
inline HiLo<xsimd::batch<T, A>> exp_hilo(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  constexpr bool is_f = sizeof(T) == 4;
  constexpr T lo = is_f ? T(-104) : T(-746), hi = is_f ? T(89) : T(710);
  constexpr T inv_ln2 = T(1.44269504088896340735992468100189214);

  const B xc = xsimd::min(xsimd::max(x, B(lo)), B(hi));
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    // AVX-512: the same reduction and polynomial, branch-free; vscalefps/pd multiplies by 2^k
    // with one rounding, gradual underflow and overflow included (k is integral and in range).
    const B k = exp_round(xc * B(inv_ln2));
    const B r_hi = fnma_exact(k, B(ln2_hi<T>), xc);  // exact
    const B r_lo = -(k * B(ln2_lo<T>));
    const B r = r_hi + r_lo;
    const B h = B(T(1)) + r_hi;
    const B l = (B(T(1)) - h) + r_hi;
    constexpr auto& c = exp_taylor<T>;
    constexpr std::size_t nc = sizeof(c) / sizeof(c[0]);
    B q = B(c[nc - 1]);
    for (std::size_t i = nc - 1; i-- > 0;) q = fma_exact(q, r, B(c[i]));
    const B t = l + fma_exact(r * r, q, r_lo);
    const B m = h + t;
    const B m_lo = (h - m) + t;
    const B e = exp_scale(m, k);
    const B e_lo = xsimd::select(e < B(std::numeric_limits<T>::min()), B(T(0)), exp_scale(m_lo, k));
    return {xsimd::select(xsimd::isnan(x), x, e), e_lo};
  }
#endif
  const B k = xsimd::nearbyint(xc * B(inv_ln2));
  const B r_hi = xsimd::fnma(k, B(ln2_hi<T>), xc);  // exact
  const B r_lo = -(k * B(ln2_lo<T>));
  const B r = r_hi + r_lo;
  const B h = B(T(1)) + r_hi;
  const B l = (B(T(1)) - h) + r_hi;  // 1 + r_hi = h + l exactly (|r_hi| < 1)
  const B t = l + xsimd::fma(r * r, exp_q(r), r_lo);
  const B m = h + t;
  const B m_lo = (h - m) + t;  // |h| > |t|
  B e, e_lo;
  if (xsimd::all(k >= B(T(std::numeric_limits<T>::min_exponent - 1)))) {  // 2^k normal: exact scaling
    const auto i = xsimd::to_int(k);
    e = xsimd::ldexp(m, i);
    e_lo = xsimd::ldexp(m_lo, i);
  } else {
    const B k1 = xsimd::floor(k * B(T(0.5)));
    const auto i1 = xsimd::to_int(k1), i2 = xsimd::to_int(k - k1);
    e = xsimd::ldexp(xsimd::ldexp(m, i1), i2);
    // Where e is subnormal its own rounding dominates and a rounded e_lo would only add error.
    e_lo = xsimd::select(e < B(std::numeric_limits<T>::min()), B(T(0)), xsimd::ldexp(xsimd::ldexp(m_lo, i1), i2));
  }
  // (xsimd 8.1: x != x is false for NaN on AVX-512; isnan is right everywhere)
  return {xsimd::select(xsimd::isnan(x), x, e), e_lo};
}

/// exp(x) for a batch, down to the true underflow: exp_hilo(x).hi (<= 0.77 ULP), except on
/// AVX-512, where callers that need no low part get a shorter kernel (<= 1.01 ULP measured):
/// Cody-Waite reduction x = k ln2 + r rounded once, exp(r) = 1 + r + r^2 P(r) with Cephes'
/// expf minimax polynomial (float) or Taylor to degree 13 (double, truncation < 0.02 ULP), and
/// the same one-rounding vscalefps/pd scaling as exp_hilo, which handles overflow (+inf exactly
/// where std::exp overflows) and gradual underflow. NaN in -> NaN out, exp(-inf) = 0.
template <class T, class A>
inline xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    using B = xsimd::batch<T, A>;
    // Clamp first (exp is 0 / inf beyond); AVX-512 max(lo, x) / min(hi, .) return x itself
    // when it is NaN, and scalef carries the NaN.
    if constexpr (sizeof(T) == 4) {
      const B xc = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_max_ps(_mm512_set1_ps(-150.f), x));
      const B k = exp_round(xc * B(1.44269504088896341f));
      B r = fnma_exact(k, B(0.693359375f), xc);
      r = fnma_exact(k, B(-2.12194440e-4f), r);
      B p = B(1.9875691500e-4f);
      p = fma_exact(p, r, B(1.3981999507e-3f));
      p = fma_exact(p, r, B(8.3334519073e-3f));
      p = fma_exact(p, r, B(4.1665795894e-2f));
      p = fma_exact(p, r, B(1.6666665459e-1f));
      p = fma_exact(p, r, B(5.0000001201e-1f));
      return exp_scale(fma_exact(p, r * r, r) + B(1.f), k);
    } else {
      const B xc = _mm512_min_pd(_mm512_set1_pd(710.0), _mm512_max_pd(_mm512_set1_pd(-746.0), x));
      const B k = exp_round(xc * B(1.4426950408889634074));
      // ln2 = hi + lo with hi's 21 trailing zero bits: k * hi is exact for |k| < 2^21.
      B r = fnma_exact(k, B(ln2_hi<double>), xc);
      r = fnma_exact(k, B(ln2_lo<double>), r);
      constexpr auto& c = exp_taylor<double>;  // 1/2! .. 1/14!; use up to 1/13!
      B p = B(c[11]);
      for (std::size_t i = 11; i-- > 0;) p = fma_exact(p, r, B(c[i]));
      return exp_scale(fma_exact(p, r * r, r) + B(1.0), k);
    }
  } else
#endif
  {
    return exp_hilo(x).hi;
  }
}

/// log1p(e.hi + e.lo) for 0 <= e <= 1: log1p(e.hi) + e.lo / (1 + e.hi) (the second-order
/// term is below 2^-40 ULP), with 1 / (1 + e) replaced by 1 - 0.9 e + 0.4 e^2, within 4% on
/// [0, 1]: e.lo is at most half an ULP of e, so that costs < 0.02 ULP and saves a division.
template <class T, class A>
inline xsimd::batch<T, A> log1p_hilo(const HiLo<xsimd::batch<T, A>>& e) noexcept {
  using B = xsimd::batch<T, A>;
  const B inv = xsimd::fma(e.hi, xsimd::fma(e.hi, B(T(0.4)), B(T(-0.9))), B(T(1)));
  return xsimd::fma(e.lo, inv, xsimd::log1p(e.hi));
}

/// log(x) for a batch. xsimd 8.1's double log reads the exponent of a subnormal input before
/// rescaling it, so it is off by a multiple of log(2) there; rescale such lanes by 2^54 first
/// and take 54 log(2) back off in two exact-then-rounded steps. float's log is unaffected.
template <class T, class A>
inline xsimd::batch<T, A> log(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  if constexpr (sizeof(T) == 8) {
    const auto sub = (x < B(T(2.2250738585072014e-308))) && (x > B(T(0)));
    if (xsimd::any(sub)) {
      const B r = xsimd::log(xsimd::select(sub, x * B(T(18014398509481984.0)), x));  // 2^54
      // 54 * ln2_hi has 38 significant bits and r is in [-708, -671], so r - 54 ln2_hi is exact.
      return xsimd::select(sub, (r - B(T(54) * ln2_hi<T>)) - B(T(54) * ln2_lo<T>), r);
    }
  }
  return xsimd::log(x);
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
