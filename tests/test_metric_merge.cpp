// metric_sums: the metrics of a batch split over shards, merged from the shards' partial sums,
// are the unsplit call's metrics up to the order the sums were added in. For every loss, float
// and double: random uneven shardings (with a one-example shard, a shard whose rows are all
// masked, and an empty shard where the loss allows one), each shard called with the global
// normalizers, its metric_sums merged left to right and through a balanced tree, against the
// whole-batch call's metrics. Every call's metrics are its metric_sums.metrics(), bit for bit.
//
// The tolerance is derived, not chosen. A sum entry of n summands x_i, added in two different
// orders (any two summation trees), differs by at most 2 gamma_{n-1} sum |x_i| <= n eps sum |x_i|
// (Higham, Accuracy and Stability of Numerical Algorithms, ch. 4), and by nothing when every x_i
// is an integer and sum |x_i| < 2^53 (every partial sum is then exact). The summands are what
// the whole call adds one at a time: per example (pairwise, nll, kto), per KL example (kto's KL
// sums; two an example here), per row (the token losses add row sums, the same bits in any
// shard), per pair or per reward (bradley_terry_ranking's running sums). A one-example call's
// sums are its summands exactly (0 + x = x). Each operation of the finalize then carries the two
// sides' difference on (Est below) and adds its own rounding, 0.5 ulp on each side, unless both
// operands are the same bits (then so is the result); the final rounding to S adds 0.5 ulp of S
// on each side. Entries and metrics whose inputs are all exact (counts, maxima, ratios of
// counts) must be equal.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace pl = prefloss;
using pl::Index;

