// mpi_data_parallel — data parallelism over MPI ranks on the exactly solvable task, checked
// against the same training in one process: sharding a batch changes nothing but rounding.
//
// Every rank builds the same global batch each step (the same seed), takes its contiguous shard
// of the rows, and then, in each loss's function below:
//   1. counts first: the sizes of its shard (examples, token_counts, KTO's reference sums);
//   2. all-reduce them (MPI_SUM): the global normalizers;
//   3. the loss on its shard, or on each of its two micro-batches (gradient accumulation), with
//      the global normalizers, so the parts add up to the whole batch;
//   4. all-reduce the loss and the parameter gradient (MPI_SUM): the whole batch's;
// and every rank applies the same Adam step. Rank 0 also trains a second copy of the model in
// one process, on the whole batch with no global options, and
//   5. compares the two every step (`train`): losses, every gradient entry and every
//      parameter, against bounds derived from the rounding (`compare`).
//
// The shards are uneven by construction (rank r gets a share proportional to r + 1: 1:2:3 of the
// rows for three ranks), and row 1 of every global batch has an empty mask (a response that came
// back with no tokens), so it lies in rank 0's shard for up to 7 ranks: the losses' handling of
// empty rows is part of what is checked. (From 12 ranks on, rank 0's shard is empty: an empty
// shard, which the losses allow too.)
//
//   mpirun -np 3 --allow-run-as-root --oversubscribe ./build/examples/mpi_data_parallel [--loss dpo|kto|ppo|all]
#include <mpi.h>
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/mpi.hpp"
#include "common/optim.hpp"
#include "common/policy.hpp"
#include "common/report.hpp"
#include "common/task.hpp"

using namespace examples;

namespace {

constexpr double kBeta = 0.1;   // DPO's and KTO's beta
constexpr double kLr = 0.05;    // Adam, as the other examples
constexpr Index kBatch = 64;    // rows of every global batch (pairs, completions, responses)
constexpr Index kEmptyRow = 1;  // the row whose mask is empty, in rank 0's shard
constexpr Index kGroup = 8;     // GRPO: responses per prompt

enum class Loss { dpo, kto, grpo };

struct Config {
  std::string name;
  Loss loss;
  int micro;  // micro-batches per rank (gradient accumulation)
  pl::Aggregation aggregation = pl::Aggregation::token_mean;
};

/// One side's result of a step: the loss and d loss / d logits, and the magnitudes the rounding
/// bounds are made of (only the one-process side's are used). The gradient is kept in double,
/// unrounded, and all-reduced as MPI_DOUBLE (see `compare` for why not float).
struct Step {
  double loss = 0;
  std::vector<double> grad;
  double loss_magnitude = 0;           // sum of |every example's (sequence's) share of the loss|
  std::vector<double> grad_magnitude;  // per entry, sum of |the terms backward() added into it|
  Index terms = 0;                     // rows backward() went over: at most this many terms an entry
  int sums = 0;                        // backward() calls: partial sums added into `grad`

  explicit Step(const Shape& s) : grad(s.size(), 0.0), grad_magnitude(s.size(), 0.0) {}

