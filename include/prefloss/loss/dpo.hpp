/// @file loss/dpo.hpp
/// Direct Preference Optimization (Rafailov et al. 2023) with TRL's sigmoid / robust / hinge
/// variants, conservative label smoothing (cDPO) and the reference-free form.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "../detail/checks.hpp"
#include "../math/log_sigmoid.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"

namespace prefloss {

/// Which DPO loss of the margin D = (s_c - rho_c) - (s_r - rho_r) to use.
enum class DpoVariant {
  sigmoid,  ///< -(1-e) logsig(bD) - e logsig(-bD)  (e = label_smoothing: cDPO)
  robust,   ///< (-(1-e) logsig(bD) + e logsig(-bD)) / (1-2e)  (Chowdhury et al. 2024)
  hinge,    ///< max(0, 1 - bD)  (SLiC); derivative 0 at the kink, as torch.relu
};

/// Options of dpo(). Defaults are TRL's.
struct DpoOptions {
  double beta = 0.1;  ///< > 0: inverse temperature of the implicit reward
  /// in [0, 0.5): assumed label-flip probability e. robust divides by 1 - 2e, so its loss and
  /// gradient grow without bound as e approaches 0.5 (labels that carry no information): that is
  /// the estimator's value, not a rounding artefact, and prefloss computes it as it is.
  double label_smoothing = 0.0;
  DpoVariant variant = DpoVariant::sigmoid;
  bool reference_free = false;  ///< true: rho = 0, the reference inputs are ignored
  /// Examples in the global batch (every rank and micro-batch): the loss is sum(losses) /
  /// batch_count and the gradients scale with it, so shards add up to the whole batch. Unset:
  /// this call's batch. Finite, >= 1 and >= this call's batch; an empty shard is then allowed.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its result's backward()) may split the sequence rows over: the values
  /// are read in blocks of rows and the per-example terms run in order on the calling thread,
  /// the same bits for any count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

namespace detail {
/// dpo's checks (options, then inputs); nothing is read.
template <class C, class R, class RC, class RR>
auto dpo_inputs(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                const DpoOptions& opt) {
  constexpr const char* fn = "dpo";
  require_beta(fn, opt.beta);
  require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                 opt.label_smoothing);
  require_enum(
      opt.variant == DpoVariant::sigmoid || opt.variant == DpoVariant::robust || opt.variant == DpoVariant::hinge, fn,
      "variant", static_cast<int>(opt.variant));
  return pair_inputs(fn, chosen, rejected, ref_chosen, ref_rejected, opt.reference_free, opt.batch_count);
}

/// dpo's arithmetic, one body for both forms; grads is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto dpo_run(In in, const DpoOptions& opt, const typename In::Grads* grads) {
  using S = typename decltype(in.chosen)::Scalar;
  const double b = opt.beta, e = opt.label_smoothing;
  in.preload(opt.threads);
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      "dpo", in.chosen, in.rejected, in.count,
      [&](Index i) {
        in.load(i);
        const double z = b * (in.uc[static_cast<std::size_t>(i)] - in.ur[static_cast<std::size_t>(i)]);
        ValueSlope l{};  // slope = d loss / d z
        if (opt.variant == DpoVariant::hinge) {
          l = {std::max(0.0, 1.0 - z), 1.0 - z > 0 ? -1.0 : 0.0};
        } else if (opt.variant == DpoVariant::sigmoid) {
          l = smoothed_logistic(z, e);
        } else {
          // robust: (-(1-e) logsig(z) + e logsig(-z)) / (1-2e); d logsig(-z)/dz = -sig(z).
          const auto pos = log_sigmoid_and_grad(z);
          const auto neg = log_sigmoid_and_grad(-z);
          l = {(-(1 - e) * pos.value + e * neg.value) / (1 - 2 * e),
               (-(1 - e) * pos.grad - e * neg.grad) / (1 - 2 * e)};
        }
        return PairTerm{l.value, b * l.slope, -b * l.slope};
      },
      grads, opt.threads);
  set_preference_metrics(result, in.uc, in.ur, b);
  return result;
}
}  // namespace detail

/// @brief DPO loss of policy sequence values against reference values.
///
/// Per example, with u = s - rho (rho = 0 when reference_free) and D = u_c - u_r:
/// sigmoid `-(1-e) logsig(bD) - e logsig(-bD)`, robust `(-(1-e) logsig(bD) + e logsig(-bD)) /
/// (1-2e)`, hinge `max(0, 1 - bD)`; the batch loss is their mean, over sequence log-probs
/// summed over completion tokens (pass masked_sum expressions). The sigmoid form with e is cDPO,
/// as OpenRLHF's DPOLoss computes it (openrlhf/models/loss.py); TRL's DPOTrainer._compute_loss
/// (trl/trainer/dpo_trainer.py, f2cd577) ignores label_smoothing for loss_type="sigmoid", so
/// TRL's sigmoid loss is this one with e = 0. robust and hinge are TRL's. Rewards are `b u`;
/// metrics are TRL's rewards/{chosen,rejected,margins,accuracies} (accuracy strict).
///
/// @param chosen, rejected policy values: masked_sum/masked_mean expressions or [batch] tensors
/// @param ref_chosen, ref_rejected reference values (constants), same forms
/// @return PairwiseResult; backward(g_chosen, g_rejected) writes d loss / d policy inputs.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0,
/// label_smoothing outside [0, 0.5) or an unknown variant. Nothing is written on error.
template <class C, class R, class RC, class RR>
auto dpo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt = {}) {
  return detail::dpo_run(detail::dpo_inputs(chosen, rejected, ref_chosen, ref_rejected, opt), opt, nullptr);
}

/// @brief dpo() fused with its backward: the same result, and d loss / d chosen and d loss /
/// d rejected written into grad_chosen and grad_rejected in the same pass over the tokens.
///
/// Each example's rows are read once for its sequence values and its gradient rows are written
/// right after (from the mask, still in cache; streaming stores for outputs of
/// PREFLOSS_STREAMING_STORE_BYTES or more). The loss, losses, metrics and both gradients are
/// bit-identical to `auto r = dpo(...); r.backward(grad_chosen, grad_rejected);`, and the
/// returned result's backward() still works.
///
/// @param grad_chosen, grad_rejected outputs shaped like the leaves of chosen / rejected
/// ([batch, tokens] for an expression, [batch] for a plain tensor), fully overwritten.
/// @throws as dpo(); shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when an
/// output is misaligned, the two overlap, or either overlaps any input tensor (tokens, masks and
/// references). Every check runs before anything is written.
template <class C, class R, class RC, class RR, class GC, class GR>
auto dpo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt,
         GC&& grad_chosen, GR&& grad_rejected) {
  auto in = detail::dpo_inputs(chosen, rejected, ref_chosen, ref_rejected, opt);
  const auto grads = detail::pair_grads("dpo", in, grad_chosen, grad_rejected);
  return detail::dpo_run(std::move(in), opt, &grads);
}

}  // namespace prefloss
