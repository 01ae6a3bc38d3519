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
};

namespace detail {

/// Contiguous view of a rank-1 or row-major rank-2 tensor, with its shape for messages.
template <class T>
struct Flat {
  const tensor_scalar_t<T>* data;
  Index size;
  std::string shape;
  /// As [rows, cols] (a rank-1 tensor is one column), for positions in messages.
  Matrix<tensor_scalar_t<T>> matrix() const noexcept { return {data, cols ? size / cols : 0, cols}; }
  Index cols;
};

template <class T>
Flat<T> flat_view(const T& t, const char* fn, const char* name) {
  static_assert(is_tensor_v<T>, "prefloss: arguments must be Eigen::Tensor or Eigen::TensorMap");
  static_assert(tensor_rank_v<T> == 1 || tensor_rank_v<T> == 2, "prefloss: masked_whiten takes rank-1 or rank-2 tensors");
  if constexpr (tensor_rank_v<T> == 2)
    static_assert(static_cast<int>(remove_cvref_t<T>::Layout) == static_cast<int>(Eigen::RowMajor),
                  "prefloss: rank-2 tensors must be row-major (Eigen::RowMajor)");
  require_aligned(t.data(), fn, name);
  return {t.data(), static_cast<Index>(t.size()), shape_of(t), static_cast<Index>(t.dimension(tensor_rank_v<T> - 1))};
}

}  // namespace detail

/// @brief out = (x - mean) / sqrt(var + eps) at selected entries (mask != 0), 0 elsewhere.
///
/// mean and var are over all selected entries of the tensor, weighted by a float mask:
/// mean = sum w x / W, var = sum w (x - mean)^2 / W, times W / (W - 1) when unbiased (W = sum w),
/// all in double. This is verl_F.masked_whiten (verl's masked_var is unbiased by default, unlike
/// TRL's); verl also writes the affine map at masked entries, which here are 0 so that padding
/// (even inf/NaN) never reaches the output. shift_mean = false adds mean back after scaling.
/// out may be values itself (in-place).
/// @param values rank-1 or row-major rank-2 tensor or map of float, double, Eigen::bfloat16 or
/// Eigen::half (16-bit values are read exactly; the statistics are in double either way)
/// @param mask same shape; bool, uint8_t, float or double
/// @param out same shape and scalar type as values, or float for bf16/half values (a 16-bit out
/// holds the double result rounded to float, then once to nearest even)
/// @throws shape_error naming the argument; option_error for eps < 0; prefloss::error when the
/// mask selects nothing or (unbiased) has weight sum <= 1, where verl raises too. Nothing is
/// written then.
template <class V, class MK, class O>
void masked_whiten(const V& values, const MK& mask, O&& out, const WhitenOptions& opt = {}) {
  constexpr const char* fn = "masked_whiten";
  using S = detail::tensor_scalar_t<V>;
  using M = detail::tensor_scalar_t<MK>;
  using OT = detail::tensor_scalar_t<O>;
  static_assert(detail::is_token_scalar_v<S>, "prefloss: values must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(detail::tensor_rank_v<MK> == detail::tensor_rank_v<V> && detail::tensor_rank_v<O> == detail::tensor_rank_v<V>,
                "prefloss: masked_whiten's arguments must share one rank");
  static_assert(std::is_same_v<OT, S> || (detail::is_lowp_v<S> && std::is_same_v<OT, float>),
                "prefloss: out must have values' scalar type (or float for bf16/half values)");
  static_assert(detail::tensor_writable_v<O>, "prefloss: out must be writable");
  detail::require_option(opt.eps >= 0 && std::isfinite(opt.eps), fn, "eps", ">= 0 and finite", opt.eps);
  const auto x = detail::flat_view(values, fn, "values");
  const auto m = detail::flat_view(mask, fn, "mask");
  detail::require_same(fn, "mask", m.shape, "values", x.shape);
  detail::require_weights<detail::compute_t<S>>(m.matrix(), fn, "mask");
  const std::string out_shape = detail::shape_of(out);
  if (out_shape != x.shape)
    throw shape_error(std::string(fn) + ": argument 'out' must have shape " + x.shape + ", got " + out_shape);
  detail::require_aligned(out.data(), fn, "out");

  const auto weight = [&](Index k) { return static_cast<double>(m.data[k]); };
  double sw = 0, sx = 0;
  for (Index k = 0; k < x.size; ++k)
    if (m.data[k] != M(0)) {
      sw += weight(k);
      sx += weight(k) * static_cast<double>(x.data[k]);
    }
  if (!(sw > 0) || (opt.unbiased && !(sw > 1)))
    throw error(std::string(fn) + ": argument 'mask' has weight sum " + detail::fmt(sw) + " over shape " + m.shape +
                (opt.unbiased ? "; the unbiased variance needs a weight sum > 1" : "; it must select something"));
  const double mean = sx / sw;
  double ss = 0;
  for (Index k = 0; k < x.size; ++k)
    if (m.data[k] != M(0)) {
      const double c = static_cast<double>(x.data[k]) - mean;
      ss += weight(k) * c * c;
    }
  double var = ss / sw;
  if (opt.unbiased) var *= sw / (sw - 1);
  const double inv = 1.0 / std::sqrt(var + opt.eps);
  const double add = opt.shift_mean ? 0.0 : mean;
  OT* o = out.data();
  for (Index k = 0; k < x.size; ++k)
    o[k] = m.data[k] != M(0) ? detail::round_to<OT>((static_cast<double>(x.data[k]) - mean) * inv + add) : OT(0);
}

}  // namespace prefloss
