// prefloss's libtorch adapter (prefloss/torch.hpp) as a Python module, built by PyTorch's JIT
// extension loader (torch.utils.cpp_extension.load; see dpo_swap.py for the call):
//
//     ext = torch.utils.cpp_extension.load(
//         name="prefloss_torch_ext", sources=["examples/python/prefloss_torch_ext.cpp"],
//         extra_include_paths=["include", "/usr/include/eigen3"],
//         extra_cflags=["-O2", "-march=native", "-std=c++17"])
//     loss, losses, metrics = ext.dpo(ext.masked_sum(logp_c, mask_c), ext.masked_sum(logp_r, mask_r),
//                                     ref_c, ref_r, beta=0.1)
//     loss.backward()
//
// Every loss takes its options as keyword arguments with the core's defaults (read from the
// options structs, so they cannot drift) and returns (loss, losses, metrics): loss 0-dim and
// losses [batch] (per example) or [batch] (per sequence, the token losses), both differentiable,
// and the core's metrics as a dict of floats. masked_sum / masked_mean return one tensor,
// token_logprobs (logp, entropy or None). Enumerations are strings: DPO variants "sigmoid",
// "robust", "hinge"; aggregation modes verl's loss_agg_mode names "token-mean",
// "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"; KL estimators verl's
// kl_penalty names ("k1"/"kl", "k2"/"mse", "k3"/"low_var_kl", "abs", and the straight-through
// "k1+"/"kl+", "abs+", "k3+"/"low_var_kl+"; "k2+"/"mse+" are k2, as in verl).
//
// Errors: prefloss's exceptions derive from std::invalid_argument, which pybind11's default
// translator raises as ValueError with the message (dpo_swap.py checks it); an unknown string
// option is a ValueError too. Gradients run the core's closed form in autograd's backward.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <prefloss/torch.hpp>
#include <stdexcept>
#include <string>
#include <utility>

namespace py = pybind11;
namespace pt = prefloss::torch;

