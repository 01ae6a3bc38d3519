/// @file loss/cov_policy.hpp
/// Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
/// Reasoning Language Models", arXiv 2505.22617): policy losses that counter entropy collapse by
/// acting on the few tokens whose advantage and log-prob covary most. Each is two steps: a
/// selection over the whole call (clip_cov_select, kl_cov_select), which is not differentiable
/// and writes a 0/1 tensor, and a token loss that takes that tensor as a constant input
/// (clip_cov, kl_cov) on the streaming driver of ppo_clip. Keeping them apart makes the loss a
/// smooth function of logp (finite differences and torch autograd agree with it), lets a trainer
/// log or replace the selection, and makes the random choice of Clip-Cov reproducible.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/lowp.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/aggregation.hpp"
#include "policy_gradient.hpp"
#include "token_loss.hpp"

namespace prefloss {

/// @brief Options of clip_cov_select() and clip_cov(). Defaults are verl's
/// (compute_policy_loss_clip_cov: clip_ratio 0.2 on both sides, clip_cov_ratio 2e-4,
/// clip_cov_lb 1, clip_cov_ub 5, token-mean).
struct ClipCovOptions {
  double clip_low = 0.2;   ///< in [0, 1]: the ratio is clipped below at 1 - clip_low (verl clip_ratio_low)
  double clip_high = 0.2;  ///< >= 0 and finite: clipped above at 1 + clip_high (verl clip_ratio_high)
  /// in (0, 1]: the selection takes max(floor(cov_ratio * sum of the mask weights), 1) tokens
  /// (verl clip_cov_ratio)
  double cov_ratio = 2e-4;
  double cov_lower = 1.0;  ///< finite: candidates have cov > cov_lower (verl clip_cov_lb)
  double cov_upper = 5.0;  ///< finite, > cov_lower: and cov < cov_upper (verl clip_cov_ub)
  /// the random choice among the candidates (see clip_cov_select): the same seed and inputs give
  /// the same selection on every platform
  std::uint64_t seed = 0;
  Aggregation aggregation = Aggregation::token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// Threads the loss and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief Options of kl_cov_select() and kl_cov(). Defaults are verl's
/// (compute_policy_loss_kl_cov: kl_cov_ratio 2e-4, ppo_kl_coef 1, token-mean).
struct KlCovOptions {
  /// in (0, 1]: the selection takes the max(floor(cov_ratio * valid tokens), 1) tokens of largest
  /// cov (verl kl_cov_ratio)
  double cov_ratio = 2e-4;
  double kl_coef = 1.0;  ///< >= 0 and finite: weight of |logp - old_logp| at selected tokens (verl ppo_kl_coef)
  Aggregation aggregation = Aggregation::token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// Threads the loss and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// @brief What clip_cov_select / kl_cov_select found, in double.
struct CovSelection {
  double valid_tokens = 0;  ///< tokens with mask != 0
  double mask_weight = 0;   ///< sum of the mask weights (valid_tokens for a 0/1 mask)
  double adv_mean = 0;      ///< the advantages' mean the covariance is centred by (0 without a valid token)
  double logp_mean = 0;     ///< the log-probs' mean the covariance is centred by
  /// clip-cov: valid tokens not clipped by the PPO clip with cov_lower < cov < cov_upper;
  /// kl-cov: the valid tokens
  double candidates = 0;
  double target = 0;    ///< tokens asked for: max(floor(cov_ratio * n), 1), 0 without a valid token
  double selected = 0;  ///< tokens written 1: min(target, candidates)
};

/// @brief Metrics of clip_cov (verl logs pg_clipfrac, which for Clip-Cov is the selected share,
/// and ppo_kl). Means over valid tokens weighted by the mask, 0 when there is none.
template <class S>
struct ClipCovMetrics {
  S selected_fraction = 0;  ///< share of tokens whose loss is dropped (verl actor/pg_clipfrac of clip_cov)
  S clip_fraction = 0;      ///< share of tokens whose clipped branch is strictly larger (ppo_clip's clip_fraction)
  S approx_kl = 0;          ///< mean of old_logp - logp (verl actor/ppo_kl)
  S ratio_mean = 0;         ///< mean of r = exp(logp - old_logp)
  S ratio_max = 0;          ///< max of r over valid tokens (0 when none)
  double token_weight = 0;  ///< sum of the mask weights, in double
};

/// @brief Entries of MetricSums<ClipCovMetrics<S>>: five sums weighted by the mask, one maximum.
struct ClipCovMetricEntries {
  static constexpr std::size_t weight = 0;     ///< sums: mask weight of the valid tokens
  static constexpr std::size_t selected = 1;   ///< sums: selected tokens
  static constexpr std::size_t clipped = 2;    ///< sums: tokens whose clipped branch is strictly larger
  static constexpr std::size_t approx_kl = 3;  ///< sums: old_logp - logp
  static constexpr std::size_t ratio = 4;      ///< sums: r
  static constexpr std::size_t n_sums = 5;
  static constexpr std::size_t ratio_max = 0;  ///< maxima: r over valid tokens (-inf: none)
  static constexpr std::size_t n_maxima = 1;
};

/// @brief Metrics of kl_cov (verl logs ppo_kl, which for KL-Cov is the mean of |logp - old_logp|).
/// Means over valid tokens weighted by the mask, 0 when there is none.
template <class S>
struct KlCovMetrics {
  S abs_kl = 0;             ///< mean of |logp - old_logp| (verl actor/ppo_kl of kl_cov)
  S selected_fraction = 0;  ///< share of tokens that carry the KL term
  S approx_kl = 0;          ///< mean of old_logp - logp (the other losses' ppo_kl)
  S ratio_mean = 0;         ///< mean of r = exp(logp - old_logp)
  S ratio_max = 0;          ///< max of r over valid tokens (0 when none)
  double token_weight = 0;  ///< sum of the mask weights, in double
};

/// @brief Entries of MetricSums<KlCovMetrics<S>>: five sums weighted by the mask, one maximum.
struct KlCovMetricEntries {
  static constexpr std::size_t weight = 0;     ///< sums: mask weight of the valid tokens
  static constexpr std::size_t abs_kl = 1;     ///< sums: |logp - old_logp|
  static constexpr std::size_t selected = 2;   ///< sums: selected tokens
  static constexpr std::size_t approx_kl = 3;  ///< sums: old_logp - logp
  static constexpr std::size_t ratio = 4;      ///< sums: r
  static constexpr std::size_t n_sums = 5;
  static constexpr std::size_t ratio_max = 0;  ///< maxima: r over valid tokens (-inf: none)
  static constexpr std::size_t n_maxima = 1;
};

namespace detail {

template <class S>
struct metric_layout<ClipCovMetrics<S>> {
  using Entries = ClipCovMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static ClipCovMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                    const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    ClipCovMetrics<S> m;
    m.selected_fraction = static_cast<S>(mean_or_zero(sums[E::selected], w));
    m.clip_fraction = static_cast<S>(mean_or_zero(sums[E::clipped], w));
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.ratio_mean = static_cast<S>(mean_or_zero(sums[E::ratio], w));
    m.ratio_max = static_cast<S>(w != 0 ? maxima[E::ratio_max] : 0.0);
    m.token_weight = w;
    return m;
  }
};

template <class S>
struct metric_layout<KlCovMetrics<S>> {
  using Entries = KlCovMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static KlCovMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                  const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    const double w = sums[E::weight];
    KlCovMetrics<S> m;
    m.abs_kl = static_cast<S>(mean_or_zero(sums[E::abs_kl], w));
    m.selected_fraction = static_cast<S>(mean_or_zero(sums[E::selected], w));
    m.approx_kl = static_cast<S>(mean_or_zero(sums[E::approx_kl], w));
    m.ratio_mean = static_cast<S>(mean_or_zero(sums[E::ratio], w));
    m.ratio_max = static_cast<S>(w != 0 ? maxima[E::ratio_max] : 0.0);
    m.token_weight = w;
    return m;
  }
};

/// Per-token Clip-Cov loss (1 - s) max(-A r, -A clip(r, lo, hi)), s = [selected != 0], and its
/// derivative with ppo_clip's torch conventions (the clamp passes the gradient on [lo, hi]
/// inclusive, ties split); a selected token contributes exactly 0 and no gradient.
template <class S>
struct ClipCovKernel {
  static constexpr std::size_t n_in = 4;    // logp, old_logp, advantages, selected
  static constexpr std::size_t n_sums = 4;  // selected, clipped, old - logp, ratio
  static constexpr bool has_max = true;     // ratio
  S lo, hi;                                 // 1 - clip_low, 1 + clip_high

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1)), half(S(0.5));
    const B lp = x[0], A = x[2];
    const B d = lp - x[1];
    const B r = exp_ratio(d);
    const B na = -A;
    const B l1 = na * r;
    const B l2 = na * xsimd::min(xsimd::max(r, B(lo)), B(hi));
    const auto keep = x[3] == zero;
    if constexpr (Fwd) {
      o.loss = xsimd::select(keep, xsimd::max(l1, l2), zero);
      o.sums[0] = xsimd::select(keep, zero, one);
      o.sums[1] = xsimd::select(l2 > l1, one, zero);
      o.sums[2] = -d;
      o.sums[3] = r;
      o.max = r;
    }
    if constexpr (Bwd) {
      const B g1 = na * r;
      const B g2 = xsimd::select((r >= B(lo)) & (r <= B(hi)), g1, zero);
      const B gm = xsimd::select(l1 > l2, g1, xsimd::select(l1 < l2, g2, half * (g1 + g2)));
      o.grad = xsimd::select(keep, gm, zero);
    } else {
      o.grad = zero;
    }
  }
};

