// Accuracy of the math core (log_sigmoid, sigmoid, softplus, log1mexp): scalar, xsimd batch and
// array forms in float and double against a higher-precision reference (long double for float;
// __float128, or an extended long double, for double), over the whole range; exact asymptotics;
// NaN/inf; array lengths and alignments; the fused value+gradient forms. Prints a table of the
// measured maxima to stdout.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <prefloss/prefloss.hpp>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// The double reference is __float128 (libquadmath) where CMake found it (PREFLOSS_HAVE_QUADMATH),
// else the x87/IEEE-quad long double where it has at least 64 bits; nothing weaker is accepted.
// libquadmath's header lives in GCC's private include directory, which clang does not search; the
// handful of functions used here are then declared by hand (same ABI, same library).
#if !defined(PREFLOSS_HAVE_QUADMATH)
#define PREFLOSS_HAVE_QUADMATH 0
#endif
#if PREFLOSS_HAVE_QUADMATH
#if __has_include(<quadmath.h>)
#include <quadmath.h>
#else
extern "C" {
__extension__ __float128 expq(__float128) noexcept;
__extension__ __float128 expm1q(__float128) noexcept;
__extension__ __float128 logq(__float128) noexcept;
__extension__ __float128 log1pq(__float128) noexcept;
__extension__ __float128 fabsq(__float128) noexcept;
__extension__ __float128 frexpq(__float128, int*) noexcept;
__extension__ __float128 ldexpq(__float128, int) noexcept;
}
#endif
#elif LDBL_MANT_DIG < 64
#error "test_math needs __float128 (libquadmath) or a long double of >= 64 bits as its double reference"
#endif

namespace pl = prefloss;

