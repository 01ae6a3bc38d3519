// The adapter's token policy losses beyond ppo_clip (cispo, sapo, gpg, gmpo, clip_cov, kl_cov)
// and the Clip-Cov / KL-Cov selections against independent expected values: verl's formulas in
// plain libtorch ops (torch_reference.hpp) differentiated by libtorch's autograd, in float64 to a
// relative 1e-12 and in float32 to 1e-5 (the reference runs in float64 on the same inputs). Then
// the argument errors, and the adapter against the core on the same data, bit for bit.
#include "torch_reference.hpp"

#include <torch/torch.h>
#include <prefloss/prefloss.hpp>
#include <prefloss/torch.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

using namespace tref;
using torch::indexing::Slice;

namespace {

const std::vector<at::ScalarType> real_types = {torch::kDouble, torch::kFloat};

const std::vector<std::pair<std::string, pl::Aggregation>> aggregations = {
    {"token-mean", pl::Aggregation::token_mean},
    {"seq-mean-token-sum", pl::Aggregation::seq_mean_token_sum},
    {"seq-mean-token-mean", pl::Aggregation::seq_mean_token_mean},
    {"seq-mean-token-sum-norm", pl::Aggregation::seq_mean_token_sum_norm}};

std::string dtype_str(at::ScalarType t) { return c10::toString(t); }

Tensor opts_randn(at::IntArrayRef s, at::ScalarType t) { return torch::randn(s, torch::TensorOptions().dtype(t)); }

/// A random bool mask [B, T] with row `empty_row` (if >= 0) all false and at least one true elsewhere.
Tensor random_mask(int64_t B, int64_t T, int64_t empty_row = -1) {
  Tensor m = torch::rand({B, T}) < 0.7;
  m.index_put_({Slice(), 0}, true);
  if (empty_row >= 0) m.index_put_({empty_row}, false);
  return m;
}

/// The mask of a case: bool, or the bool mask times random weights in dtype dt.
Tensor make_mask(const Tensor& bm, bool weights, at::ScalarType dt) {
  return weights ? bm.to(dt) * (0.1 + torch::rand(bm.sizes(), torch::TensorOptions().dtype(dt))) : bm;
}

/// The reference loss and its per-row contributions against the result, then the gradient of
/// the loss (backward on both sides). The loss is compared relative to the sum of its terms'
/// magnitudes (terms of both signs may cancel), as test_torch_losses.cpp's check_token.
template <class R>
void check_rows(R& res, const Tensor& rows, const Tensor& abs_rows, Twin& x, double tol) {
  const Tensor loss = rows.sum();
  REQUIRE(res.loss.dim() == 0);
  CHECK(res.loss.scalar_type() == x.ours.scalar_type());
  const double scale = abs_rows.sum().item<double>();
  const double err = std::abs(res.loss.template item<double>() - loss.template item<double>());
  INFO("loss " << res.loss.template item<double>() << " vs " << loss.template item<double>()
               << ": |diff| / sum |terms| = " << err / scale);
  CHECK(err <= tol * scale);
  CHECK_REL(res.losses, rows, tol);
  res.loss.backward();
  loss.backward();
  REQUIRE(x.ours.grad().defined());
  CHECK(x.ours.grad().scalar_type() == x.ours.scalar_type());
  CHECK_REL(x.ours.grad(), x.ref.grad(), tol);
}

/// A token loss aggregated by agg_rows.
template <class R>
void check_token(R& res, const Tensor& l, const Tensor& mask, pl::Aggregation a, Twin& x, double tol) {
  check_rows(res, agg_rows(l, mask, a), agg_rows(l.abs(), mask, a), x, tol);
}

/// The inputs of one case: old ~ N(-2, 1), logp = old + 0.3 N(0, 1) (ratios well inside and
/// outside a 0.2 clip), advantages N(0, 1), a mask with an empty row.
struct Case {
  Tensor old, adv, mask;
  Twin lp;
};
Case make_case(int64_t B, int64_t T, at::ScalarType dt, bool weights, double spread = 0.3) {
  Case c;
  c.old = opts_randn({B, T}, dt) - 2;
  c.lp = twin(c.old + spread * opts_randn({B, T}, dt));
  c.adv = opts_randn({B, T}, dt);
  c.mask = make_mask(random_mask(B, T, 2), weights, dt);
  return c;
}

}  // namespace

