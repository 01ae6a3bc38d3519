// Reference formulas of the libtorch adapter's tests, written in plain libtorch ops (no prefloss
// code) and differentiated by libtorch's own autograd, plus the comparison helpers shared by
// test_torch_losses.cpp and test_torch_adapter.cpp.
//
// The formulas are the anchors the core documents: TRL's dpo_loss (sigmoid with cDPO smoothing,
// robust, hinge, IPO), CPO's SimPO, ORPO's odds ratio, the RewardTrainer's Bradley-Terry with
// centering and Llama 2's margin, KTO with the detached clamped z0, verl's
// compute_policy_loss_vanilla / kl_penalty(low_var_kl) / compute_value_loss with agg_loss, and
// log_softmax + gather for the token log-probs.
#pragma once

#include <torch/torch.h>
#include <prefloss/torch.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <typeinfo>
#include <vector>

namespace tref {

namespace pl = prefloss;
namespace pt = prefloss::torch;
using at::Tensor;

/// max |got - want| / max |want| in double (max |got - want| when want is all 0); NaN anywhere
/// in got makes it NaN, which fails every `<=`.
inline double rel_diff(const Tensor& got, const Tensor& want) {
  REQUIRE(got.defined());
  REQUIRE(want.defined());
  REQUIRE(got.sizes() == want.sizes());
  if (got.numel() == 0) return 0;
  const Tensor g = got.detach().to(torch::kDouble), w = want.detach().to(torch::kDouble);
  const double d = (g - w).abs().max().item<double>();
  const double s = w.abs().max().item<double>();
  if (std::isnan(g.sum().item<double>())) return NAN;
  return s == 0 ? d : d / s;
}

/// 1e-12 for float64 results, 1e-5 for float32 (and 16-bit tokens computed in float).
inline double tol_of(at::ScalarType t) { return t == torch::kDouble ? 1e-12 : 1e-5; }

#define CHECK_REL(got, want, tol)                                            \
  do {                                                                       \
    const double rel_ = ::tref::rel_diff((got), (want));                     \
    INFO(#got " vs " #want ": max-abs-diff / max-abs-reference = " << rel_); \
    CHECK(rel_ <= (tol));                                                    \
  } while (0)

/// Bitwise equality of two tensors of one dtype and shape (NaN equal to NaN of the same bits).
inline bool same_bits(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const Tensor x = a.detach().contiguous(), y = b.detach().contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(),
                     static_cast<std::size_t>(x.numel() * static_cast<int64_t>(x.element_size()))) == 0;
}

/// A [n] torch copy of a rank-1 Eigen tensor (float or double).
template <class S>
Tensor from_eigen(const Eigen::Tensor<S, 1>& v) {
  Tensor t = torch::empty({v.dimension(0)}, torch::TensorOptions().dtype(pt::detail::dtype_of<S>::value));
  std::copy(v.data(), v.data() + v.size(), t.data_ptr<S>());
  return t;
}
template <class S>
Tensor from_eigen(const Eigen::Tensor<S, 2, Eigen::RowMajor>& v) {
  Tensor t =
      torch::empty({v.dimension(0), v.dimension(1)}, torch::TensorOptions().dtype(pt::detail::dtype_of<S>::value));
  std::copy(v.data(), v.data() + v.size(), t.data_ptr<S>());
  return t;
}

/// Two leaves of the same values: `ours` (the input's dtype) for the adapter, `ref` (float64) for
/// the reference, both requiring grad.
struct Twin {
  Tensor ours, ref;
};
inline Twin twin(const Tensor& v) {
  return {v.detach().clone().requires_grad_(), v.detach().to(torch::kDouble).requires_grad_()};
}
/// A constant (no grad) in float64 for the reference.
inline Tensor dbl(const Tensor& v) { return v.detach().to(torch::kDouble); }

/// Throws E exactly (not a sibling or subclass) whose message holds every needle.
template <class E, class Fn>
void expect_error(Fn&& f, std::initializer_list<std::string> needles) {
  REQUIRE_THROWS_AS(f(), E);
  try {
    f();
  } catch (const E& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(typeid(e) == typeid(E));
    for (const std::string& n : needles) {
      INFO("needle: " << n);
      CHECK(what.find(n) != std::string::npos);
    }
  }
}

// ---- the sequence losses (per-example values; the loss is their sum over n) -------------------

inline Tensor logsig(const Tensor& z) { return torch::log_sigmoid(z); }

/// TRL's f-divergence score of a log-ratio (DPOTrainer._compute_loss, f_divergence_type), with
/// the alpha clamp's max taken from the options.
inline Tensor dpo_score(const Tensor& u, const pl::DpoOptions& o) {
  switch (o.divergence) {
    case pl::FDivergence::reverse_kl:
      return u;
    case pl::FDivergence::forward_kl:
      return -torch::exp(-u);
    case pl::FDivergence::js_divergence:
      return logsig(u);
    case pl::FDivergence::alpha_divergence:
      if (std::fabs(o.alpha - 1) < 1e-6) return u;
      return torch::exp(torch::clamp((o.alpha - 1) * u, c10::nullopt, o.alpha_clamp)) * (1 / (o.alpha - 1));
  }
  return {};
}

/// TRL DPOTrainer._compute_loss per example, loss_type = o.variant (sigmoid with cDPO's
/// smoothing, bco_pair with the shift bco_delta). aot / aot_unpaired: TRL's sorted terms, each
/// given to the example whose sorted value it holds (rc = rr = 0 reference-free).
inline Tensor dpo_losses(const Tensor& c, const Tensor& r, const Tensor& rc0, const Tensor& rr0,
                         const pl::DpoOptions& o) {
  const Tensor rc = o.reference_free ? torch::zeros_like(rc0) : rc0;
  const Tensor rr = o.reference_free ? torch::zeros_like(rr0) : rr0;
  const Tensor uc = c - rc, ur = r - rr;
  const Tensor sc = dpo_score(uc, o), sr = dpo_score(ur, o);
  const double b = o.beta, e = o.label_smoothing;
  const Tensor z = b * (sc - sr);
  const auto smoothed = [&](const Tensor& x) { return -(1 - e) * logsig(x) - e * logsig(-x); };
  const auto by_example = [](const Tensor& per_sorted, const Tensor& key) {
    const Tensor order = std::get<1>(at::sort(key.detach(), /*stable=*/true, 0, false));
    return per_sorted.index_select(0, torch::argsort(order));
  };
  switch (o.variant) {
    case pl::DpoVariant::sigmoid:
      return smoothed(z);
    case pl::DpoVariant::robust:
      return (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e);
    case pl::DpoVariant::hinge:
      return torch::relu(1 - z);
    case pl::DpoVariant::exo_pair:
      return torch::sigmoid(z) * (logsig(z) - std::log1p(-e)) + torch::sigmoid(-z) * (logsig(-z) - std::log(e));
    case pl::DpoVariant::nca_pair:
      return -logsig(b * sc) - 0.5 * logsig(-b * sc) - 0.5 * logsig(-b * sr);
    case pl::DpoVariant::bco_pair:
      return -logsig(b * sc - o.bco_delta) - logsig(-(b * sr - o.bco_delta));
    case pl::DpoVariant::sppo_hard:
      return (sc - 0.5 / b).pow(2) + (sr + 0.5 / b).pow(2);
    case pl::DpoVariant::apo_zero:
      return (1 - torch::sigmoid(b * uc)) + torch::sigmoid(b * ur);
    case pl::DpoVariant::apo_down:
      return torch::sigmoid(b * uc) + (1 - torch::sigmoid(z));
    case pl::DpoVariant::discopop: {
      const Tensor m = torch::sigmoid(z / o.discopop_tau);
      return -logsig(z) * (1 - m) + torch::exp(-z) * m;
    }
    case pl::DpoVariant::aot: {
      const Tensor p = c - r;
      return by_example(
          smoothed(b * (std::get<0>(at::sort(p, true, 0, false)) - std::get<0>(at::sort(rc - rr, true, 0, false)))), p);
    }
    case pl::DpoVariant::aot_unpaired:
      return by_example(
          smoothed(b * (std::get<0>(at::sort(uc, true, 0, false)) - std::get<0>(at::sort(ur, true, 0, false)))), uc);
  }
  return {};
}

/// TRL ipo: (D - 1/(2 beta))^2.
inline Tensor ipo_losses(const Tensor& c, const Tensor& r, const Tensor& rc, const Tensor& rr,
                         const pl::IpoOptions& o) {
  const Tensor margin = o.reference_free ? c - r : (c - rc) - (r - rr);
  return (margin - 1 / (2 * o.beta)).pow(2);
}

/// CPO's simpo: z = beta (c - r) - gamma, smoothed logistic.
inline Tensor simpo_losses(const Tensor& c, const Tensor& r, const pl::SimpoOptions& o) {
  const Tensor z = o.beta * (c - r) - o.gamma;
  const double e = o.label_smoothing;
  return -(1 - e) * logsig(z) - e * logsig(-z);
}

/// ORPO: L = (c - r) - (log(1 - e^c) - log(1 - e^r)), loss -w c - beta logsig(L).
inline Tensor orpo_losses(const Tensor& c, const Tensor& r, const pl::OrpoOptions& o) {
  const Tensor L = (c - r) - (torch::log1p(-torch::exp(c)) - torch::log1p(-torch::exp(r)));
  return -o.nll_weight * c - o.beta * logsig(L);
}

/// RewardTrainer: -logsig(rc - rr - m) + k (rc + rr)^2.
inline Tensor bt_losses(const Tensor& c, const Tensor& r, const Tensor* m, double k) {
  const Tensor z = m ? c - r - *m : c - r;
  return -logsig(z) + k * (c + r).pow(2);
}

/// InstructGPT ranking: per row the mean over pairs a < b of the pairwise loss.
inline Tensor ranking_losses(const Tensor& s, double k) {
  const int64_t K = s.size(1);
  Tensor row = torch::zeros({s.size(0)}, s.options());
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = a + 1; b < K; ++b) row = row + bt_losses(s.select(1, a), s.select(1, b), nullptr, k);
  return row / (static_cast<double>(K * (K - 1)) / 2);
}

