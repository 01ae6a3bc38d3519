// rl/advantages.hpp, rl/rewards.hpp and rl/kl_controller.hpp against closed forms worked out by
// hand from the anchors' formulas (verl core_algos, TRL GRPOTrainer, Llama 2, OpenRLHF), with
// NaN / -inf padding in masked-out tokens, empty rows, batch 1, groups of one, ties, and every
// rejection (which must leave the outputs untouched). The PyTorch goldens are in test_golden.cpp.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "throws.hpp"

namespace pl = prefloss;

namespace {

template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

const double nan_v = std::numeric_limits<double>::quiet_NaN();
const double inf_v = std::numeric_limits<double>::infinity();

template <class T>
Vec<T> vec(std::initializer_list<double> v) {
  Vec<T> x(static_cast<long>(v.size()));
  long k = 0;
  for (double e : v) x(k++) = static_cast<T>(e);
  return x;
}

template <class T>
Tok<T> tok(long rows, long cols, std::initializer_list<double> v) {
  Tok<T> x(rows, cols);
  long k = 0;
  for (double e : v) x.data()[k++] = static_cast<T>(e);
  REQUIRE(k == rows * cols);
  return x;
}

template <class X>
bool all_equal(const X& t, double v) {
  for (long k = 0; k < t.size(); ++k)
    if (!(static_cast<double>(t.data()[k]) == v)) return false;
  return true;
}

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-14;
}

/// Whitening of weighted values by hand: (x - mean) / sqrt(var * W / (W - 1) + 1e-8).
struct Hand {
  double mean, inv;
};
Hand hand_whiten(const std::vector<double>& x, const std::vector<double>& w) {
  double sw = 0, swx = 0;
  for (std::size_t k = 0; k < x.size(); ++k) sw += w[k], swx += w[k] * x[k];
  const double mean = swx / sw;
  double ss = 0;
  for (std::size_t k = 0; k < x.size(); ++k) ss += w[k] * (x[k] - mean) * (x[k] - mean);
  return {mean, 1 / std::sqrt(ss / sw * sw / (sw - 1) + 1e-8)};
}

}  // namespace

// ---- RLOO ---------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("rloo_advantages: leave-one-out baseline, a lone score passes through", "[advantages][rloo]", float,
                   double) {
  using S = TestType;
  // {1, 2, 3, 6}: sum 12, A_j = s_j - (12 - s_j) / 3.
  const auto s = vec<S>({1, 2, 3, 6, 5, 5, 5, 5});
  Vec<S> out(8);
  pl::rloo_advantages(s, 4, out);
  CHECK(out(0) == Approx(1 - 11.0 / 3).epsilon(tol<S>()));
  CHECK(out(1) == Approx(2 - 10.0 / 3).epsilon(tol<S>()));
  CHECK(out(2) == S(0));
  CHECK(out(3) == S(4));
  for (int k = 4; k < 8; ++k) CHECK(out(k) == S(0));  // ties: no advantage
  // Groups of one (verl compute_rloo_outcome_advantage leaves the score).
  pl::rloo_advantages(s, 1, out);
  for (int k = 0; k < 8; ++k) CHECK(out(k) == s(k));
  // Batch 1.
  const auto one = vec<S>({0.75});
  Vec<S> o1(1);
  pl::rloo_advantages(one, 1, o1);
  CHECK(o1(0) == S(0.75));
  // Interleaved ids: 7 -> {1, 3} (A = -2, 2), 3 -> {2, 6, 4} (A = 2 - 5, 6 - 3, 4 - 4), 9 -> {8}.
  Eigen::Tensor<std::int32_t, 1> ids(6);
  ids.setValues({7, 3, 7, 3, 3, 9});
  const auto si = vec<S>({1, 2, 3, 6, 4, 8});
  Vec<S> oi(6);
  pl::rloo_advantages(si, ids, oi);
  const double want[] = {-2, -3, 2, 3, 0, 8};
  for (int k = 0; k < 6; ++k) CHECK(oi(k) == Approx(want[k]).margin(tol<S>()));
  // In place, and an empty batch.
  Vec<S> inplace = si;
  pl::rloo_advantages(inplace, ids, inplace);
  for (int k = 0; k < 6; ++k) CHECK(inplace(k) == oi(k));
  Vec<S> e(0), eo(0);
  pl::rloo_advantages(e, 3, eo);
}

TEST_CASE("rloo_advantages rejects bad input and writes nothing", "[advantages][rloo]") {
  Vec<double> s(6), out(6), bad(5);
  s.setZero();
  out.setConstant(-42);
  Eigen::Tensor<int, 1> ids(5);
  ids.setZero();
  expect_throw<pl::option_error>([&] { pl::rloo_advantages(s, 0, out); }, "rloo_advantages", {"'group_size'", "0"});
  expect_throw<pl::option_error>([&] { pl::rloo_advantages(s, -2, out); }, "rloo_advantages", {"'group_size'", "-2"});
  expect_throw<pl::shape_error>([&] { pl::rloo_advantages(s, 4, out); }, "rloo_advantages", {"'scores'", "[6]", "4"});
  expect_throw<pl::shape_error>([&] { pl::rloo_advantages(s, 3, bad); }, "rloo_advantages", {"'out'", "[5]"});
  expect_throw<pl::shape_error>([&] { pl::rloo_advantages(s, ids, out); }, "rloo_advantages", {"'group_ids'", "[5]"});
  CHECK(all_equal(out, -42));
}

