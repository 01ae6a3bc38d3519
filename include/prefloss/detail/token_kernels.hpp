/// @file detail/token_kernels.hpp
/// The streaming kernels behind token-level losses (ppo_clip, value_loss): one pass over a
/// row's inputs in xsimd batches that evaluates a per-token kernel, selects with the mask (so
/// masked-out inf/NaN never reach a sum or the gradient), accumulates the row's weighted loss,
/// weight and metric sums, and optionally writes the scaled token gradient in the same pass.
///
/// A kernel is a small struct with
///   static constexpr std::size_t n_in;    // token inputs it reads, in order
///   static constexpr std::size_t n_sums;  // weighted metric sums it reports (<= max_sums)
///   static constexpr bool has_max;        // whether it reports a lane value to take the max of
///   template <bool Fwd, bool Bwd> void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const;
/// eval fills o.loss (Fwd), o.grad = d loss / d input 0 (Bwd), o.sums and o.max (Fwd). A kernel
/// may also read its row once before streaming it (the per-row hook: has_row_pass_v below).
///
/// Accumulation: LaneSum (row_loop.hpp), the masked reductions' accumulator: float lanes widened
/// into double every chunk_batches batches (<= 4.2e-7 relative to sum |x| whatever the length).
/// exp_ratio, the ratio exp of the kernels, is in exp_log.hpp.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../parallel.hpp"
#include "../reduce/aggregation.hpp"
#include "eigen.hpp"
#include "exp_log.hpp"
#include "masked_kernels.hpp"
#include "row_loop.hpp"
#include "simd.hpp"
#include "tensor.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

inline constexpr std::size_t max_sums = 6;

/// Selected lanes and weights for lanes<S> mask entries of any mask type.
template <class S, class M>
inline MaskLanes<S, M> load_mask_lanes(const M* m) noexcept {
  if constexpr (simd_mask_v<S, M>) {
    return load_mask<S>(m);
  } else {
    // float weights with double tokens or vice versa: select on the mask's own type.
    alignas(64) bool sel[lanes<S>];
    alignas(64) S w[lanes<S>];
    for (std::size_t k = 0; k < lanes<S>; ++k) {
      sel[k] = m[k] != M(0);
      w[k] = static_cast<S>(m[k]);
    }
    return {batch_bool<S>::load_aligned(sel), batch<S>::load_aligned(w)};
  }
}

/// What a token kernel returns for one batch of tokens.
template <class S, std::size_t NS>
struct TokenOut {
  batch<S> loss, grad, max;
  std::array<batch<S>, NS> sums;
};

/// Software prefetch `bytes` ahead of p (integer arithmetic: the address may lie past the end
/// of the array; prefetches never fault). The hardware prefetcher alone keeps up with one or two
/// streams, not with the four or five inputs plus the gradient of a token loss.
inline constexpr std::uintptr_t prefetch_distance = 2048;
inline void prefetch_read(const void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + prefetch_distance), 0);
#else
  (void)p;
#endif
}
inline void prefetch_write(void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) + prefetch_distance), 1);
#else
  (void)p;
#endif
}

/// Sums of one row (or of a whole call).
struct TokenStats {
  double loss = 0;    ///< sum of w * l over selected tokens
  double weight = 0;  ///< sum of w over selected tokens
  double sums[max_sums] = {};
  double max = -std::numeric_limits<double>::infinity();

  void merge(const TokenStats& o) noexcept {
    loss += o.loss;
    weight += o.weight;
    for (std::size_t k = 0; k < max_sums; ++k) sums[k] += o.sums[k];
    if (o.max > max) max = o.max;
  }
};