// ---- against verl's formulas --------------------------------------------------------------------------

TEST_CASE("cispo against verl's compute_policy_loss_cispo and agg_loss", "[torch][cispo]") {
  torch::manual_seed(31);
  const int64_t B = 6, T = 23;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (int variant = 0; variant < 3; ++variant)
        for (bool weights : {false, true}) {
          pl::CispoOptions o;
          o.aggregation = agg;
          if (variant == 1) {  // TRL's form: an upper bound only, no log-ratio clamp
            o.clip_low = 1;
            o.clip_high = 0.1;
            o.log_ratio_clamp = std::nullopt;
          } else if (variant == 2) {  // a clamp that binds
            o.log_ratio_clamp = 0.25;
            o.clip_high = 0.28;
          }
          INFO(dtype_str(dt) << " " << aname << " variant " << variant << (weights ? " float weights" : " bool mask"));
          Case c = make_case(B, T, dt, weights);
          auto res = pt::cispo(c.lp.ours, c.old, c.adv, c.mask, o);
          const Tensor l = cispo_token_losses(c.lp.ref, dbl(c.old), dbl(c.adv), o);
          check_token(res, l, c.mask, agg, c.lp, tol_of(dt));
        }
}

TEST_CASE("sapo against verl's compute_policy_loss_sapo and agg_loss", "[torch][sapo]") {
  torch::manual_seed(32);
  const int64_t B = 6, T = 23;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (int variant = 0; variant < 3; ++variant)
        for (bool weights : {false, true}) {
          pl::SapoOptions o;
          o.aggregation = agg;
          if (variant == 1) {
            o.tau_pos = 0.5;
            o.tau_neg = 2;
            o.log_ratio_clamp = std::nullopt;
          } else if (variant == 2) {  // a clamp that binds: 0 gradient beyond it
            o.log_ratio_clamp = 0.25;
          }
          INFO(dtype_str(dt) << " " << aname << " variant " << variant << (weights ? " float weights" : " bool mask"));
          Case c = make_case(B, T, dt, weights);
          // A = 0 exactly takes tau_neg (verl: advantages > 0).
          c.adv.index_put_({0, 1}, 0.0);
          auto res = pt::sapo(c.lp.ours, c.old, c.adv, c.mask, o);
          const Tensor l = sapo_token_losses(c.lp.ref, dbl(c.old), dbl(c.adv), o);
          check_token(res, l, c.mask, agg, c.lp, tol_of(dt));
        }
}

TEST_CASE("gpg against verl's compute_policy_loss_gpg and agg_loss", "[torch][gpg]") {
  torch::manual_seed(33);
  const int64_t B = 5, T = 21;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (bool weights : {false, true}) {
        INFO(dtype_str(dt) << " " << aname << (weights ? " float weights" : " bool mask"));
        pl::GpgOptions o;
        o.aggregation = agg;
        Case c = make_case(B, T, dt, weights);
        auto res = pt::gpg(c.lp.ours, c.old, c.adv, c.mask, o);
        check_token(res, gpg_token_losses(c.lp.ref, dbl(c.adv)), c.mask, agg, c.lp, tol_of(dt));
      }
}

TEST_CASE("gmpo against verl's compute_policy_loss_geo_mean", "[torch][gmpo]") {
  torch::manual_seed(34);
  const int64_t B = 6, T = 19;
  for (auto dt : real_types)
    for (int variant = 0; variant < 3; ++variant)
      for (bool weights : {false, true}) {
        pl::GmpoOptions o;
        if (variant == 1) {
          o.clip_low = 0.1;
          o.clip_high = 0.35;
        } else if (variant == 2) {
          o.sequence_count = 10;
        }
        INFO(dtype_str(dt) << " variant " << variant << (weights ? " float weights" : " bool mask"));
        Case c = make_case(B, T, dt, weights);
        // One advantage a sequence (what GMPO is defined for), but one row with token advantages
        // of both signs and a 0, where verl's sign() picks each token's clip side.
        c.adv = opts_randn({B, 1}, dt).expand({B, T}).contiguous();
        c.adv.index_put_({1}, opts_randn({T}, dt));
        c.adv.index_put_({1, 3}, 0.0);
        auto res = pt::gmpo(c.lp.ours, c.old, c.adv, c.mask, o);
        const Tensor rows = gmpo_rows(c.lp.ref, dbl(c.old), dbl(c.adv), dbl(c.mask), o);
        check_rows(res, rows, rows.abs(), c.lp, tol_of(dt));
      }
}

