// method_comparison — SFT-only, RLHF (a reward model + PPO-clip with a KL penalty), DPO and
// Llama 2's rejection sampling, from the same SFT model on the same 1000 preference pairs, judged
// by the hidden true reward exactly.
//
// The exercise is "compare SFT-only, RLHF and DPO with a judge". Here the judge is exact: on the
// task (examples/common/task.hpp) every response of a prompt can be enumerated, so the win rate
//   win(A, B) = E_x [ P(r(x, yA) > r(x, yB)) + 1/2 P(r(x, yA) = r(x, yB)) ],  yA ~ A, yB ~ B,
// is a finite sum (examples/common/judge.hpp), not a count of sampled verdicts.
//
// The methods, each in a short function below with the prefloss calls in plain sight:
//   RLHF   a Bradley-Terry reward model r_rm on the pairs (reward_model shows its step), then
//          PPO-clip on fresh samples with InstructGPT's reward R = r_rm(x, y) - kl_coef
//          (log pi(y|x) - log pi_ref(y|x)); its target is pi*_rm ~ pi_ref exp(r_rm / kl_coef).
//   DPO    the DPO loss on the pairs at beta = kl_coef; its target is pi* ~ pi_ref exp(r / beta)
//          for the reward r the labels came from.
//   RS     Llama 2's rejection sampling (Touvron et al. 2023, Sec. 3.2.3): sample K responses per
//          prompt from the current model, keep the one the reward model scores best (best_of_n),
//          fine-tune on the kept ones by the NLL; repeated for a few rounds. No KL term: only
//          the rounds and the fine-tuning steps hold it near the SFT model.
// Next to them, two exact references: the best-of-K policy of the SFT model itself (what one
// round of sampling would keep, before any fine-tuning, in closed form) and pi* itself.
//
// What to look for: the matrix (every trained model beats SFT; which beats which); the reward-KL
// panel, where no model can lie above the exact frontier of pi*_beta (for any beta, E_pi[r] <=
// E_{pi*_beta}[r] - beta KL(pi*_beta || pi_ref) + beta KL(pi || pi_ref)); and how far RS, which
// has no KL anchor, travels from the SFT model.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/judge.hpp"
#include "common/optim.hpp"
#include "common/policy.hpp"
#include "common/report.hpp"
#include "common/reward_model.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

constexpr double kBeta = 0.1;  // DPO's beta and PPO's kl_coef: both aim at the optimum of beta 0.1

struct Settings {
  long dpo_steps = 300;      ///< DPO: steps of 64 pairs
  long ppo_iterations = 60;  ///< PPO: rollouts of 16 prompts x 8 samples, 4 epochs of minibatches of 32
  int rs_rounds = 3;         ///< rejection sampling: rounds of 64 prompts x K samples
  int rs_k = 8;
  long rs_steps = 60;  ///< NLL steps of 64 kept responses after each round
};

// ---- the four training steps ------------------------------------------------------------------

/// DPO (Rafailov et al. 2023, eq. 7) on a batch of pairs, one Adam step.
double dpo_step(const Pairs& p, TabularPolicy& policy, const TabularPolicy& ref, Adam& adam) {
  const auto lp = policy.token_logp(p), rp = ref.token_logp(p);  // log pi(y_l | x, y_<l) at every token
  const Mask &mc = p.chosen.mask, &mr = p.rejected.mask;
  pl::DpoOptions opt;
  opt.beta = kBeta;
  // -log sigmoid(beta [(s_w - s_w,ref) - (s_l - s_l,ref)]), sequence log-probs s as masked sums.
  const auto r = pl::dpo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr), pl::masked_sum(rp.chosen, mc),
                         pl::masked_sum(rp.rejected, mr), opt);
  std::vector<float> grad(policy.logits.size(), 0.0f);
  policy.backward(p, r, grad);  // r.backward: d loss / d log pi per token; then the chain rule to the logits
  adam.step(policy.logits, grad);
  return r.loss;
}

