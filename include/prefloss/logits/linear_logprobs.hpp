/// @file logits/linear_logprobs.hpp
/// Token log-probs and entropy through the LM head, fused: the [N, V] logits never exist.
///
/// For hidden states h [N, H], the head's weight W [V, H], temperature tau and a selected
/// token n with label y_n:
///
///     z_n     = W h_n                          (the logits, [V]; u_n = z_n / tau, as z * (1 / tau))
///     logp_n  = log softmax(u_n)_{y_n}
///     entropy = logsumexp(u_n) - sum_v p_v u_v,  p = softmax(u_n)
///     dZ_nv   = g_lp (1[v == y_n] - p_v) / tau  -  g_h p_v (log p_v + entropy_n) / tau
///     d/dh    = dZ W      [N, H]          d/dW = dZ^T h      [V, H]
///
/// Tiling. Only the selected tokens (mask != 0) take part; their hidden rows are read in tiles of
/// linear_tile_tokens rows (straight from `hidden` when the tile's tokens are consecutive,
/// gathered into a tile buffer otherwise), so a masked-out row is never read and costs nothing.
/// The vocabulary is cut into tiles of linear_tile_vocab rows of W. The vocabulary tile is the
/// outer loop (its rows of W, and in the backward its rows of d/dW, stay in cache across the
/// token tiles); for each (token tile, vocabulary tile) the logits tile comes from one Eigen
/// matrix product. The forward keeps a running (online) reduction per token; the backward
/// recomputes each logits tile, turns it into dZ in place and adds dZ W_tile and dZ^T h_tile
/// with two more products: 4 products of N V H multiply-adds in all (forward 1, backward 3).
///
/// Accuracy: token_logprobs' scheme (see logits/token_logprobs.hpp) with the maximum found
/// online. Per token the forward keeps m = the running max of u, S_o = sum over v != y of
/// exp(u_v - m) and (with entropy) T = sum over v != y of exp(d_v) d_v, d_v = u_v - m, in double,
/// both rescaled by exp(m_old - m_new) (T also shifted by (m_old - m_new) S_o) when m grows, and
/// the label's u_y. A vocabulary tile's exps and sums are token_logprobs' own row kernels over
/// the tile (float lanes widened into double every 8 adds). At the end logp = -log1p(S_o) when
/// the label holds the maximum, else (u_y - m) - log(S_o + exp(u_y - m)); the gradient's label
/// entry uses -expm1(logp). The logits themselves are Eigen products in the inputs' type (float
/// or double), with its rounding of an H-term dot product.
///
/// Special values, per selected token, as token_logprobs on the product's logits: a -inf logit
/// has probability 0; a label at a -inf logit gives logp = -inf; a NaN or +inf logit, or no
/// finite logit, gives NaN logp, entropy and dZ row (and so NaN in d/dh's row and in all of
/// d/dW, as the products spread it). Gradients go through IEEE products: an infinite entry of
/// W times a zero of dZ is NaN in d/dh, as in any autograd. Masked-out tokens get logp = 0,
/// entropy = 0 and a zero row of d/dh, add nothing to d/dW, and their hidden rows and labels
/// are never read (they may hold NaN or garbage).
///
/// Memory. Besides the outputs, the forward holds O(N) per-token state (the selected tokens'
/// indices, 8 bytes each, and their statistics, 32 bytes each, kept for the backward; 40 bytes
/// each of running state during the forward) and tile buffers: the logits tile (tokens x vocab
/// tile, 512 KiB in float), a gathered hidden tile (tokens tile x H, only for non-consecutive
/// tokens) and in the backward a d/dh tile of the same size (likewise), plus Eigen's packing
/// buffers for products of at most tile size. Nothing of size N x V is ever allocated.
///
/// Build note. The products are Eigen's: in a translation unit that includes Eigen before
/// prefloss, GCC 12 with AVX-512 reports -Wmaybe-uninitialized inside Eigen's product kernels
/// (its intrinsic headers' `__m512 __Y = __Y;`, as for any Eigen matrix product there; see
/// detail/eigen.hpp). Include prefloss first (or disable that warning) under -Werror.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checks.hpp"
#include "../detail/eigen.hpp"
#include "../detail/exp_log.hpp"
#include "../detail/masked_kernels.hpp"
#include "../detail/row_loop.hpp"
#include "../detail/simd.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "token_logprobs.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss {

namespace detail {

/// Token rows per tile (the rows of one product's left operand). With linear_tile_vocab below:
/// a float logits tile is 256 x 512 x 4 = 512 KiB, an L2's worth, read back by the reduction
/// right after the product writes it; the tile's W rows (512 x H) are what the product streams
/// across the token tiles.
inline constexpr Index linear_tile_tokens = 256;
/// Vocabulary rows per tile (see linear_tile_tokens).
inline constexpr Index linear_tile_vocab = 512;

/// The tile sizes of one linear_logprobs call (tests pass small ones to cover many tiles).
struct LinearTiles {
  Index tokens = linear_tile_tokens;
  Index vocab = linear_tile_vocab;
};

template <class S>
using RowMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// [rows, cols] row-major read view of a rank-2 tensor.
template <class T>
struct Rows2 {
  const T* data;
  Index rows, cols;
};

template <class X>
Rows2<tensor_scalar_t<X>> rows_view(const X& x, const char* fn, const char* name) {
  static_assert(is_tensor_v<X> && tensor_rank_v<X> == 2,
                "prefloss: hidden and weight are rank-2 row-major [rows, hidden] Eigen::Tensor or TensorMap");
  static_assert(static_cast<int>(remove_cvref_t<X>::Layout) == static_cast<int>(Eigen::RowMajor),
                "prefloss: hidden and weight must be row-major (Eigen::RowMajor)");
  require_aligned(x.data(), fn, name);
  return {x.data(), static_cast<Index>(x.dimension(0)), static_cast<Index>(x.dimension(1))};
}

template <class X>
Vector<tensor_scalar_t<X>> token_vector(const X& x, const char* fn, const char* name) {
  static_assert(is_tensor_v<X> && tensor_rank_v<X> == 1,
                "prefloss: linear_logprobs' labels, mask, grad_logp and grad_entropy are rank-1 [tokens] tensors");
  require_aligned(x.data(), fn, name);
  return {x.data(), static_cast<Index>(x.dimension(0))};
}

/// The running reduction of one selected token over the vocabulary tiles seen so far.
struct OnlineRow {
  double m = -std::numeric_limits<double>::infinity();  ///< max u so far (a compute-type value)
  double s_o = 0;                                       ///< sum_{v != y} exp(u_v - m)
  double t = 0;                                         ///< sum_{v != y} exp(d_v) d_v, d_v = u_v - m
  double uy = 0;                                        ///< the label's u (set by its tile)
  bool bad = false;                                     ///< a NaN or +inf logit was seen
};

/// Folds one tile z[0, n) of raw logits of a token into r; yl is the label's place in the tile
/// (outside [0, n) when the label lies in another tile).
template <bool Ent, class C>
inline void online_tile(const C* z, Index n, Index yl, C k, OnlineRow& r) noexcept {
  constexpr C inf = std::numeric_limits<C>::infinity();
  if (r.bad) return;
  const bool has_y = yl >= 0 && yl < n;
  if (has_y) r.uy = static_cast<double>(z[yl] * k);
  bool nan = false;
  const C mt = row_max<C>(z, n, k, nan);
  if (nan || !(mt < inf)) {
    r.bad = true;
    return;
  }
  if (!(mt > -inf)) return;  // every logit of the tile is -inf: nothing to add
  if (static_cast<double>(mt) > r.m) {
    if (r.m > -std::numeric_limits<double>::infinity()) {
      const double delta = r.m - static_cast<double>(mt);  // < 0; exact for float values
      const double f = std::exp(delta);
      if constexpr (Ent) r.t = f * (r.t + delta * r.s_o);
      r.s_o *= f;
    }
    r.m = static_cast<double>(mt);
  }
  const C m = static_cast<C>(r.m);
  if (has_y) {
    row_exp_sums<Ent, false, C>(z, yl, k, m, r.s_o, r.t, nullptr);
    row_exp_sums<Ent, false, C>(z + yl + 1, n - yl - 1, k, m, r.s_o, r.t, nullptr);
  } else {
    row_exp_sums<Ent, false, C>(z, n, k, m, r.s_o, r.t, nullptr);
  }
}

/// The statistics of a token from its running reduction (logit_row's closing formulas).
template <bool Ent>
inline LogitRowStats finish_row(const OnlineRow& r) noexcept {
  if (r.bad || !(r.m > -std::numeric_limits<double>::infinity())) {
    const double q = std::numeric_limits<double>::quiet_NaN();
    return {q, q, q, q, q};
  }
  LogitRowStats st;
  const double dy = r.uy - r.m;
  const double ey = std::exp(dy);
  double t = r.t;
  if constexpr (Ent) {
    if (ey > 0) t += ey * dy;
  }
  const double s = r.s_o + ey;
  st.m = r.m;
  st.log_s = std::log(s);
  st.inv_s = 1.0 / s;
  st.logp = r.uy == r.m ? -std::log1p(r.s_o) : dy - st.log_s;
  if constexpr (Ent) st.entropy = st.log_s - t / s;
  return st;
}

/// dZ over one tile z[0, n) of a token's raw logits, in place: d/dz of g_lp logp + g_h entropy
/// (logit_row_grad over a part of the row; yl outside [0, n) when the label is elsewhere).
template <bool Ent, class C>
inline void tile_grad(C* z, Index n, Index yl, C k, const LogitRowStats& st, double g_lp, double g_h) noexcept {
  using Bt = batch<C>;
  constexpr Index W = static_cast<Index>(lanes<C>);
  const Bt mb(static_cast<C>(st.m)), ls(static_cast<C>(st.log_s)), is(static_cast<C>(st.inv_s)), zero(C(0));
  const Bt a(static_cast<C>(-g_lp * static_cast<double>(k)));
  const Bt c(static_cast<C>(-g_h * static_cast<double>(k)));
  const Bt h(static_cast<C>(st.entropy)), kb(k);
  // p_v = exp(u_v - m) / S, as logit_row_grad forms it.
  const auto grad = [&](const Bt& u) {
    const Bt d = u - mb;
    const Bt p = detail::exp<C, arch>(d) * is;
    Bt g = a * p;
    if constexpr (Ent) g = g + xsimd::select(p > zero, c * (p * ((d - ls) + h)), zero);
    return g;
  };
  Index v = 0;
  for (; v + W <= n; v += W) grad(load_u<C, arch>(z + v) * kb).store_unaligned(z + v);
  if (v < n) {
    alignas(64) C buf[lanes<C>] = {};
    std::memcpy(buf, z + v, static_cast<std::size_t>(n - v) * sizeof(C));
    grad(Bt::load_aligned(buf) * kb).store_aligned(buf);
    std::memcpy(z + v, buf, static_cast<std::size_t>(n - v) * sizeof(C));
  }
  if (yl >= 0 && yl < n) {
    const double py = std::exp(st.logp);
    double gy = g_lp * -std::expm1(st.logp);
    if constexpr (Ent) gy += py > 0 ? -g_h * py * (st.logp + st.entropy) : 0.0;
    z[yl] = static_cast<C>(gy * static_cast<double>(k));
  }
}

/// A tile buffer aligned to Eigen's largest packet: Eigen's small products peel to an aligned
/// address, so their summation order (and the last bit) would otherwise follow the heap.
template <class S>
using TileBuffer = std::vector<S, Eigen::aligned_allocator<S>>;

/// Whether the selected tokens sel[0, nt) (ascending) are consecutive.
inline bool consecutive(const Index* sel, Index nt) noexcept { return sel[nt - 1] - sel[0] == nt - 1; }

/// The hidden rows of selected tokens sel[0, nt): a pointer into hidden when they are
/// consecutive, else gathered into buf.
template <class S>
inline const S* tile_rows(const S* hidden, Index H, const Index* sel, Index nt, TileBuffer<S>& buf) {
  if (consecutive(sel, nt)) return hidden + sel[0] * H;
  buf.resize(static_cast<std::size_t>(nt * H));
  for (Index i = 0; i < nt; ++i)
    std::memcpy(buf.data() + i * H, hidden + sel[i] * H, static_cast<std::size_t>(H) * sizeof(S));
  return buf.data();
}

struct LinearBuilder;

}  // namespace detail

