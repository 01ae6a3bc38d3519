// Shared by the pairwise-family tests (DPO, Bradley-Terry, ranking, IPO, SimPO, ORPO, NLL):
// long-double closed forms written straight from the formulas in the loss headers' Doxygen and the README (no prefloss
// code), random token data, and a central finite-difference checker.
#pragma once

#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace pref {

namespace pl = prefloss;
using ld = long double;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

// ---- closed forms in long double -----------------------------------------------------------

inline ld logsig(ld x) { return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x)); }
inline ld sig(ld x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); }
inline ld log1mexp(ld x) { return std::log(-std::expm1(x)); }

/// Per-example loss and its partial derivatives with respect to the two policy values.
struct Ref {
  ld loss, dc, dr;
};

enum class Dpo { sigmoid, robust, hinge };

/// DPO family on the margin D (already u_c - u_r).
inline Ref ref_dpo(Dpo v, ld D, ld b, ld e) {
  const ld z = b * D;
  ld loss = 0, dD = 0;
  switch (v) {
    case Dpo::sigmoid:
      loss = -(1 - e) * logsig(z) - e * logsig(-z);
      dD = b * (-(1 - e) * sig(-z) + e * sig(z));
      break;
    case Dpo::robust:
      loss = (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e);
      dD = b * (-(1 - e) * sig(-z) - e * sig(z)) / (1 - 2 * e);
      break;
    case Dpo::hinge:
      loss = std::max<ld>(0, 1 - z);
      dD = 1 - z > 0 ? -b : 0;
      break;
  }
  return {loss, dD, -dD};
}

/// The DPO variants of TRL's loss_type names that read u_c and u_r themselves (reverse_kl scores),
/// straight from their formulas; dc, dr are d loss / d u_c, d u_r. d = bco's shift, tau DiscoPOP's.
enum class DpoMore { exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop };
inline Ref ref_dpo_more(DpoMore v, ld uc, ld ur, ld b, ld e, ld d = 0, ld tau = 0.05L) {
  const ld z = b * (uc - ur);
  const auto dsig = [](ld x) { return sig(x) * sig(-x); };
  switch (v) {
    case DpoMore::exo_pair: {
      // KL((q, 1-q) || (1-e, e)) with q = sig(z); dL/dq = log(q / (1-q)) - log((1-e) / e) = z - log((1-e)/e).
      const ld loss = sig(z) * (logsig(z) - std::log1p(-e)) + sig(-z) * (logsig(-z) - std::log(e));
      const ld dz = dsig(z) * (z - std::log((1 - e) / e));
      return {loss, b * dz, -b * dz};
    }
    case DpoMore::nca_pair:
      return {-logsig(b * uc) - logsig(-b * uc) / 2 - logsig(-b * ur) / 2, b * (-sig(-b * uc) + sig(b * uc) / 2),
              b * sig(b * ur) / 2};
    case DpoMore::bco_pair:
      return {-logsig(b * uc - d) - logsig(-(b * ur - d)), -b * sig(-(b * uc - d)), b * sig(b * ur - d)};
    case DpoMore::sppo_hard: {
      const ld hc = uc - 1 / (2 * b), hr = ur + 1 / (2 * b);
      return {hc * hc + hr * hr, 2 * hc, 2 * hr};
    }
    case DpoMore::apo_zero:
      return {sig(-b * uc) + sig(b * ur), -b * dsig(b * uc), b * dsig(b * ur)};
    case DpoMore::apo_down:
      return {sig(b * uc) + sig(-z), b * dsig(b * uc) - b * dsig(z), b * dsig(z)};
    case DpoMore::discopop: {
      // L = -logsig(z) (1 - m) + exp(-z) m, m = sig(z / tau); exp(-z) m taken through logs.
      const ld m = sig(z / tau), dm = dsig(z / tau) / tau;
      const ld em = std::exp(-z + logsig(z / tau));
      const ld dz = -sig(-z) * (1 - m) + logsig(z) * dm - em + std::exp(-z) * dm;
      const ld dz_safe = std::isfinite(dz) ? dz : -sig(-z) * (1 - m) + logsig(z) * dm - em + em * (1 - m) / tau;
      return {-logsig(z) * (1 - m) + em, b * dz_safe, -b * dz_safe};
    }
  }
  return {0, 0, 0};
}

inline Ref ref_ipo(ld D, ld b) {
  const ld h = D - 1 / (2 * b);
  return {h * h, 2 * h, -2 * h};
}

