// Deterministic random numbers for the examples: the same seed gives the same run with any
// compiler and standard library (std::normal_distribution and std::discrete_distribution are
// implementation-defined, so they are not used).
#pragma once
#include <prefloss/prefloss.hpp>

#include <cmath>
#include <cstdint>

namespace examples {

/// xoshiro256** seeded through splitmix64.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) {
    for (auto& s : s_) {
      seed += 0x9e3779b97f4a7c15ULL;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      s = z ^ (z >> 31);
    }
  }

  std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform in [0, 1).
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// Uniform integer in [0, n).
  int below(int n) noexcept { return static_cast<int>(uniform() * n); }

  /// Standard normal (Box-Muller).
  double normal() noexcept {
    const double u1 = 1.0 - uniform();  // (0, 1]
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  /// Index drawn from probabilities p[0..n) (summing to ~1) by inverse CDF.
  template <class T>
  int categorical(const T* p, int n) noexcept {
    double u = uniform(), acc = 0;
    for (int k = 0; k < n; ++k) {
      acc += static_cast<double>(p[k]);
      if (u < acc) return k;
    }
    return n - 1;
  }

  /// A new generator for an independent stream (e.g. one per method from one seed).
  Rng split() noexcept { return Rng(next()); }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

}  // namespace examples
