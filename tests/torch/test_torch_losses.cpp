// Every function of prefloss/torch.hpp against an independent expected value: the same formula
// in plain libtorch ops (torch_reference.hpp) differentiated by libtorch's autograd, in float64 to
// a relative 1e-12 and in float32 to 1e-5 (max-abs-diff over max-abs-reference; the reference
// runs in float64 on the same inputs). Then the adapter against the core on the same data, bit
// for bit.
#include "torch_reference.hpp"

#include <torch/torch.h>
#include <prefloss/prefloss.hpp>
#include <prefloss/torch.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

using namespace tref;
using torch::indexing::Slice;

namespace {

const std::vector<at::ScalarType> real_types = {torch::kDouble, torch::kFloat};

std::string dtype_str(at::ScalarType t) { return c10::toString(t); }

/// Checks a sequence result against the reference per-example losses: loss = sum(losses) / n,
/// then backward of the loss on both sides and every leaf's gradient.
template <class R>
void check_sequence(R& r, const Tensor& ref_losses, double n, std::initializer_list<Twin*> leaves, double tol) {
  REQUIRE(r.loss.dim() == 0);
  REQUIRE(r.losses.sizes() == ref_losses.sizes());
  const Tensor ref_loss = ref_losses.sum() / n;
  CHECK_REL(r.loss, ref_loss, tol);
  CHECK_REL(r.losses, ref_losses, tol);
  r.loss.backward();
  ref_loss.backward();
  for (Twin* t : leaves) {
    REQUIRE(t->ours.grad().defined());
    CHECK(t->ours.grad().scalar_type() == t->ours.scalar_type());
    CHECK_REL(t->ours.grad(), t->ref.grad(), tol);
  }
}

Tensor opts_randn(at::IntArrayRef s, at::ScalarType t) { return torch::randn(s, torch::TensorOptions().dtype(t)); }

/// A random bool mask [B, T] with row `empty_row` (if >= 0) all false and at least one true elsewhere.
Tensor random_mask(int64_t B, int64_t T, int64_t empty_row = -1) {
  Tensor m = torch::rand({B, T}) < 0.7;
  m.index_put_({Slice(), 0}, true);
  if (empty_row >= 0) m.index_put_({empty_row}, false);
  return m;
}

}  // namespace

// ---- masked_sum / masked_mean ---------------------------------------------------------------------

TEST_CASE("masked_sum and masked_mean: values and gradients against autograd, every mask kind", "[torch][masked]") {
  torch::manual_seed(1);
  const int64_t B = 5, T = 13;
  for (auto dt : real_types) {
    const Tensor bmask = random_mask(B, T, 2);
    const std::vector<std::pair<std::string, Tensor>> masks = {
        {"bool", bmask},
        {"uint8", bmask.to(torch::kByte)},
        {"weights", (torch::rand({B, T}, torch::TensorOptions().dtype(dt)) * 2) * bmask.to(dt)}};
    for (const auto& [kind, mask] : masks) {
      for (bool mean : {false, true}) {
        INFO(dtype_str(dt) << " mask " << kind << (mean ? " masked_mean" : " masked_sum"));
        Twin x = twin(opts_randn({B, T}, dt));
        const Tensor up = opts_randn({B}, dt);
        const Tensor v = mean ? pt::masked_mean(x.ours, mask) : pt::masked_sum(x.ours, mask);
        const Tensor rv = mean ? ref_masked_mean(x.ref, mask) : ref_masked_sum(x.ref, mask);
        CHECK(v.scalar_type() == dt);
        CHECK(v.sizes() == at::IntArrayRef{B});
        CHECK_REL(v, rv, tol_of(dt));
        (v * up).sum().backward();
        (rv * dbl(up)).sum().backward();
        CHECK_REL(x.ours.grad(), x.ref.grad(), tol_of(dt));
        // The empty row: value 0, gradient 0.
        CHECK(v[2].item<double>() == 0.0);
        CHECK(x.ours.grad()[2].abs().max().item<double>() == 0.0);
      }
    }
  }
}

TEST_CASE("masked_sum and masked_mean of bfloat16 tokens: the float computation of the bf16 values",
          "[torch][masked][bf16]") {
  torch::manual_seed(2);
  const int64_t B = 4, T = 37;
  const Tensor bmask = random_mask(B, T);
  const std::vector<std::pair<std::string, Tensor>> masks = {
      {"bool", bmask},
      {"uint8", bmask.to(torch::kByte)},
      {"float weights", torch::rand({B, T}) * bmask.to(torch::kFloat)}};
  for (const auto& [kind, mask] : masks) {
    for (bool mean : {false, true}) {
      INFO("mask " << kind << (mean ? " masked_mean" : " masked_sum"));
      const Tensor xb = (torch::randn({B, T}) * 3).to(torch::kBFloat16).requires_grad_();
      // The reference: the bf16 values converted exactly to float, computed in double.
      const Tensor xr = xb.detach().to(torch::kDouble).requires_grad_();
      const Tensor up = torch::randn({B});
      const Tensor v = mean ? pt::masked_mean(xb, mask) : pt::masked_sum(xb, mask);
      CHECK(v.scalar_type() == torch::kFloat);  // 16-bit tokens compute in float
      const Tensor rv = mean ? ref_masked_mean(xr, mask) : ref_masked_sum(xr, mask);
      CHECK_REL(v, rv, 1e-5);
      (v * up).sum().backward();
      (rv * dbl(up)).sum().backward();
      REQUIRE(xb.grad().scalar_type() == torch::kBFloat16);
      // The float gradient rounded once to bf16: within half a bf16 ulp (2^-9 relative) of the exact one.
      CHECK_REL(xb.grad(), xr.grad(), std::ldexp(1.0, -8));
      if (kind == "bool" && !mean) {
        // upstream times 1, rounded once to nearest even: exactly torch's own rounding of it.
        const Tensor want =
            torch::where(bmask, up.unsqueeze(1).expand({B, T}), torch::zeros({B, T})).to(torch::kBFloat16);
        CHECK(same_bits(xb.grad(), want));
      }
    }
  }
}