inline Ref ref_simpo(ld sc, ld sr, ld b, ld g, ld e) {
  const ld z = b * (sc - sr) - g;
  const ld dz = -(1 - e) * sig(-z) + e * sig(z);
  return {-(1 - e) * logsig(z) - e * logsig(-z), b * dz, -b * dz};
}

/// ORPO: -w s_c - b logsig(L), L = (s_c - s_r) - (log1mexp(s_c) - log1mexp(s_r)); naive chain rule.
inline Ref ref_orpo(ld sc, ld sr, ld b, ld w = 1) {
  const ld L = (sc - sr) - (log1mexp(sc) - log1mexp(sr));
  // 1 - exp(s) written as -expm1(s): the same number, without long double cancellation near 0.
  return {-w * sc - b * logsig(L), -w - b * sig(-L) / -std::expm1(sc), b * sig(-L) / -std::expm1(sr)};
}

inline ld ref_orpo_log_odds(ld sc, ld sr) { return (sc - sr) - (log1mexp(sc) - log1mexp(sr)); }

inline Ref ref_bt(ld rc, ld rr, ld m, ld k) {
  const ld z = rc - rr - m, c = rc + rr;
  return {-logsig(z) + k * c * c, -sig(-z) + 2 * k * c, sig(-z) + 2 * k * c};
}

/// Masked sum / mean of row i in long double, straight from the definition.
template <class S, class M>
ld ref_seq(const Tok<S>& x, const Tok<M>& m, long i, bool mean) {
  ld s = 0, w = 0;
  for (long t = 0; t < x.dimension(1); ++t)
    if (m(i, t) != M(0)) {
      s += static_cast<ld>(m(i, t)) * static_cast<ld>(x(i, t));
      w += static_cast<ld>(m(i, t));
    }
  return mean ? (w != 0 ? s / w : 0) : s;
}

/// d value_i / d x[i, t]: the token weight (over the row weight for a mean), 0 if masked out.
template <class M>
ld ref_dseq(const Tok<M>& m, long i, long t, bool mean) {
  if (m(i, t) == M(0)) return 0;
  ld w = 0;
  for (long k = 0; k < m.dimension(1); ++k)
    if (m(i, k) != M(0)) w += static_cast<ld>(m(i, k));
  return mean ? static_cast<ld>(m(i, t)) / w : static_cast<ld>(m(i, t));
}

// ---- data ------------------------------------------------------------------------------------

/// Random mask: about `keep` of the tokens selected, at least one per row unless allow_empty;
/// float/double masks get weights in [0.25, 2].
template <class M>
Tok<M> random_mask(long B, long T, std::mt19937& rng, double keep = 0.7, bool allow_empty = false) {
  std::bernoulli_distribution sel(keep);
  std::uniform_real_distribution<double> wt(0.25, 2.0);
  Tok<M> m(B, T);
  for (long i = 0; i < B; ++i) {
    bool any = false;
    for (long t = 0; t < T; ++t) {
      const bool k = sel(rng) || (!allow_empty && !any && t == T - 1);
      any = any || k;
      if constexpr (std::is_floating_point_v<M>) {
        m(i, t) = k ? static_cast<M>(wt(rng)) : M(0);
      } else {
        m(i, t) = static_cast<M>(k);
      }
    }
  }
  return m;
}

template <class S>
Tok<S> random_tokens(long B, long T, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  Tok<S> x(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) x(i, t) = static_cast<S>(d(rng));
  return x;
}

template <class S>
Vec<S> random_vec(long B, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  Vec<S> v(B);
  for (long i = 0; i < B; ++i) v(i) = static_cast<S>(d(rng));
  return v;
}

/// Writes inf / NaN into every masked-out token (what padding often holds).
template <class S, class M>
void poison_padding(Tok<S>& x, const Tok<M>& m) {
  for (long i = 0; i < x.dimension(0); ++i)
    for (long t = 0; t < x.dimension(1); ++t)
      if (m(i, t) == M(0))
        x(i, t) = (i + t) % 3 == 0   ? std::numeric_limits<S>::quiet_NaN()
                  : (i + t) % 3 == 1 ? -std::numeric_limits<S>::infinity()
                                     : std::numeric_limits<S>::infinity();
}

// ---- central finite differences --------------------------------------------------------------

/// One differentiable input: its values (perturbed in place) and the analytic gradient.
struct Leaf {
  double* x;
  const double* g;
  long n;
};

