/// @file loss/bco.hpp
/// Binary Classifier Optimization (Jung et al. 2024, "Binary Classifier Optimization for Large
/// Language Model Alignment", arXiv:2404.04656): unpaired completions labelled desirable or
/// undesirable, each scored by a logistic classifier on its implicit reward shifted by delta,
/// the running mean of the rewards (see prefloss::RunningMoments).
#pragma once

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

#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../math/log_sigmoid.hpp"
#include "../metrics.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"
#include "sequence_loss.hpp"

namespace prefloss {

/// Options of bco(). beta's default is TRL's BCOConfig.
struct BcoOptions {
  double beta = 0.1;  ///< > 0 and finite: inverse temperature of the implicit reward b u
  /// Finite: the reward shift delta, a constant of the loss (no gradient flows through it). TRL
  /// uses its RunningMoments' mean AFTER updating it with this batch's rewards: call
  /// `running.update(bco_rewards(policy, ref, opt))` first, then pass `running.mean()` here
  /// (TRL's evaluation, do_train=False, skips the update and uses the mean as it is). Sharded:
  /// every shard the same, global delta (RunningMoments::update_from_moments).
  double delta = 0.0;
  /// Empty, or one finite weight >= 0 per example that multiplies its loss and gradient (the
  /// batch loss is still divided by the example count, as TRL's mean of the weighted losses).
  /// TRL's match_underlying_distribution is this with weight 1 for desirable examples and the
  /// clamped density ratio of its prompt classifier for undesirable ones, computed by the caller.
  std::vector<double> example_weights = {};
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count; shards are then exact when they share delta). Unset: this call's
  /// batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its backward()) may split the policy and reference rows over (see
  /// DpoOptions::threads). Default: this thread.
  Threads threads = {};
};

/// @brief Metrics of bco(): TRL's BCOTrainer set ("delta", "count/chosen", "rewards/chosen_sum",
/// "logps/chosen_sum", ...). "Desirable" is TRL's "chosen", "undesirable" its "rejected".
/// Rewards are b u = b (s - rho), unshifted. The sums and counts are what TRL all-reduces; the
/// means are sum / count (0 for a class without examples). TRL's "logits/*_sum" need the logits
/// and are not here.
template <class S>
struct BcoMetrics {
  S delta = 0;                   ///< the delta used (TRL "delta")
  Index count_desirable = 0;     ///< examples labelled desirable (TRL "count/chosen")
  Index count_undesirable = 0;   ///< examples labelled undesirable (TRL "count/rejected")
  S reward_desirable_sum = 0;    ///< sum of b u over desirable examples (TRL "rewards/chosen_sum")
  S reward_undesirable_sum = 0;  ///< sum of b u over undesirable examples (TRL "rewards/rejected_sum")
  S reward_desirable = 0;        ///< mean of b u over desirable examples (TRL "rewards/chosen")
  S reward_undesirable = 0;      ///< mean of b u over undesirable examples (TRL "rewards/rejected")
  S reward_margin = 0;           ///< reward_desirable - reward_undesirable (TRL "rewards/margins")
  S logps_desirable_sum = 0;     ///< sum of the policy values s over desirable examples (TRL "logps/chosen_sum")
  S logps_undesirable_sum = 0;   ///< sum of s over undesirable examples (TRL "logps/rejected_sum")
};

/// @brief Entries of MetricSums<BcoMetrics<S>>: six sums and one maximum. The class counts are
/// doubles in the sums (exact to 2^53) and Index again in the metrics.
///
/// delta is not a sum: it sits in `maxima`, so that merging keeps it. In a sharded run every
/// shard gets the same delta (the global running mean), so the max is that value; a shard
/// without examples still holds its delta.
struct BcoMetricEntries {
  static constexpr std::size_t count_desirable = 0;     ///< sums: desirable examples
  static constexpr std::size_t count_undesirable = 1;   ///< sums: undesirable examples
  static constexpr std::size_t reward_desirable = 2;    ///< sums: b u over desirable examples
  static constexpr std::size_t reward_undesirable = 3;  ///< sums: b u over undesirable examples
  static constexpr std::size_t logps_desirable = 4;     ///< sums: s over desirable examples
  static constexpr std::size_t logps_undesirable = 5;   ///< sums: s over undesirable examples
  static constexpr std::size_t n_sums = 6;
  static constexpr std::size_t delta = 0;  ///< maxima: delta (-inf: no call merged in yet)
  static constexpr std::size_t n_maxima = 1;
};

