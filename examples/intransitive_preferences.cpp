// intransitive_preferences — preferences with a cycle (A over B, B over C, C over A, each with
// probability p) and what a Bradley-Terry reward model and DPO make of them: a BT model cannot
// represent a cycle, and DPO, whose implicit reward is a BT reward, inherits the blind spot.
//
// The data: three responses A, B, C to one prompt; N pairs, the pair type drawn uniformly, the
// label by examples::Rng. On the cycle the first response of (A,B), (B,C), (C,A) is chosen with
// probability p. The transitive control asks (A,B), (B,C), (A,C) with p, p and
// p_AC = sig(2 logit p) = p^2 / (p^2 + (1-p)^2): exactly what BT rewards r_A - r_B = r_B - r_C =
// logit p predict, so BT can represent it.
//
// The closed form. BT's population loss on the cycle is
//   L(r) = 1/3 sum_{(i,j) in cycle} [ -p log sig(r_i - r_j) - (1-p) log sig(r_j - r_i) ].
// The three differences d_AB + d_BC + d_CA = 0; L is convex and unchanged by the cyclic shift
// A -> B -> C -> A, so the average of a minimizer over its three shifts — equal rewards — is a
// minimizer: every predicted probability is 1/2 and the floor is log 2 = 0.6931, whatever p is.
// A model that could represent the data (a table of one probability per pair) would reach the
// labels' entropy H(p) = -p log p - (1-p) log(1-p) = 0.5004 at p = 0.8. The gap log 2 - H(p) is
// what BT cannot close. On the control BT reaches the entropy floor (2 H(p) + H(p_AC)) / 3.
//
// Finite N. At equal rewards every pair costs exactly log 2 whatever its label, so the empirical
// optimum L^ (computed here by Newton's method in double, r_C pinned to 0) is at or below log 2.
// How far below: at r = 0 a pair's score is (1/2 - y)(e_i - e_j) with (1/2 - y)^2 = 1/4 for
// either label, so the score's covariance equals the Hessian H = Laplacian(triangle) / 12 and
// N (log 2 - L^) -> chi^2_2 / 2, an Exp(1) variable: the sampling slack ln(1000) / N is passed
// with probability 1/1000. The fitted rewards have covariance H^+ / N = 4 P / N (P projects out
// the common shift), so a predicted probability sig(r_i - r_j) has standard deviation
// sqrt(1 / (2N)) around 1/2: near 1/2 means within 4 of them, sqrt(8 / N). On the control BT's
// two free reward differences fit three label frequencies whose truth BT can represent, so its
// optimum exceeds the labels' entropy only by chi^2_1 / (2N): under 10.83 / (2N) but with
// probability 1/1000.
//
// DPO. The implicit reward beta log(pi / pi_ref) enters DPO's loss exactly as a BT reward, and a
// softmax over three responses can realize any reward differences, so DPO's optimum on the data
// is pi^ ~ pi_ref exp(r^ / beta) with r^ the empirical BT optimum, and its loss floor is L^. On the
// population r^ = 0 and pi^ = pi_ref: the policy does not move. The sample's asymmetry, amplified
// by 1 / beta, leaves KL(pi^ || pi_ref) ~ Var_ref(r^) / (2 beta^2), of mean
// 2 (1 - sum pi_ref^2) / (N beta^2), exceeding 4 ln(1000) (1 - sum pi_ref^2) / (N beta^2) with
// probability at most ~1/1000. On the control pi^ puts nearly all mass on A (r^ / beta ~ 28 nats).
//
// Training: full batch (the curves are the exact training-set losses), Adam, 4 runs: BT from
// random rewards and DPO from pi = pi_ref, on each data set.
//
// What to look for: the cycle's BT loss stalls at log 2, far above H(p), while its predicted
// P(A>B), P(B>C), P(C>A) collapse to 1/2, not to p; the control's loss falls to its entropy
// floor and P(A>B) -> p. DPO on the cycle never leaves loss log 2 and moves only to the sample's
// pi^ (KL ~ 0.02 nats, shrinking as 1 / (N beta^2), toward no response in particular); on the
// control pi(A) -> 1 and KL -> log(1 / pi_ref(A)) = 1.61. The KL panel is on a log scale.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "common/optim.hpp"
#include "common/policy.hpp"
#include "common/report.hpp"
#include "common/rng.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