namespace {

// ---- reference arithmetic: long double for float, __float128 (or long double) for double ------

#if PREFLOSS_HAVE_QUADMATH
__extension__ typedef __float128 quad;
constexpr const char* double_reference = "__float128";
#else
using quad = long double;
constexpr const char* double_reference = "long double";
#endif

template <class T>
using Ref = std::conditional_t<std::is_same_v<T, float>, long double, quad>;

inline long double r_exp(long double x) { return std::exp(x); }
inline long double r_expm1(long double x) { return std::expm1(x); }
inline long double r_log(long double x) { return std::log(x); }
inline long double r_log1p(long double x) { return std::log1p(x); }
inline long double r_fabs(long double x) { return std::fabs(x); }
inline long double r_frexp(long double x, int* e) { return std::frexp(x, e); }
inline long double r_ldexp(long double x, int e) { return std::ldexp(x, e); }
#if PREFLOSS_HAVE_QUADMATH
inline quad r_exp(quad x) { return expq(x); }
inline quad r_expm1(quad x) { return expm1q(x); }
inline quad r_log(quad x) { return logq(x); }
inline quad r_log1p(quad x) { return log1pq(x); }
inline quad r_fabs(quad x) { return fabsq(x); }
inline quad r_frexp(quad x, int* e) { return frexpq(x, e); }
inline quad r_ldexp(quad x, int e) { return ldexpq(x, e); }
#endif

template <class R>
bool r_isnan(R x) {
  return x != x;
}
template <class R>
bool r_isinf(R x) {
  return !r_isnan(x) && r_isnan(x - x);
}

// The definitions, each branch in its cancellation-free form; at 64 or 113 bits the reference
// error is far below an ULP of the output type.
template <class R>
R ref_log_sigmoid(R x) {
  if (r_isnan(x)) return x;
  return x >= 0 ? -r_log1p(r_exp(-x)) : x - r_log1p(r_exp(x));
}
template <class R>
R ref_sigmoid(R x) {
  if (r_isnan(x)) return x;
  if (x >= 0) return R(1) / (R(1) + r_exp(-x));
  const R e = r_exp(x);
  return e / (R(1) + e);
}
template <class R>
R ref_softplus(R x) {
  if (r_isnan(x)) return x;
  return x >= 0 ? x + r_log1p(r_exp(-x)) : r_log1p(r_exp(x));
}
template <class R>
R ref_log1mexp(R x) {
  if (r_isnan(x) || x > 0) return std::numeric_limits<double>::quiet_NaN();
  if (x == 0) return -std::numeric_limits<double>::infinity();
  return x > R(-0.693) ? r_log(-r_expm1(x)) : r_log1p(-r_exp(x));
}
// Closed-form derivatives.
template <class R>
R ref_d_log_sigmoid(R x) {  // sigmoid(-x)
  return ref_sigmoid(-x);
}
template <class R>
R ref_d_sigmoid(R x) {  // sig * (1 - sig), with 1 - sig(x) taken as sig(-x) (no cancellation)
  return ref_sigmoid(x) * ref_sigmoid(-x);
}
template <class R>
R ref_d_log1mexp(R x) {  // -exp(x) / (1 - exp(x)) = -1 / expm1(-x)
  if (r_isnan(x) || x > 0) return std::numeric_limits<double>::quiet_NaN();
  return R(-1) / r_expm1(R(0) - x);  // -1 / (+0) at x = +-0: the limit from the left, -inf
}

// ---- ULP measurement in the output type ------------------------------------------------------

/// ULP of the reference value r in type T: the spacing of T at |r|, never below denorm_min.
template <class T, class R>
R ulp_of(R r) {
  constexpr int p = std::numeric_limits<T>::digits;
  constexpr int emin = std::numeric_limits<T>::min_exponent - p;  // exponent of denorm_min
  if (r == 0) return r_ldexp(R(1), emin);
  int e = 0;
  r_frexp(r, &e);  // |r| in [2^(e-1), 2^e)
  return r_ldexp(R(1), std::max(e - p, emin));
}

/// |y - r| in ULP of r; NaN must match NaN, infinities must match exactly.
template <class T, class R>
double ulp_error(T y, R r) {
  const bool rn = r_isnan(r), yn = std::isnan(y);
  if (rn || yn) return rn && yn ? 0.0 : std::numeric_limits<double>::infinity();
  // A reference at or beyond T's overflow threshold (max + half an ULP) rounds to infinity.
  const R big =
      static_cast<R>(std::numeric_limits<T>::max()) + ulp_of<T>(static_cast<R>(std::numeric_limits<T>::max())) / 2;
  if (r_fabs(r) >= big)
    r = r > 0 ? static_cast<R>(std::numeric_limits<T>::infinity())
              : -static_cast<R>(std::numeric_limits<T>::infinity());
  if (r_isinf(r) || std::isinf(y)) return static_cast<R>(y) == r ? 0.0 : std::numeric_limits<double>::infinity();
  return static_cast<double>(r_fabs(static_cast<R>(y) - r) / ulp_of<T>(r));
}

template <class T>
bool same(T a, T b) {
  return (std::isnan(a) && std::isnan(b)) || a == b;
}
template <class T>
bool bit_same(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : "double";
}

/// Running maximum with the input that produced it.
struct Stat {
  double max = 0;
  double x = 0, y = 0, ref = 0;
  bool seen = false;
  template <class T, class R>
  void add(double u, T xi, T yi, R r) {
    if (std::isnan(u)) u = std::numeric_limits<double>::infinity();
    if (u > max || !seen) {
      seen = true;
      max = u;
      x = static_cast<double>(xi);
      y = static_cast<double>(yi);
      ref = static_cast<double>(r);
    }
  }
};

// ---- the functions under test, one descriptor each -------------------------------------------

struct LogSigmoid {
  static constexpr const char* name = "log_sigmoid";
  template <class T>
  static T scalar(T x) {
    return pl::log_sigmoid(x);
  }
  template <class B>
  static B simd(const B& x) {
    return pl::log_sigmoid(x);
  }
  template <class T>
  static void array(const T* x, T* y, std::size_t n) {
    pl::log_sigmoid(x, y, n);
  }
  template <class R>
  static R ref(R x) {
    return ref_log_sigmoid(x);
  }
};
struct Sigmoid {
  static constexpr const char* name = "sigmoid";
  template <class T>
  static T scalar(T x) {
    return pl::sigmoid(x);
  }
  template <class B>
  static B simd(const B& x) {
    return pl::sigmoid(x);
  }
  template <class T>
  static void array(const T* x, T* y, std::size_t n) {
    pl::sigmoid(x, y, n);
  }
  template <class R>
  static R ref(R x) {
    return ref_sigmoid(x);
  }
};
struct Softplus {
  static constexpr const char* name = "softplus";
  template <class T>
  static T scalar(T x) {
    return pl::softplus(x);
  }
  template <class B>
  static B simd(const B& x) {
    return pl::softplus(x);
  }
  template <class T>
  static void array(const T* x, T* y, std::size_t n) {
    pl::softplus(x, y, n);
  }
  template <class R>
  static R ref(R x) {
    return ref_softplus(x);
  }
};
struct Log1mexp {
  static constexpr const char* name = "log1mexp";
  template <class T>
  static T scalar(T x) {
    return pl::log1mexp(x);
  }
  template <class B>
  static B simd(const B& x) {
    return pl::log1mexp(x);
  }
  template <class T>
  static void array(const T* x, T* y, std::size_t n) {
    pl::log1mexp(x, y, n);
  }
  template <class R>
  static R ref(R x) {
    return ref_log1mexp(x);
  }
};

/// The batch form over a vector, lane-aligned chunks, the last one padded with zeros.
template <class T, class F>
std::vector<T> eval_batch(const std::vector<T>& x, F&& f) {
  using B = pl::detail::batch<T>;
  constexpr std::size_t w = B::size;
  std::vector<T> y(x.size());
  alignas(64) T in[w];
  alignas(64) T out[w];
  for (std::size_t i = 0; i < x.size(); i += w) {
    const std::size_t m = std::min(w, x.size() - i);
    for (std::size_t k = 0; k < w; ++k) in[k] = k < m ? x[i + k] : T(0);
    f(B::load_aligned(in)).store_aligned(out);
    for (std::size_t k = 0; k < m; ++k) y[i + k] = out[k];
  }
  return y;
}

/// One lane of the batch form on a broadcast value.
template <class F, class T>
T batch_at(T x) {
  using B = pl::detail::batch<T>;
  alignas(64) T out[B::size];
  F::simd(B(x)).store_aligned(out);
  return out[0];
}

// ---- inputs: the whole range, not a window ---------------------------------------------------

template <class T>
std::vector<T> sweep_inputs() {
  using L = std::numeric_limits<T>;
  constexpr bool is_f = std::is_same_v<T, float>;
  std::vector<T> x;
  auto push_both = [&](double v) {
    x.push_back(static_cast<T>(v));
    x.push_back(static_cast<T>(-v));
  };
  // Log-spaced, both signs, 1e-30 up to the largest finite value.
  {
    const double lo = -30, hi = std::log10(static_cast<double>(L::max()));
    const int n = is_f ? 20000 : 30000;
    for (int k = 0; k <= n; ++k) push_both(std::pow(10.0, lo + (hi - lo) * k / n));
  }
  // Dense in [-50, 50].
  {
    const int n = is_f ? 200000 : 60000;
    for (int k = 0; k <= n; ++k) x.push_back(static_cast<T>(-50.0 + 100.0 * k / n));
  }
  // The tails out to where exp underflows (-103.97f / -745.13): linear and random mantissas.
  const double tail = is_f ? 110.0 : 750.0;
  {
    const int n = is_f ? 50000 : 40000;
    for (int k = 0; k <= n; ++k) x.push_back(static_cast<T>(-tail + 2 * tail * k / n));
  }
  std::mt19937_64 rng(20240531u);
  {
    std::uniform_real_distribution<double> u(-tail, tail);
    for (int k = 0; k < (is_f ? 100000 : 30000); ++k) x.push_back(static_cast<T>(u(rng)));
  }
  // Log-uniform magnitudes with random mantissas across the whole exponent range (subnormals too).
  {
    std::uniform_real_distribution<double> e(std::log10(static_cast<double>(L::denorm_min())),
                                             std::log10(static_cast<double>(L::max())));
    for (int k = 0; k < (is_f ? 50000 : 25000); ++k) push_both(std::pow(10.0, e(rng)) * (1 - 1e-3 * (k % 7)));
  }
  // Where log1mexp switches branch (-log 2), at two scales.
  {
    const double c = -0.6931471805599453;
    const int n = is_f ? 10000 : 5000;
    for (int k = -n; k <= n; ++k) x.push_back(static_cast<T>(c * (1 + 1e-2 * k / n)));
    for (int k = -n; k <= n; ++k) x.push_back(static_cast<T>(c * (1 + 1e-6 * k / n)));
  }
  // Random bit patterns (NaNs with payloads and subnormals included).
  {
    using U = std::conditional_t<is_f, std::uint32_t, std::uint64_t>;
    for (int k = 0; k < (is_f ? 200000 : 40000); ++k) {
      const U bits = static_cast<U>(rng());
      T v;
      std::memcpy(&v, &bits, sizeof v);
      x.push_back(v);
    }
  }
  // Edges and specials.
  for (T v : {T(0), L::denorm_min(), L::min(), L::epsilon(), T(1), L::max(), L::infinity(), L::quiet_NaN()}) {
    x.push_back(v);
    x.push_back(-v);
  }
  return x;
}

// ---- accuracy of one function in one type: scalar, batch and array forms ---------------------

struct Row {
  std::string name;
  const char* type;
  Stat scalar, batch, array;
};

std::vector<Row>& table() {
  static std::vector<Row> rows;
  return rows;
}

template <class F, class T>
void measure(const std::vector<T>& x) {
  using R = Ref<T>;
  const std::size_t n = x.size();
  std::vector<R> ref(n);
  for (std::size_t i = 0; i < n; ++i) ref[i] = F::ref(static_cast<R>(x[i]));

  Row row{F::name, type_name<T>(), {}, {}, {}};
  for (std::size_t i = 0; i < n; ++i) {
    const T y = F::scalar(x[i]);
    row.scalar.add(ulp_error(y, ref[i]), x[i], y, ref[i]);
  }
  const std::vector<T> yb = eval_batch(x, [](const auto& b) { return F::simd(b); });
  for (std::size_t i = 0; i < n; ++i) row.batch.add(ulp_error(yb[i], ref[i]), x[i], yb[i], ref[i]);

  // Array form from an odd offset (unaligned), compared to the reference and to the batch form.
  std::vector<T> xa(n + 1), ya(n + 1);
  std::copy(x.begin(), x.end(), xa.begin() + 1);
  F::array(xa.data() + 1, ya.data() + 1, n);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < n; ++i) {
    row.array.add(ulp_error(ya[i + 1], ref[i]), x[i], ya[i + 1], ref[i]);
    differ += !bit_same(ya[i + 1], yb[i]);
  }

