/// @file logits/token_logprobs.hpp
/// Token log-probs and entropy from logits, and their exact backward.
///
/// For logits z [batch, tokens, vocab], temperature tau, u = z / tau (computed as z * (1 / tau)
/// in the logits' compute type) and a selected token's label y:
///
///     logp    = u_y - logsumexp(u)                = log softmax(u)_y
///     entropy = logsumexp(u) - sum_v p_v u_v      = -sum_v p_v log p_v,  p = softmax(u)
///     d logp    / d z_v = (1[v == y] - p_v) / tau
///     d entropy / d z_v = -p_v (log p_v + entropy) / tau
///
/// Accuracy. With m = max_v u_v and S_o = sum_{v != y} exp(u_v - m) (the label left out of the
/// sum), logp = -log1p(S_o) when the label holds the maximum and (u_y - m) - log(S_o + exp(u_y -
/// m)) otherwise: the first keeps full relative precision as p_y -> 1 (z_y - logsumexp(z)
/// cancels there and loses it), the second has no cancellation since p_y <= 1/2. The gradient's
/// label entry uses -expm1(logp) for 1 - p_y. Float logits are summed in float SIMD lanes widened
/// into double every 8 adds (<= 7 * 2^-24 relative, whatever the vocabulary size); the logs and
/// the per-token statistics are in double.
///
/// Special values. A -inf logit (forbidden or top-k masked vocabulary) has probability 0 and
/// gradient 0; a label at a -inf logit gives logp = -inf. A row without a finite logit, or with
/// a NaN or +inf logit, has no distribution: NaN out, NaN gradient. Masked-out tokens get
/// logp = 0, entropy = 0 and a zero gradient row, and their logits and labels are never read.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/eigen.hpp"
#include "../detail/exp_log.hpp"
#include "../detail/lowp.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/row_loop.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"

