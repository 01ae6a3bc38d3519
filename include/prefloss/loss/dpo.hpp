/// @file loss/dpo.hpp
/// Direct Preference Optimization (Rafailov et al. 2023) and every loss_type of TRL's DPOTrainer
/// that scores a pair by its log-ratios (sigmoid, robust, hinge, EXO, NCA, BCO, SPPO, APO,
/// DiscoPOP, AOT), with f-divergence scores, conservative label smoothing (cDPO) and the
/// reference-free form.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../math/log_sigmoid.hpp"
#include "../math/sigmoid.hpp"
#include "../parallel.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"

namespace prefloss {

/// @brief Which DPO-family loss to use: TRL's DPOTrainer loss_type names
/// (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, f2cd577).
///
/// u_c = s_c - rho_c and u_r = s_r - rho_r are the log-ratios; f is DpoOptions::divergence's
/// score (f(u) = u for reverse_kl); z = b (f(u_c) - f(u_r)); e = label_smoothing; sig and logsig
/// the logistic function and its log. Each formula is one example's loss.
enum class DpoVariant {
  sigmoid,  ///< -(1-e) logsig(z) - e logsig(-z)  (e > 0: cDPO, see dpo())
  robust,   ///< (-(1-e) logsig(z) + e logsig(-z)) / (1-2e)  (Chowdhury et al. 2024)
  hinge,    ///< max(0, 1 - z)  (SLiC); derivative 0 at the kink, as torch.relu
  /// EXO (Ji et al. 2024, Eq. 16): KL(q || p) of q = (sig(z), sig(-z)) from p = (1-e, e):
  /// sig(z) (logsig(z) - log(1-e)) + sig(-z) (logsig(-z) - log e). Needs label_smoothing > 0.
  exo_pair,
  /// NCA (Chen et al. 2024), with r = b f(u): -logsig(r_c) - logsig(-r_c)/2 - logsig(-r_r)/2
  nca_pair,
  /// BCO's pairwise form, with r = b f(u) and the caller's reward shift d (bco_delta):
  /// -logsig(r_c - d) - logsig(-(r_r - d)). TRL's dpo loss_type="bco_pair" is d = 0; BCOTrainer
  /// keeps d as a running mean of the rewards, which the caller can carry from the metrics.
  bco_pair,
  /// SPPO with hard probabilities (Wu et al. 2024): (f(u_c) - 1/(2b))^2 + (f(u_r) + 1/(2b))^2
  sppo_hard,
  /// APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 - sig(b u_c) + sig(b u_r), on the log-ratios
  /// (TRL reads them, not the f-divergence scores: divergence must be reverse_kl)
  apo_zero,
  /// APO-down (Eq. 8): sig(b u_c) + 1 - sig(z)
  apo_down,
  /// DiscoPOP (Chris Lu et al. 2024, Eq. 5), with m = sig(z / discopop_tau):
  /// -logsig(z) (1 - m) + exp(-z) m. exp(-z) m is evaluated as exp(-z + logsig(z / tau)), so it
  /// stays finite where it is (TRL's exp(-z) overflows to inf and times m = 0 gives NaN).
  discopop,
  /// AOT paired (Melnyk et al. 2024): the policy log-ratios p_i = s_c,i - s_r,i and the reference
  /// ones q_i = rho_c,i - rho_r,i are each sorted ascending over this call's batch, and the k-th
  /// term is the sigmoid loss of z_k = b (p_(k) - q_(k)). The permutation is a constant (torch
  /// differentiates through torch.sort so). Ties keep example order (a stable sort; NaN sorts
  /// last, as in torch.sort). losses(i) is the term at the rank of p_i. divergence must be
  /// reverse_kl (TRL reads the log-probs).
  aot,
  /// AOT unpaired: u_c and u_r are each sorted ascending and the k-th term is the sigmoid loss of
  /// z_k = b (u_c,(k) - u_r,(k)); losses(i) is the term at the rank of u_c,i. As aot otherwise.
  aot_unpaired,
};

/// @brief The f-divergence whose derivative scores each log-ratio u before the loss (f-DPO, Wang
/// et al. 2023), as TRL's DPOTrainer._compute_loss (f_divergence_type) computes it.
enum class FDivergence {
  reverse_kl,        ///< f(u) = u: standard DPO
  forward_kl,        ///< f(u) = -exp(-u)
  js_divergence,     ///< f(u) = logsig(u)
  alpha_divergence,  ///< f(u) = exp(min((a-1) u, alpha_clamp)) / (a-1); a = alpha; f(u) = u when |a-1| < 1e-6
};

/// Options of dpo(). Defaults are TRL's.
struct DpoOptions {
  double beta = 0.1;  ///< > 0: inverse temperature of the implicit reward
  /// in [0, 0.5): assumed label-flip probability e (sigmoid, robust, aot, aot_unpaired) or EXO's
  /// target smoothing (exo_pair, where it must be > 0; the paper suggests 1e-3); the other
  /// variants ignore it. robust divides by 1 - 2e, so its loss and gradient grow without bound as
  /// e approaches 0.5 (labels that carry no information): that is the estimator's value, not a
  /// rounding artefact, and prefloss computes it as it is.
  double label_smoothing = 0.0;
  /// true (default): sigmoid with e > 0 is cDPO (OpenRLHF's DPOLoss, torchtune); false: sigmoid
  /// ignores label_smoothing, as TRL's DPOTrainer._compute_loss does since cDPO left TRL (the other
  /// variants still read it, so a dpo_mixture keeps TRL's per-term behaviour).
  bool sigmoid_label_smoothing = true;
  DpoVariant variant = DpoVariant::sigmoid;
  bool reference_free = false;  ///< true: rho = 0, the reference inputs are ignored
  /// The score of each log-ratio (TRL's f_divergence_type); apo_zero, aot and aot_unpaired take
  /// only reverse_kl.
  FDivergence divergence = FDivergence::reverse_kl;
  double alpha = 0.5;  ///< finite: alpha_divergence's a (TRL's f_alpha_divergence_coef)
  /// not NaN: the cap on alpha_divergence's exponent (a-1) u, beyond which the score is constant
  /// and its derivative 0. TRL's is 80 for float32 and bfloat16 (11 for float16); +inf removes it.
  double alpha_clamp = 80.0;
  double bco_delta = 0.0;      ///< finite: bco_pair's reward shift d
  double discopop_tau = 0.05;  ///< > 0 and finite: DiscoPOP's temperature
  /// Empty, or one finite weight >= 0 per example that multiplies its loss and gradient: WPO's
  /// w_c * w_r (see wpo_weights; TRL's use_weighting), or any per-pair weight. Not with aot or
  /// aot_unpaired (TRL rejects use_weighting there: the sorted terms are no example's).
  std::vector<double> pair_weights = {};
  /// Examples in the global batch (every rank and micro-batch): the loss is sum(losses) /
  /// batch_count and the gradients scale with it, so shards add up to the whole batch. Unset:
  /// this call's batch. Finite, >= 1 and >= this call's batch; an empty shard is then allowed.
  /// aot and aot_unpaired sort each call's batch on its own, as TRL sorts each process's batch.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its result's backward()) may split the sequence rows over: the values
  /// are read in blocks of rows and the per-example terms run in order on the calling thread,
  /// the same bits for any count (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

/// One term of a weighted sum of DPO losses (see dpo_mixture).
struct DpoTerm {
  DpoVariant variant = DpoVariant::sigmoid;
  double weight = 1.0;  ///< finite: TRL's loss_weights entry
};

namespace detail {

inline bool dpo_variant_known(DpoVariant v) noexcept {
  return static_cast<int>(v) >= static_cast<int>(DpoVariant::sigmoid) &&
         static_cast<int>(v) <= static_cast<int>(DpoVariant::aot_unpaired);
}

/// Variants whose loss reads the log-ratios (or log-probs), not the f-divergence scores.
inline bool dpo_reads_logratios(DpoVariant v) noexcept {
  return v == DpoVariant::apo_zero || v == DpoVariant::aot || v == DpoVariant::aot_unpaired;
}

/// The checks of one loss term's variant against the shared options.
inline void require_dpo_variant(const char* fn, const char* name, DpoVariant v, const DpoOptions& opt) {
  require_enum(dpo_variant_known(v), fn, name, static_cast<int>(v));
  require_option(v != DpoVariant::exo_pair || opt.label_smoothing > 0, fn, "label_smoothing",
                 "> 0 for variant exo_pair (log e is -inf at 0)", opt.label_smoothing);
  require_option(opt.divergence == FDivergence::reverse_kl || !dpo_reads_logratios(v), fn, "divergence",
                 "reverse_kl (0) for variants apo_zero, aot and aot_unpaired, which read the log-ratios",
                 static_cast<int>(opt.divergence));
  require_option(opt.pair_weights.empty() || (v != DpoVariant::aot && v != DpoVariant::aot_unpaired), fn,
                 "pair_weights", "empty for variants aot and aot_unpaired (TRL rejects use_weighting there), size",
                 static_cast<double>(opt.pair_weights.size()));
}

/// dpo's checks of the options shared by every term, then of the inputs; nothing is read.
template <class C, class R, class RC, class RR>
auto dpo_inputs(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt,
                const char* fn) {
  require_beta(fn, opt.beta);
  require_option(opt.label_smoothing >= 0 && opt.label_smoothing < 0.5, fn, "label_smoothing", "in [0, 0.5)",
                 opt.label_smoothing);
  const int div = static_cast<int>(opt.divergence);
  require_enum(
      div >= static_cast<int>(FDivergence::reverse_kl) && div <= static_cast<int>(FDivergence::alpha_divergence), fn,
      "divergence", div);
  require_option(std::isfinite(opt.alpha), fn, "alpha", "finite", opt.alpha);
  require_option(!std::isnan(opt.alpha_clamp), fn, "alpha_clamp", "a number (+inf removes the clamp)", opt.alpha_clamp);
  require_option(std::isfinite(opt.bco_delta), fn, "bco_delta", "finite", opt.bco_delta);
  require_option(opt.discopop_tau > 0 && opt.discopop_tau < HUGE_VAL, fn, "discopop_tau", "> 0 and finite",
                 opt.discopop_tau);
  for (std::size_t i = 0; i < opt.pair_weights.size(); ++i) {
    const double w = opt.pair_weights[i];
    if (!(w >= 0 && w < HUGE_VAL))
      throw option_error(std::string(fn) + ": option 'pair_weights' must hold finite weights >= 0, got " + fmt(w) +
                         " at index " + std::to_string(i));
  }
  auto in = pair_inputs(fn, chosen, rejected, ref_chosen, ref_rejected, opt.reference_free, opt.batch_count);
  if (!opt.pair_weights.empty() && static_cast<Index>(opt.pair_weights.size()) != in.chosen.size())
    throw shape_error(std::string(fn) + ": option 'pair_weights' has " + std::to_string(opt.pair_weights.size()) +
                      " weights but 'chosen' has batch " + std::to_string(in.chosen.size()) + " (shape " +
                      in.chosen.shape() + ")");
  return in;
}

/// The divergence's score f(u) (value) and f'(u) (slope).
inline ValueSlope dpo_score(const DpoOptions& opt, double u) noexcept {
  switch (opt.divergence) {
    case FDivergence::forward_kl: {
      const double x = std::exp(-u);
      return {-x, x};
    }
    case FDivergence::js_divergence: {
      const auto l = log_sigmoid_and_grad(u);
      return {l.value, l.grad};
    }
    case FDivergence::alpha_divergence: {
      const double a1 = opt.alpha - 1;
      if (std::fabs(a1) < 1e-6) return {u, 1.0};  // the limit a -> 1 is reverse_kl, as TRL takes it
      const double t = a1 * u;
      // torch.clamp passes the gradient at the bound itself and blocks it beyond.
      if (t > opt.alpha_clamp) return {std::exp(opt.alpha_clamp) / a1, 0.0};
      const double x = std::exp(t);
      return {x / a1, x};
    }
    case FDivergence::reverse_kl:
      break;
  }
  return {u, 1.0};
}

/// sig(x) sig(-x), the logistic function's derivative, without cancellation for large |x|.
inline double sigmoid_slope(double x) noexcept {
  const double a = std::fabs(x), t = std::exp(-a);
  return t / ((1 + t) * (1 + t));
}

/// A loss L(z) of z = b (f(u_c) - f(u_r)) and dL/dz, for the variants that read only z.
inline ValueSlope dpo_of_margin(const DpoOptions& opt, DpoVariant v, double z) noexcept {
  const double e = opt.label_smoothing;
  switch (v) {
    case DpoVariant::hinge:
      return {std::max(0.0, 1.0 - z), 1.0 - z > 0 ? -1.0 : 0.0};
    case DpoVariant::robust: {
      // (-(1-e) logsig(z) + e logsig(-z)) / (1-2e); d logsig(-z)/dz = -sig(z).
      const auto pos = log_sigmoid_and_grad(z);
      const auto neg = log_sigmoid_and_grad(-z);
      return {(-(1 - e) * pos.value + e * neg.value) / (1 - 2 * e), (-(1 - e) * pos.grad - e * neg.grad) / (1 - 2 * e)};
    }
    case DpoVariant::exo_pair: {
      // With q = sig(z): dL/dq = log q - log(1-q) - log(1-e) + log e = z - log((1-e)/e).
      const auto pos = log_sigmoid_and_grad(z);
      const auto neg = log_sigmoid_and_grad(-z);
      const double q = sigmoid(z), ql = sigmoid(-z);
      return {q * (pos.value - std::log1p(-e)) + ql * (neg.value - std::log(e)),
              sigmoid_slope(z) * (z - (std::log1p(-e) - std::log(e)))};
    }
    case DpoVariant::discopop: {
      const double tau = opt.discopop_tau;
      const double a = -log_sigmoid(z), da = -sigmoid(-z);
      const double one_m = sigmoid(-z / tau), s = sigmoid_slope(z / tau);  // dm/dz = s / tau
      const double x = std::exp(-z + log_sigmoid(z / tau));                // exp(-z) m
      // dL/dz = da (1-m) - a s / tau + x ((1-m) / tau - 1), with the 1/tau terms summed before the
      // division: for a tiny tau each is huge and of opposite sign, and inf - inf would be NaN.
      return {a * one_m + x, da * one_m + (x * (one_m - tau) - a * s) / tau};
    }
    case DpoVariant::sigmoid:
      return smoothed_logistic(z, opt.sigmoid_label_smoothing ? e : 0.0);
    default:
      return smoothed_logistic(z, e);  // each sorted term of aot / aot_unpaired
  }
}

/// One example's loss and d loss / d u_c, d loss / d u_r, for the variants without a sort.
inline PairTerm dpo_term(const DpoOptions& opt, DpoVariant v, double uc, double ur) noexcept {
  const double b = opt.beta;
  const ValueSlope fc = dpo_score(opt, uc), fr = dpo_score(opt, ur);
  switch (v) {
    case DpoVariant::nca_pair: {
      const double rc = b * fc.value, rr = b * fr.value;
      const auto pc = log_sigmoid_and_grad(rc), nc = log_sigmoid_and_grad(-rc), nr = log_sigmoid_and_grad(-rr);
      const double drc = -pc.grad + 0.5 * sigmoid(rc), drr = 0.5 * sigmoid(rr);
      return {-pc.value - 0.5 * nc.value - 0.5 * nr.value, drc * b * fc.slope, drr * b * fr.slope};
    }
    case DpoVariant::bco_pair: {
      const double d = opt.bco_delta;
      const double xc = b * fc.value - d, xr = b * fr.value - d;
      const auto pc = log_sigmoid_and_grad(xc), nr = log_sigmoid_and_grad(-xr);
      return {-pc.value - nr.value, -pc.grad * b * fc.slope, sigmoid(xr) * b * fr.slope};
    }
    case DpoVariant::sppo_hard: {
      const double hc = fc.value - 0.5 / b, hr = fr.value + 0.5 / b;
      return {hc * hc + hr * hr, 2 * hc * fc.slope, 2 * hr * fr.slope};
    }
    case DpoVariant::apo_zero:
      // 1 - sig(x) written as sig(-x): the same number without cancellation.
      return {sigmoid(-b * uc) + sigmoid(b * ur), -b * sigmoid_slope(b * uc), b * sigmoid_slope(b * ur)};
    case DpoVariant::apo_down: {
      const double z = b * (fc.value - fr.value), s = sigmoid_slope(z);
      return {sigmoid(b * uc) + sigmoid(-z), b * sigmoid_slope(b * uc) - s * b * fc.slope, s * b * fr.slope};
    }
    default: {
      const ValueSlope l = dpo_of_margin(opt, v, b * (fc.value - fr.value));
      return {l.value, l.slope * b * fc.slope, -l.slope * b * fr.slope};
    }
  }
}

/// Ascending ranks of x (rank[i] = position of x[i]): stable, NaN after every number.
inline std::vector<std::size_t> sort_ranks(const std::vector<double>& x) {
  std::vector<std::size_t> order(x.size()), rank(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const bool na = std::isnan(x[a]), nb = std::isnan(x[b]);
    return na || nb ? !na && nb : x[a] < x[b];
  });
  for (std::size_t k = 0; k < order.size(); ++k) rank[order[k]] = k;
  return rank;
}

/// aot / aot_unpaired: every example's term, from the batch sorted. Reads every value first.
template <class In>
std::vector<PairTerm> aot_terms(In& in, const DpoOptions& opt, DpoVariant v) {
  const std::size_t n = in.uc.size();
  if (!in.preloaded) {
    for (std::size_t i = 0; i < n; ++i) in.fetch(static_cast<Index>(i));
    in.preloaded = true;
  }
  std::vector<double> a(n), c(n);  // the two sorted sides: aot p and q, aot_unpaired u_c and u_r
  for (std::size_t i = 0; i < n; ++i) {
    if (v == DpoVariant::aot) {
      const Index k = static_cast<Index>(i);
      const double q = in.subtract_ref ? in.ref_chosen.value(k) - in.ref_rejected.value(k) : 0.0;
      a[i] = (in.uc[i] - in.ur[i]) + q;
      c[i] = q;
    } else {
      a[i] = in.uc[i];
      c[i] = in.ur[i];
    }
  }
  const auto ra = sort_ranks(a), rc = sort_ranks(c);
  std::vector<double> sa(n), sc(n);
  for (std::size_t i = 0; i < n; ++i) {
    sa[ra[i]] = a[i];
    sc[rc[i]] = c[i];
  }
  const double b = opt.beta;
  // Values and slopes apart: a std::vector<ValueSlope> here trips GCC 12's false
  // -Wmismatched-new-delete where operator new is replaced (tests/alloc_count.hpp).
  std::vector<double> value(n), slope(n);
  for (std::size_t k = 0; k < n; ++k) {
    const ValueSlope t = dpo_of_margin(opt, v, b * (sa[k] - sc[k]));
    value[k] = t.value;
    slope[k] = t.slope;
  }
  std::vector<PairTerm> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    // aot: p_i = s_c,i - s_r,i moves both sides; aot_unpaired: u_r,i enters the term at its own rank.
    const double dr = v == DpoVariant::aot ? -b * slope[ra[i]] : -b * slope[rc[i]];
    out[i] = {value[ra[i]], b * slope[ra[i]], dr};
  }
  return out;
}

/// dpo's arithmetic, one body for both forms and for mixtures; grads is null for the two-pass
/// form. terms: the mixture's terms (their batch losses go to term_loss), or {opt.variant, 1}.
template <class In>
PREFLOSS_DETAIL_ONE_BODY auto dpo_run(const char* fn, In in, const DpoOptions& opt, const DpoTerm* terms,
                                      std::size_t n_terms, const typename In::Grads* grads,
                                      std::vector<double>* term_loss) {
  using S = typename decltype(in.chosen)::Scalar;
  in.preload(opt.threads);
  const auto is_sorted = [](DpoVariant v) { return v == DpoVariant::aot || v == DpoVariant::aot_unpaired; };
  bool any_sorted = false;
  for (std::size_t k = 0; k < n_terms; ++k) any_sorted = any_sorted || is_sorted(terms[k].variant);
  std::vector<std::vector<PairTerm>> sorted_terms(any_sorted ? n_terms : 0);
  for (std::size_t k = 0; k < sorted_terms.size(); ++k)
    if (is_sorted(terms[k].variant)) sorted_terms[k] = aot_terms(in, opt, terms[k].variant);
  if (term_loss) term_loss->assign(n_terms, 0.0);
  const bool weighted = !opt.pair_weights.empty();
  auto result = pairwise_loss<PreferenceMetrics<S>>(
      fn, in.chosen, in.rejected, in.count,
      [&](Index i) {
        const auto k_i = static_cast<std::size_t>(i);
        in.load(i);
        PairTerm sum{0, 0, 0};
        for (std::size_t k = 0; k < n_terms; ++k) {
          PairTerm t = is_sorted(terms[k].variant) ? sorted_terms[k][k_i]
                                                   : dpo_term(opt, terms[k].variant, in.uc[k_i], in.ur[k_i]);
          if (weighted)
            t = {t.loss * opt.pair_weights[k_i], t.d_chosen * opt.pair_weights[k_i],
                 t.d_rejected * opt.pair_weights[k_i]};
          if (term_loss) (*term_loss)[k] += t.loss;
          const double w = terms[k].weight;
          if (n_terms == 1 && w == 1.0) return t;  // dpo(): the term is the loss, bit for bit
          sum = {sum.loss + w * t.loss, sum.d_chosen + w * t.d_chosen, sum.d_rejected + w * t.d_rejected};
        }
        return sum;
      },
      grads, opt.threads);
  if (term_loss)
    for (double& l : *term_loss) l /= in.count;
  set_preference_metrics(result, in.uc, in.ur, opt.beta);
  return result;
}
}  // namespace detail

