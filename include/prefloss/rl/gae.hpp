/// @file rl/gae.hpp
/// Generalized Advantage Estimation (Schulman et al. 2016) over masked token rows, as verl's
/// compute_gae_advantage_return computes it.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/lowp.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "../detail/token_kernels.hpp"
#include "../errors.hpp"
#include "whiten.hpp"

namespace prefloss {

/// Options of gae(). Defaults are verl's (algorithm.gamma = lam = 1).
struct GaeOptions {
  double gamma = 1.0;  ///< in [0, 1]: discount
  double lam = 1.0;    ///< in [0, 1]: GAE lambda
  /// true: whiten the advantages with masked_whiten(WhitenOptions{}) afterwards, as verl's
  /// compute_gae_advantage_return does (returns stay unwhitened). Off by default: plain GAE.
  bool whiten_advantages = false;
};

/// @brief GAE advantages and returns, backwards in time along each row.
///
/// With valid tokens those whose mask is nonzero (a float mask selects, it does not weight),
/// for t from the last token down, at valid t:
///   delta = r[t] + gamma * V_next - V[t],  A[t] = delta + gamma * lam * A_next,
///   returns[t] = A[t] + V[t],  then V_next = V[t], A_next = A[t];
/// V_next = A_next = 0 after the row's end. Masked tokens are skipped as verl skips them: they
/// neither discount nor reset the recursion, so a valid token before a masked span (e.g. an
/// observation in a multi-turn rollout) bootstraps from the next valid token's value. At masked
/// tokens both outputs are 0 (verl carries A_next there; it is never used) and the inputs there
/// are never read into anything, so they may hold inf/NaN. Arithmetic in double.
/// Outputs may alias the inputs (advantages_out = rewards, returns_out = values).
/// A packed batch (every token argument pl::packed(values, cu_seqlens) with the same offsets)
/// runs the same recursion along each packed row; its outputs are rank-1 [total_tokens] tensors
/// or maps, or pl::packed(out, cu).
/// @param rewards, values row-major [batch, tokens] float, double, Eigen::bfloat16 or Eigen::half:
/// one type, or a mix of float, bf16 and half (read exactly; the recursion is in double either
/// way); @param mask same shape
/// @param advantages_out, returns_out [batch, tokens] of rewards' scalar type (or float when an
/// input is bf16/half: recommended, a 16-bit advantage keeps 8 or 11 bits), fully overwritten; a
/// 16-bit output holds the double result rounded to float, then once to nearest even
/// @throws shape_error naming the argument (also for invalid, differing or mixed packed
/// layouts); option_error for gamma or lam outside [0, 1];
/// with whiten_advantages, prefloss::error when the mask's weight sum is <= 1. Nothing is
/// written on error.
template <class R, class V, class MK, class A, class RT>
void gae(const R& rewards, const V& values, const MK& mask, const GaeOptions& opt, A&& advantages_out,
         RT&& returns_out) {
  constexpr const char* fn = "gae";
  using RS = detail::tensor_scalar_t<R>;
  using VS = detail::tensor_scalar_t<V>;
  using M = detail::tensor_scalar_t<MK>;
  using Mix = detail::common_token<RS, VS>;
  // The outputs' type: rewards' storage type, or float when an input is bf16/half.
  using S = detail::tensor_scalar_t<A>;
  static_assert(detail::is_token_scalar_v<RS> && detail::is_token_scalar_v<VS>,
                "prefloss: rewards and values must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(!std::is_void_v<typename Mix::type>, PREFLOSS_DETAIL_MIX_MESSAGE);
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(std::is_same_v<detail::tensor_scalar_t<RT>, S> &&
                    (std::is_same_v<S, RS> || (Mix::lowp && std::is_same_v<S, float>)),
                "prefloss: both outputs must have rewards' scalar type (or float when an input is bf16/half)");
  detail::require_option(opt.gamma >= 0 && opt.gamma <= 1, fn, "gamma", "in [0, 1]", opt.gamma);
  detail::require_option(opt.lam >= 0 && opt.lam <= 1, fn, "lam", "in [0, 1]", opt.lam);
  const auto r = detail::matrix_view(rewards, fn, "rewards");
  const auto v = detail::matrix_view(values, fn, "values");
  const auto m = detail::matrix_view(mask, fn, "mask");
  detail::require_same_shape(fn, "values", v, "rewards", r);
  detail::require_same_shape(fn, "mask", m, "rewards", r);
  detail::require_weights<typename Mix::type>(m, fn, "mask");
  const auto adv = detail::matrix_out(std::forward<A>(advantages_out), r.layout(), fn, "advantages_out");
  const auto ret = detail::matrix_out(std::forward<RT>(returns_out), r.layout(), fn, "returns_out");
  detail::require_disjoint(fn, "advantages_out", advantages_out, "returns_out", returns_out);
  if (opt.whiten_advantages) {
    double w = 0;
    for (Index k = 0; k < m.count(); ++k)
      if (m.data[k] != M(0)) w += static_cast<double>(m.data[k]);
    if (!(w > 1))
      throw error(std::string(fn) + ": whiten_advantages needs a mask weight sum > 1, argument 'mask' has " +
                  detail::fmt(w) + " over shape " + detail::layout_str(m.layout()));
  }

  const double gl = opt.gamma * opt.lam;
  for (Index i = 0; i < r.rows; ++i) {
    const RS* ri = r.row(i);
    const VS* vi = v.row(i);
    const M* mi = m.row(i);
    S* ai = adv.row(i);
    S* gi = ret.row(i);
    double next_value = 0, next_adv = 0;
    for (Index t = r.len(i) - 1; t >= 0; --t) {
      if (mi[t] != M(0)) {
        const double vt = static_cast<double>(vi[t]);
        const double delta = static_cast<double>(ri[t]) + opt.gamma * next_value - vt;
        next_adv = delta + gl * next_adv;
        next_value = vt;
        ai[t] = detail::round_to<S>(next_adv);
        gi[t] = detail::round_to<S>(next_adv + vt);
      } else {
        ai[t] = S(0);
        gi[t] = S(0);
      }
    }
  }
  if (opt.whiten_advantages)  // masked_whiten(advantages_out, mask, advantages_out), checked above
    detail::whiten_flat(adv.data, m.data, m.count(), adv.data, WhitenOptions{}, "masked_whiten",
                        detail::layout_str(m.layout()));
}

}  // namespace prefloss
