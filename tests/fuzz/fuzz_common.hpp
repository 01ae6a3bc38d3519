// What the prefloss libFuzzer harnesses share: a deterministic decoder from the fuzzer's bytes
// to shapes, values, masks, options and buffer offsets; buffers that hand out (often misaligned)
// Eigen::TensorMaps and notice stray writes; and the one checker every call goes through.
//
// Invariants; a violation prints what and why to stderr and traps:
// - a call returns or throws a prefloss::error; any other exception is a finding;
// - a call that throws leaves every byte of every output as it was;
// - nothing is written before the start of an output (ASan sees writes past the end: each
//   buffer is an allocation of exactly the bytes it maps, after its leading offset);
// - masked-out tokens never matter: the call repeated with every masked-out token replaced by
//   NaN, +-inf or random bits returns, writes and throws the same (bitwise, NaN == NaN);
// - a tame call (token values finite, negative and at least -88; weights 0, 1/2, 1, 2; options
//   finite and at most 20 in magnitude) has no NaN in any output: NaN may only come from NaN,
//   inf or overflow in the inputs.
#pragma once

#include <cstddef>

// prefloss compares an output's size with PREFLOSS_STREAMING_STORE_BYTES at run time, so here it
// is a variable: each input picks the default threshold or 0 (every output takes the
// non-temporal store paths, whatever its size), and one build fuzzes both.
inline std::size_t prefloss_fuzz_streaming_store_bytes = std::size_t{32} << 20;
#define PREFLOSS_STREAMING_STORE_BYTES ::prefloss_fuzz_streaming_store_bytes

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <prefloss/prefloss.hpp>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace fuzz {

namespace pl = prefloss;
using pl::Index;

/// The 16-bit token storage types (computed in float).
template <class T>
inline constexpr bool is_16bit_v = std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>;

[[noreturn]] inline void fail(const std::string& what, const std::string& why) {
  std::fprintf(stderr, "\nprefloss fuzz finding: %s: %s\n", what.c_str(), why.c_str());
  __builtin_trap();
}

inline std::string str(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g (%a)", v, v);
  return buf;
}

/// How many enumerators each option enum declares.
constexpr int enumerators(pl::Aggregation) { return 5; }
constexpr int enumerators(pl::ImportanceLevel) { return 2; }
constexpr int enumerators(pl::KlEstimator) { return 7; }
constexpr int enumerators(pl::DpoVariant) { return 12; }
constexpr int enumerators(pl::FDivergence) { return 4; }
// A count that lags its enum leaves the newest enumerators unfuzzed: tie each to the last one.
static_assert(enumerators(pl::Aggregation{}) == static_cast<int>(pl::Aggregation::token_sum) + 1);
static_assert(enumerators(pl::ImportanceLevel{}) == static_cast<int>(pl::ImportanceLevel::sequence) + 1);
static_assert(enumerators(pl::KlEstimator{}) == static_cast<int>(pl::KlEstimator::k3_plus) + 1);
static_assert(enumerators(pl::DpoVariant{}) == static_cast<int>(pl::DpoVariant::aot_unpaired) + 1);
static_assert(enumerators(pl::FDivergence{}) == static_cast<int>(pl::FDivergence::alpha_divergence) + 1);

/// A stream of the fuzzer's bytes; exhausted, it decodes as zeros.
class Source {
 public:
  Source(const std::uint8_t* data, std::size_t size) : in_(data, size) {}

  bool flag() { return in_.ConsumeBool(); }
  /// 0 .. n-1.
  template <class I>
  I below(I n) {
    return in_.ConsumeIntegralInRange<I>(0, n - 1);
  }
  template <class T, std::size_t N>
  T pick(const T (&values)[N]) {
    return values[below(N)];
  }
  /// Bits in memory order, as prefloss.dict spells them.
  template <class T>
  T raw() {
    T v{};
    in_.ConsumeData(&v, sizeof v);
    return v;
  }

 private:
  FuzzedDataProvider in_;
};

/// Decodes an input: its first structure_bytes bytes (read through the Source base) decide types,
/// shapes, offsets and options, the rest are the tensors' values, so filling a tensor never
/// starves a decision made after it. Exhausted bytes decode as defaults, zeros, aligned offsets.
class Decoder : public Source {
 public:
  static constexpr std::size_t structure_bytes = 64;

  Decoder(const std::uint8_t* data, std::size_t size)
      : Source(data, std::min(size, structure_bytes)),
        values_(data + std::min(size, structure_bytes), size - std::min(size, structure_bytes)) {
    tame = flag();
    prefloss_fuzz_streaming_store_bytes = flag() ? 0 : std::size_t{32} << 20;
  }

  /// See the file comment: in a tame call a NaN output is a finding.
  bool tame = false;

  Index batch() { return below<Index>(10); }
  /// Often an edge of a SIMD batch (16 floats or 8 doubles on AVX-512) or of a mask step.
  Index tokens() {
    static constexpr Index edges[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65};
    return flag() ? pick(edges) : below<Index>(71);
  }
  /// An output's byte offset, 0 .. sizeof(T): any but 0 and sizeof(T) misaligns its map.
  template <class T>
  std::size_t offset() {
    return below(sizeof(T) + 1);
  }
  /// An input's: mostly 0, so that a call with several inputs often has them all aligned and
  /// reaches what it does with a misaligned output.
  template <class T>
  std::size_t input_offset() {
    return below(4) == 0 ? offset<T>() : 0;
  }

  /// An input value: a token (float/double; bf16/half: a float token rounded to it) or an id
  /// (integers).
  template <class T>
  T value() {
    if constexpr (std::is_integral_v<T>) {
      return values_.flag() ? static_cast<T>(values_.below(4)) : integer<T>(values_);
    } else if constexpr (is_16bit_v<T>) {
      return T(token<float>());
    } else {
      return token<T>();
    }
  }

  template <class T>
  T token() {
    using L = std::numeric_limits<T>;
    const auto k = values_.raw<std::uint8_t>();
    if (k < 128) {  // log-prob-like: multiples of 1/4096 in [-8, 8)
      const T v = static_cast<T>(values_.raw<std::int16_t>()) / T(4096);
      return tame ? -std::fabs(v) - T(1) / T(4096) : v;
    }
    if (tame) return values_.pick({T(-1), T(-20), T(-88)});
    if (k < 144) return values_.raw<T>();
    static constexpr T special[] = {
        T(0),          T(-0.0),        T(1),           T(-1),           T(1e30),          T(-1e30),
        L::infinity(), -L::infinity(), L::quiet_NaN(), L::denorm_min(), -L::denorm_min(), L::max(),
        L::lowest(),   L::min(),       T(FLT_MAX),     T(FLT_MIN),      T(-700),          T(700),
        T(-88),        T(88)};
    return values_.pick(special);
  }

  /// A mask entry: mostly 0 and 1; float/double weights from a palette of bad ones too.
  template <class M>
  M mask_entry() {
    if constexpr (std::is_same_v<M, bool>) {
      return values_.flag();
    } else if constexpr (std::is_same_v<M, std::uint8_t>) {
      const auto b = values_.raw<std::uint8_t>();
      return static_cast<M>(b < 128 ? b & 1 : b);
    } else {
      using L = std::numeric_limits<M>;
      static constexpr M weights[] = {M(-0.0),  M(0.5), M(2),    M(1e-45),       M(1e30),
                                      M(-1e30), M(-1),  M(3e38), L::quiet_NaN(), L::infinity()};
      constexpr std::size_t n = std::size(weights), n_tame = 3;
      const auto k = values_.below(2 * n);
      if (k < n) return M(k & 1);
      return tame && k - n >= n_tame ? M(1) : weights[k - n];
    }
  }

  /// An option: half the time its default, else from a palette of edges (the first n_tame are
  /// the tame ones).
  double option(double def) {
    static constexpr double values[] = {0.0,
                                        -0.0,
                                        1.0,
                                        -1.0,
                                        0.5,
                                        0.1,
                                        2.0,
                                        3.0,
                                        20.0,
                                        1e-50,  // positive in double, 0 in float
                                        0.5 - 1e-9,
                                        1 + 1e-9,
                                        1 + DBL_EPSILON,  // 1 in float
                                        DBL_MIN,
                                        DBL_TRUE_MIN,
                                        1e30,
                                        -1e30,
                                        1e300,
                                        DBL_MAX,
                                        -DBL_MAX,
                                        HUGE_VAL,
                                        -HUGE_VAL,
                                        std::numeric_limits<double>::quiet_NaN()};
    constexpr std::size_t n = std::size(values), n_tame = 15;
    const auto k = below(2 * n);
    if (k < n || (tame && k - n >= n_tame)) return def;
    return values[k - n];
  }
  std::optional<double> option(std::optional<double> def) {
    switch (below(3)) {
      case 0:
        return def;
      case 1:
        return std::nullopt;
      default:
        return option(def.value_or(1.0));
    }
  }
  bool option(bool def) { return below(3) == 0 ? def : flag(); }
  /// One of the declared enumerators, or a value outside them.
  template <class E, std::enable_if_t<std::is_enum_v<E>, int> = 0>
  E option(E def) {
    const int count = enumerators(def);
    const int outside[] = {count, -1, 1 << 20, INT_MIN};
    const int k = below(count + 5);
    if (k == 0) return def;
    return static_cast<E>(k <= count ? k - 1 : outside[k - count - 1]);
  }

  /// Decodes every field of an options struct, in order.
  template <class... F>
  void fields(F&... f) {
    ((f = option(f)), ...);
  }

  /// An integer argument (group_size; ids from the values): small, or near the limits of the
  /// index types.
  template <class I>
  I integer() {
    return integer<I>(*this);
  }

 private:
  template <class I>
  static I integer(Source& in) {
    static constexpr std::uint64_t values[] = {
        1, 2, 3, 4, 0, 9, ~0ull, ~0ull - 1, 1ull << 40, 1ull << 32, 1ull << 63, INT64_MAX, INT32_MAX, UINT32_MAX};
    const auto k = in.below(std::size(values) + 1);
    return static_cast<I>(k < std::size(values) ? values[k] : in.raw<std::uint64_t>());
  }

  Source values_;
};

inline void decode(Decoder& d, pl::PpoOptions& o) {
  d.fields(o.clip_low, o.clip_high, o.dual_clip, o.aggregation, o.kl_coef, o.kl_estimator, o.token_count,
           o.sequence_count, o.token_sum_norm, o.log_ratio_clamp, o.k3_log_ratio_clamp, o.k3_clamp, o.importance_level,
           o.delta, o.row_weight_guard, o.count_empty_rows);
}
inline void decode(Decoder& d, pl::GmpoOptions& o) { d.fields(o.clip_low, o.clip_high, o.sequence_count); }
/// The seed is not an option field (no integral option decoder): the harness draws it.
inline void decode(Decoder& d, pl::ClipCovOptions& o) {
  d.fields(o.clip_low, o.clip_high, o.cov_ratio, o.cov_lower, o.cov_upper, o.aggregation, o.token_count,
           o.sequence_count, o.token_sum_norm, o.row_weight_guard, o.count_empty_rows);
}
inline void decode(Decoder& d, pl::KlCovOptions& o) {
  d.fields(o.cov_ratio, o.kl_coef, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, o.row_weight_guard,
           o.count_empty_rows);
}
inline void decode(Decoder& d, pl::ValueOptions& o) {
  d.fields(o.clip, o.aggregation, o.token_count, o.sequence_count, o.token_sum_norm, o.row_weight_guard,
           o.count_empty_rows);
}
inline void decode(Decoder& d, pl::DpoOptions& o) {
  d.fields(o.beta, o.label_smoothing, o.variant, o.reference_free, o.divergence, o.alpha, o.alpha_clamp, o.bco_delta,
           o.discopop_tau, o.sigmoid_label_smoothing);
}
inline void decode(Decoder& d, pl::IpoOptions& o) { d.fields(o.beta, o.reference_free); }
inline void decode(Decoder& d, pl::SimpoOptions& o) { d.fields(o.beta, o.gamma, o.label_smoothing); }
inline void decode(Decoder& d, pl::OrpoOptions& o) { d.fields(o.beta, o.nll_weight); }
inline void decode(Decoder& d, pl::KtoOptions& o) {
  d.fields(o.beta, o.desirable_weight, o.undesirable_weight, o.reference_point);
}
inline void decode(Decoder& d, pl::BradleyTerryOptions& o) { d.fields(o.center_coef); }
inline void decode(Decoder& d, pl::NllOptions& o) { d.fields(o.normalizer); }
inline void decode(Decoder& d, pl::KlOptions& o) { d.fields(o.estimator, o.k3_log_ratio_clamp, o.k3_clamp); }
inline void decode(Decoder& d, pl::GaeOptions& o) { d.fields(o.gamma, o.lam, o.whiten_advantages); }
inline void decode(Decoder& d, pl::WhitenOptions& o) {
  d.fields(o.shift_mean, o.eps, o.unbiased, o.count_guard, o.bessel_guard, o.min_variance);
}
inline void decode(Decoder& d, pl::GroupOptions& o) { d.fields(o.epsilon, o.scale_by_std, o.singleton_std_float32); }

template <class O>
O options(Decoder& d) {
  O o;
  decode(d, o);
  return o;
}

/// Everything one call produced, in order: the exception it threw, or every value it returned
/// or wrote (float widens to double exactly, NaN stays NaN).
struct Record {
  std::string thrown;  ///< the exception's type, empty when the call returned
  std::vector<double> values;

  void add(double v) { values.push_back(v); }
  void add(const std::vector<double>& v) { values.insert(values.end(), v.begin(), v.end()); }
  template <class S>
  void add(const Eigen::Tensor<S, 1>& t) {
    for (Index i = 0; i < t.size(); ++i) add(static_cast<double>(t(i)));
  }
  /// A loss result: its loss, per-example losses, then add_metrics.
  template <class R>
  auto add(const R& r) -> decltype(void(r.metrics)) {
    add(r.loss);
    add(r.losses);
    add_metrics(r);
  }
  /// A result's metrics and their partial sums.
  template <class R>
  void add_metrics(const R& r) {
    add(r.metrics);
    for (const double v : r.metric_sums.sums) add(v);
    for (const double v : r.metric_sums.maxima) add(v);
  }
  template <class S>
  void add(const pl::PreferenceMetrics<S>& m) {
    for (const S v : {m.reward_chosen, m.reward_rejected, m.reward_margin, m.reward_accuracy}) add(v);
  }
  template <class S>
  void add(const pl::OrpoMetrics<S>& m) {
    add(static_cast<const pl::PreferenceMetrics<S>&>(m));
    for (const S v : {m.log_odds_ratio, m.log_odds_chosen, m.nll_loss}) add(v);
  }
  template <class S>
  void add(const pl::KtoMetrics<S>& m) {
    for (const S v :
         {m.reference_point, m.kl_mean, m.reward_desirable_sum, m.reward_undesirable_sum, m.reward_desirable,
          m.reward_undesirable, m.reward_margin, m.logps_desirable_sum, m.logps_undesirable_sum})
      add(v);
    add(static_cast<double>(m.count_desirable));
    add(static_cast<double>(m.count_undesirable));
  }
  template <class S>
  void add(const pl::NllMetrics<S>& m) {
    add(m.mean_logp);
  }
  template <class S>
  void add(const pl::RankingMetrics<S>& m) {
    for (const S v : {m.accuracy, m.reward_mean, m.reward_margin}) add(v);
  }
  template <class S>
  void add(const pl::PpoMetrics<S>& m) {
    for (const S v : {m.clip_fraction, m.clip_fraction_low, m.approx_kl, m.ratio_mean, m.ratio_max, m.kl_mean}) add(v);
    add(m.token_weight);
  }
  template <class S>
  void add(const pl::ValueMetrics<S>& m) {
    for (const S v : {m.clip_fraction, m.value_mean}) add(v);
    add(m.token_weight);
  }
  template <class S>
  void add(const pl::GmpoMetrics<S>& m) {
    for (const S v : {m.clip_fraction, m.clip_fraction_low, m.approx_kl}) add(v);
    add(m.token_weight);
  }
  template <class S>
  void add(const pl::ClipCovMetrics<S>& m) {
    for (const S v : {m.selected_fraction, m.clip_fraction, m.approx_kl, m.ratio_mean, m.ratio_max}) add(v);
    add(m.token_weight);
  }
  template <class S>
  void add(const pl::KlCovMetrics<S>& m) {
    for (const S v : {m.abs_kl, m.selected_fraction, m.approx_kl, m.ratio_mean, m.ratio_max}) add(v);
    add(m.token_weight);
  }
  void add(const pl::CovSelection& s) {
    for (const double v : {s.valid_tokens, s.mask_weight, s.adv_mean, s.logp_mean, s.candidates, s.target, s.selected})
      add(v);
  }
};

inline void expect_same(const std::string& what, const char* how, const Record& a, const Record& b) {
  const auto outcome = [](const Record& r) { return r.thrown.empty() ? std::string("returned") : "threw " + r.thrown; };
  if (a.thrown != b.thrown) fail(what, std::string(how) + ": " + outcome(a) + ", then " + outcome(b));
  if (a.values.size() != b.values.size()) fail(what, std::string(how) + ": the records differ in length");
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    const double x = a.values[i], y = b.values[i];
    if (!(std::isnan(x) && std::isnan(y)) && std::memcmp(&x, &y, sizeof x) != 0)
      fail(what, std::string(how) + ": value " + std::to_string(i) + " is " + str(x) + ", then " + str(y));
  }
}

