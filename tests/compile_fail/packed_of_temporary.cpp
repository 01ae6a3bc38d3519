// pl::packed over a temporary Eigen::Tensor (values or cu_seqlens) would view storage that dies
// at the end of the statement: it must not compile. Built once as is (must compile: named
// tensors and temporary TensorMaps are fine) and once per PREFLOSS_MISUSE (must fail with a
// deleted-function error).
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;
using Flat = Eigen::Tensor<float, 1>;
using Cu = Eigen::Tensor<std::int32_t, 1>;

Flat tokens() { return Flat(3).setConstant(-1.f); }
Cu offsets() {
  Cu c(2);
  c.setValues({0, 3});
  return c;
}

int main() {
  Flat x = tokens();
  Cu cu = offsets();
  Eigen::Tensor<std::uint8_t, 1> m(3);
  m.setConstant(1);
  const auto a = pl::masked_sum(pl::packed(x, cu), pl::packed(m, cu));
  const auto b = pl::masked_mean(pl::packed(Eigen::TensorMap<Flat>(x.data(), 3), cu), pl::packed(m, cu));
#if defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 1
  const auto bad = pl::packed(tokens(), cu);
#elif defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 2
  const auto bad = pl::packed(x, offsets());
#endif
  return a.eval()(0) + b.eval()(0) < 0 ? 0 : 1;
}