namespace {

template <class S>
using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Tensor<S, 1>;
template <class S>
using Logits = Eigen::Tensor<S, 3, Eigen::RowMajor>;

constexpr Index kB = 13, kT = 11, kV = 16;
constexpr Index kMaskedLo = 5, kMaskedHi = 8;  // rows [5, 8): every mask 0 there
constexpr double kEps = std::numeric_limits<double>::epsilon();

/// Rows [b, e) of a tensor (its first dimension; row-major beyond rank 1).
template <class T, int R, int O>
Eigen::Tensor<T, R, O> rows(const Eigen::Tensor<T, R, O>& x, Index b, Index e) {
  static_assert(R == 1 || (O & Eigen::RowMajor), "rows of a row-major tensor");
  auto dims = x.dimensions();
  const Index per = x.size() / dims[0];
  dims[0] = e - b;
  Eigen::Tensor<T, R, O> y(dims);
  if (y.size() > 0) std::memcpy(y.data(), x.data() + b * per, sizeof(T) * static_cast<std::size_t>(y.size()));
  return y;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// ---- every field of each metrics type, as doubles (exact: S and Index widen exactly) ---------

template <class S>
std::vector<double> fields_of(const pl::PreferenceMetrics<S>& m) {
  return {m.reward_chosen, m.reward_rejected, m.reward_margin, m.reward_accuracy};
}
template <class S>
std::vector<double> fields_of(const pl::OrpoMetrics<S>& m) {
  auto v = fields_of(static_cast<const pl::PreferenceMetrics<S>&>(m));
  for (const S x : {m.log_odds_ratio, m.log_odds_chosen, m.nll_loss}) v.push_back(x);
  return v;
}
template <class S>
std::vector<double> fields_of(const pl::RankingMetrics<S>& m) {
  return {m.accuracy, m.reward_mean, m.reward_margin};
}
template <class S>
std::vector<double> fields_of(const pl::NllMetrics<S>& m) {
  return {m.mean_logp};
}
template <class S>
std::vector<double> fields_of(const pl::KtoMetrics<S>& m) {
  return {m.reference_point,
          m.kl_mean,
          static_cast<double>(m.count_desirable),
          static_cast<double>(m.count_undesirable),
          m.reward_desirable_sum,
          m.reward_undesirable_sum,
          m.reward_desirable,
          m.reward_undesirable,
          m.reward_margin,
          m.logps_desirable_sum,
          m.logps_undesirable_sum};
}
template <class S>
std::vector<double> fields_of(const pl::PpoMetrics<S>& m) {
  return {m.clip_fraction, m.clip_fraction_low, m.approx_kl, m.ratio_mean, m.ratio_max, m.kl_mean, m.token_weight};
}
template <class S>
std::vector<double> fields_of(const pl::ValueMetrics<S>& m) {
  return {m.clip_fraction, m.value_mean, m.token_weight};
}

template <class M>
void check_same_metrics(const M& a, const M& b) {
  const auto x = fields_of(a), y = fields_of(b);
  REQUIRE(x.size() == y.size());
  for (std::size_t k = 0; k < x.size(); ++k) {
    CAPTURE(k, x[k], y[k]);
    CHECK(same_bits(x[k], y[k]));
  }
}

/// What a shard reports: its metrics and their sums (the inputs it viewed are gone by then).
template <class M>
struct Out {
  M metrics;
  pl::MetricSums<M> sums;
};

/// A result's metrics and sums, after checking that the one is finalized from the other.
template <class R>
auto out_of(const R& r) {
  using M = std::decay_t<decltype(r.metrics)>;
  check_same_metrics(r.metrics, r.metric_sums.metrics());
  return Out<M>{r.metrics, r.metric_sums};
}

// ---- the tolerance --------------------------------------------------------------------------

/// What the test knows about one entry of sums: its summands' count and sum of magnitudes, and
/// whether every summand is an integer (the sum is then exact in any order).
struct Stat {
  double n = 0, abs = 0;
  bool exact = true;
};

/// A value computed from the whole call's sums (v), and a bound on how far the same
/// computation on the merged sums can be from it (err; 0: the same bits).
struct Est {
  double v = 0, err = 0;
};

/// One rounding on each side, 0.5 ulp <= 0.5 eps |x| each, unless both sides are the same bits.
Est rounded(double v, double e, bool exact_inputs) {
  return exact_inputs ? Est{v, 0.0} : Est{v, e + 0.5 * kEps * (2 * std::fabs(v) + e)};
}
Est sub(Est a, Est b) { return rounded(a.v - b.v, a.err + b.err, a.err == 0 && b.err == 0); }
/// a / d, or 0 for d = 0 (every finalize's empty mean): a_w/d_w - a_m/d_m = (a_w - a_m)/d_m +
/// (a_w/d_w)(d_m - d_w)/d_m, with |d_m| >= |d_w| - err_d.
Est div(Est a, Est d) {
  if (d.v == 0 && d.err == 0) return {0.0, 0.0};
  REQUIRE(std::fabs(d.v) > d.err);
  const double q = a.v / d.v;
  return rounded(q, (a.err + std::fabs(q) * d.err) / (std::fabs(d.v) - d.err), a.err == 0 && d.err == 0);
}

/// The whole and merged sums of one family, with what is known of each entry.
template <std::size_t N>
struct Ctx {
  std::array<double, N> whole, merged;
  std::array<Stat, N> stat;
  Est sum(std::size_t k) const {
    const Stat& s = stat[k];
    return {whole[k], s.exact ? 0.0 : s.n * kEps * s.abs};
  }
};

/// 0.5 ulp of |x| in T, taken upward (at a power of two the larger of the two spacings).
template <class T>
double half_ulp(T x) {
  const T a = std::fabs(x);
  return 0.5 * (static_cast<double>(std::nextafter(a, std::numeric_limits<T>::infinity())) - static_cast<double>(a));
}

/// A metric field: the whole call's value is the test's own finalize of the whole sums, rounded
/// to T; the merged one is within e.err of it in double, plus each side's rounding to T.
template <class T>
void check_close(const char* field, T whole, T merged, Est e) {
  CAPTURE(field, whole, merged, e.v, e.err);
  CHECK(same_bits(static_cast<T>(e.v), whole));  // the documented formula, on the whole sums
  if (e.err == 0) {
    CHECK(same_bits(whole, merged));
  } else {
    const double rounding = std::is_same_v<T, double> ? 0.0 : half_ulp(whole) + half_ulp(merged);
    CHECK(std::fabs(static_cast<double>(whole) - static_cast<double>(merged)) <= e.err + rounding);
  }
}

// ---- the documented finalize of each family, field by field ----------------------------------

template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::PreferenceMetrics<S>& w, const pl::PreferenceMetrics<S>& m) {
  using E = pl::PreferenceMetricEntries;
  const Est n = c.sum(E::count);
  check_close("reward_chosen", w.reward_chosen, m.reward_chosen, div(c.sum(E::reward_chosen), n));
  check_close("reward_rejected", w.reward_rejected, m.reward_rejected, div(c.sum(E::reward_rejected), n));
  check_close("reward_margin", w.reward_margin, m.reward_margin,
              div(sub(c.sum(E::reward_chosen), c.sum(E::reward_rejected)), n));
  check_close("reward_accuracy", w.reward_accuracy, m.reward_accuracy, div(c.sum(E::accurate), n));
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::OrpoMetrics<S>& w, const pl::OrpoMetrics<S>& m) {
  using E = pl::OrpoMetricEntries;
  check_fields(c, static_cast<const pl::PreferenceMetrics<S>&>(w), static_cast<const pl::PreferenceMetrics<S>&>(m));
  const Est n = c.sum(E::count);
  check_close("log_odds_ratio", w.log_odds_ratio, m.log_odds_ratio, div(c.sum(E::log_odds_ratio), n));
  check_close("log_odds_chosen", w.log_odds_chosen, m.log_odds_chosen, div(c.sum(E::log_odds_chosen), n));
  check_close("nll_loss", w.nll_loss, m.nll_loss, div(c.sum(E::nll), n));
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::RankingMetrics<S>& w, const pl::RankingMetrics<S>& m) {
  using E = pl::RankingMetricEntries;
  const Est pairs = c.sum(E::pair_count);
  check_close("accuracy", w.accuracy, m.accuracy, div(c.sum(E::accurate), pairs));
  check_close("reward_margin", w.reward_margin, m.reward_margin, div(c.sum(E::margin), pairs));
  check_close("reward_mean", w.reward_mean, m.reward_mean, div(c.sum(E::reward), c.sum(E::reward_count)));
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::NllMetrics<S>& w, const pl::NllMetrics<S>& m) {
  using E = pl::NllMetricEntries;
  check_close("mean_logp", w.mean_logp, m.mean_logp, div(c.sum(E::logp), c.sum(E::count)));
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::KtoMetrics<S>& w, const pl::KtoMetrics<S>& m) {
  using E = pl::KtoMetricEntries;
  CHECK(same_bits(w.reference_point, m.reference_point));
  CHECK(w.count_desirable == m.count_desirable);
  CHECK(w.count_undesirable == m.count_undesirable);
  CHECK(static_cast<double>(w.count_desirable) == c.whole[E::count_desirable]);
  CHECK(static_cast<double>(w.count_undesirable) == c.whole[E::count_undesirable]);
  check_close("kl_mean", w.kl_mean, m.kl_mean, div(c.sum(E::kl), c.sum(E::kl_count)));
  check_close("reward_desirable_sum", w.reward_desirable_sum, m.reward_desirable_sum, c.sum(E::reward_desirable));
  check_close("reward_undesirable_sum", w.reward_undesirable_sum, m.reward_undesirable_sum,
              c.sum(E::reward_undesirable));
  const Est md = div(c.sum(E::reward_desirable), c.sum(E::count_desirable));
  const Est mu = div(c.sum(E::reward_undesirable), c.sum(E::count_undesirable));
  check_close("reward_desirable", w.reward_desirable, m.reward_desirable, md);
  check_close("reward_undesirable", w.reward_undesirable, m.reward_undesirable, mu);
  check_close("reward_margin", w.reward_margin, m.reward_margin, sub(md, mu));
  check_close("logps_desirable_sum", w.logps_desirable_sum, m.logps_desirable_sum, c.sum(E::logps_desirable));
  check_close("logps_undesirable_sum", w.logps_undesirable_sum, m.logps_undesirable_sum, c.sum(E::logps_undesirable));
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::PpoMetrics<S>& w, const pl::PpoMetrics<S>& m) {
  using E = pl::PpoMetricEntries;
  const Est wt = c.sum(E::weight);
  check_close("clip_fraction", w.clip_fraction, m.clip_fraction, div(c.sum(E::clipped), wt));
  check_close("clip_fraction_low", w.clip_fraction_low, m.clip_fraction_low, div(c.sum(E::clipped_low), wt));
  check_close("approx_kl", w.approx_kl, m.approx_kl, div(c.sum(E::approx_kl), wt));
  check_close("ratio_mean", w.ratio_mean, m.ratio_mean, div(c.sum(E::ratio), wt));
  check_close("kl_mean", w.kl_mean, m.kl_mean, div(c.sum(E::kl), wt));
  CHECK(same_bits(w.ratio_max, m.ratio_max));
  check_close("token_weight", w.token_weight, m.token_weight, wt);
}
template <class S, std::size_t N>
void check_fields(const Ctx<N>& c, const pl::ValueMetrics<S>& w, const pl::ValueMetrics<S>& m) {
  using E = pl::ValueMetricEntries;
  const Est wt = c.sum(E::weight);
  check_close("clip_fraction", w.clip_fraction, m.clip_fraction, div(c.sum(E::clipped), wt));
  check_close("value_mean", w.value_mean, m.value_mean, div(c.sum(E::value), wt));
  check_close("token_weight", w.token_weight, m.token_weight, wt);
}

template <class M>
constexpr bool is_kto_v = false;
template <class S>
constexpr bool is_kto_v<pl::KtoMetrics<S>> = true;

// ---- shardings and the check --------------------------------------------------------------

/// Cut points of random uneven shardings of [0, kB): each has the all-masked shard [5, 8), a
/// one-example shard, and (when allowed) an empty shard; then every example alone.
std::vector<std::vector<Index>> shardings(bool allow_empty) {
  std::vector<std::vector<Index>> out;
  std::mt19937 rng(2024);
  for (int s = 0; s < 4; ++s) {
    std::vector<Index> cuts = {0, kMaskedLo, kMaskedHi, kB};
    std::uniform_int_distribution<Index> lo(0, kMaskedLo - 1), hi(kMaskedHi, kB - 1), any(1, kB - 1);
    const Index a = s % 2 == 0 ? lo(rng) : hi(rng);
    cuts.push_back(a);
    cuts.push_back(a + 1);
    for (int k = 0; k < 2; ++k) {
      const Index c = any(rng);
      if (c <= kMaskedLo || c >= kMaskedHi) cuts.push_back(c);
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    if (allow_empty) {
      const auto k = std::uniform_int_distribution<std::size_t>(0, cuts.size() - 1)(rng);
      const Index at = cuts[k];
      cuts.insert(cuts.begin() + static_cast<std::ptrdiff_t>(k), at);
    }
    out.push_back(cuts);
  }
  std::vector<Index> singles;
  for (Index i = 0; i <= kB; ++i) singles.push_back(i);
  out.push_back(singles);
  return out;
}

template <class M>
pl::MetricSums<M> tree(const std::vector<Out<M>>& parts, std::size_t lo, std::size_t hi) {
  if (hi - lo == 1) return parts[lo].sums;
  const std::size_t mid = lo + (hi - lo) / 2;
  return pl::merge(tree(parts, lo, mid), tree(parts, mid, hi));
}

template <class M>
void check_identity(const pl::MetricSums<M>& x) {
  const pl::MetricSums<M> none{};
  for (const auto& y : {pl::merge(x, none), pl::merge(none, x)}) {
    CHECK(y.sums == x.sums);
    CHECK(y.maxima == x.maxima);
  }
}

/// Stat of each sums entry from every example's own call (its sums are its summands).
template <class M>
std::array<Stat, pl::MetricSums<M>::n_sums> stats_of(const std::vector<Out<M>>& singles) {
  std::array<Stat, pl::MetricSums<M>::n_sums> st{};
  for (const auto& o : singles)
    for (std::size_t k = 0; k < st.size(); ++k) {
      const double x = o.sums.sums[k];
      st[k].n += 1;
      st[k].abs += std::fabs(x);
      st[k].exact = st[k].exact && std::floor(x) == x;
    }
  for (auto& s : st) s.exact = s.exact && s.abs < 9007199254740992.0;  // 2^53
  return st;
}

/// call(b, e) runs the loss on rows [b, e) with the global normalizers and returns out_of(its
/// result). fix(stat) may replace the per-example stats where the call adds finer summands.
/// allow_empty: the loss takes zero examples (batch_count); masked_is_empty: a shard of masked
/// rows has no valid token, so it must be the merge identity too.
template <class M, class Call, class Fix>
void check_merge(const char* name, Call&& call, bool allow_empty, bool masked_is_empty, Fix&& fix) {
  CAPTURE(name);
  using Sums = pl::MetricSums<M>;
  constexpr std::size_t N = Sums::n_sums;
  const Out<M> whole = call(0, kB);
  check_identity(whole.sums);
  std::vector<Out<M>> singles;
  for (Index i = 0; i < kB; ++i) singles.push_back(call(i, i + 1));
  std::array<Stat, N> stat = stats_of(singles);
  fix(stat);

  for (const auto& cuts : shardings(allow_empty)) {
    CAPTURE(cuts);
    std::vector<Out<M>> parts;
    for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
      const Index b = cuts[k], e = cuts[k + 1];
      parts.push_back(call(b, e));
      const Sums& s = parts.back().sums;
      if (b == e || (masked_is_empty && b == kMaskedLo && e == kMaskedHi)) {
        CAPTURE(b, e);
        CHECK(s.sums == Sums{}.sums);
        if constexpr (is_kto_v<M>) {
          // KTO's z0 is not a sum: every shard holds the one z0 all of them are given.
          CHECK(s.maxima == whole.sums.maxima);
        } else {
          CHECK(s.maxima == Sums{}.maxima);
          check_same_metrics(s.metrics(), M{});
        }
      }
    }
    Sums left{};
    for (const auto& p : parts) left += p.sums;
    const Sums balanced = tree(parts, 0, parts.size());
    const Sums* const orders[] = {&left, &balanced};
    for (const Sums* merged : orders) {
      CAPTURE(merged == &left ? "left to right" : "balanced tree");
      const Ctx<N> c{whole.sums.sums, merged->sums, stat};
      for (std::size_t k = 0; k < N; ++k) {
        const Est e = c.sum(k);
        CAPTURE(k, c.whole[k], c.merged[k], e.err);
        if (e.err == 0) {
          CHECK(c.whole[k] == c.merged[k]);
        } else {
          CHECK(std::fabs(c.whole[k] - c.merged[k]) <= e.err);
        }
      }
      CHECK(merged->maxima == whole.sums.maxima);
      check_fields(c, whole.metrics, merged->metrics());
    }
  }
}

template <class M, class Call>
void check_merge(const char* name, Call&& call, bool allow_empty, bool masked_is_empty) {
  check_merge<M>(name, std::forward<Call>(call), allow_empty, masked_is_empty, [](auto&) {});
}

// ---- data -----------------------------------------------------------------------------------

template <class S>
struct Data {
  Tok<S> c, r;                    // chosen / rejected token log-probs
  Tok<std::uint8_t> mc, mr;       // their masks
  Vec<S> rc, rr, vc, vr, margin;  // references; rewards; Bradley-Terry margins
  Tok<S> scores;                  // [B, 4] rankings
  Vec<std::uint8_t> desirable;
  Vec<S> klp, klr;                  // KTO's KL batch: two per example, split with the examples
  Tok<S> lp, old, adv, ref, fmask;  // PPO; a float-weight mask
  Tok<std::uint8_t> mask;           // PPO / value byte mask
  Tok<S> v, vold, ret;              // value loss
  Logits<S> z;                      // ppo_clip_from_logits
  Tok<std::int32_t> y;
  Tok<S> zold, zadv, zref;

