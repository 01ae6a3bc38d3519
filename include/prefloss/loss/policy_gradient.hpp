/// @file loss/policy_gradient.hpp
/// Token-level policy-gradient losses beside ppo_clip, on the same streaming driver: CISPO
/// (MiniMax-M1; a clipped, detached importance weight on a REINFORCE term), SAPO (a smooth
/// sigmoid gate in place of the ratio clip) and GPG (plain -A logp). Forward, backward, or both
/// in one pass; the inputs, aggregation modes and global normalizers are ppo_clip's.
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
#include "ppo_clip.hpp"
#include "token_loss.hpp"

namespace prefloss {

/// @brief Options of cispo(). Defaults are verl's (compute_policy_loss_cispo: clip_ratio 0.2 on
/// both sides, the log-ratio clamp at 20, token-mean). TRL's loss_type = "cispo" is
/// clip_low = 1 (no lower bound), clip_high = epsilon_high - 1, log_ratio_clamp = std::nullopt.
struct CispoOptions {
  /// in [0, 1]: the weight is clipped below at 1 - clip_low (verl clip_ratio_low); 1: no lower
  /// bound (TRL clamps from above only)
  double clip_low = 0.2;
  /// >= 0 and finite: the weight is clipped above at 1 + clip_high (verl clip_ratio_high; TRL's
  /// epsilon_high is the bound itself, so its recommended 5.0 is clip_high = 4)
  double clip_high = 0.2;
  Aggregation aggregation = Aggregation::token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// verl clamps logp - old_logp to [-20, 20] before exp; the weight is detached, so the clamp
  /// changes values only. std::nullopt: no clamp (TRL).
  std::optional<double> log_ratio_clamp = 20.0;
  /// Threads the call and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief Metrics of cispo (verl's actor/pg_clipfrac and actor/ppo_kl, plus the ratio's mean and
/// max); means over valid tokens weighted by the mask, 0 when there is none.
template <class S>
struct CispoMetrics {
  S clip_fraction = 0;  ///< share of tokens whose weight is clipped (verl pg_clipfrac: ratio != clip(ratio))
  /// share of tokens with A > 0 whose weight is clipped above (TRL cispo_clip_ratio, which counts
  /// only those: coef_1 > epsilon_high and A > 0)
  S clip_fraction_high = 0;
  S approx_kl = 0;          ///< mean of old_logp - logp after log_ratio_clamp (verl ppo_kl)
  S ratio_mean = 0;         ///< mean of r = exp(logp - old_logp), before clipping
  S ratio_max = 0;          ///< max of r over valid tokens (0 when none)
  double token_weight = 0;  ///< sum of the mask weights, in double (exact counts past 2^24)
};

/// @brief Entries of MetricSums<CispoMetrics<S>>: five sums weighted by the mask and one
/// maximum; the means divide by `weight` (this call's mask weight, not token_count).
struct CispoMetricEntries {
  static constexpr std::size_t weight = 0;        ///< sums: mask weight of the valid tokens
  static constexpr std::size_t clipped = 1;       ///< sums: tokens whose weight is clipped
  static constexpr std::size_t clipped_high = 2;  ///< sums: A > 0 tokens whose weight is clipped above
  static constexpr std::size_t approx_kl = 3;     ///< sums: old_logp - logp (clamped)
  static constexpr std::size_t ratio = 4;         ///< sums: r
  static constexpr std::size_t n_sums = 5;
  static constexpr std::size_t ratio_max = 0;  ///< maxima: r over valid tokens (-inf: none)
  static constexpr std::size_t n_maxima = 1;
};

/// @brief Options of sapo(). Defaults are verl's and TRL's (tau_pos 1, tau_neg 1.05,
/// seq_mean_token_mean, which verl's compute_policy_loss_sapo imposes whatever loss_agg_mode
/// says and TRL's loss_type = "sapo" uses) and verl's log-ratio clamp at 20 (TRL has none:
/// log_ratio_clamp = std::nullopt).
struct SapoOptions {
  /// > 0 and finite: the gate's temperature where A > 0 (verl tau_pos, TRL sapo_temperature_pos)
  double tau_pos = 1.0;
  /// > 0 and finite: the temperature where A <= 0 (verl tau_neg, TRL sapo_temperature_neg)
  double tau_neg = 1.05;
  Aggregation aggregation = Aggregation::seq_mean_token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// verl clamps logp - old_logp to [-20, 20] before exp; the gradient is 0 beyond the clamp.
  /// std::nullopt: no clamp (TRL).
  std::optional<double> log_ratio_clamp = 20.0;
  /// Threads the call and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief Metrics of sapo (verl's actor/ppo_kl, plus the ratio's mean and max; verl's
/// pg_clipfrac is always 0 for SAPO and left out). Masked weighted means, 0 without a token.
template <class S>
struct SapoMetrics {
  S approx_kl = 0;          ///< mean of old_logp - logp after log_ratio_clamp (verl ppo_kl)
  S ratio_mean = 0;         ///< mean of r = exp(logp - old_logp)
  S ratio_max = 0;          ///< max of r over valid tokens (0 when none)
  double token_weight = 0;  ///< sum of the mask weights, in double
};

/// @brief Entries of MetricSums<SapoMetrics<S>>: three sums weighted by the mask, one maximum.
struct SapoMetricEntries {
  static constexpr std::size_t weight = 0;     ///< sums: mask weight of the valid tokens
  static constexpr std::size_t approx_kl = 1;  ///< sums: old_logp - logp (clamped)
  static constexpr std::size_t ratio = 2;      ///< sums: r
  static constexpr std::size_t n_sums = 3;
  static constexpr std::size_t ratio_max = 0;  ///< maxima: r over valid tokens (-inf: none)
  static constexpr std::size_t n_maxima = 1;
};

/// @brief Options of gpg(). Defaults are verl's (compute_policy_loss_gpg with token-mean).
struct GpgOptions {
  Aggregation aggregation = Aggregation::token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// Threads the call and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief Metrics of gpg. verl logs none for GPG; old_logp is only read for approx_kl, the
/// drift from the rollout policy that the other policy losses report.
template <class S>
struct GpgMetrics {
  S approx_kl = 0;          ///< mean of old_logp - logp (unclamped: GPG has no ratio)
  double token_weight = 0;  ///< sum of the mask weights, in double
};

/// @brief Entries of MetricSums<GpgMetrics<S>>: two sums weighted by the mask, no maxima.
struct GpgMetricEntries {
  static constexpr std::size_t weight = 0;     ///< sums: mask weight of the valid tokens
  static constexpr std::size_t approx_kl = 1;  ///< sums: old_logp - logp
  static constexpr std::size_t n_sums = 2;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {

template <class S>
struct metric_layout<CispoMetrics<S>> {
  using Entries = CispoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static CispoMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                  const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    CispoMetrics<S> m;
    m.clip_fraction = static_cast<S>(mean_or_zero(sums[E::clipped], w));
    m.clip_fraction_high = static_cast<S>(mean_or_zero(sums[E::clipped_high], w));
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.ratio_mean = static_cast<S>(mean_or_zero(sums[E::ratio], w));
    m.ratio_max = static_cast<S>(w != 0 ? maxima[E::ratio_max] : 0.0);
    m.token_weight = w;
    return m;
  }
};

template <class S>
struct metric_layout<SapoMetrics<S>> {
  using Entries = SapoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static SapoMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                 const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    SapoMetrics<S> m;
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.ratio_mean = static_cast<S>(mean_or_zero(sums[E::ratio], w));
    m.ratio_max = static_cast<S>(w != 0 ? maxima[E::ratio_max] : 0.0);
    m.token_weight = w;
    return m;
  }
};

template <class S>
struct metric_layout<GpgMetrics<S>> {
  using Entries = GpgMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static GpgMetrics<S> finalize(const std::array<double, n_sums>& sums, const std::array<double, n_maxima>&) noexcept {
    GpgMetrics<S> m;
    m.approx_kl = static_cast<S>(mean_or_zero(sums[Entries::approx_kl], sums[Entries::weight]));
    m.token_weight = sums[Entries::weight];
    return m;
  }
};

/// Per-token CISPO loss -sg[clip(r, lo, hi)] A logp and its derivative -clip(r, lo, hi) A: the
/// weight is detached, so neither the ratio clip nor the log-ratio clamp gates the gradient.
template <class S>
struct CispoKernel {
  static constexpr std::size_t n_in = 3;    // logp, old_logp, advantages
  static constexpr std::size_t n_sums = 4;  // clipped, clipped above with A > 0, old - logp, ratio
  static constexpr bool has_max = true;     // ratio
  S lo, hi;                                 // 1 - clip_low, 1 + clip_high
  S clamp;                                  // log-ratio clamp (+inf: off)

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1));
    const B lp = x[0], A = x[2];
    const B dc = xsimd::min(xsimd::max(lp - x[1], B(-clamp)), B(clamp));
    const B r = exp_ratio(dc);
    const B w = -A * xsimd::min(xsimd::max(r, B(lo)), B(hi));  // -A sg[clip(r)]
    if constexpr (Fwd) {
      o.loss = w * lp;
      const auto above = r > B(hi);
      o.sums[0] = xsimd::select((r < B(lo)) | above, one, zero);
      o.sums[1] = xsimd::select(above & (A > zero), one, zero);
      o.sums[2] = -dc;
      o.sums[3] = r;
      o.max = r;
    }
    o.grad = w;
  }
};

/// Per-token SAPO loss -A (4 / tau) s, s = sigmoid(z), z = tau (r - 1), and d / d logp =
/// -A 4 s (1 - s) r (d r / d logp = r inside the log-ratio clamp, inclusive as torch.clamp; 0
/// beyond), with s (1 - s) taken as sigmoid(|z|) sigmoid(-|z|) from one exp(-|z|) so it keeps
/// its relative accuracy where s is near 1.
template <class S>
struct SapoKernel {
  static constexpr std::size_t n_in = 3;    // logp, old_logp, advantages
  static constexpr std::size_t n_sums = 2;  // old - logp, ratio
  static constexpr bool has_max = true;     // ratio
  S tau_pos, tau_neg;
  S scale_pos, scale_neg;  // 4 / tau
  S clamp;                 // log-ratio clamp (+inf: off)

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B one(S(1));
    const B A = x[2];
    const B d = x[0] - x[1];
    const B dc = xsimd::min(xsimd::max(d, B(-clamp)), B(clamp));
    const B r = exp_ratio(dc);
    const auto pos = A > B(S(0));  // verl / TRL: where(A > 0, tau_pos, tau_neg), so A == 0 takes tau_neg
    const B tau = xsimd::select(pos, B(tau_pos), B(tau_neg));
    const B z = tau * (r - one);
    const B e = exp_ratio(-xsimd::abs(z));
    const B big = one / (one + e);  // sigmoid(|z|)
    const B small = e * big;        // sigmoid(-|z|)
    if constexpr (Fwd) {
      const B s = xsimd::select(z >= B(S(0)), big, small);
      o.loss = -A * xsimd::select(pos, B(scale_pos), B(scale_neg)) * s;
      o.sums[0] = -dc;
      o.sums[1] = r;
      o.max = r;
    }
    if constexpr (Bwd) {
      const auto inside = (d >= B(-clamp)) & (d <= B(clamp));
      o.grad = xsimd::select(inside, B(S(-4)) * A * (big * small) * r, B(S(0)));
    } else {
      o.grad = B(S(0));
    }
  }
};

