// bco() and RunningMoments: values against closed forms written from TRL's bco_loss and
// RunningMoments.update in long double (no prefloss code on the expected side), token gradients
// against central finite differences in double, huge margins, NaN padding, sharding, threads,
// and bad input.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <random>
#include <string>
#include <vector>

#include "throws.hpp"

namespace {

namespace pl = prefloss;
using ld = long double;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

/// -log sig(x) = log(1 + exp(-x)), written stably: max(-x, 0) + log1p(exp(-|x|)).
ld neg_log_sig(ld x) { return std::max(-x, ld(0)) + std::log1p(std::exp(-std::fabs(x))); }
ld sig(ld x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); }

struct Expected {
  ld loss = 0;
  std::vector<ld> losses, du;  // du: d batch loss / d policy value
};

/// TRL's bco_loss: r = b (s - rho); desirable -logsig(r - delta), undesirable
/// -logsig(-(r - delta)), times the example's weight; loss = sum / n (n: batch or batch_count).
Expected expected_bco(const std::vector<ld>& s, const std::vector<ld>& rho, const std::vector<int>& desirable, ld b,
                      ld delta, const std::vector<ld>& w = {}, ld n = 0) {
  Expected e;
  if (n == 0) n = static_cast<ld>(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const ld x = b * (s[i] - rho[i]) - delta;
    const ld wi = w.empty() ? 1 : w[i];
    ld l, d;
    if (desirable[i]) {
      l = neg_log_sig(x);
      d = -b * sig(-x);  // d/du -logsig(b u - delta)
    } else {
      l = neg_log_sig(-x);
      d = b * sig(x);
    }
    e.losses.push_back(wi * l);
    e.du.push_back(wi * d / n);
    e.loss += wi * l / n;
  }
  return e;
}

template <class T>
Vec<T> vec(const std::vector<double>& v) {
  Vec<T> t(static_cast<Eigen::Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) t(static_cast<Eigen::Index>(i)) = static_cast<T>(v[i]);
  return t;
}

Vec<std::uint8_t> labels(const std::vector<int>& v) {
  Vec<std::uint8_t> t(static_cast<Eigen::Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) t(static_cast<Eigen::Index>(i)) = static_cast<std::uint8_t>(v[i]);
  return t;
}

std::vector<ld> lds(const std::vector<double>& v) { return std::vector<ld>(v.begin(), v.end()); }

/// Random token log-probs in [-3, 0) under a mask of random lengths; row `empty_row` (if >= 0)
/// selects nothing, and every masked-out token holds NaN or -inf (padding).
struct TokenSet {
  Tok<double> x;
  Tok<std::uint8_t> m;
};

TokenSet tokens(long B, long T, unsigned seed, long empty_row = -1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> val(-3.0, -0.01);
  std::uniform_int_distribution<long> len(1, T);
  TokenSet s{Tok<double>(B, T), Tok<std::uint8_t>(B, T)};
  for (long i = 0; i < B; ++i) {
    const long L = i == empty_row ? 0 : len(rng);
    for (long t = 0; t < T; ++t) {
      const bool on = t < L;
      s.m(i, t) = on ? 1 : 0;
      s.x(i, t) = on ? val(rng)
                     : ((t & 1) ? std::numeric_limits<double>::quiet_NaN() : -std::numeric_limits<double>::infinity());
    }
  }
  return s;
}

std::vector<ld> row_sums(const Tok<double>& x, const Tok<std::uint8_t>& m) {
  std::vector<ld> v;
  for (long i = 0; i < x.dimension(0); ++i) {
    ld a = 0;
    for (long t = 0; t < x.dimension(1); ++t)
      if (m(i, t)) a += x(i, t);
    v.push_back(a);
  }
  return v;
}

/// The reference tokens of a policy TokenSet: same mask, other values, NaN padding.
Tok<double> ref_tokens(const TokenSet& pol, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> val(-3.0, -0.01);
  Tok<double> r(pol.x.dimension(0), pol.x.dimension(1));
  for (long i = 0; i < r.dimension(0); ++i)
    for (long t = 0; t < r.dimension(1); ++t)
      r(i, t) = pol.m(i, t) ? val(rng) : std::numeric_limits<double>::quiet_NaN();
  return r;
}

/// TRL's RunningMoments.update transcribed in long double (mean 0, var 1, count 1e-24 at start).
struct TrlMoments {
  ld mean = 0, var = 1, std = 1, count = 1e-24L;
  std::pair<ld, ld> update(const std::vector<double>& xs) {
    const ld n = static_cast<ld>(xs.size());
    ld s = 0;
    for (double x : xs) s += x;
    const ld xm = s / n;
    ld ss = 0;
    for (double x : xs) ss += (x - xm) * (x - xm);
    const ld xv = ss / n;  // torch.var_mean(xs, unbiased=False)
    const ld delta = xm - mean;
    const ld tot = count + n;
    const ld new_sum = xv * n;
    const ld old_sum = var * count + delta * delta * count * n / tot;
    mean += delta * n / tot;
    const ld new_var = (old_sum + new_sum) / tot;
    std = std::sqrt(new_var * tot / (tot - 1));
    var = new_var;
    count = tot;
    return {xm, std::sqrt(xv * n / (n - 1))};
  }
};

}  // namespace