// ---- OPO ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("opo_advantages: length-weighted baseline", "[advantages][opo]", float, double) {
  using S = TestType;
  // {1, 3} with lengths {1, 3}: b = (1 + 9) / 4 = 2.5. {2, 2, 5} with {2, 0, 1}: b = 9 / 3 = 3
  // (an empty response has weight 0 but its own advantage).
  const auto s = vec<S>({1, 3, 2, 2, 5, 4});
  Eigen::Tensor<std::int64_t, 1> len(6);
  len.setValues({1, 3, 2, 0, 1, 0});
  Eigen::Tensor<int, 1> ids(6);
  ids.setValues({0, 0, 1, 1, 1, 2});
  Vec<S> out(6);
  pl::opo_advantages(s, len, ids, out);
  const double want[] = {-1.5, 0.5, -1, -1, 2, 4};  // the singleton (id 2): b = 0
  for (int k = 0; k < 6; ++k) CHECK(out(k) == Approx(want[k]).margin(tol<S>()));
  // Contiguous pairs, float lengths; ties give 0.
  const auto s2 = vec<S>({1, 3, 7, 7});
  const auto l2 = vec<S>({1, 3, 2, 5});
  Vec<S> o2(4);
  pl::opo_advantages(s2, l2, 2, o2);
  CHECK(o2(0) == S(-1.5));
  CHECK(o2(1) == S(0.5));
  CHECK(o2(2) == S(0));
  CHECK(o2(3) == S(0));
  // Batch 1, group of one.
  const auto one = vec<S>({-0.25});
  Vec<S> o1(1);
  pl::opo_advantages(one, vec<S>({0}), 1, o1);
  CHECK(o1(0) == S(-0.25));
}

TEST_CASE("opo_advantages rejects bad input and writes nothing", "[advantages][opo]") {
  const auto s = vec<double>({1, 2, 3, 4});
  Vec<double> out(4), bad(3);
  out.setConstant(-42);
  // The first group is fine, the second has no length: nothing may be written for either.
  expect_throw<pl::value_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 2, 0, 0}), 2, out);
      },
      "opo_advantages", {"'lengths'", "sums to 0", "[2]"});
  expect_throw<pl::value_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, -1, 1, 1}), 2, out);
      },
      "opo_advantages", {"'lengths'", "-1", "[1]"});
  expect_throw<pl::value_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 1, nan_v, 1}), 2, out);
      },
      "opo_advantages", {"'lengths'", "nan", "[2]"});
  expect_throw<pl::shape_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 1, 1}), 2, out);
      },
      "opo_advantages", {"'lengths'", "[3]"});
  expect_throw<pl::shape_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 1, 1, 1}), 3, out);
      },
      "opo_advantages", {"'scores'"});
  expect_throw<pl::option_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 1, 1, 1}), 0, out);
      },
      "opo_advantages", {"'group_size'"});
  expect_throw<pl::shape_error>(
      [&] {
        pl::opo_advantages(s, vec<double>({1, 1, 1, 1}), 2, bad);
      },
      "opo_advantages", {"'out'"});
  CHECK(all_equal(out, -42));
}

// ---- REINFORCE++-baseline -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("reinforce_pp_baseline_advantages: group mean, then token-weighted whitening", "[advantages][rfpp]",
                   float, double) {
  using S = TestType;
  // ids {0, 0, 1, 2}: a = {1 - 2, 3 - 2, NaN (a lone NaN score, in an empty row), 2 (alone)}.
  const auto s = vec<S>({1, 3, nan_v, 2});
  Eigen::Tensor<int, 1> ids(4);
  ids.setValues({0, 0, 1, 2});
  const auto m = tok<std::uint8_t>(4, 3, {1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1});
  Tok<S> out(4, 3);
  out.setConstant(S(-42));
  pl::reinforce_pp_baseline_advantages(s, ids, m, pl::WhitenOptions{}, out);
  // Row i stands for W_i = {1, 2, 0, 3} tokens of a_i; the empty row is out of the statistics.
  const Hand h = hand_whiten({-1, 1, 2}, {1, 2, 3});
  const double v[] = {(-1 - h.mean) * h.inv, (1 - h.mean) * h.inv, 0, (2 - h.mean) * h.inv};
  for (long i = 0; i < 4; ++i)
    for (long t = 0; t < 3; ++t) {
      CAPTURE(i, t);
      if (m(i, t))
        CHECK(out(i, t) == Approx(v[i]).epsilon(tol<S>()));
      else
        CHECK(out(i, t) == S(0));
    }
  // Contiguous groups of one: a = s; float mask weights count like repeated tokens.
  const auto s2 = vec<S>({1, 4});
  const auto mw = tok<float>(2, 2, {2, 0, 1, 1});
  const auto mr = tok<float>(2, 3, {1, 1, 0, 1, 1, 0});
  Tok<S> o_w(2, 2), o_r(2, 3);
  pl::reinforce_pp_baseline_advantages(s2, 1, mw, pl::WhitenOptions{}, o_w);
  pl::reinforce_pp_baseline_advantages(s2, 1, mr, pl::WhitenOptions{}, o_r);
  CHECK(o_w(0, 0) == Approx(static_cast<double>(o_r(0, 0))).epsilon(tol<S>()));
  CHECK(o_w(1, 0) == Approx(static_cast<double>(o_r(1, 0))).epsilon(tol<S>()));
  CHECK(o_w(0, 1) == S(0));
  // Both are {1, 1, 4, 4} over four tokens: mean 2.5, unbiased var 9 / 3 = 3.
  CHECK(o_r(0, 0) == Approx(-1.5 / std::sqrt(3 + 1e-8)).epsilon(tol<S>()));
  CHECK(o_r(1, 1) == Approx(1.5 / std::sqrt(3 + 1e-8)).epsilon(tol<S>()));
}

