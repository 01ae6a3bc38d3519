/// @file torch.hpp
/// @brief The libtorch adapter: prefloss's losses as autograd functions over CPU at::Tensors.
///
/// `#include <prefloss/torch.hpp>` (CMake target prefloss::torch, defined when libtorch is
/// found; not part of prefloss.hpp). Every function mirrors the core's name and argument order
/// with at::Tensor arguments and returns tensors that carry autograd history:
///
/// @code
/// namespace pt = prefloss::torch;
/// auto r = pt::dpo(pt::masked_sum(logp_c, mask_c), pt::masked_sum(logp_r, mask_r), ref_c, ref_r, opt);
/// (r.loss + 0.1 * pt::nll(pt::masked_mean(logp_c, mask_c)).loss).backward();
/// @endcode
///
/// How it maps onto the core:
/// - Tensors are read in place through Eigen maps of their storage (view(), mutable_view()):
///   CPU, strided, row-major contiguous; float32, float64, bfloat16 or float16 values, bool,
///   uint8 or floating masks (a floating mask has the values' compute dtype: float32 for 16-bit
///   values), int32 or int64 labels. Anything else throws before anything is computed:
///   tensor_error for an undefined tensor, a device other than the CPU or a wrong dtype,
///   shape_error for a wrong rank or extent, layout_error for a layout the core cannot read
///   without a copy (the message says which call makes one, e.g. `.contiguous()`).
/// - The sequence losses (dpo, ipo, simpo, orpo, kto, bradley_terry, bradley_terry_ranking,
///   nll) take Sequence arguments: [batch] tensors (any differentiable tensor), or what
///   masked_sum / masked_mean return. Given the latter, the loss evaluates the masked reduction
///   itself and its backward writes the token gradient: one autograd node from the tokens to the
///   loss, the masks read once each way, as the core does. A tensor that is an unmodified
///   masked_sum output (`.values()`, or the Python module's) is recognised and handled the same.
///   The token losses (ppo_clip, value_loss, cispo, sapo, gpg, gmpo, clip_cov, kl_cov) and
///   token_logprobs / ppo_clip_from_logits take the token tensors; linear_logprobs takes the LM
///   head's input and weight. clip_cov_select / kl_cov_select return a new selection tensor
///   (no autograd node) for clip_cov / kl_cov's constant `selected` argument.
/// - Every result has `.loss` (0-dim, differentiable), `.losses` (per example or per sequence,
///   differentiable: loss = sum(losses) / n, with n the loss's divisor: the batch, batch_count,
///   NllOptions::normalizer; 1 for the token losses), `.metrics` and `.metric_sums` as the core
///   computes them, finalized in double (a float32 call's core metrics are these rounded to
///   float).
/// - Backward runs the core's closed-form gradient. It honours any upstream gradient of loss
///   and losses, computes a gradient only for inputs that require one, and never for
///   references, old log-probs, advantages, returns, labels or masks. Each call is one bare
///   autograd node (named "prefloss::torch::<loss>" in grad_fn), built without a dispatched op.
///   The tensors a backward reads again (tokens, masks, logits) are kept by the node and freed
///   after the backward unless retain_graph (a second backward then is a tensor_error, as
///   autograd's own is an error); modifying one in place between the forward and the backward
///   is a tensor_error naming it.
/// - Allocation: nothing proportional to tokens but the gradient tensor autograd receives (and
///   the new output tensors of clip_cov_select, kl_cov_select and rollout_is_weights), and
///   O(batch) besides. A gradient of 64 KiB or more reuses the memory of one the trainer freed
///   (gradient_cache_limit() bytes are kept; set_gradient_cache_limit(0) turns this off), so a
///   step does not pay the kernel for freshly zeroed pages again. The sequence losses,
///   token_logprobs and linear_logprobs allocate it in the backward (linear_logprobs both of
///   hidden's and weight's: the core writes them together). ppo_clip, value_loss and the other
///   token losses, when logp (values) requires a gradient, run the core's fused pass in the
///   forward, so it is allocated
///   there and handed over by the backward (a second backward under retain_graph recomputes
///   it); so does ppo_clip_from_logits, whose core call is fused only. A token loss whose
///   upstream gradient is not exactly 1 (or whose losses get one) scales its gradient rows in
///   place: one more pass.
///
/// Threads: the options' `threads` is the core's (prefloss::Threads); libtorch's own intra-op
/// pool is not used.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "prefloss.hpp"

namespace prefloss::torch {

/// @brief A tensor the adapter cannot take as it is: undefined, not on the CPU, of the wrong
/// dtype or layout kind, or modified in place between a forward and its backward (the message
/// names the argument and what was seen).
class tensor_error : public prefloss::error {
 public:
  using error::error;
};

namespace detail {

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr at::ScalarType value = at::kFloat;
};
template <>
struct dtype_of<double> {
  static constexpr at::ScalarType value = at::kDouble;
};
template <>
struct dtype_of<Eigen::bfloat16> {
  static constexpr at::ScalarType value = at::kBFloat16;
};
template <>
struct dtype_of<Eigen::half> {
  static constexpr at::ScalarType value = at::kHalf;
};
template <>
struct dtype_of<bool> {
  static constexpr at::ScalarType value = at::kBool;
};
template <>
struct dtype_of<std::uint8_t> {
  static constexpr at::ScalarType value = at::kByte;
};
template <>
struct dtype_of<std::int32_t> {
  static constexpr at::ScalarType value = at::kInt;
};
template <>
struct dtype_of<std::int64_t> {
  static constexpr at::ScalarType value = at::kLong;
};
static_assert(sizeof(Eigen::bfloat16) == sizeof(c10::BFloat16) && sizeof(Eigen::half) == sizeof(at::Half),
              "prefloss: 16-bit floats must have the same storage in Eigen and ATen");

inline std::string list_str(at::IntArrayRef a) {
  std::string s = "[";
  for (std::size_t k = 0; k < a.size(); ++k) s += (k ? ", " : "") + std::to_string(a[k]);
  return s + "]";
}

/// "float32 [4, 16] on cpu": what a message says a tensor was.
inline std::string describe(const at::Tensor& t) {
  return std::string(t.dtype().name()) + " " + list_str(t.sizes()) + " on " + t.device().str();
}

inline std::string where(const char* fn, const char* name) {
  return std::string("prefloss::torch::") + fn + ": argument '" + name + "'";
}

inline void require_defined(const at::Tensor& t, const char* fn, const char* name) {
  if (!t.defined()) throw tensor_error(where(fn, name) + " is an undefined tensor");
}

/// Everything but the dtype: defined, CPU, strided, of rank `rank`, row-major contiguous.
inline void require_readable(const at::Tensor& t, const char* fn, const char* name, std::int64_t rank,
                             const char* dims) {
  require_defined(t, fn, name);
  if (!t.device().is_cpu())
    throw tensor_error(where(fn, name) + " is on " + t.device().str() + "; prefloss computes on CPU tensors: pass " +
                       name + ".cpu() and move the results back");
  if (t.layout() != at::kStrided)
    throw tensor_error(where(fn, name) + " has a sparse or other non-strided layout (" + describe(t) + "); pass " +
                       name + ".to_dense()");
  if (t.dim() != rank)
    throw shape_error(where(fn, name) + " must have rank " + std::to_string(rank) + " " + dims + ", got " +
                      describe(t));
  if (!t.is_contiguous())
    throw layout_error(where(fn, name) + " is not row-major contiguous (shape " + list_str(t.sizes()) + ", strides " +
                       list_str(t.strides()) + "); prefloss reads each row as one block of memory: pass " + name +
                       ".contiguous()");
  if (t.is_neg())
    throw layout_error(where(fn, name) + " is a negative view (its values are the negation of its memory, e.g. from " +
                       "at::_neg_view); prefloss reads the memory: pass " + name + ".resolve_neg()");
}

/// An upstream gradient as a contiguous tensor of `dtype` whose memory holds its values (a
/// negative view, which autograd may pass through, is resolved).
inline at::Tensor upstream_of(const at::Tensor& g, at::ScalarType dtype) {
  at::Tensor u = g.to(dtype).contiguous();
  return u.is_neg() ? u.resolve_neg() : u;
}

template <class T>
void require_dtype(const at::Tensor& t, const char* fn, const char* name, const char* allowed) {
  if (t.scalar_type() != dtype_of<T>::value)
    throw tensor_error(where(fn, name) + " must be " + allowed + ", got " + describe(t));
}

template <class T>
const char* dtype_name() {
  return c10::toString(dtype_of<T>::value);
}

template <class T, int R>
Eigen::TensorMap<const Eigen::Tensor<T, R, Eigen::RowMajor>> read_map(const at::Tensor& t) {
  std::array<Eigen::Index, static_cast<std::size_t>(R)> dims{};
  for (int k = 0; k < R; ++k) dims[static_cast<std::size_t>(k)] = t.size(k);
  return {static_cast<const T*>(t.data_ptr()), dims};
}
template <class T, int R>
Eigen::TensorMap<Eigen::Tensor<T, R, Eigen::RowMajor>> write_map(const at::Tensor& t) {
  std::array<Eigen::Index, static_cast<std::size_t>(R)> dims{};
  for (int k = 0; k < R; ++k) dims[static_cast<std::size_t>(k)] = t.size(k);
  return {static_cast<T*>(t.data_ptr()), dims};
}

inline const char* rank_dims(int rank) {
  return rank == 1 ? "([batch])" : rank == 2 ? "([batch, tokens])" : rank == 3 ? "([batch, tokens, vocab])" : "";
}

}  // namespace detail

