// Eigen first, prefloss second: GCC 12 must not warn about its AVX-512 intrinsics (bug 105593)
// inlined into prefloss's kernels whichever header pulled them in. This file only compiles
// under -Werror when that holds; its checks are closed forms of what it instantiates.
#include <unsupported/Eigen/CXX11/Tensor>
// (the order above is the point of this file)
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;

TEST_CASE("prefloss after Eigen: the kernels build warning-free and compute", "[include]") {
  const long B = 3, T = 37;
  Eigen::Tensor<float, 2, Eigen::RowMajor> lp(B, T), g(B, T), g2(B, T);
  lp.setConstant(-0.5f);
  Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> m(B, T);
  m.setConstant(1);
  Eigen::Tensor<float, 1> ref(B);
  ref.setZero();
  // masked_sum = -0.5 T on both sides: D = 0, loss log 2, d loss / d logp = -+ beta/2 / B.
  const auto d = pl::dpo(pl::masked_sum(lp, m), pl::masked_sum(lp, m), ref, ref);
  d.backward(g, g2);
  CHECK(d.loss == Approx(std::log(2.0)).epsilon(1e-6));
  CHECK(g(1, 5) == Approx(-0.05 / B).epsilon(1e-6));
  CHECK(g2(2, 36) == Approx(0.05 / B).epsilon(1e-6));
  // ratio 1 everywhere, A = 1: token_mean loss -1, gradient -1 / (B T).
  Eigen::Tensor<float, 2, Eigen::RowMajor> adv(B, T);
  adv.setConstant(1.f);
  const auto p = pl::ppo_clip(lp, lp, adv, m, lp, pl::PpoOptions{}, g);
  CHECK(p.loss == Approx(-1.0).epsilon(1e-6));
  CHECK(g(0, 0) == Approx(-1.0 / (B * T)).epsilon(1e-6));
  // The other policy losses at ratio 1, A = 1: sapo -(4 / tau) sigmoid(0) = -2 (tau_pos = 1),
  // gradient -4 s (1 - s) r = -1 a token; cispo and gpg -logp = 0.5, gradient -1 a token.
  pl::SapoOptions so;
  so.aggregation = pl::Aggregation::token_mean;
  CHECK(pl::sapo(lp, lp, adv, m, so, g).loss == Approx(-2.0).epsilon(1e-6));
  CHECK(g(1, 7) == Approx(-1.0 / (B * T)).epsilon(1e-6));
  CHECK(pl::cispo(lp, lp, adv, m, pl::CispoOptions{}, g).loss == Approx(0.5).epsilon(1e-6));
  CHECK(g(2, 36) == Approx(-1.0 / (B * T)).epsilon(1e-6));
  CHECK(pl::gpg(lp, lp, adv, m, pl::GpgOptions{}, g).loss == Approx(0.5).epsilon(1e-6));
  CHECK(g(0, 1) == Approx(-1.0 / (B * T)).epsilon(1e-6));
  pl::kl_estimate(lp, lp, m, pl::KlOptions{}, g);
  CHECK(g(2, 3) == 0.f);
  float x[40] = {}, y[40] = {};
  pl::log_sigmoid(x, y, 40);
  CHECK(y[39] == Approx(-std::log(2.0)).epsilon(1e-6));
}
