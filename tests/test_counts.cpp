// Counts first: token_counts and row_weights against counts taken by hand from the mask,
// kto_reference_sums against kto's own z0 and the whole KL batch, and sequence parallelism:
// ppo_clip and value_loss in seq_mean_token_mean over rows split between shards (columns
// [0, c) on one shard, [c, T) on the other), with the all-reduced row_weights, add up to the
// unsplit call. Bad row_weights throw before anything is written.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class S>
using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Tensor<S, 1>;

/// Columns [b, e) of a [B, T] tensor.
template <class S>
Tok<S> cols(const Tok<S>& x, Index b, Index e) {
  Tok<S> y(x.dimension(0), e - b);
  for (Index i = 0; i < x.dimension(0); ++i)
    for (Index t = b; t < e; ++t) y(i, t - b) = x(i, t);
  return y;
}

}  // namespace

TEST_CASE("token_counts and row_weights count the mask", "[counts]") {
  Tok<std::uint8_t> m(3, 5);
  const std::uint8_t v[15] = {1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
  std::copy(v, v + 15, m.data());
  const pl::TokenCounts c = pl::token_counts(m);
  CHECK(c.tokens == 8);
  CHECK(c.nonempty_rows == 2);
  CHECK(c.rows == 3);
  CHECK(c.weight == 8.0);
  const Vec<double> w = pl::row_weights(m);
  REQUIRE(w.size() == 3);
  CHECK(w(0) == 3.0);
  CHECK(w(1) == 0.0);
  CHECK(w(2) == 5.0);

  // Float weights: the weight is their sum, tokens the nonzero entries.
  Tok<float> f(2, 3);
  const float fv[6] = {0.5f, 0.f, 0.25f, 0.f, 0.f, 2.f};
  std::copy(fv, fv + 6, f.data());
  const pl::TokenCounts cf = pl::token_counts(f);
  CHECK(cf.tokens == 3);
  CHECK(cf.nonempty_rows == 2);
  CHECK(cf.weight == 2.75);

  // Packed rows [0, 2), [2, 2), [2, 6).
  Vec<std::uint8_t> flat(6);
  const std::uint8_t pv[6] = {1, 1, 0, 1, 1, 0};
  std::copy(pv, pv + 6, flat.data());
  Vec<std::int64_t> cu(4);
  cu(0) = 0, cu(1) = 2, cu(2) = 2, cu(3) = 6;
  const pl::TokenCounts cp = pl::token_counts(pl::packed(flat, cu));
  CHECK(cp.tokens == 4);
  CHECK(cp.nonempty_rows == 2);
  CHECK(cp.rows == 3);

  pl::TokenCounts sum = c;
  sum += cf;
  CHECK(sum.tokens == 11);
  CHECK(sum.rows == 5);
  CHECK(sum.weight == 10.75);

  f(1, 1) = -1.f;
  expect_throw<pl::value_error>([&] { (void)pl::token_counts(f); }, "token_counts", {"mask", "-1", "[1, 1]"});
  expect_throw<pl::value_error>([&] { (void)pl::row_weights(f); }, "row_weights", {"mask", "-1"});
}

TEST_CASE("token_counts' weight is the token_weight ppo_clip reports, past 2^24", "[counts]") {
  // 2^24 + 1 selected tokens: float would round the count to 2^24.
  const Index T = (Index{1} << 24) + 1;
  Tok<float> z(1, T);
  z.setZero();
  Tok<std::uint8_t> m(1, T);
  m.setConstant(1);
  const auto r = pl::ppo_clip(z, z, z, m);
  CHECK(pl::token_counts(m).weight == r.metrics.token_weight);
  CHECK(pl::token_counts(m).tokens == static_cast<std::int64_t>(T));
}

TEMPLATE_TEST_CASE("kto_reference_sums: one shard is kto's z0, shards add up to the whole KL batch", "[counts][kto]",
                   float, double) {
  using S = TestType;
  constexpr Index K = 11;
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-1, 1);
  Vec<S> kp(K), kr(K), s(4), rho(4);
  for (Index j = 0; j < K; ++j) {
    kp(j) = static_cast<S>(u(rng) + 0.4);
    kr(j) = static_cast<S>(u(rng));
  }
  for (Index i = 0; i < 4; ++i) {
    s(i) = static_cast<S>(u(rng));
    rho(i) = static_cast<S>(u(rng));
  }
  Vec<bool> d(4);
  d.setValues({true, false, true, false});

  const pl::KtoReferenceSums whole = pl::kto_reference_sums(kp, kr);
  CHECK(whole.count == K);
  const auto r = pl::kto(s, rho, d, kp, kr);
  pl::KtoOptions given;
  given.reference_point = whole.reference_point();
  const auto rg = pl::kto(s, rho, d, kp, kr, given);
  CHECK(rg.loss == r.loss);
  CHECK(static_cast<S>(whole.reference_point()) == r.metrics.reference_point);

  // Uneven shards [0, 2), [2, 3), [3, 11): the sums add to the whole one's within one double
  // rounding a shard, and z0 is the whole batch's mean (TRL's mean of the three means is not).
  pl::KtoReferenceSums merged;
  const Index cuts[] = {0, 2, 3, K};
  double mean_of_means = 0, mag = 0;
  for (int k = 0; k < 3; ++k) {
    const Index b = cuts[k], e = cuts[k + 1];
    Vec<S> p(e - b), q(e - b);
    for (Index j = b; j < e; ++j) {
      p(j - b) = kp(j);
      q(j - b) = kr(j);
      mag += std::fabs(static_cast<double>(kp(j)) - static_cast<double>(kr(j)));
    }
    const pl::KtoReferenceSums part = pl::kto_reference_sums(p, q);
    mean_of_means += part.sum / static_cast<double>(part.count) / 3;
    merged += part;
  }
  CHECK(merged.count == K);
  CHECK(std::fabs(merged.sum - whole.sum) <= 3 * std::numeric_limits<double>::epsilon() * mag);
  CHECK(std::fabs(merged.reference_point() - whole.reference_point()) <=
        3 * std::numeric_limits<double>::epsilon() * mag / K);
  CHECK(std::fabs(mean_of_means - whole.sum / K) > 1e-3);

  expect_throw<pl::value_error>([] { (void)pl::KtoReferenceSums{}.reference_point(); }, "kto_reference_sums",
                                {"count 0"});
  Vec<S> short_ref(K - 1);
  short_ref.setZero();
  expect_throw<pl::shape_error>([&] { (void)pl::kto_reference_sums(kp, short_ref); }, "kto_reference_sums",
                                {"kl_ref", "kl_policy"});
}

