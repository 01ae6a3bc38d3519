// ppo_clip_from_logits: the same bits as token_logprobs -> ppo_clip -> backward -> token_logprobs
// backward, central finite differences of the whole loss in double, and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {
std::size_t stream_bytes = std::size_t{32} << 20;
}
#define PREFLOSS_STREAMING_STORE_BYTES stream_bytes
#include <prefloss/logits/ppo_from_logits.hpp>

#include "throws.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class T>
using Logits = Eigen::Tensor<T, 3, Eigen::RowMajor>;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
using Labels = Tok<std::int32_t>;

template <class T>
bool same_bits(const T& a, const T& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}
template <class T>
bool same_value(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Random inputs of one call: masked-out tokens hold NaN logits and an invalid label.
template <class T, class M>
struct Inputs {
  using S = pl::detail::compute_t<T>;
  Logits<T> z;
  Labels y;
  Tok<S> old, adv, ref;
  Tok<M> mask;

  Inputs(Index B, Index L, Index V, unsigned seed) : z(B, L, V), y(B, L), old(B, L), adv(B, L), ref(B, L), mask(B, L) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> n(0, 1);
    std::uniform_int_distribution<Index> lab(0, V - 1);
    std::uniform_real_distribution<double> u(0, 1);
    for (Index k = 0; k < z.size(); ++k) z.data()[k] = static_cast<T>(2 * n(rng));
    for (Index k = 0; k < y.size(); ++k) {
      y.data()[k] = static_cast<std::int32_t>(lab(rng));
      adv.data()[k] = static_cast<S>(n(rng));
      const bool on = u(rng) < 0.75;
      if constexpr (sizeof(M) == 1) {
        mask.data()[k] = on ? M(1) : M(0);
      } else {
        mask.data()[k] = on ? static_cast<M>(0.5 + u(rng)) : M(0);
      }
      if (!on) {
        for (Index v = 0; v < V; ++v) z.data()[k * V + v] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
        y.data()[k] = -7;
      }
    }
    // old_logp and ref_logp near the policy's log-probs, so ratios spread over the clip range.
    pl::LogprobOptions o;
    const auto lp = pl::token_logprobs(z, y, mask, o);
    for (Index k = 0; k < y.size(); ++k) {
      old.data()[k] = static_cast<S>(static_cast<double>(lp.logp.data()[k]) + 0.3 * n(rng));
      ref.data()[k] = static_cast<S>(static_cast<double>(lp.logp.data()[k]) + 0.3 * n(rng));
    }
  }
};

/// The three-pass composition the fused call must reproduce, bit for bit.
template <class T, class M, class S = pl::detail::compute_t<T>>
void composition(const Inputs<T, M>& in, bool with_ref, const pl::PpoOptions& po, const pl::LogprobOptions& lo,
                 Logits<T>& grad, S& loss, S& entropy_loss, Tok<S>& logp) {
  const Index B = in.z.dimension(0), L = in.z.dimension(1);
  pl::LogprobOptions l = lo;
  l.entropy = lo.entropy || lo.entropy_coef != 0;
  l.entropy_coef = 0;
  const auto lp = pl::token_logprobs(in.z, in.y, in.mask, l);
  Tok<S> gl(B, L);
  const auto run = [&](const auto& ppo) {
    ppo.backward(gl);
    loss = ppo.loss;
    const auto& scales = ppo.row_scales();
    // The documented aggregate, sum_i row_scale_i sum_t w H, in double in that order.
    double ent = 0;
    Tok<S> gh(B, L);
    for (Index i = 0; i < B; ++i) {
      double row = 0;
      for (Index t = 0; t < L; ++t) {
        const double w = pl::detail::weight_of<S>(in.mask(i, t));
        gh(i, t) = static_cast<S>(-lo.entropy_coef * scales[static_cast<std::size_t>(i)] * w);
        if (l.entropy && in.mask(i, t) != M(0)) row += w * static_cast<double>(lp.entropy(i, t));
      }
      ent += scales[static_cast<std::size_t>(i)] * row;
    }
    entropy_loss = static_cast<S>(ent);
    loss = static_cast<S>(static_cast<double>(ppo.loss) - lo.entropy_coef * ent);
    if (lo.entropy_coef != 0) {
      lp.backward(gl, gh, grad);
    } else {
      lp.backward(gl, grad);
    }
  };
  if (with_ref) {
    run(pl::ppo_clip(lp.logp, in.old, in.adv, in.mask, in.ref, po));
  } else {
    run(pl::ppo_clip(lp.logp, in.old, in.adv, in.mask, po));
  }
  logp = lp.logp;
}

