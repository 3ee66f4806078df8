"""The command line: every subcommand runs through ``cli.main`` and returns an exit status; bad
input fails before any model loads with one line naming the option, exit status 2."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsegpt_utils import cli
from sparsegpt_utils.cli import build_parser, main
from sparsegpt_utils.data import DataNotFoundError, load_text

TASKS = Path(__file__).resolve().parent / "data" / "tasks"


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``main(argv)``; argparse errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ")
    return lines[0]


def tiny_prune(model_dir, *more):
    return ["prune", "--model", str(model_dir), "--calib", "stdlib", "--calib-samples", "4",
            "--seqlen", "64", "--no-progress", *more]


@pytest.mark.parametrize("argv,needle", [
    (["--density", "0"], "density"),
    (["--density", "1.5"], "density"),
    (["--sparsity", "1"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--nm", "4:2"], "N:M"),
    (["--nm", "two:four"], "N:M"),
    (["--density", "0.5", "--calib", "/no/such/file.txt"], "--calib /no/such/file.txt"),
    (["--density", "0.5", "--eval", "/no/such/file.txt"], "--eval /no/such/file.txt"),
    (["--density", "0.5", "--model", "not-a-model"], "--model not-a-model"),
    (["--density", "0.5", "--calib-samples", "0"], "calib_samples"),
    (["--density", "0.5", "--eval-windows", "0"], "eval_windows"),
    (["--density", "0.5", "--wbits", "0"], "wbits"),
    (["--density", "0.5", "--wbits", "17"], "wbits"),
    (["--density", "0.5", "--groupsize", "128"], "groupsize"),
    (["--density", "0.5", "--mse"], "mse (clipping search) needs wbits"),
    (["--density", "0.5", "--target-avg-bits", "9"], "target_avg_bits"),
    (["--density", "0.5", "--wbits", "4", "--target-avg-bits", "3.5", "--mixed-unit", "group"],
     "unit 'group' needs a groupsize"),
    (["--density", "0.5", "--percdamp", "1"], "percdamp"),
    (["--density", "0.5", "--dtype", "float8"], "dtype"),
    (["--density", "0.5", "--device", "tpu"], "device"),
    (["--nm", "2:4", "--owl"], "owl"),
    (["--density", "0.5", "--owl", "--owl-samples", "0"], "owl_samples"),
])
def test_bad_input_fails_fast_naming_the_parameter(argv, needle, capsys):
    code, _, err = run(["prune", *argv], capsys)
    assert code == 2
    assert needle in error_line(err)


def test_unknown_method_is_rejected(capsys):
    code, _, err = run(["prune", "--density", "0.5", "--method", "obs"], capsys)
    assert code == 2 and "method" in err


def test_density_and_sparsity_are_exclusive(capsys):
    for other in (["--sparsity", "0.5"], ["--nm", "2:4"]):
        code, _, err = run(["prune", "--density", "0.5", *other], capsys)
        assert code == 2 and "not allowed with" in err


def test_missing_text_names_path_data_dir_and_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_text("ptb", "test")
    text = str(err.value)
    assert "file path" in text and str(tmp_path) in text and "hub" in text


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_help_shows_each_default(capsys):
    subcommands = _subcommands()
    assert {"prune", "eval", "iterative", "sweep"} <= set(subcommands)
    for name, parser in subcommands.items():
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0, name
        flat = " ".join(out.split())
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
                continue
            assert f"default: {action.default}" in flat, (name, action.option_strings, action.default)
    _, out, _ = run(["prune", "--help"], capsys)
    assert "KEPT" in out and "--sparsity" in out and "(default: 128)" in out


def test_round_trip_prune_eval_with_sparsity(tiny_model_dir, tmp_path, capsys):
    out, ckpt = tmp_path / "r.json", tmp_path / "ckpt"
    code, stdout, _ = run(tiny_prune(tiny_model_dir, "--method", "sparsegpt", "--sparsity", "0.6",
                                     "--eval", "stdlib", "--eval-windows", "3", "--eval-dense",
                                     "--save", str(ckpt), "--json", str(out)), capsys)
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("model", "method", "density", "sparsity", "nm", "wbits", "groupsize", "density_achieved",
                "sparsity_achieved", "avg_bits", "calib", "calib_samples", "seqlen", "seed", "eval",
                "eval_windows", "ppl", "ppl_dense", "prune_seconds", "peak_rss_mb", "peak_gpu_mb",
                "size_bytes", "dense_size_bytes", "versions"):
        assert key in result, key
    assert result["density"] == pytest.approx(0.4) and result["sparsity"] == pytest.approx(0.6)
    assert json.loads(stdout)["sparsity"] == pytest.approx(0.6)  # the printed summary has both
    assert abs(result["density_achieved"] - 0.4) < 0.01
    assert result["eval_windows"] == 3 and result["ppl"] > 1 and result["ppl_dense"] > 1
    assert result["eval_seqlen"] == 64  # the evaluation protocol is recorded with the result
    assert result["calib"] == "stdlib" and "calib_requested" not in result
    assert 0 < result["size_bytes"]

    again = tmp_path / "e.json"
    code, _, _ = run(["eval", "--checkpoint", str(ckpt), "--eval", "stdlib", "--eval-windows", "3",
                      "--seqlen", "64", "--json", str(again), "--no-progress"], capsys)
    assert code == 0
    reloaded = json.loads(again.read_text())
    assert reloaded["ppl"] == pytest.approx(result["ppl"], rel=1e-4)
    assert reloaded["density_achieved"] == pytest.approx(result["density_achieved"], abs=1e-6)

    subcommands = _subcommands()
    if "export" in subcommands:
        code, _, err = run(["export", str(ckpt), str(tmp_path / "dense"), "--format", "dense"], capsys)
        assert code == 0, err
    if "generate" in subcommands:
        code, _, err = run(["generate", "--checkpoint", str(ckpt), "--prompt", "Return the",
                            "--max-new-tokens", "2", "--json", str(tmp_path / "g.json")], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "g.json").read_text())["new_tokens"] == 2


def test_eval_of_a_model_folder(tiny_model_dir, capsys):
    code, out, _ = run(["eval", "--model", str(tiny_model_dir), "--eval", "stdlib", "--eval-windows", "2",
                        "--seqlen", "32", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0 and json.loads(out)["eval_windows"] == 2


def test_cuda_without_gpu_is_refused_up_front(tiny_model_dir, monkeypatch, capsys):
    """Defect: ``--device cuda`` on a machine without a GPU ended in a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argvs = [tiny_prune(tiny_model_dir, "--density", "0.5", "--device", "cuda"),
             ["eval", "--model", str(tiny_model_dir), "--eval", "stdlib", "--device", "cuda:0"],
             ["iterative", "--model", str(tiny_model_dir), "--device", "cuda"]]
    for argv in argvs:
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        assert "no CUDA GPU" in error_line(err)


