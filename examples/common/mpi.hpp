// Data parallelism over MPI for the examples: the MPI session, typed sums over every rank
// (MPI_Allreduce with MPI_SUM, the datatype taken from the C++ type), prefloss's count structs
// summed field by field, and contiguous shards of a batch. Only mpi_data_parallel includes it,
// and only that example links MPI.
#pragma once
#include <mpi.h>
#include <prefloss/prefloss.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace examples {

/// The MPI datatype of a C++ arithmetic type.
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return MPI_INT64_T;
  } else if constexpr (std::is_same_v<T, int>) {
    return MPI_INT;
  } else {
    static_assert(sizeof(T) == 0, "mpi_type: no MPI datatype for this type");
  }
}

/// @brief MPI_COMM_WORLD for the lifetime of the object: MPI_Init in the constructor,
/// MPI_Finalize in the destructor (and at exit, when the program leaves through std::exit, as
/// parse_args does for --help). Collectives abort the whole job on error (MPI's default handler).
class World {
 public:
  World(int& argc, char**& argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    std::atexit(finalize);
  }
  ~World() { finalize(); }
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool root() const { return rank_ == 0; }

  /// Sums n values over every rank, in place (MPI_Allreduce, MPI_SUM): every rank gets the sum.
  template <class T>
  void sum_in_place(T* data, std::size_t n) const {
    MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), mpi_type<T>(), MPI_SUM, MPI_COMM_WORLD);
  }
  template <class T>
  void sum_in_place(std::vector<T>& v) const {
    sum_in_place(v.data(), v.size());
  }
  /// The sum of v over every rank.
  template <class T>
  T sum(T v) const {
    sum_in_place(&v, 1);
    return v;
  }

  /// The sizes of every rank's token batch: the integers as MPI_INT64_T (exact), the weight as
  /// MPI_DOUBLE.
  prefloss::TokenCounts sum(prefloss::TokenCounts c) const {
    std::int64_t n[3] = {c.tokens, c.nonempty_rows, c.rows};
    sum_in_place(n, 3);
    c.tokens = n[0];
    c.nonempty_rows = n[1];
    c.rows = n[2];
    c.weight = sum(c.weight);
    return c;
  }
  /// KTO's reference-point sums over every rank's KL completions.
  prefloss::KtoReferenceSums sum(prefloss::KtoReferenceSums s) const {
    s.sum = sum(s.sum);
    s.count = sum(s.count);
    return s;
  }

  /// True on every rank when `ok` is true on every rank (a collective error flag).
  bool all(bool ok) const {
    int v = ok ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return v == 1;
  }

  /// True on every rank when every rank holds the same bits in `v` as rank 0.
  template <class T>
  bool same_everywhere(const std::vector<T>& v) const {
    std::vector<T> root_copy(v);
    MPI_Bcast(root_copy.data(), static_cast<int>(root_copy.size()), mpi_type<T>(), 0, MPI_COMM_WORLD);
    return all(std::memcmp(root_copy.data(), v.data(), v.size() * sizeof(T)) == 0);
  }

  /// Ends every rank's process with `code` (for an error one rank cannot recover from).
  [[noreturn]] static void abort(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);
  }

 private:
  static void finalize() {
    int done = 0;
    MPI_Finalized(&done);
    if (!done) MPI_Finalize();
  }
  int rank_ = 0, size_ = 1;
};

/// Rows [begin, end) of a batch.
struct Range {
  Eigen::Index begin = 0, end = 0;
  Eigen::Index size() const { return end - begin; }
};

/// @brief Rank `rank`'s contiguous shard of `rows` rows over `ranks` ranks, deliberately uneven:
/// rank r gets a share proportional to r + 1 (1:2 for two ranks, 1:2:3 for three), as a
/// data-parallel batch of variable-length sequences splits by tokens, not by rows.
inline Range uneven_shard(Eigen::Index rows, int rank, int ranks) {
  const auto cut = [&](int r) {  // rows of ranks [0, r): rows * r (r + 1) / (ranks (ranks + 1))
    const long long total = static_cast<long long>(ranks) * (ranks + 1);
    return static_cast<Eigen::Index>(static_cast<long long>(rows) * r * (r + 1) / total);
  };
  return Range{cut(rank), cut(rank + 1)};
}

/// Part k of n of a range, as even as possible (the micro-batches of gradient accumulation).
inline Range part(Range r, int k, int n) {
  const auto at = [&](int j) { return r.begin + r.size() * j / n; };
  return Range{at(k), at(k + 1)};
}

}  // namespace examples