  INFO(F::name << "<" << type_name<T>() << "> over " << n << " inputs");
  INFO("scalar worst x=" << row.scalar.x << " y=" << row.scalar.y << " ref=" << row.scalar.ref);
  INFO("batch  worst x=" << row.batch.x << " y=" << row.batch.y << " ref=" << row.batch.ref);
  INFO("array  worst x=" << row.array.x << " y=" << row.array.y << " ref=" << row.array.ref);
  CHECK(row.scalar.max <= 2);
  CHECK(row.batch.max <= 2);
  CHECK(row.array.max <= 2);
  CHECK(differ == 0);
  table().push_back(row);
}

// ---- fused value + gradient forms ------------------------------------------------------------

/// Gradient error: ULP, and whether it is within 4 ULP or the relative tolerance.
template <class T, class R>
bool grad_ok(T g, R r, double u) {
  if (u <= 4) return true;
  if (r_isnan(r) || std::isnan(g) || r_isinf(r) || std::isinf(g)) return false;
  const double rel = std::is_same_v<T, float> ? 1e-6 : 1e-14;
  return static_cast<double>(r_fabs(static_cast<R>(g) - r)) <= rel * static_cast<double>(r_fabs(r));
}

struct GradStat {
  Stat ulp;
  std::size_t bad = 0, value_differs = 0;
  double bad_x = 0;
  template <class T, class R>
  void add(T x, T g, R r) {
    const double u = ulp_error(g, r);
    ulp.add(u, x, g, r);
    if (!grad_ok(g, r, u)) {
      if (bad == 0) bad_x = static_cast<double>(x);
      ++bad;
    }
  }
};

