// One optimizer step of the examples' causal transformer (examples/common/torch_lm.hpp), taken
// twice from the same weights on the same batch: once with the loss through prefloss's libtorch
// adapter (token_logprobs, masked_sum and the loss nodes, closed-form backward), once with the
// anchor's formula written in plain libtorch and differentiated by libtorch's autograd. Every
// parameter's gradient must agree, and so must the parameters after one SGD step:
//   max over parameters p of max|g_a(p) - g_b(p)| / max|g_b(p)|  <=  1e-5 (float32), 1e-12 (float64).
// The parameters after one Adam step are printed but not held to that bound (see
// require_agreement: Adam's first step amplifies tiny gradients' differences by lr / eps).
// The expected side is never prefloss output: it is autograd of
//   - TRL DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py, loss_type "sigmoid"): sequence
//     log-prob sums of selective_log_softmax with masked tokens set to 0, -logsigmoid(beta
//     delta).mean(), chosen and rejected in one forward, split by chunk(2);
//   - verl compute_policy_loss_vanilla + agg_loss (verl/trainer/ppo/core_algos.py): the clamped
//     log-ratio, clip ranges, dual clip with clip_ratio_c = 3, "token-mean" and
//     "seq-mean-token-mean";
//   - verl compute_value_loss (same file): the clipped value loss, 0.5 * agg_loss "token-mean";
//   - TRL's SFT token-mean cross-entropy and RewardTrainer's -logsigmoid(r_c - r_r).mean().
#include <torch/torch.h>
#include <prefloss/torch.hpp>

// libtorch's glog defines CHECK(condition); this file's CHECK is Catch's.
#undef CHECK
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "../../examples/common/torch_lm.hpp"

