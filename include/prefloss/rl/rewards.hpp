/// @file rl/rewards.hpp
/// Shaping and selecting sequence rewards: Llama 2's safety-gated reward and its logit
/// whitening, best-of-n (rejection sampling) selection, and OpenRLHF's reward clipping.
#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "advantages.hpp"
#include "whiten.hpp"

namespace prefloss {

// ---- Llama 2 ----------------------------------------------------------------------------------

/// Options of llama2_safety_reward(). Defaults are Llama 2's (Touvron et al. 2023, Sec. 3.2.2).
struct SafetyRewardOptions {
  double threshold = 0.15;  ///< finite: a safety score below it overrides the helpfulness score
};

/// @brief Llama 2's piecewise reward: the safety score on safety prompts or when it is low,
/// the helpfulness score otherwise.
///
///   R_c(g | p) = R_s(g | p)  if IS_SAFETY(p) or R_s(g | p) < threshold,  else R_h(g | p)
/// (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Sec. 3.2.2,
/// threshold 0.15; the paper has no reference code). The scores are the reward models' sigmoid
/// outputs; any finite value is accepted. out may alias either score tensor.
/// @param helpfulness, safety [batch] float/double: R_h and R_s
/// @param is_safety_prompt [batch] tensor of bool or an integer type: nonzero marks a prompt
/// from the safety set
/// @param out [batch], the scores' scalar type
/// @throws shape_error naming the argument; option_error for a non-finite threshold;
/// value_error for a non-finite score, naming the argument and index (also in the score the
/// gate does not pick). Nothing is written then.
template <class H, class SF, class IS, class O>
void llama2_safety_reward(const H& helpfulness, const SF& safety, const IS& is_safety_prompt,
                          const SafetyRewardOptions& opt, O&& out) {
  constexpr const char* fn = "llama2_safety_reward";
  using S = detail::tensor_scalar_t<H>;
  static_assert(detail::is_real_v<S>, "prefloss: scores must be float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<SF>, S> && std::is_same_v<detail::tensor_scalar_t<O>, S>,
                "prefloss: safety and out must have helpfulness' scalar type");
  static_assert(std::is_integral_v<detail::tensor_scalar_t<IS>>,
                "prefloss: is_safety_prompt must be a bool or integer tensor");
  detail::require_option(std::isfinite(opt.threshold), fn, "threshold", "finite", opt.threshold);
  const auto h = detail::vector_view(helpfulness, fn, "helpfulness");
  const auto s = detail::vector_view(safety, fn, "safety");
  const auto p = detail::vector_view(is_safety_prompt, fn, "is_safety_prompt");
  if (s.size != h.size)
    detail::require_same(fn, "safety", detail::shape_str(s.size), "helpfulness", detail::shape_str(h.size));
  if (p.size != h.size)
    detail::require_same(fn, "is_safety_prompt", detail::shape_str(p.size), "helpfulness", detail::shape_str(h.size));
  for (const auto& [v, name] : {std::make_pair(h.data, "helpfulness"), std::make_pair(s.data, "safety")})
    for (Index i = 0; i < h.size; ++i)
      if (!std::isfinite(v[i]))
        throw value_error(std::string(fn) + ": argument '" + name + "' must hold finite scores, got " +
                          detail::fmt(static_cast<double>(v[i])) + " at " + detail::shape_str(i));
  S* o = detail::vector_out(out, h.size, fn, "out");
  for (Index i = 0; i < h.size; ++i) {
    const double rs = static_cast<double>(s.data[i]);
    o[i] = (p.data[i] != 0 || rs < opt.threshold) ? s.data[i] : h.data[i];
  }
}

/// @brief Llama 2's reward normalization: whiten(logit(R)) over the batch.
///
///   x_i = logit(R_i) = log(R_i / (1 - R_i)),
///   out_i = (x_i - mean) / sqrt(var + eps)  (+ mean when !shift_mean),
/// mean = sum x / n, var = sum (x - mean)^2 / n, times n / (n - 1) when unbiased (n = batch).
/// Llama 2 (Touvron et al. 2023, Sec. 3.2.2) whitens "the final linear scores (shown here by
/// reversing the sigmoid with the logit function)" without naming a variance; the default here
/// is masked_whiten's (verl's): unbiased, eps 1e-8 inside the square root, so that
/// logit_whiten(R) equals masked_whiten(logit(R), all-ones mask) and one convention holds for
/// every whitening in prefloss. Set opt.unbiased = false for the population variance (then a
/// batch of one gives 0). Arithmetic in double. out may be rewards itself.
/// @param rewards [batch] float/double, each in the open interval (0, 1)
/// @param opt the whitening (WhitenOptions; defaults are verl's masked_whiten)
/// @param out [batch], same scalar type
/// @throws shape_error naming 'out'; option_error for eps < 0; value_error for a reward outside
/// (0, 1) or NaN, naming its index (logit is +-inf or NaN there); prefloss::error for an empty
/// batch, or a batch of one when unbiased. Nothing is written then.
template <class X, class O>
void logit_whiten(const X& rewards, const WhitenOptions& opt, O&& out) {
  constexpr const char* fn = "logit_whiten";
  using S = detail::tensor_scalar_t<X>;
  static_assert(detail::is_real_v<S>, "prefloss: rewards must be float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<O>, S>, "prefloss: out must have the rewards' scalar type");
  detail::require_whiten_options(opt, fn);
  const auto r = detail::vector_view(rewards, fn, "rewards");
  S* o = detail::vector_out(out, r.size, fn, "out");
  const double n = static_cast<double>(r.size);
  if (!(n > 0) || (opt.unbiased && !(n > 1)))
    throw error(std::string(fn) + ": argument 'rewards' has shape " + detail::shape_str(r.size) +
                (opt.unbiased ? "; the unbiased variance needs a batch of at least 2" : "; it must not be empty"));
  std::vector<double> x(static_cast<std::size_t>(r.size));
  for (Index i = 0; i < r.size; ++i) {
    const double v = static_cast<double>(r.data[i]);
    if (!(v > 0 && v < 1))
      throw value_error(std::string(fn) + ": argument 'rewards' must hold values in (0, 1) for the logit, got " +
                        detail::fmt(v) + " at " + detail::shape_str(i));
    x[static_cast<std::size_t>(i)] = std::log(v / (1 - v));
  }
  double sum = 0;
  for (const double v : x) sum += v;
  const detail::WhitenMap f = detail::whiten_map(
      n, sum,
      [&](double mean) {
        double ss = 0;
        for (const double v : x) ss += (v - mean) * (v - mean);
        return ss;
      },
      opt);
  for (Index i = 0; i < r.size; ++i) o[i] = static_cast<S>(f(x[static_cast<std::size_t>(i)]));
}

// ---- best-of-n ---------------------------------------------------------------------------------

namespace detail {

template <class RW, class GR, class O>
void best_of_n_impl(const RW& rewards, const GR& grouping, O& out) {
  constexpr const char* fn = "best_of_n";
  using S = tensor_scalar_t<RW>;
  using OT = tensor_scalar_t<O>;
  static_assert(is_real_v<S>, "prefloss: rewards must be float or double");
  static_assert(std::is_integral_v<OT> && !std::is_same_v<OT, bool>, "prefloss: out must be an integer tensor");
  const auto r = vector_view(rewards, fn, "rewards");
  for (Index i = 0; i < r.size; ++i)
    if (std::isnan(r.data[i]))
      throw value_error(std::string(fn) + ": argument 'rewards' holds NaN at " + shape_str(i) +
                        "; a NaN reward has no rank");
  if (r.size > 0 &&
      static_cast<unsigned long long>(r.size - 1) > static_cast<unsigned long long>(std::numeric_limits<OT>::max()))
    throw shape_error(std::string(fn) + ": argument 'rewards' has shape " + shape_str(r.size) +
                      ", whose indices do not fit out's integer type");
  const Groups g = make_groups(fn, grouping, "rewards", r.size);
  OT* o = vector_out(out, static_cast<Index>(g.count()), fn, "out");
  for (std::size_t k = 0; k < g.count(); ++k) {
    const Index* idx = g.members(k);
    Index best = idx[0];
    // Members are in ascending index order and only a strictly larger reward moves the pick: a
    // tie keeps the lowest index.
    for (std::size_t j = 1; j < g.size(k); ++j)
      if (r.data[idx[j]] > r.data[best]) best = idx[j];
    o[k] = static_cast<OT>(best);
  }
}

}  // namespace detail

/// @brief Best-of-n (rejection sampling) selection: for each prompt, the batch index of its
/// highest-reward sample; samples [k n, (k+1) n) belong to prompt k.
///
///   out[k] = argmax_{i in [k n, (k+1) n)} rewards[i],
/// ties broken towards the lowest index. Llama 2 (Touvron et al. 2023, Sec. 3.2.3) fine-tunes
/// on the best of K samples per prompt under the reward model; so do RAFT and TRL's BestOfN
/// sampler. +-inf rewards are ordered as usual; a NaN reward is rejected (it compares false
/// with everything, so it would win or lose by its position alone).
/// @param rewards [batch] float/double
/// @param n samples per prompt, >= 1, dividing the batch (any n >= 1 for an empty batch)
/// @param out [batch / n] tensor of an integer type (not bool) wide enough for batch - 1
/// @throws shape_error naming 'rewards' (batch not divisible by n, or indices too wide for out)
/// or 'out'; option_error for n < 1; value_error naming 'rewards' and the index of a NaN.
/// Nothing is written then.
template <class RW, class G, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void best_of_n(const RW& rewards, G n, O&& out) {
  detail::best_of_n_impl(rewards, n, out);
}

/// @brief Best-of-n for arbitrary groups: samples with equal group_ids[i] share a prompt.
/// out[k] is the pick of the k-th distinct id in ascending id order; ties and NaN as above.
/// @param group_ids [batch] tensor of an integer type
/// @param out [number of distinct ids] integer tensor
/// @throws shape_error naming 'group_ids' or 'out' (whose expected shape is the number of
/// distinct ids); value_error for a NaN reward. Nothing is written then.
template <class RW, class ID, class O, std::enable_if_t<detail::is_tensor_v<ID>, int> = 0>
void best_of_n(const RW& rewards, const ID& group_ids, O&& out) {
  detail::best_of_n_impl(rewards, group_ids, out);
}

// ---- reward clipping ---------------------------------------------------------------------------

/// Options of clip_rewards(). Defaults are OpenRLHF's (--reward.clip_range -10 10).
struct RewardClipOptions {
  double min = -10.0;  ///< lower bound, not NaN (-inf: no lower clip)
  double max = 10.0;   ///< upper bound, not NaN, >= min (+inf: no upper clip)
};

/// @brief Clamps sequence rewards to [min, max]: out_i = min(max(r_i, lo), hi).
///
/// OpenRLHF's reward clip (OpenRLHF/OpenRLHF, openrlhf/models/utils.py `compute_reward`,
/// commit 3c3be623: `r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])`), applied
/// there to the sequence reward after any group baseline (experience_maker.py) and before it is
/// placed on the last token. The bounds are rounded to the rewards' type, as torch does for a
/// float32 tensor. A NaN reward is rejected here; torch.clamp passes it through. OpenRLHF does
/// not check min <= max (torch then returns max everywhere); here it is an error. out may be
/// rewards itself.
/// @param rewards [batch] float/double
/// @param out [batch], same scalar type
/// @throws shape_error naming 'out'; option_error for a NaN bound or min > max; value_error
/// naming 'rewards' and the index of a NaN. Nothing is written then.
template <class RW, class O>
void clip_rewards(const RW& rewards, const RewardClipOptions& opt, O&& out) {
  constexpr const char* fn = "clip_rewards";
  using S = detail::tensor_scalar_t<RW>;
  static_assert(detail::is_real_v<S>, "prefloss: rewards must be float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<O>, S>, "prefloss: out must have the rewards' scalar type");
  detail::require_option(!std::isnan(opt.min), fn, "min", "a number", opt.min);
  detail::require_option(!std::isnan(opt.max), fn, "max", "a number", opt.max);
  if (!(opt.min <= opt.max))
    throw option_error(std::string(fn) + ": option 'min' must be <= max (" + detail::fmt(opt.max) + "), got " +
                       detail::fmt(opt.min));
  const auto r = detail::vector_view(rewards, fn, "rewards");
  for (Index i = 0; i < r.size; ++i)
    if (std::isnan(r.data[i]))
      throw value_error(std::string(fn) + ": argument 'rewards' holds NaN at " + detail::shape_str(i));
  S* o = detail::vector_out(out, r.size, fn, "out");
  const S lo = static_cast<S>(opt.min), hi = static_cast<S>(opt.max);
  for (Index i = 0; i < r.size; ++i) o[i] = r.data[i] < lo ? lo : (r.data[i] > hi ? hi : r.data[i]);
}

}  // namespace prefloss