/// TRL kto_loss: z0 = clamp(mean(kl_p - kl_r), min=0).detach() (or the given point).
inline Tensor kto_losses(const Tensor& p, const Tensor& ref, const Tensor& desirable, const Tensor& klp,
                         const Tensor& klr, const pl::KtoOptions& o) {
  const Tensor z0 =
      o.reference_point ? torch::full({}, *o.reference_point, p.options()) : (klp - klr).mean().clamp_min(0).detach();
  const Tensor u = p - ref;
  const Tensor des = o.desirable_weight * (1 - torch::sigmoid(o.beta * (u - z0)));
  const Tensor und = o.undesirable_weight * (1 - torch::sigmoid(o.beta * (z0 - u)));
  return torch::where(desirable.to(torch::kBool), des, und);
}

/// Sum over the selected tokens of w x (where, not a product: masked-out tokens may be NaN).
inline Tensor mask_w(const Tensor& mask, const Tensor& like) { return mask.to(like.scalar_type()); }
inline Tensor ref_masked_sum(const Tensor& x, const Tensor& mask) {
  const Tensor w = mask_w(mask, x);
  return torch::where(w != 0, x * w, torch::zeros_like(x)).sum(1);
}
inline Tensor ref_masked_mean(const Tensor& x, const Tensor& mask) {
  const Tensor w = mask_w(mask, x).sum(1);
  return torch::where(w != 0, ref_masked_sum(x, mask) / torch::where(w != 0, w, torch::ones_like(w)),
                      torch::zeros_like(w));
}

