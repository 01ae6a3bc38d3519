/// @file rl/kl_controller.hpp
/// The KL-penalty coefficient controllers of verl (Ziegler et al. 2019's adaptive schedule and
/// a fixed one): small value types a training loop keeps and updates once per batch.
#pragma once

#include <cmath>
#include <string>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../errors.hpp"

namespace prefloss {

/// @brief A constant KL coefficient: verl's `FixedKLController` (verl-project/verl,
/// verl/trainer/ppo/core_algos.py, commit 1dda039b9). update() accepts and ignores the
/// statistics, so it can stand wherever an AdaptiveKLController does.
class FixedKLController {
 public:
  /// @param kl_coef the coefficient, finite and >= 0; the default is verl's
  /// (algorithm.kl_ctrl.kl_coef = 0.001)
  /// @throws option_error naming 'kl_coef' otherwise.
  explicit FixedKLController(double kl_coef = 0.001) : value_(kl_coef) {
    detail::require_option(kl_coef >= 0 && std::isfinite(kl_coef), "FixedKLController", "kl_coef", ">= 0 and finite",
                           kl_coef);
  }
  /// The coefficient (verl's `.value`).
  double value() const noexcept { return value_; }
  /// @brief No-op, as verl's: value() stays the constructor's kl_coef.
  void update(double /*current_kl*/, Index /*n_steps*/) noexcept {}

 private:
  double value_;
};

/// @brief The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from
/// Human Preferences", arXiv:1909.08593), as verl's `AdaptiveKLController` (verl-project/verl,
/// verl/trainer/ppo/core_algos.py, commit 1dda039b9) updates it:
///
///   e = clip(current_kl / target - 1, -0.2, 0.2),  value *= 1 + e * n_steps / horizon.
///
/// The coefficient grows when the measured KL is above target and shrinks below it, at most by
/// a factor 1 +- 0.2 n_steps / horizon per update. Like verl, nothing bounds the factor: an update
/// with n_steps > 5 horizon and current_kl <= 0.8 target makes it <= 0 (e.g. horizon 10,
/// n_steps 100, current_kl 0: value *= 1 - 0.2 * 10 = -1), and the coefficient then changes sign.
/// verl calls update(current_kl = mean over sequences of the masked-mean KL, n_steps = batch
/// size) once per batch. Arithmetic in double.
class AdaptiveKLController {
 public:
  /// @param init_kl_coef the starting coefficient, finite and >= 0
  /// @param target_kl the KL aimed at, finite and > 0
  /// @param horizon the number of steps (samples) over which the error is corrected, finite and
  /// > 0 (verl asserts horizon > 0)
  /// Defaults are verl's algorithm.kl_ctrl: kl_coef 0.001, target_kl 0.1, horizon 10000.
  /// @throws option_error naming the parameter and the value seen.
  explicit AdaptiveKLController(double init_kl_coef = 0.001, double target_kl = 0.1, double horizon = 10000)
      : value_(init_kl_coef), target_(target_kl), horizon_(horizon) {
    constexpr const char* fn = "AdaptiveKLController";
    detail::require_option(init_kl_coef >= 0 && std::isfinite(init_kl_coef), fn, "init_kl_coef", ">= 0 and finite",
                           init_kl_coef);
    detail::require_option(target_kl > 0 && std::isfinite(target_kl), fn, "target_kl", "> 0 and finite", target_kl);
    detail::require_option(horizon > 0 && std::isfinite(horizon), fn, "horizon", "> 0 and finite", horizon);
  }
  /// The current coefficient (verl's `.value`).
  double value() const noexcept { return value_; }
  double target() const noexcept { return target_; }
  double horizon() const noexcept { return horizon_; }

  /// @brief value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon.
  /// @param current_kl the KL measured on the last batch, finite
  /// @param n_steps the samples (verl: the batch size) since the last update, >= 0
  /// @throws option_error naming 'current_kl' or 'n_steps'; value() is unchanged then.
  void update(double current_kl, Index n_steps) {
    constexpr const char* fn = "AdaptiveKLController::update";
    detail::require_option(std::isfinite(current_kl), fn, "current_kl", "finite", current_kl);
    if (n_steps < 0)
      throw option_error(std::string(fn) + ": option 'n_steps' must be >= 0, got " + std::to_string(n_steps));
    const double e = std::fmin(std::fmax(current_kl / target_ - 1, -0.2), 0.2);
    value_ *= 1 + e * static_cast<double>(n_steps) / horizon_;
  }

 private:
  double value_, target_, horizon_;
};

}  // namespace prefloss