/// @brief DPO loss of policy sequence values against reference values.
///
/// Per example, with u = s - rho (rho = 0 when reference_free), the score f(u) of
/// DpoOptions::divergence (u itself by default) and z = b (f(u_c) - f(u_r)): the loss of
/// DpoVariant (sigmoid `-(1-e) logsig(z) - e logsig(-z)`, robust, hinge, exo_pair, nca_pair,
/// bco_pair, sppo_hard, apo_zero, apo_down, discopop, and the batch-sorted aot and aot_unpaired;
/// each formula is at its enumerator). The batch loss is their mean, over sequence log-probs
/// summed over completion tokens (pass masked_sum expressions; masked_mean expressions on policy
/// and reference give TRL's sigmoid_norm for reverse_kl). Every variant and score is TRL's
/// DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py, f2cd577) except two choices:
/// - sigmoid with e > 0 is cDPO, as OpenRLHF's DPOLoss computes it (openrlhf/models/loss.py);
///   TRL's _compute_loss ignores label_smoothing for loss_type="sigmoid": set
///   sigmoid_label_smoothing = false (preset::trl::dpo does) for TRL's loss.
/// - alpha_divergence's exponent clamp is alpha_clamp, applied in double; TRL applies it in
///   float32 (and fails on float64 scores, which its clamp table lacks).
///
/// Rewards are `b u` for every variant (TRL's metrics read the log-ratios, not the scores);
/// metrics are TRL's rewards/{chosen,rejected,margins,accuracies} (accuracy strict).
///
/// @param chosen, rejected policy values: masked_sum/masked_mean expressions or [batch] tensors
/// @param ref_chosen, ref_rejected reference values (constants), same forms
/// @return PairwiseResult; backward(g_chosen, g_rejected) writes d loss / d policy inputs.
/// @throws shape_error on batch mismatch or empty batch; option_error for beta <= 0,
/// label_smoothing outside [0, 0.5) (or 0 with exo_pair), an unknown variant or divergence, a
/// divergence other than reverse_kl with apo_zero / aot / aot_unpaired, a non-finite alpha or
/// bco_delta, a NaN alpha_clamp, or discopop_tau <= 0. Nothing is written on error.
template <class C, class R, class RC, class RR>
auto dpo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt = {}) {
  constexpr const char* fn = "dpo";
  detail::require_dpo_variant(fn, "variant", opt.variant, opt);
  auto in = detail::dpo_inputs(chosen, rejected, ref_chosen, ref_rejected, opt, fn);
  const DpoTerm term{opt.variant, 1.0};
  return detail::dpo_run(fn, std::move(in), opt, &term, 1, nullptr, nullptr);
}

