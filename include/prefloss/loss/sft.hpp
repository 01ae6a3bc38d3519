/// @file loss/sft.hpp
/// The supervised fine-tuning term: negative log-likelihood of sequence values (RPO, CPO and
/// ORPO add it to a preference loss).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <optional>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../metrics.hpp"
#include "../reduce/sequence.hpp"
#include "pairwise.hpp"
#include "sequence_loss.hpp"

// GCC 12 with -fsanitize=address reports a disengaged std::optional's payload (normalizer) as
// maybe-uninitialized where a default NllOptions{} temporary is inlined, though it is read only
// when engaged (a false positive); the kernel headers' pragma region silences it here too.
PREFLOSS_KERNELS_BEGIN
namespace prefloss {

/// Options of nll().
struct NllOptions {
  /// Unset: the batch loss is the mean over examples. Set (finite, > 0, with a reciprocal finite in the value type):
  /// the sum of the per-example losses is divided by this instead, e.g. the global number of valid tokens with
  /// masked_sum inputs, which gives torch's token-mean cross-entropy (TRL's SFT loss) exactly,
  /// also across data-parallel ranks and accumulation steps.
  std::optional<double> normalizer = std::nullopt;
  /// Examples in the global batch: the mean over them (see DpoOptions::batch_count); not with
  /// normalizer. With either set, an empty shard is allowed and contributes 0.
  std::optional<double> batch_count = std::nullopt;
  /// Threads the call (and its backward()) may split the sequence rows over (see
  /// DpoOptions::threads). Default: this thread.
  Threads threads = {};
};

/// Metrics of nll().
template <class S>
struct NllMetrics {
  S mean_logp = 0;  ///< batch mean of the sequence values s (TRL "logps/chosen" for the chosen side)
};

/// Entries of MetricSums<NllMetrics<S>>: two sums, no maxima.
struct NllMetricEntries {
  static constexpr std::size_t logp = 0;   ///< sums: the sequence values s
  static constexpr std::size_t count = 1;  ///< sums: examples (not the normalizer: mean_logp is over examples)
  static constexpr std::size_t n_sums = 2;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
template <class S>
struct metric_layout<NllMetrics<S>> {
  using Entries = NllMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static NllMetrics<S> finalize(const std::array<double, n_sums>& sums, const std::array<double, n_maxima>&) noexcept {
    NllMetrics<S> m;
    if (sums[Entries::count] != 0) m.mean_logp = static_cast<S>(sums[Entries::logp] / sums[Entries::count]);
    return m;
  }
};

/// nll's checks (options, then the input); nothing is read.
template <class X>
auto nll_input(const X& logp_sequence, const NllOptions& opt) {
  constexpr const char* fn = "nll";
  using S = typename sequence_t<X>::Scalar;
  if (opt.normalizer) require_normalizer<S>(fn, "normalizer", *opt.normalizer);
  if (opt.normalizer && opt.batch_count)
    throw option_error(std::string(fn) + ": options 'normalizer' and 'batch_count' are both set (" +
                       fmt(*opt.normalizer) + ", " + fmt(*opt.batch_count) +
                       "); the loss has one divisor: set one of them");
  auto s = as_sequence(logp_sequence, fn, "logp_sequence");
  if (!opt.normalizer) (void)batch_divisor(fn, "logp_sequence", s.size(), opt.batch_count);
  return s;
}

/// nll's arithmetic, one body for both forms; grad is null for the two-pass form.
template <class Seq>
PREFLOSS_DETAIL_ONE_BODY auto nll_run(const Seq& s, const NllOptions& opt, const grad_out_t<Seq>* grad) {
  using S = typename Seq::Scalar;
  const Index B = s.size();
  std::vector<double> v(static_cast<std::size_t>(B));
  const double norm = opt.normalizer ? *opt.normalizer : opt.batch_count ? *opt.batch_count : static_cast<double>(B);
  const auto load = [&](Index i) { v[static_cast<std::size_t>(i)] = s.value(i); };
  const bool preloaded = preload_values(opt.threads, s, load);
  auto result = single_loss<NllMetrics<S>>(
      "nll", "grad", s, norm,
      [&](Index i) {
        if (!preloaded) load(i);
        return SingleTerm{-v[static_cast<std::size_t>(i)], -1.0};
      },
      grad, opt.threads);
  double sum = 0;
  for (double x : v) sum += x;
  result.metric_sums.sums[NllMetricEntries::logp] = sum;
  result.metric_sums.sums[NllMetricEntries::count] = static_cast<double>(B);
  result.metrics = result.metric_sums.metrics();
  return result;
}
}  // namespace detail

/// @brief Negative log-likelihood: per example `-s`; the batch loss is their mean (or their sum
/// divided by NllOptions::normalizer).
///
/// With masked_mean inputs s is the per-token average log-prob (ORPO's and RPO's per-sequence
/// NLL); with masked_sum the sequence log-prob.
///
/// @param logp_sequence policy values: a masked_sum/masked_mean expression or a [batch] tensor
/// @return SequenceResult; backward(grad) writes d loss / d input (token level for
/// expressions: -1/N times the token weight, divided by the row weight for a mean; 0 at
/// masked-out tokens).
/// @throws shape_error on an empty batch; option_error for a normalizer that is not finite and > 0 or whose reciprocal
/// overflows. Nothing is written on error.
template <class X>
auto nll(const X& logp_sequence, const NllOptions& opt = {}) {
  return detail::nll_run(detail::nll_input(logp_sequence, opt), opt, nullptr);
}

/// @brief nll() fused with its backward: the same result, and d loss / d input written into
/// grad in the same pass over the tokens (each row's gradient right after the row is read;
/// bit-identical to `auto r = nll(...); r.backward(grad);`, whose backward() still works).
/// @param grad output shaped like the input's leaves, fully overwritten.
/// @throws as nll(); shape_error naming 'grad'; layout_error when grad is misaligned or
/// overlaps the input's tokens or mask. Every check runs before anything is written.
template <class X, class G>
auto nll(const X& logp_sequence, const NllOptions& opt, G&& grad) {
  const auto s = detail::nll_input(logp_sequence, opt);
  const auto view = detail::single_grad_view("nll", "grad", s, grad, [&](auto&& f) { f("logp_sequence", s); });
  return detail::nll_run(s, opt, &view);
}

}  // namespace prefloss
PREFLOSS_KERNELS_END
