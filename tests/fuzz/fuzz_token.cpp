// libFuzzer harness: the token-level RL pieces (ppo_clip in all four forms, gmpo, clip_cov / kl_cov
// after their selections and value_loss two-pass and fused, kl_estimate in all three forms, gae, masked_whiten,
// group_advantages in both forms) over float and double tokens and every mask type. The fused form of each token loss
// must agree bit for bit with its two-pass form.
#include "fuzz_common.hpp"

namespace fuzz {
namespace {

/// loss() then .backward(grad), and loss(grad) fused: both checked, and they must agree.
template <class T, class Loss>
void both_forms(Decoder& d, const char* what, std::initializer_list<Bytes*> inputs, Buf<T>& grad, const Loss& loss) {
  const auto add = [](Record& rec, const auto& res) {
    rec.add(res);
    rec.add(res.row_scales());
  };
  const Record two_pass = check(d, what, inputs, {&grad}, [&](Record& rec) {
    const auto res = loss();
    add(rec, res);
    res.backward(grad.mat_out());
  });
  const Record fused = check(d, what, inputs, {&grad}, [&](Record& rec) { add(rec, loss(grad.mat_out())); });
  expect_same(what, "the fused form differs from the two-pass form", two_pass, fused);
}

template <class T, class M>
void ppo(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> lp(d, mask), old(d, mask), adv(d, mask), ref(d, mask);
  Buf<T> grad(d, B, N);
  const bool with_ref = d.flag();
  const auto o = options<pl::PpoOptions>(d);
  both_forms(d, with_ref ? "ppo_clip with ref_logp" : "ppo_clip", {&lp, &old, &adv, &ref}, grad, [&](auto&&... g) {
    return with_ref ? pl::ppo_clip(lp.mat(), old.mat(), adv.mat(), mask.mat(), ref.mat(), o, g...)
                    : pl::ppo_clip(lp.mat(), old.mat(), adv.mat(), mask.mat(), o, g...);
  });
}

template <class T, class M>
void gmpo(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> lp(d, mask), old(d, mask), adv(d, mask);
  Buf<T> grad(d, B, N);
  both_forms(d, "gmpo", {&lp, &old, &adv}, grad, [&, o = options<pl::GmpoOptions>(d)](auto&&... g) {
    return pl::gmpo(lp.mat(), old.mat(), adv.mat(), mask.mat(), o, g...);
  });
}

/// clip_cov / kl_cov: the selection (checked like any call: nothing written when it throws), then
/// the loss on it in both forms.
template <class T, class M>
void cov(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> lp(d, mask), old(d, mask), adv(d, mask);
  Buf<T> sel(d, B, N), grad(d, B, N);
  if (d.flag()) {
    auto o = options<pl::ClipCovOptions>(d);
    o.seed = d.integer<std::uint64_t>();
    check(d, "clip_cov_select", {&lp, &old, &adv}, {&sel}, [&](Record& rec) {
      rec.add(pl::clip_cov_select(lp.mat(), old.mat(), adv.mat(), mask.mat(), o, sel.mat_out()));
    });
    both_forms(d, "clip_cov", {&lp, &old, &adv}, grad, [&](auto&&... g) {
      return pl::clip_cov(lp.mat(), old.mat(), adv.mat(), mask.mat(), sel.mat(), o, g...);
    });
  } else {
    const auto o = options<pl::KlCovOptions>(d);
    // No clip and no clamp: -A r overflows float even for tame tokens (88 exp(87)), and +inf and
    // -inf rows then meet in the sum, as in verl.
    d.tame = false;
    check(d, "kl_cov_select", {&lp, &adv}, {&sel},
          [&](Record& rec) { rec.add(pl::kl_cov_select(lp.mat(), adv.mat(), mask.mat(), o, sel.mat_out())); });
    both_forms(d, "kl_cov", {&lp, &old, &adv}, grad,
               [&](auto&&... g) { return pl::kl_cov(lp.mat(), old.mat(), adv.mat(), mask.mat(), sel.mat(), o, g...); });
  }
}

template <class T, class M>
void value(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> v(d, mask), old(d, mask), ret(d, mask);
  Buf<T> grad(d, B, N);
  both_forms(d, "value_loss", {&v, &old, &ret}, grad, [&, o = options<pl::ValueOptions>(d)](auto&&... g) {
    return pl::value_loss(v.mat(), old.mat(), ret.mat(), mask.mat(), o, g...);
  });
}

template <class T, class M>
void kl(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> lp(d, mask), ref(d, mask);
  Buf<T> out(d, B, N), grad(d, B, N);
  const auto o = options<pl::KlOptions>(d);
  const int form = d.below(3);
  check(d, "kl_estimate", {&lp, &ref}, {&out, &grad}, [&](Record&) {
    if (form == 0) {
      pl::kl_estimate(lp.mat(), ref.mat(), mask.mat(), o, out.mat_out());
    } else if (form == 1) {
      pl::kl_estimate(lp.mat(), ref.mat(), mask.mat(), o.estimator, out.mat_out());
    } else {
      pl::kl_estimate(lp.mat(), ref.mat(), mask.mat(), o, out.mat_out(), grad.mat_out());
    }
  });
}

template <class T, class M>
void gae(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> rewards(d, mask), values(d, mask);
  Buf<T> adv(d, B, N), ret(d, B, N);
  check(d, "gae", {&rewards, &values}, {&adv, &ret}, [&, o = options<pl::GaeOptions>(d)](Record&) {
    pl::gae(rewards.mat(), values.mat(), mask.mat(), o, adv.mat_out(), ret.mat_out());
  });
}

template <class T, class M>
void whiten(Decoder& d, Index B, Index N) {
  const Mask<M> mask(d, B, N);
  Input<T> values(d, mask);
  Buf<T> out(d, B, N);
  const auto o = options<pl::WhitenOptions>(d);
  const bool flat = d.flag();
  d.tame = d.tame && o.eps != 0;  // selected values that all agree are 0 / 0 then, as in verl
  check(d, "masked_whiten", {&values}, {&out}, [&](Record&) {
    flat ? pl::masked_whiten(values.vec(), mask.vec(), out.vec_out(), o)
         : pl::masked_whiten(values.mat(), mask.mat(), out.mat_out(), o);
  });
}

template <class T>
void group(Decoder& d, Index B) {
  const Input<T> scores(d, B);
  Buf<T> out(d, B);
  const auto o = options<pl::GroupOptions>(d);
  d.tame = d.tame && !(o.epsilon == 0 && o.scale_by_std);  // a group of equal scores is 0 / 0 then
  const auto run = [&](const auto& groups) {
    check(d, "group_advantages", {}, {&out},
          [&](Record&) { pl::group_advantages(scores.vec(), groups, o, out.vec_out()); });
  };
  switch (d.below(5)) {
    case 0:
      return run(d.integer<int>());
    case 1:
      return run(d.integer<std::int64_t>());
    case 2:
      return run(d.integer<std::size_t>());
    case 3:
      return run(Input<std::int32_t>(d, B).vec());
    default:
      return run(Input<std::int64_t>(d, B).vec());
  }
}

struct Token {
  template <class T, class M>
  static void run(Decoder& d, Index B, Index N) {
    switch (d.below(8)) {
      case 0:
        return ppo<T, M>(d, B, N);
      case 5:
        return gmpo<T, M>(d, B, N);
      case 6:
        return cov<T, M>(d, B, N);
      case 1:
        return value<T, M>(d, B, N);
      case 2:
        return kl<T, M>(d, B, N);
      case 3:
        return gae<T, M>(d, B, N);
      case 4:
        return whiten<T, M>(d, B, N);
      default:
        return group<T>(d, B);
    }
  }
};

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz::fuzz_one<fuzz::Token>(data, size);
}
