// Packed (padding-free) batches: pl::packed(values, cu_seqlens) at every entry point that takes
// [batch, tokens] tokens, against the padded layout of the same rows (padding and masked-out
// tokens hold NaN/inf), against the same row run as a [1, L] batch (the row kernels then see
// the very same data: bit-identical), and against double references; int32 and int64 offsets;
// bf16 tokens (masked sums, ppo_clip); the fused dpo form against its two-pass form;
// every validation rule; empty batches and empty rows.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using Index = pl::Index;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Flat = Eigen::Tensor<T, 1>;

namespace {

constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_v = std::numeric_limits<double>::infinity();

/// Row lengths with 0-length rows, 1-token rows and lengths that are no multiple of any SIMD
/// width (and a few that are), shuffled by seed.
std::vector<Index> row_lengths(unsigned seed) {
  std::vector<Index> len = {0, 1, 17, 64, 3, 0, 129, 1, 33, 250, 15, 7, 48, 0, 2, 95};
  std::mt19937 rng(seed);
  std::shuffle(len.begin(), len.end(), rng);
  return len;
}

/// One batch in both layouts: flat[j] and pad[j] hold token input j, mflat / mpad the mask. The
/// padded width T exceeds the longest row (padding: NaN / inf tokens, mask 0); masked-out
/// tokens inside rows hold NaN / inf in both layouts.
template <class S, class M, class O>
struct Case {
  std::vector<Index> len;
  Index B = 0, N = 0, T = 0;
  Flat<O> cu;
  std::vector<Flat<S>> flat;
  std::vector<Tok<S>> pad;
  Flat<M> mflat;
  Tok<M> mpad;

  Index begin(Index i) const { return static_cast<Index>(cu(i)); }
};

/// gen(j, rng) draws token input j.
template <class S, class M, class O, class Gen>
Case<S, M, O> make_case(const std::vector<Index>& len, std::size_t n_in, unsigned seed, Gen&& gen,
                        double p_keep = 0.8) {
  Case<S, M, O> c;
  c.len = len;
  c.B = static_cast<Index>(len.size());
  c.cu = Flat<O>(c.B + 1);
  c.cu(0) = 0;
  Index maxlen = 0;
  for (Index i = 0; i < c.B; ++i) {
    c.cu(i + 1) = static_cast<O>(c.cu(i) + len[static_cast<std::size_t>(i)]);
    maxlen = std::max(maxlen, len[static_cast<std::size_t>(i)]);
  }
  c.N = static_cast<Index>(c.cu(c.B));
  c.T = maxlen + 5;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  c.mflat = Flat<M>(c.N);
  c.mpad = Tok<M>(c.B, c.T);
  c.mpad.setZero();
  for (std::size_t j = 0; j < n_in; ++j) {
    c.flat.emplace_back(c.N);
    c.pad.emplace_back(c.B, c.T);
    c.pad[j].setConstant(static_cast<S>(j % 2 ? nan_v : inf_v));
  }
  for (Index i = 0; i < c.B; ++i)
    for (Index t = 0; t < len[static_cast<std::size_t>(i)]; ++t) {
      const Index k = c.begin(i) + t;
      const bool keep = u(rng) < p_keep;
      M m;
      if constexpr (std::is_floating_point_v<M>) {
        const double w[] = {0.5, 1.0, 2.25, 0.125};
        m = keep ? static_cast<M>(w[static_cast<std::size_t>(u(rng) * 4) % 4]) : M(0);
      } else {
        m = static_cast<M>(keep ? 1 : 0);
      }
      c.mflat(k) = m;
      c.mpad(i, t) = m;
      for (std::size_t j = 0; j < n_in; ++j) {
        const S v =
            keep ? static_cast<S>(gen(j, rng)) : static_cast<S>((k + static_cast<Index>(j)) % 2 ? nan_v : -inf_v);
        c.flat[j](k) = v;
        c.pad[j](i, t) = v;
      }
    }
  return c;
}

/// Bit-identical (NaN == NaN) or both zero.
template <class S>
bool same(S a, S b) {
  return std::memcmp(&a, &b, sizeof(S)) == 0 || (a == b) || (std::isnan(a) && std::isnan(b));
}

template <class S>
constexpr double eps_of() {
  return static_cast<double>(std::numeric_limits<S>::epsilon());
}

/// Every packed gradient entry equals the padded one at its [row, token], bit for bit.
template <class S, class M, class O, class G>
void check_grad_same(const Case<S, M, O>& c, const G& flat, const Tok<S>& pad) {
  for (Index i = 0; i < c.B; ++i)
    for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t) {
      const S a = flat.data()[c.begin(i) + t], b = pad(i, t);
      if (!same(a, b)) {
        CAPTURE(i, t, a, b);
        FAIL_CHECK("packed and padded gradients differ");
        return;
      }
    }
}

/// |packed - padded| <= rel * |padded| at every token (see the callers for rel).
template <class S, class M, class O, class G>
void check_grad_close(const Case<S, M, O>& c, const G& flat, const Tok<S>& pad, double rel) {
  for (Index i = 0; i < c.B; ++i)
    for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t) {
      const double a = static_cast<double>(flat.data()[c.begin(i) + t]), b = static_cast<double>(pad(i, t));
      if (!(std::fabs(a - b) <= rel * std::fabs(b))) {
        CAPTURE(i, t, a, b, rel);
        FAIL_CHECK("packed and padded gradients differ beyond the bound");
        return;
      }
    }
}

