/// @file detail/masked_kernels.hpp
/// Row kernels behind masked_sum / masked_mean: one streaming pass that selects (never
/// multiplies by) the mask, so masked-out inf/NaN cannot leak, and float rows are summed with
/// Kahan compensation per lane (error ~2 eps * sum|x|, independent of the row length).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../errors.hpp"
#include "checks.hpp"
#include "row_loop.hpp"
#include "simd.hpp"
#include "tensor.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// sum of selected w*x and of selected w over one row, in double.
struct RowSums {
  double value;
  double weight;
};

template <class S, class M>
inline constexpr bool simd_mask_v = sizeof(M) == 1 || std::is_same_v<S, M>;

/// Selected lanes and their weights for a batch of tokens starting at m.
template <class S, class M>
struct MaskLanes {
  batch_bool<S> sel;
  batch<S> weight;
};

template <class S, class M>
inline MaskLanes<S, M> load_mask(const M* m) noexcept {
  if constexpr (sizeof(M) == 1) {
    return {load_byte_mask<S, arch>(m), batch<S>(S(1))};
  } else {
    const batch<S> w = load_u<S, arch>(m);
    // !(w == 0), not w != 0: xsimd 8.1's AVX-512 != is an ordered compare, false for NaN,
    // while SSE/AVX and the scalar tail count a NaN weight as selected.
    return {!(w == batch<S>(S(0))), w};
  }
}

template <class S, class M>
inline bool selected(M m) noexcept {
  return m != M(0);
}

template <class S, class M>
inline double weight_of(M m) noexcept {
  if constexpr (sizeof(M) == 1) {
    return 1.0;
  } else {
    return static_cast<double>(m);
  }
}

/// Kahan accumulator over SIMD lanes (float) or a plain lane sum (double, whose rounding is
/// already far below the float-input bound).
template <class S>
struct LaneSum {
  batch<S> s = batch<S>(S(0)), c = batch<S>(S(0));
  void add(const batch<S>& v) noexcept {
    if constexpr (std::is_same_v<S, float>) {
      const batch<S> y = v - c;
      const batch<S> t = s + y;
      c = (t - s) - y;
      s = t;
    } else {
      s += v;
    }
  }
};

/// Sum of two LaneSums' lanes (s - c per lane) in double. Lane-wise conversion and a pairwise
/// tree, which both vectorize, instead of one serial chain of dependent double adds through every
/// lane of each accumulator: this runs once per row (twice for a mean), and the serial form cost
/// ~35 ns a row on AVX-512, as much as summing ~300 cache-resident tokens (rows of 64-256 tokens
/// ran 2.2-2.8x slower with it).
template <class S>
inline double total(const LaneSum<S>& x, const LaneSum<S>& y) noexcept {
  constexpr std::size_t L = lanes<S>;
  alignas(64) S xs[L], xc[L], ys[L], yc[L];
  x.s.store_aligned(xs);
  x.c.store_aligned(xc);
  y.s.store_aligned(ys);
  y.c.store_aligned(yc);
  double d[L];
  for (std::size_t k = 0; k < L; ++k)
    d[k] = (static_cast<double>(xs[k]) - static_cast<double>(xc[k])) +
           (static_cast<double>(ys[k]) - static_cast<double>(yc[k]));
  for (std::size_t h = L / 2; h > 0; h /= 2)
    for (std::size_t k = 0; k < h; ++k) d[k] += d[k + h];
  return d[0];
}

/// NeedValue = false skips x entirely (it may be null): the weight-only pass of a mean's adjoint.
/// Number of nonzero bytes in m[0, n): a byte mask's row weight, exact, a block of
/// nonzero_block<arch> bytes a step (64 on AVX-512BW, 32 on AVX2).
template <class M>
inline Index count_selected(const M* m, Index n) noexcept {
  static_assert(sizeof(M) == 1, "byte masks only");
  Index t = 0, count = 0;
  if constexpr (nonzero_block<arch> != 0) {
    constexpr auto block = static_cast<Index>(nonzero_block<arch>);
    for (; t + block <= n; t += block) count += static_cast<Index>(count_nonzero_block<arch>(m + t));
  }
  for (; t < n; ++t) count += m[t] != 0;
  return count;
}

