// Golden suite: prefloss in float and double against PyTorch autograd of the anchors' formulas
// (TRL, verl; see tests/golden/make_golden.py for the provenance and the data format). Inputs
// are float32-exact, so both runs see the same numbers; masked-out tokens hold NaN / -inf.
//
// Each output tensor is compared norm-wise: max|got - want| / max|want| <= 1e-5 (float) or
// 1e-10 (double); gradients must also be exactly 0 wherever torch's are (masked-out, clipped or
// inactive tokens). The largest deviations seen are printed when the run ends.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <prefloss/prefloss.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef PREFLOSS_TEST_DATA_DIR
#error "PREFLOSS_TEST_DATA_DIR must name tests/data"
#endif

namespace {

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

// ---- the text format ------------------------------------------------------------------------

struct Rec {
  std::vector<long> dims;
  std::vector<double> v;
  long size() const { return static_cast<long>(v.size()); }
};

struct Case {
  std::string family, name;
  std::map<std::string, Rec> t;
  std::map<std::string, std::string> s;

  bool has(const std::string& k) const { return t.count(k) != 0; }
  const Rec& at(const std::string& k) const {
    const auto it = t.find(k);
    if (it == t.end()) throw std::runtime_error(family + "/" + name + ": no record '" + k + "'");
    return it->second;
  }
  double num(const std::string& k) const {
    const Rec& r = at(k);
    if (!r.dims.empty()) throw std::runtime_error(family + "/" + name + ": '" + k + "' is not a scalar");
    return r.v.at(0);
  }
  const std::string& str(const std::string& k) const {
    const auto it = s.find(k);
    if (it == s.end()) throw std::runtime_error(family + "/" + name + ": no string '" + k + "'");
    return it->second;
  }
};

/// Every family the suite compares: each has a TEST_CASE below that loads golden_<family>.txt.
const char* const families[] = {"bradley_terry", "dpo", "gae",  "group_advantages", "ipo",   "kl",         "kto",
                                "logprobs",      "nll", "orpo", "ppo_clip",         "simpo", "value_loss", "whiten"};

std::vector<Case> load(const std::string& family) {
  const std::string path = std::string(PREFLOSS_TEST_DATA_DIR) + "/golden_" + family + ".txt";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<Case> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string kind;
    ls >> kind;
    if (kind == "case") {
      cases.emplace_back();
      cases.back().family = family;
      ls >> cases.back().name;
    } else if (kind == "end") {
      continue;
    } else if (kind == "s") {
      std::string k, w;
      ls >> k >> w;
      cases.back().s[k] = w;
    } else if (kind == "t") {
      std::string k;
      int rank = 0;
      ls >> k >> rank;
      Rec r;
      long n = 1;
      for (int d = 0; d < rank; ++d) {
        long e = 0;
        ls >> e;
        r.dims.push_back(e);
        n *= e;
      }
      for (long i = 0; i < n; ++i) {
        std::string w;
        ls >> w;
        r.v.push_back(std::strtod(w.c_str(), nullptr));  // reads nan, inf, -inf too
      }
      if (!ls) throw std::runtime_error(path + ": short record '" + k + "'");
      cases.back().t[k] = std::move(r);
    } else {
      throw std::runtime_error(path + ": unknown record kind '" + kind + "'");
    }
  }
  REQUIRE(!cases.empty());
  return cases;
}

template <class T>
Tok<T> tok(const Rec& r) {
  REQUIRE(r.dims.size() == 2);
  Tok<T> x(r.dims[0], r.dims[1]);
  for (long k = 0; k < r.size(); ++k) x.data()[k] = static_cast<T>(r.v[static_cast<std::size_t>(k)]);
  return x;
}

Tok<std::uint8_t> mask(const Rec& r) {
  REQUIRE(r.dims.size() == 2);
  Tok<std::uint8_t> m(r.dims[0], r.dims[1]);
  for (long k = 0; k < r.size(); ++k) m.data()[k] = r.v[static_cast<std::size_t>(k)] != 0 ? 1 : 0;
  return m;
}