/// @brief The result of linear_logprobs: per-token log-probs (and entropy), and the backward.
///
/// Holds views of hidden, weight, labels and mask, not copies: they must outlive the result
/// while backward() may be called (it recomputes the logits from hidden and weight). A
/// temporary owning Eigen::Tensor for any of them does not compile (temporary TensorMaps are
/// fine).
/// @tparam S float or double, the type of hidden and weight
template <class S, class Lab, class M>
class LinearLogprobResult {
 public:
  using Tokens = Eigen::Tensor<S, 1>;
  Tokens logp;     ///< [N]; 0 at masked-out tokens
  Tokens entropy;  ///< [N] with LogprobOptions::entropy, else empty

  /// @brief grad_hidden = d(sum g_lp logp) / d hidden [N, H] and grad_weight = d(...) / d weight
  /// [V, H], both row-major of the inputs' type and fully overwritten (not accumulated into).
  /// @param grad_logp [N] of S; ignored at masked-out tokens
  /// @throws shape_error, layout_error (misaligned, or an output overlapping an input or the
  ///   other output); nothing is written then
  template <class G, class GH, class GW>
  void backward(const G& grad_logp, GH&& grad_hidden, GW&& grad_weight) const {
    run_backward<false>(grad_logp, grad_logp, std::forward<GH>(grad_hidden), std::forward<GW>(grad_weight));
  }
  /// @brief As above for sum g_lp logp + g_h entropy; needs LogprobOptions::entropy (else
  /// option_error).
  template <class G, class E, class GH, class GW>
  void backward(const G& grad_logp, const E& grad_entropy, GH&& grad_hidden, GW&& grad_weight) const {
    if (!entropy_)
      throw option_error(
          "linear_logprobs backward: grad_entropy was given but the entropy was not computed; set "
          "LogprobOptions::entropy = true");
    run_backward<true>(grad_logp, grad_entropy, std::forward<GH>(grad_hidden), std::forward<GW>(grad_weight));
  }

