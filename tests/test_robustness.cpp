// Regressions from a randomized probe of every entry point under ASan/UBSan: misaligned maps,
// sizes past the index range, extreme float weights and options, empty ORPO pairs. Each case
// checks the documented policy and that nothing is written when an argument is rejected.
#include <catch2/catch.hpp>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <vector>

#include "pairwise_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using pref::ld;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;
using U8 = Tok<std::uint8_t>;

namespace {

/// A [rows, cols] map of T whose data starts `offset` bytes into a byte buffer filled with a
/// sentinel, so a test can see whether anything was written.
template <class T>
struct OffsetMap {
  std::vector<unsigned char> raw;
  std::size_t offset;
  Eigen::TensorMap<Tok<T>> map;
  OffsetMap(long rows, long cols, std::size_t off)
      : raw(static_cast<std::size_t>(rows * cols) * sizeof(T) + 64, 0xA5),
        offset(off),
        map(reinterpret_cast<T*>(raw.data() + aligned_start() + off), rows, cols) {}
  std::size_t aligned_start() const {
    const auto a = reinterpret_cast<std::uintptr_t>(raw.data());
    return static_cast<std::size_t>((64 - a % 64) % 64);
  }
  bool untouched() const {
    for (const unsigned char c : raw)
      if (c != 0xA5) return false;
    return true;
  }
};

template <class T>
Tok<T> filled(long rows, long cols, T v) {
  Tok<T> t(rows, cols);
  t.setConstant(v);
  return t;
}

}  // namespace

TEST_CASE("a gradient map not aligned to its element type is rejected, never written", "[robustness]") {
  // 2 x 40 floats: with the streaming threshold at its default this is the ordinary path; the
  // large case below takes the streaming one, where the old code copied a whole row into
  // one-batch buffers.
  const long B = 2, T = 40;
  const auto lp = filled(B, T, -1.f), old = filled(B, T, -1.1f), adv = filled(B, T, 1.f);
  const auto m = filled<std::uint8_t>(B, T, 1);
  for (std::size_t off = 1; off < sizeof(float); ++off) {
    OffsetMap<float> g(B, T, off);
    CAPTURE(off);
    const auto r = pl::ppo_clip(lp, old, adv, m);
    expect_throw<pl::layout_error>([&] { r.backward(g.map); }, "ppo_clip",
                                   {"'grad'", "not a multiple of its element size 4"});
    expect_throw<pl::layout_error>([&] { pl::ppo_clip(lp, old, adv, m, pl::PpoOptions{}, g.map); }, "ppo_clip",
                                   {"'grad_out'"});
    expect_throw<pl::layout_error>([&] { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g.map); }, "value_loss",
                                   {"'grad_out'"});
    expect_throw<pl::layout_error>([&] { pl::kl_estimate(lp, old, m, pl::KlOptions{}, g.map); }, "kl_estimate",
                                   {"'out'"});
    const auto seq = pl::masked_sum(lp, m);
    Vec<float> up(B);
    up.setConstant(1.f);
    expect_throw<pl::layout_error>([&] { seq.backward(up, g.map); }, "backward", {"'grad'"});
    Vec<float> ref(B);
    ref.setZero();
    const auto d = pl::dpo(seq, pl::masked_sum(old, m), ref, ref);
    Tok<float> ok(B, T);
    expect_throw<pl::layout_error>([&] { d.backward(g.map, ok); }, "dpo", {"'grad_chosen'"});
    CHECK(g.untouched());
  }
}

