// Edge cases of the pairwise family: inf/NaN padding never reaches an output, empty rows
// (masked_mean = 0, gradient 0), |beta * D| up to 1e5, ORPO at a chosen log-prob of 0, and the
// reward metrics (strict accuracy: ties count as wrong).
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include "pairwise_reference.hpp"

namespace {

using namespace pref;

/// Runs f on finite padding and on inf/NaN padding: every output must be bitwise the same.
template <bool Mean, class S, class M, class F>
void same_with_poisoned_padding(F&& f, unsigned seed) {
  constexpr long B = 4, T = 19;
  std::mt19937 rng(seed);
  // Chosen row 2 is empty (masked_mean 0); rejected rows never are (ORPO has a pole at s_r = 0).
  Tok<M> mc = random_mask<M>(B, T, rng, 0.6), mr = random_mask<M>(B, T, rng, 0.6);
  for (long t = 0; t < T; ++t) mc(2, t) = M(0);
  const Tok<S> xc = random_tokens<S>(B, T, rng, -3, -0.05), xr = random_tokens<S>(B, T, rng, -3, -0.05);
  Tok<S> pc = xc, pr = xr;
  poison_padding(pc, mc);
  poison_padding(pr, mr);
  const auto a = f(seq<Mean>(xc, mc), seq<Mean>(xr, mr));
  const auto b = f(seq<Mean>(pc, mc), seq<Mean>(pr, mr));
  CHECK(std::isfinite(a.loss));
  CHECK(a.loss == b.loss);
  for (long i = 0; i < B; ++i) CHECK(a.losses(i) == b.losses(i));
  Tok<S> gac(B, T), gar(B, T), gbc(B, T), gbr(B, T);
  a.backward(gac, gar);
  b.backward(gbc, gbr);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(std::isfinite(gbc(i, t)));
      CHECK(std::isfinite(gbr(i, t)));
      CHECK(gac(i, t) == gbc(i, t));
      CHECK(gar(i, t) == gbr(i, t));
      if (mc(i, t) == M(0)) CHECK(gbc(i, t) == S(0));
      if (mr(i, t) == M(0)) CHECK(gbr(i, t) == S(0));
    }
  for (long t = 0; t < T; ++t) CHECK(gbc(2, t) == S(0));
}

template <class S, class F>
void poison_all_forms(F&& f) {
  same_with_poisoned_padding<false, S, std::uint8_t>(f, 1);
  same_with_poisoned_padding<true, S, std::uint8_t>(f, 2);
  same_with_poisoned_padding<false, S, S>(f, 3);
  same_with_poisoned_padding<true, S, S>(f, 4);
  same_with_poisoned_padding<true, S, bool>(f, 5);
}

}  // namespace

TEMPLATE_TEST_CASE("inf/NaN padding never changes losses or gradients", "[pairwise][padding]", float, double) {
  using S = TestType;
  Vec<S> rc(4), rr(4);
  rc.setValues({S(-10), S(-2), S(-7), S(-1)});
  rr.setValues({S(-12), S(-3), S(-5), S(-2)});
  for (int k = 0; k <= static_cast<int>(pl::DpoVariant::aot_unpaired); ++k) {
    pl::DpoOptions opt;
    opt.variant = static_cast<pl::DpoVariant>(k);
    opt.label_smoothing = opt.variant == pl::DpoVariant::hinge ? 0.0 : 0.1;
    INFO("variant " << k);
    poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::dpo(c, r, rc, rr, opt); });
  }
  for (const auto f :
       {pl::FDivergence::forward_kl, pl::FDivergence::js_divergence, pl::FDivergence::alpha_divergence}) {
    pl::DpoOptions opt;
    opt.divergence = f;
    poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::dpo(c, r, rc, rr, opt); });
  }
  poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::ipo(c, r, rc, rr); });
  poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::simpo(c, r); });
  poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::orpo(c, r); });
  pl::BradleyTerryOptions bt;
  bt.center_coef = 0.01;
  poison_all_forms<S>([&](const auto& c, const auto& r) { return pl::bradley_terry(c, r, bt); });
  SECTION("reference values as expressions over poisoned padding") {
    constexpr long B = 4, T = 7;
    std::mt19937 rng(9);
    const Tok<std::uint8_t> m = random_mask<std::uint8_t>(B, T, rng);
    const Tok<S> x = random_tokens<S>(B, T, rng, -3, 0);
    Tok<S> p = x;
    poison_padding(p, m);
    const Vec<S> c = random_vec<S>(B, rng, -9, 0), r = random_vec<S>(B, rng, -9, 0);
    const auto a = pl::dpo(c, r, pl::masked_sum(x, m), pl::masked_mean(x, m));
    const auto b = pl::dpo(c, r, pl::masked_sum(p, m), pl::masked_mean(p, m));
    CHECK(std::isfinite(b.loss));
    CHECK(a.loss == b.loss);
  }
  SECTION("nll") {
    constexpr long B = 3, T = 17;
    std::mt19937 rng(10);
    Tok<S> m = random_mask<S>(B, T, rng);
    for (long t = 0; t < T; ++t) m(1, t) = S(0);
    const Tok<S> x = random_tokens<S>(B, T, rng, -3, 0);
    Tok<S> p = x;
    poison_padding(p, m);
    const auto a = pl::nll(pl::masked_mean(x, m));
    const auto b = pl::nll(pl::masked_mean(p, m));
    CHECK(a.loss == b.loss);
    Tok<S> ga(B, T), gb(B, T);
    a.backward(ga);
    b.backward(gb);
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T; ++t) {
        CHECK(ga(i, t) == gb(i, t));
        if (m(i, t) == S(0)) CHECK(gb(i, t) == S(0));
      }
  }
}

