/// @file reduce/masked.hpp
/// masked_sum / masked_mean: lazy [batch] sequence expressions over [batch, tokens] tokens
/// (or a packed batch, see packed.hpp).
#pragma once

#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../detail/eigen.hpp"
#include "../detail/lowp.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../parallel.hpp"

namespace prefloss {

/// How a masked row of tokens becomes one sequence value.
enum class Reduction { sum, mean };

/// @brief A lazy masked reduction of row-major [batch, tokens] values to [batch].
///
/// Holds views (pointer and extents) of the caller's tokens and mask, not copies: the tensors
/// must outlive the expression and any loss result built from it. Tokens whose mask entry is
/// zero are skipped, never multiplied, so they may hold inf or NaN. A float/double mask acts as
/// a per-token weight w: sum = sum_t w_t x_t and mean = sum_t w_t x_t / sum_t w_t over w_t != 0;
/// the mean of a row with no selected token is 0 with gradient 0.
///
/// S is the tokens' storage type: float, double, Eigen::bfloat16 or Eigen::half. 16-bit tokens
/// are computed as float (Scalar is float: the sequence values and the upstream gradient), and
/// their gradient is stored as S, each float gradient rounded once to nearest even.
template <class S, class M, Reduction R>
class MaskedReduction {
  static_assert(detail::is_token_scalar_v<S>, "prefloss: tokens must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");

 public:
  /// The type values are computed and returned in (float for 16-bit tokens).
  using Scalar = detail::compute_t<S>;
  /// The tokens' (and the token gradient's) storage type.
  using Storage = S;
  using MaskScalar = M;
  static constexpr Reduction reduction = R;

  MaskedReduction(detail::Matrix<S> tokens, detail::Matrix<M> mask) : x_(tokens), m_(mask) {}

  /// Number of sequences (the batch).
  Index size() const noexcept { return x_.rows; }
  /// Tokens per sequence (padded input); 0 for packed input, whose rows differ in length.
  Index tokens() const noexcept { return x_.cols; }
  /// Whether the token leaves are packed (pl::packed) rather than a [batch, tokens] matrix.
  bool packed() const noexcept { return x_.packed(); }
  /// Shape of the token leaves, for messages.
  std::string shape() const { return detail::layout_str(x_.layout()); }

  /// Value of sequence i (double accumulation).
  double value(Index i) const noexcept {
    const Index n = x_.len(i);
    if constexpr (R == Reduction::sum) {
      return detail::masked_row_sums<true, false>(x_.row(i), m_.row(i), n).value;
    } else {
      const auto r = detail::masked_row_sums<true, true>(x_.row(i), m_.row(i), n);
      return r.weight != 0 ? r.value / r.weight : 0.0;
    }
  }

  /// Whether sequence i has no selected token (its mean is 0 by definition, not by value).
  bool empty(Index i) const noexcept {
    return detail::masked_row_sums<false, true>(static_cast<const S*>(nullptr), m_.row(i), x_.len(i)).weight == 0;
  }

  /// Writes all [batch] values to out (no checks; out holds size() elements); blocks of rows on
  /// `threads` when given (each value is the same bits whichever thread computes it).
  void eval_to(Scalar* out, const Threads& threads = {}) const {
    threads.for_rows(x_.rows, grain(), [&](Index b, Index e) {
      for (Index i = b; i < e; ++i) out[i] = static_cast<Scalar>(value(i));
    });
  }

  /// @brief The [batch] values as a new tensor (float for 16-bit tokens).
  /// @param threads rows split over a pool (see prefloss::Threads); the same bits for any count.
  /// (A loss given this expression splits it by its own options' threads.)
  Eigen::Tensor<Scalar, 1> eval(const Threads& threads = {}) const {
    Eigen::Tensor<Scalar, 1> out(x_.rows);
    eval_to(out.data(), threads);
    return out;
  }

  /// Checks that `grad` can receive this expression's gradient (a [batch, tokens] row-major
  /// tensor or map of the tokens' storage type; for packed tokens a rank-1 [total_tokens] one or
  /// pl::packed(grad, cu) with the same offsets) and returns a write view of it.
  template <class G>
  detail::MatrixOut<S> grad_view(G&& grad, const char* fn, const char* name) const {
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, S>,
                  "prefloss: gradient tensor must have the token tensor's scalar type (bf16 tokens: bf16 gradient)");
    return detail::matrix_out(std::forward<G>(grad), x_.layout(), fn, name);
  }

  /// grad[i, t] = upstream[i] * d value_i / d x[i, t]: upstream times the weight (divided by
  /// the row's total weight for a mean), 0 where the mask is 0. Overwrites every element.
  void backward_to(const Scalar* upstream, detail::MatrixOut<S> grad, const Threads& threads = {}) const {
    const bool stream = streams();
    threads.for_rows(x_.rows, grain(), [&](Index b, Index e) {
      if (stream) {
        backward_rows<true>(upstream, grad, b, e);
        detail::stream_fence();
      } else {
        backward_rows<false>(upstream, grad, b, e);
      }
    });
  }

  /// @brief Scale of row i's gradient for an upstream u = d loss / d value_i: u for a sum,
  /// u / (row weight) for a mean (0 for an empty row). backward_to and the fused losses both take
  /// it from here, so their gradients are the same bits.
  double grad_scale(Index i, double upstream) const noexcept {
    if constexpr (R == Reduction::mean) {
      const double total =
          detail::masked_row_sums<false, true>(static_cast<const S*>(nullptr), m_.row(i), x_.len(i)).weight;
      return total != 0 ? upstream / total : 0.0;
    } else {
      return upstream;
    }
  }

