// Token inputs of one call may mix float, Eigen::bfloat16 and Eigen::half (computed in float),
// never double with another type: a double call is meant to be computed in double. Built once
// as is (must compile: bf16 log-probs with float advantages, a bf16 kl_estimate into float) and
// once with each PREFLOSS_MISUSE (must fail with the static_assert naming the rule).
#include <cstdint>
#include <prefloss/prefloss.hpp>

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

int main() {
  Tok<Eigen::bfloat16> lp(2, 3), g(2, 3);
  Tok<float> adv(2, 3), out(2, 3);
  Tok<double> old(2, 3);
  Tok<std::uint8_t> m(2, 3);
  lp.setConstant(Eigen::bfloat16(-1.f));
  adv.setConstant(1.f);
  old.setConstant(-1.0);
  m.setConstant(1);
  const auto r = pl::ppo_clip(lp, lp, adv, m, pl::PpoOptions{}, g);
  pl::kl_estimate(lp, lp, m, pl::KlEstimator::k1, out);
#if defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 1
  const auto bad = pl::ppo_clip(lp, old, adv, m);
#elif defined(PREFLOSS_MISUSE) && PREFLOSS_MISUSE == 2
  pl::kl_estimate(lp, old, m, pl::KlEstimator::k1, out);
#endif
  return r.loss < 0 ? 0 : 1;
}
