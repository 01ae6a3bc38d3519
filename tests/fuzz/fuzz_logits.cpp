// libFuzzer harness: the entry points from logits. token_logprobs (the owning form and both
// caller-buffer forms, each with backward(grad_logp) or backward(grad_logp, grad_entropy)) and
// ppo_clip_from_logits (with and without ref_logp), over float, double, bf16 and half logits,
// int32/int64 labels and every mask type, at small vocabularies (often a SIMD batch's edge).
// Besides fuzz_common's invariants (every call goes through check(), which also scrambles the
// masked-out tokens' logit rows and labels: a masked-out label may be any int):
// - a call throws exactly when it must: a selected label out of range, a bad temperature (not
//   finite and > 0, or no finite nonzero reciprocal in the compute type), entropy_coef != 0 for
//   token_logprobs, a bad mask weight, a misaligned map, an output of the wrong shape, or the
//   forms' own rules (entropy_out with and only with LogprobOptions::entropy; grad_entropy needs
//   it); ppo_clip_from_logits also on a negative or non-finite entropy_coef and whatever its
//   composition below throws on;
// - an output overlapping an input (or the other output) is refused, and no input is written;
// - the caller-buffer forms write the same bits as the owning form's .logp / .entropy;
// - masked-out tokens' gradient rows are all zero;
// - ppo_clip_from_logits writes the same grad_logits bits, and returns the same logp/entropy,
//   policy_loss and metrics bits, as token_logprobs -> ppo_clip -> ppo.backward(g) ->
//   token_logprobs backward with grad_entropy = S(-entropy_coef * row_scale_i * w[i,t]); its
//   loss, losses and entropy_loss are ppo_clip's minus entropy_coef times the aggregated
//   entropy, within rounding.
#include "fuzz_common.hpp"

