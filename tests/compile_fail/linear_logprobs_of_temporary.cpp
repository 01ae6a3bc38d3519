// linear_logprobs over a temporary Eigen::Tensor (hidden, weight, labels or mask) would hold a
// view of storage that dies at the end of the statement, which backward() reads again: it must
// not compile. Built once as is (must compile: named tensors and temporary TensorMaps are fine)
// and once per PREFLOSS_MISUSE (must fail with a deleted-function error).
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;
using Rows = Eigen::Tensor<float, 2, Eigen::RowMajor>;
using Mask = Eigen::Tensor<std::uint8_t, 1>;

Rows weight() { return Rows(3, 4).setConstant(0.5f); }
Mask mask() { return Mask(2).setConstant(1); }

int main() {
  Rows h(2, 4), w = weight();
  h.setConstant(0.25f);
  Mask m = mask();
  Eigen::Tensor<std::int32_t, 1> y(2);
  y.setZero();
  const auto a = pl::linear_logprobs(h, w, y, m);
  const auto b = pl::linear_logprobs(h, Eigen::TensorMap<Rows>(w.data(), 3, 4), y, m);
#if defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 1
  const auto bad = pl::linear_logprobs(h, weight(), y, m);
#elif defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 2
  const auto bad = pl::linear_logprobs(h, w, y, mask());
#endif
  return a.logp(0) + b.logp(1) < 0 ? 0 : 1;
}
