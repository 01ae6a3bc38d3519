#!/usr/bin/python3
"""Golden data for tests/test_golden.cpp: every prefloss loss, computed by PyTorch autograd
straight from the anchors' formulas, never from prefloss.

Provenance
----------
Each function below transcribes one anchor's loss into float64 torch code and lets autograd
produce d loss / d (policy token log-probs):

- DPO variants (golden_dpo_variants, golden_ld_dpo): TRL `DPOTrainer._compute_loss` at f2cd577,
  every loss_type that scores a pair and every f_divergence_type (alpha_divergence's clamp max as
  a parameter: TRL's table has no float64 entry), and ld_alpha's shared + alpha * tail sums on
  policy and reference. aot / aot_unpaired losses are written by example: the sorted term at the
  rank of the example's value. golden_dpo_mixture: loss_type lists with loss_weights, and
  use_weighting's WPO weights from the logits (each term weighted, as TRL does).
- DPO family: TRL `DPOTrainer.dpo_loss` (loss_type sigmoid / robust / hinge / ipo, label
  smoothing, reference_free), with sequence log-probs summed over completion tokens (TRL's
  `concatenated_forward`), and for IPO also TRL's length-averaged form.
- KTO: TRL `KTOTrainer.kto_loss` (kl = mean(policy_KL - reference_KL).detach().clamp(min=0);
  losses = cat(wd * (1 - sigmoid(beta * (chosen_logratios - kl))),
  wu * (1 - sigmoid(beta * (kl - rejected_logratios)))); loss = losses.mean()).
- BCO (golden_bco): TRL `BCOTrainer.bco_loss` at f2cd577 (trl/experimental/bco): rewards
  beta * (policy - reference), `RunningMoments.update` with them (in float64, without TRL's
  float32 casts), delta = running.mean, losses = cat(-logsigmoid(r_c - delta),
  w * -logsigmoid(-(r_r - delta))) with w the clamped UDM density ratio or 1; loss = nanmean.
- Bradley-Terry: TRL `RewardTrainer.compute_loss`
  (-logsigmoid(r_c - r_r - margin).mean() + center_rewards_coefficient * mean((r_c + r_r)^2))
  and InstructGPT's K-way ranking loss.
- CPO (golden_cpo): TRL `CPOTrainer.cpo_loss` at f2cd577 (trl/experimental/cpo), with AlphaPO's
  r = (1 - p^-alpha) / alpha; its cpo_alpha NLL term is nll()'s and not repeated here.
- SimPO / ORPO / NLL: the formulas documented in prefloss's loss headers, which follow TRL's CPOTrainer (simpo) and
  ORPOTrainer (odds_ratio_loss) with per-sequence average log-probs.
- PPO: verl `core_algos.compute_policy_loss` (log-ratio clamp +-20, asymmetric clip, dual clip
  clip_ratio_c), `agg_loss` (token-mean, seq-mean-token-sum, seq-mean-token-mean,
  seq-mean-token-sum-norm), `kl_penalty` (k1 / k2 / k3 = low_var_kl with its clamps), the actor's
  `pg_loss + kl_coef * agg_loss(kl)`, and `compute_value_loss` with `clip_by_value`.
  Two departures follow prefloss's documented definitions (ppo_clip.hpp), not verl: seq-mean-token-sum-norm divides by batch * C
  (Dr.GRPO; verl omits the batch), and an empty row contributes 0 to seq-mean-token-mean
  (verl: 0/0). Dual clip is applied only where the case says so.
- CISPO / SAPO / GPG (golden_policy_losses): verl `compute_policy_loss_cispo`, `_sapo`, `_gpg` at
  1dda039 (log-ratio clamp +-20, CISPO's clipped ratio detached, SAPO's `gate_function`) with
  `agg_loss` (SAPO's verl cases also with token-mean, which verl itself overrides), and TRL
  `GRPOTrainer._compute_loss` at f2cd577 for loss_type cispo (`clamp(coef_1, max=epsilon_high)
  .detach()`, divided by num_items_in_batch) and sapo (no clamp, per-sequence token means).
- Token log-probs: TRL `selective_log_softmax` (log_softmax + gather) on logits / temperature
  (verl's actor divides by it), verl `entropy_from_logits` with a -inf logit's term taken as 0,
  and autograd of sum(g_lp logp + g_h entropy) for d / d logits. 16-bit logits (logprobs_lowp):
  the float32 logits rounded by torch to bfloat16 / float16, the reference in float64 from the
  rounded values.
- Losses from logits: DPO (dpo_logits) is TRL's sigmoid dpo_loss of masked sums of the token
  log-probs above, per side, with the reference sequence log-probs as constants; PPO
  (ppo_logits) is verl's dp_actor: compute_policy_loss_vanilla + agg_loss of the token log-probs
  (+ kl_coef * agg_loss(k1)) - entropy_coef * agg_loss(entropy_from_logits), one aggregation
  mode for all terms. Autograd gives d loss / d logits, and d loss / d token log-probs as well.
- GAE / whitening / GRPO advantages: verl `compute_gae_advantage_return` (its mask-skipping
  recursion, no whitening), `verl_F.masked_whiten` (unbiased variance, eps 1e-8) and
  `compute_grpo_outcome_advantage` (unbiased std, eps 1e-6, a group of one: mean 0, std 1).
- Advantages and rewards (golden_advantages): verl core_algos.py at 1dda039b9
  (`compute_rloo_outcome_advantage`, `compute_opo_outcome_advantage`,
  `compute_reinforce_plus_plus[_baseline]_outcome_advantage` with `masked_whiten`,
  `compute_remax_outcome_advantage`, `AdaptiveKLController.update`), TRL GRPOTrainer
  `_generate_and_score_completions` at f2cd57710 (scale_rewards group / batch / none,
  multi_objective_aggregation, `nanstd`, std + 1e-4, nan_to_num), Llama 2 Sec. 3.2.2 (safety-gated
  reward, whiten(logit) with the unbiased variance prefloss documents), torch.argmax per group
  for best-of-n, and OpenRLHF at 3c3be623 (`compute_reward`'s clamp, `LogExpLoss` with its
  unused margin and `PairWiseLoss`; their float32 loss recorded to show the overflow).
- Rollout IS corrections (golden_rollout_correction): verl rollout_corr_helper.py at 1dda039,
  TRL's vllm_importance_sampling_mode at f2cd577, and OpenRLHF `PolicyLoss.forward`'s
  enable_vllm_is_correction block (tis, icepop, seq-mask-tis) with `aggregate_loss` at 3c3be623
  (its per-row 1e-8 left out, as prefloss documents), through to the loss and its gradient.

Masked-out tokens hold NaN or -inf (padding). Like prefloss, the torch code SELECTS valid tokens
first (torch.where(mask, x, 0)) instead of multiplying by the mask, so the padding never reaches
a value and its gradient is exactly 0.

Inputs come from Python's `random` with fixed seeds (independent of the torch version) and are
rounded to float32, so the float and double runs of prefloss see exactly the same numbers.
Outputs are written with repr() (round-trip exact float64).

Format (tests/data/golden_<family>.txt), one record a line:
    case <name>                      starts a case
    s <label> <word>                 a string (variant, aggregation, ...)
    t <label> <rank> <dims...> <values...>   a tensor in row-major order; rank 0 is a scalar
    end                              ends a case
Lines starting with '#' are comments.

Run: /usr/bin/python3 tests/golden/make_golden.py   (from the repository root; torch >= 1.13)
"""

import math
import os
import random
import struct
import sys

import torch

torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
NAN = float("nan")
NEG_INF = float("-inf")
B, T = 4, 7


def f32(x):
    """Round a Python float to the nearest float32 value (kept as a float64)."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Writer:
    def __init__(self, family, doc):
        self.path = os.path.join(OUT, "golden_%s.txt" % family)
        self.lines = ["# prefloss golden data: %s" % doc,
                      "# generated by tests/golden/make_golden.py with torch %s (float64 autograd); do not edit" %
                      torch.__version__]

    def case(self, name):
        self.lines.append("case " + name)

    def s(self, label, word):
        self.lines.append("s %s %s" % (label, word))

    def t(self, label, x):
        if isinstance(x, (int, float)):
            x = torch.tensor(float(x))
        x = x.detach().to(torch.float64)
        dims = list(x.shape)
        vals = [fmt(v) for v in x.reshape(-1).tolist()]
        self.lines.append(" ".join(["t", label, str(len(dims))] + [str(d) for d in dims] + vals))

    def end(self):
        self.lines.append("end")

    def write(self):
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        print("wrote", os.path.relpath(self.path), "(%d cases)" % sum(l.startswith("case ") for l in self.lines))


def fmt(v):
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


# ---- deterministic inputs --------------------------------------------------------------------

def masks(rng, b, t, empty_row=None, holes=True):
    """Random completion masks: row lengths 1..t, an optional empty row, optional interior holes."""
    m = []
    for i in range(b):
        n = 0 if i == empty_row else rng.randint(max(1, t // 2), t)
        row = [1 if j < n else 0 for j in range(t)]
        if holes and n >= 4 and rng.random() < 0.5:
            row[rng.randint(1, n - 2)] = 0
        m.append(row)
    return torch.tensor(m, dtype=torch.bool)


def tokens(rng, mask, lo=-3.0, hi=-0.01):
    """float32-exact values in [lo, hi] at valid tokens; NaN / -inf padding elsewhere."""
    b, t = mask.shape
    x = [[f32(rng.uniform(lo, hi)) if mask[i, j] else (NAN if (i + j) % 2 else NEG_INF) for j in range(t)]
         for i in range(b)]
    return torch.tensor(x)


def gauss(rng, mask, mu=0.0, sd=1.0, base=None, pad=True):
    b, t = mask.shape
    out = []
    for i in range(b):
        row = []
        for j in range(t):
            if mask[i, j] or not pad:
                v = (base[i, j].item() if base is not None else 0.0) + rng.gauss(mu, sd)
                row.append(f32(v))
            else:
                row.append(NAN if (i + j) % 2 else NEG_INF)
        out.append(row)
    return torch.tensor(out)


def vec(rng, n, lo, hi):
    return torch.tensor([f32(rng.uniform(lo, hi)) for _ in range(n)])


def sel(x, m):
    """Selection, not multiplication: padding never reaches a value or a gradient."""
    return torch.where(m, x, torch.zeros_like(x))


def masked_sum(x, m):
    return sel(x, m).sum(-1)


def masked_mean(x, m):
    n = m.sum(-1).to(x.dtype)
    return torch.where(n > 0, masked_sum(x, m) / n.clamp(min=1), torch.zeros_like(n))


def leaf(x):
    return x.clone().requires_grad_(True)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# ---- TRL dpo_loss (trl/trainer/dpo_trainer.py) -----------------------------------------------

def trl_dpo_loss(pc, pr, rc, rr, beta, ls, loss_type, reference_free):
    F = torch.nn.functional
    pi_logratios = pc - pr
    ref_logratios = torch.zeros_like(pi_logratios) if reference_free else rc - rr
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    ref_c = torch.zeros_like(pc) if reference_free else rc
    ref_r = torch.zeros_like(pr) if reference_free else rr
    chosen_rewards = beta * (pc - ref_c).detach()
    rejected_rewards = beta * (pr - ref_r).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_inputs(seed):
    rng = random.Random(seed)
    mc = masks(rng, B, T, empty_row=None)
    mr = masks(rng, B, T, empty_row=2)
    xc = tokens(rng, mc)
    xr = tokens(rng, mr)
    # Reference sequence values near the policy's, so beta * D is O(1).
    return rng, mc, mr, xc, xr


def gen_dpo():
    w = Writer("dpo", "TRL dpo_loss (sigmoid/robust/hinge, label smoothing, reference_free), masked_sum inputs")
    cases = [("sigmoid", 0.1, 0.0, False), ("sigmoid_beta0.5", 0.5, 0.0, False), ("sigmoid_cdpo", 0.1, 0.1, False),
             ("robust", 0.5, 0.2, False), ("hinge", 0.1, 0.0, False), ("hinge_beta0.3", 0.3, 0.0, False),
             ("sigmoid_reference_free", 0.1, 0.0, True)]
    for k, (name, beta, ls, rf) in enumerate(cases):
        rng, mc, mr, xc, xr = pair_inputs(100 + k)
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_sum(lc, mc), masked_sum(lr, mr)
        rc = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pr.tolist()])
        variant = name.split("_")[0]
        losses, cr, rj = trl_dpo_loss(pc, pr, rc, rr, beta, ls, variant, rf)
        loss = losses.mean()
        w.case(name)
        w.s("variant", variant)
        w.t("beta", beta)
        w.t("label_smoothing", ls)
        w.t("reference_free", 1 if rf else 0)
        w.t("logp_c", xc)
        w.t("mask_c", mc.double())
        w.t("logp_r", xr)
        w.t("mask_r", mr.double())
        w.t("ref_c", rc)
        w.t("ref_r", rr)
        w.t("loss", loss)
        w.t("losses", losses)
        w.t("grad_c", grad_of(loss, lc))
        w.t("grad_r", grad_of(loss, lr))
        w.t("reward_chosen", cr.mean())
        w.t("reward_rejected", rj.mean())
        w.t("reward_margin", (cr - rj).mean())
        w.t("reward_accuracy", (cr > rj).double().mean())
        w.end()
    w.write()


# ---- TRL DPOTrainer._compute_loss: every loss_type and f_divergence_type ----------------------

def trl_scores(logratios, f_div, alpha, clamp_max):
    """TRL's f-divergence scores; the alpha clamp is TRL's with its max as a parameter (TRL: 80
    for float32 / bfloat16, and no entry for float64, which these goldens use)."""
    F = torch.nn.functional
    if f_div == "reverse_kl":
        return logratios
    if f_div == "forward_kl":
        return -torch.exp(-logratios)
    if f_div == "js_divergence":
        return F.logsigmoid(logratios)
    if f_div == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        return torch.exp(torch.clamp((alpha - 1.0) * logratios, max=clamp_max)) * (1.0 / (alpha - 1.0))
    raise ValueError(f_div)


def trl_compute_loss(pc, pr, rc, rr, beta, ls, loss_type, f_div="reverse_kl", alpha=0.5, clamp_max=80.0, tau=0.05,
                     delta=0.0):
    """Per-sequence losses of TRL's _compute_loss for one loss_type, in TRL's order (the sorted
    order for aot / aot_unpaired). sigmoid keeps cDPO's label smoothing (TRL drops it; prefloss
    keeps OpenRLHF's), and bco_pair subtracts delta from both rewards (TRL's is delta = 0)."""
    F = torch.nn.functional
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    cs = trl_scores(chosen_logratios, f_div, alpha, clamp_max)
    rs = trl_scores(rejected_logratios, f_div, alpha, clamp_max)
    d = cs - rs
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        eps = torch.tensor(ls)
        return (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - torch.log1p(-eps)) +
                torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - torch.log(eps)))
    if loss_type == "nca_pair":
        c, r = beta * cs, beta * rs
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "bco_pair":
        c, r = beta * cs, beta * rs
        return -F.logsigmoid(c - delta) - F.logsigmoid(-(r - delta))
    if loss_type == "sppo_hard":
        return (cs - 0.5 / beta) ** 2 + (rs + 0.5 / beta) ** 2
    if loss_type == "aot":
        lr, _ = torch.sort(pc - pr, dim=0)
        ref, _ = torch.sort(rc - rr, dim=0)
        z = beta * (lr - ref)
        return -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls
    if loss_type == "aot_unpaired":
        c, _ = torch.sort(chosen_logratios, dim=0)
        r, _ = torch.sort(rejected_logratios, dim=0)
        z = beta * (c - r)
        return -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * d))
    if loss_type == "discopop":
        z = d * beta
        m = torch.sigmoid(z / tau)
        return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    raise ValueError(loss_type)


def gen_dpo_variants():
    w = Writer("dpo_variants", "TRL DPOTrainer._compute_loss: every loss_type x f_divergence_type, masked_sum inputs; "
               "losses of aot / aot_unpaired by example (the term at the rank of the example's sorted value)")
    # name, loss_type, beta, label_smoothing, f_divergence, alpha, clamp_max, tau, delta, reference_free
    cases = [
        ("exo_pair", "exo_pair", 0.1, 1e-3, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("exo_pair_e0.2", "exo_pair", 0.5, 0.2, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("nca_pair", "nca_pair", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("nca_pair_js", "nca_pair", 0.5, 0.0, "js_divergence", 0.5, 80.0, 0.05, 0.0, False),
        ("bco_pair", "bco_pair", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("bco_pair_delta", "bco_pair", 0.3, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.25, False),
        ("sppo_hard", "sppo_hard", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("sppo_hard_forward_kl", "sppo_hard", 1.0, 0.0, "forward_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("apo_zero", "apo_zero", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("apo_zero_reference_free", "apo_zero", 0.5, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, True),
        ("apo_down", "apo_down", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("apo_down_alpha", "apo_down", 0.5, 0.0, "alpha_divergence", 0.5, 80.0, 0.05, 0.0, False),
        ("discopop", "discopop", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("discopop_tau0.5", "discopop", 0.5, 0.0, "reverse_kl", 0.5, 80.0, 0.5, 0.0, False),
        ("aot", "aot", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("aot_smoothed", "aot", 0.5, 0.1, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("aot_reference_free", "aot", 0.5, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, True),
        ("aot_unpaired", "aot_unpaired", 0.1, 0.0, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("aot_unpaired_smoothed", "aot_unpaired", 0.5, 0.2, "reverse_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("sigmoid_forward_kl", "sigmoid", 0.1, 0.0, "forward_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("sigmoid_js", "sigmoid", 0.5, 0.0, "js_divergence", 0.5, 80.0, 0.05, 0.0, False),
        ("sigmoid_alpha0.5", "sigmoid", 0.1, 0.0, "alpha_divergence", 0.5, 80.0, 0.05, 0.0, False),
        ("sigmoid_alpha1", "sigmoid", 0.1, 0.0, "alpha_divergence", 1.0, 80.0, 0.05, 0.0, False),
        ("sigmoid_alpha3_clamped", "sigmoid", 0.1, 0.0, "alpha_divergence", 3.0, 2.0, 0.05, 0.0, False),
        ("hinge_forward_kl", "hinge", 0.1, 0.0, "forward_kl", 0.5, 80.0, 0.05, 0.0, False),
        ("robust_js", "robust", 0.5, 0.2, "js_divergence", 0.5, 80.0, 0.05, 0.0, False),
        ("exo_pair_alpha1.5", "exo_pair", 0.5, 0.1, "alpha_divergence", 1.5, 80.0, 0.05, 0.0, False),
    ]
    for k, (name, lt, beta, ls, fdiv, alpha, clamp_max, tau, delta, rf) in enumerate(cases):
        rng, mc, mr, xc, xr = pair_inputs(1100 + k)
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_sum(lc, mc), masked_sum(lr, mr)
        rc = torch.tensor([f32(v + rng.uniform(-3, 3)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-3, 3)) for v in pr.tolist()])
        rc_, rr_ = (torch.zeros_like(rc), torch.zeros_like(rr)) if rf else (rc, rr)
        per_seq = trl_compute_loss(pc, pr, rc_, rr_, beta, ls, lt, fdiv, alpha, clamp_max, tau, delta)
        loss = per_seq.mean()
        if lt in ("aot", "aot_unpaired"):
            key = (pc - pr) if lt == "aot" else (pc - rc_)
            rank = torch.argsort(torch.argsort(key.detach(), stable=True), stable=True)
            losses = per_seq[rank]
        else:
            losses = per_seq
        cr, rj = beta * (pc - rc_).detach(), beta * (pr - rr_).detach()
        w.case(name)
        w.s("variant", lt)
        w.s("divergence", fdiv)
        for lab, v in [("beta", beta), ("label_smoothing", ls), ("alpha", alpha), ("alpha_clamp", clamp_max),
                       ("discopop_tau", tau), ("bco_delta", delta), ("reference_free", 1 if rf else 0)]:
            w.t(lab, v)
        for lab, t_ in [("logp_c", xc), ("mask_c", mc.double()), ("logp_r", xr), ("mask_r", mr.double()),
                        ("ref_c", rc), ("ref_r", rr), ("loss", loss), ("losses", losses),
                        ("grad_c", grad_of(loss, lc)), ("grad_r", grad_of(loss, lr)),
                        ("reward_chosen", cr.mean()), ("reward_rejected", rj.mean()),
                        ("reward_margin", (cr - rj).mean()), ("reward_accuracy", (cr > rj).double().mean())]:
            w.t(lab, t_)
        w.end()
    w.write()


def trl_ld_logps(x, m, shared_lens, ld_alpha):
    """TRL _compute_loss with ld_alpha: completion positions by cumsum of the mask, shared up to
    the pair's shorter length, the tail weighted by ld_alpha (padding selected out first)."""
    per_token = sel(x, m)
    comp_pos = m.long().cumsum(dim=1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    return (per_token * shared_mask).sum(dim=1) + ld_alpha * (per_token * tail_mask).sum(dim=1)


def gen_ld_dpo():
    w = Writer("ld_dpo", "TRL DPOTrainer._compute_loss with ld_alpha (policy and reference), loss_type sigmoid")
    for k, (name, beta, ld_alpha) in enumerate([("alpha0.5", 0.1, 0.5), ("alpha0", 0.5, 0.0), ("alpha1", 0.1, 1.0),
                                                ("alpha0.2", 0.3, 0.2)]):
        rng = random.Random(1300 + k)
        mc, mr = masks(rng, B, T, empty_row=None), masks(rng, B, T + 2, empty_row=3)
        xc, xr = tokens(rng, mc), tokens(rng, mr)
        yc, yr = tokens(rng, mc), tokens(rng, mr)  # reference token log-probs
        shared = torch.minimum(mc.sum(1), mr.sum(1))
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = trl_ld_logps(lc, mc, shared, ld_alpha), trl_ld_logps(lr, mr, shared, ld_alpha)
        rc, rr = trl_ld_logps(yc, mc, shared, ld_alpha), trl_ld_logps(yr, mr, shared, ld_alpha)
        losses = trl_compute_loss(pc, pr, rc, rr, beta, 0.0, "sigmoid")
        loss = losses.mean()
        w.case(name)
        for lab, t_ in [("beta", beta), ("ld_alpha", ld_alpha), ("logp_c", xc), ("mask_c", mc.double()),
                        ("logp_r", xr), ("mask_r", mr.double()), ("ref_logp_c", yc), ("ref_logp_r", yr),
                        ("loss", loss), ("losses", losses), ("grad_c", grad_of(loss, lc)),
                        ("grad_r", grad_of(loss, lr))]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_ipo():
    w = Writer("ipo", "TRL dpo_loss loss_type=ipo (masked_mean inputs) and OpenRLHF's IPO (masked_sum inputs)")
    for k, (name, beta, reduce) in enumerate([("trl_mean", 0.1, "mean"), ("trl_mean_beta1", 1.0, "mean"),
                                              ("openrlhf_sum", 0.1, "sum")]):
        rng, mc, mr, xc, xr = pair_inputs(200 + k)
        red = masked_mean if reduce == "mean" else masked_sum
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = red(lc, mc), red(lr, mr)
        rc = torch.tensor([f32(v + rng.uniform(-1, 1)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-1, 1)) for v in pr.tolist()])
        losses, cr, rj = trl_dpo_loss(pc, pr, rc, rr, beta, 0.0, "ipo", False)
        loss = losses.mean()
        w.case(name)
        w.s("reduction", reduce)
        w.t("beta", beta)
        for lab, v in [("logp_c", xc), ("mask_c", mc.double()), ("logp_r", xr), ("mask_r", mr.double()),
                       ("ref_c", rc), ("ref_r", rr), ("loss", loss), ("losses", losses),
                       ("grad_c", grad_of(loss, lc)), ("grad_r", grad_of(loss, lr)),
                       ("reward_chosen", cr.mean()), ("reward_rejected", rj.mean())]:
            w.t(lab, v)
        w.end()
    w.write()


