"""Figures and tables for the notebooks (matplotlib; PNG/SVG written atomically).

Every figure function takes a results DataFrame (:func:`sweep.load_results`,
:func:`load_bench_results`) and returns a ``matplotlib.figure.Figure``; where the data for a
panel is absent the panel says so instead of failing, and :func:`missing_families` names what is
absent.

Rows are never merged: a table cell or a point of a curve is one measured row. Rows that differ
in any setting of the run (:data:`results.RUN_SETTING_KEYS`: calibration, evaluation, pruning
options) get rows of their own in a table and curves of their own in a figure; rows identical
in every setting (the same run recorded twice) are shown once, the later record winning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .paths import project_root
from .results import RUN_SETTING_KEYS, write_atomic
from .sweep import add_family

__all__ = [
    "FAMILIES",
    "BENCH_FILES",
    "missing_families",
    "eval_protocol",
    "calib_protocol",
    "density_rows",
    "dense_rows",
    "ppl_vs_density",
    "bits_vs_ppl",
    "size_vs_ppl",
    "ppl_table",
    "protocol_tables",
    "quantized_tables",
    "load_bench_results",
    "testing_figure",
    "save_figure",
    "plot_history",
]

# the method families of the paper's figures, in legend order
FAMILIES = ("magnitude", "wanda", "sparsegpt", "sparsegpt+finetune", "iterative")
STYLE = {"magnitude": ("tab:gray", "s"), "wanda": ("tab:orange", "^"), "sparsegpt": ("tab:blue", "o"),
         "sparsegpt+finetune": ("tab:green", "D"), "iterative": ("tab:red", "v")}
# labels of their own (eval_protocol, calib_protocol), or the axes of a figure
_LABELLED = {"model", "family", "density", "eval", "eval_windows", "eval_seqlen", "calib",
             "calib_samples", "seqlen", "seed"}
_QUANT_SETTINGS = {"nm", "wbits", "groupsize", "target_avg_bits", "bit_method", "allocation",
                   "importance"}
# the repository's benchmark tables (bench/): file -> what it measured
BENCH_FILES = {"bench_prune.csv": "one-shot pruning", "bench_iterative.csv": "iterative pruning",
               "bench_quant.csv": "quantization"}


_MARKERS = ("x", "P", "*", "h", "<", ">", "d", "p", "X", "8")


def _style(family: str, index: int) -> tuple[str, str]:
    return STYLE.get(family, (f"C{(index + 5) % 10}", _MARKERS[index % len(_MARKERS)]))


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(np.nan, index=df.index, dtype=object)


def _unquantized(df: pd.DataFrame) -> pd.Series:
    """Rows with no quantization (wbits absent, empty or >= 16; no target_avg_bits)."""
    bits = pd.to_numeric(_column(df, "wbits"), errors="coerce")
    mixed = pd.to_numeric(_column(df, "target_avg_bits"), errors="coerce")
    return (bits.isna() | (bits >= 16)) & mixed.isna()


def _unstructured(df: pd.DataFrame) -> pd.Series:
    if "nm" not in df:
        return pd.Series(True, index=df.index)
    return df["nm"].isna() | (df["nm"].astype(str).isin(["", "None", "nan"]))


def _count(value) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "?" if pd.isna(number) else str(int(number))


def _text(series: pd.Series) -> pd.Series:
    return series.astype(object).where(series.notna(), "?").astype(str)


def eval_protocol(df: pd.DataFrame) -> pd.Series:
    """How each row's perplexity was measured, as one label: evaluation set, windows and
    tokens per window (``eval_seqlen``, else ``seqlen``), e.g. ``"wikitext2, 8 × 256"``;
    ``all`` where every window counted. Perplexities are comparable only within one label."""
    seqlen = pd.to_numeric(_column(df, "eval_seqlen"), errors="coerce").fillna(
        pd.to_numeric(_column(df, "seqlen"), errors="coerce"))
    windows = pd.to_numeric(_column(df, "eval_windows"), errors="coerce")
    source = _text(_column(df, "eval"))
    return pd.Series([f"{s}, {'all' if pd.isna(w) else _count(w)} × {_count(n)}"
                      for s, w, n in zip(source, windows, seqlen, strict=True)],
                     index=df.index, dtype=object)


def calib_protocol(df: pd.DataFrame) -> pd.Series:
    """How each row was calibrated, as one label: calibration text, windows × tokens per window
    and seed, e.g. ``"wikitext2-valid, 32 × 2048, seed 0"``; ``?`` for what the row does not
    record."""
    seed = pd.to_numeric(_column(df, "seed"), errors="coerce")
    source = _text(_column(df, "calib"))
    samples, seqlen = _column(df, "calib_samples"), _column(df, "seqlen")
    return pd.Series([f"{c}, {_count(k)} × {_count(n)}, seed {_count(s)}"
                      for c, k, n, s in zip(source, samples, seqlen, seed, strict=True)],
                     index=df.index, dtype=object)


def _value_text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its ``eval_protocol`` and ``calib_protocol`` labels."""
    return df.assign(eval_protocol=eval_protocol(df), calib_protocol=calib_protocol(df))