struct GradRow {
  std::string name;
  const char* type;
  GradStat st;
};
std::vector<GradRow>& grad_table() {
  static std::vector<GradRow> rows;
  return rows;
}

template <class T>
void measure_grads(const std::vector<T>& x) {
  using R = Ref<T>;
  const std::size_t n = x.size();
  auto finish = [&](const char* name, GradStat& s) {
    INFO(name << "<" << type_name<T>() << ">: " << s.bad
              << " gradients outside 4 ULP / relative tolerance, first at x=" << s.bad_x << "; worst ULP " << s.ulp.max
              << " at x=" << s.ulp.x << " g=" << s.ulp.y << " ref=" << s.ulp.ref);
    CHECK(s.bad == 0);
    CHECK(s.value_differs == 0);
    grad_table().push_back({name, type_name<T>(), s});
  };

  {  // log_sigmoid_and_grad, scalar
    GradStat s;
    for (std::size_t i = 0; i < n; ++i) {
      const auto vg = pl::log_sigmoid_and_grad(x[i]);
      s.value_differs += !bit_same(vg.value, pl::log_sigmoid(x[i]));
      s.add(x[i], vg.grad, ref_d_log_sigmoid(static_cast<R>(x[i])));
    }
    finish("log_sigmoid_and_grad scalar", s);
  }
  {  // log_sigmoid_and_grad, batch
    using B = pl::detail::batch<T>;
    const std::vector<T> v = eval_batch(x, [](const B& b) { return pl::log_sigmoid_and_grad(b).value; });
    const std::vector<T> g = eval_batch(x, [](const B& b) { return pl::log_sigmoid_and_grad(b).grad; });
    const std::vector<T> u = eval_batch(x, [](const B& b) { return pl::log_sigmoid(b); });
    GradStat s;
    for (std::size_t i = 0; i < n; ++i) {
      s.value_differs += !bit_same(v[i], u[i]);
      s.add(x[i], g[i], ref_d_log_sigmoid(static_cast<R>(x[i])));
    }
    finish("log_sigmoid_and_grad batch", s);
  }
  {  // sigmoid_and_grad, scalar
    GradStat s;
    for (std::size_t i = 0; i < n; ++i) {
      const auto vg = pl::sigmoid_and_grad(x[i]);
      s.value_differs += !bit_same(vg.value, pl::sigmoid(x[i]));
      s.add(x[i], vg.grad, ref_d_sigmoid(static_cast<R>(x[i])));
    }
    finish("sigmoid_and_grad scalar", s);
  }
  {  // log1mexp_and_grad, scalar: the derivative is checked on the domain x <= 0
    GradStat s;
    for (std::size_t i = 0; i < n; ++i) {
      const auto vg = pl::log1mexp_and_grad(x[i]);
      s.value_differs += !bit_same(vg.value, pl::log1mexp(x[i]));
      if (!(x[i] > 0)) s.add(x[i], vg.grad, ref_d_log1mexp(static_cast<R>(x[i])));
    }
    finish("log1mexp_and_grad scalar", s);
  }
}

