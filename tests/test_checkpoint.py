"""Checkpoints that cannot be fooled (every file listed and hashed, manifests checked for their
shape and against the decoded masks, names confined to the folder, stale temp folders cleaned,
umask respected), and ``transformers.AutoModelForCausalLM.from_pretrained`` on a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsegpt_utils import checkpoint as checkpoint_module
from sparsegpt_utils.checkpoint import CheckpointError, load_pruned, read_manifest, save_pruned
from tests.conftest import tiny_llama, tiny_opt
from tests.test_save_utils import assert_same_state, cast_params, prune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ck(tmp_path):
    model = tiny_opt()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    return tmp_path / "ck"


def edit_manifest(directory: Path, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def first_layer(m: dict) -> dict:
    return next(iter(m["layers"].values()))


# --- every data file listed and hashed ----------------------------------------------------------

def test_an_unlisted_weights_file_is_refused(ck):
    shutil.copy(ck / "dense.safetensors", ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"not listed in the manifest.*model\.safetensors"):
        load_pruned(ck)
    (ck / "model.safetensors").unlink()
    (ck / "notes.txt").write_text("a file that holds no weights is allowed")
    load_pruned(ck)


def test_a_data_file_left_out_of_the_manifest_is_refused(ck):
    edit_manifest(ck, lambda m: m["files"].pop("dense.safetensors"))
    with pytest.raises(CheckpointError, match="does not list dense.safetensors"):
        load_pruned(ck)


def test_a_listed_file_with_another_hash_is_refused(ck):
    edit_manifest(ck, lambda m: m["files"]["pruned.safetensors"].update(sha256="0" * 64))
    with pytest.raises(CheckpointError, match="pruned.safetensors fails its sha256"):
        load_pruned(ck)


# --- manifest counts against the decoded masks --------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda m: first_layer(m).update(kept=first_layer(m)["kept"] - 1),
    lambda m: first_layer(m).update(kept=first_layer(m)["kept"] + 1),
    lambda m: first_layer(m).update(density=first_layer(m)["density"] * 0.5),
], ids=["kept-1", "kept+1", "density"])
def test_kept_and_density_are_checked_against_the_decoded_mask(ck, change):
    edit_manifest(ck, change)
    with pytest.raises(CheckpointError, match="manifest says"):
        load_pruned(ck)


def test_nm_layers_may_hold_zero_slots_but_not_fewer_kept_than_nonzero(tmp_path):
    model = tiny_llama()
    masks, _ = prune(model, "2:4")
    save_pruned(model, tmp_path / "ck", masks=masks, progress=False)
    manifest = read_manifest(tmp_path / "ck")
    assert all(i["mask"] == "nm" for i in manifest["layers"].values())
    load_pruned(tmp_path / "ck")
    edit_manifest(tmp_path / "ck", lambda m: first_layer(m).update(
        kept=first_layer(m)["kept"] // 2, density=first_layer(m)["kept"] // 2 / first_layer(m)["shape"][0]
        / first_layer(m)["shape"][1]))
    with pytest.raises(CheckpointError, match="weights kept"):
        load_pruned(tmp_path / "ck")


# --- malformed manifests: CheckpointError, never AttributeError / KeyError / TypeError -----------

MALFORMED = {
    "files-list": lambda m: m.update(files=["dense.safetensors"]),
    "files-no-sha": lambda m: m["files"]["config.json"].pop("sha256"),
    "files-bytes-str": lambda m: m["files"]["config.json"].update(bytes="12"),
    "layers-str": lambda m: m.update(layers="all"),
    "layers-null": lambda m: m.update(layers=None),
    "layer-list": lambda m: m["layers"].update({next(iter(m["layers"])): [1, 2]}),
    "layer-no-tensors": lambda m: first_layer(m).pop("tensors"),
    "layer-no-shape": lambda m: first_layer(m).pop("shape"),
    "layer-shape-str": lambda m: first_layer(m).update(shape="64x64"),
    "layer-shape-3d": lambda m: first_layer(m).update(shape=[4, 4, 4]),
    "layer-kept-float": lambda m: first_layer(m).update(kept=1.5),
    "layer-mask-int": lambda m: first_layer(m).update(mask=3),
    "layer-values-none": lambda m: first_layer(m).update(values=None),
    "layer-no-zero": lambda m: first_layer(m).pop("zero"),
    "layer-wbits-str": lambda m: first_layer(m).update(wbits_range="4"),
    "layer-groupsize-neg": lambda m: first_layer(m).update(groupsize=-3),
    "tensor-shape-str": lambda m: next(iter(first_layer(m)["tensors"].values())).update(shape="x"),
    "dense-list": lambda m: m.update(dense_tensors=[]),
    "dense-entry-str": lambda m: m["dense_tensors"].update({next(iter(m["dense_tensors"])): "f16"}),
    "tied-list": lambda m: m.update(tied=["lm_head.weight"]),
    "tied-unknown-source": lambda m: m.update(tied={"lm_head.weight": "no.such.weight"}),
    "tied-alias-stored": lambda m: m.update(tied={k: k for k in list(m["dense_tensors"])[:1]}),
    "tied-value-int": lambda m: m.update(tied={"lm_head.weight": 3}),
    "no-tied": lambda m: m.pop("tied"),
    "no-dtype": lambda m: m.pop("dtype"),
    "dtype-int8": lambda m: m.update(dtype="int8"),
    "dtype-list": lambda m: m.update(dtype=["float16"]),
    "model-type-int": lambda m: m.update(model_type=7),
    "version-str": lambda m: m.update(format_version="1"),
    "not-a-dict": lambda m: (m.clear(), m.update(format="sparsegpt-compact")),
}


@pytest.mark.parametrize("change", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_manifest_is_a_checkpoint_error(ck, change):
    edit_manifest(ck, change)
    with pytest.raises(CheckpointError):
        load_pruned(ck)


def test_a_manifest_that_is_a_list_is_a_checkpoint_error(ck):
    (ck / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="not a sparsegpt-compact manifest"):
        read_manifest(ck)


# --- file names confined to the folder ----------------------------------------------------------

SECRET = "top-secret-content-1234"


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside.txt"
    path.write_text(SECRET)
    return path


def rename_in_manifest(directory: Path, old: str, new: str):
    edit_manifest(directory, lambda m: m["files"].update({new: m["files"].pop(old)}))


@pytest.mark.parametrize("name", ["../outside.txt", "sub/../../outside.txt", "/dev/zero", "/etc/passwd",
                                  "./config.json", "a\\b", "", "~/x"])
def test_manifest_file_names_outside_the_folder_are_refused_unread(ck, outside, monkeypatch, name):
    read = []
    real = checkpoint_module.sha256_file
    monkeypatch.setattr(checkpoint_module, "sha256_file", lambda p: read.append(Path(p)) or real(p))
    edit_manifest(ck, lambda m: m["files"].update({name: {"bytes": len(SECRET), "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError) as err:
        read_manifest(ck)
    assert SECRET not in str(err.value) and str(outside.parent) not in str(err.value)
    assert all(ck.resolve() in p.resolve().parents for p in read)


def test_symlinks_pointing_outside_are_refused_unread(ck, tmp_path, monkeypatch):
    read = []
    real = checkpoint_module.sha256_file
    monkeypatch.setattr(checkpoint_module, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(ck / "dense.safetensors", moved)
    (ck / "dense.safetensors").symlink_to(moved)  # same bytes, same hash: only the place is wrong
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder") as err:
        load_pruned(ck)
    assert str(tmp_path) not in str(err.value)
    assert "dense.safetensors" not in read
    (ck / "dense.safetensors").unlink()
    (ck / "dense.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="points outside"):
        load_pruned(ck)


def test_a_symlink_inside_the_folder_is_fine(ck):
    os.replace(ck / "dense.safetensors", ck / "real.bin.part")
    (ck / "dense.safetensors").symlink_to("real.bin.part")
    load_pruned(ck)


def test_a_fifo_named_in_the_manifest_is_refused_without_blocking(ck):
    (ck / "dense.safetensors").unlink()
    os.mkfifo(ck / "dense.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_pruned(ck)


# --- temp folders of interrupted saves, and the umask ---------------------------------------------

def test_temp_folders_of_interrupted_saves_are_removed_by_the_next_load(ck):
    for stale in (ck.parent / ".ck.tmp-abc123", ck.parent / ".ck.tmp-999999999-xyz", ck / ".tmp-x"):
        stale.mkdir()
        (stale / "dense.safetensors").write_bytes(b"junk")
    live = ck.parent / f".ck.tmp-{os.getppid()}-busy"  # a save still running in another process
    live.mkdir()
    load_pruned(ck)
    assert sorted(p.name for p in ck.parent.iterdir()) == [live.name, "ck"]
    assert not (ck / ".tmp-x").exists()


def test_temp_folders_of_interrupted_saves_are_removed_by_the_next_save(tmp_path):
    (tmp_path / ".ck.tmp-old").mkdir()
    (tmp_path / ".ck.tmp-old" / "pruned.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".other.tmp-old").mkdir()  # another folder's: not ours to remove
    model = tiny_opt()
    prune(model, "d0.5")
    save_pruned(model, tmp_path / "ck", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-old", "ck"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_follow_the_umask(tmp_path, umask):
    model = tiny_opt()
    prune(model, "d0.5")
    old = os.umask(umask)
    try:
        save_pruned(model, tmp_path / "ck", progress=False)
    finally:
        os.umask(old)
    folder_mode = stat.S_IMODE((tmp_path / "ck").stat().st_mode)
    assert folder_mode == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --- transformers' from_pretrained on a checkpoint ----------------------------------------------------

def untied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


MODELS = {"opt": tiny_opt, "llama-tied": tiny_llama, "llama-untied": untied_llama}


@pytest.mark.parametrize("setting", ["d0.5", "2:4", "d0.5+4bit", "d0.5+3/4bit-g16"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_from_pretrained_gives_the_weights_of_load_pruned(tmp_path, arch, setting):
    from transformers import AutoModelForCausalLM

    model = MODELS[arch]()
    was_tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert was_tied == (arch != "llama-untied")
    masks, grids = prune(model, setting)
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    reference, _ = load_pruned(tmp_path / "ck")
    assert loaded.dtype == torch.float16  # "auto": the storage dtype
    assert_same_state(loaded, reference)
    assert_same_state(loaded, cast_params(model, torch.float16))
    tied = loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert tied == was_tied
    # a plain dense model: no quantizer left on it, casting works
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    assert getattr(loaded.config, "quantization_config", None) is None
    loaded.float()


def test_from_pretrained_dtype_and_device_map(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=dtype)
        assert loaded.dtype == dtype
        assert_same_state(loaded, load_pruned(tmp_path / "ck", dtype=dtype)[0])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", device_map="cpu")
    assert_same_state(loaded, load_pruned(tmp_path / "ck")[0])
    with pytest.raises(ValueError, match="not with offloading"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck", device_map={"model": "cpu", "lm_head": "disk"})


def test_save_pretrained_of_a_loaded_checkpoint_writes_a_plain_dense_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_opt()
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", masks=masks, grids=grids, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    loaded.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert_same_state(again, loaded)


def test_from_pretrained_verifies_the_checkpoint(ck):
    from transformers import AutoModelForCausalLM

    data = bytearray((ck / "pruned.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (ck / "pruned.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(ck)


def run_clean(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_the_package_the_error_names_it(ck, tmp_path):
    out = run_clean(f"from transformers import AutoModelForCausalLM\n"
                    f"AutoModelForCausalLM.from_pretrained({str(ck)!r})", tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "sparsegpt_utils" in last, out.stderr[-2000:]


def test_importing_the_package_registers_the_format_without_importing_transformers(ck, tmp_path):
    out = run_clean(
        "import sys, torch\n"
        "import sparsegpt_utils\n"
        "assert 'transformers.quantizers.auto' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        "from sparsegpt_utils.checkpoint import load_pruned\n"
        f"a = AutoModelForCausalLM.from_pretrained({str(ck)!r})\n"
        f"b, _ = load_pruned({str(ck)!r})\n"
        "sa, sb = a.state_dict(), b.state_dict()\n"
        "assert all(torch.equal(sa[k], sb[k]) for k in sb)\n"
        "print('ok')\n", tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_smollm2_from_pretrained_equals_load_pruned(tmp_path, smollm2_copy, eval_source):
    from transformers import AutoModelForCausalLM

    from sparsegpt_utils.data import eval_tokens
    from sparsegpt_utils.evaluate import perplexity

    model, tok = smollm2_copy
    masks, grids = prune(model, "d0.5+4bit")
    save_pruned(model, tmp_path / "ck", tokenizer=tok, masks=masks, grids=grids, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    reference, _ = load_pruned(tmp_path / "ck", dtype=torch.float32)
    assert_same_state(loaded, reference)
    ids = eval_tokens(tok, eval_source)
    assert (perplexity(loaded, ids, 512, max_windows=2, progress=False).nll
            == perplexity(reference, ids, 512, max_windows=2, progress=False).nll)
