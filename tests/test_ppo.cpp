// ppo_clip: values and metrics against an independent long-double implementation of verl's
// formulas, gradients against central finite differences of that implementation, fused vs
// separate passes, NaN/inf padding, empty rows, data-parallel exactness, torch's derivative
// conventions at clip boundaries, and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using rlref::ld;
using rlref::Tok;

namespace {

template <class S, class M>
struct PpoCase {
  Tok<S> lp, old, adv, ref;
  Tok<M> mask;
};

/// Random PPO inputs whose tokens stay >= 1e-3 (in log-ratio) away from every kink of the loss
/// (clip boundaries, dual clip, k3's clamp), so central differences are valid. Masked-out
/// entries hold NaN/inf when poison is set. empty_rows lists rows with no valid token.
template <class S, class M>
PpoCase<S, M> make_case(long B, long T, unsigned seed, const pl::PpoOptions& o, bool poison = true,
                        std::vector<long> empty_rows = {}, double p_keep = 0.75) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> old_d(-4.0, -0.05);
  std::normal_distribution<double> ratio_d(0.0, 0.3), adv_d(0.0, 1.0), kl_d(0.0, 1.5);
  PpoCase<S, M> c{Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<M>(B, T)};
  const auto near = [](double a, double b) { return std::fabs(a - b) < 1e-3; };
  long k = 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t, ++k) {
      M m = rlref::random_mask<M>(rng, p_keep);
      for (long e : empty_rows)
        if (e == i) m = M(0);
      c.mask(i, t) = m;
      double d;
      do d = ratio_d(rng);
      while (near(d, std::log(1 - o.clip_low)) || near(d, std::log(1 + o.clip_high)) ||
             (o.dual_clip > 1 && near(d, std::log(o.dual_clip))));
      double a;
      do a = adv_d(rng);
      while (std::fabs(a) < 0.05);
      double x;
      do x = kl_d(rng);
      while (std::fabs(std::exp(x) - x - 1 - 10) < 1e-2);
      const double old = old_d(rng);
      c.old(i, t) = static_cast<S>(old);
      c.lp(i, t) = static_cast<S>(old + d);
      c.adv(i, t) = static_cast<S>(a);
      c.ref(i, t) = static_cast<S>(static_cast<double>(c.lp(i, t)) + x);
      if (m == M(0) && poison) {
        c.lp(i, t) = rlref::poison<S>(k);
        c.old(i, t) = rlref::poison<S>(k + 1);
        c.adv(i, t) = rlref::poison<S>(k + 2);
        c.ref(i, t) = rlref::poison<S>(k);
      }
    }
  return c;
}

const pl::Aggregation all_modes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                     pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                     pl::Aggregation::token_sum};

enum class KlCase { none, k1, k2, k3, ref_no_coef };
const KlCase all_kl[] = {KlCase::none, KlCase::k1, KlCase::k2, KlCase::k3, KlCase::ref_no_coef};

pl::PpoOptions options_for(pl::Aggregation a, bool dual, KlCase kl) {
  pl::PpoOptions o;
  o.aggregation = a;
  o.clip_low = 0.2;
  o.clip_high = 0.28;  // DAPO's clip-higher: exercises the asymmetric range
  o.dual_clip = dual ? 1.25 : 0.0;
  if (kl != KlCase::none && kl != KlCase::ref_no_coef) {
    o.kl_coef = 0.05;
    o.kl_estimator = kl == KlCase::k1   ? pl::KlEstimator::k1
                     : kl == KlCase::k2 ? pl::KlEstimator::k2
                                        : pl::KlEstimator::k3;
  }
  if (a == pl::Aggregation::seq_mean_token_sum_norm) o.token_sum_norm = 40.0;
  return o;
}

template <class S, class M>
pl::PpoResult<S, M> run(const PpoCase<S, M>& c, const pl::PpoOptions& o, bool with_ref) {
  return with_ref ? pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o) : pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o);
}

template <class S, class M>
pl::PpoResult<S, M> run_fused(const PpoCase<S, M>& c, const pl::PpoOptions& o, bool with_ref, Tok<S>& g) {
  return with_ref ? pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o, g)
                  : pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o, g);
}

/// Max over tokens of |grad - central difference of the reference loss|, relative to max |grad|;
/// masked-out tokens must be exactly 0.
template <class S, class M>
double fd_error(const PpoCase<S, M>& c, const pl::PpoOptions& o, bool with_ref, const Tok<S>& g) {
  rlref::Data d = rlref::to_data(c.lp, c.old, c.adv, c.mask, with_ref ? &c.ref : nullptr);
  const auto r = rlref::token_fd_error(d, g, [&](const rlref::Data& x) { return rlref::ppo_ref(x, o).loss; });
  CHECK(r.masked_zero);
  return r.rel;
}

