// Sharding as a property (#10): every loss split over random shards (data-parallel ranks,
// accumulation micro-batches, sequence-parallel ranks), each shard called with the global
// normalizers taken counts first (token_counts / row_weights summed over the shards,
// batch_count = the global examples, sequence_count = the global rows, token_sum_norm = the
// padded T, KTO's reference_point from the summed kto_reference_sums), adds up to the unsplit
// call. Over fixed-seed random cases (random B and T; masks with empty and full rows; inf/NaN at
// masked-out tokens; shardings that are uneven, hold one example, hold only masked rows, or are
// empty where the loss allows it), for bradley_terry, bradley_terry_ranking, dpo (every
// variant), ipo, simpo, orpo, kto, nll (batch_count and normalizer), ppo_clip (every
// aggregation; no ref_logp, ref_logp without and with the KL term) and value_loss (every
// aggregation), masked_sum and masked_mean inputs, byte and float masks, float and double:
// - a shard's per-example losses, row scales and gradient rows are the unsplit call's bits
//   wherever both divide by the same doubles, and within the rounding of the regrouped weight
//   sums where they do not (float mask weights summed shard by shard);
// - the shard losses sum to the unsplit loss within a bound derived from how each is rounded,
//   and within the targets (relative 1e-6 in float, 1e-12 in double);
// - an empty or all-masked shard gives exactly 0 and no NaN;
// - the unsplit calls give the same bits with pools of 1, 2 and 3 threads as with none.
// The expected values are always the unsplit call, which has no shard logic. The largest
// difference / bound seen per loss family is printed by the last test case.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "rl_reference.hpp"

namespace pl = prefloss;
using pl::Index;

namespace {

template <class S>
using Tok = Eigen::Tensor<S, 2, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Tensor<S, 1>;
/// Cut points 0 = c_0 <= c_1 <= ... <= c_K = n: shard k holds [c_k, c_{k+1}).
using Cuts = std::vector<Index>;

// Cases per dtype. Small sizes: the whole file runs in seconds under ASan + UBSan at SSE2.
constexpr int kBatchCases = 60;   // batch-mean losses, every loss and input form a case
constexpr int kRowCases = 40;     // ppo_clip / value_loss over rows split between shards
constexpr int kColumnCases = 40;  // ppo_clip / value_loss over rows split at columns
constexpr int kThreadCases = 3;   // the unsplit calls on thread pools
constexpr int kLogitCases = 2;    // token_logprobs / ppo_clip_from_logits on thread pools

std::size_t at(Index i) { return static_cast<std::size_t>(i); }

// ---- rounding ----------------------------------------------------------------------------------

/// Unit roundoff u of S (half an ulp at 1).
template <class S>
constexpr double unit = std::numeric_limits<S>::epsilon() / 2;
constexpr double ud = unit<double>;

/// gamma_k = k u / (1 - k u): a recursive sum of k + 1 terms is within gamma_k sum |x| of exact.
double gam(double k, double u) { return k * u / (1 - k * u); }

/// The bounds below are first order in u; their second-order terms are O(u) of them, which this
/// factor covers (1e-3 against u <= 6e-8).
constexpr double slack = 1.001;

/// A loss (or a row's contribution) is a double product or sum rounded once more to S: it is
/// within rho of the exact value of that double expression, and so within rho / (1 - rho) of its
/// own size (the rounded value's, which is what the bounds below can measure).
template <class S>
constexpr double rho = std::is_same_v<S, float> ? unit<float> + ud : ud;
template <class S>
constexpr double loss_rounding = rho<S> / (1 - rho<S>);

/// The error of a LaneSum over a row of n terms, relative to sum |x| (detail/row_loop.hpp): a
/// float lane takes at most chunk_batches - 1 float roundings before it is widened into double
/// (7 u_f, the 4.2e-7 row_loop.hpp states); then each term meets at most n + 6 double roundings
/// (the lane and widening adds, at most n; the tree over at most 16 lanes, 4; the join of two
/// chains, 1; one spare). Double lanes only have the latter.
template <class S>
double lane_sum_error(Index n) {
  const double d = gam(static_cast<double>(n) + 6, ud);
  if constexpr (std::is_same_v<S, float>) {
    return gam(pl::detail::chunk_batches - 1, unit<float>) + d;
  } else {
    return d;
  }
}

// ---- slices and comparisons --------------------------------------------------------------------

/// Rows [b, e) of a [B, T] tensor.
template <class S>
Tok<S> rows(const Tok<S>& x, Index b, Index e) {
  Tok<S> y(e - b, x.dimension(1));
  if (y.size() > 0) std::memcpy(y.data(), x.data() + b * x.dimension(1), sizeof(S) * at(y.size()));
  return y;
}
/// Entries [b, e) of a [B] tensor.
template <class S>
Vec<S> rows(const Vec<S>& x, Index b, Index e) {
  Vec<S> y(e - b);
  for (Index i = b; i < e; ++i) y(i - b) = x(i);
  return y;
}
/// Columns [b, e) of a [B, T] tensor: every row's tokens [b, e), as a sequence-parallel rank holds them.
template <class S>
Tok<S> cols(const Tok<S>& x, Index b, Index e) {
  Tok<S> y(x.dimension(0), e - b);
  for (Index i = 0; i < x.dimension(0); ++i)
    for (Index t = b; t < e; ++t) y(i, t - b) = x(i, t);
  return y;
}

template <class S>
bool same_bits(const S* a, const S* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(S)) == 0;
}
template <class S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && same_bits(a.data(), b.data(), a.size());
}
/// Entries where |a - b| > rel max(|a|, |b|) (a NaN counts).
template <class S>
std::size_t not_near(const S* a, const S* b, std::size_t n, double rel) {
  std::size_t bad = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const double x = static_cast<double>(a[k]), y = static_cast<double>(b[k]);
    bad += !(std::fabs(x - y) <= rel * std::fmax(std::fabs(x), std::fabs(y)));
  }
  return bad;
}
template <class S>
bool all_zero(const S* a, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k)
    if (!(a[k] == S(0))) return false;
  return true;
}

// ---- cases -------------------------------------------------------------------------------------

/// Random cuts of [0, n) into 1 to 6 shards, one of them often a single element. allow_empty:
/// points may repeat (empty shards, at either end too); else every shard is nonempty (n >= 1).
Cuts random_cuts(std::mt19937& rng, Index n, bool allow_empty) {
  const int K = std::uniform_int_distribution<int>(1, 6)(rng);
  Cuts c = {0, n};
  std::uniform_int_distribution<Index> any(0, n), inner(1, std::max<Index>(1, n - 1));
  for (int k = 1; k < K; ++k) c.push_back(allow_empty ? any(rng) : inner(rng));
  if (n >= 1 && std::bernoulli_distribution(0.4)(rng)) {
    const Index p = std::uniform_int_distribution<Index>(0, n - 1)(rng);
    c.push_back(p);
    c.push_back(p + 1);
  }
  std::sort(c.begin(), c.end());
  if (!allow_empty) c.erase(std::unique(c.begin(), c.end()), c.end());
  return c;
}

/// `shards` cuts of [0, n), empty shards allowed.
Cuts cuts_into(std::mt19937& rng, Index n, std::size_t shards) {
  Cuts c = {0, n};
  std::uniform_int_distribution<Index> any(0, n);
  for (std::size_t k = 1; k < shards; ++k) c.push_back(any(rng));
  std::sort(c.begin(), c.end());
  return c;
}

/// Random masks of one support: a row is empty one time in six, full one time in six, else each
/// token is selected with the row's own probability in [0.3, 0.9]; the float mask holds weights
/// in [0.25, 2] where the byte mask selects.
template <class S>
void random_masks(std::mt19937& rng, Tok<std::uint8_t>& m, Tok<S>& w) {
  std::uniform_int_distribution<int> kind(0, 5);
  std::uniform_real_distribution<double> prob(0.3, 0.9), wt(0.25, 2.0);
  for (Index i = 0; i < m.dimension(0); ++i) {
    const int k = kind(rng);
    std::bernoulli_distribution keep(prob(rng));
    for (Index t = 0; t < m.dimension(1); ++t) {
      const bool sel = k == 0 ? false : (k == 1 ? true : keep(rng));
      m(i, t) = sel;
      w(i, t) = sel ? static_cast<S>(wt(rng)) : S(0);
    }
  }
}

/// inf/NaN at half of the masked-out tokens: they must never reach a sum or a gradient.
template <class S>
void poison_masked(std::mt19937& rng, Tok<S>& x, const Tok<std::uint8_t>& m) {
  std::bernoulli_distribution coin(0.5);
  for (Index k = 0; k < x.size(); ++k)
    if (!m.data()[k] && coin(rng)) x.data()[k] = rlref::poison<S>(static_cast<long>(k));
}