TEST_CASE("reinforce_pp_baseline_advantages rejects bad input and writes nothing", "[advantages][rfpp]") {
  const auto s = vec<double>({1, 2});
  const auto m = tok<std::uint8_t>(2, 2, {1, 1, 1, 0});
  const auto m1 = tok<std::uint8_t>(2, 2, {1, 0, 0, 0});
  const auto m3 = tok<std::uint8_t>(3, 2, {1, 1, 1, 1, 1, 1});
  const auto mneg = tok<float>(2, 2, {1, -1, 1, 1});
  Tok<double> out(2, 2), bad(2, 3);
  out.setConstant(-42);
  const pl::WhitenOptions w;
  const char* fn = "reinforce_pp_baseline_advantages";
  expect_throw<pl::error>([&] { pl::reinforce_pp_baseline_advantages(s, 2, m1, w, out); }, fn,
                          {"'mask'", "weight sum 1"});
  expect_throw<pl::value_error>([&] { pl::reinforce_pp_baseline_advantages(s, 2, mneg, w, out); }, fn,
                                {"'mask'", "-1", "[0, 1]"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_baseline_advantages(s, 2, m3, w, out); }, fn, {"'mask'", "[2]"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_baseline_advantages(s, 2, m, w, bad); }, fn, {"'out'"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_baseline_advantages(s, 3, m, w, out); }, fn, {"'scores'"});
  pl::WhitenOptions we;
  we.eps = -1;
  expect_throw<pl::option_error>([&] { pl::reinforce_pp_baseline_advantages(s, 2, m, we, out); }, fn, {"'eps'"});
  CHECK(all_equal(out, -42));
}

// ---- REINFORCE++ --------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("reinforce_pp_advantages: discounted returns skip masked tokens, then whiten", "[advantages][rfpp]",
                   float, double) {
  using S = TestType;
  // Row 0: r = {1, 2, NaN (masked), 3}, gamma 0.5: G = {1 + 0.5 * 3.5, 2 + 0.5 * 3, -, 3}.
  // Row 1: empty (-inf padding). Row 2: {-1, -inf (masked), 0.5, masked NaN}: G = {-0.75, -, 0.5}.
  const auto r = tok<S>(3, 4, {1, 2, nan_v, 3, -inf_v, nan_v, -inf_v, nan_v, -1, -inf_v, 0.5, nan_v});
  const auto m = tok<bool>(3, 4, {true, true, false, true, false, false, false, false, true, false, true, false});
  Tok<S> adv(3, 4), ret(3, 4);
  pl::ReinforcePPOptions o;
  o.gamma = 0.5;
  pl::reinforce_pp_advantages(r, m, o, adv, ret);
  const double G[3][4] = {{2.75, 3.5, 0, 3}, {0, 0, 0, 0}, {-0.75, 0, 0.5, 0}};
  const Hand h = hand_whiten({2.75, 3.5, 3, -0.75, 0.5}, {1, 1, 1, 1, 1});
  for (long i = 0; i < 3; ++i)
    for (long t = 0; t < 4; ++t) {
      CAPTURE(i, t);
      CHECK(ret(i, t) == Approx(G[i][t]).epsilon(tol<S>()));
      if (m(i, t))
        CHECK(adv(i, t) == Approx((G[i][t] - h.mean) * h.inv).epsilon(tol<S>()));
      else
        CHECK(adv(i, t) == S(0));
    }
  // gamma 1 on one row: plain suffix sums {6, 5, 3}; the outputs may alias the rewards.
  auto x = tok<S>(1, 3, {1, 2, 3});
  const auto m1 = tok<std::uint8_t>(1, 3, {1, 1, 1});
  Tok<S> ret1(1, 3);
  pl::reinforce_pp_advantages(x, m1, pl::ReinforcePPOptions{}, x, ret1);
  const Hand h1 = hand_whiten({6, 5, 3}, {1, 1, 1});
  CHECK(ret1(0, 0) == S(6));
  CHECK(ret1(0, 2) == S(3));
  CHECK(x(0, 0) == Approx((6 - h1.mean) * h1.inv).epsilon(tol<S>()));
  CHECK(x(0, 2) == Approx((3 - h1.mean) * h1.inv).epsilon(tol<S>()));
  // Packed rows give the padded result.
  const Vec<S> flat = vec<S>({1, 2, nan_v, 3, -1, -inf_v, 0.5});
  const Vec<std::uint8_t> fm = vec<std::uint8_t>({1, 1, 0, 1, 1, 0, 1});
  Eigen::Tensor<std::int64_t, 1> cu(4);
  cu.setValues({0, 4, 4, 7});
  Vec<S> pa(7), pr(7);
  pl::reinforce_pp_advantages(pl::packed(flat, cu), pl::packed(fm, cu), o, pa, pr);
  const long map[7][2] = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {2, 0}, {2, 1}, {2, 2}};
  for (int k = 0; k < 7; ++k) {
    CHECK(pa(k) == adv(map[k][0], map[k][1]));
    CHECK(pr(k) == ret(map[k][0], map[k][1]));
  }
}

