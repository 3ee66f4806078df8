"""Prune smollm2-135m with SparseGPT, Wanda and magnitude; perplexity, achieved density,
prune seconds and peak memory, as one table (README: "One-shot pruning").

    python bench/bench_prune.py                      # 32 × 2048 calibration, 32 eval windows
    python bench/bench_prune.py --calib-samples 8 --seqlen 512 --eval-windows 8   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils.experiment import Experiment, evaluate_model, peak_rss_mb, run_experiment  # noqa: E402
from sparsegpt_utils.models import load_model  # noqa: E402
from sparsegpt_utils.results import atomic_write_text  # noqa: E402

CONFIGS = [  # (method, density, nm)
    ("sparsegpt", 0.5, None), ("sparsegpt", None, "2:4"), ("sparsegpt", 0.3, None),
    ("sparsegpt", 0.1, None), ("wanda", 0.5, None), ("magnitude", 0.5, None),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default="results/bench_prune.csv")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    dense = evaluate_model(model, tok, args.eval, args.eval_windows, args.seqlen, "cpu", False)
    rows = [{"method": "dense", "density": 1.0, "nm": None, "density_achieved": 1.0,
             "sparsity_achieved": 0.0, "ppl": dense.ppl, "prune_seconds": 0.0,
             "eval_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}]
    print(f"dense: {dense}", flush=True)
    for method, density, nm in CONFIGS:
        exp = Experiment(model=args.model, method=method, density=density, nm=nm, calib=args.calib,
                         calib_samples=args.calib_samples, seqlen=args.seqlen, eval=args.eval,
                         eval_windows=args.eval_windows, device="cpu", progress=False)
        result, _, _ = run_experiment(exp, model, tok)
        rows.append({k: result.get(k) for k in rows[0]})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["sparsity_achieved"] = 1 - table["density_achieved"]
    atomic_write_text(args.out, table.to_csv(index=False))
    print(f"\n{args.model}: calibration {args.calib_samples} × {args.seqlen} tokens of {args.calib} "
          f"(seed 0); perplexity on the first {args.eval_windows} windows of {args.seqlen} of {args.eval}")
    print(table.drop(columns=["eval_seconds"]).to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
