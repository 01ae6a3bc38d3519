/// @file detail/elementwise.hpp
/// Drives a batch function over an array of any length and alignment. The tail goes through
/// the same batch code on a padded copy, so y[i] never depends on where i falls.
#pragma once

#include <cstddef>

#include "simd.hpp"

namespace prefloss::detail {

template <class T, class F>
inline void apply_unary(const T* x, T* y, std::size_t n, F&& f) noexcept {
  constexpr std::size_t w = lanes<T>;
  std::size_t i = 0;
  // Past the caches the hardware prefetcher alone leaves the kernel waiting on DRAM; a software
  // prefetch a few KiB ahead (one cache line per batch) keeps time per element flat.
  constexpr std::size_t ahead = 4096 / sizeof(T);
  if (n >= 2 * ahead) {
    for (; i + ahead + w <= n; i += w) {
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(x + i + ahead, 0, 3);
#endif
      store_u(y + i, f(load_u<T, arch>(x + i)));
    }
  }
  for (; i + w <= n; i += w) store_u(y + i, f(load_u<T, arch>(x + i)));
  if (i < n) {
    alignas(64) T buf[w] = {};
    for (std::size_t k = 0; i + k < n; ++k) buf[k] = x[i + k];
    store_u(buf, f(load_u<T, arch>(buf)));
    for (std::size_t k = 0; i + k < n; ++k) y[i + k] = buf[k];
  }
}

/// A value and its derivative, as the fused math forms return them.
template <class T>
struct ValueGrad {
  T value;
  T grad;
};

}  // namespace prefloss::detail
