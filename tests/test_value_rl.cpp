// value_loss, kl_estimate, gae, masked_whiten and group_advantages against independent
// implementations of verl's formulas (long double loops), central finite differences, closed
// forms, padding with inf/NaN, and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using rlref::ld;
using rlref::Tok;

namespace {

const pl::Aggregation all_modes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                     pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                     pl::Aggregation::token_sum};

template <class S>
bool all_equal(const Tok<S>& t, S v) {
  for (long k = 0; k < t.size(); ++k)
    if (!(t.data()[k] == v)) return false;
  return true;
}

// ---- value_loss ------------------------------------------------------------------------------

template <class S, class M>
struct ValueCase {
  Tok<S> v, old, ret;
  Tok<M> mask;
};

/// Random critic data kept >= 1e-3 away from the kinks of the clipped loss (the clip bounds and
/// the switch between the two squared errors). Masked entries hold NaN/inf when poison is set.
template <class S, class M>
ValueCase<S, M> make_value(long B, long T, unsigned seed, std::optional<double> eps, bool poison = true,
                           std::vector<long> empty_rows = {}) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> base(0.0, 1.0), step(0.0, 0.3), err(0.0, 1.0);
  ValueCase<S, M> c{Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<M>(B, T)};
  long k = 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t, ++k) {
      M m = rlref::random_mask<M>(rng, 0.75);
      for (long e : empty_rows)
        if (e == i) m = M(0);
      c.mask(i, t) = m;
      double old, v, R;
      for (;;) {
        old = base(rng);
        v = old + step(rng);
        R = old + err(rng);
        if (!eps) break;
        const double vc = std::max(std::min(v, old + *eps), old - *eps);
        if (std::fabs(v - (old + *eps)) < 1e-3 || std::fabs(v - (old - *eps)) < 1e-3) continue;
        if (vc != v && std::fabs((v - R) * (v - R) - (vc - R) * (vc - R)) < 1e-3) continue;
        break;
      }
      c.v(i, t) = static_cast<S>(v);
      c.old(i, t) = static_cast<S>(old);
      c.ret(i, t) = static_cast<S>(R);
      if (m == M(0) && poison) {
        c.v(i, t) = rlref::poison<S>(k);
        c.old(i, t) = rlref::poison<S>(k + 1);
        c.ret(i, t) = rlref::poison<S>(k + 2);
      }
    }
  return c;
}

double g_value_fd_double = 0, g_value_fd_float = 0;

template <class S, class M>
void value_check(long B, long T, unsigned seed, pl::Aggregation a, std::optional<double> eps) {
  pl::ValueOptions o;
  o.clip = eps;
  o.aggregation = a;
  if (a == pl::Aggregation::seq_mean_token_sum_norm) o.token_sum_norm = 50.0;
  const auto c = make_value<S, M>(B, T, seed, eps, true, {1});
  CAPTURE(sizeof(S), sizeof(M), B, T, seed);
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-13;
  const auto r = pl::value_loss(c.v, c.old, c.ret, c.mask, o);
  rlref::Data d = rlref::to_data(c.v, c.old, c.ret, c.mask, static_cast<const Tok<S>*>(nullptr));
  const rlref::ValueRef e = rlref::value_ref(d, o);
  ld scale = 0;
  for (ld x : e.rows) scale += std::fabs(x);
  CHECK(std::fabs(static_cast<ld>(r.loss) - e.loss) <= tol * scale);
  for (long i = 0; i < B; ++i)
    CHECK(std::fabs(static_cast<ld>(r.losses(i)) - e.rows[static_cast<std::size_t>(i)]) <=
          tol * e.rows[static_cast<std::size_t>(i)]);
  CHECK(r.losses(1) == S(0));
  CHECK(std::fabs(static_cast<ld>(r.metrics.clip_fraction) - e.clip) <= tol);
  CHECK(std::fabs(static_cast<ld>(r.metrics.value_mean) - e.value_mean) <= tol * (1 + std::fabs(e.value_mean)));
  CHECK(std::fabs(static_cast<ld>(r.metrics.token_weight) - e.weight) <= tol * e.weight);

  Tok<S> g(B, T), gf(B, T);
  g.setConstant(S(3));
  gf.setConstant(S(3));
  r.backward(g);
  const auto rf = pl::value_loss(c.v, c.old, c.ret, c.mask, o, gf);
  CHECK(std::fabs(rf.loss - r.loss) <= 4 * std::numeric_limits<S>::epsilon() * std::fabs(r.loss));
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t)
      CHECK(std::fabs(gf(i, t) - g(i, t)) <= 4 * std::numeric_limits<S>::epsilon() * std::fabs(g(i, t)));
  const auto fd = rlref::token_fd_error(d, g, [&](const rlref::Data& x) { return rlref::value_ref(x, o).loss; });
  CHECK(fd.masked_zero);
  const double rel = fd.rel;
  CHECK(rel <= (std::is_same_v<S, float> ? 2e-6 : 1e-9));
  double& worst = std::is_same_v<S, float> ? g_value_fd_float : g_value_fd_double;
  worst = std::max(worst, rel);
}

// ---- gae -------------------------------------------------------------------------------------

/// verl's compute_gae_advantage_return, literally (tensor-style blends with 0/1 masks), before
/// whitening: returns the carried advantages and advantages + values at every position.
void verl_gae(const std::vector<ld>& r, const std::vector<ld>& v, const std::vector<ld>& m, long B, long T, ld gamma,
              ld lam, std::vector<ld>& adv, std::vector<ld>& ret) {
  adv.assign(static_cast<std::size_t>(B * T), 0);
  ret.assign(static_cast<std::size_t>(B * T), 0);
  for (long i = 0; i < B; ++i) {
    ld nextvalues = 0, lastgaelam = 0;
    for (long t = T - 1; t >= 0; --t) {
      const std::size_t k = static_cast<std::size_t>(i * T + t);
      const ld delta = r[k] + gamma * nextvalues - v[k];
      const ld lastgaelam_ = delta + gamma * lam * lastgaelam;
      nextvalues = v[k] * m[k] + (1 - m[k]) * nextvalues;
      lastgaelam = lastgaelam_ * m[k] + (1 - m[k]) * lastgaelam;
      adv[k] = lastgaelam;
      ret[k] = lastgaelam + v[k];
    }
  }
}