TEST_CASE("gmpo and cispo with an upstream gradient on losses: the rows scaled", "[torch][gmpo][cispo]") {
  torch::manual_seed(35);
  const int64_t B = 5, T = 17;
  for (auto dt : real_types) {
    INFO(dtype_str(dt));
    Case c = make_case(B, T, dt, false);
    const Tensor up = opts_randn({B}, dt);
    {
      INFO("gmpo");
      auto res = pt::gmpo(c.lp.ours, c.old, c.adv, c.mask);
      const Tensor rows = gmpo_rows(c.lp.ref, dbl(c.old), dbl(c.adv), dbl(c.mask), {});
      (2 * res.loss + (res.losses * up).sum()).backward();
      (2 * rows.sum() + (rows * dbl(up)).sum()).backward();
      CHECK_REL(c.lp.ours.grad(), c.lp.ref.grad(), tol_of(dt));
    }
    Twin lp2 = twin(c.lp.ours);
    {
      INFO("cispo");
      auto res = pt::cispo(lp2.ours, c.old, c.adv, c.mask);
      const Tensor rows =
          agg_rows(cispo_token_losses(lp2.ref, dbl(c.old), dbl(c.adv), {}), c.mask, pl::Aggregation::token_mean);
      (2 * res.loss + (res.losses * up).sum()).backward();
      (2 * rows.sum() + (rows * dbl(up)).sum()).backward();
      CHECK_REL(lp2.ours.grad(), lp2.ref.grad(), tol_of(dt));
    }
  }
}

TEST_CASE("clip_cov against verl's compute_policy_loss_clip_cov over clip_cov_select's tokens", "[torch][clip_cov]") {
  torch::manual_seed(36);
  const int64_t B = 6, T = 29;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (bool weights : {false, true}) {
        INFO(dtype_str(dt) << " " << aname << (weights ? " float weights" : " bool mask"));
        pl::ClipCovOptions o;
        o.aggregation = agg;
        o.cov_ratio = 0.1;  // a dozen tokens of ~120
        o.cov_lower = 0.05;
        o.cov_upper = 3;
        o.seed = 7;
        Case c = make_case(B, T, dt, weights, 0.6);
        const auto sel = pt::clip_cov_select(c.lp.ours, c.old, c.adv, c.mask, o);
        REQUIRE(sel.selected.scalar_type() == dt);
        REQUIRE(sel.selected.sizes() == c.lp.ours.sizes());
        CHECK_FALSE(sel.selected.requires_grad());
        CHECK(sel.info.selected > 1);
        CHECK(sel.selected.sum().item<double>() == sel.info.selected);
        auto res = pt::clip_cov(c.lp.ours, c.old, c.adv, c.mask, sel.selected, o);
        const Tensor l = clip_cov_token_losses(c.lp.ref, dbl(c.old), dbl(c.adv), dbl(sel.selected), o);
        check_token(res, l, c.mask, agg, c.lp, tol_of(dt));
      }
}

