"""Perplexity on the SparseGPT protocol (DESIGN §3), the per-layer density report, and the
re-evaluation of saved checkpoints (notebook 3: :func:`evaluate_checkpoints`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .models import model_seqlen, pruned_linears

__all__ = ["PerplexityResult", "perplexity", "density_report", "overall_density", "find_checkpoints",
           "available_sources", "load_checkpoint", "evaluate_checkpoints",
           "SAVED_SETTING_KEYS", "saved_settings", "evaluate_as_saved"]


@dataclass
class PerplexityResult:
    ppl: float
    windows: int  # windows evaluated
    total_windows: int  # windows the text has
    seqlen: int
    nll: list[float]  # mean negative log-likelihood per window (nats/token)

    def __str__(self) -> str:
        part = "" if self.windows == self.total_windows else (
            f" (first {self.windows} of {self.total_windows} windows)")
        return f"ppl {self.ppl:.3f} over {self.windows} × {self.seqlen} tokens{part}"


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, seqlen: int | None = None,
    max_windows: int | None = None, device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """``exp(mean_i nll_i)`` over non-overlapping windows of ``seqlen`` tokens of
    ``token_ids`` [1, n], the tail dropped; ``nll_i`` is window i's mean shifted
    cross-entropy. ``max_windows`` evaluates only the first windows (a quick run)."""
    seqlen = seqlen or model_seqlen(model)
    total = token_ids.numel() // seqlen
    if total == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows (eval windows) must be >= 1, got {max_windows}")
    windows = min(total, max_windows or total)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nlls = []
    ids = token_ids.flatten()
    for i in tqdm(range(windows), desc="perplexity", disable=not progress):
        batch = ids[i * seqlen:(i + 1) * seqlen][None].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(float(nll))
    model.train(was_training)
    return PerplexityResult(math.exp(sum(nlls) / len(nlls)), windows, total, seqlen, nlls)


def density_report(model: nn.Module) -> pd.DataFrame:
    """One row per pruned linear layer: shape, kept weights, density, sparsity and
    ``empty_rows`` (rows with no nonzero weight left), counted on the model as it is."""
    rows = []
    for name, layer in pruned_linears(model).items():
        kept = int(torch.count_nonzero(layer.weight))
        empty = int((~layer.weight.detach().ne(0).any(1)).sum())
        n = layer.weight.numel()
        block = next(int(part) for part in name.split(".") if part.isdigit())
        rows.append({"layer": name, "block": block, "rows": layer.out_features,
                     "columns": layer.in_features, "params": n, "kept": kept,
                     "density": kept / n, "sparsity": 1 - kept / n, "empty_rows": empty})
    return pd.DataFrame(rows)


def overall_density(report: pd.DataFrame) -> float:
    """Kept fraction over all pruned layers (parameter-weighted)."""
    return float(report["kept"].sum() / report["params"].sum())


# ---------------------------------------------------------------- testing saved checkpoints (notebook 3)

def find_checkpoints(root: str | Path, model: str, method: str,
                     densities: Sequence[float]) -> dict[float, Path | None]:
    """For each density, the saved folder ``<root>/<model>_<method>_d<density>`` (the density
    matched as a number, so ``d0.5`` and ``d0.50`` both count), or None when there is none."""
    from .results import model_slug

    root = Path(root)
    names = {model, model_slug(model), model.replace("/", "_"), model.split("/")[-1]}
    found: dict[float, Path] = {}
    for path in sorted(root.glob("*_d*")) if root.is_dir() else []:
        m = re.fullmatch(r"(.+)_([^_]+)_d([0-9.]+)", path.name)
        if path.is_dir() and m and m.group(1) in names and m.group(2) == method:
            try:
                found[float(m.group(3))] = path
            except ValueError:
                continue
    return {d: next((p for k, p in found.items() if abs(k - d) < 1e-9), None) for d in densities}


def available_sources(sources: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split evaluation sources into those that can be read now and those that cannot, with
    the reason (:func:`data.text_available`: a file, the data folder, or a reachable hub)."""
    from .data import text_available

    ok, missing = [], {}
    for source in sources:
        split = "validation" if source in ("c4", "wikitext2-valid") else "test"
        why = text_available(source, split)
        if why is None:
            ok.append(source)
        else:
            missing[source] = why
    return ok, missing


