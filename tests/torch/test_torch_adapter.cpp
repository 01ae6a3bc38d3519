// The adapter's semantics: upstream gradients and composition with ordinary torch ops, which
// inputs get a gradient, masked-out NaN/inf, errors (type and message), what the forward and the
// backward allocate, metrics, the zero-copy views, and threads.
#include "torch_reference.hpp"

#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>
#include <prefloss/torch.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

// After the library headers (which declare posix_memalign): the one TU of this executable that
// includes the heap-counting harness. GCC 12 reports a false -Wmismatched-new-delete where the
// harness's operator delete (std::free) is inlined into libtorch's make_unique / vector code
// that got its memory from the harness's own operator new (std::malloc): silenced for the
// harness's lines only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
#include "../alloc_count.hpp"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

using namespace tref;
using torch::indexing::Slice;

namespace {

Tensor randn_t(at::IntArrayRef s, at::ScalarType t = torch::kFloat) {
  return torch::randn(s, torch::TensorOptions().dtype(t));
}

Tensor random_mask(int64_t B, int64_t T, int64_t empty_row = -1) {
  Tensor m = torch::rand({B, T}) < 0.7;
  m.index_put_({Slice(), 0}, true);
  if (empty_row >= 0) m.index_put_({empty_row}, false);
  return m;
}

/// x with NaN, +inf and -inf written at masked-out positions (a copy).
Tensor poison(const Tensor& x, const Tensor& mask) {
  Tensor p = x.detach().clone();
  const Tensor out = mask.to(torch::kBool).logical_not();
  const Tensor bad = torch::full_like(p, std::numeric_limits<double>::quiet_NaN());
  const int64_t n = p.numel();
  Tensor flat = bad.view({n});
  for (int64_t k = 0; k < n; k += 3) flat[k] = std::numeric_limits<double>::infinity();
  for (int64_t k = 1; k < n; k += 3) flat[k] = -std::numeric_limits<double>::infinity();
  return torch::where(out, bad, p);
}

}  // namespace

// ---- upstream gradients, .losses, composition ------------------------------------------------------

TEST_CASE("upstream gradients other than 1 and gradients through .losses", "[torch][autograd]") {
  torch::manual_seed(21);
  const int64_t B = 8, T = 12;
  for (auto dt : {torch::kDouble, torch::kFloat}) {
    INFO(c10::toString(dt));
    const double tol = tol_of(dt);
    const Tensor rc = randn_t({B}, dt), rr = randn_t({B}, dt), w = randn_t({B}, dt);
    const pl::DpoOptions o;
    const auto run = [&](const std::string& how) {
      INFO("dpo upstream: " << how);
      Twin c = twin(randn_t({B}, dt) * 3), r = twin(randn_t({B}, dt) * 3);
      auto res = pt::dpo(c.ours, r.ours, rc, rr, o);
      const Tensor rl = dpo_losses(c.ref, r.ref, dbl(rc), dbl(rr), o);
      const Tensor loss = rl.mean();
      if (how == "3 * loss") {
        (3 * res.loss).backward();
        (3 * loss).backward();
      } else if (how == "full 0.25") {
        res.loss.backward(torch::full({}, 0.25, torch::TensorOptions().dtype(dt)));
        loss.backward(torch::full({}, 0.25, torch::TensorOptions().dtype(torch::kDouble)));
      } else if (how == "w * losses") {
        (w * res.losses).sum().backward();
        (dbl(w) * rl).sum().backward();
      } else if (how == "negative views") {  // values -0.25 and -w held as their negation in memory
        torch::autograd::backward(
            {res.loss, res.losses},
            {torch::_neg_view(torch::full({}, 0.25, torch::TensorOptions().dtype(dt))), torch::_neg_view(w.clone())});
        (-0.25 * loss - (dbl(w) * rl).sum()).backward();
      } else {  // both outputs at once
        (res.loss + (w * res.losses).sum()).backward();
        (loss + (dbl(w) * rl).sum()).backward();
      }
      CHECK_REL(c.ours.grad(), c.ref.grad(), tol);
      CHECK_REL(r.ours.grad(), r.ref.grad(), tol);
    };
    for (const char* how : {"3 * loss", "full 0.25", "w * losses", "negative views", "loss + w * losses"}) run(how);

    // A token loss: the rows scaled in place by the upstream.
    for (const char* how : {"3 * loss", "full 0.25", "w * losses", "negative view"}) {
      INFO("ppo_clip upstream: " << how);
      pl::PpoOptions po;
      po.aggregation = pl::Aggregation::seq_mean_token_mean;
      const Tensor old = randn_t({B, T}, dt) - 1, adv = randn_t({B, T}, dt), mask = random_mask(B, T, 4);
      Twin lp = twin(old + 0.3 * randn_t({B, T}, dt));
      auto res = pt::ppo_clip(lp.ours, old, adv, mask, po);
      const Tensor rows = agg_rows(ppo_token_losses(lp.ref, dbl(old), dbl(adv), nullptr, po), mask, po.aggregation);
      const std::string h = how;
      if (h == "3 * loss") {
        (3 * res.loss).backward();
        (3 * rows.sum()).backward();
      } else if (h == "full 0.25") {
        res.loss.backward(torch::full({}, 0.25, torch::TensorOptions().dtype(dt)));
        (0.25 * rows.sum()).backward();
      } else if (h == "negative view") {
        res.loss.backward(torch::_neg_view(torch::full({}, 0.25, torch::TensorOptions().dtype(dt))));
        (-0.25 * rows.sum()).backward();
      } else {
        (w * res.losses).sum().backward();
        (dbl(w) * rows).sum().backward();
      }
      CHECK_REL(lp.ours.grad(), lp.ref.grad(), tol);
    }
  }
}

