// libFuzzer harness: the pairwise losses (bradley_terry with and without margin, dpo, ipo,
// simpo, orpo), the sequence losses (nll, kto, bradley_terry_ranking) and the masked reductions,
// over float and double tokens, every mask type and every form of sequence argument; every loss
// with a fused form (gradient outputs passed to the call) must agree with its two-pass form.
#include "fuzz_common.hpp"

namespace fuzz {
namespace {

/// A sequence argument: tokens under a mask or a plain [rows] tensor, and its gradient's output.
template <class T, class M>
struct Sequence {
  Sequence(Decoder& d, bool plain, Index rows, Index cols)
      : mask(d, rows, plain ? 0 : cols),
        x(plain ? Input<T>(d, rows) : Input<T>(d, mask)),
        grad(d, x.rows(), x.cols()) {}
  Mask<M> mask;
  Input<T> x;
  Buf<T> grad;
};

/// How a loss receives a Sequence: masked_sum or masked_mean of its tokens, or the plain tensor.
struct SumForm {
  static constexpr bool plain = false;
  template <class Q>
  static auto arg(const Q& s) {
    return pl::masked_sum(s.x.mat(), s.mask.mat());
  }
  template <class Q>
  static auto grad(Q& s) {
    return s.grad.mat_out();
  }
};
struct MeanForm : SumForm {
  template <class Q>
  static auto arg(const Q& s) {
    return pl::masked_mean(s.x.mat(), s.mask.mat());
  }
};
struct PlainForm {
  static constexpr bool plain = true;
  template <class Q>
  static auto arg(const Q& s) {
    return s.x.vec();
  }
  template <class Q>
  static auto grad(Q& s) {
    return s.grad.vec_out();
  }
};

template <bool PlainToo, class F>
void with_form(Decoder& d, F&& f) {
  switch (d.below(PlainToo ? 3 : 2)) {
    case 0:
      return f(SumForm{});
    case 1:
      return f(MeanForm{});
    default:
      if constexpr (PlainToo) return f(PlainForm{});
  }
}

template <class T, class M, class F>
void pairwise(Decoder& d, Index B, Index N) {
  Sequence<T, M> c(d, F::plain, B, N), r(d, F::plain, B, N), rc(d, F::plain, B, N), rr(d, F::plain, B, N);
  const Input<T> margin(d, B);
  // loss() then .backward, and where the loss has one, loss(grad_c, grad_r) fused: both checked,
  // and they must agree to the bit.
  const auto run = [&](const char* what, const auto& loss, auto fused_too) {
    const auto add = [](Record& rec, const auto& res) {
      rec.add(res);
      rec.add(res.grad_chosen_value());
      rec.add(res.grad_rejected_value());
    };
    const Record two_pass = check(d, what, {&c.x, &r.x, &rc.x, &rr.x}, {&c.grad, &r.grad}, [&](Record& rec) {
      const auto res = loss();
      add(rec, res);
      res.backward(F::grad(c), F::grad(r));
    });
    if constexpr (decltype(fused_too)::value) {
      const Record fused = check(d, what, {&c.x, &r.x, &rc.x, &rr.x}, {&c.grad, &r.grad},
                                 [&](Record& rec) { add(rec, loss(F::grad(c), F::grad(r))); });
      expect_same(what, "the fused form differs from the two-pass form", two_pass, fused);
    }
  };
  const std::true_type fused;
  const std::false_type two_pass_only;
  switch (d.below(6)) {
    case 0:
      return run(
          "dpo",
          [&, o = options<pl::DpoOptions>(d)](auto&&... g) {
            return pl::dpo(F::arg(c), F::arg(r), F::arg(rc), F::arg(rr), o, std::forward<decltype(g)>(g)...);
          },
          fused);
    case 1:
      return run(
          "ipo",
          [&, o = options<pl::IpoOptions>(d)](auto&&... g) {
            return pl::ipo(F::arg(c), F::arg(r), F::arg(rc), F::arg(rr), o, std::forward<decltype(g)>(g)...);
          },
          fused);
    case 2:
      return run(
          "simpo",
          [&, o = options<pl::SimpoOptions>(d)](auto&&... g) {
            return pl::simpo(F::arg(c), F::arg(r), o, std::forward<decltype(g)>(g)...);
          },
          fused);
    case 3:
      return run(
          "orpo",
          [&, o = options<pl::OrpoOptions>(d)](auto&&... g) {
            return pl::orpo(F::arg(c), F::arg(r), o, std::forward<decltype(g)>(g)...);
          },
          fused);
    case 4:
      return run(
          "bradley_terry",
          [&, o = options<pl::BradleyTerryOptions>(d)] { return pl::bradley_terry(F::arg(c), F::arg(r), o); },
          two_pass_only);
    default:
      return run(
          "bradley_terry with margin",
          [&, o = options<pl::BradleyTerryOptions>(d)] {
            return pl::bradley_terry(F::arg(c), F::arg(r), margin.vec(), o);
          },
          two_pass_only);
  }
}

template <class T, class M, class F>
void single(Decoder& d, Index B, Index N) {
  Sequence<T, M> s(d, F::plain, B, N), ref(d, F::plain, B, N);
  const Index K = d.batch();  // the KL batch of kto has its own size
  Sequence<T, M> kl_policy(d, F::plain, K, N), kl_ref(d, F::plain, K, N);
  const Mask<std::conditional_t<std::is_same_v<M, bool>, bool, std::uint8_t>> desirable(d, B);
  const auto run = [&](const char* what, const auto& loss) {
    const auto add = [](Record& rec, const auto& res) {
      rec.add(res);
      rec.add(res.grad_value());
    };
    const Record two_pass = check(d, what, {&s.x, &ref.x, &kl_policy.x, &kl_ref.x}, {&s.grad}, [&](Record& rec) {
      const auto res = loss();
      add(rec, res);
      res.backward(F::grad(s));
    });
    const Record fused = check(d, what, {&s.x, &ref.x, &kl_policy.x, &kl_ref.x}, {&s.grad},
                               [&](Record& rec) { add(rec, loss(F::grad(s))); });
    expect_same(what, "the fused form differs from the two-pass form", two_pass, fused);
  };
  if (d.flag())
    return run("nll", [&, o = options<pl::NllOptions>(d)](auto&&... g) {
      return pl::nll(F::arg(s), o, std::forward<decltype(g)>(g)...);
    });
  run("kto", [&, o = options<pl::KtoOptions>(d)](auto&&... g) {
    return pl::kto(F::arg(s), F::arg(ref), desirable.vec(), F::arg(kl_policy), F::arg(kl_ref), o,
                   std::forward<decltype(g)>(g)...);
  });
}

template <class T, class M, class F>
void reduction(Decoder& d, Index B, Index N) {
  Sequence<T, M> s(d, false, B, N);
  const Input<T> upstream(d, B);
  check(d, "masked_sum / masked_mean", {&s.x}, {&s.grad}, [&](Record& rec) {
    const auto e = F::arg(s);
    rec.add(e.eval());
    e.backward(upstream.vec(), F::grad(s));
  });
}

template <class T>
void ranking(Decoder& d, Index B, Index K) {
  const Input<T> rewards(d, B, K);
  Buf<T> grad(d, B, K);
  check(d, "bradley_terry_ranking", {}, {&grad}, [&, o = options<pl::BradleyTerryOptions>(d)](Record& rec) {
    const auto res = pl::bradley_terry_ranking(rewards.mat(), o);
    rec.add(res);
    rec.add(res.grad_value());
    res.backward(grad.mat_out());
  });
}

struct Pairwise {
  template <class T, class M>
  static void run(Decoder& d, Index B, Index N) {
    switch (d.below(4)) {
      case 0:
        return with_form<true>(d, [&](auto f) { pairwise<T, M, decltype(f)>(d, B, N); });
      case 1:
        return with_form<true>(d, [&](auto f) { single<T, M, decltype(f)>(d, B, N); });
      case 2:
        return with_form<false>(d, [&](auto f) { reduction<T, M, decltype(f)>(d, B, N); });
      default:
        return ranking<T>(d, B, N);
    }
  }
};

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz::fuzz_one<fuzz::Pairwise>(data, size);
}
