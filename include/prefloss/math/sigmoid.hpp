/// @file math/sigmoid.hpp
/// The logistic function 1 / (1 + exp(-x)), for scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/exp_log.hpp"
#include "../detail/simd.hpp"

namespace prefloss {

namespace detail {
/// num / (1 + e) for 0 <= e <= 1, carrying the rounding error of 1 + e (exact by Fast2Sum), so
/// exp's error and the last roundings are all that is left (measured <= 1.7 ULP in double,
/// where the plain quotient reaches 2.1).
inline double div_one_plus(double num, double e) noexcept {
  const double d = 1.0 + e;
  const double dl = (1.0 - d) + e;
  const double q = num / d;
  return q - q * (dl / d);
}
/// Lane-wise (num_hi + num_lo) / (1 + e.hi + e.lo) for 0 <= e <= 1, with the rounding error
/// of 1 + e.hi (Fast2Sum) and exp's low part in one correction. With a fused multiply-add the
/// quotient comes from one reciprocal and its residual num - q d, exact, goes into the same
/// correction (the result is then within about half an ULP plus exp's share); without one, a
/// plain division and the correction.
template <class T, class A>
inline xsimd::batch<T, A> div_one_plus(const xsimd::batch<T, A>& num_hi, const xsimd::batch<T, A>& num_lo,
                                       const HiLo<xsimd::batch<T, A>>& e) noexcept {
  using B = xsimd::batch<T, A>;
  const B d = B(T(1)) + e.hi;
  const B dl = ((B(T(1)) - d) + e.hi) + e.lo;
  if constexpr (has_fma<A>) {
    const B inv = B(T(1)) / d;
    const B q = num_hi * inv;
    const B res = fnma_exact(q, d, num_hi);
    return q + (res + xsimd::fnma(q, dl, num_lo)) * inv;
  } else {
    const B q = num_hi / d;
    return q + xsimd::fnma(q, dl, num_lo) / d;
  }
}
}  // namespace detail

/// @brief sigmoid(x) = 1 / (1 + exp(-x)), from exp(-|x|) so neither side overflows.
///
/// Tends to exp(x) as x -> -inf (nonzero until it underflows) and to 1 as x -> +inf.
/// NaN gives NaN. The float overload evaluates in double and rounds once.
inline double sigmoid(double x) noexcept {
  const double e = std::exp(-std::fabs(x));
  return detail::div_one_plus(x >= 0 ? 1.0 : e, e);
}
/// @copydoc sigmoid(double)
inline float sigmoid(float x) noexcept { return static_cast<float>(sigmoid(static_cast<double>(x))); }

/// @brief sigmoid(x) lane-wise.
template <class T, class A>
inline xsimd::batch<T, A> sigmoid(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const auto e = detail::exp_hilo(-xsimd::abs(x));
  const auto pos = x >= B(T(0));
  return detail::div_one_plus(xsimd::select(pos, B(T(1)), e.hi), xsimd::select(pos, B(T(0)), e.lo), e);
}

/// @brief y[i] = sigmoid(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void sigmoid(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return sigmoid(b); });
}

/// @brief sigmoid(x) and its derivative sigmoid(x) * sigmoid(-x), sharing one exp.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline ValueGrad<T> sigmoid_and_grad(T x) noexcept {
  const double xd = x;
  const double e = std::exp(-std::fabs(xd));
  const double big = detail::div_one_plus(1.0, e), small = detail::div_one_plus(e, e);  // sig(|x|), sig(-|x|)
  return {static_cast<T>(xd >= 0 ? big : small), static_cast<T>(big * small)};
}

}  // namespace prefloss
