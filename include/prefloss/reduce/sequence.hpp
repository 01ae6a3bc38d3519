/// @file reduce/sequence.hpp
/// What a loss accepts as a "sequence value": a masked reduction expression, or a plain rank-1
/// [batch] tensor. as_sequence() turns either into an object with one interface (size, eval_to,
/// grad_view, backward_to) so a loss is written once for both.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../detail/tensor.hpp"
#include "../errors.hpp"
#include "../parallel.hpp"
#include "masked.hpp"

namespace prefloss {

/// @brief A plain [batch] tensor used as a sequence value; its gradient is a [batch] tensor.
/// Holds a view: the tensor must outlive any result built from it.
template <class S>
class PlainSequence {
  static_assert(detail::is_real_v<S>, "prefloss: sequence values must be float or double");

 public:
  using Scalar = S;
  explicit PlainSequence(detail::Vector<S> v) : v_(v) {}

  Index size() const noexcept { return v_.size; }
  std::string shape() const { return detail::shape_str(v_.size); }
  double value(Index i) const noexcept { return v_.data[i]; }
  /// A plain value is never an empty sequence.
  bool empty(Index) const noexcept { return false; }
  void eval_to(S* out) const noexcept { std::copy(v_.data, v_.data + v_.size, out); }

  template <class G>
  S* grad_view(G&& grad, const char* fn, const char* name) const {
    static_assert(std::is_same_v<detail::tensor_scalar_t<G>, S>,
                  "prefloss: gradient tensor must have the sequence tensor's scalar type");
    return detail::vector_out(std::forward<G>(grad), v_.size, fn, name);
  }
  /// A copy of the upstream: nothing for threads to split.
  void backward_to(const S* upstream, S* grad, const Threads& = {}) const noexcept {
    std::copy(upstream, upstream + v_.size, grad);
  }
  /// The [batch] values this sequence views (for the fused losses' aliasing checks).
  const detail::Vector<S>& view() const noexcept { return v_; }

 private:
  detail::Vector<S> v_;
};

namespace detail {
template <class T>
struct is_masked_reduction : std::false_type {};
template <class S, class M, Reduction R>
struct is_masked_reduction<MaskedReduction<S, M, R>> : std::true_type {};
template <class S>
struct is_masked_reduction<PlainSequence<S>> : std::true_type {};
}  // namespace detail

/// @brief Wraps a loss's sequence argument: expressions pass through, rank-1 tensors become
/// PlainSequence views. fn and name label a rejected tensor (layout_error when its data is not
/// aligned to its element type).
template <class T>
auto as_sequence(const T& x, const char* fn = "as_sequence", const char* name = "x") {
  if constexpr (detail::is_masked_reduction<detail::remove_cvref_t<T>>::value) {
    return x;
  } else {
    return PlainSequence<detail::tensor_scalar_t<T>>(detail::vector_view(x, fn, name));
  }
}

template <class T>
using sequence_t = decltype(as_sequence(std::declval<const T&>()));

}  // namespace prefloss