TEST_CASE("reinforce_pp_advantages rejects bad input and writes nothing", "[advantages][rfpp]") {
  const auto r = tok<double>(2, 2, {1, 2, 3, 4});
  const auto m = tok<std::uint8_t>(2, 2, {1, 1, 1, 0});
  const auto m1 = tok<std::uint8_t>(2, 2, {0, 0, 1, 0});
  const auto mnan = tok<double>(2, 2, {1, nan_v, 1, 1});
  Tok<double> a(2, 2), g(2, 2), bad(3, 2);
  a.setConstant(-42);
  g.setConstant(-42);
  const char* fn = "reinforce_pp_advantages";
  pl::ReinforcePPOptions o;
  expect_throw<pl::error>([&] { pl::reinforce_pp_advantages(r, m1, o, a, g); }, fn, {"'mask'", "weight sum 1"});
  expect_throw<pl::value_error>([&] { pl::reinforce_pp_advantages(r, mnan, o, a, g); }, fn, {"'mask'", "nan"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_advantages(r, bad, o, a, g); }, fn, {"'mask'"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_advantages(r, m, o, bad, g); }, fn, {"'advantages_out'"});
  expect_throw<pl::shape_error>([&] { pl::reinforce_pp_advantages(r, m, o, a, bad); }, fn, {"'returns_out'"});
  expect_throw<pl::layout_error>([&] { pl::reinforce_pp_advantages(r, m, o, a, a); }, fn, {"overlap"});
  o.gamma = 1.5;
  expect_throw<pl::option_error>([&] { pl::reinforce_pp_advantages(r, m, o, a, g); }, fn, {"'gamma'", "1.5"});
  o = {};
  o.whiten.eps = -1e-8;
  expect_throw<pl::option_error>([&] { pl::reinforce_pp_advantages(r, m, o, a, g); }, fn, {"'eps'"});
  CHECK(all_equal(a, -42));
  CHECK(all_equal(g, -42));
}

// ---- ReMax ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("remax_advantages: return-to-go minus the greedy baseline", "[advantages][remax]", float, double) {
  using S = TestType;
  const auto r = tok<S>(3, 4, {1, 2, nan_v, 3, nan_v, -inf_v, nan_v, -inf_v, 0.5, -inf_v, -inf_v, -inf_v});
  const auto m = tok<float>(3, 4, {1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0});
  const auto b = vec<S>({2, 7, -0.5});
  Tok<S> adv(3, 4), ret(3, 4);
  pl::remax_advantages(r, b, m, adv, ret);
  const double G[3][4] = {{6, 5, 0, 3}, {0, 0, 0, 0}, {0.5, 0, 0, 0}};
  const double A[3][4] = {{4, 3, 0, 1}, {0, 0, 0, 0}, {1, 0, 0, 0}};
  for (long i = 0; i < 3; ++i)
    for (long t = 0; t < 4; ++t) {
      CHECK(ret(i, t) == S(G[i][t]));
      CHECK(adv(i, t) == S(A[i][t]));
    }
}

TEST_CASE("remax_advantages rejects bad input and writes nothing", "[advantages][remax]") {
  const auto r = tok<double>(2, 2, {1, 2, 3, 4});
  const auto m = tok<std::uint8_t>(2, 2, {1, 1, 1, 0});
  const auto mneg = tok<double>(2, 2, {1, 1, -0.5, 0});
  Tok<double> a(2, 2), g(2, 2), bad(2, 3);
  a.setConstant(-42);
  g.setConstant(-42);
  const char* fn = "remax_advantages";
  expect_throw<pl::shape_error>(
      [&] {
        pl::remax_advantages(r, vec<double>({1, 2, 3}), m, a, g);
      },
      fn, {"'reward_baselines'", "[3]"});
  expect_throw<pl::shape_error>([&] { pl::remax_advantages(r, vec<double>({1, 2}), bad, a, g); }, fn, {"'mask'"});
  expect_throw<pl::value_error>(
      [&] {
        pl::remax_advantages(r, vec<double>({1, 2}), mneg, a, g);
      },
      fn, {"'mask'", "-0.5"});
  expect_throw<pl::shape_error>(
      [&] {
        pl::remax_advantages(r, vec<double>({1, 2}), m, bad, g);
      },
      fn, {"'advantages_out'"});
  expect_throw<pl::layout_error>([&] { pl::remax_advantages(r, vec<double>({1, 2}), m, g, g); }, fn, {"overlap"});
  CHECK(all_equal(a, -42));
  CHECK(all_equal(g, -42));
}

// ---- TRL GRPO reward scaling ------------------------------------------------------------------------