TEST_CASE("bco: closed form on [batch] tensors, mixed classes, nonzero delta", "[bco]") {
  const std::vector<double> s = {-1.0, -2.0, -3.0, -4.0, -0.5}, rho = {-1.5, -1.5, -2.5, -5.0, -0.25};
  const std::vector<int> d = {1, 0, 1, 0, 0};
  pl::BcoOptions o;
  o.beta = 0.5;
  o.delta = 0.125;
  const Expected e = expected_bco(lds(s), lds(rho), d, 0.5L, 0.125L);
  const auto P = vec<double>(s), R = vec<double>(rho);
  const auto D = labels(d);
  const auto r = pl::bco(P, R, D, o);
  CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
  REQUIRE(r.losses.dimension(0) == 5);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(r.losses(static_cast<long>(i)) == Approx(static_cast<double>(e.losses[i])).epsilon(1e-14));
  Vec<double> g(5);
  r.backward(g);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(g(static_cast<long>(i)) == Approx(static_cast<double>(e.du[i])).epsilon(1e-13));

  // Metrics: TRL's delta, counts, reward sums and means (rewards b u, unshifted), logps sums.
  CHECK(r.metrics.delta == 0.125);
  CHECK(r.metrics.count_desirable == 2);
  CHECK(r.metrics.count_undesirable == 3);
  CHECK(r.metrics.reward_desirable_sum == Approx(0.5 * (0.5 + -0.5)).margin(1e-15));
  CHECK(r.metrics.reward_undesirable_sum == Approx(0.5 * (-0.5 + 1.0 - 0.25)).epsilon(1e-15));
  CHECK(r.metrics.reward_desirable == Approx(0.0).margin(1e-15));
  CHECK(r.metrics.reward_undesirable == Approx(0.5 * 0.25 / 3).epsilon(1e-14));
  CHECK(r.metrics.reward_margin == Approx(-0.5 * 0.25 / 3).epsilon(1e-14));
  CHECK(r.metrics.logps_desirable_sum == Approx(-4.0));
  CHECK(r.metrics.logps_undesirable_sum == Approx(-6.5));

  // The fused form: the same bits, the gradient written in the same pass.
  Vec<double> gf(5);
  const auto rf = pl::bco(P, R, D, o, gf);
  CHECK(rf.loss == r.loss);
  for (long i = 0; i < 5; ++i) {
    CHECK(gf(i) == g(i));
    CHECK(rf.losses(i) == r.losses(i));
  }

  // Same in float, and with a bool label tensor.
  Vec<bool> Db(5);
  for (int i = 0; i < 5; ++i) Db(i) = d[static_cast<std::size_t>(i)] != 0;
  const auto rfl = pl::bco(vec<float>(s), vec<float>(rho), Db, o);
  CHECK(rfl.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-6));
  Vec<float> gfl(5);
  rfl.backward(gfl);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(gfl(static_cast<long>(i)) == Approx(static_cast<double>(e.du[i])).epsilon(1e-6));
}

TEST_CASE("bco: default options reproduce hand-computed values, batch of one", "[bco]") {
  // u = 2, beta 0.1, delta 0: desirable -log sig(0.2) = log(1 + e^-0.2), d/du = -0.1 sig(-0.2).
  Vec<double> P(1), R(1);
  P(0) = -1;
  R(0) = -3;
  Vec<std::uint8_t> D(1);
  D(0) = 1;
  const auto r = pl::bco(P, R, D);
  CHECK(r.loss == Approx(std::log1p(std::exp(-0.2))).epsilon(1e-15));
  Vec<double> g(1);
  r.backward(g);
  CHECK(g(0) == Approx(-0.1 / (1 + std::exp(0.2))).epsilon(1e-15));
  CHECK(r.metrics.delta == 0.0);
  CHECK(r.metrics.count_desirable == 1);
  CHECK(r.metrics.reward_desirable == Approx(0.2).epsilon(1e-15));
  // Undesirable: -log sig(-0.2) = log(1 + e^0.2), d/du = 0.1 sig(0.2).
  D(0) = 0;
  const auto q = pl::bco(P, R, D);
  CHECK(q.loss == Approx(std::log1p(std::exp(0.2))).epsilon(1e-15));
  q.backward(g);
  CHECK(g(0) == Approx(0.1 / (1 + std::exp(-0.2))).epsilon(1e-15));
  CHECK(q.metrics.count_undesirable == 1);
  CHECK(q.metrics.reward_undesirable_sum == Approx(0.2).epsilon(1e-15));
  // At r == delta both classes give log 2.
  pl::BcoOptions o;
  o.delta = 0.2;
  CHECK(pl::bco(P, R, D, o).loss == Approx(std::log(2.0)).epsilon(1e-15));
}

