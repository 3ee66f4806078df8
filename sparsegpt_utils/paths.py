"""Where things live: results, pruned models, offline data, caches (one policy).

Every folder follows the same rule: an explicit argument, else an environment variable, else
a default beside the project (or in the user's cache).

| what | variable | default |
| --- | --- | --- |
| result tables and figures | ``SPARSEGPT_RESULTS_DIR`` | ``<project>/results`` |
| pruned checkpoints | ``SPARSEGPT_PRUNED_DIR`` | ``<project>/pruned_models`` |
| offline text data | ``SPARSEGPT_DATA_DIR`` (set but empty: none) | ``<project>/../shared/data`` if present |
| converted built-in models | ``SPARSEGPT_CACHE`` | ``~/.cache/sparsegpt_utils`` |

A notebook run by a sweep also sees ``SPARSEGPT_RUN_ID`` and ``SPARSEGPT_RUN_ATTEMPT``
(:func:`sweep_run`): the result rows it appends carry them, so that a resumed run replaces the
rows of an interrupted one instead of adding to them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root", "results_dir", "pruned_dir", "data_dir", "cache_dir", "notebook_env",
           "project_pythonpath", "RUN_ID_ENV", "RUN_ATTEMPT_ENV", "sweep_run", "sweep_run_env"]

RUN_ID_ENV = "SPARSEGPT_RUN_ID"
RUN_ATTEMPT_ENV = "SPARSEGPT_RUN_ATTEMPT"


def project_root() -> Path:
    """The checkout this package lives in (the folder holding ``sparsegpt_utils/``)."""
    return Path(__file__).resolve().parents[1]


def results_dir(path: str | Path | None = None) -> Path:
    """Where results go: ``path``, else ``$SPARSEGPT_RESULTS_DIR``, else ``<project>/results``."""
    return Path(path or os.environ.get("SPARSEGPT_RESULTS_DIR") or project_root() / "results")


def pruned_dir(path: str | Path | None = None) -> Path:
    """Where pruned checkpoints go: ``path``, else ``$SPARSEGPT_PRUNED_DIR``, else
    ``<project>/pruned_models``."""
    return Path(path or os.environ.get("SPARSEGPT_PRUNED_DIR") or project_root() / "pruned_models")


def data_dir(path: str | Path | None = None) -> Path | None:
    """The offline data folder: ``path``, else ``$SPARSEGPT_DATA_DIR`` (set but empty: none, the
    hub only), else ``../shared/data`` beside the project when it exists, else None."""
    if path:
        return Path(path)
    env = os.environ.get("SPARSEGPT_DATA_DIR")
    if env is not None:
        return Path(env) if env else None
    guess = project_root().parent / "shared" / "data"
    return guess if guess.is_dir() else None


def cache_dir() -> Path:
    """Where built-in models are converted to once: ``$SPARSEGPT_CACHE`` or
    ``~/.cache/sparsegpt_utils``."""
    return Path(os.environ.get("SPARSEGPT_CACHE") or Path.home() / ".cache" / "sparsegpt_utils")


def project_pythonpath() -> str:
    """PYTHONPATH with the project first, so that kernels import this package even where it
    is not installed."""
    parts = [str(project_root()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def notebook_env(workdir: str | Path) -> dict[str, str]:
    """The environment of a notebook regression run: fresh result and checkpoint folders under
    ``workdir`` (so runs start from nothing and never touch the real ones), the project first on
    ``PYTHONPATH``, no tokenizer threads, and the hub offline (the default runs are offline; the
    same setting everywhere keeps saved tokenizer configs, and so checkpoint sizes, identical)."""
    workdir = Path(workdir)
    (workdir / "results").mkdir(parents=True, exist_ok=True)
    (workdir / "pruned_models").mkdir(parents=True, exist_ok=True)
    return {"SPARSEGPT_RESULTS_DIR": str(workdir / "results"),
            "SPARSEGPT_PRUNED_DIR": str(workdir / "pruned_models"),
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": project_pythonpath(),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sweep_run_env(run_id: str, attempt: str) -> dict[str, str]:
    """The variables a sweep gives the notebook of run ``run_id`` (its ``attempt``: a token
    that differs each time the run is started)."""
    return {RUN_ID_ENV: run_id, RUN_ATTEMPT_ENV: attempt}


def sweep_run() -> tuple[str, str | None] | None:
    """``(run_id, attempt)`` of the sweep run this process belongs to (attempt None when not
    given), or None outside a sweep."""
    run_id = os.environ.get(RUN_ID_ENV)
    return (run_id, os.environ.get(RUN_ATTEMPT_ENV) or None) if run_id else None