namespace fuzz {
namespace {

template <class Z>
using compute_t = std::conditional_t<is_16bit_v<Z>, float, Z>;

template <class T>
using Map3 = Eigen::TensorMap<const Eigen::Tensor<T, 3, Eigen::RowMajor>>;
template <class T>
using Map3Out = Eigen::TensorMap<Eigen::Tensor<T, 3, Eigen::RowMajor>>;

struct Dims {
  Index B, T, V;
  bool operator==(const Dims& o) const { return B == o.B && T == o.T && V == o.V; }
};

/// A [B, T, V] buffer (rows B * T of V values).
template <class T>
Map3Out<T> map3(Buf<T>& b, const Dims& s) {
  return Map3Out<T>(b.data(), s.B, s.T, s.V);
}

/// Vocabulary sizes: mostly an edge of a SIMD batch (16 floats / 8 doubles on AVX-512).
Index vocab(Decoder& d) {
  static constexpr Index edges[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65};
  return d.flag() ? d.pick(edges) : d.below<Index>(71);
}
/// Tokens per sequence: PPO's token rows go in batches of lanes<S> tokens.
Index steps(Decoder& d) {
  static constexpr Index edges[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 33};
  return d.flag() ? d.pick(edges) : d.below<Index>(20);
}

/// LogprobOptions: one input in four from the palettes of bad edges, else valid ones (so that
/// the calls past the checks are common).
pl::LogprobOptions logprob_options(Decoder& d, bool wild) {
  pl::LogprobOptions o;
  if (wild) {
    d.fields(o.temperature, o.entropy, o.entropy_coef);
  } else {
    static constexpr double temperatures[] = {1.0, 0.5, 2.0, 0.7, 1.3, 0.05, 20.0};
    static constexpr double coefs[] = {0.0, 0.01, 0.5, 1.0, 3.0};
    o.temperature = d.pick(temperatures);
    o.entropy = d.flag();
    o.entropy_coef = d.pick(coefs);
  }
  return o;
}

/// PpoOptions likewise: valid ones vary the aggregation, the clips and the KL term.
pl::PpoOptions ppo_options(Decoder& d, bool wild, bool with_ref) {
  if (wild) return options<pl::PpoOptions>(d);
  pl::PpoOptions o;
  static constexpr double clips[] = {0.2, 0.0, 0.28, 1.0};
  static constexpr double kl_coefs[] = {0.0, 0.1, 1.0};
  o.clip_low = d.pick(clips);
  o.clip_high = d.pick(clips);
  o.dual_clip = d.flag() ? 0.0 : 3.0;
  o.aggregation = static_cast<pl::Aggregation>(d.below(4));
  o.kl_coef = with_ref ? d.pick(kl_coefs) : 0.0;  // kl_coef > 0 needs ref_logp
  o.kl_estimator = static_cast<pl::KlEstimator>(d.below(enumerators(pl::KlEstimator{})));
  return o;
}

/// A span of input memory that no call may write.
struct Span {
  const void* p;
  std::size_t n;
};
template <class T>
Span span(const Buf<T>& b) {
  return {b.data(), b.size() * sizeof(T)};
}

/// call, and a trap if it changed a byte of `ins` (whether it returned or threw).
Call guarded(const std::string& what, std::vector<Span> ins, Call call) {
  return [what, ins = std::move(ins), call = std::move(call)](Record& r) {
    std::vector<std::vector<unsigned char>> before;
    for (const Span& s : ins) {
      const auto* p = static_cast<const unsigned char*>(s.p);
      before.emplace_back(p, p + s.n);
    }
    const auto same = [&] {
      for (std::size_t i = 0; i < ins.size(); ++i)
        if (ins[i].n > 0 && std::memcmp(ins[i].p, before[i].data(), ins[i].n) != 0)
          fail(what, "wrote into input " + std::to_string(i));
    };
    try {
      call(r);
    } catch (...) {
      same();
      throw;
    }
    same();
  };
}

template <class S, int O>
void add(Record& r, const Eigen::Tensor<S, 2, O>& t) {
  for (Index i = 0; i < t.size(); ++i) r.add(static_cast<double>(t.data()[i]));
}

template <class T>
bool misaligned(const Bytes& b) {
  return b.offset() % alignof(T) != 0;
}

template <class S>
bool bad_temperature(double t) {
  if (!(t > 0) || !std::isfinite(t)) return true;
  const S k = static_cast<S>(1.0 / t);
  return !(k > 0) || !std::isfinite(k);
}

inline bool same_bits(double x, double y) {
  return (std::isnan(x) && std::isnan(y)) || std::memcmp(&x, &y, sizeof x) == 0;
}

/// a == b within a few roundings of S relative to `scale` (both NaN counts as equal).
template <class S>
bool close(double a, double b, double scale) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) && std::isfinite(b))  // b past S's range: a is b rounded to S
    return std::signbit(a) == std::signbit(b) &&
           std::fabs(b) * (1 + 8 * std::numeric_limits<S>::epsilon()) >= std::numeric_limits<S>::max();
  if (!std::isfinite(a) || !std::isfinite(b)) return a == b;
  const double eps = std::numeric_limits<S>::epsilon();
  return std::fabs(a - b) <= 8 * eps * scale + 8 * static_cast<double>(std::numeric_limits<S>::denorm_min());
}

std::vector<bool> per_element(const std::vector<bool>& rows, Index V) {
  std::vector<bool> r;
  r.reserve(rows.size() * static_cast<std::size_t>(V));
  for (const bool b : rows) r.insert(r.end(), static_cast<std::size_t>(V), b);
  return r;
}

/// Logits [B, T, V], labels [B, T] and a mask [B, T]; the masked-out tokens' logit rows and
/// labels scramble.
template <class Z, class M, class Lab>
struct Batch {
  using S = compute_t<Z>;

