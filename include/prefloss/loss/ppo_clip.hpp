/// @file loss/ppo_clip.hpp
/// PPO's clipped surrogate policy loss (Schulman et al. 2017) at token level, with asymmetric
/// clip ranges (DAPO's clip-higher), dual clip (Ye et al. 2020, verl's clip_ratio_c), an optional
/// KL penalty against a reference policy, and verl's loss aggregation modes. Forward, backward,
/// or both in one streaming pass.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/aggregation.hpp"
#include "../rl/kl.hpp"
#include "token_loss.hpp"

namespace prefloss {

/// @brief Whose log-ratio a token's importance ratio is (TRL's importance_sampling_level).
enum class ImportanceLevel {
  token,     ///< r_t = exp(logp_t - old_logp_t) (PPO, GRPO, DAPO)
  sequence,  ///< GSPO: r_t = exp(s_i), s_i the row's mask-weighted mean of logp - old_logp
};

/// @brief Options of ppo_clip(). Defaults are verl's (compute_policy_loss_vanilla, agg_loss,
/// kl_penalty), except dual clip, which verl always applies with clip_ratio_c = 3 and which is
/// off here unless dual_clip > 1.
struct PpoOptions {
  double clip_low = 0.2;   ///< in [0, 1]: eps_low, ratios below 1 - eps_low are clipped (verl clip_ratio_low); 1: off
  double clip_high = 0.2;  ///< >= 0: eps_high, ratios above 1 + eps_high are clipped (verl clip_ratio_high)
  /// 0 = off; > 1 and finite: c, the loss of A < 0 tokens is capped at -A c (verl clip_ratio_c)
  double dual_clip = 0.0;
  Aggregation aggregation = Aggregation::token_mean;
  double kl_coef = 0.0;  ///< >= 0: weight of the per-token KL penalty (needs ref_logp when > 0)
  KlEstimator kl_estimator = KlEstimator::k3;
  /// The KL term times the importance ratio, k r, r differentiated as well (DeepSeek-V3.2's
  /// unbiased KL estimate; TRL GRPOConfig.use_bias_correction_kl). kl_mean then reports k r.
  bool bias_corrected_kl = false;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS; token_count is the valid-token count summed over ranks).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// verl clamps logp - old_logp to [-c, c] before exp (c = 20); the clamped value also feeds
  /// approx_kl and the gradient is 0 beyond the clamp. std::nullopt: no clamp.
  std::optional<double> log_ratio_clamp = 20.0;
  /// token (default) or sequence (GSPO): see ppo_clip.
  ImportanceLevel importance_level = ImportanceLevel::token;
  /// INTELLECT-2's cap on the unclipped branch (TRL GRPOConfig.delta): -A min(r, delta) in place
  /// of -A r; the gradient is 0 where r > delta. > 0 and finite; std::nullopt (default): off.
  std::optional<double> delta = std::nullopt;
  /// k3_log_ratio_clamp, k3_clamp: the KL term's guards (see PREFLOSS_K3_CLAMPS; verl: 20, 10).
  PREFLOSS_K3_CLAMPS;
  /// Threads the call (and its result's backward()) may split rows over; the same bits for any
  /// count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

/// @brief Metrics of ppo_clip (verl's actor/pg_clipfrac, pg_clipfrac_lower, ppo_kl, ...). All
/// means are over valid tokens, weighted by the mask (verl_F.masked_mean), and 0 when the batch
/// has no valid token.
template <class S>
struct PpoMetrics {
  S clip_fraction = 0;      ///< share of tokens whose clipped branch is strictly larger (verl pg_clipfrac)
  S clip_fraction_low = 0;  ///< share of tokens with A < 0 capped by dual clip (verl pg_clipfrac_lower); 0 when off
  /// mean of old_logp - logp, after log_ratio_clamp at token level, per token and unclamped at
  /// sequence level (verl ppo_kl, in compute_policy_loss_vanilla and _gspo)
  S approx_kl = 0;
  S ratio_mean = 0;  ///< mean of the ratio r (exp(logp - old_logp), or GSPO's sequence ratio)
  S ratio_max = 0;   ///< max of r over valid tokens (0 when none)
  S kl_mean = 0;     ///< mean of the KL estimate, times r with bias_corrected_kl (with ref_logp, else 0)
  /// sum of the mask weights (valid tokens), in double: exact for byte-mask counts up to 2^53,
  /// where float stops at 2^24; all-reduce it for token_count
  double token_weight = 0;
};

/// @brief Entries of MetricSums<PpoMetrics<S>>: six sums and one maximum, each sum weighted by
/// the mask as the means are. The means divide by `weight`, this call's (or the merged calls')
/// own mask weight, not by PpoOptions::token_count.
struct PpoMetricEntries {
  static constexpr std::size_t weight = 0;       ///< sums: mask weight of the valid tokens (token_weight)
  static constexpr std::size_t clipped = 1;      ///< sums: tokens whose clipped branch is strictly larger
  static constexpr std::size_t clipped_low = 2;  ///< sums: A < 0 tokens capped by dual clip
  static constexpr std::size_t approx_kl = 3;    ///< sums: old_logp - logp (see PpoMetrics::approx_kl)
  static constexpr std::size_t ratio = 4;        ///< sums: r
  static constexpr std::size_t kl = 5;           ///< sums: the KL estimate (0 without ref_logp)
  static constexpr std::size_t n_sums = 6;
  static constexpr std::size_t ratio_max = 0;  ///< maxima: r over valid tokens (-inf: none)
  static constexpr std::size_t n_maxima = 1;
};

namespace detail {
template <class S>
struct metric_layout<PpoMetrics<S>> {
  using Entries = PpoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static PpoMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    PpoMetrics<S> m;
    m.clip_fraction = static_cast<S>(mean_or_zero(sums[E::clipped], w));
    m.clip_fraction_low = static_cast<S>(mean_or_zero(sums[E::clipped_low], w));
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.ratio_mean = static_cast<S>(mean_or_zero(sums[E::ratio], w));
    m.ratio_max = static_cast<S>(w != 0 ? maxima[E::ratio_max] : 0.0);
    m.kl_mean = static_cast<S>(mean_or_zero(sums[E::kl], w));
    m.token_weight = w;
    return m;
  }
};

/// The per-token PPO loss l and d l / d logp, with torch autograd's conventions for verl's
/// formula: torch.clamp passes the gradient on [lo, hi] inclusive; torch.maximum/minimum split it
/// equally between tied arguments. AddKl (kl_coef != 0) is a template argument on purpose: GCC 12
/// at -O3 if-converts a runtime `if (bool)` around lane arithmetic into an AVX-512 masked add
/// whose mask is the bool's byte (lane 0 only), so no runtime bool guards lane math here; the
/// importance level is a lane select on a constant instead (one blend a batch), so it doubles no
/// kernel.
///
/// Sequence level is the per-row hook (token_kernels.hpp): the row pass sums logp - old_logp,
/// and the row's kernel holds s = sum / max(W, 1) in every lane of its log-ratio. A token's
/// ratio is then verl's sg[exp(s)] exp(logp_t - sg[logp_t]): the value exp(s), d r_t / d logp_t =
/// r_t, as at token level.
template <class S, bool HasRef, KlEstimator K, bool AddKl>
struct PpoKernel {
  static constexpr std::size_t n_in = HasRef ? 4 : 3;    // logp, old_logp, advantages[, ref_logp]
  static constexpr std::size_t n_sums = HasRef ? 5 : 4;  // clipped, dual-clipped, old - logp, ratio[, kl]
  static constexpr bool has_max = true;                  // ratio
  static constexpr bool row_pass = true;                 // GSPO's sequence ratio, when seq != 0