/// Rows with observation spans in the middle (masked), trailing padding, and a fully empty row.
template <class M>
Tok<M> multiturn_mask(long B, long T, std::mt19937& rng) {
  Tok<M> m(B, T);
  std::uniform_int_distribution<long> len(1, T);
  for (long i = 0; i < B; ++i) {
    const long L = i == 2 ? 0 : len(rng);
    for (long t = 0; t < T; ++t) {
      bool on = t < L && !(t >= L / 3 && t < L / 3 + 2);  // a 2-token observation span
      m(i, t) = static_cast<M>(on ? 1 : 0);
    }
  }
  return m;
}

// ---- whitening ---------------------------------------------------------------------------------

template <class S, class M>
void whiten_check(const Tok<S>& x, const Tok<M>& m, const pl::WhitenOptions& o) {
  Tok<S> out(x.dimension(0), x.dimension(1));
  out.setConstant(S(5));
  pl::masked_whiten(x, m, out, o);
  // verl_F.masked_whiten in long double.
  ld W = 0, sx = 0;
  for (long k = 0; k < x.size(); ++k)
    if (m.data()[k] != M(0)) {
      W += static_cast<ld>(m.data()[k]);
      sx += static_cast<ld>(m.data()[k]) * x.data()[k];
    }
  const ld mean = sx / W;
  ld ss = 0;
  for (long k = 0; k < x.size(); ++k)
    if (m.data()[k] != M(0)) ss += static_cast<ld>(m.data()[k]) * (x.data()[k] - mean) * (x.data()[k] - mean);
  ld var = ss / W;
  if (o.unbiased) var *= W / (W - 1);
  const ld inv = 1 / std::sqrt(var + static_cast<ld>(o.eps));
  const double tol = std::is_same_v<S, float> ? 4e-7 : 1e-14;
  ld om = 0, ov = 0;
  for (long k = 0; k < x.size(); ++k) {
    if (m.data()[k] == M(0)) {
      CHECK(out.data()[k] == S(0));
      continue;
    }
    const ld want = (x.data()[k] - mean) * inv + (o.shift_mean ? 0 : mean);
    CHECK(std::fabs(static_cast<ld>(out.data()[k]) - want) <= tol * (std::fabs(want) + 1));
    const ld z = static_cast<ld>(out.data()[k]) - (o.shift_mean ? 0 : mean);
    om += static_cast<ld>(m.data()[k]) * z;
    ov += static_cast<ld>(m.data()[k]) * z * z;
  }
  // Mean 0 and variance 1 (in the estimator's own normalisation) over the selected entries;
  // eps shrinks the variance by var / (var + eps).
  om /= W;
  ov /= o.unbiased ? W - 1 : W;
  CHECK(std::fabs(om) <= 10 * tol);
  CHECK(std::fabs(ov - var / (var + static_cast<ld>(o.eps))) <= 10 * tol);
  CHECK(std::fabs(ov - 1) <= 10 * tol + static_cast<ld>(o.eps) / var);
}

}  // namespace

// ================================================================================================

TEST_CASE("value_loss matches verl's compute_value_loss and finite differences", "[value]") {
  unsigned seed = 1;
  for (const auto a : all_modes)
    for (const std::optional<double> eps :
         {std::optional<double>(0.2), std::optional<double>(0.05), std::optional<double>()}) {
      CAPTURE(static_cast<int>(a), eps.value_or(-1));
      value_check<double, std::uint8_t>(3, 37, seed++, a, eps);
      value_check<double, double>(3, 37, seed++, a, eps);
      value_check<float, std::uint8_t>(3, 37, seed++, a, eps);
      value_check<float, float>(2, 29, seed++, a, eps);
      value_check<float, bool>(2, 17, seed++, a, eps);
    }
  std::printf("value_loss: max |grad - FD| / max|grad|: double %.3g, float %.3g\n", g_value_fd_double,
              g_value_fd_float);
}

TEST_CASE("value_loss follows torch autograd at verl's clip_by_value ties", "[value]") {
  Tok<double> v(1, 1), old(1, 1), R(1, 1), g(1, 1);
  Tok<std::uint8_t> m(1, 1);
  m.setConstant(1);
  v.setConstant(0.75);
  old.setConstant(0.5);
  R.setConstant(0.0);
  pl::ValueOptions o;
  o.clip = 0.25;  // v == old + eps exactly: min(v, hi) ties, and then so do the two squared errors
  const auto r = pl::value_loss(v, old, R, m, o);
  CHECK(r.loss == 0.5 * 0.5625);
  r.backward(g);
  // torch: 0.5 * [ (1/2) 2(v-R) + (1/2) 2(vc-R) * (1/2) ] = 0.5 * (0.75 + 0.375)
  CHECK(g(0, 0) == 0.5625);
  CHECK(r.metrics.clip_fraction == 0.0);
  // Clipped branch strictly larger: the prediction moved past the range away from the return.
  v.setConstant(1.5);
  R.setConstant(2.0);
  const auto r2 = pl::value_loss(v, old, R, m, o);
  CHECK(r2.loss == 0.5 * 1.25 * 1.25);
  CHECK(r2.metrics.clip_fraction == 1.0);
  r2.backward(g);
  CHECK(g(0, 0) == 0.0);
  // No clipping: plain 0.5 (v - R)^2.
  o.clip.reset();
  const auto r3 = pl::value_loss(v, old, R, m, o);
  CHECK(r3.loss == 0.125);
  r3.backward(g);
  CHECK(g(0, 0) == -0.5);
}

