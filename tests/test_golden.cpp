// Golden suite: prefloss in float and double against PyTorch autograd of the anchors' formulas
// (TRL, verl; see tests/golden/make_golden.py for the provenance and the data format). Inputs
// are float32-exact, so both runs see the same numbers; masked-out tokens hold NaN / -inf.
//
// Each output tensor is compared norm-wise: max|got - want| / max|want| <= 1e-5 (float) or
// 1e-10 (double); gradients must also be exactly 0 wherever torch's are (masked-out, clipped or
// inactive tokens). The families from logits (logprobs_lowp, dpo_logits, ppo_logits) compare
// each value against a rounding-error bound derived from the arithmetic instead (see the comment
// above them). The largest deviations seen are printed when the run ends.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
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
const char* const families[] = {"advantages",
                                "bco",
                                "bradley_terry",
                                "cov_policy",
                                "cpo",
                                "dpo",
                                "dpo_logits",
                                "dpo_mixture",
                                "dpo_variants",
                                "gae",
                                "gmpo",
                                "group_advantages",
                                "ipo",
                                "kl",
                                "kto",
                                "ld_dpo",
                                "logprobs",
                                "logprobs_lowp",
                                "nll",
                                "orpo",
                                "policy_losses",
                                "ppo_clip",
                                "ppo_logits",
                                "presets",
                                "rollout_correction",
                                "simpo",
                                "value_loss",
                                "whiten"};

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

/// Mean over examples of |beta| (sum_t m |x_it| + |ref_i|): the magnitude of the terms of the batch
/// mean of beta (sum_t m x_it - ref_i), which scales its float rounding when the rewards cancel.
/// A reference-free loss ignores `ref`: pass `with_ref` false.
template <class T>
double reward_terms(const Tok<T>& x, const Tok<std::uint8_t>& m, const Vec<T>& ref, double beta, bool with_ref) {
  double t = 0;
  for (long i = 0; i < x.dimension(0); ++i) {
    double row = with_ref ? std::fabs(static_cast<double>(ref(i))) : 0.0;
    for (long k = 0; k < x.dimension(1); ++k)
      if (m(i, k)) row += std::fabs(static_cast<double>(x(i, k)));
    t += std::fabs(beta) * row;
  }
  return x.dimension(0) > 0 ? t / static_cast<double>(x.dimension(0)) : 0;
}

/// TRL's rewards/{chosen,rejected,margins,accuracies} of a pairwise loss against the golden record.
/// `tc`, `tr`: reward_terms of the chosen and rejected rewards (0: judged against the value alone).
template <class M>
void compare_rewards(const Case& c, const M& m, double tc = 0, double tr = 0) {
  using S = decltype(m.reward_chosen);
  const auto one = [&](const char* label, S got, double terms) {
    compare<S>(c, label, &got, 1, c.at(label), false, terms);
  };
  one("reward_chosen", m.reward_chosen, tc);
  one("reward_rejected", m.reward_rejected, tr);
  one("reward_margin", m.reward_margin, tc + tr);
  compare(c, "reward_accuracy", m.reward_accuracy);
}

/// compare_rewards for a DPO-family loss on masked sums: rewards beta (sum_t m x - ref).
template <class T, class M>
void compare_dpo_rewards(const Case& c, const M& m, const PairTokens<T>& p, const Vec<T>& rc, const Vec<T>& rr,
                         const pl::DpoOptions& o) {
  const bool with_ref = !o.reference_free;
  compare_rewards(c, m, reward_terms(p.xc, p.mc, rc, o.beta, with_ref), reward_terms(p.xr, p.mr, rr, o.beta, with_ref));
}

pl::Aggregation aggregation(const std::string& s) {
  if (s == "token_mean") return pl::Aggregation::token_mean;
  if (s == "seq_mean_token_sum") return pl::Aggregation::seq_mean_token_sum;
  if (s == "seq_mean_token_mean") return pl::Aggregation::seq_mean_token_mean;
  if (s == "seq_mean_token_sum_norm") return pl::Aggregation::seq_mean_token_sum_norm;
  if (s == "token_sum") return pl::Aggregation::token_sum;
  throw std::runtime_error("unknown aggregation " + s);
}

pl::DpoVariant dpo_variant(const std::string& s) {
  if (s == "sigmoid") return pl::DpoVariant::sigmoid;
  if (s == "robust") return pl::DpoVariant::robust;
  if (s == "hinge") return pl::DpoVariant::hinge;
  if (s == "exo_pair") return pl::DpoVariant::exo_pair;
  if (s == "nca_pair") return pl::DpoVariant::nca_pair;
  if (s == "bco_pair") return pl::DpoVariant::bco_pair;
  if (s == "sppo_hard") return pl::DpoVariant::sppo_hard;
  if (s == "apo_zero") return pl::DpoVariant::apo_zero;
  if (s == "apo_down") return pl::DpoVariant::apo_down;
  if (s == "discopop") return pl::DpoVariant::discopop;
  if (s == "aot") return pl::DpoVariant::aot;
  if (s == "aot_unpaired") return pl::DpoVariant::aot_unpaired;
  throw std::runtime_error("unknown dpo variant " + s);
}

pl::FDivergence divergence(const std::string& s) {
  if (s == "reverse_kl") return pl::FDivergence::reverse_kl;
  if (s == "forward_kl") return pl::FDivergence::forward_kl;
  if (s == "js_divergence") return pl::FDivergence::js_divergence;
  if (s == "alpha_divergence") return pl::FDivergence::alpha_divergence;
  throw std::runtime_error("unknown divergence " + s);
}

pl::KlEstimator estimator(const std::string& s) {
  if (s == "k1") return pl::KlEstimator::k1;
  if (s == "k2") return pl::KlEstimator::k2;
  if (s == "k3") return pl::KlEstimator::k3;
  if (s == "abs") return pl::KlEstimator::abs;
  if (s == "k1+") return pl::KlEstimator::k1_plus;
  if (s == "abs+") return pl::KlEstimator::abs_plus;
  if (s == "k3+") return pl::KlEstimator::k3_plus;
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
      compare_dpo_rewards(c, r.metrics, p, rc, rr, o);
    });
  }
}

TEST_CASE("golden: every dpo variant and f-divergence vs TRL DPOTrainer._compute_loss", "[golden][dpo]") {
  for (const Case& c : load("dpo_variants")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
      pl::DpoOptions o;
      o.variant = dpo_variant(c.str("variant"));
      o.divergence = divergence(c.str("divergence"));
      o.beta = c.num("beta");
      o.label_smoothing = c.num("label_smoothing");
      o.alpha = c.num("alpha");
      o.alpha_clamp = c.num("alpha_clamp");
      o.discopop_tau = c.num("discopop_tau");
      o.bco_delta = c.num("bco_delta");
      o.reference_free = c.num("reference_free") != 0;
      const auto r = pl::dpo(pl::masked_sum(p.xc, p.mc), pl::masked_sum(p.xr, p.mr), rc, rr, o);
      p.check(c, r);
      compare_dpo_rewards(c, r.metrics, p, rc, rr, o);
    });
  }
}

