// kto(): values against closed forms written from loss/kto.hpp's Doxygen / TRL's kto_loss in long double
// (no prefloss code on the expected side), token gradients against central finite differences
// in double, the reference point (estimated, clamped, given), NaN padding, and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <prefloss/prefloss.hpp>
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

ld sig(ld x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); }

struct Expected {
  ld z0, kl_mean, loss;
  std::vector<ld> losses, du;  // du: d batch loss / d policy value
};

/// TRL's kto_loss: kl = max(0, mean(kl_p - kl_r)), losses = cat(wd (1 - sig(b (u_d - kl))),
/// wu (1 - sig(b (kl - u_u)))), loss = mean; here kept in batch order.
Expected expected_kto(const std::vector<ld>& s, const std::vector<ld>& rho, const std::vector<int>& desirable,
                      const std::vector<ld>& klp, const std::vector<ld>& klr, ld b, ld wd, ld wu,
                      std::optional<ld> rp = std::nullopt) {
  Expected e{};
  ld sum = 0;
  for (std::size_t j = 0; j < klp.size(); ++j) sum += klp[j] - klr[j];
  e.kl_mean = klp.empty() ? 0 : sum / static_cast<ld>(klp.size());
  e.z0 = rp ? *rp : (e.kl_mean > 0 ? e.kl_mean : 0);
  const ld n = static_cast<ld>(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const ld u = s[i] - rho[i];
    ld l, d;
    if (desirable[i]) {
      const ld g = sig(b * (u - e.z0));
      l = wd * (1 - g);
      d = -wd * b * g * (1 - g);
    } else {
      const ld g = sig(b * (e.z0 - u));
      l = wu * (1 - g);
      d = wu * b * g * (1 - g);
    }
    e.losses.push_back(l);
    e.du.push_back(d / n);
    e.loss += l / n;
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

/// Random token log-probs in [-3, 0) with a mask of random lengths; row `empty_row` (if >= 0)
/// selects nothing, and every masked-out token holds NaN or inf (padding).
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

std::vector<ld> row_sums(const TokenSet& s) {
  std::vector<ld> v;
  for (long i = 0; i < s.x.dimension(0); ++i) {
    ld a = 0;
    for (long t = 0; t < s.x.dimension(1); ++t)
      if (s.m(i, t)) a += s.x(i, t);
    v.push_back(a);
  }
  return v;
}

template <class T>
Tok<T> cast(const Tok<double>& x) {
  return x.cast<T>();
}

}  // namespace

TEST_CASE("kto: closed form on [batch] tensors, mixed classes, KL batch of another size", "[kto]") {
  const std::vector<double> s = {-1.0, -2.0, -3.0, -4.0, -0.5}, rho = {-1.5, -1.5, -2.5, -5.0, -0.25};
  const std::vector<int> d = {1, 0, 1, 0, 0};
  const std::vector<double> klp = {-2.0, -3.0, -1.0}, klr = {-2.5, -3.2, -1.3};  // mean 1/3
  pl::KtoOptions o;
  o.beta = 0.5;
  o.desirable_weight = 1.5;
  o.undesirable_weight = 0.75;
  const Expected e = expected_kto(lds(s), lds(rho), d, lds(klp), lds(klr), 0.5L, 1.5L, 0.75L);
  REQUIRE(std::fabs(static_cast<double>(e.z0) - 1.0 / 3.0) < 1e-15);

  const auto P = vec<double>(s), R = vec<double>(rho), KP = vec<double>(klp), KR = vec<double>(klr);
  const auto D = labels(d);
  const auto r = pl::kto(P, R, D, KP, KR, o);
  CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
  REQUIRE(r.losses.dimension(0) == 5);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(r.losses(static_cast<long>(i)) == Approx(static_cast<double>(e.losses[i])).epsilon(1e-14));
  Vec<double> g(5);
  r.backward(g);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(g(static_cast<long>(i)) == Approx(static_cast<double>(e.du[i])).epsilon(1e-13));

  // Metrics: TRL's kl, counts, reward sums and means (rewards are beta * u).
  CHECK(r.metrics.reference_point == Approx(1.0 / 3.0).epsilon(1e-15));
  CHECK(r.metrics.kl_mean == Approx(1.0 / 3.0).epsilon(1e-15));
  CHECK(r.metrics.count_desirable == 2);
  CHECK(r.metrics.count_undesirable == 3);
  CHECK(r.metrics.reward_desirable_sum == Approx(0.5 * (0.5 + -0.5)).margin(1e-15));
  CHECK(r.metrics.reward_undesirable_sum == Approx(0.5 * (-0.5 + 1.0 - 0.25)).epsilon(1e-15));
  CHECK(r.metrics.reward_desirable == Approx(0.0).margin(1e-15));
  CHECK(r.metrics.reward_undesirable == Approx(0.5 * 0.25 / 3).epsilon(1e-14));
  CHECK(r.metrics.reward_margin == Approx(-0.5 * 0.25 / 3).epsilon(1e-14));
  CHECK(r.metrics.logps_desirable_sum == Approx(-4.0));
  CHECK(r.metrics.logps_undesirable_sum == Approx(-6.5));

  // Same in float, and with a bool label tensor.
  Vec<bool> Db(5);
  for (int i = 0; i < 5; ++i) Db(i) = d[static_cast<std::size_t>(i)] != 0;
  const auto rf = pl::kto(vec<float>(s), vec<float>(rho), Db, vec<float>(klp), vec<float>(klr), o);
  CHECK(rf.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-6));
  Vec<float> gf(5);
  rf.backward(gf);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(gf(static_cast<long>(i)) == Approx(static_cast<double>(e.du[i])).epsilon(1e-6));
}

