// Eigen::bfloat16 and Eigen::half token tensors: the conversions against Eigen's own scalar
// conversions (exhaustive from 16 bits, a dense sweep to 16 bits), and every entry point that
// takes [batch, tokens] tokens against independent long-double references evaluated on the
// exactly converted inputs.
//
// Tolerances. A 16-bit input converts to float exactly, so the only differences from the
// reference are the float computation's and, for 16-bit outputs, the final rounding:
// - float results (sequence values, loss, losses, metrics): each token term carries a few float
//   roundings (exp <= 2 ulp, then a multiply or two: <= 4 ulp = 4.8e-7 relative), and the float
//   lanes are summed at most chunk_batches = 8 terms deep before double takes over (<= 7 * 2^-24
//   = 3.5 eps), so |error| <= 8 eps_f * sum |terms| = 9.5e-7 * sum |terms|, plus
//   half an ulp for rounding the double result to float. We check 2e-6 * sum |terms|.
// - 16-bit outputs (gradients, kl estimates): the reference value in long double rounded once to
//   the storage type, and ours within 1 ulp of that (the float value may sit on the other side
//   of a rounding boundary, never further: its relative error is < 1e-5, far below 2^-11).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <vector>

#include "rl_reference.hpp"
#include "throws.hpp"

namespace pl = prefloss;
using BF = Eigen::bfloat16;
using HF = Eigen::half;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;
using ld = long double;

namespace {

std::uint16_t bits16(BF x) { return Eigen::numext::bit_cast<std::uint16_t>(x); }
std::uint16_t bits16(HF x) { return Eigen::numext::bit_cast<std::uint16_t>(x); }
std::uint32_t bits32(float x) { return Eigen::numext::bit_cast<std::uint32_t>(x); }
float from_bits32(std::uint32_t u) { return Eigen::numext::bit_cast<float>(u); }
template <class T>
T from_bits16(std::uint16_t u) {
  return Eigen::numext::bit_cast<T>(u);
}

/// Distance in units in the last place between two 16-bit values (the sign-magnitude patterns
/// mapped onto a line; +0 and -0 are the same point). NaN is infinitely far from anything but NaN.
template <class T>
long ulp16(T a, T b) {
  const bool na = Eigen::numext::isnan(a), nb = Eigen::numext::isnan(b);
  if (na || nb) return na && nb ? 0 : std::numeric_limits<long>::max();
  const auto ord = [](std::uint16_t u) {
    return (u & 0x8000u) ? -static_cast<long>(u & 0x7fffu) : static_cast<long>(u);
  };
  return std::labs(ord(bits16(a)) - ord(bits16(b)));
}

/// The exact float value of each element (Eigen's scalar conversion, independent of prefloss's).
template <class T>
Tok<float> to_f(const Tok<T>& x) {
  Tok<float> r(x.dimension(0), x.dimension(1));
  for (long k = 0; k < x.size(); ++k) r.data()[k] = static_cast<float>(x.data()[k]);
  return r;
}

/// A long-double value rounded to float, then once to T (what "the float gradient rounded once"
/// means for a reference that is not a float).
template <class T>
T round_ref(ld v) {
  return T(static_cast<float>(v));
}

template <class T>
T poison16(long k) {
  return T(rlref::poison<float>(k));
}

template <class M>
M mask_value(std::mt19937& rng, double keep) {
  return rlref::random_mask<M>(rng, keep);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Conversions

TEST_CASE("lowp: every bf16 and half pattern converts to float exactly as Eigen does", "[lowp][convert]") {
  std::vector<std::uint16_t> pat(65536 + 1);
  for (std::uint32_t u = 0; u < 65536; ++u) pat[u] = static_cast<std::uint16_t>(u);
  pat[65536] = 0x3f80;
  std::vector<BF> b(pat.size());
  std::vector<HF> h(pat.size());
  for (std::size_t k = 0; k < pat.size(); ++k) {
    b[k] = from_bits16<BF>(pat[k]);
    h[k] = from_bits16<HF>(pat[k]);
  }
  // Whole array, and shifted by one element with an odd length (unaligned loads and the tails).
  for (const std::size_t off : {std::size_t{0}, std::size_t{1}}) {
    const auto n = static_cast<pl::Index>(pat.size() - off - (off ? 2 : 0));
    std::vector<float> fb(pat.size() + 1, -7.f), fh(pat.size() + 1, -7.f);
    pl::detail::to_float(b.data() + off, fb.data(), n);
    pl::detail::to_float(h.data() + off, fh.data(), n);
    long bad_b = 0, bad_h = 0;
    for (pl::Index k = 0; k < n; ++k) {
      const std::size_t j = static_cast<std::size_t>(k) + off;
      bad_b += bits32(fb[static_cast<std::size_t>(k)]) != bits32(static_cast<float>(b[j]));
      bad_h += bits32(fh[static_cast<std::size_t>(k)]) != bits32(static_cast<float>(h[j]));
    }
    CHECK(bad_b == 0);
    CHECK(bad_h == 0);
    CHECK(fb[static_cast<std::size_t>(n)] == -7.f);  // nothing written past n
    CHECK(fh[static_cast<std::size_t>(n)] == -7.f);
  }
}

TEST_CASE("lowp: float to bf16 and half rounds to nearest even exactly as Eigen does", "[lowp][convert]") {
  std::vector<float> f;
  // A stride through every float bit pattern (both signs, NaNs and subnormals included).
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 65521)
    f.push_back(from_bits32(static_cast<std::uint32_t>(u)));
  // Every bf16 tie (exactly half-way), and one float either side of it.
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const std::uint32_t tie = (u << 16) | 0x8000u;
    for (const std::uint32_t d : {tie - 1, tie, tie + 1}) f.push_back(from_bits32(d));
  }
  // Every half tie: the midpoint of two adjacent finite halves is a float (24 > 12 bits).
  for (std::uint32_t u = 0; u < 0x7c00; ++u) {
    for (const std::uint32_t s : {0u, 0x8000u}) {
      const float a = static_cast<float>(from_bits16<HF>(static_cast<std::uint16_t>(u | s)));
      const float c = static_cast<float>(from_bits16<HF>(static_cast<std::uint16_t>((u + 1) | s)));
      const float mid = static_cast<float>((static_cast<double>(a) + static_cast<double>(c)) / 2);
      f.push_back(a);
      f.push_back(mid);
      f.push_back(std::nextafter(mid, 0.f));
      f.push_back(std::nextafter(mid, std::numeric_limits<float>::infinity() * (s ? -1.f : 1.f)));
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (const float v : {0.f, -0.f, inf, -inf, std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                        std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), 65504.f, 65519.99f,
                        65520.f, -65520.f, 65536.f, 1e10f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 1.0f / 3})
    f.push_back(v);
  for (const std::uint32_t u : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7fffffffu,
                                0xffffffffu, 0x7f80ffffu, 0x7fff8000u})
    f.push_back(from_bits32(u));  // quiet and signalling NaNs, payloads that would round into inf

