// rollout_is_weights: closed forms of every mode (verl rollout_corr_helper.py, TRL
// vllm_importance_sampling_mode), padding with NaN/inf, boundaries, empty rows and batches,
// packed input, the ppo_clip recipe against a long-double reference of verl's
// pg_losses * rollout_is_weights + agg_loss (gradient by central finite differences), OpenRLHF's
// tis / icepop / seq-mask-tis (PolicyLoss.forward) with its loss on the original mask's divisor,
// and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;
using ld = long double;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

namespace {

const double nan_ = std::numeric_limits<double>::quiet_NaN();
const double inf_ = std::numeric_limits<double>::infinity();

template <class T>
Tok<T> tok(long b, long t, std::initializer_list<double> v) {
  Tok<T> x(b, t);
  long k = 0;
  for (const double e : v) x.data()[k++] = static_cast<T>(e);
  REQUIRE(k == b * t);
  return x;
}

/// One row: old = -1 everywhere, rollout = -1 - d, so d = old - rollout = {0, 1, -0.5}.
struct Row3 {
  Tok<double> old = tok<double>(1, 3, {-1, -1, -1});
  Tok<double> roll = tok<double>(1, 3, {-1, -2, -0.5});
  Tok<std::uint8_t> m = tok<std::uint8_t>(1, 3, {1, 1, 1});
};

Tok<double> run(const Row3& c, const pl::RolloutIsOptions& o, pl::RolloutIsMetrics* met = nullptr) {
  Tok<double> w(1, 3);
  const auto r = pl::rollout_is_weights(c.old, c.roll, c.m, o, w);
  if (met) *met = r;
  return w;
}

void check_row(const Tok<double>& w, std::initializer_list<double> want) {
  long k = 0;
  for (const double v : want) {
    CAPTURE(k);
    CHECK(w.data()[k] == Approx(v).epsilon(1e-15).margin(0));
    ++k;
  }
}

}  // namespace

TEST_CASE("rollout_is_weights: token and sequence TIS / IcePop closed forms", "[rollout_correction]") {
  const Row3 c;
  const double e = std::exp(1.0), eh = std::exp(-0.5), es = std::exp(0.5);
  pl::RolloutIsOptions o;  // verl default: token TIS, upper 2
  pl::RolloutIsMetrics m;
  check_row(run(c, o, &m), {1, 2, eh});
  CHECK(m.weight_mean == Approx((3 + eh) / 3).epsilon(1e-15));
  CHECK(m.weight_max == 2);
  CHECK(m.weight_min == Approx(eh).epsilon(1e-15));
  CHECK(m.ratio_mean == Approx((1 + e + eh) / 3).epsilon(1e-15));
  CHECK(m.ratio_max == Approx(e).epsilon(1e-15));
  CHECK(m.truncated_fraction == Approx(1.0 / 3));
  CHECK(m.masked_fraction == 0);
  CHECK(m.valid_tokens == 3);
  CHECK(m.kept_tokens == 3);
  CHECK(m.kept_rows == 1);
  CHECK(m.batch_norm_factor == 1);

  o.bound = pl::RolloutIsBound::mask;  // verl "0.5_2.0": IcePop
  o.lower = 0.5;
  check_row(run(c, o, &m), {1, 0, eh});
  CHECK(m.masked_fraction == Approx(1.0 / 3));
  CHECK(m.truncated_fraction == Approx(1.0 / 3));
  CHECK(m.kept_tokens == 3);  // IcePop does not touch verl's response_mask
  o.lower = 0.7;              // e^-0.5 = 0.607 < 0.7
  check_row(run(c, o), {1, 0, 0});

  o.bound = pl::RolloutIsBound::truncate;  // TRL token_truncate with clip_min 0.7, clip_max 2
  check_row(run(c, o), {1, 2, 0.7});

  o = {};
  o.level = pl::RolloutIsLevel::sequence;  // sum d = 0.5: every token e^0.5
  check_row(run(c, o, &m), {es, es, es});
  CHECK(m.ratio_max == Approx(es).epsilon(1e-15));
  o.upper = 1.5;
  check_row(run(c, o), {1.5, 1.5, 1.5});
  o.bound = pl::RolloutIsBound::mask;
  check_row(run(c, o), {0, 0, 0});
  o.upper = 2.0;
  check_row(run(c, o), {es, es, es});

  o = {};
  o.level = pl::RolloutIsLevel::token;
  o.upper = inf_;  // TRL clip_max = None
  check_row(run(c, o), {1, e, eh});
}

TEST_CASE("rollout_is_weights: verl rejection sampling options", "[rollout_correction]") {
  const Row3 c;  // d = {0, 1, -0.5}: k1 = {0, -1, 0.5}, k2 = {0, 0.5, 0.125}, k3 = {0, e - 2, e^-0.5 - 0.5}
  const double e = std::exp(1.0);
  pl::RolloutIsOptions o;
  o.level = pl::RolloutIsLevel::none;
  pl::RolloutIsMetrics m;
  const auto rs = [&](pl::RolloutRs r, double up, std::optional<double> lo = std::nullopt) {
    o.rs = r;
    o.rs_upper = up;
    o.rs_lower = lo;
    return run(c, o, &m);
  };
  // token_k1, default lower 1/2: keep log(1/2) <= -d <= log 2.
  check_row(rs(pl::RolloutRs::token_k1, 2.0), {1, 0, 1});
  CHECK(m.rs_masked_fraction == Approx(1.0 / 3));
  CHECK(m.rs_seq_masked_fraction == 1);
  CHECK(m.kept_tokens == 2);
  CHECK(m.kept_rows == 1);
  // Lower 1/1.5: -d = 0.5 > log 1.5 = 0.405 is rejected.
  check_row(rs(pl::RolloutRs::token_k1, 1.5), {1, 0, 0});
  check_row(rs(pl::RolloutRs::token_k2, 0.125), {1, 0, 1});  // 0.125 <= 0.125: inclusive
  check_row(rs(pl::RolloutRs::token_k2, 0.1), {1, 0, 0});
  check_row(rs(pl::RolloutRs::token_k3, 0.2), {1, 0, 1});
  // Sequence statistics: sum k1 = -0.5, mean -1/6; sum k2 = 0.625, mean 0.2083, max 0.5;
  // sum k3 = e - 2.5 + e^-0.5, max e - 2.
  const double k3sum = e - 2.5 + std::exp(-0.5);
  check_row(rs(pl::RolloutRs::seq_sum_k1, 2.0), {1, 1, 1});  // -0.5 >= log 0.5
  check_row(rs(pl::RolloutRs::seq_sum_k1, 1.6), {0, 0, 0});  // -0.5 < log(1/1.6) = -0.47
  CHECK(m.rs_seq_masked_fraction == 1);
  CHECK(m.kept_rows == 0);
  check_row(rs(pl::RolloutRs::seq_sum_k2, 0.625), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_sum_k2, 0.62), {0, 0, 0});
  check_row(rs(pl::RolloutRs::seq_sum_k3, k3sum + 1e-12), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_sum_k3, k3sum - 1e-12), {0, 0, 0});
  // Geometric mean: -1/6 against log(1/1.2) = -0.182 (kept) and log(1/1.1) = -0.095 (rejected).
  check_row(rs(pl::RolloutRs::seq_mean_k1, 1.2), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_mean_k1, 1.1), {0, 0, 0});
  check_row(rs(pl::RolloutRs::seq_mean_k1, 1.1, 0.5), {1, 1, 1});  // explicit lower
  check_row(rs(pl::RolloutRs::seq_mean_k2, 0.625 / 3 + 1e-12), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_mean_k2, 0.625 / 3 - 1e-12), {0, 0, 0});
  check_row(rs(pl::RolloutRs::seq_mean_k3, k3sum / 3 + 1e-12), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_mean_k3, k3sum / 3 - 1e-12), {0, 0, 0});
  check_row(rs(pl::RolloutRs::seq_max_k2, 0.5), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_max_k2, 0.49), {0, 0, 0});
  check_row(rs(pl::RolloutRs::seq_max_k3, e - 2 + 1e-12), {1, 1, 1});
  check_row(rs(pl::RolloutRs::seq_max_k3, e - 2 - 1e-12), {0, 0, 0});

  // With IS weights: rejected tokens are 0, the others keep their TIS weight.
  o.level = pl::RolloutIsLevel::token;
  check_row(rs(pl::RolloutRs::token_k2, 0.125), {1, 0, std::exp(-0.5)});
  CHECK(m.masked_fraction == Approx(1.0 / 3));
  CHECK(m.weight_mean == Approx((1 + std::exp(-0.5)) / 3).epsilon(1e-15));
}

