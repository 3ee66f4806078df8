"""Block reconstruction: with its masks fixed, a pruned decoder block is fitted by a few Adam
steps on the calibration inputs to reproduce the dense block's outputs.

Targets are either the block's output (``parts=None``) or the outputs of its residual
writers (attention output projection and MLP down projection, see :func:`residual_writers`),
each error relative to its target's energy. Pruned weights stay exactly zero: their gradients
are masked before each step and the weights re-masked after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import run_block

__all__ = ["ReconstructResult", "reconstruct_block", "residual_writers", "relative_error"]


@dataclass
class ReconstructResult:
    error_before: float  # Σ‖block(x) − y‖² / Σ‖y‖² over the checked batches, before the steps
    error_after: float  # the same after (never above error_before: a worse fit is undone)
    outputs: list[torch.Tensor]  # the block's outputs after reconstruction, one per batch
    steps: int


def residual_writers(groups: list[list[tuple[str, nn.Linear]]]) -> list[nn.Linear]:
    """The linear layers that write into the residual stream (e.g. ``o_proj`` and
    ``down_proj``): alone in their input group, with as many outputs as the block's width."""
    width = groups[0][0][1].in_features
    return [group[0][1] for group in groups if len(group) == 1 and group[0][1].out_features == width]


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    num = sum(float((o.float() - t.to(o.device).float()).pow(2).sum()) for o, t in zip(outputs, targets))
    den = sum(float(t.float().pow(2).sum()) for t in targets)
    return num / max(den, torch.finfo(torch.float32).tiny)


def reconstruct_block(
    block: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    kwargs: dict[int, dict],
    masks: dict[nn.Parameter, torch.Tensor],
    steps: int = 20,
    lr: float = 1e-4,
    device: torch.device | str | None = None,
    parts: list[nn.Module] | None = None,
    part_targets: list[list[torch.Tensor]] | None = None,
    frozen: set[nn.Parameter] | None = None,
    error_batches: int | None = 4,
) -> ReconstructResult:
    """Fit ``block`` (in place) so that ``block(inputs[i]) ≈ targets[i]``.

    ``inputs``/``targets``: one [batch, seq, d] tensor per calibration batch (any device);
    ``kwargs``: the block's keyword arguments by batch size; ``masks``: bool mask (True =
    kept) of each pruned weight, which stays exactly zero elsewhere. ``steps`` Adam steps
    of learning rate ``lr``, step k on batch k mod len(inputs), in float32 whatever the
    block's dtype. With ``parts`` (modules) the loss is the sum of each part's relative output
    error against ``part_targets[i][p]`` (batch i, part p) instead of the block output's.
    ``frozen``: parameters left unchanged (e.g. quantized weights, whose grid must hold).
    The returned errors are always those of the block's output, on the first ``error_batches``
    batches (None: all); a fit that makes them worse is undone. Checking a few batches instead
    of all saves most of a forward pass over the calibration, which the fit itself costs about
    two of.
    """
    if error_batches is not None and error_batches < 1:
        raise ValueError(f"error_batches must be >= 1 (or None: all), got {error_batches}")
    device = torch.device(device) if device is not None else next(block.parameters()).device
    dtype = next(block.parameters()).dtype
    frozen = frozen or set()
    masks = {p: m.to(p.device, torch.bool) for p, m in masks.items()}
    block.float()
    params = [p for p in block.parameters() if p.is_floating_point() and p not in frozen]
    # block.float() keeps the Parameter objects, so the masks' keys still name them
    saved = [p.detach().clone() for p in params]

    def run(x):
        return run_block(block, x.to(device, torch.float32), _float_kwargs(kwargs[x.shape[0]]))

    checked = len(inputs) if error_batches is None else min(error_batches, len(inputs))
    with torch.no_grad():
        before = relative_error([run(x) for x in inputs[:checked]], targets[:checked])

    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in parts or []]
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for k in range(steps):
                i = k % len(inputs)
                captured.clear()
                out = run(inputs[i])
                if parts:
                    loss = sum(_relative_mse(o, t) for o, t in zip(captured, part_targets[i], strict=True))
                else:
                    loss = _relative_mse(out, targets[i])
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                for p, m in masks.items():
                    p.grad.mul_(m)
                optimizer.step()
                with torch.no_grad():
                    for p, m in masks.items():
                        p.mul_(m)
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    with torch.no_grad():
        outputs = [run(x) for x in inputs]
        after = relative_error(outputs[:checked], targets[:checked])
        if not after <= before:  # a worse (or non-finite) fit is undone
            for p, s in zip(params, saved):
                p.copy_(s)
            outputs, after = [run(x) for x in inputs], before
    block.to(dtype)
    for p, m in masks.items():
        if p.detach()[~m].any():
            raise AssertionError("reconstruction changed a pruned weight")
    return ReconstructResult(before, after, [o.to(dtype) for o in outputs], steps)


def _relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(output.device, torch.float32)
    return (output.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def _float_kwargs(obj):
    """The block's keyword arguments with floating tensors in float32 (rotary cos/sin, masks)."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_float_kwargs(o) for o in obj)
    if isinstance(obj, list):
        return [_float_kwargs(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float_kwargs(v) for k, v in obj.items()}
    return obj