TEST_CASE("kto: default options reproduce a hand-computed value", "[kto]") {
  // One desirable example, u = 2, z0 = max(0, 1 - 0) = 1, beta 0.1: loss = 1 - sig(0.1).
  Vec<double> P(1), R(1), KP(1), KR(1);
  P(0) = -1;
  R(0) = -3;
  KP(0) = -1;
  KR(0) = -2;
  Vec<std::uint8_t> D(1);
  D(0) = 1;
  const auto r = pl::kto(P, R, D, KP, KR);
  const double s01 = 1.0 / (1.0 + std::exp(-0.1));
  CHECK(r.loss == Approx(1.0 - s01).epsilon(1e-15));
  Vec<double> g(1);
  r.backward(g);
  CHECK(g(0) == Approx(-0.1 * s01 * (1 - s01)).epsilon(1e-14));
  // Undesirable: 1 - sig(b (z0 - u)) = 1 - sig(-0.1) = sig(0.1).
  D(0) = 0;
  const auto q = pl::kto(P, R, D, KP, KR);
  CHECK(q.loss == Approx(s01).epsilon(1e-15));
  q.backward(g);
  CHECK(g(0) == Approx(0.1 * s01 * (1 - s01)).epsilon(1e-14));
}

TEST_CASE("kto: all-desirable and all-undesirable batches", "[kto]") {
  const std::vector<double> s = {-1.0, -2.0, -0.3}, rho = {-1.2, -1.0, -0.3};
  const std::vector<double> klp = {-1.0, -2.0}, klr = {-1.5, -2.1};
  for (int cls : {0, 1}) {
    const std::vector<int> d(3, cls);
    const Expected e = expected_kto(lds(s), lds(rho), d, lds(klp), lds(klr), 0.1L, 1.0L, 1.0L);
    const auto r = pl::kto(vec<double>(s), vec<double>(rho), labels(d), vec<double>(klp), vec<double>(klr));
    CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
    CHECK(r.metrics.count_desirable == (cls ? 3 : 0));
    CHECK(r.metrics.count_undesirable == (cls ? 0 : 3));
    // The empty class has mean reward 0 (TRL's nan_to_num for the margin).
    if (cls) {
      CHECK(r.metrics.reward_undesirable == 0.0);
      CHECK(r.metrics.reward_undesirable_sum == 0.0);
      CHECK(r.metrics.reward_margin == Approx(r.metrics.reward_desirable));
    } else {
      CHECK(r.metrics.reward_desirable == 0.0);
      CHECK(r.metrics.reward_margin == Approx(-r.metrics.reward_undesirable));
    }
    Vec<double> g(3);
    r.backward(g);
    for (int i = 0; i < 3; ++i)
      CHECK(g(i) == Approx(static_cast<double>(e.du[static_cast<std::size_t>(i)])).epsilon(1e-13));
  }
}

