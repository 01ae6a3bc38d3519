/// @file loss/cpo.hpp
/// CPO (Xu et al. 2024, "Contrastive Preference Optimization") with AlphaPO's reward shape
/// (Gupta et al. 2025): a reference-free preference loss of the policy's sequence log-probs.
#pragma once

#include <algorithm>
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

/// TRL CPOConfig's loss_type names.
enum class CpoVariant {
  sigmoid,  ///< -(1-e) logsig(z) - e logsig(-z), z = b (r_c - r_r)  (CPO's Eq. 3 at e = 0)
  hinge,    ///< max(0, 1 - z); derivative 0 at the kink, as torch.relu
  ipo,      ///< ((r_c - r_r) - 1/(2b))^2
  simpo,    ///< the sigmoid form of z = b (r_c - r_r) - simpo_gamma
};

/// Options of cpo(). Defaults are TRL's CPOConfig's.
struct CpoOptions {
  double beta = 0.1;             ///< > 0 and finite
  double label_smoothing = 0.0;  ///< in [0, 0.5): e (sigmoid and simpo; the others ignore it)
  CpoVariant variant = CpoVariant::sigmoid;
  double simpo_gamma = 0.5;  ///< >= 0 and finite: simpo's target margin
  /// finite: AlphaPO's alpha. 0: the reward is the log-prob s itself; otherwise
  /// r = (1 - p^-alpha) / alpha = (1 - exp(-alpha s)) / alpha, which tends to s as alpha -> 0.
  double alpha = 0.0;
  /// Examples in the global batch (see DpoOptions::batch_count). Unset: this call's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its backward()) may split the sequence rows over (see
  /// DpoOptions::threads). Default: this thread.
  Threads threads = {};
};

namespace detail {
template <class C, class R>
auto cpo_inputs(const C& chosen, const R& rejected, const CpoOptions& opt) {
  constexpr const char* fn = "cpo";
  require_beta(fn, opt.beta);
  require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                 opt.label_smoothing);
  const int v = static_cast<int>(opt.variant);
  require_enum(v >= static_cast<int>(CpoVariant::sigmoid) && v <= static_cast<int>(CpoVariant::simpo), fn, "variant",
               v);
  require_option(opt.simpo_gamma >= 0 && std::isfinite(opt.simpo_gamma), fn, "simpo_gamma", ">= 0 and finite",
                 opt.simpo_gamma);
  require_option(std::isfinite(opt.alpha), fn, "alpha", "finite", opt.alpha);
  return pair_inputs(fn, chosen, rejected, opt.batch_count);
}

/// AlphaPO's reward r(s) and dr/ds.
inline ValueSlope alphapo_reward(double s, double alpha) noexcept {
  if (alpha == 0) return {s, 1.0};
  // (1 - exp(-alpha s)) / alpha = -expm1(-alpha s) / alpha: exact as alpha s -> 0.
  return {-std::expm1(-alpha * s) / alpha, std::exp(-alpha * s)};
}

template <class In>
PREFLOSS_DETAIL_ONE_BODY auto cpo_run(In in, const CpoOptions& opt, const typename In::Grads* grads) {
  using S = typename decltype(in.chosen)::Scalar;
  const double b = opt.beta, e = opt.label_smoothing;
  in.preload(opt.threads);
  std::vector<double> rc(in.uc.size()), rr(in.ur.size());  // the rewards, for the metrics
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      "cpo", in.chosen, in.rejected, in.count,
      [&](Index i) {
        in.load(i);
        const auto k = static_cast<std::size_t>(i);
        const ValueSlope c = alphapo_reward(in.uc[k], opt.alpha), r = alphapo_reward(in.ur[k], opt.alpha);
        rc[k] = c.value;
        rr[k] = r.value;
        const double d = c.value - r.value;
        ValueSlope l{};  // slope: d loss / d d
        switch (opt.variant) {
          case CpoVariant::hinge:
            l = {std::max(0.0, 1 - b * d), 1 - b * d > 0 ? -b : 0.0};
            break;
          case CpoVariant::ipo: {
            const double h = d - 1 / (2 * b);
            l = {h * h, 2 * h};
            break;
          }
          case CpoVariant::simpo:
          case CpoVariant::sigmoid: {
            const double g = opt.variant == CpoVariant::simpo ? opt.simpo_gamma : 0.0;
            const ValueSlope z = smoothed_logistic(b * d - g, e);
            l = {z.value, b * z.slope};
            break;
          }
        }
        return PairTerm{l.value, l.slope * c.slope, -l.slope * r.slope};
      },
      grads, opt.threads);
  set_preference_metrics(result, rc, rr, b);
  return result;
}
}  // namespace detail

/// @brief CPO's preference loss of policy sequence values (no reference model), with AlphaPO's
/// reward shape: TRL's CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py, f2cd577).
///
/// Per example, with the reward r = s (alpha = 0) or r = (1 - exp(-alpha s)) / alpha and
/// d = r_c - r_r: sigmoid `-(1-e) logsig(b d) - e logsig(-b d)`, hinge `max(0, 1 - b d)`, ipo
/// `(d - 1/(2b))^2`, simpo the sigmoid form of `b d - simpo_gamma`; the batch loss is the mean.
/// TRL feeds sequence sums for sigmoid and hinge and per-token means for ipo and simpo (pass
/// masked_sum or masked_mean expressions to match). Rewards are `b r`; metrics are TRL's
/// rewards/{chosen,rejected,margins,accuracies}.
///
/// TRL's CPO loss adds cpo_alpha times the token-mean NLL of the chosen tokens, which is not a
/// function of the sequence values: add `nll(masked_sum(logp_c, mask_c), {normalizer = N})` with
/// N the chosen tokens in the batch, times cpo_alpha, and sum the two gradients.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0,
/// label_smoothing outside [0, 0.5), an unknown variant, simpo_gamma < 0 or a non-finite option.
/// Nothing is written on error.
template <class C, class R>
auto cpo(const C& chosen, const R& rejected, const CpoOptions& opt = {}) {
  return detail::cpo_run(detail::cpo_inputs(chosen, rejected, opt), opt, nullptr);
}

/// @brief cpo() fused with its backward (see the fused dpo()): gradient outputs last, checked
/// before anything is written, bit-identical to the two-pass form.
template <class C, class R, class GC, class GR>
auto cpo(const C& chosen, const R& rejected, const CpoOptions& opt, GC&& grad_chosen, GR&& grad_rejected) {
  auto in = detail::cpo_inputs(chosen, rejected, opt);
  const auto grads = detail::pair_grads("cpo", in, grad_chosen, grad_rejected);
  return detail::cpo_run(std::move(in), opt, &grads);
}

}  // namespace prefloss
