/// @file loss/value.hpp
/// PPO's clipped value-function (critic) loss at token level, aggregated like ppo_clip.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../metrics.hpp"
#include "../parallel.hpp"
#include "../reduce/aggregation.hpp"
#include "token_loss.hpp"

namespace prefloss {

/// Options of value_loss(). Aggregation as in PpoOptions.
struct ValueOptions {
  /// >= 0: eps, the prediction is clipped to [old_values - eps, old_values + eps] (verl's
  /// cliprange_value, OpenRLHF's value_clip). The default 0.2 is OpenRLHF's; verl's critic
  /// config defaults to 0.5. std::nullopt: no clipping, l = (v - R)^2 / 2.
  std::optional<double> clip = 0.2;
  Aggregation aggregation = Aggregation::token_mean;
  /// token_count, sequence_count, token_sum_norm, row_weights: the global normalizers (see
  /// PREFLOSS_AGGREGATION_NORMALIZERS).
  PREFLOSS_AGGREGATION_NORMALIZERS;
  /// Threads the call and its backward() may split rows over (see PpoOptions::threads).
  Threads threads = {};
};

/// Metrics of value_loss (verl's critic/vf_clipfrac, critic/vpred_mean); masked weighted means.
template <class S>
struct ValueMetrics {
  S clip_fraction = 0;      ///< share of tokens whose clipped error is strictly larger (verl vf_clipfrac)
  S value_mean = 0;         ///< mean prediction (verl vpred_mean)
  double token_weight = 0;  ///< sum of the mask weights, in double (exact counts past 2^24)
};

/// @brief Entries of MetricSums<ValueMetrics<S>>: three sums weighted by the mask, no maxima;
/// the means divide by `weight` (this call's mask weight, not ValueOptions::token_count).
struct ValueMetricEntries {
  static constexpr std::size_t weight = 0;   ///< sums: mask weight of the valid tokens (token_weight)
  static constexpr std::size_t clipped = 1;  ///< sums: tokens whose clipped error is strictly larger
  static constexpr std::size_t value = 2;    ///< sums: the predictions v
  static constexpr std::size_t n_sums = 3;
  static constexpr std::size_t n_maxima = 0;
};

namespace detail {
template <class S>
struct metric_layout<ValueMetrics<S>> {
  using Entries = ValueMetricEntries;
  static constexpr std::size_t n_sums = Entries::n_sums, n_maxima = Entries::n_maxima;
  static ValueMetrics<S> finalize(const std::array<double, n_sums>& sums,
                                  const std::array<double, n_maxima>&) noexcept {
    using E = Entries;
    ValueMetrics<S> m;
    m.clip_fraction = static_cast<S>(mean_or_zero(sums[E::clipped], sums[E::weight]));
    m.value_mean = static_cast<S>(mean_or_zero(sums[E::value], sums[E::weight]));
    m.token_weight = sums[E::weight];
    return m;
  }
};

/// Per-token 0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2) and d / d v, with
/// verl's clip_by_value = max(min(v, hi), lo) and torch autograd's tie rule (equal split) for
/// min, max and the outer max. Clipped is a template argument, not a runtime bool (see
/// PpoKernel: GCC 12 miscompiles runtime bools around lane math into lane-0 masks).
template <class S, bool Clipped>
struct ValueKernel {
  static constexpr std::size_t n_in = 3;    // values, old_values, returns
  static constexpr std::size_t n_sums = 2;  // clipped, value
  static constexpr bool has_max = false;
  S eps;

  template <bool Fwd, bool Bwd>
  void eval(const batch<S>* x, TokenOut<S, n_sums>& o) const noexcept {
    using B = batch<S>;
    const B v = x[0], R = x[2];
    const B e1 = v - R;
    const B l1 = e1 * e1;
    if constexpr (!Clipped) {
      if constexpr (Fwd) {
        o.loss = B(S(0.5)) * l1;
        o.sums[0] = B(S(0));
        o.sums[1] = v;
      }
      o.grad = e1;
    } else {
      clipped_eval<Fwd, Bwd>(x, o, v, R, e1, l1);
    }
  }