template <bool NeedValue, bool NeedWeight, class S, class M>
inline RowSums row_sums(const S* x, const M* m, Index n) noexcept {
  // A byte mask's weight alone is a count: exact in integers, no compensated float lanes.
  if constexpr (!NeedValue && NeedWeight && sizeof(M) == 1) return {0.0, static_cast<double>(count_selected(m, n))};
  Index t = 0;
  double value = 0, weight = 0;
  if constexpr (simd_mask_v<S, M>) {
    constexpr Index w = static_cast<Index>(lanes<S>);
    LaneSum<S> v0, v1, w0, w1;  // two chains hide the add latency
    const batch<S> zero(S(0));
    for (; t + 2 * w <= n; t += 2 * w) {
      const auto ma = load_mask<S>(m + t);
      const auto mb = load_mask<S>(m + t + w);
      if constexpr (NeedValue && sizeof(M) == 1) {
        v0.add(xsimd::select(ma.sel, load_u<S, arch>(x + t), zero));
        v1.add(xsimd::select(mb.sel, load_u<S, arch>(x + t + w), zero));
      } else if constexpr (NeedValue) {
        v0.add(xsimd::select(ma.sel, ma.weight * load_u<S, arch>(x + t), zero));
        v1.add(xsimd::select(mb.sel, mb.weight * load_u<S, arch>(x + t + w), zero));
      }
      if constexpr (NeedWeight) {
        w0.add(xsimd::select(ma.sel, ma.weight, zero));
        w1.add(xsimd::select(mb.sel, mb.weight, zero));
      }
    }
    if constexpr (NeedValue) value = total(v0, v1);
    if constexpr (NeedWeight) weight = total(w0, w1);
    // A selected +-inf turns Kahan's correction into inf - inf; redo such a row plainly so
    // it sums to +-inf (or NaN) exactly as the scalar definition does.
    if (value != value || weight != weight) {
      t = 0;
      value = weight = 0;
    }
  }
  for (; t < n; ++t) {
    if (selected<S>(m[t])) {
      const double wt = weight_of<S>(m[t]);
      if constexpr (NeedValue) value += wt * static_cast<double>(x[t]);
      weight += wt;
    }
  }
  return {value, weight};
}

/// Largest weight a float mask may hold with S tokens: finite in both types.
template <class S, class M>
inline constexpr M max_weight = static_cast<M>(sizeof(S) < sizeof(M) ? std::numeric_limits<S>::max()
                                                                     : std::numeric_limits<M>::max());

/// Index of the first entry of m[0, n) that is not a weight in [0, max_weight<S, M>] (NaN,
/// negative, infinite, or infinite once converted to S), n if there is none. One branch-free
/// pass in batches; the scan for the position runs only when something is wrong.
template <class S, class M>
inline Index first_bad_weight(const M* m, Index n) noexcept {
  static_assert(is_real_v<M>, "byte masks hold no weights");
  const auto ok = [](M w) { return w >= M(0) && w <= max_weight<S, M>; };
  constexpr Index w = static_cast<Index>(lanes<M>);
  batch_bool<M> all_ok(true);
  const batch<M> zero(M(0)), hi(max_weight<S, M>);
  Index t = 0;
  for (; t + w <= n; t += w) {
    const batch<M> v = load_u<M, arch>(m + t);
    all_ok = all_ok & (v >= zero) & (v <= hi);
  }
  bool good = xsimd::all(all_ok);
  for (Index k = t; k < n; ++k) good = good && ok(m[k]);
  if (good) return n;
  for (Index k = 0; k < n; ++k)
    if (!ok(m[k])) return k;
  return n;
}

/// @brief Throws value_error unless every entry of a float/double mask is a finite weight >= 0
/// (in the mask's type and converted to the token type S); bool/uint8 masks need no check.
/// -0 counts as 0 (not selected).
template <class S, class M>
void require_weights(const Matrix<M>& m, const char* fn, const char* name) {
  if constexpr (is_real_v<M>) {
    const Index n = m.count();
    const Index k = first_bad_weight<S>(m.data, n);
    if (k != n)
      throw value_error(std::string(fn) + ": argument '" + name + "' must hold finite weights >= 0, got " +
                        fmt(static_cast<double>(m.data[k])) + " at " + position_str(m.layout(), k));
  }
}

/// out[t] = selected ? scale * w(t) : 0 for one row; Stream: the batch-aligned body with
/// streaming stores (the caller fences).
template <bool Stream, class S, class M>
inline void row_fill(const M* m, Index n, S scale, S* out) noexcept {
  if constexpr (simd_mask_v<S, M>) {
    constexpr Index w = static_cast<Index>(lanes<S>);
    const batch<S> zero(S(0)), g(scale);
    const auto fill = [&](const M* mp, S* op, auto stream) {
      const auto ml = load_mask<S>(mp);
      if constexpr (sizeof(M) == 1) {
        store_to<decltype(stream)::value>(op, xsimd::select(ml.sel, g, zero));
      } else {
        store_to<decltype(stream)::value>(op, xsimd::select(ml.sel, g * ml.weight, zero));
      }
    };
    // Partial batches (the streaming head, the tail) through the same batch code: the same bits.
    const auto partial = [&](Index t, Index r) {
      padded_batches<0>(static_cast<const S* const*>(nullptr), m, out, static_cast<std::size_t>(t),
                        static_cast<std::size_t>(r),
                        [&](const S* const*, const M* mp, S* op) { fill(mp, op, std::false_type{}); });
    };
    Index t = 0;
    if constexpr (Stream) {
      t = static_cast<Index>(stream_head(out, static_cast<std::size_t>(n)));
      if (t > 0) partial(0, t);
    }
    for (; t + w <= n; t += w) fill(m + t, out + t, std::bool_constant<Stream>{});
    if (t < n) partial(t, n - t);
  } else {
    for (Index t = 0; t < n; ++t) out[t] = selected<S>(m[t]) ? static_cast<S>(scale * weight_of<S>(m[t])) : S(0);
  }
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
