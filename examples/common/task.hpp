// The examples' preference task, small enough to solve exactly.
//
// X prompts; the response to prompt x has len[x] tokens from a vocabulary of V. Every model is a
// table of rows, one row of V numbers per (prompt, position):
//   policy     pi(y | x)     = prod_{l < len[x]} softmax(theta[x, l])[y_l]
//   reference  pi_ref(y | x) = the same with frozen logits (the "SFT" model)
//   true reward r(x, y)      = sum_{l < len[x]} score[x, l, y_l]   (hidden from the learners)
// Positions are independent given the prompt and the reward is a sum over positions, so the
// KL-regularized optimum max_pi E[r] - beta KL(pi || pi_ref) factorizes too:
//   pi*_l(. | x) proportional to pi_ref,l(. | x) exp(score[x, l, .] / beta),
// and KL(pi || pi_ref), KL(pi || pi*) and E_pi[r] are exact sums over the table: the evaluation
// curves carry no sampling noise. Prompts are uniform; every expectation averages over them.
#pragma once
#include <prefloss/prefloss.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "rng.hpp"

namespace examples {

namespace pl = prefloss;
using Index = Eigen::Index;
using Tokens = Eigen::Tensor<float, 2, Eigen::RowMajor>;       ///< [batch, tokens] token values
using Mask = Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>;  ///< [batch, tokens], 1 = valid token
using Ids = Eigen::Tensor<int, 2, Eigen::RowMajor>;            ///< [batch, tokens] token ids
using Seq = Eigen::Tensor<float, 1>;                           ///< [batch] sequence values

/// Sizes of a [prompts, positions, vocab] table, stored row-major (one row of V per position).
struct Shape {
  int X = 0, L = 0, V = 0;
  std::size_t size() const { return rows() * static_cast<std::size_t>(V); }
  std::size_t rows() const { return static_cast<std::size_t>(X) * static_cast<std::size_t>(L); }
  std::size_t row(int x, int l) const {
    return (static_cast<std::size_t>(x) * static_cast<std::size_t>(L) + static_cast<std::size_t>(l)) *
           static_cast<std::size_t>(V);
  }
};

struct TaskConfig {
  int prompts = 4;
  int vocab = 5;
  int min_len = 2;  ///< response lengths are drawn per prompt in [min_len, max_len]
  int max_len = 5;
  double score_scale = 0.5;  ///< std of the per-token true scores
  double ref_scale = 1.0;    ///< std of the reference logits (0 = uniform reference)
  std::uint64_t seed = 7;
};

struct Task {
  TaskConfig cfg;
  Shape shape;
  std::vector<int> len;           ///< response length of each prompt
  std::vector<double> score;      ///< hidden true per-token reward, [X, L, V] (0 beyond len)
  std::vector<float> ref_logits;  ///< frozen reference ("SFT") logits, [X, L, V]

  explicit Task(const TaskConfig& c = {}) : cfg(c) {
    shape = Shape{c.prompts, c.max_len, c.vocab};
    Rng rng(c.seed);
    len.resize(static_cast<std::size_t>(c.prompts));
    for (auto& n : len) n = c.min_len + rng.below(c.max_len - c.min_len + 1);
    score.assign(shape.size(), 0.0);
    ref_logits.assign(shape.size(), 0.0f);
    for (int x = 0; x < shape.X; ++x)
      for (int l = 0; l < len[static_cast<std::size_t>(x)]; ++l)
        for (int v = 0; v < shape.V; ++v) {
          score[shape.row(x, l) + static_cast<std::size_t>(v)] = c.score_scale * rng.normal();
          ref_logits[shape.row(x, l) + static_cast<std::size_t>(v)] = static_cast<float>(c.ref_scale * rng.normal());
        }
  }

  int length(int x) const { return len[static_cast<std::size_t>(x)]; }
  double reward(int x, const int* tok) const { return table_sum(score, x, tok); }