/// @brief dpo() fused with its backward: the same result, and d loss / d chosen and d loss /
/// d rejected written into grad_chosen and grad_rejected in the same pass over the tokens.
///
/// Each example's rows are read once for its sequence values and its gradient rows are written
/// right after (from the mask, still in cache; streaming stores for outputs of
/// PREFLOSS_STREAMING_STORE_BYTES or more). The loss, losses, metrics and both gradients are
/// bit-identical to `auto r = dpo(...); r.backward(grad_chosen, grad_rejected);`, and the
/// returned result's backward() still works.
///
/// @param grad_chosen, grad_rejected outputs shaped like the leaves of chosen / rejected
/// ([batch, tokens] for an expression, [batch] for a plain tensor), fully overwritten.
/// @throws as dpo(); shape_error naming 'grad_chosen' or 'grad_rejected'; layout_error when an
/// output is misaligned, the two overlap, or either overlaps any input tensor (tokens, masks and
/// references). Every check runs before anything is written.
template <class C, class R, class RC, class RR, class GC, class GR>
auto dpo(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected, const DpoOptions& opt,
         GC&& grad_chosen, GR&& grad_rejected) {
  constexpr const char* fn = "dpo";
  detail::require_dpo_variant(fn, "variant", opt.variant, opt);
  auto in = detail::dpo_inputs(chosen, rejected, ref_chosen, ref_rejected, opt, fn);
  const auto grads = detail::pair_grads(fn, in, grad_chosen, grad_rejected);
  const DpoTerm term{opt.variant, 1.0};
  return detail::dpo_run(fn, std::move(in), opt, &term, 1, &grads, nullptr);
}