/// The memory of one argument: `bytes` after a leading `offset` in an allocation of exactly
/// offset + bytes; the first `offset` bytes are a guard.
class Bytes {
 public:
  Bytes(std::size_t offset, std::size_t bytes)
      : mem_(new unsigned char[offset + bytes]), offset_(offset), size_(offset + bytes) {
    fill_sentinel();
  }
  Bytes(Bytes&&) = default;
  virtual ~Bytes() = default;

  std::size_t offset() const { return offset_; }
  void fill_sentinel() { std::memset(mem_.get(), sentinel, size_); }
  bool untouched() const { return first_not_sentinel() == size_; }
  bool guard_intact() const { return first_not_sentinel() >= offset_; }
  /// Inputs: replaces every masked-out token with garbage; new garbage on every call.
  virtual void scramble() {}
  /// Outputs: every element, in order.
  virtual void append(Record& r) const = 0;

 protected:
  unsigned char* at(std::size_t byte) const { return mem_.get() + offset_ + byte; }

 private:
  static constexpr unsigned char sentinel = 0xa5;
  std::size_t first_not_sentinel() const {
    std::size_t k = 0;
    while (k < size_ && mem_[k] == sentinel) ++k;
    return k;
  }
  std::unique_ptr<unsigned char[]> mem_;
  std::size_t offset_, size_;
};

