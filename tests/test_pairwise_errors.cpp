// Bad input to the pairwise family: batch mismatches, empty batches, wrong gradient shapes
// (nothing written), out-of-domain options and unknown enums. Every rejection is a prefloss
// exception deriving from std::invalid_argument whose message names the argument or option.
#include <catch2/catch.hpp>
#include <limits>
#include <prefloss/prefloss.hpp>

#include "pairwise_reference.hpp"
#include "throws.hpp"

using namespace pref;

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kSentinel = 42.5f;

template <class T>
bool untouched(const T& t) {
  for (long k = 0; k < t.size(); ++k)
    if (t.data()[k] != kSentinel) return false;
  return true;
}
}  // namespace

TEST_CASE("mismatched batch sizes name the argument and both shapes", "[pairwise][errors]") {
  Tok<float> x3(3, 5), x4(4, 5);
  x3.setConstant(-1);
  x4.setConstant(-1);
  Tok<std::uint8_t> m3(3, 5), m4(4, 5);
  m3.setConstant(1);
  m4.setConstant(1);
  Vec<float> v3(3), v4(4);
  v3.setConstant(-1);
  v4.setConstant(-1);
  const auto c = pl::masked_sum(x3, m3);
  const auto r4 = pl::masked_sum(x4, m4);
  expect_throw<pl::shape_error>([&] { (void)pl::dpo(c, r4, v3, v3); }, "dpo", {"'rejected'", "[4, 5]", "[3, 5]"});
  expect_throw<pl::shape_error>([&] { (void)pl::dpo(c, c, v4, v3); }, "dpo", {"'ref_chosen'", "[4]"});
  expect_throw<pl::shape_error>([&] { (void)pl::dpo(c, c, v3, v4); }, "dpo", {"'ref_rejected'", "[4]"});
  expect_throw<pl::shape_error>([&] { (void)pl::ipo(c, r4, v3, v3); }, "ipo", {"'rejected'", "[4, 5]"});
  expect_throw<pl::shape_error>([&] { (void)pl::ipo(c, c, v3, pl::masked_mean(x4, m4)); }, "ipo",
                                {"'ref_rejected'", "[4, 5]"});
  expect_throw<pl::shape_error>([&] { (void)pl::simpo(pl::masked_mean(x3, m3), pl::masked_mean(x4, m4)); }, "simpo",
                                {"'rejected'"});
  expect_throw<pl::shape_error>([&] { (void)pl::orpo(v3, v4); }, "orpo", {"'rejected'", "[4]", "[3]"});
  expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry(v3, v4); }, "bradley_terry",
                                {"'r_rejected'", "but 'r_chosen' has"});
  expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry(v3, v3, v4); }, "bradley_terry",
                                {"'margin'", "[4]", "but 'r_chosen' has"});

  SECTION("empty batches") {
    Vec<float> v0(0);
    Tok<float> s0(0, 3);
    expect_throw<pl::shape_error>([&] { (void)pl::dpo(v0, v0, v0, v0); }, "dpo", {"empty"});
    expect_throw<pl::shape_error>([&] { (void)pl::ipo(v0, v0, v0, v0); }, "ipo", {"empty"});
    expect_throw<pl::shape_error>([&] { (void)pl::simpo(v0, v0); }, "simpo", {"empty"});
    expect_throw<pl::shape_error>([&] { (void)pl::orpo(v0, v0); }, "orpo", {"empty"});
    expect_throw<pl::shape_error>([&] { (void)pl::nll(v0); }, "nll", {"'logp_sequence'", "empty"});
    expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry_ranking(s0); }, "bradley_terry_ranking",
                                  {"'rewards'", "empty"});
  }
  SECTION("ranking needs K >= 2") {
    Tok<double> k1(3, 1), k0(3, 0);
    k1.setZero();
    expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry_ranking(k1); }, "bradley_terry_ranking",
                                  {"'rewards'", "K >= 2", "[3, 1]"});
    expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry_ranking(k0); }, "bradley_terry_ranking",
                                  {"'rewards'", "[3, 0]"});
  }
}

