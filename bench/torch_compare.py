#!/usr/bin/python3
"""prefloss vs PyTorch eager, one table.

Runs the C++ benchmark binaries (build/bench/bench_*) with --benchmark_format=json, times the
same workloads in PyTorch eager on the CPU (1 thread, then all threads; best of N), joins the
two on (kernel, size) and prints one table plus the project's performance goals (README, Performance).

    /usr/bin/python3 bench/torch_compare.py --build build-h2             # full: up to 1e8 elements
    /usr/bin/python3 bench/torch_compare.py --build build-h2 --quick     # up to 4Mi elements
    /usr/bin/python3 bench/torch_compare.py --build build-h2 --filter 'masked_sum/f32_u8'

Works without torch (the PyTorch columns then say so). Ratios are PyTorch time / prefloss time
(> 1: prefloss is faster). prefloss kernels are single-threaded; "torch 1t" is the per-thread
comparison the goals refer to.

Adding a workload (e.g. a loss) takes one entry on each side:
  C++:    a bench/bench_<x>.cpp registering "<kernel>/<variant>/<elements>" rows (bench_common.hpp);
  Python: a @workload(r"<regex matching kernel/variant>") factory below that returns a
          zero-argument callable doing the same work in PyTorch eager for `n` elements.
Rows without a matching workload show "-" in the PyTorch columns.
"""

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    TORCH_ERROR = None
except Exception as e:  # ImportError, or a broken install
    torch = None
    TORCH_ERROR = f"{type(e).__name__}: {e}"

# ---------------------------------------------------------------------------------------------
# PyTorch workloads: regex on "<kernel>/<variant>" -> factory(match, n) -> zero-arg callable.
# Inputs mirror bench_common.hpp: log-probs in [-10, 0], ~80% masks (float 0/1, as TRL builds
# them, or weights in [0.5, 1.5) for *_f32 masks), logits in [-10, 10] for the math functions.
# ---------------------------------------------------------------------------------------------

WORKLOADS = []  # (compiled regex, factory)


def workload(pattern):
    def register(factory):
        WORKLOADS.append((re.compile(pattern + r"$"), factory))
        return factory
    return register


DTYPES = {"f32": "float32", "f64": "float64"}


def _dtype(name):
    return getattr(torch, DTYPES[name])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _uniform(shape, lo, hi, dtype, seed):
    return torch.empty(shape, dtype=dtype).uniform_(lo, hi, generator=_gen(seed))


def _mask(shape, kind, dtype, seed, keep=0.8):
    keepm = torch.rand(shape, generator=_gen(seed)) < keep
    if kind == "f32":  # per-token weights
        return (0.5 + torch.rand(shape, generator=_gen(seed + 1))).to(dtype) * keepm.to(dtype)
    return keepm.to(dtype)  # uint8 mask in C++; TRL multiplies by a float mask


@workload(r"log_sigmoid/(f32|f64)/array(_wide)?")
def _logsigmoid(m, n):
    x = _uniform(n, -40 if m[2] else -10, 40 if m[2] else 10, _dtype(m[1]), 11)
    return lambda: F.logsigmoid(x)


@workload(r"copy/(f32|f64)/array")
def _copy(m, n):
    x = _uniform(n, -10, 10, _dtype(m[1]), 11)
    return lambda: x.clone()


@workload(r"sigmoid/(f32|f64)/array")
def _sigmoid(m, n):
    x = _uniform(n, -10, 10, _dtype(m[1]), 11)
    return lambda: torch.sigmoid(x)


@workload(r"softplus/(f32|f64)/array")
def _softplus(m, n):
    x = _uniform(n, -10, 10, _dtype(m[1]), 11)
    return lambda: F.softplus(x)


