"""Result records: atomic JSON files and CSV tables that a re-run never corrupts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

__all__ = ["write_json_atomic", "append_csv_row", "atomic_write_text"]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename,
    so readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: dict | list) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_csv_row(path: str | Path, row: dict) -> pd.DataFrame:
    """Append one result row to a CSV table (columns are the union of all rows)."""
    path = Path(path)
    flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
    table = pd.DataFrame([flat])
    if path.exists() and path.stat().st_size > 0:
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    atomic_write_text(path, table.to_csv(index=False))
    return table
