/// @file loss/ipo.hpp
/// Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
/// Understand Learning from Human Preferences"): a squared loss on the DPO margin.
#pragma once

#include <cmath>
#include <vector>

#include "../detail/checks.hpp"
#include "pairwise.hpp"
#include "../reduce/sequence.hpp"

namespace prefloss {

/// Options of ipo(). Defaults are TRL's.
struct IpoOptions {
  double beta = 0.1;            ///< > 0 and finite: the regularization tau; the target margin is 1/(2 beta)
  bool reference_free = false;  ///< true: rho = 0, the reference inputs are ignored
};

/// @brief IPO loss of policy sequence values against reference values.
///
/// Per example, with u = s - rho (rho = 0 when reference_free) and D = u_c - u_r:
/// `(D - 1/(2b))^2`; the batch loss is the mean. The two anchors differ only in the sequence
/// value they feed in:
/// - TRL's DPOTrainer (loss_type="ipo") averages log-probs over completion tokens: pass
///   masked_mean expressions (policy and reference alike);
/// - OpenRLHF's DPOLoss(ipo=True) sums them: pass masked_sum expressions.
///
/// Rewards are `b u`; metrics are TRL's rewards/{chosen,rejected,margins,accuracies}
/// (accuracy strict: ties count as wrong).
///
/// @param chosen, rejected policy values: masked_sum/masked_mean expressions or [batch] tensors
/// @param ref_chosen, ref_rejected reference values (constants), same forms
/// @return PairwiseResult; backward(g_chosen, g_rejected) writes d loss / d policy inputs.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0 or not
/// finite. Nothing is written on error.
template <class C, class R, class RC, class RR>
auto ipo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const IpoOptions& opt = {}) {
  constexpr const char* fn = "ipo";
  using S = typename sequence_t<C>::Scalar;
  detail::require_beta(fn, opt.beta);
  auto in = detail::pair_inputs(fn, chosen, rejected, ref_chosen, ref_rejected, opt.reference_free);
  const double target = 1.0 / (2.0 * opt.beta);
  const auto& uc = in.uc;
  const auto& ur = in.ur;
  auto result = detail::pairwise_loss<PreferenceMetrics<S>>(fn, std::move(in.chosen), std::move(in.rejected), [&](Index i) {
    const double h = uc[static_cast<std::size_t>(i)] - ur[static_cast<std::size_t>(i)] - target;
    return detail::PairTerm{h * h, 2 * h, -2 * h};
  });
  result.metrics = detail::preference_metrics<S>(uc, ur, opt.beta);
  return result;
}

}  // namespace prefloss