// ---- the DPO family, Bradley-Terry, nll, KTO --------------------------------------------------------

TEST_CASE("dpo against TRL's _compute_loss: every variant, f-divergences, label smoothing, reference_free, batch_count",
          "[torch][dpo]") {
  torch::manual_seed(3);
  const int64_t B = 16;
  std::vector<std::pair<std::string, pl::DpoOptions>> cases;
  {
    pl::DpoOptions o;
    cases.emplace_back("sigmoid", o);
    o.label_smoothing = 0.1;
    cases.emplace_back("sigmoid cDPO e=0.1", o);
    o.variant = pl::DpoVariant::robust;
    cases.emplace_back("robust e=0.1", o);
    o.variant = pl::DpoVariant::hinge;
    o.label_smoothing = 0;
    o.beta = 0.5;
    cases.emplace_back("hinge beta=0.5", o);
    o = {};
    o.reference_free = true;
    o.beta = 0.3;
    cases.emplace_back("reference_free", o);
    o = {};
    o.batch_count = 40;
    cases.emplace_back("batch_count 40", o);
    o = {};
    o.variant = pl::DpoVariant::exo_pair;
    o.label_smoothing = 1e-3;
    cases.emplace_back("exo_pair e=1e-3", o);
    o = {};
    o.variant = pl::DpoVariant::nca_pair;
    o.divergence = pl::FDivergence::js_divergence;
    cases.emplace_back("nca_pair js_divergence", o);
    o = {};
    o.variant = pl::DpoVariant::bco_pair;
    o.bco_delta = 0.2;
    cases.emplace_back("bco_pair delta=0.2", o);
    o = {};
    o.variant = pl::DpoVariant::sppo_hard;
    o.divergence = pl::FDivergence::alpha_divergence;
    o.alpha = 1.25;
    cases.emplace_back("sppo_hard alpha=1.25", o);
    o = {};
    o.variant = pl::DpoVariant::apo_zero;
    cases.emplace_back("apo_zero", o);
    o = {};
    o.variant = pl::DpoVariant::apo_down;
    o.divergence = pl::FDivergence::forward_kl;
    o.beta = 0.05;
    cases.emplace_back("apo_down forward_kl", o);
    o = {};
    o.variant = pl::DpoVariant::discopop;
    cases.emplace_back("discopop", o);
    o = {};
    o.variant = pl::DpoVariant::aot;
    o.label_smoothing = 0.1;
    cases.emplace_back("aot e=0.1", o);
    o = {};
    o.variant = pl::DpoVariant::aot_unpaired;
    o.batch_count = 40;
    cases.emplace_back("aot_unpaired batch_count 40", o);
  }
  for (auto dt : real_types)
    for (const auto& [name, o] : cases) {
      INFO(dtype_str(dt) << " " << name);
      Twin c = twin(opts_randn({B}, dt) * 5 - 30), r = twin(opts_randn({B}, dt) * 5 - 32);
      const Tensor rc = opts_randn({B}, dt) * 5 - 30, rr = opts_randn({B}, dt) * 5 - 31;
      auto res = pt::dpo(c.ours, r.ours, rc, rr, o);
      const double n = o.batch_count.value_or(static_cast<double>(B));
      check_sequence(res, dpo_losses(c.ref, r.ref, dbl(rc), dbl(rr), o), n, {&c, &r}, tol_of(dt));
    }
}

TEST_CASE("dpo over masked_sum chains: token gradients against autograd", "[torch][dpo][masked]") {
  torch::manual_seed(4);
  const int64_t B = 6, T = 21;
  for (auto dt : real_types) {
    INFO(dtype_str(dt));
    Twin xc = twin(opts_randn({B, T}, dt) - 2), xr = twin(opts_randn({B, T}, dt) - 2);
    const Tensor mc = random_mask(B, T), mr = random_mask(B, T).to(torch::kByte);
    const Tensor rc = opts_randn({B}, dt) * 3 - 20, rr = opts_randn({B}, dt) * 3 - 20;
    pl::DpoOptions o;
    o.label_smoothing = 0.05;
    auto res = pt::dpo(pt::masked_sum(xc.ours, mc), pt::masked_sum(xr.ours, mr), rc, rr, o);
    const Tensor ref = dpo_losses(ref_masked_sum(xc.ref, mc), ref_masked_sum(xr.ref, mr), dbl(rc), dbl(rr), o);
    check_sequence(res, ref, static_cast<double>(B), {&xc, &xr}, tol_of(dt));
  }
}