template <class T>
Vec<T> vec(const Rec& r) {
  REQUIRE(r.dims.size() == 1);
  Vec<T> x(r.dims[0]);
  for (long k = 0; k < r.size(); ++k) x.data()[k] = static_cast<T>(r.v[static_cast<std::size_t>(k)]);
  return x;
}

// ---- comparison and the deviation record ------------------------------------------------------

struct Worst {
  double dev = 0;
  std::string where;
};
/// The largest deviation seen per family and type, printed when the run ends (whatever cases ran).
struct WorstTable {
  std::map<std::string, Worst> rows;
  ~WorstTable() {
    if (rows.empty()) return;
    std::printf("golden: max norm-wise relative deviation from torch float64 autograd\n");
    for (const auto& [k, w] : rows) std::printf("  %-26s %.3g  (%s)\n", k.c_str(), w.dev, w.where.c_str());
  }
};
std::map<std::string, Worst>& worst() {
  static WorstTable t;
  return t.rows;
}

template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-10;
}
template <class T>
const char* tname() {
  return std::is_same_v<T, float> ? "float" : "double";
}

/// Norm-wise relative deviation of n values from the golden record; exact zeros must stay exact
/// when `zeros_exact` (gradients). `terms`: for a value that sums terms of mixed sign, the sum of
/// their magnitudes, which scales its rounding error when the value itself is far smaller.
template <class T, class G>
void compare(const Case& c, const std::string& label, const G* got, long n, const Rec& want, bool zeros_exact = false,
             double terms = 0) {
  const std::string where = c.family + "/" + c.name + " " + label + " (" + tname<T>() + ")";
  INFO(where);
  REQUIRE(n == want.size());
  double scale = 0, err = 0;
  long bad_zero = 0, nonfinite = 0;
  for (long k = 0; k < n; ++k) {
    const double w = want.v[static_cast<std::size_t>(k)], g = static_cast<double>(got[k]);
    scale = std::max(scale, std::fabs(w));
    if (!std::isfinite(g)) ++nonfinite;
    err = std::max(err, std::fabs(g - w));
    if (zeros_exact && w == 0 && g != 0) ++bad_zero;
  }
  scale = std::max(scale, terms);
  const double dev = scale > 0 ? err / scale : err;
  CHECK(nonfinite == 0);
  CHECK(bad_zero == 0);
  CHECK(dev <= tol<T>());
  Worst& w = worst()[c.family + " " + tname<T>()];
  if (dev >= w.dev) w = {dev, c.name + " " + label};
}

template <class T>
void compare(const Case& c, const std::string& label, T got) {
  compare<T>(c, label, &got, 1, c.at(label));
}
template <class T>
void compare(const Case& c, const std::string& label, const Vec<T>& got) {
  compare<T>(c, label, got.data(), got.size(), c.at(label));
}
template <class T>
void compare_grad(const Case& c, const std::string& label, const Tok<T>& got) {
  compare<T>(c, label, got.data(), got.size(), c.at(label), true);
}
template <class T>
void compare_grad(const Case& c, const std::string& label, const Vec<T>& got) {
  compare<T>(c, label, got.data(), got.size(), c.at(label), true);
}

template <class F>
void for_types(F&& f) {
  f(float{});
  f(double{});
}

/// A pairwise case's token inputs in type T, and the checks every pairwise result shares: batch
/// loss, per-example losses and both token gradients.
template <class T>
struct PairTokens {
  Tok<T> xc, xr;
  Tok<std::uint8_t> mc, mr;
  explicit PairTokens(const Case& c)
      : xc(tok<T>(c.at("logp_c"))), xr(tok<T>(c.at("logp_r"))), mc(mask(c.at("mask_c"))), mr(mask(c.at("mask_r"))) {}

