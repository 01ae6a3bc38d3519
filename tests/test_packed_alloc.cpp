// Heap allocations of packed entry points with caller-provided outputs must not grow with the
// number of tokens: the heap traffic at 64 and 65536 tokens per row must be identical. Its own
// executable, as test_lowp_alloc: the counting harness (tests/alloc_count.hpp) replaces operator
// new/delete, which GCC 12 (-Wmismatched-new-delete) misreads in the bf16 paths test_packed runs.
#include <catch2/catch.hpp>
#include <cstdint>
#include <prefloss/prefloss.hpp>

#include "alloc_count.hpp"

namespace pl = prefloss;
using Index = pl::Index;
template <class T>
using Flat = Eigen::Tensor<T, 1>;

namespace {

/// Heap traffic of packed calls with caller-provided outputs over 8 rows of `per_row` tokens.
alloc_count::Traffic packed_traffic(Index per_row) {
  const Index B = 8, N = B * per_row;
  Flat<float> lp(N), old(N), adv(N), g(N), out(N), ret(N);
  lp.setConstant(-1.0f);
  old.setConstant(-1.1f);
  adv.setConstant(0.5f);
  Flat<std::uint8_t> m(N);
  m.setConstant(1);
  Flat<std::int32_t> cu(B + 1);
  for (Index i = 0; i <= B; ++i) cu(i) = static_cast<std::int32_t>(i * per_row);
  Flat<float> up(B);
  up.setConstant(1.0f);
  const auto P = [&](Flat<float>& t) { return pl::packed(t, cu); };
  return alloc_count::measure([&] {
    const auto r = pl::ppo_clip(P(lp), P(old), P(adv), pl::packed(m, cu), pl::PpoOptions{}, g);
    r.backward(g);
    pl::masked_mean(P(lp), pl::packed(m, cu)).backward(up, P(g));
    pl::kl_estimate(P(lp), P(old), pl::packed(m, cu), pl::KlOptions{}, out, g);
    pl::gae(P(lp), P(old), pl::packed(m, cu), pl::GaeOptions{}, out, ret);
  });
}

TEST_CASE("packed: no allocation proportional to tokens", "[packed][alloc]") {
  const alloc_count::Traffic small = packed_traffic(64), large = packed_traffic(65536);
  CHECK(small.calls == large.calls);
  CHECK(small.bytes == large.bytes);
  CHECK(small.calls > 0);  // the [batch] result vectors: the counter sees them
}

}  // namespace
