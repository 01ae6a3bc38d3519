// gmpo: values and metrics against a long-double implementation of verl's
// compute_policy_loss_geo_mean, gradients against central finite differences of it, the fused
// form, NaN/inf padding, empty rows, packed = padded, 16-bit inputs, threads, and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <random>
#include <string>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using rlref::ld;
using rlref::Tok;

namespace {

struct GmpoRef {
  ld loss = 0;
  std::vector<ld> rows;
  ld clip = 0, clip_low = 0, approx_kl = 0, weight = 0;
};

/// verl compute_policy_loss_geo_mean, term by term in long double.
GmpoRef gmpo_ref(const rlref::Data& d, const pl::GmpoOptions& o) {
  GmpoRef r;
  const ld lo = -static_cast<ld>(o.clip_low), hi = static_cast<ld>(o.clip_high);
  ld cl = 0, cll = 0, akl = 0;
  for (long i = 0; i < d.B; ++i) {
    ld su = 0, sa = 0, w = 0;
    for (long t = 0; t < d.T; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) continue;
      const ld nak = d.x0[k] - d.x1[k], A = d.x2[k];
      const ld sgn = A > 0 ? 1 : A < 0 ? -1 : 0;
      const ld c = std::min(std::max(nak, lo), hi);
      su += d.w[k] * sgn * std::min(sgn * nak, sgn * c);
      sa += d.w[k] * A;
      w += d.w[k];
      const bool clipped = nak != c;
      cl += d.w[k] * (clipped && A > 0 ? 1 : 0);
      cll += d.w[k] * (clipped && A < 0 ? 1 : 0);
      akl += d.w[k] * -nak;
    }
    const ld den = w + 1e-8L;
    r.rows.push_back(-(sa / den) * std::exp(su / den));
    r.weight += w;
  }
  const ld n = o.sequence_count ? static_cast<ld>(*o.sequence_count) : static_cast<ld>(d.B);
  for (ld& v : r.rows) {
    v /= n;
    r.loss += v;
  }
  r.clip = r.weight != 0 ? cl / r.weight : 0;
  r.clip_low = r.weight != 0 ? cll / r.weight : 0;
  r.approx_kl = r.weight != 0 ? akl / r.weight : 0;
  return r;
}

/// Inputs with one advantage a row (GMPO's setting; verl averages them), token log-ratios
/// >= 1e-3 away from the clip bounds (finite differences stay on one side), poison where masked.
template <class S, class M>
struct Case {
  Tok<S> lp, old, adv;
  Tok<M> mask;
  Case(long B, long T, unsigned seed, const pl::GmpoOptions& o, std::vector<long> empty = {})
      : lp(B, T), old(B, T), adv(B, T), mask(B, T) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> old_d(-4.0, -0.05);
    std::normal_distribution<double> ratio_d(0.0, 0.3), adv_d(0.0, 1.0);
    long k = 0;
    for (long i = 0; i < B; ++i) {
      double a;
      do a = adv_d(rng);
      while (std::fabs(a) < 0.05);
      for (long t = 0; t < T; ++t, ++k) {
        M m = rlref::random_mask<M>(rng, 0.75);
        for (long e : empty)
          if (e == i) m = M(0);
        mask(i, t) = m;
        double dl;
        do dl = ratio_d(rng);
        while (std::fabs(dl + o.clip_low) < 1e-3 || std::fabs(dl - o.clip_high) < 1e-3);
        const double ol = old_d(rng);
        old(i, t) = static_cast<S>(ol);
        lp(i, t) = static_cast<S>(ol + dl);
        adv(i, t) = static_cast<S>(a);
        if (m == M(0)) {
          lp(i, t) = rlref::poison<S>(k);
          old(i, t) = rlref::poison<S>(k + 1);
          adv(i, t) = rlref::poison<S>(k + 2);
        }
      }
    }
  }
  rlref::Data data() const { return rlref::to_data(lp, old, adv, mask, static_cast<const Tok<S>*>(nullptr)); }
};

