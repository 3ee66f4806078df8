"""The command line: bad input fails before any work with a message naming the parameter;
a whole prune → eval → JSON round on a local model folder."""

import json
import subprocess
import sys

import pytest

from sparsegpt_utils.cli import main
from sparsegpt_utils.data import DataNotFoundError, load_text


@pytest.mark.parametrize("argv,needle", [
    (["--density", "0"], "density"),
    (["--density", "1.5"], "density"),
    (["--nm", "4:2"], "N:M"),
    (["--nm", "two:four"], "N:M"),
    (["--density", "0.5", "--calib", "/no/such/file.txt"], "calib"),
    (["--density", "0.5", "--model", "not-a-model"], "model"),
    (["--density", "0.5", "--calib-samples", "0"], "calib_samples"),
    (["--density", "0.5", "--wbits", "1"], "wbits"),
    (["--density", "0.5", "--target-avg-bits", "9"], "target_avg_bits"),
])
def test_bad_input_fails_fast_naming_the_parameter(argv, needle, capsys):
    assert main(["prune", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--density", "0.5", "--method", "obs"])
    assert "method" in capsys.readouterr().err


def test_missing_text_names_path_data_dir_and_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_text("ptb", "test")
    text = str(err.value)
    assert "file path" in text and str(tmp_path) in text and "hub" in text


def test_prune_and_eval_round_trip(tiny_model_dir, tmp_path):
    out, ckpt = tmp_path / "r.json", tmp_path / "ckpt"
    args = ["prune", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--density", "0.4",
            "--calib", "stdlib", "--calib-samples", "4", "--seqlen", "64", "--eval", "stdlib",
            "--eval-windows", "3", "--eval-dense", "--save", str(ckpt), "--json", str(out),
            "--no-progress"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for key in ("model", "method", "density", "nm", "wbits", "groupsize", "density_achieved",
                "avg_bits", "calib", "calib_samples", "seqlen", "seed", "eval", "eval_windows",
                "ppl", "ppl_dense", "prune_seconds", "peak_rss_mb", "peak_gpu_mb", "size_bytes",
                "dense_size_bytes", "versions"):
        assert key in result, key
    assert abs(result["density_achieved"] - 0.4) < 0.01
    assert result["eval_windows"] == 3 and result["ppl"] > 1 and result["ppl_dense"] > 1
    assert result["eval_seqlen"] == 64  # the evaluation protocol is recorded with the result
    assert 0 < result["size_bytes"]

    again = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--eval", "stdlib", "--eval-windows", "3",
                 "--seqlen", "64", "--json", str(again), "--no-progress"]) == 0
    reloaded = json.loads(again.read_text())
    assert reloaded["ppl"] == pytest.approx(result["ppl"], rel=1e-4)
    assert reloaded["density_achieved"] == pytest.approx(result["density_achieved"], abs=1e-6)


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "sparsegpt_utils", "prune", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--density" in proc.stdout and "KEPT" in proc.stdout
