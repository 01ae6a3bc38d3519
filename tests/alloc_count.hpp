// The one heap-counting harness of the test suite: include it in exactly one translation unit of a
// test executable (it defines the allocation functions), then alloc_count::measure(f) returns the
// heap allocations f made.
//
// Every heap byte must be seen, Eigen::Tensor storage included, which comes from std::malloc, not
// operator new. Under AddressSanitizer (which owns malloc and operator new) through its allocation
// hooks; elsewhere on glibc by interposing malloc and friends (forwarding to glibc's __libc_* entry
// points), with operator new reaching them through std::malloc; and where neither is available
// through a replaced operator new alone (counts_malloc is then false).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace alloc_count {

/// Allocation calls and requested bytes.
struct Traffic {
  long calls = 0, bytes = 0;
};

namespace detail {
inline std::atomic<long> calls{0}, bytes{0};
inline std::atomic<bool> on{false};
inline void note(std::size_t n) noexcept {
  if (on.load(std::memory_order_relaxed)) {
    calls.fetch_add(1, std::memory_order_relaxed);
    bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  }
}
}  // namespace detail

/// Runs f with the counters on and returns what it allocated.
template <class F>
Traffic measure(F&& f) {
  detail::calls = 0;
  detail::bytes = 0;
  detail::on = true;
  f();
  detail::on = false;
  return {detail::calls.load(), detail::bytes.load()};
}

}  // namespace alloc_count

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ALLOC_COUNT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ALLOC_COUNT_ASAN 1
#endif

#if defined(ALLOC_COUNT_ASAN)
// From <sanitizer/allocator_interface.h> (not always installed), part of the sanitizer runtime ABI.
extern "C" int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void*, std::size_t),
                                                         void (*free_hook)(const volatile void*));
namespace alloc_count {
inline constexpr bool counts_malloc = true;
namespace detail {
inline void on_malloc(const volatile void*, std::size_t n) { note(n); }
inline void on_free(const volatile void*) {}
[[maybe_unused]] inline const int hooks_installed = __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}  // namespace detail
}  // namespace alloc_count

#else

#if defined(__GLIBC__)
namespace alloc_count {
inline constexpr bool counts_malloc = true;
}
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);

void* malloc(std::size_t n) {
  alloc_count::detail::note(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t k, std::size_t n) {
  alloc_count::detail::note(k * n);
  return __libc_calloc(k, n);
}
void* realloc(void* p, std::size_t n) {
  alloc_count::detail::note(n);
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  alloc_count::detail::note(n);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  alloc_count::detail::note(n);
  void* p = __libc_memalign(a, n);
  if (!p) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}
#else
namespace alloc_count {
inline constexpr bool counts_malloc = false;
}
#endif

// Counted here only when malloc is not: otherwise the std::malloc below already counts it once.
void* operator new(std::size_t n) {
  if (!alloc_count::counts_malloc) alloc_count::detail::note(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (!alloc_count::counts_malloc) alloc_count::detail::note(n);
  return std::malloc(n == 0 ? 1 : n);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif
