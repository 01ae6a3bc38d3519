// linear_logprobs: values and gradients against a long double reference over the materialized
// product, central finite differences through hidden and weight, tiles of every size, masked
// rows that hold NaN and inf, agreement with token_logprobs on the product's logits, special
// values and errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <prefloss/logits/linear_logprobs.hpp>
#include <random>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class T>
using Mat = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;
using Labels = Vec<std::int64_t>;
using Mask = Vec<std::uint8_t>;

template <class T>
constexpr double eps() {
  return std::numeric_limits<T>::epsilon();
}

template <class T>
Mat<T> random_mat(Index r, Index c, double spread, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0, spread);
  Mat<T> x(r, c);
  for (Index k = 0; k < x.size(); ++k) x.data()[k] = static_cast<T>(n(rng));
  return x;
}

template <class T>
Vec<T> random_vec(Index n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0, 1);
  Vec<T> x(n);
  for (Index k = 0; k < n; ++k) x.data()[k] = static_cast<T>(d(rng));
  return x;
}

Labels random_labels(Index N, Index V, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<Index> u(0, V - 1);
  Labels y(N);
  for (Index k = 0; k < N; ++k) y.data()[k] = u(rng);
  return y;
}

/// The long double reference over the materialized product: logp, entropy, the closed-form
/// gradients d/dh = dZ W and d/dW = dZ^T h, and for each gradient entry the sum of the absolute
/// values of its terms (the scale its rounding error is relative to).
struct Ref {
  std::vector<long double> logp, entropy, gh, gw, gh_scale, gw_scale;
  long double max_u = 0;    ///< max |u|
  long double z_scale = 0;  ///< max over tokens and vocabulary of sum_i |h_i w_i| / tau
};

template <class T>
Ref reference(const Mat<T>& h, const Mat<T>& w, const Labels& y, const Mask& m, double tau, const Vec<T>& gl,
              const Vec<T>& ge, bool ent) {
  const Index N = h.dimension(0), H = h.dimension(1), V = w.dimension(0);
  Ref r;
  r.logp.assign(static_cast<std::size_t>(N), 0);
  r.entropy.assign(static_cast<std::size_t>(N), 0);
  r.gh.assign(static_cast<std::size_t>(N * H), 0);
  r.gh_scale = r.gh;
  r.gw.assign(static_cast<std::size_t>(V * H), 0);
  r.gw_scale = r.gw;
  std::vector<long double> u(static_cast<std::size_t>(V)), dz(static_cast<std::size_t>(V));
  for (Index n = 0; n < N; ++n) {
    if (!m(n)) continue;
    long double mx = -INFINITY;
    for (Index v = 0; v < V; ++v) {
      long double z = 0, za = 0;
      for (Index i = 0; i < H; ++i) {
        z += static_cast<long double>(h(n, i)) * static_cast<long double>(w(v, i));
        za += std::fabs(static_cast<long double>(h(n, i)) * static_cast<long double>(w(v, i)));
      }
      r.z_scale = std::max(r.z_scale, za / tau);
      u[static_cast<std::size_t>(v)] = z / tau;
      mx = std::max(mx, u[static_cast<std::size_t>(v)]);
      r.max_u = std::max(r.max_u, std::fabs(u[static_cast<std::size_t>(v)]));
    }
    long double s = 0, so = 0, t = 0;
    const Index yn = y(n);
    for (Index v = 0; v < V; ++v) {
      const long double d = u[static_cast<std::size_t>(v)] - mx, e = std::exp(d);
      s += e;
      if (v != yn) so += e;
      t += e * d;
    }
    const long double dy = u[static_cast<std::size_t>(yn)] - mx;
    const long double lp = dy == 0 ? -std::log1p(so) : dy - std::log(s);
    const long double H_ = std::log(s) - t / s;
    r.logp[static_cast<std::size_t>(n)] = lp;
    r.entropy[static_cast<std::size_t>(n)] = H_;
    const long double g1 = gl(n), g2 = ent ? static_cast<long double>(ge(n)) : 0.0L;
    for (Index v = 0; v < V; ++v) {
      const long double lpv = u[static_cast<std::size_t>(v)] - mx - std::log(s), p = std::exp(lpv);
      dz[static_cast<std::size_t>(v)] = (g1 * ((v == yn ? 1 : 0) - p) - g2 * p * (lpv + H_)) / tau;
    }
    for (Index v = 0; v < V; ++v)
      for (Index i = 0; i < H; ++i) {
        const long double a = dz[static_cast<std::size_t>(v)] * static_cast<long double>(w(v, i));
        const long double b = dz[static_cast<std::size_t>(v)] * static_cast<long double>(h(n, i));
        r.gh[static_cast<std::size_t>(n * H + i)] += a;
        r.gh_scale[static_cast<std::size_t>(n * H + i)] += std::fabs(a);
        r.gw[static_cast<std::size_t>(v * H + i)] += b;
        r.gw_scale[static_cast<std::size_t>(v * H + i)] += std::fabs(b);
      }
  }
  return r;
}

