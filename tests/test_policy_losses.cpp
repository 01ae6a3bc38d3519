// cispo, sapo, gpg: values and metrics against independent long-double loops of verl's and
// TRL's formulas, gradients against central finite differences of those loops (the detached
// CISPO weight held at its value), the fused form against forward + backward(), NaN/inf
// padding, empty rows and batches, a batch of one, packed against padded, bf16 against float,
// threads, shards with global normalizers, torch's conventions at the log-ratio clamp, and bad
// input.
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

enum class Loss { cispo, sapo, gpg };
const Loss all_losses[] = {Loss::cispo, Loss::sapo, Loss::gpg};
const pl::Aggregation all_modes[] = {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_sum,
                                     pl::Aggregation::seq_mean_token_mean, pl::Aggregation::seq_mean_token_sum_norm,
                                     pl::Aggregation::token_sum};

/// Every option of the three losses in one place; a test picks the loss.
struct Opts {
  pl::CispoOptions cispo;
  pl::SapoOptions sapo;
  pl::GpgOptions gpg;
};

Opts opts_for(pl::Aggregation a, bool trl = false) {
  Opts o;
  o.cispo.aggregation = o.sapo.aggregation = o.gpg.aggregation = a;
  o.cispo.clip_low = 0.2;
  o.cispo.clip_high = 0.28;
  if (trl) {  // TRL's cispo (upper bound epsilon_high = 1.5) and sapo: no clamp, no lower clip
    o.cispo.clip_low = 1.0;
    o.cispo.clip_high = 0.5;
    o.cispo.log_ratio_clamp = std::nullopt;
    o.sapo.log_ratio_clamp = std::nullopt;
    o.sapo.tau_pos = 0.7;
    o.sapo.tau_neg = 2.0;
  }
  if (a == pl::Aggregation::seq_mean_token_sum_norm)
    o.cispo.token_sum_norm = o.sapo.token_sum_norm = o.gpg.token_sum_norm = 40.0;
  return o;
}

template <class S, class M>
struct Case {
  Tok<S> lp, old, adv;
  Tok<M> mask;
};

/// Random inputs whose log-ratios stay >= 1e-3 away from CISPO's clip bounds (where its clip
/// fraction flips; its gradient has no kink, but the reference's weight is evaluated at the
/// perturbed point's own ratio otherwise). Masked-out entries hold NaN/inf when poison is set.
template <class S, class M>
Case<S, M> make_case(long B, long T, unsigned seed, bool poison = true, std::vector<long> empty_rows = {},
                     double p_keep = 0.75, double spread = 0.4) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> old_d(-4.0, -0.05);
  std::normal_distribution<double> ratio_d(0.0, spread), adv_d(0.0, 1.0);
  Case<S, M> c{Tok<S>(B, T), Tok<S>(B, T), Tok<S>(B, T), Tok<M>(B, T)};
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
      while (near(d, std::log(0.8)) || near(d, std::log(1.28)) || near(d, std::log(1.5)));
      const double old = old_d(rng);
      c.old(i, t) = static_cast<S>(old);
      c.lp(i, t) = static_cast<S>(old + d);
      c.adv(i, t) = static_cast<S>(adv_d(rng));
      if (m == M(0) && poison) {
        c.lp(i, t) = rlref::poison<S>(k);
        c.old(i, t) = rlref::poison<S>(k + 1);
        c.adv(i, t) = rlref::poison<S>(k + 2);
      }
    }
  return c;
}

// ---- the reference: plain loops over long double, straight from the anchors' formulas ----

/// One token's loss. lp_sg is the detached copy of logp that CISPO's weight is computed from
/// (verl: torch.clamp(ratio, ...).detach()); the finite differences move lp only.
ld token_loss(Loss which, ld lp, ld lp_sg, ld old, ld A, const Opts& o) {
  const auto ratio = [&](ld x, const std::optional<double>& clamp) {
    ld d = x - old;
    if (clamp) d = rlref::clampl(d, -static_cast<ld>(*clamp), static_cast<ld>(*clamp));
    return std::exp(d);
  };
  switch (which) {
    case Loss::cispo: {
      const ld r = ratio(lp_sg, o.cispo.log_ratio_clamp);
      const ld rc = rlref::clampl(r, 1 - static_cast<ld>(o.cispo.clip_low), 1 + static_cast<ld>(o.cispo.clip_high));
      return -rc * A * lp;
    }
    case Loss::sapo: {
      const ld r = ratio(lp, o.sapo.log_ratio_clamp);
      const ld tau = A > 0 ? o.sapo.tau_pos : o.sapo.tau_neg;
      return -(1 / (1 + std::exp(-tau * (r - 1)))) * 4 / tau * A;
    }
    case Loss::gpg:
      return -lp * A;
  }
  return 0;
}