/// @brief Result of dpo_mixture(): dpo()'s result, and each term's batch loss kept apart.
template <class Base>
struct DpoMixtureResult : Base {
  explicit DpoMixtureResult(Base&& b) : Base(std::move(b)) {}
  /// term_loss[k]: term k's own batch loss, before its weight (loss = sum_k weight_k term_loss[k]
  /// up to rounding); pair_weights apply to every term.
  std::vector<typename Base::Scalar> term_loss;
};

namespace detail {
template <class C, class R, class RC, class RR>
auto dpo_mixture_inputs(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                        const std::vector<DpoTerm>& terms, const DpoOptions& opt) {
  constexpr const char* fn = "dpo_mixture";
  if (terms.empty()) throw option_error(std::string(fn) + ": argument 'terms' is empty; give at least one DpoTerm");
  for (std::size_t k = 0; k < terms.size(); ++k) {
    require_dpo_variant(fn, ("terms[" + std::to_string(k) + "].variant").c_str(), terms[k].variant, opt);
    if (!std::isfinite(terms[k].weight))
      throw option_error(std::string(fn) + ": option 'terms[" + std::to_string(k) + "].weight' must be finite, got " +
                         fmt(terms[k].weight));
  }
  return dpo_inputs(chosen, rejected, ref_chosen, ref_rejected, opt, fn);
}

template <class In>
auto dpo_mixture_run(In in, const std::vector<DpoTerm>& terms, const DpoOptions& opt, const typename In::Grads* grads) {
  std::vector<double> term_loss;
  auto base = dpo_run("dpo_mixture", std::move(in), opt, terms.data(), terms.size(), grads, &term_loss);
  DpoMixtureResult<decltype(base)> out(std::move(base));
  out.term_loss.assign(term_loss.begin(), term_loss.end());
  return out;
}
}  // namespace detail