TEST_CASE("composition: dpo + 0.1 nll over one leaf, and logp from a parameter through log_softmax",
          "[torch][autograd]") {
  torch::manual_seed(22);
  const int64_t B = 4, T = 10, V = 13;
  for (auto dt : {torch::kDouble, torch::kFloat}) {
    INFO(c10::toString(dt));
    const double tol = tol_of(dt);
    {
      Twin xc = twin(randn_t({B, T}, dt) - 2), xr = twin(randn_t({B, T}, dt) - 2);
      const Tensor mc = random_mask(B, T), mr = random_mask(B, T);
      const Tensor rc = randn_t({B}, dt) * 2 - 15, rr = randn_t({B}, dt) * 2 - 15;
      auto d = pt::dpo(pt::masked_sum(xc.ours, mc), pt::masked_sum(xr.ours, mr), rc, rr);
      auto n = pt::nll(pt::masked_mean(xc.ours, mc));
      (d.loss + 0.1 * n.loss).backward();
      const Tensor ref =
          dpo_losses(ref_masked_sum(xc.ref, mc), ref_masked_sum(xr.ref, mr), dbl(rc), dbl(rr), {}).mean() +
          0.1 * (-ref_masked_mean(xc.ref, mc)).mean();
      ref.backward();
      CHECK_REL(xc.ours.grad(), xc.ref.grad(), tol);
      CHECK_REL(xr.ours.grad(), xr.ref.grad(), tol);
    }
    {
      // A parameter -> log_softmax -> gather -> masked_sum -> dpo: the gradient reaches the
      // parameter through our nodes and torch's.
      Twin wc = twin(randn_t({B, T, V}, dt)), wr = twin(randn_t({B, T, V}, dt));
      const Tensor yc = torch::randint(0, V, {B, T}, torch::kLong), yr = torch::randint(0, V, {B, T}, torch::kLong);
      const Tensor mc = random_mask(B, T), mr = random_mask(B, T);
      const auto logp = [](const Tensor& w, const Tensor& y) {
        return torch::log_softmax(w * 1.5, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1);
      };
      const Tensor rc = randn_t({B}, dt) * 2 - 25, rr = randn_t({B}, dt) * 2 - 25;
      auto d = pt::dpo(pt::masked_sum(logp(wc.ours, yc), mc), pt::masked_sum(logp(wr.ours, yr), mr), rc, rr);
      d.loss.backward();
      dpo_losses(ref_masked_sum(logp(wc.ref, yc), mc), ref_masked_sum(logp(wr.ref, yr), mr), dbl(rc), dbl(rr), {})
          .mean()
          .backward();
      CHECK_REL(wc.ours.grad(), wc.ref.grad(), tol);
      CHECK_REL(wr.ours.grad(), wr.ref.grad(), tol);
    }
    {
      // token_logprobs feeding ppo_clip, and the fused ppo_clip_from_logits with upstream 2.
      Twin z = twin(randn_t({B, T, V}, dt)), z2 = twin(z.ours.detach());
      const Tensor y = torch::randint(0, V, {B, T}, torch::kLong), mask = random_mask(B, T, 1);
      const Tensor lp0 = ref_logprobs(dbl(z.ours), y, mask, 1.0).logp.to(dt);
      const Tensor old = lp0 + 0.2 * randn_t({B, T}, dt), adv = randn_t({B, T}, dt);
      const auto out = pt::token_logprobs(z.ours, y, mask);
      auto res = pt::ppo_clip(out.logp, old, adv, mask);
      (2 * res.loss).backward();
      const auto ref = ref_logprobs(z.ref, y, mask, 1.0);
      const Tensor loss =
          agg_rows(ppo_token_losses(ref.logp, dbl(old), dbl(adv), nullptr, {}), mask, pl::Aggregation::token_mean)
              .sum();
      (2 * loss).backward();
      CHECK_REL(z.ours.grad(), z.ref.grad(), tol);
      auto fused = pt::ppo_clip_from_logits(z2.ours, y, old, adv, mask);
      (2 * fused.loss).backward();
      CHECK_REL(z2.ours.grad(), z.ref.grad(), tol);
    }
  }
}

// ---- routing ------------------------------------------------------------------------------------

TEST_CASE("routing: only inputs that require grad get one; constants never do", "[torch][autograd]") {
  torch::manual_seed(23);
  const int64_t B = 5, T = 9;
  {
    // chosen requires grad, rejected does not; the references require grad but are constants.
    Twin c = twin(randn_t({B}, torch::kDouble));
    const Tensor r = randn_t({B}, torch::kDouble);
    const Tensor rc = randn_t({B}, torch::kDouble).requires_grad_(), rr = randn_t({B}, torch::kDouble).requires_grad_();
    auto res = pt::dpo(c.ours, r, rc, rr);
    res.loss.backward();
    dpo_losses(c.ref, dbl(r), dbl(rc), dbl(rr), {}).mean().backward();
    CHECK_REL(c.ours.grad(), c.ref.grad(), 1e-12);
    CHECK_FALSE(r.grad().defined());
    CHECK_FALSE(rc.grad().defined());
    CHECK_FALSE(rr.grad().defined());
  }
  {
    // Neither policy input requires grad: no graph at all.
    const Tensor c = randn_t({B}), r = randn_t({B});
    auto res = pt::dpo(c, r, randn_t({B}), randn_t({B}));
    CHECK_FALSE(res.loss.requires_grad());
    CHECK_FALSE(res.losses.requires_grad());
  }
  {
    // masked_sum of tokens that do not require grad is a constant; a float mask never gets a grad.
    const Tensor x = randn_t({B, T});
    const Tensor w = torch::rand({B, T}).requires_grad_();
    const Tensor xg = randn_t({B, T}).requires_grad_();
    CHECK_FALSE(pt::masked_sum(x, random_mask(B, T)).values().requires_grad());
    pt::masked_mean(xg, w).values().sum().backward();
    CHECK(xg.grad().defined());
    CHECK_FALSE(w.grad().defined());
  }
  {
    // ppo_clip: old_logp, advantages, ref_logp and a float mask requiring grad get none.
    const Tensor lp = randn_t({B, T}).requires_grad_(), old = randn_t({B, T}).requires_grad_(),
                 adv = randn_t({B, T}).requires_grad_(), ref = randn_t({B, T}).requires_grad_(),
                 mask = random_mask(B, T).to(torch::kFloat).requires_grad_();
    pl::PpoOptions o;
    o.kl_coef = 0.1;
    pt::ppo_clip(lp, old, adv, mask, ref, o).loss.backward();
    CHECK(lp.grad().defined());
    for (const Tensor* t : {&old, &adv, &ref, &mask}) CHECK_FALSE(t->grad().defined());
    const Tensor v = randn_t({B, T}).requires_grad_(), ov = randn_t({B, T}).requires_grad_(),
                 ret = randn_t({B, T}).requires_grad_();
    pt::value_loss(v, ov, ret, mask).loss.backward();
    CHECK(v.grad().defined());
    CHECK_FALSE(ov.grad().defined());
    CHECK_FALSE(ret.grad().defined());
  }
  {
    // kto: ref and the KL batch (z0 is detached) get none.
    const Tensor p = randn_t({B}).requires_grad_(), ref = randn_t({B}).requires_grad_(),
                 klp = randn_t({3}).requires_grad_(), klr = randn_t({3}).requires_grad_();
    pt::kto(p, ref, torch::rand({B}) < 0.5, klp, klr).loss.backward();
    CHECK(p.grad().defined());
    for (const Tensor* t : {&ref, &klp, &klr}) CHECK_FALSE(t->grad().defined());
  }
  {
    // ppo_clip_from_logits: old_logp and advantages requiring grad get none.
    const Tensor z = randn_t({B, T, 7}).requires_grad_(), old = randn_t({B, T}).requires_grad_(),
                 adv = randn_t({B, T}).requires_grad_();
    const Tensor y = torch::randint(0, 7, {B, T}, torch::kLong);
    pt::ppo_clip_from_logits(z, y, old, adv, random_mask(B, T)).loss.backward();
    CHECK(z.grad().defined());
    CHECK_FALSE(old.grad().defined());
    CHECK_FALSE(adv.grad().defined());
  }
}

