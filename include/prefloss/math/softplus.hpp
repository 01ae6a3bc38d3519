/// @file math/softplus.hpp
/// softplus(x) = log(1 + exp(x)) = -log_sigmoid(-x), for scalars, xsimd batches and arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/simd.hpp"
#include "../detail/softplus_kernel.hpp"

namespace prefloss {

/// @brief softplus(x) = max(x, 0) + log1p(exp(-|x|)).
///
/// Tends to exp(x) as x -> -inf (nonzero until it underflows) and to x as x -> +inf. NaN gives
/// NaN. The float overload evaluates in double and rounds once.
inline double softplus(double x) noexcept { return std::fmax(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
/// @copydoc softplus(double)
inline float softplus(float x) noexcept { return static_cast<float>(softplus(static_cast<double>(x))); }

/// @brief softplus(x) lane-wise, as 0 - log_sigmoid(0 - x) (exact), <= 2 ULP.
template <class T, class A>
inline xsimd::batch<T, A> softplus(const xsimd::batch<T, A>& x) noexcept {
  // Subtractions from +0, not negations: where log_sigmoid is +0 (x -> -inf) softplus is +0
  // on every instruction set (xsimd 8.1 negates by xor on SSE/AVX but as 0 - x on AVX-512).
  using B = xsimd::batch<T, A>;
  return B(T(0)) - detail::log_sigmoid_batch(B(T(0)) - x);
}

/// @brief y[i] = softplus(x[i]) for i < n; any alignment, any n, x == y allowed.
template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
inline void softplus(const T* x, T* y, std::size_t n) noexcept {
  detail::apply_unary(x, y, n, [](const auto& b) { return softplus(b); });
}

}  // namespace prefloss