TEST_CASE("the probe's 34 MB misaligned ppo_clip gradient (streaming path) is rejected", "[robustness]") {
  const long T = 8'500'000;  // past the 32 MiB streaming threshold
  const auto lp = filled(1, T, -1.f), old = filled(1, T, -1.1f), adv = filled(1, T, 1.f);
  const auto m = filled<std::uint8_t>(1, T, 1);
  OffsetMap<float> g(1, T, 2);
  expect_throw<pl::layout_error>([&] { pl::ppo_clip(lp, old, adv, m, {}).backward(g.map); }, "ppo_clip", {"'grad'"});
  expect_throw<pl::layout_error>([&] { pl::ppo_clip(lp, old, adv, m, pl::PpoOptions{}, g.map); }, "ppo_clip",
                                 {"'grad_out'"});
  expect_throw<pl::layout_error>([&] { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g.map); }, "value_loss",
                                 {"'grad_out'"});
  CHECK(g.untouched());
  // Aligned to the element but not to the batch: streamed after an ordinary-store head, and the
  // same numbers as an aligned output (ratio exp(0.1) > 1.2 is not reached, so -A r everywhere).
  OffsetMap<float> g4(1, T, 4);
  Tok<float> ga(1, T);
  const auto r = pl::ppo_clip(lp, old, adv, m, {});
  r.backward(g4.map);
  r.backward(ga);
  CHECK(std::memcmp(g4.map.data(), ga.data(), static_cast<std::size_t>(T) * sizeof(float)) == 0);
  CHECK(ga(0, 0) == Approx(-std::exp(0.1) / static_cast<double>(T)).epsilon(1e-6));
}

TEST_CASE("misaligned inputs are rejected naming the argument", "[robustness]") {
  const long B = 2, T = 5;
  OffsetMap<float> x(B, T, 1);
  const auto ok = filled(B, T, -1.f);
  const auto m = filled<std::uint8_t>(B, T, 1);
  const Eigen::TensorMap<const Tok<float>> cx(x.map.data(), B, T);
  expect_throw<pl::layout_error>([&] { pl::masked_sum(cx, m); }, "masked_sum", {"'tokens'"});
  expect_throw<pl::layout_error>([&] { pl::ppo_clip(ok, cx, ok, m); }, "ppo_clip", {"'old_logp'"});
  expect_throw<pl::layout_error>([&] { pl::value_loss(ok, ok, cx, m); }, "value_loss", {"'returns'"});
  OffsetMap<float> wm(B, T, 2);
  const Eigen::TensorMap<const Tok<float>> cw(wm.map.data(), B, T);
  expect_throw<pl::layout_error>([&] { pl::masked_mean(ok, cw); }, "masked_mean", {"'mask'"});
  std::vector<unsigned char> raw(3 * sizeof(double) + 8);
  const Eigen::TensorMap<const Vec<double>> v(reinterpret_cast<const double*>(raw.data() + 1), 2);
  const Vec<double> good = Vec<double>(2).setConstant(-1.0);
  expect_throw<pl::layout_error>([&] { pl::dpo(good, v, good, good); }, "dpo", {"'rejected'"});
  expect_throw<pl::layout_error>([&] { pl::bradley_terry(v, good); }, "bradley_terry", {"'r_chosen'"});
  expect_throw<pl::layout_error>([&] { pl::nll(v); }, "nll", {"'logp_sequence'"});
}

TEST_CASE("group_advantages: group sizes past the index range or the batch never allocate", "[robustness]") {
  Vec<double> s(6), out(6);
  s.setValues({1, 2, 3, 4, 5, 6});
  out.setConstant(7.0);
  const auto untouched = [&] {
    for (long i = 0; i < 6; ++i)
      if (out(i) != 7.0) return false;
    return true;
  };
  for (const unsigned long long g : {static_cast<unsigned long long>(std::size_t(-1)), 1ull << 40, 7ull, 4ull}) {
    CAPTURE(g);
    expect_throw<pl::shape_error>([&] { pl::group_advantages(s, g, {}, out); }, "group_advantages",
                                  {"not a multiple of group_size", std::to_string(g).c_str()});
  }
  expect_throw<pl::shape_error>([&] { pl::group_advantages(s, std::numeric_limits<std::int64_t>::max(), {}, out); },
                                "group_advantages", {"9223372036854775807"});
  expect_throw<pl::option_error>([&] { pl::group_advantages(s, -3, {}, out); }, "group_advantages",
                                 {"'group_size'", "-3"});
  CHECK(untouched());
  // An empty batch has no groups whatever their size: nothing to allocate or write.
  Vec<double> none(0), none_out(0);
  CHECK_NOTHROW(pl::group_advantages(none, 1ull << 40, {}, none_out));
  CHECK_NOTHROW(pl::group_advantages(none, std::size_t(-1), {}, none_out));
  // A group of the whole batch still works: closed form (s - 3.5) / (std + eps).
  pl::group_advantages(s, std::size_t{6}, {}, out);
  const double sd = std::sqrt(17.5 / 5.0);
  for (long i = 0; i < 6; ++i) CHECK(out(i) == Approx((s(i) - 3.5) / (sd + 1e-6)).epsilon(1e-15));
}