TEST_CASE("ipo, simpo and orpo against their formulas", "[torch][ipo][simpo][orpo]") {
  torch::manual_seed(5);
  const int64_t B = 12, T = 9;
  for (auto dt : real_types) {
    INFO(dtype_str(dt));
    {  // ipo
      for (bool free : {false, true}) {
        pl::IpoOptions o;
        o.beta = 0.2;
        o.reference_free = free;
        Twin c = twin(opts_randn({B}, dt) - 1), r = twin(opts_randn({B}, dt) - 1.5);
        const Tensor rc = opts_randn({B}, dt) - 1, rr = opts_randn({B}, dt) - 1;
        auto res = pt::ipo(c.ours, r.ours, rc, rr, o);
        check_sequence(res, ipo_losses(c.ref, r.ref, dbl(rc), dbl(rr), o), static_cast<double>(B), {&c, &r},
                       tol_of(dt));
      }
    }
    {  // simpo over masked_mean
      pl::SimpoOptions o;
      o.gamma = 0.7;
      o.label_smoothing = 0.15;
      Twin xc = twin(opts_randn({B, T}, dt) - 1), xr = twin(opts_randn({B, T}, dt) - 1.2);
      const Tensor mc = random_mask(B, T), mr = random_mask(B, T);
      auto res = pt::simpo(pt::masked_mean(xc.ours, mc), pt::masked_mean(xr.ours, mr), o);
      check_sequence(res, simpo_losses(ref_masked_mean(xc.ref, mc), ref_masked_mean(xr.ref, mr), o),
                     static_cast<double>(B), {&xc, &xr}, tol_of(dt));
    }
    {  // orpo over masked_mean
      for (double w : {1.0, 0.0, 0.4}) {
        pl::OrpoOptions o;
        o.beta = 0.25;
        o.nll_weight = w;
        // Log-probs of tokens: < 0, the row means between about -0.1 and -3.
        Twin xc = twin(-torch::rand({B, T}, torch::TensorOptions().dtype(dt)) * 2 - 0.05);
        Twin xr = twin(-torch::rand({B, T}, torch::TensorOptions().dtype(dt)) * 4 - 0.1);
        const Tensor mc = random_mask(B, T), mr = random_mask(B, T);
        auto res = pt::orpo(pt::masked_mean(xc.ours, mc), pt::masked_mean(xr.ours, mr), o);
        check_sequence(res, orpo_losses(ref_masked_mean(xc.ref, mc), ref_masked_mean(xr.ref, mr), o),
                       static_cast<double>(B), {&xc, &xr}, tol_of(dt));
      }
    }
  }
}

TEST_CASE("bradley_terry with center_coef and margin, bradley_terry_ranking", "[torch][bt]") {
  torch::manual_seed(6);
  const int64_t B = 10, K = 4;
  for (auto dt : real_types) {
    INFO(dtype_str(dt));
    for (double k : {0.0, 0.01}) {
      INFO("center_coef " << k);
      pl::BradleyTerryOptions o;
      o.center_coef = k;
      {
        Twin c = twin(opts_randn({B}, dt) * 2), r = twin(opts_randn({B}, dt) * 2);
        auto res = pt::bradley_terry(c.ours, r.ours, o);
        check_sequence(res, bt_losses(c.ref, r.ref, nullptr, k), static_cast<double>(B), {&c, &r}, tol_of(dt));
      }
      {
        Twin c = twin(opts_randn({B}, dt) * 2), r = twin(opts_randn({B}, dt) * 2);
        const Tensor m = torch::rand({B}, torch::TensorOptions().dtype(dt));
        const Tensor md = dbl(m);
        auto res = pt::bradley_terry(c.ours, r.ours, m, o);
        check_sequence(res, bt_losses(c.ref, r.ref, &md, k), static_cast<double>(B), {&c, &r}, tol_of(dt));
      }
      {
        Twin s = twin(opts_randn({B, K}, dt) * 2);
        auto res = pt::bradley_terry_ranking(s.ours, o);
        check_sequence(res, ranking_losses(s.ref, k), static_cast<double>(B), {&s}, tol_of(dt));
      }
    }
    pl::BradleyTerryOptions o;
    o.batch_count = 25;
    Twin c = twin(opts_randn({B}, dt)), r = twin(opts_randn({B}, dt));
    auto res = pt::bradley_terry(c.ours, r.ours, o);
    check_sequence(res, bt_losses(c.ref, r.ref, nullptr, 0), 25, {&c, &r}, tol_of(dt));
  }
}

TEST_CASE("nll: mean, normalizer (token-mean cross-entropy over masked_sum)", "[torch][nll]") {
  torch::manual_seed(7);
  const int64_t B = 7, T = 15;
  for (auto dt : real_types) {
    INFO(dtype_str(dt));
    {
      Twin s = twin(opts_randn({B}, dt) - 10);
      auto res = pt::nll(s.ours);
      check_sequence(res, -s.ref, static_cast<double>(B), {&s}, tol_of(dt));
    }
    {
      Twin x = twin(opts_randn({B, T}, dt) - 2);
      const Tensor m = random_mask(B, T);
      pl::NllOptions o;
      o.normalizer = m.sum().item<double>();
      auto res = pt::nll(pt::masked_sum(x.ours, m), o);
      // torch's token-mean cross-entropy: -sum of the selected log-probs over their count.
      check_sequence(res, -ref_masked_sum(x.ref, m), *o.normalizer, {&x}, tol_of(dt));
    }
  }
}

TEST_CASE("kto against TRL's kto_loss: bool and uint8 labels, reference_point, weights, batch_count", "[torch][kto]") {
  torch::manual_seed(8);
  const int64_t B = 14, K = 9;
  std::vector<std::pair<std::string, pl::KtoOptions>> cases;
  {
    pl::KtoOptions o;
    cases.emplace_back("default", o);
    o.desirable_weight = 1.33;
    o.undesirable_weight = 0.7;
    o.beta = 0.4;
    cases.emplace_back("weights", o);
    o.reference_point = 0.3;
    cases.emplace_back("reference_point", o);
    o = {};
    o.batch_count = 31;
    cases.emplace_back("batch_count", o);
  }
  for (auto dt : real_types)
    for (const auto& [name, o] : cases)
      for (bool as_byte : {false, true}) {
        INFO(dtype_str(dt) << " " << name << (as_byte ? " uint8" : " bool"));
        Twin p = twin(opts_randn({B}, dt) * 3 - 20);
        const Tensor ref = opts_randn({B}, dt) * 3 - 20;
        Tensor des = torch::rand({B}) < 0.5;
        des.index_put_({0}, true);
        des.index_put_({1}, false);
        // KL batch with a positive mean log-ratio (so z0 is not clamped) and one with a negative.
        const Tensor klp = opts_randn({K}, dt) * 3 - 20 + (name == "weights" ? -1.0 : 0.8);
        const Tensor klr = opts_randn({K}, dt) * 0.1 - 20;
        const Tensor d = as_byte ? des.to(torch::kByte) : des;
        auto res = pt::kto(p.ours, ref, d, klp, klr, o);
        const double n = o.batch_count.value_or(static_cast<double>(B));
        check_sequence(res, kto_losses(p.ref, dbl(ref), des, dbl(klp), dbl(klr), o), n, {&p}, tol_of(dt));
        const double z0 =
            o.reference_point ? *o.reference_point : std::max(0.0, (dbl(klp) - dbl(klr)).mean().item<double>());
        CHECK(res.metrics.reference_point == Approx(z0).epsilon(1e-12));
      }
}