namespace {

using OptD = std::optional<double>;
using OptT = std::optional<at::Tensor>;

/// TRL's loss_type and f_divergence_type names, as the enumerators spell them.
template <class E, std::size_t N>
E named(const std::pair<const char*, E> (&names)[N], const std::string& s, const char* what) {
  std::string known;
  for (const auto& [name, e] : names) {
    if (s == name) return e;
    known += std::string(known.empty() ? "'" : ", '") + name + "'";
  }
  throw std::invalid_argument(std::string("prefloss_torch_ext.dpo: ") + what + " must be one of " + known + ", got '" +
                              s + "'");
}

prefloss::DpoVariant dpo_variant(const std::string& s) {
  using V = prefloss::DpoVariant;
  static constexpr std::pair<const char*, V> names[] = {
      {"sigmoid", V::sigmoid},     {"robust", V::robust},     {"hinge", V::hinge},
      {"exo_pair", V::exo_pair},   {"nca_pair", V::nca_pair}, {"bco_pair", V::bco_pair},
      {"sppo_hard", V::sppo_hard}, {"apo_zero", V::apo_zero}, {"apo_down", V::apo_down},
      {"discopop", V::discopop},   {"aot", V::aot},           {"aot_unpaired", V::aot_unpaired}};
  return named(names, s, "variant");
}

prefloss::FDivergence divergence(const std::string& s) {
  using F = prefloss::FDivergence;
  static constexpr std::pair<const char*, F> names[] = {{"reverse_kl", F::reverse_kl},
                                                        {"forward_kl", F::forward_kl},
                                                        {"js_divergence", F::js_divergence},
                                                        {"alpha_divergence", F::alpha_divergence}};
  return named(names, s, "divergence");
}

prefloss::Aggregation aggregation(const std::string& s, const char* fn) {
  if (s == "token-mean") return prefloss::Aggregation::token_mean;
  if (s == "seq-mean-token-mean") return prefloss::Aggregation::seq_mean_token_mean;
  if (s == "seq-mean-token-sum") return prefloss::Aggregation::seq_mean_token_sum;
  if (s == "seq-mean-token-sum-norm") return prefloss::Aggregation::seq_mean_token_sum_norm;
  if (s == "token-sum") return prefloss::Aggregation::token_sum;
  throw std::invalid_argument(std::string("prefloss_torch_ext.") + fn +
                              ": aggregation must be 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', "
                              "'seq-mean-token-sum-norm' or 'token-sum', got '" +
                              s + "'");
}

const char* aggregation_name(prefloss::Aggregation a) {
  switch (a) {
    case prefloss::Aggregation::token_mean:
      return "token-mean";
    case prefloss::Aggregation::seq_mean_token_mean:
      return "seq-mean-token-mean";
    case prefloss::Aggregation::seq_mean_token_sum:
      return "seq-mean-token-sum";
    case prefloss::Aggregation::seq_mean_token_sum_norm:
      return "seq-mean-token-sum-norm";
    case prefloss::Aggregation::token_sum:
      return "token-sum";
  }
  return "?";
}

prefloss::KlEstimator kl_estimator(const std::string& s) {
  if (s == "k1" || s == "kl") return prefloss::KlEstimator::k1;
  // k2's straight-through form is k2 itself: verl returns its forward score unchanged.
  if (s == "k2" || s == "mse" || s == "k2+" || s == "mse+") return prefloss::KlEstimator::k2;
  if (s == "k3" || s == "low_var_kl") return prefloss::KlEstimator::k3;
  if (s == "abs") return prefloss::KlEstimator::abs;
  if (s == "k1+" || s == "kl+") return prefloss::KlEstimator::k1_plus;
  if (s == "abs+") return prefloss::KlEstimator::abs_plus;
  if (s == "k3+" || s == "low_var_kl+") return prefloss::KlEstimator::k3_plus;
  throw std::invalid_argument(
      "prefloss_torch_ext.ppo_clip: kl_estimator must be 'k1' ('kl'), 'k2' ('mse'), 'k3' "
      "('low_var_kl'), 'abs', or one of them with verl's straight-through '+' ('k3+'), got '" +
      s + "'");
}

const char* kl_estimator_name(prefloss::KlEstimator k) {
  switch (k) {
    case prefloss::KlEstimator::k1:
      return "k1";
    case prefloss::KlEstimator::k2:
      return "k2";
    case prefloss::KlEstimator::k3:
      return "k3";
    case prefloss::KlEstimator::abs:
      return "abs";
    case prefloss::KlEstimator::k1_plus:
      return "k1+";
    case prefloss::KlEstimator::abs_plus:
      return "abs+";
    case prefloss::KlEstimator::k3_plus:
      return "k3+";
  }
  return "?";
}

// ---- metrics as dicts ---------------------------------------------------------------------------

py::dict metrics(const prefloss::PreferenceMetrics<double>& m) {
  py::dict d;
  d["reward_chosen"] = m.reward_chosen;
  d["reward_rejected"] = m.reward_rejected;
  d["reward_margin"] = m.reward_margin;
  d["reward_accuracy"] = m.reward_accuracy;
  return d;
}

py::dict metrics(const prefloss::OrpoMetrics<double>& m) {
  py::dict d = metrics(static_cast<const prefloss::PreferenceMetrics<double>&>(m));
  d["log_odds_ratio"] = m.log_odds_ratio;
  d["log_odds_chosen"] = m.log_odds_chosen;
  d["nll_loss"] = m.nll_loss;
  return d;
}

py::dict metrics(const prefloss::RankingMetrics<double>& m) {
  py::dict d;
  d["accuracy"] = m.accuracy;
  d["reward_mean"] = m.reward_mean;
  d["reward_margin"] = m.reward_margin;
  return d;
}

py::dict metrics(const prefloss::NllMetrics<double>& m) {
  py::dict d;
  d["mean_logp"] = m.mean_logp;
  return d;
}

py::dict metrics(const prefloss::KtoMetrics<double>& m) {
  py::dict d;
  d["reference_point"] = m.reference_point;
  d["kl_mean"] = m.kl_mean;
  d["count_desirable"] = static_cast<long long>(m.count_desirable);
  d["count_undesirable"] = static_cast<long long>(m.count_undesirable);
  d["reward_desirable_sum"] = m.reward_desirable_sum;
  d["reward_undesirable_sum"] = m.reward_undesirable_sum;
  d["reward_desirable"] = m.reward_desirable;
  d["reward_undesirable"] = m.reward_undesirable;
  d["reward_margin"] = m.reward_margin;
  d["logps_desirable_sum"] = m.logps_desirable_sum;
  d["logps_undesirable_sum"] = m.logps_undesirable_sum;
  return d;
}

py::dict metrics(const prefloss::PpoMetrics<double>& m) {
  py::dict d;
  d["clip_fraction"] = m.clip_fraction;
  d["clip_fraction_low"] = m.clip_fraction_low;
  d["approx_kl"] = m.approx_kl;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["kl_mean"] = m.kl_mean;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::ValueMetrics<double>& m) {
  py::dict d;
  d["clip_fraction"] = m.clip_fraction;
  d["value_mean"] = m.value_mean;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::CispoMetrics<double>& m) {
  py::dict d;
  d["clip_fraction"] = m.clip_fraction;
  d["clip_fraction_high"] = m.clip_fraction_high;
  d["approx_kl"] = m.approx_kl;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::SapoMetrics<double>& m) {
  py::dict d;
  d["approx_kl"] = m.approx_kl;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::GpgMetrics<double>& m) {
  py::dict d;
  d["approx_kl"] = m.approx_kl;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::GmpoMetrics<double>& m) {
  py::dict d;
  d["clip_fraction"] = m.clip_fraction;
  d["clip_fraction_low"] = m.clip_fraction_low;
  d["approx_kl"] = m.approx_kl;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::ClipCovMetrics<double>& m) {
  py::dict d;
  d["selected_fraction"] = m.selected_fraction;
  d["clip_fraction"] = m.clip_fraction;
  d["approx_kl"] = m.approx_kl;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict metrics(const prefloss::KlCovMetrics<double>& m) {
  py::dict d;
  d["abs_kl"] = m.abs_kl;
  d["selected_fraction"] = m.selected_fraction;
  d["approx_kl"] = m.approx_kl;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["token_weight"] = m.token_weight;
  return d;
}

py::dict info(const prefloss::CovSelection& s) {
  py::dict d;
  d["valid_tokens"] = s.valid_tokens;
  d["mask_weight"] = s.mask_weight;
  d["adv_mean"] = s.adv_mean;
  d["logp_mean"] = s.logp_mean;
  d["candidates"] = s.candidates;
  d["target"] = s.target;
  d["selected"] = s.selected;
  return d;
}

template <class R>
py::tuple out(const R& r) {
  return py::make_tuple(r.loss, r.losses, metrics(r.metrics));
}

// ---- the bindings -------------------------------------------------------------------------------

py::tuple dpo(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& ref_chosen,
              const at::Tensor& ref_rejected, double beta, double label_smoothing, const std::string& variant,
              bool reference_free, const std::string& div, double alpha, double alpha_clamp, double bco_delta,
              double discopop_tau, OptD batch_count) {
  prefloss::DpoOptions o;
  o.beta = beta;
  o.label_smoothing = label_smoothing;
  o.variant = dpo_variant(variant);
  o.reference_free = reference_free;
  o.divergence = divergence(div);
  o.alpha = alpha;
  o.alpha_clamp = alpha_clamp;
  o.bco_delta = bco_delta;
  o.discopop_tau = discopop_tau;
  o.batch_count = batch_count;
  return out(pt::dpo(chosen, rejected, ref_chosen, ref_rejected, o));
}

py::tuple ipo(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& ref_chosen,
              const at::Tensor& ref_rejected, double beta, bool reference_free, OptD batch_count) {
  prefloss::IpoOptions o;
  o.beta = beta;
  o.reference_free = reference_free;
  o.batch_count = batch_count;
  return out(pt::ipo(chosen, rejected, ref_chosen, ref_rejected, o));
}

py::tuple simpo(const at::Tensor& chosen, const at::Tensor& rejected, double beta, double gamma, double label_smoothing,
                OptD batch_count) {
  prefloss::SimpoOptions o;
  o.beta = beta;
  o.gamma = gamma;
  o.label_smoothing = label_smoothing;
  o.batch_count = batch_count;
  return out(pt::simpo(chosen, rejected, o));
}

py::tuple orpo(const at::Tensor& chosen, const at::Tensor& rejected, double beta, double nll_weight, OptD batch_count) {
  prefloss::OrpoOptions o;
  o.beta = beta;
  o.nll_weight = nll_weight;
  o.batch_count = batch_count;
  return out(pt::orpo(chosen, rejected, o));
}

py::tuple kto(const at::Tensor& policy, const at::Tensor& ref, const at::Tensor& desirable, const at::Tensor& kl_policy,
              const at::Tensor& kl_ref, double beta, double desirable_weight, double undesirable_weight,
              OptD reference_point, OptD batch_count) {
  prefloss::KtoOptions o;
  o.beta = beta;
  o.desirable_weight = desirable_weight;
  o.undesirable_weight = undesirable_weight;
  o.reference_point = reference_point;
  o.batch_count = batch_count;
  return out(pt::kto(policy, ref, desirable, kl_policy, kl_ref, o));
}

py::tuple nll(const at::Tensor& logp_sequence, OptD normalizer, OptD batch_count) {
  prefloss::NllOptions o;
  o.normalizer = normalizer;
  o.batch_count = batch_count;
  return out(pt::nll(logp_sequence, o));
}

py::tuple bradley_terry(const at::Tensor& r_chosen, const at::Tensor& r_rejected, const OptT& margin,
                        double center_coef, OptD batch_count) {
  prefloss::BradleyTerryOptions o;
  o.center_coef = center_coef;
  o.batch_count = batch_count;
  return margin ? out(pt::bradley_terry(r_chosen, r_rejected, *margin, o))
                : out(pt::bradley_terry(r_chosen, r_rejected, o));
}

py::tuple bradley_terry_ranking(const at::Tensor& rewards, double center_coef, OptD batch_count) {
  prefloss::BradleyTerryOptions o;
  o.center_coef = center_coef;
  o.batch_count = batch_count;
  return out(pt::bradley_terry_ranking(rewards, o));
}

// The global normalizers both token losses take (PREFLOSS_AGGREGATION_NORMALIZERS).
template <class O>
void set_normalizers(O& o, OptD token_count, OptD sequence_count, OptD token_sum_norm,
                     const std::vector<double>& row_weights, double row_weight_guard, bool count_empty_rows) {
  o.token_count = token_count;
  o.sequence_count = sequence_count;
  o.token_sum_norm = token_sum_norm;
  o.row_weights = row_weights;
  o.row_weight_guard = row_weight_guard;
  o.count_empty_rows = count_empty_rows;
}

py::tuple ppo_clip(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                   const at::Tensor& mask, const OptT& ref_logp, double clip_low, double clip_high, double dual_clip,
                   const std::string& agg, double kl_coef, const std::string& kl_est, OptD log_ratio_clamp,
                   OptD k3_log_ratio_clamp, OptD k3_clamp, OptD token_count, OptD sequence_count, OptD token_sum_norm,
                   const std::vector<double>& row_weights, double row_weight_guard, bool count_empty_rows,
                   const std::string& importance_level, OptD delta, bool bias_corrected_kl) {
  prefloss::PpoOptions o;
  if (importance_level != "token" && importance_level != "sequence")
    throw prefloss::option_error("prefloss_torch_ext.ppo_clip: importance_level must be 'token' or 'sequence', got '" +
                                 importance_level + "'");
  o.importance_level =
      importance_level == "sequence" ? prefloss::ImportanceLevel::sequence : prefloss::ImportanceLevel::token;
  o.delta = delta;
  o.bias_corrected_kl = bias_corrected_kl;
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.dual_clip = dual_clip;
  o.aggregation = aggregation(agg, "ppo_clip");
  o.kl_coef = kl_coef;
  o.kl_estimator = kl_estimator(kl_est);
  o.log_ratio_clamp = log_ratio_clamp;
  o.k3_log_ratio_clamp = k3_log_ratio_clamp;
  o.k3_clamp = k3_clamp;
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return ref_logp ? out(pt::ppo_clip(logp, old_logp, advantages, mask, *ref_logp, o))
                  : out(pt::ppo_clip(logp, old_logp, advantages, mask, o));
}

py::tuple value_loss(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                     const at::Tensor& mask, OptD clip, const std::string& agg, OptD token_count, OptD sequence_count,
                     OptD token_sum_norm, const std::vector<double>& row_weights, double row_weight_guard,
                     bool count_empty_rows) {
  prefloss::ValueOptions o;
  o.clip = clip;
  o.aggregation = aggregation(agg, "value_loss");
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::value_loss(values, old_values, returns, mask, o));
}

py::tuple cispo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                const at::Tensor& mask, double clip_low, double clip_high, const std::string& agg, OptD log_ratio_clamp,
                OptD token_count, OptD sequence_count, OptD token_sum_norm, const std::vector<double>& row_weights,
                double row_weight_guard, bool count_empty_rows) {
  prefloss::CispoOptions o;
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.aggregation = aggregation(agg, "cispo");
  o.log_ratio_clamp = log_ratio_clamp;
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::cispo(logp, old_logp, advantages, mask, o));
}

