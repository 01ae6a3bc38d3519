/// @file parallel.hpp
/// prefloss::Threads: the opt-in handle that lets a call split its rows over several threads.
/// This header names no thread library; prefloss/thread_pool.hpp provides a pool to hand out.
#pragma once

#include <atomic>
#include <cstddef>

#include "config.hpp"

namespace prefloss {

/// @brief Where a call may run its rows: this thread only (the default), or a thread pool.
///
/// Set it in a loss's options (`opt.threads = pool;` with a prefloss::ThreadPool from
/// prefloss/thread_pool.hpp) or pass it to masked_sum(...).eval / .backward. The call then splits
/// its rows into blocks that the calling thread and the pool's workers take in turn, and returns
/// when all are done. Every row's sums and gradient are computed by the same code whichever
/// thread runs it, and the rows' results are combined in row order on the calling thread, so a
/// result is the same bits for every thread count (and the same as without threads).
///
/// A handle does not own the pool: the pool must outlive every call, and every result whose
/// backward() may still run, that holds the handle. A default Threads never starts a thread
/// and involves no global state. Calls from inside one of the pool's own workers run serially
/// (a worker waiting for its own pool could otherwise wait forever).
class Threads {
 public:
  /// Runs `block(body, b)` for every block b in [0, blocks), in any order and on any of the
  /// pool's threads or the caller's, returning when all have run.
  using BlockFn = void (*)(const void* body, Index block);
  using RunFn = void (*)(void* pool, Index blocks, BlockFn block, const void* body);

  /// This thread only.
  constexpr Threads() noexcept = default;
  /// A pool of `count` threads (the caller included) that `run` schedules on; for pools
  /// (prefloss::ThreadPool, prefloss::threads_of).
  constexpr Threads(void* pool, int count, RunFn run) noexcept : pool_(pool), count_(count), run_(run) {}

  /// Threads a call may use, the caller included (1: this thread only).
  constexpr int count() const noexcept { return run_ != nullptr && count_ > 1 ? count_ : 1; }

  /// @brief Calls f(begin, end) over consecutive row ranges covering [0, rows), each at most
  /// `grain` rows (>= 1), concurrently when this handle has a pool. f must write only the rows
  /// it is given.
  template <class F>
  void for_rows(Index rows, Index grain, const F& f) const {
    if (rows <= 0) return;
    if (grain < 1) grain = 1;
    const Index blocks = (rows + grain - 1) / grain;
    if (count() == 1 || blocks == 1) {
      f(Index{0}, rows);
      return;
    }
    struct Body {
      const F* f;
      Index rows, grain;
    } body{&f, rows, grain};
    const BlockFn block = [](const void* p, Index b) {
      const Body& s = *static_cast<const Body*>(p);
      const Index begin = b * s.grain;
      const Index end = begin + s.grain < s.rows ? begin + s.grain : s.rows;
      (*s.f)(begin, end);
    };
    run_(pool_, blocks, block, &body);
  }

 private:
  void* pool_ = nullptr;
  int count_ = 1;
  RunFn run_ = nullptr;
};

namespace detail {

/// Rows a block should hold so that one block is about `tokens_per_block` tokens of work: small
/// blocks balance uneven rows, large ones keep the scheduling cost (a few microseconds a block)
/// out of sight.
inline Index row_grain(Index rows, Index tokens, Index tokens_per_block = Index{1} << 15) noexcept {
  if (rows <= 0 || tokens <= 0) return 1;
  const Index per_row = tokens / rows > 0 ? tokens / rows : 1;
  const Index g = tokens_per_block / per_row;
  return g > 0 ? g : 1;
}

/// The participants of a pooled run take blocks from one counter until none is left.
struct BlockQueue {
  std::atomic<Index> next{0};
  Index blocks;
  Threads::BlockFn block;
  const void* body;

  void drain() noexcept {
    for (Index b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed))
      block(body, b);
  }
};

}  // namespace detail
}  // namespace prefloss