TEST_CASE("orpo: an empty pair contributes 0 loss and 0 gradient and still counts in the batch", "[robustness]") {
  // Row 0 is an ordinary pair; row 1 fully masked on both sides; row 2 has an empty chosen side.
  const long B = 3, T = 4;
  Tok<double> lc(B, T), lr(B, T);
  lc.setValues({{-0.5, -0.25, 0, 0}, {NAN, INFINITY, -1, -2}, {-1, -1, -1, -1}});
  lr.setValues({{-1.5, -0.75, -2, 0}, {-3, NAN, -1, -2}, {-0.2, -0.3, -0.4, -0.5}});
  U8 mc(B, T), mr(B, T);
  mc.setValues({{1, 1, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}});
  mr.setValues({{1, 1, 1, 0}, {0, 0, 0, 0}, {1, 1, 1, 1}});
  pl::OrpoOptions o;
  o.beta = 0.3;
  const auto r = pl::orpo(pl::masked_mean(lc, mc), pl::masked_mean(lr, mr), o);
  const ld sc = (-0.5L - 0.25L) / 2, sr = (-1.5L - 0.75L - 2) / 3;
  const pref::Ref e = pref::ref_orpo(sc, sr, 0.3L);
  CHECK(r.loss == Approx(static_cast<double>(e.loss / 3)).epsilon(1e-14));
  CHECK(r.losses(0) == Approx(static_cast<double>(e.loss)).epsilon(1e-14));
  CHECK(r.losses(1) == 0.0);
  CHECK(r.losses(2) == 0.0);
  CHECK(r.metrics.log_odds_chosen == Approx(static_cast<double>(pref::ref_orpo_log_odds(sc, sr) / 3)).epsilon(1e-14));
  CHECK(r.metrics.nll_loss == Approx(static_cast<double>(-sc / 3)).epsilon(1e-14));
  CHECK(r.metrics.reward_rejected == Approx(static_cast<double>(0.3L * sr / 3)).epsilon(1e-14));
  CHECK(std::isfinite(r.metrics.log_odds_ratio));
  Tok<double> gc(B, T), gr(B, T);
  r.backward(gc, gr);
  CHECK(gc(0, 0) == Approx(static_cast<double>(e.dc / 3 / 2)).epsilon(1e-13));
  CHECK(gr(0, 2) == Approx(static_cast<double>(e.dr / 3 / 3)).epsilon(1e-13));
  for (long i = 1; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      CHECK(gc(i, t) == 0.0);
      CHECK(gr(i, t) == 0.0);
    }
  // Zero tokens: every pair is empty, the loss is 0, nothing is NaN.
  const Tok<float> z(2, 0);
  const Tok<std::uint8_t> zm(2, 0);
  const auto rz = pl::orpo(pl::masked_mean(z, zm), pl::masked_mean(z, zm));
  CHECK(rz.loss == 0.f);
  CHECK(rz.metrics.log_odds_chosen == 0.f);
  CHECK(rz.metrics.log_odds_ratio == 0.f);
}