# ---- TRL kto_loss (trl/trainer/kto_trainer.py) -----------------------------------------------

def trl_kto_loss(policy_chosen, policy_rejected, policy_KL, reference_chosen, reference_rejected, reference_KL,
                 beta, wd, wu, kl_override=None, loss_type="kto"):
    if loss_type == "apo_zero_unpaired":  # TRL: calculate_KL is off, kl = 0; APO-zero's unpaired Eq. 7
        u_c, u_r = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        losses = torch.cat((wd * (1 - torch.sigmoid(beta * u_c)), wu * torch.sigmoid(beta * u_r)), 0)
        return losses, beta * u_c.detach(), beta * u_r.detach(), torch.tensor(0.0)
    if kl_override is None:
        kl = (policy_KL - reference_KL).mean().detach()
        kl = kl.clamp(min=0)  # accelerator.gather(kl).mean() on one process is kl itself
    else:
        kl = torch.tensor(kl_override)
    if policy_chosen.shape[0] != 0:
        chosen_logratios = policy_chosen - reference_chosen
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        chosen_rewards = beta * chosen_logratios.detach()
    else:
        chosen_losses = torch.tensor([])
        chosen_rewards = torch.tensor([])
    if policy_rejected.shape[0] != 0:
        rejected_logratios = policy_rejected - reference_rejected
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
        rejected_rewards = beta * rejected_logratios.detach()
    else:
        rejected_losses = torch.tensor([])
        rejected_rewards = torch.tensor([])
    losses = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)
    return losses, chosen_rewards, rejected_rewards, kl


def gen_kto():
    w = Writer("kto", "TRL kto_loss; policy masked_sum tokens, KL completions a batch of their own size")
    cases = [  # name, desirable labels, beta, wd, wu, KL batch, KL shift (mean of kl_policy - kl_ref), given z0
        ("mixed", [1, 0, 1, 0], 0.1, 1.0, 1.0, 3, 0.8, None),
        ("mixed_beta0.5_weights", [0, 1, 1, 0], 0.5, 1.33, 0.75, 5, 1.5, None),
        ("all_desirable", [1, 1, 1, 1], 0.3, 1.0, 1.0, 2, 0.6, None),
        ("all_undesirable", [0, 0, 0, 0], 0.3, 1.0, 1.0, 6, 0.6, None),
        ("z0_clamped", [1, 0, 0, 1], 0.5, 1.0, 1.0, 3, -2.0, None),
        ("reference_point_given", [1, 0, 1, 1], 0.5, 1.0, 2.0, 0, 0.0, 0.7),
        # TRL loss_type="apo_zero_unpaired": kto with z0 = 0 (prefloss: reference_point = 0).
        ("apo_zero_unpaired", [1, 0, 0, 1], 0.3, 1.0, 1.5, 0, 0.0, 0.0),
    ]
    for k, (name, lab, beta, wd, wu, nk, shift, rp) in enumerate(cases):
        rng = random.Random(300 + k)
        m = masks(rng, B, T, empty_row=1)
        x = tokens(rng, m)
        lx = leaf(x)
        s = masked_sum(lx, m)
        ref = torch.tensor([f32(v + rng.uniform(-3, 3)) for v in s.tolist()])
        mk = masks(rng, nk, 5, empty_row=None) if nk else torch.zeros(0, 5, dtype=torch.bool)
        kx = tokens(rng, mk) if nk else torch.zeros(0, 5)
        kp = masked_sum(kx, mk)
        kr = torch.tensor([f32(v - shift + rng.uniform(-0.5, 0.5)) for v in kp.tolist()])
        d = torch.tensor(lab, dtype=torch.bool)
        ci = [i for i in range(B) if lab[i]]
        ri = [i for i in range(B) if not lab[i]]
        lt = "apo_zero_unpaired" if name == "apo_zero_unpaired" else "kto"
        losses_cat, cr, rj, kl = trl_kto_loss(s[ci], s[ri], kp, ref[ci], ref[ri], kr, beta, wd, wu, rp, lt)
        loss = losses_cat.mean()
        # Back to batch order for the per-example losses.
        losses = torch.empty(B)
        for pos, i in enumerate(ci + ri):
            losses[i] = losses_cat[pos]
        w.case(name)
        w.t("beta", beta)
        w.t("desirable_weight", wd)
        w.t("undesirable_weight", wu)
        if rp is not None:
            w.t("reference_point", rp)
        w.t("logp", x)
        w.t("mask", m.double())
        w.t("ref", ref)
        w.t("desirable", d.double())
        w.t("kl_logp", kx)
        w.t("kl_mask", mk.double())
        w.t("kl_ref", kr)
        w.t("loss", loss)
        w.t("losses", losses)
        w.t("grad", grad_of(loss, lx))
        w.t("z0", kl)
        w.t("count_desirable", len(ci))
        w.t("count_undesirable", len(ri))
        w.t("reward_desirable_sum", cr.sum() if len(ci) else 0.0)
        w.t("reward_undesirable_sum", rj.sum() if len(ri) else 0.0)
        w.end()
    w.write()


# ---- TRL BCOTrainer ---------------------------------------------------------------------------

class TrlRunningMoments:
    """TRL RunningMoments.update (trl/experimental/bco/bco_trainer.py, f2cd577), one process, in
    float64: TRL's .float() casts of the batch mean and variance are left out (prefloss documents
    double arithmetic)."""

    def __init__(self, mean=0.0, std=1.0, var=1.0, count=1e-24):
        self.mean, self.std, self.var, self.count = mean, std, var, count

    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).sqrt().item()
        self.var = new_var.item()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).sqrt().item()


def trl_bco_loss(pc, pr, rc, rr, beta, running, rejected_weight=None):
    """TRL BCOTrainer.bco_loss (do_train=True): rewards, running.update, delta = running.mean."""
    F = torch.nn.functional
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
    delta = torch.as_tensor(running.mean)
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    if rejected_weight is not None:  # match_underlying_distribution: chosen weight 1
        losses = torch.cat((torch.ones_like(chosen_losses) * chosen_losses, rejected_weight * rejected_losses), 0)
    else:
        losses = torch.cat((chosen_losses, rejected_losses), 0)
    return losses, chosen_rewards, rejected_rewards, delta


def gen_bco():
    w = Writer("bco", "TRL bco_loss with RunningMoments.update (float64); policy masked_sum tokens")
    # name, desirable labels, beta, prior running state (mean, var, count) or None, ref spread, UDM weights
    cases = [
        ("first_batch_mixed", [1, 0, 1, 0], 0.1, None, 3.0, False),
        ("running_beta0.5", [0, 1, 1, 0], 0.5, (0.3, 0.8, 40.0), 3.0, False),
        ("all_desirable", [1, 1, 1, 1], 0.3, (-0.2, 0.5, 12.0), 3.0, False),
        ("all_undesirable", [0, 0, 0, 0], 0.3, (0.1, 1.5, 7.0), 3.0, False),
        ("udm_weights", [1, 0, 0, 1], 0.2, (0.05, 0.4, 100.0), 3.0, True),
        # |r - delta| in the hundreds: -logsigmoid stays finite, gradients +-beta / B.
        ("large_margin", [1, 0, 1, 0], 8.0, (0.0, 1.0, 1e-24), 40.0, False),
    ]
    for k, (name, lab, beta, prior, spread, udm) in enumerate(cases):
        rng = random.Random(2300 + k)
        m = masks(rng, B, T, empty_row=2)
        x = tokens(rng, m)
        lx = leaf(x)
        s = masked_sum(lx, m)
        if name == "large_margin":  # desirable far below the mean reward, undesirable far above
            ref = torch.tensor([f32(v + (spread if lab[i] else -spread) + rng.uniform(-1, 1))
                                for i, v in enumerate(s.tolist())])
        else:
            ref = torch.tensor([f32(v + rng.uniform(-spread, spread)) for v in s.tolist()])
        if prior is None:
            running = TrlRunningMoments()
        else:
            pm, pv, pc = prior
            running = TrlRunningMoments(mean=pm, var=pv, std=math.sqrt(pv * pc / (pc - 1)) if pc > 1 else 1.0,
                                        count=pc)
        prior_state = (running.mean, running.var, running.std, running.count)
        ci = [i for i in range(B) if lab[i]]
        ri = [i for i in range(B) if not lab[i]]
        weights = torch.ones(B)
        rw = None
        if udm:
            # TRL _get_udm_weight: (p / (1 - p + 1e-8)).clamp(min_density_ratio, max_density_ratio),
            # p = the prompt classifier's P(desirable); defaults 0.5 and 10.0.
            p = torch.tensor([f32(rng.uniform(0.05, 0.98)) for _ in ri])
            rw = (p / (1 - p + 1e-8)).clamp(min=0.5, max=10.0)
            for pos, i in enumerate(ri):
                weights[i] = rw[pos]
        rewards_in_order = (beta * (s - ref)).detach()
        losses_cat, cr, rj, delta = trl_bco_loss(s[ci], s[ri], ref[ci], ref[ri], beta, running, rw)
        batch_mean, batch_std = TrlRunningMoments().update(rewards_in_order)  # update's return values
        loss = losses_cat.nanmean()
        losses = torch.empty(B)
        for pos, i in enumerate(ci + ri):
            losses[i] = losses_cat[pos]
        w.case(name)
        w.t("beta", beta)
        w.t("prior_mean", prior_state[0])
        w.t("prior_var", prior_state[1])
        w.t("prior_std", prior_state[2])
        w.t("prior_count", prior_state[3])
        w.t("logp", x)
        w.t("mask", m.double())
        w.t("ref", ref)
        w.t("desirable", torch.tensor(lab, dtype=torch.float64))
        if udm:
            w.t("weights", weights)
        w.t("rewards", rewards_in_order)
        w.t("batch_mean", batch_mean)
        w.t("batch_std", batch_std)
        w.t("delta", delta.item())
        w.t("running_var", running.var)
        w.t("running_std", running.std)
        w.t("running_count", running.count)
        w.t("loss", loss)
        w.t("losses", losses)
        w.t("grad", grad_of(loss, lx))
        w.t("count_desirable", len(ci))
        w.t("count_undesirable", len(ri))
        w.t("reward_desirable_sum", cr.sum() if len(ci) else 0.0)
        w.t("reward_undesirable_sum", rj.sum() if len(ri) else 0.0)
        w.t("logps_desirable_sum", s[ci].sum() if len(ci) else 0.0)
        w.t("logps_undesirable_sum", s[ri].sum() if len(ri) else 0.0)
        w.end()
    w.write()


# ---- TRL RewardTrainer / InstructGPT ----------------------------------------------------------

