// beta_sweep: DPO with beta in {0.01, 0.05, 0.1, 0.5, 1.0} on the same 1000 pairs. Each run's
// final (KL(pi || pi_ref), true reward) is a point of a KL-reward frontier, drawn next to the
// closed-form optimum for its beta and the whole optimal frontier
//   beta -> (KL(pi*_beta || pi_ref), E_{pi*_beta}[r]),  pi*_beta ~ pi_ref exp(r / beta),
// which no policy can lie above: pi*_beta maximizes E[r] - beta KL, so at its KL it has the most
// reward. Small beta buys reward with KL; DPO learns it from finite, noisy pairs.
//
// The learning rate is scaled as 0.005 / beta (see below): for this tabular policy DPO then
// learns the same implicit reward r_hat = beta log(pi / pi_ref) at every beta, step by step, and
// each run's policy is pi_ref exp(r_hat / beta) — the sweep isolates what beta does.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/preference.hpp"
#include "common/report.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

/// DPO (Rafailov et al. 2023, eq. 7) at a given beta: -log sigmoid(beta [(s_w - s_w,ref) -
/// (s_l - s_l,ref)]) over masked sums of token log-probs; with `grad`, d loss / d logits added.
PreferenceLoss dpo_loss(double beta) {
  return [beta](const Pairs& p, const TabularPolicy& policy, const TabularPolicy& ref, std::vector<float>* grad) {
    const auto lp = policy.token_logp(p), rp = ref.token_logp(p);
    const Mask &mc = p.chosen.mask, &mr = p.rejected.mask;
    pl::DpoOptions opt;
    opt.beta = beta;
    const auto r = pl::dpo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr),
                           pl::masked_sum(rp.chosen, mc), pl::masked_sum(rp.rejected, mr), opt);
    if (grad) policy.backward(p, r, *grad);  // r.backward to the tokens, the chain rule to the logits
    return static_cast<double>(r.loss);
  };
}

}  // namespace