TEST_CASE("rollout_is_weights: bounds are inclusive as in verl and TRL", "[rollout_correction]") {
  // d = 0 exactly: rho = 1.
  Row3 c;
  c.roll = c.old;
  pl::RolloutIsOptions o;
  o.bound = pl::RolloutIsBound::mask;
  o.upper = 1.0;  // rho <= upper kept
  check_row(run(c, o), {1, 1, 1});
  o.upper = 2.0;
  o.lower = 1.0;  // rho >= lower kept
  check_row(run(c, o), {1, 1, 1});
  // One ulp above 1 (d = 2^-40): out of a band ending at 1.
  c.roll(0, 1) = -1 - std::ldexp(1.0, -40);
  o.lower = 0.5;
  o.upper = 1.0;
  check_row(run(c, o), {1, 0, 1});
  // k1 with lower 1: -d = 0 >= log 1 kept; -d = -2^-40 < 0 rejected.
  o = {};
  o.level = pl::RolloutIsLevel::none;
  o.rs = pl::RolloutRs::token_k1;
  o.rs_upper = 2.0;
  o.rs_lower = 1.0;
  check_row(run(c, o), {1, 0, 1});
}

TEST_CASE("rollout_is_weights: log-ratio clamp (verl SAFETY_BOUND) and no clamp (TRL)", "[rollout_correction]") {
  Row3 c;
  c.roll = tok<double>(1, 3, {-31, -1, -13});  // d = {30, 0, 12}: sum 42
  pl::RolloutIsOptions o;
  o.upper = inf_;
  o.bound = pl::RolloutIsBound::mask;
  o.lower = 1e-3;
  check_row(run(c, o), {std::exp(20.0), 1, std::exp(12.0)});
  o.log_ratio_clamp = std::nullopt;
  check_row(run(c, o), {std::exp(30.0), 1, std::exp(12.0)});
  o.level = pl::RolloutIsLevel::sequence;
  check_row(run(c, o), {std::exp(42.0), std::exp(42.0), std::exp(42.0)});
  o.log_ratio_clamp = 20.0;  // verl clamps the unclamped row sum once
  check_row(run(c, o), {std::exp(20.0), std::exp(20.0), std::exp(20.0)});
  // A sum far beyond double's exp range: inf is masked (above upper) or truncated to upper.
  c.roll = tok<double>(1, 3, {-401, -401, -1});
  o.log_ratio_clamp = std::nullopt;
  o.upper = 3.0;
  check_row(run(c, o), {0, 0, 0});
  o.bound = pl::RolloutIsBound::truncate;
  o.lower = 0;
  check_row(run(c, o), {3, 3, 3});
}

TEST_CASE("rollout_is_weights: batch normalization (verl rollout_is_batch_normalize)", "[rollout_correction]") {
  const Row3 c;
  pl::RolloutIsOptions o;
  o.batch_normalize = true;
  pl::RolloutIsMetrics m;
  const double eh = std::exp(-0.5), mean = (3 + eh) / 3;
  check_row(run(c, o, &m), {1 / mean, 2 / mean, eh / mean});
  CHECK(m.batch_norm_factor == Approx(mean).epsilon(1e-15));
  CHECK(m.weight_mean == Approx(1).epsilon(1e-15));
  // Sequence level: the mean over non-empty rows of each row's mean weight.
  const auto old = tok<double>(3, 2, {-1, -1, -1, -1, -1, -1});
  const auto roll = tok<double>(3, 2, {-1.25, -1.25, nan_, inf_, -1.5, -1});  // sums 0.5, -, 0.5
  const auto mk = tok<std::uint8_t>(3, 2, {1, 1, 0, 0, 1, 1});
  o.level = pl::RolloutIsLevel::sequence;
  o.upper = 1.5;
  Tok<double> w(3, 2);
  m = pl::rollout_is_weights(old, roll, mk, o, w);
  CHECK(m.batch_norm_factor == Approx(1.5).epsilon(1e-15));
  for (long k : {0L, 1L, 4L, 5L}) CHECK(w.data()[k] == Approx(1).epsilon(1e-15));
  CHECK(w(1, 0) == 0);
  CHECK(w(1, 1) == 0);
  // All weights 0 (IcePop rejects everything): verl's mean > 1e-8 guard leaves them alone.
  o.bound = pl::RolloutIsBound::mask;
  o.upper = 1.2;
  m = pl::rollout_is_weights(old, roll, mk, o, w);
  CHECK(m.batch_norm_factor == 1);
  CHECK(m.weight_max == 0);
}