TEST_CASE("value_loss: padding never leaks, split batches add up", "[value]") {
  pl::ValueOptions o;
  const auto p = make_value<float, std::uint8_t>(4, 33, 5, 0.2, true, {3});
  const auto c = make_value<float, std::uint8_t>(4, 33, 5, 0.2, false, {3});
  Tok<float> gp(4, 33), gc(4, 33);
  const auto rp = pl::value_loss(p.v, p.old, p.ret, p.mask, o, gp);
  const auto rc = pl::value_loss(c.v, c.old, c.ret, c.mask, o, gc);
  CHECK(std::isfinite(rp.loss));
  CHECK(rp.loss == rc.loss);
  CHECK(rp.metrics.clip_fraction == rc.metrics.clip_fraction);
  CHECK(rp.metrics.value_mean == rc.metrics.value_mean);
  for (long k = 0; k < gp.size(); ++k) CHECK(gp.data()[k] == gc.data()[k]);

  const auto d = make_value<double, std::uint8_t>(4, 33, 6, 0.2, true);
  const auto full = pl::value_loss(d.v, d.old, d.ret, d.mask, o);
  o.token_count = static_cast<double>(full.metrics.token_weight);
  double sum = 0;
  for (long part = 0; part < 2; ++part) {
    const Eigen::array<Eigen::Index, 2> off{part * 2, 0}, ext{2, 33};
    const Tok<double> v = d.v.slice(off, ext), old = d.old.slice(off, ext), ret = d.ret.slice(off, ext);
    const Tok<std::uint8_t> m = d.mask.slice(off, ext);
    sum += pl::value_loss(v, old, ret, m, o).loss;
  }
  CHECK(std::fabs(sum - full.loss) <= 1e-15 * full.loss);
}

TEST_CASE("value_loss rejects bad input and writes nothing", "[value]") {
  const auto c = make_value<double, std::uint8_t>(2, 6, 7, 0.2, false);
  Tok<double> g(2, 6), bad(2, 7), gbad(1, 6);
  bad.setZero();
  g.setConstant(-42.0);
  pl::ValueOptions o;
  const auto fails = [&](auto&& f, const char* needle) {
    expect_throw<pl::error>(f, "value_loss", {needle});
    CHECK(all_equal(g, -42.0));
  };
  fails([&] { pl::value_loss(c.v, bad, c.ret, c.mask, o, g); }, "'old_values'");
  fails([&] { pl::value_loss(c.v, c.old, bad, c.mask, o, g); }, "'returns'");
  fails([&] { pl::value_loss(c.v, c.old, c.ret, c.mask, o, gbad); }, "'grad_out'");
  fails([&] { pl::value_loss(c.v, c.old, c.ret, c.mask, o).backward(gbad); }, "'grad'");
  pl::ValueOptions b;
  b.clip = -0.1;
  fails([&] { pl::value_loss(c.v, c.old, c.ret, c.mask, b, g); }, "'clip'");
  b = {};
  b.aggregation = static_cast<pl::Aggregation>(-1);
  fails([&] { pl::value_loss(c.v, c.old, c.ret, c.mask, b, g); }, "'aggregation'");
  b = {};
  b.token_count = std::numeric_limits<double>::infinity();
  fails([&] { pl::value_loss(c.v, c.old, c.ret, c.mask, b, g); }, "'token_count'");
}

// ---- kl_estimate -------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("kl_estimate matches verl's kl_penalty and its derivative", "[kl]", float, double) {
  using S = TestType;
  const long B = 3, T = 45;
  std::mt19937 rng(77);
  std::uniform_real_distribution<double> lp_d(-5.0, -0.01);
  std::normal_distribution<double> x_d(0.0, 1.5);
  Tok<S> lp(B, T), ref(B, T), out(B, T), grad(B, T);
  Tok<float> mask(B, T);
  long k = 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t, ++k) {
      mask(i, t) = rlref::random_mask<float>(rng, 0.8);
      double x;
      do x = x_d(rng);
      while (std::fabs(std::exp(x) - x - 1 - 10) < 1e-2);
      if (k % 17 == 0) x = 25.0 + static_cast<double>(k % 3);  // beyond k3's log-ratio clamp (20)
      lp(i, t) = static_cast<S>(lp_d(rng));
      ref(i, t) = static_cast<S>(static_cast<double>(lp(i, t)) + x);
      if (mask(i, t) == 0.f) {
        lp(i, t) = rlref::poison<S>(k);
        ref(i, t) = rlref::poison<S>(k + 1);
      }
    }
  const double tol = std::is_same_v<S, float> ? 4e-6 : 1e-13;
  for (const auto est : rlref::kl_estimators)
    for (const bool clamps : {true, false}) {
      CAPTURE(rlref::kl_name(est), clamps);
      // A "+" estimator's gradient is k2's (straight-through): differentiate k2's formula.
      const bool plus =
          est == pl::KlEstimator::k1_plus || est == pl::KlEstimator::abs_plus || est == pl::KlEstimator::k3_plus;
      const pl::KlEstimator fd_est = plus ? pl::KlEstimator::k2 : est;
      pl::KlOptions o;
      o.estimator = est;
      if (!clamps) {
        o.k3_log_ratio_clamp.reset();
        o.k3_clamp.reset();
      }
      out.setConstant(S(9));
      grad.setConstant(S(9));
      pl::kl_estimate(lp, ref, mask, o, out, grad);
      double max_fd = 0;
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < T; ++t) {
          if (mask(i, t) == 0.f) {
            CHECK(out(i, t) == S(0));
            CHECK(grad(i, t) == S(0));
            continue;
          }
          const ld want = rlref::kl_ref(lp(i, t), ref(i, t), est, o.k3_log_ratio_clamp, o.k3_clamp);
          CHECK(std::fabs(static_cast<ld>(out(i, t)) - want) <= tol * (std::fabs(want) + 1));
          const ld h = 1e-6L;
          const ld fd =
              (rlref::kl_ref(static_cast<ld>(lp(i, t)) + h, ref(i, t), fd_est, o.k3_log_ratio_clamp, o.k3_clamp) -
               rlref::kl_ref(static_cast<ld>(lp(i, t)) - h, ref(i, t), fd_est, o.k3_log_ratio_clamp, o.k3_clamp)) /
              (2 * h);
          const double e = std::fabs(static_cast<double>(grad(i, t) - fd)) / (1 + std::fabs(static_cast<double>(fd)));
          max_fd = std::max(max_fd, e);
        }
      CHECK(max_fd <= (std::is_same_v<S, float> ? 4e-6 : 1e-9));
      std::printf("kl_estimate %s %s clamps=%d: max |grad - FD| / (1 + |FD|) = %.3g\n",
                  std::is_same_v<S, float> ? "float" : "double", rlref::kl_name(est), clamps ? 1 : 0, max_fd);
      // The estimator overload uses verl's default clamps.
      Tok<S> out2(B, T);
      pl::kl_estimate(lp, ref, mask, est, out2);
      if (clamps)
        for (long q = 0; q < out.size(); ++q) CHECK(out2.data()[q] == out.data()[q]);
    }
}

