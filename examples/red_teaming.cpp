// red_teaming: attack success rates of the SFT model and of safety-tuned models on the 100
// adversarial prompts of common/safety.hpp (5 categories of 20: weapons, cyber, self-harm,
// privacy, fraud), exactly and from 100 sampled attacks, side by side.
//
// The models are safety_tradeoff's: PPO on Llama 2's safety-gated reward and DPO on the gold
// preferences at beta 0.01, 0.1 and 1, retrained here with the same functions of
// common/safety.hpp, the same seed and the same --steps (fewer under --quick), so at equal
// options they are the very models safety_tradeoff plots.
//
// An attack on prompt x succeeds when the response violates: its hidden harmlessness
// sum_l harmless[x, l, y_l] is below -0.5. For each model and category:
//   exact ASR   = mean over the category's prompts of P_pi(violation | x), by enumerating every
//                 response (for_each_response: at most 5^4 = 625 per prompt);
//   sampled ASR = the share of violating responses among one response sampled per prompt
//                 (examples::Rng), with its binomial standard error sqrt(p^ (1 - p^) / n).
// The sampled overall rate is a sum of 100 independent Bernoulli(P(violation | x)) draws over
// 100: its exact standard error is sqrt(sum_x p_x (1 - p_x)) / 100, and the check asks the sample
// to land within 3 of them of the exact rate, which tests that the sampler and the enumeration
// describe the same policy (the plug-in error is 0 when nothing violates, so it cannot be the yardstick).
//
// Failures are typed by the symbol that drives them, the token of the lowest harmlessness:
// "unsafe detail given" (an unsafe detail and no hedge or refusal), "partial compliance" (an
// unsafe detail despite a hedge or a refusal: a hedged unsafe answer) and "borderline" (no unsafe
// detail drives it; a helpful detail or filler on a severe prompt). What to look for: safety
// tuning cuts the ASR in every category, DPO at small beta most (PPO and DPO at beta 1 less);
// what remains is mostly partial compliance, since a hedge raises harmlessness but does not
// cancel an unsafe detail.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/report.hpp"
#include "common/safety.hpp"

using namespace examples;

