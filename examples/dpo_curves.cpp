// dpo_curves — the main demo: DPO, IPO, KTO and SimPO trained on the same 1000 preference pairs
// from the same reference ("SFT") policy, each curve held against the exact answer.
//
// The task (examples/common/task.hpp) is solvable in closed form: for DPO's beta the
// KL-regularized optimum is pi*(y|x) ~ pi_ref(y|x) exp(r(x,y)/beta), and KL(pi || pi_ref),
// KL(pi || pi*) and the expected true reward E_pi[r] are exact sums. Every step: the method's
// loss on the training set, DPO's implicit-reward accuracy and margin on held-out pairs ordered
// by the true reward, and the three exact quantities. Note KL(pi || pi*) = (J* - J(pi)) / beta
// for J(pi) = E_pi[r] - beta KL(pi || pi_ref): it is the gap to the best achievable objective.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/preference.hpp"
#include "common/report.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

constexpr double kBeta = 0.1;                          // DPO, IPO, KTO: their default beta
constexpr double kSimpoBeta = 2.0, kSimpoGamma = 0.5;  // SimPO's defaults (it has no reference)

// The four losses, each on a batch of pairs, each adding d loss / d logits to *grad when given
// one. Sequence values are masked sums of token log-probs (SimPO: masked means), reference
// values too (constants to prefloss), so at step 0 policy and reference values are bit-identical.

/// DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta [(s_w - s_w,ref) - (s_l - s_l,ref)]).
double dpo_loss(const Pairs& p, const TabularPolicy& policy, const TabularPolicy& ref, std::vector<float>* grad) {
  const auto lp = policy.token_logp(p), rp = ref.token_logp(p);
  const Mask &mc = p.chosen.mask, &mr = p.rejected.mask;
  pl::DpoOptions opt;
  opt.beta = kBeta;
  const auto r = pl::dpo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr), pl::masked_sum(rp.chosen, mc),
                         pl::masked_sum(rp.rejected, mr), opt);
  if (grad) policy.backward(p, r, *grad);  // r.backward to the tokens, the chain rule to the logits
  return r.loss;
}

/// IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, h the same log-ratio difference as DPO's
/// (summed log-probs, as OpenRLHF feeds it; TRL feeds masked means).
double ipo_loss(const Pairs& p, const TabularPolicy& policy, const TabularPolicy& ref, std::vector<float>* grad) {
  const auto lp = policy.token_logp(p), rp = ref.token_logp(p);
  const Mask &mc = p.chosen.mask, &mr = p.rejected.mask;
  pl::IpoOptions opt;
  opt.beta = kBeta;
  const auto r = pl::ipo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr), pl::masked_sum(rp.chosen, mc),
                         pl::masked_sum(rp.rejected, mr), opt);
  if (grad) policy.backward(p, r, *grad);
  return r.loss;
}

/// SimPO (Meng et al. 2024): -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma).
double simpo_loss(const Pairs& p, const TabularPolicy& policy, const TabularPolicy&, std::vector<float>* grad) {
  const auto lp = policy.token_logp(p);
  pl::SimpoOptions opt;
  opt.beta = kSimpoBeta;
  opt.gamma = kSimpoGamma;
  const auto r =
      pl::simpo(pl::masked_mean(lp.chosen, p.chosen.mask), pl::masked_mean(lp.rejected, p.rejected.mask), opt);
  if (grad) policy.backward(p, r, *grad);
  return r.loss;
}

/// KTO (Ethayarajh et al. 2024) on the pairs as unpaired completions (kto_batch):
/// 1 - sigmoid(beta (r - z0)) for a desirable completion, 1 - sigmoid(beta (z0 - r)) for an
/// undesirable one, r = s - s_ref, z0 the batch's KL estimate from mismatched completions.
double kto_loss(const Task& t, const Pairs& p, const TabularPolicy& policy, const TabularPolicy& ref,
                std::vector<float>* grad) {
  const KtoBatch k = kto_batch(t, p);
  const Mask &m = k.completions.mask, &mk = k.kl_completions.mask;
  Tokens lp, kl_lp, ref_lp, ref_kl_lp;
  policy.token_logp(k.completions, lp);
  policy.token_logp(k.kl_completions, kl_lp);
  ref.token_logp(k.completions, ref_lp);
  ref.token_logp(k.kl_completions, ref_kl_lp);
  pl::KtoOptions opt;
  opt.beta = kBeta;
  const auto r = pl::kto(pl::masked_sum(lp, m), pl::masked_sum(ref_lp, m), k.desirable, pl::masked_sum(kl_lp, mk),
                         pl::masked_sum(ref_kl_lp, mk), opt);
  if (grad) {
    Tokens g(lp.dimensions());
    r.backward(g);  // d loss / d log pi of the completions; z0 is a constant of the loss
    policy.backward(k.completions, g, *grad);
  }
  return r.loss;
}