struct Ref {
  ld loss = 0, weight = 0, clip = 0, clip_high = 0, approx_kl = 0, ratio_mean = 0, ratio_max = 0;
  std::vector<ld> rows, tokens;
};

/// x0 = logp, x1 = old_logp, x2 = advantages, x3 = the detached logp.
Ref reference(Loss which, const rlref::Data& d, const Opts& o) {
  Ref r;
  r.tokens.assign(d.x0.size(), 0);
  // The metrics' log-ratio clamp (none for GPG); +inf when off.
  const std::optional<double>& lrc = which == Loss::cispo ? o.cispo.log_ratio_clamp : o.sapo.log_ratio_clamp;
  const ld clamp = which != Loss::gpg && lrc ? static_cast<ld>(lrc.value()) : std::numeric_limits<ld>::infinity();
  ld cl = 0, ch = 0, kl = 0, rs = 0, rmax = -1;
  for (std::size_t k = 0; k < d.x0.size(); ++k) {
    if (!d.sel[k]) continue;
    r.tokens[k] = token_loss(which, d.x0[k], d.x3[k], d.x1[k], d.x2[k], o);
    ld lr = d.x0[k] - d.x1[k];
    lr = rlref::clampl(lr, -clamp, clamp);
    const ld ratio = std::exp(lr);
    const ld lo = 1 - static_cast<ld>(o.cispo.clip_low), hi = 1 + static_cast<ld>(o.cispo.clip_high);
    r.weight += d.w[k];
    cl += d.w[k] * (ratio != rlref::clampl(ratio, lo, hi) ? 1 : 0);  // verl: ratio != clipped_ratio
    ch += d.w[k] * (ratio > hi && d.x2[k] > 0 ? 1 : 0);              // TRL: coef_1 > eps_high & A > 0
    kl += d.w[k] * -lr;
    rs += d.w[k] * ratio;
    rmax = std::max(rmax, ratio);
  }
  const pl::Aggregation a = which == Loss::cispo  ? o.cispo.aggregation
                            : which == Loss::sapo ? o.sapo.aggregation
                                                  : o.gpg.aggregation;
  const double norm = 40.0;
  r.loss = rlref::aggregate(d, r.tokens, a, std::nullopt, std::nullopt,
                            a == pl::Aggregation::seq_mean_token_sum_norm ? std::optional<double>(norm) : std::nullopt,
                            &r.rows);
  if (r.weight != 0) {
    r.clip = cl / r.weight;
    r.clip_high = ch / r.weight;
    r.approx_kl = kl / r.weight;
    r.ratio_mean = rs / r.weight;
    r.ratio_max = rmax;
  }
  return r;
}

template <class S, class M>
rlref::Data data_of(const Case<S, M>& c) {
  return rlref::to_data(c.lp, c.old, c.adv, c.mask, &c.lp);
}

// ---- the three losses through one interface ----

/// The loss, its rows and the metrics of one result as doubles, and its gradient.
struct Got {
  double loss = 0, clip = 0, clip_high = 0, approx_kl = 0, ratio_mean = 0, ratio_max = 0, weight = 0;
  std::vector<double> losses;
};

template <class R>
Got got_of(const R& r) {
  Got g;
  g.loss = static_cast<double>(r.loss);
  for (long i = 0; i < r.losses.dimension(0); ++i) g.losses.push_back(static_cast<double>(r.losses(i)));
  const auto& m = r.metrics;
  using Mt = std::decay_t<decltype(m)>;
  g.weight = m.token_weight;
  g.approx_kl = static_cast<double>(m.approx_kl);
  if constexpr (!std::is_same_v<Mt, pl::GpgMetrics<typename R::Scalar>>) {
    g.ratio_mean = static_cast<double>(m.ratio_mean);
    g.ratio_max = static_cast<double>(m.ratio_max);
  }
  if constexpr (std::is_same_v<Mt, pl::CispoMetrics<typename R::Scalar>>) {
    g.clip = static_cast<double>(m.clip_fraction);
    g.clip_high = static_cast<double>(m.clip_fraction_high);
  }
  return g;
}

