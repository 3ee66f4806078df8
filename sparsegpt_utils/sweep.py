"""Parameter sweeps: one notebook, run by papermill once per grid point, and the results read back.

Every run has a folder of its own under ``out_dir`` (default ``<results>/runs``, see
:func:`paths.results_dir`)::

    <run-id>/params.yaml     the parameters injected into the notebook (RESULT_JSON included)
    <run-id>/notebook.ipynb  the executed notebook, outputs and all
    <run-id>/result.json     what the notebook wrote to RESULT_JSON: one result object
                             (DESIGN §4 keys) or a list of them
    <run-id>/papermill.log   the run's log (cell outputs included)

The hand-off: the sweep injects ``RESULT_JSON`` (an absolute path) into the notebook's
``parameters`` cell, and the notebook writes its result there. A notebook that takes part in
sweeps declares ``RESULT_JSON = None`` among its parameters (checked before anything runs).

A run executes in a temporary folder beside its own (:func:`results.atomic_dir`) that is swapped
into place only when it has written its result, so a run folder with ``result.json`` is always a
finished run: such runs are skipped (resume), and a finished run is never replaced. A failed run
goes to ``_failed/<run-id>/`` with ``error.txt`` and is tried again next time. The notebook sees
``SPARSEGPT_RUN_ID`` and ``SPARSEGPT_RUN_ATTEMPT`` (:func:`paths.sweep_run`): the rows it appends
with :func:`results.append_csv_row` carry them, so a re-run replaces its rows, never adds to them.

Stopping: each papermill child runs in a process group of its own and, on Linux, is killed by
the system when the sweep dies (even by SIGKILL); its Jupyter kernel then exits too (ipykernel
watches its parent). Ctrl-C (or SIGTERM to the CLI) stops at once: no new run starts, running
ones are killed with their kernels, their half-written folders are dropped, finished runs stay;
the CLI exits 130 with a one-line message. Running the same sweep again resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

# notebook 3's engine lives in evaluate.py; its names stay reachable here for older notebooks
from .evaluate import (
    available_sources,
    evaluate_checkpoints,
    find_checkpoints,
    load_checkpoint,
)
from .paths import project_pythonpath, project_root, pruned_dir, results_dir, sweep_run_env
from .results import (
    RUN_SETTING_KEYS,
    checkpoint_name,
    remove_stale_temps,
    swap_dir,
    temp_dir_beside,
    write_csv_atomic,
    write_json_atomic,
)

__all__ = [
    "RESULT_PARAM",
    "Run",
    "SweepInterrupted",
    "expand_grid",
    "load_grid_file",
    "parse_param_option",
    "run_id",
    "plan_sweep",
    "run_sweep",
    "default_runs_dir",
    "default_notebook",
    "collect_results",
    "load_results",
    "notebook_parameters",
    "results_dir",
    "pruned_dir",
    "write_json_atomic",
    "write_csv_atomic",
    "checkpoint_name",
    "add_family",
    "add_cli_arguments",
    "cli_main",
    "find_checkpoints",
    "available_sources",
    "load_checkpoint",
    "evaluate_checkpoints",
]

RESULT_PARAM = "RESULT_JSON"
CONFIG_KEYS = RUN_SETTING_KEYS  # the public definition is results.RUN_SETTING_KEYS


def default_runs_dir() -> Path:
    """Where run folders go by default: ``runs/`` in :func:`paths.results_dir`."""
    return results_dir() / "runs"


def default_notebook() -> Path:
    return project_root() / "notebooks" / "1_SparseGPT.ipynb"


# ---------------------------------------------------------------- grids

def expand_grid(grid: Mapping | Sequence[Mapping], base: Mapping | None = None) -> list[dict]:
    """Grid points as a list of parameter dicts.

    ``grid`` is a mapping ``name -> list of values`` (the cartesian product; a value that is
    not a list is fixed), or a list of such mappings (the union of their products, in order).
    ``base`` holds parameters common to every point (a grid value wins). A value that is
    itself a list (e.g. ``SPARSENESS_LIST``) is written as a list of lists. Duplicate points
    are dropped.
    """
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    if not grids:
        raise ValueError("grid is empty: give at least one parameter")
    points, seen = [], set()
    for g in grids:
        if not isinstance(g, Mapping):
            raise ValueError(f"a grid must be a mapping name -> values, got {type(g).__name__}")
        names = list(g)
        for name in [*names, *(base or {})]:
            if not str(name).isidentifier():
                raise ValueError(f"grid parameter {name!r} is not a valid Python name")
        values = [v if isinstance(v, list) else [v] for v in g.values()]
        for name, vs in zip(names, values, strict=True):
            if not vs:
                raise ValueError(f"grid parameter {name!r} has an empty list of values")
        for combo in itertools.product(*values):
            point = {**(base or {}), **dict(zip(names, combo, strict=True))}
            key = json.dumps(point, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                points.append(point)
    return points


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a,[b,c]`` -> ``['a', '[b,c]']``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _parse_value(text: str):
    import yaml

    text = text.strip()
    if text in ("None", "none", "null"):
        return None
    return yaml.safe_load(text)


def parse_param_option(option: str) -> tuple[str, list]:
    """``'METHOD=sparsegpt,wanda'`` -> ``('METHOD', ['sparsegpt', 'wanda'])``. Values are read
    as YAML (``0.5`` a float, ``[0.5]`` a list, ``None``/``null`` None)."""
    name, sep, values = option.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not values.strip():
        raise ValueError(f"--param must look like name=v1,v2,... , got {option!r}")
    return name, [_parse_value(v) for v in _split_top_level(values)]


def load_grid_file(path: str | Path) -> dict:
    """Read a sweep file (YAML or JSON). Either a bare grid (mapping or list of mappings), or a
    mapping with ``grid`` and optionally ``parameters`` (common to every point), ``notebook``,
    ``out_dir``, ``parallel``, ``cwd``, ``kernel``, ``timeout``. Returns the second form."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data, Mapping) and "grid" in data:
        allowed = {"grid", "parameters", "notebook", "out_dir", "parallel", "cwd", "kernel", "timeout"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"grid file {str(path)!r}: unknown keys {sorted(unknown)}; "
                             f"allowed {sorted(allowed)}")
        return dict(data)
    if isinstance(data, (Mapping, list)):
        return {"grid": data}
    raise ValueError(f"grid file {str(path)!r} must hold a mapping or a list, got {type(data).__name__}")