@pytest.fixture
def bad_model_dirs(tmp_path, tiny_model_dir):
    """Folders that are not loadable models: empty, a broken config.json, no weight files."""
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, weightless)
    for f in weightless.glob("*.safetensors"):
        f.unlink()
    return {"empty": (empty, "config.json"), "broken": (broken, "JSON"),
            "weightless": (weightless, "weight")}


@pytest.mark.parametrize("kind", ["empty", "broken", "weightless"])
def test_unloadable_model_folder_is_one_line_naming_it(kind, bad_model_dirs, capsys):
    """Defect: a broken config.json gave two tracebacks and exit status 1."""
    folder, reason = bad_model_dirs[kind]
    for argv in (tiny_prune(folder, "--density", "0.5"),
                 ["eval", "--model", str(folder), "--eval", "stdlib", "--no-progress"]):
        code, _, err = run(argv, capsys)
        assert code == 2
        line = error_line(err)
        assert line.startswith(f"error: --model {folder}: ") and reason in line


@pytest.fixture
def bad_text_files(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    return [binary, latin1, empty]


@pytest.mark.parametrize("option", ["--calib", "--eval"])
def test_unusable_text_file_is_one_line_naming_option_and_path(option, bad_text_files, bad_model_dirs,
                                                               capsys):
    """Binary, non-UTF-8 and empty text files are refused before the model loads (the model
    folder here is unloadable, so a message about the text proves nothing was loaded)."""
    model = bad_model_dirs["empty"][0]
    for path in bad_text_files:
        argv = tiny_prune(model, "--density", "0.5", option, str(path))
        code, _, err = run(argv, capsys)
        assert code == 2
        assert error_line(err).startswith(f"error: {option} {path}: ")
    code, _, err = run(["eval", "--model", str(model), "--eval", str(bad_text_files[1])], capsys)
    assert code == 2 and error_line(err).startswith(f"error: --eval {bad_text_files[1]}: ")


def test_missing_checkpoint_names_the_option(tmp_path, capsys):
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "none"), "--eval", "stdlib"], capsys)
    assert code == 2 and error_line(err).startswith(f"error: --checkpoint {tmp_path / 'none'}: ")


