// token_logprobs: values against a long double reference, the confident-token accuracy, the
// gradients against central finite differences in double, special values, masking and errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

// The streaming-store threshold as a variable, so one binary checks both store paths.
namespace {
std::size_t stream_bytes = std::size_t{32} << 20;
}
#define PREFLOSS_STREAMING_STORE_BYTES stream_bytes
#include <prefloss/logits/token_logprobs.hpp>
#include <random>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class T>
using Logits = Eigen::Tensor<T, 3, Eigen::RowMajor>;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
using Labels = Tok<std::int64_t>;
using Mask = Tok<std::uint8_t>;

/// log softmax(u)_y and the entropy of softmax(u), u = z / tau, in long double.
struct Ref {
  long double logp, entropy;
};
template <class T>
Ref reference(const T* z, Index V, Index y, double tau) {
  long double m = -INFINITY;
  std::vector<long double> u(static_cast<std::size_t>(V));
  for (Index v = 0; v < V; ++v) {
    u[static_cast<std::size_t>(v)] = static_cast<long double>(static_cast<double>(z[v])) / tau;
    m = std::max(m, u[static_cast<std::size_t>(v)]);
  }
  long double s = 0, so = 0, t = 0;
  for (Index v = 0; v < V; ++v) {
    const long double d = u[static_cast<std::size_t>(v)] - m, e = std::exp(d);
    s += e;
    if (v != y) so += e;
    if (e > 0) t += e * d;
  }
  const long double dy = u[static_cast<std::size_t>(y)] - m;
  const long double logp = dy == 0 ? -std::log1p(so) : dy - std::log(s);
  return {logp, std::log(s) - t / s};
}

template <class T>
Logits<T> random_logits(Index B, Index L, Index V, double spread, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0, spread);
  Logits<T> z(B, L, V);
  for (Index k = 0; k < z.size(); ++k) z.data()[k] = static_cast<T>(n(rng));
  return z;
}

Labels random_labels(Index B, Index L, Index V, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<Index> u(0, V - 1);
  Labels y(B, L);
  for (Index k = 0; k < y.size(); ++k) y.data()[k] = u(rng);
  return y;
}

Mask ones(Index B, Index L) {
  Mask m(B, L);
  m.setConstant(1);
  return m;
}

template <class T>
constexpr double eps() {
  return std::numeric_limits<T>::epsilon();
}

/// The relative error bound of a vocabulary sum of n nonnegative terms, in units of eps<T>():
/// float lanes widened into double every 8 adds, 7 * 2^-24 = 3.5 eps whatever n; double lanes
/// summed plainly, ceil(n / lanes) roundings in a lane and lanes more to combine them.
template <class T>
double sum_bound(Index n) {
  constexpr auto W = static_cast<Index>(pl::detail::lanes<T>);
  return std::is_same_v<T, float> ? 3.5 : static_cast<double>((n + W - 1) / W + W);
}

}  // namespace

TEMPLATE_TEST_CASE("token_logprobs: logp and entropy against long double, every vocabulary size", "[logprobs]", float,
                   double) {
  using T = TestType;
  for (const Index V : {1, 2, 3, 7, 15, 16, 17, 31, 33, 100, 1000, 4097}) {
    for (const double tau : {1.0, 0.7, 2.5}) {
      const Index B = 2, L = 3;
      const auto z = random_logits<T>(B, L, V, 3.0, static_cast<unsigned>(V * 10 + tau * 3));
      const auto y = random_labels(B, L, V, static_cast<unsigned>(V));
      pl::LogprobOptions o;
      o.temperature = tau;
      o.entropy = true;
      const Mask m = ones(B, L);
      const auto r = pl::token_logprobs(z, y, m, o);
      REQUIRE(r.logp.dimension(0) == B);
      REQUIRE(r.entropy.dimension(1) == L);
      for (Index i = 0; i < B * L; ++i) {
        const Ref ref = reference(z.data() + i * V, V, y.data()[i], tau);
        // Each exp <= 1 ulp, the sum within sum_bound, the product z * (1 / tau) one rounding
        // times |u| <= ~16 (spread 3, tau 0.7), the logs in double: the log-sum-exp is within
        // (sum_bound + 2 + 16) eps absolute; logp (= a - log S, or -log1p(S_o)) and entropy
        // (= log S - E[d], both terms >= 0, |E[d]| <= entropy) carry at most that relative to
        // (1 + |value|), plus the rounding of the result.
        const double tol = (sum_bound<T>(V) + 20) * eps<T>();
        CAPTURE(V, tau, i);
        CHECK(std::fabs(static_cast<double>(r.logp.data()[i]) - static_cast<double>(ref.logp)) <=
              tol * (1 + std::fabs(static_cast<double>(ref.logp))));
        CHECK(std::fabs(static_cast<double>(r.entropy.data()[i]) - static_cast<double>(ref.entropy)) <=
              tol * (1 + std::fabs(static_cast<double>(ref.entropy))));
      }
    }
  }
}

