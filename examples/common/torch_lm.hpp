// A small causal transformer language model in libtorch (torch::nn) and a synthetic language
// whose true reward is known exactly, for the libtorch examples and tests of prefloss::torch.
//
// The language: a sequence is [BOS, p_0 .. p_{P-1}, y_0 .. y_{R-1}] over an alphabet of V
// tokens (BOS = V is the start token, never predicted). The prompt p is uniform; the "data"
// responses (the SFT corpus, and both responses of every preference pair) come from a fixed
// Markov chain over the alphabet. The true reward of a response is exact and hidden from the
// learners:
//   r(p, y) = sum_l token_reward[y_l]                       (per-token rewards)
//           + pattern  * #{l >= 1 : y_l = y_{l-1} + 1 mod V}  (an ascending-step pattern)
//           + favourite * #{l : y_l = p_0}                    (the prompt's first token, repeated)
// so a model has to look back at the previous token and at the prompt to score or to optimise it.
// Preference pairs are labelled by a Bradley-Terry model of the true reward:
// P(a preferred to b) = sigmoid(r(p, a) - r(p, b)).
//
// The model: token embedding (V + 1 inputs) + learned positions, n_layers pre-LN blocks of causal
// multi-head self-attention and a GELU MLP, a final layer norm, an LM head over the V tokens and a
// scalar head (the reward model's score, the critic's value) on the same hidden states. Any dtype:
// make_lm(cfg, seed, torch::kFloat64) builds the same initial weights (drawn in float64, then cast).
#pragma once
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "rng.hpp"

namespace examples {

// ---- the model --------------------------------------------------------------------------------

struct LmConfig {
  std::int64_t vocab = 8;     ///< predicted tokens (the alphabet); the input embedding has one more (BOS)
  std::int64_t max_len = 16;  ///< learned positions
  std::int64_t d_model = 64;
  std::int64_t n_layers = 2;
  std::int64_t n_heads = 4;
  std::int64_t d_mlp = 128;
};

/// One pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). The q, k, v projection
/// has no bias (as in LLaMA): a key bias only adds q . b_k to every score of a row, which the
/// softmax cancels, so its gradient is exactly 0 and only rounding noise would reach it.
class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const LmConfig& c)
      : heads_(c.n_heads),
        ln1_(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})))),
        ln2_(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})))),
        qkv_(register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(c.d_model, 3 * c.d_model).bias(false)))),
        proj_(register_module("proj", torch::nn::Linear(c.d_model, c.d_model))),
        fc1_(register_module("fc1", torch::nn::Linear(c.d_model, c.d_mlp))),
        fc2_(register_module("fc2", torch::nn::Linear(c.d_mlp, c.d_model))) {}

  /// x [B, T, d]; causal: [T, T] bool, true above the diagonal (the future, masked out).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& causal) {
    const std::int64_t B = x.size(0), T = x.size(1), d = x.size(2), dh = d / heads_;
    const auto qkv = qkv_->forward(ln1_->forward(x)).chunk(3, -1);
    const auto split = [&](const torch::Tensor& t) { return t.view({B, T, heads_, dh}).transpose(1, 2); };
    const torch::Tensor q = split(qkv[0]), k = split(qkv[1]), v = split(qkv[2]);  // [B, H, T, dh]
    torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
    att = torch::softmax(att.masked_fill(causal, -std::numeric_limits<double>::infinity()), -1);
    const torch::Tensor y = torch::matmul(att, v).transpose(1, 2).reshape({B, T, d});
    const torch::Tensor h = x + proj_->forward(y);
    return h + fc2_->forward(torch::gelu(fc1_->forward(ln2_->forward(h))));
  }

 private:
  std::int64_t heads_;
  torch::nn::LayerNorm ln1_, ln2_;
  torch::nn::Linear qkv_, proj_, fc1_, fc2_;
};
TORCH_MODULE(Block);

