// The options behind the conformance presets, in closed form on batches small enough to work by
// hand: the aggregation's row_weight_guard and count_empty_rows (every form: two-pass, fused,
// threads, packed; with NaN padding in the empty rows), the whitening's count_guard, bessel_guard
// and min_variance, GRPO's float32 singleton, ppo_clip's clip fraction as TRL's region_mean,
// verl's guarded metrics, DPO's sigmoid_label_smoothing, and the option errors. The presets
// themselves are compared with each anchor's formula in test_golden (golden_presets.txt).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <string>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

namespace {

const double qnan = std::numeric_limits<double>::quiet_NaN();
const double inf = std::numeric_limits<double>::infinity();

Tok<double> tok(long b, long t, std::vector<double> v) {
  Tok<double> x(b, t);
  for (long k = 0; k < b * t; ++k) x.data()[k] = v[static_cast<std::size_t>(k)];
  return x;
}
Tok<std::uint8_t> bytes(long b, long t, std::vector<int> v) {
  Tok<std::uint8_t> x(b, t);
  for (long k = 0; k < b * t; ++k) x.data()[k] = static_cast<std::uint8_t>(v[static_cast<std::size_t>(k)]);
  return x;
}

/// gpg's token loss is -A logp, so with A = 1 a token's loss is -logp and d loss / d logp is
/// -(the row's scale). Rows: {0.5, 0.25} (2 tokens), {} (empty, NaN / inf padding), {1.0}.
struct Batch {
  Tok<double> lp = tok(3, 2, {-0.5, -0.25, qnan, -inf, -1.0, qnan});
  Tok<double> old = tok(3, 2, {-0.5, -0.25, qnan, inf, -1.0, qnan});
  Tok<double> adv = tok(3, 2, {1.0, 1.0, qnan, qnan, 1.0, inf});
  Tok<std::uint8_t> m = bytes(3, 2, {1, 1, 0, 0, 1, 0});
};

/// The batch loss and row scales of each setting, worked by hand: S = {0.75, 0, 1}, W = {2, 0, 1}.
struct Want {
  double loss;
  double scale[3];
};

void check_gpg(const pl::GpgOptions& o, const Want& w) {
  const Batch b;
  Tok<double> g(3, 2), gf(3, 2);
  const auto r = pl::gpg(b.lp, b.old, b.adv, b.m, o);
  r.backward(g);
  const auto f = pl::gpg(b.lp, b.old, b.adv, b.m, o, gf);
  CHECK(r.loss == Approx(w.loss).epsilon(1e-15));
  CHECK(f.loss == r.loss);
  const double want_grad[6] = {-w.scale[0], -w.scale[0], 0, 0, -w.scale[2], 0};
  for (int k = 0; k < 6; ++k) {
    CAPTURE(k);
    CHECK(g.data()[k] == Approx(want_grad[k]).epsilon(1e-15));
    CHECK(gf.data()[k] == g.data()[k]);
  }
  CHECK(r.losses(1) == 0.0);  // the empty row, NaN and inf padding and all
  pl::ThreadPool two{2};
  pl::GpgOptions ot = o;
  ot.threads = two;
  Tok<double> gt(3, 2);
  const auto t = pl::gpg(b.lp, b.old, b.adv, b.m, ot, gt);
  CHECK(t.loss == r.loss);
  for (int k = 0; k < 6; ++k) CHECK(gt.data()[k] == g.data()[k]);
}

}  // namespace

