/// @file loss/simpo.hpp
/// SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"):
/// a reference-free DPO on length-normalized log-probs with a target reward margin.
#pragma once

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../math/log_sigmoid.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"

namespace prefloss {

/// Options of simpo(). Defaults are the SimPO paper's (TRL's CPOConfig: simpo_gamma = 0.5).
struct SimpoOptions {
  double beta = 2.0;             ///< > 0 and finite: reward scale
  double gamma = 0.5;            ///< >= 0 and finite: target reward margin (TRL simpo_gamma;
                                 ///< the SimPO repo's gamma_beta_ratio is gamma / beta)
  double label_smoothing = 0.0;  ///< in [0, 0.5): e, as TRL's CPO applies it to loss_type="simpo"
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count). Unset: this call's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its result's backward()) may split the sequence rows over: the values
  /// are read in blocks of rows and the per-example terms run in order on the calling thread,
  /// the same bits for any count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

namespace detail {
/// simpo's checks (options, then inputs); nothing is read.
template <class C, class R>
auto simpo_inputs(const C& chosen, const R& rejected, const SimpoOptions& opt) {
  constexpr const char* fn = "simpo";
  require_beta(fn, opt.beta);
  require_option(opt.gamma >= 0 && std::isfinite(opt.gamma), fn, "gamma", ">= 0 and finite", opt.gamma);
  require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                 opt.label_smoothing);
  return pair_inputs(fn, chosen, rejected, opt.batch_count);
}

/// simpo's arithmetic, one body for both forms; grads is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto simpo_run(In in, const SimpoOptions& opt, const typename In::Grads* grads) {
  using S = typename decltype(in.chosen)::Scalar;
  const double b = opt.beta, g = opt.gamma, e = opt.label_smoothing;
  in.preload(opt.threads);
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      "simpo", in.chosen, in.rejected, in.count,
      [&](Index i) {
        in.load(i);
        const std::size_t k = static_cast<std::size_t>(i);
        const auto l = smoothed_logistic(b * (in.uc[k] - in.ur[k]) - g, e);
        return PairTerm{l.value, b * l.slope, -b * l.slope};
      },
      grads, opt.threads);
  set_preference_metrics(result, in.uc, in.ur, b);
  return result;
}
}  // namespace detail

/// @brief SimPO loss of policy sequence values; no reference model.
///
/// Per example, with z = b (s_c - s_r) - gamma: `-(1-e) logsig(z) - e logsig(-z)`
/// (e = label_smoothing; e = 0 gives SimPO's `-logsig(b (s_c - s_r) - gamma)`); the batch loss
/// is the mean. SimPO's s is the average log-prob over completion tokens: pass masked_mean
/// expressions (TRL's CPOTrainer with loss_type="simpo" does the same). TRL's CPO adds
/// cpo_alpha * NLL on the chosen side; add nll() for that. Rewards are `b s`; metrics are
/// TRL's rewards/{chosen,rejected,margins,accuracies} (accuracy strict).
///
/// @param chosen, rejected policy values: masked_mean (or masked_sum) expressions or [batch] tensors
/// @return PairwiseResult; backward(g_chosen, g_rejected) writes d loss / d policy inputs.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0, gamma < 0,
/// a non-finite option or label_smoothing outside [0, 0.5). Nothing is written on error.
template <class C, class R>
auto simpo(const C& chosen, const R& rejected, const SimpoOptions& opt = {}) {
  return detail::simpo_run(detail::simpo_inputs(chosen, rejected, opt), opt, nullptr);
}

/// @brief simpo() fused with its backward: the same result, and d loss / d chosen and d loss /
/// d rejected written into grad_chosen and grad_rejected in the same pass over the tokens
/// (bit-identical to `auto r = simpo(...); r.backward(grad_chosen, grad_rejected);`; the result's
/// backward() still works). See the fused dpo() for how the pass runs.
/// @param grad_chosen, grad_rejected outputs shaped like the leaves of chosen / rejected,
/// fully overwritten.
/// @throws as simpo(); shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when
/// an output is misaligned, the two overlap, or either overlaps any input tensor (tokens and masks).
/// Every check runs before anything is written.
template <class C, class R, class GC, class GR>
auto simpo(const C& chosen, const R& rejected, const SimpoOptions& opt, GC&& grad_chosen, GR&& grad_rejected) {
  auto in = detail::simpo_inputs(chosen, rejected, opt);
  const auto grads = detail::pair_grads("simpo", in, grad_chosen, grad_rejected);
  return detail::simpo_run(std::move(in), opt, &grads);
}

}  // namespace prefloss