def gen_bradley_terry():
    F = torch.nn.functional
    w = Writer("bradley_terry", "TRL RewardTrainer.compute_loss (margin, center_rewards_coefficient); "
                                "InstructGPT K-way ranking loss")
    n = 6
    for k, (name, use_margin, center) in enumerate([("plain", False, 0.0), ("margin", True, 0.0),
                                                    ("center", False, 0.01), ("margin_center", True, 0.05)]):
        rng = random.Random(400 + k)
        rc, rr = leaf(vec(rng, n, -3, 3)), leaf(vec(rng, n, -3, 3))
        margin = vec(rng, n, 0, 2) if use_margin else torch.zeros(n)
        # TRL: loss = -logsigmoid(r_c - r_r - margin).mean(); + coef * mean((r_c + r_r)^2).
        loss = -F.logsigmoid(rc - rr - margin).mean()
        if center:
            loss = loss + center * torch.mean((rc + rr) ** 2)
        losses = -F.logsigmoid(rc - rr - margin) + center * (rc + rr) ** 2  # per pair; mean = TRL's loss
        w.case(name)
        w.t("center_coef", center)
        w.t("use_margin", 1 if use_margin else 0)
        w.t("r_c", rc)
        w.t("r_r", rr)
        w.t("margin", margin)
        w.t("loss", loss)
        w.t("losses", losses)
        w.t("grad_c", grad_of(loss, rc))
        w.t("grad_r", grad_of(loss, rr))
        w.t("reward_accuracy", (rc > rr).double().mean())
        w.end()
    for k, (name, K, center) in enumerate([("ranking_k4", 4, 0.0), ("ranking_k3_center", 3, 0.02)]):
        rng = random.Random(450 + k)
        r = leaf(torch.tensor([[f32(rng.uniform(-2, 2)) for _ in range(K)] for _ in range(5)]))
        pairs = [(a, c) for a in range(K) for c in range(a + 1, K)]
        per_row = torch.stack([-F.logsigmoid(r[:, a] - r[:, c]) + center * (r[:, a] + r[:, c]) ** 2
                               for a, c in pairs], 1).mean(1)
        loss = per_row.mean()
        w.case(name)
        w.t("center_coef", center)
        w.t("rewards", r)
        w.t("loss", loss)
        w.t("losses", per_row)
        w.t("grad", grad_of(loss, r))
        w.end()
    w.write()


# ---- SimPO, ORPO, NLL (loss/simpo.hpp, loss/orpo.hpp; TRL CPOTrainer simpo, ORPOTrainer) ---------------------------

def gen_simpo():
    F = torch.nn.functional
    w = Writer("simpo", "SimPO -logsig(b (s_c - s_r) - gamma) with masked_mean inputs (TRL CPOTrainer loss_type=simpo)")
    for k, (name, beta, gamma, ls) in enumerate([("default", 2.0, 0.5, 0.0), ("beta2.5_gamma1.4", 2.5, 1.4, 0.0),
                                                 ("label_smoothing", 2.0, 0.5, 0.1)]):
        rng, mc, mr, xc, xr = pair_inputs(500 + k)
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_mean(lc, mc), masked_mean(lr, mr)
        # TRL CPO: logits = pi_logratios - simpo_gamma / beta; losses = -logsig(beta * logits) (1 - ls) - ...
        logits = (pc - pr) - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        loss = losses.mean()
        w.case(name)
        for lab, v in [("beta", beta), ("gamma", gamma), ("label_smoothing", ls), ("logp_c", xc),
                       ("mask_c", mc.double()), ("logp_r", xr), ("mask_r", mr.double()), ("loss", loss),
                       ("losses", losses), ("grad_c", grad_of(loss, lc)), ("grad_r", grad_of(loss, lr))]:
            w.t(lab, v)
        w.end()
    w.write()


def trl_cpo_loss(pc, pr, beta, ls, loss_type, gamma, alpha):
    """TRL CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py): AlphaPO rewards when alpha != 0."""
    F = torch.nn.functional
    if alpha != 0.0:
        rc, rj = (1 - torch.exp(pc).pow(-alpha)) / alpha, (1 - torch.exp(pr).pow(-alpha)) / alpha
    else:
        rc, rj = pc, pr
    logits = rc - rj
    if loss_type == "simpo":
        logits = logits - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    return losses, beta * rc.detach(), beta * rj.detach()


def gen_cpo():
    w = Writer("cpo", "TRL CPOTrainer.cpo_loss (sigmoid/hinge on sums, ipo/simpo on means, AlphaPO alpha)")
    cases = [("sigmoid", "sigmoid", "sum", 0.1, 0.0, 0.5, 0.0),
             ("sigmoid_smoothed", "sigmoid", "sum", 0.1, 0.1, 0.5, 0.0),
             ("sigmoid_alphapo", "sigmoid", "sum", 0.1, 0.0, 0.5, 0.25),
             ("hinge_alphapo_negative", "hinge", "sum", 0.2, 0.0, 0.5, -0.3),
             ("ipo_mean", "ipo", "mean", 0.5, 0.0, 0.5, 0.0),
             ("simpo_mean_alphapo", "simpo", "mean", 2.0, 0.0, 1.0, 1.5)]
    for k, (name, lt, red, beta, ls, gamma, alpha) in enumerate(cases):
        rng, mc, mr, xc, xr = pair_inputs(1500 + k)
        f = masked_mean if red == "mean" else masked_sum
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = f(lc, mc), f(lr, mr)
        losses, cr, rj = trl_cpo_loss(pc, pr, beta, ls, lt, gamma, alpha)
        loss = losses.mean()
        w.case(name)
        w.s("variant", lt)
        w.s("reduce", red)
        for lab, t_ in [("beta", beta), ("label_smoothing", ls), ("simpo_gamma", gamma), ("alpha", alpha),
                        ("logp_c", xc), ("mask_c", mc.double()), ("logp_r", xr), ("mask_r", mr.double()),
                        ("loss", loss), ("losses", losses), ("grad_c", grad_of(loss, lc)),
                        ("grad_r", grad_of(loss, lr)), ("reward_chosen", cr.mean()), ("reward_rejected", rj.mean()),
                        ("reward_margin", (cr - rj).mean()), ("reward_accuracy", (cr > rj).double().mean())]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_orpo():
    F = torch.nn.functional
    w = Writer("orpo", "ORPO -s_c - b logsig(log odds ratio) with masked_mean inputs (TRL odds_ratio_loss)")
    for k, (name, beta, nll_w) in enumerate([("default", 0.1, 1.0), ("beta0.5", 0.5, 1.0), ("odds_only", 0.25, 0.0)]):
        rng = random.Random(600 + k)
        mc = masks(rng, B, T)
        mr = masks(rng, B, T)  # no empty rejected row: s_r = 0 is ORPO's singularity
        xc = tokens(rng, mc, -2.0, -0.05)
        xr = tokens(rng, mr, -2.5, -0.05)
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_mean(lc, mc), masked_mean(lr, mr)
        # TRL: log_odds = (c - r) - (log1p(-exp(c)) - log1p(-exp(r))); ratio = logsigmoid(log_odds)
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        ratio = F.logsigmoid(log_odds)
        losses = -nll_w * pc - beta * ratio
        loss = losses.mean()
        w.case(name)
        for lab, v in [("beta", beta), ("nll_weight", nll_w), ("logp_c", xc), ("mask_c", mc.double()),
                       ("logp_r", xr), ("mask_r", mr.double()), ("loss", loss), ("losses", losses),
                       ("grad_c", grad_of(loss, lc)), ("grad_r", grad_of(loss, lr)),
                       ("log_odds_ratio", ratio.mean()), ("log_odds_chosen", log_odds.mean())]:
            w.t(lab, v)
        w.end()
    w.write()


def gen_nll():
    w = Writer("nll", "NLL -s: mean over sequences of masked_mean, and torch's token-mean cross-entropy "
                      "(masked_sum / token count, TRL SFT)")
    for k, name in enumerate(["sequence_mean", "token_mean"]):
        rng = random.Random(700 + k)
        m = masks(rng, B, T, empty_row=3)
        x = tokens(rng, m)
        lx = leaf(x)
        if name == "sequence_mean":
            losses = -masked_mean(lx, m)
            loss = losses.mean()
        else:
            losses = -masked_sum(lx, m)
            loss = losses.sum() / m.sum()
        w.case(name)
        w.t("logp", x)
        w.t("mask", m.double())
        w.t("token_count", m.sum().double())
        w.t("loss", loss)
        w.t("losses", losses)
        w.t("grad", grad_of(loss, lx))
        w.end()
    w.write()


# ---- verl: compute_policy_loss, agg_loss, kl_penalty, compute_value_loss ---------------------

def verl_agg_loss(loss_mat, mask, mode, C=None):
    """verl agg_loss with prefloss's two documented departures (see the module doc). Returns (loss, per-row
    contribution) with sum(per-row) == loss."""
    l = sel(loss_mat, mask)
    m = mask.to(loss_mat.dtype)
    b = loss_mat.shape[0]
    rows = l.sum(-1)
    if mode == "token_mean":
        n = m.sum()
        contrib = rows / n if n > 0 else rows * 0
    elif mode == "seq_mean_token_sum":
        contrib = rows / b
    elif mode == "seq_mean_token_mean":
        w = m.sum(-1)
        contrib = torch.where(w > 0, rows / w.clamp(min=1), torch.zeros_like(rows)) / b
    elif mode == "seq_mean_token_sum_norm":
        contrib = rows / (b * (C if C is not None else loss_mat.shape[-1]))
    elif mode == "token_sum":  # verl "token-sum" (dp_size 1)
        contrib = rows
    else:
        raise ValueError(mode)
    return contrib.sum(), contrib


def verl_kl_penalty(logprob, ref_logprob, kind):
    # verl kl_penalty: a name ending in "+" is straight-through, the base estimator's value with
    # k2's gradient (k2+ / mse+ is k2).
    base = kind[:-1] if kind.endswith("+") else kind
    forward_score = verl_kl_penalty_forward(logprob, ref_logprob, base)
    if not kind.endswith("+") or kind in ("mse", "k2"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


def verl_kl_penalty_forward(logprob, ref_logprob, kind):
    if kind in ("kl", "k1"):
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kind in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise ValueError(kind)


def verl_policy_loss(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, clip_ratio_c, dual):
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    if not dual:
        return clip_pg_losses1, negative_approx_kl, pg_losses1, pg_losses2
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses, negative_approx_kl, pg_losses1, pg_losses2


def ppo_inputs(seed):
    rng = random.Random(seed)
    m = masks(rng, B, T, empty_row=2)
    old = tokens(rng, m, -3.0, -0.05)
    lp = gauss(rng, m, 0.0, 0.25, base=torch.where(m, old, torch.zeros_like(old)))
    adv = gauss(rng, m, 0.0, 1.0)
    ref = gauss(rng, m, 0.0, 0.3, base=torch.where(m, old, torch.zeros_like(old)))
    return rng, m, lp, old, adv, ref


def masked_mean_all(x, m):
    n = m.sum()
    return sel(x, m).sum() / n if n > 0 else torch.tensor(0.0)


def gen_ppo():
    w = Writer("ppo_clip", "verl compute_policy_loss + agg_loss (+ kl_coef * agg_loss(kl_penalty)), dual clip")
    cases = [  # name, clip_low, clip_high, dual clip c (0 off), aggregation, kl estimator, kl_coef
        ("default_token_mean", 0.2, 0.2, 0.0, "token_mean", None, 0.0),
        ("clip_higher_dual3", 0.2, 0.28, 3.0, "token_mean", None, 0.0),
        ("seq_mean_token_sum", 0.2, 0.2, 0.0, "seq_mean_token_sum", None, 0.0),
        ("seq_mean_token_mean", 0.1, 0.3, 0.0, "seq_mean_token_mean", None, 0.0),
        ("seq_mean_token_sum_norm", 0.2, 0.2, 0.0, "seq_mean_token_sum_norm", None, 0.0),
        ("kl_k1", 0.2, 0.2, 0.0, "token_mean", "k1", 0.1),
        ("kl_k2", 0.2, 0.2, 3.0, "seq_mean_token_mean", "k2", 0.05),
        ("kl_k3", 0.2, 0.2, 0.0, "token_mean", "k3", 0.2),
    ]
    for k, (name, lo, hi, c, agg, est, kl_coef) in enumerate(cases):
        rng, m, lp, old, adv, ref = ppo_inputs(800 + k)
        if c > 1:
            # Make dual clip bite: A < 0 with r = e^1.5 > c, and r beyond the log-ratio clamp (e^22).
            for j, (dlog, a) in enumerate([(1.5, -0.8), (22.0, -0.3), (0.9, -1.1)]):
                m[0, j] = True
                old[0, j] = f32(-1.0 - 0.5 * j)
                lp[0, j] = f32(old[0, j].item() + dlog)
                adv[0, j] = f32(a)
                ref[0, j] = f32(old[0, j].item() + 0.1)
        x = leaf(lp)
        xs = sel(x, m)  # select first, so the NaN padding never reaches exp
        olds, advs, refs = sel(old, m), sel(adv, m), sel(ref, m)
        pg, nkl, l1, l2 = verl_policy_loss(xs, olds, advs, m, lo, hi, c, c > 1)
        loss, contrib = verl_agg_loss(pg, m, agg)
        if est is not None:
            kl_loss, kl_contrib = verl_agg_loss(verl_kl_penalty(xs, refs, est), m, agg)
            loss = loss + kl_coef * kl_loss
            contrib = contrib + kl_coef * kl_contrib
        w.case(name)
        w.t("clip_low", lo)
        w.t("clip_high", hi)
        w.t("dual_clip", c)
        w.s("aggregation", agg)
        w.s("kl_estimator", est or "none")
        w.t("kl_coef", kl_coef)
        w.t("logp", lp)
        w.t("old_logp", old)
        w.t("advantages", adv)
        w.t("ref_logp", ref)
        w.t("mask", m.double())
        w.t("loss", loss)
        w.t("losses", contrib)
        w.t("grad", grad_of(loss, x))
        w.t("clip_fraction", masked_mean_all(torch.gt(l2, l1).double(), m))
        w.t("approx_kl", masked_mean_all(-nkl, m))
        w.t("clip_fraction_low", masked_mean_all((torch.gt(torch.maximum(l1, l2), -advs * c) & (advs < 0)).double(), m)
            if c > 1 else 0.0)
        w.end()

    # GSPO as verl computes it, and TRL GRPOTrainer._compute_loss's loss types (token or
    # sequence level, INTELLECT-2's delta, optional k3 KL): each maps onto an aggregation mode.
    trl_cases = [  # name, formula, level, loss_type / verl agg, clip_low, clip_high, delta, kl_coef
        ("gspo_verl", "verl_gspo", "sequence", "seq_mean_token_mean", 3e-4, 4e-4, None, 0.0),
        ("gspo_token_mean", "verl_gspo", "sequence", "token_mean", 0.2, 0.28, None, 0.0),
        ("trl_grpo_sequence", "trl", "sequence", "grpo", 0.2, 0.2, None, 0.0),
        ("trl_grpo_sequence_kl", "trl", "sequence", "grpo", 0.2, 0.2, None, 0.04),
        ("trl_luspo_sequence", "trl", "sequence", "luspo", 0.2, 0.2, 3.0, 0.0),
        ("trl_bnpo_delta", "trl", "token", "bnpo", 0.2, 0.2, 1.1, 0.0),
        ("trl_dr_grpo", "trl", "token", "dr_grpo", 0.2, 0.28, None, 0.0),
        ("trl_dapo_delta_kl", "trl", "token", "dapo", 0.2, 0.28, 1.05, 0.1),
        ("trl_grpo_token", "trl", "token", "grpo", 0.2, 0.2, None, 0.0),
        ("trl_bnpo_bias_corrected_kl", "trl", "token", "bnpo", 0.2, 0.28, 1.1, 0.1),
    ]
    trl_agg = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm",
               "dapo": "token_mean", "luspo": "seq_mean_token_sum"}
    for k, (name, formula, level, lt, lo, hi, delta, kl_coef) in enumerate(trl_cases):
        rng, m, lp, old, adv, ref = ppo_inputs(850 + k)
        mf = m.double()
        if formula == "trl":  # TRL's advantages are one per completion
            adv[:, 0] = torch.tensor([f32(rng.gauss(0.0, 1.0)) for _ in range(B)])
            adv = torch.where(m, adv[:, :1].expand_as(adv), torch.full_like(adv, float("nan")))
        if name == "gspo_verl":
            # a row whose mean log-ratio is 12 (beyond verl's clamp at 10), and tight clips that bind
            for t in range(T):
                if m[1, t]:
                    lp[1, t] = f32(old[1, t].item() + 12.0)
        x = leaf(lp)
        xs, olds, advs, refs = sel(x, m), sel(old, m), sel(adv, m), sel(ref, m)
        lens = mf.sum(-1).clamp(min=1.0)
        if formula == "verl_gspo":
            # verl compute_policy_loss_gspo: sg[s_i] * pi / sg[pi], log clamped at 10 from above
            nkl = xs - olds
            nkl_seq = (nkl * mf).sum(-1) / lens
            lsir = torch.clamp(xs - xs.detach() + nkl_seq.detach().unsqueeze(-1), max=10.0)
            sir = torch.exp(lsir)
            l1 = -advs * sir
            l2 = -advs * torch.clamp(sir, 1 - lo, 1 + hi)
            pg = torch.maximum(l1, l2)
            agg = lt
            loss, contrib = verl_agg_loss(pg, m, agg)
            clamp_opt = 10.0
        else:
            log_ratio = xs - olds
            if level == "token":
                liw = log_ratio
            else:
                liw = ((log_ratio * mf).sum(-1) / lens).unsqueeze(-1)
            coef_1 = torch.exp(liw)
            kl_weight = coef_1 if "bias_corrected" in name else 1.0  # use_bias_correction_kl
            coef_2 = torch.clamp(coef_1, 1 - lo, 1 + hi)
            if delta is not None:
                coef_1 = torch.clamp(coef_1, max=delta)
            l1, l2 = -coef_1 * advs, -coef_2 * advs
            ptl = -torch.min(coef_1 * advs, coef_2 * advs)
            if kl_coef:
                d = refs - xs
                per_token_kl = (torch.exp(d) - d - 1) * kl_weight
                ptl = ptl + kl_coef * per_token_kl
            ptl = ptl.expand(B, T) if ptl.shape[1] == 1 else ptl
            rows = (ptl * mf).sum(-1)
            agg = trl_agg[lt]
            if lt == "grpo":
                contrib = rows / lens / B
            elif lt == "bnpo":
                contrib = rows / mf.sum().clamp(min=1.0)
            elif lt == "dr_grpo":
                contrib = rows / (B * T)
            elif lt == "dapo":
                contrib = rows / (mf.sum() + 5.0)  # num_items_in_batch: this rank's tokens and another's
            else:  # luspo: (per_token_loss * mask.sum(1, keepdim=True)).mean() with a (B, 1) loss
                contrib = (ptl[:, 0] * mf.sum(-1)) / B
            loss = contrib.sum()
            clamp_opt = None
            l1, l2 = l1.expand(B, T), l2.expand(B, T)
        w.case(name)
        w.t("clip_low", lo)
        w.t("clip_high", hi)
        w.t("dual_clip", 0.0)
        w.s("aggregation", agg)
        w.s("importance_level", level)
        if clamp_opt is not None:
            w.t("log_ratio_clamp", clamp_opt)
        else:
            w.s("log_ratio_clamp", "none")
        if delta is not None:
            w.t("delta", delta)
        if lt == "dapo":
            w.t("token_count", mf.sum() + 5.0)
        if "bias_corrected" in name:
            w.t("bias_corrected_kl", 1.0)
        w.s("kl_estimator", "k3" if kl_coef else "none")
        w.t("kl_coef", kl_coef)
        w.t("logp", lp)
        w.t("old_logp", old)
        w.t("advantages", adv)
        w.t("ref_logp", ref)
        w.t("mask", mf)
        w.t("loss", loss)
        w.t("losses", contrib)
        w.t("grad", grad_of(loss, x))
        # prefloss's clip_fraction (verl pg_clipfrac) on the branches the loss takes; approx_kl per token
        w.t("clip_fraction", masked_mean_all(torch.gt(l2, l1).double(), m))
        w.t("approx_kl", masked_mean_all(-(xs - olds), m))
        w.t("clip_fraction_low", 0.0)
        w.end()
    w.write()