TEST_CASE("bco: all-desirable and all-undesirable batches", "[bco]") {
  const std::vector<double> s = {-1.0, -2.0, -0.3}, rho = {-1.2, -1.0, -0.3};
  pl::BcoOptions o;
  o.beta = 0.4;
  o.delta = -0.05;
  for (int cls : {0, 1}) {
    const std::vector<int> d(3, cls);
    const Expected e = expected_bco(lds(s), lds(rho), d, 0.4L, -0.05L);
    const auto r = pl::bco(vec<double>(s), vec<double>(rho), labels(d), o);
    CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
    CHECK(r.metrics.count_desirable == (cls ? 3 : 0));
    CHECK(r.metrics.count_undesirable == (cls ? 0 : 3));
    const double reward_sum = 0.4 * (0.2 - 1.0 + 0.0);
    if (cls) {
      CHECK(r.metrics.reward_undesirable == 0.0);
      CHECK(r.metrics.reward_undesirable_sum == 0.0);
      CHECK(r.metrics.reward_desirable_sum == Approx(reward_sum).epsilon(1e-14));
      CHECK(r.metrics.reward_margin == Approx(reward_sum / 3).epsilon(1e-14));
    } else {
      CHECK(r.metrics.reward_desirable == 0.0);
      CHECK(r.metrics.reward_undesirable_sum == Approx(reward_sum).epsilon(1e-14));
      CHECK(r.metrics.reward_margin == Approx(-reward_sum / 3).epsilon(1e-14));
    }
    Vec<double> g(3);
    r.backward(g);
    for (int i = 0; i < 3; ++i)
      CHECK(g(i) == Approx(static_cast<double>(e.du[static_cast<std::size_t>(i)])).epsilon(1e-13));
  }
}

TEST_CASE("bco: example weights scale each loss and gradient, the mean still over all examples", "[bco]") {
  const std::vector<double> s = {-1.0, -2.0, -3.0, -0.7}, rho = {-1.5, -1.0, -2.0, -0.7};
  const std::vector<int> d = {1, 0, 0, 1};
  const std::vector<double> w = {1.0, 2.5, 0.0, 1.0};  // UDM-like: 1 for desirable
  pl::BcoOptions o;
  o.beta = 0.3;
  o.delta = 0.1;
  o.example_weights = w;
  const Expected e = expected_bco(lds(s), lds(rho), d, 0.3L, 0.1L, lds(w));
  const auto r = pl::bco(vec<double>(s), vec<double>(rho), labels(d), o);
  CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
  CHECK(r.losses(2) == 0.0);
  Vec<double> g(4);
  r.backward(g);
  CHECK(g(2) == 0.0);
  for (int i = 0; i < 4; ++i)
    CHECK(g(i) == Approx(static_cast<double>(e.du[static_cast<std::size_t>(i)])).epsilon(1e-13).margin(1e-300));
  // The metrics do not depend on the weights (TRL's rewards are unweighted).
  pl::BcoOptions ou = o;
  ou.example_weights.clear();
  const auto u = pl::bco(vec<double>(s), vec<double>(rho), labels(d), ou);
  CHECK(u.metrics.reward_undesirable_sum == r.metrics.reward_undesirable_sum);
  CHECK(u.losses(1) * 2.5 == Approx(r.losses(1)).epsilon(1e-15));
}

TEST_CASE("bco: token-level gradients match central finite differences (double)", "[bco][fd]") {
  const long B = 6, T = 7;
  const TokenSet pol = tokens(B, T, 31, 2);  // row 2 empty: value 0, gradient 0
  const Tok<double> refx = ref_tokens(pol, 32);
  const std::vector<int> d = {1, 0, 1, 1, 0, 0};
  const auto D = labels(d);
  for (const bool weighted : {false, true}) {
    pl::BcoOptions o;
    o.beta = 0.7;  // large enough that the log-sigmoid is far from linear
    o.delta = -0.3;
    if (weighted) o.example_weights = {1.0, 0.5, 1.0, 1.0, 3.0, 10.0};
    const auto loss_at = [&](const Tok<double>& x) {
      return pl::bco(pl::masked_sum(x, pol.m), pl::masked_sum(refx, pol.m), D, o).loss;
    };
    const auto r = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, o);
    const Expected e =
        expected_bco(row_sums(pol.x, pol.m), row_sums(refx, pol.m), d, 0.7L, -0.3L, lds(o.example_weights));
    CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-13));
    REQUIRE(std::isfinite(r.loss));

    Tok<double> g(B, T);
    g.setConstant(123.0);
    r.backward(g);
    // The fused form writes the same bits.
    Tok<double> gf(B, T);
    gf.setConstant(-5.0);
    const auto rf = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, o, gf);
    CHECK(rf.loss == r.loss);
    const double h = 1e-6;
    double worst = 0;
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T; ++t) {
        CHECK(gf(i, t) == g(i, t));
        if (!pol.m(i, t)) {
          CHECK(g(i, t) == 0.0);  // masked-out (NaN/-inf padded) tokens get exactly 0
          continue;
        }
        Tok<double> xp = pol.x, xm = pol.x;
        xp(i, t) += h;
        xm(i, t) -= h;
        const double fd = (loss_at(xp) - loss_at(xm)) / (2 * h);
        worst = std::max(worst, std::fabs(fd - g(i, t)));
        CHECK(g(i, t) == Approx(static_cast<double>(e.du[static_cast<std::size_t>(i)])).epsilon(1e-12));
      }
    INFO("max |fd - grad| = " << worst);
    CHECK(worst < 1e-9);
  }
}

