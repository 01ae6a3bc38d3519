// Threads: every call that takes a prefloss::Threads gives the same bits with no pool and with
// pools of 1, 2 and 3 threads (losses, per-row losses, metrics, gradients, log-probs), with
// ordinary and with streaming stores, over enough rows for several blocks, uneven rows
// (empty, short and full masks) and inf/NaN at masked-out tokens.
#include <atomic>
#include <cstddef>
std::size_t stream_bytes = std::size_t{32} << 20;
#define PREFLOSS_STREAMING_STORE_BYTES stream_bytes

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <random>
#include <thread>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class S>
using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;

template <class T>
bool same_bits(const T* a, const T* b, Index n) {
  return std::memcmp(a, b, sizeof(T) * static_cast<std::size_t>(n)) == 0;
}
template <class X>
bool same_bits(const X& a, const X& b) {
  return a.size() == b.size() && same_bits(a.data(), b.data(), a.size());
}
template <class T>
bool same_value(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
template <class T>
bool same_vec(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0);
}
template <class M>
bool same_metrics(const M& a, const M& b) {
  return std::memcmp(&a, &b, sizeof(M)) == 0;
}

/// [B, T] PPO inputs: row lengths from 0 to T, the rest masked out and poisoned.
template <class S>
struct Batch {
  Index B, T;
  Tok<S> logp, old, adv, ref;
  Tok<std::uint8_t> mask;
  Tok<float> weights;
  Batch(Index b, Index t) : B(b), T(t), logp(b, t), old(b, t), adv(b, t), ref(b, t), mask(b, t), weights(b, t) {
    std::mt19937 rng(static_cast<unsigned>(b * 131 + t));
    std::uniform_real_distribution<double> u(-0.4, 0.4), a(-2, 2), w(0.25, 2);
    std::uniform_int_distribution<Index> len(0, t);
    for (Index i = 0; i < B; ++i) {
      const Index n = i % 7 == 0 ? 0 : (i % 5 == 0 ? T : len(rng));
      for (Index k = 0; k < T; ++k) {
        old(i, k) = static_cast<S>(-1.5 + u(rng));
        logp(i, k) = static_cast<S>(old(i, k) + u(rng));
        ref(i, k) = static_cast<S>(old(i, k) + u(rng));
        adv(i, k) = static_cast<S>(a(rng));
        mask(i, k) = k < n;
        weights(i, k) = k < n ? static_cast<float>(w(rng)) : 0.f;
        if (k >= n && k % 3 == 0) {
          logp(i, k) = std::numeric_limits<S>::quiet_NaN();
          adv(i, k) = std::numeric_limits<S>::infinity();
        }
      }
    }
  }
};

/// The pools a case is run with; index 0 is "no pool" (the default handle).
struct Pools {
  pl::ThreadPool one{1}, two{2}, three{3};
  std::vector<pl::Threads> all() { return {pl::Threads{}, one, two, three}; }
};

}  // namespace

TEST_CASE("ThreadPool: sizes, errors, and a handle runs every block exactly once", "[threads]") {
  pl::ThreadPool p1(1), p3(3);
  CHECK(p1.size() == 1);
  CHECK(pl::Threads(p1).count() == 1);
  CHECK(pl::Threads(p3).count() == 3);
  CHECK(pl::Threads{}.count() == 1);
  expect_throw<pl::option_error>([] { pl::ThreadPool bad(0); }, "ThreadPool", {"threads", ">= 1", "got 0"});
  for (const Index rows : {Index{1}, Index{7}, Index{1000}}) {
    for (const Index grain : {Index{1}, Index{3}, Index{64}}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(rows));
      for (auto& h : hits) h = 0;
      pl::Threads(p3).for_rows(rows, grain, [&](Index b, Index e) {
        CHECK(e - b <= grain);
        for (Index i = b; i < e; ++i) ++hits[static_cast<std::size_t>(i)];
      });
      for (auto& h : hits) CHECK(h == 1);
    }
  }
  // Work from inside one of the pool's workers runs serially instead of waiting on the pool.
  Eigen::ThreadPool eigen_pool(2);
  const pl::Threads h = pl::threads_of(eigen_pool);
  CHECK(h.count() == 3);
  std::atomic<int> done{0};
  Eigen::Barrier b(2);
  for (int k = 0; k < 2; ++k)
    eigen_pool.Schedule([&] {
      std::atomic<int> n{0};
      h.for_rows(100, 1, [&](Index x, Index y) { n += static_cast<int>(y - x); });
      done += n;
      b.Notify();
    });
  b.Wait();
  CHECK(done == 200);
}