template <class S, class M, class O>
void masked_reduction_case(unsigned seed) {
  auto c = make_case<S, M, O>(row_lengths(seed), 1, seed, [](std::size_t, std::mt19937& r) {
    return std::normal_distribution<double>(-1.0, 2.0)(r);
  });
  const auto& x = c.flat[0];
  const auto px = pl::packed(x, c.cu);
  const auto pm = pl::packed(c.mflat, c.cu);
  const auto ps = pl::masked_sum(px, pm), qs = pl::masked_sum(c.pad[0], c.mpad);
  const auto pmn = pl::masked_mean(px, pm), qmn = pl::masked_mean(c.pad[0], c.mpad);
  REQUIRE(ps.size() == c.B);
  const Flat<S> vs = ps.eval(), ws = qs.eval(), vm = pmn.eval(), wm = qmn.eval();
  for (Index i = 0; i < c.B; ++i) {
    // Independent double reference and the accumulation bound. Float rows: one rounding of w x,
    // then float lanes widened into double every 8 adds (<= 7 * 2^-24 sum |w x|), together
    // <= 8 * 2^-24 = 4 eps, and one rounding to S; double lanes sum plainly (<= n eps sum |w x|).
    // The padded row may split its lanes differently: the two agree within both bounds.
    double ref = 0, abs_sum = 0, wsum = 0;
    const Index n = c.len[static_cast<std::size_t>(i)];
    for (Index t = 0; t < n; ++t) {
      const M m = c.mflat(c.begin(i) + t);
      if (m != M(0)) {
        const double w = std::is_floating_point_v<M> ? static_cast<double>(m) : 1.0;
        ref += w * static_cast<double>(x(c.begin(i) + t));
        abs_sum += std::fabs(w * static_cast<double>(x(c.begin(i) + t)));
        wsum += w;
      }
    }
    const double bound = (std::is_same_v<S, float> ? 4.0 : static_cast<double>(c.T)) * eps_of<S>() * abs_sum +
                         eps_of<S>() * std::fabs(ref);
    CAPTURE(i, n);
    CHECK(std::fabs(static_cast<double>(vs(i)) - ref) <= bound);
    CHECK(std::fabs(static_cast<double>(vs(i)) - static_cast<double>(ws(i))) <= 2 * bound);
    const double mref = wsum != 0 ? ref / wsum : 0.0;
    CHECK(std::fabs(static_cast<double>(vm(i)) - mref) <=
          (wsum != 0 ? 2 * bound / wsum : 0.0) + eps_of<S>() * std::fabs(mref));
    CHECK(pmn.empty(i) == (wsum == 0));
    // The row as a [1, n] batch: the same kernel call on the same data, bit for bit.
    Eigen::TensorMap<const Tok<S>> xr(x.data() + c.begin(i), 1, n);
    Eigen::TensorMap<const Tok<M>> mr(c.mflat.data() + c.begin(i), 1, n);
    CHECK(same(vs(i), pl::masked_sum(xr, mr).eval()(0)));
    CHECK(same(vm(i), pl::masked_mean(xr, mr).eval()(0)));
  }

  // Adjoints: grad = upstream * w (/ W for a mean). For a sum the scale is upstream itself, so
  // packed and padded are the same bits; for a mean W is exact for byte masks (a count) and a
  // lane sum for float weights (relative difference <= 7 eps, 7 * 2^-24 each way, times two
  // roundings to S).
  Flat<S> up(c.B);
  std::mt19937 rng(seed + 1);
  for (Index i = 0; i < c.B; ++i) up(i) = static_cast<S>(std::normal_distribution<double>(0, 1)(rng));
  Tok<S> gq(c.B, c.T);
  qs.backward(up, gq);
  Flat<S> g(c.N);
  g.setConstant(S(7));
  ps.backward(up, g);
  check_grad_same(c, g, gq);
  Flat<S> g2(c.N);  // through pl::packed(out, cu) and a TensorMap
  Eigen::TensorMap<Flat<S>> g2m(g2.data(), c.N);
  ps.backward(up, pl::packed(g2m, c.cu));
  check_grad_same(c, g2, gq);
  qmn.backward(up, gq);
  pmn.backward(up, g);
  if (std::is_floating_point_v<M>)
    check_grad_close(c, g, gq, 8 * eps_of<S>());
  else
    check_grad_same(c, g, gq);
}

TEST_CASE("packed: masked_sum / masked_mean and their adjoints match the padded layout", "[packed]") {
  masked_reduction_case<float, std::uint8_t, std::int32_t>(1);
  masked_reduction_case<float, float, std::int64_t>(2);
  masked_reduction_case<double, bool, std::int32_t>(3);
  masked_reduction_case<double, double, std::int64_t>(4);
  masked_reduction_case<float, double, std::int32_t>(5);
}