/// @brief A zero-copy read view of a CPU tensor as the row-major Eigen::TensorMap the core
/// takes.
/// @tparam T float, double, Eigen::bfloat16, Eigen::half, bool, uint8_t, int32_t or int64_t;
///   the tensor's dtype must be T's (no conversion is made)
/// @tparam Rank the tensor's rank
/// @param name the argument's name in error messages
/// @throws tensor_error (undefined, not CPU, not strided, other dtype), shape_error (rank),
///   layout_error (not row-major contiguous: pass `.contiguous()`)
template <class T, int Rank>
Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>> view(const at::Tensor& t, const char* name = "tensor") {
  detail::require_readable(t, "view", name, Rank, detail::rank_dims(Rank));
  detail::require_dtype<T>(t, "view", name, detail::dtype_name<T>());
  return detail::read_map<T, Rank>(t);
}

/// @brief A zero-copy write view (e.g. for the core's fused outputs); the same checks as view().
template <class T, int Rank>
Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor>> mutable_view(const at::Tensor& t,
                                                                       const char* name = "tensor") {
  detail::require_readable(t, "mutable_view", name, Rank, detail::rank_dims(Rank));
  detail::require_dtype<T>(t, "mutable_view", name, detail::dtype_name<T>());
  return detail::write_map<T, Rank>(t);
}

/// @brief A loss's outputs: loss and losses carry autograd history; the metrics are the core's,
/// finalized in double.
template <class Metrics>
struct Result {
  at::Tensor loss;                  ///< 0-dim, the values' dtype (float32 for 16-bit values)
  at::Tensor losses;                ///< [batch]: per example (sequence losses) or per sequence (token losses)
  Metrics metrics;                  ///< metric_sums.metrics()
  MetricSums<Metrics> metric_sums;  ///< merge across ranks as the core's (see prefloss::MetricSums)
};

using PreferenceResult = Result<PreferenceMetrics<double>>;  ///< dpo, ipo, simpo, bradley_terry
using OrpoResult = Result<OrpoMetrics<double>>;              ///< orpo
using KtoResult = Result<KtoMetrics<double>>;                ///< kto
using NllResult = Result<NllMetrics<double>>;                ///< nll
using RankingResult = Result<RankingMetrics<double>>;        ///< bradley_terry_ranking
using PpoResult = Result<PpoMetrics<double>>;                ///< ppo_clip
using ValueLossResult = Result<ValueMetrics<double>>;        ///< value_loss
using CispoResult = Result<CispoMetrics<double>>;            ///< cispo
using SapoResult = Result<SapoMetrics<double>>;              ///< sapo
using GpgResult = Result<GpgMetrics<double>>;                ///< gpg
using GmpoResult = Result<GmpoMetrics<double>>;              ///< gmpo
using ClipCovResult = Result<ClipCovMetrics<double>>;        ///< clip_cov
using KlCovResult = Result<KlCovMetrics<double>>;            ///< kl_cov

/// Outputs of clip_cov_select / kl_cov_select: `selected` is a new [batch, tokens] tensor of
/// logp's dtype, 1 at the chosen tokens and 0 everywhere else (masked-out tokens included), with
/// no autograd history (pass it to clip_cov / kl_cov as `selected`); `info` is the core's
/// CovSelection.
struct CovSelectionOutputs {
  at::Tensor selected;
  CovSelection info;
};

/// Outputs of rollout_is_weights: `weights` a new [batch, tokens] tensor of old_logp's dtype
/// (pass it to a token loss as its float mask, see prefloss::rollout_is_weights for the
/// divisors), `keep` a new [batch, tokens] bool tensor (verl's modified response_mask), neither
/// with autograd history; `metrics` the core's.
struct RolloutIsOutputs {
  at::Tensor weights;
  at::Tensor keep;
  RolloutIsMetrics metrics;
};

/// Outputs of token_logprobs: both [batch, tokens] of the compute dtype, differentiable to the
/// logits, 0 at masked-out tokens; entropy is undefined unless LogprobOptions::entropy.
struct LogprobOutputs {
  at::Tensor logp;
  at::Tensor entropy;
};

/// Outputs of ppo_clip_from_logits: loss and losses differentiable to the logits; logp and
/// entropy ([batch, tokens], entropy undefined unless computed) are detached.
struct PpoLogitsOutputs {
  at::Tensor loss;
  at::Tensor losses;
  at::Tensor logp;
  at::Tensor entropy;
  double policy_loss = 0;   ///< ppo_clip's loss over logp (with its KL term)
  double entropy_loss = 0;  ///< the entropy aggregated as the loss is; 0 without entropy
  PpoMetrics<double> metrics;
  MetricSums<PpoMetrics<double>> metric_sums;
};

namespace detail {

using variable_list = ::torch::autograd::variable_list;

/// @brief The memory of the gradient tensors the adapter hands to autograd: a block of 64 KiB
/// or more that such a tensor freed is kept and handed to the next gradient of its size class
/// (a quarter of a power of two: at most 25% unused), up to gradient_cache_limit() bytes in all,
/// the oldest evicted first. A trainer frees a step's gradients (zero_grad with set_to_none, or
/// AccumulateGrad after adding them into .grad) and asks for the same shapes at the next step;
/// glibc returns large freed blocks to the kernel, which zeroes every page again when they are
/// touched, and that was most of the adapter's cost over the core call (see bench_torch.cpp).
/// New blocks, and smaller gradients, come from libtorch's CPU allocator, as at::empty's do.
class GradientCache final : public c10::Allocator {
 public:
  static constexpr std::size_t min_bytes = std::size_t{64} << 10;

  /// Never destroyed: a tensor freed during static destruction still returns its block here.
  static GradientCache& instance() {
    static auto* cache = new GradientCache();
    return *cache;
  }

  c10::DataPtr allocate(std::size_t bytes) const override {
    if (bytes < min_bytes) return c10::GetCPUAllocator()->allocate(bytes);
    const std::size_t size = size_class(bytes);
    auto& self = const_cast<GradientCache&>(*this);  // allocate() is const in c10::Allocator
    Block* b = self.take(size);
    if (!b) b = new Block{c10::GetCPUAllocator()->allocate(size), size};
    return {b->memory.get(), b, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  std::size_t limit() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }
  std::size_t set_limit(std::size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const std::size_t old = limit_;
    limit_ = bytes;
    evict_to(limit_);
    return old;
  }
  std::size_t cached() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  struct Block {
    c10::DataPtr memory;  ///< from libtorch's CPU allocator (any the trainer installed)
    std::size_t bytes;
  };
  GradientCache() = default;

  static std::size_t size_class(std::size_t bytes) {
    std::size_t top = 1;
    while (top <= bytes / 2) top <<= 1;  // the highest power of two <= bytes
    const std::size_t step = top / 4;
    return (bytes + step - 1) / step * step;
  }
  static void give_back(void* ctx) { instance().put(static_cast<Block*>(ctx)); }

  Block* take(std::size_t size) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it)
      if ((*it)->bytes == size) {
        Block* b = *it;
        blocks_.erase(std::next(it).base());
        cached_ -= size;
        return b;
      }
    return nullptr;
  }
  void put(Block* b) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (b->bytes <= limit_) {
        evict_to(limit_ - b->bytes);
        blocks_.push_back(b);
        cached_ += b->bytes;
        return;
      }
    }
    release(b);
  }
  void evict_to(std::size_t bytes) {  // under mutex_
    std::size_t k = 0;
    for (; k < blocks_.size() && cached_ > bytes; ++k) {
      cached_ -= blocks_[k]->bytes;
      release(blocks_[k]);
    }
    blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(k));
  }
  static void release(Block* b) { delete b; }

  mutable std::mutex mutex_;
  std::vector<Block*> blocks_;  ///< oldest first
  std::size_t cached_ = 0;
  std::size_t limit_ = std::size_t{64} << 20;
};

/// A new uninitialized CPU tensor for a gradient (GradientCache's memory).
inline at::Tensor gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(sizes, &GradientCache::instance(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, c10::nullopt));
}

}  // namespace detail

/// @brief The most bytes of freed gradient memory the adapter keeps for its next gradients
/// (default 64 MiB; a freed block larger than this is returned to the system at once).
inline std::size_t gradient_cache_limit() { return detail::GradientCache::instance().limit(); }
/// Sets gradient_cache_limit() (0 keeps nothing), freeing the oldest kept blocks beyond it;
/// returns the previous limit.
inline std::size_t set_gradient_cache_limit(std::size_t bytes) {
  return detail::GradientCache::instance().set_limit(bytes);
}
/// The bytes of freed gradient memory kept now.
inline std::size_t gradient_cache_bytes() { return detail::GradientCache::instance().cached(); }

namespace detail {

/// @brief One adapter call's autograd node: a torch::autograd::Node of its own (a custom
/// Function would add a context, a capsule and saved-variable bookkeeping to every call). The
/// forward runs before attach(), so a rejected call builds no graph, and the node never holds
/// its own outputs. It keeps the tensors its backward reads again (the core's views point into
/// them) and frees them after the backward unless retain_graph, as autograd frees its own.
struct Node : ::torch::autograd::Node {
  /// A kept tensor's name in messages: "argument 'name'", or with `part` ("tokens", "mask")
  /// "the part of argument 'name'" followed by `of`.
  struct Kept {
    const char* name;
    const char* part;
    const char* of;
    std::int64_t version;
  };
  const char* fn = "";
  variable_list saved_tensors;  ///< the kept tensors, in the order keep() was called
  std::vector<Kept> kept;       ///< one per entry of saved_tensors
  std::vector<bool> needs;      ///< per input of attach(): whether this backward computes its gradient
  bool released = false;        ///< the kept tensors were freed by a backward without retain_graph

  /// One gradient per input of attach() (undefined where none is needed); grads has one entry
  /// per output, undefined where the output got no gradient.
  virtual variable_list backward(const variable_list& grads, const variable_list& saved) = 0;

  /// Keeps `t` for backward and remembers its version.
  void keep(const at::Tensor& t, const char* name, const char* part = nullptr, const char* of = "") {
    saved_tensors.push_back(t);
    kept.push_back({name, part, of, t._version()});
  }
  /// Whether no kept tensor was modified in place since the forward.
  bool unchanged() const {
    for (std::size_t k = 0; k < kept.size(); ++k)
      if (saved_tensors[k]._version() != kept[k].version) return false;
    return true;
  }

