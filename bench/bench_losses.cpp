// Loss kernels, forward + backward with caller-provided outputs, one thread:
//   dpo_fwd_bwd   dpo(masked_sum(c), masked_sum(r), ref_c, ref_r) then backward(g_c, g_r)
//   ppo_fwd_bwd   ppo_clip(logp, old, adv, mask) then backward(g)      (two passes)
//   ppo_fused     ppo_clip(logp, old, adv, mask, opt, g)                (one pass)
//
//   build/bench/bench_losses                      all sizes (tokens per side 1e3 .. 1e8)
//   build/bench/bench_losses --prefloss_quick     up to 4Mi tokens
//   build/bench/bench_losses --benchmark_filter='B256/2097152'   the 256 x 8192 shape
//
// Bytes counted are the floor (README, Performance), what must move at least once: DPO reads log-probs (4) and
// mask (1) and writes the gradient (4) per token and side = 9; PPO reads logp, old_logp,
// advantages (4 each) and the mask (1) and writes the gradient (4) = 17. The two-pass PPO and
// DPO's backward re-read the mask (and PPO its inputs), so their true traffic is higher; the
// roofline column is achieved floor-bytes/s over this binary's streaming-read bandwidth.
#include <prefloss/prefloss.hpp>

#include "bench_common.hpp"

#include <cstdint>
#include <string>

namespace pb = prefloss::bench;

namespace {

template <class S>
void BM_dpo(benchmark::State& st, std::int64_t batch) {
  using M = std::uint8_t;
  const std::int64_t n = st.range(0);  // tokens per side
  const pb::TokenBatch<S, M> c(batch, n, 31), r(batch, n, 32);
  pb::Buffer<S> ref_c(batch), ref_r(batch), gc(n), gr(n);
  pb::fill_logp(ref_c.data(), batch, 33, -500.0, -100.0);
  pb::fill_logp(ref_r.data(), batch, 34, -500.0, -100.0);
  const pb::SeqMap<const S> rc(ref_c.data(), batch), rr(ref_r.data(), batch);
  pb::TokenMap<S> gcm(gc.data(), batch, c.tokens), grm(gr.data(), batch, r.tokens);
  prefloss::DpoOptions opt;
  opt.beta = 0.1;
  for (auto _ : st) {
    auto res = prefloss::dpo(prefloss::masked_sum(c.values(), c.masks()), prefloss::masked_sum(r.values(), r.masks()),
                             rc, rr, opt);
    res.backward(gcm, grm);
    benchmark::DoNotOptimize(res.loss);
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, 2.0 * double(sizeof(S) + sizeof(M) + sizeof(S)) * static_cast<double>(n), 2.0 * double(n));
}

enum class PpoMode { two_pass, fused };

template <class S, PpoMode Mode>
void BM_ppo(benchmark::State& st, std::int64_t batch) {
  using M = std::uint8_t;
  const std::int64_t n = st.range(0);
  const pb::TokenBatch<S, M> lp(batch, n, 41);
  pb::Buffer<S> old(n), adv(n), g(n);
  // old_logp near logp so ratios straddle the clip range; advantages of both signs.
  pb::fill_logp(adv.data(), n, 42, -2.0, 2.0);
  pb::fill_logp(old.data(), n, 43, -0.3, 0.3);
  for (std::size_t k = 0; k < static_cast<std::size_t>(n); ++k) old[k] += lp.x[k];
  const pb::TokenMap<const S> oldm(old.data(), batch, lp.tokens), advm(adv.data(), batch, lp.tokens);
  pb::TokenMap<S> gm(g.data(), batch, lp.tokens);
  prefloss::PpoOptions opt;
  for (auto _ : st) {
    if constexpr (Mode == PpoMode::two_pass) {
      auto res = prefloss::ppo_clip(lp.values(), oldm, advm, lp.masks(), opt);
      res.backward(gm);
      benchmark::DoNotOptimize(res.loss);
    } else {
      auto res = prefloss::ppo_clip(lp.values(), oldm, advm, lp.masks(), opt, gm);
      benchmark::DoNotOptimize(res.loss);
    }
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, double(4 * sizeof(S) + sizeof(M)) * static_cast<double>(n), double(n));
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_losses) {
  for (std::int64_t batch : {256}) {
    const std::string b = "/B" + std::to_string(batch);
    pb::add("dpo_fwd_bwd/f32_u8" + b, [batch](benchmark::State& st) { BM_dpo<float>(st, batch); }, pb::kTokenSizes,
            batch);
    pb::add("ppo_fwd_bwd/f32_u8" + b, [batch](benchmark::State& st) { BM_ppo<float, PpoMode::two_pass>(st, batch); },
            pb::kTokenSizes, batch);
    pb::add("ppo_fused/f32_u8" + b, [batch](benchmark::State& st) { BM_ppo<float, PpoMode::fused>(st, batch); },
            pb::kTokenSizes, batch);
  }
  // The shape, 256 x 8192 tokens a side, whatever the size ladder holds.
  pb::add("dpo_fwd_bwd/f32_u8/B256", [](benchmark::State& st) { BM_dpo<float>(st, 256); }, {2097152, 2097152}, 256);
  pb::add("ppo_fused/f32_u8/B256", [](benchmark::State& st) { BM_ppo<float, PpoMode::fused>(st, 256); },
          {2097152, 2097152}, 256);
  pb::add("ppo_fwd_bwd/f32_u8/B256", [](benchmark::State& st) { BM_ppo<float, PpoMode::two_pass>(st, 256); },
          {2097152, 2097152}, 256);
}

PREFLOSS_BENCH_MAIN()