  /// @brief One row of the adjoint, for losses that write each row right after reading it
  /// (the row's mask is then still in cache): grad.row(i) = upstream * d value_i / d x[i, :].
  /// Stream: the batch-aligned body with streaming stores (the caller fences; choose it with
  /// streams()). The bits do not depend on Stream.
  template <bool Stream>
  void backward_row(Index i, Scalar upstream, detail::MatrixOut<S> grad) const noexcept {
    detail::masked_row_fill<Stream, S>(m_.row(i), x_.len(i), static_cast<Scalar>(grad_scale(i, upstream)), grad.row(i));
  }

  /// Whether this expression's adjoint ([batch, tokens]) is large enough for streaming stores
  /// (PREFLOSS_STREAMING_STORE_BYTES); backward_to decides the same way.
  bool streams() const noexcept { return detail::use_stream_store<S>(static_cast<std::size_t>(x_.count())); }

  /// The token leaf this expression views (for the fused losses' aliasing checks).
  const detail::Matrix<S>& tokens_view() const noexcept { return x_; }
  /// The mask leaf this expression views.
  const detail::Matrix<M>& mask_view() const noexcept { return m_; }

  /// @brief Adjoint: writes d(sum_i upstream[i] * value_i) / d tokens into grad.
  /// @param upstream [batch] tensor of d loss / d value, of type Scalar (float for 16-bit tokens).
  /// @param grad [batch, tokens] row-major tensor or map of the tokens' storage type (packed
  /// tokens: rank-1 [total_tokens] or pl::packed(grad, cu)), fully overwritten (16-bit: the float
  /// gradient rounded once to nearest even).
  /// @param threads rows split over a pool (see prefloss::Threads); the same bits for any count.
  /// @throws shape_error if either shape is wrong (nothing is written then).
  template <class U, class G>
  void backward(const U& upstream, G&& grad, const Threads& threads = {}) const {
    const auto up = detail::vector_view(upstream, "backward", "upstream");
    static_assert(std::is_same_v<detail::tensor_scalar_t<U>, Scalar>,
                  "prefloss: upstream must have the sequence scalar type (float for bf16/half tokens)");
    if (up.size != x_.rows)
      throw shape_error(std::string("backward: argument 'upstream' must have shape ") + detail::shape_str(x_.rows) +
                        ", got " + detail::shape_str(up.size));
    backward_to(up.data, grad_view(std::forward<G>(grad), "backward", "grad"), threads);
  }

 private:
  template <bool Stream>
  void backward_rows(const Scalar* upstream, detail::MatrixOut<S> grad, Index b, Index e) const noexcept {
    for (Index i = b; i < e; ++i) backward_row<Stream>(i, upstream[i], grad);
  }
  Index grain() const noexcept { return detail::row_grain(x_.rows, x_.count()); }

  detail::Matrix<S> x_;
  detail::Matrix<M> m_;
};

namespace detail {
template <Reduction R, class X, class Mk>
auto make_masked(const X& tokens, const Mk& mask, const char* fn) {
  const auto x = matrix_view(tokens, fn, "tokens");
  const auto m = matrix_view(mask, fn, "mask");
  require_same_shape(fn, "mask", m, "tokens", x);
  require_weights<compute_t<tensor_scalar_t<X>>>(m, fn, "mask");
  return MaskedReduction<tensor_scalar_t<X>, tensor_scalar_t<Mk>, R>(x, m);
}
}  // namespace detail

/// @brief Per-sequence masked sum: value_i = sum_t w[i,t] x[i,t] over w[i,t] != 0.
/// @param tokens row-major [batch, tokens] Eigen::Tensor or TensorMap of float, double,
/// Eigen::bfloat16 or Eigen::half, or a packed batch pl::packed(values, cu_seqlens) (row i =
/// values[cu[i], cu[i+1]); see packed.hpp). 16-bit tokens are summed as their exact float values,
/// in double exactly as float tokens are; the values are float and the adjoint writes a gradient
/// of the tokens' storage type.
/// @param mask same shape (packed: pl::packed with the same offsets); bool/uint8 (nonzero
/// selects) or float/double (weights).
/// The expression views both: they must outlive it and every result built from it. Passing a
/// temporary Eigen::Tensor (which would die at the end of the statement) does not compile; a
/// temporary TensorMap is fine, as it only points at storage that lives on (which is also why
/// [[clang::lifetimebound]] is not used: it would warn about every such map).
/// @throws shape_error if the shapes differ, for invalid or differing cu_seqlens, or when one
/// argument is packed and the other is not; layout_error for misaligned data; value_error for
/// a negative, NaN or infinite float mask weight.
template <class X, class Mk>
auto masked_sum(const X& tokens, const Mk& mask) {
  return detail::make_masked<Reduction::sum>(tokens, mask, "masked_sum");
}

/// @brief Per-sequence masked mean: sum_t w x / sum_t w over selected tokens; 0 for empty rows.
/// Same arguments, lifetime rule and errors as masked_sum.
template <class X, class Mk>
auto masked_mean(const X& tokens, const Mk& mask) {
  return detail::make_masked<Reduction::mean>(tokens, mask, "masked_mean");
}

// An expression over a temporary owning tensor would dangle by the end of the statement.
template <class S, int O, class I, class Mk>
void masked_sum(Eigen::Tensor<S, 2, O, I>&& tokens, const Mk& mask) = delete;
template <class X, class S, int O, class I>
void masked_sum(const X& tokens, Eigen::Tensor<S, 2, O, I>&& mask) = delete;
template <class S, int O, class I, class Mk>
void masked_mean(Eigen::Tensor<S, 2, O, I>&& tokens, const Mk& mask) = delete;
template <class X, class S, int O, class I>
void masked_mean(const X& tokens, Eigen::Tensor<S, 2, O, I>&& mask) = delete;

}  // namespace prefloss
