"""Result records: atomic files, folders and CSV tables that a re-run never corrupts.

Files: :func:`write_atomic` (and :func:`atomic_write_text`, :func:`write_json_atomic`,
:func:`write_csv_atomic`) write a temporary file beside the target and rename it over the target.
Folders: :func:`atomic_dir` / :func:`replace_dir_atomic` fill a temporary folder beside the target
and swap it in; an existing non-empty target is a finished result and is kept unless
``overwrite=True``. Readers see the old file or folder or the new one, never half of one.

:data:`RUN_SETTING_KEYS` names the columns that say what a run was asked to do: result rows
that differ in any of them are different measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from .paths import sweep_run

__all__ = ["write_json_atomic", "write_csv_atomic", "append_csv_row", "atomic_write_text",
           "write_atomic", "atomic_dir", "replace_dir_atomic", "temp_dir_beside", "swap_dir",
           "remove_stale_temps", "RUN_SETTING_KEYS", "checkpoint_name", "model_slug"]

# every column that says what a run was asked to do (model, method, pruning, quantization,
# calibration, evaluation, fine-tuning): result rows that differ in any of them are different
# measurements, never one run recorded twice
RUN_SETTING_KEYS = (
    "model", "method", "family", "density", "nm",
    "wbits", "groupsize", "sym", "mse", "target_avg_bits", "bit_method", "mixed_unit", "error_model",
    "allocation", "importance",
    "act_order", "true_sequential", "percdamp", "blocksize", "mask_blocksize",
    "owl", "owl_lambda", "owl_m", "owl_samples", "exact_update",
    "reconstruct", "reconstruct_steps", "reconstruct_lr", "reconstruct_targets", "reconstruct_parts",
    "calib", "calib_samples", "seqlen", "seed",
    "eval", "eval_windows", "eval_seqlen",
    "finetune_steps", "train_tokens", "dtype",
)


_UMASK = os.umask(0)
os.umask(_UMASK)
# temporaries are ".<target name>.tmp-<pid>-<random>" (backups of a replaced folder ".old-"):
# the pid tells whether the writer is still alive (see remove_stale_temps)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _temp_prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))
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


# ---------------------------------------------------------------- folders

def temp_dir_beside(target: str | Path) -> Path:
    """A new empty folder ``.<name>.tmp-<pid>-<random>`` beside ``target``: on the same file
    system, so that it can be renamed into place. Its mode follows the umask."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target)))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _holds_result(target: Path) -> bool:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{str(target)!r} exists and is not a folder")
    return target.is_dir() and any(target.iterdir())


def swap_dir(tmp: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    """Put the filled folder ``tmp`` (from :func:`temp_dir_beside`) in place of ``target``.

    A non-empty ``target`` is a finished result: FileExistsError (``tmp`` left for the caller)
    unless ``overwrite``; an empty one is a placeholder and is replaced. Replacing is one step on
    Linux; elsewhere the old folder is first moved aside to ``.<name>.old-<pid>-*``, which
    :func:`remove_stale_temps` puts back if the swap was killed half-way."""
    tmp, target = Path(tmp), Path(target)
    if _holds_result(target) and not overwrite:
        raise FileExistsError(f"{str(target)!r} already holds a result; pass overwrite=True to replace it")
    if not target.exists():
        os.replace(tmp, target)
        return target
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return target
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target, "old")))
    os.replace(target, old)  # (onto an empty folder: allowed)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_dir(target) as tmp:`` fill ``tmp``; on leaving the block it becomes
    ``target`` (:func:`swap_dir`). On an exception (or Ctrl-C) the temporary folder is removed
    and ``target`` is untouched. A finished ``target`` (non-empty) is refused before the block
    runs unless ``overwrite``: a re-run never destroys a finished result by accident."""
    target = Path(target)
    if _holds_result(target) and not overwrite:
        raise FileExistsError(f"{str(target)!r} already holds a result; pass overwrite=True to replace it")
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        swap_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir_atomic(target: str | Path, fill: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Call ``fill(tmp)`` on a temporary folder beside ``target``, then swap it in
    (:func:`atomic_dir`). Returns ``target``."""
    with atomic_dir(target, overwrite) as tmp:
        fill(tmp)
    return Path(target)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Clean ``folder`` of the temporaries of writers that died (killed mid-write): their
    ``.<name>.tmp-<pid>-*`` files and folders are removed; a ``.<name>.old-<pid>-*`` backup is
    put back as ``<name>`` when a swap was killed before the new folder arrived, else removed.
    Temporaries of live processes are left alone. Returns the paths removed or restored."""
    folder = Path(folder)
    done = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP_NAME.match(path.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        target = folder / m.group("name")
        if m.group("kind") == "old" and not target.exists():
            os.replace(path, target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(path)
    return done


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


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (POSIX ``flock``; none elsewhere), so that runs in
    parallel appending to one table do not lose each other's rows."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def append_csv_row(path: str | Path, row: dict) -> pd.DataFrame:
    """Append one result row to a CSV table (columns are the union of all rows); returns the
    table. Nested values (dicts, lists) are written as JSON.

    Rows are keyed by ``run_id``. In a sweep run (:func:`paths.sweep_run`) a row without one gets
    the run's ``run_id`` and ``run_attempt``, and appending drops the rows of that ``run_id``
    written by an earlier attempt: a resumed run replaces what an interrupted one wrote, never
    duplicates it. A row with a ``run_id`` of its own and no attempt replaces the earlier row of
    that ``run_id``. Rows without ``run_id`` are appended as they are."""
    path = Path(path)
    row = dict(row)
    run = sweep_run()
    if run is not None and row.get("run_id") is None:
        row["run_id"] = run[0]
        if run[1]:
            row["run_attempt"] = run[1]
    flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        table = pd.DataFrame([flat])
        if path.exists() and path.stat().st_size > 0:
            old = pd.read_csv(path, dtype={"run_id": str, "run_attempt": str})
            if row.get("run_id") is not None and "run_id" in old:
                same = old["run_id"].astype(str) == str(row["run_id"])
                if row.get("run_attempt") is not None and "run_attempt" in old:
                    same &= old["run_attempt"].astype(str) != str(row["run_attempt"])
                old = old[~same]
            table = pd.concat([old, table], ignore_index=True)
        write_csv_atomic(path, table)
    return table