TEST_CASE("kto_reference_sums: the KL batch's log-ratio sum and count", "[torch][kto]") {
  torch::manual_seed(9);
  for (auto dt : real_types) {
    const Tensor klp = opts_randn({11}, dt) - 5, klr = opts_randn({11}, dt) - 5;
    const auto s = pt::kto_reference_sums(klp, klr);
    CHECK(s.count == 11);
    const double want = (dbl(klp) - dbl(klr)).sum().item<double>();
    CHECK(std::abs(s.sum - want) <= 1e-12 * (dbl(klp) - dbl(klr)).abs().sum().item<double>());
    CHECK(s.reference_point() == Approx(std::max(0.0, want / 11)).epsilon(1e-12));
  }
}

// ---- the token losses -------------------------------------------------------------------------------

namespace {
const std::vector<std::pair<std::string, pl::Aggregation>> aggregations = {
    {"token-mean", pl::Aggregation::token_mean},
    {"seq-mean-token-sum", pl::Aggregation::seq_mean_token_sum},
    {"seq-mean-token-mean", pl::Aggregation::seq_mean_token_mean},
    {"seq-mean-token-sum-norm", pl::Aggregation::seq_mean_token_sum_norm}};

/// A token-loss result against reference per-token losses l (float64) aggregated by agg_rows.
template <class R>
void check_token(R& res, const Tensor& l, const Tensor& mask, pl::Aggregation a, Twin& x, double tol) {
  const Tensor rows = agg_rows(l, mask, a);
  const Tensor loss = rows.sum();
  REQUIRE(res.loss.dim() == 0);
  // The loss is a sum of token terms of both signs, computed in the input's precision per token:
  // its error is relative to the sum of the terms' magnitudes (the sum's condition), not to the
  // sum itself, which may cancel to near 0. The per-row contributions are compared as usual.
  const double scale = agg_rows(l.abs(), mask, a).sum().item<double>();
  const double err = std::abs(res.loss.template item<double>() - loss.template item<double>());
  INFO("loss " << res.loss.template item<double>() << " vs " << loss.template item<double>()
               << ": |diff| / sum |terms| = " << err / scale);
  CHECK(err <= tol * scale);
  CHECK_REL(res.losses, rows, tol);
  res.loss.backward();
  loss.backward();
  REQUIRE(x.ours.grad().defined());
  CHECK_REL(x.ours.grad(), x.ref.grad(), tol);
}
}  // namespace

TEST_CASE("ppo_clip against verl's compute_policy_loss_vanilla and agg_loss", "[torch][ppo]") {
  torch::manual_seed(10);
  const int64_t B = 6, T = 23;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (int variant = 0; variant < 6; ++variant) {
        pl::PpoOptions o;
        o.aggregation = agg;
        bool with_ref = false;
        std::string vname = "vanilla";
        if (variant == 1) {
          o.dual_clip = 3;
          o.clip_high = 0.28;
          vname = "dual clip 3, clip_high 0.28";
        } else if (variant >= 2 && variant <= 4) {
          with_ref = true;
          o.kl_coef = 0.05;
          o.kl_estimator = variant == 2   ? pl::KlEstimator::k1
                           : variant == 3 ? pl::KlEstimator::k2
                                          : pl::KlEstimator::k3;
          vname = "ref_logp, kl_coef 0.05, k" + std::to_string(variant - 1);
        } else if (variant == 5) {
          with_ref = true;  // ref given, kl_coef 0: no KL term in the loss
          o.dual_clip = 2.5;
          vname = "ref_logp, kl_coef 0, dual clip 2.5";
        }
        for (bool weights : {false, true}) {
          INFO(dtype_str(dt) << " " << aname << " " << vname << (weights ? " float weights" : " bool mask"));
          const Tensor old = opts_randn({B, T}, dt) - 2;
          Twin lp = twin(old + 0.3 * opts_randn({B, T}, dt));
          const Tensor adv = opts_randn({B, T}, dt);
          const Tensor refl = old + 0.2 * opts_randn({B, T}, dt);
          const Tensor bm = random_mask(B, T, 3);
          const Tensor mask = weights ? bm.to(dt) * torch::rand({B, T}, torch::TensorOptions().dtype(dt)) : bm;
          auto res =
              with_ref ? pt::ppo_clip(lp.ours, old, adv, mask, refl, o) : pt::ppo_clip(lp.ours, old, adv, mask, o);
          const Tensor rd = dbl(refl);
          const Tensor l = ppo_token_losses(lp.ref, dbl(old), dbl(adv), with_ref ? &rd : nullptr, o);
          check_token(res, l, mask, agg, lp, tol_of(dt));
        }
      }
}