TEST_CASE("packed: dpo over packed masked_sum expressions", "[packed]") {
  const auto gen = [](std::size_t, std::mt19937& r) { return -std::uniform_real_distribution<double>(0.05, 3)(r); };
  auto c = make_case<float, std::uint8_t, std::int32_t>(row_lengths(7), 1, 7, gen);
  std::vector<Index> lr = row_lengths(8);  // the rejected side has its own offsets
  auto r = make_case<float, std::uint8_t, std::int64_t>(lr, 1, 8, gen);
  Flat<float> rc(c.B), rr(c.B);
  for (Index i = 0; i < c.B; ++i) {
    rc(i) = -2.0f - 0.1f * static_cast<float>(i);
    rr(i) = -2.5f + 0.05f * static_cast<float>(i);
  }
  pl::DpoOptions opt;
  opt.beta = 0.1;
  const auto a = pl::dpo(pl::masked_sum(pl::packed(c.flat[0], c.cu), pl::packed(c.mflat, c.cu)),
                         pl::masked_sum(pl::packed(r.flat[0], r.cu), pl::packed(r.mflat, r.cu)), rc, rr, opt);
  const auto b = pl::dpo(pl::masked_sum(c.pad[0], c.mpad), pl::masked_sum(r.pad[0], r.mpad), rc, rr, opt);
  // The sequence values differ only by the summation order bound of masked_sum (see above), so
  // the losses agree to a few float ulps of the per-example magnitude.
  CHECK(std::fabs(a.loss - b.loss) <= 16 * eps_of<float>() * (std::fabs(b.loss) + 1));
  for (Index i = 0; i < c.B; ++i)
    CHECK(std::fabs(a.losses(i) - b.losses(i)) <= 16 * eps_of<float>() * (std::fabs(b.losses(i)) + 1));
  Flat<float> gc(c.N), gr(r.N);
  Tok<float> qc(c.B, c.T), qr(r.B, r.T);
  a.backward(gc, pl::packed(gr, r.cu));
  b.backward(qc, qr);
  // The token gradient is the per-example upstream at every selected token.
  for (Index i = 0; i < c.B; ++i)
    for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t)
      CHECK(same(gc(c.begin(i) + t), c.mflat(c.begin(i) + t) ? a.grad_chosen_value()(i) : 0.0f));
  check_grad_close(c, gc, qc, 16 * eps_of<float>());
  check_grad_close(r, gr, qr, 16 * eps_of<float>());
}

/// PPO inputs: logp, old_logp, advantages, ref_logp.
double ppo_gen(std::size_t j, std::mt19937& r) {
  switch (j) {
    case 0:
      return -std::uniform_real_distribution<double>(0.05, 4)(r);
    case 1:
      return -std::uniform_real_distribution<double>(0.05, 4)(r) * 0.2 - 1.0;
    case 2:
      return std::normal_distribution<double>(0, 1)(r);
    default:
      return -std::uniform_real_distribution<double>(0.05, 4)(r);
  }
}

/// Compares a packed and a padded token-loss result: loss, per-row losses and every metric
/// field through `fields`. Byte masks: the row kernels see the same tokens in the same lanes
/// and chunks (the padded row only adds masked-out lanes, which leave every accumulator
/// unchanged) and W is a count, so everything is the same bits. Float masks: W_i is a lane
/// sum of the weights (within 7 * 2^-24 = 3.5 eps relative of the exact sum, so two ways of
/// computing it differ by <= 7 eps), which every normaliser and so every loss term inherits,
/// plus one rounding to S: <= 8 eps of the magnitude of the summed terms.
template <class S, class M, class R1, class R2>
void check_result(const R1& a, const R2& b, Index B) {
  if constexpr (std::is_floating_point_v<M>) {
    double mag = 0;
    for (Index i = 0; i < B; ++i) mag += std::fabs(static_cast<double>(b.losses(i)));
    const double tol = 8 * eps_of<S>();
    CHECK(std::fabs(static_cast<double>(a.loss) - static_cast<double>(b.loss)) <= tol * mag + 1e-300);
    for (Index i = 0; i < B; ++i)
      CHECK(std::fabs(static_cast<double>(a.losses(i)) - static_cast<double>(b.losses(i))) <=
            tol * std::fabs(static_cast<double>(b.losses(i))));
  } else {
    CHECK(same(a.loss, b.loss));
    for (Index i = 0; i < B; ++i) CHECK(same(a.losses(i), b.losses(i)));
  }
}

template <class S, class M>
void check_ppo_metrics(const pl::PpoMetrics<S>& a, const pl::PpoMetrics<S>& b) {
  const auto eq = [](S x, S y) {
    if constexpr (std::is_floating_point_v<M>)
      return std::fabs(static_cast<double>(x - y)) <= 8 * eps_of<S>() * std::fabs(static_cast<double>(y));
    return same(x, y);
  };
  CHECK(eq(a.clip_fraction, b.clip_fraction));
  CHECK(eq(a.clip_fraction_low, b.clip_fraction_low));
  CHECK(eq(a.approx_kl, b.approx_kl));
  CHECK(eq(a.ratio_mean, b.ratio_mean));
  CHECK(same(a.ratio_max, b.ratio_max));  // a max of the same token values
  CHECK(eq(a.kl_mean, b.kl_mean));
  CHECK(eq(a.token_weight, b.token_weight));
}

