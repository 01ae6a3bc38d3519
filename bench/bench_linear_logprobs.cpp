// The fused LM head, forward + backward, one thread, against plain Eigen products of the same
// shapes in the same binary:
//   linear_logprobs_fwd_bwd   linear_logprobs(hidden [N, H], weight [V, H], labels, mask) then
//                             backward(grad_logp, grad_hidden, grad_weight); every token selected
//   gemm                      the four products linear_logprobs does, at full size with the
//                             [N, V] logits materialized and nothing else: Z = h W^T (forward),
//                             Z = h W^T (the backward's recompute), dh = Z W, dW = Z^T h
//
//   build/bench/bench_linear_logprobs                                   N = 512 and N = 2048
//   build/bench/bench_linear_logprobs --benchmark_filter=N512           the quick size
//
// Names are "<kernel>/f32/N<N>_H<H>/<N * V>" (V = 32000); bench/torch_compare.py joins them with
// its linear_logprobs_fwd_bwd workload. Counters: FLOP/s counts the 4 products' 8 N V H flops
// per iteration for both rows (so linear / gemm time is the ratio of FLOP/s); extra_MiB is the
// memory each row needs besides inputs and outputs, counted from the code: linear_logprobs'
// tile buffers (logits tile, gathered hidden tile, d/dh tile), an upper bound for Eigen's
// packing buffers ((tokens tile + vocabulary tile) x H) and its O(N) statistics; the gemm row's
// [N, V] logits.
//
// Written on a 2-core AMD EPYC (AVX-512, 1 MiB L2; shared with other jobs), medians of 3, CPU time:
// N 2048: linear 5.69 s, gemm 5.33 s (1.07x); N 512: linear 1.48 s, gemm 1.52 s (0.97x). The
// default tiles (256 x 512) were within noise of 512 x 256, 512 x 512 and 1024 x 256 there;
// vocabulary tiles of 1024 and 2048 rows were 5-25% slower.
#include <cstdint>
#include <prefloss/prefloss.hpp>
#include <string>

#include "bench_common.hpp"

namespace pb = prefloss::bench;

namespace {

constexpr std::int64_t kVocab = 32000, kHidden = 768;

struct Head {
  std::int64_t N, H, V;
  pb::Buffer<float> hidden, weight, grad_logp, grad_hidden, grad_weight;
  pb::Buffer<std::int32_t> labels;
  pb::Buffer<std::uint8_t> mask;
  Head(std::int64_t n, std::int64_t h, std::int64_t v)
      : N(n),
        H(h),
        V(v),
        hidden(n * h),
        weight(v * h),
        grad_logp(n),
        grad_hidden(n * h),
        grad_weight(v * h),
        labels(n),
        mask(n) {
    // Unit-variance hidden states and a weight of variance 1 / H: logits of about unit variance.
    const double a = std::sqrt(3.0), b = std::sqrt(3.0 / static_cast<double>(h));
    pb::fill_logp(hidden.data(), n * h, 61, -a, a);
    pb::fill_logp(weight.data(), v * h, 62, -b, b);
    pb::fill_logp(grad_logp.data(), n, 63, -1.0, 1.0);
    pb::Rng r(64);
    for (std::int64_t i = 0; i < n; ++i) {
      labels[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(r.next() % static_cast<std::uint64_t>(v));
      mask[static_cast<std::size_t>(i)] = 1;
    }
  }
};

using Rows = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
using CRows = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;
template <class T>
using CVec = Eigen::TensorMap<const Eigen::Tensor<T, 1>>;

void counters(benchmark::State& st, const Head& x, double extra_bytes) {
  using C = benchmark::Counter;
  st.counters["FLOP/s"] = C(8.0 * double(x.N) * double(x.V) * double(x.H), C::kIsIterationInvariantRate);
  st.counters["tokens"] = C(double(x.N), C::kIsIterationInvariantRate);
  st.counters["extra_MiB"] = extra_bytes / double(1 << 20);
}

void BM_linear(benchmark::State& st, std::int64_t N) {
  Head x(N, kHidden, kVocab);
  const CRows h(x.hidden.data(), N, x.H), w(x.weight.data(), x.V, x.H);
  const CVec<std::int32_t> y(x.labels.data(), N);
  const CVec<std::uint8_t> m(x.mask.data(), N);
  const CVec<float> g(x.grad_logp.data(), N);
  Rows gh(x.grad_hidden.data(), N, x.H), gw(x.grad_weight.data(), x.V, x.H);
  for (auto _ : st) {
    const auto r = prefloss::linear_logprobs(h, w, y, m);
    r.backward(g, gh, gw);
    benchmark::DoNotOptimize(r.logp.data());
    benchmark::ClobberMemory();
  }
  namespace d = prefloss::detail;
  const double Nt = double(std::min<std::int64_t>(d::linear_tile_tokens, N)), Vt = double(d::linear_tile_vocab);
  const double tiles = Nt * Vt + 2 * Nt * double(x.H) + (Nt + Vt) * double(x.H);  // floats
  // Per token: its index (8), statistics (32), running state during the forward (40), logp (4).
  counters(st, x, 4 * tiles + double(N) * (8 + 32 + 40 + 4));
}

void BM_gemm(benchmark::State& st, std::int64_t N) {
  Head x(N, kHidden, kVocab);
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  pb::Buffer<float> z(N * x.V);
  const Eigen::Map<const Mat> h(x.hidden.data(), N, x.H), w(x.weight.data(), x.V, x.H);
  Eigen::Map<Mat> Z(z.data(), N, x.V), gh(x.grad_hidden.data(), N, x.H), gw(x.grad_weight.data(), x.V, x.H);
  for (auto _ : st) {
    Z.noalias() = h * w.transpose();  // forward
    benchmark::DoNotOptimize(z.data());
    Z.noalias() = h * w.transpose();  // the backward's recompute
    gh.noalias() = Z * w;
    gw.noalias() = Z.transpose() * h;
    benchmark::DoNotOptimize(x.grad_weight.data());
    benchmark::ClobberMemory();
  }
  counters(st, x, 4.0 * double(N) * double(x.V));
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_linear_logprobs) {
  for (const std::int64_t N : {512, 2048}) {
    const std::string shape = "/f32/N" + std::to_string(N) + "_H" + std::to_string(kHidden);
    for (const auto& [name, fn] :
         {std::pair<std::string, void (*)(benchmark::State&, std::int64_t)>{"linear_logprobs_fwd_bwd", BM_linear},
          {"gemm", BM_gemm}})
      benchmark::RegisterBenchmark((name + shape).c_str(), fn, N)->Arg(N * kVocab)->Unit(benchmark::kMillisecond);
  }
}

PREFLOSS_BENCH_MAIN()
