// safety_tradeoff: helpfulness against safety, Llama 2 style. One task (examples/common/safety.hpp)
// with two hidden rewards over 100 adversarial prompts in 5 categories and 30 benign ones; on
// adversarial prompts the "unsafe detail" is helpful to the attacker and harmful, on benign
// prompts a refusal is harmless but unhelpful. From the SFT model (the task's reference) we train
//   1. Llama 2's two reward models, helpfulness and safety, each a per-token table trained with
//      the margin ranking loss -log sigmoid(r_c - r_r - m(rating)) on pairs labelled by its own
//      hidden reward (rating = a binning of the reward gap, margins 0, 1/3, 2/3, 1);
//   2. PPO on Llama 2's gated reward: R_c = R_s on safety prompts or when R_s < 0.15, R_h otherwise
//      (R = sigmoid of the RM score), used in logit space, G = logit(R_c), minus a per-token KL
//      penalty 0.1 (log pi - log pi_ref);
//   3. DPO at beta in {0.01, 0.05, 0.1, 0.5, 1} on pairs labelled by the gold preference
//      (harmlessness on safety prompts, helpfulness on benign ones).
// The training functions live in common/safety.hpp, one per method with a comment per step
// naming its equation, because red_teaming retrains the same models with the same code.
//
// Every model is evaluated EXACTLY: helpfulness = mean over all prompts of E_pi[helpfulness] (what
// the hidden helpfulness reward says of the model; on adversarial prompts it rewards complying);
// safety = 1 - the mean over adversarial prompts of P_pi(harmlessness < -0.5), the violation
// probability, by enumerating every response. We chose the violation probability over the mean
// harmlessness because a deployment is judged by how often it fails (red_teaming's attack success
// rate is the same number), not by the average harm; the table prints both.
//
// What to look for: the models' points (helpfulness, safety) and their Pareto frontier, next to the
// exact optima pi*_beta ~ pi_ref exp(gold / beta) (the gold reward is a per-token table, so they
// factorize). DPO moves toward its pi*_beta (KL(pi || pi*_beta) falls; at beta 0.5 and 1 it turns
// up again after ~100 steps, DPO overfitting 6000 finite pairs) and smaller beta moves further from
// SFT. PPO's exact target is pi*(y|x) ~ pi_ref(y|x) exp(G(x,y) / 0.1) over whole responses; G
// switches between two reward models, so pi* need not factorize and the per-position policy may not
// reach it: KL(pi || pi*) is printed, honestly not zero. Llama 2 also whitens logit(R_c) over the
// batch (prefloss::logit_whiten); we do not, because a per-batch affine map rescales kl_coef by a
// batch-dependent std and the target pi* would no longer be one fixed distribution (GAE's advantage
// whitening already normalizes the policy gradient's scale).
//
// The trade-off lives in the adversarial prompts: there the unsafe detail is what the helpfulness
// reward pays for, so every step toward safety costs helpfulness, while on benign prompts the two
// rewards agree (the table's "help. benign" column rises with safety tuning). The optima pi*_beta
// trace it exactly: as beta falls they refuse more and more of the attacks. red_teaming breaks the
// attacks down per category.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/report.hpp"
#include "common/safety.hpp"

using namespace examples;

