// With caller-provided outputs, dpo and kto (forward + backward) allocate only [batch]-sized
// bookkeeping: the heap traffic at T = 64 and T = 65536 tokens per row must be identical.
//
// Global operator new/delete are replaced to count calls and bytes. Eigen::Tensor storage comes
// from std::malloc, not operator new, so on glibc malloc and friends are interposed as well
// (forwarding to glibc's __libc_* entry points). AddressSanitizer owns operator new and malloc
// itself and its replacements cannot be stacked with ours, so under ASan this test is compiled
// out (the default and UBSan builds run it).
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PREFLOSS_ALLOC_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define PREFLOSS_ALLOC_TEST_ASAN 1
#endif

#if defined(PREFLOSS_ALLOC_TEST_ASAN)

TEST_CASE("alloc: skipped under AddressSanitizer (it replaces operator new and malloc)", "[alloc]") {
  WARN("test_alloc is compiled out under ASan: ASan's allocator replaces the counting hooks");
  SUCCEED();
}

#else

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace {

struct Counter {
  std::atomic<long> calls{0}, bytes{0};
  void add(std::size_t n) {
    calls.fetch_add(1, std::memory_order_relaxed);
    bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  }
};
Counter g_new, g_malloc;
std::atomic<bool> g_on{false};

inline void note(Counter& c, std::size_t n) {
  if (g_on.load(std::memory_order_relaxed)) c.add(n);
}

}  // namespace

#if defined(__GLIBC__)
#define PREFLOSS_ALLOC_TEST_MALLOC 1
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);

void* malloc(std::size_t n) {
  note(g_malloc, n);
  return __libc_malloc(n);
}
void* calloc(std::size_t k, std::size_t n) {
  note(g_malloc, k * n);
  return __libc_calloc(k, n);
}
void* realloc(void* p, std::size_t n) {
  note(g_malloc, n);
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  note(g_malloc, n);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  note(g_malloc, n);
  void* p = __libc_memalign(a, n);
  if (!p) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}
#endif

// operator new counts on its own (it also reaches malloc, which counts separately).
void* operator new(std::size_t n) {
  note(g_new, n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  note(g_new, n);
  return std::malloc(n == 0 ? 1 : n);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Tensor<T, 1>;

struct Traffic {
  long new_calls = 0, new_bytes = 0, malloc_calls = 0, malloc_bytes = 0;
};

/// Runs f with the counters on and returns what it allocated.
template <class F>
Traffic measure(F&& f) {
  g_new.calls = g_new.bytes = 0;
  g_malloc.calls = g_malloc.bytes = 0;
  g_on = true;
  f();
  g_on = false;
  return {g_new.calls, g_new.bytes, g_malloc.calls, g_malloc.bytes};
}

/// Inputs of one dpo / kto call with T tokens per row (allocated before counting starts).
template <class S>
struct Inputs {
  static constexpr long B = 8;
  long T;
  Tok<S> c, r, gc, gr, kl;
  Tok<std::uint8_t> mc, mr, mk;
  Vec<S> rc, rr, klr;
  Vec<std::uint8_t> d;
  explicit Inputs(long t)
      : T(t), c(B, t), r(B, t), gc(B, t), gr(B, t), kl(B / 2, t), mc(B, t), mr(B, t), mk(B / 2, t), rc(B), rr(B),
        klr(B / 2), d(B) {
    c.setConstant(S(-1.0));
    r.setConstant(S(-1.25));
    kl.setConstant(S(-0.5));
    mc.setConstant(1);
    mr.setConstant(1);
    mk.setConstant(1);
    mr.chip(0, 0).setConstant(0);  // an empty row too
    rc.setConstant(S(-0.9) * static_cast<S>(t));
    rr.setConstant(S(-1.3) * static_cast<S>(t));
    klr.setConstant(S(-0.6) * static_cast<S>(t));
    for (long i = 0; i < B; ++i) d(i) = static_cast<std::uint8_t>(i % 3 != 0);
  }
};

template <class S>
Traffic dpo_traffic(long T) {
  Inputs<S> in(T);
  pl::DpoOptions o;
  o.label_smoothing = 0.1;
  double loss = 0;
  const Traffic t = measure([&] {
    const auto res = pl::dpo(pl::masked_sum(in.c, in.mc), pl::masked_sum(in.r, in.mr), in.rc, in.rr, o);
    res.backward(in.gc, in.gr);
    loss = static_cast<double>(res.loss);
  });
  CHECK(std::isfinite(loss));
  return t;
}

template <class S>
Traffic kto_traffic(long T, bool given) {
  Inputs<S> in(T);
  pl::KtoOptions o;
  if (given) o.reference_point = 0.25;
  double loss = 0;
  const Traffic t = measure([&] {
    const auto res = pl::kto(pl::masked_sum(in.c, in.mc), in.rc, in.d, pl::masked_sum(in.kl, in.mk), in.klr, o);
    res.backward(in.gc);
    loss = static_cast<double>(res.loss);
  });
  CHECK(std::isfinite(loss));
  return t;
}

void same_traffic(const Traffic& small, const Traffic& large) {
  INFO("T=64: new " << small.new_calls << " calls / " << small.new_bytes << " B, malloc " << small.malloc_calls
                    << " calls / " << small.malloc_bytes << " B;  T=65536: new " << large.new_calls << " / "
                    << large.new_bytes << " B, malloc " << large.malloc_calls << " / " << large.malloc_bytes << " B");
  CHECK(small.new_calls == large.new_calls);
  CHECK(small.new_bytes == large.new_bytes);
  CHECK(small.malloc_calls == large.malloc_calls);
  CHECK(small.malloc_bytes == large.malloc_bytes);
  // The hooks are live: the result's [batch] bookkeeping is seen.
  CHECK(small.new_calls + small.malloc_calls > 0);
  // And that bookkeeping is small: far below one [batch, 64] token tensor's worth per input.
  CHECK(small.new_bytes < 8 * 64 * 8);
}

}  // namespace

TEST_CASE("alloc: dpo forward + backward allocates independently of the token count", "[alloc][dpo]") {
  same_traffic(dpo_traffic<float>(64), dpo_traffic<float>(65536));
  same_traffic(dpo_traffic<double>(64), dpo_traffic<double>(65536));
}

TEST_CASE("alloc: kto forward + backward allocates independently of the token count", "[alloc][kto]") {
  for (const bool given : {false, true}) {
    same_traffic(kto_traffic<float>(64, given), kto_traffic<float>(65536, given));
    same_traffic(kto_traffic<double>(64, given), kto_traffic<double>(65536, given));
  }
}

TEST_CASE("alloc: the counters see a token-sized allocation", "[alloc]") {
  // Guard against a silently dead hook: an Eigen tensor of T tokens must be counted.
  const Traffic t = measure([] {
    Tok<float> x(8, 4096);
    x.setZero();
  });
#if defined(PREFLOSS_ALLOC_TEST_MALLOC)
  CHECK(t.malloc_bytes >= 8 * 4096 * static_cast<long>(sizeof(float)));
#else
  WARN("malloc is not interposed on this platform: only operator new is counted");
  (void)t;
#endif
}

#endif  // PREFLOSS_ALLOC_TEST_ASAN
