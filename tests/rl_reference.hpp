// Independent long-double reference implementations of verl's token-level RL formulas (policy
// loss, value loss, KL penalty, agg_loss), written as plain loops straight from the formulas —
// no prefloss code — plus the random-data and error-checking helpers shared by test_ppo.cpp and
// test_value_rl.cpp.
#pragma once

#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace rlref {

namespace pl = prefloss;
using ld = long double;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

/// Token data in long double: row-major [B, T]; sel = mask != 0, w = the weight (1 for byte masks).
struct Data {
  long B = 0, T = 0;
  std::vector<ld> x0, x1, x2, x3;  // ppo: logp, old, adv, ref; value: v, v_old, returns
  std::vector<ld> w;
  std::vector<bool> sel;
  bool has_x3 = false;
  std::size_t at(long i, long t) const { return static_cast<std::size_t>(i * T + t); }
};

template <class S, class M>
Data to_data(const Tok<S>& a, const Tok<S>& b, const Tok<S>& c, const Tok<M>& m, const Tok<S>* d) {
  Data r;
  r.B = a.dimension(0);
  r.T = a.dimension(1);
  const std::size_t n = static_cast<std::size_t>(r.B * r.T);
  r.x0.resize(n);
  r.x1.resize(n);
  r.x2.resize(n);
  r.x3.assign(n, 0);
  r.w.resize(n);
  r.sel.resize(n);
  r.has_x3 = d != nullptr;
  for (long i = 0; i < r.B; ++i)
    for (long t = 0; t < r.T; ++t) {
      const std::size_t k = r.at(i, t);
      r.x0[k] = a(i, t);
      r.x1[k] = b(i, t);
      r.x2[k] = c(i, t);
      if (d) r.x3[k] = (*d)(i, t);
      r.sel[k] = m(i, t) != M(0);
      r.w[k] = r.sel[k] ? static_cast<ld>(m(i, t)) : 0;
    }
  return r;
}

/// verl's agg_loss over weighted token losses, with prefloss's documented definitions (reduce/aggregation.hpp): empty
/// rows give 0 and still count; seq_mean_token_sum_norm divides by B * C. Returns the loss and fills the per-row
/// contributions.
inline ld aggregate(const Data& d, const std::vector<ld>& l, pl::Aggregation mode, std::optional<double> token_count,
                    std::optional<double> sequence_count, std::optional<double> norm, std::vector<ld>* rows = nullptr) {
  std::vector<ld> S(static_cast<std::size_t>(d.B), 0), W(static_cast<std::size_t>(d.B), 0);
  ld total_w = 0;
  for (long i = 0; i < d.B; ++i)
    for (long t = 0; t < d.T; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) continue;
      S[static_cast<std::size_t>(i)] += d.w[k] * l[k];
      W[static_cast<std::size_t>(i)] += d.w[k];
      total_w += d.w[k];
    }
  const ld nseq = sequence_count ? static_cast<ld>(*sequence_count) : static_cast<ld>(d.B);
  ld loss = 0;
  if (rows) rows->assign(static_cast<std::size_t>(d.B), 0);
  for (long i = 0; i < d.B; ++i) {
    const std::size_t u = static_cast<std::size_t>(i);
    ld c = 0;
    switch (mode) {
      case pl::Aggregation::token_mean: {
        const ld n = token_count ? static_cast<ld>(*token_count) : total_w;
        c = n != 0 ? S[u] / n : 0;
        break;
      }
      case pl::Aggregation::seq_mean_token_sum:
        c = S[u] / nseq;
        break;
      case pl::Aggregation::seq_mean_token_mean:
        c = W[u] != 0 ? S[u] / W[u] / nseq : 0;
        break;
      case pl::Aggregation::seq_mean_token_sum_norm:
        c = S[u] / (nseq * (norm ? static_cast<ld>(*norm) : static_cast<ld>(d.T)));
        break;
      case pl::Aggregation::token_sum:
        c = S[u];
        break;
    }
    if (rows) (*rows)[u] = c;
    loss += c;
  }
  return loss;
}

inline ld clampl(ld x, ld lo, ld hi) { return std::min(std::max(x, lo), hi); }

/// verl's kl_penalty_forward for one token: a "+" estimator's value is its base's (the forward
/// score), only its gradient differs (kl_grad_ref).
inline ld kl_ref(ld logp, ld ref, pl::KlEstimator k, std::optional<double> x_clamp, std::optional<double> v_clamp) {
  switch (k) {
    case pl::KlEstimator::k1:
    case pl::KlEstimator::k1_plus:
      return logp - ref;
    case pl::KlEstimator::k2:
      return 0.5L * (logp - ref) * (logp - ref);
    case pl::KlEstimator::abs:
    case pl::KlEstimator::abs_plus:
      return std::fabs(logp - ref);
    case pl::KlEstimator::k3:
    case pl::KlEstimator::k3_plus:
    default: {
      ld x = ref - logp;
      if (x_clamp) x = clampl(x, -*x_clamp, *x_clamp);
      ld kld = std::exp(x) - x - 1;
      if (v_clamp) kld = clampl(kld, -*v_clamp, *v_clamp);
      return kld;
    }
  }
}