  Data()
      : c(kB, kT),
        r(kB, kT),
        mc(kB, kT),
        mr(kB, kT),
        rc(kB),
        rr(kB),
        vc(kB),
        vr(kB),
        margin(kB),
        scores(kB, 4),
        desirable(kB),
        klp(2 * kB),
        klr(2 * kB),
        lp(kB, kT),
        old(kB, kT),
        adv(kB, kT),
        ref(kB, kT),
        fmask(kB, kT),
        mask(kB, kT),
        v(kB, kT),
        vold(kB, kT),
        ret(kB, kT),
        z(kB, kT, kV),
        y(kB, kT),
        zold(kB, kT),
        zadv(kB, kT),
        zref(kB, kT) {
    std::mt19937 rng(sizeof(S) * 7 + 3);
    std::uniform_real_distribution<double> logp(-3, -0.05), u(-1, 1), w(0.25, 2);
    std::normal_distribution<double> n(0, 1);
    std::bernoulli_distribution keep(0.8);
    std::uniform_int_distribution<std::int32_t> label(0, static_cast<std::int32_t>(kV - 1));
    for (Index i = 0; i < kB; ++i) {
      const bool masked = i >= kMaskedLo && i < kMaskedHi;
      for (Index t = 0; t < kT; ++t) {
        c(i, t) = static_cast<S>(logp(rng));
        r(i, t) = static_cast<S>(logp(rng));
        mc(i, t) = !masked && keep(rng);
        mr(i, t) = !masked && keep(rng);
        lp(i, t) = static_cast<S>(logp(rng));
        old(i, t) = static_cast<S>(static_cast<double>(lp(i, t)) + 0.3 * n(rng));
        ref(i, t) = static_cast<S>(static_cast<double>(lp(i, t)) + 0.3 * n(rng));
        adv(i, t) = static_cast<S>(n(rng));
        mask(i, t) = !masked && keep(rng);
        fmask(i, t) = mask(i, t) ? static_cast<S>(w(rng)) : S(0);
        v(i, t) = static_cast<S>(u(rng));
        vold(i, t) = static_cast<S>(static_cast<double>(v(i, t)) + 0.3 * u(rng));
        ret(i, t) = static_cast<S>(u(rng));
        y(i, t) = label(rng);
        for (Index k = 0; k < kV; ++k) z(i, t, k) = static_cast<S>(2 * n(rng));
        zadv(i, t) = static_cast<S>(n(rng));
      }
      rc(i) = static_cast<S>(-10 + u(rng));
      rr(i) = static_cast<S>(-10 + u(rng));
      vc(i) = static_cast<S>(u(rng));
      vr(i) = static_cast<S>(u(rng));
      margin(i) = static_cast<S>(0.1 * u(rng));
      desirable(i) = i % 3 != 0;
      for (Index j = 2 * i; j < 2 * i + 2; ++j) {
        klp(j) = static_cast<S>(-10 + u(rng));
        klr(j) = static_cast<S>(-10.3 + u(rng));  // mean log-ratio > 0: an estimated z0 above the clamp
      }
      for (Index a = 0; a < 4; ++a) scores(i, a) = static_cast<S>(u(rng));
    }
    // old_logp and ref_logp near the policy's log-probs, so ratios spread over the clip range.
    const auto t = pl::token_logprobs(z, y, mask, pl::LogprobOptions{});
    for (Index k = 0; k < y.size(); ++k) {
      zold.data()[k] = static_cast<S>(static_cast<double>(t.logp.data()[k]) + 0.3 * n(rng));
      zref.data()[k] = static_cast<S>(static_cast<double>(t.logp.data()[k]) + 0.3 * n(rng));
    }
  }
};

/// The global batch_count of a shard (unset for the whole call, whose own batch it is).
std::optional<double> batch_count(Index b, Index e) {
  if (b == 0 && e == kB) return std::nullopt;
  return static_cast<double>(kB);
}

/// A pairwise loss on rows [b, e): f(c, mc, r, mr, rc, rr) with the shard's tensors.
template <class S, class F>
auto pair_call(const Data<S>& d, Index b, Index e, F&& f) {
  const Tok<S> c = rows(d.c, b, e), r = rows(d.r, b, e);
  const Tok<std::uint8_t> mc = rows(d.mc, b, e), mr = rows(d.mr, b, e);
  const Vec<S> rc = rows(d.rc, b, e), rr = rows(d.rr, b, e);
  return out_of(f(c, mc, r, mr, rc, rr));
}

/// The sum of the mask weights of the whole batch: token_mean's global token_count.
template <class M>
double total_weight(const Tok<M>& m) {
  double w = 0;
  for (Index k = 0; k < m.size(); ++k) w += static_cast<double>(m.data()[k]);
  return w;
}

/// A token loss's options with the global normalizers of aggregation `agg`.
template <class Opt, class M>
Opt token_options(pl::Aggregation agg, const Tok<M>& mask) {
  Opt o;
  o.aggregation = agg;
  if (agg == pl::Aggregation::token_mean) {
    o.token_count = total_weight(mask);
  } else {
    o.sequence_count = static_cast<double>(kB);
  }
  if (agg == pl::Aggregation::seq_mean_token_sum_norm) o.token_sum_norm = 16.0;
  return o;
}

template <class S, class M>
auto ppo_call(const Data<S>& d, const Tok<M>& mask, pl::Aggregation agg, bool with_ref, Index b, Index e) {
  auto o = token_options<pl::PpoOptions>(agg, mask);
  o.clip_high = 0.28;
  o.dual_clip = 3;
  if (with_ref) o.kl_coef = 0.05;
  const Tok<S> lp = rows(d.lp, b, e), old = rows(d.old, b, e), adv = rows(d.adv, b, e), ref = rows(d.ref, b, e);
  const Tok<M> m = rows(mask, b, e);
  if (with_ref) return out_of(pl::ppo_clip(lp, old, adv, m, ref, o));
  return out_of(pl::ppo_clip(lp, old, adv, m, o));
}

const char* agg_name(pl::Aggregation a) {
  switch (a) {
    case pl::Aggregation::token_mean:
      return "token_mean";
    case pl::Aggregation::seq_mean_token_sum:
      return "seq_mean_token_sum";
    case pl::Aggregation::seq_mean_token_mean:
      return "seq_mean_token_mean";
    case pl::Aggregation::seq_mean_token_sum_norm:
      return "seq_mean_token_sum_norm";
    case pl::Aggregation::token_sum:
      return "token_sum";
  }
  return "?";
}

constexpr pl::Aggregation kAggregations[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                             pl::Aggregation::seq_mean_token_mean,
                                             pl::Aggregation::seq_mean_token_sum_norm, pl::Aggregation::token_sum};

}  // namespace

