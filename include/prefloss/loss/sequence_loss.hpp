/// @file loss/sequence_loss.hpp
/// The machinery of losses with ONE differentiable input (nll, bradley_terry_ranking): the
/// single-input counterpart of loss/pairwise.hpp. Evaluate the input once, apply a
/// per-example function, normalize the sum, and keep d loss / d input value so backward() is one
/// streaming write.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../detail/eigen.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/masked.hpp"
#include "../reduce/sequence.hpp"

namespace prefloss {

/// @brief Result of a loss of one input: the batch loss, per-example losses, metrics, and the
/// gradient with respect to the input.
///
/// Holds a copy of the input (a view of the caller's tensors: keep them alive until backward()
/// has run) and d loss / d value per input value.
template <class Metrics, class Input>
class SequenceResult {
 public:
  using Scalar = typename Input::Scalar;
  Scalar loss = 0;                  ///< batch loss
  Eigen::Tensor<Scalar, 1> losses;  ///< per-example losses [batch]
  Metrics metrics;                  ///< this call's metrics: metric_sums.metrics()
  /// the sums metrics is finalized from: merge them across shards for the whole batch's metrics
  MetricSums<Metrics> metric_sums;

  /// threads: where backward() writes its rows (see prefloss::Threads; the pool must outlive
  /// this result).
  SequenceResult(const char* fn, const char* grad_name, Input in, Threads threads = {})
      : fn_(fn), grad_name_(grad_name), in_(std::move(in)), threads_(threads) {}

  /// @brief Writes d loss / d input, shaped like the input's leaves: [batch, tokens] for a
  /// masked_sum/masked_mean expression (0 at masked-out tokens), [batch] for a plain sequence
  /// tensor, [batch, K] for a matrix of scores. The shape is checked before anything is written.
  /// @throws shape_error naming the gradient argument.
  template <class G>
  void backward(G&& grad) const {
    const auto g = in_.grad_view(std::forward<G>(grad), fn_, grad_name_);
    in_.backward_to(d_.data(), g, threads_);
  }

  /// d loss / d input value (per example for a sequence; row-major [batch * K] for scores).
  const Eigen::Tensor<Scalar, 1>& grad_value() const noexcept { return d_; }

  // Filled by the loss.
  Eigen::Tensor<Scalar, 1> d_;

 private:
  const char* fn_;
  const char* grad_name_;
  Input in_;
  Threads threads_;
};

namespace detail {

/// Per-example loss and its derivative with respect to the example's one value.
struct SingleTerm {
  double loss, d;
};

/// A plain row-major [rows, cols] score matrix as a differentiable input; its gradient is a
/// [rows, cols] tensor and its upstream is row-major, one value per score.
template <class S>
class PlainMatrix {
  static_assert(is_real_v<S>, "prefloss: scores must be float or double");

 public:
  using Scalar = S;
  explicit PlainMatrix(Matrix<S> m) : m_(m) {}

  Index rows() const noexcept { return m_.rows; }
  Index cols() const noexcept { return m_.cols; }
  std::string shape() const { return shape_str(m_.rows, m_.cols); }
  double value(Index i, Index j) const noexcept { return m_.row(i)[j]; }

  template <class G>
  MatrixOut<S> grad_view(G&& grad, const char* fn, const char* name) const {
    static_assert(std::is_same_v<tensor_scalar_t<G>, S>, "prefloss: gradient tensor must have the scores' scalar type");
    return matrix_out(std::forward<G>(grad), m_.rows, m_.cols, fn, name);
  }
  void backward_to(const S* upstream, MatrixOut<S> grad, const Threads& = {}) const noexcept {
    std::copy(upstream, upstream + m_.rows * m_.cols, grad.data);
  }

