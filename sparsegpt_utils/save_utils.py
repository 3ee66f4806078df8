"""Compact checkpoints of pruned (and quantized) models, dense export, and safe loading.

A checkpoint is a folder::

    config.json, generation_config.json, tokenizer files   as transformers writes them
    dense.safetensors    every tensor that is not a pruned layer's weight, dense
    pruned.safetensors   the pruned layers: a mask code + only the kept weights
    manifest.json        written last: format version, per-layer density / bits / encoding,
                         every tensor's dtype, shape and bytes, and size + sha256 of every file

A pruned layer [rows, cols] stores a set of *slots* (the kept positions, sometimes with a few
pruned ones added) and one value per slot, in row-major order. The slot set is stored in the
smallest of three forms, chosen per layer by exact size:

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

*Bits per weight* of a layer (DESIGN §1) is 8 × the bytes of all its tensors / (rows × cols):
what is really on disk, byte padding included. ``avg_bits`` is the same over all pruned layers.

The round trip is exact: the loaded weights equal the saved model's (the model cast to the
storage dtype) bit for bit, except that a zero may come back as +0.0 where it was -0.0.
Nothing is unpickled; every file is checked against the manifest's size and sha256 first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._version import versions
from .models import get_adapter, pruned_linears
from .quant import QuantGrid, quant_storage_bits, width_map_bits

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_pruned",
    "load_pruned",
    "load_masked_model_single",
    "read_manifest",
    "export_dense",
    "checkpoint_bytes",
    "dense_fp16_bytes",
]

FORMAT = "sparsegpt-compact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
PRUNED_FILE = "pruned.safetensors"
NM_CANDIDATES = (4, 8, 16)  # group sizes M tried for the N:M form
# what one more tensor costs in a safetensors header (name, dtype, shape, offsets), in bits;
# it keeps a form with more tensors from being chosen for a saving of a few bits
TENSOR_OVERHEAD_BITS = 8 * 96


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, inconsistent with its manifest, or made for a
    model of another architecture."""


# ---------------------------------------------------------------------------------------------
# dtypes, bytes, files
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_dtype(model: nn.Module, dtype) -> torch.dtype:
    """None: the model's dtype if it is 16-bit, else float16."""
    if dtype is None:
        own = next(model.parameters()).dtype
        return own if own in (torch.float16, torch.bfloat16) else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch float dtype, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of every file in ``directory`` (recursively): the checkpoint's size on disk."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def dense_fp16_bytes(model: nn.Module) -> int:
    """Tensor bytes of a dense fp16 ``save_pretrained`` of ``model``: every distinct tensor of
    its state dict (tied weights once) at 2 bytes per float element, other tensors at their
    own width. Headers, config and tokenizer files are not included."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_info(t: torch.Tensor) -> dict:
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "bytes": t.numel() * t.element_size()}


# ---------------------------------------------------------------------------------------------
# atomic folders: build in a temp folder beside the target, then swap
# ---------------------------------------------------------------------------------------------

def _backups(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)


def _recover(directory: Path) -> None:
    """A save killed between its two renames leaves the earlier folder as a hidden backup
    beside the target: put it back."""
    if not directory.exists():
        backups = _backups(directory)
        if backups:
            os.replace(backups[-1], directory)


def _check_target(directory: Path, markers: tuple[str, ...]) -> None:
    """Refuse to replace a non-empty folder that holds none of ``markers`` (not ours)."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"directory {str(directory)!r} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not any((directory / m).exists() for m in markers):
        raise FileExistsError(
            f"directory {str(directory)!r} is not empty and holds no checkpoint "
            f"({' or '.join(markers)}); refusing to replace it")