namespace prefloss {

/// Options of token_logprobs.
struct LogprobOptions {
  double temperature = 1.0;  ///< tau > 0 and finite (also 1 / tau in the compute type); logits are divided by it
  bool entropy = false;      ///< also compute the per-token entropy (and allow its backward)
};

namespace detail {

/// Per-token statistics of one selected row, in double.
struct LogitRowStats {
  double m = 0;      ///< max_v u_v
  double log_s = 0;  ///< log sum_v exp(u_v - m)
  double logp = 0;
  double entropy = 0;
};

/// [batch, tokens, vocab] row-major read view.
template <class T>
struct Logits3 {
  const T* data;
  Index B, T_, V;
  const T* row(Index b, Index t) const noexcept { return data + (b * T_ + t) * V; }
};

template <class X>
Logits3<tensor_scalar_t<X>> logits_view(const X& z, const char* fn, const char* name) {
  static_assert(is_tensor_v<X> && tensor_rank_v<X> == 3,
                "prefloss: logits are a rank-3 [batch, tokens, vocab] Eigen::Tensor or TensorMap");
  static_assert(static_cast<int>(remove_cvref_t<X>::Layout) == static_cast<int>(Eigen::RowMajor),
                "prefloss: logits must be row-major (Eigen::RowMajor)");
  using T = tensor_scalar_t<X>;
  static_assert(is_token_scalar_v<T>, "prefloss: logits must be float, double, Eigen::bfloat16 or Eigen::half");
  require_aligned(z.data(), fn, name);
  return {z.data(), static_cast<Index>(z.dimension(0)), static_cast<Index>(z.dimension(1)),
          static_cast<Index>(z.dimension(2))};
}

/// Calls f(u) for the lanes-wide batches of n values at p times k, and for the tail padded with
/// `pad` (the identity of the caller's reduction).
template <class C, class F>
inline void for_batches(const C* p, Index n, C k, C pad, F&& f) noexcept {
  using Bt = batch<C>;
  constexpr Index W = static_cast<Index>(lanes<C>);
  const Bt kb(k);
  Index v = 0;
  for (; v + W <= n; v += W) f(load_u<C, arch>(p + v) * kb);
  if (v < n) {
    alignas(64) C buf[lanes<C>];
    for (Index j = 0; j < W; ++j) buf[j] = pad;
    std::memcpy(buf, p + v, static_cast<std::size_t>(n - v) * sizeof(C));
    f(Bt::load_aligned(buf) * kb);  // pad * k: -inf stays -inf for k > 0
  }
}

/// max_v p[v] * k over n >= 1 values, and whether any is NaN.
template <class C>
inline C row_max(const C* p, Index n, C k, bool& nan) noexcept {
  using Bt = batch<C>;
  constexpr C ninf = -std::numeric_limits<C>::infinity();
  Bt mx(ninf);
  auto bad = Bt(C(0)) != Bt(C(0));
  for_batches<C>(p, n, k, ninf, [&](const Bt& u) {
    bad = bad | xsimd::isnan(u);
    mx = xsimd::max(mx, u);
  });
  nan = xsimd::any(bad);
  alignas(64) C l[lanes<C>];
  mx.store_aligned(l);
  C r = l[0];
  for (std::size_t j = 1; j < lanes<C>; ++j) r = l[j] > r ? l[j] : r;
  return r;
}

/// sum_v exp(p[v] k - m) over n values (and, with Ent, sum_v exp(d_v) d_v, d_v = p[v] k - m, a
/// -inf d_v adding 0), into double.
template <bool Ent, class C>
inline void row_exp_sums(const C* p, Index n, C k, C m, double& s, double& t) noexcept {
  using Bt = batch<C>;
  constexpr C ninf = -std::numeric_limits<C>::infinity();
  LaneSum<C> es, ed;
  const Bt mb(m), zero(C(0));
  int since_flush = 0;
  for_batches<C>(p, n, k, ninf, [&](const Bt& u) {
    const Bt d = u - mb;
    const Bt e = detail::exp<C, arch>(d);
    es.add(e);
    if constexpr (Ent) ed.add(xsimd::select(e > zero, e * d, zero));
    if (++since_flush == chunk_batches) {
      es.flush();
      if constexpr (Ent) ed.flush();
      since_flush = 0;
    }
  });
  alignas(64) double l[lanes<C>];
  es.lanes_to(l);
  for (std::size_t j = 0; j < lanes<C>; ++j) s += l[j];
  if constexpr (Ent) {
    ed.lanes_to(l);
    for (std::size_t j = 0; j < lanes<C>; ++j) t += l[j];
  }
}

/// The statistics of one selected row of V compute-type values (see the file comment).
template <bool Ent, class C>
inline LogitRowStats logit_row(const C* z, Index V, Index y, C k) noexcept {
  LogitRowStats r;
  bool nan = false;
  const C m = row_max<C>(z, V, k, nan);
  if (nan || !(m < std::numeric_limits<C>::infinity()) || !(m > -std::numeric_limits<C>::infinity())) {
    const double q = std::numeric_limits<double>::quiet_NaN();
    return {q, q, q, q};
  }
  double s_o = 0, t = 0;
  row_exp_sums<Ent, C>(z, y, k, m, s_o, t);
  row_exp_sums<Ent, C>(z + y + 1, V - y - 1, k, m, s_o, t);
  const C uy = z[y] * k;
  const double dy = static_cast<double>(uy) - static_cast<double>(m);  // exact: both are C values
  const double ey = std::exp(dy);
  if constexpr (Ent) {
    if (ey > 0) t += ey * dy;
  }
  const double s = s_o + ey;
  r.m = static_cast<double>(m);
  r.log_s = std::log(s);
  r.logp = uy == m ? -std::log1p(s_o) : dy - r.log_s;
  if constexpr (Ent) r.entropy = r.log_s - t / s;
  return r;
}

/// d/dz of g_lp * logp + g_h * entropy for one selected row, written to out (compute type C).
template <bool Ent, class C>
inline void logit_row_grad(const C* z, Index V, Index y, C k, const LogitRowStats& st, double g_lp, double g_h,
                           C* out) noexcept {
  using Bt = batch<C>;
  constexpr Index W = static_cast<Index>(lanes<C>);
  const Bt mb(static_cast<C>(st.m)), ls(static_cast<C>(st.log_s)), zero(C(0));
  const Bt a(static_cast<C>(-g_lp * static_cast<double>(k)));  // the -p_v term of logp's gradient
  const Bt c(static_cast<C>(-g_h * static_cast<double>(k)));   // entropy: -p_v (log p_v + H)
  const Bt h(static_cast<C>(st.entropy)), kb(k);
  const auto grad = [&](const Bt& u) {
    const Bt lp = (u - mb) - ls;
    const Bt p = detail::exp<C, arch>(lp);
    Bt g = a * p;
    if constexpr (Ent) g = g + xsimd::select(p > zero, c * (p * (lp + h)), zero);
    return g;
  };
  Index v = 0;
  for (; v + W <= V; v += W) grad(load_u<C, arch>(z + v) * kb).store_unaligned(out + v);
  if (v < V) {
    alignas(64) C buf[lanes<C>] = {}, o[lanes<C>];
    std::memcpy(buf, z + v, static_cast<std::size_t>(V - v) * sizeof(C));
    grad(Bt::load_aligned(buf) * kb).store_aligned(o);
    std::memcpy(out + v, o, static_cast<std::size_t>(V - v) * sizeof(C));
  }
  // The label entry in double: 1 - p_y as -expm1(logp), exact as p_y -> 1.
  const double py = std::exp(st.logp);
  double gy = g_lp * -std::expm1(st.logp);
  if constexpr (Ent) gy += py > 0 ? -g_h * py * (st.logp + st.entropy) : 0.0;
  out[y] = static_cast<C>(gy * static_cast<double>(k));
}

template <class L>
inline constexpr bool is_label_v = std::is_same_v<L, std::int32_t> || std::is_same_v<L, std::int64_t>;

struct LogprobBuilder;

}  // namespace detail

/// @brief The result of token_logprobs: per-token log-probs (and entropy), and the backward.
///
/// Holds views of the logits, labels and mask, not copies: they must outlive the result while
/// backward() may be called (backward reads the selected logit rows again). A temporary owning
/// Eigen::Tensor for any of them does not compile (temporary TensorMaps are fine).
/// @tparam S the compute type: double for double logits, float otherwise
template <class S, class Z, class Lab, class M>
class LogprobResult {
 public:
  using Tokens = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  Tokens logp;     ///< [batch, tokens]; 0 at masked-out tokens
  Tokens entropy;  ///< [batch, tokens] with LogprobOptions::entropy, else empty