TEST_CASE("count_empty_rows = false: the seq_* modes average over the rows that hold a token",
          "[presets][aggregation]") {
  pl::GpgOptions o;
  SECTION("seq_mean_token_sum: all rows, then the non-empty ones (verl agg_loss: 0.875 against 0.583)") {
    o.aggregation = pl::Aggregation::seq_mean_token_sum;
    check_gpg(o, {1.75 / 3, {1.0 / 3, 1.0 / 3, 1.0 / 3}});
    o.count_empty_rows = false;
    check_gpg(o, {1.75 / 2, {0.5, 0.5, 0.5}});
  }
  SECTION("seq_mean_token_mean and seq_mean_token_sum_norm") {
    o.count_empty_rows = false;
    o.aggregation = pl::Aggregation::seq_mean_token_mean;
    check_gpg(o, {(0.75 / 2 + 1.0) / 2, {0.25, 0.0, 0.5}});
    o.aggregation = pl::Aggregation::seq_mean_token_sum_norm;
    check_gpg(o, {1.75 / (2 * 2), {0.25, 0.25, 0.25}});
  }
  SECTION("sequence_count overrides it, and token_mean ignores it") {
    o.count_empty_rows = false;
    o.aggregation = pl::Aggregation::seq_mean_token_sum;
    o.sequence_count = 7.0;
    check_gpg(o, {1.75 / 7, {1.0 / 7, 1.0 / 7, 1.0 / 7}});
    o.sequence_count = std::nullopt;
    o.aggregation = pl::Aggregation::token_mean;
    check_gpg(o, {1.75 / 3, {1.0 / 3, 1.0 / 3, 1.0 / 3}});
  }
  SECTION("no row holds a token: 0, not NaN") {
    const Batch b;
    const Tok<std::uint8_t> none = bytes(3, 2, {0, 0, 0, 0, 0, 0});
    o.count_empty_rows = false;
    for (const auto mode : {pl::Aggregation::seq_mean_token_sum, pl::Aggregation::seq_mean_token_mean,
                            pl::Aggregation::seq_mean_token_sum_norm}) {
      o.aggregation = mode;
      Tok<double> g(3, 2);
      const auto r = pl::gpg(b.lp, b.old, b.adv, none, o, g);
      CHECK(r.loss == 0.0);
      for (int k = 0; k < 6; ++k) CHECK(g.data()[k] == 0.0);
    }
  }
}

TEST_CASE("row_weight_guard: seq_mean_token_mean divides a row by W_i + g (verl, OpenRLHF: 1e-8)",
          "[presets][aggregation]") {
  pl::GpgOptions o;
  o.aggregation = pl::Aggregation::seq_mean_token_mean;
  o.row_weight_guard = 0.5;  // large, so the closed form is far from the unguarded one
  check_gpg(o, {(0.75 / 2.5 + 1.0 / 1.5) / 3, {1.0 / (3 * 2.5), 0.0, 1.0 / (3 * 1.5)}});
  o.row_weight_guard = 1e-8;
  o.count_empty_rows = false;
  check_gpg(o, {(0.75 / (2 + 1e-8) + 1.0 / (1 + 1e-8)) / 2, {0.5 / (2 + 1e-8), 0.0, 0.5 / (1 + 1e-8)}});
  SECTION("an empty row's scale stays 0 for a guard whose reciprocal overflows") {
    o.row_weight_guard = std::numeric_limits<double>::denorm_min();
    check_gpg(o, {(0.75 / 2 + 1.0) / 2, {0.25, 0.0, 0.5}});
  }
  SECTION("the other modes do not read it") {
    o.count_empty_rows = true;
    o.row_weight_guard = 0.5;
    o.aggregation = pl::Aggregation::seq_mean_token_sum;
    check_gpg(o, {1.75 / 3, {1.0 / 3, 1.0 / 3, 1.0 / 3}});
  }
}

