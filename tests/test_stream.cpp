// The streaming-store paths: this file sets the threshold to 0, so every array long enough for
// the prefetching loop (2 x 4 KiB) and every masked adjoint writes with non-temporal stores
// after a peeled, unaligned head. Array math must be bit-identical to the batch form at each
// element, in place too; adjoints must equal the closed form upstream * weight (/ row weight);
// PPO's token gradient (two-pass and fused) must match central differences of the independent
// reference; nothing outside the output may be written.
#define PREFLOSS_STREAMING_STORE_BYTES 0
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <vector>

#include "rl_reference.hpp"

namespace pl = prefloss;

namespace {

template <class T>
bool bit_same(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// f's batch form at one element (broadcast, lane 0).
template <class T, class F>
T batch_at(F& f, T x) {
  alignas(64) T buf[pl::detail::lanes<T>];
  f(pl::detail::batch<T>(x)).store_aligned(buf);
  return buf[0];
}

template <class T, class Array, class Batch>
void check_function(const char* name, Array array, Batch batch) {
  constexpr std::size_t w = pl::detail::lanes<T>;
  constexpr std::size_t stream_min = 2 * 4096 / sizeof(T);  // elementwise.hpp's 2 * ahead
  std::mt19937 rng(5u);
  std::uniform_real_distribution<double> u(-40.0, 40.0);
  const std::size_t max_n = stream_min + 3 * w + 5, pad = 2 * w + 8;
  std::vector<T> src(max_n + pad);
  for (T& v : src) v = static_cast<T>(u(rng));
  if (std::string(name) == "log1mexp")
    for (T& v : src) v = -std::fabs(v);
  src[3] = std::numeric_limits<T>::quiet_NaN();
  src[stream_min / 2] = std::numeric_limits<T>::infinity();
  src[stream_min / 2 + 1] = -std::numeric_limits<T>::infinity();
  const T sentinel = T(12345.5);

  std::size_t bad = 0, clobbered = 0, runs = 0;
  for (std::size_t n : {stream_min - 1, stream_min, stream_min + 1, stream_min + w - 1, max_n})
    for (std::size_t xoff = 0; xoff <= w; xoff += w / 2 + 1)
      for (std::size_t yoff = 0; yoff <= w; ++yoff) {
        std::vector<T> y(max_n + pad, sentinel);
        array(src.data() + xoff, y.data() + yoff, n);
        for (std::size_t i = 0; i < n; ++i) bad += !bit_same(y[yoff + i], batch_at(batch, src[xoff + i]));
        for (std::size_t i = 0; i < yoff; ++i) clobbered += !bit_same(y[i], sentinel);
        for (std::size_t i = yoff + n; i < y.size(); ++i) clobbered += !bit_same(y[i], sentinel);
        ++runs;
      }
  // In place, at every head length.
  for (std::size_t off = 0; off <= w; ++off) {
    std::vector<T> z(src), y(src.size(), sentinel);
    array(src.data() + off, y.data() + off, max_n);
    array(z.data() + off, z.data() + off, max_n);
    for (std::size_t i = 0; i < max_n; ++i) bad += !bit_same(z[off + i], y[off + i]);
    for (std::size_t i = 0; i < off; ++i) clobbered += !bit_same(z[i], src[i]);
    for (std::size_t i = off + max_n; i < z.size(); ++i) clobbered += !bit_same(z[i], src[i]);
  }
  INFO(name << " over " << runs << " length/offset combinations, " << w << " lanes");
  CHECK(bad == 0);
  CHECK(clobbered == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("math arrays with streaming stores: equal to the batch form, nothing else written", "[math]", float,
                   double) {
  using T = TestType;
  using B = pl::detail::batch<T>;
#if defined(__SSE2__)
  CHECK(pl::detail::has_stream_store<pl::detail::arch>);
#endif
  check_function<T>(
      "log_sigmoid", [](const T* x, T* y, std::size_t n) { pl::log_sigmoid(x, y, n); },
      [](const B& b) { return pl::log_sigmoid(b); });
  check_function<T>(
      "sigmoid", [](const T* x, T* y, std::size_t n) { pl::sigmoid(x, y, n); },
      [](const B& b) { return pl::sigmoid(b); });
  check_function<T>(
      "softplus", [](const T* x, T* y, std::size_t n) { pl::softplus(x, y, n); },
      [](const B& b) { return pl::softplus(b); });
  check_function<T>(
      "log1mexp", [](const T* x, T* y, std::size_t n) { pl::log1mexp(x, y, n); },
      [](const B& b) { return pl::log1mexp(b); });
}

TEMPLATE_TEST_CASE("masked adjoints with streaming stores: the closed form, every row and offset", "[reduce]", float,
                   double) {
  using S = TestType;
  using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  constexpr long w = static_cast<long>(pl::detail::lanes<S>);
  std::mt19937 rng(9u);
  std::uniform_real_distribution<double> u(-3.0, 3.0);
  std::size_t bad = 0, clobbered = 0;
  const S sentinel = S(-777.25);
  // Row lengths that leave each row start at a different alignment; offsets of the whole output.
  for (long cols : {1L, w - 1, w + 3, 3 * w + 5, 67L})
    for (long off = 0; off <= w; off += 3) {
      const long rows = 5;
      Tok x(rows, cols);
      Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> m(rows, cols);
      Eigen::Tensor<S, 2, Eigen::RowMajor> fw(rows, cols);
      Eigen::Tensor<S, 1> up(rows);
      for (long i = 0; i < rows; ++i) {
        up(i) = static_cast<S>(u(rng));
        for (long t = 0; t < cols; ++t) {
          m(i, t) = static_cast<std::uint8_t>(rng() % 4 != 0);
          x(i, t) = m(i, t) ? static_cast<S>(u(rng)) : std::numeric_limits<S>::quiet_NaN();
          fw(i, t) = m(i, t) ? static_cast<S>(0.5 + (rng() % 8) * 0.25) : S(0);
        }
      }
      m(rows - 1, 0) = 0;  // a padded first token
      std::vector<S> buf(static_cast<std::size_t>(off + rows * cols + w), sentinel);
      Eigen::TensorMap<Tok> g(buf.data() + off, rows, cols);
      auto check_out = [&](auto expected) {
        for (long i = 0; i < rows; ++i)
          for (long t = 0; t < cols; ++t) bad += !(g(i, t) == expected(i, t));
        for (long k = 0; k < off; ++k) clobbered += !(buf[static_cast<std::size_t>(k)] == sentinel);
        for (std::size_t k = static_cast<std::size_t>(off + rows * cols); k < buf.size(); ++k)
          clobbered += !(buf[k] == sentinel);
      };
      pl::masked_sum(x, m).backward(up, g);
      check_out([&](long i, long t) { return m(i, t) ? up(i) : S(0); });
      pl::masked_sum(x, fw).backward(up, g);
      check_out([&](long i, long t) { return fw(i, t) != 0 ? static_cast<S>(up(i) * fw(i, t)) : S(0); });
      pl::masked_mean(x, m).backward(up, g);
      check_out([&](long i, long t) {
        double n = 0;
        for (long k = 0; k < cols; ++k) n += m(i, k) != 0;
        return m(i, t) ? static_cast<S>(static_cast<double>(up(i)) / n) : S(0);
      });
    }
  CHECK(bad == 0);
  CHECK(clobbered == 0);
}

TEMPLATE_TEST_CASE("ppo_clip gradients with streaming stores: finite differences, nothing else written", "[ppo]", float,
                   double) {
  using S = TestType;
  using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  constexpr long w = static_cast<long>(pl::detail::lanes<S>);
  const long B = 4, T = 2 * w + 3;  // rows start at every alignment
  std::mt19937 rng(13u);
  std::uniform_real_distribution<double> old_d(-4.0, -0.05);
  // Log-ratios within +-0.1, far from the clip kinks at log(0.8) and log(1.2).
  std::uniform_real_distribution<double> ratio_d(-0.1, 0.1);
  std::normal_distribution<double> adv_d(0.0, 1.0);
  Tok lp(B, T), old(B, T), adv(B, T);
  Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> mask(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      mask(i, t) = static_cast<std::uint8_t>(rng() % 4 != 0);
      old(i, t) = static_cast<S>(old_d(rng));
      lp(i, t) = mask(i, t) ? static_cast<S>(old(i, t) + ratio_d(rng)) : rlref::poison<S>(t);
      adv(i, t) = static_cast<S>(adv_d(rng));
    }
  pl::PpoOptions o;
  o.aggregation = pl::Aggregation::seq_mean_token_mean;
  rlref::Data d = rlref::to_data(lp, old, adv, mask, static_cast<const Tok*>(nullptr));
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-9;
  const S sentinel = S(-777.25);
  for (long off = 0; off <= w; off += 3) {
    for (bool fused : {false, true}) {
      std::vector<S> buf(static_cast<std::size_t>(off + B * T + w), sentinel);
      Eigen::TensorMap<Tok> g(buf.data() + off, B, T);
      if (fused) {
        pl::ppo_clip(lp, old, adv, mask, o, g);
      } else {
        pl::ppo_clip(lp, old, adv, mask, o).backward(g);
      }
      const Tok gt = g;
      const auto r = rlref::token_fd_error(d, gt, [&](const rlref::Data& x) { return rlref::ppo_ref(x, o).loss; });
      INFO((fused ? "fused" : "two-pass") << ", output offset " << off);
      CHECK(r.masked_zero);
      CHECK(r.rel <= tol);
      std::size_t clobbered = 0;
      for (long k = 0; k < off; ++k) clobbered += !(buf[static_cast<std::size_t>(k)] == sentinel);
      for (std::size_t k = static_cast<std::size_t>(off + B * T); k < buf.size(); ++k)
        clobbered += !(buf[k] == sentinel);
      CHECK(clobbered == 0);
    }
  }
}

TEMPLATE_TEST_CASE("fused and two-pass ppo_clip / value_loss agree to the bit with rows at every alignment", "[ppo]",
                   float, double) {
  // Rows of 20 batches + 5 tokens start at every offset within a batch; with the streaming
  // threshold at 0 a misaligned fused row must still sum in the forward pass's order.
  using S = TestType;
  using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  constexpr long w = static_cast<long>(pl::detail::lanes<S>);
  const long B = 6, T = 20 * w + 5;
  std::mt19937 rng(17u);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Tok lp(B, T), old(B, T), adv(B, T), gf(B, T), g2(B, T);
  Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> mask(B, T);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      mask(i, t) = static_cast<std::uint8_t>(rng() % 5 != 0);
      old(i, t) = static_cast<S>(-1 + 0.5 * u(rng));
      lp(i, t) = static_cast<S>(old(i, t) + 0.3 * u(rng));
      adv(i, t) = static_cast<S>(3 * u(rng));
    }
  const auto same = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0;
  };
  const auto check = [&](const auto& two, const auto& fused) {  // fused wrote gf
    two.backward(g2);
    CHECK(bit_same(two.loss, fused.loss));
    CHECK(same(two.losses, fused.losses));
    CHECK(same(g2, gf));
  };
  for (const auto mode : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
    pl::PpoOptions po;
    po.aggregation = mode;
    check(pl::ppo_clip(lp, old, adv, mask, po), pl::ppo_clip(lp, old, adv, mask, po, gf));
    pl::ValueOptions vo;
    vo.aggregation = mode;
    check(pl::value_loss(lp, old, adv, mask, vo), pl::value_loss(lp, old, adv, mask, vo, gf));
  }
}
