"""Compact checkpoints of pruned (and quantized) models: save, load, verify, export, publish.

A checkpoint is a folder::

    config.json, generation_config.json, tokenizer files   as transformers writes them
    dense.safetensors    every tensor that is not a pruned layer's weight, dense
    pruned.safetensors   the pruned layers, in the code of :mod:`sparsegpt_utils.codec`
    README.md            the model card: base model, method, density and sparsity, bits, perplexity
    manifest.json        written last: format version, per-layer density / bits / encoding,
                         every tensor's dtype, shape and bytes, and size + sha256 of every file

*Bits per weight* of a layer (DESIGN §1) is 8 × the bytes of all its tensors / (rows × cols):
what is really on disk, byte padding included. ``avg_bits`` is the same over all pruned layers.

The round trip is exact: the loaded weights equal the saved model's (the model cast to the
storage dtype) bit for bit, except that a zero may come back as +0.0 where it was -0.0.

What a load trusts: nothing. Nothing is unpickled; the manifest is checked for its shape
(types, keys, ties) before use; every file it names must lie inside the folder and match its
size and sha256; a weights file it does not name is refused; each layer's decoded mask must
hold the ``kept`` / ``density`` the manifest states. Every failure is a :class:`CheckpointError`.

Once this package is imported, ``transformers.AutoModelForCausalLM.from_pretrained(folder)``
loads a checkpoint too (``config.json`` carries a ``quantization_config`` whose quant_method is
``sparsegpt_utils``); the model it returns is an ordinary dense model, with the weights
:func:`load_pruned` gives.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import importlib.abc
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._version import versions
from .codec import (
    MASK_FORMS,
    CodecError,
    decode_kept,
    decode_layer,
    dtype_name,
    encode_layer,
    layer_grid,
    store_bits,
    tensor_info,
)
from .models import assemble_weight, get_adapter, matrix_layout, pruned_linears, resolve_dtype, weight_key
from .quant import QuantGrid

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CheckpointError",
    "save_pruned",
    "load_pruned",
    "load_masked_model_single",
    "read_manifest",
    "export_dense",
    "export_checkpoint",
    "push_to_hub",
    "model_card",
    "checkpoint_bytes",
    "dense_fp16_bytes",
    "sha256_file",
    "add_cli_arguments",
    "cli_main",
]

FORMAT = "sparsegpt-compact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
PRUNED_FILE = "pruned.safetensors"
CARD_FILE = "README.md"
QUANT_METHOD = "sparsegpt_utils"
# config.json names this (missing) weights file, so that a transformers without this package
# imported fails naming the package instead of loading dense.safetensors with random layers
# in place of the pruned ones; the registered quantizer points transformers at DENSE_FILE
WEIGHTS_STUB = "import-sparsegpt_utils-to-load-this-checkpoint.safetensors"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# files a transformers folder may hold weights in: unlisted ones are refused on load
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, inconsistent with its manifest, or made for a
    model of another architecture."""


# ---------------------------------------------------------------------------------------------
# dtypes, bytes, files
# ---------------------------------------------------------------------------------------------

def _storage_dtype(model: nn.Module, dtype) -> torch.dtype:
    """None: the model's dtype if it is 16-bit, else float16."""
    if dtype is None or dtype == "auto":
        own = next(model.parameters()).dtype
        return own if own in (torch.float16, torch.bfloat16) else torch.float16
    store = resolve_dtype(dtype, "cpu")
    if store not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    return store


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


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# atomic folders: build in a temp folder beside the target, then swap
# ---------------------------------------------------------------------------------------------