template <class T>
bool same_bits(const T* a, const T* b, Index n) {
  return std::memcmp(a, b, static_cast<std::size_t>(n) * sizeof(T)) == 0;
}

const pl::detail::LinearTiles kTiles[] = {{}, {1, 1}, {2, 16}, {3, 7}, {4, 64}};

}  // namespace

TEMPLATE_TEST_CASE("linear_logprobs: values and gradients against long double, tiles of every size", "[linear]", float,
                   double) {
  using T = TestType;
  const Index N = 7;
  for (const Index H : {1, 5, 16}) {
    for (const Index V : {1, 2, 17, 33, 70}) {
      for (const double tau : {1.0, 0.7}) {
        const unsigned seed = static_cast<unsigned>(H * 1000 + V * 10) + (tau == 1.0 ? 0u : 1u);
        const auto h = random_mat<T>(N, H, 1.0, seed);
        const auto w = random_mat<T>(V, H, 2.0 / std::sqrt(static_cast<double>(H)), seed + 1);
        const auto y = random_labels(N, V, seed + 2);
        Mask m(N);
        m.setConstant(1);
        m(2) = 0;
        m(5) = 0;
        const auto gl = random_vec<T>(N, seed + 3), ge = random_vec<T>(N, seed + 4);
        pl::LogprobOptions o;
        o.temperature = tau;
        o.entropy = true;
        const Ref ref = reference(h, w, y, m, tau, gl, ge, true);
        // The logits are an H-term product in T: |du| <= H eps sum |h w| / tau (z_scale), and a
        // log-prob or probability carries the error of a difference of two such logits, twice
        // with the label entry's own path: 4 H eps z_scale. The sums and logs add
        // token_logprobs' (<= ~25 eps relative to 1 + |u|, see test_logprobs): 64 eps (1 +
        // max |u|). A wrong formula is off by O(1).
        const double tol =
            eps<T>() * (64 * (1 + static_cast<double>(ref.max_u)) + 4 * static_cast<double>(H * ref.z_scale));
        for (const auto& tiles : kTiles) {
          const auto r = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
          Mat<T> gh(N, H), gw(V, H);
          r.backward(gl, ge, gh, gw);
          CAPTURE(H, V, tau, tiles.tokens, tiles.vocab);
          for (Index n = 0; n < N; ++n) {
            CAPTURE(n);
            const auto lp = static_cast<double>(ref.logp[static_cast<std::size_t>(n)]);
            const auto en = static_cast<double>(ref.entropy[static_cast<std::size_t>(n)]);
            CHECK(std::fabs(static_cast<double>(r.logp(n)) - lp) <= tol * (1 + std::fabs(lp)));
            CHECK(std::fabs(static_cast<double>(r.entropy(n)) - en) <= tol * (1 + std::fabs(en)));
          }
          // A gradient entry is a sum of terms dZ * W (or dZ * h), each dZ within tol relative
          // to its own terms' scale.
          for (Index k = 0; k < N * H; ++k) {
            const auto want = static_cast<double>(ref.gh[static_cast<std::size_t>(k)]);
            const auto scale = static_cast<double>(ref.gh_scale[static_cast<std::size_t>(k)]);
            CHECK(std::fabs(static_cast<double>(gh.data()[k]) - want) <= tol * scale + 1e-300);
          }
          for (Index k = 0; k < V * H; ++k) {
            const auto want = static_cast<double>(ref.gw[static_cast<std::size_t>(k)]);
            const auto scale = static_cast<double>(ref.gw_scale[static_cast<std::size_t>(k)]);
            CHECK(std::fabs(static_cast<double>(gw.data()[k]) - want) <= tol * scale + 1e-300);
          }
          for (Index i = 0; i < H; ++i) {
            CHECK(gh(2, i) == T(0));
            CHECK(gh(5, i) == T(0));
          }
          CHECK(r.logp(2) == T(0));
          CHECK(r.entropy(5) == T(0));
        }
      }
    }
  }
}