def gen_gmpo():
    w = Writer("gmpo", "verl compute_policy_loss_geo_mean (GMPO): sign-aware log-space clip, geometric mean a row")
    for k, (name, lo, hi, clip_edges) in enumerate([("verl_default", 0.2, 0.2, False), ("paper_0.4", 0.4, 0.4, True),
                                                     ("asymmetric", 0.1, 0.3, True)]):
        rng, m, lp, old, adv, ref = ppo_inputs(1700 + k)
        # one advantage a completion, as GMPO (and verl's averaging) assumes; NaN padding kept
        row_adv = torch.tensor([f32(rng.gauss(0.0, 1.0)) for _ in range(B)])
        adv = torch.where(m, row_adv.unsqueeze(-1).expand(B, T), torch.full_like(adv, float("nan")))
        if clip_edges:  # log-ratios far outside the range on both signs of A
            for j, dl in enumerate([1.5, -1.5, 0.7]):
                m[0, j] = True
                old[0, j] = f32(-1.0 - 0.5 * j)
                lp[0, j] = f32(old[0, j].item() + dl)
                adv[0, j] = row_adv[0]
        x = leaf(lp)
        xs, olds, advs = sel(x, m), sel(old, m), sel(adv, m)
        mf = m.double()
        # verl, as written there (response_mask float, its + 1e-8 guard)
        negative_approx_kl = xs - olds
        ppo_kl = masked_mean_all(-negative_approx_kl, m)
        sgn_advantage = torch.sign(advs)
        negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -lo, hi)
        negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
        negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
        response_mask_sum = mf.sum(dim=-1)
        ratio = torch.exp((negative_approx_kl_min * mf).sum(dim=-1) / (response_mask_sum + 1e-8))
        advantage = (advs * mf).sum(dim=-1) / (response_mask_sum + 1e-8)
        pg_losses = -advantage * ratio
        loss = torch.mean(pg_losses)
        clipped = torch.ne(negative_approx_kl, negative_approx_kl_clamp)
        w.case(name)
        w.t("clip_low", lo)
        w.t("clip_high", hi)
        for lab, t_ in [("logp", lp), ("old_logp", old), ("advantages", adv), ("mask", mf), ("loss", loss),
                        ("losses", pg_losses / B), ("grad", grad_of(loss, x)),
                        ("clip_fraction", masked_mean_all((clipped & (advs > 0)).double(), m)),
                        ("clip_fraction_low", masked_mean_all((clipped & (advs < 0)).double(), m)),
                        ("approx_kl", ppo_kl)]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_value():
    w = Writer("value_loss", "verl compute_value_loss: 0.5 * agg_loss(max((v - R)^2, (clip_by_value(v) - R)^2))")
    for k, (name, clip, agg) in enumerate([("token_mean", 0.2, "token_mean"), ("clip0.5_seq_mean_token_mean", 0.5,
                                                                               "seq_mean_token_mean"),
                                           ("seq_mean_token_sum", 0.2, "seq_mean_token_sum"),
                                           ("seq_mean_token_sum_norm", 0.1, "seq_mean_token_sum_norm")]):
        rng = random.Random(900 + k)
        m = masks(rng, B, T, empty_row=1)
        v = gauss(rng, m, 0.0, 1.0)
        old = gauss(rng, m, 0.0, 0.3, base=torch.where(m, v, torch.zeros_like(v)))
        ret = gauss(rng, m, 0.0, 1.0)
        x = leaf(v)
        vs, olds, rets = sel(x, m), sel(old, m), sel(ret, m)
        # verl_F.clip_by_value(x, lo, hi) = torch.max(torch.min(x, hi), lo)
        vclip = torch.max(torch.min(vs, olds + clip), olds - clip)
        l1 = (vs - rets) ** 2
        l2 = (vclip - rets) ** 2
        loss, contrib = verl_agg_loss(torch.max(l1, l2), m, agg)
        loss, contrib = 0.5 * loss, 0.5 * contrib
        w.case(name)
        w.t("clip", clip)
        w.s("aggregation", agg)
        for lab, t_ in [("values", v), ("old_values", old), ("returns", ret), ("mask", m.double()), ("loss", loss),
                        ("losses", contrib), ("grad", grad_of(loss, x)),
                        ("clip_fraction", masked_mean_all(torch.gt(l2, l1).double(), m))]:
            w.t(lab, t_)
        w.end()
    w.write()


# ---- verl compute_policy_loss_cispo / _sapo / _gpg and TRL GRPOTrainer._compute_loss (cispo, sapo) ----

def verl_cispo(xs, olds, advs, clip_low, clip_high):
    negative_approx_kl = torch.clamp(xs - olds, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return -clipped_ratio.detach() * advs * xs, negative_approx_kl, ratio


def trl_cispo(xs, olds, advs, epsilon_high):
    coef_1 = torch.exp(xs - olds)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    return -clamped_ratios * advs * xs, xs - olds, coef_1


def verl_sapo(xs, olds, advs, tau_pos, tau_neg):
    negative_approx_kl = torch.clamp(xs - olds, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    taus = torch.where(advs > 0, torch.as_tensor(tau_pos), torch.as_tensor(tau_neg))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    return -gates * advs, negative_approx_kl, ratio


def trl_sapo(xs, olds, advs, tau_pos, tau_neg):
    coef_1 = torch.exp(xs - olds)
    temperatures = torch.where(advs > 0, torch.full_like(advs, tau_pos), torch.full_like(advs, tau_neg))
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    return -soft_coef_1 * advs, xs - olds, coef_1


def gen_policy_losses():
    w = Writer("policy_losses", "verl compute_policy_loss_cispo / _sapo / _gpg + agg_loss, TRL GRPOTrainer._compute_loss "
               "loss_type cispo / sapo")
    cases = [  # name, loss, formula, aggregation, (clip_low, clip_high) | epsilon_high | (tau_pos, tau_neg)
        ("cispo_verl_token_mean", "cispo", "verl", "token_mean", (0.2, 0.2)),
        ("cispo_verl_clip_higher_seq_mean_token_mean", "cispo", "verl", "seq_mean_token_mean", (0.2, 0.28)),
        ("cispo_verl_seq_mean_token_sum", "cispo", "verl", "seq_mean_token_sum", (0.1, 0.3)),
        ("cispo_verl_seq_mean_token_sum_norm", "cispo", "verl", "seq_mean_token_sum_norm", (0.2, 0.2)),
        ("cispo_trl_eps_high5", "cispo", "trl", "token_mean", 5.0),
        ("cispo_trl_eps_high1.28", "cispo", "trl", "token_mean", 1.28),
        ("sapo_verl", "sapo", "verl", "seq_mean_token_mean", (1.0, 1.05)),
        ("sapo_verl_tau_token_mean", "sapo", "verl", "token_mean", (0.5, 2.0)),
        ("sapo_trl", "sapo", "trl", "seq_mean_token_mean", (1.0, 1.05)),
        ("sapo_trl_tau", "sapo", "trl", "seq_mean_token_mean", (0.3, 3.0)),
        ("gpg_token_mean", "gpg", "verl", "token_mean", None),
        ("gpg_seq_mean_token_mean", "gpg", "verl", "seq_mean_token_mean", None),
        ("gpg_seq_mean_token_sum_norm", "gpg", "verl", "seq_mean_token_sum_norm", None),
        ("cispo_verl_token_sum", "cispo", "verl", "token_sum", (0.2, 0.28)),
    ]
    for k, (name, loss_name, formula, agg, par) in enumerate(cases):
        rng, m, lp, old, adv, _ = ppo_inputs(1900 + k)
        mf = m.double()
        if formula == "trl":  # TRL's advantages are one per completion
            adv[:, 0] = torch.tensor([f32(rng.gauss(0.0, 1.0)) for _ in range(B)])
            adv = torch.where(m, adv[:, :1].expand_as(adv), torch.full_like(adv, float("nan")))
        else:
            # Tokens far off-policy: clipped above and below, beyond the +-20 log-ratio clamp on both
            # sides, and an A == 0 token (SAPO's temperature choice: tau_neg).
            for j, (dlog, a) in enumerate([(1.5, -0.8), (22.0, 0.3), (-0.5, 1.1), (-22.0, 0.7), (0.9, 0.0)]):
                m[0, j] = True
                old[0, j] = f32(-1.0 - 0.5 * j - max(dlog, 0.0))  # logp stays <= -1
                lp[0, j] = f32(old[0, j].item() + dlog)
                adv[0, j] = f32(a)
            mf = m.double()
        if loss_name == "cispo" and formula == "trl":
            m[1, 0] = True  # one token past epsilon_high = 5 with A > 0
            old[1, 0] = f32(-2.0)
            lp[1, 0] = f32(-0.25)
            adv[1, :] = torch.where(m[1], torch.full_like(adv[1], f32(0.9)), adv[1])
            mf = m.double()
        x = leaf(lp)
        xs, olds, advs = sel(x, m), sel(old, m), sel(adv, m)
        token_count = None
        if loss_name == "cispo":
            if formula == "verl":
                clip_low, clip_high = par
                pg, lr, ratio = verl_cispo(xs, olds, advs, clip_low, clip_high)
                hi = 1 + clip_high
            else:
                pg, lr, ratio = trl_cispo(xs, olds, advs, par)
                clip_low, clip_high, hi = 1.0, par - 1.0, par
            lo = 1 - clip_low
        elif loss_name == "sapo":
            pg, lr, ratio = (verl_sapo if formula == "verl" else trl_sapo)(xs, olds, advs, par[0], par[1])
        else:
            pg, lr, ratio = -xs * advs, xs - olds, None
        if formula == "trl" and loss_name == "cispo":
            # cispo: (per_token_loss * mask).sum() / num_items_in_batch (this rank's tokens and another's)
            token_count = mf.sum().item() + 5.0
            contrib = (sel(pg, m)).sum(-1) / token_count
            loss = contrib.sum()
        elif formula == "trl":
            # sapo: ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            contrib = (sel(pg, m)).sum(-1) / mf.sum(-1).clamp(min=1.0) / B
            loss = contrib.sum()
        else:
            loss, contrib = verl_agg_loss(pg, m, agg)
        w.case(name)
        w.s("loss", loss_name)
        w.s("aggregation", agg)
        if loss_name == "cispo":
            w.t("clip_low", clip_low)
            w.t("clip_high", clip_high)
        if loss_name == "sapo":
            w.t("tau_pos", par[0])
            w.t("tau_neg", par[1])
        if loss_name != "gpg":
            if formula == "verl":
                w.t("log_ratio_clamp", 20.0)
            else:
                w.s("log_ratio_clamp", "none")
        if token_count is not None:
            w.t("token_count", token_count)
        w.t("logp", lp)
        w.t("old_logp", old)
        w.t("advantages", adv)
        w.t("mask", mf)
        w.t("loss", loss)
        w.t("losses", contrib)
        w.t("grad", grad_of(loss, x))
        w.t("approx_kl", masked_mean_all(-lr, m))
        if ratio is not None:
            w.t("ratio_mean", masked_mean_all(ratio, m))
            w.t("ratio_max", torch.where(m, ratio, torch.full_like(ratio, -math.inf)).max())
        if loss_name == "cispo":
            # verl pg_clipfrac: ratio != clipped_ratio; TRL cispo_clip_ratio: coef_1 > epsilon_high & A > 0
            w.t("clip_fraction", masked_mean_all(torch.ne(ratio, torch.clamp(ratio, lo, hi)).double(), m))
            w.t("clip_fraction_high", masked_mean_all((torch.gt(ratio, hi) & (advs > 0)).double(), m))
        w.end()
    w.write()


# ---- verl compute_policy_loss_clip_cov / _kl_cov (1dda039) ------------------------------------

def verl_clip_cov(log_prob, old_log_prob, advantages, response_mask, cliprange_low, cliprange_high, clip_cov_ratio,
                  clip_cov_lb, clip_cov_ub, generator):
    """verl compute_policy_loss_clip_cov up to pg_losses, as written there (masked_mean's + 1e-8 left out, as
    prefloss; torch.randperm drawn from `generator`). Returns pg_losses, corr, the candidate mask, clip_num, ppo_kl."""
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean_all(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    mf = response_mask.to(advantages.dtype)
    cov_all = (advantages - (advantages * mf).sum() / mf.sum()) * (
        log_prob - (log_prob.detach() * mf).sum() / mf.sum())
    cov_all = cov_all.detach().clone()
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * mf.sum().item()), 1)
    cand = (cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0)
    top_k_idx = torch.nonzero(cand)
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx), generator=generator)
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), dtype=torch.long)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    return pg_losses, corr, cand, clip_num, ppo_kl, clip_by_origin


def verl_kl_cov(log_prob, old_log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef):
    """verl compute_policy_loss_kl_cov up to pg_losses, as written there. Returns pg_losses, the selection, ppo_kl."""
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    ppo_kl_abs = masked_mean_all(negative_approx_kl.abs(), response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1.clone()
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1)
    all_valid_logp = log_prob[all_valid].detach().reshape(-1)
    selected = torch.zeros_like(advantages)
    k = min(kl_cov_ratio, len(all_valid_adv))
    if k != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices
        if len(large_cov_idxs) != 0:
            large_cov_idxs = all_valid_idx[large_cov_idxs]
            rows, cols = large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
            pg_losses[rows, cols] = pg_losses_kl[rows, cols]
            selected[rows, cols] = 1.0
    return pg_losses, selected, ppo_kl_abs