namespace {

/// A token batch whose rows split at column c: the first row's tokens all fall in [0, c), the
/// second's in [c, T), the third is empty, and the rest are random.
template <class S>
struct SeqData {
  static constexpr Index B = 5, T = 37;
  Tok<S> logp, old, adv, ref;
  Tok<std::uint8_t> mask;
  SeqData() : logp(B, T), old(B, T), adv(B, T), ref(B, T), mask(B, T) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<double> u(-0.3, 0.3), a(-2, 2);
    std::bernoulli_distribution keep(0.7);
    for (Index i = 0; i < B; ++i)
      for (Index t = 0; t < T; ++t) {
        old(i, t) = static_cast<S>(-1 + u(rng));
        logp(i, t) = static_cast<S>(old(i, t) + u(rng));
        ref(i, t) = static_cast<S>(old(i, t) + u(rng));
        adv(i, t) = static_cast<S>(a(rng));
        mask(i, t) = keep(rng);
      }
    for (Index t = 0; t < T; ++t) {
      mask(0, t) = t < 10;
      mask(1, t) = t >= 30;
      mask(2, t) = 0;
    }
    // Masked-out tokens may hold anything: they must not reach a sum.
    logp(2, 3) = std::numeric_limits<S>::quiet_NaN();
    adv(0, 20) = std::numeric_limits<S>::infinity();
  }
};