/// Checks loss, per-row contributions and metrics against the reference. tol is relative to the
/// magnitude of the quantity (plus the same tolerance in absolute terms for values near 0).
template <class S, class M>
void check_values(const pl::PpoResult<S, M>& r, const PpoCase<S, M>& c, const pl::PpoOptions& o, bool with_ref,
                  double tol) {
  const rlref::Data d = rlref::to_data(c.lp, c.old, c.adv, c.mask, with_ref ? &c.ref : nullptr);
  const rlref::PpoRef e = rlref::ppo_ref(d, o);
  // Scale of the loss: the aggregated |l|, so cancellation in the sum does not shrink the bound.
  std::vector<ld> absl(e.tokens.size()), rows_abs;
  for (std::size_t k = 0; k < absl.size(); ++k) absl[k] = std::fabs(e.tokens[k]);
  rlref::aggregate(d, absl, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, &rows_abs);
  ld scale = 0;
  for (ld v : rows_abs) scale += v;
  CHECK(std::fabs(static_cast<ld>(r.loss) - e.loss) <= tol * (scale + 1e-300L));
  REQUIRE(r.losses.dimension(0) == d.B);
  for (long i = 0; i < d.B; ++i)
    CHECK(std::fabs(static_cast<ld>(r.losses(i)) - e.rows[static_cast<std::size_t>(i)]) <=
          tol * (rows_abs[static_cast<std::size_t>(i)] + 1e-300L));
  const auto near = [&](S got, ld want, ld mag) { return std::fabs(static_cast<ld>(got) - want) <= tol * (mag + 1); };
  CHECK(near(r.metrics.clip_fraction, e.clip, 1));
  CHECK(near(r.metrics.clip_fraction_low, e.clip_low, 1));
  CHECK(near(r.metrics.approx_kl, e.approx_kl, 1));
  CHECK(near(r.metrics.ratio_mean, e.ratio_mean, e.ratio_mean));
  CHECK(near(r.metrics.ratio_max, e.ratio_max, e.ratio_max));
  CHECK(near(r.metrics.kl_mean, e.kl_mean, std::fabs(e.kl_mean)));
  CHECK(near(r.metrics.token_weight, e.weight, e.weight));
}

double g_max_fd_double = 0, g_max_fd_float = 0;

/// What a check changes in options_for's options: GSPO's sequence ratio (with clips tight
/// enough that a row's mean ratio reaches them) and TRL's delta.
struct Tweak {
  bool sequence = false;
  std::optional<double> delta;
  bool bias_corrected_kl = false;
};

/// The row's first valid advantage on all its valid tokens: GRPO's outcome advantages, one per
/// completion, the case where verl's GSPO gradient and TRL's gradient through the mean agree.
template <class S, class M>
void one_advantage_a_row(PpoCase<S, M>& c) {
  for (long i = 0; i < c.adv.dimension(0); ++i) {
    long first = -1;
    for (long t = 0; t < c.adv.dimension(1); ++t)
      if (c.mask(i, t) != M(0)) {
        if (first < 0) first = t;
        c.adv(i, t) = c.adv(i, first);
      }
  }
}

pl::PpoOptions tweaked(pl::PpoOptions o, const Tweak& tw) {
  if (tw.sequence) {
    o.importance_level = pl::ImportanceLevel::sequence;
    o.clip_low = 0.03;
    o.clip_high = 0.04;
  }
  o.delta = tw.delta;
  o.bias_corrected_kl = tw.bias_corrected_kl;
  return o;
}

template <class S, class M>
void full_check(long B, long T, unsigned seed, pl::Aggregation a, bool dual, KlCase kl, const Tweak& tw = {}) {
  const pl::PpoOptions o = tweaked(options_for(a, dual, kl), tw);
  const bool with_ref = kl != KlCase::none;
  auto c = make_case<S, M>(B, T, seed, o);
  if (tw.sequence) one_advantage_a_row(c);
  CAPTURE(sizeof(S), sizeof(M), B, T, seed);
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-13;
  const double fd_tol = std::is_same_v<S, float> ? 2e-6 : 1e-9;

  const auto r = run(c, o, with_ref);
  check_values(r, c, o, with_ref, tol);
  Tok<S> g(B, T), gf(B, T);
  g.setConstant(S(7));
  gf.setConstant(S(7));
  r.backward(g);
  const double err = fd_error(c, o, with_ref, g);
  CHECK(err <= fd_tol);
  (std::is_same_v<S, float> ? g_max_fd_float : g_max_fd_double) =
      std::max(std::is_same_v<S, float> ? g_max_fd_float : g_max_fd_double, err);

  // Fused: same numbers in one pass (the token_mean normaliser comes from a separate mask sum,
  // so float weights may differ in the last bit).
  const auto rf = run_fused(c, o, with_ref, gf);
  double abs_sum = 0;
  for (long i = 0; i < B; ++i) abs_sum += std::fabs(static_cast<double>(r.losses(i)));
  CHECK(std::fabs(rf.loss - r.loss) <= 4 * std::numeric_limits<S>::epsilon() * abs_sum);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t)
      CHECK(std::fabs(gf(i, t) - g(i, t)) <= 4 * std::numeric_limits<S>::epsilon() * std::fabs(g(i, t)));
  CHECK(rf.metrics.clip_fraction == r.metrics.clip_fraction);
  CHECK(rf.metrics.ratio_max == r.metrics.ratio_max);
}

}  // namespace

