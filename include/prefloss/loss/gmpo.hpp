/// @file loss/gmpo.hpp
/// GMPO, Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673): one ratio a
/// sequence, the geometric mean of its token ratios clipped in log space, as verl computes it.
/// Built on the token-loss driver's per-row hook: a row's log-ratio and advantage sums first,
/// then one streaming pass for the loss and the token gradient.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
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
#include "policy_gradient.hpp"
#include "token_loss.hpp"

namespace prefloss {

/// @brief Options of gmpo(). Defaults are verl's (compute_policy_loss_geo_mean with ActorConfig's
/// clip_ratio 0.2); the GMPO paper trains with 0.4 on both sides.
struct GmpoOptions {
  /// >= 0 and finite: token log-ratios below -clip_low are clipped where A < 0 (verl
  /// clip_ratio_low; a log-space bound, not 1 - eps)
  double clip_low = 0.2;
  /// >= 0 and finite: token log-ratios above clip_high are clipped where A > 0 (verl clip_ratio_high)
  double clip_high = 0.2;
  /// The global number of sequences the batch mean divides by (data parallel / accumulation),
  /// instead of this call's rows; > 0 and finite, with a reciprocal finite in the token type.
  std::optional<double> sequence_count = std::nullopt;
  /// Threads the call and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief Metrics of gmpo (verl's actor/pg_clipfrac, pg_clipfrac_lower, ppo_kl): means over valid
/// tokens, weighted by the mask, 0 without a valid token.
template <class S>
struct GmpoMetrics {
  S clip_fraction = 0;      ///< share of tokens with A > 0 whose log-ratio lies outside [-clip_low, clip_high]
  S clip_fraction_low = 0;  ///< share of tokens with A < 0 whose log-ratio lies outside it
  S approx_kl = 0;          ///< mean of old_logp - logp (verl ppo_kl)
  double token_weight = 0;  ///< sum of the mask weights, in double
};

/// @brief Entries of MetricSums<GmpoMetrics<S>>: four sums weighted by the mask, no maxima.
struct GmpoMetricEntries {
  static constexpr std::size_t weight = 0;       ///< sums: mask weight of the valid tokens
  static constexpr std::size_t clipped = 1;      ///< sums: A > 0 tokens outside the clip range
  static constexpr std::size_t clipped_low = 2;  ///< sums: A < 0 tokens outside the clip range
  static constexpr std::size_t approx_kl = 3;    ///< sums: old_logp - logp
  static constexpr std::size_t n_sums = 4;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
template <class S>
struct metric_layout<GmpoMetrics<S>> {
  using Entries = GmpoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static GmpoMetrics<S> finalize(const std::array<double, n_sums>& sums, const std::array<double, n_maxima>&) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    GmpoMetrics<S> m;
    m.clip_fraction = static_cast<S>(mean_or_zero(sums[E::clipped], w));
    m.clip_fraction_low = static_cast<S>(mean_or_zero(sums[E::clipped_low], w));
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.token_weight = w;
    return m;
  }
};

/// @brief GMPO's kernel. The row pass sums u_t (the sign-aware clipped log-ratio) and A_t; the row's
/// kernel then holds the row loss -Abar rho over the row weight (so its tokens sum to the row loss)
/// and d loss / d u = -Abar rho / (W + 1e-8). Per token, d u / d logp is 1 or 0 (torch.min/max
/// split a tie equally, and at a tie both branches pass: the clamp is inclusive).
template <class S>
struct GmpoKernel {
  static constexpr std::size_t n_in = 3;    // logp, old_logp, advantages
  static constexpr std::size_t n_sums = 3;  // clipped (A > 0), clipped (A < 0), old - logp
  static constexpr bool has_max = false;
  static constexpr bool row_pass = true;
  static constexpr std::size_t row_terms = 2;  // sum_t w u_t, sum_t w A_t

  S lo, hi;          // -clip_low, clip_high: the log-space clip range
  S token_loss = 0;  // the row loss / W (0 for an empty row)
  S grad_scale = 0;  // d row loss / d sum_t w u_t

  bool needs_row_pass() const noexcept { return true; }