TEST_CASE("bco: masked_mean inputs and float tokens agree with double", "[bco]") {
  const long B = 5, T = 9;
  const TokenSet pol = tokens(B, T, 41, 3);
  const Tok<double> refx = ref_tokens(pol, 42);
  const auto D = labels({0, 1, 1, 0, 1});
  pl::BcoOptions o;
  o.beta = 0.3;
  o.delta = 0.02;
  const auto rd = pl::bco(pl::masked_mean(pol.x, pol.m), pl::masked_mean(refx, pol.m), D, o);
  const Tok<float> pf = pol.x.cast<float>(), rf = refx.cast<float>();
  const auto rfl = pl::bco(pl::masked_mean(pf, pol.m), pl::masked_mean(rf, pol.m), D, o);
  CHECK(rfl.loss == Approx(rd.loss).epsilon(1e-6));
  Tok<double> gd(B, T);
  Tok<float> gf(B, T);
  rd.backward(gd);
  rfl.backward(gf);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(gf(i, t) == Approx(gd(i, t)).epsilon(1e-6).margin(1e-9));
      if (!pol.m(i, t)) CHECK(gd(i, t) == 0.0);
    }
  for (long t = 0; t < T; ++t) CHECK(gd(3, t) == 0.0);  // row 3 is empty
  // Closed form on the masked means.
  std::vector<ld> ms, mr;
  const auto rs = row_sums(pol.x, pol.m), rr = row_sums(refx, pol.m);
  for (long i = 0; i < B; ++i) {
    ld n = 0;
    for (long t = 0; t < T; ++t) n += pol.m(i, t);
    ms.push_back(n > 0 ? rs[static_cast<std::size_t>(i)] / n : 0);
    mr.push_back(n > 0 ? rr[static_cast<std::size_t>(i)] / n : 0);
  }
  const Expected e = expected_bco(ms, mr, {0, 1, 1, 0, 1}, 0.3L, 0.02L);
  CHECK(rd.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-13));
}

TEST_CASE("bco: huge |r - delta| stays finite (stable log-sigmoid), float and double", "[bco]") {
  // x = b u - delta = +-1e4 and +-800 (exp(800) overflows double; exp(100) overflows float).
  const std::vector<double> s = {-1.0, -1.0, -1.0, -1.0, -1.0, -1.0}, rho = {-101.0, 99.0, -101.0, 99.0, 7.0, -9.0};
  const std::vector<int> d = {1, 1, 0, 0, 1, 0};
  pl::BcoOptions o;
  o.beta = 100.0;
  o.delta = 0.0;  // x = 1e4, -1e4, 1e4, -1e4, -800, 800
  const Expected e = expected_bco(lds(s), lds(rho), d, 100.0L, 0.0L);
  // Desirable at x = -1e4: loss 1e4, gradient -b/n; undesirable at x = 1e4 the same.
  REQUIRE(e.losses[1] == Approx(1e4L));
  const auto check = [&](auto z) {
    using T = decltype(z);
    const auto r = pl::bco(vec<T>(s), vec<T>(rho), labels(d), o);
    REQUIRE(std::isfinite(r.loss));
    CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(sizeof(T) == 4 ? 1e-6 : 1e-14));
    Vec<T> g(6);
    r.backward(g);
    for (long i = 0; i < 6; ++i) {
      const std::size_t k = static_cast<std::size_t>(i);
      CHECK(std::isfinite(r.losses(i)));
      CHECK(std::isfinite(g(i)));
      CHECK(r.losses(i) == Approx(static_cast<double>(e.losses[k])).epsilon(sizeof(T) == 4 ? 1e-6 : 1e-14));
      CHECK(g(i) == Approx(static_cast<double>(e.du[k])).epsilon(sizeof(T) == 4 ? 1e-6 : 1e-14));
    }
    CHECK(r.losses(0) >= 0);  // -logsig(1e4) = e^-1e4 underflows to 0: never negative
    CHECK(g(0) == 0);         // -b sig(-1e4): underflows to (-)0
    CHECK(r.losses(4) == Approx(800.0).epsilon(1e-7));
    CHECK(g(4) == Approx(-100.0 / 6).epsilon(1e-7));
  };
  check(float{});
  check(double{});
  // A huge delta too.
  o.beta = 1;
  o.delta = 1e300;
  const auto r = pl::bco(vec<double>({-1.0}), vec<double>({-1.0}), labels({1}), o);
  CHECK(r.loss == 1e300);
  CHECK(r.metrics.delta == 1e300);
}