TEST_CASE("ppo_clip matches verl's formulas and finite differences in every mode", "[ppo]") {
  unsigned seed = 1;
  for (const auto a : all_modes)
    for (const bool dual : {false, true})
      for (const auto kl : all_kl) {
        CAPTURE(static_cast<int>(a), dual, static_cast<int>(kl));
        full_check<double, std::uint8_t>(3, 37, seed++, a, dual, kl);
        full_check<double, double>(3, 37, seed++, a, dual, kl);
        full_check<float, std::uint8_t>(3, 37, seed++, a, dual, kl);
        full_check<float, float>(2, 29, seed++, a, dual, kl);
      }
  std::printf("ppo_clip: max |grad - FD| / max|grad|: double %.3g, float %.3g\n", g_max_fd_double, g_max_fd_float);
}

// At sequence level every token of a row takes the row's mean log-ratio. rlref::ppo_ref writes
// it as TRL does, a function of every token of the row, so the finite differences below check
// verl's sg[s] pi / sg[pi] gradient against the gradient through the mean; the two agree for
// one advantage a row (full_check sets it) and rows of mask weight >= 1 (every row here:
// T >= 29, weights >= 0.25, p_keep 0.75).
TEST_CASE("ppo_clip at sequence level (GSPO) and with TRL's delta: formulas and finite differences", "[ppo][gspo]") {
  unsigned seed = 500;
  for (const auto a : all_modes)
    for (const bool dual : {false, true})
      for (const auto kl : {KlCase::none, KlCase::k3})
        for (const bool seq : {false, true})
          for (const bool delta : {false, true}) {
            if (!seq && !delta) continue;
            Tweak tw;
            tw.sequence = seq;
            if (delta) tw.delta = seq ? 1.03 : 1.15;  // inside the clip range, so it binds
            CAPTURE(static_cast<int>(a), dual, static_cast<int>(kl), seq, delta);
            full_check<double, std::uint8_t>(4, 37, seed++, a, dual, kl, tw);
            full_check<double, double>(3, 37, seed++, a, dual, kl, tw);
            full_check<float, std::uint8_t>(4, 37, seed++, a, dual, kl, tw);
            full_check<float, float>(2, 29, seed++, a, dual, kl, tw);
            full_check<double, bool>(2, 200, seed++, a, dual, kl, tw);
          }
  std::printf("ppo_clip (sequence level, delta): max |grad - FD| / max|grad|: double %.3g, float %.3g\n",
              g_max_fd_double, g_max_fd_float);
}

// The bias-corrected KL term k r differentiates r too; at token level the finite differences of
// rlref::ppo_ref (TRL's per_token_kl * coef_1) check it, every KL estimator and mode.
TEST_CASE("ppo_clip with bias_corrected_kl: TRL's k r and finite differences", "[ppo][kl]") {
  unsigned seed = 900;
  for (const auto a : all_modes)
    for (const bool dual : {false, true})
      for (const auto kl : {KlCase::k1, KlCase::k2, KlCase::k3, KlCase::ref_no_coef}) {
        Tweak tw;
        tw.bias_corrected_kl = true;
        CAPTURE(static_cast<int>(a), dual, static_cast<int>(kl));
        full_check<double, std::uint8_t>(3, 37, seed++, a, dual, kl, tw);
        full_check<float, float>(2, 29, seed++, a, dual, kl, tw);
        tw.delta = 1.15;
        full_check<double, double>(3, 37, seed++, a, dual, kl, tw);
      }
}

