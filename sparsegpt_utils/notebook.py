"""What notebook 1 runs: its parameters turned into experiments, and a list of experiments on
one loaded model, as one table.

Notebook 1's parameters use the package's names (``DENSITIES`` = fraction of weights KEPT,
``percdamp``, ``blocksize``, ``mask_blocksize``, ...); the older names ``SPARSENESS_LIST``,
``SPARSITIES`` (both: fraction KEPT, despite the names), ``EPSILON``, ``B`` and ``Bs`` are still
accepted. A list parameter given as a string (papermill's ``-p DENSITIES "[0.5, 0.2]"``) is parsed.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .evaluate import density_report
from .experiment import (
    Experiment,
    OutputConfig,
    evaluate_model,
    loading,
    nm_text,
    resolve_device,
    resolve_texts,
    run_experiment,
)
from .models import load_model, model_seqlen
from .results import append_csv_row, checkpoint_name, write_json_atomic

__all__ = ["checkpoint_name", "run_sparsity_list", "experiments_from_parameters", "parse_list_parameter",
           "NOTEBOOK_SETTINGS", "OLDER_NAMES", "experiment_checkpoint_name", "refresh_notebooks"]

# notebook 1's parameter -> the Experiment setting(s) it gives (Experiment.from_settings)
NOTEBOOK_SETTINGS = {
    "METHOD": "prune.method", "NM": "prune.nm", "percdamp": "prune.percdamp",
    "blocksize": "prune.blocksize", "mask_blocksize": "prune.mask_blocksize",
    "calibration_batch_size": "prune.calibration_batch_size", "OWL": "prune.owl",
    "EXACT_UPDATE": "prune.exact_update", "RECONSTRUCT": "prune.reconstruct",
    "wbits": "quant.bits", "groupsize": "quant.groupsize", "target_avg_bits": "mixed.target_avg_bits",
    "bit_allocation_method": "mixed.method", "mixed_unit": "mixed.unit", "act_order": "prune.act_order",
    "true_sequential": "prune.true_sequential", "CALIB_SOURCE": "calib.source",
    "calibration_size": "calib.samples", "token_length": "calib.seqlen", "SEED": "calib.seed",
    "EVAL_SOURCE": "eval.source", "EVAL_WINDOWS": "eval.windows",
    "FALLBACK_TEXT": ("calib.fallback", "eval.fallback"), "DEVICE": "device", "SHOW_PROGRESS": "progress",
}
# older parameter names -> the name they stand for (when set, not None, they replace it)
OLDER_NAMES = {"SPARSENESS_LIST": "DENSITIES", "SPARSITIES": "DENSITIES", "EPSILON": "percdamp",
               "B": "blocksize", "Bs": "mask_blocksize"}


def parse_list_parameter(name: str, value) -> list:
    """A list parameter as a list: a list or tuple as is, a single number as a one-item list,
    a string (papermill's ``-p NAME "[0.5, 0.2]"``, or ``"0.5, 0.2"``) parsed. Raises
    ValueError naming ``name`` for anything else."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{name} must be a list such as [0.5, 0.3], got the string {value!r}") from None
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)):
        raise ValueError(f"{name} must be a list such as [0.5, 0.3], got {value!r}")
    return list(parsed)


def experiments_from_parameters(params: Mapping) -> list[Experiment]:
    """Notebook 1's experiments from its parameters (e.g. ``globals()``): one per density of
    ``DENSITIES`` (fraction KEPT), or one N:M run when ``NM`` is set; at each, ``METHOD`` and
    then each method of ``COMPARE_WITH`` (with every other setting the same). Parameters not
    given take the package's defaults; every one is checked here, before any model loads."""
    params = dict(params)
    for old, new in OLDER_NAMES.items():
        if params.get(old) is not None:
            params[new] = params[old]
    model = params.get("model_name") or (f"facebook/opt-{params['model_size']}"
                                         if params.get("model_size") else None)
    settings = {} if model is None else {"model": model}
    for name, keys in NOTEBOOK_SETTINGS.items():
        if name in params:
            for key in (keys,) if isinstance(keys, str) else keys:
                settings[key] = params[name]
    if settings.get("prune.nm"):
        densities = [None]
    else:
        settings.pop("prune.nm", None)
        densities = parse_list_parameter("DENSITIES", params.get("DENSITIES", [0.5]))
        if not densities:
            raise ValueError("DENSITIES is empty: give at least one density (fraction kept), or NM")
    compare = params.get("COMPARE_WITH") or []
    compare = [compare] if isinstance(compare, str) and not compare.lstrip().startswith("[") else \
        parse_list_parameter("COMPARE_WITH", compare)
    methods = [settings.get("prune.method", "sparsegpt")]
    methods += [m for m in compare if m not in methods]
    return [Experiment.from_settings({**settings, "prune.method": m, "prune.density": d})
            for d in densities for m in methods]


