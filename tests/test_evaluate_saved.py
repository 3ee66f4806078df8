"""Notebook 3's default: each saved checkpoint measured on the windows its own run recorded."""

from __future__ import annotations

import pytest
import torch

from sparsegpt_utils.checkpoint import save_pruned
from sparsegpt_utils.data import eval_tokens
from sparsegpt_utils.evaluate import evaluate_as_saved, perplexity, saved_settings
from sparsegpt_utils.models import load_model, pruned_linears
from sparsegpt_utils.results import model_slug


def _save(model_dir, root, density: float, meta: dict):
    """A checkpoint of the tiny model with each pruned layer cut to ``density`` by magnitude."""
    model, tok = load_model(str(model_dir))
    masks = {}
    with torch.no_grad():
        for name, layer in pruned_linears(model).items():
            w = layer.weight
            keep = int(round(density * w.numel()))
            cut = w.abs().flatten().kthvalue(w.numel() - keep).values
            masks[name] = w.abs() > cut
            w.mul_(masks[name])
    folder = root / f"{model_slug(str(model_dir))}_sparsegpt_d{density:g}"
    save_pruned(model, folder, tok, masks, metadata={"model": str(model_dir), "density": density, **meta},
                progress=False)
    return model, tok


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, stdlib_text_cached):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(stdlib_text_cached[:40_000], encoding="utf-8")
    return path


def test_each_checkpoint_is_measured_on_its_own_recorded_windows(tiny_model_dir, tmp_path, text_file):
    root = tmp_path / "pruned"
    calib = {"calib": "stdlib", "calib_samples": 4, "seqlen": 64, "seed": 0}
    half, tok = _save(tiny_model_dir, root, 0.5, {**calib, "eval": str(text_file), "eval_windows": 2,
                                                  "eval_seqlen": 32})
    third, _ = _save(tiny_model_dir, root, 0.3, {**calib, "seqlen": 128, "eval": str(text_file),
                                                 "eval_windows": 3, "eval_seqlen": 48})
    assert saved_settings(root / f"{model_slug(str(tiny_model_dir))}_sparsegpt_d0.5") == {
        **calib, "eval": str(text_file), "eval_windows": 2, "eval_seqlen": 32}
    # the arguments count only where a checkpoint records nothing: these would give other numbers
    table, layers, notes = evaluate_as_saved(str(tiny_model_dir), "sparsegpt", [0.5, 0.3, 0.2, 1.0],
                                             root=root, sources=(), eval_windows=5, seqlen=16, progress=False)
    assert notes == [f"missing: no checkpoint {model_slug(str(tiny_model_dir))}_sparsegpt_d0.2 in pruned/"]
    rows = table.set_index(["density", "eval_seqlen"])
    for net, density, windows, length in [(half, 0.5, 2, 32), (third, 0.3, 3, 48)]:
        expected = perplexity(net, eval_tokens(tok, str(text_file), seqlen=length), length, windows,
                              progress=False).ppl
        row = rows.loc[(density, length)]
        assert row["eval_windows"] == windows and row["ppl"] == pytest.approx(expected, rel=1e-4)
        assert row["calib_samples"] == 4 and row["seqlen"] == (64 if density == 0.5 else 128)
    dense, _ = load_model(str(tiny_model_dir))
    for windows, length in [(2, 32), (3, 48)]:  # the dense model on each set of windows
        expected = perplexity(dense, eval_tokens(tok, str(text_file), seqlen=length), length, windows,
                              progress=False).ppl
        assert rows.loc[(1.0, length), "ppl"] == pytest.approx(expected, rel=1e-4)
        assert rows.loc[(1.0, length), "checkpoint"] == "(dense model)"
    assert sorted(layers["target_density"].unique()) == [0.3, 0.5, 1.0]
    assert layers.groupby("target_density").size().nunique() == 1  # the dense layers once, not twice


def test_without_checkpoints_the_dense_model_uses_the_given_windows(tiny_model_dir, tmp_path, text_file):
    table, _, notes = evaluate_as_saved(str(tiny_model_dir), "sparsegpt", [1.0], root=tmp_path,
                                        sources=(str(text_file),), eval_windows=2, seqlen=32, progress=False)
    assert notes == [] and len(table) == 1
    assert table.loc[0, "eval_windows"] == 2 and table.loc[0, "eval_seqlen"] == 32
    with pytest.raises(ValueError, match="densities"):
        evaluate_as_saved(str(tiny_model_dir), "sparsegpt", [1.5], root=tmp_path)
