/// @file math/sigmoid.hpp
/// The logistic function 1 / (1 + exp(-x)), for scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/simd.hpp"

namespace prefloss {

/// @brief sigmoid(x) = 1 / (1 + exp(-x)), from exp(-|x|) so neither side overflows.
///
/// Tends to exp(x) as x -> -inf (nonzero until it underflows) and to 1 as x -> +inf.
/// NaN gives NaN. The float overload evaluates in double and rounds once.
inline double sigmoid(double x) noexcept {
  const double e = std::exp(-std::fabs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}
/// @copydoc sigmoid(double)
inline float sigmoid(float x) noexcept { return static_cast<float>(sigmoid(static_cast<double>(x))); }

/// @brief sigmoid(x) lane-wise.
template <class T, class A>
inline xsimd::batch<T, A> sigmoid(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const B e = detail::exp(-xsimd::abs(x));
  const B d = B(T(1)) + e;
  return xsimd::select(x >= B(T(0)), B(T(1)) / d, e / d);
}

/// @brief y[i] = sigmoid(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void sigmoid(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return sigmoid(b); });
}

/// @brief sigmoid(x) and its derivative sigmoid(x) * sigmoid(-x), sharing one exp.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline detail::ValueGrad<T> sigmoid_and_grad(T x) noexcept {
  const double xd = x;
  const double e = std::exp(-std::fabs(xd));
  const double d = 1.0 + e;
  return {static_cast<T>(xd >= 0 ? 1.0 / d : e / d), static_cast<T>(e / (d * d))};
}

}  // namespace prefloss