TEMPLATE_TEST_CASE("empty rows: masked_mean is 0 with gradient 0", "[pairwise][empty]", float, double) {
  using S = TestType;
  constexpr long B = 4, T = 9;
  std::mt19937 rng(41);
  const Tok<S> xc = dyadic_tokens<S>(B, T, rng, -3, -0.25), xr = dyadic_tokens<S>(B, T, rng, -3, -0.25);
  const Tok<std::uint8_t> mc = dyadic_mask<std::uint8_t>(B, T, rng, 1), mr = dyadic_mask<std::uint8_t>(B, T, rng, 3);
  const Vec<S> rc = dyadic_vec<S>(B, rng, -3, 0), rr = dyadic_vec<S>(B, rng, -3, 0);
  const auto none = [](const auto&, const Seqs& s) {
    CHECK(s.c[1] == 0);
    CHECK(s.r[3] == 0);
  };
  // check_pair compares with the closed form at s = 0 and expects the empty rows' token
  // gradients to be 0 (ref_dseq is 0 there).
  pl::DpoOptions dpo;
  check_pair<true>([&](const auto& c, const auto& r) { return pl::dpo(c, r, rc, rr, dpo); },
                   [&](long i, ld sc, ld sr) {
                     return ref_dpo(Dpo::sigmoid, (sc - rc(i)) - (sr - rr(i)), dpo.beta, dpo.label_smoothing);
                   },
                   none, xc, mc, xr, mr);
  pl::IpoOptions ipo;
  check_pair<true>([&](const auto& c, const auto& r) { return pl::ipo(c, r, rc, rr, ipo); },
                   [&](long i, ld sc, ld sr) { return ref_ipo((sc - rc(i)) - (sr - rr(i)), ipo.beta); }, none, xc, mc,
                   xr, mr);
  pl::SimpoOptions simpo;
  check_pair<true>([&](const auto& c, const auto& r) { return pl::simpo(c, r, simpo); },
                   [&](long, ld sc, ld sr) { return ref_simpo(sc, sr, simpo.beta, simpo.gamma, 0); }, none, xc, mc, xr,
                   mr);
  SECTION("orpo: an empty chosen row is s_c = 0, a finite limit") {
    const Tok<std::uint8_t> mr_full = dyadic_mask<std::uint8_t>(B, T, rng);
    const auto res = pl::orpo(pl::masked_mean(xc, mc), pl::masked_mean(xr, mr_full));
    CHECK(res.losses(1) == S(0));  // -s_c - b logsig(+inf) = 0
    CHECK(std::isfinite(res.loss));
    Tok<S> gc(B, T), gr(B, T);
    res.backward(gc, gr);
    for (long t = 0; t < T; ++t) {
      CHECK(gc(1, t) == S(0));
      CHECK(gr(1, t) == S(0));  // d/ds_r = b sig(-L) / (1 - p_r) and sig(-inf) = 0
    }
  }
}