/// Runs `which` two-pass (gradient from backward() into g) and fused (into gf), and returns
/// both results' numbers.
template <class LP, class OLP, class AD, class MK, class G>
std::pair<Got, Got> run(Loss which, const LP& lp, const OLP& old, const AD& adv, const MK& m, const Opts& o, G& g,
                        G& gf) {
  switch (which) {
    case Loss::cispo: {
      const auto r = pl::cispo(lp, old, adv, m, o.cispo);
      r.backward(g);
      return {got_of(r), got_of(pl::cispo(lp, old, adv, m, o.cispo, gf))};
    }
    case Loss::sapo: {
      const auto r = pl::sapo(lp, old, adv, m, o.sapo);
      r.backward(g);
      return {got_of(r), got_of(pl::sapo(lp, old, adv, m, o.sapo, gf))};
    }
    default: {
      const auto r = pl::gpg(lp, old, adv, m, o.gpg);
      r.backward(g);
      return {got_of(r), got_of(pl::gpg(lp, old, adv, m, o.gpg, gf))};
    }
  }
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

void check_same(const Got& a, const Got& b) {
  CHECK(same_bits(a.loss, b.loss));
  REQUIRE(a.losses.size() == b.losses.size());
  for (std::size_t i = 0; i < a.losses.size(); ++i) CHECK(same_bits(a.losses[i], b.losses[i]));
  CHECK(same_bits(a.clip, b.clip));
  CHECK(same_bits(a.clip_high, b.clip_high));
  CHECK(same_bits(a.approx_kl, b.approx_kl));
  CHECK(same_bits(a.ratio_mean, b.ratio_mean));
  CHECK(same_bits(a.ratio_max, b.ratio_max));
  CHECK(same_bits(a.weight, b.weight));
}

template <class G>
void check_same_grad(const G& a, const G& b) {
  REQUIRE(a.size() == b.size());
  long diff = 0;
  for (long k = 0; k < a.size(); ++k) diff += same_bits(a.data()[k], b.data()[k]) ? 0 : 1;
  CHECK(diff == 0);
}

/// Loss, rows and metrics against the reference; tol relative to the aggregated |l| (so
/// cancellation in the sum does not shrink the bound), and absolute for the metrics.
void check_values(Loss which, const Got& r, const rlref::Data& d, const Opts& o, double tol) {
  const Ref e = reference(which, d, o);
  std::vector<ld> absl(e.tokens.size()), rows_abs;
  for (std::size_t k = 0; k < absl.size(); ++k) absl[k] = std::fabs(e.tokens[k]);
  const pl::Aggregation a = which == Loss::cispo  ? o.cispo.aggregation
                            : which == Loss::sapo ? o.sapo.aggregation
                                                  : o.gpg.aggregation;
  rlref::aggregate(d, absl, a, std::nullopt, std::nullopt,
                   a == pl::Aggregation::seq_mean_token_sum_norm ? std::optional<double>(40.0) : std::nullopt,
                   &rows_abs);
  ld scale = 0;
  for (ld v : rows_abs) scale += v;
  CHECK(std::fabs(static_cast<ld>(r.loss) - e.loss) <= tol * (scale + 1e-300L));
  REQUIRE(static_cast<long>(r.losses.size()) == d.B);
  for (long i = 0; i < d.B; ++i)
    CHECK(std::fabs(static_cast<ld>(r.losses[static_cast<std::size_t>(i)]) - e.rows[static_cast<std::size_t>(i)]) <=
          tol * (rows_abs[static_cast<std::size_t>(i)] + 1e-300L));
  const auto near = [&](double got, ld want, ld mag) {
    return std::fabs(static_cast<ld>(got) - want) <= tol * (mag + 1);
  };
  if (which == Loss::cispo) {
    CHECK(near(r.clip, e.clip, 1));
    CHECK(near(r.clip_high, e.clip_high, 1));
  }
  CHECK(near(r.approx_kl, e.approx_kl, 1));
  if (which != Loss::gpg) {
    CHECK(near(r.ratio_mean, e.ratio_mean, e.ratio_mean));
    CHECK(near(r.ratio_max, e.ratio_max, e.ratio_max));
  }
  CHECK(near(r.weight, e.weight, e.weight));
}

/// Max |g - central difference of the reference| relative to max |fd| (the detached copy x3
/// stays put); masked-out tokens must be exactly 0.
template <class S>
double fd_error(Loss which, rlref::Data d, const Opts& o, const Tok<S>& g) {
  const auto r = rlref::token_fd_error(d, g, [&](const rlref::Data& x) { return reference(which, x, o).loss; });
  CHECK(r.masked_zero);
  return r.rel;
}

const char* name_of(Loss w) { return w == Loss::cispo ? "cispo" : w == Loss::sapo ? "sapo" : "gpg"; }

template <class M>
void full_check(long B, long T, unsigned seed, bool trl) {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a), sizeof(M), B, T, seed, trl);
      const Opts o = opts_for(a, trl);
      const auto c = make_case<double, M>(B, T, seed);
      Tok<double> g(B, T), gf(B, T);
      g.setConstant(7);
      gf.setConstant(-7);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      check_values(which, r, data_of(c), o, 1e-13);
      CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
      check_same(r, rf);
      check_same_grad(g, gf);
    }
}

}  // namespace