def _new_temp(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by ``tmp``; the old folder survives until the new one is in place."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, old)  # (an empty placeholder folder is replaced atomically)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# slot codes: bitmask, N:M pattern indices, Golomb-Rice gaps (numpy, vectorised)
# ---------------------------------------------------------------------------------------------

def _pack(values: np.ndarray, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits -> uint8, LSB first: the bytes of ``quant.pack_bits``,
    computed in numpy on uint8 bit planes (8× less memory than int64 planes)."""
    v = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    if bits == 0 or v.size == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: shift and add
        per = 8 // bits
        v = np.concatenate([v, np.zeros((-v.size) % per, dtype=np.int64)]).reshape(-1, per)
        return torch.from_numpy((v << (np.arange(per) * bits)).sum(1).astype(np.uint8))
    planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def _unpack(packed: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack` (and of ``quant.pack_bits``): ``count`` integers, int64."""
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    data = packed.numpy()
    if data.size * 8 < count * bits:
        raise CheckpointError(f"packed array of {data.size} bytes is too short for {count} × {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        out = (data.astype(np.int64)[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)
        return out.reshape(-1)[:count]
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(1)


@functools.lru_cache(maxsize=64)
def _nm_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray, int]:
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


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    return int((gaps >> k).sum()) + gaps.size * (1 + k)


def _rice_best(gaps: np.ndarray) -> tuple[int, int]:
    """(k, total bits) of the best Rice parameter near the geometric-source optimum."""
    k0 = _rice_k(gaps)
    return min(((k, _rice_bits(gaps, k)) for k in range(max(0, k0 - 1), k0 + 2)), key=lambda t: t[1])


def _rice_encode(slots_flat: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
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


def _rice_decode(unary: torch.Tensor, low: torch.Tensor, k: int, length: int, count: int,
                 numel: int) -> np.ndarray:
    stream = np.unpackbits(unary.numpy(), count=length, bitorder="little")
    ends = np.flatnonzero(stream == 0)
    if ends.size != count:
        raise CheckpointError(f"rice stream holds {ends.size} gaps, manifest says {count}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = (q << k) | _unpack(low, k, count)
    pos = np.cumsum(gaps + 1) - 1
    if count and (pos[-1] >= numel):
        raise CheckpointError("rice stream points past the end of its layer")
    slots = np.zeros(numel, dtype=bool)
    slots[pos] = True
    return slots


def _choose_slots(mask: np.ndarray, value_bits: np.ndarray) -> dict:
    """The cheapest slot code for bool ``mask`` [rows, cols]; ``value_bits`` [rows] is what one
    stored value costs in each row (added slots store a value too). Returns the plan."""
    rows, cols = mask.shape
    kept = int(mask.sum())
    kept_value_bits = int((mask.sum(1) * value_bits).sum())
    plans = [{"mask": "bitmask", "bits": rows * cols + kept_value_bits, "slots": mask}]
    flat = mask.reshape(-1)
    gaps = np.diff(np.flatnonzero(flat), prepend=-1) - 1
    k, bits = _rice_best(gaps) if kept else (0, 0)
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
        extra = int(((slots & ~mask).sum(1) * value_bits).sum())
        index_bits = _nm_table(n, m)[2]
        plans.append({"mask": "nm", "nm": [n, m], "slots": slots,
                      "bits": rows * (cols // m) * index_bits + kept_value_bits + extra})
    return min(plans, key=lambda p: p["bits"])


def _encode_slots(plan: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (by key suffix) and manifest fields of a slot plan."""
    slots = plan["slots"]
    if plan["mask"] == "bitmask":
        return {"mask": torch.from_numpy(np.packbits(slots.reshape(-1), bitorder="little"))}, {}
    if plan["mask"] == "rice":
        k = plan["rice_k"]
        unary, low, length = _rice_encode(slots.reshape(-1), k)
        tensors = {"rice_unary": unary, "rice_low": low} if k else {"rice_unary": unary}
        return tensors, {"rice_k": k, "rice_stream_bits": length}
    n, m = plan["nm"]
    _, lookup, index_bits = _nm_table(n, m)
    groups = slots.reshape(-1, m).astype(np.int64)
    patterns = (groups << np.arange(m)).sum(1)
    return {"nm_index": _pack(lookup[patterns], index_bits)}, {"nm": [n, m]}


def _decode_slots(info: dict, t: dict[str, torch.Tensor]) -> np.ndarray:
    rows, cols = info["shape"]
    numel = rows * cols
    if info["mask"] == "bitmask":
        return np.unpackbits(t["mask"].numpy(), count=numel, bitorder="little").astype(bool)
    if info["mask"] == "rice":
        low = t.get("rice_low", torch.zeros(0, dtype=torch.uint8))
        return _rice_decode(t["rice_unary"], low, info["rice_k"], info["rice_stream_bits"],
                            info["slots"], numel)
    if info["mask"] == "nm":
        n, m = info["nm"]
        valid, _, index_bits = _nm_table(n, m)
        index = _unpack(t["nm_index"], index_bits, numel // m)
        if index.size and index.max() >= valid.size:
            raise CheckpointError(f"N:M index out of range in a {n}:{m} layer")
        return ((valid[index][:, None] >> np.arange(m)) & 1).astype(bool).reshape(-1)
    raise CheckpointError(f"unknown mask encoding {info['mask']!r}")


# ---------------------------------------------------------------------------------------------
# one layer: encode / decode
# ---------------------------------------------------------------------------------------------

def _row_groups(bits: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(int(b), bits == b) for b in np.unique(bits)]


_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_NP_FLOAT = {torch.float16: np.float16, torch.float32: np.float32}


def _store_bits(x: torch.Tensor | np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` cast to ``dtype`` (round to nearest even), as the integers of its bit patterns."""
    if isinstance(x, torch.Tensor) and x.dtype in _NP_FLOAT:
        x = x.numpy()
    if isinstance(x, np.ndarray) and dtype in _NP_FLOAT:
        return x.astype(_NP_FLOAT[dtype], copy=False).view(np.int16 if dtype == torch.float16 else np.int32)
    return torch.as_tensor(x).to(dtype).view(_INT_OF[dtype]).numpy()  # bfloat16: numpy has none


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits)).view(dtype)


def _grid_arrays(scale: np.ndarray, zero: np.ndarray, bits: np.ndarray, groupsize, cols: int):
    """scale, zero float32 broadcastable to [rows, cols] (each column's grid), maxq [rows, 1]."""
    maxq = (2.0 ** bits - 1).astype(np.float32)[:, None]
    if groupsize is None or scale.shape[1] == 1:
        return scale[:, :1], zero[:, :1], maxq
    idx = np.arange(cols) // groupsize
    return scale[:, idx], zero[:, idx], maxq


def _dequantize(codes: np.ndarray, slots: np.ndarray, s: np.ndarray, z: np.ndarray, dtype) -> np.ndarray:
    """The layer's weights (bit patterns in ``dtype``) from its codes, as ``QuantGrid.dequantize``
    computes them (``scale * (q - zero)`` in float32), zero outside the slots."""
    w = np.where(slots, s * (codes.astype(np.float32) - z), np.float32(0))
    return _store_bits(w, dtype)


def _plus_zero(bits: np.ndarray) -> np.ndarray:
    """-0.0 -> +0.0 on bit patterns."""
    sign = np.array(1 << (8 * bits.itemsize - 1), dtype=np.int64).astype(bits.dtype)
    return np.where(bits == sign, 0, bits)


def _encode_layer(weight: torch.Tensor, mask: np.ndarray, grid: QuantGrid | None, dtype, name: str):
    """weight [rows, cols] (cpu), mask bool [rows, cols] -> (tensors by key suffix, manifest entry)."""
    rows, cols = weight.shape
    target = np.where(mask, _store_bits(weight, dtype), 0)  # the saved layer, as bit patterns
    kept = int(mask.sum())
    info: dict = {"shape": [rows, cols], "kept": kept, "density": kept / (rows * cols)}
    if grid is not None:
        bits = grid.bits.cpu().numpy().astype(np.int64)
        scale = grid.scale.detach().cpu().float().numpy()
        zero = grid.zero.detach().cpu().float().numpy()
        s, z, maxq = _grid_arrays(scale, zero, bits, grid.groupsize, cols)
        # quant.quantize_codes, in numpy
        codes = np.clip(np.round(weight.float().numpy() / s) + z, 0, maxq).astype(np.int64)
        if not np.array_equal(_plus_zero(_dequantize(codes, mask, s, z, dtype)), _plus_zero(target)):
            warnings.warn(f"layer {name}: weights do not lie on the grid given for them; storing "
                          f"them as {_dtype_name(dtype)} values", RuntimeWarning, stacklevel=3)
            grid = None
    value_bits = np.full(rows, torch.finfo(dtype).bits) if grid is None else bits

    plan = _choose_slots(mask, value_bits)
    tensors, fields = _encode_slots(plan)
    slots = plan["slots"]
    info.update(mask=plan["mask"], slots=int(slots.sum()), **fields)

    if grid is None:
        info["values"] = _dtype_name(dtype)
        tensors["values"] = _from_bits(target[slots], dtype)
    else:
        info.update(values="codes", groupsize=grid.groupsize)
        lo, hi = int(bits.min()), int(bits.max())
        info["wbits"] = lo if lo == hi else "mixed"
        info["wbits_range"] = [lo, hi]
        map_bits = width_map_bits(torch.from_numpy(bits))
        if map_bits:
            tensors["row_bits"] = _pack(bits - lo, map_bits)
        for b, rowsel in _row_groups(bits):
            tensors[f"codes{b}"] = _pack(codes[slots & rowsel[:, None]], b)
        # scales: fp16 only when it gives back the very same float32 numbers
        half = scale.astype(np.float16)
        exact = bool(np.isfinite(half).all()) and np.array_equal(half.astype(np.float32), scale)
        tensors["scale"] = torch.from_numpy(half if exact else np.ascontiguousarray(scale))
        # zero points: integers in [0, 2**b - 1]; implied when all are the symmetric midpoint
        if np.array_equal(zero, np.broadcast_to(2.0 ** (bits - 1)[:, None], zero.shape)):
            info["zero"] = "midpoint"
        elif np.array_equal(zero, np.round(zero)) and ((zero >= 0) & (zero <= maxq)).all():
            info["zero"] = "packed"
            for b, rowsel in _row_groups(bits):
                tensors[f"zero{b}"] = _pack(zero[rowsel].astype(np.int64), b)
        else:
            info["zero"] = "float32"
            tensors["zero"] = torch.from_numpy(np.ascontiguousarray(zero))
        info["scale_dtype"] = _dtype_name(tensors["scale"].dtype)
        # the shared storage model (quant.quant_storage_bits) with the scale width used here
        per_row = None if kept == rows * cols else torch.from_numpy(mask.sum(1))
        info["bits_model"] = quant_storage_bits(
            rows, cols, torch.from_numpy(bits), grid.groupsize, sym=info["zero"] == "midpoint",
            kept=per_row, scale_bits=torch.finfo(tensors["scale"].dtype).bits) / (rows * cols)
    info["tensors"] = {k: _tensor_info(v) for k, v in tensors.items()}
    info["bytes"] = sum(v["bytes"] for v in info["tensors"].values())
    info["bits_per_weight"] = 8 * info["bytes"] / (rows * cols)
    return tensors, info


def _decode_layer(info: dict, t: dict[str, torch.Tensor], dtype, name: str) -> torch.Tensor:
    rows, cols = info["shape"]
    slots = _decode_slots(info, t).reshape(rows, cols)
    if int(slots.sum()) != info["slots"]:
        raise CheckpointError(f"layer {name}: mask holds {int(slots.sum())} weights, manifest says "
                              f"{info['slots']}")
    if info["values"] != "codes":
        values = t["values"]
        if values.numel() != info["slots"]:
            raise CheckpointError(f"layer {name}: {values.numel()} values for {info['slots']} slots")
        out = np.zeros((rows, cols), dtype=np.int32 if values.element_size() == 4 else np.int16)
        out[slots] = values.view(_INT_OF[values.dtype]).numpy()
        return _from_bits(out, values.dtype).to(dtype)
    lo, hi = info["wbits_range"]
    map_bits = width_map_bits(torch.tensor([lo, hi]))
    row_bits = _unpack(t["row_bits"], map_bits, rows) + lo if map_bits else np.full(rows, lo)
    if row_bits.max() > hi:
        raise CheckpointError(f"layer {name}: row bit width out of its range [{lo}, {hi}]")
    scale = t["scale"].float().numpy()
    groups = scale.shape[1]
    codes = np.zeros((rows, cols), dtype=np.int64)
    zero = np.zeros((rows, groups), dtype=np.float32)
    for b, rowsel in _row_groups(row_bits):
        sel = slots & rowsel[:, None]
        codes[sel] = _unpack(t[f"codes{b}"], b, int(sel.sum()))
        if info["zero"] == "midpoint":
            zero[rowsel] = 2 ** (b - 1)
        elif info["zero"] == "packed":
            zero[rowsel] = _unpack(t[f"zero{b}"], b, int(rowsel.sum()) * groups).reshape(-1, groups)
    if info["zero"] == "float32":
        zero = t["zero"].float().numpy()
    s, z, _ = _grid_arrays(scale, zero, row_bits, info["groupsize"], cols)
    return _from_bits(_dequantize(codes, slots, s, z, dtype), dtype)


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first name sharing its storage (e.g. lm_head.weight -> embed_tokens.weight)."""
    first, aliases = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype, t.stride())
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def _validate(model, layers, masks, grids) -> dict[str, np.ndarray]:
    """Check the inputs before any work; -> the mask of every pruned layer (bool numpy)."""
    for what, given in (("masks", masks), ("grids", grids)):
        unknown = sorted(set(given or {}) - set(layers))
        if unknown:
            raise ValueError(f"{what} has layers that are not pruned layers of this model: {unknown[:3]}"
                             f" (names as in models.pruned_linears)")
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach().cpu()
        if masks is not None and name in masks:
            mask = masks[name].detach().cpu().to(torch.bool).numpy()
            if mask.shape != tuple(w.shape):
                raise ValueError(f"masks[{name!r}] has shape {list(mask.shape)}, weight is {list(w.shape)}")
            stray = int(np.count_nonzero(_store_bits(w, torch.float32)[~mask] << 1))  # (±0 is zero)
            if stray:
                raise ValueError(f"layer {name}: {stray} nonzero weights where masks[{name!r}] says pruned")
        else:
            mask = (_store_bits(w, torch.float32) << 1) != 0
        if grids and name in grids:
            g = grids[name]
            if g.scale.shape[0] != w.shape[0] or g.bits.numel() != w.shape[0]:
                raise ValueError(f"grids[{name!r}] has {g.scale.shape[0]} rows, weight has {w.shape[0]}")
            if not 1 <= int(g.bits.min()) <= int(g.bits.max()) <= 16:
                raise ValueError(f"grids[{name!r}]: bit widths must be in [1, 16]")
        out[name] = mask
    return out


@torch.no_grad()
def save_pruned(
    model: nn.Module, directory: str | Path, tokenizer=None,
    masks: dict[str, torch.Tensor] | None = None, grids: dict[str, QuantGrid] | None = None,
    metadata: dict | None = None, dtype: torch.dtype | str | None = None, progress: bool = True,
) -> dict:
    """Write ``model`` as a compact checkpoint folder and return its manifest.

    masks: layer name (as in :func:`models.pruned_linears`) -> bool [rows, cols], True = kept;
    a layer without one keeps its nonzero weights. grids: :class:`QuantGrid` of each quantized
    layer (its weights must lie on it, else they are stored as values, with a warning).
    metadata: JSON-serialisable dict kept in the manifest. dtype: storage dtype of values and
    dense tensors; None = the model's dtype when 16-bit, else float16.

    The manifest holds ``size_bytes`` (the whole folder), ``dense_fp16_bytes``, ``density``
    (kept fraction over the pruned layers), ``avg_bits`` (bits per weight over them) and one
    entry per layer. The folder is built beside ``directory`` and swapped in at the end: an
    interrupted save leaves an earlier checkpoint there intact.
    """
    directory = Path(directory)
    store = _storage_dtype(model, dtype)
    try:
        meta_json = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
    _recover(directory)
    _check_target(directory, (MANIFEST,))
    get_adapter(model)  # a clear error for an unsupported architecture
    layers = pruned_linears(model)
    all_masks = _validate(model, layers, masks, grids)
    grids = grids or {}
    start = time.perf_counter()

    state = model.state_dict()
    aliases = _tied_aliases(state)
    pruned_keys = {f"{name}.weight" for name in layers}
    if pruned_keys & set(aliases) or pruned_keys & set(aliases.values()):
        raise ValueError("a pruned layer's weight is tied to another tensor; cannot store it compactly")
    dense = {}
    for key, t in state.items():
        if key in pruned_keys or key in aliases:
            continue
        t = t.detach().cpu()
        dense[key] = _from_bits(_store_bits(t, store), store) if t.is_floating_point() else t.contiguous()

    pruned, layer_info = {}, {}
    for name, layer in tqdm(layers.items(), desc="save layers", disable=not progress):
        tensors, info = _encode_layer(layer.weight.detach().cpu(), all_masks[name], grids.get(name),
                                      store, name)
        layer_info[name] = info
        pruned.update({f"{name}::{k}": v for k, v in tensors.items()})

    from safetensors.torch import save_file

    tmp = _new_temp(directory)
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(dense, tmp / DENSE_FILE, metadata={"format": FORMAT})
        save_file(pruned, tmp / PRUNED_FILE, metadata={"format": FORMAT})
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        params = sum(i["shape"][0] * i["shape"][1] for i in layer_info.values())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model_type": model.config.model_type,
            "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
            "dtype": _dtype_name(store),
            "pruned_params": params,
            "density": sum(i["kept"] for i in layer_info.values()) / params,
            "avg_bits": 8 * sum(i["bytes"] for i in layer_info.values()) / params,
            "dense_fp16_bytes": dense_fp16_bytes(model),
            "size_bytes": 0,
            "tied": aliases,
            "dense_tensors": {k: _tensor_info(v) for k, v in dense.items()},
            "layers": layer_info,
            "files": files,
            "metadata": meta_json,
            "versions": versions(),
        }
        data_bytes = sum(f["bytes"] for f in files.values())
        text = ""
        for _ in range(4):  # the size includes the manifest itself: iterate to the fixed point
            manifest["size_bytes"] = data_bytes + len(text.encode())
            text = json.dumps(manifest, indent=1)
        manifest["size_bytes"] = data_bytes + len(text.encode())
        text = json.dumps(manifest, indent=1)
        (tmp / MANIFEST).write_text(text)  # last: a folder without it is not a checkpoint
        _swap_in(tmp, directory)
        # returned, not written: the same model must save to the same bytes
        manifest["save_seconds"] = round(time.perf_counter() - start, 3)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def _resolve_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    _recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    return path


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The checkpoint's manifest; with ``verify`` every listed file is checked for its size and
    sha256 (raises :class:`CheckpointError` on any difference)."""
    directory = _resolve_dir(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} holds no {MANIFEST}: not a checkpoint of this "
                              f"format (a plain save_pretrained folder loads with models.load_model)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}; this package reads up to "
                              f"{FORMAT_VERSION} (upgrade sparsegpt_utils)")
    for key in ("files", "layers", "dense_tensors", "tied", "dtype", "model_type"):
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the key {key!r}")
    if verify:
        for rel, want in manifest["files"].items():
            f = directory / rel
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {rel} is missing from {str(directory)!r}")
            size = f.stat().st_size
            if size != want["bytes"]:
                raise CheckpointError(f"checkpoint file {rel} is {size} bytes, the manifest says "
                                      f"{want['bytes']}: truncated or replaced")
            if _sha256(f) != want["sha256"]:
                raise CheckpointError(f"checkpoint file {rel} fails its sha256 check: corrupt or modified")
    return manifest


def _load_file(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(directory / name)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {name}: {err}") from None


def _check_tensor(key: str, t: torch.Tensor | None, want: dict) -> None:
    if t is None:
        raise CheckpointError(f"tensor {key!r} listed in the manifest is missing from the checkpoint")
    if _dtype_name(t.dtype) != want["dtype"] or list(t.shape) != want["shape"]:
        raise CheckpointError(f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)}, the manifest "
                              f"says {want['dtype']} {want['shape']}")


def _read_state(directory: Path, manifest: dict, progress: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the saved model (tied aliases left out), in the storage dtype."""
    dtype = _DTYPES.get(manifest["dtype"])
    if dtype is None:
        raise CheckpointError(f"manifest dtype {manifest['dtype']!r} is not one of {sorted(_DTYPES)}")
    dense = _load_file(directory, DENSE_FILE)
    pruned = _load_file(directory, PRUNED_FILE)
    for key, want in manifest["dense_tensors"].items():
        _check_tensor(key, dense.get(key), want)
    extra = sorted(set(dense) - set(manifest["dense_tensors"]))
    listed = {f"{n}::{k}" for n, i in manifest["layers"].items() for k in i["tensors"]}
    extra += sorted(set(pruned) - listed)
    if extra:
        raise CheckpointError(f"checkpoint tensors not in the manifest: {extra[:3]}")
    state = dict(dense)
    for name, info in tqdm(manifest["layers"].items(), desc="load layers", disable=not progress):
        t = {}
        for k, want in info["tensors"].items():
            _check_tensor(f"{name}::{k}", pruned.get(f"{name}::{k}"), want)
            t[k] = pruned[f"{name}::{k}"]
        try:
            state[f"{name}.weight"] = _decode_layer(info, t, dtype, name)
        except CheckpointError:
            raise
        except (KeyError, ValueError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"layer {name} does not decode ({type(err).__name__}: {err}): "
                                  f"manifest and data disagree") from None
    return state


def _check_architecture(model: nn.Module, manifest: dict, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    model_type = getattr(model.config, "model_type", None)
    if model_type != manifest["model_type"]:
        raise CheckpointError(f"checkpoint is for model_type {manifest['model_type']!r}, the model is "
                              f"{model_type!r}")
    missing = sorted(set(own) - set(state) - set(manifest["tied"]))
    unexpected = sorted(set(state) - set(own))
    wrong = [(k, list(state[k].shape), list(own[k].shape)) for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {a} vs model {b}" for k, a, b in wrong[:3]))
        if missing:
            parts.append(f"model tensors absent from the checkpoint {missing[:3]}")
        if unexpected:
            parts.append(f"checkpoint tensors the model lacks {unexpected[:3]}")
        raise CheckpointError("checkpoint does not fit this model (another architecture or size): "
                              + "; ".join(parts))


@torch.no_grad()
def load_masked_model_single(model: nn.Module, path: str | Path, progress: bool = False) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (in place, cast to the model's dtype) and return
    it. ``path``: the checkpoint folder or its manifest.json. Raises :class:`CheckpointError`
    when the checkpoint is damaged or made for a model of other shapes."""
    directory = _resolve_dir(path)
    manifest = read_manifest(directory)
    state = _read_state(directory, manifest, progress)
    _check_architecture(model, manifest, state)
    own = model.state_dict()
    for key, t in state.items():
        own[key].copy_(t)
    for alias, source in manifest["tied"].items():
        if own[alias].data_ptr() != own[source].data_ptr():
            own[alias].copy_(state[source])
    return model


@torch.no_grad()
def load_pruned(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None, progress: bool = False):
    """Rebuild the saved model -> (model, tokenizer or None). ``dtype`` None: the storage dtype
    (exactly the saved weights); otherwise the weights are cast to it. The model is in eval
    mode with ``use_cache`` off, as :func:`models.load_model` returns it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = _resolve_dir(directory)
    manifest = read_manifest(directory)
    state = _read_state(directory, manifest, progress)
    target = _DTYPES[manifest["dtype"]] if dtype is None else (
        _DTYPES[dtype] if isinstance(dtype, str) and dtype in _DTYPES else dtype)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise ValueError(f"dtype must be None, a float torch dtype or one of {sorted(_DTYPES)}, "
                         f"got {dtype!r}")
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):  # no random init: every weight is loaded
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    _check_architecture(model, manifest, state)
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    own = model.state_dict()
    for alias, source in manifest["tied"].items():
        if own[alias].data_ptr() != own[source].data_ptr():  # config does not tie: copy instead
            getattr_path = alias.rsplit(".", 1)
            module = model.get_submodule(getattr_path[0])
            setattr(module, getattr_path[1], nn.Parameter(state[source].clone(), requires_grad=False))
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint left model tensors unset: {leftover[:3]}")
    model.config.use_cache = False
    model.eval()
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------
# dense export
# ---------------------------------------------------------------------------------------------

def export_dense(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """A plain ``save_pretrained`` folder (safetensors, the model's dtype) that any transformers
    user loads with ``AutoModelForCausalLM.from_pretrained``; written atomically like
    :func:`save_pruned`. Returns the folder."""
    directory = Path(directory)
    _recover(directory)
    _check_target(directory, ("config.json",))
    tmp = _new_temp(directory)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