  /// Adds d loss / d logp of `seq` (what a prefloss backward wrote) to the parameter gradient.
  void backward(const TabularPolicy& policy, const Sequences& seq, const Tokens& grad_logp) {
    policy.backward(seq, grad_logp, grad);
    policy.gradient_magnitude(seq, grad_logp, grad_magnitude);
    terms += seq.size();
    ++sums;
  }
  /// Adds a call's loss, with its per-example (per-sequence) shares of it.
  void add_loss(double value, const Seq& shares, double divisor) {
    loss += value;
    for (Index i = 0; i < shares.size(); ++i) loss_magnitude += std::abs(static_cast<double>(shares(i))) / divisor;
  }
};

void empty_row(Sequences& s, Index row) {
  for (Index l = 0; l < s.mask.dimension(1); ++l) s.mask(row, l) = 0;
}

// ---- DPO: masked sums of token log-probs, batch_count --------------------------------------

/// kBatch training pairs; pair kEmptyRow's chosen response is empty (masked sums of 0).
Pairs dpo_batch(const Experiment& e, Batcher& batches) {
  Pairs p = select(e.task, e.train, batches.next());
  empty_row(p.chosen, kEmptyRow);
  return p;
}

void dpo_part(const Pairs& p, const TabularPolicy& policy, const TabularPolicy& sft, const pl::DpoOptions& opt,
              Step& s) {
  Tokens lc, lr, ref_c, ref_r;
  policy.token_logp(p.chosen, lc);
  policy.token_logp(p.rejected, lr);
  sft.token_logp(p.chosen, ref_c);
  sft.token_logp(p.rejected, ref_r);
  Tokens gc(lc.dimensions()), gr(lr.dimensions());
  const Mask &mc = p.chosen.mask, &mr = p.rejected.mask;
  const auto r = pl::dpo(pl::masked_sum(lc, mc), pl::masked_sum(lr, mr), pl::masked_sum(ref_c, mc),
                         pl::masked_sum(ref_r, mr), opt, gc, gr);
  s.add_loss(r.loss, r.losses, opt.batch_count ? *opt.batch_count : static_cast<double>(p.size()));
  s.backward(policy, p.chosen, gc);
  s.backward(policy, p.rejected, gr);
}

Step dpo_sharded(const World& world, const Pairs& batch, Range shard, int micro, const TabularPolicy& policy,
                 const TabularPolicy& sft) {
  // 1, 2. Counts first: the pairs of every rank, all-reduced.
  const std::int64_t pairs = world.sum(static_cast<std::int64_t>(shard.size()));
  pl::DpoOptions opt;
  opt.beta = kBeta;
  opt.batch_count = static_cast<double>(pairs);
  // 3. Each micro-batch: its loss is sum(its losses) / batch_count, its gradient to match.
  Step s(policy.shape);
  for (int k = 0; k < micro; ++k) {
    const Range m = part(shard, k, micro);
    dpo_part(slice(batch, m.begin, m.end), policy, sft, opt, s);
  }
  // 4. The loss and the parameter gradient, all-reduced: the whole batch's.
  s.loss = world.sum(s.loss);
  world.sum_in_place(s.grad);
  return s;
}

Step dpo_whole(const Pairs& batch, const TabularPolicy& policy, const TabularPolicy& sft) {
  pl::DpoOptions opt;
  opt.beta = kBeta;
  Step s(policy.shape);
  dpo_part(batch, policy, sft, opt, s);
  return s;
}

// ---- KTO: kto_reference_sums all-reduced, batch_count ---------------------------------------

/// Unpaired completions: the chosen (desirable) and rejected (undesirable) responses of kBatch/2
/// pairs, and for each completion i the KL completion TRL pairs it with: completion i + 1 under
/// prompt i, over the positions both have (dpo_curves does the same). Completion kEmptyRow is
/// empty, and so is the KL completion made from it.
struct KtoBatch {
  Sequences seq, kl;
  Eigen::Tensor<std::uint8_t, 1> desirable;
  Index size() const { return seq.size(); }
};

KtoBatch kto_batch(const Experiment& e, Batcher& batches) {
  const Task& t = e.task;
  const Pairs p = select(t, e.train, batches.next());
  KtoBatch b{concat(t, p.chosen, p.rejected), {}, Eigen::Tensor<std::uint8_t, 1>(2 * p.size())};
  empty_row(b.seq, kEmptyRow);
  const Index n = b.size();
  b.kl = Sequences::empty(t, n);
  for (Index i = 0; i < n; ++i) {
    b.desirable(i) = i < p.size() ? 1 : 0;
    const Index j = (i + 1) % n;
    b.kl.prompt[static_cast<std::size_t>(i)] = b.seq.prompt[static_cast<std::size_t>(i)];
    for (int l = 0; l < t.shape.L; ++l) {
      b.kl.tok(i, l) = b.seq.tok(j, l);
      b.kl.mask(i, l) = b.seq.mask(i, l) && b.seq.mask(j, l) ? 1 : 0;
    }
  }
  return b;
}

/// The forward pass of rows [r.begin, r.end) of a KTO batch: policy and reference log-probs of the
/// completions and of their KL completions.
struct KtoPart {
  Sequences seq, kl;
  Eigen::Tensor<std::uint8_t, 1> desirable;
  Tokens lp, ref_lp, kl_lp, ref_kl_lp;
};

KtoPart kto_forward(const KtoBatch& b, Range r, const TabularPolicy& policy, const TabularPolicy& sft) {
  KtoPart f;
  f.seq = slice(b.seq, r.begin, r.end);
  f.kl = slice(b.kl, r.begin, r.end);
  f.desirable = b.desirable.slice(Eigen::array<Index, 1>{r.begin}, Eigen::array<Index, 1>{r.size()});
  policy.token_logp(f.seq, f.lp);
  sft.token_logp(f.seq, f.ref_lp);
  policy.token_logp(f.kl, f.kl_lp);
  sft.token_logp(f.kl, f.ref_kl_lp);
  return f;
}

pl::KtoReferenceSums kto_sums(const KtoPart& f) {
  return pl::kto_reference_sums(pl::masked_sum(f.kl_lp, f.kl.mask), pl::masked_sum(f.ref_kl_lp, f.kl.mask));
}

void kto_part(const KtoPart& f, const TabularPolicy& policy, const pl::KtoOptions& opt, Step& s) {
  Tokens g(f.lp.dimensions());
  const auto r = pl::kto(pl::masked_sum(f.lp, f.seq.mask), pl::masked_sum(f.ref_lp, f.seq.mask), f.desirable,
                         pl::masked_sum(f.kl_lp, f.kl.mask), pl::masked_sum(f.ref_kl_lp, f.kl.mask), opt, g);
  s.add_loss(r.loss, r.losses, opt.batch_count ? *opt.batch_count : static_cast<double>(f.seq.size()));
  s.backward(policy, f.seq, g);
}

Step kto_sharded(const World& world, const KtoBatch& batch, Range shard, int micro, const TabularPolicy& policy,
                 const TabularPolicy& sft) {
  std::vector<KtoPart> parts;
  for (int k = 0; k < micro; ++k) parts.push_back(kto_forward(batch, part(shard, k, micro), policy, sft));
  // 1. Counts first: this rank's completions, and the reference point's sums over its KL
  //    completions (sum of kl_policy - kl_ref, and their number).
  pl::KtoReferenceSums z;
  for (const KtoPart& f : parts) z += kto_sums(f);
  // 2. All-reduced: the global batch, and z0 = max(0, mean over the whole KL batch), the same
  //    on every rank (TRL averages the ranks' means instead, which differs for uneven shards).
  pl::KtoOptions opt;
  opt.beta = kBeta;
  opt.batch_count = static_cast<double>(world.sum(static_cast<std::int64_t>(shard.size())));
  opt.reference_point = world.sum(z).reference_point();
  // 3. Each micro-batch's loss with the global z0 and batch_count.
  Step s(policy.shape);
  for (const KtoPart& f : parts) kto_part(f, policy, opt, s);
  // 4. The loss and the parameter gradient, all-reduced.
  s.loss = world.sum(s.loss);
  world.sum_in_place(s.grad);
  return s;
}

Step kto_whole(const KtoBatch& batch, const TabularPolicy& policy, const TabularPolicy& sft) {
  pl::KtoOptions opt;
  opt.beta = kBeta;
  Step s(policy.shape);
  kto_part(kto_forward(batch, Range{0, batch.size()}, policy, sft), policy, opt, s);
  return s;
}

// ---- GRPO-style ppo_clip: every Aggregation with its global normalizer -----------------------

/// kBatch/kGroup prompts with kGroup responses each, sampled from the SFT model (so old_logp is
/// its log-probs); GRPO advantages: each response's true reward relative to its group
/// (group_advantages, verl's), on every token. Response kEmptyRow is empty (reward 0: a sum
/// over no tokens).
struct Rollout {
  Sequences seq;
  Tokens old_logp, adv;
  Index size() const { return seq.size(); }
};

Rollout grpo_batch(const Task& t, const TabularPolicy& sft, Rng& rng) {
  std::vector<int> prompts;
  for (Index g = 0; g < kBatch / kGroup; ++g) prompts.insert(prompts.end(), kGroup, rng.below(t.shape.X));
  Rollout b{sample(t, sft.dist(), prompts, rng), {}, Tokens(kBatch, t.shape.L)};
  empty_row(b.seq, kEmptyRow);
  sft.token_logp(b.seq, b.old_logp);
  Seq score(kBatch), adv(kBatch);
  for (Index i = 0; i < kBatch; ++i) {
    double r = 0;
    for (int l = 0; l < t.shape.L; ++l)
      if (b.seq.mask(i, l))
        r += t.score[t.shape.row(b.seq.prompt[static_cast<std::size_t>(i)], l) +
                     static_cast<std::size_t>(b.seq.tok(i, l))];
    score(i) = static_cast<float>(r);
  }
  pl::group_advantages(score, kGroup, pl::GroupOptions{}, adv);
  for (Index i = 0; i < kBatch; ++i)
    for (int l = 0; l < t.shape.L; ++l) b.adv(i, l) = adv(i);
  return b;
}

void grpo_part(const Rollout& b, Range r, const TabularPolicy& policy, const pl::PpoOptions& opt, Step& s) {
  if (r.size() == 0) return;  // ppo_clip refuses an empty batch; an empty part adds nothing
  const Sequences seq = slice(b.seq, r.begin, r.end);
  Tokens lp;
  policy.token_logp(seq, lp);
  Tokens g(lp.dimensions());
  const auto res =
      pl::ppo_clip(lp, slice_rows(b.old_logp, r.begin, r.end), slice_rows(b.adv, r.begin, r.end), seq.mask, opt, g);
  s.add_loss(res.loss, res.losses, 1.0);  // losses[i] is already sequence i's share of the loss
  s.backward(policy, seq, g);
}

Step grpo_sharded(const World& world, const Rollout& batch, Range shard, int micro, pl::Aggregation agg,
                  const TabularPolicy& policy) {
  // 1. Counts first: this rank's valid tokens and sequences.
  pl::TokenCounts c = pl::token_counts(slice_rows(batch.seq.mask, shard.begin, shard.end));
  // 2. All-reduced: the normalizer of the aggregation, over the whole batch.
  c = world.sum(c);
  pl::PpoOptions opt;
  opt.aggregation = agg;
  if (agg == pl::Aggregation::token_mean) {
    opt.token_count = c.weight;  // every valid token of every rank
  } else {
    opt.sequence_count = static_cast<double>(c.rows);  // every sequence, empty ones included
  }
  // Dr.GRPO's constant C: the padded length, the one-process call's default. (A rank's default is
  // its own padding's, which in a trainer that pads each shard to its longest row differs by rank.)
  if (agg == pl::Aggregation::seq_mean_token_sum_norm)
    opt.token_sum_norm = static_cast<double>(batch.seq.mask.dimension(1));
  // 3. Each micro-batch's loss with these normalizers.
  Step s(policy.shape);
  for (int k = 0; k < micro; ++k) grpo_part(batch, part(shard, k, micro), policy, opt, s);
  // 4. The loss and the parameter gradient, all-reduced.
  s.loss = world.sum(s.loss);
  world.sum_in_place(s.grad);
  return s;
}

Step grpo_whole(const Rollout& batch, pl::Aggregation agg, const TabularPolicy& policy) {
  pl::PpoOptions opt;
  opt.aggregation = agg;
  Step s(policy.shape);
  grpo_part(batch, Range{0, batch.size()}, policy, opt, s);
  return s;
}

// ---- the comparison ------------------------------------------------------------------------

/// How far the data-parallel step is from the one-process step, each difference next to its
/// bound: the worst ratio difference / bound must stay <= 1.
struct Diff {
  double loss = 0, loss_bound = 0;
  double grad_abs = 0, grad_rel = 0, grad_ratio = 0;  // max |dg|, max |dg| / |g|, max |dg| / bound
  double param_abs = 0, param_ratio = 0;
  bool ok() const { return loss <= loss_bound && grad_ratio <= 1 && param_ratio <= 1; }
};

/// @brief The sharded step `s` against the one-process step `u`, `parts` calls (ranks times
/// micro-batches) against one. eps_f = 2^-23 and eps_d = 2^-52 are float's and double's
/// epsilons, u_f = eps_f / 2 and u_d = eps_d / 2 their unit roundoffs; the magnitudes are the
/// one-process side's.
///
/// - Loss. Every call sums its terms in double and rounds the sum L_p once to float, an error
///   <= u_f |L_p|; over the parts, <= u_f * sum_p |L_p| <= u_f * M, M = loss_magnitude, the sum of
///   |every example's share|; the one-process loss adds <= u_f * M. The bound is 2 eps_f * M:
///   those 2 u_f M, and as much again for the double sums (within the calls and the all-reduce:
///   <= (n + parts) u_d times the magnitudes of the terms, 2^-29 n times smaller than the float
///   rounding unless a row's token terms cancel a million-fold).
/// - Gradient. Entry k is a sum of at most `terms` float terms, (onehot - p) * d loss / d logp of
///   one token each, summed in double on both sides, in another order and grouping on the ranks
///   (partials, then the all-reduce of parts * sums of them): any order errs by < (number of
///   additions) u_d * G_k, G_k = grad_magnitude[k] >= sum of |terms|, so |dg_k| <=
///   (terms + parts * sums) eps_d * G_k. The terms are the same bits on both sides (a shard's
///   gradient rows are the unsplit call's when the normalizers are), but for KTO, whose z0 is a
///   double mean summed in another order: there a term may differ by one rounding of the
///   per-example gradient to float and one of the product, 2 eps_f of it, added to the bound.
///   In this example the sums come out equal to the bit: the terms' bits span fewer than 53
///   binary places, so double adds them exactly in any order.
/// - Parameters. The two models start equal and each takes its own Adam step on its own
///   gradient. Where the gradients agree to double rounding, the two updates differ by far less
///   than a float ulp of the parameter, and a parameter can differ only where rounding
///   p - lr * update to float falls on either side of a tie: by one ulp, <= eps_f |p|, a step.
///   The bound is step * eps_f * |p|. It presumes what the gradient check measures: differences
///   negligible next to |g| + Adam's eps. With float gradients that fails:
///
/// Why the gradient is double: with each rank's partial rounded to float and all-reduced as
/// MPI_FLOAT, an entry whose terms cancel exactly (DPO at step 1: a token that appears as often
/// in the chosen as in the rejected responses of a prompt) comes out as rounding noise of
/// ~1e-10..1e-9, different on the two sides, which Adam's first step g / (|g| + 1e-8) does not
/// scale down as it does the gradient. Measured with this example: the models then part by up
/// to 1.5e-4 after one step (a float ulp of the parameters is ~1e-7) and their losses by more
/// than rounding from the second step on. Mixed-precision trainers all-reduce gradients wider
/// than the parameters for the same kind of reason.
Diff compare(const Step& s, const Step& u, const std::vector<float>& params, const std::vector<float>& ref_params,
             int parts, bool kto, long step) {
  const double eps_f = std::numeric_limits<float>::epsilon(), eps_d = std::numeric_limits<double>::epsilon();
  Diff d;
  d.loss = std::abs(s.loss - u.loss);
  d.loss_bound = 2 * eps_f * u.loss_magnitude;
  const double per_term = static_cast<double>(u.terms + parts * u.sums) * eps_d + (kto ? 2 * eps_f : 0.0);
  for (std::size_t k = 0; k < u.grad.size(); ++k) {
    const double dg = std::abs(s.grad[k] - u.grad[k]);
    d.grad_abs = std::max(d.grad_abs, dg);
    if (dg > 0) d.grad_rel = std::max(d.grad_rel, u.grad[k] != 0 ? dg / std::abs(u.grad[k]) : HUGE_VAL);
    if (dg > 0) d.grad_ratio = std::max(d.grad_ratio, dg / (per_term * u.grad_magnitude[k]));
  }
  for (std::size_t k = 0; k < params.size(); ++k) {
    const double dp = std::abs(static_cast<double>(params[k]) - static_cast<double>(ref_params[k]));
    d.param_abs = std::max(d.param_abs, dp);
    if (dp > 0)
      d.param_ratio = std::max(d.param_ratio,
                               dp / (static_cast<double>(step) * eps_f * std::abs(static_cast<double>(ref_params[k]))));
  }
  return d;
}

// ---- the training loop ---------------------------------------------------------------------

/// The worst of every step's differences, and the CSV lines (rank 0).
struct Log {
  double loss_ratio = 0, grad_abs = 0, grad_rel = 0, grad_ratio = 0, param_abs = 0, param_ratio = 0;
  std::string csv =
      "config,step,loss_mpi,loss_one_process,loss_diff,loss_bound,grad_max_abs,grad_max_rel,"
      "grad_max_over_bound,param_max_abs\n";