namespace {

struct Model {
  std::string name;
  char glyph;
  Dist dist;
  SafetyEval eval;
  double kl_ref = 0;
  bool frontier = false;
};

/// a dominates b: at least as good in both, strictly better in one (both maximized).
bool dominates(const SafetyEval& a, const SafetyEval& b) {
  return a.helpfulness >= b.helpfulness && a.safety() >= b.safety() &&
         (a.helpfulness > b.helpfulness || a.safety() > b.safety());
}

/// The Pareto frontier by a sweep: by helpfulness descending (safety descending on ties), a model is
/// on the frontier when it is safer than every model before it. Returns the frontier's indices.
std::vector<std::size_t> pareto_sweep(const std::vector<Model>& m) {
  std::vector<std::size_t> order(m.size());
  for (std::size_t i = 0; i < m.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return m[a].eval.helpfulness != m[b].eval.helpfulness ? m[a].eval.helpfulness > m[b].eval.helpfulness
                                                          : m[a].eval.safety() > m[b].eval.safety();
  });
  std::vector<std::size_t> front;
  double best = -1;
  for (std::size_t i : order)
    if (m[i].eval.safety() > best) front.push_back(i), best = m[i].eval.safety();
  return front;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args =
      parse_args(argc, argv, "safety_tradeoff",
                 "helpfulness vs safety: Llama 2's margin reward models, PPO on the gated reward, DPO at five betas",
                 150, 20, "PPO iterations (reward models: 4x, DPO: 3x as many steps)");
  const Stopwatch clock;
  const SafetyTask st;
  const Task& t = st.task;
  const SafetyData data = safety_data(st, args.seed);
  const Dist ref = reference_dist(t);
  std::printf(
      "task: %zu adversarial prompts (%d categories) + %zu benign, responses of 2-4 tokens over 5 symbols\n"
      "(helpful detail, hedge, refusal, unsafe detail, filler); a response violates when its harmlessness < %g.\n"
      "%ld rated training pairs per reward model and for DPO, %ld held-out pairs.\n\n",
      st.adversarial.size(), static_cast<int>(safety_categories().size()), st.benign.size(), st.threshold,
      static_cast<long>(data.help_train.pairs.size()), static_cast<long>(data.help_heldout.size()));

  // ---- 1. the two reward models (common/safety.hpp: train_margin_rm) ----------------------
  RewardModelConfig rm_cfg = safety_rm_config(args.steps, args.seed, false);
  Table rm_log({"step", "help_loss", "safe_loss"});
  std::vector<double> help_loss, safe_loss;
  const RewardModel help_rm =
      train_margin_rm(st, data.help_train, rm_cfg, [&](long, double loss) { help_loss.push_back(loss); });
  rm_cfg = safety_rm_config(args.steps, args.seed, true);
  const RewardModel safe_rm =
      train_margin_rm(st, data.safe_train, rm_cfg, [&](long, double loss) { safe_loss.push_back(loss); });
  // Averaged over one epoch of minibatches: the batch loss swings with the epoch's order.
  const auto epoch = static_cast<std::size_t>(data.help_train.pairs.size() / rm_cfg.batch);
  const std::vector<double> hs = smooth(help_loss, epoch), ss = smooth(safe_loss, epoch);
  for (std::size_t i = 0; i < hs.size(); ++i) rm_log.add({double(i + 1), hs[i], ss[i]});
  const double help_acc = rm_accuracy(help_rm, data.help_heldout), safe_acc = rm_accuracy(safe_rm, data.safe_heldout);
  // The same held-out pairs ordered by the *other* hidden reward: a reward model is specific.
  const double help_on_safe = rm_accuracy(help_rm, data.safe_heldout);
  std::printf(
      "reward models (%ld steps of %ld rated pairs, margin loss):\n"
      "  helpfulness RM: held-out accuracy vs hidden helpfulness %.3f\n"
      "  safety RM:      held-out accuracy vs hidden harmlessness %.3f  (the helpfulness RM there: %.3f)\n\n",
      rm_cfg.steps, static_cast<long>(rm_cfg.batch), help_acc, safe_acc, help_on_safe);

  // ---- 2. PPO on the gated reward (common/safety.hpp: train_ppo) ---------------------------
  const PpoConfig ppo_cfg = safety_ppo_config(args.steps, args.seed);
  Table ppo_log(
      {"iteration", "gated_exact", "gated_sample", "kl_ref", "kl_target", "objective", "helpfulness", "safety"});
  const auto ppo_record = [&](long it, const Dist& d, double sampled) {
    const GatedEval g = gated_eval(st, help_rm, safe_rm, d, ref, ppo_cfg.kl_coef);
    const SafetyEval e = evaluate_safety(st, d);
    const double k = kl(t, d, ref);
    ppo_log.add(
        {double(it), g.gated, sampled, k, g.kl_target, g.gated - ppo_cfg.kl_coef * k, e.helpfulness, e.safety()});
  };
  ppo_record(0, ref, NAN);
  const long ppo_every = 5;
  const TabularPolicy ppo = train_ppo(st, help_rm, safe_rm, ppo_cfg, [&](long it, const TabularPolicy& p, double g) {
    if (it % ppo_every == 0 || it == ppo_cfg.iterations) ppo_record(it, p.dist(), g);
  });