TEST_CASE("the aggregation options on a packed batch and through ppo_clip's row-scale pre-pass",
          "[presets][aggregation]") {
  // Packed rows {0.5, 0.25}, {} and {1.0}: the padded batch's numbers.
  Vec<double> lp(3), old(3), adv(3);
  Vec<std::uint8_t> m(3);
  lp.setValues({-0.5, -0.25, -1.0});
  old = lp;
  adv.setConstant(1.0);
  m.setConstant(1);
  Vec<std::int64_t> cu(4);
  cu.setValues({0, 2, 2, 3});
  pl::GpgOptions o;
  o.aggregation = pl::Aggregation::seq_mean_token_mean;
  o.count_empty_rows = false;
  o.row_weight_guard = 0.5;
  Vec<double> g(3);
  const auto r =
      pl::gpg(pl::packed(lp, cu), pl::packed(old, cu), pl::packed(adv, cu), pl::packed(m, cu), o, pl::packed(g, cu));
  CHECK(r.loss == Approx((0.75 / 2.5 + 1.0 / 1.5) / 2).epsilon(1e-15));
  CHECK(g(0) == Approx(-1.0 / (2 * 2.5)).epsilon(1e-15));
  CHECK(g(2) == Approx(-1.0 / (2 * 1.5)).epsilon(1e-15));

  // ppo_clip at r = 1 (logp = old) is -A per token, with d / d logp = -A times the row's scale.
  const Batch b;
  pl::PpoOptions p;
  p.aggregation = pl::Aggregation::seq_mean_token_sum;
  p.count_empty_rows = false;
  Tok<double> gp(3, 2);
  const auto rp = pl::ppo_clip(b.old, b.old, b.adv, b.m, p, gp);
  CHECK(rp.loss == Approx(-3.0 / 2).epsilon(1e-15));
  CHECK(gp(0, 0) == Approx(-0.5).epsilon(1e-15));
  CHECK(gp(2, 0) == Approx(-0.5).epsilon(1e-15));
}

TEST_CASE("ppo_clip: clip_fraction is TRL's region_mean, the clip conditioned on the advantage's sign",
          "[presets][ppo]") {
  // r = exp(logp - old) per token: 0.5 (A < 0: clipped below), 0.5 (A > 0: not clipped), 2 (A > 0:
  // clipped above), 2 (A < 0: not clipped), 1 (A = 0), and a masked token that would count.
  const double l2 = std::log(2.0);
  const Tok<double> lp = tok(1, 6, {-l2, -l2, l2, l2, 0.0, 5.0});
  const Tok<double> old = tok(1, 6, {0, 0, 0, 0, 0, 0});
  const Tok<double> adv = tok(1, 6, {-1.0, 1.0, 1.0, -1.0, 0.0, 1.0});
  const Tok<std::uint8_t> m = bytes(1, 6, {1, 1, 1, 1, 1, 0});
  const auto r = pl::ppo_clip(lp, old, adv, m, pl::preset::trl::grpo());
  CHECK(r.metrics.clip_fraction == Approx(2.0 / 5).epsilon(1e-15));
}

TEST_CASE("preset::verl::metrics divides every mean by W + 1e-8, as verl's masked_mean", "[presets][ppo]") {
  // One valid token, clipped from above: verl's pg_clipfrac is 1 / (1 + 1e-8).
  const Tok<double> lp = tok(1, 3, {1.0, qnan, -inf}), old = tok(1, 3, {0.0, qnan, qnan}),
                    adv = tok(1, 3, {1.0, qnan, 2});
  const Tok<std::uint8_t> m = bytes(1, 3, {1, 0, 0});
  const auto r = pl::ppo_clip(lp, old, adv, m, pl::preset::verl::ppo());
  const auto v = pl::preset::verl::metrics(r.metric_sums);
  CHECK(r.metrics.clip_fraction == 1.0);
  CHECK(v.clip_fraction == 1.0 / (1.0 + 1e-8));
  CHECK(v.approx_kl == -1.0 / (1.0 + 1e-8));
  CHECK(v.ratio_mean == Approx(std::exp(1.0) / (1.0 + 1e-8)).epsilon(1e-15));
  CHECK(v.ratio_mean < r.metrics.ratio_mean);
  CHECK(v.ratio_max == r.metrics.ratio_max);
  CHECK(v.token_weight == 1.0);
  // No valid token: 0 everywhere (verl: 0 / 1e-8 = 0), ratio_max 0 as in metrics().
  pl::PpoOptions global;
  global.token_count = 1.0;  // an empty shard
  const auto e = pl::preset::verl::metrics(pl::ppo_clip(lp, old, adv, bytes(1, 3, {0, 0, 0}), global).metric_sums);
  CHECK(e.clip_fraction == 0.0);
  CHECK(e.ratio_max == 0.0);
  CHECK(e.token_weight == 0.0);
}