/// @brief One pass over a row of n tokens. Fwd: returns the row's TokenStats (all but the
/// weight, which the caller takes from the mask alone: row_weight). Bwd: writes
/// grad[t] = gscale * w[t] * d l / d input0 at selected tokens and 0 elsewhere (every t);
/// Stream: the batch-aligned body of grad with streaming stores (the caller fences). The sums
/// are the same bits whatever Bwd and Stream are.
template <bool Fwd, bool Bwd, bool Stream = false, class Kernel, class S, class M>
inline TokenStats token_row(const Kernel& kernel, const S* const* in, const M* m, Index n, S gscale, S* grad) noexcept {
  // The row's sums must not depend on where grad happens to start: a streaming head would shift
  // every batch (and the float chunk boundaries) by up to a batch, changing the rounding of the
  // loss against the forward-only pass. A fused row that is not batch-aligned is written with
  // ordinary stores instead; a backward-only row has no sums and streams after its head.
  if constexpr (Fwd && Bwd && Stream) {
    if (stream_head(grad, static_cast<std::size_t>(n)) != 0)
      return token_row<Fwd, Bwd, false>(kernel, in, m, n, gscale, grad);
  }
  constexpr std::size_t NI = Kernel::n_in, NS = Kernel::n_sums;
  static_assert(NS <= max_sums, "token kernel reports too many sums");
  constexpr Index W = static_cast<Index>(lanes<S>);
  using B = batch<S>;
  // A local copy: the kernel's constants cannot alias the gradient stores, so they stay in
  // registers across the loop.
  const Kernel k = kernel;
  const S* src[NI > 0 ? NI : 1];
  for (std::size_t j = 0; j < NI; ++j) src[j] = in[j];
  const B zero(S(0)), gs(gscale);
  const B ninf(-std::numeric_limits<S>::infinity());
  LaneSum<S> loss;
  std::array<LaneSum<S>, NS> sums;
  B mx = ninf;

  const auto step = [&](const S* const* x_ptr, Index off, const M* mp, S* gp,
                        auto stream) PREFLOSS_DETAIL_ALWAYS_INLINE {
    std::array<B, NI> x;
    for (std::size_t j = 0; j < NI; ++j) x[j] = load_u<S, arch>(x_ptr[j] + off);
    const auto ml = load_mask_lanes<S>(mp);
    TokenOut<S, NS> o;
    k.template eval<Fwd, Bwd>(x.data(), o);
    if constexpr (Fwd) {
      if constexpr (sizeof(M) == 1) {
        loss.add_selected(ml.sel, o.loss);
        for (std::size_t j = 0; j < NS; ++j) sums[j].add_selected(ml.sel, o.sums[j]);
      } else {
        loss.add_selected(ml.sel, ml.weight * o.loss);
        for (std::size_t j = 0; j < NS; ++j) sums[j].add_selected(ml.sel, ml.weight * o.sums[j]);
      }
      if constexpr (Kernel::has_max) mx = xsimd::max(mx, xsimd::select(ml.sel, o.max, ninf));
    }
    if constexpr (Bwd) {
      if constexpr (sizeof(M) == 1) {
        store_to<decltype(stream)::value>(gp, xsimd::select(ml.sel, gs * o.grad, zero));
      } else {
        store_to<decltype(stream)::value>(gp, xsimd::select(ml.sel, gs * (ml.weight * o.grad), zero));
      }
    }
  };
  const auto flush = [&] {
    loss.flush();
    for (auto& s : sums) s.flush();
  };

  // r tokens from t through the same kernel on zero-padded copies (padding is masked out): the
  // tail, and with Stream the head before grad's first aligned batch.
  const auto partial = [&](Index t, Index r) {
    padded_batches<NI>(src, m, Bwd ? grad : nullptr, static_cast<std::size_t>(t), static_cast<std::size_t>(r),
                       [&](const S* const* xp, const M* mp, S* gp) { step(xp, 0, mp, gp, std::false_type{}); });
  };

  Index t = 0;
  if constexpr (Bwd && Stream) {
    t = static_cast<Index>(stream_head(grad, static_cast<std::size_t>(n)));
    if (t > 0) partial(0, t);
  }
  int c = 0;
  // One prefetch per 64 bytes of each stream, counted from where the loop starts (after a
  // streaming head t is not a multiple of the batch).
  const auto t0 = static_cast<std::size_t>(t);
  for (; t + W <= n; t += W) {
    const std::size_t done = static_cast<std::size_t>(t) - t0;
    if ((done * sizeof(S)) % 64 == 0) {
      for (std::size_t j = 0; j < NI; ++j) prefetch_read(src[j] + t);
      if constexpr (Bwd && !Stream) prefetch_write(grad + t);
    }
    if ((done * sizeof(M)) % 64 == 0) prefetch_read(m + t);
    step(src, t, m + t, Bwd ? grad + t : nullptr, std::bool_constant<Stream>{});
    if (++c == chunk_batches) {
      flush();
      c = 0;
    }
  }
  // No flush before the tail: after the loop a chunk holds at most chunk_batches - 1 batches, so
  // the one partial batch keeps the bound, and a row gets the same chunks as the same tokens at
  // the start of a longer row (packed and padded layouts sum to the same bits).
  if (t < n) partial(t, n - t);

  TokenStats st;
  if constexpr (Fwd) {
    st.loss = total(loss);
    for (std::size_t j = 0; j < NS; ++j) st.sums[j] = total(sums[j]);
    if constexpr (Kernel::has_max) {
      alignas(64) S a[lanes<S>];
      mx.store_aligned(a);
      for (std::size_t j = 0; j < lanes<S>; ++j)
        if (static_cast<double>(a[j]) > st.max) st.max = static_cast<double>(a[j]);
    }
  }
  return st;
}