  /// sum_{l < len[x]} table[x, l, tok[l]]: the value of a sequence under a per-token table.
  double table_sum(const std::vector<double>& table, int x, const int* tok) const {
    double s = 0;
    for (int l = 0; l < length(x); ++l) s += table[shape.row(x, l) + static_cast<std::size_t>(tok[l])];
    return s;
  }
};

/// Exact per-position distributions of a tabular policy (probabilities and log-probabilities).
struct Dist {
  Shape shape;
  std::vector<double> p, logp;
};

/// softmax of each row of a logit table, in double.
template <class T>
Dist dist_from_logits(const Shape& s, const std::vector<T>& logits) {
  Dist d{s, std::vector<double>(s.size()), std::vector<double>(s.size())};
  for (std::size_t r = 0; r < s.rows(); ++r) {
    const std::size_t o = r * static_cast<std::size_t>(s.V);
    double mx = -std::numeric_limits<double>::infinity();
    for (int v = 0; v < s.V; ++v) mx = std::max(mx, static_cast<double>(logits[o + static_cast<std::size_t>(v)]));
    double z = 0;
    for (int v = 0; v < s.V; ++v) z += std::exp(static_cast<double>(logits[o + static_cast<std::size_t>(v)]) - mx);
    const double lz = mx + std::log(z);
    for (int v = 0; v < s.V; ++v) {
      const std::size_t k = o + static_cast<std::size_t>(v);
      d.logp[k] = static_cast<double>(logits[k]) - lz;
      d.p[k] = std::exp(d.logp[k]);
    }
  }
  return d;
}

inline Dist reference_dist(const Task& t) { return dist_from_logits(t.shape, t.ref_logits); }

/// The KL-regularized optimum for a per-token reward table:
/// pi*_l(. | x) proportional to pi_ref,l(. | x) exp(reward[x, l, .] / beta).
inline Dist optimum(const Task& t, double beta, const std::vector<double>& reward_table) {
  std::vector<double> logits(t.shape.size());
  for (std::size_t k = 0; k < logits.size(); ++k) logits[k] = t.ref_logits[k] + reward_table[k] / beta;
  return dist_from_logits(t.shape, logits);
}
inline Dist optimum(const Task& t, double beta) { return optimum(t, beta, t.score); }

/// E_x KL(p(. | x) || q(. | x)) = mean over prompts of sum_{l < len} sum_v p log(p / q). Exact.
inline double kl(const Task& t, const Dist& p, const Dist& q) {
  double total = 0;
  for (int x = 0; x < t.shape.X; ++x)
    for (int l = 0; l < t.length(x); ++l)
      for (int v = 0; v < t.shape.V; ++v) {
        const std::size_t k = t.shape.row(x, l) + static_cast<std::size_t>(v);
        if (p.p[k] > 0) total += p.p[k] * (p.logp[k] - q.logp[k]);
      }
  return total / t.shape.X;
}

/// E_x E_{y ~ p(. | x)} sum_l table[x, l, y_l]. Exact.
inline double expected(const Task& t, const Dist& p, const std::vector<double>& table) {
  double total = 0;
  for (int x = 0; x < t.shape.X; ++x)
    for (int l = 0; l < t.length(x); ++l)
      for (int v = 0; v < t.shape.V; ++v) {
        const std::size_t k = t.shape.row(x, l) + static_cast<std::size_t>(v);
        total += p.p[k] * table[k];
      }
  return total / t.shape.X;
}
inline double true_reward(const Task& t, const Dist& p) { return expected(t, p, t.score); }

/// A batch of responses: prompt ids, token ids padded to max_len, and the validity mask.
struct Sequences {
  std::vector<int> prompt;  ///< [batch]
  Ids tok;                  ///< [batch, max_len], 0 at padding
  Mask mask;                ///< [batch, max_len], 1 at positions < len[prompt]

  Index size() const { return static_cast<Index>(prompt.size()); }
  const int* row(Index b) const { return tok.data() + b * tok.dimension(1); }
  int* row(Index b) { return tok.data() + b * tok.dimension(1); }