TEMPLATE_TEST_CASE("metric_sums: pairwise losses merge to the whole batch's metrics", "[metrics]", float, double) {
  using S = TestType;
  using PM = pl::PreferenceMetrics<S>;
  const Data<S> d;
  for (const auto variant : {pl::DpoVariant::sigmoid, pl::DpoVariant::robust, pl::DpoVariant::hinge}) {
    for (const bool free : {false, true}) {
      CAPTURE(static_cast<int>(variant), free);
      check_merge<PM>(
          "dpo",
          [&](Index b, Index e) {
            return pair_call(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto& rc, auto& rr) {
              pl::DpoOptions o;
              o.variant = variant;
              o.label_smoothing = variant == pl::DpoVariant::hinge ? 0.0 : 0.1;
              o.reference_free = free;
              o.batch_count = batch_count(b, e);
              return pl::dpo(pl::masked_sum(c, mc), pl::masked_sum(r, mr), rc, rr, o);
            });
          },
          true, false);
    }
  }
  check_merge<PM>(
      "ipo",
      [&](Index b, Index e) {
        return pair_call(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto& rc, auto& rr) {
          pl::IpoOptions o;
          o.batch_count = batch_count(b, e);
          return pl::ipo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), rc, rr, o);
        });
      },
      true, false);
  check_merge<PM>(
      "simpo",
      [&](Index b, Index e) {
        return pair_call(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto&, auto&) {
          pl::SimpoOptions o;
          o.batch_count = batch_count(b, e);
          return pl::simpo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), o);
        });
      },
      true, false);
  // The masked rows are ORPO's empty pairs: 0 in every sum, 1 in count.
  check_merge<pl::OrpoMetrics<S>>(
      "orpo",
      [&](Index b, Index e) {
        return pair_call(d, b, e, [&](auto& c, auto& mc, auto& r, auto& mr, auto&, auto&) {
          pl::OrpoOptions o;
          o.batch_count = batch_count(b, e);
          return pl::orpo(pl::masked_mean(c, mc), pl::masked_mean(r, mr), o);
        });
      },
      true, false);
  for (const bool with_margin : {false, true}) {
    CAPTURE(with_margin);
    check_merge<PM>(
        "bradley_terry",
        [&](Index b, Index e) {
          const Vec<S> vc = rows(d.vc, b, e), vr = rows(d.vr, b, e), mg = rows(d.margin, b, e);
          pl::BradleyTerryOptions o;
          o.center_coef = 0.01;
          o.batch_count = batch_count(b, e);
          return with_margin ? out_of(pl::bradley_terry(vc, vr, mg, o)) : out_of(pl::bradley_terry(vc, vr, o));
        },
        true, false);
  }
}