/// @brief The per-row hook. A kernel whose token values depend on statistics of its whole row
/// (GSPO's sequence-level ratio, GMPO's geometric mean) declares
///   static constexpr bool row_pass = true;
///   static constexpr std::size_t row_terms = N;          // how many row sums it needs
///   bool needs_row_pass() const;                          // whether this call uses it (a runtime choice)
///   std::array<batch<S>, N> row_term(const batch<S>* x) const;  // a token's terms of the sums
///   Kernel for_row(const std::array<double, N>& sums, double weight) const;  // streams the row
/// The inputs types (TokenInputs, LowpTokenInputs) then read the row once first: sums[j] is the
/// mask-weighted sum of row_term(x)[j] over the selected tokens, weight the row's mask weight,
/// and the kernel for_row returns streams the row as any other. A kernel without the hook pays
/// nothing.
template <class K, class = void>
inline constexpr bool has_row_pass_v = false;
template <class K>
inline constexpr bool has_row_pass_v<K, std::void_t<decltype(K::row_pass)>> = K::row_pass;

template <class Kernel>
using RowPassSums = std::array<double, Kernel::row_terms>;

/// The row pass of a kernel with the hook over n tokens: sum_t w[t] row_term(x[t]) over the
/// selected tokens (a masked-out inf/NaN never reaches the sums), accumulated as token_row's sums
/// are (LaneSum, the partial batch on zero-padded copies).
template <class Kernel, class S, class M>
inline RowPassSums<Kernel> row_term_sums(const Kernel& k, const S* const* in, const M* m, Index n) noexcept {
  constexpr std::size_t NI = Kernel::n_in, NR = Kernel::row_terms;
  constexpr Index W = static_cast<Index>(lanes<S>);
  using B = batch<S>;
  std::array<LaneSum<S>, NR> sums;
  const auto step = [&](const S* const* x_ptr, Index off, const M* mp) PREFLOSS_DETAIL_ALWAYS_INLINE {
    std::array<B, NI> x;
    for (std::size_t j = 0; j < NI; ++j) x[j] = load_u<S, arch>(x_ptr[j] + off);
    const auto ml = load_mask_lanes<S>(mp);
    const std::array<B, NR> v = k.row_term(x.data());
    for (std::size_t j = 0; j < NR; ++j) {
      if constexpr (sizeof(M) == 1) {
        sums[j].add_selected(ml.sel, v[j]);
      } else {
        sums[j].add_selected(ml.sel, ml.weight * v[j]);
      }
    }
  };
  Index t = 0;
  int c = 0;
  for (; t + W <= n; t += W) {
    step(in, t, m + t);
    if (++c == chunk_batches) {
      for (auto& s : sums) s.flush();
      c = 0;
    }
  }
  if (t < n)
    padded_batches<NI>(in, m, static_cast<S*>(nullptr), static_cast<std::size_t>(t), static_cast<std::size_t>(n - t),
                       [&](const S* const* xp, const M* mp, S*) { step(xp, 0, mp); });
  RowPassSums<Kernel> r;
  for (std::size_t j = 0; j < NR; ++j) r[j] = total(sums[j]);
  return r;
}

/// Views of a token loss's inputs: up to four token arrays and the mask, all with one row
/// layout (row-major [rows, cols], or packed rows given by offsets). The drivers below see
/// inputs only through compute_type, grad_type, rows, layout, len, mask_row and row(), so 16-bit
/// storage (detail/lowp_tokens.hpp) plugs in another inputs type.
template <class S, class M>
struct TokenInputs {
  using compute_type = S;  ///< the kernels' lane type
  using grad_type = S;     ///< the gradient's storage type
  const S* in[4] = {};
  const M* mask = nullptr;
  Index rows = 0, cols = 0;
  Offsets off{};

