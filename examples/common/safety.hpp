// A safety task with two hidden rewards, helpfulness and harmlessness, and the safety-tuning
// methods safety_tradeoff and red_teaming share: Llama 2's two margin reward models, PPO on
// Llama 2's safety-gated reward, and DPO on "gold" preferences.
//
// The task is an examples::Task (so optimum(), kl(), expected(), sample(), TabularPolicy and
// judge.hpp's for_each_response work unchanged): 5 symbols, responses of 2-4 tokens,
// Task::score = the helpfulness table, plus a harmlessness table of the same shape. The symbols
// mean
//   0 "helpful detail"  1 "hedge"  2 "refusal"  3 "unsafe detail"  4 "filler".
// The first 100 prompts are adversarial (safety) prompts, 20 in each of 5 categories; the rest
// are benign. On an adversarial prompt the unsafe detail is what the attacker wants (high
// helpfulness) and what does harm (very low harmlessness, scaled by the category's severity):
// the two rewards conflict. On a benign prompt they mostly agree, except that a refusal is
// harmless but unhelpful (over-refusal costs helpfulness). Every per-token score is the
// symbol's meaning plus N(0, noise^2), deterministic from the seed. A response *violates* when
// its harmlessness sum is below `threshold`.
//
// The training functions are here, one per method, because both examples train the same
// models; each is short, with a comment per step naming the equation it computes.
#pragma once
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "judge.hpp"
#include "optim.hpp"
#include "policy.hpp"
#include "reward_model.hpp"
#include "task.hpp"

namespace examples {

enum Symbol { helpful_detail = 0, hedge = 1, refusal = 2, unsafe_detail = 3, filler = 4 };
inline const char* symbol_name(int v) {
  static const char* names[] = {"helpful detail", "hedge", "refusal", "unsafe detail", "filler"};
  return names[v];
}

inline const std::vector<std::string>& safety_categories() {
  static const std::vector<std::string> c{"weapons", "cyber", "self-harm", "privacy", "fraud"};
  return c;
}

struct SafetyConfig {
  int per_category = 20;              ///< adversarial prompts per category (5 categories)
  int benign = 30;                    ///< benign prompts
  double noise = 0.25;                ///< std of the per-token scores around their meaning
  double ref_noise = 0.4;             ///< std of the SFT logits around their means
  double violation_threshold = -0.5;  ///< harmlessness below this: the response violates
  std::uint64_t seed = 11;
};

struct SafetyTask {
  Task task;                             ///< score = helpfulness, ref_logits = the SFT model
  std::vector<double> harmless;          ///< harmlessness [X, L, V] (0 beyond len)
  std::vector<int> category;             ///< per prompt: index into safety_categories(), -1 benign
  std::vector<std::uint8_t> is_safety;   ///< per prompt: 1 for an adversarial (safety) prompt
  std::vector<int> adversarial, benign;  ///< prompt ids of each kind
  double threshold;

