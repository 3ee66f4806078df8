"""What notebook 1 runs: a list of experiments on one loaded model, as one table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from .evaluate import density_report
from .experiment import Experiment, _device, evaluate_model, run_experiment
from .models import load_model, model_seqlen
from .results import append_csv_row, checkpoint_name, write_json_atomic

__all__ = ["checkpoint_name", "run_sparsity_list"]


def run_sparsity_list(runs: list[Experiment], pruned_dir: str | Path | None = None,
                      results_csv: str | Path | None = None, result_json: str | Path | None = None):
    """Run experiments that share one model: load it once, evaluate it dense once, then prune
    a fresh copy per run. Returns (results table, per-layer density report of each run)."""
    if not runs:
        raise ValueError("no runs: SPARSENESS_LIST (or NM) is empty")
    for run in runs:
        run.validate()
    first = runs[0]
    model, tokenizer = load_model(first.model, first.dtype, device="cpu")
    seqlen = first.seqlen or model_seqlen(model)
    ppl_dense = None
    if first.eval:
        device = _device(first.device)
        model.to(device)
        ppl_dense = evaluate_model(model, tokenizer, first.eval, first.eval_windows, seqlen, device,
                                   first.progress).ppl
        model.to("cpu")
    rows, reports = [], []
    for run in runs:
        save = None
        if pruned_dir:
            save = str(Path(pruned_dir) / checkpoint_name(run.model, run.method, run.density, run.nm,
                                                          run.wbits, run.target_avg_bits))
        run = dataclasses.replace(run, save=save, json=None, csv=None, eval_dense=False)
        result, _, pruned_model = run_experiment(run, model, tokenizer)
        result["ppl_dense"] = ppl_dense
        result["checkpoint"] = save
        if results_csv:
            append_csv_row(results_csv, result)
        rows.append(result)
        if result_json:  # every run so far, so that an interrupted list keeps what finished
            write_json_atomic(result_json, rows)
        reports.append(density_report(pruned_model))
    table = pd.DataFrame(rows)
    # MB = 10^6 bytes, as in notebook 4's figure and table
    table["size_mb"] = table["size_bytes"] / 1e6 if "size_bytes" in table else None
    table["dense_size_mb"] = table["dense_size_bytes"] / 1e6
    return table, reports
