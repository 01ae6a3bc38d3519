// C++20 designated initializers that name one field must compile warning-free under
// -Wall -Wextra -Werror (g++ warns -Wmissing-field-initializers for a member with no default
// member initializer), and every field they skip keeps its documented default. CMake builds
// this file as C++20 whatever the suite's standard.
#include <catch2/catch.hpp>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;

TEST_CASE("every options struct takes a designated initializer that skips its optional fields", "[options]") {
  const auto ppo = pl::PpoOptions{.clip_high = 0.28};
  CHECK(ppo.clip_high == 0.28);
  CHECK(ppo.clip_low == 0.2);
  CHECK(!ppo.token_count);
  CHECK(!ppo.sequence_count);
  CHECK(!ppo.token_sum_norm);
  CHECK(ppo.log_ratio_clamp == 20.0);
  CHECK(ppo.row_weight_guard == 0.0);
  CHECK(ppo.count_empty_rows);
  const auto value = pl::ValueOptions{.aggregation = pl::Aggregation::seq_mean_token_mean};
  CHECK(value.clip == 0.2);
  CHECK(!value.token_count);
  const auto kto = pl::KtoOptions{.beta = 0.2};
  CHECK(!kto.reference_point);
  CHECK(kto.desirable_weight == 1.0);
  const auto bco = pl::BcoOptions{.delta = 0.05};
  CHECK(bco.beta == 0.1);
  CHECK(bco.example_weights.empty());
  CHECK(!bco.batch_count);
  CHECK(!pl::NllOptions{}.normalizer);
  CHECK(pl::DpoOptions{.label_smoothing = 0.1}.beta == 0.1);
  CHECK(pl::IpoOptions{.reference_free = true}.beta == 0.1);
  CHECK(pl::SimpoOptions{.gamma = 1.0}.beta == 2.0);
  CHECK(pl::OrpoOptions{.nll_weight = 0.0}.beta == 0.1);
  CHECK(pl::BradleyTerryOptions{.center_coef = 0.01}.center_coef == 0.01);
  CHECK(pl::KlOptions{.estimator = pl::KlEstimator::k1}.k3_clamp == 10.0);
  CHECK(pl::GaeOptions{.lam = 0.95}.gamma == 1.0);
  CHECK(pl::WhitenOptions{.eps = 1e-6}.unbiased);
  CHECK(pl::WhitenOptions{.unbiased = false}.count_guard == 0.0);
  CHECK(pl::WhitenOptions{.count_guard = 1e-8, .bessel_guard = true}.min_variance == 0.0);
  CHECK(pl::GroupOptions{.scale_by_std = false}.epsilon == 1e-6);
  CHECK(!pl::GroupOptions{.epsilon = 1e-4}.singleton_std_float32);
  CHECK(pl::DpoOptions{.sigmoid_label_smoothing = false}.label_smoothing == 0.0);
  const auto gspo = pl::PpoOptions{.importance_level = pl::ImportanceLevel::sequence};
  CHECK(!gspo.delta);
  CHECK(!gspo.bias_corrected_kl);
  CHECK(!pl::GmpoOptions{.clip_high = 0.4}.sequence_count);
  CHECK(pl::CispoOptions{.clip_high = 0.28}.clip_low == 0.2);
  CHECK(pl::SapoOptions{.tau_neg = 2.0}.tau_pos == 1.0);
  CHECK(!pl::GpgOptions{.aggregation = pl::Aggregation::seq_mean_token_sum}.token_count);
  CHECK(!pl::CpoOptions{.alpha = 0.5}.batch_count);
  CHECK(pl::LogprobOptions{.entropy = true}.temperature == 1.0);
  CHECK(pl::GrpoRewardOptions{.epsilon = 1e-6}.reward_weights.empty());
  CHECK(pl::ReinforcePPOptions{.gamma = 0.99}.whiten.unbiased);
  CHECK(pl::RewardClipOptions{.max = 5.0}.min == -10.0);
  CHECK(pl::SafetyRewardOptions{.threshold = 0.2}.threshold == 0.2);
  const auto is = pl::RolloutIsOptions{.upper = 3.0};
  CHECK(!is.rs_upper);
  CHECK(!is.rs_lower);
  CHECK(is.level == pl::RolloutIsLevel::token);
}

TEST_CASE("the shared normalizer and k3-clamp fields are designated like any other field", "[options]") {
  // PREFLOSS_AGGREGATION_NORMALIZERS and PREFLOSS_K3_CLAMPS expand to direct members, in order.
  const auto ppo = pl::PpoOptions{.clip_high = 0.28, .kl_coef = 0.1, .token_count = 4096.0, .k3_clamp = std::nullopt};
  CHECK(ppo.token_count == 4096.0);
  const auto verl = pl::PpoOptions{
      .aggregation = pl::Aggregation::seq_mean_token_mean, .row_weight_guard = 1e-8, .count_empty_rows = false};
  CHECK(!verl.count_empty_rows);
  CHECK(pl::ValueOptions{.row_weight_guard = 1e-8}.count_empty_rows);
  CHECK(!ppo.sequence_count);
  CHECK(ppo.k3_log_ratio_clamp == 20.0);
  CHECK(!ppo.k3_clamp);
  const auto value = pl::ValueOptions{.aggregation = pl::Aggregation::seq_mean_token_sum, .sequence_count = 8.0};
  CHECK(value.sequence_count == 8.0);
  CHECK(!value.token_sum_norm);
  const auto kl = pl::KlOptions{.estimator = pl::KlEstimator::k3, .k3_log_ratio_clamp = 5.0};
  CHECK(kl.k3_log_ratio_clamp == 5.0);
  CHECK(kl.k3_clamp == 10.0);
}