TEST_CASE("rollout_is_weights: padding with NaN / inf never leaks; empty rows and batches", "[rollout_correction]") {
  const long B = 3, T = 5;
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 0.4);
  Tok<double> old(B, T), roll(B, T), old2(B, T), roll2(B, T);
  Tok<float> mf(B, T);
  const int len[B] = {5, 0, 3};  // row 1 empty
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool v = t < len[i];
      mf(i, t) = v ? 0.5f : 0.f;  // a float mask only selects
      old(i, t) = v ? -1.0 + 0.1 * static_cast<double>(t) : ((i + t) % 2 ? nan_ : -inf_);
      roll(i, t) = v ? old(i, t) + nd(rng) : ((i + t) % 2 ? inf_ : nan_);
      old2(i, t) = v ? old(i, t) : -3.0;
      roll2(i, t) = v ? roll(i, t) : 7.0;
    }
  const pl::RolloutIsLevel levels[] = {pl::RolloutIsLevel::none, pl::RolloutIsLevel::token,
                                       pl::RolloutIsLevel::sequence};
  const pl::RolloutRs modes[] = {pl::RolloutRs::none, pl::RolloutRs::token_k1, pl::RolloutRs::seq_sum_k3,
                                 pl::RolloutRs::seq_mean_k1, pl::RolloutRs::seq_max_k2};
  for (const auto lv : levels)
    for (const auto rs : modes)
      for (const bool bn : {false, true}) {
        pl::RolloutIsOptions o;
        o.level = lv;
        o.batch_normalize = bn;
        o.rs = rs;
        if (rs != pl::RolloutRs::none) o.rs_upper = rs == pl::RolloutRs::seq_sum_k3 ? 0.3 : 1.5;
        Tok<double> w(B, T), w2(B, T);
        Tok<bool> keep(B, T);
        const auto m1 = pl::rollout_is_weights(old, roll, mf, o, w, keep);
        const auto m2 = pl::rollout_is_weights(old2, roll2, mf, o, w2);
        for (long k = 0; k < w.size(); ++k) {
          CAPTURE(static_cast<int>(lv), static_cast<int>(rs), bn, k);
          REQUIRE(std::isfinite(w.data()[k]));
          CHECK(w.data()[k] == w2.data()[k]);
          if (mf.data()[k] == 0.f) {
            CHECK(w.data()[k] == 0);
            CHECK(!keep.data()[k]);
          }
        }
        CHECK(m1.weight_mean == m2.weight_mean);
        CHECK(m1.ratio_mean == m2.ratio_mean);
        CHECK(m1.valid_tokens == 8);
        CHECK(m1.kept_rows <= 2);
        CHECK(std::isfinite(m1.ratio_max));
      }

  // Batch of one row, and an empty batch (metrics 0, nothing to write).
  Tok<double> w1(1, T);
  Eigen::TensorMap<const Tok<double>> o1(old.data(), 1, T), r1(roll.data(), 1, T);
  Eigen::TensorMap<const Tok<float>> m1(mf.data(), 1, T);
  const auto one = pl::rollout_is_weights(o1, r1, m1, pl::RolloutIsOptions{}, w1);
  CHECK(one.valid_tokens == 5);
  CHECK(one.kept_rows == 1);
  Tok<double> e0(0, T), ew(0, T);
  Tok<std::uint8_t> em(0, T);
  const auto z = pl::rollout_is_weights(e0, e0, em, pl::RolloutIsOptions{}, ew);
  CHECK(z.valid_tokens == 0);
  CHECK(z.weight_mean == 0);
  CHECK(z.rs_seq_masked_fraction == 0);
  CHECK(z.batch_norm_factor == 1);
  CHECK(z.rollout_kl == 0);
  // A batch with no valid token: all weights 0, metrics 0 (verl raises here).
  Tok<std::uint8_t> none(B, T);
  none.setZero();
  Tok<double> wn(B, T);
  wn.setConstant(5);
  const auto n0 = pl::rollout_is_weights(old, roll, none, pl::RolloutIsOptions{}, wn);
  CHECK(n0.weight_mean == 0);
  CHECK(n0.kept_rows == 0);
  for (long k = 0; k < wn.size(); ++k) CHECK(wn.data()[k] == 0);
}

TEST_CASE("rollout_is_weights: float equals double, packed equals padded, in place", "[rollout_correction]") {
  const long B = 3, T = 4;
  const int len[B] = {4, 2, 3};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-3.f, -0.1f), d(-0.6f, 0.6f);
  Tok<float> old(B, T), roll(B, T);
  Tok<std::uint8_t> m(B, T);
  Eigen::Tensor<float, 1> po(9), pr(9);
  Eigen::Tensor<std::uint8_t, 1> pm(9);
  Eigen::Tensor<std::int64_t, 1> cu(B + 1);
  cu(0) = 0;
  long k = 0;
  for (long i = 0; i < B; ++i) {
    for (long t = 0; t < T; ++t) {
      m(i, t) = t < len[i];
      old(i, t) = t < len[i] ? u(rng) : nan_;
      roll(i, t) = t < len[i] ? old(i, t) + d(rng) : -inf_;
      if (t < len[i]) {
        po(k) = old(i, t);
        pr(k) = roll(i, t);
        pm(k) = 1;
        ++k;
      }
    }
    cu(i + 1) = k;
  }
  const Tok<double> oldd = old.cast<double>(), rolld = roll.cast<double>();
  for (const auto lv : {pl::RolloutIsLevel::token, pl::RolloutIsLevel::sequence}) {
    pl::RolloutIsOptions o;
    o.level = lv;
    o.bound = pl::RolloutIsBound::mask;
    o.lower = 0.6;
    o.rs = pl::RolloutRs::seq_mean_k3;
    o.rs_upper = 0.05;
    Tok<float> wf(B, T);
    Tok<double> wd(B, T);
    const auto mf_ = pl::rollout_is_weights(old, roll, m, o, wf);
    const auto md_ = pl::rollout_is_weights(oldd, rolld, m, o, wd);
    CHECK(mf_.weight_mean == md_.weight_mean);  // computed in double from the same values
    for (long j = 0; j < wf.size(); ++j) CHECK(wf.data()[j] == static_cast<float>(wd.data()[j]));
    Eigen::Tensor<float, 1> pw(9);
    const auto mp = pl::rollout_is_weights(pl::packed(po, cu), pl::packed(pr, cu), pl::packed(pm, cu), o, pw);
    CHECK(mp.weight_mean == md_.weight_mean);
    CHECK(mp.kept_rows == md_.kept_rows);
    k = 0;
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < len[i]; ++t) CHECK(pw(k++) == wf(i, t));
    // In place: weights over old_logp's storage.
    Tok<double> inplace = oldd;
    pl::rollout_is_weights(inplace, rolld, m, o, inplace);
    for (long j = 0; j < wd.size(); ++j) CHECK(inplace.data()[j] == wd.data()[j]);
  }
}

