// dpo_vs_sft: DPO against the two baselines every DPO paper reports — the SFT model it starts
// from, and "SFT on the chosen responses" (supervised fine-tuning on the preferred half of the
// same pairs) — judged by an exact win rate, plus DPO's best-known oddity: the likelihood of the
// chosen responses falls during training.
//
// Data: standard_experiment (task.hpp): 1000 pairs sampled from the SFT model pi_ref and labelled
// by Bradley-Terry on the hidden true reward r. Both learners start from pi_ref and see the same
// minibatches (64 pairs a step) with the same Adam:
//   SFT-chosen  min  -sum_tokens log pi(y_c) / #tokens          (prefloss::nll, TRL's token mean)
//   DPO         min  -log sigmoid(beta [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))])
// with beta = 0.1 and sequence log-probs (masked sums). Everything measured is exact:
//   win(A, B) = P(r(x, yA) > r(x, yB)) + 1/2 P(tie), yA ~ A, yB ~ B, by enumerating every response
//   (judge.hpp); E_pi[r]; KL(pi || pi_ref); and the closed-form optimum pi* ~ pi_ref exp(r / beta)
//   as the ceiling of DPO's objective. SFT-chosen has an exact target too: it is a maximum-
//   likelihood fit of a per-position softmax, so it converges to the per-position frequencies of
//   the chosen tokens in the 1000 pairs.
//
// What to look for:
// - Both learners beat SFT, and DPO beats SFT-chosen by far. SFT-chosen can only copy the chosen
//   half of samples from pi_ref, which differ from the rejected half by a mild tilt (a label is
//   barely better than a coin flip when two responses' rewards are close), so it stays close
//   to pi_ref; DPO learns from the contrast between the two halves and moves toward pi*.
// - The degenerate case happens in the default run (every seed tried, 1 to 10), so no special
//   data is needed: during DPO the mean log pi(y_c) over the training pairs rises for a few steps,
//   then falls far below its start, while log pi(y_r) falls faster, so the margin rises while
//   the data gets less likely. The closed form says why. With beta = 0.1 the optimum
//   pi* ~ pi_ref exp(r / beta) multiplies a response's probability by exp(10 r): the mass goes
//   to the few highest-reward responses. A chosen response is only better than its partner,
//   mostly not among the best, so on average pi* gives it less probability than pi_ref did (the
//   mean log pi*(y_c) over the pairs is printed and checked: far below SFT's). DPO heads for pi*,
//   so the likelihood of its own chosen data must fall. The mechanism in the gradient: on a row
//   of logits of a per-position softmax, DPO's descent direction is
//   sum_pairs w (onehot(chosen token) - onehot(rejected token)), w = beta sigmoid(-z) (the
//   softmax terms cancel between the two sides), so a token gains if it wins more often than it
//   loses, and nothing in the loss keeps the policy near the data. Yet the win rate rises the
//   whole time: the likelihood of the data is not the quality of the policy. SFT-chosen is the
//   contrast: its chosen log-likelihood rises, as maximum likelihood's must.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/judge.hpp"
#include "common/optim.hpp"
#include "common/policy.hpp"
#include "common/report.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

constexpr double kBeta = 0.1;  // DPO's beta (TRL's default)
constexpr double kLr = 0.05;   // Adam on the logits, both learners
constexpr Index kBatch = 64;   // pairs a step, both learners

// ---- the two training steps: the lesson ------------------------------------------------------

/// One step of SFT on the chosen responses. Returns the batch loss.
double sft_chosen_step(const Pairs& batch, TabularPolicy& policy, Adam& adam, std::vector<float>& grad) {
  // log pi(y_l | x, y_<l) per chosen token, through the policy's log-softmax.
  Tokens lp;
  policy.token_logp(batch.chosen, lp);
  // L = -sum_{tokens} log pi / N_tokens: nll of the sequence sums, divided by the number of valid
  // tokens (torch's token-mean cross-entropy, TRL's SFT loss). The sum, not masked_mean: every
  // token weighs the same, which makes this the maximum-likelihood fit of the chosen tokens; a
  // per-sequence mean would give the tokens of short responses more weight than long ones'.
  pl::NllOptions opt;
  opt.normalizer = pl::token_counts(batch.chosen.mask).weight;
  const auto r = pl::nll(pl::masked_sum(lp, batch.chosen.mask), opt);
  // dL/d log pi per token (-1/N_tokens at every valid token), then the chain rule to the logits.
  Tokens g(lp.dimensions());
  r.backward(g);
  std::fill(grad.begin(), grad.end(), 0.0f);
  policy.backward(batch.chosen, g, grad);
  adam.step(policy.logits, grad);
  return r.loss;
}

