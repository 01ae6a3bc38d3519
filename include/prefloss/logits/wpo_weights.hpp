/// @file logits/wpo_weights.hpp
/// WPO's per-sequence weights (Zhou et al. 2024, "Weighted Preference Optimization", Eq. 2) from
/// the policy's logits, as TRL's DPOTrainer._compute_loss computes them for use_weighting.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../config.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "token_logprobs.hpp"

namespace prefloss {

namespace detail {
/// log sum_v exp(k z_v) in double (k = 1 or 2); -inf for a row without a finite logit.
template <class Z>
double logsumexp_scaled(const Z* z, Index V, double k) noexcept {
  double m = -std::numeric_limits<double>::infinity();
  for (Index v = 0; v < V; ++v) m = std::max(m, k * static_cast<double>(z[v]));
  if (!(m > -std::numeric_limits<double>::infinity())) return m;
  double s = 0;
  for (Index v = 0; v < V; ++v) s += std::exp(k * static_cast<double>(z[v]) - m);
  return m + std::log(s);
}
}  // namespace detail

/// @brief WPO weights: per sequence w = exp(sum_t m_t a_t / max(sum_t m_t, 1)), with the
/// aligned log-prob a_t = log p(y_t) - (logsumexp(2 z_t) - 2 logsumexp(z_t)) = z_t,y + lse(z_t) -
/// lse(2 z_t) of the token's logits z_t and label y_t (TRL's DPOTrainer._compute_loss,
/// use_weighting, trl/trainer/dpo_trainer.py, f2cd577). TRL takes them under no_grad: they are
/// constants, so pass w_c * w_r of a pair as DpoOptions::pair_weights.
///
/// In double from the logits as stored (no temperature, as TRL). Only selected tokens are read;
/// a token whose logits are all -inf contributes 0 (token_logprobs gives it logp 0), and a label
/// at a -inf logit gives w = 0. An empty row has w = exp(0) = 1.
/// @param logits row-major [batch, tokens, vocab] (float, double, bfloat16 or half)
/// @param labels [batch, tokens] int32_t / int64_t, in [0, vocab) at selected tokens
/// @param mask [batch, tokens] (its weights m_t, as TRL multiplies by its completion mask)
/// @param out [batch] float or double
/// @throws as token_logprobs for logits, labels and mask; shape_error naming 'out'; layout_error
/// when out overlaps an input. Nothing is written on error.
template <class X, class Y, class K, class O>
void wpo_weights(const X& logits, const Y& labels, const K& mask, O&& out) {
  constexpr const char* fn = "wpo_weights";
  using OT = detail::tensor_scalar_t<O>;
  static_assert(detail::is_real_v<OT>, "prefloss: out must be float or double");
  const auto a = detail::logits_args(logits, labels, mask, LogprobOptions{}, fn, false);
  OT* o = detail::vector_out(out, a.z.B, fn, "out");
  a.require_not_input(fn, "out", o, static_cast<std::size_t>(a.z.B) * sizeof(OT));
  using M = std::remove_const_t<std::remove_pointer_t<decltype(a.mask.data)>>;
  using S = double;
  for (Index b = 0; b < a.z.B; ++b) {
    double num = 0, den = 0;
    for (Index t = 0; t < a.z.T_; ++t) {
      const Index k = b * a.z.T_ + t;
      const M m = a.mask.data[k];
      if (!detail::selected<S>(m)) continue;
      const double w = detail::weight_of<S>(m);
      den += w;
      const auto* z = a.z.row(b, t);
      const double l1 = detail::logsumexp_scaled(z, a.z.V, 1.0);
      if (!(l1 > -std::numeric_limits<double>::infinity())) continue;
      num += w * (static_cast<double>(z[a.labels.data[k]]) + l1 - detail::logsumexp_scaled(z, a.z.V, 2.0));
    }
    o[b] = static_cast<OT>(std::exp(num / std::max(den, 1.0)));
  }
}

}  // namespace prefloss