  std::string name() const override { return std::string("prefloss::torch::") + fn; }
  void release_variables() override {
    released = !saved_tensors.empty();
    saved_tensors.clear();
    saved_tensors.shrink_to_fit();
  }
  variable_list apply(variable_list&& grads) override {
    if (released)
      throw tensor_error(std::string("prefloss::torch::") + fn +
                         ": backward ran a second time through this graph, whose saved tensors the first "
                         "backward freed: pass retain_graph=true to the first backward");
    check_kept();
    for (std::size_t k = 0; k < needs.size(); ++k) needs[k] = task_should_compute_output(k);
    return backward(grads, saved_tensors);
  }

 private:
  void check_kept() const {
    for (std::size_t k = 0; k < kept.size(); ++k) {
      const std::int64_t now = saved_tensors[k]._version();
      if (now == kept[k].version) continue;
      const Kept& x = kept[k];
      const std::string label = x.part ? std::string("the ") + x.part + " of argument '" + x.name + "'" + x.of
                                       : std::string("argument '") + x.name + "'";
      throw tensor_error(std::string("prefloss::torch::") + fn + ": " + label +
                         " was modified in place after the forward pass and before backward (its version went "
                         "from " +
                         std::to_string(x.version) + " to " + std::to_string(now) +
                         "); the gradient reads it again: clone it before modifying it");
    }
  }
};

/// A new node (deleted as autograd deletes its own: iteratively, however long the graph).
template <class N, class... A>
std::shared_ptr<N> make_node(A&&... a) {
  return std::shared_ptr<N>(new N(std::forward<A>(a)...), ::torch::autograd::deleteNode);
}

/// Attaches `node` to the graph of `inputs`, its differentiable inputs, as the grad_fn of
/// `outputs`; returns them. Without grad mode, or when no input requires a gradient, the
/// outputs are returned as they are and the node is dropped. (Not `apply`: ADL would find
/// std::apply.)
inline variable_list attach(const std::vector<at::Tensor>& inputs, const std::shared_ptr<Node>& node,
                            variable_list outputs) {
  if (!::torch::autograd::compute_requires_grad(at::TensorList(inputs))) return outputs;
  node->needs.assign(inputs.size(), false);
  node->set_next_edges(::torch::autograd::collect_next_edges(at::TensorList(inputs)));
  for (auto& o : outputs) ::torch::autograd::set_history(o, node);
  return outputs;
}

/// The gradient of output k, or undefined.
inline at::Tensor grad_at(const variable_list& grads, std::size_t k) {
  return k < grads.size() ? grads[k] : at::Tensor();
}

template <class T>
struct tag {
  using type = T;
};

template <class F>
decltype(auto) on_real(const at::Tensor& t, const char* fn, const char* name, F&& f) {
  require_defined(t, fn, name);
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(tag<float>{});
    case at::kDouble:
      return f(tag<double>{});
    default:
      throw tensor_error(where(fn, name) + " must be float32 or float64, got " + describe(t));
  }
}

template <class F>
decltype(auto) on_token(const at::Tensor& t, const char* fn, const char* name, F&& f) {
  require_defined(t, fn, name);
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(tag<float>{});
    case at::kDouble:
      return f(tag<double>{});
    case at::kBFloat16:
      return f(tag<Eigen::bfloat16>{});
    case at::kHalf:
      return f(tag<Eigen::half>{});
    default:
      throw tensor_error(where(fn, name) + " must be float32, float64, bfloat16 or float16, got " + describe(t));
  }
}

/// A mask of bool, uint8 or the compute dtype C (weights).
template <class C, class F>
decltype(auto) on_mask(const at::Tensor& t, const char* fn, const char* name, F&& f) {
  require_defined(t, fn, name);
  switch (t.scalar_type()) {
    case at::kBool:
      return f(tag<bool>{});
    case at::kByte:
      return f(tag<std::uint8_t>{});
    default:
      if (t.scalar_type() == dtype_of<C>::value) return f(tag<C>{});
      throw tensor_error(where(fn, name) + " must be bool, uint8 or " + dtype_name<C>() +
                         " (weights in the values' compute dtype), got " + describe(t));
  }
}

template <class F>
decltype(auto) on_label(const at::Tensor& t, const char* fn, const char* name, F&& f) {
  require_defined(t, fn, name);
  switch (t.scalar_type()) {
    case at::kLong:
      return f(tag<std::int64_t>{});
    case at::kInt:
      return f(tag<std::int32_t>{});
    default:
      throw tensor_error(where(fn, name) + " must be int64 or int32, got " + describe(t));
  }
}

/// Why an argument must have a dtype, for its message: a text, or "the dtype of 'like'" (built
/// only when a message is).
struct DtypeRule {
  const char* text = nullptr;
  const char* like = nullptr;
  DtypeRule(const char* t) : text(t) {}  // NOLINT(google-explicit-constructor)
  static DtypeRule of(const char* argument) {
    DtypeRule r(nullptr);
    r.like = argument;
    return r;
  }
  std::string str() const { return like ? std::string("the dtype of '") + like + "'" : std::string(text); }
};

/// A read map of an argument whose dtype is fixed by another (T), checked.
template <class T, int R>
Eigen::TensorMap<const Eigen::Tensor<T, R, Eigen::RowMajor>> arg(const at::Tensor& t, const char* fn, const char* name,
                                                                 const DtypeRule& rule) {
  require_readable(t, fn, name, R, rank_dims(R));
  if (t.scalar_type() != dtype_of<T>::value)
    throw tensor_error(where(fn, name) + " must be " + dtype_name<T>() + " (" + rule.str() + "), got " + describe(t));
  return read_map<T, R>(t);
}

template <class S>
at::TensorOptions options_of() {
  return at::TensorOptions().dtype(dtype_of<S>::value).device(at::kCPU);
}

/// A new CPU tensor, allocated as at::empty allocates (the CPU allocator) without a dispatch:
/// an adapter call's small outputs cost a microsecond or more each through the dispatcher.
template <class S>
at::Tensor new_cpu(at::IntArrayRef sizes) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype_of<S>::value, false, c10::nullopt));
}

template <class S>
at::Tensor scalar_of(double v) {
  at::Tensor t = new_cpu<S>({});
  *t.data_ptr<S>() = static_cast<S>(v);
  return t;
}

template <class S>
at::Tensor copy_of(const Eigen::Tensor<S, 1>& v) {
  at::Tensor t = new_cpu<S>({v.dimension(0)});
  std::copy(v.data(), v.data() + v.size(), t.data_ptr<S>());
  return t;
}

/// The core's sums with the scalar type widened; metrics() finalizes them in double.
template <template <class> class M, class S>
MetricSums<M<double>> widen(const MetricSums<M<S>>& s) {
  MetricSums<M<double>> d;
  static_assert(MetricSums<M<double>>::n_sums == MetricSums<M<S>>::n_sums &&
                    MetricSums<M<double>>::n_maxima == MetricSums<M<S>>::n_maxima,
                "prefloss: a metrics layout must not depend on the scalar type");
  d.sums = s.sums;
  d.maxima = s.maxima;
  return d;
}

template <template <class> class M, class R>
Result<M<double>> result_of(const R& core, variable_list out) {
  Result<M<double>> r{std::move(out[0]), std::move(out[1]), {}, widen(core.metric_sums)};
  r.metrics = r.metric_sums.metrics();
  return r;
}

/// {f(0), ..., f(K - 1)} (for elements that cannot be default-constructed, such as maps).
template <std::size_t... I, class F>
auto array_of(std::index_sequence<I...>, F&& f) {
  return std::array<decltype(f(std::size_t{0})), sizeof...(I)>{f(I)...};
}

template <class S, int R, std::size_t K, std::size_t... I>
std::array<Eigen::TensorMap<const Eigen::Tensor<S, R, Eigen::RowMajor>>, K> arg_maps(
    const std::array<const at::Tensor*, K>& t, const std::array<const char*, K>& names, [[maybe_unused]] const char* fn,
    [[maybe_unused]] const DtypeRule& rule, std::index_sequence<I...>) {
  return {arg<S, R>(*t[I], fn, names[I], rule)...};
}

/// @brief The per-row upstream of a loss whose losses are its terms over a divisor n:
/// d/dloss_term of (g loss + sum_i gl_i losses_i) is g + n gl_i. Plain numbers, no tensor ops
/// (each costs microseconds of dispatch): `any` is false when neither output got a gradient,
/// `one` when the factor is exactly 1 for every row.
struct RowFactor {
  /// A 0-dim upstream's value: read in place when it is a CPU float or double (item() is a
  /// dispatch of a microsecond).
  static double scalar_value(const at::Tensor& t) {
    if (t.device().is_cpu() && t.numel() == 1 && !t.is_neg()) {
      if (t.scalar_type() == at::kFloat) return *static_cast<const float*>(t.data_ptr());
      if (t.scalar_type() == at::kDouble) return *static_cast<const double*>(t.data_ptr());
    }
    return t.item<double>();
  }
  bool any = false, one = false;
  double g = 0, n = 1;
  at::Tensor gl;  ///< [batch] double, contiguous, or undefined
  RowFactor(const variable_list& grads, double divisor) : n(divisor) {
    const at::Tensor gt = grad_at(grads, 0), glt = grad_at(grads, 1);
    any = gt.defined() || glt.defined();
    if (gt.defined()) g = scalar_value(gt);
    if (glt.defined()) gl = upstream_of(glt, at::kDouble);
    one = any && !gl.defined() && g == 1.0;
  }
  double at(std::int64_t i) const { return gl.defined() ? g + n * gl.data_ptr<double>()[i] : g; }
};