  RowLayout layout() const noexcept { return {rows, cols, off}; }
  template <std::size_t N>
  void row_ptrs(Index i, const S* (&p)[N]) const noexcept {
    const Index b = layout().begin(i);
    for (std::size_t j = 0; j < N; ++j) p[j] = in[j] ? in[j] + b : nullptr;
  }
  const M* mask_row(Index i) const noexcept { return mask + layout().begin(i); }
  Index len(Index i) const noexcept { return layout().len(i); }

  /// token_row over row i (after the kernel's row pass, when it has one).
  template <bool Fwd, bool Bwd, bool Stream, class Kernel>
  TokenStats row(const Kernel& k, Index i, S gscale, S* grad) const noexcept {
    const S* p[4];
    row_ptrs(i, p);
    if constexpr (has_row_pass_v<Kernel>) {
      if (k.needs_row_pass()) {
        const Kernel rk = k.for_row(row_term_sums(k, p, mask_row(i), len(i)), row_weight<S>(mask_row(i), len(i)));
        return token_row<Fwd, Bwd, Stream>(rk, p, mask_row(i), len(i), gscale, grad);
      }
    }
    return token_row<Fwd, Bwd, Stream>(k, p, mask_row(i), len(i), gscale, grad);
  }
};

/// Rows a token-loss block takes: about 32K tokens (see row_grain).
template <class In>
Index token_grain(const In& in) noexcept {
  return row_grain(in.rows, in.layout().count());
}

/// @brief Forward of a token loss: fills scales[i] = d loss / d S_i (see row_scale) and
/// losses[i] = scales[i] * S_i, and returns the merged stats of the call with `loss` replaced by
/// the aggregated batch loss. Every row weight W_i comes from row_weight() and they are added in
/// row order, here and in token_forward_fused, so the two forms agree to the bit. With threads
/// the rows' stats are computed in blocks on the pool and merged here in row order: the same
/// bits.
template <class Kernel, class In, class S = typename In::compute_type>
TokenStats token_forward(const Kernel& k, const In& in, const AggregationSpec& spec, double* scales, S* losses,
                         const Threads& threads = {}) {
  const Index B = in.rows;
  TokenStats total;
  // Row sums first, the normalisers afterwards. losses[] holds nothing yet, so the row sums and
  // weights wait in scales[] and a [batch] vector.
  std::vector<double> weights(static_cast<std::size_t>(B));
  const auto row = [&](Index i) {
    TokenStats st = in.template row<true, false, false>(k, i, S(0), static_cast<typename In::grad_type*>(nullptr));
    st.weight = row_weight<S>(in.mask_row(i), in.len(i));
    return st;
  };
  const auto keep = [&](Index i, const TokenStats& st) {
    scales[i] = st.loss;
    weights[static_cast<std::size_t>(i)] = st.weight;
    total.merge(st);
  };
  if (threads.count() > 1) {
    std::vector<TokenStats> rows(static_cast<std::size_t>(B));
    threads.for_rows(B, token_grain(in), [&](Index b, Index e) {
      for (Index i = b; i < e; ++i) rows[static_cast<std::size_t>(i)] = row(i);
    });
    for (Index i = 0; i < B; ++i) keep(i, rows[static_cast<std::size_t>(i)]);
  } else {
    for (Index i = 0; i < B; ++i) keep(i, row(i));
  }
  double nonempty = 0;
  for (const double w : weights) nonempty += w > 0;
  double loss = 0;
  for (Index i = 0; i < B; ++i) {
    const double row_loss = scales[i];
    scales[i] = row_scale(spec, i, weights[static_cast<std::size_t>(i)], total.weight, nonempty);
    const double contribution = scales[i] * row_loss;
    losses[i] = static_cast<S>(contribution);
    loss += contribution;
  }
  total.loss = loss;
  return total;
}