/// A [rows, cols] (or [rows]) tensor of T at a byte offset: its maps are misaligned when the
/// offset is not a multiple of sizeof(T), which the library must reject rather than read.
/// Built from a Decoder it is an output.
template <class T>
class Buf : public Bytes {
 public:
  using Mat = Eigen::Tensor<T, 2, Eigen::RowMajor>;
  using Vec = Eigen::Tensor<T, 1>;

  Buf(std::size_t offset, Index rows, Index cols = 1)
      : Bytes(offset, static_cast<std::size_t>(rows * cols) * sizeof(T)), rows_(rows), cols_(cols) {}
  Buf(Decoder& d, Index rows, Index cols = 1) : Buf(d.offset<T>(), rows, cols) {}

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  std::size_t size() const { return static_cast<std::size_t>(rows_ * cols_); }
  T* data() const { return reinterpret_cast<T*>(at(0)); }
  T get(std::size_t i) const {
    T v;
    std::memcpy(&v, at(i * sizeof(T)), sizeof v);
    return v;
  }
  void set(std::size_t i, T v) { std::memcpy(at(i * sizeof(T)), &v, sizeof v); }

  Eigen::TensorMap<const Mat> mat() const { return Eigen::TensorMap<const Mat>(data(), rows_, cols_); }
  Eigen::TensorMap<const Vec> vec() const { return Eigen::TensorMap<const Vec>(data(), rows_ * cols_); }
  Eigen::TensorMap<Mat> mat_out() { return Eigen::TensorMap<Mat>(data(), rows_, cols_); }
  Eigen::TensorMap<Vec> vec_out() { return Eigen::TensorMap<Vec>(data(), rows_ * cols_); }