  template <class R>
  void check(const Case& c, const R& r) const {
    Tok<T> gc(xc.dimension(0), xc.dimension(1)), gr(xr.dimension(0), xr.dimension(1));
    r.backward(gc, gr);
    compare(c, "loss", r.loss);
    compare(c, "losses", r.losses);
    compare_grad(c, "grad_c", gc);
    compare_grad(c, "grad_r", gr);
  }
};

pl::Aggregation aggregation(const std::string& s) {
  if (s == "token_mean") return pl::Aggregation::token_mean;
  if (s == "seq_mean_token_sum") return pl::Aggregation::seq_mean_token_sum;
  if (s == "seq_mean_token_mean") return pl::Aggregation::seq_mean_token_mean;
  if (s == "seq_mean_token_sum_norm") return pl::Aggregation::seq_mean_token_sum_norm;
  throw std::runtime_error("unknown aggregation " + s);
}

pl::DpoVariant dpo_variant(const std::string& s) {
  if (s == "sigmoid") return pl::DpoVariant::sigmoid;
  if (s == "robust") return pl::DpoVariant::robust;
  if (s == "hinge") return pl::DpoVariant::hinge;
  throw std::runtime_error("unknown dpo variant " + s);
}

pl::KlEstimator estimator(const std::string& s) {
  if (s == "k1") return pl::KlEstimator::k1;
  if (s == "k2") return pl::KlEstimator::k2;
  if (s == "k3") return pl::KlEstimator::k3;
  throw std::runtime_error("unknown estimator " + s);
}

}  // namespace

// ---- DPO family ---------------------------------------------------------------------------------

TEST_CASE("golden: dpo vs TRL dpo_loss", "[golden][dpo]") {
  for (const Case& c : load("dpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
      pl::DpoOptions o;
      o.beta = c.num("beta");
      o.label_smoothing = c.num("label_smoothing");
      o.reference_free = c.num("reference_free") != 0;
      const std::string& v = c.str("variant");
      o.variant = dpo_variant(v);
      const auto r = pl::dpo(pl::masked_sum(p.xc, p.mc), pl::masked_sum(p.xr, p.mr), rc, rr, o);
      p.check(c, r);
      compare(c, "reward_chosen", r.metrics.reward_chosen);
      compare(c, "reward_rejected", r.metrics.reward_rejected);
      compare(c, "reward_margin", r.metrics.reward_margin);
      compare(c, "reward_accuracy", r.metrics.reward_accuracy);
    });
  }
}

TEST_CASE("golden: ipo vs TRL (masked_mean) and OpenRLHF (masked_sum)", "[golden][ipo]") {
  for (const Case& c : load("ipo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
      pl::IpoOptions o;
      o.beta = c.num("beta");
      const auto check = [&](const auto& r) {
        p.check(c, r);
        compare(c, "reward_chosen", r.metrics.reward_chosen);
        compare(c, "reward_rejected", r.metrics.reward_rejected);
      };
      const std::string& reduction = c.str("reduction");
      if (reduction != "mean" && reduction != "sum") throw std::runtime_error("unknown reduction " + reduction);
      if (reduction == "mean")
        check(pl::ipo(pl::masked_mean(p.xc, p.mc), pl::masked_mean(p.xr, p.mr), rc, rr, o));
      else
        check(pl::ipo(pl::masked_sum(p.xc, p.mc), pl::masked_sum(p.xr, p.mr), rc, rr, o));
    });
  }
}

