/// @file rl/kl.hpp
/// Per-token KL estimators between the policy and a reference (Schulman, "Approximating KL
/// divergence", 2020), as verl's kl_penalty computes them, with their derivatives: k1, k2, k3,
/// abs and the straight-through "+" estimators (a base estimator's value with k2's gradient, the
/// unbiased gradient of the KL). This is the one implementation of them; ppo_clip's KL term uses
/// it too.
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/elementwise.hpp"
#include "../detail/lowp.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../detail/token_kernels.hpp"
#include "../errors.hpp"

namespace prefloss {

/// @brief KL estimator of x = ref_logp - logp, with verl's names in parentheses (kl_penalty and
/// kl_penalty_forward in verl/trainer/ppo/core_algos.py, 1dda039).
///
/// The "+" estimators are verl's straight-through ones, backward_score - backward_score.detach()
/// + forward_score.detach() with backward_score = k2: the expected k1 and k3 estimates are the KL
/// but their expected gradients are not its gradient, k2's is. verl's "k2+" / "mse+" are k2.
/// New enumerators go last: the values are part of the ABI of callers that store them.
enum class KlEstimator {
  k1,        ///< -x = logp - ref_logp ("k1", "kl"); derivative 1
  k2,        ///< x^2 / 2 ("k2", "mse"); derivative logp - ref_logp
  k3,        ///< exp(x) - x - 1 ("k3", "low_var_kl"); derivative 1 - exp(x), clamps below
  abs,       ///< |x| = |logp - ref_logp| ("abs"); derivative sign(logp - ref_logp), 0 where equal
  k1_plus,   ///< k1's value logp - ref_logp ("k1+", "kl+"); derivative logp - ref_logp (k2's)
  abs_plus,  ///< abs's value |logp - ref_logp| ("abs+"); derivative logp - ref_logp (k2's)
  k3_plus,   ///< k3's value exp(x) - x - 1, k3's clamps included ("k3+", "low_var_kl+");
             ///< derivative logp - ref_logp (k2's) everywhere: the clamps do not gate it
};

/// @def PREFLOSS_K3_CLAMPS
/// @brief verl's low_var_kl guards of the k3 estimator, declared once here and expanded in every
/// options struct with a KL term (KlOptions, PpoOptions); k1, k2, abs and their "+" forms are
/// never clamped, as in verl.
///
/// - `std::optional<double> k3_log_ratio_clamp = 20`: x = ref_logp - logp is clamped to [-c, c]
///   before exp (k3's gradient is 0 beyond it).
/// - `std::optional<double> k3_clamp = 10`: the estimate is clamped to [-c, c] (k3's gradient is
///   0 beyond it).
///
/// Both apply to k3 and to k3_plus's value; k3_plus's gradient, logp - ref_logp, ignores them
/// (verl detaches the clamped forward score).
/// std::nullopt turns a clamp off for the exact estimator; when set, each must be > 0 (and finite
/// in the token type). Direct members for C++20 designated initializers (see
/// PREFLOSS_AGGREGATION_NORMALIZERS); the marker lets detail::kl_params accept exactly these structs.
#define PREFLOSS_K3_CLAMPS                         \
  std::optional<double> k3_log_ratio_clamp = 20.0; \
  std::optional<double> k3_clamp = 10.0;           \
  static constexpr bool prefloss_k3_clamps = true

/// Options of kl_estimate().
struct KlOptions {
  KlEstimator estimator = KlEstimator::k3;
  PREFLOSS_K3_CLAMPS;  ///< k3_log_ratio_clamp, k3_clamp (see PREFLOSS_K3_CLAMPS)
};

namespace detail {

inline bool valid_kl_estimator(KlEstimator k) noexcept {
  switch (k) {
    case KlEstimator::k1:
    case KlEstimator::k2:
    case KlEstimator::k3:
    case KlEstimator::abs:
    case KlEstimator::k1_plus:
    case KlEstimator::abs_plus:
    case KlEstimator::k3_plus:
      return true;
  }
  return false;  // a value cast from an integer outside the enumerators
}

/// The clamps as lane constants; +inf when off (clamping to +-inf is the identity).
template <class S>
struct KlParams {
  S x_clamp = std::numeric_limits<S>::infinity();
  S value_clamp = std::numeric_limits<S>::infinity();
};

/// Checks a KL term's estimator and the clamps its options declare with PREFLOSS_K3_CLAMPS.
template <class S, class Opt>
void validate_kl(const char* fn, KlEstimator est, const Opt& opt, const char* est_name) {
  static_assert(Opt::prefloss_k3_clamps, "options must declare PREFLOSS_K3_CLAMPS");
  require_enum(valid_kl_estimator(est), fn, est_name, static_cast<int>(est));
  if (opt.k3_log_ratio_clamp) require_positive_in<S>(fn, "k3_log_ratio_clamp", *opt.k3_log_ratio_clamp);
  if (opt.k3_clamp) require_positive_in<S>(fn, "k3_clamp", *opt.k3_clamp);
}

/// The clamps of options that declare PREFLOSS_K3_CLAMPS, as lane constants.
template <class S, class Opt>
KlParams<S> kl_params(const Opt& opt) {
  static_assert(Opt::prefloss_k3_clamps, "options must declare PREFLOSS_K3_CLAMPS");
  KlParams<S> p;
  if (opt.k3_log_ratio_clamp) p.x_clamp = static_cast<S>(*opt.k3_log_ratio_clamp);
  if (opt.k3_clamp) p.value_clamp = static_cast<S>(*opt.k3_clamp);
  return p;
}

/// @brief One batch of KL estimates and d estimate / d logp, with torch's autograd conventions:
/// torch.clamp passes the gradient on [lo, hi] inclusive and blocks it outside; torch.abs's
/// gradient is sign(d), 0 at d == 0 (and at NaN).
template <KlEstimator K, class S>
inline ValueGrad<batch<S>> kl_token(const batch<S>& logp, const batch<S>& ref, const KlParams<S>& p) noexcept {
  using B = batch<S>;
  if constexpr (K == KlEstimator::k1_plus || K == KlEstimator::abs_plus || K == KlEstimator::k3_plus) {
    // Straight-through: the detached base value, k2's gradient.
    constexpr KlEstimator base = K == KlEstimator::k1_plus    ? KlEstimator::k1
                                 : K == KlEstimator::abs_plus ? KlEstimator::abs
                                                              : KlEstimator::k3;
    return {kl_token<base, S>(logp, ref, p).value, logp - ref};
  } else if constexpr (K == KlEstimator::k1) {
    return {logp - ref, B(S(1))};
  } else if constexpr (K == KlEstimator::k2) {
    const B d = logp - ref;
    return {S(0.5) * (d * d), d};
  } else if constexpr (K == KlEstimator::abs) {
    const B d = logp - ref;
    return {xsimd::abs(d), xsimd::select(d > B(S(0)), B(S(1)), xsimd::select(d < B(S(0)), B(S(-1)), B(S(0))))};
  } else {
    static_assert(K == KlEstimator::k3, "prefloss: kl_token misses an estimator");
    const B x = ref - logp;
    const B xc = xsimd::min(xsimd::max(x, B(-p.x_clamp)), B(p.x_clamp));
    const B e = exp_ratio(xc);
    const B kld = (e - xc) - B(S(1));
    const B value = xsimd::min(xsimd::max(kld, B(-p.value_clamp)), B(p.value_clamp));
    const auto pass =
        (x >= B(-p.x_clamp)) & (x <= B(p.x_clamp)) & (kld >= B(-p.value_clamp)) & (kld <= B(p.value_clamp));
    return {value, xsimd::select(pass, B(S(1)) - e, B(S(0)))};
  }
}

/// Calls f(std::integral_constant<KlEstimator, K>{}) for the runtime estimator. Callers validate
/// it first (validate_kl); a value outside the enumerators, which they never pass, runs k3, the
/// default estimator, rather than falling off the end without a return.
template <class F>
decltype(auto) with_kl_estimator(KlEstimator k, F&& f) {
  switch (k) {
    case KlEstimator::k1:
      return f(std::integral_constant<KlEstimator, KlEstimator::k1>{});
    case KlEstimator::k2:
      return f(std::integral_constant<KlEstimator, KlEstimator::k2>{});
    case KlEstimator::abs:
      return f(std::integral_constant<KlEstimator, KlEstimator::abs>{});
    case KlEstimator::k1_plus:
      return f(std::integral_constant<KlEstimator, KlEstimator::k1_plus>{});
    case KlEstimator::abs_plus:
      return f(std::integral_constant<KlEstimator, KlEstimator::abs_plus>{});
    case KlEstimator::k3_plus:
      return f(std::integral_constant<KlEstimator, KlEstimator::k3_plus>{});
    case KlEstimator::k3:
    default:
      return f(std::integral_constant<KlEstimator, KlEstimator::k3>{});
  }
}

/// Streams the estimates (and, with Grad, their derivatives); Grad is a template argument for
/// the reason PpoKernel's AddKl is.
template <KlEstimator K, bool Grad, class S, class M>
void kl_rows(const Matrix<S>& lp, const Matrix<S>& ref, const Matrix<M>& mask, const KlParams<S>& p, S* out,
             S* grad) noexcept {
  constexpr Index W = static_cast<Index>(lanes<S>);
  using B = batch<S>;
  const B zero(S(0));
  const auto step = [&](const S* x, const S* r, const M* m, S* o, S* g) PREFLOSS_DETAIL_ALWAYS_INLINE {
    const auto ml = load_mask_lanes<S>(m);
    const auto k = kl_token<K, S>(load_u<S, arch>(x), load_u<S, arch>(r), p);
    store_u(o, xsimd::select(ml.sel, k.value, zero));
    if constexpr (Grad) store_u(g, xsimd::select(ml.sel, k.grad, zero));
  };
  const Index n = lp.count();  // rows are contiguous (padded or packed): stream the whole array
  Index t = 0;
  for (; t + W <= n; t += W) step(lp.data + t, ref.data + t, mask.data + t, out + t, Grad ? grad + t : nullptr);
  if (t < n) {
    const std::size_t r = static_cast<std::size_t>(n - t);
    alignas(64) S xb[lanes<S>] = {}, rb[lanes<S>] = {}, ob[lanes<S>], gb[lanes<S>];
    alignas(64) M mb[lanes<S>] = {};
    std::memcpy(xb, lp.data + t, r * sizeof(S));
    std::memcpy(rb, ref.data + t, r * sizeof(S));
    std::memcpy(mb, mask.data + t, r * sizeof(M));
    step(xb, rb, mb, ob, gb);
    std::memcpy(out + t, ob, r * sizeof(S));
    if constexpr (Grad) std::memcpy(grad + t, gb, r * sizeof(S));
  }
}

/// @brief kl_rows over 16-bit (or mixed float/16-bit) inputs: chunks of lowp_chunk tokens
/// converted to float, run through the float kernel, and the estimates (OT) and derivatives
/// (GT, logp's storage type) stored back, each rounded once from float when 16-bit.
template <KlEstimator K, bool Grad, class LT, class RT, class M, class OT, class GT>
void kl_rows_lowp(const Matrix<LT>& lp, const Matrix<RT>& ref, const Matrix<M>& mask, const KlParams<float>& p, OT* out,
                  GT* grad) noexcept {
  alignas(64) float xb[lowp_chunk], rb[lowp_chunk], ob[lowp_chunk], gb[Grad ? lowp_chunk : 1];
  const Index n = lp.count();  // padded or packed, the rows are contiguous
  for (Index t = 0; t < n; t += lowp_chunk) {
    const Index len = n - t < lowp_chunk ? n - t : lowp_chunk;
    const Matrix<float> x{as_float(lp.data + t, len, xb), 1, len}, r{as_float(ref.data + t, len, rb), 1, len};
    const Matrix<M> m{mask.data + t, 1, len};
    kl_rows<K, Grad>(x, r, m, p, ob, Grad ? gb : nullptr);
    from_float(ob, out + t, len);
    if constexpr (Grad) from_float(gb, grad + t, len);
  }
}

template <class LP, class RF, class MK, class O, class G>
void kl_estimate_impl(const LP& logp, const RF& ref_logp, const MK& mask, const KlOptions& opt, O&& out, G* grad) {
  constexpr const char* fn = "kl_estimate";
  using LT = tensor_scalar_t<LP>;
  using RT = tensor_scalar_t<RF>;
  using OT = tensor_scalar_t<O>;
  using Mix = common_token<LT, RT>;
  using S = typename Mix::type;
  static_assert(is_token_scalar_v<LT> && is_token_scalar_v<RT>,
                "prefloss: log-probs must be float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(!std::is_void_v<S>, PREFLOSS_DETAIL_MIX_MESSAGE);
  static_assert(is_mask_v<tensor_scalar_t<MK>>, "prefloss: masks must be bool, uint8_t, float or double");
  static_assert(std::is_same_v<OT, LT> || (Mix::lowp && std::is_same_v<OT, float>),
                "prefloss: out must have logp's scalar type (or float when an input is bf16/half)");
  validate_kl<S>(fn, opt.estimator, opt, "estimator");
  const auto lp = matrix_view(logp, fn, "logp");
  const auto rf = matrix_view(ref_logp, fn, "ref_logp");
  const auto mk = matrix_view(mask, fn, "mask");
  require_same_shape(fn, "ref_logp", rf, "logp", lp);
  require_same_shape(fn, "mask", mk, "logp", lp);
  require_weights<S>(mk, fn, "mask");
  const auto o = matrix_out(std::forward<O>(out), lp.layout(), fn, "out");
  LT* g = nullptr;
  if constexpr (!is_no_grad_v<G>) {
    static_assert(std::is_same_v<tensor_scalar_t<G>, LT>, "prefloss: grad_out must have logp's scalar type");
    g = matrix_out(*grad, lp.layout(), fn, "grad_out").data;
    require_disjoint(fn, "out", out, "grad_out", *grad);
  }
  const auto p = kl_params<S>(opt);
  with_kl_estimator(opt.estimator, [&](auto k) {
    if constexpr (Mix::lowp) {
      if (g)
        kl_rows_lowp<decltype(k)::value, true>(lp, rf, mk, p, o.data, g);
      else
        kl_rows_lowp<decltype(k)::value, false>(lp, rf, mk, p, o.data, g);
    } else {
      if (g)
        kl_rows<decltype(k)::value, true>(lp, rf, mk, p, o.data, g);
      else
        kl_rows<decltype(k)::value, false>(lp, rf, mk, p, o.data, g);
    }
  });
}

}  // namespace detail

/// @brief Per-token KL estimates k(logp, ref_logp) with x = ref_logp - logp:
/// k1 = -x, k2 = x^2/2, k3 = exp(x) - x - 1 (with its low_var_kl clamps unless turned off in
/// KlOptions), abs = |x|; k1_plus, abs_plus and k3_plus have the value of k1, abs and k3 (k3's
/// clamps included). verl's kl_penalty / kl_penalty_forward (verl/trainer/ppo/core_algos.py,
/// 1dda039). out[i,t] = 0 where the mask is 0 (masked tokens may hold inf/NaN); a float mask
/// only selects here (nonzero = valid), it does not weight.
/// @param logp, ref_logp row-major [batch, tokens] tensors or maps of float, double,
/// Eigen::bfloat16 or Eigen::half: one type, or a mix of float, bf16 and half computed in float;
/// or both pl::packed(values, cu_seqlens) with the same offsets
/// @param mask same shape (packed: pl::packed, same offsets); bool, uint8_t, float or double
/// @param out [batch, tokens] tensor or map of logp's scalar type, or float when an input is
/// bf16/half; fully overwritten (a 16-bit out holds the float estimate rounded once to nearest
/// even). grad_out, where given, has logp's scalar type. Packed inputs: rank-1 [total_tokens]
/// or pl::packed(out, cu).
/// @throws shape_error naming the argument (also for invalid, differing or mixed packed
/// layouts); option_error for an unknown estimator or a clamp <= 0. Nothing is written then.
template <class LP, class RF, class MK, class O>
void kl_estimate(const LP& logp, const RF& ref_logp, const MK& mask, const KlOptions& opt, O&& out) {
  detail::kl_estimate_impl(logp, ref_logp, mask, opt, std::forward<O>(out), &detail::no_grad);
}

/// @brief kl_estimate with verl's default clamps for the given estimator.
template <class LP, class RF, class MK, class O>
void kl_estimate(const LP& logp, const RF& ref_logp, const MK& mask, KlEstimator estimator, O&& out) {
  KlOptions opt;
  opt.estimator = estimator;
  detail::kl_estimate_impl(logp, ref_logp, mask, opt, std::forward<O>(out), &detail::no_grad);
}

/// @brief kl_estimate that also writes grad_out[i,t] = d k / d logp[i,t] (torch autograd of
/// verl's formula: 1 for k1; logp - ref_logp for k2; 1 - exp(x) for k3 and 0 where a k3 clamp
/// is active; sign(logp - ref_logp) for abs, 0 at logp == ref_logp; logp - ref_logp for
/// k1_plus, abs_plus and k3_plus, k3_plus's included where a k3 clamp holds its value, since
/// the straight-through estimate detaches the clamped value; 0 at masked-out tokens).
template <class LP, class RF, class MK, class O, class G>
void kl_estimate(const LP& logp, const RF& ref_logp, const MK& mask, const KlOptions& opt, O&& out, G&& grad_out) {
  detail::kl_estimate_impl(logp, ref_logp, mask, opt, std::forward<O>(out), &grad_out);
}

}  // namespace prefloss
