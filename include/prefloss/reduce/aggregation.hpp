/// @file reduce/aggregation.hpp
/// How a [batch, tokens] matrix of per-token losses becomes one batch loss: verl's loss_agg_mode
/// choices, with caller-given global normalizers so data-parallel / accumulated micro-batches
/// sum to exactly the full-batch loss and gradient. ppo_clip and value_loss both aggregate
/// through this one piece of code.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../errors.hpp"

namespace prefloss {

/// @brief Aggregation of masked per-token losses l[i,t] with mask weights w[i,t] (verl's
/// loss_agg_mode names). Let S_i = sum_t w[i,t] l[i,t] and W_i = sum_t w[i,t] over selected tokens.
/// New enumerators go last: the values are part of the ABI of callers that store them.
enum class Aggregation {
  token_mean,               ///< sum_i S_i / sum_i W_i (or / token_count when given); 0 without valid tokens
  seq_mean_token_sum,       ///< (1/B) sum_i S_i
  seq_mean_token_mean,      ///< (1/B) sum_i S_i / W_i; an empty row contributes 0 and still counts in B
                            ///< (see count_empty_rows, row_weight_guard)
  seq_mean_token_sum_norm,  ///< (1/B) sum_i S_i / C, C = token_sum_norm (default: tokens per row; must be set for
                            ///< packed input), Dr.GRPO
  /// sum_i S_i: verl's "token-sum" (agg_loss at 1dda039; its dp_size factor, which undoes DDP's
  /// gradient averaging, is the caller's: scale the loss, or sum gradients over ranks). Takes no
  /// normalizer; an empty batch is 0 without one.
  token_sum,
};

/// @def PREFLOSS_AGGREGATION_NORMALIZERS
/// @brief The global normalizers of a token loss's options (PpoOptions, ValueOptions), declared
/// once here and expanded inside each options struct:
///
/// - `std::optional<double> token_count`: token_mean only: the global normaliser (e.g. the
///   valid-token count summed over data-parallel ranks and accumulation micro-batches) instead of
///   this call's own mask weight. With it, the losses and gradients of the parts of a batch add up
///   to those of the whole batch.
/// - `std::optional<double> sequence_count`: seq_* modes: the global number of sequences instead
///   of this call's batch (same purpose).
/// - `std::optional<double> token_sum_norm`: seq_mean_token_sum_norm: the constant C (Dr.GRPO's
///   generation budget); unset = this call's tokens per row, as verl's loss_agg_mode does (a
///   packed call has no such length and must set it). A row split over ranks (sequence
///   parallelism) needs it too: this call's row length is only the rank's slice.
/// - `std::vector<double> row_weights`: seq_mean_token_mean only: W_i, the weight of every whole
///   row (one entry per row of the call, >= 0 and finite), instead of this call's own row weights.
///   For sequence parallelism, where a row's tokens are split over ranks: each rank passes the
///   sum over ranks of its row_weights(mask) (reduce/counts.hpp), so a split row gets the scale
///   1 / (B W_i) of the unsplit row and the ranks' losses and gradients add up to the unsplit
///   call's. Empty (the default): this call's own row weights.
/// - `double row_weight_guard`: seq_mean_token_mean only: g >= 0 added to each row's weight,
///   S_i / (W_i + g). verl's agg_loss (1dda039) and OpenRLHF's aggregation (models/loss.py) add
///   1e-8; prefloss's default 0 gives a row its exact token mean.
/// - `bool count_empty_rows`: the seq_* modes without sequence_count: true (default) divides by
///   all B rows of the call, false by the rows that hold a valid token (W_i > 0), as verl's
///   agg_loss and OpenRLHF do when no global batch size is given. For sharded batches pass
///   sequence_count instead (the sum of TokenCounts::nonempty_rows, or of rows): a per-call
///   count does not add up across shards.
///
/// The scalar normalizers must be finite and > 0 when set, with a reciprocal finite in the token type
/// (option_error otherwise: the gradient scale would overflow). They are direct members, not a
/// base class or a member struct, so that C++20 designated initializers can name every field of
/// the options (`pl::PpoOptions{.clip_high = 0.28, .token_count = 4096}`): a base class's members
/// cannot be designated, and g++ -Wextra warns for a skipped base. The marker member lets
/// detail::aggregation_spec accept exactly the structs that expand this macro.
#define PREFLOSS_AGGREGATION_NORMALIZERS               \
  std::optional<double> token_count = std::nullopt;    \
  std::optional<double> sequence_count = std::nullopt; \
  std::optional<double> token_sum_norm = std::nullopt; \
  std::vector<double> row_weights = {};                \
  double row_weight_guard = 0.0;                       \
  bool count_empty_rows = true;                        \
  static constexpr bool prefloss_aggregation_normalizers = true

namespace detail {

/// The aggregation settings a loss's options carry, with the batch extents.
struct AggregationSpec {
  Aggregation mode = Aggregation::token_mean;
  Index batch = 0;                                      ///< rows of this call
  Index tokens = 0;                                     ///< columns of this call; packed_rows for a packed call
  std::optional<double> token_count = std::nullopt;     ///< token_mean: global normaliser instead of sum_i W_i
  std::optional<double> sequence_count = std::nullopt;  ///< seq_* modes: global number of sequences instead of B
  std::optional<double> token_sum_norm = std::nullopt;  ///< seq_mean_token_sum_norm: C instead of `tokens`
  const double* row_weights = nullptr;  ///< seq_mean_token_mean: [batch] whole-row weights instead of W_i; null: W_i
  double row_weight_guard = 0.0;        ///< seq_mean_token_mean: added to every W_i
  bool count_empty_rows = true;         ///< seq_* modes without sequence_count: false divides by the non-empty rows
};

/// AggregationSpec::tokens of a packed call: there is no one row length to default C to.
inline constexpr Index packed_rows = -1;

inline bool valid_aggregation(Aggregation a) noexcept {
  return a == Aggregation::token_mean || a == Aggregation::seq_mean_token_sum ||
         a == Aggregation::seq_mean_token_mean || a == Aggregation::seq_mean_token_sum_norm ||
         a == Aggregation::token_sum;
}

/// Throws option_error for an unknown mode or a normaliser that is not finite and > 0 with a
/// reciprocal finite in S (the token type).
template <class S>
void validate_aggregation(const char* fn, const AggregationSpec& s) {
  require_enum(valid_aggregation(s.mode), fn, "aggregation", static_cast<int>(s.mode));
  const auto positive = [&](const std::optional<double>& v, const char* name) {
    if (v) require_normalizer<S>(fn, name, *v);
  };
  positive(s.token_count, "token_count");
  positive(s.sequence_count, "sequence_count");
  positive(s.token_sum_norm, "token_sum_norm");
  require_option(s.row_weight_guard >= 0 && std::isfinite(s.row_weight_guard), fn, "row_weight_guard",
                 ">= 0 and finite", s.row_weight_guard);
  if (s.row_weights) {
    if (s.mode != Aggregation::seq_mean_token_mean)
      throw option_error(std::string(fn) + ": option 'row_weights' is set (" + std::to_string(s.batch) +
                         " entries) but aggregation is not seq_mean_token_mean, the one mode that uses it");
    for (Index i = 0; i < s.batch; ++i) {
      const double w = s.row_weights[i];
      if (!(w >= 0 && w < HUGE_VAL))
        throw option_error(std::string(fn) + ": option 'row_weights' must hold finite weights >= 0, got " + fmt(w) +
                           " at row " + std::to_string(i));
    }
  }
  // "Tokens per row" is the padded length, which a packed batch does not have (and its longest
  // row would make the loss depend on how the batch happened to be packed): ask for C.
  if (s.mode == Aggregation::seq_mean_token_sum_norm && !s.token_sum_norm && s.tokens == packed_rows)
    throw option_error(
        std::string(fn) +
        ": option 'token_sum_norm' must be set for seq_mean_token_sum_norm with packed inputs "
        "(its default, the tokens per row of a padded batch, has no meaning for packed rows), got unset");
}

/// @brief A token loss over zero rows is an empty shard: allowed when the mode's global
/// normalizer is given (token_count for token_mean, sequence_count for the seq_* modes), where it
/// contributes loss 0; otherwise the batch mean of nothing is undefined (shape_error).
inline void require_rows_or_globals(const char* fn, const char* name, const AggregationSpec& s) {
  if (s.batch != 0 || s.mode == Aggregation::token_sum) return;
  const bool global = s.mode == Aggregation::token_mean ? s.token_count.has_value() : s.sequence_count.has_value();
  if (!global)
    throw shape_error(std::string(fn) + ": argument '" + name + "' has an empty batch (shape " +
                      (s.tokens == packed_rows ? std::string("[0]") : "[0, " + std::to_string(s.tokens) + "]") +
                      "); an empty shard needs the global " +
                      (s.mode == Aggregation::token_mean ? "token_count" : "sequence_count") + " option");
}

/// True when the gradient scale of every row depends on the total weight of the whole call
/// (token_mean without token_count): a fused pass must sum the mask first.
inline bool needs_total_weight(const AggregationSpec& s) noexcept {
  return s.mode == Aggregation::token_mean && !s.token_count;
}

/// True when the row scales divide by the call's count of non-empty rows (count_empty_rows =
/// false in a seq_* mode without sequence_count): a fused pass must sum the masks first.
inline bool needs_nonempty_rows(const AggregationSpec& s) noexcept {
  return !s.count_empty_rows && !s.sequence_count && s.mode != Aggregation::token_mean &&
         s.mode != Aggregation::token_sum;
}

/// True when row i's gradient scale depends on its own weight W_i (seq_mean_token_mean).
inline bool needs_row_weight(const AggregationSpec& s) noexcept { return s.mode == Aggregation::seq_mean_token_mean; }

/// @brief d loss / d S_i: the factor that turns row i's weighted token-loss sum into its
/// contribution to the batch loss. Every mode is linear in the S_i, so
/// loss = sum_i row_scale_i * S_i and d loss / d l[i,t] = row_scale_i * w[i,t].
/// @param i the row (its entry of row_weights, when given, replaces row_weight)
/// @param row_weight W_i of this call (used by seq_mean_token_mean)
/// @param total_weight sum_i W_i of this call (used by token_mean without token_count)
/// @param nonempty_rows the rows of this call with W_i > 0 (used when needs_nonempty_rows)
inline double row_scale(const AggregationSpec& s, Index i, double row_weight, double total_weight,
                        double nonempty_rows) noexcept {
  const double seqs = s.sequence_count      ? *s.sequence_count
                      : !s.count_empty_rows ? nonempty_rows
                                            : static_cast<double>(s.batch);
  switch (s.mode) {
    case Aggregation::token_mean: {
      const double n = s.token_count ? *s.token_count : total_weight;
      return n != 0 ? 1.0 / n : 0.0;
    }
    case Aggregation::seq_mean_token_sum:
      return seqs != 0 ? 1.0 / seqs : 0.0;  // seqs = 0: no row holds a token (count_empty_rows = false)
    case Aggregation::seq_mean_token_mean: {
      // An empty row (W_i = 0) has S_i = 0 and scale 0, whatever the guard: 1 / (B g) alone
      // could overflow for a tiny g, and inf * 0 is NaN.
      const double w = s.row_weights ? s.row_weights[i] : row_weight;
      return w != 0 && seqs != 0 ? 1.0 / (seqs * (w + s.row_weight_guard)) : 0.0;
    }
    case Aggregation::seq_mean_token_sum_norm: {
      const double c = s.token_sum_norm ? *s.token_sum_norm : static_cast<double>(s.tokens);
      return c != 0 && seqs != 0 ? 1.0 / (seqs * c) : 0.0;
    }
    case Aggregation::token_sum:
      return 1.0;
  }
  return 0.0;
}

/// The aggregation of a token loss call: the options' `aggregation` mode and the normalizers they
/// declare with PREFLOSS_AGGREGATION_NORMALIZERS, with this call's extents
/// (tokens: the padded row length, or packed_rows). The spec points into opt.row_weights, so opt
/// must outlive it; a row_weights of the wrong length throws option_error here.
template <class Opt>
AggregationSpec aggregation_spec(const char* fn, const Opt& opt, Index batch, Index tokens) {
  static_assert(Opt::prefloss_aggregation_normalizers, "options must declare PREFLOSS_AGGREGATION_NORMALIZERS");
  static_assert(std::is_same_v<decltype(Opt::aggregation), Aggregation>, "options need an Aggregation mode");
  AggregationSpec s;
  s.mode = opt.aggregation;
  s.batch = batch;
  s.tokens = tokens;
  s.token_count = opt.token_count;
  s.sequence_count = opt.sequence_count;
  s.token_sum_norm = opt.token_sum_norm;
  s.row_weight_guard = opt.row_weight_guard;
  s.count_empty_rows = opt.count_empty_rows;
  if (!opt.row_weights.empty()) {
    if (static_cast<Index>(opt.row_weights.size()) != batch)
      throw option_error(std::string(fn) + ": option 'row_weights' must have one entry per row (" +
                         std::to_string(batch) + "), got " + std::to_string(opt.row_weights.size()));
    s.row_weights = opt.row_weights.data();
  }
  return s;
}

}  // namespace detail
}  // namespace prefloss