TEST_CASE("bradley_terry: a huge center_coef meets r_c + r_r = 0 without inf * 0", "[robustness]") {
  Vec<double> c(2), r(2);
  c.setValues({0.75, -2.0});
  r.setValues({-0.75, 2.0});
  pl::BradleyTerryOptions o;
  o.center_coef = DBL_MAX;
  const auto res = pl::bradley_terry(c, r, o);
  Vec<double> gc(2), gr(2);
  res.backward(gc, gr);
  for (long i = 0; i < 2; ++i) {
    const ld z = static_cast<ld>(c(i)) - r(i);
    CHECK(gc(i) == Approx(static_cast<double>(-pref::sig(-z) / 2)).epsilon(1e-15));
    CHECK(gr(i) == Approx(static_cast<double>(pref::sig(-z) / 2)).epsilon(1e-15));
  }
  CHECK(res.loss == Approx(static_cast<double>((-pref::logsig(1.5L) - pref::logsig(-4.0L)) / 2)).epsilon(1e-15));
  Tok<double> k(1, 3), gk(1, 3);
  k.setValues({{1.0, 0.0, -1.0}});  // pair (0, 2) has r_i + r_j = 0; the others overflow honestly
  const auto rk = pl::bradley_terry_ranking(k, o);
  rk.backward(gk);
  CHECK(!std::isnan(gk(0, 0)));
  CHECK(!std::isnan(gk(0, 2)));
}

TEST_CASE("float mask weights: negative, NaN and infinite weights are rejected with their position", "[robustness]") {
  const long B = 3, T = 37;  // SIMD body and scalar tail
  const auto x = filled(B, T, -1.f);
  for (const float bad : {-1.f, -1e-45f, std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
    for (const long t : {3L, 36L}) {
      auto w = filled(B, T, 0.5f);
      w(2, t) = bad;
      CAPTURE(bad, t);
      const std::string at = "at [2, " + std::to_string(t) + "]";
      expect_throw<pl::value_error>([&] { pl::masked_sum(x, w); }, "masked_sum", {"'mask'", at.c_str()});
      expect_throw<pl::value_error>([&] { pl::masked_mean(x, w); }, "masked_mean", {"'mask'", at.c_str()});
      OffsetMap<float> g(B, T, 0);
      expect_throw<pl::value_error>([&] { pl::ppo_clip(x, x, x, w, pl::PpoOptions{}, g.map); }, "ppo_clip",
                                    {"finite weights >= 0", at.c_str()});
      expect_throw<pl::value_error>([&] { pl::value_loss(x, x, x, w, pl::ValueOptions{}, g.map); }, "value_loss",
                                    {at.c_str()});
      expect_throw<pl::value_error>([&] { pl::kl_estimate(x, x, w, pl::KlOptions{}, g.map); }, "kl_estimate",
                                    {at.c_str()});
      expect_throw<pl::value_error>([&] { pl::masked_whiten(x, w, g.map); }, "masked_whiten", {at.c_str()});
      OffsetMap<float> g2(B, T, 0);
      expect_throw<pl::value_error>([&] { pl::gae(x, x, w, pl::GaeOptions{}, g.map, g2.map); }, "gae", {at.c_str()});
      CHECK(g.untouched());
      CHECK(g2.untouched());
    }
  }
  // A double weight that is infinite once rounded to the float tokens it weights.
  auto wd = filled(B, T, 1.0);
  wd(1, 5) = 1e300;
  expect_throw<pl::value_error>([&] { pl::masked_sum(x, wd); }, "masked_sum", {"1e+300 at [1, 5]"});
  // -0 is a weight of 0: not selected, accepted.
  auto wz = filled(B, T, -0.f);
  wz(0, 0) = 2.f;
  const auto s = pl::masked_mean(x, wz).eval();
  CHECK(s(0) == -1.f);
  CHECK(s(1) == 0.f);
}

TEST_CASE("fused and two-pass ppo_clip / value_loss agree to the bit for extreme positive weights", "[robustness]") {
  std::mt19937 rng(15);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const double palette[] = {1e30, 1.0, 1e-30, 3.0, 0.0, 1e-300, 7e15};
  const long B = 4, T = 21;
  Tok<double> lp(B, T), old(B, T), adv(B, T), w(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      lp(i, t) = -1 + 0.3 * u(rng);
      old(i, t) = -1 + 0.3 * u(rng);
      adv(i, t) = u(rng);
      w(i, t) = palette[static_cast<std::size_t>(rng() % 7)];
    }
  for (const auto mode : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                          pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm}) {
    CAPTURE(static_cast<int>(mode));
    pl::PpoOptions po;
    po.aggregation = mode;
    pl::ValueOptions vo;
    vo.aggregation = mode;
    Tok<double> g1(B, T), g2(B, T);
    const auto check = [&](const auto& two, const auto& fused) {
      two.backward(g1);
      CHECK(std::memcmp(&two.loss, &fused.loss, sizeof(double)) == 0);
      CHECK(std::memcmp(two.losses.data(), fused.losses.data(), sizeof(double) * B) == 0);
      CHECK(std::memcmp(g1.data(), g2.data(), sizeof(double) * B * T) == 0);
      CHECK(two.metrics.token_weight == fused.metrics.token_weight);
    };
    check(pl::ppo_clip(lp, old, adv, w, po), pl::ppo_clip(lp, old, adv, w, po, g2));
    check(pl::value_loss(lp, old, adv, w, vo), pl::value_loss(lp, old, adv, w, vo, g2));
  }
  // The probe's case: a negative weight is now rejected by both forms alike.
  Tok<double> w3(1, 3), x3(1, 3), g3(1, 3);
  w3.setValues({{1e30, 1, -1e30}});
  x3.setConstant(-1.0);
  pl::PpoOptions po;
  po.aggregation = pl::Aggregation::seq_mean_token_mean;
  expect_throw<pl::value_error>([&] { pl::ppo_clip(x3, x3, x3, w3, po); }, "ppo_clip", {"-1e+30 at [0, 2]"});
  expect_throw<pl::value_error>([&] { pl::ppo_clip(x3, x3, x3, w3, po, g3); }, "ppo_clip", {"-1e+30 at [0, 2]"});
}