TEST_CASE("ppo_clip at sequence level: one ratio a row, exp of the row's mean log-ratio", "[ppo][gspo]") {
  // Closed form on a 2 x 5 batch: row 0 has log-ratios 0.1, -0.3, 0.5 on its valid tokens (mean
  // 0.1), row 1 none valid.
  Tok<double> lp(2, 5), old(2, 5), adv(2, 5);
  Tok<std::uint8_t> m(2, 5);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const double d0[5] = {0.1, nan, -0.3, 0.5, inf};
  for (long t = 0; t < 5; ++t) {
    m(0, t) = t == 0 || t == 2 || t == 3;
    m(1, t) = 0;
    old(0, t) = -1.0 - 0.1 * static_cast<double>(t);
    lp(0, t) = old(0, t) + d0[t];
    adv(0, t) = t == 2 ? -0.5 : 1.5;
    lp(1, t) = nan;
    old(1, t) = -inf;
    adv(1, t) = inf;
  }
  pl::PpoOptions o;
  o.importance_level = pl::ImportanceLevel::sequence;
  o.aggregation = pl::Aggregation::token_mean;
  Tok<double> g(2, 5);
  const auto r = pl::ppo_clip(lp, old, adv, m, o, g);
  const double s = std::exp((0.1 - 0.3 + 0.5) / 3);  // 1.105: inside [0.8, 1.2], nothing clips
  const double want = (-1.5 * s + 0.5 * s - 1.5 * s) / 3;
  CHECK(std::fabs(r.loss - want) <= 1e-15);
  CHECK(std::fabs(r.metrics.ratio_mean - s) <= 1e-15);
  CHECK(std::fabs(r.metrics.ratio_max - s) <= 1e-15);
  CHECK(std::fabs(r.metrics.approx_kl - (-0.1 + 0.3 - 0.5) / 3) <= 1e-15);
  CHECK(r.metrics.clip_fraction == 0.0);
  CHECK(r.losses(1) == 0.0);
  // d l_t / d logp_t = -A_t s (verl's sg[s] pi_t / sg[pi_t]); / 3 tokens
  CHECK(std::fabs(g(0, 0) - (-1.5 * s / 3)) <= 1e-15);
  CHECK(std::fabs(g(0, 2) - (0.5 * s / 3)) <= 1e-15);
  CHECK(std::fabs(g(0, 3) - (-1.5 * s / 3)) <= 1e-15);
  for (const long t : {1L, 4L}) CHECK(g(0, t) == 0.0);
  for (long t = 0; t < 5; ++t) CHECK(g(1, t) == 0.0);

  // A row's mean beyond log_ratio_clamp: the clamped ratio, and no gradient (torch.clamp).
  o.log_ratio_clamp = 0.05;
  Tok<double> gc(2, 5);
  const auto rc = pl::ppo_clip(lp, old, adv, m, o, gc);
  CHECK(std::fabs(rc.metrics.ratio_mean - std::exp(0.05)) <= 1e-15);
  for (long t = 0; t < 5; ++t) CHECK(gc(0, t) == 0.0);
}

TEST_CASE("ppo_clip accepts every mask type and width around the SIMD lanes", "[ppo]") {
  for (const long T : {1L, 3L, 7L, 8L, 9L, 15L, 16L, 17L, 31L, 33L, 64L, 65L, 200L}) {
    CAPTURE(T);
    full_check<double, bool>(2, T, 100 + static_cast<unsigned>(T), pl::Aggregation::token_mean, true, KlCase::k3);
    full_check<float, bool>(2, T, 200 + static_cast<unsigned>(T), pl::Aggregation::seq_mean_token_mean, false,
                            KlCase::k2);
    full_check<float, double>(2, T, 300 + static_cast<unsigned>(T), pl::Aggregation::token_mean, false, KlCase::k1);
    full_check<double, float>(2, T, 400 + static_cast<unsigned>(T), pl::Aggregation::seq_mean_token_sum, true,
                              KlCase::none);
  }
}

TEMPLATE_TEST_CASE("ppo_clip: masked-out inf/NaN never influence anything", "[ppo]", float, double) {
  using S = TestType;
  for (const bool seq : {false, true})
    for (const auto a : all_modes) {
      Tweak tw;
      tw.sequence = seq;
      const pl::PpoOptions o = tweaked(options_for(a, true, KlCase::k3), tw);
      const auto poisoned = make_case<S, float>(4, 45, 7, o, true, {2});
      const auto clean = make_case<S, float>(4, 45, 7, o, false, {2});
      const auto rp = pl::ppo_clip(poisoned.lp, poisoned.old, poisoned.adv, poisoned.mask, poisoned.ref, o);
      const auto rc = pl::ppo_clip(clean.lp, clean.old, clean.adv, clean.mask, clean.ref, o);
      CHECK(std::isfinite(rp.loss));
      CHECK(rp.loss == rc.loss);
      for (long i = 0; i < 4; ++i) CHECK(rp.losses(i) == rc.losses(i));
      CHECK(rp.metrics.clip_fraction == rc.metrics.clip_fraction);
      CHECK(rp.metrics.clip_fraction_low == rc.metrics.clip_fraction_low);
      CHECK(rp.metrics.approx_kl == rc.metrics.approx_kl);
      CHECK(rp.metrics.ratio_mean == rc.metrics.ratio_mean);
      CHECK(rp.metrics.ratio_max == rc.metrics.ratio_max);
      CHECK(rp.metrics.kl_mean == rc.metrics.kl_mean);
      Tok<S> gp(4, 45), gc(4, 45), gfp(4, 45);
      rp.backward(gp);
      rc.backward(gc);
      pl::ppo_clip(poisoned.lp, poisoned.old, poisoned.adv, poisoned.mask, poisoned.ref, o, gfp);
      for (long i = 0; i < 4; ++i)
        for (long t = 0; t < 45; ++t) {
          CHECK(gp(i, t) == gc(i, t));
          CHECK(gfp(i, t) == gc(i, t));
          if (poisoned.mask(i, t) == 0.0f) CHECK(gp(i, t) == S(0));
        }
    }
}