/// The byte mask or the float one, as M asks.
template <class M, class S>
const Tok<M>& pick(const Tok<std::uint8_t>& bytes, const Tok<S>& weights) {
  if constexpr (std::is_same_v<M, std::uint8_t>) {
    return bytes;
  } else {
    return weights;
  }
}
template <class M>
const char* mask_name() {
  return std::is_same_v<M, std::uint8_t> ? "uint8 mask" : "float mask";
}
template <class S>
std::string family(const std::string& name) {
  return name + (std::is_same_v<S, float> ? " <float>" : " <double>");
}

// ---- metrics -----------------------------------------------------------------------------------

template <class S>
std::vector<double> metric_list(const pl::PreferenceMetrics<S>& m) {
  return {m.reward_chosen, m.reward_rejected, m.reward_margin, m.reward_accuracy};
}
template <class S>
std::vector<double> metric_list(const pl::OrpoMetrics<S>& m) {
  std::vector<double> v = metric_list(static_cast<const pl::PreferenceMetrics<S>&>(m));
  v.insert(v.end(), {m.log_odds_ratio, m.log_odds_chosen, m.nll_loss});
  return v;
}
template <class S>
std::vector<double> metric_list(const pl::KtoMetrics<S>& m) {
  return {m.reference_point,    m.kl_mean,       m.reward_desirable_sum, m.reward_undesirable_sum, m.reward_desirable,
          m.reward_undesirable, m.reward_margin, m.logps_desirable_sum,  m.logps_undesirable_sum};
}
template <class S>
std::vector<double> metric_list(const pl::RankingMetrics<S>& m) {
  return {m.accuracy, m.reward_mean, m.reward_margin};
}
template <class S>
std::vector<double> metric_list(const pl::NllMetrics<S>& m) {
  return {m.mean_logp};
}
template <class S>
std::vector<double> metric_list(const pl::PpoMetrics<S>& m) {
  return {m.clip_fraction, m.clip_fraction_low, m.approx_kl, m.ratio_mean, m.ratio_max, m.kl_mean, m.token_weight};
}
template <class S>
std::vector<double> metric_list(const pl::ValueMetrics<S>& m) {
  return {m.clip_fraction, m.value_mean, m.token_weight};
}
bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// ---- the loss-sum check and the report ---------------------------------------------------------

struct Worst {
  double bound = 0, target = 0;  // largest |sum - whole| / bound, / target
  std::string where;             // the case of the largest bound ratio
};
std::map<std::string, Worst>& worst() {
  static std::map<std::string, Worst> w;
  return w;
}

/// The shard losses' sum (added in double) against the unsplit loss: within the derived bound,
/// and within the target, 1e-6 (float) or 1e-12 (double) of sum_k |L_k| + |L|. The target
/// is relative to the shards' own sizes, not to |L| alone: the shard losses may cancel (opposite
/// signs, or a whole loss near 0 from shard losses that are not), and each carries the rounding
/// of its own size, which no bound relative to |L| can contain.
template <class S>
void check_loss_sum(const std::string& fam, const std::string& where, double sum, double sum_abs, double whole,
                    double bound) {
  const double diff = std::fabs(sum - whole);
  const double target = (std::is_same_v<S, float> ? 1e-6 : 1e-12) * (sum_abs + std::fabs(whole));
  CAPTURE(fam, sum, whole, diff, bound, target);
  CHECK(diff <= bound);
  CHECK(diff <= target);
  Worst& w = worst()[fam];
  if (bound > 0 && diff / bound > w.bound) {
    w.bound = diff / bound;
    w.where = where;
  }
  if (target > 0) w.target = std::max(w.target, diff / target);
}

// ---- batch-mean losses -------------------------------------------------------------------------

/// One batch-mean call: its loss, per-example losses, and its gradient flattened example by
/// example (both sides' token rows for a pairwise loss).
template <class S>
struct Run {
  S loss = 0;
  std::vector<S> losses, grad;
  bool finite = false;  // every metric is finite
  double z0 = 0;        // KTO: the reference point used, as reported
};

template <class S, class R>
void take_result(Run<S>& out, const R& res) {
  out.loss = res.loss;
  out.losses.assign(res.losses.data(), res.losses.data() + res.losses.size());
  out.finite = all_finite(metric_list(res.metrics));
}

/// How the shards' divisor relates to the unsplit call's.
struct Divisor {
  double value;      ///< the unsplit call's divisor (the batch, or nll's normalizer)
  bool same = true;  ///< the shards divide by the same double: their gradients are its bits
  double delta = 0;  ///< else a bound on |N' - N| / N
};

struct SumResult {
  double sum = 0, sum_abs = 0, bound = 0;
};

/// The batch-mean property over one sharding: each shard's losses (which do not depend on the
/// divisor) and gradient rows against the unsplit call's, an empty shard's loss exactly 0, and the
/// shard losses' sum. shard(k, b, e, fused) calls the loss on rows [b, e) (shard k) with the
/// global divisor.
template <class S, class Shard>
SumResult check_batch(const std::string& fam, const std::string& where, Index B, const Cuts& cuts, const Run<S>& whole,
                      Shard&& shard, const Divisor& dv, std::mt19937& rng) {
  const std::size_t stride = whole.grad.size() / at(B);
  CHECK(whole.finite);
  CHECK(std::isfinite(static_cast<double>(whole.loss)));
  constexpr double us = unit<S>;
  // Gradient entries when the divisors differ: each side rounds 1/N, d term * (1/N) and (mean) / W
  // in double, and the upstream, the row scale and (float mask) the weight product in S.
  const double grad_rel = slack * (dv.delta + 6 * us + 6 * ud);
  std::bernoulli_distribution coin(0.5);
  SumResult s;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    const Index b = cuts[k], e = cuts[k + 1];
    const bool fused = coin(rng);
    CAPTURE(k, b, e, fused);
    const Run<S> r = shard(k, b, e, fused);
    CHECK(r.finite);
    REQUIRE(r.losses.size() == at(e - b));
    REQUIRE(r.grad.size() == at(e - b) * stride);
    CHECK(same_bits(r.losses.data(), whole.losses.data() + b, at(e - b)));
    const S* wg = whole.grad.data() + at(b) * stride;
    if (dv.same) {
      CHECK(same_bits(r.grad.data(), wg, r.grad.size()));
    } else {
      CHECK(not_near(r.grad.data(), wg, r.grad.size(), grad_rel) == 0);
    }
    if (e == b) CHECK(r.loss == S(0));  // an empty shard: exactly 0 (and finite metrics above)
    s.sum += static_cast<double>(r.loss);
    s.sum_abs += std::fabs(static_cast<double>(r.loss));
  }
  // Each shard loss is fl(fl(T_k / N)) with T_k the double sum of its examples' terms t_i, the
  // unsplit loss fl(fl(T / N)): the same terms summed in two groupings (2 gamma_B sum |t| / N),
  // each loss rounded once to S (rho), the shard losses added here in double (gamma_K), and, when
  // the divisors differ, (N' - N) / N and the two reciprocals' roundings on sum |t| / N.
  double terms = 0;
  for (const S x : whole.losses) terms += std::fabs(static_cast<double>(x));
  terms /= dv.value * (1 - us);
  const double K = static_cast<double>(cuts.size() - 1);
  s.bound = slack * (loss_rounding<S> * (s.sum_abs + std::fabs(static_cast<double>(whole.loss))) +
                     (2 * gam(static_cast<double>(B), ud) + (dv.same ? 0.0 : dv.delta + 2 * ud)) * terms +
                     gam(K, ud) * s.sum_abs);
  check_loss_sum<S>(fam, where, s.sum, s.sum_abs, static_cast<double>(whole.loss), s.bound);
  return s;
}

/// A case for the batch-mean losses.
template <class S>
struct PairData {
  Index B, T, K, nkl;
  Tok<S> c, r, wc, wr, scores;  // chosen / rejected token log-probs and float masks; [B, K] rankings
  Tok<std::uint8_t> mc, mr;
  Vec<S> rc, rr, vc, vr, margin, kref, kp, kr;  // references, rewards, margins, KTO's refs and KL batch
  Vec<std::uint8_t> desirable;