template <class S, class M, class O>
void ppo_case(unsigned seed) {
  auto c = make_case<S, M, O>(row_lengths(seed), 4, seed, ppo_gen);
  const auto P = [&](std::size_t j) { return pl::packed(c.flat[j], c.cu); };
  const auto pm = pl::packed(c.mflat, c.cu);
  const double grad_tol = std::is_floating_point_v<M> ? 8 * eps_of<S>() : 0.0;
  const auto check_grad = [&](const Flat<S>& g, const Tok<S>& q) {
    if (grad_tol == 0)
      check_grad_same(c, g, q);
    else
      check_grad_close(c, g, q, grad_tol);
  };
  const pl::Aggregation modes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                   pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                   pl::Aggregation::token_sum};
  for (const auto level : {pl::ImportanceLevel::token, pl::ImportanceLevel::sequence})
    for (const auto mode : modes) {
      pl::PpoOptions o;
      o.aggregation = mode;
      o.importance_level = level;  // sequence: a packed row's log-ratio pass sums what the padded one does
      o.dual_clip = 3;
      o.clip_high = 0.28;
      if (mode == pl::Aggregation::seq_mean_token_sum_norm) o.token_sum_norm = 300.0;
      CAPTURE(static_cast<int>(mode), static_cast<int>(level));
      // No reference: forward, backward, fused.
      const auto a = pl::ppo_clip(P(0), P(1), P(2), pm, o);
      const auto b = pl::ppo_clip(c.pad[0], c.pad[1], c.pad[2], c.mpad, o);
      check_result<S, M>(a, b, c.B);
      check_ppo_metrics<S, M>(a.metrics, b.metrics);
      Flat<S> g(c.N);
      Tok<S> q(c.B, c.T);
      a.backward(g);
      b.backward(q);
      check_grad(g, q);
      Flat<S> gf(c.N);
      const auto af = pl::ppo_clip(P(0), P(1), P(2), pm, o, gf);
      check_result<S, M>(af, b, c.B);
      check_ppo_metrics<S, M>(af.metrics, b.metrics);
      check_grad(gf, q);
      // With a reference and a KL term; the fused form into pl::packed(out, cu).
      o.kl_coef = 0.05;
      o.kl_estimator = pl::KlEstimator::k3;
      const auto ar = pl::ppo_clip(P(0), P(1), P(2), pm, P(3), o);
      const auto br = pl::ppo_clip(c.pad[0], c.pad[1], c.pad[2], c.mpad, c.pad[3], o);
      check_result<S, M>(ar, br, c.B);
      check_ppo_metrics<S, M>(ar.metrics, br.metrics);
      ar.backward(pl::packed(g, c.cu));
      br.backward(q);
      check_grad(g, q);
      Flat<S> gr(c.N);
      const auto arf = pl::ppo_clip(P(0), P(1), P(2), pm, P(3), o, pl::packed(gr, c.cu));
      check_result<S, M>(arf, br, c.B);
      check_grad(gr, q);
    }
}

TEST_CASE("packed: ppo_clip (forward, backward, fused, with and without ref_logp) matches padded", "[packed]") {
  ppo_case<float, std::uint8_t, std::int32_t>(11);
  ppo_case<float, float, std::int64_t>(12);
  ppo_case<double, std::uint8_t, std::int64_t>(13);
}

template <class S, class M, class O>
void value_case(unsigned seed) {
  auto c = make_case<S, M, O>(row_lengths(seed), 3, seed, [](std::size_t j, std::mt19937& r) {
    return std::normal_distribution<double>(j == 2 ? 0.5 : 0.3, 1)(r);
  });
  const auto P = [&](std::size_t j) { return pl::packed(c.flat[j], c.cu); };
  const auto pm = pl::packed(c.mflat, c.cu);
  for (const auto mode : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
    pl::ValueOptions o;
    o.aggregation = mode;
    const auto a = pl::value_loss(P(0), P(1), P(2), pm, o);
    const auto b = pl::value_loss(c.pad[0], c.pad[1], c.pad[2], c.mpad, o);
    check_result<S, M>(a, b, c.B);
    CHECK(same(a.metrics.clip_fraction, b.metrics.clip_fraction));
    CHECK(same(a.metrics.value_mean, b.metrics.value_mean));
    CHECK(same(a.metrics.token_weight, b.metrics.token_weight));
    Flat<S> g(c.N), gf(c.N);
    Tok<S> q(c.B, c.T);
    a.backward(g);
    b.backward(q);
    check_grad_same(c, g, q);
    const auto af = pl::value_loss(P(0), P(1), P(2), pm, o, gf);
    check_result<S, M>(af, b, c.B);
    check_grad_same(c, gf, q);
  }
}

TEST_CASE("packed: value_loss (forward, backward, fused) matches padded", "[packed]") {
  value_case<float, std::uint8_t, std::int32_t>(21);
  value_case<double, bool, std::int64_t>(22);
}

template <class S, class M, class O>
void rl_case(unsigned seed) {
  auto c = make_case<S, M, O>(row_lengths(seed), 2, seed,
                              [](std::size_t, std::mt19937& r) { return std::normal_distribution<double>(-1, 1)(r); });
  const auto P = [&](std::size_t j) { return pl::packed(c.flat[j], c.cu); };
  const auto pm = pl::packed(c.mflat, c.cu);
  // kl_estimate is elementwise: the same bits at every token.
  for (const auto est : {pl::KlEstimator::k1, pl::KlEstimator::k2, pl::KlEstimator::k3, pl::KlEstimator::abs,
                         pl::KlEstimator::k1_plus, pl::KlEstimator::abs_plus, pl::KlEstimator::k3_plus}) {
    pl::KlOptions ko;
    ko.estimator = est;
    Flat<S> out(c.N), grad(c.N);
    Tok<S> qo(c.B, c.T), qg(c.B, c.T);
    pl::kl_estimate(P(0), P(1), pm, ko, out, pl::packed(grad, c.cu));
    pl::kl_estimate(c.pad[0], c.pad[1], c.mpad, ko, qo, qg);
    check_grad_same(c, out, qo);
    check_grad_same(c, grad, qg);
  }
  // gae runs the same double recursion along each row; whitening sums the selected tokens in
  // the same order (padding adds nothing).
  for (const bool whiten : {false, true}) {
    pl::GaeOptions go;
    go.gamma = 0.97;
    go.lam = 0.9;
    go.whiten_advantages = whiten;
    Flat<S> adv(c.N), ret(c.N);
    Tok<S> qa(c.B, c.T), qr(c.B, c.T);
    pl::gae(P(0), P(1), pm, go, adv, pl::packed(ret, c.cu));
    pl::gae(c.pad[0], c.pad[1], c.mpad, go, qa, qr);
    check_grad_same(c, adv, qa);
    check_grad_same(c, ret, qr);
    if (!whiten) {  // independent check of one row: the recursion in the test, in double
      for (Index i = 0; i < c.B; ++i) {
        double nv = 0, na = 0;
        for (Index t = c.len[static_cast<std::size_t>(i)] - 1; t >= 0; --t) {
          const Index k = c.begin(i) + t;
          if (c.mflat(k) == M(0)) {
            CHECK(adv(k) == S(0));
            continue;
          }
          const double v = static_cast<double>(c.flat[1](k));
          na = static_cast<double>(c.flat[0](k)) + go.gamma * nv - v + go.gamma * go.lam * na;
          nv = v;
          CHECK(adv(k) == static_cast<S>(na));
        }
      }
    }
  }
  Flat<S> w(c.N);
  Tok<S> qw(c.B, c.T);
  pl::masked_whiten(P(0), pm, w);
  pl::masked_whiten(c.pad[0], c.mpad, qw);
  check_grad_same(c, w, qw);
  pl::masked_whiten(P(0), pm, pl::packed(w, c.cu));
  check_grad_same(c, w, qw);
}

