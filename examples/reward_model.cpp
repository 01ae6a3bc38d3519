// reward_model: a Bradley-Terry reward model trained on 1000 synthetic preference pairs, with
// its loss curve and held-out pairwise accuracy against the true reward.
//
// The pairs are sampled from the reference policy and labelled by Bradley-Terry on the hidden
// true reward (examples/common/task.hpp), so two numbers bound what any reward model can do:
// the true reward's own loss on held-out labels (the noise floor) and 100% agreement with the
// true reward's ordering. Training: prefloss::bradley_terry over masked sums of per-token
// rewards, its token gradient scattered into the reward table, Adam.
#include <prefloss/prefloss.hpp>

#include <cstdio>

#include "common/report.hpp"
#include "common/reward_model.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

/// One batch of the Bradley-Terry loss (Bradley & Terry 1952; InstructGPT's reward-model loss):
/// -log sigmoid(r_w(x, y_c) - r_w(x, y_r)), the batch mean, with d loss / d w added to grad.
double bt_loss(const RewardModel& rm, const Pairs& b, std::vector<float>& grad) {
  Tokens tc, tr;
  rm.token_rewards(b.chosen, tc);  // w[x, l, y_l] at every valid token
  rm.token_rewards(b.rejected, tr);
  // r_w(x, y) = sum_l w[x, l, y_l]: masked sums, so the loss's backward reaches every token.
  const auto r = pl::bradley_terry(pl::masked_sum(tc, b.chosen.mask), pl::masked_sum(tr, b.rejected.mask));
  Tokens gc(tc.dimensions()), gr(tr.dimensions());
  r.backward(gc, gr);  // d loss / d token reward: -sigmoid(-(r_c - r_r)) / B at chosen tokens, the opposite at rejected
  scatter_add(rm.shape, b.chosen, gc, grad);  // the adjoint of the gather: back into the table
  scatter_add(rm.shape, b.rejected, gr, grad);
  return r.loss;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "reward_model", "Bradley-Terry reward model on synthetic preference pairs",
                               RewardModelConfig{}.steps, 80);
  const Stopwatch clock;
  const Experiment e = standard_experiment(args.seed);
  const Task& t = e.task;

  const RewardModel truth = true_reward_model(t);
  const RewardEval best = evaluate(truth, e.heldout);
  std::printf(
      "%s.\nThe true reward itself scores a held-out loss of %.4f and agrees with %.1f%% of the held-out\n"
      "labels: no reward model can do better on these labels.\n\n",
      describe(e).c_str(), best.loss, 100 * best.accuracy);

  Table log({"step", "batch_loss", "train_loss", "heldout_loss", "heldout_accuracy", "heldout_label_accuracy",
             "true_reward_heldout_loss", "true_reward_label_accuracy"});
  RewardModelConfig cfg;
  cfg.steps = args.steps;
  cfg.seed = args.seed;
  const long every = args.quick ? 4 : 1;  // evaluation is most of the cost: thin it in smoke tests
  train_reward_model(t, e.train, cfg, bt_loss, [&](long step, const RewardModel& rm, double batch_loss) {
    if (step % every != 0 && step != cfg.steps) return;
    const RewardEval tr = evaluate(rm, e.train), ho = evaluate(rm, e.heldout), acc = evaluate(rm, e.heldout_truth);
    log.add({double(step), std::isnan(batch_loss) ? tr.loss : batch_loss, tr.loss, ho.loss, acc.accuracy, ho.accuracy,
             best.loss, best.accuracy});
  });
  const double secs = clock.seconds();

  const auto& step = log["step"];
  AsciiPlot loss("Bradley-Terry loss", "step");
  loss.hline("true reward's held-out loss (floor)", best.loss, '.')
      .add("train (1000 pairs)", step, log["train_loss"], 'o')
      .add("held-out (2000 pairs)", step, log["heldout_loss"], 'x');
  loss.print();
  AsciiPlot acc("held-out pairwise accuracy", "step");
  acc.hline("true reward on the labels", best.accuracy, '.')
      .add("ordering agrees with the true reward", step, log["heldout_accuracy"], 'o')
      .add("agrees with the noisy labels", step, log["heldout_label_accuracy"], 'x');
  acc.print();

  log.write_csv(args.path(".csv"));
  std::printf("wrote %s\n", args.path(".csv").c_str());
  const std::string csv = args.path(".csv");
  GpFigure fig("reward_model: Bradley-Terry reward model on 1000 synthetic pairs", 1, 2, 1200, 450);
  GpPanel lp("Bradley-Terry loss", "step", "loss");
  lp.curve(csv, "step", "batch_loss", "minibatch", "with lines lw 1 lc rgb '#bbbbbb'")
      .curve(csv, "step", "train_loss", "train (1000 pairs)", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(csv, "step", "heldout_loss", "held-out (2000 pairs)", "with lines lw 2 lc rgb '#d62728'")
      .curve(csv, "step", "true_reward_heldout_loss", "true reward (noise floor)",
             "with lines lw 2 dt 2 lc rgb 'black'");
  GpPanel ap("held-out pairwise accuracy", "step", "accuracy");
  ap.curve(csv, "step", "heldout_accuracy", "vs true-reward order", "with lines lw 2 lc rgb '#1f77b4'")
      .curve(csv, "step", "heldout_label_accuracy", "vs noisy labels", "with lines lw 2 lc rgb '#d62728'")
      .curve(csv, "step", "true_reward_label_accuracy", "true reward vs labels", "with lines lw 2 dt 2 lc rgb 'black'");
  ap.key = "bottom right";
  fig.panels = {lp, ap};
  write_png(fig, args.path(".png"), args.path(".gp"));

  const std::size_t n = log.rows() - 1;
  const double acc0 = log["heldout_accuracy"][0], acc1 = log["heldout_accuracy"][n];
  std::printf(
      "\nafter %ld steps (%.2f s): train loss %.4f -> %.4f, held-out loss %.4f -> %.4f\n(floor %.4f), "
      "held-out accuracy vs true order %.3f -> %.3f, vs labels %.3f (true reward: %.3f)\n\n",
      args.steps, secs, log["train_loss"][0], log["train_loss"][n], log["heldout_loss"][0], log["heldout_loss"][n],
      best.loss, acc0, acc1, log["heldout_label_accuracy"][n], best.accuracy);
  Checks check;
  check.expect(log["train_loss"][n] < log["train_loss"][0],
               fmt("training loss falls (%.4f -> %.4f)", log["train_loss"][0], log["train_loss"][n]));
  check.expect(log["heldout_loss"][n] < log["heldout_loss"][0],
               fmt("held-out loss falls (%.4f -> %.4f)", log["heldout_loss"][0], log["heldout_loss"][n]));
  check.expect(acc1 > acc0 && acc1 > 0.6,
               fmt("held-out accuracy against the true reward rises above chance (%.3f -> %.3f)", acc0, acc1));
  check.expect(log["heldout_loss"][n] >= best.loss - 0.02,
               fmt("no reward model beats the true reward on held-out labels (%.4f vs %.4f)", log["heldout_loss"][n],
                   best.loss));
  return check.finish("reward_model");
}
