/// @file loss/bradley_terry.hpp
/// Bradley-Terry pairwise loss for reward models (InstructGPT, Llama 2's margin, TRL's
/// RewardTrainer with its reward-centering term).
#pragma once

#include <cmath>
#include <optional>
#include <type_traits>

#include "../detail/checks.hpp"
#include "../detail/pairwise.hpp"
#include "../math/log_sigmoid.hpp"
#include "../reduce/sequence.hpp"

namespace prefloss {

/// Options of bradley_terry(). Defaults are TRL's RewardConfig.
struct BradleyTerryOptions {
  double center_coef = 0.0;  ///< >= 0: weight of mean((r_c + r_r)^2) (TRL center_rewards_coefficient)
};

namespace detail {
template <class C, class R, class M>
auto bradley_terry_impl(const C& r_chosen, const R& r_rejected, const M* margin, const BradleyTerryOptions& opt) {
  constexpr const char* fn = "bradley_terry";
  require_same_scalar<C, R>();
  using S = typename sequence_t<C>::Scalar;
  require_option(opt.center_coef >= 0 && std::isfinite(opt.center_coef), fn, "center_coef", ">= 0 and finite",
                 opt.center_coef);
  auto c = as_sequence(r_chosen);
  auto r = as_sequence(r_rejected);
  const Index B = c.size();
  require_batch(fn, "r_rejected", r, B, c.shape());
  std::optional<sequence_t<M>> m;
  if (margin) {
    m.emplace(as_sequence(*margin));
    require_batch(fn, "margin", *m, B, c.shape());
  }
  require_nonempty(fn, "r_chosen", B);
  const std::vector<double> vc = values_of(c), vr = values_of(r);
  const double k = opt.center_coef;
  auto result = pairwise_loss<PreferenceMetrics<S>>(fn, std::move(c), std::move(r), [&](Index i) {
    const std::size_t u = static_cast<std::size_t>(i);
    const double z = vc[u] - vr[u] - (m ? m->value(i) : 0.0);
    const auto ls = log_sigmoid_and_grad(z);
    const double center = vc[u] + vr[u];
    return PairTerm{-ls.value + k * center * center, -ls.grad + 2 * k * center, ls.grad + 2 * k * center};
  });
  result.metrics = preference_metrics<S>(vc, vr);
  return result;
}
}  // namespace detail

/// @brief Bradley-Terry loss: mean over pairs of `-logsig(r_c - r_r) + k (r_c + r_r)^2`.
///
/// TRL's RewardTrainer loss (k = center_coef). Metrics: PreferenceMetrics with the raw rewards
/// (reward_accuracy = fraction with r_c > r_r).
/// @param r_chosen, r_rejected rewards: [batch] tensors (or sequence expressions)
/// @throws shape_error on batch mismatch or empty batch; option_error for center_coef < 0.
template <class C, class R>
auto bradley_terry(const C& r_chosen, const R& r_rejected, const BradleyTerryOptions& opt = {}) {
  return detail::bradley_terry_impl(r_chosen, r_rejected, static_cast<const C*>(nullptr), opt);
}

/// @brief Bradley-Terry loss with a per-pair margin m (Llama 2):
/// mean of `-logsig(r_c - r_r - m) + k (r_c + r_r)^2`. The margin is a constant [batch] tensor.
template <class C, class R, class M, class = std::enable_if_t<detail::is_tensor_v<M>>>
auto bradley_terry(const C& r_chosen, const R& r_rejected, const M& margin, const BradleyTerryOptions& opt = {}) {
  detail::require_same_scalar<C, M>();
  return detail::bradley_terry_impl(r_chosen, r_rejected, &margin, opt);
}

}  // namespace prefloss
