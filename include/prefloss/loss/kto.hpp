/// @file loss/kto.hpp
/// Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
/// Theoretic Optimization"): a loss of unpaired completions labelled desirable or undesirable,
/// measured against a reference point z0 estimated from mismatched (KL) completions.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../math/sigmoid.hpp"
#include "../metrics.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"
#include "sequence_loss.hpp"

namespace prefloss {

/// Options of kto(). Defaults are TRL's KTOConfig.
struct KtoOptions {
  double beta = 0.1;                ///< > 0 and finite: inverse temperature of the implicit reward
  double desirable_weight = 1.0;    ///< >= 0 and finite: wd, weight of desirable examples' losses
  double undesirable_weight = 1.0;  ///< >= 0 and finite: wu, weight of undesirable examples' losses
  /// Unset: z0 = max(0, mean(kl_policy - kl_ref)) over this call's KL batch. Set (finite): z0 is
  /// this value as given, not clamped. For data-parallel training pass the global one: sum
  /// every rank's kto_reference_sums() and take its reference_point().
  std::optional<double> reference_point = std::nullopt;
  /// Examples in the global batch: loss = sum(losses) / batch_count, gradients to match (see
  /// DpoOptions::batch_count; shards are then exact when they share reference_point). Unset:
  /// this call's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its backward()) may split the policy, reference and KL rows over
  /// (see DpoOptions::threads). Default: this thread.
  Threads threads = {};
};

/// @brief Metrics of kto(): TRL's KTOTrainer set ("kl", "count/chosen", "rewards/chosen_sum",
/// "logps/chosen_sum", ...). "Desirable" is TRL's "chosen", "undesirable" its "rejected".
/// Rewards are b u = b (s - rho). The sums and counts are what TRL all-reduces; the means are
/// sum / count (0 for a class without examples).
template <class S>
struct KtoMetrics {
  S reference_point = 0;         ///< z0 used (TRL "kl")
  S kl_mean = 0;                 ///< mean(kl_policy - kl_ref) of this call, unclamped; 0 for an empty KL batch
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

/// @brief One shard's share of KTO's reference point: z0 = max(0, sum / count) over the KL
/// batch of every shard, with sum = sum_j (kl_policy_j - kl_ref_j) in double.
///
/// All-reduce `sum` (MPI_DOUBLE) and `count` (MPI_INT64_T) with MPI_SUM, or add shards with
/// +=, then pass reference_point() as KtoOptions::reference_point on every shard. This is the
/// mean over the whole KL batch for uneven shards too; TRL's KTOTrainer (kto_trainer.py,
/// get_batch_loss_metrics at f2cd577) all-gathers each rank's mean and averages the means, which
/// equals it only when every rank holds the same number of KL examples. One shard's sums give
/// kto()'s own z0 to the bit.
struct KtoReferenceSums {
  double sum = 0;          ///< sum of kl_policy - kl_ref over the KL examples
  std::int64_t count = 0;  ///< KL examples