/// Per-token KL-Cov loss -A r + s c |logp - old_logp|, s = [selected != 0], and its derivative
/// -A r + s c sign(logp - old_logp) (torch's abs: sign(0) = 0).
template <class S>
struct KlCovKernel {
  static constexpr std::size_t n_in = 4;    // logp, old_logp, advantages, selected
  static constexpr std::size_t n_sums = 4;  // |logp - old|, selected, old - logp, ratio
  static constexpr bool has_max = true;     // ratio
  S coef;                                   // kl_coef

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1));
    const B d = x[0] - x[1];
    const B r = exp_ratio(d);
    const B na = -x[2];
    const auto sel = x[3] != zero;
    const B ad = xsimd::abs(d);
    if constexpr (Fwd) {
      o.loss = na * r + xsimd::select(sel, B(coef) * ad, zero);
      o.sums[0] = ad;
      o.sums[1] = xsimd::select(sel, one, zero);
      o.sums[2] = -d;
      o.sums[3] = r;
      o.max = r;
    }
    if constexpr (Bwd) {
      const B sign = xsimd::select(d > zero, one, xsimd::select(d < zero, -one, zero));
      o.grad = na * r + xsimd::select(sel, B(coef) * sign, zero);
    } else {
      o.grad = zero;
    }
  }
};

