"""Experiment is composed of the pipeline's configs; each config checks itself; notebook 1's
parameters (new and older names, lists given as strings) become experiments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsegpt_utils import experiment
from sparsegpt_utils.experiment import (
    CalibConfig,
    EvalConfig,
    Experiment,
    InputError,
    OutputConfig,
    resolve_device,
    resolve_texts,
    run_experiment,
)
from sparsegpt_utils.notebook import experiments_from_parameters, parse_list_parameter
from sparsegpt_utils.prune import PruneConfig, prune_setting_keys

NOTEBOOK1 = Path(__file__).resolve().parents[1] / "notebooks" / "1_SparseGPT.ipynb"


@pytest.mark.parametrize("make,needle", [
    (lambda: CalibConfig(samples=0), "calib_samples"),
    (lambda: CalibConfig(seqlen=1), "seqlen"),
    (lambda: CalibConfig(seed=-1), "seed"),
    (lambda: CalibConfig(source="/no/such.txt"), "calib /no/such.txt"),
    (lambda: EvalConfig(windows=0), "eval_windows"),
    (lambda: EvalConfig(source="nowhere"), "eval nowhere"),
    (lambda: OutputConfig(json=3), "json"),
    (lambda: Experiment(model="not-a-model"), "model not-a-model"),
    (lambda: Experiment(dtype="int3"), "dtype"),
    (lambda: Experiment(prune=PruneConfig(nm="2:3")), "multiple of M=3"),
    (lambda: Experiment.from_settings({"prune.density": 0.5, "prune.sparsity": 0.5}), "not both"),
    (lambda: Experiment.from_settings({"prune.sparsity": 1.0}), "sparsity"),
    (lambda: Experiment.from_settings({"prune.percdamp": 0.01, "prune.damping": 1}), "prune.damping"),
    (lambda: Experiment.from_settings({"quant.groupsize": 64}), "groupsize"),
])
def test_each_config_names_the_bad_parameter(make, needle):
    with pytest.raises(ValueError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for bad in ("cuda", "cuda:1", "tpu"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Experiment(device="cuda")


def test_settings_map_onto_the_configs():
    exp = Experiment.from_settings({
        "model": "org/name", "prune.method": "wanda", "prune.sparsity": 0.75, "prune.blocksize": 64,
        "mixed.target_avg_bits": 3.5, "quant.groupsize": 32, "calib.source": "stdlib", "calib.samples": 4,
        "eval.source": None, "output.json": "r.json", "device": "cpu", "progress": False})
    assert exp.prune.method == "wanda" and exp.prune.density == pytest.approx(0.25) and exp.density == 0.25
    assert exp.prune.mixed.target_avg_bits == 3.5 and exp.prune.quant.bits == 4  # mixed: a 4-bit base grid
    assert exp.prune.quant.groupsize == 32 and exp.prune.blocksize == 64
    assert (exp.calib.source, exp.calib.samples) == ("stdlib", 4)
    assert exp.eval.source is None and exp.output.json == "r.json"
    nm = Experiment.from_settings({"prune.nm": "2:4", "prune.density": None})
    assert nm.prune.nm == (2, 4) and nm.density is None


def test_run_uses_the_prune_config_as_is_and_records_both_density_and_sparsity(tiny_model_dir, monkeypatch):
    seen = []
    real = experiment.prune_model
    monkeypatch.setattr(experiment, "prune_model", lambda model, calib, config, **kw:
                        seen.append(config) or real(model, calib, config, **kw))
    prune = PruneConfig(method="sparsegpt", density=0.4, blocksize=32, mask_blocksize=32)
    exp = Experiment(model=str(tiny_model_dir), prune=prune, calib=CalibConfig("stdlib", 4, 64),
                     eval=EvalConfig("stdlib", windows=2), device="cpu", progress=False,
                     extra={"note": "x"})
    result, pruned, model = run_experiment(exp)
    assert seen == [prune] and seen[0] is prune  # no field-by-field copy
    assert result["density"] == 0.4 and result["sparsity"] == pytest.approx(0.6)
    assert result["blocksize"] == 32 and result["note"] == "x" and result["eval_windows"] == 2
    assert {k: result[k] for k in prune_setting_keys(prune)} == prune_setting_keys(prune)
    assert abs(result["density_achieved"] - 0.4) < 0.01


def test_missing_text_falls_back_only_when_asked_and_the_row_says_so(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))  # no WikiText-2 here; the hub is offline
    strict = Experiment(model=str(tiny_model_dir), prune=PruneConfig(method="magnitude", density=0.5),
                        eval=EvalConfig("wikitext2", windows=1), device="cpu", progress=False)
    with pytest.raises(InputError) as err:
        resolve_texts(strict)
    assert err.value.parameter == "eval" and err.value.value == "wikitext2"
    exp = Experiment(model=str(tiny_model_dir), prune=PruneConfig(method="wanda", density=0.5),
                     calib=CalibConfig("wikitext2-valid", 2, 32, fallback=True),
                     eval=EvalConfig("wikitext2", windows=1, fallback=True), device="cpu", progress=False)
    with pytest.warns(UserWarning, match="stdlib"):
        result, _, _ = run_experiment(exp)
    assert (result["calib"], result["calib_requested"]) == ("stdlib", "wikitext2-valid")
    assert (result["eval"], result["eval_requested"]) == ("stdlib", "wikitext2")


@pytest.mark.parametrize("value,expected", [
    ("[0.5, 0.2]", [0.5, 0.2]), ("0.5, 0.2", [0.5, 0.2]), ("0.3", [0.3]), (0.3, [0.3]),
    ((0.5, 0.1), [0.5, 0.1]), ([0.5], [0.5]),
])
def test_list_parameters_given_as_strings_are_parsed(value, expected):
    assert parse_list_parameter("DENSITIES", value) == expected


def test_unparseable_list_parameter_names_it():
    with pytest.raises(ValueError, match="SPARSENESS_LIST"):
        parse_list_parameter("SPARSENESS_LIST", "[0.5, oops]")


def test_older_parameter_names_are_accepted():
    old = experiments_from_parameters({"SPARSENESS_LIST": "[0.5, 0.2]", "EPSILON": 0.05, "B": 64, "Bs": 32,
                                       "CALIB_SOURCE": "stdlib", "DEVICE": "cpu"})
    assert [e.density for e in old] == [0.5, 0.2]
    assert {(e.prune.percdamp, e.prune.blocksize, e.prune.mask_blocksize) for e in old} == {(0.05, 64, 32)}
    assert [e.density for e in experiments_from_parameters({"SPARSITIES": [0.1], "DEVICE": "cpu"})] == [0.1]
    nm = experiments_from_parameters({"NM": "2:4", "DENSITIES": [0.5, 0.3], "DEVICE": "cpu"})
    assert len(nm) == 1 and nm[0].prune.nm == (2, 4)
    with pytest.raises(ValueError, match="DENSITIES"):
        experiments_from_parameters({"DENSITIES": [], "DEVICE": "cpu"})


def _prepared_parameters(tmp_path, *options) -> dict:
    """Notebook 1's parameters after papermill injected ``options`` (papermill --prepare-only:
    parameters applied, nothing executed), as the notebook's own cells define them."""
    import nbformat

    out = tmp_path / "prepared.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOK1), str(out), "--prepare-only",
                           "--log-level", "ERROR", *options], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    namespace: dict = {}
    for cell in nbformat.read(out, as_version=4).cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            exec(cell.source, namespace)
    return namespace


