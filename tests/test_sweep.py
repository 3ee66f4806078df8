"""Sweeps (papermill grids, resume, failures), result collection, and testing saved checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from sparsegpt_utils import evaluate, plots, sweep

DEMO = Path(__file__).parent / "data" / "sweep_demo.ipynb"


def test_expand_grid_is_the_cartesian_product_with_fixed_values_and_a_base():
    points = sweep.expand_grid({"a": [1, 2], "b": ["x", "y"], "c": 0}, base={"d": 5, "a": 9})
    assert points == [{"d": 5, "a": 1, "b": "x", "c": 0}, {"d": 5, "a": 1, "b": "y", "c": 0},
                      {"d": 5, "a": 2, "b": "x", "c": 0}, {"d": 5, "a": 2, "b": "y", "c": 0}]


def test_expand_grid_union_of_subgrids_drops_duplicates_and_keeps_list_values():
    points = sweep.expand_grid([{"m": ["a", "b"], "L": [[0.5, 0.7]]}, {"m": "a", "L": [[0.5, 0.7]]},
                                {"m": "c", "L": [[0.3]]}])
    assert points == [{"m": "a", "L": [0.5, 0.7]}, {"m": "b", "L": [0.5, 0.7]}, {"m": "c", "L": [0.3]}]


@pytest.mark.parametrize("grid, words", [({"a b": [1]}, "a b"), ({"a": []}, "empty"), ([], "empty")])
def test_expand_grid_rejects_bad_grids_naming_the_problem(grid, words):
    with pytest.raises(ValueError, match=words):
        sweep.expand_grid(grid)


def test_parse_param_option_reads_yaml_values_and_bracketed_lists():
    assert sweep.parse_param_option("METHOD=sparsegpt,wanda") == ("METHOD", ["sparsegpt", "wanda"])
    assert sweep.parse_param_option("d=0.5, 1,None") == ("d", [0.5, 1, None])
    assert sweep.parse_param_option("SPARSENESS_LIST=[0.5,0.7],[0.3]") == (
        "SPARSENESS_LIST", [[0.5, 0.7], [0.3]])
    for bad in ("METHOD", "=1", "a b=1", "x="):
        with pytest.raises(ValueError, match="name=v1,v2"):
            sweep.parse_param_option(bad)


def test_run_id_is_stable_readable_and_distinct():
    params = {"METHOD": "wanda", "model_name": "facebook/opt-125m"}
    a = sweep.run_id("nb/1_SparseGPT.ipynb", params)
    assert a == sweep.run_id("other/1_SparseGPT.ipynb", dict(reversed(params.items())))
    assert a.startswith("1_SparseGPT_METHOD=wanda_model_name=facebook-opt-125m_")
    assert "/" not in a
    assert a != sweep.run_id("nb/1_SparseGPT.ipynb", {**params, "METHOD": "sparsegpt"})


def test_plan_checks_names_against_the_notebook_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"\['z'\].*declares"):
        sweep.plan_sweep(DEMO, {"x": [1], "z": [2]}, tmp_path)
    with pytest.raises(ValueError, match="RESULT_JSON is set by the sweep"):
        sweep.plan_sweep(DEMO, {"RESULT_JSON": ["a"]}, tmp_path)
    nb = nbformat.read(DEMO, as_version=4)
    nb.cells[1].source = "x = 1"  # a notebook that cannot hand back a result
    nbformat.write(nb, tmp_path / "no_result.ipynb")
    with pytest.raises(ValueError, match="must declare RESULT_JSON = None"):
        sweep.plan_sweep(tmp_path / "no_result.ipynb", {"x": [1]}, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        sweep.plan_sweep(tmp_path / "missing.ipynb", {"x": [1]}, tmp_path)
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        sweep.run_sweep(DEMO, {"x": [1]}, tmp_path, parallel=0)
    assert not list(tmp_path.glob("*/result.json"))


@pytest.mark.slow
def test_sweep_runs_resumes_and_never_loses_finished_runs(tmp_path, capsys):
    out = tmp_path / "runs"
    grid = {"x": [1, 2], "FAIL": [False, True]}
    table = sweep.run_sweep(DEMO, grid, out, parallel=2, base={"y": 3.0}, gpus=["3", "5"], progress=False)
    assert sorted(table["status"]) == ["failed", "failed", "ok", "ok"]
    failed = table[table["status"] == "failed"]
    assert all(e.startswith("ValueError: FAIL was set") for e in failed["error"])
    assert "FAILED" in capsys.readouterr().out
    for rid in failed["run_id"]:  # failures are kept apart, with their reason and log
        assert not (out / rid).exists()
        assert (out / "_failed" / rid / "error.txt").read_text().startswith("ValueError")
        assert (out / "_failed" / rid / "papermill.log").is_file()
    results = sweep.collect_results(out)
    assert sorted(results["ppl"]) == [3.0, 6.0]  # x * y from the notebook itself
    assert set(results["gpu"]) <= {"3", "5"}  # one GPU per run
    assert {Path(c) for c in results["cwd"]} == {DEMO.parent.resolve()}  # Jupyter's working directory
    ok_dir = out / table.loc[table["status"] == "ok", "run_id"].iloc[0]
    assert (ok_dir / "notebook.ipynb").is_file() and (ok_dir / "params.yaml").is_file()
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}

    # resume: the finished runs are skipped and untouched; the failed ones are tried again
    (out / ".leftover.partial").mkdir()
    again = sweep.run_sweep(DEMO, grid, out, parallel=1, base={"y": 3.0}, gpus=[], progress=False)
    assert sorted(again["status"]) == ["failed", "failed", "skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == before
    assert not (out / ".leftover.partial").exists()

    # a failed run that later succeeds moves out of _failed
    fixed = sweep.run_sweep(DEMO, {"x": [1], "FAIL": [True]}, out, base={"y": 3.0}, gpus=[], progress=False)
    rid = fixed["run_id"].iloc[0]
    assert (out / "_failed" / rid).exists()
    nb = nbformat.read(DEMO, as_version=4)
    nb.cells[2].source = nb.cells[2].source.replace("if FAIL:", "if False:")
    nbformat.write(nb, tmp_path / DEMO.name)  # same stem: same run ids
    healed = sweep.run_sweep(tmp_path / DEMO.name, {"x": [1], "FAIL": [True]}, out, base={"y": 3.0},
                             gpus=[], progress=False)
    assert list(healed["status"]) == ["ok"]
    assert (out / rid / "result.json").is_file() and not (out / "_failed" / rid).exists()


@pytest.mark.slow
def test_sweep_reports_timeouts_and_missing_results(tmp_path):
    slow = sweep.run_sweep(DEMO, [{"SLEEP": 600}], tmp_path, timeout=8, gpus=[], progress=False)
    assert list(slow["error"]) == ["timed out after 8 s"]
    # a notebook that finishes: its own generous limit, so that a loaded machine's slow kernel
    # start does not turn "wrote nothing" into a timeout
    silent = sweep.run_sweep(DEMO, [{"WRITE": False}], tmp_path, timeout=300, gpus=[], progress=False)
    assert list(silent["error"]) == ["the notebook finished but wrote nothing to RESULT_JSON"]
    assert sweep.collect_results(tmp_path).empty


def _cli(argv):
    parser = argparse.ArgumentParser()
    sweep.add_cli_arguments(parser)
    return sweep.cli_main(parser.parse_args(argv))


def test_cli_dry_run_combines_grid_file_and_params(tmp_path, capsys):
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"notebook: {DEMO}\nparameters: {{y: 4.0}}\ngrid:\n  x: [1, 2]\n")
    argv = ["--grid", str(spec), "--param", "FAIL=false,true", "--out-dir", str(tmp_path), "--dry-run"]
    assert _cli(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "4 of 4 runs to do"
    assert all(ln.startswith("todo  sweep_demo_FAIL=") and "_x=" in ln and "y=" not in ln
               for ln in lines[:-1])
    spec.write_text("grid: {x: [1]}\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        _cli(["--grid", str(spec), "--dry-run"])
    with pytest.raises(SystemExit, match="give a grid"):
        _cli(["--notebook", str(DEMO)])


@pytest.mark.slow
def test_cli_runs_and_exits_nonzero_on_failure(tmp_path):
    args = ["--notebook", str(DEMO), "--out-dir", str(tmp_path), "--param", "x=7"]
    assert _cli(args) == 0
    assert list(sweep.collect_results(tmp_path)["ppl"]) == [14.0]
    assert _cli([*args, "--param", "FAIL=true"]) == 1


def test_load_results_merges_csv_json_and_runs_once_each(tmp_path):
    base = {"model": "m", "calib": "c4", "eval": "wikitext2", "wbits": None}
    pd.DataFrame([{**base, "method": "sparsegpt", "density": 0.5, "ppl": 30.0},
                  {**base, "method": "magnitude", "density": 0.5, "ppl": 90.0}]).to_csv(
        tmp_path / "a.csv", index=False)
    pd.DataFrame([{"unrelated": 1}]).to_csv(tmp_path / "other.csv", index=False)
    (tmp_path / "b.json").write_text(json.dumps({**base, "method": "wanda", "density": 0.5, "ppl": 40.0}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)  # the same configuration as a CSV row: the run's result wins
    (run / "result.json").write_text(json.dumps([
        {**base, "method": "sparsegpt", "density": 0.5, "ppl": 29.0, "versions": {"torch": "2"}},
        {**base, "method": "sparsegpt", "density": 0.5, "ppl": 25.0, "finetune": True},
        {**base, "method": "iterative-sparsegpt", "density": 0.3, "ppl": 50.0}]))
    (tmp_path / "runs" / "unfinished").mkdir()
    df = sweep.load_results(tmp_path).set_index("family")
    assert sorted(df.index) == ["iterative", "magnitude", "sparsegpt", "sparsegpt+finetune", "wanda"]
    assert df.loc["sparsegpt", "ppl"] == 29.0 and df.loc["sparsegpt", "versions.torch"] == "2"
    assert df.loc["iterative", "sparsity"] == pytest.approx(0.7)
    assert df.loc["sparsegpt+finetune", "ppl"] == 25.0
    empty = sweep.load_results(tmp_path / "nothing")
    assert empty.empty and {"model", "method", "density", "ppl", "family"} <= set(empty.columns)


def test_load_results_places_iterative_rows_by_the_density_asked_for(tmp_path):
    # an iterative history records the achieved density; the table needs the target's
    pd.DataFrame({"model": "m", "method": "sparsegpt", "family": "iterative", "eval": "wikitext2",
                  "step": [0, 1, 2], "density_target": [1.0, 0.5, 0.3],
                  "density": [1.0, 0.50001, 0.299997], "ppl": [20.0, 40.0, 90.0]}).to_csv(
        tmp_path / "iter.csv", index=False)
    pd.DataFrame([{"model": "m", "method": "sparsegpt", "eval": "wikitext2", "density": 0.3,
                   "ppl": 120.0}]).to_csv(tmp_path / "one.csv", index=False)
    df = sweep.load_results(tmp_path)
    assert sorted(df.loc[df["family"] == "iterative", "density"]) == [0.3, 0.5, 1.0]
    assert df["sparsity"].tolist() == pytest.approx((1 - df["density"]).tolist())
    table = plots.ppl_table(df)
    row = table[table["density"] == 0.3]
    assert len(row) == 1 and row["iterative"].item() == 90.0 and row["sparsegpt"].item() == 120.0


def test_find_checkpoints_matches_density_numerically_and_by_model_and_method(tmp_path):
    for name in ["facebook-opt-125m_sparsegpt_d0.50", "facebook-opt-125m_sparsegpt_d0.7",
                 "facebook-opt-125m_wanda_d0.3", "other_sparsegpt_d0.3"]:
        (tmp_path / name).mkdir()
    found = evaluate.find_checkpoints(tmp_path, "facebook/opt-125m", "sparsegpt", [0.3, 0.5, 0.7])
    assert found == {0.3: None, 0.5: tmp_path / "facebook-opt-125m_sparsegpt_d0.50",
                     0.7: tmp_path / "facebook-opt-125m_sparsegpt_d0.7"}
    assert sweep.checkpoint_name("facebook/opt-125m", "wanda", 0.3) == "facebook-opt-125m_wanda_d0.3"
    assert evaluate.find_checkpoints(tmp_path / "absent", "m", "wanda", [0.5]) == {0.5: None}


def test_available_sources_names_what_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    ok, missing = evaluate.available_sources(["stdlib", str(text), "ptb", "nonsense"])
    assert ok == ["stdlib", str(text)]
    assert set(missing) == {"ptb", "nonsense"} and "hub is offline" in missing["ptb"]
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("a b c")
    assert evaluate.available_sources(["ptb"]) == (["ptb"], {})


@pytest.mark.slow
def test_evaluate_checkpoints_measures_saved_models_and_names_missing_ones(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsegpt_utils.data import eval_tokens
    from sparsegpt_utils.evaluate import perplexity
    from sparsegpt_utils.models import _builtin_folder
    from sparsegpt_utils.prune import PruneConfig, prune_model

    tok = AutoTokenizer.from_pretrained(_builtin_folder("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    prune_model(model, None, PruneConfig(method="magnitude", density=0.5), progress=False)
    model.save_pretrained(tmp_path / "tiny_magnitude_d0.5")
    tok.save_pretrained(tmp_path / "tiny_magnitude_d0.5")

    table, layers, notes = evaluate.evaluate_checkpoints(
        "tiny", "magnitude", [0.3, 0.5, 1], root=tmp_path, sources=["stdlib", "nonsense"],
        eval_windows=2, seqlen=64, dense_fallback=False, progress=False)
    assert len(notes) == 3
    assert "'nonsense'" in notes[0]
    assert "tiny_magnitude_d0.3" in notes[1] and "tiny_magnitude_d1" in notes[2]
    row = table.iloc[0]
    assert len(table) == 1 and row["density"] == 0.5 and row["eval"] == "stdlib"
    assert row["density_achieved"] == pytest.approx(0.5, abs=1e-3) and row["layers_off"] == 0
    assert row["layers"] == len(layers) == 14
    want = perplexity(model, eval_tokens(tok, "stdlib"), seqlen=64, max_windows=2, progress=False)
    assert row["ppl"] == pytest.approx(want.ppl, rel=1e-5) and row["eval_windows"] == 2
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        evaluate.evaluate_checkpoints("tiny", "magnitude", [0], root=tmp_path)


def test_older_names_stay_reachable_from_sweep():
    from sparsegpt_utils import notebook

    for name in ("evaluate_checkpoints", "find_checkpoints", "load_checkpoint", "available_sources"):
        assert getattr(sweep, name) is getattr(evaluate, name)
    assert sweep.refresh_notebooks is notebook.refresh_notebooks
    with pytest.raises(AttributeError, match="no_such_name"):
        sweep.no_such_name  # noqa: B018


def test_atomic_writers_leave_no_temporary_files(tmp_path):
    sweep.write_json_atomic(tmp_path / "r.json", {"ppl": 1.5})
    sweep.write_csv_atomic(tmp_path / "r.csv", pd.DataFrame({"a": [1]}))
    assert json.loads((tmp_path / "r.json").read_text()) == {"ppl": 1.5}
    assert pd.read_csv(tmp_path / "r.csv")["a"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]


def test_results_dirs_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_RESULTS_DIR", str(tmp_path / "r"))
    monkeypatch.delenv("SPARSEGPT_PRUNED_DIR", raising=False)
    assert sweep.results_dir() == tmp_path / "r"
    assert sweep.results_dir("x") == Path("x")
    assert sweep.pruned_dir().name == "pruned_models"


def test_sweep_folders_come_from_the_path_policy_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.chdir(tmp_path)
    assert sweep.default_runs_dir() == tmp_path / "res" / "runs"
    assert sweep.plan_sweep(DEMO, {"x": [1]})[0].folder.parent == tmp_path / "res" / "runs"
    assert sweep.default_notebook() == ROOT / "notebooks" / "1_SparseGPT.ipynb"
    assert sweep.default_notebook().is_file()
    assert sweep.collect_results().empty


def test_plan_finds_finished_runs_by_hash_and_names_folders_by_grid_axes(tmp_path):
    runs = sweep.plan_sweep(DEMO, {"x": [1, 2]}, tmp_path, base={"y": 3.0})
    assert [r.id.rsplit("_", 1)[0] for r in runs] == ["sweep_demo_x=1", "sweep_demo_x=2"]
    assert not any(r.finished for r in runs)
    digest = runs[1].id.rsplit("_", 1)[1]
    renamed = tmp_path / f"sweep_demo_older-name_{digest}"
    renamed.mkdir()
    (renamed / "result.json").write_text("{}")
    again = sweep.plan_sweep(DEMO, {"x": [1, 2]}, tmp_path, base={"y": 3.0})
    assert again[1].folder == renamed and again[1].finished and not again[0].finished
    assert sweep.plan_sweep(DEMO, {"x": [2]}, tmp_path, base={"y": 4.0})[0].folder != renamed


# ---------------------------------------------------------------- stopping a sweep

ROOT = Path(__file__).resolve().parents[1]


# how long a signalled sweep may take to exit: long enough for a loaded 2-core machine, so that
# only a hang fails
SIGNALLED_EXIT_S = 120


def _start_sweep(tmp_path, grid):
    """``python -m sparsegpt_utils sweep`` on the demo notebook, in a session of its own as a
    shell runs a command (so that Ctrl-C can be sent to its group)."""
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({"notebook": str(DEMO), "grid": grid, "parallel": 1}))
    return subprocess.Popen([sys.executable, "-m", "sparsegpt_utils", "sweep", "--grid", str(spec),
                             "--out-dir", str(tmp_path / "runs")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _resume(tmp_path, grid):
    return sweep.run_sweep(DEMO, grid, tmp_path / "runs", parallel=1, gpus=[], progress=False)


def _wait_for(condition, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def _csv_densities(csv):
    return pd.read_csv(csv)["density"].tolist() if csv.is_file() else []


def _held_tree(sweep_proc, csv, x):
    """The sweep's descendants once the run of ``x`` is held (its row appended): the papermill
    child and its kernel."""
    psutil = pytest.importorskip("psutil")
    _wait_for(lambda: x in _csv_densities(csv) or sweep_proc.poll() is not None)
    assert sweep_proc.poll() is None, sweep_proc.communicate()
    tree = psutil.Process(sweep_proc.pid).children(recursive=True)
    assert any("ipykernel" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    return tree


def _orphans(tree, sweep_proc):
    """The processes of ``tree`` still alive 10 s after the sweep ended (then killed)."""
    psutil = pytest.importorskip("psutil")
    if sweep_proc.poll() is None:  # the test failed before the sweep ended
        os.killpg(sweep_proc.pid, signal.SIGKILL)
        sweep_proc.communicate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:  # never leave them behind, even when the test fails
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [" ".join(p.cmdline()) if p.is_running() else str(p.pid) for p in alive]


@pytest.mark.slow
def test_a_killed_sweep_takes_its_notebook_and_kernel_with_it_and_resumes_without_duplicates(tmp_path):
    csv, hold = tmp_path / "rows.csv", tmp_path / "hold"
    hold.touch()
    grid = [{"x": 1, "HOLD": str(hold), "CSV": str(csv)}]
    proc = _start_sweep(tmp_path, grid)
    tree = []
    try:
        tree = _held_tree(proc, csv, 1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=SIGNALLED_EXIT_S)
    finally:
        orphans = _orphans(tree, proc)
    assert orphans == []
    runs = tmp_path / "runs"
    rid = sweep.plan_sweep(DEMO, grid, runs)[0].id
    assert [p.name.split(".tmp-")[0] for p in runs.iterdir()] == [f".{rid}"]  # left half-written
    hold.unlink()
    assert list(_resume(tmp_path, grid)["status"]) == ["ok"]
    assert _csv_densities(csv) == [1]  # the killed attempt's row was replaced, not repeated
    finished = sweep.collect_results(runs)
    assert finished["density"].tolist() == [1]
    assert [p.name for p in runs.iterdir()] == [finished["run_id"].item()]  # the half-written folder went


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_at_once_and_keeps_finished_runs(tmp_path):
    csv, hold = tmp_path / "rows.csv", tmp_path / "hold"
    hold.touch()
    grid = [{"x": 1}, {"x": 2, "HOLD": str(hold), "CSV": str(csv)}, {"x": 3}]
    proc = _start_sweep(tmp_path, grid)
    tree, err = [], ""
    try:
        tree = _held_tree(proc, csv, 2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=SIGNALLED_EXIT_S)
    finally:
        orphans = _orphans(tree, proc)
    assert orphans == []
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].startswith("sweep: interrupted") and "Traceback" not in err
    runs = tmp_path / "runs"
    finished = sweep.collect_results(runs)
    assert finished["density"].tolist() == [1]  # x=1 kept; x=2 stopped; x=3 never started
    assert [p.name for p in runs.iterdir()] == [finished["run_id"].item()]
    first = next(runs.glob("*/result.json")).stat().st_mtime_ns

    hold.unlink()
    assert sorted(_resume(tmp_path, grid)["status"]) == ["ok", "ok", "skipped"]
    assert next(runs.glob("*x=1*/result.json")).stat().st_mtime_ns == first
    assert _csv_densities(csv) == [2]  # the stopped attempt's row replaced
    assert sorted(sweep.collect_results(runs)["density"]) == [1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_handed_to_another_thread_still_stops_the_sweep_at_once(tmp_path):
    """The kernel may deliver a process's SIGINT to any of its threads; a main thread blocked
    waiting for a held run would then not see it until that run ended."""
    csv, hold = tmp_path / "rows.csv", tmp_path / "hold"
    hold.touch()
    grid = [{"x": 1, "HOLD": str(hold), "CSV": str(csv)}]
    sent, finished = [], threading.Event()

    def ctrl_c_on_this_thread():
        with contextlib.suppress(AssertionError):
            _wait_for(lambda: 1 in _csv_densities(csv))
        sent.append(time.monotonic())
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        finished.wait(SIGNALLED_EXIT_S)  # a sweep that missed it ends when the held run is let go
        hold.unlink(missing_ok=True)

    helper = threading.Thread(target=ctrl_c_on_this_thread, daemon=True)
    helper.start()
    try:
        with pytest.raises(sweep.SweepInterrupted) as stopped:
            sweep.run_sweep(DEMO, grid, tmp_path / "runs", parallel=1, gpus=[], progress=False)
        waited = time.monotonic() - sent[0]
    finally:
        finished.set()
        helper.join()
    assert waited < SIGNALLED_EXIT_S / 4, waited
    assert stopped.value.table["status"].tolist() == ["stopped"]
    assert sweep.collect_results(tmp_path / "runs").empty


def test_refresh_notebooks_writes_outputs_without_machine_paths(tmp_path):
    """`make notebooks` re-executes in place; papermill's run record (it names the output path
    on the machine that ran it) does not survive into the committed notebook."""
    from sparsegpt_utils.notebook import refresh_notebooks

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["papermill"] = {"output_path": "/tmp/somewhere/out.ipynb"}
    nb.cells[0].metadata["papermill"] = {"status": "completed"}
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    refresh_notebooks([path], workdir=tmp_path / "work")
    text = path.read_text()
    out = nbformat.reads(text, as_version=4)
    assert out.cells[0].outputs[0]["text"] == "42\n"
    assert "papermill" not in text and "/tmp/somewhere" not in text