template <class S>
struct ClipCovParams {
  ClipCovKernel<S> kernel;
  template <class Sel, class F>
  void visit(F&& f) const {
    f(kernel);
  }
};
template <class S>
struct KlCovParams {
  KlCovKernel<S> kernel;
  template <class Sel, class F>
  void visit(F&& f) const {
    f(kernel);
  }
};

}  // namespace detail

/// Result of clip_cov: .loss, .losses, .metrics, .backward(grad) (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using ClipCovResult = TokenLossResult<S, M, detail::ClipCovParams<S>, ClipCovMetrics<S>, In>;
/// Result of kl_cov: .loss, .losses, .metrics, .backward(grad) (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using KlCovResult = TokenLossResult<S, M, detail::KlCovParams<S>, KlCovMetrics<S>, In>;

namespace detail {

/// splitmix64 (Steele, Lea, Flood 2014): a fixed, portable stream from the caller's seed.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() noexcept {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, n), n >= 1, without modulo bias (rejection on the low word).
  std::uint64_t below(std::uint64_t n) noexcept {
    const std::uint64_t limit = (0 - n) % n;  // 2^64 mod n
    for (;;) {
      const std::uint64_t v = next();
      if (v >= limit) return v % n;
    }
  }
};

/// The share of selected tokens asked for: max(floor(ratio * n), 1), 0 when n is 0.
inline double cov_target(double ratio, double n) noexcept {
  return n > 0 ? std::fmax(std::floor(ratio * n), 1.0) : 0.0;
}

