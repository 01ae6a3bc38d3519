// Token-level gradients of the whole pairwise family (DPO: every variant and f-divergence, label
// smoothing and reference-free, Bradley-Terry with margin and centering, K-way ranking, IPO,
// SimPO, ORPO, NLL) against central finite differences in double: masked_sum and masked_mean
// inputs with uint8, float and double masks, and plain [batch] tensors.
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include "pairwise_reference.hpp"

namespace {

using namespace pref;

template <class T>
struct Type {
  using type = T;
};

struct Always {
  template <class C, class R>
  bool operator()(const C&, const R&) const {
    return true;
  }
};

constexpr long kB = 3, kT = 9;  // 9 tokens: a full SIMD block plus a tail for double and float

/// FD check of a pair loss f(chosen, rejected) on token expressions. Masked-out tokens are
/// perturbed too: their analytic gradient must be exactly what FD sees, 0.
template <bool Mean, class M, class F, class Pre = Always>
double fd_pair_tokens(F&& f, unsigned seed, double lo, double hi, Pre pre = {}) {
  std::mt19937 rng(seed);
  Tok<double> xc = random_tokens<double>(kB, kT, rng, lo, hi), xr = random_tokens<double>(kB, kT, rng, lo, hi);
  const Tok<M> mc = random_mask<M>(kB, kT, rng), mr = random_mask<M>(kB, kT, rng);
  REQUIRE(pre(seq<Mean>(xc, mc), seq<Mean>(xr, mr)));
  Tok<double> gc(kB, kT), gr(kB, kT);
  gc.setConstant(99);
  gr.setConstant(99);
  f(seq<Mean>(xc, mc), seq<Mean>(xr, mr)).backward(gc, gr);
  for (long i = 0; i < kB; ++i)
    for (long t = 0; t < kT; ++t) {
      if (mc(i, t) == M(0)) CHECK(gc(i, t) == 0.0);
      if (mr(i, t) == M(0)) CHECK(gr(i, t) == 0.0);
    }
  return fd_check({{xc.data(), gc.data(), kB * kT}, {xr.data(), gr.data(), kB * kT}},
                  [&] { return static_cast<double>(f(seq<Mean>(xc, mc), seq<Mean>(xr, mr)).loss); });
}

template <class F, class Pre = Always>
double fd_pair_plain(F&& f, unsigned seed, double lo, double hi, Pre pre = {}) {
  std::mt19937 rng(seed);
  Vec<double> c = random_vec<double>(kB, rng, lo, hi), r = random_vec<double>(kB, rng, lo, hi);
  REQUIRE(pre(c, r));
  Vec<double> gc(kB), gr(kB);
  gc.setConstant(99);
  gr.setConstant(99);
  f(c, r).backward(gc, gr);
  return fd_check({{c.data(), gc.data(), kB}, {r.data(), gr.data(), kB}},
                  [&] { return static_cast<double>(f(c, r).loss); });
}

/// Every input form: {uint8, float, double masks} x {masked_sum, masked_mean} and plain tensors.
/// Means and plain values draw from [lo, hi]; sums from [lo, hi] * sum_scale (so the sums of
/// about 6 tokens stay in a comparable range).
template <class F, class Pre = Always>
void fd_pair_all(const std::string& name, F&& f, double lo, double hi, double sum_scale, Pre pre = {}) {
  double worst = 0;
  unsigned seed = 100;
  worst = std::max(worst, fd_pair_tokens<false, std::uint8_t>(f, ++seed, lo * sum_scale, hi * sum_scale, pre));
  worst = std::max(worst, fd_pair_tokens<true, std::uint8_t>(f, ++seed, lo, hi, pre));
  worst = std::max(worst, fd_pair_tokens<false, float>(f, ++seed, lo * sum_scale, hi * sum_scale, pre));
  worst = std::max(worst, fd_pair_tokens<true, float>(f, ++seed, lo, hi, pre));
  worst = std::max(worst, fd_pair_tokens<false, double>(f, ++seed, lo * sum_scale, hi * sum_scale, pre));
  worst = std::max(worst, fd_pair_tokens<true, bool>(f, ++seed, lo, hi, pre));
  worst = std::max(worst, fd_pair_plain(f, ++seed, lo, hi, pre));
  fd_report().add(name, worst);
}

/// Plain reference values shared by the DPO-family cases.
struct Refs {
  Vec<double> rc, rr;
  Refs() {
    std::mt19937 rng(7);
    rc = random_vec<double>(kB, rng, -3, 0);
    rr = random_vec<double>(kB, rng, -3, 0);
  }
};

}  // namespace