TEST_CASE("cispo, sapo, gpg match verl's and TRL's formulas and finite differences in every mode", "[policy]") {
  for (const bool trl : {false, true}) {
    full_check<std::uint8_t>(5, 37, 1, trl);
    full_check<float>(4, 29, 2, trl);
    full_check<bool>(3, 16, 3, trl);
    full_check<double>(6, 9, 4, trl);
  }
  // Wide log-ratios: many CISPO weights clipped on both sides, SAPO's gate far into its tails.
  for (const Loss which : all_losses) {
    CAPTURE(name_of(which));
    const Opts o = opts_for(pl::Aggregation::token_mean);
    const auto c = make_case<double, std::uint8_t>(4, 50, 5, true, {}, 0.75, 2.0);
    Tok<double> g(4, 50), gf(4, 50);
    const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
    check_values(which, r, data_of(c), o, 1e-13);
    CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
    if (which == Loss::cispo) {
      CHECK(r.clip > 0.5);
      CHECK(r.clip_high > 0.1);
    }
  }
}

TEST_CASE("float inputs agree with the long-double reference", "[policy]") {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      const auto c = make_case<float, std::uint8_t>(5, 131, 6);
      Tok<float> g(5, 131), gf(5, 131);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      // LaneSum's float accumulation is within 4.2e-7 of sum |x|; the per-token evaluation
      // within a few ulp (6e-8 each).
      check_values(which, r, data_of(c), o, 2e-6);
      check_same(r, rf);
      check_same_grad(g, gf);
    }
}

TEMPLATE_TEST_CASE("cispo, sapo, gpg: masked-out inf/NaN never influence anything", "[policy]", float, double) {
  using S = TestType;
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      const auto poisoned = make_case<S, float>(4, 45, 7, true, {2});
      const auto clean = make_case<S, float>(4, 45, 7, false, {2});
      Tok<S> gp(4, 45), gc(4, 45), gfp(4, 45), gfc(4, 45);
      const auto [rp, rfp] = run(which, poisoned.lp, poisoned.old, poisoned.adv, poisoned.mask, o, gp, gfp);
      const auto [rc, rfc] = run(which, clean.lp, clean.old, clean.adv, clean.mask, o, gc, gfc);
      CHECK(std::isfinite(rp.loss));
      check_same(rp, rc);
      check_same(rfp, rc);
      check_same_grad(gp, gc);
      check_same_grad(gfp, gc);
      for (long i = 0; i < 4; ++i)
        for (long t = 0; t < 45; ++t)
          if (poisoned.mask(i, t) == 0.0f) CHECK(gp(i, t) == S(0));
    }
}

TEST_CASE("cispo, sapo, gpg: empty rows give 0 and count; an empty batch needs a global count", "[policy]") {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      const auto c = make_case<double, std::uint8_t>(4, 21, 11, true, {1, 3});
      Tok<double> g(4, 21), gf(4, 21);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      check_values(which, r, data_of(c), o, 1e-13);
      CHECK(r.losses[1] == 0.0);
      CHECK(r.losses[3] == 0.0);
      CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
      for (long t = 0; t < 21; ++t) CHECK((g(1, t) == 0.0 && g(3, t) == 0.0));
    }
  // No valid token at all: every output is 0, nothing is NaN, the gradient is overwritten.
  const auto c = make_case<float, std::uint8_t>(3, 10, 12, true, {0, 1, 2});
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<float> g(3, 10), gf(3, 10);
      g.setConstant(5.f);
      gf.setConstant(5.f);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      for (const Got* x : {&r, &rf}) {
        CHECK(x->loss == 0.0);
        CHECK(x->clip == 0.0);
        CHECK(x->clip_high == 0.0);
        CHECK(x->approx_kl == 0.0);
        CHECK(x->ratio_mean == 0.0);
        CHECK(x->ratio_max == 0.0);
        CHECK(x->weight == 0.0);
      }
      for (long i = 0; i < 3; ++i)
        for (long t = 0; t < 10; ++t) CHECK((g(i, t) == 0.f && gf(i, t) == 0.f));
    }
  // A [0, T] batch: a shape error naming logp as for ppo_clip, unless the global count is given.
  Tok<float> e0(0, 5), g0(0, 5);
  Tok<std::uint8_t> m0(0, 5);
  expect_throw<pl::shape_error>([&] { pl::cispo(e0, e0, e0, m0); }, "cispo", {"'logp'", "token_count"});
  expect_throw<pl::shape_error>([&] { pl::sapo(e0, e0, e0, m0); }, "sapo", {"'logp'", "sequence_count"});
  expect_throw<pl::shape_error>([&] { pl::gpg(e0, e0, e0, m0, pl::GpgOptions{}, g0); }, "gpg", {"'logp'"});
  pl::CispoOptions co;
  co.token_count = 100.0;
  pl::SapoOptions so;
  so.sequence_count = 8.0;
  pl::GpgOptions go;
  go.token_count = 100.0;
  CHECK(pl::cispo(e0, e0, e0, m0, co, g0).loss == 0.f);
  CHECK(pl::sapo(e0, e0, e0, m0, so, g0).loss == 0.f);
  CHECK(pl::gpg(e0, e0, e0, m0, go, g0).loss == 0.f);
}

