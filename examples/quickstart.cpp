// The smallest tour of prefloss: masked sequence sums over padded token log-probs and the
// stable logsigmoid, the two pieces every preference loss is built from.
#include <prefloss/prefloss.hpp>

#include <cmath>
#include <cstdio>
#include <limits>

int main() {
  namespace pl = prefloss;
  Eigen::Tensor<float, 2, Eigen::RowMajor> logp(2, 6);
  Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> mask(2, 6);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  logp.setValues({{-0.5f, -1.0f, -0.25f, nan, nan, nan}, {-2.0f, -0.1f, -0.3f, -0.7f, -0.2f, -0.05f}});
  mask.setValues({{1, 1, 1, 0, 0, 0}, {1, 1, 1, 1, 1, 1}});
  const auto seq = pl::masked_sum(logp, mask).eval();
  const auto avg = pl::masked_mean(logp, mask).eval();
  std::printf("sequence log-probs (NaN padding ignored): sum = [%g, %g], mean = [%g, %g]\n", seq(0), seq(1), avg(0),
              avg(1));
  std::printf("%8s %14s %14s %14s\n", "x", "log_sigmoid", "naive", "softplus");
  for (float x : {-120.f, -30.f, -1.f, 0.f, 1.f, 20.f, 30.f, 80.f, 100.f}) {
    const float naive = std::log(1.f / (1.f + std::exp(-x)));
    std::printf("%8g %14.6g %14.6g %14.6g\n", x, pl::log_sigmoid(x), naive, pl::softplus(x));
  }
}