  S lo, hi;      // 1 - eps_low, 1 + eps_high
  S c;           // dual clip constant (unused when !dual)
  S clamp;       // log-ratio clamp (+inf: off)
  S dual_below;  // 0 with dual clip, -inf without
  S kl_coef;
  S delta;            // cap of the unclipped ratio (+inf: off)
  S seq = 0;          // 1: sequence level, the log-ratio is row_log_ratio
  S kl_weighted = 0;  // 1: the KL term is k r (bias_corrected_kl)
  S row_log_ratio = 0;
  KlParams<S> kl;

  static constexpr std::size_t row_terms = 1;  // sum_t w (logp - old_logp)

  bool needs_row_pass() const noexcept { return seq != S(0); }
  std::array<batch<S>, 1> row_term(const batch<S>* x) const noexcept { return {x[0] - x[1]}; }
  PpoKernel for_row(const std::array<double, 1>& sum, double weight) const noexcept {
    PpoKernel k = *this;
    k.row_log_ratio = static_cast<S>(sum[0] / (weight > 1 ? weight : 1.0));  // verl / TRL: mask.sum().clamp(min=1)
    return k;
  }

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1)), half(S(0.5));
    const B lp = x[0], A = x[2];
    const B dt = lp - x[1];
    const auto at_seq = B(seq) != zero;
    const B d = xsimd::select(at_seq, B(row_log_ratio), dt);
    const B dc = xsimd::min(xsimd::max(d, B(-clamp)), B(clamp));
    const B r = exp_ratio(dc);
    const B na = -A;
    const auto capped = r > B(delta);                      // false for NaN: the NaN stays in the loss
    const B l1 = na * xsimd::select(capped, B(delta), r);  // -A min(r, delta)
    const B rc = xsimd::min(xsimd::max(r, B(lo)), B(hi));
    const B l2 = na * rc;  // -A clip(r, lo, hi)
    const B m = xsimd::max(l1, l2);
    // A < 0 with dual clip on; dual_below = -inf when off (no lane is below it, NaN included).
    const auto neg = A < B(dual_below);
    const B l3 = na * B(c);  // -A c
    B loss = xsimd::select(neg, xsimd::min(l3, m), m);
    B grad = zero;
    if constexpr (Bwd) {
      // d r / d logp = r where the log-ratio clamp passes (torch.clamp is inclusive); l1 adds
      // the delta cap's gate, l2 the ratio clamp's.
      const B gr = xsimd::select((d >= B(-clamp)) & (d <= B(clamp)), na * r, zero);
      const B g1 = xsimd::select(capped, zero, gr);
      const B g2 = xsimd::select((r >= B(lo)) & (r <= B(hi)), gr, zero);
      const B gm = xsimd::select(l1 > l2, g1, xsimd::select(l1 < l2, g2, half * (g1 + g2)));
      grad = xsimd::select(neg, xsimd::select(m < l3, gm, xsimd::select(m == l3, half * gm, zero)), gm);
    }
    if constexpr (HasRef) {
      const auto k = kl_token<K, S>(lp, x[3], kl);
      // Bias-corrected: k r, with r differentiated too (d r / d logp = r inside the log-ratio clamp).
      const auto weighted = B(kl_weighted) != zero;
      const B kv = xsimd::select(weighted, k.value * r, k.value);
      if constexpr (AddKl) {
        loss = loss + B(kl_coef) * kv;
        if constexpr (Bwd) {
          const B dr = xsimd::select((d >= B(-clamp)) & (d <= B(clamp)), r, zero);
          grad = grad + B(kl_coef) * xsimd::select(weighted, k.grad * r + k.value * dr, k.grad);
        }
      }
      if constexpr (Fwd) o.sums[4] = kv;
    }
    if constexpr (Fwd) {
      o.loss = loss;
      o.sums[0] = xsimd::select(l2 > l1, one, zero);
      o.sums[1] = xsimd::select(neg & (m > l3), one, zero);
      o.sums[2] = -xsimd::select(at_seq, dt, dc);
      o.sums[3] = r;
      o.max = r;
    }
    o.grad = grad;
  }
};

