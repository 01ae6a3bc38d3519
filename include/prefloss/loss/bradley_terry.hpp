/// @file loss/bradley_terry.hpp
/// Bradley-Terry pairwise loss for reward models (InstructGPT, Llama 2's margin, TRL's
/// RewardTrainer with its reward-centering term).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../math/log_sigmoid.hpp"
#include "../metrics.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"
#include "sequence_loss.hpp"

namespace prefloss {

/// Options of bradley_terry(). Defaults are TRL's RewardConfig.
struct BradleyTerryOptions {
  double center_coef = 0.0;  ///< >= 0: weight of mean((r_c + r_r)^2) (TRL center_rewards_coefficient)
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count). Unset: this call's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads bradley_terry may split reward rows over when the rewards are sequence expressions
  /// (see DpoOptions::threads). bradley_terry_ranking's [batch, K] scores have no token work and
  /// run on the calling thread.
  Threads threads = {};
};

namespace detail {
template <class C, class R, class M>
auto bradley_terry_impl(const C& r_chosen, const R& r_rejected, const M* margin, const BradleyTerryOptions& opt) {
  constexpr const char* fn = "bradley_terry";
  require_same_scalar<C, R>();
  using S = typename sequence_t<C>::Scalar;
  require_option(opt.center_coef >= 0 && std::isfinite(opt.center_coef), fn, "center_coef", ">= 0 and finite",
                 opt.center_coef);
  auto c = as_sequence(r_chosen, fn, "r_chosen");
  auto r = as_sequence(r_rejected, fn, "r_rejected");
  const Index B = c.size();
  require_batch(fn, "r_rejected", r, "r_chosen", B, c.shape());
  std::optional<sequence_t<M>> m;
  if (margin) {
    m.emplace(as_sequence(*margin, fn, "margin"));
    require_batch(fn, "margin", *m, "r_chosen", B, c.shape());
  }
  const double count = batch_divisor(fn, "r_chosen", B, opt.batch_count);
  const std::vector<double> vc = values_of(c, opt.threads), vr = values_of(r, opt.threads);
  const double k = opt.center_coef;
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      fn, std::move(c), std::move(r), count,
      [&](Index i) {
        const std::size_t u = static_cast<std::size_t>(i);
        const double z = vc[u] - vr[u] - (m ? m->value(i) : 0.0);
        const auto ls = log_sigmoid_and_grad(z);
        // k * center first: with k near DBL_MAX, 2 * k alone overflows and meets center = 0 as inf * 0.
        const double center = vc[u] + vr[u];
        const double kc = k * center;
        return PairTerm{-ls.value + kc * center, -ls.grad + 2 * kc, ls.grad + 2 * kc};
      },
      static_cast<const PairGradViews<sequence_t<C>, sequence_t<R>>*>(nullptr), opt.threads);
  set_preference_metrics(result, vc, vr);
  return result;
}
}  // namespace detail

/// @brief Bradley-Terry loss: mean over pairs of `-logsig(r_c - r_r) + k (r_c + r_r)^2`.
///
/// TRL's RewardTrainer loss (k = center_coef). With k = 0 it is also OpenRLHF's reward-model
/// losses (OpenRLHF/OpenRLHF, openrlhf/models/loss.py, commit 3c3be623): `PairWiseLoss`
/// (-logsigmoid(r_c - r_r [- margin]).mean()) and `LogExpLoss`
/// (log(1 + exp(r_r - r_c)).mean(), which takes a margin argument and ignores it: use this
/// overload, not the margin one, to match it). Computed stably: LogExpLoss's literal form
/// overflows in float32 once r_r - r_c > ~88.7 (OpenRLHF's float32 loss of that pair is inf;
/// here it is ~100 for r_r - r_c = 100). Metrics: PreferenceMetrics with the raw rewards
/// (reward_accuracy = fraction with r_c > r_r).
/// @param r_chosen, r_rejected rewards: [batch] tensors (or sequence expressions)
/// @throws shape_error on batch mismatch or empty batch; option_error for center_coef < 0.
template <class C, class R>
auto bradley_terry(const C& r_chosen, const R& r_rejected, const BradleyTerryOptions& opt = {}) {
  return detail::bradley_terry_impl(r_chosen, r_rejected, static_cast<const C*>(nullptr), opt);
}

/// @brief Bradley-Terry loss with a per-pair margin m (Llama 2; OpenRLHF's PairWiseLoss with a
/// margin when k = 0): mean of `-logsig(r_c - r_r - m) + k (r_c + r_r)^2`. The margin is a
/// constant [batch] tensor.
template <class C, class R, class M, class = std::enable_if_t<detail::is_tensor_v<M>>>
auto bradley_terry(const C& r_chosen, const R& r_rejected, const M& margin, const BradleyTerryOptions& opt = {}) {
  detail::require_same_scalar<C, M>();
  return detail::bradley_terry_impl(r_chosen, r_rejected, &margin, opt);
}

/// Metrics of bradley_terry_ranking().
template <class S>
struct RankingMetrics {
  S accuracy = 0;       ///< fraction of pairs i < j (i ranked better) with r_i > r_j strictly
  S reward_mean = 0;    ///< mean of all rewards
  S reward_margin = 0;  ///< mean over pairs i < j of r_i - r_j
};

