// clip_cov_select, kl_cov_select, clip_cov, kl_cov (verl compute_policy_loss_clip_cov / _kl_cov):
// the losses' values and metrics against independent long-double loops of verl's formulas for a
// given selection, in every aggregation mode (selected tokens keep counting in the divisors);
// gradients against central finite differences of those loops (selection held fixed); the fused
// form against forward + backward(); NaN/inf padding (selection included); the selections against
// brute force (KL-Cov's top-k with ties to the earlier token, Clip-Cov's candidate set), their
// seeds and the uniformity of Clip-Cov's draw; empty masks, bf16 / float selections, packed
// against padded; bad input; threads; a batch of one, a single token, empty rows; shards; bf16
// and half inputs against the float call.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using rlref::ld;
using rlref::Tok;
template <class T>
using Flat = Eigen::Tensor<T, 1>;

namespace {

enum class Loss { clip_cov, kl_cov };
const Loss all_losses[] = {Loss::clip_cov, Loss::kl_cov};
const pl::Aggregation all_modes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                     pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                     pl::Aggregation::token_sum};
const char* name_of(Loss w) { return w == Loss::clip_cov ? "clip_cov" : "kl_cov"; }

/// The options of both losses; a test picks the loss.
struct Opts {
  pl::ClipCovOptions clip;
  pl::KlCovOptions kl;
};

Opts opts_for(pl::Aggregation a) {
  Opts o;
  o.clip.aggregation = o.kl.aggregation = a;
  o.clip.clip_low = 0.2;
  o.clip.clip_high = 0.28;
  o.kl.kl_coef = 0.7;  // not verl's default 1, so a coefficient left out shows
  if (a == pl::Aggregation::seq_mean_token_sum_norm) o.clip.token_sum_norm = o.kl.token_sum_norm = 40.0;
  return o;
}

template <class S, class M>
struct Case {
  Tok<S> lp, old, adv, sel;
  Tok<M> mask;
};

/// Random inputs whose ratios stay >= 1e-3 away from Clip-Cov's clip bounds 0.8 and 1.28 and
/// whose log-ratios stay >= 1e-3 away from 0 (KL-Cov's |.|), so a central difference of step
/// 1e-6 never straddles a kink. sel holds 1 at about p_sel of the valid tokens. Masked-out
/// entries of all four token tensors hold NaN/inf when poison is set.
template <class S, class M>
Case<S, M> make_case(long B, long T, unsigned seed, bool poison = true, std::vector<long> empty_rows = {},
                     double p_keep = 0.75, double spread = 0.4, double p_sel = 0.3) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> old_d(-4.0, -0.05);
  std::normal_distribution<double> ratio_d(0.0, spread), adv_d(0.0, 1.0);
  std::bernoulli_distribution sel_d(p_sel);
  Case<S, M> c{Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<M>(B, T)};
  const auto bad = [](double d) {
    const double r = std::exp(d);
    return std::fabs(r - 0.8) < 1e-3 || std::fabs(r - 1.28) < 1e-3 || std::fabs(d) < 1e-3;
  };
  long k = 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t, ++k) {
      M m = rlref::random_mask<M>(rng, p_keep);
      for (long e : empty_rows)
        if (e == i) m = M(0);
      c.mask(i, t) = m;
      double d;
      do d = ratio_d(rng);
      while (bad(d));
      const double old = old_d(rng);
      c.old(i, t) = static_cast<S>(old);
      c.lp(i, t) = static_cast<S>(old + d);
      c.adv(i, t) = static_cast<S>(adv_d(rng));
      c.sel(i, t) = sel_d(rng) ? S(1) : S(0);
      if (m == M(0) && poison) {
        c.lp(i, t) = rlref::poison<S>(k);
        c.old(i, t) = rlref::poison<S>(k + 1);
        c.adv(i, t) = rlref::poison<S>(k + 2);
        c.sel(i, t) = rlref::poison<S>(k + 3);
      }
    }
  return c;
}

/// x0 = logp, x1 = old_logp, x2 = advantages, x3 = selected.
template <class S, class M>
rlref::Data data_of(const Case<S, M>& c) {
  return rlref::to_data(c.lp, c.old, c.adv, c.mask, &c.sel);
}

// ---- the reference: plain loops over long double, straight from verl's formulas ----

/// Metrics in the order of Got::m: clip_cov {selected_fraction, clip_fraction, approx_kl,
/// ratio_mean, ratio_max, token_weight}; kl_cov {abs_kl, selected_fraction, approx_kl,
/// ratio_mean, ratio_max, token_weight}.
struct Ref {
  ld loss = 0;
  std::vector<ld> rows, tokens;
  std::array<ld, 6> m{};
};

const pl::Aggregation& mode_of(Loss which, const Opts& o) {
  return which == Loss::clip_cov ? o.clip.aggregation : o.kl.aggregation;
}

/// verl: clip_cov pg_losses = maximum(-A r, -A clamp(r, 1 - lo, 1 + hi)) * corr, corr = 0 at the
/// selected tokens; kl_cov pg_losses = -A r, replaced by -A r + coef |logp - old| at the
/// selected tokens; then agg_loss with response_mask (the selection leaves the mask alone).
Ref reference(Loss which, const rlref::Data& d, const Opts& o) {
  Ref r;
  r.tokens.assign(d.x0.size(), 0);
  const ld lo = 1 - static_cast<ld>(o.clip.clip_low), hi = 1 + static_cast<ld>(o.clip.clip_high);
  const ld coef = static_cast<ld>(o.kl.kl_coef);
  ld s0 = 0, s1 = 0, kl = 0, rs = 0, rmax = 0, w = 0;
  for (std::size_t k = 0; k < d.x0.size(); ++k) {
    if (!d.sel[k]) continue;
    const ld A = d.x2[k], dl = d.x0[k] - d.x1[k], ratio = std::exp(dl);
    const bool s = d.x3[k] != 0;
    const ld l1 = -A * ratio, l2 = -A * rlref::clampl(ratio, lo, hi);
    if (which == Loss::clip_cov) {
      r.tokens[k] = s ? 0 : std::max(l1, l2);
      s0 += d.w[k] * (s ? 1 : 0);
      s1 += d.w[k] * (l2 > l1 ? 1 : 0);  // verl clip_by_origin
    } else {
      r.tokens[k] = -A * ratio + (s ? coef * std::fabs(dl) : 0);
      s0 += d.w[k] * std::fabs(dl);
      s1 += d.w[k] * (s ? 1 : 0);
    }
    kl += d.w[k] * -dl;
    rs += d.w[k] * ratio;
    rmax = std::max(rmax, ratio);
    w += d.w[k];
  }
  const auto& opt_norm = which == Loss::clip_cov ? o.clip.token_sum_norm : o.kl.token_sum_norm;
  const auto& opt_tc = which == Loss::clip_cov ? o.clip.token_count : o.kl.token_count;
  const auto& opt_sc = which == Loss::clip_cov ? o.clip.sequence_count : o.kl.sequence_count;
  r.loss = rlref::aggregate(d, r.tokens, mode_of(which, o), opt_tc, opt_sc, opt_norm, &r.rows);
  if (w != 0) r.m = {s0 / w, s1 / w, kl / w, rs / w, rmax, w};
  return r;
}

// ---- the two losses through one interface ----

struct Got {
  double loss = 0;
  std::vector<double> losses;
  std::array<double, 6> m{};  // as Ref::m
  std::array<double, 5> sums{};
  double max = 0;
};

template <class R>
Got got_of(const R& r) {
  Got g;
  g.loss = static_cast<double>(r.loss);
  for (long i = 0; i < r.losses.dimension(0); ++i) g.losses.push_back(static_cast<double>(r.losses(i)));
  const auto& m = r.metrics;
  if constexpr (std::is_same_v<std::decay_t<decltype(m)>, pl::ClipCovMetrics<typename R::Scalar>>) {
    g.m = {static_cast<double>(m.selected_fraction), static_cast<double>(m.clip_fraction),
           static_cast<double>(m.approx_kl),         static_cast<double>(m.ratio_mean),
           static_cast<double>(m.ratio_max),         m.token_weight};
  } else {
    g.m = {static_cast<double>(m.abs_kl),    static_cast<double>(m.selected_fraction),
           static_cast<double>(m.approx_kl), static_cast<double>(m.ratio_mean),
           static_cast<double>(m.ratio_max), m.token_weight};
  }
  for (std::size_t k = 0; k < 5; ++k) g.sums[k] = r.metric_sums.sums[k];
  g.max = r.metric_sums.maxima[0];
  return g;
}