  for (const std::size_t off : {std::size_t{0}, std::size_t{3}}) {
    const auto n = static_cast<pl::Index>(f.size() - off);
    std::vector<BF> b(f.size() + 1, from_bits16<BF>(0x1234));
    std::vector<HF> h(f.size() + 1, from_bits16<HF>(0x1234));
    pl::detail::from_float(f.data() + off, b.data(), n);
    pl::detail::from_float(f.data() + off, h.data(), n);
    long bad_b = 0, bad_h = 0;
    for (pl::Index k = 0; k < n; ++k) {
      const float x = f[static_cast<std::size_t>(k) + off];
      const bool eb = bits16(b[static_cast<std::size_t>(k)]) == bits16(BF(x));
      const bool eh = bits16(h[static_cast<std::size_t>(k)]) == bits16(HF(x));
      if (!eb && bad_b < 5)
        UNSCOPED_INFO("bf16 of 0x" << std::hex << bits32(x) << ": 0x" << bits16(b[static_cast<std::size_t>(k)])
                                   << " vs Eigen 0x" << bits16(BF(x)) << std::dec);
      if (!eh && bad_h < 5)
        UNSCOPED_INFO("half of 0x" << std::hex << bits32(x) << ": 0x" << bits16(h[static_cast<std::size_t>(k)])
                                   << " vs Eigen 0x" << bits16(HF(x)) << std::dec);
      bad_b += !eb;
      bad_h += !eh;
    }
    CHECK(bad_b == 0);
    CHECK(bad_h == 0);
    CHECK(bits16(b[static_cast<std::size_t>(n)]) == 0x1234);
    CHECK(bits16(h[static_cast<std::size_t>(n)]) == 0x1234);
  }
  // The properties the brief names, stated directly: NaN stays a quiet NaN, overflow is inf.
  BF nb[1];
  HF nh[1];
  const float snan = from_bits32(0x7f800001u), big = 70000.f;
  pl::detail::from_float(&snan, nb, 1);
  CHECK(bits16(nb[0]) == 0x7fc0);
  pl::detail::from_float(&big, nh, 1);
  CHECK(bits16(nh[0]) == 0x7c00);
}

// ---------------------------------------------------------------------------------------------
// masked_sum / masked_mean

namespace {

template <class T, class M>
struct Rows {
  Tok<T> x;
  Tok<M> m;
  Rows(long B, long T_, unsigned seed, bool poison) : x(B, T_), m(B, T_) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> val(-6.0, 2.0);
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T_; ++t) {
        m(i, t) = mask_value<M>(rng, i == 1 ? 0.0 : 0.7);  // row 1 is empty
        x(i, t) = T(static_cast<float>(val(rng)));
        if (poison && m(i, t) == M(0)) x(i, t) = poison16<T>(i * T_ + t);
      }
  }
};

/// sum (and weight) of w x over selected tokens in long double, and sum |w x| for the bound.
template <class M>
void ref_sums(const Tok<float>& x, const Tok<M>& m, long i, ld& s, ld& w, ld& a) {
  s = w = a = 0;
  for (long t = 0; t < x.dimension(1); ++t)
    if (m(i, t) != M(0)) {
      const ld wt = static_cast<ld>(m(i, t));
      s += wt * x(i, t);
      a += std::fabs(wt * x(i, t));
      w += wt;
    }
}

