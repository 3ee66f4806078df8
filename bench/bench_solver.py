"""Where the time of a SparseGPT prune goes, and how close it is to the arithmetic floor.

Two measurements, each within one process:

1. ``shared``: the solver part of pruning (Hessians, factorizations, column sweeps: everything
   but the calibration forwards; ``PruneResult.solver_seconds`` + the Hessian time measured
   here) with shared Hessians
   (q/k/v and gate/up: one Hessian, one factorization, one stacked sweep) against one matrix
   at a time (``per_layer``: a Hessian, a factorization and a sweep per layer, as the
   SparseGPT reference code does: ``shared_hessians=False``), the runs interleaved over
   ``--repeats`` (medians). Target: shared / per_layer <= 0.6.
2. ``floor``: the FLOPs of a whole prune (calibration forwards, Hessians, factorizations,
   sweeps), counted from the model's shapes, divided by the machine's matmul rate measured in
   the same run (before and after the prune; the mean is used) give the floor in seconds; the
   prune's measured time over it is "x× the floor", overall and per phase.
   Target: <= 1.3× with 32 × 2048 calibration. ``--profile`` adds the torch profiler's top ops.

    PYTHONPATH=. .venv/bin/python bench/bench_solver.py shared --samples 8 --seqlen 512
    PYTHONPATH=. .venv/bin/python bench/bench_solver.py floor --samples 8 --seqlen 512
    PYTHONPATH=. .venv/bin/python bench/bench_solver.py floor --samples 32 --seqlen 2048  # target setting

The matmul part of the count (the linear layers of the forwards, the lazy sweep updates)
equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for a 2-block prune.

Phase times come from wrapping ``HessianAccumulator.add`` and ``inverse_hessian_factor`` with
timers in this script (which synchronize CUDA around each call: the package's own code never
waits for the device to time itself); the sweeps are the rest of ``solver_seconds``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils import solver as solver_mod  # noqa: E402
from sparsegpt_utils.data import calibration_windows, default_data_dir  # noqa: E402
from sparsegpt_utils.models import get_adapter, load_model  # noqa: E402
from sparsegpt_utils.prune import PruneConfig, prune_model  # noqa: E402
from sparsegpt_utils.results import write_json_atomic  # noqa: E402


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (needs the ``tabulate`` package), else as plain text."""
    try:
        return table.to_markdown(index=False)
    except ImportError:
        return table.to_string(index=False)


# ---------------------------------------------------------------- FLOP count