TEST_CASE("ppo_clip's abs and straight-through KL terms against verl's kl_penalty", "[torch][ppo][kl]") {
  torch::manual_seed(17);
  const int64_t B = 6, T = 23;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (const auto est :
           {pl::KlEstimator::abs, pl::KlEstimator::k1_plus, pl::KlEstimator::abs_plus, pl::KlEstimator::k3_plus})
        for (bool weights : {false, true}) {
          INFO(dtype_str(dt) << " " << aname << " estimator " << static_cast<int>(est)
                             << (weights ? " float weights" : " bool mask"));
          pl::PpoOptions o;
          o.aggregation = agg;
          o.kl_coef = 0.05;
          o.kl_estimator = est;
          const Tensor old = opts_randn({B, T}, dt) - 2;
          const Tensor lp0 = old + 0.3 * opts_randn({B, T}, dt);
          Tensor refl = old + 0.2 * opts_randn({B, T}, dt);
          // Beyond k3's log-ratio clamp (x ~ 25) and its value clamp only (x ~ -16), where k3+'s
          // value is clamped and its gradient is not; and logp == ref_logp, where abs's is 0.
          refl.select(1, 0).copy_(lp0.select(1, 0) + 25);
          refl.select(1, 1).copy_(lp0.select(1, 1) - 16);
          refl.select(1, 2).copy_(lp0.select(1, 2));
          Twin lp = twin(lp0);
          const Tensor adv = opts_randn({B, T}, dt);
          const Tensor bm = random_mask(B, T, 3);
          const Tensor mask = weights ? bm.to(dt) * torch::rand({B, T}, torch::TensorOptions().dtype(dt)) : bm;
          auto res = pt::ppo_clip(lp.ours, old, adv, mask, refl, o);
          const Tensor rd = dbl(refl);
          const Tensor l = ppo_token_losses(lp.ref, dbl(old), dbl(adv), &rd, o);
          check_token(res, l, mask, agg, lp, tol_of(dt));
        }
}

TEST_CASE("value_loss against verl's compute_value_loss", "[torch][value]") {
  torch::manual_seed(11);
  const int64_t B = 5, T = 19;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (std::optional<double> clip :
           {std::optional<double>(0.2), std::optional<double>(0.5), std::optional<double>()}) {
        INFO(dtype_str(dt) << " " << aname << " clip " << (clip ? std::to_string(*clip) : "none"));
        pl::ValueOptions o;
        o.aggregation = agg;
        o.clip = clip;
        const Tensor old = opts_randn({B, T}, dt);
        Twin v = twin(old + 0.4 * opts_randn({B, T}, dt));
        const Tensor ret = old + 0.6 * opts_randn({B, T}, dt);
        const Tensor mask = random_mask(B, T, 1).to(torch::kByte);
        auto res = pt::value_loss(v.ours, old, ret, mask, o);
        check_token(res, value_token_losses(v.ref, dbl(old), dbl(ret), clip), mask, agg, v, tol_of(dt));
      }
}

// ---- from logits ------------------------------------------------------------------------------------

TEST_CASE("token_logprobs against log_softmax + gather, with the entropy and its gradient", "[torch][logprobs]") {
  torch::manual_seed(12);
  const int64_t B = 3, T = 7, V = 29;
  for (auto dt : real_types)
    for (bool int32 : {false, true})
      for (double tau : {1.0, 0.7}) {
        for (bool ent : {false, true}) {
          INFO(dtype_str(dt) << (int32 ? " int32" : " int64") << " labels, tau " << tau << (ent ? ", entropy" : ""));
          Twin z = twin(opts_randn({B, T, V}, dt) * 2);
          const Tensor labels =
              torch::randint(0, V, {B, T}, torch::TensorOptions().dtype(int32 ? torch::kInt : torch::kLong));
          const Tensor mask = random_mask(B, T);
          pl::LogprobOptions o;
          o.temperature = tau;
          o.entropy = ent;
          const auto out = pt::token_logprobs(z.ours, labels, mask, o);
          const auto ref = ref_logprobs(z.ref, labels, mask, tau);
          CHECK(out.logp.scalar_type() == dt);
          CHECK_REL(out.logp, ref.logp, tol_of(dt));
          const Tensor g1 = opts_randn({B, T}, dt), g2 = opts_randn({B, T}, dt);
          Tensor ours = (out.logp * g1).sum(), theirs = (ref.logp * dbl(g1)).sum();
          if (ent) {
            REQUIRE(out.entropy.defined());
            CHECK_REL(out.entropy, ref.entropy, tol_of(dt));
            ours = ours + (out.entropy * g2).sum();
            theirs = theirs + (ref.entropy * dbl(g2)).sum();
          } else {
            CHECK_FALSE(out.entropy.defined());
          }
          ours.backward();
          theirs.backward();
          CHECK_REL(z.ours.grad(), z.ref.grad(), tol_of(dt));
        }
        // Only the entropy gets a gradient.
        INFO(dtype_str(dt) << " entropy-only upstream");
        Twin z = twin(opts_randn({B, T, V}, dt));
        const Tensor labels =
            torch::randint(0, V, {B, T}, torch::TensorOptions().dtype(int32 ? torch::kInt : torch::kLong));
        const Tensor mask = random_mask(B, T);
        pl::LogprobOptions o;
        o.temperature = tau;
        o.entropy = true;
        const auto out = pt::token_logprobs(z.ours, labels, mask, o);
        const auto ref = ref_logprobs(z.ref, labels, mask, tau);
        out.entropy.sum().backward();
        ref.entropy.sum().backward();
        CHECK_REL(z.ours.grad(), z.ref.grad(), tol_of(dt));
      }
}

