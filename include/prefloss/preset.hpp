/// @file preset.hpp
/// Conformance presets: the options under which prefloss computes what one anchor's code
/// computes, where the anchors disagree with each other or with prefloss's defaults. Each preset
/// returns an options struct; set the problem's own fields (beta, clip ranges, global counts) on
/// it afterwards. The commits read are verl 1dda039, TRL f2cd577, OpenRLHF 3c3be623 and
/// torchtune bd2a0fc.
///
/// What no option can settle, because it is in the inputs rather than the loss, is said where it
/// applies: IPO's sequence value (TRL averages the completion's log-probs, OpenRLHF sums them;
/// see ipo()), and GRPO's reward scaling in TRL (grpo_reward_advantages, whose defaults are TRL's).
#pragma once

#include <array>
#include <cstddef>
#include <optional>

#include "loss/dpo.hpp"
#include "loss/ppo_clip.hpp"
#include "metrics.hpp"
#include "rl/group_advantages.hpp"
#include "rl/whiten.hpp"

namespace prefloss::preset {

/// verl (verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py, 1dda039).
namespace verl {

/// verl's masked_mean: sum / (count + 1e-8), in its metrics and its whitening.
inline constexpr double count_guard = 1e-8;

/// @brief compute_policy_loss_vanilla + agg_loss: dual clip always on with clip_ratio_c = 3,
/// seq-mean-token-mean's row divisor W_i + 1e-8, and the seq_* modes' mean over the rows with a
/// valid token when no global batch size is given (pass sequence_count for shards, as verl's
/// trainer passes its mini-batch size). The log-ratio clamp (20) and the k3 clamps (20, 10) are
/// PpoOptions' defaults already.
inline PpoOptions ppo() {
  PpoOptions o;
  o.dual_clip = 3.0;
  o.row_weight_guard = count_guard;
  o.count_empty_rows = false;
  return o;
}

/// @brief compute_grpo_outcome_advantage: epsilon 1e-6, and a group of one divides by the
/// float32 (1 + 1e-6).
inline GroupOptions grpo() {
  GroupOptions o;
  o.epsilon = 1e-6;
  o.singleton_std_float32 = true;
  return o;
}

/// @brief masked_whiten: masked_mean's 1e-8 in the mean and the variance, Bessel's W / (W - 1),
/// 1e-8 inside the square root.
inline WhitenOptions whiten() {
  WhitenOptions o;
  o.count_guard = count_guard;
  return o;
}

/// @brief ppo_clip's metrics as verl reports them: every mean divides by W + 1e-8 (masked_mean),
/// so one clipped token gives pg_clipfrac 0.99999999, not 1. token_weight and ratio_max are as
/// in `sums.metrics()`. Works on a merged MetricSums too (the guard is added once, to the total).
template <class S>
PpoMetrics<S> metrics(const MetricSums<PpoMetrics<S>>& sums) {
  MetricSums<PpoMetrics<S>> guarded = sums;
  const double w = sums.sums[PpoMetricEntries::weight];
  guarded.sums[PpoMetricEntries::weight] = w + count_guard;
  PpoMetrics<S> m = guarded.metrics();
  m.token_weight = w;
  m.ratio_max = static_cast<S>(w != 0 ? sums.maxima[PpoMetricEntries::ratio_max] : 0.0);
  return m;
}

}  // namespace verl

/// TRL (trl/trainer/dpo_trainer.py, grpo_trainer.py, f2cd577).
namespace trl {

/// @brief DPOTrainer._compute_loss: loss_type "sigmoid" ignores label_smoothing (the other
/// types read it). Every other DpoOptions default is TRL's already.
inline DpoOptions dpo() {
  DpoOptions o;
  o.sigmoid_label_smoothing = false;
  return o;
}

/// @brief GRPOTrainer._compute_loss with its default loss_type "dapo" (token_mean; set
/// token_count to num_items_in_batch for the global normalizer): no log-ratio clamp on coef_1 and
/// no clamp on the k3 KL (TRL's per_token_kl), no dual clip. TRL's clip_ratio/region_mean (the
/// clip conditioned on the advantage's sign: r < 1 - eps_low with A < 0, or r > 1 + eps_high
/// with A > 0) is PpoMetrics::clip_fraction, verl's pg_clipfrac, at token level; prefloss does
/// not split it into TRL's low_mean and high_mean. ppo_clip's Doxygen maps the other loss types
/// to aggregations.
inline PpoOptions grpo() {
  PpoOptions o;
  o.log_ratio_clamp = std::nullopt;
  o.k3_log_ratio_clamp = std::nullopt;
  o.k3_clamp = std::nullopt;
  return o;
}

}  // namespace trl

/// OpenRLHF (openrlhf/models/loss.py, openrlhf/models/utils.py,
/// openrlhf/trainer/ppo_utils/experience_maker.py, 3c3be623).
namespace openrlhf {

/// @brief PolicyLoss with token_level_loss (token_mean; OpenRLHF clamps the log-ratio at 20 and
/// its k3 KL at 10, as prefloss's defaults do), dual clip off. For token_level_loss = false set
/// aggregation = seq_mean_token_mean: the row divisor W_i + 1e-8 and the mean over non-empty
/// rows are set here.
inline PpoOptions ppo() {
  PpoOptions o;
  o.row_weight_guard = 1e-8;
  o.count_empty_rows = false;
  return o;
}

/// @brief The group_norm advantage estimator: (r - mean) / (std + 1e-9), torch's unbiased std.
/// (OpenRLHF's group of one has std NaN; prefloss's uses std 1, as verl.)
inline GroupOptions group_norm() {
  GroupOptions o;
  o.epsilon = 1e-9;
  return o;
}

/// @brief The advantage whitening of gae / reinforce / reinforce_baseline: the population
/// variance (no Bessel), clamped at 1e-8 instead of an added eps.
inline WhitenOptions whiten() {
  WhitenOptions o;
  o.unbiased = false;
  o.eps = 0.0;
  o.min_variance = 1e-8;
  return o;
}

}  // namespace openrlhf

/// torchtune (torchtune/rlhf/rewards.py, bd2a0fc).
namespace torchtune {

/// @brief whiten(x, mask) as estimate_advantages calls it: torchtune's shift_mean = True adds the
/// mean back after scaling (prefloss's shift_mean = false), masked_mean divides by W + 1e-8,
/// Bessel's factor uses that guarded count, and 1e-8 goes inside the square root.
inline WhitenOptions whiten() {
  WhitenOptions o;
  o.shift_mean = false;
  o.count_guard = 1e-8;
  o.bessel_guard = true;
  return o;
}

}  // namespace torchtune

}  // namespace prefloss::preset
