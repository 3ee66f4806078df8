"""Masked fine-tuning: the zero pattern survives training, the losses match float64
references, padding is ignored, and 2 processes (gloo) behave like one."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsegpt_utils.evaluate import density_report, overall_density
from sparsegpt_utils.finetune import (
    FinetuneConfig,
    current_masks,
    finetune,
    kd_loss,
    lm_loss,
    lr_factor,
    masks_kept,
    pad_batch,
    split_train_validation,
    squarehead_loss,
)
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from tests.conftest import tiny_llama, tiny_opt

ROOT = Path(__file__).resolve().parents[1]


def _tokens(n=6000, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _pruned(make, density=0.5):
    model = make()
    calib = _tokens(seed=1)[:, :4 * 64].reshape(4, 64)
    res = prune_model(model, calib, PruneConfig(density=density), progress=False)
    return model, res.masks


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_masks_kept_exactly_through_training(make):
    model, masks = _pruned(make)
    teacher = make()  # the dense model (same seed)
    before = {n: m.weight.detach().clone() for n, m in pruned_linears(model).items()}
    cfg = FinetuneConfig(steps=6, lr=1e-2, seqlen=32, batch_size=2, kd_weight=1.0, squarehead_weight=1.0,
                         weight_decay=0.1, val_windows=0)
    res = finetune(model, _tokens(), cfg, masks=masks, teacher=teacher, progress=False)
    assert res.masks_kept
    changed = 0
    for name, layer in pruned_linears(model).items():
        w = layer.weight.detach()
        assert torch.equal(w.ne(0), masks[name]), name  # identical pattern: zeros stay, kept stay
        changed += int(not torch.equal(w, before[name]))
    assert changed == len(masks)  # every layer trained, q/k/v included
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert all(math.isfinite(x) for x in res.log["loss"])
    assert abs(overall_density(density_report(model)) - 0.5) < 1e-3


def test_unmasked_training_loses_the_pattern():
    """The control for the test above: the same run without masks fills the zeros."""
    model, masks = _pruned(tiny_llama)
    cfg = FinetuneConfig(steps=2, lr=1e-2, seqlen=32, batch_size=2, val_windows=0)
    res = finetune(model, _tokens(), cfg, masks={}, progress=False)
    assert not masks_kept(model, masks)
    assert res.masks_kept  # nothing was asked to be kept


def test_default_masks_are_current_nonzeros():
    model, masks = _pruned(tiny_llama, 0.3)
    assert all(torch.equal(current_masks(model)[n], m) for n, m in masks.items())
    finetune(model, _tokens(), FinetuneConfig(steps=2, lr=1e-2, seqlen=32, val_windows=0), progress=False)
    assert masks_kept(model, masks)


def test_lm_loss_ignores_padding_float64_reference():
    model = tiny_llama().double()
    seqs = [_tokens(12, 1)[0], _tokens(7, 2)[0], _tokens(3, 3)[0]]
    batch = pad_batch(seqs, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = lm_loss(logits, batch["labels"], batch["attention_mask"])
    nll, count = 0.0, 0
    for s in seqs:  # each sequence alone, no padding at all
        lp = torch.log_softmax(model(input_ids=s[None]).logits[0].double(), -1)
        nll += float(-lp.detach()[torch.arange(len(s) - 1), s[1:]].sum())
        count += len(s) - 1
    assert got.item() == pytest.approx(nll / count, rel=1e-6)
    # padding tokens given real labels but attention_mask 0 are still ignored
    labels = batch["input_ids"].clone()
    assert lm_loss(logits, labels, batch["attention_mask"]).item() == pytest.approx(nll / count, rel=1e-6)


def test_kd_loss_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for temp in (1.0, 2.0):
        ps = torch.softmax(s.double() / temp, -1)
        pt = torch.softmax(t.double() / temp, -1)
        kl = (pt * (pt.log() - ps.log())).sum(-1)
        ref = float(kl[valid].mean()) * temp ** 2
        assert kd_loss(s, t, valid, temp).item() == pytest.approx(ref, rel=1e-5)
    assert kd_loss(t, t, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_squarehead_float64_reference():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 4, 8, generator=g) for _ in range(3)]
    ht = [torch.randn(2, 4, 8, generator=g) for _ in range(3)]
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ref = sum(float(((a.double() - b.double()) ** 2).sum(-1)[valid].sum()
                    / (b.double() ** 2).sum(-1)[valid].sum())
              for a, b in zip(hs[1:], ht[1:], strict=True)) / 2
    assert squarehead_loss(hs, ht, valid).item() == pytest.approx(ref, rel=1e-5)
    assert squarehead_loss(ht, ht, valid).item() == 0.0


def test_distillation_brings_student_to_teacher():
    model, masks = _pruned(tiny_llama, 0.4)
    teacher = tiny_llama()
    with torch.no_grad():  # a confident teacher: a random model's logits are nearly uniform
        teacher.model.norm.weight.mul_(4.0)
    probe = _tokens(4 * 32, 7).reshape(4, 32)

    def kl():
        with torch.no_grad():
            return float(kd_loss(model(input_ids=probe).logits, teacher(input_ids=probe).logits))

    before = kl()
    cfg = FinetuneConfig(steps=10, lr=1e-2, seqlen=32, batch_size=4, lm_weight=0.0, kd_weight=1.0,
                         val_windows=0)
    finetune(model, _tokens(), cfg, masks=masks, teacher=teacher, progress=False)
    assert kl() < 0.7 * before
    assert masks_kept(model, masks)


def test_validation_is_held_out_tail():
    ids = torch.arange(1000)[None]
    train, val = split_train_validation(ids, 200)
    assert torch.equal(torch.cat([train, val], 1), ids)
    assert set(train.flatten().tolist()).isdisjoint(val.flatten().tolist())
    model = tiny_llama()
    res = finetune(model, train % 128, FinetuneConfig(steps=1, seqlen=32, val_windows=3), val_ids=val % 128,
                   progress=False)
    assert math.isfinite(res.val_loss_before) and math.isfinite(res.val_loss_after)


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)
    with pytest.raises(ValueError, match="seqlen"):
        FinetuneConfig(seqlen=1)
    with pytest.raises(ValueError, match="mixed_precision"):
        FinetuneConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="teacher"):
        finetune(tiny_llama(), _tokens(), FinetuneConfig(kd_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="val_tokens"):
        split_train_validation(torch.arange(10), 10)


WORKER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from tests.conftest import tiny_llama
from accelerate import Accelerator
from sparsegpt_utils.finetune import FinetuneConfig, finetune
from sparsegpt_utils.evaluate import density_report, overall_density
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model

torch.set_num_threads(1)
acc = Accelerator(cpu=True)
model, teacher = tiny_llama(), tiny_llama()
ids = torch.randint(3, 128, (1, 6000), generator=torch.Generator().manual_seed(0))
calib = torch.randint(3, 128, (1, 6000), generator=torch.Generator().manual_seed(1))[:, :256].reshape(4, 64)
res = prune_model(model, calib, PruneConfig(density=0.5), progress=False)
cfg = FinetuneConfig(steps=4, lr=1e-2, seqlen=32, batch_size=2, kd_weight=1.0, val_windows=0)
ft = finetune(model, ids, cfg, masks=res.masks, teacher=teacher, accelerator=acc, progress=False)
checksum = sum(float(m.weight.detach().double().sum()) for m in pruned_linears(model).values())
out = {"world": acc.num_processes, "losses": ft.log["loss"].tolist(), "kept": ft.masks_kept,
       "density": overall_density(density_report(model)), "checksum": checksum,
       "patterns": all(torch.equal(m.weight.ne(0), res.masks[n]) for n, m in pruned_linears(model).items())}
with open(f"{sys.argv[1]}.{acc.process_index}.json", "w") as f:
    json.dump(out, f)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo_keep_masks_and_density(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # torchrun, which ``accelerate launch`` wraps; Accelerator(cpu=True) picks gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(tmp_path / "out"), str(ROOT / "tests")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    assert all(o["world"] == 2 for o in outs)
    assert all(o["kept"] and o["patterns"] for o in outs)
    assert all(math.isfinite(x) for o in outs for x in o["losses"])
    assert outs[0]["checksum"] == pytest.approx(outs[1]["checksum"], rel=1e-6)  # replicas agree
    # one process, same pruning: the same density
    model, _ = _pruned(tiny_llama)
    single = FinetuneConfig(steps=4, lr=1e-2, seqlen=32, batch_size=2, kd_weight=1.0, val_windows=0)
    finetune(model, _tokens(), single, teacher=tiny_llama(), progress=False)
    assert outs[0]["density"] == pytest.approx(overall_density(density_report(model)), abs=1e-9)


def test_copy_of_teacher_is_untouched():
    model, masks = _pruned(tiny_llama)
    teacher = tiny_llama()
    ref = copy.deepcopy(teacher.state_dict())
    finetune(model, _tokens(), FinetuneConfig(steps=2, lr=1e-2, seqlen=32, kd_weight=1.0, val_windows=0),
             masks=masks, teacher=teacher, progress=False)
    assert all(torch.equal(ref[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("adamw", ["foreach", "fused"])
def test_adamw_implementations_match_the_default_and_keep_masks(adamw):
    """The batched/fused AdamW give the default loop's weights (same update up to rounding)."""
    runs = {}
    for impl in ("default", adamw):
        model, masks = _pruned(tiny_llama)
        cfg = FinetuneConfig(steps=4, lr=1e-2, seqlen=32, batch_size=2, kd_weight=1.0, weight_decay=0.1,
                             val_windows=0, adamw=impl)
        res = finetune(model, _tokens(), cfg, masks=masks, teacher=tiny_llama(), progress=False)
        assert res.masks_kept and all(torch.equal(m.weight.ne(0), masks[n])
                                      for n, m in pruned_linears(model).items())
        weights = {n: m.weight.detach() for n, m in pruned_linears(model).items()}
        runs[impl] = (res.log["loss"].tolist(), weights)
    assert runs[adamw][0] == pytest.approx(runs["default"][0], rel=1e-4)
    for name, w in runs["default"][1].items():
        assert torch.allclose(runs[adamw][1][name], w, rtol=1e-4, atol=1e-5), name