  explicit PairData(std::mt19937& rng)
      : B(std::uniform_int_distribution<Index>(1, 12)(rng)),
        T(std::uniform_int_distribution<Index>(1, 24)(rng)),
        K(std::uniform_int_distribution<Index>(2, 5)(rng)),
        nkl(std::uniform_int_distribution<Index>(1, 10)(rng)),
        c(B, T),
        r(B, T),
        wc(B, T),
        wr(B, T),
        scores(B, K),
        mc(B, T),
        mr(B, T),
        rc(B),
        rr(B),
        vc(B),
        vr(B),
        margin(B),
        kref(B),
        kp(nkl),
        kr(nkl),
        desirable(B) {
    std::uniform_real_distribution<double> lp(-3, -0.05), seq(-10, -0.5), u(-2, 2), mg(0, 0.5), shift(-1, 2);
    for (Index k = 0; k < c.size(); ++k) {
      c.data()[k] = static_cast<S>(lp(rng));
      r.data()[k] = static_cast<S>(lp(rng));
    }
    random_masks(rng, mc, wc);
    random_masks(rng, mr, wr);
    poison_masked(rng, c, mc);
    poison_masked(rng, r, mr);
    for (Index k = 0; k < scores.size(); ++k) scores.data()[k] = static_cast<S>(u(rng));
    std::bernoulli_distribution good(0.6);
    for (Index i = 0; i < B; ++i) {
      rc(i) = static_cast<S>(seq(rng));
      rr(i) = static_cast<S>(seq(rng));
      vc(i) = static_cast<S>(u(rng));
      vr(i) = static_cast<S>(u(rng));
      margin(i) = static_cast<S>(mg(rng));
      kref(i) = static_cast<S>(seq(rng));
      desirable(i) = good(rng);
    }
    for (Index j = 0; j < nkl; ++j) {
      kr(j) = static_cast<S>(seq(rng));
      kp(j) = static_cast<S>(static_cast<double>(kr(j)) + shift(rng));  // z0 > 0 mostly, clamped at 0 sometimes
    }
  }

  /// Masks rows [b, e) out on both sides (a shard of masked rows), poisoning their tokens.
  void mask_rows(Index b, Index e) {
    for (Index i = b; i < e; ++i)
      for (Index t = 0; t < T; ++t) {
        mc(i, t) = mr(i, t) = 0;
        wc(i, t) = wr(i, t) = S(0);
        if (t % 2 == 0) c(i, t) = rlref::poison<S>(static_cast<long>(t));
      }
  }
};

template <pl::Reduction R, class X, class Mk>
auto reduce(const X& x, const Mk& m) {
  if constexpr (R == pl::Reduction::sum) {
    return pl::masked_sum(x, m);
  } else {
    return pl::masked_mean(x, m);
  }
}

/// A pairwise loss over rows [b, e) of a case: call(chosen, rejected, ref_chosen, ref_rejected,
/// batch_count, grad_chosen, grad_rejected, fused) runs it, the fused form or loss then backward.
template <class S, class M, pl::Reduction R, class Call>
Run<S> pair_run(const PairData<S>& d, Index b, Index e, std::optional<double> n, bool fused, const Call& call) {
  const Tok<S> c = rows(d.c, b, e), r = rows(d.r, b, e);
  const Tok<M> mc = rows(pick<M>(d.mc, d.wc), b, e), mr = rows(pick<M>(d.mr, d.wr), b, e);
  const Vec<S> rc = rows(d.rc, b, e), rr = rows(d.rr, b, e);
  const auto sc = reduce<R>(c, mc);
  const auto sr = reduce<R>(r, mr);
  Tok<S> gc(e - b, d.T), gr(e - b, d.T);
  const auto res = call(sc, sr, rc, rr, n, gc, gr, fused);
  Run<S> out;
  take_result(out, res);
  for (Index i = 0; i < e - b; ++i) {
    for (Index t = 0; t < d.T; ++t) out.grad.push_back(gc(i, t));
    for (Index t = 0; t < d.T; ++t) out.grad.push_back(gr(i, t));
  }
  return out;
}

/// KTO over rows [b, e) of a case and KL examples [kb, ke).
template <class S, class M, pl::Reduction R>
Run<S> kto_run(const PairData<S>& d, Index b, Index e, Index kb, Index ke, const pl::KtoOptions& o, bool fused) {
  const Tok<S> x = rows(d.c, b, e);
  const Tok<M> m = rows(pick<M>(d.mc, d.wc), b, e);
  const Vec<S> ref = rows(d.kref, b, e), kp = rows(d.kp, kb, ke), kr = rows(d.kr, kb, ke);
  const Vec<std::uint8_t> lab = rows(d.desirable, b, e);
  const auto s = reduce<R>(x, m);
  Tok<S> g(e - b, d.T);
  const auto res = fused ? pl::kto(s, ref, lab, kp, kr, o, g) : pl::kto(s, ref, lab, kp, kr, o);
  if (!fused) res.backward(g);
  Run<S> out;
  take_result(out, res);
  out.grad.assign(g.data(), g.data() + g.size());
  out.z0 = static_cast<double>(res.metrics.reference_point);
  return out;
}

/// nll over rows [b, e) of a case.
template <class S, class M, pl::Reduction R>
Run<S> nll_run(const PairData<S>& d, Index b, Index e, const pl::NllOptions& o, bool fused) {
  const Tok<S> x = rows(d.c, b, e);
  const Tok<M> m = rows(pick<M>(d.mc, d.wc), b, e);
  const auto s = reduce<R>(x, m);
  Tok<S> g(e - b, d.T);
  const auto res = fused ? pl::nll(s, o, g) : pl::nll(s, o);
  if (!fused) res.backward(g);
  Run<S> out;
  take_result(out, res);
  out.grad.assign(g.data(), g.data() + g.size());
  return out;
}

const char* dpo_name(pl::DpoVariant v) {
  static const char* const names[] = {"dpo sigmoid",  "dpo robust",   "dpo hinge",     "dpo exo_pair",
                                      "dpo nca_pair", "dpo bco_pair", "dpo sppo_hard", "dpo apo_zero",
                                      "dpo apo_down", "dpo discopop", "dpo aot",       "dpo aot_unpaired"};
  return names[static_cast<int>(v)];
}