// ---- masked-out NaN / inf -------------------------------------------------------------------------

TEST_CASE("masked-out NaN and +-inf never reach loss, losses, metrics or gradients", "[torch][mask]") {
  torch::manual_seed(24);
  const int64_t B = 5, T = 17, V = 11;
  const Tensor bmask = random_mask(B, T, 2);
  for (const Tensor& mask : {bmask, bmask.to(torch::kByte), bmask.to(torch::kFloat) * (torch::rand({B, T}) + 0.5)}) {
    INFO("mask " << mask.dtype().name());
    {
      const Tensor clean = torch::where(bmask, randn_t({B, T}), torch::zeros({B, T}));
      const Tensor a = clean.clone().requires_grad_(), b = poison(clean, mask).requires_grad_();
      const Tensor up = randn_t({B});
      for (bool mean : {false, true}) {
        a.mutable_grad() = Tensor();
        b.mutable_grad() = Tensor();
        const Tensor va = mean ? pt::masked_mean(a, mask) : pt::masked_sum(a, mask);
        const Tensor vb = mean ? pt::masked_mean(b, mask) : pt::masked_sum(b, mask);
        CHECK(same_bits(va, vb));
        (va * up).sum().backward();
        (vb * up).sum().backward();
        CHECK(same_bits(a.grad(), b.grad()));
        CHECK(torch::where(bmask, torch::zeros({B, T}), b.grad()).abs().max().item<float>() == 0.0f);
      }
    }
    {
      const Tensor old = torch::where(bmask, randn_t({B, T}) - 1, torch::zeros({B, T}));
      const Tensor lp = torch::where(bmask, old + 0.3 * randn_t({B, T}), torch::zeros({B, T}));
      const Tensor adv = torch::where(bmask, randn_t({B, T}), torch::zeros({B, T}));
      const Tensor ref = torch::where(bmask, old + 0.1 * randn_t({B, T}), torch::zeros({B, T}));
      for (auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
        pl::PpoOptions o;
        o.kl_coef = 0.1;
        o.dual_clip = 3;
        o.aggregation = agg;
        const Tensor la = lp.clone().requires_grad_(), lb = poison(lp, mask).requires_grad_();
        auto ra = pt::ppo_clip(la, old, adv, mask, ref, o);
        auto rb = pt::ppo_clip(lb, poison(old, mask), poison(adv, mask), mask, poison(ref, mask), o);
        CHECK(same_bits(ra.loss, rb.loss));
        CHECK(same_bits(ra.losses, rb.losses));
        CHECK(ra.metric_sums.sums == rb.metric_sums.sums);
        CHECK(ra.metric_sums.maxima == rb.metric_sums.maxima);
        CHECK(std::isfinite(rb.metrics.ratio_max));
        ra.loss.backward();
        rb.loss.backward();
        CHECK(same_bits(la.grad(), lb.grad()));
        CHECK(torch::where(bmask, torch::zeros({B, T}), lb.grad()).abs().max().item<float>() == 0.0f);

        pl::ValueOptions vo;
        vo.aggregation = agg;
        const Tensor va = lp.clone().requires_grad_(), vb = poison(lp, mask).requires_grad_();
        auto wa = pt::value_loss(va, old, adv, mask, vo);
        auto wb = pt::value_loss(vb, poison(old, mask), poison(adv, mask), mask, vo);
        CHECK(same_bits(wa.loss, wb.loss));
        CHECK(same_bits(wa.losses, wb.losses));
        CHECK(wa.metric_sums.sums == wb.metric_sums.sums);
        wa.loss.backward();
        wb.loss.backward();
        CHECK(same_bits(va.grad(), vb.grad()));
        CHECK(torch::where(bmask, torch::zeros({B, T}), vb.grad()).abs().max().item<float>() == 0.0f);
      }
    }
    {
      // Logits rows full of NaN (and inf) at masked-out tokens, labels out of range there.
      const Tensor rows = bmask.unsqueeze(-1).expand({B, T, V});
      const Tensor z = randn_t({B, T, V});
      Tensor zb = torch::where(rows, z, torch::full({B, T, V}, std::numeric_limits<float>::quiet_NaN()));
      zb.index_put_({Slice(), Slice(), 0}, torch::where(bmask, z.index({Slice(), Slice(), 0}),
                                                        torch::full({B, T}, std::numeric_limits<float>::infinity())));
      const Tensor y = torch::randint(0, V, {B, T}, torch::kLong);
      const Tensor yb = torch::where(bmask, y, torch::full({B, T}, V + 5, torch::kLong));
      const Tensor a = z.clone().requires_grad_(), b = zb.clone().requires_grad_();
      pl::LogprobOptions lo;
      lo.entropy = true;
      const auto oa = pt::token_logprobs(a, y, mask, lo);
      const auto ob = pt::token_logprobs(b, yb, mask, lo);
      CHECK(same_bits(oa.logp, ob.logp));
      CHECK(same_bits(oa.entropy, ob.entropy));
      const Tensor g1 = randn_t({B, T}), g2 = randn_t({B, T});
      ((oa.logp * g1).sum() + (oa.entropy * g2).sum()).backward();
      ((ob.logp * g1).sum() + (ob.entropy * g2).sum()).backward();
      CHECK(same_bits(a.grad(), b.grad()));
      CHECK(torch::where(rows, torch::zeros({B, T, V}), b.grad()).abs().max().item<float>() == 0.0f);

      const Tensor old = oa.logp.detach() + 0.2 * randn_t({B, T}), adv = randn_t({B, T});
      pl::LogprobOptions le;
      le.entropy_coef = 0.01;
      const Tensor fa = z.clone().requires_grad_(), fb = zb.clone().requires_grad_();
      auto pa = pt::ppo_clip_from_logits(fa, y, old, adv, mask, {}, le);
      auto pb = pt::ppo_clip_from_logits(fb, yb, poison(old, mask), poison(adv, mask), mask, {}, le);
      CHECK(same_bits(pa.loss, pb.loss));
      CHECK(same_bits(pa.losses, pb.losses));
      CHECK(pa.metric_sums.sums == pb.metric_sums.sums);
      pa.loss.backward();
      pb.loss.backward();
      CHECK(same_bits(fa.grad(), fb.grad()));
    }
  }
}

