"""Compact checkpoints: exact round trips for every storage form, honest sizes, safe failures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsegpt_utils import checkpoint as checkpoint_module
from sparsegpt_utils import codec
from sparsegpt_utils.evaluate import perplexity
from sparsegpt_utils.mixed_precision import FixedWidths
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.quant import QuantSpec, grid_storage_bits, pack_bits, rtn_quantize, unpack_bits
from sparsegpt_utils.save_utils import (
    CheckpointError,
    checkpoint_bytes,
    dense_fp16_bytes,
    export_dense,
    load_masked_model_single,
    load_pruned,
    read_manifest,
    save_pruned,
)
from sparsegpt_utils.solver import magnitude_mask
from tests.conftest import tiny_llama, tiny_opt

SETTINGS = ["d0.5", "2:4", "d0.1", "d0.5+4bit", "d0.5+3/4bit-g16"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (a zero's sign aside)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal((a + 0).view(int_type), (b + 0).view(int_type))


def small_llama(layers: int = 1):
    """Wide enough (256 / 512 columns) for per-row grid costs to be what they are in real models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def prune(model, setting: str):
    """Magnitude masks (+ round-to-nearest grids) applied in place -> (masks, grids)."""
    masks, grids = {}, {}
    for name, layer in pruned_linears(model).items():
        w = layer.weight
        mask = magnitude_mask(w, 0.1 if setting == "d0.1" else 0.5, (2, 4) if setting == "2:4" else None)
        new = w * mask
        if "bit" in setting:
            if setting == "d0.5+4bit":
                spec = QuantSpec(4)
            else:  # mixed widths by row, grids per 16 columns
                spec = QuantSpec(torch.tensor([3, 4])[torch.arange(w.shape[0]) % 2], groupsize=16)
            new, grid = rtn_quantize(new, spec)
            new = new * mask
            grids[name] = grid
        layer.weight.copy_(new)
        masks[name] = mask
    return masks, grids


def cast_params(model, dtype):
    """The saved model: parameters cast to the storage dtype (buffers as the model builds them)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not same_bits(sa[k], sb[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


# --- the slot codes against simple references ---------------------------------------------------

def rice_reference(mask_flat: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Golomb-Rice written out one gap at a time: unary bits, low parts."""
    unary, low, prev = [], [], -1
    for p in np.flatnonzero(mask_flat):
        gap = int(p) - prev - 1
        unary += [1] * (gap >> k) + [0]
        low.append(gap & ((1 << k) - 1))
        prev = int(p)
    return unary, low


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_bit_packing_is_lsb_first_and_round_trips(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes.numpy(), bits)
    assert torch.equal(packed, pack_bits(codes, bits))
    assert packed.numel() == math.ceil(1001 * bits / 8)
    # LSB first: code i's bit j is bit (i * bits + j) of the stream
    stream = np.unpackbits(packed.numpy(), bitorder="little")
    assert all(stream[i * bits + j] == (int(codes[i]) >> j) & 1
               for i in (0, 1, 500, 1000) for j in range(bits))
    assert np.array_equal(unpack_bits(packed, bits, 1001).numpy(), codes.numpy())


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.5, 1.0])
def test_rice_code_matches_reference_and_round_trips(density):
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) < density
    mask[0, 0] = mask[-1, -1] = density > 0  # slots at both ends
    k = codec.rice_best(np.diff(np.flatnonzero(mask), prepend=-1) - 1)[0] if mask.any() else 0
    unary, low, length = codec.rice_encode(mask.reshape(-1), k)
    ref_unary, ref_low = rice_reference(mask.reshape(-1), k)
    assert length == len(ref_unary)
    assert np.unpackbits(unary.numpy(), count=length, bitorder="little").tolist() == ref_unary
    assert unpack_bits(low, k, len(ref_low)).tolist() == ref_low
    back = codec.rice_decode(unary, low, k, length, int(mask.sum()), mask.size)
    assert np.array_equal(back, mask.reshape(-1))


