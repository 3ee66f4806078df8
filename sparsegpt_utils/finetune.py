"""Masked fine-tuning of a pruned model, with distillation from its dense teacher.

The zero pattern of every pruned linear layer is kept exactly: while training, each layer's
weight is a parametrization ``W = W_orig * mask`` (so masked weights receive zero gradient
whatever the wrapper: DDP, FSDP, gradient checkpointing), and after every optimizer step the
stored weights are re-masked where the process holds them whole. At the end the masks are
baked in (``W_orig * mask`` becomes the plain weight) and the pattern is checked.

Loss = ``lm_weight · LM + kd_weight · KL(teacher ‖ student) + squarehead_weight · SquareHead``:
- LM: shifted cross-entropy, padding (``labels == -100`` or ``attention_mask == 0``) ignored;
- KL: token-level, on temperature-softened logits, times T² (Hinton et al.);
- SquareHead (Kurtic et al., 2023): per decoder layer, ``‖h_s − h_t‖² / ‖h_t‖²`` over the
  real tokens, averaged over layers.

Scale-out: ``finetune`` runs under ``accelerate launch`` (DDP, or FSDP with a config file);
each process draws its own slice of every global batch. bf16 autocast on GPU via
``mixed_precision='bf16'``. On CPU, 2 processes with gloo (``accelerate launch --cpu
--num_processes 2``) is the tested setting.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .models import parameter_masks, pruned_linears

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "lr_factor",
    "current_masks",
    "masks_kept",
    "split_train_validation",
    "training_windows",
    "pad_batch",
    "lm_loss",
    "kd_loss",
    "squarehead_loss",
    "masked_weights",
]


ADAMW_IMPLS = ("default", "foreach", "fused")
TEACHER_DTYPES = ("same", "bfloat16")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters. ``steps`` counts optimizer steps; each step sees
    ``batch_size × grad_accum × processes`` windows of ``seqlen`` tokens."""

    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4  # windows per process per micro-batch
    grad_accum: int = 1
    seqlen: int = 512
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # after warm-up: "constant", or decayed to 0 at the last step ("linear", "cosine"), which a
    # fixed token budget favours
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    lm_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    squarehead_weight: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "bf16" on GPU
    # AdamW implementation: "fused" (one kernel over all parameters), "foreach" (batched), or
    # "default" (torch's own choice: a per-parameter loop on CPU); the same update up to rounding
    adamw: str = "default"
    # the teacher's weights: "same" (as given), or "bfloat16" (a bf16 copy, the given teacher untouched)
    teacher_dtype: str = "same"
    val_windows: int = 4  # validation windows (held-out slice of the training text)
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "seqlen"):
            if int(getattr(self, key)) < (0 if key == "steps" else 1):
                raise ValueError(f"{key} must be >= {0 if key == 'steps' else 1}, got {getattr(self, key)}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {self.seqlen}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("lm_weight", "kd_weight", "squarehead_weight", "weight_decay", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.lm_weight + self.kd_weight + self.squarehead_weight == 0:
            raise ValueError("at least one of lm_weight, kd_weight, squarehead_weight must be > 0")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.adamw not in ADAMW_IMPLS:
            raise ValueError(f"adamw must be one of {ADAMW_IMPLS}, got {self.adamw!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.val_windows < 0:
            raise ValueError(f"val_windows must be >= 0, got {self.val_windows}")


@dataclass
class FinetuneResult:
    log: pd.DataFrame  # one row per optimizer step: step, loss, lm, kd, squarehead, lr, seconds
    val_loss_before: float  # LM loss on the validation windows (nats/token), nan without them
    val_loss_after: float
    masks_kept: bool  # every pruned layer's zero pattern identical to its mask after training
    seconds: float
    tokens: int  # training tokens seen, all processes together

    @property
    def val_ppl_after(self) -> float:
        return math.exp(self.val_loss_after) if not math.isnan(self.val_loss_after) else float("nan")


# ----------------------------------------------------------------------------- data

def split_train_validation(ids: torch.Tensor, val_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream [1, n] into (train, validation): the last ``val_tokens`` tokens are
    held out, so validation text never appears in training."""
    ids = ids.reshape(1, -1)
    if not 0 <= val_tokens < ids.shape[1]:
        raise ValueError(f"val_tokens must be in [0, {ids.shape[1]}), got {val_tokens}")
    cut = ids.shape[1] - val_tokens
    return ids[:, :cut], ids[:, cut:]


def training_windows(ids: torch.Tensor, seqlen: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows [count, seqlen] at random offsets of the stream ``ids`` [1, n]."""
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"training text has {ids.numel()} tokens, fewer than seqlen={seqlen} + 1")
    starts = torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=generator)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def pad_batch(sequences: Sequence[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad 1-D token tensors to one batch: input_ids, attention_mask, labels (-100 on
    padding, so the LM loss ignores it)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ----------------------------------------------------------------------------- losses

def _targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    return labels[:, 1:]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean shifted cross-entropy (nats/token) of logits [b, t, V] for labels [b, t]; tokens with
    label -100 or attention_mask 0 are ignored."""
    target = _targets(labels, attention_mask)
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Token-level KL(teacher ‖ student) of logits [b, t, V], averaged over valid tokens
    (bool [b, t]), times T²."""
    t = temperature
    logp_s = nn.functional.log_softmax(student.float() / t, dim=-1)
    logp_t = nn.functional.log_softmax(teacher.float() / t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # [b, t]
    if valid is None:
        return kl.mean() * t * t
    valid = valid.to(kl.dtype)
    return (kl * valid).sum() / valid.sum().clamp_min(1) * t * t


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of ``Σ‖h_s − h_t‖² / Σ‖h_t‖²`` over the valid tokens; hidden states
    are [b, t, d] each (the embedding output, index 0, is skipped)."""
    losses = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        err = (hs.float() - ht.float()).pow(2).sum(-1)
        ref = ht.float().pow(2).sum(-1)
        if valid is not None:
            err, ref = err[valid], ref[valid]
        losses.append(err.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- masks

def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> bool [rows, cols], True where a pruned layer's weight is nonzero."""
    return {name: layer.weight.detach().ne(0).cpu() for name, layer in pruned_linears(model).items()}


def masks_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """True when every masked-out weight of every layer in ``masks`` is exactly zero."""
    layers = pruned_linears(model)
    return all(not torch.any(layers[n].weight.detach()[~m.to(layers[n].weight.device)].ne(0))
               for n, m in masks.items())


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


@contextmanager
def masked_weights(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Inside the block, each layer named in ``masks`` computes with ``W_orig * mask``; on exit
    the masked weights become the plain weights again (pattern exact). Works on the module
    that owns the parameter: a fused matrix (GPT-2's ``c_attn``) gets its parts' masks merged,
    a Conv1D its mask transposed."""
    owners = parameter_masks(model, masks)  # raises on names the model does not have
    for module, mask in owners:
        with torch.no_grad():
            module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))
        parametrize.register_parametrization(module, "weight",
                                             _Mask(mask.to(module.weight.device, torch.bool)))
    try:
        yield
    finally:
        for module, _ in owners:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def _remask(model: nn.Module):
    """Re-apply each parametrized layer's mask to its stored weight (where the process holds
    the whole matrix: not under FSDP sharding, where the parametrization alone suffices)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations["weight"]
            orig, mask = plist.original, plist[0].mask
            if orig.shape == mask.shape:
                orig.mul_(mask.to(orig.dtype))


# ----------------------------------------------------------------------------- training

def _forward_losses(model, teacher, batch, config: FinetuneConfig):
    need_hidden = config.squarehead_weight > 0
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                output_hidden_states=need_hidden, use_cache=False)
    attn = batch.get("attention_mask")
    parts = {"lm": lm_loss(out.logits, batch["labels"], attn)}
    if teacher is not None and (config.kd_weight > 0 or need_hidden):
        with torch.no_grad():
            tout = teacher(input_ids=batch["input_ids"], attention_mask=attn,
                           output_hidden_states=need_hidden, use_cache=False)
        valid = batch["labels"] != -100
        if attn is not None:
            valid &= attn.bool()
        if config.kd_weight > 0:
            parts["kd"] = kd_loss(out.logits, tout.logits, valid, config.kd_temperature)
        if need_hidden:
            parts["squarehead"] = squarehead_loss(out.hidden_states, tout.hidden_states, valid)
    loss = (config.lm_weight * parts["lm"] + config.kd_weight * parts.get("kd", 0.0)
            + config.squarehead_weight * parts.get("squarehead", 0.0))
    return loss, parts


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor | None, batch_size: int = 4) -> float:
    """Mean LM loss (nats/token) over validation windows [n, seqlen]; nan when there are none."""
    if windows is None or len(windows) == 0:
        return float("nan")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits
        total += float(lm_loss(logits, chunk)) * len(chunk)
        count += len(chunk)
    model.train(was)
    return total / count


def finetune(
    model: nn.Module,
    train_ids: torch.Tensor,
    config: FinetuneConfig,
    masks: dict[str, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    val_ids: torch.Tensor | None = None,
    accelerator=None,
    progress: bool = True,
    callback=None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on windows drawn from ``train_ids`` [1, n], keeping the
    zero pattern of every layer in ``masks`` (default: the current nonzeros of every pruned
    layer). ``teacher``: the dense model for distillation (frozen). ``val_ids``: held-out
    tokens of the training source; its first ``val_windows`` windows give the validation loss
    before and after. ``accelerator``: an ``accelerate.Accelerator`` (made here when None;
    under ``accelerate launch`` it picks up DDP/FSDP from the launch configuration).
    ``callback(step, model)``: called on every process after each optimizer step (1-based) with
    the unwrapped model, its weights masked (e.g. to evaluate along the run)."""
    from accelerate import Accelerator

    if (config.kd_weight > 0 or config.squarehead_weight > 0) and teacher is None:
        raise ValueError("kd_weight / squarehead_weight > 0 need a teacher model")
    start = time.perf_counter()
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                             gradient_accumulation_steps=1)
    masks = current_masks(model) if masks is None else masks
    if accelerator.num_processes > 1:  # every process must keep the same pattern
        from accelerate.utils import broadcast

        masks = {n: broadcast(m.to(accelerator.device)).cpu() for n, m in masks.items()}
    val_windows = None
    if val_ids is not None and config.val_windows > 0:
        n = min(config.val_windows, val_ids.numel() // config.seqlen)
        val_windows = val_ids.reshape(-1)[: n * config.seqlen].reshape(n, config.seqlen) if n else None

    model.to(accelerator.device)
    if teacher is not None:
        if config.teacher_dtype == "bfloat16":  # a copy: the caller's teacher keeps its weights
            teacher = copy.deepcopy(teacher).to(torch.bfloat16)
        teacher.to(accelerator.device).eval().requires_grad_(False)
    main = accelerator.is_main_process
    val_before = validation_loss(model, val_windows, config.batch_size) if main else float("nan")

    log, tokens = [], 0
    if config.steps > 0:
        with masked_weights(model, masks):
            tokens = _train(model, teacher, train_ids, config, accelerator, log, progress, callback)
    model.eval()
    kept = masks_kept(model, masks)
    val_after = validation_loss(model, val_windows, config.batch_size) if main else float("nan")
    return FinetuneResult(pd.DataFrame(log), val_before, val_after, kept, time.perf_counter() - start, tokens)


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """The learning rate of 0-based optimizer step ``step``, as a fraction of ``config.lr``: linear
    warm-up over ``warmup_steps``, then ``lr_schedule`` (decays end at 0 after the last step)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    left = max(0.0, 1.0 - (step - config.warmup_steps) / span)  # 1 at the first step after warm-up
    return left if config.lr_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))


def _train(model, teacher, train_ids, config: FinetuneConfig, accelerator, log, progress,
           callback=None) -> int:
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[config.adamw]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **impl)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config))
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    generator = torch.Generator().manual_seed(config.seed)  # same on every process
    per_step = config.batch_size * config.grad_accum * world
    tokens = 0
    bar = tqdm(range(config.steps), desc="fine-tune", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        t0 = time.perf_counter()
        windows = training_windows(train_ids, config.seqlen, per_step, generator)
        mine = windows[rank::world]  # this process's share of the global batch
        totals = {"loss": 0.0}
        micros = mine.split(config.batch_size)
        for i, micro in enumerate(micros):
            micro = micro.to(accelerator.device)
            batch = {"input_ids": micro, "labels": micro}
            # gradients are averaged across processes once per optimizer step, not per micro-batch
            sync = nullcontext() if i == len(micros) - 1 else accelerator.no_sync(wrapped)
            with sync, accelerator.autocast():
                loss, parts = _forward_losses(wrapped, teacher, batch, config)
                accelerator.backward(loss / config.grad_accum)
            totals["loss"] += float(loss.detach()) / config.grad_accum
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / config.grad_accum
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        _remask(accelerator.unwrap_model(wrapped))
        tokens += per_step * config.seqlen
        if world > 1:  # log the mean over processes
            vec = torch.tensor(list(totals.values()), device=accelerator.device)
            vec = accelerator.reduce(vec, reduction="mean")
            totals = dict(zip(totals, vec.tolist(), strict=True))
        if not all(math.isfinite(v) for v in totals.values()):
            raise FloatingPointError(f"non-finite loss at fine-tuning step {step}: {totals}; lower lr")
        log.append({"step": step + 1, **totals, "lr": schedule.get_last_lr()[0],
                    "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{totals['loss']:.3f}")
        if callback is not None:
            callback(step + 1, accelerator.unwrap_model(wrapped))
    if config.gradient_checkpointing:
        accelerator.unwrap_model(wrapped).gradient_checkpointing_disable()
    accelerator.free_memory()
    return tokens


def config_dict(config: FinetuneConfig) -> dict:
    return asdict(config)
