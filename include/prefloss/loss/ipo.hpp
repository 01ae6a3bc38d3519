/// @file loss/ipo.hpp
/// Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
/// Understand Learning from Human Preferences"): a squared loss on the DPO margin.
#pragma once

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"

namespace prefloss {

/// Options of ipo(). Defaults are TRL's.
struct IpoOptions {
  double beta = 0.1;            ///< > 0 and finite: the regularization tau; the target margin is 1/(2 beta)
  bool reference_free = false;  ///< true: rho = 0, the reference inputs are ignored
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count). Unset: this call's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its result's backward()) may split the sequence rows over: the values
  /// are read in blocks of rows and the per-example terms run in order on the calling thread,
  /// the same bits for any count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

namespace detail {
/// ipo's arithmetic, one body for both forms; grads is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto ipo_run(In in, const IpoOptions& opt, const typename In::Grads* grads) {
  using S = typename decltype(in.chosen)::Scalar;
  const double target = 1.0 / (2.0 * opt.beta);
  in.preload(opt.threads);
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      "ipo", in.chosen, in.rejected, in.count,
      [&](Index i) {
        in.load(i);
        const double h = in.uc[static_cast<std::size_t>(i)] - in.ur[static_cast<std::size_t>(i)] - target;
        return PairTerm{h * h, 2 * h, -2 * h};
      },
      grads, opt.threads);
  set_preference_metrics(result, in.uc, in.ur, opt.beta);
  return result;
}
}  // namespace detail

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
  detail::require_beta("ipo", opt.beta);
  return detail::ipo_run(
      detail::pair_inputs("ipo", chosen, rejected, ref_chosen, ref_rejected, opt.reference_free, opt.batch_count), opt,
      nullptr);
}

/// @brief ipo() fused with its backward: the same result, and d loss / d chosen and d loss /
/// d rejected written into grad_chosen and grad_rejected in the same pass over the tokens
/// (bit-identical to `auto r = ipo(...); r.backward(grad_chosen, grad_rejected);`; the result's
/// backward() still works). See the fused dpo() for how the pass runs.
/// @param grad_chosen, grad_rejected outputs shaped like the leaves of chosen / rejected,
/// fully overwritten.
/// @throws as ipo(); shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when
/// an output is misaligned, the two overlap, or either overlaps any input tensor (tokens, masks and references).
/// Every check runs before anything is written.
template <class C, class R, class RC, class RR, class GC, class GR>
auto ipo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const IpoOptions& opt,
         GC&& grad_chosen, GR&& grad_rejected) {
  detail::require_beta("ipo", opt.beta);
  auto in = detail::pair_inputs("ipo", chosen, rejected, ref_chosen, ref_rejected, opt.reference_free, opt.batch_count);
  const auto grads = detail::pair_grads("ipo", in, grad_chosen, grad_rejected);
  return detail::ipo_run(std::move(in), opt, &grads);
}

}  // namespace prefloss