/// The causal LM with an LM head and a scalar head on the final hidden states.
class CausalLmImpl : public torch::nn::Module {
 public:
  explicit CausalLmImpl(const LmConfig& c)
      : cfg_(c),
        tok_(register_module("tok", torch::nn::Embedding(c.vocab + 1, c.d_model))),
        pos_(register_module("pos", torch::nn::Embedding(c.max_len, c.d_model))),
        ln_f_(register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})))),
        lm_head_(register_module("lm_head", torch::nn::Linear(c.d_model, c.vocab))),
        scalar_head_(register_module("scalar_head", torch::nn::Linear(c.d_model, 1))) {
    for (std::int64_t l = 0; l < c.n_layers; ++l)
      blocks_.push_back(register_module("block" + std::to_string(l), Block(c)));
  }

  const LmConfig& config() const { return cfg_; }

  /// ids [B, T] int64 -> final hidden states [B, T, d].
  torch::Tensor hidden(const torch::Tensor& ids) {
    const std::int64_t T = ids.size(1);
    const torch::Tensor positions = torch::arange(T, torch::TensorOptions().dtype(torch::kLong));
    torch::Tensor x = tok_->forward(ids) + pos_->forward(positions).unsqueeze(0);
    const torch::Tensor causal = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool)).triu(1);
    for (auto& b : blocks_) x = b->forward(x, causal);
    return ln_f_->forward(x);
  }
  /// [B, T, vocab] next-token logits, row-major contiguous (what prefloss::torch reads).
  torch::Tensor logits(const torch::Tensor& ids) { return lm_head_->forward(hidden(ids)).contiguous(); }
  /// [B, T] scalar head at every position (reward model: read at the last token; critic: values).
  torch::Tensor scalar(const torch::Tensor& ids) { return scalar_head_->forward(hidden(ids)).squeeze(-1).contiguous(); }

 private:
  LmConfig cfg_;
  torch::nn::Embedding tok_, pos_;
  torch::nn::LayerNorm ln_f_;
  torch::nn::Linear lm_head_, scalar_head_;
  std::vector<Block> blocks_;
};
TORCH_MODULE(CausalLm);

/// A model with weights drawn from `seed` (GPT-2's init: N(0, 0.02) weights, zero biases, unit
/// layer norms), in float64 and then cast to `dtype`: the same weights in either dtype.
inline CausalLm make_lm(const LmConfig& cfg, std::uint64_t seed, torch::Dtype dtype = torch::kFloat32) {
  torch::manual_seed(seed);
  CausalLm m(cfg);
  m->to(torch::kFloat64);
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters()) {
    const std::string& name = p.key();
    torch::Tensor& t = p.value();
    if (name.find("ln") != std::string::npos)
      t.fill_(name.size() >= 6 && name.compare(name.size() - 6, 6, "weight") == 0 ? 1.0 : 0.0);
    else if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0)
      t.zero_();
    else
      t.normal_(0.0, 0.02);
  }
  m->to(dtype);
  return m;
}

/// dst's parameters := src's (same config): a frozen reference, or a model started from another.
inline void copy_params(CausalLm& dst, const CausalLm& src) {
  torch::NoGradGuard no_grad;
  const auto s = src->parameters();
  auto d = dst->parameters();
  for (std::size_t k = 0; k < d.size(); ++k) d[k].copy_(s[k]);
}

inline CausalLm clone_lm(const CausalLm& src, std::uint64_t seed = 0) {
  CausalLm m = make_lm(src->config(), seed, src->parameters()[0].scalar_type());
  copy_params(m, src);
  return m;
}

inline void freeze(CausalLm& m) {
  for (auto& p : m->parameters()) p.set_requires_grad(false);
  m->eval();
}

// ---- the synthetic language ------------------------------------------------------------------

struct LanguageConfig {
  int alphabet = 8;             ///< V
  int prompt_len = 2;           ///< P
  int response_len = 8;         ///< R
  double token_scale = 0.5;     ///< std of the per-token rewards
  double pattern = 0.5;         ///< reward per ascending step y_l = y_{l-1} + 1 mod V
  double favourite = 0.5;       ///< reward per occurrence of the prompt's first token
  double chain_scale = 1.5;     ///< std of the data Markov chain's logits (higher: more peaked)
  std::uint64_t seed = 0x5eed;  ///< the language's tables (not the training run)
};