  /// grad_logits = d(sum g_lp logp) / d logits, [batch, tokens, vocab] of the logits' type.
  template <class G, class O>
  void backward(const G& grad_logp, O&& grad_logits) const {
    run_backward<false>(grad_logp, grad_logp, std::forward<O>(grad_logits));
  }
  /// grad_logits = d(sum g_lp logp + g_h entropy) / d logits; needs LogprobOptions::entropy.
  template <class G, class H, class O>
  void backward(const G& grad_logp, const H& grad_entropy, O&& grad_logits) const {
    if (!entropy_)
      throw option_error(
          "token_logprobs backward: grad_entropy was given but the entropy was not computed; set "
          "LogprobOptions::entropy = true");
    run_backward<true>(grad_logp, grad_entropy, std::forward<O>(grad_logits));
  }

 private:
  friend struct detail::LogprobBuilder;

  LogprobResult(detail::Logits3<Z> z, detail::Matrix<Lab> labels, detail::Matrix<M> mask, S k, bool ent)
      : z_(z), labels_(labels), mask_(mask), k_(k), entropy_(ent) {}

  template <bool Ent, class G, class H, class O>
  void run_backward(const G& grad_logp, const H& grad_entropy, O&& grad_logits) const {
    constexpr const char* fn = "token_logprobs backward";
    (void)grad_entropy;
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, S>,
                  "prefloss: grad_logp must have the log-probs' type (float unless the logits are double)");
    const auto gl = detail::matrix_view(grad_logp, fn, "grad_logp");
    detail::require_same_layout(fn, "grad_logp", gl.layout(), "the log-probs", mask_.layout());
    detail::Matrix<S> gh = gl;
    if constexpr (Ent) {
      static_assert(std::is_same_v<detail::tensor_scalar_t<H>, S>,
                    "prefloss: grad_entropy must have the entropy's type (float unless the logits are double)");
      gh = detail::matrix_view(grad_entropy, fn, "grad_entropy");
      detail::require_same_layout(fn, "grad_entropy", gh.layout(), "the log-probs", mask_.layout());
    }
    using OT = detail::tensor_scalar_t<O>;
    static_assert(std::is_same_v<OT, Z>, "prefloss: grad_logits must have the logits' scalar type");
    static_assert(detail::is_tensor_v<O> && detail::tensor_rank_v<O> == 3 && detail::tensor_writable_v<O>,
                  "prefloss: grad_logits is a writable rank-3 [batch, tokens, vocab] tensor");
    if (grad_logits.dimension(0) != z_.B || grad_logits.dimension(1) != z_.T_ || grad_logits.dimension(2) != z_.V)
      throw shape_error(std::string(fn) + ": argument 'grad_logits' must have shape [" + std::to_string(z_.B) + ", " +
                        std::to_string(z_.T_) + ", " + std::to_string(z_.V) + "], got " +
                        detail::shape_of(grad_logits));
    detail::require_aligned(grad_logits.data(), fn, "grad_logits");
    {
      const auto lo = reinterpret_cast<std::uintptr_t>(grad_logits.data());
      const auto zl = reinterpret_cast<std::uintptr_t>(z_.data);
      const auto bytes = static_cast<std::uintptr_t>(z_.B * z_.T_ * z_.V) * sizeof(Z);
      if (bytes > 0 && lo < zl + bytes && zl < lo + bytes)
        throw layout_error(std::string(fn) +
                           ": output 'grad_logits' overlaps the logits in memory; pass a separate tensor");
    }
    Z* out = grad_logits.data();
    const Index V = z_.V;
    std::vector<S> row, grow;
    if constexpr (!std::is_same_v<Z, S>) {
      row.resize(static_cast<std::size_t>(V));
      grow.resize(static_cast<std::size_t>(V));
    }
    for (Index b = 0; b < z_.B; ++b)
      for (Index t = 0; t < z_.T_; ++t) {
        const Index k = b * z_.T_ + t;
        Z* o = out + k * V;
        if (!detail::selected<S>(mask_.data[k])) {
          std::memset(static_cast<void*>(o), 0, static_cast<std::size_t>(V) * sizeof(Z));
          continue;
        }
        const auto y = static_cast<Index>(labels_.data[k]);
        const double g_lp = static_cast<double>(gl.data[k]);
        const double g_h = Ent ? static_cast<double>(gh.data[k]) : 0.0;
        if constexpr (std::is_same_v<Z, S>) {
          detail::logit_row_grad<Ent, S>(z_.row(b, t), V, y, k_, stats_[static_cast<std::size_t>(k)], g_lp, g_h, o);
        } else {
          detail::to_float(z_.row(b, t), row.data(), V);
          detail::logit_row_grad<Ent, S>(row.data(), V, y, k_, stats_[static_cast<std::size_t>(k)], g_lp, g_h,
                                         grow.data());
          detail::from_float(grow.data(), o, V);
        }
      }
  }