 private:
  friend struct detail::LinearBuilder;

  LinearLogprobResult(detail::Rows2<S> h, detail::Rows2<S> w, detail::Vector<Lab> lab, detail::Vector<M> mk, S k,
                      bool ent, detail::LinearTiles tiles)
      : h_(h), w_(w), labels_(lab), mask_(mk), k_(k), entropy_(ent), tiles_(tiles) {}

  template <class O>
  static S* out_rows(O&& o, Index rows, Index cols, const char* fn, const char* name) {
    static_assert(detail::is_tensor_v<O> && detail::tensor_rank_v<O> == 2 && detail::tensor_writable_v<O>,
                  "prefloss: grad_hidden and grad_weight are writable rank-2 row-major tensors");
    static_assert(static_cast<int>(detail::remove_cvref_t<O>::Layout) == static_cast<int>(Eigen::RowMajor),
                  "prefloss: grad_hidden and grad_weight must be row-major (Eigen::RowMajor)");
    static_assert(std::is_same_v<detail::tensor_scalar_t<O>, S>,
                  "prefloss: grad_hidden and grad_weight must have the type of hidden and weight");
    if (static_cast<Index>(o.dimension(0)) != rows || static_cast<Index>(o.dimension(1)) != cols)
      throw shape_error(std::string(fn) + ": argument '" + name + "' must have shape " + detail::shape_str(rows, cols) +
                        ", got " + detail::shape_of(o));
    detail::require_aligned(o.data(), fn, name);
    return o.data();
  }