TEST_CASE("options that pass a naive check but mean nothing are rejected", "[robustness]") {
  const auto x = filled(1, 4, -1.f);
  const auto xd = filled(1, 4, -1.0);
  const auto m = filled<std::uint8_t>(1, 4, 1);
  pl::PpoOptions o;
  o.clip_low = 1.5;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(x, x, x, m, o); }, "ppo_clip", {"'clip_low'", "in [0, 1]", "1.5"});
  o.clip_low = 1.0;  // lower clip off: accepted
  CHECK_NOTHROW(pl::ppo_clip(x, x, x, m, o));
  o = {};
  o.log_ratio_clamp = 1e-50;  // positive in double, 0 in float
  expect_throw<pl::option_error>([&] { pl::ppo_clip(x, x, x, m, o); }, "ppo_clip",
                                 {"'log_ratio_clamp'", "float", "1e-50"});
  CHECK_NOTHROW(pl::ppo_clip(xd, xd, xd, m, o));
  o = {};
  o.kl_coef = 0.1;
  o.k3_clamp = 1e-46;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(x, x, x, m, x, o); }, "ppo_clip", {"'k3_clamp'"});
  o = {};
  o.dual_clip = 1 + 1e-10;  // > 1 in double, exactly 1 in float
  expect_throw<pl::option_error>([&] { pl::ppo_clip(x, x, x, m, o); }, "ppo_clip", {"'dual_clip'", "float"});
  CHECK_NOTHROW(pl::ppo_clip(xd, xd, xd, m, o));
  o.dual_clip = INFINITY;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(xd, xd, xd, m, o); }, "ppo_clip", {"'dual_clip'"});
  pl::KlOptions k;
  k.k3_log_ratio_clamp = 1e-60;
  Tok<float> out(1, 4);
  expect_throw<pl::option_error>([&] { pl::kl_estimate(x, x, m, k, out); }, "kl_estimate", {"'k3_log_ratio_clamp'"});
}