  detail::Logits3<Z> z_;
  detail::Matrix<Lab> labels_;
  detail::Matrix<M> mask_;
  S k_;
  bool entropy_;
  std::vector<detail::LogitRowStats> stats_;
};

namespace detail {

/// Builds a LogprobResult: the forward pass over the selected rows (checked by token_logprobs).
struct LogprobBuilder {
  template <class S, class Z, class Lab, class M>
  static LogprobResult<S, Z, Lab, M> make(const Logits3<Z>& z, const Matrix<Lab>& lab, const Matrix<M>& mk, S k,
                                          bool ent) {
    LogprobResult<S, Z, Lab, M> r(z, lab, mk, k, ent);
    const Index n = z.B * z.T_;
    r.logp = typename LogprobResult<S, Z, Lab, M>::Tokens(z.B, z.T_);
    if (ent) r.entropy = typename LogprobResult<S, Z, Lab, M>::Tokens(z.B, z.T_);
    r.stats_.resize(static_cast<std::size_t>(n));
    std::vector<S> row;
    if constexpr (!std::is_same_v<Z, S>) row.resize(static_cast<std::size_t>(z.V));
    for (Index i = 0; i < n; ++i) {
      LogitRowStats st;
      if (selected<S>(mk.data[i])) {
        const S* zr;
        if constexpr (std::is_same_v<Z, S>) {
          zr = z.data + i * z.V;
        } else {
          to_float(z.data + i * z.V, row.data(), z.V);
          zr = row.data();
        }
        const auto y = static_cast<Index>(lab.data[i]);
        st = ent ? logit_row<true, S>(zr, z.V, y, k) : logit_row<false, S>(zr, z.V, y, k);
      }
      r.stats_[static_cast<std::size_t>(i)] = st;
      r.logp.data()[i] = static_cast<S>(st.logp);
      if (ent) r.entropy.data()[i] = static_cast<S>(st.entropy);
    }
    return r;
  }
};

}  // namespace detail

