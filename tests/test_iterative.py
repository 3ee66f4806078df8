"""Iterative schedules: masks only shrink, the pattern survives fine-tuning, a stopped run
resumes to the same result without rewriting finished steps, OWL keeps the global density."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch

import sparsegpt_utils.prune as prune_mod
from sparsegpt_utils.finetune import FinetuneConfig
from sparsegpt_utils.iterative import (
    IterativeConfig,
    _save_step,
    check_no_overlap,
    cubic_schedule,
    run_iterative,
    training_text,
)
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.owl import block_params, outlier_ratios, owl_densities
from sparsegpt_utils.plots import plot_history
from sparsegpt_utils.prune import PruneConfig
from sparsegpt_utils.quant import QuantSpec
from sparsegpt_utils.save_utils import load_pruned
from tests.conftest import tiny_llama, tiny_opt


def _ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _config(**kw):
    base = dict(densities=[0.6, 0.35, 0.2], calib_samples=4, calib_seqlen=64, val_tokens=256, train_steps=2,
                eval_windows=2, eval_seqlen=128,
                finetune=FinetuneConfig(seqlen=64, batch_size=2, lr=5e-3, kd_weight=1.0, val_windows=2))
    base.update(kw)
    return IterativeConfig(**base)


def _run(run_dir, config=None, make=tiny_llama, **kw):
    return run_iterative(config or _config(), run_dir, model=make(), train_ids=_ids(6000, 0),
                         eval_ids=_ids(600, 1), progress=False, **kw)


def _zeros(folder):
    model, _ = load_pruned(folder / "model", dtype=torch.float32)
    return {n: m.weight.eq(0) for n, m in pruned_linears(model).items()}


def test_cubic_schedule():
    got = cubic_schedule(0.1, 4)
    ref = [1 - 0.9 * (1 - (1 - t / 4) ** 3) for t in range(1, 5)]
    assert got == pytest.approx(ref, abs=1e-6)
    assert got[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(got, got[1:], strict=False))
    assert IterativeConfig(densities=[0.1], cubic_steps=4).densities == got


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="densities must fall"):
        IterativeConfig(densities=[0.3, 0.5])
    with pytest.raises(ValueError, match="densities"):
        IterativeConfig(densities=[0.5, 0.0])
    with pytest.raises(ValueError, match="method"):
        IterativeConfig(prune={"method": "random"})
    with pytest.raises(ValueError, match="block_densities"):
        IterativeConfig(prune=PruneConfig(block_densities=[0.5, 0.5]))
    with pytest.raises(ValueError, match="steps"):
        cubic_schedule(0.1, 0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_schedule_masks_only_shrink_and_survive_finetuning(tmp_path, make):
    history = _run(tmp_path / "run", make=make)
    steps = history[history["step"] > 0]
    assert steps["density"].tolist() == pytest.approx([0.6, 0.35, 0.2], abs=2e-3)
    assert (steps["sparsity"] + steps["density"]).tolist() == pytest.approx([1, 1, 1])
    assert steps["masks_kept"].all() and (steps["finetune_steps"] == 2).all()
    # the evaluation protocol, not the calibration length, labels the perplexities
    assert (history["eval_seqlen"] == 128).all() and (history["seqlen"] == 64).all()
    assert history[["ppl_pruned", "ppl_finetuned"]].notna().all().all()
    zeros = [_zeros(tmp_path / "run" / f"step_{i:02d}") for i in (1, 2, 3)]
    for before, after in zip(zeros, zeros[1:], strict=False):  # a weight once pruned stays pruned
        assert all(torch.all(after[n][before[n]]) for n in before)
    saved = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(saved["step"]) == [0, 1, 2, 3]


def test_each_level_trains_on_fresh_windows(tmp_path, monkeypatch):
    """The fine-tuning between two pruning steps does not replay the previous level's windows."""
    import sparsegpt_utils.finetune as finetune_mod

    drawn = []
    draw = finetune_mod.training_windows

    def spy(*a, **k):
        windows = draw(*a, **k)
        drawn.append(windows.clone())
        return windows

    monkeypatch.setattr(finetune_mod, "training_windows", spy)
    _run(tmp_path / "run")
    assert len(drawn) == 3 * 2  # 3 levels × 2 optimizer steps
    levels = [torch.cat(drawn[i:i + 2]) for i in (0, 2, 4)]
    for a, b in zip(levels, levels[1:]):
        assert not torch.equal(a, b)