TEST_CASE("linear_logprobs against log_softmax(hidden weight^T / tau) + gather, to hidden and weight",
          "[torch][logprobs]") {
  torch::manual_seed(21);
  const int64_t N = 37, H = 8, V = 19;
  for (auto dt : real_types)
    for (bool ent : {false, true})
      for (double tau : {1.0, 0.6}) {
        INFO(dtype_str(dt) << ", tau " << tau << (ent ? ", entropy" : ""));
        Twin h = twin(opts_randn({N, H}, dt)), w = twin(opts_randn({V, H}, dt) * 0.5);
        const Tensor labels = torch::randint(0, V, {N}, torch::TensorOptions().dtype(torch::kLong));
        const Tensor mask = random_mask(1, N).reshape({N});
        // Masked-out tokens' hidden rows hold NaN in ours: never read, zero gradient rows.
        const Tensor poisoned = torch::where(mask.to(torch::kBool).unsqueeze(1), h.ours.detach(),
                                             torch::full({N, H}, NAN, h.ours.options().requires_grad(false)));
        Tensor hp = poisoned.clone().requires_grad_();
        pl::LogprobOptions o;
        o.temperature = tau;
        o.entropy = ent;
        const auto out = pt::linear_logprobs(hp, w.ours, labels, mask, o);
        const auto ref =
            ref_logprobs(torch::matmul(h.ref, w.ref.t()).unsqueeze(0), labels.unsqueeze(0), mask.unsqueeze(0), tau);
        CHECK_REL(out.logp, ref.logp.squeeze(0), tol_of(dt));
        const Tensor g1 = opts_randn({N}, dt), g2 = opts_randn({N}, dt);
        Tensor ours = (out.logp * g1).sum(), theirs = (ref.logp.squeeze(0) * dbl(g1)).sum();
        if (ent) {
          CHECK_REL(out.entropy, ref.entropy.squeeze(0), tol_of(dt));
          ours = ours + (out.entropy * g2).sum();
          theirs = theirs + (ref.entropy.squeeze(0) * dbl(g2)).sum();
        } else {
          CHECK_FALSE(out.entropy.defined());
        }
        ours.backward();
        theirs.backward();
        CHECK_REL(hp.grad(), h.ref.grad(), tol_of(dt));
        CHECK_REL(w.ours.grad(), w.ref.grad(), tol_of(dt));
        CHECK(hp.grad().masked_select(~mask.to(torch::kBool).unsqueeze(1).expand({N, H})).abs().sum().item<double>() ==
              0);
      }
  // Only the weight requires a gradient: hidden gets none.
  const Tensor h = torch::randn({N, H}, torch::kDouble), w = torch::randn({V, H}, torch::kDouble).requires_grad_();
  pt::linear_logprobs(h, w, torch::randint(0, V, {N}), torch::ones({N}, torch::kBool)).logp.sum().backward();
  CHECK(w.grad().defined());
  CHECK_FALSE(h.grad().defined());
}

TEST_CASE("ppo_clip_from_logits against log_softmax + verl's policy loss - entropy_coef * agg(entropy)",
          "[torch][ppo][logits]") {
  torch::manual_seed(13);
  const int64_t B = 4, T = 9, V = 23;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (bool with_ref : {false, true}) {
        INFO(dtype_str(dt) << " " << aname << (with_ref ? " ref_logp kl_coef 0.1" : ""));
        Twin z = twin(opts_randn({B, T, V}, dt) * 1.5);
        const Tensor labels = torch::randint(0, V, {B, T}, torch::TensorOptions().dtype(torch::kLong));
        const Tensor mask = random_mask(B, T, 2);
        const Tensor lp0 = ref_logprobs(dbl(z.ours), labels, mask, 0.9).logp.to(dt);
        const Tensor old = lp0 + 0.2 * opts_randn({B, T}, dt), adv = opts_randn({B, T}, dt);
        const Tensor refl = lp0 + 0.2 * opts_randn({B, T}, dt);
        pl::PpoOptions po;
        po.aggregation = agg;
        po.dual_clip = 3;
        if (with_ref) po.kl_coef = 0.1;
        pl::LogprobOptions lo;
        lo.temperature = 0.9;
        lo.entropy_coef = 0.01;
        auto out = with_ref ? pt::ppo_clip_from_logits(z.ours, labels, old, adv, mask, refl, po, lo)
                            : pt::ppo_clip_from_logits(z.ours, labels, old, adv, mask, po, lo);
        const auto ref = ref_logprobs(z.ref, labels, mask, 0.9);
        const Tensor rd = dbl(refl);
        const Tensor pg =
            agg_rows(ppo_token_losses(ref.logp, dbl(old), dbl(adv), with_ref ? &rd : nullptr, po), mask, agg);
        const Tensor ent = agg_rows(ref.entropy, mask, agg);
        const Tensor rows = pg - 0.01 * ent;
        CHECK_REL(out.logp, ref.logp, tol_of(dt));
        REQUIRE(out.entropy.defined());
        CHECK_REL(out.entropy, ref.entropy, tol_of(dt));
        CHECK_FALSE(out.logp.requires_grad());
        CHECK(std::abs(out.policy_loss - pg.sum().item<double>()) <= tol_of(dt) * pg.abs().max().item<double>() * B);
        CHECK(std::abs(out.entropy_loss - ent.sum().item<double>()) <= tol_of(dt) * ent.abs().max().item<double>() * B);
        CHECK_REL(out.losses, rows, tol_of(dt));
        CHECK_REL(out.loss, rows.sum(), tol_of(dt));
        out.loss.backward();
        rows.sum().backward();
        CHECK_REL(z.ours.grad(), z.ref.grad(), tol_of(dt));
      }
}

// ---- the adapter against the core, bit for bit --------------------------------------------------------