// ---- errors -------------------------------------------------------------------------------------

TEST_CASE("errors: the exact class, and a message naming the argument and what was seen", "[torch][errors]") {
  const Tensor x = randn_t({3, 4}), m = torch::ones({3, 4}, torch::kBool);
  const Tensor c = randn_t({4}), r = randn_t({4}), rc = randn_t({4}), rr = randn_t({4});
  SECTION("undefined") {
    expect_error<pt::tensor_error>([&] { pt::dpo(Tensor(), r, rc, rr); }, {"dpo", "'chosen'", "undefined"});
    expect_error<pt::tensor_error>([&] { pt::dpo(c, r, rc, Tensor()); }, {"dpo", "'ref_rejected'", "undefined"});
    expect_error<pt::tensor_error>([&] { pt::masked_sum(x, Tensor()); }, {"masked_sum", "'mask'", "undefined"});
    expect_error<pt::tensor_error>([&] { pt::ppo_clip(x, x, x, Tensor()); }, {"ppo_clip", "'mask'", "undefined"});
  }
  SECTION("not on the CPU (meta stands in for CUDA)") {
    const Tensor meta = torch::empty({2, 3}, torch::kMeta);
    expect_error<pt::tensor_error>(
        [&] {
          pt::masked_sum(meta, torch::ones({2, 3}, torch::kBool));
        },
        {"masked_sum", "'tokens'", "meta", ".cpu()"});
    expect_error<pt::tensor_error>(
        [&] {
          pt::masked_mean(torch::ones({2, 3}), torch::empty({2, 3}, torch::kMeta));
        },
        {"masked_mean", "'mask'", "meta"});
    expect_error<pt::tensor_error>([&] { pt::nll(torch::empty({4}, torch::kMeta)); },
                                   {"nll", "'logp_sequence'", "meta"});
    expect_error<pt::tensor_error>(
        [&] {
          pt::ppo_clip(x, torch::empty({3, 4}, torch::kMeta), x, m);
        },
        {"ppo_clip", "'old_logp'", "meta"});
  }
  SECTION("wrong dtype") {
    expect_error<pt::tensor_error>(
        [&] {
          pt::masked_sum(torch::ones({3, 4}, torch::kInt), m);
        },
        {"masked_sum", "'tokens'", "int", "[3, 4]"});
    expect_error<pt::tensor_error>([&] { pt::dpo(c, r, rc.to(torch::kDouble), rr); },
                                   {"dpo", "'ref_chosen'", "double", "[4]", "the dtype of 'chosen'"});
    expect_error<pt::tensor_error>([&] { pt::masked_sum(x, m.to(torch::kDouble)); },
                                   {"masked_sum", "'mask'", "double", "[3, 4]"});
    expect_error<pt::tensor_error>([&] { pt::kto(c, rc, c, c, c); }, {"kto", "'desirable'", "float"});
    expect_error<pt::tensor_error>(
        [&] {
          pt::token_logprobs(randn_t({3, 4, 5}), x, m);
        },
        {"token_logprobs", "'labels'", "float"});
    expect_error<pt::tensor_error>([&] { pt::ppo_clip(x, x.to(torch::kDouble), x, m); },
                                   {"ppo_clip", "'old_logp'", "double"});
  }
  SECTION("wrong rank and batch mismatch") {
    expect_error<prefloss::shape_error>(
        [&] {
          pt::masked_sum(randn_t({3, 4, 2}), m);
        },
        {"masked_sum", "'tokens'", "rank 2", "[3, 4, 2]"});
    expect_error<prefloss::shape_error>([&] { pt::dpo(x, r, rc, rr); }, {"dpo", "'chosen'", "rank 1", "[3, 4]"});
    expect_error<prefloss::shape_error>([&] { pt::dpo(c, randn_t({5}), rc, rr); },
                                        {"dpo", "'rejected'", "batch 5", "'chosen'", "batch 4"});
    expect_error<prefloss::shape_error>(
        [&] {
          pt::masked_sum(x, torch::ones({3, 5}, torch::kBool));
        },
        {"masked_sum", "'mask'"});
    expect_error<prefloss::shape_error>([&] { pt::ppo_clip(x, randn_t({3, 5}), x, m); }, {"ppo_clip", "'old_logp'"});
  }
  SECTION("not contiguous") {
    const Tensor wide = randn_t({3, 8});
    expect_error<prefloss::layout_error>(
        [&] {
          pt::masked_sum(randn_t({4, 3}).t(), m);
        },
        {"masked_sum", "'tokens'", "strides", ".contiguous()"});
    expect_error<prefloss::layout_error>([&] { pt::masked_sum(wide.slice(1, 0, 4), m); },
                                         {"masked_sum", "'tokens'", "[3, 4]", "strides [8, 1]", "tokens.contiguous()"});
    expect_error<prefloss::layout_error>(
        [&] {
          pt::masked_sum(x, torch::ones({3, 8}, torch::kBool).slice(1, 0, 4));
        },
        {"masked_sum", "'mask'", "mask.contiguous()"});
    expect_error<prefloss::layout_error>([&] { pt::dpo(randn_t({8}).slice(0, 0, 8, 2), r, rc, rr); },
                                         {"dpo", "'chosen'", "chosen.contiguous()"});
    expect_error<prefloss::layout_error>([&] { pt::ppo_clip(x, x, wide.slice(1, 4, 8), m); },
                                         {"ppo_clip", "'advantages'", "advantages.contiguous()"});
  }
  SECTION("a negative view (its memory holds the negated values)") {
    expect_error<prefloss::layout_error>([&] { pt::masked_sum(torch::_neg_view(x), m); },
                                         {"masked_sum", "'tokens'", "negative view", "tokens.resolve_neg()"});
    expect_error<prefloss::layout_error>([&] { pt::dpo(c, r, torch::_neg_view(rc), rr); },
                                         {"dpo", "'ref_chosen'", "ref_chosen.resolve_neg()"});
  }
  SECTION("option errors pass through") {
    pl::DpoOptions o;
    o.beta = 0;
    expect_error<prefloss::option_error>([&] { pt::dpo(c, r, rc, rr, o); }, {"dpo", "beta"});
    o.beta = -1;
    expect_error<prefloss::option_error>([&] { pt::dpo(c, r, rc, rr, o); }, {"dpo", "beta"});
    pl::PpoOptions po;
    po.clip_low = 2;
    expect_error<prefloss::option_error>([&] { pt::ppo_clip(x, x, x, m, po); }, {"ppo_clip", "clip_low"});
    pl::KtoOptions ko;
    ko.beta = 0;
    expect_error<prefloss::option_error>([&] { pt::kto(c, rc, torch::ones({4}, torch::kBool), c, c, ko); },
                                         {"kto", "beta"});
  }
  SECTION("an in-place change of a kept tensor between forward and backward: tensor_error out of backward()") {
    const Tensor xg = randn_t({3, 4}).requires_grad_();
    Tensor mask = torch::ones({3, 4}, torch::kBool);
    auto res = pt::nll(pt::masked_sum(xg, mask));
    mask.index_put_({0, 1}, false);
    // The exception of our node's backward arrives through loss.backward() with its own type.
    expect_error<pt::tensor_error>([&] { res.loss.backward({}, /*retain_graph=*/true); },
                                   {"nll", "the mask of argument 'logp_sequence'", "modified in place", "version"});
    CHECK_FALSE(xg.grad().defined());

    const Tensor lp = randn_t({3, 4}).requires_grad_(), adv = randn_t({3, 4});
    auto p = pt::ppo_clip(lp, lp.detach(), adv, m);
    adv.mul_(2);
    expect_error<pt::tensor_error>([&] { p.loss.backward(); }, {"ppo_clip", "'advantages'", "modified in place"});
  }
  SECTION("a second backward of ppo_clip_from_logits") {
    const Tensor z = randn_t({3, 4, 5}).requires_grad_();
    const Tensor y = torch::randint(0, 5, {3, 4}, torch::kLong);
    auto out = pt::ppo_clip_from_logits(z, y, randn_t({3, 4}), randn_t({3, 4}), m);
    out.loss.backward({}, /*retain_graph=*/true);
    REQUIRE(z.grad().defined());
    const Tensor first = z.grad().clone();
    expect_error<pt::tensor_error>([&] { out.loss.backward({}, true); },
                                   {"ppo_clip_from_logits", "second time", "retain_graph"});
    CHECK(same_bits(z.grad(), first));  // nothing was accumulated by the failed call
  }
  SECTION("a second backward without retain_graph, through a node that keeps tensors") {
    const Tensor xg = randn_t({3, 4}).requires_grad_();
    auto res = pt::nll(pt::masked_sum(xg, m));
    CHECK(res.loss.grad_fn()->name() == "prefloss::torch::nll");
    res.loss.backward();
    const Tensor first = xg.grad().clone();
    expect_error<pt::tensor_error>([&] { res.loss.backward(); }, {"nll", "second time", "retain_graph=true"});
    CHECK(same_bits(xg.grad(), first));
  }
  SECTION("nothing is built on a rejected call") {
    const Tensor cg = randn_t({4}).requires_grad_();
    REQUIRE_THROWS(pt::dpo(cg, randn_t({5}), rc, rr));
    CHECK_FALSE(cg.grad().defined());
  }
}

