"""OWL layer-wise densities (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity").

A block whose weights carry more outliers keeps more of them. The outlier ratio of a block is
the fraction of its weights whose Wanda score ``|W_ij| · ‖x_j‖₂`` exceeds ``threshold`` (M, 5)
times the mean score, over all the block's linear layers together, measured on the dense
model with calibration data flowing through the blocks. The ratios are rescaled to the range
``[0, 2λ]``, shifted so that the parameter-weighted mean is the global density, and used as
per-block densities (λ = 0.08 in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import get_adapter
from .replay import replay_blocks, run_inputs
from .solver import check_density

__all__ = ["outlier_ratios", "owl_densities", "block_params"]


def block_params(model: nn.Module) -> list[int]:
    """Weights of the pruned linear layers of each block."""
    adapter = get_adapter(model)
    return [sum(m.weight.numel() for g in adapter.linear_groups(b) for _, m in g)
            for b in adapter.blocks(model)]


@torch.no_grad()
def outlier_ratios(model: nn.Module, calibration: torch.Tensor, threshold: float = 5.0,
                   device: str | torch.device | None = None, progress: bool = True,
                   batch_size: int = 1, offload_activations: bool = False) -> list[float]:
    """Per block, the fraction (0..1) of weights whose score ``|W_ij|·‖x_j‖₂`` is above
    ``threshold`` × the block's mean score; ``calibration`` is token ids [samples, seqlen].
    The model is left unchanged (one forward pass of the calibration through the blocks)."""
    if threshold <= 0:
        raise ValueError(f"threshold (OWL M) must be > 0, got {threshold}")
    adapter = get_adapter(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    storage = torch.device("cpu") if offload_activations else device
    ratios = []
    for step in replay_blocks(model, calibration, device, storage, batch_size, progress, "OWL outliers"):
        layers = [m for g in adapter.linear_groups(step.block) for _, m in g]
        sq = {id(m): torch.zeros(m.in_features, device=device) for m in layers}

        def collect(mod, inp, _out):  # returns None: the layer's output is left alone
            sq[id(mod)].add_(inp[0].detach().float().pow(2).reshape(-1, mod.in_features).sum(0))

        hooks = [m.register_forward_hook(collect) for m in layers]
        step.outputs = run_inputs(step)
        for h in hooks:
            h.remove()
        scores = torch.cat([(m.weight.detach().float().abs() * sq[id(m)].sqrt()[None]).flatten()
                            for m in layers])
        ratios.append(float((scores > threshold * scores.mean()).float().mean()))
    return ratios


def owl_densities(ratios: Sequence[float], density: float, lam: float = 0.08,
                  params: Sequence[int] | None = None) -> list[float]:
    """Per-block densities from outlier ratios, with parameter-weighted mean ``density``.

    λ is capped at 0.45·min(density, 1 − density) so every block density stays in (0, 1]
    and, for fixed ratios, each block's density falls when the global one falls (masks that
    only shrink stay feasible along a schedule)."""
    density = check_density(density)
    if lam < 0:
        raise ValueError(f"lam (OWL lambda) must be >= 0, got {lam}")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    w = torch.ones_like(r) if params is None else torch.tensor(list(params), dtype=torch.float64)
    if len(w) != len(r):
        raise ValueError(f"params has {len(w)} entries for {len(r)} ratios")
    lam = min(lam, 0.45 * density, 0.45 * (1 - density))
    span = float(r.max() - r.min()) if len(r) else 0.0
    if span == 0 or lam == 0:
        return [density] * len(r)
    z = (r - r.min()) / span * 2 * lam
    d = z - (z * w).sum() / w.sum() + density
    return [float(x) for x in d]