  void append(Record& r) const override {
    for (std::size_t i = 0; i < size(); ++i) r.add(static_cast<double>(get(i)));
  }

 private:
  Index rows_, cols_;
};

/// A mask: entries from Decoder::mask_entry, and which of them drop their token.
template <class M>
class Mask : public Buf<M> {
 public:
  Mask(Decoder& d, Index rows, Index cols = 1) : Buf<M>(d.input_offset<M>(), rows, cols), dropped(this->size()) {
    for (std::size_t i = 0; i < this->size(); ++i) {
      this->set(i, d.mask_entry<M>());
      dropped[i] = this->get(i) == M(0);
    }
  }
  std::vector<bool> dropped;
};

/// An input tensor of decoded values; under a mask, its masked-out entries scramble.
template <class T>
class Input : public Buf<T> {
 public:
  Input(Decoder& d, std::size_t offset, Index rows, Index cols = 1) : Buf<T>(offset, rows, cols) {
    for (std::size_t i = 0; i < this->size(); ++i) this->set(i, d.value<T>());
  }
  Input(Decoder& d, Index rows, Index cols = 1) : Input(d, d.input_offset<T>(), rows, cols) {}
  template <class M>
  Input(Decoder& d, const Mask<M>& mask) : Input(d, mask.rows(), mask.cols()) {
    dropped_ = mask.dropped;
  }
  /// Values the caller sets, at a byte offset; `dropped` as under a mask.
  Input(std::size_t offset, Index rows, Index cols, std::vector<bool> dropped)
      : Buf<T>(offset, rows, cols), dropped_(std::move(dropped)) {}
  const std::vector<bool>& dropped() const { return dropped_; }

