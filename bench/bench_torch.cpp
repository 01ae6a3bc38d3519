// The libtorch adapter (prefloss/torch.hpp) against libtorch autograd and against the core call
// it wraps, one thread (at::set_num_threads(1)), float32, [64, 2048] tokens (~75% valid, uint8
// masks):
//
//   torch_dpo_adapter    pt::dpo(pt::masked_sum(c, mc), pt::masked_sum(r, mr), ref_c, ref_r) and
//                        loss.backward() into c.grad / r.grad (reset each iteration: autograd
//                        then hands over the gradient tensors the nodes allocate, no copy)
//   torch_dpo_libtorch   TRL's dpo_loss in libtorch autograd: (logp * mask).sum(-1) (the mask
//                        converted to float once, outside the loop, as TRL multiplies by it),
//                        -logsigmoid(beta * logits).mean(), TRL's reward metrics, backward
//   torch_dpo_core       prefloss::dpo's fused form on Eigen maps of the same tensors
//                        (prefloss::torch::view / mutable_view) into preallocated gradients
//   torch_dpo_core2pass  the core's two-pass form (dpo, then result.backward into the same
//                        gradients): the arithmetic the adapter's forward and backward run
//   torch_ppo_*          the same four for ppo_clip: verl's compute_policy_loss_vanilla (clip
//                        0.2 / 0.2, log-ratio clamp 20, dual clip c = 3 as verl always applies it)
//                        with agg_loss token-mean and its three logged metrics; the adapter and
//                        the core with PpoOptions{dual_clip = 3}
//
// The adapter rows carry paired counters, measured after the timed loop by interleaving the
// variants round by round (CPU time of this thread, median over the rounds), so that the
// ratios do not depend on what the machine did between rows:
//   x_libtorch    libtorch time / adapter time (> 1: the adapter is faster)
//   ovh_core_us   adapter - fused core call, microseconds
//   ovh_2pass_us  adapter - two-pass core calls, microseconds (the arithmetic the adapter
//                 runs: its forward and backward are the core's two passes)
//   floor_us      an empty autograd node over the same inputs, attached and run backward
//                 (torch_*_autograd_floor), timed alone: the engine's cost with warm caches
//   ovh_engine_us adapter - (fused core call + that empty node, in one iteration): the
//                 adapter's own cost. libtorch's engine, run between kernels that stream
//                 megabytes, costs 3 to 5 times floor_us (on a Xeon; cold caches and TLB for
//                 its code, we think: this KVM guest has no counters to show it); this
//                 variant runs it where the adapter's node runs
// and the end of the run prints one summary line per loss to stderr (the medians over the
// repetitions' paired measurements; stdout stays pure JSON under --benchmark_format=json).
//
//   build/bench/bench_torch --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// Rows are "<kernel>/f32_u8/B64/<tokens>" (bench_common.hpp); bench/torch_compare.py has PyTorch
// eager workloads for the torch_dpo_* and torch_ppo_* kernels.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <prefloss/torch.hpp>

#include "bench_common.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace pb = prefloss::bench;
namespace pt = prefloss::torch;