/// A batch of full sequences as the model reads them: input = ids[:, :-1], labels = ids[:, 1:],
/// mask = 1 at the response's labels (positions P .. P + R - 1), 0 at the prompt's.
struct LmBatch {
  torch::Tensor ids;     ///< [B, 1 + P + R] int64
  torch::Tensor input;   ///< [B, P + R] int64
  torch::Tensor labels;  ///< [B, P + R] int64
  torch::Tensor mask;    ///< [B, P + R] of the model's dtype (0 / 1 weights)
  std::int64_t size() const { return ids.size(0); }
  LmBatch rows(const torch::Tensor& idx) const {
    return {ids.index_select(0, idx), input.index_select(0, idx), labels.index_select(0, idx),
            mask.index_select(0, idx)};
  }
};

class Language {
 public:
  using Sequence = std::vector<int>;  ///< [BOS, prompt, response], 1 + P + R ids

  explicit Language(const LanguageConfig& c = {}) : cfg_(c) {
    Rng rng(c.seed);
    const auto V = static_cast<std::size_t>(c.alphabet);
    token_reward_.resize(V);
    for (auto& w : token_reward_) w = c.token_scale * rng.normal();
    start_.resize(V);
    for (auto& w : start_) w = rng.normal();
    softmax_rows(start_, V);
    chain_.resize(V * V);
    for (auto& w : chain_) w = c.chain_scale * rng.normal();
    softmax_rows(chain_, V);
  }

  const LanguageConfig& config() const { return cfg_; }
  int alphabet() const { return cfg_.alphabet; }
  int bos() const { return cfg_.alphabet; }
  int prompt_len() const { return cfg_.prompt_len; }
  int response_len() const { return cfg_.response_len; }
  std::int64_t seq_len() const { return 1 + cfg_.prompt_len + cfg_.response_len; }
  /// The model config that fits: vocab = V, positions for the whole sequence.
  LmConfig lm_config() const {
    LmConfig c;
    c.vocab = cfg_.alphabet;
    c.max_len = seq_len();
    return c;
  }

  /// [BOS, prompt] with a uniform prompt.
  Sequence sample_prompt(Rng& rng) const {
    Sequence s{bos()};
    for (int k = 0; k < cfg_.prompt_len; ++k) s.push_back(rng.below(cfg_.alphabet));
    return s;
  }
  /// The prompt followed by a response from the data Markov chain (the SFT corpus).
  Sequence complete_from_data(Sequence s, Rng& rng) const {
    const auto V = static_cast<std::size_t>(cfg_.alphabet);
    for (int l = 0; l < cfg_.response_len; ++l) {
      const double* p = l == 0 ? start_.data() : chain_.data() + static_cast<std::size_t>(s.back()) * V;
      s.push_back(rng.categorical(p, cfg_.alphabet));
    }
    return s;
  }
  Sequence sample_data(Rng& rng) const { return complete_from_data(sample_prompt(rng), rng); }

  /// The exact true reward r(p, y) of a full sequence.
  double reward(const Sequence& s) const {
    const int first = 1 + cfg_.prompt_len, fav = s[1];
    double r = 0;
    for (int l = 0; l < cfg_.response_len; ++l) {
      const int y = s[static_cast<std::size_t>(first + l)];
      r += token_reward_[static_cast<std::size_t>(y)];
      if (l > 0 && y == (s[static_cast<std::size_t>(first + l - 1)] + 1) % cfg_.alphabet) r += cfg_.pattern;
      if (y == fav) r += cfg_.favourite;
    }
    return r;
  }

  /// A preference pair: one prompt, two data responses, labelled by Bradley-Terry on the true
  /// reward (`truth`: by the higher true reward instead, for measuring accuracy).
  struct Pair {
    Sequence chosen, rejected;
  };
  Pair sample_pair(Rng& rng, bool truth = false) const {
    const Sequence prompt = sample_prompt(rng);
    Pair p{complete_from_data(prompt, rng), complete_from_data(prompt, rng)};
    const double d = reward(p.chosen) - reward(p.rejected);
    const bool keep = truth ? d >= 0 : rng.uniform() < 1.0 / (1.0 + std::exp(-d));
    if (!keep) std::swap(p.chosen, p.rejected);
    return p;
  }