TEST_CASE("bco: NaN/-inf padding never reaches the outputs", "[bco]") {
  const long B = 3, T = 5;
  Tok<double> x(B, T), xr(B, T), clean(B, T), cleanr(B, T);
  Tok<std::uint8_t> m(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool on = t <= i + 1;
      m(i, t) = on;
      clean(i, t) = on ? -0.1 * static_cast<double>(i + t + 1) : 0.0;
      cleanr(i, t) = on ? -0.12 * static_cast<double>(i + t + 1) : 0.0;
      x(i, t) = on ? clean(i, t) : std::numeric_limits<double>::quiet_NaN();
      xr(i, t) = on ? cleanr(i, t) : -std::numeric_limits<double>::infinity();
    }
  const auto D = labels({1, 0, 1});
  pl::BcoOptions o;
  o.delta = 0.01;
  const auto a = pl::bco(pl::masked_sum(x, m), pl::masked_sum(xr, m), D, o);
  const auto b = pl::bco(pl::masked_sum(clean, m), pl::masked_sum(cleanr, m), D, o);
  REQUIRE(std::isfinite(a.loss));
  CHECK(a.loss == b.loss);
  CHECK(a.metrics.reward_desirable_sum == b.metrics.reward_desirable_sum);
  CHECK(a.metrics.logps_undesirable_sum == b.metrics.logps_undesirable_sum);
  Tok<double> ga(B, T), gb(B, T);
  ga.setConstant(std::numeric_limits<double>::quiet_NaN());
  a.backward(ga);
  b.backward(gb);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(std::isfinite(ga(i, t)));
      CHECK(ga(i, t) == gb(i, t));
    }
  // bco_rewards reads only the valid tokens too.
  const Vec<double> ra = pl::bco_rewards(pl::masked_sum(x, m), pl::masked_sum(xr, m), o);
  const Vec<double> rb = pl::bco_rewards(pl::masked_sum(clean, m), pl::masked_sum(cleanr, m), o);
  for (long i = 0; i < B; ++i) {
    CHECK(std::isfinite(ra(i)));
    CHECK(ra(i) == rb(i));
  }
}

TEST_CASE("bco: batch_count shards add up to the whole batch; metric sums merge", "[bco][sharding]") {
  const long B = 6, T = 5;
  const TokenSet pol = tokens(B, T, 51, 4);
  const Tok<double> refx = ref_tokens(pol, 52);
  const std::vector<int> d = {1, 0, 0, 1, 1, 0};
  pl::BcoOptions o;
  o.beta = 0.6;
  o.delta = 0.15;
  o.example_weights = {1, 2, 0.5, 1, 1, 4};
  const auto whole = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), labels(d), o);
  Tok<double> gw(B, T);
  whole.backward(gw);

  // Halves [0, 3) and [3, 6), each divided by the global batch.
  const long H = 3;
  double loss = 0;
  pl::MetricSums<pl::BcoMetrics<double>> merged;
  for (long part = 0; part < 2; ++part) {
    Tok<double> x(H, T), xr(H, T);
    Tok<std::uint8_t> m(H, T);
    std::vector<int> dh;
    pl::BcoOptions oh = o;
    oh.example_weights.clear();
    for (long i = 0; i < H; ++i) {
      const long src = part * H + i;
      for (long t = 0; t < T; ++t) {
        x(i, t) = pol.x(src, t);
        xr(i, t) = refx(src, t);
        m(i, t) = pol.m(src, t);
      }
      dh.push_back(d[static_cast<std::size_t>(src)]);
      oh.example_weights.push_back(o.example_weights[static_cast<std::size_t>(src)]);
    }
    oh.batch_count = static_cast<double>(B);
    const auto r = pl::bco(pl::masked_sum(x, m), pl::masked_sum(xr, m), labels(dh), oh);
    loss += r.loss;
    merged += r.metric_sums;
    Tok<double> g(H, T);
    r.backward(g);
    for (long i = 0; i < H; ++i)
      for (long t = 0; t < T; ++t) CHECK(g(i, t) == gw(part * H + i, t));  // same scale, same bits
    for (long i = 0; i < H; ++i) CHECK(r.losses(i) == whole.losses(part * H + i));
  }
  CHECK(loss == Approx(whole.loss).epsilon(1e-15));
  const auto mm = merged.metrics();
  CHECK(mm.delta == whole.metrics.delta);
  CHECK(mm.count_desirable == whole.metrics.count_desirable);
  CHECK(mm.count_undesirable == whole.metrics.count_undesirable);
  CHECK(mm.reward_desirable_sum == Approx(whole.metrics.reward_desirable_sum).epsilon(1e-15));
  CHECK(mm.reward_undesirable == Approx(whole.metrics.reward_undesirable).epsilon(1e-15));
  CHECK(mm.logps_desirable_sum == Approx(whole.metrics.logps_desirable_sum).epsilon(1e-15));
  CHECK(whole.metric_sums.metrics().reward_margin == whole.metrics.reward_margin);

  // An empty shard is allowed with batch_count: it contributes 0 and keeps its delta.
  pl::BcoOptions oe;
  oe.batch_count = 4.0;
  oe.delta = 0.5;
  const Vec<double> none(0);
  const auto empty = pl::bco(none, none, labels({}), oe);
  CHECK(empty.loss == 0.0);
  CHECK(empty.metrics.delta == 0.5);
  CHECK(empty.metrics.count_desirable == 0);
}