def _distinct(rows: pd.DataFrame, dedup_by: Sequence[str], split_by: Sequence[str],
              ignore: set[str] = frozenset(), axes: set[str] = frozenset()) -> tuple[pd.DataFrame, list[str]]:
    """Rows identical in every setting (``dedup_by`` and :data:`results.RUN_SETTING_KEYS`, less
    those that mean nothing here, ``ignore``) kept once, the later record winning; and the
    settings (less the plotted ``axes``) that vary within a ``split_by`` group: each of their
    values is a row of a table or a curve of its own. Those settings come back as text columns
    ("–" where absent)."""
    candidates = [c for c in RUN_SETTING_KEYS if c in rows and c not in _LABELLED and c not in ignore]
    texts = rows.assign(**{c: rows[c].map(_value_text) for c in candidates})
    keep = ~texts.duplicated(subset=[*dedup_by, *candidates], keep="last")
    rows, texts = rows[keep], texts[keep]
    if rows.empty:
        return rows, []
    groups = texts.groupby(list(split_by), dropna=False)
    varying = [c for c in candidates if c not in axes and groups[c].nunique(dropna=False).gt(1).any()]
    return rows.assign(**{c: texts[c] for c in varying}), varying


def _settings_text(row: pd.Series, columns: Sequence[str]) -> str:
    return ", ".join(f"{c}={row[c]}" for c in columns)


def density_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that belong on a ppl-against-density curve: unstructured, not quantized, with a
    perplexity; with ``eval_protocol`` and ``calib_protocol`` columns."""
    if df.empty or not {"density", "ppl"} <= set(df.columns):
        return df.iloc[0:0].assign(eval_protocol=pd.Series(dtype=object),
                                   calib_protocol=pd.Series(dtype=object))
    ppl, density = pd.to_numeric(df["ppl"], errors="coerce"), pd.to_numeric(df["density"], errors="coerce")
    keep = _unquantized(df) & _unstructured(df) & ppl.notna() & density.notna()
    return _labelled(df[keep].assign(ppl=ppl[keep], density=density[keep]))


def dense_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at density 1 (the dense model), any method."""
    return density_rows(df)[lambda d: d["density"] >= 1]