  Batch(Decoder& d, Dims s_)
      : s(s_),
        mask(d, s.B, s.T),
        labels(d.input_offset<Lab>(), s.B, s.T, mask.dropped),
        logits(d.input_offset<Z>(), s.B * s.T, s.V, per_element(mask.dropped, s.V)) {
    // 0: labels as decoded (mostly out of range); 1: valid but one selected token's is bad;
    // else valid: the row's maximum, the last id, or any.
    const int label_mode = d.below(8);
    const auto plant = d.below<std::size_t>(64);
    const int bad_kind = d.below(6);
    const std::size_t n = mask.size();
    const auto V = static_cast<std::size_t>(s.V);
    std::vector<std::uint16_t> pick(n);
    std::vector<std::size_t> sel;
    for (std::size_t i = 0; i < n; ++i)
      if (!mask.dropped[i]) {
        sel.push_back(i);
        pick[i] = d.value<std::uint16_t>();
      }
    for (const std::size_t i : sel) {
      // A row of independent values, a constant row (ties at the max) or a constant row with
      // one spike.
      const auto kind = d.value<std::uint8_t>();
      if (kind == 2 || kind == 3) {
        const Z c = d.value<Z>();
        for (std::size_t v = 0; v < V; ++v) logits.set(i * V + v, c);
        if (kind == 3 && V > 0) logits.set(i * V + d.value<std::uint8_t>() % V, d.value<Z>());
      } else {
        for (std::size_t v = 0; v < V; ++v) logits.set(i * V + v, d.value<Z>());
      }
    }
    for (const std::size_t i : sel) {
      Lab y = 0;
      if (label_mode == 0) {
        y = d.value<Lab>();
      } else if (V > 0) {
        switch (pick[i] % 4) {
          case 0: {  // the first maximum (the label holds the max: logp = -log1p(S_o))
            std::size_t a = 0;
            for (std::size_t v = 1; v < V; ++v)
              if (static_cast<double>(logits.get(i * V + v)) > static_cast<double>(logits.get(i * V + a))) a = v;
            y = static_cast<Lab>(a);
            break;
          }
          case 1:
            y = static_cast<Lab>(V - 1);
            break;
          default:
            y = static_cast<Lab>((pick[i] / 4) % V);
        }
      }
      labels.set(i, y);
    }
    if (label_mode == 1 && !sel.empty()) {
      const Lab bad[] = {-1,
                         static_cast<Lab>(s.V),
                         static_cast<Lab>(s.V + 1),
                         std::numeric_limits<Lab>::min(),
                         std::numeric_limits<Lab>::max(),
                         static_cast<Lab>(-s.V)};
      labels.set(sel[plant % sel.size()], bad[bad_kind]);
    }
    // Masked-out rows and labels start as garbage too.
    logits.scramble();
    labels.scramble();
  }

  Map3<Z> z() const { return Map3<Z>(logits.data(), s.B, s.T, s.V); }

  bool labels_bad() const {
    for (std::size_t i = 0; i < mask.size(); ++i)
      if (!mask.dropped[i] && (labels.get(i) < 0 || labels.get(i) >= s.V)) return true;
    return false;
  }
  bool weights_bad() const {
    if constexpr (std::is_floating_point_v<M>) {
      const M hi =
          sizeof(S) < sizeof(M) ? static_cast<M>(std::numeric_limits<S>::max()) : std::numeric_limits<M>::max();
      for (std::size_t i = 0; i < mask.size(); ++i)
        if (!(mask.get(i) >= M(0) && mask.get(i) <= hi)) return true;
    }
    return false;
  }
  bool misaligned_inputs() const { return misaligned<Z>(logits) || misaligned<Lab>(labels) || misaligned<M>(mask); }
  /// What token_logprobs refuses (entropy_coef aside).
  bool refused(const pl::LogprobOptions& o) const {
    return bad_temperature<S>(o.temperature) || weights_bad() || labels_bad() || misaligned_inputs();
  }
  double weight(std::size_t i) const { return sizeof(M) == 1 ? 1.0 : static_cast<double>(mask.get(i)); }
  std::vector<Span> spans() const { return {span(logits), span(labels), span(mask)}; }

  Dims s;
  Mask<M> mask;
  Input<Lab> labels;
  Input<Z> logits;
};

/// The gradient's shape: [B, T, V] seven times in eight, else one that is not.
Dims grad_dims(Decoder& d, const Dims& s) {
  if (d.below(8) != 0) return s;
  switch (d.below(6)) {
    case 0:
      return {s.B + 1, s.T, s.V};
    case 1:
      return {s.B, s.T + 1, s.V};
    case 2:
      return {s.B, s.T, s.V + 1};
    case 3:
      return {s.B, s.T, s.V > 0 ? s.V - 1 : 2};
    case 4:
      return {s.T, s.B, s.V};  // the same size
    default:
      return {s.B * s.T, 1, s.V};
  }
}

/// A pointer of type T into `target`, aligned to T, whose n-element map meets it.
template <class T>
T* into(Decoder& d, const Span& target) {
  const auto a = reinterpret_cast<std::uintptr_t>(target.p);
  std::uintptr_t p = a + d.below<std::size_t>(std::max<std::size_t>(target.n, 1));
  p = (p + alignof(T) - 1) / alignof(T) * alignof(T);
  if (p >= a + target.n) p = (a + target.n - 1) / alignof(T) * alignof(T);
  return reinterpret_cast<T*>(p);
}