/// Per-token GPG loss -A logp and its derivative -A.
template <class S>
struct GpgKernel {
  static constexpr std::size_t n_in = 3;    // logp, old_logp, advantages
  static constexpr std::size_t n_sums = 1;  // old - logp
  static constexpr bool has_max = false;

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    const batch<S> na = -x[2];
    if constexpr (Fwd) {
      o.loss = na * x[0];
      o.sums[0] = x[1] - x[0];
    }
    o.grad = na;
  }
};

/// One kernel each, so Sel is unused (AllKernels).
template <class S>
struct CispoParams {
  CispoKernel<S> kernel;
  template <class Sel, class F>
  void visit(F&& f) const {
    f(kernel);
  }
};
template <class S>
struct SapoParams {
  SapoKernel<S> kernel;
  template <class Sel, class F>
  void visit(F&& f) const {
    f(kernel);
  }
};
template <class S>
struct GpgParams {
  GpgKernel<S> kernel;
  template <class Sel, class F>
  void visit(F&& f) const {
    f(kernel);
  }
};

}  // namespace detail

/// Result of cispo: .loss, .losses, .metrics, .backward(grad) (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using CispoResult = TokenLossResult<S, M, detail::CispoParams<S>, CispoMetrics<S>, In>;
/// Result of sapo: .loss, .losses, .metrics, .backward(grad) (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using SapoResult = TokenLossResult<S, M, detail::SapoParams<S>, SapoMetrics<S>, In>;
/// Result of gpg: .loss, .losses, .metrics, .backward(grad) (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using GpgResult = TokenLossResult<S, M, detail::GpgParams<S>, GpgMetrics<S>, In>;