TEST_CASE("kto: z0 is clamped at 0, and a given reference point replaces the estimate", "[kto]") {
  const std::vector<double> s = {-1.0, -2.0, -3.0}, rho = {-1.1, -1.9, -2.0};
  const std::vector<int> d = {1, 0, 1};
  const std::vector<double> klp = {-3.0, -2.0}, klr = {-2.0, -1.5};  // mean -0.75 -> z0 = 0
  const auto P = vec<double>(s), R = vec<double>(rho), KP = vec<double>(klp), KR = vec<double>(klr);
  const auto D = labels(d);

  const auto r = pl::kto(P, R, D, KP, KR);
  CHECK(r.metrics.reference_point == 0.0);
  CHECK(r.metrics.kl_mean == Approx(-0.75));
  const Expected e0 = expected_kto(lds(s), lds(rho), d, lds(klp), lds(klr), 0.1L, 1, 1);
  CHECK(e0.z0 == 0);
  CHECK(r.loss == Approx(static_cast<double>(e0.loss)).epsilon(1e-14));

  // Given reference point (e.g. all-reduced over ranks): used as given, even when the local
  // estimate differs; the KL inputs then only feed kl_mean.
  pl::KtoOptions o;
  o.reference_point = 0.4;
  const auto q = pl::kto(P, R, D, KP, KR, o);
  CHECK(q.metrics.reference_point == 0.4);
  CHECK(q.metrics.kl_mean == Approx(-0.75));
  const Expected e1 = expected_kto(lds(s), lds(rho), d, lds(klp), lds(klr), 0.1L, 1, 1, 0.4L);
  CHECK(q.loss == Approx(static_cast<double>(e1.loss)).epsilon(1e-14));
  Vec<double> g(3);
  q.backward(g);
  for (int i = 0; i < 3; ++i)
    CHECK(g(i) == Approx(static_cast<double>(e1.du[static_cast<std::size_t>(i)])).epsilon(1e-13));

  // Given == estimated gives bit-identical results; an empty KL batch is fine with a given z0.
  const std::vector<double> klp2 = {-1.0, -2.0}, klr2 = {-1.5, -2.3};  // mean 0.4
  const auto KP2 = vec<double>(klp2), KR2 = vec<double>(klr2);
  const auto est = pl::kto(P, R, D, KP2, KR2);
  pl::KtoOptions o2;
  o2.reference_point = static_cast<double>(est.metrics.reference_point);
  const Vec<double> none(0);
  const auto given = pl::kto(P, R, D, none, none, o2);
  CHECK(given.loss == est.loss);
  for (int i = 0; i < 3; ++i) CHECK(given.losses(i) == est.losses(i));
  CHECK(given.metrics.kl_mean == 0.0);
  // A negative given reference point is not clamped.
  o2.reference_point = -0.5;
  const auto neg = pl::kto(P, R, D, none, none, o2);
  CHECK(neg.metrics.reference_point == -0.5);
  const Expected e2 = expected_kto(lds(s), lds(rho), d, {}, {}, 0.1L, 1, 1, -0.5L);
  CHECK(neg.loss == Approx(static_cast<double>(e2.loss)).epsilon(1e-14));
}