/// @brief A weighted sum of DPO losses in one pass: TRL's loss_type list with loss_weights
/// (DPOTrainer._compute_loss, trl/trainer/dpo_trainer.py, f2cd577; MPO is sigmoid + bco_pair +
/// TRL's "sft" term).
///
/// Per example the loss is sum_k weight_k l_k (times pair_weights[i] when given), l_k the
/// example's loss of terms[k].variant with the shared options (DpoOptions::variant is not read);
/// the batch loss, gradients and metrics are dpo()'s for that sum, and term_loss keeps each
/// term's batch loss. TRL's "sft" term is a token-mean NLL of the chosen tokens, not a function
/// of sequence values: add nll(masked_sum(logp_c, mask_c), {normalizer = valid chosen tokens})
/// weighted alike, and sum the two gradients.
/// @throws as dpo(), naming 'terms[k].variant' for a term's variant; option_error for empty
/// terms or a non-finite weight. Nothing is written on error.
template <class C, class R, class RC, class RR>
auto dpo_mixture(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                 const std::vector<DpoTerm>& terms, const DpoOptions& opt = {}) {
  return detail::dpo_mixture_run(detail::dpo_mixture_inputs(chosen, rejected, ref_chosen, ref_rejected, terms, opt),
                                 terms, opt, nullptr);
}