TEST_CASE("masked_whiten: count_guard, bessel_guard and min_variance in closed form", "[presets][whiten]") {
  // Values 1, 2, 4 selected (W = 3), and a masked NaN.
  const Tok<double> x = tok(1, 4, {1.0, 2.0, qnan, 4.0});
  const Tok<std::uint8_t> m = bytes(1, 4, {1, 1, 0, 1});
  const auto whiten = [&](const pl::WhitenOptions& o) {
    Tok<double> out(1, 4);
    pl::masked_whiten(x, m, out, o);
    CHECK(out(0, 2) == 0.0);
    return out;
  };
  const auto expect = [&](const Tok<double>& out, double mean, double var, double eps, double add) {
    const double inv = 1.0 / std::sqrt(var + eps);
    CHECK(out(0, 0) == Approx((1.0 - mean) * inv + add).epsilon(1e-14));
    CHECK(out(0, 1) == Approx((2.0 - mean) * inv + add).epsilon(1e-14));
    CHECK(out(0, 3) == Approx((4.0 - mean) * inv + add).epsilon(1e-14));
  };
  const auto centered = [](double mean) {
    return (1 - mean) * (1 - mean) + (2 - mean) * (2 - mean) + (4 - mean) * (4 - mean);
  };
  pl::WhitenOptions o;
  o.count_guard = 0.5;
  o.eps = 0.0;
  {
    const double mean = 7.0 / 3.5;
    expect(whiten(o), mean, centered(mean) / 3.5 * 3.0 / 2.0, 0.0, 0.0);
  }
  o.bessel_guard = true;
  o.shift_mean = false;
  {
    const double mean = 7.0 / 3.5;
    expect(whiten(o), mean, centered(mean) / 3.5 * 3.5 / 2.5, 0.0, mean);
  }
  // Population variance of 1, 2, 4: 14/9; min_variance above it takes over.
  pl::WhitenOptions c;
  c.unbiased = false;
  c.eps = 0.0;
  c.min_variance = 3.0;
  expect(whiten(c), 7.0 / 3, 3.0, 0.0, 0.0);
  c.min_variance = 1.0;  // below it: no effect
  expect(whiten(c), 7.0 / 3, 14.0 / 9, 0.0, 0.0);
  SECTION("logit_whiten and the REINFORCE++ baseline read the same options") {
    Vec<double> p(3), out(3);
    p.setValues({0.5, 1.0 / (1.0 + std::exp(-2.0)), 1.0 / (1.0 + std::exp(-4.0))});  // logits 0, 2, 4
    pl::logit_whiten(p, c, out);  // population variance 8/3 > min_variance 1
    CHECK(out(0) == Approx(-2.0 / std::sqrt(8.0 / 3)).epsilon(1e-12));
    c.min_variance = 4.0;
    pl::logit_whiten(p, c, out);
    CHECK(out(0) == Approx(-1.0).epsilon(1e-12));
  }
}

TEST_CASE("whitening options are checked, naming the option", "[presets][whiten][errors]") {
  const Tok<double> x = tok(1, 2, {1.0, 2.0});
  const Tok<std::uint8_t> m = bytes(1, 2, {1, 1});
  Tok<double> out(1, 2);
  out.setConstant(7.0);
  pl::WhitenOptions o;
  o.count_guard = -1e-8;
  expect_throw<pl::option_error>([&] { pl::masked_whiten(x, m, out, o); }, "masked_whiten",
                                 {"'count_guard'", "-1e-08"});
  o.count_guard = 0.0;
  o.min_variance = qnan;
  expect_throw<pl::option_error>([&] { pl::masked_whiten(x, m, out, o); }, "masked_whiten", {"'min_variance'", "nan"});
  CHECK(out(0, 0) == 7.0);
  Vec<double> p(2), po(2);
  p.setValues({0.3, 0.6});
  expect_throw<pl::option_error>([&] { pl::logit_whiten(p, o, po); }, "logit_whiten", {"'min_variance'"});
}

