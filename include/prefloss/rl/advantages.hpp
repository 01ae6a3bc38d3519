/// @file rl/advantages.hpp
/// Outcome and token-level advantage estimators besides GAE and GRPO: RLOO, REINFORCE++ (with
/// and without a group baseline), ReMax and OPO as verl computes them, and TRL's GRPO reward
/// scaling (scale_rewards, multi-reward aggregation). GRPO and Dr.GRPO are group_advantages()
/// (rl/group_advantages.hpp, GroupOptions::scale_by_std).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "whiten.hpp"

namespace prefloss {

namespace detail {

/// The prompts of a batch: order[start[k] .. start[k + 1]) are the batch indices of group k,
/// ascending within a group; groups in ascending id order (contiguous groups: batch order).
struct Groups {
  std::vector<Index> order;
  std::vector<std::size_t> start{0};
  std::size_t count() const noexcept { return start.size() - 1; }
  const Index* members(std::size_t k) const noexcept { return order.data() + start[k]; }
  std::size_t size(std::size_t k) const noexcept { return start[k + 1] - start[k]; }
};

template <class G>
void require_group_size(const char* fn, const char* option, G group_size) {
  if (!(group_size >= 1))
    throw option_error(std::string(fn) + ": option '" + option + "' must be >= 1, got " + std::to_string(group_size));
}

/// Samples [k g, (k + 1) g) share a prompt; `name` is the [batch] argument whose extent g divides.
template <class G>
Groups contiguous_groups(const char* fn, const char* option, const char* name, Index batch, G group_size) {
  require_group_size(fn, option, group_size);
  // Compared in the widest unsigned type before any cast: a group size past Index's range must
  // not wrap into a divisor.
  const auto b = static_cast<unsigned long long>(batch), g = static_cast<unsigned long long>(group_size);
  if (b % g != 0)
    throw shape_error(std::string(fn) + ": argument '" + name + "' has shape " + shape_str(batch) +
                      ", not a multiple of " + option + " " + std::to_string(group_size));
  Groups r;
  r.order.resize(static_cast<std::size_t>(batch));
  std::iota(r.order.begin(), r.order.end(), Index(0));
  for (unsigned long long e = g; e <= b; e += g) r.start.push_back(static_cast<std::size_t>(e));
  return r;
}

/// Samples with equal group_ids[i] share a prompt (verl's `index` / uid).
template <class ID>
Groups id_groups(const char* fn, const ID& group_ids, const char* name, Index batch) {
  static_assert(std::is_integral_v<tensor_scalar_t<ID>>, "prefloss: group_ids must be an integer tensor");
  const auto ids = vector_view(group_ids, fn, "group_ids");
  if (ids.size != batch) require_same(fn, "group_ids", shape_str(ids.size), name, shape_str(batch));
  Groups r;
  r.order.resize(static_cast<std::size_t>(batch));
  std::iota(r.order.begin(), r.order.end(), Index(0));
  std::stable_sort(r.order.begin(), r.order.end(), [&](Index a, Index b) { return ids.data[a] < ids.data[b]; });
  for (std::size_t k = 1; k < r.order.size(); ++k)
    if (ids.data[r.order[k]] != ids.data[r.order[k - 1]]) r.start.push_back(k);
  if (!r.order.empty()) r.start.push_back(r.order.size());
  return r;
}

template <class GR>
Groups make_groups(const char* fn, const GR& grouping, const char* name, Index batch) {
  if constexpr (std::is_integral_v<GR>)
    return contiguous_groups(fn, "group_size", name, batch, grouping);
  else
    return id_groups(fn, grouping, name, batch);
}

template <class SC, class O>
auto scores_prologue(const char* fn, const SC& scores, O& out) {
  using S = tensor_scalar_t<SC>;
  static_assert(is_real_v<S>, "prefloss: scores must be float or double");
  static_assert(std::is_same_v<tensor_scalar_t<O>, S>, "prefloss: out must have the scores' scalar type");
  const auto s = vector_view(scores, fn, "scores");
  S* o = vector_out(out, s.size, fn, "out");
  return std::make_pair(s, o);
}

template <class SC, class GR, class O>
void rloo_impl(const SC& scores, const GR& grouping, O& out) {
  constexpr const char* fn = "rloo_advantages";
  const auto [s, o] = scores_prologue(fn, scores, out);
  const Groups g = make_groups(fn, grouping, "scores", s.size);
  for (std::size_t k = 0; k < g.count(); ++k) {
    const Index* idx = g.members(k);
    const std::size_t n = g.size(k);
    if (n == 1) {  // verl: no other sample, no baseline; the score passes through
      o[idx[0]] = s.data[idx[0]];
      continue;
    }
    double sum = 0;
    for (std::size_t j = 0; j < n; ++j) sum += static_cast<double>(s.data[idx[j]]);
    const double others = static_cast<double>(n - 1);
    for (std::size_t j = 0; j < n; ++j) {
      const double x = static_cast<double>(s.data[idx[j]]);
      o[idx[j]] = static_cast<tensor_scalar_t<SC>>(x - (sum - x) / others);
    }
  }
}

template <class SC, class L, class GR, class O>
void opo_impl(const SC& scores, const L& lengths, const GR& grouping, O& out) {
  constexpr const char* fn = "opo_advantages";
  using S = tensor_scalar_t<SC>;
  static_assert(std::is_arithmetic_v<tensor_scalar_t<L>> && !std::is_same_v<tensor_scalar_t<L>, bool>,
                "prefloss: lengths must be a real or integer tensor");
  const auto [s, o] = scores_prologue(fn, scores, out);
  const auto len = vector_view(lengths, fn, "lengths");
  if (len.size != s.size) require_same(fn, "lengths", shape_str(len.size), "scores", shape_str(s.size));
  for (Index i = 0; i < len.size; ++i) {
    const double l = static_cast<double>(len.data[i]);
    if (!(l >= 0 && l < HUGE_VAL))
      throw value_error(std::string(fn) + ": argument 'lengths' must hold finite values >= 0, got " + fmt(l) + " at " +
                        shape_str(i));
  }
  const Groups g = make_groups(fn, grouping, "scores", s.size);
  // Every baseline first: a group whose lengths sum to 0 must throw before anything is written.
  std::vector<double> baseline(g.count(), 0.0);
  for (std::size_t k = 0; k < g.count(); ++k) {
    const Index* idx = g.members(k);
    const std::size_t n = g.size(k);
    if (n == 1) continue;  // verl: baseline 0
    double sl = 0, sls = 0;
    for (std::size_t j = 0; j < n; ++j) {
      const double l = static_cast<double>(len.data[idx[j]]);
      sl += l;
      sls += l * static_cast<double>(s.data[idx[j]]);
    }
    if (!(sl > 0))
      throw value_error(std::string(fn) + ": argument 'lengths' sums to 0 over the " + std::to_string(n) +
                        " samples of the group of sample " + shape_str(idx[0]) +
                        "; the length-weighted baseline is 0 / 0 (verl gives NaN)");
    baseline[k] = sls / sl;
  }
  for (std::size_t k = 0; k < g.count(); ++k)
    for (std::size_t j = 0; j < g.size(k); ++j) {
      const Index i = g.members(k)[j];
      o[i] = static_cast<S>(static_cast<double>(s.data[i]) - baseline[k]);
    }
}

/// Throws where masked_whiten (and verl) would: nothing selected, or W <= 1 for the unbiased variance.
inline void require_whiten_weight(double sw, const WhitenOptions& opt, const char* fn, const std::string& mask_shape) {
  if (!(sw > 0) || (opt.unbiased && !(sw > 1)))
    throw error(std::string(fn) + ": argument 'mask' has weight sum " + fmt(sw) + " over shape " + mask_shape +
                (opt.unbiased ? "; the unbiased variance needs a weight sum > 1" : "; it must select something"));
}

template <class M>
double mask_weight_sum(const Matrix<M>& m) {
  double w = 0;
  for (Index k = 0; k < m.count(); ++k)
    if (m.data[k] != M(0)) w += static_cast<double>(m.data[k]);
  return w;
}

template <class SC, class GR, class MK, class O>
void reinforce_pp_baseline_impl(const SC& scores, const GR& grouping, const MK& mask, const WhitenOptions& opt,
                                O&& out) {
  constexpr const char* fn = "reinforce_pp_baseline_advantages";
  using S = tensor_scalar_t<SC>;
  using M = tensor_scalar_t<MK>;
  static_assert(is_real_v<S>, "prefloss: scores must be float or double");
  static_assert(is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(std::is_same_v<tensor_scalar_t<O>, S>, "prefloss: out must have the scores' scalar type");
  require_whiten_options(opt, fn);
  const auto s = vector_view(scores, fn, "scores");
  const auto m = matrix_view(mask, fn, "mask");
  if (m.rows != s.size)
    throw shape_error(std::string(fn) + ": argument 'mask' has " + std::to_string(m.rows) + " rows (" +
                      layout_str(m.layout()) + ") but 'scores' has shape " + shape_str(s.size));
  require_weights<S>(m, fn, "mask");
  const auto o = matrix_out(std::forward<O>(out), m.layout(), fn, "out");
  const Groups g = make_groups(fn, grouping, "scores", s.size);
  const double sw = mask_weight_sum(m);
  require_whiten_weight(sw, opt, fn, layout_str(m.layout()));

  // a_i = s_i - mean of its group (verl: a group of one has mean 0), tiled over the row's tokens.
  std::vector<double> a(static_cast<std::size_t>(s.size)), w(static_cast<std::size_t>(s.size), 0.0);
  for (std::size_t k = 0; k < g.count(); ++k) {
    const Index* idx = g.members(k);
    const std::size_t n = g.size(k);
    double mean = 0;
    if (n > 1) {
      for (std::size_t j = 0; j < n; ++j) mean += static_cast<double>(s.data[idx[j]]);
      mean /= static_cast<double>(n);
    }
    for (std::size_t j = 0; j < n; ++j)
      a[static_cast<std::size_t>(idx[j])] = static_cast<double>(s.data[idx[j]]) - mean;
  }
  for (Index i = 0; i < m.rows; ++i) {
    const M* mi = m.row(i);
    for (Index t = 0; t < m.len(i); ++t)
      if (mi[t] != M(0)) w[static_cast<std::size_t>(i)] += static_cast<double>(mi[t]);
  }
  // Row i stands for its W_i tokens of value a_i; an empty row (W_i = 0) is skipped, not
  // multiplied, so its score cannot reach the statistics as 0 * NaN.
  double swx = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (w[i] != 0) swx += w[i] * a[i];
  const WhitenMap f = whiten_map(
      sw, swx,
      [&](double mean) {
        double ss = 0;
        for (std::size_t i = 0; i < a.size(); ++i)
          if (w[i] != 0) ss += w[i] * (a[i] - mean) * (a[i] - mean);
        return ss;
      },
      opt);
  for (Index i = 0; i < m.rows; ++i) {
    const M* mi = m.row(i);
    S* oi = o.row(i);
    const S v = static_cast<S>(f(a[static_cast<std::size_t>(i)]));
    for (Index t = 0; t < m.len(i); ++t) oi[t] = mi[t] != M(0) ? v : S(0);
  }
}

}  // namespace detail

// ---- RLOO -------------------------------------------------------------------------------------

/// @brief RLOO advantages (Ahmadian et al. 2024) for contiguous groups: samples [k g, (k+1) g)
/// share a prompt.
///
/// Each sample's baseline is the mean score of the other samples of its prompt: in a group of
/// n > 1 scores s_j,
///   A_j = s_j - (sum_k s_k - s_j) / (n - 1) = n / (n - 1) * (s_j - mean),
/// and a group of one passes its score through, A = s. That is verl's
/// `compute_rloo_outcome_advantage` (verl-project/verl, verl/trainer/ppo/core_algos.py, commit
/// 1dda039b9), which leaves the lone score unchanged; its `compute_rloo_vectorized_outcome_advantage`
/// gives 0 there instead. Arithmetic in double; NaN/inf scores propagate within their group, as
/// in verl. out may be scores itself.
/// @param scores [batch] float/double (verl: token_level_rewards summed per sequence)
/// @param group_size samples per prompt, >= 1, dividing the batch
/// @param out [batch], same scalar type
/// @throws shape_error naming 'scores' (batch not divisible by group_size) or 'out';
/// option_error for group_size < 1. Nothing is written then.
template <class SC, class G, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void rloo_advantages(const SC& scores, G group_size, O&& out) {
  detail::rloo_impl(scores, group_size, out);
}

/// @brief RLOO advantages for arbitrary groups: samples with equal group_ids[i] share a prompt
/// (verl's `index`). Same formula as the group_size overload.
/// @param group_ids [batch] tensor of an integer type
/// @throws shape_error naming 'group_ids' or 'out'. Nothing is written then.
template <class SC, class ID, class O, std::enable_if_t<detail::is_tensor_v<ID>, int> = 0>
void rloo_advantages(const SC& scores, const ID& group_ids, O&& out) {
  detail::rloo_impl(scores, group_ids, out);
}

// ---- OPO --------------------------------------------------------------------------------------

/// @brief OPO advantages (Hao et al. 2025, On-Policy RL with Optimal reward baseline): the
/// baseline is the length-weighted mean score of the prompt's samples.
///
/// In a group of n > 1 samples with scores s_j and response lengths L_j,
///   b = sum_j L_j s_j / sum_j L_j,  A_j = s_j - b;
/// a group of one has b = 0 (A = s). That is verl's `compute_opo_outcome_advantage`
/// (verl-project/verl, verl/trainer/ppo/core_algos.py, commit 1dda039b9), where
/// L = response_mask.sum(-1). Arithmetic in double. out may be scores itself.
/// @param scores [batch] float/double
/// @param lengths [batch] real or integer tensor: each response's token count (or mask weight)
/// @param group_size samples per prompt, >= 1, dividing the batch
/// @param out [batch], same scalar type as scores
/// @throws shape_error naming 'scores', 'lengths' or 'out'; option_error for group_size < 1;
/// value_error for a negative or non-finite length, or a group of n > 1 whose lengths sum to 0
/// (verl divides 0 by 0 and gives NaN). Nothing is written then.
template <class SC, class L, class G, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void opo_advantages(const SC& scores, const L& lengths, G group_size, O&& out) {
  detail::opo_impl(scores, lengths, group_size, out);
}

/// @brief OPO advantages for arbitrary groups (equal group_ids[i] share a prompt). Same
/// formula as the group_size overload.
/// @param group_ids [batch] tensor of an integer type
/// @throws as the group_size overload, naming 'group_ids' for its shape.
template <class SC, class L, class ID, class O, std::enable_if_t<detail::is_tensor_v<ID>, int> = 0>
void opo_advantages(const SC& scores, const L& lengths, const ID& group_ids, O&& out) {
  detail::opo_impl(scores, lengths, group_ids, out);
}

// ---- REINFORCE++ ------------------------------------------------------------------------------

/// @brief REINFORCE++-baseline advantages (Hu et al. 2025): the score minus its group's mean,
/// tiled over the response tokens and whitened over every valid token of the batch.
///
/// In a group of n > 1 scores a_i = s_i - mean_group(s) (a group of one: mean 0, a_i = s_i).
/// Then over the tokens (i, t) with mask w_it != 0, W_i = sum_t w_it, W = sum_i W_i:
///   mean = sum_i W_i a_i / W,  var = sum_i W_i (a_i - mean)^2 / W  (times W / (W - 1) when
///   opt.unbiased),  out[i, t] = (a_i - mean) / sqrt(var + opt.eps)  (+ mean when !shift_mean),
/// and out = 0 at masked tokens. This is masked_whiten() of the tiled a_i, as verl's
/// `compute_reinforce_plus_plus_baseline_outcome_advantage` (verl-project/verl,
/// verl/trainer/ppo/core_algos.py, commit 1dda039b9) computes
/// `masked_whiten(a.unsqueeze(-1).tile(T) * mask, mask) * mask`: longer responses weigh more.
/// For 0/1 masks the two agree exactly; a fractional float mask weights the statistics as
/// masked_whiten does, where verl would also scale the tiled values and the output by it. verl's
/// epsilon argument is unused there. Masked tokens are never read (they may hold anything); an
/// empty row's score still enters its group's mean, as in verl. Arithmetic in double.
/// @param scores [batch] float/double
/// @param group_size samples per prompt, >= 1, dividing the batch
/// @param mask row-major [batch, tokens] (or pl::packed with batch rows) of bool, uint8_t, float
/// or double
/// @param opt the whitening; defaults are verl's masked_whiten (unbiased, eps 1e-8)
/// @param out [batch, tokens] (packed: [total_tokens] or pl::packed), scores' scalar type
/// @throws shape_error naming 'scores', 'mask' or 'out'; option_error for group_size < 1 or
/// eps < 0; value_error for a negative or NaN mask weight; prefloss::error when the mask's
/// weight sum is 0 (or <= 1 when unbiased), where verl raises too. Nothing is written then.
template <class SC, class G, class MK, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void reinforce_pp_baseline_advantages(const SC& scores, G group_size, const MK& mask, const WhitenOptions& opt,
                                      O&& out) {
  detail::reinforce_pp_baseline_impl(scores, group_size, mask, opt, std::forward<O>(out));
}

/// @brief REINFORCE++-baseline advantages for arbitrary groups (equal group_ids[i] share a
/// prompt). Same formula as the group_size overload.
/// @param group_ids [batch] tensor of an integer type
/// @throws as the group_size overload, naming 'group_ids' for its shape.
template <class SC, class ID, class MK, class O, std::enable_if_t<detail::is_tensor_v<ID>, int> = 0>
void reinforce_pp_baseline_advantages(const SC& scores, const ID& group_ids, const MK& mask, const WhitenOptions& opt,
                                      O&& out) {
  detail::reinforce_pp_baseline_impl(scores, group_ids, mask, opt, std::forward<O>(out));
}

/// Options of reinforce_pp_advantages(). Defaults are verl's (algorithm.gamma = 1, and
/// masked_whiten's own defaults).
struct ReinforcePPOptions {
  double gamma = 1.0;      ///< in [0, 1]: discount of the token-level return
  WhitenOptions whiten{};  ///< the whitening of the returns (verl: masked_whiten's defaults)
};

/// @brief REINFORCE++ advantages (Hu et al. 2025): token-level discounted returns, whitened
/// over every valid token of the batch.
///
/// Backwards along each row, at valid tokens t (mask != 0; a float mask selects here):
///   G = r[t] + gamma * G_next,  returns[t] = G,  then G_next = G;  G_next = 0 after the row's
/// end. Masked tokens are skipped: they neither discount nor reset the return, so a reward after
/// an observation span reaches the tokens before it, as verl carries running_return through
/// them. Then advantages = masked_whiten(returns, mask, opt.whiten) (the mask's weights enter
/// the statistics as in masked_whiten). This is verl's
/// `compute_reinforce_plus_plus_outcome_advantage` (verl-project/verl,
/// verl/trainer/ppo/core_algos.py, commit 1dda039b9). Both outputs are 0 at masked tokens, and
/// the inputs there are never read, so they may hold inf/NaN (verl multiplies by the mask: NaN
/// padding would reach its returns). Returns are kept in double for the whitening. Outputs may
/// alias the rewards.
/// @param token_rewards row-major [batch, tokens] float/double (or pl::packed)
/// @param mask same layout; bool, uint8_t, float or double
/// @param advantages_out, returns_out the rewards' layout and scalar type, fully overwritten
/// @throws shape_error naming the argument; option_error for gamma outside [0, 1] or
/// whiten.eps < 0; value_error for a negative or NaN mask weight; layout_error when the outputs
/// overlap; prefloss::error when the mask's weight sum is 0 (or <= 1 when unbiased). Nothing is
/// written then.
template <class R, class MK, class A, class RT>
void reinforce_pp_advantages(const R& token_rewards, const MK& mask, const ReinforcePPOptions& opt, A&& advantages_out,
                             RT&& returns_out) {
  constexpr const char* fn = "reinforce_pp_advantages";
  using S = detail::tensor_scalar_t<R>;
  using M = detail::tensor_scalar_t<MK>;
  static_assert(detail::is_real_v<S>, "prefloss: token_rewards must be float or double");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<A>, S> && std::is_same_v<detail::tensor_scalar_t<RT>, S>,
                "prefloss: both outputs must have token_rewards' scalar type");
  detail::require_option(opt.gamma >= 0 && opt.gamma <= 1, fn, "gamma", "in [0, 1]", opt.gamma);
  detail::require_option(opt.whiten.eps >= 0 && std::isfinite(opt.whiten.eps), fn, "eps", ">= 0 and finite",
                         opt.whiten.eps);
  const auto r = detail::matrix_view(token_rewards, fn, "token_rewards");
  const auto m = detail::matrix_view(mask, fn, "mask");
  detail::require_same_shape(fn, "mask", m, "token_rewards", r);
  detail::require_weights<S>(m, fn, "mask");
  const auto adv = detail::matrix_out(std::forward<A>(advantages_out), r.layout(), fn, "advantages_out");
  const auto ret = detail::matrix_out(std::forward<RT>(returns_out), r.layout(), fn, "returns_out");
  detail::require_disjoint(fn, "advantages_out", advantages_out, "returns_out", returns_out);
  const double sw = detail::mask_weight_sum(m);
  detail::require_whiten_weight(sw, opt.whiten, fn, detail::layout_str(m.layout()));