// ---- the ppo_clip recipe ---------------------------------------------------------------------

namespace {

/// verl compute_policy_loss_vanilla's pg_losses (clamp +-20, clip 0.2, dual clip 3) times the
/// rollout weights, then agg_loss over the modified response mask (keep), in long double.
/// token-mean: sum keep w l / sum keep; seq-mean-token-mean: rows with a kept token, each
/// sum keep w l / sum keep (verl's + 1e-8 in that divisor left out, as prefloss documents).
ld verl_reference(const Tok<double>& lp, const Tok<double>& old, const Tok<double>& adv, const Tok<double>& w,
                  const Tok<double>& keep, pl::Aggregation agg) {
  const long B = lp.dimension(0), T = lp.dimension(1);
  ld total = 0, count = 0, rows = 0, row_sum_mean = 0;
  for (long i = 0; i < B; ++i) {
    ld s = 0, n = 0;
    for (long t = 0; t < T; ++t) {
      if (keep(i, t) == 0) continue;
      const ld d = std::fmin(std::fmax(static_cast<ld>(lp(i, t)) - old(i, t), -20.0L), 20.0L);
      const ld r = std::exp(d), a = adv(i, t);
      const ld l1 = -a * r, l2 = -a * std::fmin(std::fmax(r, 0.8L), 1.2L);
      const ld c1 = std::fmax(l1, l2);
      const ld l = a < 0 ? std::fmin(-a * 3.0L, c1) : c1;
      s += l * static_cast<ld>(w(i, t));
      n += 1;
    }
    total += s;
    count += n;
    if (n > 0) {
      rows += 1;
      row_sum_mean += s / n;
    }
  }
  if (agg == pl::Aggregation::token_mean) return count > 0 ? total / count : 0;
  return rows > 0 ? row_sum_mean / rows : 0;
}

}  // namespace

TEST_CASE("rollout_is_weights + ppo_clip equals verl pg_losses * rollout_is_weights + agg_loss",
          "[rollout_correction][recipe]") {
  const long B = 5, T = 9;
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> ulp(-2.5, -0.2), udr(-0.3, 0.3), ua(-1.5, 1.5), ud(-0.5, 0.5);
  Tok<double> lp(B, T), old(B, T), roll(B, T), adv(B, T);
  Tok<std::uint8_t> m(B, T);
  const int len[B] = {9, 6, 0, 4, 8};
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool v = t < len[i] && !(i == 4 && t == 3);
      m(i, t) = v;
      old(i, t) = v ? ulp(rng) : nan_;
      roll(i, t) = v ? old(i, t) + ud(rng) : inf_;
      double dr = udr(rng);
      // Keep |r - 1 -+ 0.2| away from the clip kinks so the finite differences are smooth.
      while (std::fabs(std::fabs(dr) - std::log(1.2)) < 0.02 || std::fabs(dr + std::log(1.25)) < 0.02) dr = udr(rng);
      lp(i, t) = v ? old(i, t) + dr : -inf_;
      adv(i, t) = v ? ua(rng) : nan_;
    }
  struct Setup {
    pl::RolloutIsLevel level;
    pl::RolloutIsBound bound;
    double lower, upper;
    pl::RolloutRs rs;
  };
  const Setup setups[] = {
      {pl::RolloutIsLevel::token, pl::RolloutIsBound::truncate, 0, 1.3, pl::RolloutRs::none},
      {pl::RolloutIsLevel::token, pl::RolloutIsBound::mask, 0.8, 1.25, pl::RolloutRs::token_k2},  // IcePop zeros
      {pl::RolloutIsLevel::sequence, pl::RolloutIsBound::truncate, 0, 2.0, pl::RolloutRs::seq_mean_k1},
  };
  int zeroed_by_icepop_in_kept = 0, rejected_rows = 0;
  for (const Setup& s : setups) {
    pl::RolloutIsOptions o;
    o.level = s.level;
    o.bound = s.bound;
    o.lower = s.lower;
    o.upper = s.upper;
    o.rs = s.rs;
    if (s.rs == pl::RolloutRs::token_k2) o.rs_upper = 0.08;
    if (s.rs == pl::RolloutRs::seq_mean_k1) o.rs_upper = 1.1;
    Tok<double> w(B, T), keep(B, T);
    const auto met = pl::rollout_is_weights(old, roll, m, o, w, keep);
    REQUIRE(met.kept_tokens > 0);
    for (long k = 0; k < w.size(); ++k) zeroed_by_icepop_in_kept += keep.data()[k] != 0 && w.data()[k] == 0;
    rejected_rows += static_cast<int>(4 - met.kept_rows);  // row 2 is empty
    for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
      CAPTURE(static_cast<int>(s.level), static_cast<int>(s.rs), static_cast<int>(agg));
      pl::PpoOptions po;
      po.dual_clip = 3;
      po.aggregation = agg;
      if (agg == pl::Aggregation::token_mean) {
        po.token_count = met.kept_tokens;
      } else {
        const Eigen::Tensor<double, 1> rw = pl::row_weights(keep);
        po.row_weights.assign(rw.data(), rw.data() + rw.size());
        po.sequence_count = met.kept_rows;
      }
      Tok<double> g(B, T);
      const auto r = pl::ppo_clip(lp, old, adv, w, po, g);
      const ld want = verl_reference(lp, old, adv, w, keep, agg);
      CHECK(static_cast<double>(r.loss) == Approx(static_cast<double>(want)).epsilon(1e-13));
      // Central differences of the long-double reference, step h in double.
      const double h = 1e-6;
      double gmax = 0, err = 0;
      for (long k = 0; k < lp.size(); ++k) {
        if (m.data()[k] == 0) {
          CHECK(g.data()[k] == 0);
          continue;
        }
        Tok<double> xp = lp, xm = lp;
        xp.data()[k] += h;
        xm.data()[k] -= h;
        const ld fd = (verl_reference(xp, old, adv, w, keep, agg) - verl_reference(xm, old, adv, w, keep, agg)) /
                      static_cast<ld>(xp.data()[k] - xm.data()[k]);
        if (w.data()[k] == 0 || keep.data()[k] == 0) CHECK(g.data()[k] == 0);
        gmax = std::fmax(gmax, std::fabs(static_cast<double>(fd)));
        err = std::fmax(err, std::fabs(g.data()[k] - static_cast<double>(fd)));
      }
      CAPTURE(gmax, err);
      CHECK(gmax > 0);
      CHECK(err <= 1e-8 * gmax);
      // Without the 0/1 divisors the float mask's own weights would divide: a different loss.
      pl::PpoOptions plain;
      plain.dual_clip = 3;
      plain.aggregation = agg;
      const auto wrong = pl::ppo_clip(lp, old, adv, w, plain);
      CHECK(std::fabs(static_cast<double>(wrong.loss - want)) > 1e-6 * std::fabs(static_cast<double>(want)));
    }
  }
  CHECK(zeroed_by_icepop_in_kept > 0);  // the cases exercise IcePop zeros under a kept token
  CHECK(rejected_rows > 0);             // and a row rejected whole
}

