"""The compact layer code: how one pruned (and quantized) weight matrix becomes a few small
tensors and back. Numpy and tensors only: no files, no models.

A pruned layer [rows, cols] stores a set of *slots* (the kept positions, sometimes with a few
pruned ones added) and one value per slot, in row-major order. The slot set is stored in the
smallest of four forms, chosen per layer by exact size:

- ``full``: nothing stored, every position is a slot (a layer with nothing pruned, e.g. one
  that is only quantized, pays no mask bit);
- ``bitmask``: 1 bit per weight (packed, LSB first);
- ``nm``: for N:M masks, one index per group of M naming which N of the C(M, N) patterns it
  uses (ceil(log2 C(M, N)) bits per group: 3 bits for 2:4). Groups with fewer than N kept
  weights get pruned positions added as slots, storing the value 0;
- ``rice``: Golomb-Rice code of the gaps between slots (k low bits of each gap in one packed
  array, the rest in unary in another), for high sparsity: about 5.2 bits per kept weight
  at density 0.1, i.e. 0.52 bits per weight instead of 1.

Values are the kept weights in the storage dtype (fp16 by default), or, for a layer quantized
on a :class:`~sparsegpt_utils.quant.QuantGrid`, their integer codes packed at the row's bit
width, with the grid: scales (fp16 when that is exact, else fp32), zero points packed at the
row's width (left out when every one is the symmetric midpoint ``2**(b-1)``), and the per-row
widths as offsets from the smallest (``quant.width_map_bits`` bits per row; none when uniform).

:func:`encode_layer` returns the tensors (by key suffix) and the layer's manifest entry;
:func:`decode_layer` takes them back to the weight, bit for bit (a zero's sign aside);
:func:`decode_kept` gives the slots and their values without the dense weight.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from .quant import QuantGrid, pack_bits, quant_storage_bits, unpack_bits, width_map_bits

__all__ = [
    "CodecError",
    "NM_CANDIDATES",
    "MASK_FORMS",
    "dtype_name",
    "tensor_info",
    "store_bits",
    "from_bits",
    "plus_zero",
    "nm_table",
    "rice_bits",
    "rice_best",
    "rice_encode",
    "rice_decode",
    "choose_slots",
    "encode_slots",
    "decode_slots",
    "encode_layer",
    "decode_layer",
    "decode_kept",
    "layer_grid",
]

NM_CANDIDATES = (4, 8, 16)  # group sizes M tried for the N:M form
MASK_FORMS = ("full", "bitmask", "nm", "rice")
# what one more tensor costs in a safetensors header (name, dtype, shape, offsets), in bits;
# it keeps a form with more tensors from being chosen for a saving of a few bits
TENSOR_OVERHEAD_BITS = 8 * 96


class CodecError(ValueError):
    """Encoded data that does not decode: inconsistent with its description, or damaged."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def tensor_info(t: torch.Tensor) -> dict:
    """dtype name, shape and byte count of ``t``, as a manifest lists them."""
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "bytes": t.numel() * t.element_size()}


# ---------------------------------------------------------------------------------------------
# float values as integer bit patterns (exact comparisons, -0.0 vs +0.0)
# ---------------------------------------------------------------------------------------------

_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_NP_FLOAT = {torch.float16: np.float16, torch.float32: np.float32}


