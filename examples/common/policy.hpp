// A tabular softmax policy, and the bridge between its logits and prefloss: token log-probs by
// prefloss::token_logprobs, and the chain rule from d loss / d logp (what a loss's backward()
// writes) back to the logits by token_logprobs' backward.
//
// token_logprobs reads a [batch, tokens, vocab] logits tensor, one row per token, as a model's
// forward pass produces it. Here every response to prompt x reads the same table row logits[x, l]
// at position l, so the policy copies each selected token's row into such a tensor (NaN rows at
// padding, which token_logprobs never reads) and adds the gradient rows back into the table: the
// adjoint of the copy.
#pragma once
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "task.hpp"

namespace examples {

/// A tabular softmax policy: logits [X, L, V], pi_l(. | x) = softmax(logits[x, l, :]).
class TabularPolicy {
 public:
  using Logits = Eigen::Tensor<float, 3, Eigen::RowMajor>;  ///< [batch, tokens, vocab]

  Shape shape;
  std::vector<float> logits;

  TabularPolicy(const Shape& s, std::vector<float> init) : shape(s), logits(std::move(init)) {}

  /// Token log-probs [batch, max_len]; 0 at padding (prefloss's masked reductions skip it).
  void token_logp(const Sequences& seq, Tokens& out) const {
    const Logits z = token_rows(seq);
    out = pl::token_logprobs(z, seq.tok, seq.mask).logp;
  }

  /// grad_logits += the chain rule of d loss / d logp (from prefloss's backward) through the
  /// log-softmax: token_logprobs' backward per token, the gradient rows of a table row summed in
  /// double and added to grad_logits once. (Summed in float, the rows of a batch whose terms
  /// cancel exactly, as IPO's chosen and rejected sides do at step 0, leave rounding noise of
  /// ~1e-8 that Adam's first step, g / (|g| + 1e-8), turns into a step of up to lr.)
  ///
  /// grad_logits may be float, or double to keep the gradient unrounded (mpi_data_parallel sums
  /// it over ranks).
  template <class G>
  void backward(const Sequences& seq, const Tokens& grad_logp, std::vector<G>& grad_logits) const {
    const Logits z = token_rows(seq);
    // The forward again: a trainer keeps the result of its forward pass (it holds views of z,
    // tokens and mask); here the forward is cheap.
    const auto r = pl::token_logprobs(z, seq.tok, seq.mask);
    Logits g(z.dimensions());
    r.backward(grad_logp, g);
    const auto V = static_cast<std::size_t>(shape.V);
    std::vector<double> acc(shape.size(), 0.0);
    std::vector<bool> touched(shape.rows(), false);
    for (Index b = 0; b < seq.size(); ++b)
      for (int l = 0; l < shape.L; ++l) {
        if (!seq.mask(b, l)) continue;
        const float* gr =
            g.data() +
            (static_cast<std::size_t>(b) * static_cast<std::size_t>(shape.L) + static_cast<std::size_t>(l)) * V;
        const std::size_t row = shape.row(seq.prompt[static_cast<std::size_t>(b)], l);
        touched[row / V] = true;
        for (std::size_t v = 0; v < V; ++v) acc[row + v] += static_cast<double>(gr[v]);
      }
    for (std::size_t k = 0; k < acc.size(); ++k)
      if (touched[k / V]) grad_logits[k] += static_cast<G>(acc[k]);
  }

  /// Adds to magnitude[k], for every entry k of the table, a bound on the sum of |the terms|
  /// backward() adds into it (what bounds the rounding error of that sum): each term is
  /// (onehot - p) * grad_logp[b, l] of a token that reads the entry's row, at most
  /// |grad_logp[b, l]| since |onehot - p| <= 1.
  void gradient_magnitude(const Sequences& seq, const Tokens& grad_logp, std::vector<double>& magnitude) const {
    const auto V = static_cast<std::size_t>(shape.V);
    for (Index b = 0; b < seq.size(); ++b)
      for (int l = 0; l < shape.L; ++l) {
        if (!seq.mask(b, l)) continue;
        const std::size_t row = shape.row(seq.prompt[static_cast<std::size_t>(b)], l);
        for (std::size_t v = 0; v < V; ++v) magnitude[row + v] += std::abs(static_cast<double>(grad_logp(b, l)));
      }
  }

  Dist dist() const { return dist_from_logits(shape, logits); }

  /// Token log-probs of both responses of every pair.
  struct PairLogp {
    Tokens chosen, rejected;
  };
  PairLogp token_logp(const Pairs& p) const {
    PairLogp out;
    token_logp(p.chosen, out.chosen);
    token_logp(p.rejected, out.rejected);
    return out;
  }

  /// grad_logits += d loss / d logits for the result r of a loss over pairs:
  /// r.backward(g_chosen, g_rejected) gives d loss / d token log-prob, then each side's chain rule.
  template <class R, class G>
  void backward(const Pairs& p, const R& r, std::vector<G>& grad_logits) const {
    Tokens gc(p.chosen.size(), shape.L), gr(p.rejected.size(), shape.L);
    r.backward(gc, gr);
    backward(p.chosen, gc, grad_logits);
    backward(p.rejected, gr, grad_logits);
  }

 private:
  /// z[b, l, :] = logits[prompt_b, l, :] at selected tokens, NaN elsewhere.
  Logits token_rows(const Sequences& seq) const {
    Logits z(seq.size(), shape.L, shape.V);
    const auto V = static_cast<std::size_t>(shape.V);
    for (Index b = 0; b < seq.size(); ++b)
      for (int l = 0; l < shape.L; ++l) {
        float* o = z.data() +
                   (static_cast<std::size_t>(b) * static_cast<std::size_t>(shape.L) + static_cast<std::size_t>(l)) * V;
        if (seq.mask(b, l))
          std::copy_n(logits.data() + shape.row(seq.prompt[static_cast<std::size_t>(b)], l), V, o);
        else
          std::fill_n(o, V, std::numeric_limits<float>::quiet_NaN());
      }
    return z;
  }
};

/// A tabular critic for PPO's GAE: one value V[x, position] per table row.
struct TabularCritic {
  Shape shape;
  std::vector<float> v;  ///< [X * L]

  explicit TabularCritic(const Shape& s) : shape(s), v(s.rows(), 0.0f) {}

  /// V at every token of a batch [batch, max_len]; NaN at padding (value_loss and gae skip it).
  Tokens values(const Sequences& s) const {
    Tokens out(s.size(), shape.L);
    for (Index b = 0; b < s.size(); ++b)
      for (int l = 0; l < shape.L; ++l)
        out(b, l) = s.mask(b, l) ? v[index(s, b, l)] : std::numeric_limits<float>::quiet_NaN();
    return out;
  }

  /// grad += the gradient d loss / d V of a batch (value_loss's output) summed into each row:
  /// the adjoint of values().
  void backward(const Sequences& s, const Tokens& g, std::vector<float>& grad) const {
    for (Index b = 0; b < s.size(); ++b)
      for (int l = 0; l < shape.L; ++l)
        if (s.mask(b, l)) grad[index(s, b, l)] += g(b, l);
  }

 private:
  std::size_t index(const Sequences& s, Index b, int l) const {
    return static_cast<std::size_t>(s.prompt[static_cast<std::size_t>(b)] * shape.L + l);
  }
};

}  // namespace examples
