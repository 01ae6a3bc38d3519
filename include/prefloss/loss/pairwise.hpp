/// @file loss/pairwise.hpp
/// The machinery shared by every loss of a chosen and a rejected sequence (Bradley-Terry, the
/// DPO family, IPO, SimPO, ORPO): evaluate both sequence inputs once, apply a per-example
/// function that returns the loss and its partial derivatives, average over the batch, and keep
/// d loss / d sequence value so backward() is one streaming write per side.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/eigen.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../math/log_sigmoid.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "sequence_loss.hpp"

namespace prefloss {

/// Metrics of the DPO family, as TRL logs them (rewards are beta * (policy - reference)).
template <class S>
struct PreferenceMetrics {
  S reward_chosen = 0;    ///< batch mean of the chosen rewards
  S reward_rejected = 0;  ///< batch mean of the rejected rewards
  S reward_margin = 0;    ///< batch mean of chosen - rejected reward
  S reward_accuracy = 0;  ///< fraction of pairs with chosen reward strictly greater
};

/// @brief Entries of MetricSums<PreferenceMetrics<S>> (bradley_terry, dpo, ipo, simpo): four
/// sums, no maxima. Rewards are the loss's (beta u, or the raw rewards of bradley_terry).
struct PreferenceMetricEntries {
  static constexpr std::size_t reward_chosen = 0;    ///< sums: chosen rewards
  static constexpr std::size_t reward_rejected = 1;  ///< sums: rejected rewards
  static constexpr std::size_t accurate = 2;         ///< sums: pairs with chosen reward strictly greater
  static constexpr std::size_t count = 3;            ///< sums: examples (pairs)
  static constexpr std::size_t n_sums = 4;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
/// The preference means of sums laid out as PreferenceMetricEntries (ORPO's sums start so
/// too); all 0 without examples. reward_margin divides the difference of the two sums, as
/// TRL's mean of the margins would up to rounding.
template <class S>
PreferenceMetrics<S> preference_finalize(const double* sums) noexcept {
  using E = PreferenceMetricEntries;
  PreferenceMetrics<S> m;
  const double n = sums[E::count];
  if (n == 0) return m;
  const double rc = sums[E::reward_chosen], rr = sums[E::reward_rejected];
  m.reward_chosen = static_cast<S>(rc / n);
  m.reward_rejected = static_cast<S>(rr / n);
  m.reward_margin = static_cast<S>((rc - rr) / n);
  m.reward_accuracy = static_cast<S>(sums[E::accurate] / n);
  return m;
}

template <class S>
struct metric_layout<PreferenceMetrics<S>> {
  using Entries = PreferenceMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static PreferenceMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                       const std::array<double, n_maxima>&) noexcept {
    return preference_finalize<S>(sums.data());
  }
};
}  // namespace detail

/// @brief Result of a pairwise loss: the batch loss, per-example losses, metrics, and the
/// gradient with respect to both policy inputs.
///
/// Holds copies of the input expressions (which view the caller's tensors: keep those alive
/// until backward() has run) and the per-example d loss / d value, [batch] each.
template <class Metrics, class SeqC, class SeqR>
class PairwiseResult {
 public:
  using Scalar = typename SeqC::Scalar;
  Scalar loss = 0;                  ///< batch loss (mean of losses unless the loss says otherwise)
  Eigen::Tensor<Scalar, 1> losses;  ///< per-example losses [batch]
  Metrics metrics;                  ///< this call's metrics: metric_sums.metrics()
  /// the sums metrics is finalized from: merge them across shards for the whole batch's metrics
  MetricSums<Metrics> metric_sums;

  /// threads: where backward() writes its rows (see prefloss::Threads; the pool must outlive
  /// this result).
  PairwiseResult(const char* fn, SeqC c, SeqR r, Threads threads = {})
      : fn_(fn), c_(std::move(c)), r_(std::move(r)), threads_(threads) {}

