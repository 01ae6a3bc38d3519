// batch_count: the batch-mean losses split over shards (data-parallel ranks, accumulation
// micro-batches) add up to the whole batch. For every such loss, float and double, shardings
// with uneven shards, one-example shards and empty shards: per-example losses and gradient rows
// are the whole call's bits, and the shard losses sum to the whole loss within the rounding of
// one float/double sum per shard. Bad batch_count values throw.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <random>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class S>
using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Tensor<S, 1>;

constexpr Index kB = 7, kT = 9;

/// Rows [b, e) of a [B, T] tensor, or entries [b, e) of a [B] one.
template <class S>
Tok<S> rows(const Tok<S>& x, Index b, Index e) {
  Tok<S> y(e - b, x.dimension(1));
  if (y.size() > 0)
    std::memcpy(y.data(), x.data() + b * x.dimension(1), sizeof(S) * static_cast<std::size_t>(y.size()));
  return y;
}
template <class S>
Vec<S> rows(const Vec<S>& x, Index b, Index e) {
  Vec<S> y(e - b);
  for (Index i = b; i < e; ++i) y(i - b) = x(i);
  return y;
}

/// What one call reports: its loss, per-example losses and its gradient (token rows, or the
/// [B] / [B, K] values' gradient) flattened in example order.
struct Run {
  double loss = 0;
  std::vector<double> losses, grad;
};

template <class S>
std::vector<double> flat(const S* p, Index n) {
  return std::vector<double>(p, p + n);
}

/// One loss over rows [b, e) of the inputs, with the given batch_count.
template <class S>
using LossFn = std::function<Run(Index b, Index e, std::optional<double> count)>;

template <class S>
void check_shards(const char* name, const LossFn<S>& f) {
  CAPTURE(name);
  const Run whole = f(0, kB, std::nullopt);
  const std::vector<std::vector<Index>> shardings = {{0, 3, 7}, {0, 1, 1, 4, 7}, {0, 2, 3, 5, 6, 7}, {0, 7}};
  for (const auto& cuts : shardings) {
    double sum = 0, mag = 0;
    std::vector<double> losses, grad;
    for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
      const Run r = f(cuts[k], cuts[k + 1], static_cast<double>(kB));
      sum += r.loss;
      mag += std::fabs(r.loss);
      losses.insert(losses.end(), r.losses.begin(), r.losses.end());
      grad.insert(grad.end(), r.grad.begin(), r.grad.end());
    }
    CAPTURE(cuts.size());
    CHECK(losses == whole.losses);
    CHECK(grad == whole.grad);  // d term / d value times 1 / batch_count: the same bits
    // Each shard loss is its terms' double sum rounded once to S; the whole call rounds once.
    const double u = std::numeric_limits<S>::epsilon();
    CHECK(std::fabs(sum - whole.loss) <= u * (mag + std::fabs(whole.loss)) * static_cast<double>(cuts.size()));
  }
  // An empty shard: loss 0, no NaN anywhere.
  const Run empty = f(3, 3, static_cast<double>(kB));
  CHECK(empty.loss == 0.0);
  CHECK(empty.losses.empty());
}

template <class S>
struct Data {
  Tok<S> c, r;
  Tok<std::uint8_t> mc, mr;
  Vec<S> rc, rr, vc, vr, margin;
  Tok<S> scores;
  Vec<std::uint8_t> desirable;
  Data()
      : c(kB, kT),
        r(kB, kT),
        mc(kB, kT),
        mr(kB, kT),
        rc(kB),
        rr(kB),
        vc(kB),
        vr(kB),
        margin(kB),
        scores(kB, 4),
        desirable(kB) {
    std::mt19937 rng(5);
    std::uniform_real_distribution<double> lp(-3, -0.05), u(-1, 1);
    std::bernoulli_distribution keep(0.8);
    for (Index k = 0; k < c.size(); ++k) {
      c.data()[k] = static_cast<S>(lp(rng));
      r.data()[k] = static_cast<S>(lp(rng));
      mc.data()[k] = keep(rng);
      mr.data()[k] = keep(rng);
    }
    for (Index i = 0; i < kB; ++i) {
      rc(i) = static_cast<S>(-10 + u(rng));
      rr(i) = static_cast<S>(-10 + u(rng));
      vc(i) = static_cast<S>(u(rng));
      vr(i) = static_cast<S>(u(rng));
      margin(i) = static_cast<S>(0.1 * u(rng));
      desirable(i) = i % 3 != 0;
      for (Index a = 0; a < 4; ++a) scores(i, a) = static_cast<S>(u(rng));
    }
  }
};