TEST_CASE("clip_cov_select picks min(target, candidates) of verl's candidates", "[torch][clip_cov][select]") {
  torch::manual_seed(37);
  const int64_t B = 7, T = 31;
  for (auto dt : real_types)
    for (bool weights : {false, true})
      for (double ratio : {0.05, 0.5}) {
        INFO(dtype_str(dt) << (weights ? " float weights" : " bool mask") << " cov_ratio " << ratio);
        pl::ClipCovOptions o;
        o.cov_ratio = ratio;
        o.cov_lower = 0.05;
        o.cov_upper = 3;
        o.seed = 11;
        Case c = make_case(B, T, dt, weights, 0.6);
        const auto sel = pt::clip_cov_select(c.lp.ours, c.old, c.adv, c.mask, o);
        // verl's candidates: valid, not clipped by the PPO clip, cov_lower < cov < cov_upper.
        const Tensor lp = dbl(c.lp.ours), a = dbl(c.adv), valid = c.mask != 0;
        const Tensor ratio_t = torch::exp(lp - dbl(c.old));
        const Tensor clipped = (-a * ratio_t.clamp(1 - o.clip_low, 1 + o.clip_high)) > (-a * ratio_t);
        const Tensor cov = cov_all(c.lp.ours, c.adv, c.mask, true);
        const Tensor cand = valid & ~clipped & (cov > o.cov_lower) & (cov < o.cov_upper);
        const double n_cand = cand.sum().item<double>();
        const double W = dbl(c.mask).sum().item<double>();
        const double target = std::max(std::floor(ratio * W), 1.0);
        CHECK(sel.info.candidates == n_cand);
        CHECK(sel.info.target == target);
        CHECK(sel.info.selected == std::min(target, n_cand));
        CHECK(sel.info.valid_tokens == valid.sum().item<double>());
        CHECK(sel.info.mask_weight == Approx(W).epsilon(1e-12));
        const Tensor s = sel.selected != 0;
        CHECK(s.sum().item<double>() == sel.info.selected);
        CHECK((s & ~cand).sum().item<int64_t>() == 0);  // only candidates
        CHECK(((sel.selected == 0) | (sel.selected == 1)).all().item<bool>());
        // The same seed and inputs give the same tokens.
        CHECK(same_bits(pt::clip_cov_select(c.lp.ours, c.old, c.adv, c.mask, o).selected, sel.selected));
      }
}

TEST_CASE("kl_cov against verl's compute_policy_loss_kl_cov over kl_cov_select's tokens", "[torch][kl_cov]") {
  torch::manual_seed(38);
  const int64_t B = 6, T = 29;
  for (auto dt : real_types)
    for (const auto& [aname, agg] : aggregations)
      for (bool weights : {false, true}) {
        INFO(dtype_str(dt) << " " << aname << (weights ? " float weights" : " bool mask"));
        pl::KlCovOptions o;
        o.aggregation = agg;
        o.cov_ratio = 0.1;
        o.kl_coef = 0.7;
        Case c = make_case(B, T, dt, weights);
        const auto sel = pt::kl_cov_select(c.lp.ours, c.adv, c.mask, o);
        REQUIRE(sel.selected.scalar_type() == dt);
        CHECK_FALSE(sel.selected.requires_grad());
        CHECK(sel.info.selected > 1);
        auto res = pt::kl_cov(c.lp.ours, c.old, c.adv, c.mask, sel.selected, o);
        const Tensor l = kl_cov_token_losses(c.lp.ref, dbl(c.old), dbl(c.adv), dbl(sel.selected), o);
        check_token(res, l, c.mask, agg, c.lp, tol_of(dt));
      }
}

TEST_CASE("kl_cov_select is verl's torch.topk of cov over the valid tokens", "[torch][kl_cov][select]") {
  torch::manual_seed(39);
  const int64_t B = 7, T = 31;
  for (auto dt : real_types)
    for (bool weights : {false, true})
      for (double ratio : {1e-4, 0.05, 0.3}) {
        INFO(dtype_str(dt) << (weights ? " float weights" : " bool mask") << " cov_ratio " << ratio);
        pl::KlCovOptions o;
        o.cov_ratio = ratio;
        Case c = make_case(B, T, dt, weights);
        const auto sel = pt::kl_cov_select(c.lp.ours, c.adv, c.mask, o);
        // verl: gather the valid tokens, plain means, topk of max(1, int(n * ratio)).
        const Tensor valid = (c.mask != 0).reshape(-1);
        const Tensor idx = torch::nonzero(valid).squeeze(1);
        const Tensor cov = cov_all(c.lp.ours, c.adv, c.mask, false).reshape(-1).index_select(0, idx);
        const int64_t n = idx.size(0);
        const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(n) * ratio));
        const Tensor top = idx.index_select(0, std::get<1>(torch::topk(cov, k)));
        Tensor want = torch::zeros({B * T}, torch::TensorOptions().dtype(dt));
        want.index_fill_(0, top, 1);
        CHECK(sel.info.valid_tokens == static_cast<double>(n));
        CHECK(sel.info.target == static_cast<double>(k));
        CHECK(sel.info.selected == static_cast<double>(k));
        CHECK(same_bits(sel.selected, want.view({B, T})));
      }
}

