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


def test_owl_settings_tell_runs_apart_and_older_rows_keep_the_values_they_ran_with():
    bench = _bench()
    args = bench.parse_args(["--owl", "--owl-lambda", "0.15"])
    base = {"owl": True, **bench.owl_settings(vars(args))}
    assert base == {"owl": True, "owl_lambda": 0.15, "owl_m": 5.0}
    older = {"owl": True, "recipe": "oneshot"}  # written when lambda 0.08 and M 5 were fixed
    assert not bench.same_run(older, base, recipe="oneshot")
    assert bench.same_run(older, {"owl": True, **bench.owl_settings(vars(bench.parse_args(["--owl"])))},
                          recipe="oneshot")
    assert bench.owl_settings(vars(bench.parse_args([]))) == {}  # without OWL they change nothing


def test_plot_draws_one_curve_per_owl_setting(tmp_path, monkeypatch):
    bench = _bench()
    point = {"eval": "wikitext2", "eval_windows": 2, "eval_seqlen": 32, "recipe": "oneshot", "loss": "kd",
             "lr": 1e-3, "owl": True, "density": 0.2, "density_target": 0.2, "level": 1, "seconds": 60.0}
    rows = [{**point, "train_tokens": t, "ppl": p} for t, p in ((0, 150.0), (64, 120.0))]  # lambda 0.08
    rows += [{**point, "owl_lambda": 0.15, "owl_m": 5.0, "train_tokens": t, "ppl": p}
             for t, p in ((0, 140.0), (64, 110.0))]
    labels, draw = [], bench.plt.Axes.plot

    def plot_and_keep_label(ax, *args, **kw):
        labels.append(kw.get("label"))
        return draw(ax, *args, **kw)

    monkeypatch.setattr(bench.plt.Axes, "plot", plot_and_keep_label)
    bench.plot(pd.DataFrame(rows), str(tmp_path / "fig"))
    assert len(labels) == 2 and any("owl_lambda=0.08" in x for x in labels)
    assert any("owl_lambda=0.15" in x for x in labels) and (tmp_path / "fig.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--owl", "--owl-lambda", "-1"], "--owl-lambda must be >= 0 and --owl-m > 0"),
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