TEMPLATE_TEST_CASE("ppo_clip and value_loss: the same bits for every thread count", "[threads]", float, double) {
  using S = TestType;
  Pools pools;
  for (const std::size_t sb : {std::size_t{32} << 20, std::size_t{0}}) {
    stream_bytes = sb;
    const Batch<S> d(301, 263);  // row_grain: 124 rows a block, three blocks
    for (const auto level : {pl::ImportanceLevel::token, pl::ImportanceLevel::sequence})
      for (const auto mode : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                              pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm}) {
        CAPTURE(sb, static_cast<int>(mode), static_cast<int>(level));
        Tok<S> g0(d.B, d.T), b0(d.B, d.T);
        pl::PpoOptions opt;
        opt.aggregation = mode;
        opt.importance_level = level;
        opt.kl_coef = 0.05;
        opt.dual_clip = 3;
        const auto r0 = pl::ppo_clip(d.logp, d.old, d.adv, d.mask, d.ref, opt, g0);
        const Tok<S> w = d.weights.template cast<S>();
        const auto f0 = pl::ppo_clip(d.logp, d.old, d.adv, w, d.ref, opt);
        pl::ValueOptions vopt;
        vopt.aggregation = mode;
        Tok<S> v0(d.B, d.T);
        const auto q0 = pl::value_loss(d.logp, d.old, d.adv, d.mask, vopt, v0);
        r0.backward(b0);
        CHECK(same_bits(g0, b0));
        for (const pl::Threads& th : pools.all()) {
          CAPTURE(th.count());
          opt.threads = th;
          vopt.threads = th;
          Tok<S> g(d.B, d.T), b(d.B, d.T), v(d.B, d.T);
          const auto r = pl::ppo_clip(d.logp, d.old, d.adv, d.mask, d.ref, opt, g);
          CHECK(r.loss == r0.loss);
          CHECK(same_bits(r.losses, r0.losses));
          CHECK(same_metrics(r.metrics, r0.metrics));
          CHECK(same_bits(g, g0));
          const auto two_pass = pl::ppo_clip(d.logp, d.old, d.adv, d.mask, d.ref, opt);
          two_pass.backward(b);
          CHECK(two_pass.loss == r0.loss);
          CHECK(same_bits(b, g0));
          const auto f = pl::ppo_clip(d.logp, d.old, d.adv, w, d.ref, opt);
          CHECK(f.loss == f0.loss);
          CHECK(same_metrics(f.metrics, f0.metrics));
          const auto q = pl::value_loss(d.logp, d.old, d.adv, d.mask, vopt, v);
          CHECK(q.loss == q0.loss);
          CHECK(same_metrics(q.metrics, q0.metrics));
          CHECK(same_bits(v, v0));
        }
      }
  }
  stream_bytes = std::size_t{32} << 20;
}

TEMPLATE_TEST_CASE("masked_sum / masked_mean eval and backward: the same bits for every thread count", "[threads]",
                   float, double) {
  using S = TestType;
  Pools pools;
  const Batch<S> d(1000, 97);
  Eigen::Tensor<S, 1> up(d.B);
  for (Index i = 0; i < d.B; ++i) up(i) = static_cast<S>(0.01 * static_cast<double>(i % 13) - 0.05);
  for (const std::size_t sb : {std::size_t{32} << 20, std::size_t{0}}) {
    stream_bytes = sb;
    const auto sum = pl::masked_sum(d.logp, d.mask);
    const auto mean = pl::masked_mean(d.logp, d.weights);
    const Eigen::Tensor<S, 1> s0 = sum.eval(), m0 = mean.eval();
    Tok<S> gs0(d.B, d.T), gm0(d.B, d.T);
    sum.backward(up, gs0);
    mean.backward(up, gm0);
    for (const pl::Threads& th : pools.all()) {
      CAPTURE(sb, th.count());
      CHECK(same_bits(sum.eval(th), s0));
      CHECK(same_bits(mean.eval(th), m0));
      Tok<S> gs(d.B, d.T), gm(d.B, d.T);
      sum.backward(up, gs, th);
      mean.backward(up, gm, th);
      CHECK(same_bits(gs, gs0));
      CHECK(same_bits(gm, gm0));
    }
  }
  stream_bytes = std::size_t{32} << 20;
}

