// The kernels under whatever architecture detail::arch selects. tests/CMakeLists.txt builds this
// file three ways: as every test is (the flags' own arch), and with the native flags but
// PREFLOSS_SIMD_ARCH=xsimd::sse2 / xsimd::avx2 (test_arch_sse2, test_arch_avx2), so that a
// kernel branch chosen by the compiler macros instead of the selected arch shows up here.
// Expected values: double / long double references written in this file or in rl_reference.hpp.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "rl_reference.hpp"

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
using ld = long double;

namespace {

// Widths around 4, 8 and 16 lanes and the 32 / 64 byte blocks of the mask count.
const long widths[] = {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 129, 1000};

template <class M>
M mask_value(bool keep, double w) {
  if constexpr (std::is_floating_point_v<M>) {
    return keep ? static_cast<M>(w) : M(0);
  } else {
    return static_cast<M>(keep);
  }
}

template <class S, class M>
void check_masked(long B, long T, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> val(-8.0, 3.0), wt(0.25, 2.0);
  std::bernoulli_distribution keep(0.7);
  Tok<S> x(B, T), ones(B, T);
  Tok<M> m(B, T);
  ones.setConstant(S(1));
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool k = keep(rng);
      m(i, t) = mask_value<M>(k, wt(rng));
      // Padding a multiply-by-mask kernel would let through.
      x(i, t) = k ? static_cast<S>(val(rng))
                  : (t % 2 ? std::numeric_limits<S>::quiet_NaN() : std::numeric_limits<S>::infinity());
    }
  const auto sum = pl::masked_sum(x, m).eval();
  const auto mean = pl::masked_mean(x, m).eval();
  const auto count = pl::masked_sum(ones, m).eval();
  // Float: one rounding of w * x, at most chunk_batches - 1 float roundings of a lane sum per
  // term (detail/row_loop.hpp LaneSum), then double, and the float result's own rounding.
  const ld u = std::is_same_v<S, float> ? ld(pl::detail::chunk_batches + 1) * std::ldexp(ld(1), -24) : ld(1e-14);
  for (long i = 0; i < B; ++i) {
    ld s = 0, a = 0, w = 0;
    long n = 0;
    for (long t = 0; t < T; ++t)
      if (m(i, t) != M(0)) {
        const ld wx = static_cast<ld>(m(i, t)) * static_cast<ld>(x(i, t));
        s += wx;
        a += std::fabs(wx);
        w += static_cast<ld>(m(i, t));
        ++n;
      }
    CAPTURE(i, T);
    CHECK(std::fabs(static_cast<ld>(sum(i)) - s) <= u * a + 1e-30L);
    if (w != 0) {
      CHECK(std::fabs(static_cast<ld>(mean(i)) - s / w) <= 2 * u * a / w + 1e-30L);
    } else {
      CHECK(mean(i) == S(0));
    }
    if constexpr (sizeof(M) == 1) CHECK(count(i) == static_cast<S>(n));  // byte masks: an exact count
  }
}

template <class T>
ld ulp_of(ld ref) {
  const T r = static_cast<T>(ref);
  if (r == T(0)) return static_cast<ld>(std::numeric_limits<T>::denorm_min());
  return static_cast<ld>(std::nextafter(std::fabs(r), std::numeric_limits<T>::infinity()) - std::fabs(r));
}

template <class T>
void check_log_sigmoid() {
  std::vector<T> x;
  for (int k = -4000; k <= 4000; ++k) x.push_back(static_cast<T>(k * 0.025));  // [-100, 100]
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> wide(-800.0, 800.0);
  for (int k = 0; k < 2000; ++k) x.push_back(static_cast<T>(wide(rng)));
  for (T s : {T(0), -T(0), T(1e-30), T(-1e-30), T(15.75), T(-15.75), std::numeric_limits<T>::infinity(),
              -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::quiet_NaN()})
    x.push_back(s);
  x.push_back(T(1));  // an odd length: the padded tail
  std::vector<T> y(x.size()), z(x.size());
  pl::log_sigmoid(x.data(), y.data(), x.size());
  pl::softplus(x.data(), z.data(), x.size());
  ld worst = 0;
  for (std::size_t k = 0; k < x.size(); ++k) {
    const ld v = x[k];
    CAPTURE(v);
    if (std::isnan(v)) {
      CHECK(std::isnan(y[k]));
      CHECK(std::isnan(z[k]));
      continue;
    }
    // log sigmoid(v) = min(v, 0) - log1p(exp(-|v|)); softplus(v) = max(v, 0) + log1p(exp(-|v|)).
    const ld f = std::log1p(std::exp(-std::fabs(v)));
    const ld ls = std::fmin(v, ld(0)) - f, sp = std::fmax(v, ld(0)) + f;
    if (std::isinf(ls)) {
      CHECK(y[k] == static_cast<T>(ls));
    } else {
      const ld e = std::fabs(static_cast<ld>(y[k]) - ls) / ulp_of<T>(ls);
      worst = std::max(worst, e);
      CHECK(e <= 2);
    }
    if (std::isinf(sp)) {
      CHECK(z[k] == static_cast<T>(sp));
    } else {
      CHECK(std::fabs(static_cast<ld>(z[k]) - sp) <= 2 * ulp_of<T>(sp));
    }
  }
  std::printf("log_sigmoid<%s> on %s: max error %.3Lf ulp\n", std::is_same_v<T, float> ? "float" : "double",
              pl::detail::arch::name(), worst);
}

