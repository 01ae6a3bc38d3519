// transformer_rlhf: the classic RLHF stages on a small causal transformer (libtorch), every loss
// through prefloss's libtorch adapter (prefloss/torch.hpp):
//   (a) SFT on the data language: pt::nll of pt::masked_sum log-probs over the valid-token count
//       (TRL's token-mean cross-entropy),
//   (b) a Bradley-Terry reward model on preference pairs labelled by the true reward,
//   (c) DPO from the SFT model on the same pairs (sequence log-prob sums, TRL's sigmoid loss),
//   (d) PPO-clip from the SFT model against the learned reward model, with a per-token KL penalty
//       to the SFT model in the reward (verl compute_rewards / OpenRLHF), GAE over a critic
//       (value head started from the reward model) and the clipped value loss.
// The language (examples/common/torch_lm.hpp) has an exact, hidden true reward: the policies are
// scored by it on fresh samples from fixed prompts, with the same sampling seed for every policy.
#include <torch/torch.h>
#include <prefloss/prefloss.hpp>
#include <prefloss/torch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include "../common/report.hpp"
#include "../common/rng.hpp"
#include "../common/torch_lm.hpp"

using namespace examples;
namespace pl = prefloss;
namespace pt = prefloss::torch;

namespace {

struct Config {
  long sft_steps = 200, rm_steps = 150, dpo_steps = 100, ppo_iterations = 30;
  std::int64_t sft_batch = 64;   ///< sequences per SFT step
  std::int64_t pair_batch = 48;  ///< pairs per reward-model or DPO step
  std::int64_t train_pairs = 2048, heldout_pairs = 512;
  std::int64_t eval_prompts = 384;  ///< fixed prompts the policies are scored on
  double sft_lr = 3e-3, rm_lr = 2e-3, dpo_lr = 3e-4, ppo_lr = 5e-4, critic_lr = 1e-3;
  double dpo_beta = 0.1;
  double kl_coef = 0.1;       ///< PPO's per-token KL penalty (reward minus kl_coef * KL): DPO's beta
  std::int64_t rollout = 64;  ///< prompts (one sampled response each) per PPO iteration
  std::int64_t minibatch = 32;
  int ppo_epochs = 2;
  long rm_eval_every = 25;  ///< reward-model steps between held-out evaluations
  long eval_every = 10;     ///< DPO steps between policy evaluations (PPO: every eval_every / 2 iterations)
  double kl_bound = 0;      ///< nats per response: the KL check's bound (set in main)
};

/// What a policy's samples on the fixed evaluation prompts score.
struct Eval {
  double true_reward = 0, true_reward_se = 0;  ///< exact true reward: mean over samples and its standard error
  double rm_score = 0;                         ///< the learned reward model's mean score
  double kl = 0;  ///< KL(pi || pi_SFT) per response: exact per-position KLs summed along the samples
};

torch::Tensor last_token(const torch::Tensor& scalar) { return scalar.select(1, scalar.size(1) - 1).contiguous(); }

Eval evaluate(CausalLm& policy, CausalLm& sft, CausalLm& rm, const Language& lang,
              const std::vector<Language::Sequence>& prompts, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  Rng rng(seed);  // the same draws for every policy: differences are less noisy
  const auto seqs = lang.generate(policy, prompts, rng);
  Eval e;
  double s2 = 0;
  for (const auto& s : seqs) {
    const double r = lang.reward(s);
    e.true_reward += r;
    s2 += r * r;
  }
  const double n = static_cast<double>(seqs.size());
  e.true_reward /= n;
  e.true_reward_se = std::sqrt(std::max(0.0, s2 / n - e.true_reward * e.true_reward) / (n - 1));
  const LmBatch b = lang.batch(seqs, torch::kFloat32);
  const torch::Tensor lp = torch::log_softmax(policy->logits(b.input), -1);
  const torch::Tensor lq = torch::log_softmax(sft->logits(b.input), -1);
  e.kl = ((lp.exp() * (lp - lq)).sum(-1) * b.mask).sum(1).mean().item<double>();
  e.rm_score = last_token(rm->scalar(b.ids)).mean().item<double>();
  return e;
}

std::vector<Language::Sequence> take(const std::vector<Language::Sequence>& v, const std::vector<std::int64_t>& idx) {
  std::vector<Language::Sequence> out;
  for (auto i : idx) out.push_back(v[static_cast<std::size_t>(i)]);
  return out;
}

// ---- (a) SFT ----------------------------------------------------------------------------------
// L = -(1/N) sum_i sum_t m_it log pi(y_it | y_i,<t), N = sum_it m_it: the token-mean cross-entropy
// (TRL SFTTrainer). token_logprobs gives log pi(y_t | .) per token; masked_sum the per-sequence
// sums; nll divides their negated sum by NllOptions::normalizer = N.
double sft_step(CausalLm& model, torch::optim::Adam& opt, const LmBatch& b) {
  const pt::LogprobOutputs lp = pt::token_logprobs(model->logits(b.input), b.labels, b.mask);
  pl::NllOptions o;
  o.normalizer = b.mask.sum().item<double>();
  const pt::NllResult r = pt::nll(pt::masked_sum(lp.logp, b.mask), o);
  opt.zero_grad();
  r.loss.backward();
  opt.step();
  return r.loss.item<double>();
}

// ---- (b) reward model -----------------------------------------------------------------------
// L = -(1/B) sum_i log sigmoid(r(x_i, y_c) - r(x_i, y_r)), r the scalar head at the last token
// (Bradley-Terry; TRL RewardTrainer, InstructGPT eq. 1).
pt::PreferenceResult rm_loss(CausalLm& rm, const LmBatch& chosen, const LmBatch& rejected) {
  return pt::bradley_terry(last_token(rm->scalar(chosen.ids)), last_token(rm->scalar(rejected.ids)));
}

// ---- (c) DPO --------------------------------------------------------------------------------
// L = -(1/B) sum_i log sigmoid(beta [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))])
// with sequence log-probs log pi(y) = sum_t m_t log pi(y_t | .) (Rafailov et al. eq. 7; TRL
// DPOTrainer._compute_loss, loss_type "sigmoid").
pt::PreferenceResult dpo_loss(CausalLm& policy, CausalLm& ref, const LmBatch& c, const LmBatch& r, double beta) {
  torch::Tensor ref_c, ref_r;
  {
    torch::NoGradGuard no_grad;
    ref_c = pt::masked_sum(pt::token_logprobs(ref->logits(c.input), c.labels, c.mask).logp, c.mask);
    ref_r = pt::masked_sum(pt::token_logprobs(ref->logits(r.input), r.labels, r.mask).logp, r.mask);
  }
  const auto logp_c = pt::token_logprobs(policy->logits(c.input), c.labels, c.mask).logp;
  const auto logp_r = pt::token_logprobs(policy->logits(r.input), r.labels, r.mask).logp;
  pl::DpoOptions o;
  o.beta = beta;
  return pt::dpo(pt::masked_sum(logp_c, c.mask), pt::masked_sum(logp_r, r.mask), ref_c, ref_r, o);
}

// ---- (d) PPO ----------------------------------------------------------------------------------
struct Rollout {
  LmBatch b;
  torch::Tensor old_logp, ref_logp, values, advantages, returns, score;
};

// The experience of one PPO iteration (verl ray_trainer: compute_rewards + compute_gae_advantage_return):
//   kl_t      = log pi_old(y_t) - log pi_SFT(y_t)                       (k1, verl kl_penalty "kl")
//   reward_t  = -kl_coef kl_t + [t = last] r_RM(x, y)                   (verl compute_rewards)
//   A, R      = GAE(reward, V_old; gamma, lambda), A whitened           (verl compute_gae_advantage_return)
Rollout rollout(CausalLm& policy, CausalLm& sft, CausalLm& rm, CausalLm& critic, const Language& lang,
                const std::vector<Language::Sequence>& prompts, Rng& rng, const Config& cfg,
                const pl::GaeOptions& gae_opt) {
  torch::NoGradGuard no_grad;
  Rollout ro;
  ro.b = lang.batch(lang.generate(policy, prompts, rng), torch::kFloat32);
  const LmBatch& b = ro.b;
  ro.old_logp = pt::token_logprobs(policy->logits(b.input), b.labels, b.mask).logp;
  ro.ref_logp = pt::token_logprobs(sft->logits(b.input), b.labels, b.mask).logp;
  ro.values = critic->scalar(b.input) * b.mask;  // V(s_t) before token t (0 off the response)
  ro.score = last_token(rm->scalar(b.ids));
  torch::Tensor kl = torch::empty_like(ro.old_logp);
  pl::kl_estimate(pt::view<float, 2>(ro.old_logp), pt::view<float, 2>(ro.ref_logp), pt::view<float, 2>(b.mask),
                  pl::KlEstimator::k1, pt::mutable_view<float, 2>(kl));
  torch::Tensor rewards = -cfg.kl_coef * kl;
  rewards.select(1, rewards.size(1) - 1).add_(ro.score);
  ro.advantages = torch::empty_like(rewards);
  ro.returns = torch::empty_like(rewards);
  pl::gae(pt::view<float, 2>(rewards), pt::view<float, 2>(ro.values), pt::view<float, 2>(b.mask), gae_opt,
          pt::mutable_view<float, 2>(ro.advantages), pt::mutable_view<float, 2>(ro.returns));
  return ro;
}

struct PpoStats {
  double pg_loss = 0, vf_loss = 0, clip_fraction = 0, approx_kl = 0;
};

// One PPO minibatch update:
//   policy: L = token-mean of max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)), r_t = pi(y_t) / pi_old(y_t)
//           (Schulman et al. eq. 7; verl compute_policy_loss_vanilla + agg_loss "token-mean")
//   critic: L = 1/2 token-mean of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
//           (verl compute_value_loss)
PpoStats ppo_update(CausalLm& policy, CausalLm& critic, torch::optim::Adam& popt, torch::optim::Adam& copt,
                    const Rollout& ro, const torch::Tensor& idx, const pl::PpoOptions& ppo,
                    const pl::ValueOptions& vopt) {
  const LmBatch b = ro.b.rows(idx);
  const auto lp = pt::token_logprobs(policy->logits(b.input), b.labels, b.mask).logp;
  const pt::PpoResult pg =
      pt::ppo_clip(lp, ro.old_logp.index_select(0, idx), ro.advantages.index_select(0, idx), b.mask, ppo);
  popt.zero_grad();
  pg.loss.backward();
  popt.step();
  const pt::ValueLossResult vf = pt::value_loss(critic->scalar(b.input), ro.values.index_select(0, idx),
                                                ro.returns.index_select(0, idx), b.mask, vopt);
  copt.zero_grad();
  vf.loss.backward();
  copt.step();
  return {pg.loss.item<double>(), vf.loss.item<double>(), pg.metrics.clip_fraction, pg.metrics.approx_kl};
}

std::vector<double> col(const std::vector<Eval>& v, double Eval::*f) {
  std::vector<double> out;
  for (const auto& e : v) out.push_back(e.*f);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  Args args = parse_args(argc, argv, "transformer_rlhf",
                         "SFT, reward model, DPO and PPO on a small causal transformer through prefloss::torch",
                         cfg.ppo_iterations, 8, "PPO iterations");
  if (std::none_of(argv + 1, argv + argc, [](const char* a) { return std::string(a) == "--out"; })) {
    args.out = "out";  // this example's default output directory
    std::filesystem::create_directories(args.out);
  }
  const Stopwatch clock;
  torch::set_num_threads(1);  // deterministic, and the machine is shared
  if (args.quick) {           // each stage's curve has flattened by then (see the full run's CSVs)
    cfg.sft_steps = 60, cfg.rm_steps = 80, cfg.dpo_steps = 30, cfg.pair_batch = 32, cfg.train_pairs = 1024;
    cfg.heldout_pairs = 256, cfg.eval_prompts = 200, cfg.rm_eval_every = 20, cfg.eval_every = 10;
  }
  cfg.ppo_iterations = args.steps;
  const Language lang;
  const LmConfig mc = lang.lm_config();
  // The KL bound: the exact entropy of the data's responses, R times the entropy rate (10.4 nats).
  // A policy that collapses onto one typical SFT response y has KL = -log pi_SFT(y), about that
  // entropy; staying below it means the policy still spreads over many responses the SFT model
  // finds likely.
  cfg.kl_bound = lang.response_len() * lang.data_entropy();
  Rng data_rng(0xda7a0000ULL + args.seed);
  std::vector<Language::Sequence> eval_prompts;
  for (std::int64_t k = 0; k < cfg.eval_prompts; ++k) eval_prompts.push_back(lang.sample_prompt(data_rng));
  const std::uint64_t eval_seed = 0xe7a10000ULL + args.seed;
  std::printf(
      "transformer_rlhf: %ld-layer causal transformer, width %ld, %ld heads; alphabet %d, prompts of %d, responses "
      "of %d tokens.\nThe data's exact entropy rate (the best SFT loss): %.4f nats per token.\n\n",
      static_cast<long>(mc.n_layers), static_cast<long>(mc.d_model), static_cast<long>(mc.n_heads), lang.alphabet(),
      lang.prompt_len(), lang.response_len(), lang.data_entropy());

  // ---- (a) SFT --------------------------------------------------------------------------------
  CausalLm sft = make_lm(mc, args.seed);
  torch::optim::Adam sft_opt(sft->parameters(), torch::optim::AdamOptions(cfg.sft_lr));
  Table sft_log({"step", "loss", "entropy_rate"});
  for (long step = 1; step <= cfg.sft_steps; ++step) {
    std::vector<Language::Sequence> seqs;
    for (std::int64_t k = 0; k < cfg.sft_batch; ++k) seqs.push_back(lang.sample_data(data_rng));
    sft_log.add({double(step), sft_step(sft, sft_opt, lang.batch(seqs, torch::kFloat32)), lang.data_entropy()});
  }
  freeze(sft);
  std::printf("(a) SFT: %ld steps of %ld sequences, loss %.4f -> %.4f (last 10 mean)  [%.1f s]\n", cfg.sft_steps,
              static_cast<long>(cfg.sft_batch), sft_log["loss"].front(), smooth(sft_log["loss"], 10).back(),
              clock.seconds());
  std::fflush(stdout);

  // ---- (b) reward model -----------------------------------------------------------------------
  std::vector<Language::Sequence> tr_c, tr_r, ho_c, ho_r;
  for (std::int64_t k = 0; k < cfg.train_pairs; ++k) {
    auto p = lang.sample_pair(data_rng);
    tr_c.push_back(std::move(p.chosen)), tr_r.push_back(std::move(p.rejected));
  }
  for (std::int64_t k = 0; k < cfg.heldout_pairs; ++k) {
    auto p = lang.sample_pair(data_rng, /*truth=*/true);
    ho_c.push_back(std::move(p.chosen)), ho_r.push_back(std::move(p.rejected));
  }
  const LmBatch ho_cb = lang.batch(ho_c, torch::kFloat32), ho_rb = lang.batch(ho_r, torch::kFloat32);
  CausalLm rm = clone_lm(sft);  // the SFT trunk; the scalar head is still at its initial weights
  for (auto& p : rm->parameters()) p.set_requires_grad(true);
  rm->train();
  torch::optim::Adam rm_opt(rm->parameters(), torch::optim::AdamOptions(cfg.rm_lr));
  Table rm_log({"step", "loss", "train_accuracy", "heldout_accuracy"});
  const auto heldout_accuracy = [&] {
    torch::NoGradGuard no_grad;
    return rm_loss(rm, ho_cb, ho_rb).metrics.reward_accuracy;  // against the true reward's order
  };
  const double rm_acc0 = heldout_accuracy();
  Rng order_rng(0x0dde0000ULL + args.seed);
  const auto minibatch = [&](std::int64_t n, std::int64_t size) {
    std::vector<std::int64_t> idx;
    for (std::int64_t k = 0; k < size; ++k) idx.push_back(order_rng.below(static_cast<int>(n)));
    return idx;
  };
  rm_log.add({0, NAN, NAN, rm_acc0});
  for (long step = 1; step <= cfg.rm_steps; ++step) {
    const auto idx = minibatch(cfg.train_pairs, cfg.pair_batch);
    const pt::PreferenceResult r =
        rm_loss(rm, lang.batch(take(tr_c, idx), torch::kFloat32), lang.batch(take(tr_r, idx), torch::kFloat32));
    rm_opt.zero_grad();
    r.loss.backward();
    rm_opt.step();
    const bool eval_now = step % cfg.rm_eval_every == 0 || step == cfg.rm_steps;
    rm_log.add({double(step), r.loss.item<double>(), r.metrics.reward_accuracy, eval_now ? heldout_accuracy() : NAN});
  }
  freeze(rm);
  const double rm_acc = heldout_accuracy();
  std::printf("(b) reward model: %ld steps on %ld pairs, held-out accuracy vs the true reward %.3f -> %.3f  [%.1f s]\n",
              cfg.rm_steps, static_cast<long>(cfg.train_pairs), rm_acc0, rm_acc, clock.seconds());
  std::fflush(stdout);

  const Eval sft_eval = evaluate(sft, sft, rm, lang, eval_prompts, eval_seed);
  std::printf("    SFT policy: true reward %.3f +- %.3f, reward model %.3f\n", sft_eval.true_reward,
              sft_eval.true_reward_se, sft_eval.rm_score);

  // ---- (c) DPO --------------------------------------------------------------------------------
  CausalLm dpo = clone_lm(sft);
  for (auto& p : dpo->parameters()) p.set_requires_grad(true);
  dpo->train();
  torch::optim::Adam dpo_opt(dpo->parameters(), torch::optim::AdamOptions(cfg.dpo_lr));
  Table dpo_log({"step", "loss", "accuracy", "margin"});
  std::vector<Eval> dpo_evals{sft_eval};
  std::vector<double> dpo_eval_steps{0};
  for (long step = 1; step <= cfg.dpo_steps; ++step) {
    const auto idx = minibatch(cfg.train_pairs, cfg.pair_batch);
    const pt::PreferenceResult r = dpo_loss(dpo, sft, lang.batch(take(tr_c, idx), torch::kFloat32),
                                            lang.batch(take(tr_r, idx), torch::kFloat32), cfg.dpo_beta);
    dpo_opt.zero_grad();
    r.loss.backward();
    dpo_opt.step();
    dpo_log.add({double(step), r.loss.item<double>(), r.metrics.reward_accuracy, r.metrics.reward_margin});
    if (step % cfg.eval_every == 0 || step == cfg.dpo_steps) {
      dpo_evals.push_back(evaluate(dpo, sft, rm, lang, eval_prompts, eval_seed));
      dpo_eval_steps.push_back(double(step));
    }
  }
  const Eval dpo_eval = dpo_evals.back();
  std::printf("(c) DPO (beta %g): %ld steps, loss %.4f -> %.4f; true reward %.3f +- %.3f, KL to SFT %.3f  [%.1f s]\n",
              cfg.dpo_beta, cfg.dpo_steps, dpo_log["loss"].front(), smooth(dpo_log["loss"], 10).back(),
              dpo_eval.true_reward, dpo_eval.true_reward_se, dpo_eval.kl, clock.seconds());
  std::fflush(stdout);

  // ---- (d) PPO --------------------------------------------------------------------------------
  CausalLm policy = clone_lm(sft), critic = clone_lm(rm);  // the critic starts from the reward model
  for (auto* m : {&policy, &critic}) {
    for (auto& p : (*m)->parameters()) p.set_requires_grad(true);
    (*m)->train();
  }
  torch::optim::Adam popt(policy->parameters(), torch::optim::AdamOptions(cfg.ppo_lr));
  torch::optim::Adam copt(critic->parameters(), torch::optim::AdamOptions(cfg.critic_lr));
  pl::GaeOptions gae_opt;
  gae_opt.gamma = 1.0;
  gae_opt.lam = 0.95;
  gae_opt.whiten_advantages = true;
  pl::PpoOptions ppo;  // clip 0.2 both ways, token-mean: verl's defaults
  pl::ValueOptions vopt;
  vopt.clip = 0.2;
  Rng ppo_rng(0x99000000ULL + args.seed);
  Table ppo_log(
      {"iteration", "rollout_score", "rollout_true_reward", "pg_loss", "vf_loss", "clip_fraction", "approx_kl"});
  std::vector<Eval> ppo_evals{sft_eval};
  std::vector<double> ppo_eval_steps{0};
  for (long it = 1; it <= cfg.ppo_iterations; ++it) {
    std::vector<Language::Sequence> prompts;
    for (std::int64_t k = 0; k < cfg.rollout; ++k) prompts.push_back(lang.sample_prompt(ppo_rng));
    const Rollout ro = rollout(policy, sft, rm, critic, lang, prompts, ppo_rng, cfg, gae_opt);
    double true_r = 0;
    {
      const auto ids = ro.b.ids.contiguous();
      const auto a = ids.accessor<std::int64_t, 2>();
      for (std::int64_t b = 0; b < ids.size(0); ++b) {
        Language::Sequence s;
        for (std::int64_t k = 0; k < ids.size(1); ++k) s.push_back(static_cast<int>(a[b][k]));
        true_r += lang.reward(s);
      }
      true_r /= static_cast<double>(ids.size(0));
    }
    PpoStats sum;
    int updates = 0;
    for (int epoch = 0; epoch < cfg.ppo_epochs; ++epoch) {
      std::vector<std::int64_t> order(static_cast<std::size_t>(cfg.rollout));
      std::iota(order.begin(), order.end(), 0);
      for (std::size_t i = order.size(); i > 1; --i)
        std::swap(order[i - 1], order[static_cast<std::size_t>(ppo_rng.below(static_cast<int>(i)))]);
      for (std::int64_t s = 0; s < cfg.rollout; s += cfg.minibatch) {
        const std::vector<std::int64_t> mb(order.begin() + s, order.begin() + std::min(cfg.rollout, s + cfg.minibatch));
        const PpoStats st = ppo_update(policy, critic, popt, copt, ro, torch::tensor(mb), ppo, vopt);
        sum.pg_loss += st.pg_loss, sum.vf_loss += st.vf_loss, sum.clip_fraction += st.clip_fraction;
        sum.approx_kl += st.approx_kl, ++updates;
      }
    }
    ppo_log.add({double(it), ro.score.mean().item<double>(), true_r, sum.pg_loss / updates, sum.vf_loss / updates,
                 sum.clip_fraction / updates, sum.approx_kl / updates});
    if (it % (cfg.eval_every / 2) == 0 || it == cfg.ppo_iterations) {
      ppo_evals.push_back(evaluate(policy, sft, rm, lang, eval_prompts, eval_seed));
      ppo_eval_steps.push_back(double(it));
    }
  }
  const Eval ppo_eval = ppo_evals.back();
  const double secs = clock.seconds();
  std::printf(
      "(d) PPO (kl_coef %g, GAE lambda %g): %ld iterations of %ld samples; true reward %.3f +- %.3f, RM score %.3f, "
      "KL to SFT %.3f  [%.1f s]\n\n",
      cfg.kl_coef, gae_opt.lam, cfg.ppo_iterations, static_cast<long>(cfg.rollout), ppo_eval.true_reward,
      ppo_eval.true_reward_se, ppo_eval.rm_score, ppo_eval.kl, secs);

  // ---- CSV ------------------------------------------------------------------------------------
  const std::string sft_csv = args.path("_sft.csv"), rm_csv = args.path("_rm.csv"), dpo_csv = args.path("_dpo.csv"),
                    ppo_csv = args.path("_ppo.csv"), dpo_eval_csv = args.path("_dpo_eval.csv"),
                    ppo_eval_csv = args.path("_ppo_eval.csv");
  sft_log.write_csv(sft_csv);
  rm_log.write_csv(rm_csv);
  dpo_log.write_csv(dpo_csv);
  ppo_log.write_csv(ppo_csv);
  const auto write_evals = [&](const std::vector<double>& steps, const std::vector<Eval>& evals,
                               const std::string& path) {
    Table t({"step", "true_reward", "true_reward_se", "rm_score", "kl_sft", "sft_true_reward", "kl_bound"});
    for (std::size_t k = 0; k < evals.size(); ++k)
      t.add({steps[k], evals[k].true_reward, evals[k].true_reward_se, evals[k].rm_score, evals[k].kl,
             sft_eval.true_reward, cfg.kl_bound});
    t.write_csv(path);
  };
  write_evals(dpo_eval_steps, dpo_evals, dpo_eval_csv);
  write_evals(ppo_eval_steps, ppo_evals, ppo_eval_csv);

  // ---- terminal -------------------------------------------------------------------------------
  AsciiPlot ps("(a) SFT loss: token-mean NLL per batch (moving average of 10)", "SFT step");
  ps.hline("data entropy rate (best possible)", lang.data_entropy(), '=');
  ps.add("SFT loss", sft_log["step"], smooth(sft_log["loss"], 10), 'o');
  ps.print();
  AsciiPlot pr("(b) reward model: Bradley-Terry loss (moving average of 10) and held-out accuracy", "RM step");
  pr.hline("chance", 0.5, '-');
  pr.add("BT loss", rm_log["step"], smooth(rm_log["loss"], 10), 'o');
  pr.add("held-out accuracy", rm_log["step"], rm_log["heldout_accuracy"], 'x', true);
  pr.print();
  AsciiPlot pd("(c, d) true reward of the policy's samples on the evaluation prompts", "DPO step / PPO iteration");
  pd.hline("SFT policy", sft_eval.true_reward, '-');
  pd.add("DPO", dpo_eval_steps, col(dpo_evals, &Eval::true_reward), 'o');
  pd.add("PPO", ppo_eval_steps, col(ppo_evals, &Eval::true_reward), 'x');
  pd.print();
  AsciiPlot pk("(c, d) KL(pi || pi_SFT) per response", "DPO step / PPO iteration");
  pk.hline("stated bound", cfg.kl_bound, '=');
  pk.add("DPO", dpo_eval_steps, col(dpo_evals, &Eval::kl), 'o');
  pk.add("PPO", ppo_eval_steps, col(ppo_evals, &Eval::kl), 'x');
  pk.print();

  std::printf("%-26s %14s %10s %12s\n", "", "true reward", "RM score", "KL to SFT");
  const auto row = [](const char* name, const Eval& e) {
    std::printf("%-26s %8.3f+-%.3f %10.3f %12.3f\n", name, e.true_reward, e.true_reward_se, e.rm_score, e.kl);
  };
  row("SFT", sft_eval);
  row(fmt("DPO (%ld steps)", cfg.dpo_steps).c_str(), dpo_eval);
  row(fmt("PPO (%ld iterations)", cfg.ppo_iterations).c_str(), ppo_eval);
  std::printf("(%.1f s)\n\n", secs);

  // ---- PNG ------------------------------------------------------------------------------------
  GpFigure fig("transformer_rlhf: SFT, reward model, DPO and PPO through prefloss::torch", 2, 3, 1380, 800);
  GpPanel g1("(a) SFT loss (token-mean NLL)", "step", "nats per token");
  g1.curve(sft_csv, "step", "loss", "per batch", "with lines lw 1 lc rgb '#1f77b4'")
      .curve(sft_csv, "step", "entropy_rate", "data entropy rate", "with lines lw 2 dt 2 lc rgb 'black'");
  GpPanel g2("(b) reward model", "step", "");
  g2.curve(rm_csv, "step", "loss", "BT loss", "with lines lw 1 lc rgb '#1f77b4'")
      .curve(rm_csv, "step", "heldout_accuracy", "held-out accuracy", "with points pt 7 lc rgb '#d62728'");
  g2.extra = "set arrow from graph 0, first 0.5 to graph 1, first 0.5 nohead dt 3 lc rgb '#555555'";
  GpPanel g3("(c) DPO loss and implicit-reward accuracy", "step", "");
  g3.curve(dpo_csv, "step", "loss", "DPO loss", "with lines lw 1 lc rgb '#1f77b4'")
      .curve(dpo_csv, "step", "accuracy", "batch accuracy", "with lines lw 1 lc rgb '#2ca02c'");
  GpPanel g4("true reward of the policy (exact reward, sampled)", "DPO step / PPO iteration", "mean true reward");
  g4.curve(dpo_eval_csv, "step", "true_reward", "DPO", "with linespoints pt 7 lc rgb '#1f77b4'")
      .curve(ppo_eval_csv, "step", "true_reward", "PPO", "with linespoints pt 5 lc rgb '#d62728'")
      .curve(ppo_eval_csv, "step", "sft_true_reward", "SFT", "with lines lw 2 dt 2 lc rgb 'black'");
  g4.key = "bottom right";
  GpPanel g5("KL(pi || pi_SFT) per response", "DPO step / PPO iteration", "nats");
  g5.curve(dpo_eval_csv, "step", "kl_sft", "DPO", "with linespoints pt 7 lc rgb '#1f77b4'")
      .curve(ppo_eval_csv, "step", "kl_sft", "PPO", "with linespoints pt 5 lc rgb '#d62728'")
      .curve(ppo_eval_csv, "step", "kl_bound", "stated bound", "with lines lw 2 dt 2 lc rgb 'black'");
  g5.key = "bottom right";
  GpPanel g6("(d) PPO rollouts", "iteration", "");
  g6.curve(ppo_csv, "iteration", "rollout_score", "RM score", "with lines lw 2 lc rgb '#d62728'")
      .curve(ppo_csv, "iteration", "rollout_true_reward", "true reward", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(ppo_csv, "iteration", "clip_fraction", "clip fraction", "with lines lw 1 lc rgb '#2ca02c'");
  g6.key = "top left";
  fig.panels = {g1, g2, g3, g4, g5, g6};
  for (const auto& f : {sft_csv, rm_csv, dpo_csv, ppo_csv, dpo_eval_csv, ppo_eval_csv})
    std::printf("wrote %s\n", f.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning --------------------------------------------------------------
  Checks check;
  const auto& sl = sft_log["loss"];
  const double sft_end = smooth(sl, 10).back();
  check.expect(sft_end < sl.front() - 0.2,
               fmt("SFT loss falls (%.4f -> %.4f, data entropy rate %.4f)", sl.front(), sft_end, lang.data_entropy()));
  check.expect(rm_acc > 0.6,
               fmt("reward-model held-out accuracy rises above chance (%.3f -> %.3f > 0.6)", rm_acc0, rm_acc));
  const auto above = [&](const Eval& e) {
    return 2 * std::hypot(e.true_reward_se, sft_eval.true_reward_se);  // two standard errors of the difference
  };
  check.expect(dpo_eval.true_reward - sft_eval.true_reward > above(dpo_eval),
               fmt("DPO's true reward rises above the SFT policy's by more than 2 s.e. (%.3f -> %.3f, 2 s.e. %.3f)",
                   sft_eval.true_reward, dpo_eval.true_reward, above(dpo_eval)));
  check.expect(ppo_eval.true_reward - sft_eval.true_reward > above(ppo_eval),
               fmt("PPO's true reward rises above the SFT policy's by more than 2 s.e. (%.3f -> %.3f, 2 s.e. %.3f)",
                   sft_eval.true_reward, ppo_eval.true_reward, above(ppo_eval)));
  check.expect(ppo_eval.rm_score > sft_eval.rm_score,
               fmt("PPO raises the reward model's score (%.3f -> %.3f)", sft_eval.rm_score, ppo_eval.rm_score));
  double kl_max = 0;
  for (const auto* v : {&dpo_evals, &ppo_evals})
    for (const auto& e : *v) kl_max = std::max(kl_max, e.kl);
  check.expect(kl_max < cfg.kl_bound,
               fmt("KL(pi || pi_SFT) stays bounded: max over the DPO and PPO evaluations %.3f < %.1f nats", kl_max,
                   cfg.kl_bound));
  return check.finish("transformer_rlhf");
}