template <class S>
struct PpoParams {
  S lo, hi, c, clamp, kl_coef, delta;
  bool dual, seq, kl_weighted;
  KlEstimator estimator;
  KlParams<S> kl;

  /// HasRef (std::bool_constant): whether the call has ref_logp. Without it only the one kernel
  /// with no KL term is instantiated.
  template <class HasRef, class F>
  void visit(F&& f) const {
    const auto make = [&](auto with_ref, auto est, auto add_kl) {
      PpoKernel<S, decltype(with_ref)::value, decltype(est)::value, decltype(add_kl)::value> k;
      k.lo = lo;
      k.hi = hi;
      k.c = c;
      k.clamp = clamp;
      k.dual_below = dual ? S(0) : -std::numeric_limits<S>::infinity();
      k.kl_coef = kl_coef;
      k.delta = delta;
      k.seq = seq ? S(1) : S(0);
      k.kl_weighted = kl_weighted ? S(1) : S(0);
      k.kl = kl;
      f(k);
    };
    if constexpr (!HasRef::value) {
      make(std::false_type{}, std::integral_constant<KlEstimator, KlEstimator::k3>{}, std::false_type{});
    } else if (kl_coef != 0) {
      with_kl_estimator(estimator, [&](auto est) { make(std::true_type{}, est, std::true_type{}); });
    } else {
      with_kl_estimator(estimator, [&](auto est) { make(std::true_type{}, est, std::false_type{}); });
    }
  }
};

}  // namespace detail