// ---- verl's token losses ------------------------------------------------------------------------

/// agg_loss's per-row contributions (their sum is the loss), the core's documented modes:
/// token-mean sum_t w l / sum w, seq-mean-token-sum S_i / B, seq-mean-token-mean S_i / (B W_i)
/// (0 for an empty row), seq-mean-token-sum-norm S_i / (B C) with C = tokens per row, token-sum S_i.
inline Tensor agg_rows(const Tensor& l, const Tensor& mask, pl::Aggregation a) {
  const Tensor w = mask_w(mask, l);
  const Tensor S = torch::where(w != 0, l * w, torch::zeros_like(l)).sum(1);
  const double B = static_cast<double>(l.size(0)), T = static_cast<double>(l.size(1));
  switch (a) {
    case pl::Aggregation::token_mean:
      return S / w.sum();
    case pl::Aggregation::seq_mean_token_sum:
      return S / B;
    case pl::Aggregation::seq_mean_token_mean: {
      const Tensor W = w.sum(1);
      return torch::where(W != 0, S / (B * torch::where(W != 0, W, torch::ones_like(W))), torch::zeros_like(S));
    }
    case pl::Aggregation::seq_mean_token_sum_norm:
      return S / (B * T);
    case pl::Aggregation::token_sum:  // verl's token-sum: sum_i S_i
      return S;
  }
  return {};
}

