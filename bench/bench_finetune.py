"""Fine-tuning throughput on CPU: tokens/s of each variant against the baseline, same process.

    SPARSEGPT_DATA_DIR=../shared/data PYTHONPATH=. .venv/bin/python bench/bench_finetune.py \
        --batch-size 2 --seqlen 256 --steps 4 --rounds 3

smollm2-135m pruned to density 0.5 (magnitude: the pattern only matters for its cost), LM +
token-KL against the dense teacher, windows of WikiText-2 validation. Every variant runs
``--steps`` optimizer steps of ``finetune`` from the same pruned weights with the same windows;
the variants are interleaved round by round and each one's step time is the median over its
rounds of the steps after the first (warm-up). Quality against the baseline (same windows, same
start): the largest relative difference of the per-step losses, and the cosine between the
weight change of the variant and of the baseline over the run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from sparsegpt_utils.data import calibration_windows_from_ids, tokenize_text
from sparsegpt_utils.finetune import FinetuneConfig, finetune
from sparsegpt_utils.iterative import training_text
from sparsegpt_utils.models import load_model, pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.results import write_csv_atomic

MODEL = "smollm2-135m"
# name -> FinetuneConfig changes; "baseline" is today's default
VARIANTS = {
    "baseline": {},
    "fused AdamW": {"adamw": "fused"},
    "foreach AdamW": {"adamw": "foreach"},
    "bf16 teacher": {"teacher_dtype": "bfloat16"},
    "bf16 autocast": {"mixed_precision": "bf16"},
    "bf16 autocast + bf16 teacher + fused": {"mixed_precision": "bf16", "teacher_dtype": "bfloat16",
                                             "adamw": "fused"},
}


def accelerator_for(mixed_precision: str) -> Accelerator:
    """An Accelerator with this precision; accelerate keeps one state per process, so it is reset."""
    AcceleratorState._reset_state(True)
    return Accelerator(mixed_precision=mixed_precision)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round (first: warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench_finetune.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "baseline" not in names:
        raise SystemExit(f"--variants: unknown {unknown} (known: {list(VARIANTS)}); baseline is required")

    teacher, tok = load_model(MODEL, dtype="float32")
    teacher.eval().requires_grad_(False)
    train_ids = tokenize_text(tok, training_text("wikitext2-valid"))
    pruned = copy.deepcopy(teacher)
    calib = calibration_windows_from_ids(train_ids, 2, 64, 0)
    masks = prune_model(pruned, calib, PruneConfig(method="magnitude", density=0.5), progress=False).masks
    start = {n: m.weight.detach().clone() for n, m in pruned_linears(pruned).items()}
    base = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen,
                          lm_weight=1.0, kd_weight=1.0, val_windows=0, seed=0)
    tokens_per_step = args.batch_size * args.seqlen

    step_seconds = {n: [] for n in names}
    losses, deltas = {}, {}
    for r in range(args.rounds):
        for name in names:
            config = dataclasses.replace(base, **VARIANTS[name])
            model = copy.deepcopy(pruned).requires_grad_(True)
            t0 = time.perf_counter()
            res = finetune(model, train_ids, config, masks=masks, teacher=teacher,
                           accelerator=accelerator_for(config.mixed_precision), progress=False)
            if not res.masks_kept:
                raise RuntimeError(f"{name}: a pruned weight became nonzero")
            step_seconds[name] += res.log["seconds"].iloc[1:].tolist()
            if r == 0:
                losses[name] = res.log["loss"].tolist()
                deltas[name] = torch.cat([(m.weight.detach() - start[n]).flatten()
                                          for n, m in pruned_linears(model).items()])
            print(f"round {r + 1} {name}: {tokens_per_step / res.log['seconds'].iloc[1:].median():.1f} "
                  f"tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    base_tps = tokens_per_step / statistics.median(step_seconds["baseline"])
    for name in names:
        tps = tokens_per_step / statistics.median(step_seconds[name])
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["baseline"], strict=True))
        cos = float(torch.nn.functional.cosine_similarity(deltas[name], deltas["baseline"], dim=0))
        rows.append({"variant": name, "tokens_per_s": tps, "vs_baseline": tps / base_tps,
                     "step_seconds_median": statistics.median(step_seconds[name]),
                     "steps_timed": len(step_seconds[name]), "loss_rel_diff_max": loss_diff,
                     "update_cosine": cos, "model": MODEL, "batch_size": args.batch_size,
                     "seqlen": args.seqlen, "threads": args.threads, "loss": "LM + KD"})
    table = pd.DataFrame(rows)
    write_csv_atomic(args.out, table)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.drop(columns=["model", "loss"]).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
