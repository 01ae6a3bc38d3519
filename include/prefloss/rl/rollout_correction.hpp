/// @file rl/rollout_correction.hpp
/// Rollout importance-sampling corrections for the train/inference mismatch: the rollout engine
/// (vLLM, SGLang) samples from pi_rollout, which differs from the trainer's pi_old in precision
/// and kernels, so the policy gradient is off-policy. Per-token weights rho = pi_old / pi_rollout,
/// truncated (TIS), masked outside a band (MIS, IcePop), and verl's rejection of tokens or whole
/// sequences by a divergence statistic (OpenRLHF's tis / icepop / seq-mask-tis are settings of
/// the same options, see RolloutIsOptions). The weights are constants: the caller multiplies
/// them into the loss (see rollout_is_weights for the recipes with ppo_clip).
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"

namespace prefloss {

/// @brief Granularity of the importance ratio.
/// verl: RolloutCorrectionConfig.rollout_is (verl/trainer/ppo/rollout_corr_helper.py,
/// compute_rollout_correction_weights, 1dda039); TRL: the prefix of
/// GRPOConfig.vllm_importance_sampling_mode (trl/trainer/grpo_trainer.py,
/// GRPOTrainer._generate_and_score_completions, f2cd577).
/// New enumerators go last: the values are part of the ABI of callers that store them.
enum class RolloutIsLevel {
  none,      ///< no importance weight (w = 1): rejection sampling only (verl rollout_is = null)
  token,     ///< rho_t = exp(d_t) per token (verl "token"; TRL "token_truncate" / "token_mask")
  sequence,  ///< rho_i = exp(sum_t d_t) on every token of row i (verl "sequence"; TRL "sequence_*")
};

/// @brief What happens to a ratio outside [lower, upper].
enum class RolloutIsBound {
  /// w = clamp(rho, lower, upper): TIS. verl's single-float rollout_is_threshold (upper only,
  /// `raw.clamp(max=upper)`; lower = 0 here); TRL "*_truncate" (`torch.clamp(ratio,
  /// min=vllm_importance_sampling_clip_min, max=vllm_importance_sampling_clip_max)`).
  truncate,
  /// w = rho if lower <= rho <= upper (both inclusive), else 0: MIS / IcePop. verl's
  /// "lower_upper" rollout_is_threshold string (e.g. "0.5_5.0"); TRL "*_mask"
  /// (`ratio.masked_fill((ratio < min) | (ratio > max), 0)`).
  mask,
};

/// @brief verl's rejection-sampling options (rollout_corr_helper.py,
/// compute_rollout_rejection_mask, SUPPORTED_ROLLOUT_RS_OPTIONS; the enumerator is the option
/// string). With x_t = clamp(d_t, +-log_ratio_clamp): k1_t = -x_t, k2_t = x_t^2 / 2,
/// k3_t = exp(x_t) - 1 - x_t. A token / sequence is kept when its statistic passes; a rejected
/// sequence loses all its tokens. verl's comma-separated lists (an AND of options) are not
/// taken here: call once per option and multiply the keep masks.
/// New enumerators go last: the values are part of the ABI of callers that store them.
enum class RolloutRs {
  none,         ///< no rejection (verl rollout_rs = null)
  token_k1,     ///< log(rs_lower) <= k1_t <= log(rs_upper)
  token_k2,     ///< k2_t <= rs_upper
  token_k3,     ///< k3_t <= rs_upper
  seq_sum_k1,   ///< log(rs_lower) <= sum_t k1_t <= log(rs_upper) (verl's Seq-MIS preset)
  seq_sum_k2,   ///< sum_t k2_t <= rs_upper
  seq_sum_k3,   ///< sum_t k3_t <= rs_upper
  seq_mean_k1,  ///< log(rs_lower) <= mean_t k1_t <= log(rs_upper): the geometric-mean ratio (verl's Geo-RS)
  seq_mean_k2,  ///< mean_t k2_t <= rs_upper
  seq_mean_k3,  ///< mean_t k3_t <= rs_upper (verl's K3-RS preset)
  seq_max_k2,   ///< max_t k2_t <= rs_upper
  seq_max_k3,   ///< max_t k3_t <= rs_upper
};

/// @brief Options of rollout_is_weights(). Defaults are the parameter defaults of verl's
/// compute_rollout_correction_weights (rollout_is = "token", rollout_is_threshold = 2.0,
/// rollout_is_batch_normalize = False), with SAFETY_BOUND = 20 and no rejection sampling. verl's
/// configs default otherwise: the RolloutCorrectionConfig dataclass has rollout_is = "sequence"
/// (verl/trainer/config/algorithm.py, 1dda039) and the trainer's algorithm/rollout_correction.yaml
/// rollout_is = null (off), both with threshold 2.0, no batch normalization and rollout_rs = null.
///
/// TRL GRPOConfig in these terms: vllm_importance_sampling_mode "<level>_<bound>", upper =
/// vllm_importance_sampling_clip_max (default 3; None = +inf), lower =
/// vllm_importance_sampling_clip_min (default None = 0), log_ratio_clamp = std::nullopt (TRL
/// exponentiates unclamped).
///
/// OpenRLHF PolicyLoss in these terms (openrlhf/models/loss.py, PolicyLoss.forward, 3c3be623;
/// policy_loss_type "ppo" with enable_vllm_is_correction; [low, high] =
/// vllm_is_truncated_threshold, CLI --algo.advantage.is_correction_threshold, default 0.5 5.0).
/// OpenRLHF exponentiates d = old_log_probs - rollout_log_probs unclamped: log_ratio_clamp =
/// std::nullopt in all three vllm_is_correction_type values.
/// - "tis": level token, bound truncate, lower = low, upper = high
///   (`torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold)`).
/// - "icepop": level token, bound mask, lower = low, upper = high (`vllm_is * mask` with
///   `mask = (vllm_is >= low_threshold) & (vllm_is <= high_threshold)`).
/// - "seq-mask-tis": level token, bound truncate, lower = 0, upper = +inf (the token weight
///   exp(d_t) is not truncated, despite the code's comment), rs = seq_mean_k1, rs_lower =
///   1 / high, rs_upper = 1 / low (+inf for low = 0). OpenRLHF keeps a row when low <=
///   exp(masked_mean(d)) <= high, both inclusive; k1 = -d, so the test here is log(1 / high) <=
///   -mean_t d_t <= log(1 / low): the same band compared in log space, which can differ only for
///   a geometric-mean ratio within rounding of a bound. high = +inf: rs_lower =
///   std::numeric_limits<double>::denorm_min() (log = -744.4), which rejects only rows whose
///   weights overflow double anyway. An empty row (OpenRLHF: 0 / 0 = NaN, failing both
///   comparisons) has no token to weight here either.
/// OpenRLHF's vllm_kl is RolloutIsMetrics::rollout_kl. Its loss keeps the original action_mask
/// in the divisor, unlike verl: see the recipe at rollout_is_weights.
struct RolloutIsOptions {
  RolloutIsLevel level = RolloutIsLevel::token;
  RolloutIsBound bound = RolloutIsBound::truncate;
  /// > 0, +inf allowed (TRL clip_max = None): the upper bound of rho (verl rollout_is_threshold,
  /// or the upper of its "lower_upper" form; TRL vllm_importance_sampling_clip_max)
  double upper = 2.0;
  /// finite, >= 0 and <= upper; 0 = no lower bound (rho >= 0 always). verl: the lower of a
  /// "lower_upper" threshold, which verl allows for IcePop (mask) only; TRL clip_min.
  double lower = 0.0;
  /// d (token) or sum_t d (sequence) is clamped to [-c, c] before exp, and the rejection
  /// statistics use the clamped token d (verl SAFETY_BOUND = 20, in both). > 0 when set;
  /// std::nullopt: no clamp (TRL), exp in double then overflows only beyond d = 709.
  std::optional<double> log_ratio_clamp = 20.0;
  /// verl rollout_is_batch_normalize: divide the weights by their mean over this call (token
  /// level: over valid tokens; sequence level: over the non-empty rows' mean weights) when that
  /// mean is > 1e-8; before rejection sampling, as verl. Local to the call: verl uses the
  /// data-parallel mean when torch.distributed is initialized.
  bool batch_normalize = false;
  RolloutRs rs = RolloutRs::none;  ///< verl rollout_rs (one option)
  /// verl rollout_rs_threshold: must be set when rs != none, > 0. k1 options: the upper ratio
  /// bound (compared in log space); k2/k3: the upper bound of the statistic.
  std::optional<double> rs_upper = std::nullopt;
  /// k1 options only (verl's "lower_upper" form): > 0 and <= rs_upper; unset: 1 / rs_upper, as
  /// verl's _parse_rollout_rs_thresholds. Setting it for a k2/k3 option is an option_error
  /// (verl rejects '_' there).
  std::optional<double> rs_lower = std::nullopt;
};

/// @brief Metrics of rollout_is_weights, in double. Means are over valid tokens (mask != 0),
/// token-weighted at sequence level too, and 0 when there is none.
struct RolloutIsMetrics {
  /// mean / max / min of weights_out: what enters the loss (verl rollout_is_mean / _max / _min
  /// when rs = none and batch_normalize is off; TRL sampling/importance_sampling_ratio/mean /
  /// max / min at token level; TRL takes them over rows at sequence level)
  double weight_mean = 0;
  double weight_max = 0;
  double weight_min = 0;
  /// mean / max of rho before the bounds (after log_ratio_clamp); level none: the token ratio
  double ratio_mean = 0;
  double ratio_max = 0;
  /// share of valid tokens with rho outside [lower, upper], clamped (truncate) or zeroed (mask);
  /// verl rollout_is_oob_ratio (IcePop) and, at token level, rollout_is_ratio_fraction_high +
  /// _low when lower is set; 0 at level none
  double truncated_fraction = 0;
  /// share of valid tokens whose weight the call sets to 0: rho outside the band under mask, or
  /// rejected by rs
  double masked_fraction = 0;
  double rs_masked_fraction = 0;      ///< share of valid tokens rejected by rs (verl rollout_rs_masked_fraction)
  double rs_seq_masked_fraction = 0;  ///< share of all rows with a rejected token (verl rollout_rs_seq_masked_fraction)
  double batch_norm_factor = 1;  ///< the divisor of batch_normalize (verl rollout_is_batch_norm_factor); 1 when off
  double valid_tokens = 0;       ///< tokens with mask != 0
  /// valid tokens not rejected by rs: the token count of verl's modified response_mask, i.e.
  /// PpoOptions::token_count for verl's token-mean (see rollout_is_weights)
  double kept_tokens = 0;
  /// rows with a kept token: verl agg_loss's seq-mean divisor, i.e. PpoOptions::sequence_count
  double kept_rows = 0;
  /// mean of rollout_logp - old_logp (= -d_t, unclamped): OpenRLHF's vllm_kl (PolicyLoss.forward,
  /// `masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)`; NaN there when no
  /// token is valid) and verl's rollout_corr/kl (compute_offpolicy_metrics, which divides by the
  /// count + 1e-8)
  double rollout_kl = 0;
};

namespace detail {

/// The checked options of one call, as the loops use them.
struct RolloutPlan {
  double lo = 0, hi = 0, clamp = 0;
  int stat = 0;  // rejection statistic k1 / k2 / k3 (0: no rejection)
  enum Agg { tok, sum, mean, max } agg = tok;
  double rs_lo = 0, rs_hi = 0;  // k1: log bounds; k2/k3: rs_hi only
};

inline bool valid_rollout_rs(RolloutRs r) noexcept {
  return static_cast<int>(r) >= static_cast<int>(RolloutRs::none) &&
         static_cast<int>(r) <= static_cast<int>(RolloutRs::seq_max_k3);
}

inline RolloutPlan rollout_plan(const char* fn, const RolloutIsOptions& o) {
  require_enum(
      o.level == RolloutIsLevel::none || o.level == RolloutIsLevel::token || o.level == RolloutIsLevel::sequence, fn,
      "level", static_cast<int>(o.level));
  require_enum(o.bound == RolloutIsBound::truncate || o.bound == RolloutIsBound::mask, fn, "bound",
               static_cast<int>(o.bound));
  require_enum(valid_rollout_rs(o.rs), fn, "rs", static_cast<int>(o.rs));
  require_option(o.upper > 0, fn, "upper", "> 0 (+inf: no upper bound)", o.upper);
  require_option(o.lower >= 0 && std::isfinite(o.lower), fn, "lower", "finite and >= 0 (0: no lower bound)", o.lower);
  if (!(o.lower <= o.upper))
    throw option_error(std::string(fn) + ": option 'lower' must be <= upper (" + fmt(o.upper) + "), got " +
                       fmt(o.lower));
  if (o.log_ratio_clamp)
    require_option(*o.log_ratio_clamp > 0, fn, "log_ratio_clamp", "> 0 when set", *o.log_ratio_clamp);
  RolloutPlan p;
  p.lo = o.lower;
  p.hi = o.upper;
  p.clamp = o.log_ratio_clamp ? *o.log_ratio_clamp : HUGE_VAL;
  if (o.rs == RolloutRs::none) {
    if (o.rs_upper || o.rs_lower)
      throw option_error(std::string(fn) + ": option '" + (o.rs_upper ? "rs_upper" : "rs_lower") +
                         "' is set but rs is none (set rs or leave the thresholds unset)");
    return p;
  }
  if (!o.rs_upper)
    throw option_error(std::string(fn) + ": option 'rs_upper' must be set when rs is " +
                       std::to_string(static_cast<int>(o.rs)) + " (verl requires rollout_rs_threshold)");
  require_option(*o.rs_upper > 0, fn, "rs_upper", "> 0", *o.rs_upper);
  const int k = static_cast<int>(o.rs) - 1;  // token_k1 .. seq_mean_k3 come in threes, then seq_max_k2, _k3
  p.agg = k < 9 ? static_cast<RolloutPlan::Agg>(k / 3) : RolloutPlan::max;
  p.stat = k < 9 ? k % 3 + 1 : k - 7;
  if (p.stat == 1) {
    const double lo = o.rs_lower ? *o.rs_lower : 1.0 / *o.rs_upper;
    if (o.rs_lower) require_option(lo > 0, fn, "rs_lower", "> 0", lo);
    if (!(lo <= *o.rs_upper))
      throw option_error(std::string(fn) + ": option 'rs_lower' must be <= rs_upper (" + fmt(*o.rs_upper) + "), got " +
                         fmt(lo));
    p.rs_lo = std::log(lo);
    p.rs_hi = std::log(*o.rs_upper);
  } else {
    if (o.rs_lower)
      throw option_error(std::string(fn) + ": option 'rs_lower' is set (" + fmt(*o.rs_lower) +
                         ") but only the k1 rejection options have a lower bound");
    p.rs_hi = *o.rs_upper;
  }
  return p;
}

/// The rejection statistic of one clamped token log-ratio x.
inline double rs_stat(int k, double x) noexcept {
  return k == 1 ? -x : k == 2 ? 0.5 * (x * x) : (std::exp(x) - 1.0) - x;
}

inline bool rs_pass(const RolloutPlan& p, double s) noexcept {
  return p.stat == 1 ? (s >= p.rs_lo && s <= p.rs_hi) : s <= p.rs_hi;
}

struct NoKeep {};

template <class OL, class RL, class MK, class WO, class KO>
RolloutIsMetrics rollout_is_impl(const OL& old_logp, const RL& rollout_logp, const MK& mask,
                                 const RolloutIsOptions& opt, WO&& weights_out, KO* keep_out) {
  constexpr const char* fn = "rollout_is_weights";
  using OT = tensor_scalar_t<OL>;
  using RT = tensor_scalar_t<RL>;
  using M = tensor_scalar_t<MK>;
  using WT = tensor_scalar_t<WO>;
  static_assert(is_real_v<OT> && is_real_v<RT>, "prefloss: rollout_is_weights takes float or double log-probs");
  static_assert(is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(is_real_v<WT>, "prefloss: weights_out must be a float or double tensor");
  constexpr bool has_keep = !std::is_same_v<KO, NoKeep>;

  const RolloutPlan p = rollout_plan(fn, opt);
  const auto old = matrix_view(old_logp, fn, "old_logp");
  const auto roll = matrix_view(rollout_logp, fn, "rollout_logp");
  const auto mk = matrix_view(mask, fn, "mask");
  require_same_shape(fn, "rollout_logp", roll, "old_logp", old);
  require_same_shape(fn, "mask", mk, "old_logp", old);
  require_weights<double>(mk, fn, "mask");
  const RowLayout L = old.layout();
  const auto out = matrix_out(weights_out, L, fn, "weights_out");
  if constexpr (has_keep) {
    static_assert(is_mask_v<tensor_scalar_t<KO>>, "prefloss: keep_out must be a bool, uint8_t, float or double tensor");
    (void)matrix_out(*keep_out, L, fn, "keep_out");
    require_disjoint(fn, "weights_out", weights_out, "keep_out", *keep_out);
  }
  require_finite_at_valid(old, mk, fn, "old_logp");
  require_finite_at_valid(roll, mk, fn, "rollout_logp");

  // Everything is computed into double buffers first: batch normalization needs the whole
  // call's weights, and an output that aliases an input must not be read after it is written.
  const Index n_all = L.count();
  std::vector<double> w(static_cast<std::size_t>(n_all), 0.0), rho(static_cast<std::size_t>(n_all), 0.0);
  std::vector<unsigned char> keep(static_cast<std::size_t>(n_all), 0), oob(static_cast<std::size_t>(n_all), 0);
  const auto clampd = [&](double d) { return std::fmin(std::fmax(d, -p.clamp), p.clamp); };
  const bool weighted = opt.level != RolloutIsLevel::none;
  RolloutIsMetrics m;
  double sum_row_means = 0;  // sequence-level batch normalization
  double rows_nonempty = 0;
  double rs_rows = 0;
  double sum_d = 0;  // rollout_kl
  for (Index i = 0; i < L.rows; ++i) {
    const Index b = L.begin(i), len = L.len(i);
    const auto valid = [&](Index t) { return mk.data[b + t] != M(0); };
    const auto dlog = [&](Index t) {
      return static_cast<double>(old.data[b + t]) - static_cast<double>(roll.data[b + t]);
    };
    // Row pass: the sequence log-ratio (unclamped sum, clamped once, as verl's masked_sum then
    // clamp) and the sequence rejection statistic.
    double n = 0, s = 0, st_sum = 0, st_max = -HUGE_VAL;
    for (Index t = 0; t < len; ++t) {
      if (!valid(t)) continue;
      const double d = dlog(t);
      n += 1;
      s += d;
      if (p.stat) {
        const double k = rs_stat(p.stat, clampd(d));
        st_sum += k;
        st_max = std::fmax(st_max, k);
      }
    }
    bool row_keep = true;
    if (p.stat && p.agg != RolloutPlan::tok) {
      // verl's _sequence_max of an empty row is 0; an empty row has no token to keep anyway.
      const double st = p.agg == RolloutPlan::sum    ? st_sum
                        : p.agg == RolloutPlan::mean ? (n > 0 ? st_sum / n : 0.0)
                                                     : (n > 0 ? st_max : 0.0);
      row_keep = rs_pass(p, st);
    }
    const double r_seq = std::exp(clampd(s));
    double row_w = 0;
    bool row_rejected = false, row_kept = false;
    for (Index t = 0; t < len; ++t) {
      if (!valid(t)) continue;
      const std::size_t k = static_cast<std::size_t>(b + t);
      const double d = dlog(t), dc = clampd(d);
      const double r = opt.level == RolloutIsLevel::sequence ? r_seq : std::exp(dc);
      const bool out_of_band = weighted && (r < p.lo || r > p.hi);
      double wt = 1.0;
      if (weighted)
        wt = opt.bound == RolloutIsBound::truncate ? std::fmin(std::fmax(r, p.lo), p.hi) : (out_of_band ? 0.0 : r);
      const bool kt = !p.stat || (p.agg == RolloutPlan::tok ? rs_pass(p, rs_stat(p.stat, dc)) : row_keep);
      rho[k] = r;
      w[k] = wt;
      keep[k] = kt;
      oob[k] = out_of_band;
      row_w += wt;
      row_rejected |= !kt;
      row_kept |= kt;
      m.valid_tokens += 1;
    }
    sum_d += s;
    if (n > 0) {
      sum_row_means += row_w / n;
      rows_nonempty += 1;
    }
    rs_rows += row_rejected;
    m.kept_rows += row_kept;
  }

  if (weighted && opt.batch_normalize) {
    double mean = 0;
    if (opt.level == RolloutIsLevel::token) {
      double sw = 0;
      for (Index k = 0; k < n_all; ++k) sw += w[static_cast<std::size_t>(k)];
      mean = m.valid_tokens > 0 ? sw / m.valid_tokens : 0.0;
    } else {
      mean = rows_nonempty > 0 ? sum_row_means / rows_nonempty : 0.0;
    }
    if (mean > 1e-8) {  // verl's guard
      for (double& x : w) x /= mean;
      m.batch_norm_factor = mean;
    }
  }

  double sum_w = 0, sum_r = 0, n_oob = 0, n_zeroed = 0, n_rejected = 0;
  double w_max = -HUGE_VAL, w_min = HUGE_VAL, r_max = -HUGE_VAL;
  WT* const wo = out.data;
  for (Index k = 0; k < n_all; ++k) {
    const std::size_t u = static_cast<std::size_t>(k);
    const double v = keep[u] ? w[u] : 0.0;
    wo[k] = static_cast<WT>(v);
    if (mk.data[k] == M(0)) continue;
    sum_w += v;
    sum_r += rho[u];
    w_max = std::fmax(w_max, v);
    w_min = std::fmin(w_min, v);
    r_max = std::fmax(r_max, rho[u]);
    n_oob += oob[u];
    n_rejected += !keep[u];
    n_zeroed += !keep[u] || (oob[u] && opt.bound == RolloutIsBound::mask);
  }
  if constexpr (has_keep) {
    using KT = tensor_scalar_t<KO>;
    KT* const ko = matrix_out(*keep_out, L, fn, "keep_out").data;  // checked above: cannot throw
    for (Index k = 0; k < n_all; ++k) ko[k] = static_cast<KT>(keep[static_cast<std::size_t>(k)] ? 1 : 0);
  }
  const double nv = m.valid_tokens;
  if (nv > 0) {
    m.weight_mean = sum_w / nv;
    m.weight_max = w_max;
    m.weight_min = w_min;
    m.ratio_mean = sum_r / nv;
    m.ratio_max = r_max;
    m.truncated_fraction = n_oob / nv;
    m.masked_fraction = n_zeroed / nv;
    m.rs_masked_fraction = n_rejected / nv;
    m.rollout_kl = -sum_d / nv;
  }
  m.kept_tokens = nv - n_rejected;
  m.rs_seq_masked_fraction = L.rows > 0 ? rs_rows / static_cast<double>(L.rows) : 0.0;
  return m;
}

}  // namespace detail

/// @brief Per-token rollout correction weights from the trainer's and the rollout engine's
/// log-probs, written to weights_out (a constant: no gradient flows through it).
///
/// With d_t = old_logp_t - rollout_logp_t (log pi_old / pi_rollout, computed in double; both
/// anchors take this difference of the detached log-probs) and c = log_ratio_clamp:
///   level token:    rho_t = exp(clamp(d_t, -c, c))
///   level sequence: rho_t = exp(clamp(sum_{valid u} d_u, -c, c)) for every token t of the row
///   bound truncate: w_t = clamp(rho_t, lower, upper)                       (TIS)
///   bound mask:     w_t = rho_t if lower <= rho_t <= upper, else 0         (MIS / IcePop)
///   level none:     w_t = 1
///   batch_normalize: w_t /= mean(w) (see RolloutIsOptions::batch_normalize)
///   rs != none:     w_t = 0 where verl's rejection rejects token t or its row (RolloutRs)
///   weights_out[i,t] = w_t at valid tokens, 0 at masked-out ones.
///
/// Anchors: verl rollout_corr_helper.py at 1dda039 (compute_rollout_correction_and_rejection_mask,
/// which computes log_ratio = old_log_prob - rollout_log_prob, then compute_rollout_correction_weights
/// and compute_rollout_rejection_mask), with docs/algo/rollout_corr.md; TRL grpo_trainer.py at
/// f2cd577 (GRPOTrainer._generate_and_score_completions, vllm_importance_sampling_ratio, applied
/// in _compute_loss as `per_token_loss * inputs["importance_sampling_ratio"]`). Where they differ:
/// - overflow: verl clamps d_t (token) or the unclamped row sum (sequence) to +-20 (SAFETY_BOUND)
///   before exp, so a ratio never exceeds e^20 ~ 4.9e8; TRL clamps nothing and its float32 exp
///   overflows to inf beyond d = 88 (then clamped to clip_max or masked). log_ratio_clamp = 20 is
///   verl, std::nullopt is TRL in double (inf only beyond 709; comparisons against the bounds
///   are unaffected by an inf, and truncate maps it to upper).
/// - lower bound: verl's TIS has none (lower = 0); TRL clamps from below with clip_min too.
/// - sequence level uses the sum of log-ratios in both (no length normalisation); the geometric
///   mean appears only in verl's seq_mean_k1 rejection.
/// - verl's k1 rejection bounds -x = log(pi_rollout / pi_old) by log(rs_lower)..log(rs_upper),
///   so "0.6_1.4" keeps ratios rho in [1/1.4, 1/0.6]; this reproduces the code, which for the
///   default symmetric bounds (rs_lower = 1 / rs_upper) is the same band as bounding rho.
/// - verl's masked_mean divides by count + 1e-8 (in seq_mean_* statistics and batch
///   normalization); here by the count, a relative difference of 1e-8 / count.
/// - verl multiplies padding by the mask (NaN * 0 = NaN would leak in torch; verl_F.masked_sum
///   selects first); here masked-out tokens are never read for a value: they may hold NaN / inf.
/// - a float mask only selects (nonzero = valid) here; it does not weight the sequence sums.
/// - verl raises on a batch without a valid token; here the weights are 0 and the metrics 0.
/// - OpenRLHF (loss.py at 3c3be623, PolicyLoss.forward's enable_vllm_is_correction block, then
///   `loss = vllm_is * loss` and aggregate_loss; the option mapping is at RolloutIsOptions)
///   computes in the log-probs' dtype: float32 exp(d) is inf beyond d = 88.7, and IcePop's
///   `vllm_is * mask` then gives inf * 0 = NaN; here (double) such a token's weight is 0 under
///   mask, upper under truncate. Its masked_mean multiplies by the mask, so NaN padding leaks.
///
/// Applying the weights with ppo_clip so that the loss equals verl's
/// `pg_losses = pg_losses * rollout_is_weights; agg_loss(pg_losses, response_mask)`
/// (core_algos.compute_policy_loss_vanilla), where response_mask is verl's modified mask after
/// rejection sampling: prefloss's float mask is a weight that also enters the divisors, so pass
/// weights_out as ppo_clip's float mask AND give the divisors of the 0/1 mask explicitly:
/// - token_mean: PpoOptions::token_count = metrics.kept_tokens (when it is > 0; verl divides by
///   the modified mask's token count, also over tokens whose IcePop weight is 0);
/// - seq_mean_token_mean: PpoOptions::row_weights = the per-row kept-token counts
///   (row_weights(keep_out) from reduce/counts.hpp) and sequence_count = metrics.kept_rows (verl
///   averages over the rows with a valid token; verl's 1e-8 in a row's divisor is left out);
/// - seq_mean_token_sum: sequence_count = metrics.kept_rows; seq_mean_token_sum_norm:
///   sequence_count as well (C defaults to the padded length, as verl's).
/// Set PpoOptions::dual_clip = 3 for verl's always-on clip_ratio_c. For a batch split over
/// ranks, all-reduce kept_tokens / the row counts as for any global normalizer.
///
/// OpenRLHF's loss, `loss = vllm_is * loss; aggregate_loss(loss, action_mask, ...)`, divides by
/// the ORIGINAL action_mask: a token whose weight is 0 (IcePop, or a row seq-mask-tis rejects)
/// still counts. Pass weights_out as ppo_clip's float mask with
/// - token_level_loss = True (Aggregation::token_mean): PpoOptions::token_count =
///   metrics.valid_tokens (when > 0), not kept_tokens; with batch_num_tokens and dp_size:
///   token_count = batch_num_tokens / dp_size;
/// - token_level_loss = False (seq_mean_token_mean): row_weights = row_weights(mask) of the
///   original mask and sequence_count = token_counts(mask).nonempty_rows (reduce/counts.hpp;
///   OpenRLHF averages over the rows with a valid token), or global_batch_size / dp_size;
///   OpenRLHF's 1e-8 in a row's divisor is left out.
/// and clip_low / clip_high = clip_eps_low / clip_eps_high, dual_clip = OpenRLHF's dual_clip (0
/// for None), log_ratio_clamp = 20 (OpenRLHF clamps the policy log-ratio at +-20 too).
/// ppo_clip's metrics are then weighted by the weights; OpenRLHF's clip_ratio is over
/// action_mask (call ppo_clip with the 0/1 mask for it).
///
/// @param old_logp, rollout_logp row-major [batch, tokens] Eigen tensors or maps of float or
/// double (each its own), or both pl::packed(values, cu_seqlens) with the same offsets
/// @param mask same shape: bool, uint8_t, float or double (nonzero selects; float weights must
/// be finite and >= 0)
/// @param weights_out [batch, tokens] float or double tensor or map (packed: rank-1
/// [total_tokens] or pl::packed), fully overwritten; it may be one of the inputs
/// @return RolloutIsMetrics
/// @throws shape_error naming the argument; option_error for upper <= 0 or NaN, lower < 0,
/// non-finite or > upper, log_ratio_clamp <= 0, an unknown enum, rs set without rs_upper or
/// rs_upper <= 0, rs_lower <= 0 or > rs_upper or set for a k2/k3 option, thresholds set with
/// rs = none; value_error for a non-finite old_logp or rollout_logp at a valid token (naming
/// the argument and [row, token]) or a bad float mask weight; layout_error for misaligned or
/// overlapping outputs. Nothing is written on error.
template <class OL, class RL, class MK, class WO>
RolloutIsMetrics rollout_is_weights(const OL& old_logp, const RL& rollout_logp, const MK& mask,
                                    const RolloutIsOptions& opt, WO&& weights_out) {
  return detail::rollout_is_impl(old_logp, rollout_logp, mask, opt, std::forward<WO>(weights_out),
                                 static_cast<detail::NoKeep*>(nullptr));
}

/// @brief rollout_is_weights that also writes keep_out[i,t] = 1 at valid tokens that rejection
/// sampling keeps, else 0: verl's modified response_mask (the mask for the value loss, entropy
/// and the loss divisors; its row_weights are the seq_mean_token_mean divisors above).
/// keep_out: bool, uint8_t, float or double, the shape of weights_out, not overlapping it.
template <class OL, class RL, class MK, class WO, class KO>
RolloutIsMetrics rollout_is_weights(const OL& old_logp, const RL& rollout_logp, const MK& mask,
                                    const RolloutIsOptions& opt, WO&& weights_out, KO&& keep_out) {
  using K = detail::remove_cvref_t<KO>;
  return detail::rollout_is_impl(old_logp, rollout_logp, mask, opt, std::forward<WO>(weights_out),
                                 static_cast<K*>(&keep_out));
}

}  // namespace prefloss
