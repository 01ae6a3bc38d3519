/// @file math/log1mexp.hpp
/// log(1 - exp(x)) for x <= 0 (Maechler's two-branch form), scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/exp_log.hpp"
#include "../detail/simd.hpp"

namespace prefloss {

namespace detail {
// Above -log(2), 1 - exp(x) cancels: use -expm1(x). Below it, exp(x) <= 1/2 and log1p is exact.
inline constexpr double minus_ln2 = -0.693147180559945309417232121458176568;
}  // namespace detail

/// @brief log(1 - exp(x)) for x <= 0: exact near 0 (log(-x) asymptotics) and as x -> -inf
/// (-exp(x)). log1mexp(0) = -inf, x > 0 gives NaN, NaN gives NaN. The float overload evaluates
/// in double and rounds once.
inline double log1mexp(double x) noexcept {
  return x > detail::minus_ln2 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}
/// @copydoc log1mexp(double)
inline float log1mexp(float x) noexcept { return static_cast<float>(log1mexp(static_cast<double>(x))); }

namespace detail {
/// 1 - exp(x) as hi + lo for -log(2) < x <= 0 (lanes outside give NaN or garbage the caller
/// does not select). x = k log(2) + r with k = 0 or -1, exp(r) - 1 = r_hi + u (u = r_lo +
/// r^2 q(r), the reduction of exp_hilo), then 1 - exp(x) is -(r_hi + u) for k = 0 and
/// 1/2 - r_hi/2 - u/2 for k = -1, summed with the rounding errors carried (Fast2Sum twice).
/// Accurate to a fraction of an ULP where xsimd::expm1 is off by up to 0.81 ULP, which log's
/// condition number (up to 1/log(2)) and a result just below a power of two turn into > 2.
template <class T, class A>
inline HiLo<xsimd::batch<T, A>> one_minus_exp_near0(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const auto half = x < B(T(-0.346573590279972654708616060729088284));  // k = -1
  const B r_hi = x + xsimd::select(half, B(ln2_hi<T>), B(T(0)));        // exact (Sterbenz)
  const B r_lo = xsimd::select(half, B(ln2_lo<T>), B(T(0)));
  const B r = r_hi + r_lo;
  const B u = xsimd::fma(r * r, exp_q(r), r_lo);
  const B a = xsimd::select(half, B(T(0.5)), -r_hi);
  const B b = xsimd::select(half, B(T(-0.5)) * r_hi, -u);    // |b| <= |a|
  const B c = xsimd::select(half, B(T(-0.5)) * u, B(T(0)));  // |c| <= |a + b|
  const B s1 = a + b;
  const B e1 = (a - s1) + b;
  const B y = s1 + c;
  return {y, ((s1 - y) + c) + e1};
}
}  // namespace detail

/// @brief log1mexp(x) lane-wise. Both branches carry exp's rounding error in a low part:
/// log(y + y_lo) = log(y) + y_lo / y near 0, log1p(-e - e_lo) = log1p(-e) - e_lo / (1 - e) below.
template <class T, class A>
inline xsimd::batch<T, A> log1mexp(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const auto near0 = x > B(T(detail::minus_ln2));
  // Each branch is fed only inputs from its own domain so neither raises spurious NaN/inf work.
  const auto y = detail::one_minus_exp_near0(xsimd::select(near0, x, B(T(-0.5))));
  const B lg = detail::log(y.hi);
  const B a = xsimd::select(y.hi == B(T(0)), lg, lg + y.lo / y.hi);  // x = 0: -inf, not -inf + 0/0
  const auto e = detail::exp_hilo(xsimd::select(near0, B(T(-1)), x));
  // 1 / (1 - e) for e <= 1/2 as 1 + e + 2 e^2 (within 3.2%; the term is under half an ULP of e).
  const B b = xsimd::fnma(e.lo, xsimd::fma(e.hi, xsimd::fma(e.hi, B(T(2)), B(T(1))), B(T(1))), xsimd::log1p(-e.hi));
  return xsimd::select(near0, a, b);
}

/// @brief y[i] = log1mexp(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void log1mexp(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return log1mexp(b); });
}

/// @brief log1mexp(x) and its derivative -exp(x) / (1 - exp(x)) = -1 / expm1(-x).
///
/// Below -log(2) the gradient is formed as -exp(x) / (1 - exp(x)) (1 - exp(x) >= 1/2 does not
/// cancel, and expm1(-x) would overflow below -709 while the true value is still a subnormal);
/// above it as -1 / expm1(0 - x), whose 0 - x turns x = -0 into +0 so the gradient at 0 is
/// -inf from either zero. x > 0 (outside the domain) gives NaN for both, as does NaN.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline ValueGrad<T> log1mexp_and_grad(T x) noexcept {
  const double xd = x;
  double g;
  if (xd > 0) {
    g = std::numeric_limits<double>::quiet_NaN();
  } else if (xd > detail::minus_ln2) {
    g = -1.0 / std::expm1(0.0 - xd);
  } else {
    const double e = std::exp(xd);  // NaN stays NaN
    g = -e / (1.0 - e);
  }
  return {static_cast<T>(log1mexp(xd)), static_cast<T>(g)};
}

}  // namespace prefloss