TEST_CASE("packed: kl_estimate, gae (with and without whitening) and masked_whiten match padded", "[packed]") {
  rl_case<float, std::uint8_t, std::int32_t>(31);
  rl_case<double, float, std::int64_t>(32);
}

/// The bytes of a value, for bit comparisons of types without std::isnan (bf16).
template <class S>
std::uint64_t bits_of(S v) {
  std::uint64_t b = 0;
  static_assert(sizeof(S) <= sizeof(b), "bits_of: 16-, 32- and 64-bit types only");
  std::memcpy(&b, &v, sizeof(S));
  return b;
}

/// The exact value of a bf16 token, in double.
double as_double(Eigen::bfloat16 v) { return static_cast<double>(static_cast<float>(v)); }

TEST_CASE("packed: bf16 masked_sum / masked_mean and ppo_clip match the padded layout", "[packed][lowp]") {
  using BF = Eigen::bfloat16;
  // masked_sum / masked_mean over bf16 tokens: computed in float on the exact token values, so
  // the float bounds of masked_reduction_case apply (the bf16 rounding happened at input).
  {
    auto c = make_case<BF, std::uint8_t, std::int32_t>(row_lengths(41), 1, 41, [](std::size_t, std::mt19937& r) {
      return std::normal_distribution<double>(-1.0, 2.0)(r);
    });
    const auto px = pl::packed(c.flat[0], c.cu);
    const auto pm = pl::packed(c.mflat, c.cu);
    const auto ps = pl::masked_sum(px, pm), qs = pl::masked_sum(c.pad[0], c.mpad);
    const auto pmn = pl::masked_mean(px, pm), qmn = pl::masked_mean(c.pad[0], c.mpad);
    const Flat<float> vs = ps.eval(), ws = qs.eval(), vm = pmn.eval(), wm = qmn.eval();
    for (Index i = 0; i < c.B; ++i) {
      double ref = 0, abs_sum = 0, wsum = 0;
      const Index n = c.len[static_cast<std::size_t>(i)];
      for (Index t = 0; t < n; ++t)
        if (c.mflat(c.begin(i) + t) != 0) {
          const double x = as_double(c.flat[0](c.begin(i) + t));
          ref += x;
          abs_sum += std::fabs(x);
          wsum += 1;
        }
      const double bound = 2.0 * eps_of<float>() * abs_sum + eps_of<float>() * std::fabs(ref);
      CAPTURE(i, n);
      CHECK(std::fabs(static_cast<double>(vs(i)) - ref) <= bound);
      CHECK(std::fabs(static_cast<double>(vs(i)) - static_cast<double>(ws(i))) <= 2 * bound);
      const double mref = wsum != 0 ? ref / wsum : 0.0;
      CHECK(std::fabs(static_cast<double>(vm(i)) - mref) <=
            (wsum != 0 ? 2 * bound / wsum : 0.0) + eps_of<float>() * std::fabs(mref));
      CHECK(std::fabs(static_cast<double>(vm(i)) - static_cast<double>(wm(i))) <=
            (wsum != 0 ? 4 * bound / wsum : 0.0) + 2 * eps_of<float>() * std::fabs(mref));
      // The row as a [1, n] batch: the same kernel on the same data, bit for bit.
      Eigen::TensorMap<const Tok<BF>> xr(c.flat[0].data() + c.begin(i), 1, n);
      Eigen::TensorMap<const Tok<std::uint8_t>> mr(c.mflat.data() + c.begin(i), 1, n);
      CHECK(bits_of(vs(i)) == bits_of(pl::masked_sum(xr, mr).eval()(0)));
    }
    // Adjoint of the sum with a byte mask: bf16(upstream) at selected tokens, 0 elsewhere (the
    // float gradient is upstream itself, rounded once), in both layouts.
    Flat<float> up(c.B);
    for (Index i = 0; i < c.B; ++i) up(i) = 0.37f * static_cast<float>(i) - 2.1f;
    Flat<BF> g(c.N);
    Tok<BF> q(c.B, c.T);
    ps.backward(up, pl::packed(g, c.cu));
    qs.backward(up, q);
    long diff = 0;
    for (Index i = 0; i < c.B; ++i)
      for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t) {
        const Index k = c.begin(i) + t;
        const BF want = c.mflat(k) ? BF(up(i)) : BF(0.0f);
        diff += bits_of(g(k)) != bits_of(want) || bits_of(q(i, t)) != bits_of(want);
      }
    CHECK(diff == 0);
  }
  // ppo_clip over bf16 log-probs and float advantages (a mixed call), byte mask: the row kernels
  // see the same float tokens in the same chunks in both layouts (the padded row only adds
  // masked-out lanes), so the loss, every row loss and the bf16 gradients are the same bits.
  {
    auto c = make_case<BF, std::uint8_t, std::int64_t>(row_lengths(42), 4, 42, ppo_gen);
    Flat<float> adv(c.N);
    Tok<float> adv_pad(c.B, c.T);
    adv_pad.setConstant(std::numeric_limits<float>::quiet_NaN());
    for (Index i = 0; i < c.B; ++i)
      for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t) {
        const Index k = c.begin(i) + t;
        adv(k) = static_cast<float>(c.flat[2](k)) * 1.5f;
        adv_pad(i, t) = adv(k);
      }
    const auto P = [&](std::size_t j) { return pl::packed(c.flat[j], c.cu); };
    const auto pm = pl::packed(c.mflat, c.cu);
    for (const auto mode : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
      pl::PpoOptions o;
      o.aggregation = mode;
      CAPTURE(static_cast<int>(mode));
      const auto a = pl::ppo_clip(P(0), P(1), pl::packed(adv, c.cu), pm, o);
      const auto b = pl::ppo_clip(c.pad[0], c.pad[1], adv_pad, c.mpad, o);
      CHECK(bits_of(a.loss) == bits_of(b.loss));
      for (Index i = 0; i < c.B; ++i) CHECK(bits_of(a.losses(i)) == bits_of(b.losses(i)));
      CHECK(bits_of(a.metrics.clip_fraction) == bits_of(b.metrics.clip_fraction));
      CHECK(bits_of(a.metrics.token_weight) == bits_of(b.metrics.token_weight));
      Flat<BF> g(c.N), gf(c.N);
      Tok<BF> q(c.B, c.T);
      a.backward(g);
      b.backward(q);
      const auto af = pl::ppo_clip(P(0), P(1), pl::packed(adv, c.cu), pm, o, pl::packed(gf, c.cu));
      CHECK(bits_of(af.loss) == bits_of(b.loss));
      long diff = 0;
      for (Index i = 0; i < c.B; ++i)
        for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t) {
          const Index k = c.begin(i) + t;
          diff += bits_of(g(k)) != bits_of(q(i, t)) || bits_of(gf(k)) != bits_of(q(i, t));
        }
      CHECK(diff == 0);
      if (mode == pl::Aggregation::token_mean) {
        // Independent reference in double on the exact token values (default clip 0.2, no dual
        // clip): loss = sum_t l_t / W with l = max(-A r, -A clip(r, 0.8, 1.2)), r = exp(lp - old).
        // The float kernel's r has <= (|lp - old| + 2) eps_f relative error (one rounding of the
        // difference, a few ulps of exp); |lp - old| < 4 here, so <= 6 eps_f per term; one
        // rounding of the product (0.5), the lane sum (7 * 2^-24 = 3.5), the division by W and
        // the rounding to float (0.5 each): 11 eps_f of sum |l| / W.
        double sum = 0, abs_sum = 0, w = 0;
        for (Index k = 0; k < c.N; ++k) {
          if (c.mflat(k) == 0) continue;
          const double r = std::exp(as_double(c.flat[0](k)) - as_double(c.flat[1](k)));
          const double A = static_cast<double>(adv(k));
          const double l = std::max(-A * r, -A * std::min(std::max(r, 0.8), 1.2));
          sum += l;
          abs_sum += std::fabs(l);
          w += 1;
        }
        REQUIRE(w > 0);
        CHECK(std::fabs(static_cast<double>(a.loss) - sum / w) <= 11 * eps_of<float>() * abs_sum / w);
      }
    }
  }
}

