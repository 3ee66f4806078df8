"""Checkpoints that cannot be fooled (every file listed and hashed, manifests checked for their
shape and against the decoded masks, names confined to the folder, stale temp folders cleaned,
umask respected), and ``transformers.AutoModelForCausalLM.from_pretrained`` on a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from sparsegpt_utils import checkpoint as checkpoint_module
from sparsegpt_utils.checkpoint import CheckpointError, load_pruned, read_manifest, save_pruned
from tests.conftest import tiny_llama, tiny_opt
from tests.test_save_utils import prune

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