TEST_CASE("cispo, sapo, gpg: a batch of one and a single token", "[policy]") {
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      for (const long T : {1L, 13L}) {
        const auto c = make_case<double, std::uint8_t>(1, T, 21, false, {}, 1.0);
        Tok<double> g(1, T), gf(1, T);
        const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
        check_values(which, r, data_of(c), o, 1e-13);
        CHECK(fd_error(which, data_of(c), o, g) <= 1e-9);
        check_same(r, rf);
        check_same_grad(g, gf);
      }
    }
}

TEST_CASE("cispo, sapo, gpg: packed input equals the padded batch, bit for bit", "[policy][packed]") {
  const std::vector<long> len = {17, 0, 1, 64, 3, 33, 0, 129, 8};
  const long B = static_cast<long>(len.size()), T = 135;
  auto c = make_case<float, std::uint8_t>(B, T, 31);
  for (long i = 0; i < B; ++i)  // tokens past a row's length are padding
    for (long t = len[static_cast<std::size_t>(i)]; t < T; ++t) {
      c.mask(i, t) = 0;
      c.lp(i, t) = c.old(i, t) = c.adv(i, t) = std::numeric_limits<float>::quiet_NaN();
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
      lp(k) = c.lp(i, t);
      old(k) = c.old(i, t);
      adv(k) = c.adv(i, t);
      m(k) = c.mask(i, t);
    }
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);  // seq_mean_token_sum_norm: token_sum_norm = 40 on both sides
      Tok<float> g(B, T), gf(B, T);
      Flat<float> pg(N), pgf(N);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      const auto [p, pf] =
          run(which, pl::packed(lp, cu), pl::packed(old, cu), pl::packed(adv, cu), pl::packed(m, cu), o, pg, pgf);
      check_same(p, r);
      check_same(pf, r);
      long diff = 0;
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < len[static_cast<std::size_t>(i)]; ++t) {
          diff += same_bits(pg(cu(i) + t), g(i, t)) ? 0 : 1;
          diff += same_bits(pgf(cu(i) + t), g(i, t)) ? 0 : 1;
        }
      CHECK(diff == 0);
    }
}

TEMPLATE_TEST_CASE("cispo, sapo, gpg: bf16 and half inputs compute in float", "[policy][lowp]", Eigen::bfloat16,
                   Eigen::half) {
  using BF = TestType;
  // The gradient's one rounding: half an ulp, 2^-8 relative for bf16 (8 significand bits),
  // 2^-11 for half, plus half's subnormal half-spacing 2^-25 (its gradients here reach 1e-6).
  constexpr bool bf = std::is_same_v<BF, Eigen::bfloat16>;
  const double rel = std::ldexp(1.0, bf ? -8 : -11), abs_tol = bf ? 0.0 : std::ldexp(1.0, -25);
  const long B = 4, T = 77;
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      const auto c = make_case<float, std::uint8_t>(B, T, 41);
      // 16-bit log-probs, float old_logp and advantages (a mixed call); the float call sees the
      // same values, converted exactly.
      Tok<BF> lp16 = c.lp.cast<BF>();
      Tok<float> lpf = lp16.template cast<float>();
      Tok<BF> g16(B, T), gf16(B, T);
      Tok<float> g(B, T), gf(B, T);
      const auto [r16, rf16] = run(which, lp16, c.old, c.adv, c.mask, o, g16, gf16);
      const auto [r, rf] = run(which, lpf, c.old, c.adv, c.mask, o, g, gf);
      check_same(r16, rf16);
      check_same_grad(g16, gf16);
      // The same float kernel on the same float values: the loss and metrics differ at most by
      // the float accumulation (LaneSum: 4.2e-7 of sum |x|, on each side), the gradient by its
      // one rounding to the 16-bit type (rel, abs_tol above).
      double mag = 0;
      for (const double v : r.losses) mag += std::fabs(v);
      CHECK(std::fabs(r16.loss - r.loss) <= 8.4e-7 * mag + 1e-30);
      for (std::size_t i = 0; i < r.losses.size(); ++i)
        CHECK(std::fabs(r16.losses[i] - r.losses[i]) <= 8.4e-7 * std::fabs(r.losses[i]) + 1e-30);
      CHECK(std::fabs(r16.approx_kl - r.approx_kl) <= 1e-6);
      CHECK(std::fabs(r16.ratio_mean - r.ratio_mean) <= 1e-6 * r.ratio_mean);
      CHECK(r16.ratio_max == r.ratio_max);
      CHECK(r16.clip == r.clip);
      CHECK(r16.clip_high == r.clip_high);
      CHECK(r16.weight == r.weight);
      long worse = 0;
      for (long i = 0; i < B; ++i)
        for (long t = 0; t < T; ++t)
          if (std::fabs(static_cast<double>(static_cast<float>(g16(i, t))) - g(i, t)) >
              rel * std::fabs(g(i, t)) + abs_tol)
            ++worse;
      CHECK(worse == 0);
    }
}

