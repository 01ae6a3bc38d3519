/// @file loss/simpo.hpp
/// SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"):
/// a reference-free DPO on length-normalized log-probs with a target reward margin.
#pragma once

#include <cmath>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/pairwise.hpp"
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
  detail::require_same_scalar<C, R>();
  using S = typename sequence_t<C>::Scalar;
  detail::require_beta(fn, opt.beta);
  detail::require_option(opt.gamma >= 0 && std::isfinite(opt.gamma), fn, "gamma", ">= 0 and finite", opt.gamma);
  detail::require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                         opt.label_smoothing);
  auto c = as_sequence(chosen);
  auto r = as_sequence(rejected);
  const Index B = c.size();
  detail::require_batch(fn, "rejected", r, B, c.shape());
  detail::require_nonempty(fn, "chosen", B);

  const std::vector<double> sc = detail::values_of(c), sr = detail::values_of(r);
  const double b = opt.beta, g = opt.gamma, e = opt.label_smoothing;
  auto result = detail::pairwise_loss<PreferenceMetrics<S>>(fn, std::move(c), std::move(r), [&](Index i) {
    const std::size_t k = static_cast<std::size_t>(i);
    const double z = b * (sc[k] - sr[k]) - g;
    // d logsig(z)/dz = sig(-z) = pos.grad; d logsig(-z)/dz = -sig(z) = -neg.grad.
    const auto pos = log_sigmoid_and_grad(z);
    const auto neg = log_sigmoid_and_grad(-z);
    const double loss = -(1 - e) * pos.value - e * neg.value;
    const double dz = -(1 - e) * pos.grad + e * neg.grad;
    return detail::PairTerm{loss, b * dz, -b * dz};
  });
  std::vector<double> wc(sc.size()), wr(sr.size());
  for (std::size_t i = 0; i < sc.size(); ++i) {
    wc[i] = b * sc[i];
    wr[i] = b * sr[i];
  }
  result.metrics = detail::preference_metrics<S>(wc, wr);
  return result;
}

}  // namespace prefloss