  /// @brief Writes d loss / d chosen and d loss / d rejected. Each output is shaped like its
  /// input's leaves: [batch, tokens] for a masked_sum/masked_mean expression (0 at masked-out
  /// tokens), [batch] for a plain sequence tensor. Both shapes are checked before either is
  /// written.
  /// @throws shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when either is
  /// misaligned or the two overlap in memory.
  template <class GC, class GR>
  void backward(GC&& grad_chosen, GR&& grad_rejected) const {
    const auto gc = c_.grad_view(std::forward<GC>(grad_chosen), fn_, "grad_chosen");
    const auto gr = r_.grad_view(std::forward<GR>(grad_rejected), fn_, "grad_rejected");
    detail::require_disjoint(fn_, "grad_chosen", grad_chosen, "grad_rejected", grad_rejected);
    c_.backward_to(dc_.data(), gc, threads_);
    r_.backward_to(dr_.data(), gr, threads_);
  }

  /// d loss / d chosen sequence value, per example (the upstream of the token gradient).
  const Eigen::Tensor<Scalar, 1>& grad_chosen_value() const noexcept { return dc_; }
  /// d loss / d rejected sequence value, per example.
  const Eigen::Tensor<Scalar, 1>& grad_rejected_value() const noexcept { return dr_; }

  // Filled by detail::pairwise_loss.
  Eigen::Tensor<Scalar, 1> dc_, dr_;

 private:
  const char* fn_;
  SeqC c_;
  SeqR r_;
  Threads threads_;
};

