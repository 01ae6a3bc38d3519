/// @file loss/ipo.hpp
/// Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
/// Understand Learning from Human Preferences"): a squared loss on the DPO margin.
#pragma once

#include <cmath>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/pairwise.hpp"
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
  detail::require_same_scalar<C, R>();
  detail::require_same_scalar<C, RC>();
  detail::require_same_scalar<C, RR>();
  using S = typename sequence_t<C>::Scalar;
  detail::require_beta(fn, opt.beta);
  auto c = as_sequence(chosen);
  auto r = as_sequence(rejected);
  const auto rc = as_sequence(ref_chosen);
  const auto rr = as_sequence(ref_rejected);
  const Index B = c.size();
  detail::require_batch(fn, "rejected", r, B, c.shape());
  detail::require_batch(fn, "ref_chosen", rc, B, c.shape());
  detail::require_batch(fn, "ref_rejected", rr, B, c.shape());
  detail::require_nonempty(fn, "chosen", B);

  std::vector<double> uc = detail::values_of(c), ur = detail::values_of(r);
  if (!opt.reference_free) {
    for (Index i = 0; i < B; ++i) {
      uc[static_cast<std::size_t>(i)] -= rc.value(i);
      ur[static_cast<std::size_t>(i)] -= rr.value(i);
    }
  }
  const double b = opt.beta, target = 1.0 / (2.0 * opt.beta);
  auto result = detail::pairwise_loss<PreferenceMetrics<S>>(fn, std::move(c), std::move(r), [&](Index i) {
    const double h = uc[static_cast<std::size_t>(i)] - ur[static_cast<std::size_t>(i)] - target;
    return detail::PairTerm{h * h, 2 * h, -2 * h};
  });
  std::vector<double> wc(uc.size()), wr(ur.size());
  for (std::size_t i = 0; i < uc.size(); ++i) {
    wc[i] = b * uc[i];
    wr[i] = b * ur[i];
  }
  result.metrics = detail::preference_metrics<S>(wc, wr);
  return result;
}

}  // namespace prefloss