/// Result of ppo_clip: .loss, .losses, .metrics, .backward(grad). S is the compute type (float
/// for bf16/half inputs); In the inputs type (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using PpoResult = TokenLossResult<S, M, detail::PpoParams<S>, PpoMetrics<S>, In>;

namespace detail {

/// The checked aggregation and kernel parameters of a ppo_clip call.
template <class S>
struct PpoPlan {
  AggregationSpec spec;
  PpoParams<S> params;
};

/// Validates every option and token argument of a ppo_clip call (nothing is read but the masks).
template <class S, class LT, class OT, class AT, class RT, class M>
PpoPlan<S> ppo_prepare(const Matrix<LT>& lp, const Matrix<OT>& old, const Matrix<AT>& adv, const Matrix<M>& mask,
                       const Matrix<RT>* ref, const PpoOptions& opt, const char* fn) {
  // The ratio is positive, so a lower bound 1 - clip_low below 0 never binds: clip_low = 1 turns
  // the lower clip off, and anything larger only hides a typo.
  require_option(opt.clip_low >= 0 && opt.clip_low <= 1, fn, "clip_low", "in [0, 1]", opt.clip_low);
  require_option(opt.clip_high >= 0 && std::isfinite(opt.clip_high), fn, "clip_high", ">= 0 and finite", opt.clip_high);
  require_option(
      opt.dual_clip == 0 || (opt.dual_clip > 1 && std::isfinite(opt.dual_clip) && static_cast<S>(opt.dual_clip) > S(1)),
      fn, "dual_clip", sizeof(S) == 4 ? "0 (off), or > 1 and finite, also in float" : "0 (off), or > 1 and finite",
      opt.dual_clip);
  require_option(opt.kl_coef >= 0 && std::isfinite(opt.kl_coef), fn, "kl_coef", ">= 0 and finite", opt.kl_coef);
  validate_kl<S>(fn, opt.kl_estimator, opt, "kl_estimator");
  if (opt.log_ratio_clamp) require_positive_in<S>(fn, "log_ratio_clamp", *opt.log_ratio_clamp);
  require_enum(opt.importance_level == ImportanceLevel::token || opt.importance_level == ImportanceLevel::sequence, fn,
               "importance_level", static_cast<int>(opt.importance_level));
  if (opt.delta) require_positive_in<S>(fn, "delta", *opt.delta);
  if (opt.kl_coef > 0 && ref == nullptr)
    throw option_error(std::string(fn) + ": option 'kl_coef' is " + fmt(opt.kl_coef) +
                       " but no 'ref_logp' was given (pass ref_logp or set kl_coef = 0)");
  PpoPlan<S> plan;
  plan.spec = aggregation_spec(fn, opt, lp.rows, lp.packed() ? packed_rows : lp.cols);
  validate_aggregation<S>(fn, plan.spec);

  require_same_shape(fn, "old_logp", old, "logp", lp);
  require_same_shape(fn, "advantages", adv, "logp", lp);
  require_same_shape(fn, "mask", mask, "logp", lp);
  if (ref) require_same_shape(fn, "ref_logp", *ref, "logp", lp);
  require_weights<S>(mask, fn, "mask");
  require_rows_or_globals(fn, "logp", plan.spec);

  PpoParams<S>& p = plan.params;
  p.lo = static_cast<S>(1.0 - opt.clip_low);
  p.hi = static_cast<S>(1.0 + opt.clip_high);
  p.dual = opt.dual_clip > 1;
  p.c = static_cast<S>(p.dual ? opt.dual_clip : 0.0);
  p.clamp = opt.log_ratio_clamp ? static_cast<S>(*opt.log_ratio_clamp) : std::numeric_limits<S>::infinity();
  p.kl_coef = static_cast<S>(opt.kl_coef);
  p.delta = opt.delta ? static_cast<S>(*opt.delta) : std::numeric_limits<S>::infinity();
  p.seq = opt.importance_level == ImportanceLevel::sequence;
  p.kl_weighted = opt.bias_corrected_kl;
  p.estimator = opt.kl_estimator;
  p.kl = kl_params<S>(opt);
  return plan;
}

/// Validates every argument, then runs the forward, fused with the gradient into *grad_out when
/// it is given (checked before anything is computed).
template <bool HasRef, class In, class LT, class OT, class AT, class RT, class M, class G>
PpoResult<typename In::compute_type, M, In> ppo_clip_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                          const Matrix<AT>& adv, const Matrix<M>& mask,
                                                          const Matrix<RT>* ref, const PpoOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "ppo_clip";
  const PpoPlan<S> plan = ppo_prepare<S>(lp, old, adv, mask, ref, opt, fn);
  const AggregationSpec& spec = plan.spec;
  const PpoParams<S>& p = plan.params;

