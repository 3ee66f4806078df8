"""Atomic files and folders, stale temporaries, idempotent CSV rows, the run-settings vocabulary."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pandas as pd
import pytest

from sparsegpt_utils import results
from sparsegpt_utils.paths import sweep_run_env


def _fill(files: dict):
    def fill(folder):
        for name, text in files.items():
            (folder / name).write_text(text)
    return fill


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_replace_dir_atomic_keeps_a_finished_result_unless_told_to_overwrite(tmp_path):
    target = tmp_path / "run"
    assert results.replace_dir_atomic(target, _fill({"a.txt": "1"})) == target
    assert _names(target) == ["a.txt"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        results.replace_dir_atomic(target, _fill({"b.txt": "2"}))
    assert _names(target) == ["a.txt"] and (target / "a.txt").read_text() == "1"
    results.replace_dir_atomic(target, _fill({"b.txt": "2"}), overwrite=True)
    assert _names(target) == ["b.txt"]  # replaced as a whole, not merged
    assert _names(tmp_path) == ["run"]  # no temporaries left


@pytest.mark.parametrize("one_step", [True, False])
def test_swap_replaces_an_empty_placeholder_and_with_overwrite_a_full_folder(tmp_path, monkeypatch, one_step):
    if not one_step:  # systems without renameat2: the old folder is moved aside first
        monkeypatch.setattr(results, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    with results.atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    with results.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "y").write_text("newer")
    assert _names(target) == ["y"] and _names(tmp_path) == ["out"]


def test_atomic_dir_leaves_the_target_untouched_when_filling_fails(tmp_path):
    target = tmp_path / "out"
    results.replace_dir_atomic(target, _fill({"a": "old"}))
    with pytest.raises(RuntimeError, match="boom"):
        with results.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a").read_text() == "old" and _names(tmp_path) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        results.replace_dir_atomic(tmp_path / "file", _fill({}))


def test_temporaries_follow_the_umask(tmp_path):
    folder = results.temp_dir_beside(tmp_path / "t")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    results.atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temps_cleans_dead_writers_only_and_restores_a_half_swapped_folder(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".run.tmp-{dead}-abc123").mkdir()  # a folder being filled when its writer died
    (tmp_path / f".r.csv.tmp-{dead}-x1y2z3").write_text("half")  # a file write killed likewise
    (tmp_path / f".busy.tmp-{live}-abc123").mkdir()  # a writer still at work
    (tmp_path / "kept").mkdir()
    (tmp_path / f".kept.old-{dead}-q1").mkdir()  # backup of a swap that finished: drop it
    backup = tmp_path / f".moved.old-{dead}-q2"  # killed between the two renames: put it back
    backup.mkdir()
    (backup / "result.json").write_text("{}")
    removed = results.remove_stale_temps(tmp_path)
    assert len(removed) == 4
    assert _names(tmp_path) == [f".busy.tmp-{live}-abc123", "kept", "moved"]
    assert (tmp_path / "moved" / "result.json").is_file()
    assert results.remove_stale_temps(tmp_path / "absent") == []


def test_append_csv_row_in_a_sweep_run_replaces_the_rows_of_an_earlier_attempt(tmp_path, monkeypatch):
    csv = tmp_path / "r.csv"
    results.append_csv_row(csv, {"method": "magnitude", "density": 0.5, "ppl": 9.0})  # no run: plain
    monkeypatch.setenv("SPARSEGPT_RUN_ID", "nb_x=1_0a1b")
    monkeypatch.setenv("SPARSEGPT_RUN_ATTEMPT", "1e5")  # read back as text, not as a number
    for d in (0.5, 0.3):  # an attempt that was killed after two rows
        results.append_csv_row(csv, {"method": "sparsegpt", "density": d, "ppl": 1.0})
    monkeypatch.setenv("SPARSEGPT_RUN_ATTEMPT", "2")  # the resumed run
    for d in (0.5, 0.3):
        results.append_csv_row(csv, {"method": "sparsegpt", "density": d, "ppl": 2.0})
    monkeypatch.setenv("SPARSEGPT_RUN_ID", "nb_x=2_9f8e")  # another run of the sweep
    results.append_csv_row(csv, {"method": "sparsegpt", "density": 0.5, "ppl": 3.0})
    table = pd.read_csv(csv, dtype={"run_id": str, "run_attempt": str})
    assert table["ppl"].tolist() == [9.0, 2.0, 2.0, 3.0]
    assert table["run_id"].fillna("").tolist() == ["", "nb_x=1_0a1b", "nb_x=1_0a1b", "nb_x=2_9f8e"]
    assert table["density"].tolist() == [0.5, 0.5, 0.3, 0.5]
    monkeypatch.delenv("SPARSEGPT_RUN_ID")
    results.append_csv_row(csv, {"run_id": "nb_x=2_9f8e", "ppl": 4.0})  # keyed by its own run id
    assert pd.read_csv(csv)["ppl"].tolist() == [9.0, 2.0, 2.0, 4.0]


def test_appends_from_parallel_runs_lose_no_row(tmp_path):
    csv = tmp_path / "r.csv"

    def runner(k):
        for i in range(8):
            results.append_csv_row(csv, {"run": k, "i": i})

    threads = [threading.Thread(target=runner, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = pd.read_csv(csv)
    assert len(table) == 32 and len(table.drop_duplicates()) == 32


def test_run_setting_keys_cover_every_option_of_a_run():
    want = {"model", "method", "density", "nm", "calib", "calib_samples", "seqlen", "seed", "percdamp",
            "blocksize", "mask_blocksize", "wbits", "groupsize", "target_avg_bits", "bit_method", "owl",
            "exact_update", "reconstruct", "eval", "eval_windows", "eval_seqlen"}
    assert want <= set(results.RUN_SETTING_KEYS)
    assert len(set(results.RUN_SETTING_KEYS)) == len(results.RUN_SETTING_KEYS)
    assert not {"ppl", "density_achieved", "prune_seconds", "run_id"} & set(results.RUN_SETTING_KEYS)


def test_sweep_run_env_round_trips(monkeypatch):
    from sparsegpt_utils.paths import sweep_run

    monkeypatch.delenv("SPARSEGPT_RUN_ID", raising=False)
    assert sweep_run() is None
    for k, v in sweep_run_env("r1", "a7").items():
        monkeypatch.setenv(k, v)
    assert sweep_run() == ("r1", "a7")