/// @brief A masked_sum / masked_mean expression over token and mask tensors (the core's,
/// viewing them). A loss given one takes the tokens as its own input and writes their gradient
/// through the expression, so no masked node runs in the backward (one node and one pass over
/// the masks instead of two).
struct MaskedExpr {
  const char* fn = "";
  at::ScalarType values_dtype = at::kFloat;  ///< the compute dtype: float32 for 16-bit tokens
  virtual ~MaskedExpr() = default;
  /// grad = the expression's adjoint of upstream ([batch] of the values' dtype), a new tensor
  /// shaped and typed like the tokens.
  virtual at::Tensor adjoint(const void* upstream, const at::Tensor& tokens) const = 0;
  /// Writes the [batch] values (of values_dtype) to out.
  virtual void eval(void* out) const = 0;
};

/// Node of a masked reduction evaluated as a tensor: the tokens and the mask are kept; the
/// backward is the expression's adjoint into a new gradient tensor.
struct MaskedNode : Node {
  std::shared_ptr<const MaskedExpr> expr;
  explicit MaskedNode(std::shared_ptr<const MaskedExpr> e) : expr(std::move(e)) { fn = expr->fn; }
  variable_list backward(const variable_list& grads, const variable_list& saved) override {
    const at::Tensor g = grad_at(grads, 0);
    if (!g.defined() || !needs[0]) return {at::Tensor()};
    const at::Tensor up = upstream_of(g, expr->values_dtype);
    return {expr->adjoint(up.data_ptr(), saved[0])};
  }
};

/// The masked expression behind `values` when `values` is a masked_sum / masked_mean output
/// that nothing has modified since, with the tensors it reads.
struct Fused {
  std::shared_ptr<const MaskedExpr> source;
  at::Tensor tokens, mask;
};
inline Fused fused_source(const at::Tensor& values) {
  if (!values.requires_grad() || values.output_nr() != 0 || values._version() != 0) return {};
  const auto* node = dynamic_cast<const MaskedNode*>(values.grad_fn().get());
  // A modified or freed input is left to the masked node's own backward, which reports it, as
  // it would without the fusion.
  if (!node || node->released || !node->unchanged()) return {};
  return {node->expr, node->saved_tensors[0], node->saved_tensors[1]};
}

}  // namespace detail

/// @brief A sequence loss's argument: [batch] values (any tensor, with its autograd history),
/// or what masked_sum / masked_mean return, a masked reduction of token tensors that the loss
/// evaluates itself. A loss given the latter is one autograd node from the tokens to the loss:
/// the masks are read once in the forward and once in the backward, as the core reads them.
/// Converts to the [batch] values tensor wherever a tensor is wanted (the conversion attaches a
/// masked_sum node to the graph, so gradients reach the tokens from there too).
class Sequence {
 public:
  /// [batch] values, e.g. sequence log-probs computed elsewhere.
  Sequence(at::Tensor values) : values_(std::move(values)) {}  // NOLINT(google-explicit-constructor)
  /// The values as a tensor: a plain Sequence's own; a masked reduction's evaluated now, as an
  /// autograd node over the tokens.
  at::Tensor values() const {
    if (!source_) return values_;
    auto node = detail::make_node<detail::MaskedNode>(source_);
    node->keep(tokens_, "tokens");
    node->keep(mask_, "mask");
    at::Tensor v = at::empty({tokens_.size(0)}, at::TensorOptions().dtype(source_->values_dtype));
    source_->eval(v.data_ptr());
    return detail::attach({tokens_}, node, {std::move(v)})[0];
  }
  operator at::Tensor() const { return values(); }  // NOLINT(google-explicit-constructor)
  /// Whether this is a masked reduction not yet evaluated.
  bool lazy() const noexcept { return static_cast<bool>(source_); }
  const at::Tensor& tokens() const noexcept { return tokens_; }  ///< a masked reduction's tokens
  const at::Tensor& mask() const noexcept { return mask_; }      ///< a masked reduction's mask
  const at::Tensor& plain() const noexcept { return values_; }   ///< plain values (undefined when lazy)
  /// A masked reduction's expression (the adapter's internals).
  const std::shared_ptr<const detail::MaskedExpr>& source() const noexcept { return source_; }

  /// A masked reduction (masked_sum / masked_mean build it, after their checks).
  Sequence(at::Tensor tokens, at::Tensor mask, std::shared_ptr<const detail::MaskedExpr> source)
      : tokens_(std::move(tokens)), mask_(std::move(mask)), source_(std::move(source)) {}

 private:
  at::Tensor values_, tokens_, mask_;
  std::shared_ptr<const detail::MaskedExpr> source_;
};

namespace detail {

/// Node of a loss over sequence values: the core keeps d loss / d value per input (already over
/// the divisor n). A plain input's gradient is that times the row factor; an input that came
/// from masked_sum / masked_mean gets its token gradient written directly.
template <class S>
struct ValueGradNode : Node {
  struct Input {
    Eigen::Tensor<S, 1> d;  ///< d loss / d value, row-major over the input's elements
    at::IntArrayRef::value_type rows = 0;
    std::shared_ptr<const MaskedExpr> source;  ///< set when fused
    std::size_t saved = 0;                     ///< the fused tokens' index in the saved tensors
    std::vector<std::int64_t> shape;           ///< the plain input's shape
  };
  std::vector<Input> in;
  double n = 1;
  variable_list backward(const variable_list& grads, const variable_list& saved) override {
    const RowFactor u(grads, n);
    std::vector<at::Tensor> out(in.size());
    if (!u.any) return out;
    for (std::size_t k = 0; k < in.size(); ++k) {
      if (!needs[k]) continue;
      const Input& x = in[k];
      const auto total = static_cast<std::int64_t>(x.d.size());
      const std::int64_t per = x.rows ? total / x.rows : 0;
      Eigen::Tensor<S, 1> up;
      const S* upstream = x.d.data();
      if (!u.one) {
        up = Eigen::Tensor<S, 1>(x.d.size());
        for (std::int64_t j = 0; j < total; ++j)
          up.data()[j] = static_cast<S>(static_cast<double>(x.d.data()[j]) * u.at(j / per));
        upstream = up.data();
      }
      if (x.source) {
        out[k] = x.source->adjoint(upstream, saved[x.saved]);
      } else {
        out[k] = gradient(x.shape, dtype_of<S>::value);
        std::copy(upstream, upstream + total, out[k].data_ptr<S>());
      }
    }
    return out;
  }
};

template <class D, class F>
decltype(auto) on_real_type(at::ScalarType st, const char* fn, const char* name, D&& seen, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(tag<float>{});
    case at::kDouble:
      return f(tag<double>{});
    default:
      throw tensor_error(where(fn, name) + " must be float32 or float64, got " + seen());
  }
}

/// Runs a loss over K differentiable sequences `diff` (plain [batch] values, or masked
/// reductions the call evaluates; rank R: 1, or 2 for ranking scores, always plain) and
/// constant [batch] tensors `consts`, all of the first one's dtype: core(diff maps, const maps)
/// is the core call on the values; grads_of(core result) the per-input d loss / d value. A
/// masked reduction's token gradient is written through its expression, and so is a plain
/// input's that is an unmodified masked_sum / masked_mean output (see MaskedExpr).
template <template <class> class M, int R, std::size_t K, std::size_t C, class Core, class Grads>
Result<M<double>> sequence_call(const char* fn, const std::array<const Sequence*, K>& diff,
                                const std::array<const char*, K>& diff_names,
                                const std::array<const at::Tensor*, C>& consts,
                                const std::array<const char*, C>& const_names, double n_or_zero, Core&& core,
                                Grads&& grads_of) {
  const Sequence& first = *diff[0];
  if (!first.lazy()) require_defined(first.plain(), fn, diff_names[0]);
  const at::ScalarType st = first.lazy() ? first.source()->values_dtype : first.plain().scalar_type();
  return on_real_type(
      st, fn, diff_names[0], [&] { return describe(first.plain()); },
      [&](auto t) {
        using S = typename decltype(t)::type;
        using Map = Eigen::TensorMap<const Eigen::Tensor<S, R, Eigen::RowMajor>>;
        using CMap = Eigen::TensorMap<const Eigen::Tensor<S, 1, Eigen::RowMajor>>;
        const DtypeRule rule = DtypeRule::of(diff_names[0]);
        // A masked reduction's values live in `buf` (only the core reads them).
        std::array<Eigen::Tensor<S, 1>, K> buf;
        std::array<std::int64_t, K> rows{};
        for (std::size_t k = 0; k < K; ++k) {
          const Sequence& x = *diff[k];
          if (x.lazy()) {
            if (x.source()->values_dtype != dtype_of<S>::value)
              throw tensor_error(where(fn, diff_names[k]) + " must have " + dtype_name<S>() + " values (" + rule.str() +
                                 "), got a masked reduction of " + describe(x.tokens()));
            rows[k] = x.tokens().size(0);
            buf[k].resize(rows[k]);
            x.source()->eval(buf[k].data());
          }
        }
        const auto diff_map = [&](std::size_t k) -> Map {
          if constexpr (R == 1) {
            if (diff[k]->lazy()) return Map(buf[k].data(), rows[k]);
          }
          const Map m = arg<S, R>(diff[k]->plain(), fn, diff_names[k], rule);
          rows[k] = m.dimension(0);
          return m;
        };
        const std::array<Map, K> dm = array_of(std::make_index_sequence<K>{}, diff_map);
        std::array<CMap, C> cm{arg_maps<S, 1>(consts, const_names, fn, rule, std::make_index_sequence<C>{})};
        const auto res = core(dm, cm);
        auto node = make_node<ValueGradNode<S>>();
        node->fn = fn;
        node->n = n_or_zero > 0 ? n_or_zero : static_cast<double>(rows[0]);
        const std::array<const Eigen::Tensor<S, 1>*, K> d = grads_of(res);
        std::vector<at::Tensor> inputs;
        const bool graph = at::GradMode::is_enabled();
        for (std::size_t k = 0; k < K; ++k) {
          typename ValueGradNode<S>::Input x;
          x.rows = rows[k];
          Fused f;
          if (diff[k]->lazy())
            f = {diff[k]->source(), diff[k]->tokens(), diff[k]->mask()};
          else if (graph && R == 1)
            f = fused_source(diff[k]->plain());
          if (f.source) {
            x.source = std::move(f.source);
            if (graph && f.tokens.requires_grad()) {
              x.saved = node->kept.size();
              const char* of = diff[k]->lazy() ? " (a masked reduction)" : " (a masked_sum/masked_mean output)";
              node->keep(f.tokens, diff_names[k], "tokens", of);
              node->keep(f.mask, diff_names[k], "mask", of);
            }
            inputs.push_back(f.tokens);
          } else {
            x.shape = diff[k]->plain().sizes().vec();
            inputs.push_back(diff[k]->plain());
          }
          if (graph && inputs.back().requires_grad()) x.d = *d[k];
          node->in.push_back(std::move(x));
        }
        return result_of<M>(res,
                            attach(inputs, node, {scalar_of<S>(static_cast<double>(res.loss)), copy_of(res.losses)}));
      });
}