// ---- OpenRLHF PolicyLoss's vLLM IS correction -----------------------------------------------

namespace {

/// The RolloutIsOptions that rl/rollout_correction.hpp documents for OpenRLHF's
/// vllm_is_correction_type with vllm_is_truncated_threshold = [low, high].
pl::RolloutIsOptions openrlhf_options(const std::string& type, double low, double high) {
  pl::RolloutIsOptions o;
  o.level = pl::RolloutIsLevel::token;
  o.log_ratio_clamp = std::nullopt;
  o.lower = low;
  o.upper = high;
  o.bound = type == "icepop" ? pl::RolloutIsBound::mask : pl::RolloutIsBound::truncate;
  if (type == "seq-mask-tis") {
    o.lower = 0;
    o.upper = inf_;
    o.rs = pl::RolloutRs::seq_mean_k1;
    o.rs_lower = std::isinf(high) ? std::numeric_limits<double>::denorm_min() : 1.0 / high;
    o.rs_upper = 1.0 / low;
  }
  return o;
}

/// OpenRLHF's vllm_is (PolicyLoss.forward at 3c3be623) in double, reading valid tokens only:
/// tis clamp(exp(d), low, high); icepop exp(d) [low <= exp(d) <= high]; seq-mask-tis
/// [low <= exp(masked_mean(d)) <= high] exp(d), with an empty row's 0 / 0 = NaN failing both tests.
template <class M>
Tok<double> openrlhf_is(const Tok<double>& old, const Tok<double>& roll, const Tok<M>& m, const std::string& type,
                        double low, double high) {
  const long B = old.dimension(0), T = old.dimension(1);
  Tok<double> w(B, T);
  w.setZero();
  for (long i = 0; i < B; ++i) {
    double sum = 0, n = 0;
    for (long t = 0; t < T; ++t)
      if (m(i, t) != M(0)) {
        sum += old(i, t) - roll(i, t);
        n += 1;
      }
    const double seq_is = std::exp(sum / n);  // NaN for an empty row
    const bool seq_mask = seq_is >= low && seq_is <= high;
    for (long t = 0; t < T; ++t) {
      if (m(i, t) == M(0)) continue;
      const double is = std::exp(old(i, t) - roll(i, t));
      w(i, t) = type == "tis"      ? std::fmin(std::fmax(is, low), high)
                : type == "icepop" ? (is >= low && is <= high ? is : 0.0)
                                   : (seq_mask ? is : 0.0);
    }
  }
  return w;
}

}  // namespace

TEST_CASE("rollout_is_weights: OpenRLHF tis / icepop / seq-mask-tis closed forms", "[rollout_correction][openrlhf]") {
  const Row3 c;  // d = {0, 1, -0.5}: mean 1/6, geometric-mean ratio e^(1/6) = 1.18
  const double e = std::exp(1.0), eh = std::exp(-0.5);
  pl::RolloutIsMetrics m;
  check_row(run(c, openrlhf_options("tis", 0.5, 2.0), &m), {1, 2, eh});
  CHECK(m.rollout_kl == Approx(-1.0 / 6).epsilon(1e-15));  // vllm_kl = masked_mean(rollout - old)
  check_row(run(c, openrlhf_options("tis", 0.7, 2.0)), {1, 2, 0.7});
  check_row(run(c, openrlhf_options("icepop", 0.5, 2.0), &m), {1, 0, eh});
  CHECK(m.kept_tokens == 3);
  check_row(run(c, openrlhf_options("icepop", 0.7, 2.0)), {1, 0, 0});
  // seq-mask-tis: the token weights are exp(d) untruncated (e > high = 2 stays e).
  check_row(run(c, openrlhf_options("seq-mask-tis", 0.5, 2.0), &m), {1, e, eh});
  CHECK(m.kept_rows == 1);
  CHECK(m.truncated_fraction == 0);
  check_row(run(c, openrlhf_options("seq-mask-tis", 0.5, 1.1), &m), {0, 0, 0});  // 1.18 > 1.1
  CHECK(m.kept_tokens == 0);
  CHECK(m.valid_tokens == 3);  // OpenRLHF's divisor still counts the row
  CHECK(m.rollout_kl == Approx(-1.0 / 6).epsilon(1e-15));
  check_row(run(c, openrlhf_options("seq-mask-tis", 1.2, 5.0)), {0, 0, 0});   // 1.18 < 1.2
  check_row(run(c, openrlhf_options("seq-mask-tis", 0.0, 1.2)), {1, e, eh});  // low 0: rs_upper = +inf
  // high = +inf through rs_lower = denorm_min: a geometric mean of e^700 is kept.
  Row3 big;
  big.roll = tok<double>(1, 3, {-701, -701, -701});
  check_row(run(big, openrlhf_options("seq-mask-tis", 0.5, inf_)), {std::exp(700.0), std::exp(700.0), std::exp(700.0)});
  check_row(run(big, openrlhf_options("seq-mask-tis", 0.5, 1e300)), {0, 0, 0});
  // Each against the independent double reference as well.
  for (const char* type : {"tis", "icepop", "seq-mask-tis"})
    for (const auto& [lo, hi] : {std::pair<double, double>{0.5, 2.0}, {0.7, 1.5}, {1.1, 3.0}, {0.0, 1.2}}) {
      CAPTURE(type, lo, hi);
      const Tok<double> want = openrlhf_is(c.old, c.roll, c.m, type, lo, hi);
      check_row(run(c, openrlhf_options(type, lo, hi)), {want(0, 0), want(0, 1), want(0, 2)});
    }
}