template <class T, class M>
void check_masked(long B, long T_, unsigned seed) {
  CAPTURE(B, T_, seed);
  const Rows<T, M> in(B, T_, seed, true);
  const Tok<float> xf = to_f(in.x);
  const auto sum = pl::masked_sum(in.x, in.m);
  const auto mean = pl::masked_mean(in.x, in.m);
  static_assert(std::is_same_v<typename decltype(sum)::Scalar, float>, "16-bit tokens give float sequence values");
  const Vec<float> vs = sum.eval(), vm = mean.eval();
  Vec<float> up(B);
  for (long i = 0; i < B; ++i) up(i) = static_cast<float>(0.75 - 0.5 * static_cast<double>(i));
  Tok<T> gs(B, T_), gm(B, T_);
  gs.setConstant(T(42.f));
  gm.setConstant(T(42.f));
  sum.backward(up, gs);
  mean.backward(up, gm);
  for (long i = 0; i < B; ++i) {
    ld s, w, a;
    ref_sums(xf, in.m, i, s, w, a);
    const ld rm = w != 0 ? s / w : 0;
    CHECK(std::fabs(vs(i) - s) <= 2e-6L * a + 1e-30L);
    CHECK(std::fabs(vm(i) - rm) <= 2e-6L * (w != 0 ? a / w : 0) + 1e-30L);
    long worst = 0;
    for (long t = 0; t < T_; ++t) {
      const bool sel = in.m(i, t) != M(0);
      const ld wt = sel ? static_cast<ld>(in.m(i, t)) : 0;
      const T es = round_ref<T>(static_cast<ld>(up(i)) * wt);
      const T em = round_ref<T>(w != 0 ? static_cast<ld>(up(i)) * wt / w : 0);
      worst = std::max({worst, ulp16(gs(i, t), es), ulp16(gm(i, t), em)});
      if (!sel) CHECK((bits16(gs(i, t)) == 0 && bits16(gm(i, t)) == 0));
    }
    CHECK(worst <= 1);
  }
  // The 16-bit path is the float path on the converted tokens: sums give the float path's bits
  // at any row length; gradients are its float gradient rounded once.
  const auto sf = pl::masked_sum(xf, in.m);
  const auto mf = pl::masked_mean(xf, in.m);
  Tok<float> gsf(B, T_), gmf(B, T_);
  sf.backward(up, gsf);
  mf.backward(up, gmf);
  long bad = 0;
  for (long k = 0; k < gs.size(); ++k)
    bad += bits16(gs.data()[k]) != bits16(T(gsf.data()[k])) || bits16(gm.data()[k]) != bits16(T(gmf.data()[k]));
  CHECK(bad == 0);
  const Vec<float> vsf = sf.eval(), vmf = mf.eval();
  for (long i = 0; i < B; ++i) {
    CHECK(bits32(vs(i)) == bits32(vsf(i)));
    CHECK(bits32(vm(i)) == bits32(vmf(i)));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("lowp: masked_sum / masked_mean and their adjoints over 16-bit tokens", "[lowp][reduce]", BF, HF) {
  for (const long T_ : {1L, 15L, 37L, 1024L, 2500L}) {
    check_masked<TestType, std::uint8_t>(4, T_, 11);
    check_masked<TestType, float>(4, T_, 12);
    check_masked<TestType, bool>(3, T_, 13);
    check_masked<TestType, double>(3, T_, 14);
  }
}

TEMPLATE_TEST_CASE("lowp: masked-out NaN/inf in 16-bit tokens never matter", "[lowp][reduce]", BF, HF) {
  for (const long T_ : {37L, 2500L}) {
    const Rows<TestType, float> clean(3, T_, 5, false), dirty(3, T_, 5, true);
    const Vec<float> a = pl::masked_mean(clean.x, clean.m).eval(), b = pl::masked_mean(dirty.x, dirty.m).eval();
    for (long i = 0; i < 3; ++i) CHECK(bits32(a(i)) == bits32(b(i)));
    Tok<TestType> x = dirty.x, old = dirty.x;
    Tok<float> adv(3, T_);
    adv.setConstant(0.5f);
    Tok<TestType> g1(3, T_), g2(3, T_);
    const auto r1 = pl::ppo_clip(clean.x, clean.x, adv, clean.m, pl::PpoOptions{}, g1);
    const auto r2 = pl::ppo_clip(x, old, adv, dirty.m, pl::PpoOptions{}, g2);
    CHECK(bits32(r1.loss) == bits32(r2.loss));
    CHECK(bits32(r1.metrics.ratio_max) == bits32(r2.metrics.ratio_max));
    long bad = 0;
    for (long k = 0; k < g1.size(); ++k) bad += bits16(g1.data()[k]) != bits16(g2.data()[k]);
    CHECK(bad == 0);
  }
}

// ---------------------------------------------------------------------------------------------
// ppo_clip / value_loss

namespace {

/// PPO inputs with a 16-bit logp, old_logp of type O, advantages of type A, ref of type R.
template <class T, class O, class A, class R, class M>
struct Ppo16 {
  Tok<T> lp;
  Tok<O> old;
  Tok<A> adv;
  Tok<R> ref;
  Tok<M> mask;
  Ppo16(long B, long T_, unsigned seed) : lp(B, T_), old(B, T_), adv(B, T_), ref(B, T_), mask(B, T_) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> old_d(-5.0, -0.5), dl(-0.5, 0.5), a_d(-2.0, 2.0), x_d(-1.0, 1.0);
    for (long i = 0; i < B; ++i)
      for (long t = 0; t < T_; ++t) {
        const long k = i * T_ + t;
        mask(i, t) = mask_value<M>(rng, i == 2 ? 0.0 : 0.75);
        const double o = old_d(rng);
        old(i, t) = O(static_cast<float>(o));
        lp(i, t) = T(static_cast<float>(o + dl(rng)));
        adv(i, t) = A(static_cast<float>(a_d(rng)));
        double x = x_d(rng);
        if (std::fabs(x) < 0.05) x = 0.05;  // keeps 1 - exp(x) (the k3 derivative) away from 0
        ref(i, t) = R(static_cast<float>(static_cast<double>(static_cast<float>(lp(i, t))) + x));
        if (mask(i, t) == M(0)) {
          lp(i, t) = T(rlref::poison<float>(k));
          old(i, t) = O(rlref::poison<float>(k + 1));
          adv(i, t) = A(rlref::poison<float>(k + 2));
          ref(i, t) = R(rlref::poison<float>(k));
        }
      }
  }
};

template <class X>
Tok<float> to_float_tok(const Tok<X>& x) {
  if constexpr (std::is_same_v<X, float>) {
    return x;
  } else {
    return to_f(x);
  }
}

/// d loss / d logp of one token in long double (verl's formula, torch's conventions away from
/// ties), without the row scale; sets near = true when the ratio sits within 1e-5 of a clip
/// bound, where the float ratio may fall on the other side (such tokens are not compared).
ld ppo_token_grad(ld lp, ld old, ld A, ld ref, const pl::PpoOptions& o, bool& near) {
  const ld r = std::exp(lp - old);
  const ld lo = 1 - static_cast<ld>(o.clip_low), hi = 1 + static_cast<ld>(o.clip_high);
  near = std::fabs(r - lo) < 1e-5L || std::fabs(r - hi) < 1e-5L;
  const ld l1 = -A * r, l2 = -A * std::min(std::max(r, lo), hi);
  ld g = 0;
  if (r >= lo && r <= hi) {
    g = -A * r;  // both branches equal and pass
  } else if (l1 > l2) {
    g = -A * r;
  }
  if (o.kl_coef != 0) g += static_cast<ld>(o.kl_coef) * (1 - std::exp(ref - lp));  // k3 inside its clamps
  return g;
}

/// Row scale d loss / d S_i for token_mean and seq_mean_token_mean.
ld row_scale_ref(const rlref::Data& d, long i, pl::Aggregation a) {
  ld W = 0, Wi = 0;
  for (long r = 0; r < d.B; ++r)
    for (long t = 0; t < d.T; ++t) {
      W += d.w[d.at(r, t)];
      if (r == i) Wi += d.w[d.at(r, t)];
    }
  if (a == pl::Aggregation::token_mean) return W != 0 ? 1 / W : 0;
  return Wi != 0 ? 1 / (static_cast<ld>(d.B) * Wi) : 0;
}

template <class T, class O, class A, class R, class M>
void check_ppo(long B, long T_, unsigned seed, pl::Aggregation agg, bool with_ref) {
  CAPTURE(B, T_, seed, static_cast<int>(agg), with_ref);
  const Ppo16<T, O, A, R, M> c(B, T_, seed);
  pl::PpoOptions o;
  o.aggregation = agg;
  o.clip_low = 0.2;
  o.clip_high = 0.28;
  if (with_ref) o.kl_coef = 0.05;
  Tok<T> gf(B, T_), gb(B, T_);
  gf.setConstant(T(9.f));
  gb.setConstant(T(9.f));
  auto two =
      with_ref ? pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o) : pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o);
  auto fused = with_ref ? pl::ppo_clip(c.lp, c.old, c.adv, c.mask, c.ref, o, gf)
                        : pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o, gf);
  two.backward(gb);
  static_assert(std::is_same_v<decltype(two.loss), float>, "16-bit inputs give float results");

  const Tok<float> lp = to_float_tok(c.lp), old = to_float_tok(c.old), adv = to_float_tok(c.adv),
                   ref = to_float_tok(c.ref);
  const rlref::Data d = rlref::to_data(lp, old, adv, c.mask, with_ref ? &ref : nullptr);
  const rlref::PpoRef e = rlref::ppo_ref(d, o);
  std::vector<ld> absl(e.tokens.size()), rows_abs;
  for (std::size_t k = 0; k < absl.size(); ++k) absl[k] = std::fabs(e.tokens[k]);
  rlref::aggregate(d, absl, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, &rows_abs);
  ld scale = 0;
  for (const ld v : rows_abs) scale += v;
  for (const auto* r : {&two, &fused}) {
    CHECK(std::fabs(r->loss - e.loss) <= 2e-6L * scale);
    for (long i = 0; i < B; ++i)
      CHECK(std::fabs(r->losses(i) - e.rows[static_cast<std::size_t>(i)]) <=
            2e-6L * rows_abs[static_cast<std::size_t>(i)] + 1e-30L);
    CHECK(std::fabs(r->metrics.clip_fraction - e.clip) <= 1e-6L);
    CHECK(std::fabs(r->metrics.approx_kl - e.approx_kl) <= 2e-6L);
    CHECK(std::fabs(r->metrics.ratio_mean - e.ratio_mean) <= 2e-6L * e.ratio_mean);
    CHECK(std::fabs(r->metrics.ratio_max - e.ratio_max) <= 2e-6L * e.ratio_max);
    CHECK(std::fabs(r->metrics.kl_mean - e.kl_mean) <= 2e-6L * (1 + e.kl_mean));
    CHECK(std::fabs(r->metrics.token_weight - e.weight) <= 1e-6L * e.weight);
  }
  CHECK(bits32(two.loss) == bits32(fused.loss));

  long worst = 0, near_count = 0, compared = 0;
  bool masked_zero = true;
  for (long i = 0; i < B; ++i) {
    const ld s = row_scale_ref(d, i, agg);
    for (long t = 0; t < T_; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) {
        masked_zero = masked_zero && bits16(gf(i, t)) == 0 && bits16(gb(i, t)) == 0;
        continue;
      }
      bool near = false;
      const ld g = s * d.w[k] * ppo_token_grad(d.x0[k], d.x1[k], d.x2[k], d.x3[k], o, near);
      if (near) {
        ++near_count;
        continue;
      }
      ++compared;
      worst = std::max({worst, ulp16(gf(i, t), round_ref<T>(g)), ulp16(gb(i, t), round_ref<T>(g))});
    }
  }
  CHECK(masked_zero);
  CHECK(worst <= 1);
  CHECK(near_count <= compared / 100);
  long diff = 0;
  for (long k = 0; k < gf.size(); ++k) diff += bits16(gf.data()[k]) != bits16(gb.data()[k]);
  CHECK(diff == 0);  // fused and two-pass gradients are the same bits

  // The 16-bit call is the float call on the converted inputs: one chunk per row gives its
  // loss bits, and every gradient is its float gradient rounded once.
  Tok<float> g32(B, T_);
  const auto f32 =
      with_ref ? pl::ppo_clip(lp, old, adv, c.mask, ref, o, g32) : pl::ppo_clip(lp, old, adv, c.mask, o, g32);
  if (T_ <= 1024) CHECK(bits32(f32.loss) == bits32(fused.loss));
  long bad = 0;
  for (long k = 0; k < gf.size(); ++k) bad += bits16(gf.data()[k]) != bits16(T(g32.data()[k]));
  CHECK(bad == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("lowp: ppo_clip with 16-bit log-probs against the long-double reference", "[lowp][ppo]", BF, HF) {
  for (const auto agg : {pl::Aggregation::token_mean, pl::Aggregation::seq_mean_token_mean})
    for (const bool with_ref : {false, true})
      for (const long T_ : {1L, 37L, 300L, 2100L}) {
        check_ppo<TestType, TestType, TestType, TestType, std::uint8_t>(4, T_, 21, agg, with_ref);
        check_ppo<TestType, TestType, TestType, TestType, float>(4, T_, 22, agg, with_ref);
      }
}

// The row pass reads a 16-bit row in the chunks its streaming pass converts: a row within one
// chunk sums its log-ratios exactly as the float call does; a longer row merges its chunk sums in
// double, so its mean log-ratio may differ from the float call's in the last float bit.
TEST_CASE("lowp: ppo_clip at sequence level is the float call on the converted inputs", "[lowp][ppo][gspo]") {
  for (const long T_ : {37L, 1024L, 2100L}) {
    CAPTURE(T_);
    const Ppo16<BF, BF, BF, BF, std::uint8_t> c(4, T_, 41);
    pl::PpoOptions o;
    o.importance_level = pl::ImportanceLevel::sequence;
    // A row's mean log-ratio has a spread of about 0.33 / sqrt(T): clips this tight bind.
    o.clip_low = 0.1 / std::sqrt(static_cast<double>(T_));
    o.clip_high = o.clip_low;
    Tok<BF> g(4, T_);
    const auto r = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, o, g);
    const Tok<float> lp = to_float_tok(c.lp), old = to_float_tok(c.old), adv = to_float_tok(c.adv);
    Tok<float> g32(4, T_);
    const auto f = pl::ppo_clip(lp, old, adv, c.mask, o, g32);
    CHECK(r.metrics.clip_fraction > 0);
    if (T_ <= pl::detail::lowp_chunk) {
      CHECK(bits32(r.loss) == bits32(f.loss));
      CHECK(bits32(r.metrics.ratio_mean) == bits32(f.metrics.ratio_mean));
      long bad = 0;
      for (long k = 0; k < g.size(); ++k) bad += bits16(g.data()[k]) != bits16(BF(g32.data()[k]));
      CHECK(bad == 0);
    } else {
      // One float ulp in a row's mean log-ratio moves its ratio by <= 2^-23 (relative) and the
      // loss and gradient with it; a gradient may then round to the neighbouring bf16.
      double abs_sum = 0;
      for (long i = 0; i < 4; ++i) abs_sum += std::fabs(static_cast<double>(f.losses(i)));
      CHECK(std::fabs(static_cast<double>(r.loss) - f.loss) <= 4e-7 * abs_sum);
      long worst = 0;
      for (long k = 0; k < g.size(); ++k) worst = std::max(worst, ulp16(g.data()[k], BF(g32.data()[k])));
      CHECK(worst <= 1);
    }
  }
}

