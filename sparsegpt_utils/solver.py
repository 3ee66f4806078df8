"""SparseGPT (Frantar & Alistarh, 2023) on one weight matrix, and the magnitude / Wanda masks.

Tensors only: no model, no I/O. Everything runs on the device of the tensors it is given.
Conventions: ``weight`` is [rows, columns] = [out_features, in_features]; ``mask`` is a bool
tensor of the same shape that is True where a weight is **kept**; ``density`` is the kept
fraction (sparsity = 1 - density).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .quant import QuantGrid, QuantSpec, find_params, quantize

__all__ = [
    "nm_text",
    "EmptyRowsWarning",
    "HessianAccumulator",
    "SolveResult",
    "sparsegpt_solve",
    "inverse_hessian_factor",
    "magnitude_mask",
    "wanda_mask",
    "nm_mask",
    "prune_lowest",
    "check_density",
    "check_finite",
    "parse_nm",
]


def check_density(density: float, name: str = "density") -> float:
    if not isinstance(density, (int, float)) or not 0 < float(density) <= 1:
        raise ValueError(f"{name} must be in (0, 1] (fraction of weights kept), got {density!r}")
    return float(density)


def nm_text(nm) -> str | None:
    """(2, 4) or "2:4" -> "2:4"."""
    if nm is None:
        return None
    return nm if isinstance(nm, str) else f"{nm[0]}:{nm[1]}"


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4). Requires 0 < N < M."""
    if nm is None:
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(p) for p in nm.split(":"))
        except ValueError:
            raise ValueError(f"nm must look like 'N:M' (e.g. 2:4), got {nm!r}") from None
    else:
        n, m = nm
    if not 0 < n < m:
        raise ValueError(f"nm N:M needs 0 < N < M, got {n}:{m}")
    return int(n), int(m)


def _layer(name: str | None) -> str:
    return f"layer {name}" if name else "this layer"


def check_finite(tensor: torch.Tensor, what: str, name: str | None = None) -> None:
    """Raise a ValueError naming the layer when ``tensor`` holds NaN or inf."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        raise ValueError(f"{_layer(name)}: the {what} holds {int(bad.sum())} non-finite values "
                         "(NaN or inf); refusing to prune it")


class EmptyRowsWarning(RuntimeWarning):
    """A mask keeps no weight of some rows that had one (their outputs become the bias)."""


def _warn_empty_rows(kept: torch.Tensor, weight: torch.Tensor, name: str | None) -> None:
    """One warning when the mask keeps nothing of rows that had a nonzero weight."""
    emptied = int((~kept.any(1) & (weight != 0).any(1).to(kept.device)).sum())
    if emptied:
        warnings.warn(f"{_layer(name)}: {emptied} of {kept.shape[0]} rows keep no weight at this "
                      "density; their outputs are zeroed", EmptyRowsWarning, stacklevel=3)


class HessianAccumulator:
    """Running mean ``H = (2/n) Σ x xᵀ`` over the ``n`` tokens seen, in float32.

    ``add(x, token_mask)`` takes activations [..., columns] and an optional bool mask of the
    leading shape that is False at padding tokens, which are left out. ``diagonal_only`` keeps
    just ``diag H`` [columns] (all Wanda needs: d instead of d² work per token). ``name``: the
    layer, for messages.

    ``add`` never waits for the device; reading :attr:`hessian` (or :meth:`column_norms`)
    checks what was accumulated: non-finite activations (NaN / inf, or an overflow) and a run
    in which no token reached the layer (every batch all padding) raise a ValueError naming
    the layer.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None,
                 diagonal_only: bool = False, name: str | None = None):
        shape = (columns,) if diagonal_only else (columns, columns)
        self._hessian = torch.zeros(shape, dtype=torch.float32, device=device)
        self.diagonal_only = diagonal_only
        self.name = name
        self.tokens = 0
        self._checked_at = -1  # the token count the last check saw

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        if token_mask is not None:
            x = x[token_mask.reshape(-1).to(x.device).bool()]
        n = x.shape[0]
        if n == 0:
            return
        x = x.to(self._hessian.device, torch.float32)
        self._hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = math.sqrt(2 / self.tokens) * x
        if self.diagonal_only:
            self._hessian += (x * x).sum(0)
        else:
            self._hessian.addmm_(x.T, x)

    @property
    def hessian(self) -> torch.Tensor:
        """``H`` [columns, columns] (or ``diag H`` [columns] when ``diagonal_only``), checked."""
        if self._checked_at != self.tokens:
            if self.tokens == 0:
                raise ValueError(f"{_layer(self.name)}: no calibration token reached it (every token "
                                 "was masked as padding, or no batch was seen): its Hessian is empty")
            # a NaN or inf activation leaves H non-finite for good (every later update scales
            # H by a positive factor and adds to it), so checking H checks every token seen
            bad = ~torch.isfinite(self._hessian)
            if bool(bad.any()):
                raise ValueError(f"{_layer(self.name)}: the calibration activations hold non-finite "
                                 f"values (NaN or inf, or x·xᵀ overflows float32): {int(bad.sum())} "
                                 "Hessian entries are not finite")
            self._checked_at = self.tokens
        return self._hessian

    def diagonal(self) -> torch.Tensor:
        return self.hessian if self.diagonal_only else torch.diagonal(self.hessian)

    def column_norms(self) -> torch.Tensor:
        """‖x_j‖₂ over the tokens seen, [columns] (what Wanda scores with)."""
        return torch.sqrt(self.diagonal() * self.tokens / 2)


