// A masked_sum / masked_mean over a temporary Eigen::Tensor would view storage that dies at the
// end of the statement: it must not compile. Built once as is (must compile: the same calls over
// lvalues and a temporary TensorMap are fine) and once with PREFLOSS_MISUSE (must fail with a
// deleted-function error).
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;
using Tok = Eigen::Tensor<float, 2, Eigen::RowMajor>;
using Mask = Eigen::Tensor<std::uint8_t, 2, Eigen::RowMajor>;

Tok tokens() { return Tok(2, 3).setConstant(-1.f); }
Mask mask() { return Mask(2, 3).setConstant(1); }

int main() {
  Tok x = tokens();
  Mask m = mask();
  const auto a = pl::masked_sum(x, m);
  const auto b = pl::masked_mean(Eigen::TensorMap<Tok>(x.data(), 2, 3), m);
#if defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 1
  const auto bad = pl::masked_sum(tokens(), m);
#elif defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 2
  const auto bad = pl::masked_mean(x, mask());
#endif
  return a.eval()(0) + b.eval()(0) < 0 ? 0 : 1;
}