namespace {

constexpr std::int64_t kBatch = 64, kTokens = 2048, kN = kBatch * kTokens;
constexpr double kBeta = 0.1, kKeep = 0.75;

at::Tensor logp_tensor(std::uint64_t seed, double lo = -10.0, double hi = 0.0) {
  at::Tensor t = at::empty({kBatch, kTokens}, at::kFloat);
  pb::fill_logp(t.data_ptr<float>(), kN, seed, lo, hi);
  return t;
}

at::Tensor mask_tensor(std::uint64_t seed) {
  at::Tensor m = at::empty({kBatch, kTokens}, at::kByte);
  pb::fill_mask(m.data_ptr<std::uint8_t>(), kN, seed, kKeep);
  return m;
}

at::Tensor seq_tensor(std::uint64_t seed) {
  at::Tensor t = at::empty({kBatch}, at::kFloat);
  pb::fill_logp(t.data_ptr<float>(), kBatch, seed, -1500.0, -500.0);  // sums of ~1500 log-probs
  return t;
}

/// The floor of any autograd node: a node over the same inputs that computes nothing and returns
/// no gradient (a bare torch::autograd::Node, as the adapter's are: a custom Function costs
/// ~1 us more), attached to a 0-dim output and run backward. The engine's own cost, which no
/// adapter can go below.
struct Empty : ::torch::autograd::Node {
  ::torch::autograd::variable_list apply(::torch::autograd::variable_list&& grads) override {
    (void)grads;
    return ::torch::autograd::variable_list(num_outputs());
  }
};
void autograd_floor(const std::vector<at::Tensor>& inputs) {
  const auto node = std::shared_ptr<Empty>(new Empty(), ::torch::autograd::deleteNode);
  node->set_next_edges(::torch::autograd::collect_next_edges(at::TensorList(inputs)));
  at::Tensor out = at::scalar_tensor(0.0, at::kFloat);
  ::torch::autograd::set_history(out, node);
  out.backward();
}

// ---- DPO ----------------------------------------------------------------------------------------

struct DpoInputs {
  at::Tensor lc = logp_tensor(31).requires_grad_(true), lr = logp_tensor(32).requires_grad_(true);
  at::Tensor mc = mask_tensor(131), mr = mask_tensor(132);
  at::Tensor mcf = mc.to(at::kFloat), mrf = mr.to(at::kFloat);
  at::Tensor rc = seq_tensor(33), rr = seq_tensor(34);
  at::Tensor gc = at::empty({kBatch, kTokens}, at::kFloat), gr = at::empty({kBatch, kTokens}, at::kFloat);
  prefloss::DpoOptions opt;
  DpoInputs() { opt.beta = kBeta; }

  void adapter() {
    auto res = pt::dpo(pt::masked_sum(lc, mc), pt::masked_sum(lr, mr), rc, rr, opt);
    res.loss.backward();
    benchmark::DoNotOptimize(res.metrics.reward_accuracy);
    lc.mutable_grad().reset();
    lr.mutable_grad().reset();
  }
  void libtorch() {
    const at::Tensor sc = (lc * mcf).sum(-1), sr = (lr * mrf).sum(-1);
    const at::Tensor logits = (sc - sr) - (rc - rr);
    const at::Tensor loss = -at::log_sigmoid(kBeta * logits).mean();
    {
      at::NoGradGuard no_grad;  // the metrics TRL logs
      const at::Tensor cr = kBeta * (sc - rc), rj = kBeta * (sr - rr);
      benchmark::DoNotOptimize((cr > rj).to(at::kFloat).mean().item<float>());
      benchmark::DoNotOptimize((cr - rj).mean().item<float>());
    }
    loss.backward();
    lc.mutable_grad().reset();
    lr.mutable_grad().reset();
  }
  void floor() { autograd_floor({lc, lr}); }
  template <bool Fused>
  void core() {
    const auto c = pt::view<float, 2>(lc, "lc"), r = pt::view<float, 2>(lr, "lr");
    const auto m1 = pt::view<std::uint8_t, 2>(mc, "mc"), m2 = pt::view<std::uint8_t, 2>(mr, "mr");
    const auto ref_c = pt::view<float, 1>(rc, "rc"), ref_r = pt::view<float, 1>(rr, "rr");
    auto g1 = pt::mutable_view<float, 2>(gc, "gc");
    auto g2 = pt::mutable_view<float, 2>(gr, "gr");
    if constexpr (Fused) {
      auto res = prefloss::dpo(prefloss::masked_sum(c, m1), prefloss::masked_sum(r, m2), ref_c, ref_r, opt, g1, g2);
      benchmark::DoNotOptimize(res.loss);
    } else {
      auto res = prefloss::dpo(prefloss::masked_sum(c, m1), prefloss::masked_sum(r, m2), ref_c, ref_r, opt);
      res.backward(g1, g2);
      benchmark::DoNotOptimize(res.loss);
    }
    benchmark::ClobberMemory();
  }
};

// ---- PPO ----------------------------------------------------------------------------------------

struct PpoInputs {
  at::Tensor logp = logp_tensor(41).requires_grad_(true);
  at::Tensor old = (logp.detach() + logp_tensor(43, -0.3, 0.3)).contiguous();
  at::Tensor adv = logp_tensor(42, -2.0, 2.0);
  at::Tensor mask = mask_tensor(141), maskf = mask.to(at::kFloat);
  at::Tensor g = at::empty({kBatch, kTokens}, at::kFloat);
  prefloss::PpoOptions opt;
  PpoInputs() { opt.dual_clip = 3.0; }

