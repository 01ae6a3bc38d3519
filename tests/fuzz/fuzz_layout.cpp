// libFuzzer harness: token inputs as trainers hand them over. bf16 and half tokens (computed in
// float) beside float, and packed batches (pl::packed(values, cu_seqlens)) beside the padded
// [batch, tokens] batch that holds the same rows, for every token entry point: the masked
// reductions, ppo_clip, value_loss, kl_estimate, gae, masked_whiten and dpo over packed sums.
// (fuzz_pairwise and fuzz_token cover double tokens and double masks, padded.)
// Besides fuzz_common's invariants (each layout's call goes through check()):
// - valid offsets: the packed and the padded call both return or both throw; with bool or byte
//   masks what they return and write is the same bits (the row kernels see the same tokens in
//   the same lanes, and padding only adds masked-out lanes); kl_estimate, gae and masked_whiten
//   write the same bits for every mask type;
// - broken offsets (cu[0] != 0, decreasing, cu[batch] != the number of values), or
//   seq_mean_token_sum_norm without token_sum_norm (its default is a padded row's width): the
//   packed call throws a prefloss::error (and, by check(), writes nothing);
// - a bf16 or half masked sum or mean is the same bits as the float one of the converted tokens.
#include "fuzz_common.hpp"

namespace fuzz {
namespace {

/// The type a token type is computed in (and upstream gradients come in).
template <class T>
using compute_t = std::conditional_t<is_16bit_v<T>, float, T>;

/// Row lengths of a batch, their cu_seqlens offsets (broken on purpose one time in eight) and
/// the padded width N.
template <class O>
struct Layout {
  Layout(Decoder& d, Index B, Index N_) : N(N_), len(static_cast<std::size_t>(B)), cu(B + 1) {
    cu(0) = 0;
    for (Index i = 0; i < B; ++i) {
      const Index n = d.flag() ? N : d.below<Index>(N + 1);
      len[static_cast<std::size_t>(i)] = n;
      total += n;
      cu(i + 1) = static_cast<O>(total);
    }
    if (d.below(8) != 0) return;
    broken = true;
    switch (d.below(4)) {
      case 0:
        cu(0) = 1;
        break;
      case 1:
        cu(B) = static_cast<O>(total + 1);
        break;
      case 2:
        cu(B) = std::numeric_limits<O>::max();
        break;
      default:
        if (B >= 2) {
          const Index j = d.below<Index>(B - 1) + 1;  // cu(j) > cu(j + 1)
          cu(j) = static_cast<O>(cu(j + 1) + 1);
        } else {
          cu(0) = -1;
        }
    }
  }
  Index rows() const { return static_cast<Index>(len.size()); }
  /// Where row i starts among the packed values (from the lengths: cu may be broken).
  Index begin(Index i) const {
    Index b = 0;
    for (Index k = 0; k < i; ++k) b += len[static_cast<std::size_t>(k)];
    return b;
  }
  /// Calls f(padded index, packed index) for every token of every row.
  template <class F>
  void each(F&& f) const {
    Index k = 0;
    for (Index i = 0; i < rows(); ++i)
      for (Index t = 0; t < len[static_cast<std::size_t>(i)]; ++t) f(static_cast<std::size_t>(i * N + t), k++);
  }