TEMPLATE_TEST_CASE("grpo_reward_advantages: TRL's scale_rewards and aggregation orders", "[advantages][trl]", float,
                   double) {
  using S = TestType;
  const double e = 1e-4;
  // Two prompts x 4 completions, one reward function: {0, 1, 2, 3} and {10, 10, 10, 10}.
  const auto x = vec<S>({0, 1, 2, 3, 10, 10, 10, 10});
  Vec<S> out(8);
  pl::GrpoRewardOptions o;
  pl::grpo_reward_advantages(x, 4, o, out);
  const double sd = std::sqrt(5.0 / 3);  // unbiased std of {0, 1, 2, 3}
  for (int k = 0; k < 4; ++k) CHECK(out(k) == Approx((k - 1.5) / (sd + e)).epsilon(tol<S>()));
  for (int k = 4; k < 8; ++k) CHECK(out(k) == S(0));
  // batch: around each group's mean, divided by the unbiased std of all eight rewards.
  double mean = 46.0 / 8, ss = 0;
  for (double v : {0, 1, 2, 3, 10, 10, 10, 10}) ss += (v - mean) * (v - mean);
  const double bsd = std::sqrt(ss / 7);
  o.scale_rewards = pl::RewardScaling::batch;
  pl::grpo_reward_advantages(x, 4, o, out);
  for (int k = 0; k < 4; ++k) CHECK(out(k) == Approx((k - 1.5) / (bsd + e)).epsilon(tol<S>()));
  // none: Dr.GRPO's centering, the same as group_advantages without std scaling.
  o.scale_rewards = pl::RewardScaling::none;
  pl::grpo_reward_advantages(x, 4, o, out);
  Vec<S> dr(8);
  pl::GroupOptions go;
  go.scale_by_std = false;
  pl::group_advantages(x, 4, go, dr);
  for (int k = 0; k < 8; ++k) {
    CHECK(out(k) == Approx(k < 4 ? k - 1.5 : 0).margin(tol<S>()));
    CHECK(out(k) == dr(k));
  }

  // Two functions with weights {1, 2}, one prompt of 3: x_.0 = {0, 1, 2}, x_.1 = {1, 1, 4}.
  const auto x2 = tok<S>(3, 2, {0, 1, 1, 1, 2, 4});
  Vec<S> o2(3);
  pl::GrpoRewardOptions w;
  w.reward_weights = {1, 2};
  pl::grpo_reward_advantages(x2, 3, w, o2);
  // sum_then_normalize: R = {2, 3, 10}, mean 5, unbiased std sqrt((9 + 4 + 25) / 2).
  const double sR = std::sqrt(19.0);
  CHECK(o2(0) == Approx(-3 / (sR + e)).epsilon(tol<S>()));
  CHECK(o2(2) == Approx(5 / (sR + e)).epsilon(tol<S>()));
  // normalize_then_sum: z_.0 = {-1, 0, 1} / (1 + e), z_.1 = {-1, -1, 2} / (sqrt(3) + e);
  // R = z_.0 + 2 z_.1, then whitened over the batch (unbiased, + e).
  w.aggregation = pl::RewardAggregation::normalize_then_sum;
  w.scale_rewards = pl::RewardScaling::none;  // not used by normalize_then_sum
  pl::grpo_reward_advantages(x2, 3, w, o2);
  const double a0 = 1 / (1 + e), a1 = 1 / (std::sqrt(3.0) + e);
  const double R[3] = {-a0 - 2 * a1, -2 * a1, a0 + 4 * a1};
  const double Rm = (R[0] + R[1] + R[2]) / 3;
  const double Rs = std::sqrt(((R[0] - Rm) * (R[0] - Rm) + (R[1] - Rm) * (R[1] - Rm) + (R[2] - Rm) * (R[2] - Rm)) / 2);
  for (int k = 0; k < 3; ++k) CHECK(o2(k) == Approx((R[k] - Rm) / (Rs + e)).epsilon(tol<S>()));

  // NaN = not scored: an unscorable completion gets 0 and leaves the group's statistics; a
  // group with a single scorable completion has no std (NaN), so 0 for all of it.
  const auto xn = vec<S>({0, nan_v, 2, 4, nan_v, 5, nan_v, nan_v});
  Vec<S> on(8);
  pl::grpo_reward_advantages(xn, 4, pl::GrpoRewardOptions{}, on);
  const double sdn = 2;  // {0, 2, 4}
  CHECK(on(0) == Approx(-2 / (sdn + e)).epsilon(tol<S>()));
  CHECK(on(1) == S(0));
  CHECK(on(2) == S(0));
  CHECK(on(3) == Approx(2 / (sdn + e)).epsilon(tol<S>()));
  for (int k = 4; k < 8; ++k) CHECK(on(k) == S(0));
  // One generation per prompt (TRL eval): std 0, every advantage (r - r) / eps = 0.
  pl::grpo_reward_advantages(x, 1, pl::GrpoRewardOptions{}, out);
  CHECK(all_equal(out, 0));
  // Batch 1 with batch scaling.
  const auto x1 = vec<S>({3});
  Vec<S> o1(1);
  pl::GrpoRewardOptions ob;
  ob.scale_rewards = pl::RewardScaling::batch;
  pl::grpo_reward_advantages(x1, 1, ob, o1);
  CHECK(o1(0) == S(0));
}

TEST_CASE("grpo_reward_advantages rejects bad input and writes nothing", "[advantages][trl]") {
  const auto x = tok<double>(4, 2, {1, 2, 3, 4, 5, 6, 7, 8});
  const auto xi = tok<double>(4, 2, {1, 2, 3, 4, 5, -inf_v, 7, 8});
  Vec<double> out(4), bad(3);
  out.setConstant(-42);
  const char* fn = "grpo_reward_advantages";
  pl::GrpoRewardOptions o;
  expect_throw<pl::value_error>([&] { pl::grpo_reward_advantages(xi, 2, o, out); }, fn,
                                {"'rewards_per_func'", "-inf", "[2, 1]"});
  expect_throw<pl::shape_error>([&] { pl::grpo_reward_advantages(x, 3, o, out); }, fn,
                                {"'rewards_per_func'", "num_generations 3"});
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 0, o, out); }, fn, {"'num_generations'"});
  expect_throw<pl::shape_error>([&] { pl::grpo_reward_advantages(x, 2, o, bad); }, fn, {"'out'"});
  o.reward_weights = {1, 2, 3};
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 2, o, out); }, fn, {"'reward_weights'", "3"});
  o.reward_weights = {1, nan_v};
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 2, o, out); }, fn, {"'reward_weights'", "nan"});
  o = {};
  o.epsilon = -1;
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 2, o, out); }, fn, {"'epsilon'"});
  o = {};
  o.scale_rewards = static_cast<pl::RewardScaling>(7);
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 2, o, out); }, fn, {"'scale_rewards'", "7"});
  o = {};
  o.aggregation = static_cast<pl::RewardAggregation>(-1);
  expect_throw<pl::option_error>([&] { pl::grpo_reward_advantages(x, 2, o, out); }, fn, {"'aggregation'"});
  CHECK(all_equal(out, -42));
}