namespace detail {

/// The checks every policy loss shares after its own options: aggregation, then the shapes
/// (ppo_clip's order, so the same input fails with the same message).
template <class S, class Opt, class LT, class OT, class AT, class M>
AggregationSpec policy_prepare(const char* fn, const Matrix<LT>& lp, const Matrix<OT>& old, const Matrix<AT>& adv,
                               const Matrix<M>& mask, const Opt& opt) {
  const AggregationSpec spec = aggregation_spec(fn, opt, lp.rows, lp.packed() ? packed_rows : lp.cols);
  validate_aggregation<S>(fn, spec);
  require_same_shape(fn, "old_logp", old, "logp", lp);
  require_same_shape(fn, "advantages", adv, "logp", lp);
  require_same_shape(fn, "mask", mask, "logp", lp);
  require_weights<S>(mask, fn, "mask");
  require_rows_or_globals(fn, "logp", spec);
  return spec;
}

/// Runs a checked policy loss (fused into *grad_out unless G is NoGrad) and fills its metric
/// sums: entry 0 the mask weight, entries 1.. the kernel's sums in order, maxima[0] its max.
/// `extra`: the kernel's token inputs after advantages, in order (shapes checked by the caller).
template <class Metrics, class Params, class In, class LT, class OT, class AT, class M, class G, class... XT>
TokenLossResult<typename In::compute_type, M, Params, Metrics, In> policy_run(
    const char* fn, const Matrix<LT>& lp, const Matrix<OT>& old, const Matrix<AT>& adv, const Matrix<M>& mask,
    const AggregationSpec& spec, const Params& p, Threads threads, G* grad_out, const Matrix<XT>&... extra) {
  using S = typename In::compute_type;
  In in;
  set_input(in, 0, lp.data);
  set_input(in, 1, old.data);
  set_input(in, 2, adv.data);
  std::size_t next = 3;
  (set_input(in, next++, extra.data), ...);
  (void)next;
  in.mask = mask.data;
  in.rows = lp.rows;
  in.cols = lp.cols;
  in.off = lp.off;
  TokenLossResult<S, M, Params, Metrics, In> result(fn, in, p, "grad", AllKernels{}, threads);
  const TokenStats st = result.template run<AllKernels>(spec, grad_out);
  auto& ms = result.metric_sums;
  ms.sums[0] = st.weight;
  for (std::size_t k = 1; k < ms.n_sums; ++k) ms.sums[k] = st.sums[k - 1];
  // Without a valid token the max is the kernel's -inf already: the merge identity.
  if constexpr (MetricSums<Metrics>::n_maxima > 0) ms.maxima[0] = st.max;
  result.metrics = ms.metrics();
  return result;
}

template <class S>
void require_log_ratio_clamp(const char* fn, const std::optional<double>& c) {
  if (c) require_positive_in<S>(fn, "log_ratio_clamp", *c);
}

template <class In, class LT, class OT, class AT, class M, class G>
CispoResult<typename In::compute_type, M, In> cispo_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                         const Matrix<AT>& adv, const Matrix<M>& mask,
                                                         const CispoOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "cispo";
  require_option(opt.clip_low >= 0 && opt.clip_low <= 1, fn, "clip_low", "in [0, 1]", opt.clip_low);
  require_option(opt.clip_high >= 0 && std::isfinite(opt.clip_high), fn, "clip_high", ">= 0 and finite", opt.clip_high);
  require_log_ratio_clamp<S>(fn, opt.log_ratio_clamp);
  const AggregationSpec spec = policy_prepare<S>(fn, lp, old, adv, mask, opt);
  CispoParams<S> p;
  p.kernel.lo = static_cast<S>(1.0 - opt.clip_low);
  p.kernel.hi = static_cast<S>(1.0 + opt.clip_high);
  p.kernel.clamp = opt.log_ratio_clamp ? static_cast<S>(*opt.log_ratio_clamp) : std::numeric_limits<S>::infinity();
  return policy_run<CispoMetrics<S>, CispoParams<S>, In>(fn, lp, old, adv, mask, spec, p, opt.threads, grad_out);
}