TEST_CASE("golden: kto vs TRL kto_loss", "[golden][kto]") {
  for (const Case& c : load("kto")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto x = tok<T>(c.at("logp")), kx = tok<T>(c.at("kl_logp"));
      const auto m = mask(c.at("mask")), km = mask(c.at("kl_mask"));
      const auto ref = vec<T>(c.at("ref")), kr = vec<T>(c.at("kl_ref"));
      Vec<std::uint8_t> d(c.at("desirable").size());
      for (long i = 0; i < d.size(); ++i) d(i) = c.at("desirable").v[static_cast<std::size_t>(i)] != 0;
      pl::KtoOptions o;
      o.beta = c.num("beta");
      o.desirable_weight = c.num("desirable_weight");
      o.undesirable_weight = c.num("undesirable_weight");
      if (c.has("reference_point")) o.reference_point = c.num("reference_point");
      const auto r = pl::kto(pl::masked_sum(x, m), ref, d, pl::masked_sum(kx, km), kr, o);
      Tok<T> g(x.dimension(0), x.dimension(1));
      r.backward(g);
      compare(c, "loss", r.loss);
      compare(c, "losses", r.losses);
      compare_grad(c, "grad", g);
      compare(c, "z0", r.metrics.reference_point);
      CHECK(static_cast<double>(r.metrics.count_desirable) == c.num("count_desirable"));
      CHECK(static_cast<double>(r.metrics.count_undesirable) == c.num("count_undesirable"));
      // reward_*_sum = sum_i beta (sum_t m x_it - ref_i) over a group: its terms can cancel
      // (mixed: -1.9e-4 from rewards near 0.1), so its float error is relative to the terms.
      const auto terms = [&](bool want_desirable) {
        double t = 0;
        for (long i = 0; i < x.dimension(0); ++i) {
          if ((d(i) != 0) != want_desirable) continue;
          double row = std::fabs(static_cast<double>(ref(i)));
          for (long k = 0; k < x.dimension(1); ++k)
            if (m(i, k)) row += std::fabs(static_cast<double>(x(i, k)));
          t += std::fabs(o.beta) * row;
        }
        return t;
      };
      const T rd = r.metrics.reward_desirable_sum, ru = r.metrics.reward_undesirable_sum;
      compare<T>(c, "reward_desirable_sum", &rd, 1, c.at("reward_desirable_sum"), false, terms(true));
      compare<T>(c, "reward_undesirable_sum", &ru, 1, c.at("reward_undesirable_sum"), false, terms(false));
    });
  }
}

TEST_CASE("golden: bradley_terry vs TRL RewardTrainer, ranking vs InstructGPT", "[golden][bradley_terry]") {
  for (const Case& c : load("bradley_terry")) {
    for_types([&](auto z) {
      using T = decltype(z);
      pl::BradleyTerryOptions o;
      o.center_coef = c.num("center_coef");
      if (c.has("rewards")) {
        const auto rw = tok<T>(c.at("rewards"));
        const auto r = pl::bradley_terry_ranking(rw, o);
        Tok<T> g(rw.dimension(0), rw.dimension(1));
        r.backward(g);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad", g);
        return;
      }
      const auto rc = vec<T>(c.at("r_c")), rr = vec<T>(c.at("r_r")), mg = vec<T>(c.at("margin"));
      Vec<T> gc(rc.size()), gr(rr.size());
      const auto check = [&](const auto& r) {
        r.backward(gc, gr);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad_c", gc);
        compare_grad(c, "grad_r", gr);
        compare(c, "reward_accuracy", r.metrics.reward_accuracy);
      };
      if (c.num("use_margin") != 0)
        check(pl::bradley_terry(rc, rr, mg, o));
      else
        check(pl::bradley_terry(rc, rr, o));
    });
  }
}

TEST_CASE("golden: simpo vs TRL CPOTrainer loss_type=simpo", "[golden][simpo]") {
  for (const Case& c : load("simpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      pl::SimpoOptions o;
      o.beta = c.num("beta");
      o.gamma = c.num("gamma");
      o.label_smoothing = c.num("label_smoothing");
      p.check(c, pl::simpo(pl::masked_mean(p.xc, p.mc), pl::masked_mean(p.xr, p.mr), o));
    });
  }
}

TEST_CASE("golden: orpo vs TRL odds_ratio_loss", "[golden][orpo]") {
  for (const Case& c : load("orpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      pl::OrpoOptions o;
      o.beta = c.num("beta");
      o.nll_weight = c.num("nll_weight");
      const auto r = pl::orpo(pl::masked_mean(p.xc, p.mc), pl::masked_mean(p.xr, p.mr), o);
      p.check(c, r);
      compare(c, "log_odds_ratio", r.metrics.log_odds_ratio);
      compare(c, "log_odds_chosen", r.metrics.log_odds_chosen);
    });
  }
}

