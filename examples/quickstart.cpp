// quickstart — the README's DPO snippet and one ppo_clip call on tensors small enough to check
// by hand, every number printed next to the same number computed here from the formula in
// double. It exits non-zero if any pair differs by more than float rounding.
//
//   DPO (Rafailov et al. 2023): u_i = beta [(s_c - ref_c) - (s_r - ref_r)], s = sum of the
//     valid token log-probs, loss_i = -log sigmoid(u_i), loss = mean_i loss_i; the gradient at
//     every valid chosen token is -beta sigmoid(-u_i) / B, at every rejected token the opposite,
//     and 0 at padding (which may hold anything, NaN included).
//   PPO-clip (Schulman et al. 2017, eq. 7): rho = exp(logp - old_logp),
//     l = -min(rho A, clip(rho, 1 - 0.2, 1 + 0.2) A) per valid token, loss = mean over valid
//     tokens; d l / d logp = -rho A where the unclipped branch is the minimum, 0 where the clip
//     bites.
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

namespace {

namespace pl = prefloss;
using Tokens = Eigen::Tensor<float, 2, Eigen::RowMajor>;
using Mask = Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>;

int failures = 0;

/// Prints a library value beside its hand computation and counts a disagreement.
void show(const char* what, double library, double by_hand) {
  const bool ok = std::abs(library - by_hand) <= 1e-6 * std::max(1.0, std::abs(by_hand));
  failures += ok ? 0 : 1;
  std::printf("  %-34s %12.7f   by hand %12.7f%s\n", what, library, by_hand, ok ? "" : "   <-- MISMATCH");
}

double log_sigmoid(double x) { return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x)); }
double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

}  // namespace