/// Tolerance of the FD check: |g - fd| <= kFdTol * max(1, |g|).
inline constexpr double kFdTol = 1e-7;

/// Worst FD error over the inputs of a double loss; CHECKs each element. `loss()` re-evaluates
/// the loss from the current input values.
template <class F>
double fd_check(std::initializer_list<Leaf> leaves, F&& loss) {
  double worst = 0;
  for (const Leaf& leaf : leaves) {
    for (long k = 0; k < leaf.n; ++k) {
      const double x = leaf.x[k];
      const double h = 1e-6 * std::max(1.0, std::fabs(x));
      const volatile double xp = x + h, xm = x - h;  // the step actually taken
      leaf.x[k] = xp;
      const double lp = loss();
      leaf.x[k] = xm;
      const double lm = loss();
      leaf.x[k] = x;
      const double fd = (lp - lm) / (xp - xm);
      const double err = std::fabs(leaf.g[k] - fd) / std::max(1.0, std::fabs(leaf.g[k]));
      INFO("element " << k << ": analytic " << leaf.g[k] << ", finite difference " << fd);
      CHECK(err <= kFdTol);
      worst = std::max(worst, err);
    }
  }
  return worst;
}

/// Records the worst FD error seen per loss name and prints the table at exit.
struct FdReport {
  std::vector<std::pair<std::string, double>> rows;
  void add(const std::string& name, double err) {
    for (auto& r : rows)
      if (r.first == name) {
        r.second = std::max(r.second, err);
        return;
      }
    rows.emplace_back(name, err);
  }
  ~FdReport() {
    for (const auto& r : rows) std::printf("max FD error %-36s %.3g\n", r.first.c_str(), r.second);
  }
};
inline FdReport& fd_report() {
  static FdReport r;
  return r;
}

// ---- closed-form checks -------------------------------------------------------------------

template <bool Mean, class X, class Mk>
auto seq(const X& x, const Mk& m) {
  if constexpr (Mean) {
    return pl::masked_mean(x, m);
  } else {
    return pl::masked_sum(x, m);
  }
}

/// Relative tolerance: a few roundings of the result type (float outputs are rounded from
/// double work: 0.5 ulp each for the stored value gradient, the per-row scale and the weight
/// product) and, for double, a few dozen ulps of transcendental composition.
template <class S>
constexpr ld rel_tol() {
  return std::is_same_v<S, float> ? 4 * static_cast<ld>(FLT_EPSILON) : 64 * static_cast<ld>(DBL_EPSILON);
}

/// |got - want| <= tol * max(|want|, scale); scale covers quantities formed by cancellation,
/// whose error is relative to the terms, not to the difference. Values below the smallest normal
/// are compared absolutely.
template <class S>
bool close(S got, ld want, ld scale = 0) {
  const ld err = std::fabs(static_cast<ld>(got) - want);
  return err <= rel_tol<S>() * std::max(std::fabs(want), scale) + static_cast<ld>(std::numeric_limits<S>::min());
}

inline double want_of(ld want, ld = 0) { return static_cast<double>(want); }