namespace detail {
template <class S>
struct metric_layout<BcoMetrics<S>> {
  using Entries = BcoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static BcoMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    BcoMetrics<S> m;
    const double delta = maxima[E::delta];
    // delta is finite when given, so -inf can only be the empty merge.
    m.delta = static_cast<S>(delta == -std::numeric_limits<double>::infinity() ? 0.0 : delta);
    m.count_desirable = static_cast<Index>(sums[E::count_desirable]);
    m.count_undesirable = static_cast<Index>(sums[E::count_undesirable]);
    const double rd = sums[E::reward_desirable], ru = sums[E::reward_undesirable];
    const double mean_d = mean_or_zero(rd, sums[E::count_desirable]);
    const double mean_u = mean_or_zero(ru, sums[E::count_undesirable]);
    m.reward_desirable_sum = static_cast<S>(rd);
    m.reward_undesirable_sum = static_cast<S>(ru);
    m.reward_desirable = static_cast<S>(mean_d);
    m.reward_undesirable = static_cast<S>(mean_u);
    m.reward_margin = static_cast<S>(mean_d - mean_u);
    m.logps_desirable_sum = static_cast<S>(sums[E::logps_desirable]);
    m.logps_undesirable_sum = static_cast<S>(sums[E::logps_undesirable]);
    return m;
  }
};

/// bco's checked inputs: sequences and the label view; nothing has been read.
template <class Seq, class Ref, class DS>
struct BcoInputs {
  Seq policy;
  Ref ref;
  Vector<DS> desirable;

  /// Calls f(name, input) for every input (a fused call's output may overlap none of them).
  template <class F>
  void for_each_input(F&& f) const {
    f("policy", policy);
    f("ref", ref);
    f("desirable", desirable);
  }
};

/// The checks bco and bco_rewards share: beta, then the policy and reference batches.
template <class P, class R>
auto bco_sequences(const char* fn, const P& policy, const R& ref, const BcoOptions& opt) {
  detail::require_same_scalar<P, R>();
  detail::require_beta(fn, opt.beta);
  auto s = as_sequence(policy, fn, "policy");
  auto rho = as_sequence(ref, fn, "ref");
  detail::require_batch(fn, "ref", rho, "policy", s.size(), s.shape());
  return std::make_pair(s, rho);
}

/// bco's checks (options, then inputs); nothing is read.
template <class P, class R, class D>
auto bco_inputs(const P& policy, const R& ref, const D& desirable, const BcoOptions& opt) {
  constexpr const char* fn = "bco";
  static_assert(detail::is_tensor_v<D> && detail::tensor_rank_v<D> == 1,
                "prefloss: bco's 'desirable' must be a rank-1 [batch] Eigen tensor");
  using DS = detail::tensor_scalar_t<D>;
  static_assert(std::is_same_v<DS, bool> || std::is_same_v<DS, std::uint8_t>,
                "prefloss: bco's 'desirable' must hold bool or uint8_t");
  detail::require_beta(fn, opt.beta);  // (again in bco_sequences: options come first)
  detail::require_option(std::isfinite(opt.delta), fn, "delta", "finite", opt.delta);
  for (std::size_t i = 0; i < opt.example_weights.size(); ++i) {
    const double w = opt.example_weights[i];
    if (!(w >= 0 && w < HUGE_VAL))
      throw option_error(std::string(fn) + ": option 'example_weights' must hold finite weights >= 0, got " + fmt(w) +
                         " at index " + std::to_string(i));
  }
  const auto [s, rho] = bco_sequences(fn, policy, ref, opt);
  const auto lab = detail::vector_view(desirable, fn, "desirable");
  const Index B = s.size();
  if (lab.size != B)
    throw shape_error(std::string(fn) + ": argument 'desirable' has batch " + std::to_string(lab.size) + " (shape " +
                      detail::shape_str(lab.size) + ") but 'policy' has batch " + std::to_string(B) + " (shape " +
                      s.shape() + ")");
  if (!opt.example_weights.empty() && static_cast<Index>(opt.example_weights.size()) != B)
    throw shape_error(std::string(fn) + ": option 'example_weights' has " + std::to_string(opt.example_weights.size()) +
                      " weights but 'policy' has batch " + std::to_string(B) + " (shape " + s.shape() + ")");
  (void)detail::batch_divisor(fn, "policy", B, opt.batch_count);
  return BcoInputs<remove_cvref_t<decltype(s)>, remove_cvref_t<decltype(rho)>, DS>{s, rho, lab};
}