TEST_CASE("ppo_clip: empty rows give 0 and still count in the batch", "[ppo]") {
  for (const auto a : all_modes) {
    CAPTURE(static_cast<int>(a));
    const pl::PpoOptions o = options_for(a, false, KlCase::none);
    const auto c = make_case<double, std::uint8_t>(4, 21, 11, o, true, {1, 3});
    const auto r = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o);
    check_values(r, c, o, false, 1e-13);
    CHECK(r.losses(1) == 0.0);
    CHECK(r.losses(3) == 0.0);
    Tok<double> g(4, 21);
    r.backward(g);
    CHECK(fd_error(c, o, false, g) <= 1e-9);
    if (a == pl::Aggregation::seq_mean_token_mean) {
      // Two empty rows out of four: the mean over sequences still divides by 4.
      ld s0 = 0, w0 = 0;
      for (long t = 0; t < 21; ++t)
        if (c.mask(0, t)) {
          const ld ratio = std::exp(static_cast<ld>(c.lp(0, t)) - c.old(0, t));
          const ld A = c.adv(0, t);
          s0 += std::max(-A * ratio, -A * std::min(std::max(ratio, 0.8L), 1.28L));
          w0 += 1;
        }
      CHECK(std::fabs(r.losses(0) - static_cast<double>(s0 / w0 / 4)) <= 1e-14 * std::fabs(r.losses(0)));
    }
  }
  // A batch with no valid token at all: every output is 0, nothing is NaN.
  pl::PpoOptions o;
  const auto c = make_case<float, std::uint8_t>(3, 10, 12, o, true, {0, 1, 2});
  Tok<float> g(3, 10);
  g.setConstant(5.f);
  for (const auto a : all_modes) {
    o.aggregation = a;
    const auto r = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o, g);
    CHECK(r.loss == 0.f);
    CHECK(r.metrics.clip_fraction == 0.f);
    CHECK(r.metrics.ratio_max == 0.f);
    CHECK(r.metrics.approx_kl == 0.f);
    for (long i = 0; i < 3; ++i)
      for (long t = 0; t < 10; ++t) CHECK(g(i, t) == 0.f);
  }
}

TEST_CASE("ppo_clip: batch of one and a single token", "[ppo]") {
  for (const auto a : all_modes)
    for (const bool dual : {false, true}) {
      CAPTURE(static_cast<int>(a), dual);
      full_check<double, std::uint8_t>(1, 13, 21, a, dual, KlCase::k3);
      const pl::PpoOptions o = options_for(a, dual, KlCase::k2);
      const auto c = make_case<double, std::uint8_t>(1, 1, 22, o, false, {}, 1.0);
      REQUIRE(c.mask(0, 0) == 1);
      const auto r = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o);
      check_values(r, c, o, true, 1e-13);
      Tok<double> g(1, 1);
      r.backward(g);
      CHECK(fd_error(c, o, true, g) <= 1e-9);
    }
}

TEST_CASE("ppo_clip: split batches with global normalisers add up to the full batch", "[ppo]") {
  const long B = 6, T = 29, H = 3;
  for (const auto a : all_modes) {
    CAPTURE(static_cast<int>(a));
    pl::PpoOptions o = options_for(a, true, KlCase::k3);
    const auto c = make_case<double, float>(B, T, 31, o, true);
    const auto full = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o);
    Tok<double> g_full(B, T);
    full.backward(g_full);

    // Rows [0, H) and [H, B) as two data-parallel ranks (or two accumulation micro-batches).
    o.token_count = static_cast<double>(full.metrics.token_weight);
    o.sequence_count = static_cast<double>(B);
    double loss_sum = 0;
    for (long part = 0; part < 2; ++part) {
      const Eigen::array<Eigen::Index, 2> off{part * H, 0}, ext{H, T};
      const Tok<double> lp = c.lp.slice(off, ext), old = c.old.slice(off, ext), adv = c.adv.slice(off, ext),
                        ref = c.ref.slice(off, ext);
      const Tok<float> m = c.mask.slice(off, ext);
      Tok<double> g(H, T);
      const auto r = pl::ppo_clip(lp, old, adv, m, ref, o, g);
      loss_sum += r.loss;
      for (long i = 0; i < H; ++i) {
        CHECK(std::fabs(r.losses(i) - full.losses(part * H + i)) <= 1e-15 * std::fabs(full.losses(part * H + i)));
        for (long t = 0; t < T; ++t)
          CHECK(std::fabs(g(i, t) - g_full(part * H + i, t)) <= 4e-16 * std::fabs(g_full(part * H + i, t)));
      }
    }
    CHECK(std::fabs(loss_sum - full.loss) <= 1e-14 * (std::fabs(full.loss) + 1));
  }
  // token_count replaces this call's own count: a batch normalised by twice its weight halves.
  pl::PpoOptions o;
  const auto c = make_case<double, std::uint8_t>(2, 17, 32, o, true);
  const auto own = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o);
  o.token_count = 2.0 * own.metrics.token_weight;
  const auto half = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o);
  CHECK(half.loss == Approx(own.loss / 2).epsilon(1e-15));
}