py::tuple sapo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
               double tau_pos, double tau_neg, const std::string& agg, OptD log_ratio_clamp, OptD token_count,
               OptD sequence_count, OptD token_sum_norm, const std::vector<double>& row_weights,
               double row_weight_guard, bool count_empty_rows) {
  prefloss::SapoOptions o;
  o.tau_pos = tau_pos;
  o.tau_neg = tau_neg;
  o.aggregation = aggregation(agg, "sapo");
  o.log_ratio_clamp = log_ratio_clamp;
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::sapo(logp, old_logp, advantages, mask, o));
}

py::tuple gpg(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
              const std::string& agg, OptD token_count, OptD sequence_count, OptD token_sum_norm,
              const std::vector<double>& row_weights, double row_weight_guard, bool count_empty_rows) {
  prefloss::GpgOptions o;
  o.aggregation = aggregation(agg, "gpg");
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::gpg(logp, old_logp, advantages, mask, o));
}

py::tuple gmpo(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
               double clip_low, double clip_high, OptD sequence_count) {
  prefloss::GmpoOptions o;
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.sequence_count = sequence_count;
  return out(pt::gmpo(logp, old_logp, advantages, mask, o));
}

prefloss::ClipCovOptions clip_cov_options(double clip_low, double clip_high, double cov_ratio, double cov_lower,
                                          double cov_upper, std::uint64_t seed, const std::string& agg,
                                          const char* fn) {
  prefloss::ClipCovOptions o;
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.cov_ratio = cov_ratio;
  o.cov_lower = cov_lower;
  o.cov_upper = cov_upper;
  o.seed = seed;
  o.aggregation = aggregation(agg, fn);
  return o;
}