def test_rice_parameter_is_the_best_one():
    rng = np.random.default_rng(2)
    for density in (0.01, 0.05, 0.1, 0.3, 0.6):
        gaps = np.diff(np.flatnonzero(rng.random(20000) < density), prepend=-1) - 1
        best = min(codec.rice_bits(gaps, k) for k in range(16))
        assert codec.rice_best(gaps)[1] == best


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_code_round_trips_and_pads_short_groups(n, m):
    rng = np.random.default_rng(3)
    score = torch.from_numpy(rng.random((16, 64)))
    mask = magnitude_mask(score, nm=(n, m)).numpy()
    mask[0, :m] = False  # a group with nothing kept: padded with n zero-valued slots
    plan = codec.choose_slots(mask, np.full(16, 16))
    assert plan["mask"] == "nm" and plan["nm"] == [n, m]
    slots = plan["slots"]
    assert (slots | ~mask).all() and (slots.reshape(16, -1, m).sum(-1) == n).all()
    tensors, fields = codec.encode_slots(plan)
    index_bits = math.ceil(math.log2(math.comb(m, n)))
    assert tensors["nm_index"].numel() == math.ceil(16 * 64 // m * index_bits / 8)
    info = {"shape": [16, 64], "mask": "nm", **fields, "slots": int(slots.sum())}
    assert np.array_equal(codec.decode_slots(info, tensors), slots.reshape(-1))


def test_bitmask_round_trips_and_cheapest_form_is_chosen():
    rng = np.random.default_rng(4)
    mask = rng.random((32, 48)) < 0.5
    plan = codec.choose_slots(mask, np.full(32, 16))
    assert plan["mask"] == "bitmask"
    tensors, fields = codec.encode_slots(plan)
    info = {"shape": [32, 48], "mask": "bitmask", **fields, "slots": int(mask.sum())}
    assert np.array_equal(codec.decode_slots(info, tensors), mask.reshape(-1))
    assert codec.choose_slots(rng.random((32, 48)) < 0.05, np.full(32, 16))["mask"] == "rice"


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_round_trip_is_bit_exact_fp16(tmp_path, make, setting):
    model = make()
    masks, grids = prune(model, setting)
    manifest = save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    assert manifest["dtype"] == "float16"
    loaded, tok = load_pruned(tmp_path / "ck")
    assert tok is None
    assert_same_state(loaded, cast_params(model, torch.float16))
    forms = {i["mask"] for i in manifest["layers"].values()}
    values = {i["values"] for i in manifest["layers"].values()}
    assert values == ({"codes"} if grids else {"float16"})
    if setting == "2:4":
        assert forms == {"nm"}
    if setting == "d0.1":
        assert forms == {"rice"}
    assert manifest["density"] == pytest.approx(
        sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))


@pytest.mark.parametrize("setting", ["d0.5", "d0.5+3/4bit-g16"])
def test_round_trip_float32_keeps_the_model_and_its_perplexity(tmp_path, setting):
    model = tiny_llama()
    masks, grids = prune(model, setting)
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, dtype=torch.float32, progress=False)
    loaded, _ = load_pruned(tmp_path / "ck")
    assert_same_state(loaded, model)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    assert perplexity(loaded, ids, 64, progress=False).nll == perplexity(model, ids, 64, progress=False).nll


def test_fp16_checkpoint_has_the_perplexity_of_the_model_cast_to_fp16(tmp_path):
    model = tiny_opt()
    masks, _ = prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", masks=masks, progress=False)
    loaded, _ = load_pruned(tmp_path / "ck")
    ref = cast_params(model, torch.float16)
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    assert perplexity(loaded, ids, 64, progress=False).nll == perplexity(ref, ids, 64, progress=False).nll


def test_masks_default_to_the_nonzero_weights(tmp_path):
    model = tiny_llama()
    masks, _ = prune(model, "2:4")
    manifest = save_pruned(model, tmp_path / "ck", progress=False)
    for name in masks:
        nonzero = int(torch.count_nonzero(model.get_parameter(f"{name}.weight")))
        assert manifest["layers"][name]["kept"] == nonzero
        assert manifest["layers"][name]["mask"] == "nm"
    assert_same_state(load_pruned(tmp_path / "ck")[0], cast_params(model, torch.float16))