template <class LP, class AD, class MK, class SO>
constexpr void cov_select_checks() {
  static_assert(is_token_scalar_v<tensor_scalar_t<LP>> && is_token_scalar_v<tensor_scalar_t<AD>>,
                "prefloss: log-probs and advantages must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(is_mask_v<tensor_scalar_t<MK>>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(is_token_scalar_v<tensor_scalar_t<SO>>,
                "prefloss: selected_out must be a float, double, Eigen::bfloat16 or Eigen::half tensor (a loss input)");
}

inline void require_cov_ratio(const char* fn, double ratio) {
  require_option(ratio > 0 && ratio <= 1, fn, "cov_ratio", "in (0, 1]", ratio);
}

/// Writes 1 at the flat positions in `chosen`, 0 everywhere else.
template <class T>
void write_selection(const MatrixOut<T>& out, const std::vector<Index>& chosen) {
  const Index n = out.count();
  for (Index k = 0; k < n; ++k) out.data[k] = T(0);
  for (const Index k : chosen) out.data[k] = T(1);
}

}  // namespace detail

/// @brief Clip-Cov's token selection: writes selected_out[i,t] = 1 at the tokens whose loss
/// clip_cov drops, 0 everywhere else (masked-out tokens included).
///
/// Over the valid tokens (mask != 0) of this call, with mask-weighted means (verl masked_mean)
///   cov_t = (A_t - mean(A)) (logp_t - mean(logp)),
/// the candidates are the valid tokens with cov_lower < cov_t < cov_upper whose PPO clip does not
/// bind (-A clip(r) > -A r is false, r = exp(logp - old_logp), in double), and
/// n = min(max(floor(cov_ratio * sum of the mask weights), 1), candidates) of them are chosen
/// uniformly at random without replacement: the candidates in row-major order (row, then
/// token), a partial Fisher-Yates shuffle of their first n places driven by splitmix64 seeded
/// with `seed`, unbiased bounded draws by rejection. verl draws with torch.randperm from torch's
/// global generator instead: the same distribution over subsets, not the same subset.
///
/// Source: verl compute_policy_loss_clip_cov (verl/trainer/ppo/core_algos.py, 1dda039; adapted by
/// verl from PRIME-RL/Entropy-Mechanism-of-RL). Differences: verl's masked_mean divides by
/// sum(mask) + 1e-8, here by sum(mask); verl computes cov and the clip test in the inputs' dtype
/// (float32 in training), here in double, which can only differ for a token within rounding of a
/// bound. The selection is of this call's tokens (verl: of the micro-batch): it needs the whole
/// batch in one call, as verl's means do.
///
/// @param logp, old_logp, advantages row-major [batch, tokens] tensors or maps (float, double,
/// bf16, half), or all pl::packed(values, cu_seqlens) with the same offsets
/// @param mask same shape: bool/uint8 (nonzero selects) or float/double (weights)
/// @param selected_out same shape (rank-1 [total_tokens] or pl::packed for packed input) of a
/// token type; fully overwritten; pass it to clip_cov as `selected`
/// @throws shape_error naming the argument; option_error for cov_ratio outside (0, 1], a
/// non-finite cov_lower / cov_upper or cov_upper <= cov_lower, clip_low outside [0, 1], clip_high
/// < 0 or not finite; value_error for a non-finite logp, old_logp or advantages at a valid token
/// (naming the argument and [row, token]) or a bad mask weight; layout_error for a misaligned
/// output. Nothing is written on error. Allocates the candidate list.
template <class LP, class OLP, class AD, class MK, class SO>
CovSelection clip_cov_select(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask,
                             const ClipCovOptions& opt, SO&& selected_out) {
  using namespace detail;
  cov_select_checks<LP, AD, MK, SO>();
  static_assert(is_token_scalar_v<tensor_scalar_t<OLP>>, "prefloss: old_logp must be float, double, bf16 or half");
  constexpr const char* fn = "clip_cov_select";
  require_option(opt.clip_low >= 0 && opt.clip_low <= 1, fn, "clip_low", "in [0, 1]", opt.clip_low);
  require_option(opt.clip_high >= 0 && std::isfinite(opt.clip_high), fn, "clip_high", ">= 0 and finite", opt.clip_high);
  require_cov_ratio(fn, opt.cov_ratio);
  require_option(std::isfinite(opt.cov_lower), fn, "cov_lower", "finite", opt.cov_lower);
  require_option(std::isfinite(opt.cov_upper) && opt.cov_upper > opt.cov_lower, fn, "cov_upper",
                 "finite and > cov_lower", opt.cov_upper);
  const auto lp = matrix_view(logp, fn, "logp");
  const auto old = matrix_view(old_logp, fn, "old_logp");
  const auto adv = matrix_view(advantages, fn, "advantages");
  const auto mk = matrix_view(mask, fn, "mask");
  require_same_shape(fn, "old_logp", old, "logp", lp);
  require_same_shape(fn, "advantages", adv, "logp", lp);
  require_same_shape(fn, "mask", mk, "logp", lp);
  require_weights<double>(mk, fn, "mask");
  const auto out = matrix_out(selected_out, lp.layout(), fn, "selected_out");
  require_finite_at_valid(lp, mk, fn, "logp");
  require_finite_at_valid(old, mk, fn, "old_logp");
  require_finite_at_valid(adv, mk, fn, "advantages");

  using M = tensor_scalar_t<MK>;
  const Index n = lp.count();
  CovSelection s;
  double sum_a = 0, sum_lp = 0;
  for (Index k = 0; k < n; ++k) {
    if (mk.data[k] == M(0)) continue;
    const double w = static_cast<double>(mk.data[k]);
    s.valid_tokens += 1;
    s.mask_weight += w;
    sum_a += w * static_cast<double>(adv.data[k]);
    sum_lp += w * static_cast<double>(lp.data[k]);
  }
  s.adv_mean = mean_or_zero(sum_a, s.mask_weight);
  s.logp_mean = mean_or_zero(sum_lp, s.mask_weight);
  const double lo = 1.0 - opt.clip_low, hi = 1.0 + opt.clip_high;
  std::vector<Index> cand;
  for (Index k = 0; k < n; ++k) {
    if (mk.data[k] == M(0)) continue;
    const double a = static_cast<double>(adv.data[k]), x = static_cast<double>(lp.data[k]);
    const double r = std::exp(x - static_cast<double>(old.data[k]));
    const bool clipped = -a * std::fmin(std::fmax(r, lo), hi) > -a * r;
    const double cov = (a - s.adv_mean) * (x - s.logp_mean);
    if (!clipped && cov > opt.cov_lower && cov < opt.cov_upper) cand.push_back(k);
  }
  s.candidates = static_cast<double>(cand.size());
  s.target = cov_target(opt.cov_ratio, s.mask_weight);
  const std::size_t take = static_cast<std::size_t>(std::fmin(s.target, s.candidates));
  SplitMix64 rng{opt.seed};
  for (std::size_t j = 0; j < take; ++j) {
    const std::size_t pick = j + static_cast<std::size_t>(rng.below(cand.size() - j));
    std::swap(cand[j], cand[pick]);
  }
  cand.resize(take);
  s.selected = static_cast<double>(take);
  write_selection(out, cand);
  return s;
}