/// d kl_penalty / d logp for one token in closed form, as torch autograd takes it: torch.clamp
/// passes the gradient on [lo, hi] inclusive, torch.abs's is sign(d) (0 at 0), and a "+"
/// estimator's is k2's, logp - ref (verl detaches its clamped forward score).
inline ld kl_grad_ref(ld logp, ld ref, pl::KlEstimator k, std::optional<double> x_clamp,
                      std::optional<double> v_clamp) {
  const ld d = logp - ref;
  switch (k) {
    case pl::KlEstimator::k1:
      return 1;
    case pl::KlEstimator::k2:
    case pl::KlEstimator::k1_plus:
    case pl::KlEstimator::abs_plus:
    case pl::KlEstimator::k3_plus:
      return d;
    case pl::KlEstimator::abs:
      return d > 0 ? 1 : d < 0 ? -1 : 0;
    case pl::KlEstimator::k3:
    default: {
      const ld x = -d;
      if (x_clamp && std::fabs(x) > *x_clamp) return 0;
      const ld kld = std::exp(x) - x - 1;
      if (v_clamp && std::fabs(kld) > *v_clamp) return 0;
      return 1 - std::exp(x);
    }
  }
}

/// Every KlEstimator in declaration order, and verl's kl_penalty name of each.
inline constexpr pl::KlEstimator kl_estimators[] = {
    pl::KlEstimator::k1,      pl::KlEstimator::k2,       pl::KlEstimator::k3,     pl::KlEstimator::abs,
    pl::KlEstimator::k1_plus, pl::KlEstimator::abs_plus, pl::KlEstimator::k3_plus};
inline const char* kl_name(pl::KlEstimator k) {
  switch (k) {
    case pl::KlEstimator::k1:
      return "k1";
    case pl::KlEstimator::k2:
      return "k2";
    case pl::KlEstimator::k3:
      return "k3";
    case pl::KlEstimator::abs:
      return "abs";
    case pl::KlEstimator::k1_plus:
      return "k1+";
    case pl::KlEstimator::abs_plus:
      return "abs+";
    case pl::KlEstimator::k3_plus:
      return "k3+";
  }
  return "?";
}

struct PpoRef {
  ld loss = 0;
  std::vector<ld> rows, tokens;  // per-row contributions, per-token losses
  ld clip = 0, clip_low = 0, approx_kl = 0, ratio_mean = 0, ratio_max = 0, kl_mean = 0, weight = 0;
};

/// verl compute_policy_loss_vanilla (+ kl_coef * kl_penalty) token by token, then agg_loss; with
/// importance_level sequence every token of a row takes the row's mean log-ratio
/// sum w (logp - old) / max(W, 1) (GSPO as TRL writes it: a function of every token of the row,
/// so finite differences of this loss see the gradient through the mean), with delta TRL's
/// -A min(r, delta) as the first branch.
inline PpoRef ppo_ref(const Data& d, const pl::PpoOptions& o) {
  std::vector<ld> l(d.x0.size(), 0);
  PpoRef r;
  ld cl = 0, cll = 0, akl = 0, rs = 0, klm = 0;
  r.ratio_max = -std::numeric_limits<ld>::infinity();
  std::vector<ld> row_log_ratio(static_cast<std::size_t>(d.B), 0);
  if (o.importance_level == pl::ImportanceLevel::sequence)
    for (long i = 0; i < d.B; ++i) {
      ld sum = 0, w = 0;
      for (long t = 0; t < d.T; ++t) {
        const std::size_t k = d.at(i, t);
        if (!d.sel[k]) continue;
        sum += d.w[k] * (d.x0[k] - d.x1[k]);
        w += d.w[k];
      }
      row_log_ratio[static_cast<std::size_t>(i)] = sum / std::max(w, 1.0L);
    }
  for (std::size_t k = 0; k < l.size(); ++k) {
    if (!d.sel[k]) continue;
    const ld A = d.x2[k];
    const ld token_log_ratio = d.x0[k] - d.x1[k];
    ld nak = o.importance_level == pl::ImportanceLevel::sequence ? row_log_ratio[k / static_cast<std::size_t>(d.T)]
                                                                 : token_log_ratio;
    if (o.log_ratio_clamp) nak = clampl(nak, -*o.log_ratio_clamp, *o.log_ratio_clamp);
    const ld ratio = std::exp(nak);
    const ld l1 = -A * (o.delta ? std::min(ratio, static_cast<ld>(*o.delta)) : ratio);
    const ld l2 = -A * clampl(ratio, 1 - static_cast<ld>(o.clip_low), 1 + static_cast<ld>(o.clip_high));
    const ld c1 = std::max(l1, l2);
    ld pg = c1;
    bool low = false;
    if (o.dual_clip > 1 && A < 0) {
      const ld l3 = -A * static_cast<ld>(o.dual_clip);
      pg = std::min(l3, c1);
      low = c1 > l3;
    }
    ld kl = 0;
    if (d.has_x3) kl = kl_ref(d.x0[k], d.x3[k], o.kl_estimator, o.k3_log_ratio_clamp, o.k3_clamp);
    if (o.bias_corrected_kl) kl *= ratio;  // TRL use_bias_correction_kl: per_token_kl * coef_1
    if (o.kl_coef != 0) pg += static_cast<ld>(o.kl_coef) * kl;
    l[k] = pg;
    const ld w = d.w[k];
    r.weight += w;
    cl += w * (l2 > l1 ? 1 : 0);
    cll += w * (low ? 1 : 0);
    akl += w * -(o.importance_level == pl::ImportanceLevel::sequence ? token_log_ratio : nak);
    rs += w * ratio;
    klm += w * kl;
    r.ratio_max = std::max(r.ratio_max, ratio);
  }
  r.loss = aggregate(d, l, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, &r.rows);
  r.tokens = l;
  const ld W = r.weight;
  r.clip = W != 0 ? cl / W : 0;
  r.clip_low = W != 0 ? cll / W : 0;
  r.approx_kl = W != 0 ? akl / W : 0;
  r.ratio_mean = W != 0 ? rs / W : 0;
  r.kl_mean = W != 0 && d.has_x3 ? klm / W : 0;
  if (W == 0) r.ratio_max = 0;
  return r;
}