def load_checkpoint(path: str | Path):
    """(model, tokenizer) from a saved pruned model: a ``save_utils`` checkpoint (it has a
    ``manifest.json``) or a plain transformers folder."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from .save_utils import load_pruned

        return load_pruned(path)
    from .models import load_model

    return load_model(str(path))


def evaluate_checkpoints(
    model: str, method: str, densities: Sequence[float], root: str | Path | None = None,
    sources: Sequence[str] = ("wikitext2",), eval_windows: int | None = None,
    seqlen: int | None = None, tolerance: float = 0.01, dense_fallback: bool = True,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Load every saved ``<model>_<method>_d<density>`` under ``root`` (default
    :func:`pruned_dir`), measure perplexity on each readable source and check its per-layer
    density against the target.

    Density 1 with no saved folder is the dense model itself (``dense_fallback``).
    Returns ``(results, layers, notes)``: one tidy row per (density, source) with ``ppl``,
    ``density_achieved``, ``layer_density_min/max`` and ``layers_off`` (layers further than
    ``tolerance`` from the target); one row per (density, layer); and notes naming the missing
    checkpoints and the unreadable sources.
    """
    from .data import eval_tokens
    from .models import load_model
    from .paths import pruned_dir
    from .results import checkpoint_name

    for d in densities:
        if not 0 < d <= 1:
            raise ValueError(f"densities (fraction kept) must be in (0, 1], got {d}")
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"eval_windows must be >= 1 or None, got {eval_windows}")
    root = pruned_dir(root)
    paths = find_checkpoints(root, model, method, densities)
    ok_sources, bad_sources = available_sources(sources)
    notes = [f"source {s!r} skipped: {why}" for s, why in bad_sources.items()]
    rows, layer_frames, tokens = [], [], {}
    for density in tqdm(densities, desc="checkpoints", disable=not progress):
        path = paths[density]
        if path is None and not (dense_fallback and density == 1):
            notes.append(f"missing: no checkpoint {checkpoint_name(model, method, density)} in {root}")
            continue
        net, tok = load_checkpoint(path) if path is not None else load_model(model)
        report = density_report(net)
        achieved = overall_density(report)
        off = int(((report["density"] - density).abs() > tolerance).sum())
        layer_frames.append(report.assign(target_density=density))
        length = seqlen or model_seqlen(net)
        for source in ok_sources or [None]:  # no readable source: the density check still counts
            res = None
            if source is not None:
                if (source, length) not in tokens:
                    tokens[source, length] = eval_tokens(tok, source, seqlen=length)
                res = perplexity(net, tokens[source, length], seqlen=length, max_windows=eval_windows,
                                 progress=False)
            rows.append({"model": model, "method": method, "density": density, "sparsity": 1 - density,
                         "checkpoint": path.name if path is not None else "(dense model)",
                         "eval": source, "eval_windows": res.windows if res else 0, "seqlen": length,
                         "eval_seqlen": length,
                         "ppl": res.ppl if res else float("nan"),
                         "density_achieved": achieved,
                         "layer_density_min": float(report["density"].min()),
                         "layer_density_max": float(report["density"].max()),
                         "layers": len(report), "layers_off": off})
        del net
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    return pd.DataFrame(rows), layers, notes


# ---------------------------------------------------------------- checkpoints evaluated as saved

SAVED_SETTING_KEYS = ("calib", "calib_samples", "seqlen", "seed", "eval", "eval_windows", "eval_seqlen")


def saved_settings(path: str | Path) -> dict:
    """The calibration and evaluation a saved checkpoint's own run recorded in its manifest:
    those of :data:`SAVED_SETTING_KEYS` it holds (``seqlen`` is the calibration window,
    ``eval_seqlen`` the evaluation window, in tokens); ``{}`` for a plain transformers folder."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        return {}
    from .checkpoint import read_manifest

    meta = read_manifest(path, verify=False).get("metadata") or {}
    return {k: meta[k] for k in SAVED_SETTING_KEYS if meta.get(k) is not None}


def evaluate_as_saved(
    model: str, method: str, densities: Sequence[float], root: str | Path | None = None,
    sources: Sequence[str] = ("wikitext2",), eval_windows: int | None = None,
    seqlen: int | None = None, tolerance: float = 0.01, dense_fallback: bool = True,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """:func:`evaluate_checkpoints`, each checkpoint measured as its own run measured it: on
    the text, windows and tokens per window its manifest records (:func:`saved_settings`), so
    the numbers are comparable with that run's; then on the other ``sources`` with the same
    windows. ``eval_windows``/``seqlen`` count only where a checkpoint records none. The dense
    model (density 1 with no folder) is measured once per distinct evaluation. Rows carry the
    checkpoint's calibration (``calib``, ``calib_samples``, ``seqlen`` = calibration window,
    ``seed``; empty for the dense model) and ``eval_seqlen``. Notes name folders relative to
    ``root``."""
    from .paths import pruned_dir
    from .results import checkpoint_name

    root = pruned_dir(root)
    for d in densities:
        if not 0 < d <= 1:
            raise ValueError(f"densities (fraction kept) must be in (0, 1], got {d}")
    paths = find_checkpoints(root, model, method, densities)
    default = (sources[0] if sources else "wikitext2", eval_windows, seqlen)
    groups: dict[tuple, list[float]] = {}
    saved: dict[float, dict] = {}
    notes = []
    for density in densities:
        path = paths[density]
        if path is None:
            if not (dense_fallback and density == 1):
                notes.append(f"missing: no checkpoint {checkpoint_name(model, method, density)} "
                              f"in {root.name}/")
            continue
        saved[density] = settings = saved_settings(path)
        key = (settings.get("eval", default[0]), settings.get("eval_windows", default[1]),
               settings.get("eval_seqlen", default[2]))
        groups.setdefault(key, []).append(density)
    dense = dense_fallback and any(d == 1 and paths[d] is None for d in densities)
    if dense:
        for members in groups.values():
            members.append(1.0)
        groups = groups or {default: [1.0]}
    tables, layer_frames = [], []
    for (source, windows, length), members in groups.items():
        table, layers, group_notes = evaluate_checkpoints(
            model, method, members, root=root, sources=list(dict.fromkeys([source, *sources])),
            eval_windows=windows, seqlen=length, tolerance=tolerance, dense_fallback=dense_fallback,
            progress=progress)
        notes += [n for n in group_notes if n not in notes]
        if layer_frames and dense and len(layers):  # the dense model's layers once
            layers = layers[layers["target_density"] < 1]
        tables.append(table)
        layer_frames.append(layers)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(table):
        for key in ("calib", "calib_samples", "seqlen", "seed"):
            table[key] = [saved.get(d, {}).get(key) if c != "(dense model)" else None
                          for d, c in zip(table["density"], table["checkpoint"], strict=True)]
    layers = pd.concat([f for f in layer_frames if len(f)], ignore_index=True) if any(
        len(f) for f in layer_frames) else pd.DataFrame()
    return table, layers, notes