// ---- errors -------------------------------------------------------------------------------------------

TEST_CASE("the policy losses and selections: wrong dtype or shape names the argument", "[torch][errors]") {
  const Tensor x = torch::randn({3, 4}), m = torch::ones({3, 4}, torch::kBool);
  const Tensor xd = x.to(torch::kDouble), x1 = torch::randn({4}), x35 = torch::randn({3, 5});
  SECTION("cispo, sapo, gpg, gmpo") {
    expect_error<pt::tensor_error>([&] { pt::cispo(x, xd, x, m); }, {"prefloss::torch::cispo", "'old_logp'", "double"});
    expect_error<pt::tensor_error>([&] { pt::sapo(x, x, xd, m); }, {"prefloss::torch::sapo", "'advantages'", "double"});
    expect_error<pt::tensor_error>([&] { pt::gpg(x.to(torch::kHalf), x, x, m); },
                                   {"prefloss::torch::gpg", "'logp'", "float32 or float64"});
    expect_error<pt::tensor_error>([&] { pt::gmpo(x, x, x, m.to(torch::kInt)); },
                                   {"prefloss::torch::gmpo", "'mask'", "bool, uint8 or"});
    expect_error<pl::shape_error>([&] { pt::cispo(x1, x1, x1, m); }, {"prefloss::torch::cispo", "'logp'", "rank 2"});
    expect_error<pl::shape_error>([&] { pt::sapo(x, x35, x, m); }, {"sapo", "'old_logp'", "[3, 5]"});
    expect_error<pl::shape_error>([&] { pt::gpg(x, x, x35, m); }, {"gpg", "'advantages'", "[3, 5]"});
    expect_error<pl::shape_error>(
        [&] {
          pt::gmpo(x, x, x, torch::ones({3, 5}, torch::kBool));
        },
        {"gmpo", "'mask'", "[3, 5]"});
  }
  SECTION("clip_cov, kl_cov") {
    expect_error<pt::tensor_error>([&] { pt::clip_cov(x, x, x, m, xd); },
                                   {"prefloss::torch::clip_cov", "'selected'", "double"});
    expect_error<pt::tensor_error>([&] { pt::kl_cov(xd, xd, xd, m, x); },
                                   {"prefloss::torch::kl_cov", "'selected'", "float"});
    expect_error<pl::shape_error>([&] { pt::clip_cov(x, x, x, m, x35); }, {"clip_cov", "'selected'", "[3, 5]"});
    expect_error<pl::shape_error>([&] { pt::kl_cov(x, x, x, m, x1); },
                                  {"prefloss::torch::kl_cov", "'selected'", "rank 2"});
  }
  SECTION("clip_cov_select, kl_cov_select") {
    expect_error<pt::tensor_error>([&] { pt::clip_cov_select(x, x, xd, m); },
                                   {"prefloss::torch::clip_cov_select", "'advantages'", "double"});
    expect_error<pt::tensor_error>([&] { pt::kl_cov_select(x.to(torch::kBFloat16), x, m); },
                                   {"prefloss::torch::kl_cov_select", "'logp'", "float32 or float64"});
    expect_error<pt::tensor_error>([&] { pt::kl_cov_select(x, x, Tensor()); },
                                   {"prefloss::torch::kl_cov_select", "'mask'", "undefined"});
    expect_error<pl::shape_error>([&] { pt::clip_cov_select(x, x35, x, m); },
                                  {"clip_cov_select", "'old_logp'", "[3, 5]"});
    expect_error<pl::shape_error>([&] { pt::kl_cov_select(x, x1, m); },
                                  {"prefloss::torch::kl_cov_select", "'advantages'", "rank 2"});
    pl::KlCovOptions bad;
    bad.cov_ratio = 0;
    expect_error<pl::option_error>([&] { pt::kl_cov_select(x, x, m, bad); }, {"kl_cov_select", "cov_ratio"});
  }
}

