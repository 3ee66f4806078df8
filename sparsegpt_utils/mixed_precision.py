"""Activation-aware mixed-precision quantization: per-row importance, bit allocation under an
exact bit budget, and a summary of what was allocated. Tensors only.

Each output row (channel) of a linear layer gets one width from ``bit_choices`` and its own
grid (per row, or per group of columns). The budget ``target_avg_bits`` counts every stored
bit (DESIGN §1): values, the mask when pruned, scales, zero points and the bit-width map, as
defined once in :func:`sparsegpt_utils.quant.row_storage_bits`.

Two importance measures:

* ``"error"`` — a Hessian-aware error model. Quantizing row ``r`` with step ``Δ_rg`` on grid
  ``g`` adds (rounding noise uniform on ``[-Δ/2, Δ/2]``, independent across weights) a mean
  squared output error per token of ``Σ_j kept_rj · (H_jj / 2) · Δ_rg(j)² / 12`` with
  ``H = 2XXᵀ/n``; ``Δ_rg(b) = range_rg / (2^b − 1)``. Allocation minimises the sum over rows.
* ``"five_factor"`` — a weighted sum of five per-row factors, each divided by its mean over the
  layer (default weights: activation 25%, Hessian 25%, weight 15%, output sensitivity 25%,
  stability 10%; see :func:`importance_factors`). Its predicted error at width ``b`` is
  ``score_r · (2^b − 1)^−2``.

With one width per grid (``unit="group"``: a row's group of ``groupsize`` input columns) the
``"error"`` importance is, by default, measured rather than modelled: each grid's
``Σ_j kept_rj (H_jj/2) (w_rj − Q_b(w_rj))²`` on the grid the solver fits at width ``b``
(:func:`rounding_error_curves`; with clipping, ``QuantSpec.mse``, the clipped grid).

Two allocation methods, both meeting the budget of every layer (so also of the whole model):

* ``"budget"`` — minimises the predicted error: a Lagrangian relaxation (each row picks
  ``argmin_b err_r(b) + λ·cost_r(b)``, λ bisected to the budget), then the bits left over are
  spent greedily by the largest error reduction per bit. Lands within one row step of the
  budget (≤ 1/rows bits per weight below it; never above).
* ``"quantile"`` — rank-based: rows sorted by importance are spread over the widths in equal
  rank bins, shifted down or up until the budget is met, then topped up in importance order.
  Ignores the size of the importance differences, only their order.

A whole-model (global) allocation is supported with ``scope="global"``: a first pass calls
:meth:`MixedPrecisionAllocator.collect` on every layer (e.g. a fast round-to-nearest pass of
the pipeline), :meth:`MixedPrecisionAllocator.fit_global` pools all rows (costs in absolute
bits, so the budget is parameter-weighted) with each layer's errors divided by its output
energy (noise-to-signal ratios are comparable across layers, raw errors are not), and the
real pass looks the widths up by layer name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pandas as pd
import torch

from .quant import (
    QuantSpec,
    cell_storage_bits,
    find_params,
    quant_storage_bits,
    quantize,
    row_storage_bits,
    width_map_bits,
)
from .solver import check_density, inverse_hessian_factor, nm_mask, parse_nm, prune_lowest

__all__ = [
    "FACTORS",
    "DEFAULT_WEIGHTS",
    "importance_factors",
    "five_factor_score",
    "predicted_mask",
    "row_ranges",
    "error_curves",
    "grid_error_curves",
    "rounding_error_curves",
    "resolve_error_model",
    "allocate_budget",
    "allocate_quantile",
    "LayerAllocation",
    "QuantizationStats",
    "MixedPrecisionAllocator",
    "MixedPrecisionConfig",
    "BitAllocator",
    "FixedWidths",
    "build_allocator",
]

FACTORS = ("activation", "hessian", "weight", "output", "stability")
DEFAULT_WEIGHTS = {"activation": 0.25, "hessian": 0.25, "weight": 0.15, "output": 0.25, "stability": 0.10}
METHODS = ("budget", "quantile")
UNITS = ("row", "group")
CONFIG_UNITS = ("auto",) + UNITS  # "auto": per group where the grid has a groupsize, else per row
IMPORTANCES = ("error", "five_factor")
# per grid: "range" models rounding as uniform noise over the min–max step; "rounding" measures it;
# "auto": "rounding" per grid (better at equal bits, bench/README.md), "range" per row
ERROR_MODELS = ("auto", "range", "rounding")


def resolve_error_model(error_model: str, unit: str) -> str:
    """``"range"`` or ``"rounding"`` for a unit (``"row"`` / ``"group"``); ``"auto"``: measured
    per grid, modelled per row. ``"rounding"`` needs per-grid widths."""
    if error_model not in ERROR_MODELS:
        raise ValueError(f"mixed-precision error_model must be one of {ERROR_MODELS}, got {error_model!r}")
    if error_model == "auto":
        return "rounding" if unit == "group" else "range"
    if error_model == "rounding" and unit != "group":
        raise ValueError("mixed-precision error_model 'rounding' is measured per grid: it needs "
                         "unit 'group' and a groupsize")
    return error_model


def _prepare(weight: torch.Tensor, hessian: torch.Tensor):
    """float64 copies with dead inputs handled as the solver does (H_jj = 1, weights zero)."""
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"hessian must be [{W.shape[1]}, {W.shape[1]}], got {list(H.shape)}")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


@torch.no_grad()
def importance_factors(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01
                       ) -> dict[str, torch.Tensor]:
    """The five per-row factors, float64 [rows] each, all growing with salience.

    weight [rows, cols]; hessian [cols, cols] = ``2XXᵀ/n`` (exact running mean).

    * activation: ``Σ_j |w_rj| · ‖x_j‖_rms`` (Wanda's score summed over the row);
      ``‖x_j‖_rms = sqrt(H_jj / 2)``.
    * hessian: ``Σ_j w_rj² / [H⁻¹]_jj`` (the OBS salience of the row; grows with diag(H)),
      with ``H`` damped by ``percdamp · mean(diag H)`` as the solver damps it.
    * weight: ``max_j w_rj − min_j w_rj`` over a range that includes 0 (the min–max grid's
      span, which sets the quantization step at every width).
    * output: ``w_r H w_rᵀ / 2`` = mean over tokens of ``(w_r · x)²``, the row's output energy.
    * stability: ``max_j |w_rj| / rms_j(w_rj)``, the crest factor: rows with outliers put most
      of their values on few grid points and lose the most to a min–max grid.
    """
    W, H = _prepare(weight, hessian)
    damp = percdamp * torch.mean(torch.diagonal(H))
    Hd = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    hinv_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))
    x_rms = torch.sqrt(torch.diagonal(H) / 2)
    lo = torch.clamp(W.min(1).values, max=0)
    hi = torch.clamp(W.max(1).values, min=0)
    rms = torch.sqrt((W**2).mean(1))
    return {
        "activation": (W.abs() * x_rms).sum(1),
        "hessian": (W**2 / hinv_diag).sum(1),
        "weight": hi - lo,
        "output": ((W @ H) * W).sum(1) / 2,
        "stability": torch.where(rms > 0, W.abs().max(1).values / rms.clamp_min(1e-300), 0.0),
    }


def five_factor_score(factors: dict[str, torch.Tensor], weights: dict[str, float] | None = None
                      ) -> torch.Tensor:
    """``Σ_k weight_k · factor_k / mean(factor_k)``, float64 [rows] (weights normalised to 1)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    total = sum(weights.values())
    score = 0
    for k, w in weights.items():
        f = factors[k]
        mean = f.mean()
        score = score + (w / total) * (f / mean if mean > 0 else torch.zeros_like(f))
    return score


@torch.no_grad()
def predicted_mask(weight: torch.Tensor, hessian: torch.Tensor, density: float = 1.0,
                   nm: tuple[int, int] | None = None, mask_blocksize: int = 128,
                   percdamp: float = 0.01) -> torch.Tensor | None:
    """The mask SparseGPT would choose from the weights as they are (score ``w² / [U]_jj²``
    over ``rows × mask_blocksize`` blocks, or per row in N:M groups); None when nothing is
    pruned. An estimate: the solver re-scores weights after its updates."""
    if nm is None and density >= 1:
        return None
    W, H = _prepare(weight, hessian)
    U, _ = inverse_hessian_factor(H.float(), percdamp)
    score = W**2 / torch.diagonal(U).double()[None, :] ** 2
    if nm is not None:
        return nm_mask(score, *parse_nm(nm))
    kept = torch.ones_like(score, dtype=torch.bool)
    for c in range(0, score.shape[1], mask_blocksize):
        blk = score[:, c:c + mask_blocksize]
        kept[:, c:c + mask_blocksize] = prune_lowest(blk, round(blk.numel() * (1 - density)))
    return kept


def row_ranges(weight: torch.Tensor, groupsize: int | None = None, sym: bool = False,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Span of each grid as :func:`~sparsegpt_utils.quant.find_params` sets it (min–max with 0
    inside; symmetric: ``2·max|w|``), float64 [rows, groups]; only kept weights count."""
    W = weight.detach().to(torch.float64)
    if mask is not None:
        W = W * mask.to(W.device)
    g = groupsize or W.shape[1]
    spans = []
    for c in range(0, W.shape[1], g):
        blk = W[:, c:c + g]
        lo = torch.clamp(blk.min(1).values, max=0)
        hi = torch.clamp(blk.max(1).values, min=0)
        spans.append(2 * torch.maximum(lo.abs(), hi) if sym else hi - lo)
    return torch.stack(spans, 1)


@torch.no_grad()
def grid_error_curves(weight: torch.Tensor, hessian: torch.Tensor, bit_choices: Sequence[int],
                      groupsize: int, sym: bool = False, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """:func:`error_curves` per grid, float64 [rows, n_groups, K]: the predicted error of each
    group of ``groupsize`` columns of each row. ``H_jj`` (the calibration activations' energy
    on input ``j``) makes a group that holds salient inputs cost more at every width."""
    W, H = _prepare(weight, hessian)
    spans = row_ranges(W, groupsize, sym, mask)  # [rows, groups]
    hdiag = torch.diagonal(H) / 2
    m = torch.ones_like(W) if mask is None else mask.to(W.device, torch.float64)
    sens = torch.stack([(m[:, c:c + groupsize] * hdiag[c:c + groupsize]).sum(1)
                        for c in range(0, W.shape[1], groupsize)], 1)
    levels = torch.tensor([(2.0**b - 1) ** -2 for b in bit_choices], dtype=torch.float64, device=W.device)
    return (sens * spans**2 / 12)[:, :, None] * levels


@torch.no_grad()
def rounding_error_curves(weight: torch.Tensor, hessian: torch.Tensor, bit_choices: Sequence[int],
                          groupsize: int, sym: bool = False, mse: bool = False,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Measured, not modelled: float64 [rows, n_groups, K], each grid's output error
    ``Σ_j kept_rj (H_jj/2) (w_rj − Q_b(w_rj))²`` when rounded to the nearest point of the grid
    :func:`~sparsegpt_utils.quant.find_params` fits at each width ``b`` (min–max, or with
    ``mse`` the clipped range the solver will use). Unlike the uniform-noise model of
    :func:`grid_error_curves` it sees what clipping saves and where weights sit on the grid,
    which matters most at 2 and 3 bits. Non-increasing along K (each width is charged at most
    the error of a narrower one)."""
    W, H = _prepare(weight, hessian)
    if mask is not None:
        W = W * mask.to(W.device, torch.float64)
    hdiag = torch.diagonal(H) / 2
    rows, cols = W.shape
    full = cols // groupsize * groupsize
    # the whole groups as one batch of [rows·n_full, groupsize] grids (one find_params per
    # width, not one per group), then the short last group if there is one
    parts = []
    if full:
        parts.append((W[:, :full].float().reshape(-1, groupsize),
                      hdiag[:full].reshape(-1, groupsize).repeat(rows, 1)))
    if full < cols:
        parts.append((W[:, full:].float(), hdiag[full:].expand(rows, -1)))
    out = []
    for blk, hd in parts:
        per_b = []
        for b in bit_choices:
            bits = torch.full((blk.shape[0],), int(b), dtype=torch.int64, device=W.device)
            scale, zero = find_params(blk, bits, sym, mse)
            q = quantize(blk, scale, zero, (2.0 ** bits.float() - 1)[:, None])
            per_b.append((((q - blk).double() ** 2) * hd).sum(1).reshape(rows, -1))
        out.append(torch.stack(per_b, 2))
    # grids of different widths are not nested, so a wider one can round a group slightly worse;
    # the allocator needs errors non-increasing in the width (and would not pick the worse one)
    return torch.cat(out, 1).cummin(dim=2).values


@torch.no_grad()
def error_curves(weight: torch.Tensor, hessian: torch.Tensor, bit_choices: Sequence[int],
                 groupsize: int | None = None, sym: bool = False,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted increase of the mean squared output error per token, float64 [rows, K]:
    ``Σ_j kept_rj (H_jj/2) Δ_r(j)² / 12`` with ``Δ = span / (2^b − 1)`` for each ``b`` in
    ``bit_choices``."""
    W, H = _prepare(weight, hessian)
    g = groupsize or W.shape[1]
    spans = row_ranges(W, groupsize, sym, mask)  # [rows, groups]
    hdiag = torch.diagonal(H) / 2
    if mask is None:
        sens = torch.stack([hdiag[c:c + g].sum().expand(W.shape[0]) for c in range(0, W.shape[1], g)], 1)
    else:
        m = mask.to(W.device, torch.float64)
        sens = torch.stack([(m[:, c:c + g] * hdiag[c:c + g]).sum(1) for c in range(0, W.shape[1], g)], 1)
    base = (sens * spans**2).sum(1) / 12  # error at step = span
    levels = torch.tensor([(2.0**b - 1) ** -2 for b in bit_choices], dtype=torch.float64, device=W.device)
    return base[:, None] * levels[None, :]


def _check_budget(cost: torch.Tensor, budget: float, what: str) -> None:
    low = float(cost[:, 0].sum())
    if low > budget * (1 + 1e-12):
        raise ValueError(f"{what}: even the narrowest width needs {low:.0f} bits, more than the "
                         f"budget of {budget:.0f} bits")


def _fill(choice: torch.Tensor, cost: torch.Tensor, budget: float, gain: torch.Tensor) -> torch.Tensor:
    """Spend what is left of ``budget`` one row step at a time, best ``gain`` per bit first
    (``gain`` [rows, K]: what a row gains at each width; higher is better)."""
    rows, K = cost.shape
    r = torch.arange(rows, device=cost.device)
    left = budget - float(cost[r, choice].sum())
    for _ in range(rows * K):
        up = (choice + 1).clamp(max=K - 1)
        step = cost[r, up] - cost[r, choice]
        ok = (choice < K - 1) & (step <= left + 1e-9)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, (gain[r, up] - gain[r, choice]) / step.clamp_min(1e-12), -math.inf)
        best = int(torch.argmax(ratio))
        choice[best] += 1
        left -= float(step[best])
    return choice


def allocate_budget(err: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Choice index per row, int64 [rows], minimising ``Σ_r err[r, k_r]`` subject to
    ``Σ_r cost[r, k_r] ≤ budget``. ``err`` non-increasing and ``cost`` increasing along K."""
    _check_budget(cost, budget, "target_avg_bits")
    r = torch.arange(cost.shape[0], device=cost.device)
    pick = lambda lam: torch.argmin(err + lam * cost, dim=1)
    if float(cost[:, -1].sum()) <= budget:
        return torch.full_like(r, cost.shape[1] - 1)
    # the smallest λ whose choices fit; λ spans the error-per-bit slopes of all rows
    scale = float(err.max()) / float(cost.diff(dim=1).min().clamp_min(1e-12)) + 1e-300
    lo, hi = 0.0, scale * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(cost[r, pick(mid)].sum()) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return _fill(pick(hi), cost, budget, -err)


def allocate_quantile(importance: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Choice index per row, int64 [rows]: rank bins shifted to meet ``budget``, then the most
    important rows are upgraded while bits are left. More important rows never get fewer bits."""
    _check_budget(cost, budget, "target_avg_bits")
    rows, K = cost.shape
    r = torch.arange(rows, device=cost.device)
    rank = torch.empty(rows, dtype=torch.float64, device=cost.device)
    rank[torch.argsort(importance, stable=True)] = torch.arange(rows, dtype=torch.float64, device=cost.device)
    u = (rank + 0.5) / rows
    pick = lambda s: torch.clamp(torch.floor(K * u + s), 0, K - 1).to(torch.int64)
    lo, hi = -float(K), float(K)
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(cost[r, pick(mid)].sum()) <= budget:
            lo = mid
        else:
            hi = mid
    choice = pick(lo)
    left = budget - float(cost[r, choice].sum())
    for i in torch.argsort(importance, descending=True, stable=True).tolist():
        # one step up for the most important rows first, keeping the order monotone
        if choice[i] < K - 1:
            step = float(cost[i, choice[i] + 1] - cost[i, choice[i]])
            if step <= left + 1e-9 and (rank[i] == rows - 1 or bool(
                    (choice[rank > rank[i]] > choice[i]).all())):
                choice[i] += 1
                left -= step
    return choice


@dataclass
class LayerAllocation:
    """What one layer was given."""

    name: str
    rows: int
    cols: int
    bits: torch.Tensor  # int64 [rows] (one width per row) or [rows, n_groups] (one per grid)
    importance: torch.Tensor  # float64, one per row or grid (five-factor score, or predicted error)
    storage_bits: float  # planned stored bits (with the predicted mask when pruned)
    predicted_error: float  # Σ_r err_r(b_r) of the error model
    actual_bits: float | None = None  # stored bits with the solver's real mask (see measure)


@dataclass
class QuantizationStats:
    """Per-layer and global summary of a mixed-precision allocation."""

    bit_choices: tuple[int, ...]
    target_avg_bits: float
    layers: list[LayerAllocation] = field(default_factory=list)
    groupsize: int | None = None
    sym: bool = False
    scale_bits: int = 16

    def _weights_at(self, a: LayerAllocation) -> torch.Tensor:
        """Weights stored at each width of ``a``, float64 [same shape as a.bits]."""
        if a.bits.ndim == 1:
            return torch.full(a.bits.shape, float(a.cols), dtype=torch.float64)
        size = torch.full((a.bits.shape[1],), float(self.groupsize), dtype=torch.float64)
        size[-1] = a.cols - self.groupsize * (a.bits.shape[1] - 1)
        return size.expand(a.bits.shape)

    def record(self, alloc: LayerAllocation) -> None:
        self.layers = [a for a in self.layers if a.name != alloc.name] + [alloc]

    @property
    def params(self) -> int:
        return sum(a.rows * a.cols for a in self.layers)

    @property
    def avg_bits(self) -> float:
        """Planned bits per weight over all layers, every stored bit (parameter-weighted)."""
        return sum(a.storage_bits for a in self.layers) / max(1, self.params)

    @property
    def actual_avg_bits(self) -> float | None:
        """Bits per weight with the real masks, once :meth:`measure` has seen them."""
        if not self.layers or any(a.actual_bits is None for a in self.layers):
            return None
        return sum(a.actual_bits for a in self.layers) / self.params

    @property
    def avg_width(self) -> float:
        """Parameter-weighted mean width (values only, no metadata)."""
        total = sum(float((a.bits.double() * self._weights_at(a)).sum()) for a in self.layers)
        return total / max(1, self.params)

    def histogram(self) -> dict[int, int]:
        """Units per width over all layers (rows, or grids for layers with one width per grid)."""
        return {b: sum(int((a.bits == b).sum()) for a in self.layers) for b in self.bit_choices}

    def measure(self, masks: dict[str, torch.Tensor]) -> float | None:
        """Record the stored bits with the solver's real masks (name → bool [rows, cols]);
        returns :attr:`actual_avg_bits`."""
        for a in self.layers:
            if a.name in masks:
                m = masks[a.name]
                a.actual_bits = quant_storage_bits(a.rows, a.cols, a.bits, self.groupsize, self.sym,
                                                   m.cpu().bool(), self.scale_bits)
        return self.actual_avg_bits

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer: shape, unit (``row`` or ``grid``), avg width, bits per weight
        (planned / actual), rows per width (``rows_Nb``: one-width-per-row layers), the share
        of the layer's weights at each width (``share_Nb``), importance range, predicted error."""
        out = []
        for a in self.layers:
            n = a.rows * a.cols
            at = self._weights_at(a)
            row = {"layer": a.name, "rows": a.rows, "columns": a.cols, "params": n,
                   "unit": "row" if a.bits.ndim == 1 else "grid",
                   "avg_width": float((a.bits.double() * at).sum()) / n, "avg_bits": a.storage_bits / n,
                   "avg_bits_actual": None if a.actual_bits is None else a.actual_bits / n}
            row.update({f"rows_{b}b": int((a.bits == b).sum()) if a.bits.ndim == 1 else None
                        for b in self.bit_choices})
            row.update({f"share_{b}b": float(at[a.bits == b].sum()) / n for b in self.bit_choices})
            row.update({"importance_min": float(a.importance.min()),
                        "importance_max": float(a.importance.max()),
                        "predicted_error": a.predicted_error})
            out.append(row)
        return pd.DataFrame(out)

    def summary(self) -> str:
        hist = self.histogram()
        total = max(1, sum(hist.values()))
        lines = [
            f"mixed precision over {len(self.layers)} layers, {self.params:,} weights; "
            f"widths {self.bit_choices}",
            f"target {self.target_avg_bits:.3f} bits/weight; planned {self.avg_bits:.4f} "
            f"(values {self.avg_width:.3f} + metadata {self.avg_bits - self.avg_width:.3f})"
            + ("" if self.actual_avg_bits is None else f"; with real masks {self.actual_avg_bits:.4f}"),
            ("rows" if all(a.bits.ndim == 1 for a in self.layers) else "rows or grids") + " per width: "
            + ", ".join(f"{b}b {hist[b]} ({100 * hist[b] / total:.1f}%)" for b in hist),
        ]
        if self.layers:
            df = self.to_dataframe()
            lines.append(f"per-layer bits/weight: min {df.avg_bits.min():.3f}, max {df.avg_bits.max():.3f}; "
                         f"importance range {df.importance_min.min():.3g} .. {df.importance_max.max():.3g}")
        return "\n".join(lines)

    def print_summary(self) -> None:
        print(self.summary())

    def group_widths(self) -> pd.DataFrame:
        """Mean width of each group of ``groupsize`` input columns (over the rows), one row per
        layer and one column per group (``g0``, ``g1``, ...); a layer with one width per row
        has the same mean in every group. Empty without a groupsize."""
        if self.groupsize is None:
            return pd.DataFrame()
        out = []
        for a in self.layers:
            groups = -(-a.cols // self.groupsize)
            bits = a.bits.double() if a.bits.ndim == 2 else a.bits.double()[:, None].expand(-1, groups)
            out.append({"layer": a.name, **{f"g{k}": float(v) for k, v in enumerate(bits.mean(0))}})
        return pd.DataFrame(out).set_index("layer")

    def plot_groups(self, path=None, ax=None):
        """Heat map of :meth:`group_widths`: layers down, input-column groups across. Saves to
        ``path`` when given; returns the figure."""
        import matplotlib.pyplot as plt

        df = self.group_widths()
        if df.empty:
            raise ValueError("plot_groups needs an allocation with a groupsize")
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(5, 0.25 * df.shape[1] + 3), max(3, 0.18 * len(df) + 1.5)))
        else:
            fig = ax.figure
        image = ax.imshow(df.to_numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=self.bit_choices[0], vmax=self.bit_choices[-1])
        ax.set_xlabel(f"input-column group ({self.groupsize} columns)")
        ax.set_ylabel("layer (pipeline order)")
        fig.colorbar(image, ax=ax, label="mean width (bits)")
        ax.set_title("bit widths per layer and column group")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig

    def plot(self, path=None, ax=None):
        """Stacked bars: the share of each layer's rows at each width, with bits/weight
        (metadata included) on a second axis. Saves to ``path`` (PNG/SVG) when given; returns
        the figure."""
        import matplotlib.pyplot as plt

        df = self.to_dataframe()
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(df) + 2), 3.5))
        else:
            fig = ax.figure
        x = range(len(df))
        bottom = pd.Series(0.0, index=df.index)
        for b in self.bit_choices:
            share = df[f"share_{b}b"]
            ax.bar(x, share, bottom=bottom, width=0.9, label=f"{b} bits")
            bottom += share
        ax.set_ylabel("share of weights")
        ax.set_xlabel("layer (pipeline order)")
        ax.set_xlim(-0.5, len(df) - 0.5)
        ax2 = ax.twinx()
        ax2.plot(list(x), df["avg_bits"], color="black", lw=1, label="bits/weight")
        ax2.axhline(self.target_avg_bits, color="black", ls=":", lw=1)
        ax2.set_ylabel("bits per weight (all stored bits)")
        ax.legend(loc="upper left", fontsize="small", ncol=len(self.bit_choices))
        ax.set_title(f"mixed precision: {self.avg_bits:.3f} bits/weight (target {self.target_avg_bits})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


@dataclass
class MixedPrecisionConfig:
    """Activation-aware mixed precision under a bit budget.

    target_avg_bits: bits per weight, every stored bit included (DESIGN §1), in [2, 8].
    method: ``"budget"`` (minimise predicted error) or ``"quantile"`` (rank bins).
    unit: ``"row"`` (one width per output row), ``"group"`` (one width per grid: a row's group
    of ``groupsize`` input columns; needs a groupsize), or ``"auto"`` (``"group"`` when the grid
    has a groupsize, else ``"row"``). Per group wins on smollm2-135m at equal real bits
    (bench/README.md, "Quantization and mixed precision").
    error_model: how a unit's error at each width is predicted: ``"range"`` (uniform rounding
    noise over the min–max step), ``"rounding"`` (per group only: measured on the grid the
    solver fits, clipping included) or ``"auto"`` (``"rounding"`` per group, else ``"range"``).
    """

    target_avg_bits: float
    method: str = "budget"
    unit: str = "auto"
    error_model: str = "auto"

    def __post_init__(self):
        if not isinstance(self.target_avg_bits, (int, float)) or not 2 <= self.target_avg_bits <= 8:
            raise ValueError(
                f"target_avg_bits must be in [2, 8] bits per weight, got {self.target_avg_bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"bit allocation method must be one of {METHODS}, got {self.method!r}")
        if self.unit not in CONFIG_UNITS:
            raise ValueError(f"mixed-precision unit must be one of {CONFIG_UNITS}, got {self.unit!r}")
        resolve_error_model(self.error_model, "group")  # a name check: per grid every model exists

    def unit_for(self, groupsize: int | None) -> str:
        """The unit a grid with ``groupsize`` input columns per scale (None: per row) gets."""
        if self.unit == "auto":
            return "row" if groupsize is None else "group"
        if self.unit == "group" and groupsize is None:
            raise ValueError("mixed-precision unit 'group' needs a groupsize (--groupsize, "
                             "QuantSpec(groupsize=...)): the input columns that share a width")
        return self.unit

    def error_model_for(self, groupsize: int | None) -> str:
        """The error model a grid with ``groupsize`` input columns per scale gets."""
        return resolve_error_model(self.error_model, self.unit_for(groupsize))


@runtime_checkable
class BitAllocator(Protocol):
    """What the pruning pipeline asks of a mixed-precision hook (``PruneConfig.bit_allocator``).

    ``__call__(name, weight, hessian)``: the bit width of each row of ``weight`` [rows, cols]
    given its ``hessian`` [cols, cols], int64 [rows], before the layer is solved.
    ``refit(name, weight, hessian, mask)``: after a first solve chose the pruning ``mask``
    (bool [rows, cols], True = kept), new widths planned for it, or None to keep them.
    ``widths(name)``: the widths last given for layer ``name``.
    ``stats``: a :class:`QuantizationStats` to record the real bits in (its ``measure`` is
    called with the final masks), or None.
    """

    stats: QuantizationStats | None

    def __call__(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor: ...

    def refit(self, name: str, weight: torch.Tensor, hessian: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor | None: ...

    def widths(self, name: str) -> torch.Tensor: ...


class FixedWidths:
    """A :class:`BitAllocator` from a function ``(name, weight, hessian) -> widths [rows]``:
    no re-planning, no statistics (e.g. hand-set widths, or :meth:`MixedPrecisionAllocator.collect`
    for the first pass of a global allocation)."""

    stats = None

    def __init__(self, widths_of: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]):
        self._widths_of = widths_of
        self._given: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        self._given[name] = torch.as_tensor(self._widths_of(name, weight, hessian)).to(torch.int64).cpu()
        return self._given[name].clone()

    def refit(self, name, weight, hessian, mask) -> None:
        return None

    def widths(self, name: str) -> torch.Tensor:
        if name not in self._given:
            raise KeyError(f"layer {name!r} was never given widths")
        return self._given[name].clone()


class MixedPrecisionAllocator:
    """Bit widths under a bit budget, per output row or per grid; a :class:`BitAllocator`
    (``PruneConfig.bit_allocator``; the pipeline builds one from ``PruneConfig.mixed`` with
    :func:`build_allocator`).

    target_avg_bits: bits per weight, every stored bit included (DESIGN §1).
    method: ``"budget"`` (minimise predicted error) or ``"quantile"`` (rank bins).
    bit_choices: allowed widths. importance: ``"error"`` or ``"five_factor"``.
    weights: five-factor weights (keys from :data:`FACTORS`; default :data:`DEFAULT_WEIGHTS`).
    groupsize, sym, scale_bits, mse: the grid the solver will use (must match ``PruneConfig.quant``).
    error_model: ``"range"``, the uniform-noise model (:func:`error_curves`,
    :func:`grid_error_curves`), or, per grid only, ``"rounding"``, each grid's rounding error
    measured at every width (:func:`rounding_error_curves`); ``"auto"``: ``"rounding"`` per grid,
    ``"range"`` per row.
    density / nm: the pruning the solver will do (the mask costs 1 bit per weight and only
    kept weights store codes; the per-row kept counts are predicted from the weights).
    scope: ``"layer"`` (each layer meets the budget) or ``"global"`` (see :meth:`fit_global`).
    unit: ``"row"`` (one width per output row: widths int64 [rows]) or ``"group"`` (one width
    per grid, i.e. per row and group of ``groupsize`` input columns: widths [rows, n_groups];
    needs a groupsize). Per grid, the error model weighs each group by its inputs' activation
    energy ``H_jj``, so groups holding salient input channels get the bits; each group's
    grid is set when the solver's column loop reaches it (or before it, with static groups).
    Only the ``"error"`` importance is defined per grid.
    """

    def __init__(self, target_avg_bits: float, method: str = "budget",
                 bit_choices: Sequence[int] = (2, 3, 4, 6, 8), importance: str = "error",
                 weights: dict[str, float] | None = None, groupsize: int | None = None,
                 density: float = 1.0, nm: tuple[int, int] | str | None = None, sym: bool = False,
                 scale_bits: int = 16, percdamp: float = 0.01, mask_blocksize: int = 128,
                 scope: str = "layer", unit: str = "row", mse: bool = False,
                 error_model: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"bit allocation method must be one of {METHODS}, got {method!r}")
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        choices = tuple(sorted({int(b) for b in bit_choices}))
        if not choices or choices[0] < 1 or choices[-1] > 16:
            raise ValueError(f"bit_choices must be widths in [1, 16], got {tuple(bit_choices)}")
        if not isinstance(target_avg_bits, (int, float)) or not choices[0] <= target_avg_bits <= 32:
            raise ValueError(f"target_avg_bits must be in [{choices[0]}, 32] bits per weight "
                             f"(metadata included), got {target_avg_bits!r}")
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        bad = set(weights) - set(FACTORS)
        if bad or any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must map a subset of {FACTORS} to non-negative numbers "
                             f"with a positive sum, got {weights}")
        if groupsize is not None and groupsize < 1:
            raise ValueError(f"groupsize must be a positive integer or None, got {groupsize}")
        if unit not in UNITS:
            raise ValueError(f"mixed-precision unit must be one of {UNITS}, got {unit!r}")
        if unit == "group" and groupsize is None:
            raise ValueError("mixed-precision unit 'group' needs a groupsize (input columns per width)")
        error_model = resolve_error_model(error_model, unit)
        if unit == "group" and importance != "error":
            raise ValueError("mixed-precision unit 'group' allocates with the 'error' importance only")
        self.unit, self.mse, self.error_model = unit, mse, error_model
        self.nm = parse_nm(nm)
        self.density = self.nm[0] / self.nm[1] if self.nm else check_density(density)
        self.target_avg_bits = float(target_avg_bits)
        self.method, self.importance, self.scope = method, importance, scope
        self.bit_choices, self.weights = choices, weights
        self.groupsize, self.sym, self.scale_bits = groupsize, sym, scale_bits
        self.percdamp, self.mask_blocksize = percdamp, mask_blocksize
        self.map_bits = width_map_bits(0, choices[0], choices[-1])
        self.stats = QuantizationStats(choices, self.target_avg_bits, groupsize=groupsize, sym=sym,
                                       scale_bits=scale_bits)
        self._curves: dict[str, dict] = {}
        self._plan: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"MixedPrecisionAllocator(target_avg_bits={self.target_avg_bits}, method={self.method!r}, "
                f"importance={self.importance!r}, bit_choices={self.bit_choices}, "
                f"groupsize={self.groupsize}, density={self.density}, scope={self.scope!r}, "
                f"unit={self.unit!r}, mse={self.mse}, error_model={self.error_model!r})")

    @torch.no_grad()
    def curves(self, weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Per-unit (row, or grid with ``unit="group"``) error [units, K], cost [units, K]
        (stored bits), importance [units], energy; ``shape`` is the widths' shape.
        ``mask`` (bool [rows, cols], True = kept): the pruning to plan for; by default the
        mask SparseGPT would choose from the weights as they are (:func:`predicted_mask`)."""
        rows, cols = weight.shape
        if mask is None:
            mask = predicted_mask(weight, hessian, self.density, self.nm, self.mask_blocksize, self.percdamp)
        elif bool(mask.all()):
            mask = None
        W = weight.detach().double()
        energy = float((((W @ hessian.double().to(W.device)) * W).sum() / 2).clamp_min(1e-30))
        if self.unit == "group":
            G = self.groupsize
            groups = -(-cols // G)
            kept = None if mask is None else torch.stack(
                [k.sum(1) for k in mask.cpu().split(G, dim=1)], 1).double()
            cost = torch.stack([cell_storage_bits(torch.full((rows, groups), b), cols, G, self.sym, kept,
                                                  self.scale_bits, self.map_bits).flatten()
                                for b in self.bit_choices], 1)
            if self.error_model == "rounding":
                err = rounding_error_curves(weight, hessian, self.bit_choices, G, self.sym, self.mse,
                                            mask).cpu()
            else:
                err = grid_error_curves(weight, hessian, self.bit_choices, G, self.sym, mask).cpu()
            err = err.reshape(rows * groups, -1)
            mid = err[:, len(self.bit_choices) // 2]
            return {"err": err, "model_err": err, "cost": cost, "importance": mid, "energy": energy,
                    "rows": rows, "cols": cols, "shape": (rows, groups)}
        # per-row kept counts predicted from the weights as they are (the solver's real mask
        # is chosen after the widths: see refit; QuantizationStats.measure counts with it)
        kept = None if mask is None else mask.sum(1).double().cpu()
        cost = torch.stack([row_storage_bits(b, cols, self.groupsize, self.sym, kept, self.scale_bits,
                                             self.map_bits, rows) for b in self.bit_choices], 1)
        err = error_curves(weight, hessian, self.bit_choices, self.groupsize, self.sym, mask).cpu()
        if self.importance == "five_factor":
            score = five_factor_score(importance_factors(weight, hessian, self.percdamp), self.weights).cpu()
            levels = torch.tensor([(2.0**b - 1) ** -2 for b in self.bit_choices], dtype=torch.float64)
            err_used, importance = score[:, None] * levels[None, :], score
        else:
            err_used, importance = err, err[:, len(self.bit_choices) // 2]
        return {"err": err_used, "model_err": err, "cost": cost, "importance": importance,
                "energy": energy, "rows": rows, "cols": cols, "shape": (rows,)}

    def _allocate(self, c: dict, budget: float) -> torch.Tensor:
        if self.method == "budget":
            return allocate_budget(c["err"], c["cost"], budget)
        return allocate_quantile(c["importance"], c["cost"], budget)

    def _record(self, name: str, c: dict, choice: torch.Tensor) -> torch.Tensor:
        r = torch.arange(c["cost"].shape[0])
        bits = torch.tensor(self.bit_choices, dtype=torch.int64)[choice].reshape(c["shape"])
        self.stats.record(LayerAllocation(
            name, c["rows"], c["cols"], bits, c["importance"], float(c["cost"][r, choice].sum()),
            float(c["model_err"][r, choice].sum())))
        return bits

    def __call__(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """Bit width of each row of ``weight`` [rows, cols] given ``hessian`` [cols, cols];
        int64 [rows] (on CPU), or of each grid, [rows, n_groups], with ``unit="group"``."""
        if self.scope == "global":
            if name not in self._plan:
                raise KeyError(f"no global plan for layer {name!r}: call collect() on every layer "
                               "and fit_global() first")
            return self._plan[name].clone()
        rows, cols = weight.shape
        c = self.curves(weight, hessian)
        try:
            choice = self._allocate(c, self.target_avg_bits * rows * cols)
        except ValueError as err:
            low = float(c["cost"][:, 0].sum()) / (rows * cols)
            raise ValueError(f"target_avg_bits={self.target_avg_bits} is below what layer {name} "
                             f"needs at the narrowest width ({low:.3f} bits per weight with metadata)"
                             ) from err
        return self._record(name, c, choice)

    def widths(self, name: str) -> torch.Tensor:
        """The widths (int64 [rows], or [rows, n_groups]) last planned for layer ``name``."""
        for a in self.stats.layers:
            if a.name == name:
                return a.bits.clone()
        raise KeyError(f"layer {name!r} was never allocated")

    def refit(self, name: str, weight: torch.Tensor, hessian: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor | None:
        """Re-plan layer ``name`` for the mask a first solve really chose (bool [rows, cols]).

        The widths are fixed before the solver picks its mask, so they were planned on
        predicted per-row kept counts; the real counts differ, and with them the stored bits.
        Planning again on the real counts (the layer's budget unchanged: target × weights, or
        its share of a global plan) and solving once more brings the real bits to the budget.
        ``weight`` is the layer's weight *before* that solve. Returns the new widths, or None
        when they are unchanged."""
        old = next((a for a in self.stats.layers if a.name == name), None)
        if old is None:
            raise KeyError(f"refit: layer {name!r} was never allocated")
        rows, cols = weight.shape
        budget = self.target_avg_bits * rows * cols if self.scope == "layer" else old.storage_bits
        c = self.curves(weight, hessian, mask.to(weight.device))
        try:
            choice = self._allocate(c, budget)
        except ValueError:
            return None  # the real mask leaves no cheaper plan: keep the first one
        bits = torch.tensor(self.bit_choices, dtype=torch.int64)[choice].reshape(c["shape"])
        if torch.equal(bits, old.bits):
            return None
        if self.scope == "global":
            self._plan[name] = bits
        return self._record(name, c, choice)

    # -- whole-model allocation ----------------------------------------------------------------
    def collect(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """First pass of a global allocation: remember this layer's curves; returns the width
        nearest to the target for every row (``FixedWidths(alloc.collect)`` is the allocator
        of that pass)."""
        self._curves[name] = self.curves(weight, hessian)
        nearest = min(self.bit_choices, key=lambda b: abs(b - self.target_avg_bits))
        return torch.full(self._curves[name]["shape"], nearest, dtype=torch.int64)

    def fit_global(self) -> dict[str, torch.Tensor]:
        """Allocate all collected rows under one budget (target × all weights); each layer's
        errors are divided by its output energy. Returns (and keeps) name → widths."""
        if not self._curves:
            raise RuntimeError("fit_global() needs collect() to have seen the layers first")
        names = list(self._curves)
        err = torch.cat([self._curves[n]["err"] / self._curves[n]["energy"] for n in names])
        imp = torch.cat([self._curves[n]["importance"] / self._curves[n]["energy"] for n in names])
        cost = torch.cat([self._curves[n]["cost"] for n in names])
        budget = self.target_avg_bits * sum(self._curves[n]["rows"] * self._curves[n]["cols"] for n in names)
        choice = (allocate_budget(err, cost, budget) if self.method == "budget"
                  else allocate_quantile(imp, cost, budget))
        start = 0
        for n in names:
            c = self._curves[n]
            units = c["cost"].shape[0]
            self._plan[n] = self._record(n, c, choice[start:start + units])
            start += units
        return dict(self._plan)


def build_allocator(mixed: MixedPrecisionConfig, quant: QuantSpec, density: float = 1.0,
                    nm: tuple[int, int] | str | None = None, percdamp: float = 0.01,
                    mask_blocksize: int = 128) -> MixedPrecisionAllocator:
    """The allocator a pruning run with ``mixed`` uses: the grid (groupsize, symmetric or not)
    from ``quant``, the pruning (``density`` kept, or ``nm``) the solver will do."""
    return MixedPrecisionAllocator(mixed.target_avg_bits, mixed.method, groupsize=quant.groupsize,
                                   density=density, nm=nm, sym=quant.sym, percdamp=percdamp,
                                   mask_blocksize=mask_blocksize, unit=mixed.unit_for(quant.groupsize),
                                   mse=quant.mse, error_model=mixed.error_model_for(quant.groupsize))