def _backups(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Temp folders of saves that died (``.NAME.tmp-PID-*`` beside the folder, ``.tmp-*``
    inside it) go; one whose process still runs is another save in progress and stays."""
    candidates = list(directory.parent.glob(f".{directory.name}.tmp-*"))
    if directory.is_dir():
        candidates += list(directory.glob(".tmp-*"))
    for path in candidates:
        match = re.match(r"\.(?:.+\.)?tmp-(\d+)-", path.name)
        if match and int(match.group(1)) != os.getpid() and _pid_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass


def _recover(directory: Path) -> None:
    """A save killed between its two renames leaves the earlier folder as a hidden backup
    beside the target: put it back. Temp folders of interrupted saves are removed."""
    if not directory.exists():
        backups = _backups(directory)
        if backups:
            os.replace(backups[-1], directory)
    _remove_stale_temps(directory)


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
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700; a folder follows the umask
    return tmp


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by ``tmp``; the old folder survives until the new one is in place."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, old)  # (an empty placeholder folder is replaced atomically)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_folder(directory: Path, markers: tuple[str, ...], fill) -> None:
    """Build a folder with ``fill(tmp)`` beside ``directory`` and swap it in."""
    _recover(directory)
    _check_target(directory, markers)
    tmp = _new_temp(directory)
    try:
        fill(tmp)
        # some writers (safetensors) make 0600 files: give every file the mode the umask asks
        umask = _current_umask()
        for path in tmp.rglob("*"):
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        _swap_in(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the model card
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".4g") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def model_card(manifest: dict, *, title: str | None = None, note: str | None = None) -> str:
    """The README.md of a checkpoint folder, from its manifest and the metadata it was saved
    with (base model, method, density and sparsity, bits, perplexity with its protocol, how to
    load). Deterministic: the same manifest gives the same text."""
    meta = manifest.get("metadata") or {}
    base = meta.get("model") or meta.get("base_model") or "unknown"
    density = float(manifest.get("density", float("nan")))
    bits = {i.get("wbits") for i in manifest.get("layers", {}).values() if i.get("values") == "codes"}
    if "mixed" in bits:
        wbits = "mixed (" + _fmt(meta.get("target_avg_bits")) + " average target)"
    else:
        wbits = ", ".join(str(b) for b in sorted(bits)) if bits else f"none ({manifest.get('dtype')} values)"
    method = meta.get("method", "unknown")
    if meta.get("nm"):
        method += f", N:M {meta['nm']}"
    base_yaml = f"base_model: {base}\n" if base != "unknown" and "/" in str(base) else ""
    lines = [
        "---",
        "library_name: transformers",
        f"{base_yaml}tags:", "- sparsegpt_utils", "- pruned", "- sparse",
        "---", "",
        f"# {title or (str(base).split('/')[-1] + ' — pruned' + (' and quantized' if bits else ''))}", "",
        f"A compact `{FORMAT}` checkpoint (format {manifest.get('format_version')}) written by "
        f"sparsegpt_utils {manifest.get('versions', {}).get('sparsegpt_utils', '?')}.", "",
        "| | |", "| --- | --- |",
        f"| base model | {base} |",
        f"| method | {method} |",
        f"| density (fraction of weights kept) | {density:.4f} |",
        f"| sparsity (fraction of weights zeroed) | {1 - density:.4f} |",
        f"| weight bits | {wbits} |",
        "| bits per weight on disk (pruned layers, every stored byte) | "
        f"{_fmt(manifest.get('avg_bits'), '.3f')} |",
        f"| pruned layers / their weights | {len(manifest.get('layers', {}))} / "
        f"{manifest.get('pruned_params')} |",
        f"| storage dtype | {manifest.get('dtype')} |",
    ]
    if meta.get("ppl") is not None:
        protocol = ", ".join(f"{k} {meta[k]}" for k in ("eval", "eval_requested", "seqlen", "eval_windows",
                                                        "eval_tokens") if meta.get(k) is not None)
        lines.append(f"| perplexity | {_fmt(meta['ppl'], '.2f')} ({protocol or 'protocol not recorded'}) |")
        if meta.get("ppl_dense") is not None:
            lines.append(f"| perplexity of the dense model, same protocol | "
                         f"{_fmt(meta['ppl_dense'], '.2f')} |")
        lines += ["", "Perplexity: exp of the mean next-token loss over non-overlapping windows of the "
                  "evaluation text (the package's protocol; lm-evaluation-harness's wikitext task "
                  "is a different protocol)."]
    else:
        lines += ["", "Perplexity: not measured when this checkpoint was saved."]
    calib = ", ".join(f"{k} {meta[k]}" for k in ("calib", "calib_samples", "seed") if meta.get(k) is not None)
    if calib:
        lines += ["", f"Calibration: {calib}."]
    if note:
        lines += ["", note]
    lines += [
        "", "## Load", "",
        "```python",
        "import sparsegpt_utils  # registers the checkpoint format with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
        "",
        "# or, with the tokenizer:",
        "from sparsegpt_utils.checkpoint import load_pruned",
        "model, tokenizer = load_pruned(\"path/to/this/folder\")",
        "```", "",
        "A dense copy any transformers loads without this package: "
        "`python -m sparsegpt_utils export path/to/this/folder OUT --format dense --dtype bfloat16`.",
        "",
    ]
    return "\n".join(lines)


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
            stray = int(np.count_nonzero(store_bits(w, torch.float32)[~mask] << 1))  # (±0 is zero)
            if stray:
                raise ValueError(f"layer {name}: {stray} nonzero weights where masks[{name!r}] says pruned")
        else:
            mask = (store_bits(w, torch.float32) << 1) != 0
        if grids and name in grids:
            g = grids[name]
            fits = tuple(g.bits.shape) in ((w.shape[0],), tuple(g.scale.shape))
            if g.scale.shape[0] != w.shape[0] or not fits:
                raise ValueError(f"grids[{name!r}]: scale {list(g.scale.shape)} and bits "
                                 f"{list(g.bits.shape)} do not fit a weight of {w.shape[0]} rows "
                                 f"(bits: [rows] or one per grid)")
            if not 1 <= int(g.bits.min()) <= int(g.bits.max()) <= 16:
                raise ValueError(f"grids[{name!r}]: bit widths must be in [1, 16]")
        out[name] = mask
    return out


def _compact_config(model: nn.Module, store: torch.dtype):
    """The model's config as the checkpoint's config.json holds it: the storage dtype, and the
    ``quantization_config`` that routes ``from_pretrained`` to this package."""
    config = copy.deepcopy(model.config)
    config.dtype = store
    config.quantization_config = {"quant_method": QUANT_METHOD, "format": FORMAT,
                                  "format_version": FORMAT_VERSION, "manifest": MANIFEST}
    config.transformers_weights = WEIGHTS_STUB
    return config


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
    metadata: JSON-serialisable dict kept in the manifest and shown in the model card
    (``model``, ``method``, ``nm``, ``ppl``, ``eval``, ``seqlen``, ``calib`` ... when present).
    dtype: storage dtype of values and dense tensors; None = the model's dtype when 16-bit,
    else float16.

    The manifest holds ``size_bytes`` (the whole folder), ``dense_fp16_bytes``, ``density``
    (kept fraction over the pruned layers), ``avg_bits`` (bits per weight over them) and one
    entry per layer. The folder is built beside ``directory`` and swapped in at the end: an
    interrupted save leaves an earlier checkpoint there intact. Files follow the umask.
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
    pruned_keys = {weight_key(name, layer) for name, layer in layers.items()}
    if pruned_keys & set(aliases) or pruned_keys & set(aliases.values()):
        raise ValueError("a pruned layer's weight is tied to another tensor; cannot store it compactly")
    dense = {}
    for key, t in state.items():
        if key in pruned_keys or key in aliases:
            continue
        t = t.detach().cpu()
        dense[key] = t.to(store).contiguous() if t.is_floating_point() else t.contiguous()

    pruned, layer_info = {}, {}
    for name, layer in tqdm(layers.items(), desc="save layers", disable=not progress):
        tensors, info = encode_layer(layer.weight.detach().cpu().contiguous(), all_masks[name],
                                     grids.get(name), store, name)
        if matrix_layout(layer) is not None:  # a Conv1D's transpose or part of a fused matrix
            info.update(param=weight_key(name, layer), layout=matrix_layout(layer))
        layer_info[name] = info
        pruned.update({f"{name}::{k}": v for k, v in tensors.items()})

    from safetensors.torch import save_file

    manifest: dict = {}

    def fill(tmp: Path) -> None:
        # (config.save_pretrained drops transformers_weights: write the JSON itself)
        _compact_config(model, store).to_json_file(tmp / "config.json", use_diff=True)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(dense, tmp / DENSE_FILE, metadata={"format": FORMAT})
        save_file(pruned, tmp / PRUNED_FILE, metadata={"format": FORMAT})
        params = sum(i["shape"][0] * i["shape"][1] for i in layer_info.values())
        manifest.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model_type": model.config.model_type,
            "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
            "dtype": dtype_name(store),
            "pruned_params": params,
            "density": sum(i["kept"] for i in layer_info.values()) / params,
            "avg_bits": 8 * sum(i["bytes"] for i in layer_info.values()) / params,
            "dense_fp16_bytes": dense_fp16_bytes(model),
            "size_bytes": 0,
            "tied": aliases,
            "dense_tensors": {k: tensor_info(v) for k, v in dense.items()},
            "layers": layer_info,
            "files": {},
            "metadata": meta_json,
            "versions": versions(),
        })
        (tmp / CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size,
                                                             "sha256": sha256_file(p)}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        data_bytes = sum(f["bytes"] for f in manifest["files"].values())
        text = ""
        for _ in range(4):  # the size includes the manifest itself: iterate to the fixed point
            manifest["size_bytes"] = data_bytes + len(text.encode())
            text = json.dumps(manifest, indent=1)
        manifest["size_bytes"] = data_bytes + len(text.encode())
        text = json.dumps(manifest, indent=1)
        (tmp / MANIFEST).write_text(text, encoding="utf-8")  # last: a folder without it is not a checkpoint

    _write_folder(directory, (MANIFEST,), fill)
    # returned, not written: the same model must save to the same bytes
    manifest["save_seconds"] = round(time.perf_counter() - start, 3)
    return manifest


# ---------------------------------------------------------------------------------------------
# the manifest: its shape, its files
# ---------------------------------------------------------------------------------------------

def _resolve_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.is_dir():
        _recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    _remove_stale_temps(path)
    return path


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_str_dict(x) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) for k in x)


def _tensor_entry_ok(t) -> bool:
    return (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
            and all(_is_int(s) and s >= 0 for s in t["shape"]) and _is_int(t.get("bytes")))


def _check_shape(manifest: dict, where: str) -> None:
    """Every field a load reads, with its type: a malformed manifest is a CheckpointError here,
    never an AttributeError / KeyError / TypeError later."""
    def bad(what: str):
        raise CheckpointError(f"{where}: {what}")

    for key in ("files", "layers", "dense_tensors", "tied", "dtype", "model_type"):
        if key not in manifest:
            bad(f"lacks the key {key!r}")
    if not isinstance(manifest["model_type"], str):
        bad("model_type is not a string")
    if manifest["dtype"] not in STORAGE_DTYPES:
        bad(f"dtype {manifest['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    files = manifest["files"]
    if not _is_str_dict(files) or not all(
            isinstance(f, dict) and _is_int(f.get("bytes")) and f["bytes"] >= 0
            and isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
            for f in files.values()):
        bad("'files' must map names to {'bytes': int, 'sha256': 64 hex digits}")
    for required in (DENSE_FILE, PRUNED_FILE, "config.json"):
        if required not in files:
            bad(f"does not list {required} in 'files'")
    dense = manifest["dense_tensors"]
    if not _is_str_dict(dense) or not all(_tensor_entry_ok(t) for t in dense.values()):
        bad("'dense_tensors' must map names to {'dtype', 'shape', 'bytes'}")
    tied = manifest["tied"]
    if not _is_str_dict(tied) or not all(isinstance(v, str) for v in tied.values()):
        bad("'tied' must map tensor names to tensor names")
    for alias, source in tied.items():
        if source not in dense or alias in dense or alias == source:
            bad(f"'tied' entry {alias!r} -> {source!r}: the source must be a stored dense tensor "
                f"and the alias must not be stored")
    layers = manifest["layers"]
    if not _is_str_dict(layers):
        bad("'layers' must map layer names to entries")
    for name, info in layers.items():
        if not isinstance(info, dict):
            bad(f"layer {name!r} is not an object")
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
            bad(f"layer {name!r}: shape must be [rows, cols] of positive integers")
        numel = shape[0] * shape[1]
        for key in ("kept", "slots"):
            if not (_is_int(info.get(key)) and 0 <= info[key] <= numel):
                bad(f"layer {name!r}: {key} must be an integer in [0, {numel}]")
        if not (_is_num(info.get("density")) and 0 <= info["density"] <= 1):
            bad(f"layer {name!r}: density must be a number in [0, 1]")
        if info.get("mask") not in MASK_FORMS:
            bad(f"layer {name!r}: unknown mask encoding {info.get('mask')!r}")
        if not isinstance(info.get("values"), str):
            bad(f"layer {name!r}: values must be 'codes' or a dtype name")
        layout = info.get("layout")
        rows = layout.get("rows") if isinstance(layout, dict) else None
        if "layout" in info and not (
                isinstance(info.get("param"), str) and isinstance(layout, dict)
                and isinstance(layout.get("transposed"), bool)
                and (rows is None or (isinstance(rows, list) and len(rows) == 2
                                      and all(_is_int(r) and r >= 0 for r in rows)))):
            bad(f"layer {name!r}: a matrix inside a parameter needs 'param' (its tensor name) and "
                f"'layout' {{'rows': [r0, r1] or null, 'transposed': bool}}")
        tensors = info.get("tensors")
        if not _is_str_dict(tensors) or not all(_tensor_entry_ok(t) for t in tensors.values()):
            bad(f"layer {name!r}: 'tensors' must map names to {{'dtype', 'shape', 'bytes'}}")
        if info["mask"] == "nm" and not (isinstance(info.get("nm"), list) and len(info["nm"]) == 2
                                         and all(_is_int(x) for x in info["nm"])):
            bad(f"layer {name!r}: nm must be [n, m]")
        if info["mask"] == "full" and info["slots"] != numel:
            bad(f"layer {name!r}: a 'full' mask keeps every one of its {numel} weights")
        if info["mask"] == "rice" and not (
                _is_int(info.get("rice_k")) and _is_int(info.get("rice_stream_bits"))
                and 0 <= info["rice_k"] < 63 and info["rice_stream_bits"] >= 0):
            bad(f"layer {name!r}: rice_k and rice_stream_bits must be non-negative integers")
        if info["values"] == "codes":
            rng = info.get("wbits_range")
            gs = info.get("groupsize")
            if not (isinstance(rng, list) and len(rng) == 2 and all(_is_int(b) for b in rng)):
                bad(f"layer {name!r}: wbits_range must be [lo, hi]")
            if not (gs is None or (_is_int(gs) and gs > 0)):
                bad(f"layer {name!r}: groupsize must be a positive integer or null")
            if info.get("width_unit", "row") not in ("row", "grid"):
                bad(f"layer {name!r}: width_unit must be 'row' or 'grid'")
            if info.get("zero") not in ("midpoint", "packed", "float32"):
                bad(f"layer {name!r}: unknown zero-point form {info.get('zero')!r}")


def _inside(directory: Path, rel: str) -> Path:
    """The path of manifest file name ``rel``, refused unless it is a plain relative name whose
    real location (symlinks followed) is inside ``directory``. Nothing outside is read or named."""
    parts = Path(rel).parts
    if (not rel or "\\" in rel or "\0" in rel or os.path.isabs(rel) or rel.startswith("~")
            or any(p in ("..", "") for p in parts) or Path(rel).as_posix() != rel):
        raise CheckpointError(f"manifest names the file {rel!r}: not a plain name inside the "
                              f"checkpoint folder")
    path = directory / rel
    root = directory.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        raise CheckpointError(f"checkpoint file {rel!r} cannot be resolved (a symlink loop?)") from None
    if real != root and root not in real.parents:
        raise CheckpointError(f"checkpoint file {rel!r} points outside the checkpoint folder; refused")
    return path


def _verify_files(directory: Path, manifest: dict) -> None:
    import stat

    for rel, want in manifest["files"].items():
        f = _inside(directory, rel)
        try:
            st = f.stat()
        except OSError:
            raise CheckpointError(f"checkpoint file {rel} is missing from {str(directory)!r}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint file {rel} is not a regular file; refused")
        if st.st_size != want["bytes"]:
            raise CheckpointError(f"checkpoint file {rel} is {st.st_size} bytes, the manifest says "
                                  f"{want['bytes']}: truncated or replaced")
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {rel} fails its sha256 check: corrupt or modified")
    listed = set(manifest["files"])
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.name.endswith(WEIGHT_SUFFIXES) and p.relative_to(directory).as_posix() not in listed
                   and (p.is_file() or p.is_symlink()))
    if extra:
        raise CheckpointError(f"weights files not listed in the manifest: {extra[:3]}; a checkpoint holds "
                              f"only the files its manifest names and hashes")


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The checkpoint's manifest, checked for its shape; with ``verify`` every listed file is
    checked for its size and sha256 and unlisted weights files are refused (raises
    :class:`CheckpointError` on any difference)."""
    directory = _resolve_dir(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} holds no {MANIFEST}: not a checkpoint of this "
                              f"format (a plain save_pretrained folder loads with models.load_model)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}; this package reads up to "
                              f"{FORMAT_VERSION} (upgrade sparsegpt_utils)")
    _check_shape(manifest, str(path))
    if verify:
        _verify_files(directory, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def _load_file(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(_inside(directory, name))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {name}: {err}") from None


def _check_tensor(key: str, t: torch.Tensor | None, want: dict) -> None:
    if t is None:
        raise CheckpointError(f"tensor {key!r} listed in the manifest is missing from the checkpoint")
    if dtype_name(t.dtype) != want["dtype"] or list(t.shape) != want["shape"]:
        raise CheckpointError(f"tensor {key!r} is {dtype_name(t.dtype)} {list(t.shape)}, the manifest "
                              f"says {want['dtype']} {want['shape']}")


def _check_counts(name: str, info: dict, weight: torch.Tensor) -> None:
    """The manifest's kept / density against the decoded layer (its weight, or its kept values):
    the kept weights are the slots (an N:M layer may add zero-valued slots), and every nonzero
    weight is kept."""
    rows, cols = info["shape"]
    nonzero = int(torch.count_nonzero(weight))
    kept, slots = info["kept"], info["slots"]
    if info["mask"] == "nm":
        ok = nonzero <= kept <= slots
    else:
        ok = kept == slots and nonzero <= kept
    if not ok:
        raise CheckpointError(f"layer {name}: the manifest says {kept} weights kept, the decoded mask holds "
                              f"{slots} slots with {nonzero} nonzero weights")
    if not math.isclose(info["density"], kept / (rows * cols), rel_tol=1e-9, abs_tol=1e-12):
        raise CheckpointError(f"layer {name}: the manifest says density {info['density']}, its kept count "
                              f"gives {kept / (rows * cols)}")


def _read_layer(name: str, info: dict, pruned: dict[str, torch.Tensor], dtype: torch.dtype,
                decode=None, pop: bool = False):
    """``decode(info, tensors, dtype)`` of layer ``name`` (None: the dense weight), its
    tensors checked against the manifest first and its counts after; ``pop``: take the layer's
    tensors out of ``pruned`` (to free them once decoded)."""
    t = {}
    for k, want in info["tensors"].items():
        _check_tensor(f"{name}::{k}", pruned.get(f"{name}::{k}"), want)
        t[k] = pruned.pop(f"{name}::{k}") if pop else pruned[f"{name}::{k}"]
    dense = decode is None
    try:
        weight = decode_layer(info, t, dtype) if dense else decode(info, t, dtype)
    except CodecError as err:
        raise CheckpointError(f"layer {name}: {err}") from None
    except (KeyError, ValueError, IndexError, RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"layer {name} does not decode ({type(err).__name__}: {err}): "
                              f"manifest and data disagree") from None
    _check_counts(name, info, weight if dense else weight[1])
    return weight


def _read_files(directory: Path, manifest: dict, dense_too: bool = True):
    """(the tensors of pruned.safetensors, those of dense.safetensors or {}), checked against
    the manifest's list."""
    pruned = _load_file(directory, PRUNED_FILE)
    listed = {f"{n}::{k}" for n, i in manifest["layers"].items() for k in i["tensors"]}
    extra = sorted(set(pruned) - listed)
    dense = {}
    if dense_too:
        dense = _load_file(directory, DENSE_FILE)
        for key, want in manifest["dense_tensors"].items():
            _check_tensor(key, dense.get(key), want)
        extra = sorted(set(dense) - set(manifest["dense_tensors"])) + extra
    if extra:
        raise CheckpointError(f"checkpoint tensors not in the manifest: {extra[:3]}")
    return pruned, dense


def _read_state(directory: Path, manifest: dict, progress: bool,
                dense_too: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the saved model (tied aliases left out), in the storage dtype; only the
    pruned layers' weights when not ``dense_too``."""
    dtype = resolve_dtype(manifest["dtype"], "cpu")
    pruned, state = _read_files(directory, manifest, dense_too)
    parts: dict[str, list] = {}  # the matrices of Conv1D / fused parameters, by parameter
    for name, info in tqdm(manifest["layers"].items(), desc="load layers", disable=not progress):
        weight = _read_layer(name, info, pruned, dtype)
        if "layout" in info:
            parts.setdefault(info["param"], []).append((info["layout"], weight))
        else:
            state[f"{name}.weight"] = weight
    for key, matrices in parts.items():
        try:
            state[key] = assemble_weight(matrices)
        except (ValueError, RuntimeError) as err:
            raise CheckpointError(f"parameter {key}: its matrices do not rebuild it ({err})") from None
    return state


def _check_architecture(model: nn.Module, manifest: dict, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    model_type = getattr(model.config, "model_type", None)
    if model_type != manifest["model_type"]:
        raise CheckpointError(f"checkpoint is for model_type {manifest['model_type']!r}, the model is "
                              f"{model_type!r}")
    missing = sorted(set(own) - set(state) - set(manifest["tied"]))
    unexpected = sorted((set(state) | set(manifest["tied"])) - set(own))
    wrong = [(k, list(state[k].shape), list(own[k].shape)) for k in state
             if k in own and state[k].shape != own[k].shape]
    wrong += [(a, list(state[s].shape), list(own[a].shape)) for a, s in manifest["tied"].items()
              if a in own and s in state and state[s].shape != own[a].shape]
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


def _plain_config(config):
    """A checkpoint's config without the keys that route ``from_pretrained`` to this package:
    what a dense model built from it saves."""
    for key in ("quantization_config", "transformers_weights"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def _resolve_load_dtype(dtype, manifest: dict) -> torch.dtype:
    if dtype is None:
        return resolve_dtype(manifest["dtype"], "cpu")
    if isinstance(dtype, torch.dtype):
        target = dtype
    elif isinstance(dtype, str) and dtype in STORAGE_DTYPES + ("fp32", "fp16", "bf16"):
        target = resolve_dtype(dtype, "cpu")
    else:
        target = None
    if target is None or not target.is_floating_point:
        raise ValueError(f"dtype must be None, a float torch dtype or one of {list(STORAGE_DTYPES)}, "
                         f"got {dtype!r}")
    return target


class _PeakRSS:
    """The peak resident memory of this process over a ``with`` block, in MB (2**20 bytes), as an
    increase over its RSS at the start. Linux: the kernel's high-water mark ``VmHWM`` is reset to
    the current RSS at the start (``/proc/self/clear_refs`` ← 5; this also resets what
    ``getrusage`` reports as ``ru_maxrss`` afterwards) and read at the end — the true peak.
    Elsewhere, or where that file may not be written: the rise of ``ru_maxrss`` over the block,
    a lower bound (0 when the block stayed under an earlier peak of the process)."""

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _maxrss_kb() -> int:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.rss0 = self._status_kb("VmRSS")
        self.method = "ru_maxrss rise (lower bound)"
        try:
            if self.rss0 is not None:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
                self.method = "VmHWM"
        except OSError:
            pass
        self.maxrss0 = self._maxrss_kb()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        hwm = self._status_kb("VmHWM") if self.method == "VmHWM" else None
        if hwm is None:
            self.method = "ru_maxrss rise (lower bound)"
            self.increase_kb = max(0, self._maxrss_kb() - self.maxrss0)
        else:
            self.increase_kb = max(0, hwm - self.rss0)
        return False

    def report(self) -> dict:
        mb = lambda kb: None if kb is None else round(kb / 1024, 1)
        return {"peak_rss_increase_mb": mb(self.increase_kb), "rss_before_mb": mb(self.rss0),
                "peak_rss_method": self.method, "seconds": round(self.seconds, 3)}


def _build_skeleton(directory: Path, target: torch.dtype) -> nn.Module:
    """The model of the checkpoint's config with every parameter on the ``meta`` device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _plain_config(AutoConfig.from_pretrained(directory))
    with init_empty_weights(include_buffers=False):  # no random init: every weight is loaded
        return AutoModelForCausalLM.from_config(config, dtype=target)


def _assign_state(model: nn.Module, manifest: dict, state: dict[str, torch.Tensor],
                  target: torch.dtype) -> None:
    """Assign ``state`` (cast to ``target``) to the model's meta parameters; tie or copy aliases."""
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    own = model.state_dict()
    for alias, source in manifest["tied"].items():
        if own[alias].data_ptr() != own[source].data_ptr():  # config does not tie: copy instead
            module_path, attr = alias.rsplit(".", 1)
            setattr(model.get_submodule(module_path), attr,
                    nn.Parameter(state[source].clone(), requires_grad=False))


def _finish(model: nn.Module, directory: Path):
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint left model tensors unset: {leftover[:3]}")
    model.config.use_cache = False
    model.eval()
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


@torch.no_grad()
def load_pruned(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None, progress: bool = False, *,
                sparse: bool = False, kernel: str = "auto", max_density: float = 1.0,
                measure: bool = True, half_dense: bool = False):
    """Rebuild the saved model -> (model, tokenizer or None). ``dtype`` None: the storage dtype
    (exactly the saved weights); otherwise the weights are cast to it. The model is in eval
    mode with ``use_cache`` off, as :func:`models.load_model` returns it.

    ``sparse``: build the pruned layers as CPU sparse layers straight from their stored form,
    never holding a pruned layer's dense weight: the model is built on the ``meta`` device
    (accelerate's ``init_empty_weights``: each parameter is created uninitialised and moved to
    ``meta`` at once, its memory never written), the dense tensors are loaded (as float32:
    ``dtype`` must be None or float32, ``device`` CPU), and each pruned layer becomes, one at a
    time, what :func:`sparse_inference.layer_from_kept` makes of its stored mask and kept values
    (``kernel``, ``max_density`` as in :func:`sparse_inference.sparsify_for_inference`): a
    :class:`~sparse_inference.BitmaskLinear` or :class:`~sparse_inference.Csr16Linear` of the
    stored fp16 values, or a CSR layer where they are not exactly fp16 (float32 / bfloat16
    storage); a layer denser than ``max_density``, or unpruned, becomes a dense ``nn.Linear``.
    Quantized layers (codes + scales) are dequantized at their kept positions only
    (:func:`codec.decode_kept`: the numbers of the dense load), which with fp16 storage gives fp16
    kept values. Then :func:`sparse_inference.keep_faster` applies
    the measured choice of ``sparsify_for_inference``: with ``measure``, each group of layers
    (same shape and density) takes the fastest of its formats and dense, timed in the model's
    one-token step (the alternatives of one group at a time are built to time them);
    ``half_dense`` stores the dense layers and ``lm_head`` in fp16. The outputs equal those of
    the dense load followed by ``sparsify_for_inference`` with the same arguments. GPT-2 style
    Conv1D and fused matrices are refused (ValueError), as in sparse inference.

    The returned model carries ``sparse_load_report``: ``peak_rss_increase_mb`` (the peak resident
    memory of the process during the load above its RSS when the load began, MB = 2**20 bytes;
    see ``peak_rss_method``), ``rss_before_mb``, ``seconds`` and ``formats`` (layer count per
    format). On Linux measuring resets the process's RSS high-water mark (``VmHWM``, and so
    ``ru_maxrss``) to its RSS at the start of the load.
    """
    directory = _resolve_dir(directory)
    if sparse:
        return _load_sparse(directory, device, dtype, progress, kernel=kernel, max_density=max_density,
                            measure=measure, half_dense=half_dense)
    manifest = read_manifest(directory)
    target = _resolve_load_dtype(dtype, manifest)
    state = _read_state(directory, manifest, progress)
    model = _build_skeleton(directory, target)
    _check_architecture(model, manifest, state)
    _assign_state(model, manifest, state, target)
    model, tokenizer = _finish(model, directory)
    return model.to(device), tokenizer


def _return_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc ``malloc_trim``; elsewhere nothing):
    glibc keeps freed blocks of up to tens of MB resident, so without it the scratch of decoding
    one layer after another adds up in the peak RSS of a load."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _load_sparse(directory: Path, device, dtype, progress: bool, **choice):
    from . import sparse_inference

    if torch.device(device).type != "cpu":
        raise ValueError(f"sparse=True builds CPU layers; device must be cpu, got {device!r}")
    if dtype is not None and _resolve_load_dtype(dtype, {"dtype": "float32"}) != torch.float32:
        raise ValueError(f"sparse=True computes in float32; dtype must be None or float32, got {dtype!r}")
    with _PeakRSS() as peak:
        manifest = read_manifest(directory)
        fused = [n for n, i in manifest["layers"].items() if "layout" in i]
        if fused:
            raise ValueError(f"sparse=True builds nn.Linear layers; {len(fused)} pruned matrices of this "
                             f"checkpoint are Conv1D or parts of fused parameters (e.g. {fused[0]}): "
                             f"load with sparse=False")
        store = resolve_dtype(manifest["dtype"], "cpu")
        pruned, dense = _read_files(directory, manifest)
        model = _build_skeleton(directory, torch.float32)
        shapes = {f"{n}.weight": torch.empty(i["shape"], device="meta")
                  for n, i in manifest["layers"].items()}
        _check_architecture(model, manifest, {**dense, **shapes})
        del shapes
        _assign_state(model, manifest, dense, torch.float32)
        del dense
        for name, info in tqdm(manifest["layers"].items(), desc="load layers", disable=not progress):
            mask, values = _read_layer(name, info, pruned, store, decode=decode_kept, pop=True)
            path, attr = name.rsplit(".", 1)
            parent = model.get_submodule(path)
            old = getattr(parent, attr)
            bias = getattr(old, "bias", None)
            setattr(parent, attr, sparse_inference.layer_from_kept(
                mask, values, bias, kernel=choice["kernel"], max_density=choice["max_density"]))
            del mask, values, old, bias
            _return_freed_memory()  # each layer's decode scratch, before the next layer's
        del pruned
        model, tokenizer = _finish(model, directory)
        sparse_inference.keep_faster(model, max_density=choice["max_density"], measure=choice["measure"],
                                     half_dense=choice["half_dense"], kernel=choice["kernel"])
    report = peak.report()
    counts = sparse_inference.inference_formats(model)["format"].value_counts()
    report["formats"] = {str(k): int(v) for k, v in counts.items()}
    model.sparse_load_report = report
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# transformers: from_pretrained(checkpoint) once this package is imported
# ---------------------------------------------------------------------------------------------

def _register_with_transformers(auto) -> None:
    """Register the quantization config and quantizer of quant_method ``sparsegpt_utils`` in
    ``transformers.quantizers.auto``. The quantizer loads ``dense.safetensors`` through
    transformers and writes the decoded pruned layers into the model after loading; the
    model it leaves is plain and dense (no quantization_config), as a GGUF load leaves it."""
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @auto.register_quantization_config(QUANT_METHOD)
    class SparseGPTCompactConfig(QuantizationConfigMixin):
        """``config.json``'s ``quantization_config`` of a compact checkpoint."""

        def __init__(self, format: str = FORMAT, format_version: int = FORMAT_VERSION,
                     manifest: str = MANIFEST, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format = format
            self.format_version = format_version
            self.manifest = manifest
            self.dequantize = True  # the loaded model is dense: transformers drops this config

    @auto.register_quantizer(QUANT_METHOD)
    class SparseGPTCompactQuantizer(HfQuantizer):
        requires_calibration = True  # only loads checkpoints; it does not quantize a model

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.layers: dict[str, torch.Tensor] = {}
            self.tied: dict[str, str] = {}

        def validate_environment(self, device_map=None, **kwargs):
            if isinstance(device_map, dict):
                places = {str(v) for v in device_map.values()}
                if "disk" in places or ("cpu" in places and len(places) > 1):
                    raise ValueError(
                        "a sparsegpt_utils checkpoint loads onto devices, not with offloading: use a "
                        "device_map without 'disk' (or 'cpu' beside an accelerator), or load_pruned")

        def update_attn_implementation(self, config):
            # the weights transformers itself reads: every tensor but the pruned layers
            config.transformers_weights = DENSE_FILE
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            directory = Path(checkpoint_files[0]).parent if checkpoint_files else None
            if directory is None or not (directory / MANIFEST).is_file():
                raise CheckpointError(
                    f"{model.config.name_or_path}: a sparsegpt_utils checkpoint loads from a local folder "
                    f"holding all its files (download a hub repository with "
                    f"huggingface_hub.snapshot_download first)")
            manifest = read_manifest(directory)
            if manifest["model_type"] != model.config.model_type:
                raise CheckpointError(f"checkpoint is for model_type {manifest['model_type']!r}, the "
                                      f"config says {model.config.model_type!r}")
            with torch.device("cpu"):  # (transformers builds the model under a meta default device)
                self.layers = _read_state(directory, manifest, progress=False, dense_too=False)
            own = dict(model.named_parameters(remove_duplicate=False))
            wrong = [k for k, v in self.layers.items() if k not in own or own[k].shape != v.shape]
            if wrong:
                raise CheckpointError(f"checkpoint does not fit this model: pruned layer weights {wrong[:3]}")
            self.tied = {a: s for a, s in manifest["tied"].items() if a in own}
            # filled after loading, not missing: no "newly initialized" warning for them
            ignore = [re.escape(k) + "$" for k in list(self.layers) + list(self.tied)]
            model._keys_to_ignore_on_load_missing = list(model._keys_to_ignore_on_load_missing or []) + ignore
            return model

        @torch.no_grad()
        def _process_model_after_weight_loading(self, model, **kwargs):
            params = dict(model.named_parameters(remove_duplicate=False))
            for key, weight in self.layers.items():
                params[key].copy_(weight.to(params[key].dtype))
            for alias, source in self.tied.items():
                if params[alias].data_ptr() != params[source].data_ptr():
                    params[alias].copy_(params[source])
            self.layers = {}
            _plain_config(model.config)
            return model

        def is_serializable(self, *args, **kwargs):
            return False  # never reached: the loaded model carries no quantizer

        @property
        def is_trainable(self) -> bool:
            return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the quantizer when transformers loads its quantizer table (importing that
    table here would cost every ``import sparsegpt_utils`` two seconds)."""

    name = "transformers.quantizers.auto"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        inner = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                _register_with_transformers(module)

        spec.loader = Loader()
        return spec


def _install_transformers_hook() -> None:
    if _RegisterOnImport.name in sys.modules:
        _register_with_transformers(sys.modules[_RegisterOnImport.name])
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


_install_transformers_hook()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def export_dense(model: nn.Module, directory: str | Path, tokenizer=None, readme: str | None = None) -> Path:
    """A plain ``save_pretrained`` folder (safetensors, the model's dtype) that any transformers
    user loads with ``AutoModelForCausalLM.from_pretrained``; written atomically like
    :func:`save_pruned`, with ``readme`` as its README.md when given. Returns the folder."""
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if readme is not None:
            (tmp / CARD_FILE).write_text(readme, encoding="utf-8")

    _write_folder(directory, ("config.json",), fill)
    return directory


EXPORT_FORMATS = ("dense", "compressed-tensors")


def _compressed_tensors_plan(manifest: dict) -> tuple[dict | None, str]:
    """(the one quantization scheme of every pruned layer, or None; why not)."""
    layers = manifest["layers"]
    if any("layout" in i for i in layers.values()):
        return None, "Conv1D or fused (q/k/v, gate/up) matrices: the format quantizes whole nn.Linear layers"
    if not all(i["values"] == "codes" for i in layers.values()):
        return None, "some pruned layers are not quantized (stored as float values)"
    widths = {tuple(i["wbits_range"]) for i in layers.values()}
    if len(widths) != 1 or len(next(iter(widths))) != 2 or len(set(next(iter(widths)))) != 1:
        return None, f"bit widths differ between or within layers ({sorted(widths)}): mixed precision"
    bits = next(iter(widths))[0]
    if bits not in (4, 8):
        return None, f"{bits}-bit weights: the pack-quantized format holds 4 or 8 bits"
    groups = {i["groupsize"] for i in layers.values()}
    if len(groups) != 1:
        return None, f"group sizes differ between layers ({sorted(groups, key=str)})"
    if {i["zero"] for i in layers.values()} != {"midpoint"}:
        # compressed-tensors packs asymmetric zero points in a shape transformers' loader
        # refuses (checked with compressed-tensors 0.20 / transformers 5.24)
        return None, ("asymmetric grids: pack-quantized zero points do not load back in transformers; "
                      "quantize with sym=True to export this format")
    return {"bits": bits, "groupsize": next(iter(groups)), "symmetric": True}, ""


def _export_compressed_tensors(directory: Path, manifest: dict, out: Path, dtype: torch.dtype,
                               plan: dict) -> str:
    """Pack-quantized folder: every pruned layer's integer codes and grid, as compressed-tensors
    writes them; the pruned weights are zero codes (the format keeps no sparsity)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    model, tokenizer = load_pruned(directory, dtype=dtype)
    pruned = _load_file(directory, PRUNED_FILE)
    strategy = "group" if plan["groupsize"] else "channel"
    args = QuantizationArgs(num_bits=plan["bits"], type="int", symmetric=plan["symmetric"],
                            strategy=strategy, group_size=plan["groupsize"])
    targets = sorted(manifest["layers"])
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=targets, weights=args)},
        format=CompressionFormat.pack_quantized.value, quantization_status=QuantizationStatus.COMPRESSED)
    apply_quantization_config(model, config)
    half = 2 ** (plan["bits"] - 1)
    with torch.no_grad():
        for name, info in manifest["layers"].items():
            t = {k: pruned[f"{name}::{k}"] for k in info["tensors"]}
            grid, _codes, _slots = layer_grid(info, t)
            module = model.get_submodule(name)
            module.weight_scale.data = grid.scale.to(dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                zp = (grid.zero - half).to(module.weight_zero_point.dtype)
                module.weight_zero_point.data = zp.reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format=CompressionFormat.pack_quantized.value)

    def fill(tmp: Path) -> None:
        compressor.compress_model(model)
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _write_folder(out, ("config.json",), fill)
    return ("compressed-tensors pack-quantized: " + f"{plan['bits']}-bit int, "
            + ("symmetric" if plan["symmetric"] else "asymmetric") + ", "
            + (f"groups of {plan['groupsize']}" if plan["groupsize"] else "per channel")
            + "; the format keeps no sparsity mask: pruned weights are stored as zero codes "
              "(densified, same weights)")


def export_checkpoint(checkpoint: str | Path, out: str | Path, format: str = "dense",
                      dtype: str | torch.dtype = "float16", allow_densify: bool = False) -> dict:
    """Write a compact checkpoint as a folder other tools load without this package.

    format ``dense``: a plain ``save_pretrained`` folder in ``dtype`` (pruned weights as zeros).
    ``compressed-tensors``: a pack-quantized folder (needs the ``compressed-tensors`` package)
    for a checkpoint whose pruned layers all share one grid kind (4 or 8 bits, per channel or
    per group, symmetric or not). A checkpoint the format cannot express (unquantized, mixed or
    other widths) is refused, or, with ``allow_densify``, exported dense instead and reported.
    Returns {"format", "dtype", "path", "note"}; the note also goes into the export's README.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    target = resolve_dtype(dtype, "cpu") if dtype != "auto" else None
    if target not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    directory = _resolve_dir(checkpoint)
    manifest = read_manifest(directory)
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise ValueError("the export folder must differ from the checkpoint folder")
    done = format
    if format == "compressed-tensors":
        plan, why = _compressed_tensors_plan(manifest)
        if plan is None and not allow_densify:
            raise ValueError(f"compressed-tensors cannot express this checkpoint: {why}. Export it with "
                             f"--format dense, or pass --allow-densify to write a dense folder instead")
        if plan is not None:
            try:
                import compressed_tensors  # noqa: F401
            except ImportError:
                raise ValueError("--format compressed-tensors needs the compressed-tensors package: "
                                 "pip install 'sparsegpt_utils[export]' (or pip install compressed-tensors)"
                                 ) from None
            note = _export_compressed_tensors(directory, manifest, out, target, plan)
            card = model_card(manifest, title=None, note="Exported: " + note + ". Loads with plain "
                              "transformers when the compressed-tensors package is installed.")
            _add_readme(out, card)
            return {"format": format, "dtype": dtype_name(target), "path": str(out), "note": note}
        done = "dense"
        note = (f"densified: compressed-tensors cannot express this checkpoint ({why}); wrote a dense "
                f"{dtype_name(target)} folder instead")
    else:
        note = f"dense {dtype_name(target)} save_pretrained folder; pruned weights are stored as zeros"
    model, tokenizer = load_pruned(directory, dtype=target)
    card = model_card(manifest, note="Exported: " + note + ". Loads with plain transformers, no "
                      "sparsegpt_utils needed.")
    export_dense(model, out, tokenizer, readme=card)
    return {"format": done, "dtype": dtype_name(target), "path": str(out), "note": note}


def _add_readme(folder: Path, text: str) -> None:
    from .results import atomic_write_text

    atomic_write_text(folder / CARD_FILE, text)


# ---------------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------------

def push_to_hub(checkpoint_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload a checkpoint folder (verified first) or an export of one to the Hugging Face hub
    as model repository ``repo_id`` (created if absent) with ``huggingface_hub``'s
    ``upload_folder``; its README.md is the model card. Returns the commit URL. Any hub failure
    (network, login, permission) is a ``RuntimeError`` of one line naming the repository and
    the hub."""
    from huggingface_hub import HfApi

    directory = _resolve_dir(checkpoint_dir)
    if (directory / MANIFEST).exists():
        read_manifest(directory)
    elif not (directory / "config.json").is_file():
        raise CheckpointError(f"{str(directory)!r} is neither a checkpoint nor an export (no config.json)")
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                                 commit_message=commit_message or f"Upload {FORMAT} checkpoint",
                                 revision=revision)
    except Exception as err:  # noqa: BLE001 - every hub failure becomes the one-line message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"could not push {str(directory)!r} to the Hugging Face hub as {repo_id!r}: "
                           f"{type(err).__name__}: {reason[:300]}") from None
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------
# command line: python -m sparsegpt_utils export CHECKPOINT OUT --format ... --dtype ...
# ---------------------------------------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand's arguments."""
    parser.add_argument("checkpoint", help="compact checkpoint folder (written by prune --save)")
    parser.add_argument("out", help="folder to write (replaced if it holds an earlier export)")
    parser.add_argument("--format", default="dense", choices=list(EXPORT_FORMATS),
                        help="dense: plain save_pretrained folder; compressed-tensors: pack-quantized "
                             "(uniform 4/8-bit checkpoints; needs the compressed-tensors package) "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES),
                        help="dtype of the exported weights / scales (default: %(default)s)")
    parser.add_argument("--allow-densify", action="store_true",
                        help="with --format compressed-tensors: write a dense folder (and say so) when "
                             "the format cannot express the checkpoint, instead of refusing")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="then upload the export to this Hugging Face hub model repository")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``export``; exit code 0, or 2 with a one-line message on bad input or a bad checkpoint."""
    try:
        report = export_checkpoint(args.checkpoint, args.out, args.format, args.dtype,
                                   allow_densify=getattr(args, "allow_densify", False))
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        print(f"error: export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {report['path']} ({report['format']}, {report['dtype']}): "
          f"{report['note']}")
    if getattr(args, "push_to_hub", None):
        try:
            url = push_to_hub(report["path"], args.push_to_hub)
        except (RuntimeError, ValueError, CheckpointError) as err:
            print(f"error: export --push-to-hub: {err}", file=sys.stderr)
            return 1
        print(f"pushed {report['path']} -> {url}")
    return 0
