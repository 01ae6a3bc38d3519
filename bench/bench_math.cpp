// Elementwise math over arrays: prefloss's vectorized log_sigmoid / sigmoid / softplus / log1mexp
// against a scalar std:: loop (the naive stable logsigmoid), float and double.
//
//   build-h2/bench/bench_math                      all sizes (1e3 .. 1e7; log_sigmoid f32 to 1e8)
//   build-h2/bench/bench_math --prefloss_quick     up to 4Mi elements
//
// Rows: "<function>/<f32|f64>/<array|scalar_std>/<elements>". Bytes = n read + n written.
// Inputs are uniform in [-10, 10] (array_wide: [-40, 40]; log1mexp: [-10, 0]). copy/f32/array is
// y = x through the same array driver: the memory floor of every row at its size.
#include <prefloss/prefloss.hpp>

#include "bench_common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace pb = prefloss::bench;

namespace {

/// The loop prefloss replaces: min(x, 0) - log1p(exp(-|x|)) with std:: calls, one element at a
/// time. The calls set errno, so GCC cannot vectorize them without -ffast-math.
template <class T>
__attribute__((noinline)) void log_sigmoid_scalar_std(const T* x, T* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = std::min(x[i], T(0)) - std::log1p(std::exp(-std::fabs(x[i])));
}

enum class Fn { copy, log_sigmoid, log_sigmoid_wide, sigmoid, softplus, log1mexp, log_sigmoid_scalar_std };

template <class T, Fn F>
void BM_unary(benchmark::State& st) {
  const std::int64_t n = st.range(0);
  pb::Buffer<T> x(n), y(n);
  // Logits straddle 0 (both branches of every select); log1mexp's domain is x <= 0, and [-10, 0]
  // straddles its -ln 2 branch point.
  if constexpr (F == Fn::log1mexp) {
    pb::fill_logp(x.data(), n, 11, -10.0, 0.0);
  } else if constexpr (F == Fn::log_sigmoid_wide) {
    // Past |x| = 15.75 the float AVX-512 kernel takes a second path for x > 0: about a third of
    // the lanes here, so nearly every batch pays for both.
    pb::fill_logp(x.data(), n, 11, -40.0, 40.0);
  } else {
    pb::fill_logp(x.data(), n, 11, -10.0, 10.0);
  }
  const auto un = static_cast<std::size_t>(n);
  for (auto _ : st) {
    if constexpr (F == Fn::copy) prefloss::detail::apply_unary(x.data(), y.data(), un, [](const auto& b) { return b; });
    if constexpr (F == Fn::log_sigmoid || F == Fn::log_sigmoid_wide) prefloss::log_sigmoid(x.data(), y.data(), un);
    if constexpr (F == Fn::sigmoid) prefloss::sigmoid(x.data(), y.data(), un);
    if constexpr (F == Fn::softplus) prefloss::softplus(x.data(), y.data(), un);
    if constexpr (F == Fn::log1mexp) prefloss::log1mexp(x.data(), y.data(), un);
    if constexpr (F == Fn::log_sigmoid_scalar_std) log_sigmoid_scalar_std(x.data(), y.data(), un);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  pb::set_counters(st, 2.0 * sizeof(T) * static_cast<double>(n), static_cast<double>(n));
}

template <class T>
void register_type(const char* t) {
  const std::string s(t);
  // float log_sigmoid (array and the scalar baseline) also runs at the DRAM end, 1e8 elements.
  const pb::SizeRange ls = std::is_same_v<T, float> ? pb::kTokenSizes : pb::kMathSizes;
  // y = x through the array driver the math uses (prefetch, streaming stores past the
  // threshold): what reading x and writing y costs at each size, the floor of every row here.
  if constexpr (std::is_same_v<T, float>) pb::add("copy/" + s + "/array", BM_unary<T, Fn::copy>, ls);
  pb::add("log_sigmoid/" + s + "/array", BM_unary<T, Fn::log_sigmoid>, ls);
  pb::add("log_sigmoid/" + s + "/array_wide", BM_unary<T, Fn::log_sigmoid_wide>, pb::kMathSizes);
  pb::add("log_sigmoid/" + s + "/scalar_std", BM_unary<T, Fn::log_sigmoid_scalar_std>, ls);
  pb::add("sigmoid/" + s + "/array", BM_unary<T, Fn::sigmoid>, pb::kMathSizes);
  pb::add("softplus/" + s + "/array", BM_unary<T, Fn::softplus>, pb::kMathSizes);
  pb::add("log1mexp/" + s + "/array", BM_unary<T, Fn::log1mexp>, pb::kMathSizes);
}

}  // namespace

PREFLOSS_BENCH_REGISTER(register_math) {
  register_type<float>("f32");
  register_type<double>("f64");
}

PREFLOSS_BENCH_MAIN()