TEMPLATE_TEST_CASE("orpo at a chosen log-prob of exactly 0", "[pairwise][orpo][edge]", float, double) {
  using S = TestType;
  // As s_c -> 0, b sig(-L) / (1 - p_c) -> b p_r / (1 - p_r): with L = (s_c - s_r) -
  // log(1 - p_c) + log(1 - p_r), (1 + e^L)(1 - p_c) = (1 - p_c) + p_c (1 - p_r) / p_r -> (1 - p_r) / p_r.
  Vec<S> c(3), r(3);
  c.setValues({S(0), S(-0.0), S(-1e-30)});
  r.setValues({S(-0.5), S(-2), S(-0.125)});
  pl::OrpoOptions opt;
  opt.beta = 0.5;
  const auto res = pl::orpo(c, r, opt);
  Vec<S> gc(3), gr(3);
  res.backward(gc, gr);
  for (long i = 0; i < 3; ++i) {
    const ld pr = std::exp(static_cast<ld>(r(i)));
    const ld want = (-1 - opt.beta * pr / (1 - pr)) / 3;
    INFO("example " << i);
    CHECK(std::isfinite(res.losses(i)));
    CHECK_CLOSE(gc(i), want, std::fabs(want));
    CHECK(std::isfinite(gr(i)));
  }
  // d/ds_r = b sig(-L) / (1 - p_r): exactly 0 at s_c = 0 (L = +inf), tiny just below.
  CHECK(gr(0) == S(0));
  CHECK(gr(1) == S(0));
  CHECK_CLOSE(gr(2), ref_orpo(static_cast<ld>(c(2)), static_cast<ld>(r(2)), opt.beta).dr / 3);
  CHECK(res.losses(0) == S(0));
  CHECK(std::isfinite(res.metrics.log_odds_ratio));
  // Continuity: the naive long-double formula just below 0 approaches the same value.
  const Ref near = ref_orpo(-1e-15L, static_cast<ld>(r(0)), opt.beta);
  CHECK_CLOSE(gc(0), near.dc / 3);
}