template <class In, class LT, class OT, class AT, class M, class G>
SapoResult<typename In::compute_type, M, In> sapo_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                       const Matrix<AT>& adv, const Matrix<M>& mask,
                                                       const SapoOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "sapo";
  // 4 / tau must stay finite in the token type too (tau = 1e-39 is a float subnormal).
  const auto tau_ok = [](double t) {
    return t > 0 && std::isfinite(t) && static_cast<S>(t) > S(0) && std::isfinite(static_cast<S>(4.0 / t));
  };
  const char* rule = sizeof(S) == 4 ? "> 0 and finite, with 4 / tau finite in float" : "> 0 and finite";
  require_option(tau_ok(opt.tau_pos), fn, "tau_pos", rule, opt.tau_pos);
  require_option(tau_ok(opt.tau_neg), fn, "tau_neg", rule, opt.tau_neg);
  require_log_ratio_clamp<S>(fn, opt.log_ratio_clamp);
  const AggregationSpec spec = policy_prepare<S>(fn, lp, old, adv, mask, opt);
  SapoParams<S> p;
  p.kernel.tau_pos = static_cast<S>(opt.tau_pos);
  p.kernel.tau_neg = static_cast<S>(opt.tau_neg);
  p.kernel.scale_pos = static_cast<S>(4.0 / opt.tau_pos);
  p.kernel.scale_neg = static_cast<S>(4.0 / opt.tau_neg);
  p.kernel.clamp = opt.log_ratio_clamp ? static_cast<S>(*opt.log_ratio_clamp) : std::numeric_limits<S>::infinity();
  return policy_run<SapoMetrics<S>, SapoParams<S>, In>(fn, lp, old, adv, mask, spec, p, opt.threads, grad_out);
}

