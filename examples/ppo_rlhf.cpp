// ppo_rlhf: the classic RLHF pipeline on the task. A Bradley-Terry reward model is trained on the
// 1000 preference pairs (as in reward_model), then the policy is optimized online by PPO-clip on
// fresh samples, with InstructGPT's reward shaping: per token -kl_coef * (log pi - log pi_ref),
// plus the reward model's score on the last token; advantages by GAE over a tabular critic.
//
// With the k1 penalty the expected return is exactly E_pi[r_rm] - kl_coef KL(pi || pi_ref), whose
// maximizer is pi*_rm ~ pi_ref exp(r_rm / kl_coef): PPO should converge to it, and KL(pi || pi*_rm)
// is exact. How far pi*_rm is from the true optimum pi* (same beta) is what the reward model's
// errors cost: the true reward says so, exactly.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/optim.hpp"
#include "common/policy.hpp"
#include "common/report.hpp"
#include "common/reward_model.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

struct PpoConfig {
  Index rollout = 128;  ///< prompts (one sampled response each) per iteration
  Index minibatch = 32;
  int epochs = 4;           ///< passes over each rollout
  double kl_coef = 0.1;     ///< per-token KL penalty in the reward (= DPO's beta in dpo_curves)
  double lr = 0.02;         ///< policy Adam
  double critic_lr = 0.05;  ///< critic Adam
  pl::GaeOptions gae;       ///< gamma, lambda, advantage whitening
  pl::PpoOptions ppo;       ///< clip ranges (0.2), token_mean aggregation
  pl::ValueOptions value;   ///< value clipping
};

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "ppo_rlhf", "reward model + PPO-clip with a per-token KL penalty and GAE",
                               100, 25, "PPO iterations");
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;
  std::printf("%s.\n\n", describe(e).c_str());

  // ---- 1. the reward model, as in reward_model ----------------------------------------------
  RewardModelConfig rm_cfg;  // reward_model's defaults (its --quick run is shorter still)
  rm_cfg.seed = args.seed;
  if (args.quick) rm_cfg.steps = 150;
  const RewardModel rm = train_reward_model(t, e.train, rm_cfg);
  const RewardEval rm_eval = evaluate(rm, e.heldout_truth);
  const std::vector<double> rm_table = rm.table();

  PpoConfig cfg;
  cfg.gae.gamma = 1.0;
  cfg.gae.lam = 0.95;
  cfg.gae.whiten_advantages = true;
  cfg.value.clip = 0.2;
  const Dist ref = reference_dist(t);
  const Dist opt_rm = optimum(t, cfg.kl_coef, rm_table), opt_true = optimum(t, cfg.kl_coef);
  const double sft_reward = true_reward(t, ref);
  const double opt_rm_true = true_reward(t, opt_rm), opt_rm_kl = kl(t, opt_rm, ref);
  const double opt_rm_objective = expected(t, opt_rm, rm_table) - cfg.kl_coef * opt_rm_kl;
  std::printf("reward model: %ld steps on %ld pairs, held-out accuracy vs the true reward %.3f\n", rm_cfg.steps,
              static_cast<long>(e.train.size()), rm_eval.accuracy);
  std::printf(
      "kl_coef = %g. The reward model's optimum pi*_rm: true reward %.3f at KL %.3f;\n"
      "the true optimum pi*: %.3f at KL %.3f; the SFT model: %.3f.\n\n",
      cfg.kl_coef, opt_rm_true, opt_rm_kl, true_reward(t, opt_true), kl(t, opt_true, ref), sft_reward);

  // ---- 2. PPO -------------------------------------------------------------------------------
  TabularPolicy policy(t.shape, t.ref_logits);
  const TabularPolicy reference(t.shape, t.ref_logits);
  TabularCritic critic(t.shape);  // V[x, position]
  Adam adam(cfg.lr), critic_adam(cfg.critic_lr);
  Rng rng(0x99000000ULL + args.seed);
  std::vector<float> grad(t.shape.size()), critic_grad(critic.v.size());

  Table log({"iteration", "true_reward", "rm_reward", "kl_ref", "kl_opt_rm", "kl_opt_true", "objective", "score_sample",
             "clip_fraction", "approx_kl", "value_loss", "sft_true_reward", "opt_rm_true_reward", "opt_true_reward",
             "opt_rm_kl_ref", "opt_rm_objective"});
  const auto record = [&](long it, double score, double clip, double akl, double vloss) {
    const Dist d = policy.dist();
    const double k = kl(t, d, ref);
    log.add({double(it), true_reward(t, d), expected(t, d, rm_table), k, kl(t, d, opt_rm), kl(t, d, opt_true),
             expected(t, d, rm_table) - cfg.kl_coef * k, score, clip, akl, vloss, sft_reward, opt_rm_true,
             true_reward(t, opt_true), opt_rm_kl, opt_rm_objective});
  };
  record(0, NAN, NAN, NAN, NAN);

  for (long it = 1; it <= args.steps; ++it) {
    // Rollout: fresh prompts, one response each from the current policy.
    std::vector<int> prompts(static_cast<std::size_t>(cfg.rollout));
    for (auto& x : prompts) x = rng.below(t.shape.X);
    const Sequences s = sample(t, policy.dist(), prompts, rng);
    const Index B = s.size(), L = t.shape.L;
    Tokens old_logp, ref_logp, rm_tok, kl_tok(B, L), rewards(B, L), adv(B, L), ret(B, L);
    policy.token_logp(s, old_logp);
    reference.token_logp(s, ref_logp);
    pl::kl_estimate(old_logp, ref_logp, s.mask, pl::KlEstimator::k1, kl_tok);  // log pi - log pi_ref per token
    rm.token_rewards(s, rm_tok);
    const Seq score = pl::masked_sum(rm_tok, s.mask).eval();
    // InstructGPT's shaping: -kl_coef * KL at every token, the reward model's score on the last.
    for (Index b = 0; b < B; ++b)
      for (Index l = 0; l < L; ++l)
        rewards(b, l) = s.mask(b, l) ? static_cast<float>(-cfg.kl_coef * kl_tok(b, l)) +
                                           (l == t.length(s.prompt[static_cast<std::size_t>(b)]) - 1 ? score(b) : 0.0f)
                                     : 0.0f;
    const Tokens values = critic.values(s);
    pl::gae(rewards, values, s.mask, cfg.gae, adv, ret);

    // PPO epochs over shuffled minibatches: policy by ppo_clip, critic by value_loss.
    double clip = 0, akl = 0, vloss = 0;
    int updates = 0;
    std::vector<int> order(static_cast<std::size_t>(B));
    std::iota(order.begin(), order.end(), 0);
    for (int epoch = 0; epoch < cfg.epochs; ++epoch) {
      for (std::size_t i = order.size(); i > 1; --i)
        std::swap(order[i - 1], order[static_cast<std::size_t>(rng.below(static_cast<int>(i)))]);
      for (Index start = 0; start < B; start += cfg.minibatch) {
        const std::vector<int> idx(order.begin() + start, order.begin() + std::min(B, start + cfg.minibatch));
        const Sequences ms = select(t, s, idx);
        const Tokens m_old = select_rows(old_logp, idx), m_adv = select_rows(adv, idx), m_ret = select_rows(ret, idx),
                     m_val = select_rows(values, idx);
        Tokens lp, g;
        policy.token_logp(ms, lp);
        g = Tokens(lp.dimensions());
        const auto r = pl::ppo_clip(lp, m_old, m_adv, ms.mask, cfg.ppo, g);  // loss and d loss / d logp, fused
        std::fill(grad.begin(), grad.end(), 0.0f);
        policy.backward(ms, g, grad);
        adam.step(policy.logits, grad);

        const Tokens v = critic.values(ms);
        Tokens gv(v.dimensions());
        const auto vr = pl::value_loss(v, m_val, m_ret, ms.mask, cfg.value, gv);
        std::fill(critic_grad.begin(), critic_grad.end(), 0.0f);
        critic.backward(ms, gv, critic_grad);  // d loss / d V into each row of the table
        critic_adam.step(critic.v, critic_grad);

        clip += r.metrics.clip_fraction;
        akl += r.metrics.approx_kl;
        vloss += vr.loss;
        ++updates;
      }
    }
    Eigen::Tensor<float, 0> mean_score = score.mean();
    record(it, mean_score(), clip / updates, akl / updates, vloss / updates);
  }
  const double secs = clock.seconds();
  const std::string csv = args.path(".csv");
  log.write_csv(csv);

  // ---- terminal -----------------------------------------------------------------------------
  const auto& x = log["iteration"];
  AsciiPlot rw("reward, exact: true reward and the reward model's, under the policy", "PPO iteration");
  rw.hline("SFT model", sft_reward, '-').hline("pi*_rm, true reward", opt_rm_true, '=');
  rw.add("true reward E_pi[r]", x, log["true_reward"], 'o').add("reward model E_pi[r_rm]", x, log["rm_reward"], 'x');
  rw.print();
  AsciiPlot kr("KL(pi || pi_ref), exact", "PPO iteration");
  kr.hline("KL of pi*_rm", opt_rm_kl, '=').add("PPO", x, log["kl_ref"], 'o');
  kr.print();
  AsciiPlot ko("KL(pi || pi*_rm) to the reward model's closed-form optimum, exact (log scale)", "PPO iteration");
  ko.logy = true;
  ko.add("PPO", x, log["kl_opt_rm"], 'o');
  ko.print();
  AsciiPlot cf("clip fraction (share of tokens whose ratio was clipped), mean over the iteration's updates",
               "PPO iteration");
  cf.add("clip fraction", x, log["clip_fraction"], 'o').add("approx KL old->new", x, log["approx_kl"], 'x');
  cf.print();

  const std::size_t n = log.rows() - 1;
  std::printf("%-22s %12s %12s %12s %12s\n", "", "true reward", "RM reward", "KL(pi||ref)", "KL(pi||pi*rm)");
  const auto row = [&](const char* name, std::size_t i) {
    std::printf("%-22s %12.3f %12.3f %12.3f %12.3f\n", name, log["true_reward"][i], log["rm_reward"][i],
                log["kl_ref"][i], log["kl_opt_rm"][i]);
  };
  row("SFT (iteration 0)", 0);
  row(fmt("PPO (iteration %zu)", n).c_str(), n);
  std::printf("%-22s %12.3f %12.3f %12.3f %12.3f\n", "pi*_rm (closed form)", opt_rm_true, expected(t, opt_rm, rm_table),
              opt_rm_kl, 0.0);
  std::printf("%-22s %12.3f %12.3f %12.3f %12s\n", "pi* (true optimum)", true_reward(t, opt_true),
              expected(t, opt_true, rm_table), kl(t, opt_true, ref), "");
  std::printf("(reward model + %ld PPO iterations of %ld samples, %d epochs, %.2f s)\n\n", args.steps,
              static_cast<long>(cfg.rollout), cfg.epochs, secs);

  // ---- PNG ----------------------------------------------------------------------------------
  GpFigure fig(fmt("ppo_rlhf: reward model + PPO-clip (kl_coef = %g, GAE lambda = %g) on the exactly solvable task",
                   cfg.kl_coef, cfg.gae.lam),
               2, 3, 1380, 800);
  const auto label = [](const std::string& text, double y, double up) {
    return fmt("set label %s at graph 0.03, first %.6g offset 0,%g font ',9'\n", gp_quote(text).c_str(), y, up);
  };
  GpPanel p1("true reward E_pi[r] (exact)", "iteration", "expected reward");
  p1.curve(csv, "iteration", "true_reward", "", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(csv, "iteration", "opt_rm_true_reward", "", "with lines lw 2 dt 2 lc rgb 'black'")
      .curve(csv, "iteration", "opt_true_reward", "", "with lines lw 1 dt 3 lc rgb 'black'")
      .curve(csv, "iteration", "sft_true_reward", "", "with lines lw 2 dt 3 lc rgb '#555555'");
  p1.extra = label("pi*_rm", opt_rm_true, -0.8) + label("true optimum pi*", true_reward(t, opt_true), 0.7) +
             label("SFT model", sft_reward, 0.7);
  GpPanel p2("reward model's reward", "iteration", "reward");
  p2.curve(csv, "iteration", "score_sample", "rollout mean (sampled)", "with lines lw 1 lc rgb '#aaaaaa'")
      .curve(csv, "iteration", "rm_reward", "E_pi[r_rm] (exact)", "with lines lw 2 lc rgb '#d62728'");
  p2.key = "bottom right";
  GpPanel p3("KL(pi || pi_ref) (exact)", "iteration", "nats");
  p3.curve(csv, "iteration", "kl_ref", "", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(csv, "iteration", "opt_rm_kl_ref", "", "with lines lw 2 dt 2 lc rgb 'black'");
  p3.extra = label("KL of pi*_rm", opt_rm_kl, -0.8);
  GpPanel p4("KL(pi || pi*_rm) to the closed-form optimum", "iteration", "nats (log scale)");
  p4.curve(csv, "iteration", "kl_opt_rm", "", "with lines lw 2 lc rgb '#1f77b4'");
  p4.logy = true;
  const auto& kor = log["kl_opt_rm"];
  p4.extra = fmt(
      "set ytics (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)\nset yrange [%.6g:%.6g]",
      0.8 * *std::min_element(kor.begin(), kor.end()), 1.25 * *std::max_element(kor.begin(), kor.end()));
  GpPanel p5("PPO clip fraction and approx KL per update", "iteration", "");
  p5.curve(csv, "iteration", "clip_fraction", "clip fraction", "with lines lw 2 lc rgb '#2ca02c'")
      .curve(csv, "iteration", "approx_kl", "approx KL (old || new)", "with lines lw 2 lc rgb '#9467bd'");
  GpPanel p6("objective E[r_rm] - kl_coef KL (exact)", "iteration", "objective");
  p6.curve(csv, "iteration", "objective", "", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(csv, "iteration", "opt_rm_objective", "", "with lines lw 2 dt 2 lc rgb 'black'");
  p6.extra = label("optimum (pi*_rm)", opt_rm_objective, -0.8);
  fig.panels = {p1, p2, p3, p4, p5, p6};
  std::printf("wrote %s\n", csv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning ----------------------------------------------------------------
  Checks check;
  const auto& tr = log["true_reward"];
  const auto& rr = log["rm_reward"];
  const auto& ko_ = log["kl_opt_rm"];
  const auto& ob = log["objective"];
  const auto& cl = log["clip_fraction"];
  check.expect(tr[n] > tr[0], fmt("true reward rises above the SFT model (%.3f -> %.3f)", tr[0], tr[n]));
  check.expect(rr[n] > rr[0], fmt("the reward model's reward rises (%.3f -> %.3f)", rr[0], rr[n]));
  check.expect(ob[n] > ob[0], fmt("the KL-penalized objective rises toward its optimum (%.3f -> %.3f, optimum %.3f)",
                                  ob[0], ob[n], opt_rm_objective));
  check.expect(ko_[n] < ko_[0], fmt("KL to the closed-form optimum pi*_rm shrinks (%.3f -> %.3f)", ko_[0], ko_[n]));
  check.expect(*std::max_element(cl.begin() + 1, cl.end()) > 0, "PPO's clipping is active (clip fraction > 0)");
  return check.finish("ppo_rlhf");
}