int main() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  constexpr int B = 2, T = 4;

  // ---- DPO: the README's snippet -------------------------------------------------------------
  Tokens logp_c(B, T), logp_r(B, T);  // policy token log-probs; padding holds NaN on purpose
  Mask mask_c(B, T), mask_r(B, T);    // 1 = completion token
  Eigen::Tensor<float, 1> ref_c(B), ref_r(B);
  logp_c.setValues({{-0.5f, -1.0f, -0.25f, nan}, {-2.0f, -0.1f, -0.3f, -0.7f}});
  mask_c.setValues({{1, 1, 1, 0}, {1, 1, 1, 1}});
  logp_r.setValues({{-1.5f, -0.75f, nan, nan}, {-0.2f, -1.1f, -0.4f, nan}});
  mask_r.setValues({{1, 1, 0, 0}, {1, 1, 1, 0}});
  ref_c.setValues({-2.0f, -3.5f});
  ref_r.setValues({-2.0f, -1.5f});

  pl::DpoOptions opt;
  opt.beta = 0.1;
  auto r = pl::dpo(pl::masked_sum(logp_c, mask_c), pl::masked_sum(logp_r, mask_r), ref_c, ref_r, opt);
  Tokens g_c(B, T), g_r(B, T);
  r.backward(g_c, g_r);  // d loss / d logp; 0 at masked-out tokens

  // The same numbers from the formula, in double.
  const double s_c[B] = {-0.5 - 1.0 - 0.25, -2.0 - 0.1 - 0.3 - 0.7}, s_r[B] = {-1.5 - 0.75, -0.2 - 1.1 - 0.4};
  double u[B], loss = 0, margin = 0, chosen = 0, rejected = 0, accuracy = 0;
  for (int i = 0; i < B; ++i) {
    const double rc = opt.beta * (s_c[i] - ref_c(i)), rr = opt.beta * (s_r[i] - ref_r(i));
    u[i] = rc - rr;
    loss += -log_sigmoid(u[i]) / B;
    chosen += rc / B, rejected += rr / B, margin += u[i] / B, accuracy += (rc > rr ? 1.0 : 0.0) / B;
  }
  std::printf("DPO, beta = %g, B = %d pairs of up to %d tokens\n", opt.beta, B, T);
  for (int i = 0; i < B; ++i) {
    std::printf(" pair %d: s_c = %g, s_r = %g, ref_c = %g, ref_r = %g, u = %.7f\n", i, s_c[i], s_r[i], ref_c(i),
                ref_r(i), u[i]);
    show(("losses[" + std::to_string(i) + "] = -log sigmoid(u)").c_str(), r.losses(i), -log_sigmoid(u[i]));
  }
  show("loss (batch mean)", r.loss, loss);
  show("metrics.reward_chosen", r.metrics.reward_chosen, chosen);
  show("metrics.reward_rejected", r.metrics.reward_rejected, rejected);
  show("metrics.reward_margin", r.metrics.reward_margin, margin);
  show("metrics.reward_accuracy", r.metrics.reward_accuracy, accuracy);
  for (int i = 0; i < B; ++i)
    for (int t = 0; t < T; ++t) {
      const double g = -opt.beta * sigmoid(-u[i]) / B;  // d loss / d s_c; d / d s_r is its negative
      show(("g_c[" + std::to_string(i) + "][" + std::to_string(t) + "]").c_str(), g_c(i, t), mask_c(i, t) ? g : 0.0);
      show(("g_r[" + std::to_string(i) + "][" + std::to_string(t) + "]").c_str(), g_r(i, t), mask_r(i, t) ? -g : 0.0);
    }

  // ---- PPO-clip on three tokens of two responses -----------------------------------------------
  Tokens logp(B, 3), old_logp(B, 3), adv(B, 3), grad(B, 3);
  Mask mask(B, 3);
  logp.setValues({{-0.9f, -1.2f, -0.3f}, {-2.0f, -0.5f, nan}});
  old_logp.setValues({{-1.0f, -1.0f, -0.6f}, {-1.5f, -0.5f, nan}});
  adv.setValues({{1.0f, 1.0f, 1.0f}, {-0.5f, -0.5f, nan}});
  mask.setValues({{1, 1, 1}, {1, 1, 0}});
  pl::PpoOptions popt;                                           // clip_low = clip_high = 0.2, token_mean
  auto p = pl::ppo_clip(logp, old_logp, adv, mask, popt, grad);  // loss and d loss / d logp in one pass

  std::printf("\nPPO-clip, eps = 0.2, token mean over %d valid tokens\n", 5);
  double ploss = 0, clipped = 0, approx_kl = 0;
  for (int i = 0; i < B; ++i)
    for (int t = 0; t < 3; ++t) {
      if (!mask(i, t)) {
        show(("grad[" + std::to_string(i) + "][" + std::to_string(t) + "] (padding)").c_str(), grad(i, t), 0.0);
        continue;
      }
      const double rho = std::exp(double(logp(i, t)) - double(old_logp(i, t))), a = adv(i, t);
      const double unclipped = rho * a, clip = std::clamp(rho, 0.8, 1.2) * a;
      const bool bites = clip < unclipped;  // the min picks the clipped branch: no gradient through rho
      ploss += -std::min(unclipped, clip) / 5;
      clipped += bites ? 1.0 / 5 : 0.0;
      approx_kl += (double(old_logp(i, t)) - double(logp(i, t))) / 5;
      std::printf(" token [%d][%d]: rho = %.7f, A = %g, %s\n", i, t, rho, a, bites ? "clipped" : "not clipped");
      show(("grad[" + std::to_string(i) + "][" + std::to_string(t) + "]").c_str(), grad(i, t),
           bites ? 0.0 : -rho * a / 5);
    }
  show("loss", p.loss, ploss);
  show("metrics.clip_fraction", p.metrics.clip_fraction, clipped);
  show("metrics.approx_kl (mean old - new)", p.metrics.approx_kl, approx_kl);

  // ---- why the log-sigmoid is computed the way it is ---------------------------------------------
  std::printf("\n%8s %14s %14s\n", "x", "log_sigmoid", "naive log(1/(1+e^-x))");
  for (float x : {-120.f, -30.f, -1.f, 0.f, 1.f, 30.f, 100.f})
    std::printf("%8g %14.6g %14.6g\n", x, pl::log_sigmoid(x), std::log(1.f / (1.f + std::exp(-x))));

  std::printf("\nquickstart: %s\n", failures == 0 ? "every number agrees with the hand computation"
                                                  : "some numbers DISAGREE with the hand computation");
  return failures == 0 ? 0 : 1;
}
