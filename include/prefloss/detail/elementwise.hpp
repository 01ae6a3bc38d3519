/// @file detail/elementwise.hpp
/// Drives a batch function over an array of any length and alignment. Partial batches (the
/// tail, and the head peeled off to align streaming stores) go through the same batch code on a
/// padded copy, so y[i] never depends on where i falls.
#pragma once

#include <cstddef>
#include <type_traits>

#include "../math/value_grad.hpp"
#include "row_loop.hpp"
#include "simd.hpp"

namespace prefloss::detail {

/// y[0, n) = f(x[0, n)) through padded batches (row_loop.hpp).
template <class T, class F>
inline void apply_partial(const T* x, T* y, std::size_t n, F& f) noexcept {
  const T* src[1] = {x};
  padded_batches<1>(src, static_cast<const unsigned char*>(nullptr), y, 0, n,
                    [&f](const T* const* xp, const unsigned char*, T* op) { store_u(op, f(load_u<T, arch>(xp[0]))); });
}

template <class T, class F>
inline void apply_unary(const T* x, T* y, std::size_t n, F&& f) noexcept {
  constexpr std::size_t w = lanes<T>;
  // Past the caches the hardware prefetcher alone leaves the kernel waiting on DRAM; a software
  // prefetch a few KiB ahead (one cache line per batch) keeps time per element flat.
  constexpr std::size_t ahead = 4096 / sizeof(T);
  const auto run = [&](std::size_t i, auto stream) {
    constexpr bool Stream = decltype(stream)::value;
    if (n >= 2 * ahead) {
      for (; i + ahead + w <= n; i += w) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(x + i + ahead, 0, 3);
#endif
        store_to<Stream>(y + i, f(load_u<T, arch>(x + i)));
      }
    }
    for (; i + w <= n; i += w) store_to<Stream>(y + i, f(load_u<T, arch>(x + i)));
    if constexpr (Stream) stream_fence();
    if (i < n) apply_partial(x + i, y + i, n - i, f);
  };
  // Streaming stores need y batch-aligned: the head before that goes first.
  const std::size_t head = stream_head(y, n);
  if (n >= 2 * ahead && head < w && use_stream_store<T>(n)) {
    apply_partial(x, y, head, f);
    run(head, std::true_type{});
  } else {
    run(0, std::false_type{});
  }
}

}  // namespace prefloss::detail
