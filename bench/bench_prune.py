"""Prune smollm2-135m with SparseGPT, Wanda and magnitude; perplexity, achieved density,
prune seconds and peak memory, as one table (README: "One-shot pruning").

    python bench/bench_prune.py                      # 32 × 2048 calibration, 32 eval windows
    python bench/bench_prune.py --calib-samples 8 --seqlen 512 --eval-windows 8   # quick

Each row runs in its own process, so its peak resident memory is its own (model load
included), and is appended to ``--out`` as soon as it finishes: a stopped run resumes
where it left off, skipping rows already measured with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils.experiment import Experiment, evaluate_model, peak_rss_mb, run_experiment  # noqa: E402
from sparsegpt_utils.models import load_model  # noqa: E402
from sparsegpt_utils.results import append_csv_row  # noqa: E402

CONFIGS = [  # (method, density, nm)
    ("dense", 1.0, None),
    ("sparsegpt", 0.5, None), ("sparsegpt", None, "2:4"), ("sparsegpt", 0.3, None),
    ("sparsegpt", 0.1, None), ("wanda", 0.5, None), ("magnitude", 0.5, None),
]
SETTINGS = ("model", "calib", "calib_samples", "seqlen", "eval", "eval_windows")  # shared by all rows


def row_key(args, method: str, density: float | None, nm: str | None) -> dict:
    """What a row was asked to measure: rows agreeing on all of it are the same measurement."""
    return {"method": method, "density": density, "nm": nm, **{k: getattr(args, k) for k in SETTINGS}}


def measure_row(args, method: str, density: float | None, nm: str | None) -> dict:
    """One configuration, in this process: returns its table row."""
    model, tok = load_model(args.model)
    row = {**row_key(args, method, density, nm), "threads": torch.get_num_threads()}
    if method == "dense":
        t0 = time.perf_counter()
        ppl = evaluate_model(model, tok, args.eval, args.eval_windows, args.seqlen, "cpu", False)
        row.update(density_achieved=1.0, sparsity_achieved=0.0, ppl=ppl.ppl, prune_seconds=0.0,
                   eval_seconds=time.perf_counter() - t0)
    else:
        exp = Experiment(model=args.model, method=method, density=density, nm=nm, calib=args.calib,
                         calib_samples=args.calib_samples, seqlen=args.seqlen, eval=None,
                         device="cpu", progress=False)
        result, _, pruned = run_experiment(exp, model, tok)
        del model
        t0 = time.perf_counter()
        ppl = evaluate_model(pruned, tok, args.eval, args.eval_windows, args.seqlen, "cpu", False)
        row.update(density_achieved=result["density_achieved"],
                   sparsity_achieved=result["sparsity_achieved"], ppl=ppl.ppl,
                   prune_seconds=result["prune_seconds"], eval_seconds=time.perf_counter() - t0)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def _done(out: Path, key: dict) -> bool:
    if not out.exists() or out.stat().st_size == 0:
        return False
    table = pd.read_csv(out)
    for k, v in key.items():
        if k not in table:
            return False
        table = table[table[k].isna()] if v is None else table[table[k].astype(str) == str(v)]
    return len(table) > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default="results/bench_prune.csv")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one configuration
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.row:
        method, density, nm = json.loads(args.row)
        print("ROW_JSON " + json.dumps(measure_row(args, method, density, nm)), flush=True)
        return

    out = Path(args.out)
    for method, density, nm in CONFIGS:
        key = row_key(args, method, density, nm)
        if _done(out, key):
            print(f"{method} {density or nm}: already in {out}, skipped", flush=True)
            continue
        argv = [sys.executable, __file__, "--row", json.dumps([method, density, nm])]
        for name in SETTINGS:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        proc = subprocess.run(argv, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW_JSON ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} {density or nm} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1][len("ROW_JSON "):])
        append_csv_row(out, row)
        print(row, flush=True)

    table = pd.read_csv(out)
    mine = table
    for k in SETTINGS:
        mine = mine[mine[k].astype(str) == str(getattr(args, k))]
    print(f"\n{args.model}: calibration {args.calib_samples} × {args.seqlen} tokens of {args.calib} "
          f"(seed 0); perplexity on the first {args.eval_windows} windows of {args.seqlen} of {args.eval}")
    shown = ["method", "density", "nm", "density_achieved", "sparsity_achieved", "ppl",
             "prune_seconds", "peak_rss_mb"]
    print(mine[shown].to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