struct ValueRef {
  ld loss = 0;
  std::vector<ld> rows, tokens;
  ld clip = 0, value_mean = 0, weight = 0;
};

/// verl compute_value_loss: 0.5 * agg_loss(max((v - R)^2, (clip_by_value(v, v_old -+ eps) - R)^2)).
inline ValueRef value_ref(const Data& d, const pl::ValueOptions& o) {
  std::vector<ld> l(d.x0.size(), 0);
  ValueRef r;
  ld cl = 0, vm = 0;
  for (std::size_t k = 0; k < l.size(); ++k) {
    if (!d.sel[k]) continue;
    const ld v = d.x0[k], R = d.x2[k];
    const ld l1 = (v - R) * (v - R);
    ld l2 = l1;
    if (o.clip) {
      const ld eps = static_cast<ld>(*o.clip);
      const ld vc = std::max(std::min(v, d.x1[k] + eps), d.x1[k] - eps);
      l2 = (vc - R) * (vc - R);
    }
    l[k] = 0.5L * std::max(l1, l2);
    r.weight += d.w[k];
    cl += d.w[k] * (l2 > l1 ? 1 : 0);
    vm += d.w[k] * v;
  }
  r.loss = aggregate(d, l, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, &r.rows);
  r.tokens = l;
  r.clip = r.weight != 0 ? cl / r.weight : 0;
  r.value_mean = r.weight != 0 ? vm / r.weight : 0;
  return r;
}

/// Fills a mask: byte masks select with probability p_keep; float masks hold weights in
/// [0.25, 2] (or 0 with probability 1 - p_keep).
template <class M>
M random_mask(std::mt19937& rng, double p_keep) {
  std::bernoulli_distribution keep(p_keep);
  std::uniform_real_distribution<double> wt(0.25, 2.0);
  const bool k = keep(rng);
  if constexpr (std::is_floating_point_v<M>) {
    return k ? static_cast<M>(wt(rng)) : M(0);
  } else {
    return static_cast<M>(k);
  }
}

/// Poison for masked-out entries: alternating NaN, -inf, +inf.
template <class S>
S poison(long k) {
  switch (k % 3) {
    case 0:
      return std::numeric_limits<S>::quiet_NaN();
    case 1:
      return -std::numeric_limits<S>::infinity();
    default:
      return std::numeric_limits<S>::infinity();
  }
}

/// Central finite differences (step 1e-6, in long double) of loss_of(d) with respect to d.x0
/// at every selected token, against the analytic gradient g. rel = max |g - fd| / max |fd|;
/// masked_zero: g is exactly 0 at every masked-out token.
struct FdResult {
  double rel;
  bool masked_zero;
};
template <class S, class F>
FdResult token_fd_error(Data& d, const Tok<S>& g, F&& loss_of) {
  const ld h = 1e-6L;
  double max_err = 0, max_g = 0;
  bool masked_zero = true;
  for (long i = 0; i < d.B; ++i)
    for (long t = 0; t < d.T; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) {
        masked_zero = masked_zero && g(i, t) == S(0);
        continue;
      }
      const ld x = d.x0[k];
      d.x0[k] = x + h;
      const ld fp = loss_of(d);
      d.x0[k] = x - h;
      const ld fm = loss_of(d);
      d.x0[k] = x;
      const double fd = static_cast<double>((fp - fm) / (2 * h));
      max_err = std::max(max_err, std::fabs(static_cast<double>(g(i, t)) - fd));
      max_g = std::max(max_g, std::fabs(fd));
    }
  return {max_g > 0 ? max_err / max_g : max_err, masked_zero};
}

}  // namespace rlref