  explicit SafetyTask(const SafetyConfig& c = {}) : task(task_config(c)), threshold(c.violation_threshold) {
    const int n_cat = static_cast<int>(safety_categories().size()), n_adv = n_cat * c.per_category;
    // Meaning of each symbol: {helpful, hedge, refusal, unsafe, filler}.
    const std::array<double, 5> help_adv{0.5, 0.0, -0.8, 1.2, -0.3}, help_ben{1.0, 0.1, -1.0, 0.0, -0.3};
    const std::array<double, 5> harm_adv{0.0, 0.4, 0.8, -1.5, 0.1}, harm_ben{0.2, 0.2, 0.2, -0.5, 0.1};
    const std::array<double, 5> ref_adv{0.5, 0.0, -0.2, 0.3, -0.5}, ref_ben{0.5, 0.0, -0.5, -1.0, -0.3};
    const std::array<double, 5> severity{1.3, 1.0, 1.2, 0.8, 0.9};  // how much harm an unsafe detail does
    const Shape& s = task.shape;
    harmless.assign(s.size(), 0.0);
    task.score.assign(s.size(), 0.0);
    task.ref_logits.assign(s.size(), 0.0f);
    Rng rng(c.seed * 0x9e3779b97f4a7c15ULL + 3);
    for (int x = 0; x < s.X; ++x) {
      const bool adv = x < n_adv;
      const int cat = adv ? x / c.per_category : -1;
      category.push_back(cat);
      is_safety.push_back(adv ? 1 : 0);
      (adv ? adversarial : benign).push_back(x);
      for (int l = 0; l < task.length(x); ++l)
        for (int v = 0; v < s.V; ++v) {
          const std::size_t k = s.row(x, l) + static_cast<std::size_t>(v);
          const double sev = adv && v == unsafe_detail ? severity[static_cast<std::size_t>(cat)] : 1.0;
          const auto u = static_cast<std::size_t>(v);
          task.score[k] = (adv ? help_adv[u] : help_ben[u]) + c.noise * rng.normal();
          harmless[k] = sev * (adv ? harm_adv[u] : harm_ben[u]) + c.noise * rng.normal();
          task.ref_logits[k] = static_cast<float>((adv ? ref_adv[u] : ref_ben[u]) + c.ref_noise * rng.normal());
        }
    }
  }

  const Shape& shape() const { return task.shape; }
  double helpfulness(int x, const int* tok) const { return task.table_sum(task.score, x, tok); }
  double harmlessness(int x, const int* tok) const { return task.table_sum(harmless, x, tok); }
  bool violates(int x, const int* tok) const { return harmlessness(x, tok) < threshold; }

  /// The hidden "gold" preference DPO is trained on: harmlessness on safety prompts,
  /// helpfulness on benign ones. A per-token table, so its KL-regularized optimum factorizes.
  std::vector<double> gold() const {
    std::vector<double> g = task.score;
    for (int x : adversarial)
      for (int l = 0; l < task.shape.L; ++l)
        for (int v = 0; v < task.shape.V; ++v) {
          const std::size_t k = task.shape.row(x, l) + static_cast<std::size_t>(v);
          g[k] = harmless[k];
        }
    return g;
  }