def test_tied_embeddings_survive(tmp_path):
    model = tiny_llama()
    prune(model, "d0.5")
    manifest = save_pruned(model, tmp_path / "ck", dtype="float32", progress=False)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in manifest["dense_tensors"]
    loaded, _ = load_pruned(tmp_path / "ck")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_sparsegpt_with_mixed_precision_grids_round_trips(tmp_path):
    """The pipeline's own masks and grids (GPTQ-style, groups of 16, 3/4-bit rows) load exactly."""
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    widths = FixedWidths(lambda _n, w, _h: torch.tensor([3, 4])[torch.arange(w.shape[0]) % 2])
    result = prune_model(model, calib, PruneConfig(density=0.5, quant=QuantSpec(4, groupsize=16),
                                                   bit_allocator=widths), progress=False)
    manifest = save_pruned(model, tmp_path / "ck", masks=result.masks, grids=result.grids,
                           dtype=torch.float32, progress=False)
    assert all(i["values"] == "codes" and i["wbits"] == "mixed" for i in manifest["layers"].values())
    assert_same_state(load_pruned(tmp_path / "ck")[0], model)


def test_weights_off_their_grid_are_stored_as_values(tmp_path):
    model = tiny_opt()
    masks, grids = prune(model, "d0.5+4bit")
    name = next(iter(grids))
    with torch.no_grad():
        w = model.get_parameter(f"{name}.weight")
        w[masks[name]] += 1e-3  # off the grid, still inside the mask
    with pytest.warns(RuntimeWarning, match="do not lie on the grid"):
        manifest = save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    assert manifest["layers"][name]["values"] == "float16"
    assert_same_state(load_pruned(tmp_path / "ck")[0], cast_params(model, torch.float16))


# --- sizes ------------------------------------------------------------------------------------

TARGETS = {"d0.5": 9.1, "2:4": 9.1, "d0.1": 2.4, "d0.5+4bit": 3.2}


@pytest.mark.parametrize("setting", list(TARGETS))
def test_size_targets_on_a_small_model(tmp_path, setting):
    model = small_llama()
    masks, grids = prune(model, setting)
    manifest = save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    layers = manifest["layers"].values()
    params = sum(i["shape"][0] * i["shape"][1] for i in layers)
    # avg_bits counts every byte of every tensor of the pruned layers
    assert manifest["avg_bits"] == pytest.approx(8 * sum(i["bytes"] for i in layers) / params)
    assert manifest["avg_bits"] <= TARGETS[setting]
    assert manifest["size_bytes"] == checkpoint_bytes(tmp_path / "ck")
    assert manifest["size_bytes"] < manifest["dense_fp16_bytes"]


def test_quantized_bits_agree_with_the_shared_storage_model(tmp_path):
    """A bitmask-coded quantized layer costs what quant.quant_storage_bits says, up to byte padding."""
    model = small_llama()
    masks, grids = prune(model, "d0.5+3/4bit-g16")
    manifest = save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    checked = 0
    for info in manifest["layers"].values():
        weights = info["shape"][0] * info["shape"][1]
        slack = 8 * len(info["tensors"]) / weights  # < 1 byte of padding per tensor
        assert info["bits_per_weight"] <= info["bits_model"] + slack
        if info["mask"] == "bitmask":
            assert info["bits_model"] - 1e-9 <= info["bits_per_weight"]
            checked += 1
    assert checked


def test_quantized_only_model_stores_no_mask_bit(tmp_path):
    """Nothing pruned (density 1, 4-bit GPTQ): no mask is stored, the bits per weight are the
    codes and grids alone (what quant_storage_bits says with no mask), and it loads bit for bit."""
    model = small_llama()
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(density=1.0, quant=QuantSpec(4, groupsize=16))
    res = prune_model(model, calib, config, progress=False)
    manifest = save_pruned(model, tmp_path / "ck", masks=res.masks, grids=res.grids, dtype=torch.float32,
                           progress=False)
    layers = pruned_linears(model)
    want = sum(grid_storage_bits(res.grids[n], layers[n].in_features) for n in layers)
    params = sum(layer.weight.numel() for layer in layers.values())
    assert {info["mask"] for info in manifest["layers"].values()} == {"full"}
    assert manifest["avg_bits"] == pytest.approx(want / params, abs=0.01)
    assert manifest["avg_bits"] < 4 + 2 * 16 / 16 + 0.01  # codes + fp16 scale and zero per 16 columns
    assert_same_state(load_pruned(tmp_path / "ck")[0], model)
    plan = codec.choose_slots(np.ones((4, 8), dtype=bool), np.full(4, 4))
    assert plan["mask"] == "full" and plan["bits"] == 4 * 8 * 4