py::tuple clip_cov(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                   const at::Tensor& mask, const at::Tensor& selected, double clip_low, double clip_high,
                   double cov_ratio, double cov_lower, double cov_upper, std::uint64_t seed, const std::string& agg,
                   OptD token_count, OptD sequence_count, OptD token_sum_norm, const std::vector<double>& row_weights,
                   double row_weight_guard, bool count_empty_rows) {
  prefloss::ClipCovOptions o =
      clip_cov_options(clip_low, clip_high, cov_ratio, cov_lower, cov_upper, seed, agg, "clip_cov");
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::clip_cov(logp, old_logp, advantages, mask, selected, o));
}

py::tuple clip_cov_select(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& mask, double clip_low, double clip_high, double cov_ratio, double cov_lower,
                          double cov_upper, std::uint64_t seed) {
  const prefloss::ClipCovOptions o =
      clip_cov_options(clip_low, clip_high, cov_ratio, cov_lower, cov_upper, seed, "token-mean", "clip_cov_select");
  auto r = pt::clip_cov_select(logp, old_logp, advantages, mask, o);
  return py::make_tuple(r.selected, info(r.info));
}

py::tuple kl_cov(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                 const at::Tensor& mask, const at::Tensor& selected, double cov_ratio, double kl_coef,
                 const std::string& agg, OptD token_count, OptD sequence_count, OptD token_sum_norm,
                 const std::vector<double>& row_weights, double row_weight_guard, bool count_empty_rows) {
  prefloss::KlCovOptions o;
  o.cov_ratio = cov_ratio;
  o.kl_coef = kl_coef;
  o.aggregation = aggregation(agg, "kl_cov");
  set_normalizers(o, token_count, sequence_count, token_sum_norm, row_weights, row_weight_guard, count_empty_rows);
  return out(pt::kl_cov(logp, old_logp, advantages, mask, selected, o));
}

