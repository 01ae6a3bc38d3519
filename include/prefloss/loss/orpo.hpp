/// @file loss/orpo.hpp
/// ORPO (Hong et al. 2024, "Monolithic Preference Optimization without Reference Model"): SFT
/// on the chosen response plus a log-odds-ratio preference term.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../math/log1mexp.hpp"
#include "../math/log_sigmoid.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"

namespace prefloss {

/// Options of orpo(). Defaults are TRL's ORPOConfig.
struct OrpoOptions {
  double beta = 0.1;        ///< > 0 and finite: weight of the odds-ratio term (the paper's lambda)
  double nll_weight = 1.0;  ///< >= 0 and finite: weight w of the chosen NLL term (0: odds term only)
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count). Unset: this call's batch.
  std::optional<double> batch_count =
      std::nullopt;  /// Threads the call (and its result's backward()) may split the sequence rows over: the values
  /// are read in blocks of rows and the per-example terms run in order on the calling thread,
  /// the same bits for any count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

/// Metrics of orpo(): TRL's ORPOTrainer set. Rewards are beta * s (no reference).
template <class S>
struct OrpoMetrics : PreferenceMetrics<S> {
  S log_odds_ratio = 0;   ///< batch mean of logsig(L) (TRL "log_odds_ratio")
  S log_odds_chosen = 0;  ///< batch mean of the log odds ratio L (TRL "log_odds_chosen")
  S nll_loss = 0;         ///< batch mean of -s_c (TRL "nll_loss")
};

/// @brief Entries of MetricSums<OrpoMetrics<S>>: PreferenceMetricEntries' four sums (rewards
/// beta s), then the odds-ratio sums, all over examples (an empty pair adds 0 to each and 1 to
/// count); no maxima.
struct OrpoMetricEntries : PreferenceMetricEntries {
  static constexpr std::size_t log_odds_ratio = 4;   ///< sums: logsig(L)
  static constexpr std::size_t log_odds_chosen = 5;  ///< sums: the log odds ratio L
  static constexpr std::size_t nll = 6;              ///< sums: -s_c
  static constexpr std::size_t n_sums = 7;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
template <class S>
struct metric_layout<OrpoMetrics<S>> {
  using Entries = OrpoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static OrpoMetrics<S> finalize(const std::array<double, n_sums>& sums, const std::array<double, n_maxima>&) noexcept {
    using E = Entries;
    OrpoMetrics<S> m;
    static_cast<PreferenceMetrics<S>&>(m) = preference_finalize<S>(sums.data());
    const double n = sums[E::count];
    if (n != 0) {
      m.log_odds_ratio = static_cast<S>(sums[E::log_odds_ratio] / n);
      m.log_odds_chosen = static_cast<S>(sums[E::log_odds_chosen] / n);
      m.nll_loss = static_cast<S>(sums[E::nll] / n);
    }
    return m;
  }
};

/// orpo's checks (options, then inputs); nothing is read.
template <class C, class R>
auto orpo_inputs(const C& chosen, const R& rejected, const OrpoOptions& opt) {
  constexpr const char* fn = "orpo";
  require_beta(fn, opt.beta);
  require_option(opt.nll_weight >= 0 && std::isfinite(opt.nll_weight), fn, "nll_weight", ">= 0 and finite",
                 opt.nll_weight);
  return pair_inputs(fn, chosen, rejected, opt.batch_count);
}

/// orpo's arithmetic, one body for both forms; grads is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto orpo_run(In in, const OrpoOptions& opt, const typename In::Grads* grads) {
  constexpr const char* fn = "orpo";
  using S = typename decltype(in.chosen)::Scalar;
  const double b = opt.beta, w = opt.nll_weight;
  double sum_ratio = 0, sum_log_odds = 0, nll = 0;
  in.preload(opt.threads);
  auto result = pairwise_loss<OrpoMetrics<S>>(
      fn, in.chosen, in.rejected, in.count,
      [&](Index i) {
        const std::size_t k = static_cast<std::size_t>(i);
        in.load(i);
        if (in.chosen.empty(i) || in.rejected.empty(i)) {
          in.uc[k] = in.ur[k] = 0;  // so the reward metrics see 0 too
          return PairTerm{0.0, 0.0, 0.0};
        }
        const double xc = in.uc[k], xr = in.ur[k];
        const double l1c = log1mexp(xc), l1r = log1mexp(xr);
        const double L = (xc - xr) - (l1c - l1r);
        const double ratio = log_sigmoid_and_grad(L).value;
        sum_ratio += ratio;
        sum_log_odds += L;
        nll -= xc;
        const double dc = -w - b / (-std::expm1(xc) + std::exp(xc - xr + l1r));
        const double dr = b / (-std::expm1(xr) + std::exp(xc - xr + 2 * l1r - l1c));
        return PairTerm{-w * xc - b * ratio, dc, dr};
      },
      grads, opt.threads);
  auto& sums = result.metric_sums.sums;
  add_preference_sums(sums, in.uc, in.ur, b);
  sums[OrpoMetricEntries::log_odds_ratio] = sum_ratio;
  sums[OrpoMetricEntries::log_odds_chosen] = sum_log_odds;
  sums[OrpoMetricEntries::nll] = nll;
  result.metrics = result.metric_sums.metrics();
  return result;
}
}  // namespace detail