TEMPLATE_TEST_CASE("token_logprobs: confident tokens keep logp and 1 - p relative accuracy", "[logprobs]", float,
                   double) {
  using T = TestType;
  // One row per target probability p_y in [1e-30, 1 - 1e-7]: the label's logit a, the other
  // V - 1 at 0, so p_y = e^a / (e^a + V - 1) and a = log(p (V - 1) / (1 - p)).
  const Index V = 1000;
  std::vector<double> ps;
  for (int e = -30; e <= 0; ++e) ps.push_back(std::pow(10.0, e) * 0.5);
  for (int e = 1; e <= 7; ++e) ps.push_back(1 - std::pow(10.0, -e));
  const auto B = static_cast<Index>(ps.size());
  Logits<T> z(B, 1, V);
  z.setZero();
  Labels y(B, 1);
  for (Index b = 0; b < B; ++b) {
    const double p = ps[static_cast<std::size_t>(b)];
    y(b, 0) = b % V;
    z(b, 0, y(b, 0)) = static_cast<T>(std::log(p * static_cast<double>(V - 1) / (1 - p)));
  }
  const Mask m = ones(B, 1);
  const auto r = pl::token_logprobs(z, y, m);
  double worst_logp = 0, worst_q = 0;
  for (Index b = 0; b < B; ++b) {
    const Ref ref = reference(z.data() + b * V, V, y(b, 0), 1.0);
    const long double q_ref = -std::expm1(ref.logp);
    const double lp = static_cast<double>(r.logp(b, 0));
    worst_logp =
        std::max(worst_logp, std::fabs(lp - static_cast<double>(ref.logp)) / std::fabs(static_cast<double>(ref.logp)));
    worst_q = std::max(worst_q, std::fabs(-std::expm1(lp) - static_cast<double>(q_ref)) / static_cast<double>(q_ref));
  }
  // The label holds the maximum from p ~ 1e-3 on: logp = -log1p(S_o), S_o a sum of V - 1 equal
  // exps (each <= 1 ulp, the sum within sum_bound): logp's relative error is at most theirs, and
  // 1 - p_y = -expm1(logp) inherits it, plus the rounding of logp to T and expm1's own ulp.
  // Below, logp = a - log S with no cancellation.
  std::printf("token_logprobs %s: worst relative error over p_y in [5e-31, 1 - 1e-7]: logp %.3g, 1 - p %.3g\n",
              sizeof(T) == 4 ? "float" : "double", worst_logp, worst_q);
  CHECK(worst_logp <= (sum_bound<T>(V) + 2) * eps<T>());
  CHECK(worst_q <= (sum_bound<T>(V) + 3) * eps<T>());
}