/// @brief KL-Cov's token selection: writes selected_out[i,t] = 1 at the tokens that carry
/// kl_cov's KL term, 0 everywhere else.
///
/// Over the valid tokens (mask != 0) of this call, with plain (unweighted) means over them, as
/// verl's (it gathers advantages[mask > 0] and takes .mean()),
///   cov_t = (A_t - mean(A)) (logp_t - mean(logp)),
/// the n = max(floor(cov_ratio * valid tokens), 1) tokens of largest cov_t are selected (none
/// without a valid token). Ties at the n-th value go to the earlier token in row-major order
/// (torch.topk leaves their order unspecified).
///
/// Source: verl compute_policy_loss_kl_cov (verl/trainer/ppo/core_algos.py, 1dda039; torch.topk
/// over cov of the valid tokens). As verl, a float mask only selects here: its weights do not
/// enter the means. cov is computed in double (verl: in the inputs' dtype), which can change the
/// choice only between tokens whose cov is within rounding of each other.
///
/// @param logp, advantages, mask, selected_out as clip_cov_select (no old_logp: the selection
/// does not read it)
/// @throws shape_error naming the argument; option_error for cov_ratio outside (0, 1];
/// value_error for a non-finite logp or advantages at a valid token or a bad mask weight;
/// layout_error for a misaligned output. Nothing is written on error. Allocates O(valid tokens).
template <class LP, class AD, class MK, class SO>
CovSelection kl_cov_select(const LP& logp, const AD& advantages, const MK& mask, const KlCovOptions& opt,
                           SO&& selected_out) {
  using namespace detail;
  cov_select_checks<LP, AD, MK, SO>();
  constexpr const char* fn = "kl_cov_select";
  require_cov_ratio(fn, opt.cov_ratio);
  const auto lp = matrix_view(logp, fn, "logp");
  const auto adv = matrix_view(advantages, fn, "advantages");
  const auto mk = matrix_view(mask, fn, "mask");
  require_same_shape(fn, "advantages", adv, "logp", lp);
  require_same_shape(fn, "mask", mk, "logp", lp);
  require_weights<double>(mk, fn, "mask");
  const auto out = matrix_out(selected_out, lp.layout(), fn, "selected_out");
  require_finite_at_valid(lp, mk, fn, "logp");
  require_finite_at_valid(adv, mk, fn, "advantages");

  using M = tensor_scalar_t<MK>;
  const Index n = lp.count();
  CovSelection s;
  std::vector<Index> valid;
  double sum_a = 0, sum_lp = 0;
  for (Index k = 0; k < n; ++k) {
    if (mk.data[k] == M(0)) continue;
    valid.push_back(k);
    s.mask_weight += static_cast<double>(mk.data[k]);
    sum_a += static_cast<double>(adv.data[k]);
    sum_lp += static_cast<double>(lp.data[k]);
  }
  s.valid_tokens = static_cast<double>(valid.size());
  s.candidates = s.valid_tokens;
  s.adv_mean = mean_or_zero(sum_a, s.valid_tokens);
  s.logp_mean = mean_or_zero(sum_lp, s.valid_tokens);
  s.target = cov_target(opt.cov_ratio, s.valid_tokens);
  const std::size_t take = static_cast<std::size_t>(s.target);
  std::vector<std::pair<double, Index>> cov;
  cov.reserve(valid.size());
  for (const Index k : valid)
    cov.emplace_back((static_cast<double>(adv.data[k]) - s.adv_mean) * (static_cast<double>(lp.data[k]) - s.logp_mean),
                     k);
  // Largest cov first, then the earlier position.
  const auto before = [](const std::pair<double, Index>& a, const std::pair<double, Index>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::nth_element(cov.begin(), cov.begin() + static_cast<std::ptrdiff_t>(take), cov.end(), before);
  std::vector<Index> chosen;
  chosen.reserve(take);
  for (std::size_t j = 0; j < take; ++j) chosen.push_back(cov[j].second);
  s.selected = static_cast<double>(take);
  write_selection(out, chosen);
  return s;
}

namespace detail {

template <class LP, class OLP, class AD, class MK, class SL, class G>
constexpr void cov_loss_checks() {
  policy_grad_check<LP, OLP, AD, MK, G>();
  static_assert(is_token_scalar_v<tensor_scalar_t<SL>>, "prefloss: selected must be float, double, bf16 or half");
  static_assert(!std::is_void_v<typename common_token<tensor_scalar_t<LP>, tensor_scalar_t<OLP>, tensor_scalar_t<AD>,
                                                      tensor_scalar_t<SL>>::type>,
                PREFLOSS_DETAIL_MIX_MESSAGE);
}

template <class LP, class OLP, class AD, class MK, class SL>
using cov_inputs_t = token_inputs_t<tensor_scalar_t<MK>, tensor_scalar_t<LP>, tensor_scalar_t<LP>, tensor_scalar_t<OLP>,
                                    tensor_scalar_t<AD>, tensor_scalar_t<SL>>;

template <class In, class LT, class OT, class AT, class M, class ST, class G>
ClipCovResult<typename In::compute_type, M, In> clip_cov_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                              const Matrix<AT>& adv, const Matrix<M>& mask,
                                                              const Matrix<ST>& sel, const ClipCovOptions& opt,
                                                              G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "clip_cov";
  require_option(opt.clip_low >= 0 && opt.clip_low <= 1, fn, "clip_low", "in [0, 1]", opt.clip_low);
  require_option(opt.clip_high >= 0 && std::isfinite(opt.clip_high), fn, "clip_high", ">= 0 and finite", opt.clip_high);
  const AggregationSpec spec = policy_prepare<S>(fn, lp, old, adv, mask, opt);
  require_same_shape(fn, "selected", sel, "logp", lp);
  ClipCovParams<S> p;
  p.kernel.lo = static_cast<S>(1.0 - opt.clip_low);
  p.kernel.hi = static_cast<S>(1.0 + opt.clip_high);
  return policy_run<ClipCovMetrics<S>, ClipCovParams<S>, In>(fn, lp, old, adv, mask, spec, p, opt.threads, grad_out,
                                                             sel);
}

template <class In, class LT, class OT, class AT, class M, class ST, class G>
KlCovResult<typename In::compute_type, M, In> kl_cov_impl(const Matrix<LT>& lp, const Matrix<OT>& old,
                                                          const Matrix<AT>& adv, const Matrix<M>& mask,
                                                          const Matrix<ST>& sel, const KlCovOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "kl_cov";
  require_option(opt.kl_coef >= 0 && std::isfinite(opt.kl_coef), fn, "kl_coef", ">= 0 and finite", opt.kl_coef);
  const AggregationSpec spec = policy_prepare<S>(fn, lp, old, adv, mask, opt);
  require_same_shape(fn, "selected", sel, "logp", lp);
  KlCovParams<S> p;
  p.kernel.coef = static_cast<S>(opt.kl_coef);
  return policy_run<KlCovMetrics<S>, KlCovParams<S>, In>(fn, lp, old, adv, mask, spec, p, opt.threads, grad_out, sel);
}

}  // namespace detail

