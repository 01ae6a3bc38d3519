/// @file config.hpp
/// Version macros, the user-overridable assertion hook, and the numerics guard.
#pragma once

#include <cstddef>

#define PREFLOSS_VERSION_MAJOR 0
#define PREFLOSS_VERSION_MINOR 1
#define PREFLOSS_VERSION_PATCH 0
#define PREFLOSS_VERSION (PREFLOSS_VERSION_MAJOR * 10000 + PREFLOSS_VERSION_MINOR * 100 + PREFLOSS_VERSION_PATCH)

// -ffast-math lets the compiler assume no NaN/inf and reassociate sums: log1p(exp(-|x|)) and
// the lane sums then lose the accuracy this library promises, and masked-out NaN padding
// can leak through selects. Refuse to build rather than silently return wrong numbers.
#if defined(__FAST_MATH__)
#error "prefloss must not be compiled with -ffast-math (it breaks log1p/logsigmoid and NaN-safe masking)"
#endif

/// Internal invariant check (never used for input validation, which always throws).
/// Define PREFLOSS_ASSERT before including prefloss to route it to your own handler.
#ifndef PREFLOSS_ASSERT
#include <cassert>
#define PREFLOSS_ASSERT(cond) assert(cond)
#endif

/// Outputs of at least this many bytes (array math, masked adjoints, token-loss gradients) are
/// written with non-temporal (streaming) stores on x86: past the last-level cache an ordinary
/// store first reads the line it overwrites, a third of the traffic of y = f(x). Below it the
/// output stays in cache for whatever reads it next. Define before including prefloss to move
/// it (0: always stream).
#ifndef PREFLOSS_STREAMING_STORE_BYTES
#define PREFLOSS_STREAMING_STORE_BYTES (std::size_t{32} << 20)
#endif

/// GCC 12's AVX-512 intrinsics read a self-initialised dummy (`__m512 __Y = __Y;`) and warn
/// -Wmaybe-uninitialized wherever they are inlined (GCC bug 105593, fixed in 13). GCC honours a
/// diagnostic pragma at any function of the inlining chain, so the kernel headers wrap their
/// code in these: the warning is silenced whether or not Eigen included the intrinsics first.
#if defined(__GNUC__) && !defined(__clang__)
// clang-format off
#define PREFLOSS_KERNELS_BEGIN                                \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")       \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
// clang-format on
#define PREFLOSS_KERNELS_END _Pragma("GCC diagnostic pop")
#else
#define PREFLOSS_KERNELS_BEGIN
#define PREFLOSS_KERNELS_END
#endif

/// @brief Forces inlining of the small helpers and lambdas inside a row kernel. GCC fuses a
/// product into a following add (FMA contraction, its default outside ISO C) only when both sit
/// in one function after inlining, and whether a helper is inlined depends on limits that count
/// the whole translation unit: without this, two kernels that must agree to the bit (a row's
/// statistics with and without keeping exp(u - m)) could round differently in a larger program.
#if defined(__GNUC__)
#define PREFLOSS_DETAIL_ALWAYS_INLINE __attribute__((always_inline))
#else
#define PREFLOSS_DETAIL_ALWAYS_INLINE
#endif

/// @brief Marks a function whose one compiled body every entry point calls (a loss's arithmetic
/// for its two-pass and fused forms, a logit row's statistics and gradient), so their results
/// are the same bits: two inlined copies may be optimized differently (which products
/// are fused into an FMA, which constants are folded) and round differently in the last place.
#if defined(__clang__)
#define PREFLOSS_DETAIL_ONE_BODY __attribute__((noinline))
#elif defined(__GNUC__)
#define PREFLOSS_DETAIL_ONE_BODY __attribute__((noipa))
#elif defined(_MSC_VER)
#define PREFLOSS_DETAIL_ONE_BODY __declspec(noinline)
#else
#define PREFLOSS_DETAIL_ONE_BODY
#endif

namespace prefloss {
/// Index type of tensor extents: Eigen's (std::ptrdiff_t unless EIGEN_DEFAULT_DENSE_INDEX_TYPE
/// says otherwise; detail/tensor.hpp checks that they agree).
using Index = std::ptrdiff_t;
}  // namespace prefloss