TEST_CASE("bco: a thread pool gives the same bits", "[bco][threads]") {
  const long B = 37, T = 11;
  const TokenSet pol = tokens(B, T, 61, 5);
  const Tok<double> refx = ref_tokens(pol, 62);
  std::vector<int> d;
  for (long i = 0; i < B; ++i) d.push_back(static_cast<int>((i * 7) % 3 == 0));
  const auto D = labels(d);
  pl::BcoOptions o;
  o.beta = 0.2;
  o.delta = 0.05;
  const auto r0 = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, o);
  Tok<double> g0(B, T);
  r0.backward(g0);
  const Vec<double> w0 = pl::bco_rewards(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), o);
  pl::ThreadPool pool(3);
  o.threads = pool;
  const auto r1 = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, o);
  Tok<double> g1(B, T), g2(B, T);
  r1.backward(g1);
  const auto r2 = pl::bco(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, o, g2);
  const Vec<double> w1 = pl::bco_rewards(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), o);
  CHECK(r1.loss == r0.loss);
  CHECK(r2.loss == r0.loss);
  CHECK(r1.metrics.reward_desirable_sum == r0.metrics.reward_desirable_sum);
  for (long k = 0; k < g0.size(); ++k) {
    CHECK(g1.data()[k] == g0.data()[k]);
    CHECK(g2.data()[k] == g0.data()[k]);
  }
  for (long i = 0; i < B; ++i) CHECK(w1(i) == w0(i));
}

TEST_CASE("bco: TRL's order, running moments updated with this batch's rewards, then the loss", "[bco]") {
  const std::vector<double> s = {-1.0, -2.5, -0.5, -3.0}, rho = {-1.4, -2.0, -1.5, -2.2};
  const std::vector<int> d = {1, 0, 1, 0};
  pl::BcoOptions o;
  o.beta = 0.25;
  const auto P = vec<double>(s), R = vec<double>(rho);
  const Vec<double> rw = pl::bco_rewards(P, R, o);
  REQUIRE(rw.dimension(0) == 4);
  std::vector<double> expect_r;
  for (std::size_t i = 0; i < 4; ++i) {
    expect_r.push_back(0.25 * (s[i] - rho[i]));
    CHECK(rw(static_cast<long>(i)) == Approx(expect_r.back()).epsilon(1e-15));
  }
  // The rewards bco() reports are the same values.
  pl::RunningMoments running;
  TrlMoments trl;
  running.update(rw);
  trl.update(expect_r);
  CHECK(running.mean() == Approx(static_cast<double>(trl.mean)).epsilon(1e-15));
  o.delta = running.mean();
  const auto r = pl::bco(P, R, labels(d), o);
  CHECK(r.metrics.reward_desirable_sum == rw(0) + rw(2));
  CHECK(r.metrics.reward_undesirable_sum == rw(1) + rw(3));
  const Expected e = expected_bco(lds(s), lds(rho), d, 0.25L, trl.mean);
  CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
  CHECK(r.metrics.delta == running.mean());
}