/// Every loss of sequence inputs (masked_sum or masked_mean of M-masked tokens) over one sharding.
template <class S, class M, pl::Reduction R>
void sequence_losses(const PairData<S>& d, const Cuts& cuts, std::mt19937& rng, const std::string& where_case) {
  const char* form = R == pl::Reduction::sum ? "masked_sum" : "masked_mean";
  CAPTURE(mask_name<M>(), form);
  const std::string where = where_case + ", " + mask_name<M>() + ", " + form;
  std::uniform_real_distribution<double> u01(0, 1);
  std::bernoulli_distribution coin(0.5), rare(0.25);
  const Index B = d.B;
  const auto pairwise = [&](const std::string& name, const auto& call) {
    const Run<S> whole = pair_run<S, M, R>(d, 0, B, std::nullopt, false, call);
    const auto shard = [&](std::size_t, Index b, Index e, bool fused) {
      return pair_run<S, M, R>(d, b, e, static_cast<double>(B), fused, call);
    };
    check_batch<S>(family<S>(name), where, B, cuts, whole, shard, Divisor{static_cast<double>(B)}, rng);
  };

  // aot and aot_unpaired sort each call's batch, so their shards are not the whole batch's terms.
  for (const auto variant :
       {pl::DpoVariant::sigmoid, pl::DpoVariant::robust, pl::DpoVariant::hinge, pl::DpoVariant::exo_pair,
        pl::DpoVariant::nca_pair, pl::DpoVariant::bco_pair, pl::DpoVariant::sppo_hard, pl::DpoVariant::apo_zero,
        pl::DpoVariant::apo_down, pl::DpoVariant::discopop}) {
    pl::DpoOptions o;
    o.variant = variant;
    o.beta = 0.05 + 0.45 * u01(rng);
    o.reference_free = rare(rng);
    if (variant != pl::DpoVariant::hinge && coin(rng)) o.label_smoothing = 0.4 * u01(rng);
    if (variant == pl::DpoVariant::exo_pair) o.label_smoothing = 0.01 + 0.4 * u01(rng);
    if (variant != pl::DpoVariant::apo_zero && rare(rng)) o.divergence = pl::FDivergence::js_divergence;
    CAPTURE(dpo_name(variant), o.beta, o.label_smoothing, o.reference_free);
    pairwise(dpo_name(variant), [o](const auto& c, const auto& r, const auto& rc, const auto& rr,
                                    std::optional<double> n, auto& gc, auto& gr, bool fused) {
      pl::DpoOptions oo = o;
      oo.batch_count = n;
      const auto res = fused ? pl::dpo(c, r, rc, rr, oo, gc, gr) : pl::dpo(c, r, rc, rr, oo);
      if (!fused) res.backward(gc, gr);
      return res;
    });
  }
  {
    pl::IpoOptions o;
    o.beta = 0.05 + 0.45 * u01(rng);
    o.reference_free = rare(rng);
    CAPTURE(o.beta, o.reference_free);
    pairwise("ipo", [o](const auto& c, const auto& r, const auto& rc, const auto& rr, std::optional<double> n, auto& gc,
                        auto& gr, bool fused) {
      pl::IpoOptions oo = o;
      oo.batch_count = n;
      const auto res = fused ? pl::ipo(c, r, rc, rr, oo, gc, gr) : pl::ipo(c, r, rc, rr, oo);
      if (!fused) res.backward(gc, gr);
      return res;
    });
  }
  {
    pl::SimpoOptions o;
    o.beta = 1 + 2 * u01(rng);
    o.gamma = u01(rng);
    if (coin(rng)) o.label_smoothing = 0.3 * u01(rng);
    CAPTURE(o.beta, o.gamma, o.label_smoothing);
    pairwise("simpo", [o](const auto& c, const auto& r, const auto&, const auto&, std::optional<double> n, auto& gc,
                          auto& gr, bool fused) {
      pl::SimpoOptions oo = o;
      oo.batch_count = n;
      const auto res = fused ? pl::simpo(c, r, oo, gc, gr) : pl::simpo(c, r, oo);
      if (!fused) res.backward(gc, gr);
      return res;
    });
  }
  {
    pl::OrpoOptions o;
    o.beta = 0.05 + 0.45 * u01(rng);
    o.nll_weight = coin(rng) ? 1.0 : u01(rng);
    CAPTURE(o.beta, o.nll_weight);
    pairwise("orpo", [o](const auto& c, const auto& r, const auto&, const auto&, std::optional<double> n, auto& gc,
                         auto& gr, bool fused) {
      pl::OrpoOptions oo = o;
      oo.batch_count = n;
      const auto res = fused ? pl::orpo(c, r, oo, gc, gr) : pl::orpo(c, r, oo);
      if (!fused) res.backward(gc, gr);
      return res;
    });
  }
  {
    // KTO: the KL batch is split too (its own uneven cuts, empty parts included); every shard
    // takes z0 from the summed kto_reference_sums.
    const Cuts kcuts = cuts_into(rng, d.nkl, cuts.size() - 1);
    CAPTURE(d.nkl, kcuts);
    pl::KtoReferenceSums merged;
    for (std::size_t k = 0; k + 1 < kcuts.size(); ++k)
      merged += pl::kto_reference_sums(rows(d.kp, kcuts[k], kcuts[k + 1]), rows(d.kr, kcuts[k], kcuts[k + 1]));
    CHECK(merged.count == d.nkl);
    const double z0 = merged.reference_point();
    pl::KtoOptions o;
    o.beta = 0.05 + 0.45 * u01(rng);
    o.desirable_weight = 0.5 + u01(rng);
    o.undesirable_weight = 0.5 + u01(rng);
    CAPTURE(o.beta, o.desirable_weight, o.undesirable_weight, z0);
    pl::KtoOptions given = o;
    given.reference_point = z0;
    // The unsplit call with that z0: the shards' examples and gradient rows are its bits.
    const Run<S> whole = kto_run<S, M, R>(d, 0, B, 0, d.nkl, given, false);
    CHECK(whole.z0 == static_cast<double>(static_cast<S>(z0)));
    const auto shard = [&](std::size_t k, Index b, Index e, bool fused) {
      pl::KtoOptions oo = given;
      oo.batch_count = static_cast<double>(B);
      return kto_run<S, M, R>(d, b, e, kcuts[k], kcuts[k + 1], oo, fused);
    };
    const SumResult s =
        check_batch<S>(family<S>("kto"), where, B, cuts, whole, shard, Divisor{static_cast<double>(B)}, rng);

    // The unsplit call with its own z0, from the whole KL batch: no shard logic at all. Its z0 is
    // kto_reference_sums' over the whole batch; the merged sums add the same differences
    // d_j = kp_j - kr_j in another grouping (|sum' - sum| <= 2 gamma_{n+K} sum |d|), and
    // z0 = max(0, sum / n) (1-Lipschitz) rounds the quotient once a side.
    const Run<S> own = kto_run<S, M, R>(d, 0, B, 0, d.nkl, o, false);
    const double z0_own = pl::kto_reference_sums(d.kp, d.kr).reference_point();
    CHECK(own.z0 == static_cast<double>(static_cast<S>(z0_own)));
    double dabs = 0;
    for (Index j = 0; j < d.nkl; ++j) dabs += std::fabs(static_cast<double>(d.kp(j)) - static_cast<double>(d.kr(j)));
    const double n_kl = static_cast<double>(d.nkl);
    const double dz = slack * (2 * gam(n_kl + static_cast<double>(cuts.size()), ud) + 2 * ud) * dabs / n_kl;
    CHECK(std::fabs(z0 - z0_own) <= dz);
    // An example's loss w sig(-+b (u - z0)) moves by at most b w / 4 |z0' - z0|, so the mean by
    // b max(w) / 4 |z0' - z0|; to the sharded bound add that, both unsplit losses' rounding and
    // their term sums.
    double terms = 0;
    for (const S x : own.losses) terms += std::fabs(static_cast<double>(x));
    terms /= static_cast<double>(B) * (1 - unit<S>);
    const double bound = s.bound + slack * (o.beta * std::max(o.desirable_weight, o.undesirable_weight) / 4 * dz +
                                            loss_rounding<S> * (std::fabs(static_cast<double>(whole.loss)) +
                                                                std::fabs(static_cast<double>(own.loss))) +
                                            2 * gam(static_cast<double>(B), ud) * terms);
    check_loss_sum<S>(family<S>("kto, unsplit z0"), where, s.sum, s.sum_abs, static_cast<double>(own.loss), bound);
  }
  {
    const Run<S> whole = nll_run<S, M, R>(d, 0, B, pl::NllOptions{}, false);
    const auto shard = [&](std::size_t, Index b, Index e, bool fused) {
      pl::NllOptions o;
      o.batch_count = static_cast<double>(B);
      return nll_run<S, M, R>(d, b, e, o, fused);
    };
    check_batch<S>(family<S>("nll"), where, B, cuts, whole, shard, Divisor{static_cast<double>(B)}, rng);
  }
  {
    // nll's normalizer: the global token weight (with masked_sum, TRL's token-mean SFT loss), as
    // token_counts summed over the shards, against the unsplit mask's. Byte masks count exactly;
    // float weights are the same row weights W_i added in another grouping: within
    // 2 gamma_{B+K} N of each other.
    const Tok<M>& m = pick<M>(d.mc, d.wc);
    const double n_whole = pl::token_counts(m).weight;
    pl::TokenCounts total;
    for (std::size_t k = 0; k + 1 < cuts.size(); ++k) total += pl::token_counts(rows(m, cuts[k], cuts[k + 1]));
    CHECK(total.rows == B);
    const double delta = 2 * gam(static_cast<double>(B) + static_cast<double>(cuts.size()), ud);
    CHECK(std::fabs(total.weight - n_whole) <= delta * n_whole);
    if (std::is_same_v<M, std::uint8_t>) CHECK(total.weight == n_whole);
    if (n_whole > 0) {  // else no token is selected anywhere: there is no token mean to take
      pl::NllOptions o;
      o.normalizer = n_whole;
      const Run<S> whole = nll_run<S, M, R>(d, 0, B, o, false);
      const auto shard = [&](std::size_t, Index b, Index e, bool fused) {
        pl::NllOptions oo;
        oo.normalizer = total.weight;
        return nll_run<S, M, R>(d, b, e, oo, fused);
      };
      check_batch<S>(family<S>("nll, normalizer"), where, B, cuts, whole, shard,
                     Divisor{n_whole, total.weight == n_whole, delta}, rng);
    }
  }
}

