/// @file bench/bench_common.hpp
/// Shared scaffolding for the prefloss benchmarks: aligned buffers, deterministic inputs, the
/// size ladder, the counters every row reports, a same-binary streaming-read roofline, and main().
///
/// Include it right after <prefloss/prefloss.hpp> (GCC 12 warns about AVX-512 intrinsics
/// otherwise; prefloss's detail/simd.hpp includes them under a pragma first).
///
/// A new bench file (bench/bench_<thing>.cpp; bench/CMakeLists.txt picks it up by glob):
///
///     #include <prefloss/prefloss.hpp>
///     #include "bench_common.hpp"
///     namespace pb = prefloss::bench;
///
///     void BM_thing(benchmark::State& st) {
///       const std::int64_t n = st.range(0);          // elements (tokens) of this row
///       pb::Buffer<float> x(n), y(n);
///       pb::fill_logp(x.data(), n, /*seed=*/1);
///       for (auto _ : st) { /* work */ benchmark::DoNotOptimize(y.data()); benchmark::ClobberMemory(); }
///       pb::set_counters(st, /*bytes per iteration=*/8.0 * n, /*tokens per iteration=*/n);
///     }
///     PREFLOSS_BENCH_REGISTER(register_thing) { pb::add("thing/f32", BM_thing, pb::kTokenSizes); }
///     PREFLOSS_BENCH_MAIN()
///
/// Token inputs: pb::TokenBatch<float, std::uint8_t> in(batch, n, seed) holds [batch, n / batch]
/// log-probs with an ~80% mask and NaN padding; in.values() / in.masks() are the TensorMaps the
/// prefloss API takes (see bench_reduce.cpp).
///
/// Benchmark names are "<kernel>/<variant>/<elements>" (the last path element is always the
/// total element count); bench/torch_compare.py joins on the part before it.
///
/// Flags (before or among the --benchmark_* flags) and environment variables:
///   --prefloss_quick            PREFLOSS_BENCH_QUICK=1       sizes up to 4Mi elements only
///   --prefloss_max_elems=N      PREFLOSS_BENCH_MAX_ELEMS=N   largest row (default 1e8 elements)
///   --prefloss_stream_mib=N     PREFLOSS_BENCH_STREAM_MIB=N  roofline buffer (default 1024 MiB)
///   --prefloss_stream_gbps=X    PREFLOSS_BENCH_STREAM_GBPS=X use X GB/s instead of measuring
/// The measured roofline is written to the JSON context as prefloss_stream_read_bytes_per_second.
#pragma once

#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <unsupported/Eigen/CXX11/Tensor>
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace prefloss::bench {

// ---- options ----------------------------------------------------------------------------------

struct Options {
  std::int64_t max_elems = 100'000'000;             ///< largest row registered
  std::size_t stream_bytes = std::size_t(1) << 30;  ///< roofline buffer; > L3 (480 MiB here)
  int stream_reps = 5;                              ///< roofline = best of this many passes
  double stream_gbps = 0;                           ///< > 0: skip the measurement, use this
};

inline Options& options() {
  static Options o;
  return o;
}

inline constexpr std::int64_t kQuickMaxElems = std::int64_t(1) << 22;

// ---- aligned buffers --------------------------------------------------------------------------

/// Uninitialised-free, 64-byte aligned (2 MiB aligned and THP-advised when large) array of T,
/// zero-filled on construction so every page is resident before anything is timed.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::int64_t n) : n_(static_cast<std::size_t>(n)) {
    const std::size_t huge = std::size_t(2) << 20;
    const std::size_t align = n_ * sizeof(T) >= huge ? huge : 64;
    bytes_ = (std::max<std::size_t>(n_ * sizeof(T), 1) + align - 1) / align * align;
    p_ = static_cast<T*>(std::aligned_alloc(align, bytes_));
    if (!p_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == huge) madvise(p_, bytes_, MADV_HUGEPAGE);
#endif
    std::memset(static_cast<void*>(p_), 0, bytes_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    swap(o);
    return *this;
  }
  ~Buffer() { std::free(p_); }

  T* data() noexcept { return p_; }
  const T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  T& operator[](std::size_t i) noexcept { return p_[i]; }
  const T& operator[](std::size_t i) const noexcept { return p_[i]; }

 private:
  void swap(Buffer& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(bytes_, o.bytes_);
  }
  T* p_ = nullptr;
  std::size_t n_ = 0, bytes_ = 0;
};