TEMPLATE_TEST_CASE("|beta * D| up to 1e5: finite losses, bounded gradients", "[pairwise][extreme]", float, double) {
  using S = TestType;
  constexpr long B = 6;
  Vec<S> c(B), r(B), zero(B);
  c.setValues({S(5e5), S(-5e5), S(2.5e5), S(-2.5e5), S(1e4), S(-3e3)});
  r.setValues({S(-5e5), S(5e5), S(-2.5e5), S(2.5e5), S(-1e4), S(3e3)});
  zero.setZero();
  const double beta = 0.1;  // b * D = +-1e5, +-5e4, +-2e3, -600
  for (const auto v : {pl::DpoVariant::sigmoid, pl::DpoVariant::robust, pl::DpoVariant::hinge}) {
    for (const double e : {0.0, 0.25}) {
      if (v == pl::DpoVariant::hinge && e > 0) continue;
      pl::DpoOptions opt;
      opt.beta = beta;
      opt.variant = v;
      opt.label_smoothing = e;
      const auto res = pl::dpo(c, r, zero, zero, opt);
      Vec<S> gc(B), gr(B);
      res.backward(gc, gr);
      const ld bound = v == pl::DpoVariant::robust ? beta / (1 - 2 * e) : beta;
      CHECK(std::isfinite(res.loss));
      for (long i = 0; i < B; ++i) {
        const ld D = static_cast<ld>(c(i)) - r(i);
        const Ref want = ref_dpo(v == pl::DpoVariant::sigmoid  ? Dpo::sigmoid
                                 : v == pl::DpoVariant::robust ? Dpo::robust
                                                               : Dpo::hinge,
                                 D, beta, e);
        INFO("variant " << static_cast<int>(v) << " e " << e << " D " << static_cast<double>(D));
        CHECK(std::isfinite(res.losses(i)));
        CHECK_CLOSE(res.losses(i), want.loss);
        CHECK(std::isfinite(gc(i)));
        CHECK(std::fabs(static_cast<ld>(gc(i))) * B <= bound * (1 + 1e-6L));
        CHECK(gr(i) == -gc(i));
        CHECK_CLOSE(gc(i), want.dc / B);
      }
    }
  }
  SECTION("sigmoid loss grows like |b D| where the pair is wrong") {
    pl::DpoOptions opt;
    opt.beta = beta;
    const auto res = pl::dpo(c, r, zero, zero, opt);
    CHECK(res.losses(1) == S(1e5));
    CHECK(res.losses(0) == S(0));
  }
  SECTION("token level, masked_sum") {
    Tok<S> xc(2, 4), xr(2, 4);
    Tok<std::uint8_t> m(2, 4);
    m.setConstant(1);
    xc.setValues({{S(1.25e5), S(1.25e5), S(1.25e5), S(1.25e5)}, {S(-1.25e5), S(-1.25e5), S(-1.25e5), S(-1.25e5)}});
    xr = -xc;
    Vec<S> z(2);
    z.setZero();
    for (const auto v : {pl::DpoVariant::sigmoid, pl::DpoVariant::robust}) {
      pl::DpoOptions opt;
      opt.beta = beta;
      opt.variant = v;
      opt.label_smoothing = 0.1;
      const auto res = pl::dpo(pl::masked_sum(xc, m), pl::masked_sum(xr, m), z, z, opt);
      Tok<S> gc(2, 4), gr(2, 4);
      res.backward(gc, gr);
      CHECK(std::isfinite(res.loss));
      for (long i = 0; i < 2; ++i)
        for (long t = 0; t < 4; ++t) {
          CHECK(std::isfinite(gc(i, t)));
          const double bound = v == pl::DpoVariant::robust ? beta / (1 - 2 * opt.label_smoothing) : beta;
          CHECK(std::fabs(gc(i, t)) * 2 <= S(bound * (1 + 1e-6)));
        }
    }
    const auto s = pl::simpo(pl::masked_sum(xc, m), pl::masked_sum(xr, m));  // b * D = 2e6
    CHECK(std::isfinite(s.loss));
    CHECK_CLOSE(s.losses(1), 2e6L + 0.5L);
  }
  SECTION("ipo and orpo stay finite") {
    const auto res = pl::ipo(c, r, zero, zero);
    CHECK(std::isfinite(res.loss));
    CHECK_CLOSE(res.losses(0), (1e6L - 5) * (1e6L - 5));
    Vec<S> oc(3), orj(3);
    oc.setValues({S(-1e-30), S(-1e4), S(-0.001)});
    orj.setValues({S(-1e4), S(-1e-30), S(-700)});
    const auto o = pl::orpo(oc, orj);
    Vec<S> gc(3), gr(3);
    o.backward(gc, gr);
    for (long i = 0; i < 3; ++i) {
      CHECK(std::isfinite(o.losses(i)));
      CHECK(std::isfinite(gc(i)));
      CHECK(std::isfinite(gr(i)));
    }
  }
}