def test_papermill_string_lists_reach_notebook1_as_lists(tmp_path):
    """Defect: ``-p SPARSENESS_LIST "[0.5, 0.2]"`` made the notebook iterate over characters."""
    params = _prepared_parameters(tmp_path, "-p", "SPARSENESS_LIST", "[0.5, 0.2]", "-p", "EPSILON", "0.02",
                                  "-p", "DEVICE", "cpu")
    assert params["SPARSENESS_LIST"] == "[0.5, 0.2]"  # what papermill hands over: a string
    runs = experiments_from_parameters(params)
    assert [r.density for r in runs if r.prune.method == "sparsegpt"] == [0.5, 0.2]
    assert {r.prune.percdamp for r in runs} == {0.02}
    defaults = experiments_from_parameters(_prepared_parameters(tmp_path, "-p", "DEVICE", "cpu"))
    assert [(r.prune.method, r.density) for r in defaults] == [
        (m, d) for d in (0.5, 0.3) for m in ("sparsegpt", "wanda", "magnitude")]
    assert defaults[0].model == "smollm2-135m"
    assert defaults[0].eval.fallback and defaults[0].calib.fallback


def test_notebook1_compares_methods_at_each_density_with_the_same_settings():
    runs = experiments_from_parameters({"METHOD": "sparsegpt", "COMPARE_WITH": "['wanda', 'magnitude']",
                                        "DENSITIES": [0.5, 0.3], "percdamp": 0.05, "DEVICE": "cpu"})
    assert [(r.prune.method, r.density) for r in runs] == [
        ("sparsegpt", 0.5), ("wanda", 0.5), ("magnitude", 0.5),
        ("sparsegpt", 0.3), ("wanda", 0.3), ("magnitude", 0.3)]
    assert {r.prune.percdamp for r in runs} == {0.05}
    one = experiments_from_parameters({"METHOD": "wanda", "COMPARE_WITH": "sparsegpt", "DEVICE": "cpu"})
    assert [r.prune.method for r in one] == ["wanda", "sparsegpt"]
    assert [r.prune.method for r in experiments_from_parameters({"COMPARE_WITH": [], "DEVICE": "cpu"})] == \
        ["sparsegpt"]
    with pytest.raises(ValueError, match="method"):
        experiments_from_parameters({"COMPARE_WITH": ["wandaa"], "DEVICE": "cpu"})