/// bradley_terry (with or without margins and centering) and bradley_terry_ranking over one sharding.
template <class S>
void reward_losses(const PairData<S>& d, const Cuts& cuts, std::mt19937& rng, const std::string& where) {
  const Index B = d.B;
  std::bernoulli_distribution coin(0.5);
  pl::BradleyTerryOptions o;
  if (coin(rng)) o.center_coef = 0.05 * std::uniform_real_distribution<double>(0, 1)(rng);
  const bool with_margin = coin(rng);
  CAPTURE(o.center_coef, with_margin);
  const auto bt = [&](Index b, Index e, std::optional<double> n) {
    const Vec<S> vc = rows(d.vc, b, e), vr = rows(d.vr, b, e), mg = rows(d.margin, b, e);
    pl::BradleyTerryOptions oo = o;
    oo.batch_count = n;
    Vec<S> gc(e - b), gr(e - b);
    Run<S> out;
    const auto finish = [&](const auto& res) {
      res.backward(gc, gr);
      take_result(out, res);
    };
    if (with_margin) {
      finish(pl::bradley_terry(vc, vr, mg, oo));
    } else {
      finish(pl::bradley_terry(vc, vr, oo));
    }
    for (Index i = 0; i < e - b; ++i) {
      out.grad.push_back(gc(i));
      out.grad.push_back(gr(i));
    }
    return out;
  };
  check_batch<S>(
      family<S>("bradley_terry"), where, B, cuts, bt(0, B, std::nullopt),
      [&](std::size_t, Index b, Index e, bool) { return bt(b, e, static_cast<double>(B)); },
      Divisor{static_cast<double>(B)}, rng);

  const auto rank = [&](Index b, Index e, std::optional<double> n) {
    const Tok<S> x = rows(d.scores, b, e);
    pl::BradleyTerryOptions oo = o;
    oo.batch_count = n;
    const auto res = pl::bradley_terry_ranking(x, oo);
    Tok<S> g(e - b, d.K);
    res.backward(g);
    Run<S> out;
    take_result(out, res);
    out.grad.assign(g.data(), g.data() + g.size());
    return out;
  };
  CAPTURE(d.K);
  check_batch<S>(
      family<S>("bradley_terry_ranking"), where, B, cuts, rank(0, B, std::nullopt),
      [&](std::size_t, Index b, Index e, bool) { return rank(b, e, static_cast<double>(B)); },
      Divisor{static_cast<double>(B)}, rng);
}

// ---- token losses: ppo_clip and value_loss -----------------------------------------------------

enum class Kind { ppo, ppo_ref, ppo_kl, value };
constexpr Kind kKinds[] = {Kind::ppo, Kind::ppo_ref, Kind::ppo_kl, Kind::value};
constexpr pl::Aggregation kModes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                      pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                      pl::Aggregation::token_sum};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::ppo:
      return "ppo_clip";
    case Kind::ppo_ref:
      return "ppo_clip, ref_logp, kl_coef 0";
    case Kind::ppo_kl:
      return "ppo_clip, ref_logp, kl_coef > 0";
    default:
      return "value_loss";
  }
}
const char* mode_name(pl::Aggregation a) {
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

/// A case for the token losses: [B, T] log-probs, rollout constants and masks (value_loss reads
/// logp, old and adv as values, old values and returns).
template <class S>
struct RlData {
  Index B, T;
  Tok<S> logp, old, adv, ref, weights;
  Tok<std::uint8_t> bytes;

  RlData(std::mt19937& rng, Index b, Index t)
      : B(b), T(t), logp(b, t), old(b, t), adv(b, t), ref(b, t), weights(b, t), bytes(b, t) {
    std::uniform_real_distribution<double> u(-0.4, 0.4), a(-2, 2);
    for (Index k = 0; k < logp.size(); ++k) {
      old.data()[k] = static_cast<S>(-1.5 + u(rng));
      logp.data()[k] = static_cast<S>(static_cast<double>(old.data()[k]) + u(rng));
      ref.data()[k] = static_cast<S>(static_cast<double>(old.data()[k]) + u(rng));
      adv.data()[k] = static_cast<S>(a(rng));
    }
    random_masks(rng, bytes, weights);
    for (Tok<S>* x : {&logp, &old, &adv, &ref}) poison_masked(rng, *x, bytes);
  }

  /// Masks out rows [rb, re) x columns [cb, ce), poisoning their log-probs.
  void mask_block(Index rb, Index re, Index cb, Index ce) {
    for (Index i = rb; i < re; ++i)
      for (Index t = cb; t < ce; ++t) {
        bytes(i, t) = 0;
        weights(i, t) = S(0);
        if (t % 2 == 0) logp(i, t) = rlref::poison<S>(static_cast<long>(i + t));
      }
  }
};

struct RlConfig {
  Kind kind;
  pl::PpoOptions po;
  pl::ValueOptions vo;
  pl::Aggregation mode() const { return kind == Kind::value ? vo.aggregation : po.aggregation; }
};

/// Random clips (dual clip half the time), KL estimator and coefficient, value clip.
RlConfig random_config(std::mt19937& rng, Kind kind, pl::Aggregation mode) {
  std::uniform_real_distribution<double> u01(0, 1);
  std::bernoulli_distribution coin(0.5), often(0.7);
  RlConfig c{kind, {}, {}};
  c.po.aggregation = c.vo.aggregation = mode;
  c.po.clip_low = 0.1 + 0.2 * u01(rng);
  c.po.clip_high = 0.1 + 0.2 * u01(rng);
  if (coin(rng)) c.po.dual_clip = 2 + 2 * u01(rng);
  c.po.kl_estimator = static_cast<pl::KlEstimator>(
      std::uniform_int_distribution<int>(0, static_cast<int>(pl::KlEstimator::k3_plus))(rng));  // the last one
  if (kind == Kind::ppo_kl) c.po.kl_coef = 0.01 + 0.2 * u01(rng);
  if (often(rng)) {
    c.vo.clip = 0.05 + 0.45 * u01(rng);
  } else {
    c.vo.clip = std::nullopt;
  }
  return c;
}

/// One token-loss call: loss, per-row contributions, row scales, metrics and the gradient.
template <class S>
struct TokRun {
  S loss = 0;
  std::vector<S> losses;
  std::vector<double> scales, metrics;
  Tok<S> grad;
  double weight() const { return metrics.back(); }  // token_weight
};

template <class S, class M>
TokRun<S> rl_run(Kind kind, const Tok<S>& lp, const Tok<S>& old, const Tok<S>& adv, const Tok<S>& ref, const Tok<M>& m,
                 bool fused, const pl::PpoOptions& po, const pl::ValueOptions& vo) {
  TokRun<S> out;
  out.grad = Tok<S>(lp.dimension(0), lp.dimension(1));
  const auto take = [&](const auto& r) {
    out.loss = r.loss;
    out.losses.assign(r.losses.data(), r.losses.data() + r.losses.size());
    out.scales = r.row_scales();
    out.metrics = metric_list(r.metrics);
  };
  if (kind == Kind::value) {
    if (fused) {
      take(pl::value_loss(lp, old, adv, m, vo, out.grad));
    } else {
      const auto r = pl::value_loss(lp, old, adv, m, vo);
      r.backward(out.grad);
      take(r);
    }
  } else if (kind == Kind::ppo) {
    if (fused) {
      take(pl::ppo_clip(lp, old, adv, m, po, out.grad));
    } else {
      const auto r = pl::ppo_clip(lp, old, adv, m, po);
      r.backward(out.grad);
      take(r);
    }
  } else {
    if (fused) {
      take(pl::ppo_clip(lp, old, adv, m, ref, po, out.grad));
    } else {
      const auto r = pl::ppo_clip(lp, old, adv, m, ref, po);
      r.backward(out.grad);
      take(r);
    }
  }
  return out;
}

/// The global normalizers of one shard's call, counts first: token_count = the summed token
/// weight (unset when no token is selected anywhere: the loss is 0 and 0 is no normaliser),
/// sequence_count = the global rows, token_sum_norm = the padded T, row_weights as given.
template <class O>
void set_global(O& o, pl::Aggregation mode, double token_weight, Index seqs, Index T, const std::vector<double>* w) {
  if (mode == pl::Aggregation::token_mean) {
    if (token_weight > 0) o.token_count = token_weight;
    return;
  }
  o.sequence_count = static_cast<double>(seqs);
  if (mode == pl::Aggregation::seq_mean_token_sum_norm) o.token_sum_norm = static_cast<double>(T);
  if (mode == pl::Aggregation::seq_mean_token_mean && w) o.row_weights = *w;
}

/// Data parallelism: rows [c_k, c_{k+1}) on shard k.
template <class S, class M>
void rl_rows(const RlData<S>& d, const Cuts& cuts, const RlConfig& cfg, std::mt19937& rng, const std::string& where) {
  constexpr double us = unit<S>;
  const Tok<M>& mask = pick<M>(d.bytes, d.weights);
  const Index B = d.B, T = d.T;
  const double K = static_cast<double>(cuts.size() - 1);
  const pl::Aggregation mode = cfg.mode();
  CAPTURE(kind_name(cfg.kind), mode_name(mode), mask_name<M>());
  const TokRun<S> whole = rl_run<S, M>(cfg.kind, d.logp, d.old, d.adv, d.ref, mask, false, cfg.po, cfg.vo);
  REQUIRE(all_finite(whole.metrics));
  CHECK(std::isfinite(static_cast<double>(whole.loss)));

  std::vector<pl::TokenCounts> counts;
  pl::TokenCounts total;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    counts.push_back(pl::token_counts(rows(mask, cuts[k], cuts[k + 1])));
    total += counts.back();
  }
  CHECK(total.rows == B);
  // Every mode but token_mean divides by the same doubles on either side: a row's own W_i, B, T.
  // token_mean's summed weight N' is the unsplit N exactly for byte masks (integer counts); float
  // weights are the same row weights in another grouping, within 2 gamma_{B+K} N.
  const double N = whole.weight();
  CHECK(std::fabs(total.weight - N) <= 2 * gam(static_cast<double>(B) + K, ud) * N);
  if (std::is_same_v<M, std::uint8_t>) CHECK(total.weight == N);
  const bool same = mode != pl::Aggregation::token_mean || total.weight == N;
  // Else the row scale 1 / N' against 1 / N: the regrouping and the two reciprocals' roundings.
  const double delta = same ? 0.0 : slack * (2 * gam(static_cast<double>(B) + K, ud) + 2 * ud);

  std::bernoulli_distribution coin(0.5);
  const bool give_row_weights = coin(rng);  // seq_mean_token_mean: a shard's own rows either way
  double sum = 0, sum_abs = 0;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    const Index b = cuts[k], e = cuts[k + 1];
    const bool fused = coin(rng);
    CAPTURE(k, b, e, fused, give_row_weights);
    const Tok<M> m = rows(mask, b, e);
    const Vec<double> rw = pl::row_weights(m);
    const std::vector<double> w(rw.data(), rw.data() + rw.size());
    pl::PpoOptions po = cfg.po;
    pl::ValueOptions vo = cfg.vo;
    set_global(po, mode, total.weight, total.rows, T, give_row_weights ? &w : nullptr);
    set_global(vo, mode, total.weight, total.rows, T, give_row_weights ? &w : nullptr);
    const TokRun<S> r = rl_run<S, M>(cfg.kind, rows(d.logp, b, e), rows(d.old, b, e), rows(d.adv, b, e),
                                     rows(d.ref, b, e), m, fused, po, vo);
    CHECK(all_finite(r.metrics));
    CHECK(r.weight() == counts[k].weight);  // the token_weight metric is token_counts' weight
    const std::size_t nr = at(e - b), nt = at((e - b) * T);
    const double* ws = whole.scales.data() + b;
    const S* wl = whole.losses.data() + b;
    const S* wg = whole.grad.data() + b * T;
    if (same) {
      // The same row scales (doubles), so the same contributions and gradient rows.
      CHECK(same_bits(r.scales.data(), ws, nr));
      CHECK(same_bits(r.losses.data(), wl, nr));
      CHECK(same_bits(r.grad.data(), wg, nt));
    } else {
      CHECK(not_near(r.scales.data(), ws, nr, delta) == 0);
      // A contribution fl(fl(s S_i)) rounds twice more a side; a gradient entry fl(fl(s) p),
      // with p = w dl / dlogp the same bits on both sides, twice in S a side.
      CHECK(not_near(r.losses.data(), wl, nr, delta + slack * (2 * ud + 2 * us)) == 0);
      CHECK(not_near(r.grad.data(), wg, nt, delta + slack * 4 * us) == 0);
    }
    if (counts[k].tokens == 0) {  // only masked-out rows: exactly 0, and no NaN from the poison
      CHECK(r.loss == S(0));
      CHECK(all_zero(r.grad.data(), nt));
    }
    sum += static_cast<double>(r.loss);
    sum_abs += std::fabs(static_cast<double>(r.loss));
  }
  // The loss is the double sum of the row contributions c_i rounded once to S: the same c_i (or
  // within delta + 2 u_d of them) summed in two groupings, each loss rounded (rho), the shard
  // losses added here in double.
  double terms = 0;
  for (const S x : whole.losses) terms += std::fabs(static_cast<double>(x));
  terms /= 1 - us;
  const double L = static_cast<double>(whole.loss);
  const double bound =
      slack * (loss_rounding<S> * (sum_abs + std::fabs(L)) +
               (2 * gam(static_cast<double>(B), ud) + (same ? 0.0 : delta + 2 * ud)) * terms + gam(K, ud) * sum_abs);
  check_loss_sum<S>(family<S>(std::string(cfg.kind == Kind::value ? "value_loss" : "ppo_clip") + ", rows"),
                    where + ", " + kind_name(cfg.kind) + ", " + mode_name(mode) + ", " + mask_name<M>(), sum, sum_abs,
                    L, bound);
}

