// A Bradley-Terry reward model for the task: a per-token reward table w[x, l, v], so that
// r_w(x, y) = sum_{l < len} w[x, l, y_l] — the true reward's own form. It is trained with
// prefloss::bradley_terry on masked sums of per-token rewards; reward_model and ppo_rlhf use it.
#pragma once
#include <prefloss/prefloss.hpp>

#include <functional>
#include <limits>
#include <vector>

#include "optim.hpp"
#include "task.hpp"

namespace examples {

/// out[b, t] = table[prompt_b, t, tok[b, t]] at valid tokens and `pad` elsewhere.
inline void gather(const Shape& s, const float* table, const Sequences& seq, Tokens& out,
                   float pad = std::numeric_limits<float>::quiet_NaN()) {
  out = Tokens(seq.size(), s.L);
  float* o = out.data();
  const int* tok = seq.tok.data();
  const std::uint8_t* m = seq.mask.data();
  for (Index b = 0; b < seq.size(); ++b) {
    const int x = seq.prompt[static_cast<std::size_t>(b)];
    for (int t = 0; t < s.L; ++t, ++o, ++tok, ++m) *o = *m ? table[s.row(x, t) + static_cast<std::size_t>(*tok)] : pad;
  }
}

/// grad_table[prompt_b, t, tok[b, t]] += g[b, t] at valid tokens (the adjoint of gather).
inline void scatter_add(const Shape& s, const Sequences& seq, const Tokens& g, std::vector<float>& grad_table) {
  for (Index b = 0; b < seq.size(); ++b)
    for (int t = 0; t < s.L; ++t) {
      const Index k = b * s.L + t;
      if (seq.mask.data()[k])
        grad_table[s.row(seq.prompt[static_cast<std::size_t>(b)], t) + static_cast<std::size_t>(seq.tok.data()[k])] +=
            g.data()[k];
    }
}

struct RewardModel {
  Shape shape;
  std::vector<float> w;  ///< per-token rewards [X, L, V]

  /// Per-token rewards of a batch [batch, max_len] (NaN padding: the masked sum skips it).
  void token_rewards(const Sequences& s, Tokens& out) const { gather(shape, w.data(), s, out); }
  /// The table in double, for exact expectations (examples::expected) and optima.
  std::vector<double> table() const { return std::vector<double>(w.begin(), w.end()); }
};

struct RewardModelConfig {
  long steps = 300;
  Index batch = 64;
  double lr = 0.02;
  double weight_decay = 0.0;  ///< decoupled (AdamW) decay
  double l2 = 0.005;          ///< L2 penalty l2/2 * |w|^2 added to the loss (a Gaussian prior on w)
  double init_std = 0.01;     ///< small random init, as a network's head would have
  std::uint64_t seed = 1;
};

/// Bradley-Terry loss and accuracy of a reward model on pairs (forward only).
struct RewardEval {
  double loss, accuracy, margin;
};
inline RewardEval evaluate(const RewardModel& rm, const Pairs& p) {
  Tokens tc, tr;
  rm.token_rewards(p.chosen, tc);
  rm.token_rewards(p.rejected, tr);
  const auto r = pl::bradley_terry(pl::masked_sum(tc, p.chosen.mask), pl::masked_sum(tr, p.rejected.mask));
  return RewardEval{r.loss, r.metrics.reward_accuracy, r.metrics.reward_margin};
}

/// The true reward as a "reward model": its loss on labelled pairs is the best achievable.
inline RewardModel true_reward_model(const Task& t) {
  return RewardModel{t.shape, std::vector<float>(t.score.begin(), t.score.end())};
}

/// A reward model's loss on a batch of pairs; it adds d loss / d w (the table) to grad.
using RewardLoss = std::function<double(const RewardModel& rm, const Pairs& batch, std::vector<float>& grad)>;

/// The Bradley-Terry loss -log sigmoid(r_w(x, y_c) - r_w(x, y_r)), batch mean, over masked sums of
/// per-token rewards: what reward_model trains (it spells the step out in its own file), and
/// what ppo_rlhf and method_comparison reuse.
inline double bradley_terry_loss(const RewardModel& rm, const Pairs& b, std::vector<float>& grad) {
  Tokens tc, tr;
  rm.token_rewards(b.chosen, tc);
  rm.token_rewards(b.rejected, tr);
  const auto r = pl::bradley_terry(pl::masked_sum(tc, b.chosen.mask), pl::masked_sum(tr, b.rejected.mask));
  Tokens gc(tc.dimensions()), gr(tr.dimensions());
  r.backward(gc, gr);
  scatter_add(rm.shape, b.chosen, gc, grad);
  scatter_add(rm.shape, b.rejected, gr, grad);
  return r.loss;
}

/// Trains a reward model with Adam on minibatches of `train` by `loss` plus the L2 penalty;
/// calls on_step(step, rm, batch_loss) at step 0 (before training, batch_loss = NaN) and after
/// every step.
inline RewardModel train_reward_model(const Task& t, const Pairs& train, const RewardModelConfig& cfg,
                                      const RewardLoss& loss = bradley_terry_loss,
                                      const std::function<void(long, const RewardModel&, double)>& on_step = {}) {
  Rng rng(cfg.seed);
  RewardModel rm{t.shape, std::vector<float>(t.shape.size())};
  for (auto& v : rm.w) v = static_cast<float>(cfg.init_std * rng.normal());
  Adam adam(cfg.lr, cfg.weight_decay);
  Batcher batches(train.size(), cfg.batch, rng.next());
  std::vector<float> grad(t.shape.size());
  if (on_step) on_step(0, rm, std::numeric_limits<double>::quiet_NaN());
  for (long step = 1; step <= cfg.steps; ++step) {
    std::fill(grad.begin(), grad.end(), 0.0f);
    const double batch_loss = loss(rm, select(t, train, batches.next()), grad);
    for (std::size_t k = 0; k < grad.size(); ++k) grad[k] += static_cast<float>(cfg.l2 * rm.w[k]);
    adam.step(rm.w, grad);
    if (on_step) on_step(step, rm, batch_loss);
  }
  return rm;
}

}  // namespace examples