TEST_CASE("dpo gradients match finite differences", "[pairwise][dpo][fd]") {
  const Refs ref;
  struct Case {
    const char* name;
    pl::DpoVariant v;
    double e;
    bool free;
  };
  const Case cases[] = {
      {"dpo sigmoid", pl::DpoVariant::sigmoid, 0.0, false},
      {"dpo sigmoid e=0.2", pl::DpoVariant::sigmoid, 0.2, false},
      {"dpo sigmoid reference_free", pl::DpoVariant::sigmoid, 0.1, true},
      {"dpo robust", pl::DpoVariant::robust, 0.0, false},
      {"dpo robust e=0.3", pl::DpoVariant::robust, 0.3, false},
      {"dpo robust reference_free", pl::DpoVariant::robust, 0.3, true},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      pl::DpoOptions opt;
      opt.beta = 0.4;
      opt.variant = k.v;
      opt.label_smoothing = k.e;
      opt.reference_free = k.free;
      fd_pair_all(
          k.name, [&](const auto& c, const auto& r) { return pl::dpo(c, r, ref.rc, ref.rr, opt); }, -3, 0, 0.5);
    }
  }
  SECTION("reference values given as masked_sum expressions") {
    std::mt19937 rng(3);
    const Tok<double> xrc = random_tokens<double>(kB, kT, rng, -2, 0), xrr = random_tokens<double>(kB, kT, rng, -2, 0);
    const Tok<std::uint8_t> mrc = random_mask<std::uint8_t>(kB, kT, rng), mrr = random_mask<std::uint8_t>(kB, kT, rng);
    pl::DpoOptions opt;
    opt.beta = 0.1;
    const double err = fd_pair_tokens<false, std::uint8_t>(
        [&](const auto& c, const auto& r) {
          return pl::dpo(c, r, pl::masked_sum(xrc, mrc), pl::masked_sum(xrr, mrr), opt);
        },
        5, -2, 0);
    fd_report().add("dpo sigmoid", err);
  }
}