/// A loss on the chosen/rejected token rows [b, e): sequence expressions of kind Seq.
template <class S, class Call>
Run pair_run(const Data<S>& d, Index b, Index e, Call&& call) {
  const Tok<S> c = rows(d.c, b, e), r = rows(d.r, b, e);
  const Tok<std::uint8_t> mc = rows(d.mc, b, e), mr = rows(d.mr, b, e);
  const Vec<S> rc = rows(d.rc, b, e), rr = rows(d.rr, b, e);
  Run out;
  Tok<S> gc(e - b, kT), gr(e - b, kT);
  const auto res = call(c, mc, r, mr, rc, rr);
  res.backward(gc, gr);
  out.loss = static_cast<double>(res.loss);
  out.losses = flat(res.losses.data(), res.losses.size());
  // Chosen then rejected rows, example by example.
  for (Index i = 0; i < e - b; ++i) {
    for (Index t = 0; t < kT; ++t) out.grad.push_back(static_cast<double>(gc(i, t)));
    for (Index t = 0; t < kT; ++t) out.grad.push_back(static_cast<double>(gr(i, t)));
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("batch_count: every batch-mean loss shards exactly", "[batch_count]", float, double) {
  using S = TestType;
  const Data<S> d;
  check_shards<S>("dpo", [&](Index b, Index e, std::optional<double> n) {
    return pair_run(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto& rc, auto& rr) {
      pl::DpoOptions o;
      o.batch_count = n;
      return pl::dpo(pl::masked_sum(c, mc), pl::masked_sum(r, mr), rc, rr, o);
    });
  });
  check_shards<S>("ipo", [&](Index b, Index e, std::optional<double> n) {
    return pair_run(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto& rc, auto& rr) {
      pl::IpoOptions o;
      o.batch_count = n;
      return pl::ipo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), rc, rr, o);
    });
  });
  check_shards<S>("simpo", [&](Index b, Index e, std::optional<double> n) {
    return pair_run(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto&, auto&) {
      pl::SimpoOptions o;
      o.batch_count = n;
      return pl::simpo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), o);
    });
  });
  check_shards<S>("orpo", [&](Index b, Index e, std::optional<double> n) {
    return pair_run(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto&, auto&) {
      pl::OrpoOptions o;
      o.batch_count = n;
      return pl::orpo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), o);
    });
  });
  check_shards<S>("bradley_terry", [&](Index b, Index e, std::optional<double> n) {
    const Vec<S> vc = rows(d.vc, b, e), vr = rows(d.vr, b, e), mg = rows(d.margin, b, e);
    pl::BradleyTerryOptions o;
    o.center_coef = 0.01;
    o.batch_count = n;
    const auto res = pl::bradley_terry(vc, vr, mg, o);
    Vec<S> gc(e - b), gr(e - b);
    res.backward(gc, gr);
    Run out{static_cast<double>(res.loss), flat(res.losses.data(), res.losses.size()), {}};
    for (Index i = 0; i < e - b; ++i) {
      out.grad.push_back(static_cast<double>(gc(i)));
      out.grad.push_back(static_cast<double>(gr(i)));
    }
    return out;
  });
  check_shards<S>("bradley_terry_ranking", [&](Index b, Index e, std::optional<double> n) {
    const Tok<S> x = rows(d.scores, b, e);
    pl::BradleyTerryOptions o;
    o.batch_count = n;
    const auto res = pl::bradley_terry_ranking(x, o);
    Tok<S> g(e - b, 4);
    res.backward(g);
    return Run{static_cast<double>(res.loss), flat(res.losses.data(), res.losses.size()), flat(g.data(), g.size())};
  });
  check_shards<S>("kto", [&](Index b, Index e, std::optional<double> n) {
    const Tok<S> c = rows(d.c, b, e);
    const Tok<std::uint8_t> mc = rows(d.mc, b, e);
    const Vec<S> rc = rows(d.rc, b, e), kl = rows(d.rr, b, e), klr = rows(d.rc, b, e);
    const Vec<std::uint8_t> lab = rows(d.desirable, b, e);
    pl::KtoOptions o;
    o.reference_point = 0.3;  // shared by every shard, as ranks all-reduce it
    o.desirable_weight = 1.33;
    o.batch_count = n;
    const auto res = pl::kto(pl::masked_sum(c, mc), rc, lab, kl, klr, o);
    Tok<S> g(e - b, kT);
    res.backward(g);
    return Run{static_cast<double>(res.loss), flat(res.losses.data(), res.losses.size()), flat(g.data(), g.size())};
  });
  check_shards<S>("nll", [&](Index b, Index e, std::optional<double> n) {
    const Tok<S> c = rows(d.c, b, e);
    const Tok<std::uint8_t> mc = rows(d.mc, b, e);
    pl::NllOptions o;
    o.batch_count = n;
    const auto res = pl::nll(pl::masked_mean(c, mc), o);
    Tok<S> g(e - b, kT);
    res.backward(g);
    return Run{static_cast<double>(res.loss), flat(res.losses.data(), res.losses.size()), flat(g.data(), g.size())};
  });
}

