"""Iterative prune + fine-tune vs one-shot SparseGPT on smollm2-135m (CPU budget).

    PYTHONPATH=. .venv/bin/python bench/bench_iterative.py --eval-windows 16

Schedule [0.5, 0.3, 0.2, 0.1] (density = fraction KEPT), SparseGPT recalibrated at each step
on the current model (masks only shrink), then ``--train-steps`` masked fine-tuning steps with
token-KL distillation from the dense model, on WikiText-2 validation text (a held-out tail for
validation). One-shot SparseGPT at 0.2 and 0.1 with the same calibration windows, and, as a
control, one-shot SparseGPT at ``--control-densities`` fine-tuned with the iterative run's
whole budget (steps × schedule length, same loss and data): what the gradual schedule adds
beyond the fine-tuning itself. Perplexity on the first ``--eval-windows`` × 2048 windows of
WikiText-2 test, the same for every model. Prints a table, ratios vs one-shot, and writes
results/bench_iterative.csv + _history.csv + .png/.svg. ``--only-control`` runs just the
control and adds its rows to an existing table (and redraws the plot).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from sparsegpt_utils.data import calibration_windows_from_ids, eval_tokens, tokenize_text
from sparsegpt_utils.evaluate import density_report, overall_density, perplexity
from sparsegpt_utils.finetune import FinetuneConfig, finetune, split_train_validation
from sparsegpt_utils.iterative import (
    IterativeConfig,
    check_no_overlap,
    run_iterative,
    training_text,
)
from sparsegpt_utils.models import load_model
from sparsegpt_utils.plots import plot_history
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.results import write_csv_atomic

MODEL = "smollm2-135m"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--densities", default="0.5,0.3,0.2,0.1")
    p.add_argument("--one-shot", default="0.2,0.1")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=1.0)
    p.add_argument("--control-densities", default="0.1",
                   help="one-shot + fine-tuning with the iterative budget at these densities ('' for none)")
    p.add_argument("--only-control", action="store_true",
                   help="run only the control and add it to an existing --out table")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: rewrite the existing --out table with its keys and redraw the plot")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench_iterative")
    p.add_argument("--run-dir", default="pruned_models/bench_iterative")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.perf_counter()
    densities = [float(x) for x in args.densities.split(",")]
    if args.only_control or args.report_only:
        table = pd.read_csv(f"{args.out}.csv")
        if "run" not in table:  # a table written before the result-row keys
            table = table.rename(columns={"method": "run"})
        history = pd.read_csv(f"{args.out}_history.csv")
        if args.report_only:
            return report(args, table, history, None, t_all, densities)

    dense, tok = load_model(MODEL, dtype="float32")
    text = training_text("wikitext2-valid")
    ev = eval_tokens(tok, "wikitext2")
    check_no_overlap(text, tok.decode(ev[0, :20000]))
    train_ids = tokenize_text(tok, text)
    train_part, _ = split_train_validation(train_ids, 16384)

    def ppl(m):
        return perplexity(m, ev, seqlen=2048, max_windows=args.eval_windows, progress=False).ppl

    ft = FinetuneConfig(lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen,
                        kd_weight=args.kd_weight, lm_weight=args.lm_weight, warmup_steps=2, val_windows=8)
    calib = calibration_windows_from_ids(train_part, args.calib_samples, args.calib_seqlen, 0)

    def one_shot(d):
        """A copy of the dense model pruned by SparseGPT to density ``d``, and its masks."""
        m = copy.deepcopy(dense)
        return m, prune_model(m, calib, PruneConfig(method="sparsegpt", density=d), progress=False).masks

    def control_rows():
        out = []
        steps = len(densities) * args.train_steps
        for d in [float(x) for x in args.control_densities.split(",") if x.strip()]:
            t0 = time.perf_counter()
            m, masks = one_shot(d)
            pruned_ppl = ppl(m)
            ft_result = finetune(m, train_part, dataclasses.replace(ft, steps=steps),
                                 masks=masks, teacher=dense, progress=False)
            if not ft_result.masks_kept:
                raise RuntimeError("control: a pruned weight became nonzero during fine-tuning")
            out.append({"run": "one-shot sparsegpt + KD", "density": overall_density(density_report(m)),
                        "ppl": ppl(m), "seconds": time.perf_counter() - t0, "ppl_pruned": pruned_ppl,
                        "finetune_steps": steps, "train_tokens": ft_result.tokens})
            print(out[-1], flush=True)
        return out

    if args.only_control:
        table = table[table["run"] != "one-shot sparsegpt + KD"]
        table = pd.concat([table, pd.DataFrame(control_rows())], ignore_index=True)
        return report(args, table, history, None, t_all, densities)

    rows = []
    t0 = time.perf_counter()
    dense_ppl = ppl(dense)
    rows.append({"run": "dense", "density": 1.0, "ppl": dense_ppl, "seconds": time.perf_counter() - t0})
    for d in [float(x) for x in args.one_shot.split(",")]:
        t0 = time.perf_counter()
        m, _ = one_shot(d)
        secs = time.perf_counter() - t0
        rows.append({"run": "one-shot sparsegpt", "density": overall_density(density_report(m)),
                     "ppl": ppl(m), "seconds": secs})
        print(rows[-1], flush=True)

    config = IterativeConfig(
        densities=densities, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, train_source="wikitext2-valid", val_tokens=16384,
        train_steps=args.train_steps, eval_windows=args.eval_windows, eval_seqlen=2048, finetune=ft)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    history = run_iterative(config, args.run_dir, model=copy.deepcopy(dense), tokenizer=tok,
                            train_ids=train_ids, eval_ids=ev, progress=False)
    iter_secs = time.perf_counter() - t0
    for _, h in history.iterrows():
        if h["step"] > 0:
            rows.append({"run": "iterative + KD", "density": h["density"], "ppl": h["ppl_finetuned"],
                         "seconds": h["seconds"], "ppl_pruned": h["ppl_pruned"]})
    rows += control_rows()
    report(args, pd.DataFrame(rows), history, iter_secs, t_all, densities)


# run label -> (method, family) in the results schema, so results/ readers (notebook 4)
# place these rows beside the other results
RUN_KEYS = {"dense": ("dense", "dense"), "one-shot sparsegpt": ("sparsegpt", "sparsegpt"),
            "iterative + KD": ("sparsegpt", "iterative"),
            "one-shot sparsegpt + KD": ("sparsegpt", "sparsegpt+finetune")}


def with_result_keys(table: pd.DataFrame, args) -> pd.DataFrame:
    """The table with the result-row keys (DESIGN §4): ``density`` is the target, the achieved
    one goes to ``density_achieved``; calibration and evaluation as run."""
    table = table.copy()
    table["method"] = table["run"].map(lambda r: RUN_KEYS[r][0])
    table["family"] = table["run"].map(lambda r: RUN_KEYS[r][1])
    achieved = table["density_achieved"] if "density_achieved" in table else table["density"]
    table["density_achieved"] = achieved
    table["density"] = achieved.round(3)
    table["sparsity"] = 1 - table["density_achieved"]
    for key, value in (("model", MODEL), ("calib", "wikitext2-valid"),
                       ("calib_samples", args.calib_samples), ("seqlen", args.calib_seqlen), ("seed", 0),
                       ("eval", "wikitext2"), ("eval_windows", args.eval_windows), ("eval_seqlen", 2048)):
        table[key] = value
    first = ["run", "method", "family", "density", "sparsity", "density_achieved", "ppl"]
    return table[first + [c for c in table.columns if c not in first]]


def report(args, table, history, iter_secs, t_all, densities):
    """Write the table, the history and the plot; print the budget, the tables and the ratios."""
    table = with_result_keys(table, args)
    write_csv_atomic(f"{args.out}.csv", table)
    write_csv_atomic(f"{args.out}_history.csv", history)
    one_shot = table[table["run"] == "one-shot sparsegpt"]
    control = table[table["run"] == "one-shot sparsegpt + KD"]
    fig = plot_history(history, None, one_shot=one_shot,
                       title=f"{MODEL}, WikiText-2 test ({args.eval_windows}×2048)")
    if len(control):
        fig.axes[0].plot(control["sparsity"], control["ppl"], "D", color="C4",
                         label=f"one-shot + KD ({int(control['finetune_steps'].iloc[0])} steps)")
        fig.axes[0].legend()
    for ext in (".png", ".svg"):
        fig.savefig(Path(args.out).with_suffix(ext), dpi=120)

    tokens = int(history["train_tokens"].sum())
    print(f"\nbudget: {len(densities)} steps × {args.train_steps} fine-tuning steps × "
          f"{args.batch_size}×{args.seqlen} tokens = {tokens} training tokens; calibration "
          f"{args.calib_samples}×{args.calib_seqlen} per step; {args.threads} threads"
          + (f"; iterative run {iter_secs / 60:.1f} min" if iter_secs else "")
          + f"; this invocation {(time.perf_counter() - t_all) / 60:.1f} min")
    print(history.round(4).to_string(index=False))
    print(table.round(3).to_string(index=False))
    iterative = table[table["run"] == "iterative + KD"]
    for d in [float(x) for x in args.one_shot.split(",")]:
        it = iterative[(iterative["density"] - d).abs() < 0.005]
        for name, other in (("one-shot", one_shot), ("one-shot + KD", control)):
            o = other[(other["density"] - d).abs() < 0.005]
            if len(it) and len(o):
                print(f"density {d}: ppl iterative / {name} = {it['ppl'].iloc[0] / o['ppl'].iloc[0]:.3f}")


if __name__ == "__main__":
    main()
