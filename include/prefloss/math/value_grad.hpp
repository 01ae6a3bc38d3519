/// @file math/value_grad.hpp
/// The value-and-derivative pair the fused math forms return (log_sigmoid_and_grad,
/// sigmoid_and_grad, log1mexp_and_grad), for a scalar or an xsimd batch.
#pragma once

namespace prefloss {

/// f(x) and f'(x), computed together (they share an exp).
template <class T>
struct ValueGrad {
  T value;  ///< f(x)
  T grad;   ///< f'(x)
};

}  // namespace prefloss