  template <bool Ent, class G, class E, class GH, class GW>
  void run_backward(const G& grad_logp, const E& grad_entropy, GH&& grad_hidden, GW&& grad_weight) const {
    constexpr const char* fn = "linear_logprobs backward";
    (void)grad_entropy;
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, S>,
                  "prefloss: grad_logp must have the type of hidden and weight");
    const Index N = h_.rows, H = h_.cols, V = w_.rows;
    const auto gl = detail::token_vector(grad_logp, fn, "grad_logp");
    if (gl.size != N)
      throw shape_error(std::string(fn) + ": argument 'grad_logp' must have shape " + detail::shape_str(N) + ", got " +
                        detail::shape_str(gl.size));
    detail::Vector<S> gh = gl;
    if constexpr (Ent) {
      static_assert(std::is_same_v<detail::tensor_scalar_t<E>, S>,
                    "prefloss: grad_entropy must have the type of hidden and weight");
      gh = detail::token_vector(grad_entropy, fn, "grad_entropy");
      if (gh.size != N)
        throw shape_error(std::string(fn) + ": argument 'grad_entropy' must have shape " + detail::shape_str(N) +
                          ", got " + detail::shape_str(gh.size));
    }
    S* ghid = out_rows(grad_hidden, N, H, fn, "grad_hidden");
    S* gw = out_rows(grad_weight, V, H, fn, "grad_weight");
    const auto bytes = [](Index n, std::size_t size) { return static_cast<std::size_t>(n) * size; };
    const std::size_t ghb = bytes(N * H, sizeof(S)), gwb = bytes(V * H, sizeof(S));
    detail::require_apart(fn, "grad_hidden", ghid, ghb, "grad_weight", gw, gwb);
    for (const auto& [name, p, b] : {std::tuple<const char*, const S*, std::size_t>{"hidden", h_.data, ghb},
                                     {"weight", w_.data, bytes(V * H, sizeof(S))},
                                     {"grad_logp", gl.data, bytes(N, sizeof(S))},
                                     {"grad_entropy", gh.data, Ent ? bytes(N, sizeof(S)) : 0}}) {
      detail::require_apart(fn, "grad_hidden", ghid, ghb, name, p, b);
      detail::require_apart(fn, "grad_weight", gw, gwb, name, p, b);
    }
    for (const auto& [name, p, b] :
         {std::tuple<const char*, const void*, std::size_t>{"labels", labels_.data, bytes(N, sizeof(Lab))},
          {"mask", mask_.data, bytes(N, sizeof(M))}}) {
      detail::require_apart(fn, "grad_hidden", ghid, ghb, name, p, b);
      detail::require_apart(fn, "grad_weight", gw, gwb, name, p, b);
    }