TEST_CASE("backward rejects wrong output shapes and writes nothing", "[pairwise][errors]") {
  Tok<float> x(3, 5);
  x.setConstant(-0.5f);
  Tok<std::uint8_t> m(3, 5);
  m.setConstant(1);
  Vec<float> v(3);
  v.setConstant(-2);
  const auto e = pl::masked_mean(x, m);
  Tok<float> ok(3, 5), wide(3, 6), tall(4, 5);
  Vec<float> ok1(3), long1(4);
  const auto refill = [&] {
    for (auto* t : {&ok, &wide, &tall}) t->setConstant(kSentinel);
    for (auto* t : {&ok1, &long1}) t->setConstant(kSentinel);
  };
  const auto check_pair_result = [&](const auto& res, const char* fn) {
    refill();
    expect_throw<pl::shape_error>([&] { (void)res.backward(ok, wide); }, fn, {"'grad_rejected'", "[3, 5]", "[3, 6]"});
    CHECK(untouched(ok));
    CHECK(untouched(wide));
    refill();
    expect_throw<pl::shape_error>([&] { (void)res.backward(tall, ok); }, fn, {"'grad_chosen'", "[4, 5]"});
    CHECK(untouched(ok));
    CHECK(untouched(tall));
  };
  check_pair_result(pl::dpo(e, e, v, v), "dpo");
  check_pair_result(pl::ipo(e, e, v, v), "ipo");
  check_pair_result(pl::simpo(e, e), "simpo");
  check_pair_result(pl::orpo(e, e), "orpo");
  check_pair_result(pl::bradley_terry(e, e), "bradley_terry");

  SECTION("plain [batch] inputs take [batch] gradients") {
    const auto res = pl::dpo(v, e, v, v);
    refill();
    expect_throw<pl::shape_error>([&] { (void)res.backward(long1, ok); }, "dpo", {"'grad_chosen'", "[3]", "[4]"});
    CHECK(untouched(long1));
    CHECK(untouched(ok));
    const auto o = pl::orpo(v, v);
    refill();
    expect_throw<pl::shape_error>([&] { (void)o.backward(ok1, long1); }, "orpo", {"'grad_rejected'", "[4]"});
    CHECK(untouched(ok1));
  }
  SECTION("nll") {
    refill();
    expect_throw<pl::shape_error>([&] { (void)pl::nll(e).backward(wide); }, "nll", {"'grad'", "[3, 6]"});
    CHECK(untouched(wide));
    expect_throw<pl::shape_error>([&] { (void)pl::nll(v).backward(long1); }, "nll", {"'grad'", "[4]"});
    CHECK(untouched(long1));
  }
  SECTION("ranking") {
    Tok<float> s(3, 4), g(3, 5);
    s.setZero();
    g.setConstant(kSentinel);
    expect_throw<pl::shape_error>([&] { (void)pl::bradley_terry_ranking(s).backward(g); }, "bradley_terry_ranking",
                                  {"'grad'", "[3, 4]", "[3, 5]"});
    CHECK(untouched(g));
  }
}