py::tuple kl_cov_select(const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask,
                        double cov_ratio) {
  prefloss::KlCovOptions o;
  o.cov_ratio = cov_ratio;
  auto r = pt::kl_cov_select(logp, advantages, mask, o);
  return py::make_tuple(r.selected, info(r.info));
}

/// An enumerator by its name; an unknown one is a ValueError naming fn and the argument.
template <class E, std::size_t N>
E enum_arg(const std::pair<const char*, E> (&names)[N], const std::string& s, const char* fn, const char* what) {
  std::string known;
  for (const auto& [name, e] : names) {
    if (s == name) return e;
    known += std::string(known.empty() ? "'" : ", '") + name + "'";
  }
  throw std::invalid_argument(std::string("prefloss_torch_ext.") + fn + ": " + what + " must be one of " + known +
                              ", got '" + s + "'");
}

template <class E, std::size_t N>
const char* enum_name(const std::pair<const char*, E> (&names)[N], E e) {
  for (const auto& [name, v] : names)
    if (v == e) return name;
  return "?";
}

// verl's rollout_is / rollout_rs option strings (the enumerators' names).
constexpr std::pair<const char*, prefloss::RolloutIsLevel> rollout_levels[] = {
    {"none", prefloss::RolloutIsLevel::none},
    {"token", prefloss::RolloutIsLevel::token},
    {"sequence", prefloss::RolloutIsLevel::sequence}};
constexpr std::pair<const char*, prefloss::RolloutIsBound> rollout_bounds[] = {
    {"truncate", prefloss::RolloutIsBound::truncate}, {"mask", prefloss::RolloutIsBound::mask}};
constexpr std::pair<const char*, prefloss::RolloutRs> rollout_rs_names[] = {
    {"none", prefloss::RolloutRs::none},
    {"token_k1", prefloss::RolloutRs::token_k1},
    {"token_k2", prefloss::RolloutRs::token_k2},
    {"token_k3", prefloss::RolloutRs::token_k3},
    {"seq_sum_k1", prefloss::RolloutRs::seq_sum_k1},
    {"seq_sum_k2", prefloss::RolloutRs::seq_sum_k2},
    {"seq_sum_k3", prefloss::RolloutRs::seq_sum_k3},
    {"seq_mean_k1", prefloss::RolloutRs::seq_mean_k1},
    {"seq_mean_k2", prefloss::RolloutRs::seq_mean_k2},
    {"seq_mean_k3", prefloss::RolloutRs::seq_mean_k3},
    {"seq_max_k2", prefloss::RolloutRs::seq_max_k2},
    {"seq_max_k3", prefloss::RolloutRs::seq_max_k3}};