/// Runs `which` two-pass (gradient from backward() into g) and fused (into gf).
template <class LP, class OLP, class AD, class MK, class SL, class G>
std::pair<Got, Got> run(Loss which, const LP& lp, const OLP& old, const AD& adv, const MK& m, const SL& sel,
                        const Opts& o, G& g, G& gf) {
  if (which == Loss::clip_cov) {
    const auto r = pl::clip_cov(lp, old, adv, m, sel, o.clip);
    r.backward(g);
    return {got_of(r), got_of(pl::clip_cov(lp, old, adv, m, sel, o.clip, gf))};
  }
  const auto r = pl::kl_cov(lp, old, adv, m, sel, o.kl);
  r.backward(g);
  return {got_of(r), got_of(pl::kl_cov(lp, old, adv, m, sel, o.kl, gf))};
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

void check_same(const Got& a, const Got& b) {
  CHECK(same_bits(a.loss, b.loss));
  REQUIRE(a.losses.size() == b.losses.size());
  for (std::size_t i = 0; i < a.losses.size(); ++i) CHECK(same_bits(a.losses[i], b.losses[i]));
  for (std::size_t k = 0; k < a.m.size(); ++k) CHECK(same_bits(a.m[k], b.m[k]));
  for (std::size_t k = 0; k < a.sums.size(); ++k) CHECK(same_bits(a.sums[k], b.sums[k]));
  CHECK(same_bits(a.max, b.max));
}

template <class G>
long diff_bits(const G& a, const G& b) {
  REQUIRE(a.size() == b.size());
  long diff = 0;
  for (long k = 0; k < a.size(); ++k) diff += same_bits(a.data()[k], b.data()[k]) ? 0 : 1;
  return diff;
}

/// Loss and rows against the reference with tol relative to the aggregated |l| (so
/// cancellation in the sum does not shrink the bound); metrics with tol * (magnitude + 1).
void check_values(Loss which, const Got& r, const rlref::Data& d, const Opts& o, double tol) {
  const Ref e = reference(which, d, o);
  std::vector<ld> absl(e.tokens.size()), rows_abs;
  for (std::size_t k = 0; k < absl.size(); ++k) absl[k] = std::fabs(e.tokens[k]);
  const auto& opt_norm = which == Loss::clip_cov ? o.clip.token_sum_norm : o.kl.token_sum_norm;
  rlref::aggregate(d, absl, mode_of(which, o), std::nullopt, std::nullopt, opt_norm, &rows_abs);
  ld scale = 0;
  for (ld v : rows_abs) scale += v;
  CHECK(std::fabs(static_cast<ld>(r.loss) - e.loss) <= tol * (scale + 1e-300L));
  REQUIRE(static_cast<long>(r.losses.size()) == d.B);
  for (std::size_t i = 0; i < r.losses.size(); ++i)
    CHECK(std::fabs(static_cast<ld>(r.losses[i]) - e.rows[i]) <= tol * (rows_abs[i] + 1e-300L));
  for (std::size_t k = 0; k < 6; ++k) {
    CAPTURE(k, r.m[k], static_cast<double>(e.m[k]));
    CHECK(std::fabs(static_cast<ld>(r.m[k]) - e.m[k]) <= tol * (std::fabs(e.m[k]) + 1));
  }
}

/// Max |g - central difference of the reference| / max |fd| (rl_reference's token_fd_error; the
/// selection x3 stays put); masked-out tokens must be exactly 0.
template <class S>
double fd_error(Loss which, rlref::Data d, const Opts& o, const Tok<S>& g) {
  const auto r = rlref::token_fd_error(d, g, [&](const rlref::Data& x) { return reference(which, x, o).loss; });
  CHECK(r.masked_zero);
  return r.rel;
}

double worst_fd_double = 0, worst_fd_float = 0;

template <class M>
void full_check(long B, long T, unsigned seed, double spread = 0.4) {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a), sizeof(M), B, T, seed);
      const Opts o = opts_for(a);
      const auto c = make_case<double, M>(B, T, seed, true, {}, 0.75, spread);
      Tok<double> g(B, T), gf(B, T);
      g.setConstant(7);
      gf.setConstant(-7);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
      // Double evaluation of a handful of operations per token, LaneSum accumulation: far
      // below 1e-13 of sum |l| (as test_policy_losses).
      check_values(which, r, data_of(c), o, 1e-13);
      const double fd = fd_error(which, data_of(c), o, g);
      worst_fd_double = std::max(worst_fd_double, fd);
      // Central difference of step 1e-6 in long double: truncation h^2 |l'''| ~ 1e-12 of |l'|,
      // cancellation 1e-19 / 1e-6; 1e-9 as test_policy_losses.
      CHECK(fd <= 1e-9);
      check_same(r, rf);
      CHECK(diff_bits(g, gf) == 0);
    }
}

// ---- brute-force selections ----

std::vector<long> ones_of(const Tok<float>& s) {
  std::vector<long> v;
  for (long k = 0; k < s.size(); ++k)
    if (s.data()[k] != 0.f) v.push_back(k);
  return v;
}

/// Every element 0 or 1 (masked-out tokens included).
template <class T>
bool zero_one(const T& s) {
  for (long k = 0; k < s.size(); ++k) {
    const double v = static_cast<double>(s.data()[k]);
    if (v != 0.0 && v != 1.0) return false;
  }
  return true;
}

/// verl's clip_num / k_percent_nums: max(int(ratio * n), 1), in Python's doubles.
double verl_target(double ratio, double n) { return n > 0 ? std::max(std::floor(ratio * n), 1.0) : 0.0; }

struct BruteClip {
  std::vector<long> cand;  // flat positions, row-major
  ld W = 0, adv_mean = 0, logp_mean = 0, sum_abs_a = 0, sum_abs_lp = 0;
  long valid = 0;
};

/// verl's candidates: valid, not clip_by_origin, clip_cov_lb < cov < clip_cov_ub, with cov
/// centred by the mask-weighted means (masked_mean).
BruteClip brute_clip(const rlref::Data& d, const pl::ClipCovOptions& o) {
  BruteClip b;
  ld sa = 0, sl = 0;
  for (std::size_t k = 0; k < d.x0.size(); ++k) {
    if (!d.sel[k]) continue;
    ++b.valid;
    b.W += d.w[k];
    sa += d.w[k] * d.x2[k];
    sl += d.w[k] * d.x0[k];
    b.sum_abs_a += d.w[k] * std::fabs(d.x2[k]);
    b.sum_abs_lp += d.w[k] * std::fabs(d.x0[k]);
  }
  if (b.W != 0) {
    b.adv_mean = sa / b.W;
    b.logp_mean = sl / b.W;
  }
  const ld lo = 1 - static_cast<ld>(o.clip_low), hi = 1 + static_cast<ld>(o.clip_high);
  for (std::size_t k = 0; k < d.x0.size(); ++k) {
    if (!d.sel[k]) continue;
    const ld A = d.x2[k], r = std::exp(d.x0[k] - d.x1[k]);
    const bool clipped = -A * rlref::clampl(r, lo, hi) > -A * r;
    const ld cov = (A - b.adv_mean) * (d.x0[k] - b.logp_mean);
    if (!clipped && cov > o.cov_lower && cov < o.cov_upper) b.cand.push_back(static_cast<long>(k));
  }
  return b;
}

/// verl's KL-Cov choice: torch.topk of (A - mean A)(logp - mean logp) over the valid tokens
/// (plain means), ties to the earlier row-major token.
std::vector<long> brute_kl(const rlref::Data& d, double ratio, ld* adv_mean = nullptr, ld* logp_mean = nullptr) {
  std::vector<long> valid;
  ld sa = 0, sl = 0;
  for (std::size_t k = 0; k < d.x0.size(); ++k)
    if (d.sel[k]) {
      valid.push_back(static_cast<long>(k));
      sa += d.x2[k];
      sl += d.x0[k];
    }
  if (valid.empty()) return {};
  const ld n = static_cast<ld>(valid.size()), ma = sa / n, ml = sl / n;
  if (adv_mean) *adv_mean = ma;
  if (logp_mean) *logp_mean = ml;
  std::vector<std::pair<ld, long>> cov;
  for (const long k : valid) {
    const std::size_t u = static_cast<std::size_t>(k);
    cov.emplace_back((d.x2[u] - ma) * (d.x0[u] - ml), k);
  }
  std::sort(cov.begin(), cov.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  const std::size_t take = static_cast<std::size_t>(verl_target(ratio, static_cast<double>(valid.size())));
  std::vector<long> out;
  for (std::size_t j = 0; j < take; ++j) out.push_back(cov[j].second);
  std::sort(out.begin(), out.end());
  return out;
}

void check_same_selection(const pl::CovSelection& a, const pl::CovSelection& b) {
  CHECK(same_bits(a.valid_tokens, b.valid_tokens));
  CHECK(same_bits(a.mask_weight, b.mask_weight));
  CHECK(same_bits(a.adv_mean, b.adv_mean));
  CHECK(same_bits(a.logp_mean, b.logp_mean));
  CHECK(same_bits(a.candidates, b.candidates));
  CHECK(same_bits(a.target, b.target));
  CHECK(same_bits(a.selected, b.selected));
}

}  // namespace

// ---- 1, 2: values, metrics, gradients ----

TEST_CASE("clip_cov, kl_cov match verl's formulas and finite differences in every mode", "[cov]") {
  full_check<std::uint8_t>(5, 37, 1);
  full_check<float>(4, 29, 2);
  full_check<bool>(3, 16, 3);
  full_check<double>(6, 9, 4);
  // Wide log-ratios: many tokens clipped on both sides.
  full_check<std::uint8_t>(4, 50, 5, 2.0);
  WARN("worst |grad - FD| / max |FD|, double: " << worst_fd_double);
  CHECK(worst_fd_double > 0);  // the FD was taken
}