/// @brief Clip-Cov (Cui et al. 2025): ppo_clip's surrogate with the loss of the tokens that
/// clip_cov_select chose dropped, so that their gradient, the one that drives entropy down
/// hardest, is cut; inputs, layouts and aggregation as for cispo.
///
/// Per token, with r = exp(logp - old_logp) (no log-ratio clamp: verl has none here) and
/// s = [selected != 0]:
///   l = (1 - s) max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),
///   d l / d logp = (1 - s) (-A r where the unclipped branch is the larger, 0 where the clipped
///   one is, -A r on [lo, hi] at ties: torch's clamp and maximum conventions, as ppo_clip).
/// A selected token keeps its place in the aggregation's divisors (verl multiplies pg_losses by
/// corr = 0 and keeps response_mask), and contributes exactly 0 (verl: 0 * an overflowed ratio
/// = NaN). metrics.selected_fraction is verl's pg_clipfrac for clip_cov.
///
/// Source: verl compute_policy_loss_clip_cov (verl/trainer/ppo/core_algos.py, 1dda039; no dual
/// clip, token-mean by default) + agg_loss. The selection is a constant of the loss (verl
/// selects on detached values), so `.backward()` and the fused form differentiate l above only.
/// For rollout importance weights multiply them into the mask with the recipe of
/// rollout_is_weights.
///
/// Usage:
///   Eigen::Tensor<float, 2> sel(B, T);
///   pl::clip_cov_select(logp, old_logp, adv, mask, opt, sel);
///   auto r = pl::clip_cov(logp, old_logp, adv, mask, sel, opt);  // keep sel alive for backward()
///
/// @param selected same shape and (plain call) scalar type as logp: nonzero where the token's
/// loss is dropped; masked-out entries are never read for a value
/// @throws as cispo, and shape_error for `selected`; option_error for clip_low outside [0, 1],
/// clip_high < 0 or not finite. The selection options are not read. Nothing is written on error.
template <class LP, class OLP, class AD, class MK, class SL, detail::if_tensor_t<SL> = 0>
auto clip_cov(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SL& selected,
              const ClipCovOptions& opt = {}) {
  detail::cov_loss_checks<LP, OLP, AD, MK, SL, detail::NoGrad>();
  constexpr const char* fn = "clip_cov";
  return detail::clip_cov_impl<detail::cov_inputs_t<LP, OLP, AD, MK, SL>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"),
      detail::matrix_view(selected, fn, "selected"), opt, &detail::no_grad);
}