def _slug(value) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "", text.replace("/", "-"))


def run_id(notebook: str | Path, params: Mapping, shown: Sequence[str] | None = None) -> str:
    """A stable, readable folder name for one run: the notebook's stem, the ``shown``
    parameters (default all; sorted by name, shortened), and a hash of the notebook's name and ALL parameters
    (the hash alone identifies the run)."""
    stem = Path(notebook).stem
    key = json.dumps({"notebook": stem, "params": params}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    names = sorted(k for k in params if shown is None or k in shown)  # one name whatever the key order
    readable = "_".join(f"{k}={_slug(params[k])}" for k in names)[:100]
    return f"{stem}_{readable}_{digest}" if readable else f"{stem}_{digest}"


# ---------------------------------------------------------------- running

def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The names declared in the notebook's ``parameters`` cell (papermill's reading)."""
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {str(notebook)!r} does not exist")
    return dict(papermill.inspect_notebook(str(notebook)))


@dataclass
class Run:
    id: str
    params: dict
    folder: Path
    status: str = "pending"  # pending | skipped (finished before) | ok | failed
    seconds: float = 0.0
    error: str = ""
    gpu: str | None = None

    @property
    def finished(self) -> bool:
        return (self.folder / "result.json").is_file()


def plan_sweep(notebook: str | Path, grid, out_dir: str | Path | None = None,
               base: Mapping | None = None) -> list[Run]:
    """Check the grid against the notebook's parameters and name every run (folders in
    ``out_dir``, default :func:`default_runs_dir`), executing nothing. Raises ValueError naming
    any parameter the notebook does not declare."""
    declared = notebook_parameters(notebook)
    if not declared:
        raise ValueError(f"notebook {str(notebook)!r} has no cell tagged 'parameters'")
    if RESULT_PARAM not in declared:
        raise ValueError(f"notebook {str(notebook)!r} must declare {RESULT_PARAM} = None in its "
                         "parameters cell (where it writes its result object)")
    points = expand_grid(grid, base)
    for point in points:
        unknown = sorted(set(point) - set(declared))
        if unknown:
            raise ValueError(f"parameters {unknown} are not in the parameters cell of {notebook}; "
                             f"it declares {sorted(declared)}")
        if RESULT_PARAM in point:
            raise ValueError(f"{RESULT_PARAM} is set by the sweep, not by the grid")
    out_dir = Path(out_dir) if out_dir is not None else default_runs_dir()
    axes = [k for g in ([grid] if isinstance(grid, Mapping) else grid) for k in g]
    shown = list(dict.fromkeys(axes))  # the grid's own axes name the folders; base values don't
    runs = []
    for point in points:
        rid = run_id(notebook, point, shown)
        # a finished run is found by its hash, even if the readable part of its name changed
        done = [p for p in out_dir.glob(f"*_{rid.rsplit('_', 1)[-1]}") if (p / "result.json").is_file()]
        folder = done[0] if done else out_dir / rid
        runs.append(Run(folder.name, point, folder))
    return runs


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _error_summary(log: str, returncode: int | None) -> str:
    """The line of a papermill log that says what went wrong (the exception, if any)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:?", ln) \
                and not ln.startswith("papermill.exceptions.PapermillExecutionError"):
            return ln[:500]
    tail = lines[-1][:500] if lines else ""
    return f"exit status {returncode}: {tail}" if returncode else tail


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; ``table`` is :func:`run_sweep`'s table as it stood (statuses
    ``stopped`` and ``not started`` beside the finished ones)."""

    def __init__(self, message: str, table: pd.DataFrame):
        super().__init__(message)
        self.table = table


# Run first in each papermill child: on Linux the child asks to be SIGKILLed when the thread that
# started it dies (so a sweep killed even by SIGKILL leaves no notebook running), checks that the
# sweep did not die before the request, then becomes papermill.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (psutil where installed, else ``/proc``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a papermill child's process group and the group of each of its descendants:
    Jupyter starts a kernel in a session of its own (so that an interrupt reaches the kernel
    alone), so killing the child's group does not reach the kernel."""
    if not hasattr(os, "killpg"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        return
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGSTOP)  # no new process while the tree is read
    pids = [pid, *_descendants(pid)]
    groups = set()
    for p in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(p))
    groups.discard(os.getpgrp())
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def _run_child(cmd: list[str], log, env: dict, timeout: float | None, stop: threading.Event) -> int | str:
    """Run one papermill child to its end: its exit status, or ``"timeout"`` / ``"stopped"``
    after killing it with its kernel. Killed by the thread that waits on it, before reaping, so
    that a reused pid is never hit."""
    proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            why = "stopped" if stop.is_set() else \
                "timeout" if deadline is not None and time.monotonic() > deadline else None
            if why:
                _kill_tree(proc.pid)
                proc.wait()
                return why