  In in;
  set_input(in, 0, lp.data);
  set_input(in, 1, old.data);
  set_input(in, 2, adv.data);
  if (ref) set_input(in, 3, ref->data);
  in.mask = mask.data;
  in.rows = lp.rows;
  in.cols = lp.cols;
  in.off = lp.off;

  using Sel = std::bool_constant<HasRef>;
  PpoResult<S, M, In> result(fn, in, p, "grad", Sel{}, opt.threads);
  const TokenStats st = result.template run<Sel>(spec, grad_out);
  using E = PpoMetricEntries;
  auto& sums = result.metric_sums.sums;
  sums[E::weight] = st.weight;
  sums[E::clipped] = st.sums[0];
  sums[E::clipped_low] = st.sums[1];
  sums[E::approx_kl] = st.sums[2];
  sums[E::ratio] = st.sums[3];
  sums[E::kl] = ref ? st.sums[4] : 0.0;
  // Without a valid token the max is the kernel's -inf already: the merge identity.
  result.metric_sums.maxima[E::ratio_max] = st.max;
  result.metrics = result.metric_sums.metrics();
  return result;
}

/// The scalar type of ppo_clip's ref_logp, or logp's when there is none.
template <class RF, class LP>
struct ref_scalar {
  using type = tensor_scalar_t<RF>;
};
template <class LP>
struct ref_scalar<NoRef, LP> {
  using type = tensor_scalar_t<LP>;
};