// ---- deterministic inputs ---------------------------------------------------------------------

/// splitmix64: fast, seedable, identical on every platform (std:: distributions are not).
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  std::uint64_t next() noexcept {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

/// Uniform values in [lo, hi] (log-probabilities: the default [-10, 0]).
template <class T>
void fill_logp(T* x, std::int64_t n, std::uint64_t seed, double lo = -10.0, double hi = 0.0) {
  Rng r(seed);
  for (std::int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(lo + (hi - lo) * r.uniform());
}

/// A mask with each token kept with probability `keep` (default 0.8). Byte masks hold 0/1;
/// float/double masks hold a weight in [0.5, 1.5) where kept and 0 elsewhere.
template <class M>
void fill_mask(M* m, std::int64_t n, std::uint64_t seed, double keep = 0.8) {
  Rng r(seed);
  for (std::int64_t i = 0; i < n; ++i) {
    const bool k = r.uniform() < keep;
    if constexpr (std::is_floating_point_v<M>) {
      m[i] = k ? static_cast<M>(0.5 + r.uniform()) : M(0);
    } else {
      m[i] = static_cast<M>(k ? 1 : 0);
    }
  }
}

/// x[i] = NaN wherever m[i] == 0 (padding as trainers hand it over; reductions must select).
template <class T, class M>
void poison_masked(T* x, const M* m, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (m[i] == M(0)) x[i] = std::numeric_limits<T>::quiet_NaN();
}

/// Log-probs in [-10, 0] plus an ~80% mask, NaN in the masked-out token slots.
template <class T, class M>
void fill_tokens(T* x, M* m, std::int64_t n, std::uint64_t seed) {
  fill_logp(x, n, seed);
  fill_mask(m, n, seed + 0x51ED);
  poison_masked(x, m, n);
}

/// Row-major [batch, tokens] and [batch] views over Buffers, as the prefloss API takes them.
template <class T>
using TokenMap = Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>>;
template <class T>
using SeqMap = Eigen::TensorMap<Eigen::Tensor<T, 1>>;

/// A [batch, total / batch] token tensor with its mask, filled by fill_tokens (NaN padding).
template <class S, class M>
struct TokenBatch {
  std::int64_t batch, tokens;
  Buffer<S> x;
  Buffer<M> mask;
  TokenBatch(std::int64_t batch_, std::int64_t total, std::uint64_t seed)
      : batch(batch_), tokens(total / batch_), x(total), mask(total) {
    fill_tokens(x.data(), mask.data(), total, seed);
  }
  TokenMap<const S> values() const { return {x.data(), batch, tokens}; }
  TokenMap<const M> masks() const { return {mask.data(), batch, tokens}; }
};

// ---- sizes ------------------------------------------------------------------------------------

/// Element counts [lo, hi]: powers of 4 from the first >= lo (1e3 -> 1024: 4 KiB of floats, L1)
/// up to hi, then hi itself if it is not a power of 4 (1e7, 1e8: the DRAM end). hi is capped by
/// --prefloss_max_elems / --prefloss_quick; hi = 0 means "up to --prefloss_max_elems" (1e8 by
/// default; raise it, e.g. to 268435456, to push token rows well past a large L3).
struct SizeRange {
  std::int64_t lo, hi;
};
inline constexpr SizeRange kMathSizes{1'000, 10'000'000};
inline constexpr SizeRange kTokenSizes{1'000, 0};

inline std::vector<std::int64_t> sizes(SizeRange r, std::int64_t multiple = 1) {
  const std::int64_t hi = r.hi > 0 ? std::min(r.hi, options().max_elems) : options().max_elems;
  std::vector<std::int64_t> out;
  std::int64_t p = 1;
  while (p < r.lo) p *= 4;
  for (; p <= hi; p *= 4)
    if (p % multiple == 0) out.push_back(p);
  if (hi >= r.lo && (out.empty() || out.back() != hi) && hi % multiple == 0) out.push_back(hi);
  return out;
}

/// Adds the ladder to b: ->RangeMultiplier(4)->Range(..) for the powers of 4, ->Arg(hi) for the end.
/// `multiple`: every size must be divisible by it (e.g. the batch of a [batch, tokens] shape).
inline benchmark::internal::Benchmark* apply_sizes(benchmark::internal::Benchmark* b, SizeRange r,
                                                   std::int64_t multiple = 1) {
  const auto s = sizes(r, multiple);
  if (s.empty()) return b;
  const auto is_pow4 = [](std::int64_t v) {
    return (v & (v - 1)) == 0 && __builtin_ctzll(static_cast<unsigned long long>(v)) % 2 == 0;
  };
  // The common case, a gapless run of powers of 4 (plus an end point): RangeMultiplier + Range.
  std::size_t k = 0;
  while (k + 1 < s.size() && is_pow4(s[k]) && s[k + 1] == 4 * s[k]) ++k;
  if (is_pow4(s[0]) && k > 0 && (k + 1 == s.size() || !is_pow4(s[k + 1]))) {
    b->RangeMultiplier(4)->Range(s[0], s[k]);
    ++k;
  } else {
    k = 0;
  }
  for (; k < s.size(); ++k) b->Arg(s[k]);
  return b;
}

// ---- roofline and counters --------------------------------------------------------------------

/// Streaming-read bandwidth (bytes/s) of this binary on this machine; set in main().
inline double& stream_bytes_per_second() {
  static double v = 0;
  return v;
}

/// Sum of n floats: the fastest read loop we found, i.e. the ceiling for anything that must read
/// its input once. Four sections of the array are read concurrently (four hardware-prefetch
/// streams, as a kernel reading tokens + mask + ... has; on this machine that is ~7% faster than
/// one front-to-back stream), each with two independent SIMD accumulators.
__attribute__((noinline)) inline float stream_read_sum(const float* p, std::size_t n) noexcept {
  using B = xsimd::batch<float>;
  constexpr std::size_t w = B::size, streams = 4;
  const std::size_t chunk = n / streams / (2 * w) * (2 * w);
  const float *p0 = p, *p1 = p + chunk, *p2 = p + 2 * chunk, *p3 = p + 3 * chunk;
  B a0(0.f), a1(0.f), a2(0.f), a3(0.f), a4(0.f), a5(0.f), a6(0.f), a7(0.f);
  for (std::size_t i = 0; i < chunk; i += 2 * w) {
    a0 += B::load_unaligned(p0 + i);
    a1 += B::load_unaligned(p0 + i + w);
    a2 += B::load_unaligned(p1 + i);
    a3 += B::load_unaligned(p1 + i + w);
    a4 += B::load_unaligned(p2 + i);
    a5 += B::load_unaligned(p2 + i + w);
    a6 += B::load_unaligned(p3 + i);
    a7 += B::load_unaligned(p3 + i + w);
  }
  float s = xsimd::hadd(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)));
  for (std::size_t i = streams * chunk; i < n; ++i) s += p[i];
  return s;
}

/// CPU time of the calling thread, in seconds. Every timing here is single-threaded CPU time,
/// which, unlike wall time, does not count the slices another process runs on our core (the
/// machine this was written on is shared with concurrent compiles).
inline double thread_seconds() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

/// Best-of-`reps` streaming-read bandwidth over a `bytes` buffer, in bytes/s.
inline double measure_stream_read(std::size_t bytes, int reps) {
  const std::int64_t n = static_cast<std::int64_t>(bytes / sizeof(float));
  Buffer<float> buf(n);
  fill_logp(buf.data(), n, 1);
  float sink = stream_read_sum(buf.data(), buf.size());  // warm-up: TLB, prefetchers, clocks
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_seconds();
    sink += stream_read_sum(buf.data(), buf.size());
    const double t1 = thread_seconds();
    best = std::max(best, static_cast<double>(n) * sizeof(float) / (t1 - t0));
  }
  benchmark::DoNotOptimize(sink);
  return best;
}

/// The counters every row reports, all per second of the row's time:
///   bytes     bytes that must move per iteration (each input read once, each output written once)
///   tokens    elements processed per iteration
///   roofline  achieved bytes/s / stream_bytes_per_second() (1.0 = as fast as a pure read loop)
inline void set_counters(benchmark::State& st, double bytes, double tokens) {
  using C = benchmark::Counter;
  st.counters["bytes"] = C(bytes, C::kIsIterationInvariantRate);
  st.counters["tokens"] = C(tokens, C::kIsIterationInvariantRate);
  const double bw = stream_bytes_per_second();
  if (bw > 0) st.counters["roofline"] = C(bytes / bw, C::kIsIterationInvariantRate);
}

/// BM_stream_read: the roofline loop as an ordinary row (its roofline column is ~1 by construction;
/// a value well below 1 means the machine was busier now than at calibration).
inline void BM_stream_read(benchmark::State& st) {
  const std::int64_t n = st.range(0);
  Buffer<float> buf(n);
  fill_logp(buf.data(), n, 1);
  for (auto _ : st) {
    float s = stream_read_sum(buf.data(), buf.size());
    benchmark::DoNotOptimize(s);
  }
  set_counters(st, static_cast<double>(n) * sizeof(float), static_cast<double>(n));
}

// ---- registration -----------------------------------------------------------------------------

using Registrar = void (*)();
inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> r;
  return r;
}
struct AutoRegister {
  explicit AutoRegister(Registrar r) { registrars().push_back(r); }
};