def test_resume_continues_without_rewriting(tmp_path):
    full = _run(tmp_path / "full")
    part = _run(tmp_path / "part", stop_after=1)
    assert list(part["step"]) == [0, 1]
    manifest = tmp_path / "part" / "step_01" / "model" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.read_bytes())
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "part" / f".step_02.tmp-{dead.pid}-x"  # the half-written step of a killed run
    (stale / "model").mkdir(parents=True)
    resumed = _run(tmp_path / "part")
    assert not stale.exists()
    assert (manifest.stat().st_mtime_ns, manifest.read_bytes()) == before  # finished step untouched
    assert list(resumed["step"]) == [0, 1, 2, 3]
    cols = ["density", "ppl_pruned", "ppl_finetuned"]  # same result as an uninterrupted run
    assert resumed[cols].to_numpy() == pytest.approx(full[cols].to_numpy(), rel=1e-5)


def test_resume_refuses_another_schedule(tmp_path):
    _run(tmp_path / "run", stop_after=1)
    with pytest.raises(ValueError, match="densities"):
        _run(tmp_path / "run", config=_config(densities=[0.5, 0.3]))


def test_finished_step_is_never_overwritten(tmp_path):
    model = tiny_llama()
    masks = {n: m.weight.ne(0) for n, m in pruned_linears(model).items()}
    _save_step(model, tmp_path / "step_01", masks, {"step": 1})
    with pytest.raises(FileExistsError):
        _save_step(model, tmp_path / "step_01", masks, {"step": 1})
    assert json.loads((tmp_path / "step_01" / "step.json").read_text()) == {"step": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_training_text_never_overlaps_evaluation(tmp_path):
    text = "".join(f"line {i} of some evaluation text that is long enough.\n" for i in range(400))
    with pytest.raises(ValueError, match="overlaps"):
        check_no_overlap("prefix " + text[1000:9000], text[1000:9000])
    check_no_overlap("completely different training words " * 300, text)
    with pytest.raises(ValueError, match="stdlib"):
        training_text("stdlib")
    path = tmp_path / "train.txt"
    path.write_text("a\r\nb")
    assert training_text(str(path)) == "a\nb"


def test_owl_densities_keep_global_density():
    ratios = [0.01, 0.03, 0.02, 0.08]
    for density in (0.5, 0.2, 0.1):
        d = owl_densities(ratios, density, lam=0.08, params=[1, 1, 1, 1])
        assert sum(d) / 4 == pytest.approx(density)
        assert all(0 < x <= 1 for x in d)
        assert sorted(range(4), key=d.__getitem__) == sorted(range(4), key=ratios.__getitem__)
    weighted = owl_densities(ratios, 0.3, params=[1, 2, 3, 4])
    assert sum(w * x for w, x in zip([1, 2, 3, 4], weighted, strict=True)) / 10 == pytest.approx(0.3)
    # falling global density: every block's density falls (masks that only shrink stay feasible)
    prev = owl_densities(ratios, 0.6)
    for density in (0.5, 0.3, 0.2, 0.1, 0.05):
        now = owl_densities(ratios, density)
        assert all(b < a for a, b in zip(prev, now, strict=True))
        prev = now
    assert owl_densities([0.02] * 3, 0.4) == [0.4] * 3


def _with_outliers_in_block_1():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # a few large input columns in every linear layer of block 1
        for n, m in pruned_linears(model).items():
            if "layers.1." in n:
                m.weight[:, :4] *= 20
    return model


def test_outlier_ratios_brute_force():
    model = _with_outliers_in_block_1()
    calib = _ids(3 * 32, 2).reshape(3, 32)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.setdefault(n, []).append(i[0].detach()))
             for n, m in pruned_linears(model).items()]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    ref = []
    for b in range(3):
        scores = []
        for n, m in pruned_linears(model).items():
            if f"layers.{b}." in n:
                x = torch.cat([t.reshape(-1, m.in_features) for t in inputs[n]]).double()
                scores.append((m.weight.double().abs() * x.norm(dim=0)[None]).flatten())
        s = torch.cat(scores)
        ref.append(float((s > 5 * s.mean()).double().mean()))
    got = outlier_ratios(model, calib, 5.0, progress=False)
    assert got == pytest.approx(ref, abs=1e-4)
    assert got[1] == max(got)


def test_owl_run_reaches_global_density(tmp_path):
    model = _with_outliers_in_block_1()
    history = run_iterative(_config(prune=PruneConfig(owl=True), densities=[0.5, 0.3]), tmp_path / "owl",
                            model=model,
                            train_ids=_ids(6000, 0), eval_ids=_ids(600, 1), progress=False)
    assert history["density"].iloc[1:].tolist() == pytest.approx([0.5, 0.3], abs=2e-3)
    model, _ = load_pruned(tmp_path / "owl" / "step_02" / "model", dtype=torch.float32)
    layers = pruned_linears(model).items()
    per_block = [sum(int(m.weight.ne(0).sum()) for n, m in layers if f"layers.{b}." in n) for b in range(3)]
    dens = [k / p for k, p in zip(per_block, block_params(model), strict=True)]
    assert dens[1] == max(dens) and max(dens) - min(dens) > 0.05


def test_plot_history_writes_png_and_svg(tmp_path):
    history = pd.DataFrame({"step": [0, 1], "sparsity": [0.0, 0.5], "ppl_pruned": [10.0, 14.0],
                            "ppl_finetuned": [10.0, 12.0]})
    plot_history(history, tmp_path / "fig", one_shot=pd.DataFrame({"sparsity": [0.5], "ppl": [15.0]}))
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.svg").stat().st_size > 0


def _spy_solver(monkeypatch):
    """Record the settings of every SparseGPT solve (per level: one call per layer group)."""
    calls = []
    solve = prune_mod.sparsegpt_solve

    def spy(weight, hessian, density, nm, quant, blocksize, mask_blocksize, percdamp, **kw):
        calls.append({"density": density, "nm": nm, "bits": None if quant is None else quant.bits,
                      "blocksize": blocksize, "mask_blocksize": mask_blocksize, "percdamp": percdamp,
                      "prior": kw.get("prior_mask") is not None})
        return solve(weight, hessian, density, nm, quant, blocksize, mask_blocksize, percdamp, **kw)

    monkeypatch.setattr(prune_mod, "sparsegpt_solve", spy)
    return calls


def test_every_pruning_setting_is_carried_to_every_level(tmp_path, monkeypatch):
    calls = _spy_solver(monkeypatch)
    prune = PruneConfig(quant=QuantSpec(4), percdamp=0.05, blocksize=32, mask_blocksize=16)
    history = _run(tmp_path / "run", _config(prune=prune, densities=[0.6, 0.3], train_steps=1))
    per_level = len(calls) // 2
    assert len(calls) == 2 * per_level and per_level > 0
    for level, density in enumerate([0.6, 0.3]):
        for call in calls[level * per_level:(level + 1) * per_level]:
            assert call == {"density": density, "nm": None, "bits": 4, "blocksize": 32, "mask_blocksize": 16,
                            "percdamp": 0.05, "prior": level > 0}
    assert (history["wbits"] == 4).all() and (history["percdamp"] == 0.05).all()
    assert (history["blocksize"] == 32).all() and (history["mask_blocksize"] == 16).all()
    # the same setting keys as a one-shot row: act-order and the grid's symmetry too
    assert history["act_order"].eq(True).all() and history["sym"].eq(False).all()
    # every level's saved model is quantized: each row's weights on a 16-level grid, masks nested
    before = None
    for level in (1, 2):
        model, _ = load_pruned(tmp_path / "run" / f"step_{level:02d}" / "model", dtype=torch.float32)
        zeros = {}
        for name, layer in pruned_linears(model).items():
            for row in layer.weight:
                assert row.unique().numel() <= 16, (level, name)
            zeros[name] = layer.weight.eq(0)
        if before is not None:
            assert all(torch.all(zeros[n][before[n]]) for n in before)
        before = zeros
    manifest = json.loads((tmp_path / "run" / "step_02" / "model" / "manifest.json").read_text())
    assert manifest["avg_bits"] is not None and manifest["avg_bits"] < 16