double g_fd_double = 0, g_fd_float = 0;

template <class S, class M>
void full_check(long B, long T, unsigned seed, const pl::GmpoOptions& o, std::vector<long> empty = {}) {
  CAPTURE(sizeof(S), sizeof(M), B, T, seed, o.clip_low, o.clip_high);
  const Case<S, M> c(B, T, seed, o, empty);
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-13;
  const auto r = pl::gmpo(c.lp, c.old, c.adv, c.mask, o);
  rlref::Data d = c.data();
  const GmpoRef e = gmpo_ref(d, o);
  ld scale = 0;
  for (const ld v : e.rows) scale += std::fabs(v);
  CHECK(std::fabs(static_cast<ld>(r.loss) - e.loss) <= tol * (scale + 1e-300L));
  for (long i = 0; i < B; ++i)
    CHECK(std::fabs(static_cast<ld>(r.losses(i)) - e.rows[static_cast<std::size_t>(i)]) <=
          tol * (std::fabs(e.rows[static_cast<std::size_t>(i)]) + 1e-300L));
  CHECK(std::fabs(static_cast<ld>(r.metrics.clip_fraction) - e.clip) <= tol);
  CHECK(std::fabs(static_cast<ld>(r.metrics.clip_fraction_low) - e.clip_low) <= tol);
  CHECK(std::fabs(static_cast<ld>(r.metrics.approx_kl) - e.approx_kl) <= tol * (1 + std::fabs(e.approx_kl)));
  CHECK(std::fabs(static_cast<ld>(r.metrics.token_weight) - e.weight) <=
        tol * e.weight);  // float lanes: <= 4.2e-7 relative

  Tok<S> g(B, T), gf(B, T);
  g.setConstant(S(7));
  gf.setConstant(S(7));
  r.backward(g);
  const auto fd = rlref::token_fd_error(d, g, [&](const rlref::Data& x) { return gmpo_ref(x, o).loss; });
  CHECK(fd.masked_zero);
  CHECK(fd.rel <= (std::is_same_v<S, float> ? 2e-6 : 1e-9));
  double& worst = std::is_same_v<S, float> ? g_fd_float : g_fd_double;
  worst = std::max(worst, fd.rel);
  // Fused: the same bits (gmpo's row scale 1/B needs no mask sum first).
  const auto rf = pl::gmpo(c.lp, c.old, c.adv, c.mask, o, gf);
  CHECK(rf.loss == r.loss);
  for (long i = 0; i < B; ++i) CHECK(rf.losses(i) == r.losses(i));
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) CHECK(gf(i, t) == g(i, t));
}

}  // namespace

TEST_CASE("gmpo matches verl's compute_policy_loss_geo_mean and finite differences", "[gmpo]") {
  unsigned seed = 1;
  for (const auto& clips : {std::pair<double, double>{0.2, 0.2}, {0.4, 0.4}, {0.1, 0.3}, {0.0, 0.05}}) {
    pl::GmpoOptions o;
    o.clip_low = clips.first;
    o.clip_high = clips.second;
    for (const long T : {1L, 7L, 16L, 37L, 200L}) {
      full_check<double, std::uint8_t>(4, T, seed++, o);
      full_check<double, double>(3, T, seed++, o);
      full_check<double, bool>(2, T, seed++, o);
      full_check<float, std::uint8_t>(4, T, seed++, o);
      full_check<float, float>(2, T, seed++, o);
    }
  }
  std::printf("gmpo: max |grad - FD| / max|grad|: double %.3g, float %.3g\n", g_fd_double, g_fd_float);
}