template <class LP, class OLP, class AD, class MK, class RF = NoRef>
constexpr void ppo_static_checks() {
  using S = tensor_scalar_t<LP>;
  using R = typename ref_scalar<RF, LP>::type;
  static_assert(is_token_scalar_v<S> && is_token_scalar_v<tensor_scalar_t<OLP>> &&
                    is_token_scalar_v<tensor_scalar_t<AD>> && is_token_scalar_v<R>,
                "prefloss: log-probs and advantages must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(!std::is_void_v<typename common_token<S, tensor_scalar_t<OLP>, tensor_scalar_t<AD>, R>::type>,
                PREFLOSS_DETAIL_MIX_MESSAGE);
  static_assert(is_mask_v<tensor_scalar_t<MK>>, "prefloss: masks must be bool, uint8_t, float or double");
}

/// A tensor, map or pl::packed argument (what tells the overloads' tensors from options).
template <class T>
using if_tensor_t = std::enable_if_t<is_tensor_v<T> || is_packed_v<T>, int>;

/// Named views of ppo_clip's tensors. RF = NoRef: no reference policy; G = NoGrad: the two-pass
/// form (no gradient output), otherwise the fused one.
template <class LP, class OLP, class AD, class MK, class RF, class G>
auto ppo_clip_views(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const RF* ref_logp,
                    const PpoOptions& opt, G* grad_out) {
  constexpr const char* fn = "ppo_clip";
  constexpr bool has_ref = !std::is_same_v<RF, NoRef>;  // RF is const-qualified away by RF*
  using R = typename ref_scalar<RF, LP>::type;
  using In = token_inputs_t<tensor_scalar_t<MK>, tensor_scalar_t<LP>, tensor_scalar_t<LP>, tensor_scalar_t<OLP>,
                            tensor_scalar_t<AD>, R>;
  Matrix<R> ref{};
  if constexpr (has_ref) ref = matrix_view(*ref_logp, fn, "ref_logp");
  return ppo_clip_impl<has_ref, In>(matrix_view(logp, fn, "logp"), matrix_view(old_logp, fn, "old_logp"),
                                    matrix_view(advantages, fn, "advantages"), matrix_view(mask, fn, "mask"),
                                    has_ref ? &ref : nullptr, opt, grad_out);
}

}  // namespace detail