TEST_CASE("lowp: ppo_clip with mixed float / bf16 / half inputs", "[lowp][ppo]") {
  for (const long T_ : {37L, 1500L}) {
    // bf16 log-probs with float advantages (the common trainer layout), half old log-probs.
    check_ppo<BF, HF, float, float, std::uint8_t>(4, T_, 31, pl::Aggregation::token_mean, true);
    check_ppo<BF, float, float, BF, bool>(4, T_, 32, pl::Aggregation::seq_mean_token_mean, true);
    check_ppo<HF, HF, BF, float, double>(4, T_, 33, pl::Aggregation::token_mean, false);
  }
  // A float logp with 16-bit constants: the gradient is float.
  const Ppo16<float, BF, BF, BF, std::uint8_t> c(3, 50, 34);
  Tok<float> g(3, 50);
  const auto r = pl::ppo_clip(c.lp, c.old, c.adv, c.mask, pl::PpoOptions{}, g);
  const Tok<float> old = to_f(c.old), adv = to_f(c.adv);
  Tok<float> g32(3, 50);
  const auto r32 = pl::ppo_clip(c.lp, old, adv, c.mask, pl::PpoOptions{}, g32);
  CHECK(bits32(r.loss) == bits32(r32.loss));
  long bad = 0;
  for (long k = 0; k < g.size(); ++k) bad += bits32(g.data()[k]) != bits32(g32.data()[k]);
  CHECK(bad == 0);
}