/// verl kl_penalty (its "+" estimators straight-through, as verl writes them).
inline Tensor kl_penalty(const Tensor& logp, const Tensor& ref, pl::KlEstimator k) {
  const auto straight_through = [&](pl::KlEstimator base) {
    const Tensor forward = kl_penalty(logp, ref, base);
    const Tensor backward = 0.5 * (logp - ref).pow(2);
    return backward - backward.detach() + forward.detach();
  };
  switch (k) {
    case pl::KlEstimator::k1:
      return logp - ref;
    case pl::KlEstimator::k2:
      return 0.5 * (logp - ref).pow(2);
    case pl::KlEstimator::k3: {
      const Tensor kl = (ref - logp).clamp(-20, 20);
      return (torch::exp(kl) - kl - 1).clamp(-10, 10);
    }
    case pl::KlEstimator::abs:
      return (logp - ref).abs();
    case pl::KlEstimator::k1_plus:
      return straight_through(pl::KlEstimator::k1);
    case pl::KlEstimator::abs_plus:
      return straight_through(pl::KlEstimator::abs);
    case pl::KlEstimator::k3_plus:
      return straight_through(pl::KlEstimator::k3);
  }
  return {};
}

/// verl compute_policy_loss_vanilla's per-token pg_losses (dual clip only when c > 1), plus the
/// KL penalty kl_coef * kl_penalty when ref is given.
inline Tensor ppo_token_losses(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor* ref,
                               const pl::PpoOptions& o) {
  const Tensor neg_kl = (logp - old).clamp(-20.0, 20.0);
  const Tensor ratio = torch::exp(neg_kl);
  const Tensor l1 = -adv * ratio;
  const Tensor l2 = -adv * ratio.clamp(1 - o.clip_low, 1 + o.clip_high);
  const Tensor c1 = torch::maximum(l1, l2);
  Tensor l = c1;
  if (o.dual_clip > 1) {
    const Tensor l3 = -adv * o.dual_clip;
    l = torch::where(adv < 0, torch::minimum(l3, c1), c1);
  }
  if (ref && o.kl_coef != 0) l = l + o.kl_coef * kl_penalty(logp, *ref, o.kl_estimator);
  return l;
}

/// verl compute_value_loss's per-token 0.5 * max((v - R)^2, (clip_by_value(v) - R)^2).
inline Tensor value_token_losses(const Tensor& v, const Tensor& old, const Tensor& ret,
                                 const std::optional<double>& clip) {
  const Tensor l1 = (v - ret).pow(2);
  if (!clip) return 0.5 * l1;
  const Tensor vc = torch::max(torch::min(v, old + *clip), old - *clip);
  return 0.5 * torch::max(l1, (vc - ret).pow(2));
}

// ---- verl's other token policy losses (compute_policy_loss_cispo / _sapo / _gpg / _geo_mean /
// _clip_cov / _kl_cov, verl/trainer/ppo/core_algos.py), per token unless said ----------------------

/// logp - old_logp clamped to [-c, c] (verl's +-20) when c is set.
inline Tensor clamped_log_ratio(const Tensor& logp, const Tensor& old, const std::optional<double>& c) {
  const Tensor d = logp - old;
  return c ? d.clamp(-*c, *c) : d;
}

/// compute_policy_loss_cispo: -sg(clamp(ratio, 1 - lo, 1 + hi)) A logp.
inline Tensor cispo_token_losses(const Tensor& logp, const Tensor& old, const Tensor& adv, const pl::CispoOptions& o) {
  const Tensor ratio = torch::exp(clamped_log_ratio(logp, old, o.log_ratio_clamp));
  const Tensor w = ratio.clamp(1 - o.clip_low, 1 + o.clip_high).detach();
  return -w * adv * logp;
}

/// compute_policy_loss_sapo: -sigmoid(tau (ratio - 1)) (4 / tau) A, tau = tau_pos where A > 0.
inline Tensor sapo_token_losses(const Tensor& logp, const Tensor& old, const Tensor& adv, const pl::SapoOptions& o) {
  const Tensor ratio = torch::exp(clamped_log_ratio(logp, old, o.log_ratio_clamp));
  const Tensor tau = torch::where(adv > 0, torch::full_like(adv, o.tau_pos), torch::full_like(adv, o.tau_neg));
  return -torch::sigmoid(tau * (ratio - 1)) * (4 / tau) * adv;
}

/// compute_policy_loss_gpg: -logp A.
inline Tensor gpg_token_losses(const Tensor& logp, const Tensor& adv) { return -logp * adv; }