/// One DPO step. Returns the batch loss.
double dpo_step(const Pairs& batch, TabularPolicy& policy, const TabularPolicy& ref, Adam& adam,
                std::vector<float>& grad) {
  // Sequence log-probs s = sum_l log pi(y_l | x): the policy's, and the frozen reference's
  // (constants to prefloss: DPO differentiates the policy side only).
  const auto lp = policy.token_logp(batch), rp = ref.token_logp(batch);
  const Mask &mc = batch.chosen.mask, &mr = batch.rejected.mask;
  // DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta [(s_c - rho_c) - (s_r - rho_r)]), mean
  // over the pairs; masked sums, as in the paper and TRL.
  pl::DpoOptions opt;
  opt.beta = kBeta;
  const auto r = pl::dpo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr), pl::masked_sum(rp.chosen, mc),
                         pl::masked_sum(rp.rejected, mr), opt);
  // dL/ds spread to every token of each response (-beta sigmoid(-z) / B on the chosen side,
  // +beta sigmoid(-z) / B on the rejected: r.backward), then the chain rule through the log-softmax.
  std::fill(grad.begin(), grad.end(), 0.0f);
  policy.backward(batch, r, grad);
  adam.step(policy.logits, grad);
  return r.loss;
}

// ---- evaluation (everything exact, or over the whole training set) ---------------------------

/// Mean sequence log-prob sum_l log pi(y_l | x) over a set of responses.
double mean_logp(const TabularPolicy& p, const Sequences& s) {
  Tokens lp;
  p.token_logp(s, lp);
  const Seq v = pl::masked_sum(lp, s.mask).eval();
  double total = 0;
  for (Index b = 0; b < v.dimension(0); ++b) total += v(b);
  return total / static_cast<double>(v.dimension(0));
}

/// DPO's and SFT-chosen's losses on all 1000 training pairs (the learning curves).
struct FullLosses {
  double dpo, sft;
};
FullLosses full_losses(const Pairs& train, const TabularPolicy& p, const TabularPolicy& ref) {
  Tokens lc, lr, ref_lc, ref_lr;
  p.token_logp(train.chosen, lc);
  p.token_logp(train.rejected, lr);
  ref.token_logp(train.chosen, ref_lc);
  ref.token_logp(train.rejected, ref_lr);
  pl::DpoOptions dopt;
  dopt.beta = kBeta;
  pl::NllOptions nopt;
  nopt.normalizer = pl::token_counts(train.chosen.mask).weight;
  return {pl::dpo(pl::masked_sum(lc, train.chosen.mask), pl::masked_sum(lr, train.rejected.mask),
                  pl::masked_sum(ref_lc, train.chosen.mask), pl::masked_sum(ref_lr, train.rejected.mask), dopt)
              .loss,
          pl::nll(pl::masked_sum(lc, train.chosen.mask), nopt).loss};
}

/// The maximum-likelihood solution of SFT-chosen on the whole training set: each row (x, l) of
/// the table is the frequency of the chosen tokens there.
Dist chosen_frequencies(const Task& t, const Pairs& train) {
  std::vector<double> count(t.shape.size(), 0.0), logits(t.shape.size());
  for (Index b = 0; b < train.size(); ++b) {
    const int x = train.chosen.prompt[static_cast<std::size_t>(b)];
    for (int l = 0; l < t.length(x); ++l)
      count[t.shape.row(x, l) + static_cast<std::size_t>(train.chosen.tok(b, l))] += 1;
  }
  for (std::size_t k = 0; k < count.size(); ++k) logits[k] = count[k] > 0 ? std::log(count[k]) : -1e30;
  return dist_from_logits(t.shape, logits);
}