TEST_CASE("out-of-domain options name the option and the value", "[pairwise][errors]") {
  Vec<double> v(2);
  v.setValues({-1.0, -2.0});
  for (const double beta : {0.0, -0.1, kNaN}) {
    INFO("beta " << beta);
    pl::DpoOptions d;
    d.beta = beta;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'beta'"});
    pl::IpoOptions i;
    i.beta = beta;
    expect_throw<pl::option_error>([&] { (void)pl::ipo(v, v, v, v, i); }, "ipo", {"'beta'"});
    pl::SimpoOptions s;
    s.beta = beta;
    expect_throw<pl::option_error>([&] { (void)pl::simpo(v, v, s); }, "simpo", {"'beta'"});
    pl::OrpoOptions o;
    o.beta = beta;
    expect_throw<pl::option_error>([&] { (void)pl::orpo(v, v, o); }, "orpo", {"'beta'"});
  }
  {
    pl::DpoOptions d;
    d.beta = -0.25;
    CHECK_THROWS_WITH(pl::dpo(v, v, v, v, d), Catch::Contains("-0.25"));
  }
  for (const double e : {0.5, -0.1, 0.75, kNaN}) {
    INFO("label_smoothing " << e);
    pl::DpoOptions d;
    d.label_smoothing = e;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'label_smoothing'", "[0, 0.5)"});
    pl::SimpoOptions s;
    s.label_smoothing = e;
    expect_throw<pl::option_error>([&] { (void)pl::simpo(v, v, s); }, "simpo", {"'label_smoothing'"});
  }
  {
    pl::DpoOptions d;
    d.label_smoothing = 0.5;
    CHECK_THROWS_WITH(pl::dpo(v, v, v, v, d), Catch::Contains("got 0.5"));
    d.label_smoothing = -0.1;
    CHECK_THROWS_WITH(pl::dpo(v, v, v, v, d), Catch::Contains("got -0.1"));
  }
  {
    pl::DpoOptions d;
    d.variant = static_cast<pl::DpoVariant>(99);
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'variant'", "99"});
    d.variant = static_cast<pl::DpoVariant>(-1);
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'variant'", "-1"});
  }
  {
    pl::DpoOptions d;
    d.variant = pl::DpoVariant::exo_pair;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo",
                                   {"'label_smoothing'", "exo_pair", "got 0"});
    d.label_smoothing = 1e-3;
    CHECK_NOTHROW(pl::dpo(v, v, v, v, d));
  }
  {
    pl::DpoOptions d;
    d.divergence = static_cast<pl::FDivergence>(4);
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'divergence'", "4"});
    for (const auto var : {pl::DpoVariant::apo_zero, pl::DpoVariant::aot, pl::DpoVariant::aot_unpaired}) {
      d.variant = var;
      d.divergence = pl::FDivergence::js_divergence;
      expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo",
                                     {"'divergence'", "reverse_kl", "log-ratios", "got 2"});
      d.divergence = pl::FDivergence::reverse_kl;
      CHECK_NOTHROW(pl::dpo(v, v, v, v, d));
    }
  }
  for (const double a : {kInf, -kInf, kNaN}) {
    pl::DpoOptions d;
    d.alpha = a;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'alpha'", "finite"});
    d.alpha = 0.5;
    d.bco_delta = a;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'bco_delta'", "finite"});
  }
  {
    pl::DpoOptions d;
    d.alpha_clamp = kNaN;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'alpha_clamp'", "nan"});
    d.alpha_clamp = kInf;
    CHECK_NOTHROW(pl::dpo(v, v, v, v, d));
  }
  for (const double t : {0.0, -0.05, kInf, kNaN}) {
    pl::DpoOptions d;
    d.discopop_tau = t;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, d); }, "dpo", {"'discopop_tau'", "> 0"});
  }
  for (const double g : {-0.5, kInf, kNaN}) {
    pl::SimpoOptions s;
    s.gamma = g;
    expect_throw<pl::option_error>([&] { (void)pl::simpo(v, v, s); }, "simpo", {"'gamma'"});
  }
  for (const double w : {-1.0, kNaN}) {
    pl::OrpoOptions o;
    o.nll_weight = w;
    expect_throw<pl::option_error>([&] { (void)pl::orpo(v, v, o); }, "orpo", {"'nll_weight'"});
  }
  for (const double k : {-0.01, kNaN}) {
    pl::BradleyTerryOptions b;
    b.center_coef = k;
    expect_throw<pl::option_error>([&] { (void)pl::bradley_terry(v, v, b); }, "bradley_terry", {"'center_coef'"});
    Tok<double> s(2, 3);
    s.setZero();
    expect_throw<pl::option_error>([&] { (void)pl::bradley_terry_ranking(s, b); }, "bradley_terry_ranking",
                                   {"'center_coef'"});
  }
  for (const double n : {0.0, -3.0, kInf, kNaN}) {
    pl::NllOptions o;
    o.normalizer = n;
    expect_throw<pl::option_error>([&] { (void)pl::nll(v, o); }, "nll", {"'normalizer'"});
  }
  pl::IpoOptions i;
  i.beta = kInf;
  expect_throw<pl::option_error>([&] { (void)pl::ipo(v, v, v, v, i); }, "ipo", {"'beta'", "inf"});
}