  void adapter() {
    auto res = pt::ppo_clip(logp, old, adv, mask, opt);
    res.loss.backward();
    benchmark::DoNotOptimize(res.metrics.clip_fraction);
    logp.mutable_grad().reset();
  }
  void libtorch() {  // verl compute_policy_loss_vanilla + agg_loss("token-mean")
    const at::Tensor neg_kl = at::clamp(logp - old, -20.0, 20.0);
    const at::Tensor ratio = at::exp(neg_kl);
    const at::Tensor denom = maskf.sum();
    const at::Tensor l1 = -adv * ratio;
    const at::Tensor l2 = -adv * at::clamp(ratio, 0.8, 1.2);
    const at::Tensor clip1 = at::maximum(l1, l2);
    const at::Tensor l3 = -adv * 3.0;
    const at::Tensor clip2 = at::min(l3, clip1);
    const at::Tensor pg = at::where(adv < 0, clip2, clip1);
    const at::Tensor loss = (pg * maskf).sum() / denom;
    {  // verl's metrics (detached .item() in the original)
      at::NoGradGuard no_grad;
      benchmark::DoNotOptimize(((-neg_kl) * maskf).sum().div(denom).item<float>());
      benchmark::DoNotOptimize((at::gt(l2, l1).to(at::kFloat) * maskf).sum().div(denom).item<float>());
      benchmark::DoNotOptimize(((at::gt(clip1, l3) * (adv < 0).to(at::kFloat)) * maskf).sum().div(denom).item<float>());
    }
    loss.backward();
    logp.mutable_grad().reset();
  }
  void floor() { autograd_floor({logp}); }
  template <bool Fused>
  void core() {
    const auto x = pt::view<float, 2>(logp, "logp"), o = pt::view<float, 2>(old, "old");
    const auto a = pt::view<float, 2>(adv, "adv");
    const auto m = pt::view<std::uint8_t, 2>(mask, "mask");
    auto gm = pt::mutable_view<float, 2>(g, "g");
    if constexpr (Fused) {
      auto res = prefloss::ppo_clip(x, o, a, m, opt, gm);
      benchmark::DoNotOptimize(res.loss);
    } else {
      auto res = prefloss::ppo_clip(x, o, a, m, opt);
      res.backward(gm);
      benchmark::DoNotOptimize(res.loss);
    }
    benchmark::ClobberMemory();
  }
};

// ---- rows ---------------------------------------------------------------------------------------

enum class Variant { adapter, libtorch, core, core2pass, floor };

/// Paired measurement: `rounds` rounds, each timing `k` calls of every variant in turn after one
/// untimed call (CPU time of this thread); per variant the median over rounds, seconds per call.
struct Paired {
  double adapter = 0, libtorch = 0, core = 0, core2pass = 0, floor = 0, core_floor = 0;
};

template <class In>
Paired paired(In& in, int rounds = 9, int k = 4) {
  constexpr int n = 6;
  std::vector<double> t[n];
  const std::function<void()> fns[n] = {[&] { in.adapter(); },
                                        [&] { in.libtorch(); },
                                        [&] { in.template core<true>(); },
                                        [&] { in.template core<false>(); },
                                        [&] { in.floor(); },
                                        [&] {
                                          in.template core<true>();
                                          in.floor();
                                        }};
  for (int r = 0; r < rounds; ++r)
    for (int v = 0; v < n; ++v) {
      fns[v]();  // untimed: the previous variant's allocations and cache lines are not this one's
      const double t0 = pb::thread_seconds();
      for (int i = 0; i < k; ++i) fns[v]();
      t[v].push_back((pb::thread_seconds() - t0) / k);
    }
  const auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
  };
  return {median(t[0]), median(t[1]), median(t[2]), median(t[3]), median(t[4]), median(t[5])};
}

