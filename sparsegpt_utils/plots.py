"""Figures and tables for the notebooks (matplotlib; PNG/SVG written atomically).

Every figure function takes a results DataFrame (:func:`sweep.load_results`) and returns a
``matplotlib.figure.Figure``; where the data for a panel is absent the panel says so instead of
failing, and :func:`missing_families` names what is absent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = [
    "FAMILIES",
    "missing_families",
    "eval_protocol",
    "density_rows",
    "dense_rows",
    "ppl_vs_density",
    "bits_vs_ppl",
    "size_vs_ppl",
    "ppl_table",
    "testing_figure",
    "save_figure",
]

# the method families of the paper's figures, in legend order
FAMILIES = ("magnitude", "wanda", "sparsegpt", "sparsegpt+finetune", "iterative")
STYLE = {"magnitude": ("tab:gray", "s"), "wanda": ("tab:orange", "^"), "sparsegpt": ("tab:blue", "o"),
         "sparsegpt+finetune": ("tab:green", "D"), "iterative": ("tab:red", "v")}


def _style(family: str, index: int) -> tuple[str, str]:
    return STYLE.get(family, (f"C{(index + 5) % 10}", "x"))


def _unquantized(df: pd.DataFrame) -> pd.Series:
    """Rows with no quantization (wbits absent, empty or >= 16)."""
    if "wbits" not in df:
        return pd.Series(True, index=df.index)
    bits = pd.to_numeric(df["wbits"], errors="coerce")
    return bits.isna() | (bits >= 16)


def _unstructured(df: pd.DataFrame) -> pd.Series:
    if "nm" not in df:
        return pd.Series(True, index=df.index)
    return df["nm"].isna() | (df["nm"].astype(str).isin(["", "None", "nan"]))


def eval_protocol(df: pd.DataFrame) -> pd.Series:
    """How each row's perplexity was measured, as one label: evaluation set, windows and
    tokens per window (``eval_seqlen``, else ``seqlen``), e.g. ``"wikitext2, 8 × 256"``;
    ``all`` where every window counted. Perplexities are comparable only within one label."""
    def column(name: str) -> pd.Series:
        return df[name] if name in df else pd.Series(np.nan, index=df.index)

    def count(value) -> str:
        number = pd.to_numeric(value, errors="coerce")
        return "?" if pd.isna(number) else str(int(number))

    seqlen = pd.to_numeric(column("eval_seqlen"), errors="coerce").fillna(
        pd.to_numeric(column("seqlen"), errors="coerce"))
    windows = pd.to_numeric(column("eval_windows"), errors="coerce")
    source = column("eval").astype(object).where(column("eval").notna(), "?").astype(str)
    return pd.Series([f"{s}, {'all' if pd.isna(w) else count(w)} × {count(n)}"
                      for s, w, n in zip(source, windows, seqlen, strict=True)],
                     index=df.index, dtype=object)


def density_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that belong on a ppl-against-density curve: unstructured, not quantized, with a
    perplexity; with an ``eval_protocol`` column (:func:`eval_protocol`)."""
    if df.empty or not {"density", "ppl"} <= set(df.columns):
        return df.iloc[0:0].assign(eval_protocol=pd.Series(dtype=object))
    keep = _unquantized(df) & _unstructured(df) & df["ppl"].notna() & df["density"].notna()
    return df[keep].assign(eval_protocol=lambda d: eval_protocol(d))


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


def _models(df: pd.DataFrame) -> list[str]:
    return sorted(df["model"].dropna().astype(str).unique()) if "model" in df and not df.empty else [""]


def _dense_ppl(rows: pd.DataFrame) -> float | None:
    """The dense model's perplexity: rows at density 1, else the rows' ``ppl_dense``."""
    dense = rows[rows["density"] >= 1]
    if not dense.empty:
        return float(dense["ppl"].median())
    if "ppl_dense" in rows and rows["ppl_dense"].notna().any():
        return float(pd.to_numeric(rows["ppl_dense"], errors="coerce").median())
    return None