TEST_CASE("gmpo: a closed form, and the clip acts on each token's log-ratio inside the mean", "[gmpo]") {
  // One row, A = 2 on tokens with log-ratios 0.1, 0.5, -0.6 (clip 0.2 / 0.2): A > 0 keeps
  // min(d, clamp(d)) = 0.1, 0.2, -0.6, so rho = exp(-0.3 / 3); a masked NaN token is skipped.
  Tok<double> lp(1, 4), old(1, 4), adv(1, 4);
  Tok<std::uint8_t> m(1, 4);
  const double d[4] = {0.1, 0.5, std::numeric_limits<double>::quiet_NaN(), -0.6};
  for (long t = 0; t < 4; ++t) {
    old(0, t) = -1.0;
    lp(0, t) = -1.0 + d[t];
    adv(0, t) = 2.0;
    m(0, t) = t != 2;
  }
  Tok<double> g(1, 4);
  const auto r = pl::gmpo(lp, old, adv, m, pl::GmpoOptions{}, g);
  const double den = 3 + 1e-8, rho = std::exp((0.1 + 0.2 - 0.6) / den), abar = 6 / den;
  CHECK(std::fabs(r.loss - (-abar * rho)) <= 1e-15);
  CHECK(std::fabs(g(0, 0) - (-abar * rho / den)) <= 1e-15);
  CHECK(g(0, 1) == 0.0);  // clipped from above with A > 0
  CHECK(g(0, 2) == 0.0);
  CHECK(std::fabs(g(0, 3) - (-abar * rho / den)) <= 1e-15);
  CHECK(std::fabs(r.metrics.clip_fraction - 2.0 / 3) <= 1e-15);  // 0.5 and -0.6 lie outside
  CHECK(r.metrics.clip_fraction_low == 0.0);
  // A < 0 keeps max(d, clamp(d)) = 0.1, 0.5, -0.2: the same tokens, the other side.
  adv.setConstant(-2.0);
  const auto q = pl::gmpo(lp, old, adv, m, pl::GmpoOptions{}, g);
  CHECK(std::fabs(q.loss - (abar * std::exp((0.1 + 0.5 - 0.2) / den))) <= 1e-15);
  CHECK(g(0, 3) == 0.0);
  CHECK(g(0, 1) != 0.0);
  CHECK(std::fabs(q.metrics.clip_fraction_low - 2.0 / 3) <= 1e-15);
  // At the boundary d == clip_high with A > 0, torch's tie rule passes the whole gradient.
  lp(0, 1) = -1.0 + 0.25;
  adv.setConstant(1.0);
  pl::GmpoOptions b;
  b.clip_high = 0.25;
  pl::gmpo(lp, old, adv, m, b, g);
  CHECK(g(0, 1) == g(0, 0));
}

TEMPLATE_TEST_CASE("gmpo: masked-out inf/NaN never influence anything; empty rows give 0 and count", "[gmpo]", float,
                   double) {
  using S = TestType;
  const pl::GmpoOptions o;
  const Case<S, float> c(5, 45, 7, o, {1, 4});
  Case<S, float> clean = c;
  for (long i = 0; i < 5; ++i)
    for (long t = 0; t < 45; ++t)
      if (c.mask(i, t) == 0.f) clean.lp(i, t) = clean.old(i, t) = clean.adv(i, t) = S(0.5);
  Tok<S> gp(5, 45), gc(5, 45);
  const auto rp = pl::gmpo(c.lp, c.old, c.adv, c.mask, o, gp);
  const auto rc = pl::gmpo(clean.lp, clean.old, clean.adv, clean.mask, o, gc);
  CHECK(std::isfinite(rp.loss));
  CHECK(rp.loss == rc.loss);
  CHECK(rp.losses(1) == S(0));
  CHECK(rp.losses(4) == S(0));
  CHECK(rp.metrics.approx_kl == rc.metrics.approx_kl);
  for (long i = 0; i < 5; ++i)
    for (long t = 0; t < 45; ++t) {
      CHECK(gp(i, t) == gc(i, t));
      if (c.mask(i, t) == 0.f) CHECK(gp(i, t) == S(0));
    }
  // The empty rows still count: the mean divides by 5.
  const GmpoRef e = gmpo_ref(c.data(), o);
  CHECK(std::fabs(static_cast<ld>(rp.loss) - e.loss) <= 2e-6L * (std::fabs(e.loss) + 1));
  // A batch with no valid token: 0 everywhere.
  const Case<S, std::uint8_t> none(3, 9, 8, o, {0, 1, 2});
  Tok<S> g0(3, 9);
  const auto r0 = pl::gmpo(none.lp, none.old, none.adv, none.mask, o, g0);
  CHECK(r0.loss == S(0));
  CHECK(r0.metrics.clip_fraction == S(0));
  for (long k = 0; k < g0.size(); ++k) CHECK(g0.data()[k] == S(0));
}