/// bco's arithmetic, one body for both forms; grad is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto bco_run(const In& in, const BcoOptions& opt,
                                      const grad_out_t<decltype(In::policy)>* grad) {
  constexpr const char* fn = "bco";
  using S = typename decltype(In::policy)::Scalar;
  using DS = std::remove_const_t<std::remove_pointer_t<decltype(in.desirable.data)>>;
  const auto& s = in.policy;
  const auto& rho = in.ref;
  const auto& lab = in.desirable;
  const Index B = s.size();

  // Example i's values are read by its term, just before its gradient row is written (on a
  // pool: all of them first, in blocks of rows).
  std::vector<double> u(static_cast<std::size_t>(B)), sv(static_cast<std::size_t>(B));
  const auto load = [&](Index i) {
    const std::size_t k = static_cast<std::size_t>(i);
    sv[k] = s.value(i);
    u[k] = sv[k];
    u[k] -= rho.value(i);
  };
  const bool preloaded = preload_values(opt.threads, s, load);
  const double b = opt.beta, delta = opt.delta;
  const bool weighted = !opt.example_weights.empty();
  auto result = detail::single_loss<BcoMetrics<S>>(
      fn, "grad_policy", s, opt.batch_count ? *opt.batch_count : static_cast<double>(B),
      [&](Index i) {
        if (!preloaded) load(i);
        const std::size_t k = static_cast<std::size_t>(i);
        const double w = weighted ? opt.example_weights[k] : 1.0;
        const double x = b * u[k] - delta;
        if (lab.data[i] != DS(0)) {
          // -logsig(x), x = b u - delta; d/du = -b sig(-x).
          const auto t = log_sigmoid_and_grad(x);
          return detail::SingleTerm{-w * t.value, -w * b * t.grad};
        }
        // -logsig(-x); d/du = b sig(x).
        const auto t = log_sigmoid_and_grad(-x);
        return detail::SingleTerm{-w * t.value, w * b * t.grad};
      },
      grad, opt.threads);

  double rd = 0, ru = 0, ld = 0, lu = 0;
  Index nd = 0, nu = 0;
  for (Index i = 0; i < B; ++i) {
    const std::size_t k = static_cast<std::size_t>(i);
    if (lab.data[i] != DS(0)) {
      ++nd;
      rd += b * u[k];
      ld += sv[k];
    } else {
      ++nu;
      ru += b * u[k];
      lu += sv[k];
    }
  }
  using E = BcoMetricEntries;
  auto& sums = result.metric_sums.sums;
  sums[E::count_desirable] = static_cast<double>(nd);
  sums[E::count_undesirable] = static_cast<double>(nu);
  sums[E::reward_desirable] = rd;
  sums[E::reward_undesirable] = ru;
  sums[E::logps_desirable] = ld;
  sums[E::logps_undesirable] = lu;
  result.metric_sums.maxima[E::delta] = delta;
  result.metrics = result.metric_sums.metrics();
  return result;
}

}  // namespace detail

/// @brief The implicit rewards b (s_i - rho_i) of bco(), in double and batch order: the values
/// bco() computes from the same inputs, bit for bit (both classes together, as TRL's
/// `torch.cat((chosen_rewards, rejected_rewards))`; the order does not change the moments up to
/// rounding). Feed them to RunningMoments::update before calling bco() with the updated mean.
/// Reads opt.beta and opt.threads only.
/// @param policy, ref as bco() takes them
/// @throws shape_error for a batch mismatch; option_error for a bad beta.
template <class P, class R>
Eigen::Tensor<double, 1> bco_rewards(const P& policy, const R& ref, const BcoOptions& opt = {}) {
  const auto [s, rho] = detail::bco_sequences("bco_rewards", policy, ref, opt);
  const std::vector<double> vs = detail::values_of(s, opt.threads), vr = detail::values_of(rho, opt.threads);
  Eigen::Tensor<double, 1> r(s.size());
  for (Index i = 0; i < s.size(); ++i) {
    const std::size_t k = static_cast<std::size_t>(i);
    double ui = vs[k];
    ui -= vr[k];
    r(i) = opt.beta * ui;
  }
  return r;
}