  void scramble() override {
    ++round_;
    for (std::size_t i = 0; i < dropped_.size(); ++i)
      if (dropped_[i]) this->set(i, garbage(i + round_));
  }

 private:
  static T garbage(std::size_t k) {
    using L = std::numeric_limits<T>;
    if (k % 4 == 0) return L::quiet_NaN();
    if (k % 4 == 1) return L::infinity();
    if (k % 4 == 2) return -L::infinity();
    std::uint64_t z = k * 0x9e3779b97f4a7c15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    T v;
    std::memcpy(&v, &z, sizeof v);
    return v;
  }
  std::vector<bool> dropped_;
  std::size_t round_ = 0;
};

/// A call under test: it adds what it returns to the record. Type-erased so that the checking
/// code is compiled once, not once per entry point and type.
using Call = std::function<void(Record&)>;

/// One run of call(record) with every output set to the sentinel first; appends the outputs to
/// the record when the call returned.
inline Record run_once(const std::string& what, std::initializer_list<Bytes*> outputs, const Call& call) {
  for (Bytes* o : outputs) o->fill_sentinel();
  Record r;
  try {
    call(r);
  } catch (const pl::error& e) {
    r = Record{typeid(e).name(), {}};
    for (const Bytes* o : outputs)
      if (!o->untouched()) fail(what, std::string("wrote an output, then threw: ") + e.what());
  } catch (const std::exception& e) {
    fail(what, std::string("threw ") + typeid(e).name() + ", not a prefloss::error: " + e.what());
  } catch (...) {
    fail(what, "threw something that is not a std::exception");
  }
  for (const Bytes* o : outputs) {
    if (!o->guard_intact()) fail(what, "wrote before the start of an output");
    if (r.thrown.empty()) o->append(r);
  }
  return r;
}