// ---- the core's bits ----------------------------------------------------------------------------------

namespace {
/// The adapter's result against the core's on the same data: loss, losses, metric sums, the
/// finalized metrics and the gradient, bit for bit (float32).
template <class R, class C>
void check_core(R& res, const C& core, const Tensor& lp) {
  CHECK(res.loss.template item<float>() == core.loss);
  CHECK(same_bits(res.losses, from_eigen(core.losses)));
  CHECK(res.metric_sums.sums == core.metric_sums.sums);
  CHECK(res.metric_sums.maxima == core.metric_sums.maxima);
  res.loss.backward();
  const Tensor g = torch::empty(lp.sizes());
  core.backward(pt::mutable_view<float, 2>(g));
  CHECK(same_bits(lp.grad(), g));
}
}  // namespace

TEST_CASE("cispo, sapo, gpg, gmpo, clip_cov, kl_cov and the selections: the core's bits", "[torch][core]") {
  torch::manual_seed(40);
  const int64_t B = 4, T = 33;
  const Tensor old = torch::randn({B, T}) - 2;
  const Tensor lp = (old + 0.5 * torch::randn({B, T})).requires_grad_();
  const Tensor adv = torch::randn({B, T});
  const Tensor mask = random_mask(B, T, 1).to(torch::kFloat) * (0.5 + torch::rand({B, T}));
  const auto L = pt::view<float, 2>(lp), O = pt::view<float, 2>(old), A = pt::view<float, 2>(adv);
  const auto M = pt::view<float, 2>(mask);
  SECTION("cispo") {
    pl::CispoOptions o;
    o.aggregation = pl::Aggregation::seq_mean_token_sum;
    auto res = pt::cispo(lp, old, adv, mask, o);
    const auto core = pl::cispo(L, O, A, M, o);
    CHECK(static_cast<float>(res.metrics.clip_fraction) == core.metrics.clip_fraction);
    CHECK(static_cast<float>(res.metrics.clip_fraction_high) == core.metrics.clip_fraction_high);
    CHECK(static_cast<float>(res.metrics.approx_kl) == core.metrics.approx_kl);
    CHECK(static_cast<float>(res.metrics.ratio_max) == core.metrics.ratio_max);
    CHECK(res.metrics.token_weight == core.metrics.token_weight);
    check_core(res, core, lp);
  }
  SECTION("sapo") {
    auto res = pt::sapo(lp, old, adv, mask);
    const auto core = pl::sapo(L, O, A, M);
    CHECK(static_cast<float>(res.metrics.approx_kl) == core.metrics.approx_kl);
    CHECK(static_cast<float>(res.metrics.ratio_mean) == core.metrics.ratio_mean);
    check_core(res, core, lp);
  }
  SECTION("gpg") {
    auto res = pt::gpg(lp, old, adv, mask);
    const auto core = pl::gpg(L, O, A, M);
    CHECK(static_cast<float>(res.metrics.approx_kl) == core.metrics.approx_kl);
    CHECK(res.metrics.token_weight == core.metrics.token_weight);
    check_core(res, core, lp);
  }
  SECTION("gmpo") {
    pl::GmpoOptions o;
    o.clip_high = 0.3;
    auto res = pt::gmpo(lp, old, adv, mask, o);
    const auto core = pl::gmpo(L, O, A, M, o);
    CHECK(static_cast<float>(res.metrics.clip_fraction) == core.metrics.clip_fraction);
    CHECK(static_cast<float>(res.metrics.clip_fraction_low) == core.metrics.clip_fraction_low);
    check_core(res, core, lp);
  }
  SECTION("clip_cov_select and clip_cov") {
    pl::ClipCovOptions o;
    o.cov_ratio = 0.2;
    o.cov_lower = 0.01;
    o.seed = 3;
    const auto sel = pt::clip_cov_select(lp, old, adv, mask, o);
    Eigen::Tensor<float, 2, Eigen::RowMajor> cs(B, T);
    const pl::CovSelection ci = pl::clip_cov_select(L, O, A, M, o, cs);
    CHECK(same_bits(sel.selected, from_eigen(cs)));
    CHECK(sel.info.valid_tokens == ci.valid_tokens);
    CHECK(sel.info.mask_weight == ci.mask_weight);
    CHECK(sel.info.adv_mean == ci.adv_mean);
    CHECK(sel.info.logp_mean == ci.logp_mean);
    CHECK(sel.info.candidates == ci.candidates);
    CHECK(sel.info.target == ci.target);
    CHECK(sel.info.selected == ci.selected);
    CHECK(ci.selected > 0);
    auto res = pt::clip_cov(lp, old, adv, mask, sel.selected, o);
    const auto core = pl::clip_cov(L, O, A, M, pt::view<float, 2>(sel.selected), o);
    CHECK(static_cast<float>(res.metrics.selected_fraction) == core.metrics.selected_fraction);
    CHECK(static_cast<float>(res.metrics.clip_fraction) == core.metrics.clip_fraction);
    check_core(res, core, lp);
  }
  SECTION("kl_cov_select and kl_cov") {
    pl::KlCovOptions o;
    o.cov_ratio = 0.2;
    o.kl_coef = 0.5;
    const auto sel = pt::kl_cov_select(lp, adv, mask, o);
    Eigen::Tensor<float, 2, Eigen::RowMajor> cs(B, T);
    const pl::CovSelection ci = pl::kl_cov_select(L, A, M, o, cs);
    CHECK(same_bits(sel.selected, from_eigen(cs)));
    CHECK(sel.info.valid_tokens == ci.valid_tokens);
    CHECK(sel.info.mask_weight == ci.mask_weight);
    CHECK(sel.info.adv_mean == ci.adv_mean);
    CHECK(sel.info.logp_mean == ci.logp_mean);
    CHECK(sel.info.candidates == ci.candidates);
    CHECK(sel.info.target == ci.target);
    CHECK(sel.info.selected == ci.selected);
    auto res = pt::kl_cov(lp, old, adv, mask, sel.selected, o);
    const auto core = pl::kl_cov(L, O, A, M, pt::view<float, 2>(sel.selected), o);
    CHECK(static_cast<float>(res.metrics.abs_kl) == core.metrics.abs_kl);
    CHECK(static_cast<float>(res.metrics.selected_fraction) == core.metrics.selected_fraction);
    check_core(res, core, lp);
  }
}