/// CHECK_CLOSE(got, want[, scale]): CHECK(close(...)) reporting both values.
#define CHECK_CLOSE(got, ...)                                                                     \
  do {                                                                                            \
    INFO(#got << " = " << static_cast<double>(got) << ", want " << ::pref::want_of(__VA_ARGS__)); \
    CHECK(::pref::close(got, __VA_ARGS__));                                                       \
  } while (0)

/// Dyadic tokens k/64 in [lo, hi].
template <class S>
Tok<S> dyadic_tokens(long B, long T, std::mt19937& rng, double lo, double hi) {
  std::uniform_int_distribution<int> k(static_cast<int>(lo * 64), static_cast<int>(hi * 64));
  Tok<S> x(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) x(i, t) = static_cast<S>(k(rng) / 64.0);
  return x;
}

template <class S>
Vec<S> dyadic_vec(long B, std::mt19937& rng, double lo, double hi) {
  std::uniform_int_distribution<int> k(static_cast<int>(lo * 64), static_cast<int>(hi * 64));
  Vec<S> v(B);
  for (long i = 0; i < B; ++i) v(i) = static_cast<S>(k(rng) / 64.0);
  return v;
}

/// Mask with weights j/4, j in [1, 8] (or 1 for byte masks); `empty_row` >= 0 selects nothing there.
template <class M>
Tok<M> dyadic_mask(long B, long T, std::mt19937& rng, long empty_row = -1) {
  std::bernoulli_distribution sel(0.7);
  std::uniform_int_distribution<int> j(1, 8);
  Tok<M> m(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool k = i != empty_row && (sel(rng) || t == 0);
      if constexpr (std::is_floating_point_v<M>) {
        m(i, t) = k ? static_cast<M>(j(rng) / 4.0) : M(0);
      } else {
        m(i, t) = static_cast<M>(k);
      }
    }
  return m;
}

/// The sequence values of a checked case, for the metric checks.
struct Seqs {
  std::vector<ld> c, r;
};

/// Checks a pair loss on token expressions against ref(i, s_c, s_r) -> Ref: per-example losses,
/// the batch mean, the value gradients and the token gradients (0 at masked-out tokens). Calls
/// metrics(result.metrics, seqs) for the loss's own metric checks.
template <bool Mean, class S, class M, class F, class RefF, class MetricsF>
void check_pair(F&& f, RefF&& ref, MetricsF&& metrics, const Tok<S>& xc, const Tok<M>& mc, const Tok<S>& xr,
                const Tok<M>& mr) {
  const long B = xc.dimension(0), T = xc.dimension(1);
  const auto res = f(seq<Mean>(xc, mc), seq<Mean>(xr, mr));
  Seqs s;
  std::vector<Ref> e;
  ld total = 0;
  for (long i = 0; i < B; ++i) {
    s.c.push_back(ref_seq(xc, mc, i, Mean));
    s.r.push_back(ref_seq(xr, mr, i, Mean));
    e.push_back(ref(i, s.c.back(), s.r.back()));
    INFO("example " << i);
    CHECK_CLOSE(res.losses(i), e.back().loss);
    CHECK_CLOSE(res.grad_chosen_value()(i), e.back().dc / B);
    CHECK_CLOSE(res.grad_rejected_value()(i), e.back().dr / B);
    total += e.back().loss;
  }
  CHECK_CLOSE(res.loss, total / B);
  Tok<S> gc(B, T), gr(B, T);
  gc.setConstant(S(99));
  gr.setConstant(S(99));
  res.backward(gc, gr);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      INFO("token " << i << ", " << t);
      CHECK_CLOSE(gc(i, t), e[static_cast<std::size_t>(i)].dc / B * ref_dseq(mc, i, t, Mean));
      CHECK_CLOSE(gr(i, t), e[static_cast<std::size_t>(i)].dr / B * ref_dseq(mr, i, t, Mean));
    }
  metrics(res.metrics, s);
}

/// Same on plain [batch] tensors.
template <class S, class F, class RefF, class MetricsF>
void check_pair_plain(F&& f, RefF&& ref, MetricsF&& metrics, const Vec<S>& c, const Vec<S>& r) {
  const long B = c.dimension(0);
  const auto res = f(c, r);
  Seqs s;
  ld total = 0;
  Vec<S> gc(B), gr(B);
  res.backward(gc, gr);
  for (long i = 0; i < B; ++i) {
    s.c.push_back(c(i));
    s.r.push_back(r(i));
    const Ref e = ref(i, s.c.back(), s.r.back());
    INFO("example " << i);
    CHECK_CLOSE(res.losses(i), e.loss);
    CHECK_CLOSE(gc(i), e.dc / B);
    CHECK_CLOSE(gr(i), e.dr / B);
    total += e.loss;
  }
  CHECK_CLOSE(res.loss, total / B);
  metrics(res.metrics, s);
}

/// TRL's reward metrics from per-example rewards.
template <class Metrics>
void check_rewards(const Metrics& m, const std::vector<ld>& wc, const std::vector<ld>& wr) {
  const ld n = static_cast<ld>(wc.size());
  ld c = 0, r = 0, abs = 0, acc = 0;
  for (std::size_t i = 0; i < wc.size(); ++i) {
    c += wc[i];
    r += wr[i];
    abs += std::fabs(wc[i]) + std::fabs(wr[i]);
    acc += wc[i] > wr[i] ? 1 : 0;
  }
  CHECK_CLOSE(m.reward_chosen, c / n, abs / n);
  CHECK_CLOSE(m.reward_rejected, r / n, abs / n);
  CHECK_CLOSE(m.reward_margin, (c - r) / n, abs / n);
  CHECK_CLOSE(m.reward_accuracy, acc / n);
}

}  // namespace pref