TEST_CASE("token_logprobs: backward against central finite differences in double", "[logprobs]") {
  for (const Index V : {1, 2, 5, 16, 17, 100, 333}) {
    for (const bool with_entropy : {false, true}) {
      const Index B = 2, L = 2;
      const double tau = 0.8;
      auto z = random_logits<double>(B, L, V, 2.0, static_cast<unsigned>(V + 7));
      const auto y = random_labels(B, L, V, static_cast<unsigned>(V + 3));
      Mask m = ones(B, L);
      m(1, 0) = 0;
      pl::LogprobOptions o;
      o.temperature = tau;
      o.entropy = with_entropy;
      Tok<double> gl(B, L), gh(B, L);
      std::mt19937 rng(11);
      std::normal_distribution<double> n(0, 1);
      for (Index k = 0; k < gl.size(); ++k) {
        gl.data()[k] = n(rng);
        gh.data()[k] = n(rng);
      }
      // f(z) = sum over selected tokens of gl logp + gh entropy.
      const auto f = [&](const Logits<double>& zz) {
        const auto r = pl::token_logprobs(zz, y, m, o);
        double s = 0;
        for (Index k = 0; k < B * L; ++k) {
          if (!m.data()[k]) continue;
          s += gl.data()[k] * r.logp.data()[k];
          if (with_entropy) s += gh.data()[k] * r.entropy.data()[k];
        }
        return s;
      };
      const auto r = pl::token_logprobs(z, y, m, o);
      Logits<double> g(B, L, V);
      if (with_entropy)
        r.backward(gl, gh, g);
      else
        r.backward(gl, g);
      const double h = 1e-6;
      for (Index k = 0; k < z.size(); ++k) {
        const double keep = z.data()[k];
        z.data()[k] = keep + h;
        const double up = f(z);
        z.data()[k] = keep - h;
        const double dn = f(z);
        z.data()[k] = keep;
        const double fd = (up - dn) / (2 * h);
        CAPTURE(V, with_entropy, k);
        // Central differences: truncation h^2 |f'''| / 6 and rounding eps |f| / h, both < 1e-8 here.
        CHECK(std::fabs(g.data()[k] - fd) <= 1e-7 * (1 + std::fabs(fd)));
      }
      for (Index v = 0; v < V; ++v) CHECK(g(1, 0, v) == 0.0);  // the masked-out token
    }
  }
}

TEST_CASE("token_logprobs: -inf, NaN and +inf logits; masked-out tokens are never read", "[logprobs]") {
  const double ninf = -std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const Index V = 19;
  Logits<double> z(1, 5, V);
  z.setZero();
  for (Index v = 0; v < V; v += 3) z(0, 0, v) = ninf;  // forbidden vocabulary
  z(0, 0, 1) = 2;
  z(0, 1, 4) = ninf;                               // the label's logit is -inf
  for (Index v = 0; v < V; ++v) z(0, 2, v) = nan;  // a masked-out token: anything
  z(0, 3, 7) = nan;
  z(0, 4, 2) = std::numeric_limits<double>::infinity();
  Labels y(1, 5);
  y.setValues({{1, 4, -5, 0, 0}});  // -5 at the masked-out token is never looked at
  Mask m(1, 5);
  m.setValues({{1, 1, 0, 1, 1}});
  pl::LogprobOptions o;
  o.entropy = true;
  const auto r = pl::token_logprobs(z, y, m, o);
  // Row 0: 12 finite logits (one at 2), 7 at -inf: p = e^2 / (e^2 + 11).
  CHECK(r.logp(0, 0) == Approx(2 - std::log(std::exp(2.0) + 11)).epsilon(1e-14));
  CHECK(r.logp(0, 1) == ninf);
  CHECK(std::isfinite(r.entropy(0, 1)));
  CHECK(r.entropy(0, 1) == Approx(std::log(18.0)).epsilon(1e-14));  // 18 equal logits
  CHECK(r.logp(0, 2) == 0.0);
  CHECK(r.entropy(0, 2) == 0.0);
  CHECK(std::isnan(r.logp(0, 3)));
  CHECK(std::isnan(r.entropy(0, 3)));
  CHECK(std::isnan(r.logp(0, 4)));
  Tok<double> gl(1, 5), gh(1, 5);
  gl.setConstant(1);
  gh.setConstant(1);
  gl(0, 2) = nan;  // ignored at the masked-out token
  Logits<double> g(1, 5, V);
  r.backward(gl, gh, g);
  for (Index v = 0; v < V; v += 3) CHECK(g(0, 0, v) == 0.0);
  for (Index v = 0; v < V; ++v) {
    CHECK(std::isfinite(g(0, 0, v)));
    CHECK(g(0, 2, v) == 0.0);
    CHECK(std::isnan(g(0, 3, v)));
  }
  CHECK(g(0, 1, 4) == 1.0);  // a -inf label: p_y = 0, its entry is g_lp (1 - 0) / tau
}