def store_bits(x: torch.Tensor | np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` cast to ``dtype`` (round to nearest even), as the integers of its bit patterns."""
    if isinstance(x, torch.Tensor) and x.dtype in _NP_FLOAT:
        x = x.numpy()
    if isinstance(x, np.ndarray) and dtype in _NP_FLOAT:
        return x.astype(_NP_FLOAT[dtype], copy=False).view(np.int16 if dtype == torch.float16 else np.int32)
    return torch.as_tensor(x).to(dtype).view(_INT_OF[dtype]).numpy()  # bfloat16: numpy has none


def from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`store_bits`."""
    return torch.from_numpy(np.ascontiguousarray(bits)).view(dtype)


def plus_zero(bits: np.ndarray) -> np.ndarray:
    """-0.0 -> +0.0 on bit patterns."""
    sign = np.array(1 << (8 * bits.itemsize - 1), dtype=np.int64).astype(bits.dtype)
    return np.where(bits == sign, 0, bits)


def _pack(values: np.ndarray, bits: int) -> torch.Tensor:
    return pack_bits(values, bits)


def _unpack(packed: torch.Tensor, bits: int, count: int) -> np.ndarray:
    try:
        return unpack_bits(packed, bits, count).numpy()
    except ValueError as err:
        raise CodecError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# slot codes: bitmask, N:M pattern indices, Golomb-Rice gaps (numpy, vectorised)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def nm_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Patterns of m bits with n set (ascending), pattern -> index (-1 if not one), index bits."""
    pats = np.arange(1 << m, dtype=np.int64)
    popcount = ((pats[:, None] >> np.arange(m)) & 1).sum(1)
    valid = pats[popcount == n]
    lookup = np.full(1 << m, -1, dtype=np.int64)
    lookup[valid] = np.arange(valid.size)
    return valid, lookup, math.ceil(math.log2(valid.size)) if valid.size > 1 else 0


def _nm_slots(mask: np.ndarray, n: int, m: int) -> np.ndarray:
    """``mask`` [rows, cols] (≤ n kept per group of m) topped up to exactly n slots per group
    with the first pruned positions of the group."""
    g = mask.reshape(mask.shape[0], -1, m)
    missing = n - g.sum(-1, keepdims=True)
    pad = ~g & (np.cumsum(~g, axis=-1) <= missing)
    return (g | pad).reshape(mask.shape)


def _rice_k(gaps: np.ndarray) -> int:
    mean = float(gaps.mean()) if gaps.size else 0.0
    return max(0, round(math.log2(mean * math.log(2)))) if mean > 1 else 0


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Bits of the Rice code of ``gaps`` with parameter ``k``."""
    return int((gaps >> k).sum()) + gaps.size * (1 + k)


def rice_best(gaps: np.ndarray) -> tuple[int, int]:
    """(k, total bits) of the best Rice parameter near the geometric-source optimum."""
    k0 = _rice_k(gaps)
    return min(((k, rice_bits(gaps, k)) for k in range(max(0, k0 - 1), k0 + 2)), key=lambda t: t[1])


def rice_encode(slots_flat: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gaps between slots -> (unary stream of the high parts, packed k-bit low parts, stream bits).
    Each gap ``g`` writes ``g >> k`` ones and a zero to the unary stream."""
    pos = np.flatnonzero(slots_flat)
    gaps = np.diff(pos, prepend=-1) - 1
    q = gaps >> k
    length = int(q.sum()) + q.size
    stream = np.ones(length, dtype=bool)
    stream[np.cumsum(q + 1) - 1] = False
    unary = torch.from_numpy(np.packbits(stream, bitorder="little"))
    return unary, _pack(gaps & ((1 << k) - 1), k), length


def rice_decode(unary: torch.Tensor, low: torch.Tensor, k: int, length: int, count: int,
                numel: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`: bool [numel] with ``count`` slots set."""
    if unary.numel() * 8 < length:
        raise CodecError(f"rice stream of {unary.numel()} bytes is shorter than its {length} bits")
    stream = np.unpackbits(unary.numpy(), count=length, bitorder="little")
    ends = np.flatnonzero(stream == 0)
    if ends.size != count:
        raise CodecError(f"rice stream holds {ends.size} gaps, manifest says {count}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = (q << k) | _unpack(low, k, count)
    pos = np.cumsum(gaps + 1) - 1
    if count and (pos[-1] >= numel):
        raise CodecError("rice stream points past the end of its layer")
    slots = np.zeros(numel, dtype=bool)
    slots[pos] = True
    return slots


def choose_slots(mask: np.ndarray, value_bits: np.ndarray) -> dict:
    """The cheapest slot code for bool ``mask`` [rows, cols]; ``value_bits`` [rows] (or
    [rows, cols]) is what one stored value costs in each row (or at each position; added slots
    store a value too). Returns the plan."""
    rows, cols = mask.shape
    kept = int(mask.sum())
    per_value = value_bits if value_bits.ndim == 2 else value_bits[:, None]
    kept_value_bits = int((mask * per_value).sum())
    if kept == rows * cols:  # nothing pruned: no mask to store
        return {"mask": "full", "bits": kept_value_bits, "slots": mask}
    plans = [{"mask": "bitmask", "bits": rows * cols + kept_value_bits, "slots": mask}]
    flat = mask.reshape(-1)
    gaps = np.diff(np.flatnonzero(flat), prepend=-1) - 1
    k, bits = rice_best(gaps) if kept else (0, 0)
    if k > 0:  # with k = 0 the unary stream is just the complement of the bitmask
        plans.append({"mask": "rice", "bits": bits + kept_value_bits + TENSOR_OVERHEAD_BITS,
                      "slots": mask, "rice_k": k})
    for m in NM_CANDIDATES:
        if cols % m:
            continue
        n = int(mask.reshape(rows, -1, m).sum(-1).max())
        if not 0 < n < m:
            continue
        slots = _nm_slots(mask, n, m)
        extra = int(((slots & ~mask) * per_value).sum())
        index_bits = nm_table(n, m)[2]
        plans.append({"mask": "nm", "nm": [n, m], "slots": slots,
                      "bits": rows * (cols // m) * index_bits + kept_value_bits + extra})
    return min(plans, key=lambda p: p["bits"])


def encode_slots(plan: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (by key suffix) and manifest fields of a slot plan."""
    slots = plan["slots"]
    if plan["mask"] == "full":
        return {}, {}
    if plan["mask"] == "bitmask":
        return {"mask": torch.from_numpy(np.packbits(slots.reshape(-1), bitorder="little"))}, {}
    if plan["mask"] == "rice":
        k = plan["rice_k"]
        unary, low, length = rice_encode(slots.reshape(-1), k)
        tensors = {"rice_unary": unary, "rice_low": low} if k else {"rice_unary": unary}
        return tensors, {"rice_k": k, "rice_stream_bits": length}
    n, m = plan["nm"]
    _, lookup, index_bits = nm_table(n, m)
    groups = slots.reshape(-1, m).astype(np.int64)
    patterns = (groups << np.arange(m)).sum(1)
    return {"nm_index": _pack(lookup[patterns], index_bits)}, {"nm": [n, m]}


def decode_slots(info: dict, t: dict[str, torch.Tensor]) -> np.ndarray:
    """The slot set, bool [rows * cols], from a layer's manifest entry and tensors."""
    rows, cols = info["shape"]
    numel = rows * cols
    if info["mask"] == "full":
        return np.ones(numel, dtype=bool)
    if info["mask"] == "bitmask":
        if t["mask"].numel() * 8 < numel:
            raise CodecError(f"bitmask of {t['mask'].numel()} bytes is too short for {numel} weights")
        return np.unpackbits(t["mask"].numpy(), count=numel, bitorder="little").astype(bool)
    if info["mask"] == "rice":
        low = t.get("rice_low", torch.zeros(0, dtype=torch.uint8))
        return rice_decode(t["rice_unary"], low, int(info["rice_k"]), int(info["rice_stream_bits"]),
                           int(info["slots"]), numel)
    if info["mask"] == "nm":
        n, m = (int(x) for x in info["nm"])
        if not (0 < n < m <= max(NM_CANDIDATES)) or cols % m:
            raise CodecError(f"N:M pattern {n}:{m} does not fit a layer of {cols} columns")
        valid, _, index_bits = nm_table(n, m)
        index = _unpack(t["nm_index"], index_bits, numel // m)
        if index.size and index.max() >= valid.size:
            raise CodecError(f"N:M index out of range in a {n}:{m} layer")
        return ((valid[index][:, None] >> np.arange(m)) & 1).astype(bool).reshape(-1)
    raise CodecError(f"unknown mask encoding {info['mask']!r}")


# ---------------------------------------------------------------------------------------------
# one layer: encode / decode
# ---------------------------------------------------------------------------------------------

def _width_groups(bits: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(width, where) for each width in ``bits`` (any shape)."""
    return [(int(b), bits == b) for b in np.unique(bits)]


def _grid_widths(bits: np.ndarray, groups: int) -> np.ndarray:
    """The width of every grid, int64 [rows, groups], from [rows] or [rows, groups] widths."""
    return bits if bits.ndim == 2 else np.repeat(bits[:, None], groups, axis=1)


def _grid_arrays(scale: np.ndarray, zero: np.ndarray, grid_bits: np.ndarray, groupsize, cols: int):
    """scale, zero, maxq float32 broadcastable to [rows, cols] (each column's grid), from the
    [rows, groups] grids and their widths ``grid_bits``."""
    maxq = (2.0 ** grid_bits - 1).astype(np.float32)
    if groupsize is None or scale.shape[1] == 1:
        return scale[:, :1], zero[:, :1], maxq[:, :1]
    idx = np.arange(cols) // groupsize
    return scale[:, idx], zero[:, idx], maxq[:, idx]


def _column_widths(grid_bits: np.ndarray, groupsize, cols: int) -> np.ndarray:
    """The width of every weight, int64 [rows, cols]."""
    if groupsize is None or grid_bits.shape[1] == 1:
        return np.repeat(grid_bits[:, :1], cols, axis=1)
    return grid_bits[:, np.arange(cols) // groupsize]


def _dequantize(codes: np.ndarray, slots: np.ndarray, s: np.ndarray, z: np.ndarray, dtype) -> np.ndarray:
    """The layer's weights (bit patterns in ``dtype``) from its codes, as ``QuantGrid.dequantize``
    computes them (``scale * (q - zero)`` in float32), zero outside the slots."""
    w = np.where(slots, s * (codes.astype(np.float32) - z), np.float32(0))
    return store_bits(w, dtype)


def encode_layer(weight: torch.Tensor, mask: np.ndarray, grid: QuantGrid | None, dtype: torch.dtype,
                 name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """weight [rows, cols] (cpu), bool mask [rows, cols] (True = kept), the grid it was quantized
    on (or None), storage dtype -> (tensors by key suffix, manifest entry). Weights that are not
    on ``grid`` are stored as values, with a RuntimeWarning naming layer ``name``."""
    rows, cols = weight.shape
    target = np.where(mask, store_bits(weight, dtype), 0)  # the saved layer, as bit patterns
    kept = int(mask.sum())
    info: dict = {"shape": [rows, cols], "kept": kept, "density": kept / (rows * cols)}
    if grid is not None:
        bits = grid.bits.cpu().numpy().astype(np.int64)  # [rows], or [rows, groups]: one per grid
        scale = grid.scale.detach().cpu().float().numpy()
        zero = grid.zero.detach().cpu().float().numpy()
        grid_bits = _grid_widths(bits, scale.shape[1])
        s, z, maxq = _grid_arrays(scale, zero, grid_bits, grid.groupsize, cols)
        # quant.quantize_codes, in numpy
        codes = np.clip(np.round(weight.float().numpy() / s) + z, 0, maxq).astype(np.int64)
        if not np.array_equal(plus_zero(_dequantize(codes, mask, s, z, dtype)), plus_zero(target)):
            warnings.warn(f"layer {name}: weights do not lie on the grid given for them; storing "
                          f"them as {dtype_name(dtype)} values", RuntimeWarning, stacklevel=3)
            grid = None
    if grid is None:
        value_bits = np.full(rows, torch.finfo(dtype).bits)
    else:
        value_bits = bits if bits.ndim == 1 else _column_widths(grid_bits, grid.groupsize, cols)

    plan = choose_slots(mask, value_bits)
    tensors, fields = encode_slots(plan)
    slots = plan["slots"]
    info.update(mask=plan["mask"], slots=int(slots.sum()), **fields)

    if grid is None:
        info["values"] = dtype_name(dtype)
        tensors["values"] = from_bits(target[slots], dtype)
    else:
        info.update(values="codes", groupsize=grid.groupsize)
        lo, hi = int(bits.min()), int(bits.max())
        info["wbits"] = lo if lo == hi else "mixed"
        info["wbits_range"] = [lo, hi]
        if bits.ndim == 2:
            info["width_unit"] = "grid"  # the width map holds rows × groups entries
        map_bits = width_map_bits(torch.from_numpy(bits))
        if map_bits:
            tensors["row_bits"] = _pack(bits - lo, map_bits)
        widths = _column_widths(grid_bits, grid.groupsize, cols)
        for b, where in _width_groups(widths):
            tensors[f"codes{b}"] = _pack(codes[slots & where], b)
        # scales: fp16 only when it gives back the very same float32 numbers
        half = scale.astype(np.float16)
        exact = bool(np.isfinite(half).all()) and np.array_equal(half.astype(np.float32), scale)
        tensors["scale"] = torch.from_numpy(half if exact else np.ascontiguousarray(scale))
        # zero points: integers in [0, 2**b - 1]; implied when all are the symmetric midpoint
        if np.array_equal(zero, 2.0 ** (grid_bits - 1)):
            info["zero"] = "midpoint"
        elif np.array_equal(zero, np.round(zero)) and ((zero >= 0) & (zero <= 2.0 ** grid_bits - 1)).all():
            info["zero"] = "packed"
            for b, where in _width_groups(grid_bits):
                tensors[f"zero{b}"] = _pack(zero[where].astype(np.int64), b)
        else:
            info["zero"] = "float32"
            tensors["zero"] = torch.from_numpy(np.ascontiguousarray(zero))
        info["scale_dtype"] = dtype_name(tensors["scale"].dtype)
        # the shared storage model (quant.quant_storage_bits) with the scale width used here
        info["bits_model"] = quant_storage_bits(
            rows, cols, torch.from_numpy(bits), grid.groupsize, sym=info["zero"] == "midpoint",
            kept=torch.from_numpy(mask), scale_bits=torch.finfo(tensors["scale"].dtype).bits) / (rows * cols)
    info["tensors"] = {k: tensor_info(v) for k, v in tensors.items()}
    info["bytes"] = sum(v["bytes"] for v in info["tensors"].values())
    info["bits_per_weight"] = 8 * info["bytes"] / (rows * cols)
    return tensors, info


def _read_grid(info: dict, t: dict[str, torch.Tensor], rows: int, cols: int):
    """A quantized layer's grid, checked against ``info``: (scale float32 [rows, groups], zero
    float32 [rows, groups], widths int64 [rows] or [rows, groups], each grid's width int64
    [rows, groups], groupsize)."""
    lo, hi = (int(x) for x in info["wbits_range"])
    if not 1 <= lo <= hi <= 16:
        raise CodecError(f"bit widths [{lo}, {hi}] outside [1, 16]")
    unit = info.get("width_unit", "row")
    if unit not in ("row", "grid"):
        raise CodecError(f"unknown width unit {unit!r}")
    scale = t["scale"].float().numpy()
    if scale.ndim != 2 or scale.shape[0] != rows:
        raise CodecError(f"scale of shape {list(scale.shape)} for {rows} rows")
    groups = scale.shape[1]
    groupsize = info["groupsize"]
    if groupsize is not None and (int(groupsize) < 1 or -(-cols // int(groupsize)) != groups):
        raise CodecError(f"groupsize {groupsize} does not give {groups} groups of {cols} columns")
    groupsize = None if groupsize is None else int(groupsize)
    shape = (rows, groups) if unit == "grid" else (rows,)
    map_bits = width_map_bits(torch.tensor([lo, hi]))
    count = int(np.prod(shape))
    bits = (_unpack(t["row_bits"], map_bits, count) + lo if map_bits else np.full(count, lo)).reshape(shape)
    if bits.max() > hi:
        raise CodecError(f"bit width out of its range [{lo}, {hi}]")
    grid_bits = _grid_widths(bits, groups)
    if info["zero"] == "midpoint":
        zero = (2.0 ** (grid_bits - 1)).astype(np.float32)
    elif info["zero"] == "packed":
        zero = np.zeros((rows, groups), dtype=np.float32)
        for b, where in _width_groups(grid_bits):
            zero[where] = _unpack(t[f"zero{b}"], b, int(where.sum()))
    elif info["zero"] == "float32":
        zero = t["zero"].float().numpy()
    else:
        raise CodecError(f"unknown zero-point form {info['zero']!r}")
    return scale, zero, bits, grid_bits, groupsize


def layer_grid(info: dict, t: dict[str, torch.Tensor]) -> tuple[QuantGrid, np.ndarray, np.ndarray] | None:
    """A quantized layer's grid, integer codes int64 [rows, cols] (0 outside the slots) and slots
    bool [rows, cols]; None for a layer stored as values."""
    if info["values"] != "codes":
        return None
    rows, cols = (int(x) for x in info["shape"])
    slots = decode_slots(info, t).reshape(rows, cols)
    scale, zero, bits, grid_bits, groupsize = _read_grid(info, t, rows, cols)
    codes = np.zeros((rows, cols), dtype=np.int64)
    for b, where in _width_groups(_column_widths(grid_bits, groupsize, cols)):
        sel = slots & where
        codes[sel] = _unpack(t[f"codes{b}"], b, int(sel.sum()))
    grid = QuantGrid(scale=torch.from_numpy(np.ascontiguousarray(scale)),
                     zero=torch.from_numpy(np.ascontiguousarray(zero)),
                     bits=torch.from_numpy(np.ascontiguousarray(bits.astype(np.int64))), groupsize=groupsize)
    return grid, codes, slots


def _checked_slots(info: dict, t: dict[str, torch.Tensor]) -> np.ndarray:
    rows, cols = (int(x) for x in info["shape"])
    slots = decode_slots(info, t).reshape(rows, cols)
    if int(slots.sum()) != info["slots"]:
        raise CodecError(f"mask holds {int(slots.sum())} weights, manifest says {info['slots']}")
    return slots


def _stored_values(info: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    values = t["values"]
    if values.dtype not in _INT_OF:
        raise CodecError(f"values of dtype {dtype_name(values.dtype)} are not a float dtype")
    if values.numel() != info["slots"]:
        raise CodecError(f"{values.numel()} values for {info['slots']} slots")
    return values


def decode_kept(info: dict, t: dict[str, torch.Tensor],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's slots and their values, without its dense weight: (bool [rows, cols], values
    [slots] in ``dtype``, row-major) such that ``decode_layer(info, t, dtype)[slots]`` equals the
    values bit for bit and the weight is zero elsewhere. Values stored as floats come back as
    stored (cast to ``dtype``); a quantized layer's codes are dequantized at its slots only, with
    the arithmetic of :func:`decode_layer` (``scale * (code - zero)`` in float32, rounded to
    ``dtype``). Memory: the bool slots, the values, and int64 row / column indices of the slots
    while a quantized layer is dequantized. Raises :class:`CodecError` like :func:`decode_layer`."""
    rows, cols = (int(x) for x in info["shape"])
    slots = _checked_slots(info, t)
    if info["values"] != "codes":
        return torch.from_numpy(slots), _stored_values(info, t).to(dtype)
    scale, zero, _bits, grid_bits, groupsize = _read_grid(info, t, rows, cols)
    r, c = np.nonzero(slots)  # row-major, the order the codes are stored in
    g = c // groupsize if groupsize is not None and scale.shape[1] > 1 else np.zeros_like(c)
    del c
    widths = grid_bits[r, g]
    codes = np.zeros(r.size, dtype=np.int64)
    for b in np.unique(widths):
        sel = widths == b
        codes[sel] = _unpack(t[f"codes{int(b)}"], int(b), int(sel.sum()))
    del widths
    values = scale[r, g] * (codes.astype(np.float32) - zero[r, g])  # as _dequantize computes it
    return torch.from_numpy(slots), from_bits(store_bits(values, dtype), dtype)


def decode_layer(info: dict, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode_layer`: the weight [rows, cols] in ``dtype``. Raises
    :class:`CodecError` where the tensors and ``info`` disagree."""
    rows, cols = (int(x) for x in info["shape"])
    if info["values"] != "codes":
        slots = _checked_slots(info, t)
        values = _stored_values(info, t)
        out = np.zeros((rows, cols), dtype=np.int32 if values.element_size() == 4 else np.int16)
        out[slots] = values.view(_INT_OF[values.dtype]).numpy()
        return from_bits(out, values.dtype).to(dtype)
    grid, codes, slots = layer_grid(info, t)
    if int(slots.sum()) != info["slots"]:
        raise CodecError(f"mask holds {int(slots.sum())} weights, manifest says {info['slots']}")
    s, z, _ = _grid_arrays(grid.scale.numpy(), grid.zero.numpy(), grid.grid_bits().numpy(),
                           grid.groupsize, cols)
    return from_bits(_dequantize(codes, slots, s, z, dtype), dtype)
