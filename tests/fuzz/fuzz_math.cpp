// libFuzzer harness: the array forms log_sigmoid, sigmoid, softplus and log1mexp(const T* x,
// T* y, n) over float and double, at every element offset within a 64-byte batch and at lengths
// on both sides of the array driver's streaming threshold. Beyond the common invariants: y[i]
// depends on x[i] alone (not on n or on where i falls), in place equals out of place, and NaN
// comes only from NaN (or, for log1mexp, from x > 0, outside its domain).
#include "fuzz_common.hpp"

namespace fuzz {
namespace {

template <class T>
struct Function {
  const char* name;
  void (*apply)(const T*, T*, std::size_t);
  bool nan_above_0;
};

template <class T>
void math(Decoder& d) {
  static constexpr Function<T> functions[] = {
      {"log_sigmoid", [](const T* x, T* y, std::size_t n) { pl::log_sigmoid(x, y, n); }, false},
      {"sigmoid", [](const T* x, T* y, std::size_t n) { pl::sigmoid(x, y, n); }, false},
      {"softplus", [](const T* x, T* y, std::size_t n) { pl::softplus(x, y, n); }, false},
      {"log1mexp", [](const T* x, T* y, std::size_t n) { pl::log1mexp(x, y, n); }, true},
  };
  const Function<T> f = d.pick(functions);
  constexpr std::size_t lanes = 64 / sizeof(T), stream_min = 2 * 4096 / sizeof(T);  // elementwise.hpp
  const auto n = static_cast<Index>(d.flag() ? stream_min - lanes + d.below(3 * lanes) : d.below<std::size_t>(71));
  // Element offsets only: a T* must be aligned to T, and these raw-pointer forms cannot refuse one.
  const Input<T> x(d, sizeof(T) * d.below(lanes + 1), n);
  Buf<T> y(sizeof(T) * d.below(lanes + 1), n);
  const auto size = static_cast<std::size_t>(n);
  const Record out = check(d, f.name, {}, {&y}, [&](Record&) { f.apply(x.data(), y.data(), size); });

  Buf<T> z(x.offset(), n);
  std::memcpy(z.data(), x.data(), size * sizeof(T));
  f.apply(z.data(), z.data(), size);
  Record in_place, one_by_one;
  z.append(in_place);
  for (std::size_t i = 0; i < size; ++i) {
    const T xi = x.get(i);
    T yi;
    f.apply(&xi, &yi, 1);
    one_by_one.add(yi);
    if (std::isnan(yi) && !std::isnan(xi) && !(f.nan_above_0 && xi > 0))
      fail(f.name, "NaN at x = " + str(xi) + ", inside the domain");
  }
  expect_same(f.name, "in place differs from out of place", out, in_place);
  expect_same(f.name, "an element differs from the function of that element alone", out, one_by_one);
}

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::Decoder d(data, size);
  d.flag() ? fuzz::math<double>(d) : fuzz::math<float>(d);
  return 0;
}