TEMPLATE_TEST_CASE("token_logprobs: 16-bit logits give the float computation of their values", "[logprobs][lowp]",
                   Eigen::bfloat16, Eigen::half) {
  using T = TestType;
  const Index B = 2, L = 3, V = 77;
  const auto zf0 = random_logits<float>(B, L, V, 2.0, 5);
  Logits<T> z(B, L, V);
  Logits<float> zf(B, L, V);
  for (Index k = 0; k < z.size(); ++k) {
    z.data()[k] = T(zf0.data()[k]);
    zf.data()[k] = static_cast<float>(z.data()[k]);
  }
  const auto y = random_labels(B, L, V, 9);
  pl::LogprobOptions o;
  o.entropy = true;
  const Mask m = ones(B, L);
  const auto a = pl::token_logprobs(z, y, m, o);
  const auto b = pl::token_logprobs(zf, y, m, o);
  for (Index k = 0; k < B * L; ++k) {
    CHECK(a.logp.data()[k] == b.logp.data()[k]);
    CHECK(a.entropy.data()[k] == b.entropy.data()[k]);
  }
  Tok<float> gl(B, L), gh(B, L);
  gl.setConstant(0.5f);
  gh.setConstant(-0.25f);
  Logits<T> g(B, L, V);
  Logits<float> gf(B, L, V);
  a.backward(gl, gh, g);
  b.backward(gl, gh, gf);
  for (Index k = 0; k < g.size(); ++k) {
    const T want(gf.data()[k]);  // the float gradient rounded once
    CHECK(std::memcmp(&g.data()[k], &want, sizeof(T)) == 0);
  }
}

TEST_CASE("token_logprobs: bad input throws, naming the argument, and writes nothing", "[logprobs][errors]") {
  const Index B = 2, L = 3, V = 5;
  const auto z = random_logits<float>(B, L, V, 1.0, 1);
  Labels y(B, L);
  y.setZero();
  Mask m = ones(B, L);
  y(1, 2) = 5;
  expect_throw<pl::value_error>([&] { (void)pl::token_logprobs(z, y, m); }, "token_logprobs",
                                {"'labels'", "5 at [1, 2]", "[0, 5)"});
  y(1, 2) = -1;
  expect_throw<pl::value_error>([&] { (void)pl::token_logprobs(z, y, m); }, "token_logprobs", {"-1 at [1, 2]"});
  m(1, 2) = 0;  // a masked-out label is never looked at
  CHECK_NOTHROW(pl::token_logprobs(z, y, m));
  m(1, 2) = 1;
  y(1, 2) = 0;
  const Labels y_short(B, L - 1);
  const Mask m_short = ones(B, L - 1), m_long = ones(B, L + 1);
  expect_throw<pl::shape_error>([&] { (void)pl::token_logprobs(z, y_short, m_short); }, "token_logprobs",
                                {"'labels'", "[2, 2]", "[2, 3, 5]"});
  expect_throw<pl::shape_error>([&] { (void)pl::token_logprobs(z, y, m_long); }, "token_logprobs", {"'mask'"});
  for (const double tau :
       {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(), 1e-50}) {
    pl::LogprobOptions o;
    o.temperature = tau;
    expect_throw<pl::option_error>([&] { (void)pl::token_logprobs(z, y, m, o); }, "token_logprobs", {"'temperature'"});
  }
  const auto r = pl::token_logprobs(z, y, m);
  Tok<float> gl(B, L);
  gl.setConstant(1);
  Logits<float> wrong(B, L, V + 1);
  wrong.setConstant(7);
  expect_throw<pl::shape_error>([&] { r.backward(gl, wrong); }, "token_logprobs backward",
                                {"'grad_logits'", "[2, 3, 5]", "[2, 3, 6]"});
  for (Index k = 0; k < wrong.size(); ++k) CHECK(wrong.data()[k] == 7.0f);
  Logits<float> g(B, L, V);
  expect_throw<pl::option_error>([&] { r.backward(gl, gl, g); }, "token_logprobs backward", {"entropy"});
  expect_throw<pl::shape_error>([&] { r.backward(Tok<float>(B, L + 1), g); }, "token_logprobs backward",
                                {"'grad_logp'"});
  Eigen::TensorMap<Logits<float>> alias(const_cast<float*>(z.data()), B, L, V);
  expect_throw<pl::layout_error>([&] { r.backward(gl, alias); }, "token_logprobs backward", {"overlaps"});
}