def test_bf16_teacher_loss_close_to_float32_teacher_and_teacher_untouched():
    """A bf16 copy of the teacher: per-step losses within 2% of the float32 teacher's on a tiny
    model, masks kept, and the caller's teacher keeps its float32 weights."""
    losses = {}
    for dtype in ("same", "bfloat16"):
        model, masks = _pruned(tiny_llama)
        teacher = tiny_llama()
        with torch.no_grad():  # a confident teacher, so that KD is not ~0
            teacher.model.norm.weight.mul_(4.0)
        cfg = FinetuneConfig(steps=3, lr=1e-3, seqlen=32, batch_size=2, lm_weight=0.0, kd_weight=1.0,
                             val_windows=0, teacher_dtype=dtype)
        res = finetune(model, _tokens(), cfg, masks=masks, teacher=teacher, progress=False)
        assert res.masks_kept
        assert all(p.dtype == torch.float32 for p in teacher.parameters())
        losses[dtype] = res.log["kd"].tolist()
    assert losses["bfloat16"] == pytest.approx(losses["same"], rel=2e-2)
    with pytest.raises(ValueError, match="teacher_dtype"):
        FinetuneConfig(teacher_dtype="float8")
    with pytest.raises(ValueError, match="adamw"):
        FinetuneConfig(adamw="sgd")