TEST_CASE("ppo_clip follows torch autograd at clip boundaries, clamps and ties", "[ppo]") {
  Tok<double> lp(1, 1), old(1, 1), adv(1, 1), g(1, 1);
  Tok<std::uint8_t> m(1, 1);
  m.setConstant(1);
  pl::PpoOptions o;
  const auto grad_at = [&](double logp, double old_logp, double a, const pl::PpoOptions& opt) {
    lp(0, 0) = logp;
    old(0, 0) = old_logp;
    adv(0, 0) = a;
    pl::ppo_clip(lp, old, adv, m, opt).backward(g);
    return g(0, 0);
  };
  // r == 1 + clip_high exactly (clip_high = 0): torch.clamp passes the gradient at its bound and
  // torch.maximum splits it between the tied branches, which agree: d/dlogp = -A r.
  pl::PpoOptions edge;
  edge.clip_high = 0;
  CHECK(grad_at(-1.0, -1.0, 2.0, edge) == -2.0);
  CHECK(grad_at(-1.0, -1.0, -2.0, edge) == 2.0);
  // A = 0: nothing moves.
  CHECK(grad_at(-1.0, -1.5, 0.0, o) == 0.0);
  // Clipped branch active (r > 1 + eps with A > 0, r < 1 - eps with A < 0): gradient 0.
  CHECK(grad_at(-1.0, -1.5, 1.0, o) == 0.0);
  CHECK(grad_at(-1.5, -1.0, -1.0, o) == 0.0);
  // Unclipped side of the same ratios: -A r.
  CHECK(grad_at(-1.0, -1.5, -1.0, o) == Approx(std::exp(0.5)).epsilon(1e-15));
  CHECK(grad_at(-1.5, -1.0, 1.0, o) == Approx(-std::exp(-0.5)).epsilon(1e-15));
  // log ratio exactly at verl's clamp (20): inclusive, the gradient passes; beyond it, 0.
  CHECK(grad_at(20.0, 0.0, -1.0, o) == Approx(std::exp(20.0)).epsilon(1e-15));
  CHECK(grad_at(20.5, 0.0, -1.0, o) == 0.0);
  // Without the clamp the same token keeps its gradient and its loss.
  pl::PpoOptions exact;
  exact.log_ratio_clamp.reset();
  CHECK(grad_at(20.5, 0.0, -1.0, exact) == Approx(std::exp(20.5)).epsilon(1e-15));
  lp(0, 0) = 20.5;
  CHECK(pl::ppo_clip(lp, old, adv, m, o).loss == Approx(std::exp(20.0)).epsilon(1e-15));
  CHECK(pl::ppo_clip(lp, old, adv, m, exact).loss == Approx(std::exp(20.5)).epsilon(1e-15));
  // Dual clip: A < 0 with r > c caps the loss at -A c, gradient 0, clip_fraction_low = 1.
  pl::PpoOptions dual;
  dual.dual_clip = 3.0;
  CHECK(grad_at(0.0, -2.0, -0.5, dual) == 0.0);
  const auto rd = pl::ppo_clip(lp, old, adv, m, dual);
  CHECK(rd.loss == Approx(1.5).epsilon(1e-15));
  CHECK(rd.metrics.clip_fraction_low == 1.0);
  CHECK(rd.metrics.clip_fraction == 0.0);
  // Without dual clip the same token is unclipped: loss -A r.
  CHECK(pl::ppo_clip(lp, old, adv, m, o).loss == Approx(0.5 * std::exp(2.0)).epsilon(1e-15));
  // Below c the dual clip is inactive.
  CHECK(grad_at(-1.0, -2.0, -0.5, dual) == Approx(0.5 * std::exp(1.0)).epsilon(1e-15));
}