TEST_CASE("ppo_clip's KL term is kl_estimate's", "[kl][ppo]") {
  const long B = 2, T = 23;
  std::mt19937 rng(3);
  std::normal_distribution<double> n(0.0, 1.0);
  Tok<double> lp(B, T), old(B, T), adv(B, T), ref(B, T), k(B, T);
  Tok<std::uint8_t> m(B, T);
  for (long q = 0; q < lp.size(); ++q) {
    lp.data()[q] = -1 + 0.3 * n(rng);
    old.data()[q] = lp.data()[q];
    adv.data()[q] = 0;  // the policy term vanishes: the loss is kl_coef * mean(k)
    ref.data()[q] = lp.data()[q] + 2 * n(rng);
    m.data()[q] = q % 5 != 0;
  }
  for (const auto est : rlref::kl_estimators) {
    CAPTURE(rlref::kl_name(est));
    pl::PpoOptions o;
    o.kl_coef = 0.25;
    o.kl_estimator = est;
    const auto r = pl::ppo_clip(lp, old, adv, m, ref, o);
    pl::kl_estimate(lp, ref, m, est, k);
    ld s = 0, w = 0;
    for (long q = 0; q < k.size(); ++q)
      if (m.data()[q]) {
        s += k.data()[q];
        w += 1;
      }
    CHECK(std::fabs(r.loss - static_cast<double>(0.25L * s / w)) <= 1e-15 * (1 + std::fabs(r.loss)));
    CHECK(std::fabs(r.metrics.kl_mean - static_cast<double>(s / w)) <= 1e-15 * (1 + std::fabs(r.metrics.kl_mean)));
  }
}

TEMPLATE_TEST_CASE("kl_estimate: abs and the straight-through estimators in closed form", "[kl]", float, double) {
  using S = TestType;
  // (logp, ref_logp), exact in float so that d = logp - ref is exact too; x = ref - logp.
  const double tokens[][2] = {{-1.0, -1.0},      // d = 0: abs's gradient is 0
                              {-0.5, -2.0},      // x = -1.5
                              {-3.0, -1.0},      // x = 2
                              {-30.0, -5.0},     // x = 25: beyond k3's log-ratio clamp 20 (and then its value clamp)
                              {-14.0, -1.0},     // x = 13: beyond k3's value clamp 10 only (e^13 - 14)
                              {-1.0, -26.0},     // x = -25: beyond the log-ratio clamp, kld(-20) = e^-20 + 19 > 10
                              {-1.0, -16.0},     // x = -15: beyond the value clamp only (e^-15 + 14)
                              {-0.25, -0.125}};  // x = 0.125
  constexpr long n = 8;
  // k3 in closed form with verl's clamps (+-20 on x, +-10 on the estimate), and without.
  const ld k3_clamped[n] = {0, std::exp(-1.5L) + 0.5L, std::exp(2.0L) - 3, 10, 10, 10, 10, std::exp(0.125L) - 1.125L};
  const ld k3_exact[n] = {0,
                          std::exp(-1.5L) + 0.5L,
                          std::exp(2.0L) - 3,
                          std::exp(25.0L) - 26,
                          std::exp(13.0L) - 14,
                          std::exp(-25.0L) + 24,
                          std::exp(-15.0L) + 14,
                          std::exp(0.125L) - 1.125L};
  // Row 0 holds every token; row 1 the same with the even columns masked out and poisoned.
  Tok<S> lp(2, n), ref(2, n), out(2, n), grad(2, n);
  Tok<std::uint8_t> m(2, n);
  for (long t = 0; t < n; ++t)
    for (long i = 0; i < 2; ++i) {
      const bool valid = i == 0 || t % 2 == 1;
      m(i, t) = valid;
      lp(i, t) = valid ? static_cast<S>(tokens[t][0]) : rlref::poison<S>(t);
      ref(i, t) = valid ? static_cast<S>(tokens[t][1]) : rlref::poison<S>(t + 1);
    }
  const double tol = std::is_same_v<S, float> ? 4e-6 : 1e-13;
  for (const auto est : {pl::KlEstimator::abs, pl::KlEstimator::k1_plus, pl::KlEstimator::abs_plus,
                         pl::KlEstimator::k3_plus, pl::KlEstimator::k3})
    for (const bool clamps : {true, false}) {
      CAPTURE(rlref::kl_name(est), clamps);
      pl::KlOptions o;
      o.estimator = est;
      if (!clamps) {
        o.k3_log_ratio_clamp.reset();
        o.k3_clamp.reset();
      }
      out.setConstant(S(9));
      grad.setConstant(S(9));
      pl::kl_estimate(lp, ref, m, o, out, grad);
      for (long i = 0; i < 2; ++i)
        for (long t = 0; t < n; ++t) {
          CAPTURE(i, t);
          if (!m(i, t)) {
            CHECK(out(i, t) == S(0));
            CHECK(grad(i, t) == S(0));
            continue;
          }
          const ld d = static_cast<ld>(tokens[t][0]) - static_cast<ld>(tokens[t][1]);
          ld v = 0, g = 0;
          switch (est) {
            case pl::KlEstimator::abs:
              v = std::fabs(d);
              g = d > 0 ? 1 : d < 0 ? -1 : 0;
              break;
            case pl::KlEstimator::k1_plus:
              v = d;
              g = d;
              break;
            case pl::KlEstimator::abs_plus:
              v = std::fabs(d);
              g = d;
              break;
            case pl::KlEstimator::k3_plus:  // the clamps hold the value, never the gradient
              v = clamps ? k3_clamped[t] : k3_exact[t];
              g = d;
              break;
            default:  // k3, for contrast: its gradient is 0 where a clamp holds the value
              v = clamps ? k3_clamped[t] : k3_exact[t];
              g = clamps && t >= 3 && t <= 6 ? 0 : 1 - std::exp(-d);
              break;
          }
          CHECK(std::fabs(static_cast<ld>(out(i, t)) - v) <= tol * (std::fabs(v) + 1));
          if (est == pl::KlEstimator::k3) {
            CHECK(std::fabs(static_cast<ld>(grad(i, t)) - g) <= tol * (std::fabs(g) + 1));
          } else {
            CHECK(static_cast<ld>(grad(i, t)) == g);  // d and sign(d) are exact in S
          }
        }
    }
}