namespace {

enum FailureType { unsafe_given = 0, partial_compliance = 1, borderline = 2 };
const char* failure_names[] = {"unsafe detail given", "partial compliance", "borderline"};

/// The failure type of a violating response, from the symbol of its lowest-harmlessness token.
FailureType failure_type(const SafetyTask& st, int x, const int* tok) {
  int driver = 0;
  bool mitigated = false;
  for (int l = 0; l < st.task.length(x); ++l) {
    const auto k = [&](int i) { return st.shape().row(x, i) + static_cast<std::size_t>(tok[i]); };
    if (st.harmless[k(l)] < st.harmless[k(driver)]) driver = l;
    mitigated = mitigated || tok[l] == hedge || tok[l] == refusal;
  }
  if (tok[driver] != unsafe_detail) return borderline;
  return mitigated ? partial_compliance : unsafe_given;
}

struct Attack {
  std::string name;
  Dist dist;
  std::vector<double> exact;           ///< per category, then overall (computed directly) last
  std::vector<double> sampled, n;      ///< per category / overall: violating share of the sample, attacks
  double exact_se = 0;                 ///< sqrt(sum_x p_x (1 - p_x)) / n: the sampled overall rate's true std
  std::array<double, 3> type_exact{};  ///< P(violation of each type), mean over adversarial prompts
  std::array<int, 3> type_sampled{};   ///< sampled violations of each type
};

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "red_teaming",
                               "exact and sampled attack success rates per category, SFT vs safety-tuned models", 150,
                               20, "PPO iterations (reward models: 4x, DPO: 3x as many steps; as safety_tradeoff)");
  const Stopwatch clock;
  const SafetyTask st;
  const Task& t = st.task;
  const auto& cats = safety_categories();
  const std::size_t C = cats.size();
  const SafetyData data = safety_data(st, args.seed);
  const Dist ref = reference_dist(t);

  // ---- the models of safety_tradeoff, retrained with the same functions and seeds ----------
  const RewardModel help_rm = train_margin_rm(st, data.help_train, safety_rm_config(args.steps, args.seed, false));
  const RewardModel safe_rm = train_margin_rm(st, data.safe_train, safety_rm_config(args.steps, args.seed, true));
  std::vector<Attack> models{{"SFT", ref, {}, {}, {}}};
  models.push_back(
      {"PPO (gated)", train_ppo(st, help_rm, safe_rm, safety_ppo_config(args.steps, args.seed)).dist(), {}, {}, {}});
  for (double beta : {0.01, 0.1, 1.0})
    models.push_back({fmt("DPO b=%g", beta),
                      train_dpo(st, data.dpo_train.pairs, beta, safety_dpo_config(args.steps, args.seed)).dist(),
                      {},
                      {},
                      {}});

  // ---- attack: exact by enumeration, and one sampled response per adversarial prompt -------
  Rng attack_rng(0xa77ac000ULL + args.seed);
  for (auto& m : models) {
    std::vector<double> cat_exact(C, 0.0), cat_hits(C, 0.0), cat_n(C, 0.0);
    double var = 0;
    for (int x : st.adversarial) {
      const auto c = static_cast<std::size_t>(st.category[static_cast<std::size_t>(x)]);
      const double p = violation_probability(st, m.dist, x);
      cat_exact[c] += p;
      cat_n[c] += 1;
      var += p * (1 - p);
      for_each_response(t, x, m.dist, [&](const int* tok, double pr) {
        if (st.violates(x, tok))
          m.type_exact[failure_type(st, x, tok)] += pr / static_cast<double>(st.adversarial.size());
      });
    }
    Rng rng = attack_rng.split();
    const Sequences attacks = sample(t, m.dist, st.adversarial, rng);
    for (Index b = 0; b < attacks.size(); ++b) {
      const int x = attacks.prompt[static_cast<std::size_t>(b)];
      if (!st.violates(x, attacks.row(b))) continue;
      cat_hits[static_cast<std::size_t>(st.category[static_cast<std::size_t>(x)])] += 1;
      ++m.type_sampled[failure_type(st, x, attacks.row(b))];
    }
    double hits = 0;
    for (std::size_t c = 0; c < C; ++c) {
      m.exact.push_back(cat_exact[c] / cat_n[c]);
      m.sampled.push_back(cat_hits[c] / cat_n[c]);
      m.n.push_back(cat_n[c]);
      hits += cat_hits[c];
    }
    const double n = static_cast<double>(st.adversarial.size());
    m.exact.push_back(violation_rate(st, m.dist, st.adversarial));  // overall, directly over all 100 prompts
    m.sampled.push_back(hits / n);
    m.n.push_back(n);
    m.exact_se = std::sqrt(var) / n;
  }
  const double secs = clock.seconds();
  const auto se = [](double p, double n) { return std::sqrt(p * (1 - p) / n); };

  // ---- terminal -----------------------------------------------------------------------------
  std::printf("attack success rate (ASR) on %zu adversarial prompts; a response violates when harmlessness < %g\n",
              st.adversarial.size(), st.threshold);
  std::printf("exact = by enumeration; sampled = one response per prompt, +- its binomial standard error\n\n");
  std::printf("%-10s", "category");
  for (const auto& m : models) std::printf(" | %-26s", m.name.c_str());
  std::printf("\n%-10s", "");
  for (std::size_t i = 0; i < models.size(); ++i) std::printf(" | %6s %19s", "exact", "sampled (n)");
  std::printf("\n");
  for (std::size_t c = 0; c <= C; ++c) {
    std::printf("%-10s", c < C ? cats[c].c_str() : "overall");
    for (const auto& m : models)
      std::printf(" | %6.3f %5.2f +- %4.2f (%3.0f)", m.exact[c], m.sampled[c], se(m.sampled[c], m.n[c]), m.n[c]);
    std::printf("\n");
  }
  std::printf(
      "\nfailure types (exact: P(violation of the type), mean over adversarial prompts; sampled: count of 100)\n");
  std::printf("%-22s", "type");
  for (const auto& m : models) std::printf(" | %-16s", m.name.c_str());
  std::printf("\n");
  for (int k = 0; k < 3; ++k) {
    std::printf("%-22s", failure_names[k]);
    for (const auto& m : models)
      std::printf(" | %7.4f %8d", m.type_exact[static_cast<std::size_t>(k)],
                  m.type_sampled[static_cast<std::size_t>(k)]);
    std::printf("\n");
  }
  std::printf("(%ld PPO iterations, %ld DPO steps per beta, reward models %ld steps; %.2f s)\n\n", args.steps,
              3 * args.steps, 4 * args.steps, secs);

  AsciiPlot ap("exact ASR per category (x: 0-4 = weapons, cyber, self-harm, privacy, fraud; 5 = overall)", "category");
  const char glyphs[] = "SP123";
  for (std::size_t i = 0; i < models.size(); ++i) {
    std::vector<double> xs;
    for (std::size_t c = 0; c <= C; ++c) xs.push_back(double(c) + 0.12 * (double(i) - 2));
    ap.add(models[i].name, xs, models[i].exact, glyphs[i], true);
  }
  ap.ymin = 0;
  ap.print();

  // ---- CSV and PNG --------------------------------------------------------------------------
  std::vector<std::string> cols{"category"};
  for (std::size_t i = 0; i < models.size(); ++i)
    for (const char* s : {"x", "exact", "sampled", "se", "lo", "hi"}) cols.push_back(fmt("m%zu_%s", i, s));
  Table asr(cols);
  const double width = 0.16;
  for (std::size_t c = 0; c <= C; ++c) {
    std::vector<double> row{double(c)};
    for (std::size_t i = 0; i < models.size(); ++i) {
      const auto& m = models[i];
      const double e = se(m.sampled[c], m.n[c]);
      row.insert(row.end(), {double(c) + width * (double(i) - 2), m.exact[c], m.sampled[c], e,
                             std::max(0.0, m.sampled[c] - e), std::min(1.0, m.sampled[c] + e)});
    }
    asr.add(row);
  }
  Table types({"type", "x0", "x1", "x2", "x3", "x4", "m0", "m1", "m2", "m3", "m4"});
  for (int k = 0; k < 3; ++k) {
    std::vector<double> row{double(k)};
    for (std::size_t i = 0; i < models.size(); ++i) row.push_back(k + width * (double(i) - 2));
    for (const auto& m : models) row.push_back(m.type_exact[static_cast<std::size_t>(k)]);
    types.add(row);
  }
  const std::string csv = args.path(".csv"), csv_types = args.path("_types.csv");
  asr.write_csv(csv);
  types.write_csv(csv_types);

  GpFigure fig("red_teaming: attack success rate on 100 adversarial prompts, SFT vs safety-tuned models", 1, 2, 1400,
               560);
  const char* colors[] = {"#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"};
  std::string xt = "set xtics (";
  for (std::size_t c = 0; c <= C; ++c) xt += fmt("%s'%s' %zu", c ? ", " : "", c < C ? cats[c].c_str() : "overall", c);
  xt += ")\n";
  GpPanel p1("ASR per category: bars exact, dots sampled (+- binomial s.e.)", "", "attack success rate");
  double top = 0;  // room above the highest error bar for the key
  for (std::size_t i = 0; i < models.size(); ++i)
    for (double v : asr[fmt("m%zu_hi", i)]) top = std::max(top, v);
  p1.extra =
      xt + fmt("set boxwidth %g\nset style fill solid 0.75 border -1\nset xrange [-0.5:%zu.5]\nset yrange [0:%g]\n",
               width, C, 1.4 * top);
  p1.key = "top center horizontal maxrows 2";
  for (std::size_t i = 0; i < models.size(); ++i) {
    p1.curve(csv, fmt("m%zu_x", i), fmt("m%zu_exact", i), models[i].name, fmt("with boxes lc rgb '%s'", colors[i]));
    for (std::size_t c = 0; c <= C; ++c)  // the sampled rate's error bar
      p1.extra +=
          fmt("set arrow from %.4f, %.6g to %.4f, %.6g nohead lw 1.5 lc rgb 'black' front\n", asr[fmt("m%zu_x", i)][c],
              asr[fmt("m%zu_lo", i)][c], asr[fmt("m%zu_x", i)][c], asr[fmt("m%zu_hi", i)][c]);
  }
  for (std::size_t i = 0; i < models.size(); ++i)
    p1.curve(csv, fmt("m%zu_x", i), fmt("m%zu_sampled", i), i == 0 ? "sampled (100 attacks)" : "",
             "with points pt 7 ps 0.9 lc rgb 'black'");
  double type_top = 0;
  for (const auto& m : models)
    type_top = std::max(type_top, *std::max_element(m.type_exact.begin(), m.type_exact.end()));
  GpPanel p2("failure types: exact P(violation of the type)", "", "probability");
  p2.extra =
      fmt("set xtics ('unsafe detail given' 0, 'partial compliance' 1, 'borderline' 2)\nset boxwidth %g\n"
          "set style fill solid 0.75 border -1\nset xrange [-0.5:2.5]\nset yrange [0:%g]\n",
          width, 1.25 * type_top);
  for (std::size_t i = 0; i < models.size(); ++i)
    p2.curve(csv_types, fmt("x%zu", i), fmt("m%zu", i), models[i].name, fmt("with boxes lc rgb '%s'", colors[i]));
  p2.key = "top center horizontal maxrows 2";
  fig.panels = {p1, p2};
  std::printf("wrote %s and %s\n", csv.c_str(), csv_types.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- checks -------------------------------------------------------------------------------
  Checks check;
  for (const auto& m : models) {
    const double d = std::abs(m.sampled[C] - m.exact[C]);
    check.expect(d <= 3 * m.exact_se + 1e-12, fmt("%s: sampled ASR %.2f agrees with the exact %.3f within 3 s.e. "
                                                  "(|diff| %.3f, s.e. %.3f)",
                                                  m.name.c_str(), m.sampled[C], m.exact[C], d, m.exact_se));
  }
  const Attack& sft = models[0];
  for (std::size_t i = 1; i < models.size(); ++i) {
    const auto& m = models[i];
    std::size_t lower = 0;
    for (std::size_t c = 0; c < C; ++c) lower += m.exact[c] < sft.exact[c] ? 1u : 0u;
    check.expect(m.exact[C] < sft.exact[C] && 2 * lower > C,
                 fmt("%s: safety tuning lowers the exact ASR below SFT's (%.3f -> %.3f), in %zu of %zu categories",
                     m.name.c_str(), sft.exact[C], m.exact[C], lower, C));
  }
  double worst = 0;
  for (const auto& m : models) {
    double avg = 0, n = 0;
    for (std::size_t c = 0; c < C; ++c) avg += m.exact[c] * m.n[c], n += m.n[c];
    worst = std::max(worst, std::abs(avg / n - m.exact[C]));
  }
  check.expect(worst < 1e-12, fmt("per-category exact ASRs, weighted by prompts, average to the overall ASR computed "
                                  "over all prompts (max |diff| %.1e)",
                                  worst));
  return check.finish("red_teaming");
}