TEST_CASE("every dpo variant and f-divergence matches finite differences", "[pairwise][dpo][fd]") {
  const Refs ref;
  using V = pl::DpoVariant;
  using F = pl::FDivergence;
  struct Case {
    const char* name;
    V v;
    F f;
    double e, alpha, clamp;
    bool free;
  };
  const Case cases[] = {
      {"dpo exo_pair", V::exo_pair, F::reverse_kl, 1e-3, 0.5, 80, false},
      {"dpo exo_pair e=0.3 js", V::exo_pair, F::js_divergence, 0.3, 0.5, 80, false},
      {"dpo nca_pair", V::nca_pair, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo nca_pair forward_kl", V::nca_pair, F::forward_kl, 0, 0.5, 80, false},
      {"dpo bco_pair", V::bco_pair, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo sppo_hard", V::sppo_hard, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo sppo_hard alpha=0.5", V::sppo_hard, F::alpha_divergence, 0, 0.5, 80, false},
      {"dpo apo_zero", V::apo_zero, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo apo_zero reference_free", V::apo_zero, F::reverse_kl, 0, 0.5, 80, true},
      {"dpo apo_down", V::apo_down, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo apo_down js", V::apo_down, F::js_divergence, 0, 0.5, 80, false},
      {"dpo discopop", V::discopop, F::reverse_kl, 0, 0.5, 80, false},
      {"dpo aot", V::aot, F::reverse_kl, 0.2, 0.5, 80, false},
      {"dpo aot reference_free", V::aot, F::reverse_kl, 0, 0.5, 80, true},
      {"dpo aot_unpaired", V::aot_unpaired, F::reverse_kl, 0.1, 0.5, 80, false},
      {"dpo sigmoid forward_kl", V::sigmoid, F::forward_kl, 0, 0.5, 80, false},
      {"dpo sigmoid js", V::sigmoid, F::js_divergence, 0.1, 0.5, 80, false},
      {"dpo robust alpha=1.5", V::robust, F::alpha_divergence, 0.2, 1.5, 80, false},
      {"dpo sigmoid alpha=0.3", V::sigmoid, F::alpha_divergence, 0, 0.3, 80, false},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      pl::DpoOptions opt;
      opt.beta = 0.4;
      opt.variant = k.v;
      opt.divergence = k.f;
      opt.label_smoothing = k.e;
      opt.alpha = k.alpha;
      opt.alpha_clamp = k.clamp;
      opt.reference_free = k.free;
      opt.bco_delta = k.v == V::bco_pair ? 0.3 : 0.0;
      opt.discopop_tau = 0.3;
      fd_pair_all(
          k.name, [&](const auto& c, const auto& r) { return pl::dpo(c, r, ref.rc, ref.rr, opt); }, -3, 0, 0.5);
    }
  }
}

TEST_CASE("dpo_mixture and pair_weights match finite differences", "[pairwise][dpo][fd]") {
  const Refs ref;
  pl::DpoOptions opt;
  opt.beta = 0.4;
  opt.pair_weights = {0.5, 2.0, 0.0};
  fd_pair_all(
      "dpo pair_weights", [&](const auto& c, const auto& r) { return pl::dpo(c, r, ref.rc, ref.rr, opt); }, -3, 0, 0.5);
  const std::vector<pl::DpoTerm> terms = {
      {pl::DpoVariant::sigmoid, 0.8}, {pl::DpoVariant::bco_pair, 0.2}, {pl::DpoVariant::aot, -0.5}};
  pl::DpoOptions mix;
  mix.beta = 0.4;
  fd_pair_all(
      "dpo_mixture", [&](const auto& c, const auto& r) { return pl::dpo_mixture(c, r, ref.rc, ref.rr, terms, mix); },
      -3, 0, 0.5);
}

TEST_CASE("cpo gradients match finite differences", "[pairwise][cpo][fd]") {
  for (const auto v : {pl::CpoVariant::sigmoid, pl::CpoVariant::ipo, pl::CpoVariant::simpo})
    for (const double alpha : {0.0, 0.3, -0.4}) {
      pl::CpoOptions opt;
      opt.variant = v;
      opt.alpha = alpha;
      opt.beta = 0.5;
      opt.label_smoothing = v == pl::CpoVariant::ipo ? 0.0 : 0.1;
      fd_pair_all(
          "cpo", [&](const auto& c, const auto& r) { return pl::cpo(c, r, opt); }, -3, 0, 0.5);
    }
}

TEST_CASE("dpo hinge gradients match finite differences away from the kink", "[pairwise][dpo][fd]") {
  const Refs ref;
  for (const bool free : {false, true}) {
    pl::DpoOptions opt;
    opt.beta = 0.5;
    opt.variant = pl::DpoVariant::hinge;
    opt.reference_free = free;
    // Perturbations move b*D by ~1e-6; keep every example 1e-3 away from the kink at b*D = 1.
    const auto away = [&](const auto& c, const auto& r) {
      const auto sc = pl::as_sequence(c), sr = pl::as_sequence(r);
      for (long i = 0; i < kB; ++i) {
        const double D = (sc.value(i) - (free ? 0.0 : ref.rc(i))) - (sr.value(i) - (free ? 0.0 : ref.rr(i)));
        if (std::fabs(1 - opt.beta * D) < 1e-3) return false;
      }
      return true;
    };
    fd_pair_all(
        free ? "dpo hinge reference_free" : "dpo hinge",
        [&](const auto& c, const auto& r) { return pl::dpo(c, r, ref.rc, ref.rr, opt); }, -4, 0, 0.6, away);
  }
}

TEST_CASE("bradley_terry gradients match finite differences", "[pairwise][bt][fd]") {
  std::mt19937 rng(11);
  const Vec<double> margin = random_vec<double>(kB, rng, 0, 1.5);
  for (const double k : {0.0, 0.25}) {
    pl::BradleyTerryOptions opt;
    opt.center_coef = k;
    fd_pair_all(
        k == 0 ? "bradley_terry" : "bradley_terry center_coef",
        [&](const auto& c, const auto& r) { return pl::bradley_terry(c, r, opt); }, -2, 2, 0.5);
    fd_pair_all(
        k == 0 ? "bradley_terry margin" : "bradley_terry margin center_coef",
        [&](const auto& c, const auto& r) { return pl::bradley_terry(c, r, margin, opt); }, -2, 2, 0.5);
  }
}

TEST_CASE("ipo gradients match finite differences", "[pairwise][ipo][fd]") {
  const Refs ref;
  for (const double beta : {0.1, 0.5}) {
    pl::IpoOptions opt;
    opt.beta = beta;
    fd_pair_all(
        "ipo", [&](const auto& c, const auto& r) { return pl::ipo(c, r, ref.rc, ref.rr, opt); }, -3, 0, 1);
    opt.reference_free = true;
    fd_pair_all(
        "ipo reference_free", [&](const auto& c, const auto& r) { return pl::ipo(c, r, ref.rc, ref.rr, opt); }, -3, 0,
        1);
  }
}

TEST_CASE("simpo gradients match finite differences", "[pairwise][simpo][fd]") {
  pl::SimpoOptions opt;  // beta 2, gamma 0.5
  fd_pair_all(
      "simpo", [&](const auto& c, const auto& r) { return pl::simpo(c, r, opt); }, -2, 0, 0.25);
  opt.label_smoothing = 0.15;
  opt.gamma = 1.25;
  fd_pair_all(
      "simpo label_smoothing", [&](const auto& c, const auto& r) { return pl::simpo(c, r, opt); }, -2, 0, 0.25);
}

TEST_CASE("orpo gradients match finite differences", "[pairwise][orpo][fd]") {
  pl::OrpoOptions opt;
  for (const double beta : {0.1, 1.0}) {
    opt.beta = beta;
    // Log-probs in [-2, -0.02]: averages and sums stay < 0, inside log1mexp's domain.
    fd_pair_all(
        "orpo", [&](const auto& c, const auto& r) { return pl::orpo(c, r, opt); }, -2, -0.02, 1);
  }
  opt.nll_weight = 0;
  fd_pair_all(
      "orpo nll_weight=0", [&](const auto& c, const auto& r) { return pl::orpo(c, r, opt); }, -2, -0.02, 1);
  SECTION("near s = 0, where log1mexp needs expm1") {
    opt.nll_weight = 1;
    opt.beta = 0.5;
    fd_pair_all(
        "orpo near 0", [&](const auto& c, const auto& r) { return pl::orpo(c, r, opt); }, -0.05, -0.002, 1);
  }
}

TEST_CASE("nll gradients match finite differences", "[pairwise][nll][fd]") {
  const auto one = [](auto f, unsigned seed, auto mean_tag, auto mask_tag) {
    constexpr bool Mean = decltype(mean_tag)::value;
    using M = typename decltype(mask_tag)::type;
    std::mt19937 rng(seed);
    Tok<double> x = random_tokens<double>(kB, kT, rng, -3, 0);
    const Tok<M> m = random_mask<M>(kB, kT, rng);
    Tok<double> g(kB, kT);
    g.setConstant(99);
    f(seq<Mean>(x, m)).backward(g);
    return fd_check({{x.data(), g.data(), kB * kT}}, [&] { return static_cast<double>(f(seq<Mean>(x, m)).loss); });
  };
  using Sum = std::false_type;
  using Mean = std::true_type;
  for (const bool normalized : {false, true}) {
    pl::NllOptions opt;
    if (normalized) opt.normalizer = 17.0;
    const auto f = [&](const auto& s) { return pl::nll(s, opt); };
    double worst = 0;
    worst = std::max(worst, one(f, 1, Sum{}, Type<std::uint8_t>{}));
    worst = std::max(worst, one(f, 2, Mean{}, Type<std::uint8_t>{}));
    worst = std::max(worst, one(f, 3, Sum{}, Type<float>{}));
    worst = std::max(worst, one(f, 4, Mean{}, Type<double>{}));
    std::mt19937 rng(5);
    Vec<double> v = random_vec<double>(kB, rng, -5, 0), g(kB);
    f(v).backward(g);
    worst = std::max(worst, fd_check({{v.data(), g.data(), kB}}, [&] { return static_cast<double>(f(v).loss); }));
    fd_report().add(normalized ? "nll normalizer" : "nll", worst);
  }
}

TEST_CASE("bradley_terry_ranking gradients match finite differences", "[pairwise][ranking][fd]") {
  for (const long K : {2L, 3L, 5L}) {
    for (const double k : {0.0, 0.3}) {
      std::mt19937 rng(static_cast<unsigned>(K * 10 + (k > 0)));
      Tok<double> x = random_tokens<double>(kB, K, rng, -2, 2);
      Tok<double> g(kB, K);
      g.setConstant(99);
      pl::BradleyTerryOptions opt;
      opt.center_coef = k;
      pl::bradley_terry_ranking(x, opt).backward(g);
      const double err = fd_check({{x.data(), g.data(), kB * K}},
                                  [&] { return static_cast<double>(pl::bradley_terry_ranking(x, opt).loss); });
      fd_report().add(k == 0 ? "bradley_terry_ranking" : "bradley_terry_ranking center_coef", err);
    }
  }
}