void print_tables(const char* type, std::size_t inputs) {
  std::printf("\nprefloss math accuracy, %s: max error in ULP of the output type vs %s, %zu inputs, batch arch %s\n",
              type, std::strcmp(type, "float") == 0 ? "long double" : double_reference, inputs,
              pl::detail::arch::name());
  std::printf("%-12s %-7s %8s %8s %8s   worst inputs (scalar | batch | array)\n", "function", "type", "scalar", "batch",
              "array");
  for (const Row& r : table())
    if (std::strcmp(r.type, type) == 0)
      std::printf("%-12s %-7s %8.3f %8.3f %8.3f   %.9g | %.9g | %.9g\n", r.name.c_str(), r.type, r.scalar.max,
                  r.batch.max, r.array.max, r.scalar.x, r.batch.x, r.array.x);
  std::printf(
      "\nfused forms: gradient error in ULP vs the closed-form derivative (pass: <= 4 ULP or relative 1e-6 / 1e-14);\n"
      "value bit-identical to the unfused form\n");
  std::printf("%-28s %-7s %9s %6s %9s   worst input\n", "form", "type", "grad ulp", "fails", "value!=");
  for (const GradRow& r : grad_table())
    if (std::strcmp(r.type, type) == 0)
      std::printf("%-28s %-7s %9.3f %6zu %9zu   x=%.9g g=%.9g ref=%.9g\n", r.name.c_str(), r.type, r.st.ulp.max,
                  r.st.bad, r.st.value_differs, r.st.ulp.x, r.st.ulp.y, r.st.ulp.ref);
  std::fflush(stdout);
}

template <class T>
void run_accuracy() {
  const std::vector<T> x = sweep_inputs<T>();
  measure<LogSigmoid>(x);
  measure<Sigmoid>(x);
  measure<Softplus>(x);
  measure<Log1mexp>(x);
  measure_grads(x);
  print_tables(type_name<T>(), x.size());
}

// ---- point checks: every form at one input ---------------------------------------------------

/// F at x in all three forms (scalar, broadcast batch, array of 1 and inside a longer array).
template <class F, class T>
std::vector<T> all_forms(T x) {
  std::vector<T> out{F::scalar(x), batch_at<F>(x)};
  T y1 = T(7);
  F::array(&x, &y1, 1);
  out.push_back(y1);
  std::vector<T> xs(37, T(-1.5)), ys(37);
  xs[35] = x;
  F::array(xs.data(), ys.data(), xs.size());
  out.push_back(ys[35]);
  return out;
}