int main(int argc, char** argv) {
  const Args args =
      parse_args(argc, argv, "beta_sweep", "DPO's KL-reward frontier against the closed-form optimum", 300, 60);
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;
  std::printf("%s.\n\n", describe(e).c_str());
  const Dist ref = reference_dist(t);
  const double sft_reward = true_reward(t, ref);
  const std::vector<double> betas{0.01, 0.05, 0.1, 0.5, 1.0};
  const char* colors[] = {"#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"};

  // The optimal frontier, from the closed form on a log grid of beta.
  Table frontier({"beta", "kl_ref", "true_reward"});
  for (int k = 0; k <= 120; ++k) {
    const double b = std::pow(10.0, -2.5 + 3.5 * k / 120.0);
    const Dist o = optimum(t, b);
    frontier.add({b, kl(t, o, ref), true_reward(t, o)});
  }

  struct Point {
    double beta;
    Dist opt;
    std::vector<Snapshot> curve;
  };
  std::vector<Point> points;
  PreferenceConfig cfg;
  cfg.steps = args.steps;
  cfg.seed = args.seed;
  // Adam moves a logit by about lr a step, the implicit reward beta log(pi / pi_ref) by beta lr.
  // lr = 0.005 / beta gives every run the same implicit-reward step (beta = 0.1: lr 0.05, as in
  // dpo_curves), so the sweep shows what beta does rather than how far a fixed step budget gets.
  for (double b : betas) {
    cfg.beta = b;
    cfg.lr = 0.005 / b;
    Point p{b, optimum(t, b), {}};
    p.curve = train_preference(e, cfg, dpo_loss(b), p.opt, b, args.quick ? 5 : 1);
    points.push_back(std::move(p));
  }
  const double secs = clock.seconds();

  // ---- CSV: the points, the frontier, the training curves -------------------------------------
  Table table({"beta", "dpo_kl_ref", "dpo_true_reward", "dpo_kl_opt", "opt_kl_ref", "opt_true_reward", "sft_kl_opt",
               "dpo_objective", "opt_objective"});
  std::vector<std::string> curve_names{"step"};
  for (double b : betas)
    for (const char* m : {"loss", "kl_ref", "true_reward", "kl_opt"}) curve_names.push_back(fmt("b%g_%s", b, m));
  Table curves(curve_names);
  for (const auto& p : points) {
    const Snapshot& s = p.curve.back();
    const double ok = kl(t, p.opt, ref), orw = true_reward(t, p.opt);
    table.add({p.beta, s.kl_ref, s.true_reward, s.kl_opt, ok, orw, p.curve.front().kl_opt,
               s.true_reward - p.beta * s.kl_ref, orw - p.beta * ok});
  }
  for (std::size_t i = 0; i < points[0].curve.size(); ++i) {
    std::vector<double> row{double(points[0].curve[i].step)};
    for (const auto& p : points)
      row.insert(row.end(), {p.curve[i].loss, p.curve[i].kl_ref, p.curve[i].true_reward, p.curve[i].kl_opt});
    curves.add(row);
  }
  const std::string csv = args.path(".csv"), fcsv = args.path("_frontier.csv"), ccsv = args.path("_curves.csv");
  table.write_csv(csv);
  frontier.write_csv(fcsv);
  curves.write_csv(ccsv);

  // ---- terminal -----------------------------------------------------------------------------
  AsciiPlot plot("KL-reward frontier: DPO after training (1-5) vs the closed-form optimum (a-e), same beta",
                 "KL(pi || pi_ref)");
  plot.height = 16;
  plot.add("optimal frontier (closed form)", frontier["kl_ref"], frontier["true_reward"], '.');
  plot.hline("SFT model", sft_reward, '-');
  for (std::size_t i = 0; i < points.size(); ++i) {
    const Snapshot& s = points[i].curve.back();
    plot.add(fmt("pi* beta=%g", points[i].beta), {kl(t, points[i].opt, ref)}, {true_reward(t, points[i].opt)},
             char('a' + i), true);
    plot.add(fmt("DPO beta=%g", points[i].beta), {s.kl_ref}, {s.true_reward}, char('1' + i), true);
  }
  // Keep the axis to the region the runs occupy (the frontier goes on to larger KL).
  double kmax = 0;
  for (const auto& p : points) kmax = std::max({kmax, p.curve.back().kl_ref, kl(t, p.opt, ref)});
  for (auto& s : plot.series)
    if (s.label.rfind("optimal", 0) == 0) {
      std::vector<double> x, y;
      for (std::size_t k = 0; k < s.x.size(); ++k)
        if (s.x[k] <= 1.05 * kmax) x.push_back(s.x[k]), y.push_back(s.y[k]);
      s.x = x, s.y = y;
    }
  plot.print();

  std::printf("%6s | %26s | %26s | %16s\n", "", "DPO after training", "closed-form optimum pi*", "KL(pi||pi*)");
  std::printf("%6s | %12s %13s | %12s %13s | %16s %8s\n", "beta", "KL(pi||ref)", "true reward", "KL(pi*||ref)",
              "true reward", "SFT -> DPO", "J* - J");
  for (const auto& p : points) {
    const Snapshot& s = p.curve.back();
    const double ok = kl(t, p.opt, ref), orw = true_reward(t, p.opt);
    std::printf("%6g | %12.3f %13.3f | %12.3f %13.3f | %7.2f -> %6.3f %8.4f\n", p.beta, s.kl_ref, s.true_reward, ok,
                orw, p.curve.front().kl_opt, s.kl_opt, (orw - p.beta * ok) - (s.true_reward - p.beta * s.kl_ref));
  }
  std::printf("SFT model: true reward %.3f at KL 0. J = E[r] - beta KL(pi||pi_ref); J* - J = beta KL(pi||pi*).\n",
              sft_reward);
  std::printf("(%zu DPO runs of %ld steps, %.2f s)\n\n", betas.size(), args.steps, secs);

  // ---- PNG ----------------------------------------------------------------------------------
  GpFigure fig("beta_sweep: DPO's KL-reward frontier against the closed-form optimum (1000 pairs)", 1, 2, 1380, 560);
  GpPanel fp("KL-reward frontier", "KL(pi || pi_ref)  [nats]", "true reward E_pi[r]");
  fp.curve(fcsv, "kl_ref", "true_reward", "optimal frontier (closed form)", "with lines lw 2 lc rgb '#888888'");
  for (std::size_t i = 0; i < points.size(); ++i)
    fp.curve(ccsv, fmt("b%g_kl_ref", points[i].beta), fmt("b%g_true_reward", points[i].beta), "",
             fmt("with lines lw 1 dt 3 lc rgb '%s'", colors[i]));
  fp.curve(csv, "opt_kl_ref", "opt_true_reward", "pi* for each beta", "with points pt 6 ps 2.2 lw 2 lc rgb 'black'");
  fp.curve(csv, "dpo_kl_ref", "dpo_true_reward", "DPO, same beta (dotted: its path)",
           "with points pt 7 ps 1.6 lc rgb '#1f77b4'");
  fp.key = "bottom right";
  for (const auto& p : points) {
    const Snapshot& s = p.curve.back();
    fp.extra += fmt("set arrow from %.6g,%.6g to %.6g,%.6g nohead lw 1 lc rgb '#1f77b4'\n", s.kl_ref, s.true_reward,
                    kl(t, p.opt, ref), true_reward(t, p.opt));
    fp.extra += fmt("set label 'beta=%g' at %.6g,%.6g offset 1,-1 font ',9'\n", p.beta, kl(t, p.opt, ref),
                    true_reward(t, p.opt));
  }
  fp.extra += fmt("set xrange [0:%.6g]\n", 1.1 * kmax);
  GpPanel kp("KL(pi || pi*_beta) during training", "step", "nats (log scale)");
  for (std::size_t i = 0; i < points.size(); ++i)
    kp.curve(ccsv, "step", fmt("b%g_kl_opt", points[i].beta), fmt("beta=%g", points[i].beta),
             fmt("with lines lw 2 lc rgb '%s'", colors[i]));
  kp.logy = true;
  double lo = points[0].curve[0].kl_opt, hi = lo;
  for (const auto& p : points)
    for (const auto& s : p.curve) lo = std::min(lo, s.kl_opt), hi = std::max(hi, s.kl_opt);
  kp.extra = fmt(
      "set ytics (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)\nset yrange [%.6g:%.6g]",
      0.8 * lo, 1.25 * hi);
  fig.panels = {fp, kp};
  std::printf("wrote %s, %s, %s\n", csv.c_str(), fcsv.c_str(), ccsv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning ----------------------------------------------------------------
  Checks check;
  for (const auto& p : points) {
    const Snapshot &a = p.curve.front(), &b = p.curve.back();
    check.expect(b.kl_opt < a.kl_opt,
                 fmt("beta=%g: KL to the closed-form optimum shrinks (%.3f -> %.3f)", p.beta, a.kl_opt, b.kl_opt));
    check.expect(b.true_reward > sft_reward, fmt("beta=%g: true reward rises above the SFT model (%.3f -> %.3f)",
                                                 p.beta, sft_reward, b.true_reward));
    const double ok = kl(t, p.opt, ref), orw = true_reward(t, p.opt);
    check.expect(b.true_reward - p.beta * b.kl_ref <= orw - p.beta * ok + 1e-9,
                 fmt("beta=%g: no policy beats the optimum's objective E[r] - beta KL (%.4f <= %.4f)", p.beta,
                     b.true_reward - p.beta * b.kl_ref, orw - p.beta * ok));
  }
  bool ordered = true;
  std::string kls;
  for (std::size_t i = 0; i < points.size(); ++i) {
    kls += fmt("%s%.2f", i ? " > " : "", points[i].curve.back().kl_ref);
    if (i && points[i].curve.back().kl_ref >= points[i - 1].curve.back().kl_ref) ordered = false;
  }
  check.expect(ordered, "smaller beta, larger KL(pi || pi_ref), as for the optimum (" + kls + ")");
  return check.finish("beta_sweep");
}