namespace {

namespace pl = prefloss;
namespace pt = prefloss::torch;
using examples::CausalLm;
using examples::Language;
using examples::LmBatch;

constexpr std::uint64_t model_seed = 1234, ref_seed = 99;

/// A batch of pairs with ragged masks: row b's response loses its last b % 3 tokens (padding), and
/// the prompt's labels are masked as always.
struct Data {
  Language lang;
  LmBatch chosen, rejected, both;  ///< both = chosen rows then rejected rows (TRL's concatenated forward)
  explicit Data(torch::Dtype dtype, std::int64_t pairs = 6) {
    examples::Rng rng(2024);
    std::vector<Language::Sequence> c, r;
    for (std::int64_t k = 0; k < pairs; ++k) {
      auto p = lang.sample_pair(rng);
      c.push_back(p.chosen), r.push_back(p.rejected);
    }
    chosen = ragged(lang.batch(c, dtype));
    rejected = ragged(lang.batch(r, dtype));
    both = {torch::cat({chosen.ids, rejected.ids}), torch::cat({chosen.input, rejected.input}),
            torch::cat({chosen.labels, rejected.labels}), torch::cat({chosen.mask, rejected.mask})};
  }
  static LmBatch ragged(LmBatch b) {
    const std::int64_t T = b.mask.size(1);
    for (std::int64_t i = 0; i < b.size(); ++i)
      if (i % 3) b.mask[i].slice(0, T - i % 3).zero_();
    return b;
  }
};

/// log pi(label) per token by plain libtorch (TRL selective_log_softmax: log_softmax, then gather).
torch::Tensor torch_token_logp(const torch::Tensor& logits, const torch::Tensor& labels) {
  return torch::log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1);
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

/// Parameters whose gradient is 0 in exact arithmetic for a loss (so that both sides hold only
/// rounding noise there, and a relative difference is meaningless): left out of the relative
/// measure and required to be at that noise level instead.
using Names = std::vector<std::string>;

std::vector<torch::Tensor> grads(CausalLm& m) {
  std::vector<torch::Tensor> g;
  for (auto& p : m->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return g;
}
std::vector<torch::Tensor> params(CausalLm& m) {
  std::vector<torch::Tensor> v;
  for (auto& p : m->parameters()) v.push_back(p.detach().clone());
  return v;
}
Names names(CausalLm& m) {
  Names n;
  for (auto& p : m->named_parameters()) n.push_back(p.key());
  return n;
}

/// max over parameters k (but `skip`) of max|a_k - b_k| / max|b_k| (a tensor that is 0 in b must
/// be 0 in a); `worst` gets the parameter's name.
double max_rel(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, const Names& n,
               const Names& skip, std::string& worst) {
  double m = 0;
  worst = "-";
  for (std::size_t k = 0; k < a.size(); ++k) {
    if (std::find(skip.begin(), skip.end(), n[k]) != skip.end()) continue;
    const double den = max_abs(b[k]), num = max_abs(a[k] - b[k]);
    const double rel = den > 0 ? num / den : (num > 0 ? HUGE_VAL : 0.0);
    if (rel > m) m = rel, worst = n[k];
  }
  return m;
}

using LossFn = std::function<torch::Tensor(CausalLm&)>;

struct Agreement {
  double loss = 0;   ///< |loss_a - loss_b| / max(1, |loss_b|)
  double grad = 0;   ///< max over parameters of max|g_a - g_b| / max|g_b|
  double sgd = 0;    ///< the same of the parameters after one SGD step (lr 0.1)
  double adam = 0;   ///< the same after one Adam step (lr 1e-3, eps 1e-8): reported, see below
  double noise = 0;  ///< max |g| over both sides at the `zero` parameters, over the model's max |g_b|
};

/// The same model twice from one seed; loss a (prefloss) and loss b (reference) backward, then
/// one SGD step on each, and (from the same start again) one Adam step on each.
Agreement compare(torch::Dtype dtype, const LossFn& ours, const LossFn& reference, const char* what,
                  const Names& zero = {}) {
  const auto cfg = Language().lm_config();
  Agreement out;
  std::string wg, ws, wa;
  for (int opt = 0; opt < 2; ++opt) {
    CausalLm a = examples::make_lm(cfg, model_seed, dtype), b = examples::make_lm(cfg, model_seed, dtype);
    const Names n = names(a);
    std::string unused;
    REQUIRE(max_rel(params(a), params(b), n, {}, unused) == 0.0);
    const torch::Tensor la = ours(a), lb = reference(b);
    la.backward();
    lb.backward();
    if (opt == 0) {
      out.loss = std::abs(la.item<double>() - lb.item<double>()) / std::max(1.0, std::abs(lb.item<double>()));
      const auto ga = grads(a), gb = grads(b);
      out.grad = max_rel(ga, gb, n, zero, wg);
      double top = 0, z = 0;
      for (std::size_t k = 0; k < gb.size(); ++k) {
        top = std::max(top, max_abs(gb[k]));
        if (std::find(zero.begin(), zero.end(), n[k]) != zero.end()) z = std::max({z, max_abs(ga[k]), max_abs(gb[k])});
      }
      out.noise = z / top;
      torch::optim::SGD oa(a->parameters(), torch::optim::SGDOptions(0.1)),
          ob(b->parameters(), torch::optim::SGDOptions(0.1));
      oa.step(), ob.step();
      out.sgd = max_rel(params(a), params(b), n, zero, ws);
    } else {
      torch::optim::Adam oa(a->parameters(), torch::optim::AdamOptions(1e-3)),
          ob(b->parameters(), torch::optim::AdamOptions(1e-3));
      oa.step(), ob.step();
      out.adam = max_rel(params(a), params(b), n, zero, wa);
    }
  }
  std::printf("%-38s %-8s loss %.1e  grad %.3e (%s)  params after SGD %.3e (%s), after Adam %.3e (%s)\n", what,
              dtype == torch::kFloat32 ? "float32" : "float64", out.loss, out.grad, wg.c_str(), out.sgd, ws.c_str(),
              out.adam, wa.c_str());
  return out;
}

double tolerance(torch::Dtype dtype) { return dtype == torch::kFloat32 ? 1e-5 : 1e-12; }

// The checks: the loss, every gradient, and the parameters after one SGD step, within the bound.
// Adam's first step is reported, not checked against the bound: it moves each parameter by
// lr g / (|g| + eps), so at an element whose gradient is far below eps (1e-8) it moves by
// (lr / eps) g and turns a difference in g into one (lr / eps) = 1e5 times larger in the
// parameter. Such elements exist in every layer (e.g. |g| = 4e-10 where the layer's largest is
// 2e-2): float32 gradients that agree to 1e-6 of the layer's largest (as here) then give
// parameters that agree to about 1e-4 of the largest weight, and float64 ones at 1e-15 give
// about 5e-12. That is the optimizer's conditioning, not the loss's: two float32 autograd
// implementations of the same formula would differ as much.
void require_agreement(torch::Dtype dtype, const LossFn& ours, const LossFn& reference, const char* what,
                       const Names& zero = {}) {
  const Agreement ag = compare(dtype, ours, reference, what, zero);
  CHECK(ag.loss <= tolerance(dtype));
  CHECK(ag.grad <= tolerance(dtype));
  CHECK(ag.sgd <= tolerance(dtype));
  CHECK(ag.noise <= tolerance(dtype));
}

/// The frozen reference model's sequence log-probs of `both` (TRL: masked tokens set to 0, summed).
torch::Tensor reference_logps(const Data& d, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  CausalLm ref = examples::make_lm(d.lang.lm_config(), ref_seed, dtype);
  return (torch_token_logp(ref->logits(d.both.input), d.both.labels) * d.both.mask).sum(1);
}

/// PPO's constants for `both`: old log-probs (the current policy's, perturbed so that ratios
/// spread over both clip ranges), advantages and returns, old values; from a fixed generator.
struct PpoInputs {
  torch::Tensor old_logp, advantages, old_values, returns;
};
PpoInputs ppo_inputs(const Data& d, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  CausalLm m = examples::make_lm(d.lang.lm_config(), model_seed, dtype);
  torch::manual_seed(7);
  const torch::Tensor lp = torch_token_logp(m->logits(d.both.input), d.both.labels);
  const torch::Tensor v = m->scalar(d.both.input);
  const auto opt = torch::TensorOptions().dtype(dtype);
  PpoInputs in;
  in.old_logp = (lp + 0.3 * torch::randn(lp.sizes(), opt)).contiguous();
  in.advantages = torch::randn(lp.sizes(), opt);
  in.old_values = (v + 0.3 * torch::randn(v.sizes(), opt)).contiguous();
  in.returns = torch::randn(v.sizes(), opt);
  return in;
}

/// verl compute_policy_loss_vanilla's per-token loss (clip_ratio 0.2 both ways, clip_ratio_c 3).
torch::Tensor verl_pg_losses(const torch::Tensor& log_prob, const torch::Tensor& old_log_prob,
                             const torch::Tensor& advantages) {
  const double cliprange_low = 0.2, cliprange_high = 0.2, clip_ratio_c = 3.0;
  const torch::Tensor negative_approx_kl = torch::clamp(log_prob - old_log_prob, -20.0, 20.0);
  const torch::Tensor ratio = torch::exp(negative_approx_kl);
  const torch::Tensor pg_losses1 = -advantages * ratio;
  const torch::Tensor pg_losses2 = -advantages * torch::clamp(ratio, 1 - cliprange_low, 1 + cliprange_high);
  const torch::Tensor clip_pg_losses1 = torch::maximum(pg_losses1, pg_losses2);
  const torch::Tensor pg_losses3 = -advantages * clip_ratio_c;
  const torch::Tensor clip_pg_losses2 = torch::min(pg_losses3, clip_pg_losses1);
  return torch::where(advantages < 0, clip_pg_losses2, clip_pg_losses1);
}

/// verl agg_loss "token-mean" (dp_size 1): masked_sum(loss_mat, mask) / mask.sum().
torch::Tensor verl_token_mean(const torch::Tensor& loss_mat, const torch::Tensor& mask) {
  return (loss_mat * mask).sum() / mask.sum();
}
/// verl agg_loss "seq-mean-token-mean" (dp_size 1); `guard` is verl's 1e-8 in the row divisor.
torch::Tensor verl_seq_mean_token_mean(const torch::Tensor& loss_mat, const torch::Tensor& mask, double guard) {
  torch::Tensor seq_mask = mask.sum(-1);
  const torch::Tensor seq_losses = (loss_mat * mask).sum(-1) / (seq_mask + guard);
  seq_mask = (seq_mask > 0).to(loss_mat.scalar_type());
  return (seq_losses * seq_mask).sum() / seq_mask.sum();
}

torch::Tensor last_token(const torch::Tensor& scalar) { return scalar.select(1, scalar.size(1) - 1).contiguous(); }

const std::vector<torch::Dtype> dtypes{torch::kFloat32, torch::kFloat64};

}  // namespace

TEST_CASE("DPO through the adapter takes TRL's step: the same gradients and parameters", "[torch][trainer]") {
  torch::set_num_threads(1);
  for (const auto dtype : dtypes) {
    const Data d(dtype);
    const torch::Tensor ref = reference_logps(d, dtype);
    const auto refs = ref.chunk(2);
    const double beta = 0.1;
    require_agreement(
        dtype,
        [&](CausalLm& m) {
          const auto lp = pt::token_logprobs(m->logits(d.both.input), d.both.labels, d.both.mask).logp;
          const auto seq = pt::masked_sum(lp, d.both.mask).values().chunk(2);
          pl::DpoOptions o;
          o.beta = beta;
          return pt::dpo(seq[0], seq[1], refs[0].contiguous(), refs[1].contiguous(), o).loss;
        },
        [&](CausalLm& m) {  // TRL DPOTrainer._compute_loss, loss_type "sigmoid"
          torch::Tensor per_token_logps = torch_token_logp(m->logits(d.both.input), d.both.labels);
          per_token_logps = per_token_logps.masked_fill(d.both.mask == 0, 0.0);
          const auto logps = per_token_logps.sum(1).chunk(2);
          const torch::Tensor delta_score = (logps[0] - refs[0]) - (logps[1] - refs[1]);
          return (-torch::log_sigmoid(beta * delta_score)).mean();
        },
        "DPO (TRL sigmoid, sequence sums)");
  }
}

TEST_CASE("PPO-clip through the adapter takes verl's step: token-mean and seq-mean-token-mean", "[torch][trainer]") {
  torch::set_num_threads(1);
  for (const auto dtype : dtypes) {
    const Data d(dtype);
    const PpoInputs in = ppo_inputs(d, dtype);
    for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
      const bool token_mean = agg == pl::Aggregation::token_mean;
      // verl's seq-mean-token-mean divides a row by (W_i + 1e-8). In float32 the guard vanishes
      // (W_i >= 4 and 1e-8 is below half an ulp); in float64 it moves the loss by a relative
      // 1e-8 / W_i, above the 1e-12 bound: it is a guard for empty rows (prefloss gives an empty
      // row 0 instead), so the float64 anchor is verl's formula without it, and a separate check
      // below shows that the guard is the whole difference.
      const double guard = dtype == torch::kFloat32 ? 1e-8 : 0.0;
      double clipped = 0;
      const auto ours = [&](CausalLm& m) {
        const auto lp = pt::token_logprobs(m->logits(d.both.input), d.both.labels, d.both.mask).logp;
        pl::PpoOptions o;   // clip 0.2 / 0.2, log-ratio clamp 20: verl's defaults
        o.dual_clip = 3.0;  // verl's clip_ratio_c
        o.aggregation = agg;
        const pt::PpoResult r = pt::ppo_clip(lp, in.old_logp, in.advantages, d.both.mask, o);
        clipped = r.metrics.clip_fraction;
        return r.loss;
      };
      const auto reference = [&](double g) {
        return [&, g](CausalLm& m) {
          const torch::Tensor log_prob = torch_token_logp(m->logits(d.both.input), d.both.labels);
          const torch::Tensor pg_losses = verl_pg_losses(log_prob, in.old_logp, in.advantages);
          return token_mean ? verl_token_mean(pg_losses, d.both.mask)
                            : verl_seq_mean_token_mean(pg_losses, d.both.mask, g);
        };
      };
      require_agreement(dtype, ours, reference(guard),
                        token_mean ? "PPO-clip (verl, token-mean)" : "PPO-clip (verl, seq-mean-token-mean)");
      CHECK(clipped > 0.1);  // the batch reaches the clipped branches, not only the linear one
      CHECK(clipped < 0.9);
      if (!token_mean && dtype == torch::kFloat64) {
        const Agreement with_guard =
            compare(dtype, ours, reference(1e-8), "  ... against verl's formula with the guard");
        const double min_w = d.both.mask.sum(-1).min().item<double>();
        CHECK(with_guard.grad <= 2e-8 / min_w);  // the guard's own size, 1e-8 / W_i, and no more
        CHECK(with_guard.grad > 1e-12);          // (and it does show)
      }
    }
  }
}