TEST_CASE("bco: bad input throws naming the argument, and writes nothing", "[bco][errors]") {
  const auto P = vec<double>({-1, -2, -3}), R = vec<double>({-1, -1, -1});
  const auto D = labels({1, 0, 1});
  const auto with = [&](auto set) {
    pl::BcoOptions o;
    set(o);
    return [o, &P, &R, &D] { (void)pl::bco(P, R, D, o); };
  };
  const double inf = std::numeric_limits<double>::infinity();
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) { o.beta = 0; }), "bco", {"'beta'", "got 0"});
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) { o.beta = -0.1; }), "bco", {"'beta'", "got -0.1"});
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) { o.beta = std::nan(""); }), "bco", {"'beta'", "nan"});
  expect_throw<pl::option_error>(with([&](pl::BcoOptions& o) { o.beta = inf; }), "bco", {"'beta'", "inf"});
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) { o.delta = std::nan(""); }), "bco",
                                 {"'delta'", "finite", "nan"});
  expect_throw<pl::option_error>(with([&](pl::BcoOptions& o) { o.delta = -inf; }), "bco", {"'delta'", "-inf"});
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) {
                                   o.example_weights = {1, -1, 1};
                                 }),
                                 "bco", {"'example_weights'", "got -1", "index 1"});
  expect_throw<pl::option_error>(with([&](pl::BcoOptions& o) {
                                   o.example_weights = {1, 1, inf};
                                 }),
                                 "bco", {"'example_weights'", "inf", "index 2"});
  expect_throw<pl::shape_error>(with([](pl::BcoOptions& o) {
                                  o.example_weights = {1, 1};
                                }),
                                "bco", {"'example_weights'", "2 weights", "batch 3"});
  expect_throw<pl::option_error>(with([](pl::BcoOptions& o) { o.batch_count = 2.0; }), "bco", {"'batch_count'"});

  const auto R2 = vec<double>({-1, -1});
  expect_throw<pl::shape_error>([&] { (void)pl::bco(P, R2, D); }, "bco", {"'ref'", "but 'policy' has batch 3"});
  const auto D4 = labels({1, 0, 1, 1});
  expect_throw<pl::shape_error>([&] { (void)pl::bco(P, R, D4); }, "bco", {"'desirable'", "batch 4"});
  const Vec<double> none(0);
  expect_throw<pl::shape_error>([&] { (void)pl::bco(none, none, labels({})); }, "bco", {"'policy'", "empty"});
  expect_throw<pl::shape_error>([&] { (void)pl::bco_rewards(P, R2); }, "bco_rewards", {"'ref'"});
  pl::BcoOptions bad_beta;
  bad_beta.beta = -1;
  expect_throw<pl::option_error>([&] { (void)pl::bco_rewards(P, R, bad_beta); }, "bco_rewards", {"'beta'"});

  // The fused form: every check before anything is written.
  Vec<double> g(3);
  g.setConstant(7.0);
  pl::BcoOptions bad;
  bad.delta = std::nan("");
  expect_throw<pl::option_error>([&] { (void)pl::bco(P, R, D, bad, g); }, "bco", {"'delta'"});
  expect_throw<pl::shape_error>([&] { (void)pl::bco(P, R2, D, pl::BcoOptions{}, g); }, "bco", {"'ref'"});
  for (long k = 0; k < 3; ++k) CHECK(g(k) == 7.0);
  Vec<double> g2(2);
  g2.setConstant(7.0);
  expect_throw<pl::shape_error>([&] { (void)pl::bco(P, R, D, pl::BcoOptions{}, g2); }, "bco", {"'grad_policy'"});
  CHECK(g2(0) == 7.0);
  CHECK(g2(1) == 7.0);
  // A gradient over an input is refused.
  Vec<double> Pc = P;
  expect_throw<pl::layout_error>([&] { (void)pl::bco(Pc, R, D, pl::BcoOptions{}, Pc); }, "bco",
                                 {"'grad_policy'", "'policy'"});
  CHECK(Pc(0) == -1.0);
  CHECK(Pc(2) == -3.0);

  // A token-level result refuses a gradient of the wrong shape and leaves it untouched.
  Tok<double> x(3, 4);
  x.setConstant(-0.5);
  Tok<std::uint8_t> m(3, 4);
  m.setConstant(1);
  const auto r = pl::bco(pl::masked_sum(x, m), R, D);
  Tok<double> wrong(3, 5);
  wrong.setConstant(7.0);
  expect_throw<pl::shape_error>([&] { r.backward(wrong); }, "bco", {"'grad_policy'"});
  for (long k = 0; k < wrong.size(); ++k) CHECK(wrong.data()[k] == 7.0);
}

// ---- RunningMoments --------------------------------------------------------------------------

TEST_CASE("RunningMoments: TRL's start and formula sequence", "[running_moments]") {
  pl::RunningMoments rm;
  CHECK(rm.mean() == 0.0);
  CHECK(rm.var() == 1.0);
  CHECK(rm.std() == 1.0);
  CHECK(rm.count() == 1e-24);

  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.4, 1.7);
  TrlMoments trl;
  for (const long n : {5L, 1L, 12L, 3L, 64L}) {
    std::vector<double> xs;
    for (long i = 0; i < n; ++i) xs.push_back(nd(rng));
    const auto got = rm.update(xs);
    const auto want = trl.update(xs);
    INFO("batch of " << n);
    CHECK(got.mean == Approx(static_cast<double>(want.first)).epsilon(1e-14));
    if (n == 1) {
      CHECK(std::isnan(got.std));  // sqrt(0 * 1 / 0), as torch
    } else {
      CHECK(got.std == Approx(static_cast<double>(want.second)).epsilon(1e-13));
    }
    CHECK(rm.mean() == Approx(static_cast<double>(trl.mean)).epsilon(1e-13));
    CHECK(rm.var() == Approx(static_cast<double>(trl.var)).epsilon(1e-13));
    CHECK(rm.std() == Approx(static_cast<double>(trl.std)).epsilon(1e-13));
    CHECK(rm.count() == Approx(static_cast<double>(trl.count)).epsilon(1e-15));
  }
  CHECK(rm.count() == 85.0);
}