TEMPLATE_TEST_CASE("metric_sums: bradley_terry_ranking, nll and kto merge to the whole batch's metrics", "[metrics]",
                   float, double) {
  using S = TestType;
  const Data<S> d;
  // The ranking's reward and margin sums run over every reward and pair, not per row: their
  // summands are those, so their stats come from the scores.
  const auto ranking_stats = [&](auto& st) {
    using E = pl::RankingMetricEntries;
    st[E::reward] = st[E::margin] = Stat{0, 0, false};
    for (Index i = 0; i < kB; ++i)
      for (Index a = 0; a < 4; ++a) {
        const double ra = d.scores(i, a);
        st[E::reward].n += 1;
        st[E::reward].abs += std::fabs(ra);
        for (Index c = a + 1; c < 4; ++c) {
          st[E::margin].n += 1;
          st[E::margin].abs += std::fabs(ra - static_cast<double>(d.scores(i, c)));
        }
      }
  };
  check_merge<pl::RankingMetrics<S>>(
      "bradley_terry_ranking",
      [&](Index b, Index e) {
        pl::BradleyTerryOptions o;
        o.center_coef = 0.01;
        o.batch_count = batch_count(b, e);
        return out_of(pl::bradley_terry_ranking(rows(d.scores, b, e), o));
      },
      true, false, ranking_stats);
  for (const bool mean : {false, true}) {
    CAPTURE(mean);
    check_merge<pl::NllMetrics<S>>(
        "nll",
        [&](Index b, Index e) {
          const Tok<S> c = rows(d.c, b, e);
          const Tok<std::uint8_t> mc = rows(d.mc, b, e);
          pl::NllOptions o;
          o.batch_count = batch_count(b, e);
          return mean ? out_of(pl::nll(pl::masked_mean(c, mc), o)) : out_of(pl::nll(pl::masked_sum(c, mc), o));
        },
        true, false);
  }
  // z0 given to every call; then estimated by the whole call and passed on, unrounded, to the
  // shards (its maxima entry), as a sharded run all-reduces it first.
  std::optional<double> z0;
  const auto kto_call = [&](Index b, Index e, std::optional<double> point) {
    const Tok<S> c = rows(d.c, b, e);
    const Tok<std::uint8_t> mc = rows(d.mc, b, e);
    const Vec<S> rc = rows(d.rc, b, e), kp = rows(d.klp, 2 * b, 2 * e), kr = rows(d.klr, 2 * b, 2 * e);
    const Vec<std::uint8_t> lab = rows(d.desirable, b, e);
    pl::KtoOptions o;
    o.desirable_weight = 1.33;
    o.reference_point = point;
    o.batch_count = batch_count(b, e);
    return out_of(pl::kto(pl::masked_sum(c, mc), rc, lab, kp, kr, o));
  };
  // An example's call has two KL examples: the KL sum's summands are those, so its stat comes
  // from the KL batch (kl_policy - kl_ref in double, as the loss forms it).
  const auto kl_stats = [&](auto& st) {
    using E = pl::KtoMetricEntries;
    st[E::kl] = Stat{0, 0, false};
    for (Index j = 0; j < d.klp.size(); ++j) {
      st[E::kl].n += 1;
      st[E::kl].abs += std::fabs(static_cast<double>(d.klp(j)) - static_cast<double>(d.klr(j)));
    }
  };
  check_merge<pl::KtoMetrics<S>>(
      "kto, given z0", [&](Index b, Index e) { return kto_call(b, e, 0.3); }, true, false, kl_stats);
  const auto whole = kto_call(0, kB, std::nullopt);
  z0 = whole.sums.maxima[pl::KtoMetricEntries::reference_point];
  CHECK(*z0 > 0);  // the clamp at 0 is not what is tested here
  CHECK(same_bits(whole.metrics.reference_point, static_cast<S>(*z0)));
  check_merge<pl::KtoMetrics<S>>(
      "kto, estimated z0", [&](Index b, Index e) { return kto_call(b, e, b == 0 && e == kB ? std::nullopt : z0); },
      true, false, kl_stats);
}