TEST_CASE("ppo_clip with kl_coef and k3_plus adds kl_coef * (logp - ref) / N to the gradient", "[kl][ppo]") {
  const long B = 3, T = 29;
  std::mt19937 rng(11);
  std::normal_distribution<double> n(0.0, 1.0);
  Tok<double> lp(B, T), old(B, T), adv(B, T), ref(B, T);
  Tok<std::uint8_t> m(B, T);
  for (long q = 0; q < lp.size(); ++q) {
    lp.data()[q] = -1 + 0.3 * n(rng);
    old.data()[q] = lp.data()[q] + 0.2 * n(rng);
    adv.data()[q] = n(rng);
    ref.data()[q] = lp.data()[q] + n(rng);
    if (q % 7 == 3) ref.data()[q] = lp.data()[q] + 25;   // beyond k3's log-ratio clamp
    if (q % 11 == 4) ref.data()[q] = lp.data()[q] - 16;  // beyond its value clamp only
    m.data()[q] = q % 5 != 0;
    if (!m.data()[q]) {
      lp.data()[q] = rlref::poison<double>(q);
      old.data()[q] = rlref::poison<double>(q + 1);
      adv.data()[q] = rlref::poison<double>(q + 2);
      ref.data()[q] = rlref::poison<double>(q + 3);
    }
  }
  const double c = 0.3;
  const ld u = std::numeric_limits<double>::epsilon() / 2;
  pl::PpoOptions o0;  // token_mean: every row's scale is 1 / N
  o0.aggregation = pl::Aggregation::token_mean;
  o0.kl_estimator = pl::KlEstimator::k3_plus;
  pl::PpoOptions o1 = o0;
  o1.kl_coef = c;
  Tok<double> g0(B, T), g1(B, T), gf(B, T);
  const auto r0 = pl::ppo_clip(lp, old, adv, m, ref, o0);
  r0.backward(g0);
  const auto r1 = pl::ppo_clip(lp, old, adv, m, ref, o1);
  r1.backward(g1);
  const auto rf = pl::ppo_clip(lp, old, adv, m, ref, o1, gf);
  ld N = 0, ksum = 0;
  for (long q = 0; q < lp.size(); ++q)
    if (m.data()[q]) {
      N += 1;
      ksum += rlref::kl_ref(lp.data()[q], ref.data()[q], pl::KlEstimator::k3, 20.0, 10.0);
    }
  REQUIRE(N > 0);
  for (const double s : r1.row_scales()) CHECK(std::fabs(s - static_cast<double>(1 / N)) <= 1e-16);
  long clamped = 0;
  for (long q = 0; q < lp.size(); ++q) {
    CAPTURE(q);
    if (!m.data()[q]) {
      CHECK(g1.data()[q] == 0.0);
      CHECK(gf.data()[q] == 0.0);
      continue;
    }
    const ld d = static_cast<ld>(lp.data()[q]) - ref.data()[q];
    clamped += std::fabs(d) >= 13;
    const ld kl_term = c * d / N, want = g0.data()[q] + kl_term;
    // A few roundings of the two terms, which may cancel: bound by their magnitudes.
    const ld tol = 4 * u * (std::fabs(static_cast<ld>(g0.data()[q])) + std::fabs(kl_term));
    CHECK(std::fabs(g1.data()[q] - want) <= tol);
    CHECK(std::fabs(gf.data()[q] - want) <= tol);
  }
  CHECK(clamped >= 4);  // the clamped tokens are there and carry k2's gradient
  // The losses sum N token terms: at most N u of the sum of their magnitudes each (recursive
  // summation's bound), the magnitudes from verl's formula in long double.
  const auto want = rlref::ppo_ref(rlref::to_data(lp, old, adv, m, &ref), o1);
  ld abs_terms = 0;
  for (const ld l : want.tokens) abs_terms += std::fabs(l) / N;
  const ld kl_mean = ksum / N, tol_loss = 2 * N * u * abs_terms;
  CHECK(std::fabs(r1.loss - static_cast<double>(r0.loss + c * kl_mean)) <= tol_loss);
  CHECK(std::fabs(r1.loss - want.loss) <= tol_loss);
  CHECK(std::fabs(rf.loss - want.loss) <= tol_loss);
  CHECK(std::fabs(r1.metrics.kl_mean - static_cast<double>(kl_mean)) <= N * u * kl_mean);
}

