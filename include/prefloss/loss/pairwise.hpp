/// @file loss/pairwise.hpp
/// The machinery shared by every loss of a chosen and a rejected sequence (Bradley-Terry, the
/// DPO family, IPO, SimPO, ORPO): evaluate both sequence inputs once, apply a per-example
/// function that returns the loss and its partial derivatives, average over the batch, and keep
/// d loss / d sequence value so backward() is one streaming write per side.
#pragma once

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/Tensor>

#include "../config.hpp"
#include "../errors.hpp"
#include "../reduce/sequence.hpp"
#include "../math/log_sigmoid.hpp"
#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"

namespace prefloss {

/// Metrics of the DPO family, as TRL logs them (rewards are beta * (policy - reference)).
template <class S>
struct PreferenceMetrics {
  S reward_chosen = 0;    ///< batch mean of the chosen rewards
  S reward_rejected = 0;  ///< batch mean of the rejected rewards
  S reward_margin = 0;    ///< batch mean of chosen - rejected reward
  S reward_accuracy = 0;  ///< fraction of pairs with chosen reward strictly greater
};

/// @brief Result of a pairwise loss: the batch loss, per-example losses, metrics, and the
/// gradient with respect to both policy inputs.
///
/// Holds copies of the input expressions (which view the caller's tensors: keep those alive
/// until backward() has run) and the per-example d loss / d value, [batch] each.
template <class Metrics, class SeqC, class SeqR>
class PairwiseResult {
 public:
  using Scalar = typename SeqC::Scalar;
  Scalar loss = 0;                ///< batch loss (mean of losses unless the loss says otherwise)
  Eigen::Tensor<Scalar, 1> losses;  ///< per-example losses [batch]
  Metrics metrics;

  PairwiseResult(const char* fn, SeqC c, SeqR r) : fn_(fn), c_(std::move(c)), r_(std::move(r)) {}

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
    c_.backward_to(dc_.data(), gc);
    r_.backward_to(dr_.data(), gr);
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
std::vector<double> values_of(const Seq& s) {
  std::vector<double> v(static_cast<std::size_t>(s.size()));
  for (Index i = 0; i < s.size(); ++i) v[static_cast<std::size_t>(i)] = s.value(i);
  return v;
}

/// Runs a pairwise loss over the batch. term(i) gives example i's PairTerm; the batch loss is
/// the mean, so the stored value gradients are d term / d value divided by the batch size.
template <class Metrics, class SeqC, class SeqR, class Term>
PairwiseResult<Metrics, SeqC, SeqR> pairwise_loss(const char* fn, SeqC c, SeqR r, Term&& term) {
  using S = typename SeqC::Scalar;
  const Index B = c.size();
  PairwiseResult<Metrics, SeqC, SeqR> out(fn, std::move(c), std::move(r));
  out.losses = Eigen::Tensor<S, 1>(B);
  out.dc_ = Eigen::Tensor<S, 1>(B);
  out.dr_ = Eigen::Tensor<S, 1>(B);
  double total = 0;
  const double inv_b = 1.0 / static_cast<double>(B);
  for (Index i = 0; i < B; ++i) {
    const PairTerm t = term(i);
    out.losses(i) = static_cast<S>(t.loss);
    out.dc_(i) = static_cast<S>(t.d_chosen * inv_b);
    out.dr_(i) = static_cast<S>(t.d_rejected * inv_b);
    total += t.loss;
  }
  out.loss = static_cast<S>(total * inv_b);
  return out;
}

/// TRL's reward metrics from per-example values u: the rewards are scale * u.
template <class S>
PreferenceMetrics<S> preference_metrics(const std::vector<double>& u_c, const std::vector<double>& u_r,
                                        double scale = 1.0) {
  PreferenceMetrics<S> m;
  const double n = static_cast<double>(u_c.size());
  double rc = 0, rr = 0, acc = 0;
  for (std::size_t i = 0; i < u_c.size(); ++i) {
    const double wc = scale * u_c[i], wr = scale * u_r[i];
    rc += wc;
    rr += wr;
    acc += wc > wr ? 1.0 : 0.0;
  }
  m.reward_chosen = static_cast<S>(rc / n);
  m.reward_rejected = static_cast<S>(rr / n);
  m.reward_margin = static_cast<S>((rc - rr) / n);
  m.reward_accuracy = static_cast<S>(acc / n);
  return m;
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

/// The two policy sequence inputs of a pairwise loss, checked (one scalar type, one batch, not
/// empty), and their values in double.
template <class SeqC, class SeqR>
struct PairInputs {
  SeqC chosen;
  SeqR rejected;
  std::vector<double> uc, ur;  ///< policy values, minus the reference values when there are any
};

template <class C, class R>
auto pair_inputs(const char* fn, const C& chosen, const R& rejected) {
  require_same_scalar<C, R>();
  auto c = as_sequence(chosen, fn, "chosen");
  auto r = as_sequence(rejected, fn, "rejected");
  require_batch(fn, "rejected", r, "chosen", c.size(), c.shape());
  require_nonempty(fn, "chosen", c.size());
  std::vector<double> uc = values_of(c), ur = values_of(r);
  return PairInputs<sequence_t<C>, sequence_t<R>>{std::move(c), std::move(r), std::move(uc), std::move(ur)};
}

/// The same with reference values: uc = s_c - rho_c, ur = s_r - rho_r (rho = 0 when
/// reference_free; the references are still checked). All checks run before any value is read.
template <class C, class R, class RC, class RR>
auto pair_inputs(const char* fn, const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                 bool reference_free) {
  require_same_scalar<C, RC>();
  require_same_scalar<C, RR>();
  const auto c = as_sequence(chosen, fn, "chosen");
  const auto rc = as_sequence(ref_chosen, fn, "ref_chosen");
  const auto rr = as_sequence(ref_rejected, fn, "ref_rejected");
  require_batch(fn, "rejected", as_sequence(rejected, fn, "rejected"), "chosen", c.size(), c.shape());
  require_batch(fn, "ref_chosen", rc, "chosen", c.size(), c.shape());
  require_batch(fn, "ref_rejected", rr, "chosen", c.size(), c.shape());
  auto p = pair_inputs(fn, chosen, rejected);
  if (!reference_free) {
    for (std::size_t i = 0; i < p.uc.size(); ++i) {
      p.uc[i] -= rc.value(static_cast<Index>(i));
      p.ur[i] -= rr.value(static_cast<Index>(i));
    }
  }
  return p;
}

}  // namespace detail
}  // namespace prefloss