TEST_CASE("rollout_is_weights: OpenRLHF ratios exactly at the bounds are kept", "[rollout_correction][openrlhf]") {
  const double l2 = std::log(2.0);
  // d = old - roll exactly: {l2, l2} and {-l2, -l2}, ratios exp(+-l2) == 2 and 0.5 exactly in
  // double (required below, so that the bounds are hit), and a row with d = {0.5, -0.5, 0}:
  // mean 0, geometric-mean ratio 1.
  const auto old = tok<double>(3, 3, {0, 0, 0, 0, 0, 0, -1, -1, -1});
  const auto roll = tok<double>(3, 3, {-l2, -l2, nan_, l2, l2, -inf_, -1.5, -0.5, -1});
  const auto m = tok<std::uint8_t>(3, 3, {1, 1, 0, 1, 1, 0, 1, 1, 1});
  REQUIRE(std::exp(l2) == 2.0);
  REQUIRE(std::exp(-l2) == 0.5);
  const double es = std::exp(0.5), eh = std::exp(-0.5);
  struct Case {
    const char* type;
    double lo, hi;
    std::vector<double> want;
  };
  const Case cases[] = {
      {"tis", 0.5, 2.0, {2, 2, 0, 0.5, 0.5, 0, es, eh, 1}},
      {"tis", 0.61, 1.5, {1.5, 1.5, 0, 0.61, 0.61, 0, 1.5, 0.61, 1}},
      {"icepop", 0.5, 2.0, {2, 2, 0, 0.5, 0.5, 0, es, eh, 1}},  // rho = low and rho = high kept
      {"icepop", 1.0, 1.0, {0, 0, 0, 0, 0, 0, 0, 0, 1}},        // rho = 1 in the band [1, 1]
      {"seq-mask-tis", 0.5, 2.0, {2, 2, 0, 0.5, 0.5, 0, es, eh, 1}},
      {"seq-mask-tis", 2.0, 2.0, {2, 2, 0, 0, 0, 0, 0, 0, 0}},  // geometric mean 2 = low = high
      {"seq-mask-tis", 0.5, 0.5, {0, 0, 0, 0.5, 0.5, 0, 0, 0, 0}},
      {"seq-mask-tis", 1.0, 1.0, {0, 0, 0, 0, 0, 0, es, eh, 1}},
  };
  for (const Case& k : cases) {
    CAPTURE(k.type, k.lo, k.hi);
    Tok<double> w(3, 3);
    pl::rollout_is_weights(old, roll, m, openrlhf_options(k.type, k.lo, k.hi), w);
    const Tok<double> ref = openrlhf_is(old, roll, m, k.type, k.lo, k.hi);
    for (long j = 0; j < 9; ++j) {
      CAPTURE(j);
      CHECK(ref.data()[j] == Approx(k.want[static_cast<std::size_t>(j)]).epsilon(1e-15).margin(0));
      CHECK(w.data()[j] == Approx(k.want[static_cast<std::size_t>(j)]).epsilon(1e-15).margin(0));
    }
  }
  // Just past a bound: d = 2^-40 on one token of the mean-0 row, band [1, 1] rejects it.
  auto roll2 = roll;
  roll2(2, 2) = -1 - std::ldexp(1.0, -40);
  Tok<double> w(3, 3);
  pl::rollout_is_weights(old, roll2, m, openrlhf_options("seq-mask-tis", 1.0, 1.0), w);
  for (long j = 0; j < 9; ++j) CHECK(w.data()[j] == 0);
  pl::rollout_is_weights(old, roll2, m, openrlhf_options("seq-mask-tis", 1.0, 1.001), w);
  CHECK(w(2, 2) == Approx(std::exp(std::ldexp(1.0, -40))).epsilon(1e-15));
}

TEST_CASE("rollout_is_weights: OpenRLHF modes with NaN / inf padding and an empty row",
          "[rollout_correction][openrlhf]") {
  const long B = 4, T = 6;
  std::mt19937 rng(21);
  std::normal_distribution<double> nd(0.0, 0.3);
  Tok<double> old(B, T), roll(B, T), old2(B, T), roll2(B, T);
  Tok<std::uint8_t> m(B, T);
  const int len[B] = {6, 0, 4, 5};  // row 1 empty: OpenRLHF's 0 / 0 = NaN fails both bounds
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool v = t < len[i] && !(i == 3 && t == 2);
      m(i, t) = v;
      old(i, t) = v ? -1.5 + 0.2 * static_cast<double>(t) : ((i + t) % 2 ? nan_ : -inf_);
      roll(i, t) = v ? old(i, t) + nd(rng) + (i == 2 ? 0.8 : 0.0) : ((i + t) % 2 ? inf_ : nan_);
      old2(i, t) = v ? old(i, t) : 4.0;
      roll2(i, t) = v ? roll(i, t) : -30.0;
    }
  double sum_d = 0, n = 0;
  for (long k = 0; k < old.size(); ++k)
    if (m.data()[k]) {
      sum_d += roll.data()[k] - old.data()[k];
      n += 1;
    }
  int rejected_rows = 0;
  for (const char* type : {"tis", "icepop", "seq-mask-tis"}) {
    CAPTURE(type);
    const auto o = openrlhf_options(type, 0.5, 1.6);
    Tok<double> w(B, T), w2(B, T);
    Tok<bool> keep(B, T);
    const auto met = pl::rollout_is_weights(old, roll, m, o, w, keep);
    const auto met2 = pl::rollout_is_weights(old2, roll2, m, o, w2);
    const Tok<double> ref = openrlhf_is(old, roll, m, type, 0.5, 1.6);
    for (long k = 0; k < w.size(); ++k) {
      CAPTURE(k);
      REQUIRE(std::isfinite(w.data()[k]));
      CHECK(w.data()[k] == w2.data()[k]);
      CHECK(w.data()[k] == Approx(ref.data()[k]).epsilon(1e-15).margin(0));
      if (!m.data()[k]) CHECK(!keep.data()[k]);
    }
    for (long t = 0; t < T; ++t) CHECK(w(1, t) == 0);
    CHECK(met.valid_tokens == 14);
    CHECK(met.rollout_kl == Approx(sum_d / n).epsilon(1e-14));
    CHECK(met.rollout_kl == met2.rollout_kl);
    CHECK(met.weight_mean == met2.weight_mean);
    if (std::string(type) == "seq-mask-tis") rejected_rows = static_cast<int>(3 - met.kept_rows);
  }
  CHECK(rejected_rows == 1);  // row 2 (mean d ~ 0.8 > log 1.6)
}