TEMPLATE_TEST_CASE("token_logprobs and ppo_clip_from_logits: the same bits for every thread count", "[threads]", float,
                   double) {
  using S = TestType;
  Pools pools;
  constexpr Index B = 6, T = 11, V = 3001;  // logit_grain: 87 tokens a block
  Eigen::Tensor<S, 3, Eigen::RowMajor> z(B, T, V);
  Tok<std::int64_t> y(B, T);
  const Batch<S> d(B, T);
  std::mt19937 rng(9);
  std::normal_distribution<double> n(0, 2);
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  for (Index k = 0; k < z.size(); ++k) z.data()[k] = static_cast<S>(n(rng));
  for (Index k = 0; k < y.size(); ++k) y.data()[k] = d.mask.data()[k] ? lab(rng) : -1;
  Tok<S> gl(B, T), gh(B, T);
  for (Index k = 0; k < gl.size(); ++k) {
    gl.data()[k] = static_cast<S>(0.1 * n(rng));
    gh.data()[k] = static_cast<S>(0.1 * n(rng));
  }
  for (const std::size_t sb : {std::size_t{32} << 20, std::size_t{0}}) {
    stream_bytes = sb;
    pl::LogprobOptions lo;
    lo.entropy = true;
    const auto r0 = pl::token_logprobs(z, y, d.mask, lo);
    Eigen::Tensor<S, 3, Eigen::RowMajor> g0(B, T, V), p0(B, T, V);
    r0.backward(gl, gh, g0);
    pl::PpoOptions popt;
    popt.aggregation = pl::Aggregation::seq_mean_token_mean;
    pl::LogprobOptions plo;
    plo.entropy_coef = 0.01;
    const auto q0 = pl::ppo_clip_from_logits(z, y, d.old, d.adv, d.mask, popt, plo, p0);
    for (const pl::Threads& th : pools.all()) {
      CAPTURE(sb, th.count());
      lo.threads = th;
      const auto r = pl::token_logprobs(z, y, d.mask, lo);
      CHECK(same_bits(r.logp, r0.logp));
      CHECK(same_bits(r.entropy, r0.entropy));
      Eigen::Tensor<S, 3, Eigen::RowMajor> g(B, T, V), p(B, T, V);
      r.backward(gl, gh, g);
      CHECK(same_bits(g, g0));
      // Either options' threads drive the passes over the logits.
      for (int which = 0; which < 2; ++which) {
        pl::PpoOptions po = popt;
        pl::LogprobOptions l2 = plo;
        (which == 0 ? po.threads : l2.threads) = th;
        const auto q = pl::ppo_clip_from_logits(z, y, d.old, d.adv, d.mask, po, l2, p);
        CHECK(q.loss == q0.loss);
        CHECK(same_bits(q.logp, q0.logp));
        CHECK(same_metrics(q.metrics, q0.metrics));
        CHECK(same_bits(p, p0));
      }
    }
  }
  stream_bytes = std::size_t{32} << 20;
}