TEST_CASE("gmpo: packed rows, 16-bit inputs and threads", "[gmpo]") {
  const pl::GmpoOptions o;
  const long B = 4, T = 50;
  const Case<float, std::uint8_t> c(B, T, 21, o);
  Tok<float> g(B, T);
  const auto r = pl::gmpo(c.lp, c.old, c.adv, c.mask, o, g);

  // Packed: each row's first n tokens as one packed row (the same tokens from the row start:
  // the same bits).
  const long lens[B] = {50, 17, 1, 33};
  std::vector<std::int64_t> cu{0};
  for (long i = 0; i < B; ++i) cu.push_back(cu.back() + lens[i]);
  const long N = cu.back();
  Eigen::Tensor<float, 1> plp(N), pold(N), padv(N), pg(N);
  Eigen::Tensor<std::uint8_t, 1> pm(N);
  Tok<float> qlp(B, T), qold(B, T), qadv(B, T), qg(B, T);
  Tok<std::uint8_t> qm(B, T);
  qm.setZero();
  qlp.setZero();
  qold.setZero();
  qadv.setZero();
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < lens[i]; ++t) {
      const long k = cu[static_cast<std::size_t>(i)] + t;
      plp(k) = qlp(i, t) = c.lp(i, t);
      pold(k) = qold(i, t) = c.old(i, t);
      padv(k) = qadv(i, t) = c.adv(i, t);
      pm(k) = qm(i, t) = c.mask(i, t);
    }
  Eigen::Tensor<std::int64_t, 1> cut(B + 1);
  for (long i = 0; i <= B; ++i) cut(i) = cu[static_cast<std::size_t>(i)];
  const auto rp = pl::gmpo(pl::packed(plp, cut), pl::packed(pold, cut), pl::packed(padv, cut), pl::packed(pm, cut), o,
                           pl::packed(pg, cut));
  const auto rq = pl::gmpo(qlp, qold, qadv, qm, o, qg);
  CHECK(rp.loss == rq.loss);
  for (long i = 0; i < B; ++i) {
    CHECK(rp.losses(i) == rq.losses(i));
    for (long t = 0; t < lens[i]; ++t) CHECK(pg(cu[static_cast<std::size_t>(i)] + t) == qg(i, t));
  }

  // bf16 inputs compute in float: the float call on the converted values, the gradient rounded once.
  using BF = Eigen::bfloat16;
  Tok<BF> blp(B, T), bold(B, T), badv(B, T), bg(B, T);
  Tok<float> flp(B, T), fold(B, T), fadv(B, T), fg(B, T);
  for (long k = 0; k < blp.size(); ++k) {
    blp.data()[k] = BF(c.lp.data()[k]);
    bold.data()[k] = BF(c.old.data()[k]);
    badv.data()[k] = BF(c.adv.data()[k]);
    flp.data()[k] = static_cast<float>(blp.data()[k]);
    fold.data()[k] = static_cast<float>(bold.data()[k]);
    fadv.data()[k] = static_cast<float>(badv.data()[k]);
  }
  const auto rb = pl::gmpo(blp, bold, badv, c.mask, o, bg);
  const auto rf = pl::gmpo(flp, fold, fadv, c.mask, o, fg);
  static_assert(std::is_same_v<decltype(rb.loss), float>, "16-bit inputs give float results");
  CHECK(rb.loss == rf.loss);
  for (long k = 0; k < bg.size(); ++k)
    CHECK(Eigen::numext::bit_cast<std::uint16_t>(bg.data()[k]) ==
          Eigen::numext::bit_cast<std::uint16_t>(BF(fg.data()[k])));

  // Threads: the same bits for any count.
  pl::ThreadPool pool(2);
  pl::GmpoOptions ot = o;
  ot.threads = pl::Threads(pool);
  Tok<float> gt(B, T);
  const auto rt = pl::gmpo(c.lp, c.old, c.adv, c.mask, ot, gt);
  CHECK(rt.loss == r.loss);
  for (long k = 0; k < g.size(); ++k) CHECK(gt.data()[k] == g.data()[k]);

  // Split batches with sequence_count add up to the whole batch.
  pl::GmpoOptions os = o;
  os.sequence_count = static_cast<double>(B);
  Eigen::array<Eigen::Index, 2> off0{0, 0}, off1{2, 0}, ext{2, T};
  const Tok<float> lp0 = c.lp.slice(off0, ext), lp1 = c.lp.slice(off1, ext), ol0 = c.old.slice(off0, ext),
                   ol1 = c.old.slice(off1, ext), a0 = c.adv.slice(off0, ext), a1 = c.adv.slice(off1, ext);
  const Tok<std::uint8_t> m0 = c.mask.slice(off0, ext), m1 = c.mask.slice(off1, ext);
  const auto h0 = pl::gmpo(lp0, ol0, a0, m0, os), h1 = pl::gmpo(lp1, ol1, a1, m1, os);
  CHECK(std::fabs((h0.loss + h1.loss) - r.loss) <= 1e-6f * (std::fabs(r.loss) + 1e-30f));
}