/// Registers one benchmark family: name "<kernel>/<variant>", one row per size of `r`
/// (divisible by `multiple`), times in microseconds. Rates (the counters) are per second of CPU
/// time, Google Benchmark's default, which excludes time the thread spent preempted; the
/// kernels are single-threaded, so on an idle machine CPU time and wall time agree.
template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, Fn&& fn, SizeRange r, std::int64_t multiple = 1) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn));
  b->Unit(benchmark::kMicrosecond);
  return apply_sizes(b, r, multiple);
}

// ---- display ----------------------------------------------------------------------------------

/// Console output with the roofline shown as a plain fraction (Google Benchmark appends "/s" to
/// every rate counter) and an ns/token column. JSON/CSV output is left to the library.
class ConsoleReporter : public benchmark::ConsoleReporter {
 public:
  using benchmark::ConsoleReporter::ConsoleReporter;
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> fixed = runs;
    for (auto& r : fixed) {
      auto it = r.counters.find("roofline");
      if (it != r.counters.end()) it->second.flags = benchmark::Counter::kDefaults;
      auto tok = r.counters.find("tokens");
      const bool rate_like =
          r.run_type == Run::RT_Iteration || r.aggregate_name == "mean" || r.aggregate_name == "median";
      if (tok != r.counters.end())  // (NaN for stddev/cv rows, whose "tokens" is not a rate)
        r.counters["ns/token"] = benchmark::Counter(
            rate_like && tok->second.value > 0 ? 1e9 / tok->second.value : std::numeric_limits<double>::quiet_NaN());
    }
    benchmark::ConsoleReporter::ReportRuns(fixed);
  }
};