/// Sequence parallelism: every row's columns [c_k, c_{k+1}) on shard k.
template <class S, class M>
void rl_columns(const RlData<S>& d, const Cuts& cuts, const RlConfig& cfg, std::mt19937& rng,
                const std::string& where) {
  constexpr bool bytes = std::is_same_v<M, std::uint8_t>;
  constexpr double us = unit<S>;
  const Tok<M>& mask = pick<M>(d.bytes, d.weights);
  const Index B = d.B, T = d.T;
  const double K = static_cast<double>(cuts.size() - 1), Bd = static_cast<double>(B);
  const pl::Aggregation mode = cfg.mode();
  CAPTURE(kind_name(cfg.kind), mode_name(mode), mask_name<M>());
  const TokRun<S> whole = rl_run<S, M>(cfg.kind, d.logp, d.old, d.adv, d.ref, mask, false, cfg.po, cfg.vo);
  REQUIRE(all_finite(whole.metrics));
  const Vec<double> w_whole = pl::row_weights(mask);  // the W_i the unsplit call divides by

  std::vector<pl::TokenCounts> counts;
  pl::TokenCounts total;
  std::vector<double> W(at(B), 0.0);  // row_weights, all-reduced
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    const Tok<M> cm = cols(mask, cuts[k], cuts[k + 1]);
    counts.push_back(pl::token_counts(cm));
    CHECK(counts.back().rows == B);  // every rank holds every row
    total += counts.back();
    const Vec<double> rw = pl::row_weights(cm);
    for (Index i = 0; i < B; ++i) W[at(i)] += rw(i);
  }
  // A weight sum over n <= T tokens: byte masks count exactly; float weights sum in the token
  // type's LaneSum (lane_sum_error). token_mean: N' adds the shards' row parts, each within ew of
  // exact, over B K terms; N the whole rows', within ew, over B.
  const double ew = bytes ? 0.0 : lane_sum_error<S>(T);
  const double N = whole.weight();
  const double dN = slack * (2 * ew + 2 * gam(Bd * (K + 1), ud));
  CHECK(std::fabs(total.weight - N) <= dN * N);
  if (bytes) CHECK(total.weight == N);
  // seq_mean_token_mean: W'_i, the row's parts added over K shards, against the row's W_i.
  const double dW = slack * (2 * ew + gam(K, ud));
  std::size_t bad_w = 0;
  for (Index i = 0; i < B; ++i) {
    bad_w += !(std::fabs(W[at(i)] - w_whole(i)) <= dW * w_whole(i));
    if (bytes) bad_w += W[at(i)] != w_whole(i);
  }
  CHECK(bad_w == 0);
  // Per row: whether the shards' row scale is the unsplit call's double (the same inputs to one
  // formula), else a bound on the relative difference of the two (1 / N, 1 / (B W_i): their
  // roundings added to the weights').
  std::vector<char> same(at(B), 1);
  std::vector<double> ds(at(B), 0.0);
  for (Index i = 0; i < B; ++i) {
    if (mode == pl::Aggregation::token_mean && total.weight != N) {
      same[at(i)] = 0;
      ds[at(i)] = dN + slack * 2 * ud;
    } else if (mode == pl::Aggregation::seq_mean_token_mean && W[at(i)] != w_whole(i)) {
      same[at(i)] = 0;
      ds[at(i)] = dW + slack * 4 * ud;
    }
  }
  // The size of each row's LaneSum terms, sum_t w |l_t|, from the long-double reference's token losses.
  const rlref::Data rd = rlref::to_data(d.logp, d.old, d.adv, mask, cfg.kind == Kind::ppo ? nullptr : &d.ref);
  const std::vector<rlref::ld> l =
      cfg.kind == Kind::value ? rlref::value_ref(rd, cfg.vo).tokens : rlref::ppo_ref(rd, cfg.po).tokens;
  std::vector<double> sa(at(B), 0.0);  // s_i sum_t w |l_t|: row i's terms as they enter the loss
  for (Index i = 0; i < B; ++i) {
    rlref::ld a = 0;
    for (Index t = 0; t < T; ++t) {
      const std::size_t k = rd.at(i, t);
      if (rd.sel[k]) a += rd.w[k] * std::fabs(l[k]);
    }
    sa[at(i)] = whole.scales[at(i)] * static_cast<double>(a);
  }

  std::bernoulli_distribution coin(0.5);
  std::vector<double> row_sum(at(B), 0.0), row_abs(at(B), 0.0);
  double sum = 0, sum_abs = 0;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    const Index b = cuts[k], e = cuts[k + 1], n = e - b;
    const bool fused = coin(rng);
    CAPTURE(k, b, e, fused);
    pl::PpoOptions po = cfg.po;
    pl::ValueOptions vo = cfg.vo;
    set_global(po, mode, total.weight, counts[k].rows, T, &W);
    set_global(vo, mode, total.weight, counts[k].rows, T, &W);
    const TokRun<S> r = rl_run<S, M>(cfg.kind, cols(d.logp, b, e), cols(d.old, b, e), cols(d.adv, b, e),
                                     cols(d.ref, b, e), cols(mask, b, e), fused, po, vo);
    CHECK(all_finite(r.metrics));
    CHECK(r.weight() == counts[k].weight);
    std::size_t bad_g = 0, bad_s = 0;
    for (Index i = 0; i < B; ++i) {
      const S* g = r.grad.data() + i * n;
      const S* wg = whole.grad.data() + i * T + b;
      const double s1 = r.scales[at(i)], s0 = whole.scales[at(i)];
      if (same[at(i)]) {
        bad_g += !same_bits(g, wg, at(n));
        bad_s += !same_bits(&s1, &s0, 1);
      } else {
        // fl(fl(s') p) against fl(fl(s) p), p the same bits: ds and two S roundings a side.
        bad_g += not_near(g, wg, at(n), ds[at(i)] + slack * 4 * us);
        bad_s += not_near(&s1, &s0, 1, ds[at(i)]);
      }
      row_sum[at(i)] += static_cast<double>(r.losses[at(i)]);
      row_abs[at(i)] += std::fabs(static_cast<double>(r.losses[at(i)]));
    }
    CHECK(bad_g == 0);
    CHECK(bad_s == 0);
    if (counts[k].tokens == 0) {  // an empty shard, or only masked-out tokens: exactly 0, no NaN
      CHECK(r.loss == S(0));
      CHECK(all_zero(r.losses.data(), r.losses.size()));
      CHECK(all_zero(r.grad.data(), at(r.grad.size())));
    }
    sum += static_cast<double>(r.loss);
    sum_abs += std::fabs(static_cast<double>(r.loss));
  }
  // Row i: its part sums S_ik and its whole sum S_i are LaneSums of the same terms x_t = w l_t
  // (the same bits on every shard), each within lane_sum_error(T) sum |x| of exact: 2 eL s_i A_i.
  // The scales differ by ds_i; each contribution fl(fl(s S)) rounds in double and in S (rho); the
  // parts are added here in double.
  const double eL = lane_sum_error<S>(T);
  std::size_t bad_rows = 0;
  double terms = 0;
  for (Index i = 0; i < B; ++i) {
    const double c = static_cast<double>(whole.losses[at(i)]);
    const double bi = slack * (loss_rounding<S> * (row_abs[at(i)] + std::fabs(c)) + gam(K, ud) * row_abs[at(i)] +
                               sa[at(i)] * (2 * eL + ds[at(i)] + 2 * gam(K + 2, ud)));
    bad_rows += !(std::fabs(row_sum[at(i)] - c) <= bi);
    terms += sa[at(i)] * (2 * eL + ds[at(i)] + 2 * gam(Bd + K + 2, ud));
  }
  CHECK(bad_rows == 0);
  // The loss: the same per-row errors, the rows added in double, the loss rounded once to S.
  const double L = static_cast<double>(whole.loss);
  const double bound = slack * (loss_rounding<S> * (sum_abs + std::fabs(L)) + gam(K, ud) * sum_abs + terms);
  check_loss_sum<S>(family<S>(std::string(cfg.kind == Kind::value ? "value_loss" : "ppo_clip") + ", columns"),
                    where + ", " + kind_name(cfg.kind) + ", " + mode_name(mode) + ", " + mask_name<M>(), sum, sum_abs,
                    L, bound);
}

