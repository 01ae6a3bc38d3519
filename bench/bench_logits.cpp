// From logits: token_logprobs forward + backward (three passes over [tokens, vocab]), with the
// entropy, with half the tokens masked out, and ppo_clip_from_logits (two passes) next to the
// same loss run as three passes. Shapes [batch, tokens, vocab] = [4, 512, 32000] in float: 262 MB
// of logits and 262 MB of gradient, far past any cache. Rows are "<kernel>/f32/N<tokens>_V<vocab>/
// <tokens * vocab>"; `bytes` is what must move (each selected row read once a pass, each gradient
// row written once), so `roofline` is the fraction of the pass floor at the same binary's
// streaming-read bandwidth.
#include <prefloss/prefloss.hpp>

#include "bench_common.hpp"

namespace pb = prefloss::bench;
namespace pl = prefloss;
using pl::Index;

namespace {

constexpr Index kBatch = 4, kTokens = 512, kVocab = 32000;
constexpr Index kN = kBatch * kTokens;

template <class T>
using Map3 = Eigen::TensorMap<Eigen::Tensor<T, 3, Eigen::RowMajor>>;
template <class T>
using Map2 = Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>>;

/// Logits with LM-like spread (Gaussian, sd 3), labels, a mask keeping `keep` of the tokens
/// (masked-out rows hold NaN: they must not be read), PPO inputs and an upstream gradient.
struct LogitsBatch {
  pb::Buffer<float> z, grad, old, adv, gl;
  pb::Buffer<std::int64_t> y;
  pb::Buffer<std::uint8_t> mask;

  explicit LogitsBatch(double keep) : z(kN * kVocab), grad(kN * kVocab), old(kN), adv(kN), gl(kN), y(kN), mask(kN) {
    pb::Rng r(7);
    for (Index k = 0; k < kN * kVocab; ++k) {
      // Box-Muller from two uniforms; sd 3.
      const double u1 = r.uniform() + 1e-300, u2 = r.uniform();
      z[static_cast<std::size_t>(k)] =
          static_cast<float>(3.0 * std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307 * u2));
    }
    pb::fill_mask(mask.data(), kN, 8, keep);
    pb::fill_logp(adv.data(), kN, 9, -2.0, 2.0);
    pb::fill_logp(gl.data(), kN, 10, -1.0, 1.0);
    for (Index k = 0; k < kN; ++k) {
      y[static_cast<std::size_t>(k)] = static_cast<std::int64_t>(r.next() % kVocab);
      if (!mask[static_cast<std::size_t>(k)])
        for (Index v = 0; v < kVocab; ++v) z[static_cast<std::size_t>(k * kVocab + v)] = std::nanf("");
    }
    const auto lp = pl::token_logprobs(logits(), labels(), masks());
    pb::fill_logp(old.data(), kN, 11, -0.3, 0.3);
    for (Index k = 0; k < kN; ++k) old[static_cast<std::size_t>(k)] += lp.logp.data()[k];
  }
  Map3<const float> logits() const { return {z.data(), kBatch, kTokens, kVocab}; }
  Map3<float> grad_logits() { return {grad.data(), kBatch, kTokens, kVocab}; }
  Map2<const std::int64_t> labels() const { return {y.data(), kBatch, kTokens}; }
  Map2<const std::uint8_t> masks() const { return {mask.data(), kBatch, kTokens}; }
  Map2<const float> tok(const pb::Buffer<float>& b) const { return {b.data(), kBatch, kTokens}; }
  double selected() const {
    double s = 0;
    for (Index k = 0; k < kN; ++k) s += mask[static_cast<std::size_t>(k)] ? 1 : 0;
    return s;
  }
};

/// Bytes that must move: `reads` passes over the selected rows, one write of every gradient row.
void counters(benchmark::State& st, const LogitsBatch& b, int reads) {
  const double row = static_cast<double>(kVocab) * sizeof(float);
  pb::set_counters(st, (reads * b.selected() + kN) * row, static_cast<double>(kN));
}

void BM_logprobs(benchmark::State& st, double keep, bool entropy) {
  LogitsBatch b(keep);
  pl::LogprobOptions o;
  o.entropy = entropy;
  auto g = b.grad_logits();
  for (auto _ : st) {
    const auto lp = pl::token_logprobs(b.logits(), b.labels(), b.masks(), o);
    if (entropy) {
      lp.backward(b.tok(b.gl), b.tok(b.adv), g);
    } else {
      lp.backward(b.tok(b.gl), g);
    }
    benchmark::DoNotOptimize(b.grad.data());
    benchmark::ClobberMemory();
  }
  counters(st, b, 2);
}

/// ppo_clip with an entropy bonus from the logits: fused (two passes) or composed (three).
void BM_ppo_logits(benchmark::State& st, bool fused) {
  LogitsBatch b(0.8);
  pl::PpoOptions po;
  pl::LogprobOptions lo;
  lo.entropy_coef = 0.01;
  auto g = b.grad_logits();
  Eigen::Tensor<float, 2, Eigen::RowMajor> gl(kBatch, kTokens), gh(kBatch, kTokens);
  for (auto _ : st) {
    if (fused) {
      const auto r = pl::ppo_clip_from_logits(b.logits(), b.labels(), b.tok(b.old), b.tok(b.adv), b.masks(), po, lo, g);
      benchmark::DoNotOptimize(r.loss);
    } else {
      pl::LogprobOptions le;
      le.entropy = true;
      const auto lp = pl::token_logprobs(b.logits(), b.labels(), b.masks(), le);
      const auto ppo = pl::ppo_clip(lp.logp, b.tok(b.old), b.tok(b.adv), b.masks(), po);
      ppo.backward(gl);
      for (Index k = 0; k < kN; ++k) gh.data()[k] = static_cast<float>(-0.01 * ppo.row_scales()[0]);
      lp.backward(gl, gh, g);
    }
    benchmark::DoNotOptimize(b.grad.data());
    benchmark::ClobberMemory();
  }
  counters(st, b, fused ? 1 : 2);
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_logits) {
  const std::string shape = "/f32/N" + std::to_string(kN) + "_V" + std::to_string(kVocab);
  const pb::SizeRange one{kN * kVocab, kN * kVocab};
  pb::add(
      "logprobs_fwd_bwd" + shape, [](benchmark::State& st) { BM_logprobs(st, 1.0, false); }, one);
  pb::add(
      "logprobs_fwd_bwd_masked50" + shape, [](benchmark::State& st) { BM_logprobs(st, 0.5, false); }, one);
  pb::add(
      "logprobs_entropy_fwd_bwd" + shape, [](benchmark::State& st) { BM_logprobs(st, 1.0, true); }, one);
  pb::add(
      "ppo_logits_fused" + shape, [](benchmark::State& st) { BM_ppo_logits(st, true); }, one);
  pb::add(
      "ppo_logits_3pass" + shape, [](benchmark::State& st) { BM_ppo_logits(st, false); }, one);
}

PREFLOSS_BENCH_MAIN()