namespace {

template <class T, class M>
void check_value(long B, long T_, unsigned seed, bool clipped) {
  CAPTURE(B, T_, seed, clipped);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> v_d(-3.0, 3.0), dv(-0.6, 0.6), r_d(-3.0, 3.0);
  Tok<T> v(B, T_), old(B, T_), ret(B, T_);
  Tok<M> m(B, T_);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T_; ++t) {
      m(i, t) = mask_value<M>(rng, 0.8);
      const double o = v_d(rng);
      old(i, t) = T(static_cast<float>(o));
      v(i, t) = T(static_cast<float>(o + dv(rng)));
      ret(i, t) = T(static_cast<float>(r_d(rng)));
      if (m(i, t) == M(0)) v(i, t) = poison16<T>(i + t);
    }
  pl::ValueOptions o;
  if (!clipped) o.clip = std::nullopt;
  Tok<T> gf(B, T_), gb(B, T_);
  const auto fused = pl::value_loss(v, old, ret, m, o, gf);
  const auto two = pl::value_loss(v, old, ret, m, o);
  two.backward(gb);
  const Tok<float> vf = to_f(v), of = to_f(old), rf = to_f(ret);
  const rlref::Data d = rlref::to_data(vf, of, rf, m, static_cast<const Tok<float>*>(nullptr));
  const rlref::ValueRef e = rlref::value_ref(d, o);
  ld scale = 0;
  for (const ld l : e.tokens) scale += std::fabs(l);
  scale /= e.weight;  // token_mean
  CHECK(std::fabs(fused.loss - e.loss) <= 2e-6L * scale);
  CHECK(bits32(fused.loss) == bits32(two.loss));
  CHECK(std::fabs(fused.metrics.value_mean - e.value_mean) <= 2e-6L * 3);
  CHECK(std::fabs(fused.metrics.clip_fraction - e.clip) <= 1e-6L);
  long worst = 0, near_count = 0;
  const ld eps = clipped ? static_cast<ld>(*o.clip) : 0;
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T_; ++t) {
      const std::size_t k = d.at(i, t);
      if (!d.sel[k]) {
        CHECK((bits16(gf(i, t)) == 0 && bits16(gb(i, t)) == 0));
        continue;
      }
      const ld x = d.x0[k], lo = d.x1[k] - eps, hi = d.x1[k] + eps, R = d.x2[k];
      ld g = x - R;  // unclipped, or inside the clip range (both branches equal)
      if (clipped && (x < lo || x > hi)) {
        if (std::fabs(x - lo) < 1e-5L || std::fabs(x - hi) < 1e-5L) {
          ++near_count;
          continue;
        }
        const ld vc = x < lo ? lo : hi;
        g = (x - R) * (x - R) > (vc - R) * (vc - R) ? x - R : 0;
      }
      g *= d.w[k] / e.weight;
      worst = std::max({worst, ulp16(gf(i, t), round_ref<T>(g)), ulp16(gb(i, t), round_ref<T>(g))});
    }
  CHECK(worst <= 1);
  CHECK(near_count <= B * T_ / 100);
}

}  // namespace

