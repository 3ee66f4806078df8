"""Iterative prune + fine-tune vs one-shot SparseGPT on smollm2-135m (CPU budget).

    PYTHONPATH=. .venv/bin/python bench/bench_iterative.py --eval-windows 16

Schedule [0.5, 0.3, 0.2, 0.1] (density = fraction KEPT), SparseGPT recalibrated at each step
on the current model (masks only shrink), then ``--train-steps`` masked fine-tuning steps with
token-KL distillation from the dense model, on WikiText-2 validation text (a held-out tail for
validation). One-shot SparseGPT at 0.2 and 0.1 with the same calibration windows. Perplexity
on the first ``--eval-windows`` × 2048 windows of WikiText-2 test, the same for every model.
Prints a table, ratios vs one-shot, and writes results/bench_iterative.csv + .png/.svg.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from sparsegpt_utils.data import eval_tokens, tokenize_text
from sparsegpt_utils.evaluate import density_report, overall_density, perplexity
from sparsegpt_utils.finetune import FinetuneConfig, split_train_validation
from sparsegpt_utils.iterative import (
    IterativeConfig,
    _calibration_from,
    check_no_overlap,
    plot_history,
    run_iterative,
    training_text,
)
from sparsegpt_utils.models import load_model
from sparsegpt_utils.prune import PruneConfig, prune_model


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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench_iterative")
    p.add_argument("--run-dir", default="pruned_models/bench_iterative")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.perf_counter()

    dense, tok = load_model("smollm2-135m", dtype="float32")
    text = training_text("wikitext2-valid")
    ev = eval_tokens(tok, "wikitext2")
    check_no_overlap(text, tok.decode(ev[0, :20000]))
    train_ids = tokenize_text(tok, text)
    train_part, _ = split_train_validation(train_ids, 16384)

    def ppl(m):
        return perplexity(m, ev, seqlen=2048, max_windows=args.eval_windows, progress=False).ppl

    rows = []
    t0 = time.perf_counter()
    dense_ppl = ppl(dense)
    rows.append({"method": "dense", "density": 1.0, "ppl": dense_ppl, "seconds": time.perf_counter() - t0})
    calib = _calibration_from(train_part, args.calib_samples, args.calib_seqlen, 0)
    for d in [float(x) for x in args.one_shot.split(",")]:
        t0 = time.perf_counter()
        m = copy.deepcopy(dense)
        prune_model(m, calib, PruneConfig(method="sparsegpt", density=d), progress=False)
        secs = time.perf_counter() - t0
        achieved = overall_density(density_report(m))
        rows.append({"method": "one-shot sparsegpt", "density": achieved, "ppl": ppl(m), "seconds": secs})
        print(rows[-1], flush=True)
        del m

    config = IterativeConfig(
        densities=[float(x) for x in args.densities.split(",")], calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, train_source="wikitext2-valid", val_tokens=16384,
        train_steps=args.train_steps, eval_windows=args.eval_windows, eval_seqlen=2048,
        finetune=FinetuneConfig(lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen,
                                kd_weight=args.kd_weight, lm_weight=args.lm_weight, warmup_steps=2,
                                val_windows=8))
    shutil.rmtree(args.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    history = run_iterative(config, args.run_dir, model=copy.deepcopy(dense), tokenizer=tok,
                            train_ids=train_ids, eval_ids=ev, progress=False)
    iter_secs = time.perf_counter() - t0
    for _, h in history.iterrows():
        if h["step"] > 0:
            rows.append({"method": "iterative + KD", "density": h["density"], "ppl": h["ppl_finetuned"],
                         "seconds": h["seconds"], "ppl_pruned": h["ppl_pruned"]})
    table = pd.DataFrame(rows)
    table["sparsity"] = 1 - table["density"]
    table["eval_windows"] = args.eval_windows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(f"{args.out}.csv", index=False)
    history.to_csv(f"{args.out}_history.csv", index=False)
    one_shot = table[table["method"] == "one-shot sparsegpt"]
    plot_history(history, args.out, one_shot=one_shot,
                 title=f"smollm2-135m, WikiText-2 test ({args.eval_windows}×2048)")

    tokens = int(history["train_tokens"].sum())
    print(f"\nbudget: {len(config.densities)} steps × {args.train_steps} fine-tuning steps × "
          f"{args.batch_size}×{args.seqlen} tokens = {tokens} training tokens; calibration "
          f"{args.calib_samples}×{args.calib_seqlen} per step; iterative run {iter_secs / 60:.1f} min, "
          f"whole benchmark {(time.perf_counter() - t_all) / 60:.1f} min, {args.threads} threads")
    print(history.round(4).to_string(index=False))
    print(table.round(3).to_string(index=False))
    for d in [float(x) for x in args.one_shot.split(",")]:
        it = table[(table["method"] == "iterative + KD") & ((table["density"] - d).abs() < 0.005)]
        os_ = one_shot[(one_shot["density"] - d).abs() < 0.005]
        if len(it) and len(os_):
            print(f"density {d}: ppl iterative / one-shot = {it['ppl'].iloc[0] / os_['ppl'].iloc[0]:.3f}")


if __name__ == "__main__":
    main()