TEMPLATE_TEST_CASE("metric_sums: ppo_clip and value_loss merge to the whole batch's metrics", "[metrics]", float,
                   double) {
  using S = TestType;
  const Data<S> d;
  for (const auto agg : kAggregations) {
    for (const bool with_ref : {false, true}) {
      CAPTURE(agg_name(agg), with_ref);
      check_merge<pl::PpoMetrics<S>>(
          "ppo_clip", [&](Index b, Index e) { return ppo_call(d, d.mask, agg, with_ref, b, e); }, false, true);
    }
    CAPTURE(agg_name(agg));
    check_merge<pl::ValueMetrics<S>>(
        "value_loss",
        [&](Index b, Index e) {
          const auto o = token_options<pl::ValueOptions>(agg, d.mask);
          return out_of(pl::value_loss(rows(d.v, b, e), rows(d.vold, b, e), rows(d.ret, b, e), rows(d.mask, b, e), o));
        },
        false, true);
  }
  // Float weights: the weight and every weighted sum are inexact, the counts are not counts.
  check_merge<pl::PpoMetrics<S>>(
      "ppo_clip, float mask",
      [&](Index b, Index e) { return ppo_call(d, d.fmask, pl::Aggregation::token_mean, true, b, e); }, false, true);
  check_merge<pl::ValueMetrics<S>>(
      "value_loss, float mask",
      [&](Index b, Index e) {
        const auto o = token_options<pl::ValueOptions>(pl::Aggregation::seq_mean_token_mean, d.fmask);
        return out_of(pl::value_loss(rows(d.v, b, e), rows(d.vold, b, e), rows(d.ret, b, e), rows(d.fmask, b, e), o));
      },
      false, true);
}