def ppl_vs_density(df: pd.DataFrame, logy: bool = False, families: Sequence[str] = FAMILIES,
                   eval_source: str | None = None) -> plt.Figure:
    """Perplexity against density (fraction kept), one line per method family, one panel per
    model and evaluation protocol (:func:`eval_protocol`: rows measured on different windows
    are never drawn together). The dense model (density 1, any method) ends every line.
    ``logy`` puts perplexity on a log scale. ``eval_source`` picks one evaluation set."""
    rows = density_rows(df)
    if eval_source is not None and "eval" in rows:
        rows = rows[rows["eval"] == eval_source]
    panels = []
    for model in _models(rows):
        sub = rows[rows["model"].astype(str) == model] if model else rows
        panels += [(model, p) for p in sorted(set(sub["eval_protocol"]))] or [(model, "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (model, protocol) in zip(axes[0], panels, strict=True):
        sub = rows[rows["model"].astype(str) == model] if model else rows
        sub = sub[sub["eval_protocol"] == protocol] if protocol else sub
        dense_ppl = _dense_ppl(sub)
        drawn = 0
        present = [f for f in families if f in set(sub.get("family", []))]
        present += sorted(set(sub.get("family", [])) - set(families) - {np.nan})
        for i, family in enumerate(present):
            part = sub[(sub["family"] == family) & (sub["density"] < 1)]
            if part.empty:
                continue
            curve = part.groupby("density", as_index=False)["ppl"].median().sort_values("density")
            x, y = list(curve["density"]), list(curve["ppl"])
            if dense_ppl is not None:
                x, y = x + [1.0], y + [dense_ppl]
            color, marker = _style(family, i)
            ax.plot(x, y, marker=marker, color=color, label=family)
            drawn += 1
        if drawn == 0:
            _empty(ax, f"no pruned results{f' for {model}' if model else ''} yet")
        else:
            if dense_ppl is not None:
                ax.axhline(dense_ppl, color="k", lw=0.8, ls=":", label="dense")
            ax.set_yscale("log" if logy else "linear")
            ax.set_xlabel("density (fraction of weights kept)")
            ax.set_ylabel("perplexity" + (" (log scale)" if logy else ""))
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both" if logy else "major")
        title = " · ".join(t for t in (model, protocol) if t)
        ax.set_title(title or "perplexity against density", fontsize=10)
    fig.tight_layout()
    return fig


def bits_vs_ppl(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against bits per weight (``avg_bits``, else ``wbits``) for quantized runs;
    one series per family, each point labelled with its density."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if df.empty or "ppl" not in df or not ({"avg_bits", "wbits"} & set(df.columns)):
        _empty(ax, "no quantized results yet")
        return fig
    bits = pd.to_numeric(df["avg_bits"], errors="coerce") if "avg_bits" in df else pd.Series(np.nan, df.index)
    if "wbits" in df:
        bits = bits.fillna(pd.to_numeric(df["wbits"], errors="coerce"))
    rows = df.assign(bits=bits)[lambda d: d["bits"].notna() & (d["bits"] < 16) & d["ppl"].notna()]
    if rows.empty:
        _empty(ax, "no quantized results yet")
        return fig
    for i, (family, part) in enumerate(rows.groupby("family", sort=True)):
        color, marker = _style(str(family), i)
        ax.scatter(part["bits"], part["ppl"], color=color, marker=marker, label=str(family))
        if "density" in part:
            for b, p, d in zip(part["bits"], part["ppl"], part["density"], strict=True):
                ax.annotate(f"d={d:g}", (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    return _finish_ppl_axes(fig, ax, "bits per weight (pruned layers)", "perplexity against bits per weight")


def size_vs_ppl(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against checkpoint size on disk (MB), one series per family; the dense
    fp16 size as a dotted line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if df.empty or "size_bytes" not in df or "ppl" not in df:
        _empty(ax, "no results with a saved checkpoint size yet")
        return fig
    rows = df[pd.to_numeric(df["size_bytes"], errors="coerce").notna() & df["ppl"].notna()]
    if rows.empty:
        _empty(ax, "no results with a saved checkpoint size yet")
        return fig
    for i, (family, part) in enumerate(rows.groupby("family", sort=True)):
        color, marker = _style(str(family), i)
        ax.scatter(part["size_bytes"].astype(float) / 1e6, part["ppl"], color=color, marker=marker,
                   label=str(family))
    if "dense_size_bytes" in rows:
        for size in pd.to_numeric(rows["dense_size_bytes"], errors="coerce").dropna().unique():
            ax.axvline(size / 1e6, color="k", lw=0.8, ls=":")
    return _finish_ppl_axes(fig, ax, "checkpoint size on disk (MB; dotted: dense fp16)",
                            "perplexity against size on disk")


def _finish_ppl_axes(fig: plt.Figure, ax, xlabel: str, title: str) -> plt.Figure:
    """The common finish of the scatter figures: log perplexity, legend, grid, title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def ppl_table(df: pd.DataFrame, families: Sequence[str] = FAMILIES) -> pd.DataFrame:
    """The paper's table: perplexity by (model, evaluation protocol, density) × family,
    unstructured and unquantized rows only (median where a cell has several). Rows measured
    on different windows (:func:`eval_protocol`) never share a row of the table."""
    rows = density_rows(df)
    if rows.empty:
        return pd.DataFrame()
    index = [c for c in ("model", "eval_protocol", "density") if c in rows]
    table = rows.pivot_table(index=index, columns="family", values="ppl", aggfunc="median")
    order = [f for f in families if f in table.columns] + sorted(set(table.columns) - set(families))
    table = table[order]
    if "ppl_dense" in rows and rows["ppl_dense"].notna().any() and len(index) > 1:
        # the dense model's perplexity, as recorded beside each pruned run, as a density-1 row
        dense = rows.groupby(index[:-1])["ppl_dense"].median().dropna()
        for key, value in dense.items():
            key = key if isinstance(key, tuple) else (key,)
            if (*key, 1.0) not in table.index:
                table.loc[(*key, 1.0), :] = np.nan
            table.loc[(*key, 1.0), "dense"] = value
        table = table[[c for c in ["dense", *order] if c in table.columns]]
    table = table.sort_index(ascending=[True] * (len(index) - 1) + [False])
    table.columns.name = None
    return table.reset_index()


def testing_figure(df: pd.DataFrame) -> plt.Figure:
    """Notebook 3's figure: perplexity (log) against density, one line per evaluation set,
    and the achieved density of the pruned layers against the target."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = df[df["ppl"].notna()] if not df.empty and "ppl" in df else df
    if rows.empty:
        _empty(ax1, "no checkpoints evaluated")
    else:
        for source, part in rows.groupby("eval", sort=True):
            part = part.sort_values("density")
            ax1.plot(part["density"], part["ppl"], marker="o", label=str(source))
        ax1.set_yscale("log")
        ax1.set_xlabel("density (fraction of weights kept)")
        ax1.set_ylabel("perplexity (log scale)")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3, which="both")
    ax1.set_title("perplexity of the saved models")
    if df.empty:
        _empty(ax2, "no checkpoints loaded")
    else:
        one = df.drop_duplicates("density").sort_values("density")
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            # no timestamps in the file, so an unchanged figure gives an unchanged file
            meta = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else {}
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
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
