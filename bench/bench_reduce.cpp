// Masked reductions over row-major [batch, tokens]: masked_sum / masked_mean forward
// (eval_to) and their adjoints (backward), for float tokens + uint8 mask, float + float weights,
// double + uint8 and bf16 + uint8 (2-byte tokens: float values and upstream, bf16 gradient).
//
//   build-h2/bench/bench_reduce                    all sizes (1e3 .. 1e8 tokens in total)
//   build-h2/bench/bench_reduce --prefloss_quick   up to 4Mi tokens
//
// Rows: "<kernel>/<tokens>_<mask>/B<batch>/<total elements>"; tokens per row = total / batch.
// Bytes counted are the floor, what must move: forward reads each token and mask entry once and
// writes [batch] values; backward reads the mask (and [batch] upstream) and writes the gradient.
#include <prefloss/prefloss.hpp>

#include "bench_common.hpp"

#include <cstdint>
#include <string>

namespace pb = prefloss::bench;

namespace {

enum class Pass { forward, backward };

template <class S, class M, prefloss::Reduction R, Pass P>
void BM_masked(benchmark::State& st, std::int64_t batch) {
  const std::int64_t n = st.range(0);
  using C = prefloss::detail::compute_t<S>;  // sequence values' type (float for bf16 tokens)
  const pb::TokenBatch<S, M> in(batch, n, 21);
  pb::Buffer<S> grad(P == Pass::backward ? n : 0);
  pb::Buffer<C> out(batch), up(batch);
  pb::fill_logp(up.data(), batch, 22, -1.0, 1.0);
  const auto xm = in.values();
  const auto mm = in.masks();
  const pb::SeqMap<const C> upm(up.data(), batch);
  pb::TokenMap<S> gm(grad.data(), batch, P == Pass::backward ? in.tokens : 0);

  const auto make = [&] {
    if constexpr (R == prefloss::Reduction::sum) {
      return prefloss::masked_sum(xm, mm);
    } else {
      return prefloss::masked_mean(xm, mm);
    }
  };
  for (auto _ : st) {
    if constexpr (P == Pass::forward) {
      make().eval_to(out.data());
      benchmark::DoNotOptimize(out.data());
    } else {
      make().backward(upm, gm);
      benchmark::DoNotOptimize(grad.data());
    }
    benchmark::ClobberMemory();
  }
  // forward: read tokens + mask, write [batch]; backward: read mask + [batch], write the gradient.
  const double per_token = double(sizeof(S) + sizeof(M));
  pb::set_counters(st, per_token * static_cast<double>(n) + double(sizeof(C)) * static_cast<double>(batch),
                   static_cast<double>(n));
}

template <class S, class M, prefloss::Reduction R, Pass P>
void reg(const std::string& kernel, const std::string& types, std::int64_t batch) {
  pb::add(
      kernel + "/" + types + "/B" + std::to_string(batch),
      [batch](benchmark::State& st) { BM_masked<S, M, R, P>(st, batch); }, pb::kTokenSizes, batch);
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_reduce) {
  using prefloss::Reduction;
  using u8 = std::uint8_t;
  reg<float, u8, Reduction::sum, Pass::forward>("masked_sum", "f32_u8", 64);
  reg<float, u8, Reduction::sum, Pass::forward>("masked_sum", "f32_u8", 256);
  reg<float, u8, Reduction::mean, Pass::forward>("masked_mean", "f32_u8", 64);
  reg<float, float, Reduction::sum, Pass::forward>("masked_sum", "f32_f32", 64);
  reg<float, float, Reduction::mean, Pass::forward>("masked_mean", "f32_f32", 64);
  reg<double, u8, Reduction::sum, Pass::forward>("masked_sum", "f64_u8", 64);
  reg<float, u8, Reduction::sum, Pass::backward>("masked_sum_backward", "f32_u8", 64);
  reg<float, u8, Reduction::mean, Pass::backward>("masked_mean_backward", "f32_u8", 64);
  reg<float, float, Reduction::sum, Pass::backward>("masked_sum_backward", "f32_f32", 64);
  reg<Eigen::bfloat16, u8, Reduction::sum, Pass::forward>("masked_sum", "bf16_u8", 64);
  reg<Eigen::bfloat16, u8, Reduction::sum, Pass::backward>("masked_sum_backward", "bf16_u8", 64);
}

PREFLOSS_BENCH_MAIN()