/// @brief BCO loss of unpaired policy sequence values against reference values: TRL's
/// BCOTrainer.bco_loss (trl/experimental/bco/bco_trainer.py, f2cd577) and its reduction in
/// get_batch_loss_metrics.
///
/// With u = s - rho per example, r = b u its implicit reward and delta the given shift:
/// desirable `-log sig(r - delta)`, undesirable `-log sig(-(r - delta))`, each times its
/// example weight when opt.example_weights is given; the batch loss is the mean over all
/// examples of both classes (or the sum / opt.batch_count). log sig is prefloss::log_sigmoid,
/// finite for any finite argument (a loss of |r - delta| far out, gradient -+b, no overflow).
/// Pass masked_sum expressions for TRL's sequence log-probs (summed over completion tokens).
///
/// delta is DETACHED, as in TRL: a constant of the loss, no gradient flows through it. TRL's
/// delta is `running.mean` after `running.update(cat(chosen_rewards, rejected_rewards))` on this
/// very batch: do the same with prefloss::RunningMoments and bco_rewards() before the call.
///
/// This is the unpaired BCO of BCOTrainer; the paired variant is dpo's bco_pair (DPOTrainer
/// loss_type="bco_pair", DpoOptions::bco_delta).
///
/// Differences from TRL: delta is given by the caller (TRL keeps the running moments inside
/// the trainer); the UDM weighting (match_underlying_distribution, a density-ratio classifier on
/// prompt embeddings) is left out, but its weights can be passed as opt.example_weights; the
/// arithmetic is in double (TRL: the model dtype, with delta a float32 tensor); TRL's
/// `losses.nanmean()` drops NaN losses, here a NaN value gives a NaN loss.
///
/// @param policy policy values: a masked_sum/masked_mean expression or a [batch] tensor
/// @param ref reference values (constants), same forms, same batch
/// @param desirable [batch] rank-1 tensor of bool or uint8_t; nonzero = desirable
/// @return SequenceResult with BcoMetrics; backward(grad_policy) writes d loss / d policy,
/// shaped like policy's leaves ([batch, tokens] for an expression, 0 at masked-out tokens;
/// [batch] for a plain tensor).
/// @throws shape_error naming the argument for a batch mismatch, an empty batch without
/// batch_count, or example_weights of another size; option_error for beta <= 0, a non-finite
/// beta or delta, a negative or non-finite example weight, or a bad batch_count. Nothing is
/// written on error.
template <class P, class R, class D>
auto bco(const P& policy, const R& ref, const D& desirable, const BcoOptions& opt = {}) {
  return detail::bco_run(detail::bco_inputs(policy, ref, desirable, opt), opt, nullptr);
}

/// @brief bco() fused with its backward: the same result, and d loss / d policy written into
/// grad_policy in the same pass over the policy tokens (each row's gradient is written right
/// after the row is read). Bit-identical to `auto r = bco(...); r.backward(grad_policy);`, whose
/// backward() still works.
/// @param grad_policy output shaped like policy's leaves, fully overwritten.
/// @throws as bco(); shape_error naming 'grad_policy'; layout_error when grad_policy is
/// misaligned or overlaps any input tensor (policy, ref, desirable). Every check runs before
/// anything is written.
template <class P, class R, class D, class G>
auto bco(const P& policy, const R& ref, const D& desirable, const BcoOptions& opt, G&& grad_policy) {
  const auto in = detail::bco_inputs(policy, ref, desirable, opt);
  const auto view =
      detail::single_grad_view("bco", "grad_policy", in.policy, grad_policy, [&](auto&& f) { in.for_each_input(f); });
  return detail::bco_run(in, opt, &view);
}

}  // namespace prefloss