TEMPLATE_TEST_CASE("metric_sums: ppo_clip_from_logits merges to the whole batch's metrics", "[metrics]", float,
                   double) {
  using S = TestType;
  const Data<S> d;
  for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
    for (const bool with_ref : {false, true}) {
      CAPTURE(agg_name(agg), with_ref);
      check_merge<pl::PpoMetrics<S>>(
          "ppo_clip_from_logits",
          [&](Index b, Index e) {
            auto o = token_options<pl::PpoOptions>(agg, d.mask);
            o.dual_clip = 3;
            if (with_ref) o.kl_coef = 0.05;
            pl::LogprobOptions lo;
            lo.entropy_coef = 0.01;
            const Logits<S> z = rows(d.z, b, e);
            const Tok<std::int32_t> y = rows(d.y, b, e);
            const Tok<S> old = rows(d.zold, b, e), adv = rows(d.zadv, b, e), ref = rows(d.zref, b, e);
            const Tok<std::uint8_t> m = rows(d.mask, b, e);
            Logits<S> g(e - b, kT, kV);
            if (with_ref) return out_of(pl::ppo_clip_from_logits(z, y, old, adv, m, ref, o, lo, g));
            return out_of(pl::ppo_clip_from_logits(z, y, old, adv, m, o, lo, g));
          },
          false, true);
    }
  }
}