TEST_CASE("kl_estimate rejects bad input and writes nothing", "[kl]") {
  Tok<double> lp(2, 3), ref(2, 3), out(2, 3), bad(3, 3);
  Tok<bool> m(2, 3);
  lp.setZero();
  ref.setZero();
  m.setConstant(true);
  out.setConstant(-42.0);
  bad.setZero();
  expect_throw<pl::error>([&] { pl::kl_estimate(lp, bad, m, pl::KlEstimator::k3, out); }, "kl_estimate",
                          {"'ref_logp'"});
  expect_throw<pl::error>([&] { pl::kl_estimate(lp, ref, m, pl::KlEstimator::k3, bad); }, "kl_estimate", {"'out'"});
  expect_throw<pl::error>([&] { pl::kl_estimate(lp, ref, m, static_cast<pl::KlEstimator>(9), out); }, "kl_estimate",
                          {"'estimator'"});
  // One past the last enumerator, and below the first.
  for (const int bad_est : {static_cast<int>(pl::KlEstimator::k3_plus) + 1, -1})
    expect_throw<pl::error>([&] { pl::kl_estimate(lp, ref, m, static_cast<pl::KlEstimator>(bad_est), out); },
                            "kl_estimate", {"'estimator'"});
  pl::KlOptions o;
  o.k3_clamp = 0.0;
  expect_throw<pl::error>([&] { pl::kl_estimate(lp, ref, m, o, out); }, "kl_estimate", {"'k3_clamp'"});
  expect_throw<pl::error>([&] { pl::kl_estimate(lp, ref, m, pl::KlOptions{}, out, bad); }, "kl_estimate",
                          {"'grad_out'"});
  CHECK(all_equal(out, -42.0));
}

// ---- gae ---------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("gae matches verl's loop, skipping masked tokens", "[gae]", float, double) {
  using S = TestType;
  const long B = 5, T = 40;
  std::mt19937 rng(9);
  std::normal_distribution<double> n(0.0, 1.0);
  const Tok<std::uint8_t> m = multiturn_mask<std::uint8_t>(B, T, rng);
  Tok<S> r(B, T), v(B, T), rp(B, T), vp(B, T);
  for (long q = 0; q < r.size(); ++q) {
    r.data()[q] = static_cast<S>(n(rng));
    v.data()[q] = static_cast<S>(n(rng));
    const bool on = m.data()[q] != 0;
    rp.data()[q] = on ? r.data()[q] : rlref::poison<S>(q);
    vp.data()[q] = on ? v.data()[q] : rlref::poison<S>(q + 1);
  }
  std::vector<ld> rl(r.data(), r.data() + r.size()), vl(v.data(), v.data() + v.size()),
      ml(m.data(), m.data() + m.size());
  const double tol = std::is_same_v<S, float> ? 1e-6 : 1e-13;
  for (const auto& gl : {std::pair<double, double>{1.0, 1.0}, {0.99, 0.95}, {0.9, 0.0}, {0.0, 0.5}}) {
    CAPTURE(gl.first, gl.second);
    pl::GaeOptions o;
    o.gamma = gl.first;
    o.lam = gl.second;
    Tok<S> adv(B, T), ret(B, T), adv_p(B, T), ret_p(B, T);
    adv.setConstant(S(7));
    ret.setConstant(S(7));
    pl::gae(r, v, m, o, adv, ret);
    pl::gae(rp, vp, m, o, adv_p, ret_p);  // masked entries hold NaN/inf
    std::vector<ld> ea, er;
    verl_gae(rl, vl, ml, B, T, gl.first, gl.second, ea, er);
    ld scale = 0;
    for (ld x : ea) scale = std::max(scale, std::fabs(x));
    for (long q = 0; q < adv.size(); ++q) {
      const std::size_t u = static_cast<std::size_t>(q);
      CHECK(adv_p.data()[q] == adv.data()[q]);
      CHECK(ret_p.data()[q] == ret.data()[q]);
      if (m.data()[q]) {
        CHECK(std::fabs(adv.data()[q] - ea[u]) <= tol * (scale + 1));
        CHECK(std::fabs(ret.data()[q] - er[u]) <= tol * (scale + 1));
      } else {
        CHECK(adv.data()[q] == S(0));
        CHECK(ret.data()[q] == S(0));
      }
    }
    // In place: advantages over the rewards, returns over the values.
    Tok<S> r2 = r, v2 = v;
    pl::gae(r2, v2, m, o, r2, v2);
    for (long q = 0; q < adv.size(); ++q) {
      CHECK(r2.data()[q] == adv.data()[q]);
      CHECK(v2.data()[q] == ret.data()[q]);
    }
    // verl whitens the advantages inside compute_gae_advantage_return; the option does that.
    o.whiten_advantages = true;
    Tok<S> aw(B, T), rw(B, T), expect(B, T);
    pl::gae(r, v, m, o, aw, rw);
    pl::masked_whiten(adv, m, expect);
    for (long q = 0; q < adv.size(); ++q) {
      CHECK(aw.data()[q] == expect.data()[q]);
      CHECK(rw.data()[q] == ret.data()[q]);
    }
  }
}