/// The core's masked expression, viewing the tokens and the mask.
template <class Expr>
struct MaskedExprOf final : MaskedExpr {
  using Scalar = typename Expr::Scalar;
  using Storage = typename Expr::Storage;
  Expr expr;
  explicit MaskedExprOf(Expr e) : expr(std::move(e)) {}
  void eval(void* out) const override { expr.eval_to(static_cast<Scalar*>(out)); }
  at::Tensor adjoint(const void* upstream, const at::Tensor& tokens) const override {
    at::Tensor grad = gradient(tokens.sizes(), tokens.scalar_type());
    expr.backward_to(static_cast<const Scalar*>(upstream), expr.grad_view(write_map<Storage, 2>(grad), fn, "grad"));
    return grad;
  }
};

template <Reduction Red>
Sequence masked(const char* fn, const at::Tensor& tokens, const at::Tensor& mask) {
  return on_token(tokens, fn, "tokens", [&](auto t) {
    using S = typename decltype(t)::type;
    using C = prefloss::detail::compute_t<S>;
    require_readable(tokens, fn, "tokens", 2, rank_dims(2));
    return on_mask<C>(mask, fn, "mask", [&](auto m) {
      using Mk = typename decltype(m)::type;
      require_readable(mask, fn, "mask", 2, rank_dims(2));
      const auto xt = read_map<S, 2>(tokens);
      const auto mt = read_map<Mk, 2>(mask);
      using Expr = MaskedReduction<S, Mk, Red>;
      Expr expr = [&] {
        if constexpr (Red == Reduction::sum)
          return prefloss::masked_sum(xt, mt);
        else
          return prefloss::masked_mean(xt, mt);
      }();
      auto source = std::make_shared<MaskedExprOf<Expr>>(expr);
      source->fn = fn;
      source->values_dtype = dtype_of<C>::value;
      return Sequence(tokens, mask, std::move(source));
    });
  });
}

/// grad *= the row factor, row by row (rows are grad's first dimension); nothing when it is
/// exactly 1, the common case.
inline void scale_rows(at::Tensor& grad, const RowFactor& u) {
  if (u.one) return;
  if (!u.gl.defined()) {
    grad.mul_(u.g);
    return;
  }
  std::vector<std::int64_t> shape(static_cast<std::size_t>(grad.dim()), 1);
  shape[0] = grad.size(0);
  grad.mul_((u.gl * u.n + u.g).to(grad.scalar_type()).view(shape));
}

/// @brief Node of a token loss. When the input requires a gradient the forward is the core's
/// fused call (one pass over the tokens, as the core runs it) and the first backward hands that
/// gradient to autograd; a later backward (retain_graph) runs the core's backward again from
/// the saved tensors.
template <class Core>
struct TokenNode : Node {
  Core core;
  at::Tensor grad;  ///< from the fused forward, until the first backward takes it
  explicit TokenNode(Core c) : core(std::move(c)) {}
  variable_list backward(const variable_list& grads, const variable_list& saved) override {
    const RowFactor u(grads, 1.0);
    if (!u.any || !needs[0]) return {at::Tensor()};
    at::Tensor g = std::move(grad);
    grad = at::Tensor();
    if (!g.defined()) {
      g = gradient(saved[0].sizes(), saved[0].scalar_type());
      core.backward(write_map<typename Core::Scalar, 2>(g));
    }
    scale_rows(g, u);
    return {g};
  }
};

/// The token loss call: x is the differentiated input, `others` the constant token tensors of
/// its dtype, mask of bool, uint8 or that dtype. core(x, others, mask, grad) is the core call,
/// fused into *grad when grad is not null.
template <template <class> class M, std::size_t K, class Core>
Result<M<double>> token_call(const char* fn, const at::Tensor& x, const char* x_name,
                             const std::array<const at::Tensor*, K>& others, const std::array<const char*, K>& names,
                             const at::Tensor& mask, Core&& core) {
  return on_real(x, fn, x_name, [&](auto t) {
    using S = typename decltype(t)::type;
    using Map = Eigen::TensorMap<const Eigen::Tensor<S, 2, Eigen::RowMajor>>;
    require_readable(x, fn, x_name, 2, rank_dims(2));
    std::array<Map, K> om{arg_maps<S, 2>(others, names, fn, DtypeRule::of(x_name), std::make_index_sequence<K>{})};
    return on_mask<S>(mask, fn, "mask", [&](auto m) {
      using Mk = typename decltype(m)::type;
      require_readable(mask, fn, "mask", 2, rank_dims(2));
      const bool fuse = at::GradMode::is_enabled() && x.requires_grad();
      at::Tensor grad = fuse ? gradient(x.sizes(), x.scalar_type()) : at::Tensor();
      auto gmap = write_map<S, 2>(fuse ? grad : x);
      auto res = core(read_map<S, 2>(x), om, read_map<Mk, 2>(mask), fuse ? &gmap : nullptr);
      auto node = make_node<TokenNode<decltype(res)>>(res);
      node->fn = fn;
      node->grad = std::move(grad);
      node->keep(x, x_name);
      for (std::size_t k = 0; k < K; ++k) node->keep(*others[k], names[k]);
      node->keep(mask, "mask");
      return result_of<M>(res, attach({x}, node, {scalar_of<S>(static_cast<double>(res.loss)), copy_of(res.losses)}));
    });
  });
}

/// Node of token_logprobs: the core result views the logits, labels and mask (kept); the
/// backward is the core's into a new [batch, tokens, vocab] gradient of the logits' dtype.
template <class Core, class Z>
struct LogprobNode : Node {
  Core core;
  explicit LogprobNode(Core c) : core(std::move(c)) {}
  variable_list backward(const variable_list& grads, const variable_list& saved) override {
    using C = prefloss::detail::compute_t<Z>;
    at::Tensor glp = grad_at(grads, 0), gh = grad_at(grads, 1);
    if ((!glp.defined() && !gh.defined()) || !needs[0]) return {at::Tensor()};
    const at::Tensor& z = saved[0];
    // Only the entropy got a gradient: the logp upstream is 0 ([batch, tokens], not vocab-sized).
    glp = glp.defined() ? upstream_of(glp, dtype_of<C>::value) : at::zeros({z.size(0), z.size(1)}, options_of<C>());
    at::Tensor grad = gradient(z.sizes(), z.scalar_type());
    if (gh.defined()) {
      gh = upstream_of(gh, dtype_of<C>::value);
      core.backward(read_map<C, 2>(glp), read_map<C, 2>(gh), write_map<Z, 3>(grad));
    } else {
      core.backward(read_map<C, 2>(glp), write_map<Z, 3>(grad));
    }
    return {grad};
  }
};

/// The ppo_clip_from_logits node: its gradient was written in the forward (the core call is
/// fused); the backward hands it to autograd once, scaled in place when the upstream is not 1.
struct HandOverNode : Node {
  at::Tensor grad;
  bool handed = false;
  variable_list backward(const variable_list& grads, const variable_list& /*saved*/) override {
    const RowFactor u(grads, 1.0);
    if (!u.any || !needs[0]) return {at::Tensor()};
    if (handed)
      throw tensor_error(std::string("prefloss::torch::") + fn +
                         ": backward ran a second time (retain_graph); this loss computes its gradient in the "
                         "forward pass and hands it to autograd once: call the loss again instead");
    handed = true;
    scale_rows(grad, u);
    return {std::move(grad)};
  }
};

}  // namespace detail

/// @brief Per-sequence masked sum (prefloss::masked_sum): [batch, tokens] tokens (float32,
/// float64, bfloat16 or float16) and mask (bool, uint8, or weights in the compute dtype) to
/// [batch] values (float32 for 16-bit tokens), summed in double; masked-out tokens are never
/// read, so they may hold inf or NaN, and get gradient 0.
///
/// Returns a Sequence: passed to a loss, the loss evaluates it and writes the token gradient
/// itself (one autograd node); converted to at::Tensor (or `.values()`), it is an autograd node
/// of its own whose backward writes upstream times the weight. The shapes, dtypes and layouts
/// are checked here.
inline Sequence masked_sum(const at::Tensor& tokens, const at::Tensor& mask) {
  return detail::masked<Reduction::sum>("masked_sum", tokens, mask);
}

/// @brief Per-sequence masked mean (sum of w x over the sum of w; 0 with gradient 0 for a row
/// with no selected token); otherwise as masked_sum.
inline Sequence masked_mean(const at::Tensor& tokens, const at::Tensor& mask) {
  return detail::masked<Reduction::mean>("masked_mean", tokens, mask);
}