/// @brief Fused clip_cov: forward and d loss / d logp in one pass into grad_out (see fused cispo).
template <class LP, class OLP, class AD, class MK, class SL, class G, detail::if_tensor_t<SL> = 0,
          detail::if_tensor_t<G> = 0>
auto clip_cov(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SL& selected,
              const ClipCovOptions& opt, G&& grad_out) {
  detail::cov_loss_checks<LP, OLP, AD, MK, SL, G>();
  constexpr const char* fn = "clip_cov";
  return detail::clip_cov_impl<detail::cov_inputs_t<LP, OLP, AD, MK, SL>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"),
      detail::matrix_view(selected, fn, "selected"), opt, &grad_out);
}

/// @brief KL-Cov (Cui et al. 2025): the unclipped policy gradient -A r with an |logp - old_logp|
/// penalty on the tokens that kl_cov_select chose; inputs, layouts and aggregation as for cispo.
///
/// Per token, with r = exp(logp - old_logp) (no clip, no log-ratio clamp) and
/// s = [selected != 0]:
///   l = -A r + s kl_coef |logp - old_logp|,
///   d l / d logp = -A r + s kl_coef sign(logp - old_logp) (sign(0) = 0, as torch's abs).
/// metrics.abs_kl is verl's ppo_kl for kl_cov (the mean of |logp - old_logp|).
///
/// Source: verl compute_policy_loss_kl_cov (verl/trainer/ppo/core_algos.py, 1dda039;
/// pg_losses_kl at the top-k covariance tokens, token-mean by default) + agg_loss. r overflows to
/// inf above logp - old_logp of about 88.7 in float, as in verl.
///
/// Usage:
///   pl::kl_cov_select(logp, adv, mask, opt, sel);
///   auto r = pl::kl_cov(logp, old_logp, adv, mask, sel, opt);
///
/// @param selected as for clip_cov: nonzero where the KL term applies
/// @throws as cispo, and shape_error for `selected`; option_error for kl_coef < 0 or not finite.
/// Nothing is written on error.
template <class LP, class OLP, class AD, class MK, class SL, detail::if_tensor_t<SL> = 0>
auto kl_cov(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SL& selected,
            const KlCovOptions& opt = {}) {
  detail::cov_loss_checks<LP, OLP, AD, MK, SL, detail::NoGrad>();
  constexpr const char* fn = "kl_cov";
  return detail::kl_cov_impl<detail::cov_inputs_t<LP, OLP, AD, MK, SL>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"),
      detail::matrix_view(selected, fn, "selected"), opt, &detail::no_grad);
}

/// @brief Fused kl_cov: forward and d loss / d logp in one pass into grad_out (see fused cispo).
template <class LP, class OLP, class AD, class MK, class SL, class G, detail::if_tensor_t<SL> = 0,
          detail::if_tensor_t<G> = 0>
auto kl_cov(const LP& logp, const OLP& old_logp, const AD& advantages, const MK& mask, const SL& selected,
            const KlCovOptions& opt, G&& grad_out) {
  detail::cov_loss_checks<LP, OLP, AD, MK, SL, G>();
  constexpr const char* fn = "kl_cov";
  return detail::kl_cov_impl<detail::cov_inputs_t<LP, OLP, AD, MK, SL>>(
      detail::matrix_view(logp, fn, "logp"), detail::matrix_view(old_logp, fn, "old_logp"),
      detail::matrix_view(advantages, fn, "advantages"), detail::matrix_view(mask, fn, "mask"),
      detail::matrix_view(selected, fn, "selected"), opt, &grad_out);
}

}  // namespace prefloss