py::dict metrics(const prefloss::RolloutIsMetrics& m) {
  py::dict d;
  d["weight_mean"] = m.weight_mean;
  d["weight_max"] = m.weight_max;
  d["weight_min"] = m.weight_min;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_max"] = m.ratio_max;
  d["truncated_fraction"] = m.truncated_fraction;
  d["masked_fraction"] = m.masked_fraction;
  d["rs_masked_fraction"] = m.rs_masked_fraction;
  d["rs_seq_masked_fraction"] = m.rs_seq_masked_fraction;
  d["batch_norm_factor"] = m.batch_norm_factor;
  d["valid_tokens"] = m.valid_tokens;
  d["kept_tokens"] = m.kept_tokens;
  d["kept_rows"] = m.kept_rows;
  d["rollout_kl"] = m.rollout_kl;
  return d;
}

py::tuple rollout_is_weights(const at::Tensor& old_logp, const at::Tensor& rollout_logp, const at::Tensor& mask,
                             const std::string& level, const std::string& bound, double upper, double lower,
                             OptD log_ratio_clamp, bool batch_normalize, const std::string& rs, OptD rs_upper,
                             OptD rs_lower) {
  constexpr const char* fn = "rollout_is_weights";
  prefloss::RolloutIsOptions o;
  o.level = enum_arg(rollout_levels, level, fn, "level");
  o.bound = enum_arg(rollout_bounds, bound, fn, "bound");
  o.upper = upper;
  o.lower = lower;
  o.log_ratio_clamp = log_ratio_clamp;
  o.batch_normalize = batch_normalize;
  o.rs = enum_arg(rollout_rs_names, rs, fn, "rs");
  o.rs_upper = rs_upper;
  o.rs_lower = rs_lower;
  auto r = pt::rollout_is_weights(old_logp, rollout_logp, mask, o);
  return py::make_tuple(r.weights, r.keep, metrics(r.metrics));
}