/// Every form within 2 ULP of the reference, and nonzero when the rounded true value is nonzero.
template <class F, class T>
void check_point(T x) {
  using R = Ref<T>;
  const R r = F::ref(static_cast<R>(x));
  const T rounded = static_cast<T>(r);
  const char* forms[] = {"scalar", "batch", "array(1)", "array(37)"};
  const std::vector<T> ys = all_forms<F>(x);
  for (std::size_t k = 0; k < ys.size(); ++k) {
    INFO(F::name << "<" << type_name<T>() << ">(" << x << ") " << forms[k] << " = " << ys[k] << ", reference "
                 << static_cast<double>(r));
    CHECK(ulp_error(ys[k], r) <= 2);
    if (rounded != 0 && !std::isnan(rounded)) CHECK(ys[k] != 0);
  }
}

/// Every form gives exactly `want` (NaN matches NaN).
template <class F, class T>
void check_exact(T x, T want) {
  const char* forms[] = {"scalar", "batch", "array(1)", "array(37)"};
  const std::vector<T> ys = all_forms<F>(x);
  for (std::size_t k = 0; k < ys.size(); ++k) {
    INFO(F::name << "<" << type_name<T>() << ">(" << x << ") " << forms[k] << " = " << ys[k] << ", want " << want);
    CHECK(same(ys[k], want));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("math: <= 2 ULP over the whole range, scalar/batch/array, fused gradients", "[math][accuracy]",
                   float, double) {
  run_accuracy<TestType>();
}

TEMPLATE_TEST_CASE("math: exact asymptotics, no early flush to zero", "[math]", float, double) {
  using T = TestType;
  constexpr bool is_f = std::is_same_v<T, float>;
  // log_sigmoid: -> x as x -> -inf, -> -exp(-x) as x -> +inf until exp(-x) underflows.
  for (T x : {T(-1e30), T(-1e10), T(-1e5), T(-100), T(-40)}) {
    check_point<LogSigmoid>(x);
    CHECK(pl::log_sigmoid(x) == x);  // log1p(exp(x)) is below half an ULP of x here
    CHECK(batch_at<LogSigmoid>(x) == x);
  }
  for (T x : {T(-20), T(-1), T(-1e-30), T(0), T(1e-30), T(1)}) check_point<LogSigmoid>(x);
  for (T x : {T(20), T(30), T(40), T(80), T(88.5), T(100), T(103)}) check_point<LogSigmoid>(x);
  if (is_f) {
    CHECK(pl::log_sigmoid(100.f) != 0.f);  // true value -3.72e-44, a subnormal
    CHECK(batch_at<LogSigmoid>(100.f) != 0.f);
    CHECK(pl::log_sigmoid(100.f) == Approx(-3.720076e-44).epsilon(0.05));
  } else {
    for (T x : {T(700), T(709), T(720), T(740), T(745)}) check_point<LogSigmoid>(x);
    CHECK(pl::log_sigmoid(740.0) != 0.0);  // -4.2e-322
    CHECK(batch_at<LogSigmoid>(740.0) != 0.0);
  }
  // sigmoid: -> exp(x) as x -> -inf, -> 1 as x -> +inf.
  for (T x : {T(-20), T(-30), T(-80), T(-88.5), T(-100), T(-103), T(20), T(40), T(1e30)}) check_point<Sigmoid>(x);
  if (is_f) {
    CHECK(batch_at<Sigmoid>(-100.f) != 0.f);
  } else {
    for (T x : {T(-700), T(-709), T(-740), T(-745)}) check_point<Sigmoid>(x);
    CHECK(batch_at<Sigmoid>(-740.0) != 0.0);
  }
  // softplus: -> exp(x) as x -> -inf, -> x as x -> +inf.
  for (T x : {T(-20), T(-80), T(-100), T(20), T(40), T(100), T(1e30)}) check_point<Softplus>(x);
  if (!is_f)
    for (T x : {T(-700), T(-740)}) check_point<Softplus>(x);
  CHECK(pl::softplus(T(1e30)) == T(1e30));
  // log1mexp: log(-x) asymptotics near 0, -exp(x) as x -> -inf.
  for (T x :
       {T(-1e-30), T(-1e-20), T(-1e-10), T(-1e-5), T(-0.5), T(-0.6931471805599453), T(-1), T(-20), T(-80), T(-100)})
    check_point<Log1mexp>(x);
  check_point<Log1mexp>(std::numeric_limits<T>::denorm_min() * -1);
  CHECK(pl::log1mexp(T(-1e-20)) == Approx(std::log(1e-20)).epsilon(is_f ? 1e-7 : 1e-15));
  if (is_f) {
    CHECK(batch_at<Log1mexp>(-100.f) != 0.f);
  } else {
    for (T x : {T(-700), T(-740)}) check_point<Log1mexp>(x);
    CHECK(batch_at<Log1mexp>(-740.0) != 0.0);
  }
}

TEMPLATE_TEST_CASE("math: NaN and infinities in every form", "[math]", float, double) {
  using T = TestType;
  using L = std::numeric_limits<T>;
  const T inf = L::infinity(), nan = L::quiet_NaN();
  T neg_nan = nan;
  {  // a NaN with the sign bit set (NaNs with random payloads come with the sweep's random bits)
    auto bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>{};
    std::memcpy(&bits, &nan, sizeof bits);
    bits |= decltype(bits)(1) << (8 * sizeof(T) - 1);
    std::memcpy(&neg_nan, &bits, sizeof bits);
  }
  for (T n : {nan, neg_nan}) {
    check_exact<LogSigmoid>(n, nan);
    check_exact<Sigmoid>(n, nan);
    check_exact<Softplus>(n, nan);
    check_exact<Log1mexp>(n, nan);
    CHECK(std::isnan(pl::log_sigmoid_and_grad(n).value));
    CHECK(std::isnan(pl::log_sigmoid_and_grad(n).grad));
    CHECK(std::isnan(pl::sigmoid_and_grad(n).value));
    CHECK(std::isnan(pl::sigmoid_and_grad(n).grad));
    CHECK(std::isnan(pl::log1mexp_and_grad(n).value));
    CHECK(std::isnan(pl::log1mexp_and_grad(n).grad));
    const auto vg = pl::log_sigmoid_and_grad(pl::detail::batch<T>(n));
    CHECK(std::isnan(vg.value.get(0)));
    CHECK(std::isnan(vg.grad.get(0)));
  }
  check_exact<LogSigmoid>(inf, T(0));
  check_exact<LogSigmoid>(-inf, -inf);
  check_exact<Sigmoid>(inf, T(1));
  check_exact<Sigmoid>(-inf, T(0));
  check_exact<Softplus>(inf, inf);
  check_exact<Softplus>(-inf, T(0));
  check_exact<Log1mexp>(-inf, T(0));
  check_exact<Log1mexp>(T(0), -inf);
  check_exact<Log1mexp>(-T(0), -inf);
  for (T x : {L::denorm_min(), T(1e-30), T(0.5), T(1), T(100), L::max(), inf}) {
    check_exact<Log1mexp>(x, nan);
    CHECK(std::isnan(pl::log1mexp_and_grad(x).value));
    CHECK(std::isnan(pl::log1mexp_and_grad(x).grad));  // outside the domain, like the value
  }
  // Gradients at the ends: sigmoid(-x) -> 0 / 1, sig' -> 0, d log1mexp -> 0 at -inf, -inf at 0.
  CHECK(pl::log_sigmoid_and_grad(inf).grad == T(0));
  CHECK(pl::log_sigmoid_and_grad(-inf).grad == T(1));
  CHECK(pl::log_sigmoid_and_grad(-inf).value == -inf);
  CHECK(pl::log_sigmoid_and_grad(pl::detail::batch<T>(inf)).grad.get(0) == T(0));
  CHECK(pl::log_sigmoid_and_grad(pl::detail::batch<T>(-inf)).grad.get(0) == T(1));
  CHECK(pl::sigmoid_and_grad(inf).grad == T(0));
  CHECK(pl::sigmoid_and_grad(-inf).grad == T(0));
  CHECK(pl::log1mexp_and_grad(-inf).grad == T(0));
  CHECK(pl::log1mexp_and_grad(T(0)).grad == -inf);
  CHECK(pl::log1mexp_and_grad(T(0)).value == -inf);
}

TEMPLATE_TEST_CASE("math: array form, any length/alignment, in place, equal to the batch form", "[math]", float,
                   double) {
  using T = TestType;
  using L = std::numeric_limits<T>;
  constexpr std::size_t max_n = 70, pad = 8;
  std::mt19937 rng(7u);
  std::uniform_real_distribution<double> u(std::is_same_v<T, float> ? -110.0 : -750.0, 30.0);
  alignas(64) T src[max_n + 3 + pad];
  for (T& v : src) v = static_cast<T>(u(rng));
  src[5] = L::quiet_NaN();
  src[11] = L::infinity();
  src[12] = -L::infinity();
  src[13] = T(0);
  src[29] = -L::denorm_min();
  const T sentinel = T(12345.5);

  auto run = [&](auto f_tag) {
    using F = decltype(f_tag);
    std::size_t bad = 0, clobbered = 0;
    for (std::size_t n = 0; n <= max_n; ++n)
      for (std::size_t off = 0; off < 4; ++off) {
        // Out of place: input and output both offset from an aligned base.
        alignas(64) T x[max_n + 3 + pad], y[max_n + 3 + pad];
        std::copy(std::begin(src), std::end(src), x);
        std::fill(std::begin(y), std::end(y), sentinel);
        F::array(x + off, y + off, n);
        for (std::size_t i = 0; i < n; ++i) bad += !bit_same(y[off + i], batch_at<F>(x[off + i]));
        for (std::size_t i = 0; i < off; ++i) clobbered += y[i] != sentinel;
        for (std::size_t i = off + n; i < max_n + 3 + pad; ++i) clobbered += y[i] != sentinel;
        // In place.
        alignas(64) T z[max_n + 3 + pad];
        std::copy(std::begin(src), std::end(src), z);
        F::array(z + off, z + off, n);
        for (std::size_t i = 0; i < n; ++i) bad += !bit_same(z[off + i], y[off + i]);
        for (std::size_t i = off + n; i < max_n + 3 + pad; ++i) clobbered += !bit_same(z[i], src[i]);
        for (std::size_t i = 0; i < off; ++i) clobbered += !bit_same(z[i], src[i]);
      }
    INFO(F::name << "<" << type_name<T>() << ">");
    CHECK(bad == 0);
    CHECK(clobbered == 0);
  };
  run(LogSigmoid{});
  run(Sigmoid{});
  run(Softplus{});
  run(Log1mexp{});
}

// Hidden (run with `test_math "[exhaustive]"`, a few minutes on 2 cores): every one of the 2^32
// float bit patterns through the array forms of log_sigmoid and softplus. softplus(x) is
// 0 - log_sigmoid(0 - x) by construction, exact; softplus(-x) = 0 - log_sigmoid(x) is checked bit
// for bit, so log_sigmoid's maximum is softplus's too.
TEST_CASE("math: float log_sigmoid over every float, softplus as its mirror", "[.][exhaustive]") {
  constexpr std::uint64_t total = std::uint64_t{1} << 32;
  constexpr std::size_t chunk = std::size_t{1} << 20;
  struct Part {
    Stat st;
    std::size_t mirror_differs = 0;
  };
  auto run = [&](std::uint64_t begin, std::uint64_t end, Part* part) {
    std::vector<float> x(chunk), y(chunk), xn(chunk), s(chunk);
    for (std::uint64_t base = begin; base < end; base += chunk) {
      for (std::size_t k = 0; k < chunk; ++k) {
        const auto bits = static_cast<std::uint32_t>(base + k);
        std::memcpy(&x[k], &bits, 4);
        xn[k] = -x[k];
      }
      pl::log_sigmoid(x.data(), y.data(), chunk);
      pl::softplus(xn.data(), s.data(), chunk);
      for (std::size_t k = 0; k < chunk; ++k) {
        const long double r = ref_log_sigmoid(static_cast<long double>(x[k]));
        part->st.add(ulp_error(y[k], r), x[k], y[k], r);
        part->mirror_differs += !bit_same(s[k], 0.0f - y[k]);
      }
    }
  };
  Part a, b;
  std::thread t([&] { run(0, total / 2, &a); });
  run(total / 2, total, &b);
  t.join();
  const Stat& w = a.st.max >= b.st.max ? a.st : b.st;
  std::printf("log_sigmoid<float> array, all 2^32 inputs: max %.4f ULP at x=%.9g (y=%.9g, ref=%.9g)\n", w.max, w.x, w.y,
              w.ref);
  INFO("worst x=" << w.x << " y=" << w.y << " ref=" << w.ref);
  CHECK(w.max <= 2);
  CHECK(a.mirror_differs + b.mirror_differs == 0);
}