TEST_CASE("two outputs that share memory are rejected before either is written", "[robustness]") {
  const long B = 2, T = 6;
  const auto x = filled(B, T, -1.f);
  const auto m = filled<std::uint8_t>(B, T, 1);
  Vec<float> ref(B);
  ref.setZero();
  OffsetMap<float> g(B, T, 0);
  const auto d = pl::dpo(pl::masked_sum(x, m), pl::masked_sum(x, m), ref, ref);
  expect_throw<pl::layout_error>([&] { d.backward(g.map, g.map); }, "dpo",
                                 {"'grad_chosen' and 'grad_rejected' overlap"});
  // Partial overlap: the rejected gradient starts one row into the chosen one.
  OffsetMap<float> big(B + 1, T, 0);
  Eigen::TensorMap<Tok<float>> lower(big.map.data() + T, B, T), upper(big.map.data(), B, T);
  expect_throw<pl::layout_error>([&] { d.backward(upper, lower); }, "dpo", {"overlap"});
  OffsetMap<float> g2(B, T, 0);
  expect_throw<pl::layout_error>([&] { pl::gae(x, x, m, pl::GaeOptions{}, g.map, g.map); }, "gae",
                                 {"'advantages_out' and 'returns_out'"});
  expect_throw<pl::layout_error>([&] { pl::kl_estimate(x, x, m, pl::KlOptions{}, g.map, g.map); }, "kl_estimate",
                                 {"'out' and 'grad_out'"});
  CHECK(g.untouched());
  CHECK(big.untouched());
  // Adjacent but disjoint outputs are fine: d loss / d chosen = -beta/2 / B, rejected +beta/2 / B.
  d.backward(upper, g2.map);
  CHECK(upper(1, 5) == Approx(-0.05 / B).epsilon(1e-6));
  CHECK(g2.map(0, 0) == Approx(0.05 / B).epsilon(1e-6));
}

TEST_CASE("a normalizer whose reciprocal overflows the token type is rejected", "[robustness]") {
  // Found by the fuzzer's tame-call check: nll with normalizer = DBL_TRUE_MIN gave a NaN loss for
  // a batch whose values sum to 0 (0 * (1 / DBL_TRUE_MIN) = 0 * inf). In float the gradient scale
  // 1/n is a float, so n below 1/FLT_MAX overflows it the same way.
  const auto check = [](auto zero, std::initializer_list<double> bad, double smallest_ok) {
    using S = decltype(zero);
    const long B = 2, T = 8;
    const auto lp = filled(B, T, S(-0.5)), old = filled(B, T, S(-0.5)), adv = filled(B, T, S(0));
    const auto m = filled<std::uint8_t>(B, T, 1);
    Tok<S> g(B, T);
    Vec<S> v(B);
    v.setZero();
    for (const double n : bad) {
      CAPTURE(n);
      g.setConstant(S(7));
      pl::NllOptions no;
      no.normalizer = n;
      expect_throw<pl::option_error>([&] { (void)pl::nll(v, no); }, "nll", {"'normalizer'", "reciprocal"});
      pl::PpoOptions p;
      p.token_count = n;
      expect_throw<pl::option_error>([&] { pl::ppo_clip(lp, old, adv, m, p, g); }, "ppo_clip", {"'token_count'"});
      pl::ValueOptions vo;
      vo.aggregation = pl::Aggregation::seq_mean_token_sum;
      vo.sequence_count = n;
      expect_throw<pl::option_error>([&] { pl::value_loss(lp, old, adv, m, vo, g); }, "value_loss",
                                     {"'sequence_count'"});
      for (long k = 0; k < g.size(); ++k) CHECK(g.data()[k] == S(7));
    }
    // The smallest accepted normalizer: zero sums stay 0, zero derivatives stay 0 (no inf * 0).
    pl::NllOptions no;
    no.normalizer = smallest_ok;
    CHECK(pl::nll(v, no).loss == S(0));
    pl::PpoOptions p;
    p.token_count = smallest_ok;
    const auto r = pl::ppo_clip(lp, old, adv, m, p, g);  // A = 0: every token derivative is 0
    CHECK(r.loss == S(0));
    for (long k = 0; k < g.size(); ++k) CHECK(g.data()[k] == S(0));
  };
  check(0.0, {DBL_TRUE_MIN, DBL_MIN / 8, 0.0, -1.0, HUGE_VAL}, 1.0 / DBL_MAX * 1.0000001);
  check(0.0f, {DBL_TRUE_MIN, 1e-40, 0.0, HUGE_VAL}, 1.0 / FLT_MAX * 1.0000001);
}