TEST_CASE("packed: fused dpo gives the two-pass packed bits and the padded result", "[packed][fused]") {
  const auto gen = [](std::size_t, std::mt19937& r) { return -std::uniform_real_distribution<double>(0.05, 3)(r); };
  auto c = make_case<float, std::uint8_t, std::int32_t>(row_lengths(51), 1, 51, gen);
  auto r = make_case<float, float, std::int64_t>(row_lengths(52), 1, 52, gen);  // own offsets, weights
  Flat<float> rc(c.B), rr(c.B);
  for (Index i = 0; i < c.B; ++i) {
    rc(i) = -2.0f - 0.1f * static_cast<float>(i);
    rr(i) = -2.5f + 0.05f * static_cast<float>(i);
  }
  pl::DpoOptions opt;
  opt.beta = 0.1;
  const auto pc = pl::masked_sum(pl::packed(c.flat[0], c.cu), pl::packed(c.mflat, c.cu));
  const auto pr = pl::masked_mean(pl::packed(r.flat[0], r.cu), pl::packed(r.mflat, r.cu));
  const auto two = pl::dpo(pc, pr, rc, rr, opt);
  Flat<float> gc(c.N), gr(r.N);
  two.backward(gc, gr);
  // Fused into a rank-1 [total_tokens] tensor and into pl::packed(out, cu).
  Flat<float> fc(c.N), fr(r.N);
  fc.setConstant(7.f);
  fr.setConstant(7.f);
  const auto fused = pl::dpo(pc, pr, rc, rr, opt, fc, pl::packed(fr, r.cu));
  CHECK(bits_of(fused.loss) == bits_of(two.loss));
  for (Index i = 0; i < c.B; ++i) CHECK(bits_of(fused.losses(i)) == bits_of(two.losses(i)));
  long diff = 0;
  for (Index k = 0; k < c.N; ++k) diff += bits_of(fc(k)) != bits_of(gc(k));
  for (Index k = 0; k < r.N; ++k) diff += bits_of(fr(k)) != bits_of(gr(k));
  CHECK(diff == 0);
  // Against the padded layout: the sequence values differ by masked_sum's summation-order
  // bound (see masked_reduction_case), which the loss and the gradients inherit.
  Tok<float> qc(c.B, c.T), qr(r.B, r.T);
  const auto pad = pl::dpo(pl::masked_sum(c.pad[0], c.mpad), pl::masked_mean(r.pad[0], r.mpad), rc, rr, opt, qc, qr);
  CHECK(std::fabs(fused.loss - pad.loss) <= 16 * eps_of<float>() * (std::fabs(pad.loss) + 1));
  check_grad_close(c, fc, qc, 16 * eps_of<float>());
  check_grad_close(r, fr, qr, 16 * eps_of<float>());
  // The chosen gradient is the per-example upstream at every selected token (closed form of
  // the masked sum's adjoint).
  for (Index i = 0; i < c.B; ++i)
    for (Index t = 0; t < c.len[static_cast<std::size_t>(i)]; ++t)
      CHECK(same(fc(c.begin(i) + t), c.mflat(c.begin(i) + t) ? fused.grad_chosen_value()(i) : 0.0f));
  // A padded gradient for packed expressions is refused before anything is written.
  Tok<float> wrong(c.B, c.T);
  fc.setConstant(7.f);
  expect_throw<pl::shape_error>([&] { pl::dpo(pc, pr, rc, rr, opt, wrong, fr); }, "dpo", {"grad_chosen"});
  CHECK(fc(0) == 7.f);
}