  // ---- 3. DPO at five betas (common/safety.hpp: train_dpo) --------------------------------
  const std::vector<double> betas{0.01, 0.05, 0.1, 0.5, 1.0};
  const std::vector<double> gold = st.gold();
  const DpoConfig dpo_cfg = safety_dpo_config(args.steps, args.seed);
  const long dpo_every = 10;
  std::vector<std::string> dpo_cols{"step"};
  for (double b : betas) dpo_cols.push_back(fmt("kl_opt_%g", b)), dpo_cols.push_back(fmt("loss_%g", b));
  Table dpo_log(dpo_cols);
  std::vector<std::vector<double>> dpo_kl(betas.size()), dpo_loss(betas.size());
  std::vector<Dist> dpo_dist, optima;
  for (std::size_t i = 0; i < betas.size(); ++i) {
    optima.push_back(optimum(t, betas[i], gold));
    dpo_kl[i].push_back(kl(t, ref, optima[i]));
    dpo_loss[i].push_back(NAN);
    std::vector<double> losses;
    const TabularPolicy p =
        train_dpo(st, data.dpo_train.pairs, betas[i], dpo_cfg, [&](long step, const TabularPolicy& pol, double loss) {
          losses.push_back(loss);
          if (step % dpo_every == 0) {
            dpo_kl[i].push_back(kl(t, pol.dist(), optima[i]));
            dpo_loss[i].push_back(smooth(losses, dpo_every).back());
          }
        });
    dpo_dist.push_back(p.dist());
  }
  for (std::size_t r = 0; r < dpo_kl[0].size(); ++r) {
    std::vector<double> row{double(r * dpo_every)};
    for (std::size_t i = 0; i < betas.size(); ++i) row.push_back(dpo_kl[i][r]), row.push_back(dpo_loss[i][r]);
    dpo_log.add(row);
  }

  // ---- exact evaluation and the Pareto frontier --------------------------------------------
  std::vector<Model> models{{"SFT", 'S', ref, {}}, {"PPO (gated)", 'P', ppo.dist(), {}}};
  const char digits[] = "12345";
  for (std::size_t i = 0; i < betas.size(); ++i)
    models.push_back({fmt("DPO b=%g", betas[i]), digits[i], dpo_dist[i], {}});
  for (auto& m : models) m.eval = evaluate_safety(st, m.dist), m.kl_ref = kl(t, m.dist, ref);
  const std::vector<std::size_t> front = pareto_sweep(models);
  for (std::size_t i : front) models[i].frontier = true;
  std::vector<SafetyEval> opt_eval;
  for (const auto& o : optima) opt_eval.push_back(evaluate_safety(st, o));
  const double secs = clock.seconds();

