/// @file detail/row_loop.hpp
/// The two building blocks every row kernel shares (masked reductions, token losses, the array
/// math): the float accumulator, LaneSum, and the padded-batch loop that takes a row's partial
/// batches (its tail, and a head peeled off to align streaming stores) through the same batch
/// code as the body.
#pragma once

#include <cstddef>
#include <cstring>
#include <type_traits>

#include "../config.hpp"
#include "simd.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// Float lanes of a LaneSum take at most this many adds before they are widened into double. 4
/// halves the error bound but cost ppo_clip ~12% at 256 x 65536 (flushing five accumulators
/// twice as often); 8 keeps the token losses' earlier speed and the bound within the policy.
inline constexpr int chunk_batches = 8;

/// @brief A row sum in SIMD lanes that ends in double.
///
/// Double inputs sum in double lanes. Float inputs sum in float lanes for at most chunk_batches
/// adds (the caller calls flush() that often) and are then widened into double lanes, so each
/// term meets at most chunk_batches - 1 float roundings before it is in double: the error is
/// <= 7 * 2^-24 * sum |x| (4.2e-7) whatever the row length, and the double rounding over a row
/// of n tokens adds about n / lanes * 2^-53. Plain adds, so a selected +-inf or NaN sums as
/// in the scalar definition; a float lane can overflow where a double sum would not, which is
/// why masked reductions redo a non-finite row in double (row_sums) and token losses, whose
/// per-token values are already float, keep the float result.
///
/// Chosen over per-lane Kahan compensation (the earlier masked-reduction accumulator): one add a
/// batch instead of four dependent ones, and no inf - inf in a correction term.
template <class S>
struct LaneSum {
  batch<S> part = batch<S>(S(0));
  alignas(64) double acc[lanes<S>] = {};

  void add(const batch<S>& v) noexcept { part += v; }
  void add_selected(const batch_bool<S>& sel, const batch<S>& v) noexcept { part = detail::add_selected(part, sel, v); }
  /// Moves float lanes into the double lanes (a no-op for double).
  void flush() noexcept {
    if constexpr (std::is_same_v<S, float>) {
      widen_add(acc, part);
      part = batch<S>(S(0));
    }
  }
  /// The lanes as doubles, after a flush.
  void lanes_to(double* d) noexcept {
    if constexpr (std::is_same_v<S, float>) {
      flush();
      for (std::size_t k = 0; k < lanes<S>; ++k) d[k] = acc[k];
    } else {
      part.store_unaligned(d);
    }
  }
};

/// Pairwise tree over L doubles (L a power of two): vectorizes, unlike a serial chain of
/// dependent adds through every lane, which cost ~35 ns a row on AVX-512 (as much as summing
/// ~300 cache-resident tokens).
template <std::size_t L>
inline double tree_sum(double* d) noexcept {
  for (std::size_t h = L / 2; h > 0; h /= 2)
    for (std::size_t k = 0; k < h; ++k) d[k] += d[k + h];
  return d[0];
}

/// Total of one LaneSum.
template <class S>
inline double total(LaneSum<S>& x) noexcept {
  alignas(64) double d[lanes<S>];
  x.lanes_to(d);
  return tree_sum<lanes<S>>(d);
}

/// Total of two LaneSums (two independent add chains over one row), lane by lane first.
template <class S>
inline double total(LaneSum<S>& x, LaneSum<S>& y) noexcept {
  alignas(64) double d[lanes<S>], e[lanes<S>];
  x.lanes_to(d);
  y.lanes_to(e);
  for (std::size_t k = 0; k < lanes<S>; ++k) d[k] += e[k];
  return tree_sum<lanes<S>>(d);
}

/// padded_batches' batch width: Width, or lanes<T> for Width = 0.
template <std::size_t Width, class T>
constexpr std::size_t batch_width() noexcept {
  if constexpr (Width != 0) {
    return Width;
  } else {
    return lanes<T>;
  }
}

/// @brief Elements [t, t + r) of a row through the batch code, one batch of lanes<T> at a time
/// on zero-padded copies, so a partial batch gives the same per-element results as a full one.
///
/// src holds NI input rows (null entries, and src itself when NI is 0, are read as zeros), m a
/// mask row or null (padding is zero: not selected). body(xp, mp, op) sees the copies (xp: NI
/// pointers to lanes<T> values, mp: lanes<T> mask entries) and writes a full batch to op; the
/// first min(r, lanes<T>) entries of op go to out + t unless out is null.
/// Batches of Width elements (0: lanes<T>; a 16-bit storage type has no batch of its own and
/// passes the width of the float batches it is converted into).
template <std::size_t NI, class T, class M, class Body, std::size_t Width = 0>
inline void padded_batches(const T* const* src, const M* m, T* out, std::size_t t, std::size_t r,
                           Body&& body) noexcept {
  constexpr std::size_t W = batch_width<Width, T>();
  constexpr std::size_t NB = NI > 0 ? NI : 1;
  while (r > 0) {
    const std::size_t len = r < W ? r : W;
    // memset, not = {}: a 16-bit storage type's default constructor leaves its bits unset.
    alignas(64) T xb[NB][W];
    alignas(64) M mb[W];
    alignas(64) T ob[W];
    std::memset(static_cast<void*>(xb), 0, sizeof xb);
    std::memset(static_cast<void*>(mb), 0, sizeof mb);
    std::memset(static_cast<void*>(ob), 0, sizeof ob);
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