def gen_cov_policy():
    w = Writer("cov_policy", "verl compute_policy_loss_clip_cov / compute_policy_loss_kl_cov + agg_loss at 1dda039: "
               "the selection (clip-cov: verl's candidate set and torch.randperm's pick; kl-cov: torch.topk) and "
               "the loss given it")
    cases = [  # name, loss, aggregation, params
        ("clip_cov_token_mean", "clip_cov", "token_mean", (0.2, 0.2, 0.3, 0.0, 5.0)),
        ("clip_cov_all_candidates_seq_mean_token_mean", "clip_cov", "seq_mean_token_mean", (0.2, 0.28, 1.0, -0.05, 0.5)),
        ("clip_cov_verl_bounds_seq_mean_token_sum", "clip_cov", "seq_mean_token_sum", (0.2, 0.2, 2e-4, 1.0, 5.0)),
        ("kl_cov_token_mean", "kl_cov", "token_mean", (0.1, 1.0)),
        ("kl_cov_coef2_seq_mean_token_mean", "kl_cov", "seq_mean_token_mean", (0.25, 2.0)),
        ("kl_cov_default_ratio_seq_mean_token_sum_norm", "kl_cov", "seq_mean_token_sum_norm", (2e-4, 1.0)),
    ]
    for k, (name, loss_name, agg, par) in enumerate(cases):
        rng, m, lp, old, adv, _ = ppo_inputs(2300 + k)
        mf = m.double()
        x = leaf(lp)
        xs, olds, advs = sel(x, m), sel(old, m), sel(adv, m)
        w.case(name)
        w.s("loss", loss_name)
        w.s("aggregation", agg)
        if loss_name == "clip_cov":
            lo, hi, ratio, lb, ub = par
            g = torch.Generator().manual_seed(2300 + k)
            pg, corr, cand, clip_num, ppo_kl, clipped = verl_clip_cov(xs, olds, advs, m, lo, hi, ratio, lb, ub, g)
            selected = sel(1.0 - corr, m)
            for lab, v in [("clip_low", lo), ("clip_high", hi), ("cov_ratio", ratio), ("cov_lower", lb),
                           ("cov_upper", ub), ("target", float(clip_num)), ("candidates", cand.double()),
                           ("n_candidates", float(cand.sum().item()))]:
                w.t(lab, v)
            metrics = [("selected_fraction", masked_mean_all((corr == 0).double(), m)),
                       ("clip_fraction", masked_mean_all(clipped.double(), m)), ("approx_kl", ppo_kl)]
        else:
            ratio, coef = par
            pg, selected, ppo_kl_abs = verl_kl_cov(xs, olds, advs, m, ratio, coef)
            w.t("cov_ratio", ratio)
            w.t("kl_coef", coef)
            metrics = [("abs_kl", ppo_kl_abs), ("selected_fraction", masked_mean_all(selected, m)),
                       ("approx_kl", masked_mean_all(-(xs - olds), m))]
        loss, contrib = verl_agg_loss(pg, m, agg)
        for lab, v in [("logp", lp), ("old_logp", old), ("advantages", adv), ("mask", mf), ("selected", selected),
                       ("loss", loss), ("losses", contrib), ("grad", grad_of(loss, x))] + metrics:
            w.t(lab, v)
        w.end()
    w.write()


def gen_kl():
    w = Writer("kl", "verl kl_penalty k1 / k2 / k3 (low_var_kl with its +-20 and +-10 clamps) / abs and the "
                     "straight-through k1+ / abs+ / k3+, per token, and d/d logp")
    # The seeds are 1000 + k: new estimators go last so the earlier cases keep their inputs.
    for k, est in enumerate(["k1", "k2", "k3", "abs", "k1+", "abs+", "k3+"]):
        rng, m, lp, old, adv, ref = ppo_inputs(1000 + k)
        # Exercise k3's clamps: x = ref - logp = 25 (log-ratio clamp), 13 and -25 (value clamp);
        # k3+ keeps them on the value only.
        lp[0, 0], ref[0, 0] = f32(-30.0), f32(-5.0)
        lp[0, 1], ref[0, 1] = f32(-14.0), f32(-1.0)
        lp[0, 2], ref[0, 2] = f32(-1.0), f32(-26.0)
        m[0, :3] = True
        if k >= 3:  # logp == ref_logp: torch.abs's gradient there is 0, as the '+' ones' is
            lp[0, 3], ref[0, 3] = f32(-0.75), f32(-0.75)
            m[0, 3] = True
        x = leaf(lp)
        kl = verl_kl_penalty(sel(x, m), sel(ref, m), est)
        out = sel(kl, m)
        # d out / d logp per token (each token's estimate depends on its own logp only).
        g = grad_of(out.sum(), x)
        w.case(est)
        w.s("estimator", est)
        for lab, t_ in [("logp", lp), ("ref_logp", ref), ("mask", m.double()), ("out", out), ("grad", g)]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_gae():
    w = Writer("gae", "verl compute_gae_advantage_return (mask-skipping recursion), without whitening; "
                      "0 at masked tokens")
    for k, (name, gamma, lam) in enumerate([("gamma1_lam1", 1.0, 1.0), ("gamma0.99_lam0.95", 0.99, 0.95)]):
        rng = random.Random(1100 + k)
        m = masks(rng, B, T, empty_row=2, holes=True)
        m[3] = torch.tensor([1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)  # a multi-turn row: observation span inside
        r = gauss(rng, m, 0.0, 1.0)
        v = gauss(rng, m, 0.0, 1.0)
        rs, vs, mf = sel(r, m), sel(v, m), m.double()
        nextvalues = torch.zeros(B)
        lastgaelam = torch.zeros(B)
        rev = []
        for t in reversed(range(T)):
            delta = rs[:, t] + gamma * nextvalues - vs[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = vs[:, t] * mf[:, t] + (1 - mf[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * mf[:, t] + (1 - mf[:, t]) * lastgaelam
            rev.append(lastgaelam)
        adv = torch.stack(rev[::-1], dim=1)
        ret = adv + vs
        w.case(name)
        w.t("gamma", gamma)
        w.t("lam", lam)
        for lab, t_ in [("rewards", r), ("values", v), ("mask", mf), ("advantages", sel(adv, m)),
                        ("returns", sel(ret, m))]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_whiten():
    w = Writer("whiten", "verl_F.masked_whiten (masked_mean, unbiased masked_var, rsqrt(var + 1e-8)); 0 at masked")
    for k, shift in enumerate([True, False]):
        rng = random.Random(1200 + k)
        m = masks(rng, B, T, empty_row=0)
        x = gauss(rng, m, 0.5, 2.0)
        xs, mf = sel(x, m), m.double()
        mean = (xs * mf).sum() / mf.sum()
        var = (((xs - mean) ** 2) * mf).sum() / mf.sum()
        var = var * mf.sum() / (mf.sum() - 1)
        out = (xs - mean) * torch.rsqrt(var + 1e-8)
        if not shift:
            out = out + mean
        w.case("shift_mean" if shift else "keep_mean")
        w.t("shift_mean", 1 if shift else 0)
        for lab, t_ in [("values", x), ("mask", mf), ("out", sel(out, m))]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_group():
    w = Writer("group_advantages", "verl compute_grpo_outcome_advantage (unbiased std, eps 1e-6), contiguous groups")
    for k, (name, g, scale) in enumerate([("group4", 4, True), ("group3_no_std", 3, False), ("group1", 1, True)]):
        rng = random.Random(1300 + k)
        s = vec(rng, 12, -1, 2)
        out = torch.empty(12)
        for a in range(0, 12, g):
            grp = s[a:a + g]
            if g == 1:
                mean, std = torch.tensor(0.0), torch.tensor(1.0)
            else:
                mean, std = grp.mean(), grp.std()
            out[a:a + g] = (grp - mean) / (std + 1e-6) if scale else grp - mean
        w.case(name)
        w.t("group_size", g)
        w.t("scale_by_std", 1 if scale else 0)
        w.t("scores", s)
        w.t("out", out)
        w.end()
    w.write()


# ---- token log-probs from logits: TRL selective_log_softmax, verl entropy_from_logits ---------

def gen_logprobs():
    w = Writer("logprobs", "TRL selective_log_softmax (log_softmax(logits / T).gather(labels)) and verl "
                           "entropy_from_logits, per token, and d/d logits of sum g_lp logp + g_h entropy")
    # (name, vocab, temperature, logit spread): V not a multiple of any SIMD width included.
    for k, (name, V, temp, spread) in enumerate([("v1", 1, 1.0, 1.0), ("v7_t0.7", 7, 0.7, 2.0),
                                                 ("v33", 33, 1.0, 3.0), ("v100_t2", 100, 2.0, 4.0),
                                                 ("v517_confident", 517, 1.0, 1.0)]):
        rng = random.Random(3000 + k)
        Bq, Tq = 2, 5
        m = masks(rng, Bq, Tq)
        z = [[[f32(rng.gauss(0.0, spread)) for _ in range(V)] for _ in range(Tq)] for _ in range(Bq)]
        y = [[rng.randrange(V) for _ in range(Tq)] for _ in range(Bq)]
        for i in range(Bq):
            for j in range(Tq):
                if not m[i, j]:
                    z[i][j] = [NAN] * V  # padding: never read
                    y[i][j] = -7  # nor its label
                    continue
                if V > 3:  # forbidden vocabulary, never the label
                    for v in range(0, V, 5):
                        if v != y[i][j]:
                            z[i][j][v] = NEG_INF
                if name.endswith("confident"):  # p_y near 1
                    z[i][j][y[i][j]] = f32(12.0 + j)
        zt = torch.tensor(z)
        yt = torch.tensor(y, dtype=torch.int64)
        gl = torch.tensor([[f32(rng.gauss(0, 1)) for _ in range(Tq)] for _ in range(Bq)])
        gh = torch.tensor([[f32(rng.gauss(0, 1)) for _ in range(Tq)] for _ in range(Bq)])
        x = leaf(zt)
        m3 = m.unsqueeze(-1).expand_as(x)
        u = torch.where(m3, x, torch.zeros_like(x)) / temp
        lsm = u.log_softmax(-1)
        logp = sel(lsm.gather(-1, yt.clamp(min=0).unsqueeze(-1)).squeeze(-1), m)
        # verl's logsumexp(u) - sum(softmax(u) u) is 0 * -inf = NaN at a -inf logit; prefloss
        # defines that term as 0 (probability 0), which this form gives with a finite gradient.
        p = lsm.exp()
        safe = torch.where(p > 0, lsm, torch.zeros_like(lsm))
        ent = sel(-(p * safe).sum(-1), m)
        g = grad_of((sel(gl, m) * logp).sum() + (sel(gh, m) * ent).sum(), x)
        w.case(name)
        w.t("temperature", temp)
        for lab, t_ in [("logits", zt), ("labels", yt.double()), ("mask", m.double()), ("grad_logp", gl),
                        ("grad_entropy", gh), ("logp", logp), ("entropy", ent), ("grad", g)]:
            w.t(lab, t_)
        w.end()
    w.write()


# ---- 16-bit logits, and losses straight from logits ------------------------------------------

def logit_inputs(rng, m, V, spread, forbid=True):
    """Logits [B, T, V] (float32-exact, |z| <= 10) and labels [B, T] at the selected tokens of m;
    NaN rows and label -7 at masked-out tokens (never read), a -inf (forbidden) entry in each
    selected row of V > 3 (never the label; every 9th entry from a row-dependent start)."""
    Bq, Tq = m.shape
    z = [[[f32(max(-10.0, min(10.0, rng.gauss(0.0, spread)))) for _ in range(V)] for _ in range(Tq)]
         for _ in range(Bq)]
    y = [[rng.randrange(V) for _ in range(Tq)] for _ in range(Bq)]
    for i in range(Bq):
        for j in range(Tq):
            if not m[i, j]:
                z[i][j] = [NAN] * V
                y[i][j] = -7
            elif forbid and V > 3:
                for v in range((i + 2 * j) % 9, V, 9):
                    if v != y[i][j]:
                        z[i][j][v] = NEG_INF
    return torch.tensor(z), torch.tensor(y, dtype=torch.int64)


def logprobs_of(x, y, m, temp):
    """TRL selective_log_softmax on logits / temperature and verl entropy_from_logits (a -inf
    logit's term 0), both 0 at masked-out tokens; the padding is selected away first."""
    m3 = m.unsqueeze(-1).expand_as(x)
    u = torch.where(m3, x, torch.zeros_like(x)) / temp
    lsm = u.log_softmax(-1)
    logp = sel(lsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), m)
    p = lsm.exp()
    ent = sel(-(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1), m)
    return logp, ent


def trl_wpo_weights(z, y, m):
    """TRL _compute_loss use_weighting (no_grad): exp of the masked mean of per-token log-probs
    minus logsumexp(2 z) - 2 logsumexp(z); the padding is selected away first."""
    m3 = m.unsqueeze(-1).expand_as(z)
    u = torch.where(m3, z, torch.zeros_like(z))
    logp = sel(u.log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), m)
    log_denom = torch.logsumexp(2.0 * u, dim=-1) - 2.0 * torch.logsumexp(u, dim=-1)
    aligned = sel(logp - log_denom, m)
    return torch.exp(aligned.sum(1) / m.sum(1).clamp_min(1))


def gen_dpo_mixture():
    w = Writer("dpo_mixture", "TRL DPOTrainer._compute_loss: loss_type lists with loss_weights, use_weighting (WPO)")
    V = 11
    cases = [("mpo_weighted", [("sigmoid", 0.8), ("bco_pair", 0.2)], True, 0.1),
             ("three_terms", [("sigmoid", 1.0), ("hinge", 0.5), ("apo_zero", 2.0)], False, 0.3),
             ("sigmoid_weighted", [("sigmoid", 1.0)], True, 0.5),
             ("with_aot", [("sigmoid", 1.0), ("aot", 1.0)], False, 0.2)]
    for k, (name, terms, weighting, beta) in enumerate(cases):
        rng = random.Random(1400 + k)
        mc, mr = masks(rng, B, T, empty_row=None), masks(rng, B, T, empty_row=1)
        zc, yc = logit_inputs(rng, mc, V, 2.0, forbid=False)
        zr, yr = logit_inputs(rng, mr, V, 2.0, forbid=False)
        xc, _ = logprobs_of(zc, yc, mc, 1.0)
        xr, _ = logprobs_of(zr, yr, mr, 1.0)
        # The token log-probs as float32 leaves (the C++ side reads them so), padded with NaN.
        xc = torch.where(mc, torch.tensor([[f32(v) for v in row] for row in xc.tolist()]), torch.full_like(xc, NAN))
        xr = torch.where(mr, torch.tensor([[f32(v) for v in row] for row in xr.tolist()]), torch.full_like(xr, NAN))
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_sum(lc, mc), masked_sum(lr, mr)
        rc = torch.tensor([f32(v + rng.uniform(-3, 3)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-3, 3)) for v in pr.tolist()])
        pw = trl_wpo_weights(zc, yc, mc) * trl_wpo_weights(zr, yr, mr) if weighting else torch.ones(B)
        loss, term_losses, losses = 0.0, [], torch.zeros(B)
        for lt, lw in terms:
            per_seq = trl_compute_loss(pc, pr, rc, rr, beta, 0.0, lt) * pw
            if lt == "aot":
                per_seq = per_seq[torch.argsort(torch.argsort((pc - pr).detach(), stable=True), stable=True)]
            term_losses.append(per_seq.mean())
            losses = losses + lw * per_seq
            loss = loss + per_seq.mean() * lw
        w.case(name)
        w.s("terms", ",".join(lt for lt, _ in terms))
        for lab, t_ in [("term_weights", torch.tensor([lw for _, lw in terms])), ("beta", beta),
                        ("weighting", 1 if weighting else 0), ("logits_c", zc), ("labels_c", yc.double()),
                        ("logits_r", zr), ("labels_r", yr.double()), ("logp_c", xc), ("mask_c", mc.double()),
                        ("logp_r", xr), ("mask_r", mr.double()), ("ref_c", rc), ("ref_r", rr),
                        ("pair_weights", pw), ("loss", loss), ("losses", losses),
                        ("term_loss", torch.stack(term_losses)), ("grad_c", grad_of(loss, lc)),
                        ("grad_r", grad_of(loss, lr))]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_logprobs_lowp():
    w = Writer("logprobs_lowp", "token_logprobs of bf16 / half logits: logits rounded by torch to the 16-bit "
                                "type, reference in float64 from the rounded values (as gen_logprobs)")
    # (name, dtype, vocab, temperature, logit spread)
    for k, (name, dt, V, temp, spread) in enumerate([("bf16_v37", "bf16", 37, 1.0, 2.0),
                                                     ("bf16_v100_t0.7", "bf16", 100, 0.7, 3.0),
                                                     ("bf16_v16", "bf16", 16, 1.0, 1.5),
                                                     ("half_v37_t1.5", "half", 37, 1.5, 2.0),
                                                     ("half_v211", "half", 211, 1.0, 2.5)]):
        rng = random.Random(3100 + k)
        Bq, Tq = 3, 5
        m = masks(rng, Bq, Tq)
        z32, yt = logit_inputs(rng, m, V, spread)
        tdt = torch.bfloat16 if dt == "bf16" else torch.float16
        zt = z32.to(torch.float32).to(tdt).to(torch.float64)  # round to nearest even; NaN / -inf kept
        gl = torch.tensor([[f32(rng.gauss(0, 1)) for _ in range(Tq)] for _ in range(Bq)])
        gh = torch.tensor([[f32(rng.gauss(0, 1)) for _ in range(Tq)] for _ in range(Bq)])
        x = leaf(zt)
        logp, ent = logprobs_of(x, yt, m, temp)
        g = grad_of((sel(gl, m) * logp).sum() + (sel(gh, m) * ent).sum(), x)
        w.case(name)
        w.s("dtype", dt)
        w.t("temperature", temp)
        for lab, t_ in [("logits", zt), ("labels", yt.double()), ("mask", m.double()), ("grad_logp", gl),
                        ("grad_entropy", gh), ("logp", logp), ("entropy", ent), ("grad", g)]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_dpo_logits():
    w = Writer("dpo_logits", "TRL dpo_loss sigmoid (label smoothing) of masked sums of TRL selective_log_softmax "
                             "(logits / T), chosen and rejected logits; d loss / d logits by float64 autograd")
    # (name, beta, label_smoothing, vocab, temperature, logit spread)
    cases = [("sigmoid_v37", 0.1, 0.0, 37, 1.0, 2.0), ("cdpo_v100_t0.7", 0.5, 0.1, 100, 0.7, 2.5),
             ("sigmoid_beta0.3_v17_t1.5", 0.3, 0.0, 17, 1.5, 3.0)]
    for k, (name, beta, ls, V, temp, spread) in enumerate(cases):
        rng = random.Random(3200 + k)
        mc = masks(rng, B, T)
        mr = masks(rng, B, T, empty_row=2)
        zc, yc = logit_inputs(rng, mc, V, spread)
        zr, yr = logit_inputs(rng, mr, V, spread)
        xc, xr = leaf(zc), leaf(zr)
        lpc, _ = logprobs_of(xc, yc, mc, temp)
        lpr, _ = logprobs_of(xr, yr, mr, temp)
        pc, pr = masked_sum(lpc, mc), masked_sum(lpr, mr)
        # Reference sequence log-probs: constants near the policy's, so beta * D is O(1).
        rc = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pr.tolist()])
        losses, _, _ = trl_dpo_loss(pc, pr, rc, rr, beta, ls, "sigmoid", False)
        loss = losses.mean()
        g_lpc, g_lpr, gc, gr = torch.autograd.grad(loss, [lpc, lpr, xc, xr], retain_graph=True)
        w.case(name)
        w.s("variant", "sigmoid")
        w.t("beta", beta)
        w.t("label_smoothing", ls)
        w.t("temperature", temp)
        for lab, t_ in [("logits_c", zc), ("labels_c", yc.double()), ("mask_c", mc.double()), ("logits_r", zr),
                        ("labels_r", yr.double()), ("mask_r", mr.double()), ("ref_c", rc), ("ref_r", rr),
                        ("logp_c", lpc), ("logp_r", lpr), ("loss", loss), ("losses", losses),
                        ("grad_logp_c", sel(g_lpc, mc)), ("grad_logp_r", sel(g_lpr, mr)), ("grad_c", gc),
                        ("grad_r", gr)]:
            w.t(lab, t_)
        w.end()
    w.write()


