/// @file detail/exp_log.hpp
/// prefloss's own exp and log kernels for xsimd batches: exp down to the true underflow (also as
/// an unevaluated hi + lo sum), log and log1p with a carried low part, and the ratio exp of the
/// token losses. The instruction-set specific pieces (vscalef, vrndscale) come from simd.hpp.
#pragma once

#include <cstddef>
#include <limits>
#include <type_traits>

#include "../config.hpp"
#include "simd.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

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
  if constexpr (has_scalef<A>) {
    // AVX-512: the same reduction and polynomial, branch-free; vscalefps/pd multiplies by 2^k
    // with one rounding, gradual underflow and overflow included (k is integral and in range).
    const B k = round_even(xc * B(inv_ln2));
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
    const B e = scale_pow2(m, k);
    const B e_lo = xsimd::select(e < B(std::numeric_limits<T>::min()), B(T(0)), scale_pow2(m_lo, k));
    return {xsimd::select(xsimd::isnan(x), x, e), e_lo};
  }
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
PREFLOSS_DETAIL_ALWAYS_INLINE inline xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) noexcept {
  if constexpr (has_scalef<A>) {
    using B = xsimd::batch<T, A>;
    // Clamp first (exp is 0 / inf beyond); AVX-512 max(lo, x) / min(hi, .) return x itself
    // when it is NaN, and scalef carries the NaN.
    if constexpr (sizeof(T) == 4) {
      const B xc = min_nan_second(B(128.f), max_nan_second(B(-150.f), x));
      const B k = round_even(xc * B(1.44269504088896341f));
      B r = fnma_exact(k, B(0.693359375f), xc);
      r = fnma_exact(k, B(-2.12194440e-4f), r);
      B p = B(1.9875691500e-4f);
      p = fma_exact(p, r, B(1.3981999507e-3f));
      p = fma_exact(p, r, B(8.3334519073e-3f));
      p = fma_exact(p, r, B(4.1665795894e-2f));
      p = fma_exact(p, r, B(1.6666665459e-1f));
      p = fma_exact(p, r, B(5.0000001201e-1f));
      return scale_pow2(fma_exact(p, r * r, r) + B(1.f), k);
    } else {
      const B xc = min_nan_second(B(710.0), max_nan_second(B(-746.0), x));
      const B k = round_even(xc * B(1.4426950408889634074));
      // ln2 = hi + lo with hi's 21 trailing zero bits: k * hi is exact for |k| < 2^21.
      B r = fnma_exact(k, B(ln2_hi<double>), xc);
      r = fnma_exact(k, B(ln2_lo<double>), r);
      constexpr auto& c = exp_taylor<double>;  // 1/2! .. 1/14!; use up to 1/13!
      B p = B(c[11]);
      for (std::size_t i = 11; i-- > 0;) p = fma_exact(p, r, B(c[i]));
      return scale_pow2(fma_exact(p, r * r, r) + B(1.0), k);
    }
  } else {
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

/// @brief exp(x) for ratios and KL terms: <= 2 ulp over the whole range, subnormal results
/// exact (no early flush), overflow to +inf exactly where std::exp overflows, exp(-inf) = 0,
/// NaN in -> NaN out.
///
/// The library's one exp, detail::exp (with has_scalef<A> branch-free, scaling by 2^k with one
/// vscalefps/pd, which handles overflow and gradual underflow exactly; <= 0.77 ulp). Elsewhere
/// its xsimd ldexp overflows early (above 88.376f / 709.437 instead of 88.723f / 709.783):
/// those lanes are evaluated as exp(x - 2) e^2 (<= 2 ulp).
template <class T, class A>
inline xsimd::batch<T, A> exp_ratio(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const B r = detail::exp(x);
  if constexpr (has_scalef<A>) {
    return r;
  } else {
    const auto high = x > B(sizeof(T) == 4 ? T(88) : T(709));
    if (xsimd::none(high)) return r;
    return xsimd::select(high, detail::exp(x - B(T(2))) * B(T(7.389056098930650227230427)), r);
  }
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
