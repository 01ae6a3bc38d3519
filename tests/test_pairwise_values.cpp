// Values, per-example losses, metrics and token gradients of the pairwise family against the
// closed forms of the loss headers' Doxygen evaluated in long double (pairwise_reference.hpp), in float and
// double; masked_sum and masked_mean inputs with byte and weight masks; batch of 1, one token.
//
// The token data are dyadic (multiples of 1/64, weights multiples of 1/4), so every masked sum
// is exact in float and double: the tolerances below measure the loss arithmetic alone.
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include "pairwise_reference.hpp"

namespace {

using namespace pref;

/// Runs check_pair over {byte, weight mask} x {sum, mean}, plain tensors, a batch of 1 and a
/// single token. Token ranges: [lo, hi] for means and plain values, [lo, hi] * sum_scale for sums.
template <class S, class F, class RefF, class MetricsF>
void check_pair_all(F&& f, RefF&& ref, MetricsF&& metrics, double lo, double hi, double sum_scale, unsigned seed) {
  std::mt19937 rng(seed);
  constexpr long B = 5, T = 13;
  SECTION("byte mask, masked_sum") {
    check_pair<false>(f, ref, metrics, dyadic_tokens<S>(B, T, rng, lo * sum_scale, hi * sum_scale),
                      dyadic_mask<std::uint8_t>(B, T, rng), dyadic_tokens<S>(B, T, rng, lo * sum_scale, hi * sum_scale),
                      dyadic_mask<std::uint8_t>(B, T, rng));
  }
  SECTION("byte mask, masked_mean") {
    check_pair<true>(f, ref, metrics, dyadic_tokens<S>(B, T, rng, lo, hi), dyadic_mask<std::uint8_t>(B, T, rng),
                     dyadic_tokens<S>(B, T, rng, lo, hi), dyadic_mask<std::uint8_t>(B, T, rng));
  }
  SECTION("weight mask, masked_sum") {
    check_pair<false>(f, ref, metrics, dyadic_tokens<S>(B, T, rng, lo * sum_scale, hi * sum_scale),
                      dyadic_mask<S>(B, T, rng), dyadic_tokens<S>(B, T, rng, lo * sum_scale, hi * sum_scale),
                      dyadic_mask<S>(B, T, rng));
  }
  SECTION("weight mask, masked_mean") {
    check_pair<true>(f, ref, metrics, dyadic_tokens<S>(B, T, rng, lo, hi), dyadic_mask<S>(B, T, rng),
                     dyadic_tokens<S>(B, T, rng, lo, hi), dyadic_mask<S>(B, T, rng));
  }
  SECTION("plain [batch] tensors") {
    check_pair_plain(f, ref, metrics, dyadic_vec<S>(B, rng, lo, hi), dyadic_vec<S>(B, rng, lo, hi));
  }
  SECTION("batch of 1") {
    check_pair<true>(f, ref, metrics, dyadic_tokens<S>(1, T, rng, lo, hi), dyadic_mask<std::uint8_t>(1, T, rng),
                     dyadic_tokens<S>(1, T, rng, lo, hi), dyadic_mask<std::uint8_t>(1, T, rng));
  }
  SECTION("a single token") {
    Tok<std::uint8_t> one(1, 1);
    one.setConstant(1);
    check_pair<false>(f, ref, metrics, dyadic_tokens<S>(1, 1, rng, lo, hi), one, dyadic_tokens<S>(1, 1, rng, lo, hi),
                      one);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("dpo matches its closed forms", "[pairwise][dpo][values]", float, double) {
  using S = TestType;
  std::mt19937 rng(21);
  const Vec<S> rc = dyadic_vec<S>(5, rng, -20, 0), rr = dyadic_vec<S>(5, rng, -20, 0);
  const Vec<S> rc1 = dyadic_vec<S>(1, rng, -2, 0), rr1 = dyadic_vec<S>(1, rng, -2, 0);
  struct Case {
    pl::DpoVariant v;
    Dpo ref;
    double beta, e;
    bool free;
  };
  const Case cases[] = {
      {pl::DpoVariant::sigmoid, Dpo::sigmoid, 0.1, 0.0, false},
      {pl::DpoVariant::sigmoid, Dpo::sigmoid, 0.25, 0.2, false},
      {pl::DpoVariant::robust, Dpo::robust, 0.1, 0.3, false},
      {pl::DpoVariant::hinge, Dpo::hinge, 0.3, 0.0, false},
      {pl::DpoVariant::sigmoid, Dpo::sigmoid, 0.1, 0.1, true},
  };
  for (const Case& k : cases) {
    DYNAMIC_SECTION("variant " << static_cast<int>(k.v) << " beta " << k.beta << " e " << k.e << " free " << k.free) {
      pl::DpoOptions opt;
      opt.beta = k.beta;
      opt.label_smoothing = k.e;
      opt.variant = k.v;
      opt.reference_free = k.free;
      const ld b = opt.beta, e = opt.label_smoothing;
      // Batch-of-1 sections use their own reference pair; pick by batch size.
      const auto rho = [&](long B, long i, bool chosen) -> ld {
        if (k.free) return 0;
        return B == 1 ? (chosen ? rc1(0) : rr1(0)) : (chosen ? rc(i) : rr(i));
      };
      long batch = 5;
      const auto f = [&](const auto& c, const auto& r) {
        batch = pl::as_sequence(c).size();
        return batch == 1 ? pl::dpo(c, r, rc1, rr1, opt) : pl::dpo(c, r, rc, rr, opt);
      };
      const auto ref = [&](long i, ld sc, ld sr) {
        return ref_dpo(k.ref, (sc - rho(batch, i, true)) - (sr - rho(batch, i, false)), b, e);
      };
      const auto metrics = [&](const auto& m, const Seqs& s) {
        std::vector<ld> wc, wr;
        for (std::size_t i = 0; i < s.c.size(); ++i) {
          wc.push_back(b * (s.c[i] - rho(batch, static_cast<long>(i), true)));
          wr.push_back(b * (s.r[i] - rho(batch, static_cast<long>(i), false)));
        }
        check_rewards(m, wc, wr);
      };
      check_pair_all<S>(f, ref, metrics, -4, 0, 0.5, 31);
    }
  }
}

TEMPLATE_TEST_CASE("ipo matches its closed form", "[pairwise][ipo][values]", float, double) {
  using S = TestType;
  std::mt19937 rng(22);
  const Vec<S> rc = dyadic_vec<S>(5, rng, -20, 0), rr = dyadic_vec<S>(5, rng, -20, 0);
  for (const bool free : {false, true}) {
    DYNAMIC_SECTION("reference_free " << free) {
      pl::IpoOptions opt;
      opt.beta = 0.1;
      opt.reference_free = free;
      const ld b = opt.beta;
      Vec<S> zero(1);
      zero.setZero();
      long batch = 5;
      const auto rho = [&](long i, bool chosen) -> ld {
        return free || batch == 1 ? 0 : static_cast<ld>(chosen ? rc(i) : rr(i));
      };
      const auto f = [&](const auto& c, const auto& r) {
        batch = pl::as_sequence(c).size();
        return batch == 1 ? pl::ipo(c, r, zero, zero, opt) : pl::ipo(c, r, rc, rr, opt);
      };
      const auto ref = [&](long i, ld sc, ld sr) { return ref_ipo((sc - rho(i, true)) - (sr - rho(i, false)), b); };
      const auto metrics = [&](const auto& m, const Seqs& s) {
        std::vector<ld> wc, wr;
        for (std::size_t i = 0; i < s.c.size(); ++i) {
          wc.push_back(b * (s.c[i] - rho(static_cast<long>(i), true)));
          wr.push_back(b * (s.r[i] - rho(static_cast<long>(i), false)));
        }
        check_rewards(m, wc, wr);
      };
      check_pair_all<S>(f, ref, metrics, -4, 0, 0.5, 32);
    }
  }
}

TEMPLATE_TEST_CASE("simpo matches its closed form", "[pairwise][simpo][values]", float, double) {
  using S = TestType;
  for (const double e : {0.0, 0.2}) {
    DYNAMIC_SECTION("label_smoothing " << e) {
      pl::SimpoOptions opt;
      opt.label_smoothing = e;
      const ld b = opt.beta, g = opt.gamma;
      const auto f = [&](const auto& c, const auto& r) { return pl::simpo(c, r, opt); };
      const auto ref = [&](long, ld sc, ld sr) { return ref_simpo(sc, sr, b, g, e); };
      const auto metrics = [&](const auto& m, const Seqs& s) {
        std::vector<ld> wc, wr;
        for (std::size_t i = 0; i < s.c.size(); ++i) {
          wc.push_back(b * s.c[i]);
          wr.push_back(b * s.r[i]);
        }
        check_rewards(m, wc, wr);
      };
      check_pair_all<S>(f, ref, metrics, -3, 0, 0.25, 33);
    }
  }
}

TEMPLATE_TEST_CASE("orpo matches its closed form", "[pairwise][orpo][values]", float, double) {
  using S = TestType;
  for (const double w : {1.0, 0.0}) {
    DYNAMIC_SECTION("nll_weight " << w) {
      pl::OrpoOptions opt;
      opt.beta = 0.2;
      opt.nll_weight = w;
      const ld b = opt.beta;
      const auto f = [&](const auto& c, const auto& r) { return pl::orpo(c, r, opt); };
      const auto ref = [&](long, ld sc, ld sr) { return ref_orpo(sc, sr, b, w); };
      const auto metrics = [&](const auto& m, const Seqs& s) {
        std::vector<ld> wc, wr;
        ld ratio = 0, odds = 0, nll = 0, odds_abs = 0;
        for (std::size_t i = 0; i < s.c.size(); ++i) {
          wc.push_back(b * s.c[i]);
          wr.push_back(b * s.r[i]);
          const ld L = ref_orpo_log_odds(s.c[i], s.r[i]);
          ratio += logsig(L);
          odds += L;
          odds_abs += std::fabs(L);
          nll -= s.c[i];
        }
        check_rewards(m, wc, wr);
        const ld n = static_cast<ld>(s.c.size());
        CHECK_CLOSE(m.log_odds_ratio, ratio / n);
        CHECK_CLOSE(m.log_odds_chosen, odds / n, odds_abs / n);
        CHECK_CLOSE(m.nll_loss, nll / n);
      };
      // Log-probs <= -1/64: every value is inside log1mexp's domain, away from its pole at 0.
      check_pair_all<S>(f, ref, metrics, -3, -1.0 / 64, 1, 34);
    }
  }
}

TEMPLATE_TEST_CASE("bradley_terry matches its closed form", "[pairwise][bt][values]", float, double) {
  using S = TestType;
  std::mt19937 rng(23);
  const Vec<S> margin = dyadic_vec<S>(5, rng, 0, 2), margin1 = dyadic_vec<S>(1, rng, 0, 2);
  for (const double k : {0.0, 0.125}) {
    for (const bool with_margin : {false, true}) {
      DYNAMIC_SECTION("center_coef " << k << " margin " << with_margin) {
        pl::BradleyTerryOptions opt;
        opt.center_coef = k;
        long batch = 5;
        const auto m = [&](long i) -> ld {
          return with_margin ? static_cast<ld>(batch == 1 ? margin1(0) : margin(i)) : 0;
        };
        const auto f = [&](const auto& c, const auto& r) {
          batch = pl::as_sequence(c).size();
          const Vec<S>& mm = batch == 1 ? margin1 : margin;
          return with_margin ? pl::bradley_terry(c, r, mm, opt) : pl::bradley_terry(c, r, opt);
        };
        const auto ref = [&](long i, ld rc, ld rr) { return ref_bt(rc, rr, m(i), k); };
        const auto metrics = [&](const auto& mt, const Seqs& s) { check_rewards(mt, s.c, s.r); };
        check_pair_all<S>(f, ref, metrics, -3, 3, 0.5, 35);
      }
    }
  }
}

TEMPLATE_TEST_CASE("nll matches its closed form", "[pairwise][nll][values]", float, double) {
  using S = TestType;
  std::mt19937 rng(24);
  constexpr long B = 4, T = 11;
  const Tok<S> x = dyadic_tokens<S>(B, T, rng, -5, 0);
  const Tok<S> w = dyadic_mask<S>(B, T, rng, 2);  // row 2 empty: its mean is 0
  const Tok<std::uint8_t> m = dyadic_mask<std::uint8_t>(B, T, rng);
  const auto check = [&](const auto& expr, const auto& mask, bool mean, std::optional<double> norm) {
    pl::NllOptions opt;
    opt.normalizer = norm;
    const auto res = pl::nll(expr, opt);
    ld total = 0, sum_s = 0;
    for (long i = 0; i < B; ++i) {
      const ld s = ref_seq(x, mask, i, mean);
      CHECK_CLOSE(res.losses(i), -s);
      total += -s;
      sum_s += s;
    }
    const ld N = norm ? static_cast<ld>(*norm) : B;
    CHECK_CLOSE(res.loss, total / N);
    CHECK_CLOSE(res.metrics.mean_logp, sum_s / B);
    Tok<S> g(B, T);
    res.backward(g);
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T; ++t) CHECK_CLOSE(g(i, t), -ref_dseq(mask, i, t, mean) / N);
  };
  for (const auto norm : {std::optional<double>{}, std::optional<double>{37.0}}) {
    check(pl::masked_sum(x, m), m, false, norm);
    check(pl::masked_mean(x, m), m, true, norm);
    check(pl::masked_sum(x, w), w, false, norm);
    check(pl::masked_mean(x, w), w, true, norm);
  }
  SECTION("plain tensor, batch of 1") {
    Vec<S> v(1), g(1);
    v(0) = S(-2.5);
    const auto res = pl::nll(v);
    res.backward(g);
    CHECK(res.loss == S(2.5));
    CHECK(g(0) == S(-1));
  }
}

TEMPLATE_TEST_CASE("bradley_terry_ranking matches InstructGPT's closed form", "[pairwise][ranking][values]", float,
                   double) {
  using S = TestType;
  std::mt19937 rng(25);
  for (const long K : {2L, 4L, 7L}) {
    for (const double k : {0.0, 0.125}) {
      constexpr long B = 3;
      Tok<S> x = dyadic_tokens<S>(B, K, rng, -3, 3);
      x(1, 1) = x(1, 0);  // a tie: counts as a wrongly ordered pair
      pl::BradleyTerryOptions opt;
      opt.center_coef = k;
      const auto res = pl::bradley_terry_ranking(x, opt);
      Tok<S> g(B, K);
      g.setConstant(S(99));
      res.backward(g);
      const ld pairs = static_cast<ld>(K * (K - 1) / 2);
      ld total = 0, correct = 0, margin = 0, margin_abs = 0, sum = 0, sum_abs = 0;
      for (long i = 0; i < B; ++i) {
        ld row = 0;
        // d accumulates terms of both signs: compare relative to the sum of their magnitudes.
        std::vector<ld> d(static_cast<std::size_t>(K), 0), d_abs(static_cast<std::size_t>(K), 0);
        for (long a = 0; a < K; ++a) {
          sum += x(i, a);
          sum_abs += std::fabs(static_cast<ld>(x(i, a)));
          for (long c = a + 1; c < K; ++c) {
            const Ref e = ref_bt(x(i, a), x(i, c), 0, k);
            row += e.loss;
            d[static_cast<std::size_t>(a)] += e.dc;
            d[static_cast<std::size_t>(c)] += e.dr;
            d_abs[static_cast<std::size_t>(a)] += std::fabs(e.dc);
            d_abs[static_cast<std::size_t>(c)] += std::fabs(e.dr);
            correct += x(i, a) > x(i, c) ? 1 : 0;
            margin += static_cast<ld>(x(i, a)) - x(i, c);
            margin_abs += std::fabs(static_cast<ld>(x(i, a))) + std::fabs(static_cast<ld>(x(i, c)));
          }
        }
        CHECK_CLOSE(res.losses(i), row / pairs);
        total += row / pairs;
        for (long a = 0; a < K; ++a) {
          const std::size_t u = static_cast<std::size_t>(a);
          CHECK_CLOSE(g(i, a), d[u] / pairs / B, d_abs[u] / pairs / B);
        }
      }
      CHECK_CLOSE(res.loss, total / B);
      CHECK_CLOSE(res.metrics.accuracy, correct / (pairs * B));
      CHECK(res.metrics.accuracy < S(1));
      CHECK_CLOSE(res.metrics.reward_margin, margin / (pairs * B), margin_abs / (pairs * B));
      CHECK_CLOSE(res.metrics.reward_mean, sum / static_cast<ld>(B * K), sum_abs / static_cast<ld>(B * K));
    }
  }
  SECTION("TensorMap in and out: -(logsig(1) + logsig(2) + logsig(1)) / 3 for rewards (1, 0, -1)") {
    std::vector<S> buf = {S(1), S(0), S(-1)}, gbuf(3, S(99));
    const Eigen::TensorMap<const Tok<S>> x(buf.data(), 1, 3);
    Eigen::TensorMap<Tok<S>> g(gbuf.data(), 1, 3);
    const auto res = pl::bradley_terry_ranking(x);
    res.backward(g);
    CHECK_CLOSE(res.loss, -(logsig(1) + logsig(2) + logsig(1)) / 3);
    // d/dr_0 = -(sig(-1) + sig(-2)) / 3, d/dr_1 = (sig(-1) - sig(-1)) / 3 = 0, d/dr_2 = (sig(-2) + sig(-1)) / 3
    CHECK_CLOSE(gbuf[0], -(sig(-1) + sig(-2)) / 3);
    CHECK(gbuf[1] == S(0));
    CHECK_CLOSE(gbuf[2], (sig(-2) + sig(-1)) / 3);
    CHECK(res.metrics.accuracy == S(1));
  }
  SECTION("K = 2 is bradley_terry") {
    Tok<S> x = dyadic_tokens<S>(4, 2, rng, -3, 3);
    Vec<S> c(4), r(4);
    for (long i = 0; i < 4; ++i) {
      c(i) = x(i, 0);
      r(i) = x(i, 1);
    }
    pl::BradleyTerryOptions opt;
    opt.center_coef = 0.5;
    const auto a = pl::bradley_terry_ranking(x, opt);
    const auto b = pl::bradley_terry(c, r, opt);
    CHECK_CLOSE(a.loss, static_cast<ld>(b.loss));
    CHECK(a.metrics.accuracy == b.metrics.reward_accuracy);
    Tok<S> ga(4, 2);
    Vec<S> gc(4), gr(4);
    a.backward(ga);
    b.backward(gc, gr);
    for (long i = 0; i < 4; ++i) {
      CHECK_CLOSE(ga(i, 0), static_cast<ld>(gc(i)));
      CHECK_CLOSE(ga(i, 1), static_cast<ld>(gr(i)));
    }
  }
}