/// @brief PPO clipped surrogate loss over row-major [batch, tokens] tensors, or over a packed
/// batch: every token argument pl::packed(values, cu_seqlens) with the same offsets (gradient
/// outputs then rank-1 [total_tokens] or pl::packed too; seq_mean_token_sum_norm then needs
/// token_sum_norm).
///
/// Per token, with r = exp(clamp(logp - old_logp, +-log_ratio_clamp)):
///   l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));
///   delta set: the first branch is -A min(r, delta) (INTELLECT-2; TRL GRPOTrainer._compute_loss);
///   dual clip c > 1: for A < 0, l = min(l, -A c);
///   with ref_logp: l += kl_coef * k(logp, ref_logp) (KlEstimator, see kl_estimate);
///   bias_corrected_kl: l += kl_coef * r k(logp, ref_logp), d/d logp = r k' + r k (TRL
///   _compute_loss's per_token_kl * coef_1; there, at sequence level, the gradient of r goes
///   through the row's mean, here it is d r / d logp_t = r as for the policy term).
///
/// Sequence-level ratio (importance_level = sequence; GSPO, Zheng et al. 2025; verl
/// compute_policy_loss_gspo, TRL importance_sampling_level = "sequence"): every token of row i
/// takes r = exp(clamp(s_i, +-log_ratio_clamp)), s_i = sum_t w (logp - old_logp) / max(W_i, 1)
/// over the row's selected tokens (both anchors clamp the divisor at 1), with verl's
/// d r / d logp_t = r (its sg[s_i] pi_t / sg[pi_t] form, which admits token-level advantages).
/// TRL differentiates through s_i instead. With one advantage a row (GRPO's outcome advantages,
/// TRL's only kind) all tokens of a row carry one loss, and the two gradients agree wherever
/// W_i >= 1 (every non-empty row of a byte mask); for a float-mask row with W_i < 1 TRL's is
/// W_i times this one. With advantages that vary within a row they differ, and this is verl's. verl clamps s_i at 10
/// from above only and does not clamp the token log-ratio, TRL clamps neither: log_ratio_clamp = 10 matches verl
/// wherever s_i >= -10 (below, verl keeps e^s_i and its gradient where this takes e^-10 and none), std::nullopt matches
/// TRL. approx_kl stays a token mean of old_logp - logp (unclamped), as verl's GSPO reports it.
/// s_i is the mean over the row as this call sees it: a row split over shards (sequence parallelism) must be whole in
/// one call at sequence level.
///
/// TRL's GRPO loss_type names are aggregations here: grpo (and sapo) = seq_mean_token_mean;
/// bnpo = token_mean; dapo (and cispo) = token_mean with token_count = num_items_in_batch (TRL
/// divides by num_items_in_batch / num_processes because DDP averages the ranks' gradients;
/// a token_count gradient here is meant to be summed over ranks); dr_grpo =
/// seq_mean_token_sum_norm with token_sum_norm = max_completion_length; luspo =
/// seq_mean_token_sum with importance_level sequence (TRL's per_token_loss * mask.sum(1), a
/// mean over rows). TRL has no log-ratio clamp (log_ratio_clamp = std::nullopt).
///
/// The batch loss aggregates w[i,t] l[i,t] over selected tokens (mask != 0; a float mask is the
/// weight w) by opt.aggregation — see Aggregation; masked-out tokens never influence anything,
/// even when they hold inf/NaN. This is verl's compute_policy_loss_vanilla + agg_loss (+ the
/// actor's kl_loss * kl_loss_coef; verl/trainer/ppo/core_algos.py, 1dda039), with these
/// differences, each an option that preset::verl::ppo() sets: dual clip is opt-in (verl always
/// applies clip_ratio_c = 3); the seq_* modes divide by all B rows (or sequence_count), where
/// verl's agg_loss without a global_batch_size divides by the rows with a valid token
/// (count_empty_rows = false; for shards pass sequence_count, as verl's trainer passes its
/// mini-batch size); verl's seq-mean-token-mean divides a row by W_i + 1e-8, prefloss by W_i
/// (row_weight_guard); verl's metrics divide by W + 1e-8 (preset::verl::metrics). Empty rows and
/// empty batches give 0, not NaN. seq_mean_token_sum_norm is sum / (B C) as in Dr.GRPO, TRL's
/// dr_grpo and verl (verl's C: loss_scale_factor, by default the padded length).
///
/// `.losses[i]` is sequence i's contribution to the batch loss: row_scale_i * sum_t w l, so
/// loss = sum_i losses[i] in every mode (token_mean: sum_t w l / N; seq_mean_token_sum:
/// sum_t w l / B; seq_mean_token_mean: sum_t w l / (B W_i); seq_mean_token_sum_norm:
/// sum_t w l / (B C); token_sum, verl's "token-sum": sum_t w l).
///
/// `.backward(grad)` writes d loss / d logp (0 at masked-out tokens) with torch autograd's
/// conventions for verl's formula: at a clip boundary r == 1 +- eps the gradient passes
/// (torch.clamp is inclusive), where the two branches tie the gradient is split equally
/// (torch.maximum/minimum), and beyond the log-ratio clamp it is 0.
///
/// Token inputs (logp, old_logp, advantages, ref_logp) are float, double, Eigen::bfloat16 or
/// Eigen::half. All of one type, or any mix of float, bf16 and half (e.g. bf16 log-probs with
/// float advantages), which is computed in float: 16-bit values are converted exactly, sums
/// are in double as for float, and loss, losses and metrics are float. The gradient has logp's
/// storage type (bf16 logp: bf16 gradient, the float gradient rounded once to nearest even).
/// double does not mix with other types (a compile error).
///
/// @param logp policy token log-probs (the differentiated input)
/// @param old_logp, advantages constants of the rollout, same shape
/// @param mask same shape: bool/uint8 (nonzero selects) or float/double (weights)
/// @return PpoResult; holds views of the inputs until backward() has run.
/// @throws shape_error naming the argument (shape mismatch, an empty batch without the mode's
/// global normalizer — with token_count or sequence_count an empty shard gives 0 —, invalid or differing
/// cu_seqlens, packed and padded arguments mixed); layout_error for a
/// tensor whose data is not aligned to its element type; value_error for a float mask weight
/// that is negative, NaN or infinite; option_error for clip_high < 0, clip_low outside [0, 1],
/// dual_clip in (0, 1] or < 0 (or 1 once rounded to float), kl_coef < 0 or > 0 without
/// ref_logp, an unknown enum, a normaliser/clamp <= 0 (or 0 once rounded to the token type), or
/// seq_mean_token_sum_norm over packed input without token_sum_norm, delta <= 0 (or 0 once
/// rounded to the token type).
/// Nothing is written on error.
template <class LP, class OLP, class AD, class MK>
auto ppo_clip(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const PpoOptions& opt = {}) {
  detail::ppo_static_checks<LP, OLP, AD, MK>();
  return detail::ppo_clip_views(logp, old_logp, advantages, mask, &detail::no_ref, opt, &detail::no_grad);
}