@workload(r"log1mexp/(f32|f64)/array")
def _log1mexp(m, n):
    # No torch.log1mexp: the two-branch form a PyTorch user writes.
    x = _uniform(n, -10, 0, _dtype(m[1]), 11)
    ln2 = math.log(2.0)
    return lambda: torch.where(x > -ln2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tokens(m, n, seed=21):
    dt, kind, batch = _dtype(m["tok"]), m["mask"], int(m["batch"])
    shape = (batch, n // batch)
    return _uniform(shape, -10, 0, dt, seed), _mask(shape, kind, dt, seed + 7), _uniform(batch, -1, 1, dt, seed + 9)


_RED = r"(?P<tok>f32|f64)_(?P<mask>u8|f32)/B(?P<batch>\d+)"


@workload(r"masked_sum/" + _RED)
def _masked_sum(m, n):
    logp, mask, _ = _tokens(m, n)
    return lambda: (logp * mask).sum(-1)  # TRL: (per_token_logps * loss_mask).sum(-1)


@workload(r"masked_mean/" + _RED)
def _masked_mean(m, n):
    logp, mask, _ = _tokens(m, n)
    return lambda: (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@workload(r"masked_sum_backward/" + _RED)
def _masked_sum_backward(m, n):
    # What autograd computes for d/dlogp of (logp * mask).sum(-1) given upstream: expand * mask.
    _, mask, up = _tokens(m, n)
    return lambda: up.unsqueeze(-1) * mask


@workload(r"masked_mean_backward/" + _RED)
def _masked_mean_backward(m, n):
    _, mask, up = _tokens(m, n)
    return lambda: (up / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1) * mask


def _grad_leaf(t):
    return t.clone().requires_grad_(True)


@workload(r"dpo_fwd_bwd/" + _RED)
def _dpo(m, n):
    # TRL dpo_loss (sigmoid, beta 0.1) on (logp * mask).sum(-1) with float masks, then autograd
    # for d loss / d logp of both sides: its fastest eager form (autograd.grad, no accumulation).
    lc, mc, _ = _tokens(m, n, 31)
    lr, mr, _ = _tokens(m, n, 32)
    lc, lr = _grad_leaf(lc), _grad_leaf(lr)
    batch, dt = int(m["batch"]), _dtype(m["tok"])
    rc, rr = _uniform(batch, -500, -100, dt, 33), _uniform(batch, -500, -100, dt, 34)
    beta = 0.1

    def step():
        sc, sr = (lc * mc).sum(-1), (lr * mr).sum(-1)
        logits = (sc - sr) - (rc - rr)
        loss = -F.logsigmoid(beta * logits).mean()
        with torch.no_grad():  # the metrics TRL logs
            cr, rj = beta * (sc - rc), beta * (sr - rr)
            _ = (cr > rj).float().mean(), (cr - rj).mean()
        return torch.autograd.grad(loss, [lc, lr])
    return step


def _ppo_inputs(m, n):
    """The PPO rows' inputs: logp (a grad leaf), mask, old_logp within 0.3 of it, advantages."""
    logp, mask, _ = _tokens(m, n, 41)
    shape, dt = logp.shape, logp.dtype
    old = (logp + _uniform(shape, -0.3, 0.3, dt, 43)).detach()
    adv = _uniform(shape, -2, 2, dt, 42)
    return _grad_leaf(logp), mask, old, adv


def _ppo_step(m, n, dual_clip):
    # verl compute_policy_loss_vanilla (clip 0.2/0.2, log-ratio clamp 20; dual clip c for A < 0
    # when given) with agg_loss token-mean and its logged metrics (pg_clipfrac, ppo_kl, and
    # pg_clipfrac_lower with the dual clip), then autograd d/d logp.
    logp, mask, old, adv = _ppo_inputs(m, n)

    def step():
        neg_kl = torch.clamp(logp - old, -20.0, 20.0)
        ratio = torch.exp(neg_kl)
        l1 = -adv * ratio
        l2 = -adv * torch.clamp(ratio, 0.8, 1.2)
        pg = clip1 = torch.maximum(l1, l2)
        if dual_clip is not None:
            l3 = -adv * dual_clip
            pg = torch.where(adv < 0, torch.min(l3, clip1), clip1)
        denom = mask.sum()
        loss = (pg * mask).sum() / denom
        with torch.no_grad():
            _ = (torch.gt(l2, l1).float() * mask).sum() / denom, (-neg_kl * mask).sum() / denom
            if dual_clip is not None:
                _ = ((torch.gt(clip1, l3) * (adv < 0).float()) * mask).sum() / denom
        return torch.autograd.grad(loss, [logp])
    return step


@workload(r"ppo_(fwd_bwd|fused)/" + _RED)
def _ppo(m, n):
    # bench_losses.cpp's PPO rows: no dual clip.
    return _ppo_step(m, n, None)


@workload(r"torch_dpo_(adapter|libtorch|core|core2pass)/" + _RED)
def _torch_dpo(m, n):
    # bench_torch.cpp's DPO rows ([64, 2048] a side; adapter, libtorch, core): the same TRL
    # dpo_loss in PyTorch eager as the dpo_fwd_bwd rows, so the torch columns read the Python cost
    # of the formula the C++ libtorch row runs.
    return _dpo(m, n)


@workload(r"torch_ppo_(adapter|libtorch|core|core2pass)/" + _RED)
def _torch_ppo(m, n):
    # bench_torch.cpp's PPO rows: verl's loss as verl runs it, with the dual clip (clip_ratio_c 3).
    return _ppo_step(m, n, 3.0)


_LOGITS = r"/f32/N(?P<N>\d+)_V(?P<V>\d+)"


def _logits(m, seed=51):
    # bench_logits.cpp's inputs: Gaussian logits (sd 3), uniform labels, an upstream gradient.
    N, V = int(m["N"]), int(m["V"])
    z = (torch.randn(N, V, generator=_gen(seed)) * 3).requires_grad_(True)
    y = torch.randint(0, V, (N, 1), generator=_gen(seed + 1))
    return z, y, _uniform(N, -1, 1, torch.float32, seed + 2), _uniform(N, -2, 2, torch.float32, seed + 3)


def _selective_log_softmax(z, y):
    # TRL selective_log_softmax (trl/trainer/utils.py) for float32: log_softmax then gather.
    return torch.log_softmax(z, -1).gather(-1, y).squeeze(-1)


def _entropy_from_logits(z):
    # verl entropy_from_logits (verl/utils/torch_functional.py): logsumexp - sum(softmax * z).
    pd = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (pd * z).sum(-1)


@workload(r"logprobs_fwd_bwd(_masked50)?" + _LOGITS)
def _logprobs(m, n):
    # Every token's row is computed: TRL and verl mask the loss, not the log-softmax.
    z, y, g, _ = _logits(m)
    return lambda: torch.autograd.grad((_selective_log_softmax(z, y) * g).sum(), [z])


@workload(r"logprobs_entropy_fwd_bwd" + _LOGITS)
def _logprobs_entropy(m, n):
    z, y, g, gh = _logits(m)
    return lambda: torch.autograd.grad((_selective_log_softmax(z, y) * g).sum() + (_entropy_from_logits(z) * gh).sum(),
                                       [z])


@workload(r"ppo_logits_(fused|3pass)" + _LOGITS)
def _ppo_logits(m, n):
    # verl dp_actor's update: log-probs and entropy from the logits, compute_policy_loss_vanilla
    # (clip 0.2/0.2, log-ratio clamp 20) and agg_loss token-mean, minus 0.01 * the aggregated
    # entropy, then autograd to the logits.
    z, y, _, adv = _logits(m)
    N = z.shape[0]
    mask = (torch.rand(N, generator=_gen(55)) < 0.8).float()
    with torch.no_grad():
        old = _selective_log_softmax(z, y) + _uniform(N, -0.3, 0.3, torch.float32, 56)

    def step():
        logp = _selective_log_softmax(z, y)
        ent = _entropy_from_logits(z)
        neg_kl = torch.clamp(logp - old, -20.0, 20.0)
        ratio = torch.exp(neg_kl)
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        denom = mask.sum()
        loss = (pg * mask).sum() / denom - 0.01 * (ent * mask).sum() / denom
        return torch.autograd.grad(loss, [z])
    return step


@workload(r"linear_logprobs_fwd_bwd/(?P<tok>f32|f64)/N(?P<N>\d+)_H(?P<H>\d+)")
def _linear_logprobs(m, n):
    # The LM head as trainers write it: logits = hidden @ weight.T materialized [N, V],
    # log_softmax, gather at the labels, autograd to hidden and weight (every token selected, as
    # in the C++ row). Inputs as bench_linear_logprobs.cpp: unit-variance hidden states, weight
    # of variance 1 / H, upstream gradients in [-1, 1]. Autograd holds at least the logits, the
    # log_softmax output and its gradient, and the logits' gradient: 4 [N, V] tensors.
    N, H = int(m["N"]), int(m["H"])
    V, dt = n // N, _dtype(m["tok"])
    a, b = math.sqrt(3.0), math.sqrt(3.0 / H)
    hidden = _grad_leaf(_uniform((N, H), -a, a, dt, 61))
    weight = _grad_leaf(_uniform((V, H), -b, b, dt, 62))
    up = _uniform(N, -1, 1, dt, 63)
    labels = torch.randint(0, V, (N,), generator=_gen(64))

    def step():
        logits = hidden @ weight.T
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return torch.autograd.grad(logp, [hidden, weight], grad_outputs=up)
    return step


def find_workload(kernel):
    for rx, factory in WORKLOADS:
        m = rx.match(kernel)
        if m:
            return m, factory
    return None, None


def time_torch(fn, reps, clock, budget=0.5, min_sample=0.002):
    """Best seconds per call over at least `reps` samples (more while within `budget` seconds of
    wall time); each sample repeats the call until it lasts min_sample. `clock` is
    time.thread_time for 1 thread (CPU time, like the C++ side: preemption by other processes is
    not counted) and time.perf_counter for several threads (their CPU time would add up)."""
    fn()  # warm-up (allocator, thread pool)
    t0 = clock()
    fn()
    once = max(clock() - t0, 1e-7)
    k = max(1, int(min_sample / once))
    best, samples, start = float("inf"), 0, time.perf_counter()
    while samples < reps or (time.perf_counter() - start < budget and samples < 20 * reps):
        t0 = clock()
        for _ in range(k):
            fn()
        best = min(best, (clock() - t0) / k)
        samples += 1
    return best


# ---------------------------------------------------------------------------------------------
# C++ side
# ---------------------------------------------------------------------------------------------

UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def run_cpp(binary, args):
    cmd = [binary, "--benchmark_format=json"] + args
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"{binary} failed ({p.returncode}):\n{p.stderr}")
    data = json.loads(p.stdout)
    stream = float(data["context"].get("prefloss_stream_read_bytes_per_second", "nan"))
    rows = {}
    for b in data["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
            continue
        name = b.get("run_name", b["name"])
        name = re.sub(r"(/(real_time|process_time|threads:\d+|repeats:\d+))+$", "", name)
        kernel, _, size = name.rpartition("/")
        if not size.isdigit():
            continue
        if kernel == "stream_read/f32":  # every binary has one; keep them apart
            kernel += f" ({os.path.basename(binary)})"
        sec = b["cpu_time"] * UNIT[b["time_unit"]]  # single-threaded: CPU time (see bench_common.hpp)
        key = (kernel, int(size))
        if key not in rows or sec < rows[key]["sec"]:  # best repetition
            rows[key] = {"sec": sec, "bytes_per_s": b.get("bytes"), "binary": os.path.basename(binary)}
    # The ceiling: the better of the startup calibration and the best stream_read/f32 repetition
    # of this run (on a shared machine either can catch a busy moment); every row's roofline is
    # recomputed against it.
    for (kernel, _), r in rows.items():
        if kernel.startswith("stream_read/f32") and r["bytes_per_s"]:
            stream = max(stream, r["bytes_per_s"]) if stream == stream else r["bytes_per_s"]
    for r in rows.values():
        r["roofline"] = r["bytes_per_s"] / stream if r["bytes_per_s"] and stream == stream else None
    return rows, stream


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def fmt_time(s):
    if s is None or isinstance(s, str):
        return s or "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_x(r):
    return "-" if r is None else ("n/a" if isinstance(r, str) else f"{r:.2f}x")


def goal_checks(rows, stream):
    """The performance goals that this table can answer, as lines of text."""
    out = []

    def t(kernel, n):
        r = rows.get((kernel, n))
        return r and r["sec"]

    sizes = sorted({n for (_, n) in rows})
    for prec in ("f32", "f64"):
        arr, sc = f"log_sigmoid/{prec}/array", f"log_sigmoid/{prec}/scalar_std"
        common = [n for n in sizes if t(arr, n) and t(sc, n)]
        if common:
            l2 = 65536 if 65536 in common else common[0]
            big = common[-1]
            out.append(f"log_sigmoid {prec} array vs scalar std loop (goal >= 5x): "
                       f"{t(sc, l2) / t(arr, l2):.1f}x at {l2} (L2), {t(sc, big) / t(arr, big):.1f}x at {big}")
        per_thread = [(n, rows[(arr, n)]["torch1"] / rows[(arr, n)]["sec"]) for n in sizes
                      if (arr, n) in rows and isinstance(rows[(arr, n)].get("torch1"), float)]
        if per_thread:
            out.append(f"log_sigmoid {prec} vs torch F.logsigmoid, 1 thread (goal >= 10x): " +
                       ", ".join(f"{r:.1f}x at {n}" for n, r in per_thread))
    for kernel in sorted({k for (k, _) in rows if k.startswith("masked_sum/f32_u8")}):
        dram = [(n, rows[(kernel, n)]["roofline"]) for n in sizes
                if (kernel, n) in rows and n * 5 >= 64 * 2**20 and rows[(kernel, n)]["roofline"] is not None]
        if dram:
            out.append(f"{kernel} roofline fraction at >= 64 MiB of tokens (goal >= 0.80): " +
                       ", ".join(f"{f:.2f} at {n}" for n, f in dram))
    for kernel, goal, floor in (("dpo_fwd_bwd/f32_u8/B256", 2.5, 0.8), ("ppo_fused/f32_u8/B256", 20.0, 0.8),
                                ("ppo_fwd_bwd/f32_u8/B256", 20.0, 0.8)):
        n = 256 * 8192
        r = rows.get((kernel, n))
        if r:
            vs = (f"{r['torch1'] / r['sec']:.1f}x PyTorch eager 1 thread (goal >= {goal:g}x)"
                  if isinstance(r.get("torch1"), float) else "PyTorch n/a")
            roof = f"{r['roofline']:.2f}" if r["roofline"] is not None else "n/a"
            out.append(f"{kernel} at 256 x 8192 tokens: roofline {roof} (goal >= {floor}), {vs}")
    # From logits (bench_logits.cpp): pass-floor fractions, PyTorch ratios, and padding.
    lg = {k.split("/")[0]: (k, n) for (k, n) in rows if "/f32/N" in k and "_V" in k}

    def lgr(name):
        key = lg.get(name)
        return key and rows[key]

    for name, goal, floor in (("logprobs_fwd_bwd", 10.0, 0.7), ("logprobs_entropy_fwd_bwd", 25.0, None),
                              ("ppo_logits_fused", None, 0.7), ("ppo_logits_3pass", None, None)):
        r = lgr(name)
        if r:
            parts = []
            if r["roofline"] is not None:
                parts.append(f"pass-floor fraction {r['roofline']:.2f}" + (f" (goal >= {floor})" if floor else ""))
            if isinstance(r.get("torch1"), float):
                parts.append(f"{r['torch1'] / r['sec']:.1f}x PyTorch eager 1 thread" +
                             (f" (goal >= {goal:g}x)" if goal else ""))
            out.append(f"{lg[name][0]}: " + ", ".join(parts))
    full, half = lgr("logprobs_fwd_bwd"), lgr("logprobs_fwd_bwd_masked50")
    if full and half:
        out.append(f"token_logprobs at 50% masked tokens: {100 * (1 - half['sec'] / full['sec']):.0f}% less time "
                   f"than at 0% (goal >= 40%)")
    fused, three = lgr("ppo_logits_fused"), lgr("ppo_logits_3pass")
    if fused and three:
        out.append(f"ppo_clip_from_logits: {three['sec'] / fused['sec']:.2f}x the three-pass composition")
    for kernel in ("masked_sum/f32_u8/B64", "log_sigmoid/f32/array", "masked_sum_backward/f32_u8/B64"):
        pts = [(n, rows[(kernel, n)]["sec"] / n * 1e9) for n in sizes if (kernel, n) in rows and 1e5 / 2 <= n <= 1e8]
        if len(pts) >= 2:
            lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
            out.append(f"{kernel} ns/token over {pts[0][0]}..{pts[-1][0]} (goal: flat): "
                       f"{lo:.3f}..{hi:.3f} (max/min {hi / lo:.2f}); " +
                       " ".join(f"{n}:{v:.3f}" for n, v in pts))
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(os.path.dirname(here), "build"),
                    help="CMake build directory holding bench/bench_* (default: ./build)")
    ap.add_argument("--bench", nargs="*", help="benchmark binaries (default: every <build>/bench/bench_*)")
    ap.add_argument("--quick", action="store_true", help="sizes up to 4Mi elements (--prefloss_quick)")
    ap.add_argument("--max-elems", type=int, help="largest token row (--prefloss_max_elems)")
    ap.add_argument("--filter", default="", help="regex for --benchmark_filter (also limits PyTorch rows)")
    ap.add_argument("--reps", type=int, default=5, help="C++ repetitions; the best is kept (default 5)")
    ap.add_argument("--min-time", type=float, default=0.05, help="C++ --benchmark_min_time per repetition")
    ap.add_argument("--torch-reps", type=int, default=7, help="PyTorch samples; the best is kept (default 7)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    ap.add_argument("--json", help="also write the joined rows to this file")
    ap.add_argument("--plot", help="also draw throughput against size to this PNG (needs gnuplot)")
    a = ap.parse_args()

    binaries = a.bench or sorted(p for p in glob.glob(os.path.join(a.build, "bench", "bench_*"))
                                 if os.access(p, os.X_OK) and not os.path.splitext(p)[1])
    if not binaries:
        sys.exit(f"no bench binaries under {a.build}/bench (build with -DPREFLOSS_BUILD_BENCH=ON)")

    args = [f"--benchmark_repetitions={a.reps}", f"--benchmark_min_time={a.min_time}"]
    if a.filter:
        args.append(f"--benchmark_filter=^stream_read/|{a.filter}")  # keep the roofline row
    if a.quick:
        args.append("--prefloss_quick")
    if a.max_elems:
        args.append(f"--prefloss_max_elems={a.max_elems}")

    rows, streams = {}, {}
    for b in binaries:
        r, s = run_cpp(b, args)
        rows.update(r)
        streams[os.path.basename(b)] = s

    use_torch = torch is not None and not a.no_torch
    na = ("n/a (torch not installed)" if torch is None else "n/a (--no-torch)") if not use_torch else None
    all_threads = os.cpu_count() or 1
    for (kernel, n), row in sorted(rows.items()):
        m, factory = find_workload(kernel)
        if factory is None:
            row["torch1"] = row["torchN"] = None
            continue
        if not use_torch:
            row["torch1"] = row["torchN"] = na
            continue
        fn = factory(m, n)
        torch.set_num_threads(1)
        row["torch1"] = time_torch(fn, a.torch_reps, time.thread_time)
        torch.set_num_threads(all_threads)
        row["torchN"] = time_torch(fn, a.torch_reps, time.perf_counter)
        del fn
        print(f"  torch {kernel}/{n}: {fmt_time(row['torch1'])} (1t), {fmt_time(row['torchN'])} ({all_threads}t)",
              file=sys.stderr, flush=True)

    # ---- the table
    hdr = ["kernel", "size", "prefloss", "ns/token", "torch 1t", f"torch {all_threads}t", "x vs 1t",
           f"x vs {all_threads}t", "roofline"]
    table = []
    def speedup(t, s):
        return t if t is None or isinstance(t, str) else t / s

    for (kernel, n), row in sorted(rows.items(), key=lambda kv: (not kv[0][0].startswith("stream_read/"), kv[0])):
        table.append([kernel, str(n), fmt_time(row["sec"]), f"{row['sec'] / n * 1e9:.3f}",
                      fmt_time(row["torch1"]), fmt_time(row["torchN"]),
                      fmt_x(speedup(row["torch1"], row["sec"])), fmt_x(speedup(row["torchN"], row["sec"])),
                      "-" if row["roofline"] is None else f"{row['roofline']:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(hdr)]
    print()
    print("streaming-read roofline (best of the startup calibration and the stream_read/f32 row, per binary): " +
          ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in streams.items()))
    if torch is not None:
        print(f"PyTorch {torch.__version__}, eager CPU, best of >= {a.torch_reps} samples; threads: 1 (CPU time) and "
              f"{all_threads} (wall time; slow whenever another process holds a core)")
    else:
        print(f"PyTorch: not installed ({TORCH_ERROR})")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(hdr, widths)))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()
    print("prefloss = best of the C++ repetitions, CPU time (single-threaded); x vs Nt = PyTorch time / prefloss"
          " time; roofline = prefloss bytes/s / streaming-read bytes/s")
    for g in goal_checks(rows, streams):
        print("goal: " + g)

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"streams": streams, "rows": [dict(kernel=k, size=n, **v) for (k, n), v in sorted(rows.items())]},
                      f, indent=1)
    if a.plot:
        plot(rows, streams, a.plot)