    if (ghb > 0) std::memset(static_cast<void*>(ghid), 0, ghb);
    if (gwb > 0) std::memset(static_cast<void*>(gw), 0, gwb);
    const Index ns = static_cast<Index>(sel_.size());
    if (ns == 0 || H == 0) return;
    using Mat = detail::RowMat<S>;
    const Index Nt = std::min(tiles_.tokens, ns), Vt = std::min(tiles_.vocab, V);
    detail::TileBuffer<S> hbuf, zbuf(static_cast<std::size_t>(Nt * Vt)), tbuf;
    for (Index v0 = 0; v0 < V; v0 += Vt) {
      const Index vt = std::min(Vt, V - v0);
      const Eigen::Map<const Mat> Wt(w_.data + v0 * H, vt, H);
      Eigen::Map<Mat> GWt(gw + v0 * H, vt, H);
      for (Index j0 = 0; j0 < ns; j0 += Nt) {
        const Index nt = std::min(Nt, ns - j0);
        const Index* sel = sel_.data() + j0;
        const S* hp = detail::tile_rows(h_.data, H, sel, nt, hbuf);
        const Eigen::Map<const Mat> Ht(hp, nt, H);
        Eigen::Map<Mat> Z(zbuf.data(), nt, vt);
        Z.noalias() = Ht * Wt.transpose();
        for (Index i = 0; i < nt; ++i) {
          const Index n = sel[i];
          const auto yl = static_cast<Index>(labels_.data[n]) - v0;
          const double g_lp = static_cast<double>(gl.data[n]);
          const double g_h = Ent ? static_cast<double>(gh.data[n]) : 0.0;
          detail::tile_grad<Ent, S>(zbuf.data() + i * vt, vt, yl, k_, stats_[static_cast<std::size_t>(j0 + i)], g_lp,
                                    g_h);
        }
        if (detail::consecutive(sel, nt)) {
          Eigen::Map<Mat> GHt(ghid + sel[0] * H, nt, H);
          GHt.noalias() += Z * Wt;
        } else {
          tbuf.resize(static_cast<std::size_t>(nt * H));
          Eigen::Map<Mat> T(tbuf.data(), nt, H);
          T.noalias() = Z * Wt;
          for (Index i = 0; i < nt; ++i)
            Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>(ghid + sel[i] * H, H) += T.row(i);
        }
        GWt.noalias() += Z.transpose() * Ht;
      }
    }
  }

  detail::Rows2<S> h_, w_;
  detail::Vector<Lab> labels_;
  detail::Vector<M> mask_;
  S k_;
  bool entropy_;
  detail::LinearTiles tiles_;
  std::vector<Index> sel_;                    // the selected tokens, ascending
  std::vector<detail::LogitRowStats> stats_;  // per selected token, in sel_'s order
};