namespace detail {

/// Per-example loss and its partial derivatives with respect to the two policy values.
struct PairTerm {
  double loss, d_chosen, d_rejected;
};

/// Throws unless a sequence argument has the batch size of the first one (named first).
template <class Seq>
void require_batch(const char* fn, const char* name, const Seq& s, const char* first, Index batch,
                   const std::string& first_shape) {
  if (s.size() != batch)
    throw shape_error(std::string(fn) + ": argument '" + name + "' has batch " + std::to_string(s.size()) + " (shape " +
                      s.shape() + ") but '" + first + "' has batch " + std::to_string(batch) + " (shape " +
                      first_shape + ")");
}

template <class Seq>
std::vector<double> values_of(const Seq& s, const Threads& threads = {}) {
  std::vector<double> v(static_cast<std::size_t>(s.size()));
  threads.for_rows(s.size(), seq_grain(s), [&](Index b, Index e) {
    for (Index i = b; i < e; ++i) v[static_cast<std::size_t>(i)] = s.value(i);
  });
  return v;
}

/// A fused call's two gradient outputs, checked: write views of the chosen and rejected leaves.
template <class SeqC, class SeqR>
struct PairGradViews {
  grad_out_t<SeqC> chosen;
  grad_out_t<SeqR> rejected;
};

/// @brief Runs a pairwise loss over the batch. term(i) gives example i's PairTerm, and reads
/// example i's values then (not before); the batch loss is the sum of the terms divided by
/// count (the batch size, or the options' batch_count), so the stored value gradients are
/// d term / d value divided by count. Each is known as soon as its
/// example is, so with gradient views (the fused form) example i's two gradient rows are written
/// right after term(i): one pass over the tokens, the masks re-read from cache, the rows written
/// by the kernel and with the scale backward() uses (the same bits). grads null: the two-pass
/// form (backward() writes later).
template <class Metrics, class SeqC, class SeqR, class Term>
PairwiseResult<Metrics, SeqC, SeqR> pairwise_loss(const char* fn, const SeqC& c, const SeqR& r, double count,
                                                  Term&& term, const PairGradViews<SeqC, SeqR>* grads = nullptr,
                                                  const Threads& threads = {}) {
  using S = typename SeqC::Scalar;
  const Index B = c.size();
  PairwiseResult<Metrics, SeqC, SeqR> out(fn, c, r, threads);
  out.losses = Eigen::Tensor<S, 1>(B);
  out.dc_ = Eigen::Tensor<S, 1>(B);
  out.dr_ = Eigen::Tensor<S, 1>(B);
  double total = 0;
  const double inv_b = 1.0 / count;
  // On a pool the rows are written after every term (the values were read before, in
  // parallel: see PairInputs::preload): the same rows, by the same kernel, with the same scales.
  const bool pooled = threads.count() > 1;
  const bool stream_c = grads && !pooled && grad_streams(c), stream_r = grads && !pooled && grad_streams(r);
  for (Index i = 0; i < B; ++i) {
    const PairTerm t = term(i);
    out.losses(i) = static_cast<S>(t.loss);
    out.dc_(i) = static_cast<S>(t.d_chosen * inv_b);
    out.dr_(i) = static_cast<S>(t.d_rejected * inv_b);
    total += t.loss;
    if (grads && !pooled) {
      // Rejected first: its mask is the one read last.
      write_grad_row(r, stream_r, i, out.dr_(i), grads->rejected);
      write_grad_row(c, stream_c, i, out.dc_(i), grads->chosen);
    }
  }
  if (stream_c || stream_r) stream_fence();
  if (grads && pooled) {
    c.backward_to(out.dc_.data(), grads->chosen, threads);
    r.backward_to(out.dr_.data(), grads->rejected, threads);
  }
  out.loss = static_cast<S>(total * inv_b);
  return out;
}

/// @brief Adds TRL's reward sums of per-example values u (the rewards are scale * u) into the
/// first PreferenceMetricEntries::n_sums entries of `sums`, in example order.
template <std::size_t N>
void add_preference_sums(std::array<double, N>& sums, const std::vector<double>& u_c, const std::vector<double>& u_r,
                         double scale = 1.0) noexcept {
  static_assert(N >= PreferenceMetricEntries::n_sums, "prefloss: a preference layout starts with its four sums");
  using E = PreferenceMetricEntries;
  double rc = 0, rr = 0, acc = 0;
  for (std::size_t i = 0; i < u_c.size(); ++i) {
    const double wc = scale * u_c[i], wr = scale * u_r[i];
    rc += wc;
    rr += wr;
    acc += wc > wr ? 1.0 : 0.0;
  }
  sums[E::reward_chosen] += rc;
  sums[E::reward_rejected] += rr;
  sums[E::accurate] += acc;
  sums[E::count] += static_cast<double>(u_c.size());
}

/// A pairwise result's metric sums from its per-example values, and its metrics from them.
template <class Metrics, class SeqC, class SeqR>
void set_preference_metrics(PairwiseResult<Metrics, SeqC, SeqR>& r, const std::vector<double>& u_c,
                            const std::vector<double>& u_r, double scale = 1.0) noexcept {
  r.metric_sums = {};
  add_preference_sums(r.metric_sums.sums, u_c, u_r, scale);
  r.metrics = r.metric_sums.metrics();
}

/// -(1-e) logsig(z) - e logsig(-z) and its derivative in z: the label-smoothed logistic loss of
/// cDPO and SimPO. d logsig(z)/dz = sig(-z); d logsig(-z)/dz = -sig(z).
struct ValueSlope {
  double value, slope;
};
inline ValueSlope smoothed_logistic(double z, double e) noexcept {
  const auto pos = log_sigmoid_and_grad(z);
  const auto neg = log_sigmoid_and_grad(-z);
  return {-(1 - e) * pos.value - e * neg.value, -(1 - e) * pos.grad + e * neg.grad};
}

template <class A, class B>
constexpr void require_same_scalar() {
  static_assert(std::is_same_v<typename sequence_t<A>::Scalar, typename sequence_t<B>::Scalar>,
                "prefloss: all sequence inputs of a loss must share one scalar type (float or double)");
}

/// The reference input of a loss without one: contributes nothing, reads nothing.
struct NoReference {
  double value(Index) const noexcept { return 0.0; }
};
template <class F>
void for_each_leaf(const NoReference&, F&&) {}

/// @brief The sequence inputs of a pairwise loss, checked (one scalar type, one batch, not
/// empty), and their values in double, read one example at a time by load(i):
/// uc = s_c - rho_c, ur = s_r - rho_r (no rho without references or when reference_free).
template <class SeqC, class SeqR, class RefC = NoReference, class RefR = NoReference>
struct PairInputs {
  using Grads = PairGradViews<SeqC, SeqR>;  ///< a fused call's checked outputs
  SeqC chosen;
  SeqR rejected;
  RefC ref_chosen;
  RefR ref_rejected;
  bool subtract_ref;
  std::vector<double> uc, ur;  ///< filled by load(i)
  double count;                ///< the batch loss's divisor (batch_divisor)
  bool preloaded = false;      ///< uc, ur hold every example's values (preload on a pool)