namespace {

/// OpenRLHF PolicyLoss.forward (policy_loss_type "ppo", enable_vllm_is_correction) at 3c3be623 in
/// long double: ratio = exp(clamp(logp - old, -20, 20)), surr1 = ratio A, surr2 = clamp(ratio,
/// 1 - eps_low, 1 + eps_high) A, loss = -min(surr1, surr2) (dual clip: -max(min, c A) where
/// A < 0), loss *= vllm_is, then aggregate_loss over the ORIGINAL action_mask: token level
/// sum / token count (or / batch_num_tokens * dp_size), sample level the mean over rows with a
/// token of each row's sum / its token count (the 1e-8 left out, as prefloss documents).
ld openrlhf_reference(const Tok<double>& lp, const Tok<double>& old, const Tok<double>& adv, const Tok<double>& vllm_is,
                      const Tok<std::uint8_t>& m, double dual, bool token_level, double batch_num_tokens = 0,
                      double dp_size = 1) {
  const long B = lp.dimension(0), T = lp.dimension(1);
  const ld el = 0.2L, eh = 0.28L;
  ld total = 0, count = 0, rows = 0, row_mean_sum = 0;
  for (long i = 0; i < B; ++i) {
    ld s = 0, n = 0;
    for (long t = 0; t < T; ++t) {
      if (!m(i, t)) continue;
      const ld r = std::exp(std::fmin(std::fmax(static_cast<ld>(lp(i, t)) - old(i, t), -20.0L), 20.0L));
      const ld a = adv(i, t);
      const ld surr1 = r * a, surr2 = std::fmin(std::fmax(r, 1 - el), 1 + eh) * a;
      const ld clip1 = std::fmin(surr1, surr2);
      const ld l = dual > 0 && a < 0 ? -std::fmax(clip1, static_cast<ld>(dual) * a) : -clip1;
      s += static_cast<ld>(vllm_is(i, t)) * l;
      n += 1;
    }
    total += s;
    count += n;
    if (n > 0) {
      rows += 1;
      row_mean_sum += s / n;
    }
  }
  if (token_level) return batch_num_tokens > 0 ? total / batch_num_tokens * dp_size : total / count;
  return row_mean_sum / rows;
}

}  // namespace

TEST_CASE("rollout_is_weights + ppo_clip equals OpenRLHF PolicyLoss with vllm IS correction",
          "[rollout_correction][recipe][openrlhf]") {
  const long B = 5, T = 9;
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> ulp(-2.5, -0.2), udr(-0.3, 0.3), ua(-1.5, 1.5), ud(-0.5, 0.5),
      ushift(-0.15, 0.15);
  Tok<double> lp(B, T), old(B, T), roll(B, T), adv(B, T);
  Tok<std::uint8_t> m(B, T);
  const int len[B] = {9, 6, 0, 7, 8};
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T; ++t) {
      const bool v = t < len[i] && !(i == 4 && t == 3);
      m(i, t) = v;
      old(i, t) = v ? ulp(rng) : nan_;
      // Row 3's rollout log-probs sit 0.6 below: its geometric-mean ratio ~ e^0.6 = 1.8.
      roll(i, t) = v ? old(i, t) - (i == 3 ? 0.6 + ushift(rng) : ud(rng)) : -inf_;
      double dr = udr(rng);
      // Keep r away from the clip kinks 0.8 and 1.28 so the finite differences are smooth.
      while (std::fabs(dr - std::log(1.28)) < 0.02 || std::fabs(dr - std::log(0.8)) < 0.02) dr = udr(rng);
      lp(i, t) = v ? old(i, t) + dr : nan_;
      adv(i, t) = v ? ua(rng) : inf_;
    }
  // One token beyond the +-20 policy log-ratio clamp (clipped too), and one with A < 0 and
  // r = e^1.5 > 3 that dual clip caps.
  lp(0, 2) = old(0, 2) + 22.0;
  adv(0, 2) = 0.7;
  lp(0, 4) = old(0, 4) + 1.5;
  adv(0, 4) = -0.8;
  const Tok<double> lp0 = lp;
  struct Setup {
    const char* type;
    double low, high;
  };
  const Setup setups[] = {{"tis", 0.8, 1.25}, {"icepop", 0.8, 1.25}, {"seq-mask-tis", 0.5, 1.5}};
  int weight_zero_tokens = 0, rejected_rows = 0, truncated = 0;
  for (const Setup& s : setups) {
    Tok<double> w(B, T), keep(B, T);
    const auto met = pl::rollout_is_weights(old, roll, m, openrlhf_options(s.type, s.low, s.high), w, keep);
    const Tok<double> vllm_is = openrlhf_is(old, roll, m, s.type, s.low, s.high);
    for (long k = 0; k < w.size(); ++k) {
      CHECK(w.data()[k] == Approx(vllm_is.data()[k]).epsilon(1e-15).margin(0));
      weight_zero_tokens += m.data()[k] && w.data()[k] == 0;
    }
    truncated += met.truncated_fraction > 0;
    rejected_rows += static_cast<int>(4 - met.kept_rows);  // row 2 is empty
    const pl::TokenCounts counts = pl::token_counts(m);
    REQUIRE(met.valid_tokens == static_cast<double>(counts.tokens));
    for (const double dual : {0.0, 3.0})
      for (const int mode : {0, 1, 2}) {  // token level, token level with batch_num_tokens, sample level
        CAPTURE(s.type, dual, mode);
        const bool token_level = mode < 2;
        const double batch_num_tokens = mode == 1 ? 100.0 : 0.0, dp_size = mode == 1 ? 4.0 : 1.0;
        pl::PpoOptions po;
        po.clip_low = 0.2;
        po.clip_high = 0.28;
        po.dual_clip = dual;
        if (token_level) {
          po.aggregation = pl::Aggregation::token_mean;
          po.token_count = mode == 1 ? batch_num_tokens / dp_size : met.valid_tokens;
        } else {
          po.aggregation = pl::Aggregation::seq_mean_token_mean;
          const Eigen::Tensor<double, 1> rw = pl::row_weights(m);
          po.row_weights.assign(rw.data(), rw.data() + rw.size());
          po.sequence_count = static_cast<double>(counts.nonempty_rows);
        }
        Tok<double> g(B, T);
        const auto r = pl::ppo_clip(lp, old, adv, w, po, g);
        const ld want = openrlhf_reference(lp, old, adv, vllm_is, m, dual, token_level, batch_num_tokens, dp_size);
        CHECK(static_cast<double>(r.loss) == Approx(static_cast<double>(want)).epsilon(1e-13));
        const double h = 1e-6;
        double gmax = 0, err = 0;
        for (long k = 0; k < lp.size(); ++k) {
          CAPTURE(k);
          if (!m.data()[k] || w.data()[k] == 0) {
            CHECK(g.data()[k] == 0);
            if (!m.data()[k]) continue;
          }
          Tok<double> xp = lp0, xm = lp0;
          xp.data()[k] += h;
          xm.data()[k] -= h;
          const ld fd = (openrlhf_reference(xp, old, adv, vllm_is, m, dual, token_level, batch_num_tokens, dp_size) -
                         openrlhf_reference(xm, old, adv, vllm_is, m, dual, token_level, batch_num_tokens, dp_size)) /
                        static_cast<ld>(xp.data()[k] - xm.data()[k]);
          gmax = std::fmax(gmax, std::fabs(static_cast<double>(fd)));
          err = std::fmax(err, std::fabs(g.data()[k] - static_cast<double>(fd)));
        }
        CAPTURE(gmax, err);
        CHECK(gmax > 0);
        CHECK(err <= 1e-8 * gmax);
        CHECK(g(0, 2) == 0);                  // beyond the +-20 clamp
        CHECK((g(0, 4) == 0) == (dual > 0));  // capped by dual clip
        // verl's divisor (the tokens rs keeps) is a different loss once seq-mask-tis rejects a row.
        if (mode == 0 && met.kept_tokens < met.valid_tokens) {
          pl::PpoOptions verl_po = po;
          verl_po.token_count = met.kept_tokens;
          const auto v = pl::ppo_clip(lp, old, adv, w, verl_po);
          CHECK(std::fabs(static_cast<double>(v.loss - want)) > 1e-3 * std::fabs(static_cast<double>(want)));
        }
      }
  }
  CHECK(weight_zero_tokens > 0);  // IcePop zeros and a rejected row occur
  CHECK(rejected_rows == 1);      // row 3 under seq-mask-tis
  CHECK(truncated > 0);           // tis truncates
}