  void add(const std::string& name, long step, const Step& s, const Step& u, const Diff& d, bool ok) {
    std::printf("%-30s %4ld %12.9f %12.9f %8.1e %8.1e %8.1e %8.1e %6.3f %8.1e%s\n", name.c_str(), step, s.loss, u.loss,
                d.loss, d.loss_bound, d.grad_abs, d.grad_rel, d.grad_ratio, d.param_abs, ok ? "" : "  <- FAIL");
    csv += fmt("%s,%ld,%.9g,%.9g,%.3g,%.3g,%.3g,%.3g,%.3g,%.3g\n", name.c_str(), step, s.loss, u.loss, d.loss,
               d.loss_bound, d.grad_abs, d.grad_rel, d.grad_ratio, d.param_abs);
    loss_ratio = std::max(loss_ratio, d.loss_bound > 0 ? d.loss / d.loss_bound : 0.0);
    grad_abs = std::max(grad_abs, d.grad_abs);
    grad_rel = std::max(grad_rel, d.grad_rel);
    grad_ratio = std::max(grad_ratio, d.grad_ratio);
    param_abs = std::max(param_abs, d.param_abs);
    param_ratio = std::max(param_ratio, d.param_ratio);
  }
};

/// Trains one configuration for `steps` steps: the data-parallel model on every rank, and on
/// rank 0 the same model in one process, compared after every step. `batch()` makes the step's
/// global batch (the same on every rank), `sharded(batch, shard, model)` and `whole(batch,
/// model)` the two steps. Returns false on every rank when a check failed on one.
template <class MakeBatch, class Sharded, class Whole>
bool train(const World& world, const Config& cfg, const Task& t, long steps, MakeBatch batch, Sharded sharded,
           Whole whole, Log& log) {
  TabularPolicy model(t.shape, t.ref_logits);   // this rank's replica
  TabularPolicy single(t.shape, t.ref_logits);  // rank 0: the model trained in one process
  Adam adam(kLr), single_adam(kLr);
  bool ok = true;
  for (long step = 1; step <= steps; ++step) {
    const auto b = batch();
    const Range shard = uneven_shard(b.size(), world.rank(), world.size());
    const Step s = sharded(b, shard, model);
    adam.step(model.logits, s.grad);
    // Data parallelism's own invariant: every replica holds the same parameters, to the bit.
    const bool replicas = world.same_everywhere(model.logits);
    ok = ok && replicas;
    // 5. Rank 0: the same step in one process, on the model trained there, and the comparison.
    if (world.root()) {
      const Step u = whole(b, single);
      single_adam.step(single.logits, u.grad);
      const Diff d = compare(s, u, model.logits, single.logits, world.size() * cfg.micro, cfg.loss == Loss::kto, step);
      ok = ok && d.ok();
      log.add(cfg.name, step, s, u, d, d.ok() && replicas);
    }
  }
  return world.all(ok);
}

}  // namespace