def test_nm_needs_a_block_size_multiple_of_m_before_loading(bad_model_dirs, capsys):
    """Defect: ``--nm 2:3`` failed only after loading, blaming the layer width."""
    code, _, err = run(tiny_prune(bad_model_dirs["empty"][0], "--nm", "2:3"), capsys)
    assert code == 2
    line = error_line(err)
    assert "M=3" in line and "blocksize=128" in line and "multiple" in line
    # with B a multiple of 3 the check passes, and the (unloadable) model folder is what fails
    code, _, err = run(tiny_prune(bad_model_dirs["empty"][0], "--nm", "2:3", "--blocksize", "126",
                                  "--mask-blocksize", "42"), capsys)
    assert code == 2 and error_line(err).startswith("error: --model ")


def test_eval_windows_zero_fails_before_loading(bad_model_dirs, capsys):
    code, _, err = run(["eval", "--model", str(bad_model_dirs["empty"][0]), "--eval", "stdlib",
                        "--eval-windows", "0"], capsys)
    assert code == 2 and "eval_windows" in error_line(err)


def test_not_implemented_is_one_line_exit_2(tiny_model_dir, monkeypatch, capsys):
    from sparsegpt_utils import experiment

    def unbuilt(*args, **kwargs):
        raise NotImplementedError("not available yet: reconstruct")

    monkeypatch.setattr(experiment, "prune_model", unbuilt)
    code, _, err = run(tiny_prune(tiny_model_dir, "--density", "0.5", "--reconstruct"), capsys)
    assert code == 2 and "not available yet: reconstruct" in error_line(err)


def test_every_pruning_option_reaches_the_prune_config():
    """The CLI's pruning flags land in PruneConfig's fields (one mapping, no copies)."""
    args = build_parser().parse_args([
        "prune", "--model", "org/name", "--sparsity", "0.7", "--method", "wanda", "--wbits", "3",
        "--groupsize", "64", "--mse", "--percdamp", "0.05", "--blocksize", "64", "--mask-blocksize", "32",
        "--calib-batch-size", "2", "--owl", "--owl-lambda", "0.1", "--owl-m", "7", "--owl-samples", "3",
        "--exact-update",
        "--reconstruct", "--reconstruct-steps", "3", "--reconstruct-lr", "0.01", "--calib", "stdlib",
        "--device", "cpu"])
    p = cli.experiment_from_args(args).prune
    assert (p.method, p.density, p.percdamp, p.blocksize, p.mask_blocksize) == ("wanda", 0.3, 0.05, 64, 32)
    assert (p.quant.bits, p.quant.groupsize, p.quant.mse, p.calibration_batch_size) == (3, 64, True, 2)
    assert (p.owl, p.owl_lambda, p.owl_m, p.owl_samples, p.exact_update) == (True, 0.1, 7.0, 3, True)
    assert (p.reconstruct, p.reconstruct_steps, p.reconstruct_lr) == (True, 3, 0.01)
    assert p.act_order and p.true_sequential is None and p.sequential_groups  # quantizing: both on


@pytest.mark.parametrize("flags, wbits, expected", [
    ([], None, (None, False)), ([], "4", (None, True)), (["--true-sequential"], None, (True, True)),
    (["--no-true-sequential"], "4", (False, False)), (["--no-act-order"], "4", (None, True))])
