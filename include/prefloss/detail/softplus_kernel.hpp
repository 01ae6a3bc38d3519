/// @file detail/softplus_kernel.hpp
/// log_sigmoid(x) = min(x, 0) - f(|x|) with f(a) = log1p(exp(-a)) = softplus(-a), for batches;
/// softplus(x) = 0 - log_sigmoid(0 - x) uses it too.
#pragma once

#include <type_traits>

#include "exp_log.hpp"
#include "simd.hpp"
#include "softplus_table.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// Where the AVX-512 float table ends (|x| is clamped just below it): past it f < 1.5e-7.
template <class T>
inline constexpr T softplus_table_end = T(15.75);

/// log_sigmoid(x) lane-wise: min(x, 0) - f(|x|), NaN in, NaN out; float on AVX-512 within
/// 1.20 ULP of every float input (test_math "[exhaustive]"), otherwise within 1.34 ULP (test_math).
///
/// Float on AVX-512 (has_range_lookup<A>: DQ for vrangeps) evaluates f by the piecewise polynomial of
/// softplus_table.hpp, without exp, log or division: the segment index comes from the low bits of a magic-number
/// rounding, each coefficient from one two-register permute, about 20 instructions for 16 lanes. For |x| >= 15.75 the
/// table's last segment stands in; where x <= -15.75 that is within f's own size (< 1.5e-7, under 0.16 ULP of the x it
/// is added to), and lanes with x >= 15.75, where f is the whole result, take exp and the series f = e - e^2/2 (next
/// term below 2^-48 of f). Other types and instruction sets compute f = log1p(exp(-|x|)) with exp's low part carried
/// (exp_hilo, log1p_hilo).
template <class T, class A>
inline xsimd::batch<T, A> log_sigmoid_batch(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  if constexpr (sizeof(T) == 4 && has_range_lookup<A>) {
    // min(|x|, C) with the sign cleared, one vrangeps. It drops a quiet NaN x for C, so NaN
    // comes back through the final min (below).
    const B a = min_abs(x, 0x1.f7fffep3f);  // just below 15.75
    // Segment k = round(2a): adding 1.5 * 2^23 rounds (to nearest, the mode prefloss assumes
    // throughout) and leaves k in the low mantissa bits, which is all the permutes read.
    const B magic(0x1.8p23f);
    const B y = fma_exact(a, B(2.f), magic);
    const B s = fms_exact(a, B(2.f), y - magic);  // exact, |s| <= 1/2
    const auto coef = [&y](int row) { return lookup32(softplus_table[row], y); };
    B q = coef(6);
    for (int row = 5; row >= 2; --row) q = fma_exact(q, s, coef(row));
    B f = coef(0) + fma_exact(q, s, coef(1));
    const auto far = x >= B(softplus_table_end<T>);
    if (xsimd::any(far)) {
      const auto e = exp_hilo(-x);
      f = xsimd::select(far, e.hi + fma_exact(e.hi * B(T(-0.5)), e.hi, e.lo), f);
    }
    // vminps returns its second operand when either is NaN: x.
    return min_nan_second(B(T(0)), x) - f;
  }
  // fmin-like: a NaN x must stay NaN; log1p(NaN) carries it. exp's low part keeps its rounding
  // error out of the result (it would double where log1p(e) sits just below a power of two and
  // e just above).
  return xsimd::min(x, B(T(0))) - log1p_hilo(exp_hilo(-xsimd::abs(x)));
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