/// A call whose output overlaps `target` (an input, or the other output): it must throw and
/// write no input.
void expect_refused(const std::string& what, const std::vector<Span>& ins, const Call& call) {
  Record r;
  try {
    guarded(what, ins, call)(r);
  } catch (const pl::error&) {
    return;
  } catch (const std::exception& e) {
    fail(what, std::string("threw ") + typeid(e).name() + ", not a prefloss::error: " + e.what());
  }
  fail(what, "an output overlapping an input was accepted");
}

template <class Z>
void expect_zero_rows(const std::string& what, const Buf<Z>& grad, const std::vector<bool>& dropped, Index vocab) {
  const auto V = static_cast<std::size_t>(vocab);
  for (std::size_t i = 0; i < dropped.size(); ++i)
    if (dropped[i])
      for (std::size_t v = 0; v < V; ++v)
        if (static_cast<double>(grad.get(i * V + v)) != 0)
          fail(what, "the gradient row of masked-out token " + std::to_string(i) + " is not zero at " +
                         std::to_string(v) + ": " + str(static_cast<double>(grad.get(i * V + v))));
}

template <class Z, class M, class Lab>
void logprobs(Decoder& d, Batch<Z, M, Lab>& x) {
  using S = compute_t<Z>;
  const Dims s = x.s;
  const pl::LogprobOptions o = logprob_options(d, d.below(4) == 0);
  const int form = d.below(3);  // owning, (logp_out), (logp_out, entropy_out)
  const int back = d.below(3);  // none, backward(g_lp, grad), backward(g_lp, g_h, grad)
  const int overlap = d.below(8);
  const Dims gd = grad_dims(d, s);
  Buf<S> lp_out(d, s.B, s.T), ent_out(d, s.B, s.T);
  Buf<Z> grad(d, gd.B * gd.T, gd.V);
  Input<S> g_lp(d, x.mask), g_h(d, x.mask);
  d.tame = d.tame && o.temperature >= 1e-3;  // else u = z / tau may overflow to -inf everywhere
  const auto z = x.z();
  const auto y = x.labels.mat();
  const auto m = x.mask.mat();

  const auto forward = [&](auto&& f) {
    if (form == 0) return f(pl::token_logprobs(z, y, m, o));
    if (form == 1) return f(pl::token_logprobs(z, y, m, o, lp_out.mat_out()));
    return f(pl::token_logprobs(z, y, m, o, lp_out.mat_out(), ent_out.mat_out()));
  };
  const auto backward = [&](const auto& res, auto&& g) {
    if (back == 1) res.backward(g_lp.mat(), g);
    if (back == 2) res.backward(g_lp.mat(), g_h.mat(), g);
  };

  if (overlap == 0) {
    // An output over an input: logp_out (or entropy_out's) over the logits, labels or mask or
    // over the other output; grad_logits over the logits, labels, mask, grad_logp or grad_entropy.
    std::vector<Span> ins = x.spans();
    ins.push_back(span(g_lp));
    ins.push_back(span(g_h));
    ins.push_back(span(ent_out));
    const auto k = d.below<std::size_t>(ins.size());
    if (ins[k].n == 0) return;
    if (back == 0 || form != 0) {
      if (k >= 3 && k < 5) return;  // grad_logp / grad_entropy are backward's
      if (s.B * s.T == 0) return;
      ent_out.fill_sentinel();
      S* p = into<S>(d, ins[k]);
      const bool entropy_first = k != 5 && d.flag();
      pl::LogprobOptions oe = o;
      oe.entropy = k == 5 || entropy_first;
      Eigen::TensorMap<Eigen::Tensor<S, 2, Eigen::RowMajor>> over(p, s.B, s.T);
      expect_refused("token_logprobs: an output over an input", ins, [&](Record&) {
        if (k == 5) {
          pl::token_logprobs(z, y, m, oe, over, ent_out.mat_out());
        } else if (entropy_first) {
          pl::token_logprobs(z, y, m, oe, lp_out.mat_out(), over);
        } else {
          pl::token_logprobs(z, y, m, oe, over);
        }
      });
    } else {
      if (k == 5 || (k == 4 && back != 2) || s.B * s.T * s.V == 0) return;
      Map3Out<Z> over(into<Z>(d, ins[k]), s.B, s.T, s.V);
      pl::LogprobOptions oe = o;
      oe.entropy_coef = 0;
      oe.entropy = oe.entropy || back == 2;
      try {
        const auto res = pl::token_logprobs(z, y, m, oe);
        expect_refused("token_logprobs backward: grad_logits over an input", ins,
                       [&](Record&) { backward(res, over); });
      } catch (const pl::error&) {
      }
    }
    return;
  }

  // The forward alone.
  const bool refused = x.refused(o) || o.entropy_coef != 0;
  const bool form_refused = (form == 1 && o.entropy) || (form == 2 && !o.entropy) || misaligned<S>(lp_out) ||
                            (form == 2 && misaligned<S>(ent_out));
  const std::vector<Span> ins = x.spans();
  const Record fwd = check(d, "token_logprobs", {&x.logits, &x.labels, &x.mask}, {&lp_out, &ent_out},
                           guarded("token_logprobs", ins, [&](Record& rec) {
                             forward([&](const auto& res) {
                               if (form == 0) {
                                 add(rec, res.logp);
                                 add(rec, res.entropy);
                               } else if (res.logp.size() != 0 || res.entropy.size() != 0) {
                                 fail("token_logprobs", "a caller-buffer form filled the result's own logp or entropy");
                               }
                             });
                           }));
  if (fwd.thrown.empty() == (refused || (form != 0 && form_refused)))
    fail("token_logprobs", fwd.thrown.empty() ? "a call it must refuse returned" : "a valid call threw " + fwd.thrown);
  if (form != 0 && fwd.thrown.empty()) {
    // The owning form: the same bits.
    const auto own = pl::token_logprobs(z, y, m, o);
    for (std::size_t i = 0; i < lp_out.size(); ++i) {
      if (!same_bits(static_cast<double>(lp_out.get(i)), static_cast<double>(own.logp.data()[i])))
        fail("token_logprobs", "logp_out[" + std::to_string(i) + "] is " + str(static_cast<double>(lp_out.get(i))) +
                                   ", the owning form's " + str(static_cast<double>(own.logp.data()[i])));
      if (form == 2 && !same_bits(static_cast<double>(ent_out.get(i)), static_cast<double>(own.entropy.data()[i])))
        fail("token_logprobs", "entropy_out[" + std::to_string(i) + "] is " + str(static_cast<double>(ent_out.get(i))) +
                                   ", the owning form's " + str(static_cast<double>(own.entropy.data()[i])));
    }
  }
  if (back == 0 || !fwd.thrown.empty()) return;

  // Forward and backward: grad_logits the output.
  const std::string what = back == 1 ? "token_logprobs backward" : "token_logprobs backward with grad_entropy";
  std::vector<Span> bins = ins;
  bins.push_back(span(g_lp));
  bins.push_back(span(g_h));
  const Record bwd =
      check(d, what, {&x.logits, &x.labels, &x.mask, &g_lp, &g_h}, {&grad},
            guarded(what, bins, [&](Record&) { forward([&](const auto& res) { backward(res, map3(grad, gd)); }); }));
  const bool bwd_refused =
      !(gd == s) || misaligned<Z>(grad) || misaligned<S>(g_lp) || (back == 2 && (misaligned<S>(g_h) || !o.entropy));
  if (bwd.thrown.empty() == bwd_refused)
    fail(what, bwd.thrown.empty() ? "a call it must refuse returned" : "a valid call threw " + bwd.thrown);
  if (bwd.thrown.empty()) expect_zero_rows(what, grad, x.mask.dropped, s.V);
}

