/// @file thread_pool.hpp
/// A thread pool for prefloss::Threads: Eigen's non-blocking pool (Eigen/CXX11/ThreadPool), the
/// one Eigen's own tensor contractions use, so prefloss adds no threading code of its own beyond
/// handing rows out. Not part of prefloss.hpp: only a program that wants threads pays for the
/// thread headers (and, on a libc older than glibc 2.34, links -pthread: Threads::Threads).
#pragma once

#include <memory>
#include <string>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "detail/eigen.hpp"
#include "errors.hpp"
#include "parallel.hpp"

namespace prefloss {

namespace detail {
/// Threads::RunFn over an Eigen pool: the caller takes blocks too, so a pool of n workers runs
/// a call on n + 1 threads.
inline void run_on_eigen_pool(void* p, Index blocks, Threads::BlockFn block, const void* body) {
  auto& pool = *static_cast<Eigen::ThreadPoolInterface*>(p);
  BlockQueue queue{{0}, blocks, block, body};
  // A worker of this pool waiting below would hold a thread its helpers may need.
  const Index workers = pool.CurrentThreadId() == -1 ? static_cast<Index>(pool.NumThreads()) : 0;
  const Index helpers = workers < blocks - 1 ? workers : blocks - 1;
  Eigen::Barrier done(static_cast<unsigned>(helpers));
  for (Index k = 0; k < helpers; ++k)
    pool.Schedule([&queue, &done] {
      queue.drain();
      done.Notify();
    });
  queue.drain();
  done.Wait();
}
}  // namespace detail

/// @brief A Threads handle over an Eigen pool the program already has (for instance the one it
/// gives Eigen::ThreadPoolDevice): calls use its NumThreads() workers plus the calling thread.
/// The pool must outlive every call and result that holds the handle.
inline Threads threads_of(Eigen::ThreadPoolInterface& pool) noexcept {
  return Threads(&pool, pool.NumThreads() + 1, &detail::run_on_eigen_pool);
}

/// @brief A pool of worker threads for prefloss calls: `ThreadPool pool(2)` lets a call run on
/// two threads, the caller and one worker. Converts to the Threads handle the options take:
/// `opt.threads = pool;`. Not copyable or movable (the handles point at it).
class ThreadPool {
 public:
  /// @param threads threads a call may use, the calling thread included (>= 1; 1 starts no
  /// worker). std::thread::hardware_concurrency() is the usual choice.
  /// @throws option_error for threads < 1.
  explicit ThreadPool(int threads) : threads_(threads) {
    if (threads < 1)
      throw option_error("ThreadPool: argument 'threads' must be >= 1 (the calling thread counts), got " +
                         std::to_string(threads));
    if (threads > 1) pool_ = std::make_unique<Eigen::ThreadPool>(threads - 1);
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Threads a call may use, the caller included.
  int size() const noexcept { return threads_; }

  /// The handle for options and eval/backward calls.
  Threads threads() noexcept { return pool_ ? threads_of(*pool_) : Threads{}; }
  operator Threads() noexcept { return threads(); }

 private:
  int threads_;
  std::unique_ptr<Eigen::ThreadPool> pool_;
};

}  // namespace prefloss