/// One learner's curves.
struct Curve {
  std::vector<double> win_sft, reward, kl_ref, logp_c, logp_r, margin;
  void add(const Task& t, const TabularPolicy& p, const Dist& ref_dist, const Pairs& train) {
    const Dist d = p.dist();
    win_sft.push_back(win_rate(t, d, ref_dist));
    reward.push_back(true_reward(t, d));
    kl_ref.push_back(kl(t, d, ref_dist));
    logp_c.push_back(mean_logp(p, train.chosen));
    logp_r.push_back(mean_logp(p, train.rejected));
    margin.push_back(logp_c.back() - logp_r.back());
  }
};

}  // namespace

int main(int argc, char** argv) {
  const Args args =
      parse_args(argc, argv, "dpo_vs_sft", "DPO vs SFT and SFT-on-chosen, judged by an exact win rate", 300, 60);
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;
  const TabularPolicy ref(t.shape, t.ref_logits);
  const Dist ref_dist = ref.dist(), opt = optimum(t, kBeta), freq = chosen_frequencies(t, e.train);
  // pi* as a table of logits (its log-probs), to score the training pairs under the optimum too.
  const TabularPolicy opt_policy(t.shape, std::vector<float>(opt.logp.begin(), opt.logp.end()));
  const double opt_lc = mean_logp(opt_policy, e.train.chosen), opt_lr = mean_logp(opt_policy, e.train.rejected);
  std::printf(
      "%s.\nbeta = %g. Exact references: the SFT model has E[r] = %.3f; the optimum pi* has E[r] = %.3f at\n"
      "KL(pi*||pi_ref) = %.3f and wins %.3f against SFT; SFT-chosen's maximum-likelihood solution (the\n"
      "chosen-token frequencies) has E[r] = %.3f and wins %.3f against SFT.\n\n",
      describe(e).c_str(), kBeta, true_reward(t, ref_dist), true_reward(t, opt), kl(t, opt, ref_dist),
      win_rate(t, opt, ref_dist), true_reward(t, freq), win_rate(t, freq, ref_dist));

  // ---- training: both learners from pi_ref, the same minibatches -----------------------------
  TabularPolicy dpo(t.shape, t.ref_logits), sftc(t.shape, t.ref_logits);
  Adam dpo_adam(kLr), sftc_adam(kLr);
  Batcher batches(e.train.size(), kBatch, args.seed);
  std::vector<float> grad(t.shape.size());
  const long every = args.quick ? 5 : 1;
  std::vector<double> steps, dpo_loss, sft_loss, dpo_batch, sft_batch, win_dpo_sftc, kl_freq;
  Curve cd, cs;
  const auto record = [&](long step, double bd, double bs) {
    steps.push_back(double(step));
    const FullLosses fd = full_losses(e.train, dpo, ref), fs = full_losses(e.train, sftc, ref);
    dpo_loss.push_back(fd.dpo);
    sft_loss.push_back(fs.sft);
    dpo_batch.push_back(bd);
    sft_batch.push_back(bs);
    cd.add(t, dpo, ref_dist, e.train);
    cs.add(t, sftc, ref_dist, e.train);
    win_dpo_sftc.push_back(win_rate(t, dpo.dist(), sftc.dist()));
    kl_freq.push_back(kl(t, freq, sftc.dist()));
  };
  record(0, NAN, NAN);
  for (long step = 1; step <= args.steps; ++step) {
    const Pairs batch = select(t, e.train, batches.next());
    const double bd = dpo_step(batch, dpo, ref, dpo_adam, grad);
    const double bs = sft_chosen_step(batch, sftc, sftc_adam, grad);
    if (step % every == 0 || step == args.steps) record(step, bd, bs);
  }
  const double secs = clock.seconds();

  // ---- final win-rate matrix -----------------------------------------------------------------
  const std::vector<std::string> names{"SFT", "SFT-chosen", "DPO", "pi* (optimum)"};
  const std::vector<Dist> dists{ref_dist, sftc.dist(), dpo.dist(), opt};
  const auto W = win_matrix(t, dists, t.score);

  // ---- CSV -----------------------------------------------------------------------------------
  Table table({"step",
               "dpo_loss",
               "dpo_batch_loss",
               "dpo_rel_loss",
               "sftc_loss",
               "sftc_batch_loss",
               "sftc_rel_loss",
               "dpo_win_vs_sft",
               "sftc_win_vs_sft",
               "dpo_win_vs_sftc",
               "opt_win_vs_sft",
               "dpo_true_reward",
               "sftc_true_reward",
               "sft_true_reward",
               "opt_true_reward",
               "dpo_kl_ref",
               "sftc_kl_ref",
               "opt_kl_ref",
               "dpo_logp_chosen",
               "dpo_logp_rejected",
               "dpo_margin",
               "sftc_logp_chosen",
               "sftc_logp_rejected",
               "sftc_margin",
               "sftc_kl_freq",
               "opt_logp_chosen",
               "opt_logp_rejected"});
  const double opt_win = W[3][0], sft_r = true_reward(t, ref_dist), opt_r = true_reward(t, opt),
               opt_kl = kl(t, opt, ref_dist);
  for (std::size_t i = 0; i < steps.size(); ++i)
    table.add({steps[i],
               dpo_loss[i],
               dpo_batch[i],
               dpo_loss[i] / dpo_loss[0],
               sft_loss[i],
               sft_batch[i],
               sft_loss[i] / sft_loss[0],
               cd.win_sft[i],
               cs.win_sft[i],
               win_dpo_sftc[i],
               opt_win,
               cd.reward[i],
               cs.reward[i],
               sft_r,
               opt_r,
               cd.kl_ref[i],
               cs.kl_ref[i],
               opt_kl,
               cd.logp_c[i],
               cd.logp_r[i],
               cd.margin[i],
               cs.logp_c[i],
               cs.logp_r[i],
               cs.margin[i],
               kl_freq[i],
               opt_lc,
               opt_lr});
  const std::string csv = args.path(".csv");
  table.write_csv(csv);

  // ---- terminal ------------------------------------------------------------------------------
  AsciiPlot pw("exact win rate against the SFT model (0.5 = no better)", "step");
  pw.hline("pi* (optimum)", opt_win, '=').hline("SFT itself", 0.5, '-');
  pw.add("DPO", steps, cd.win_sft, 'o').add("SFT-chosen", steps, cs.win_sft, 'x');
  pw.print();
  AsciiPlot pl_("mean sequence log-likelihood of the 1000 TRAINING pairs, sum_l log pi(y_l | x)", "step");
  pl_.hline("pi*: chosen", opt_lc, '=').hline("pi*: rejected", opt_lr, '-');
  pl_.add("DPO: chosen", steps, cd.logp_c, 'c').add("DPO: rejected", steps, cd.logp_r, 'r');
  pl_.add("SFT-chosen: chosen", steps, cs.logp_c, '+').add("SFT-chosen: rejected", steps, cs.logp_r, '.');
  pl_.height = 14;
  pl_.print();
  AsciiPlot pm("margin: mean log pi(chosen) - log pi(rejected) over the training pairs", "step");
  pm.add("DPO", steps, cd.margin, 'o').add("SFT-chosen", steps, cs.margin, 'x');
  pm.print();

  const std::size_t n = steps.size() - 1;
  std::printf("after %ld steps (%.2f s):\n", args.steps, secs);
  std::printf("%-14s %12s %12s %12s %16s %16s\n", "", "win vs SFT", "true E[r]", "KL(pi||ref)", "log pi(chosen)",
              "log pi(rejected)");
  const auto row = [&](const char* name, double w, double r, double k, double c, double rr) {
    std::printf("%-14s %12.4f %12.4f %12.4f %16.4f %16.4f\n", name, w, r, k, c, rr);
  };
  row("SFT", 0.5, sft_r, 0.0, cd.logp_c[0], cd.logp_r[0]);
  row("SFT-chosen", cs.win_sft[n], cs.reward[n], cs.kl_ref[n], cs.logp_c[n], cs.logp_r[n]);
  row("DPO", cd.win_sft[n], cd.reward[n], cd.kl_ref[n], cd.logp_c[n], cd.logp_r[n]);
  row("pi* (optimum)", opt_win, opt_r, opt_kl, opt_lc, opt_lr);
  std::printf("(log pi: mean over the 1000 training pairs; win rates, E[r] and KL exact)\n\n");

  std::printf("exact win rates at the end, win(row, column):\n%-14s", "");
  for (const auto& c : names) std::printf(" %14s", c.c_str());
  std::printf("\n");
  for (std::size_t i = 0; i < names.size(); ++i) {
    std::printf("%-14s", names[i].c_str());
    for (std::size_t j = 0; j < names.size(); ++j) std::printf(" %14.4f", W[i][j]);
    std::printf("\n");
  }
  const bool degenerate = cd.logp_c[n] < cd.logp_c[0] && cd.logp_r[n] < cd.logp_r[0] && cd.margin[n] > cd.margin[0];
  std::printf(
      "\nDPO vs SFT-chosen: DPO wins %.4f of the comparisons (measured, this seed).\n"
      "DPO's training data got %s likely: log pi(chosen) %.3f -> %.3f, log pi(rejected) %.3f -> %.3f,\n"
      "margin %.3f -> %.3f%s; its win rate against SFT went %.3f -> %.3f all the same.\n\n",
      W[2][1], cd.logp_c[n] < cd.logp_c[0] ? "less" : "more", cd.logp_c[0], cd.logp_c[n], cd.logp_r[0], cd.logp_r[n],
      cd.margin[0], cd.margin[n], degenerate ? " (both fell, the margin rose: the degenerate case)" : "", cd.win_sft[0],
      cd.win_sft[n]);

  // ---- PNG -----------------------------------------------------------------------------------
  GpFigure fig(fmt("dpo_vs_sft: DPO (beta = %g) vs SFT and SFT on the chosen responses, exact judge", kBeta), 2, 3,
               1380, 800);
  const std::string blue = "with lines lw 2 lc rgb '#1f77b4'", orange = "with lines lw 2 lc rgb '#ff7f0e'",
                    black = "with lines lw 2 dt 2 lc rgb 'black'", grey = "with lines lw 2 dt 3 lc rgb '#555555'";
  GpPanel p1("exact win rate against the SFT model", "step", "win rate");
  p1.curve(csv, "step", "dpo_win_vs_sft", "DPO", blue)
      .curve(csv, "step", "sftc_win_vs_sft", "SFT-chosen", orange)
      .curve(csv, "step", "dpo_win_vs_sftc", "DPO vs SFT-chosen", "with lines lw 2 dt 4 lc rgb '#2ca02c'")
      .curve(csv, "step", "opt_win_vs_sft", "pi* vs SFT", black);
  p1.key = "center right";
  GpPanel p2("true reward E_pi[r] (exact)", "step", "expected reward");
  p2.curve(csv, "step", "dpo_true_reward", "DPO", blue)
      .curve(csv, "step", "sftc_true_reward", "SFT-chosen", orange)
      .curve(csv, "step", "opt_true_reward", "pi* (optimum)", black)
      .curve(csv, "step", "sft_true_reward", "SFT", grey);
  p2.key = "center right";
  GpPanel p3("KL(pi || pi_ref) (exact)", "step", "nats");
  p3.curve(csv, "step", "dpo_kl_ref", "DPO", blue)
      .curve(csv, "step", "sftc_kl_ref", "SFT-chosen", orange)
      .curve(csv, "step", "opt_kl_ref", "pi* (optimum)", black);
  p3.key = "bottom right";
  GpPanel p4("training-pair log-likelihood (mean sequence log pi)", "step", "log pi");
  p4.curve(csv, "step", "dpo_logp_chosen", "DPO: chosen", blue)
      .curve(csv, "step", "dpo_logp_rejected", "DPO: rejected", "with lines lw 2 dt 2 lc rgb '#1f77b4'")
      .curve(csv, "step", "sftc_logp_chosen", "SFT-chosen: chosen", orange)
      .curve(csv, "step", "sftc_logp_rejected", "SFT-chosen: rejected", "with lines lw 2 dt 2 lc rgb '#ff7f0e'")
      .curve(csv, "step", "opt_logp_chosen", "pi*: chosen", black)
      .curve(csv, "step", "opt_logp_rejected", "pi*: rejected", "with lines lw 1 dt 3 lc rgb 'black'");
  // Room below the curves for the key.
  const double lo = std::min(opt_lr, *std::min_element(cd.logp_r.begin(), cd.logp_r.end())), hi = cd.logp_c[0];
  p4.key = "bottom right";
  p4.extra = fmt("set yrange [%.6g:*]", lo - 0.6 * (hi - lo));
  GpPanel p5("margin log pi(chosen) - log pi(rejected), training pairs", "step", "nats");
  p5.curve(csv, "step", "dpo_margin", "DPO", blue).curve(csv, "step", "sftc_margin", "SFT-chosen", orange);
  p5.key = "top left";
  GpPanel p6("training loss (all 1000 pairs) / its value at step 0", "step", "relative loss");
  p6.curve(csv, "step", "dpo_rel_loss", "DPO", blue).curve(csv, "step", "sftc_rel_loss", "SFT-chosen (nll)", orange);
  p6.key = "bottom left";
  fig.panels = {p1, p2, p3, p4, p5, p6};
  std::printf("wrote %s\n", csv.c_str());
  write_png(fig, args.path(".png"), args.path(".gp"));
  std::printf("\n");

  // ---- direction of learning -----------------------------------------------------------------
  Checks check;
  check.expect(cd.win_sft[n] > 0.5, fmt("DPO beats SFT under the exact judge (win rate %.4f)", cd.win_sft[n]));
  check.expect(cs.win_sft[n] > 0.5, fmt("SFT-chosen beats SFT under the exact judge (win rate %.4f)", cs.win_sft[n]));
  double asym = 0, diag = 0;
  for (std::size_t i = 0; i < W.size(); ++i) {
    diag = std::max(diag, std::abs(W[i][i] - 0.5));
    for (std::size_t j = 0; j < W.size(); ++j) asym = std::max(asym, std::abs(W[i][j] + W[j][i] - 1.0));
  }
  // The curves' win rates were computed one call at a time, not read from the matrix: the
  // other order, win(SFT, A), must be their complement.
  asym = std::max({asym, std::abs(cd.win_sft[n] + win_rate(t, ref_dist, dpo.dist()) - 1.0),
                   std::abs(cs.win_sft[n] + win_rate(t, ref_dist, sftc.dist()) - 1.0)});
  check.expect(
      asym < 1e-9 && diag < 1e-9,
      fmt("the judge is consistent: max |win(A,B) + win(B,A) - 1| = %.2g, max |win(A,A) - 1/2| = %.2g", asym, diag));
  check.expect(W[2][1] > 0.5, fmt("DPO beats SFT-chosen under the exact judge (win rate %.4f)", W[2][1]));
  check.expect(dpo_loss[n] < dpo_loss[0], fmt("DPO's training loss falls (%.4f -> %.4f)", dpo_loss[0], dpo_loss[n]));
  check.expect(degenerate, fmt("degenerate case: DPO lowers log pi of both the chosen (%.3f -> %.3f) and the rejected "
                               "(%.3f -> %.3f) training responses while the margin rises (%.3f -> %.3f)",
                               cd.logp_c[0], cd.logp_c[n], cd.logp_r[0], cd.logp_r[n], cd.margin[0], cd.margin[n]));
  check.expect(opt_lc < cd.logp_c[0] && opt_lr < cd.logp_r[0],
               fmt("the closed form predicts it: pi* gives the training responses less likelihood than SFT "
                   "(chosen %.3f < %.3f, rejected %.3f < %.3f)",
                   opt_lc, cd.logp_c[0], opt_lr, cd.logp_r[0]));
  check.expect(
      cd.reward[n] > sft_r && cd.reward[n] < opt_r,
      fmt("DPO's true reward rises from SFT's toward the optimum's (%.3f < %.3f < %.3f)", sft_r, cd.reward[n], opt_r));
  check.expect(sft_loss[n] < sft_loss[0] && cs.logp_c[n] > cs.logp_c[0],
               fmt("SFT-chosen raises the likelihood of the chosen responses (nll %.4f -> %.4f, log pi %.3f -> %.3f)",
                   sft_loss[0], sft_loss[n], cs.logp_c[0], cs.logp_c[n]));
  check.expect(kl_freq[n] < 0.5 * kl_freq[0],
               fmt("SFT-chosen approaches its maximum-likelihood solution, the chosen-token frequencies "
                   "(KL %.4f -> %.4f)",
                   kl_freq[0], kl_freq[n]));
  return check.finish("dpo_vs_sft");
}