  // One row per model: 0 SFT, 1 PPO, 2-6 DPO at the five betas.
  Table points(
      {"model", "helpfulness", "safety", "harmlessness", "violation", "attacker_helpfulness", "kl_ref", "on_frontier"});
  for (std::size_t i = 0; i < models.size(); ++i)
    points.add({double(i), models[i].eval.helpfulness, models[i].eval.safety(), models[i].eval.harmlessness,
                models[i].eval.violation, models[i].eval.attacker_helpfulness, models[i].kl_ref,
                models[i].frontier ? 1.0 : 0.0});
  std::vector<std::size_t> front_by_h = front;  // the frontier's line, left to right
  std::sort(front_by_h.begin(), front_by_h.end(),
            [&](std::size_t a, std::size_t b) { return models[a].eval.helpfulness < models[b].eval.helpfulness; });
  Table front_t({"helpfulness", "safety"});
  for (std::size_t i : front_by_h) front_t.add({models[i].eval.helpfulness, models[i].eval.safety()});
  Table opt_t({"beta", "helpfulness", "safety", "harmlessness", "kl_ref"});  // a fine beta grid: the optima's curve
  for (double lb = std::log(0.005); lb <= std::log(5.0) + 1e-9; lb += std::log(5000.0) / 60) {
    const Dist o = optimum(t, std::exp(lb), gold);
    const SafetyEval e = evaluate_safety(st, o);
    opt_t.add({std::exp(lb), e.helpfulness, e.safety(), e.harmlessness, kl(t, o, ref)});
  }
  Table opt_pts({"beta", "helpfulness", "safety"});
  for (std::size_t i = 0; i < betas.size(); ++i) opt_pts.add({betas[i], opt_eval[i].helpfulness, opt_eval[i].safety()});
  const std::string csv = args.path(".csv"), csv_front = args.path("_frontier.csv"),
                    csv_opt = args.path("_optimum.csv"), csv_optp = args.path("_optimum_points.csv"),
                    csv_rm = args.path("_rm.csv"), csv_ppo = args.path("_ppo.csv"), csv_dpo = args.path("_dpo.csv");
  points.write_csv(csv);
  front_t.write_csv(csv_front);
  opt_t.write_csv(csv_opt);
  opt_pts.write_csv(csv_optp);
  rm_log.write_csv(csv_rm);
  ppo_log.write_csv(csv_ppo);
  dpo_log.write_csv(csv_dpo);

  // ---- terminal -----------------------------------------------------------------------------
  AsciiPlot tp("helpfulness (all prompts) vs safety = 1 - P(violation) (adversarial prompts), exact", "helpfulness");
  tp.height = 18;
  tp.add("frontier", front_t["helpfulness"], front_t["safety"], '.');
  tp.add("pi*_beta (all beta)", opt_t["helpfulness"], opt_t["safety"], ':');
  const char opt_glyphs[] = "abcde";
  for (std::size_t i = 0; i < betas.size(); ++i)
    tp.add(fmt("pi* b=%g", betas[i]), {opt_eval[i].helpfulness}, {opt_eval[i].safety()}, opt_glyphs[i], true);
  for (const auto& m : models) tp.add(m.name, {m.eval.helpfulness}, {m.eval.safety()}, m.glyph, true);
  tp.print();
  AsciiPlot dp("DPO: KL(pi || pi*_beta) to its exact optimum (log scale)", "step");
  dp.logy = true;
  for (std::size_t i = 0; i < betas.size(); ++i) dp.add(fmt("b=%g", betas[i]), dpo_log["step"], dpo_kl[i], digits[i]);
  dp.print();
  AsciiPlot pp("PPO: exact E_pi[G] (gated reward, logit space) and KL(pi || pi*) to its sequence-level target",
               "iteration");
  pp.add("E_pi[G]", ppo_log["iteration"], ppo_log["gated_exact"], 'o')
      .add("KL(pi || pi*)", ppo_log["iteration"], ppo_log["kl_target"], 'x');
  pp.print();

  std::printf("%-14s %12s %9s %13s %8s %14s %12s %9s\n", "model", "helpfulness", "safety", "harmlessness", "ASR",
              "help. benign", "KL(pi||ref)", "frontier");
  for (const auto& m : models)
    std::printf("%-14s %12.3f %9.3f %13.3f %8.3f %14.3f %12.3f %9s\n", m.name.c_str(), m.eval.helpfulness,
                m.eval.safety(), m.eval.harmlessness, m.eval.violation, m.eval.benign_helpfulness, m.kl_ref,
                m.frontier ? "yes" : "");
  for (std::size_t i = 0; i < betas.size(); ++i)
    std::printf("%-14s %12.3f %9.3f %13.3f %8.3f %14.3f %12.3f %9s\n", fmt("pi* b=%g", betas[i]).c_str(),
                opt_eval[i].helpfulness, opt_eval[i].safety(), opt_eval[i].harmlessness, opt_eval[i].violation,
                opt_eval[i].benign_helpfulness, kl(t, optima[i], ref), "(exact)");
  std::printf(
      "(helpfulness: all prompts, as the helpfulness reward sees them; safety = 1 - ASR and harmlessness:\n"
      "adversarial prompts; help. benign: benign prompts only, where safety tuning costs nothing.)\n");
  const std::size_t pn = ppo_log.rows() - 1;
  std::printf(
      "PPO: E_pi[G] %.3f -> %.3f, KL(pi || pi*_G) %.3f -> %.3f (pi*_G over whole responses; not reachable exactly\n"
      "by a per-position policy, so it need not reach 0).\n",
      ppo_log["gated_exact"][0], ppo_log["gated_exact"][pn], ppo_log["kl_target"][0], ppo_log["kl_target"][pn]);
  std::printf("DPO: KL(pi || pi*_beta) at step 0 -> last:");
  for (std::size_t i = 0; i < betas.size(); ++i)
    std::printf(" b=%g %.3f->%.3f%s", betas[i], dpo_kl[i].front(), dpo_kl[i].back(), i + 1 < betas.size() ? "," : "");
  std::printf("\n(%ld RM steps x2, %ld PPO iterations of %ld samples, %ld DPO steps x5; %.2f s)\n\n", rm_cfg.steps,
              ppo_cfg.iterations, static_cast<long>(ppo_cfg.rollout), dpo_cfg.steps, secs);

