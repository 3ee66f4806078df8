"""Quantization benchmark: round-to-nearest and GPTQ at uniform widths against mixed precision
(budget / quantile allocation, error-model / five-factor importance) on a real model.

For every configuration: perplexity and the real bits per weight over the pruned layers (every
stored bit: codes, masks, scales, zero points, width maps; ``quant.grid_storage_bits``).
Results go to a CSV one row at a time (written atomically); configurations already in the
CSV are skipped, so an interrupted run resumes where it stopped.

    PYTHONPATH=. python bench/bench_quant.py --densities 1.0 0.5 --calib-samples 16 \
        --seqlen 512 --eval-windows 16 --out results/bench_quant.csv

``--act-order`` sweeps the GPTQ / mixed runs in act-order (keys get an ``-ao`` suffix);
``--true-sequential`` gives each layer group the inputs of the solved groups before it (``-ts``);
``--mixed-unit group`` gives mixed precision one width per grid (needs ``--groupsize``; keys of
mixed runs get a ``-group`` suffix); ``--mse`` searches each grid's clipping range for the least
squared error instead of min–max (``-mse``, RTN and GPTQ keys alike); ``--error-model rounding``
allocates mixed widths per grid from measured rounding errors (``-rounding``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from sparsegpt_utils.data import calibration_windows, eval_tokens
from sparsegpt_utils.evaluate import perplexity
from sparsegpt_utils.mixed_precision import FixedWidths, MixedPrecisionAllocator
from sparsegpt_utils.models import load_model, pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.quant import QuantSpec, grid_storage_bits, rtn_quantize
from sparsegpt_utils.results import write_csv_atomic


def configs(densities, targets, methods, importances, with_global):
    """(key, kind, density, bits or target, method, importance), most informative first, so
    that a partial run already compares uniform and mixed precision at both densities."""
    first, rest = [], []
    m0, i0 = methods[0], importances[0]
    for d in densities:
        ts = ([2.5] if d < 1 else []) + list(targets)
        first.append((f"d{d}-none", "none", d, None, None, None))
        for b in (3, 4):
            first.append((f"d{d}-rtn{b}", "rtn", d, b, None, None))
            first.append((f"d{d}-gptq{b}", "gptq", d, b, None, None))
        for t in ts:
            first.append((f"d{d}-mixed{t}-{m0}-{i0}", "mixed", d, t, m0, i0))
        for i in importances:
            for m in methods:
                if (m, i) != (m0, i0):
                    for t in ts:
                        rest.append((f"d{d}-mixed{t}-{m}-{i}", "mixed", d, t, m, i))
        if with_global:
            for t in ts:
                rest.append((f"d{d}-global{t}-budget-error", "global", d, t, "budget", "error"))
    # variants at one target per density first, the other targets last
    mid = [c for c in rest if c[3] == 3.5 or c[0].startswith("d1.0-global3.0")]
    return first + mid + [c for c in rest if c not in mid]


def storage_bits(model, masks, grids, groupsize):
    """(bits per weight over the pruned layers, mean value width)."""
    total = params = width = 0
    for name, layer in pruned_linears(model).items():
        rows, cols = layer.weight.shape
        grid, mask = grids[name], masks.get(name)
        total += grid_storage_bits(grid, cols, None if mask is None or bool(mask.all()) else mask)
        params += rows * cols
        width += float(torch.log2(grid.expand(cols)[2].double() + 1).sum())  # each weight's width
    return total / params, width / params


def markdown_table(df: pd.DataFrame) -> str:
    """The CSV as a Markdown table, one row per configuration."""
    lines = ["| density | quantizer | asked | allocation | importance | bits/weight | planned | width "
             "| ppl |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = {"none": "none (fp16)", "rtn": "RTN uniform", "gptq": "GPTQ uniform",
             "mixed": "GPTQ mixed", "global": "GPTQ mixed, global"}
    for _, r in df.iterrows():
        def f(key, fmt="{:.3f}"):
            v = r.get(key)
            return "" if v is None or pd.isna(v) else fmt.format(v)
        lines.append(f"| {r['density']} | {names[r['kind']]} | {f('bits_asked', '{:g}')} | "
                     f"{f('method', '{}')} | {f('importance', '{}')} | {f('avg_bits')} | "
                     f"{f('planned_bits')} | {f('avg_width', '{:.2f}')} | {f('ppl', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    p.add_argument("--methods", nargs="+", default=["budget", "quantile"])
    p.add_argument("--importances", nargs="+", default=["error", "five_factor"])
    p.add_argument("--groupsize", type=int, default=None, help="columns per grid (default: per row)")
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--global", dest="with_global", action="store_true", help="add whole-model allocations")
    p.add_argument("--only", nargs="*", default=None, help="run only these configuration keys")
    p.add_argument("--act-order", action="store_true", help="GPTQ sweeps in act-order (keys end in -ao)")
    p.add_argument("--true-sequential", action="store_true",
                   help="each layer group's Hessian from the block with the groups before it solved "
                        "(keys of GPTQ / mixed runs end in -ts)")
    p.add_argument("--mse", action="store_true", help="clipping search per grid (keys end in -mse)")
    p.add_argument("--error-model", choices=("range", "rounding"), default="range",
                   help="mixed per group: modelled (range) or measured (rounding) grid errors "
                        "(keys of mixed runs end in -rounding with the latter)")
    p.add_argument("--mixed-unit", choices=("row", "group"), default="row",
                   help="mixed precision: one width per row, or per grid (needs --groupsize)")
    p.add_argument("--out", default="results/bench_quant.csv")
    p.add_argument("--table", action="store_true", help="print the CSV as a Markdown table and stop")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(pd.read_csv(args.out)))
        return

    out = Path(args.out)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    seen = set(done["key"]) if len(done) else set()
    model, tok = load_model(args.model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, args.calib, args.calib_samples, args.seqlen, seed=0)
    ids = eval_tokens(tok, args.eval)
    G = args.groupsize
    if args.mixed_unit == "group" and G is None:
        p.error("--mixed-unit group needs --groupsize (input columns per width)")
    print(f"{args.model}: calibration {args.calib_samples} x {args.seqlen} tokens of {args.calib}; "
          f"eval {args.eval_windows} x {args.seqlen} tokens of {args.eval}; grid "
          f"{'per row' if G is None else f'g{G}'}")
    pruned_cache: dict[float, tuple[dict, dict]] = {}

    def ppl():
        return perplexity(model, ids, args.seqlen, args.eval_windows, progress=False).ppl

    for key, kind, d, x, method, imp in configs(args.densities, args.targets, args.methods,
                                                args.importances, args.with_global):
        if args.mixed_unit == "group" and kind in ("mixed", "global"):
            if imp != "error":
                continue  # per grid, only the error model is defined
            key += "-group"
        if args.act_order and kind in ("gptq", "mixed", "global"):
            key += "-ao"
        if args.true_sequential and kind in ("gptq", "mixed", "global"):
            key += "-ts"
        if args.mse and kind != "none":
            key += "-mse"
        if args.error_model == "rounding" and kind in ("mixed", "global"):
            key += "-rounding"
        if key in seen or (args.only and key not in args.only):
            continue
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        row = {"key": key, "kind": kind, "density": d, "groupsize": G or "row", "bits_asked": x,
               "method": method, "importance": imp,
               "act_order": args.act_order and kind in ("gptq", "mixed", "global"),
               "true_sequential": args.true_sequential and kind in ("gptq", "mixed", "global"),
               "mixed_unit": args.mixed_unit if kind in ("mixed", "global") else None,
               "mse": args.mse and kind != "none",
               "error_model": args.error_model if kind in ("mixed", "global") else None}
        if kind == "none" and d == 1:
            row.update(avg_bits=16.0, avg_width=16.0)
        elif kind == "none" or (kind == "rtn" and d < 1):
            # SparseGPT without quantization; RTN at density < 1 quantizes this pruned model
            if d not in pruned_cache:
                res = prune_model(model, calib, PruneConfig("sparsegpt", d), progress=False)
                pruned_cache[d] = ({k: v.clone() for k, v in model.state_dict().items()}, res.masks)
            state, masks = pruned_cache[d]
            model.load_state_dict(state)
            if kind == "none":
                row.update(avg_bits=16.0 * d + 1, avg_width=16.0)
        if kind == "rtn":
            masks = pruned_cache[d][1] if d < 1 else {}
            grids = {}
            with torch.no_grad():
                for name, layer in pruned_linears(model).items():
                    q, grids[name] = rtn_quantize(layer.weight, QuantSpec(x, G, mse=args.mse))
                    layer.weight.copy_(q * masks[name] if name in masks else q)
            row["avg_bits"], row["avg_width"] = storage_bits(model, masks, grids, G)
        elif kind in ("gptq", "mixed", "global"):
            alloc = None
            if kind in ("mixed", "global"):
                alloc = MixedPrecisionAllocator(x, method, importance=imp, groupsize=G, density=d,
                                                scope="layer" if kind == "mixed" else "global",
                                                unit=args.mixed_unit, mse=args.mse,
                                                error_model=args.error_model)
            if kind == "global":  # first pass: round-to-nearest, only to collect error curves
                collect = FixedWidths(alloc.collect)
                first = PruneConfig("wanda", 1.0, quant=QuantSpec(4, G), bit_allocator=collect)
                prune_model(model, calib, first, progress=False)
                alloc.fit_global()
                model.load_state_dict(dense)
            spec = QuantSpec(x if kind == "gptq" else 4, G, mse=args.mse)
            res = prune_model(model, calib, PruneConfig("sparsegpt", d, quant=spec, bit_allocator=alloc,
                                                        act_order=row["act_order"],
                                                        true_sequential=row["true_sequential"]),
                              progress=False)
            row["avg_bits"], row["avg_width"] = storage_bits(model, res.masks, res.grids, G)
            if alloc is not None:
                alloc.stats.measure(res.masks)
                row["planned_bits"] = alloc.stats.avg_bits
                hist = alloc.stats.histogram()
                total = sum(hist.values())
                row.update({f"rows_{b}b": hist[b] / total for b in hist})
        row["prune_seconds"] = round(time.perf_counter() - t0, 1)
        row["ppl"] = ppl()
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out, done)
    if len(done):
        cols = ["key", "density", "avg_bits", "avg_width", "ppl"]
        print(done[cols].to_string(index=False))


if __name__ == "__main__":
    main()