TEST_CASE("batch_count: bad values throw, naming the option and the value", "[batch_count][errors]") {
  const Data<float> d;
  const auto c = pl::masked_sum(d.c, d.mc), r = pl::masked_sum(d.r, d.mr);
  for (const double n :
       {6.0, 0.5, 0.0, -7.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    pl::DpoOptions o;
    o.batch_count = n;
    expect_throw<pl::option_error>([&] { (void)pl::dpo(c, r, d.rc, d.rr, o); }, "dpo",
                                   {"'batch_count'", "this call's batch (7)"});
    pl::NllOptions no;
    no.batch_count = n;
    expect_throw<pl::option_error>([&] { (void)pl::nll(c, no); }, "nll", {"'batch_count'"});
    pl::BradleyTerryOptions bo;
    bo.batch_count = n;
    expect_throw<pl::option_error>([&] { (void)pl::bradley_terry_ranking(d.scores, bo); }, "bradley_terry_ranking",
                                   {"'batch_count'"});
  }
  pl::NllOptions both;
  both.batch_count = 7;
  both.normalizer = 50;
  expect_throw<pl::option_error>([&] { (void)pl::nll(c, both); }, "nll", {"'normalizer'", "'batch_count'"});
  // Without batch_count an empty batch has no mean.
  const Tok<float> none(0, kT);
  const Tok<std::uint8_t> mnone(0, kT);
  const Vec<float> rnone(0);
  expect_throw<pl::shape_error>(
      [&] { (void)pl::dpo(pl::masked_sum(none, mnone), pl::masked_sum(none, mnone), rnone, rnone); }, "dpo",
      {"empty batch"});
}

TEST_CASE("token_weight is exact past float's 2^24", "[batch_count]") {
  // Two weights whose float sum rounds (2^24 + 1 is not a float); the metric is a double.
  Tok<float> lp(1, 2), old(1, 2), adv(1, 2), mask(1, 2);
  lp.setConstant(-1.0f);
  old.setConstant(-1.0f);
  adv.setConstant(0.5f);
  mask.setValues({{16777216.0f, 1.0f}});
  const auto r = pl::ppo_clip(lp, old, adv, mask);
  CHECK(r.metrics.token_weight == 16777217.0);
  Tok<float> v(1, 2), vold(1, 2), ret(1, 2);
  v.setConstant(0.5f);
  vold.setConstant(0.5f);
  ret.setConstant(1.0f);
  const auto q = pl::value_loss(v, vold, ret, mask);
  CHECK(q.metrics.token_weight == 16777217.0);
}