// ---- allocation ---------------------------------------------------------------------------------

namespace {

/// Counts the bytes and calls of every CPU tensor allocation, forwarding to the default allocator.
struct CountingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  mutable std::atomic<long> bytes{0}, calls{0};
  c10::DataPtr allocate(size_t n) const override {
    bytes += static_cast<long>(n);
    calls += 1;
    return base->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
};

CountingAllocator& counting() {
  static CountingAllocator* a = [] {
    auto* c = new CountingAllocator;
    c->base = c10::GetDefaultCPUAllocator();
    c10::SetCPUAllocator(c, /*priority=*/255);
    return c;
  }();
  return *a;
}

struct Traffic {
  long tensor_bytes = 0, tensor_calls = 0, heap_bytes = 0, heap_calls = 0;
};

template <class Fn>
Traffic measure(Fn&& f) {
  CountingAllocator& c = counting();
  REQUIRE(c10::GetCPUAllocator() == &c);
  c.bytes = 0;
  c.calls = 0;
  const auto heap = alloc_count::measure(f);
  return {c.bytes.load(), c.calls.load(), heap.bytes, heap.calls};
}

}  // namespace

TEST_CASE("allocation: the forward allocates O(batch); the backward only the gradients autograd receives",
          "[torch][alloc]") {
  const int64_t B = 64;
  // Cold: no freed gradient memory to reuse, so the gradients' bytes are all new (the cache's
  // own test below checks what it saves).
  const std::size_t limit = pt::set_gradient_cache_limit(0);
  struct Run {
    Traffic fwd, both;
  };
  SECTION("dpo over masked_sum") {
    const auto run = [&](int64_t T, bool both_grad) {
      torch::manual_seed(25);
      const Tensor xc = randn_t({B, T}).requires_grad_(), xr = randn_t({B, T}).requires_grad_(both_grad);
      const Tensor mc = random_mask(B, T), mr = random_mask(B, T);
      const Tensor rc = randn_t({B}), rr = randn_t({B});
      Run out;
      // Warm up once (first-call caches of libtorch), then measure.
      pt::dpo(pt::masked_sum(xc, mc), pt::masked_sum(xr, mr), rc, rr).loss.backward();
      xc.mutable_grad() = Tensor();
      if (both_grad) xr.mutable_grad() = Tensor();
      pt::PreferenceResult res;
      out.fwd = measure([&] { res = pt::dpo(pt::masked_sum(xc, mc), pt::masked_sum(xr, mr), rc, rr); });
      res = {};
      out.both = measure([&] {
        res = pt::dpo(pt::masked_sum(xc, mc), pt::masked_sum(xr, mr), rc, rr);
        res.loss.backward();
      });
      CHECK(xc.grad().defined());
      CHECK(xr.grad().defined() == both_grad);
      return out;
    };
    for (bool both_grad : {true, false}) {
      INFO((both_grad ? "chosen and rejected require grad" : "only chosen requires grad"));
      const Run a = run(512, both_grad), b = run(2048, both_grad);
      const long token_inputs = both_grad ? 2 : 1;
      INFO("forward tensor bytes " << a.fwd.tensor_bytes << " / " << b.fwd.tensor_bytes << ", heap " << a.fwd.heap_bytes
                                   << " / " << b.fwd.heap_bytes);
      INFO("fwd+bwd tensor bytes " << a.both.tensor_bytes << " / " << b.both.tensor_bytes << ", heap "
                                   << a.both.heap_bytes << " / " << b.both.heap_bytes);
      // Forward: O(batch), the same bytes for both T.
      CHECK(a.fwd.tensor_bytes <= 8 * B * 8 + 1024);
      CHECK(a.fwd.tensor_bytes == b.fwd.tensor_bytes);
      CHECK(a.fwd.heap_bytes <= 32 * B * 8 + 65536);
      CHECK(b.fwd.heap_bytes == a.fwd.heap_bytes);
      // Forward + backward: the gradient tensors (B*T*4 per differentiable token input) and O(batch).
      const long ga = token_inputs * B * 512 * 4, gb = token_inputs * B * 2048 * 4;
      CHECK(a.both.tensor_bytes >= ga);
      CHECK(a.both.tensor_bytes - ga <= 16 * B * 8 + 1024);
      CHECK(b.both.tensor_bytes - gb == a.both.tensor_bytes - ga);
      CHECK(a.both.heap_bytes - ga <= 32 * B * 8 + 65536);
      CHECK(b.both.heap_bytes - gb == a.both.heap_bytes - ga);
    }
  }
  SECTION("ppo_clip") {
    const auto run = [&](int64_t T) {
      torch::manual_seed(26);
      const Tensor old = randn_t({B, T}), adv = randn_t({B, T}), mask = random_mask(B, T);
      const Tensor lp = (old + 0.1 * randn_t({B, T})).requires_grad_();
      pl::PpoOptions o;
      o.aggregation = pl::Aggregation::seq_mean_token_mean;
      pt::ppo_clip(lp, old, adv, mask, o).loss.backward();
      lp.mutable_grad() = Tensor();
      Run out;
      pt::PpoResult res;
      out.fwd = measure([&] { res = pt::ppo_clip(lp, old, adv, mask, o); });
      res = {};
      out.both = measure([&] {
        res = pt::ppo_clip(lp, old, adv, mask, o);
        res.loss.backward();
      });
      CHECK(lp.grad().defined());
      return out;
    };
    const Run a = run(512), b = run(2048);
    INFO("forward tensor bytes " << a.fwd.tensor_bytes << " / " << b.fwd.tensor_bytes << ", heap " << a.fwd.heap_bytes
                                 << " / " << b.fwd.heap_bytes);
    INFO("fwd+bwd tensor bytes " << a.both.tensor_bytes << " / " << b.both.tensor_bytes << ", heap "
                                 << a.both.heap_bytes << " / " << b.both.heap_bytes);
    const long ga = B * 512 * 4, gb = B * 2048 * 4;
    // logp requires a gradient: the forward is the core's fused pass and allocates that gradient
    // (handed to autograd by the backward, which allocates no more of it).
    CHECK(a.fwd.tensor_bytes >= ga);
    CHECK(a.fwd.tensor_bytes - ga <= 8 * B * 8 + 1024);
    CHECK(b.fwd.tensor_bytes - gb == a.fwd.tensor_bytes - ga);
    CHECK(a.fwd.heap_bytes - ga <= 32 * B * 8 + 65536);
    CHECK(b.fwd.heap_bytes - gb == a.fwd.heap_bytes - ga);
    CHECK(a.both.tensor_bytes - a.fwd.tensor_bytes <= 1024);
    // Without a gradient to compute, the forward allocates O(batch) only.
    const auto no_grad_fwd = [&](long T) {
      const Tensor lp = (randn_t({B, T}) * 0.1 - 1).contiguous(), old = lp + 0.05 * randn_t({B, T}),
                   adv = randn_t({B, T});
      const Tensor mask = random_mask(B, T);
      pl::PpoOptions o;
      o.aggregation = pl::Aggregation::seq_mean_token_mean;
      pt::PpoResult res;
      return measure([&] { res = pt::ppo_clip(lp, old, adv, mask, o); });
    };
    const auto na = no_grad_fwd(512), nb = no_grad_fwd(2048);
    CHECK(na.tensor_bytes <= 8 * B * 8 + 1024);
    CHECK(na.tensor_bytes == nb.tensor_bytes);
    CHECK(na.heap_bytes <= 32 * B * 8 + 65536);
    CHECK(na.heap_bytes == nb.heap_bytes);
    CHECK(a.both.tensor_bytes >= ga);
    CHECK(a.both.tensor_bytes - ga <= 16 * B * 8 + 1024);
    CHECK(b.both.tensor_bytes - gb == a.both.tensor_bytes - ga);
    CHECK(a.both.heap_bytes - ga <= 32 * B * 8 + 65536);
    CHECK(b.both.heap_bytes - gb == a.both.heap_bytes - ga);
  }
  pt::set_gradient_cache_limit(limit);
}