TEMPLATE_TEST_CASE("the other TRL dpo variants at |beta * D| up to 1e5: finite where the loss is",
                   "[pairwise][extreme]", float, double) {
  using S = TestType;
  constexpr long B = 6;
  Vec<S> c(B), r(B), zero(B);
  c.setValues({S(5e5), S(-5e5), S(2.5e5), S(-2.5e5), S(1e4), S(-3e3)});
  r.setValues({S(-5e5), S(5e5), S(-2.5e5), S(2.5e5), S(-1e4), S(3e3)});
  zero.setZero();
  // beta dyadic: the products b u are exact, so exp(b u) near 1e-260 is compared without the
  // conditioning of a rounded 0.1 times 6e3.
  const double beta = 0.125, e = 0.01, d = 0.5, tau = 0.05;
  const std::pair<pl::DpoVariant, DpoMore> variants[] = {
      {pl::DpoVariant::exo_pair, DpoMore::exo_pair}, {pl::DpoVariant::nca_pair, DpoMore::nca_pair},
      {pl::DpoVariant::bco_pair, DpoMore::bco_pair}, {pl::DpoVariant::sppo_hard, DpoMore::sppo_hard},
      {pl::DpoVariant::apo_zero, DpoMore::apo_zero}, {pl::DpoVariant::apo_down, DpoMore::apo_down},
      {pl::DpoVariant::discopop, DpoMore::discopop}};
  for (const auto& [v, m] : variants) {
    pl::DpoOptions opt;
    opt.beta = beta;
    opt.variant = v;
    opt.label_smoothing = e;
    opt.bco_delta = d;
    opt.discopop_tau = tau;
    const auto res = pl::dpo(c, r, zero, zero, opt);
    Vec<S> gc(B), gr(B);
    res.backward(gc, gr);
    CHECK(std::isfinite(res.loss));
    for (long i = 0; i < B; ++i) {
      const Ref want = ref_dpo_more(m, c(i), r(i), beta, e, d, tau);
      INFO("variant " << static_cast<int>(v) << " example " << i);
      CHECK(std::isfinite(res.losses(i)));
      CHECK_CLOSE(res.losses(i), want.loss);
      CHECK(std::isfinite(gc(i)));
      CHECK(std::isfinite(gr(i)));
      CHECK_CLOSE(gc(i), want.dc / B, std::fabs(want.dc / B) + 1e-300L);
      CHECK_CLOSE(gr(i), want.dr / B, std::fabs(want.dr / B) + 1e-300L);
    }
  }
  SECTION("discopop where TRL's exp(-z) * sigmoid(z / tau) is inf * 0") {
    pl::DpoOptions opt;
    opt.beta = beta;
    opt.variant = pl::DpoVariant::discopop;
    const auto res = pl::dpo(c, r, zero, zero, opt);
    // z = -1.25e5: the logistic part is 1.25e5 and exp(-z) m = exp(1.25e5 - 2.5e6) is 0.
    CHECK(res.losses(1) == S(1.25e5));
    CHECK(res.losses(0) == S(0));
  }
  SECTION("aot and aot_unpaired sort: a batch of one is its sigmoid loss") {
    Vec<S> c1(1), r1(1), rc1(1), rr1(1);
    c1.setValues({S(-3)});
    r1.setValues({S(-5)});
    rc1.setValues({S(-4)});
    rr1.setValues({S(-4.5)});
    for (const auto v : {pl::DpoVariant::aot, pl::DpoVariant::aot_unpaired}) {
      pl::DpoOptions opt;
      opt.variant = v;
      opt.label_smoothing = 0.1;
      const auto res = pl::dpo(c1, r1, rc1, rr1, opt);
      const Ref want = ref_dpo(Dpo::sigmoid, (-3.0L + 4) - (-5.0L + 4.5L), 0.1L, 0.1L);
      CHECK_CLOSE(res.loss, want.loss);
      Vec<S> gc(1), gr(1);
      res.backward(gc, gr);
      CHECK_CLOSE(gc(0), want.dc);
      CHECK_CLOSE(gr(0), want.dr);
    }
  }
}

TEST_CASE("discopop with a subnormal tau at z = 0: the 1/tau terms cancel before they overflow",
          "[pairwise][extreme]") {
  // At z = 0: m = 1/2, so dL/dz = -1/4 - 1/2 + (1 - ln 2) / (4 tau) (closed form). With
  // tau = 1e-309 each 1/tau term alone passes DBL_MAX (the fuzzer found inf - inf = NaN there).
  Vec<double> v(1);
  v.setValues({-2.0});
  pl::DpoOptions opt;
  opt.variant = pl::DpoVariant::discopop;
  opt.beta = 1.0;
  for (const double tau : {1e-309, 1e-300, 0.05}) {
    opt.discopop_tau = tau;
    const auto res = pl::dpo(v, v, v, v, opt);
    CHECK_CLOSE(res.loss, std::log(2.0L) / 2 + 0.5L);
    Vec<double> gc(1), gr(1);
    res.backward(gc, gr);
    const long double want = -0.75L + (1 - std::log(2.0L)) / (4 * static_cast<long double>(tau));
    INFO("tau " << tau);
    CHECK(std::isfinite(gc(0)));
    CHECK_CLOSE(gc(0), want);
    CHECK_CLOSE(gr(0), -want);
  }
  opt.discopop_tau = 4.9e-324;  // 1 / tau overflows whatever the order: the slope is +inf, not NaN
  Vec<double> gc(1), gr(1);
  pl::dpo(v, v, v, v, opt).backward(gc, gr);
  CHECK(gc(0) == std::numeric_limits<double>::infinity());
  CHECK(gr(0) == -std::numeric_limits<double>::infinity());
}