// ---- Dr.GRPO (group_advantages without std scaling) ----------------------------------------------

TEMPLATE_TEST_CASE("group_advantages with scale_by_std = false is Dr.GRPO: s - mean per group", "[advantages][grpo]",
                   float, double) {
  using S = TestType;
  const auto s = vec<S>({1, 4, 2, 8, 5});
  Eigen::Tensor<int, 1> ids(5);
  ids.setValues({1, 1, 2, 2, 3});
  Vec<S> out(5);
  pl::GroupOptions o;
  o.scale_by_std = false;
  pl::group_advantages(s, ids, o, out);
  const double want[] = {-1.5, 1.5, -3, 3, 5};  // a group of one: mean 0 (verl)
  for (int k = 0; k < 5; ++k) CHECK(out(k) == S(want[k]));
}

// ---- Llama 2 ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("llama2_safety_reward and logit_whiten by hand", "[rewards][llama2]", float, double) {
  using S = TestType;
  // Low safety on a helpfulness prompt, a safety prompt, a safe helpfulness prompt, and safety
  // exactly at the threshold (not below: helpfulness).
  const auto h = vec<S>({0.9, 0.6, 0.8, 0.3});
  const auto s = vec<S>({0.1, 0.5, 0.7, 0.25});
  Eigen::Tensor<bool, 1> safe(4);
  safe.setValues({false, true, false, false});
  Vec<S> rc(4);
  pl::SafetyRewardOptions o;
  o.threshold = static_cast<double>(S(0.25));
  pl::llama2_safety_reward(h, s, safe, o, rc);
  CHECK(rc(0) == S(0.1));
  CHECK(rc(1) == S(0.5));
  CHECK(rc(2) == S(0.8));
  CHECK(rc(3) == S(0.3));
  pl::llama2_safety_reward(h, s, safe, pl::SafetyRewardOptions{}, rc);  // 0.15: only index 0 gated
  CHECK(rc(0) == S(0.1));
  CHECK(rc(3) == S(0.3));
  // logit {0, log 4, -log 4}: mean 0, unbiased var (log 4)^2.
  const auto r = vec<S>({0.5, 0.8, 0.2});
  Vec<S> wh(3);
  pl::logit_whiten(r, pl::WhitenOptions{}, wh);
  const double l4 = std::log(static_cast<double>(S(0.8)) / (1 - static_cast<double>(S(0.8))));
  const double l2 = std::log(static_cast<double>(S(0.2)) / (1 - static_cast<double>(S(0.2))));
  const double mean = (l4 + l2) / 3;
  const double var = (mean * mean + (l4 - mean) * (l4 - mean) + (l2 - mean) * (l2 - mean)) / 2;
  CHECK(wh(0) == Approx(-mean / std::sqrt(var + 1e-8)).margin(tol<S>()));
  CHECK(wh(1) == Approx((l4 - mean) / std::sqrt(var + 1e-8)).epsilon(tol<S>()));
  // Population variance and a batch of one: 0; keep the mean.
  pl::WhitenOptions pop;
  pop.unbiased = false;
  const auto one = vec<S>({0.8});
  Vec<S> o1(1);
  pl::logit_whiten(one, pop, o1);
  CHECK(o1(0) == S(0));
  pop.shift_mean = false;
  pl::logit_whiten(one, pop, o1);
  CHECK(o1(0) == Approx(l4).epsilon(tol<S>()));
}