int main(int argc, char** argv) {
  World world(argc, argv);
  // --loss is this example's own option; parse_args takes the rest.
  std::string which = "all";
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--loss") == 0) {
      which = i + 1 < argc ? argv[++i] : "";
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (which != "dpo" && which != "kto" && which != "ppo" && which != "all") {
    if (world.root())
      std::fprintf(stderr, "mpi_data_parallel: --loss must be dpo, kto, ppo or all, got '%s'\n", which.c_str());
    return 2;
  }
  const Args args = parse_args(static_cast<int>(rest.size()), rest.data(), "mpi_data_parallel",
                               "data parallelism over MPI ranks against one process; --loss dpo|kto|ppo|all "
                               "(default all) picks the losses",
                               5, 3);

  try {
    const Stopwatch clock;
    const Experiment e = standard_experiment(args.seed);
    const Task& t = e.task;
    const TabularPolicy sft(t.shape, t.ref_logits);

    std::vector<Config> configs;
    for (int micro : {1, 2}) {
      const std::string acc = micro > 1 ? " x2" : "";
      if (which == "dpo" || which == "all") configs.push_back({"dpo" + acc, Loss::dpo, micro});
      if (which == "kto" || which == "all") configs.push_back({"kto" + acc, Loss::kto, micro});
      if (which == "ppo" || which == "all")
        for (auto [agg, name] : {std::pair{pl::Aggregation::token_mean, "token_mean"},
                                 std::pair{pl::Aggregation::seq_mean_token_sum, "seq_mean_token_sum"},
                                 std::pair{pl::Aggregation::seq_mean_token_mean, "seq_mean_token_mean"},
                                 std::pair{pl::Aggregation::seq_mean_token_sum_norm, "seq_mean_token_sum_norm"}})
          configs.push_back({std::string("ppo ") + name + acc, Loss::grpo, micro, agg});
    }

    if (world.root()) {
      std::printf("%s.\n%d rank%s; the shards of every %ld-row batch:", describe(e).c_str(), world.size(),
                  world.size() > 1 ? "s" : "", static_cast<long>(kBatch));
      for (int r = 0; r < world.size(); ++r) {
        const Range s = uneven_shard(kBatch, r, world.size());
        std::printf(" [%ld, %ld)", static_cast<long>(s.begin), static_cast<long>(s.end));
      }
      std::printf(
          ", row %ld's mask empty.\nx2: two micro-batches a rank (gradient accumulation). ppo: ppo_clip on GRPO "
          "advantages.\nEvery difference is MPI minus one process; bounds in mpi_data_parallel.cpp's compare().\n\n",
          static_cast<long>(kEmptyRow));
      std::printf("%-30s %4s %12s %12s %8s %8s %8s %8s %6s %8s\n", "", "step", "loss (MPI)", "(1 process)", "|dloss|",
                  "bound", "max|dg|", "rel", "/bound", "max|dp|");
    }

    bool ok = true;
    Log log;
    for (const Config& cfg : configs) {
      // Every configuration sees the same data: pairs from a fresh Batcher, rollouts from a fresh Rng.
      Batcher batches(e.train.size(), cfg.loss == Loss::kto ? kBatch / 2 : kBatch, args.seed);
      Rng rng(0xd0000000ULL + args.seed);
      bool passed = true;
      switch (cfg.loss) {
        case Loss::dpo:
          passed = train(
              world, cfg, t, args.steps, [&] { return dpo_batch(e, batches); },
              [&](const Pairs& b, Range shard, const TabularPolicy& m) {
                return dpo_sharded(world, b, shard, cfg.micro, m, sft);
              },
              [&](const Pairs& b, const TabularPolicy& m) { return dpo_whole(b, m, sft); }, log);
          break;
        case Loss::kto:
          passed = train(
              world, cfg, t, args.steps, [&] { return kto_batch(e, batches); },
              [&](const KtoBatch& b, Range shard, const TabularPolicy& m) {
                return kto_sharded(world, b, shard, cfg.micro, m, sft);
              },
              [&](const KtoBatch& b, const TabularPolicy& m) { return kto_whole(b, m, sft); }, log);
          break;
        case Loss::grpo:
          passed = train(
              world, cfg, t, args.steps, [&] { return grpo_batch(t, sft, rng); },
              [&](const Rollout& b, Range shard, const TabularPolicy& m) {
                return grpo_sharded(world, b, shard, cfg.micro, cfg.aggregation, m);
              },
              [&](const Rollout& b, const TabularPolicy& m) { return grpo_whole(b, cfg.aggregation, m); }, log);
          break;
      }
      ok = ok && passed;
    }

    if (world.root()) {
      std::printf(
          "\nworst step: |dloss| / bound %.3f; gradient max |dg| %.1e (relative %.1e), / bound %.3f; "
          "parameters max |dp| %.1e, / bound %.3f\n",
          log.loss_ratio, log.grad_abs, log.grad_rel, log.grad_ratio, log.param_abs, log.param_ratio);
      const std::string csv = args.path(".csv");
      std::FILE* f = std::fopen(csv.c_str(), "w");
      if (!f || std::fputs(log.csv.c_str(), f) < 0) throw std::runtime_error("cannot write " + csv);
      std::fclose(f);
      std::printf("wrote %s\n(%zu configurations x %ld steps, %d rank%s, %.2f s)\n", csv.c_str(), configs.size(),
                  args.steps, world.size(), world.size() > 1 ? "s" : "", clock.seconds());
      if (ok)
        std::printf("PASS: on %d rank%s, loss, gradients and parameters match one process within rounding\n",
                    world.size(), world.size() > 1 ? "s" : "");
      else
        std::printf("FAIL: on %d rank%s, a difference from one process exceeds its rounding bound (<- FAIL)\n",
                    world.size(), world.size() > 1 ? "s" : "");
    }
    return ok ? 0 : 1;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "mpi_data_parallel: rank %d: %s\n", world.rank(), ex.what());
    World::abort(1);
  }
}
