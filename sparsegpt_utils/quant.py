"""Uniform quantization grids, quantize / dequantize, and bit packing. Tensors only.

A *grid* maps a row of weights to integer codes ``q`` in ``[0, 2**bits - 1]`` with
``w ≈ scale * (q - zero)``. Grids are per output row, optionally per group of ``groupsize``
consecutive input columns, and each row may have its own bit width (mixed precision).
A weight equal to zero always maps back to exactly zero, because ``zero`` is an integer
inside the code range; pruned weights therefore stay pruned after quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "QuantSpec",
    "QuantGrid",
    "find_params",
    "quantize",
    "quantize_codes",
    "dequantize_codes",
    "rtn_quantize",
    "pack_bits",
    "unpack_bits",
    "width_map_bits",
    "row_storage_bits",
    "quant_storage_bits",
    "grid_storage_bits",
    "cell_storage_bits",
]


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to.

    bits: 1..16, or widths for mixed precision: a tensor [rows] (one width per row) or
    [rows, n_groups] (one width per grid: per row and group of ``groupsize`` columns).
    groupsize: columns per grid (``None`` = one grid per row).
    sym: symmetric grid (zero point fixed at the middle of the code range).
    mse: search a clipping ratio that minimises the squared error per row (GPTQ's ``mse``).
    """

    bits: int | torch.Tensor = 4
    groupsize: int | None = None
    sym: bool = False
    mse: bool = False

    def __post_init__(self):
        bits = self.bits
        lo, hi = (int(bits.min()), int(bits.max())) if torch.is_tensor(bits) else (bits, bits)
        if not 1 <= lo <= hi <= 16:
            raise ValueError(f"wbits must be in [1, 16], got {bits!r}")
        if self.groupsize is not None and self.groupsize < 1:
            raise ValueError(f"groupsize must be a positive integer or None, got {self.groupsize}")
        if torch.is_tensor(bits) and bits.ndim == 2 and self.groupsize is None:
            raise ValueError("bits with one width per grid [rows, n_groups] needs a groupsize")

    @property
    def per_grid(self) -> bool:
        """True when ``bits`` holds one width per grid [rows, n_groups]."""
        return torch.is_tensor(self.bits) and self.bits.ndim == 2

    def row_bits(self, rows: int, device=None) -> torch.Tensor:
        """Bit width per row, int64 [rows] (not for per-grid widths: see :meth:`grid_bits`)."""
        if self.per_grid:
            raise ValueError("this spec has one width per grid; use grid_bits(rows, cols)")
        if torch.is_tensor(self.bits):
            if self.bits.numel() != rows:
                raise ValueError(f"bits has {self.bits.numel()} entries for {rows} rows")
            return self.bits.to(device=device, dtype=torch.int64).flatten()
        return torch.full((rows,), int(self.bits), dtype=torch.int64, device=device)

    def grid_bits(self, rows: int, cols: int, device=None) -> torch.Tensor:
        """Bit width of every grid, int64 [rows, n_groups] (n_groups = 1 without a groupsize)."""
        groups = 1 if self.groupsize is None else -(-cols // self.groupsize)
        if not self.per_grid:
            return self.row_bits(rows, device)[:, None].expand(rows, groups).contiguous()
        if tuple(self.bits.shape) != (rows, groups):
            raise ValueError(f"bits has shape {list(self.bits.shape)} for {rows} rows x {groups} groups")
        return self.bits.to(device=device, dtype=torch.int64)


@dataclass
class QuantGrid:
    """The grids a layer was quantized on.

    scale, zero: float32 [rows, n_groups] (zero holds integer values).
    bits: int64 [rows] (one width per row) or [rows, n_groups] (one per grid).
    groupsize: columns per group, or None (n_groups = 1).
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: torch.Tensor
    groupsize: int | None

    def group_of_column(self, columns: int) -> torch.Tensor:
        """Index of the grid each column uses, int64 [columns]."""
        if self.groupsize is None:
            return torch.zeros(columns, dtype=torch.int64)
        return torch.arange(columns) // self.groupsize

    def grid_bits(self) -> torch.Tensor:
        """Bit width of every grid, int64 [rows, n_groups]."""
        bits = self.bits.to(torch.int64)
        return bits if bits.ndim == 2 else bits[:, None].expand(-1, self.scale.shape[1])

    def expand(self, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """scale, zero, maxq broadcast to [rows, columns]."""
        idx = self.group_of_column(columns).to(self.scale.device)
        maxq = (2 ** self.grid_bits().to(self.scale.device) - 1).to(self.scale.dtype)
        return self.scale[:, idx], self.zero[:, idx], maxq[:, idx]

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of a weight that lies on this grid, int64 [rows, columns]."""
        scale, zero, maxq = self.expand(weight.shape[1])
        return quantize_codes(weight.float(), scale, zero, maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero, _ = self.expand(codes.shape[1])
        return dequantize_codes(codes, scale, zero)


def find_params(
    w: torch.Tensor, bits: torch.Tensor, sym: bool = False, mse: bool = False,
    grid_points: int = 100, max_shrink: float = 0.8, norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min–max grid per row of ``w`` [rows, cols] with ``bits`` int [rows].

    Returns scale, zero: float32 [rows, 1]. The range always contains 0, so 0 is exact.
    With ``mse`` the range is shrunk by the factor in ``[1 - max_shrink, 1]`` that minimises
    ``Σ |w - Q(w)|^norm`` per row, as GPTQ does.
    """
    w = w.float()
    maxq = (2 ** bits.to(w.device) - 1).float()[:, None]
    xmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)

    def grid(lo, hi):
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -torch.ones_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
        scale = _fp16_exact((hi - lo) / maxq)
        zero = torch.full_like(scale, 0) + (maxq + 1) / 2 if sym else torch.round(-lo / scale)
        if sym:
            zero = torch.floor(zero)
        return scale, zero

    scale, zero = grid(xmin, xmax)
    if mse:
        best = torch.full((w.shape[0], 1), float("inf"), device=w.device)
        for i in range(int(max_shrink * grid_points)):
            p = 1 - i / grid_points
            s1, z1 = grid(p * xmin, p * xmax)
            err = (quantize(w, s1, z1, maxq) - w).abs().pow(norm).sum(dim=1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest float16 (kept as float32) where float16 holds it: the
    checkpoint stores scales in 16 bits, as the storage model counts them, only when they are
    exact in float16. Scales float16 cannot hold (under 2**-24 or over 65504) stay as they are."""
    half = scale.to(torch.float16).float()
    return torch.where((half > 0) & torch.isfinite(half), half, scale)


def quantize_codes(w, scale, zero, maxq) -> torch.Tensor:
    """Integer codes (int64) of ``w`` on the grid; broadcasting shapes."""
    return torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq).to(torch.int64)


def dequantize_codes(codes, scale, zero) -> torch.Tensor:
    return scale * (codes.to(scale.dtype) - zero)


def quantize(w, scale, zero, maxq) -> torch.Tensor:
    """Round ``w`` to the nearest grid point (returns floats on the grid)."""
    q = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq)
    return scale * (q - zero)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest baseline: quantize ``weight`` [rows, cols] on its own grids."""
    rows, cols = weight.shape
    w = weight.float()
    bits = spec.grid_bits(rows, cols, w.device)
    g = spec.groupsize or cols
    scales, zeros = [], []
    for k, c in enumerate(range(0, cols, g)):
        s, z = find_params(w[:, c:c + g], bits[:, k], spec.sym, spec.mse)
        scales.append(s)
        zeros.append(z)
    grid = QuantGrid(torch.cat(scales, 1), torch.cat(zeros, 1), bits if spec.per_grid else bits[:, 0],
                     spec.groupsize)
    scale, zero, maxq = grid.expand(cols)
    out = quantize(w, scale, zero, maxq)
    return out.to(weight.dtype), grid


def pack_bits(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2**bits) into a flat uint8 tensor, LSB first.

    ``bits`` 0..16 (0 packs nothing). Computed in numpy on uint8 bit planes, or by shift and
    add when whole codes fit a byte, so packing a large layer costs little memory."""
    v = np.ascontiguousarray(codes.cpu().numpy() if torch.is_tensor(codes) else codes).reshape(-1)
    v = v.astype(np.int64, copy=False)
    if not 0 <= bits <= 16:
        raise ValueError(f"bits must be in [0, 16], got {bits}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 2 ** bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    if bits == 0 or v.size == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: shift and add
        per = 8 // bits
        v = np.concatenate([v, np.zeros((-v.size) % per, dtype=np.int64)]).reshape(-1, per)
        return torch.from_numpy((v << (np.arange(per) * bits)).sum(1).astype(np.uint8))
    planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64 [count]. Raises ValueError when
    ``packed`` holds fewer than ``count * bits`` bits."""
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    data = packed.cpu().numpy().reshape(-1)
    if data.size * 8 < count * bits:
        raise ValueError(f"packed array of {data.size} bytes is too short for {count} × {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        out = (data.astype(np.int64)[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)
        return torch.from_numpy(np.ascontiguousarray(out.reshape(-1)[:count]))
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy((planes.astype(np.int64) << np.arange(bits)).sum(1))


# ---------------------------------------------------------------------------------------------
# Storage cost model (DESIGN §1: bits per weight = every stored bit / weights). One definition,
# used by the bit allocator to meet a budget and by the checkpoint writer to report avg_bits.
#
# Per layer [rows, cols], stored as:
#   values      each kept weight's code at its grid's width b (pruned weights store no code);
#   mask        1 bit per weight (a bitmap), only when some weight of the layer is pruned: a
#               layer that keeps every weight stores no mask;
#   scales      ``scale_bits`` (fp16: 16) per grid, one grid per row or per group of columns;
#   zero points one integer per grid at the grid's width b (asymmetric grids only: a symmetric
#               grid's zero point is fixed at 2**(b-1) and not stored);
#   width map   ceil(log2(max_b - min_b + 1)) bits per width entry when the widths differ
#               (stored as b - min_b), 0 for a uniform layer: one entry per row when the layer
#               has one width per row (bits [rows]), one per grid when it has one per grid
#               (bits [rows, n_groups]).
# Constant per-layer headers (shapes, the width offset, dtypes) and byte padding of packed
# buffers (< 8 bits per buffer) are not counted.
# ---------------------------------------------------------------------------------------------

def width_map_bits(bits: torch.Tensor | int, lo: int | None = None, hi: int | None = None) -> int:
    """Bits per row of the bit-width map: ``ceil(log2(hi - lo + 1))`` (0 when all rows agree).

    ``bits`` int [rows] (or an int); ``lo``/``hi`` override the observed range (an allocator
    plans with its whole choice set so that the plan bounds what is stored).
    """
    if torch.is_tensor(bits) and bits.numel():
        lo = int(bits.min()) if lo is None else lo
        hi = int(bits.max()) if hi is None else hi
    else:
        lo = int(bits) if lo is None else lo
        hi = int(bits) if hi is None else hi
    return max(0, math.ceil(math.log2(hi - lo + 1))) if hi > lo else 0


def row_storage_bits(
    bits: torch.Tensor | int, cols: int, groupsize: int | None = None, sym: bool = False,
    kept: torch.Tensor | float | None = None, scale_bits: int = 16, map_bits: int | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Stored bits of each row, float64 [rows] (see the storage model above).

    bits: int or int [rows], each row's width. cols: input columns. groupsize: columns per
    grid (None: one grid per row). kept: None when nothing is pruned, else the number of kept
    weights per row (tensor [rows] or one number for every row; may be fractional when it is
    an estimate); counts that keep every weight of every row mean nothing is pruned.
    map_bits: width-map bits per row (default: :func:`width_map_bits` of ``bits``). rows:
    needed only when ``bits`` is an int.
    """
    if not torch.is_tensor(bits):
        if rows is None:
            raise ValueError("rows is required when bits is a single width")
        bits = torch.full((rows,), int(bits), dtype=torch.int64)
    b = bits.to(torch.float64).flatten()
    if groupsize is not None and groupsize < 1:
        raise ValueError(f"groupsize must be a positive integer or None, got {groupsize}")
    grids = 1 if groupsize is None else -(-cols // groupsize)
    map_bits = width_map_bits(bits) if map_bits is None else map_bits
    if kept is not None and bool((torch.as_tensor(kept, dtype=torch.float64) >= cols).all()):
        kept = None  # every weight kept: no mask is stored
    if kept is None:
        values, mask = cols * b, 0
    else:
        values, mask = torch.as_tensor(kept, dtype=torch.float64) * b, cols
    meta = grids * (scale_bits + (0 if sym else b))
    return values + mask + meta + map_bits


def cell_storage_bits(
    bits: torch.Tensor, cols: int, groupsize: int, sym: bool = False,
    kept: torch.Tensor | None = None, scale_bits: int = 16, map_bits: int | None = None,
) -> torch.Tensor:
    """Stored bits of each grid of a layer with one width per grid, float64 [rows, n_groups].

    bits: int [rows, n_groups]. kept: None when nothing is pruned, else the kept weights per
    grid [rows, n_groups] (the layer's 1-bit mask is charged to the grids, one bit per
    weight). map_bits: width-map bits per grid (default: :func:`width_map_bits` of ``bits``).
    """
    rows, groups = bits.shape
    if groups != -(-cols // groupsize):
        raise ValueError(f"bits has {groups} groups for {cols} columns in groups of {groupsize}")
    b = bits.to(torch.float64)
    size = torch.full((groups,), float(groupsize), dtype=torch.float64)
    size[-1] = cols - groupsize * (groups - 1)
    map_bits = width_map_bits(bits) if map_bits is None else map_bits
    if kept is not None and bool((torch.as_tensor(kept, dtype=torch.float64) >= size).all()):
        kept = None
    if kept is None:
        values, mask = size * b, 0
    else:
        values, mask = torch.as_tensor(kept, dtype=torch.float64) * b, size
    return values + mask + scale_bits + (0 if sym else b) + map_bits


def quant_storage_bits(
    rows: int, cols: int, bits: torch.Tensor | int, groupsize: int | None = None, sym: bool = False,
    kept: torch.Tensor | float | None = None, scale_bits: int = 16, map_bits: int | None = None,
) -> float:
    """Total stored bits of a quantized ``rows × cols`` layer (divide by ``rows * cols`` for
    bits per weight). Arguments as in :func:`row_storage_bits` (or, for one width per grid
    ``bits`` [rows, n_groups], :func:`cell_storage_bits`); ``kept`` may also be the layer's
    bool mask [rows, cols] (True = kept)."""
    if torch.is_tensor(bits) and bits.ndim == 2:
        if torch.is_tensor(kept) and kept.dtype == torch.bool:
            kept = None if bool(kept.all()) else torch.stack(
                [k.sum(1) for k in kept.split(groupsize, dim=1)], 1)
        elif kept is not None:
            raise ValueError("with one width per grid, kept must be the bool mask [rows, cols]")
        if bits.shape[0] != rows:
            raise ValueError(f"bits has {bits.shape[0]} rows for {rows} rows")
        return float(cell_storage_bits(bits, cols, groupsize, sym, kept, scale_bits, map_bits).sum())
    if torch.is_tensor(kept) and kept.dtype == torch.bool:
        kept = None if bool(kept.all()) else kept.sum(1)
    per_row = row_storage_bits(bits, cols, groupsize, sym, kept, scale_bits, map_bits, rows)
    if per_row.numel() != rows:
        raise ValueError(f"bits has {per_row.numel()} entries for {rows} rows")
    return float(per_row.sum())


def grid_storage_bits(grid: QuantGrid, cols: int, mask: torch.Tensor | None = None,
                      sym: bool = False, scale_bits: int = 16) -> float:
    """Stored bits of a layer quantized on ``grid`` with bool ``mask`` [rows, cols] (or None)."""
    return quant_storage_bits(grid.scale.shape[0], cols, grid.bits.cpu(), grid.groupsize, sym,
                              None if mask is None else mask.cpu(), scale_bits)