  KtoReferenceSums& operator+=(const KtoReferenceSums& o) noexcept {
    sum += o.sum;
    count += o.count;
    return *this;
  }
  /// max(0, sum / count), NaN for a NaN sum (as torch's clamp).
  /// @throws value_error when count is 0: no shard had a KL example, so z0 is undefined.
  double reference_point() const {
    if (count <= 0)
      throw value_error("kto_reference_sums: reference_point() needs KL examples, got count " + std::to_string(count));
    const double mean = sum / static_cast<double>(count);
    return std::isnan(mean) ? mean : std::fmax(0.0, mean);
  }
};

namespace detail {
/// The KL batch's log-ratio sum, in double, in order (kto and kto_reference_sums share it). On a
/// pool the values are read in blocks of rows first and summed in order here: the same bits.
template <class KP, class KR>
double kl_ratio_sum(const KP& kp, const KR& kr, const Threads& threads = {}) {
  double sum = 0;
  if (threads.count() == 1) {
    for (Index j = 0; j < kp.size(); ++j) sum += kp.value(j) - kr.value(j);
    return sum;
  }
  std::vector<double> p = values_of(kp, threads), r = values_of(kr, threads);
  for (std::size_t j = 0; j < p.size(); ++j) sum += p[j] - r[j];
  return sum;
}
}  // namespace detail

/// @brief This shard's KtoReferenceSums from its KL completions' sequence values (policy and
/// reference: masked_sum/masked_mean expressions or [batch] tensors, as kto() takes them; an
/// empty batch gives count 0); threads: rows split over a pool, the same bits.
/// @throws shape_error when the two batches differ.
template <class KP, class KR>
KtoReferenceSums kto_reference_sums(const KP& kl_policy, const KR& kl_ref, const Threads& threads = {}) {
  constexpr const char* fn = "kto_reference_sums";
  detail::require_same_scalar<KP, KR>();
  const auto kp = as_sequence(kl_policy, fn, "kl_policy");
  const auto kr = as_sequence(kl_ref, fn, "kl_ref");
  detail::require_batch(fn, "kl_ref", kr, "kl_policy", kp.size(), kp.shape());
  return {detail::kl_ratio_sum(kp, kr, threads), static_cast<std::int64_t>(kp.size())};
}

/// @brief Entries of MetricSums<KtoMetrics<S>>: eight sums and one maximum. The class counts are
/// doubles in the sums (exact to 2^53) and Index again in the metrics.
///
/// z0 is not a sum: it sits in `maxima`, so that merging keeps it. In a sharded run z0 must be
/// the global one, passed to every shard as KtoOptions::reference_point (the double z0 of a call
/// is `maxima[reference_point]`, unrounded), so every shard holds the same value and the max is
/// that value. A shard without examples still holds its z0. The KL sums give the kl_mean of all
/// shards' KL batches together.
struct KtoMetricEntries {
  static constexpr std::size_t kl = 0;                  ///< sums: kl_policy - kl_ref over the KL batch
  static constexpr std::size_t kl_count = 1;            ///< sums: KL examples
  static constexpr std::size_t count_desirable = 2;     ///< sums: desirable examples
  static constexpr std::size_t count_undesirable = 3;   ///< sums: undesirable examples
  static constexpr std::size_t reward_desirable = 4;    ///< sums: b u over desirable examples
  static constexpr std::size_t reward_undesirable = 5;  ///< sums: b u over undesirable examples
  static constexpr std::size_t logps_desirable = 6;     ///< sums: s over desirable examples
  static constexpr std::size_t logps_undesirable = 7;   ///< sums: s over undesirable examples
  static constexpr std::size_t n_sums = 8;
  static constexpr std::size_t reference_point = 0;  ///< maxima: z0 (-inf: no call merged in yet)
  static constexpr std::size_t n_maxima = 1;
};

namespace detail {
template <class S>
struct metric_layout<KtoMetrics<S>> {
  using Entries = KtoMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static KtoMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                const std::array<double, n_maxima>& maxima) noexcept {
    using E = Entries;
    KtoMetrics<S> m;
    const double z0 = maxima[E::reference_point];
    // z0 is finite when given and >= 0 (or NaN) when estimated, so -inf can only be the empty merge.
    m.reference_point = static_cast<S>(z0 == -std::numeric_limits<double>::infinity() ? 0.0 : z0);
    m.kl_mean = static_cast<S>(mean_or_zero(sums[E::kl], sums[E::kl_count]));
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

/// kto's checked inputs: sequences and the label view; nothing has been read.
template <class Seq, class Ref, class KP, class KR, class DS>
struct KtoInputs {
  Seq policy;
  Ref ref;
  KP kl_policy;
  KR kl_ref;
  Vector<DS> desirable;

  /// Calls f(name, input) for every input (a fused call's output may overlap none of them).
  template <class F>
  void for_each_input(F&& f) const {
    f("policy", policy);
    f("ref", ref);
    f("desirable", desirable);
    f("kl_policy", kl_policy);
    f("kl_ref", kl_ref);
  }
};

/// kto's checks (options, then inputs); nothing is read.
template <class P, class R, class D, class KP, class KR>
auto kto_inputs(const P& policy, const R& ref, const D& desirable, const KP& kl_policy, const KR& kl_ref,
                const KtoOptions& opt) {
  constexpr const char* fn = "kto";
  detail::require_same_scalar<P, R>();
  detail::require_same_scalar<P, KP>();
  detail::require_same_scalar<P, KR>();
  static_assert(detail::is_tensor_v<D> && detail::tensor_rank_v<D> == 1,
                "prefloss: kto's 'desirable' must be a rank-1 [batch] Eigen tensor");
  using DS = detail::tensor_scalar_t<D>;
  static_assert(std::is_same_v<DS, bool> || std::is_same_v<DS, std::uint8_t>,
                "prefloss: kto's 'desirable' must hold bool or uint8_t");

  detail::require_beta(fn, opt.beta);
  detail::require_option(opt.desirable_weight >= 0 && std::isfinite(opt.desirable_weight), fn, "desirable_weight",
                         ">= 0 and finite", opt.desirable_weight);
  detail::require_option(opt.undesirable_weight >= 0 && std::isfinite(opt.undesirable_weight), fn, "undesirable_weight",
                         ">= 0 and finite", opt.undesirable_weight);
  if (opt.reference_point)
    detail::require_option(std::isfinite(*opt.reference_point), fn, "reference_point", "finite when set",
                           *opt.reference_point);

  const auto s = as_sequence(policy, fn, "policy");
  const auto rho = as_sequence(ref, fn, "ref");
  const auto kp = as_sequence(kl_policy, fn, "kl_policy");
  const auto kr = as_sequence(kl_ref, fn, "kl_ref");
  const auto lab = detail::vector_view(desirable, fn, "desirable");
  const Index B = s.size();
  detail::require_batch(fn, "ref", rho, "policy", B, s.shape());
  if (lab.size != B)
    throw shape_error(std::string(fn) + ": argument 'desirable' has batch " + std::to_string(lab.size) + " (shape " +
                      detail::shape_str(lab.size) + ") but 'policy' has batch " + std::to_string(B) + " (shape " +
                      s.shape() + ")");
  detail::require_batch(fn, "kl_ref", kr, "kl_policy", kp.size(), kp.shape());
  (void)detail::batch_divisor(fn, "policy", B, opt.batch_count);
  const Index K = kp.size();
  if (K == 0 && !opt.reference_point)
    throw shape_error(std::string(fn) + ": argument 'kl_policy' has an empty batch (shape " + kp.shape() +
                      ") and option 'reference_point' is not set: z0 needs KL examples or a given reference point");

  return KtoInputs<remove_cvref_t<decltype(s)>, remove_cvref_t<decltype(rho)>, remove_cvref_t<decltype(kp)>,
                   remove_cvref_t<decltype(kr)>, DS>{s, rho, kp, kr, lab};
}

/// kto's arithmetic, one body for both forms; grad is null for the two-pass form.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto kto_run(const In& in, const KtoOptions& opt,
                                      const grad_out_t<decltype(In::policy)>* grad) {
  constexpr const char* fn = "kto";
  using S = typename decltype(In::policy)::Scalar;
  using DS = std::remove_const_t<std::remove_pointer_t<decltype(in.desirable.data)>>;
  const auto& s = in.policy;
  const auto& rho = in.ref;
  const auto& kp = in.kl_policy;
  const auto& kr = in.kl_ref;
  const auto& lab = in.desirable;
  const Index B = s.size(), K = kp.size();
  // The reference point: the KL batch's mean log-ratio (double accumulation), clamped at 0.
  const KtoReferenceSums kl{kl_ratio_sum(kp, kr, opt.threads), static_cast<std::int64_t>(K)};
  const double z0 = opt.reference_point ? *opt.reference_point : kl.reference_point();

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
  const double b = opt.beta, wd = opt.desirable_weight, wu = opt.undesirable_weight;
  auto result = detail::single_loss<KtoMetrics<S>>(
      fn, "grad_policy", s, opt.batch_count ? *opt.batch_count : static_cast<double>(B),
      [&](Index i) {
        if (!preloaded) load(i);
        const double ui = u[static_cast<std::size_t>(i)];
        if (lab.data[i] != DS(0)) {
          // wd (1 - sig(x)) = wd sig(-x), x = b (u - z0); d/du = -wd b sig(x) sig(-x).
          const auto t = sigmoid_and_grad(-b * (ui - z0));
          return detail::SingleTerm{wd * t.value, -wd * b * t.grad};
        }
        // wu (1 - sig(y)) = wu sig(-y), y = b (z0 - u); d/du = wu b sig(y) sig(-y).
        const auto t = sigmoid_and_grad(-b * (z0 - ui));
        return detail::SingleTerm{wu * t.value, wu * b * t.grad};
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
  using E = KtoMetricEntries;
  auto& sums = result.metric_sums.sums;
  sums[E::kl] = kl.sum;
  sums[E::kl_count] = static_cast<double>(K);
  sums[E::count_desirable] = static_cast<double>(nd);
  sums[E::count_undesirable] = static_cast<double>(nu);
  sums[E::reward_desirable] = rd;
  sums[E::reward_undesirable] = ru;
  sums[E::logps_desirable] = ld;
  sums[E::logps_undesirable] = lu;
  result.metric_sums.maxima[E::reference_point] = z0;
  result.metrics = result.metric_sums.metrics();
  return result;
}

}  // namespace detail

/// @brief KTO loss of unpaired policy sequence values against reference values.
///
/// With u = s - rho per example and z0 the reference point:
/// desirable `wd (1 - sig(b (u - z0)))`, undesirable `wu (1 - sig(b (z0 - u)))`; the batch loss
/// is the mean over all examples of both classes. This is TRL's kto_loss (loss_type="kto"),
/// which concatenates the weighted desirable and undesirable losses and takes their mean, with
/// sequence log-probs summed over completion tokens (pass masked_sum expressions). TRL's
/// loss_type="apo_zero_unpaired" (KTOTrainer, trl/trainer/kto_trainer.py, f2cd577: desirable
/// `1 - sig(b u)`, undesirable `sig(b u)`, no KL batch) is this loss with reference_point = 0
/// and empty KL inputs.
///
/// z0 = max(0, mean_j(kl_policy_j - kl_ref_j)) over the KL batch (TRL: completions paired with
/// mismatched prompts), or opt.reference_point when set. z0 is DETACHED, as in TRL: it is a
/// constant of the loss, so no gradient flows to kl_policy and the result has no backward for
/// it. A NaN in the KL values gives a NaN z0 (as torch's clamp), hence NaN losses.
///
/// @param policy policy values: a masked_sum/masked_mean expression or a [batch] tensor
/// @param ref reference values (constants), same forms, same batch
/// @param desirable [batch] rank-1 tensor of bool or uint8_t; nonzero = desirable
/// @param kl_policy, kl_ref policy and reference values of the KL completions (constants), same
/// forms; their own batch size, which may differ from policy's, and may be 0 only when
/// opt.reference_point is set (they are ignored for z0 then, and only feed metrics.kl_mean)
/// @return SequenceResult with KtoMetrics; backward(grad_policy) writes d loss / d policy,
/// shaped like policy's leaves ([batch, tokens] for an expression, 0 at masked-out tokens;
/// [batch] for a plain tensor).
/// @throws shape_error naming the argument for a batch mismatch, an empty batch, or an empty KL
/// batch without reference_point; option_error for beta <= 0, a negative weight, a non-finite
/// option or a non-finite reference_point. Nothing is written on error.
template <class P, class R, class D, class KP, class KR>
auto kto(const P& policy, const R& ref, const D& desirable, const KP& kl_policy, const KR& kl_ref,
         const KtoOptions& opt = {}) {
  return detail::kto_run(detail::kto_inputs(policy, ref, desirable, kl_policy, kl_ref, opt), opt, nullptr);
}

/// @brief kto() fused with its backward: the same result, and d loss / d policy written into
/// grad_policy in the same pass over the policy tokens (z0 is read from the KL batch first; each
/// policy row's gradient is written right after the row is read). Bit-identical to
/// `auto r = kto(...); r.backward(grad_policy);`, whose backward() still works.
/// @param grad_policy output shaped like policy's leaves, fully overwritten.
/// @throws as kto(); shape_error naming 'grad_policy'; layout_error when grad_policy is
/// misaligned or overlaps any input tensor (policy, ref, desirable, kl_policy, kl_ref). Every
/// check runs before anything is written.
template <class P, class R, class D, class KP, class KR, class G>
auto kto(const P& policy, const R& ref, const D& desirable, const KP& kl_policy, const KR& kl_ref,
         const KtoOptions& opt, G&& grad_policy) {
  const auto in = detail::kto_inputs(policy, ref, desirable, kl_policy, kl_ref, opt);
  const auto view =
      detail::single_grad_view("kto", "grad_policy", in.policy, grad_policy, [&](auto&& f) { in.for_each_input(f); });
  return detail::kto_run(in, opt, &view);
}

}  // namespace prefloss
