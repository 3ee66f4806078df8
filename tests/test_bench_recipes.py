"""bench/bench_recipes.py keeps what it measured: points written as measured, finished runs
skipped on a re-run, a killed run's points replaced when it runs again."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_recipes.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_recipes"] = module
    spec.loader.exec_module(module)
    return module


def test_same_run_matches_csv_round_trips_and_nothing_else():
    same_run = _bench().same_run
    base = {"steps": 260, "owl": True, "lr_schedule": "cosine"}
    row = {"steps": 260.0, "owl": True, "lr_schedule": "cosine", "recipe": "oneshot", "lr": 0.001}
    assert same_run(row, base, recipe="oneshot", lr=1e-3)
    assert not same_run(row, base, recipe="oneshot", lr=2e-3)
    assert not same_run({**row, "steps": 65}, base, recipe="oneshot", lr=1e-3)
    assert not same_run({k: v for k, v in row.items() if k != "steps"}, base, recipe="oneshot", lr=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--densities", "1.5"], "--densities: '1.5': fractions KEPT, each in (0, 1)"),
    (["--densities", "x"], "--densities: 'x': comma-separated numbers"),
    (["--lrs", "0"], "--lrs: '0': learning rates, each > 0"),
    (["--losses", ","], "--losses: give at least one value"),
    (["--recipes", "iter9"], "--recipes: 'iter9' is not one of"),
])
def test_bad_settings_are_one_line_errors_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_rerun_keeps_finished_runs_and_restarts_a_killed_one(tiny_model_dir, calib_source, eval_source,
                                                             tmp_path, capsys):
    if (calib_source, eval_source) != ("wikitext2-valid", "wikitext2"):
        pytest.skip("the benchmark trains and evaluates on WikiText-2 (../shared/data)")
    bench = _bench()
    out = tmp_path / "recipes"
    argv = ["--model", str(tiny_model_dir), "--densities", "0.5", "--recipes", "oneshot", "--losses", "kd",
            "--lrs", "1e-3", "--steps", "2", "--eval-every", "1", "--batch-size", "1", "--seqlen", "32",
            "--calib-samples", "2", "--calib-seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32",
            "--device", "cpu", "--out", str(out)]
    bench.main(argv)
    first = pd.read_csv(f"{out}.csv")
    # dense, after pruning, after step 1, at the end
    assert list(first["recipe"]) == ["dense", "oneshot", "oneshot", "oneshot"]
    assert list(first["train_tokens"]) == [0, 0, 32, 64] and first["final"].tolist()[-1]
    assert (first["steps"] == 2).all()

    capsys.readouterr()
    bench.main(argv)  # everything is there: nothing is measured again, nothing is lost
    assert "already in" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(f"{out}.csv"), first)

    bench.main([*argv, "--lrs", "2e-3", "--skip-dense"])  # another rate: added beside the first
    both = pd.read_csv(f"{out}.csv")
    assert len(both) == 7 and sorted(both["lr"].dropna().unique()) == [1e-3, 2e-3]

    first.iloc[:-1].to_csv(f"{out}.csv", index=False)  # a run killed before its last point
    bench.main(argv)
    again = pd.read_csv(f"{out}.csv")
    assert len(again) == 4 and list(again["train_tokens"]) == [0, 0, 32, 64] and again["final"].tolist()[-1]