TEST_CASE("The value loss through the adapter takes verl's critic step", "[torch][trainer]") {
  torch::set_num_threads(1);
  for (const auto dtype : dtypes) {
    const Data d(dtype);
    const PpoInputs in = ppo_inputs(d, dtype);
    const double cliprange_value = 0.2;
    double clipped = 0;
    require_agreement(
        dtype,
        [&](CausalLm& m) {
          pl::ValueOptions o;
          o.clip = cliprange_value;
          const pt::ValueLossResult r =
              pt::value_loss(m->scalar(d.both.input), in.old_values, in.returns, d.both.mask, o);
          clipped = r.metrics.clip_fraction;
          return r.loss;
        },
        [&](CausalLm& m) {  // verl compute_value_loss, loss_agg_mode "token-mean"
          const torch::Tensor vpreds = m->scalar(d.both.input);
          const torch::Tensor vpredclipped =
              torch::max(torch::min(vpreds, in.old_values + cliprange_value), in.old_values - cliprange_value);
          const torch::Tensor vf_losses1 = (vpreds - in.returns).pow(2);
          const torch::Tensor vf_losses2 = (vpredclipped - in.returns).pow(2);
          return 0.5 * verl_token_mean(torch::max(vf_losses1, vf_losses2), d.both.mask);
        },
        "value loss (verl, token-mean)");
    CHECK(clipped > 0.1);
    CHECK(clipped < 0.9);
  }
}