TEST_CASE("golden: nll vs torch masked means", "[golden][nll]") {
  for (const Case& c : load("nll")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto x = tok<T>(c.at("logp"));
      const auto m = mask(c.at("mask"));
      Tok<T> g(x.dimension(0), x.dimension(1));
      const auto check = [&](const auto& r) {
        r.backward(g);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad", g);
      };
      if (c.name == "sequence_mean") {
        check(pl::nll(pl::masked_mean(x, m)));
      } else {
        pl::NllOptions o;
        o.normalizer = c.num("token_count");
        check(pl::nll(pl::masked_sum(x, m), o));
      }
    });
  }
}

// ---- RL -----------------------------------------------------------------------------------------

TEST_CASE("golden: ppo_clip vs verl compute_policy_loss + agg_loss", "[golden][ppo]") {
  for (const Case& c : load("ppo_clip")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages")),
                 ref = tok<T>(c.at("ref_logp"));
      const auto m = mask(c.at("mask"));
      pl::PpoOptions o;
      o.clip_low = c.num("clip_low");
      o.clip_high = c.num("clip_high");
      o.dual_clip = c.num("dual_clip");
      o.aggregation = aggregation(c.str("aggregation"));
      const bool kl = c.str("kl_estimator") != "none";  // anything else must be an estimator name
      if (kl) {
        o.kl_estimator = estimator(c.str("kl_estimator"));
        o.kl_coef = c.num("kl_coef");
      }
      Tok<T> g(lp.dimension(0), lp.dimension(1)), gf(lp.dimension(0), lp.dimension(1));
      const auto check = [&](const auto& r, const auto& fused) {
        r.backward(g);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad", g);
        compare(c, "clip_fraction", r.metrics.clip_fraction);
        compare(c, "clip_fraction_low", r.metrics.clip_fraction_low);
        compare(c, "approx_kl", r.metrics.approx_kl);
        compare(c, "loss", fused.loss);  // the fused pass gives the same numbers
        compare_grad(c, "grad", gf);
      };
      if (kl)
        check(pl::ppo_clip(lp, old, adv, m, ref, o), pl::ppo_clip(lp, old, adv, m, ref, o, gf));
      else
        check(pl::ppo_clip(lp, old, adv, m, o), pl::ppo_clip(lp, old, adv, m, o, gf));
    });
  }
}

TEST_CASE("golden: value_loss vs verl compute_value_loss", "[golden][value]") {
  for (const Case& c : load("value_loss")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto v = tok<T>(c.at("values")), old = tok<T>(c.at("old_values")), ret = tok<T>(c.at("returns"));
      const auto m = mask(c.at("mask"));
      pl::ValueOptions o;
      o.clip = c.num("clip");
      o.aggregation = aggregation(c.str("aggregation"));
      const auto r = pl::value_loss(v, old, ret, m, o);
      Tok<T> g(v.dimension(0), v.dimension(1)), gf(v.dimension(0), v.dimension(1));
      r.backward(g);
      const auto fused = pl::value_loss(v, old, ret, m, o, gf);
      compare(c, "loss", r.loss);
      compare(c, "losses", r.losses);
      compare_grad(c, "grad", g);
      compare(c, "clip_fraction", r.metrics.clip_fraction);
      compare(c, "loss", fused.loss);
      compare_grad(c, "grad", gf);
    });
  }
}

TEST_CASE("golden: kl_estimate vs verl kl_penalty", "[golden][kl]") {
  for (const Case& c : load("kl")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), ref = tok<T>(c.at("ref_logp"));
      const auto m = mask(c.at("mask"));
      pl::KlOptions o;
      o.estimator = estimator(c.str("estimator"));
      Tok<T> out(lp.dimension(0), lp.dimension(1)), g(lp.dimension(0), lp.dimension(1));
      pl::kl_estimate(lp, ref, m, o, out, g);
      compare_grad(c, "out", out);
      compare_grad(c, "grad", g);
    });
  }
}