template <class In, class LT, class OT, class AT, class M, class G>
GpgResult<typename In::compute_type, M, In> gpg_impl(const Matrix<LT>& lp, const Matrix<OT>& old, const Matrix<AT>& adv,
                                                     const Matrix<M>& mask, const GpgOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "gpg";
  const AggregationSpec spec = policy_prepare<S>(fn, lp, old, adv, mask, opt);
  return policy_run<GpgMetrics<S>, GpgParams<S>, In>(fn, lp, old, adv, mask, spec, GpgParams<S>{}, opt.threads,
                                                     grad_out);
}

/// The inputs type of a policy loss's (logp, old_logp, advantages, mask).
template <class LP, class OLP, class AD, class MK>
using policy_inputs_t = token_inputs_t<tensor_scalar_t<MK>, tensor_scalar_t<LP>, tensor_scalar_t<LP>,
                                       tensor_scalar_t<OLP>, tensor_scalar_t<AD>>;

/// ppo_clip's input-type checks, and grad_out's scalar type unless G is NoGrad.
template <class LP, class OLP, class AD, class MK, class G>
constexpr void policy_grad_check() {
  ppo_static_checks<LP, OLP, AD, MK>();
  if constexpr (!is_no_grad_v<G>)
    static_assert(std::is_same_v<tensor_scalar_t<G>, tensor_scalar_t<LP>>,
                  "prefloss: grad_out must have logp's scalar type");
}

}  // namespace detail

