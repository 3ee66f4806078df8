"""The sequential pruning pipeline (DESIGN §2): capture → per block: Hessians → solve → replay.

Each block sees the calibration data exactly twice: once to collect the Hessians of its
linear layers (from the outputs of the blocks before it, already pruned), once after solving
to produce the next block's inputs. Layers that read the same input (q/k/v, gate/up) share
one Hessian and are solved as one stacked matrix, each keeping its own mask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .mixed_precision import BitAllocator, MixedPrecisionConfig, QuantizationStats, build_allocator
from .models import capture_block_inputs, get_adapter, run_block
from .quant import QuantGrid, QuantSpec, rtn_quantize
from .solver import (
    HessianAccumulator,
    check_density,
    magnitude_mask,
    parse_nm,
    sparsegpt_solve,
    wanda_mask,
)

__all__ = ["METHODS", "PruneConfig", "PruneResult", "prune_model"]

METHODS = ("sparsegpt", "wanda", "magnitude", "admm")

@dataclass
class PruneConfig:
    """What to do to every linear layer of the decoder blocks.

    density: fraction of weights KEPT, in (0, 1]; ignored when ``nm`` is given.
    block_densities: one density per block (e.g. OWL), overriding ``density``.
    quant: joint quantization (GPTQ-style for sparsegpt, round-to-nearest for the baselines).
    bit_allocator: an explicit mixed-precision hook (:class:`mixed_precision.BitAllocator`)
    giving each row its bit width; normally built from ``mixed`` instead.
    prior_masks: masks from an earlier step (layer name -> bool, True = may be kept).
    owl: per-block densities from outlier ratios (OWL), same global density; owl_lambda is the
    spread, owl_m the outlier threshold (× the mean Wanda score).
    exact_update: after the mask is chosen, the exact (ADMM) weight update for that mask.
    reconstruct: after a block's layers are pruned, ``reconstruct_steps`` optimizer steps
    (learning rate ``reconstruct_lr``) fit the pruned block to the dense block's outputs, masks kept.
    mixed: mixed-precision quantization under a bit budget (needs ``quant``: its groupsize and
    symmetry; the widths come from the budget).
    act_order: SparseGPT/GPTQ sweep the columns in decreasing ``diag H``, grouped grids fixed
    before the sweep (see :func:`solver.sparsegpt_solve`).
    """

    method: str = "sparsegpt"
    density: float = 0.5
    nm: tuple[int, int] | str | None = None
    quant: QuantSpec | None = None
    blocksize: int = 128
    mask_blocksize: int = 128
    percdamp: float = 0.01
    calibration_batch_size: int = 1
    shared_hessians: bool = True
    block_densities: Sequence[float] | None = None
    bit_allocator: BitAllocator | None = None
    prior_masks: dict[str, torch.Tensor] | None = None
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    exact_update: bool = False
    reconstruct: bool = False
    reconstruct_steps: int = 20
    reconstruct_lr: float = 1e-4
    mixed: MixedPrecisionConfig | None = None
    act_order: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.nm = parse_nm(self.nm)
        check_density(self.density)
        if self.block_densities is not None:
            for d in self.block_densities:
                check_density(d, "block_densities")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp (EPSILON) must be in [0, 1), got {self.percdamp}")
        if self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be >= 1, got {self.calibration_batch_size}")
        if self.blocksize < 1 or self.mask_blocksize < 1:
            raise ValueError(f"B and Bs must be >= 1, got B={self.blocksize}, Bs={self.mask_blocksize}")
        if self.owl and self.nm is not None:
            raise ValueError("owl (layer-wise densities) does not apply to N:M patterns: drop --owl or --nm")
        if self.owl and not (self.owl_lambda >= 0 and self.owl_m > 0):
            raise ValueError(f"owl_lambda must be >= 0 and owl_m > 0, got {self.owl_lambda}, {self.owl_m}")
        if self.reconstruct and (self.reconstruct_steps < 1 or not self.reconstruct_lr > 0):
            raise ValueError(f"reconstruct_steps must be >= 1 and reconstruct_lr > 0, "
                             f"got {self.reconstruct_steps}, {self.reconstruct_lr}")
        if (self.mixed is not None or self.bit_allocator is not None) and self.quant is None:
            raise ValueError("mixed precision (mixed / bit_allocator) needs quant (the grid: groupsize, sym)")
        if self.mixed is not None and self.bit_allocator is not None:
            raise ValueError("give mixed (a budget) or bit_allocator (an explicit allocator), not both")
        if self.bit_allocator is not None and not isinstance(self.bit_allocator, BitAllocator):
            raise ValueError("bit_allocator must be a mixed_precision.BitAllocator (__call__, refit, "
                             "widths, stats); wrap a plain function in mixed_precision.FixedWidths")
        if self.blocksize % self.mask_blocksize and self.mask_blocksize % self.blocksize:
            raise ValueError(f"one of B={self.blocksize} and Bs={self.mask_blocksize} must divide the other")

    def density_of_block(self, index: int) -> float:
        return 1.0 if self.nm else (
            self.block_densities[index] if self.block_densities is not None else self.density)


@dataclass
class PruneResult:
    layers: pd.DataFrame  # one row per pruned linear layer
    masks: dict[str, torch.Tensor] = field(repr=False)  # name -> bool [rows, cols] (cpu)
    grids: dict[str, QuantGrid] = field(repr=False)  # name -> grid, when quantized
    seconds: float = 0.0
    solver_seconds: float = 0.0  # factorizations + sweeps (Hessians accumulate during the forwards)
    peak_gpu_mb: float | None = None  # peak CUDA memory allocated while pruning, MiB
    quant_stats: QuantizationStats | None = field(default=None, repr=False)  # mixed precision: widths, bits


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    config: PruneConfig,
    device: str | torch.device | None = None,
    progress: bool = True,
    offload_activations: bool = False,
) -> PruneResult:
    """Prune ``model`` in place; ``calibration`` is token ids [samples, seqlen].

    ``device``: where each block runs (default: where the model is). The model may stay on
    CPU while one block at a time visits the GPU. ``offload_activations``: keep the blocks'
    inputs on the CPU between blocks, moving one calibration batch at a time to ``device``,
    so that GPU memory holds one block, its Hessians and one batch: a model and calibration
    set larger than the GPU prune on it. Activations keep the model's dtype (a float16 /
    bfloat16 model runs its blocks in half precision); Hessians are always accumulated and
    solved in float32.
    """
    start = time.perf_counter()
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    device = torch.device(device) if device is not None else _device_of(model)
    storage = torch.device("cpu") if offload_activations else device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if config.block_densities is not None and len(config.block_densities) != len(blocks):
        raise ValueError(
            f"block_densities has {len(config.block_densities)} entries for {len(blocks)} blocks")
    unbuilt = [name for name, on in (("method admm", config.method == "admm"), ("owl", config.owl),
                                     ("exact_update", config.exact_update),
                                     ("reconstruct", config.reconstruct))
               if on]
    if unbuilt:
        raise NotImplementedError(f"not available yet: {', '.join(unbuilt)}")
    if config.mixed is not None:  # one allocator per run: it keeps the widths and their stats
        config = replace(config, mixed=None, bit_allocator=build_allocator(
            config.mixed, config.quant, config.density, config.nm, config.percdamp, config.mask_blocksize))
    needs_data = config.method != "magnitude"
    # Wanda needs only ‖x_j‖ (diag H) — unless mixed precision wants full Hessians
    wanda_only = config.method == "wanda" and config.bit_allocator is None
    if needs_data and (calibration is None or calibration.ndim != 2):
        raise ValueError("calibration must be token ids [samples, seqlen] for sparsegpt and wanda")

    inputs, kwargs = [], {}
    if needs_data:
        batches = list(calibration.split(config.calibration_batch_size))
        inputs, kwargs = capture_block_inputs(model, batches, device, storage=storage)

    rows, masks, grids = [], {}, {}
    solver_seconds = 0.0
    bar = tqdm(enumerate(blocks), total=len(blocks), desc=f"{config.method} blocks",
               disable=not progress)
    for index, block in bar:
        home = _device_of(block)
        block.to(device)
        groups = adapter.linear_groups(block)
        if not config.shared_hessians:  # the reference behaviour: one Hessian per layer
            groups = [[layer] for group in groups for layer in group]
        density = config.density_of_block(index)

        accumulators: dict[int, HessianAccumulator] = {}
        if needs_data:
            handles = []
            for g, group in enumerate(groups):
                layer = group[0][1]
                accumulators[g] = HessianAccumulator(
                    layer.in_features, device, diagonal_only=wanda_only,
                    name=f"{adapter.blocks_path}.{index}.{group[0][0]}")
                handles.append(layer.register_forward_hook(
                    lambda _m, inp, _out, acc=accumulators[g]: acc.add(inp[0])))
            for x in inputs:  # pass 1: Hessians
                run_block(block, x.to(device), kwargs[x.shape[0]])
            for h in handles:
                h.remove()

        t0 = time.perf_counter()
        for g, group in enumerate(groups):
            names = [f"{adapter.blocks_path}.{index}.{n}" for n, _ in group]
            hessian = accumulators[g].hessian if needs_data else None
            solved = _solve_group(config, names, [m for _, m in group], hessian, density,
                                  accumulators.get(g))
            for name, (_, layer), (mask, grid, loss, secs) in zip(names, group, solved):
                masks[name] = mask.cpu()
                if grid is not None:
                    grids[name] = grid
                rows.append({
                    "layer": name, "block": index, "rows": layer.out_features,
                    "columns": layer.in_features, "params": layer.weight.numel(),
                    "density_target": density if config.nm is None else config.nm[0] / config.nm[1],
                    "density": float(mask.float().mean()),
                    "sparsity": 1 - float(mask.float().mean()),
                    "loss": loss, "seconds": secs,
                })
        solver_seconds += time.perf_counter() - t0

        if index + 1 < len(blocks):
            for j, x in enumerate(inputs):  # pass 2: the next block's inputs, replacing these
                inputs[j] = run_block(block, x.to(device), kwargs[x.shape[0]]).to(storage)
        block.to(home)
        del accumulators

    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return PruneResult(pd.DataFrame(rows), masks, grids, time.perf_counter() - start, solver_seconds,
                       peak, getattr(config.bit_allocator, "stats", None))


def _solve_group(config, names, layers, hessian, density, accumulator):
    """Solve the layers of one input group; writes the weights and returns, per layer,
    (mask, grid, loss, seconds)."""
    prior = config.prior_masks or {}
    out = []
    if config.method == "sparsegpt" and config.shared_hessians and len(layers) > 1:
        t0 = time.perf_counter()
        weight = torch.cat([layer.weight for layer in layers])
        prior_mask = None
        if any(n in prior for n in names):
            prior_mask = torch.cat([
                prior.get(n, torch.ones_like(layer.weight, dtype=torch.bool)).to(weight.device)
                for n, layer in zip(names, layers)])
        res = _sparsegpt(config, names, layers, weight, hessian, density, prior_mask)
        secs = (time.perf_counter() - t0) / len(layers)
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.weight.copy_(res.weight[start:stop])
            grid = None
            if res.grid is not None:
                grid = QuantGrid(res.grid.scale[start:stop], res.grid.zero[start:stop],
                                 res.grid.bits[start:stop], res.grid.groupsize)
            # each layer's share of the loss is not separable cheaply; report the group's
            out.append((res.mask[start:stop], grid, res.loss / len(layers), secs))
            start = stop
        return out

    for name, layer in zip(names, layers):
        t0 = time.perf_counter()
        prior_mask = prior.get(name)
        weight = layer.weight
        if config.method == "sparsegpt":
            res = _sparsegpt(config, [name], [layer], weight, hessian, density, prior_mask)
            new, mask, grid, loss = res.weight, res.mask, res.grid, res.loss
        else:
            if config.method == "wanda":
                mask = wanda_mask(weight, accumulator.column_norms(), density, config.nm, prior_mask,
                                  name=name)
            else:
                mask = magnitude_mask(weight, density, config.nm, prior_mask, name=name)
            new, grid, loss = weight * mask, None, float("nan")
            quant = _row_quant(config, [name], [layer], hessian)
            if quant is not None:
                quant = _refit_quant(config, [name], [layer], hessian, mask) or quant
                new, grid = rtn_quantize(new, quant)
                new = new * mask
                _measure_bits(config, [name], [layer], mask)
        layer.weight.copy_(new)
        out.append((mask, grid, loss, time.perf_counter() - t0))
    return out


def _sparsegpt(config, names, layers, weight, hessian, density, prior_mask):
    """SparseGPT on ``weight``: one layer's, or the stacked weights of ``layers`` sharing one
    Hessian (each keeping its own mask selection). With mixed precision and pruning the
    widths are re-planned once on the mask the first solve chose (:func:`_refit_quant`)."""
    segments = [layer.out_features for layer in layers] if len(layers) > 1 else None

    def solve(quant):
        return sparsegpt_solve(weight, hessian, density, config.nm, quant, config.blocksize,
                               config.mask_blocksize, config.percdamp, segments=segments,
                               prior_mask=prior_mask, name="+".join(names), act_order=config.act_order)

    res = solve(_row_quant(config, names, layers, hessian))
    refit = _refit_quant(config, names, layers, hessian, res.mask)
    if refit is not None:
        res = solve(refit)
    _measure_bits(config, names, layers, res.mask)
    return res


def _refit_quant(config, names, layers, hessian, mask) -> QuantSpec | None:
    """Mixed precision with pruning: the widths were planned on predicted per-row kept
    counts; re-plan them on the mask the solver chose (``bit_allocator.refit``) and return the
    new spec, or None when no layer's widths change."""
    allocator = config.bit_allocator
    if config.quant is None or allocator is None or bool(mask.all()):
        return None
    new, changed, start = [], False, 0
    for name, layer in zip(names, layers):
        stop = start + layer.out_features
        bits = allocator.refit(name, layer.weight, hessian, mask[start:stop])
        changed |= bits is not None
        new.append(bits if bits is not None else allocator.widths(name))
        start = stop
    if not changed:
        return None
    return QuantSpec(torch.cat(new), config.quant.groupsize, config.quant.sym, config.quant.mse)


def _measure_bits(config, names, layers, mask) -> None:
    """Record the real stored bits of mixed-precision layers with their final masks
    (``mask``: the layers' masks stacked by rows)."""
    stats = None if config.bit_allocator is None else config.bit_allocator.stats
    if stats is None or config.quant is None:
        return
    stats.measure(dict(zip(names, mask.split([layer.out_features for layer in layers]))))


def _row_quant(config, names, layers, hessian) -> QuantSpec | None:
    if config.quant is None:
        return None
    if config.bit_allocator is None:
        return config.quant
    bits = torch.cat([config.bit_allocator(n, layer.weight, hessian).to(torch.int64).cpu()
                      for n, layer in zip(names, layers)])
    return QuantSpec(bits, config.quant.groupsize, config.quant.sym, config.quant.mse)