def missing_families(df: pd.DataFrame, families: Sequence[str] = FAMILIES) -> list[str]:
    """The families with no row on the ppl-against-density curves (density < 1)."""
    rows = density_rows(df)
    have = set(rows.loc[rows["density"] < 1, "family"]) if "family" in rows else set()
    return [f for f in families if f not in have]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _with_model(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(model=_column(rows, "model").astype(object).where(lambda m: m.notna(), "").astype(str))


def _panels(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per model and evaluation protocol: perplexities measured on different
    windows are never drawn on one panel. One untitled empty panel when there are no rows."""
    if rows.empty:
        return [("", rows)]
    panels = []
    for (model, protocol), sub in rows.groupby(["model", "eval_protocol"], sort=True):
        panels.append((" · ".join(t for t in (model, protocol) if t), sub))
    return panels


def _series(sub: pd.DataFrame, families: Sequence[str], axes: set[str] = frozenset(),
            ignore: set[str] = frozenset()) -> list[tuple[str, str, int, pd.DataFrame]]:
    """The curves (or point series) of one panel: one per family, calibration and every other
    setting that differs (never joining rows of different settings). Returns (family, label,
    index of the calibration among the panel's, rows) in legend order."""
    sub, varying = _distinct(sub, ["calib_protocol", "family", "density"], ["calib_protocol", "family"],
                             ignore=ignore, axes=axes)
    calibs = sorted(set(sub["calib_protocol"]))
    present = [f for f in families if f in set(sub["family"])]
    present += sorted(set(sub["family"].dropna().astype(str)) - set(present))
    out = []
    for family in present:
        part = sub[sub["family"].astype(str) == family]
        own = [c for c in varying if part[c].nunique(dropna=False) > 1]  # what tells its curves apart
        for key, rows in part.groupby(["calib_protocol", *own], sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            label = family
            if len(calibs) > 1:
                label += f" · calib {key[0]}"
            if own:
                label += " · " + _settings_text(rows.iloc[0], own)
            out.append((family, label, calibs.index(key[0]), rows))
    return out


def _single(values) -> float | None:
    """The one value of ``values`` (equal up to 1e-6 relative), else None: never a median of
    different measurements."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if v.empty or (v.max() - v.min()) > 1e-6 * abs(v.max()):
        return None
    return float(v.iloc[-1])


_LINESTYLES = ("-", "--", "-.", ":")


def ppl_vs_density(df: pd.DataFrame, logy: bool = False, families: Sequence[str] = FAMILIES,
                   eval_source: str | None = None) -> plt.Figure:
    """Perplexity against density (fraction kept), one panel per model and evaluation protocol
    (:func:`eval_protocol`), one line per method family and calibration (:func:`calib_protocol`)
    and any other setting that differs: a line never joins rows of different settings. A line
    ends at the dense model (density 1): the ``ppl_dense`` its own rows recorded, else the
    panel's dense row with its calibration, else the panel's one dense value. ``logy`` puts
    perplexity on a log scale. ``eval_source`` picks one evaluation set."""
    rows = _with_model(density_rows(df))
    if eval_source is not None and "eval" in rows:
        rows = rows[rows["eval"] == eval_source]
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, sub) in zip(axes[0], panels, strict=True):
        drawn = 0
        dense = sub[sub["density"] >= 1] if len(sub) else sub
        curves = _series(sub, families, ignore=_QUANT_SETTINGS)
        for i, (family, label, calib_index, part) in enumerate(curves):
            part = part[part["density"] < 1].sort_values("density")
            if part.empty:
                continue
            end = _single(part["ppl_dense"]) if "ppl_dense" in part else None
            if end is None:
                own = dense[dense["calib_protocol"] == part["calib_protocol"].iloc[0]]
                end = _single(own["ppl"])
            if end is None:
                end = _single(dense["ppl"])
            x, y = list(part["density"]), list(part["ppl"])
            if end is not None:
                x, y = x + [1.0], y + [end]
            color, marker = _style(family, i)
            ax.plot(x, y, marker=marker, color=color, label=label,
                    ls=_LINESTYLES[calib_index % len(_LINESTYLES)])
            drawn += 1
        if drawn == 0:
            _empty(ax, f"no pruned results{f' for {title}' if title else ''} yet")
        else:
            values = dense["ppl"] if len(dense) else sub.get("ppl_dense", pd.Series(dtype=float))
            levels = sorted(set(pd.to_numeric(values, errors="coerce").dropna().round(6)))
            for level in levels:
                ax.axhline(level, color="k", lw=0.8, ls=":",
                           label="dense" if len(levels) == 1 else f"dense {level:.2f}")
            ax.set_yscale("log" if logy else "linear")
            ax.set_xlabel("density (fraction of weights kept)")
            ax.set_ylabel("perplexity" + (" (log scale)" if logy else ""))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both" if logy else "major")
        ax.set_title(title or "perplexity against density", fontsize=10)
    fig.tight_layout()
    return fig


def _scatter(df: pd.DataFrame, x: pd.Series, xscale: float, empty: str, xlabel: str, title: str,
             families: Sequence[str] = FAMILIES) -> plt.Figure:
    """Perplexity (log) against ``x`` / ``xscale``, one panel per model and evaluation
    protocol, one series per family, calibration and differing setting; points labelled with
    their density."""
    ok = x.notna() & pd.to_numeric(_column(df, "ppl"), errors="coerce").notna()
    rows = _with_model(_labelled(df[ok].assign(x=x[ok] / xscale, ppl=pd.to_numeric(df.loc[ok, "ppl"]))))
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, sub) in zip(axes[0], panels, strict=True):
        if sub.empty:
            _empty(ax, empty)
            ax.set_title(title)
            continue
        series = _series(sub, families, axes={"wbits", "target_avg_bits"})
        for i, (family, label, _, part) in enumerate(series):
            color, marker = _style(family, i)
            ax.scatter(part["x"], part["ppl"], color=color, marker=marker, label=label)
            if "density" in part:
                for b, p, d in zip(part["x"], part["ppl"], part["density"], strict=True):
                    ax.annotate(f"d={d:g}", (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "dense_size_bytes" in sub and xscale != 1:
            for size in pd.to_numeric(sub["dense_size_bytes"], errors="coerce").dropna().unique():
                ax.axvline(size / xscale, color="k", lw=0.8, ls=":")
        _finish_ppl_axes(ax, xlabel, f"{title}\n{panel}" if panel else title)
    fig.tight_layout()
    return fig


def bits_vs_ppl(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against bits per weight (``avg_bits``, else ``wbits``) for quantized runs
    (below 16 bits), one panel per model and evaluation protocol; points labelled with their
    density."""
    bits = pd.to_numeric(_column(df, "avg_bits"), errors="coerce").fillna(
        pd.to_numeric(_column(df, "wbits"), errors="coerce"))
    return _scatter(df, bits.where(bits < 16), 1.0, "no quantized results yet",
                    "bits per weight (pruned layers)", "perplexity against bits per weight")


def size_vs_ppl(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against checkpoint size on disk (MB = 10^6 bytes), one panel per model and
    evaluation protocol; the dense fp16 size as a dotted line."""
    size = pd.to_numeric(_column(df, "size_bytes"), errors="coerce")
    return _scatter(df, size, 1e6, "no results with a saved checkpoint size yet",
                    "checkpoint size on disk (MB; dotted: dense fp16)", "perplexity against size on disk")


def _finish_ppl_axes(ax, xlabel: str, title: str) -> None:
    """The common finish of the scatter figures: log perplexity, legend, grid, title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=10)


def ppl_table(df: pd.DataFrame, families: Sequence[str] = FAMILIES) -> pd.DataFrame:
    """The paper's table: perplexity by (model, evaluation protocol, calibration, any other
    setting that differs, density) × family, unstructured and unquantized rows only. Each cell
    is one measured row: rows that differ in any setting (:data:`results.RUN_SETTING_KEYS`) have
    rows of their own, never a median. The dense model's ``ppl_dense`` recorded beside pruned runs fills
    a ``dense`` column at density 1 where the runs of a row agree on it."""
    rows = density_rows(df)
    if rows.empty:
        return pd.DataFrame()
    base = [c for c in ("model",) if c in rows] + ["eval_protocol", "calib_protocol"]
    rows = _with_model(rows) if "model" in rows else rows
    rows, varying = _distinct(rows, [*base, "family", "density"], [*base, "family"], ignore=_QUANT_SETTINGS)
    index = [*base, *varying, "density"]
    table = rows.pivot(index=index, columns="family", values="ppl")
    order = [f for f in families if f in table.columns] + sorted(set(table.columns) - set(families))
    table = table[order]
    if "ppl_dense" in rows and rows["ppl_dense"].notna().any():
        for key, part in rows.groupby(index[:-1], sort=False, dropna=False):
            value = _single(part["ppl_dense"])
            if value is None:
                continue
            at = (*(key if isinstance(key, tuple) else (key,)), 1.0)
            if at not in table.index:
                table.loc[at, :] = np.nan
            if "dense" not in table or pd.isna(table.loc[at, "dense"]):
                table.loc[at, "dense"] = value
    table = table[[c for c in ["dense", *(o for o in order if o != "dense")] if c in table.columns]]
    table = table.sort_index(ascending=[True] * (len(index) - 1) + [False])
    table.columns.name = None
    table = table.reset_index()
    table.insert(table.columns.get_loc("density") + 1, "sparsity", (1 - table["density"]).round(6))
    return table


def protocol_tables(df: pd.DataFrame, families: Sequence[str] = FAMILIES) -> dict[str, pd.DataFrame]:
    """:func:`ppl_table` split by protocol: one table per (model, evaluation protocol,
    calibration), titled ``"<model> · eval <protocol> · calib <protocol>"``, without those
    columns. Perplexities in one table were measured on the same windows after the same
    calibration."""
    table = ppl_table(df, families)
    if table.empty:
        return {}
    keys = [c for c in ("model", "eval_protocol", "calib_protocol") if c in table]
    out = {}
    for key, part in table.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        named = dict(zip(keys, key, strict=True))
        title = " · ".join(t for t in (named.get("model"), f"eval {named['eval_protocol']}",
                                       f"calib {named['calib_protocol']}") if t)
        part = part.drop(columns=keys).dropna(axis=1, how="all").reset_index(drop=True)
        out[title] = part
    return out


def quantized_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The quantized rows (``wbits`` below 16, or a mixed-precision target), one table per
    (model, evaluation protocol, calibration) titled as in :func:`protocol_tables`: one row per
    run (identical runs once), by density then bits per weight; columns that are empty in a
    table are left out."""
    ppl = pd.to_numeric(_column(df, "ppl"), errors="coerce")
    rows = df[~_unquantized(df) & ppl.notna()]
    if rows.empty:
        return {}
    rows = _with_model(_labelled(rows))
    kept, _ = _distinct(rows, ["model", "eval_protocol", "calib_protocol", "family", "density"],
                        ["model", "eval_protocol", "calib_protocol", "family"])
    rows = rows.loc[kept.index]  # the values as recorded, not their labels
    shown = ["family", "method", "density", "sparsity", "nm", "wbits", "target_avg_bits", "groupsize",
             "allocation", "importance", "bit_method", "avg_bits", "ppl"]
    out = {}
    for (model, evalp, calib), part in rows.groupby(["model", "eval_protocol", "calib_protocol"], sort=True):
        part = part.assign(sparsity=(1 - pd.to_numeric(part["density"], errors="coerce")).round(6))
        part = part.sort_values(["density", "avg_bits" if "avg_bits" in part else "wbits"],
                                ascending=[False, True])
        part = part[[c for c in shown if c in part]].dropna(axis=1, how="all").reset_index(drop=True)
        out[" · ".join(t for t in (model, f"eval {evalp}", f"calib {calib}") if t)] = part
    return out


def load_bench_results(folder: str | Path | None = None) -> pd.DataFrame:
    """The repository's benchmark tables (:data:`BENCH_FILES` in ``folder``, default
    ``<project>/results``) as result rows: a ``bench`` column (what the file measured), a
    ``family``, ``sparsity`` = 1 − density, and the result-row names where a file uses its own
    (in ``bench_quant.csv``, ``method`` is the bit allocation, ``kind`` the quantizer and
    ``bits_asked`` the width or average asked for). Files that are absent add no rows; with none,
    an empty table with the usual columns."""
    folder = Path(folder) if folder is not None else project_root() / "results"
    frames = []
    for name, what in BENCH_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        df = pd.read_csv(path)
        if name == "bench_quant.csv" and "kind" in df:
            df = _quant_bench_rows(df)
        if {"method", "ppl"} <= set(df.columns) and len(df):
            frames.append(df.assign(bench=what))
    if not frames:
        return add_family(pd.DataFrame(columns=["bench", "model", "method", "density", "sparsity", "ppl"]))
    df = add_family(pd.concat(frames, ignore_index=True))
    df["density"] = pd.to_numeric(df["density"], errors="coerce")
    df["sparsity"] = (1 - df["density"]).round(6)
    return df


_QUANTIZERS = {"none": "fp16", "rtn": "RTN", "gptq": "GPTQ", "mixed": "GPTQ mixed",
               "global": "GPTQ mixed, global"}


def _quant_bench_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The quantization benchmark's rows in the result rows' names: ``method`` is the pipeline
    (``sparsegpt``: SparseGPT with GPTQ, at density 1 GPTQ alone; ``rtn``: round-to-nearest, below
    density 1 of the SparseGPT-pruned weights; ``dense``: neither), ``family`` the quantizer (the
    unquantized rows: their method), the uniform width ``wbits`` or the mixed-precision average
    ``target_avg_bits``, and the bit allocation under ``allocation``."""
    df = df.rename(columns={"method": "allocation"})
    kind = df["kind"].astype(str)
    density = pd.to_numeric(df["density"], errors="coerce")
    asked = pd.to_numeric(df["bits_asked"], errors="coerce")
    uniform, mixed = kind.isin(["rtn", "gptq"]), kind.isin(["mixed", "global"])
    df["method"] = np.where(kind == "rtn", "rtn", np.where((kind == "none") & (density >= 1), "dense",
                                                          "sparsegpt"))
    df["family"] = np.where(kind == "none", df["method"], kind.map(_QUANTIZERS).fillna(kind))
    df["wbits"] = asked.where(uniform)
    df["target_avg_bits"] = asked.where(mixed)
    if "groupsize" in df:  # no grid at all without quantization
        df["groupsize"] = df["groupsize"].where(uniform | mixed)
    return df


def testing_figure(df: pd.DataFrame) -> plt.Figure:
    """Notebook 3's figure: perplexity (log) against density, one line per evaluation protocol
    and calibration (never joining checkpoints of different settings), each ending at the dense
    model measured on the same windows; and the achieved density of the pruned layers against
    the target."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ppl = pd.to_numeric(_column(df, "ppl"), errors="coerce")
    rows = _labelled(df[ppl.notna()]) if not df.empty else df
    if rows.empty:
        _empty(ax1, "no checkpoints evaluated")
    else:
        dense, pruned = rows[rows["density"] >= 1], rows[rows["density"] < 1]
        pruned, varying = _distinct(pruned, ["eval_protocol", "calib_protocol", "density"],
                                    ["eval_protocol", "calib_protocol"])
        calibs = sorted(set(pruned["calib_protocol"]))
        lines = [(key, part) for key, part in pruned.groupby(["eval_protocol", "calib_protocol", *varying],
                                                             sort=True)]
        lines += [((protocol, None), pruned.iloc[0:0]) for protocol in sorted(set(dense["eval_protocol"]))
                  if protocol not in set(pruned["eval_protocol"])]  # a dense model alone: its point
        for key, part in lines:
            label = key[0] + (f" · calib {key[1]}" if len(calibs) > 1 and key[1] else "")
            if varying and len(part):
                label += " · " + _settings_text(part.iloc[0], varying)
            part = part.sort_values("density")
            x, y = list(part["density"]), list(part["ppl"])
            end = _single(dense.loc[dense["eval_protocol"] == key[0], "ppl"])
            if end is not None:
                x, y = x + [1.0], y + [end]
            ax1.plot(x, y, marker="o", label=label)
        ax1.set_yscale("log")
        ax1.set_xlabel("density (fraction of weights kept)")
        ax1.set_ylabel("perplexity (log scale)")
        ax1.legend(fontsize=7)
        ax1.grid(alpha=0.3, which="both")
    ax1.set_title("perplexity of the saved models")
    if df.empty:
        _empty(ax2, "no checkpoints loaded")
    else:
        one = df.drop_duplicates("checkpoint" if "checkpoint" in df else "density").sort_values("density")
        ax2.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":", label="target")
        ax2.errorbar(one["density"], one["density_achieved"],
                     yerr=[one["density_achieved"] - one["layer_density_min"],
                           one["layer_density_max"] - one["density_achieved"]],
                     fmt="o", capsize=3, label="achieved (bars: layer min–max)")
        ax2.set_xlabel("target density")
        ax2.set_ylabel("achieved density")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    ax2.set_title("density of the pruned layers")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, stem: str | Path, formats: Sequence[str] = ("png",),
                dpi: int = 120) -> list[Path]:
    """Save ``fig`` as ``<stem>.<format>`` for each format (png, svg, pdf), each through a
    temporary file and a rename; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        if fmt not in ("png", "svg", "pdf"):
            raise ValueError(f"figure format must be one of png, svg, pdf, got {fmt!r}")
        path = stem.with_name(f"{stem.name}.{fmt}")
        # no timestamps in the file, so an unchanged figure gives an unchanged file
        meta = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else {}
        paths.append(write_atomic(path, lambda tmp, fmt=fmt, meta=meta: fig.savefig(
            tmp, format=fmt, dpi=dpi, metadata=meta)))
    return paths


def plot_history(history: pd.DataFrame, path: str | Path | None = None, one_shot: pd.DataFrame | None = None,
                 title: str | None = None) -> plt.Figure:
    """An iterative run (:func:`sparsegpt_utils.iterative.run_iterative`'s history): perplexity
    against sparsity after pruning and after fine-tuning at each step, and optional one-shot
    points (columns ``sparsity``, ``ppl``). Saves PNG and SVG (:func:`save_figure`) when
    ``path`` (without suffix, or ending .png) is given; returns the figure."""
    fig, ax = plt.subplots(figsize=(6, 4))
    h = history.sort_values("step")
    ax.plot(h["sparsity"], h["ppl_pruned"], "o--", label="iterative: after pruning")
    ax.plot(h["sparsity"], h["ppl_finetuned"], "o-", label="iterative: after fine-tuning")
    if one_shot is not None and len(one_shot):
        ax.plot(one_shot["sparsity"], one_shot["ppl"], "s", color="C3", label="one-shot SparseGPT")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of weights zeroed)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "iterative pruning + masked fine-tuning")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, Path(path).with_suffix(""), ("png", "svg"))
    return fig
