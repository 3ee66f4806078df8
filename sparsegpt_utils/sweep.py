"""Parameter sweeps: one notebook, run by papermill once per grid point, and the results read back.

Every run has a folder of its own under ``out_dir`` (default ``results/runs``)::

    <run-id>/params.yaml     the parameters injected into the notebook (RESULT_JSON included)
    <run-id>/notebook.ipynb  the executed notebook, outputs and all
    <run-id>/result.json     what the notebook wrote to RESULT_JSON: one result object
                             (DESIGN §4 keys) or a list of them
    <run-id>/papermill.log   the run's log (cell outputs included)

The hand-off: the sweep injects ``RESULT_JSON`` (an absolute path) into the notebook's
``parameters`` cell, and the notebook writes its result there. A notebook that takes part in
sweeps declares ``RESULT_JSON = None`` among its parameters (checked before anything runs).

A run executes in ``.<run-id>.partial/`` and is renamed into place only when it has written its
result, so a run folder with ``result.json`` is always a finished run: such runs are skipped
(resume). A failed run goes to ``_failed/<run-id>/`` with ``error.txt`` and is tried again next
time; it never touches finished runs.
"""

from __future__ import annotations

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
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .paths import notebook_env, project_pythonpath, pruned_dir, results_dir
from .results import checkpoint_name, model_slug, write_atomic, write_csv_atomic, write_json_atomic

__all__ = [
    "RESULT_PARAM",
    "Run",
    "expand_grid",
    "load_grid_file",
    "parse_param_option",
    "run_id",
    "plan_sweep",
    "run_sweep",
    "collect_results",
    "load_results",
    "notebook_parameters",
    "results_dir",
    "pruned_dir",
    "write_json_atomic",
    "write_csv_atomic",
    "add_cli_arguments",
    "cli_main",
]

RESULT_PARAM = "RESULT_JSON"
# the columns that say what a result row was asked to do: rows agreeing on all of them are one run
CONFIG_KEYS = ("model", "method", "family", "density", "nm", "wbits", "groupsize", "calib",
               "calib_samples", "seqlen", "seed", "eval", "eval_windows", "eval_seqlen")


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
    parameters (default all; shortened), and a hash of the notebook's name and ALL parameters
    (the hash alone identifies the run)."""
    stem = Path(notebook).stem
    key = json.dumps({"notebook": stem, "params": params}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    names = sorted(params) if shown is None else [k for k in shown if k in params]
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


def plan_sweep(notebook: str | Path, grid, out_dir: str | Path = "results/runs",
               base: Mapping | None = None) -> list[Run]:
    """Check the grid against the notebook's parameters and name every run, executing
    nothing. Raises ValueError naming any parameter the notebook does not declare."""
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
    out_dir = Path(out_dir)
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


def _execute(run: Run, notebook: Path, cwd: Path, kernel: str | None, env: dict,
             timeout: float | None) -> Run:
    out_dir = run.folder.parent
    work = out_dir / f".{run.id}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import yaml

    params = {**run.params, RESULT_PARAM: str((work / "result.json").resolve())}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True), encoding="utf-8")
    cmd = [sys.executable, "-m", "papermill", str(notebook.resolve()), str(work / "notebook.ipynb"),
           "-f", str(work / "params.yaml"), "--cwd", str(cwd), "--no-progress-bar", "--log-output"]
    if kernel:
        cmd += ["-k", kernel]
    start = time.perf_counter()
    with open(work / "papermill.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own group: a timeout kills the kernel too
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    run.seconds = time.perf_counter() - start
    error = ""
    if returncode is None:
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
        shutil.rmtree(failed_dir, ignore_errors=True)
        failed_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, failed_dir)
        run.status, run.error = "failed", error
    else:
        if run.folder.exists():  # a stale folder without a result (never a finished run)
            shutil.rmtree(run.folder)
        os.replace(work, run.folder)
        shutil.rmtree(failed_dir, ignore_errors=True)
        run.status = "ok"
    return run


def run_sweep(
    notebook: str | Path,
    grid: Mapping | Sequence[Mapping],
    out_dir: str | Path = "results/runs",
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

    Finished runs (a ``result.json`` in their folder) are skipped. ``parallel`` runs at a time
    (default: one per GPU, else 1); with GPUs each run sees one (``CUDA_VISIBLE_DEVICES``).
    ``cwd``: the notebook's working directory (default: its own folder, as in Jupyter).
    ``timeout``: seconds per run. ``env``: extra environment variables for the runs.
    Returns one row per run: ``run_id``, ``status`` (skipped / ok / failed), ``seconds``,
    ``error``, ``gpu``, ``folder`` and the run's parameters; failures are also printed.
    """
    notebook = Path(notebook)
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    runs = plan_sweep(notebook, grid, out_dir, base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.partial"):  # left behind by an interrupted sweep
        shutil.rmtree(stale, ignore_errors=True)
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

    def work(run: Run) -> Run:
        slot = slots.get()
        try:
            run_env = {**os.environ, **(env or {})}
            run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
            run_env["PYTHONPATH"] = project_pythonpath()
            if gpus:
                run.gpu = gpus[slot % len(gpus)]
                run_env["CUDA_VISIBLE_DEVICES"] = run.gpu
            return _execute(run, notebook, cwd, kernel, run_env, timeout)
        except Exception as err:  # a broken run must not stop the others
            run.status, run.error = "failed", f"{type(err).__name__}: {err}"
            return run
        finally:
            slots.put(slot)

    if len(runs) > len(todo):
        print(f"sweep: {len(runs) - len(todo)} of {len(runs)} runs already finished, skipped")
    bar = tqdm(total=len(todo), desc=f"sweep {notebook.stem}", disable=not progress or not todo)
    failures = 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for fut in as_completed([pool.submit(work, run) for run in todo]):
            failures += fut.result().status == "failed"
            bar.set_postfix(failed=failures)
            bar.update()
    bar.close()

    table = pd.DataFrame([{"run_id": r.id, "status": r.status, "seconds": round(r.seconds, 1),
                           "error": r.error, "gpu": r.gpu, "folder": str(r.folder), **r.params}
                          for r in runs])
    ok = sum(r.status == "ok" for r in runs)
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


def collect_results(dir: str | Path = "results/runs") -> pd.DataFrame:
    """One row per result object of every finished run under ``dir`` (``<run-id>/result.json``),
    with ``run_id`` and ``source`` columns; nested objects are flattened (``versions.torch``).
    An empty DataFrame when there are none."""
    dir = Path(dir)
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
    ``runs/``. Only files with ``method`` and ``ppl`` count; rows asking the same thing (same
    model, method, density, N:M, bits, calibration, evaluation) are kept once, the run's result
    winning over a CSV row. Adds ``sparsity`` (1 − density) and ``family`` (:func:`add_family`)."""
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
    keys = [k for k in CONFIG_KEYS if k in df]
    return df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


# ---------------------------------------------------------------- command line

def add_cli_arguments(parser) -> None:
    """The ``sweep`` subcommand's arguments (an argparse parser)."""
    parser.add_argument("--notebook", default=None,
                        help="notebook to run (default: the grid file's, else notebooks/1_SparseGPT.ipynb)")
    parser.add_argument("--grid", metavar="FILE", default=None,
                        help="YAML/JSON grid file (a grid, or {notebook, parameters, grid, ...})")
    parser.add_argument("--param", metavar="NAME=V1,V2", action="append", default=[],
                        help="a grid axis (repeatable); values read as YAML; joins the file's grid")
    parser.add_argument("--out-dir", default=None, help="where run folders go (default results/runs)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at a time (default: one per GPU, else 1)")
    parser.add_argument("--cwd", default=None, help="notebook working directory (default: its folder)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")


def cli_main(args) -> int:
    """Run the sweep the parsed ``args`` describe; exit status 1 if any run failed."""
    spec = load_grid_file(args.grid) if args.grid else {}
    axes = dict(parse_param_option(p) for p in args.param)
    grid = spec.get("grid")
    if grid is None and not axes:
        raise SystemExit("sweep: give a grid with --grid FILE and/or --param NAME=V1,V2")
    if axes:  # command-line axes join (and override) every sub-grid of the file
        grid = [{**g, **axes} for g in ([grid] if isinstance(grid, Mapping) else grid)] if grid else axes
    notebook = args.notebook or spec.get("notebook") or "notebooks/1_SparseGPT.ipynb"
    out_dir = args.out_dir or spec.get("out_dir") or "results/runs"
    if args.dry_run:
        runs = plan_sweep(notebook, grid, out_dir, spec.get("parameters"))
        for run in runs:
            print(f"{'done' if run.finished else 'todo'}  {run.id}")
        print(f"{sum(not r.finished for r in runs)} of {len(runs)} runs to do")
        return 0
    table = run_sweep(notebook, grid, out_dir=out_dir, parallel=args.parallel or spec.get("parallel"),
                      base=spec.get("parameters"), cwd=args.cwd or spec.get("cwd"),
                      kernel=args.kernel or spec.get("kernel"), timeout=args.timeout or spec.get("timeout"))
    return int((table["status"] == "failed").any())


# ---------------------------------------------------------------- testing saved checkpoints

def find_checkpoints(root: str | Path, model: str, method: str,
                     densities: Sequence[float]) -> dict[float, Path | None]:
    """For each density, the saved folder ``<root>/<model>_<method>_d<density>`` (the density
    matched as a number, so ``d0.5`` and ``d0.50`` both count), or None when there is none."""
    root = Path(root)
    names = {model, model_slug(model), model.replace("/", "_"), model.split("/")[-1]}
    found: dict[float, Path] = {}
    for path in sorted(root.glob("*_d*")) if root.is_dir() else []:
        m = re.fullmatch(r"(.+)_([^_]+)_d([0-9.]+)", path.name)
        if path.is_dir() and m and m.group(1) in names and m.group(2) == method:
            try:
                found[float(m.group(3))] = path
            except ValueError:
                continue
    return {d: next((p for k, p in found.items() if abs(k - d) < 1e-9), None) for d in densities}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (a quick check before trying hub data sets, whose
    offline failure takes half a minute of retries)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or \
            os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def available_sources(sources: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split evaluation sources into those that can be read now and those that cannot
    (with the reason): a local file in ``SPARSEGPT_DATA_DIR`` or a reachable hub."""
    from .data import LOCAL_FILES, default_data_dir

    data_dir = default_data_dir()
    ok, missing, hub = [], {}, None
    for source in sources:
        if source == "stdlib" or Path(source).is_file():
            ok.append(source)
            continue
        if source not in LOCAL_FILES:
            missing[source] = "neither a file nor a known source"
            continue
        split = "validation" if source in ("c4", "wikitext2-valid") else "test"
        rel = LOCAL_FILES[source].get(split)
        if data_dir is not None and rel and (data_dir / rel).is_file():
            ok.append(source)
            continue
        hub = hub_reachable() if hub is None else hub
        if hub:
            ok.append(source)
        else:
            missing[source] = "no file in SPARSEGPT_DATA_DIR and the Hugging Face hub is unreachable"
    return ok, missing


def load_checkpoint(path: str | Path):
    """(model, tokenizer) from a saved pruned model: a ``save_utils`` checkpoint (it has a
    ``manifest.json``) or a plain transformers folder."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from .save_utils import load_pruned

        return load_pruned(path)
    from .models import load_model

    return load_model(str(path))


def evaluate_checkpoints(
    model: str, method: str, densities: Sequence[float], root: str | Path | None = None,
    sources: Sequence[str] = ("wikitext2",), eval_windows: int | None = None,
    seqlen: int | None = None, tolerance: float = 0.01, dense_fallback: bool = True,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Load every saved ``<model>_<method>_d<density>`` under ``root`` (default
    :func:`pruned_dir`), measure perplexity on each readable source and check its per-layer
    density against the target.

    Density 1 with no saved folder is the dense model itself (``dense_fallback``).
    Returns ``(results, layers, notes)``: one tidy row per (density, source) with ``ppl``,
    ``density_achieved``, ``layer_density_min/max`` and ``layers_off`` (layers further than
    ``tolerance`` from the target); one row per (density, layer); and notes naming the missing
    checkpoints and the unreadable sources.
    """
    from .data import eval_tokens
    from .evaluate import density_report, overall_density, perplexity
    from .models import load_model, model_seqlen

    for d in densities:
        if not 0 < d <= 1:
            raise ValueError(f"densities (fraction kept) must be in (0, 1], got {d}")
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"eval_windows must be >= 1 or None, got {eval_windows}")
    root = pruned_dir(root)
    paths = find_checkpoints(root, model, method, densities)
    ok_sources, bad_sources = available_sources(sources)
    notes = [f"source {s!r} skipped: {why}" for s, why in bad_sources.items()]
    rows, layer_frames, tokens = [], [], {}
    for density in tqdm(densities, desc="checkpoints", disable=not progress):
        path = paths[density]
        if path is None and not (dense_fallback and density == 1):
            notes.append(f"missing: no checkpoint {checkpoint_name(model, method, density)} in {root}")
            continue
        net, tok = load_checkpoint(path) if path is not None else load_model(model)
        report = density_report(net)
        achieved = overall_density(report)
        off = int(((report["density"] - density).abs() > tolerance).sum())
        layer_frames.append(report.assign(target_density=density))
        length = seqlen or model_seqlen(net)
        for source in ok_sources or [None]:  # no readable source: the density check still counts
            res = None
            if source is not None:
                if (source, length) not in tokens:
                    tokens[source, length] = eval_tokens(tok, source, seqlen=length)
                res = perplexity(net, tokens[source, length], seqlen=length, max_windows=eval_windows,
                                 progress=False)
            rows.append({"model": model, "method": method, "density": density, "sparsity": 1 - density,
                         "checkpoint": path.name if path is not None else "(dense model)",
                         "eval": source, "eval_windows": res.windows if res else 0, "seqlen": length,
                         "eval_seqlen": length,
                         "ppl": res.ppl if res else float("nan"),
                         "density_achieved": achieved,
                         "layer_density_min": float(report["density"].min()),
                         "layer_density_max": float(report["density"].max()),
                         "layers": len(report), "layers_off": off})
        del net
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    return pd.DataFrame(rows), layers, notes


# ---------------------------------------------------------------- notebook regression outputs

def refresh_notebooks(notebooks: Sequence[str | Path], workdir: str | Path | None = None,
                      kernel: str = "python3", timeout: int = 1800) -> Path:
    """Re-execute ``notebooks`` in order, in place, with their default parameters and the
    environment of :func:`notebook_env` (what nbval compares against), and write each back
    atomically. Stops at the first failing notebook (left unchanged). Returns the work folder."""
    import nbformat
    from nbclient import NotebookClient

    workdir = Path(workdir or tempfile.mkdtemp(prefix="nbval-work-"))
    saved = dict(os.environ)
    os.environ.update(notebook_env(workdir))  # the kernel inherits this process's environment
    try:
        for path in map(Path, notebooks):
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            NotebookClient(nb, kernel_name=kernel, timeout=timeout,
                           resources={"metadata": {"path": str(path.resolve().parent)}}).execute()
            write_atomic(path, lambda tmp, nb=nb: nbformat.write(nb, tmp))
            print(f"{path}: {time.perf_counter() - start:.0f} s")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return workdir
