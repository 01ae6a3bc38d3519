/// @file math/log1mexp.hpp
/// log(1 - exp(x)) for x <= 0 (Maechler's two-branch form), scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
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

/// @brief log1mexp(x) lane-wise.
template <class T, class A>
inline xsimd::batch<T, A> log1mexp(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const auto near0 = x > B(T(detail::minus_ln2));
  // Each branch is fed only inputs from its own domain so neither raises spurious NaN/inf work.
  const B a = xsimd::log(-xsimd::expm1(xsimd::select(near0, x, B(T(-1)))));
  const B b = xsimd::log1p(-detail::exp(xsimd::select(near0, B(T(-1)), x)));
  return xsimd::select(near0, a, b);
}

/// @brief y[i] = log1mexp(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void log1mexp(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return log1mexp(b); });
}

/// @brief log1mexp(x) and its derivative -exp(x) / (1 - exp(x)) = -1 / expm1(-x).
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline detail::ValueGrad<T> log1mexp_and_grad(T x) noexcept {
  const double xd = x;
  return {static_cast<T>(log1mexp(xd)), static_cast<T>(-1.0 / std::expm1(-xd))};
}

}  // namespace prefloss
