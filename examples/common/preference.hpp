// Offline preference optimization on the task: a tabular policy trained from the reference on
// fixed preference pairs, by a loss the example defines in its own file (dpo_curves: DPO, IPO,
// KTO, SimPO; beta_sweep: DPO), and the exact quantities the curves show.
#pragma once
#include <prefloss/prefloss.hpp>

#include <functional>
#include <string>
#include <vector>

#include "optim.hpp"
#include "policy.hpp"
#include "task.hpp"

namespace examples {

struct PreferenceConfig {
  double beta = 0.1;  ///< DPO, IPO, KTO: the loss's beta (their default 0.1)
  long steps = 300;
  Index batch = 64;  ///< pairs per step (KTO: their 2 * batch completions)
  double lr = 0.05;  ///< Adam on the logits
  std::uint64_t seed = 1;
};

/// @brief A loss on a batch of pairs. With `grad`, it also adds d loss / d logits to it:
/// prefloss's backward() gives d loss / d token log-prob, the policy chains it through the
/// log-softmax (TabularPolicy::backward, backward_pairs).
using PreferenceLoss = std::function<double(const Pairs& pairs, const TabularPolicy& policy, const TabularPolicy& ref,
                                            std::vector<float>* grad)>;

/// KTO's view of paired data (as TRL converts it): chosen completions desirable, rejected
/// undesirable, and for its reference point each completion re-scored under the next
/// example's prompt, over the positions both responses have.
struct KtoBatch {
  Sequences completions, kl_completions;
  Eigen::Tensor<std::uint8_t, 1> desirable;
};
inline KtoBatch kto_batch(const Task& t, const Pairs& pairs) {
  KtoBatch k{concat(t, pairs.chosen, pairs.rejected), {}, {}};
  const Sequences& seq = k.completions;
  const Index n = seq.size();
  k.desirable = Eigen::Tensor<std::uint8_t, 1>(n);
  for (Index i = 0; i < n; ++i) k.desirable(i) = i < pairs.size() ? 1 : 0;
  k.kl_completions = Sequences::empty(t, n);  // completion of example i + 1 under prompt of example i
  for (Index i = 0; i < n; ++i) {
    const Index j = (i + 1) % n;
    const int x = seq.prompt[static_cast<std::size_t>(i)], xj = seq.prompt[static_cast<std::size_t>(j)];
    k.kl_completions.set_prompt(t, i, x);
    for (int l = 0; l < t.shape.L; ++l) {
      k.kl_completions.tok(i, l) = seq.tok(j, l);
      k.kl_completions.mask(i, l) = l < std::min(t.length(x), t.length(xj)) ? 1 : 0;
    }
  }
  return k;
}

/// What the curves show at one step. Everything but the loss is measured the same way for every
/// method: accuracy and margin are DPO's implicit-reward metrics (beta log pi/pi_ref, with
/// `metric_beta`) on held-out pairs ordered by the true reward; the rest are exact.
struct Snapshot {
  long step;
  double loss;         ///< the method's loss on the whole training set
  double accuracy;     ///< held-out: implicit reward orders the pair as the true reward does (strict)
  double margin;       ///< held-out: mean implicit-reward margin, better minus worse response
  double kl_ref;       ///< KL(pi || pi_ref), exact
  double true_reward;  ///< E_pi[r], exact
  double kl_opt;       ///< KL(pi || pi*), exact, pi* the closed-form optimum `target`
};

inline Snapshot snapshot(long step, const Experiment& e, const PreferenceLoss& loss, const TabularPolicy& policy,
                         const TabularPolicy& ref, const Dist& ref_dist, const Dist& target, double metric_beta) {
  Snapshot s{};
  s.step = step;
  s.loss = loss(e.train, policy, ref, nullptr);
  const Pairs& ho = e.heldout_truth;
  Tokens lc, lr, ref_lc, ref_lr;
  policy.token_logp(ho.chosen, lc);
  policy.token_logp(ho.rejected, lr);
  ref.token_logp(ho.chosen, ref_lc);
  ref.token_logp(ho.rejected, ref_lr);
  pl::DpoOptions mopt;
  mopt.beta = metric_beta;
  const auto m = pl::dpo(pl::masked_sum(lc, ho.chosen.mask), pl::masked_sum(lr, ho.rejected.mask),
                         pl::masked_sum(ref_lc, ho.chosen.mask), pl::masked_sum(ref_lr, ho.rejected.mask), mopt);
  s.accuracy = m.metrics.reward_accuracy;
  s.margin = m.metrics.reward_margin;
  const Dist d = policy.dist();
  s.kl_ref = kl(e.task, d, ref_dist);
  s.true_reward = true_reward(e.task, d);
  s.kl_opt = kl(e.task, d, target);
  return s;
}

/// @brief Trains a policy from the reference on e.train by `loss` (Adam on the logits); returns
/// a snapshot at step 0 and every `every` steps (and at the last step). `target` is the optimum
/// KL(pi || pi*) is measured against.
inline std::vector<Snapshot> train_preference(const Experiment& e, const PreferenceConfig& cfg,
                                              const PreferenceLoss& loss, const Dist& target, double metric_beta,
                                              long every = 1) {
  const Task& t = e.task;
  const TabularPolicy ref(t.shape, t.ref_logits);
  const Dist ref_dist = ref.dist();
  TabularPolicy policy(t.shape, t.ref_logits);
  Adam adam(cfg.lr);
  Batcher batches(e.train.size(), cfg.batch, cfg.seed);
  std::vector<float> grad(t.shape.size());
  std::vector<Snapshot> out{snapshot(0, e, loss, policy, ref, ref_dist, target, metric_beta)};
  for (long step = 1; step <= cfg.steps; ++step) {
    const Pairs pairs = select(t, e.train, batches.next());
    std::fill(grad.begin(), grad.end(), 0.0f);
    loss(pairs, policy, ref, &grad);
    adam.step(policy.logits, grad);
    if (step % every == 0 || step == cfg.steps)
      out.push_back(snapshot(step, e, loss, policy, ref, ref_dist, target, metric_beta));
  }
  return out;
}

}  // namespace examples