  /// verl: sgn(A) * min(sgn(A) d, sgn(A) clamp(d, lo, hi)), i.e. min(d, dc) for A > 0, max(d, dc) for A < 0.
  batch<S> clipped_log_ratio(const batch<S>& d, const batch<S>& A) const noexcept {
    using B = batch<S>;
    const B dc = xsimd::min(xsimd::max(d, B(lo)), B(hi));
    const B zero(S(0));
    return xsimd::select(A > zero, xsimd::min(d, dc), xsimd::select(A < zero, xsimd::max(d, dc), zero));
  }

  std::array<batch<S>, 2> row_term(const batch<S>* x) const noexcept {
    return {clipped_log_ratio(x[0] - x[1], x[2]), x[2]};
  }

  GmpoKernel for_row(const std::array<double, 2>& sums, double weight) const noexcept {
    GmpoKernel k = *this;
    const double denom = weight + 1e-8;  // verl: response_mask.sum(-1) + 1e-8
    const double row_loss = -(sums[1] / denom) * std::exp(sums[0] / denom);
    k.token_loss = static_cast<S>(weight > 0 ? row_loss / weight : 0.0);
    k.grad_scale = static_cast<S>(row_loss / denom);
    return k;
  }

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1));
    const B d = x[0] - x[1], A = x[2];
    if constexpr (Bwd) {
      const auto pass = ((A > zero) & (d <= B(hi))) | ((A < zero) & (d >= B(lo)));
      o.grad = xsimd::select(pass, B(grad_scale), zero);
    }
    if constexpr (Fwd) {
      o.loss = B(token_loss);
      const auto outside = (d < B(lo)) | (d > B(hi));
      o.sums[0] = xsimd::select(outside & (A > zero), one, zero);
      o.sums[1] = xsimd::select(outside & (A < zero), one, zero);
      o.sums[2] = -d;
    }
  }
};

template <class S>
struct GmpoParams {
  S lo, hi;
  template <class Sel, class F>
  void visit(F&& f) const {
    GmpoKernel<S> k;
    k.lo = lo;
    k.hi = hi;
    f(k);
  }
};

}  // namespace detail

/// Result of gmpo: .loss, .losses, .metrics, .backward(grad) (d loss / d logp). S is the compute
/// type (float for bf16/half inputs); In the inputs type (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using GmpoResult = TokenLossResult<S, M, detail::GmpoParams<S>, GmpoMetrics<S>, In>;

namespace detail {

template <class In, class LT, class OT, class AT, class M, class G>
GmpoResult<typename In::compute_type, M, In> gmpo_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                       const Matrix<AT>& adv, const Matrix<M>& mask,
                                                       const GmpoOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "gmpo";
  require_option(opt.clip_low >= 0 && std::isfinite(opt.clip_low), fn, "clip_low", ">= 0 and finite", opt.clip_low);
  require_option(opt.clip_high >= 0 && std::isfinite(opt.clip_high), fn, "clip_high", ">= 0 and finite", opt.clip_high);
  AggregationSpec spec;
  spec.mode = Aggregation::seq_mean_token_sum;  // verl: torch.mean over the rows' losses
  spec.batch = lp.rows;
  spec.tokens = lp.packed() ? packed_rows : lp.cols;
  spec.sequence_count = opt.sequence_count;
  validate_aggregation<S>(fn, spec);
  require_same_shape(fn, "old_logp", old, "logp", lp);
  require_same_shape(fn, "advantages", adv, "logp", lp);
  require_same_shape(fn, "mask", mask, "logp", lp);
  require_weights<S>(mask, fn, "mask");
  require_rows_or_globals(fn, "logp", spec);

  GmpoParams<S> p;
  p.lo = static_cast<S>(-opt.clip_low);
  p.hi = static_cast<S>(opt.clip_high);
  In in;
  set_input(in, 0, lp.data);
  set_input(in, 1, old.data);
  set_input(in, 2, adv.data);
  in.mask = mask.data;
  in.rows = lp.rows;
  in.cols = lp.cols;
  in.off = lp.off;
  GmpoResult<S, M, In> result(fn, in, p, "grad", AllKernels{}, opt.threads);
  const TokenStats st = result.template run<AllKernels>(spec, grad_out);
  using E = GmpoMetricEntries;
  auto& sums = result.metric_sums.sums;
  sums[E::weight] = st.weight;
  sums[E::clipped] = st.sums[0];
  sums[E::clipped_low] = st.sums[1];
  sums[E::approx_kl] = st.sums[2];
  result.metrics = result.metric_sums.metrics();
  return result;
}