def experiment_checkpoint_name(exp: Experiment) -> str:
    """The folder name of ``exp``'s checkpoint (:func:`~sparsegpt_utils.results.checkpoint_name`)."""
    quant, mixed = exp.prune.quant, exp.prune.mixed
    wbits = int(quant.bits) if quant is not None and mixed is None else None
    return checkpoint_name(exp.model, exp.prune.method, exp.density, nm_text(exp.prune.nm), wbits,
                           mixed.target_avg_bits if mixed else None)


def run_sparsity_list(runs: list[Experiment], pruned_dir: str | Path | None = None,
                      results_csv: str | Path | None = None, result_json: str | Path | None = None):
    """Run experiments that share one model, texts and evaluation: read the texts and load the
    model once, evaluate it dense once, then prune a fresh copy per run. Says first (printed) when
    a text was replaced by the fallback text. Returns (results table, per-layer density report of
    each run)."""
    if not runs:
        raise ValueError("no runs: DENSITIES (or NM) is empty")
    first = runs[0]
    texts = resolve_texts(first)
    for text in texts:
        if text is not None and text.note:
            print(f"note: {text.note}")
    with loading("model", first.model):
        model, tokenizer = load_model(first.model, first.dtype, device="cpu", progress=first.progress)
    seqlen = first.eval.seqlen or first.calib.seqlen or model_seqlen(model)
    ppl_dense = None
    if texts[1] is not None:
        device = resolve_device(first.device)
        model.to(device)
        ppl_dense = evaluate_model(model, tokenizer, texts[1], first.eval.windows, seqlen, device,
                                   first.progress).ppl
        model.to("cpu")
    rows, reports = [], []
    for run in runs:
        save = str(Path(pruned_dir) / experiment_checkpoint_name(run)) if pruned_dir else None
        run = dataclasses.replace(run, output=OutputConfig(save=save),
                                  eval=dataclasses.replace(run.eval, dense=False))
        result, pruned, pruned_model = run_experiment(run, model, tokenizer, texts=texts)
        result["ppl_dense"] = ppl_dense
        result["checkpoint"] = save
        if results_csv:
            append_csv_row(results_csv, result)
        rows.append(result)
        if result_json:  # every run so far, so that an interrupted list keeps what finished
            write_json_atomic(result_json, rows)
        # the solver's own loss per layer beside its density (NaN where a method has none)
        reports.append(density_report(pruned_model).merge(
            pruned.layers[["layer", "loss"]], on="layer", how="left"))
    table = pd.DataFrame(rows)
    # MB = 10^6 bytes, as in notebook 4's figure and table
    table["size_mb"] = table["size_bytes"] / 1e6 if "size_bytes" in table else None
    table["dense_size_mb"] = table["dense_size_bytes"] / 1e6
    return table, reports


# ---------------------------------------------------------------- notebook regression outputs

def refresh_notebooks(notebooks: list[str | Path], workdir: str | Path | None = None,
                      kernel: str = "python3", timeout: int = 1800) -> Path:
    """Re-execute ``notebooks`` in order, in place, with their default parameters and the
    environment of :func:`notebook_env` (what nbval compares against), and write each back
    atomically. Stops at the first failing notebook (left unchanged). Returns the work folder."""
    import os
    import tempfile
    import time

    import nbformat
    from nbclient import NotebookClient

    from .paths import notebook_env
    from .results import write_atomic

    workdir = Path(workdir or tempfile.mkdtemp(prefix="nbval-work-"))
    saved = dict(os.environ)
    os.environ.update(notebook_env(workdir))  # the kernel inherits this process's environment
    try:
        for path in map(Path, notebooks):
            nb = nbformat.read(path, as_version=4)
            # papermill's run record names the machine's output path: not part of a committed notebook
            nb.metadata.pop("papermill", None)
            for cell in nb.cells:
                cell.metadata.pop("papermill", None)
            start = time.perf_counter()
            NotebookClient(nb, kernel_name=kernel, timeout=timeout,
                           resources={"metadata": {"path": str(path.resolve().parent)}}).execute()
            write_atomic(path, lambda tmp, nb=nb: nbformat.write(nb, tmp))
            print(f"{path}: {time.perf_counter() - start:.0f} s")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return workdir