TEST_CASE("token_logprobs: a 256k vocabulary in float and rows of -inf but the label", "[logprobs]") {
  const Index V = 262144;
  const auto z = random_logits<float>(1, 2, V, 4.0, 3);
  Labels y(1, 2);
  y.setValues({{12345, V - 1}});
  pl::LogprobOptions o;
  o.entropy = true;
  const Mask m = ones(1, 2);
  const auto r = pl::token_logprobs(z, y, m, o);
  for (Index t = 0; t < 2; ++t) {
    const Ref ref = reference(z.data() + t * V, V, y(0, t), 1.0);
    // As in the first test: the float lane sum's bound does not grow with V.
    const double tol = (sum_bound<float>(V) + 20) * eps<float>();
    CHECK(std::fabs(static_cast<double>(r.logp(0, t)) - static_cast<double>(ref.logp)) <=
          tol * (1 + std::fabs(static_cast<double>(ref.logp))));
    CHECK(std::fabs(static_cast<double>(r.entropy(0, t)) - static_cast<double>(ref.entropy)) <=
          tol * (1 + std::fabs(static_cast<double>(ref.entropy))));
  }

  // Every logit -inf but the label's: p_y = 1 exactly, logp 0, entropy 0, a zero gradient.
  Logits<float> w(1, 1, 37);
  w.setConstant(-std::numeric_limits<float>::infinity());
  w(0, 0, 20) = -3;
  Labels yl(1, 1);
  yl(0, 0) = 20;
  const Mask m1 = ones(1, 1);
  const auto q = pl::token_logprobs(w, yl, m1, o);
  CHECK(q.logp(0, 0) == 0.0f);
  CHECK(q.entropy(0, 0) == 0.0f);
  Tok<float> g1(1, 1);
  g1.setConstant(1);
  Logits<float> g(1, 1, 37);
  q.backward(g1, g1, g);
  for (Index v = 0; v < 37; ++v) CHECK(g(0, 0, v) == 0.0f);
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}

TEMPLATE_TEST_CASE("token_logprobs: caller buffers and streaming stores give the same bits", "[logprobs]", float,
                   double, Eigen::bfloat16) {
  using T = TestType;
  using S = pl::detail::compute_t<T>;
  const Index B = 3, L = 4;
  for (const Index V : {1, 5, 16, 33, 1000}) {
    auto z = random_logits<T>(B, L, V, 2.0, 9);
    const auto y = random_labels(B, L, V, 10);
    Mask m = ones(B, L);
    m(0, 1) = m(2, 3) = 0;
    for (Index v = 0; v < V; ++v) z(0, 1, v) = T(std::numeric_limits<float>::quiet_NaN());
    pl::LogprobOptions o;
    o.entropy = true;
    const auto own = pl::token_logprobs(z, y, m, o);
    Tok<S> lp(B, L), en(B, L);
    lp.setConstant(S(5));
    en.setConstant(S(5));
    const auto buf = pl::token_logprobs(z, y, m, o, lp, en);
    CHECK(buf.logp.size() == 0);
    CHECK(buf.entropy.size() == 0);
    CHECK(same_bits(lp, own.logp));
    CHECK(same_bits(en, own.entropy));
    pl::LogprobOptions o1;
    Tok<S> lp1(B, L);
    (void)pl::token_logprobs(z, y, m, o1, lp1);
    CHECK(same_bits(lp1, own.logp));

    Tok<S> gl(B, L), gh(B, L);
    std::mt19937 rng(11);
    std::normal_distribution<double> n(0, 1);
    for (Index k = 0; k < gl.size(); ++k) {
      gl.data()[k] = static_cast<S>(n(rng));
      gh.data()[k] = static_cast<S>(n(rng));
    }
    Logits<T> g0(B, L, V), g1(B, L, V), g2(B, L, V);
    stream_bytes = std::size_t{32} << 20;
    own.backward(gl, gh, g0);
    stream_bytes = 0;  // every row through streaming stores (16-bit rows never stream)
    own.backward(gl, gh, g1);
    buf.backward(gl, gh, g2);
    stream_bytes = std::size_t{32} << 20;
    CHECK(same_bits(g0, g1));
    CHECK(same_bits(g0, g2));
    for (Index v = 0; v < V; ++v) CHECK(static_cast<double>(g0(0, 1, v)) == 0.0);
  }
}