// ---- main -------------------------------------------------------------------------------------

namespace detail {
inline bool take_flag(const char* arg, const char* name, std::string* value) {
  const std::size_t k = std::strlen(name);
  if (std::strncmp(arg, name, k) != 0) return false;
  if (arg[k] == '\0') {
    *value = "1";
    return true;
  }
  if (arg[k] != '=') return false;
  *value = arg + k + 1;
  return true;
}
inline const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}
}  // namespace detail

/// The body of main(): parses the --prefloss_* flags, registers BM_stream_read and every
/// PREFLOSS_BENCH_REGISTER block, measures the roofline, runs the selected benchmarks.
inline int run_main(int argc, char** argv) {
  Options& o = options();
  if (const char* v = detail::env("PREFLOSS_BENCH_QUICK"); v && std::strcmp(v, "0") != 0) o.max_elems = kQuickMaxElems;
  if (const char* v = detail::env("PREFLOSS_BENCH_MAX_ELEMS")) o.max_elems = std::atoll(v);
  if (const char* v = detail::env("PREFLOSS_BENCH_STREAM_MIB")) o.stream_bytes = std::size_t(std::atoll(v)) << 20;
  if (const char* v = detail::env("PREFLOSS_BENCH_STREAM_GBPS")) o.stream_gbps = std::atof(v);

  bool list_only = false, console = true;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (detail::take_flag(argv[i], "--prefloss_quick", &v)) {
      if (v != "0" && v != "false") o.max_elems = kQuickMaxElems;
    } else if (detail::take_flag(argv[i], "--prefloss_max_elems", &v)) {
      o.max_elems = std::atoll(v.c_str());
    } else if (detail::take_flag(argv[i], "--prefloss_stream_mib", &v)) {
      o.stream_bytes = std::size_t(std::atoll(v.c_str())) << 20;
    } else if (detail::take_flag(argv[i], "--prefloss_stream_gbps", &v)) {
      o.stream_gbps = std::atof(v.c_str());
    } else {
      if (std::strncmp(argv[i], "--benchmark_list_tests", 22) == 0 &&
          std::strcmp(argv[i], "--benchmark_list_tests=false") != 0)
        list_only = true;
      if (std::strncmp(argv[i], "--benchmark_format=", 19) == 0 && std::strcmp(argv[i] + 19, "console") != 0)
        console = false;
      if (std::strcmp(argv[i], "--help") == 0)
        std::printf(
            "prefloss bench flags:\n"
            "  [--prefloss_quick]            sizes up to %lld elements (env PREFLOSS_BENCH_QUICK=1)\n"
            "  [--prefloss_max_elems=N]      largest token row, default 1e8 (env PREFLOSS_BENCH_MAX_ELEMS)\n"
            "  [--prefloss_stream_mib=N]     roofline buffer, default 1024 (env PREFLOSS_BENCH_STREAM_MIB)\n"
            "  [--prefloss_stream_gbps=X]    use X GB/s as the roofline (env PREFLOSS_BENCH_STREAM_GBPS)\n\n",
            static_cast<long long>(kQuickMaxElems));
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  argv[argc] = nullptr;

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const auto stream_n = static_cast<std::int64_t>(o.stream_bytes / sizeof(float));
  benchmark::RegisterBenchmark("stream_read/f32", BM_stream_read)->Arg(stream_n)->Unit(benchmark::kMicrosecond);
  for (Registrar r : registrars()) r();

  if (!list_only) {
    double bw = o.stream_gbps > 0 ? o.stream_gbps * 1e9 : measure_stream_read(o.stream_bytes, o.stream_reps);
    stream_bytes_per_second() = bw;
    benchmark::AddCustomContext("prefloss_stream_read_bytes_per_second", std::to_string(bw));
    benchmark::AddCustomContext("prefloss_stream_read_buffer_bytes", std::to_string(o.stream_bytes));
    benchmark::AddCustomContext("prefloss_stream_read_source", o.stream_gbps > 0 ? "given" : "measured at startup");
    benchmark::AddCustomContext("prefloss_max_elems", std::to_string(o.max_elems));
    std::fprintf(stderr, "prefloss roofline: streaming read %.2f GB/s (%s, %zu MiB buffer, best of %d, CPU time)\n",
                 bw / 1e9, o.stream_gbps > 0 ? "given" : "measured", o.stream_bytes >> 20, o.stream_reps);
  }

  if (console) {
    ConsoleReporter rep(isatty(fileno(stdout)) ? benchmark::ConsoleReporter::OO_ColorTabular
                                               : benchmark::ConsoleReporter::OO_Tabular);
    benchmark::RunSpecifiedBenchmarks(&rep);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}

}  // namespace prefloss::bench

/// Registers benchmarks once the size flags are known: PREFLOSS_BENCH_REGISTER(f) { pb::add(...); }
#define PREFLOSS_BENCH_REGISTER(fn)                                     \
  static void fn();                                                     \
  static const ::prefloss::bench::AutoRegister fn##_auto_register_(fn); \
  static void fn()

/// Replaces BENCHMARK_MAIN(): one per bench file.
#define PREFLOSS_BENCH_MAIN() \
  int main(int argc, char** argv) { return ::prefloss::bench::run_main(argc, argv); }