def test_size_helpers(tmp_path):
    model = tiny_llama()
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert dense_fp16_bytes(model) == 2 * sum(unique.values())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"12345")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y").write_bytes(b"123")
    assert checkpoint_bytes(tmp_path / "a") == 8


# --- loading into a model, and the wrong model ------------------------------------------------

def test_load_masked_model_single_into_a_fresh_model(tmp_path):
    model = tiny_llama()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, dtype=torch.float32, progress=False)
    fresh = tiny_llama(seed=5)
    out = load_masked_model_single(fresh, tmp_path / "ck" / "manifest.json")
    assert out is fresh
    assert_same_state(fresh, model)


@pytest.mark.parametrize("other", [lambda: tiny_llama(layers=3), tiny_opt], ids=["llama-3-blocks", "opt"])
def test_wrong_architecture_is_refused(tmp_path, other):
    model = tiny_llama()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    with pytest.raises(CheckpointError, match="model_type|does not fit"):
        load_masked_model_single(other(), tmp_path / "ck")


def test_wrong_shapes_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    cfg = model.config.to_dict()
    cfg["intermediate_size"] = 96
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight: checkpoint \[\d+, \d+\] vs model"):
        load_masked_model_single(LlamaForCausalLM(LlamaConfig(**cfg)), tmp_path / "ck")


# --- damaged checkpoints ----------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_opt()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    return tmp_path / "ck"


@pytest.mark.parametrize("name", ["pruned.safetensors", "dense.safetensors", "config.json"])
def test_corrupt_file_fails_its_checksum(checkpoint, name):
    path = checkpoint / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} fails its sha256"):
        load_pruned(checkpoint)


def test_truncated_file_is_reported(checkpoint):
    path = checkpoint / "pruned.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pruned(checkpoint)
    (checkpoint / "dense.safetensors").unlink()
    with pytest.raises(CheckpointError, match="dense.safetensors is missing"):
        read_manifest(checkpoint)