TEST_CASE("golden: gae vs verl compute_gae_advantage_return", "[golden][gae]") {
  for (const Case& c : load("gae")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto rw = tok<T>(c.at("rewards")), v = tok<T>(c.at("values"));
      const auto m = mask(c.at("mask"));
      pl::GaeOptions o;
      o.gamma = c.num("gamma");
      o.lam = c.num("lam");
      Tok<T> adv(rw.dimension(0), rw.dimension(1)), ret(rw.dimension(0), rw.dimension(1));
      pl::gae(rw, v, m, o, adv, ret);
      compare_grad(c, "advantages", adv);
      compare_grad(c, "returns", ret);
    });
  }
}

TEST_CASE("golden: masked_whiten vs verl_F.masked_whiten", "[golden][whiten]") {
  for (const Case& c : load("whiten")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto x = tok<T>(c.at("values"));
      const auto m = mask(c.at("mask"));
      pl::WhitenOptions o;
      o.shift_mean = c.num("shift_mean") != 0;
      Tok<T> out(x.dimension(0), x.dimension(1));
      pl::masked_whiten(x, m, out, o);
      compare_grad(c, "out", out);
    });
  }
}

TEST_CASE("golden: group_advantages vs verl compute_grpo_outcome_advantage", "[golden][grpo]") {
  for (const Case& c : load("group_advantages")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto s = vec<T>(c.at("scores"));
      pl::GroupOptions o;
      o.scale_by_std = c.num("scale_by_std") != 0;
      Vec<T> out(s.size());
      pl::group_advantages(s, static_cast<long>(c.num("group_size")), o, out);
      compare(c, "out", out);
    });
  }
}

TEST_CASE("golden: token_logprobs vs TRL selective_log_softmax, verl entropy_from_logits, autograd",
          "[golden][logprobs]") {
  for (const Case& c : load("logprobs")) {
    for_types([&](auto zero) {
      using T = decltype(zero);
      const Rec& zr = c.at("logits");
      REQUIRE(zr.dims.size() == 3);
      Eigen::Tensor<T, 3, Eigen::RowMajor> z(zr.dims[0], zr.dims[1], zr.dims[2]);
      for (long k = 0; k < zr.size(); ++k) z.data()[k] = static_cast<T>(zr.v[static_cast<std::size_t>(k)]);
      const auto yd = tok<double>(c.at("labels"));
      Tok<std::int64_t> y(yd.dimension(0), yd.dimension(1));
      for (long k = 0; k < y.size(); ++k) y.data()[k] = static_cast<std::int64_t>(yd.data()[k]);
      const auto m = mask(c.at("mask"));
      pl::LogprobOptions o;
      o.temperature = c.num("temperature");
      o.entropy = true;
      const auto r = pl::token_logprobs(z, y, m, o);
      compare<T>(c, "logp", r.logp.data(), r.logp.size(), c.at("logp"));
      compare<T>(c, "entropy", r.entropy.data(), r.entropy.size(), c.at("entropy"));
      const auto gl = tok<T>(c.at("grad_logp")), gh = tok<T>(c.at("grad_entropy"));
      Eigen::Tensor<T, 3, Eigen::RowMajor> g(z.dimension(0), z.dimension(1), z.dimension(2));
      r.backward(gl, gh, g);
      compare<T>(c, "grad", g.data(), g.size(), c.at("grad"), true);
    });
  }
}

TEST_CASE("golden: every data file is a family the suite compares", "[golden][coverage]") {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(PREFLOSS_TEST_DATA_DIR)) {
    const std::string f = e.path().filename().string();
    if (f.rfind("golden_", 0) == 0 && e.path().extension() == ".txt") files.push_back(f.substr(7, f.size() - 11));
  }
  std::sort(files.begin(), files.end());
  std::vector<std::string> known(std::begin(families), std::end(families));
  std::sort(known.begin(), known.end());
  CHECK(files == known);
}