TEST_CASE("token_logprobs: caller buffers are checked before anything is written", "[logprobs][errors]") {
  const Index B = 2, L = 3, V = 5;
  const auto z = random_logits<float>(B, L, V, 1.0, 1);
  Labels y(B, L);
  y.setZero();
  const Mask m = ones(B, L);
  pl::LogprobOptions o, oe;
  oe.entropy = true;
  Tok<float> lp(B, L), en(B, L), small(B, L - 1);
  lp.setConstant(7);
  en.setConstant(7);
  const auto untouched = [&] {
    for (Index k = 0; k < lp.size(); ++k) CHECK((lp.data()[k] == 7.0f && en.data()[k] == 7.0f));
  };
  expect_throw<pl::shape_error>([&] { (void)pl::token_logprobs(z, y, m, o, small); }, "token_logprobs",
                                {"'logp_out'", "[2, 3]", "[2, 2]"});
  expect_throw<pl::shape_error>([&] { (void)pl::token_logprobs(z, y, m, oe, lp, small); }, "token_logprobs",
                                {"'entropy_out'"});
  expect_throw<pl::option_error>([&] { (void)pl::token_logprobs(z, y, m, oe, lp); }, "token_logprobs",
                                 {"'entropy'", "entropy_out"});
  expect_throw<pl::option_error>([&] { (void)pl::token_logprobs(z, y, m, o, lp, en); }, "token_logprobs",
                                 {"'entropy_out'", "false"});
  expect_throw<pl::layout_error>([&] { (void)pl::token_logprobs(z, y, m, oe, lp, lp); }, "token_logprobs",
                                 {"'logp_out'", "'entropy_out'", "overlap"});
  Eigen::TensorMap<Tok<float>> over_z(const_cast<float*>(z.data()) + 1, B, L);
  expect_throw<pl::layout_error>([&] { (void)pl::token_logprobs(z, y, m, o, over_z); }, "token_logprobs",
                                 {"'logp_out'", "'logits'"});
  pl::LogprobOptions oc;
  oc.entropy_coef = 0.01;
  expect_throw<pl::option_error>([&] { (void)pl::token_logprobs(z, y, m, oc); }, "token_logprobs",
                                 {"'entropy_coef'", "0.01"});
  untouched();
  // grad_logits over grad_logp's bytes.
  const auto r = pl::token_logprobs(z, y, m);
  Logits<float> g(B, L, V);
  Eigen::TensorMap<Tok<float>> gl_in_g(g.data(), B, L);
  expect_throw<pl::layout_error>([&] { r.backward(gl_in_g, g); }, "token_logprobs backward",
                                 {"'grad_logits'", "'grad_logp'"});
}

TEMPLATE_TEST_CASE("token_logprobs: extreme logits of +-1e4", "[logprobs]", float, double) {
  using T = TestType;
  const Index V = 41;
  Logits<T> z(1, 3, V);
  std::mt19937 rng(21);
  std::uniform_int_distribution<int> pm(0, 1);
  for (Index k = 0; k < z.size(); ++k) z.data()[k] = static_cast<T>(pm(rng) ? 1e4 : -1e4);
  z(0, 0, 3) = T(1e4 + 1);  // a unique maximum, the label: p_y = 1 / (1 + n e^-1)
  z(0, 1, 3) = T(-1e4);     // the label at the minimum: logp about -2e4
  z(0, 2, 5) = T(9999.5);   // a label half a unit below the maximum
  Labels y(1, 3);
  y.setValues({{3, 3, 5}});
  const Mask m = ones(1, 3);
  for (const double tau : {1.0, 0.5}) {
    pl::LogprobOptions o;
    o.temperature = tau;
    o.entropy = true;
    const auto r = pl::token_logprobs(z, y, m, o);
    Tok<T> gl(1, 3);
    gl.setConstant(T(1));
    Logits<T> g(1, 3, V);
    r.backward(gl, gl, g);
    for (Index t = 0; t < 3; ++t) {
      const Ref ref = reference(z.data() + t * V, V, y(0, t), tau);
      const double want = static_cast<double>(ref.logp);
      CHECK(std::fabs(static_cast<double>(r.logp(0, t)) - want) <= 8 * eps<T>() * (1 + std::fabs(want)));
      CHECK(std::isfinite(static_cast<double>(r.entropy(0, t))));
      for (Index v = 0; v < V; ++v) CHECK(std::isfinite(static_cast<double>(g(0, t, v))));
    }
  }
}