template <class LP, class OLP, class AD, class MK, class G>
auto gmpo_views(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const GmpoOptions& opt,
                G* grad_out) {
  constexpr const char* fn = "gmpo";
  using In = token_inputs_t<tensor_scalar_t<MK>, tensor_scalar_t<LP>, tensor_scalar_t<LP>, tensor_scalar_t<OLP>,
                            tensor_scalar_t<AD>>;
  return gmpo_impl<In>(matrix_view(logp, fn, "logp"), matrix_view(old_logp, fn, "old_logp"),
                       matrix_view(advantages, fn, "advantages"), matrix_view(mask, fn, "mask"), opt, grad_out);
}

}  // namespace detail

/// @brief GMPO's loss over row-major [batch, tokens] tensors, or over a packed batch (every
/// token argument pl::packed(values, cu_seqlens) with the same offsets).
///
/// verl compute_policy_loss_geo_mean (verl/trainer/ppo/core_algos.py, 1dda039), with d = logp -
/// old_logp, W_i the row's mask weight and w the mask weight of a token:
///   u_t = sgn(A_t) min(sgn(A_t) d_t, sgn(A_t) clamp(d_t, -clip_low, clip_high))
///       (min(d, clamp(d)) for A > 0, max(d, clamp(d)) for A < 0, 0 for A = 0);
///   rho_i = exp(sum_t w u_t / (W_i + 1e-8)),  Abar_i = sum_t w A_t / (W_i + 1e-8);
///   loss = sum_i (-Abar_i rho_i) / B   (or / sequence_count).
/// verl averages the advantages because GMPO is defined for one advantage a sequence; so is this.
/// No log-ratio clamp: verl has it commented out, so rho overflows to inf where a row's mean
/// log-ratio passes 88.7 (float) or 709.8 (double) for A < 0 — as in verl. An empty row gives 0 and
/// still counts in B. The means are over the row as this call sees it: a row split over shards (sequence
/// parallelism) must be whole in one call.
///
/// `.losses[i]` is row i's -Abar_i rho_i / B (its tokens each carry -Abar_i rho_i / W_i, so a
/// row's float sum may differ from the row loss in the last bits). `.backward(grad)` writes
/// d loss / d logp_t = w_t (-Abar_i rho_i) / (B (W_i + 1e-8)) where u_t follows d_t (A > 0 and
/// d <= clip_high, or A < 0 and d >= -clip_low, boundaries included: torch's tie rule gives the
/// full gradient there), 0 elsewhere and at masked-out tokens.
///
/// Inputs as ppo_clip: float, double, Eigen::bfloat16 or Eigen::half (one type, or a mix of float,
/// bf16 and half computed in float); the gradient has logp's storage type. Masked-out tokens may
/// hold inf/NaN and never influence anything.
/// @return GmpoResult; holds views of the inputs until backward() has run.
/// @throws shape_error naming the argument (shape mismatch, invalid packed layouts, an empty
/// batch without sequence_count); value_error for a float mask weight that is negative, NaN or
/// infinite; option_error for clip_low or clip_high < 0 or not finite, or sequence_count <= 0.
/// Nothing is written on error.
template <class LP, class OLP, class AD, class MK>
auto gmpo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const GmpoOptions& opt = {}) {
  detail::policy_grad_check<LP, OLP, AD, MK, detail::NoGrad>();
  return detail::gmpo_views(logp, old_logp, advantages, mask, opt, &detail::no_grad);
}

/// @brief Fused gmpo: the row passes, then the loss and d loss / d logp in one pass into
/// grad_out ([batch, tokens] or packed, fully overwritten).
template <class LP, class OLP, class AD, class MK, class G>
auto gmpo(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const GmpoOptions& opt,
          G&& grad_out) {
  detail::policy_grad_check<LP, OLP, AD, MK, G>();
  return detail::gmpo_views(logp, old_logp, advantages, mask, opt, &grad_out);
}

}  // namespace prefloss