TEST_CASE("cispo, sapo, gpg: threads give the same bits", "[policy][threads]") {
  pl::ThreadPool two{2}, three{3};
  const long B = 37, T = 1100;  // several row blocks of ~32K tokens
  const auto c = make_case<float, float>(B, T, 51);
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts base = opts_for(a);
      Tok<float> g(B, T), gf(B, T);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, base, g, gf);
      for (pl::ThreadPool* pool : {&two, &three}) {
        Opts o = base;
        o.cispo.threads = o.sapo.threads = o.gpg.threads = *pool;
        Tok<float> gt(B, T), gft(B, T);
        const auto [rt, rft] = run(which, c.lp, c.old, c.adv, c.mask, o, gt, gft);
        check_same(rt, r);
        check_same(rft, r);
        check_same_grad(gt, g);
        check_same_grad(gft, g);
      }
    }
}

TEST_CASE("cispo and sapo follow torch autograd at the log-ratio clamp and the clip bounds", "[policy]") {
  // Four tokens, token_mean over 4: log-ratios 20 (on the clamp: torch.clamp passes), 21 (beyond
  // it), -21 and 0.25; all exact in double.
  Tok<double> lp(1, 4), old(1, 4), adv(1, 4), g(1, 4);
  Tok<std::uint8_t> m(1, 4);
  m.setConstant(1);
  const double d[] = {20.0, 21.0, -21.0, 0.25};
  for (long t = 0; t < 4; ++t) {
    old(0, t) = -30.0;
    lp(0, t) = -30.0 + d[t];
    adv(0, t) = t % 2 ? -1.5 : 0.5;
  }
  const auto sapo_grad = [&](double dc, double A) {  // -4 s (1 - s) r A / 4 tokens
    const double tau = A > 0 ? 1.0 : 1.05, r = std::exp(dc), s = 1 / (1 + std::exp(-tau * (r - 1)));
    return -s * (1 - s) * r * A;
  };
  pl::SapoOptions so;
  so.aggregation = pl::Aggregation::token_mean;
  so.log_ratio_clamp = 0.25;  // token 3 sits on it, the others beyond
  pl::sapo(lp, old, adv, m, so).backward(g);
  CHECK(g(0, 0) == 0.0);
  CHECK(g(0, 1) == 0.0);
  CHECK(g(0, 2) == 0.0);
  CHECK(g(0, 3) == Approx(sapo_grad(0.25, -1.5)).epsilon(1e-14));
  CHECK(g(0, 3) != 0.0);
  so.log_ratio_clamp = 20.0;  // verl's: -21 is beyond it, 20 on it (where s (1 - s) r underflows to 0)
  pl::sapo(lp, old, adv, m, so).backward(g);
  CHECK(g(0, 0) == 0.0);
  CHECK(g(0, 2) == 0.0);
  CHECK(g(0, 3) == Approx(sapo_grad(0.25, -1.5)).epsilon(1e-14));
  so.log_ratio_clamp = 30.0;
  pl::sapo(lp, old, adv, m, so).backward(g);
  CHECK(g(0, 2) == Approx(sapo_grad(-21.0, 0.5)).epsilon(1e-12));
  CHECK(g(0, 2) != 0.0);

  // CISPO: the weight is detached, so no clamp or clip gates the gradient: -clip(r) A / 4.
  pl::CispoOptions co;
  co.clip_low = 0.2;
  co.clip_high = 0.28;
  pl::cispo(lp, old, adv, m, co).backward(g);
  CHECK(g(0, 0) == Approx(-1.28 * 0.5 / 4).epsilon(1e-15));
  CHECK(g(0, 1) == Approx(-1.28 * -1.5 / 4).epsilon(1e-15));
  CHECK(g(0, 2) == Approx(-0.8 * 0.5 / 4).epsilon(1e-15));
  CHECK(g(0, 3) == Approx(-1.28 * -1.5 / 4).epsilon(1e-15));  // e^0.25 = 1.284 > 1.28
  // A ratio exactly on a bound is not clipped (verl: ratio != clipped_ratio): r = 1 = lo = hi.
  Tok<double> same_lp(1, 4);
  same_lp.setConstant(-1.0);
  co.clip_low = 0.0;
  co.clip_high = 0.0;
  const auto r1 = pl::cispo(same_lp, same_lp, adv, m, co);
  CHECK(r1.metrics.clip_fraction == 0.0);
  CHECK(r1.metrics.ratio_mean == 1.0);
  CHECK(r1.loss == Approx(-(0.5 - 1.5 + 0.5 - 1.5) * -1.0 / 4).epsilon(1e-15));
}

