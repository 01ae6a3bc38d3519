/// @file rl/group_advantages.hpp
/// GRPO outcome advantages (Shao et al. 2024): each sequence's score relative to the other
/// samples of its prompt, as verl's compute_grpo_outcome_advantage computes them.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"

namespace prefloss {

/// Options of group_advantages(). Defaults are verl's.
struct GroupOptions {
  double epsilon = 1e-6;     ///< >= 0: added to the group's standard deviation before dividing
  bool scale_by_std = true;  ///< false: A = s - mean only (Dr.GRPO; verl norm_adv_by_std_in_grpo=False)
  /// A group of one divides by (1 + epsilon) rounded to float32, as verl's does: its std is the
  /// float32 torch.tensor(1.0), so std + epsilon is a float32 sum whatever the scores' type
  /// (1 / (1 + 1e-6) = 0.9999990463 rather than 0.9999990000). false (default): in double.
  bool singleton_std_float32 = false;
};

namespace detail {

/// Writes the advantages of the samples idx[0..n) of one group.
template <class S>
void group_advantage(const S* s, const Index* idx, std::size_t n, const GroupOptions& opt, S* out) {
  double mean = 0, sd = 1;  // verl: a group of one has mean 0 and std 1
  if (n > 1) {
    for (std::size_t k = 0; k < n; ++k) mean += static_cast<double>(s[idx[k]]);
    mean /= static_cast<double>(n);
    double ss = 0;
    for (std::size_t k = 0; k < n; ++k) {
      const double c = static_cast<double>(s[idx[k]]) - mean;
      ss += c * c;
    }
    sd = std::sqrt(ss / static_cast<double>(n - 1));  // torch.std: unbiased
  }
  const double denominator = n == 1 && opt.singleton_std_float32
                                 ? static_cast<double>(1.0f + static_cast<float>(opt.epsilon))
                                 : sd + opt.epsilon;
  for (std::size_t k = 0; k < n; ++k) {
    const double a = static_cast<double>(s[idx[k]]) - mean;
    out[idx[k]] = static_cast<S>(opt.scale_by_std ? a / denominator : a);
  }
}

template <class SC, class O>
auto group_prologue(const char* fn, const SC& scores, O& out, const GroupOptions& opt) {
  using S = tensor_scalar_t<SC>;
  static_assert(is_real_v<S>, "prefloss: scores must be float or double");
  static_assert(std::is_same_v<tensor_scalar_t<O>, S>, "prefloss: out must have the scores' scalar type");
  require_option(opt.epsilon >= 0 && std::isfinite(opt.epsilon), fn, "epsilon", ">= 0 and finite", opt.epsilon);
  const auto s = vector_view(scores, fn, "scores");
  S* o = vector_out(out, s.size, fn, "out");
  return std::make_pair(s, o);
}

}  // namespace detail

/// @brief GRPO advantages for contiguous groups: samples [k g, (k+1) g) share a prompt.
///
/// Per group with scores s_j (n > 1 samples): A_j = (s_j - mean) / (std + epsilon), std the
/// unbiased standard deviation (torch.std); A_j = s_j - mean when !scale_by_std. A group of one
/// sample uses mean 0 and std 1, as verl does (A = s / (1 + epsilon); verl rounds 1 + epsilon
/// to float32, which singleton_std_float32 reproduces). scale_by_std = false is
/// Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_j = s_j - mean, as verl's
/// norm_adv_by_std_in_grpo=False, and TRL's scale_rewards="none" for groups of two or more (TRL
/// gives a lone sample 0, verl its score); grpo_reward_advantages() in rl/advantages.hpp has
/// TRL's other scalings. Arithmetic in double; out may be scores itself.
/// @param scores [batch] float/double (verl: token_level_rewards summed per sequence)
/// @param group_size samples per prompt, >= 1, dividing the batch (any value >= 1 for an empty
/// batch, which has no groups)
/// @param out [batch], same scalar type
/// @throws shape_error naming the argument (out's shape, a batch not divisible by group_size);
/// option_error for group_size < 1 or epsilon < 0. Nothing is written then.
template <class SC, class G, class O, std::enable_if_t<std::is_integral_v<G>, int> = 0>
void group_advantages(const SC& scores, G group_size, const GroupOptions& opt, O&& out) {
  constexpr const char* fn = "group_advantages";
  if (!(group_size >= 1))
    throw option_error(std::string(fn) + ": option 'group_size' must be >= 1, got " + std::to_string(group_size));
  const auto [s, o] = detail::group_prologue(fn, scores, out, opt);
  // Compared in the widest unsigned type before any cast: a group_size past Index's range (or
  // past the batch) must not wrap into a divisor or size an allocation.
  const auto batch = static_cast<unsigned long long>(s.size);
  const auto size = static_cast<unsigned long long>(group_size);
  if (batch % size != 0)
    throw shape_error(std::string(fn) + ": argument 'scores' has shape " + detail::shape_str(s.size) +
                      ", not a multiple of group_size " + std::to_string(group_size));
  if (batch == 0) return;
  const Index g = static_cast<Index>(size);  // divides batch, so it fits
  std::vector<Index> idx(static_cast<std::size_t>(g));
  for (Index start = 0; start < s.size; start += g) {
    std::iota(idx.begin(), idx.end(), start);
    detail::group_advantage(s.data, idx.data(), idx.size(), opt, o);
  }
}

/// @brief GRPO advantages for arbitrary groups: samples with equal group_ids[i] share a prompt
/// (verl's `index`/uid). Same formula as the group_size overload.
/// @param group_ids [batch] tensor of an integer type
/// @throws shape_error naming 'group_ids' or 'out'; option_error for epsilon < 0.
template <class SC, class ID, class O, std::enable_if_t<detail::is_tensor_v<ID>, int> = 0>
void group_advantages(const SC& scores, const ID& group_ids, const GroupOptions& opt, O&& out) {
  constexpr const char* fn = "group_advantages";
  static_assert(std::is_integral_v<detail::tensor_scalar_t<ID>>, "prefloss: group_ids must be an integer tensor");
  const auto [s, o] = detail::group_prologue(fn, scores, out, opt);
  const auto ids = detail::vector_view(group_ids, fn, "group_ids");
  if (ids.size != s.size)
    detail::require_same(fn, "group_ids", detail::shape_str(ids.size), "scores", detail::shape_str(s.size));
  std::vector<Index> order(static_cast<std::size_t>(s.size));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return ids.data[a] < ids.data[b]; });
  std::size_t begin = 0;
  while (begin < order.size()) {
    std::size_t end = begin + 1;
    while (end < order.size() && ids.data[order[end]] == ids.data[order[begin]]) ++end;
    detail::group_advantage(s.data, order.data() + begin, end - begin, opt, o);
    begin = end;
  }
}

}  // namespace prefloss
