"""Prune smollm2-135m with SparseGPT, Wanda, magnitude and ADMM, each alone or with OWL
densities, the exact update and block reconstruction; perplexity, achieved density, prune
seconds, the evaluation's seconds and peak memory, as one table (README: "One-shot pruning").

    python bench/bench_prune.py                      # 32 × 2048 calibration, 32 eval windows
    python bench/bench_prune.py --protocol p1        # the full grid: 3 methods × 4 variants × 4 densities
    python bench/bench_prune.py --calib-samples 8 --seqlen 512 --eval-windows 8 \\
        --methods sparsegpt,admm --densities 0.5,0.3 --variants plain,owl,reconstruct   # quick

A variant is ``plain`` or a ``+``-joined set of ``owl``, ``reconstruct``, ``exact`` (the exact
update), ``sublayers`` (reconstruct attention and MLP outputs) and ``pruned-targets``
(reconstruction targets from the pruned model's inputs). Each row runs in its own process, so
its peak resident memory is its own (model load included), and is appended to ``--out`` as
soon as it finishes: a stopped run resumes where it left off, skipping rows already measured
with the same settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils.data import calibration_windows, eval_tokens  # noqa: E402
from sparsegpt_utils.evaluate import density_report, overall_density, perplexity  # noqa: E402
from sparsegpt_utils.models import load_model  # noqa: E402
from sparsegpt_utils.prune import PruneConfig, prune_model  # noqa: E402
from sparsegpt_utils.results import append_csv_row  # noqa: E402

CONFIGS = [  # (method, density, nm, variant): the default table
    ("dense", 1.0, None, "plain"),
    ("sparsegpt", 0.5, None, "plain"), ("sparsegpt", None, "2:4", "plain"), ("sparsegpt", 0.3, None, "plain"),
    ("sparsegpt", 0.1, None, "plain"), ("wanda", 0.5, None, "plain"), ("magnitude", 0.5, None, "plain"),
]
P1 = {"methods": ["sparsegpt", "wanda", "admm"], "densities": ["0.5", "2:4", "0.3", "0.1"],
      "variants": ["plain", "owl", "reconstruct", "owl+reconstruct"]}
VARIANT_PARTS = {"owl", "reconstruct", "exact", "sublayers", "pruned-targets"}
SETTINGS = ("model", "calib", "calib_samples", "seqlen", "eval", "eval_windows")  # shared by all rows


def parse_variant(variant: str) -> dict:
    """'owl+reconstruct' -> the PruneConfig fields it sets."""
    parts = set() if variant == "plain" else set(variant.split("+"))
    if parts - VARIANT_PARTS:
        raise SystemExit(f"--variants: unknown {sorted(parts - VARIANT_PARTS)}; "
                         f"allowed plain or +-joined {sorted(VARIANT_PARTS)}")
    fields = {"owl": "owl" in parts, "exact_update": "exact" in parts,
              "reconstruct": bool(parts & {"reconstruct", "sublayers", "pruned-targets"})}
    if "sublayers" in parts:
        fields["reconstruct_parts"] = "sublayers"
    if "pruned-targets" in parts:
        fields["reconstruct_targets"] = "pruned-inputs"
    return fields


def row_key(args, method: str, density: float | None, nm: str | None, variant: str) -> dict:
    """What a row was asked to measure: rows agreeing on all of it are the same measurement."""
    key = {"method": method, "density": density, "nm": nm, "variant": variant,
           **{k: getattr(args, k) for k in SETTINGS}}
    # rows measured before owl_samples existed used every calibration sample: they lack the column
    key["owl_samples"] = args.owl_samples if parse_variant(variant)["owl"] else None
    key["timed_dense_eval"] = True if args.time_dense_eval and method != "dense" else None
    return key


def measure_row(args, method: str, density: float | None, nm: str | None, variant: str) -> dict:
    """One configuration, in this process: returns its table row."""
    model, tok = load_model(args.model, dtype="float32")
    row = {**row_key(args, method, density, nm, variant), "threads": torch.get_num_threads()}
    test = eval_tokens(tok, args.eval, seqlen=args.seqlen)
    if method != "dense" and args.time_dense_eval:  # the unit of prune time, in this process
        t0 = time.perf_counter()
        perplexity(model, test, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
        row["dense_eval_seconds"] = time.perf_counter() - t0
    if method != "dense":
        fields = parse_variant(variant)
        config = PruneConfig(method=method, density=density or 1.0, nm=nm, owl_samples=args.owl_samples,
                             **fields)
        calib = calibration_windows(tok, args.calib, args.calib_samples, args.seqlen, 0)
        t0 = time.perf_counter()
        result = prune_model(model, calib, config, device="cpu", progress=False)
        row["prune_seconds"] = time.perf_counter() - t0
        row.update(result.row())
        if result.blocks is not None and "reconstruct_error_after" in result.blocks:
            row["reconstruct_error_before"] = float(result.blocks["reconstruct_error_before"].mean())
            row["reconstruct_error_after"] = float(result.blocks["reconstruct_error_after"].mean())
    else:
        row["prune_seconds"] = 0.0
    achieved = overall_density(density_report(model))
    t0 = time.perf_counter()
    ppl = perplexity(model, test, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
    if "dense_eval_seconds" in row:
        row["prune_dense_eval_passes"] = row["prune_seconds"] / row["dense_eval_seconds"]
    row.update(density_achieved=achieved, sparsity_achieved=1 - achieved, ppl=ppl.ppl,
               eval_seconds=time.perf_counter() - t0,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _done(out: Path, key: dict) -> bool:
    if not out.exists() or out.stat().st_size == 0:
        return False
    table = pd.read_csv(out)
    if "variant" not in table:  # rows measured before variants existed are the plain ones
        table["variant"] = "plain"
    for k, v in key.items():
        if k not in table:  # a setting the rows do not record: theirs was the default (None)
            if v is not None:
                return False
            continue
        table = table[table[k].isna()] if v is None else table[table[k].astype(str) == str(v)]
    return len(table) > 0


def planned(args) -> list[tuple]:
    """The rows to measure: the default table, or methods × densities × variants."""
    if not (args.protocol or args.methods or args.densities or args.variants):
        return CONFIGS
    grid = P1 if args.protocol == "p1" else {"methods": ["sparsegpt"], "densities": ["0.5"],
                                             "variants": ["plain"]}
    methods = args.methods.split(",") if args.methods else grid["methods"]
    densities = args.densities.split(",") if args.densities else grid["densities"]
    variants = args.variants.split(",") if args.variants else grid["variants"]
    rows = [("dense", 1.0, None, "plain")]
    for method, d, variant in itertools.product(methods, densities, variants):
        parse_variant(variant)
        nm = d if ":" in d else None
        if nm and "owl" in variant.split("+"):
            continue  # OWL densities do not apply to N:M
        rows.append((method, None if nm else float(d), nm, variant))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--time-dense-eval", action="store_true",
                   help="also time the dense model's evaluation in each row's process, before pruning "
                        "(prune_dense_eval_passes = prune seconds / those)")
    p.add_argument("--owl-samples", type=int, default=PruneConfig.owl_samples,
                   help="OWL variants: calibration samples the outlier ratios are measured on")
    p.add_argument("--protocol", choices=["p1"],
                   help="the full grid: sparsegpt, wanda, admm × plain, owl, reconstruct, "
                        "owl+reconstruct × 0.5, 2:4, 0.3, 0.1")
    p.add_argument("--methods", help="comma-separated, e.g. sparsegpt,admm")
    p.add_argument("--densities", help="comma-separated densities or N:M, e.g. 0.5,2:4,0.3")
    p.add_argument("--variants", help="comma-separated, e.g. plain,owl,reconstruct,owl+reconstruct")
    p.add_argument("--out", default="results/bench_prune.csv")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one configuration
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.row:
        method, density, nm, variant = json.loads(args.row)
        print("ROW_JSON " + json.dumps(measure_row(args, method, density, nm, variant)), flush=True)
        return

    out = Path(args.out)
    for method, density, nm, variant in planned(args):
        key = row_key(args, method, density, nm, variant)
        if _done(out, key):
            print(f"{method} {density or nm} {variant}: already in {out}, skipped", flush=True)
            continue
        argv = [sys.executable, __file__, "--row", json.dumps([method, density, nm, variant])]
        for name in SETTINGS + ("owl_samples",):
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        argv += ["--time-dense-eval"] if args.time_dense_eval else []
        proc = subprocess.run(argv, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW_JSON ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} {density or nm} {variant} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1][len("ROW_JSON "):])
        append_csv_row(out, row)
        print({k: row[k] for k in ("method", "density", "nm", "variant", "ppl", "prune_seconds")}, flush=True)

    table = pd.read_csv(out)
    mine = table
    for k in SETTINGS:
        mine = mine[mine[k].astype(str) == str(getattr(args, k))]
    print(f"\n{args.model}: calibration {args.calib_samples} × {args.seqlen} tokens of {args.calib} "
          f"(seed 0); perplexity on the first {args.eval_windows} windows of {args.seqlen} of {args.eval}")
    shown = [c for c in ["method", "density", "nm", "variant", "density_achieved", "sparsity_achieved", "ppl",
                         "prune_seconds", "eval_seconds", "peak_rss_mb"] if c in mine]
    print(mine[shown].to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