template <class S, class M>
void check_ppo(long B, long T, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0.0, 0.3);
  std::uniform_real_distribution<double> a(-2.0, 2.0), o(-6.0, -0.1), wt(0.25, 2.0);
  std::bernoulli_distribution keep(0.75);
  Tok<S> lp(B, T), old(B, T), adv(B, T), g(B, T), g2(B, T);
  Tok<M> m(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool k = keep(rng);
      old(i, t) = static_cast<S>(o(rng));
      lp(i, t) = k ? static_cast<S>(old(i, t) + d(rng)) : std::numeric_limits<S>::quiet_NaN();
      adv(i, t) = static_cast<S>(a(rng));
      m(i, t) = mask_value<M>(k, wt(rng));
    }
  pl::PpoOptions opt;
  opt.aggregation = pl::Aggregation::seq_mean_token_mean;
  const auto fused = pl::ppo_clip(lp, old, adv, m, opt, g);
  const auto two = pl::ppo_clip(lp, old, adv, m, opt);
  two.backward(g2);
  const rlref::Data data = rlref::to_data(lp, old, adv, m, static_cast<const Tok<S>*>(nullptr));
  const rlref::PpoRef ref = rlref::ppo_ref(data, opt);
  const ld tol = std::is_same_v<S, float> ? 2e-6L : 1e-13L;
  CHECK(std::fabs(static_cast<ld>(fused.loss) - ref.loss) <= tol * std::fabs(ref.loss) + tol);
  CHECK(std::memcmp(&fused.loss, &two.loss, sizeof(S)) == 0);
  for (long i = 0; i < B; ++i) {
    CAPTURE(i, T);
    CHECK(std::fabs(static_cast<ld>(fused.losses(i)) - ref.rows[static_cast<std::size_t>(i)]) <=
          tol * std::fabs(ref.rows[static_cast<std::size_t>(i)]) + tol);
    // d loss / d logp: -A r w / (W_i B) where the unclipped branch is the max, 0 elsewhere.
    ld W = 0;
    for (long t = 0; t < T; ++t) W += data.w[data.at(i, t)];
    for (long t = 0; t < T; ++t) {
      const std::size_t k = data.at(i, t);
      ld e = 0;
      if (data.sel[k]) {
        const ld A = data.x2[k], r = std::exp(data.x0[k] - data.x1[k]);
        const ld l1 = -A * r, l2 = -A * std::min(std::max(r, ld(0.8)), ld(1.2));
        e = l1 >= l2 ? -A * r * data.w[k] / (W * static_cast<ld>(B)) : 0;
      }
      CHECK(std::fabs(static_cast<ld>(g(i, t)) - e) <= tol * std::fabs(e) + 1e-30L);
      CHECK(g2(i, t) == g(i, t));
    }
  }
}

}  // namespace

TEST_CASE("the kernels compile for the selected architecture", "[arch]") {
  std::printf("detail::arch = %s (%zu float lanes)\n", pl::detail::arch::name(), pl::detail::lanes<float>);
#ifdef PREFLOSS_TEST_ARCH_NAME
  CHECK(std::string(pl::detail::arch::name()) == PREFLOSS_TEST_ARCH_NAME);
#endif
  CHECK(pl::detail::lanes<float> * sizeof(float) == pl::detail::arch::alignment());
}

TEMPLATE_TEST_CASE("masked_sum / masked_mean against a long double reference, every mask type", "[arch][reduce]", float,
                   double) {
  for (long T : widths) {
    const auto s = static_cast<unsigned>(T);
    check_masked<TestType, std::uint8_t>(3, T, 10 + s);
    check_masked<TestType, bool>(3, T, 20 + s);
    check_masked<TestType, float>(3, T, 30 + s);
    check_masked<TestType, double>(3, T, 40 + s);
  }
}

TEMPLATE_TEST_CASE("log_sigmoid / softplus arrays within 2 ulp of a long double reference", "[arch][math]", float,
                   double) {
  check_log_sigmoid<TestType>();
}

TEMPLATE_TEST_CASE("ppo_clip loss, losses and gradient against the long double reference", "[arch][ppo]", float,
                   double) {
  for (long T : widths) {
    const auto s = static_cast<unsigned>(T);
    check_ppo<TestType, std::uint8_t>(3, T, 50 + s);
    check_ppo<TestType, float>(3, T, 60 + s);
  }
}
