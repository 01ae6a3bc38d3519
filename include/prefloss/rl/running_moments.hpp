/// @file rl/running_moments.hpp
/// The running mean and standard deviation of a stream of batches, as TRL's RunningMoments
/// keeps them (BCO's reward shift delta is its mean): a small value type a training loop keeps
/// and updates once per batch.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../errors.hpp"

namespace prefloss {

/// @brief Running moments of a data stream: TRL's `RunningMoments` (trl/experimental/bco/
/// bco_trainer.py, f2cd577; from MOSS-RLHF's utils.py), whose update() is, for a batch of n
/// values with mean m_b and population variance v_b:
///
///     d = m_b - mean,  N = count + n,
///     var   = (var count + d^2 count n / N + v_b n) / N,
///     mean += d n / N,
///     std   = sqrt(var N / (N - 1)),  count = N,
///
/// starting from mean 0, var 1, std 1 and count 1e-24 (so the first batch all but replaces the
/// start, and the start's weight 1e-24 is kept in every later count). update() returns the
/// batch's mean and its Bessel-corrected std, as TRL's does.
///
/// All arithmetic is in double. TRL rounds the batch mean and variance to float32
/// (`xs_mean.float()`, `xs_var.float()`) and computes d, the sums and std in float32 before
/// `.item()` widens them; prefloss does not, so its values differ from TRL's by float32
/// rounding (relative ~1e-7), and agree with a direct two-pass computation in double.
///
/// Data-parallel training: TRL's get_global_statistics all-reduces the batch's sum and count,
/// takes m_b = sum / count, then all-reduces sum((x - m_b)^2) for v_b = that / count. Do the
/// same and pass the three to update_from_moments() on every rank, so every rank keeps the same
/// moments (and the same delta).
class RunningMoments {
 public:
  /// What update() returns: the batch's mean and its std with Bessel's correction
  /// (sqrt(v_b n / (n - 1)); NaN for a batch of one, as torch gives 0/0).
  struct BatchStats {
    double mean;
    double std;
  };

  /// TRL's start: mean 0, var 1, std 1, count 1e-24.
  RunningMoments() = default;
  /// @brief Restores saved moments (TRL's load_from_json of save_to_json's fields).
  /// @throws option_error naming the field: mean finite, var finite and >= 0, std >= 0 or +inf
  /// (a first batch of one value gives +inf, as in TRL), count finite and > 0.
  RunningMoments(double mean, double var, double std, double count) : mean_(mean), var_(var), std_(std), count_(count) {
    constexpr const char* fn = "RunningMoments";
    detail::require_option(std::isfinite(mean), fn, "mean", "finite", mean);
    detail::require_option(var >= 0 && std::isfinite(var), fn, "var", ">= 0 and finite", var);
    detail::require_option(std >= 0, fn, "std", ">= 0 (+inf allowed)", std);
    detail::require_option(count > 0 && std::isfinite(count), fn, "count", "> 0 and finite", count);
  }

  double mean() const noexcept { return mean_; }    ///< the running mean (BCO's delta; TRL's `.mean`)
  double var() const noexcept { return var_; }      ///< the running population variance (`.var`)
  double std() const noexcept { return std_; }      ///< the running std, Bessel-corrected by count (`.std`)
  double count() const noexcept { return count_; }  ///< values seen, plus the start's 1e-24 (`.count`)

  /// @brief Updates from a batch's moments, TRL's formula sequence (see the class).
  /// @param batch_mean finite; batch_var the population variance, finite and >= 0; batch_count
  /// the number of values, finite and > 0 (a double, as TRL's global count)
  /// @throws option_error naming the argument and the value seen; the moments are unchanged then.
  BatchStats update_from_moments(double batch_mean, double batch_var, double batch_count) {
    constexpr const char* fn = "RunningMoments::update_from_moments";
    detail::require_option(std::isfinite(batch_mean), fn, "batch_mean", "finite", batch_mean);
    detail::require_option(batch_var >= 0 && std::isfinite(batch_var), fn, "batch_var", ">= 0 and finite", batch_var);
    detail::require_option(batch_count > 0 && std::isfinite(batch_count), fn, "batch_count", "> 0 and finite",
                           batch_count);
    const double n = batch_count;
    const double d = batch_mean - mean_;
    const double tot_count = count_ + n;
    const double new_sum = batch_var * n;
    const double old_sum = var_ * count_ + d * d * count_ * n / tot_count;
    const double tot_sum = old_sum + new_sum;
    mean_ += d * n / tot_count;
    const double new_var = tot_sum / tot_count;
    std_ = std::sqrt(new_var * tot_count / (tot_count - 1));
    var_ = new_var;
    count_ = tot_count;
    return {batch_mean, std::sqrt(batch_var * n / (n - 1))};
  }

  /// @brief Updates from n values (float or double): their mean and population variance by a
  /// two-pass sum in double, then update_from_moments (TRL: torch.var_mean(xs, unbiased=False)).
  /// @throws shape_error naming 'xs' for n <= 0 (TRL would take NaN moments); value_error naming
  /// 'xs' when a value is NaN or infinite. The moments are unchanged then.
  template <class T, class = std::enable_if_t<std::is_floating_point_v<T>>>
  BatchStats update(const T* xs, Index n) {
    constexpr const char* fn = "RunningMoments::update";
    if (n <= 0) throw shape_error(std::string(fn) + ": argument 'xs' has an empty batch (shape [0])");
    double sum = 0;
    for (Index i = 0; i < n; ++i) {
      const double x = xs[i];
      if (!std::isfinite(x))
        throw value_error(std::string(fn) + ": argument 'xs' must hold finite values, got " + detail::fmt(x) +
                          " at index " + std::to_string(i));
      sum += x;
    }
    const double count = static_cast<double>(n);
    const double m = sum / count;
    double ss = 0;
    for (Index i = 0; i < n; ++i) {
      const double e = static_cast<double>(xs[i]) - m;
      ss += e * e;
    }
    return update_from_moments(m, ss / count, count);
  }

  /// @brief update(xs.data(), size) for a contiguous container of float or double: an Eigen
  /// tensor of any rank (e.g. bco_rewards()), a std::vector.
  template <class C, class T = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<const C&>().data())>>,
            class = std::enable_if_t<std::is_floating_point_v<T>>>
  BatchStats update(const C& xs) {
    return update(xs.data(), static_cast<Index>(xs.size()));
  }

 private:
  double mean_ = 0;
  double var_ = 1;
  double std_ = 1;
  double count_ = 1e-24;
};

}  // namespace prefloss
