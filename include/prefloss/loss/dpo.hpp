/// @file loss/dpo.hpp
/// Direct Preference Optimization (Rafailov et al. 2023) with TRL's sigmoid / robust / hinge
/// variants, conservative label smoothing (cDPO) and the reference-free form.
#pragma once

#include <algorithm>
#include <cmath>

#include "../detail/checks.hpp"
#include "../detail/pairwise.hpp"
#include "../math/log_sigmoid.hpp"
#include "../reduce/sequence.hpp"

namespace prefloss {

/// Which DPO loss of the margin D = (s_c - rho_c) - (s_r - rho_r) to use.
enum class DpoVariant {
  sigmoid,  ///< -(1-e) logsig(bD) - e logsig(-bD)  (e = label_smoothing: cDPO)
  robust,   ///< (-(1-e) logsig(bD) + e logsig(-bD)) / (1-2e)  (Chowdhury et al. 2024)
  hinge,    ///< max(0, 1 - bD)  (SLiC); derivative 0 at the kink, as torch.relu
};

/// Options of dpo(). Defaults are TRL's.
struct DpoOptions {
  double beta = 0.1;             ///< > 0: inverse temperature of the implicit reward
  double label_smoothing = 0.0;  ///< in [0, 0.5): assumed label-flip probability e
  DpoVariant variant = DpoVariant::sigmoid;
  bool reference_free = false;   ///< true: rho = 0, the reference inputs are ignored
};

/// @brief DPO loss of policy sequence values against reference values.
///
/// Per example, with u = s - rho (rho = 0 when reference_free) and D = u_c - u_r:
/// sigmoid `-(1-e) logsig(bD) - e logsig(-bD)`, robust `(-(1-e) logsig(bD) + e logsig(-bD)) /
/// (1-2e)`, hinge `max(0, 1 - bD)`; the batch loss is their mean. This is TRL's dpo_loss with
/// sequence log-probs summed over completion tokens (pass masked_sum expressions). Rewards are
/// `b u`; metrics are TRL's rewards/{chosen,rejected,margins,accuracies} (accuracy strict).
///
/// @param chosen, rejected policy values: masked_sum/masked_mean expressions or [batch] tensors
/// @param ref_chosen, ref_rejected reference values (constants), same forms
/// @return PairwiseResult; backward(g_chosen, g_rejected) writes d loss / d policy inputs.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0,
/// label_smoothing outside [0, 0.5) or an unknown variant. Nothing is written on error.
template <class C, class R, class RC, class RR>
auto dpo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt = {}) {
  constexpr const char* fn = "dpo";
  detail::require_same_scalar<C, R>();
  detail::require_same_scalar<C, RC>();
  detail::require_same_scalar<C, RR>();
  using S = typename sequence_t<C>::Scalar;
  detail::require_beta(fn, opt.beta);
  detail::require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                         opt.label_smoothing);
  detail::require_enum(opt.variant == DpoVariant::sigmoid || opt.variant == DpoVariant::robust ||
                           opt.variant == DpoVariant::hinge,
                       fn, "variant", static_cast<int>(opt.variant));
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
  const double b = opt.beta, e = opt.label_smoothing;
  auto result = detail::pairwise_loss<PreferenceMetrics<S>>(fn, std::move(c), std::move(r), [&](Index i) {
    const double z = b * (uc[static_cast<std::size_t>(i)] - ur[static_cast<std::size_t>(i)]);
    double loss = 0, dz = 0;  // dz = d loss / d z
    if (opt.variant == DpoVariant::hinge) {
      loss = std::max(0.0, 1.0 - z);
      dz = 1.0 - z > 0 ? -1.0 : 0.0;
    } else {
      // logsig(z) and logsig(-z) share one exp; d logsig(z)/dz = sig(-z), d logsig(-z)/dz = -sig(z).
      const auto pos = log_sigmoid_and_grad(z);
      const auto neg = log_sigmoid_and_grad(-z);
      if (opt.variant == DpoVariant::sigmoid) {
        loss = -(1 - e) * pos.value - e * neg.value;
        dz = -(1 - e) * pos.grad + e * neg.grad;
      } else {
        loss = (-(1 - e) * pos.value + e * neg.value) / (1 - 2 * e);
        dz = (-(1 - e) * pos.grad - e * neg.grad) / (1 - 2 * e);
      }
    }
    return detail::PairTerm{loss, b * dz, -b * dz};
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