// ---- rollout_is_weights ---------------------------------------------------------------------------------

TEST_CASE("rollout_is_weights against verl's compute_rollout_correction_weights", "[torch][rollout]") {
  torch::manual_seed(41);
  const int64_t B = 6, T = 21;
  for (auto dt : real_types)
    for (const auto level : {pl::RolloutIsLevel::token, pl::RolloutIsLevel::sequence})
      for (const auto bound : {pl::RolloutIsBound::truncate, pl::RolloutIsBound::mask}) {
        INFO(dtype_str(dt) << " level " << static_cast<int>(level) << " bound " << static_cast<int>(bound));
        pl::RolloutIsOptions o;
        o.level = level;
        o.bound = bound;
        o.upper = 1.5;
        if (bound == pl::RolloutIsBound::mask) o.lower = 0.6;
        const Tensor mask = random_mask(B, T, 2);
        const Tensor old = opts_randn({B, T}, dt) - 2;
        // Sequence level: small token log-ratios, so that the row sums fall on both sides of the bounds.
        const double spread = level == pl::RolloutIsLevel::sequence ? 0.15 : 0.4;
        Tensor rollout = old + spread * opts_randn({B, T}, dt);
        // Rows 0 and 1 past the upper and the lower bound at either level (d = +-0.6 a token).
        rollout.index_put_({0}, old.select(0, 0) - 0.6);
        rollout.index_put_({1}, old.select(0, 1) + 0.6);
        const auto r = pt::rollout_is_weights(old, rollout, mask, o);
        REQUIRE(r.weights.scalar_type() == dt);
        REQUIRE(r.keep.scalar_type() == torch::kBool);
        CHECK_FALSE(r.weights.requires_grad());
        const Tensor want = rollout_is_ref(old, rollout, mask, o);
        CHECK_REL(r.weights, want, tol_of(dt));
        // No rejection sampling: every valid token is kept.
        CHECK(torch::equal(r.keep, mask));
        CHECK(r.metrics.valid_tokens == mask.sum().item<double>());
        CHECK(r.metrics.kept_tokens == mask.sum().item<double>());
        const Tensor sel = mask.to(torch::kBool);
        CHECK(r.metrics.weight_max == Approx(want.masked_select(sel).max().item<double>()).epsilon(tol_of(dt)));
        CHECK(r.metrics.weight_mean == Approx(want.masked_select(sel).mean().item<double>()).epsilon(tol_of(dt)));
        // Both sides of the bounds are exercised.
        CHECK((want.masked_select(sel) == (bound == pl::RolloutIsBound::truncate ? o.upper : 0.0)).any().item<bool>());
        CHECK((want.masked_select(sel) < o.upper).any().item<bool>());
      }
}