def gen_ppo_logits():
    w = Writer("ppo_logits", "verl dp_actor from logits: log_softmax(logits / T).gather and entropy_from_logits, "
                             "compute_policy_loss_vanilla + agg_loss (+ kl_coef * agg_loss(k1)) - entropy_coef * "
                             "agg_loss(entropy); d loss / d logits by float64 autograd")
    cases = [  # name, clip_low, clip_high, aggregation, kl estimator, kl_coef, entropy_coef, vocab, temperature
        ("token_mean_v37", 0.2, 0.2, "token_mean", None, 0.0, 0.0, 37, 1.0),
        ("seq_mean_token_sum_v100_t0.7", 0.2, 0.28, "seq_mean_token_sum", None, 0.0, 0.0, 100, 0.7),
        ("seq_mean_token_mean_kl_k1_v17", 0.1, 0.3, "seq_mean_token_mean", "k1", 0.1, 0.0, 17, 1.0),
        ("seq_mean_token_sum_norm_entropy_v37", 0.2, 0.2, "seq_mean_token_sum_norm", None, 0.0, 0.01, 37, 1.0),
        ("token_mean_kl_k1_entropy_v50_t1.3", 0.2, 0.2, "token_mean", "k1", 0.05, 0.02, 50, 1.3),
    ]
    for k, (name, lo, hi, agg, est, kl_coef, ent_coef, V, temp) in enumerate(cases):
        rng = random.Random(3300 + k)
        m = masks(rng, B, T, empty_row=2)
        z, y = logit_inputs(rng, m, V, 2.0)
        with torch.no_grad():
            lp0, _ = logprobs_of(z, y, m, temp)
        # The rollout's log-probs near the policy's; no ratio within 1e-3 (relative) of a clip
        # edge, so float rounding of logp cannot switch a token between clipped and unclipped.
        old = gauss(rng, m, 0.0, 0.25, base=lp0)
        for i in range(B):
            for j in range(T):
                if m[i, j]:
                    while any(abs(math.exp(lp0[i, j].item() - old[i, j].item()) / e - 1) < 1e-3
                              for e in (1 - lo, 1 + hi)):
                        old[i, j] = f32(old[i, j].item() + 0.01)
        adv = gauss(rng, m, 0.0, 1.0)
        ref = gauss(rng, m, 0.0, 0.3, base=lp0)
        x = leaf(z)
        logp, ent = logprobs_of(x, y, m, temp)
        olds, advs, refs = sel(old, m), sel(adv, m), sel(ref, m)
        pg, _, _, _ = verl_policy_loss(logp, olds, advs, m, lo, hi, 0.0, False)
        pg_loss, _ = verl_agg_loss(pg, m, agg)
        if est is not None:
            pg_loss = pg_loss + kl_coef * verl_agg_loss(verl_kl_penalty(logp, refs, est), m, agg)[0]
        ent_agg, _ = verl_agg_loss(ent, m, agg)
        loss = pg_loss - ent_coef * ent_agg
        (g_lp,) = torch.autograd.grad(pg_loss, [logp], retain_graph=True)
        (g,) = torch.autograd.grad(loss, [x], retain_graph=True)
        w.case(name)
        w.t("clip_low", lo)
        w.t("clip_high", hi)
        w.t("dual_clip", 0.0)
        w.s("aggregation", agg)
        w.s("kl_estimator", est or "none")
        w.t("kl_coef", kl_coef)
        w.t("entropy_coef", ent_coef)
        w.t("temperature", temp)
        for lab, t_ in [("logits", z), ("labels", y.double()), ("old_logp", old), ("advantages", adv),
                        ("ref_logp", ref), ("mask", m.double()), ("logp", logp), ("entropy", ent),
                        ("pg_loss", pg_loss), ("entropy_agg", ent_agg), ("loss", loss),
                        ("grad_logp", sel(g_lp, m)), ("grad", g)]:
            w.t(lab, t_)
        w.end()
    w.write()


# ---- advantages and rewards: verl core_algos estimators, TRL GRPO scaling, Llama 2, OpenRLHF ---

def verl_masked_whiten(values, mask, shift_mean=True):
    """verl_F.masked_whiten: masked_mean, unbiased masked_var, rsqrt(var + 1e-8)."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def verl_group_lists(scores, index):
    id2score = {}
    for i in range(scores.shape[0]):
        id2score.setdefault(index[i], []).append(scores[i])
    return id2score


def verl_rloo(scores, index):
    """compute_rloo_outcome_advantage's loop (a group of one keeps its score)."""
    scores = scores.clone()
    id2score = verl_group_lists(scores, index)
    id2mean = {k: (torch.tensor(0.0) if len(v) == 1 else torch.mean(torch.stack(v))) for k, v in id2score.items()}
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        if n > 1:
            scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
    return scores


def verl_opo(scores, response_length, index):
    """compute_opo_outcome_advantage: length-weighted baseline, 0 for a group of one."""
    scores = scores.clone()
    id2score, id2len = {}, {}
    for i in range(scores.shape[0]):
        id2score.setdefault(index[i], []).append(scores[i])
        id2len.setdefault(index[i], []).append(response_length[i])
    id2bsl = {}
    for k in id2score:
        if len(id2score[k]) == 1:
            id2bsl[k] = torch.tensor(0.0)
        else:
            s, l = torch.stack(id2score[k]), torch.stack(id2len[k])
            id2bsl[k] = (l * s).sum() / l.sum()
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2bsl[index[i]]
    return scores


def verl_rfpp_baseline(scores, mask, index):
    """compute_reinforce_plus_plus_baseline_outcome_advantage on [B] scores and a 0/1 mask."""
    scores = scores.clone()
    id2score = verl_group_lists(scores, index)
    id2mean = {k: (torch.tensor(0.0) if len(v) == 1 else torch.mean(torch.stack(v))) for k, v in id2score.items()}
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2mean[index[i]]
    scores = scores.unsqueeze(-1).tile([1, mask.shape[1]]) * mask
    return verl_masked_whiten(scores, mask) * mask


def verl_rfpp(token_level_rewards, response_mask, gamma):
    """compute_reinforce_plus_plus_outcome_advantage (rewards already 0 at padding)."""
    returns = torch.zeros_like(token_level_rewards)
    running_return = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        new_running_return = token_level_rewards[:, t] + gamma * running_return
        returns[:, t] = new_running_return * response_mask[:, t]
        running_return = new_running_return * response_mask[:, t] + running_return * (1 - response_mask[:, t])
    advantages = verl_masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


