#!/usr/bin/python3
"""Swap TRL's DPO loss for prefloss's in a PyTorch training loop, and check they agree.

Builds prefloss_torch_ext.cpp (prefloss's libtorch adapter as a Python module) with PyTorch's
JIT extension loader, then trains a tiny autoregressive policy (an nn.Module over a toy task:
chosen completions count upwards, rejected ones are random) with DPO, where TRL's formula,
written in torch as TRL's DPOTrainer.dpo_loss has it (loss_type="sigmoid", sequence log-prob
sums), is replaced by prefloss's masked_sum + dpo autograd nodes. Every step computes the
parameter gradients both ways from the same batch and checks that they agree, then steps the
optimizer with prefloss's. One float64 step is checked too, and one ppo_clip call against verl's
compute_policy_loss_vanilla + agg_loss, and each other binding against its reference formula.

    /usr/bin/python3 examples/python/dpo_swap.py                    # build in a temp dir, 60 steps
    /usr/bin/python3 examples/python/dpo_swap.py --build-dir /tmp/ext --quick

Agreement is measured per tensor as max|g_prefloss - g_torch| / max|g_torch| (the difference
relative to the tensor's scale; an elementwise ratio is meaningless where a gradient entry is
~0), the worst over tensors and steps. Tolerances: 1e-5 in float32, 1e-12 in float64. The
expected values always come from torch autograd of the reference formula. Exits non-zero on any
disagreement, on a loss that does not fall, or when a prefloss error does not reach Python as
ValueError.

References (the formulas below follow them line by line):
  TRL  trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss (loss_type "sigmoid") and
       concatenated_forward (per_token_logps[~loss_mask] = 0; .sum(-1)), at e3b7897^, the last
       commit that has dpo_loss; at f2cd577 the same sigmoid formula sits in
       DPOTrainer._compute_loss. KTO: trl/trainer/kto_trainer.py, KTOTrainer.kto_loss (f2cd577).
       SimPO: CPOTrainer.cpo_loss (loss_type "simpo", logits - simpo_gamma / beta).
  verl verl/trainer/ppo/core_algos.py (1dda039): compute_policy_loss_vanilla, compute_policy_loss_gspo, agg_loss,
       compute_value_loss; compute_policy_loss_cispo, _sapo, _gpg, _geo_mean, _clip_cov, _kl_cov (cispo, sapo,
       gpg, gmpo, clip_cov, kl_cov in float32; Clip-Cov over prefloss's draw from verl's candidates).
       verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights (rollout_is_weights).
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def build_extension(build_dir, verbose=False):
    """prefloss_torch_ext.cpp through torch.utils.cpp_extension.load (ninja); returns (module, seconds)."""
    os.makedirs(build_dir, exist_ok=True)
    t0 = time.perf_counter()
    ext = cpp_extension.load(
        name="prefloss_torch_ext",
        sources=[os.path.join(HERE, "prefloss_torch_ext.cpp")],
        extra_include_paths=[os.path.join(REPO, "include"), "/usr/include/eigen3"],
        build_directory=build_dir,
        # torch 1.13 passes -std=c++14 and no -O flag; these come after it. Never -ffast-math:
        # prefloss's kernels rely on IEEE inf/NaN semantics.
        # -O1: building the module, not running the toy loop, is what takes the time.
        extra_cflags=["-O1", "-march=native", "-std=c++17"],
        verbose=verbose,
    )
    return ext, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Reference formulas (torch autograd computes the expected gradients from these)
# ---------------------------------------------------------------------------------------------

def trl_sequence_logps(per_token_logps, loss_mask):
    # TRL concatenated_forward: per_token_logps[~loss_mask] = 0; all_logps = per_token_logps.sum(-1)
    per_token_logps = per_token_logps.clone()
    per_token_logps[~loss_mask] = 0
    return per_token_logps.sum(-1)


def trl_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0,
                 reference_free=False):
    # TRL DPOTrainer.dpo_loss, loss_type == "sigmoid" (f_divergence_type reverse KL).
    logratios = chosen_logps - rejected_logps
    if reference_free:
        ref_logratios = torch.tensor([0], dtype=logratios.dtype, device=logratios.device)
    else:
        ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def verl_masked_mean(x, mask):
    # verl.utils.torch_functional.masked_mean (the metrics' means)
    return (x * mask).sum() / mask.sum()


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    # verl core_algos.agg_loss with dp_size 1 and no global normalizers.
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).to(loss_mat.dtype)
        loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / loss_mask.shape[-1]
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).to(loss_mat.dtype)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    raise ValueError(loss_agg_mode)


def verl_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             clip_ratio=0.2, clip_ratio_c=3.0):
    # verl core_algos.compute_policy_loss_vanilla (clip_ratio_low = clip_ratio_high = clip_ratio).
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).to(log_prob.dtype), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).to(log_prob.dtype), response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()}


def verl_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high):
    # verl core_algos.compute_policy_loss_gspo: sg[s_i] pi / sg[pi], log clamped at 10 from above,
    # aggregated seq-mean-token-mean.
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).to(log_prob.dtype), response_mask)
    return verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean"), pg_clipfrac.item()


def verl_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                           clip_ratio_low=0.2, clip_ratio_high=0.2):
    # verl core_algos.compute_policy_loss_cispo.
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped_ratio_sg = clipped_ratio.detach()
    pg_losses = -clipped_ratio_sg * advantages * log_prob
    pg_clipfrac = verl_masked_mean((ratio != clipped_ratio).float(), response_mask)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "scale": verl_agg_loss(pg_losses.detach().abs(), response_mask, loss_agg_mode).item()}


def verl_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, tau_pos=1.0, tau_neg=1.05):
    # verl core_algos.compute_policy_loss_sapo (seq-mean-token-mean whatever loss_agg_mode says).
    tau_pos = torch.as_tensor(tau_pos, dtype=advantages.dtype)
    tau_neg = torch.as_tensor(tau_neg, dtype=advantages.dtype)

    def gate_function(x, tau):
        return torch.sigmoid(tau * (x - 1.0)) * (4.0 / tau)

    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    taus = torch.where(condition=advantages > 0, input=tau_pos, other=tau_neg)
    gates = gate_function(ratio, taus)
    pg_losses = -gates * advantages
    pg_loss = verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean")
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, {"actor/ppo_kl": ppo_kl.item(),
                     "scale": verl_agg_loss(pg_losses.detach().abs(), response_mask, "seq-mean-token-mean").item()}


def verl_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean"):
    # verl core_algos.compute_policy_loss_gpg (no metrics).
    pg_losses = -log_prob * advantages
    return verl_agg_loss(pg_losses, response_mask, loss_agg_mode), {
        "scale": verl_agg_loss(pg_losses.detach().abs(), response_mask, loss_agg_mode).item()}


def verl_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, cliprange_low=0.2,
                              cliprange_high=0.2):
    # verl core_algos.compute_policy_loss_geo_mean (loss_agg_mode not used: the mean over rows).
    negative_approx_kl = log_prob - old_log_prob
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -cliprange_low, cliprange_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    pg_loss = torch.mean(pg_losses)
    clipped = torch.ne(negative_approx_kl, negative_approx_kl_clamp)
    pg_clipfrac = verl_masked_mean((clipped * (advantages > 0)).float(), response_mask)
    pg_clipfrac_lower = verl_masked_mean((clipped * (advantages < 0)).float(), response_mask)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
                     "scale": torch.mean(pg_losses.detach().abs()).item()}


def verl_clip_cov_candidates(old_log_prob, log_prob, advantages, response_mask, cliprange_low=0.2,
                             cliprange_high=0.2, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0):
    # verl core_algos.compute_policy_loss_clip_cov up to torch.randperm: the [B, T] bool candidates
    # it draws from and how many it draws (clip_num, capped by the candidates).
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    cov_all = (advantages - verl_masked_mean(advantages, response_mask)) * (
        log_prob - verl_masked_mean(log_prob.detach(), response_mask))
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    top_k_idx = (cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0)
    return top_k_idx, min(clip_num, int(top_k_idx.sum().item()))


def verl_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, selected, loss_agg_mode="token-mean",
                              cliprange_low=0.2, cliprange_high=0.2):
    # verl core_algos.compute_policy_loss_clip_cov from corr on, with corr = 1 - selected (the
    # tokens verl would draw with torch.randperm, here prefloss's draw).
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    corr = 1 - selected
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    pg_clipfrac = verl_masked_mean((corr == 0).float(), response_mask)
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "scale": verl_agg_loss(pg_losses.detach().abs(), response_mask, loss_agg_mode).item()}


def verl_kl_cov_topk(log_prob, advantages, response_mask, kl_cov_ratio=2e-4):
    # verl core_algos.compute_policy_loss_kl_cov's selection as a [B, T] 0/1 tensor: torch.topk of
    # cov over the valid tokens (plain means).
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()
    cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
    k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
    large_cov_idxs = all_valid_idx[torch.topk(cov_lst_all, k_percent_nums, largest=True).indices]
    out = torch.zeros(advantages.numel(), dtype=advantages.dtype)
    out[large_cov_idxs] = 1
    return out.view_as(advantages)


def verl_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, selected, loss_agg_mode="token-mean",
                            ppo_kl_coef=1.0):
    # verl core_algos.compute_policy_loss_kl_cov with its top-k indices given as `selected`.
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    ppo_kl_abs = verl_masked_mean(negative_approx_kl.abs(), response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = torch.where(selected != 0, pg_losses_kl, pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, {"actor/ppo_kl": ppo_kl_abs.item(),
                     "scale": verl_agg_loss(pg_losses.detach().abs(), response_mask, loss_agg_mode).item()}


def verl_rollout_correction_weights(log_ratio, response_mask, rollout_is="token", threshold_upper=2.0,
                                    threshold_lower=None):
    # verl rollout_corr_helper.compute_rollout_correction_weights (SAFETY_BOUND 20, no batch
    # normalization); threshold_lower set = the "lower_upper" (IcePop) form.
    if rollout_is == "token":
        raw = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        log_ratio_sum = (log_ratio * response_mask).sum(dim=-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio)
    raw = raw * response_mask
    if threshold_lower is None:
        return raw.clamp(max=threshold_upper)
    kept = (raw >= threshold_lower) & (raw <= threshold_upper)
    return torch.where(kept, raw, torch.zeros_like(raw))


# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------

def rel_diff(got, want):
    """max|got - want| / max|want| (0 when both are 0)."""
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def worst(pairs):
    return max(rel_diff(g, w) for g, w in pairs)


class Checks:
    def __init__(self):
        self.failed = []

    def expect(self, name, value, tol):
        ok = value <= tol
        if not ok or not math.isfinite(value):
            self.failed.append(f"{name}: {value:.3e} > {tol:.0e}")
        return value

    def require(self, name, cond, detail=""):
        if not cond:
            self.failed.append(f"{name}: {detail}")


# ---------------------------------------------------------------------------------------------
# The toy task and policy
# ---------------------------------------------------------------------------------------------

class TinyLM(nn.Module):
    """p(y_t | y_{t-1}, t): embeddings of the previous token and the position, a tanh layer, logits."""

    def __init__(self, vocab, length, hidden):
        super().__init__()
        self.tok = nn.Embedding(vocab + 1, hidden)  # + BOS
        self.pos = nn.Embedding(length, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.bos = vocab

    def token_logps(self, y):
        prev = torch.cat([torch.full_like(y[:, :1], self.bos), y[:, :-1]], dim=1)
        pos = torch.arange(y.shape[1]).expand_as(y)
        h = torch.tanh(self.mix(self.tok(prev) + self.pos(pos)))
        logits = self.head(h)
        # TRL selective_log_softmax for float32/64: log_softmax then gather.
        return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def make_batch(gen, batch, length, vocab):
    """Chosen completions count upwards mod vocab from a random start; rejected are random tokens.
    Each completion has a random length in [length/2, length] (a ~75% valid-token mask)."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    chosen = (start + torch.arange(length)) % vocab
    rejected = torch.randint(0, vocab, (batch, length), generator=gen)
    lens = torch.randint(length // 2, length + 1, (2, batch, 1), generator=gen)
    t = torch.arange(length)
    return chosen, t < lens[0], rejected, t < lens[1]


def dpo_grads_both_ways(ext, model, ref_model, batch, beta):
    """(prefloss grads, TRL grads, prefloss loss, TRL loss, prefloss metrics, TRL metrics) on one batch."""
    yc, mc, yr, mr = batch
    params = [p for p in model.parameters()]
    with torch.no_grad():
        ref_c = trl_sequence_logps(ref_model.token_logps(yc), mc)
        ref_r = trl_sequence_logps(ref_model.token_logps(yr), mr)
    lp_c, lp_r = model.token_logps(yc), model.token_logps(yr)  # [B, T], one graph for both losses

    sc, sr = trl_sequence_logps(lp_c, mc), trl_sequence_logps(lp_r, mr)
    losses, cr, rr = trl_dpo_loss(sc, sr, ref_c, ref_r, beta)
    trl_loss = losses.mean()
    trl_metrics = {"reward_chosen": cr.mean().item(), "reward_rejected": rr.mean().item(),
                   "reward_margin": (cr - rr).mean().item(), "reward_accuracy": (cr > rr).float().mean().item(),
                   # the rewards are beta * differences of sums of this size: the scale their rounding is
                   # relative to (a mean reward near 0 has no relative precision in either computation)
                   "scale": beta * max(sc.abs().max().item(), sr.abs().max().item())}
    g_trl = torch.autograd.grad(trl_loss, params, retain_graph=True)

    pf_loss, pf_losses, pf_metrics = ext.dpo(ext.masked_sum(lp_c, mc), ext.masked_sum(lp_r, mr), ref_c, ref_r,
                                             beta=beta)
    g_pf = torch.autograd.grad(pf_loss, params)
    return g_pf, g_trl, pf_loss, trl_loss, pf_losses, losses, pf_metrics, trl_metrics


def train(ext, args, checks):
    torch.manual_seed(0)
    V, T, H, B, beta = 16, 16, 32, 32, 0.1
    model = TinyLM(V, T, H)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    steps = args.steps or (30 if args.quick else 60)
    worst_g, worst_loss, worst_m, acc_differs = 0.0, 0.0, 0.0, 0
    curve = []
    t0 = time.perf_counter()
    for step in range(steps):
        batch = make_batch(gen, B, T, V)
        g_pf, g_trl, pf_loss, trl_loss, pf_losses, trl_losses, pf_m, trl_m = dpo_grads_both_ways(
            ext, model, ref_model, batch, beta)
        worst_g = max(worst_g, worst(zip(g_pf, g_trl)))
        worst_loss = max(worst_loss, rel_diff(pf_loss, trl_loss), rel_diff(pf_losses, trl_losses))
        worst_m = max(worst_m, max(abs(pf_m[k] - trl_m[k]) / trl_m["scale"]
                                   for k in ("reward_chosen", "reward_rejected", "reward_margin")))
        # Accuracy counts pairs with chosen reward > rejected reward: at step 0 the policy is the
        # reference and every reward is 0 up to rounding (prefloss sums in double, TRL in float),
        # so the comparison starts once the policy has moved.
        if step > 0 and pf_m["reward_accuracy"] != trl_m["reward_accuracy"]:
            acc_differs += 1
        for p, g in zip(model.parameters(), g_pf):  # train on prefloss's gradient
            p.grad = g
        opt.step()
        curve.append((step, pf_loss.item(), pf_m["reward_accuracy"], pf_m["reward_margin"]))
    train_s = time.perf_counter() - t0

    print(f"DPO training, float32, {steps} steps of {B} pairs x {T} tokens (vocab {V}), beta {beta}, "
          f"optimizer Adam on prefloss's gradient:")
    print("  step    loss   reward_acc  reward_margin")
    every = max(1, steps // 10)
    for step, loss, acc, margin in curve:
        if step % every == 0 or step == steps - 1:
            print(f"  {step:4d}  {loss:.4f}  {acc:10.3f}  {margin:13.4f}")
    print(f"  training time {train_s:.2f} s (both gradients every step)")
    first = sum(c[1] for c in curve[:3]) / 3
    last = sum(c[1] for c in curve[-3:]) / 3
    checks.require("DPO loss falls", last < 0.9 * first, f"first 3 steps {first:.4f}, last 3 {last:.4f}")
    print(f"  agreement with TRL's formula over {steps} steps (float32): grads {worst_g:.2e}, "
          f"loss/losses {worst_loss:.2e}, reward metrics {worst_m:.2e} (of beta max|sequence logp|) "
          f"(tolerance 1e-5); reward_accuracy differs at {acc_differs} of steps 1..{steps - 1}")
    checks.expect("DPO float32 grads vs TRL", worst_g, TOL[torch.float32])
    checks.expect("DPO float32 loss vs TRL", worst_loss, TOL[torch.float32])
    checks.expect("DPO float32 reward metrics vs TRL", worst_m, TOL[torch.float32])
    checks.require("DPO reward_accuracy equals TRL's", acc_differs == 0, f"differs at {acc_differs} steps")

    # One float64 step from the trained model (policy and reference no longer equal).
    m64, r64 = copy.deepcopy(model).double(), copy.deepcopy(ref_model).double()
    g_pf, g_trl, pf_loss, trl_loss, pf_losses, trl_losses, _, _ = dpo_grads_both_ways(
        ext, m64, r64, make_batch(gen, B, T, V), beta)
    w64, l64 = worst(zip(g_pf, g_trl)), max(rel_diff(pf_loss, trl_loss), rel_diff(pf_losses, trl_losses))
    print(f"  one float64 step: grads {w64:.2e}, loss/losses {l64:.2e} (tolerance 1e-12)")
    checks.expect("DPO float64 grads vs TRL", w64, TOL[torch.float64])
    checks.expect("DPO float64 loss vs TRL", l64, TOL[torch.float64])
    return train_s


# ---------------------------------------------------------------------------------------------
# PPO-clip against verl, and the other bindings against their formulas
# ---------------------------------------------------------------------------------------------

def ppo_inputs(dtype, seed, B=16, T=96):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(B, T, generator=g)).to(dtype)
    old = logp + (3 * torch.rand(B, T, generator=g) - 1.5).to(dtype)  # ratios e^-1.5 .. e^1.5: every branch
    adv = torch.randn(B, T, generator=g).to(dtype)
    lens = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    mask = torch.arange(T) < lens
    return logp, old, adv, mask


def check_ppo(ext, checks):
    print("ppo_clip against verl compute_policy_loss_vanilla (clip 0.2, clip_ratio_c 3) + agg_loss:")
    for dtype in (torch.float32, torch.float64):
        for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
            # verl's seq-mean-token-mean divides each row by (W_i + 1e-8), prefloss by W_i: a
            # relative 1e-8 / W_i (~2e-10 here) by construction, below float32's tolerance but
            # not float64's, so that mode is compared in float32 only.
            if mode == "seq-mean-token-mean" and dtype == torch.float64:
                continue
            logp, old, adv, mask = ppo_inputs(dtype, 7)
            x = logp.clone().requires_grad_(True)
            want, vm = verl_policy_loss_vanilla(old, x, adv, mask.to(dtype), loss_agg_mode=mode)
            (g_want,) = torch.autograd.grad(want, [x])
            y = logp.clone().requires_grad_(True)
            got, got_losses, pm = ext.ppo_clip(y, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                                               aggregation=mode)
            (g_got,) = torch.autograd.grad(got, [y])
            tol = TOL[dtype]
            dl, dg = rel_diff(got, want), rel_diff(g_got, g_want)
            dm = max(abs(pm["clip_fraction"] - vm["actor/pg_clipfrac"]),
                     abs(pm["clip_fraction_low"] - vm["actor/pg_clipfrac_lower"]),
                     abs(pm["approx_kl"] - vm["actor/ppo_kl"]) / abs(vm["actor/ppo_kl"]))
            print(f"  {str(dtype)[6:]:8s} {mode:24s} loss {dl:.2e}  grad {dg:.2e}  metrics {dm:.2e}  "
                  f"(clipfrac {pm['clip_fraction']:.3f}, clipfrac_lower {pm['clip_fraction_low']:.3f}; "
                  f"tolerance {tol:.0e})")
            checks.expect(f"ppo_clip {dtype} {mode} loss", dl, tol)
            checks.expect(f"ppo_clip {dtype} {mode} grad", dg, tol)
            checks.expect(f"ppo_clip {dtype} {mode} metrics", dm, tol)
            checks.require(f"ppo_clip {dtype} {mode} exercises the dual clip", pm["clip_fraction_low"] > 0)
    # GSPO: verl's seq-mean-token-mean divides by W_i + 1e-8, so float32 (see above).
    print("ppo_clip importance_level='sequence' against verl compute_policy_loss_gspo (clips 3e-4 / 4e-4):")
    logp, old, adv, mask = ppo_inputs(torch.float32, 8)
    old = logp + 0.01 * (old - logp)  # row means near 0, so the GSPO paper's tight clips bind on some rows
    x = logp.clone().requires_grad_(True)
    want, want_clip = verl_policy_loss_gspo(old, x, adv, mask.float(), 3e-4, 4e-4)
    (g_want,) = torch.autograd.grad(want, [x])
    y = logp.clone().requires_grad_(True)
    got, _, pm = ext.ppo_clip(y, old, adv, mask, clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean",
                              importance_level="sequence", log_ratio_clamp=10.0)
    (g_got,) = torch.autograd.grad(got, [y])
    dl, dg = rel_diff(got, want), rel_diff(g_got, g_want)
    print(f"  float32 loss {dl:.2e}  grad {dg:.2e}  clipfrac {pm['clip_fraction']:.3f} (verl {want_clip:.3f})")
    checks.expect("ppo_clip gspo loss", dl, TOL[torch.float32])
    checks.expect("ppo_clip gspo grad", dg, TOL[torch.float32])
    checks.expect("ppo_clip gspo clipfrac", abs(pm["clip_fraction"] - want_clip), TOL[torch.float32])
    checks.require("ppo_clip gspo clips some rows and not others", 0 < pm["clip_fraction"] < 1)


def check_policy(ext, checks):
    """cispo, sapo, gpg, gmpo, clip_cov and kl_cov against verl's formulas in float32 (loss and
    gradient by autograd; metrics against verl's); Clip-Cov / KL-Cov over prefloss's selection,
    which is checked against verl's candidates / top-k.

    The loss is a sum of token terms of both signs, each rounded in float32: its deviation is
    measured against the same aggregation of the terms' magnitudes (verl's "scale" below, the
    sum's condition), as tests/torch/test_torch_losses.cpp's check_token does; with advantages of
    both signs the loss itself may cancel to ~1e-3 of that. Gradients are per token, measured
    against their own max as everywhere else."""
    print("policy losses against verl compute_policy_loss_cispo / _sapo / _gpg / _geo_mean / _clip_cov / _kl_cov "
          "(float32; max abs deviation, and relative):")
    dtype, tol = torch.float32, TOL[torch.float32]
    logp, old, adv, mask = ppo_inputs(dtype, 9)
    fmask = mask.to(dtype)
    modes = ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-sum")
    cc = dict(clip_cov_ratio=0.02, clip_cov_lb=1.0, clip_cov_ub=5.0)
    sel_cc, info_cc = ext.clip_cov_select(logp, old, adv, mask, cov_ratio=cc["clip_cov_ratio"],
                                          cov_lower=cc["clip_cov_lb"], cov_upper=cc["clip_cov_ub"], seed=5)
    cand, n_draw = verl_clip_cov_candidates(old, logp, adv, fmask, **cc)
    checks.require("clip_cov_select picks only verl's candidates", bool((sel_cc.bool() & ~cand).sum() == 0))
    checks.require("clip_cov_select picks verl's count", int(sel_cc.sum().item()) == n_draw == info_cc["selected"],
                   f"{int(sel_cc.sum().item())} vs verl {n_draw}")
    checks.require("clip_cov_select: several tokens", n_draw > 1, f"{n_draw}")
    sel_kc, info_kc = ext.kl_cov_select(logp, adv, mask, cov_ratio=0.02)
    want_kc = verl_kl_cov_topk(logp, adv, fmask, kl_cov_ratio=0.02)
    checks.require("kl_cov_select is verl's topk", bool(torch.equal(sel_kc, want_kc)),
                   f"{int((sel_kc != want_kc).sum().item())} tokens differ")
    print(f"  clip_cov_select: {info_cc['selected']:.0f} of {info_cc['candidates']:.0f} candidates (verl: "
          f"{n_draw} of {int(cand.sum().item())}); kl_cov_select: {info_kc['selected']:.0f} tokens, "
          f"{'the same as' if torch.equal(sel_kc, want_kc) else 'NOT'} verl's topk")

    # (name, prefloss call, verl call, [(prefloss metric, verl metric)]) over leaf copies of logp.
    cases = []
    for mode in modes:
        cases.append((f"cispo {mode}", lambda y, mode=mode: ext.cispo(y, old, adv, mask, aggregation=mode),
                      lambda x, mode=mode: verl_policy_loss_cispo(old, x, adv, fmask, mode),
                      [("clip_fraction", "actor/pg_clipfrac"), ("approx_kl", "actor/ppo_kl")]))
    cases.append(("sapo", lambda y: ext.sapo(y, old, adv, mask),
                  lambda x: verl_policy_loss_sapo(old, x, adv, fmask), [("approx_kl", "actor/ppo_kl")]))
    for mode in modes:
        cases.append((f"gpg {mode}", lambda y, mode=mode: ext.gpg(y, old, adv, mask, aggregation=mode),
                      lambda x, mode=mode: verl_policy_loss_gpg(old, x, adv, fmask, mode), []))
    cases.append(("gmpo", lambda y: ext.gmpo(y, old, adv, mask),
                  lambda x: verl_policy_loss_geo_mean(old, x, adv, fmask),
                  [("clip_fraction", "actor/pg_clipfrac"), ("clip_fraction_low", "actor/pg_clipfrac_lower"),
                   ("approx_kl", "actor/ppo_kl")]))
    for mode in modes:
        cases.append((f"clip_cov {mode}",
                      lambda y, mode=mode: ext.clip_cov(y, old, adv, mask, sel_cc, aggregation=mode),
                      lambda x, mode=mode: verl_policy_loss_clip_cov(old, x, adv, fmask, sel_cc, mode),
                      [("selected_fraction", "actor/pg_clipfrac"), ("approx_kl", "actor/ppo_kl")]))
        cases.append((f"kl_cov {mode}",
                      lambda y, mode=mode: ext.kl_cov(y, old, adv, mask, sel_kc, aggregation=mode),
                      lambda x, mode=mode: verl_policy_loss_kl_cov(old, x, adv, fmask, sel_kc, mode),
                      [("abs_kl", "actor/ppo_kl")]))
    for name, pf, vl, metric_pairs in cases:
        x = logp.clone().requires_grad_(True)
        want, vm = vl(x)
        (g_want,) = torch.autograd.grad(want, [x])
        y = logp.clone().requires_grad_(True)
        got, _, pm = pf(y)
        (g_got,) = torch.autograd.grad(got, [y])
        al = abs(got.item() - want.item())
        dl = al / vm["scale"]
        ag = (g_got.double() - g_want.double()).abs().max().item()
        dg = rel_diff(g_got, g_want)
        dm = max([abs(pm[a] - vm[b]) / max(abs(vm[b]), 1.0) for a, b in metric_pairs], default=0.0)
        print(f"  {name:32s} loss {al:.1e} (/ sum|terms| {dl:.1e}, / |loss| {al / abs(want.item()):.1e})  "
              f"grad {ag:.1e} ({dg:.1e})  metrics {dm:.1e}")
        if name == "gmpo":
            gm = pm
        checks.expect(f"{name} loss", dl, tol)
        checks.expect(f"{name} grad", dg, tol)
        checks.expect(f"{name} metrics", dm, tol)
    checks.require("gmpo clips on both sides", 0 < gm["clip_fraction"] and 0 < gm["clip_fraction_low"])

    print("rollout_is_weights against verl compute_rollout_correction_weights (float32, max abs deviation):")
    noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(4))
    for level, lower in (("token", None), ("token", 0.8), ("sequence", None), ("sequence", 0.8)):
        # Token log-ratios of ~0.3, or ~0.05 so that the row sums fall on both sides of the bounds.
        rollout = old + (0.3 if level == "token" else 0.05) * noise
        w, keep, rm = ext.rollout_is_weights(old, rollout, mask, level=level, upper=1.5,
                                             bound="truncate" if lower is None else "mask",
                                             lower=0.0 if lower is None else lower)
        want = verl_rollout_correction_weights(old - rollout, fmask, level, 1.5, lower)
        d = (w.double() - want.double()).abs().max().item()
        dr = rel_diff(w, want)
        name = f"rollout_is_weights {level} {'truncate' if lower is None else 'mask'}"
        print(f"  {name:40s} {d:.1e} ({dr:.1e})  truncated_fraction {rm['truncated_fraction']:.3f}")
        checks.expect(name, dr, tol)
        checks.require(f"{name} keep", bool(torch.equal(keep, mask)))
        checks.require(f"{name} binds", 0 < rm["truncated_fraction"] < 1, f"{rm['truncated_fraction']}")

    # Unknown strings and bad arguments arrive as ValueError naming the argument.
    bad = [
        ("cispo aggregation", "aggregation", lambda: ext.cispo(logp, old, adv, mask, aggregation="token-avg")),
        ("sapo aggregation", "aggregation", lambda: ext.sapo(logp, old, adv, mask, aggregation="seq")),
        ("gpg aggregation", "aggregation", lambda: ext.gpg(logp, old, adv, mask, aggregation="")),
        ("clip_cov aggregation", "aggregation",
         lambda: ext.clip_cov(logp, old, adv, mask, sel_cc, aggregation="mean")),
        ("kl_cov aggregation", "aggregation", lambda: ext.kl_cov(logp, old, adv, mask, sel_kc, aggregation="x")),
        ("kl_cov_select cov_ratio", "cov_ratio", lambda: ext.kl_cov_select(logp, adv, mask, cov_ratio=0.0)),
        ("clip_cov selected dtype", "'selected'", lambda: ext.clip_cov(logp, old, adv, mask, sel_cc.double())),
        ("gmpo old_logp shape", "'old_logp'", lambda: ext.gmpo(logp, old[:, :5].contiguous(), adv, mask)),
        ("rollout_is_weights level", "level", lambda: ext.rollout_is_weights(old, old, mask, level="row")),
        ("rollout_is_weights bound", "bound", lambda: ext.rollout_is_weights(old, old, mask, bound="clip")),
        ("rollout_is_weights rs", "rs", lambda: ext.rollout_is_weights(old, old, mask, rs="geo")),
    ]
    named = 0
    for name, needle, call in bad:
        try:
            call()
            checks.require(f"{name} raises", False, "no exception")
        except ValueError as e:
            checks.require(f"{name} names {needle}", needle in str(e), str(e))
            named += needle in str(e)
        except Exception as e:  # noqa: BLE001 (any other type is the failure being checked)
            checks.require(f"{name} raises ValueError", False, f"got {type(e).__name__}: {e}")
    print(f"  {named} of {len(bad)} bad strings / arguments raise ValueError naming the argument")


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def compare(checks, name, fn_pf, fn_ref, inputs):
    """fn_pf / fn_ref map leaf copies of inputs to a scalar loss; compares loss and gradients (float64)."""
    a = [leaf(t) for t in inputs]
    b = [leaf(t) for t in inputs]
    got, want = fn_pf(*a), fn_ref(*b)
    ga = torch.autograd.grad(got, a)
    gb = torch.autograd.grad(want, b)
    d = max(rel_diff(got, want), worst(zip(ga, gb)))
    checks.expect(f"{name} vs reference (float64)", d, TOL[torch.float64])
    return d