TEST_CASE("gae on a single row by hand", "[gae]") {
  // rewards 0, 0, 1 at the end; values 0.5, 0.25, 0.75; gamma 0.5, lam 0.5.
  Tok<double> r(1, 4), v(1, 4), a(1, 4), ret(1, 4);
  Tok<std::uint8_t> m(1, 4);
  r.setValues({{0.0, 0.0, 1.0, 123.0}});
  v.setValues({{0.5, 0.25, 0.75, 456.0}});
  m.setValues({{1, 1, 1, 0}});
  pl::GaeOptions o;
  o.gamma = 0.5;
  o.lam = 0.5;
  pl::gae(r, v, m, o, a, ret);
  const double d2 = 1.0 - 0.75, d1 = 0.5 * 0.75 - 0.25, d0 = 0.5 * 0.25 - 0.5;
  const double a2 = d2, a1 = d1 + 0.25 * a2, a0 = d0 + 0.25 * a1;
  CHECK(a(0, 2) == Approx(a2).epsilon(1e-15));
  CHECK(a(0, 1) == Approx(a1).epsilon(1e-15));
  CHECK(a(0, 0) == Approx(a0).epsilon(1e-15));
  CHECK(ret(0, 0) == Approx(a0 + 0.5).epsilon(1e-15));
  CHECK(a(0, 3) == 0.0);
  // A masked token in the middle is skipped: token 0 bootstraps from token 2 directly.
  m.setValues({{1, 0, 1, 0}});
  pl::gae(r, v, m, o, a, ret);
  CHECK(a(0, 1) == 0.0);
  CHECK(a(0, 0) == Approx((0.5 * 0.75 - 0.5) + 0.25 * d2).epsilon(1e-15));
}

TEST_CASE("gae rejects bad input and writes nothing", "[gae]") {
  Tok<float> r(2, 3), v(2, 3), a(2, 3), ret(2, 3), bad(2, 4);
  Tok<std::uint8_t> m(2, 3), m1(2, 3);
  r.setZero();
  v.setZero();
  bad.setZero();
  m.setConstant(1);
  m1.setZero();
  m1(0, 0) = 1;
  a.setConstant(-42.f);
  ret.setConstant(-42.f);
  pl::GaeOptions o;
  expect_throw<pl::error>([&] { pl::gae(r, bad, m, o, a, ret); }, "gae", {"'values'"});
  expect_throw<pl::error>([&] { pl::gae(r, v, m, o, bad, ret); }, "gae", {"'advantages_out'"});
  expect_throw<pl::error>([&] { pl::gae(r, v, m, o, a, bad); }, "gae", {"'returns_out'"});
  pl::GaeOptions b;
  b.gamma = 1.5;
  expect_throw<pl::error>([&] { pl::gae(r, v, m, b, a, ret); }, "gae", {"'gamma'"});
  b = {};
  b.lam = -0.1;
  expect_throw<pl::error>([&] { pl::gae(r, v, m, b, a, ret); }, "gae", {"'lam'"});
  b = {};
  b.whiten_advantages = true;
  expect_throw<pl::error>([&] { pl::gae(r, v, m1, b, a, ret); }, "gae", {"'mask'"});
  CHECK(all_equal(a, -42.f));
  CHECK(all_equal(ret, -42.f));
}

// ---- masked_whiten -----------------------------------------------------------------------------

TEMPLATE_TEST_CASE("masked_whiten gives mean 0 and variance 1 over the selected entries", "[whiten]", float, double) {
  using S = TestType;
  std::mt19937 rng(13);
  std::normal_distribution<double> n(3.0, 2.0);
  Tok<S> x(4, 31);
  Tok<std::uint8_t> mb(4, 31);
  Tok<double> mw(4, 31);
  for (long q = 0; q < x.size(); ++q) {
    mb.data()[q] = rlref::random_mask<std::uint8_t>(rng, 0.7);
    mw.data()[q] = rlref::random_mask<double>(rng, 0.7);
    x.data()[q] = static_cast<S>(n(rng));
  }
  for (const bool unbiased : {true, false})
    for (const bool shift : {true, false})
      for (const double eps : {1e-8, 0.0}) {
        pl::WhitenOptions o;
        o.unbiased = unbiased;
        o.shift_mean = shift;
        o.eps = eps;
        whiten_check(x, mb, o);
        whiten_check(x, mw, o);
      }
  // Padding: NaN/inf in unselected entries change nothing; in place works.
  Tok<S> xp = x, a(4, 31), b(4, 31);
  for (long q = 0; q < x.size(); ++q)
    if (!mb.data()[q]) xp.data()[q] = rlref::poison<S>(q);
  pl::masked_whiten(x, mb, a);
  pl::masked_whiten(xp, mb, b);
  pl::masked_whiten(xp, mb, xp);
  for (long q = 0; q < x.size(); ++q) {
    CHECK(a.data()[q] == b.data()[q]);
    CHECK(xp.data()[q] == a.data()[q]);
  }
  // Rank-1 tensors too.
  Eigen::Tensor<S, 1> v(5), out(5);
  Eigen::Tensor<bool, 1> m1(5);
  v.setValues({S(1), S(2), S(3), S(100), S(4)});
  m1.setValues({true, true, true, false, true});
  pl::WhitenOptions o;
  o.eps = 0;
  pl::masked_whiten(v, m1, out, o);
  const double sd = std::sqrt(5.0 / 3.0);  // values 1..4: mean 2.5, unbiased variance 5/3
  CHECK(out(0) == Approx(-1.5 / sd).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-14));
  CHECK(out(3) == S(0));
  CHECK(out(4) == Approx(1.5 / sd).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-14));
}