  // ---- PNG ----------------------------------------------------------------------------------
  GpFigure fig("safety_tradeoff: Llama 2 reward models, PPO on the safety-gated reward, DPO at five betas (exact)", 2,
               2, 1400, 1000);
  // One single-row CSV column pair per model, so that each gets its own point style and key entry.
  std::vector<std::string> wide_cols;
  std::vector<double> wide_row;
  for (std::size_t i = 0; i < models.size(); ++i) {
    wide_cols.insert(wide_cols.end(), {fmt("h%zu", i), fmt("s%zu", i)});
    wide_row.insert(wide_row.end(), {models[i].eval.helpfulness, models[i].eval.safety()});
  }
  Table wide(wide_cols);
  wide.add(wide_row);
  const std::string csv_wide = args.path("_models.csv");
  wide.write_csv(csv_wide);
  GpPanel p1("helpfulness vs safety (exact): models, Pareto frontier, optima pi*_beta", "helpfulness (all prompts)",
             "safety = 1 - P(violation) (adversarial)");
  p1.curve(csv_opt, "helpfulness", "safety", "exact optima pi*_beta (beta 0.005..5)",
           "with lines lw 1 dt 2 lc rgb '#888888'")
      .curve(csv_optp, "helpfulness", "safety", "pi*_beta at the five betas", "with points pt 6 ps 2 lc rgb 'black'")
      .curve(csv_front, "helpfulness", "safety", "Pareto frontier of the models",
             "with linespoints lw 2 pt 6 ps 3.2 "
             "lc rgb '#2ca02c'");
  const char* model_colors[] = {"#7f7f7f", "#d62728", "#1f77b4", "#17becf", "#ff7f0e", "#9467bd", "#8c564b"};
  const int model_pts[] = {5, 7, 9, 11, 13, 15, 5};
  for (std::size_t i = 0; i < models.size(); ++i)
    p1.curve(csv_wide, fmt("h%zu", i), fmt("s%zu", i), models[i].name,
             fmt("with points pt %d ps 1.8 lc rgb '%s'", model_pts[i], model_colors[i]));
  p1.key = "left center";  // the points sit along the top and down the right
  // The optima of beta <= 0.1 sit close together: their labels are stacked downwards.
  for (std::size_t i = 0, stacked = 0; i < betas.size(); ++i) {
    stacked = i > 0 && std::abs(opt_eval[i].helpfulness - opt_eval[i - 1].helpfulness) < 0.2 ? stacked + 1 : 0;
    p1.extra += fmt("set label %s at first %.6g, first %.6g offset 1,%g font ',8' tc rgb '#555555'\n",
                    gp_quote(fmt("pi* b=%g", betas[i])).c_str(), opt_eval[i].helpfulness, opt_eval[i].safety(),
                    -0.9 - 1.0 * double(stacked));
  }
  p1.extra += "set offsets graph 0.03, graph 0.1, graph 0.05, graph 0.03\n";
  GpPanel p2("reward models: margin ranking loss (moving average over an epoch)", "step", "loss");
  p2.curve(csv_rm, "step", "help_loss", "helpfulness RM", "with lines lw 2 lc rgb '#ff7f0e'")
      .curve(csv_rm, "step", "safe_loss", "safety RM", "with lines lw 2 lc rgb '#9467bd'");
  GpPanel p3("PPO on the gated reward (exact)", "iteration", "");
  p3.curve(csv_ppo, "iteration", "gated_exact", "E_pi[G], gated reward", "with lines lw 2 lc rgb '#d62728'")
      .curve(csv_ppo, "iteration", "objective", "E_pi[G] - 0.1 KL(pi||ref)", "with lines lw 2 dt 2 lc rgb '#d62728'")
      .curve(csv_ppo, "iteration", "kl_target", "KL(pi || pi*_G), sequence level", "with lines lw 2 lc rgb 'black'")
      .curve(csv_ppo, "iteration", "safety", "safety", "with lines lw 2 lc rgb '#2ca02c'");
  p3.key = "center right";
  GpPanel p4("DPO: KL(pi || pi*_beta) to its exact optimum", "step", "nats (log scale)");
  const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"};
  for (std::size_t i = 0; i < betas.size(); ++i)
    p4.curve(csv_dpo, "step", fmt("kl_opt_%g", betas[i]), fmt("beta %g", betas[i]),
             fmt("with lines lw 2 lc rgb '%s'", colors[i]));
  p4.logy = true;
  fig.panels = {p1, p2, p3, p4};
  std::printf("wrote %s (and _models, _frontier, _optimum, _optimum_points, _rm, _ppo, _dpo .csv)\n", csv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning ----------------------------------------------------------------
  Checks check;
  check.expect(help_acc > 0.6,
               fmt("helpfulness RM: held-out accuracy vs hidden helpfulness above chance (%.3f)", help_acc));
  check.expect(safe_acc > 0.6,
               fmt("safety RM: held-out accuracy vs hidden harmlessness above chance (%.3f)", safe_acc));
  const SafetyEval &sft = models[0].eval, &ppo_e = models[1].eval;
  check.expect(ppo_log["gated_exact"][pn] > ppo_log["gated_exact"][0],
               fmt("PPO raises the exact gated reward E_pi[G] (%.3f -> %.3f)", ppo_log["gated_exact"][0],
                   ppo_log["gated_exact"][pn]));
  check.expect(ppo_e.violation < sft.violation && ppo_e.harmlessness > sft.harmlessness,
               fmt("PPO makes the SFT model safer on adversarial prompts (ASR %.3f -> %.3f, harmlessness %.3f -> %.3f)",
                   sft.violation, ppo_e.violation, sft.harmlessness, ppo_e.harmlessness));
  for (std::size_t i = 0; i < betas.size(); ++i)
    check.expect(dpo_kl[i].back() < dpo_kl[i].front(), fmt("DPO beta=%g moves toward its exact optimum: KL(pi || "
                                                           "pi*_beta) %.3f -> %.3f",
                                                           betas[i], dpo_kl[i].front(), dpo_kl[i].back()));
  bool ordered = true;
  for (std::size_t i = 3; i + 1 < models.size(); ++i) ordered = ordered && models[i].kl_ref > models[i + 1].kl_ref;
  check.expect(models[2].kl_ref > models.back().kl_ref,
               fmt("smaller beta moves further from SFT: KL(pi||ref) at beta 0.01 %.3f > at beta 1 %.3f (all five "
                   "ordered: %s)",
                   models[2].kl_ref, models.back().kl_ref, ordered ? "yes" : "no"));
  // The frontier from the sweep, checked against every pair of models.
  bool pareto_ok = true;
  for (std::size_t i = 0; i < models.size(); ++i) {
    bool dominated = false;
    for (std::size_t j = 0; j < models.size(); ++j)
      dominated = dominated || (j != i && dominates(models[j].eval, models[i].eval));
    pareto_ok = pareto_ok && dominated != models[i].frontier;
  }
  check.expect(pareto_ok, fmt("Pareto frontier (%zu of %zu models): no model on it is dominated, every model off it is",
                              front.size(), models.size()));
  return check.finish("safety_tradeoff");
}
