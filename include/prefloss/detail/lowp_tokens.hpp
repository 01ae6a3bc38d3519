/// @file detail/lowp_tokens.hpp
/// Token-loss inputs with 16-bit storage (Eigen::bfloat16 / Eigen::half, mixed with float if
/// the caller likes): the inputs type the token-loss drivers (detail/token_kernels.hpp) run on
/// when any input of a call is 16-bit. Each row is converted in chunks into float stack buffers
/// and run through the float token kernel (see detail/lowp.hpp for why).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "lowp.hpp"
#include "tensor.hpp"
#include "token_kernels.hpp"

PREFLOSS_KERNELS_BEGIN
namespace prefloss::detail {

/// Storage type of one token input, known per call (a mixed call decides it per input).
enum class TokenStorage : std::uint8_t { f32, bf16, f16 };

template <class T>
inline constexpr TokenStorage storage_of = std::is_same_v<T, Eigen::bfloat16> ? TokenStorage::bf16
                                           : std::is_same_v<T, Eigen::half>   ? TokenStorage::f16
                                                                              : TokenStorage::f32;

/// @brief Up to four token inputs of one row layout (row-major [rows, cols], or packed rows given
/// by offsets, as TokenInputs), each float, bf16 or half, computed in float; G is
/// the gradient's storage type (the differentiated input's). The storage of each input is a
/// runtime tag: the conversion is chosen once per chunk of lowp_chunk tokens, so a mixed call
/// costs no more instantiations than an all-bf16 one.
template <class M, class G>
struct LowpTokenInputs {
  static_assert(mixes_with_float_v<G>, "16-bit token inputs compute in float");
  using compute_type = float;
  using grad_type = G;
  const void* in[4] = {};
  TokenStorage storage[4] = {};
  const M* mask = nullptr;
  Index rows = 0, cols = 0;
  Offsets off{};

  RowLayout layout() const noexcept { return {rows, cols, off}; }
  const M* mask_row(Index i) const noexcept { return mask + layout().begin(i); }
  Index len(Index i) const noexcept { return layout().len(i); }

  template <class T>
  void set(std::size_t j, const T* p) noexcept {
    in[j] = p;
    storage[j] = storage_of<T>;
  }

  /// token_row over row i, chunk by chunk: the chunks' sums are merged in double, and a 16-bit
  /// gradient is the float kernel's gradient rounded once to nearest even. Stream is ignored:
  /// converted chunks are written with ordinary stores. A kernel's row pass (has_row_pass_v)
  /// reads the row's chunks once first, its chunk sums merged in double.
  template <bool Fwd, bool Bwd, bool Stream, class Kernel>
  TokenStats row(const Kernel& k, Index i, float gscale, G* grad) const noexcept {
    if constexpr (has_row_pass_v<Kernel>) {
      if (k.needs_row_pass())
        return row_of<Fwd, Bwd>(k.for_row(row_pass_sums(k, i), row_weight<float>(mask_row(i), len(i))), i, gscale,
                                grad);
    }
    return row_of<Fwd, Bwd>(k, i, gscale, grad);
  }

 private:
  template <class Kernel>
  RowPassSums<Kernel> row_pass_sums(const Kernel& k, Index i) const noexcept {
    constexpr std::size_t NI = Kernel::n_in;
    alignas(64) float buf[NI][lowp_chunk];
    const float* p[NI];
    const Index base = layout().begin(i), n = layout().len(i);
    RowPassSums<Kernel> sums{};
    for (Index t = 0; t < n; t += lowp_chunk) {
      const Index c = n - t < lowp_chunk ? n - t : lowp_chunk;
      for (std::size_t j = 0; j < NI; ++j) p[j] = chunk(j, base + t, c, buf[j]);
      const RowPassSums<Kernel> part = row_term_sums(k, p, mask + base + t, c);
      for (std::size_t j = 0; j < sums.size(); ++j) sums[j] += part[j];
    }
    return sums;
  }

  template <bool Fwd, bool Bwd, class Kernel>
  TokenStats row_of(const Kernel& k, Index i, float gscale, G* grad) const noexcept {
    constexpr std::size_t NI = Kernel::n_in;
    constexpr bool direct_grad = std::is_same_v<G, float>;
    alignas(64) float buf[NI][lowp_chunk];
    alignas(64) float gbuf[Bwd && !direct_grad ? lowp_chunk : 1];
    const float* p[NI];
    const Index base = layout().begin(i), n = layout().len(i);
    const M* m = mask + base;
    TokenStats st;
    for (Index t = 0; t < n; t += lowp_chunk) {
      const Index c = n - t < lowp_chunk ? n - t : lowp_chunk;
      for (std::size_t j = 0; j < NI; ++j) p[j] = chunk(j, base + t, c, buf[j]);
      float* g = nullptr;
      if constexpr (Bwd) g = direct_grad ? reinterpret_cast<float*>(grad + t) : gbuf;
      st.merge(token_row<Fwd, Bwd, false>(k, p, m + t, c, gscale, g));
      if constexpr (Bwd && !direct_grad) from_float(gbuf, grad + t, c);
    }
    return st;
  }

  const float* chunk(std::size_t j, Index at, Index len, float* buf) const noexcept {
    switch (storage[j]) {
      case TokenStorage::bf16:
        return as_float(static_cast<const Eigen::bfloat16*>(in[j]) + at, len, buf);
      case TokenStorage::f16:
        return as_float(static_cast<const Eigen::half*>(in[j]) + at, len, buf);
      default:
        return static_cast<const float*>(in[j]) + at;
    }
  }
};

/// The inputs type of a token loss whose inputs have storage types Ts, gradient G and mask M:
/// the plain TokenInputs when all are one type, LowpTokenInputs when any is 16-bit.
template <class M, class G, class... Ts>
using token_inputs_t = std::conditional_t<common_token<Ts...>::lowp, LowpTokenInputs<M, G>,
                                          TokenInputs<typename common_token<Ts...>::type, M>>;

/// Sets input j of a token inputs object from a view (null data: an absent input).
template <class S, class M, class T>
void set_input(TokenInputs<S, M>& in, std::size_t j, const T* p) noexcept {
  static_assert(std::is_same_v<S, T>, "one storage type per plain call");
  in.in[j] = p;
}
template <class M, class G, class T>
void set_input(LowpTokenInputs<M, G>& in, std::size_t j, const T* p) noexcept {
  in.set(j, p);
}

}  // namespace prefloss::detail
PREFLOSS_KERNELS_END