TEST_CASE("ppo_clip's k3 KL term uses verl's clamps unless they are turned off", "[ppo]") {
  Tok<double> lp(1, 1), old(1, 1), adv(1, 1), ref(1, 1), g(1, 1);
  Tok<std::uint8_t> m(1, 1);
  m.setConstant(1);
  lp.setConstant(-1.0);
  old.setConstant(-1.0);
  adv.setConstant(0.0);
  ref.setConstant(2.0);  // x = 3: exp(3) - 4 = 16.09 > 10, clamped
  pl::PpoOptions o;
  o.kl_coef = 0.5;
  auto r = pl::ppo_clip(lp, old, adv, m, ref, o);
  CHECK(r.loss == Approx(5.0).epsilon(1e-15));
  CHECK(r.metrics.kl_mean == Approx(10.0).epsilon(1e-15));
  r.backward(g);
  CHECK(g(0, 0) == 0.0);
  o.k3_clamp.reset();
  r = pl::ppo_clip(lp, old, adv, m, ref, o);
  CHECK(r.loss == Approx(0.5 * (std::exp(3.0) - 4.0)).epsilon(1e-15));
  r.backward(g);
  CHECK(g(0, 0) == Approx(0.5 * (1 - std::exp(3.0))).epsilon(1e-15));
}

namespace {}  // namespace

TEST_CASE("ppo_clip rejects bad input and writes nothing", "[ppo]") {
  pl::PpoOptions o;
  const auto c = make_case<float, std::uint8_t>(2, 5, 41, o, false);
  Tok<float> g(2, 5), wrong_lp(2, 6), g_wrong(3, 5);
  wrong_lp.setZero();
  Tok<std::uint8_t> wrong_m(1, 5);
  wrong_m.setConstant(1);
  g.setConstant(-42.f);
  const auto untouched = [&] {
    for (long i = 0; i < 2; ++i)
      for (long t = 0; t < 5; ++t) CHECK(g(i, t) == -42.f);
  };
  const auto shape = [&](auto&& f, const char* name) {
    expect_throw<pl::shape_error>(f, "ppo_clip", {std::string("'") + name + "'"});
    untouched();
  };
  shape([&] { pl::ppo_clip(wrong_lp, c.old, c.adv, c.mask, o, g); }, "old_logp");
  shape([&] { pl::ppo_clip(c.lp, wrong_lp, c.adv, c.mask, o, g); }, "old_logp");
  shape([&] { pl::ppo_clip(c.lp, c.old, wrong_lp, c.mask, o, g); }, "advantages");
  shape([&] { pl::ppo_clip(c.lp, c.old, c.adv, wrong_m, o, g); }, "mask");
  shape([&] { pl::ppo_clip(c.lp, c.old, c.adv, c.mask, wrong_lp, o, g); }, "ref_logp");
  shape([&] { pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o, g_wrong); }, "grad_out");
  shape([&] { pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o).backward(g_wrong); }, "grad");
  Tok<float> e0(0, 5);
  Tok<std::uint8_t> m0(0, 5);
  Tok<float> g0(0, 5);
  shape([&] { pl::ppo_clip(e0, e0, e0, m0, o, g0); }, "logp");

  const auto option = [&](pl::PpoOptions bad, const char* name) {
    expect_throw<pl::option_error>([&] { pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, bad, g); }, "ppo_clip",
                                   {std::string("'") + name + "'"});
    untouched();
  };
  pl::PpoOptions b;
  b.clip_low = -0.1;
  option(b, "clip_low");
  b = {};
  b.clip_high = -1e-9;
  option(b, "clip_high");
  b = {};
  b.clip_high = std::numeric_limits<double>::quiet_NaN();
  option(b, "clip_high");
  for (const double bad_c : {0.5, 1.0, -3.0, std::numeric_limits<double>::quiet_NaN()}) {
    b = {};
    b.dual_clip = bad_c;
    option(b, "dual_clip");
  }
  b = {};
  b.aggregation = static_cast<pl::Aggregation>(42);
  option(b, "aggregation");
  b = {};
  b.kl_estimator = static_cast<pl::KlEstimator>(7);
  option(b, "kl_estimator");
  b = {};
  b.kl_coef = -0.1;
  option(b, "kl_coef");
  b = {};
  b.token_count = 0.0;
  option(b, "token_count");
  b = {};
  b.sequence_count = -2.0;
  option(b, "sequence_count");
  b = {};
  b.aggregation = pl::Aggregation::seq_mean_token_sum_norm;
  b.token_sum_norm = 0.0;
  option(b, "token_sum_norm");
  b = {};
  b.log_ratio_clamp = 0.0;
  option(b, "log_ratio_clamp");
  b = {};
  b.importance_level = static_cast<pl::ImportanceLevel>(2);
  option(b, "importance_level");
  for (const double bad_delta : {0.0, -1.0, 1e-50, std::numeric_limits<double>::quiet_NaN()}) {
    b = {};
    b.delta = bad_delta;
    option(b, "delta");
  }
  b = {};
  b.k3_clamp = -1.0;
  option(b, "k3_clamp");
  // A KL coefficient needs a reference.
  b = {};
  b.kl_coef = 0.1;
  expect_throw<pl::option_error>([&] { pl::ppo_clip(c.lp, c.old, c.adv, c.mask, b, g); }, "ppo_clip", {"'ref_logp'"});
  untouched();
}

