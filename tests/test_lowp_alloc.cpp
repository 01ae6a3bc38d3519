// Heap allocations of the bf16/half entry points with caller-provided outputs must not grow with
// the number of tokens (16-bit rows are converted through fixed-size stack buffers): every heap
// allocation is counted around the calls, T = 64 vs T = 65536. Same hooks as test_ppo_alloc.cpp.
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <prefloss/prefloss.hpp>

namespace {
std::atomic<long> g_allocs{0}, g_bytes{0};
std::atomic<bool> g_counting{false};
void note(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocs.fetch_add(1, std::memory_order_relaxed);
    g_bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  }
}
}  // namespace

// Eigen::Tensor storage comes from std::malloc, not operator new, so every heap byte must be
// seen: under AddressSanitizer through its allocation hooks (it owns malloc and operator new);
// otherwise by replacing operator new and, on glibc, interposing malloc as well.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PREFLOSS_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define PREFLOSS_TEST_ASAN 1
#endif

#if defined(PREFLOSS_TEST_ASAN)
// From <sanitizer/allocator_interface.h> (not always installed), part of the sanitizer runtime ABI.
extern "C" int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void*, std::size_t),
                                                         void (*free_hook)(const volatile void*));
namespace {
void on_malloc(const volatile void*, std::size_t n) { note(n); }
void on_free(const volatile void*) {}
[[maybe_unused]] const int hooks_installed = __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}  // namespace
#else
#if defined(__GLIBC__)
#define PREFLOSS_TEST_MALLOC_HOOK 1
extern "C" void* __libc_malloc(std::size_t);
extern "C" void* malloc(std::size_t n) {
  note(n);
  return __libc_malloc(n);
}
#endif

void* operator new(std::size_t n) {
#if !defined(PREFLOSS_TEST_MALLOC_HOOK)
  note(n);
#endif
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#endif

namespace pl = prefloss;
template <class T>
using Tok = Eigen::Tensor<T, 2, Eigen::RowMajor>;

namespace {

struct Counts {
  long allocs[6];
  long bytes;
};

template <class T>
Counts count_for(long T_) {
  const long B = 4;
  Tok<T> lp(B, T_), old(B, T_), g(B, T_), kl(B, T_);
  Tok<float> adv(B, T_), a32(B, T_), r32(B, T_);
  Tok<std::uint8_t> m(B, T_);
  lp.setConstant(T(-1.f));
  old.setConstant(T(-1.1f));
  adv.setConstant(0.5f);
  m.setConstant(1);
  Eigen::Tensor<float, 1> up(B);
  up.setConstant(0.5f);
  pl::PpoOptions o;
  o.kl_coef = 0.1;
  Counts c{};
  const auto count = [&](int k, auto&& f) {
    g_allocs = 0;
    g_counting = true;
    f();
    g_counting = false;
    c.allocs[k] = g_allocs;
  };
  g_bytes = 0;
  count(0, [&] { pl::masked_mean(lp, m).backward(up, g); });
  count(1, [&] {
    const auto r = pl::ppo_clip(lp, old, adv, m, old, o);
    r.backward(g);
  });
  count(2, [&] { pl::ppo_clip(lp, old, adv, m, old, o, g); });
  count(3, [&] { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g); });
  count(4, [&] { pl::kl_estimate(lp, old, m, pl::KlOptions{}, kl, g); });
  count(5, [&] { pl::gae(lp, adv, m, pl::GaeOptions{}, a32, r32); });
  c.bytes = g_bytes;
  return c;
}

template <class T>
void same_counts() {
  const Counts small = count_for<T>(64);
  const Counts large = count_for<T>(65536);
  for (int k = 0; k < 6; ++k) {
    CAPTURE(k);
    CHECK(small.allocs[k] == large.allocs[k]);
  }
  CHECK(small.bytes == large.bytes);
  // The [batch] bookkeeping of the token losses is counted, so the hook is live.
  CHECK(small.allocs[1] > 0);
}

}  // namespace

TEST_CASE("bf16/half entry points allocate independently of the token count", "[lowp][alloc]") {
  same_counts<Eigen::bfloat16>();
  same_counts<Eigen::half>();
}