def test_notebook1_quantization_parameters_reach_the_prune_config(tmp_path):
    params = _prepared_parameters(tmp_path, "-p", "DEVICE", "cpu", "-p", "wbits", "4", "-p", "groupsize",
                                  "128", "-p", "target_avg_bits", "4.03", "-p", "mixed_unit", "row",
                                  "-p", "act_order", "False", "-p", "true_sequential", "True")
    prune = experiments_from_parameters({**params, "COMPARE_WITH": []})[0].prune
    assert (prune.act_order, prune.true_sequential) == (False, True)
    assert prune.mixed.unit == "row" and prune.mixed.target_avg_bits == 4.03 and prune.quant.groupsize == 128
    quantized = _prepared_parameters(tmp_path, "-p", "DEVICE", "cpu", "-p", "wbits", "4")
    defaults = experiments_from_parameters({**quantized, "COMPARE_WITH": []})[0].prune
    assert (defaults.act_order, defaults.true_sequential, defaults.mixed) == (True, None, None)
    assert defaults.sequential_groups  # on when quantizing
    pruned_only = experiments_from_parameters({**_prepared_parameters(tmp_path, "-p", "DEVICE", "cpu"),
                                               "COMPARE_WITH": []})[0].prune
    assert pruned_only.quant is None and not pruned_only.sequential_groups
    with pytest.raises(ValueError, match="groupsize"):
        experiments_from_parameters({**params, "groupsize": None, "mixed_unit": "group"})


def test_notebook1_declares_one_parameters_cell_with_new_and_older_names():
    import nbformat

    cells = [c for c in nbformat.read(NOTEBOOK1, as_version=4).cells
             if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    for name in ("DENSITIES", "percdamp", "blocksize", "mask_blocksize", "OWL", "EXACT_UPDATE",
                 "RECONSTRUCT", "COMPARE_WITH", "SPARSENESS_LIST", "SPARSITIES", "EPSILON", "B", "Bs",
                 "RESULT_JSON", "act_order", "true_sequential", "mixed_unit"):
        assert f"\n{name} = " in "\n" + cells[0].source, name
    assert "KEPT" in cells[0].source


def test_result_json_round_trips(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    exp = Experiment(model=str(tiny_model_dir), prune=PruneConfig(method="magnitude", density=0.5),
                     eval=EvalConfig(None), output=OutputConfig(json=str(out)), device="cpu", progress=False)
    result, _, _ = run_experiment(exp)
    saved = json.loads(out.read_text())
    assert saved["density"] == 0.5 and saved["calib"] is None and saved["eval"] is None
    assert saved["density_achieved"] == pytest.approx(result["density_achieved"])


def test_notebook1_runs_offline_on_the_fallback_text_and_says_so_first(tiny_model_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """What ``make demo`` does on a fresh machine with no data folder: the stdlib text stands in,
    the first output line says so, and the rows record the text used."""
    from sparsegpt_utils.notebook import run_sparsity_list

    monkeypatch.setenv("SPARSEGPT_DATA_DIR", "")  # set but empty: no data folder; the hub is offline
    runs = experiments_from_parameters({
        "model_name": str(tiny_model_dir), "DENSITIES": "[0.4]", "calibration_size": 2, "token_length": 32,
        "CALIB_SOURCE": "wikitext2-valid", "EVAL_SOURCE": "wikitext2", "EVAL_WINDOWS": 1,
        "FALLBACK_TEXT": True, "DEVICE": "cpu", "SHOW_PROGRESS": False})
    table, reports = run_sparsity_list(runs, pruned_dir=tmp_path / "pruned", results_csv=tmp_path / "r.csv")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("note: ") and "stdlib" in first
    assert list(table["calib"]) == ["stdlib"] and list(table["eval_requested"]) == ["wikitext2"]
    assert list(table["density"]) == [0.4] and len(reports) == 1
    assert table["ppl_dense"].notna().all() and (tmp_path / "pruned").is_dir()