TEST_CASE("SFT and reward-model losses through the adapter take TRL's step", "[torch][trainer]") {
  torch::set_num_threads(1);
  for (const auto dtype : dtypes) {
    const Data d(dtype);
    require_agreement(
        dtype,
        [&](CausalLm& m) {
          const auto lp = pt::token_logprobs(m->logits(d.both.input), d.both.labels, d.both.mask).logp;
          pl::NllOptions o;
          o.normalizer = d.both.mask.sum().item<double>();
          return pt::nll(pt::masked_sum(lp, d.both.mask), o).loss;
        },
        [&](CausalLm& m) {  // token-mean cross-entropy over the valid labels
          const torch::Tensor lp = torch_token_logp(m->logits(d.both.input), d.both.labels);
          return -(lp * d.both.mask).sum() / d.both.mask.sum();
        },
        "SFT NLL (token-mean)");
    require_agreement(
        dtype,
        [&](CausalLm& m) {
          const auto r = last_token(m->scalar(d.both.ids)).chunk(2);
          return pt::bradley_terry(r[0], r[1]).loss;
        },
        [&](CausalLm& m) {  // TRL RewardTrainer: -logsigmoid(rewards_chosen - rewards_rejected).mean()
          const auto r = last_token(m->scalar(d.both.ids)).chunk(2);
          return (-torch::log_sigmoid(r[0] - r[1])).mean();
        },
        "reward model (Bradley-Terry)",
        // The loss sees only r_c - r_r; these two shift every reward by one constant.
        {"ln_f.bias", "scalar_head.bias"});
  }
}