TEST_CASE("ld_dpo_weights: shared prefix 1, tail alpha, padding 0; bad input throws and writes nothing",
          "[pairwise][ld_dpo]") {
  // Valid tokens: chosen row 0 has 4 (a hole at t = 1), rejected row 0 has 2 -> shared 2.
  // Row 1: chosen empty -> shared 0, every valid rejected token is tail.
  Tok<std::uint8_t> mc(2, 5), mr(2, 3);
  mc.setValues({{1, 0, 1, 1, 1}, {0, 0, 0, 0, 0}});
  mr.setValues({{1, 1, 0}, {1, 0, 1}});
  Tok<float> wc(2, 5), wr(2, 3);
  wc.setConstant(-7);
  wr.setConstant(-7);
  pl::ld_dpo_weights(mc, mr, 0.25, wc, wr);
  const float want_c[2][5] = {{1, 0, 1, 0.25f, 0.25f}, {0, 0, 0, 0, 0}};
  const float want_r[2][3] = {{1, 1, 0}, {0.25f, 0, 0.25f}};
  for (long i = 0; i < 2; ++i) {
    for (long t = 0; t < 5; ++t) CHECK(wc(i, t) == want_c[i][t]);
    for (long t = 0; t < 3; ++t) CHECK(wr(i, t) == want_r[i][t]);
  }
  SECTION("alpha 1 gives the mask, alpha 0 drops the tail") {
    Tok<double> dc(2, 5), dr(2, 3);
    pl::ld_dpo_weights(mc, mr, 1.0, dc, dr);
    for (long i = 0; i < 2; ++i)
      for (long t = 0; t < 5; ++t) CHECK(dc(i, t) == mc(i, t));
    pl::ld_dpo_weights(mc, mr, 0.0, dc, dr);
    CHECK(dc(0, 3) == 0.0);
    CHECK(dr(1, 0) == 0.0);
    CHECK(dc(0, 2) == 1.0);
  }
  const auto untouched = [&] {
    for (long k = 0; k < wc.size(); ++k) CHECK(wc.data()[k] == -7.0f);
    for (long k = 0; k < wr.size(); ++k) CHECK(wr.data()[k] == -7.0f);
  };
  wc.setConstant(-7);
  wr.setConstant(-7);
  for (const double a : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    expect_throw<pl::option_error>([&] { pl::ld_dpo_weights(mc, mr, a, wc, wr); }, "ld_dpo_weights",
                                   {"'alpha'", "[0, 1]"});
    untouched();
  }
  Tok<std::uint8_t> m3(3, 3);
  m3.setConstant(1);
  expect_throw<pl::shape_error>([&] { pl::ld_dpo_weights(mc, m3, 0.5, wc, wr); }, "ld_dpo_weights",
                                {"'mask_rejected'", "3 rows", "[3, 3]", "[2, 5]"});
  untouched();
  Tok<float> bad(2, 4);
  expect_throw<pl::shape_error>([&] { pl::ld_dpo_weights(mc, mr, 0.5, bad, wr); }, "ld_dpo_weights",
                                {"'weight_chosen'", "[2, 5]", "[2, 4]"});
  untouched();
  Eigen::TensorMap<Tok<float>> alias(wc.data(), 2, 3);
  expect_throw<pl::layout_error>([&] { pl::ld_dpo_weights(mc, mr, 0.5, wc, alias); }, "ld_dpo_weights",
                                 {"'weight_chosen'", "'weight_rejected'", "overlap"});
  untouched();
}