TEST_CASE("RunningMoments: agrees with a direct two-pass computation over the whole stream", "[running_moments]") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> ud(-3.0, 5.0);
  pl::RunningMoments rm;
  std::vector<double> all;
  for (const long n : {7L, 2L, 30L, 9L}) {
    Vec<float> xs(n);  // float batches (an Eigen tensor); moments in double
    for (long i = 0; i < n; ++i) {
      xs(i) = static_cast<float>(ud(rng));
      all.push_back(xs(i));
    }
    rm.update(xs);
  }
  // Two passes in double over the 48 values: the start's weight 1e-24 is far below rounding.
  const double N = static_cast<double>(all.size());
  double sum = 0;
  for (double x : all) sum += x;
  const double mean = sum / N;
  double ss = 0;
  for (double x : all) ss += (x - mean) * (x - mean);
  CHECK(rm.mean() == Approx(mean).epsilon(1e-13));
  CHECK(rm.var() == Approx(ss / N).epsilon(1e-13));
  CHECK(rm.std() == Approx(std::sqrt(ss / (N - 1))).epsilon(1e-13));
  CHECK(rm.count() == N);
}

TEST_CASE("RunningMoments: global statistics of shards give the moments of the whole batch", "[running_moments]") {
  // TRL's get_global_statistics: all-reduce sum and count, then the squared deviations from the
  // global mean; update_from_moments with them equals update on the concatenated batch.
  const std::vector<double> a = {0.5, -1.25, 2.0, 0.125}, b = {3.0, -0.5, 1.5};
  std::vector<double> ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  double sum = 0;
  for (double x : ab) sum += x;
  const double n = 7, mean = sum / n;
  double ss = 0;
  for (double x : a) ss += (x - mean) * (x - mean);  // rank 0's share
  for (double x : b) ss += (x - mean) * (x - mean);  // rank 1's share
  pl::RunningMoments sharded(0.2, 0.9, std::sqrt(0.9 * 10 / 9), 10.0), whole = sharded;
  const auto sg = sharded.update_from_moments(mean, ss / n, n);
  const auto wg = whole.update(ab.data(), static_cast<pl::Index>(ab.size()));
  CHECK(sg.mean == wg.mean);
  CHECK(sg.std == Approx(wg.std).epsilon(1e-15));
  CHECK(sharded.mean() == Approx(whole.mean()).epsilon(1e-15));
  CHECK(sharded.var() == Approx(whole.var()).epsilon(1e-15));
  CHECK(sharded.std() == Approx(whole.std()).epsilon(1e-15));
  CHECK(sharded.count() == 17.0);
  // From a restored state: TRL's formula by hand.
  const double d = mean - 0.2, N = 17;
  const double var = (0.9 * 10 + d * d * 10 * 7 / N + ss) / N;
  CHECK(sharded.mean() == Approx(0.2 + d * 7 / N).epsilon(1e-15));
  CHECK(sharded.var() == Approx(var).epsilon(1e-15));
  CHECK(sharded.std() == Approx(std::sqrt(var * N / (N - 1))).epsilon(1e-15));
}

TEST_CASE("RunningMoments: a first batch of one, and bad input leaves the moments unchanged", "[running_moments]") {
  pl::RunningMoments one;
  const double x = 0.75;
  one.update(&x, 1);
  CHECK(one.mean() == Approx(0.75).epsilon(1e-15));  // 0.75 / (1 + 1e-24)
  CHECK(std::isinf(one.std()));                      // var N / (N - 1) with N == 1.0 in double, as TRL
  CHECK(one.count() == 1.0);

  pl::RunningMoments rm(0.5, 2.0, 1.5, 8.0);
  const std::vector<double> nan_batch = {1.0, std::nan(""), 2.0};
  expect_throw<pl::value_error>([&] { rm.update(nan_batch); }, "RunningMoments::update", {"'xs'", "nan", "index 1"});
  const std::vector<float> inf_batch = {1.0f, -std::numeric_limits<float>::infinity()};
  expect_throw<pl::value_error>([&] { rm.update(inf_batch); }, "RunningMoments::update", {"'xs'", "-inf"});
  const std::vector<double> empty;
  expect_throw<pl::shape_error>([&] { rm.update(empty); }, "RunningMoments::update", {"'xs'", "empty"});
  expect_throw<pl::option_error>([&] { rm.update_from_moments(std::nan(""), 1, 2); },
                                 "RunningMoments::update_from_moments", {"'batch_mean'"});
  expect_throw<pl::option_error>([&] { rm.update_from_moments(0, -1, 2); }, "RunningMoments::update_from_moments",
                                 {"'batch_var'", "got -1"});
  expect_throw<pl::option_error>([&] { rm.update_from_moments(0, 1, 0); }, "RunningMoments::update_from_moments",
                                 {"'batch_count'", "got 0"});
  CHECK(rm.mean() == 0.5);
  CHECK(rm.var() == 2.0);
  CHECK(rm.std() == 1.5);
  CHECK(rm.count() == 8.0);
  expect_throw<pl::option_error>([] { pl::RunningMoments bad(0, -1, 1, 1); }, "RunningMoments", {"'var'"});
  expect_throw<pl::option_error>([] { pl::RunningMoments bad(0, 1, 1, 0); }, "RunningMoments", {"'count'"});
  expect_throw<pl::option_error>([] { pl::RunningMoments bad(std::nan(""), 1, 1, 1); }, "RunningMoments", {"'mean'"});
  expect_throw<pl::option_error>([] { pl::RunningMoments bad(0, 1, -1, 1); }, "RunningMoments", {"'std'"});
}