TEST_CASE("clip_cov, kl_cov: float inputs agree with the long-double reference and its FD", "[cov]") {
  for (const Loss which : all_losses)
    for (const auto a : all_modes)
      for (const bool float_mask : {false, true}) {
        CAPTURE(name_of(which), static_cast<int>(a), float_mask);
        const Opts o = opts_for(a);
        const long B = 5, T = 131;
        Tok<float> g(B, T), gf(B, T);
        Got r, rf;
        rlref::Data d;
        if (float_mask) {
          const auto c = make_case<float, float>(B, T, 6);
          std::tie(r, rf) = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
          d = data_of(c);
        } else {
          const auto c = make_case<float, std::uint8_t>(B, T, 6);
          std::tie(r, rf) = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
          d = data_of(c);
        }
        // LaneSum's float accumulation is within 4.2e-7 of sum |x|; the per-token evaluation
        // within a few ulp (6e-8 each): 2e-6 as test_policy_losses.
        check_values(which, r, d, o, 2e-6);
        check_same(r, rf);
        CHECK(diff_bits(g, gf) == 0);
        const double fd = fd_error(which, d, o, g);
        worst_fd_float = std::max(worst_fd_float, fd);
        // The float gradient is -A r (+ coef sign) times the row scale: exp's few ulp and three
        // roundings of 6e-8 each, about 3e-7 of |grad|; the FD of the long-double reference is
        // exact to 1e-12 by comparison.
        CHECK(fd <= 1e-6);
      }
  WARN("worst |grad - FD| / max |FD|, float: " << worst_fd_float);
  CHECK(worst_fd_float > 0);
}

TEST_CASE("clip_cov, kl_cov: selected tokens keep their place in the divisors (closed form)", "[cov]") {
  // One row of four valid tokens, logp = old (r = 1, inside every clip): l = -A except where
  // selected. token_mean divides by 4 whatever the selection.
  Tok<double> lp(1, 4), old(1, 4), adv(1, 4), sel(1, 4), g(1, 4);
  Tok<std::uint8_t> m(1, 4);
  m.setConstant(1);
  lp.setConstant(-1.0);
  old.setConstant(-1.0);
  const double A[] = {1.0, 2.0, -1.0, 0.5};
  for (long t = 0; t < 4; ++t) adv(0, t) = A[t];
  sel.setZero();
  sel(0, 1) = 1.0;
  pl::ClipCovOptions co;
  const auto rc = pl::clip_cov(lp, old, adv, m, sel, co);
  CHECK(rc.loss == (-1.0 + 1.0 - 0.5) / 4);
  CHECK(rc.metrics.selected_fraction == 0.25);
  CHECK(rc.metrics.clip_fraction == 0.0);
  rc.backward(g);
  CHECK(g(0, 0) == -0.25);
  CHECK(g(0, 1) == 0.0);
  CHECK(g(0, 2) == 0.25);
  CHECK(g(0, 3) == -0.125);
  // Any nonzero marks a token as selected (s = [selected != 0]).
  sel(0, 1) = -3.5;
  CHECK(pl::clip_cov(lp, old, adv, m, sel, co).loss == (-1.0 + 1.0 - 0.5) / 4);
  // KL-Cov: the selected token 1 has logp - old = 0.5: l_1 = -2 e^0.5 + 0.7 * 0.5, d/dlogp
  // -2 e^0.5 + 0.7; token 2 is selected with logp = old: torch's abs gives sign(0) = 0.
  lp(0, 1) = -0.5;
  sel.setZero();
  sel(0, 1) = 1.0;
  sel(0, 2) = 1.0;
  pl::KlCovOptions ko;
  ko.kl_coef = 0.7;
  const auto rk = pl::kl_cov(lp, old, adv, m, sel, ko);
  const double e = std::exp(0.5);
  CHECK(rk.loss == Approx((-1.0 + (-2.0 * e + 0.35) + 1.0 - 0.5) / 4).epsilon(1e-15));
  CHECK(rk.metrics.abs_kl == Approx(0.5 / 4).epsilon(1e-15));
  CHECK(rk.metrics.selected_fraction == 0.5);
  rk.backward(g);
  CHECK(g(0, 0) == -0.25);
  CHECK(g(0, 1) == Approx((-2.0 * e + 0.7) / 4).epsilon(1e-15));
  CHECK(g(0, 2) == 0.25);
  CHECK(g(0, 3) == -0.125);
  // seq_mean_token_mean: a row whose every token is selected contributes 0 and still counts
  // in the batch's row count.
  Tok<double> lp2(2, 4), old2(2, 4), adv2(2, 4), sel2(2, 4);
  Tok<std::uint8_t> m2(2, 4);
  m2.setConstant(1);
  lp2.setConstant(-1.0);
  old2.setConstant(-1.0);
  for (long t = 0; t < 4; ++t) adv2(0, t) = adv2(1, t) = A[t];
  sel2.setZero();
  for (long t = 0; t < 4; ++t) sel2(0, t) = 1.0;
  co.aggregation = pl::Aggregation::seq_mean_token_mean;
  const auto r2 = pl::clip_cov(lp2, old2, adv2, m2, sel2, co);
  CHECK(r2.losses(0) == 0.0);
  CHECK(r2.loss == Approx((-1.0 - 2.0 + 1.0 - 0.5) / 4 / 2).epsilon(1e-15));
}

TEST_CASE("clip_cov follows torch's clamp and maximum at and beyond the clip bounds", "[cov]") {
  // clip_low = clip_high = 0: lo = hi = 1. Token 0: r = 1 on both bounds, l1 == l2, the
  // gradient -A r / 4 (clamp passes on [lo, hi]). Token 1: A > 0, r = e^0.25 > hi: the clipped
  // branch -A hi is the larger, gradient 0, clipped. Token 2: A > 0, r = e^-0.25 < lo: the
  // unclipped branch is the larger, gradient -A r / 4. Token 3: A < 0, r > hi: -A r is the
  // larger, gradient -A r / 4.
  Tok<double> lp(1, 4), old(1, 4), adv(1, 4), sel(1, 4), g(1, 4);
  Tok<std::uint8_t> m(1, 4);
  m.setConstant(1);
  old.setConstant(-2.0);
  const double dl[] = {0.0, 0.25, -0.25, 0.25}, A[] = {0.5, 1.5, 1.5, -2.0};
  for (long t = 0; t < 4; ++t) {
    lp(0, t) = -2.0 + dl[t];
    adv(0, t) = A[t];
  }
  sel.setZero();
  pl::ClipCovOptions co;
  co.clip_low = 0.0;
  co.clip_high = 0.0;
  const auto r = pl::clip_cov(lp, old, adv, m, sel, co);
  r.backward(g);
  CHECK(g(0, 0) == -0.5 / 4);
  CHECK(g(0, 1) == 0.0);
  CHECK(g(0, 2) == Approx(-1.5 * std::exp(-0.25) / 4).epsilon(1e-15));
  CHECK(g(0, 3) == Approx(2.0 * std::exp(0.25) / 4).epsilon(1e-15));
  CHECK(r.metrics.clip_fraction == 0.25);
  CHECK(r.loss == Approx((-0.5 - 1.5 * 1.0 - 1.5 * std::exp(-0.25) + 2.0 * std::exp(0.25)) / 4).epsilon(1e-15));
  CHECK(r.metrics.ratio_max == Approx(std::exp(0.25)).epsilon(1e-15));
  CHECK(r.metrics.approx_kl == Approx(-0.25 / 4).epsilon(1e-14));
}

// ---- 3: masked-out inf/NaN ----

TEMPLATE_TEST_CASE("clip_cov, kl_cov and the selections: masked-out inf/NaN never influence anything", "[cov]", float,
                   double) {
  using S = TestType;
  const long B = 4, T = 45;
  const auto poisoned = make_case<S, float>(B, T, 7, true, {2});
  const auto clean = make_case<S, float>(B, T, 7, false, {2});
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<S> gp(B, T), gc(B, T), gfp(B, T), gfc(B, T);
      const auto [rp, rfp] =
          run(which, poisoned.lp, poisoned.old, poisoned.adv, poisoned.mask, poisoned.sel, o, gp, gfp);
      const auto [rc, rfc] = run(which, clean.lp, clean.old, clean.adv, clean.mask, clean.sel, o, gc, gfc);
      CHECK(std::isfinite(rp.loss));
      check_same(rp, rc);
      check_same(rfp, rc);
      CHECK(diff_bits(gp, gc) == 0);
      CHECK(diff_bits(gfp, gc) == 0);
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < T; ++t)
          if (poisoned.mask(i, t) == 0.0f) CHECK(gp(i, t) == S(0));
    }
  // The selections read nothing at masked-out tokens either.
  pl::ClipCovOptions co;
  co.cov_ratio = 0.05;
  co.cov_lower = 0.2;
  co.cov_upper = 3.0;
  Tok<S> sp(B, T), sc(B, T);
  sp.setConstant(S(7));
  sc.setConstant(S(-7));
  const auto csp = pl::clip_cov_select(poisoned.lp, poisoned.old, poisoned.adv, poisoned.mask, co, sp);
  const auto csc = pl::clip_cov_select(clean.lp, clean.old, clean.adv, clean.mask, co, sc);
  check_same_selection(csp, csc);
  CHECK(csp.selected > 1);
  CHECK(diff_bits(sp, sc) == 0);
  pl::KlCovOptions ko;
  ko.cov_ratio = 0.05;
  const auto ksp = pl::kl_cov_select(poisoned.lp, poisoned.adv, poisoned.mask, ko, sp);
  const auto ksc = pl::kl_cov_select(clean.lp, clean.adv, clean.mask, ko, sc);
  check_same_selection(ksp, ksc);
  CHECK(ksp.selected > 1);
  CHECK(diff_bits(sp, sc) == 0);
}