TEST_CASE("packed: empty batch (cu = {0}) and a batch of empty rows", "[packed]") {
  Flat<float> x(0), g(0);
  Flat<std::uint8_t> m(0);
  Flat<std::int32_t> cu(1);
  cu(0) = 0;
  const auto s = pl::masked_sum(pl::packed(x, cu), pl::packed(m, cu));
  CHECK(s.size() == 0);
  CHECK(s.eval().size() == 0);
  Flat<float> up(0);
  s.backward(up, g);
  Flat<float> out(0);
  pl::kl_estimate(pl::packed(x, cu), pl::packed(x, cu), pl::packed(m, cu), pl::KlOptions{}, out);
  pl::gae(pl::packed(x, cu), pl::packed(x, cu), pl::packed(m, cu), pl::GaeOptions{}, out, g);
  // Losses average over the batch: an empty one is rejected as in the padded layout.
  expect_throw<pl::shape_error>(
      [&] { pl::ppo_clip(pl::packed(x, cu), pl::packed(x, cu), pl::packed(x, cu), pl::packed(m, cu)); }, "ppo_clip",
      {"empty batch"});
  expect_throw<pl::shape_error>(
      [&] { pl::value_loss(pl::packed(x, cu), pl::packed(x, cu), pl::packed(x, cu), pl::packed(m, cu)); }, "value_loss",
      {"empty batch"});

  // Three rows of no tokens: sums 0, means 0, a loss of 0 with no valid token.
  Flat<std::int64_t> cu3(4);
  cu3.setZero();
  const auto s3 = pl::masked_mean(pl::packed(x, cu3), pl::packed(m, cu3)).eval();
  REQUIRE(s3.size() == 3);
  for (Index i = 0; i < 3; ++i) CHECK(s3(i) == 0.0f);
  const auto r = pl::ppo_clip(pl::packed(x, cu3), pl::packed(x, cu3), pl::packed(x, cu3), pl::packed(m, cu3));
  CHECK(r.loss == 0.0f);
  CHECK(r.metrics.token_weight == 0.0f);
}