def _execute(run: Run, notebook: Path, cwd: Path, kernel: str | None, env: dict,
             timeout: float | None, stop: threading.Event) -> Run:
    if stop.is_set():
        run.status = "not started"
        return run
    import yaml

    out_dir = run.folder.parent
    work = temp_dir_beside(run.folder)
    try:
        params = {**run.params, RESULT_PARAM: str((work / "result.json").resolve())}
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True), encoding="utf-8")
        cmd = ["-m", "papermill", str(notebook.resolve()), str(work / "notebook.ipynb"),
               "-f", str(work / "params.yaml"), "--cwd", str(cwd), "--no-progress-bar", "--log-output"]
        if kernel:
            cmd += ["-k", kernel]
        env = {**env, **sweep_run_env(run.id, uuid.uuid4().hex[:12])}
        start = time.perf_counter()
        with open(work / "papermill.log", "w", encoding="utf-8") as log:
            returncode = _run_child(cmd, log, env, timeout, stop)
        run.seconds = time.perf_counter() - start
        if returncode == "stopped":  # its half-written folder goes; the next sweep redoes it
            run.status = "stopped"
            return run
        error = ""
        if returncode == "timeout":
            error = f"timed out after {timeout:g} s"
        elif returncode != 0:
            error = _error_summary((work / "papermill.log").read_text(encoding="utf-8", errors="replace"),
                                   returncode)
        else:
            try:
                result = json.loads((work / "result.json").read_text(encoding="utf-8"))
                if not isinstance(result, (dict, list)):
                    error = f"{RESULT_PARAM} holds a {type(result).__name__}, not a result object"
            except FileNotFoundError:
                error = f"the notebook finished but wrote nothing to {RESULT_PARAM}"
            except json.JSONDecodeError as err:
                error = f"{RESULT_PARAM} is not valid JSON: {err}"
        failed_dir = out_dir / "_failed" / run.id
        if error:
            (work / "error.txt").write_text(error + "\n", encoding="utf-8")
            failed_dir.parent.mkdir(parents=True, exist_ok=True)
            swap_dir(work, failed_dir, overwrite=True)
            run.status, run.error = "failed", error
        else:
            finished = (run.folder / "result.json").is_file()
            with contextlib.suppress(FileExistsError):  # another sweep finished it first: keep that
                swap_dir(work, run.folder, overwrite=not finished)  # a folder without result: redone
            shutil.rmtree(failed_dir, ignore_errors=True)
            run.status = "ok"
        return run
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """While a sweep runs, Ctrl-C and SIGTERM only record themselves in the yielded list; the main
    thread reads it between short waits. A KeyboardInterrupt raised inside the locks of
    ``concurrent.futures`` could leave one held and the sweep hung, and a signal the kernel hands
    to a worker thread never wakes a main thread blocked on a lock. (Handlers can be set only from
    the main thread; a sweep run from another thread is not stopped by signals.)"""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.signal(s, lambda signum, frame: requests.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(s, handler)


def run_sweep(
    notebook: str | Path,
    grid: Mapping | Sequence[Mapping],
    out_dir: str | Path | None = None,
    parallel: int | None = None,
    base: Mapping | None = None,
    cwd: str | Path | None = None,
    kernel: str | None = None,
    timeout: float | None = None,
    gpus: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run ``notebook`` once per point of ``grid`` (see :func:`expand_grid`) with papermill.

    Finished runs (a ``result.json`` in their folder) are skipped. ``out_dir``: where run
    folders go (default :func:`default_runs_dir`). ``parallel`` runs at a time
    (default: one per GPU, else 1); with GPUs each run sees one (``CUDA_VISIBLE_DEVICES``).
    ``cwd``: the notebook's working directory (default: its own folder, as in Jupyter).
    ``timeout``: seconds per run. ``env``: extra environment variables for the runs.
    Returns one row per run: ``run_id``, ``status`` (skipped / ok / failed), ``seconds``,
    ``error``, ``gpu``, ``folder`` and the run's parameters; failures are also printed.
    Ctrl-C (or SIGTERM; from the main thread, whichever thread the signal lands on) stops every
    running notebook within about a second and starts no other, then raises
    :class:`SweepInterrupted`; finished runs stay.
    """
    notebook = Path(notebook)
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    out_dir = Path(out_dir) if out_dir is not None else default_runs_dir()
    runs = plan_sweep(notebook, grid, out_dir, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.partial"):  # run folders of older versions of this module
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temps(out_dir)  # half-written run folders of sweeps that were killed
    remove_stale_temps(out_dir / "_failed")
    cwd = Path(cwd) if cwd is not None else notebook.resolve().parent
    gpus = _gpu_ids() if gpus is None else [str(g) for g in gpus]
    parallel = parallel or max(1, len(gpus))

    todo = []
    for run in runs:
        if run.finished:
            run.status = "skipped"
        else:
            todo.append(run)
    slots: queue.Queue[int] = queue.Queue()
    for k in range(parallel):
        slots.put(k)
    stop = threading.Event()

    def work(run: Run) -> Run:
        slot = slots.get()
        try:
            run_env = {**os.environ, **(env or {})}
            run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
            run_env["PYTHONPATH"] = project_pythonpath()
            if gpus:
                run.gpu = gpus[slot % len(gpus)]
                run_env["CUDA_VISIBLE_DEVICES"] = run.gpu
            return _execute(run, notebook, cwd, kernel, run_env, timeout, stop)
        except Exception as err:  # a broken run must not stop the others
            run.status, run.error = "failed", f"{type(err).__name__}: {err}"
            return run
        finally:
            slots.put(slot)

    if len(runs) > len(todo):
        print(f"sweep: {len(runs) - len(todo)} of {len(runs)} runs already finished, skipped")
    bar = tqdm(total=len(todo), desc=f"sweep {notebook.stem}", disable=not progress or not todo)
    # the worker threads start the papermill children and live until every child is reaped:
    # a child's death signal is tied to the thread that started it
    pool = ThreadPoolExecutor(max_workers=parallel)
    with _stop_requests() as requests:
        try:
            pending = {pool.submit(work, run) for run in todo}
            while pending and not requests:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()
                    bar.update()
                if done:
                    bar.set_postfix(failed=sum(r.status == "failed" for r in todo))
        finally:
            if requests:  # no new run starts; running notebooks are killed with their kernels
                stop.set()
            pool.shutdown(wait=True, cancel_futures=bool(requests))
            bar.close()
    interrupted = bool(requests)
    failures = sum(r.status == "failed" for r in todo)
    for run in todo:
        if run.status == "pending":
            run.status = "not started"

    table = pd.DataFrame([{"run_id": r.id, "status": r.status, "seconds": round(r.seconds, 1),
                           "error": r.error, "gpu": r.gpu, "folder": str(r.folder), **r.params}
                          for r in runs])
    ok = sum(r.status == "ok" for r in runs)
    if interrupted:
        count = {s: sum(r.status == s for r in runs) for s in ("stopped", "not started")}
        raise SweepInterrupted(
            f"sweep: interrupted: {ok + len(runs) - len(todo)} finished runs kept, {failures} failed, "
            f"{count['stopped']} stopped, {count['not started']} not started; run the same sweep "
            "again to resume", table)
    print(f"sweep: {ok} ran, {len(runs) - len(todo)} skipped, {failures} failed (of {len(runs)})")
    for r in runs:
        if r.status == "failed":
            print(f"  FAILED {r.id}: {r.error}\n    log: {out_dir / '_failed' / r.id / 'papermill.log'}")
    return table


# ---------------------------------------------------------------- collecting

def _result_rows(obj, source: Path) -> list[dict]:
    items = obj if isinstance(obj, list) else [obj]
    return [{**item, "source": str(source)} for item in items if isinstance(item, dict)]


def _frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows, sep=".")  # nested dicts (versions) -> versions.torch, ...


def collect_results(dir: str | Path | None = None) -> pd.DataFrame:
    """One row per result object of every finished run under ``dir`` (default
    :func:`default_runs_dir`; ``<run-id>/result.json``), with ``run_id`` and ``source`` columns;
    nested objects are flattened (``versions.torch``). An empty DataFrame when there are none."""
    dir = Path(dir) if dir is not None else default_runs_dir()
    rows = []
    for path in sorted(dir.glob("*/result.json")):
        obj = json.loads(path.read_text(encoding="utf-8"))
        rows += [{"run_id": path.parent.name, **row} for row in _result_rows(obj, path)]
    return _frame(rows)


def add_family(df: pd.DataFrame) -> pd.DataFrame:
    """A ``family`` column for figures: the row's own ``family`` where given, else
    ``iterative`` for iterative runs, ``<method>+finetune`` for fine-tuned ones, else ``method``."""
    df = df.copy()
    if df.empty:
        df["family"] = pd.Series(dtype=str)
        return df
    method = df["method"].astype(str) if "method" in df else pd.Series("unknown", index=df.index)
    family = method.where(~method.str.contains("iterative"), "iterative")
    for col in ("finetune", "finetuned", "finetune_steps"):
        if col in df:
            tuned = df[col].fillna(0).astype(bool) & (family != "iterative")
            family = family.where(~tuned, method + "+finetune")
    if "family" in df:
        family = df["family"].where(df["family"].notna() & (df["family"].astype(str) != ""), family)
    df["family"] = family
    return df


def load_results(dir: str | Path | None = None) -> pd.DataFrame:
    """Every result row under the results folder (default :func:`results_dir`): the rows of its
    top-level ``*.csv`` files and ``*.json`` result objects, and the finished runs of
    ``runs/``. Only files with ``method`` and ``ppl`` count; rows asking the same thing (equal in
    every column of :data:`results.RUN_SETTING_KEYS`) are kept once, the run's result winning
    over a CSV row; rows that differ in any setting all stay. Adds ``sparsity`` (1 − density)
    and ``family`` (:func:`add_family`)."""
    dir = results_dir(dir)
    frames = []
    for path in sorted(dir.glob("*.csv")):
        df = pd.read_csv(path)
        if {"method", "ppl"} <= set(df.columns):
            frames.append(df.assign(source=str(path)))
    rows = []
    for path in sorted(dir.glob("*.json")):
        try:
            rows += _result_rows(json.loads(path.read_text(encoding="utf-8")), path)
        except json.JSONDecodeError:
            continue
    frames.append(_frame([r for r in rows if "method" in r and "ppl" in r]))
    frames.append(collect_results(dir / "runs"))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return add_family(pd.DataFrame(columns=["model", "method", "density", "ppl"]))
    df = pd.concat(frames, ignore_index=True)
    df = add_family(df)
    if "density" in df:
        df["density"] = pd.to_numeric(df["density"], errors="coerce")
        if "density_target" in df:
            # an iterative history's `density` is the achieved one (0.29999...); results are
            # placed by the density asked for, as every other result row is
            target = pd.to_numeric(df["density_target"], errors="coerce")
            df["density"] = target.where(target.notna(), df["density"])
        df["sparsity"] = 1 - df["density"]
    keys = [k for k in RUN_SETTING_KEYS if k in df]
    return df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


# ---------------------------------------------------------------- command line

def add_cli_arguments(parser) -> None:
    """The ``sweep`` subcommand's arguments (an argparse parser)."""
    parser.add_argument("--notebook", default=None,
                        help="notebook to run (default: the grid file's, else the project's "
                             "notebooks/1_SparseGPT.ipynb)")
    parser.add_argument("--grid", metavar="FILE", default=None,
                        help="YAML/JSON grid file (a grid, or {notebook, parameters, grid, ...})")
    parser.add_argument("--param", metavar="NAME=V1,V2", action="append", default=[],
                        help="a grid axis (repeatable); values read as YAML; joins the file's grid")
    parser.add_argument("--out-dir", default=None,
                        help="where run folders go (default: runs/ in $SPARSEGPT_RESULTS_DIR, else "
                             "<project>/results/runs)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at a time (default: one per GPU, else 1)")
    parser.add_argument("--cwd", default=None, help="notebook working directory (default: its folder)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cli_main(args) -> int:
    """Run the sweep the parsed ``args`` describe; exit status 1 if any run failed, 130 when
    interrupted (Ctrl-C or SIGTERM: running notebooks killed, finished runs kept)."""
    spec = load_grid_file(args.grid) if args.grid else {}
    axes = dict(parse_param_option(p) for p in args.param)
    grid = spec.get("grid")
    if grid is None and not axes:
        raise SystemExit("sweep: give a grid with --grid FILE and/or --param NAME=V1,V2")
    if axes:  # command-line axes join (and override) every sub-grid of the file
        grid = [{**g, **axes} for g in ([grid] if isinstance(grid, Mapping) else grid)] if grid else axes
    notebook = args.notebook or spec.get("notebook") or default_notebook()
    out_dir = args.out_dir or spec.get("out_dir") or default_runs_dir()
    if args.dry_run:
        runs = plan_sweep(notebook, grid, out_dir, spec.get("parameters"))
        for run in runs:
            print(f"{'done' if run.finished else 'todo'}  {run.id}")
        print(f"{sum(not r.finished for r in runs)} of {len(runs)} runs to do")
        return 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        table = run_sweep(notebook, grid, out_dir=out_dir, parallel=args.parallel or spec.get("parallel"),
                          base=spec.get("parameters"), cwd=args.cwd or spec.get("cwd"),
                          kernel=args.kernel or spec.get("kernel"),
                          timeout=args.timeout or spec.get("timeout"))
    except SweepInterrupted as err:
        print(err, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sweep: interrupted before any run started", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return int((table["status"] == "failed").any())


def __getattr__(name: str):
    # the notebook test harness lives in notebook.py; commands that name it here still work
    if name == "refresh_notebooks":
        from .notebook import refresh_notebooks

        return refresh_notebooks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