// ---- 4: selections ----

TEST_CASE("kl_cov_select is verl's top-k of the covariance over valid tokens, ties to the earlier token", "[cov]") {
  for (const bool float_mask : {false, true})
    for (const double ratio : {2e-4, 0.05, 0.3, 0.77, 1.0}) {
      CAPTURE(float_mask, ratio);
      const long B = 7, T = 53;
      rlref::Data d;
      Tok<float> out(B, T);
      out.setConstant(7.f);
      pl::KlCovOptions ko;
      ko.cov_ratio = ratio;
      pl::CovSelection s;
      if (float_mask) {
        const auto c = make_case<double, float>(B, T, 81);
        Tok<float> lp = c.lp.cast<float>(), adv = c.adv.cast<float>();
        s = pl::kl_cov_select(lp, adv, c.mask, ko, out);
        d = rlref::to_data(lp, lp, adv, c.mask, static_cast<const Tok<float>*>(nullptr));
      } else {
        const auto c = make_case<double, std::uint8_t>(B, T, 82);
        Tok<float> lp = c.lp.cast<float>(), adv = c.adv.cast<float>();
        s = pl::kl_cov_select(lp, adv, c.mask, ko, out);
        d = rlref::to_data(lp, lp, adv, c.mask, static_cast<const Tok<float>*>(nullptr));
      }
      ld ma = 0, ml = 0;
      const std::vector<long> want = brute_kl(d, ratio, &ma, &ml);
      CHECK(zero_one(out));
      CHECK(ones_of(out) == want);
      long valid = 0;
      ld W = 0, abs_a = 0, abs_lp = 0;
      for (std::size_t k = 0; k < d.x0.size(); ++k)
        if (d.sel[k]) {
          ++valid;
          W += d.w[k];
          abs_a += std::fabs(d.x2[k]);
          abs_lp += std::fabs(d.x0[k]);
        }
      CHECK(s.valid_tokens == static_cast<double>(valid));
      CHECK(s.candidates == static_cast<double>(valid));
      CHECK(s.target == verl_target(ratio, static_cast<double>(valid)));
      CHECK(s.selected == static_cast<double>(want.size()));
      // Recursive summation in double: |error| <= n u sum |x| (u = 2^-53), then one division.
      const ld u = std::ldexp(1.0L, -53), n = static_cast<ld>(valid);
      CHECK(std::fabs(static_cast<ld>(s.mask_weight) - W) <= n * u * W);
      CHECK(std::fabs(static_cast<ld>(s.adv_mean) - ma) <= (n + 1) * u * abs_a / n);
      CHECK(std::fabs(static_cast<ld>(s.logp_mean) - ml) <= (n + 1) * u * abs_lp / n);
    }
  // Ties: every valid token takes one of three (A, logp) pairs, so cov takes three values and
  // the k-th largest is shared by many tokens; the earlier row-major ones win.
  const long B = 5, T = 17;
  auto c = make_case<double, std::uint8_t>(B, T, 83);
  const double pa[] = {1.0, -1.0, 0.25}, pl_[] = {-1.0, -3.0, -2.5};
  long k = 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t, ++k)
      if (c.mask(i, t)) {
        c.adv(i, t) = pa[k % 3];
        c.lp(i, t) = pl_[k % 3];
      }
  for (const double ratio : {0.1, 0.25, 0.5, 0.9}) {
    CAPTURE(ratio);
    Tok<double> out(B, T);
    pl::KlCovOptions ko;
    ko.cov_ratio = ratio;
    const auto s = pl::kl_cov_select(c.lp, c.adv, c.mask, ko, out);
    std::vector<long> got;
    for (long j = 0; j < out.size(); ++j)
      if (out.data()[j] != 0.0) got.push_back(j);
    CHECK(got == brute_kl(data_of(c), ratio));
    CHECK(s.selected == static_cast<double>(got.size()));
  }
}

TEST_CASE("clip_cov_select chooses among verl's candidates: all of them, or min(target, candidates)", "[cov]") {
  for (const bool float_mask : {false, true})
    for (const auto& [lower, upper] : {std::pair<double, double>{1.0, 5.0}, {-0.5, 0.5}, {0.2, 3.0}}) {
      CAPTURE(float_mask, lower, upper);
      const long B = 7, T = 53;
      rlref::Data d;
      pl::ClipCovOptions co;
      co.clip_low = 0.2;
      co.clip_high = 0.28;
      co.cov_lower = lower;
      co.cov_upper = upper;
      co.seed = 12345;
      Tok<double> lp, old, adv;
      Tok<float> fm;
      Tok<std::uint8_t> bm;
      if (float_mask) {
        const auto c = make_case<double, float>(B, T, 91);
        lp = c.lp;
        old = c.old;
        adv = c.adv;
        fm = c.mask;
        d = rlref::to_data(lp, old, adv, fm, static_cast<const Tok<double>*>(nullptr));
      } else {
        const auto c = make_case<double, std::uint8_t>(B, T, 92);
        lp = c.lp;
        old = c.old;
        adv = c.adv;
        bm = c.mask;
        d = rlref::to_data(lp, old, adv, bm, static_cast<const Tok<double>*>(nullptr));
      }
      const auto select = [&](double ratio, Tok<float>& out) {
        pl::ClipCovOptions o = co;
        o.cov_ratio = ratio;
        out.setConstant(7.f);
        return float_mask ? pl::clip_cov_select(lp, old, adv, fm, o, out)
                          : pl::clip_cov_select(lp, old, adv, bm, o, out);
      };
      const BruteClip b = brute_clip(d, co);
      REQUIRE(b.cand.size() >= 8);  // the case is meant to have several candidates
      // The summary.
      Tok<float> out(B, T);
      const auto all = select(1.0, out);
      const ld u = std::ldexp(1.0L, -53), n = static_cast<ld>(b.valid);
      CHECK(all.valid_tokens == static_cast<double>(b.valid));
      CHECK(std::fabs(static_cast<ld>(all.mask_weight) - b.W) <= n * u * b.W);  // recursive summation
      // sum w x in double (a product and a sum per token) over the weight sum: (n + 2) u sum |w x|.
      CHECK(std::fabs(static_cast<ld>(all.adv_mean) - b.adv_mean) <= (n + 3) * u * b.sum_abs_a / b.W);
      CHECK(std::fabs(static_cast<ld>(all.logp_mean) - b.logp_mean) <= (n + 3) * u * b.sum_abs_lp / b.W);
      CHECK(all.candidates == static_cast<double>(b.cand.size()));
      // cov_ratio 1: every candidate (the target, floor(W), is at least the candidates).
      CHECK(all.target == verl_target(1.0, static_cast<double>(b.W)));
      REQUIRE(all.target >= all.candidates);
      CHECK(all.selected == all.candidates);
      CHECK(zero_one(out));
      CHECK(ones_of(out) == b.cand);
      // A ratio whose target is below the candidates: exactly target of them; and one above:
      // all of them again.
      for (const double ratio : {2e-4, 0.004, 0.01, 0.6}) {
        CAPTURE(ratio);
        const auto s = select(ratio, out);
        const double target = verl_target(ratio, static_cast<double>(b.W));
        CHECK(s.target == target);
        CHECK(s.candidates == static_cast<double>(b.cand.size()));
        const std::size_t want = static_cast<std::size_t>(std::min(target, static_cast<double>(b.cand.size())));
        CHECK(s.selected == static_cast<double>(want));
        CHECK(zero_one(out));
        const std::vector<long> got = ones_of(out);
        CHECK(got.size() == want);
        for (const long k : got) CHECK(std::binary_search(b.cand.begin(), b.cand.end(), k));
      }
    }
}

TEST_CASE("clip_cov_select: a seed gives one selection, other seeds others", "[cov]") {
  const long B = 6, T = 40;
  const auto c = make_case<double, std::uint8_t>(B, T, 101);
  pl::ClipCovOptions co;
  co.cov_lower = -0.5;
  co.cov_upper = 0.5;
  co.cov_ratio = 0.05;
  const BruteClip b = brute_clip(data_of(c), co);
  REQUIRE(b.cand.size() >= 20);
  std::set<std::vector<long>> seen;
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    CAPTURE(seed);
    co.seed = seed;
    Tok<float> a(B, T), again(B, T);
    const auto sa = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, a);
    const auto s2 = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, again);
    REQUIRE(sa.selected >= 5);
    CHECK(diff_bits(a, again) == 0);
    check_same_selection(sa, s2);
    seen.insert(ones_of(a));
  }
  // Twenty draws of >= 5 of >= 20 candidates (>= 15504 subsets): a repeat would mean the seed
  // is not used.
  CHECK(seen.size() == 20);
  // A seed with all bits set works as any other.
  co.seed = ~std::uint64_t{0};
  Tok<float> a(B, T);
  CHECK(pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, a).selected ==
        verl_target(0.05, static_cast<double>(b.valid)));
}