TEST_CASE("dpo pair_weights, dpo_mixture and wpo_weights reject bad input", "[pairwise][dpo][errors]") {
  Vec<double> v(3);
  v.setValues({-1.0, -2.0, -3.0});
  pl::DpoOptions o;
  o.pair_weights = {1.0, 2.0};
  expect_throw<pl::shape_error>([&] { (void)pl::dpo(v, v, v, v, o); }, "dpo",
                                {"'pair_weights'", "2 weights", "batch 3"});
  for (const double w : {-0.5, kInf, kNaN}) {
    o.pair_weights = {1.0, w, 1.0};
    expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, o); }, "dpo", {"'pair_weights'", "index 1"});
  }
  o.pair_weights = {1.0, 1.0, 1.0};
  o.variant = pl::DpoVariant::aot;
  expect_throw<pl::option_error>([&] { (void)pl::dpo(v, v, v, v, o); }, "dpo", {"'pair_weights'", "aot"});
  pl::DpoOptions m;
  expect_throw<pl::option_error>([&] { (void)pl::dpo_mixture(v, v, v, v, {}, m); }, "dpo_mixture", {"'terms'"});
  expect_throw<pl::option_error>(
      [&] {
        (void)pl::dpo_mixture(v, v, v, v, {{pl::DpoVariant::sigmoid, 1}, {pl::DpoVariant::hinge, kNaN}}, m);
      },
      "dpo_mixture", {"'terms[1].weight'", "finite"});
  expect_throw<pl::option_error>(
      [&] {
        (void)pl::dpo_mixture(v, v, v, v, {{pl::DpoVariant::sigmoid, 1}, {static_cast<pl::DpoVariant>(42), 1}}, m);
      },
      "dpo_mixture", {"'terms[1].variant'", "42"});
  expect_throw<pl::option_error>(
      [&] {
        (void)pl::dpo_mixture(v, v, v, v, {{pl::DpoVariant::exo_pair, 1}}, m);
      },
      "dpo_mixture", {"'label_smoothing'", "exo_pair"});
  Vec<double> gc(3), gr(4);
  gc.setConstant(5);
  gr.setConstant(5);
  expect_throw<pl::shape_error>(
      [&] {
        (void)pl::dpo_mixture(v, v, v, v, {{pl::DpoVariant::sigmoid, 1}}, m, gc, gr);
      },
      "dpo_mixture", {"'grad_rejected'"});
  for (long i = 0; i < 3; ++i) CHECK(gc(i) == 5.0);

  Eigen::Tensor<float, 3, Eigen::RowMajor> z(2, 3, 4);
  z.setConstant(0.5f);
  Tok<std::int64_t> y(2, 3);
  y.setConstant(1);
  Tok<std::uint8_t> mk(2, 3);
  mk.setConstant(1);
  Vec<float> out(2);
  out.setConstant(-1);
  y(1, 2) = 4;
  expect_throw<pl::value_error>([&] { pl::wpo_weights(z, y, mk, out); }, "wpo_weights", {"'labels'", "[1, 2]"});
  y(1, 2) = 1;
  Vec<float> bad(3);
  expect_throw<pl::shape_error>([&] { pl::wpo_weights(z, y, mk, bad); }, "wpo_weights", {"'out'", "[2]", "[3]"});
  CHECK(out(0) == -1.0f);
  // Logits (log 2, 0, 0, 0), label 0: p_y / sum_v p_v^2 = 2 (2 + 3) / (4 + 3) = 10/7 at every token.
  z.setZero();
  y.setZero();
  for (long b = 0; b < 2; ++b)
    for (long t = 0; t < 3; ++t) z(b, t, 0) = std::log(2.0f);
  pl::wpo_weights(z, y, mk, out);
  CHECK(out(0) == Approx(10.0 / 7.0).epsilon(1e-6));
  CHECK(out(1) == Approx(10.0 / 7.0).epsilon(1e-6));
  Eigen::Tensor<Eigen::bfloat16, 3, Eigen::RowMajor> zb = z.cast<Eigen::bfloat16>();
  Vec<double> outd(2);
  pl::wpo_weights(zb, y, mk, outd);
  const double l2 = static_cast<double>(static_cast<float>(Eigen::bfloat16(std::log(2.0f))));
  const double e = std::exp(l2);  // the bf16-rounded log 2
  CHECK(outd(0) == Approx(e * (e + 3) / (e * e + 3)).epsilon(1e-12));
  mk(0, 0) = mk(0, 1) = mk(0, 2) = 0;
  z(0, 0, 0) = std::numeric_limits<float>::quiet_NaN();
  pl::wpo_weights(z, y, mk, out);
  CHECK(out(0) == 1.0f);  // an empty row: exp(0), its NaN logits never read
}

TEST_CASE("cpo rejects bad options", "[pairwise][cpo][errors]") {
  Vec<double> v(2);
  v.setValues({-1.0, -2.0});
  pl::CpoOptions o;
  o.variant = static_cast<pl::CpoVariant>(4);
  expect_throw<pl::option_error>([&] { (void)pl::cpo(v, v, o); }, "cpo", {"'variant'", "4"});
  o = {};
  o.alpha = kNaN;
  expect_throw<pl::option_error>([&] { (void)pl::cpo(v, v, o); }, "cpo", {"'alpha'", "finite"});
  o = {};
  o.simpo_gamma = -1;
  expect_throw<pl::option_error>([&] { (void)pl::cpo(v, v, o); }, "cpo", {"'simpo_gamma'"});
  o = {};
  o.beta = 0;
  expect_throw<pl::option_error>([&] { (void)pl::cpo(v, v, o); }, "cpo", {"'beta'"});
  o = {};
  o.label_smoothing = 0.5;
  expect_throw<pl::option_error>([&] { (void)pl::cpo(v, v, o); }, "cpo", {"'label_smoothing'"});
}