namespace {
template <class S>
using Map1 = Eigen::TensorMap<const Eigen::Tensor<S, 1, Eigen::RowMajor>>;

template <class S>
void dpo_core_exact() {
  constexpr auto dt = pt::detail::dtype_of<S>::value;
  const int64_t B = 8, T = 40;
  const Tensor xc = opts_randn({B, T}, dt).requires_grad_(), xr = opts_randn({B, T}, dt).requires_grad_();
  const Tensor mc = random_mask(B, T), mr = random_mask(B, T).to(torch::kByte);
  const Tensor rc = opts_randn({B}, dt) * 3, rr = opts_randn({B}, dt) * 3;
  pl::DpoOptions o;
  o.label_smoothing = 0.1;
  const Tensor vc = pt::masked_sum(xc, mc), vr = pt::masked_sum(xr, mr);
  auto res = pt::dpo(vc, vr, rc, rr, o);
  res.loss.backward();

  // The values: the core expression's eval.
  const auto ec = pl::masked_sum(pt::view<S, 2>(xc), pt::view<bool, 2>(mc));
  const auto er = pl::masked_sum(pt::view<S, 2>(xr), pt::view<std::uint8_t, 2>(mr));
  CHECK(same_bits(vc, from_eigen(Eigen::Tensor<S, 1>(ec.eval()))));
  CHECK(same_bits(vr, from_eigen(Eigen::Tensor<S, 1>(er.eval()))));
  // The loss over those [batch] values: the core's dpo of the same tensors.
  const Tensor cvc = vc.detach(), cvr = vr.detach();
  const auto core = pl::dpo(pt::view<S, 1>(cvc), pt::view<S, 1>(cvr), pt::view<S, 1>(rc), pt::view<S, 1>(rr), o);
  CHECK(res.loss.item<S>() == core.loss);
  CHECK(same_bits(res.losses, from_eigen(core.losses)));
  CHECK(res.metric_sums.sums == core.metric_sums.sums);
  // The token gradients: the core expression's backward of the core's per-example value gradient.
  const Tensor gc = torch::empty({B, T}, torch::TensorOptions().dtype(dt)), gr = torch::empty_like(gc);
  ec.backward(Map1<S>(core.grad_chosen_value().data(), B), pt::mutable_view<S, 2>(gc));
  er.backward(Map1<S>(core.grad_rejected_value().data(), B), pt::mutable_view<S, 2>(gr));
  CHECK(same_bits(xc.grad(), gc));
  CHECK(same_bits(xr.grad(), gr));
  if constexpr (std::is_same_v<S, double>) {
    // In double the expression's value is the double sum itself, so the whole chain is the core's
    // dpo over the expressions, fused or not.
    const Tensor fc = torch::empty_like(gc), fr = torch::empty_like(gc);
    const auto chain = pl::dpo(ec, er, pt::view<S, 1>(rc), pt::view<S, 1>(rr), o, pt::mutable_view<S, 2>(fc),
                               pt::mutable_view<S, 2>(fr));
    CHECK(res.loss.item<S>() == chain.loss);
    CHECK(same_bits(res.losses, from_eigen(chain.losses)));
    CHECK(same_bits(xc.grad(), fc));
    CHECK(same_bits(xr.grad(), fr));
  }
}
}  // namespace

TEST_CASE("dpo over masked_sum: the adapter is the core, bit for bit", "[torch][core][dpo]") {
  torch::manual_seed(14);
  SECTION("float64") { dpo_core_exact<double>(); }
  SECTION("float32") { dpo_core_exact<float>(); }
}

TEST_CASE("masked_mean over bf16 with float weights: the adapter is the core, bit for bit", "[torch][core][masked]") {
  torch::manual_seed(15);
  const int64_t B = 5, T = 70;
  const Tensor x = (torch::randn({B, T}) * 2).to(torch::kBFloat16).requires_grad_();
  const Tensor w = torch::rand({B, T}) * random_mask(B, T).to(torch::kFloat);
  const Tensor up = torch::randn({B});
  const Tensor v = pt::masked_mean(x, w);
  (v * up).sum().backward();
  const auto e = pl::masked_mean(pt::view<Eigen::bfloat16, 2>(x), pt::view<float, 2>(w));
  CHECK(same_bits(v, from_eigen(Eigen::Tensor<float, 1>(e.eval()))));
  const Tensor g = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBFloat16));
  e.backward(pt::view<float, 1>(up), pt::mutable_view<Eigen::bfloat16, 2>(g));
  CHECK(same_bits(x.grad(), g));
}