TEMPLATE_TEST_CASE("lowp: value_loss with 16-bit values against the long-double reference", "[lowp][value]", BF, HF) {
  for (const long T_ : {5L, 37L, 2100L})
    for (const bool clipped : {true, false}) {
      check_value<TestType, std::uint8_t>(3, T_, 41, clipped);
      check_value<TestType, float>(3, T_, 42, clipped);
    }
  // Mixed: bf16 values with float old values and returns.
  Tok<BF> v(2, 40);
  Tok<float> old(2, 40), ret(2, 40);
  Tok<std::uint8_t> m(2, 40);
  for (long k = 0; k < v.size(); ++k) {
    v.data()[k] = BF(0.01f * static_cast<float>(k));
    old.data()[k] = 0.2f;
    ret.data()[k] = -0.1f;
    m.data()[k] = k % 3 != 0;
  }
  Tok<BF> g(2, 40);
  Tok<float> g32(2, 40);
  const auto r = pl::value_loss(v, old, ret, m, pl::ValueOptions{}, g);
  const Tok<float> vf = to_f(v);
  const auto r32 = pl::value_loss(vf, old, ret, m, pl::ValueOptions{}, g32);
  CHECK(bits32(r.loss) == bits32(r32.loss));
  long bad = 0;
  for (long k = 0; k < g.size(); ++k) bad += bits16(g.data()[k]) != bits16(BF(g32.data()[k]));
  CHECK(bad == 0);
}

