// Heap allocations of the bf16/half entry points with caller-provided outputs must not grow with
// the number of tokens (16-bit rows are converted through fixed-size stack buffers): the heap
// traffic at T = 64 and T = 65536 tokens per row must be identical. The counting harness is
// tests/alloc_count.hpp.
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>
#include <cstdint>

#include "alloc_count.hpp"

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

namespace {

constexpr int n_calls = 6;

struct Counts {
  alloc_count::Traffic t[n_calls];
};

template <class T>
Counts count_for(long T_) {
  const long B = 4;
  Tok<T> lp(B, T_), old(B, T_), g(B, T_), kl(B, T_);
  Tok<float> adv(B, T_), a32(B, T_), r32(B, T_);
  Tok<std::uint8_t> m(B, T_);
  lp.setConstant(T(-1.f));
  old.setConstant(T(-1.1f));
  adv.setConstant(0.5f);
  m.setConstant(1);
  Eigen::Tensor<float, 1> up(B);
  up.setConstant(0.5f);
  pl::PpoOptions o;
  o.kl_coef = 0.1;
  Counts c;
  c.t[0] = alloc_count::measure([&] { pl::masked_mean(lp, m).backward(up, g); });
  c.t[1] = alloc_count::measure([&] {
    const auto r = pl::ppo_clip(lp, old, adv, m, old, o);
    r.backward(g);
  });
  c.t[2] = alloc_count::measure([&] { pl::ppo_clip(lp, old, adv, m, old, o, g); });
  c.t[3] = alloc_count::measure([&] { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g); });
  c.t[4] = alloc_count::measure([&] { pl::kl_estimate(lp, old, m, pl::KlOptions{}, kl, g); });
  c.t[5] = alloc_count::measure([&] { pl::gae(lp, adv, m, pl::GaeOptions{}, a32, r32); });
  return c;
}

template <class T>
void same_counts() {
  const Counts small = count_for<T>(64);
  const Counts large = count_for<T>(65536);
  for (int k = 0; k < n_calls; ++k) {
    CAPTURE(k);
    CHECK(small.t[k].calls == large.t[k].calls);
    CHECK(small.t[k].bytes == large.t[k].bytes);
  }
  // The token losses' [batch] bookkeeping is counted, so the hooks are live.
  CHECK(small.t[1].calls > 0);
}

}  // namespace

TEST_CASE("bf16/half entry points allocate independently of the token count", "[lowp][alloc]") {
  same_counts<Eigen::bfloat16>();
  same_counts<Eigen::half>();
}