TEST_CASE("the gradient cache: a step reuses the memory of the gradients the trainer freed", "[torch][alloc]") {
  const int64_t B = 64, T = 2048;
  const std::size_t bytes = static_cast<std::size_t>(B * T) * sizeof(float);
  REQUIRE(bytes >= 65536);  // the cache's smallest block
  pt::set_gradient_cache_limit(0);
  CHECK(pt::gradient_cache_bytes() == 0);
  CHECK(pt::set_gradient_cache_limit(std::size_t{64} << 20) == 0);
  CHECK(pt::gradient_cache_limit() == std::size_t{64} << 20);
  torch::manual_seed(27);
  const Tensor xc = randn_t({B, T}).requires_grad_(), xr = randn_t({B, T}).requires_grad_();
  const Tensor mc = random_mask(B, T), mr = random_mask(B, T), rc = randn_t({B}), rr = randn_t({B});
  const auto step = [&] { pt::dpo(pt::masked_sum(xc, mc), pt::masked_sum(xr, mr), rc, rr).loss.backward(); };

  step();
  const Tensor gc = xc.grad().clone(), gr = xr.grad().clone();
  const void* pc = xc.grad().data_ptr();
  const void* pr = xr.grad().data_ptr();
  xc.mutable_grad() = Tensor();  // zero_grad(set_to_none): the blocks go to the cache
  xr.mutable_grad() = Tensor();
  CHECK(pt::gradient_cache_bytes() == 2 * bytes);

  SECTION("the next step takes them: no new tensor memory, the same gradients") {
    const Traffic t = measure(step);
    CHECK(t.tensor_bytes < 65536);
    CHECK(pt::gradient_cache_bytes() == 0);
    const std::set<const void*> freed{pc, pr};
    CHECK(freed.count(xc.grad().data_ptr()) == 1);
    CHECK(freed.count(xr.grad().data_ptr()) == 1);
    CHECK(xc.grad().data_ptr() != xr.grad().data_ptr());
    CHECK(same_bits(xc.grad(), gc));
    CHECK(same_bits(xr.grad(), gr));
  }
  SECTION("a cached gradient is an ordinary tensor: it resizes, and it may be freed on another thread") {
    step();
    Tensor g = xc.grad();
    xc.mutable_grad() = Tensor();
    g.resize_({B, 2 * T});
    g.fill_(1.0f);
    CHECK(g.sum().item<double>() == static_cast<double>(2 * B * T));
    std::thread([h = std::move(g)]() mutable { h = Tensor(); }).join();
    CHECK(pt::gradient_cache_bytes() >= bytes);
  }
  SECTION("the limit: 0 frees what is kept; a block larger than the limit is not kept") {
    CHECK(pt::set_gradient_cache_limit(bytes) == std::size_t{64} << 20);
    CHECK(pt::gradient_cache_bytes() == bytes);  // the oldest block was freed to fit
    pt::set_gradient_cache_limit(0);
    CHECK(pt::gradient_cache_bytes() == 0);
    pt::set_gradient_cache_limit(bytes - 1);
    step();
    xc.mutable_grad() = Tensor();
    xr.mutable_grad() = Tensor();
    CHECK(pt::gradient_cache_bytes() == 0);
  }
  pt::set_gradient_cache_limit(std::size_t{64} << 20);
}

