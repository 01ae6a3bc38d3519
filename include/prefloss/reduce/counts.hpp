/// @file reduce/counts.hpp
/// Counts first: the exact sizes a sharded batch's global normalizers need, taken from this
/// shard's masks before any loss is called, meant to be summed across data-parallel ranks and
/// accumulation micro-batches and passed back as the losses' global options (token_count,
/// sequence_count, batch_count, row_weights).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "../detail/eigen.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"

namespace prefloss {

/// @brief The sizes of one shard's token batch, from its mask. Integers are exact (int64), and
/// `weight` is the double every loss uses for this shard's token weight.
///
/// Sum the fields over shards (all-reduce with MPI_SUM: `tokens`, `nonempty_rows` and `rows` as
/// MPI_INT64_T, `weight` as MPI_DOUBLE; or `operator+=` in one process). Then pass
/// - `weight` as PpoOptions/ValueOptions::token_count (token_mean). For bool/uint8 masks it equals
///   `tokens`, an integer exact in double up to 2^53; a float mask's weight is the sum of its
///   entries, accumulated in double row by row as the losses do.
/// - `rows` as sequence_count (seq_* modes) or as the pairwise losses' batch_count (one row per
///   example);
/// - `nonempty_rows` where a trainer averages over rows that hold a token (it is also how to
///   tell that a shard contributes nothing).
struct TokenCounts {
  std::int64_t tokens = 0;         ///< selected entries (mask != 0)
  std::int64_t nonempty_rows = 0;  ///< rows with at least one selected entry
  std::int64_t rows = 0;           ///< rows (sequences), empty ones included
  double weight = 0;               ///< sum of the mask weights of the selected entries

  /// Adds another shard's counts (exact for the integers; the weights in double).
  TokenCounts& operator+=(const TokenCounts& o) noexcept {
    tokens += o.tokens;
    nonempty_rows += o.nonempty_rows;
    rows += o.rows;
    weight += o.weight;
    return *this;
  }
};

namespace detail {
/// The type a mask's weights are summed in: its own for float/double, float for bytes (whose
/// weight is an exact count whatever the type).
template <class M>
using mask_sum_t = std::conditional_t<is_real_v<M>, M, float>;

/// A mask argument's view, its weights checked as the losses check them.
template <class Mk>
Matrix<tensor_scalar_t<Mk>> checked_mask(const Mk& mask, const char* fn) {
  using M = tensor_scalar_t<Mk>;
  static_assert(is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  const Matrix<M> m = matrix_view(mask, fn, "mask");
  require_weights<mask_sum_t<M>>(m, fn, "mask");
  return m;
}

template <class M>
std::int64_t selected_in_row(const M* m, Index n) noexcept {
  if constexpr (sizeof(M) == 1) {
    return static_cast<std::int64_t>(count_selected(m, n));
  } else {
    std::int64_t c = 0;
    for (Index t = 0; t < n; ++t) c += m[t] != M(0);
    return c;
  }
}
}  // namespace detail

/// @brief The counts of a mask: row-major [batch, tokens] Eigen tensor or map of bool, uint8_t,
/// float or double, or a packed batch pl::packed(mask, cu_seqlens).
/// @throws value_error for a float weight that is negative, NaN or infinite (the losses would
/// reject it too); layout_error for misaligned data; shape_error for invalid cu_seqlens.
template <class Mk>
TokenCounts token_counts(const Mk& mask) {
  using M = detail::tensor_scalar_t<Mk>;
  using S = detail::mask_sum_t<M>;
  const detail::Matrix<M> m = detail::checked_mask(mask, "token_counts");
  TokenCounts c;
  c.rows = static_cast<std::int64_t>(m.rows);
  for (Index i = 0; i < m.rows; ++i) {
    const std::int64_t k = detail::selected_in_row(m.row(i), m.len(i));
    c.tokens += k;
    c.nonempty_rows += k != 0;
    // The losses' own row weight, added in row order as their total is.
    c.weight += detail::row_weight<S>(m.row(i), m.len(i));
  }
  return c;
}

/// @brief The weight of every row of a mask ([batch] doubles: the sum of its weights; a byte
/// mask's count of selected entries), as the losses compute W_i.
///
/// For sequence parallelism (each rank holds a slice of every row's tokens): all-reduce these
/// with MPI_SUM and pass the result as PpoOptions/ValueOptions::row_weights, so
/// seq_mean_token_mean divides each rank's part of row i by the whole row's weight.
/// @throws as token_counts.
template <class Mk>
Eigen::Tensor<double, 1> row_weights(const Mk& mask) {
  using S = detail::mask_sum_t<detail::tensor_scalar_t<Mk>>;
  const auto m = detail::checked_mask(mask, "row_weights");
  Eigen::Tensor<double, 1> w(m.rows);
  for (Index i = 0; i < m.rows; ++i) w(i) = detail::row_weight<S>(m.row(i), m.len(i));
  return w;
}

}  // namespace prefloss