/// @brief CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, detached importance
/// weight, over row-major [batch, tokens] tensors or a packed batch (every token argument
/// pl::packed(values, cu_seqlens) with the same offsets), aggregated like ppo_clip.
///
/// Per token, with r = exp(clamp(logp - old_logp, +-log_ratio_clamp)):
///   l = -sg[clip(r, 1 - clip_low, 1 + clip_high)] A logp,
///   d l / d logp = -clip(r, 1 - clip_low, 1 + clip_high) A
/// (sg: stop-gradient; the weight has no gradient, so there is none of the clip's or the clamp's
/// gating: every token keeps its gradient, which is the point of CISPO).
///
/// Source: verl compute_policy_loss_cispo (verl/trainer/ppo/core_algos.py, 1dda039; defaults:
/// clip_ratio_low = clip_ratio_high = 0.2, the log-ratio clamp at [-20, 20], loss_agg_mode
/// token-mean) + agg_loss. TRL GRPOTrainer._compute_loss, loss_type "cispo" (trl/trainer/
/// grpo_trainer.py, f2cd577) differs: torch.clamp(coef_1, max=epsilon_high).detach(), an upper
/// bound only and given as the bound itself (ScaleRL's eps_max, recommended 5.0), and no
/// log-ratio clamp; clip_low = 1, clip_high = epsilon_high - 1, log_ratio_clamp = std::nullopt
/// reproduce it (aggregation token_mean with token_count = num_items_in_batch, as for dapo, see
/// ppo_clip). clip_fraction is verl's pg_clipfrac (ratio != clip(ratio), a token weighted by
/// the mask); clip_fraction_high is TRL's cispo_clip_ratio (clipped above with A > 0).
///
/// Aggregation, `.losses[i]` (row i's contribution; loss = sum of losses), empty rows and
/// batches (0, not NaN; an empty batch needs the mode's global normalizer), the differences to
/// verl's agg_loss, threads (the same bits for any count) and the input types (float, double,
/// bf16, half; a 16-bit mix computed in float, the gradient in logp's storage type) are as for
/// ppo_clip. Masked-out tokens never influence anything, even when they hold inf/NaN.
/// `.backward(grad)` writes d loss / d logp, 0 at masked-out tokens.
///
/// @param logp policy token log-probs (the differentiated input)
/// @param old_logp, advantages constants of the rollout, same shape
/// @param mask same shape: bool/uint8 (nonzero selects) or float/double (weights)
/// @throws shape_error naming the argument (as ppo_clip); value_error for a bad mask weight;
/// option_error for clip_low outside [0, 1], clip_high < 0 or not finite, log_ratio_clamp <= 0
/// (or 0 in the token type), an unknown aggregation or a bad normalizer. Nothing is written on
/// error.
template <class LP, class OLP, class AD, class MK>
auto cispo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const CispoOptions& opt = {}) {
  detail::policy_grad_check<LP, OLP, AD, MK, detail::NoGrad>();
  constexpr const char* fn = "cispo";
  return detail::cispo_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &detail::no_grad);
}

/// @brief Fused cispo: forward and d loss / d logp in one streaming pass into grad_out (a
/// [batch, tokens] tensor or map of logp's scalar type, rank-1 or pl::packed for packed input;
/// fully overwritten). The result can still run backward().
template <class LP, class OLP, class AD, class MK, class G, detail::if_tensor_t<G> = 0>
auto cispo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const CispoOptions& opt,
           G&& grad_out) {
  detail::policy_grad_check<LP, OLP, AD, MK, G>();
  constexpr const char* fn = "cispo";
  return detail::cispo_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &grad_out);
}