def edit_manifest(directory: Path, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_mismatches_are_reported(checkpoint):
    first = lambda m: next(iter(m["layers"].values()))
    edit_manifest(checkpoint, lambda m: first(m).update(slots=first(m)["slots"] + 1))
    with pytest.raises(CheckpointError, match="manifest says"):
        load_pruned(checkpoint)
    edit_manifest(checkpoint, lambda m: first(m).update(slots=first(m)["slots"] - 1))
    key = "model.decoder.final_layer_norm.weight"
    edit_manifest(checkpoint, lambda m: m["dense_tensors"][key].update(shape=[1, 2]))
    with pytest.raises(CheckpointError, match=f"{key}.*manifest"):
        load_pruned(checkpoint)
    edit_manifest(checkpoint, lambda m: m["dense_tensors"].pop(key))
    with pytest.raises(CheckpointError, match="not in the manifest"):
        load_pruned(checkpoint)
    (checkpoint / "manifest.json").write_text('{"format": "sparsegpt-compact", "form')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pruned(checkpoint)
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_pruned(checkpoint)


def test_newer_format_version_is_refused(checkpoint):
    edit_manifest(checkpoint, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_pruned(checkpoint)


# --- atomic saves and bad input ---------------------------------------------------------------

def test_interrupted_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    model = tiny_llama()
    masks, _ = prune(model, "d0.5")
    first = save_pruned(model, tmp_path / "ck", masks=masks, dtype="float32", progress=False)
    other = tiny_llama(seed=7)
    prune(other, "d0.1")

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "sha256_file", crash)  # dies after writing the data files
    with pytest.raises(KeyboardInterrupt):
        save_pruned(other, tmp_path / "ck", dtype="float32", progress=False)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp folder left behind
    assert read_manifest(tmp_path / "ck")["files"] == first["files"]
    assert_same_state(load_pruned(tmp_path / "ck")[0], model)


def test_save_killed_between_renames_is_recovered(tmp_path):
    model = tiny_opt()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", dtype="float32", progress=False)
    os.replace(tmp_path / "ck", tmp_path / ".ck.old-abc")  # the state a kill would leave
    assert_same_state(load_pruned(tmp_path / "ck")[0], model)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_bad_input_is_refused_before_writing(tmp_path):
    model = tiny_llama()
    masks, _ = prune(model, "d0.5")
    target = tmp_path / "ck"
    with pytest.raises(ValueError, match="not pruned layers"):
        save_pruned(model, target, masks={"lm_head": masks[next(iter(masks))]}, progress=False)
    name = next(iter(masks))
    with pytest.raises(ValueError, match="has shape"):
        save_pruned(model, target, masks={name: masks[name][:, :3]}, progress=False)
    with pytest.raises(ValueError, match="nonzero weights where"):
        save_pruned(model, target, masks={name: torch.zeros_like(masks[name])}, progress=False)
    with pytest.raises(ValueError, match="metadata must be JSON"):
        save_pruned(model, target, metadata={"x": object()}, progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        save_pruned(model, target, dtype="int8", progress=False)
    assert not target.exists() and not list(tmp_path.iterdir())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save_pruned(model, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_metadata_and_versions_are_kept(tmp_path):
    model = tiny_opt()
    prune(model, "2:4")
    save_pruned(model, tmp_path / "ck", metadata={"method": "magnitude", "nm": "2:4"}, progress=False)
    manifest = read_manifest(tmp_path / "ck")
    assert manifest["metadata"] == {"method": "magnitude", "nm": "2:4"}
    assert set(manifest["versions"]) == {"torch", "transformers", "sparsegpt_utils", "python"}
    assert set(manifest["files"]) >= {"config.json", "dense.safetensors", "pruned.safetensors"}


# --- dense export -----------------------------------------------------------------------------

def test_export_dense_is_a_plain_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    prune(model, "d0.5")
    out = export_dense(model, tmp_path / "dense")
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_same_state(back, model)
    export_dense(model, tmp_path / "dense")  # replacing an earlier export is fine


# --- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_round_trip(tmp_path, smollm2_copy, eval_source):
    from sparsegpt_utils.data import eval_tokens

    model, tok = smollm2_copy
    masks, _ = prune(model, "d0.5")
    manifest = save_pruned(model, tmp_path / "ck", tokenizer=tok, masks=masks, dtype="float32",
                           progress=False)
    assert manifest["avg_bits"] <= 17.1  # fp32 values + a bitmask
    loaded, tok2 = load_pruned(tmp_path / "ck")
    assert tok2("pruned weights")["input_ids"] == tok("pruned weights")["input_ids"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert_same_state(loaded, model)
    ids = eval_tokens(tok, eval_source)
    assert (perplexity(loaded, ids, 512, max_windows=2, progress=False).nll
            == perplexity(model, ids, 512, max_windows=2, progress=False).nll)


def test_one_width_per_grid_round_trips_and_costs_what_the_storage_model_says(tmp_path):
    """Mixed precision with unit "group" (a width per row and group of columns) loads bit for bit."""
    from sparsegpt_utils.mixed_precision import MixedPrecisionConfig

    model = small_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, calib, PruneConfig(density=0.5, quant=QuantSpec(4, groupsize=32),
                                                   mixed=MixedPrecisionConfig(3.5, unit="group")),
                         progress=False)
    assert any(g.bits.ndim == 2 and g.bits.unique(dim=None).numel() > 1 for g in result.grids.values())
    manifest = save_pruned(model, tmp_path / "ck", masks=result.masks, grids=result.grids,
                           dtype=torch.float32, progress=False)
    assert_same_state(load_pruned(tmp_path / "ck")[0], model)
    for info in manifest["layers"].values():
        assert info["values"] == "codes" and info["width_unit"] == "grid"
        weights = info["shape"][0] * info["shape"][1]
        slack = 8 * len(info["tensors"]) / weights  # < 1 byte of padding per tensor
        assert info["bits_per_weight"] <= info["bits_model"] + slack
        if info["mask"] == "bitmask":
            assert info["bits_model"] - 1e-9 <= info["bits_per_weight"]