TEST_CASE("cispo, sapo, gpg reject bad input and write nothing", "[policy]") {
  const auto c = make_case<float, std::uint8_t>(2, 5, 61, false);
  Tok<float> g(2, 5), wrong(2, 6), g_wrong(3, 5);
  wrong.setZero();
  Tok<std::uint8_t> wrong_m(1, 5);
  wrong_m.setConstant(1);
  Tok<float> bad_w(2, 5);
  bad_w.setConstant(1.f);
  bad_w(1, 2) = -0.5f;
  g.setConstant(-42.f);
  const auto untouched = [&] {
    for (long i = 0; i < 2; ++i)
      for (long t = 0; t < 5; ++t) CHECK(g(i, t) == -42.f);
  };
  for (const Loss which : all_losses) {
    const std::string fn = name_of(which);
    CAPTURE(fn);
    const Opts o;
    const auto shape = [&](auto&& f, const char* name) {
      expect_throw<pl::shape_error>(f, fn, {std::string("'") + name + "'"});
      untouched();
    };
    Tok<float> gx(2, 5);
    shape([&] { run(which, wrong, c.old, c.adv, c.mask, o, g, g); }, "old_logp");
    shape([&] { run(which, c.lp, wrong, c.adv, c.mask, o, g, g); }, "old_logp");
    shape([&] { run(which, c.lp, c.old, wrong, c.mask, o, g, g); }, "advantages");
    shape([&] { run(which, c.lp, c.old, c.adv, wrong_m, o, g, g); }, "mask");
    shape([&] { run(which, c.lp, c.old, c.adv, c.mask, o, g_wrong, g_wrong); }, "grad");
    // The fused form checks grad_out before computing anything.
    switch (which) {
      case Loss::cispo:
        shape([&] { pl::cispo(c.lp, c.old, c.adv, c.mask, o.cispo, g_wrong); }, "grad_out");
        break;
      case Loss::sapo:
        shape([&] { pl::sapo(c.lp, c.old, c.adv, c.mask, o.sapo, g_wrong); }, "grad_out");
        break;
      case Loss::gpg:
        shape([&] { pl::gpg(c.lp, c.old, c.adv, c.mask, o.gpg, g_wrong); }, "grad_out");
        break;
    }
    expect_throw<pl::value_error>([&] { run(which, c.lp, c.old, c.adv, bad_w, o, g, g); }, fn, {"'mask'"});
    untouched();
    // Shared aggregation options.
    const auto option = [&](const Opts& bad, const char* name, const char* value) {
      expect_throw<pl::option_error>([&] { run(which, c.lp, c.old, c.adv, c.mask, bad, g, g); }, fn,
                                     {std::string("'") + name + "'", value});
      untouched();
    };
    Opts b;
    b.cispo.aggregation = b.sapo.aggregation = b.gpg.aggregation = static_cast<pl::Aggregation>(42);
    option(b, "aggregation", "42");
    b = {};
    b.cispo.token_count = b.sapo.token_count = b.gpg.token_count = 0.0;
    b.cispo.aggregation = b.sapo.aggregation = b.gpg.aggregation = pl::Aggregation::token_mean;
    option(b, "token_count", "got 0");
    b = {};
    b.cispo.sequence_count = b.sapo.sequence_count = b.gpg.sequence_count = -2.0;
    option(b, "sequence_count", "got -2");
    b = {};
    b.cispo.aggregation = b.sapo.aggregation = b.gpg.aggregation = pl::Aggregation::seq_mean_token_sum_norm;
    b.cispo.token_sum_norm = b.sapo.token_sum_norm = b.gpg.token_sum_norm = 0.0;
    option(b, "token_sum_norm", "got 0");
  }
  // Each loss's own options.
  const auto cispo_bad = [&](pl::CispoOptions bad, const char* name, const char* value) {
    expect_throw<pl::option_error>([&] { pl::cispo(c.lp, c.old, c.adv, c.mask, bad, g); }, "cispo",
                                   {std::string("'") + name + "'", value});
    untouched();
  };
  pl::CispoOptions cb;
  cb.clip_low = -0.1;
  cispo_bad(cb, "clip_low", "got -0.1");
  cb = {};
  cb.clip_low = 1.5;
  cispo_bad(cb, "clip_low", "got 1.5");
  cb = {};
  cb.clip_high = -1e-9;
  cispo_bad(cb, "clip_high", "got -1e-09");
  cb = {};
  cb.clip_high = std::numeric_limits<double>::infinity();
  cispo_bad(cb, "clip_high", "got inf");
  cb = {};
  cb.log_ratio_clamp = 0.0;
  cispo_bad(cb, "log_ratio_clamp", "got 0");
  cb = {};
  cb.log_ratio_clamp = 1e-50;  // positive in double, 0 in float
  cispo_bad(cb, "log_ratio_clamp", "got 1e-50");
  const auto sapo_bad = [&](pl::SapoOptions bad, const char* name, const char* value) {
    expect_throw<pl::option_error>([&] { pl::sapo(c.lp, c.old, c.adv, c.mask, bad, g); }, "sapo",
                                   {std::string("'") + name + "'", value});
    untouched();
  };
  pl::SapoOptions sb;
  sb.tau_pos = 0.0;
  sapo_bad(sb, "tau_pos", "got 0");
  sb = {};
  sb.tau_neg = -1.0;
  sapo_bad(sb, "tau_neg", "got -1");
  sb = {};
  sb.tau_neg = std::numeric_limits<double>::quiet_NaN();
  sapo_bad(sb, "tau_neg", "got nan");
  sb = {};
  sb.tau_pos = 1e-39;  // a float subnormal: 4 / tau overflows
  sapo_bad(sb, "tau_pos", "got 1e-39");
  sb = {};
  sb.log_ratio_clamp = -3.0;
  sapo_bad(sb, "log_ratio_clamp", "got -3");
}

