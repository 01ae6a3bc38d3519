// Optimizers for the examples' parameter tables.
#pragma once
#include <prefloss/prefloss.hpp>

#include <cmath>
#include <vector>

namespace examples {

/// Adam (Kingma & Ba) with optional decoupled weight decay (AdamW).
class Adam {
 public:
  explicit Adam(double lr, double weight_decay = 0.0, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : lr_(lr), wd_(weight_decay), b1_(beta1), b2_(beta2), eps_(eps) {}

  /// One step; grad is float, or double when it was kept unrounded.
  template <class G>
  void step(std::vector<float>& params, const std::vector<G>& grad) {
    if (m_.size() != params.size()) {
      m_.assign(params.size(), 0.0);
      v_.assign(params.size(), 0.0);
    }
    ++t_;
    const double c1 = 1.0 - std::pow(b1_, static_cast<double>(t_));
    const double c2 = 1.0 - std::pow(b2_, static_cast<double>(t_));
    for (std::size_t k = 0; k < params.size(); ++k) {
      const double g = static_cast<double>(grad[k]);
      m_[k] = b1_ * m_[k] + (1 - b1_) * g;
      v_[k] = b2_ * v_[k] + (1 - b2_) * g * g;
      const double update = (m_[k] / c1) / (std::sqrt(v_[k] / c2) + eps_) + wd_ * params[k];
      params[k] = static_cast<float>(params[k] - lr_ * update);
    }
  }

 private:
  double lr_, wd_, b1_, b2_, eps_;
  long t_ = 0;
  std::vector<double> m_, v_;
};

/// Plain stochastic gradient descent.
struct Sgd {
  double lr;
  void step(std::vector<float>& params, const std::vector<float>& grad) const {
    for (std::size_t k = 0; k < params.size(); ++k) params[k] = static_cast<float>(params[k] - lr * grad[k]);
  }
};

}  // namespace examples
