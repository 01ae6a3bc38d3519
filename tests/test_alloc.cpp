// With caller-provided outputs, every loss allocates only [batch]-sized bookkeeping: the heap
// traffic (calls and bytes, std::malloc included, where Eigen::Tensor storage comes from) at T = 64
// and T = 65536 tokens per row must be identical. The counting harness is tests/alloc_count.hpp.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <prefloss/prefloss.hpp>

#include "alloc_count.hpp"

namespace {

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;
using alloc_count::measure;
using alloc_count::Traffic;

/// Inputs of one dpo / kto call with T tokens per row (allocated before counting starts).
template <class S>
struct Inputs {
  static constexpr long B = 8;
  long T;
  Tok<S> c, r, gc, gr, kl;
  Tok<std::uint8_t> mc, mr, mk;
  Vec<S> rc, rr, klr;
  Vec<std::uint8_t> d;
  explicit Inputs(long t)
      : T(t),
        c(B, t),
        r(B, t),
        gc(B, t),
        gr(B, t),
        kl(B / 2, t),
        mc(B, t),
        mr(B, t),
        mk(B / 2, t),
        rc(B),
        rr(B),
        klr(B / 2),
        d(B) {
    c.setConstant(S(-1.0));
    r.setConstant(S(-1.25));
    kl.setConstant(S(-0.5));
    mc.setConstant(1);
    mr.setConstant(1);
    mk.setConstant(1);
    mr.chip(0, 0).setConstant(0);  // an empty row too
    rc.setConstant(S(-0.9) * static_cast<S>(t));
    rr.setConstant(S(-1.3) * static_cast<S>(t));
    klr.setConstant(S(-0.6) * static_cast<S>(t));
    for (long i = 0; i < B; ++i) d(i) = static_cast<std::uint8_t>(i % 3 != 0);
  }
};

template <class S>
Traffic dpo_traffic(long T) {
  Inputs<S> in(T);
  pl::DpoOptions o;
  o.label_smoothing = 0.1;
  double loss = 0;
  const Traffic t = measure([&] {
    const auto res = pl::dpo(pl::masked_sum(in.c, in.mc), pl::masked_sum(in.r, in.mr), in.rc, in.rr, o);
    res.backward(in.gc, in.gr);
    loss = static_cast<double>(res.loss);
  });
  CHECK(std::isfinite(loss));
  return t;
}

template <class S>
Traffic kto_traffic(long T, bool given) {
  Inputs<S> in(T);
  pl::KtoOptions o;
  if (given) o.reference_point = 0.25;
  double loss = 0;
  const Traffic t = measure([&] {
    const auto res = pl::kto(pl::masked_sum(in.c, in.mc), in.rc, in.d, pl::masked_sum(in.kl, in.mk), in.klr, o);
    res.backward(in.gc);
    loss = static_cast<double>(res.loss);
  });
  CHECK(std::isfinite(loss));
  return t;
}

void same_traffic(const Traffic& small, const Traffic& large) {
  INFO("T=64: " << small.calls << " calls / " << small.bytes << " B;  T=65536: " << large.calls << " / " << large.bytes
                << " B");
  CHECK(small.calls == large.calls);
  CHECK(small.bytes == large.bytes);
  // The hooks are live: the result's [batch] bookkeeping is seen.
  CHECK(small.calls > 0);
  // And that bookkeeping is small: far below one [batch, 64] token tensor's worth per input.
  CHECK(small.bytes < 8 * 64 * 8);
}

struct Counts {
  long forward_backward, fused, value, bytes;
};

Counts count_for(long T) {
  const long B = 4;
  Tok<float> lp(B, T), old(B, T), adv(B, T), ref(B, T), g(B, T);
  Tok<std::uint8_t> m(B, T);
  lp.setConstant(-1.f);
  old.setConstant(-1.1f);
  adv.setConstant(0.5f);
  ref.setConstant(-0.9f);
  m.setConstant(1);
  pl::PpoOptions o;
  o.kl_coef = 0.1;
  o.dual_clip = 3;
  const Traffic fb = measure([&] {
    const auto r = pl::ppo_clip(lp, old, adv, m, ref, o);
    r.backward(g);
  });
  const Traffic fused = measure([&] { pl::ppo_clip(lp, old, adv, m, ref, o, g); });
  const Traffic value = measure([&] { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g); });
  return {fb.calls, fused.calls, value.calls, fb.bytes + fused.bytes + value.bytes};
}

}  // namespace

TEST_CASE("alloc: dpo forward + backward allocates independently of the token count", "[alloc][dpo]") {
  same_traffic(dpo_traffic<float>(64), dpo_traffic<float>(65536));
  same_traffic(dpo_traffic<double>(64), dpo_traffic<double>(65536));
}

TEST_CASE("alloc: kto forward + backward allocates independently of the token count", "[alloc][kto]") {
  for (const bool given : {false, true}) {
    same_traffic(kto_traffic<float>(64, given), kto_traffic<float>(65536, given));
    same_traffic(kto_traffic<double>(64, given), kto_traffic<double>(65536, given));
  }
}

TEST_CASE("alloc: the counters see a token-sized allocation", "[alloc]") {
  // Guard against a silently dead hook: an Eigen tensor of T tokens must be counted.
  const Traffic t = measure([] {
    Tok<float> x(8, 4096);
    x.setZero();
  });
  if (alloc_count::counts_malloc) {
    CHECK(t.bytes >= 8 * 4096 * static_cast<long>(sizeof(float)));
  } else {
    WARN("malloc is not counted on this platform: only operator new is");
  }
}

TEST_CASE("ppo_clip and value_loss allocate independently of the token count", "[ppo][alloc]") {
  const Counts small = count_for(64);
  const Counts large = count_for(65536);
  CHECK(small.forward_backward == large.forward_backward);
  CHECK(small.fused == large.fused);
  CHECK(small.value == large.value);
  CHECK(small.bytes == large.bytes);
  // Something is counted at all (the [batch] bookkeeping), so the hook is live.
  CHECK(small.forward_backward > 0);
}