/// @brief DPO (prefloss::dpo) of [batch] policy sequence values against reference values; all
/// four of one dtype (float32 or float64). Gradients reach chosen and rejected.
inline PreferenceResult dpo(const Sequence& chosen, const Sequence& rejected, const at::Tensor& ref_chosen,
                            const at::Tensor& ref_rejected, const DpoOptions& opt = {}) {
  return detail::sequence_call<PreferenceMetrics, 1, 2, 2>(
      "dpo", {&chosen, &rejected}, {"chosen", "rejected"}, {&ref_chosen, &ref_rejected}, {"ref_chosen", "ref_rejected"},
      opt.batch_count.value_or(0),
      [&](const auto& d, const auto& c) { return prefloss::dpo(d[0], d[1], c[0], c[1], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief IPO (prefloss::ipo); arguments as dpo.
inline PreferenceResult ipo(const Sequence& chosen, const Sequence& rejected, const at::Tensor& ref_chosen,
                            const at::Tensor& ref_rejected, const IpoOptions& opt = {}) {
  return detail::sequence_call<PreferenceMetrics, 1, 2, 2>(
      "ipo", {&chosen, &rejected}, {"chosen", "rejected"}, {&ref_chosen, &ref_rejected}, {"ref_chosen", "ref_rejected"},
      opt.batch_count.value_or(0),
      [&](const auto& d, const auto& c) { return prefloss::ipo(d[0], d[1], c[0], c[1], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief SimPO (prefloss::simpo) of [batch] policy values (masked_mean log-probs).
inline PreferenceResult simpo(const Sequence& chosen, const Sequence& rejected, const SimpoOptions& opt = {}) {
  return detail::sequence_call<PreferenceMetrics, 1, 2, 0>(
      "simpo", {&chosen, &rejected}, {"chosen", "rejected"}, {}, {}, opt.batch_count.value_or(0),
      [&](const auto& d, const auto&) { return prefloss::simpo(d[0], d[1], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief ORPO (prefloss::orpo) of [batch] policy values (masked_mean log-probs).
inline OrpoResult orpo(const Sequence& chosen, const Sequence& rejected, const OrpoOptions& opt = {}) {
  return detail::sequence_call<OrpoMetrics, 1, 2, 0>(
      "orpo", {&chosen, &rejected}, {"chosen", "rejected"}, {}, {}, opt.batch_count.value_or(0),
      [&](const auto& d, const auto&) { return prefloss::orpo(d[0], d[1], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief Bradley-Terry (prefloss::bradley_terry) of [batch] rewards.
inline PreferenceResult bradley_terry(const Sequence& r_chosen, const Sequence& r_rejected,
                                      const BradleyTerryOptions& opt = {}) {
  return detail::sequence_call<PreferenceMetrics, 1, 2, 0>(
      "bradley_terry", {&r_chosen, &r_rejected}, {"r_chosen", "r_rejected"}, {}, {}, opt.batch_count.value_or(0),
      [&](const auto& d, const auto&) { return prefloss::bradley_terry(d[0], d[1], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief Bradley-Terry with a constant per-pair [batch] margin (Llama 2).
inline PreferenceResult bradley_terry(const Sequence& r_chosen, const Sequence& r_rejected, const at::Tensor& margin,
                                      const BradleyTerryOptions& opt = {}) {
  return detail::sequence_call<PreferenceMetrics, 1, 2, 1>(
      "bradley_terry", {&r_chosen, &r_rejected}, {"r_chosen", "r_rejected"}, {&margin}, {"margin"},
      opt.batch_count.value_or(0),
      [&](const auto& d, const auto& c) { return prefloss::bradley_terry(d[0], d[1], c[0], opt); },
      [](const auto& r) {
        return std::array{&r.grad_chosen_value(), &r.grad_rejected_value()};
      });
}

/// @brief Bradley-Terry over K-way rankings (prefloss::bradley_terry_ranking): [batch, K]
/// rewards, each row best to worst.
inline RankingResult bradley_terry_ranking(const at::Tensor& rewards, const BradleyTerryOptions& opt = {}) {
  const Sequence scores(rewards);
  return detail::sequence_call<RankingMetrics, 2, 1, 0>(
      "bradley_terry_ranking", {&scores}, {"rewards"}, {}, {}, opt.batch_count.value_or(0),
      [&](const auto& d, const auto&) { return prefloss::bradley_terry_ranking(d[0], opt); },
      [](const auto& r) { return std::array{&r.grad_value()}; });
}

/// @brief Negative log-likelihood (prefloss::nll) of [batch] sequence values.
inline NllResult nll(const Sequence& logp_sequence, const NllOptions& opt = {}) {
  const double n = opt.normalizer ? *opt.normalizer : opt.batch_count.value_or(0);
  return detail::sequence_call<NllMetrics, 1, 1, 0>(
      "nll", {&logp_sequence}, {"logp_sequence"}, {}, {}, n,
      [&](const auto& d, const auto&) { return prefloss::nll(d[0], opt); },
      [](const auto& r) { return std::array{&r.grad_value()}; });
}

/// @brief KTO (prefloss::kto): [batch] policy and reference values, a [batch] bool or uint8
/// `desirable`, and the KL batch's [kl_batch] values (constants: z0 is detached), all values of
/// policy's dtype. Gradients reach policy.
inline KtoResult kto(const Sequence& policy, const at::Tensor& ref, const at::Tensor& desirable,
                     const at::Tensor& kl_policy, const at::Tensor& kl_ref, const KtoOptions& opt = {}) {
  constexpr const char* fn = "kto";
  return detail::sequence_call<KtoMetrics, 1, 1, 1>(
      fn, {&policy}, {"policy"}, {&ref}, {"ref"}, opt.batch_count.value_or(0),
      [&](const auto& d, const auto& c) {
        using S = typename std::decay_t<decltype(d[0])>::Scalar;
        const auto kp = detail::arg<S, 1>(kl_policy, fn, "kl_policy", "the dtype of 'policy'");
        const auto kr = detail::arg<S, 1>(kl_ref, fn, "kl_ref", "the dtype of 'policy'");
        detail::require_readable(desirable, fn, "desirable", 1, detail::rank_dims(1));
        if (desirable.scalar_type() == at::kBool)
          return prefloss::kto(d[0], c[0], detail::read_map<bool, 1>(desirable), kp, kr, opt);
        if (desirable.scalar_type() != at::kByte)
          throw tensor_error(detail::where(fn, "desirable") + " must be bool or uint8, got " +
                             detail::describe(desirable));
        return prefloss::kto(d[0], c[0], detail::read_map<std::uint8_t, 1>(desirable), kp, kr, opt);
      },
      [](const auto& r) { return std::array{&r.grad_value()}; });
}

/// @brief KTO's reference-point sums over a KL batch (prefloss::kto_reference_sums): all-reduce
/// them across ranks and pass reference_point() as KtoOptions::reference_point.
inline KtoReferenceSums kto_reference_sums(const at::Tensor& kl_policy, const at::Tensor& kl_ref,
                                           const Threads& threads = {}) {
  constexpr const char* fn = "kto_reference_sums";
  return detail::on_real(kl_policy, fn, "kl_policy", [&](auto t) {
    using S = typename decltype(t)::type;
    const auto kp = detail::arg<S, 1>(kl_policy, fn, "kl_policy", detail::dtype_name<S>());
    const auto kr = detail::arg<S, 1>(kl_ref, fn, "kl_ref", "the dtype of 'kl_policy'");
    return prefloss::kto_reference_sums(kp, kr, threads);
  });
}

/// @brief PPO-clip (prefloss::ppo_clip) over [batch, tokens] logp, old_logp and advantages of
/// one dtype (float32 or float64) and a mask. Gradients reach logp.
inline PpoResult ppo_clip(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& mask, const PpoOptions& opt = {}) {
  return detail::token_call<PpoMetrics, 2>(
      "ppo_clip", logp, "logp", {&old_logp, &advantages}, {"old_logp", "advantages"}, mask,
      [&](const auto& x, const auto& o, const auto& m, auto* g) {
        return g ? prefloss::ppo_clip(x, o[0], o[1], m, opt, *g) : prefloss::ppo_clip(x, o[0], o[1], m, opt);
      });
}

/// @brief ppo_clip with a reference policy's [batch, tokens] log-probs for the KL term.
inline PpoResult ppo_clip(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& mask, const at::Tensor& ref_logp, const PpoOptions& opt = {}) {
  return detail::token_call<PpoMetrics, 3>("ppo_clip", logp, "logp", {&old_logp, &advantages, &ref_logp},
                                           {"old_logp", "advantages", "ref_logp"}, mask,
                                           [&](const auto& x, const auto& o, const auto& m, auto* g) {
                                             return g ? prefloss::ppo_clip(x, o[0], o[1], m, o[2], opt, *g)
                                                      : prefloss::ppo_clip(x, o[0], o[1], m, o[2], opt);
                                           });
}

/// @brief The clipped value loss (prefloss::value_loss) over [batch, tokens] values, old values
/// and returns of one dtype and a mask. Gradients reach values.
inline ValueLossResult value_loss(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                  const at::Tensor& mask, const ValueOptions& opt = {}) {
  return detail::token_call<ValueMetrics, 2>(
      "value_loss", values, "values", {&old_values, &returns}, {"old_values", "returns"}, mask,
      [&](const auto& x, const auto& o, const auto& m, auto* g) {
        return g ? prefloss::value_loss(x, o[0], o[1], m, opt, *g) : prefloss::value_loss(x, o[0], o[1], m, opt);
      });
}

/// @brief CISPO (prefloss::cispo) over [batch, tokens] logp, old_logp and advantages of one
/// dtype (float32 or float64) and a mask (bool, uint8 or weights of that dtype). Gradients reach
/// logp (the clipped weight is detached, as in the core), never old_logp or advantages.
inline CispoResult cispo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                         const at::Tensor& mask, const CispoOptions& opt = {}) {
  return detail::token_call<CispoMetrics, 2>(
      "cispo", logp, "logp", {&old_logp, &advantages}, {"old_logp", "advantages"}, mask,
      [&](const auto& x, const auto& o, const auto& m, auto* g) {
        return g ? prefloss::cispo(x, o[0], o[1], m, opt, *g) : prefloss::cispo(x, o[0], o[1], m, opt);
      });
}

/// @brief SAPO (prefloss::sapo) over [batch, tokens] logp, old_logp and advantages of one dtype
/// (float32 or float64) and a mask. Gradients reach logp, never old_logp or advantages.
inline SapoResult sapo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                       const at::Tensor& mask, const SapoOptions& opt = {}) {
  return detail::token_call<SapoMetrics, 2>("sapo", logp, "logp", {&old_logp, &advantages}, {"old_logp", "advantages"},
                                            mask, [&](const auto& x, const auto& o, const auto& m, auto* g) {
                                              return g ? prefloss::sapo(x, o[0], o[1], m, opt, *g)
                                                       : prefloss::sapo(x, o[0], o[1], m, opt);
                                            });
}

/// @brief GPG (prefloss::gpg) over [batch, tokens] logp, old_logp (read for approx_kl only) and
/// advantages of one dtype (float32 or float64) and a mask. Gradients reach logp, never old_logp
/// or advantages.
inline GpgResult gpg(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                     const at::Tensor& mask, const GpgOptions& opt = {}) {
  return detail::token_call<GpgMetrics, 2>("gpg", logp, "logp", {&old_logp, &advantages}, {"old_logp", "advantages"},
                                           mask, [&](const auto& x, const auto& o, const auto& m, auto* g) {
                                             return g ? prefloss::gpg(x, o[0], o[1], m, opt, *g)
                                                      : prefloss::gpg(x, o[0], o[1], m, opt);
                                           });
}

/// @brief GMPO (prefloss::gmpo) over [batch, tokens] logp, old_logp and advantages of one dtype
/// (float32 or float64) and a mask; `.losses` are the rows' -Abar_i rho_i / B (loss = their sum).
/// Gradients reach logp, never old_logp or advantages.
inline GmpoResult gmpo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                       const at::Tensor& mask, const GmpoOptions& opt = {}) {
  return detail::token_call<GmpoMetrics, 2>("gmpo", logp, "logp", {&old_logp, &advantages}, {"old_logp", "advantages"},
                                            mask, [&](const auto& x, const auto& o, const auto& m, auto* g) {
                                              return g ? prefloss::gmpo(x, o[0], o[1], m, opt, *g)
                                                       : prefloss::gmpo(x, o[0], o[1], m, opt);
                                            });
}

/// @brief Clip-Cov (prefloss::clip_cov) over [batch, tokens] logp, old_logp, advantages and
/// `selected` (clip_cov_select's output, or any 0/1 tensor) of one dtype (float32 or float64)
/// and a mask. `selected` is a constant of the loss: gradients reach logp only, never old_logp,
/// advantages or selected.
inline ClipCovResult clip_cov(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                              const at::Tensor& mask, const at::Tensor& selected, const ClipCovOptions& opt = {}) {
  return detail::token_call<ClipCovMetrics, 3>("clip_cov", logp, "logp", {&old_logp, &advantages, &selected},
                                               {"old_logp", "advantages", "selected"}, mask,
                                               [&](const auto& x, const auto& o, const auto& m, auto* g) {
                                                 return g ? prefloss::clip_cov(x, o[0], o[1], m, o[2], opt, *g)
                                                          : prefloss::clip_cov(x, o[0], o[1], m, o[2], opt);
                                               });
}

/// @brief KL-Cov (prefloss::kl_cov) over [batch, tokens] logp, old_logp, advantages and
/// `selected` (kl_cov_select's output) of one dtype (float32 or float64) and a mask. Gradients
/// reach logp only, never old_logp, advantages or selected.
inline KlCovResult kl_cov(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& mask, const at::Tensor& selected, const KlCovOptions& opt = {}) {
  return detail::token_call<KlCovMetrics, 3>(
      "kl_cov", logp, "logp", {&old_logp, &advantages, &selected}, {"old_logp", "advantages", "selected"}, mask,
      [&](const auto& x, const auto& o, const auto& m, auto* g) {
        return g ? prefloss::kl_cov(x, o[0], o[1], m, o[2], opt, *g) : prefloss::kl_cov(x, o[0], o[1], m, o[2], opt);
      });
}

namespace detail {
/// A cov selection: logp (float32 or float64) fixes the dtype of the other token tensors and of
/// the new selection tensor; core(logp, others, mask, selected_out) is the core call.
template <std::size_t K, class Core>
CovSelectionOutputs cov_select_call(const char* fn, const at::Tensor& logp,
                                    const std::array<const at::Tensor*, K>& others,
                                    const std::array<const char*, K>& names, const at::Tensor& mask, Core&& core) {
  return on_real(logp, fn, "logp", [&](auto t) {
    using S = typename decltype(t)::type;
    require_readable(logp, fn, "logp", 2, rank_dims(2));
    const auto om = arg_maps<S, 2>(others, names, fn, DtypeRule::of("logp"), std::make_index_sequence<K>{});
    return on_mask<S>(mask, fn, "mask", [&](auto m) {
      using Mk = typename decltype(m)::type;
      require_readable(mask, fn, "mask", 2, rank_dims(2));
      CovSelectionOutputs r;
      r.selected = new_cpu<S>({logp.size(0), logp.size(1)});
      r.info = core(read_map<S, 2>(logp), om, read_map<Mk, 2>(mask), write_map<S, 2>(r.selected));
      return r;
    });
  });
}
}  // namespace detail

/// @brief Clip-Cov's token selection (prefloss::clip_cov_select) over [batch, tokens] logp,
/// old_logp and advantages of one dtype (float32 or float64) and a mask: a new selection tensor
/// of logp's dtype and the core's CovSelection. Not differentiable: no autograd node, and the
/// inputs' requires_grad is ignored.
inline CovSelectionOutputs clip_cov_select(const at::Tensor& logp, const at::Tensor& old_logp,
                                           const at::Tensor& advantages, const at::Tensor& mask,
                                           const ClipCovOptions& opt = {}) {
  return detail::cov_select_call<2>("clip_cov_select", logp, {&old_logp, &advantages}, {"old_logp", "advantages"}, mask,
                                    [&](const auto& x, const auto& o, const auto& m, auto out) {
                                      return prefloss::clip_cov_select(x, o[0], o[1], m, opt, out);
                                    });
}

/// @brief KL-Cov's token selection (prefloss::kl_cov_select) over [batch, tokens] logp and
/// advantages of one dtype (float32 or float64) and a mask: a new selection tensor of logp's
/// dtype and the core's CovSelection. Not differentiable, as clip_cov_select.
inline CovSelectionOutputs kl_cov_select(const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask,
                                         const KlCovOptions& opt = {}) {
  return detail::cov_select_call<1>("kl_cov_select", logp, {&advantages}, {"advantages"}, mask,
                                    [&](const auto& x, const auto& o, const auto& m, auto out) {
                                      return prefloss::kl_cov_select(x, o[0], m, opt, out);
                                    });
}

/// @brief Rollout-correction importance weights (prefloss::rollout_is_weights) from [batch,
/// tokens] old_logp and rollout_logp (float32 or float64, each its own) and a mask (bool, uint8,
/// or weights of old_logp's dtype): new weights of old_logp's dtype and the keep mask (bool).
/// Not differentiable: no autograd node (the weights are constants of the loss, as verl's).
inline RolloutIsOutputs rollout_is_weights(const at::Tensor& old_logp, const at::Tensor& rollout_logp,
                                           const at::Tensor& mask, const RolloutIsOptions& opt = {}) {
  constexpr const char* fn = "rollout_is_weights";
  return detail::on_real(old_logp, fn, "old_logp", [&](auto ot) {
    using S = typename decltype(ot)::type;
    detail::require_readable(old_logp, fn, "old_logp", 2, detail::rank_dims(2));
    return detail::on_real(rollout_logp, fn, "rollout_logp", [&](auto rt) {
      using R = typename decltype(rt)::type;
      detail::require_readable(rollout_logp, fn, "rollout_logp", 2, detail::rank_dims(2));
      return detail::on_mask<S>(mask, fn, "mask", [&](auto mt) {
        using Mk = typename decltype(mt)::type;
        detail::require_readable(mask, fn, "mask", 2, detail::rank_dims(2));
        RolloutIsOutputs r;
        r.weights = detail::new_cpu<S>({old_logp.size(0), old_logp.size(1)});
        r.keep = detail::new_cpu<bool>({old_logp.size(0), old_logp.size(1)});
        r.metrics = prefloss::rollout_is_weights(detail::read_map<S, 2>(old_logp), detail::read_map<R, 2>(rollout_logp),
                                                 detail::read_map<Mk, 2>(mask), opt, detail::write_map<S, 2>(r.weights),
                                                 detail::write_map<bool, 2>(r.keep));
        return r;
      });
    });
  });
}

/// @brief Token log-probs (and the entropy with LogprobOptions::entropy) from [batch, tokens,
/// vocab] logits (float32, float64, bfloat16 or float16), [batch, tokens] int64 or int32 labels
/// and a mask (prefloss::token_logprobs), as an autograd node to the logits. Masked-out tokens'
/// logits are never read and get a zero gradient row.
inline LogprobOutputs token_logprobs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mask,
                                     const LogprobOptions& opt = {}) {
  constexpr const char* fn = "token_logprobs";
  return detail::on_token(logits, fn, "logits", [&](auto zt) {
    using Z = typename decltype(zt)::type;
    using C = prefloss::detail::compute_t<Z>;
    detail::require_readable(logits, fn, "logits", 3, detail::rank_dims(3));
    return detail::on_label(labels, fn, "labels", [&](auto yt) {
      using Y = typename decltype(yt)::type;
      detail::require_readable(labels, fn, "labels", 2, detail::rank_dims(2));
      return detail::on_mask<C>(mask, fn, "mask", [&](auto mt) {
        using Mk = typename decltype(mt)::type;
        detail::require_readable(mask, fn, "mask", 2, detail::rank_dims(2));
        const auto z = detail::read_map<Z, 3>(logits);
        const auto y = detail::read_map<Y, 2>(labels);
        const auto m = detail::read_map<Mk, 2>(mask);
        at::Tensor logp = at::empty({logits.size(0), logits.size(1)}, detail::options_of<C>());
        at::Tensor entropy = opt.entropy ? at::empty_like(logp) : at::Tensor();
        auto res = opt.entropy ? prefloss::token_logprobs(z, y, m, opt, detail::write_map<C, 2>(logp),
                                                          detail::write_map<C, 2>(entropy))
                               : prefloss::token_logprobs(z, y, m, opt, detail::write_map<C, 2>(logp));
        auto node = detail::make_node<detail::LogprobNode<decltype(res), Z>>(std::move(res));
        node->fn = fn;
        node->keep(logits, "logits");
        node->keep(labels, "labels");
        node->keep(mask, "mask");
        detail::variable_list outputs{logp};
        if (opt.entropy) outputs.push_back(entropy);
        auto out = detail::attach({logits}, node, std::move(outputs));
        return LogprobOutputs{out[0], opt.entropy ? out[1] : at::Tensor()};
      });
    });
  });
}

namespace detail {
/// An owning Eigen tensor handed to ATen without a copy: the tensor's deleter frees it. An
/// empty one (not computed) gives an undefined tensor.
template <class C, int R, int Opt>
at::Tensor adopt(Eigen::Tensor<C, R, Opt>&& t) {
  static_assert(R == 1 || Opt == Eigen::RowMajor, "prefloss: only row-major tensors map onto ATen's layout");
  if (t.size() == 0) return at::Tensor();
  auto* owner = new Eigen::Tensor<C, R, Opt>(std::move(t));
  std::vector<std::int64_t> dims(owner->dimensions().begin(), owner->dimensions().end());
  return at::from_blob(
      owner->data(), dims, [owner](void*) { delete owner; }, options_of<C>());
}

/// Node of linear_logprobs: the core result keeps the selected tokens' statistics and views
/// hidden, weight, labels and mask (saved); the backward is the core's. The core writes the
/// gradients of hidden and weight together, so both are allocated; one that no input needs is
/// dropped.
template <class Core, class S>
struct LinearNode : Node {
  Core core;
  explicit LinearNode(Core c) : core(std::move(c)) {}
  variable_list backward(const variable_list& grads, const variable_list& saved) override {
    at::Tensor glp = grad_at(grads, 0), gh = grad_at(grads, 1);
    if ((!glp.defined() && !gh.defined()) || (!needs[0] && !needs[1])) return {at::Tensor(), at::Tensor()};
    const at::Tensor &h = saved[0], &w = saved[1];
    glp = glp.defined() ? upstream_of(glp, dtype_of<S>::value) : at::zeros({h.size(0)}, options_of<S>());
    at::Tensor dh = detail::gradient(h.sizes(), h.scalar_type()), dw = detail::gradient(w.sizes(), w.scalar_type());
    if (gh.defined()) {
      gh = upstream_of(gh, dtype_of<S>::value);
      core.backward(read_map<S, 1>(glp), read_map<S, 1>(gh), write_map<S, 2>(dh), write_map<S, 2>(dw));
    } else {
      core.backward(read_map<S, 1>(glp), write_map<S, 2>(dh), write_map<S, 2>(dw));
    }
    return {needs[0] ? dh : at::Tensor(), needs[1] ? dw : at::Tensor()};
  }
};

template <class Core>
PpoLogitsOutputs ppo_from_logits(const char* fn, const at::Tensor& logits, const at::Tensor& labels,
                                 const std::vector<std::pair<const at::Tensor*, const char*>>& tokens,
                                 const at::Tensor& mask, Core&& core) {
  return on_token(logits, fn, "logits", [&](auto zt) {
    using Z = typename decltype(zt)::type;
    using C = prefloss::detail::compute_t<Z>;
    require_readable(logits, fn, "logits", 3, rank_dims(3));
    const std::string rule = std::string("the log-probs' dtype, ") + dtype_name<C>() + " for these logits";
    std::vector<Eigen::TensorMap<const Eigen::Tensor<C, 2, Eigen::RowMajor>>> maps;
    for (const auto& [t, name] : tokens) maps.push_back(arg<C, 2>(*t, fn, name, rule.c_str()));
    return on_label(labels, fn, "labels", [&](auto yt) {
      using Y = typename decltype(yt)::type;
      require_readable(labels, fn, "labels", 2, rank_dims(2));
      return on_mask<C>(mask, fn, "mask", [&](auto mt) {
        using Mk = typename decltype(mt)::type;
        require_readable(mask, fn, "mask", 2, rank_dims(2));
        at::Tensor grad = detail::gradient(logits.sizes(), logits.scalar_type());
        auto res =
            core(read_map<Z, 3>(logits), read_map<Y, 2>(labels), maps, read_map<Mk, 2>(mask), write_map<Z, 3>(grad));
        auto node = make_node<HandOverNode>();
        node->fn = fn;
        node->grad = std::move(grad);
        auto out = attach({logits}, node, {scalar_of<C>(static_cast<double>(res.loss)), copy_of(res.losses)});
        PpoLogitsOutputs r;
        r.loss = std::move(out[0]);
        r.losses = std::move(out[1]);
        r.logp = adopt(std::move(res.logp));
        r.entropy = adopt(std::move(res.entropy));
        r.policy_loss = static_cast<double>(res.policy_loss);
        r.entropy_loss = static_cast<double>(res.entropy_loss);
        r.metric_sums = widen(res.metric_sums);
        r.metrics = r.metric_sums.metrics();
        return r;
      });
    });
  });
}
}  // namespace detail

/// @brief Token log-probs (and the entropy) through the LM head without the [N, V] logits
/// (prefloss::linear_logprobs): hidden [N, H] and weight [V, H] of one dtype (float32 or
/// float64), labels [N] (int64 or int32) and a mask [N]; an autograd node to hidden and weight.
/// Returns logp and entropy [N] (entropy undefined unless LogprobOptions::entropy); masked-out
/// tokens' hidden rows and labels are never read.
inline LogprobOutputs linear_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                      const at::Tensor& mask, const LogprobOptions& opt = {}) {
  constexpr const char* fn = "linear_logprobs";
  return detail::on_real(hidden, fn, "hidden", [&](auto t) {
    using S = typename decltype(t)::type;
    detail::require_readable(hidden, fn, "hidden", 2, "([tokens, hidden])");
    const auto w = detail::arg<S, 2>(weight, fn, "weight", "the dtype of 'hidden'");
    return detail::on_label(labels, fn, "labels", [&](auto yt) {
      using Y = typename decltype(yt)::type;
      detail::require_readable(labels, fn, "labels", 1, "([tokens])");
      return detail::on_mask<S>(mask, fn, "mask", [&](auto mt) {
        using Mk = typename decltype(mt)::type;
        detail::require_readable(mask, fn, "mask", 1, "([tokens])");
        auto res = prefloss::linear_logprobs(detail::read_map<S, 2>(hidden), w, detail::read_map<Y, 1>(labels),
                                             detail::read_map<Mk, 1>(mask), opt);
        at::Tensor logp = detail::adopt(std::move(res.logp));
        if (!logp.defined()) logp = at::empty({0}, detail::options_of<S>());
        at::Tensor entropy = opt.entropy ? detail::adopt(std::move(res.entropy)) : at::Tensor();
        if (opt.entropy && !entropy.defined()) entropy = at::empty({0}, detail::options_of<S>());
        auto node = detail::make_node<detail::LinearNode<decltype(res), S>>(std::move(res));
        node->fn = fn;
        node->keep(hidden, "hidden");
        node->keep(weight, "weight");
        node->keep(labels, "labels");
        node->keep(mask, "mask");
        detail::variable_list outputs{logp};
        if (opt.entropy) outputs.push_back(entropy);
        auto out = detail::attach({hidden, weight}, node, std::move(outputs));
        return LogprobOutputs{out[0], opt.entropy ? out[1] : at::Tensor()};
      });
    });
  });
}

/// @brief PPO-clip from logits (prefloss::ppo_clip_from_logits): the token log-probs, the
/// optional entropy bonus and the loss in the core's fused passes; [batch, tokens] old_logp and
/// advantages of the log-probs' dtype. The gradient to the logits is computed in the forward
/// (the core call is fused) and handed to autograd by the backward, once.
inline PpoLogitsOutputs ppo_clip_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                             const at::Tensor& old_logp, const at::Tensor& advantages,
                                             const at::Tensor& mask, const PpoOptions& popt = {},
                                             const LogprobOptions& lopt = {}) {
  return detail::ppo_from_logits("ppo_clip_from_logits", logits, labels,
                                 {{&old_logp, "old_logp"}, {&advantages, "advantages"}}, mask,
                                 [&](const auto& z, const auto& y, const auto& o, const auto& m, auto g) {
                                   return prefloss::ppo_clip_from_logits(z, y, o[0], o[1], m, popt, lopt, g);
                                 });
}

/// @brief ppo_clip_from_logits with a reference policy's [batch, tokens] log-probs (KL term).
inline PpoLogitsOutputs ppo_clip_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                             const at::Tensor& old_logp, const at::Tensor& advantages,
                                             const at::Tensor& mask, const at::Tensor& ref_logp,
                                             const PpoOptions& popt = {}, const LogprobOptions& lopt = {}) {
  return detail::ppo_from_logits("ppo_clip_from_logits", logits, labels,
                                 {{&old_logp, "old_logp"}, {&advantages, "advantages"}, {&ref_logp, "ref_logp"}}, mask,
                                 [&](const auto& z, const auto& y, const auto& o, const auto& m, auto g) {
                                   return prefloss::ppo_clip_from_logits(z, y, o[0], o[1], m, o[2], popt, lopt, g);
                                 });
}

}  // namespace prefloss::torch