TEST_CASE("clip_cov_select draws uniformly: 3 of 10 candidates over 4000 seeds", "[cov]") {
  // Ten valid tokens, logp = old (r = 1: never clipped), A = +-1 and logp = -1 / -3 with the
  // same sign pattern: the means are 0 and -2, every cov is exactly 1, inside (0.5, 2).
  Tok<double> lp(1, 10), adv(1, 10);
  Tok<std::uint8_t> m(1, 10);
  m.setConstant(1);
  for (long t = 0; t < 10; ++t) {
    adv(0, t) = t % 2 ? -1.0 : 1.0;
    lp(0, t) = t % 2 ? -3.0 : -1.0;
  }
  pl::ClipCovOptions co;
  co.cov_lower = 0.5;
  co.cov_upper = 2.0;
  co.cov_ratio = 0.35;  // floor(3.5) = 3
  const int N = 4000;
  std::array<int, 10> count{};
  std::vector<int> subsets(1024, 0);
  bool all_three = true;
  Tok<double> out(1, 10);
  for (int s = 0; s < N; ++s) {
    co.seed = static_cast<std::uint64_t>(s);
    const auto sel = pl::clip_cov_select(lp, lp, adv, m, co, out);
    all_three = all_three && sel.candidates == 10 && sel.selected == 3;
    int bits = 0, ones = 0;
    for (long t = 0; t < 10; ++t)
      if (out(0, t) != 0.0) {
        ++count[static_cast<std::size_t>(t)];
        bits |= 1 << t;
        ++ones;
      }
    all_three = all_three && ones == 3;
    ++subsets[static_cast<std::size_t>(bits)];
  }
  CHECK(all_three);
  // Each candidate is in a uniform 3-subset with p = 0.3: its count is Binomial(4000, 0.3),
  // mean 1200, sd sqrt(4000 * 0.3 * 0.7) = 29.0; 5 sd either side.
  const double mean = N * 0.3, sd = std::sqrt(N * 0.3 * 0.7);
  for (std::size_t t = 0; t < 10; ++t) {
    CAPTURE(t, count[t]);
    CHECK(std::fabs(count[t] - mean) <= 5 * sd);
  }
  // The 120 subsets: chi-square with 119 degrees of freedom (mean 119, sd sqrt(238) = 15.4),
  // expected 33.3 per subset; below mean + 5 sd, and every subset drawn at least once.
  double chi2 = 0;
  int drawn = 0;
  const double e = N / 120.0;
  for (int bits = 0; bits < 1024; ++bits) {
    int pop = 0;
    for (int t = 0; t < 10; ++t) pop += (bits >> t) & 1;
    if (pop != 3) continue;
    const double o = subsets[static_cast<std::size_t>(bits)];
    chi2 += (o - e) * (o - e) / e;
    drawn += o > 0 ? 1 : 0;
  }
  CAPTURE(chi2);
  CHECK(drawn == 120);
  CHECK(chi2 <= 119 + 5 * std::sqrt(238.0));
}

TEST_CASE("clip_cov_select, kl_cov_select: no valid token selects nothing", "[cov]") {
  const auto c = make_case<float, std::uint8_t>(3, 10, 12, true, {0, 1, 2});
  Tok<float> out(3, 10);
  out.setConstant(7.f);
  const auto cs = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, pl::ClipCovOptions{}, out);
  for (const double v :
       {cs.valid_tokens, cs.mask_weight, cs.adv_mean, cs.logp_mean, cs.candidates, cs.target, cs.selected})
    CHECK(v == 0.0);
  CHECK(ones_of(out).empty());
  CHECK(zero_one(out));
  out.setConstant(7.f);
  const auto ks = pl::kl_cov_select(c.lp, c.adv, c.mask, pl::KlCovOptions{}, out);
  for (const double v :
       {ks.valid_tokens, ks.mask_weight, ks.adv_mean, ks.logp_mean, ks.candidates, ks.target, ks.selected})
    CHECK(v == 0.0);
  CHECK(ones_of(out).empty());
  CHECK(zero_one(out));
  // A float mask of zeros too.
  Tok<double> fm(3, 10);
  fm.setZero();
  out.setConstant(7.f);
  Tok<float> cov_lp = c.lp;
  CHECK(pl::kl_cov_select(cov_lp, c.adv, fm, pl::KlCovOptions{}, out).target == 0.0);
  CHECK(ones_of(out).empty());
  // A [0, T] batch: nothing to select, no error.
  Tok<float> e0(0, 5), o0(0, 5);
  Tok<std::uint8_t> m0(0, 5);
  CHECK(pl::clip_cov_select(e0, e0, e0, m0, pl::ClipCovOptions{}, o0).target == 0.0);
  CHECK(pl::kl_cov_select(e0, e0, m0, pl::KlCovOptions{}, o0).selected == 0.0);
  // The losses on it: every output 0, nothing NaN, the gradient overwritten with 0.
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<float> g(3, 10), gf(3, 10);
      g.setConstant(5.f);
      gf.setConstant(5.f);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
      for (const Got* x : {&r, &rf}) {
        CHECK(x->loss == 0.0);
        for (const double v : x->m) CHECK(v == 0.0);
      }
      long nonzero = 0;
      for (long k = 0; k < g.size(); ++k) nonzero += (g.data()[k] != 0.f || gf.data()[k] != 0.f) ? 1 : 0;
      CHECK(nonzero == 0);
    }
}