// ---- threads -----------------------------------------------------------------------------------

struct Pools {
  pl::ThreadPool one{1}, two{2}, three{3};
};
/// The pools, created once and kept for every case.
std::vector<pl::Threads> pool_handles() {
  static Pools pools;
  return {pools.one, pools.two, pools.three};
}

template <class S>
bool identical(const TokRun<S>& a, const TokRun<S>& b) {
  return same_bits(&a.loss, &b.loss, 1) && same_bits(a.losses, b.losses) && same_bits(a.scales, b.scales) &&
         same_bits(a.metrics, b.metrics) && a.grad.size() == b.grad.size() &&
         same_bits(a.grad.data(), b.grad.data(), at(a.grad.size()));
}

/// ppo_clip / value_loss: fused and two-pass, on every pool, against the fused call without one.
template <class S, class M>
void rl_threads(const RlData<S>& d, const RlConfig& cfg) {
  const Tok<M>& mask = pick<M>(d.bytes, d.weights);
  CAPTURE(kind_name(cfg.kind), mode_name(cfg.mode()), mask_name<M>());
  const TokRun<S> base = rl_run<S, M>(cfg.kind, d.logp, d.old, d.adv, d.ref, mask, true, cfg.po, cfg.vo);
  CHECK(all_finite(base.metrics));
  CHECK(identical(rl_run<S, M>(cfg.kind, d.logp, d.old, d.adv, d.ref, mask, false, cfg.po, cfg.vo), base));
  for (const pl::Threads& th : pool_handles()) {
    CAPTURE(th.count());
    RlConfig c = cfg;
    c.po.threads = th;
    c.vo.threads = th;
    for (const bool fused : {true, false})
      CHECK(identical(rl_run<S, M>(c.kind, d.logp, d.old, d.adv, d.ref, mask, fused, c.po, c.vo), base));
  }
}

/// masked_sum / masked_mean eval and backward on every pool, against no pool.
template <class S, class M>
void masked_threads(const RlData<S>& d, std::mt19937& rng) {
  const Tok<M>& mask = pick<M>(d.bytes, d.weights);
  CAPTURE(mask_name<M>());
  Vec<S> up(d.B);
  std::uniform_real_distribution<double> u(-1, 1);
  for (Index i = 0; i < d.B; ++i) up(i) = static_cast<S>(u(rng));
  const auto check = [&](const auto& x) {
    const Vec<S> v0 = x.eval();
    Tok<S> g0(d.B, d.T);
    x.backward(up, g0);
    CHECK(all_finite(std::vector<double>(v0.data(), v0.data() + v0.size())));
    for (const pl::Threads& th : pool_handles()) {
      CAPTURE(th.count());
      const Vec<S> v = x.eval(th);
      CHECK(same_bits(v.data(), v0.data(), at(d.B)));
      Tok<S> g(d.B, d.T);
      x.backward(up, g, th);
      CHECK(same_bits(g.data(), g0.data(), at(g.size())));
    }
  };
  check(pl::masked_sum(d.logp, mask));
  check(pl::masked_mean(d.logp, mask));
}