  Index N, total = 0;
  std::vector<Index> len;
  Eigen::Tensor<O, 1> cu;
  bool broken = false;
};

/// A mask in both layouts (at one byte offset, so that both are aligned or neither): the padded
/// one drops every token past its row's length.
template <class M, class O>
struct MaskPair {
  MaskPair(Decoder& d, const Layout<O>& lay)
      : pad(d, lay.rows(), lay.N), flat(pad.offset(), lay.total), flat_dropped(static_cast<std::size_t>(lay.total)) {
    std::vector<bool> keep(pad.size());
    lay.each([&](std::size_t p, Index k) {
      keep[p] = true;
      flat.set(static_cast<std::size_t>(k), pad.get(p));
      flat_dropped[static_cast<std::size_t>(k)] = pad.dropped[p];
    });
    for (std::size_t p = 0; p < pad.size(); ++p)
      if (!keep[p]) {
        pad.set(p, M(0));
        pad.dropped[p] = true;
      }
  }
  Mask<M> pad;
  Buf<M> flat;
  std::vector<bool> flat_dropped;
};

/// A token input in both layouts, at one byte offset (the packed values are the padded rows'
/// first len[i] tokens).
template <class T>
struct Tokens {
  template <class M, class O>
  Tokens(Decoder& d, const Layout<O>& lay, const MaskPair<M, O>& m)
      : pad(d, m.pad), flat(pad.offset(), lay.total, 1, m.flat_dropped) {
    lay.each([&](std::size_t p, Index k) { flat.set(static_cast<std::size_t>(k), pad.get(p)); });
  }
  Input<T> pad, flat;
};

/// An output in both layouts, at one byte offset.
template <class T>
struct Out {
  template <class O>
  Out(Decoder& d, const Layout<O>& lay) : pad(d, lay.rows(), lay.N), flat(pad.offset(), lay.total), plain(d.flag()) {}
  Buf<T> pad, flat;
  bool plain;  ///< the packed call gets a rank-1 map, not pl::packed(map, cu)
};

inline bool same_bits(double x, double y) {
  return (std::isnan(x) && std::isnan(y)) || std::memcmp(&x, &y, sizeof x) == 0;
}

/// An output and the layout of its rows.
template <class T, class O>
using Placed = std::pair<Out<T>*, const Layout<O>*>;

/// The checks between a padded and a packed run (see the file comment). `outs`: the outputs in
/// the order check() appended them; `values_too`: also compare what the calls returned.
template <class T, class O>
void compare(const std::string& what, bool refused, bool values_too, const Record& pad, const Record& flat,
             const std::vector<Placed<T, O>>& outs) {
  if (refused) {
    if (flat.thrown.empty())
      fail(what, "packed: broken cu_seqlens offsets (or an option packed rows cannot default) were accepted");
    return;
  }
  // Both throw or neither: which check fires first may differ (a padded [0, N] batch fails
  // its shape, a packed one may fail an option first), so the exception types may too.
  const auto outcome = [](const Record& r) { return r.thrown.empty() ? std::string("returned") : "threw " + r.thrown; };
  if (pad.thrown.empty() != flat.thrown.empty())
    fail(what, "packed: the padded call " + outcome(pad) + ", the packed call " + outcome(flat));
  if (!pad.thrown.empty()) return;
  std::size_t pad_out = 0, flat_out = 0;
  for (const auto& o : outs) {
    pad_out += o.first->pad.size();
    flat_out += o.first->flat.size();
  }
  const std::size_t n = pad.values.size() - pad_out;
  if (n != flat.values.size() - flat_out) fail(what, "packed: the results differ in length");
  if (values_too)
    for (std::size_t i = 0; i < n; ++i)
      if (!same_bits(pad.values[i], flat.values[i]))
        fail(what,
             "packed: result " + std::to_string(i) + " is " + str(flat.values[i]) + ", padded " + str(pad.values[i]));
  std::size_t base_pad = n, base_flat = n;
  for (const auto& o : outs) {
    o.second->each([&](std::size_t p, Index k) {
      const double x = pad.values[base_pad + p], y = flat.values[base_flat + static_cast<std::size_t>(k)];
      if (!same_bits(x, y))
        fail(what, "packed: output token " + std::to_string(k) + " is " + str(y) + ", padded " + str(x));
    });
    base_pad += o.first->pad.size();
    base_flat += o.first->flat.size();
  }
}

/// Runs call(layout, record) in both layouts through check() and compares them; the layout
/// argument is std::false_type for the padded call and std::true_type for the packed one.
/// refused: the packed call must throw (broken offsets, or an option packed rows cannot default).
template <class T, class O, class F>
void both_layouts(Decoder& d, const std::string& what, bool refused, bool values_too,
                  std::initializer_list<Bytes*> pad_in, std::initializer_list<Bytes*> flat_in,
                  const std::vector<Placed<T, O>>& outs, const F& call) {
  const auto run = [&](auto packed, std::initializer_list<Bytes*> inputs) {
    const auto buf = [&](std::size_t k) -> Bytes* {
      return packed ? static_cast<Bytes*>(&outs[k].first->flat) : &outs[k].first->pad;
    };
    const Call c = [&](Record& rec) { call(packed, rec); };
    // check() takes its outputs as an initializer list; one or two here.
    return outs.size() == 1 ? check(d, what, inputs, {buf(0)}, c) : check(d, what, inputs, {buf(0), buf(1)}, c);
  };
  const Record pad = run(std::false_type{}, pad_in);
  const Record flat = run(std::true_type{}, flat_in);
  compare(what, refused, values_too, pad, flat, outs);
}

/// The padded map or the packed view of an input, by layout.
template <class P, class X, class O>
auto in(P, const X& x, const Layout<O>& lay) {
  if constexpr (P::value) {
    return pl::packed(x.flat.vec(), lay.cu);
  } else {
    return x.pad.mat();
  }
}
template <class P, class M, class O>
auto in_mask(P, const MaskPair<M, O>& m, const Layout<O>& lay) {
  if constexpr (P::value) {
    return pl::packed(m.flat.vec(), lay.cu);
  } else {
    return m.pad.mat();
  }
}
/// An output by layout: the padded map, or for the packed call a rank-1 map or a packed view.
template <class P, class T, class O, class F>
void with_out(P, Out<T>& o, const Layout<O>& lay, F&& f) {
  if constexpr (P::value) {
    if (o.plain) return f(o.flat.vec_out());
    return f(pl::packed(o.flat.vec_out(), lay.cu));
  } else {
    return f(o.pad.mat_out());
  }
}

/// With bool or byte masks every result is the same bits in both layouts.
template <class M>
constexpr bool exact_masks = std::is_same_v<M, bool> || std::is_same_v<M, std::uint8_t>;

template <class T, class M, class O>
void reduction(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> x(d, lay, m);
  const Input<compute_t<T>> upstream(d, lay.rows());
  Out<T> grad(d, lay);
  const bool mean = d.flag();
  both_layouts<T, O>(d, mean ? "masked_mean" : "masked_sum", lay.broken, exact_masks<M>, {&x.pad}, {&x.flat},
                     {{&grad, &lay}}, [&](auto p, Record& rec) {
                       const auto run = [&](const auto& e) {
                         rec.add(e.eval());
                         with_out(p, grad, lay, [&](auto g) { e.backward(upstream.vec(), g); });
                       };
                       mean ? run(pl::masked_mean(in(p, x, lay), in_mask(p, m, lay)))
                            : run(pl::masked_sum(in(p, x, lay), in_mask(p, m, lay)));
                     });
  if constexpr (is_16bit_v<T>) {
    // The float tokens of the same values: the same sums, bit for bit.
    Buf<float> wide(0, lay.rows(), lay.N);
    for (std::size_t i = 0; i < wide.size(); ++i) wide.set(i, static_cast<float>(x.pad.get(i)));
    try {
      const auto a =
          mean ? pl::masked_mean(x.pad.mat(), m.pad.mat()).eval() : pl::masked_sum(x.pad.mat(), m.pad.mat()).eval();
      const auto b =
          mean ? pl::masked_mean(wide.mat(), m.pad.mat()).eval() : pl::masked_sum(wide.mat(), m.pad.mat()).eval();
      for (Index i = 0; i < a.size(); ++i)
        if (!same_bits(static_cast<double>(a(i)), static_cast<double>(b(i))))
          fail("masked_sum / masked_mean", "16-bit row " + std::to_string(i) + " is " + str(static_cast<double>(a(i))) +
                                               ", the float row " + str(static_cast<double>(b(i))));
    } catch (const pl::error&) {
      // Bad weights: both layouts threw above already, as check() requires of them.
    }
  }
}

/// seq_mean_token_sum_norm's default normalizer is a padded row's width: packed rows refuse it.
template <class Opt>
bool no_default(const Opt& o) {
  return o.aggregation == pl::Aggregation::seq_mean_token_sum_norm && !o.token_sum_norm;
}

template <class T, class M, class O>
void ppo(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> lp(d, lay, m), old(d, lay, m), adv(d, lay, m), ref(d, lay, m);
  Out<T> grad(d, lay);
  const bool with_ref = d.flag(), fused = d.flag();
  const auto o = options<pl::PpoOptions>(d);
  both_layouts<T, O>(d, with_ref ? "ppo_clip with ref_logp" : "ppo_clip", lay.broken || no_default(o), exact_masks<M>,
                     {&lp.pad, &old.pad, &adv.pad, &ref.pad}, {&lp.flat, &old.flat, &adv.flat, &ref.flat},
                     {{&grad, &lay}}, [&](auto p, Record& rec) {
                       with_out(p, grad, lay, [&](auto g) {
                         const auto loss = [&](auto&&... gs) {
                           return with_ref ? pl::ppo_clip(in(p, lp, lay), in(p, old, lay), in(p, adv, lay),
                                                          in_mask(p, m, lay), in(p, ref, lay), o, gs...)
                                           : pl::ppo_clip(in(p, lp, lay), in(p, old, lay), in(p, adv, lay),
                                                          in_mask(p, m, lay), o, gs...);
                         };
                         if (fused) return rec.add(loss(g));
                         const auto res = loss();
                         rec.add(res);
                         res.backward(g);
                       });
                     });
}

template <class T, class M, class O>
void value(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> v(d, lay, m), old(d, lay, m), ret(d, lay, m);
  Out<T> grad(d, lay);
  const bool fused = d.flag();
  const auto o = options<pl::ValueOptions>(d);
  both_layouts<T, O>(d, "value_loss", lay.broken || no_default(o), exact_masks<M>, {&v.pad, &old.pad, &ret.pad},
                     {&v.flat, &old.flat, &ret.flat}, {{&grad, &lay}}, [&](auto p, Record& rec) {
                       with_out(p, grad, lay, [&](auto g) {
                         const auto loss = [&](auto&&... gs) {
                           return pl::value_loss(in(p, v, lay), in(p, old, lay), in(p, ret, lay), in_mask(p, m, lay), o,
                                                 gs...);
                         };
                         if (fused) return rec.add(loss(g));
                         const auto res = loss();
                         rec.add(res);
                         res.backward(g);
                       });
                     });
}

template <class T, class M, class O>
void kl(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> lp(d, lay, m), ref(d, lay, m);
  Out<T> out(d, lay), grad(d, lay);
  const auto o = options<pl::KlOptions>(d);
  both_layouts<T, O>(d, "kl_estimate", lay.broken, true, {&lp.pad, &ref.pad}, {&lp.flat, &ref.flat},
                     {{&out, &lay}, {&grad, &lay}}, [&](auto p, Record&) {
                       with_out(p, out, lay, [&](auto a) {
                         with_out(p, grad, lay, [&](auto g) {
                           pl::kl_estimate(in(p, lp, lay), in(p, ref, lay), in_mask(p, m, lay), o, a, g);
                         });
                       });
                     });
}

template <class T, class M, class O>
void gae(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> rewards(d, lay, m), values(d, lay, m);
  Out<T> adv(d, lay), ret(d, lay);
  const auto o = options<pl::GaeOptions>(d);
  both_layouts<T, O>(d, "gae", lay.broken, true, {&rewards.pad, &values.pad}, {&rewards.flat, &values.flat},
                     {{&adv, &lay}, {&ret, &lay}}, [&](auto p, Record&) {
                       with_out(p, adv, lay, [&](auto a) {
                         with_out(p, ret, lay, [&](auto r) {
                           pl::gae(in(p, rewards, lay), in(p, values, lay), in_mask(p, m, lay), o, a, r);
                         });
                       });
                     });
}

template <class T, class M, class O>
void whiten(Decoder& d, const Layout<O>& lay) {
  const MaskPair<M, O> m(d, lay);
  Tokens<T> values(d, lay, m);
  Out<T> out(d, lay);
  const auto o = options<pl::WhitenOptions>(d);
  d.tame = d.tame && o.eps != 0;  // selected values that all agree are 0 / 0 then, as in verl
  both_layouts<T, O>(
      d, "masked_whiten", lay.broken, true, {&values.pad}, {&values.flat}, {{&out, &lay}}, [&](auto p, Record&) {
        with_out(p, out, lay, [&](auto w) { pl::masked_whiten(in(p, values, lay), in_mask(p, m, lay), w, o); });
      });
}

/// dpo over masked sums, chosen and rejected each with their own rows and offsets (the
/// reference sums share their side's); two-pass or fused.
template <class T, class M, class O>
void dpo(Decoder& d, const Layout<O>& lc, Index B, Index N) {
  const Layout<O> lr(d, B, N);
  const MaskPair<M, O> mc(d, lc), mr(d, lr);
  Tokens<T> c(d, lc, mc), rc(d, lc, mc), r(d, lr, mr), rr(d, lr, mr);
  Out<T> gc(d, lc), gr(d, lr);
  const bool fused = d.flag();
  const auto o = options<pl::DpoOptions>(d);
  // Either side's broken offsets must make the call throw.
  both_layouts<T, O>(d, "dpo", lc.broken || lr.broken, exact_masks<M>, {&c.pad, &rc.pad, &r.pad, &rr.pad},
                     {&c.flat, &rc.flat, &r.flat, &rr.flat}, {{&gc, &lc}, {&gr, &lr}}, [&](auto p, Record& rec) {
                       const auto add = [&](const auto& res) {
                         rec.add(res);
                         rec.add(res.grad_chosen_value());
                         rec.add(res.grad_rejected_value());
                       };
                       with_out(p, gc, lc, [&](auto g1) {
                         with_out(p, gr, lr, [&](auto g2) {
                           const auto loss = [&](auto&&... gs) {
                             return pl::dpo(pl::masked_sum(in(p, c, lc), in_mask(p, mc, lc)),
                                            pl::masked_sum(in(p, r, lr), in_mask(p, mr, lr)),
                                            pl::masked_sum(in(p, rc, lc), in_mask(p, mc, lc)),
                                            pl::masked_sum(in(p, rr, lr), in_mask(p, mr, lr)), o, gs...);
                           };
                           if (fused) return add(loss(g1, g2));
                           const auto res = loss();
                           add(res);
                           res.backward(g1, g2);
                         });
                       });
                     });
}

template <class T, class M, class O>
void token_calls(Decoder& d, Index B, Index N) {
  const Layout<O> lay(d, B, N);
  switch (d.below(7)) {
    case 0:
      return reduction<T, M>(d, lay);
    case 1:
      return ppo<T, M>(d, lay);
    case 2:
      return value<T, M>(d, lay);
    case 3:
      return kl<T, M>(d, lay);
    case 4:
      return gae<T, M>(d, lay);
    case 5:
      return whiten<T, M>(d, lay);
    default:
      return dpo<T, M>(d, lay, B, N);
  }
}

template <class T>
void with_mask(Decoder& d) {
  // int32_t offsets (flash-attention's) for float and bf16, int64_t for half.
  using O = std::conditional_t<std::is_same_v<T, Eigen::half>, std::int64_t, std::int32_t>;
  const Index B = d.batch(), N = d.tokens();
  switch (d.below(3)) {
    case 0:
      return token_calls<T, bool, O>(d, B, N);
    case 1:
      return token_calls<T, std::uint8_t, O>(d, B, N);
    default:
      return token_calls<T, float, O>(d, B, N);
  }
}

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::Decoder d(data, size);
  switch (d.below(3)) {
    case 0:
      fuzz::with_mask<Eigen::bfloat16>(d);
      break;
    case 1:
      fuzz::with_mask<Eigen::half>(d);
      break;
    default:
      fuzz::with_mask<float>(d);
  }
  return 0;
}