template <class T, class M>
void check_same_bits(Index V, pl::Aggregation agg, bool with_ref, double entropy_coef, double tau,
                     pl::ImportanceLevel level = pl::ImportanceLevel::token) {
  using S = pl::detail::compute_t<T>;
  const Index B = 3, L = 37;  // rows of two full float batches and a tail
  const Inputs<T, M> in(B, L, V, 41 + static_cast<unsigned>(V));
  pl::PpoOptions po;
  po.aggregation = agg;
  po.clip_high = 0.28;
  po.dual_clip = 3;
  po.importance_level = level;
  if (with_ref) po.kl_coef = 0.05;
  pl::LogprobOptions lo;
  lo.temperature = tau;
  lo.entropy_coef = entropy_coef;
  Logits<T> want(B, L, V);
  S loss = 0, ent_loss = 0;
  Tok<S> logp;
  composition(in, with_ref, po, lo, want, loss, ent_loss, logp);
  for (const std::size_t threshold : {std::size_t{32} << 20, std::size_t{0}}) {
    stream_bytes = threshold;
    Logits<T> g(B, L, V);
    g.setConstant(T(3));
    const auto r = with_ref ? pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, in.ref, po, lo, g)
                            : pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, po, lo, g);
    stream_bytes = std::size_t{32} << 20;
    CAPTURE(V, static_cast<int>(agg), with_ref, entropy_coef, tau, threshold, static_cast<int>(level));
    CHECK(same_bits(g, want));
    CHECK(same_bits(r.logp, logp));
    CHECK(same_value(r.loss, loss));
    CHECK(same_value(r.entropy_loss, ent_loss));
    double sum = 0;
    for (Index i = 0; i < B; ++i) sum += static_cast<double>(r.losses(i));
    CHECK(std::fabs(sum - static_cast<double>(r.loss)) <= 1e-5 * (1 + std::fabs(sum)));
    CHECK(r.metrics.token_weight > 0);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("ppo_clip_from_logits: the same bits as the three-pass composition", "[ppo_logits]", float, double,
                   Eigen::bfloat16) {
  using T = TestType;
  for (const Index V : {1, 17, 300})
    for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                           pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm}) {
      check_same_bits<T, std::uint8_t>(V, agg, false, 0.0, 1.0);
      check_same_bits<T, float>(V, agg, true, 0.01, 0.7);
    }
  check_same_bits<T, bool>(40, pl::Aggregation::token_mean, true, 0.0, 1.3);
  check_same_bits<T, double>(40, pl::Aggregation::seq_mean_token_mean, false, 0.2, 1.0);
  // GSPO: each row's log-probs, its mean log-ratio, then its gradient pass.
  for (const Index V : {1, 300}) {
    check_same_bits<T, std::uint8_t>(V, pl::Aggregation::seq_mean_token_mean, false, 0.0, 1.0,
                                     pl::ImportanceLevel::sequence);
    check_same_bits<T, float>(V, pl::Aggregation::token_mean, true, 0.01, 0.7, pl::ImportanceLevel::sequence);
  }
}