  template <bool Fwd, bool Bwd>
  void clipped_eval(const batch<S>* x, TokenOut<S, n_sums>& o, const batch<S>& v, const batch<S>& R, const batch<S>& e1,
                    const batch<S>& l1) const noexcept {
    using B = batch<S>;
    const B zero(S(0)), one(S(1)), half(S(0.5)), two(S(2));
    const B lo = x[1] - B(eps), hi = x[1] + B(eps);
    const B mn = xsimd::min(v, hi);
    const B vc = xsimd::max(mn, lo);
    const B e2 = vc - R;
    const B l2 = e2 * e2;
    if constexpr (Fwd) {
      o.loss = half * xsimd::max(l1, l2);
      o.sums[0] = xsimd::select(l2 > l1, one, zero);
      o.sums[1] = v;
    }
    if constexpr (Bwd) {
      // d vc / d v through min(v, hi) then max(., lo), halves at ties.
      const B dmn = xsimd::select(v < hi, one, xsimd::select(v == hi, half, zero));
      const B dvc = dmn * xsimd::select(mn > lo, one, xsimd::select(mn == lo, half, zero));
      const B g1 = two * e1, g2 = two * e2 * dvc;
      o.grad = half * xsimd::select(l1 > l2, g1, xsimd::select(l1 < l2, g2, half * (g1 + g2)));
    }
  }
};

template <class S>
struct ValueParams {
  S eps;
  bool clipped;
  /// Both kernels are cheap; Sel is unused.
  template <class Sel, class F>
  void visit(F&& f) const {
    if (clipped) {
      ValueKernel<S, true> k;
      k.eps = eps;
      f(k);
    } else {
      ValueKernel<S, false> k;
      k.eps = eps;
      f(k);
    }
  }
};

}  // namespace detail

/// Result of value_loss: .loss, .losses, .metrics, .backward(grad) (d loss / d values).
/// S is the compute type (float for bf16/half inputs); In the inputs type (see TokenLossResult).
template <class S, class M, class In = detail::TokenInputs<S, M>>
using ValueResult = TokenLossResult<S, M, detail::ValueParams<S>, ValueMetrics<S>, In>;

namespace detail {

/// Validates every argument, then runs the forward, fused with the gradient into *grad_out
/// unless G is NoGrad (checked before anything is computed).
template <class In, class VT, class OT, class RT, class M, class G>
ValueResult<typename In::compute_type, M, In> value_loss_impl(const Matrix<VT>& v, const Matrix<OT>& old,
                                                              const Matrix<RT>& ret, const Matrix<M>& mask,
                                                              const ValueOptions& opt, G* grad_out) {
  using S = typename In::compute_type;
  constexpr const char* fn = "value_loss";
  if (opt.clip) require_option(*opt.clip >= 0 && std::isfinite(*opt.clip), fn, "clip", ">= 0 and finite", *opt.clip);
  const AggregationSpec spec = aggregation_spec(fn, opt, v.rows, v.packed() ? packed_rows : v.cols);
  validate_aggregation<S>(fn, spec);
  require_same_shape(fn, "old_values", old, "values", v);
  require_same_shape(fn, "returns", ret, "values", v);
  require_same_shape(fn, "mask", mask, "values", v);
  require_weights<S>(mask, fn, "mask");
  require_rows_or_globals(fn, "values", spec);

  ValueParams<S> p;
  p.clipped = opt.clip.has_value();
  p.eps = static_cast<S>(opt.clip ? *opt.clip : 0.0);
  In in;
  set_input(in, 0, v.data);
  set_input(in, 1, old.data);
  set_input(in, 2, ret.data);
  in.mask = mask.data;
  in.rows = v.rows;
  in.cols = v.cols;
  in.off = v.off;
  ValueResult<S, M, In> result(fn, in, p, "grad", AllKernels{}, opt.threads);
  const TokenStats st = result.template run<AllKernels>(spec, grad_out);
  auto& sums = result.metric_sums.sums;
  sums[ValueMetricEntries::weight] = st.weight;
  sums[ValueMetricEntries::clipped] = st.sums[0];
  sums[ValueMetricEntries::value] = st.sums[1];
  result.metrics = result.metric_sums.metrics();
  return result;
}

/// Named views of value_loss's tensors (G = NoGrad: the two-pass form).
template <class V, class O, class R, class MK, class G>
auto value_loss_views(const V& values, const O& old_values, const R& returns, const MK& mask, const ValueOptions& opt,
                      G* grad_out) {
  constexpr const char* fn = "value_loss";
  using In = token_inputs_t<tensor_scalar_t<MK>, tensor_scalar_t<V>, tensor_scalar_t<V>, tensor_scalar_t<O>,
                            tensor_scalar_t<R>>;
  return value_loss_impl<In>(matrix_view(values, fn, "values"), matrix_view(old_values, fn, "old_values"),
                             matrix_view(returns, fn, "returns"), matrix_view(mask, fn, "mask"), opt, grad_out);
}

template <class V, class O, class R, class MK>
constexpr void value_static_checks() {
  using S = tensor_scalar_t<V>;
  static_assert(is_token_scalar_v<S> && is_token_scalar_v<tensor_scalar_t<O>> && is_token_scalar_v<tensor_scalar_t<R>>,
                "prefloss: values and returns must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(!std::is_void_v<typename common_token<S, tensor_scalar_t<O>, tensor_scalar_t<R>>::type>,
                PREFLOSS_DETAIL_MIX_MESSAGE);
  static_assert(is_mask_v<tensor_scalar_t<MK>>, "prefloss: masks must be bool, uint8_t, float or double");
}

}  // namespace detail

/// @brief Clipped value loss: per token l = 0.5 * max((v - R)^2, (clip(v, v_old - eps,
/// v_old + eps) - R)^2), aggregated over selected tokens like ppo_clip (opt.aggregation,
/// token_count, ...). verl's compute_value_loss (0.5 * agg_loss of the max); OpenRLHF's
/// ValueLoss for token_mean. `.losses[i]` is row i's contribution (loss = sum of losses);
/// `.backward(grad)` writes d loss / d values with torch autograd's conventions for verl's
/// clip_by_value (max(min(v, hi), lo)): ties split the gradient equally, so at v == v_old + eps
/// exactly the clipped branch passes half of it.
/// Token inputs are float, double, Eigen::bfloat16 or Eigen::half, all of one type or a mix of
/// float, bf16 and half computed in float (as for ppo_clip); the gradient has values' storage
/// type, the float gradient rounded once to nearest even for bf16/half.
/// @param values predictions [batch, tokens] (the differentiated input), or every token
/// argument pl::packed(values, cu_seqlens) with the same offsets (grad outputs then rank-1
/// [total_tokens] or pl::packed; seq_mean_token_sum_norm then needs token_sum_norm)
/// @param old_values, returns constants, same shape; @param mask same shape (weights if float)
/// @throws shape_error naming the argument (also for invalid, differing or mixed packed
/// layouts); option_error for clip < 0, an unknown aggregation, a normaliser <= 0, or
/// seq_mean_token_sum_norm over packed input without token_sum_norm. Nothing is written on error.
template <class V, class O, class R, class MK>
auto value_loss(const V& values, const O& old_values, const R& returns, const MK& mask, const ValueOptions& opt = {}) {
  detail::value_static_checks<V, O, R, MK>();
  return detail::value_loss_views(values, old_values, returns, mask, opt, &detail::no_grad);
}

/// @brief Fused value_loss: forward and d loss / d values in one pass into grad_out
/// ([batch, tokens], fully overwritten).
template <class V, class O, class R, class MK, class G>
auto value_loss(const V& values, const O& old_values, const R& returns, const MK& mask, const ValueOptions& opt,
                G&& grad_out) {
  detail::value_static_checks<V, O, R, MK>();
  static_assert(std::is_same_v<detail::tensor_scalar_t<G>, detail::tensor_scalar_t<V>>,
                "prefloss: grad_out must have values' scalar type");
  return detail::value_loss_views(values, old_values, returns, mask, opt, &grad_out);
}

}  // namespace prefloss
