/// @file loss/sequence_loss.hpp
/// The machinery of losses with ONE differentiable input (nll, bradley_terry_ranking): the
/// single-input counterpart of loss/pairwise.hpp. Evaluate the input once, apply a
/// per-example function, normalize the sum, and keep d loss / d input value so backward() is one
/// streaming write.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>

#include <unsupported/Eigen/CXX11/Tensor>

#include "../config.hpp"
#include "../errors.hpp"
#include "../detail/tensor.hpp"

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
  Metrics metrics;

  SequenceResult(const char* fn, const char* grad_name, Input in)
      : fn_(fn), grad_name_(grad_name), in_(std::move(in)) {}

  /// @brief Writes d loss / d input, shaped like the input's leaves: [batch, tokens] for a
  /// masked_sum/masked_mean expression (0 at masked-out tokens), [batch] for a plain sequence
  /// tensor, [batch, K] for a matrix of scores. The shape is checked before anything is written.
  /// @throws shape_error naming the gradient argument.
  template <class G>
  void backward(G&& grad) const {
    const auto g = in_.grad_view(std::forward<G>(grad), fn_, grad_name_);
    in_.backward_to(d_.data(), g);
  }

  /// d loss / d input value (per example for a sequence; row-major [batch * K] for scores).
  const Eigen::Tensor<Scalar, 1>& grad_value() const noexcept { return d_; }

  // Filled by the loss.
  Eigen::Tensor<Scalar, 1> d_;

 private:
  const char* fn_;
  const char* grad_name_;
  Input in_;
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
  void backward_to(const S* upstream, MatrixOut<S> grad) const noexcept {
    std::copy(upstream, upstream + m_.rows * m_.cols, grad.data);
  }

 private:
  Matrix<S> m_;
};

/// Runs a one-input sequence loss over the batch: term(i) gives example i's SingleTerm; the
/// batch loss is the sum of the per-example losses divided by `normalizer` (the batch size for
/// a mean), and the stored value gradients are d term / d value divided by it too.
template <class Metrics, class Seq, class Term>
SequenceResult<Metrics, Seq> single_loss(const char* fn, const char* grad_name, Seq s, double normalizer, Term&& term) {
  using S = typename Seq::Scalar;
  const Index B = s.size();
  SequenceResult<Metrics, Seq> out(fn, grad_name, std::move(s));
  out.losses = Eigen::Tensor<S, 1>(B);
  out.d_ = Eigen::Tensor<S, 1>(B);
  const double inv = 1.0 / normalizer;
  double total = 0;
  for (Index i = 0; i < B; ++i) {
    const SingleTerm t = term(i);
    out.losses(i) = static_cast<S>(t.loss);
    out.d_(i) = static_cast<S>(t.d * inv);
    total += t.loss;
  }
  out.loss = static_cast<S>(total * inv);
  return out;
}

}  // namespace detail
}  // namespace prefloss