  std::vector<double> g(static_cast<std::size_t>(r.count()), 0.0);
  detail::for_each_row(r.layout(), [&](Index i, Index begin, Index len) {
    const S* ri = r.row(i);
    const M* mi = m.row(i);
    double next = 0;
    for (Index t = len - 1; t >= 0; --t)
      if (mi[t] != M(0)) {
        next = static_cast<double>(ri[t]) + opt.gamma * next;
        g[static_cast<std::size_t>(begin + t)] = next;
      }
  });
  double swx = 0;
  for (Index k = 0; k < m.count(); ++k)
    if (m.data[k] != M(0)) swx += static_cast<double>(m.data[k]) * g[static_cast<std::size_t>(k)];
  const double mean = swx / sw;
  double ss = 0;
  for (Index k = 0; k < m.count(); ++k)
    if (m.data[k] != M(0)) {
      const double c = g[static_cast<std::size_t>(k)] - mean;
      ss += static_cast<double>(m.data[k]) * c * c;
    }
  double var = ss / sw;
  if (opt.whiten.unbiased) var *= sw / (sw - 1);
  const double inv = 1.0 / std::sqrt(var + opt.whiten.eps);
  const double add = opt.whiten.shift_mean ? 0.0 : mean;
  for (Index k = 0; k < m.count(); ++k) {
    const bool on = m.data[k] != M(0);
    const double gk = g[static_cast<std::size_t>(k)];
    adv.data[k] = on ? static_cast<S>((gk - mean) * inv + add) : S(0);
    ret.data[k] = on ? static_cast<S>(gk) : S(0);
  }
}

// ---- ReMax ------------------------------------------------------------------------------------

/// @brief ReMax advantages (Li et al. 2023): the undiscounted return-to-go minus the reward of
/// the prompt's greedy response.
///
/// Along each row, at valid tokens t (mask != 0; a float mask selects):
///   returns[t] = sum of r[t'] over valid t' >= t,  advantages[t] = returns[t] - b_i,
/// with b_i = reward_baselines[i]. This is verl's `compute_remax_outcome_advantage`
/// (verl-project/verl, verl/trainer/ppo/core_algos.py, commit 1dda039b9):
/// `returns = (r * mask).flip(-1).cumsum(-1).flip(-1); advantages = returns - b * mask`. At
/// masked tokens both outputs are 0 here; verl leaves the suffix sum there (inside a masked span
/// it is the return of the next valid token), which its masked losses never read. Masked inputs
/// are never read (they may hold inf/NaN). Arithmetic in double. Outputs may alias the rewards.
/// @param token_rewards row-major [batch, tokens] float/double (or pl::packed)
/// @param reward_baselines [batch], same scalar type: the greedy response's reward per prompt
/// @param mask same layout as token_rewards; bool, uint8_t, float or double
/// @param advantages_out, returns_out the rewards' layout and scalar type, fully overwritten
/// @throws shape_error naming the argument; value_error for a negative or NaN mask weight;
/// layout_error when the outputs overlap. Nothing is written then.
template <class R, class BL, class MK, class A, class RT>
void remax_advantages(const R& token_rewards, const BL& reward_baselines, const MK& mask, A&& advantages_out,
                      RT&& returns_out) {
  constexpr const char* fn = "remax_advantages";
  using S = detail::tensor_scalar_t<R>;
  using M = detail::tensor_scalar_t<MK>;
  static_assert(detail::is_real_v<S>, "prefloss: token_rewards must be float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<BL>, S>,
                "prefloss: reward_baselines must have token_rewards' scalar type");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<A>, S> && std::is_same_v<detail::tensor_scalar_t<RT>, S>,
                "prefloss: both outputs must have token_rewards' scalar type");
  const auto r = detail::matrix_view(token_rewards, fn, "token_rewards");
  const auto b = detail::vector_view(reward_baselines, fn, "reward_baselines");
  const auto m = detail::matrix_view(mask, fn, "mask");
  if (b.size != r.rows)
    throw shape_error(std::string(fn) + ": argument 'reward_baselines' has shape " + detail::shape_str(b.size) +
                      " but 'token_rewards' has " + std::to_string(r.rows) + " rows (" +
                      detail::layout_str(r.layout()) + ")");
  detail::require_same_shape(fn, "mask", m, "token_rewards", r);
  detail::require_weights<S>(m, fn, "mask");
  const auto adv = detail::matrix_out(std::forward<A>(advantages_out), r.layout(), fn, "advantages_out");
  const auto ret = detail::matrix_out(std::forward<RT>(returns_out), r.layout(), fn, "returns_out");
  detail::require_disjoint(fn, "advantages_out", advantages_out, "returns_out", returns_out);
  for (Index i = 0; i < r.rows; ++i) {
    const S* ri = r.row(i);
    const M* mi = m.row(i);
    S* ai = adv.row(i);
    S* gi = ret.row(i);
    const double bi = static_cast<double>(b.data[i]);
    double sum = 0;
    for (Index t = r.len(i) - 1; t >= 0; --t) {
      if (mi[t] != M(0)) {
        sum += static_cast<double>(ri[t]);
        ai[t] = static_cast<S>(sum - bi);
        gi[t] = static_cast<S>(sum);
      } else {
        ai[t] = S(0);
        gi[t] = S(0);
      }
    }
  }
}

