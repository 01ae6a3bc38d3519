/// @file rl/whiten.hpp
/// Masked whitening (verl_F.masked_whiten, TRL's masked_whiten): shift and scale the selected
/// entries of a tensor to mean 0 and variance 1 over the whole tensor.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/lowp.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"

namespace prefloss {

/// Options of masked_whiten(). Defaults are verl's.
struct WhitenOptions {
  bool shift_mean = true;  ///< false: add the mean back after scaling (verl's shift_mean=False)
  double eps = 1e-8;       ///< >= 0: added to the variance before the inverse square root
  bool unbiased = true;    ///< Bessel's correction W / (W - 1) with W the mask's weight sum (verl)
  /// g >= 0 added to the weight sum W wherever a mean divides by it: verl's masked_mean adds
  /// 1e-8, so its mean is sum w x / (W + 1e-8) and its variance sum w (x - mean)^2 / (W + 1e-8).
  /// Bessel's factor keeps W / (W - 1), as verl's masked_var does.
  double count_guard = 0.0;
  /// true: Bessel's factor is (W + g) / (W + g - 1), the guarded count's, as torchtune's
  /// masked_var computes it (torchtune/rlhf/rewards.py); false (default): W / (W - 1), verl's.
  bool bessel_guard = false;
  /// v >= 0: the variance is max(var, v) before eps is added (OpenRLHF clamps its advantage
  /// variance at 1e-8 in place of adding an eps).
  double min_variance = 0.0;
};

namespace detail {

/// Contiguous view of a rank-1 or row-major rank-2 tensor, or of a packed batch, with its
/// shape for messages.
template <class T>
struct Flat {
  const tensor_scalar_t<T>* data;
  Index size;
  std::string shape;
  /// Rows for positions in messages: [rows, cols] (a rank-1 tensor is one row) or packed.
  RowLayout layout;
  Matrix<tensor_scalar_t<T>> matrix() const noexcept { return {data, layout.rows, layout.cols, layout.off}; }
};

template <class T>
Flat<T> flat_view(const T& t, const char* fn, const char* name) {
  if constexpr (is_packed_v<T>) {
    const auto m = matrix_view(t, fn, name);  // checks alignment and the offsets
    return {t.data(), t.size(), layout_str(m.layout()), m.layout()};
  } else {
    static_assert(is_tensor_v<T>, "prefloss: arguments must be Eigen::Tensor, Eigen::TensorMap or pl::packed");
    static_assert(tensor_rank_v<T> == 1 || tensor_rank_v<T> == 2,
                  "prefloss: masked_whiten takes rank-1 or rank-2 tensors (or pl::packed)");
    if constexpr (tensor_rank_v<T> == 2)
      static_assert(static_cast<int>(remove_cvref_t<T>::Layout) == static_cast<int>(Eigen::RowMajor),
                    "prefloss: rank-2 tensors must be row-major (Eigen::RowMajor)");
    require_aligned(t.data(), fn, name);
    const auto cols = static_cast<Index>(t.dimension(tensor_rank_v<T> - 1));
    const auto size = static_cast<Index>(t.size());
    return {t.data(), size, shape_of(t), RowLayout{cols ? size / cols : 0, cols, {}}};
  }
}

/// Checks every option of a whitening (the functions that take WhitenOptions share it).
inline void require_whiten_options(const WhitenOptions& opt, const char* fn) {
  require_option(opt.eps >= 0 && std::isfinite(opt.eps), fn, "eps", ">= 0 and finite", opt.eps);
  require_option(opt.count_guard >= 0 && std::isfinite(opt.count_guard), fn, "count_guard", ">= 0 and finite",
                 opt.count_guard);
  require_option(opt.min_variance >= 0 && std::isfinite(opt.min_variance), fn, "min_variance", ">= 0 and finite",
                 opt.min_variance);
}

/// The affine map of a whitening, x -> (x - mean) * inv + add.
struct WhitenMap {
  double mean, inv, add;
  double operator()(double x) const noexcept { return (x - mean) * inv + add; }
};

/// The whitening of entries with weight sum sw and weighted sum swx; centered(mean) returns
/// sum w (x - mean)^2. One formula for masked_whiten, logit_whiten and the REINFORCE++ baseline.
template <class Centered>
WhitenMap whiten_map(double sw, double swx, const Centered& centered, const WhitenOptions& opt) {
  const double n = sw + opt.count_guard;
  const double mean = swx / n;
  double var = centered(mean) / n;
  const double nb = opt.bessel_guard ? n : sw;
  if (opt.unbiased) var *= nb / (nb - 1);
  if (var < opt.min_variance) var = opt.min_variance;
  return {mean, 1.0 / std::sqrt(var + opt.eps), opt.shift_mean ? 0.0 : mean};
}

template <class T, class = void>
struct whiten_rank : std::integral_constant<int, 0> {};  // packed: any rank-1 output
template <class T>
struct whiten_rank<T, std::enable_if_t<is_tensor_v<T>>> : std::integral_constant<int, tensor_rank_v<T>> {};

/// The statistics and the write of masked_whiten over n contiguous entries (checked by the
/// caller); gae's whiten_advantages runs it on its own output.
template <class S, class M, class OT>
void whiten_flat(const S* x, const M* m, Index n, OT* o, const WhitenOptions& opt, const char* fn,
                 const std::string& mask_shape) {
  const auto weight = [&](Index k) { return static_cast<double>(m[k]); };
  double sw = 0, sx = 0;
  for (Index k = 0; k < n; ++k)
    if (m[k] != M(0)) {
      sw += weight(k);
      sx += weight(k) * static_cast<double>(x[k]);
    }
  if (!(sw > 0) || (opt.unbiased && !(sw > 1)))
    throw error(std::string(fn) + ": argument 'mask' has weight sum " + fmt(sw) + " over shape " + mask_shape +
                (opt.unbiased ? "; the unbiased variance needs a weight sum > 1" : "; it must select something"));
  const WhitenMap f = whiten_map(
      sw, sx,
      [&](double mean) {
        double ss = 0;
        for (Index k = 0; k < n; ++k)
          if (m[k] != M(0)) {
            const double c = static_cast<double>(x[k]) - mean;
            ss += weight(k) * c * c;
          }
        return ss;
      },
      opt);
  for (Index k = 0; k < n; ++k) o[k] = m[k] != M(0) ? round_to<OT>(f(static_cast<double>(x[k]))) : OT(0);
}

}  // namespace detail

/// @brief out = (x - mean) / sqrt(max(var, min_variance) + eps) at selected entries (mask != 0),
/// 0 elsewhere.
///
/// mean and var are over all selected entries of the tensor, weighted by a float mask:
/// mean = sum w x / (W + g), var = sum w (x - mean)^2 / (W + g), times W / (W - 1) when unbiased
/// (W = sum w, g = count_guard, 0 by default), all in double. This is verl_F.masked_whiten (verl's masked_var is
/// unbiased by default, unlike TRL's); verl also writes the affine map at masked entries, which here are 0 so that
/// padding (even inf/NaN) never reaches the output. shift_mean = false adds mean back after scaling. out may be values
/// itself (in-place). The statistics are over the whole batch, so a packed batch (values and mask pl::packed with the
/// same offsets) gives the padded result; its out is a rank-1 [total_tokens] tensor or map, or pl::packed(out, cu).
/// @param values rank-1 or row-major rank-2 tensor or map of float, double, Eigen::bfloat16 or
/// Eigen::half (16-bit values are read exactly; the statistics are in double either way), or
/// pl::packed
/// @param mask same shape; bool, uint8_t, float or double
/// @param out same shape and scalar type as values, or float for bf16/half values (a 16-bit out
/// holds the double result rounded to float, then once to nearest even)
/// @throws shape_error naming the argument (also for invalid, differing or mixed packed
/// layouts); option_error for eps, count_guard or min_variance < 0 or not finite; prefloss::error when the mask selects
/// nothing or (unbiased) has weight sum <= 1, where verl raises too. Nothing is written then.
template <class V, class MK, class O>
void masked_whiten(const V& values, const MK& mask, O&& out, const WhitenOptions& opt = {}) {
  constexpr const char* fn = "masked_whiten";
  using S = detail::tensor_scalar_t<V>;
  using M = detail::tensor_scalar_t<MK>;
  using OT = detail::tensor_scalar_t<O>;
  static_assert(detail::is_token_scalar_v<S>, "prefloss: values must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  constexpr int rv = detail::whiten_rank<V>::value, rm = detail::whiten_rank<MK>::value,
                ro = detail::whiten_rank<detail::remove_cvref_t<O>>::value;
  static_assert(rv == 0 || rm == 0 || (rm == rv && (ro == 0 || ro == rv)),
                "prefloss: masked_whiten's arguments must share one rank");
  static_assert(std::is_same_v<OT, S> || (detail::is_lowp_v<S> && std::is_same_v<OT, float>),
                "prefloss: out must have values' scalar type (or float for bf16/half values)");
  static_assert(detail::tensor_writable_v<O>, "prefloss: out must be writable");
  detail::require_whiten_options(opt, fn);
  const auto x = detail::flat_view(values, fn, "values");
  const auto m = detail::flat_view(mask, fn, "mask");
  if (x.layout.packed() && m.layout.packed())
    detail::require_same_layout(fn, "mask", m.layout, "values", x.layout);
  else
    detail::require_same(fn, "mask", m.shape, "values", x.shape);
  detail::require_weights<detail::compute_t<S>>(m.matrix(), fn, "mask");
  OT* o;
  if constexpr (detail::is_packed_v<O>) {
    if (!x.layout.packed())
      throw shape_error(std::string(fn) + ": argument 'out' must have shape " + x.shape + ", got packed " +
                        detail::shape_str(out.size()));
    o = detail::matrix_out(out, x.layout, fn, "out").data;
  } else if (x.layout.packed()) {
    o = detail::matrix_out(out, x.layout, fn, "out").data;  // rank-1 [total_tokens]
  } else {
    const std::string out_shape = detail::shape_of(out);
    if (out_shape != x.shape)
      throw shape_error(std::string(fn) + ": argument 'out' must have shape " + x.shape + ", got " + out_shape);
    detail::require_aligned(out.data(), fn, "out");
    o = out.data();
  }
  detail::whiten_flat(x.data, m.data, x.size, o, opt, fn, m.shape);
}

}  // namespace prefloss