// ---- bad input -------------------------------------------------------------------------------

TEST_CASE("rollout_is_weights: bad options and arguments throw, nothing written", "[rollout_correction][errors]") {
  const auto old = tok<double>(2, 3, {-1, -1, -1, -1, -1, nan_});
  auto roll = tok<double>(2, 3, {-1, -2, -0.5, -1, -1, inf_});
  const auto m = tok<std::uint8_t>(2, 3, {1, 1, 1, 1, 1, 0});
  Tok<double> w(2, 3);
  w.setConstant(7);
  const auto untouched = [&] {
    for (long k = 0; k < w.size(); ++k) CHECK(w.data()[k] == 7);
  };
  const auto opt_throw = [&](const pl::RolloutIsOptions& o, std::initializer_list<std::string> needles) {
    expect_throw<pl::option_error>([&] { pl::rollout_is_weights(old, roll, m, o, w); }, "rollout_is_weights", needles);
    untouched();
  };
  pl::RolloutIsOptions o;
  o.upper = 0;
  opt_throw(o, {"'upper'", "> 0", "got 0"});
  o.upper = -1;
  opt_throw(o, {"'upper'", "got -1"});
  o.upper = nan_;
  opt_throw(o, {"'upper'", "nan"});
  o = {};
  o.lower = -0.5;
  opt_throw(o, {"'lower'", "got -0.5"});
  o.lower = 3;  // > upper 2
  opt_throw(o, {"'lower'", "<= upper (2)", "got 3"});
  o.lower = inf_;
  o.upper = inf_;
  opt_throw(o, {"'lower'", "finite"});
  o = {};
  o.log_ratio_clamp = 0.0;
  opt_throw(o, {"'log_ratio_clamp'", "got 0"});
  o = {};
  o.level = static_cast<pl::RolloutIsLevel>(7);
  opt_throw(o, {"'level'", "unknown value 7"});
  o = {};
  o.bound = static_cast<pl::RolloutIsBound>(-1);
  opt_throw(o, {"'bound'", "unknown value -1"});
  o = {};
  o.rs = static_cast<pl::RolloutRs>(12);
  opt_throw(o, {"'rs'", "unknown value 12"});
  o = {};
  o.rs = pl::RolloutRs::seq_mean_k1;
  opt_throw(o, {"'rs_upper'", "must be set"});
  o.rs_upper = 0.0;
  opt_throw(o, {"'rs_upper'", "got 0"});
  o.rs_upper = 2.0;
  o.rs_lower = 0.0;
  opt_throw(o, {"'rs_lower'", "got 0"});
  o.rs_lower = 2.5;
  opt_throw(o, {"'rs_lower'", "<= rs_upper (2)", "got 2.5"});
  o.rs = pl::RolloutRs::token_k2;
  o.rs_lower = 0.5;
  opt_throw(o, {"'rs_lower'", "k1"});
  o = {};
  o.rs_upper = 2.0;
  opt_throw(o, {"'rs_upper'", "rs is none"});

  // Shapes.
  const Tok<double> short_roll(2, 2);
  Tok<double> short_w(2, 2);
  const Tok<std::uint8_t> short_m(1, 3);
  expect_throw<pl::shape_error>([&] { pl::rollout_is_weights(old, short_roll, m, pl::RolloutIsOptions{}, w); },
                                "rollout_is_weights", {"'rollout_logp'", "[2, 2]", "'old_logp'", "[2, 3]"});
  expect_throw<pl::shape_error>([&] { pl::rollout_is_weights(old, roll, short_m, pl::RolloutIsOptions{}, w); },
                                "rollout_is_weights", {"'mask'", "[1, 3]"});
  untouched();
  expect_throw<pl::shape_error>([&] { pl::rollout_is_weights(old, roll, m, pl::RolloutIsOptions{}, short_w); },
                                "rollout_is_weights", {"'weights_out'", "[2, 3]", "got [2, 2]"});
  Tok<double> keep_bad(1, 3);
  expect_throw<pl::shape_error>([&] { pl::rollout_is_weights(old, roll, m, pl::RolloutIsOptions{}, w, keep_bad); },
                                "rollout_is_weights", {"'keep_out'"});
  untouched();
  Eigen::TensorMap<Tok<double>> alias(w.data(), 2, 3);
  expect_throw<pl::layout_error>([&] { pl::rollout_is_weights(old, roll, m, pl::RolloutIsOptions{}, w, alias); },
                                 "rollout_is_weights", {"'weights_out'", "'keep_out'", "overlap"});
  untouched();

  // Non-finite log-probs at a valid token (NaN / inf at masked-out [1, 2] are fine).
  roll(1, 1) = -inf_;
  expect_throw<pl::value_error>([&] { pl::rollout_is_weights(old, roll, m, pl::RolloutIsOptions{}, w); },
                                "rollout_is_weights", {"'rollout_logp'", "finite", "-inf", "[1, 1]"});
  untouched();
  roll(1, 1) = -1;
  auto old_bad = old;
  old_bad(0, 2) = nan_;
  expect_throw<pl::value_error>([&] { pl::rollout_is_weights(old_bad, roll, m, pl::RolloutIsOptions{}, w); },
                                "rollout_is_weights", {"'old_logp'", "nan", "[0, 2]"});
  untouched();
  auto mf = tok<float>(2, 3, {1, 1, 1, 1, 1, 0});
  mf(0, 1) = -1.f;
  expect_throw<pl::value_error>([&] { pl::rollout_is_weights(old, roll, mf, pl::RolloutIsOptions{}, w); },
                                "rollout_is_weights", {"'mask'", "[0, 1]"});
  untouched();
  // The same call succeeds once the inputs are valid.
  pl::rollout_is_weights(old, roll, m, pl::RolloutIsOptions{}, w);
  CHECK(w(1, 2) == 0);
  CHECK(w(0, 1) == 2);
}