TEST_CASE("the sequence losses over [batch] tensors: the core's loss, losses, sums and gradients, bit for bit",
          "[torch][core]") {
  torch::manual_seed(16);
  const int64_t B = 9;
  const auto same_grads = [](const Tensor& leaf, const auto& core_grad) {
    CHECK(same_bits(leaf.grad(), from_eigen(core_grad)));
  };
  const Tensor c = torch::randn({B}, torch::kFloat).requires_grad_(),
               r = torch::randn({B}, torch::kFloat).requires_grad_();
  const Tensor rc = torch::randn({B}), rr = torch::randn({B});
  const auto vc = pt::view<float, 1>(c), vr = pt::view<float, 1>(r), vrc = pt::view<float, 1>(rc),
             vrr = pt::view<float, 1>(rr);
  const auto check = [&](auto&& res, const auto& core) {
    CHECK(res.loss.template item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    res.loss.backward();
  };
  SECTION("ipo") {
    pl::IpoOptions o;
    const auto core = pl::ipo(vc, vr, vrc, vrr, o);
    check(pt::ipo(c, r, rc, rr, o), core);
    same_grads(c, core.grad_chosen_value());
    same_grads(r, core.grad_rejected_value());
  }
  SECTION("simpo") {
    const auto core = pl::simpo(vc, vr);
    check(pt::simpo(c, r), core);
    same_grads(c, core.grad_chosen_value());
    same_grads(r, core.grad_rejected_value());
  }
  SECTION("orpo") {
    const Tensor nc = (-torch::rand({B}) - 0.1).requires_grad_(), nr = (-torch::rand({B}) - 0.2).requires_grad_();
    const auto core = pl::orpo(pt::view<float, 1>(nc), pt::view<float, 1>(nr));
    auto res = pt::orpo(nc, nr);
    CHECK(res.loss.item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    res.loss.backward();
    same_grads(nc, core.grad_chosen_value());
    same_grads(nr, core.grad_rejected_value());
  }
  SECTION("bradley_terry with margin") {
    pl::BradleyTerryOptions o;
    o.center_coef = 0.02;
    const auto core = pl::bradley_terry(vc, vr, vrc, o);
    check(pt::bradley_terry(c, r, rc, o), core);
    same_grads(c, core.grad_chosen_value());
    same_grads(r, core.grad_rejected_value());
  }
  SECTION("bradley_terry_ranking") {
    const Tensor s = torch::randn({B, 3}).requires_grad_();
    const auto core = pl::bradley_terry_ranking(pt::view<float, 2>(s));
    auto res = pt::bradley_terry_ranking(s);
    CHECK(res.loss.item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    res.loss.backward();
    Eigen::Tensor<float, 2, Eigen::RowMajor> g(B, 3);
    core.backward(g);
    CHECK(same_bits(s.grad(), from_eigen(g)));
  }
  SECTION("nll with normalizer") {
    pl::NllOptions o;
    o.normalizer = 123;
    const auto core = pl::nll(vc, o);
    check(pt::nll(c, o), core);
    same_grads(c, core.grad_value());
  }
  SECTION("kto") {
    const Tensor des = torch::rand({B}) < 0.5, klp = torch::randn({5}), klr = torch::randn({5});
    const auto core =
        pl::kto(vc, vrc, pt::view<bool, 1>(des), pt::view<float, 1>(klp), pt::view<float, 1>(klr), pl::KtoOptions{});
    auto res = pt::kto(c, rc, des, klp, klr);
    CHECK(res.loss.item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(res.metric_sums.maxima == core.metric_sums.maxima);
    res.loss.backward();
    same_grads(c, core.grad_value());
  }
}

TEST_CASE("ppo_clip, value_loss, token_logprobs and ppo_clip_from_logits: the core's bits", "[torch][core]") {
  torch::manual_seed(17);
  const int64_t B = 4, T = 33, V = 19;
  const Tensor old = torch::randn({B, T}) - 2;
  const Tensor lp = (old + 0.3 * torch::randn({B, T})).requires_grad_();
  const Tensor adv = torch::randn({B, T}), refl = old + 0.1 * torch::randn({B, T});
  const Tensor mask = random_mask(B, T, 1);
  const auto m = pt::view<bool, 2>(mask);
  SECTION("ppo_clip with ref_logp") {
    pl::PpoOptions o;
    o.kl_coef = 0.1;
    o.dual_clip = 3;
    o.aggregation = pl::Aggregation::seq_mean_token_mean;
    auto res = pt::ppo_clip(lp, old, adv, mask, refl, o);
    const auto core = pl::ppo_clip(pt::view<float, 2>(lp), pt::view<float, 2>(old), pt::view<float, 2>(adv), m,
                                   pt::view<float, 2>(refl), o);
    CHECK(res.loss.item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(res.metric_sums.maxima == core.metric_sums.maxima);
    res.loss.backward();
    const Tensor g = torch::empty({B, T});
    core.backward(pt::mutable_view<float, 2>(g));
    CHECK(same_bits(lp.grad(), g));
  }
  SECTION("value_loss") {
    const Tensor v = (old + 0.3 * torch::randn({B, T})).requires_grad_();
    auto res = pt::value_loss(v, old, adv, mask);
    const auto core = pl::value_loss(pt::view<float, 2>(v), pt::view<float, 2>(old), pt::view<float, 2>(adv), m);
    CHECK(res.loss.item<float>() == core.loss);
    CHECK(same_bits(res.losses, from_eigen(core.losses)));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    res.loss.backward();
    const Tensor g = torch::empty({B, T});
    core.backward(pt::mutable_view<float, 2>(g));
    CHECK(same_bits(v.grad(), g));
  }
  const Tensor z = torch::randn({B, T, V}).requires_grad_();
  const Tensor labels = torch::randint(0, V, {B, T}, torch::TensorOptions().dtype(torch::kLong));
  SECTION("token_logprobs") {
    pl::LogprobOptions o;
    o.entropy = true;
    o.temperature = 1.3;
    const auto out = pt::token_logprobs(z, labels, mask, o);
    const auto core = pl::token_logprobs(pt::view<float, 3>(z), pt::view<int64_t, 2>(labels), m, o);
    CHECK(same_bits(out.logp, from_eigen(core.logp)));
    CHECK(same_bits(out.entropy, from_eigen(core.entropy)));
    const Tensor g1 = torch::randn({B, T}), g2 = torch::randn({B, T});
    ((out.logp * g1).sum() + (out.entropy * g2).sum()).backward();
    const Tensor g = torch::empty({B, T, V});
    core.backward(pt::view<float, 2>(g1), pt::view<float, 2>(g2), pt::mutable_view<float, 3>(g));
    CHECK(same_bits(z.grad(), g));
  }
  SECTION("ppo_clip_from_logits") {
    pl::PpoOptions po;
    po.kl_coef = 0.05;
    pl::LogprobOptions lo;
    lo.entropy_coef = 0.02;
    auto out = pt::ppo_clip_from_logits(z, labels, old, adv, mask, refl, po, lo);
    const Tensor g = torch::empty({B, T, V});
    const auto core = pl::ppo_clip_from_logits(pt::view<float, 3>(z), pt::view<int64_t, 2>(labels),
                                               pt::view<float, 2>(old), pt::view<float, 2>(adv), m,
                                               pt::view<float, 2>(refl), po, lo, pt::mutable_view<float, 3>(g));
    CHECK(out.loss.item<float>() == core.loss);
    CHECK(same_bits(out.losses, from_eigen(core.losses)));
    CHECK(same_bits(out.logp, from_eigen(core.logp)));
    CHECK(same_bits(out.entropy, from_eigen(core.entropy)));
    CHECK(out.policy_loss == static_cast<double>(core.policy_loss));
    CHECK(out.entropy_loss == static_cast<double>(core.entropy_loss));
    CHECK(out.metric_sums.sums == core.metric_sums.sums);
    out.loss.backward();
    CHECK(same_bits(z.grad(), g));
  }
}
