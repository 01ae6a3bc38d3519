// Loss kernels, forward + backward with caller-provided outputs, one thread:
//   dpo_fwd_bwd   dpo(masked_sum(c), masked_sum(r), ref_c, ref_r) then backward(g_c, g_r)
//   dpo_fused     dpo(masked_sum(c), masked_sum(r), ref_c, ref_r, opt, g_c, g_r)  (one pass)
//   rw_floor      the fused DPO's memory traffic and nothing else: per token read x (4) and
//                 mask (1), write g (4) = 9 bytes, g = m ? x : 0, streaming stores past the
//                 threshold as the losses use; what a one-pass loss could reach at best
//   ppo_fwd_bwd   ppo_clip(logp, old, adv, mask) then backward(g)      (two passes)
//   ppo_fused     ppo_clip(logp, old, adv, mask, opt, g)                (one pass)
//   gspo_fused    ppo_fused with importance_level sequence: each row's log-ratio pass, then the
//                 fused pass (the row is re-read, from cache at 8192 tokens a row)
//
//   build/bench/bench_losses                      all sizes (tokens per side 1e3 .. 1e8)
//   build/bench/bench_losses --prefloss_quick     up to 4Mi tokens
//   build/bench/bench_losses --benchmark_filter='B256/2097152'   the 256 x 8192 shape
//
// Bytes counted are the floor (README, Performance), what must move at least once: DPO reads log-probs (4) and
// mask (1) and writes the gradient (4) per token and side = 9; PPO reads logp, old_logp,
// advantages (4 each) and the mask (1) and writes the gradient (4) = 17. The two-pass PPO and
// DPO's backward re-read the mask (and PPO its inputs), so their true traffic is higher; the
// roofline column is achieved floor-bytes/s over this binary's streaming-read bandwidth. The
// bf16 PPO rows hold all three inputs and the gradient in bf16: 2 * 4 + 1 = 9 bytes a token.
#include <cstdint>
#include <prefloss/prefloss.hpp>
#include <string>

#include "bench_common.hpp"

namespace pb = prefloss::bench;

namespace {

template <class S, bool Fused = false>
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
    if constexpr (Fused) {
      auto res = prefloss::dpo(prefloss::masked_sum(c.values(), c.masks()), prefloss::masked_sum(r.values(), r.masks()),
                               rc, rr, opt, gcm, grm);
      benchmark::DoNotOptimize(res.loss);
    } else {
      auto res = prefloss::dpo(prefloss::masked_sum(c.values(), c.masks()), prefloss::masked_sum(r.values(), r.masks()),
                               rc, rr, opt);
      res.backward(gcm, grm);
      benchmark::DoNotOptimize(res.loss);
    }
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, 2.0 * double(sizeof(S) + sizeof(M) + sizeof(S)) * static_cast<double>(n), 2.0 * double(n));
}

/// g = m ? x : 0 over [batch, n / batch] rows: reads 4 + 1 bytes and writes 4 a token, row by
/// row as the fused losses do, with the same store choice (streaming past the threshold, after
/// each row's unaligned head). No arithmetic: the memory floor of a one-pass DPO side.
template <bool Stream>
__attribute__((noinline)) void rw_rows(const float* x, const std::uint8_t* m, float* g, std::int64_t rows,
                                       std::int64_t cols) noexcept {
  namespace d = prefloss::detail;
  using B = d::batch<float>;
  constexpr std::int64_t w = static_cast<std::int64_t>(B::size);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * cols;
    const std::uint8_t* mr = m + i * cols;
    float* gr = g + i * cols;
    std::int64_t t = 0;
    if constexpr (Stream)
      for (const auto head = static_cast<std::int64_t>(d::stream_head(gr, static_cast<std::size_t>(cols))); t < head;
           ++t)
        gr[t] = mr[t] ? xr[t] : 0.f;
    for (; t + w <= cols; t += w)
      d::store_to<Stream>(
          gr + t, xsimd::select(d::load_byte_mask<float, d::arch>(mr + t), d::load_u<float, d::arch>(xr + t), B(0.f)));
    for (; t < cols; ++t) gr[t] = mr[t] ? xr[t] : 0.f;
  }
  if constexpr (Stream) d::stream_fence();
}