/// Runs call(record) twice, the second time with the masked-out tokens of `inputs` scrambled;
/// traps unless both runs agree (and, in a tame call, are free of NaN). Returns the first run.
inline Record check(const Decoder& d, const std::string& what, std::initializer_list<Bytes*> inputs,
                    std::initializer_list<Bytes*> outputs, const Call& call) {
  const Record first = run_once(what, outputs, call);
  for (Bytes* in : inputs) in->scramble();
  expect_same(what, "masked-out tokens changed the outcome", first, run_once(what, outputs, call));
  // On unless PREFLOSS_FUZZ_TAME=0 (to explore other invariants past a known tame finding).
  static const bool tame_check = [] {
    const char* e = std::getenv("PREFLOSS_FUZZ_TAME");
    return !(e && std::string(e) == "0");
  }();
  if (tame_check && d.tame)
    for (std::size_t i = 0; i < first.values.size(); ++i)
      if (std::isnan(first.values[i])) fail(what, "value " + std::to_string(i) + " of a tame call is NaN");
  return first;
}

template <class H, class T>
void with_mask_type(Decoder& d) {
  const Index B = d.batch(), N = d.tokens();
  switch (d.below(4)) {
    case 0:
      return H::template run<T, bool>(d, B, N);
    case 1:
      return H::template run<T, std::uint8_t>(d, B, N);
    case 2:
      return H::template run<T, float>(d, B, N);
    default:
      return H::template run<T, double>(d, B, N);
  }
}

/// The whole LLVMFuzzerTestOneInput of a harness H: decodes the token and mask types and a
/// [batch, tokens] shape, then calls H::run<T, M>(decoder, batch, tokens).
template <class H>
int fuzz_one(const std::uint8_t* data, std::size_t size) {
  Decoder d(data, size);
  d.flag() ? with_mask_type<H, double>(d) : with_mask_type<H, float>(d);
  return 0;
}

}  // namespace fuzz
