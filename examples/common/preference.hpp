// Offline preference optimization on the task: a tabular policy trained from the reference on
// fixed preference pairs, with the loss and its token gradient from prefloss and the chain rule
// through the log-softmax to the logits (token_logprobs, policy.hpp). dpo_curves and beta_sweep use it.
#pragma once
#include <prefloss/prefloss.hpp>

#include <string>
#include <vector>

#include "optim.hpp"
#include "policy.hpp"
#include "task.hpp"

namespace examples {

enum class Method { dpo, ipo, kto, simpo };

inline const char* method_name(Method m) {
  switch (m) {
    case Method::dpo:
      return "DPO";
    case Method::ipo:
      return "IPO";
    case Method::kto:
      return "KTO";
    case Method::simpo:
      return "SimPO";
  }
  return "?";
}

struct PreferenceConfig {
  Method method = Method::dpo;
  double beta = 0.1;        ///< DPO, IPO, KTO: the loss's beta (their default 0.1)
  double simpo_beta = 2.0;  ///< SimPO's beta and gamma (its defaults; SimPO has no reference)
  double simpo_gamma = 0.5;
  long steps = 300;
  Index batch = 64;  ///< pairs per step (KTO: their 2 * batch completions)
  double lr = 0.05;  ///< Adam on the logits
  std::uint64_t seed = 1;
};

/// @brief The method's loss on a batch of pairs. With `grad`, also adds d loss / d logits to it:
/// prefloss's backward() gives d loss / d token log-prob, the policy chains it through the
/// log-softmax.
///
/// DPO and IPO take masked sums of token log-probs (IPO as OpenRLHF does; TRL feeds masked
/// means), SimPO masked means without a reference. KTO sees the pairs as unpaired completions —
/// chosen desirable, rejected undesirable, as TRL converts paired data — and estimates its
/// reference point from mismatched completions: each completion re-scored under the next
/// example's prompt, over the positions both responses have. Reference values are passed as
/// masked sums too (constants to prefloss), so at step 0 the policy's and the reference's
/// values are bit-identical.
inline double preference_loss(const Task& t, const PreferenceConfig& cfg, const Pairs& pairs, TabularPolicy& policy,
                              const TabularPolicy& ref, std::vector<float>* grad = nullptr) {
  if (cfg.method == Method::kto) {
    const Sequences seq = concat(t, pairs.chosen, pairs.rejected);
    const Index n = seq.size();
    Eigen::Tensor<std::uint8_t, 1> desirable(n);
    for (Index i = 0; i < n; ++i) desirable(i) = i < pairs.size() ? 1 : 0;
    Sequences kl_seq = Sequences::empty(t, n);  // completion of example i + 1 under prompt of example i
    for (Index i = 0; i < n; ++i) {
      const Index j = (i + 1) % n;
      const int x = seq.prompt[static_cast<std::size_t>(i)], xj = seq.prompt[static_cast<std::size_t>(j)];
      kl_seq.set_prompt(t, i, x);
      for (int l = 0; l < t.shape.L; ++l) {
        kl_seq.tok(i, l) = seq.tok(j, l);
        kl_seq.mask(i, l) = l < std::min(t.length(x), t.length(xj)) ? 1 : 0;
      }
    }
    Tokens lp, kl_lp, ref_lp, ref_kl_lp;
    policy.token_logp(seq, lp);
    policy.token_logp(kl_seq, kl_lp);
    ref.token_logp(seq, ref_lp);
    ref.token_logp(kl_seq, ref_kl_lp);
    pl::KtoOptions opt;
    opt.beta = cfg.beta;
    const auto r = pl::kto(pl::masked_sum(lp, seq.mask), pl::masked_sum(ref_lp, seq.mask), desirable,
                           pl::masked_sum(kl_lp, kl_seq.mask), pl::masked_sum(ref_kl_lp, kl_seq.mask), opt);
    if (grad) {
      Tokens g(lp.dimensions());
      r.backward(g);
      policy.backward(seq, g, *grad);
    }
    return r.loss;
  }

  Tokens lc, lr;
  policy.token_logp(pairs.chosen, lc);
  policy.token_logp(pairs.rejected, lr);
  const Mask& mc = pairs.chosen.mask;
  const Mask& mr = pairs.rejected.mask;
  const auto finish = [&](const auto& r) {
    if (grad) {
      Tokens gc(lc.dimensions()), gr(lr.dimensions());
      r.backward(gc, gr);
      policy.backward(pairs.chosen, gc, *grad);
      policy.backward(pairs.rejected, gr, *grad);
    }
    return static_cast<double>(r.loss);
  };
  if (cfg.method == Method::simpo) {
    pl::SimpoOptions opt;
    opt.beta = cfg.simpo_beta;
    opt.gamma = cfg.simpo_gamma;
    return finish(pl::simpo(pl::masked_mean(lc, mc), pl::masked_mean(lr, mr), opt));
  }
  Tokens ref_lc, ref_lr;
  ref.token_logp(pairs.chosen, ref_lc);
  ref.token_logp(pairs.rejected, ref_lr);
  const auto rc = pl::masked_sum(ref_lc, mc);
  const auto rr = pl::masked_sum(ref_lr, mr);
  if (cfg.method == Method::ipo) {
    pl::IpoOptions opt;
    opt.beta = cfg.beta;
    return finish(pl::ipo(pl::masked_sum(lc, mc), pl::masked_sum(lr, mr), rc, rr, opt));
  }
  pl::DpoOptions opt;
  opt.beta = cfg.beta;
  return finish(pl::dpo(pl::masked_sum(lc, mc), pl::masked_sum(lr, mr), rc, rr, opt));
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

inline Snapshot snapshot(long step, const Experiment& e, const PreferenceConfig& cfg, TabularPolicy& policy,
                         const TabularPolicy& ref, const Dist& ref_dist, const Dist& target, double metric_beta) {
  Snapshot s{};
  s.step = step;
  s.loss = preference_loss(e.task, cfg, e.train, policy, ref);
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

/// @brief Trains a policy from the reference on e.train with cfg.method (Adam on the logits);
/// returns a snapshot at step 0 and every `every` steps (and at the last step). `target` is the
/// optimum KL(pi || pi*) is measured against.
inline std::vector<Snapshot> train_preference(const Experiment& e, const PreferenceConfig& cfg, const Dist& target,
                                              double metric_beta, long every = 1) {
  const Task& t = e.task;
  const TabularPolicy ref(t.shape, t.ref_logits);
  const Dist ref_dist = ref.dist();
  TabularPolicy policy(t.shape, t.ref_logits);
  Adam adam(cfg.lr);
  Batcher batches(e.train.size(), cfg.batch, cfg.seed);
  std::vector<float> grad(t.shape.size());
  std::vector<Snapshot> out{snapshot(0, e, cfg, policy, ref, ref_dist, target, metric_beta)};
  for (long step = 1; step <= cfg.steps; ++step) {
    const Pairs pairs = select(t, e.train, batches.next());
    std::fill(grad.begin(), grad.end(), 0.0f);
    preference_loss(t, cfg, pairs, policy, ref, &grad);
    adam.step(policy.logits, grad);
    if (step % every == 0 || step == cfg.steps)
      out.push_back(snapshot(step, e, cfg, policy, ref, ref_dist, target, metric_beta));
  }
  return out;
}

}  // namespace examples