TEST_CASE("llama2_safety_reward and logit_whiten reject bad input and write nothing", "[rewards][llama2]") {
  const auto h = vec<double>({0.9, 0.6});
  const auto s = vec<double>({0.5, 0.5});
  Eigen::Tensor<std::uint8_t, 1> safe(2), safe3(3);
  safe.setValues({0, 1});
  safe3.setZero();
  Vec<double> out(2), bad(3);
  out.setConstant(-42);
  const char* fn = "llama2_safety_reward";
  pl::SafetyRewardOptions o;
  // The NaN is in the score the gate would not pick: still rejected.
  expect_throw<pl::value_error>(
      [&] {
        pl::llama2_safety_reward(vec<double>({0.9, nan_v}), s, safe, o, out);
      },
      fn, {"'helpfulness'", "[1]"});
  expect_throw<pl::value_error>(
      [&] {
        pl::llama2_safety_reward(h, vec<double>({inf_v, 0.5}), safe, o, out);
      },
      fn, {"'safety'", "inf", "[0]"});
  expect_throw<pl::shape_error>([&] { pl::llama2_safety_reward(h, vec<double>({0.5}), safe, o, out); }, fn,
                                {"'safety'", "[1]"});
  expect_throw<pl::shape_error>([&] { pl::llama2_safety_reward(h, s, safe3, o, out); }, fn, {"'is_safety_prompt'"});
  expect_throw<pl::shape_error>([&] { pl::llama2_safety_reward(h, s, safe, o, bad); }, fn, {"'out'"});
  o.threshold = nan_v;
  expect_throw<pl::option_error>([&] { pl::llama2_safety_reward(h, s, safe, o, out); }, fn, {"'threshold'"});
  CHECK(all_equal(out, -42));

  const char* lw = "logit_whiten";
  for (const double v : {0.0, 1.0, -0.5, 1.5, nan_v})
    expect_throw<pl::value_error>(
        [&] {
          pl::logit_whiten(vec<double>({0.5, v}), pl::WhitenOptions{}, out);
        },
        lw, {"'rewards'", "(0, 1)", "[1]"});
  Vec<double> o1(1), e0(0);
  o1.setConstant(-42);
  expect_throw<pl::error>([&] { pl::logit_whiten(vec<double>({0.5}), pl::WhitenOptions{}, o1); }, lw,
                          {"'rewards'", "at least 2"});
  pl::WhitenOptions pop;
  pop.unbiased = false;
  expect_throw<pl::error>([&] { pl::logit_whiten(e0, pop, e0); }, lw, {"'rewards'", "empty"});
  pl::WhitenOptions we;
  we.eps = -1;
  expect_throw<pl::option_error>([&] { pl::logit_whiten(vec<double>({0.5, 0.6}), we, out); }, lw, {"'eps'"});
  expect_throw<pl::shape_error>(
      [&] {
        pl::logit_whiten(vec<double>({0.5, 0.6}), pl::WhitenOptions{}, bad);
      },
      lw, {"'out'"});
  CHECK(all_equal(out, -42));
  CHECK(all_equal(o1, -42));
}

// ---- best-of-n --------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("best_of_n: highest reward per prompt, ties to the lowest index", "[rewards][best_of_n]", float,
                   double) {
  using S = TestType;
  const auto r = vec<S>({0.5, 2, 2, -1, -inf_v, -inf_v, -inf_v, -inf_v, 1, 3, inf_v, 3});
  Eigen::Tensor<std::int64_t, 1> best(3);
  pl::best_of_n(r, 4, best);
  CHECK(best(0) == 1);   // tie between 1 and 2
  CHECK(best(1) == 4);   // all -inf: the first
  CHECK(best(2) == 10);  // +inf
  Eigen::Tensor<std::int32_t, 1> all(12);
  pl::best_of_n(r, 1, all);  // groups of one: each its own pick
  for (int k = 0; k < 12; ++k) CHECK(all(k) == k);
  // ids: groups in ascending id order; 9 -> {0, 3, 5}, 2 -> {1, 4}, 4 -> {2}.
  const auto ri = vec<S>({1, 5, 0, 7, 5, 7});
  Eigen::Tensor<int, 1> ids(6);
  ids.setValues({9, 2, 4, 9, 2, 9});
  Eigen::Tensor<std::int16_t, 1> bi(3);
  pl::best_of_n(ri, ids, bi);
  CHECK(bi(0) == 1);  // id 2: tie 1 vs 4
  CHECK(bi(1) == 2);  // id 4
  CHECK(bi(2) == 3);  // id 9: tie 3 vs 5
  // Batch 1 and an empty batch.
  Eigen::Tensor<long, 1> b1(1), b0(0);
  pl::best_of_n(vec<S>({-3}), 1, b1);
  CHECK(b1(0) == 0);
  Vec<S> e(0);
  pl::best_of_n(e, 5, b0);
}

TEST_CASE("best_of_n rejects bad input and writes nothing", "[rewards][best_of_n]") {
  const auto r = vec<double>({1, 2, nan_v, 4});
  Eigen::Tensor<long, 1> out(2), bad(3);
  out.setConstant(-42);
  Eigen::Tensor<int, 1> ids(4), ids3(3);
  ids.setValues({0, 1, 0, 1});
  ids3.setZero();
  const char* fn = "best_of_n";
  expect_throw<pl::value_error>([&] { pl::best_of_n(r, 2, out); }, fn, {"'rewards'", "NaN", "[2]"});
  expect_throw<pl::value_error>([&] { pl::best_of_n(r, ids, out); }, fn, {"'rewards'", "[2]"});
  const auto ok = vec<double>({1, 2, 3, 4});
  expect_throw<pl::shape_error>([&] { pl::best_of_n(ok, 3, out); }, fn, {"'rewards'", "3"});
  expect_throw<pl::option_error>([&] { pl::best_of_n(ok, 0, out); }, fn, {"'group_size'"});
  expect_throw<pl::shape_error>([&] { pl::best_of_n(ok, 2, bad); }, fn, {"'out'", "[2]", "[3]"});
  expect_throw<pl::shape_error>([&] { pl::best_of_n(ok, ids3, out); }, fn, {"'group_ids'"});
  Eigen::Tensor<long, 1> one(1);
  one.setConstant(-42);
  expect_throw<pl::shape_error>([&] { pl::best_of_n(ok, ids, one); }, fn, {"'out'", "[2]"});
  Vec<double> big(300);
  big.setZero();
  Eigen::Tensor<std::int8_t, 1> narrow(1);
  narrow.setConstant(-42);
  expect_throw<pl::shape_error>([&] { pl::best_of_n(big, 300, narrow); }, fn, {"'rewards'", "[300]"});
  CHECK(all_equal(out, -42));
  CHECK(all_equal(one, -42));
  CHECK(all_equal(narrow, -42));
}