/// @brief SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): the
/// ratio clip of ppo_clip replaced by a smooth, temperature-controlled gate; inputs, layouts and
/// aggregation as for cispo.
///
/// Per token, with r = exp(clamp(logp - old_logp, +-log_ratio_clamp)), tau = tau_pos where
/// A > 0 and tau_neg where A <= 0, s = sigmoid(tau (r - 1)):
///   l = -(4 / tau) s A,
///   d l / d logp = -4 s (1 - s) r A inside the log-ratio clamp (inclusive, as torch.clamp), 0
///   beyond it.
/// The gate's slope at r = 1 is 1 for any tau, so near on-policy tokens get the plain policy
/// gradient -A (l = -A r there to first order).
///
/// Source: verl compute_policy_loss_sapo (verl/trainer/ppo/core_algos.py, 1dda039; gate_function
/// sigmoid(tau (x - 1)) * (4 / tau), the log-ratio clamp at [-20, 20], agg_loss with
/// seq-mean-token-mean, forced whatever loss_agg_mode is; tau_pos 1.0, tau_neg 1.05 in its actor
/// config). TRL GRPOTrainer._compute_loss, loss_type "sapo" (trl/trainer/grpo_trainer.py,
/// f2cd577) has the same gate and the same temperature choice (A > 0, so A == 0 takes the
/// negative one; its loss is 0 there either way) with no log-ratio clamp
/// (log_ratio_clamp = std::nullopt). Without the clamp r overflows to inf for logp - old_logp
/// above about 88.7 (float), and the gradient there is 0 * inf = NaN, as in torch.
///
/// @throws as cispo, with option_error for tau_pos or tau_neg <= 0 or not finite (or 4 / tau not
/// finite in the token type). Nothing is written on error.
template <class LP, class OLP, class AD, class MK>
auto sapo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SapoOptions& opt = {}) {
  detail::policy_grad_check<LP, OLP, AD, MK, detail::NoGrad>();
  constexpr const char* fn = "sapo";
  return detail::sapo_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &detail::no_grad);
}

/// @brief Fused sapo: forward and d loss / d logp in one pass into grad_out (see fused cispo).
template <class LP, class OLP, class AD, class MK, class G, detail::if_tensor_t<G> = 0>
auto sapo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SapoOptions& opt,
          G&& grad_out) {
  detail::policy_grad_check<LP, OLP, AD, MK, G>();
  constexpr const char* fn = "sapo";
  return detail::sapo_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &grad_out);
}

/// @brief GPG (Group Policy Gradient; AMAP-ML/GPG, which verl adapts): the plain policy gradient with no ratio
/// and no clip; inputs, layouts and aggregation as for cispo.
///
/// Per token l = -A logp, d l / d logp = -A. old_logp is read only for the approx_kl metric
/// (shape-checked like the other inputs).
///
/// Source: verl compute_policy_loss_gpg (verl/trainer/ppo/core_algos.py, 1dda039; -log_prob *
/// advantages + agg_loss, token-mean by default; it logs no metrics). TRL has no GPG loss.
///
/// @throws as cispo (shape, mask and aggregation errors). Nothing is written on error.
template <class LP, class OLP, class AD, class MK>
auto gpg(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const GpgOptions& opt = {}) {
  detail::policy_grad_check<LP, OLP, AD, MK, detail::NoGrad>();
  constexpr const char* fn = "gpg";
  return detail::gpg_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &detail::no_grad);
}

/// @brief Fused gpg: forward and d loss / d logp in one pass into grad_out (see fused cispo).
template <class LP, class OLP, class AD, class MK, class G, detail::if_tensor_t<G> = 0>
auto gpg(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const GpgOptions& opt,
         G&& grad_out) {
  detail::policy_grad_check<LP, OLP, AD, MK, G>();
  constexpr const char* fn = "gpg";
  return detail::gpg_impl<detail::policy_inputs_t<LP, OLP, AD, MK>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"), opt, &grad_out);
}

}  // namespace prefloss