  static Sequences empty(const Task& t, Index n) {
    Sequences s;
    s.prompt.assign(static_cast<std::size_t>(n), 0);
    s.tok = Ids(n, t.shape.L);
    s.tok.setZero();
    s.mask = Mask(n, t.shape.L);
    s.mask.setZero();
    return s;
  }
  void set_prompt(const Task& t, Index b, int x) {
    prompt[static_cast<std::size_t>(b)] = x;
    for (int l = 0; l < t.shape.L; ++l) mask(b, l) = l < t.length(x) ? 1 : 0;
  }
};

/// Samples one response per prompt from a tabular policy.
inline Sequences sample(const Task& t, const Dist& policy, const std::vector<int>& prompts, Rng& rng) {
  Sequences s = Sequences::empty(t, static_cast<Index>(prompts.size()));
  for (Index b = 0; b < s.size(); ++b) {
    const int x = prompts[static_cast<std::size_t>(b)];
    s.set_prompt(t, b, x);
    for (int l = 0; l < t.length(x); ++l) s.tok(b, l) = rng.categorical(policy.p.data() + t.shape.row(x, l), t.shape.V);
  }
  return s;
}

/// Rows idx of a batch, in that order.
inline Sequences select(const Task& t, const Sequences& s, const std::vector<int>& idx) {
  Sequences out = Sequences::empty(t, static_cast<Index>(idx.size()));
  for (Index b = 0; b < out.size(); ++b) {
    const Index src = idx[static_cast<std::size_t>(b)];
    out.set_prompt(t, b, s.prompt[static_cast<std::size_t>(src)]);
    for (int l = 0; l < t.shape.L; ++l) out.tok(b, l) = s.tok(src, l);
  }
  return out;
}

/// Rows idx of a [batch, tokens] tensor, in that order.
template <class T>
Eigen::Tensor<T, 2, Eigen::RowMajor> select_rows(const Eigen::Tensor<T, 2, Eigen::RowMajor>& x,
                                                 const std::vector<int>& idx) {
  Eigen::Tensor<T, 2, Eigen::RowMajor> out(static_cast<Index>(idx.size()), x.dimension(1));
  for (Index b = 0; b < out.dimension(0); ++b)
    for (Index l = 0; l < x.dimension(1); ++l) out(b, l) = x(idx[static_cast<std::size_t>(b)], l);
  return out;
}

/// Rows [b, e) of a batch as they are, masks included (select() rebuilds a row's mask from its
/// prompt; a shard keeps the batch's own, an emptied row stays empty).
inline Sequences slice(const Sequences& s, Index b, Index e) {
  Sequences out;
  out.prompt.assign(s.prompt.begin() + b, s.prompt.begin() + e);
  const Eigen::array<Index, 2> at{b, 0}, extent{e - b, s.tok.dimension(1)};
  out.tok = s.tok.slice(at, extent);
  out.mask = s.mask.slice(at, extent);
  return out;
}

/// Rows [b, e) of a [batch, tokens] tensor.
template <class T>
Eigen::Tensor<T, 2, Eigen::RowMajor> slice_rows(const Eigen::Tensor<T, 2, Eigen::RowMajor>& x, Index b, Index e) {
  const Eigen::array<Index, 2> at{b, 0}, extent{e - b, x.dimension(1)};
  return x.slice(at, extent);
}

/// The rows of a followed by the rows of b.
inline Sequences concat(const Task& t, const Sequences& a, const Sequences& b) {
  Sequences out = Sequences::empty(t, a.size() + b.size());
  for (Index r = 0; r < out.size(); ++r) {
    const Sequences& src = r < a.size() ? a : b;
    const Index i = r < a.size() ? r : r - a.size();
    out.set_prompt(t, r, src.prompt[static_cast<std::size_t>(i)]);
    for (int l = 0; l < t.shape.L; ++l) out.tok(r, l) = src.tok(i, l);
  }
  return out;
}

/// Preference pairs over the same prompts.
struct Pairs {
  Sequences chosen, rejected;
  Index size() const { return chosen.size(); }
};

enum class Labels {
  bradley_terry,  ///< chosen with probability sigmoid(r(x, y1) - r(x, y2)): what an annotator gives
  truth,          ///< chosen = the response with the higher true reward: for measuring accuracy
};

/// n pairs: a uniform prompt, two responses sampled from the reference, labelled by `labels`.
inline Pairs preference_pairs(const Task& t, Index n, Rng& rng, Labels labels = Labels::bradley_terry) {
  const Dist ref = reference_dist(t);
  std::vector<int> prompts(static_cast<std::size_t>(n));
  for (auto& x : prompts) x = rng.below(t.shape.X);
  Pairs p{sample(t, ref, prompts, rng), sample(t, ref, prompts, rng)};
  for (Index b = 0; b < n; ++b) {
    const int x = prompts[static_cast<std::size_t>(b)];
    const double d = t.reward(x, p.chosen.row(b)) - t.reward(x, p.rejected.row(b));
    const bool keep = labels == Labels::truth ? d >= 0 : rng.uniform() < 1.0 / (1.0 + std::exp(-d));
    if (!keep)
      for (int l = 0; l < t.shape.L; ++l) std::swap(p.chosen.tok(b, l), p.rejected.tok(b, l));
  }
  return p;
}

inline Pairs select(const Task& t, const Pairs& p, const std::vector<int>& idx) {
  return Pairs{select(t, p.chosen, idx), select(t, p.rejected, idx)};
}
inline Pairs slice(const Pairs& p, Index b, Index e) { return Pairs{slice(p.chosen, b, e), slice(p.rejected, b, e)}; }

/// Fraction of pairs whose chosen response has the higher true reward (ties count half): how
/// often the labels agree with the truth, the ceiling of any accuracy measured on the labels.
inline double label_agreement(const Task& t, const Pairs& p) {
  double a = 0;
  for (Index b = 0; b < p.size(); ++b) {
    const int x = p.chosen.prompt[static_cast<std::size_t>(b)];
    const double d = t.reward(x, p.chosen.row(b)) - t.reward(x, p.rejected.row(b));
    a += d > 0 ? 1.0 : (d == 0 ? 0.5 : 0.0);
  }
  return a / static_cast<double>(p.size());
}

/// The same pairs with chosen = the response of higher true reward (ties keep their order).
inline Pairs by_truth(const Task& t, Pairs p) {
  for (Index b = 0; b < p.size(); ++b) {
    const int x = p.chosen.prompt[static_cast<std::size_t>(b)];
    if (t.reward(x, p.chosen.row(b)) < t.reward(x, p.rejected.row(b)))
      for (int l = 0; l < t.shape.L; ++l) std::swap(p.chosen.tok(b, l), p.rejected.tok(b, l));
  }
  return p;
}

/// The data every example shares: the task, 1000 labelled training pairs, and held-out pairs
/// (labelled the same way, and the same pairs ordered by the true reward).
struct Experiment {
  Task task;
  Pairs train, heldout, heldout_truth;
};
inline Experiment standard_experiment(std::uint64_t seed, Index n_train = 1000, Index n_heldout = 2000,
                                      const TaskConfig& cfg = {}) {
  Experiment e{Task(cfg), {}, {}, {}};
  Rng rng(0x5eed0000ULL + seed);
  e.train = preference_pairs(e.task, n_train, rng);
  e.heldout = preference_pairs(e.task, n_heldout, rng);
  e.heldout_truth = by_truth(e.task, e.heldout);
  return e;
}

/// One line about the task and the data, for the examples' headers.
inline std::string describe(const Experiment& e) {
  const Task& t = e.task;
  std::string lens;
  for (int x = 0; x < t.shape.X; ++x) lens += (x ? ", " : "") + std::to_string(t.length(x));
  return "task: " + std::to_string(t.shape.X) + " prompts, responses of " + lens + " tokens (padded to " +
         std::to_string(t.shape.L) + ") over " + std::to_string(t.shape.V) + " symbols;\n" +
         std::to_string(e.train.size()) + " training pairs (labels agree with the true reward on " +
         std::to_string(static_cast<int>(std::lround(100 * label_agreement(t, e.train)))) + "%), " +
         std::to_string(e.heldout.size()) + " held-out pairs";
}

/// Minibatch indices: reshuffled epochs over n examples, deterministic for a seed.
class Batcher {
 public:
  Batcher(Index n, Index batch, std::uint64_t seed) : order_(static_cast<std::size_t>(n)), batch_(batch), rng_(seed) {
    std::iota(order_.begin(), order_.end(), 0);
    shuffle();
  }
  std::vector<int> next() {
    std::vector<int> idx;
    for (Index k = 0; k < batch_; ++k) {
      if (pos_ == order_.size()) shuffle();
      idx.push_back(order_[pos_++]);
    }
    return idx;
  }

 private:
  void shuffle() {
    for (std::size_t i = order_.size(); i > 1; --i)
      std::swap(order_[i - 1], order_[static_cast<std::size_t>(rng_.below(static_cast<int>(i)))]);
    pos_ = 0;
  }
  std::vector<int> order_;
  Index batch_;
  std::size_t pos_ = 0;
  Rng rng_;
};

}  // namespace examples