namespace detail {

/// Builds a LinearLogprobResult: the forward pass (inputs checked by linear_logprobs_tiled).
struct LinearBuilder {
  template <bool Ent, class S, class Lab, class M>
  static LinearLogprobResult<S, Lab, M> make(const Rows2<S>& h, const Rows2<S>& w, const Vector<Lab>& lab,
                                             const Vector<M>& mk, S k, LinearTiles tiles) {
    LinearLogprobResult<S, Lab, M> r(h, w, lab, mk, k, Ent, tiles);
    const Index N = h.rows, H = h.cols, V = w.rows;
    r.logp = typename LinearLogprobResult<S, Lab, M>::Tokens(N);
    r.logp.setZero();
    if (Ent) {
      r.entropy = typename LinearLogprobResult<S, Lab, M>::Tokens(N);
      r.entropy.setZero();
    }
    for (Index n = 0; n < N; ++n)
      if (selected<S>(mk.data[n])) r.sel_.push_back(n);
    const Index ns = static_cast<Index>(r.sel_.size());
    if (ns == 0) return r;
    std::vector<OnlineRow> run(static_cast<std::size_t>(ns));
    using Mat = RowMat<S>;
    const Index Nt = std::min(tiles.tokens, ns), Vt = std::min(tiles.vocab, V);
    TileBuffer<S> hbuf, zbuf(static_cast<std::size_t>(Nt * Vt));
    for (Index v0 = 0; v0 < V; v0 += Vt) {
      const Index vt = std::min(Vt, V - v0);
      const Eigen::Map<const Mat> Wt(w.data + v0 * H, vt, H);
      for (Index j0 = 0; j0 < ns; j0 += Nt) {
        const Index nt = std::min(Nt, ns - j0);
        const Index* sel = r.sel_.data() + j0;
        const Eigen::Map<const Mat> Ht(tile_rows(h.data, H, sel, nt, hbuf), nt, H);
        Eigen::Map<Mat> Z(zbuf.data(), nt, vt);
        Z.noalias() = Ht * Wt.transpose();
        for (Index i = 0; i < nt; ++i)
          online_tile<Ent, S>(zbuf.data() + i * vt, vt, static_cast<Index>(lab.data[sel[i]]) - v0, k,
                              run[static_cast<std::size_t>(j0 + i)]);
      }
    }
    r.stats_.resize(static_cast<std::size_t>(ns));
    for (Index j = 0; j < ns; ++j) {
      const LogitRowStats st = finish_row<Ent>(run[static_cast<std::size_t>(j)]);
      r.stats_[static_cast<std::size_t>(j)] = st;
      r.logp.data()[r.sel_[static_cast<std::size_t>(j)]] = static_cast<S>(st.logp);
      if (Ent) r.entropy.data()[r.sel_[static_cast<std::size_t>(j)]] = static_cast<S>(st.entropy);
    }
    return r;
  }
};

/// linear_logprobs with the tile sizes given (each >= 1); the public function passes the
/// defaults. Tests use small tiles to cover many of them.
template <class X, class Wt, class Y, class K>
auto linear_logprobs_tiled(const X& hidden, const Wt& weight, const Y& labels, const K& mask, const LogprobOptions& opt,
                           LinearTiles tiles) {
  constexpr const char* fn = "linear_logprobs";
  using S = tensor_scalar_t<X>;
  using Lab = tensor_scalar_t<Y>;
  using M = tensor_scalar_t<K>;
  static_assert(is_real_v<S>, "prefloss: hidden and weight must be float or double");
  static_assert(std::is_same_v<tensor_scalar_t<Wt>, S>, "prefloss: hidden and weight must have the same scalar type");
  static_assert(is_label_v<Lab>, "prefloss: labels must be int32_t or int64_t");
  static_assert(is_mask_v<M>, "prefloss: masks must be bool, uint8_t, float or double");
  const auto h = rows_view(hidden, fn, "hidden");
  const auto w = rows_view(weight, fn, "weight");
  const auto lab = token_vector(labels, fn, "labels");
  const auto mk = token_vector(mask, fn, "mask");
  if (w.cols != h.cols)
    throw shape_error(std::string(fn) + ": argument 'weight' has shape " + shape_str(w.rows, w.cols) +
                      " but 'hidden' has shape " + shape_str(h.rows, h.cols) + "; both need the hidden size " +
                      std::to_string(h.cols) + " as their second extent");
  if (lab.size != h.rows)
    throw shape_error(std::string(fn) + ": argument 'labels' has shape " + shape_str(lab.size) +
                      " but 'hidden' has shape " + shape_str(h.rows, h.cols));
  if (mk.size != h.rows)
    throw shape_error(std::string(fn) + ": argument 'mask' has shape " + shape_str(mk.size) +
                      " but 'hidden' has shape " + shape_str(h.rows, h.cols));
  if (!(opt.temperature > 0) || !std::isfinite(opt.temperature))
    throw option_error(std::string(fn) + ": option 'temperature' must be finite and > 0, got " + fmt(opt.temperature));
  const S k = static_cast<S>(1.0 / opt.temperature);
  if (!(k > 0) || !std::isfinite(k))
    throw option_error(std::string(fn) + ": option 'temperature' = " + fmt(opt.temperature) +
                       " has no finite nonzero reciprocal in the type of hidden and weight");
  if (opt.entropy_coef != 0)
    throw option_error(std::string(fn) + ": option 'entropy_coef' is " + fmt(opt.entropy_coef) +
                       " but this call has no loss to add the entropy bonus to (it must be 0; pass grad_entropy to "
                       "backward)");
  if (tiles.tokens < 1 || tiles.vocab < 1)
    throw option_error(std::string(fn) + ": tile sizes must be >= 1, got " + std::to_string(tiles.tokens) + " x " +
                       std::to_string(tiles.vocab));
  const Index N = h.rows, V = w.rows;
  if constexpr (is_real_v<M>) {
    const Index bad = first_bad_weight<S>(mk.data, N);
    if (bad != N)
      throw value_error(std::string(fn) + ": argument 'mask' must hold finite weights >= 0, got " +
                        fmt(static_cast<double>(mk.data[bad])) + " at [" + std::to_string(bad) + "]");
  }
  for (Index n = 0; n < N; ++n)
    if (selected<S>(mk.data[n]) && (lab.data[n] < 0 || static_cast<Index>(lab.data[n]) >= V))
      throw value_error(std::string(fn) + ": argument 'labels' has " + std::to_string(lab.data[n]) + " at [" +
                        std::to_string(n) + "], a selected token; labels must lie in [0, " + std::to_string(V) + ")");
  return opt.entropy ? LinearBuilder::make<true, S>(h, w, lab, mk, k, tiles)
                     : LinearBuilder::make<false, S>(h, w, lab, mk, k, tiles);
}

}  // namespace detail

