/// @file logits/ppo_from_logits.hpp
/// ppo_clip from the logits: token log-probs, the clipped surrogate (with its KL term and an
/// entropy bonus) and d loss / d logits in two passes over the logits instead of three.
///
/// PPO's token gradient is local to the token: d loss / d logp[i,t] depends on that token's
/// log-prob, its rollout constants and a row scale that the mask alone fixes. So each token's
/// logit row is read once from memory for its statistics, its loss gradient is formed, and its
/// gradient row is written while the row is still in cache: one read pass and one write pass,
/// against token_logprobs + ppo_clip + backward's read, read and write.
#pragma once

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/token_kernels.hpp"
#include "../loss/ppo_clip.hpp"
#include "../metrics.hpp"
#include "token_logprobs.hpp"

namespace prefloss {

/// @brief Result of ppo_clip_from_logits. The gradient has already been written to grad_logits.
template <class S>
struct PpoLogitsResult {
  using Tokens = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  S loss = 0;                  ///< policy_loss - entropy_coef * entropy_loss
  Eigen::Tensor<S, 1> losses;  ///< per-sequence contributions [batch]; loss = sum(losses)
  PpoMetrics<S> metrics;       ///< ppo_clip's metrics over logp (metric_sums.metrics())
  S policy_loss = 0;           ///< ppo_clip's loss over logp (with its KL term)
  S entropy_loss = 0;          ///< the entropy aggregated as the loss is (verl's actor/entropy); 0 without entropy
  Tokens logp;                 ///< [batch, tokens] token log-probs, 0 at masked-out tokens
  Tokens entropy;              ///< [batch, tokens] with LogprobOptions::entropy or entropy_coef != 0, else empty
  /// ppo_clip's metric sums over logp, which metrics is finalized from: merge them across
  /// shards for the whole batch's metrics
  MetricSums<PpoMetrics<S>> metric_sums;
};

namespace detail {

template <bool HasRef, class Z, class Lab, class M, class S, class RT>
PpoLogitsResult<S> ppo_from_logits_impl(const LogitsArgs<S, Z, Lab, M>& a, const Matrix<S>& old, const Matrix<S>& adv,
                                        const Matrix<RT>* ref, const PpoOptions& popt, double entropy_coef,
                                        Z* grad_logits, const Threads& threads) {
  constexpr const char* fn = "ppo_clip_from_logits";
  const Index B = a.z.B, T = a.z.T_, V = a.z.V;
  PpoLogitsResult<S> r;
  r.logp = typename PpoLogitsResult<S>::Tokens(B, T);
  if (a.entropy) r.entropy = typename PpoLogitsResult<S>::Tokens(B, T);
  const Matrix<S> lp{r.logp.data(), B, T, {}};
  const PpoPlan<S> plan = ppo_prepare<S>(lp, old, adv, a.mask, ref, popt, fn);

  // The row scales as the token-loss drivers form them (token_forward_fused), before any row.
  std::vector<double> scales(static_cast<std::size_t>(B));
  double total_weight = 0, nonempty = 0;
  for (Index i = 0; i < B; ++i) {
    scales[static_cast<std::size_t>(i)] = row_weight<S>(a.mask.data + i * T, T);
    total_weight += scales[static_cast<std::size_t>(i)];
    nonempty += scales[static_cast<std::size_t>(i)] > 0;
  }
  for (Index i = 0; i < B; ++i)
    scales[static_cast<std::size_t>(i)] =
        row_scale(plan.spec, i, scales[static_cast<std::size_t>(i)], total_weight, nonempty);

  std::vector<double> ent_sums(static_cast<std::size_t>(B), 0.0);
  constexpr Index W = static_cast<Index>(lanes<S>);
  const Index N = B * T;
  r.logp.setZero();  // token_row reads a whole batch of log-probs; the later ones are filled as it goes
  using Sel = std::bool_constant<HasRef>;
  // Rows are independent here (each writes its own log-probs, entropies, ent_sums entry and
  // gradient rows), so blocks of rows may run on any thread: the same bits.
  threads.for_rows(B, logit_grain(B, N * V), [&](Index b, Index e) {
    LogitScratch<S> sc(V, is_lowp_v<Z>, true);
    std::vector<LogitRowStats> row_stats;  // sequence level: a row's logits statistics, kept for its gradient pass
    plan.params.template visit<Sel>([&](const auto& kernel) {
      with_logit_stores<Z>(a.logit_bytes() / sizeof(Z), [&](auto stream) {
        constexpr bool Stream = decltype(stream)::value;
        alignas(64) S g[lanes<S>];
        Index next = b * T;  // the next selected token at or after the current one: its row is prefetched
        const auto next_selected = [&](Index from) {
          if (next < from) next = from;
          while (next < N && !selected<S>(a.mask.data[next])) ++next;
          return next < N && !is_lowp_v<Z> ? a.z.data + next * V : nullptr;
        };
        // A token's log-prob, entropy and its share of ent_sums, from its logits row.
        const auto logit_stats = [&](Index i, Index k) {
          const auto y = static_cast<Index>(a.labels.data[k]);
          const LogitRowStats st = logit_row_of<true>(a.z.data + k * V, V, y, a.k, a.entropy, sc);
          r.logp.data()[k] = static_cast<S>(st.logp);
          if (a.entropy) {
            r.entropy.data()[k] = static_cast<S>(st.entropy);
            ent_sums[static_cast<std::size_t>(i)] +=
                weight_of<S>(a.mask.data[k]) * static_cast<double>(r.entropy.data()[k]);
          }
          return st;
        };
        for (Index i = b; i < e; ++i) {
          const double scale = scales[static_cast<std::size_t>(i)];
          // Sequence level (GSPO) needs the row's mean log-ratio before any token's gradient: the
          // row's log-probs first (their statistics kept), then the kernel's row pass over them,
          // as ppo_clip runs it, and the gradient pass re-reads the logits.
          const bool seq = kernel.needs_row_pass();
          const S* row_in[4] = {r.logp.data() + i * T, old.data + i * T, adv.data + i * T, nullptr};
          if constexpr (HasRef) row_in[3] = ref->data + i * T;
          if (seq) {
            row_stats.resize(static_cast<std::size_t>(T));
            for (Index t = 0; t < T; ++t)
              if (selected<S>(a.mask.data[i * T + t]))
                row_stats[static_cast<std::size_t>(t)] = logit_stats(i, i * T + t);
          }
          const auto rk = seq ? kernel.for_row(row_term_sums(kernel, row_in, a.mask.data + i * T, T),
                                               row_weight<S>(a.mask.data + i * T, T))
                              : kernel;
          // Batches of tokens from the row's start: token_row then forms d loss / d logp from the
          // same batches, so the same bits, as ppo_clip's backward. It runs once a token, after the
          // token's row has given its log-prob, so the row is still in cache for its gradient.
          for (Index t0 = 0; t0 < T; t0 += W) {
            const Index n = T - t0 < W ? T - t0 : W, k0 = i * T + t0;
            const S* in[4] = {r.logp.data() + k0, old.data + k0, adv.data + k0, nullptr};
            if constexpr (HasRef) in[3] = ref->data + k0;
            for (Index j = 0; j < n; ++j) {
              const Index k = k0 + j;
              Z* o = grad_logits + k * V;
              const M w = a.mask.data[k];
              if (!selected<S>(w)) {
                if (a.entropy) r.entropy.data()[k] = S(0);
                zero_logit_row<Stream>(o, V);
                continue;
              }
              const auto y = static_cast<Index>(a.labels.data[k]);
              const LogitRowStats st = seq ? row_stats[static_cast<std::size_t>(t0 + j)] : logit_stats(i, k);
              const double wd = weight_of<S>(w);
              token_row<false, true, false>(rk, in, a.mask.data + k0, n, static_cast<S>(scale), g);
              const Z* pf = next_selected(k + 1);
              // The scratch holds this token's exp(u - m) only when its logits row was the last one
              // read: at sequence level the whole row was read before, so its gradient re-reads them.
              const auto grad_row = [&](auto kept) {
                constexpr bool Kept = decltype(kept)::value;
                if (entropy_coef != 0) {
                  // grad_entropy as a caller of token_logprobs' backward would pass it: rounded to S.
                  const double gh = static_cast<double>(static_cast<S>(-entropy_coef * scale * wd));
                  logit_grad_row<true, Stream, Kept>(a.z.data + k * V, V, y, a.k, st, static_cast<double>(g[j]), gh, o,
                                                     sc, pf);
                } else {
                  logit_grad_row<false, Stream, Kept>(a.z.data + k * V, V, y, a.k, st, static_cast<double>(g[j]), 0.0,
                                                      o, sc, pf);
                }
              };
              if (seq)
                grad_row(std::false_type{});
              else
                grad_row(std::true_type{});
            }
          }
        }
      });
    });
  });

  // loss, losses and metrics: ppo_clip over the finished log-probs (the same bits as calling it).
  using In = TokenInputs<S, M>;
  const auto ppo = ppo_clip_impl<HasRef, In>(lp, old, adv, a.mask, ref, popt, &no_grad);
  r.metrics = ppo.metrics;
  r.metric_sums = ppo.metric_sums;
  r.policy_loss = ppo.loss;
  r.losses = Eigen::Tensor<S, 1>(B);
  double ent_loss = 0, loss = 0;
  for (Index i = 0; i < B; ++i) {
    const double e = scales[static_cast<std::size_t>(i)] * ent_sums[static_cast<std::size_t>(i)];
    const double l = static_cast<double>(ppo.losses(i)) - entropy_coef * e;
    r.losses(i) = static_cast<S>(l);
    ent_loss += e;
  }
  loss = static_cast<double>(ppo.loss) - entropy_coef * ent_loss;
  r.entropy_loss = static_cast<S>(ent_loss);
  r.loss = static_cast<S>(loss);
  return r;
}

template <bool HasRef, class X, class Y, class OLP, class AD, class MK, class RF, class G>
auto ppo_from_logits_views(const X& logits, const Y& labels, const OLP& old_logp, const AD& advantages, const MK& mask,
                           const RF* ref_logp, const PpoOptions& popt, const LogprobOptions& lopt, G& grad_logits) {
  constexpr const char* fn = "ppo_clip_from_logits";
  using Z = tensor_scalar_t<X>;
  using S = compute_t<Z>;
  static_assert(std::is_same_v<tensor_scalar_t<OLP>, S> && std::is_same_v<tensor_scalar_t<AD>, S>,
                "prefloss: old_logp and advantages have the log-probs' type (float unless the logits are double)");
  const auto a = logits_args(logits, labels, mask, lopt, fn, true);
  const Matrix<S> old = matrix_view(old_logp, fn, "old_logp");
  const Matrix<S> adv = matrix_view(advantages, fn, "advantages");
  Matrix<S> ref{};
  if constexpr (HasRef) {
    static_assert(std::is_same_v<tensor_scalar_t<RF>, S>,
                  "prefloss: ref_logp has the log-probs' type (float unless the logits are double)");
    ref = matrix_view(*ref_logp, fn, "ref_logp");
  }
  // Everything that can throw, before the gradient is touched: ppo_prepare runs again in the
  // implementation, on the same arguments.
  {
    const Matrix<S> shape{nullptr, a.z.B, a.z.T_, {}};
    (void)ppo_prepare<S>(shape, old, adv, a.mask, HasRef ? &ref : nullptr, popt, fn);
  }
  Z* out = logits_grad_out<Z>(grad_logits, a, fn);
  const std::size_t gb = a.logit_bytes();
  const auto bytes = [&](const Matrix<S>& m) { return static_cast<std::size_t>(m.count()) * sizeof(S); };
  require_apart(fn, "grad_logits", out, gb, "old_logp", old.data, bytes(old));
  require_apart(fn, "grad_logits", out, gb, "advantages", adv.data, bytes(adv));
  if constexpr (HasRef) require_apart(fn, "grad_logits", out, gb, "ref_logp", ref.data, bytes(ref));
  // The logits passes take LogprobOptions' threads, or PpoOptions' when only those are set; the
  // token aggregation after them takes PpoOptions'.
  const Threads threads = lopt.threads.count() > 1 ? lopt.threads : popt.threads;
  return ppo_from_logits_impl<HasRef>(a, old, adv, HasRef ? &ref : static_cast<const Matrix<S>*>(nullptr), popt,
                                      lopt.entropy_coef, out, threads);
}

}  // namespace detail

/// @brief ppo_clip from the logits in two passes over them, writing d loss / d logits.
///
/// For logits z [batch, tokens, vocab], labels y and temperature tau, logp[i,t] =
/// log softmax(z[i,t] / tau)_y (token_logprobs); the loss is
///
///     loss = ppo_clip(logp, old_logp, advantages, mask[, ref_logp], popt).loss
///            - entropy_coef * agg(entropy)
///
/// where agg aggregates the per-token entropy H[i,t] exactly as the policy loss is aggregated
/// (sum_i row_scale_i sum_t w H, popt.aggregation; verl's dp_actor: pg_loss - entropy_coeff *
/// agg_loss(entropy, response_mask, loss_agg_mode)). GRPO, DAPO and Dr.GRPO are this loss with
/// their advantages and aggregation modes; popt.kl_coef with ref_logp adds the KL penalty.
///
/// grad_logits [batch, tokens, vocab] (the logits' type, row-major) is fully overwritten with
/// d loss / d z: at a selected token g (onehot(y) - p) / tau + the entropy term with g_h =
/// -entropy_coef row_scale_i w (rounded to the log-probs' type), where g = d loss / d logp is
/// ppo_clip's backward; a zero row at masked-out tokens, whose logits are never read. The values
/// are the same bits as token_logprobs, ppo_clip, ppo_clip's backward and token_logprobs'
/// backward called in turn with that g_h: each token's row is read from memory once, its
/// gradient row written once (streaming stores past PREFLOSS_STREAMING_STORE_BYTES for float and
/// double logits), the second read served from cache (a row of V values: 128 KB at V = 32000
/// in float). Rows larger than the cache are read twice. At sequence level (GSPO) a row's
/// log-probs must all be known before its first token's gradient, so each token's logits row is
/// read twice, once for the row's log-probs and once for its gradient (from memory when a row of
/// the batch, T x V logits, exceeds the cache).
///
/// @param logits, labels, mask as token_logprobs (a float mask is the PPO weight w, applied once)
/// @param old_logp, advantages (and ref_logp) [batch, tokens] of the log-probs' type (float
///   unless the logits are double)
/// @param popt ppo_clip's options; lopt the temperature, entropy (also computed when
///   entropy_coef != 0) and entropy_coef (>= 0). Threads: the passes over the logits split
///   rows over lopt.threads, or popt.threads when only that is set; the same bits either way.
/// @throws everything token_logprobs and ppo_clip throw, with "ppo_clip_from_logits" in the
///   message, and shape_error/layout_error for grad_logits (shape, alignment, overlapping an input). Nothing is written
///   then.
template <class X, class Y, class OLP, class AD, class MK, class G, std::enable_if_t<detail::is_tensor_v<G>, int> = 0>
PpoLogitsResult<detail::compute_t<detail::tensor_scalar_t<X>>> ppo_clip_from_logits(
    const X& logits, const Y& labels, const OLP& old_logp, const AD& advantages, const MK& mask, const PpoOptions& popt,
    const LogprobOptions& lopt, G&& grad_logits) {
  return detail::ppo_from_logits_views<false>(logits, labels, old_logp, advantages, mask, &detail::no_ref, popt, lopt,
                                              grad_logits);
}

/// @brief ppo_clip_from_logits with a reference policy's log-probs for the KL term.
template <class X, class Y, class OLP, class AD, class MK, class RF, class G,
          std::enable_if_t<detail::is_tensor_v<RF> && detail::is_tensor_v<G>, int> = 0>
PpoLogitsResult<detail::compute_t<detail::tensor_scalar_t<X>>> ppo_clip_from_logits(
    const X& logits, const Y& labels, const OLP& old_logp, const AD& advantages, const MK& mask, const RF& ref_logp,
    const PpoOptions& popt, const LogprobOptions& lopt, G&& grad_logits) {
  return detail::ppo_from_logits_views<true>(logits, labels, old_logp, advantages, mask, &ref_logp, popt, lopt,
                                             grad_logits);
}

}  // namespace prefloss
