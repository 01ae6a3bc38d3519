/// @file metrics.hpp
/// Metrics as partial sums that merge exactly across shards. A mean of shard means is not the
/// mean of the batch (shards differ in size, and a KTO class or a PPO shard may be empty), so
/// every result also carries the sums its metrics are finalized from: added over data-parallel
/// ranks and accumulation micro-batches, they give the whole batch's metrics, whatever the split.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <limits>

namespace prefloss {

namespace detail {

/// @brief The layout of one Metrics type's partial sums: specialised next to each Metrics type
/// (a Metrics without one does not compile into a MetricSums). A specialisation provides
/// `using Entries` (the public struct naming the entries), `n_sums`, `n_maxima`, and
/// `static Metrics finalize(const std::array<double, n_sums>&, const std::array<double,
/// n_maxima>&)`, the one formula the loss and MetricSums::metrics() both use.
template <class Metrics>
struct metric_layout;

/// The identity of MetricSums::maxima: every entry -inf.
template <std::size_t N>
constexpr std::array<double, N> empty_maxima() noexcept {
  std::array<double, N> a{};
  for (std::size_t k = 0; k < N; ++k) a[k] = -std::numeric_limits<double>::infinity();
  return a;
}

/// sum / count, 0 for an empty count (an empty shard or class has no mean, and 0 keeps it from
/// turning a logged metric into NaN).
inline double mean_or_zero(double sum, double count) noexcept { return count != 0 ? sum / count : 0.0; }

}  // namespace detail

/// @brief Partial sums of one result's Metrics: add `sums` across shards (MPI_SUM), take the
/// max of `maxima` (MPI_MAX); metrics() gives the metrics of the whole batch.
///
/// Every result of prefloss has one, `metric_sums`, next to its `metrics`, which the loss
/// computes from it with the same finalize (`r.metrics` is `r.metric_sums.metrics()`, bit for
/// bit). The entries of each family are named by `Entries` (PreferenceMetricEntries,
/// OrpoMetricEntries, RankingMetricEntries, NllMetricEntries, KtoMetricEntries,
/// PpoMetricEntries, ValueMetricEntries, CispoMetricEntries, SapoMetricEntries,
/// GpgMetricEntries), so one entry can be read as
/// `r.metric_sums.sums[pl::PpoMetricEntries::weight]`.
///
/// The sums are double whatever the loss's scalar type: counts in them are exact up to 2^53,
/// and a merged mean differs from the unsplit call's only by the order its terms were added in.
/// A default MetricSums is the empty shard: zero sums, -inf maxima; merging it changes nothing,
/// and its metrics() are the Metrics defaults (all 0).
/// @tparam Metrics one of the loss families' metrics structs, e.g. PreferenceMetrics<float>
template <class Metrics>
struct MetricSums {
  using Layout = detail::metric_layout<Metrics>;             ///< the family's layout and finalize
  using Entries = typename Layout::Entries;                  ///< named indices into sums and maxima
  static constexpr std::size_t n_sums = Layout::n_sums;      ///< entries of sums
  static constexpr std::size_t n_maxima = Layout::n_maxima;  ///< entries of maxima

  std::array<double, n_sums> sums{};                                       ///< added across shards
  std::array<double, n_maxima> maxima = detail::empty_maxima<n_maxima>();  ///< max across shards

  /// The metrics of every shard merged into this one (an unmerged result's: its own metrics).
  Metrics metrics() const { return Layout::finalize(sums, maxima); }

  /// @brief Merges another shard: sums add, maxima take the larger. A NaN maximum stays NaN
  /// (in either operand), so the merge is commutative and associative like the max of MPI_MAX
  /// over numbers; how an MPI library's MPI_MAX treats NaN is its own.
  MetricSums& operator+=(const MetricSums& other) noexcept {
    for (std::size_t k = 0; k < n_sums; ++k) sums[k] += other.sums[k];
    for (std::size_t k = 0; k < n_maxima; ++k)
      if (other.maxima[k] > maxima[k] || std::isnan(other.maxima[k])) maxima[k] = other.maxima[k];
    return *this;
  }
};

/// @brief Two shards' partial sums merged (a += b); the order of merges changes only the
/// rounding of the sums.
template <class Metrics>
MetricSums<Metrics> merge(MetricSums<Metrics> a, const MetricSums<Metrics>& b) noexcept {
  a += b;
  return a;
}

}  // namespace prefloss