/// The paired results of every final run (iterations >= 20; Google Benchmark's shorter probe
/// runs are not kept), per loss, for the summary.
std::map<std::string, std::vector<Paired>>& summary() {
  static std::map<std::string, std::vector<Paired>> s;
  return s;
}

template <class In, Variant V>
void BM_row(benchmark::State& st, const std::string& loss) {
  at::set_num_threads(1);
  In in;
  for (auto _ : st) {
    if constexpr (V == Variant::adapter) in.adapter();
    if constexpr (V == Variant::libtorch) in.libtorch();
    if constexpr (V == Variant::core) in.template core<true>();
    if constexpr (V == Variant::core2pass) in.template core<false>();
    if constexpr (V == Variant::floor) in.floor();
  }
  st.counters["tokens"] = benchmark::Counter(static_cast<double>(kN), benchmark::Counter::kIsIterationInvariantRate);
  if constexpr (V == Variant::adapter) {
    const Paired p = paired(in);
    st.counters["x_libtorch"] = p.libtorch / p.adapter;
    st.counters["ovh_core_us"] = 1e6 * (p.adapter - p.core);
    st.counters["ovh_2pass_us"] = 1e6 * (p.adapter - p.core2pass);
    st.counters["floor_us"] = 1e6 * p.floor;
    st.counters["ovh_engine_us"] = 1e6 * (p.adapter - p.core_floor);
    if (st.iterations() >= 20) summary()[loss].push_back(p);
  }
}

template <class In>
void add_family(const std::string& loss) {
  const std::string v = "/f32_u8/B" + std::to_string(kBatch);
  const pb::SizeRange one{kN, kN};
  pb::add(
      "torch_" + loss + "_adapter" + v, [loss](benchmark::State& st) { BM_row<In, Variant::adapter>(st, loss); }, one,
      kBatch);
  pb::add(
      "torch_" + loss + "_libtorch" + v, [loss](benchmark::State& st) { BM_row<In, Variant::libtorch>(st, loss); }, one,
      kBatch);
  pb::add(
      "torch_" + loss + "_core" + v, [loss](benchmark::State& st) { BM_row<In, Variant::core>(st, loss); }, one,
      kBatch);
  pb::add(
      "torch_" + loss + "_core2pass" + v, [loss](benchmark::State& st) { BM_row<In, Variant::core2pass>(st, loss); },
      one, kBatch);
  pb::add(
      "torch_" + loss + "_autograd_floor" + v, [loss](benchmark::State& st) { BM_row<In, Variant::floor>(st, loss); },
      one, kBatch);
}

void print_summary() {
  for (const auto& [loss, runs] : summary()) {
    if (runs.empty()) continue;
    const auto median = [&](double Paired::*f) {
      std::vector<double> x;
      for (const auto& p : runs) x.push_back(p.*f);
      std::sort(x.begin(), x.end());
      return x[x.size() / 2];
    };
    const double a = median(&Paired::adapter), l = median(&Paired::libtorch), c = median(&Paired::core),
                 c2 = median(&Paired::core2pass), f = median(&Paired::floor), cf = median(&Paired::core_floor);
    std::fprintf(
        stderr,
        "summary %s [%lld, %lld] f32, 1 thread, paired medians over %zu runs: adapter %.1f us, libtorch %.1f us, "
        "core fused %.1f us, core two-pass %.1f us; libtorch/adapter %.2fx; adapter - core fused %.1f us, "
        "adapter - core two-pass %.1f us (goal < 10 us); an empty autograd node (attach + backward) %.1f us "
        "alone, %.1f us after the core call (core + it: %.1f us); adapter - (core + empty node) %.1f us\n",
        loss.c_str(), static_cast<long long>(kBatch), static_cast<long long>(kTokens), runs.size(), 1e6 * a, 1e6 * l,
        1e6 * c, 1e6 * c2, l / a, 1e6 * (a - c), 1e6 * (a - c2), 1e6 * f, 1e6 * (cf - c), 1e6 * cf, 1e6 * (a - cf));
  }
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_torch) {
  add_family<DpoInputs>("dpo");
  add_family<PpoInputs>("ppo");
}

int main(int argc, char** argv) {
  at::set_num_threads(1);
  const int rc = prefloss::bench::run_main(argc, argv);
  print_summary();
  return rc;
}