def verl_remax(token_level_rewards, reward_baselines, response_mask):
    returns = (token_level_rewards * response_mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


def trl_nanstd(tensor, dim=None, keepdim=False):
    """trl.trainer.utils.nanstd."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    if dim is None:
        return std.squeeze()
    return std.squeeze(dim)


def trl_grpo_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, aggregation):
    """GRPOTrainer._generate_and_score_completions, from rewards_per_func to advantages."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        else:
            std_rewards = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = trl_nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


class VerlAdaptiveKLController:
    """verl AdaptiveKLController (np.clip written as min/max)."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

    def update(self, current_kl, n_steps):
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def gen_advantages():
    F = torch.nn.functional
    w = Writer("advantages", "verl core_algos (rloo, opo, reinforce_plus_plus[_baseline], remax, "
                             "AdaptiveKLController), TRL GRPO reward scaling, Llama 2 safety reward + "
                             "whiten(logit), best-of-n, OpenRLHF reward clip / LogExpLoss / PairWiseLoss")

    def ids_of(n, g):
        return [i // g for i in range(n)]

    # RLOO / OPO / REINFORCE++-baseline: contiguous groups (group_size) and interleaved ids.
    inter = [5, 2, 5, 9, 2, 5, 7, 2, 9, 5, 2, 9]  # groups of 4, 4, 3 and a singleton (7)
    for k, (name, g) in enumerate([("g4", 4), ("g1", 1), ("ids", None)]):
        rng = random.Random(1500 + k)
        s = vec(rng, 12, -1, 2)
        index = inter if g is None else ids_of(12, g)
        m = masks(rng, 12, T, empty_row=3)
        lengths = m.double().sum(-1)
        for kind, out in [("rloo", verl_rloo(s, index)), ("opo", verl_opo(s, lengths, index)),
                          ("rfpp_baseline", verl_rfpp_baseline(s, m.double(), index))]:
            w.case(kind + "_" + name)
            w.s("kind", kind)
            if g is None:
                w.t("group_ids", torch.tensor(index, dtype=torch.float64))
            else:
                w.t("group_size", g)
            w.t("scores", s)
            if kind != "rloo":
                w.t("mask", m.double())
                w.t("lengths", lengths)
            w.t("out", out)
            w.end()

    # REINFORCE++ and ReMax on token rewards with NaN / -inf padding; 0 at masked tokens.
    for k, gamma in enumerate([1.0, 0.9]):
        rng = random.Random(1520 + k)
        m = masks(rng, B, T, empty_row=1, holes=True)
        m[3] = torch.tensor([1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)  # an observation span inside
        r = gauss(rng, m, 0.0, 1.0)
        adv, ret = verl_rfpp(sel(r, m), m.double(), gamma)
        w.case("rfpp_gamma%g" % gamma)
        w.s("kind", "rfpp")
        w.t("gamma", gamma)
        for lab, t_ in [("token_rewards", r), ("mask", m.double()), ("advantages", sel(adv, m)),
                        ("returns", sel(ret, m))]:
            w.t(lab, t_)
        w.end()
        if k == 0:
            b = vec(rng, B, -1, 1)
            adv, ret = verl_remax(sel(r, m), b, m.double())
            w.case("remax")
            w.s("kind", "remax")
            for lab, t_ in [("token_rewards", r), ("baselines", b), ("mask", m.double()),
                            ("advantages", sel(adv, m)), ("returns", sel(ret, m))]:
                w.t(lab, t_)
            w.end()

    # TRL GRPO: 4 prompts x 4 generations, 3 reward functions; NaN = not scored.
    for k, (name, G, K, scale, agg, nans) in enumerate([
            ("trl_group", 4, 1, "group", "sum_then_normalize", False),
            ("trl_batch", 4, 2, "batch", "sum_then_normalize", False),
            ("trl_none", 4, 2, "none", "sum_then_normalize", False),
            ("trl_group_nan", 4, 3, "group", "sum_then_normalize", True),
            ("trl_batch_nan", 4, 3, "batch", "sum_then_normalize", True),
            ("trl_nts", 4, 3, "group", "normalize_then_sum", False),
            ("trl_nts_nan", 4, 3, "group", "normalize_then_sum", True),
            ("trl_g1_group", 1, 2, "group", "sum_then_normalize", False),
            ("trl_g1_nts", 1, 2, "group", "normalize_then_sum", False)]):
        rng = random.Random(1540 + k)
        n = 16 if G == 4 else 5
        x = [[f32(rng.uniform(-1, 2)) for _ in range(K)] for _ in range(n)]
        if nans:
            x[1] = [NAN] * K                    # unscorable: advantage 0, out of every mean
            x[2][0] = NAN                       # function 0 did not score completion 2
            for i in (5, 6, 7):                 # group 1: only completion 4 has function 1
                x[i][1] = NAN
            for i in (8, 9, 10):                # group 2: one scorable completion only
                x[i] = [NAN] * K
        x = torch.tensor(x)
        weights = torch.tensor([f32(v) for v in [1.0, 0.5, -0.25][:K]])
        w.case(name)
        w.s("kind", "trl")
        w.s("scale_rewards", scale)
        w.s("aggregation", agg)
        w.t("num_generations", G)
        w.t("reward_weights", weights)
        w.t("rewards_per_func", x)
        w.t("out", trl_grpo_advantages(x, weights, G, scale, agg))
        w.end()

    # Llama 2: R_c = R_s if IS_SAFETY(p) or R_s < threshold else R_h; then whiten(logit(R_c)).
    for k, thr in enumerate([0.15, 0.5]):
        rng = random.Random(1560 + k)
        n = 10
        rh, rs = vec(rng, n, 0.01, 0.99), vec(rng, n, 0.01, 0.99)
        rs[0], rs[1] = f32(0.05), f32(0.12)     # below 0.15 on helpfulness prompts
        safe = torch.tensor([1.0 if rng.random() < 0.4 else 0.0 for _ in range(n)])
        safe[0] = safe[1] = 0.0
        rc = torch.where((safe != 0) | (rs < thr), rs, rh)
        x = torch.log(rc / (1 - rc))
        whit = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
        w.case("llama2_thr%g" % thr)
        w.s("kind", "llama2")
        w.t("threshold", thr)
        for lab, t_ in [("helpfulness", rh), ("safety", rs), ("is_safety", safe), ("reward", rc), ("whitened", whit)]:
            w.t(lab, t_)
        w.end()

    # Best-of-n: torch.argmax per group (first maximal index on ties).
    rng = random.Random(1570)
    r = torch.tensor([f32(rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0])) for _ in range(12)])
    w.case("best_of_n")
    w.s("kind", "best_of_n")
    w.t("group_size", 4)
    w.t("rewards", r)
    w.t("best", r.view(-1, 4).argmax(dim=1).double() + torch.arange(0, 12, 4).double())
    w.end()

    # OpenRLHF compute_reward's clamp (default clip_range (-10, 10)).
    for k, (lo, hi) in enumerate([(-10.0, 10.0), (-0.5, 1.25)]):
        rng = random.Random(1580 + k)
        r = vec(rng, 9, -20, 20) if k == 0 else vec(rng, 9, -2, 2)
        w.case("clip_%d" % k)
        w.s("kind", "clip")
        w.t("min", lo)
        w.t("max", hi)
        w.t("rewards", r)
        w.t("out", r.clamp(min=lo, max=hi))
        w.end()

    # OpenRLHF LogExpLoss (margin accepted and ignored) and PairWiseLoss (margin used), both the
    # mean over pairs; float32 runs of the same formulas show where log(1 + exp(x)) overflows.
    for k, (name, loss_name, spread, mscale) in enumerate([
            ("logexp", "LogExpLoss", 3.0, 0.0), ("logexp_huge", "LogExpLoss", 100.0, 0.0),
            ("pairwise_margin", "PairWiseLoss", 3.0, 2.0), ("pairwise_huge_margin", "PairWiseLoss", 3.0, 1000.0)]):
        rng = random.Random(1590 + k)
        rc, rr = leaf(vec(rng, 6, -spread, spread)), leaf(vec(rng, 6, -spread, spread))
        if name == "logexp_huge":
            with torch.no_grad():
                rr[0], rc[0] = 95.0, -5.0       # r_r - r_c = 100: exp overflows float32
        margin = vec(rng, 6, 0, mscale) if mscale else torch.zeros(6)
        if loss_name == "LogExpLoss":
            per = torch.log(1 + torch.exp(rr - rc))
            f32_loss = torch.log(1 + torch.exp((rr - rc).float())).mean()
        else:
            per = -F.logsigmoid(rc - rr - margin)
            f32_loss = (-F.logsigmoid(rc.float() - rr.float() - margin.float())).mean()
        loss = per.mean()
        w.case(name)
        w.s("kind", "openrlhf_pair")
        w.s("loss", loss_name)
        w.t("r_c", rc)
        w.t("r_r", rr)
        w.t("margin", margin)
        w.t("loss", loss)
        w.t("losses", per)
        w.t("grad_c", grad_of(loss, rc))
        w.t("grad_r", grad_of(loss, rr))
        w.t("openrlhf_float32_loss", f32_loss.double())
        w.end()

    # verl AdaptiveKLController: a sequence of updates, the value after each.
    ctl = VerlAdaptiveKLController(0.05, 0.1, 1000)
    kls = [0.3, 0.1, 0.0, 0.11, 0.09, -0.02, 1e3]
    steps = [64, 64, 64, 128, 32, 64, 512]
    vals = []
    for kl, n_ in zip(kls, steps):
        ctl.update(kl, n_)
        vals.append(ctl.value)
    w.case("adaptive_kl")
    w.s("kind", "kl_ctrl")
    w.t("init_kl_coef", 0.05)
    w.t("target_kl", 0.1)
    w.t("horizon", 1000)
    w.t("current_kl", torch.tensor(kls))
    w.t("n_steps", torch.tensor(steps, dtype=torch.float64))
    w.t("values", torch.tensor(vals))
    w.end()
    w.write()


# ---- rollout importance-sampling corrections (verl rollout_corr_helper.py, TRL GRPOTrainer) -----

VERL_SAFETY_BOUND = 20.0  # verl rollout_corr_helper.SAFETY_BOUND


def verl_rc_masked_sum(values, mask, axis=None):
    # verl_F.masked_sum (verl/utils/torch_functional.py, 1dda039): select, then multiply.
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_rc_masked_mean(values, mask, axis=None):
    # verl_F.masked_mean divides by mask.sum() + 1e-8; prefloss divides by the count (documented
    # in rl/rollout_correction.hpp), so the epsilon is left out here.
    return verl_rc_masked_sum(values, mask, axis) / mask.sum(axis=axis)


def verl_rollout_is_weights(log_ratio, response_mask, rollout_is, upper, lower, batch_normalize):
    """compute_rollout_correction_weights at 1dda039: token / sequence level, TIS (lower None) or
    IcePop (lower_upper), rollout_is_batch_normalize (the non-distributed branch)."""
    use_icepop = lower is not None
    if rollout_is == "token":
        log_ratio_safe = torch.clamp(log_ratio, min=-VERL_SAFETY_BOUND, max=VERL_SAFETY_BOUND)
        raw = torch.exp(log_ratio_safe)
    else:
        log_ratio_sum = verl_rc_masked_sum(log_ratio, response_mask, axis=-1).unsqueeze(-1)
        log_ratio_sum_safe = torch.clamp(log_ratio_sum, min=-VERL_SAFETY_BOUND, max=VERL_SAFETY_BOUND)
        raw = torch.exp(log_ratio_sum_safe).expand_as(log_ratio)
    raw = raw * response_mask
    if not use_icepop:
        w = raw.clamp(max=upper)
    else:
        kept = (raw >= lower) & (raw <= upper)
        w = torch.where(kept, raw, torch.zeros_like(raw))
    oob = ((raw < (lower if use_icepop else 0.0)) | (raw > upper)).double()
    factor = 1.0
    if batch_normalize:
        if rollout_is == "token":
            weights_mean = verl_rc_masked_mean(w, response_mask)
        else:
            seq_weights = verl_rc_masked_mean(w, response_mask, axis=-1)
            seq_mask = (response_mask.sum(dim=-1) > 0).to(dtype=w.dtype)
            seq_weights = torch.where(seq_mask > 0, seq_weights, torch.zeros_like(seq_weights))  # 0/0 rows
            weights_mean = (seq_weights * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8)
        if weights_mean > 1e-8:
            w = w / weights_mean
            factor = weights_mean.item()
    return w, raw, oob, factor


def verl_rollout_rs_mask(log_ratio, response_mask, option, upper, lower):
    """compute_rollout_rejection_mask at 1dda039 for one option (thresholds already parsed by
    _parse_rollout_rs_thresholds: k1 lower defaults to 1 / upper)."""
    log_ratio_safe = torch.clamp(log_ratio, min=-VERL_SAFETY_BOUND, max=VERL_SAFETY_BOUND)
    token_k1 = -log_ratio_safe
    token_k2 = 0.5 * log_ratio_safe ** 2
    token_k3 = torch.exp(log_ratio_safe) - 1.0 - log_ratio_safe
    stat = {"k1": token_k1, "k2": token_k2, "k3": token_k3}[option[-2:]]
    response_mask_bool = response_mask.bool()

    def _sequence_max(values):
        neg_inf = torch.tensor(float("-inf"), dtype=values.dtype)
        masked_values = values.masked_fill(~response_mask_bool, neg_inf)
        max_values = masked_values.max(dim=-1).values
        return torch.where(max_values == neg_inf, torch.zeros_like(max_values), max_values)

    if option.startswith("token"):
        s = stat
    elif option.startswith("seq_sum"):
        s = verl_rc_masked_sum(stat, response_mask, axis=-1)
    elif option.startswith("seq_mean"):
        n = response_mask.sum(dim=-1)
        s = torch.where(n > 0, verl_rc_masked_sum(stat, response_mask, axis=-1) / n.clamp(min=1), torch.zeros_like(n))
    else:
        s = _sequence_max(stat)
    if option.endswith("k1"):
        keep = (s >= math.log(lower)) & (s <= math.log(upper))
    else:
        keep = s <= upper
    if not option.startswith("token"):
        keep = keep.unsqueeze(-1).expand_as(response_mask_bool)
    final_mask = keep.to(dtype=log_ratio.dtype)
    rs_masked_fraction = verl_rc_masked_mean(1 - final_mask, response_mask).item()
    final_keep_bool = (final_mask > 0.5) & response_mask_bool
    seq_has_masked = (~final_keep_bool & response_mask_bool).any(dim=-1)
    rs_seq_masked_fraction = seq_has_masked.double().mean().item()
    return final_mask, rs_masked_fraction, rs_seq_masked_fraction


def trl_vllm_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max):
    """GRPOTrainer._generate_and_score_completions at f2cd577 (vllm_importance_sampling_ratio).
    TRL multiplies the difference by the mask, which keeps NaN padding; the log-probs are selected
    first here (the file's convention), which changes nothing at valid tokens."""
    per_token_logps_diff = sel(old_per_token_logps - sampling_per_token_logps, mask.bool()) * mask
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    raw = ratio.expand_as(old_per_token_logps)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        invalid_mis_mask = (ratio < min_val) | (ratio > max_val)
        ratio = ratio.masked_fill(invalid_mis_mask, value=0.0)
    lo = clip_min if clip_min is not None else 0.0
    hi = clip_max if clip_max is not None else math.inf
    oob = ((raw < lo) | (raw > hi)).double()
    return ratio.expand_as(old_per_token_logps), raw, oob


def rc_inputs(seed, sd, empty_row=None, big=None):
    """Trainer and rollout log-probs: rollout = old + N(0, sd) at valid tokens (big: that row's
    log-ratios ~ +5 each, so its sequence sum passes verl's +-20 clamp)."""
    rng = random.Random(seed)
    m = masks(rng, B, T, empty_row=empty_row)
    old = tokens(rng, m)
    roll = old.clone()
    for i in range(B):
        for j in range(T):
            if m[i, j]:
                shift = -5.0 + rng.gauss(0.0, 0.1) if i == big else rng.gauss(0.0, sd)
                roll[i, j] = f32(old[i, j].item() + shift)
            else:
                roll[i, j] = NEG_INF if (i + j) % 2 else NAN
    return m, old, roll


def gen_rollout_correction():
    w = Writer("rollout_correction", "verl compute_rollout_correction_weights (TIS / IcePop, token / sequence, "
                                     "batch normalization) and compute_rollout_rejection_mask (every rollout_rs "
                                     "option) at 1dda039; TRL vllm_importance_sampling_mode at f2cd577; OpenRLHF PolicyLoss "
                                     "vllm_is_correction_type (tis / icepop / seq-mask-tis) with its aggregated "
                                     "loss and gradient at 3c3be623; weights 0 at masked-out tokens")
    cases = [
        # name, anchor, level, bound, upper, lower, batch_normalize, rs, rs_upper, rs_lower, input kwargs
        ("verl_token_tis", "verl", "token", "truncate", 2.0, None, False, None, None, None, dict(sd=0.5)),
        ("verl_sequence_tis", "verl", "sequence", "truncate", 2.0, None, False, None, None, None,
         dict(sd=0.3, empty_row=2)),
        ("verl_token_icepop", "verl", "token", "mask", 1.5, 0.5, False, None, None, None, dict(sd=0.5)),
        ("verl_sequence_icepop", "verl", "sequence", "mask", 3.0, 0.5, False, None, None, None, dict(sd=0.4)),
        ("verl_sequence_icepop_safety_bound", "verl", "sequence", "mask", 1e12, 1e-3, False, None, None, None,
         dict(sd=0.3, big=1)),
        ("verl_token_tis_batch_normalize", "verl", "token", "truncate", 1.5, None, True, None, None, None,
         dict(sd=0.5, empty_row=0)),
        ("verl_sequence_tis_batch_normalize", "verl", "sequence", "truncate", 2.0, None, True, None, None, None,
         dict(sd=0.3, empty_row=3)),
        ("verl_token_tis_geo_rs", "verl", "token", "truncate", 2.0, None, False, "seq_mean_k1", 1.15, None,
         dict(sd=0.4)),
        ("verl_sequence_tis_seq_sum_k1", "verl", "sequence", "truncate", 2.0, None, False, "seq_sum_k1", 2.0, 0.5,
         dict(sd=0.4)),
    ]
    rs_thresholds = {"token_k1": (1.4, 0.6), "token_k2": (0.05, None), "token_k3": (0.05, None),
                     "seq_sum_k1": (1.8, None), "seq_sum_k2": (0.2, None), "seq_sum_k3": (0.08, None),
                     "seq_mean_k1": (1.3, 0.85), "seq_mean_k2": (0.04, None), "seq_mean_k3": (0.04, None),
                     "seq_max_k2": (0.2, None), "seq_max_k3": (0.2, None)}
    for opt, (up, lo) in rs_thresholds.items():
        cases.append(("verl_rs_" + opt, "verl", "none", "truncate", 2.0, None, False, opt, up, lo,
                      dict(sd=0.3, empty_row=1)))
    for mode, cmin, cmax in [("token_truncate", None, 3.0), ("token_mask", None, 3.0), ("token_truncate", 0.5, 1.5),
                             ("token_mask", 0.6, 1.6), ("sequence_truncate", None, 3.0),
                             ("sequence_mask", None, 3.0), ("sequence_truncate", 0.5, 2.0),
                             ("sequence_mask", 0.5, None)]:
        level, bound = mode.split("_")
        name = "trl_%s_%s_%s" % (mode, "none" if cmin is None else cmin, "none" if cmax is None else cmax)
        cases.append((name, "trl", level, bound, cmax, cmin, False, None, None, None,
                      dict(sd=0.5 if level == "token" else 0.3, big=2 if level == "sequence" else None)))

    for k, (name, anchor, level, bound, upper, lower, bn, rs, rs_up, rs_lo, kw) in enumerate(cases):
        m, old, roll = rc_inputs(1300 + k, **kw)
        mf = m.double()
        if anchor == "verl":
            log_ratio = sel(old - roll, m)  # compute_rollout_correction_and_rejection_mask's log_ratio
            if level == "none":
                is_w = mf.clone()
                raw = sel(torch.exp(torch.clamp(log_ratio, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)), m)
                oob = torch.zeros_like(mf)
                factor = 1.0
            else:
                is_w, raw, oob, factor = verl_rollout_is_weights(log_ratio, mf, level, upper, lower, bn)
            if rs is not None:
                rs_lower = rs_lo if rs_lo is not None else (1.0 / rs_up if rs.endswith("k1") else None)
                keep, rs_frac, rs_seq_frac = verl_rollout_rs_mask(log_ratio, mf, rs, rs_up, rs_lower)
            else:
                keep, rs_frac, rs_seq_frac = torch.ones_like(mf), 0.0, 0.0
            # verl's loss: pg_losses * rollout_is_weights under the modified response_mask.
            keep = keep * mf
            weights = sel(is_w * keep, m)
            clamp = VERL_SAFETY_BOUND
        else:
            weights, raw, oob = trl_vllm_is_ratio(old, roll, mf, level + "_" + bound, lower, upper)
            weights = sel(weights, m)
            raw = sel(raw, m)
            keep, rs_frac, rs_seq_frac, factor = mf.clone(), 0.0, 0.0, 1.0
            clamp = None
        n = mf.sum()
        kept = keep.bool() & m
        zeroed = (~kept | (oob.bool() if bound == "mask" and level != "none" else torch.zeros_like(m))) & m
        w.case(name)
        w.s("anchor", anchor)
        w.s("level", level)
        w.s("bound", bound)
        w.s("rs", rs if rs is not None else "none")
        w.s("log_ratio_clamp", "none" if clamp is None else repr(clamp))
        w.t("upper", math.inf if upper is None else upper)
        w.t("lower", 0.0 if lower is None else lower)
        w.t("batch_normalize", 1.0 if bn else 0.0)
        if rs is not None:
            w.t("rs_upper", rs_up)
            if rs_lo is not None:
                w.t("rs_lower", rs_lo)
        w.t("old_logp", old)
        w.t("rollout_logp", roll)
        w.t("mask", mf)
        w.t("weights", weights)
        w.t("keep", keep.double())
        w.t("weight_mean", (weights.sum() / n).item())
        w.t("weight_max", weights.masked_fill(~m, -math.inf).max().item())
        w.t("weight_min", weights.masked_fill(~m, math.inf).min().item())
        w.t("ratio_mean", (raw.sum() / n).item())
        w.t("ratio_max", raw.masked_fill(~m, -math.inf).max().item())
        w.t("truncated_fraction", verl_rc_masked_mean(oob, mf).item())
        w.t("masked_fraction", (zeroed.double().sum() / n).item())
        w.t("rs_masked_fraction", rs_frac)
        w.t("rs_seq_masked_fraction", rs_seq_frac)
        w.t("batch_norm_factor", factor)
        w.t("valid_tokens", n.item())
        w.t("kept_tokens", kept.double().sum().item())
        w.t("kept_rows", kept.any(dim=-1).double().sum().item())
        # verl compute_offpolicy_metrics' kl (its masked_mean's 1e-8 left out), OpenRLHF's vllm_kl
        w.t("rollout_kl", (sel(roll - old, m).sum() / n).item())
        w.end()
    gen_openrlhf_is(w)
    w.write()


# OpenRLHF PolicyLoss with its vLLM importance-sampling correction (openrlhf/models/loss.py and
# openrlhf/models/utils.py at 3c3be623), recorded in the rollout_correction family.

def openrlhf_masked_mean(tensor, mask, dim=None):
    # openrlhf/models/utils.py masked_mean: no epsilon (an empty row gives 0 / 0 = NaN)
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                            global_batch_size=None):
    """openrlhf/models/loss.py aggregate_loss. The per-sequence divisor token_counts + 1e-8 is the
    count here (prefloss documents that it leaves the 1e-8 out), 1e-8 only for an empty row."""
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / torch.where(token_counts > 0, token_counts,
                                                            torch.full_like(token_counts, 1e-8))
    seq_mask = (token_counts > 0).double()  # exclude fully masked sequences
    if global_batch_size is None:
        return openrlhf_masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, clip_eps_low,
                         clip_eps_high, dual_clip, token_level_loss, vllm_is_truncated_threshold,
                         vllm_is_correction_type, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """PolicyLoss.forward, policy_loss_type "ppo", enable_vllm_is_correction=True. Also returns the
    coefficient multiplied into the loss and seq-mask-tis's row mask."""
    raw_policy_log_ratio = log_probs - old_log_probs
    policy_log_ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0)
    ratio = policy_log_ratio.exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    low_threshold, high_threshold = vllm_is_truncated_threshold
    rollout_log_ratio = old_log_probs - rollout_log_probs
    seq_mask = torch.ones(action_mask.shape[0], dtype=torch.bool)
    if vllm_is_correction_type == "icepop":
        vllm_is = torch.exp(rollout_log_ratio).detach()
        mask = (vllm_is >= low_threshold) & (vllm_is <= high_threshold)
        vllm_is = vllm_is * mask
        coef = vllm_is
    elif vllm_is_correction_type == "seq-mask-tis":
        seq_log_ratio = openrlhf_masked_mean(rollout_log_ratio, action_mask, dim=-1)
        seq_is = torch.exp(seq_log_ratio)
        seq_mask = (seq_is >= low_threshold) & (seq_is <= high_threshold)
        vllm_is = torch.exp(rollout_log_ratio).detach()
        coef = seq_mask.unsqueeze(-1) * vllm_is
    else:
        vllm_is = torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold).detach()
        coef = vllm_is
    loss = coef * loss
    vllm_kl = openrlhf_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
    loss = openrlhf_aggregate_loss(loss, action_mask, token_level_loss=token_level_loss, dp_size=dp_size,
                                   batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    return loss, coef, seq_mask, vllm_kl


def gen_openrlhf_is(w):
    cases = [
        # name, vllm_is_correction_type, [low, high], dual_clip, token_level_loss, batch_num_tokens,
        # global_batch_size, dp_size, rc_inputs kwargs, rows whose rollout equals old (d = 0)
        ("openrlhf_tis_default", "tis", (0.5, 5.0), None, True, None, None, 1, dict(sd=0.6), ()),
        ("openrlhf_tis_dual_batch_num_tokens", "tis", (0.8, 1.25), 3.0, True, 64.0, None, 2, dict(sd=0.4), ()),
        ("openrlhf_icepop_default", "icepop", (0.5, 5.0), None, True, None, None, 1, dict(sd=0.6, big=1), ()),
        ("openrlhf_icepop_sample_low_1", "icepop", (1.0, 2.0), None, False, None, None, 1,
         dict(sd=0.3, empty_row=3), (2,)),
        ("openrlhf_seq_mask_tis_default", "seq-mask-tis", (0.5, 5.0), None, True, None, None, 1,
         dict(sd=0.4, big=1, empty_row=2), ()),
        ("openrlhf_seq_mask_tis_sample_gbs", "seq-mask-tis", (1.0, 1.05), None, False, None, 8.0, 2,
         dict(sd=0.3, empty_row=0), (3,)),
        ("openrlhf_seq_mask_tis_dual_sample", "seq-mask-tis", (0.8, 1.1), 3.0, False, None, None, 1,
         dict(sd=0.3, big=2), ()),
    ]
    for k, (name, kind, thr, dual, tll, bnt, gbs, dp, kw, exact_rows) in enumerate(cases):
        m, old, roll = rc_inputs(1400 + k, **kw)
        for i in exact_rows:  # ratio exactly 1, at the lower bound 1.0 (kept)
            roll[i] = torch.where(m[i], old[i], roll[i])
        rng = random.Random(1450 + k)
        lp = gauss(rng, m, 0.0, 0.25, base=torch.where(m, old, torch.zeros_like(old)))
        adv = gauss(rng, m, 0.0, 1.0)
        if dual is not None:  # make dual clip bite: A < 0 with r = e^1.5 > c
            i = next(r for r in range(B) if m[r, 0])
            lp[i, 0] = f32(old[i, 0].item() + 1.5)
            adv[i, 0] = f32(-0.8)
        mf = m.double()
        x = leaf(lp)
        # Select first (the file's convention): OpenRLHF multiplies by the mask, so NaN padding
        # would reach its loss; nothing changes at valid tokens.
        loss, coef, seq_mask, vllm_kl = openrlhf_policy_loss(
            sel(x, m), sel(old, m), sel(adv, m), mf, sel(roll, m), 0.2, 0.28, dual, tll, thr, kind, dp_size=dp,
            batch_num_tokens=bnt, global_batch_size=gbs)
        keep = (seq_mask.unsqueeze(-1) & m).double()
        w.case(name)
        w.s("anchor", "openrlhf")
        w.s("correction_type", kind)
        w.t("low", thr[0])
        w.t("high", thr[1])
        w.t("clip_eps_low", 0.2)
        w.t("clip_eps_high", 0.28)
        w.t("dual_clip", 0.0 if dual is None else dual)
        w.t("token_level_loss", 1.0 if tll else 0.0)
        w.t("batch_num_tokens", 0.0 if bnt is None else bnt)
        w.t("global_batch_size", 0.0 if gbs is None else gbs)
        w.t("dp_size", float(dp))
        w.t("logp", lp)
        w.t("old_logp", old)
        w.t("rollout_logp", roll)
        w.t("advantages", adv)
        w.t("mask", mf)
        w.t("weights", sel(coef, m))
        w.t("keep", keep)
        w.t("vllm_kl", vllm_kl.item())
        w.t("valid_tokens", mf.sum().item())
        w.t("loss", loss)
        w.t("grad", grad_of(loss, x))
        w.end()


# ---- conformance presets: each anchor's formula as written, guards and all ---------------------

def verl_masked_mean(x, m):
    """verl_F.masked_mean (verl/utils/torch_functional.py, 1dda039): sum / (count + 1e-8)."""
    md = m.double()
    return (sel(x, m) * md).sum() / (md.sum() + 1e-8)


def verl_agg_loss_exact(loss_mat, mask, mode):
    """verl agg_loss (core_algos.py, 1dda039) as written, dp_size 1, no global counts: token-mean
    divides by the mask's sum, the seq-mean modes by the rows holding a token, seq-mean-token-mean
    divides each row by (count + 1e-8). Returns (loss, per-row contribution)."""
    l = sel(loss_mat, mask)
    md = mask.double()
    rows = (l * md).sum(-1)
    if mode == "token_mean":
        contrib = rows / md.sum()
    else:
        counts = md.sum(-1)
        seq_mask = (counts > 0).double()
        gbs = seq_mask.sum()
        if mode == "seq_mean_token_mean":
            contrib = rows / (counts + 1e-8) * seq_mask / gbs
        else:
            contrib = rows * seq_mask / gbs
            if mode == "seq_mean_token_sum_norm":
                contrib = contrib / loss_mat.shape[-1]
    return contrib.sum(), contrib


def trl_grpo_loss(lp, old, adv, ref, m, eps_low, eps_high, beta):
    """GRPOTrainer._compute_loss (grpo_trainer.py, f2cd577), loss_type "dapo", token level, one
    process: no clamp on the log-ratio or the k3 KL; the normalizer is num_items_in_batch (here this
    batch's mask sum). Also its clip_ratio/region_mean (global_masked_mean)."""
    md = m.double()
    per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    loss = (sel(per_token_loss, m) * md).sum() / md.sum()
    rows = (sel(per_token_loss, m) * md).sum(-1) / md.sum()
    low = (coef_1 < 1 - eps_low) & (adv < 0)
    high = (coef_1 > 1 + eps_high) & (adv > 0)
    gmm = lambda x: (sel(x.double(), m) * md).sum() / md.sum().clamp(min=1.0)
    return loss, rows, gmm(low | high)


def openrlhf_ppo_loss(lp, old, adv, m, eps_low, eps_high, token_level_loss):
    """PolicyLoss.forward (openrlhf/models/loss.py, 3c3be623), policy_loss_type "ppo", no dual clip,
    no vLLM correction, no global counts; aggregate_loss as written (token_counts + 1e-8)."""
    md = m.double()
    ratio = (lp - old).clamp(min=-20.0, max=20.0).exp()
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    l = sel(loss, m) * md
    if token_level_loss:
        rows = l.sum(-1) / md.sum()
    else:
        counts = md.sum(-1)
        seq_loss = l.sum(-1) / (counts + 1e-8)
        seq_mask = (counts > 0).double()
        rows = seq_loss * seq_mask / seq_mask.sum()
    return rows.sum(), rows


def gen_presets():
    w = Writer("presets", "preset::verl / trl / openrlhf / torchtune against each anchor's own formula")
    # verl: compute_policy_loss_vanilla (clip_ratio_c = 3 always) + agg_loss + masked_mean metrics.
    for k, agg in enumerate(["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"]):
        rng, m, lp, old, adv, ref = ppo_inputs(2500 + k)
        for j, (dlog, a) in enumerate([(1.5, -0.8), (0.9, -1.1), (-0.4, 0.7)]):  # dual clip bites at j = 0
            m[0, j] = True
            old[0, j] = f32(-1.0 - 0.5 * j)
            lp[0, j] = f32(old[0, j].item() + dlog)
            adv[0, j] = f32(a)
        m[3] = False  # a row of one token: its divisor 1 + 1e-8 is visible in double
        m[3, 0] = True
        old[3, 0], lp[3, 0], adv[3, 0] = f32(-0.7), f32(-0.5), f32(1.3)
        x = leaf(lp)
        xs, olds, advs = sel(x, m), sel(old, m), sel(adv, m)
        pg, nkl, l1, l2 = verl_policy_loss(xs, olds, advs, m, 0.2, 0.28, 3.0, True)
        loss, contrib = verl_agg_loss_exact(pg, m, agg)
        w.case("verl_ppo_" + agg)
        w.s("preset", "verl_ppo")
        w.s("aggregation", agg)
        for lab, t_ in [("clip_low", 0.2), ("clip_high", 0.28), ("logp", lp), ("old_logp", old), ("advantages", adv),
                        ("mask", m.double()), ("loss", loss), ("losses", contrib), ("grad", grad_of(loss, x)),
                        ("clip_fraction", verl_masked_mean(torch.gt(l2, l1).double(), m)),
                        ("clip_fraction_low",
                         verl_masked_mean((torch.gt(torch.maximum(l1, l2), -advs * 3.0) & (advs < 0)).double(), m)),
                        ("approx_kl", verl_masked_mean(-nkl, m))]:
            w.t(lab, t_)
        w.end()

    # TRL GRPO "dapo": a plain batch, and one with tokens beyond verl's clamps (log-ratio 21, k3 at
    # ref - logp = 12), which TRL does not clamp.
    for k, name in enumerate(["trl_grpo_dapo", "trl_grpo_beyond_clamps"]):
        rng, m, lp, old, adv, ref = ppo_inputs(2510 + k)
        if name == "trl_grpo_beyond_clamps":
            m[0, 0] = m[0, 1] = True
            old[0, 0], lp[0, 0], adv[0, 0], ref[0, 0] = f32(-25.0), f32(-4.0), f32(-1e-3), f32(-4.0)
            old[0, 1], lp[0, 1], adv[0, 1], ref[0, 1] = f32(-2.0), f32(-14.0), f32(0.5), f32(-2.0)
        x = leaf(lp)
        loss, rows, region = trl_grpo_loss(sel(x, m), sel(old, m), sel(adv, m), sel(ref, m), m, 0.2, 0.28,
                                                      0.04)
        w.case(name)
        w.s("preset", "trl_grpo")
        for lab, t_ in [("clip_low", 0.2), ("clip_high", 0.28), ("kl_coef", 0.04), ("logp", lp), ("old_logp", old),
                        ("advantages", adv), ("ref_logp", ref), ("mask", m.double()), ("loss", loss),
                        ("losses", rows), ("grad", grad_of(loss, x)), ("clip_fraction", region)]:
            w.t(lab, t_)
        w.end()

    # OpenRLHF PolicyLoss, token- and sequence-level (an empty row: row 2 of ppo_inputs).
    for k, tll in enumerate([True, False]):
        rng, m, lp, old, adv, ref = ppo_inputs(2520 + k)
        m[3] = False
        m[3, 0] = True
        old[3, 0], lp[3, 0], adv[3, 0] = f32(-0.7), f32(-0.5), f32(1.3)
        x = leaf(lp)
        loss, rows = openrlhf_ppo_loss(sel(x, m), sel(old, m), sel(adv, m), m, 0.2, 0.2, tll)
        w.case("openrlhf_ppo_" + ("token" if tll else "sequence"))
        w.s("preset", "openrlhf_ppo")
        w.s("aggregation", "token_mean" if tll else "seq_mean_token_mean")
        for lab, t_ in [("clip_low", 0.2), ("clip_high", 0.2), ("logp", lp), ("old_logp", old), ("advantages", adv),
                        ("mask", m.double()), ("loss", loss), ("losses", rows), ("grad", grad_of(loss, x))]:
            w.t(lab, t_)
        w.end()

    # TRL DPO: loss_type "sigmoid" ignores label_smoothing; in a [sigmoid, robust] list robust keeps it.
    for k, (name, terms) in enumerate([("trl_dpo_sigmoid_smoothing", [("sigmoid", 1.0)]),
                                       ("trl_dpo_mixture_smoothing", [("sigmoid", 1.0), ("robust", 0.5)])]):
        rng, mc, mr, xc, xr = pair_inputs(2530 + k)
        lc, lr = leaf(xc), leaf(xr)
        pc, pr = masked_sum(lc, mc), masked_sum(lr, mr)
        rc = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pc.tolist()])
        rr = torch.tensor([f32(v + rng.uniform(-4, 4)) for v in pr.tolist()])
        beta, ls = 0.5, 0.2
        F = torch.nn.functional
        d = (pc - rc) - (pr - rr)
        loss, losses = 0.0, torch.zeros(B)
        for lt, lw in terms:
            if lt == "sigmoid":  # TRL's branch reads no label_smoothing
                per_seq = -F.logsigmoid(beta * d)
            else:
                per_seq = trl_compute_loss(pc, pr, rc, rr, beta, ls, lt)
            losses = losses + lw * per_seq
            loss = loss + lw * per_seq.mean()
        w.case(name)
        w.s("preset", "trl_dpo")
        w.s("terms", ",".join(lt for lt, _ in terms))
        for lab, t_ in [("term_weights", torch.tensor([lw for _, lw in terms])), ("beta", beta),
                        ("label_smoothing", ls), ("logp_c", xc), ("mask_c", mc.double()), ("logp_r", xr),
                        ("mask_r", mr.double()), ("ref_c", rc), ("ref_r", rr), ("loss", loss),
                        ("losses", losses), ("grad_c", grad_of(loss, lc)), ("grad_r", grad_of(loss, lr))]:
            w.t(lab, t_)
        w.end()

    # Group advantages: verl (eps 1e-6; a lone sample's std is torch.tensor(1.0), float32 whatever
    # the scores' type, so std + eps is a float32 sum) and OpenRLHF group_norm (eps 1e-9).
    for k, (name, g) in enumerate([("verl_grpo_singletons", 1), ("verl_grpo_group4", 4),
                                   ("openrlhf_group_norm4", 4)]):
        rng = random.Random(2540 + k)
        s_ = vec(rng, 12, -1, 2)
        out = torch.empty(12)
        for a in range(0, 12, g):
            grp = s_[a:a + g]
            if name.startswith("verl"):
                if g == 1:
                    mean, std = torch.tensor(0.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
                else:
                    mean, std = torch.mean(grp), torch.std(grp)
                out[a:a + g] = (grp - mean) / (std + 1e-6)
            else:
                out[a:a + g] = (grp - grp.mean(-1, keepdim=True)) / (grp.std(-1, keepdim=True) + 1e-9)
        w.case(name)
        w.s("preset", "verl_grpo" if name.startswith("verl") else "openrlhf_group_norm")
        w.t("group_size", g)
        w.t("scores", s_)
        w.t("out", out)
        w.end()

    # Whitening: verl masked_whiten (masked_mean's 1e-8), torchtune whiten (adds the mean back, the
    # guarded count in Bessel's factor), OpenRLHF's advantage normalization (population variance
    # clamped at 1e-8), the last also on values whose variance is below the clamp. Few selected
    # entries with a large mean, so the 1e-8 guards move the result by more than double's rounding.
    for k, (name, spread) in enumerate([("verl_whiten", 1.0), ("torchtune_whiten", 1.0), ("openrlhf_whiten", 1.0),
                                        ("openrlhf_whiten_tiny_variance", 2e-5)]):
        rng = random.Random(2550 + k)
        m = torch.zeros(2, 5, dtype=torch.bool)
        m[0, :2] = True
        m[1, 1:3] = True
        x = gauss(rng, m, 0.0, spread, base=torch.full((2, 5), 5.0))
        xs, md = sel(x, m), m.double()
        if name == "verl_whiten":
            mean = (xs * md).sum() / (md.sum() + 1e-8)
            var = (((xs - mean) ** 2) * md).sum() / (md.sum() + 1e-8)
            var = var * md.sum() / (md.sum() - 1)
            out = (xs - mean) * torch.rsqrt(var + 1e-8)
        elif name == "torchtune_whiten":
            mean = (xs * md).sum() / (md.sum() + 1e-8)
            c = xs - mean
            var = ((c ** 2) * md).sum() / (md.sum() + 1e-8)
            n = md.sum() + 1e-8
            var = var * (n / (n - 1))
            out = (xs - mean) * torch.rsqrt(var + 1e-8) + mean  # shift_mean=True adds it back
        else:
            num = md.sum()
            mean = (xs * md).sum() / num
            var = ((xs - mean).pow(2) * md).sum() / num
            out = (xs - mean) * var.clamp(min=1e-8).rsqrt()
        w.case(name)
        w.s("preset", name if not name.startswith("openrlhf") else "openrlhf_whiten")
        w.t("values", x)
        w.t("mask", md)
        w.t("out", sel(out, m))
        w.end()
    w.write()


def main():
    os.makedirs(OUT, exist_ok=True)
    for gen in [gen_dpo, gen_dpo_variants, gen_ld_dpo, gen_dpo_mixture, gen_ipo, gen_kto, gen_bradley_terry, gen_simpo,
                gen_cpo, gen_orpo, gen_nll, gen_ppo, gen_gmpo, gen_value, gen_policy_losses, gen_cov_policy, gen_kl, gen_gae, gen_whiten, gen_group, gen_logprobs,
                gen_logprobs_lowp, gen_dpo_logits, gen_ppo_logits, gen_advantages, gen_rollout_correction]:
        gen()
    gen_bco()
    gen_presets()


if __name__ == "__main__":
    sys.exit(main())