// ---------------------------------------------------------------------------------------------
// Sequence losses over 16-bit masked sums

TEMPLATE_TEST_CASE("lowp: dpo (two-pass and fused) over 16-bit masked sums", "[lowp][dpo]", BF, HF) {
  const long B = 5, T_ = 123;
  const Rows<TestType, std::uint8_t> c(B, T_, 51, true), r(B, T_, 52, true);
  Vec<float> rc(B), rr(B);
  for (long i = 0; i < B; ++i) {
    rc(i) = -30.f + static_cast<float>(i);
    rr(i) = -31.f + 2.f * static_cast<float>(i);
  }
  pl::DpoOptions o;
  o.beta = 0.1;
  const auto res = pl::dpo(pl::masked_sum(c.x, c.m), pl::masked_sum(r.x, r.m), rc, rr, o);
  Tok<TestType> gc(B, T_), gr(B, T_);
  res.backward(gc, gr);
  // The fused form writes the same bits as the two-pass form.
  Tok<TestType> fc(B, T_), fr(B, T_);
  const auto fused = pl::dpo(pl::masked_sum(c.x, c.m), pl::masked_sum(r.x, r.m), rc, rr, o, fc, fr);
  CHECK(bits32(fused.loss) == bits32(res.loss));
  long fused_diff = 0;
  for (long k = 0; k < gc.size(); ++k)
    fused_diff += bits16(fc.data()[k]) != bits16(gc.data()[k]) || bits16(fr.data()[k]) != bits16(gr.data()[k]);
  CHECK(fused_diff == 0);
  // Reference: -mean log sigmoid(beta (pc - rc - pr + rr)) in long double; d / d pc = -beta
  // sigmoid(-z) / B at every selected token of the chosen row, the opposite for the rejected.
  const Tok<float> xc = to_f(c.x), xr = to_f(r.x);
  ld loss = 0, abs_terms = 0;
  for (long i = 0; i < B; ++i) {
    ld pc, pr, w, a1, a2;
    ref_sums(xc, c.m, i, pc, w, a1);
    ref_sums(xr, r.m, i, pr, w, a2);
    const ld z = 0.1L * ((pc - rc(i)) - (pr - rr(i)));
    loss += std::log1p(std::exp(-z)) / B;
    abs_terms += 0.1L * (a1 + a2 + std::fabs(rc(i)) + std::fabs(rr(i))) / B;
    const ld gz = -0.1L / (1 + std::exp(z)) / B;
    long worst = 0;
    for (long t = 0; t < T_; ++t) {
      worst = std::max(worst, ulp16(gc(i, t), round_ref<TestType>(c.m(i, t) ? gz : 0)));
      worst = std::max(worst, ulp16(gr(i, t), round_ref<TestType>(r.m(i, t) ? -gz : 0)));
    }
    CHECK(worst <= 1);
  }
  // The loss moves by at most |d loss / d z| <= 1/B per unit of z error, and z's error is the
  // sums' (2e-6 relative to their absolute sums, above).
  CHECK(std::fabs(res.loss - loss) <= 2e-6L * abs_terms + 1e-6L * loss);
}

// ---------------------------------------------------------------------------------------------
// rl helpers

TEMPLATE_TEST_CASE("lowp: kl_estimate over 16-bit log-probs", "[lowp][kl]", BF, HF) {
  const Ppo16<TestType, TestType, TestType, TestType, std::uint8_t> c(3, 1100, 61);
  const Tok<float> lp = to_f(c.lp), ref = to_f(c.ref);
  for (const auto est : rlref::kl_estimators) {
    CAPTURE(rlref::kl_name(est));
    pl::KlOptions o;
    o.estimator = est;
    Tok<float> out_f(3, 1100);
    Tok<TestType> out_h(3, 1100), g(3, 1100);
    pl::kl_estimate(c.lp, c.ref, c.mask, o, out_f, g);
    pl::kl_estimate(c.lp, c.ref, c.mask, o, out_h);
    long worst = 0, bad_f = 0;
    for (long i = 0; i < 3; ++i)
      for (long t = 0; t < 1100; ++t) {
        if (c.mask(i, t) == 0) {
          CHECK((out_f(i, t) == 0.f && bits16(out_h(i, t)) == 0 && bits16(g(i, t)) == 0));
          continue;
        }
        const ld x = lp(i, t), r = ref(i, t);
        const ld k = rlref::kl_ref(x, r, est, o.k3_log_ratio_clamp, o.k3_clamp);
        const ld dk = rlref::kl_grad_ref(x, r, est, o.k3_log_ratio_clamp, o.k3_clamp);
        // k3 = e^y - y - 1 cancels for small y: its float error is ~2 eps_f (e^y + |y| + 1).
        const ld tol = 4e-7L * (std::fabs(k) + std::exp(r - x) + std::fabs(r - x) + 1);
        bad_f += std::fabs(out_f(i, t) - k) > tol;
        const bool k3_value = est == pl::KlEstimator::k3 || est == pl::KlEstimator::k3_plus;
        if (!k3_value || std::fabs(k) > 1e-2L)  // away from k3's cancellation
          worst = std::max(worst, ulp16(out_h(i, t), round_ref<TestType>(k)));
        worst = std::max(worst, ulp16(g(i, t), round_ref<TestType>(dk)));
      }
    CHECK(bad_f == 0);
    CHECK(worst <= 1);
  }
}