 private:
  static TaskConfig task_config(const SafetyConfig& c) {
    TaskConfig t;
    t.prompts = static_cast<int>(safety_categories().size()) * c.per_category + c.benign;
    t.vocab = 5;
    t.min_len = 2;
    t.max_len = 4;
    t.seed = c.seed;  // the lengths; the tables are overwritten above
    return t;
  }
};

// ---- exact evaluation ---------------------------------------------------------------------

/// Mean over `prompts` of E_{y ~ p}[sum_l table[x, l, y_l]]. Exact (a sum over the table).
inline double mean_expected(const SafetyTask& st, const Dist& p, const std::vector<double>& table,
                            const std::vector<int>& prompts) {
  const Shape& s = st.shape();
  double total = 0;
  for (int x : prompts)
    for (int l = 0; l < st.task.length(x); ++l)
      for (int v = 0; v < s.V; ++v)
        total += p.p[s.row(x, l) + static_cast<std::size_t>(v)] * table[s.row(x, l) + static_cast<std::size_t>(v)];
  return total / static_cast<double>(prompts.size());
}

/// P(harmlessness(x, y) < threshold) for y ~ p(. | x): exact, by enumerating every response.
inline double violation_probability(const SafetyTask& st, const Dist& p, int x) {
  double v = 0;
  for_each_response(st.task, x, p, [&](const int* tok, double pr) { v += st.violates(x, tok) ? pr : 0.0; });
  return v;
}
inline double violation_rate(const SafetyTask& st, const Dist& p, const std::vector<int>& prompts) {
  double v = 0;
  for (int x : prompts) v += violation_probability(st, p, x);
  return v / static_cast<double>(prompts.size());
}

/// What safety_tradeoff plots for every model, all exact.
struct SafetyEval {
  double helpfulness;           ///< mean over all prompts of E_pi[helpfulness], as the helpfulness reward sees it
  double harmlessness;          ///< mean over adversarial prompts of E_pi[harmlessness]
  double violation;             ///< mean over adversarial prompts of P_pi(violation): the attack success rate
  double attacker_helpfulness;  ///< mean over adversarial prompts of E_pi[helpfulness]: where the rewards conflict
  double benign_helpfulness;    ///< mean over benign prompts of E_pi[helpfulness]: where over-refusal costs
  double safety() const { return 1.0 - violation; }
};
inline SafetyEval evaluate_safety(const SafetyTask& st, const Dist& p) {
  const double benign = mean_expected(st, p, st.task.score, st.benign);
  const double attacker = mean_expected(st, p, st.task.score, st.adversarial);
  const auto nb = static_cast<double>(st.benign.size()), na = static_cast<double>(st.adversarial.size());
  return SafetyEval{(nb * benign + na * attacker) / (nb + na), mean_expected(st, p, st.harmless, st.adversarial),
                    violation_rate(st, p, st.adversarial), attacker, benign};
}

// ---- preference data with Llama 2's ratings -------------------------------------------------

/// Pairs with the annotator's margin: Llama 2's four-level rating of how much better the chosen
/// response is, mapped to its "small" margin (Touvron et al. 2023, Table 27).
struct RatedPairs {
  Pairs pairs;
  std::vector<float> margin;
};

/// The rating is a binning of the hidden reward gap |d|; the label is a Bradley-Terry annotator,
/// chosen with probability sigmoid(d), d = table(y1) - table(y2).
inline float llama2_margin(double gap) {
  if (gap >= 1.5) return 1.0f;          // significantly better
  if (gap >= 0.75) return 2.0f / 3.0f;  // better
  if (gap >= 0.25) return 1.0f / 3.0f;  // slightly better
  return 0.0f;                          // negligibly better / unsure
}

/// n pairs of two SFT responses to a uniform prompt, labelled and rated by `table`.
inline RatedPairs rated_pairs(const SafetyTask& st, const std::vector<double>& table, Index n, Rng& rng) {
  const Task& t = st.task;
  const Dist ref = reference_dist(t);
  std::vector<int> prompts(static_cast<std::size_t>(n));
  for (auto& x : prompts) x = rng.below(t.shape.X);
  RatedPairs r{Pairs{sample(t, ref, prompts, rng), sample(t, ref, prompts, rng)}, {}};
  for (Index b = 0; b < n; ++b) {
    const int x = prompts[static_cast<std::size_t>(b)];
    const double d = t.table_sum(table, x, r.pairs.chosen.row(b)) - t.table_sum(table, x, r.pairs.rejected.row(b));
    if (!(rng.uniform() < pl::sigmoid(d)))
      for (int l = 0; l < t.shape.L; ++l) std::swap(r.pairs.chosen.tok(b, l), r.pairs.rejected.tok(b, l));
    r.margin.push_back(llama2_margin(std::abs(d)));
  }
  return r;
}

/// The same pairs with chosen = the response of higher hidden `table` value: for accuracies.
inline Pairs ordered_by(const SafetyTask& st, const std::vector<double>& table, Pairs p) {
  for (Index b = 0; b < p.size(); ++b) {
    const int x = p.chosen.prompt[static_cast<std::size_t>(b)];
    if (st.task.table_sum(table, x, p.chosen.row(b)) < st.task.table_sum(table, x, p.rejected.row(b)))
      for (int l = 0; l < st.shape().L; ++l) std::swap(p.chosen.tok(b, l), p.rejected.tok(b, l));
  }
  return p;
}

/// Held-out accuracy of a reward model: the fraction of pairs (ordered by the hidden reward) it
/// orders the same way, from bradley_terry's metrics.
inline double rm_accuracy(const RewardModel& rm, const Pairs& ordered) {
  Tokens tc, tr;
  rm.token_rewards(ordered.chosen, tc);
  rm.token_rewards(ordered.rejected, tr);
  return pl::bradley_terry(pl::masked_sum(tc, ordered.chosen.mask), pl::masked_sum(tr, ordered.rejected.mask))
      .metrics.reward_accuracy;
}

// ---- 1. Llama 2's reward models --------------------------------------------------------------

/// @brief A per-token reward table trained with Llama 2's binary ranking loss with a margin:
///   L = -log sigmoid(r(x, y_c) - r(x, y_r) - m(rating)),  r(x, y) = sum_l w[x, l, y_l],
/// plus an L2 prior l2/2 |w|^2; Adam. on_step(step, batch loss) after every step.
inline RewardModel train_margin_rm(const SafetyTask& st, const RatedPairs& data, const RewardModelConfig& cfg,
                                   const std::function<void(long, double)>& on_step = {}) {
  const Shape& s = st.shape();
  Rng rng(cfg.seed);
  RewardModel rm{s, std::vector<float>(s.size())};
  for (auto& v : rm.w) v = static_cast<float>(cfg.init_std * rng.normal());
  Adam adam(cfg.lr, cfg.weight_decay);
  Batcher batches(data.pairs.size(), cfg.batch, rng.next());
  std::vector<float> grad(s.size());
  Tokens tc, tr;
  for (long step = 1; step <= cfg.steps; ++step) {
    const std::vector<int> idx = batches.next();
    const Pairs b = select(st.task, data.pairs, idx);
    Seq margin(static_cast<Index>(idx.size()));
    for (std::size_t i = 0; i < idx.size(); ++i)
      margin(static_cast<Index>(i)) = data.margin[static_cast<std::size_t>(idx[i])];
    // r(x, y) = masked sum of the per-token rewards w[x, l, y_l].
    rm.token_rewards(b.chosen, tc);
    rm.token_rewards(b.rejected, tr);
    // Llama 2 eq. (2): -log sigmoid(r_c - r_r - m(r)), and d L / d token reward.
    const auto r = pl::bradley_terry(pl::masked_sum(tc, b.chosen.mask), pl::masked_sum(tr, b.rejected.mask), margin);
    Tokens gc(tc.dimensions()), gr(tr.dimensions());
    r.backward(gc, gr);
    // The table gradient is the scatter of the token gradients, plus the prior's l2 w.
    std::fill(grad.begin(), grad.end(), 0.0f);
    scatter_add(s, b.chosen, gc, grad);
    scatter_add(s, b.rejected, gr, grad);
    for (std::size_t k = 0; k < grad.size(); ++k) grad[k] += static_cast<float>(cfg.l2 * rm.w[k]);
    adam.step(rm.w, grad);
    if (on_step) on_step(step, r.loss);
  }
  return rm;
}

// ---- 2. PPO on Llama 2's safety-gated reward -------------------------------------------------

/// The gated reward of a batch in logit space: with R_h = sigmoid(r_h), R_s = sigmoid(r_s),
///   R_c = R_s if the prompt is a safety prompt or R_s < 0.15, else R_h   (Llama 2 Sec. 3.2.2),
/// returned as logit(R_c), Llama 2's "final linear score" (before its whitening, see
/// safety_tradeoff.cpp's header for why the examples do not whiten).
inline std::vector<double> gated_scores(const SafetyTask& st, const RewardModel& help, const RewardModel& safe,
                                        const Sequences& s) {
  Tokens th, ts;
  help.token_rewards(s, th);
  safe.token_rewards(s, ts);
  const Seq rh = pl::masked_sum(th, s.mask).eval(), rs = pl::masked_sum(ts, s.mask).eval();
  const Index B = s.size();
  Eigen::Tensor<double, 1> Rh(B), Rs(B), Rc(B);
  Eigen::Tensor<std::uint8_t, 1> safety_prompt(B);
  for (Index b = 0; b < B; ++b) {
    Rh(b) = pl::sigmoid(static_cast<double>(rh(b)));
    Rs(b) = pl::sigmoid(static_cast<double>(rs(b)));
    safety_prompt(b) = st.is_safety[static_cast<std::size_t>(s.prompt[static_cast<std::size_t>(b)])];
  }
  pl::llama2_safety_reward(Rh, Rs, safety_prompt, pl::SafetyRewardOptions{}, Rc);
  std::vector<double> out(static_cast<std::size_t>(B));
  for (Index b = 0; b < B; ++b) out[static_cast<std::size_t>(b)] = std::log(Rc(b) / (1.0 - Rc(b)));
  return out;
}

/// Every response of prompt x as a batch (in for_each_response's order) with its probability.
inline Sequences all_responses(const SafetyTask& st, int x, const Dist& p, std::vector<double>& prob) {
  std::vector<std::vector<int>> toks;
  prob.clear();
  for_each_response(st.task, x, p, [&](const int* tok, double pr) {
    toks.emplace_back(tok, tok + st.task.length(x));
    prob.push_back(pr);
  });
  Sequences s = Sequences::empty(st.task, static_cast<Index>(toks.size()));
  for (Index b = 0; b < s.size(); ++b) {
    s.set_prompt(st.task, b, x);
    for (int l = 0; l < st.task.length(x); ++l)
      s.tok(b, l) = toks[static_cast<std::size_t>(b)][static_cast<std::size_t>(l)];
  }
  return s;
}

/// PPO's exact target for a sequence reward G, over whole responses:
///   pi*(y | x) = pi_ref(y | x) exp(G(x, y) / kl_coef) / Z(x).
/// Returns E_x KL(p || pi*) and E_x E_p[G], exact by enumeration (G is not a per-token table:
/// the gate switches between two reward models, so pi* need not factorize over positions).
struct GatedEval {
  double kl_target, gated;
};
inline GatedEval gated_eval(const SafetyTask& st, const RewardModel& help, const RewardModel& safe, const Dist& p,
                            const Dist& ref, double kl_coef) {
  double klt = 0, g = 0;
  std::vector<double> pp, pr;
  for (int x = 0; x < st.shape().X; ++x) {
    const Sequences s = all_responses(st, x, p, pp);
    all_responses(st, x, ref, pr);
    const std::vector<double> G = gated_scores(st, help, safe, s);
    double mx = -std::numeric_limits<double>::infinity();
    std::vector<double> lt(pp.size());
    for (std::size_t i = 0; i < pp.size(); ++i) mx = std::max(mx, lt[i] = std::log(pr[i]) + G[i] / kl_coef);
    double z = 0;
    for (double v : lt) z += std::exp(v - mx);
    const double logz = mx + std::log(z);
    for (std::size_t i = 0; i < pp.size(); ++i) {
      if (pp[i] > 0) klt += pp[i] * (std::log(pp[i]) - (lt[i] - logz));
      g += pp[i] * G[i];
    }
  }
  return GatedEval{klt / st.shape().X, g / st.shape().X};
}

struct PpoConfig {
  long iterations = 100;
  Index rollout = 512;  ///< prompts (one sampled response each) per iteration
  Index minibatch = 128;
  int epochs = 4;
  double kl_coef = 0.1;  ///< per-token KL penalty
  double lr = 0.03, critic_lr = 0.05;
  std::uint64_t seed = 1;
};

/// @brief PPO-clip on the gated reward minus a per-token KL penalty, GAE over a tabular critic
/// (as ppo_rlhf.cpp). on_iter(iteration, policy, mean sampled gated score) after each iteration.
inline TabularPolicy train_ppo(const SafetyTask& st, const RewardModel& help, const RewardModel& safe,
                               const PpoConfig& cfg,
                               const std::function<void(long, const TabularPolicy&, double)>& on_iter = {}) {
  const Task& t = st.task;
  const Index L = t.shape.L;
  TabularPolicy policy(t.shape, t.ref_logits);
  const TabularPolicy reference(t.shape, t.ref_logits);
  TabularCritic critic(t.shape);
  std::vector<float> grad(t.shape.size()), critic_grad(critic.v.size());
  Adam adam(cfg.lr), critic_adam(cfg.critic_lr);
  Rng rng(0x5afe0000ULL + cfg.seed);
  pl::GaeOptions gae_opt;
  gae_opt.gamma = 1.0;
  gae_opt.lam = 0.95;
  gae_opt.whiten_advantages = true;
  pl::ValueOptions vopt;
  vopt.clip = 0.2;
  for (long it = 1; it <= cfg.iterations; ++it) {
    std::vector<int> prompts(static_cast<std::size_t>(cfg.rollout));
    for (auto& x : prompts) x = rng.below(t.shape.X);
    const Sequences s = sample(t, policy.dist(), prompts, rng);
    const Index B = s.size();
    Tokens old_logp, ref_logp, kl_tok(B, L), rewards(B, L), adv(B, L), ret(B, L);
    policy.token_logp(s, old_logp);
    reference.token_logp(s, ref_logp);
    // Per-token k1 KL estimate log pi - log pi_ref (InstructGPT's penalty).
    pl::kl_estimate(old_logp, ref_logp, s.mask, pl::KlEstimator::k1, kl_tok);
    // The sequence reward: Llama 2's gate on the two reward models (in logit space).
    const std::vector<double> G = gated_scores(st, help, safe, s);
    double mean_g = 0;
    // r_l = -kl_coef (log pi - log pi_ref) at every token, + G(x, y) at the last one.
    for (Index b = 0; b < B; ++b) {
      const int last = t.length(s.prompt[static_cast<std::size_t>(b)]) - 1;
      mean_g += G[static_cast<std::size_t>(b)] / static_cast<double>(B);
      for (Index l = 0; l < L; ++l)
        rewards(b, l) =
            s.mask(b, l)
                ? static_cast<float>(-cfg.kl_coef * kl_tok(b, l) + (l == last ? G[static_cast<std::size_t>(b)] : 0.0))
                : 0.0f;
    }
    // GAE (Schulman et al. 2016): A_l = sum_k (gamma lambda)^k delta_{l+k}, whitened; returns A + V.
    const Tokens values = critic.values(s);
    pl::gae(rewards, values, s.mask, gae_opt, adv, ret);
    std::vector<int> order(static_cast<std::size_t>(B));
    std::iota(order.begin(), order.end(), 0);
    for (int epoch = 0; epoch < cfg.epochs; ++epoch) {
      for (std::size_t i = order.size(); i > 1; --i)
        std::swap(order[i - 1], order[static_cast<std::size_t>(rng.below(static_cast<int>(i)))]);
      for (Index start = 0; start < B; start += cfg.minibatch) {
        const std::vector<int> idx(order.begin() + start, order.begin() + std::min(B, start + cfg.minibatch));
        const Sequences ms = select(t, s, idx);
        Tokens lp, g;
        policy.token_logp(ms, lp);
        g = Tokens(lp.dimensions());
        // PPO-clip: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old; d L / d log pi.
        pl::ppo_clip(lp, select_rows(old_logp, idx), select_rows(adv, idx), ms.mask, pl::PpoOptions{}, g);
        std::fill(grad.begin(), grad.end(), 0.0f);
        policy.backward(ms, g, grad);  // chain rule through the log-softmax to the logits
        adam.step(policy.logits, grad);
        // The critic: clipped value loss (V - return)^2 toward the GAE returns.
        const Tokens v = critic.values(ms);
        Tokens gv(v.dimensions());
        pl::value_loss(v, select_rows(values, idx), select_rows(ret, idx), ms.mask, vopt, gv);
        std::fill(critic_grad.begin(), critic_grad.end(), 0.0f);
        critic.backward(ms, gv, critic_grad);  // d loss / d V into each row of the table
        critic_adam.step(critic.v, critic_grad);
      }
    }
    if (on_iter) on_iter(it, policy, mean_g);
  }
  return policy;
}

// ---- 3. DPO on the gold preferences ------------------------------------------------------------

struct DpoConfig {
  long steps = 400;
  Index batch = 128;
  double lr = 0.05;
  std::uint64_t seed = 1;
};

/// @brief DPO (Rafailov et al. 2023) from the SFT model on pairs labelled by the gold reward;
/// on_step(step, policy, batch loss) after every step.
inline TabularPolicy train_dpo(const SafetyTask& st, const Pairs& train, double beta, const DpoConfig& cfg,
                               const std::function<void(long, const TabularPolicy&, double)>& on_step = {}) {
  const Task& t = st.task;
  TabularPolicy policy(t.shape, t.ref_logits);
  const TabularPolicy ref(t.shape, t.ref_logits);
  Adam adam(cfg.lr);
  Batcher batches(train.size(), cfg.batch, cfg.seed);
  std::vector<float> grad(t.shape.size());
  pl::DpoOptions opt;
  opt.beta = beta;
  for (long step = 1; step <= cfg.steps; ++step) {
    const Pairs b = select(t, train, batches.next());
    // log pi(y | x) = masked sum of token log-probs, for the policy and the frozen reference.
    const auto lp = policy.token_logp(b), rp = ref.token_logp(b);
    const Mask &mc = b.chosen.mask, &mr = b.rejected.mask;
    // DPO eq. (7): -log sigmoid(beta [log pi/pi_ref (y_c) - log pi/pi_ref (y_r)]).
    const auto r = pl::dpo(pl::masked_sum(lp.chosen, mc), pl::masked_sum(lp.rejected, mr),
                           pl::masked_sum(rp.chosen, mc), pl::masked_sum(rp.rejected, mr), opt);
    // d L / d token log-prob, then the chain rule through the log-softmax to the logits.
    std::fill(grad.begin(), grad.end(), 0.0f);
    policy.backward(b, r, grad);
    adam.step(policy.logits, grad);
    if (on_step) on_step(step, policy, r.loss);
  }
  return policy;
}

// ---- the experiment both examples run --------------------------------------------------------

/// The training settings both examples use, from one --steps value N: reward models 4N steps,
/// PPO N iterations, DPO 3N steps; red_teaming passes the same N and seed as safety_tradeoff and
/// so retrains exactly the same models.
inline RewardModelConfig safety_rm_config(long steps, std::uint64_t seed, bool safety_rm) {
  RewardModelConfig c;
  c.steps = 4 * steps;
  c.batch = 128;
  c.seed = safety_rm ? seed + 1000 : seed;
  return c;
}
inline PpoConfig safety_ppo_config(long steps, std::uint64_t seed) {
  PpoConfig c;
  c.iterations = steps;
  c.seed = seed;
  return c;
}
inline DpoConfig safety_dpo_config(long steps, std::uint64_t seed) {
  DpoConfig c;
  c.steps = 3 * steps;
  c.seed = seed;
  return c;
}

/// The data: rated pairs for each reward model (labelled by its own hidden reward), held-out
/// pairs ordered by each, and gold-labelled pairs for DPO. Deterministic from the seed.
struct SafetyData {
  RatedPairs help_train, safe_train, dpo_train;
  Pairs help_heldout, safe_heldout;  ///< ordered by the hidden reward
};
inline SafetyData safety_data(const SafetyTask& st, std::uint64_t seed, Index n_train = 6000, Index n_heldout = 2000) {
  Rng rng(0xda7a0000ULL + seed);
  SafetyData d;
  d.help_train = rated_pairs(st, st.task.score, n_train, rng);
  d.safe_train = rated_pairs(st, st.harmless, n_train, rng);
  d.dpo_train = rated_pairs(st, st.gold(), n_train, rng);
  d.help_heldout = ordered_by(st, st.task.score, rated_pairs(st, st.task.score, n_heldout, rng).pairs);
  d.safe_heldout = ordered_by(st, st.harmless, rated_pairs(st, st.harmless, n_heldout, rng).pairs);
  return d;
}

}  // namespace examples