namespace {

/// Rows [b, e) of x.
template <class T>
Tok<T> rows_of(const Tok<T>& x, long b, long e) {
  const Eigen::array<Eigen::Index, 2> off = {b, 0}, ext = {e - b, x.dimension(1)};
  return x.slice(off, ext);
}

/// One shard's call with the global normalizers; the gradient rows go to g's rows [b, e).
template <class S, class M>
auto shard_call(Loss which, const Case<S, M>& c, long b, long e, Opts o, Tok<S>& g) {
  const Tok<S> lp = rows_of(c.lp, b, e), old = rows_of(c.old, b, e), adv = rows_of(c.adv, b, e);
  const Tok<M> m = rows_of(c.mask, b, e);
  Tok<S> gs(e - b, c.lp.dimension(1));
  std::array<double, 6> sums{};  // loss, then the metric sums in Entries order
  std::array<double, 1> maxima{-std::numeric_limits<double>::infinity()};
  const auto take = [&](const auto& r) {
    sums[0] = static_cast<double>(r.loss);
    for (std::size_t k = 0; k < r.metric_sums.n_sums; ++k) sums[k + 1] = r.metric_sums.sums[k];
    if constexpr (std::decay_t<decltype(r.metric_sums)>::n_maxima > 0) maxima[0] = r.metric_sums.maxima[0];
  };
  switch (which) {
    case Loss::cispo:
      take(pl::cispo(lp, old, adv, m, o.cispo, gs));
      break;
    case Loss::sapo:
      take(pl::sapo(lp, old, adv, m, o.sapo, gs));
      break;
    case Loss::gpg:
      take(pl::gpg(lp, old, adv, m, o.gpg, gs));
      break;
  }
  for (long i = b; i < e; ++i)
    for (long t = 0; t < c.lp.dimension(1); ++t) g(i, t) = gs(i - b, t);
  return std::make_pair(sums, maxima);
}

}  // namespace

TEST_CASE("cispo, sapo, gpg: shards with global normalizers and merged metric sums give the whole batch",
          "[policy][sharding]") {
  const long B = 6, T = 29;
  const auto c = make_case<double, std::uint8_t>(B, T, 71, true, {3});
  double total_w = 0;
  for (long k = 0; k < c.mask.size(); ++k) total_w += c.mask.data()[k];
  for (const Loss which : all_losses)
    for (const auto a : all_modes) {
      CAPTURE(name_of(which), static_cast<int>(a));
      const Opts o = opts_for(a);
      Tok<double> g(B, T), gf(B, T), gs(B, T);
      const auto [r, rf] = run(which, c.lp, c.old, c.adv, c.mask, o, g, gf);
      Opts og = o;
      og.cispo.token_count = og.sapo.token_count = og.gpg.token_count = total_w;
      og.cispo.sequence_count = og.sapo.sequence_count = og.gpg.sequence_count = static_cast<double>(B);
      std::array<double, 6> sums{};
      double mx = -std::numeric_limits<double>::infinity();
      for (const auto& [b, e] : {std::pair<long, long>{0, 2}, {2, 2}, {2, 6}}) {  // with an empty shard
        const auto [s, m] = shard_call(which, c, b, e, og, gs);
        for (std::size_t k = 0; k < sums.size(); ++k) sums[k] += s[k];
        mx = std::max(mx, m[0]);
      }
      double mag = 0;
      for (const double v : r.losses) mag += std::fabs(v);
      CHECK(std::fabs(sums[0] - r.loss) <= 1e-15 * mag);
      CHECK(sums[1] == r.weight);  // an exact count for a byte mask
      CHECK(std::fabs(sums[2 + 0] / sums[1] - (which == Loss::cispo ? r.clip : r.approx_kl)) <= 1e-15);
      if (which != Loss::gpg) CHECK(mx == r.ratio_max);
      for (long k = 0; k < g.size(); ++k)
        CHECK(std::fabs(gs.data()[k] - g.data()[k]) <= 1e-15 * std::fabs(g.data()[k]));
    }
}