TEMPLATE_TEST_CASE("aot: the sorted pairs, ties in example order, NaN last", "[pairwise][aot]", float, double) {
  using S = TestType;
  // Policy log-ratios p = c - r = {2, -1, 2, 0.5}; reference q = {0, 1, -2, 0.25}.
  Vec<S> c(4), r(4), rc(4), rr(4);
  c.setValues({S(-1), S(-3), S(-2), S(-1.5)});
  r.setValues({S(-3), S(-2), S(-4), S(-2)});
  rc.setValues({S(-1), S(-1), S(-3), S(-1)});
  rr.setValues({S(-1), S(-2), S(-1), S(-1.25)});
  pl::DpoOptions opt;
  opt.beta = 0.5;
  opt.variant = pl::DpoVariant::aot;
  const auto res = pl::dpo(c, r, rc, rr, opt);
  // sorted p: -1 (ex 1), 0.5 (ex 3), 2 (ex 0), 2 (ex 2); sorted q: -2, 0, 0.25, 1.
  const ld p_sorted[] = {-1, 0.5L, 2, 2}, q_sorted[] = {-2, 0, 0.25L, 1};
  const long rank[] = {2, 0, 3, 1};
  Vec<S> gc(4), gr(4);
  res.backward(gc, gr);
  ld total = 0;
  for (long i = 0; i < 4; ++i) {
    const Ref want = ref_dpo(Dpo::sigmoid, p_sorted[rank[i]] - q_sorted[rank[i]], 0.5L, 0);
    total += want.loss;
    CHECK_CLOSE(res.losses(i), want.loss);
    CHECK_CLOSE(gc(i), want.dc / 4);
    CHECK_CLOSE(gr(i), -want.dc / 4);
  }
  CHECK_CLOSE(res.loss, total / 4);
  SECTION("a NaN log-ratio sorts last and stays in its own term") {
    Vec<S> cn = c;
    cn(1) = std::numeric_limits<S>::quiet_NaN();
    const auto rn = pl::dpo(cn, r, rc, rr, opt);
    // sorted p: 0.5 (ex 3), 2 (ex 0), 2 (ex 2), NaN (ex 1)
    const long rank_n[] = {1, 3, 2, 0};
    const ld p_n[] = {0.5L, 2, 2, 0};
    for (const long i : {0L, 2L, 3L})
      CHECK_CLOSE(rn.losses(i), ref_dpo(Dpo::sigmoid, p_n[rank_n[i]] - q_sorted[rank_n[i]], 0.5L, 0).loss);
    CHECK(std::isnan(rn.losses(1)));
  }
}

TEMPLATE_TEST_CASE("reward metrics: strict accuracy, ties count as wrong", "[pairwise][metrics]", float, double) {
  using S = TestType;
  Vec<S> c(4), r(4), rc(4), rr(4);
  c.setValues({S(-1), S(-2), S(-3), S(-4)});
  r.setValues({S(-1), S(-3), S(-3), S(-2)});  // u_c - u_r: 0 (tie), +1, 0 (tie), -2
  rc.setZero();
  rr.setZero();
  const auto check = [&](const auto& m, ld b) {
    CHECK(m.reward_accuracy == S(0.25));
    CHECK_CLOSE(m.reward_chosen, b * -10 / 4);
    CHECK_CLOSE(m.reward_rejected, b * -9 / 4);
    CHECK_CLOSE(m.reward_margin, b * -1 / 4);
  };
  check(pl::dpo(c, r, rc, rr).metrics, 0.1L);
  check(pl::ipo(c, r, rc, rr).metrics, 0.1L);
  check(pl::simpo(c, r).metrics, 2.0L);
  check(pl::orpo(c, r).metrics, 0.1L);
  check(pl::bradley_terry(c, r).metrics, 1.0L);
  pl::DpoOptions free;
  free.reference_free = true;
  rc.setValues({S(5), S(5), S(5), S(5)});  // ignored when reference_free
  check(pl::dpo(c, r, rc, rr, free).metrics, 0.1L);
  SECTION("the reference moves the rewards") {
    const auto m = pl::dpo(c, r, rc, rr).metrics;  // u_c = c - 5
    CHECK(m.reward_accuracy == S(0));
    CHECK_CLOSE(m.reward_chosen, 0.1L * -30 / 4);
  }
  SECTION("nll") {
    const auto n = pl::nll(c);
    CHECK_CLOSE(n.metrics.mean_logp, -10.0L / 4);
    CHECK_CLOSE(n.loss, 10.0L / 4);
  }
}
