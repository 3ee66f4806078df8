"""One path policy: argument, else environment variable, else a default beside the project."""

from __future__ import annotations

import os
from pathlib import Path

from sparsegpt_utils import paths


def test_folders_follow_argument_then_environment_then_project(monkeypatch, tmp_path):
    root = paths.project_root()
    assert (root / "sparsegpt_utils" / "paths.py").is_file()
    for name, var, default in ((paths.results_dir, "SPARSEGPT_RESULTS_DIR", root / "results"),
                               (paths.pruned_dir, "SPARSEGPT_PRUNED_DIR", root / "pruned_models")):
        monkeypatch.delenv(var, raising=False)
        assert name() == default
        monkeypatch.setenv(var, str(tmp_path / "env"))
        assert name() == tmp_path / "env"
        assert name("given") == Path("given")


def test_data_dir_set_but_empty_means_none(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", "")
    assert paths.data_dir() is None
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    assert paths.data_dir() == tmp_path
    assert paths.data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SPARSEGPT_DATA_DIR")
    guess = paths.project_root().parent / "shared" / "data"
    assert paths.data_dir() == (guess if guess.is_dir() else None)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.delenv("SPARSEGPT_CACHE")
    assert paths.cache_dir() == Path.home() / ".cache" / "sparsegpt_utils"


def test_notebook_env_isolates_results_and_puts_the_project_first(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", str(paths.project_root())]))
    env = paths.notebook_env(tmp_path)
    assert env["SPARSEGPT_RESULTS_DIR"] == str(tmp_path / "results") and (tmp_path / "results").is_dir()
    assert env["SPARSEGPT_PRUNED_DIR"] == str(tmp_path / "pruned_models")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(paths.project_root()), "/elsewhere"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
