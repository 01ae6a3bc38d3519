// Threads: the same calls on 1 and 2 threads (prefloss::ThreadPool), at DRAM sizes, in wall time
// (CPU time would count only the calling thread). Rows "<kernel>/threads:<n>"; read the 2-thread
// row against the 1-thread row of the same run. Token losses move every byte once, so a second
// core helps only as far as one core could not already saturate the memory bus; the logits
// kernels do ~10 flops a logit and scale further.
//   ppo_fused      ppo_clip(logp, old, adv, mask, opt, g), 256 x 65536 tokens (17 bytes a token)
//   dpo_fused      dpo(masked_sum(c), masked_sum(r), ref_c, ref_r, opt, g_c, g_r), 256 x 65536
//                  tokens a side (9 bytes a token and side); on a pool the values are read in
//                  blocks, then the gradient rows written in blocks (the masks read twice)
//   logprobs       token_logprobs forward + backward, [4, 512, 32000] float
//
//   build/bench/bench_threads
#include <cmath>
#include <cstdint>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <string>

#include "bench_common.hpp"

namespace pb = prefloss::bench;
namespace pl = prefloss;
using pl::Index;

namespace {

constexpr std::int64_t kBatch = 256, kTokens = std::int64_t{256} * 65536;

pl::ThreadPool& pool(int n) {
  static pl::ThreadPool one(1), two(2);
  return n == 1 ? one : two;
}

void BM_ppo(benchmark::State& st, int threads) {
  using M = std::uint8_t;
  const pb::TokenBatch<float, M> lp(kBatch, kTokens, 41);
  pb::Buffer<float> old(kTokens), adv(kTokens), g(kTokens);
  pb::fill_logp(adv.data(), kTokens, 42, -2.0, 2.0);
  pb::fill_logp(old.data(), kTokens, 43, -0.3, 0.3);
  for (std::size_t k = 0; k < static_cast<std::size_t>(kTokens); ++k) old[k] += lp.x[k];
  const pb::TokenMap<const float> oldm(old.data(), kBatch, lp.tokens), advm(adv.data(), kBatch, lp.tokens);
  pb::TokenMap<float> gm(g.data(), kBatch, lp.tokens);
  pl::PpoOptions opt;
  opt.threads = pool(threads);
  for (auto _ : st) {
    auto res = pl::ppo_clip(lp.values(), oldm, advm, lp.masks(), opt, gm);
    benchmark::DoNotOptimize(res.loss);
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, double(4 * sizeof(float) + sizeof(M)) * static_cast<double>(kTokens),
                   static_cast<double>(kTokens));
}

void BM_dpo(benchmark::State& st, int threads) {
  using M = std::uint8_t;
  const pb::TokenBatch<float, M> c(kBatch, kTokens, 31), r(kBatch, kTokens, 32);
  pb::Buffer<float> ref_c(kBatch), ref_r(kBatch), gc(kTokens), gr(kTokens);
  pb::fill_logp(ref_c.data(), kBatch, 33, -500.0, -100.0);
  pb::fill_logp(ref_r.data(), kBatch, 34, -500.0, -100.0);
  const pb::SeqMap<const float> rc(ref_c.data(), kBatch), rr(ref_r.data(), kBatch);
  pb::TokenMap<float> gcm(gc.data(), kBatch, c.tokens), grm(gr.data(), kBatch, r.tokens);
  pl::DpoOptions opt;
  opt.threads = pool(threads);
  for (auto _ : st) {
    const auto res =
        pl::dpo(pl::masked_sum(c.values(), c.masks()), pl::masked_sum(r.values(), r.masks()), rc, rr, opt, gcm, grm);
    benchmark::DoNotOptimize(res.loss);
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, 2.0 * double(2 * sizeof(float) + sizeof(M)) * static_cast<double>(kTokens),
                   2.0 * static_cast<double>(kTokens));
}

constexpr Index kB = 4, kT = 512, kV = 32000, kN = kB * kT;

void BM_logprobs(benchmark::State& st, int threads) {
  pb::Buffer<float> z(kN * kV), grad(kN * kV), gl(kN);
  pb::Buffer<std::int64_t> y(kN);
  pb::Buffer<std::uint8_t> mask(kN);
  pb::Rng rng(7);
  for (Index k = 0; k < kN * kV; ++k) z[static_cast<std::size_t>(k)] = static_cast<float>(6 * rng.uniform() - 3);
  for (Index k = 0; k < kN; ++k) y[static_cast<std::size_t>(k)] = static_cast<std::int64_t>(rng.next() % kV);
  pb::fill_mask(mask.data(), kN, 8, 1.0);
  pb::fill_logp(gl.data(), kN, 10, -1.0, 1.0);
  const Eigen::TensorMap<const Eigen::Tensor<float, 3, Eigen::RowMajor>> zm(z.data(), kB, kT, kV);
  Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> gm(grad.data(), kB, kT, kV);
  const Eigen::TensorMap<const Eigen::Tensor<std::int64_t, 2, Eigen::RowMajor>> ym(y.data(), kB, kT);
  const Eigen::TensorMap<const Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>> mm(mask.data(), kB, kT);
  const Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> glm(gl.data(), kB, kT);
  pl::LogprobOptions lo;
  lo.threads = pool(threads);
  for (auto _ : st) {
    const auto lp = pl::token_logprobs(zm, ym, mm, lo);
    lp.backward(glm, gm);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, 3.0 * static_cast<double>(kN * kV) * sizeof(float), static_cast<double>(kN));
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_threads) {
  for (int n : {1, 2}) {
    const std::string t = "/threads:" + std::to_string(n);
    const pb::SizeRange one{kTokens, kTokens};
    pb::add(
        "ppo_fused/f32_u8/B256" + t, [n](benchmark::State& st) { BM_ppo(st, n); }, one, kBatch)
        ->UseRealTime();
    pb::add(
        "dpo_fused/f32_u8/B256" + t, [n](benchmark::State& st) { BM_dpo(st, n); }, one, kBatch)
        ->UseRealTime();
    pb::add("logprobs_fwd_bwd/f32/N2048_V32000" + t, [n](benchmark::State& st) { BM_logprobs(st, n); },
            {kN * kV, kN * kV})
        ->UseRealTime();
  }
}

PREFLOSS_BENCH_MAIN()