def check_bindings(ext, checks):
    dt = torch.float64
    g = torch.Generator().manual_seed(3)
    B, T, V = 12, 20, 11

    def u(*shape, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g)).to(dt)

    mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)
    x = u(B, T, lo=-5, hi=0)
    c, r, rc, rr = u(B, lo=-30, hi=-10), u(B, lo=-30, hi=-10), u(B, lo=-30, hi=-10), u(B, lo=-30, hi=-10)
    res = {}
    res["masked_sum"] = compare(checks, "masked_sum", lambda x: ext.masked_sum(x, mask).pow(2).sum(),
                                lambda x: trl_sequence_logps(x, mask).pow(2).sum(), [x])
    res["masked_mean"] = compare(checks, "masked_mean", lambda x: ext.masked_mean(x, mask).pow(2).sum(),
                                 lambda x: ((x * mask).sum(-1) / mask.sum(-1)).pow(2).sum(), [x])
    for variant, ls in (("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0)):
        def ref(c, r, ls=ls, variant=variant):  # TRL dpo_loss, loss_type = variant
            logits = (c - r) - (rc - rr)
            if variant == "sigmoid":
                return (-F.logsigmoid(0.1 * logits) * (1 - ls) - F.logsigmoid(-0.1 * logits) * ls).mean()
            if variant == "robust":
                return ((-F.logsigmoid(0.1 * logits) * (1 - ls) + F.logsigmoid(-0.1 * logits) * ls)
                        / (1 - 2 * ls)).mean()
            return torch.relu(1 - 0.1 * logits).mean()
        res[f"dpo {variant}"] = compare(
            checks, f"dpo {variant}",
            lambda c, r, ls=ls, variant=variant: ext.dpo(c, r, rc, rr, label_smoothing=ls, variant=variant)[0],
            ref, [c, r])
    def nca_js_ref(c, r):  # TRL _compute_loss, loss_type "nca_pair", f_divergence_type "js_divergence"
        cr, rj = 0.1 * F.logsigmoid(c - rc), 0.1 * F.logsigmoid(r - rr)
        return (-F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)).mean()
    res["dpo nca_pair js"] = compare(
        checks, "dpo nca_pair js_divergence",
        lambda c, r: ext.dpo(c, r, rc, rr, variant="nca_pair", divergence="js_divergence")[0], nca_js_ref, [c, r])
    res["dpo reference_free, batch_count"] = compare(
        checks, "dpo reference_free batch_count",
        lambda c, r: ext.dpo(c, r, rc, rr, beta=0.05, reference_free=True, batch_count=2 * B)[0],
        lambda c, r: (-F.logsigmoid(0.05 * (c - r))).sum() / (2 * B), [c, r])
    res["ipo"] = compare(checks, "ipo", lambda c, r: ext.ipo(c, r, rc, rr, beta=0.5)[0],
                         lambda c, r: (((c - r) - (rc - rr) - 1 / (2 * 0.5)) ** 2).mean(), [c, r])
    cm, rm = u(B, lo=-3, hi=0), u(B, lo=-3, hi=0)
    res["simpo"] = compare(  # TRL CPOTrainer.cpo_loss, loss_type "simpo"
        checks, "simpo", lambda c, r: ext.simpo(c, r, beta=2.0, gamma=0.5)[0],
        lambda c, r: (-F.logsigmoid(2.0 * ((c - r) - 0.5 / 2.0))).mean(), [cm, rm])
    res["nll"] = compare(checks, "nll", lambda s: ext.nll(s, normalizer=37.0)[0], lambda s: -s.sum() / 37.0, [c])
    res["bradley_terry"] = compare(  # TRL RewardTrainer: -logsigmoid(r_c - r_r - margin).mean() + centering
        checks, "bradley_terry", lambda a, b: ext.bradley_terry(a, b, rc - rr, center_coef=0.01)[0],
        lambda a, b: -F.logsigmoid(a - b - (rc - rr)).mean() + 0.01 * ((a + b) ** 2).mean(), [u(B), u(B)])
    desirable = torch.rand(B, generator=g) < 0.5
    klp, klr = u(B, lo=-30, hi=-10), u(B, lo=-30, hi=-10)

    def kto_ref(p):  # TRL KTOTrainer.kto_loss
        kl = (klp - klr).mean().detach().clamp(min=0)
        lr = p - rc
        chosen_losses = 1 - torch.sigmoid(0.1 * (lr[desirable] - kl))
        rejected_losses = 1 - torch.sigmoid(0.1 * (kl - lr[~desirable]))
        return torch.cat((1.0 * chosen_losses, 1.3 * rejected_losses), 0).mean()
    res["kto"] = compare(checks, "kto",
                         lambda p: ext.kto(p, rc, desirable, klp, klr, undesirable_weight=1.3)[0], kto_ref, [c])
    vals, old_v, rets = u(B, T), u(B, T), u(B, T)
    for mode in ("token-mean", "seq-mean-token-sum"):
        def vref(v, mode=mode):  # verl compute_value_loss, clip_by_value = max(min(v, hi), lo)
            clipped = torch.max(torch.min(v, old_v + 0.2), old_v - 0.2)
            return 0.5 * verl_agg_loss(torch.max((v - rets) ** 2, (clipped - rets) ** 2), mask.to(dt), mode)
        res[f"value_loss {mode}"] = compare(
            checks, f"value_loss {mode}", lambda v, mode=mode: ext.value_loss(v, old_v, rets, mask, clip=0.2,
                                                                                aggregation=mode)[0],
            vref, [vals])
    logits, labels = u(B, T, V, lo=-4, hi=4), torch.randint(0, V, (B, T), generator=g)
    up, upe = u(B, T), u(B, T)

    def lp_ref(z):  # TRL selective_log_softmax; verl entropy_from_logits; masked tokens give 0
        lp = torch.log_softmax(z / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        pd = torch.softmax(z / 0.7, -1)
        ent = torch.logsumexp(z / 0.7, -1) - (pd * z / 0.7).sum(-1)
        return ((lp * up + ent * upe) * mask).sum()

    def lp_pf(z):
        lp, ent = ext.token_logprobs(z, labels, mask, temperature=0.7, entropy=True)
        return (lp * up + ent * upe).sum()
    res["token_logprobs"] = compare(checks, "token_logprobs (entropy, temperature)", lp_pf, lp_ref, [logits])
    print("the other bindings against their reference formulas, float64 (max rel of loss and grads, "
          "tolerance 1e-12):")
    print("  " + ", ".join(f"{k} {v:.1e}" for k, v in res.items()))

    # prefloss's exceptions (std::invalid_argument) must arrive as ValueError with the message.
    cases = [
        ("option_error", lambda: ext.dpo(c, r, rc, rr, beta=-1.0)),
        ("shape_error", lambda: ext.dpo(c, r[:3], rc, rr)),
        ("tensor_error", lambda: ext.dpo(c.float(), r, rc, rr)),
        ("layout_error", lambda: ext.masked_sum(x.t(), mask.t())),
        ("unknown variant", lambda: ext.dpo(c, r, rc, rr, variant="nope")),
        ("unknown divergence", lambda: ext.dpo(c, r, rc, rr, divergence="kl")),
        ("unknown aggregation", lambda: ext.ppo_clip(x, x, x, mask, aggregation="token-avg")),
        ("unknown importance level", lambda: ext.ppo_clip(x, x, x, mask, importance_level="row")),
    ]
    seen = []
    for name, call in cases:
        try:
            call()
            checks.require(f"{name} raises", False, "no exception")
        except ValueError as e:
            seen.append(f"{name}: ValueError({str(e)[:70]!r}...)")
        except Exception as e:  # noqa: BLE001 (any other type is the failure being checked)
            checks.require(f"{name} raises ValueError", False, f"got {type(e).__name__}: {e}")
    print("prefloss errors reach Python as ValueError:")
    for s in seen:
        print("  " + s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", help="extension build directory (default: a new temporary directory)")
    ap.add_argument("--quick", action="store_true", help="30 training steps instead of 60 (the ctest entry)")
    ap.add_argument("--steps", type=int, help="training steps (overrides --quick)")
    ap.add_argument("--verbose", action="store_true", help="show the extension's compiler commands")
    args = ap.parse_args()
    torch.set_num_threads(1)

    build_dir = args.build_dir or tempfile.mkdtemp(prefix="prefloss_torch_ext_")
    ext, build_s = build_extension(build_dir, args.verbose)
    print(f"extension: {ext.__file__} (torch {torch.__version__}), load/build {build_s:.1f} s "
          f"(a rebuild only when a source changed)")

    checks = Checks()
    t0 = time.perf_counter()
    train(ext, args, checks)
    check_ppo(ext, checks)
    check_policy(ext, checks)
    check_bindings(ext, checks)
    print(f"checks took {time.perf_counter() - t0:.2f} s after the build")
    if checks.failed:
        print("FAILED:\n  " + "\n  ".join(checks.failed))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
