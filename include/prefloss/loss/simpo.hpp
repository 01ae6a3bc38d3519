/// @file loss/simpo.hpp
/// SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"):
/// a reference-free DPO on length-normalized log-probs with a target reward margin.
#pragma once

#include <cmath>
#include <vector>

#include "../detail/checks.hpp"
#include "pairwise.hpp"
#include "../math/log_sigmoid.hpp"
#include "../reduce/sequence.hpp"

namespace prefloss {

/// Options of simpo(). Defaults are the SimPO paper's (TRL's CPOConfig: simpo_gamma = 0.5).
struct SimpoOptions {
  double beta = 2.0;             ///< > 0 and finite: reward scale
  double gamma = 0.5;            ///< >= 0 and finite: target reward margin (TRL simpo_gamma;
                                 ///< the SimPO repo's gamma_beta_ratio is gamma / beta)
  double label_smoothing = 0.0;  ///< in [0, 0.5): e, as TRL's CPO applies it to loss_type="simpo"
};

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
  constexpr const char* fn = "simpo";
  using S = typename sequence_t<C>::Scalar;
  detail::require_beta(fn, opt.beta);
  detail::require_option(opt.gamma >= 0 && std::isfinite(opt.gamma), fn, "gamma", ">= 0 and finite", opt.gamma);
  detail::require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                         opt.label_smoothing);
  auto in = detail::pair_inputs(fn, chosen, rejected);
  const double b = opt.beta, g = opt.gamma, e = opt.label_smoothing;
  const auto& sc = in.uc;
  const auto& sr = in.ur;
  auto result = detail::pairwise_loss<PreferenceMetrics<S>>(fn, std::move(in.chosen), std::move(in.rejected), [&](Index i) {
    const std::size_t k = static_cast<std::size_t>(i);
    const auto l = detail::smoothed_logistic(b * (sc[k] - sr[k]) - g, e);
    return detail::PairTerm{l.value, b * l.slope, -b * l.slope};
  });
  result.metrics = detail::preference_metrics<S>(sc, sr, b);
  return result;
}

}  // namespace prefloss
