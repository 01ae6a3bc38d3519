// The one float accumulator of the row kernels (detail/row_loop.hpp LaneSum), through both of
// its users, masked reductions and token losses: the error bound on long rows, float lanes that
// overflow where the double definition does not, and selected inf / NaN.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <vector>

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
using ld = long double;

namespace {
// Unit roundoff of float.
const ld u = std::ldexp(ld(1), -24);
}  // namespace

TEST_CASE("LaneSum: at most chunk_batches - 1 float roundings per term on a 1M-value row of either sign",
          "[lane_sum]") {
  using namespace pl::detail;
  const std::size_t n = std::size_t(1) << 20;
  std::vector<float> x(n);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> d(-10.f, 10.f);
  ld exact = 0, abs_sum = 0;
  for (auto& v : x) {
    v = d(rng);
    exact += v;
    abs_sum += std::fabs(static_cast<ld>(v));
  }
  // The calling pattern of the kernels: flush every chunk_batches adds.
  LaneSum<float> s;
  int c = 0;
  for (std::size_t t = 0; t < n; t += lanes<float>) {
    s.add(batch<float>::load_unaligned(x.data() + t));
    if (++c == chunk_batches) {
      s.flush();
      c = 0;
    }
  }
  const ld got = total(s);
  // (chunk_batches - 1) float roundings of partial sums no larger than sum |x| of the chunk, and
  // n / lanes double adds.
  const ld bound = ld(chunk_batches - 1) * u * abs_sum + ld(n) * std::ldexp(ld(1), -53) * abs_sum;
  std::printf("LaneSum 1M floats: error %.3Lg, bound %.3Lg (sum |x| %.6Lg)\n", std::fabs(got - exact), bound, abs_sum);
  CHECK(std::fabs(got - exact) <= bound);
}

TEST_CASE("masked_sum / masked_mean with float weights: 1M-token rows within 1e-6 relative", "[lane_sum][reduce]") {
  const long T = 1 << 20;
  Tok<float> x(2, T), w(2, T);
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> d(-12.f, -1e-3f), wt(0.25f, 2.f);
  std::bernoulli_distribution keep(0.8);
  ld s[2] = {0, 0}, a[2] = {0, 0}, W[2] = {0, 0};
  for (long i = 0; i < 2; ++i)
    for (long t = 0; t < T; ++t) {
      const bool k = keep(rng);
      // Row 1 of both signs: the bound is then relative to sum |w x|.
      x(i, t) = i == 0 ? d(rng) : (t % 2 ? -d(rng) : d(rng));
      w(i, t) = k ? wt(rng) : 0.f;
      if (k) {
        const ld wx = static_cast<ld>(w(i, t)) * x(i, t);
        s[i] += wx;
        a[i] += std::fabs(wx);
        W[i] += w(i, t);
      } else {
        x(i, t) = std::numeric_limits<float>::quiet_NaN();
      }
    }
  const auto sum = pl::masked_sum(x, w).eval();
  const auto mean = pl::masked_mean(x, w).eval();
  CHECK(std::fabs((sum(0) - s[0]) / s[0]) <= 1e-6L);
  CHECK(std::fabs((mean(0) - s[0] / W[0]) / (s[0] / W[0])) <= 1e-6L);
  // One rounding of w * x, chunk_batches - 1 of a float lane, and the float result's own.
  CHECK(std::fabs(sum(1) - s[1]) <= pl::detail::chunk_batches * u * a[1] + u * std::fabs(s[1]));
}

TEST_CASE("masked_sum: float lanes that overflow give the double definition's sum", "[lane_sum][reduce]") {
  // 3e38 + 3e38 overflows a float lane, while the definition sums in double: token t holds
  // +b for t % 4 < 2 and -b otherwise, so every prefix ends within 2b and the row sums to 0.
  const float b = 3e38f;
  for (long T : {64L, 67L, 1000L}) {
    Tok<float> x(1, T);
    Tok<std::uint8_t> m(1, T);
    ld exact = 0;
    for (long t = 0; t < T; ++t) {
      x(0, t) = t % 4 < 2 ? b : -b;
      m(0, t) = 1;
      exact += x(0, t);
    }
    CAPTURE(T);
    const auto s = pl::masked_sum(x, m).eval();
    const auto mn = pl::masked_mean(x, m).eval();
    CHECK(static_cast<ld>(s(0)) == static_cast<float>(exact));
    CHECK(static_cast<ld>(mn(0)) == static_cast<float>(exact / T));
  }
}

