/// @file loss/token_loss.hpp
/// The result type and driver of every token-level loss (ppo_clip, value_loss): a forward pass
/// over the caller's token tensors through a per-token kernel (detail/token_kernels.hpp), fused
/// with the gradient when the caller gives an output, and a backward() that streams it later.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/eigen.hpp"
#include "../detail/lowp_tokens.hpp"
#include "../detail/tensor.hpp"
#include "../detail/token_kernels.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/aggregation.hpp"

namespace prefloss {

/// @brief Result of a token-level loss: batch loss, per-sequence contributions, metrics, and a
/// backward() that streams the token gradient from the caller's inputs.
///
/// Holds views of the inputs, not copies: the caller's tensors must outlive the result until
/// backward() has run (a result returned from a helper whose tensors were locals reads freed
/// memory). Also holds the per-row aggregation factors ([batch] doubles). Params::visit<Sel>(f)
/// calls f with the concrete kernel; Sel is the entry point's compile-time choice (e.g. whether
/// there is a reference policy), fixed in the constructor, so backward() instantiates only the
/// kernels that entry point can run.
///
/// S is the compute type (float for 16-bit inputs): loss, losses and metrics have it. In is the
/// inputs type (detail::TokenInputs for one float/double storage type, detail::LowpTokenInputs
/// when an input is bf16/half); the gradient has In::grad_type, the differentiated input's
/// storage type.
template <class S, class M, class Params, class Metrics, class In = detail::TokenInputs<S, M>>
class TokenLossResult {
  using TokenInputs = In;
  using Grad = typename In::grad_type;
  using TokenStats = detail::TokenStats;
  using AggregationSpec = detail::AggregationSpec;

 public:
  using Scalar = S;
  Scalar loss = 0;                  ///< the batch loss
  Eigen::Tensor<Scalar, 1> losses;  ///< per-sequence contributions [batch]; loss = sum(losses)
  Metrics metrics;                  ///< this call's metrics: metric_sums.metrics()
  /// the sums metrics is finalized from: merge them across shards for the whole batch's metrics
  MetricSums<Metrics> metric_sums;

  /// threads: where the forward and every backward() run their rows (see prefloss::Threads;
  /// the pool must outlive this result).
  template <class Sel>
  TokenLossResult(const char* fn, const TokenInputs& in, const Params& params, const char* grad_name, Sel,
                  Threads threads = {})
      : losses(in.rows),
        fn_(fn),
        grad_name_(grad_name),
        in_(in),
        params_(params),
        scales_(static_cast<std::size_t>(in.rows)),
        threads_(threads),
        backward_(&backward_of<Sel>) {}

  /// @brief Writes d loss / d (first token input) into grad ([batch, tokens] row-major tensor or
  /// map of that input's storage type; bf16/half: the float gradient rounded once to nearest
  /// even; for packed inputs a rank-1 [total_tokens] tensor or map, or pl::packed(grad, cu) with
  /// the inputs' offsets): every element is overwritten, masked-out tokens get 0.
  /// @throws shape_error naming the gradient argument, layout_error when it is not aligned to
  /// its element type (nothing is written then).
  template <class G>
  void backward(G&& grad) const {
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, Grad>,
                  "prefloss: gradient tensor must have the differentiated input's scalar type (bf16 in: bf16 out)");
    const detail::MatrixOut<Grad> g = detail::matrix_out(std::forward<G>(grad), in_.layout(), fn_, grad_name_);
    backward_(params_, in_, scales_.data(), g, threads_);
  }

  /// d loss / d S_i per row, where S_i is row i's weighted token-loss sum (the aggregation
  /// factor: 1/token_count, 1/B, 1/(B W_i) or 1/(B C)).
  const std::vector<double>& row_scales() const noexcept { return scales_; }

  // Called once by the loss's entry point: the forward alone (G = NoGrad), or fused with the
  // gradient into *grad_out, whose shape and alignment are checked before anything is computed.
  template <class Sel, class G>
  TokenStats run(const AggregationSpec& spec, G* grad_out) {
    if constexpr (detail::is_no_grad_v<G>) {
      return forward<Sel>(spec);
    } else {
      return forward_fused<Sel>(spec, detail::matrix_out(*grad_out, in_.layout(), fn_, "grad_out"));
    }
  }

 private:
  template <class Sel>
  TokenStats forward(const AggregationSpec& spec) {
    TokenStats st;
    params_.template visit<Sel>([&](const auto& kernel) {
      st = detail::token_forward(kernel, in_, spec, scales_.data(), losses.data(), threads_);
    });
    loss = static_cast<S>(st.loss);
    return st;
  }
  template <class Sel>
  TokenStats forward_fused(const AggregationSpec& spec, const detail::MatrixOut<Grad>& grad) {
    TokenStats st;
    params_.template visit<Sel>([&](const auto& kernel) {
      st = detail::token_forward_fused(kernel, in_, spec, scales_.data(), losses.data(), grad, threads_);
    });
    loss = static_cast<S>(st.loss);
    return st;
  }

  using BackwardFn = void (*)(const Params&, const TokenInputs&, const double*, const detail::MatrixOut<Grad>&,
                              const Threads&);
  template <class Sel>
  static void backward_of(const Params& p, const TokenInputs& in, const double* scales,
                          const detail::MatrixOut<Grad>& g, const Threads& threads) {
    p.template visit<Sel>([&](const auto& kernel) { detail::token_backward(kernel, in, scales, g, threads); });
  }

  const char* fn_;
  const char* grad_name_;
  TokenInputs in_;
  Params params_;
  std::vector<double> scales_;
  Threads threads_;
  BackwardFn backward_;
};

}  // namespace prefloss