// ---- reward clipping --------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("clip_rewards: OpenRLHF's clamp to [-10, 10] and other ranges", "[rewards][clip]", float, double) {
  using S = TestType;
  const auto r = vec<S>({-20, -10, -0.5, 0, 9.75, 10, 20, inf_v, -inf_v});
  Vec<S> out(9);
  pl::clip_rewards(r, pl::RewardClipOptions{}, out);
  const double want[] = {-10, -10, -0.5, 0, 9.75, 10, 10, 10, -10};
  for (int k = 0; k < 9; ++k) CHECK(out(k) == S(want[k]));
  pl::RewardClipOptions lower;
  lower.min = 0;
  lower.max = inf_v;  // a lower clip only
  Vec<S> in = r;
  pl::clip_rewards(in, lower, in);  // in place
  CHECK(in(0) == S(0));
  CHECK(in(6) == S(20));
  CHECK(std::isinf(in(7)));
  pl::RewardClipOptions point;
  point.min = point.max = 0.25;
  pl::clip_rewards(r, point, out);
  CHECK(all_equal(out, 0.25));
  Vec<S> e(0);
  pl::clip_rewards(e, pl::RewardClipOptions{}, e);
}

TEST_CASE("clip_rewards rejects bad input and writes nothing", "[rewards][clip]") {
  const auto r = vec<double>({1, 2});
  Vec<double> out(2), bad(1);
  out.setConstant(-42);
  const char* fn = "clip_rewards";
  expect_throw<pl::value_error>(
      [&] {
        pl::clip_rewards(vec<double>({1, nan_v}), pl::RewardClipOptions{}, out);
      },
      fn, {"'rewards'", "NaN", "[1]"});
  expect_throw<pl::shape_error>([&] { pl::clip_rewards(r, pl::RewardClipOptions{}, bad); }, fn, {"'out'"});
  pl::RewardClipOptions o;
  o.min = 3;
  o.max = 2;
  expect_throw<pl::option_error>([&] { pl::clip_rewards(r, o, out); }, fn, {"'min'", "3", "2"});
  o.min = nan_v;
  expect_throw<pl::option_error>([&] { pl::clip_rewards(r, o, out); }, fn, {"'min'"});
  o.min = 0;
  o.max = nan_v;
  expect_throw<pl::option_error>([&] { pl::clip_rewards(r, o, out); }, fn, {"'max'"});
  CHECK(all_equal(out, -42));
}

// ---- KL controllers ---------------------------------------------------------------------------------

TEST_CASE("FixedKLController and AdaptiveKLController follow verl's update", "[kl_controller]") {
  pl::FixedKLController f(0.2);
  f.update(5.0, 1000);
  CHECK(f.value() == 0.2);
  CHECK(pl::FixedKLController{}.value() == 0.001);

  pl::AdaptiveKLController a(0.1, 0.1, 100);
  a.update(0.2, 10);  // error 1, clipped to 0.2: value *= 1 + 0.2 * 10 / 100
  CHECK(a.value() == Approx(0.1 * 1.02).epsilon(1e-15));
  a.update(0.09, 50);  // error -0.1: value *= 1 - 0.05
  CHECK(a.value() == Approx(0.1 * 1.02 * 0.95).epsilon(1e-15));
  a.update(-1.0, 100);  // error -11, clipped to -0.2
  CHECK(a.value() == Approx(0.1 * 1.02 * 0.95 * 0.8).epsilon(1e-15));
  a.update(0.1, 100);  // on target: unchanged
  CHECK(a.value() == Approx(0.1 * 1.02 * 0.95 * 0.8).epsilon(1e-15));
  a.update(0.5, 0);  // no steps: unchanged
  CHECK(a.value() == Approx(0.1 * 1.02 * 0.95 * 0.8).epsilon(1e-15));
  // As in verl, nothing bounds the factor: n_steps = 10 horizon below target flips the sign.
  pl::AdaptiveKLController flip(0.5, 0.1, 10);
  flip.update(0.0, 100);
  CHECK(flip.value() == Approx(-0.5).epsilon(1e-15));
  const pl::AdaptiveKLController d;
  CHECK(d.value() == 0.001);
  CHECK(d.target() == 0.1);
  CHECK(d.horizon() == 10000);
}

TEST_CASE("KL controllers reject bad input and keep their value", "[kl_controller]") {
  expect_throw<pl::option_error>([] { pl::FixedKLController f(-0.1); }, "FixedKLController", {"'kl_coef'", "-0.1"});
  expect_throw<pl::option_error>([] { pl::FixedKLController f(inf_v); }, "FixedKLController", {"'kl_coef'"});
  const char* fn = "AdaptiveKLController";
  expect_throw<pl::option_error>([] { pl::AdaptiveKLController a(nan_v, 0.1, 10); }, fn, {"'init_kl_coef'"});
  expect_throw<pl::option_error>([] { pl::AdaptiveKLController a(0.1, 0, 10); }, fn, {"'target_kl'", "0"});
  expect_throw<pl::option_error>([] { pl::AdaptiveKLController a(0.1, 0.1, 0); }, fn, {"'horizon'"});
  expect_throw<pl::option_error>([] { pl::AdaptiveKLController a(0.1, 0.1, -5); }, fn, {"'horizon'", "-5"});
  pl::AdaptiveKLController a(0.1, 0.1, 10);
  expect_throw<pl::option_error>([&] { a.update(nan_v, 1); }, "AdaptiveKLController::update", {"'current_kl'"});
  expect_throw<pl::option_error>([&] { a.update(0.2, -1); }, "AdaptiveKLController::update", {"'n_steps'", "-1"});
  CHECK(a.value() == 0.1);
}