/// compute_policy_loss_geo_mean's per-row terms -Abar_i rho_i / B (their sum is the loss), with
/// the mask's weights where verl multiplies by response_mask (and where(), so that masked-out
/// tokens never enter); B = sequence_count when given.
inline Tensor gmpo_rows(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor& mask,
                        const pl::GmpoOptions& o) {
  const Tensor w = mask_w(mask, logp);
  const Tensor d = logp - old;
  const Tensor sgn = torch::sign(adv);
  const Tensor u = sgn * torch::min(sgn * d, sgn * d.clamp(-o.clip_low, o.clip_high));
  const Tensor W = w.sum(1);
  const Tensor z = torch::zeros_like(d);
  const Tensor rho = torch::exp(torch::where(w != 0, u * w, z).sum(1) / (W + 1e-8));
  const Tensor abar = torch::where(w != 0, adv * w, z).sum(1) / (W + 1e-8);
  const double B = o.sequence_count ? *o.sequence_count : static_cast<double>(logp.size(0));
  return -abar * rho / B;
}

/// compute_policy_loss_clip_cov's pg_losses with corr = 1 - selected: no log-ratio clamp.
inline Tensor clip_cov_token_losses(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor& selected,
                                    const pl::ClipCovOptions& o) {
  const Tensor ratio = torch::exp(logp - old);
  const Tensor l1 = -adv * ratio;
  const Tensor l2 = -adv * ratio.clamp(1 - o.clip_low, 1 + o.clip_high);
  return torch::maximum(l1, l2) * (1 - selected);
}

/// compute_policy_loss_kl_cov's pg_losses: -A ratio, plus ppo_kl_coef |logp - old| at the
/// selected tokens.
inline Tensor kl_cov_token_losses(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor& selected,
                                  const pl::KlCovOptions& o) {
  const Tensor d = logp - old;
  const Tensor l1 = -adv * torch::exp(d);
  return torch::where(selected != 0, l1 + o.kl_coef * d.abs(), l1);
}

/// The cov of both selections, (A - mean A) (logp - mean logp) over the valid tokens, in float64:
/// weighted means for clip_cov (verl masked_mean), plain means for kl_cov (verl's .mean() of the
/// gathered valid tokens).
inline Tensor cov_all(const Tensor& logp, const Tensor& adv, const Tensor& mask, bool weighted) {
  const Tensor lp = logp.detach().to(torch::kDouble), a = adv.detach().to(torch::kDouble);
  const Tensor valid = mask != 0;
  const Tensor w = weighted ? mask.to(torch::kDouble) : valid.to(torch::kDouble);
  const Tensor z = torch::zeros_like(lp);
  const Tensor sw = w.sum();
  const Tensor ma = torch::where(valid, a * w, z).sum() / sw, ml = torch::where(valid, lp * w, z).sum() / sw;
  return (a - ma) * (lp - ml);
}

/// verl compute_rollout_correction_weights (verl/trainer/ppo/rollout_corr_helper.py) with
/// log_ratio = old_logp - rollout_logp and a 0/1 mask, no rejection sampling or batch
/// normalization: token level exp(clamp(d, +-20)), sequence level exp(clamp(masked_sum(d), +-20))
/// broadcast, times the mask; truncate: clamp(max = upper); mask (IcePop): 0 outside [lower, upper].
inline Tensor rollout_is_ref(const Tensor& old, const Tensor& rollout, const Tensor& mask,
                             const pl::RolloutIsOptions& o) {
  const Tensor d = old.to(torch::kDouble) - rollout.to(torch::kDouble);
  const Tensor m = mask.to(torch::kDouble);
  Tensor raw;
  if (o.level == pl::RolloutIsLevel::sequence) {
    const Tensor sum = torch::where(m != 0, d * m, torch::zeros_like(d)).sum(1, true);
    raw = torch::exp(sum.clamp(-20, 20)).expand_as(d) * m;
  } else {
    raw = torch::exp(d.clamp(-20, 20)) * m;
  }
  if (o.bound == pl::RolloutIsBound::truncate) return raw.clamp_max(o.upper);
  return torch::where((raw >= o.lower) & (raw <= o.upper), raw, torch::zeros_like(raw));
}

/// log_softmax(z / tau).gather(labels) and the entropy -sum p log p, both 0 at masked-out tokens.
struct RefLogprobs {
  Tensor logp, entropy;
};
inline RefLogprobs ref_logprobs(const Tensor& z, const Tensor& labels, const Tensor& mask, double tau) {
  const Tensor ls = torch::log_softmax(z / tau, -1);
  const Tensor sel = mask.to(torch::kBool);
  const Tensor lab = torch::where(sel, labels.to(torch::kLong), torch::zeros_like(labels, torch::kLong));
  const Tensor lp = ls.gather(-1, lab.unsqueeze(-1)).squeeze(-1);
  const Tensor h = -(ls.exp() * ls).sum(-1);
  return {torch::where(sel, lp, torch::zeros_like(lp)), torch::where(sel, h, torch::zeros_like(h))};
}

}  // namespace tref