/// @brief dpo_mixture() fused with its backward, as the fused dpo(): gradient outputs last,
/// checked as dpo()'s before anything is written.
template <class C, class R, class RC, class RR, class GC, class GR>
auto dpo_mixture(const C& chosen, const R& rejected, const RC& ref_chosen, const RR& ref_rejected,
                 const std::vector<DpoTerm>& terms, const DpoOptions& opt, GC&& grad_chosen, GR&& grad_rejected) {
  auto in = detail::dpo_mixture_inputs(chosen, rejected, ref_chosen, ref_rejected, terms, opt);
  const auto grads = detail::pair_grads("dpo_mixture", in, grad_chosen, grad_rejected);
  return detail::dpo_mixture_run(std::move(in), terms, opt, &grads);
}

/// @brief LD-DPO's token weights (Liu et al. 2024, "length desensitization"), as TRL's
/// DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py, f2cd577) applies ld_alpha: in each pair
/// the first L valid tokens of either response, L the shorter response's count of valid tokens,
/// get weight 1 and the valid tokens after them weight alpha; masked-out tokens get 0.
///
/// masked_sum(logp, weight) then is TRL's shared + alpha * tail sequence log-prob, and its
/// gradient is the weight. TRL weights the reference log-probs the same way, so pass
/// masked_sum(ref_logp, weight) (or the reference sums computed with these weights) as the
/// reference values. A valid token is a nonzero mask entry; a weighted mask's weight is not
/// carried into the output (TRL's completion masks are 0/1).
///
/// @param mask_chosen, mask_rejected [batch, tokens] masks (bool, uint8, float or double; padded
/// or pl::packed), the same batch; the token counts may differ
/// @param alpha in [0, 1] (TRL's range): 1 is plain DPO, 0 drops the tail
/// @param weight_chosen, weight_rejected float or double outputs shaped like their masks
/// @throws shape_error naming the argument (batch mismatch, output shapes); option_error for
/// alpha outside [0, 1]; layout_error when an output overlaps the other or a mask. Nothing is
/// written on error.
template <class MC, class MR, class WC, class WR>
void ld_dpo_weights(const MC& mask_chosen, const MR& mask_rejected, double alpha, WC&& weight_chosen,
                    WR&& weight_rejected) {
  constexpr const char* fn = "ld_dpo_weights";
  static_assert(detail::is_mask_v<detail::tensor_scalar_t<MC>> && detail::is_mask_v<detail::tensor_scalar_t<MR>>,
                "prefloss: masks are bool, uint8_t, float or double");
  static_assert(detail::is_real_v<detail::tensor_scalar_t<WC>> && detail::is_real_v<detail::tensor_scalar_t<WR>>,
                "prefloss: the weights are float or double");
  detail::require_option(alpha >= 0 && alpha <= 1, fn, "alpha", "in [0, 1]", alpha);
  const auto mc = detail::matrix_view(mask_chosen, fn, "mask_chosen");
  const auto mr = detail::matrix_view(mask_rejected, fn, "mask_rejected");
  if (mr.rows != mc.rows)
    throw shape_error(std::string(fn) + ": argument 'mask_rejected' has " + std::to_string(mr.rows) + " rows (shape " +
                      detail::layout_str(mr.layout()) + ") but 'mask_chosen' has " + std::to_string(mc.rows) +
                      " (shape " + detail::layout_str(mc.layout()) + ")");
  const auto wc = detail::matrix_out(weight_chosen, mc.layout(), fn, "weight_chosen");
  const auto wr = detail::matrix_out(weight_rejected, mr.layout(), fn, "weight_rejected");
  detail::require_disjoint(fn, "weight_chosen", weight_chosen, "weight_rejected", weight_rejected);
  detail::require_disjoint(fn, "weight_chosen", weight_chosen, "mask_chosen", mask_chosen);
  detail::require_disjoint(fn, "weight_chosen", weight_chosen, "mask_rejected", mask_rejected);
  detail::require_disjoint(fn, "weight_rejected", weight_rejected, "mask_chosen", mask_chosen);
  detail::require_disjoint(fn, "weight_rejected", weight_rejected, "mask_rejected", mask_rejected);
  const auto valid = [](const auto* m, Index n) {
    Index k = 0;
    for (Index t = 0; t < n; ++t) k += m[t] != 0;
    return k;
  };
  const auto write = [alpha](const auto* m, Index n, Index shared, auto* w) {
    using W = std::remove_pointer_t<decltype(w)>;
    Index seen = 0;
    for (Index t = 0; t < n; ++t) {
      if (m[t] == 0) {
        w[t] = W(0);
        continue;
      }
      w[t] = ++seen <= shared ? W(1) : static_cast<W>(alpha);
    }
  };
  for (Index i = 0; i < mc.rows; ++i) {
    const Index shared = std::min(valid(mc.row(i), mc.len(i)), valid(mr.row(i), mr.len(i)));
    write(mc.row(i), mc.len(i), shared, wc.row(i));
    write(mr.row(i), mr.len(i), shared, wr.row(i));
  }
}

}  // namespace prefloss