TEST_CASE("masked_sum: one float lane that overflows alone gives the double definition's sum", "[lane_sum][reduce]") {
  // Tokens 0 and 2 * lanes meet in one float lane within one chunk (b + b = inf in float), eight
  // tokens of -b / 8 spread over other lanes: the definition's double sum is b, finite.
  const float b = 3e38f;
  const long w = static_cast<long>(pl::detail::lanes<float>);
  for (long T : {4 * w + 1, 200L, 1000L}) {
    Tok<float> x(1, T);
    Tok<std::uint8_t> m(1, T);
    x.setZero();
    m.setConstant(1);
    x(0, 0) = b;
    x(0, 2 * w) = b;
    for (long t = 1; t <= 8; ++t) x(0, t == 2 * w ? 9 : t) = -b / 8;
    CAPTURE(T);
    CHECK(pl::masked_sum(x, m).eval()(0) == b);
    CHECK(pl::masked_mean(x, m).eval()(0) == static_cast<float>(static_cast<double>(b) / static_cast<double>(T)));
  }
}

TEST_CASE("masked_sum: a selected +inf with a selected -inf gives NaN, +inf alone +inf", "[lane_sum][reduce]") {
  Tok<float> x(3, 50);
  x.setConstant(1.f);
  x(0, 3) = std::numeric_limits<float>::infinity();
  x(0, 40) = -std::numeric_limits<float>::infinity();
  x(1, 49) = std::numeric_limits<float>::infinity();  // in the padded tail
  x(2, 7) = std::numeric_limits<float>::infinity();
  Tok<std::uint8_t> m(3, 50);
  m.setConstant(1);
  m(2, 7) = 0;  // masked out: row 2 is 49 ones
  const auto s = pl::masked_sum(x, m).eval();
  CHECK(std::isnan(s(0)));
  CHECK(s(1) == std::numeric_limits<float>::infinity());
  CHECK(s(2) == 49.f);
}

TEMPLATE_TEST_CASE("ppo_clip: a selected infinite or NaN token loss reaches its row as in the definition",
                   "[lane_sum][ppo]", float, double) {
  using S = TestType;
  const long B = 3, T = 37;
  Tok<S> lp(B, T), old(B, T), adv(B, T), g(B, T), g2(B, T);
  Tok<std::uint8_t> m(B, T);
  lp.setConstant(S(-1));
  old.setConstant(S(-1));  // ratio 1
  adv.setConstant(S(-0.5));
  m.setConstant(1);
  // Row 0: A = -inf at one token: -A * ratio = +inf on both branches, the row's loss is +inf.
  adv(0, 5) = -std::numeric_limits<S>::infinity();
  // Row 1: A = NaN at a token of the tail: NaN.
  adv(1, 36) = std::numeric_limits<S>::quiet_NaN();
  pl::PpoOptions opt;
  opt.aggregation = pl::Aggregation::seq_mean_token_sum;
  const auto fused = pl::ppo_clip(lp, old, adv, m, opt, g);
  const auto two = pl::ppo_clip(lp, old, adv, m, opt);
  two.backward(g2);
  for (const auto* r : {&fused, &two}) {
    CHECK(r->losses(0) == std::numeric_limits<S>::infinity());
    CHECK(std::isnan(r->losses(1)));
    // Row 2: 37 tokens of loss 0.5, over B rows.
    CHECK(r->losses(2) == Approx(37 * 0.5 / B).epsilon(1e-6));
    CHECK(std::isnan(r->loss));
  }
  CHECK(std::memcmp(g.data(), g2.data(), sizeof(S) * B * T) == 0);
}
