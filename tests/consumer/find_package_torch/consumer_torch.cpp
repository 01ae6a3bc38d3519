// An installed prefloss::torch found through find_package(prefloss COMPONENTS torch): one DPO
// step through the adapter, its gradient against the closed form of one pair.
#include <cmath>
#include <cstdio>
#include <prefloss/torch.hpp>

int main() {
  namespace pt = prefloss::torch;
  at::Tensor c = at::full({1}, -1.0, at::kDouble).set_requires_grad(true);
  at::Tensor r = at::full({1}, -2.0, at::kDouble).set_requires_grad(true);
  const at::Tensor ref = at::zeros({1}, at::kDouble);
  prefloss::DpoOptions opt;
  opt.beta = 0.5;
  auto res = pt::dpo(c, r, ref, ref, opt);
  res.loss.backward();
  // loss = -logsig(b (c - r)); d loss / d c = -b sig(-b (c - r))
  const double want = -0.5 / (1 + std::exp(0.5));
  const double got = c.grad().item<double>();
  std::printf("d loss / d chosen = %.17g (closed form %.17g)\n", got, want);
  return std::abs(got - want) <= 1e-15 ? 0 : 1;
}
