/// @file math/log_sigmoid.hpp
/// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), for scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/exp_log.hpp"
#include "../detail/simd.hpp"
#include "../detail/softplus_kernel.hpp"

namespace prefloss {

/// @brief log(sigmoid(x)), stable over the whole range.
///
/// Tends to x as x -> -inf and to -exp(-x) as x -> +inf (nonzero until exp(-x) underflows);
/// log_sigmoid(+inf) = 0, log_sigmoid(-inf) = -inf, NaN gives NaN. The float overload evaluates
/// in double and rounds once.
inline double log_sigmoid(double x) noexcept { return std::fmin(x, 0.0) - std::log1p(std::exp(-std::fabs(x))); }
/// @copydoc log_sigmoid(double)
inline float log_sigmoid(float x) noexcept { return static_cast<float>(log_sigmoid(static_cast<double>(x))); }

/// @brief log(sigmoid(x)) lane-wise; same contract as the scalar form, <= 2 ULP
/// (detail::log_sigmoid_batch: a table-driven polynomial for float on AVX-512).
template <class T, class A>
inline xsimd::batch<T, A> log_sigmoid(const xsimd::batch<T, A>& x) noexcept {
  return detail::log_sigmoid_batch(x);
}

/// @brief y[i] = log_sigmoid(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void log_sigmoid(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return log_sigmoid(b); });
}

/// @brief log_sigmoid(x) (bit-identical to the batch form) and its derivative sigmoid(-x).
template <class T, class A>
inline ValueGrad<xsimd::batch<T, A>> log_sigmoid_and_grad(const xsimd::batch<T, A>& x) noexcept {
  using B = xsimd::batch<T, A>;
  const B e = detail::exp(-xsimd::abs(x));
  const B r = B(T(1)) / (B(T(1)) + e);
  return {log_sigmoid(x), xsimd::select(x >= B(T(0)), e * r, r)};
}

/// @brief Scalar log_sigmoid(x) and sigmoid(-x) from one exp.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline ValueGrad<T> log_sigmoid_and_grad(T x) noexcept {
  const double xd = x;
  const double e = std::exp(-std::fabs(xd));
  const double r = 1.0 / (1.0 + e);
  return {static_cast<T>(std::fmin(xd, 0.0) - std::log1p(e)),
          static_cast<T>(xd >= 0 ? e * r : (std::isnan(xd) ? xd : r))};
}

}  // namespace prefloss
