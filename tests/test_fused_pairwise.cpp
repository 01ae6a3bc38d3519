// The fused forward + backward of the pairwise family (dpo, ipo, simpo, orpo) and of the
// one-input losses (nll, kto): loss(..., grad_c, grad_r) must give the bits of
// `auto r = loss(...); r.backward(grad_c, grad_r);` for every variant and option, mask type,
// scalar type, sum and mean expressions and plain tensors, inf/NaN padding, empty rows, rows of
// zero tokens, and outputs past the streaming-store threshold (rows not batch-aligned). A few
// cases are also checked against the long double closed forms of pairwise_reference.hpp, and
// every rejected call must throw before it writes anything.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "pairwise_reference.hpp"

namespace {

using namespace pref;

/// Bitwise equality, NaN payloads and signs included: "the same bits" is what the fused form
/// promises (both forms run one compiled body of the loss's arithmetic).
template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Index of the first element where a and b differ, n if none.
template <class T>
long first_difference(const T* a, const T* b, long n) {
  for (long k = 0; k < n; ++k)
    if (!same_bits(a[k], b[k])) return k;
  return n;
}

#define CHECK_SAME(a, b)                                                                       \
  do {                                                                                         \
    INFO(#a << " = " << static_cast<double>(a) << ", " #b << " = " << static_cast<double>(b)); \
    CHECK(same_bits(a, b));                                                                    \
  } while (0)

template <class S>
void check_same_metrics(const pl::PreferenceMetrics<S>& a, const pl::PreferenceMetrics<S>& b) {
  CHECK_SAME(a.reward_chosen, b.reward_chosen);
  CHECK_SAME(a.reward_rejected, b.reward_rejected);
  CHECK_SAME(a.reward_margin, b.reward_margin);
  CHECK_SAME(a.reward_accuracy, b.reward_accuracy);
}
template <class S>
void check_same_metrics(const pl::OrpoMetrics<S>& a, const pl::OrpoMetrics<S>& b) {
  check_same_metrics(static_cast<const pl::PreferenceMetrics<S>&>(a), static_cast<const pl::PreferenceMetrics<S>&>(b));
  CHECK_SAME(a.log_odds_ratio, b.log_odds_ratio);
  CHECK_SAME(a.log_odds_chosen, b.log_odds_chosen);
  CHECK_SAME(a.nll_loss, b.nll_loss);
}
template <class S>
void check_same_metrics(const pl::NllMetrics<S>& a, const pl::NllMetrics<S>& b) {
  CHECK_SAME(a.mean_logp, b.mean_logp);
}
template <class S>
void check_same_metrics(const pl::KtoMetrics<S>& a, const pl::KtoMetrics<S>& b) {
  CHECK_SAME(a.reference_point, b.reference_point);
  CHECK_SAME(a.kl_mean, b.kl_mean);
  CHECK(a.count_desirable == b.count_desirable);
  CHECK(a.count_undesirable == b.count_undesirable);
  CHECK_SAME(a.reward_desirable_sum, b.reward_desirable_sum);
  CHECK_SAME(a.reward_undesirable_sum, b.reward_undesirable_sum);
  CHECK_SAME(a.reward_desirable, b.reward_desirable);
  CHECK_SAME(a.reward_undesirable, b.reward_undesirable);
  CHECK_SAME(a.reward_margin, b.reward_margin);
  CHECK_SAME(a.logps_desirable_sum, b.logps_desirable_sum);
  CHECK_SAME(a.logps_undesirable_sum, b.logps_undesirable_sum);
}

#define CHECK_SAME_TENSOR(a, b) check_same_tensor_impl(#a " vs " #b, a, b)

template <class T>
void check_same_tensor_impl(const char* what, const T& a, const T& b) {
  INFO(what);
  REQUIRE(a.size() == b.size());
  const long n = static_cast<long>(a.size());
  const long k = first_difference(a.data(), b.data(), n);
  char buf[128] = "";
  if (k < n)
    std::snprintf(buf, sizeof buf, "%.17g vs %.17g", static_cast<double>(a.data()[k]),
                  static_cast<double>(b.data()[k]));
  INFO("first difference at flat index " << k << ": " << buf);
  CHECK(k == n);
}

/// A sentinel that no gradient takes, so an element the fused form failed to write shows.
template <class T>
void poison(T& g) {
  g.setConstant(static_cast<typename T::Scalar>(-12345.25));
}

/// Pair loss: two_pass() -> result; fused(gc, gr) -> result. gc/gr are output templates (shape).
template <class TwoPass, class Fused, class GC, class GR>
void check_pair_bits(TwoPass&& two_pass, Fused&& fused, GC gc1, GR gr1) {
  GC gc2 = gc1, gc3 = gc1;
  GR gr2 = gr1, gr3 = gr1;
  poison(gc1);
  poison(gr1);
  poison(gc2);
  poison(gr2);
  poison(gc3);
  poison(gr3);
  const auto a = two_pass();
  a.backward(gc1, gr1);
  const auto b = fused(gc2, gr2);
  CHECK_SAME(a.loss, b.loss);
  CHECK_SAME_TENSOR(a.losses, b.losses);
  check_same_metrics(a.metrics, b.metrics);
  CHECK_SAME_TENSOR(a.grad_chosen_value(), b.grad_chosen_value());
  CHECK_SAME_TENSOR(a.grad_rejected_value(), b.grad_rejected_value());
  CHECK_SAME_TENSOR(gc1, gc2);
  CHECK_SAME_TENSOR(gr1, gr2);
  // The fused result's own backward writes the same again.
  b.backward(gc3, gr3);
  CHECK_SAME_TENSOR(gc1, gc3);
  CHECK_SAME_TENSOR(gr1, gr3);
}

/// One-input loss: the same with one gradient.
template <class TwoPass, class Fused, class G>
void check_single_bits(TwoPass&& two_pass, Fused&& fused, G g1) {
  G g2 = g1, g3 = g1;
  poison(g1);
  poison(g2);
  poison(g3);
  const auto a = two_pass();
  a.backward(g1);
  const auto b = fused(g2);
  CHECK_SAME(a.loss, b.loss);
  CHECK_SAME_TENSOR(a.losses, b.losses);
  check_same_metrics(a.metrics, b.metrics);
  CHECK_SAME_TENSOR(a.grad_value(), b.grad_value());
  CHECK_SAME_TENSOR(g1, g2);
  b.backward(g3);
  CHECK_SAME_TENSOR(g1, g3);
}

/// Token data for a pair: inf/NaN in every masked-out slot, row 1 of chosen and row 2 of
/// rejected empty (when the batch has them), log-probs in [lo, hi] (negative for ORPO).
template <class S, class M>
struct PairData {
  Tok<S> xc, xr;
  Tok<M> mc, mr;
  Vec<S> rc, rr;
  PairData(long B, long T, unsigned seed, double lo = -4.0, double hi = -0.05) {
    std::mt19937 rng(seed);
    xc = random_tokens<S>(B, T, rng, lo, hi);
    xr = random_tokens<S>(B, T, rng, lo, hi);
    mc = random_mask<M>(B, T, rng, 0.7, true);
    mr = random_mask<M>(B, T, rng, 0.7, true);
    for (long t = 0; t < T; ++t) {
      if (B > 1) mc(1, t) = M(0);
      if (B > 2) mr(2, t) = M(0);
    }
    poison_padding(xc, mc);
    poison_padding(xr, mr);
    rc = random_vec<S>(B, rng, lo * static_cast<double>(T), 0.0);
    rr = random_vec<S>(B, rng, lo * static_cast<double>(T), 0.0);
  }
  long B() const { return xc.dimension(0); }
  long T() const { return xc.dimension(1); }
};

/// Every pairwise loss and option set on expressions of one data set.
template <bool Mean, class S, class M>
void check_pair_losses(const PairData<S, M>& d) {
  const auto c = seq<Mean>(d.xc, d.mc);
  const auto r = seq<Mean>(d.xr, d.mr);
  const Tok<S> g(d.B(), d.T());
  for (int k = 0; k <= static_cast<int>(pl::DpoVariant::aot_unpaired); ++k)
    for (const double e : {0.0, 0.2})
      for (const bool ref_free : {false, true}) {
        const auto variant = static_cast<pl::DpoVariant>(k);
        if (variant == pl::DpoVariant::exo_pair && e == 0) continue;  // exo_pair needs e > 0
        pl::DpoOptions opt;
        opt.beta = 0.3;
        opt.variant = variant;
        opt.label_smoothing = e;
        opt.reference_free = ref_free;
        // One score per variant where it applies, so every divergence goes through the fused form too.
        if (variant != pl::DpoVariant::apo_zero && variant != pl::DpoVariant::aot &&
            variant != pl::DpoVariant::aot_unpaired)
          opt.divergence = static_cast<pl::FDivergence>(k % 4);
        INFO("dpo variant " << k << ", divergence " << static_cast<int>(opt.divergence) << ", label_smoothing " << e
                            << ", reference_free " << ref_free);
        check_pair_bits([&] { return pl::dpo(c, r, d.rc, d.rr, opt); },
                        [&](Tok<S>& gc, Tok<S>& gr) { return pl::dpo(c, r, d.rc, d.rr, opt, gc, gr); }, g, g);
      }
  for (const auto v : {pl::CpoVariant::sigmoid, pl::CpoVariant::hinge, pl::CpoVariant::ipo, pl::CpoVariant::simpo}) {
    INFO("cpo variant " << static_cast<int>(v));
    pl::CpoOptions opt;
    opt.variant = v;
    opt.alpha = 0.2;
    check_pair_bits([&] { return pl::cpo(c, r, opt); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::cpo(c, r, opt, gc, gr); }, g, g);
  }
  {
    INFO("dpo_mixture with pair_weights");
    const std::vector<pl::DpoTerm> terms = {
        {pl::DpoVariant::sigmoid, 0.8}, {pl::DpoVariant::bco_pair, 0.2}, {pl::DpoVariant::discopop, 1.5}};
    pl::DpoOptions opt;
    opt.pair_weights.assign(static_cast<std::size_t>(d.B()), 0.5);
    opt.pair_weights[0] = 2.0;
    check_pair_bits([&] { return pl::dpo_mixture(c, r, d.rc, d.rr, terms, opt); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::dpo_mixture(c, r, d.rc, d.rr, terms, opt, gc, gr); }, g,
                    g);
  }
  {
    INFO("dpo with masked reference expressions");
    const auto rce = seq<Mean>(d.xr, d.mr), rre = seq<Mean>(d.xc, d.mc);  // the other side's values
    check_pair_bits([&] { return pl::dpo(c, r, rce, rre); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::dpo(c, r, rce, rre, {}, gc, gr); }, g, g);
  }
  for (const bool ref_free : {false, true}) {
    pl::IpoOptions opt;
    opt.beta = 0.4;
    opt.reference_free = ref_free;
    INFO("ipo, reference_free " << ref_free);
    check_pair_bits([&] { return pl::ipo(c, r, d.rc, d.rr, opt); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::ipo(c, r, d.rc, d.rr, opt, gc, gr); }, g, g);
  }
  for (const double e : {0.0, 0.1}) {
    pl::SimpoOptions opt;
    opt.label_smoothing = e;
    INFO("simpo, label_smoothing " << e);
    check_pair_bits([&] { return pl::simpo(c, r, opt); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::simpo(c, r, opt, gc, gr); }, g, g);
  }
  for (const double w : {1.0, 0.0}) {
    pl::OrpoOptions opt;
    opt.nll_weight = w;
    INFO("orpo, nll_weight " << w);
    check_pair_bits([&] { return pl::orpo(c, r, opt); },
                    [&](Tok<S>& gc, Tok<S>& gr) { return pl::orpo(c, r, opt, gc, gr); }, g, g);
  }
}

/// nll and kto on an expression of the same data.
template <bool Mean, class S, class M>
void check_single_losses(const PairData<S, M>& d) {
  const auto c = seq<Mean>(d.xc, d.mc);
  const Tok<S> g(d.B(), d.T());
  {
    INFO("nll");
    check_single_bits([&] { return pl::nll(c); }, [&](Tok<S>& gg) { return pl::nll(c, {}, gg); }, g);
    pl::NllOptions opt;
    opt.normalizer = 7.5;
    check_single_bits([&] { return pl::nll(c, opt); }, [&](Tok<S>& gg) { return pl::nll(c, opt, gg); }, g);
  }
  Vec<std::uint8_t> lab(d.B());
  for (long i = 0; i < d.B(); ++i) lab(i) = static_cast<std::uint8_t>(i % 3 != 1);
  const auto kl = seq<Mean>(d.xr, d.mr);
  for (const bool given : {false, true}) {
    pl::KtoOptions opt;
    opt.desirable_weight = 1.5;
    if (given) opt.reference_point = 0.25;
    INFO("kto, reference_point given " << given);
    check_single_bits([&] { return pl::kto(c, d.rc, lab, kl, d.rr, opt); },
                      [&](Tok<S>& gg) { return pl::kto(c, d.rc, lab, kl, d.rr, opt, gg); }, g);
  }
}

template <class S, class M>
void check_all_shapes(unsigned seed) {
  SECTION("masked_sum") {
    const PairData<S, M> d(6, 37, seed);
    check_pair_losses<false>(d);
    check_single_losses<false>(d);
  }
  SECTION("masked_mean") {
    const PairData<S, M> d(6, 37, seed + 1);
    check_pair_losses<true>(d);
    check_single_losses<true>(d);
  }
  SECTION("rows of at least two SIMD batches, a tail, and odd row starts") {
    const PairData<S, M> d(5, 203, seed + 2);
    check_pair_losses<false>(d);
    check_pair_losses<true>(d);
  }
  SECTION("rows of zero tokens") {
    const PairData<S, M> d(3, 0, seed + 3);
    check_pair_losses<false>(d);
    check_pair_losses<true>(d);
    check_single_losses<true>(d);
  }
  SECTION("batch of 1") {
    const PairData<S, M> d(1, 19, seed + 4);
    check_pair_losses<true>(d);
    check_single_losses<false>(d);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("fused losses give the two-pass bits, byte masks", "[fused]", float, double) {
  SECTION("uint8_t") { check_all_shapes<TestType, std::uint8_t>(101); }
  SECTION("bool") { check_all_shapes<TestType, bool>(202); }
}

TEMPLATE_TEST_CASE("fused losses give the two-pass bits, weight masks", "[fused]", float, double) {
  SECTION("float") { check_all_shapes<TestType, float>(303); }
  SECTION("double") { check_all_shapes<TestType, double>(404); }
}

TEMPLATE_TEST_CASE("fused losses on plain [batch] tensors and mixed inputs", "[fused]", float, double) {
  using S = TestType;
  const PairData<S, std::uint8_t> d(7, 29, 505);
  std::mt19937 rng(506);
  const Vec<S> vc = random_vec<S>(7, rng, -3, -0.1), vr = random_vec<S>(7, rng, -3, -0.1);
  const Vec<S> gv(7);
  const Tok<S> gt(7, 29);
  SECTION("plain chosen and rejected") {
    check_pair_bits([&] { return pl::dpo(vc, vr, d.rc, d.rr); },
                    [&](Vec<S>& gc, Vec<S>& gr) { return pl::dpo(vc, vr, d.rc, d.rr, {}, gc, gr); }, gv, gv);
    check_pair_bits([&] { return pl::ipo(vc, vr, d.rc, d.rr); },
                    [&](Vec<S>& gc, Vec<S>& gr) { return pl::ipo(vc, vr, d.rc, d.rr, {}, gc, gr); }, gv, gv);
    check_pair_bits([&] { return pl::simpo(vc, vr); },
                    [&](Vec<S>& gc, Vec<S>& gr) { return pl::simpo(vc, vr, {}, gc, gr); }, gv, gv);
    check_pair_bits([&] { return pl::orpo(vc, vr); },
                    [&](Vec<S>& gc, Vec<S>& gr) { return pl::orpo(vc, vr, {}, gc, gr); }, gv, gv);
    check_single_bits([&] { return pl::nll(vc); }, [&](Vec<S>& g) { return pl::nll(vc, {}, g); }, gv);
  }
  SECTION("expression chosen, plain rejected, and the other way round") {
    const auto c = pl::masked_sum(d.xc, d.mc);
    const auto r = pl::masked_mean(d.xr, d.mr);
    check_pair_bits([&] { return pl::dpo(c, vr, d.rc, d.rr); },
                    [&](Tok<S>& gc, Vec<S>& gr) { return pl::dpo(c, vr, d.rc, d.rr, {}, gc, gr); }, gt, gv);
    check_pair_bits([&] { return pl::orpo(vc, r); },
                    [&](Vec<S>& gc, Tok<S>& gr) { return pl::orpo(vc, r, {}, gc, gr); }, gv, gt);
  }
  SECTION("outputs as TensorMaps over caller storage") {
    std::vector<S> bc(7 * 29), br(7 * 29);
    const auto c = pl::masked_sum(d.xc, d.mc);
    const auto r = pl::masked_sum(d.xr, d.mr);
    Tok<S> gc1(7, 29), gr1(7, 29);
    const auto a = pl::dpo(c, r, d.rc, d.rr);
    a.backward(gc1, gr1);
    const auto b = pl::dpo(c, r, d.rc, d.rr, {}, Eigen::TensorMap<Tok<S>>(bc.data(), 7, 29),
                           Eigen::TensorMap<Tok<S>>(br.data(), 7, 29));
    CHECK_SAME(a.loss, b.loss);
    CHECK(first_difference(gc1.data(), bc.data(), 7 * 29) == 7 * 29);
    CHECK(first_difference(gr1.data(), br.data(), 7 * 29) == 7 * 29);
  }
}

TEST_CASE("fused losses past the streaming-store threshold give the two-pass bits", "[fused][stream]") {
  // 3 rows of an odd length: 33554436 bytes of float gradient a side, just past the default
  // 32 MiB threshold; every row but the first starts off a SIMD batch (a streaming head).
  using S = float;
  constexpr long B = 3, T = 2796203;
  std::mt19937 rng(707);
  Tok<S> xc = random_tokens<S>(B, T, rng, -4, 0), xr = random_tokens<S>(B, T, rng, -4, 0);
  const Tok<std::uint8_t> mc = random_mask<std::uint8_t>(B, T, rng), mr = random_mask<std::uint8_t>(B, T, rng);
  poison_padding(xc, mc);
  poison_padding(xr, mr);
  const Vec<S> rc = random_vec<S>(B, rng, -1e6, 0), rr = random_vec<S>(B, rng, -1e6, 0);
  const auto c = pl::masked_sum(xc, mc);
  const auto r = pl::masked_sum(xr, mr);
  const auto cm = pl::masked_mean(xc, mc);
  const auto rm = pl::masked_mean(xr, mr);
  REQUIRE(c.streams());
  REQUIRE(rm.streams());
  const Tok<S> g(B, T);
  pl::DpoOptions opt;
  opt.beta = 1e-6;  // margins of ~1e6: keep z moderate
  opt.label_smoothing = 0.1;
  check_pair_bits([&] { return pl::dpo(c, r, rc, rr, opt); },
                  [&](Tok<S>& gc, Tok<S>& gr) { return pl::dpo(c, r, rc, rr, opt, gc, gr); }, g, g);
  check_pair_bits([&] { return pl::simpo(cm, rm); },
                  [&](Tok<S>& gc, Tok<S>& gr) { return pl::simpo(cm, rm, {}, gc, gr); }, g, g);
  check_single_bits([&] { return pl::nll(cm); }, [&](Tok<S>& gg) { return pl::nll(cm, {}, gg); }, g);
}

TEMPLATE_TEST_CASE("fused losses match the long double closed forms", "[fused][values]", float, double) {
  // Dyadic tokens and weights: every masked sum is exact, so the tolerance measures the loss
  // arithmetic alone (pairwise_reference.hpp's rel_tol).
  using S = TestType;
  std::mt19937 rng(808);
  constexpr long B = 5, T = 23;
  const Tok<S> xc = dyadic_tokens<S>(B, T, rng, -2, -0.25), xr = dyadic_tokens<S>(B, T, rng, -2, -0.25);
  const Tok<float> mc = dyadic_mask<float>(B, T, rng), mr = dyadic_mask<float>(B, T, rng);
  const Tok<std::uint8_t> bc = dyadic_mask<std::uint8_t>(B, T, rng), br = dyadic_mask<std::uint8_t>(B, T, rng);
  const Vec<S> rc = dyadic_vec<S>(B, rng, -30, -5), rr = dyadic_vec<S>(B, rng, -30, -5);

  // Checks losses, batch loss and both token gradients of a fused call against ref(s_c, s_r).
  const auto check = [&](const auto& res, const Tok<S>& gc, const Tok<S>& gr, const auto& mkc, const auto& mkr,
                         bool mean, auto&& ref) {
    ld total = 0;
    for (long i = 0; i < B; ++i) {
      const Ref e = ref(i, ref_seq(xc, mkc, i, mean), ref_seq(xr, mkr, i, mean));
      INFO("example " << i);
      CHECK_CLOSE(res.losses(i), e.loss);
      total += e.loss;
      for (long t = 0; t < T; ++t) {
        INFO("token " << t);
        CHECK_CLOSE(gc(i, t), e.dc / B * ref_dseq(mkc, i, t, mean));
        CHECK_CLOSE(gr(i, t), e.dr / B * ref_dseq(mkr, i, t, mean));
      }
    }
    CHECK_CLOSE(res.loss, total / B);
  };
  Tok<S> gc(B, T), gr(B, T);
  SECTION("dpo robust, label smoothing 0.2, masked_sum over weight masks") {
    pl::DpoOptions opt;
    opt.beta = 0.2;
    opt.variant = pl::DpoVariant::robust;
    opt.label_smoothing = 0.2;
    const auto res = pl::dpo(pl::masked_sum(xc, mc), pl::masked_sum(xr, mr), rc, rr, opt, gc, gr);
    check(res, gc, gr, mc, mr, false, [&](long i, ld sc, ld sr) {
      return ref_dpo(Dpo::robust, (sc - static_cast<ld>(rc(i))) - (sr - static_cast<ld>(rr(i))), 0.2L, 0.2L);
    });
  }
  SECTION("dpo sigmoid, masked_mean over byte masks") {
    pl::DpoOptions opt;
    opt.beta = 0.5;
    const auto res = pl::dpo(pl::masked_mean(xc, bc), pl::masked_mean(xr, br), rc, rr, opt, gc, gr);
    check(res, gc, gr, bc, br, true, [&](long i, ld sc, ld sr) {
      return ref_dpo(Dpo::sigmoid, (sc - static_cast<ld>(rc(i))) - (sr - static_cast<ld>(rr(i))), 0.5L, 0.0L);
    });
  }
  SECTION("ipo, masked_sum over weight masks") {
    pl::IpoOptions opt;
    opt.beta = 0.25;
    const auto res = pl::ipo(pl::masked_sum(xc, mc), pl::masked_sum(xr, mr), rc, rr, opt, gc, gr);
    check(res, gc, gr, mc, mr, false, [&](long i, ld sc, ld sr) {
      return ref_ipo((sc - static_cast<ld>(rc(i))) - (sr - static_cast<ld>(rr(i))), 0.25L);
    });
  }
  SECTION("simpo and orpo, masked_mean over byte masks") {
    const auto res = pl::simpo(pl::masked_mean(xc, bc), pl::masked_mean(xr, br), {}, gc, gr);
    check(res, gc, gr, bc, br, true, [&](long, ld sc, ld sr) { return ref_simpo(sc, sr, 2.0L, 0.5L, 0.0L); });
    const auto res2 = pl::orpo(pl::masked_mean(xc, bc), pl::masked_mean(xr, br), {}, gc, gr);
    check(res2, gc, gr, bc, br, true, [&](long, ld sc, ld sr) { return ref_orpo(sc, sr, 0.1L); });
  }
  SECTION("kto, masked_sum over byte masks") {
    // Desirable wd sig(-b (u - z0)), undesirable wu sig(-b (z0 - u)); d sig(x)/dx = sig(x) sig(-x).
    Vec<std::uint8_t> lab(B);
    for (long i = 0; i < B; ++i) lab(i) = static_cast<std::uint8_t>(i % 2);
    pl::KtoOptions opt;
    opt.beta = 0.2;
    opt.desirable_weight = 1.25;
    opt.undesirable_weight = 0.75;
    opt.reference_point = 0.5;
    Tok<S> g(B, T);
    const auto res = pl::kto(pl::masked_sum(xc, bc), rc, lab, rc, rr, opt, g);
    ld total = 0;
    for (long i = 0; i < B; ++i) {
      const ld u = ref_seq(xc, bc, i, false) - static_cast<ld>(rc(i)), b = 0.2L, z0 = 0.5L;
      const ld x = lab(i) ? -b * (u - z0) : -b * (z0 - u);
      const ld w = lab(i) ? 1.25L : 0.75L;
      const ld loss = w * sig(x), du = (lab(i) ? -1 : 1) * w * b * sig(x) * sig(-x);
      INFO("example " << i);
      CHECK_CLOSE(res.losses(i), loss);
      total += loss;
      for (long t = 0; t < T; ++t) CHECK_CLOSE(g(i, t), du / B * ref_dseq(bc, i, t, false));
    }
    CHECK_CLOSE(res.loss, total / B);
  }
  SECTION("nll with a normalizer, masked_sum over weight masks") {
    pl::NllOptions opt;
    opt.normalizer = 40;
    Tok<S> g(B, T);
    const auto res = pl::nll(pl::masked_sum(xc, mc), opt, g);
    ld total = 0;
    for (long i = 0; i < B; ++i) {
      total -= ref_seq(xc, mc, i, false);
      for (long t = 0; t < T; ++t) CHECK_CLOSE(g(i, t), -ref_dseq(mc, i, t, false) / 40);
    }
    CHECK_CLOSE(res.loss, total / 40);
  }
}

namespace {

/// The bytes of a tensor, to show it was not written.
template <class G>
std::vector<unsigned char> bytes_of(const G& g) {
  const auto* p = reinterpret_cast<const unsigned char*>(g.data());
  return {p, p + static_cast<std::size_t>(g.size()) * sizeof(*g.data())};
}

/// Calls f and checks it throws E with every fragment in its message, and that no g was written.
template <class E, class F, class... G>
void expect_untouched(F&& f, std::initializer_list<const char*> fragments, const G&... g) {
  const std::vector<std::vector<unsigned char>> before{bytes_of(g)...};
  try {
    f();
    FAIL("no exception");
  } catch (const E& e) {
    const std::string msg = e.what();
    INFO(msg);
    for (const char* frag : fragments) CHECK(msg.find(frag) != std::string::npos);
  }
  const std::vector<std::vector<unsigned char>> after{bytes_of(g)...};
  CHECK(before == after);
}

}  // namespace

TEST_CASE("fused losses reject bad outputs before writing anything", "[fused][errors]") {
  using S = float;
  const PairData<S, std::uint8_t> d(4, 16, 909);
  const auto c = pl::masked_sum(d.xc, d.mc);
  const auto r = pl::masked_sum(d.xr, d.mr);
  Tok<S> gc(4, 16), gr(4, 16);
  poison(gc);
  poison(gr);

  SECTION("a wrong shape, on either side") {
    Tok<S> bad(4, 15);
    poison(bad);
    expect_untouched<pl::shape_error>([&] { pl::dpo(c, r, d.rc, d.rr, {}, bad, gr); },
                                      {"dpo", "'grad_chosen'", "[4, 16]", "[4, 15]"}, bad, gr);
    expect_untouched<pl::shape_error>([&] { pl::simpo(c, r, {}, gc, bad); }, {"simpo", "'grad_rejected'"}, gc, bad);
    Vec<S> plain(5), pr(4);
    poison(plain);
    poison(pr);
    expect_untouched<pl::shape_error>([&] { pl::ipo(d.rc, d.rr, d.rc, d.rr, {}, pr, plain); },
                                      {"ipo", "'grad_rejected'", "[4]", "[5]"}, pr, plain);
    expect_untouched<pl::shape_error>([&] { pl::nll(c, {}, bad); }, {"nll", "'grad'"}, bad);
  }
  SECTION("overlapping outputs") {
    std::vector<S> buf(4 * 16 + 8, S(7));
    Eigen::TensorMap<Tok<S>> a(buf.data(), 4, 16), b(buf.data() + 8, 4, 16);
    const std::vector<S> before = buf;
    try {
      pl::dpo(c, r, d.rc, d.rr, {}, a, b);
      FAIL("no exception");
    } catch (const pl::layout_error& e) {
      CHECK(std::string(e.what()).find("overlap") != std::string::npos);
    }
    CHECK(buf == before);
  }
  SECTION("an output over an input") {
    Tok<S> xc = d.xc;  // a writable copy to alias
    const auto c2 = pl::masked_sum(xc, d.mc);
    Eigen::TensorMap<Tok<S>> over_tokens(xc.data(), 4, 16);
    expect_untouched<pl::layout_error>([&] { pl::dpo(c2, r, d.rc, d.rr, {}, over_tokens, gr); },
                                       {"dpo", "output 'grad_chosen'", "input 'chosen'", "tokens"}, xc, gr);

    // A float gradient of 16 tokens over the rejected side's byte mask of 64 (64 bytes each).
    Tok<std::uint8_t> m64(1, 64);
    m64.setConstant(1);
    Tok<S> x64(1, 64), g64(1, 64), x16(1, 16);
    x64.setConstant(-1);
    x16.setConstant(-2);
    poison(g64);
    Tok<std::uint8_t> m16(1, 16);
    m16.setConstant(1);
    Eigen::TensorMap<Tok<S>> over_mask(reinterpret_cast<S*>(m64.data()), 1, 16);
    expect_untouched<pl::layout_error>(
        [&] { pl::simpo(pl::masked_sum(x16, m16), pl::masked_sum(x64, m64), {}, over_mask, g64); },
        {"simpo", "output 'grad_chosen'", "input 'rejected'", "mask"}, m64, g64);

    // The rejected gradient over a reference, even one that reference_free ignores.
    Tok<S> x1(1, 1), g1(1, 1);
    x1.setConstant(-1);
    poison(g1);
    Tok<std::uint8_t> m1(1, 1);
    m1.setConstant(1);
    Vec<S> rc1(1), rr1(1);
    rc1.setConstant(-2);
    rr1.setConstant(-3);
    Eigen::TensorMap<Tok<S>> over_ref(rr1.data(), 1, 1);
    pl::DpoOptions free;
    free.reference_free = true;
    const auto s1 = pl::masked_sum(x1, m1);
    expect_untouched<pl::layout_error>([&] { pl::dpo(s1, s1, rc1, rr1, free, g1, over_ref); },
                                       {"dpo", "output 'grad_rejected'", "input 'ref_rejected'"}, rr1, g1);

    // kto: the gradient over the KL batch's tokens.
    Vec<std::uint8_t> lab(4);
    lab.setConstant(1);
    Tok<S> kl = d.xr;
    const auto kls = pl::masked_sum(kl, d.mr);
    Eigen::TensorMap<Tok<S>> over_kl(kl.data(), 4, 16);
    expect_untouched<pl::layout_error>([&] { pl::kto(c, d.rc, lab, kls, d.rr, {}, over_kl); },
                                       {"kto", "output 'grad_policy'", "input 'kl_policy'"}, kl);

    // nll: the gradient over its own mask (a [1, 16] byte mask at the start of 64 bytes).
    std::vector<std::uint8_t> blob(64, 1);
    const Eigen::TensorMap<const Tok<std::uint8_t>> own_mask(blob.data(), 1, 16);
    Eigen::TensorMap<Tok<S>> over_own(reinterpret_cast<S*>(blob.data()), 1, 16);
    expect_untouched<pl::layout_error>([&] { pl::nll(pl::masked_mean(x16, own_mask), {}, over_own); },
                                       {"nll", "output 'grad'", "input 'logp_sequence'", "mask"}, blob);
  }
  SECTION("misaligned output") {
    std::vector<S> buf(4 * 16 + 1);
    auto* odd = reinterpret_cast<S*>(reinterpret_cast<unsigned char*>(buf.data()) + 1);
    Eigen::TensorMap<Tok<S>> mis(odd, 4, 16);
    try {
      pl::orpo(c, r, {}, mis, gr);
      FAIL("no exception");
    } catch (const pl::layout_error& e) {
      CHECK(std::string(e.what()).find("grad_chosen") != std::string::npos);
    }
    Tok<S> fresh(4, 16);
    poison(fresh);
    CHECK_SAME_TENSOR(gr, fresh);
  }
  SECTION("a bad option or an empty batch") {
    pl::DpoOptions opt;
    opt.beta = -1;
    expect_untouched<pl::option_error>([&] { pl::dpo(c, r, d.rc, d.rr, opt, gc, gr); }, {"dpo", "'beta'"}, gc, gr);
    const Tok<S> x0(0, 16);
    const Tok<std::uint8_t> m0(0, 16);
    const Vec<S> r0(0);
    Tok<S> g0(0, 16), h0(0, 16);
    expect_untouched<pl::shape_error>(
        [&] { pl::dpo(pl::masked_sum(x0, m0), pl::masked_sum(x0, m0), r0, r0, {}, g0, h0); }, {"dpo", "empty batch"},
        g0, h0);
    expect_untouched<pl::shape_error>([&] { pl::nll(pl::masked_mean(x0, m0), {}, g0); }, {"nll", "empty batch"}, g0);
  }
}