/// @brief Entries of MetricSums<RankingMetrics<S>>: five sums, no maxima. The two counts are
/// C(K,2) and K per row, summed: the denominators of the means, so shards of one K merge exactly.
struct RankingMetricEntries {
  static constexpr std::size_t accurate = 0;      ///< sums: pairs i < j with r_i > r_j
  static constexpr std::size_t margin = 1;        ///< sums: r_i - r_j over pairs i < j
  static constexpr std::size_t reward = 2;        ///< sums: every reward
  static constexpr std::size_t pair_count = 3;    ///< sums: pairs, C(K,2) a row
  static constexpr std::size_t reward_count = 4;  ///< sums: rewards, K a row
  static constexpr std::size_t n_sums = 5;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
template <class S>
struct metric_layout<RankingMetrics<S>> {
  using Entries = RankingMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static RankingMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                    const std::array<double, n_maxima>&) noexcept {
    using E = Entries;
    RankingMetrics<S> m;
    if (sums[E::pair_count] != 0) {
      m.accuracy = static_cast<S>(sums[E::accurate] / sums[E::pair_count]);
      m.reward_margin = static_cast<S>(sums[E::margin] / sums[E::pair_count]);
      m.reward_mean = static_cast<S>(sums[E::reward] / sums[E::reward_count]);
    }
    return m;
  }
};
}  // namespace detail

/// @brief Bradley-Terry loss over K-way rankings (InstructGPT): for each row of K rewards
/// ordered best to worst, the mean over the C(K,2) pairs i < j of the pairwise loss
/// `-logsig(r_i - r_j) + k (r_i + r_j)^2` (k = center_coef, TRL's centering applied to every
/// pair; k = 0 gives InstructGPT's `-1/C(K,2) sum_{i<j} logsig(r_i - r_j)`); the batch loss is
/// the mean over rows. With K = 2 this is bradley_terry().
///
/// @param rewards row-major [batch, K] Eigen::Tensor or TensorMap, float or double; each row
/// ordered from the most to the least preferred response.
/// @return SequenceResult with RankingMetrics; backward(grad) writes d loss / d rewards into a
/// row-major [batch, K] tensor.
/// @throws shape_error if K < 2 or the batch is empty; option_error for center_coef < 0.
/// Nothing is written on error.
template <class X>
auto bradley_terry_ranking(const X& rewards, const BradleyTerryOptions& opt = {}) {
  constexpr const char* fn = "bradley_terry_ranking";
  static_assert(!detail::is_packed_v<X>,
                "prefloss: bradley_terry_ranking takes a [batch, K] score matrix; pl::packed is for token batches");
  using S = detail::tensor_scalar_t<X>;
  detail::require_option(opt.center_coef >= 0 && std::isfinite(opt.center_coef), fn, "center_coef", ">= 0 and finite",
                         opt.center_coef);
  detail::PlainMatrix<S> in(detail::matrix_view(rewards, fn, "rewards"));
  const Index B = in.rows(), K = in.cols();
  if (K < 2)
    throw shape_error(std::string(fn) + ": argument 'rewards' must have shape [batch, K] with K >= 2, got " +
                      in.shape());
  const double count = detail::batch_divisor(fn, "rewards", B, opt.batch_count);

  const double k = opt.center_coef;
  const double pairs = static_cast<double>(K) * static_cast<double>(K - 1) / 2;
  const double inv_pairs = 1.0 / pairs, inv_b = 1.0 / count;
  SequenceResult<RankingMetrics<S>, detail::PlainMatrix<S>> out(fn, "grad", in);
  out.losses = Eigen::Tensor<S, 1>(B);
  out.d_ = Eigen::Tensor<S, 1>(B * K);
  std::vector<double> d(static_cast<std::size_t>(K));
  double total = 0, correct = 0, margin = 0, sum_r = 0;
  for (Index i = 0; i < B; ++i) {
    std::fill(d.begin(), d.end(), 0.0);
    double row = 0;
    for (Index a = 0; a < K; ++a) {
      const double ra = in.value(i, a);
      sum_r += ra;
      for (Index c = a + 1; c < K; ++c) {
        const double rc = in.value(i, c);
        const auto ls = log_sigmoid_and_grad(ra - rc);  // d logsig(z)/dz = sig(-z)
        const double kc = k * (ra + rc);                // as in bradley_terry: no 2 * k overflow
        row += -ls.value + kc * (ra + rc);
        d[static_cast<std::size_t>(a)] += -ls.grad + 2 * kc;
        d[static_cast<std::size_t>(c)] += ls.grad + 2 * kc;
        correct += ra > rc ? 1.0 : 0.0;
        margin += ra - rc;
      }
    }
    out.losses(i) = static_cast<S>(row * inv_pairs);
    total += row * inv_pairs;
    for (Index a = 0; a < K; ++a)
      out.d_(i * K + a) = static_cast<S>(d[static_cast<std::size_t>(a)] * inv_pairs * inv_b);
  }
  out.loss = static_cast<S>(total * inv_b);
  auto& sums = out.metric_sums.sums;
  sums[RankingMetricEntries::accurate] = correct;
  sums[RankingMetricEntries::margin] = margin;
  sums[RankingMetricEntries::reward] = sum_r;
  sums[RankingMetricEntries::pair_count] = pairs * static_cast<double>(B);
  sums[RankingMetricEntries::reward_count] = static_cast<double>(K) * static_cast<double>(B);
  out.metrics = out.metric_sums.metrics();
  return out;
}

}  // namespace prefloss