TEST_CASE("clip_cov_select, kl_cov_select: bf16 and float outputs, packed input as padded", "[cov][packed][lowp]") {
  const long B = 6, T = 45;
  const auto c = make_case<float, std::uint8_t>(B, T, 111);
  pl::ClipCovOptions co;
  co.cov_lower = 0.2;
  co.cov_upper = 3.0;
  co.cov_ratio = 0.05;
  co.seed = 9;
  pl::KlCovOptions ko;
  ko.cov_ratio = 0.05;
  ko.kl_coef = 0.7;
  Tok<float> sf(B, T), kf(B, T);
  Tok<Eigen::bfloat16> sb(B, T), kb(B, T);
  sb.setConstant(Eigen::bfloat16(7.f));
  kb.setConstant(Eigen::bfloat16(7.f));
  const auto csf = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, sf);
  const auto csb = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, sb);
  const auto ksf = pl::kl_cov_select(c.lp, c.adv, c.mask, ko, kf);
  const auto ksb = pl::kl_cov_select(c.lp, c.adv, c.mask, ko, kb);
  check_same_selection(csf, csb);
  check_same_selection(ksf, ksb);
  CHECK(csf.selected >= 2);
  CHECK(ksf.selected >= 2);
  CHECK(zero_one(sb));
  CHECK(zero_one(kb));
  long diff = 0;
  for (long k = 0; k < sf.size(); ++k) {
    diff += static_cast<float>(sb.data()[k]) == sf.data()[k] ? 0 : 1;
    diff += static_cast<float>(kb.data()[k]) == kf.data()[k] ? 0 : 1;
  }
  CHECK(diff == 0);
  // A bf16 selection in a float call (a mixed call, in float) drops / penalizes the same
  // tokens: against the float selection, within the lowp path's regrouped float accumulation
  // (8.4e-7 of sum |l|, as test_policy_losses), the gradient within one float rounding chain.
  for (const Loss which : all_losses) {
    CAPTURE(name_of(which));
    Opts o = opts_for(pl::Aggregation::token_mean);
    o.clip = co;
    o.kl = ko;
    Tok<float> g(B, T), gf(B, T), g16(B, T), gf16(B, T);
    const Tok<float>& selF = which == Loss::clip_cov ? sf : kf;
    const Tok<Eigen::bfloat16>& sel16 = which == Loss::clip_cov ? sb : kb;
    const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, selF, o, g, gf);
    const auto [r16, rf16] = run(which, c.lp, c.old, c.adv, c.mask, sel16, o, g16, gf16);
    check_same(r16, rf16);
    CHECK(diff_bits(g16, gf16) == 0);
    double mag = 0;
    for (const double v : r.losses) mag += std::fabs(v);
    CHECK(std::fabs(r16.loss - r.loss) <= 8.4e-7 * mag + 1e-30);
    CHECK(r16.m[which == Loss::clip_cov ? 0 : 1] == r.m[which == Loss::clip_cov ? 0 : 1]);  // selected_fraction
    // A token's gradient is its row scale (from the mask alone) times the same float kernel on
    // the same float values: the same bits.
    CHECK(diff_bits(g16, g) == 0);
  }

  // Packed: rows of different lengths, padding masked out; the same candidates in the same
  // order, so the same selection and summary bits, and the losses on it are the padded bits.
  const std::vector<long> len = {17, 0, 1, 45, 3, 33};
  auto p = make_case<float, std::uint8_t>(B, T, 112);
  for (long i = 0; i < B; ++i)
    for (long t = len[static_cast<std::size_t>(i)]; t < T; ++t) {
      p.mask(i, t) = 0;
      p.lp(i, t) = p.old(i, t) = p.adv(i, t) = p.sel(i, t) = std::numeric_limits<float>::quiet_NaN();
    }
  Flat<std::int64_t> cu(B + 1);
  cu(0) = 0;
  for (long i = 0; i < B; ++i) cu(i + 1) = cu(i) + len[static_cast<std::size_t>(i)];
  const long N = cu(B);
  Flat<float> lp(N), old(N), adv(N);
  Flat<std::uint8_t> m(N);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < len[static_cast<std::size_t>(i)]; ++t) {
      const long k = cu(i) + t;
      lp(k) = p.lp(i, t);
      old(k) = p.old(i, t);
      adv(k) = p.adv(i, t);
      m(k) = p.mask(i, t);
    }
  const auto same_tokens = [&](const Tok<float>& padded, const Flat<float>& packed) {
    long d = 0;
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T; ++t) {
        const float want = padded(i, t);
        if (t < len[static_cast<std::size_t>(i)])
          d += same_bits(packed(cu(i) + t), want) ? 0 : 1;
        else
          d += want == 0.f ? 0 : 1;  // padding is never selected
      }
    return d;
  };
  Tok<float> ps(B, T), pk(B, T);
  Flat<float> qs(N), qk(N), qs2(N);
  const auto pcs = pl::clip_cov_select(p.lp, p.old, p.adv, p.mask, co, ps);
  const auto qcs =
      pl::clip_cov_select(pl::packed(lp, cu), pl::packed(old, cu), pl::packed(adv, cu), pl::packed(m, cu), co, qs);
  pl::clip_cov_select(pl::packed(lp, cu), pl::packed(old, cu), pl::packed(adv, cu), pl::packed(m, cu), co,
                      pl::packed(qs2, cu));
  const auto pks = pl::kl_cov_select(p.lp, p.adv, p.mask, ko, pk);
  const auto qks = pl::kl_cov_select(pl::packed(lp, cu), pl::packed(adv, cu), pl::packed(m, cu), ko, qk);
  check_same_selection(pcs, qcs);
  check_same_selection(pks, qks);
  CHECK(pcs.selected >= 2);
  CHECK(pks.selected >= 2);
  CHECK(same_tokens(ps, qs) == 0);
  CHECK(same_tokens(ps, qs2) == 0);
  CHECK(same_tokens(pk, qk) == 0);
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      Opts o = opts_for(a);
      Tok<float> g(B, T), gf(B, T);
      Flat<float> pg(N), pgf(N);
      const Tok<float>& padded_sel = which == Loss::clip_cov ? ps : pk;
      const Flat<float>& packed_sel = which == Loss::clip_cov ? qs : qk;
      const auto [r, rf] = run(which, p.lp, p.old, p.adv, p.mask, padded_sel, o, g, gf);
      const auto [q, qf] = run(which, pl::packed(lp, cu), pl::packed(old, cu), pl::packed(adv, cu), pl::packed(m, cu),
                               pl::packed(packed_sel, cu), o, pg, pgf);
      check_same(q, r);
      check_same(qf, r);
      long diff2 = 0;
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < len[static_cast<std::size_t>(i)]; ++t) {
          diff2 += same_bits(pg(cu(i) + t), g(i, t)) ? 0 : 1;
          diff2 += same_bits(pgf(cu(i) + t), g(i, t)) ? 0 : 1;
        }
      CHECK(diff2 == 0);
    }
}

// ---- 5: errors ----

