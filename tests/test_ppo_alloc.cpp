// Heap allocations of ppo_clip / value_loss with caller-provided outputs must not grow with the
// number of tokens: every heap allocation is counted around the calls, T = 64 vs T = 65536.
#include <prefloss/prefloss.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

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
  long forward_backward, fused, value, bytes;
};

Counts count_for(long T) {
  const long B = 4;
  Tok<float> lp(B, T), old(B, T), adv(B, T), ref(B, T), g(B, T);
  Tok<std::uint8_t> m(B, T);
  lp.setConstant(-1.f);
  old.setConstant(-1.1f);
  adv.setConstant(0.5f);
  ref.setConstant(-0.9f);
  m.setConstant(1);
  pl::PpoOptions o;
  o.kl_coef = 0.1;
  o.dual_clip = 3;
  Counts c{};
  g_bytes = 0;
  g_allocs = 0;
  g_counting = true;
  {
    const auto r = pl::ppo_clip(lp, old, adv, m, ref, o);
    r.backward(g);
  }
  g_counting = false;
  c.forward_backward = g_allocs;
  g_allocs = 0;
  g_counting = true;
  { pl::ppo_clip(lp, old, adv, m, ref, o, g); }
  g_counting = false;
  c.fused = g_allocs;
  g_allocs = 0;
  g_counting = true;
  { pl::value_loss(lp, old, adv, m, pl::ValueOptions{}, g); }
  g_counting = false;
  c.value = g_allocs;
  c.bytes = g_bytes;
  return c;
}

}  // namespace

TEST_CASE("ppo_clip and value_loss allocate independently of the token count", "[ppo][alloc]") {
  const Counts small = count_for(64);
  const Counts large = count_for(65536);
  CHECK(small.forward_backward == large.forward_backward);
  CHECK(small.fused == large.fused);
  CHECK(small.value == large.value);
  CHECK(small.bytes == large.bytes);
  // Something is counted at all (the [batch] bookkeeping), so the hook is live.
  CHECK(small.forward_backward > 0);
}