def test_true_sequential_flags_and_default(flags, wbits, expected):
    """True-sequential is on when quantizing unless --no-true-sequential, off when only pruning
    unless --true-sequential."""
    argv = ["prune", "--model", "org/name", "--density", "0.5", "--calib", "stdlib", "--device", "cpu"]
    argv += flags + (["--wbits", wbits] if wbits else [])
    p = cli.experiment_from_args(build_parser().parse_args(argv)).prune
    assert (p.true_sequential, p.sequential_groups) == expected
    assert p.act_order is ("--no-act-order" not in flags)


def test_iterative_runs_and_exits_zero(tiny_model_dir, tmp_path, stdlib_text_cached, capsys):
    """Defect: ``iterative`` exited 2 after every successful run (a DataFrame was returned)."""
    half = len(stdlib_text_cached) // 2
    train, held = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text(stdlib_text_cached[:half])
    held.write_text(stdlib_text_cached[half:])
    code, out, err = run(["iterative", "--model", str(tiny_model_dir), "--densities", "0.5",
                          "--calib-samples", "2", "--calib-seqlen", "32", "--train", str(train),
                          "--val-tokens", "64", "--train-steps", "1", "--batch-size", "1", "--seqlen", "32",
                          "--eval", str(held), "--eval-windows", "1", "--eval-seqlen", "32",
                          "--run-dir", str(tmp_path / "run"), "--results", str(tmp_path / "h.csv"),
                          "--plot", str(tmp_path / "plot"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "h.csv").is_file() and (tmp_path / "run" / "step_01").is_dir()


def test_iterative_carries_every_pruning_option(monkeypatch):
    from sparsegpt_utils import iterative

    class Stop(Exception):
        pass

    def capture(config, *args, **kwargs):
        raise Stop(config)

    monkeypatch.setattr(iterative, "run_iterative", capture)
    with pytest.raises(Stop) as stop:
        main(["iterative", "--model", "org/name", "--densities", "0.5,0.25", "--method", "wanda",
              "--wbits", "4", "--groupsize", "32", "--percdamp", "0.05", "--blocksize", "64",
              "--mask-blocksize", "64", "--owl", "--owl-m", "6", "--exact-update", "--fallback-text",
              "--reconstruct", "--lr-schedule", "cosine", "--warmup-steps", "3", "--adamw", "foreach",
              "--device", "cpu"])
    config = stop.value.args[0]
    p, ft = config.prune, config.finetune
    assert (ft.lr_schedule, ft.warmup_steps, ft.adamw, p.reconstruct) == ("cosine", 3, "foreach", True)
    assert config.densities == [0.5, 0.25] and config.fallback and config.device == "cpu"
    assert (p.method, p.quant.bits, p.quant.groupsize, p.percdamp, p.blocksize) == ("wanda", 4, 32, 0.05, 64)
    assert (p.owl, p.owl_m, p.exact_update) == (True, 6.0, True)


def test_prune_fallback_text_records_the_text_used(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", "")  # no data folder; the hub is offline
    argv = ["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--density", "0.5", "--eval",
            "wikitext2", "--eval-windows", "1", "--seqlen", "32", "--no-progress"]
    code, _, err = run(argv, capsys)
    assert code == 2 and error_line(err).startswith("error: --eval wikitext2: ")
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="stdlib"):
        code, _, err = run([*argv, "--fallback-text", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert (result["eval"], result["eval_requested"]) == ("stdlib", "wikitext2")


def test_sweep_dry_run_exits_zero(tmp_path, capsys):
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "1_SparseGPT.ipynb"
    code, out, err = run(["sweep", "--notebook", str(notebook), "--param",
                          "DENSITIES=[0.5],[0.3]", "--out-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 0, err
    assert "2 of 2 runs to do" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "sparsegpt_utils", "prune", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--density" in proc.stdout and "KEPT" in proc.stdout


@pytest.mark.slow  # lm-evaluation-harness indexes its task library: ~50 s
def test_eval_reports_zero_shot_tasks(tiny_model_dir, tmp_path, stdlib_text_cached, capsys):
    pytest.importorskip("lm_eval")
    text = tmp_path / "eval.txt"
    text.write_text(stdlib_text_cached[:20000])
    out = tmp_path / "e.json"
    code, _, err = run(["eval", "--model", str(tiny_model_dir), "--tasks", "tiny_mc", "--tasks-path",
                        str(TASKS), "--eval", str(text), "--eval-windows", "1", "--seqlen", "32",
                        "--json", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert 0 <= json.loads(out.read_text())["acc_tiny_mc"] <= 1


def test_prune_passes_the_task_options_to_zero_shot(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sparsegpt_utils import experiment

    calls = []
    monkeypatch.setattr(experiment, "zero_shot", lambda model, tok, tasks, **kw:
                        calls.append((tasks, kw)) or {"tiny_mc": {"acc": 0.25, "acc_norm": 0.5, "n": 2}})
    real = experiment.importlib.util.find_spec  # the harness counts as installed, wherever this runs
    monkeypatch.setattr(experiment.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "lm_eval" else real(name, *a))
    out = tmp_path / "p.json"
    argv = tiny_prune(tiny_model_dir, "--density", "0.5", "--tasks", "tiny_mc,other", "--tasks-path",
                      str(TASKS), "--tasks-limit", "2", "--json", str(out))
    code, _, err = run(argv, capsys)
    assert code == 0, err
    (tasks, kw), = calls
    assert tasks == ("tiny_mc", "other") and kw["limit"] == 2 and kw["task_paths"] == (str(TASKS),)
    result = json.loads(out.read_text())
    assert result["acc_tiny_mc"] == 0.25 and result["acc_norm_tiny_mc"] == 0.5


@pytest.mark.parametrize("argv,start", [
    (["--tasks", "arc easy!"], "error: tasks"),
    (["--tasks", "tiny_mc", "--tasks-limit", "0"], "error: tasks_limit"),
    (["--tasks", "tiny_mc", "--tasks-path", "/no/such/dir"], "error: --tasks-path /no/such/dir: "),
])
def test_bad_task_options_fail_before_loading(argv, start, bad_model_dirs, capsys):
    model = str(bad_model_dirs["empty"][0])
    code, _, err = run(["eval", "--model", model, "--eval", "stdlib", *argv], capsys)
    assert code == 2 and error_line(err).startswith(start)


def test_tasks_without_the_harness_is_one_line(bad_model_dirs, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, _, err = run(["eval", "--model", str(bad_model_dirs["empty"][0]), "--eval", "stdlib", "--tasks",
                        "tiny_mc"], capsys)
    assert code == 2 and "lm-evaluation-harness" in error_line(err)


def test_symmetric_quantized_prune_exports_to_compressed_tensors(tiny_model_dir, tmp_path, capsys):
    """What the README's CLI example does: prune with --wbits 4 --sym, export the checkpoint as
    a compressed-tensors folder; the row records the quantization settings (act-order on)."""
    pytest.importorskip("compressed_tensors")
    out, ckpt, exported = tmp_path / "r.json", tmp_path / "ckpt", tmp_path / "ct"
    code, _, err = run(tiny_prune(tiny_model_dir, "--density", "0.5", "--wbits", "4", "--sym",
                                  "--save", str(ckpt), "--json", str(out)), capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["wbits"] == 4 and result["sym"] is True and result["act_order"] is True
    assert "mse" not in result  # recorded only when on: rows from before the option stay comparable
    code, _, err = run(["export", str(ckpt), str(exported), "--format", "compressed-tensors"], capsys)
    assert code == 0, err
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    code, _, err = run(tiny_prune(tiny_model_dir, "--density", "0.5", "--sym"), capsys)
    assert code == 2 and "sym" in err and "wbits" in err


def test_mse_grids_are_a_recorded_setting(tiny_model_dir, tmp_path, capsys):
    """--mse searches each grid's clipping range: the row says so (and a row without it does
    not), and the quantized model is a different one."""
    rows = {}
    for name, more in (("minmax", []), ("mse", ["--mse"])):
        out = tmp_path / f"{name}.json"
        code, _, err = run(tiny_prune(tiny_model_dir, "--density", "1.0", "--wbits", "3", "--groupsize", "32",
                                      "--eval", "stdlib", "--eval-windows", "2", "--json", str(out), *more),
                           capsys)
        assert code == 0, err
        rows[name] = json.loads(out.read_text())
    assert rows["mse"]["mse"] is True and "mse" not in rows["minmax"]
    assert rows["mse"]["ppl"] != rows["minmax"]["ppl"]