/// @brief Log-probs of the labels under softmax(hidden weight^T / temperature), and optionally
/// the entropy, per selected token, without materializing the [N, V] logits (formulas, tiling,
/// accuracy, special values and memory: the file comment).
///
/// @param hidden row-major [N, H] of float or double: the LM head's input, one row per token
/// @param weight row-major [V, H] of hidden's type: the LM head's weight (logits = hidden W^T)
/// @param labels [N] of int32_t or int64_t; at a selected token in [0, V)
/// @param mask [N] of bool, uint8_t, float or double: which tokens to compute (a nonzero
///   entry). A float weight is not applied here: the loss that consumes logp applies it, and
///   its backward already wrote w * upstream into grad_logp.
/// @param opt temperature (finite, > 0) and whether to compute the entropy
/// @returns a LinearLogprobResult with logp [N], entropy [N] and backward()
/// @throws shape_error, option_error, value_error (a label out of range at a selected token,
///   naming the index and the value; a bad mask weight), layout_error; nothing is computed then.
template <class X, class W, class Y, class K>
auto linear_logprobs(const X& hidden, const W& weight, const Y& labels, const K& mask, const LogprobOptions& opt = {}) {
  return detail::linear_logprobs_tiled(hidden, weight, labels, mask, opt, detail::LinearTiles{});
}

// A result over a temporary owning tensor would dangle: backward() reads hidden, weight, labels
// and mask again.
template <class S, int O, class I, class W, class Y, class K>
void linear_logprobs(Eigen::Tensor<S, 2, O, I>&& hidden, const W& weight, const Y& labels, const K& mask,
                     const LogprobOptions& opt = {}) = delete;
template <class X, class S, int O, class I, class Y, class K>
void linear_logprobs(const X& hidden, Eigen::Tensor<S, 2, O, I>&& weight, const Y& labels, const K& mask,
                     const LogprobOptions& opt = {}) = delete;
template <class X, class W, class S, int O, class I, class K>
void linear_logprobs(const X& hidden, const W& weight, Eigen::Tensor<S, 1, O, I>&& labels, const K& mask,
                     const LogprobOptions& opt = {}) = delete;
template <class X, class W, class Y, class S, int O, class I>
void linear_logprobs(const X& hidden, const W& weight, const Y& labels, Eigen::Tensor<S, 1, O, I>&& mask,
                     const LogprobOptions& opt = {}) = delete;

}  // namespace prefloss
PREFLOSS_KERNELS_END