TEST_CASE("rollout_is_weights: the core's bits, and errors naming the argument", "[torch][rollout][core]") {
  torch::manual_seed(42);
  const int64_t B = 5, T = 17;
  const Tensor old = torch::randn({B, T}) - 2, rollout = (old + 0.4 * torch::randn({B, T})).to(torch::kDouble);
  const Tensor mask = random_mask(B, T, 1).to(torch::kFloat) * (0.5 + torch::rand({B, T}));
  pl::RolloutIsOptions o;
  o.rs = pl::RolloutRs::token_k1;
  o.rs_upper = 1.4;
  const auto r = pt::rollout_is_weights(old, rollout, mask, o);
  Eigen::Tensor<float, 2, Eigen::RowMajor> w(B, T);
  Eigen::Tensor<bool, 2, Eigen::RowMajor> k(B, T);
  const pl::RolloutIsMetrics m =
      pl::rollout_is_weights(pt::view<float, 2>(old), pt::view<double, 2>(rollout), pt::view<float, 2>(mask), o, w, k);
  CHECK(same_bits(r.weights, from_eigen(w)));
  const Tensor kt = torch::empty({B, T}, torch::kBool);
  std::copy(k.data(), k.data() + k.size(), kt.data_ptr<bool>());
  CHECK(same_bits(r.keep, kt));
  CHECK(r.metrics.weight_mean == m.weight_mean);
  CHECK(r.metrics.weight_max == m.weight_max);
  CHECK(r.metrics.weight_min == m.weight_min);
  CHECK(r.metrics.ratio_mean == m.ratio_mean);
  CHECK(r.metrics.masked_fraction == m.masked_fraction);
  CHECK(r.metrics.rs_masked_fraction == m.rs_masked_fraction);
  CHECK(r.metrics.valid_tokens == m.valid_tokens);
  CHECK(r.metrics.kept_tokens == m.kept_tokens);
  CHECK(r.metrics.kept_rows == m.kept_rows);
  CHECK(m.rs_masked_fraction > 0);  // the rejection binds on some tokens
  const Tensor x = torch::randn({3, 4}), bm = torch::ones({3, 4}, torch::kBool);
  expect_error<pt::tensor_error>([&] { pt::rollout_is_weights(x.to(torch::kHalf), x, bm); },
                                 {"prefloss::torch::rollout_is_weights", "'old_logp'", "float32 or float64"});
  expect_error<pt::tensor_error>([&] { pt::rollout_is_weights(x, x, bm.to(torch::kDouble)); },
                                 {"prefloss::torch::rollout_is_weights", "'mask'"});
  expect_error<pl::shape_error>([&] { pt::rollout_is_weights(x, torch::randn({4}), bm); },
                                {"prefloss::torch::rollout_is_weights", "'rollout_logp'", "rank 2"});
  expect_error<pl::shape_error>(
      [&] {
        pt::rollout_is_weights(x, torch::randn({3, 5}), bm);
      },
      {"rollout_is_weights", "'rollout_logp'", "[3, 5]"});
}