template <class Z, class M, class Lab>
void ppo(Decoder& d, Batch<Z, M, Lab>& x) {
  using S = compute_t<Z>;
  const Dims s = x.s;
  Input<S> old(d, x.mask), adv(d, x.mask), ref(d, x.mask);
  const bool with_ref = d.flag();
  const bool wild = d.below(4) == 0;
  const auto po = ppo_options(d, wild, with_ref);
  const pl::LogprobOptions lo = logprob_options(d, wild);
  const int overlap = d.below(8);
  const Dims gd = grad_dims(d, s);
  Buf<Z> grad(d, gd.B * gd.T, gd.V);
  // Else u = z / tau may overflow to -inf everywhere; without log_ratio_clamp, exp(logp -
  // old_logp) * A overflows d loss / d logp to inf, and inf * (1 - p_y) is NaN where p_y = 1.
  d.tame = d.tame && lo.temperature >= 1e-3 && po.log_ratio_clamp;
  const std::string what = with_ref ? "ppo_clip_from_logits with ref_logp" : "ppo_clip_from_logits";
  const auto z = x.z();
  const auto y = x.labels.mat();
  const auto m = x.mask.mat();
  const auto call = [&](auto&& g) {
    return with_ref ? pl::ppo_clip_from_logits(z, y, old.mat(), adv.mat(), m, ref.mat(), po, lo, g)
                    : pl::ppo_clip_from_logits(z, y, old.mat(), adv.mat(), m, po, lo, g);
  };
  std::vector<Span> ins = x.spans();
  ins.push_back(span(old));
  ins.push_back(span(adv));
  if (with_ref) ins.push_back(span(ref));

  if (overlap == 0) {
    const auto k = d.below<std::size_t>(ins.size());
    if (ins[k].n == 0 || s.B * s.T * s.V == 0) return;
    Map3Out<Z> over(into<Z>(d, ins[k]), s.B, s.T, s.V);
    expect_refused(what + ": grad_logits over an input", ins, [&](Record&) { call(over); });
    return;
  }

  const Record fused =
      check(d, what, {&x.logits, &x.labels, &x.mask, &old, &adv, &ref}, {&grad}, guarded(what, ins, [&](Record& rec) {
              const auto res = call(map3(grad, gd));
              rec.add(res);
              rec.add(res.policy_loss);
              rec.add(res.entropy_loss);
              add(rec, res.logp);
              add(rec, res.entropy);
            }));
  const bool coef_bad = !(lo.entropy_coef >= 0) || !std::isfinite(lo.entropy_coef);
  const bool grad_bad = !(gd == s) || misaligned<Z>(grad);
  const bool refused = x.refused(lo) || coef_bad || grad_bad || misaligned<S>(old) || misaligned<S>(adv) ||
                       (with_ref && misaligned<S>(ref));
  if (refused && fused.thrown.empty()) fail(what, "a call it must refuse returned");

  // The composition it stands for.
  pl::LogprobOptions lo2 = lo;
  lo2.entropy = lo.entropy || lo.entropy_coef != 0;
  lo2.entropy_coef = 0;
  const double coef = lo.entropy_coef;
  Buf<S> g(0, s.B, s.T), gh(0, s.B, s.T);
  Buf<Z> gref(0, s.B * s.T, s.V);
  try {
    const auto tl = pl::token_logprobs(z, y, m, lo2);
    const auto compare = [&](const auto& pp) {
      if (!fused.thrown.empty()) {
        if (coef_bad || grad_bad) return;
        fail(what, "threw " + fused.thrown + ", but token_logprobs -> ppo_clip -> backward returned");
      }
      pp.backward(g.mat_out());
      const std::vector<double>& scales = pp.row_scales();
      const auto T = static_cast<std::size_t>(s.T);
      if (coef != 0) {
        for (std::size_t k = 0; k < gh.size(); ++k) gh.set(k, static_cast<S>(-coef * scales[k / T] * x.weight(k)));
        tl.backward(g.mat(), gh.mat(), map3(gref, s));
      } else {
        tl.backward(g.mat(), map3(gref, s));
      }
      // The fused call's record: loss, losses, metrics, policy_loss, entropy_loss, logp, entropy,
      // grad_logits.
      const auto Bn = static_cast<std::size_t>(s.B), n = Bn * T;
      Record ref_metrics;
      ref_metrics.add_metrics(pp);
      const std::size_t nm = ref_metrics.values.size();
      const std::vector<double>& f = fused.values;
      const std::size_t at_policy = 1 + Bn + nm, at_logp = at_policy + 2, at_ent = at_logp + n,
                        at_grad = at_ent + (lo2.entropy ? n : 0);
      if (f.size() != at_grad + grad.size()) fail(what, "the result has the wrong sizes");
      const auto bits = [&](const char* name, std::size_t i, double got, double want) {
        if (!same_bits(got, want))
          fail(what, std::string(name) + " " + std::to_string(i) + " is " + str(got) +
                         ", token_logprobs -> ppo_clip -> backward's " + str(want));
      };
      for (std::size_t i = 0; i < nm; ++i) bits("metric", i, f[1 + Bn + i], ref_metrics.values[i]);
      bits("policy_loss", 0, f[at_policy], static_cast<double>(pp.loss));
      for (std::size_t i = 0; i < n; ++i) {
        bits("logp", i, f[at_logp + i], static_cast<double>(tl.logp.data()[i]));
        if (lo2.entropy) bits("entropy", i, f[at_ent + i], static_cast<double>(tl.entropy.data()[i]));
      }
      for (std::size_t i = 0; i < gref.size(); ++i)
        bits("grad_logits", i, f[at_grad + i], static_cast<double>(gref.get(i)));
      // The losses: ppo_clip's minus coef times the entropy aggregated as the loss is.
      double ent_loss = 0, ent_scale = 0;
      for (std::size_t i = 0; i < Bn; ++i) {
        double e = 0, e_abs = 0;
        if (lo2.entropy)
          for (std::size_t t = 0; t < T; ++t)
            if (!x.mask.dropped[i * T + t]) {
              const double h = x.weight(i * T + t) * static_cast<double>(tl.entropy.data()[i * T + t]);
              e += h;
              e_abs += std::fabs(h);
            }
        e *= scales[i];
        e_abs *= std::fabs(scales[i]);
        const double want = static_cast<double>(pp.losses(static_cast<Index>(i))) - coef * e;
        if (!close<S>(f[1 + i], want, std::fabs(static_cast<double>(pp.losses(static_cast<Index>(i)))) + coef * e_abs))
          fail(what, "losses " + std::to_string(i) + " is " + str(f[1 + i]) + ", ppo_clip's minus entropy_coef * " +
                         "its entropy term " + str(want));
        ent_loss += e;
        ent_scale += e_abs;
      }
      if (!close<S>(f[at_policy + 1], ent_loss, ent_scale))
        fail(what, "entropy_loss is " + str(f[at_policy + 1]) + ", the aggregated entropy " + str(ent_loss));
      const double want = static_cast<double>(pp.loss) - coef * ent_loss;
      if (!close<S>(f[0], want, std::fabs(static_cast<double>(pp.loss)) + coef * ent_scale))
        fail(what, "loss is " + str(f[0]) + ", ppo_clip's loss minus entropy_coef * entropy_loss " + str(want));
      expect_zero_rows(what, grad, x.mask.dropped, s.V);
    };
    with_ref ? compare(pl::ppo_clip(tl.logp, old.mat(), adv.mat(), m, ref.mat(), po))
             : compare(pl::ppo_clip(tl.logp, old.mat(), adv.mat(), m, po));
  } catch (const pl::error& e) {
    if (fused.thrown.empty())
      fail(what, std::string("returned, but token_logprobs -> ppo_clip -> backward threw: ") + e.what());
  }
}

template <class Z, class M, class Lab>
void run(Decoder& d) {
  const Index B = d.below<Index>(5), T = steps(d), V = vocab(d);
  Batch<Z, M, Lab> x(d, {B, T, V});
  d.flag() ? logprobs(d, x) : ppo(d, x);
}

template <class Z, class M>
void with_labels(Decoder& d) {
  d.flag() ? run<Z, M, std::int64_t>(d) : run<Z, M, std::int32_t>(d);
}

template <class Z>
void with_mask(Decoder& d) {
  switch (d.below(4)) {
    case 0:
      return with_labels<Z, bool>(d);
    case 1:
      return with_labels<Z, std::uint8_t>(d);
    case 2:
      return with_labels<Z, float>(d);
    default:
      return with_labels<Z, double>(d);
  }
}

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::Decoder d(data, size);
  switch (d.below(4)) {
    case 0:
      fuzz::with_mask<float>(d);
      break;
    case 1:
      fuzz::with_mask<double>(d);
      break;
    case 2:
      fuzz::with_mask<Eigen::bfloat16>(d);
      break;
    default:
      fuzz::with_mask<Eigen::half>(d);
  }
  return 0;
}
