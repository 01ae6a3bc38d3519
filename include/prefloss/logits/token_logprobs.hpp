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
/// label entry uses -expm1(logp) for 1 - p_y; the others use p_v = exp(u_v - m) * (1 / S), S =
/// S_o + exp(u_y - m) (one exp rounding, then two), not exp(log p_v), whose rounded argument
/// would cost |log p_v| ulps. Float logits are summed in float SIMD lanes widened into double
/// every 8 adds (<= 7 * 2^-24 relative, whatever the vocabulary size); the logs and the per-token
/// statistics are in double. test_logprobs measures, against long double over p_y from 5e-31 to
/// 1 - 1e-7, a worst relative error of logp and of 1 - p_y of 5.0e-8 in float and 2.4e-15 in
/// double, and checks vocabularies up to 262144.
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
#include "../parallel.hpp"

namespace prefloss {

/// Options of token_logprobs.
struct LogprobOptions {
  double temperature = 1.0;  ///< tau > 0 and finite (also 1 / tau in the compute type); logits are divided by it
  bool entropy = false;      ///< also compute the per-token entropy (and allow its backward)
  /// Losses from logits (ppo_clip_from_logits): the entropy bonus, loss -= entropy_coef *
  /// aggregated entropy (verl's entropy_coeff); >= 0 and finite. token_logprobs itself has no
  /// loss to add it to and requires 0 (its backward takes grad_entropy instead).
  double entropy_coef = 0.0;
  /// Threads the call and its backward() may split tokens over; the same bits for any count
  /// (see prefloss::Threads). Default: this thread.
  Threads threads = {};
};

namespace detail {

/// Per-token statistics of one selected row, in double.
struct LogitRowStats {
  double m = 0;      ///< max_v u_v
  double log_s = 0;  ///< log sum_v exp(u_v - m)
  double inv_s = 0;  ///< 1 / sum_v exp(u_v - m)
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

/// Calls f(u, v) for the lanes-wide batches u of n values at p times k (v: the first one's
/// index), and for the tail padded with `pad` (the identity of the caller's reduction).
template <class C, class F>
PREFLOSS_DETAIL_ALWAYS_INLINE inline void for_batches(const C* p, Index n, C k, C pad, F&& f) noexcept {
  using Bt = batch<C>;
  constexpr Index W = static_cast<Index>(lanes<C>);
  const Bt kb(k);
  Index v = 0;
  for (; v + W <= n; v += W) f(load_u<C, arch>(p + v) * kb, v);
  if (v < n) {
    alignas(64) C buf[lanes<C>];
    for (Index j = 0; j < W; ++j) buf[j] = pad;
    std::memcpy(buf, p + v, static_cast<std::size_t>(n - v) * sizeof(C));
    f(Bt::load_aligned(buf) * kb, v);  // pad * k: -inf stays -inf for k > 0
  }
}

/// max_v p[v] * k over n >= 1 values, and whether any is NaN.
template <class C>
PREFLOSS_DETAIL_ALWAYS_INLINE inline C row_max(const C* p, Index n, C k, bool& nan) noexcept {
  using Bt = batch<C>;
  constexpr C ninf = -std::numeric_limits<C>::infinity();
  Bt mx(ninf);
  auto bad = Bt(C(0)) != Bt(C(0));
  for_batches<C>(p, n, k, ninf, [&](const Bt& u, Index) PREFLOSS_DETAIL_ALWAYS_INLINE {
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
/// -inf d_v adding 0), into double. Keep: also stores each exp(d_v) to e[v].
template <bool Ent, bool Keep, class C>
PREFLOSS_DETAIL_ALWAYS_INLINE inline void row_exp_sums(const C* p, Index n, C k, C m, double& s, double& t,
                                                       C* e_out) noexcept {
  using Bt = batch<C>;
  constexpr C ninf = -std::numeric_limits<C>::infinity();
  LaneSum<C> es, ed;
  const Bt mb(m), zero(C(0));
  int since_flush = 0;
  for_batches<C>(p, n, k, ninf, [&](const Bt& u, Index v) PREFLOSS_DETAIL_ALWAYS_INLINE {
    const Bt d = u - mb;
    const Bt e = detail::exp<C, arch>(d);
    if constexpr (Keep) {
      if (v + static_cast<Index>(lanes<C>) <= n) {
        e.store_unaligned(e_out + v);
      } else {
        alignas(64) C buf[lanes<C>];
        e.store_aligned(buf);
        std::memcpy(e_out + v, buf, static_cast<std::size_t>(n - v) * sizeof(C));
      }
    }
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

/// The statistics of one selected row of V compute-type values (see the file comment). One
/// compiled body for every caller (token_logprobs, the losses from logits), so they agree
/// bitwise. Keep: also stores e_v = exp(u_v - m) to e[v] for v != y (e[y] is left as it is).
template <bool Ent, bool Keep, class C>
PREFLOSS_DETAIL_ONE_BODY LogitRowStats logit_row(const C* z, Index V, Index y, C k, C* e) noexcept {
  LogitRowStats r;
  bool nan = false;
  const C m = row_max<C>(z, V, k, nan);
  if (nan || !(m < std::numeric_limits<C>::infinity()) || !(m > -std::numeric_limits<C>::infinity())) {
    const double q = std::numeric_limits<double>::quiet_NaN();
    return {q, q, q, q, q};
  }
  double s_o = 0, t = 0;
  row_exp_sums<Ent, Keep, C>(z, y, k, m, s_o, t, e);
  row_exp_sums<Ent, Keep, C>(z + y + 1, V - y - 1, k, m, s_o, t, Keep ? e + y + 1 : nullptr);
  const C uy = z[y] * k;
  const double dy = static_cast<double>(uy) - static_cast<double>(m);  // exact: both are C values
  const double ey = std::exp(dy);
  if constexpr (Ent) {
    if (ey > 0) t += ey * dy;
  }
  const double s = s_o + ey;
  r.m = static_cast<double>(m);
  r.log_s = std::log(s);
  r.inv_s = 1.0 / s;
  r.logp = uy == m ? -std::log1p(s_o) : dy - r.log_s;
  if constexpr (Ent) r.entropy = r.log_s - t / s;
  return r;
}

/// Prefetches the cache line at p into L2 (prefetcht1 on x86): the next row a fused pass reads,
/// fetched while the current row's gradient streams out, so reads and writes overlap.
inline void prefetch_l2(const void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

/// A masked-out token's gradient row of V zeros (streaming stores for the batch-aligned body
/// when Stream, as the selected rows around it have). next: a row of V values to prefetch into
/// L2 meanwhile (or null): the next selected row, whose read the hardware prefetcher would
/// start only when it begins.
template <bool Stream, class Z>
inline void zero_logit_row(Z* out, Index V, const Z* next = nullptr) noexcept {
  if constexpr (Stream && !is_lowp_v<Z>) {
    using Bt = batch<Z>;
    constexpr Index W = static_cast<Index>(lanes<Z>);
    const Index h = static_cast<Index>(stream_head(out, static_cast<std::size_t>(V)));
    std::memset(static_cast<void*>(out), 0, static_cast<std::size_t>(h) * sizeof(Z));
    Index v = h;
    const Bt zero(Z(0));
    constexpr Index line = 64 / static_cast<Index>(sizeof(Z));
    for (; v + W <= V; v += W) {
      if (next != nullptr && v % line < W) prefetch_l2(next + v);
      store_stream(out + v, zero);
    }
    std::memset(static_cast<void*>(out + v), 0, static_cast<std::size_t>(V - v) * sizeof(Z));
  } else {
    std::memset(static_cast<void*>(out), 0, static_cast<std::size_t>(V) * sizeof(Z));
  }
}

/// d/dz of g_lp * logp + g_h * entropy for one selected row, written to out (compute type C),
/// each element stored once. Stream: the batch-aligned body with streaming stores (the caller
/// fences); the values are the same bits either way. p_v = exp(u_v - m) / S, with exp(u_v - m)
/// from e (the forward's, when e is not null; then z is read only for the entropy term) or
/// recomputed from z: the same bits. next: a row of V values to prefetch into L2 meanwhile (or
/// null).
template <bool Ent, bool Stream, bool Kept, class C>
PREFLOSS_DETAIL_ONE_BODY void logit_row_grad(const C* z, Index V, Index y, C k, const LogitRowStats& st, double g_lp,
                                             double g_h, C* out, const C* e, const C* next) noexcept {
  using Bt = batch<C>;
  constexpr Index W = static_cast<Index>(lanes<C>);
  const Bt mb(static_cast<C>(st.m)), ls(static_cast<C>(st.log_s)), is(static_cast<C>(st.inv_s)), zero(C(0));
  const Bt a(static_cast<C>(-g_lp * static_cast<double>(k)));  // the -p_v term of logp's gradient
  const Bt c(static_cast<C>(-g_h * static_cast<double>(k)));   // entropy: -p_v (log p_v + H)
  const Bt h(static_cast<C>(st.entropy)), kb(k);
  // x: the batch of logits at v (unscaled), ev: its exp(u - m) when kept.
  const auto grad = [&](const C* x, const C* ev) PREFLOSS_DETAIL_ALWAYS_INLINE {
    Bt ex, d;
    if constexpr (Ent || !Kept) d = load_u<C, arch>(x) * kb - mb;
    if constexpr (Kept) {
      ex = load_u<C, arch>(ev);
    } else {
      ex = detail::exp<C, arch>(d);
    }
    const Bt p = ex * is;
    Bt g = a * p;
    if constexpr (Ent) g = g + xsimd::select(p > zero, c * (p * ((d - ls) + h)), zero);
    return g;
  };
  // The label entry in double: 1 - p_y as -expm1(logp), exact as p_y -> 1. It replaces its
  // lane before the store (a second store into a streamed line would stall on it).
  const double py = std::exp(st.logp);
  double gy_d = g_lp * -std::expm1(st.logp);
  if constexpr (Ent) gy_d += py > 0 ? -g_h * py * (st.logp + st.entropy) : 0.0;
  const C gy = static_cast<C>(gy_d * static_cast<double>(k));
  alignas(64) C buf[lanes<C>];
  // n < W values from v, through a zero-padded copy, with ordinary stores.
  const auto part = [&](Index v, Index n) {
    alignas(64) C in[lanes<C>] = {}, ein[lanes<C>] = {};
    std::memcpy(in, z + v, static_cast<std::size_t>(n) * sizeof(C));
    if constexpr (Kept) std::memcpy(ein, e + v, static_cast<std::size_t>(n) * sizeof(C));
    grad(in, ein).store_aligned(buf);
    if (y >= v && y < v + n) buf[y - v] = gy;
    std::memcpy(out + v, buf, static_cast<std::size_t>(n) * sizeof(C));
  };
  Index v = 0;
  if constexpr (Stream) {
    v = static_cast<Index>(stream_head(out, static_cast<std::size_t>(V)));
    if (v > 0) part(0, v);
  }
  constexpr Index line = 64 / static_cast<Index>(sizeof(C));
  for (; v + W <= V; v += W) {
    if (next != nullptr && v % line < W) prefetch_l2(next + v);
    Bt g = grad(z + v, Kept ? e + v : nullptr);
    if (y >= v && y < v + W) {
      g.store_aligned(buf);
      buf[y - v] = gy;
      g = Bt::load_aligned(buf);
    }
    store_to<Stream>(out + v, g);
  }
  if (v < V) part(v, V - v);
}

/// Per-call scratch of the row loops: a 16-bit row in float, its float gradient, and the
/// exp(u - m) row a fused pass keeps from the forward (sized on first use).
template <class C>
struct LogitScratch {
  std::vector<C> row, grow, e;
  explicit LogitScratch(Index V, bool lowp, bool keep) {
    if (lowp) {
      row.resize(static_cast<std::size_t>(V));
      grow.resize(static_cast<std::size_t>(V));
    }
    if (keep) e.resize(static_cast<std::size_t>(V));
  }
};

/// The statistics of a selected token's row of Z values (16-bit: converted into scratch.row
/// first). Keep: exp(u - m) stays in scratch.e for logit_grad_row<..., true>.
template <bool Keep, class Z, class C>
inline LogitRowStats logit_row_of(const Z* z, Index V, Index y, C k, bool ent, LogitScratch<C>& sc) noexcept {
  const C* zr;
  if constexpr (std::is_same_v<Z, C>) {
    zr = z;
  } else {
    to_float(z, sc.row.data(), V);
    zr = sc.row.data();
  }
  C* e = Keep ? sc.e.data() : nullptr;
  return ent ? logit_row<true, Keep, C>(zr, V, y, k, e) : logit_row<false, Keep, C>(zr, V, y, k, e);
}

/// The gradient row of a selected token in the logits' storage type Z (16-bit: computed in
/// float through the scratch rows, rounded once to nearest even). Kept: the token's row was the
/// last one logit_row_of<true> read with this scratch (its exp(u - m) and, for 16-bit logits,
/// its float values are reused).
template <bool Ent, bool Stream, bool Kept, class Z, class C>
inline void logit_grad_row(const Z* z, Index V, Index y, C k, const LogitRowStats& st, double g_lp, double g_h, Z* out,
                           LogitScratch<C>& sc, const Z* next) noexcept {
  const C* e = Kept ? sc.e.data() : nullptr;
  if constexpr (std::is_same_v<Z, C>) {
    logit_row_grad<Ent, Stream, Kept, C>(z, V, y, k, st, g_lp, g_h, out, e, next);
  } else {
    if constexpr (!Kept) to_float(z, sc.row.data(), V);
    logit_row_grad<Ent, false, Kept, C>(sc.row.data(), V, y, k, st, g_lp, g_h, sc.grow.data(), e, nullptr);
    from_float(sc.grow.data(), out, V);
  }
}

/// Throws layout_error when an output's bytes [out, out + out_bytes) meet an input's.
inline void require_apart(const char* fn, const char* out_name, const void* out, std::size_t out_bytes,
                          const char* in_name, const void* in, std::size_t in_bytes) {
  const auto lo = reinterpret_cast<std::uintptr_t>(out), a = reinterpret_cast<std::uintptr_t>(in);
  if (out_bytes > 0 && in_bytes > 0 && lo < a + in_bytes && a < lo + out_bytes)
    throw layout_error(std::string(fn) + ": output '" + out_name + "' overlaps '" + in_name +
                       "' in memory; pass a separate tensor");
}

template <class L>
inline constexpr bool is_label_v = std::is_same_v<L, std::int32_t> || std::is_same_v<L, std::int64_t>;

/// The checked views of a call from logits, and k = 1 / temperature in the compute type S.
template <class S, class Z, class Lab, class M>
struct LogitsArgs {
  Logits3<Z> z;
  Matrix<Lab> labels;
  Matrix<M> mask;
  S k;
  bool entropy;

  std::size_t logit_bytes() const noexcept { return static_cast<std::size_t>(z.B * z.T_ * z.V) * sizeof(Z); }
  /// Throws layout_error when [p, p + bytes) meets the logits, labels or mask.
  void require_not_input(const char* fn, const char* name, const void* p, std::size_t bytes) const {
    require_apart(fn, name, p, bytes, "logits", z.data, logit_bytes());
    require_apart(fn, name, p, bytes, "labels", labels.data, static_cast<std::size_t>(labels.count()) * sizeof(Lab));
    require_apart(fn, name, p, bytes, "mask", mask.data, static_cast<std::size_t>(mask.count()) * sizeof(M));
  }
};

/// Checks logits, labels, mask and options of a call from logits (fn names it in errors).
/// loss: whether the call has a loss for LogprobOptions::entropy_coef.
template <class X, class Y, class K>
auto logits_args(const X& logits, const Y& labels, const K& mask, const LogprobOptions& opt, const char* fn,
                 bool loss) {
  using Z = tensor_scalar_t<X>;
  using Lab = tensor_scalar_t<Y>;
  using M = tensor_scalar_t<K>;
  using S = compute_t<Z>;
  static_assert(is_label_v<Lab>, "prefloss: labels must be int32_t or int64_t");
  static_assert(is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  const auto z = logits_view(logits, fn, "logits");
  const auto lab = matrix_view(labels, fn, "labels");
  const auto mk = matrix_view(mask, fn, "mask");
  const auto zshape = "[" + std::to_string(z.B) + ", " + std::to_string(z.T_) + ", " + std::to_string(z.V) + "]";
  if (lab.rows != z.B || lab.cols != z.T_)
    throw shape_error(std::string(fn) + ": argument 'labels' has shape " + shape_str(lab.rows, lab.cols) +
                      " but 'logits' has shape " + zshape);
  require_same_shape(fn, "mask", mk, "labels", lab);
  if (!(opt.temperature > 0) || !std::isfinite(opt.temperature))
    throw option_error(std::string(fn) + ": option 'temperature' must be finite and > 0, got " + fmt(opt.temperature));
  const S k = static_cast<S>(1.0 / opt.temperature);
  if (!(k > 0) || !std::isfinite(k))
    throw option_error(std::string(fn) + ": option 'temperature' = " + fmt(opt.temperature) +
                       " has no finite nonzero reciprocal in the logits' compute type");
  if (!loss && opt.entropy_coef != 0)
    throw option_error(std::string(fn) + ": option 'entropy_coef' is " + fmt(opt.entropy_coef) +
                       " but this call has no loss to add the entropy bonus to (it must be 0; pass grad_entropy "
                       "to backward, or use ppo_clip_from_logits)");
  if (loss)
    require_option(opt.entropy_coef >= 0 && std::isfinite(opt.entropy_coef), fn, "entropy_coef", ">= 0 and finite",
                   opt.entropy_coef);
  require_weights<S>(mk, fn, "mask");
  const Index n = z.B * z.T_;
  for (Index i = 0; i < n; ++i)
    if (selected<S>(mk.data[i]) && (lab.data[i] < 0 || static_cast<Index>(lab.data[i]) >= z.V))
      throw value_error(std::string(fn) + ": argument 'labels' has " + std::to_string(lab.data[i]) + " at [" +
                        std::to_string(i / z.T_) + ", " + std::to_string(i % z.T_) +
                        "], a selected token; labels must lie in [0, " + std::to_string(z.V) + ")");
  return LogitsArgs<S, Z, Lab, M>{z, lab, mk, k, opt.entropy || (loss && opt.entropy_coef != 0)};
}

/// Checks a [batch, tokens, vocab] gradient output against the logits: shape, alignment, and no
/// overlap with what the call reads.
template <class Z, class O, class A>
Z* logits_grad_out(O& grad_logits, const A& args, const char* fn) {
  using OT = tensor_scalar_t<O>;
  static_assert(std::is_same_v<OT, Z>, "prefloss: grad_logits must have the logits' scalar type");
  static_assert(is_tensor_v<O> && tensor_rank_v<O> == 3 && tensor_writable_v<O>,
                "prefloss: grad_logits is a writable rank-3 [batch, tokens, vocab] tensor");
  static_assert(static_cast<int>(remove_cvref_t<O>::Layout) == static_cast<int>(Eigen::RowMajor),
                "prefloss: grad_logits must be row-major (Eigen::RowMajor)");
  const auto& z = args.z;
  if (grad_logits.dimension(0) != z.B || grad_logits.dimension(1) != z.T_ || grad_logits.dimension(2) != z.V)
    throw shape_error(std::string(fn) + ": argument 'grad_logits' must have shape [" + std::to_string(z.B) + ", " +
                      std::to_string(z.T_) + ", " + std::to_string(z.V) + "], got " + shape_of(grad_logits));
  require_aligned(grad_logits.data(), fn, "grad_logits");
  args.require_not_input(fn, "grad_logits", grad_logits.data(), args.logit_bytes());
  return grad_logits.data();
}

/// Calls rows(std::bool_constant<Stream>) with streaming stores for an output of `count` Z
/// values past the threshold (then fenced), ordinary stores below it. 16-bit outputs go through
/// float scratch rows and never stream.
template <class Z, class F>
void with_logit_stores(std::size_t count, F&& rows) {
  if (!is_lowp_v<Z> && use_stream_store<Z>(count)) {
    rows(std::true_type{});
    stream_fence();
  } else {
    rows(std::false_type{});
  }
}

struct LogprobBuilder;

/// Tokens a block of a call from logits takes: about 2^18 logits (1 MiB of float), so a block's
/// scheduling is noise next to its rows and its scratch row is allocated once a block.
inline Index logit_grain(Index tokens, Index vocab) noexcept {
  return row_grain(tokens, tokens * vocab, Index{1} << 18);
}

}  // namespace detail

/// @brief The result of token_logprobs: per-token log-probs (and entropy), and the backward.
///
/// Holds views of the logits, labels and mask, not copies: they must outlive the result while
/// backward() may be called (backward reads the selected logit rows again). A temporary owning
/// Eigen::Tensor for any of them does not compile (temporary TensorMaps are fine). Also holds the
/// per-token statistics backward needs: 40 bytes a token, nothing proportional to the vocabulary.
/// @tparam S the compute type: double for double logits, float otherwise
template <class S, class Z, class Lab, class M>
class LogprobResult {
 public:
  using Tokens = Eigen::Tensor<S, 2, Eigen::RowMajor>;
  Tokens logp;  ///< [batch, tokens]; 0 at masked-out tokens (empty when written to a caller's buffer)
  Tokens
      entropy;  ///< [batch, tokens] with LogprobOptions::entropy (empty without, or when written to a caller's buffer)

  /// @brief grad_logits = d(sum g_lp logp) / d logits, [batch, tokens, vocab] row-major of the
  /// logits' type, every element written once: (onehot(y) - p) g_lp / tau at selected tokens, a
  /// zero row at masked-out ones (whose logits are not read). Past PREFLOSS_STREAMING_STORE_BYTES
  /// float/double rows go through streaming stores. grad_logp: [batch, tokens] of the log-probs'
  /// type (its masked-out entries are not read).
  /// @throws shape_error, layout_error (misaligned; overlapping the logits, labels or mask);
  ///   nothing is written then.
  template <class G, class O>
  void backward(const G& grad_logp, O&& grad_logits) const {
    run_backward<false>(grad_logp, grad_logp, grad_logits);
  }
  /// @brief grad_logits = d(sum g_lp logp + g_h entropy) / d logits: adds -p_v (log p_v + H)
  /// g_h / tau. Needs LogprobOptions::entropy (option_error otherwise).
  template <class G, class H, class O>
  void backward(const G& grad_logp, const H& grad_entropy, O&& grad_logits) const {
    if (!args_.entropy)
      throw option_error(
          "token_logprobs backward: grad_entropy was given but the entropy was not computed; set "
          "LogprobOptions::entropy = true");
    run_backward<true>(grad_logp, grad_entropy, grad_logits);
  }

 private:
  friend struct detail::LogprobBuilder;
  using Args = detail::LogitsArgs<S, Z, Lab, M>;

  explicit LogprobResult(const Args& a) : args_(a) {}

  template <bool Ent, class G, class H, class O>
  void run_backward(const G& grad_logp, const H& grad_entropy, O& grad_logits) const {
    constexpr const char* fn = "token_logprobs backward";
    (void)grad_entropy;
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, S>,
                  "prefloss: grad_logp must have the log-probs' type (float unless the logits are double)");
    const auto gl = detail::matrix_view(grad_logp, fn, "grad_logp");
    detail::require_same_layout(fn, "grad_logp", gl.layout(), "the log-probs", args_.mask.layout());
    detail::Matrix<S> gh = gl;
    if constexpr (Ent) {
      static_assert(std::is_same_v<detail::tensor_scalar_t<H>, S>,
                    "prefloss: grad_entropy must have the entropy's type (float unless the logits are double)");
      gh = detail::matrix_view(grad_entropy, fn, "grad_entropy");
      detail::require_same_layout(fn, "grad_entropy", gh.layout(), "the log-probs", args_.mask.layout());
    }
    Z* out = detail::logits_grad_out<Z>(grad_logits, args_, fn);
    const auto bytes = static_cast<std::size_t>(gl.count()) * sizeof(S);
    detail::require_apart(fn, "grad_logits", out, args_.logit_bytes(), "grad_logp", gl.data, bytes);
    if constexpr (Ent)
      detail::require_apart(fn, "grad_logits", out, args_.logit_bytes(), "grad_entropy", gh.data, bytes);
    const auto& z = args_.z;
    const Index V = z.V;
    const Index n = z.B * z.T_;
    threads_.for_rows(n, detail::logit_grain(n, V), [&](Index b, Index e) {
      detail::LogitScratch<S> sc(V, detail::is_lowp_v<Z>, false);
      detail::with_logit_stores<Z>(args_.logit_bytes() / sizeof(Z), [&](auto stream) {
        Index next = b;  // the next selected token after a masked-out one: prefetched meanwhile
        for (Index k = b; k < e; ++k) {
          Z* o = out + k * V;
          if (!detail::selected<S>(args_.mask.data[k])) {
            if (next <= k) {
              next = k + 1;
              while (next < n && !detail::selected<S>(args_.mask.data[next])) ++next;
            }
            detail::zero_logit_row<decltype(stream)::value>(o, V, next < n ? z.data + next * V : nullptr);
            continue;
          }
          detail::logit_grad_row<Ent, decltype(stream)::value, false>(
              z.data + k * V, V, static_cast<Index>(args_.labels.data[k]), args_.k, stats_[static_cast<std::size_t>(k)],
              static_cast<double>(gl.data[k]), Ent ? static_cast<double>(gh.data[k]) : 0.0, o, sc,
              static_cast<const Z*>(nullptr));
        }
      });
    });
  }

  Args args_;
  std::vector<detail::LogitRowStats> stats_;
  Threads threads_;
};

namespace detail {

/// Builds a LogprobResult: the forward pass over the selected rows (checked by token_logprobs),
/// writing logp (and entropy) to lp_out (ent_out), or to the result's own tensors when null.
struct LogprobBuilder {
  template <class S, class Z, class Lab, class M>
  static LogprobResult<S, Z, Lab, M> make(const LogitsArgs<S, Z, Lab, M>& a, S* lp_out, S* ent_out,
                                          const Threads& threads) {
    LogprobResult<S, Z, Lab, M> r(a);
    const auto& z = a.z;
    const Index n = z.B * z.T_;
    if (lp_out == nullptr) {
      r.logp = typename LogprobResult<S, Z, Lab, M>::Tokens(z.B, z.T_);
      lp_out = r.logp.data();
    }
    if (a.entropy && ent_out == nullptr) {
      r.entropy = typename LogprobResult<S, Z, Lab, M>::Tokens(z.B, z.T_);
      ent_out = r.entropy.data();
    }
    r.stats_.resize(static_cast<std::size_t>(n));
    r.threads_ = threads;
    threads.for_rows(n, logit_grain(n, z.V), [&](Index b, Index e) {
      LogitScratch<S> sc(z.V, is_lowp_v<Z>, false);
      for (Index i = b; i < e; ++i) {
        LogitRowStats st;
        if (selected<S>(a.mask.data[i]))
          st = logit_row_of<false>(z.data + i * z.V, z.V, static_cast<Index>(a.labels.data[i]), a.k, a.entropy, sc);
        r.stats_[static_cast<std::size_t>(i)] = st;
        lp_out[i] = static_cast<S>(st.logp);
        if (a.entropy) ent_out[i] = static_cast<S>(st.entropy);
      }
    });
    return r;
  }
};

/// A [batch, tokens] output of the compute type S for a call from logits, checked.
template <class S, class P, class A>
S* logits_token_out(P& out, const A& args, const char* fn, const char* name) {
  static_assert(std::is_same_v<tensor_scalar_t<P>, S>,
                "prefloss: logp/entropy outputs have the log-probs' type (float unless the logits are double)");
  const MatrixOut<S> o = matrix_out(out, args.z.B, args.z.T_, fn, name);
  args.require_not_input(fn, name, o.data, static_cast<std::size_t>(o.count()) * sizeof(S));
  return o.data;
}

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
/// @throws shape_error, option_error (temperature <= 0 or not finite, entropy_coef != 0),
///   value_error (a label out of range, naming [batch, token] and the value; a bad mask
///   weight), layout_error; nothing is computed then.
template <class X, class Y, class K>
auto token_logprobs(const X& logits, const Y& labels, const K& mask, const LogprobOptions& opt = {}) {
  const auto a = detail::logits_args(logits, labels, mask, opt, "token_logprobs", false);
  using S = detail::compute_t<detail::tensor_scalar_t<X>>;
  return detail::LogprobBuilder::make<S>(a, nullptr, nullptr, opt.threads);
}

/// @brief token_logprobs writing logp into the caller's [batch, tokens] tensor or map
/// (`logp_out`, of the log-probs' type, fully overwritten: 0 at masked-out tokens); the result's
/// .logp stays empty (and .entropy too if LogprobOptions::entropy, which then needs the form
/// with entropy_out). Nothing [tokens, vocab]-sized is allocated in any form.
/// @throws as token_logprobs; shape_error/layout_error for an output of the wrong shape,
///   misaligned, or overlapping an input or the other output; option_error for
///   LogprobOptions::entropy without entropy_out. Nothing is written then.
template <class X, class Y, class K, class P, std::enable_if_t<detail::is_tensor_v<P>, int> = 0>
auto token_logprobs(const X& logits, const Y& labels, const K& mask, const LogprobOptions& opt, P&& logp_out) {
  constexpr const char* fn = "token_logprobs";
  const auto a = detail::logits_args(logits, labels, mask, opt, fn, false);
  using S = detail::compute_t<detail::tensor_scalar_t<X>>;
  if (opt.entropy)
    throw option_error(std::string(fn) +
                       ": option 'entropy' is true but no 'entropy_out' was given (pass both outputs, or neither)");
  S* lp = detail::logits_token_out<S>(logp_out, a, fn, "logp_out");
  return detail::LogprobBuilder::make<S>(a, lp, nullptr, opt.threads);
}

/// @brief token_logprobs writing logp and the entropy into the caller's [batch, tokens] tensors
/// (see the form above). Needs LogprobOptions::entropy (option_error otherwise).
template <class X, class Y, class K, class P, class E,
          std::enable_if_t<detail::is_tensor_v<P> && detail::is_tensor_v<E>, int> = 0>
auto token_logprobs(const X& logits, const Y& labels, const K& mask, const LogprobOptions& opt, P&& logp_out,
                    E&& entropy_out) {
  constexpr const char* fn = "token_logprobs";
  const auto a = detail::logits_args(logits, labels, mask, opt, fn, false);
  using S = detail::compute_t<detail::tensor_scalar_t<X>>;
  if (!opt.entropy)
    throw option_error(std::string(fn) +
                       ": 'entropy_out' was given but option 'entropy' is false; set LogprobOptions::entropy = true");
  S* lp = detail::logits_token_out<S>(logp_out, a, fn, "logp_out");
  S* en = detail::logits_token_out<S>(entropy_out, a, fn, "entropy_out");
  detail::require_disjoint(fn, "logp_out", logp_out, "entropy_out", entropy_out);
  return detail::LogprobBuilder::make<S>(a, lp, en, opt.threads);
}

// A result over a temporary owning tensor would dangle: backward() reads the logits, labels and
// mask again.
template <class S, int O, class I, class Y, class K, class... Out>
void token_logprobs(Eigen::Tensor<S, 3, O, I>&& logits, const Y& labels, const K& mask, const LogprobOptions& opt,
                    Out&&... out) = delete;
template <class X, class S, int O, class I, class K, class... Out>
void token_logprobs(const X& logits, Eigen::Tensor<S, 2, O, I>&& labels, const K& mask, const LogprobOptions& opt,
                    Out&&... out) = delete;
template <class X, class Y, class S, int O, class I, class... Out>
void token_logprobs(const X& logits, const Y& labels, Eigen::Tensor<S, 2, O, I>&& mask, const LogprobOptions& opt,
                    Out&&... out) = delete;
template <class S, int O, class I, class Y, class K>
void token_logprobs(Eigen::Tensor<S, 3, O, I>&& logits, const Y& labels, const K& mask) = delete;
template <class X, class S, int O, class I, class K>
void token_logprobs(const X& logits, Eigen::Tensor<S, 2, O, I>&& labels, const K& mask) = delete;
template <class X, class Y, class S, int O, class I>
void token_logprobs(const X& logits, const Y& labels, Eigen::Tensor<S, 2, O, I>&& mask) = delete;

}  // namespace prefloss