// ---- TRL GRPO reward scaling -------------------------------------------------------------------

/// TRL GRPOConfig.scale_rewards: the standard deviation that divides the centered rewards.
enum class RewardScaling {
  group,  ///< each prompt's group (TRL's default, GRPO)
  batch,  ///< the whole batch, around each group's mean (PPO Lite)
  none    ///< no division (Dr.GRPO)
};

/// TRL GRPOConfig.multi_objective_aggregation: how several reward functions combine.
enum class RewardAggregation {
  sum_then_normalize,  ///< weighted sum per completion, then scale_rewards (TRL's default)
  normalize_then_sum   ///< each function normalized per group, weighted sum, then batch-normalized (GDPO)
};

/// Options of grpo_reward_advantages(). Defaults are TRL's GRPOConfig.
struct GrpoRewardOptions {
  RewardScaling scale_rewards = RewardScaling::group;
  RewardAggregation aggregation = RewardAggregation::sum_then_normalize;
  /// One finite weight per reward function (TRL reward_weights); empty: 1 each (TRL's default).
  std::vector<double> reward_weights = {};
  double epsilon = 1e-4;  ///< >= 0, finite: added to every standard deviation (TRL hard-codes 1e-4)
};

namespace detail {

/// TRL's nanmean / nanstd (unbiased) of the entries of x picked by idx: NaN entries are left
/// out; the mean of none and the std of fewer than two are NaN.
struct NanStats {
  double mean, std;
};
template <class F>
NanStats nan_stats(std::size_t n, F&& x) {
  double sum = 0;
  std::size_t c = 0;
  for (std::size_t j = 0; j < n; ++j)
    if (!std::isnan(x(j))) {
      sum += x(j);
      ++c;
    }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (c == 0) return {nan, nan};
  const double mean = sum / static_cast<double>(c);
  if (c < 2) return {mean, nan};
  double ss = 0;
  for (std::size_t j = 0; j < n; ++j)
    if (!std::isnan(x(j))) ss += (x(j) - mean) * (x(j) - mean);
  return {mean, std::sqrt(ss / static_cast<double>(c - 1))};
}

}  // namespace detail