TEST_CASE("masked_whiten rejects bad input and writes nothing", "[whiten]") {
  Tok<double> x(2, 3), out(2, 3), bad(3, 2);
  Tok<float> m(2, 3), none(2, 3), one(2, 3);
  x.setConstant(1.0);
  bad.setZero();
  m.setConstant(1.f);
  none.setZero();
  one.setZero();
  one(1, 2) = 1.f;
  out.setConstant(-42.0);
  expect_throw<pl::error>([&] { pl::masked_whiten(x, none, out); }, "masked_whiten", {"'mask'"});
  expect_throw<pl::error>([&] { pl::masked_whiten(x, one, out); }, "masked_whiten", {"'mask'"});
  expect_throw<pl::error>([&] { pl::masked_whiten(x, m, bad); }, "masked_whiten", {"'out'"});
  pl::WhitenOptions o;
  o.eps = -1;
  expect_throw<pl::error>([&] { pl::masked_whiten(x, m, out, o); }, "masked_whiten", {"'eps'"});
  CHECK(all_equal(out, -42.0));
  // Biased variance accepts a single selected entry (its variance is 0; eps keeps it finite).
  o = {};
  o.unbiased = false;
  pl::masked_whiten(x, one, out, o);
  CHECK(out(1, 2) == 0.0);
}

// ---- group_advantages --------------------------------------------------------------------------

TEMPLATE_TEST_CASE("group_advantages: GRPO closed forms", "[grpo]", float, double) {
  using S = TestType;
  const double tol = std::is_same_v<S, float> ? 1e-6 : 1e-15;
  Eigen::Tensor<S, 1> s(8), out(8), out_ids(8);
  s.setValues({S(1), S(2), S(3), S(5), S(5), S(5), S(0), S(1)});
  // Contiguous groups of 3: {1,2,3} (mean 2, std 1) and {5,5,5} (std 0).
  Eigen::Tensor<S, 1> s6(6), o6(6);
  s6.setValues({S(1), S(2), S(3), S(5), S(5), S(5)});
  pl::group_advantages(s6, 3, pl::GroupOptions{}, o6);
  const double e = 1e-6;
  CHECK(o6(0) == Approx(-1 / (1 + e)).epsilon(tol));
  CHECK(o6(1) == S(0));
  CHECK(o6(2) == Approx(1 / (1 + e)).epsilon(tol));
  for (int k = 3; k < 6; ++k) CHECK(o6(k) == S(0));
  // Dr.GRPO: no scaling.
  pl::GroupOptions dr;
  dr.scale_by_std = false;
  pl::group_advantages(s6, 3, dr, o6);
  CHECK(o6(0) == S(-1));
  CHECK(o6(2) == S(1));
  // Arbitrary ids (interleaved), a pair and a singleton (verl: mean 0, std 1).
  Eigen::Tensor<std::int64_t, 1> ids(8);
  ids.setValues({7, 3, 7, 9, 3, 7, 42, 3});
  pl::group_advantages(s, ids, pl::GroupOptions{}, out_ids);
  // group 7: {1, 3, 5} mean 3 std 2; group 3: {2, 5, 1} mean 8/3; group 9: {5} singleton; 42: {0}
  CHECK(out_ids(0) == Approx(-2.0 / (2 + e)).epsilon(tol));
  CHECK(out_ids(2) == Approx(0.0).margin(tol));
  CHECK(out_ids(5) == Approx(2.0 / (2 + e)).epsilon(tol));
  const double m3 = 8.0 / 3, sd3 = std::sqrt(((2 - m3) * (2 - m3) + (5 - m3) * (5 - m3) + (1 - m3) * (1 - m3)) / 2);
  CHECK(out_ids(1) == Approx((2 - m3) / (sd3 + e)).epsilon(tol));
  CHECK(out_ids(4) == Approx((5 - m3) / (sd3 + e)).epsilon(tol));
  CHECK(out_ids(7) == Approx((1 - m3) / (sd3 + e)).epsilon(tol));
  CHECK(out_ids(3) == Approx(5 / (1 + e)).epsilon(tol));
  CHECK(out_ids(6) == S(0));
  // In place.
  Eigen::Tensor<S, 1> inplace = s;
  pl::group_advantages(inplace, ids, pl::GroupOptions{}, inplace);
  for (int k = 0; k < 8; ++k) CHECK(inplace(k) == out_ids(k));
}

TEST_CASE("group_advantages rejects bad input and writes nothing", "[grpo]") {
  Eigen::Tensor<double, 1> s(6), out(6), bad(5);
  s.setZero();
  out.setConstant(-42.0);
  Eigen::Tensor<int, 1> ids(5);
  ids.setZero();
  expect_throw<pl::error>([&] { pl::group_advantages(s, 0, pl::GroupOptions{}, out); }, "group_advantages",
                          {"'group_size'"});
  expect_throw<pl::error>([&] { pl::group_advantages(s, 4, pl::GroupOptions{}, out); }, "group_advantages",
                          {"'scores'"});
  expect_throw<pl::error>([&] { pl::group_advantages(s, 3, pl::GroupOptions{}, bad); }, "group_advantages", {"'out'"});
  expect_throw<pl::error>([&] { pl::group_advantages(s, ids, pl::GroupOptions{}, out); }, "group_advantages",
                          {"'group_ids'"});
  pl::GroupOptions o;
  o.epsilon = -1e-6;
  expect_throw<pl::error>([&] { pl::group_advantages(s, 3, o, out); }, "group_advantages", {"'epsilon'"});
  for (int k = 0; k < 6; ++k) CHECK(out(k) == -42.0);
}