/// sum_i sum_t w |l_it| / (B W_i): the scale of the rounding in a seq_mean_token_mean loss.
inline double abs_scale(const rlref::Data& d, const std::vector<rlref::ld>& l) {
  double total = 0;
  for (long i = 0; i < d.B; ++i) {
    double s = 0, w = 0;
    for (long t = 0; t < d.T; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) continue;
      s += static_cast<double>(d.w[k] * std::fabs(l[k]));
      w += static_cast<double>(d.w[k]);
    }
    if (w != 0) total += s / (w * static_cast<double>(d.B));
  }
  return total;
}

template <class S>
double max_abs(const Tok<S>& x) {
  double m = 0;
  for (Index k = 0; k < x.size(); ++k) m = std::fmax(m, std::fabs(static_cast<double>(x.data()[k])));
  return m;
}

}  // namespace

TEMPLATE_TEST_CASE("row_weights: seq_mean_token_mean over rows split between shards is the unsplit call", "[counts]",
                   float, double) {
  using S = TestType;
  using D = SeqData<S>;
  const D d;
  constexpr Index B = D::B, T = D::T;
  for (const Index c : {Index{1}, Index{16}, Index{30}}) {
    CAPTURE(c);
    pl::PpoOptions whole_opt;
    whole_opt.aggregation = pl::Aggregation::seq_mean_token_mean;
    whole_opt.kl_coef = 0.1;
    Tok<S> gw(B, T);
    const auto whole = pl::ppo_clip(d.logp, d.old, d.adv, d.mask, d.ref, whole_opt, gw);

    // Each shard holds every row's columns [b, e); the row weights are all-reduced first.
    const Index cut[] = {0, c, T};
    Vec<double> w = pl::row_weights(cols(d.mask, 0, c));
    const Vec<double> w2 = pl::row_weights(cols(d.mask, c, T));
    for (Index i = 0; i < B; ++i) w(i) += w2(i);
    pl::PpoOptions opt = whole_opt;
    opt.row_weights.assign(w.data(), w.data() + B);
    pl::ValueOptions vopt;
    vopt.aggregation = pl::Aggregation::seq_mean_token_mean;
    vopt.clip = 0.2;
    vopt.row_weights = opt.row_weights;
    const auto vwhole = pl::value_loss(d.logp, d.old, d.adv, d.mask, vopt);

    const rlref::Data rd = rlref::to_data(d.logp, d.old, d.adv, d.mask, &d.ref);
    const double ppo_abs = abs_scale(rd, rlref::ppo_ref(rd, whole_opt).tokens);
    const double value_abs = abs_scale(rd, rlref::value_ref(rd, vopt).tokens);
    double loss = 0, vloss = 0;
    for (int k = 0; k < 2; ++k) {
      const Index b = cut[k], e = cut[k + 1];
      const Tok<S> lp = cols(d.logp, b, e), old = cols(d.old, b, e), adv = cols(d.adv, b, e), ref = cols(d.ref, b, e);
      const Tok<std::uint8_t> m = cols(d.mask, b, e);
      Tok<S> g(B, e - b);
      const auto r = pl::ppo_clip(lp, old, adv, m, ref, opt, g);
      loss += static_cast<double>(r.loss);
      // A byte mask's row weights are exact counts, so the shard's row scale is the unsplit
      // row's and its gradient entries are the same bits.
      for (Index i = 0; i < B; ++i)
        for (Index t = b; t < e; ++t) CHECK(g(i, t - b) == gw(i, t));
      vloss += static_cast<double>(pl::value_loss(lp, old, adv, m, vopt).loss);
    }
    // Token losses are the same bits on either side; each row sum (whole, or each part) is within
    // 7 eps sum |w l| of exact (the float lane chunks; far less in double), and each of the three
    // losses is rounded once to S: 21 eps of the absolute scale plus 3 half-ulps of the loss.
    const double u = std::numeric_limits<S>::epsilon();
    const auto bound = [&](double abs, double a, double b) {
      return 21 * u * abs + 1.5 * u * (std::fabs(a) + std::fabs(b));
    };
    CHECK(std::fabs(loss - static_cast<double>(whole.loss)) <= bound(ppo_abs, loss, whole.loss));
    CHECK(std::fabs(vloss - static_cast<double>(vwhole.loss)) <= bound(value_abs, vloss, vwhole.loss));
    CHECK(max_abs(gw) > 0);
  }
}