TEMPLATE_TEST_CASE("the DPO family, KTO, nll and bradley_terry: the same bits for every thread count", "[threads]",
                   float, double) {
  using S = TestType;
  Pools pools;
  const Batch<S> c(1000, 97), r(1001, 97);  // row_grain: 337 rows a block, three blocks
  const Index B = 1000, T = 97;
  Tok<S> rl(B, T);
  Tok<std::uint8_t> rm(B, T);
  std::memcpy(rl.data(), r.logp.data(), sizeof(S) * static_cast<std::size_t>(B * T));
  std::memcpy(rm.data(), r.mask.data(), static_cast<std::size_t>(B * T));
  Eigen::Tensor<S, 1> rc(B), rr(B);
  Eigen::Tensor<bool, 1> des(B);
  for (Index i = 0; i < B; ++i) {
    rc(i) = static_cast<S>(-30 + 0.01 * static_cast<double>(i % 17));
    rr(i) = static_cast<S>(-31 + 0.02 * static_cast<double>(i % 13));
    des(i) = i % 3 != 0;
  }
  // Every loss as a closure over its options: loss, losses, metric sums and both gradients,
  // fused and two-pass.
  struct Out {
    double loss = 0;
    std::vector<S> losses, g1, g2, b1, b2;
    std::vector<double> sums;
  };
  const auto pack = [&](const auto& res, Tok<S>& g1, Tok<S>& g2, Tok<S>& b1, Tok<S>& b2) {
    Out o;
    o.loss = static_cast<double>(res.loss);
    o.losses.assign(res.losses.data(), res.losses.data() + res.losses.size());
    o.sums.assign(res.metric_sums.sums.begin(), res.metric_sums.sums.end());
    o.g1.assign(g1.data(), g1.data() + g1.size());
    o.g2.assign(g2.data(), g2.data() + g2.size());
    o.b1.assign(b1.data(), b1.data() + b1.size());
    o.b2.assign(b2.data(), b2.data() + b2.size());
    return o;
  };
  const auto run = [&](int which, const pl::Threads& th) {
    Tok<S> g1(B, T), g2(B, T), b1(B, T), b2(B, T);
    g2.setZero();
    b2.setZero();
    const auto sc = pl::masked_sum(c.logp, c.mask);
    const auto sr = pl::masked_sum(rl, rm);
    const auto mc = pl::masked_mean(c.logp, c.weights);
    const auto mr = pl::masked_mean(rl, rm);
    switch (which) {
      case 0: {
        pl::DpoOptions o;
        o.label_smoothing = 0.1;
        o.threads = th;
        const auto f = pl::dpo(sc, sr, rc, rr, o, g1, g2);
        pl::dpo(sc, sr, rc, rr, o).backward(b1, b2);
        return pack(f, g1, g2, b1, b2);
      }
      case 1: {
        pl::IpoOptions o;
        o.threads = th;
        const auto f = pl::ipo(mc, mr, rc, rr, o, g1, g2);
        pl::ipo(mc, mr, rc, rr, o).backward(b1, b2);
        return pack(f, g1, g2, b1, b2);
      }
      case 2: {
        pl::SimpoOptions o;
        o.threads = th;
        const auto f = pl::simpo(mc, mr, o, g1, g2);
        pl::simpo(mc, mr, o).backward(b1, b2);
        return pack(f, g1, g2, b1, b2);
      }
      case 3: {
        pl::OrpoOptions o;
        o.threads = th;
        const auto f = pl::orpo(mc, mr, o, g1, g2);
        pl::orpo(mc, mr, o).backward(b1, b2);
        return pack(f, g1, g2, b1, b2);
      }
      case 4: {
        pl::KtoOptions o;
        o.threads = th;
        const auto f = pl::kto(sc, rc, des, sr, rr, o, g1);
        pl::kto(sc, rc, des, sr, rr, o).backward(b1);
        CHECK(pl::kto_reference_sums(sr, rr, th).sum == pl::kto_reference_sums(sr, rr).sum);
        return pack(f, g1, g2, b1, b2);
      }
      case 5: {
        pl::NllOptions o;
        o.threads = th;
        const auto f = pl::nll(mc, o, g1);
        pl::nll(mc, o).backward(b1);
        return pack(f, g1, g2, b1, b2);
      }
      default: {
        pl::BradleyTerryOptions o;
        o.center_coef = 0.01;
        o.threads = th;
        const auto f = pl::bradley_terry(mc, mr, o);
        f.backward(g1, g2);
        f.backward(b1, b2);
        return pack(f, g1, g2, b1, b2);
      }
    }
  };
  for (const std::size_t sb : {std::size_t{32} << 20, std::size_t{0}}) {
    stream_bytes = sb;
    for (int which = 0; which < 7; ++which) {
      const Out want = run(which, pl::Threads{});
      CHECK(same_vec(want.g1, want.b1));
      for (const pl::Threads& th : pools.all()) {
        CAPTURE(sb, which, th.count());
        const Out got = run(which, th);
        CHECK(same_value(got.loss, want.loss));
        CHECK(same_vec(got.losses, want.losses));
        CHECK(same_vec(got.sums, want.sums));
        CHECK(same_vec(got.g1, want.g1));
        CHECK(same_vec(got.g2, want.g2));
        CHECK(same_vec(got.b1, want.b1));
        CHECK(same_vec(got.b2, want.b2));
      }
    }
  }
  stream_bytes = std::size_t{32} << 20;
}