 private:
  Matrix<S> m_;
};

// ---- fused forward + backward ----------------------------------------------------------------
//
// A fused call (a loss given its gradient outputs) writes each example's gradient rows right
// after it has read that example's rows, so its outputs must be checked in full first, and must
// not share memory with anything it has yet to read.

/// Write view of a sequence input's gradient: [batch, tokens] for an expression, [batch] for a
/// plain tensor.
template <class Seq>
struct grad_out;
template <class S, class M, Reduction R>
struct grad_out<MaskedReduction<S, M, R>> {
  using type = MatrixOut<S>;
};
template <class S>
struct grad_out<PlainSequence<S>> {
  using type = S*;
};
template <class Seq>
using grad_out_t = typename grad_out<Seq>::type;

/// Calls f(data, bytes, leaf) for every caller tensor a sequence input reads.
template <class S, class M, Reduction R, class F>
void for_each_leaf(const MaskedReduction<S, M, R>& s, F&& f) {
  const auto& x = s.tokens_view();
  const auto& m = s.mask_view();
  f(static_cast<const void*>(x.data), static_cast<std::size_t>(x.count()) * sizeof(S), "tokens");
  f(static_cast<const void*>(m.data), static_cast<std::size_t>(m.count()) * sizeof(M), "mask");
}
template <class S, class F>
void for_each_leaf(const PlainSequence<S>& s, F&& f) {
  f(static_cast<const void*>(s.view().data), static_cast<std::size_t>(s.view().size) * sizeof(S), "values");
}
template <class T, class F>
void for_each_leaf(const Vector<T>& v, F&& f) {
  f(static_cast<const void*>(v.data), static_cast<std::size_t>(v.size) * sizeof(T), "values");
}
template <class T, class F, class = std::enable_if_t<is_tensor_v<T>>>
void for_each_leaf(const T& t, F&& f) {
  f(static_cast<const void*>(t.data()), static_cast<std::size_t>(t.size()) * sizeof(tensor_scalar_t<T>), "values");
}

/// @brief Throws layout_error if output `out` shares a byte with a tensor that input `in`
/// reads. The two-pass backward writes after the forward has read everything; a fused call does
/// not, so a gradient over (say) the mask of a later row would change what it reads.
template <class G, class In>
void require_not_input(const char* fn, const char* out_name, const G& out, const char* in_name, const In& in) {
  const auto lo = reinterpret_cast<std::uintptr_t>(out.data());
  const auto hi = lo + static_cast<std::uintptr_t>(out.size()) * sizeof(tensor_scalar_t<G>);
  for_each_leaf(in, [&](const void* p, std::size_t bytes, const char* leaf) {
    const auto a = reinterpret_cast<std::uintptr_t>(p), b = a + bytes;
    if (lo < hi && a < b && lo < b && a < hi)
      throw layout_error(std::string(fn) + ": output '" + out_name + "' overlaps input '" + in_name + "' (its " + leaf +
                         ") in memory; a call with gradient outputs reads its inputs while it writes them: pass a "
                         "separate output tensor");
  });
}

/// Whether a sequence input's gradient goes through streaming stores (as its backward_to decides).
template <class S, class M, Reduction R>
bool grad_streams(const MaskedReduction<S, M, R>& s) noexcept {
  return s.streams();
}
template <class S>
bool grad_streams(const PlainSequence<S>&) noexcept {
  return false;
}

/// Writes example i's gradient for a sequence input: the row a backward_to would write, with the
/// same scale and the same kernel (so the same bits).
template <class S, class M, Reduction R>
void write_grad_row(const MaskedReduction<S, M, R>& s, bool stream, Index i,
                    typename MaskedReduction<S, M, R>::Scalar upstream, const MatrixOut<S>& grad) noexcept {
  if (stream) {
    s.template backward_row<true>(i, upstream, grad);
  } else {
    s.template backward_row<false>(i, upstream, grad);
  }
}
template <class S>
void write_grad_row(const PlainSequence<S>&, bool, Index i, S upstream, S* grad) noexcept {
  grad[i] = upstream;
}

/// Rows a block of a sequence input's work takes on a pool (see row_grain); plain [batch]
/// values are one block.
template <class S, class M, Reduction R>
Index seq_grain(const MaskedReduction<S, M, R>& s) noexcept {
  return row_grain(s.size(), s.tokens_view().count());
}
template <class S>
Index seq_grain(const PlainSequence<S>& s) noexcept {
  return s.size() > 0 ? s.size() : 1;
}

/// @brief On a pool, fills the per-example values a loss's terms read (load(i) for every i, in
/// blocks of rows) and returns true; the terms then run in order on the calling thread and read
/// them instead of the tokens. Without a pool it does nothing and returns false: the terms read
/// each example's tokens themselves, right before its gradient row is written.
template <class Seq, class Load>
bool preload_values(const Threads& threads, const Seq& s, Load&& load) {
  if (threads.count() == 1) return false;
  threads.for_rows(s.size(), seq_grain(s), [&](Index b, Index e) {
    for (Index i = b; i < e; ++i) load(i);
  });
  return true;
}

/// Checks a fused call's gradient output for a one-input loss (shape, alignment, not over any
/// input: `inputs` calls its argument with (name, input) for each) and returns its write view.
template <class Seq, class G, class Inputs>
grad_out_t<Seq> single_grad_view(const char* fn, const char* name, const Seq& s, G& g, Inputs&& inputs) {
  auto view = s.grad_view(g, fn, name);
  inputs([&](const char* in_name, const auto& in) { require_not_input(fn, name, g, in_name, in); });
  return view;
}

/// Runs a one-input sequence loss over the batch: term(i) gives example i's SingleTerm (and
/// reads example i's value then, not before); the batch loss is the sum of the per-example
/// losses divided by `normalizer` (the batch size for a mean), and the stored value gradients
/// are d term / d value divided by it too. With a gradient view (the fused form), example i's
/// gradient row is written right after term(i), while its mask is still in cache, by the
/// kernel and with the scale backward() uses.
template <class Metrics, class Seq, class Term>
SequenceResult<Metrics, Seq> single_loss(const char* fn, const char* grad_name, const Seq& s, double normalizer,
                                         Term&& term, const grad_out_t<Seq>* grad, const Threads& threads = {}) {
  using S = typename Seq::Scalar;
  const Index B = s.size();
  SequenceResult<Metrics, Seq> out(fn, grad_name, s, threads);
  out.losses = Eigen::Tensor<S, 1>(B);
  out.d_ = Eigen::Tensor<S, 1>(B);
  const double inv = 1.0 / normalizer;
  double total = 0;
  // On a pool the rows are written after every term (the values were read before, in
  // parallel: see preload_values): the same rows, by the same kernel, with the same scales.
  const bool pooled = threads.count() > 1;
  const bool stream = grad && !pooled && grad_streams(s);
  for (Index i = 0; i < B; ++i) {
    const SingleTerm t = term(i);
    out.losses(i) = static_cast<S>(t.loss);
    out.d_(i) = static_cast<S>(t.d * inv);
    total += t.loss;
    if (grad && !pooled) write_grad_row(s, stream, i, out.d_(i), *grad);
  }
  if (stream) stream_fence();
  if (grad && pooled) s.backward_to(out.d_.data(), *grad, threads);
  out.loss = static_cast<S>(total * inv);
  return out;
}

}  // namespace detail
}  // namespace prefloss