TEST_CASE("clip_cov_select, kl_cov_select, clip_cov, kl_cov reject bad input and write nothing", "[cov]") {
  const auto c = make_case<float, std::uint8_t>(2, 5, 61, false, {}, 1.0);
  Tok<float> out(2, 5), g(2, 5), wrong(2, 6), out_wrong(3, 5), g_wrong(2, 4);
  wrong.setZero();
  Tok<std::uint8_t> wrong_m(1, 5);
  wrong_m.setConstant(1);
  const auto reset = [&] {
    out.setConstant(7.f);
    g.setConstant(-42.f);
  };
  const auto untouched = [&] {
    long bad = 0;
    for (long k = 0; k < out.size(); ++k) bad += (out.data()[k] == 7.f && g.data()[k] == -42.f) ? 0 : 1;
    CHECK(bad == 0);
  };
  reset();
  const double qnan = std::numeric_limits<double>::quiet_NaN(), pinf = std::numeric_limits<double>::infinity();

  // Options of the selections.
  const auto clip_sel_bad = [&](pl::ClipCovOptions bad, const char* name, const char* value) {
    expect_throw<pl::option_error>([&] { pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, bad, out); },
                                   "clip_cov_select", {std::string("'") + name + "'", value});
    untouched();
  };
  const auto kl_sel_bad = [&](pl::KlCovOptions bad, const char* name, const char* value) {
    expect_throw<pl::option_error>([&] { pl::kl_cov_select(c.lp, c.adv, c.mask, bad, out); }, "kl_cov_select",
                                   {std::string("'") + name + "'", value});
    untouched();
  };
  for (const auto& [ratio, text] :
       {std::pair<double, const char*>{0.0, "got 0"}, {1.5, "got 1.5"}, {qnan, "nan"}, {-0.1, "got -0.1"}}) {
    pl::ClipCovOptions cb;
    cb.cov_ratio = ratio;
    clip_sel_bad(cb, "cov_ratio", text);
    pl::KlCovOptions kb;
    kb.cov_ratio = ratio;
    kl_sel_bad(kb, "cov_ratio", text);
  }
  pl::ClipCovOptions cb;
  cb.cov_lower = 2.0;
  cb.cov_upper = 2.0;
  clip_sel_bad(cb, "cov_upper", "got 2");
  cb = {};
  cb.cov_upper = 0.5;  // below the default cov_lower 1
  clip_sel_bad(cb, "cov_upper", "got 0.5");
  cb = {};
  cb.cov_upper = pinf;
  clip_sel_bad(cb, "cov_upper", "got inf");
  cb = {};
  cb.cov_lower = qnan;
  clip_sel_bad(cb, "cov_lower", "nan");
  cb = {};
  cb.cov_lower = -pinf;
  clip_sel_bad(cb, "cov_lower", "got -inf");
  cb = {};
  cb.clip_low = 1.5;
  clip_sel_bad(cb, "clip_low", "got 1.5");
  cb = {};
  cb.clip_low = -0.1;
  clip_sel_bad(cb, "clip_low", "got -0.1");
  cb = {};
  cb.clip_high = -1e-9;
  clip_sel_bad(cb, "clip_high", "got -1e-09");
  cb = {};
  cb.clip_high = pinf;
  clip_sel_bad(cb, "clip_high", "got inf");

  // Non-finite values at a valid token, named with their position.
  for (const float bad_v : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const std::string v = std::isnan(bad_v) ? "nan" : "inf";
    auto x = c;
    x.lp(1, 3) = bad_v;
    expect_throw<pl::value_error>([&] { pl::clip_cov_select(x.lp, x.old, x.adv, x.mask, pl::ClipCovOptions{}, out); },
                                  "clip_cov_select", {"'logp'", "[1, 3]", v});
    untouched();
    expect_throw<pl::value_error>([&] { pl::kl_cov_select(x.lp, x.adv, x.mask, pl::KlCovOptions{}, out); },
                                  "kl_cov_select", {"'logp'", "[1, 3]", v});
    untouched();
    x = c;
    x.old(0, 4) = bad_v;
    expect_throw<pl::value_error>([&] { pl::clip_cov_select(x.lp, x.old, x.adv, x.mask, pl::ClipCovOptions{}, out); },
                                  "clip_cov_select", {"'old_logp'", "[0, 4]", v});
    untouched();
    x = c;
    x.adv(1, 0) = -bad_v;
    expect_throw<pl::value_error>([&] { pl::clip_cov_select(x.lp, x.old, x.adv, x.mask, pl::ClipCovOptions{}, out); },
                                  "clip_cov_select", {"'advantages'", "[1, 0]"});
    untouched();
    expect_throw<pl::value_error>([&] { pl::kl_cov_select(x.lp, x.adv, x.mask, pl::KlCovOptions{}, out); },
                                  "kl_cov_select", {"'advantages'", "[1, 0]"});
    untouched();
  }
  // Packed input: the row, the position in it and the packed index.
  {
    Flat<float> plp(10), padv(10), pold(10), pout(10);
    Flat<std::uint8_t> pm(10);
    Flat<std::int64_t> cu(3);
    cu(0) = 0;
    cu(1) = 4;
    cu(2) = 10;
    plp.setConstant(-1.f);
    pold.setConstant(-1.f);
    padv.setConstant(0.5f);
    pm.setConstant(1);
    pout.setConstant(7.f);
    padv(6) = std::numeric_limits<float>::infinity();
    expect_throw<pl::value_error>(
        [&] {
          pl::clip_cov_select(pl::packed(plp, cu), pl::packed(pold, cu), pl::packed(padv, cu), pl::packed(pm, cu),
                              pl::ClipCovOptions{}, pout);
        },
        "clip_cov_select", {"'advantages'", "[1, 2] (packed index 6)", "inf"});
    long touched = 0;
    for (long k = 0; k < 10; ++k) touched += pout(k) == 7.f ? 0 : 1;
    CHECK(touched == 0);
  }
  // The same at a masked-out token is no error (section 3), and a bad mask weight is one.
  Tok<float> bad_w(2, 5);
  bad_w.setConstant(1.f);
  bad_w(1, 2) = -0.5f;
  expect_throw<pl::value_error>([&] { pl::clip_cov_select(c.lp, c.old, c.adv, bad_w, pl::ClipCovOptions{}, out); },
                                "clip_cov_select", {"'mask'"});
  untouched();
  expect_throw<pl::value_error>([&] { pl::kl_cov_select(c.lp, c.adv, bad_w, pl::KlCovOptions{}, out); },
                                "kl_cov_select", {"'mask'"});
  untouched();

  // Shapes of the selections.
  const auto sel_shape = [&](auto&& f, const char* fn, const char* name) {
    expect_throw<pl::shape_error>(f, fn, {std::string("'") + name + "'"});
    untouched();
  };
  const pl::ClipCovOptions co;
  const pl::KlCovOptions ko;
  sel_shape([&] { pl::clip_cov_select(c.lp, wrong, c.adv, c.mask, co, out); }, "clip_cov_select", "old_logp");
  sel_shape([&] { pl::clip_cov_select(c.lp, c.old, wrong, c.mask, co, out); }, "clip_cov_select", "advantages");
  sel_shape([&] { pl::clip_cov_select(c.lp, c.old, c.adv, wrong_m, co, out); }, "clip_cov_select", "mask");
  sel_shape([&] { pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, out_wrong); }, "clip_cov_select", "selected_out");
  sel_shape([&] { pl::kl_cov_select(c.lp, wrong, c.mask, ko, out); }, "kl_cov_select", "advantages");
  sel_shape([&] { pl::kl_cov_select(c.lp, c.adv, wrong_m, ko, out); }, "kl_cov_select", "mask");
  sel_shape([&] { pl::kl_cov_select(c.lp, c.adv, c.mask, ko, out_wrong); }, "kl_cov_select", "selected_out");
  Flat<float> flat_out(10);
  sel_shape([&] { pl::kl_cov_select(c.lp, c.adv, c.mask, ko, flat_out); }, "kl_cov_select", "selected_out");
  // A selected_out must hold the selection on error too: the 3 x 5 sentinel stays.
  out_wrong.setConstant(7.f);
  CHECK_THROWS_AS(pl::kl_cov_select(c.lp, c.adv, c.mask, ko, out_wrong), pl::shape_error);
  CHECK(out_wrong(2, 4) == 7.f);

  // The losses: their own options, the shape of `selected`, grad / grad_out.
  const auto loss_bad = [&](Loss which, const Opts& bad, const char* name, const char* value) {
    expect_throw<pl::option_error>(
        [&] {
          if (which == Loss::clip_cov)
            pl::clip_cov(c.lp, c.old, c.adv, c.mask, c.sel, bad.clip, g);
          else
            pl::kl_cov(c.lp, c.old, c.adv, c.mask, c.sel, bad.kl, g);
        },
        name_of(which), {std::string("'") + name + "'", value});
    untouched();
  };
  Opts b;
  b.clip.clip_low = 1.5;
  loss_bad(Loss::clip_cov, b, "clip_low", "got 1.5");
  b = {};
  b.clip.clip_high = -0.5;
  loss_bad(Loss::clip_cov, b, "clip_high", "got -0.5");
  b = {};
  b.clip.clip_high = qnan;
  loss_bad(Loss::clip_cov, b, "clip_high", "nan");
  b = {};
  b.kl.kl_coef = -0.1;
  loss_bad(Loss::kl_cov, b, "kl_coef", "got -0.1");
  b = {};
  b.kl.kl_coef = qnan;
  loss_bad(Loss::kl_cov, b, "kl_coef", "nan");
  b = {};
  b.kl.kl_coef = pinf;
  loss_bad(Loss::kl_cov, b, "kl_coef", "got inf");
  for (const Loss which : all_losses) {
    CAPTURE(name_of(which));
    b = {};
    b.clip.token_count = b.kl.token_count = 0.0;
    loss_bad(which, b, "token_count", "got 0");
    const Opts o;
    const std::string fn = name_of(which);
    const auto shape = [&](auto&& f, const char* name) {
      expect_throw<pl::shape_error>(f, fn, {std::string("'") + name + "'"});
      untouched();
    };
    shape([&] { run(which, c.lp, c.old, c.adv, c.mask, wrong, o, g, g); }, "selected");
    shape([&] { run(which, c.lp, wrong, c.adv, c.mask, c.sel, o, g, g); }, "old_logp");
    shape([&] { run(which, c.lp, c.old, c.adv, wrong_m, c.sel, o, g, g); }, "mask");
    shape([&] { run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g_wrong, g_wrong); }, "grad");
    if (which == Loss::clip_cov)
      shape([&] { pl::clip_cov(c.lp, c.old, c.adv, c.mask, c.sel, o.clip, g_wrong); }, "grad_out");
    else
      shape([&] { pl::kl_cov(c.lp, c.old, c.adv, c.mask, c.sel, o.kl, g_wrong); }, "grad_out");
  }
  // The losses do not read the selection options (documented): bad ones are no error there.
  Opts ignored;
  ignored.clip.cov_ratio = ignored.kl.cov_ratio = 0.0;
  ignored.clip.cov_lower = 3.0;
  ignored.clip.cov_upper = 1.0;
  Tok<float> g1(2, 5), g2(2, 5);
  for (const Loss which : all_losses) {
    CAPTURE(name_of(which));
    const auto [r1, r1f] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, ignored, g1, g2);
    const auto [r2, r2f] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, Opts{}, g1, g2);
    check_same(r1, r2);
  }
}

// ---- 6: threads, small and empty ----

TEST_CASE("clip_cov, kl_cov: threads give the same bits", "[cov][threads]") {
  pl::ThreadPool two{2};
  const long B = 37, T = 1100;  // several row blocks of ~32K tokens
  const auto c = make_case<float, float>(B, T, 51);
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts base = opts_for(a);
      Tok<float> g(B, T), gf(B, T);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, base, g, gf);
      Opts o = base;
      o.clip.threads = o.kl.threads = two;
      Tok<float> gt(B, T), gft(B, T);
      const auto [rt, rft] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, gt, gft);
      check_same(rt, r);
      check_same(rft, r);
      CHECK(diff_bits(gt, g) == 0);
      CHECK(diff_bits(gft, g) == 0);
    }
  // The selections take no threads; with a pool in the options they give the same bits.
  pl::ClipCovOptions co;
  co.cov_ratio = 0.01;
  pl::KlCovOptions ko;
  ko.cov_ratio = 0.01;
  Tok<float> s1(B, T), s2(B, T);
  const auto a1 = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, s1);
  co.threads = two;
  const auto a2 = pl::clip_cov_select(c.lp, c.old, c.adv, c.mask, co, s2);
  check_same_selection(a1, a2);
  CHECK(a1.selected > 0);
  CHECK(diff_bits(s1, s2) == 0);
  const auto k1 = pl::kl_cov_select(c.lp, c.adv, c.mask, ko, s1);
  ko.threads = two;
  const auto k2 = pl::kl_cov_select(c.lp, c.adv, c.mask, ko, s2);
  check_same_selection(k1, k2);
  CHECK(diff_bits(s1, s2) == 0);
}