TEST_CASE("golden: ld_dpo_weights + dpo vs TRL _compute_loss with ld_alpha", "[golden][dpo]") {
  for (const Case& c : load("ld_dpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      const Tok<T> yc = tok<T>(c.at("ref_logp_c")), yr = tok<T>(c.at("ref_logp_r"));
      Tok<T> wc(p.mc.dimension(0), p.mc.dimension(1)), wr(p.mr.dimension(0), p.mr.dimension(1));
      pl::ld_dpo_weights(p.mc, p.mr, c.num("ld_alpha"), wc, wr);
      pl::DpoOptions o;
      o.beta = c.num("beta");
      const auto r = pl::dpo(pl::masked_sum(p.xc, wc), pl::masked_sum(p.xr, wr), pl::masked_sum(yc, wc),
                             pl::masked_sum(yr, wr), o);
      p.check(c, r);
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

TEST_CASE("golden: bco vs TRL bco_loss with RunningMoments.update", "[golden][bco]") {
  for (const Case& c : load("bco")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto x = tok<T>(c.at("logp"));
      const auto m = mask(c.at("mask"));
      const auto ref = vec<T>(c.at("ref"));
      Vec<std::uint8_t> d(c.at("desirable").size());
      for (long i = 0; i < d.size(); ++i) d(i) = c.at("desirable").v[static_cast<std::size_t>(i)] != 0;
      pl::BcoOptions o;
      o.beta = c.num("beta");
      if (c.has("weights")) o.example_weights = c.at("weights").v;
      // TRL's order: update the running moments with this batch's rewards, then the loss with
      // delta = the updated mean.
      const auto policy = pl::masked_sum(x, m);
      const Vec<double> rewards = pl::bco_rewards(policy, ref, o);
      pl::RunningMoments running(c.num("prior_mean"), c.num("prior_var"), c.num("prior_std"), c.num("prior_count"));
      const auto stats = running.update(rewards);
      compare(c, "rewards", Vec<T>(rewards.cast<T>()));
      compare(c, "batch_mean", static_cast<T>(stats.mean));
      compare(c, "batch_std", static_cast<T>(stats.std));
      compare(c, "delta", static_cast<T>(running.mean()));
      compare(c, "running_var", static_cast<T>(running.var()));
      compare(c, "running_std", static_cast<T>(running.std()));
      CHECK(running.count() == c.num("running_count"));
      o.delta = running.mean();
      const auto r = pl::bco(policy, ref, d, o);
      Tok<T> g(x.dimension(0), x.dimension(1));
      r.backward(g);
      compare(c, "loss", r.loss);
      compare(c, "losses", r.losses);
      compare_grad(c, "grad", g);
      compare(c, "delta", r.metrics.delta);
      CHECK(static_cast<double>(r.metrics.count_desirable) == c.num("count_desirable"));
      CHECK(static_cast<double>(r.metrics.count_undesirable) == c.num("count_undesirable"));
      // Sums over a class of terms that can cancel: their float error is relative to the terms
      // (as kto's reward sums).
      const auto terms = [&](bool want_desirable, double scale) {
        double t = 0;
        for (long i = 0; i < x.dimension(0); ++i) {
          if ((d(i) != 0) != want_desirable) continue;
          double row = scale * std::fabs(static_cast<double>(ref(i)));
          for (long k = 0; k < x.dimension(1); ++k)
            if (m(i, k)) row += std::fabs(static_cast<double>(x(i, k)));
          t += (scale > 0 ? o.beta : 1.0) * row;
        }
        return t;
      };
      const T rd = r.metrics.reward_desirable_sum, ru = r.metrics.reward_undesirable_sum;
      const T ld = r.metrics.logps_desirable_sum, lu = r.metrics.logps_undesirable_sum;
      compare<T>(c, "reward_desirable_sum", &rd, 1, c.at("reward_desirable_sum"), false, terms(true, 1));
      compare<T>(c, "reward_undesirable_sum", &ru, 1, c.at("reward_undesirable_sum"), false, terms(false, 1));
      compare<T>(c, "logps_desirable_sum", &ld, 1, c.at("logps_desirable_sum"), false, terms(true, 0));
      compare<T>(c, "logps_undesirable_sum", &lu, 1, c.at("logps_undesirable_sum"), false, terms(false, 0));
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

TEST_CASE("golden: cpo vs TRL CPOTrainer.cpo_loss (AlphaPO alpha)", "[golden][cpo]") {
  for (const Case& c : load("cpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      pl::CpoOptions o;
      const std::string& v = c.str("variant");
      o.variant = v == "sigmoid" ? pl::CpoVariant::sigmoid
                  : v == "hinge" ? pl::CpoVariant::hinge
                  : v == "ipo"   ? pl::CpoVariant::ipo
                                 : pl::CpoVariant::simpo;
      REQUIRE((v == "sigmoid" || v == "hinge" || v == "ipo" || v == "simpo"));
      o.beta = c.num("beta");
      o.label_smoothing = c.num("label_smoothing");
      o.simpo_gamma = c.num("simpo_gamma");
      o.alpha = c.num("alpha");
      const auto check = [&](const auto& r) {
        p.check(c, r);
        compare_rewards(c, r.metrics);
      };
      if (c.str("reduce") == "mean")
        check(pl::cpo(pl::masked_mean(p.xc, p.mc), pl::masked_mean(p.xr, p.mr), o));
      else
        check(pl::cpo(pl::masked_sum(p.xc, p.mc), pl::masked_sum(p.xr, p.mr), o));
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

TEST_CASE("golden: ppo_clip vs verl compute_policy_loss(_gspo) + agg_loss and TRL GRPO loss types", "[golden][ppo]") {
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
      // GSPO and TRL's loss types (absent from the verl cases: their defaults)
      if (c.s.count("importance_level")) {
        const std::string& level = c.str("importance_level");
        REQUIRE((level == "token" || level == "sequence"));
        o.importance_level = level == "sequence" ? pl::ImportanceLevel::sequence : pl::ImportanceLevel::token;
      }
      if (c.has("log_ratio_clamp"))
        o.log_ratio_clamp = c.num("log_ratio_clamp");
      else if (c.s.count("log_ratio_clamp") && c.str("log_ratio_clamp") == "none")
        o.log_ratio_clamp = std::nullopt;
      if (c.has("delta")) o.delta = c.num("delta");
      if (c.has("bias_corrected_kl")) o.bias_corrected_kl = c.num("bias_corrected_kl") != 0;
      if (c.has("token_count")) o.token_count = c.num("token_count");
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

TEST_CASE("golden: gmpo vs verl compute_policy_loss_geo_mean", "[golden][gmpo]") {
  for (const Case& c : load("gmpo")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages"));
      const auto m = mask(c.at("mask"));
      pl::GmpoOptions o;
      o.clip_low = c.num("clip_low");
      o.clip_high = c.num("clip_high");
      Tok<T> g(lp.dimension(0), lp.dimension(1)), gf(lp.dimension(0), lp.dimension(1));
      const auto r = pl::gmpo(lp, old, adv, m, o);
      r.backward(g);
      const auto fused = pl::gmpo(lp, old, adv, m, o, gf);
      compare(c, "loss", r.loss);
      compare(c, "losses", r.losses);
      compare_grad(c, "grad", g);
      compare(c, "clip_fraction", r.metrics.clip_fraction);
      compare(c, "clip_fraction_low", r.metrics.clip_fraction_low);
      compare(c, "approx_kl", r.metrics.approx_kl);
      compare(c, "loss", fused.loss);
      compare_grad(c, "grad", gf);
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

TEST_CASE("golden: cispo, sapo, gpg vs verl compute_policy_loss_cispo/_sapo/_gpg and TRL GRPO cispo/sapo",
          "[golden][policy]") {
  for (const Case& c : load("policy_losses")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages"));
      const auto m = mask(c.at("mask"));
      const std::string& loss = c.str("loss");
      REQUIRE((loss == "cispo" || loss == "sapo" || loss == "gpg"));
      // verl's cases record its clamp at 20, TRL's "none"; gpg has no ratio.
      const auto clamp_of = [&]() -> std::optional<double> {
        if (c.has("log_ratio_clamp")) return c.num("log_ratio_clamp");
        REQUIRE(c.str("log_ratio_clamp") == "none");
        return std::nullopt;
      };
      Tok<T> g(lp.dimension(0), lp.dimension(1)), gf(lp.dimension(0), lp.dimension(1));
      const auto check = [&](const auto& r, const auto& fused) {
        r.backward(g);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad", g);
        compare(c, "approx_kl", r.metrics.approx_kl);
        compare(c, "loss", fused.loss);  // the fused pass gives the same numbers
        compare(c, "losses", fused.losses);
        compare_grad(c, "grad", gf);
      };
      if (loss == "cispo") {
        pl::CispoOptions o;
        o.aggregation = aggregation(c.str("aggregation"));
        o.clip_low = c.num("clip_low");
        o.clip_high = c.num("clip_high");
        o.log_ratio_clamp = clamp_of();
        if (c.has("token_count")) o.token_count = c.num("token_count");
        const auto r = pl::cispo(lp, old, adv, m, o);
        check(r, pl::cispo(lp, old, adv, m, o, gf));
        compare(c, "clip_fraction", r.metrics.clip_fraction);
        compare(c, "clip_fraction_high", r.metrics.clip_fraction_high);
        compare(c, "ratio_mean", r.metrics.ratio_mean);
        compare(c, "ratio_max", r.metrics.ratio_max);
      } else if (loss == "sapo") {
        pl::SapoOptions o;
        o.aggregation = aggregation(c.str("aggregation"));
        o.tau_pos = c.num("tau_pos");
        o.tau_neg = c.num("tau_neg");
        o.log_ratio_clamp = clamp_of();
        const auto r = pl::sapo(lp, old, adv, m, o);
        check(r, pl::sapo(lp, old, adv, m, o, gf));
        compare(c, "ratio_mean", r.metrics.ratio_mean);
        compare(c, "ratio_max", r.metrics.ratio_max);
      } else {
        pl::GpgOptions o;
        o.aggregation = aggregation(c.str("aggregation"));
        check(pl::gpg(lp, old, adv, m, o), pl::gpg(lp, old, adv, m, o, gf));
      }
    });
  }
}

TEST_CASE("golden: clip_cov, kl_cov and their selections vs verl compute_policy_loss_clip_cov / _kl_cov",
          "[golden][policy]") {
  for (const Case& c : load("cov_policy")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages"));
      const auto verl_sel = tok<T>(c.at("selected"));
      const auto m = mask(c.at("mask"));
      const long B = lp.dimension(0), N = lp.dimension(1);
      Tok<T> g(B, N), gf(B, N), ours(B, N);
      const auto check = [&](const auto& r, const auto& fused) {
        r.backward(g);
        compare(c, "loss", r.loss);
        compare(c, "losses", r.losses);
        compare_grad(c, "grad", g);
        compare(c, "selected_fraction", r.metrics.selected_fraction);
        compare(c, "approx_kl", r.metrics.approx_kl);
        compare(c, "loss", fused.loss);
        compare_grad(c, "grad", gf);
      };
      if (c.str("loss") == "clip_cov") {
        pl::ClipCovOptions o;
        o.aggregation = aggregation(c.str("aggregation"));
        o.clip_low = c.num("clip_low");
        o.clip_high = c.num("clip_high");
        o.cov_ratio = c.num("cov_ratio");
        o.cov_lower = c.num("cov_lower");
        o.cov_upper = c.num("cov_upper");
        const auto r = pl::clip_cov(lp, old, adv, m, verl_sel, o);
        check(r, pl::clip_cov(lp, old, adv, m, verl_sel, o, gf));
        compare(c, "clip_fraction", r.metrics.clip_fraction);
        // The random pick differs from torch.randperm's; the candidate set and the count may not.
        const Rec& cand = c.at("candidates");
        for (std::uint64_t seed : {0ull, 7ull, 12345ull}) {
          o.seed = seed;
          const pl::CovSelection s = pl::clip_cov_select(lp, old, adv, m, o, ours);
          CHECK(s.candidates == c.num("n_candidates"));
          CHECK(s.target == c.num("target"));
          CHECK(s.selected == std::min(c.num("target"), c.num("n_candidates")));
          double picked = 0;
          for (long k = 0; k < B * N; ++k) {
            const double v = static_cast<double>(ours.data()[k]);
            INFO(c.name << " seed " << seed << " token " << k);
            CHECK((v == 0.0 || (v == 1.0 && cand.v[static_cast<std::size_t>(k)] == 1.0)));
            if (s.target >= s.candidates) CHECK(v == cand.v[static_cast<std::size_t>(k)]);
            picked += v;
          }
          CHECK(picked == s.selected);
        }
      } else {
        REQUIRE(c.str("loss") == "kl_cov");
        pl::KlCovOptions o;
        o.aggregation = aggregation(c.str("aggregation"));
        o.cov_ratio = c.num("cov_ratio");
        o.kl_coef = c.num("kl_coef");
        const pl::CovSelection s = pl::kl_cov_select(lp, adv, m, o, ours);
        for (long k = 0; k < B * N; ++k) {
          INFO(c.name << " token " << k);
          CHECK(static_cast<double>(ours.data()[k]) == static_cast<double>(verl_sel.data()[k]));
        }
        CHECK(s.selected == std::max(1.0, std::floor(o.cov_ratio * s.valid_tokens)));
        const auto r = pl::kl_cov(lp, old, adv, m, ours, o);
        check(r, pl::kl_cov(lp, old, adv, m, ours, o, gf));
        compare(c, "abs_kl", r.metrics.abs_kl);
      }
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

TEST_CASE("golden: rollout_is_weights vs verl rollout_corr_helper and TRL vllm_importance_sampling",
          "[golden][rollout_correction]") {
  const std::map<std::string, pl::RolloutIsLevel> levels = {{"none", pl::RolloutIsLevel::none},
                                                            {"token", pl::RolloutIsLevel::token},
                                                            {"sequence", pl::RolloutIsLevel::sequence}};
  const std::map<std::string, pl::RolloutRs> rs = {{"none", pl::RolloutRs::none},
                                                   {"token_k1", pl::RolloutRs::token_k1},
                                                   {"token_k2", pl::RolloutRs::token_k2},
                                                   {"token_k3", pl::RolloutRs::token_k3},
                                                   {"seq_sum_k1", pl::RolloutRs::seq_sum_k1},
                                                   {"seq_sum_k2", pl::RolloutRs::seq_sum_k2},
                                                   {"seq_sum_k3", pl::RolloutRs::seq_sum_k3},
                                                   {"seq_mean_k1", pl::RolloutRs::seq_mean_k1},
                                                   {"seq_mean_k2", pl::RolloutRs::seq_mean_k2},
                                                   {"seq_mean_k3", pl::RolloutRs::seq_mean_k3},
                                                   {"seq_max_k2", pl::RolloutRs::seq_max_k2},
                                                   {"seq_max_k3", pl::RolloutRs::seq_max_k3}};
  for (const Case& c : load("rollout_correction")) {
    if (c.str("anchor") == "openrlhf") continue;  // compared in the next test case
    for_types([&](auto z) {
      using T = decltype(z);
      const auto old = tok<T>(c.at("old_logp")), roll = tok<T>(c.at("rollout_logp"));
      const auto m = mask(c.at("mask"));
      pl::RolloutIsOptions o;
      o.level = levels.at(c.str("level"));
      o.bound = c.str("bound") == "mask" ? pl::RolloutIsBound::mask : pl::RolloutIsBound::truncate;
      o.upper = c.num("upper");
      o.lower = c.num("lower");
      o.batch_normalize = c.num("batch_normalize") != 0;
      o.log_ratio_clamp = std::nullopt;
      if (c.str("log_ratio_clamp") != "none")
        o.log_ratio_clamp = std::strtod(c.str("log_ratio_clamp").c_str(), nullptr);
      o.rs = rs.at(c.str("rs"));
      if (c.has("rs_upper")) o.rs_upper = c.num("rs_upper");
      if (c.has("rs_lower")) o.rs_lower = c.num("rs_lower");
      Tok<T> w(old.dimension(0), old.dimension(1)), keep(old.dimension(0), old.dimension(1));
      const pl::RolloutIsMetrics r = pl::rollout_is_weights(old, roll, m, o, w, keep);
      compare_grad(c, "weights", w);
      compare_grad(c, "keep", keep);
      // Metrics are double whatever T; the inputs are the same float32-exact values in both runs.
      const std::pair<const char*, double> metrics[] = {{"weight_mean", r.weight_mean},
                                                        {"weight_max", r.weight_max},
                                                        {"weight_min", r.weight_min},
                                                        {"ratio_mean", r.ratio_mean},
                                                        {"ratio_max", r.ratio_max},
                                                        {"truncated_fraction", r.truncated_fraction},
                                                        {"masked_fraction", r.masked_fraction},
                                                        {"rs_masked_fraction", r.rs_masked_fraction},
                                                        {"rs_seq_masked_fraction", r.rs_seq_masked_fraction},
                                                        {"batch_norm_factor", r.batch_norm_factor},
                                                        {"valid_tokens", r.valid_tokens},
                                                        {"kept_tokens", r.kept_tokens},
                                                        {"kept_rows", r.kept_rows},
                                                        {"rollout_kl", r.rollout_kl}};
      for (const auto& [label, got] : metrics) compare<T>(c, label, &got, 1, c.at(label));
    });
  }
}

TEST_CASE("golden: rollout_is_weights + ppo_clip vs OpenRLHF PolicyLoss with vllm IS correction",
          "[golden][rollout_correction][openrlhf]") {
  int cases = 0;
  for (const Case& c : load("rollout_correction")) {
    if (c.str("anchor") != "openrlhf") continue;
    ++cases;
    for_types([&](auto z) {
      using T = decltype(z);
      const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), roll = tok<T>(c.at("rollout_logp")),
                 adv = tok<T>(c.at("advantages"));
      const auto m = mask(c.at("mask"));
      // The mapping documented at RolloutIsOptions, from OpenRLHF's vllm_is_correction_type and
      // vllm_is_truncated_threshold = [low, high].
      const std::string& type = c.str("correction_type");
      REQUIRE((type == "tis" || type == "icepop" || type == "seq-mask-tis"));
      const double low = c.num("low"), high = c.num("high");
      pl::RolloutIsOptions o;
      o.level = pl::RolloutIsLevel::token;
      o.log_ratio_clamp = std::nullopt;
      o.bound = type == "icepop" ? pl::RolloutIsBound::mask : pl::RolloutIsBound::truncate;
      o.lower = type == "seq-mask-tis" ? 0.0 : low;
      o.upper = type == "seq-mask-tis" ? std::numeric_limits<double>::infinity() : high;
      if (type == "seq-mask-tis") {
        o.rs = pl::RolloutRs::seq_mean_k1;
        o.rs_lower = 1.0 / high;
        o.rs_upper = 1.0 / low;
      }
      Tok<T> w(old.dimension(0), old.dimension(1)), keep(old.dimension(0), old.dimension(1));
      const pl::RolloutIsMetrics r = pl::rollout_is_weights(old, roll, m, o, w, keep);
      compare_grad(c, "weights", w);
      compare_grad(c, "keep", keep);
      compare<T>(c, "vllm_kl", &r.rollout_kl, 1, c.at("vllm_kl"));
      compare<T>(c, "valid_tokens", &r.valid_tokens, 1, c.at("valid_tokens"));
      // OpenRLHF's aggregate_loss divides by the original action_mask, not the kept tokens.
      pl::PpoOptions po;
      po.clip_low = c.num("clip_eps_low");
      po.clip_high = c.num("clip_eps_high");
      po.dual_clip = c.num("dual_clip");
      const double dp = c.num("dp_size");
      if (c.num("token_level_loss") != 0) {
        po.aggregation = pl::Aggregation::token_mean;
        po.token_count = c.num("batch_num_tokens") > 0 ? c.num("batch_num_tokens") / dp : r.valid_tokens;
      } else {
        po.aggregation = pl::Aggregation::seq_mean_token_mean;
        const Vec<double> rw = pl::row_weights(m);
        po.row_weights.assign(rw.data(), rw.data() + rw.size());
        po.sequence_count = c.num("global_batch_size") > 0 ? c.num("global_batch_size") / dp
                                                           : static_cast<double>(pl::token_counts(m).nonempty_rows);
      }
      Tok<T> g(lp.dimension(0), lp.dimension(1));
      const auto res = pl::ppo_clip(lp, old, adv, w, po, g);
      compare(c, "loss", res.loss);
      compare_grad(c, "grad", g);
    });
  }
  CHECK(cases == 7);
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

TEST_CASE("golden: conformance presets vs verl, TRL, OpenRLHF and torchtune as written", "[golden][presets]") {
  for (const Case& c : load("presets")) {
    const std::string& preset = c.str("preset");
    for_types([&](auto z) {
      using T = decltype(z);
      if (preset == "verl_ppo" || preset == "trl_grpo" || preset == "openrlhf_ppo") {
        const auto lp = tok<T>(c.at("logp")), old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages"));
        const auto m = mask(c.at("mask"));
        pl::PpoOptions o = preset == "verl_ppo"   ? pl::preset::verl::ppo()
                           : preset == "trl_grpo" ? pl::preset::trl::grpo()
                                                  : pl::preset::openrlhf::ppo();
        o.clip_low = c.num("clip_low");
        o.clip_high = c.num("clip_high");
        if (c.s.count("aggregation")) o.aggregation = aggregation(c.str("aggregation"));
        Tok<T> g(lp.dimension(0), lp.dimension(1)), gf(lp.dimension(0), lp.dimension(1));
        const auto check = [&](const auto& r, const auto& fused) {
          r.backward(g);
          compare(c, "loss", r.loss);
          compare(c, "losses", r.losses);
          compare_grad(c, "grad", g);
          compare(c, "loss", fused.loss);
          compare_grad(c, "grad", gf);
          if (preset == "verl_ppo") {
            const auto vm = pl::preset::verl::metrics(r.metric_sums);
            compare(c, "clip_fraction", vm.clip_fraction);
            compare(c, "clip_fraction_low", vm.clip_fraction_low);
            compare(c, "approx_kl", vm.approx_kl);
          } else if (preset == "trl_grpo") {
            compare(c, "clip_fraction", r.metrics.clip_fraction);  // TRL's region_mean
          }
        };
        if (preset == "trl_grpo") {
          const auto ref = tok<T>(c.at("ref_logp"));
          o.kl_coef = c.num("kl_coef");
          check(pl::ppo_clip(lp, old, adv, m, ref, o), pl::ppo_clip(lp, old, adv, m, ref, o, gf));
        } else {
          check(pl::ppo_clip(lp, old, adv, m, o), pl::ppo_clip(lp, old, adv, m, o, gf));
        }
      } else if (preset == "trl_dpo") {
        const PairTokens<T> p(c);
        const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
        pl::DpoOptions o = pl::preset::trl::dpo();
        o.beta = c.num("beta");
        o.label_smoothing = c.num("label_smoothing");
        const auto pc = pl::masked_sum(p.xc, p.mc), pr = pl::masked_sum(p.xr, p.mr);
        const std::string& terms = c.str("terms");
        if (terms == "sigmoid") {
          p.check(c, pl::dpo(pc, pr, rc, rr, o));
        } else {
          REQUIRE(terms == "sigmoid,robust");
          const Rec& tw = c.at("term_weights");
          const std::vector<pl::DpoTerm> mix = {{pl::DpoVariant::sigmoid, tw.v.at(0)},
                                                {pl::DpoVariant::robust, tw.v.at(1)}};
          p.check(c, pl::dpo_mixture(pc, pr, rc, rr, mix, o));
        }
      } else if (preset == "verl_grpo" || preset == "openrlhf_group_norm") {
        const auto s = vec<T>(c.at("scores"));
        const pl::GroupOptions o =
            preset == "verl_grpo" ? pl::preset::verl::grpo() : pl::preset::openrlhf::group_norm();
        Vec<T> out(s.size());
        pl::group_advantages(s, static_cast<long>(c.num("group_size")), o, out);
        compare(c, "out", out);
      } else {
        const auto x = tok<T>(c.at("values"));
        const auto m = mask(c.at("mask"));
        const pl::WhitenOptions o = preset == "verl_whiten"        ? pl::preset::verl::whiten()
                                    : preset == "torchtune_whiten" ? pl::preset::torchtune::whiten()
                                                                   : pl::preset::openrlhf::whiten();
        REQUIRE((preset == "verl_whiten" || preset == "torchtune_whiten" || preset == "openrlhf_whiten"));
        Tok<T> out(x.dimension(0), x.dimension(1));
        pl::masked_whiten(x, m, out, o);
        compare_grad(c, "out", out);
      }
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

// ---- token log-probs of 16-bit logits, and losses straight from logits ---------------------------
//
// These families compare against a rounding-error bound computed for each value from the data,
// not a fixed norm-wise tolerance: the chain logits -> log-probs -> loss -> gradient amplifies a
// log-prob's rounding by the loss's derivatives, which the bound follows.
//
// The token_logprobs bound, per selected token with C the compute type (float for float and
// 16-bit logits), u = eps<C> / 2, U = max_v |z_v / tau| over the finite logits of the row, and
// K = 4 + (the vocabulary sum's relative error / u): 7 for float lanes widened into double every
// 8 adds, ceil(V / W) + W for double lanes (W lanes); each exp within 2 ulp (4u):
//   - u_v = z_v * fl(1 / tau) is within 2u |u_v| <= 2uU of z_v / tau; logp = u_y - lse(u) and
//     lse is 1-Lipschitz in the max-norm, so the inputs move logp by <= 4uU;
//   - every exp(u_v - m) is within (|u_v - m| + 4) u relative, and E_p[m - u] <= H <= log V, so
//     the sum S is within (log V + K) u relative and its log within that absolutely;
//   so  |d logp| <= u (4U + log V + K + |logp|)  (the last term: the result rounded to C);
//   - H = lse(u) - E_p[u]: sum_v |dH / du_v| = sum_v p_v |log p_v + H| <= 2H, the inputs move H
//     by <= 4uUH; the terms e_v d_v of E_p[d] carry (2U + 5) u relative, their sum K u more;
//   so  |d H| <= u ((6U + log V + 2K + 1) H + log V + K);
//   - a gradient entry is k (g_lp (1[v = y] - p_v) - g_h p_v (lp_v + H)), lp_v = (u_v - m) - ls
//     in C: |d lp_v| <= a + u |lp_v|, a = u (6U + 2 log V + K + 1); with p |lp| <= 1/e and
//     p lp^2 <= 4/e^2, |d p_v| <= a + 5u and |d p_v (lp_v + H)| <= a (1.4 + H) + u (3 + 5H) + |dH|,
//     and the products and k round 3u of the entry. The label entry (in double, -expm1(logp))
//     is within |d logp| <= a.
// A 16-bit gradient adds its rounding to nearest: 2^-8 |g| (bf16), 2^-11 |g| + 2^-25 (half,
// the subnormal spacing 2^-24). The float64 reference obeys the same bound with u = 2^-53 and
// K = 4 + V (a sequential sum, the worst torch may do); it is added, which matters for the
// double runs only. The precondition U <= 16 (|z| <= 10 in the data, tau >= 0.7) is checked.

namespace {

template <class T>
using Logits = Eigen::Tensor<T, 3, Eigen::RowMajor>;

template <class T>
Logits<T> logits(const Rec& r) {
  REQUIRE(r.dims.size() == 3);
  Logits<T> z(r.dims[0], r.dims[1], r.dims[2]);
  // The data's values are exact in float (and in bf16 / half for those cases, which take a float).
  using In = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (long k = 0; k < r.size(); ++k) z.data()[k] = static_cast<T>(static_cast<In>(r.v[static_cast<std::size_t>(k)]));
  return z;
}

Tok<std::int64_t> labels(const Rec& r) {
  const auto yd = tok<double>(r);
  Tok<std::int64_t> y(yd.dimension(0), yd.dimension(1));
  for (long k = 0; k < y.size(); ++k) y.data()[k] = static_cast<std::int64_t>(yd.data()[k]);
  return y;
}

/// The token_logprobs bound's ingredients for one arithmetic (see above).
struct Arith {
  double u;  ///< unit roundoff
  double K;  ///< 4 + the vocabulary sum's relative error in units of u
};
template <class C>
Arith prefloss_arith(long V) {
  constexpr auto W = static_cast<long>(pl::detail::lanes<C>);
  if constexpr (std::is_same_v<C, float>)
    return {0.5 * std::numeric_limits<float>::epsilon(), 4 + 7};
  else
    return {0.5 * std::numeric_limits<double>::epsilon(), 4 + static_cast<double>((V + W - 1) / W + W)};
}
Arith torch_arith(long V) { return {0.5 * std::numeric_limits<double>::epsilon(), 4 + static_cast<double>(V)}; }

/// Per-token error bounds of token_logprobs against the float64 reference (see above).
struct TokenBound {
  double logp = 0, entropy = 0;
  double a = 0, u = 0;  ///< the gradient's p_v terms: |d p_v| <= a + 5u
  double H = 0;
  /// |d (d / dz_v)| for upstream g_lp, g_h (before the 16-bit rounding), relative to the entry
  /// magnitude `mag` for the products' rounding; k = 1 / tau.
  double grad(double g_lp, double g_h, double k, double mag) const {
    return k * (std::fabs(g_lp) * (a + 5 * u) + std::fabs(g_h) * (a * (1.4 + H) + u * (3 + 5 * H) + entropy)) +
           3 * u * mag;
  }
};

TokenBound token_bound(const Arith& ar, double U, long V, double logp, double H) {
  const double lv = std::log(static_cast<double>(V)), u = ar.u, K = ar.K;
  TokenBound b;
  b.logp = u * (4 * U + lv + K + std::fabs(logp));
  b.entropy = u * ((6 * U + lv + 2 * K + 1) * H + lv + K);
  b.a = u * (6 * U + 2 * lv + K + 1);
  b.u = u;
  b.H = H;
  return b;
}
TokenBound operator+(TokenBound x, const TokenBound& y) {
  x.logp += y.logp;
  x.entropy += y.entropy;
  x.a += y.a;
  x.u += y.u;
  return x;
}

/// token_bound for every token of a [B, T, V] case: prefloss's arithmetic C plus the float64
/// reference's, from the golden logp and entropy; zero bounds at masked-out tokens.
template <class C>
std::vector<TokenBound> token_bounds(const Rec& z, const Tok<std::uint8_t>& m, double tau, const Rec& logp,
                                     const Rec* entropy) {
  const long V = z.dims[2], n = z.dims[0] * z.dims[1];
  std::vector<TokenBound> out(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i) {
    if (!m.data()[i]) continue;
    double U = 0;
    for (long v = 0; v < V; ++v) {
      const double x = z.v[static_cast<std::size_t>(i * V + v)];
      if (std::isfinite(x)) U = std::max(U, std::fabs(x / tau));
    }
    REQUIRE(U <= 16);  // the bound's stated range
    const double lp = logp.v[static_cast<std::size_t>(i)];
    const double H = entropy ? entropy->v[static_cast<std::size_t>(i)] : 0.0;
    out[static_cast<std::size_t>(i)] =
        token_bound(prefloss_arith<C>(V), U, V, lp, H) + token_bound(torch_arith(V), U, V, lp, H);
  }
  return out;
}

/// Checks |got[k] - want[k]| <= bound(k) for every k (and got[k] == 0 exactly where want[k] == 0
/// when `zeros_exact`); records the largest |got - want| / bound of the family and type.
template <class G, class F>
void compare_bounded(const Case& c, const std::string& label, const char* type, const G* got, long n, const Rec& want,
                     F&& bound, bool zeros_exact = false) {
  const std::string where = c.family + "/" + c.name + " " + label + " (" + type + ")";
  INFO(where);
  REQUIRE(n == want.size());
  double ratio = 0;
  long over = 0, bad_zero = 0, nonfinite = 0, first_over = -1;
  for (long k = 0; k < n; ++k) {
    const double w = want.v[static_cast<std::size_t>(k)], g = static_cast<double>(got[k]), b = bound(k);
    if (!std::isfinite(g)) ++nonfinite;
    const double e = std::fabs(g - w);
    if (!(e <= b)) {
      if (first_over < 0) first_over = k;
      ++over;
    }
    if (b > 0) ratio = std::max(ratio, e / b);
    if (zeros_exact && w == 0 && g != 0) ++bad_zero;
  }
  INFO("first entry over its bound: " << first_over);
  CHECK(nonfinite == 0);
  CHECK(bad_zero == 0);
  CHECK(over == 0);
  Worst& w = worst()[c.family + " " + type + " (error / bound)"];
  if (ratio >= w.dev) w = {ratio, c.name + " " + label};
}

template <class T>
const char* lname() {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return "bf16";
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return "half";
  else
    return tname<T>();
}

/// The 16-bit gradient's rounding to nearest (0 for float and double).
template <class T>
double lowp_rounding(double g) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return std::ldexp(std::fabs(g), -8);
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return std::ldexp(std::fabs(g), -11) + std::ldexp(1.0, -25);
  else
    return 0.0 * g;  // float and double: written as computed
}

/// max |want| over row r of a [B, T, V] record (the entry magnitude of the rounding terms).
double row_max(const Rec& r, long row) {
  const long V = r.dims[2];
  double m = 0;
  for (long v = 0; v < V; ++v) m = std::max(m, std::fabs(r.v[static_cast<std::size_t>(row * V + v)]));
  return m;
}

}  // namespace

TEST_CASE("golden: token_logprobs of bf16 / half logits vs float64 of the rounded values", "[golden][logprobs]") {
  for (const Case& c : load("logprobs_lowp")) {
    const auto run = [&](auto zero) {
      using T = decltype(zero);
      using C = pl::detail::compute_t<T>;
      const Rec& zr = c.at("logits");
      const auto z = logits<T>(zr);
      const auto y = labels(c.at("labels"));
      const auto m = mask(c.at("mask"));
      pl::LogprobOptions o;
      o.temperature = c.num("temperature");
      o.entropy = true;
      const auto tb = token_bounds<C>(zr, m, o.temperature, c.at("logp"), &c.at("entropy"));
      const auto r = pl::token_logprobs(z, y, m, o);
      const auto at = [&](long k) { return tb[static_cast<std::size_t>(k)]; };
      compare_bounded(c, "logp", lname<T>(), r.logp.data(), r.logp.size(), c.at("logp"),
                      [&](long k) { return at(k).logp; });
      compare_bounded(c, "entropy", lname<T>(), r.entropy.data(), r.entropy.size(), c.at("entropy"),
                      [&](long k) { return at(k).entropy; });
      const auto gl = tok<C>(c.at("grad_logp")), gh = tok<C>(c.at("grad_entropy"));
      Logits<T> g(z.dimension(0), z.dimension(1), z.dimension(2));
      r.backward(gl, gh, g);
      const Rec& want = c.at("grad");
      const long V = zr.dims[2];
      compare_bounded(
          c, "grad", lname<T>(), g.data(), g.size(), want,
          [&](long k) {
            const long i = k / V;
            const double b = at(i).grad(gl.data()[i], gh.data()[i], 1 / o.temperature, row_max(want, i));
            // The float gradient is within b of want; the 16-bit one rounds it once more.
            return b + lowp_rounding<T>(std::fabs(want.v[static_cast<std::size_t>(k)]) + b);
          },
          true);
    };
    if (c.str("dtype") == "bf16")
      run(Eigen::bfloat16{});
    else if (c.str("dtype") == "half")
      run(Eigen::half{});
    else
      throw std::runtime_error("unknown dtype " + c.str("dtype"));
    run(float{});  // the same values as float and double logits
    run(double{});
  }
}

// DPO from logits. With E_i the bound of row i's masked sum (its tokens' logp bounds, and the
// sum's own rounding (T + 1) u sum_t |logp_t|): per example, |d l / d D| <= beta and
// |d^2 l / d D^2| = beta^2 sigma'(beta D) <= beta^2 / 4 for the sigmoid loss with label
// smoothing, so its loss moves by <= beta (E_c + E_r) and d loss / d logp = +-(1/B) dl/dD by
// <= beta^2 / (4B) (E_c + E_r). dpo's own arithmetic on given inputs is within the dpo family's
// norm-wise tolerance (tol<T>() of the largest value), added to each.
TEST_CASE("golden: dpo from logits (token_logprobs -> masked_sum -> dpo -> backward) vs TRL + autograd",
          "[golden][dpo_logits]") {
  for (const Case& c : load("dpo_logits")) {
    for_types([&](auto zero) {
      using T = decltype(zero);
      REQUIRE(c.str("variant") == "sigmoid");
      pl::LogprobOptions lo;
      lo.temperature = c.num("temperature");
      const double tau = lo.temperature, beta = c.num("beta");
      const Rec &zcr = c.at("logits_c"), &zrr = c.at("logits_r");
      const auto zc = logits<T>(zcr), zr = logits<T>(zrr);
      const auto yc = labels(c.at("labels_c")), yr = labels(c.at("labels_r"));
      const auto mc = mask(c.at("mask_c")), mr = mask(c.at("mask_r"));
      const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
      pl::DpoOptions o;
      o.beta = beta;
      o.label_smoothing = c.num("label_smoothing");

      const auto lc = pl::token_logprobs(zc, yc, mc, lo);
      const auto lr = pl::token_logprobs(zr, yr, mr, lo);
      const auto r = pl::dpo(pl::masked_sum(lc.logp, mc), pl::masked_sum(lr.logp, mr), rc, rr, o);
      Tok<T> gc(mc.dimension(0), mc.dimension(1)), gr(mr.dimension(0), mr.dimension(1));
      r.backward(gc, gr);
      Logits<T> Gc(zc.dimensions()), Gr(zr.dimensions());
      lc.backward(gc, Gc);
      lr.backward(gr, Gr);

      // The bounds.
      const auto tbc = token_bounds<T>(zcr, mc, tau, c.at("logp_c"), nullptr);
      const auto tbr = token_bounds<T>(zrr, mr, tau, c.at("logp_r"), nullptr);
      const long Bn = mc.dimension(0), Tn = mc.dimension(1);
      const double u = 0.5 * std::numeric_limits<T>::epsilon();
      const auto seq_bound = [&](const std::vector<TokenBound>& tb, const Rec& lp, const Tok<std::uint8_t>& m) {
        std::vector<double> e(static_cast<std::size_t>(Bn), 0.0);
        for (long i = 0; i < Bn; ++i) {
          double abs_sum = 0;
          for (long t = 0; t < Tn; ++t)
            if (m(i, t)) {
              e[static_cast<std::size_t>(i)] += tb[static_cast<std::size_t>(i * Tn + t)].logp;
              abs_sum += std::fabs(lp.v[static_cast<std::size_t>(i * Tn + t)]);
            }
          e[static_cast<std::size_t>(i)] += static_cast<double>(Tn + 1) * u * abs_sum;
        }
        return e;
      };
      const auto ec = seq_bound(tbc, c.at("logp_c"), mc), er = seq_bound(tbr, c.at("logp_r"), mr);
      const auto max_abs = [](const Rec& x) {
        double s = 0;
        for (double v : x.v) s = std::max(s, std::fabs(v));
        return s;
      };
      const double own_losses = tol<T>() * max_abs(c.at("losses"));
      const double own_g = tol<T>() * std::max(max_abs(c.at("grad_logp_c")), max_abs(c.at("grad_logp_r")));
      std::vector<double> dl(static_cast<std::size_t>(Bn)), dg(static_cast<std::size_t>(Bn));
      double dloss = 0;
      for (long i = 0; i < Bn; ++i) {
        const double e = ec[static_cast<std::size_t>(i)] + er[static_cast<std::size_t>(i)];
        dl[static_cast<std::size_t>(i)] = beta * e + own_losses;
        dg[static_cast<std::size_t>(i)] = beta * beta / (4.0 * static_cast<double>(Bn)) * e + own_g;
        dloss += beta * e / static_cast<double>(Bn);
      }
      dloss += tol<T>() * std::fabs(c.num("loss"));

      const char* ty = tname<T>();
      const T loss = r.loss;
      compare_bounded(c, "loss", ty, &loss, 1, c.at("loss"), [&](long) { return dloss; });
      compare_bounded(c, "losses", ty, r.losses.data(), r.losses.size(), c.at("losses"),
                      [&](long i) { return dl[static_cast<std::size_t>(i)]; });
      const auto side = [&](const char* sfx, const auto& l, const std::vector<TokenBound>& tb, const Tok<T>& g,
                            const Logits<T>& G) {
        const std::string s(sfx);
        compare_bounded(c, "logp_" + s, ty, l.logp.data(), l.logp.size(), c.at("logp_" + s),
                        [&](long k) { return tb[static_cast<std::size_t>(k)].logp; });
        const Rec& gl = c.at("grad_logp_" + s);
        compare_bounded(
            c, "grad_logp_" + s, ty, g.data(), g.size(), gl,
            [&](long k) { return gl.v[static_cast<std::size_t>(k)] != 0 ? dg[static_cast<std::size_t>(k / Tn)] : 0.0; },
            true);
        const Rec& want = c.at("grad_" + s);
        const long V = want.dims[2];
        compare_bounded(
            c, "grad_" + s, ty, G.data(), G.size(), want,
            [&](long k) {
              const long i = k / V;
              const double g_i = gl.v[static_cast<std::size_t>(i)];
              if (g_i == 0) return 0.0;  // a masked-out token
              // the upstream's own error passes through |1[v = y] - p_v| <= 1
              return tb[static_cast<std::size_t>(i)].grad(g_i, 0, 1 / tau, row_max(want, i)) +
                     dg[static_cast<std::size_t>(i / Tn)] / tau;
            },
            true);
      };
      side("c", lc, tbc, gc, Gc);
      side("r", lr, tbr, gr, Gr);
    });
  }
}

// PPO from logits (verl dp_actor). Per selected token l = max(-A r, -A clip(r, 1 - lo, 1 + hi)),
// r = exp(logp - old): |d l / d logp| <= |A| r, so a logp error d moves l by <= 1.01 |A| r d
// (d < 1e-4, checked) and d l / d logp = -A r (unclipped) by 1.01 |A| r d; no ratio lies within
// 1e-3 of a clip edge (make_golden.py), so no token changes branch. k1 adds kl_coef d to l and
// nothing to its derivative; the entropy bonus -entropy_coef H adds entropy_coef |dH|. Each
// enters the loss times the token's aggregation factor s_i w_it (row_scales(): masks only, so
// exact up to rounding), and ppo_clip's own arithmetic adds its family's tolerance. The logits'
// gradient has upstream g_lp = d pg_loss / d logp and g_h = -entropy_coef s_i w_it (rounded to
// the log-prob type: u |g_h|, through |dH / dz| <= k (1/e + H)).
TEST_CASE(
    "golden: ppo from logits (token_logprobs -> ppo_clip -> backward, and ppo_clip_from_logits) vs verl dp_actor + "
    "autograd",
    "[golden][ppo_logits]") {
  for (const Case& c : load("ppo_logits")) {
    for_types([&](auto zero) {
      using T = decltype(zero);
      const Rec& zrec = c.at("logits");
      const auto z = logits<T>(zrec);
      const auto y = labels(c.at("labels"));
      const auto m = mask(c.at("mask"));
      const auto old = tok<T>(c.at("old_logp")), adv = tok<T>(c.at("advantages")), ref = tok<T>(c.at("ref_logp"));
      const double ent_coef = c.num("entropy_coef");
      pl::LogprobOptions lo;
      lo.temperature = c.num("temperature");
      lo.entropy = ent_coef != 0;
      pl::PpoOptions o;
      o.clip_low = c.num("clip_low");
      o.clip_high = c.num("clip_high");
      o.dual_clip = c.num("dual_clip");
      o.aggregation = aggregation(c.str("aggregation"));
      const bool kl = c.str("kl_estimator") != "none";
      if (kl) {
        REQUIRE(c.str("kl_estimator") == "k1");  // the bound below knows k1's derivative only
        o.kl_estimator = estimator(c.str("kl_estimator"));
        o.kl_coef = c.num("kl_coef");
      }
      const long Bn = m.dimension(0), Tn = m.dimension(1), V = zrec.dims[2];
      const double tau = lo.temperature, kl_coef = o.kl_coef, u = 0.5 * std::numeric_limits<T>::epsilon();

      const auto lp = pl::token_logprobs(z, y, m, lo);
      const auto run = [&](const auto& r) {
        Tok<T> g(Bn, Tn);
        r.backward(g);
        const std::vector<double>& s = r.row_scales();
        // d (-entropy_coef agg(H)) / d H_it = -entropy_coef s_i w_it, w_it = 1 at selected tokens
        Tok<T> gh(Bn, Tn);
        double ent_agg = 0;
        for (long i = 0; i < Bn; ++i)
          for (long t = 0; t < Tn; ++t) {
            const bool on = m(i, t) != 0;
            gh(i, t) = static_cast<T>(on ? -ent_coef * s[static_cast<std::size_t>(i)] : 0.0);
            if (on && lo.entropy) ent_agg += s[static_cast<std::size_t>(i)] * static_cast<double>(lp.entropy(i, t));
          }
        Logits<T> G(z.dimensions());
        if (lo.entropy)
          lp.backward(g, gh, G);
        else
          lp.backward(g, G);
        const double loss = static_cast<double>(r.loss) - ent_coef * ent_agg;

        // The fused two-pass call writes the composition's gradient bits (its own contract), so
        // the bounds below hold for it too; its loss sums the entropy row by row.
        pl::LogprobOptions lf;
        lf.temperature = tau;
        lf.entropy_coef = ent_coef;
        Logits<T> Gf(z.dimensions());
        const auto f = kl ? pl::ppo_clip_from_logits(z, y, old, adv, m, ref, o, lf, Gf)
                          : pl::ppo_clip_from_logits(z, y, old, adv, m, o, lf, Gf);
        CHECK(std::memcmp(Gf.data(), G.data(), sizeof(T) * static_cast<std::size_t>(G.size())) == 0);
        CHECK(std::memcmp(f.logp.data(), lp.logp.data(), sizeof(T) * static_cast<std::size_t>(lp.logp.size())) == 0);
        CHECK(f.policy_loss == r.loss);

        // The bounds.
        const auto tb = token_bounds<T>(zrec, m, tau, c.at("logp"), &c.at("entropy"));
        const Rec &lpw = c.at("logp"), &oldw = c.at("old_logp"), &advw = c.at("advantages"), &glw = c.at("grad_logp");
        double d_pg = 0, d_ent = 0, max_g = 0;
        std::vector<double> dg(static_cast<std::size_t>(Bn * Tn), 0.0);
        for (double v : glw.v) max_g = std::max(max_g, std::fabs(v));
        for (long k = 0; k < Bn * Tn; ++k) {
          if (!m.data()[k]) continue;
          const auto kk = static_cast<std::size_t>(k);
          const double d = tb[kk].logp, si = s[static_cast<std::size_t>(k / Tn)];
          REQUIRE(d < 1e-4);
          const double ar = std::fabs(advw.v[kk]) * std::exp(lpw.v[kk] - oldw.v[kk]);
          d_pg += si * (1.01 * ar * d + kl_coef * d);
          d_ent += si * tb[kk].entropy;
          dg[kk] = si * 1.01 * ar * d + tol<T>() * max_g;
        }
        const double pg_bound = d_pg + tol<T>() * std::fabs(c.num("pg_loss"));
        const double ent_bound = d_ent + u * std::fabs(c.num("entropy_agg"));
        const char* ty = tname<T>();
        const T pg = r.loss, tl = static_cast<T>(loss), ea = static_cast<T>(ent_agg);
        compare_bounded(c, "pg_loss", ty, &pg, 1, c.at("pg_loss"), [&](long) { return pg_bound; });
        compare_bounded(c, "loss", ty, &tl, 1, c.at("loss"),
                        [&](long) { return pg_bound + ent_coef * ent_bound + u * std::fabs(c.num("loss")); });
        compare_bounded(c, "loss (ppo_clip_from_logits)", ty, &f.loss, 1, c.at("loss"),
                        [&](long) { return pg_bound + ent_coef * ent_bound + u * std::fabs(c.num("loss")); });
        if (lo.entropy) {
          compare_bounded(c, "entropy", ty, lp.entropy.data(), lp.entropy.size(), c.at("entropy"),
                          [&](long k) { return tb[static_cast<std::size_t>(k)].entropy; });
          compare_bounded(c, "entropy_agg", ty, &ea, 1, c.at("entropy_agg"), [&](long) { return ent_bound; });
        }
        compare_bounded(c, "logp", ty, lp.logp.data(), lp.logp.size(), lpw,
                        [&](long k) { return tb[static_cast<std::size_t>(k)].logp; });
        compare_bounded(
            c, "grad_logp", ty, g.data(), g.size(), glw, [&](long k) { return dg[static_cast<std::size_t>(k)]; }, true);
        const Rec& want = c.at("grad");
        compare_bounded(
            c, "grad", ty, G.data(), G.size(), want,
            [&](long k) {
              const long i = k / V;
              const auto ii = static_cast<std::size_t>(i);
              if (!m.data()[i]) return 0.0;
              const double g_h = static_cast<double>(gh.data()[i]);
              return tb[ii].grad(glw.v[ii], g_h, 1 / tau, row_max(want, i)) + dg[ii] / tau +
                     u * std::fabs(g_h) * (1 / std::exp(1.0) + tb[ii].H) / tau;
            },
            true);
      };
      if (kl)
        run(pl::ppo_clip(lp.logp, old, adv, m, ref, o));
      else
        run(pl::ppo_clip(lp.logp, old, adv, m, o));
    });
  }
}

TEST_CASE("golden: dpo_mixture and wpo_weights vs TRL _compute_loss (loss_type lists, use_weighting)",
          "[golden][dpo]") {
  for (const Case& c : load("dpo_mixture")) {
    for_types([&](auto z) {
      using T = decltype(z);
      const PairTokens<T> p(c);
      const auto rc = vec<T>(c.at("ref_c")), rr = vec<T>(c.at("ref_r"));
      std::vector<pl::DpoTerm> terms;
      std::stringstream names(c.str("terms"));
      const Rec& tw = c.at("term_weights");
      for (std::string n; std::getline(names, n, ',');) terms.push_back({dpo_variant(n), tw.v.at(terms.size())});
      pl::DpoOptions o;
      o.beta = c.num("beta");
      if (c.num("weighting") != 0) {
        Vec<T> wc(p.xc.dimension(0)), wr(p.xr.dimension(0));
        pl::wpo_weights(logits<T>(c.at("logits_c")), labels(c.at("labels_c")), p.mc, wc);
        pl::wpo_weights(logits<T>(c.at("logits_r")), labels(c.at("labels_r")), p.mr, wr);
        Vec<T> pw(wc.size());
        for (long i = 0; i < wc.size(); ++i) {
          pw(i) = wc(i) * wr(i);
          o.pair_weights.push_back(static_cast<double>(wc(i)) * static_cast<double>(wr(i)));
        }
        compare(c, "pair_weights", pw);
      }
      const auto r = pl::dpo_mixture(pl::masked_sum(p.xc, p.mc), pl::masked_sum(p.xr, p.mr), rc, rr, terms, o);
      p.check(c, r);
      Vec<T> tl(static_cast<long>(r.term_loss.size()));
      for (long k = 0; k < tl.size(); ++k) tl(k) = r.term_loss[static_cast<std::size_t>(k)];
      compare(c, "term_loss", tl);
    });
  }
}

TEST_CASE("golden: advantages and rewards vs verl core_algos, TRL GRPO scaling, Llama 2, OpenRLHF",
          "[golden][advantages]") {
  const auto ids_of = [](const Rec& r) {
    Vec<std::int64_t> ids(r.size());
    for (long k = 0; k < r.size(); ++k) ids(k) = static_cast<std::int64_t>(r.v[static_cast<std::size_t>(k)]);
    return ids;
  };
  for (const Case& c : load("advantages")) {
    const std::string& kind = c.str("kind");
    for_types([&](auto z) {
      using T = decltype(z);
      if (kind == "rloo" || kind == "opo" || kind == "rfpp_baseline") {
        const auto s = vec<T>(c.at("scores"));
        const auto run = [&](const auto& grouping) {
          if (kind == "rloo") {
            Vec<T> out(s.size());
            pl::rloo_advantages(s, grouping, out);
            compare(c, "out", out);
          } else if (kind == "opo") {
            Vec<T> out(s.size());
            pl::opo_advantages(s, vec<T>(c.at("lengths")), grouping, out);
            compare(c, "out", out);
          } else {
            const auto m = mask(c.at("mask"));
            Tok<T> out(m.dimension(0), m.dimension(1));
            pl::reinforce_pp_baseline_advantages(s, grouping, m, pl::WhitenOptions{}, out);
            compare_grad(c, "out", out);
          }
        };
        if (c.has("group_ids"))
          run(ids_of(c.at("group_ids")));
        else
          run(static_cast<long>(c.num("group_size")));
      } else if (kind == "rfpp" || kind == "remax") {
        const auto r = tok<T>(c.at("token_rewards"));
        const auto m = mask(c.at("mask"));
        Tok<T> adv(r.dimension(0), r.dimension(1)), ret(r.dimension(0), r.dimension(1));
        if (kind == "rfpp") {
          pl::ReinforcePPOptions o;
          o.gamma = c.num("gamma");
          pl::reinforce_pp_advantages(r, m, o, adv, ret);
        } else {
          pl::remax_advantages(r, vec<T>(c.at("baselines")), m, adv, ret);
        }
        compare_grad(c, "advantages", adv);
        compare_grad(c, "returns", ret);
      } else if (kind == "trl") {
        const auto x = tok<T>(c.at("rewards_per_func"));
        pl::GrpoRewardOptions o;
        const std::string& sc = c.str("scale_rewards");
        o.scale_rewards = sc == "group"   ? pl::RewardScaling::group
                          : sc == "batch" ? pl::RewardScaling::batch
                                          : pl::RewardScaling::none;
        o.aggregation = c.str("aggregation") == "sum_then_normalize" ? pl::RewardAggregation::sum_then_normalize
                                                                     : pl::RewardAggregation::normalize_then_sum;
        o.reward_weights = c.at("reward_weights").v;
        Vec<T> out(x.dimension(0));
        pl::grpo_reward_advantages(x, static_cast<long>(c.num("num_generations")), o, out);
        compare_grad(c, "out", out);  // exact zeros: unscorable completions and singleton groups
      } else if (kind == "llama2") {
        const auto h = vec<T>(c.at("helpfulness")), s = vec<T>(c.at("safety"));
        const Rec& sr = c.at("is_safety");
        Vec<std::uint8_t> safe(sr.size());
        for (long k = 0; k < sr.size(); ++k) safe(k) = sr.v[static_cast<std::size_t>(k)] != 0;
        pl::SafetyRewardOptions o;
        o.threshold = c.num("threshold");
        Vec<T> rc(h.size()), wh(h.size());
        pl::llama2_safety_reward(h, s, safe, o, rc);
        compare(c, "reward", rc);
        pl::logit_whiten(rc, pl::WhitenOptions{}, wh);
        compare(c, "whitened", wh);
      } else if (kind == "best_of_n") {
        const auto r = vec<T>(c.at("rewards"));
        const Rec& want = c.at("best");
        Vec<std::int64_t> best(want.size());
        pl::best_of_n(r, static_cast<long>(c.num("group_size")), best);
        for (long k = 0; k < best.size(); ++k)
          CHECK(static_cast<double>(best(k)) == want.v[static_cast<std::size_t>(k)]);
      } else if (kind == "clip") {
        const auto r = vec<T>(c.at("rewards"));
        pl::RewardClipOptions o;
        o.min = c.num("min");
        o.max = c.num("max");
        Vec<T> out(r.size());
        pl::clip_rewards(r, o, out);
        compare(c, "out", out);
      } else if (kind == "openrlhf_pair") {
        // LogExpLoss ignores its margin argument; PairWiseLoss subtracts it: both are
        // bradley_terry, without and with the margin.
        const auto rc = vec<T>(c.at("r_c")), rr = vec<T>(c.at("r_r")), mg = vec<T>(c.at("margin"));
        Vec<T> gc(rc.size()), gr(rr.size());
        const auto check = [&](const auto& r) {
          r.backward(gc, gr);
          compare(c, "loss", r.loss);
          compare(c, "losses", r.losses);
          compare_grad(c, "grad_c", gc);
          compare_grad(c, "grad_r", gr);
        };
        if (c.str("loss") == "LogExpLoss")
          check(pl::bradley_terry(rc, rr));
        else
          check(pl::bradley_terry(rc, rr, mg));
        if (c.name == "logexp_huge") CHECK(std::isinf(c.num("openrlhf_float32_loss")));
        if (c.name == "pairwise_huge_margin") CHECK(std::isfinite(c.num("openrlhf_float32_loss")));
      } else if (kind == "kl_ctrl") {
        if (!std::is_same_v<T, double>) return;  // a double-only value type
        pl::AdaptiveKLController k(c.num("init_kl_coef"), c.num("target_kl"), c.num("horizon"));
        const Rec &kl = c.at("current_kl"), &n = c.at("n_steps");
        Vec<double> got(kl.size());
        for (long i = 0; i < kl.size(); ++i) {
          k.update(kl.v[static_cast<std::size_t>(i)], static_cast<pl::Index>(n.v[static_cast<std::size_t>(i)]));
          got(i) = k.value();
        }
        compare(c, "values", got);
      } else {
        FAIL("unknown advantages kind " << kind);
      }
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