// ---- metrics ------------------------------------------------------------------------------------

TEST_CASE("metrics: the core's float metrics are the adapter's double metrics rounded; the sums are equal",
          "[torch][metrics]") {
  torch::manual_seed(27);
  const int64_t B = 9, T = 14;
  const Tensor c = randn_t({B}) * 3, r = randn_t({B}) * 3, rc = randn_t({B}), rr = randn_t({B});
  const auto f = [](double v) { return static_cast<float>(v); };
  {
    pl::DpoOptions o;
    o.beta = 0.3;
    const auto res = pt::dpo(c, r, rc, rr, o);
    const auto core =
        pl::dpo(pt::view<float, 1>(c), pt::view<float, 1>(r), pt::view<float, 1>(rc), pt::view<float, 1>(rr), o);
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(core.metrics.reward_chosen == f(res.metrics.reward_chosen));
    CHECK(core.metrics.reward_rejected == f(res.metrics.reward_rejected));
    CHECK(core.metrics.reward_margin == f(res.metrics.reward_margin));
    CHECK(core.metrics.reward_accuracy == f(res.metrics.reward_accuracy));
    // And they are TRL's: rewards beta * (policy - reference).
    const Tensor wc = 0.3 * (dbl(c) - dbl(rc)), wr = 0.3 * (dbl(r) - dbl(rr));
    CHECK(res.metrics.reward_chosen == Approx(wc.mean().item<double>()).epsilon(1e-12));
    CHECK(res.metrics.reward_margin == Approx((wc - wr).mean().item<double>()).epsilon(1e-12));
    CHECK(res.metrics.reward_accuracy == (wc > wr).to(torch::kDouble).mean().item<double>());
  }
  {
    const Tensor nc = -torch::rand({B}) - 0.1, nr = -torch::rand({B}) - 0.2;
    const auto res = pt::orpo(nc, nr);
    const auto core = pl::orpo(pt::view<float, 1>(nc), pt::view<float, 1>(nr));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(core.metrics.log_odds_ratio == f(res.metrics.log_odds_ratio));
    CHECK(core.metrics.log_odds_chosen == f(res.metrics.log_odds_chosen));
    CHECK(core.metrics.nll_loss == f(res.metrics.nll_loss));
    CHECK(core.metrics.reward_chosen == f(res.metrics.reward_chosen));
  }
  {
    const Tensor des = torch::rand({B}) < 0.5, klp = randn_t({4}), klr = randn_t({4});
    const auto res = pt::kto(c, rc, des.to(torch::kByte), klp, klr);
    const auto core = pl::kto(pt::view<float, 1>(c), pt::view<float, 1>(rc), pt::view<bool, 1>(des),
                              pt::view<float, 1>(klp), pt::view<float, 1>(klr));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(res.metric_sums.maxima == core.metric_sums.maxima);
    CHECK(core.metrics.reference_point == f(res.metrics.reference_point));
    CHECK(core.metrics.kl_mean == f(res.metrics.kl_mean));
    CHECK(core.metrics.count_desirable == res.metrics.count_desirable);
    CHECK(core.metrics.count_desirable == des.sum().item<int64_t>());
    CHECK(core.metrics.reward_desirable == f(res.metrics.reward_desirable));
    CHECK(core.metrics.reward_undesirable_sum == f(res.metrics.reward_undesirable_sum));
    CHECK(core.metrics.logps_desirable_sum == f(res.metrics.logps_desirable_sum));
  }
  {
    const Tensor s = randn_t({B, 3});
    const auto res = pt::bradley_terry_ranking(s);
    const auto core = pl::bradley_terry_ranking(pt::view<float, 2>(s));
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(core.metrics.accuracy == f(res.metrics.accuracy));
    CHECK(core.metrics.reward_mean == f(res.metrics.reward_mean));
    CHECK(core.metrics.reward_margin == f(res.metrics.reward_margin));
    const auto n = pt::nll(c);
    CHECK(pl::nll(pt::view<float, 1>(c)).metrics.mean_logp == f(n.metrics.mean_logp));
  }
  {
    const Tensor old = randn_t({B, T}), lp = old + 0.4 * randn_t({B, T}), adv = randn_t({B, T}),
                 ref = old + 0.1 * randn_t({B, T});
    const Tensor mask = random_mask(B, T).to(torch::kFloat) * torch::rand({B, T});
    pl::PpoOptions o;
    o.dual_clip = 3;
    o.kl_coef = 0.1;
    const auto res = pt::ppo_clip(lp, old, adv, mask, ref, o);
    const auto core = pl::ppo_clip(pt::view<float, 2>(lp), pt::view<float, 2>(old), pt::view<float, 2>(adv),
                                   pt::view<float, 2>(mask), pt::view<float, 2>(ref), o);
    CHECK(res.metric_sums.sums == core.metric_sums.sums);
    CHECK(res.metric_sums.maxima == core.metric_sums.maxima);
    CHECK(core.metrics.clip_fraction == f(res.metrics.clip_fraction));
    CHECK(core.metrics.clip_fraction_low == f(res.metrics.clip_fraction_low));
    CHECK(core.metrics.approx_kl == f(res.metrics.approx_kl));
    CHECK(core.metrics.ratio_mean == f(res.metrics.ratio_mean));
    CHECK(core.metrics.ratio_max == f(res.metrics.ratio_max));
    CHECK(core.metrics.kl_mean == f(res.metrics.kl_mean));
    CHECK(core.metrics.token_weight == res.metrics.token_weight);
    // Float weights are summed in float lanes widened into double, within 4.2e-7 of the sum of
    // their magnitudes (prefloss's documented bound; the lanes differ between SSE2 and AVX-512).
    CHECK(res.metrics.token_weight == Approx(mask.to(torch::kDouble).sum().item<double>()).epsilon(4.2e-7));
    const auto v = pt::value_loss(lp, old, adv, mask);
    const auto vc = pl::value_loss(pt::view<float, 2>(lp), pt::view<float, 2>(old), pt::view<float, 2>(adv),
                                   pt::view<float, 2>(mask));
    CHECK(v.metric_sums.sums == vc.metric_sums.sums);
    CHECK(vc.metrics.clip_fraction == f(v.metrics.clip_fraction));
    CHECK(vc.metrics.value_mean == f(v.metrics.value_mean));
  }
}

