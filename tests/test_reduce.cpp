// masked_sum / masked_mean: values, adjoints, NaN padding, weights, empty rows, shape errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>

#include "throws.hpp"

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

namespace {

// Reference: the definition, summed in long double.
template <class S, class M>
long double ref_row(const Tok<S>& x, const Tok<M>& m, long i, bool mean) {
  long double s = 0, w = 0;
  for (long t = 0; t < x.dimension(1); ++t)
    if (m(i, t) != M(0)) {
      s += static_cast<long double>(m(i, t)) * x(i, t);
      w += static_cast<long double>(m(i, t));
    }
  return mean ? (w != 0 ? s / w : 0) : s;
}

template <class S, class M>
void check_against_reference(long B, long T, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> val(-8.0, 0.0), wt(0.25, 2.0);
  std::bernoulli_distribution keep(0.7);
  Tok<S> x(B, T);
  Tok<M> m(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool k = keep(rng);
      if constexpr (std::is_floating_point_v<M>) {
        m(i, t) = k ? static_cast<M>(wt(rng)) : M(0);
      } else {
        m(i, t) = static_cast<M>(k);
      }
      // Padding holds the values that poison a multiply-by-mask implementation.
      x(i, t) = k ? static_cast<S>(val(rng))
                  : (t % 2 ? std::numeric_limits<S>::quiet_NaN() : -std::numeric_limits<S>::infinity());
    }
  const auto sum = pl::masked_sum(x, m).eval();
  const auto mean = pl::masked_mean(x, m).eval();
  const double tol = std::is_same_v<S, float> ? 2e-7 : 1e-14;
  for (long i = 0; i < B; ++i) {
    const long double rs = ref_row(x, m, i, false), rm = ref_row(x, m, i, true);
    CHECK(std::fabs(sum(i) - rs) <= tol * std::fabs(rs) + 1e-30);
    CHECK(std::fabs(mean(i) - rm) <= tol * std::fabs(rm) + 1e-30);
  }

  // Adjoint of sum_i g_i value_i against the closed form: g_i w_it (/ W_i for the mean).
  Eigen::Tensor<S, 1> g(B);
  for (long i = 0; i < B; ++i) g(i) = static_cast<S>(0.5 + i);
  Tok<S> gs(B, T), gm(B, T);
  gs.setConstant(S(42));
  gm.setConstant(S(42));
  pl::masked_sum(x, m).backward(g, gs);
  pl::masked_mean(x, m).backward(g, gm);
  for (long i = 0; i < B; ++i) {
    long double W = 0;
    for (long t = 0; t < T; ++t)
      if (m(i, t) != M(0)) W += static_cast<long double>(m(i, t));
    for (long t = 0; t < T; ++t) {
      const long double w = m(i, t) != M(0) ? static_cast<long double>(m(i, t)) : 0;
      const long double es = g(i) * w, em = W != 0 ? g(i) * w / W : 0;
      CHECK(std::fabs(gs(i, t) - es) <= tol * std::fabs(es));
      CHECK(std::fabs(gm(i, t) - em) <= 4 * tol * std::fabs(em));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("masked reductions match the definition, padding holds inf/NaN", "[reduce]", float, double) {
  // Widths around every SIMD width and tail length.
  for (long T : {1L, 3L, 7L, 8L, 15L, 16L, 17L, 31L, 33L, 64L, 129L, 1000L}) {
    check_against_reference<TestType, std::uint8_t>(3, T, 1u + static_cast<unsigned>(T));
    check_against_reference<TestType, bool>(3, T, 2u + static_cast<unsigned>(T));
    check_against_reference<TestType, float>(3, T, 3u + static_cast<unsigned>(T));
    check_against_reference<TestType, double>(3, T, 4u + static_cast<unsigned>(T));
  }
}

TEST_CASE("masked_sum over a map with an unaligned start", "[reduce]") {
  std::vector<float> buf(1 + 2 * 37);
  std::vector<std::uint8_t> mb(1 + 2 * 37);
  for (std::size_t k = 0; k < buf.size(); ++k) {
    buf[k] = -static_cast<float>(k % 5);
    mb[k] = k % 3 != 0;
  }
  Eigen::TensorMap<const Tok<float>> x(buf.data() + 1, 2, 37);
  Eigen::TensorMap<const Tok<std::uint8_t>> m(mb.data() + 1, 2, 37);
  const auto s = pl::masked_sum(x, m).eval();
  for (long i = 0; i < 2; ++i) {
    double e = 0;
    for (long t = 0; t < 37; ++t)
      if (m(i, t)) e += x(i, t);
    CHECK(s(i) == Approx(e).epsilon(1e-7));
  }
}

TEST_CASE("empty rows: sum 0, mean 0, gradient 0", "[reduce]") {
  Tok<float> x(2, 20);
  x.setConstant(std::numeric_limits<float>::quiet_NaN());
  Tok<std::uint8_t> m(2, 20);
  m.setZero();
  const auto s = pl::masked_sum(x, m).eval();
  const auto mn = pl::masked_mean(x, m).eval();
  CHECK(s(0) == 0.f);
  CHECK(mn(1) == 0.f);
  Eigen::Tensor<float, 1> g(2);
  g.setConstant(3.f);
  Tok<float> gr(2, 20);
  gr.setConstant(7.f);
  pl::masked_mean(x, m).backward(g, gr);
  for (long t = 0; t < 20; ++t) CHECK(gr(1, t) == 0.f);
}

TEST_CASE("a selected -inf sums to -inf, a selected NaN gives NaN", "[reduce]") {
  Tok<float> x(2, 40);
  x.setConstant(-1.f);
  x(0, 21) = -std::numeric_limits<float>::infinity();
  x(1, 5) = std::numeric_limits<float>::quiet_NaN();
  Tok<std::uint8_t> m(2, 40);
  m.setConstant(1);
  const auto s = pl::masked_sum(x, m).eval();
  CHECK(std::isinf(s(0)));
  CHECK(s(0) < 0);
  CHECK(std::isnan(s(1)));
}

TEST_CASE("float rows of 1M tokens sum within 1e-6 relative", "[reduce][accuracy]") {
  const long T = 1 << 20;
  Tok<float> x(1, T);
  Tok<std::uint8_t> m(1, T);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-12.f, -1e-3f);
  long double exact = 0;
  for (long t = 0; t < T; ++t) {
    x(0, t) = d(rng);
    m(0, t) = 1;
    exact += x(0, t);
  }
  const auto s = pl::masked_sum(x, m).eval();
  const auto mn = pl::masked_mean(x, m).eval();
  CHECK(std::fabs((s(0) - exact) / exact) <= 1e-6);
  CHECK(std::fabs((mn(0) - exact / T) / (exact / T)) <= 1e-6);
}

TEST_CASE("shape mismatches throw shape_error naming the argument; nothing is written", "[reduce][errors]") {
  Tok<float> x(2, 5);
  x.setZero();
  Tok<std::uint8_t> m(2, 6);
  m.setZero();
  expect_throw<pl::shape_error>([&] { (void)pl::masked_sum(x, m); }, "masked_sum", {"'mask'", "[2, 6]", "[2, 5]"});
  expect_throw<pl::shape_error>([&] { (void)pl::masked_mean(x, m); }, "masked_mean", {"'mask'", "[2, 6]", "[2, 5]"});
  Tok<std::uint8_t> ok(2, 5);
  ok.setConstant(1);
  Eigen::Tensor<float, 1> g(2), bad_g(3);
  g.setConstant(1.f);
  bad_g.setConstant(1.f);
  Tok<float> out(2, 4);
  out.setConstant(9.f);
  expect_throw<pl::shape_error>([&] { pl::masked_sum(x, ok).backward(g, out); }, "backward", {"'grad'", "[2, 4]"});
  Tok<float> out2(2, 5);
  out2.setConstant(9.f);
  expect_throw<pl::shape_error>([&] { pl::masked_sum(x, ok).backward(bad_g, out2); }, "backward", {"'upstream'"});
  for (long i = 0; i < 2; ++i)
    for (long t = 0; t < 5; ++t) CHECK(out2(i, t) == 9.f);
}

TEST_CASE("masked reductions: any nonzero mask byte selects with weight 1, rows of every length", "[reduce]") {
  // Rows long enough for the 64- and 32-byte mask-counting steps plus their tails.
  const std::uint8_t bytes[] = {0, 1, 2, 128, 255, 0, 7};
  for (long T : {1L, 31L, 64L, 65L, 200L}) {
    const long B = 3;
    Tok<float> x(B, T);
    Tok<std::uint8_t> m(B, T);
    Eigen::Tensor<float, 1> up(B);
    for (long i = 0; i < B; ++i) {
      up(i) = static_cast<float>(i + 1);
      for (long t = 0; t < T; ++t) {
        m(i, t) = bytes[(i + t * 3) % 7];
        x(i, t) = m(i, t) ? static_cast<float>(t % 5) : std::numeric_limits<float>::quiet_NaN();
      }
    }
    const auto sum = pl::masked_sum(x, m).eval();
    const auto mean = pl::masked_mean(x, m).eval();
    Tok<float> g(B, T);
    pl::masked_mean(x, m).backward(up, g);
    for (long i = 0; i < B; ++i) {
      double s = 0, n = 0;
      for (long t = 0; t < T; ++t)
        if (m(i, t) != 0) {
          s += x(i, t);
          n += 1;
        }
      INFO("T = " << T << ", row " << i << ": " << n << " selected");
      CHECK(sum(i) == static_cast<float>(s));
      CHECK(mean(i) == static_cast<float>(n != 0 ? s / n : 0.0));
      for (long t = 0; t < T; ++t) CHECK(g(i, t) == (m(i, t) != 0 ? static_cast<float>(up(i) / n) : 0.0f));
    }
  }
}