/// One PPO-clip update (Schulman et al. 2017, eq. 7) on a minibatch of a rollout.
double ppo_step(const Sequences& s, const Tokens& old_logp, const Tokens& adv, TabularPolicy& policy, Adam& adam) {
  Tokens lp;
  policy.token_logp(s, lp);
  Tokens g(lp.dimensions());
  pl::PpoOptions opt;  // clip 0.2 both ways, token-mean aggregation
  // -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(log pi - log pi_old); loss and d loss / d log pi fused.
  const auto r = pl::ppo_clip(lp, old_logp, adv, s.mask, opt, g);
  std::vector<float> grad(policy.logits.size(), 0.0f);
  policy.backward(s, g, grad);
  adam.step(policy.logits, grad);
  return r.metrics.clip_fraction;
}

/// The NLL of the kept responses (Llama 2's fine-tuning on the best samples), one Adam step.
double nll_step(const Sequences& s, TabularPolicy& policy, Adam& adam) {
  Tokens lp;
  policy.token_logp(s, lp);
  pl::NllOptions opt;
  const Eigen::Tensor<float, 0, Eigen::RowMajor> tokens = s.mask.cast<float>().sum();
  opt.normalizer = tokens();  // -sum log pi over the batch's tokens / their count: the token-mean cross-entropy
  const auto r = pl::nll(pl::masked_sum(lp, s.mask), opt);
  Tokens g(lp.dimensions());
  r.backward(g);
  std::vector<float> grad(policy.logits.size(), 0.0f);
  policy.backward(s, g, grad);
  adam.step(policy.logits, grad);
  return r.loss;
}

/// The reward model's score of each response: r_rm(x, y) = sum_l w[x, l, y_l], a masked sum.
Seq rm_scores(const RewardModel& rm, const Sequences& s) {
  Tokens tok;
  rm.token_rewards(s, tok);
  return pl::masked_sum(tok, s.mask).eval();
}

// ---- the exact best-of-K policy -----------------------------------------------------------------

/// The responses of prompt x with their true reward and the probability that the best of K
/// samples from `dist` under the reward model is that response: with the responses sorted by
/// r_rm and F the cumulative probability, P(best = y_k) = F_k^K - F_(k-1)^K (the reward model's
/// scores of different responses do not tie on this task; equal scores would share the step).
/// Adds KL(best-of-K || dist) of the prompt to *kl.
std::vector<Outcome> best_of_k_outcomes(const Task& t, int x, const Dist& dist, const std::vector<double>& rm_table,
                                        int k, double* kl) {
  struct Response {
    double rm, truth, p;
  };
  std::vector<Response> rs;
  for_each_response(t, x, dist, [&](const int* tok, double p) {
    rs.push_back({t.table_sum(rm_table, x, tok), t.reward(x, tok), p});
  });
  std::sort(rs.begin(), rs.end(), [](const Response& a, const Response& b) { return a.rm < b.rm; });
  std::vector<Outcome> out;
  double below = 0;
  for (const Response& r : rs) {
    const double q = std::pow(below + r.p, k) - std::pow(below, k);
    out.push_back({r.truth, q});
    if (q > 0) *kl += q * std::log(q / r.p);
    below += r.p;
  }
  return out;
}

struct Model {
  std::string name;
  char glyph;
  const char* color;
  std::vector<std::vector<Outcome>> responses;  ///< per prompt: every response, its true reward and probability
  double true_reward = 0, kl_ref = 0;
};

Model model_of(const Task& t, const std::string& name, char glyph, const char* color, const Dist& d, const Dist& ref) {
  Model m{name, glyph, color, {}, true_reward(t, d), kl(t, d, ref)};
  for (int x = 0; x < t.shape.X; ++x) m.responses.push_back(outcomes(t, x, d, t.score));
  return m;
}