/// token_logprobs (with entropy) and ppo_clip_from_logits on every pool, against no pool.
template <class S, class M>
void logit_threads(std::mt19937& rng) {
  const Index V = std::uniform_int_distribution<Index>(40, 160)(rng);
  const Index B = std::uniform_int_distribution<Index>(4, 12)(rng);
  const Index T = (3 * (Index{1} << 18) / V + B - 1) / B + std::uniform_int_distribution<Index>(0, 8)(rng);
  const Index N = B * T;
  CAPTURE(V, B, T, mask_name<M>());
  REQUIRE(pl::detail::logit_grain(N, V) < N);      // several blocks of tokens: the pools take some
  REQUIRE(pl::detail::logit_grain(B, N * V) < B);  // and of rows (ppo_clip_from_logits)
  const RlData<S> d(rng, B, T);
  const Tok<M>& mask = pick<M>(d.bytes, d.weights);
  Eigen::Tensor<S, 3, Eigen::RowMajor> z(B, T, V);
  std::normal_distribution<double> nd(0, 2);
  for (Index k = 0; k < z.size(); ++k) z.data()[k] = static_cast<S>(nd(rng));
  Tok<std::int64_t> y(B, T);
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  for (Index k = 0; k < y.size(); ++k) y.data()[k] = d.bytes.data()[k] ? lab(rng) : -1;
  Tok<S> gl(B, T), gh(B, T);
  for (Index k = 0; k < gl.size(); ++k) {
    gl.data()[k] = static_cast<S>(0.1 * nd(rng));
    gh.data()[k] = static_cast<S>(0.1 * nd(rng));
  }
  using Logits = Eigen::Tensor<S, 3, Eigen::RowMajor>;
  pl::LogprobOptions lo;
  lo.entropy = true;
  const auto r0 = pl::token_logprobs(z, y, mask, lo);
  Logits g0(B, T, V);
  r0.backward(gl, gh, g0);
  const pl::Aggregation mode = kModes[std::uniform_int_distribution<int>(0, 3)(rng)];
  const pl::PpoOptions popt = random_config(rng, Kind::ppo, mode).po;
  CAPTURE(mode_name(mode));
  pl::LogprobOptions plo;
  plo.entropy_coef = 0.01;
  Logits p0(B, T, V);
  const auto q0 = pl::ppo_clip_from_logits(z, y, d.old, d.adv, mask, popt, plo, p0);
  CHECK(std::isfinite(static_cast<double>(q0.loss)));
  for (const pl::Threads& th : pool_handles()) {
    CAPTURE(th.count());
    pl::LogprobOptions lt = lo;
    lt.threads = th;
    const auto r = pl::token_logprobs(z, y, mask, lt);
    CHECK(same_bits(r.logp.data(), r0.logp.data(), at(N)));
    CHECK(same_bits(r.entropy.data(), r0.entropy.data(), at(N)));
    Logits g(B, T, V);
    r.backward(gl, gh, g);
    CHECK(same_bits(g.data(), g0.data(), at(g.size())));
    // Either options' threads drive the passes over the logits.
    for (int which = 0; which < 2; ++which) {
      CAPTURE(which);
      pl::PpoOptions po = popt;
      pl::LogprobOptions l2 = plo;
      (which == 0 ? po.threads : l2.threads) = th;
      Logits p(B, T, V);
      const auto q = pl::ppo_clip_from_logits(z, y, d.old, d.adv, mask, po, l2, p);
      CHECK(same_bits(&q.loss, &q0.loss, 1));
      CHECK(same_bits(q.losses.data(), q0.losses.data(), at(B)));
      CHECK(same_bits(q.logp.data(), q0.logp.data(), at(N)));
      CHECK(same_bits(metric_list(q.metrics), metric_list(q0.metrics)));
      CHECK(same_bits(p.data(), p0.data(), at(p.size())));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("sharding: every batch-mean loss over random row shards adds up to the unsplit call",
                   "[sharding][batch_count]", float, double) {
  using S = TestType;
  for (int n = 0; n < kBatchCases; ++n) {
    const unsigned seed = 0x5a0000u + static_cast<unsigned>(n);
    std::mt19937 rng(seed);
    PairData<S> d(rng);
    const Cuts cuts = random_cuts(rng, d.B, true);
    // One case in three, one shard holds only masked-out rows.
    if (std::bernoulli_distribution(1.0 / 3)(rng)) {
      const auto k = at(std::uniform_int_distribution<Index>(0, static_cast<Index>(cuts.size()) - 2)(rng));
      d.mask_rows(cuts[k], cuts[k + 1]);
    }
    CAPTURE(seed, d.B, d.T, cuts);
    const std::string where = "seed " + std::to_string(seed);
    reward_losses<S>(d, cuts, rng, where);
    sequence_losses<S, std::uint8_t, pl::Reduction::sum>(d, cuts, rng, where);
    sequence_losses<S, std::uint8_t, pl::Reduction::mean>(d, cuts, rng, where);
    sequence_losses<S, S, pl::Reduction::sum>(d, cuts, rng, where);
    sequence_losses<S, S, pl::Reduction::mean>(d, cuts, rng, where);
  }
}

TEMPLATE_TEST_CASE("sharding: ppo_clip and value_loss over rows split between shards add up to the unsplit call",
                   "[sharding][counts]", float, double) {
  using S = TestType;
  for (int n = 0; n < kRowCases; ++n) {
    const unsigned seed = 0x5b0000u + static_cast<unsigned>(n);
    std::mt19937 rng(seed);
    const Index B = std::uniform_int_distribution<Index>(1, 10)(rng);
    const Index T = std::uniform_int_distribution<Index>(1, 40)(rng);
    RlData<S> d(rng, B, T);
    const Cuts cuts = random_cuts(rng, B, false);  // ppo_clip and value_loss need a row
    if (std::bernoulli_distribution(1.0 / 3)(rng)) {
      const auto k = at(std::uniform_int_distribution<Index>(0, static_cast<Index>(cuts.size()) - 2)(rng));
      d.mask_block(cuts[k], cuts[k + 1], 0, T);
    }
    CAPTURE(seed, B, T, cuts);
    const std::string where = "seed " + std::to_string(seed);
    for (const Kind kind : kKinds)
      for (const pl::Aggregation mode : kModes) {
        const RlConfig cfg = random_config(rng, kind, mode);
        rl_rows<S, std::uint8_t>(d, cuts, cfg, rng, where);
        rl_rows<S, S>(d, cuts, cfg, rng, where);
      }
  }
}

TEMPLATE_TEST_CASE(
    "sharding: ppo_clip and value_loss over rows split at columns (sequence parallelism) add up to "
    "the unsplit call",
    "[sharding][counts]", float, double) {
  using S = TestType;
  for (int n = 0; n < kColumnCases; ++n) {
    const unsigned seed = 0x5c0000u + static_cast<unsigned>(n);
    std::mt19937 rng(seed);
    const Index B = std::uniform_int_distribution<Index>(1, 8)(rng);
    // Long rows one case in three: several LaneSum chunks a lane, also at AVX-512's 16 lanes.
    const Index T = std::bernoulli_distribution(1.0 / 3)(rng) ? std::uniform_int_distribution<Index>(100, 300)(rng)
                                                              : std::uniform_int_distribution<Index>(1, 40)(rng);
    RlData<S> d(rng, B, T);
    const Cuts cuts = random_cuts(rng, T, true);  // empty shards: [B, 0] calls
    if (std::bernoulli_distribution(1.0 / 3)(rng)) {
      const auto k = at(std::uniform_int_distribution<Index>(0, static_cast<Index>(cuts.size()) - 2)(rng));
      d.mask_block(0, B, cuts[k], cuts[k + 1]);
    }
    CAPTURE(seed, B, T, cuts);
    const std::string where = "seed " + std::to_string(seed);
    for (const Kind kind : kKinds)
      for (const pl::Aggregation mode : kModes) {
        const RlConfig cfg = random_config(rng, kind, mode);
        rl_columns<S, std::uint8_t>(d, cuts, cfg, rng, where);
        rl_columns<S, S>(d, cuts, cfg, rng, where);
      }
  }
}

TEMPLATE_TEST_CASE("sharding: the unsplit token losses and masked reductions give the same bits on 1, 2 and 3 threads",
                   "[sharding][threads]", float, double) {
  using S = TestType;
  for (int n = 0; n < kThreadCases; ++n) {
    const unsigned seed = 0x5d0000u + static_cast<unsigned>(n);
    std::mt19937 rng(seed);
    const Index B = std::uniform_int_distribution<Index>(300, 480)(rng);
    const Index T = 40000 / B + std::uniform_int_distribution<Index>(1, 24)(rng);
    CAPTURE(seed, B, T);
    REQUIRE(pl::detail::row_grain(B, B * T) < B);  // several blocks of rows: the pools take some
    const RlData<S> d(rng, B, T);
    for (const Kind kind : kKinds) {
      const RlConfig cfg = random_config(rng, kind, kModes[std::uniform_int_distribution<int>(0, 3)(rng)]);
      rl_threads<S, std::uint8_t>(d, cfg);
      rl_threads<S, S>(d, cfg);
    }
    masked_threads<S, std::uint8_t>(d, rng);
    masked_threads<S, S>(d, rng);
  }
}

TEMPLATE_TEST_CASE("sharding: token_logprobs and ppo_clip_from_logits give the same bits on 1, 2 and 3 threads",
                   "[sharding][threads]", float, double) {
  using S = TestType;
  for (int n = 0; n < kLogitCases; ++n) {
    const unsigned seed = 0x5e0000u + static_cast<unsigned>(n);
    std::mt19937 rng(seed);
    CAPTURE(seed);
    if (n % 2 == 0) {
      logit_threads<S, std::uint8_t>(rng);
    } else {
      logit_threads<S, S>(rng);
    }
  }
}

TEST_CASE("sharding: the largest difference / bound per loss family", "[sharding]") {
  std::printf(
      "sharding: largest |sum of shard losses - unsplit loss| per loss family, over the derived bound and "
      "over the issue's target\n");
  for (const auto& [name, w] : worst())
    std::printf("  %-34s %9.3g of the bound  %9.3g of the target  (%s)\n", name.c_str(), w.bound, w.target,
                w.where.c_str());
  SUCCEED();
}