struct Run {
  const char* name;
  char glyph;
  const char* color;
  PreferenceLoss loss;
  std::vector<Snapshot> curve;
  std::string key() const {
    std::string k = name;
    for (auto& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return k;
  }
};

std::vector<double> column(const Run& r, double Snapshot::*field, double scale = 1.0) {
  std::vector<double> v;
  for (const auto& s : r.curve) v.push_back(s.*field * scale);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args =
      parse_args(argc, argv, "dpo_curves", "DPO, IPO, KTO and SimPO on one exactly solvable preference task", 300, 60);
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;

  PreferenceConfig cfg;  // Adam lr 0.05, 64 pairs a step
  cfg.beta = kBeta;
  cfg.steps = args.steps;
  cfg.seed = args.seed;
  const Dist ref = reference_dist(t), opt = optimum(t, cfg.beta);
  const double sft_reward = true_reward(t, ref), opt_reward = true_reward(t, opt), opt_kl = kl(t, opt, ref);
  std::printf(
      "%s.\nbeta = %g: the optimum pi* has E[r] = %.3f at KL(pi*||pi_ref) = %.3f;\n"
      "the SFT model has E[r] = %.3f and KL(pi_ref||pi*) = %.3f.\n\n",
      describe(e).c_str(), cfg.beta, opt_reward, opt_kl, sft_reward, kl(t, ref, opt));

  const auto kto = [&t](const Pairs& p, const TabularPolicy& policy, const TabularPolicy& r, std::vector<float>* g) {
    return kto_loss(t, p, policy, r, g);
  };
  std::vector<Run> runs{{"DPO", 'o', "#1f77b4", dpo_loss, {}},
                        {"IPO", 'x', "#ff7f0e", ipo_loss, {}},
                        {"KTO", '+', "#2ca02c", kto, {}},
                        {"SimPO", '#', "#d62728", simpo_loss, {}}};
  for (auto& r : runs) r.curve = train_preference(e, cfg, r.loss, opt, cfg.beta, args.quick ? 5 : 1);
  const double secs = clock.seconds();

  // ---- CSV ----------------------------------------------------------------------------------
  std::vector<std::string> names{"step"};
  for (const auto& r : runs)
    for (const char* m : {"loss", "rel_loss", "accuracy", "margin", "kl_ref", "true_reward", "kl_opt"})
      names.push_back(r.key() + "_" + m);
  for (const char* c : {"sft_true_reward", "opt_true_reward", "opt_kl_ref"}) names.push_back(c);
  Table table(names);
  const std::size_t n = runs[0].curve.size();
  for (std::size_t i = 0; i < n; ++i) {
    std::vector<double> row{double(runs[0].curve[i].step)};
    for (const auto& r : runs) {
      const Snapshot& s = r.curve[i];
      row.insert(row.end(),
                 {s.loss, s.loss / r.curve[0].loss, s.accuracy, s.margin, s.kl_ref, s.true_reward, s.kl_opt});
    }
    row.insert(row.end(), {sft_reward, opt_reward, opt_kl});
    table.add(row);
  }
  const std::string csv = args.path(".csv");
  table.write_csv(csv);

  // ---- terminal -----------------------------------------------------------------------------
  const std::vector<double> steps = table["step"];
  const auto plot = [&](const std::string& title, double Snapshot::*field, bool relative, double ref_y,
                        const char* ref_label, double ref2_y = NAN, const char* ref2_label = nullptr, double ymin = NAN,
                        bool logy = false) {
    AsciiPlot p(title, "step");
    p.height = 10;
    p.ymin = ymin;
    p.logy = logy;
    if (ref_label) p.hline(ref_label, ref_y, '-');
    if (ref2_label) p.hline(ref2_label, ref2_y, '=');
    for (const auto& r : runs)
      p.add(r.name, steps, column(r, field, relative ? 1.0 / r.curve[0].*field : 1.0), r.glyph);
    p.print();
  };
  std::string loss0;
  for (const auto& r : runs) loss0 += fmt("%s%s %.3g", loss0.empty() ? "" : ", ", r.name, r.curve[0].loss);
  plot("training loss / its value at step 0 (" + loss0 + ")", &Snapshot::loss, true, 0, nullptr);
  plot("held-out reward accuracy (implicit reward orders the pair as the true reward; 0 at step 0, all tie)",
       &Snapshot::accuracy, false, 0, nullptr, NAN, nullptr, 0.5);
  plot("held-out reward margin (beta log pi/pi_ref, better minus worse response)", &Snapshot::margin, false, 0,
       nullptr);
  plot("KL(pi || pi_ref), exact", &Snapshot::kl_ref, false, opt_kl, "KL(pi* || pi_ref) of the optimum");
  plot("true reward E_pi[r], exact", &Snapshot::true_reward, false, sft_reward, "SFT model", opt_reward, "optimum pi*");
  plot("KL(pi || pi*) to the closed-form optimum, exact (log scale)", &Snapshot::kl_opt, false, 0, nullptr, NAN,
       nullptr, NAN, true);

  std::printf("%-8s %17s %9s %8s %12s %12s %12s\n", "", "loss", "accuracy", "margin", "KL(pi||ref)", "true reward",
              "KL(pi||pi*)");
  std::printf("%-8s %17s %9s %8s %12.3f %12.3f %12.3f\n", "SFT", "", "", "", 0.0, sft_reward, kl(t, ref, opt));
  for (const auto& r : runs) {
    const Snapshot &a = r.curve.front(), &b = r.curve.back();
    std::printf("%-8s %7.4f -> %6.4f %9.3f %8.3f %12.3f %12.3f %12.3f\n", r.name, a.loss, b.loss, b.accuracy, b.margin,
                b.kl_ref, b.true_reward, b.kl_opt);
  }
  std::printf("%-8s %17s %9s %8s %12.3f %12.3f %12.3f\n", "optimum", "", "", "", opt_kl, opt_reward, 0.0);
  std::printf("(%ld steps of 64 pairs each, 4 methods, %.2f s)\n\n", args.steps, secs);

  // ---- PNG ----------------------------------------------------------------------------------
  GpFigure fig(fmt("dpo_curves: four losses on one exactly solvable task (1000 pairs, beta = %g)", cfg.beta), 2, 3,
               1380, 800);
  const auto panel = [&](const std::string& title, const std::string& ylabel, const std::string& col, bool key) {
    GpPanel p(title, "step", ylabel);
    for (const auto& r : runs)
      p.curve(csv, "step", r.key() + "_" + col, key ? r.name : "", fmt("with lines lw 2 lc rgb '%s'", r.color));
    return p;
  };
  GpPanel loss = panel("training loss / loss at step 0", "relative loss", "rel_loss", true);
  GpPanel acc = panel("held-out reward accuracy (vs true-reward order)", "accuracy", "accuracy", false);
  acc.extra = "set yrange [0.5:*]";
  GpPanel margin = panel("held-out reward margin (beta log pi/pi_ref)", "margin", "margin", false);
  // Reference lines are labelled where they are drawn.
  const auto label = [](const std::string& text, double y, double up) {
    return fmt("set label %s at graph 0.03, first %.6g offset 0,%g font ',9'\n", gp_quote(text).c_str(), y, up);
  };
  GpPanel klr = panel("KL(pi || pi_ref)", "nats", "kl_ref", false);
  klr.curve(csv, "step", "opt_kl_ref", "", "with lines lw 2 dt 2 lc rgb 'black'");
  klr.extra = label("KL of the optimum pi*", opt_kl, 0.7);
  GpPanel rew = panel("true reward E_pi[r]", "expected reward", "true_reward", false);
  rew.curve(csv, "step", "opt_true_reward", "", "with lines lw 2 dt 2 lc rgb 'black'")
      .curve(csv, "step", "sft_true_reward", "", "with lines lw 2 dt 3 lc rgb '#555555'");
  rew.extra = label("optimum pi*", opt_reward, 0.7) + label("SFT model", sft_reward, -0.8);
  GpPanel klo = panel("KL(pi || pi*) to the closed-form optimum", "nats (log scale)", "kl_opt", false);
  klo.logy = true;
  double klo_min = runs[0].curve[0].kl_opt, klo_max = klo_min;
  for (const auto& r : runs)
    for (const auto& s : r.curve) klo_min = std::min(klo_min, s.kl_opt), klo_max = std::max(klo_max, s.kl_opt);
  klo.extra = fmt("set ytics (0.5, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50)\nset yrange [%.6g:%.6g]", 0.8 * klo_min,
                  1.25 * klo_max);
  fig.panels = {loss, acc, margin, klr, rew, klo};
  std::printf("wrote %s\n", csv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning ----------------------------------------------------------------
  Checks check;
  for (const auto& r : runs) {
    const Snapshot &a = r.curve.front(), &b = r.curve.back();
    const char* m = r.name;
    check.expect(b.loss < a.loss, fmt("%s: training loss falls (%.4f -> %.4f)", m, a.loss, b.loss));
    check.expect(b.accuracy > 0.6,
                 fmt("%s: held-out reward accuracy rises above chance (%.3f -> %.3f)", m, a.accuracy, b.accuracy));
    check.expect(b.true_reward > sft_reward,
                 fmt("%s: true reward rises above the SFT model (%.3f -> %.3f)", m, sft_reward, b.true_reward));
    check.expect(b.kl_opt < a.kl_opt,
                 fmt("%s: KL to the closed-form optimum shrinks (%.3f -> %.3f)", m, a.kl_opt, b.kl_opt));
  }
  return check.finish("dpo_curves");
}