TEST_CASE("gmpo rejects bad input and writes nothing", "[gmpo]") {
  const pl::GmpoOptions o;
  const Case<float, std::uint8_t> c(2, 5, 41, o);
  Tok<float> g(2, 5), wrong(2, 6);
  wrong.setZero();
  g.setConstant(-42.f);
  const auto untouched = [&] {
    for (long k = 0; k < g.size(); ++k) CHECK(g.data()[k] == -42.f);
  };
  expect_throw<pl::shape_error>([&] { pl::gmpo(c.lp, wrong, c.adv, c.mask, o, g); }, "gmpo", {"'old_logp'"});
  expect_throw<pl::shape_error>([&] { pl::gmpo(c.lp, c.old, wrong, c.mask, o, g); }, "gmpo", {"'advantages'"});
  expect_throw<pl::shape_error>([&] { pl::gmpo(c.lp, c.old, c.adv, c.mask, o, wrong); }, "gmpo", {"'grad_out'"});
  untouched();
  Tok<float> fm(2, 5);
  fm.setConstant(1.f);
  fm(1, 3) = -0.5f;
  expect_throw<pl::value_error>([&] { pl::gmpo(c.lp, c.old, c.adv, fm, o, g); }, "gmpo", {"'mask'"});
  untouched();
  const auto option = [&](pl::GmpoOptions bad, const char* name) {
    expect_throw<pl::option_error>([&] { pl::gmpo(c.lp, c.old, c.adv, c.mask, bad, g); }, "gmpo",
                                   {std::string("'") + name + "'"});
    untouched();
  };
  pl::GmpoOptions b;
  b.clip_low = -0.1;
  option(b, "clip_low");
  b = {};
  b.clip_high = std::numeric_limits<double>::infinity();
  option(b, "clip_high");
  b = {};
  b.sequence_count = 0.0;
  option(b, "sequence_count");
  Tok<float> e0(0, 5), g0(0, 5);
  Tok<std::uint8_t> m0(0, 5);
  expect_throw<pl::shape_error>([&] { pl::gmpo(e0, e0, e0, m0, o, g0); }, "gmpo", {"'logp'", "sequence_count"});
  b = {};
  b.sequence_count = 8.0;
  CHECK(pl::gmpo(e0, e0, e0, m0, b, g0).loss == 0.f);  // an empty shard of a global batch
}