TEST_CASE("lowp: gae and masked_whiten read 16-bit tokens exactly", "[lowp][gae]") {
  const long B = 3, T_ = 41;
  Tok<BF> r(B, T_);
  Tok<HF> v(B, T_);
  Tok<std::uint8_t> m(B, T_);
  std::mt19937 rng(71);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (long i = 0; i < B; ++i)
    for (long t = 0; t < T_; ++t) {
      m(i, t) = t < T_ - i * 5;
      r(i, t) = m(i, t) ? BF(static_cast<float>(u(rng))) : poison16<BF>(t);
      v(i, t) = m(i, t) ? HF(static_cast<float>(u(rng))) : poison16<HF>(t);
    }
  pl::GaeOptions o;
  o.gamma = 0.99;
  o.lam = 0.95;
  Tok<float> a(B, T_), ret(B, T_);
  pl::gae(r, v, m, o, a, ret);
  Tok<BF> a16(B, T_), ret16(B, T_);
  Tok<BF> rr = r;
  pl::gae(rr, r, m, o, a16, ret16);
  long worst = 0;
  for (long i = 0; i < B; ++i) {
    ld next_v = 0, next_a = 0, next_v16 = 0, next_a16 = 0;
    for (long t = T_ - 1; t >= 0; --t) {
      if (!m(i, t)) {
        CHECK((a(i, t) == 0.f && ret(i, t) == 0.f && bits16(a16(i, t)) == 0));
        continue;
      }
      const ld rt = static_cast<float>(r(i, t)), vt = static_cast<float>(v(i, t));
      next_a = rt + 0.99L * next_v - vt + 0.99L * 0.95L * next_a;
      next_v = vt;
      CHECK(std::fabs(a(i, t) - next_a) <= 1e-6L * (1 + std::fabs(next_a)));
      CHECK(std::fabs(ret(i, t) - (next_a + vt)) <= 1e-6L * (1 + std::fabs(next_a + vt)));
      next_a16 = rt + 0.99L * next_v16 - rt + 0.99L * 0.95L * next_a16;  // values = rewards here
      next_v16 = rt;
      worst = std::max(worst, ulp16(a16(i, t), round_ref<BF>(next_a16)));
    }
  }
  CHECK(worst <= 1);

  Tok<float> w(B, T_);
  pl::masked_whiten(v, m, w);
  ld sw = 0, sx = 0, ss = 0;
  for (long k = 0; k < v.size(); ++k)
    if (m.data()[k]) {
      sw += 1;
      sx += static_cast<float>(v.data()[k]);
    }
  const ld mean = sx / sw;
  for (long k = 0; k < v.size(); ++k)
    if (m.data()[k]) ss += (static_cast<float>(v.data()[k]) - mean) * (static_cast<float>(v.data()[k]) - mean);
  const ld inv = 1 / std::sqrt(ss / sw * sw / (sw - 1) + 1e-8L);
  for (long k = 0; k < v.size(); ++k) {
    const ld e = m.data()[k] ? (static_cast<float>(v.data()[k]) - mean) * inv : 0;
    CHECK(std::fabs(w.data()[k] - e) <= 1e-6L * (1 + std::fabs(e)));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_CASE("lowp: bad 16-bit input is rejected before anything is written", "[lowp][errors]") {
  Tok<BF> lp(2, 8), old(2, 9), g(2, 8);
  Tok<float> adv(2, 8), mw(2, 8);
  Tok<std::uint8_t> m(2, 8);
  lp.setConstant(BF(-1.f));
  old.setConstant(BF(-1.f));
  adv.setConstant(1.f);
  m.setConstant(1);
  mw.setConstant(1.f);
  g.setConstant(BF(7.f));
  expect_throw<pl::shape_error>([&] { pl::ppo_clip(lp, old, adv, m, pl::PpoOptions{}, g); }, "ppo_clip",
                                {"'old_logp'", "[2, 9]"});
  mw(1, 3) = -1.f;
  expect_throw<pl::value_error>([&] { pl::ppo_clip(lp, lp, adv, mw, pl::PpoOptions{}, g); }, "ppo_clip",
                                {"'mask'", "-1", "[1, 3]"});
  expect_throw<pl::value_error>([&] { pl::masked_sum(lp, mw); }, "masked_sum", {"'mask'", "[1, 3]"});
  Tok<BF> small(2, 7);
  expect_throw<pl::shape_error>([&] { pl::masked_sum(lp, m).backward(Vec<float>(2), small); }, "backward",
                                {"'grad'", "[2, 7]"});
  for (long k = 0; k < g.size(); ++k) CHECK(bits16(g.data()[k]) == bits16(BF(7.f)));
}