/// @brief ppo_clip with a reference policy's log-probs for the KL term (kl_metrics too).
template <class LP, class OLP, class AD, class MK, class RF, detail::if_tensor_t<RF> = 0>
auto ppo_clip(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const RF& ref_logp,
              const PpoOptions& opt = {}) {
  detail::ppo_static_checks<LP, OLP, AD, MK, RF>();
  return detail::ppo_clip_views(logp, old_logp, advantages, mask, &ref_logp, opt, &detail::no_grad);
}

/// @brief Fused ppo_clip: forward and d loss / d logp in one streaming pass (grad_out is a
/// [batch, tokens] tensor or map, fully overwritten). token_mean without token_count first sums
/// the mask (1 byte a token for byte masks); seq_mean_token_mean sums each row's mask just
/// before streaming it. The returned result can still run backward() again.
template <class LP, class OLP, class AD, class MK, class G, detail::if_tensor_t<G> = 0>
auto ppo_clip(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const PpoOptions& opt,
              G&& grad_out) {
  detail::ppo_static_checks<LP, OLP, AD, MK>();
  static_assert(std::is_same_v<detail::tensor_scalar_t<G>, detail::tensor_scalar_t<LP>>,
                "prefloss: grad_out must have logp's scalar type");
  return detail::ppo_clip_views(logp, old_logp, advantages, mask, &detail::no_ref, opt, &grad_out);
}

/// @brief Fused ppo_clip with a reference policy (see the fused overload above).
template <class LP, class OLP, class AD, class MK, class RF, class G, detail::if_tensor_t<RF> = 0,
          detail::if_tensor_t<G> = 0>
auto ppo_clip(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const RF& ref_logp,
              const PpoOptions& opt, G&& grad_out) {
  detail::ppo_static_checks<LP, OLP, AD, MK, RF>();
  static_assert(std::is_same_v<detail::tensor_scalar_t<G>, detail::tensor_scalar_t<LP>>,
                "prefloss: grad_out must have logp's scalar type");
  return detail::ppo_clip_views(logp, old_logp, advantages, mask, &ref_logp, opt, &grad_out);
}

}  // namespace prefloss