TEST_CASE("kto: token-level gradients match central finite differences (double)", "[kto][fd]") {
  const long B = 5, T = 7, BK = 3, TK = 6;
  TokenSet pol = tokens(B, T, 11, 2);  // row 2 empty: value 0, gradient 0
  const TokenSet ref = tokens(B, T, 12);
  const TokenSet klp = tokens(BK, TK, 13, 1);
  TokenSet klr = tokens(BK, TK, 14);
  // Same masks for reference and policy, as a trainer would have them.
  Tok<double> refx = ref.x;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t)
      if (!pol.m(i, t))
        refx(i, t) = std::numeric_limits<double>::quiet_NaN();
      else if (std::isnan(refx(i, t)) || std::isinf(refx(i, t)))
        refx(i, t) = -1.25;
  klr.m = klp.m;
  for (long i = 0; i < BK; ++i)
    for (long t = 0; t < TK; ++t)
      if (klp.m(i, t) && !std::isfinite(klr.x(i, t))) klr.x(i, t) = -0.75;
  const std::vector<int> d = {1, 0, 1, 1, 0};
  const auto D = labels(d);

  for (const bool given : {false, true}) {
    pl::KtoOptions o;
    o.beta = 0.7;  // large enough that the sigmoid is far from linear
    o.desirable_weight = 1.3;
    o.undesirable_weight = 0.6;
    if (given) o.reference_point = 0.25;
    const auto loss_at = [&](const Tok<double>& x) {
      return pl::kto(pl::masked_sum(x, pol.m), pl::masked_sum(refx, pol.m), D, pl::masked_sum(klp.x, klp.m),
                     pl::masked_sum(klr.x, klr.m), o)
          .loss;
    };
    const auto r = pl::kto(pl::masked_sum(pol.x, pol.m), pl::masked_sum(refx, pol.m), D, pl::masked_sum(klp.x, klp.m),
                           pl::masked_sum(klr.x, klr.m), o);
    // Closed form on the same sequence values.
    TokenSet rs{refx, pol.m};
    const Expected e = expected_kto(row_sums(pol), row_sums(rs), d, row_sums(klp), row_sums(TokenSet{klr.x, klp.m}),
                                    0.7L, 1.3L, 0.6L, given ? std::optional<ld>(0.25L) : std::nullopt);
    CHECK(r.loss == Approx(static_cast<double>(e.loss)).epsilon(1e-13));
    CHECK(std::isfinite(r.loss));

    Tok<double> g(B, T);
    g.setConstant(123.0);
    r.backward(g);
    const double h = 1e-6;
    double worst = 0;
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T; ++t) {
        if (!pol.m(i, t)) {
          CHECK(g(i, t) == 0.0);  // masked-out (NaN/inf padded) tokens get exactly 0
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

TEST_CASE("kto: masked_mean inputs and float tokens agree with double", "[kto]") {
  const long B = 4, T = 9;
  const TokenSet pol = tokens(B, T, 21, 3), klp = tokens(6, 5, 22);
  Tok<double> refx = pol.x;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t)
      if (pol.m(i, t)) refx(i, t) -= 0.1 * static_cast<double>(t % 3);
  Tok<double> klrx = klp.x;
  for (long i = 0; i < 6; ++i)
    for (long t = 0; t < 5; ++t)
      if (klp.m(i, t)) klrx(i, t) -= 0.05;
  const auto D = labels({0, 1, 1, 0});
  pl::KtoOptions o;
  o.beta = 0.3;
  const auto rd = pl::kto(pl::masked_mean(pol.x, pol.m), pl::masked_mean(refx, pol.m), D, pl::masked_mean(klp.x, klp.m),
                          pl::masked_mean(klrx, klp.m), o);
  const Tok<float> pf = cast<float>(pol.x), rf = cast<float>(refx), kf = cast<float>(klp.x), krf = cast<float>(klrx);
  const auto rfl = pl::kto(pl::masked_mean(pf, pol.m), pl::masked_mean(rf, pol.m), D, pl::masked_mean(kf, klp.m),
                           pl::masked_mean(krf, klp.m), o);
  CHECK(rfl.loss == Approx(rd.loss).epsilon(1e-5));
  Tok<double> gd(B, T);
  Tok<float> gf(B, T);
  rd.backward(gd);
  rfl.backward(gf);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(gf(i, t) == Approx(gd(i, t)).epsilon(1e-5).margin(1e-9));
      if (!pol.m(i, t)) CHECK(gd(i, t) == 0.0);
    }
  // Row 3 is empty: masked_mean 0, gradient 0 everywhere in the row.
  for (long t = 0; t < T; ++t) CHECK(gd(3, t) == 0.0);
}

TEST_CASE("kto: NaN/inf padding never reaches the outputs", "[kto]") {
  const long B = 3, T = 5;
  Tok<double> x(B, T), xr(B, T), clean(B, T), cleanr(B, T);
  Tok<std::uint8_t> m(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool on = t <= i + 1;
      m(i, t) = on;
      clean(i, t) = -0.1 * static_cast<double>(i + t + 1);
      cleanr(i, t) = -0.12 * static_cast<double>(i + t + 1);
      x(i, t) = on ? clean(i, t) : std::numeric_limits<double>::quiet_NaN();
      xr(i, t) = on ? cleanr(i, t) : -std::numeric_limits<double>::infinity();
      if (!on) {
        clean(i, t) = 0;
        cleanr(i, t) = 0;
      }
    }
  const auto D = labels({1, 0, 1});
  const auto a = pl::kto(pl::masked_sum(x, m), pl::masked_sum(xr, m), D, pl::masked_sum(xr, m), pl::masked_sum(x, m));
  const auto b = pl::kto(pl::masked_sum(clean, m), pl::masked_sum(cleanr, m), D, pl::masked_sum(cleanr, m),
                         pl::masked_sum(clean, m));
  REQUIRE(std::isfinite(a.loss));
  CHECK(a.loss == b.loss);
  CHECK(a.metrics.reference_point == b.metrics.reference_point);
  Tok<double> ga(B, T), gb(B, T);
  ga.setConstant(std::numeric_limits<double>::quiet_NaN());
  a.backward(ga);
  b.backward(gb);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(std::isfinite(ga(i, t)));
      CHECK(ga(i, t) == gb(i, t));
    }
}