/// @brief Log-probs of the labels under softmax(logits / temperature), and optionally the
/// entropy, per selected token (formulas, accuracy and special values: the file comment).
///
/// @param logits row-major [batch, tokens, vocab] of float, double, Eigen::bfloat16 or
///   Eigen::half (16-bit logits are computed in float)
/// @param labels row-major [batch, tokens] of int32_t or int64_t; at a selected token in [0, vocab)
/// @param mask row-major [batch, tokens] of bool, uint8_t, float or double: which tokens to
///   compute (a nonzero entry). A float weight is not applied here: the loss that consumes logp
///   applies it, and its backward already wrote w * upstream into grad_logp.
/// @throws shape_error, option_error, value_error (a label out of range, naming [batch, token]
///   and the value; a bad mask weight), layout_error; nothing is computed then.
template <class X, class Y, class K>
auto token_logprobs(const X& logits, const Y& labels, const K& mask, const LogprobOptions& opt = {}) {
  constexpr const char* fn = "token_logprobs";
  using Z = detail::tensor_scalar_t<X>;
  using Lab = detail::tensor_scalar_t<Y>;
  using M = detail::tensor_scalar_t<K>;
  using S = detail::compute_t<Z>;
  static_assert(detail::is_label_v<Lab>, "prefloss: labels must be int32_t or int64_t");
  static_assert(detail::is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  const auto z = detail::logits_view(logits, fn, "logits");
  const auto lab = detail::matrix_view(labels, fn, "labels");
  const auto mk = detail::matrix_view(mask, fn, "mask");
  const auto zshape = "[" + std::to_string(z.B) + ", " + std::to_string(z.T_) + ", " + std::to_string(z.V) + "]";
  if (lab.rows != z.B || lab.cols != z.T_)
    throw shape_error(std::string(fn) + ": argument 'labels' has shape " + detail::shape_str(lab.rows, lab.cols) +
                      " but 'logits' has shape " + zshape);
  detail::require_same_shape(fn, "mask", mk, "labels", lab);
  if (!(opt.temperature > 0) || !std::isfinite(opt.temperature))
    throw option_error(std::string(fn) + ": option 'temperature' must be finite and > 0, got " +
                       detail::fmt(opt.temperature));
  const S k = static_cast<S>(1.0 / opt.temperature);
  if (!(k > 0) || !std::isfinite(k))
    throw option_error(std::string(fn) + ": option 'temperature' = " + detail::fmt(opt.temperature) +
                       " has no finite nonzero reciprocal in the logits' compute type");
  detail::require_weights<S>(mk, fn, "mask");
  const Index n = z.B * z.T_;
  for (Index i = 0; i < n; ++i)
    if (detail::selected<S>(mk.data[i]) && (lab.data[i] < 0 || static_cast<Index>(lab.data[i]) >= z.V))
      throw value_error(std::string(fn) + ": argument 'labels' has " + std::to_string(lab.data[i]) + " at [" +
                        std::to_string(i / z.T_) + ", " + std::to_string(i % z.T_) +
                        "], a selected token; labels must lie in [0, " + std::to_string(z.V) + ")");

  return detail::LogprobBuilder::make<S>(z, lab, mk, k, opt.entropy);
}

// A result over a temporary owning tensor would dangle: backward() reads the logits, labels and
// mask again.
template <class S, int O, class I, class Y, class K>
void token_logprobs(Eigen::Tensor<S, 3, O, I>&& logits, const Y& labels, const K& mask,
                    const LogprobOptions& opt = {}) = delete;
template <class X, class S, int O, class I, class K>
void token_logprobs(const X& logits, Eigen::Tensor<S, 2, O, I>&& labels, const K& mask,
                    const LogprobOptions& opt = {}) = delete;
template <class X, class Y, class S, int O, class I>
void token_logprobs(const X& logits, const Y& labels, Eigen::Tensor<S, 2, O, I>&& mask,
                    const LogprobOptions& opt = {}) = delete;

}  // namespace prefloss