TEMPLATE_TEST_CASE("metric_sums: the fused forms fill the same sums as the two-pass forms", "[metrics]", float,
                   double) {
  using S = TestType;
  const Data<S> d;
  const auto c = pl::masked_sum(d.c, d.mc), r = pl::masked_sum(d.r, d.mr);
  const auto cm = pl::masked_mean(d.c, d.mc), rm = pl::masked_mean(d.r, d.mr);
  Tok<S> gc(kB, kT), gr(kB, kT);
  const auto same = [](const auto& a, const auto& b) {
    const auto x = out_of(a), y = out_of(b);
    CHECK(x.sums.sums == y.sums.sums);
    CHECK(x.sums.maxima == y.sums.maxima);
    check_same_metrics(x.metrics, y.metrics);
  };
  same(pl::dpo(c, r, d.rc, d.rr), pl::dpo(c, r, d.rc, d.rr, pl::DpoOptions{}, gc, gr));
  same(pl::ipo(cm, rm, d.rc, d.rr), pl::ipo(cm, rm, d.rc, d.rr, pl::IpoOptions{}, gc, gr));
  same(pl::simpo(cm, rm), pl::simpo(cm, rm, pl::SimpoOptions{}, gc, gr));
  same(pl::orpo(cm, rm), pl::orpo(cm, rm, pl::OrpoOptions{}, gc, gr));
  same(pl::nll(c), pl::nll(c, pl::NllOptions{}, gc));
  same(pl::kto(c, d.rc, d.desirable, d.klp, d.klr), pl::kto(c, d.rc, d.desirable, d.klp, d.klr, pl::KtoOptions{}, gc));
  Tok<S> g(kB, kT);
  pl::PpoOptions po;
  po.kl_coef = 0.05;
  same(pl::ppo_clip(d.lp, d.old, d.adv, d.mask, d.ref, po), pl::ppo_clip(d.lp, d.old, d.adv, d.mask, d.ref, po, g));
  same(pl::value_loss(d.v, d.vold, d.ret, d.mask), pl::value_loss(d.v, d.vold, d.ret, d.mask, pl::ValueOptions{}, g));
}

TEMPLATE_TEST_CASE("metric_sums: a default MetricSums is the empty shard", "[metrics]", float, double) {
  using S = TestType;
  const auto empty = [](auto m) {
    using M = decltype(m);
    const pl::MetricSums<M> none{};
    for (const double x : none.sums) CHECK(same_bits(x, 0.0));
    for (const double x : none.maxima) CHECK(x == -std::numeric_limits<double>::infinity());
    check_same_metrics(none.metrics(), M{});
    const auto twice = pl::merge(none, none);
    CHECK(twice.sums == none.sums);
    CHECK(twice.maxima == none.maxima);
  };
  empty(pl::PreferenceMetrics<S>{});
  empty(pl::OrpoMetrics<S>{});
  empty(pl::RankingMetrics<S>{});
  empty(pl::NllMetrics<S>{});
  empty(pl::KtoMetrics<S>{});
  empty(pl::PpoMetrics<S>{});
  empty(pl::ValueMetrics<S>{});
  // The entry counts each family documents.
  STATIC_REQUIRE(pl::MetricSums<pl::PreferenceMetrics<S>>::n_sums == 4);
  STATIC_REQUIRE(pl::MetricSums<pl::OrpoMetrics<S>>::n_sums == 7);
  STATIC_REQUIRE(pl::MetricSums<pl::RankingMetrics<S>>::n_sums == 5);
  STATIC_REQUIRE(pl::MetricSums<pl::NllMetrics<S>>::n_sums == 2);
  STATIC_REQUIRE(pl::MetricSums<pl::KtoMetrics<S>>::n_sums == 8);
  STATIC_REQUIRE(pl::MetricSums<pl::KtoMetrics<S>>::n_maxima == 1);
  STATIC_REQUIRE(pl::MetricSums<pl::PpoMetrics<S>>::n_sums == 6);
  STATIC_REQUIRE(pl::MetricSums<pl::PpoMetrics<S>>::n_maxima == 1);
  STATIC_REQUIRE(pl::MetricSums<pl::ValueMetrics<S>>::n_sums == 3);
}

TEST_CASE("metric_sums: a NaN maximum survives any merge order", "[metrics]") {
  using Sums = pl::MetricSums<pl::PpoMetrics<float>>;
  Sums a, b, nan;
  a.maxima[0] = 1.5;
  b.maxima[0] = 2.5;
  nan.maxima[0] = std::numeric_limits<double>::quiet_NaN();
  CHECK(pl::merge(a, b).maxima[0] == 2.5);
  CHECK(pl::merge(b, a).maxima[0] == 2.5);
  CHECK(std::isnan(pl::merge(pl::merge(a, nan), b).maxima[0]));
  CHECK(std::isnan(pl::merge(a, pl::merge(nan, b)).maxima[0]));
  CHECK(std::isnan(pl::merge(nan, Sums{}).maxima[0]));
}
