// The bridge between a model's logits and prefloss: token log-probs from a log-softmax, and the
// chain rule from d loss / d logp (what prefloss's backward() writes) back to the logits.
//
// log_softmax_rows / log_softmax_gather_backward work on any [rows, V] logit buffer and are
// written as a trainer's kernels would be (they may move into the library); TabularPolicy
// applies them to the task's table of logits.
#pragma once
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "task.hpp"

namespace examples {

/// out[r, :] = z[r, :] - logsumexp(z[r, :]) for each of `rows` rows of V logits.
template <class T>
void log_softmax_rows(const T* z, T* out, std::size_t rows, int V) {
  for (std::size_t r = 0; r < rows; ++r) {
    const T* zr = z + r * static_cast<std::size_t>(V);
    T* o = out + r * static_cast<std::size_t>(V);
    const T mx = *std::max_element(zr, zr + V);
    double s = 0;
    for (int v = 0; v < V; ++v) s += std::exp(static_cast<double>(zr[v] - mx));
    const T lse = mx + static_cast<T>(std::log(s));
    for (int v = 0; v < V; ++v) o[v] = zr[v] - lse;
  }
}

/// @brief Fused gather + log-softmax backward.
///
/// For token log-probs logp[b, t] = log_softmax(z[row(b, t)])[tok[b, t]], accumulates
///   grad_z[row, v] += sum over tokens of that row of  g[b, t] * (1[v == tok] - softmax(z[row])[v])
/// into grad_z, from the log-softmax table lsm (= log_softmax(z)). Tokens whose mask is 0 are
/// skipped (prefloss writes 0 there, but padding may hold anything). One pass over the tokens,
/// then one pass over the rows that were touched; `row_g` is scratch of rows doubles.
/// @param row_of(b, t) the logit row of token (b, t)
template <class T, class RowOf>
void log_softmax_gather_backward(const T* lsm, int V, const Ids& tok, const Mask& mask, const Tokens& g, RowOf&& row_of,
                                 T* grad_z, std::vector<double>& row_g) {
  std::fill(row_g.begin(), row_g.end(), 0.0);
  const Index B = tok.dimension(0), L = tok.dimension(1);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t) {
      const Index k = b * L + t;
      if (!mask.data()[k]) continue;
      const std::size_t r = row_of(b, t);
      grad_z[r * static_cast<std::size_t>(V) + static_cast<std::size_t>(tok.data()[k])] += g.data()[k];
      row_g[r] += g.data()[k];
    }
  for (std::size_t r = 0; r < row_g.size(); ++r) {
    if (row_g[r] == 0) continue;
    for (int v = 0; v < V; ++v) {
      const std::size_t k = r * static_cast<std::size_t>(V) + static_cast<std::size_t>(v);
      grad_z[k] -= static_cast<T>(std::exp(static_cast<double>(lsm[k])) * row_g[r]);
    }
  }
}

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

/// A tabular softmax policy: logits [X, L, V], pi_l(. | x) = softmax(logits[x, l, :]).
class TabularPolicy {
 public:
  Shape shape;
  std::vector<float> logits;

  TabularPolicy(const Shape& s, std::vector<float> init)
      : shape(s), logits(std::move(init)), lsm_(s.size()), row_g_(s.rows()) {
    refresh();
  }

  /// Recomputes the log-softmax table; call after changing the logits.
  void refresh() { log_softmax_rows(logits.data(), lsm_.data(), shape.rows(), shape.V); }

  /// Token log-probs [batch, max_len]; NaN at padding, which prefloss's masked reductions skip.
  void token_logp(const Sequences& seq, Tokens& out) const { gather(shape, lsm_.data(), seq, out); }

  /// grad_logits += the chain rule of d loss / d logp (from prefloss's backward) through the
  /// log-softmax, by the fused kernel.
  void backward(const Sequences& seq, const Tokens& grad_logp, std::vector<float>& grad_logits) {
    log_softmax_gather_backward(
        lsm_.data(), shape.V, seq.tok, seq.mask, grad_logp,
        [&](Index b, Index t) {
          return static_cast<std::size_t>(seq.prompt[static_cast<std::size_t>(b)]) * static_cast<std::size_t>(shape.L) +
                 static_cast<std::size_t>(t);
        },
        grad_logits.data(), row_g_);
  }

  Dist dist() const { return dist_from_logits(shape, logits); }

 private:
  std::vector<float> lsm_;
  std::vector<double> row_g_;
};

}  // namespace examples