TEST_CASE("packed: every validation rule throws, naming the function, the argument and the entry", "[packed]") {
  Flat<float> x(6), g(6), g5(5);
  x.setConstant(-1.0f);
  Flat<std::uint8_t> m(6);
  m.setConstant(1);
  Flat<std::int32_t> cu(3), bad0(3), down(3), short_end(3), other(3), empty(0);
  cu.setValues({0, 2, 6});
  bad0.setValues({1, 2, 6});
  down.setValues({0, 4, 3});
  short_end.setValues({0, 2, 5});
  other.setValues({0, 3, 6});
  Flat<std::int64_t> cu64(3);
  cu64.setValues({0, 2, 6});
  const auto px = pl::packed(x, cu);
  const auto pm = pl::packed(m, cu);

  expect_throw<pl::shape_error>([&] { pl::masked_sum(pl::packed(x, bad0), pm); }, "masked_sum",
                                {"argument 'tokens' has cu_seqlens[0] = 1"});
  expect_throw<pl::shape_error>([&] { pl::masked_sum(px, pl::packed(m, down)); }, "masked_sum",
                                {"argument 'mask' has cu_seqlens[2] = 3 < cu_seqlens[1] = 4"});
  expect_throw<pl::shape_error>([&] { pl::masked_mean(pl::packed(x, short_end), pm); }, "masked_mean",
                                {"cu_seqlens[2] = 5 but 6 values"});
  expect_throw<pl::shape_error>([&] { pl::masked_sum(pl::packed(x, empty), pm); }, "masked_sum", {"no cu_seqlens"});
  // Same offsets held twice (different pointers, also of another integer type) are fine;
  // different offsets are not.
  Flat<std::int32_t> cu_copy = cu;
  CHECK(pl::masked_sum(px, pl::packed(m, cu_copy)).eval()(1) == -4.0f);
  CHECK(pl::masked_sum(px, pl::packed(m, cu64)).eval()(0) == -2.0f);
  expect_throw<pl::shape_error>([&] { pl::masked_sum(px, pl::packed(m, other)); }, "masked_sum",
                                {"argument 'mask' has cu_seqlens[1] = 3 but 'tokens' has cu_seqlens[1] = 2"});
  expect_throw<pl::shape_error>([&] { pl::ppo_clip(px, px, pl::packed(x, other), pm); }, "ppo_clip",
                                {"argument 'advantages' has cu_seqlens[1]"});
  // Packed and padded in one call.
  Tok<float> xp(2, 4);
  xp.setConstant(-1.0f);
  Tok<std::uint8_t> mp(2, 4);
  mp.setConstant(1);
  expect_throw<pl::shape_error>([&] { pl::masked_sum(px, mp); }, "masked_sum",
                                {"'mask' is padded ([2, 4]) but 'tokens' is packed"});
  expect_throw<pl::shape_error>([&] { pl::ppo_clip(xp, xp, px, mp); }, "ppo_clip", {"'advantages' is packed"});
  Flat<float> klo(6);
  expect_throw<pl::shape_error>([&] { pl::kl_estimate(px, xp, pm, pl::KlOptions{}, klo); }, "kl_estimate",
                                {"'ref_logp' is padded"});
  expect_throw<pl::shape_error>([&] { pl::masked_whiten(px, mp, klo); }, "masked_whiten",
                                {"argument 'mask' has shape [2, 4]"});

  // Outputs: checked before anything is written.
  const auto ppo = pl::ppo_clip(px, px, px, pm);
  g5.setConstant(7.0f);
  expect_throw<pl::shape_error>([&] { ppo.backward(g5); }, "ppo_clip",
                                {"argument 'grad' must have shape [6] (the inputs are packed in 2 rows), got [5]"});
  for (Index k = 0; k < 5; ++k) CHECK(g5(k) == 7.0f);
  Tok<float> g2(2, 3);
  expect_throw<pl::shape_error>([&] { ppo.backward(g2); }, "ppo_clip", {"got [2, 3]"});
  expect_throw<pl::shape_error>([&] { ppo.backward(pl::packed(g, other)); }, "ppo_clip",
                                {"argument 'grad' has cu_seqlens[1] = 3"});
  g.setConstant(7.0f);
  expect_throw<pl::shape_error>([&] { pl::ppo_clip(px, px, px, pm, pl::PpoOptions{}, g5); }, "ppo_clip",
                                {"'grad_out' must have shape [6]"});
  const auto pad = pl::ppo_clip(xp, xp, xp, mp);
  expect_throw<pl::shape_error>([&] { pad.backward(g); }, "ppo_clip", {"must have shape [2, 4], got [6]"});
  expect_throw<pl::shape_error>([&] { pad.backward(pl::packed(g, cu)); }, "ppo_clip", {"got packed [6]"});
  const auto sum = pl::masked_sum(px, pm);
  Flat<float> up(2);
  up.setConstant(1.0f);
  expect_throw<pl::shape_error>([&] { sum.backward(up, g5); }, "backward", {"argument 'grad' must have shape [6]"});
  expect_throw<pl::shape_error>([&] { pl::gae(px, px, pm, pl::GaeOptions{}, g5, g); }, "gae",
                                {"'advantages_out' must have shape [6]"});
  for (Index k = 0; k < 6; ++k) CHECK(g(k) == 7.0f);

  // seq_mean_token_sum_norm's default C (tokens per row) has no meaning for packed rows.
  pl::PpoOptions o;
  o.aggregation = pl::Aggregation::seq_mean_token_sum_norm;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(px, px, px, pm, o); }, "ppo_clip",
                                 {"option 'token_sum_norm' must be set"});
  pl::ValueOptions vo;
  vo.aggregation = pl::Aggregation::seq_mean_token_sum_norm;
  expect_throw<pl::option_error>([&] { pl::value_loss(px, px, px, pm, vo); }, "value_loss",
                                 {"option 'token_sum_norm' must be set"});
  CHECK_NOTHROW(pl::ppo_clip(xp, xp, xp, mp, o));  // padded: C = 4 tokens per row
  o.token_sum_norm = 8.0;
  CHECK_NOTHROW(pl::ppo_clip(px, px, px, pm, o));

  // A bad float weight is located as [row, token in row] and its packed index.
  Flat<float> wm(6);
  wm.setConstant(1.0f);
  wm(4) = -1.0f;
  expect_throw<pl::value_error>([&] { pl::masked_sum(px, pl::packed(wm, cu)); }, "masked_sum",
                                {"got -1 at [1, 2] (packed index 4)"});
  // Misaligned offsets.
  alignas(8) unsigned char raw[4 * sizeof(std::int32_t) + 1] = {};
  Eigen::TensorMap<const Flat<std::int32_t>> mis(reinterpret_cast<const std::int32_t*>(raw + 1), 3);
  expect_throw<pl::layout_error>([&] { pl::masked_sum(pl::packed(x, mis), pm); }, "masked_sum",
                                 {"argument 'tokens (cu_seqlens)'"});
}

}  // namespace