TEST_CASE("clip_cov, kl_cov: a batch of one, a single token, empty rows", "[cov]") {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      for (const long T : {1L, 13L}) {
        CAPTURE(T);
        const auto c = make_case<double, std::uint8_t>(1, T, 21, false, {}, 1.0, 0.4, 0.5);
        Tok<double> g(1, T), gf(1, T);
        const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
        check_values(which, r, data_of(c), o, 1e-13);  // as the main case
        CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
        check_same(r, rf);
        CHECK(diff_bits(g, gf) == 0);
      }
      // Empty rows give 0, count in the divisors, and get a zero gradient.
      const auto c = make_case<double, std::uint8_t>(4, 21, 11, true, {1, 3});
      Tok<double> g(4, 21), gf(4, 21);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
      check_values(which, r, data_of(c), o, 1e-13);
      CHECK(r.losses[1] == 0.0);
      CHECK(r.losses[3] == 0.0);
      CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
      long nonzero = 0;
      for (long t = 0; t < 21; ++t) nonzero += (g(1, t) != 0.0 || g(3, t) != 0.0) ? 1 : 0;
      CHECK(nonzero == 0);
    }
  // A single valid token: KL-Cov selects it (target max(floor(ratio), 1) = 1); its Clip-Cov cov
  // is exactly 0 (both centred terms vanish), a candidate only when cov_lower < 0 < cov_upper.
  Tok<double> lp(1, 1), old(1, 1), adv(1, 1), out(1, 1);
  Tok<std::uint8_t> m(1, 1);
  lp(0, 0) = -1.1;
  old(0, 0) = -1.0;
  adv(0, 0) = 0.7;
  m(0, 0) = 1;
  const auto ks = pl::kl_cov_select(lp, adv, m, pl::KlCovOptions{}, out);
  CHECK(ks.selected == 1.0);
  CHECK(out(0, 0) == 1.0);
  pl::ClipCovOptions co;
  const auto c0 = pl::clip_cov_select(lp, old, adv, m, co, out);
  CHECK(c0.target == 1.0);
  CHECK(c0.candidates == 0.0);
  CHECK(out(0, 0) == 0.0);
  co.cov_lower = -1.0;
  const auto c1 = pl::clip_cov_select(lp, old, adv, m, co, out);  // r = e^-0.1 = 0.905: not clipped
  CHECK(c1.selected == 1.0);
  CHECK(out(0, 0) == 1.0);
  // Clipped tokens are never candidates: A > 0 and r = e^0.5 > 1.2.
  lp(0, 0) = -0.5;
  CHECK(pl::clip_cov_select(lp, old, adv, m, co, out).candidates == 0.0);
  CHECK(out(0, 0) == 0.0);
}

TEST_CASE("clip_cov, kl_cov: shards with global normalizers and merged metric sums give the whole batch",
          "[cov][sharding]") {
  const long B = 6, T = 29;
  const auto c = make_case<double, std::uint8_t>(B, T, 71, true, {3});
  double total_w = 0;
  for (long k = 0; k < c.mask.size(); ++k) total_w += c.mask.data()[k];
  const auto rows_of = [&](const auto& x, long b, long e) {
    using X = std::decay_t<decltype(x)>;
    const Eigen::array<Eigen::Index, 2> off = {b, 0}, ext = {e - b, T};
    return X(x.slice(off, ext));
  };
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<double> g(B, T), gf(B, T), gs(B, T);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, c.sel, o, g, gf);
      Opts og = o;
      og.clip.token_count = og.kl.token_count = total_w;
      og.clip.sequence_count = og.kl.sequence_count = static_cast<double>(B);
      double loss = 0;
      pl::MetricSums<pl::ClipCovMetrics<double>> cm;
      pl::MetricSums<pl::KlCovMetrics<double>> km;
      for (const auto& [b, e] : {std::pair<long, long>{0, 2}, {2, 2}, {2, 6}}) {  // with an empty shard
        const Tok<double> lp = rows_of(c.lp, b, e), old = rows_of(c.old, b, e), adv = rows_of(c.adv, b, e),
                          sel = rows_of(c.sel, b, e);
        const Tok<std::uint8_t> m = rows_of(c.mask, b, e);
        Tok<double> gsh(e - b, T);
        if (which == Loss::clip_cov) {
          const auto rs = pl::clip_cov(lp, old, adv, m, sel, og.clip, gsh);
          loss += rs.loss;
          cm = pl::merge(cm, rs.metric_sums);
        } else {
          const auto rs = pl::kl_cov(lp, old, adv, m, sel, og.kl, gsh);
          loss += rs.loss;
          km = pl::merge(km, rs.metric_sums);
        }
        for (long i = b; i < e; ++i)
          for (long t = 0; t < T; ++t) gs(i, t) = gsh(i - b, t);
      }
      double mag = 0;
      for (const double v : r.losses) mag += std::fabs(v);
      // The row contributions are the same doubles, added in another grouping: 1e-15 of
      // sum |row| (as test_policy_losses).
      CHECK(std::fabs(loss - r.loss) <= 1e-15 * mag);
      Got merged;
      if (which == Loss::clip_cov) {
        const auto mm = cm.metrics();
        merged.m = {mm.selected_fraction, mm.clip_fraction, mm.approx_kl, mm.ratio_mean, mm.ratio_max, mm.token_weight};
      } else {
        const auto mm = km.metrics();
        merged.m = {mm.abs_kl, mm.selected_fraction, mm.approx_kl, mm.ratio_mean, mm.ratio_max, mm.token_weight};
      }
      CHECK(merged.m[5] == r.m[5]);  // an exact count for a byte mask
      CHECK(merged.m[4] == r.m[4]);  // a max
      // Selected and clipped counts are exact integers, so their fractions are the same bits.
      CHECK(merged.m[which == Loss::clip_cov ? 0 : 1] == r.m[which == Loss::clip_cov ? 0 : 1]);
      if (which == Loss::clip_cov) CHECK(merged.m[1] == r.m[1]);
      // Real-valued sums regrouped: 1e-15 relative (a few double roundings of partial sums).
      for (const std::size_t k : {std::size_t{2}, std::size_t{3}})
        CHECK(std::fabs(merged.m[k] - r.m[k]) <= 1e-15 * (std::fabs(r.m[k]) + 1));
      // Each row's scale is the same double in both calls (1 / token_count, 1 / B, ...).
      CHECK(diff_bits(gs, g) == 0);
    }
}

// ---- 7: bf16 / half inputs ----

TEMPLATE_TEST_CASE("clip_cov, kl_cov and the selections: bf16 and half inputs compute in float", "[cov][lowp]",
                   Eigen::bfloat16, Eigen::half) {
  using BF = TestType;
  // The gradient's one rounding: half an ulp, 2^-8 relative for bf16 (8 significand bits),
  // 2^-11 for half, plus half's subnormal half-spacing 2^-25.
  constexpr bool bf = std::is_same_v<BF, Eigen::bfloat16>;
  const double rel = std::ldexp(1.0, bf ? -8 : -11), abs_tol = bf ? 0.0 : std::ldexp(1.0, -25);
  const long B = 4, T = 77;
  const auto c = make_case<float, std::uint8_t>(B, T, 41);
  // 16-bit log-probs, float old_logp, advantages and selection (a mixed call); the float call
  // sees the same values, converted exactly.
  Tok<BF> lp16 = c.lp.cast<BF>();
  Tok<float> lpf = lp16.template cast<float>();
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<BF> g16(B, T), gf16(B, T);
      Tok<float> g(B, T), gf(B, T);
      const auto [r16, rf16] = run(which, lp16, c.old, c.adv, c.mask, c.sel, o, g16, gf16);
      const auto [r, rf] = run(which, lpf, c.old, c.adv, c.mask, c.sel, o, g, gf);
      check_same(r16, rf16);
      CHECK(diff_bits(g16, gf16) == 0);
      // The same float kernel on the same float values: the loss and metrics differ at most by
      // the float accumulation (LaneSum: 4.2e-7 of sum |x|, on each side).
      double mag = 0;
      for (const double v : r.losses) mag += std::fabs(v);
      CHECK(std::fabs(r16.loss - r.loss) <= 8.4e-7 * mag + 1e-30);
      for (std::size_t i = 0; i < r.losses.size(); ++i)
        CHECK(std::fabs(r16.losses[i] - r.losses[i]) <= 8.4e-7 * std::fabs(r.losses[i]) + 1e-30);
      CHECK(r16.m[0] == Approx(r.m[0]).margin(1e-6).epsilon(0));  // fraction or mean |d|: 4.2e-7 each side
      CHECK(r16.m[1] == Approx(r.m[1]).margin(1e-6).epsilon(0));
      CHECK(std::fabs(r16.m[2] - r.m[2]) <= 1e-6);
      CHECK(std::fabs(r16.m[3] - r.m[3]) <= 1e-6 * r.m[3]);
      CHECK(r16.m[4] == r.m[4]);
      CHECK(r16.m[5] == r.m[5]);
      long worse = 0;
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < T; ++t)
          if (std::fabs(static_cast<double>(static_cast<float>(g16(i, t))) - g(i, t)) >
              rel * std::fabs(g(i, t)) + abs_tol)
            ++worse;
      CHECK(worse == 0);
    }
  // The selections convert every input to double exactly: 16-bit logp selects what its float
  // values select, with the same summary bits.
  Tok<BF> adv16 = c.adv.cast<BF>(), old16 = c.old.cast<BF>();
  Tok<float> advf = adv16.template cast<float>(), oldf = old16.template cast<float>();
  pl::ClipCovOptions co;
  co.cov_lower = 0.2;
  co.cov_upper = 3.0;
  co.cov_ratio = 0.05;
  pl::KlCovOptions ko;
  ko.cov_ratio = 0.05;
  Tok<float> s16(B, T), sf(B, T);
  check_same_selection(pl::clip_cov_select(lp16, old16, adv16, c.mask, co, s16),
                       pl::clip_cov_select(lpf, oldf, advf, c.mask, co, sf));
  CHECK(diff_bits(s16, sf) == 0);
  CHECK(!ones_of(sf).empty());
  check_same_selection(pl::kl_cov_select(lp16, adv16, c.mask, ko, s16), pl::kl_cov_select(lpf, advf, c.mask, ko, sf));
  CHECK(diff_bits(s16, sf) == 0);
  CHECK(!ones_of(sf).empty());
}