void BM_rw_floor(benchmark::State& st, std::int64_t batch) {
  using M = std::uint8_t;
  const std::int64_t n = st.range(0);
  const pb::TokenBatch<float, M> c(batch, n, 31);
  pb::Buffer<float> g(n);
  const bool stream = prefloss::detail::use_stream_store<float>(static_cast<std::size_t>(n));
  for (auto _ : st) {
    if (stream) {
      rw_rows<true>(c.x.data(), c.mask.data(), g.data(), batch, c.tokens);
    } else {
      rw_rows<false>(c.x.data(), c.mask.data(), g.data(), batch, c.tokens);
    }
    benchmark::DoNotOptimize(g.data());
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, double(sizeof(float) + sizeof(M) + sizeof(float)) * static_cast<double>(n), double(n));
}

enum class PpoMode { two_pass, fused };

template <class S, PpoMode Mode, bool Sequence = false>
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
  if (Sequence) opt.importance_level = prefloss::ImportanceLevel::sequence;
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
    pb::add(
        "dpo_fwd_bwd/f32_u8" + b, [batch](benchmark::State& st) { BM_dpo<float>(st, batch); }, pb::kTokenSizes, batch);
    pb::add(
        "dpo_fused/f32_u8" + b, [batch](benchmark::State& st) { BM_dpo<float, true>(st, batch); }, pb::kTokenSizes,
        batch);
    pb::add(
        "ppo_fwd_bwd/f32_u8" + b, [batch](benchmark::State& st) { BM_ppo<float, PpoMode::two_pass>(st, batch); },
        pb::kTokenSizes, batch);
    pb::add(
        "ppo_fused/f32_u8" + b, [batch](benchmark::State& st) { BM_ppo<float, PpoMode::fused>(st, batch); },
        pb::kTokenSizes, batch);
  }
  // The shape, 256 x 8192 tokens a side, whatever the size ladder holds.
  pb::add(
      "dpo_fwd_bwd/f32_u8/B256", [](benchmark::State& st) { BM_dpo<float>(st, 256); }, {2097152, 2097152}, 256);
  pb::add(
      "dpo_fused/f32_u8/B256", [](benchmark::State& st) { BM_dpo<float, true>(st, 256); }, {2097152, 2097152}, 256);
  // DRAM sizes: 256 x 65536 tokens a side (rows batch-aligned), and 256 x 195313 a side, ~1e8
  // tokens in all (rows not batch-aligned: every gradient row but the first has a head). Each
  // next to its two-pass row and the read+write floor of one side.
  for (std::int64_t n : {std::int64_t{256} * 65536, std::int64_t{256} * 195313}) {
    const pb::SizeRange one{n, n};
    pb::add(
        "dpo_fwd_bwd/f32_u8/B256", [](benchmark::State& st) { BM_dpo<float>(st, 256); }, one, 256);
    pb::add(
        "dpo_fused/f32_u8/B256", [](benchmark::State& st) { BM_dpo<float, true>(st, 256); }, one, 256);
    pb::add(
        "rw_floor/f32_u8/B256", [](benchmark::State& st) { BM_rw_floor(st, 256); }, one, 256);
  }
  pb::add(
      "ppo_fused/f32_u8/B256", [](benchmark::State& st) { BM_ppo<float, PpoMode::fused>(st, 256); }, {2097152, 2097152},
      256);
  pb::add(
      "ppo_fwd_bwd/f32_u8/B256", [](benchmark::State& st) { BM_ppo<float, PpoMode::two_pass>(st, 256); },
      {2097152, 2097152}, 256);
  pb::add(
      "gspo_fused/f32_u8/B256", [](benchmark::State& st) { BM_ppo<float, PpoMode::fused, true>(st, 256); },
      {2097152, 2097152}, 256);
  using bf16 = Eigen::bfloat16;
  pb::add(
      "ppo_fused/bf16_u8/B256", [](benchmark::State& st) { BM_ppo<bf16, PpoMode::fused>(st, 256); }, pb::kTokenSizes,
      256);
  pb::add(
      "ppo_fwd_bwd/bf16_u8/B256", [](benchmark::State& st) { BM_ppo<bf16, PpoMode::two_pass>(st, 256); },
      pb::kTokenSizes, 256);
}

PREFLOSS_BENCH_MAIN()