/// @brief GRPO advantages from one or several reward functions, as TRL's GRPOTrainer forms
/// them: samples [k g, (k+1) g) are the g = num_generations completions of prompt k.
///
/// x_ik is reward function k's score of completion i, NaN where the function did not score it
/// (TRL's None); w_k the reward weights; eps = opt.epsilon; nanmean / nanstd leave NaN out, and
/// nanstd is unbiased (Bessel) and NaN for fewer than two values, as TRL's `nanstd`.
///
/// sum_then_normalize: R_i = sum over non-NaN k of w_k x_ik (NaN when every x_ik is NaN);
/// A_i = R_i - nanmean_group(R), divided by (sigma + eps) unless scale_rewards = none, where
/// sigma = nanstd_group(R) (group; 0 when g = 1) or nanstd over the batch (batch; 0 for a batch
/// of one; still around each group's mean).
///
/// normalize_then_sum: z_ik = (x_ik - nanmean_group(x_.k)) / (nanstd_group(x_.k) + eps) (std 0
/// when g = 1); R_i = sum of the non-NaN w_k z_ik (NaN when every x_ik is NaN, else 0 if every
/// z_ik is NaN); A_i = (R_i - nanmean_batch(R)) / (nanstd_batch(R) + eps) (std 0 for a batch of
/// one). scale_rewards is not used, as in TRL.
///
/// Finally a NaN advantage becomes 0 (torch.nan_to_num): an unscorable completion, or a group
/// (batch) with fewer than two scorable completions where a std is needed, has A = 0.
/// This is TRL's `GRPOTrainer._generate_and_score_completions` (huggingface/trl,
/// trl/trainer/grpo_trainer.py, commit f2cd57710; nanstd in trl/trainer/utils.py). Arithmetic
/// in double (TRL: float32).
/// @param rewards_per_func rank-1 [batch] (one reward function) or row-major rank-2
/// [batch, functions] float/double; NaN marks "not scored", +-inf is rejected
/// @param num_generations completions per prompt, >= 1, dividing the batch
/// @param out [batch], same scalar type
/// @throws shape_error naming 'rewards_per_func' (batch not divisible) or 'out'; option_error for
/// num_generations < 1, epsilon < 0, an unknown enum value, reward_weights of the wrong length or
/// holding a non-finite weight; value_error for an infinite reward (naming its position).
/// Nothing is written then.
template <class RW, class G, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void grpo_reward_advantages(const RW& rewards_per_func, G num_generations, const GrpoRewardOptions& opt, O&& out) {
  constexpr const char* fn = "grpo_reward_advantages";
  using S = detail::tensor_scalar_t<RW>;
  static_assert(detail::is_tensor_v<RW> && (detail::tensor_rank_v<RW> == 1 || detail::tensor_rank_v<RW> == 2),
                "prefloss: rewards_per_func is a rank-1 [batch] or rank-2 [batch, functions] tensor");
  static_assert(detail::is_real_v<S>, "prefloss: rewards_per_func must be float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<O>, S>, "prefloss: out must have the rewards' scalar type");
  detail::require_enum(opt.scale_rewards == RewardScaling::group || opt.scale_rewards == RewardScaling::batch ||
                           opt.scale_rewards == RewardScaling::none,
                       fn, "scale_rewards", static_cast<int>(opt.scale_rewards));
  detail::require_enum(opt.aggregation == RewardAggregation::sum_then_normalize ||
                           opt.aggregation == RewardAggregation::normalize_then_sum,
                       fn, "aggregation", static_cast<int>(opt.aggregation));
  detail::require_option(opt.epsilon >= 0 && std::isfinite(opt.epsilon), fn, "epsilon", ">= 0 and finite", opt.epsilon);
  if constexpr (detail::tensor_rank_v<RW> == 2)
    static_assert(static_cast<int>(detail::remove_cvref_t<RW>::Layout) == static_cast<int>(Eigen::RowMajor),
                  "prefloss: rank-2 rewards_per_func must be row-major (Eigen::RowMajor)");
  detail::require_aligned(rewards_per_func.data(), fn, "rewards_per_func");
  const Index B = static_cast<Index>(rewards_per_func.dimension(0));
  const Index K = detail::tensor_rank_v<RW> == 2 ? static_cast<Index>(rewards_per_func.dimension(1)) : Index(1);
  const S* x = rewards_per_func.data();
  const std::size_t nk = static_cast<std::size_t>(K);
  if (!opt.reward_weights.empty() && opt.reward_weights.size() != nk)
    throw option_error(std::string(fn) + ": option 'reward_weights' must hold one weight per reward function (" +
                       std::to_string(K) + "), got " + std::to_string(opt.reward_weights.size()));
  for (std::size_t k = 0; k < opt.reward_weights.size(); ++k)
    if (!std::isfinite(opt.reward_weights[k]))
      throw option_error(std::string(fn) + ": option 'reward_weights' must be finite, got " +
                         detail::fmt(opt.reward_weights[k]) + " at [" + std::to_string(k) + "]");
  for (Index k = 0; k < B * K; ++k)
    if (std::isinf(x[k]))
      throw value_error(std::string(fn) + ": argument 'rewards_per_func' must hold finite rewards or NaN, got " +
                        detail::fmt(static_cast<double>(x[k])) + " at " +
                        (detail::tensor_rank_v<RW> == 2 ? detail::shape_str(k / K, k % K) : detail::shape_str(k)));
  S* o = detail::vector_out(out, B, fn, "out");
  const detail::Groups grp = detail::contiguous_groups(fn, "num_generations", "rewards_per_func", B, num_generations);
  const std::size_t g = static_cast<std::size_t>(num_generations);  // divides B, so it fits
  const std::size_t nb = static_cast<std::size_t>(B);
  const auto weight = [&](std::size_t k) { return opt.reward_weights.empty() ? 1.0 : opt.reward_weights[k]; };
  const auto at = [&](std::size_t i, std::size_t k) { return static_cast<double>(x[i * nk + k]); };
  const auto scorable = [&](std::size_t i) {
    for (std::size_t k = 0; k < nk; ++k)
      if (!std::isnan(at(i, k))) return true;
    return false;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> R(nb), A(nb);
  if (opt.aggregation == RewardAggregation::sum_then_normalize) {
    for (std::size_t i = 0; i < nb; ++i) {
      double sum = 0;
      for (std::size_t k = 0; k < nk; ++k)
        if (!std::isnan(at(i, k))) sum += weight(k) * at(i, k);
      R[i] = scorable(i) ? sum : nan;
    }
    double batch_std = 0;
    if (opt.scale_rewards == RewardScaling::batch && nb > 1)
      batch_std = detail::nan_stats(nb, [&](std::size_t i) { return R[i]; }).std;
    for (std::size_t a = 0; a < grp.count(); ++a) {
      const std::size_t b0 = a * g;
      const auto st = detail::nan_stats(g, [&](std::size_t j) { return R[b0 + j]; });
      const double sd = opt.scale_rewards == RewardScaling::batch ? batch_std : (g > 1 ? st.std : 0.0);
      for (std::size_t j = 0; j < g; ++j) {
        const double c = R[b0 + j] - st.mean;
        A[b0 + j] = opt.scale_rewards == RewardScaling::none ? c : c / (sd + opt.epsilon);
      }
    }
  } else {
    std::vector<double> z(nb * nk);
    for (std::size_t a = 0; a < grp.count(); ++a)
      for (std::size_t k = 0; k < nk; ++k) {
        const std::size_t b0 = a * g;
        const auto st = detail::nan_stats(g, [&](std::size_t j) { return at(b0 + j, k); });
        const double sd = g > 1 ? st.std : 0.0;
        for (std::size_t j = 0; j < g; ++j) z[(b0 + j) * nk + k] = (at(b0 + j, k) - st.mean) / (sd + opt.epsilon);
      }
    for (std::size_t i = 0; i < nb; ++i) {
      double sum = 0;  // torch.nansum: NaN terms left out, all-NaN sums to 0
      for (std::size_t k = 0; k < nk; ++k) {
        const double t = weight(k) * z[i * nk + k];
        if (!std::isnan(t)) sum += t;
      }
      R[i] = scorable(i) ? sum : nan;
    }
    const auto st = detail::nan_stats(nb, [&](std::size_t i) { return R[i]; });
    const double sd = nb > 1 ? st.std : 0.0;
    for (std::size_t i = 0; i < nb; ++i) A[i] = (R[i] - st.mean) / (sd + opt.epsilon);
  }
  for (std::size_t i = 0; i < nb; ++i) o[i] = std::isnan(A[i]) ? S(0) : static_cast<S>(A[i]);
}

}  // namespace prefloss