def test_callback_sees_each_step_with_masked_weights():
    model, masks = _pruned(tiny_llama)
    seen = []

    def callback(step, m):
        weights = {n: m.get_submodule(n).weight.detach() for n in masks}
        seen.append((step, all(not w[~masks[n]].ne(0).any() for n, w in weights.items())))

    finetune(model, _tokens(), FinetuneConfig(steps=3, lr=1e-2, seqlen=32, val_windows=0), masks=masks,
             progress=False, callback=callback)
    assert seen == [(1, True), (2, True), (3, True)]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_warms_up_then_follows_its_shape_to_zero(schedule):
    steps, warm, lr = 10, 2, 1e-2
    config = FinetuneConfig(steps=steps, lr=lr, seqlen=32, warmup_steps=warm, lr_schedule=schedule,
                            val_windows=0)
    model, masks = _pruned(tiny_llama)
    res = finetune(model, _tokens(), config, masks=masks, progress=False)
    # the log records the rate after each step's scheduler update: the next step's rate
    used = [lr * lr_factor(config, s) for s in range(steps)]
    assert res.log["lr"].tolist()[:-1] == pytest.approx(used[1:])
    assert used[:warm] == pytest.approx([lr / 2, lr])
    span = steps - warm
    for s in range(warm, steps):
        left = 1 - (s - warm) / span
        expect = {"constant": 1.0, "linear": left, "cosine": 0.5 * (1 - math.cos(math.pi * left))}[schedule]
        assert used[s] == pytest.approx(lr * expect)
    if schedule != "constant":
        assert used[warm] == pytest.approx(lr)
        assert 0 < used[-1] <= lr / span * (1 + 1e-9)  # the last step still learns; 0 comes after it
        assert all(a >= b for a, b in zip(used[warm:], used[warm + 1:]))
    assert res.masks_kept