double win(const Task& t, const Model& a, const Model& b) {
  double w = 0;
  for (int x = 0; x < t.shape.X; ++x)
    w += win_probability(a.responses[static_cast<std::size_t>(x)], b.responses[static_cast<std::size_t>(x)]);
  return w / t.shape.X;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "method_comparison",
                               "SFT, RLHF (reward model + PPO), DPO and rejection sampling, judged exactly", 300, 60,
                               "DPO steps (PPO iterations and rejection-sampling steps scale with it)");
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;
  Settings cfg;
  cfg.dpo_steps = args.steps;
  cfg.ppo_iterations = std::max(1L, args.steps / 5);
  cfg.rs_steps = std::max(1L, args.steps / 5);
  std::printf("%s.\n\n", describe(e).c_str());

  const TabularPolicy ref(t.shape, t.ref_logits);
  const Dist ref_dist = ref.dist();
  const Dist opt = optimum(t, kBeta);
  // The curves: each method's win rate against SFT over its own training, at 11 points.
  Table curves({"progress", "rlhf", "dpo", "rs"});
  std::vector<std::vector<double>> progress(3);
  const auto vs_sft = [&](const TabularPolicy& p) { return win_rate(t, p.dist(), ref_dist); };
  const auto at = [](long i, long n) { return n <= 10 || i % (n / 10) == 0 || i == n; };

  // ---- RLHF: 1. the reward model (Bradley-Terry on the pairs, as in reward_model) ---------
  RewardModelConfig rm_cfg;
  rm_cfg.seed = args.seed;
  if (args.quick) rm_cfg.steps = 150;
  const RewardModel rm = train_reward_model(t, e.train, rm_cfg);
  const std::vector<double> rm_table = rm.table();
  const double rm_accuracy = evaluate(rm, e.heldout_truth).accuracy;

  // ---- RLHF: 2. PPO-clip on R = r_rm - kl_coef (log pi - log pi_ref) ------------------------
  TabularPolicy rlhf(t.shape, t.ref_logits);
  {
    Adam adam(0.02);
    Rng rng(0x77000000ULL + args.seed);
    const int group = 8, prompts_per_rollout = 16, epochs = 4;
    const Index minibatch = 32;
    progress[0].push_back(vs_sft(rlhf));
    for (long it = 1; it <= cfg.ppo_iterations; ++it) {
      std::vector<int> prompts;
      for (int k = 0; k < prompts_per_rollout; ++k)
        prompts.insert(prompts.end(), static_cast<std::size_t>(group), rng.below(t.shape.X));
      const Sequences s = sample(t, rlhf.dist(), prompts, rng);
      Tokens old_logp, ref_logp, kl_tok(s.size(), t.shape.L);
      rlhf.token_logp(s, old_logp);
      ref.token_logp(s, ref_logp);
      pl::kl_estimate(old_logp, ref_logp, s.mask, pl::KlEstimator::k1, kl_tok);  // log pi - log pi_ref per token
      // The sequence reward, then its advantage over the mean of the 8 samples of the same prompt
      // (a baseline instead of a critic: Dr. GRPO's group mean, no division by the std).
      const Seq kl_seq = pl::masked_sum(kl_tok, s.mask).eval();
      const Seq reward = rm_scores(rm, s) - static_cast<float>(kBeta) * kl_seq;
      Seq adv_seq(s.size());
      pl::GroupOptions gopt;
      gopt.scale_by_std = false;
      pl::group_advantages(reward, group, gopt, adv_seq);
      Tokens adv(s.size(), t.shape.L);
      for (Index b = 0; b < s.size(); ++b)
        for (int l = 0; l < t.shape.L; ++l) adv(b, l) = s.mask(b, l) ? adv_seq(b) : 0.0f;
      std::vector<int> order(static_cast<std::size_t>(s.size()));
      std::iota(order.begin(), order.end(), 0);
      for (int epoch = 0; epoch < epochs; ++epoch) {
        for (std::size_t i = order.size(); i > 1; --i)
          std::swap(order[i - 1], order[static_cast<std::size_t>(rng.below(static_cast<int>(i)))]);
        for (Index b = 0; b < s.size(); b += minibatch) {
          const std::vector<int> idx(order.begin() + b, order.begin() + std::min(s.size(), b + minibatch));
          ppo_step(select(t, s, idx), select_rows(old_logp, idx), select_rows(adv, idx), rlhf, adam);
        }
      }
      if (at(it, cfg.ppo_iterations)) progress[0].push_back(vs_sft(rlhf));
    }
  }

  // ---- DPO on the pairs -------------------------------------------------------------------
  TabularPolicy dpo(t.shape, t.ref_logits);
  {
    Adam adam(0.05);
    Batcher batches(e.train.size(), 64, args.seed);
    progress[1].push_back(vs_sft(dpo));
    for (long step = 1; step <= cfg.dpo_steps; ++step) {
      dpo_step(select(t, e.train, batches.next()), dpo, ref, adam);
      if (at(step, cfg.dpo_steps)) progress[1].push_back(vs_sft(dpo));
    }
  }

  // ---- Rejection sampling: best of K under the reward model, then the NLL on the kept ones --
  TabularPolicy rs(t.shape, t.ref_logits);
  {
    Adam adam(0.02);
    Rng rng(0x88000000ULL + args.seed);
    const long total = cfg.rs_rounds * cfg.rs_steps;
    long done = 0;
    progress[2].push_back(vs_sft(rs));
    Sequences kept = Sequences::empty(t, 0);
    for (int round = 0; round < cfg.rs_rounds; ++round) {
      std::vector<int> prompts;
      for (int k = 0; k < 64; ++k)
        prompts.insert(prompts.end(), static_cast<std::size_t>(cfg.rs_k), rng.below(t.shape.X));
      const Sequences s = sample(t, rs.dist(), prompts, rng);  // K samples of each prompt from the current model
      Eigen::Tensor<int, 1> best(64);
      pl::best_of_n(rm_scores(rm, s), cfg.rs_k, best);  // argmax of r_rm within each prompt's K samples
      kept = concat(t, kept, select(t, s, std::vector<int>(best.data(), best.data() + best.size())));
      Batcher batches(kept.size(), 64, rng.next());
      for (long step = 0; step < cfg.rs_steps; ++step) {
        nll_step(select(t, kept, batches.next()), rs, adam);  // fine-tune on every round's kept responses so far
        if (at(++done, total)) progress[2].push_back(vs_sft(rs));
      }
    }
  }
  const double train_secs = clock.seconds();

  // ---- the exact judge ----------------------------------------------------------------------
  std::vector<Model> models{model_of(t, "SFT", 's', "#555555", ref_dist, ref_dist),
                            model_of(t, "RLHF (PPO)", 'p', "#1f77b4", rlhf.dist(), ref_dist),
                            model_of(t, "DPO", 'd', "#ff7f0e", dpo.dist(), ref_dist),
                            model_of(t, "rejection sampling", 'r', "#2ca02c", rs.dist(), ref_dist)};
  Model bok{fmt("SFT best-of-%d (exact)", cfg.rs_k), 'b', "#9467bd", {}, 0, 0};
  for (int x = 0; x < t.shape.X; ++x) {
    bok.responses.push_back(best_of_k_outcomes(t, x, ref_dist, rm_table, cfg.rs_k, &bok.kl_ref));
    for (const Outcome& o : bok.responses.back()) bok.true_reward += o.value * o.prob / t.shape.X;
  }
  bok.kl_ref /= t.shape.X;
  models.push_back(bok);
  models.push_back(model_of(t, "optimum pi*", '*', "#000000", opt, ref_dist));
  const std::size_t M = models.size();
  std::vector<std::vector<double>> W(M, std::vector<double>(M));
  for (std::size_t i = 0; i < M; ++i)
    for (std::size_t j = 0; j < M; ++j) W[i][j] = win(t, models[i], models[j]);

  // The exact reward-KL frontier: pi*_b for b from 0.02 to 5, its E[r] against its KL.
  Table frontier({"beta", "kl_ref", "true_reward", "bound_at_kl"});
  std::vector<double> fb, fk, fr;
  for (double lb = std::log(0.02); lb <= std::log(5.0) + 1e-9; lb += (std::log(5.0) - std::log(0.02)) / 60) {
    const Dist d = optimum(t, std::exp(lb));
    fb.push_back(std::exp(lb)), fk.push_back(kl(t, d, ref_dist)), fr.push_back(true_reward(t, d));
  }
  // The tightest bound at a KL of k over the grid: min_b [J*(b) + b k], J*(b) = E*[r] - b KL*.
  const auto bound = [&](double k) {
    double best = std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < fb.size(); ++i) best = std::min(best, fr[i] - fb[i] * fk[i] + fb[i] * k);
    return best;
  };
  for (std::size_t i = 0; i < fb.size(); ++i) frontier.add({fb[i], fk[i], fr[i], bound(fk[i])});

  // ---- CSV ----------------------------------------------------------------------------------
  const std::vector<std::string> keys{"sft", "rlhf", "dpo", "rs", "best_of_k", "optimum"};
  Table matrix({"row", "col", "win"});
  for (std::size_t i = 0; i < M; ++i)
    for (std::size_t j = 0; j < M; ++j) matrix.add({double(i), double(j), W[i][j]});
  matrix.write_csv(args.path("_matrix.csv"));
  Table points({"index", "kl_ref", "true_reward"});
  for (std::size_t i = 0; i < M; ++i) points.add({double(i), models[i].kl_ref, models[i].true_reward});
  points.write_csv(args.path("_models.csv"));
  frontier.write_csv(args.path("_frontier.csv"));
  for (std::size_t k = 0; k < 11; ++k)
    curves.add({k / 10.0, progress[0].at(std::min(k, progress[0].size() - 1)),
                progress[1].at(std::min(k, progress[1].size() - 1)),
                progress[2].at(std::min(k, progress[2].size() - 1))});
  curves.write_csv(args.path(".csv"));

  // ---- terminal -----------------------------------------------------------------------------
  std::printf("reward model: held-out accuracy vs the true reward %.3f. beta = kl_coef = %g.\n\n", rm_accuracy, kBeta);
  std::printf("exact win rate of the row's response over the column's, judged by the hidden true reward:\n%-24s", "");
  for (const char* k : {"SFT", "PPO", "DPO", "RS", "best-of-K", "pi*"}) std::printf(" %9s", k);
  std::printf("\n");
  for (std::size_t i = 0; i < M; ++i) {
    std::printf("%-24s", models[i].name.c_str());
    for (std::size_t j = 0; j < M; ++j) std::printf(" %9.3f", W[i][j]);
    std::printf("\n");
  }
  std::printf("\n%-24s %12s %12s\n", "", "true reward", "KL(pi||ref)");
  for (const auto& m : models) std::printf("%-24s %12.3f %12.3f\n", m.name.c_str(), m.true_reward, m.kl_ref);
  std::printf("(%ld DPO steps, %ld PPO iterations, %d rejection-sampling rounds of %ld steps; %.2f s)\n\n",
              cfg.dpo_steps, cfg.ppo_iterations, cfg.rs_rounds, cfg.rs_steps, train_secs);

  AsciiPlot wp("exact win rate against the SFT model over each method's training", "fraction of training");
  wp.hline("even (0.5)", 0.5, '-').hline("pi* vs SFT", W[M - 1][0], '=');
  wp.add("RLHF (PPO)", curves["progress"], curves["rlhf"], 'p')
      .add("DPO", curves["progress"], curves["dpo"], 'd')
      .add("rejection sampling", curves["progress"], curves["rs"], 'r');
  wp.print();
  AsciiPlot fp("true reward against KL(pi || pi_ref): the exact frontier pi*_beta and the models", "KL(pi || pi_ref)");
  fp.add("frontier pi*_beta", fk, fr, '.');
  for (const auto& m : models) fp.add(m.name, {m.kl_ref}, {m.true_reward}, m.glyph, true);
  fp.print();

  // ---- PNG ----------------------------------------------------------------------------------
  GpFigure fig("method_comparison: SFT, RLHF, DPO and rejection sampling from one SFT model, judged exactly", 1, 3,
               1500, 520);
  std::string tics;
  for (std::size_t i = 0; i < M; ++i) tics += fmt("%s%s %zu", i ? ", " : "", gp_quote(models[i].name).c_str(), i);
  GpPanel heat("exact win rate: row beats column", "", "");
  heat.key = "off";
  heat.curve3(args.path("_matrix.csv"), "col", "row", "'win'", "with image")
      .curve3(args.path("_matrix.csv"), "col", "row", "(sprintf('%.2f', column('win')))", "with labels font ',9'");
  heat.extra =
      fmt("set xtics (%s) rotate by 30 right font ',8'\nset ytics (%s) font ',8'\nset yrange [%g:-0.5]\n"
          "set xrange [-0.5:%g]\nset cbrange [0:1]\nset palette defined (0 '#b2182b', 0.5 '#f7f7f7', 1 '#2166ac')\n"
          "unset grid",
          tics.c_str(), tics.c_str(), M - 0.5, M - 0.5);
  GpPanel wcurve("win rate against SFT during training (exact)", "fraction of training", "win rate vs SFT");
  wcurve.curve(args.path(".csv"), "progress", "rlhf", "RLHF (PPO)", "with linespoints lw 2 pt 7 lc rgb '#1f77b4'")
      .curve(args.path(".csv"), "progress", "dpo", "DPO", "with linespoints lw 2 pt 7 lc rgb '#ff7f0e'")
      .curve(args.path(".csv"), "progress", "rs", "rejection sampling", "with linespoints lw 2 pt 7 lc rgb '#2ca02c'");
  wcurve.key = "right center";
  wcurve.extra =
      "set yrange [0.45:*]\nset arrow from graph 0, first 0.5 to graph 1, first 0.5 nohead dt 2 lc rgb 'black'";
  GpPanel fpanel("true reward against KL to the SFT model (exact)", "KL(pi || pi_ref), nats", "E_pi[r]");
  fpanel.curve(args.path("_frontier.csv"), "kl_ref", "true_reward", "optimum pi*_beta, beta 0.02..5",
               "with lines lw 2 lc rgb 'black'");
  for (std::size_t i = 0; i < M; ++i)
    fpanel.extra += fmt("set label %s at first %.6g, first %.6g %s font ',9'\n", gp_quote(models[i].name).c_str(),
                        models[i].kl_ref, models[i].true_reward,
                        i == 1 ? "right offset -0.8,0" : "offset 0.8,0");  // PPO's on the left: DPO sits close
  fpanel.curve(args.path("_models.csv"), "kl_ref", "true_reward", "the models",
               "with points pt 7 ps 1.5 lc rgb '#d62728'");
  fpanel.key = "bottom right";
  fig.panels = {heat, wcurve, fpanel};
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- checks -------------------------------------------------------------------------------
  Checks check;
  double asym = 0;
  for (std::size_t i = 0; i < M; ++i)
    for (std::size_t j = 0; j < M; ++j) asym = std::max(asym, std::abs(W[i][j] + W[j][i] - 1));
  check.expect(asym < 1e-9, fmt("the judge is consistent: win(A, B) + win(B, A) = 1 (max deviation %.1e)", asym));
  for (std::size_t i = 1; i < 4; ++i)
    check.expect(W[i][0] > 0.5,
                 fmt("%s beats the SFT model under the exact judge (win rate %.3f)", models[i].name.c_str(), W[i][0]));
  for (std::size_t i = 1; i < 4; ++i)
    check.expect(models[i].true_reward <= bound(models[i].kl_ref) + 1e-9,
                 fmt("%s lies below the exact reward-KL frontier (E[r] %.3f <= %.3f at KL %.3f)",
                     models[i].name.c_str(), models[i].true_reward, bound(models[i].kl_ref), models[i].kl_ref));
  check.expect(W[4][0] > 0.5, fmt("best-of-%d under the reward model beats SFT exactly (%.3f)", cfg.rs_k, W[4][0]));
  // Best-of-K moves at most log K - (K - 1) / K nats from the model it samples (Beirami et al. 2024).
  const double bok_bound = std::log(cfg.rs_k) - (cfg.rs_k - 1.0) / cfg.rs_k;
  check.expect(bok.kl_ref <= bok_bound + 1e-12, fmt("best-of-%d stays within log K - (K-1)/K of SFT (KL %.4f <= %.4f)",
                                                    cfg.rs_k, bok.kl_ref, bok_bound));
  for (std::size_t i = 1; i < 4; ++i)
    check.expect(models[i].true_reward > models[0].true_reward,
                 fmt("%s raises the true reward above SFT's (%.3f -> %.3f)", models[i].name.c_str(),
                     models[0].true_reward, models[i].true_reward));
  return check.finish("method_comparison");
}