@dataclass
class SolveResult:
    weight: torch.Tensor  # [rows, columns], the input's dtype; exactly zero where ~mask
    mask: torch.Tensor  # bool [rows, columns], True = kept
    grid: QuantGrid | None  # the grids the kept weights lie on, when quantized
    loss: float  # Σ (w - q)² / [Hinv]_jj² / 2, the solver's own error estimate
    damp: float  # the damping finally used (may exceed percdamp after a failed Cholesky)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, retries: int = 6):
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    If ``H + λI`` is not positive definite, λ grows tenfold (with a warning) up to ``retries``
    times. Returns (factor, percdamp actually used).
    """
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    mean_diag = torch.mean(torch.diagonal(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for _ in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp
        new = max(damp * 10, 1e-4)
        warnings.warn(
            f"Hessian not positive definite with percdamp={damp:g}; retrying with {new:g}",
            RuntimeWarning, stacklevel=2,
        )
        damp = new
    raise torch.linalg.LinAlgError(f"Cholesky failed even with percdamp={damp:g}")


def prune_lowest(score: torch.Tensor, prune_count: int, per_row: bool = False) -> torch.Tensor:
    """Bool mask (True = kept) that drops the ``prune_count`` lowest entries of ``score``
    [rows, cols]: of the whole tensor, or of each row when ``per_row``. The one unstructured
    mask selector; ties at the threshold are pruned lowest index first, so exactly
    ``prune_count`` entries go (per row)."""
    groups = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    if prune_count <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if prune_count >= groups.shape[1]:
        return torch.zeros_like(score, dtype=torch.bool)
    # a k-th value threshold is several times faster than topk for k ~ n/2
    kth = torch.kthvalue(groups, prune_count, dim=1, keepdim=True).values
    below = groups < kth
    tie = groups == kth
    pruned = below | (tie & (torch.cumsum(tie, 1) <= prune_count - below.sum(1, keepdim=True)))
    return ~pruned.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row
    (the one N:M mask selector)."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M needs the number of input columns ({cols}) divisible by M={m}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    kept = torch.ones_like(groups, dtype=torch.bool)
    kept.scatter_(2, idx, False)
    return kept.reshape(rows, cols)


def _segment_bounds(rows: int, segments: Sequence[int] | None) -> list[tuple[int, int]]:
    segments = list(segments) if segments else [rows]
    if sum(segments) != rows:
        raise ValueError(f"segments {segments} do not add up to {rows} rows")
    bounds, start = [], 0
    for s in segments:
        bounds.append((start, start + s))
        start += s
    return bounds


@torch.no_grad()
def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    density: float | Sequence[float] = 1.0,
    nm: tuple[int, int] | None = None,
    quant: QuantSpec | None = None,
    blocksize: int = 128,
    mask_blocksize: int = 128,
    percdamp: float = 0.01,
    segments: Sequence[int] | None = None,
    prior_mask: torch.Tensor | None = None,
    name: str | None = None,
    act_order: bool = False,
    static_groups: bool | None = None,
) -> SolveResult:
    """Prune (and optionally quantize) ``weight`` to minimise ‖WX − ŴX‖² given ``H = 2XXᵀ/n``.

    Columns are swept left to right in lazy blocks of ``blocksize``. Unstructured masks are
    chosen every ``mask_blocksize`` columns from ``w² / [Hinv]_jj²`` over the whole
    ``rows × mask_blocksize`` block; with ``nm=(N, M)`` the ``M − N`` lowest of every group of
    M are dropped per row. ``segments`` stacks several matrices that share one Hessian (e.g.
    q/k/v): each segment of rows picks its own mask (and ``density`` may be one per segment),
    which gives exactly the result of solving them one by one. ``prior_mask`` (True = may be
    kept) makes masks only shrink: a weight pruned before is pruned first and stays pruned.
    ``act_order``: sweep the columns in decreasing ``diag H`` (the most activated inputs first,
    while the most columns are left to absorb their errors). Masks are then chosen every
    ``mask_blocksize`` columns of that order; N:M groups stay groups of M consecutive columns
    of the original order, each group's mask chosen when the sweep first reaches one of its
    columns, from the current values of all M. ``static_groups`` (default: ``act_order``):
    with ``quant.groupsize``, every group's grid is fixed before the sweep from the weights as
    given (the round-to-nearest grid), so the grids do not depend on the sweep order; without
    it a group's grid is fixed when the sweep reaches the group (needs ``act_order`` off).
    ``name``: the layer, for messages. A weight or Hessian with NaN / inf, or an all-zero
    Hessian (no calibration token reached the layer), is refused with a ValueError; rows the
    mask leaves empty are warned about once.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {list(hessian.shape)}")
    bounds = _segment_bounds(rows, segments)
    densities = [density] * len(bounds) if isinstance(density, (int, float)) else list(density)
    if len(densities) != len(bounds):
        raise ValueError(f"got {len(densities)} densities for {len(bounds)} segments")
    densities = [check_density(d) for d in densities]
    if blocksize < 1 or mask_blocksize < 1:
        raise ValueError("blocksize (B) and mask_blocksize (Bs) must be positive")
    if blocksize % mask_blocksize and mask_blocksize % blocksize:
        raise ValueError(
            f"B={blocksize} and Bs={mask_blocksize}: one must divide the other, so that a "
            "mask block never straddles a lazy-update boundary"
        )
    if nm is not None:
        n, m = parse_nm(nm)
        if blocksize % m or cols % m:
            raise ValueError(f"N:M with M={m} needs B ({blocksize}) and columns ({cols}) divisible by M")
    unstructured = nm is None and any(d < 1 for d in densities)
    static_groups = act_order if static_groups is None else static_groups
    if act_order and not static_groups and quant is not None and quant.groupsize is not None:
        raise ValueError("act_order with grouped grids needs static_groups (each group's grid fixed "
                         "before the sweep), so that a group's columns share one grid")
    check_finite(weight, "weight", name)
    check_finite(hessian, "Hessian", name)
    if not bool(torch.diagonal(hessian).any()):
        raise ValueError(f"{_layer(name)}: the Hessian is zero (no calibration token reached the "
                         "layer: all padding?); every weight would be pruned")

    if nm is None and quant is None and all(d == 1 for d in densities) and prior_mask is None:
        return SolveResult(weight.clone(), torch.ones_like(weight, dtype=torch.bool), None, 0.0, 0.0)

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    prior = None if prior_mask is None else prior_mask.to(W.device, torch.bool)

    if quant is not None:
        bits = quant.grid_bits(rows, cols, W.device)  # [rows, n_groups]
        maxqs = (2 ** bits - 1).to(torch.float32)
        maxq = maxqs[:, :1]
        group = quant.groupsize
        scales, zeros = [], []
        if group is None:  # one grid per row, fixed before the sweep
            scale, zero = find_params(W, bits[:, 0], quant.sym, quant.mse)
            scales, zeros = [scale], [zero]
        elif static_groups:  # every group's grid fixed before the sweep, in the original order
            for k, c in enumerate(range(0, cols, group)):
                sc, ze = find_params(W[:, c:c + group], bits[:, k], quant.sym, quant.mse)
                scales.append(sc)
                zeros.append(ze)
            static_scale, static_zero = torch.cat(scales, 1), torch.cat(zeros, 1)

    perm = None
    if act_order:
        # the solve runs on the permuted problem (columns of W, rows and columns of H), and
        # everything is put back in the original order at the end
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        prior = None if prior is None else prior[:, perm]
        if nm is not None:
            # the position in the sweep of each original column, and the N:M group of each position
            position = torch.argsort(perm)
            group_of = (perm // m).tolist()
            members = position.view(-1, m)  # [groups, m]: the positions of each group's columns
            decided = [False] * (cols // m)
        if quant is not None and group is not None:
            group_at = (perm // group).tolist()  # each position's grid
    Hinv, damp = inverse_hessian_factor(H, percdamp)
    del H
    hinv_diag = torch.diagonal(Hinv)

    kept = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    if prior is not None:
        kept &= prior
    losses = torch.zeros(rows, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # the block transposed, [count, rows]: each column is a contiguous row, so the
        # per-column reads, writes and rank-1 updates below touch contiguous memory
        W1 = W[:, i1:i2].T.contiguous()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = i1 + i
            if unstructured and col % mask_blocksize == 0:
                # At i == 0 nothing of W1 is updated yet, so W holds the current values of a
                # mask block that may extend past this lazy block (Bs > B).
                end = min(col + mask_blocksize, cols)
                cur = W[:, col:end] if i == 0 else W1[i:i + end - col].T.contiguous()
                score = cur**2 / hinv_diag[col:end][None, :] ** 2
                if prior is not None:
                    score = torch.where(prior[:, col:end], score, -1.0)
                for (r0, r1), d in zip(bounds, densities, strict=True):
                    seg = score[r0:r1]
                    kept[r0:r1, col:end] = prune_lowest(seg, round(seg.numel() * (1 - d)))
                if prior is not None:
                    kept[:, col:end] &= prior[:, col:end]
            if nm is not None and perm is None and i % m == 0:
                score = W1[i:i + m].T ** 2 / torch.diagonal(Hinv1)[i:i + m][None, :] ** 2
                kept[:, col:col + m] = nm_mask(score, n, m)
                if prior is not None:
                    kept[:, col:col + m] &= prior[:, col:col + m]
            if nm is not None and perm is not None and not decided[group_of[col]]:
                # the first of its group's columns the sweep reaches: the others are later, so
                # all M are still unquantized; their current values are those in the block
                # (W1, up to date) or in W minus this block's updates so far (lazily pending)
                g = group_of[col]
                decided[g] = True
                pos = members[g]
                cur = W[:, pos] - Err1[:i].T @ Hinv[i1:col][:, pos]
                inside = pos < i2
                cur[:, inside] = W1[pos[inside] - i1].T
                score = cur**2 / hinv_diag[pos][None, :] ** 2
                sel = nm_mask(score, n, m)
                if prior is not None:
                    sel &= prior[:, pos]
                kept[:, pos] = sel

            w = W1[i]
            d = Hinv1[i, i]
            q = w * kept[:, col]
            if quant is not None:
                if group is not None and static_groups:
                    g = group_at[col] if perm is not None else col // group
                    scale, zero = static_scale[:, g:g + 1], static_zero[:, g:g + 1]
                    maxq = maxqs[:, g:g + 1]
                elif group is not None and col % group == 0:
                    # The group's grid is fixed when the sweep reaches it, from its current
                    # values (kept weights only, where the mask is already known).
                    end = min(col + group, cols)
                    in_block = min(end, i2) - col
                    cur = torch.cat([W1[i:i + in_block].T, W[:, i2:end]], dim=1)
                    known = kept[:, col:end]
                    g = col // group
                    maxq = maxqs[:, g:g + 1]
                    scale, zero = find_params(cur * known, bits[:, g], quant.sym, quant.mse)
                    scales.append(scale)
                    zeros.append(zero)
                q = quantize(q[:, None], scale, zero, maxq).flatten() * kept[:, col]
            Q1[i] = q
            err = (w - q) / d
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]
            Err1[i] = err

        losses += (Err1**2).sum(0) / 2  # Σ (w - q)² / [Hinv]_jj² / 2, per row
        W[:, i1:i2] = Q1.T
        # the same [rows, count] layout as before the transpose: identical matmul
        W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]

    if perm is not None:
        position = torch.argsort(perm)
        W, kept = W[:, position], kept[:, position]
    kept &= ~dead[None, :]
    W *= kept
    _warn_empty_rows(kept, weight, name)
    grid = None
    if quant is not None:
        grid = QuantGrid(torch.cat(scales, 1), torch.cat(zeros, 1), bits if quant.per_grid else bits[:, 0],
                         quant.groupsize)
    return SolveResult(W.to(weight.dtype), kept, grid, float(losses.sum()), damp)


def magnitude_mask(
    weight: torch.Tensor, density: float = 1.0, nm: tuple[int, int] | None = None,
    prior_mask: torch.Tensor | None = None, name: str | None = None,
) -> torch.Tensor:
    """Keep the largest |w| of the whole matrix (or of each N:M group). ``name``: the layer,
    for messages."""
    check_finite(weight, "weight", name)
    score = _with_prior(weight.detach().abs().float(), prior_mask)
    if nm is not None:
        kept = nm_mask(score, *parse_nm(nm))
    else:
        kept = prune_lowest(score, round(score.numel() * (1 - check_density(density))))
    kept = kept if prior_mask is None else kept & prior_mask.to(kept.device, torch.bool)
    _warn_empty_rows(kept, weight, name)
    return kept


def _with_prior(score: torch.Tensor, prior_mask: torch.Tensor | None) -> torch.Tensor:
    # scores are >= 0, so -1 puts weights pruned before first in line to be pruned again
    return score if prior_mask is None else torch.where(prior_mask.to(score.device, torch.bool), score, -1.0)


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, density: float = 1.0,
    nm: tuple[int, int] | None = None, prior_mask: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Wanda (Sun et al., 2023): score ``|w_ij| · ‖x_j‖₂``, compared within each output row.
    ``name``: the layer, for messages."""
    check_finite(weight, "weight", name)
    check_finite(input_norm, "input norm", name)
    score = weight.detach().abs().float() * input_norm.to(weight.device).float()[None, :]
    score = _with_prior(score, prior_mask)
    if nm is not None:
        kept = nm_mask(score, *parse_nm(nm))
    else:
        kept = prune_lowest(score, round(score.shape[1] * (1 - check_density(density))), per_row=True)
    kept = kept if prior_mask is None else kept & prior_mask.to(kept.device, torch.bool)
    _warn_empty_rows(kept, weight, name)
    return kept