TEST_CASE("ppo_clip works on TensorMaps over caller storage", "[ppo]") {
  const pl::PpoOptions o = options_for(pl::Aggregation::seq_mean_token_mean, true, KlCase::k3);
  const auto c = make_case<float, std::uint8_t>(3, 19, 51, o);
  std::vector<float> buf(3 * 19, 9.f);
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> gmap(buf.data(), 3, 19);
  Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> lp(c.lp.data(), 3, 19);
  const auto r = pl::ppo_clip(lp, c.old, c.adv, c.mask, c.ref, o, gmap);
  Tok<float> g(3, 19);
  pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o).backward(g);
  for (long i = 0; i < 3; ++i)
    for (long t = 0; t < 19; ++t) CHECK(gmap(i, t) == g(i, t));
  check_values(r, c, o, true, 2e-6);
}

TEMPLATE_TEST_CASE("the ratio's exp is within 2 ulp everywhere, with std::exp's specials", "[ppo][exp]", float,
                   double) {
  using S = TestType;
  using B = pl::detail::batch<S>;
  constexpr std::size_t W = B::size;
  alignas(64) S xs[W], ys[W];
  double worst = 0;
  const auto ulps = [](S got, long double want) {
    const S w = static_cast<S>(want);
    S ulp = std::nextafter(std::fabs(w), std::numeric_limits<S>::infinity()) - std::fabs(w);
    if (!(ulp > 0)) ulp = std::numeric_limits<S>::denorm_min();
    return static_cast<double>(std::fabs(static_cast<long double>(got) - want) / ulp);
  };
  // A dense sweep over the finite range, subnormal results included.
  // Up to the last finite result (xsimd's own exp overflows ~0.35 early).
  const double lo = std::is_same_v<S, float> ? -104.0 : -745.0, hi = std::is_same_v<S, float> ? 88.72 : 709.78;
  const long n = 400000;
  for (long i = 0; i < n; i += static_cast<long>(W)) {
    for (std::size_t k = 0; k < W; ++k)
      xs[k] = static_cast<S>(lo + (hi - lo) * static_cast<double>(i + static_cast<long>(k)) / n);
    pl::detail::exp_ratio(B::load_aligned(xs)).store_aligned(ys);
    for (std::size_t k = 0; k < W; ++k) worst = std::max(worst, ulps(ys[k], std::exp(static_cast<long double>(xs[k]))));
  }
  CHECK(worst <= 2.0);  // the README's 2 ULP bound for elementwise math (AVX-512 measures ~1.0)
  std::printf("exp_ratio<%s>: max error %.3f ulp\n", std::is_same_v<S, float> ? "float" : "double", worst);
  const S inf = std::numeric_limits<S>::infinity();
  const S special[] = {inf, -inf, std::numeric_limits<S>::quiet_NaN(), S(0), -S(0), S(1e30), S(-1e30)};
  for (const S x : special) {
    for (auto& v : xs) v = x;
    pl::detail::exp_ratio(B::load_aligned(xs)).store_aligned(ys);
    CAPTURE(x);
    if (std::isnan(x)) {
      CHECK(std::isnan(ys[0]));
    } else {
      CHECK(ys[0] == std::exp(x));
    }
  }
}

TEST_CASE("ppo_clip sums a 1M-token float row to 1e-6 of the exact value", "[ppo][accuracy]") {
  const long T = 1L << 20;
  Tok<float> lp(1, T), old(1, T), adv(1, T), g(1, T);
  Tok<std::uint8_t> m(1, T);
  std::mt19937 rng(5);
  std::normal_distribution<double> d(0.0, 0.3);
  std::uniform_real_distribution<double> a(0.1, 2.0), o(-6.0, -0.1);
  for (long t = 0; t < T; ++t) {
    old(0, t) = static_cast<float>(o(rng));
    lp(0, t) = static_cast<float>(old(0, t) + d(rng));
    adv(0, t) = static_cast<float>(-a(rng));  // A < 0: every token loss is positive, no cancellation
    m(0, t) = 1;
  }
  for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum}) {
    pl::PpoOptions opt;
    opt.aggregation = agg;
    const auto r = pl::ppo_clip(lp, old, adv, m, opt, g);
    long double s = 0;
    for (long t = 0; t < T; ++t) {
      const long double ratio = std::exp(static_cast<long double>(lp(0, t)) - old(0, t));
      const long double A = adv(0, t);
      s += std::max(-A * ratio, -A * std::min(std::max(ratio, 0.8L), 1.2L));
    }
    const long double want = agg == pl::Aggregation::token_mean ? s / T : s;
    CHECK(std::fabs(static_cast<long double>(r.loss) - want) <= 1e-6L * want);
    CHECK(std::fabs(static_cast<long double>(r.losses(0)) - want) <= 1e-6L * want);
    std::printf("ppo_clip 1M-token float row, mode %d: relative error %.3Lg\n", static_cast<int>(agg),
                std::fabs(static_cast<long double>(r.loss) - want) / want);
  }
}