PLOT_KERNELS = [  # (kernel, label): the main kernels of the README plot
    ("masked_sum/f32_u8/B64", "masked\\_sum f32+u8"),
    ("masked_sum_backward/f32_u8/B64", "masked\\_sum backward"),
    ("log_sigmoid/f32/array", "log\\_sigmoid f32 array"),
    ("dpo_fwd_bwd/f32_u8/B256", "DPO fwd+bwd"),
    ("ppo_fused/f32_u8/B256", "PPO-clip fused fwd+bwd"),
]


def plot(rows, streams, path):
    """Floor bytes/s against elements per call for PLOT_KERNELS, the streaming-read roofline drawn
    as a horizontal line; gnuplot's pngcairo terminal."""
    import shutil
    import tempfile
    if not shutil.which("gnuplot"):
        print("--plot: gnuplot not found (apt-get install gnuplot-nox); no picture", file=sys.stderr)
        return
    roof = max(streams.values()) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        series = []
        for kernel, label in PLOT_KERNELS:
            pts = sorted((n, r["bytes_per_s"] / 1e9) for (k, n), r in rows.items() if k == kernel and r["bytes_per_s"])
            if not pts:
                continue
            f = os.path.join(tmp, f"s{len(series)}.dat")
            with open(f, "w") as fh:
                fh.writelines(f"{n} {v}\n" for n, v in pts)
            series.append((f, label))
        if not series:
            print("--plot: none of the plotted kernels ran", file=sys.stderr)
            return
        cmds = [
            "set terminal pngcairo size 1000,600 font ',11'",
            f"set output '{path}'",
            "set logscale x", "set format x '10^{%L}'", "set grid",
            "set xlabel 'elements (tokens) per call'", "set ylabel 'GB/s (bytes that must move)'",
            "set key outside right top", "set yrange [0:*]",
            "set title 'prefloss throughput against size, one thread'",
            "plot " + ", ".join([f"'{f}' using 1:2 with linespoints lw 2 title '{lab}'" for f, lab in series] +
                                [f"{roof} with lines dt 2 lw 2 lc 'black' title 'streaming read ({roof:.1f} GB/s)'"]),
        ]
        subprocess.run(["gnuplot"], input="\n".join(cmds) + "\n", text=True, check=True)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