def test_nm_is_the_last_level(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"densities\[-1\] must be 2/4"):
        IterativeConfig(densities=[0.6, 0.3], prune=PruneConfig(nm="2:4"))
    calls = _spy_solver(monkeypatch)
    _run(tmp_path / "run", _config(densities=[0.75, 0.5], prune=PruneConfig(nm="2:4"), train_steps=1))
    assert {c["nm"] for c in calls[:len(calls) // 2]} == {None}
    assert {c["nm"] for c in calls[len(calls) // 2:]} == {(2, 4)}
    first, last = _zeros(tmp_path / "run" / "step_01"), _zeros(tmp_path / "run" / "step_02")
    for name in first:
        assert torch.all(last[name][first[name]])  # masks only shrink
        kept = (~last[name]).reshape(last[name].shape[0], -1, 4).sum(-1)
        assert kept.max() <= 2  # at most 2 of every 4 consecutive input weights


def test_old_run_configs_are_read_and_changed_settings_refused(tmp_path):
    old = IterativeConfig.from_dict({"model": "m", "densities": [0.5, 0.3], "method": "wanda", "owl": True,
                                     "owl_lambda": 0.1, "owl_threshold": 7.0, "finetune": {"kd_weight": 1.0}})
    prune = old.prune
    assert (prune.method, prune.owl, prune.owl_lambda, prune.owl_m) == ("wanda", True, 0.1, 7.0)
    with pytest.raises(ValueError, match="unknown"):
        IterativeConfig.from_dict({"densities": [0.5], "no_such_field": 1})
    # a run saved in the old layout resumes with the same settings, refuses other ones
    quick = dict(densities=[0.6, 0.3], train_steps=1)
    _run(tmp_path / "run", _config(**quick), stop_after=1)
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    prune = saved.pop("prune")
    saved.update(method=prune["method"], owl=False, owl_lambda=0.08, owl_threshold=5.0)
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="prune.percdamp=0.01, now 0.02"):
        _run(tmp_path / "run", config=_config(prune=PruneConfig(percdamp=0.02), **quick))
    assert list(_run(tmp_path / "run", _config(**quick))["step"]) == [0, 1, 2]


class CharTokenizer:
    """One token per character (ids < 128, the tiny models' vocabulary); saves nothing."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, return_tensors="pt"):
        return self._Out(torch.tensor([[ord(c) % 128 for c in text]], dtype=torch.long))

    def save_pretrained(self, folder):
        pass


def test_offline_fallback_trains_and_evaluates_on_disjoint_text(tmp_path, monkeypatch, capsys):
    from sparsegpt_utils.data import DataNotFoundError

    monkeypatch.setenv("SPARSEGPT_DATA_DIR", "")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(densities=[0.5], train_steps=1)
    with pytest.raises(DataNotFoundError, match="wikitext2-valid"):
        run_iterative(config, tmp_path / "strict", model=tiny_llama(), tokenizer=CharTokenizer(),
                      progress=False)
    config = _config(densities=[0.5], train_steps=1, fallback=True)
    # the overlap check inside the run refuses a training text holding the evaluation text
    history = run_iterative(config, tmp_path / "run", model=tiny_llama(), tokenizer=CharTokenizer(),
                            progress=False)
    out = capsys.readouterr().out
    assert "WikiText-2 validation not found" in out and "WikiText-2 test not found" in out
    assert (history["calib"] == "stdlib").all() and (history["calib_requested"] == "wikitext2-valid").all()
    assert (history["eval"] == "stdlib").all() and (history["eval_requested"] == "wikitext2").all()
    assert history["ppl_finetuned"].notna().all()
