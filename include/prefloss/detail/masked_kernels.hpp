/// @file detail/masked_kernels.hpp
/// Row kernels behind masked_sum / masked_mean: one streaming pass that selects (never
/// multiplies by) the mask, so masked-out inf/NaN cannot leak, with float rows summed in LaneSum
/// (row_loop.hpp: float lanes widened into double every chunk_batches adds, error <= 4.2e-7 of
/// sum |x| whatever the row length) and partial batches through the same batch code.
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

/// How batches of S values are loaded from tokens stored as X: X = S loads them as they are;
/// 16-bit storage types specialize it (detail/lowp.hpp) to convert as they load.
template <class X, class S>
struct TokenLoad;
template <class S>
struct TokenLoad<S, S> {
  static batch<S> load(const S* p) noexcept { return load_u<S, arch>(p); }
};

/// Sums of selected w * x and of selected w over one row, x stored as X and summed as S (X = S,
/// or a 16-bit X summed as float with TokenLoad<X, float>: the same bits as the row held as
/// float). NeedValue = false skips x entirely (it may be null): the weight-only pass of a mean's
/// adjoint.
template <bool NeedValue, bool NeedWeight, class S, class M, class X>
inline RowSums row_sums_as(const X* x, const M* m, Index n) noexcept {
  // A byte mask's weight alone is a count: exact in integers, no float lanes.
  if constexpr (!NeedValue && NeedWeight && sizeof(M) == 1) return {0.0, static_cast<double>(count_selected(m, n))};
  Index t = 0;
  double value = 0, weight = 0;
  if constexpr (simd_mask_v<S, M>) {
    constexpr Index w = static_cast<Index>(lanes<S>);
    LaneSum<S> v0, v1, w0, w1;  // two chains hide the add latency
    const batch<S> zero(S(0));
    const auto add = [&](LaneSum<S>& v, LaneSum<S>& wt, const X* xp, const M* mp) {
      const auto ml = load_mask<S>(mp);
      if constexpr (NeedValue && sizeof(M) == 1) {
        v.add(xsimd::select(ml.sel, TokenLoad<X, S>::load(xp), zero));
      } else if constexpr (NeedValue) {
        v.add(xsimd::select(ml.sel, ml.weight * TokenLoad<X, S>::load(xp), zero));
      }
      if constexpr (NeedWeight) wt.add(xsimd::select(ml.sel, ml.weight, zero));
    };
    const auto flush = [&] {
      v0.flush();
      v1.flush();
      w0.flush();
      w1.flush();
    };
    int c = 0;
    for (; t + 2 * w <= n; t += 2 * w) {
      add(v0, w0, NeedValue ? x + t : nullptr, m + t);
      add(v1, w1, NeedValue ? x + t + w : nullptr, m + t + w);
      if (++c == chunk_batches) {
        flush();
        c = 0;
      }
    }
    flush();
    if (t < n) {
      const X* src[1] = {NeedValue ? x : nullptr};
      const auto tail = [&](const X* const* xp, const M* mp, X*) { add(v0, w0, xp[0], mp); };
      padded_batches<1, X, M, decltype((tail)), lanes<S>>(src, m, static_cast<X*>(nullptr), static_cast<std::size_t>(t),
                                                          static_cast<std::size_t>(n - t), tail);
    }
    if constexpr (NeedValue) value = total(v0, v1);
    if constexpr (NeedWeight) weight = total(w0, w1);
    // A float lane can overflow where the double sum does not, and the lanes order a selected
    // +-inf / NaN differently from the scalar definition: redo a non-finite row in double, in
    // token order, so it gives exactly the definition's result.
    constexpr double big = std::numeric_limits<double>::max();
    if (std::fabs(value) <= big && std::fabs(weight) <= big) return {value, weight};
    value = weight = 0;
    t = 0;
  }
  for (; t < n; ++t) {
    if (selected<S>(m[t])) {
      const double wt = weight_of<S>(m[t]);
      if constexpr (NeedValue) value += wt * static_cast<double>(static_cast<S>(x[t]));
      weight += wt;
    }
  }
  return {value, weight};
}

template <bool NeedValue, bool NeedWeight, class S, class M>
inline RowSums row_sums(const S* x, const M* m, Index n) noexcept {
  return row_sums_as<NeedValue, NeedWeight, S>(x, m, n);
}

/// Sum of the mask weights of one row: W_i of every normaliser, of the token_weight metric and
/// of token_counts / row_weights.
template <class S, class M>
inline double row_weight(const M* m, Index n) noexcept {
  return row_sums<false, true, S>(static_cast<const S*>(nullptr), m, n).weight;
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
