/// @file detail/row_loop.hpp
/// What every row kernel shares (masked reductions, token losses, the array math): the
/// padded-batch loop that takes a row's partial batches (its tail, and a head peeled off to
/// align streaming stores) through the same batch code as the body.
#pragma once

#include <cstddef>
#include <cstring>

#include "../config.hpp"
#include "simd.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// @brief Elements [t, t + r) of a row through the batch code, one batch of lanes<T> at a time
/// on zero-padded copies, so a partial batch gives the same per-element results as a full one.
///
/// src holds NI input rows (null entries, and src itself when NI is 0, are read as zeros), m a
/// mask row or null (padding is zero: not selected). body(xp, mp, op) sees the copies (xp: NI
/// pointers to lanes<T> values, mp: lanes<T> mask entries) and writes a full batch to op; the
/// first min(r, lanes<T>) entries of op go to out + t unless out is null.
template <std::size_t NI, class T, class M, class Body>
inline void padded_batches(const T* const* src, const M* m, T* out, std::size_t t, std::size_t r,
                           Body&& body) noexcept {
  constexpr std::size_t W = lanes<T>;
  constexpr std::size_t NB = NI > 0 ? NI : 1;
  while (r > 0) {
    const std::size_t len = r < W ? r : W;
    alignas(64) T xb[NB][W] = {};
    alignas(64) M mb[W] = {};
    alignas(64) T ob[W] = {};
    const T* xp[NB];
    for (std::size_t j = 0; j < NB; ++j) {
      if (j < NI && src[j]) std::memcpy(xb[j], src[j] + t, len * sizeof(T));
      xp[j] = xb[j];
    }
    if (m) std::memcpy(static_cast<void*>(mb), m + t, len * sizeof(M));
    body(static_cast<const T* const*>(xp), static_cast<const M*>(mb), static_cast<T*>(ob));
    if (out) std::memcpy(out + t, ob, len * sizeof(T));
    t += len;
    r -= len;
  }
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