def prune_flops(model, samples: int, seqlen: int, blocksize: int = 128, shared: bool = True) -> dict:
    """FLOPs (multiply and add counted as 2) of a whole SparseGPT prune, by phase.

    forwards: each block runs the calibration tokens twice (Hessians, then its outputs; the
      last block once): 2 · (linear params) per token, plus causal attention
      (QKᵀ and AV over on average seqlen/2 keys: 2 · 2 · seqlen/2 · heads · head_dim per token).
    hessians: ``2 n d²`` per Hessian (one per input group when shared, else one per layer, as
      the pipeline collects them with ``shared_hessians=False``).
    factorizations: Cholesky (d³/3), its inverse (2d³/3), Cholesky again (d³/3) per Hessian.
    sweeps: per matrix [r, c] and lazy block of B columns: in-block rank-1 updates
      2·r·(B − i) for its column i, and the block's update of all later columns 2·r·B·(columns
      left) (≈ r·c² in all).
    Norms, activations, rotary embeddings and mask selection are left out (all O(n·d)).
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    cfg = model.config
    n = samples * seqlen
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = {"forwards": 0.0, "hessians": 0.0, "factorizations": 0.0, "sweeps": 0.0}
    for i, block in enumerate(blocks):
        groups = adapter.linear_groups(block)
        params = sum(m.weight.numel() for g in groups for _, m in g)
        per_token = 2 * params + 2 * 2 * (seqlen / 2) * heads * head_dim
        passes = 2 if i + 1 < len(blocks) else 1
        out["forwards"] += passes * n * per_token
        for g in groups:
            d = g[0][1].in_features
            solves = 1 if shared else len(g)  # Hessians and factorizations alike
            out["hessians"] += solves * 2 * n * d * d
            out["factorizations"] += solves * (4 / 3) * d**3
            for _, m in g:
                r, c = m.weight.shape
                for i1 in range(0, c, blocksize):
                    count = min(blocksize, c - i1)
                    out["sweeps"] += 2 * r * count * (count + 1) / 2 + 2 * r * count * (c - i1 - count)
    out["total"] = sum(out.values())
    return out


def matmul_rate(threads: int, seconds: float = 2.0) -> float:
    """Best float32 GEMM rate (FLOP/s) over shapes like the prune's (a block's linear layers on
    2048 tokens, a Hessian update, a square GEMM), each timed for about ``seconds / 3``."""
    torch.set_num_threads(threads)
    shapes = [(2048, 576, 1536), (576, 2048, 576), (2048, 2048, 2048)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(shapes):
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------- phase timers

@contextmanager
def phase_timers():
    """Time ``HessianAccumulator.add`` and ``inverse_hessian_factor`` while pruning."""
    times = {"hessians": 0.0, "factorizations": 0.0}
    acc_add, factor = solver_mod.HessianAccumulator.add, solver_mod.inverse_hessian_factor

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_add(self, *a, **k):
        sync()  # the forward that produced the input is not the Hessian's time
        t0 = time.perf_counter()
        acc_add(self, *a, **k)
        sync()
        times["hessians"] += time.perf_counter() - t0

    def timed_factor(*a, **k):
        t0 = time.perf_counter()
        res = factor(*a, **k)
        times["factorizations"] += time.perf_counter() - t0
        return res

    solver_mod.HessianAccumulator.add = timed_add
    solver_mod.inverse_hessian_factor = timed_factor  # sparsegpt_solve looks it up at call time
    try:
        yield times
    finally:
        solver_mod.HessianAccumulator.add = acc_add
        solver_mod.inverse_hessian_factor = factor


# mode -> PruneConfig.shared_hessians
MODES = {
    "shared": True,  # one Hessian, factorization and sweep per input group (q/k/v, gate/up)
    "per_layer": False,  # a Hessian, a factorization and a sweep per layer, as the reference code
}


def timed_prune(base, calib, mode: str = "shared", method: str = "sparsegpt") -> dict:
    shared = MODES[mode]
    model = copy.deepcopy(base)
    with phase_timers() as times:
        res = prune_model(model, calib, PruneConfig(method=method, density=0.5, shared_hessians=shared),
                          progress=False)
    # solver_seconds: factorizations + sweeps; the Hessians are accumulated during the forwards
    solver = res.solver_seconds + times["hessians"]
    sweeps = res.solver_seconds - times["factorizations"]
    return {"total": res.seconds, "solver": solver, "forwards": res.seconds - solver,
            "hessians": times["hessians"], "factorizations": times["factorizations"], "sweeps": sweeps}


# ---------------------------------------------------------------- commands

def bench_shared(base, calib, repeats: int) -> pd.DataFrame:
    """Measured medians per part, and ``flop_ratio``: the same ratio in arithmetic (the count of
    :func:`prune_flops` with and without sharing), which timing alone can beat only through
    per-call overhead."""
    modes = list(MODES)
    samples, seqlen = calib.shape
    flops = {m: prune_flops(base, samples, seqlen, shared=MODES[m]) for m in modes}
    for f in flops.values():
        f["solver"] = f["hessians"] + f["factorizations"] + f["sweeps"]
    runs = {m: [] for m in modes}
    for r in range(repeats):  # interleaved, rotating which goes first
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            runs[mode].append(timed_prune(base, calib, mode))
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in runs[mode][-1].items())
            print(f"repeat {r}: {mode}: {parts}", flush=True)
    rows = []
    for key in ("solver", "hessians", "factorizations", "sweeps", "forwards", "total"):
        med = {m: statistics.median(x[key] for x in runs[m]) for m in modes}
        row = {"part": key, **{f"{m}_s": round(v, 2) for m, v in med.items()}}
        for m in modes[1:]:
            row[f"shared/{m}"] = round(med["shared"] / med[m], 3) if med[m] else float("nan")
        if key in flops["shared"]:
            row["flop_ratio"] = round(flops["shared"][key] / flops["per_layer"][key], 3)
        rows.append(row)
    return pd.DataFrame(rows)


def bench_floor(base, calib, threads: int, profile: bool) -> pd.DataFrame:
    samples, seqlen = calib.shape
    rate_before = matmul_rate(threads)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            t = timed_prune(base, calib, "shared")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    else:
        t = timed_prune(base, calib, "shared")
    rate_after = matmul_rate(threads)
    rate = (rate_before + rate_after) / 2
    flops = prune_flops(base, samples, seqlen)
    print(f"matmul rate: {rate_before / 1e9:.1f} GFLOP/s before, {rate_after / 1e9:.1f} after "
          f"({threads} threads); calibration {samples} x {seqlen}")
    rows = []
    for key in ("forwards", "hessians", "factorizations", "sweeps", "total"):
        floor = flops[key] / rate
        rows.append({"phase": key, "gflop": round(flops[key] / 1e9, 1), "floor_s": round(floor, 2),
                     "measured_s": round(t[key], 2), "x_floor": round(t[key] / floor, 2)})
    return pd.DataFrame(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["shared", "floor"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=None,
                   help="text source (default: wikitext2-valid if at hand, else stdlib)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=None,
                   help="keep only the first BLOCKS decoder blocks (every block has the same shapes, so "
                        "ratios carry over to the whole model at a fraction of the time)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: steadier timings on a shared machine)")
    p.add_argument("--profile", action="store_true", help="floor: print the torch profiler's top ops")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base, tok = load_model(args.model)
    if args.blocks is not None:
        blocks = get_adapter(base).blocks(base)
        if not 1 <= args.blocks <= len(blocks):
            p.error(f"--blocks must be in [1, {len(blocks)}], got {args.blocks}")
        del blocks[args.blocks:]
        base.config.num_hidden_layers = args.blocks
    d = default_data_dir()
    have_valid = d is not None and (d / "wikitext-2" / "valid.txt").is_file()
    source = args.calib or ("wikitext2-valid" if have_valid else "stdlib")
    calib = calibration_windows(tok, source, args.samples, args.seqlen, seed=0)
    print(f"{args.model} ({len(get_adapter(base).blocks(base))} blocks), calibration {source} "
          f"{args.samples} x {args.seqlen}, {args.threads} threads")
    if args.what == "shared":
        table = bench_shared(base, calib, args.repeats)
    else:
        table = bench_floor(base, calib, args.threads, args.profile)
    print(markdown(table))
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "rows": table.to_dict("records")})
    return table


if __name__ == "__main__":
    main()
