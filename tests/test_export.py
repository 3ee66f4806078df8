"""Models that leave the notebook: `export` (dense, compressed-tensors), the model card, push_to_hub."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from sparsegpt_utils.checkpoint import (
    CheckpointError,
    add_cli_arguments,
    checkpoint_bytes,
    cli_main,
    export_checkpoint,
    load_pruned,
    push_to_hub,
    read_manifest,
    save_pruned,
)
from sparsegpt_utils.evaluate import perplexity
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.quant import QuantSpec, rtn_quantize
from sparsegpt_utils.solver import magnitude_mask
from tests.conftest import tiny_llama, tiny_opt
from tests.test_save_utils import assert_same_state, prune

IDS = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="export")
    add_cli_arguments(parser)
    return parser.parse_args(list(argv))


@torch.no_grad()
def quantized(model, spec: QuantSpec, density: float = 0.5):
    """Magnitude masks + round-to-nearest on ``spec`` in place -> (masks, grids)."""
    masks, grids = {}, {}
    for name, layer in pruned_linears(model).items():
        mask = magnitude_mask(layer.weight, density)
        w, grids[name] = rtn_quantize(layer.weight * mask, spec)
        layer.weight.copy_(w * mask)
        masks[name] = mask
    return masks, grids


# --- dense ----------------------------------------------------------------------------------------

def test_dense_export_in_each_dtype_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, dtype="float32", progress=False)
    sizes = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out = tmp_path / f"dense-{dtype}"
        assert cli_main(parse(str(tmp_path / "ck"), str(out), "--dtype", dtype)) == 0
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config and not (out / "manifest.json").exists()
        back = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert back.dtype == getattr(torch, dtype)
        assert_same_state(back, load_pruned(tmp_path / "ck", dtype=dtype)[0])
        sizes[dtype] = (out / "model.safetensors").stat().st_size
        card = (out / "README.md").read_text()
        assert "dense" in card and "sparsity" in card
    assert sizes["bfloat16"] == pytest.approx(sizes["float32"] / 2, rel=0.02)
    assert sizes["float16"] == pytest.approx(sizes["bfloat16"], abs=64)  # (header: dtype names)


def test_export_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(parse(str(tmp_path / "nothing"), str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        parse("a", "b", "--dtype", "int8")
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parse("a", "b", "--format", "gguf")


# --- compressed-tensors -----------------------------------------------------------------------------

SCHEMES = {"w4-channel": QuantSpec(4, sym=True), "w4-g16": QuantSpec(4, groupsize=16, sym=True),
           "w8-channel": QuantSpec(8, sym=True)}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_compressed_tensors_export_has_the_same_weights_and_perplexity(tmp_path, scheme, make):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = make()
    masks, grids = quantized(model, SCHEMES[scheme])
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, dtype="float32", progress=False)
    report = export_checkpoint(tmp_path / "ck", tmp_path / "ct", "compressed-tensors", "float32")
    assert report["format"] == "compressed-tensors" and "zero codes" in report["note"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    reference, _ = load_pruned(tmp_path / "ck")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert (perplexity(packed, IDS, 64, progress=False).nll
            == perplexity(reference, IDS, 64, progress=False).nll)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state = dense.state_dict()
    for key, weight in reference.state_dict().items():
        assert torch.equal(state[key], weight), key
    assert checkpoint_bytes(tmp_path / "ct") < checkpoint_bytes(tmp_path / "ck") * 3
    assert "compressed-tensors" in (tmp_path / "ct" / "README.md").read_text()


@pytest.mark.parametrize("setting,why", [
    ("d0.5", "not quantized"),
    ("d0.5+3/4bit-g16", "mixed precision"),
    ("asym", "asymmetric"),
])
def test_compressed_tensors_refuses_what_it_cannot_express(tmp_path, capsys, setting, why):
    pytest.importorskip("compressed_tensors")
    model = tiny_llama()
    if setting == "asym":
        masks, grids = quantized(model, QuantSpec(4, sym=False))
    else:
        masks, grids = prune(model, setting)
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    code = cli_main(parse(str(tmp_path / "ck"), str(tmp_path / "ct"), "--format", "compressed-tensors"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and why in err and "--allow-densify" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ct").exists()
    # asked for explicitly: a dense folder, and it says so
    code = cli_main(parse(str(tmp_path / "ck"), str(tmp_path / "ct"), "--format", "compressed-tensors",
                          "--allow-densify"))
    out = capsys.readouterr().out
    assert code == 0 and "densified" in out and why in out
    assert "densified" in (tmp_path / "ct" / "README.md").read_text()
    assert (tmp_path / "ct" / "model.safetensors").is_file()


# --- the model card -----------------------------------------------------------------------------------

METADATA = {"model": "HuggingFaceTB/SmolLM2-135M", "method": "sparsegpt", "density": 0.5, "wbits": 4,
            "ppl": 23.456, "ppl_dense": 20.1, "eval": "wikitext2", "seqlen": 2048, "eval_windows": 32,
            "calib": "c4", "calib_samples": 128, "seed": 0}


def test_every_checkpoint_has_a_model_card(tmp_path):
    model = tiny_llama()
    masks, grids = prune(model, "d0.5+4bit")
    manifest = save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, metadata=METADATA,
                           progress=False)
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "README.md" in manifest["files"]  # listed and hashed like every other file
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card
    assert f"| density (fraction of weights kept) | {manifest['density']:.4f} |" in card
    assert f"| sparsity (fraction of weights zeroed) | {1 - manifest['density']:.4f} |" in card
    assert "| weight bits | 4 |" in card and "sparsegpt" in card
    assert "23.46 (eval wikitext2, seqlen 2048, eval_windows 32)" in card
    assert "import sparsegpt_utils" in card and "from_pretrained" in card and "load_pruned" in card
    assert "Calibration: calib c4, calib_samples 128, seed 0." in card
    # deterministic: the same model saves to the same bytes
    again = save_pruned(model, tmp_path / "ck2", masks=masks, grids=grids, metadata=METADATA, progress=False)
    assert again["files"] == manifest["files"] and again["size_bytes"] == manifest["size_bytes"]
    assert manifest["size_bytes"] == checkpoint_bytes(tmp_path / "ck")


def test_a_model_card_without_perplexity_says_so(tmp_path):
    model = tiny_opt()
    prune(model, "2:4")
    save_pruned(model, tmp_path / "ck", metadata={"method": "magnitude", "nm": "2:4"}, progress=False)
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "not measured" in card and "N:M 2:4" in card and "base model | unknown" in card


def test_an_edited_model_card_fails_its_checksum(tmp_path):
    model = tiny_opt()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    with open(tmp_path / "ck" / "README.md", "a") as f:
        f.write("\nedited")
    with pytest.raises(CheckpointError, match="README.md"):
        read_manifest(tmp_path / "ck")


# --- push_to_hub, offline ---------------------------------------------------------------------------------

def test_push_to_hub_offline_fails_in_one_line_naming_repo_and_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_opt()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    with pytest.raises(RuntimeError) as err:
        push_to_hub(tmp_path / "ck", "someone/pruned-opt", token="hf_not_a_real_token")
    message = str(err.value)
    assert "\n" not in message and "someone/pruned-opt" in message and "hub" in message
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(tmp_path / "ck", "not a repo id")
    (tmp_path / "ck" / "pruned.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError):  # nothing damaged is uploaded
        push_to_hub(tmp_path / "ck", "someone/pruned-opt")


def test_export_push_to_hub_offline_is_one_line_at_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_opt()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    code = cli_main(parse(str(tmp_path / "ck"), str(tmp_path / "out"), "--push-to-hub", "someone/pruned-opt"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "someone/pruned-opt" in errors[0] and "hub" in errors[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the export itself is done
