// Smallest real use of an installed / vendored prefloss: a masked sum (also on a two-thread
// pool, which needs the package's Threads dependency) and a logsigmoid.
#include <prefloss/prefloss.hpp>
#include <prefloss/thread_pool.hpp>

#include <cmath>
#include <cstdio>

int main() {
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 3);
  Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor> m(2, 3);
  x.setValues({{-1.f, -2.f, NAN}, {-0.5f, -0.5f, -0.5f}});
  m.setValues({{1, 1, 0}, {1, 1, 1}});
  const auto s = prefloss::masked_sum(x, m).eval();
  prefloss::ThreadPool pool(2);
  const auto p = prefloss::masked_sum(x, m).eval(pool);
  const float ls = prefloss::log_sigmoid(0.f);
  const bool ok =
      s(0) == -3.f && s(1) == -1.5f && p(0) == s(0) && p(1) == s(1) && std::fabs(ls + std::log(2.f)) < 1e-7f;
  std::printf("consumer: masked_sum = [%g, %g], log_sigmoid(0) = %g -> %s\n", s(0), s(1), ls, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