TEST_CASE("linear_logprobs: backward against central finite differences in double", "[linear]") {
  const Index N = 5;
  for (const Index H : {3, 7}) {
    for (const Index V : {1, 5, 16, 17, 70}) {
      for (const bool with_entropy : {false, true}) {
        for (const auto& tiles : {pl::detail::LinearTiles{}, pl::detail::LinearTiles{2, 16}}) {
          const unsigned seed = static_cast<unsigned>(H * 100 + V);
          auto h = random_mat<double>(N, H, 1.0, seed);
          auto w = random_mat<double>(V, H, 1.0, seed + 1);
          const auto y = random_labels(N, V, seed + 2);
          Mask m(N);
          m.setConstant(1);
          m(1) = 0;
          const auto gl = random_vec<double>(N, seed + 3), ge = random_vec<double>(N, seed + 4);
          pl::LogprobOptions o;
          o.temperature = 0.8;
          o.entropy = with_entropy;
          const auto f = [&] {
            const auto r = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
            double s = 0;
            for (Index n = 0; n < N; ++n) {
              if (!m(n)) continue;
              s += gl(n) * r.logp(n);
              if (with_entropy) s += ge(n) * r.entropy(n);
            }
            return s;
          };
          const auto r = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
          Mat<double> gh(N, H), gw(V, H);
          if (with_entropy)
            r.backward(gl, ge, gh, gw);
          else
            r.backward(gl, gh, gw);
          const double step = 1e-6;
          // Central differences: truncation step^2 |f'''| / 6 and rounding eps |f| / step, both
          // < 1e-8 here.
          const auto check = [&](Mat<double>& x, const Mat<double>& g, const char* what) {
            for (Index k = 0; k < x.size(); ++k) {
              const double keep = x.data()[k];
              x.data()[k] = keep + step;
              const double up = f();
              x.data()[k] = keep - step;
              const double dn = f();
              x.data()[k] = keep;
              const double fd = (up - dn) / (2 * step);
              CAPTURE(what, H, V, with_entropy, tiles.tokens, k);
              CHECK(std::fabs(g.data()[k] - fd) <= 1e-7 * (1 + std::fabs(fd)));
            }
          };
          check(h, gh, "hidden");
          check(w, gw, "weight");
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("linear_logprobs: masked-out rows holding NaN and inf change nothing, bit for bit", "[linear]",
                   float, double) {
  using T = TestType;
  const Index N = 11, H = 6, V = 37;
  auto h = random_mat<T>(N, H, 1.0, 3);
  const auto w = random_mat<T>(V, H, 1.0, 4);
  auto y = random_labels(N, V, 5);
  Vec<float> m(N);  // a float mask: its weights are not applied here
  m.setConstant(1.5f);
  for (const Index n : {0, 3, 4, 8, 10}) m(n) = 0;
  const auto gl = random_vec<T>(N, 6), ge = random_vec<T>(N, 7);
  pl::LogprobOptions o;
  o.entropy = true;
  for (const auto& tiles : kTiles) {
    for (const Index n : {0, 3, 4, 8, 10})
      for (Index i = 0; i < H; ++i) h(n, i) = 0;
    const auto a = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
    Mat<T> gha(N, H), gwa(V, H);
    a.backward(gl, ge, gha, gwa);
    const T bad[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                     -std::numeric_limits<T>::infinity()};
    for (const Index n : {0, 3, 4, 8, 10}) {
      for (Index i = 0; i < H; ++i) h(n, i) = bad[(n + i) % 3];
      y(n) = n % 2 ? -7 : 1000;  // never looked at
    }
    Vec<T> gl2 = gl;
    gl2(3) = std::numeric_limits<T>::quiet_NaN();  // ignored at a masked-out token
    const auto b = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
    Mat<T> ghb(N, H), gwb(V, H);
    ghb.setConstant(T(9));
    gwb.setConstant(T(9));
    b.backward(gl2, ge, ghb, gwb);
    CAPTURE(tiles.tokens, tiles.vocab);
    CHECK(same_bits(a.logp.data(), b.logp.data(), N));
    CHECK(same_bits(a.entropy.data(), b.entropy.data(), N));
    CHECK(same_bits(gha.data(), ghb.data(), N * H));
    CHECK(same_bits(gwa.data(), gwb.data(), V * H));
    for (Index i = 0; i < H; ++i) CHECK(ghb(8, i) == T(0));
    for (Index k = 0; k < gwb.size(); ++k) CHECK(std::isfinite(gwb.data()[k]));
  }
}

TEMPLATE_TEST_CASE("linear_logprobs: agrees with token_logprobs on the materialized logits", "[linear]", float,
                   double) {
  using T = TestType;
  const Index N = 6, H = 24, V = 1100;  // three vocabulary tiles of 512 by default
  const auto h = random_mat<T>(N, H, 1.0, 21);
  const auto w = random_mat<T>(V, H, 0.5, 22);
  const auto y = random_labels(N, V, 23);
  Mask m(N);
  m.setConstant(1);
  m(4) = 0;
  const auto gl = random_vec<T>(N, 24), ge = random_vec<T>(N, 25);
  pl::LogprobOptions o;
  o.temperature = 1.3;
  o.entropy = true;
  // The logits [1, N, V], each an H-term dot product in T.
  Eigen::Tensor<T, 3, Eigen::RowMajor> z(1, N, V);
  for (Index n = 0; n < N; ++n)
    for (Index v = 0; v < V; ++v) {
      T s = 0;
      for (Index i = 0; i < H; ++i) s += h(n, i) * w(v, i);
      z(0, n, v) = s;
    }
  const Eigen::TensorMap<const Eigen::Tensor<std::int64_t, 2, Eigen::RowMajor>> y2(y.data(), 1, N);
  const Eigen::TensorMap<const Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>> m2(m.data(), 1, N);
  const auto t = pl::token_logprobs(z, y2, m2, o);
  Eigen::Tensor<T, 2, Eigen::RowMajor> gl2(1, N), ge2(1, N);
  for (Index n = 0; n < N; ++n) {
    gl2(0, n) = gl(n);
    ge2(0, n) = ge(n);
  }
  Eigen::Tensor<T, 3, Eigen::RowMajor> gz(1, N, V);
  t.backward(gl2, ge2, gz);
  // d/dh = gz W and d/dW = gz^T h from token_logprobs' d/dz, in long double, with the scale of
  // each entry's terms.
  std::vector<long double> gh_ref(static_cast<std::size_t>(N * H), 0), gw_ref(static_cast<std::size_t>(V * H), 0),
      gh_sc = gh_ref, gw_sc = gw_ref;
  for (Index n = 0; n < N; ++n)
    for (Index v = 0; v < V; ++v)
      for (Index i = 0; i < H; ++i) {
        const long double a = static_cast<long double>(gz(0, n, v)) * w(v, i);
        const long double b = static_cast<long double>(gz(0, n, v)) * h(n, i);
        gh_ref[static_cast<std::size_t>(n * H + i)] += a;
        gh_sc[static_cast<std::size_t>(n * H + i)] += std::fabs(a);
        gw_ref[static_cast<std::size_t>(v * H + i)] += b;
        gw_sc[static_cast<std::size_t>(v * H + i)] += std::fabs(b);
      }
  for (const auto& tiles : {pl::detail::LinearTiles{}, pl::detail::LinearTiles{4, 100}}) {
    const auto r = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
    Mat<T> gh(N, H), gw(V, H);
    r.backward(gl, ge, gh, gw);
    CAPTURE(tiles.tokens, tiles.vocab);
    // Both compute the same formulas; they differ in the product's summation order (up to H eps
    // of sum |h w| <= ~10 here, in practice a few eps) and in how the vocabulary sums are split
    // (a few eps): 320 eps (1 + |value|), 32 eps of the largest logit.
    const double tol = 320 * eps<T>();
    for (Index n = 0; n < N; ++n) {
      CAPTURE(n);
      CHECK(std::fabs(static_cast<double>(r.logp(n) - t.logp(0, n))) <= tol * (1 + std::fabs(double(t.logp(0, n)))));
      CHECK(std::fabs(static_cast<double>(r.entropy(n) - t.entropy(0, n))) <=
            tol * (1 + std::fabs(double(t.entropy(0, n)))));
    }
    for (Index k = 0; k < N * H; ++k)
      CHECK(std::fabs(static_cast<double>(gh.data()[k]) - static_cast<double>(gh_ref[static_cast<std::size_t>(k)])) <=
            tol * static_cast<double>(gh_sc[static_cast<std::size_t>(k)]) + 1e-300);
    for (Index k = 0; k < V * H; ++k)
      CHECK(std::fabs(static_cast<double>(gw.data()[k]) - static_cast<double>(gw_ref[static_cast<std::size_t>(k)])) <=
            tol * static_cast<double>(gw_sc[static_cast<std::size_t>(k)]) + 1e-300);
  }
}

TEST_CASE("linear_logprobs: -inf and NaN logits, nothing selected", "[linear]") {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const Index H = 3, V = 9;
  auto w = random_mat<double>(V, H, 1.0, 31);
  w(4, 0) = inf;
  w(4, 1) = 0;
  w(4, 2) = 0;  // z_4 = inf * h_0: -inf for h_0 < 0, NaN for h_0 = 0
  Mat<double> h(4, H);
  h.setValues({{-1, 0.5, 0.25}, {-2, nan, 1}, {0, 1, 1}, {-0.5, 1, 2}});
  Labels y(4);
  y.setValues({4, 0, 1, 2});
  Mask m(4);
  m.setConstant(1);
  pl::LogprobOptions o;
  o.entropy = true;
  for (const auto& tiles : kTiles) {
    const auto r = pl::detail::linear_logprobs_tiled(h, w, y, m, o, tiles);
    CAPTURE(tiles.tokens, tiles.vocab);
    CHECK(r.logp(0) == -inf);  // the label's logit is -inf
    CHECK(std::isfinite(r.entropy(0)));
    CHECK(std::isnan(r.logp(1)));  // a NaN hidden entry: every logit NaN
    CHECK(std::isnan(r.entropy(1)));
    CHECK(std::isnan(r.logp(2)));  // 0 * inf
    // Token 3: logit 4 is -inf, probability 0; the others as a softmax over 8.
    double s = 0, z2 = 0;
    for (Index v = 0; v < V; ++v) {
      if (v == 4) continue;
      const double z = w(v, 0) * h(3, 0) + w(v, 1) * h(3, 1) + w(v, 2) * h(3, 2);
      s += std::exp(z);
      if (v == 2) z2 = z;
    }
    CHECK(r.logp(3) == Approx(z2 - std::log(s)).epsilon(1e-13));
  }
  // H = 0: every logit 0, logp = -log V, empty gradients.
  {
    const Mat<double> h0(4, 0), w0(V, 0);
    Mask m0(4);
    m0.setConstant(1);
    const auto r0 = pl::detail::linear_logprobs_tiled(h0, w0, y, m0, o, {3, 4});
    for (Index n = 0; n < 4; ++n) {
      CHECK(r0.logp(n) == Approx(-std::log(double(V))).epsilon(1e-15));
      CHECK(r0.entropy(n) == Approx(std::log(double(V))).epsilon(1e-15));
    }
    Vec<double> g0(4);
    g0.setConstant(1);
    Mat<double> gh0(4, 0), gw0(V, 0);
    CHECK_NOTHROW(r0.backward(g0, g0, gh0, gw0));
  }
  // Nothing selected: zeros out, the gradients zero.
  m.setZero();
  const auto r = pl::linear_logprobs(h, w, y, m, o);
  Vec<double> g(4);
  g.setConstant(1);
  Mat<double> gh(4, H), gw(V, H);
  gh.setConstant(5);
  gw.setConstant(5);
  r.backward(g, g, gh, gw);
  for (Index n = 0; n < 4; ++n) CHECK(r.logp(n) == 0.0);
  for (Index k = 0; k < gh.size(); ++k) CHECK(gh.data()[k] == 0.0);
  for (Index k = 0; k < gw.size(); ++k) CHECK(gw.data()[k] == 0.0);
}

TEST_CASE("linear_logprobs: bad input throws, naming the argument, and writes nothing", "[linear][errors]") {
  const Index N = 4, H = 3, V = 5;
  const auto h = random_mat<float>(N, H, 1.0, 1);
  const auto w = random_mat<float>(V, H, 1.0, 2);
  Labels y(N);
  y.setZero();
  Mask m(N);
  m.setConstant(1);
  const char* fn = "linear_logprobs";
  const Mat<float> w_bad(V, H + 1);
  expect_throw<pl::shape_error>([&] { (void)pl::linear_logprobs(h, w_bad, y, m); }, fn,
                                {"'weight'", "[5, 4]", "[4, 3]"});
  const Labels y_short(N - 1);
  expect_throw<pl::shape_error>([&] { (void)pl::linear_logprobs(h, w, y_short, m); }, fn, {"'labels'", "[3]"});
  const Mask m_long(N + 1);
  expect_throw<pl::shape_error>([&] { (void)pl::linear_logprobs(h, w, y, m_long); }, fn, {"'mask'", "[5]"});
  y(2) = 5;
  expect_throw<pl::value_error>([&] { (void)pl::linear_logprobs(h, w, y, m); }, fn, {"'labels'", "5 at [2]", "[0, 5)"});
  y(2) = -1;
  expect_throw<pl::value_error>([&] { (void)pl::linear_logprobs(h, w, y, m); }, fn, {"-1 at [2]"});
  m(2) = 0;  // a masked-out label is never looked at
  CHECK_NOTHROW(pl::linear_logprobs(h, w, y, m));
  m(2) = 1;
  y(2) = 0;
  Vec<float> mw(N);
  mw.setConstant(1);
  mw(3) = -0.5f;
  expect_throw<pl::value_error>([&] { (void)pl::linear_logprobs(h, w, y, mw); }, fn, {"'mask'", "-0.5 at [3]"});
  for (const double tau :
       {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(), 1e-50}) {
    pl::LogprobOptions o;
    o.temperature = tau;
    expect_throw<pl::option_error>([&] { (void)pl::linear_logprobs(h, w, y, m, o); }, fn, {"'temperature'"});
  }
  {
    pl::LogprobOptions o;
    o.entropy_coef = 0.01;
    expect_throw<pl::option_error>([&] { (void)pl::linear_logprobs(h, w, y, m, o); }, fn, {"'entropy_coef'"});
  }
  std::vector<float> blob(static_cast<std::size_t>(N * H + 1));
  const Eigen::TensorMap<const Mat<float>> odd(
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(blob.data()) + 1), N, H);
  expect_throw<pl::layout_error>([&] { (void)pl::linear_logprobs(odd, w, y, m); }, fn, {"'hidden'", "address"});

  const auto r = pl::linear_logprobs(h, w, y, m);
  const char* bw = "linear_logprobs backward";
  Vec<float> gl(N);
  gl.setConstant(1);
  Mat<float> gh(N, H), gw(V, H), gh_bad(N + 1, H), gw_bad(V, H + 1);
  for (Mat<float>* t : {&gh, &gw, &gh_bad, &gw_bad}) t->setConstant(7);
  const auto untouched = [&] {
    for (Mat<float>* t : {&gh, &gw, &gh_bad, &gw_bad})
      for (Index k = 0; k < t->size(); ++k) CHECK(t->data()[k] == 7.0f);
  };
  expect_throw<pl::shape_error>([&] { r.backward(gl, gh_bad, gw); }, bw, {"'grad_hidden'", "[4, 3]", "[5, 3]"});
  expect_throw<pl::shape_error>([&] { r.backward(gl, gh, gw_bad); }, bw, {"'grad_weight'", "[5, 3]", "[5, 4]"});
  expect_throw<pl::shape_error>([&] { r.backward(Vec<float>(N + 1), gh, gw); }, bw, {"'grad_logp'", "[4]", "[5]"});
  expect_throw<pl::option_error>([&] { r.backward(gl, gl, gh, gw); }, bw, {"entropy"});
  Eigen::TensorMap<Mat<float>> alias_w(const_cast<float*>(w.data()), V, H);
  expect_throw<pl::layout_error>([&] { r.backward(gl, gh, alias_w); }, bw, {"'grad_weight'", "'weight'", "overlaps"});
  Eigen::TensorMap<Mat<float>> alias_h(const_cast<float*>(h.data()), N, H);
  expect_throw<pl::layout_error>([&] { r.backward(gl, alias_h, gw); }, bw, {"'grad_hidden'", "'hidden'"});
  Eigen::TensorMap<Mat<float>> inside(gw.data() + 2, N, H);  // 12 of gw's 15 floats
  expect_throw<pl::layout_error>([&] { r.backward(gl, inside, gw); }, bw, {"'grad_hidden'", "'grad_weight'"});
  untouched();
  pl::LogprobOptions oe;
  oe.entropy = true;
  const auto re = pl::linear_logprobs(h, w, y, m, oe);
  expect_throw<pl::shape_error>([&] { re.backward(gl, Vec<float>(N - 1), gh, gw); }, bw, {"'grad_entropy'"});
  std::vector<float> shared(static_cast<std::size_t>(N * H), 1.0f);  // grad_logp inside grad_hidden
  const Eigen::TensorMap<const Vec<float>> gl_in(shared.data() + 3, N);
  Eigen::TensorMap<Mat<float>> gh_over(shared.data(), N, H);
  expect_throw<pl::layout_error>([&] { re.backward(gl_in, gh_over, gw); }, bw, {"'grad_hidden'", "'grad_logp'"});
  for (const float v : shared) CHECK(v == 1.0f);
  untouched();
  CHECK_NOTHROW(re.backward(gl, gl, gh, gw));
}