  /// The data's exact per-token entropy rate over the response, mean over its R positions: the
  /// lowest token-mean NLL any model can reach on the SFT corpus (the chain's marginal at each
  /// position times its rows' entropies).
  double data_entropy() const {
    const auto V = static_cast<std::size_t>(cfg_.alphabet);
    const auto entropy = [&](const double* p) {
      double h = 0;
      for (std::size_t v = 0; v < V; ++v) h -= p[v] > 0 ? p[v] * std::log(p[v]) : 0.0;
      return h;
    };
    std::vector<double> m = start_, next(V);
    double total = entropy(start_.data());
    for (int l = 1; l < cfg_.response_len; ++l) {
      std::fill(next.begin(), next.end(), 0.0);
      for (std::size_t a = 0; a < V; ++a) {
        total += m[a] * entropy(chain_.data() + a * V);
        for (std::size_t b = 0; b < V; ++b) next[b] += m[a] * chain_[a * V + b];
      }
      m = next;
    }
    return total / cfg_.response_len;
  }

  LmBatch batch(const std::vector<Sequence>& seqs, torch::Dtype dtype) const {
    const std::int64_t B = static_cast<std::int64_t>(seqs.size()), N = seq_len();
    torch::Tensor ids = torch::empty({B, N}, torch::TensorOptions().dtype(torch::kLong));
    auto a = ids.accessor<std::int64_t, 2>();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t k = 0; k < N; ++k) a[b][k] = seqs[static_cast<std::size_t>(b)][static_cast<std::size_t>(k)];
    torch::Tensor mask = torch::zeros({B, N - 1}, torch::TensorOptions().dtype(dtype));
    mask.slice(1, cfg_.prompt_len).fill_(1.0);
    return {ids, ids.slice(1, 0, N - 1).contiguous(), ids.slice(1, 1).contiguous(), mask};
  }

  /// Responses sampled from a model, one per prompt ([BOS, prompt] each), with `rng` (the model's
  /// next-token distribution at temperature 1, read in double).
  std::vector<Sequence> generate(CausalLm& model, std::vector<Sequence> prompts, Rng& rng) const {
    torch::NoGradGuard no_grad;
    const std::int64_t B = static_cast<std::int64_t>(prompts.size());
    torch::Tensor ids = batch_prefix(prompts);
    for (int l = 0; l < cfg_.response_len; ++l) {
      const torch::Tensor p =
          torch::softmax(model->logits(ids).select(1, ids.size(1) - 1).to(torch::kFloat64), -1).contiguous();
      const auto pa = p.accessor<double, 2>();
      torch::Tensor next = torch::empty({B, 1}, torch::TensorOptions().dtype(torch::kLong));
      for (std::int64_t b = 0; b < B; ++b) {
        const int y = rng.categorical(&pa[b][0], cfg_.alphabet);
        prompts[static_cast<std::size_t>(b)].push_back(y);
        next[b][0] = y;
      }
      ids = torch::cat({ids, next}, 1);
    }
    return prompts;
  }

 private:
  torch::Tensor batch_prefix(const std::vector<Sequence>& prompts) const {
    const std::int64_t B = static_cast<std::int64_t>(prompts.size()), n = 1 + cfg_.prompt_len;
    torch::Tensor ids = torch::empty({B, n}, torch::TensorOptions().dtype(torch::kLong));
    auto a = ids.accessor<std::int64_t, 2>();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t k = 0; k < n; ++k) a[b][k] = prompts[static_cast<std::size_t>(b)][static_cast<std::size_t>(k)];
    return ids;
  }
  static void softmax_rows(std::vector<double>& w, std::size_t width) {
    for (std::size_t o = 0; o < w.size(); o += width) {
      double mx = w[o], z = 0;
      for (std::size_t k = 0; k < width; ++k) mx = std::max(mx, w[o + k]);
      for (std::size_t k = 0; k < width; ++k) z += (w[o + k] = std::exp(w[o + k] - mx));
      for (std::size_t k = 0; k < width; ++k) w[o + k] /= z;
    }
  }

  LanguageConfig cfg_;
  std::vector<double> token_reward_, start_, chain_;
};

}  // namespace examples