TEST_CASE("ppo_clip_from_logits: d loss / d logits against central finite differences in double", "[ppo_logits]") {
  const Index B = 2, L = 5, V = 7;
  Inputs<double, double> in(B, L, V, 5);
  pl::PpoOptions po;
  po.aggregation = pl::Aggregation::seq_mean_token_mean;
  po.kl_coef = 0.1;
  pl::LogprobOptions lo;
  lo.temperature = 0.8;
  lo.entropy_coef = 0.05;
  Logits<double> g(B, L, V), scratch(B, L, V);
  (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, in.ref, po, lo, g);
  const auto loss_at = [&](const Logits<double>& z) {
    return static_cast<double>(
        pl::ppo_clip_from_logits(z, in.y, in.old, in.adv, in.mask, in.ref, po, lo, scratch).loss);
  };
  Logits<double> z = in.z;
  const double h = 1e-6;
  for (Index k = 0; k < z.size(); ++k) {
    if (std::isnan(in.z.data()[k])) {
      CHECK(g.data()[k] == 0.0);  // a masked-out token's row
      continue;
    }
    const double z0 = z.data()[k];
    z.data()[k] = z0 + h;
    const double up = loss_at(z);
    z.data()[k] = z0 - h;
    const double down = loss_at(z);
    z.data()[k] = z0;
    const double fd = (up - down) / (2 * h);
    // Central differences: h^2 truncation and ~1e-16 / h cancellation, both far below 1e-7 here.
    CHECK(std::fabs(fd - g.data()[k]) <= 1e-7 * (1 + std::fabs(fd)));
  }
}

TEST_CASE("ppo_clip_from_logits: bad input throws, naming the argument, and writes nothing", "[ppo_logits][errors]") {
  const Index B = 2, L = 3, V = 5;
  Inputs<float, std::uint8_t> in(B, L, V, 9);
  in.mask.setConstant(1);
  in.y.setZero();
  pl::PpoOptions po;
  pl::LogprobOptions lo;
  Logits<float> g(B, L, V);
  g.setConstant(7);
  const auto untouched = [&] {
    for (Index k = 0; k < g.size(); ++k) CHECK(g.data()[k] == 7.0f);
  };
  const std::string fn = "ppo_clip_from_logits";
  in.y(1, 2) = 9;
  expect_throw<pl::value_error>([&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, po, lo, g); },
                                fn, {"'labels'", "9 at [1, 2]"});
  in.y(1, 2) = 0;
  const Tok<float> short_old(B, L - 1);
  expect_throw<pl::shape_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, short_old, in.adv, in.mask, po, lo, g); }, fn, {"'old_logp'"});
  Logits<float> g_short(B, L - 1, V);
  expect_throw<pl::shape_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, in.ref, po, lo, g_short); }, fn,
      {"'grad_logits'", "[2, 2, 5]"});
  pl::PpoOptions bad = po;
  bad.clip_low = 1.5;
  expect_throw<pl::option_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, bad, lo, g); }, fn,
      {"'clip_low'", "1.5"});
  bad = po;
  bad.kl_coef = 0.1;
  expect_throw<pl::option_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, bad, lo, g); }, fn,
      {"'kl_coef'", "ref_logp"});
  pl::LogprobOptions lbad = lo;
  lbad.entropy_coef = -0.1;
  expect_throw<pl::option_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, po, lbad, g); }, fn,
      {"'entropy_coef'", "-0.1"});
  lbad = lo;
  lbad.temperature = 0;
  expect_throw<pl::option_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, po, lbad, g); }, fn, {"'temperature'"});
  Logits<float> g_wrong(B, L, V + 1);
  expect_throw<pl::shape_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, in.old, in.adv, in.mask, po, lo, g_wrong); }, fn,
      {"'grad_logits'", "[2, 3, 5]", "[2, 3, 6]"});
  Eigen::TensorMap<Tok<float>> old_in_g(g.data() + 3, B, L);
  expect_throw<pl::layout_error>(
      [&] { (void)pl::ppo_clip_from_logits(in.z, in.y, old_in_g, in.adv, in.mask, po, lo, g); }, fn,
      {"'grad_logits'", "'old_logp'"});
  untouched();
}