py::tuple token_logprobs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mask, double temperature,
                         bool entropy) {
  prefloss::LogprobOptions o;
  o.temperature = temperature;
  o.entropy = entropy;
  auto r = pt::token_logprobs(logits, labels, mask, o);
  return py::make_tuple(r.logp, r.entropy.defined() ? py::cast(r.entropy) : py::none());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using py::arg;
  m.doc() =
      "prefloss's libtorch adapter (prefloss/torch.hpp): preference and RL losses as autograd functions with "
      "closed-form gradients over CPU tensors. Losses return (loss, losses, metrics dict).";

  // A tensor here (Python has no use for the lazy pt::Sequence); a loss given one straight from
  // masked_sum still writes the token gradient itself, in one node.
  m.def(
      "masked_sum",
      [](const at::Tensor& tokens, const at::Tensor& mask) { return pt::masked_sum(tokens, mask).values(); },
      arg("tokens"), arg("mask"),
      "[batch, tokens] tokens and a bool/uint8/weight mask -> [batch] masked sums (autograd node)");
  m.def(
      "masked_mean",
      [](const at::Tensor& tokens, const at::Tensor& mask) { return pt::masked_mean(tokens, mask).values(); },
      arg("tokens"), arg("mask"),
      "[batch, tokens] -> [batch] masked means (0 for a row without tokens; autograd node)");

  const prefloss::DpoOptions dpo_d;
  m.def("dpo", &dpo, arg("chosen"), arg("rejected"), arg("ref_chosen"), arg("ref_rejected"), py::kw_only(),
        arg("beta") = dpo_d.beta, arg("label_smoothing") = dpo_d.label_smoothing, arg("variant") = "sigmoid",
        arg("reference_free") = dpo_d.reference_free, arg("divergence") = "reverse_kl", arg("alpha") = dpo_d.alpha,
        arg("alpha_clamp") = dpo_d.alpha_clamp, arg("bco_delta") = dpo_d.bco_delta,
        arg("discopop_tau") = dpo_d.discopop_tau, arg("batch_count") = py::none(),
        "DPO (prefloss::dpo) of [batch] sequence values; variant and divergence are TRL's loss_type and "
        "f_divergence_type names");
  const prefloss::IpoOptions ipo_d;
  m.def("ipo", &ipo, arg("chosen"), arg("rejected"), arg("ref_chosen"), arg("ref_rejected"), py::kw_only(),
        arg("beta") = ipo_d.beta, arg("reference_free") = ipo_d.reference_free, arg("batch_count") = py::none(),
        "IPO (prefloss::ipo) of [batch] sequence values");
  const prefloss::SimpoOptions simpo_d;
  m.def("simpo", &simpo, arg("chosen"), arg("rejected"), py::kw_only(), arg("beta") = simpo_d.beta,
        arg("gamma") = simpo_d.gamma, arg("label_smoothing") = simpo_d.label_smoothing, arg("batch_count") = py::none(),
        "SimPO (prefloss::simpo) of [batch] masked-mean log-probs");
  const prefloss::OrpoOptions orpo_d;
  m.def("orpo", &orpo, arg("chosen"), arg("rejected"), py::kw_only(), arg("beta") = orpo_d.beta,
        arg("nll_weight") = orpo_d.nll_weight, arg("batch_count") = py::none(),
        "ORPO (prefloss::orpo) of [batch] masked-mean log-probs");
  const prefloss::KtoOptions kto_d;
  m.def("kto", &kto, arg("policy"), arg("ref"), arg("desirable"), arg("kl_policy"), arg("kl_ref"), py::kw_only(),
        arg("beta") = kto_d.beta, arg("desirable_weight") = kto_d.desirable_weight,
        arg("undesirable_weight") = kto_d.undesirable_weight, arg("reference_point") = py::none(),
        arg("batch_count") = py::none(), "KTO (prefloss::kto); desirable is a [batch] bool or uint8 tensor");
  m.def("nll", &nll, arg("logp_sequence"), py::kw_only(), arg("normalizer") = py::none(),
        arg("batch_count") = py::none(), "negative log-likelihood (prefloss::nll) of [batch] sequence values");
  const prefloss::BradleyTerryOptions bt_d;
  m.def("bradley_terry", &bradley_terry, arg("r_chosen"), arg("r_rejected"), arg("margin") = py::none(), py::kw_only(),
        arg("center_coef") = bt_d.center_coef, arg("batch_count") = py::none(),
        "Bradley-Terry reward-model loss (prefloss::bradley_terry), optional [batch] margin");
  m.def("bradley_terry_ranking", &bradley_terry_ranking, arg("rewards"), py::kw_only(),
        arg("center_coef") = bt_d.center_coef, arg("batch_count") = py::none(),
        "Bradley-Terry over [batch, K] rankings, best to worst (prefloss::bradley_terry_ranking)");

  const prefloss::PpoOptions ppo_d;
  m.def("ppo_clip", &ppo_clip, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"),
        arg("ref_logp") = py::none(), py::kw_only(), arg("clip_low") = ppo_d.clip_low,
        arg("clip_high") = ppo_d.clip_high, arg("dual_clip") = ppo_d.dual_clip,
        arg("aggregation") = aggregation_name(ppo_d.aggregation), arg("kl_coef") = ppo_d.kl_coef,
        arg("kl_estimator") = kl_estimator_name(ppo_d.kl_estimator), arg("log_ratio_clamp") = ppo_d.log_ratio_clamp,
        arg("k3_log_ratio_clamp") = ppo_d.k3_log_ratio_clamp, arg("k3_clamp") = ppo_d.k3_clamp,
        arg("token_count") = py::none(), arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        arg("importance_level") = "token", arg("delta") = ppo_d.delta,
        arg("bias_corrected_kl") = ppo_d.bias_corrected_kl,
        "PPO-clip (prefloss::ppo_clip) over [batch, tokens] tensors; dual_clip 0 = off (verl: 3); ref_logp for "
        "the KL term (kl_coef > 0); importance_level 'sequence' = GSPO; delta = TRL's INTELLECT-2 cap");
  const prefloss::ValueOptions value_d;
  m.def("value_loss", &value_loss, arg("values"), arg("old_values"), arg("returns"), arg("mask"), py::kw_only(),
        arg("clip") = value_d.clip, arg("aggregation") = aggregation_name(value_d.aggregation),
        arg("token_count") = py::none(), arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "clipped value loss (prefloss::value_loss), 0.5 max((v-R)^2, (clip(v)-R)^2) aggregated; clip None = off");
  const prefloss::CispoOptions cispo_d;
  m.def("cispo", &cispo, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), py::kw_only(),
        arg("clip_low") = cispo_d.clip_low, arg("clip_high") = cispo_d.clip_high,
        arg("aggregation") = aggregation_name(cispo_d.aggregation), arg("log_ratio_clamp") = cispo_d.log_ratio_clamp,
        arg("token_count") = py::none(), arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "CISPO (prefloss::cispo): -sg(clip(ratio)) A logp over [batch, tokens] tensors, aggregated; "
        "log_ratio_clamp None = off (TRL)");
  const prefloss::SapoOptions sapo_d;
  m.def("sapo", &sapo, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), py::kw_only(),
        arg("tau_pos") = sapo_d.tau_pos, arg("tau_neg") = sapo_d.tau_neg,
        arg("aggregation") = aggregation_name(sapo_d.aggregation), arg("log_ratio_clamp") = sapo_d.log_ratio_clamp,
        arg("token_count") = py::none(), arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "SAPO (prefloss::sapo): -(4 / tau) sigmoid(tau (ratio - 1)) A over [batch, tokens] tensors, aggregated "
        "(verl's seq-mean-token-mean by default)");
  const prefloss::GpgOptions gpg_d;
  m.def("gpg", &gpg, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), py::kw_only(),
        arg("aggregation") = aggregation_name(gpg_d.aggregation), arg("token_count") = py::none(),
        arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "GPG (prefloss::gpg): -A logp over [batch, tokens] tensors, aggregated; old_logp only for approx_kl");
  const prefloss::GmpoOptions gmpo_d;
  m.def("gmpo", &gmpo, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), py::kw_only(),
        arg("clip_low") = gmpo_d.clip_low, arg("clip_high") = gmpo_d.clip_high,
        arg("sequence_count") = gmpo_d.sequence_count,
        "GMPO (prefloss::gmpo, verl's geo_mean): the mean over rows of -mean(A) exp(mean of the sign-aware "
        "clipped log-ratio); clip_low / clip_high are log-space bounds");
  const prefloss::ClipCovOptions cc_d;
  m.def("clip_cov_select", &clip_cov_select, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"),
        py::kw_only(), arg("clip_low") = cc_d.clip_low, arg("clip_high") = cc_d.clip_high,
        arg("cov_ratio") = cc_d.cov_ratio, arg("cov_lower") = cc_d.cov_lower, arg("cov_upper") = cc_d.cov_upper,
        arg("seed") = cc_d.seed,
        "Clip-Cov's token selection (prefloss::clip_cov_select) -> (selected [batch, tokens] of logp's dtype, "
        "info dict); not differentiable");
  m.def("clip_cov", &clip_cov, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), arg("selected"),
        py::kw_only(), arg("clip_low") = cc_d.clip_low, arg("clip_high") = cc_d.clip_high,
        arg("cov_ratio") = cc_d.cov_ratio, arg("cov_lower") = cc_d.cov_lower, arg("cov_upper") = cc_d.cov_upper,
        arg("seed") = cc_d.seed, arg("aggregation") = aggregation_name(cc_d.aggregation),
        arg("token_count") = py::none(), arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "Clip-Cov (prefloss::clip_cov): ppo_clip's surrogate with the selected tokens' loss dropped; selected "
        "from clip_cov_select (a constant); the selection options are not read");
  const prefloss::KlCovOptions kc_d;
  m.def("kl_cov_select", &kl_cov_select, arg("logp"), arg("advantages"), arg("mask"), py::kw_only(),
        arg("cov_ratio") = kc_d.cov_ratio,
        "KL-Cov's token selection (prefloss::kl_cov_select) -> (selected [batch, tokens] of logp's dtype, info "
        "dict); not differentiable");
  m.def("kl_cov", &kl_cov, arg("logp"), arg("old_logp"), arg("advantages"), arg("mask"), arg("selected"), py::kw_only(),
        arg("cov_ratio") = kc_d.cov_ratio, arg("kl_coef") = kc_d.kl_coef,
        arg("aggregation") = aggregation_name(kc_d.aggregation), arg("token_count") = py::none(),
        arg("sequence_count") = py::none(), arg("token_sum_norm") = py::none(),
        arg("row_weights") = std::vector<double>{}, arg("row_weight_guard") = 0.0, arg("count_empty_rows") = true,
        "KL-Cov (prefloss::kl_cov): -A ratio + kl_coef |logp - old_logp| at the selected tokens (from "
        "kl_cov_select, a constant)");
  const prefloss::RolloutIsOptions ris_d;
  m.def("rollout_is_weights", &rollout_is_weights, arg("old_logp"), arg("rollout_logp"), arg("mask"), py::kw_only(),
        arg("level") = enum_name(rollout_levels, ris_d.level), arg("bound") = enum_name(rollout_bounds, ris_d.bound),
        arg("upper") = ris_d.upper, arg("lower") = ris_d.lower, arg("log_ratio_clamp") = ris_d.log_ratio_clamp,
        arg("batch_normalize") = ris_d.batch_normalize, arg("rs") = enum_name(rollout_rs_names, ris_d.rs),
        arg("rs_upper") = ris_d.rs_upper, arg("rs_lower") = ris_d.rs_lower,
        "rollout-correction importance weights (prefloss::rollout_is_weights) -> (weights of old_logp's dtype, keep "
        "bool mask, metrics dict); not differentiable; level 'none' / 'token' / 'sequence', bound 'truncate' / "
        "'mask', rs verl's rollout_rs names ('token_k1', 'seq_mean_k3', ...)");
  const prefloss::LogprobOptions lp_d;
  m.def("token_logprobs", &token_logprobs, arg("logits"), arg("labels"), arg("mask"), py::kw_only(),
        arg("temperature") = lp_d.temperature, arg("entropy") = lp_d.entropy,
        "[batch, tokens, vocab] logits, [batch, tokens] labels and mask -> (logp, entropy or None), "
        "differentiable to the logits");
}