/// @brief ORPO loss of policy sequence values; no reference model.
///
/// With s the average log-prob of a response (pass masked_mean expressions; s <= 0) and the
/// log odds ratio `L = (s_c - s_r) - (log1mexp(s_c) - log1mexp(s_r))`, the per-example loss is
/// `-w s_c - b logsig(L)` (w = nll_weight, 1 by default) and the batch loss its mean. TRL's
/// ORPOTrainer computes the same odds term; its NLL is the token mean over all chosen tokens of
/// the batch, ours the mean over examples of each example's token mean (the paper's form); they
/// agree when every chosen response has the same length. For TRL's NLL exactly, set
/// nll_weight = 0 and add nll(masked_sum(...), {normalizer = chosen token count}).
///
/// log1mexp is evaluated exactly near 0, and the gradient is formed without the
/// inf * 0 that sig(-L) / (1 - exp(s)) meets at s_c = 0:
/// d/ds_c = -w - b / (-expm1(s_c) + exp(s_c - s_r + log1mexp(s_r))),
/// d/ds_r = b / (-expm1(s_r) + exp(s_c - s_r + 2 log1mexp(s_r) - log1mexp(s_c))).
/// So s_c = 0 (a chosen response of probability 1) gives a finite loss and gradient; s_r = 0 is
/// a true singularity (L = -inf) and gives an infinite loss; s > 0 is outside the domain (NaN).
///
/// Empty pairs: when either response of an example has no selected token (a fully masked row of
/// a masked_mean/masked_sum expression, or a row of zero tokens), there is no odds ratio to
/// form. Such an example follows the empty-row policy: loss 0, gradient 0, 0 in every metric
/// sum, and it still counts in the batch mean (as an empty row does under seq_mean_token_mean).
/// A plain [batch] tensor has no rows, so its values are taken as they are.
///
/// @param chosen, rejected policy values: masked_mean (or masked_sum) expressions or [batch] tensors
/// @return PairwiseResult with OrpoMetrics; backward(g_chosen, g_rejected) writes d loss / d
/// policy inputs (the chosen side includes the NLL term).
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0,
/// nll_weight < 0 or a non-finite option. Nothing is written on error.
template <class C, class R>
auto orpo(const C& chosen, const R& rejected, const OrpoOptions& opt = {}) {
  return detail::orpo_run(detail::orpo_inputs(chosen, rejected, opt), opt, nullptr);
}

/// @brief orpo() fused with its backward: the same result, and d loss / d chosen and d loss /
/// d rejected written into grad_chosen and grad_rejected in the same pass over the tokens
/// (bit-identical to `auto r = orpo(...); r.backward(grad_chosen, grad_rejected);`; the result's
/// backward() still works). See the fused dpo() for how the pass runs.
/// @param grad_chosen, grad_rejected outputs shaped like the leaves of chosen / rejected,
/// fully overwritten.
/// @throws as orpo(); shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when
/// an output is misaligned, the two overlap, or either overlaps any input tensor (tokens and masks).
/// Every check runs before anything is written.
template <class C, class R, class GC, class GR>
auto orpo(const C& chosen, const R& rejected, const OrpoOptions& opt, GC&& grad_chosen, GR&& grad_rejected) {
  auto in = detail::orpo_inputs(chosen, rejected, opt);
  const auto grads = detail::pair_grads("orpo", in, grad_chosen, grad_rejected);
  return detail::orpo_run(std::move(in), opt, &grads);
}

}  // namespace prefloss
