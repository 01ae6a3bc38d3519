// token_logprobs over a temporary Eigen::Tensor (logits, labels or mask) would hold a view of
// storage that dies at the end of the statement, which backward() reads again: it must not
// compile. Built once as is (must compile: named tensors and temporary TensorMaps are fine) and
// once per PREFLOSS_MISUSE (must fail with a deleted-function error).
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;
using Logits = Eigen::Tensor<float, 3, Eigen::RowMajor>;
using Mask = Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>;

Logits logits() { return Logits(1, 2, 3).setConstant(0.5f); }
Mask mask() { return Mask(1, 2).setConstant(1); }

int main() {
  Logits z = logits();
  Mask m = mask();
  Eigen::Tensor<std::int32_t, 2, Eigen::RowMajor> y(1, 2);
  y.setZero();
  const auto a = pl::token_logprobs(z, y, m);
  const auto b = pl::token_logprobs(Eigen::TensorMap<Logits>(z.data(), 1, 2, 3), y, m);
#if defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 1
  const auto bad = pl::token_logprobs(logits(), y, m);
#elif defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 2
  const auto bad = pl::token_logprobs(z, y, mask());
#endif
  return a.logp(0, 0) + b.logp(0, 1) < 0 ? 0 : 1;
}