// ---- views --------------------------------------------------------------------------------------

TEST_CASE("view and mutable_view: zero copy, and their errors", "[torch][view]") {
  const Tensor t = randn_t({3, 5}, torch::kDouble);
  const auto v = pt::view<double, 2>(t, "t");
  CHECK(static_cast<const void*>(v.data()) == t.data_ptr());
  CHECK(v.dimension(0) == 3);
  CHECK(v.dimension(1) == 5);
  CHECK(v(1, 2) == t[1][2].item<double>());
  auto w = pt::mutable_view<double, 2>(t, "t");
  CHECK(static_cast<void*>(w.data()) == t.data_ptr());
  w(2, 4) = 42.5;
  CHECK(t[2][4].item<double>() == 42.5);
  const Tensor b = torch::ones({4}, torch::kBFloat16), y = torch::zeros({2, 2}, torch::kInt);
  CHECK(static_cast<const void*>(pt::view<Eigen::bfloat16, 1>(b).data()) == b.data_ptr());
  CHECK(static_cast<const void*>(pt::view<std::int32_t, 2>(y).data()) == y.data_ptr());
  CHECK(static_cast<const void*>(pt::view<bool, 2>(torch::ones({2, 2}, torch::kBool)).data()) != nullptr);

  expect_error<pt::tensor_error>([&] { pt::view<float, 2>(t, "logits"); }, {"view", "'logits'", "Float", "double"});
  expect_error<pt::tensor_error>([&] { pt::mutable_view<double, 2>(Tensor(), "out"); },
                                 {"mutable_view", "'out'", "undefined"});
  expect_error<pt::tensor_error>(
      [&] {
        pt::view<float, 2>(torch::empty({2, 2}, torch::kMeta), "m");
      },
      {"view", "'m'", "meta"});
  expect_error<prefloss::shape_error>([&] { pt::view<double, 3>(t, "t"); }, {"view", "'t'", "rank 3", "[3, 5]"});
  expect_error<prefloss::layout_error>([&] { pt::view<double, 2>(t.t(), "t"); }, {"view", "'t'", "t.contiguous()"});
  expect_error<prefloss::layout_error>([&] { pt::mutable_view<double, 2>(t.slice(1, 1, 3), "g"); },
                                       {"mutable_view", "'g'", "g.contiguous()"});
}

// ---- threads --------------------------------------------------------------------------------------

TEST_CASE("threads: a prefloss::ThreadPool gives the same bits as one thread", "[torch][threads]") {
  torch::manual_seed(28);
  pl::ThreadPool pool(2);
  const int64_t B = 64, T = 300, V = 50;
  const Tensor old = randn_t({B, T}) - 2, adv = randn_t({B, T}), mask = random_mask(B, T, 5);
  const Tensor lp0 = old + 0.3 * randn_t({B, T});
  for (auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean}) {
    pl::PpoOptions one, many;
    one.aggregation = many.aggregation = agg;
    many.threads = pool;
    const Tensor a = lp0.clone().requires_grad_(), b = lp0.clone().requires_grad_();
    auto ra = pt::ppo_clip(a, old, adv, mask, one);
    auto rb = pt::ppo_clip(b, old, adv, mask, many);
    CHECK(same_bits(ra.loss, rb.loss));
    CHECK(same_bits(ra.losses, rb.losses));
    CHECK(ra.metric_sums.sums == rb.metric_sums.sums);
    ra.loss.backward();
    rb.loss.backward();
    CHECK(same_bits(a.grad(), b.grad()));
  }
  {
    pl::ValueOptions one, many;
    many.threads = pool;
    const Tensor a = lp0.clone().requires_grad_(), b = lp0.clone().requires_grad_();
    auto ra = pt::value_loss(a, old, adv, mask, one);
    auto rb = pt::value_loss(b, old, adv, mask, many);
    CHECK(same_bits(ra.loss, rb.loss));
    ra.loss.backward();
    rb.loss.backward();
    CHECK(same_bits(a.grad(), b.grad()));
  }
  {
    const Tensor xc = randn_t({B, T}), xr = randn_t({B, T});
    const Tensor rc = randn_t({B}), rr = randn_t({B});
    pl::DpoOptions one, many;
    many.threads = pool;
    const Tensor a = xc.clone().requires_grad_(), b = xc.clone().requires_grad_();
    auto ra = pt::dpo(pt::masked_sum(a, mask), pt::masked_sum(xr, mask), rc, rr, one);
    auto rb = pt::dpo(pt::masked_sum(b, mask), pt::masked_sum(xr, mask), rc, rr, many);
    CHECK(same_bits(ra.loss, rb.loss));
    CHECK(same_bits(ra.losses, rb.losses));
    ra.loss.backward();
    rb.loss.backward();
    CHECK(same_bits(a.grad(), b.grad()));
  }
  {
    const int64_t Bl = 8, Tl = 40;
    const Tensor z = randn_t({Bl, Tl, V});
    const Tensor y = torch::randint(0, V, {Bl, Tl}, torch::kLong), m = random_mask(Bl, Tl, 1);
    pl::LogprobOptions one, many;
    one.entropy = many.entropy = true;
    many.threads = pool;
    const Tensor a = z.clone().requires_grad_(), b = z.clone().requires_grad_();
    const auto oa = pt::token_logprobs(a, y, m, one), ob = pt::token_logprobs(b, y, m, many);
    CHECK(same_bits(oa.logp, ob.logp));
    CHECK(same_bits(oa.entropy, ob.entropy));
    (oa.logp.sum() + oa.entropy.sum()).backward();
    (ob.logp.sum() + ob.entropy.sum()).backward();
    CHECK(same_bits(a.grad(), b.grad()));
    const Tensor o2 = oa.logp.detach() + 0.1 * randn_t({Bl, Tl}), ad = randn_t({Bl, Tl});
    pl::PpoOptions pmany;
    pmany.threads = pool;
    const Tensor c = z.clone().requires_grad_(), d = z.clone().requires_grad_();
    auto pa = pt::ppo_clip_from_logits(c, y, o2, ad, m);
    auto pb = pt::ppo_clip_from_logits(d, y, o2, ad, m, pmany);
    CHECK(same_bits(pa.loss, pb.loss));
    CHECK(same_bits(pa.losses, pb.losses));
    pa.loss.backward();
    pb.loss.backward();
    CHECK(same_bits(c.grad(), d.grad()));
  }
}