TEST_CASE("kto: bad input throws naming the argument, and writes nothing", "[kto][errors]") {
  const auto P = vec<double>({-1, -2, -3}), R = vec<double>({-1, -1, -1}), KP = vec<double>({-1, -2}),
             KR = vec<double>({-1.5, -2});
  const auto D = labels({1, 0, 1});
  const auto with = [&](auto set) {
    pl::KtoOptions o;
    set(o);
    return [o, &P, &R, &D, &KP, &KR] { (void)pl::kto(P, R, D, KP, KR, o); };
  };
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.beta = 0; }), "kto", {"'beta'"});
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.beta = -0.1; }), "kto", {"'beta'"});
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.beta = std::nan(""); }), "kto", {"'beta'"});
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.desirable_weight = -1; }), "kto",
                                 {"'desirable_weight'"});
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.undesirable_weight = -0.5; }), "kto",
                                 {"'undesirable_weight'"});
  expect_throw<pl::option_error>(
      with([](pl::KtoOptions& o) { o.undesirable_weight = std::numeric_limits<double>::infinity(); }), "kto",
      {"'undesirable_weight'"});
  expect_throw<pl::option_error>(
      with([](pl::KtoOptions& o) { o.reference_point = std::numeric_limits<double>::infinity(); }), "kto",
      {"'reference_point'"});
  expect_throw<pl::option_error>(with([](pl::KtoOptions& o) { o.reference_point = std::nan(""); }), "kto",
                                 {"'reference_point'"});

  const auto R2 = vec<double>({-1, -1});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R2, D, KP, KR); }, "kto", {"'ref'"});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R2, D, KP, KR); }, "kto", {"but 'policy' has batch"});
  const auto D4 = labels({1, 0, 1, 1});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R, D4, KP, KR); }, "kto", {"'desirable'"});
  const auto KR3 = vec<double>({-1, -1, -1});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R, D, KP, KR3); }, "kto", {"'kl_ref'"});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R, D, KP, KR3); }, "kto", {"but 'kl_policy' has batch"});
  const Vec<double> none(0);
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R, D, none, none); }, "kto", {"'kl_policy'"});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(P, R, D, none, none); }, "kto", {"'reference_point'"});
  expect_throw<pl::shape_error>([&] { (void)pl::kto(none, none, labels({}), KP, KR); }, "kto", {"'policy'"});

  // A token-level result refuses a gradient of the wrong shape and leaves it untouched.
  Tok<double> x(3, 4);
  x.setConstant(-0.5);
  Tok<std::uint8_t> m(3, 4);
  m.setConstant(1);
  const auto r = pl::kto(pl::masked_sum(x, m), R, D, KP, KR);
  Tok<double> wrong(3, 5);
  wrong.setConstant(7.0);
  expect_throw<pl::shape_error>([&] { r.backward(wrong); }, "kto", {"'grad_policy'"});
  for (long k = 0; k < wrong.size(); ++k) CHECK(wrong.data()[k] == 7.0);
  const auto rp = pl::kto(P, R, D, KP, KR);
  Vec<double> w2(2);
  w2.setConstant(7.0);
  expect_throw<pl::shape_error>([&] { rp.backward(w2); }, "kto", {"'grad_policy'"});
  CHECK(w2(0) == 7.0);
  CHECK(w2(1) == 7.0);
}

TEST_CASE("kto: zero weight switches a class off", "[kto]") {
  const auto P = vec<double>({-1, -2, -3}), R = vec<double>({-1.5, -1, -2.5}), KP = vec<double>({-1}),
             KR = vec<double>({-1.2});
  const auto D = labels({1, 0, 1});
  pl::KtoOptions o;
  o.undesirable_weight = 0;
  const auto r = pl::kto(P, R, D, KP, KR, o);
  CHECK(r.losses(1) == 0.0);
  Vec<double> g(3);
  r.backward(g);
  CHECK(g(1) == 0.0);
  CHECK(r.loss == Approx((r.losses(0) + r.losses(2)) / 3.0).epsilon(1e-15));
}