TEST_CASE("aggregation options are checked, naming the option", "[presets][aggregation][errors]") {
  const Batch b;
  pl::GpgOptions o;
  o.row_weight_guard = -1.0;
  Tok<double> g(3, 2);
  g.setConstant(7.0);
  expect_throw<pl::option_error>([&] { pl::gpg(b.lp, b.old, b.adv, b.m, o, g); }, "gpg", {"'row_weight_guard'", "-1"});
  pl::PpoOptions p;
  p.row_weight_guard = inf;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(b.lp, b.old, b.adv, b.m, p, g); }, "ppo_clip",
                                 {"'row_weight_guard'", "inf"});
  CHECK(g(0, 0) == 7.0);
}

TEST_CASE("group_advantages: a lone sample divides by the float32 1 + epsilon (verl)", "[presets][grpo]") {
  Vec<double> s(3), out(3);
  s.setValues({1.0, -2.0, 0.5});
  pl::GroupOptions o = pl::preset::verl::grpo();
  pl::group_advantages(s, 1, o, out);
  const double denominator = static_cast<double>(1.0f + 1e-6f);
  CHECK(denominator != 1.0 + 1e-6);
  CHECK(out(0) == 1.0 / denominator);
  CHECK(out(1) == -2.0 / denominator);
  CHECK(out(0) == Approx(0.9999990463).epsilon(1e-10));
  o.singleton_std_float32 = false;
  pl::group_advantages(s, 1, o, out);
  CHECK(out(0) == 1.0 / (1.0 + 1e-6));
  // Groups of two or more are not affected.
  Vec<double> s2(2), o2(2), o3(2);
  s2.setValues({1.0, 3.0});
  pl::group_advantages(s2, 2, pl::preset::verl::grpo(), o2);
  pl::group_advantages(s2, 2, pl::GroupOptions{}, o3);
  CHECK(o2(0) == o3(0));
  CHECK(o2(0) == -1.0 / (std::sqrt(2.0) + 1e-6));
}

TEST_CASE("sigmoid_label_smoothing = false: TRL's sigmoid ignores label_smoothing, its robust does not",
          "[presets][dpo]") {
  Vec<double> pc(3), pr(3), rc(3), rr(3);
  pc.setValues({-3.0, -5.0, -2.0});
  pr.setValues({-4.0, -4.5, -6.0});
  rc.setValues({-3.5, -4.0, -2.5});
  rr.setValues({-4.0, -5.0, -5.0});
  pl::DpoOptions trl = pl::preset::trl::dpo();
  trl.beta = 1.0;
  trl.label_smoothing = 0.2;
  pl::DpoOptions plain;
  plain.beta = 1.0;
  const auto a = pl::dpo(pc, pr, rc, rr, trl);
  const auto z = pl::dpo(pc, pr, rc, rr, plain);
  CHECK(a.loss == z.loss);
  // The numbers: margin 1, smoothing 0.2 gives TRL 0.31326 (-logsig(1)).
  Vec<double> one(1), zero(1);
  one.setValues({1.0});
  zero.setValues({0.0});
  CHECK(pl::dpo(one, zero, zero, zero, trl).loss == Approx(std::log1p(std::exp(-1.0))).epsilon(1e-15));
  pl::DpoOptions cdpo = plain;
  cdpo.label_smoothing = 0.2;
  CHECK(pl::dpo(one, zero, zero, zero, cdpo).loss ==
        Approx(0.8 * std::log1p(std::exp(-1.0)) + 0.2 * std::log1p(std::exp(1.0))).epsilon(1e-15));
  trl.variant = cdpo.variant = pl::DpoVariant::robust;
  CHECK(pl::dpo(pc, pr, rc, rr, trl).loss == pl::dpo(pc, pr, rc, rr, cdpo).loss);
}