TEST_CASE("row_weights: bad values throw naming the option", "[counts][errors]") {
  const SeqData<float> d;
  Tok<float> g(SeqData<float>::B, SeqData<float>::T);
  g.setConstant(7.f);
  pl::PpoOptions opt;
  opt.aggregation = pl::Aggregation::seq_mean_token_mean;
  opt.row_weights = {1, 2, 3};
  expect_throw<pl::option_error>([&] { (void)pl::ppo_clip(d.logp, d.old, d.adv, d.mask, opt, g); }, "ppo_clip",
                                 {"row_weights", "one entry per row (5)", "got 3"});
  opt.row_weights = {1, 2, std::nan(""), 4, 5};
  expect_throw<pl::option_error>([&] { (void)pl::ppo_clip(d.logp, d.old, d.adv, d.mask, opt, g); }, "ppo_clip",
                                 {"row_weights", "nan", "row 2"});
  opt.row_weights = {1, 2, 3, -4, 5};
  expect_throw<pl::option_error>([&] { (void)pl::ppo_clip(d.logp, d.old, d.adv, d.mask, opt, g); }, "ppo_clip",
                                 {"row_weights", "-4", "row 3"});
  opt.row_weights = {1, 2, 3, 4, 5};
  opt.aggregation = pl::Aggregation::token_mean;
  expect_throw<pl::option_error>([&] { (void)pl::ppo_clip(d.logp, d.old, d.adv, d.mask, opt, g); }, "ppo_clip",
                                 {"row_weights", "seq_mean_token_mean"});
  pl::ValueOptions vopt;
  vopt.row_weights = {1, 2};
  expect_throw<pl::option_error>([&] { (void)pl::value_loss(d.logp, d.old, d.adv, d.mask, vopt); }, "value_loss",
                                 {"row_weights"});
  CHECK(g(0, 0) == 7.f);
  CHECK(g(4, 36) == 7.f);
}

TEST_CASE("ppo_clip / value_loss: an empty shard with the global normalizer gives 0", "[counts]") {
  const Tok<float> none(0, 5);
  const Tok<std::uint8_t> mnone(0, 5);
  Tok<float> g(0, 5);
  pl::PpoOptions opt;
  opt.token_count = 12;
  const auto r = pl::ppo_clip(none, none, none, mnone, opt, g);
  CHECK(r.loss == 0.f);
  CHECK(r.losses.size() == 0);
  CHECK(r.metrics.token_weight == 0.0);
  pl::ValueOptions vopt;
  vopt.aggregation = pl::Aggregation::seq_mean_token_mean;
  vopt.sequence_count = 4;
  CHECK(pl::value_loss(none, none, none, mnone, vopt).loss == 0.f);
  // Without it the mean of nothing is undefined.
  expect_throw<pl::shape_error>([&] { (void)pl::ppo_clip(none, none, none, mnone); }, "ppo_clip",
                                {"logp", "empty batch", "[0, 5]", "token_count"});
  vopt.sequence_count.reset();
  expect_throw<pl::shape_error>([&] { (void)pl::value_loss(none, none, none, mnone, vopt); }, "value_loss",
                                {"values", "empty batch", "sequence_count"});
}