constexpr int kItems = 3;  // responses A, B, C = tokens 0, 1, 2
const char* const kItem[kItems] = {"A", "B", "C"};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double log_sig(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
double entropy(double q) { return q <= 0 || q >= 1 ? 0.0 : -q * std::log(q) - (1 - q) * std::log(1 - q); }

/// One kind of comparison: `first` is chosen over `second` with probability p_first.
struct PairType {
  int first, second;
  double p_first;
};

/// N labelled pairs over three responses, and their counts per pair type (what Newton reads).
struct Data {
  std::string name;
  std::vector<PairType> types;
  Pairs pairs;               ///< chosen / rejected: one token each
  std::vector<double> n, w;  ///< per type: pairs, and pairs where `first` was chosen
  Sequences responses;       ///< A, B, C once each: DPO's log-probs are computed per response
};

Data make_data(const Task& t, const std::string& name, const std::vector<PairType>& types, Index n_pairs, Rng rng) {
  Data d{name,
         types,
         {Sequences::empty(t, n_pairs), Sequences::empty(t, n_pairs)},
         std::vector<double>(types.size()),
         std::vector<double>(types.size()),
         Sequences::empty(t, kItems)};
  for (int y = 0; y < kItems; ++y) d.responses.set_prompt(t, y, 0), d.responses.tok(y, 0) = y;
  for (Index b = 0; b < n_pairs; ++b) {
    const int k = rng.below(static_cast<int>(types.size()));
    const PairType& ty = types[static_cast<std::size_t>(k)];
    const bool first_wins = rng.uniform() < ty.p_first;
    d.pairs.chosen.set_prompt(t, b, 0);
    d.pairs.rejected.set_prompt(t, b, 0);
    d.pairs.chosen.tok(b, 0) = first_wins ? ty.first : ty.second;
    d.pairs.rejected.tok(b, 0) = first_wins ? ty.second : ty.first;
    d.n[static_cast<std::size_t>(k)] += 1;
    d.w[static_cast<std::size_t>(k)] += first_wins ? 1 : 0;
  }
  return d;
}

/// The data's BT loss at rewards r, from the counts, in double.
double bt_count_loss(const Data& d, const std::array<double, kItems>& r) {
  double total = 0, pairs = 0;
  for (std::size_t k = 0; k < d.types.size(); ++k) {
    const double z = r[static_cast<std::size_t>(d.types[k].first)] - r[static_cast<std::size_t>(d.types[k].second)];
    total += -d.w[k] * log_sig(z) - (d.n[k] - d.w[k]) * log_sig(-z);
    pairs += d.n[k];
  }
  return total / pairs;
}

/// What a model with one free probability per pair type reaches: the labels' own entropy.
double table_floor(const Data& d) {
  double total = 0, pairs = 0;
  for (std::size_t k = 0; k < d.types.size(); ++k) total += d.n[k] * entropy(d.w[k] / d.n[k]), pairs += d.n[k];
  return total / pairs;
}

/// The empirical BT optimum by Newton's method on (r_A, r_B), r_C = 0: independent of prefloss
/// and of the training run.
struct Optimum {
  std::array<double, kItems> r{};
  double loss = 0;
};
Optimum bt_newton(const Data& d) {
  Optimum o;
  for (int it = 0; it < 100; ++it) {
    double g[2] = {0, 0}, h[2][2] = {{0, 0}, {0, 0}};
    for (std::size_t k = 0; k < d.types.size(); ++k) {
      const int i = d.types[k].first, j = d.types[k].second;
      const double s = sigmoid(o.r[static_cast<std::size_t>(i)] - o.r[static_cast<std::size_t>(j)]);
      const double gd = d.n[k] * s - d.w[k], hd = d.n[k] * s * (1 - s);  // d/dz and d2/dz2 of the loss sum
      const int ij[2] = {i, j};
      const double sign[2] = {1, -1};
      for (int a = 0; a < 2; ++a) {
        if (ij[a] == 2) continue;  // r_C is pinned
        g[ij[a]] += sign[a] * gd;
        for (int b = 0; b < 2; ++b)
          if (ij[b] != 2) h[ij[a]][ij[b]] += sign[a] * sign[b] * hd;
      }
    }
    const double det = h[0][0] * h[1][1] - h[0][1] * h[1][0];
    const double s0 = (h[1][1] * g[0] - h[0][1] * g[1]) / det, s1 = (h[0][0] * g[1] - h[1][0] * g[0]) / det;
    o.r[0] -= s0, o.r[1] -= s1;
    if (std::abs(s0) + std::abs(s1) < 1e-13) break;
  }
  o.loss = bt_count_loss(d, o.r);
  return o;
}

enum class Fit { bradley_terry, dpo };

/// The full-data loss, and its gradient into `grad` (rewards for BT, policy logits for DPO).
/// The one place prefloss is called.
double loss_and_grad(Fit fit, const Data& d, const std::vector<float>& rewards, const TabularPolicy& policy,
                     const TabularPolicy& ref, double beta, std::vector<float>& grad) {
  std::fill(grad.begin(), grad.end(), 0.0f);
  const Pairs& p = d.pairs;
  const Index n = p.size();
  if (fit == Fit::bradley_terry) {
    // The reward model: r(y) = rewards[y], one scalar per response, as [batch] tensors.
    Seq rc(n), rr(n), gc(n), gr(n);
    for (Index b = 0; b < n; ++b)
      rc(b) = rewards[std::size_t(p.chosen.tok(b, 0))], rr(b) = rewards[std::size_t(p.rejected.tok(b, 0))];
    // BT: L = mean_b -log sig(r(y_c) - r(y_r)), and d L / d r(y_c), d L / d r(y_r) per pair.
    const auto r = pl::bradley_terry(rc, rr);
    r.backward(gc, gr);
    // Chain rule to the table: each pair's gradient lands on the two responses it compares.
    for (Index b = 0; b < n; ++b)
      grad[std::size_t(p.chosen.tok(b, 0))] += gc(b), grad[std::size_t(p.rejected.tok(b, 0))] += gr(b);
    return r.loss;
  }
  // DPO: log pi(y) and log pi_ref(y) of the three responses by prefloss::token_logprobs (inside
  // token_logp), gathered into [batch] sequence log-probs of each pair's chosen and rejected.
  Tokens lp, ref_lp;
  policy.token_logp(d.responses, lp);
  ref.token_logp(d.responses, ref_lp);
  Seq sc(n), sr(n), ref_sc(n), ref_sr(n), gc(n), gr(n);
  for (Index b = 0; b < n; ++b) {
    const Index yc = p.chosen.tok(b, 0), yr = p.rejected.tok(b, 0);
    sc(b) = lp(yc, 0), sr(b) = lp(yr, 0), ref_sc(b) = ref_lp(yc, 0), ref_sr(b) = ref_lp(yr, 0);
  }
  // L = mean_b -log sig(beta [log pi/pi_ref (y_c) - log pi/pi_ref (y_r)]): BT on the implicit
  // reward beta log pi/pi_ref; d L / d log pi per pair.
  pl::DpoOptions opt;
  opt.beta = beta;
  const auto r = pl::dpo(sc, sr, ref_sc, ref_sr, opt);
  r.backward(gc, gr);
  // Chain rule: each pair's gradient lands on its two responses' log pi, then token_logprobs'
  // backward (inside TabularPolicy::backward) carries it through the log-softmax to the logits.
  Tokens g_lp(kItems, 1);
  g_lp.setZero();
  for (Index b = 0; b < n; ++b) g_lp(p.chosen.tok(b, 0), 0) += gc(b), g_lp(p.rejected.tok(b, 0), 0) += gr(b);
  policy.backward(d.responses, g_lp, grad);
  return r.loss;
}

/// What one run records at every step.
struct Curve {
  std::vector<double> loss;
  std::vector<std::array<double, kItems>> prob;  ///< BT: P(first > second) per pair type; DPO: pi(A), pi(B), pi(C)
  std::vector<double> kl;                        ///< DPO: KL(pi || pi_ref), exact
};

std::vector<double> col(const Curve& c, int k) {
  std::vector<double> v;
  for (const auto& q : c.prob) v.push_back(q[static_cast<std::size_t>(k)]);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args =
      parse_args(argc, argv, "intransitive_preferences",
                 "Bradley-Terry and DPO on cyclic (intransitive) preferences, against the closed form", 400, 100);
  const Stopwatch clock;
  const double p = 0.8, beta = 0.1, lr = 0.05;
  const Index n_pairs = 6000;

  // One prompt, one token over {A, B, C}: the policy is a softmax over the three responses. The
  // reference is set by hand and not uniform, so "does not move" means "stays at pi_ref", not
  // "goes to uniform".
  TaskConfig tc;
  tc.prompts = 1, tc.vocab = kItems, tc.min_len = 1, tc.max_len = 1;
  Task t(tc);
  const std::array<double, kItems> pi_ref{0.2, 0.3, 0.5};
  for (int y = 0; y < kItems; ++y) t.ref_logits[std::size_t(y)] = static_cast<float>(std::log(pi_ref[std::size_t(y)]));
  const Dist ref_dist = reference_dist(t);
  const TabularPolicy ref(t.shape, t.ref_logits);

  Rng rng(args.seed);
  const double p_ac = p * p / (p * p + (1 - p) * (1 - p));
  const std::vector<Data> data{make_data(t, "cycle", {{0, 1, p}, {1, 2, p}, {2, 0, p}}, n_pairs, rng.split()),
                               make_data(t, "control", {{0, 1, p}, {1, 2, p}, {0, 2, p_ac}}, n_pairs, rng.split())};
  std::vector<float> init(kItems);  // BT's rewards start away from the optimum, the same for both data sets
  for (auto& v : init) v = static_cast<float>(rng.normal());

  // ---- closed form and empirical optimum ------------------------------------------------------
  const double log2 = std::log(2.0), h_p = entropy(p);
  const double floor_control = (2 * h_p + entropy(p_ac)) / 3;
  const double slack = std::log(1000.0) / double(n_pairs);   // P(log 2 - L^ > slack) = 1/1000
  const double prob_tol = std::sqrt(8.0 / double(n_pairs));  // 4 sd of a fitted probability around 1/2
  double sum_sq = 0;
  for (double q : pi_ref) sum_sq += q * q;
  const double kl_mean = 2 * (1 - sum_sq) / (double(n_pairs) * beta * beta);
  const double kl_bound = 2 * std::log(1000.0) * kl_mean;
  std::vector<Optimum> emp;
  std::vector<Dist> pi_emp;
  for (const Data& d : data) {
    emp.push_back(bt_newton(d));
    pi_emp.push_back(optimum(t, beta, std::vector<double>(emp.back().r.begin(), emp.back().r.end())));
  }
  std::printf(
      "Three responses A, B, C; %ld pairs each data set, p = %.2f, DPO beta = %g, pi_ref = (%.1f, %.1f, %.1f).\n"
      "cycle: A>B, B>C, C>A each with p.   control: A>B, B>C with p, A>C with p_AC = %.4f (a BT model).\n"
      "closed form (population): BT on the cycle floors at log 2 = %.4f with every P = 1/2; the labels'\n"
      "entropy H(p) = %.4f is what a model able to represent the cycle reaches (gap %.4f).\n"
      "control: BT reaches the entropy (2 H(p) + H(p_AC)) / 3 = %.4f at r_A - r_B = r_B - r_C = logit p = %.4f.\n"
      "finite N: empirical optimum (Newton) of the cycle %.5f (log 2 - %.5f; slack ln(1000)/N = %.5f),\n"
      "of the control %.5f; DPO's empirical optimum on the cycle has KL(pi^ || pi_ref) = %.4f\n"
      "(sampling mean %.4f, 99.9%% bound %.4f).\n\n",
      long(n_pairs), p, beta, pi_ref[0], pi_ref[1], pi_ref[2], p_ac, log2, h_p, log2 - h_p, floor_control,
      std::log(p / (1 - p)), emp[0].loss, log2 - emp[0].loss, slack, emp[1].loss, kl(t, pi_emp[0], ref_dist), kl_mean,
      kl_bound);

  // ---- training: full batch, Adam ---------------------------------------------------------
  std::vector<Curve> bt(data.size()), dp(data.size());
  std::vector<Dist> pi_end;
  for (std::size_t s = 0; s < data.size(); ++s) {
    const Data& d = data[s];
    std::vector<float> rewards = init, grad(kItems);
    TabularPolicy policy(t.shape, t.ref_logits);  // DPO starts from the reference, as after SFT
    Adam adam_bt(lr), adam_dpo(lr);
    for (long step = 0; step <= args.steps; ++step) {
      bt[s].loss.push_back(loss_and_grad(Fit::bradley_terry, d, rewards, policy, ref, beta, grad));
      std::array<double, kItems> q{};
      for (std::size_t k = 0; k < d.types.size(); ++k)
        q[k] = sigmoid(double(rewards[std::size_t(d.types[k].first)]) - rewards[std::size_t(d.types[k].second)]);
      bt[s].prob.push_back(q);
      if (step < args.steps) adam_bt.step(rewards, grad);  // descend the BT loss on the rewards

      const Dist pi = policy.dist();
      dp[s].loss.push_back(loss_and_grad(Fit::dpo, d, rewards, policy, ref, beta, grad));
      dp[s].prob.push_back({pi.p[0], pi.p[1], pi.p[2]});
      dp[s].kl.push_back(kl(t, pi, ref_dist));
      if (step < args.steps) adam_dpo.step(policy.logits, grad);  // descend the DPO loss on the logits
    }
    pi_end.push_back(policy.dist());
  }
  const double secs = clock.seconds();

  // ---- CSV --------------------------------------------------------------------------------
  // Every curve a column; the closed-form and empirical-optimum values as constant columns, the
  // PNG's reference lines.
  const double kl_emp = kl(t, pi_emp[0], ref_dist);
  const std::vector<std::pair<std::string, double>> constants{{"log2", log2},
                                                              {"entropy_p", h_p},
                                                              {"control_floor", floor_control},
                                                              {"p", p},
                                                              {"half", 0.5},
                                                              {"cycle_emp_kl", kl_emp},
                                                              {"ref_pi_a", pi_ref[0]},
                                                              {"ref_pi_b", pi_ref[1]},
                                                              {"ref_pi_c", pi_ref[2]},
                                                              {"emp_pi_a", pi_emp[0].p[0]},
                                                              {"emp_pi_b", pi_emp[0].p[1]},
                                                              {"emp_pi_c", pi_emp[0].p[2]}};
  std::vector<std::string> names{"step"};
  for (const Data& d : data) {
    names.push_back("bt_" + d.name + "_loss");
    for (const PairType& ty : d.types)
      names.push_back(fmt("bt_%s_p_%c%c", d.name.c_str(), 'a' + ty.first, 'a' + ty.second));
  }
  for (const Data& d : data)
    for (const char* c : {"loss", "kl", "pi_a", "pi_b", "pi_c"}) names.push_back("dpo_" + d.name + "_" + c);
  for (const auto& c : constants) names.push_back(c.first);
  Table table(names);
  for (std::size_t i = 0; i < bt[0].loss.size(); ++i) {
    std::vector<double> row{double(i)};
    for (const Curve& c : bt) row.insert(row.end(), {c.loss[i], c.prob[i][0], c.prob[i][1], c.prob[i][2]});
    for (const Curve& c : dp) row.insert(row.end(), {c.loss[i], c.kl[i], c.prob[i][0], c.prob[i][1], c.prob[i][2]});
    for (const auto& c : constants) row.push_back(c.second);
    table.add(row);
  }
  const std::string csv = args.path(".csv");
  table.write_csv(csv);

  // ---- terminal ---------------------------------------------------------------------------
  const std::vector<double>& steps = table["step"];
  AsciiPlot lp("Bradley-Terry loss on the training pairs", "step");
  lp.hline("log 2 (BT's floor on the cycle)", log2, '-')
      .hline("H(p) (a model able to represent the cycle)", h_p, '=')
      .hline("control's entropy floor", floor_control, '.')
      .add("cycle", steps, bt[0].loss, 'o')
      .add("control", steps, bt[1].loss, 'x');
  lp.print();
  AsciiPlot pp("BT's predicted P(first > second)", "step");
  pp.ymin = 0, pp.ymax = 1;
  pp.hline("p (the labels)", p, '=')
      .hline("1/2", 0.5, '-')
      .add("cycle P(A>B)", steps, col(bt[0], 0), 'a')
      .add("cycle P(B>C)", steps, col(bt[0], 1), 'b')
      .add("cycle P(C>A)", steps, col(bt[0], 2), 'c')
      .add("control P(A>B)", steps, col(bt[1], 0), 'x');
  pp.print();
  AsciiPlot dl("DPO loss on the training pairs (beta = 0.1, from pi = pi_ref)", "step");
  dl.hline("log 2", log2, '-').add("cycle", steps, dp[0].loss, 'o').add("control", steps, dp[1].loss, 'x');
  dl.print();
  AsciiPlot dk("DPO: KL(pi || pi_ref), exact", "step");
  dk.hline("cycle's empirical optimum pi^", kl_emp, '=')
      .add("cycle", steps, dp[0].kl, 'o')
      .add("control", steps, dp[1].kl, 'x');
  dk.print();
  AsciiPlot da("DPO: pi(A)", "step");
  da.ymin = 0, da.ymax = 1;
  da.hline("pi_ref(A)", pi_ref[0], '-')
      .hline("cycle's pi^(A) = pi_ref exp(r^/beta) / Z", pi_emp[0].p[0], '=')
      .add("cycle", steps, col(dp[0], 0), 'o')
      .add("control", steps, col(dp[1], 0), 'x');
  da.print();

  std::printf("%-18s %17s %9s %9s %9s %23s\n", "Bradley-Terry", "loss", "optimum^", "floor", "entropy^",
              "P(1st>2nd) per type");
  for (std::size_t s = 0; s < data.size(); ++s) {
    const Data& d = data[s];
    std::string pair_names, trained, newton, freq;
    for (std::size_t k = 0; k < d.types.size(); ++k) {
      pair_names += fmt(" %s>%s", kItem[d.types[k].first], kItem[d.types[k].second]);
      trained += fmt(" %5.3f", bt[s].prob.back()[k]);
      const auto& r = emp[s].r;
      newton += fmt(" %5.3f", sigmoid(r[std::size_t(d.types[k].first)] - r[std::size_t(d.types[k].second)]));
      freq += fmt(" %5.3f", d.w[k] / d.n[k]);
    }
    std::printf("%-18s %7.4f -> %6.4f %9.5f %9.4f %9.4f %s\n", (d.name + " trained").c_str(), bt[s].loss.front(),
                bt[s].loss.back(), emp[s].loss, s == 0 ? log2 : floor_control, table_floor(d), trained.c_str());
    std::printf("%-18s %17s %9s %9s %9s %s\n", (d.name + " Newton").c_str(), "", "", "", "", newton.c_str());
    std::printf("%-18s %17s %9s %9s %9s %s   (%s)\n", (d.name + " labels").c_str(), "", "", "", "", freq.c_str(),
                pair_names.c_str() + 1);
  }
  std::printf(
      "(loss: step 0 -> end; optimum^: Newton on the sampled pairs; floor: population closed form;\n"
      " entropy^: the sampled labels' entropy, the loss of one free probability per pair type)\n");
  std::printf("\n%-18s %17s %9s %21s %21s %12s %12s\n", "DPO", "loss", "optimum^", "pi end (A, B, C)", "pi^ (A, B, C)",
              "KL(pi||ref)", "KL(pi^||ref)");
  for (std::size_t s = 0; s < data.size(); ++s) {
    const Dist &e = pi_end[s], &o = pi_emp[s];
    std::printf("%-18s %7.4f -> %6.4f %9.5f %6.3f %6.3f %6.3f  %6.3f %6.3f %6.3f  %12.4f %12.4f\n",
                data[s].name.c_str(), dp[s].loss.front(), dp[s].loss.back(), emp[s].loss, e.p[0], e.p[1], e.p[2],
                o.p[0], o.p[1], o.p[2], dp[s].kl.back(), kl(t, o, ref_dist));
  }
  std::printf("%-18s %17s %9s %6.3f %6.3f %6.3f\n", "pi_ref", "", "", pi_ref[0], pi_ref[1], pi_ref[2]);
  std::printf("(^ = from the sampled pairs; %ld full-batch Adam steps, lr %g, 4 runs, %.2f s)\n\n", args.steps, lr,
              secs);

  // ---- PNG --------------------------------------------------------------------------------
  GpFigure fig(fmt("intransitive_preferences: Bradley-Terry and DPO on a preference cycle (p = %.1f, %ld pairs)", p,
                   long(n_pairs)),
               2, 3, 1380, 800);
  const std::string blue = "lc rgb '#1f77b4'", orange = "lc rgb '#ff7f0e'", green = "lc rgb '#2ca02c'",
                    red = "lc rgb '#d62728'", ref_line = "with lines lw 2 dt 2 lc rgb 'black'",
                    ref_line2 = "with lines lw 2 dt 3 lc rgb '#555555'";
  // Reference lines first, so the curves that sit on them stay visible.
  GpPanel g1("BT loss on the training pairs", "step", "loss");
  g1.curve(csv, "step", "log2", "log 2", ref_line)
      .curve(csv, "step", "entropy_p", "H(p)", ref_line2)
      .curve(csv, "step", "control_floor", "control floor", "with lines lw 2 dt 3 " + red)
      .curve(csv, "step", "bt_cycle_loss", "cycle", "with lines lw 2 " + blue)
      .curve(csv, "step", "bt_control_loss", "control", "with lines lw 2 " + red);
  GpPanel g2("cycle: BT's predicted P(first > second)", "step", "probability");
  g2.curve(csv, "step", "p", "p (labels)", ref_line)
      .curve(csv, "step", "half", "1/2", ref_line2)
      .curve(csv, "step", "bt_cycle_p_ab", "P(A>B)", "with lines lw 2 " + blue)
      .curve(csv, "step", "bt_cycle_p_bc", "P(B>C)", "with lines lw 2 " + orange)
      .curve(csv, "step", "bt_cycle_p_ca", "P(C>A)", "with lines lw 2 " + green);
  g2.extra = "set yrange [0:1]";
  g2.key = "bottom right";
  GpPanel g3("control: BT's predicted P(first > second)", "step", "probability");
  g3.curve(csv, "step", "p", "p", ref_line)
      .curve(csv, "step", "bt_control_p_ab", "P(A>B)", "with lines lw 2 " + blue)
      .curve(csv, "step", "bt_control_p_bc", "P(B>C)", "with lines lw 2 " + orange)
      .curve(csv, "step", "bt_control_p_ac", "P(A>C)", "with lines lw 2 " + green);
  g3.extra = "set yrange [0:1]";
  g3.key = "bottom right";
  GpPanel g4("DPO loss (beta = 0.1, from pi_ref)", "step", "loss");
  g4.curve(csv, "step", "log2", "log 2", ref_line)
      .curve(csv, "step", "dpo_cycle_loss", "cycle", "with lines lw 2 " + blue)
      .curve(csv, "step", "dpo_control_loss", "control", "with lines lw 2 " + red);
  g4.key = "center right";
  GpPanel g5("DPO: KL(pi || pi_ref)", "step", "nats (log scale)");
  g5.curve(csv, "step", "cycle_emp_kl", "cycle's empirical optimum pi^", ref_line)
      .curve(csv, "step", "dpo_cycle_kl", "cycle", "with lines lw 2 " + blue)
      .curve(csv, "step", "dpo_control_kl", "control", "with lines lw 2 " + red);
  g5.logy = true;
  g5.extra = "set yrange [1e-4:5]";
  g5.key = "center right";
  GpPanel g6("DPO policy on the cycle: pi_ref (dotted), pi^ (dashed)", "step", "pi(y)");
  for (int y = 0; y < kItems; ++y) {
    const std::string c = y == 0 ? blue : (y == 1 ? orange : green), lower = std::string(1, char('a' + y));
    g6.curve(csv, "step", "ref_pi_" + lower, "", "with lines lw 2 dt 3 " + c)
        .curve(csv, "step", "emp_pi_" + lower, "", "with lines lw 1 dt 2 " + c)
        .curve(csv, "step", "dpo_cycle_pi_" + lower, fmt("pi(%s)", kItem[y]), "with lines lw 2 " + c);
  }
  g6.curve(csv, "step", "dpo_control_pi_a", "control pi(A)", "with lines lw 2 " + red);
  g6.extra = "set yrange [0:1]";
  g6.key = "center right";
  fig.panels = {g1, g2, g3, g4, g5, g6};
  std::printf("wrote %s\n", csv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- checks -----------------------------------------------------------------------------
  Checks check;
  const Curve &bc = bt[0], &bk = bt[1], &dc = dp[0], &dk2 = dp[1];
  double min_cycle = bc.loss[0];
  for (double v : bc.loss) min_cycle = std::min(min_cycle, v);
  check.expect(
      std::abs(bc.loss.back() - emp[0].loss) < 1e-4,
      fmt("cycle: BT's loss ends at the empirical optimum (%.6f vs Newton %.6f)", bc.loss.back(), emp[0].loss));
  check.expect(min_cycle >= log2 - slack && emp[0].loss >= log2 - slack,
               fmt("cycle: BT's loss never goes below log 2 - ln(1000)/N = %.5f (lowest %.5f, Newton %.5f)",
                   log2 - slack, min_cycle, emp[0].loss));
  check.expect(emp[0].loss - table_floor(data[0]) > 0.5 * (log2 - h_p),
               fmt("cycle: BT stays far above the labels' entropy (%.4f vs %.4f; population gap %.4f)", emp[0].loss,
                   table_floor(data[0]), log2 - h_p));
  bool near_half = true;
  std::string ps;
  for (int k = 0; k < 3; ++k) {
    const double q = bc.prob.back()[std::size_t(k)];
    near_half = near_half && std::abs(q - 0.5) < prob_tol && std::abs(q - p) > 0.2;
    ps += fmt("%s%.3f", k ? ", " : "", q);
  }
  check.expect(near_half, fmt("cycle: predicted P(A>B), P(B>C), P(C>A) = %s end within sqrt(8/N) = %.3f of 1/2, "
                              "far from p = %.1f",
                              ps.c_str(), prob_tol, p));
  check.expect(bk.loss.back() < log2 - 0.2 && bk.loss.back() - table_floor(data[1]) < 10.83 / (2.0 * double(n_pairs)),
               fmt("control: BT's loss falls well below log 2 to the labels' entropy (%.4f -> %.4f; entropy %.4f, "
                   "slack chi2_1(0.999)/2N = %.4f)",
                   bk.loss.front(), bk.loss.back(), table_floor(data[1]), 10.83 / (2.0 * double(n_pairs))));
  check.expect(bk.prob.back()[0] > 0.5 && std::abs(bk.prob.back()[0] - p) < 0.05,
               fmt("control: predicted P(A>B) = %.3f exceeds 1/2 (p = %.1f)", bk.prob.back()[0], p));
  check.expect(std::abs(dc.loss.back() - emp[0].loss) < 1e-4 && dc.loss.back() >= log2 - slack,
               fmt("cycle: DPO's loss stays at its floor, BT's empirical optimum (%.5f -> %.5f, Newton %.5f)",
                   dc.loss.front(), dc.loss.back(), emp[0].loss));
  check.expect(dc.kl.back() < kl_bound && std::abs(dc.kl.back() - kl_emp) < 0.1 * kl_emp + 1e-4,
               fmt("cycle: DPO's KL(pi || pi_ref) = %.4f is the empirical optimum's %.4f, under the 99.9%% bound "
                   "%.4f",
                   dc.kl.back(), kl_emp, kl_bound));
  check.expect(
      kl(t, pi_end[0], pi_emp[0]) < 1e-3,
      fmt("cycle: DPO converges to pi^ ~ pi_ref exp(r^/beta) (KL(pi || pi^) = %.2g)", kl(t, pi_end[0], pi_emp[0])));
  check.expect(dk2.prob.back()[0] > pi_ref[0] + 0.5 && dk2.kl.back() > 10 * dc.kl.back(),
               fmt("control: DPO moves toward A (pi(A) %.3f -> %.3f, KL %.3f)", dk2.prob.front()[0], dk2.prob.back()[0],
                   dk2.kl.back()));
  return check.finish("intransitive_preferences");
}