  /// Reads example i's values into uc[i], ur[i] (nothing to do after preload).
  void load(Index i) noexcept {
    if (!preloaded) fetch(i);
  }

  /// On a pool, reads every example's values in blocks of rows, so the terms after it (in order,
  /// on the calling thread) read none; without one, does nothing.
  void preload(const Threads& threads) {
    preloaded = preload_values(threads, chosen, [&](Index i) { fetch(i); });
  }

  void fetch(Index i) noexcept {
    const auto k = static_cast<std::size_t>(i);
    uc[k] = chosen.value(i);
    ur[k] = rejected.value(i);
    if (subtract_ref) {
      uc[k] -= ref_chosen.value(i);
      ur[k] -= ref_rejected.value(i);
    }
  }

  /// Calls f(name, input) for every input, the references too (a fused call's outputs may
  /// overlap none of them).
  template <class F>
  void for_each_input(F&& f) const {
    f("chosen", chosen);
    f("rejected", rejected);
    f("ref_chosen", ref_chosen);
    f("ref_rejected", ref_rejected);
  }
};

template <class C, class R>
auto pair_inputs(const char* fn, const C& chosen, const R& rejected, const std::optional<double>& batch_count) {
  require_same_scalar<C, R>();
  auto c = as_sequence(chosen, fn, "chosen");
  auto r = as_sequence(rejected, fn, "rejected");
  require_batch(fn, "rejected", r, "chosen", c.size(), c.shape());
  const double count = batch_divisor(fn, "chosen", c.size(), batch_count);
  const auto n = static_cast<std::size_t>(c.size());
  return PairInputs<sequence_t<C>, sequence_t<R>>{std::move(c),           std::move(r),           {},   {}, false,
                                                  std::vector<double>(n), std::vector<double>(n), count};
}

/// The same with reference values (rho = 0 when reference_free; the references are still
/// checked). All checks run before any value is read.
template <class C, class R, class RC, class RR>
auto pair_inputs(const char* fn, const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                 bool reference_free, const std::optional<double>& batch_count) {
  require_same_scalar<C, R>();
  require_same_scalar<C, RC>();
  require_same_scalar<C, RR>();
  auto c = as_sequence(chosen, fn, "chosen");
  auto rc = as_sequence(ref_chosen, fn, "ref_chosen");
  auto rr = as_sequence(ref_rejected, fn, "ref_rejected");
  auto r = as_sequence(rejected, fn, "rejected");
  require_batch(fn, "rejected", r, "chosen", c.size(), c.shape());
  require_batch(fn, "ref_chosen", rc, "chosen", c.size(), c.shape());
  require_batch(fn, "ref_rejected", rr, "chosen", c.size(), c.shape());
  const double count = batch_divisor(fn, "chosen", c.size(), batch_count);
  const auto n = static_cast<std::size_t>(c.size());
  // The vectors are built in place (no moved-from temporaries: GCC 12 then reports a false
  // -Wmismatched-new-delete where operator new is replaced).
  return PairInputs<sequence_t<C>, sequence_t<R>, sequence_t<RC>, sequence_t<RR>>{
      std::move(c),    std::move(r),           std::move(rc),          std::move(rr),
      !reference_free, std::vector<double>(n), std::vector<double>(n), count};
}

/// @brief Checks a fused call's gradient outputs before anything is computed or written: each
/// shaped like its input's leaves and aligned, the two disjoint, and neither over any tensor the
/// loss reads (every input of `in`, references included). Returns their write views.
template <class In, class GC, class GR>
auto pair_grads(const char* fn, const In& in, GC& gc, GR& gr) {
  typename In::Grads v{in.chosen.grad_view(gc, fn, "grad_chosen"), in.rejected.grad_view(gr, fn, "grad_rejected")};
  require_disjoint(fn, "grad_chosen", gc, "grad_rejected", gr);
  in.for_each_input([&](const char* name, const auto& input) {
    require_not_input(fn, "grad_chosen", gc, name, input);
    require_not_input(fn, "grad_rejected", gr, name, input);
  });
  return v;
}

}  // namespace detail
}  // namespace prefloss
