"""Result records: atomic JSON files and CSV tables that a re-run never corrupts."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

__all__ = ["write_json_atomic", "write_csv_atomic", "append_csv_row", "atomic_write_text",
           "write_atomic", "checkpoint_name", "model_slug"]


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def write_json_atomic(path: str | Path, obj: dict | list) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv_atomic(path: str | Path, df: pd.DataFrame) -> Path:
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def model_slug(model: str) -> str:
    """A model name fit for a folder name: a hub id's ``/`` becomes ``-``, a local folder
    gives its own name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", Path(model).name if Path(model).is_dir() else model)


def checkpoint_name(model: str, method: str, density: float | None = None, nm: str | None = None,
                    wbits: int | None = None, target_avg_bits: float | None = None) -> str:
    """Folder name of a pruned model under ``pruned_models/``, e.g.
    ``smollm2-135m_sparsegpt_d0.5`` (d = density, the fraction KEPT), ``..._nm2-4_w4``; a hub
    id's ``/`` becomes ``-``, a local folder gives its name."""
    name = f"{model_slug(model)}_{method}_" + (f"nm{nm.replace(':', '-')}" if nm else f"d{density:g}")
    if target_avg_bits is not None:
        name += f"_avg{target_avg_bits:g}"
    elif wbits is not None:
        name += f"_w{wbits}"
    return name


def append_csv_row(path: str | Path, row: dict) -> pd.DataFrame:
    """Append one result row to a CSV table (columns are the union of all rows)."""
    path = Path(path)
    flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
    table = pd.DataFrame([flat])
    if path.exists() and path.stat().st_size > 0:
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    write_csv_atomic(path, table)
    return table