/// @brief token_forward and the token gradient in one pass over the inputs (grad fully
/// overwritten). A row's gradient scale must be known before the row streams, so token_mean
/// (and a mode that divides by the non-empty rows) sums the masks first (the row weights wait in scales[]) and the
/// other modes sum each row's mask just before it (still in cache for the main pass). With threads, blocks of rows
/// stream on the pool (each block fences its own streaming stores) and their stats are merged here in row order.
template <class Kernel, class In, class S = typename In::compute_type>
TokenStats token_forward_fused(const Kernel& k, const In& in, const AggregationSpec& spec, double* scales, S* losses,
                               const MatrixOut<typename In::grad_type>& grad, const Threads& threads = {}) {
  const Index B = in.rows;
  const bool all_first = needs_total_weight(spec) || needs_nonempty_rows(spec);
  const bool pooled = threads.count() > 1;
  const Index grain = token_grain(in);
  double total_weight = 0, nonempty = 0;
  if (all_first) {
    if (pooled)
      threads.for_rows(B, grain, [&](Index b, Index e) {
        for (Index i = b; i < e; ++i) scales[i] = row_weight<S>(in.mask_row(i), in.len(i));
      });
    for (Index i = 0; i < B; ++i) {
      if (!pooled) scales[i] = row_weight<S>(in.mask_row(i), in.len(i));
      total_weight += scales[i];
      nonempty += scales[i] > 0;
    }
  }
  const bool stream = use_stream_store<typename In::grad_type>(static_cast<std::size_t>(in.layout().count()));
  // Row i's stats, its scale left in scales[i].
  const auto row = [&](Index i, auto streaming) {
    const double w = all_first ? scales[i] : row_weight<S>(in.mask_row(i), in.len(i));
    scales[i] = row_scale(spec, i, w, total_weight, nonempty);
    TokenStats st =
        in.template row<true, true, decltype(streaming)::value>(k, i, static_cast<S>(scales[i]), grad.row(i));
    st.weight = w;
    return st;
  };
  const auto rows_of = [&](Index b, Index e, const auto& each) {
    if (stream) {
      for (Index i = b; i < e; ++i) each(i, row(i, std::true_type{}));
      stream_fence();
    } else {
      for (Index i = b; i < e; ++i) each(i, row(i, std::false_type{}));
    }
  };
  TokenStats total;
  double loss = 0;
  const auto keep = [&](Index i, const TokenStats& st) {
    const double contribution = scales[i] * st.loss;
    losses[i] = static_cast<S>(contribution);
    loss += contribution;
    total.merge(st);
  };
  if (pooled) {
    std::vector<TokenStats> stats(static_cast<std::size_t>(B));
    threads.for_rows(B, grain, [&](Index b, Index e) {
      rows_of(b, e, [&](Index i, const TokenStats& st) { stats[static_cast<std::size_t>(i)] = st; });
    });
    for (Index i = 0; i < B; ++i) keep(i, stats[static_cast<std::size_t>(i)]);
  } else {
    rows_of(0, B, keep);
  }
  total.loss = loss;
  return total;
}

/// Writes the token gradient of a finished forward: grad[i, t] = scales[i] * w * d l / d input0
/// (blocks of rows on the pool with threads: each row is written by the same code).
template <class Kernel, class In>
void token_backward(const Kernel& k, const In& in, const double* scales, const MatrixOut<typename In::grad_type>& grad,
                    const Threads& threads = {}) {
  using S = typename In::compute_type;
  const bool stream = use_stream_store<typename In::grad_type>(static_cast<std::size_t>(in.layout().count()));
  threads.for_rows(in.rows, token_grain(in), [&](Index b, Index e) {
    if (stream) {
      for (Index i = b; i < e; ++i) in.template row<false, true, true>(k, i, static_cast<S>(scales[i]), grad.row(i));
      stream_fence();
    } else {
      for (Index i = b; i < e; ++i) in.template row<false, true, false>(k, i, static_cast<S>(scales[i]), grad.row(i));
    }
  });
}

/// Tags an entry point passes for an absent reference policy / gradient output: compile-time, so
/// a call without them instantiates none of the code that needs them.
struct NoRef {};
struct NoGrad {};
inline constexpr NoRef no_ref{};
inline constexpr NoGrad no_grad{};
/// Sel of a Params whose visit has no compile-time choice to make.
struct AllKernels {};
template <class G>
inline constexpr bool is_no_grad_v = std::is_same_v<std::remove_const_t<G>, NoGrad>;

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
