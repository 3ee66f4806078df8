"""The sequential pruning pipeline (DESIGN §2): capture → per block: Hessians → solve → replay.

Each block sees the calibration data exactly twice: once to collect the Hessians of its
linear layers (from the outputs of the blocks before it, already pruned), once after solving
to produce the next block's inputs. Layers that read the same input (q/k/v, gate/up) share
one Hessian and are solved as one stacked matrix, each keeping its own mask.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn

from .admm import admm_prune, exact_update
from .mixed_precision import BitAllocator, MixedPrecisionConfig, QuantizationStats, build_allocator
from .models import get_adapter, run_block
from .owl import block_params, outlier_ratios, owl_densities
from .quant import QuantGrid, QuantSpec, rtn_quantize
from .reconstruct import reconstruct_block, residual_writers
from .replay import replay_blocks, run_inputs
from .solver import (
    EmptyRowsWarning,
    HessianAccumulator,
    check_density,
    magnitude_mask,
    nm_text,
    parse_nm,
    sparsegpt_solve,
    wanda_mask,
)

__all__ = ["METHODS", "PruneConfig", "PruneResult", "prune_model", "prune_setting_keys"]

METHODS = ("sparsegpt", "wanda", "magnitude", "admm")
# the exact update's conjugate-gradient tolerance in the pipeline: at a 1e-3 relative residual
# the layer's output error is within ~1e-5 (relative) of its minimum, for a fifth of the
# iterations that the float32 floor (admm.exact_update's default) takes
EXACT_TOL = 1e-3
RECONSTRUCT_TARGETS = ("dense-inputs", "pruned-inputs")
RECONSTRUCT_PARTS = ("block", "sublayers")

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
    spread, owl_m the outlier threshold (× the mean Wanda score), owl_samples how many
    calibration samples (the first ones; None: all) the outlier ratios are measured on.
    exact_update: after the mask is chosen, the exact (ADMM) weight update for that mask.
    reconstruct: after a block's layers are pruned, ``reconstruct_steps`` optimizer steps
    (learning rate ``reconstruct_lr``) fit the pruned block to the dense block's outputs, masks kept;
    ``reconstruct_targets``: the dense block's outputs on the dense model's own inputs
    ("dense-inputs") or on the pruned model's inputs ("pruned-inputs"); ``reconstruct_parts``:
    fit the block's output ("block") or its attention and MLP outputs each ("sublayers").
    mixed: mixed-precision quantization under a bit budget (needs ``quant``: its groupsize and
    symmetry; the widths come from the budget).
    act_order: when quantizing, SparseGPT/GPTQ sweep the columns in decreasing ``diag H``,
    grouped grids fixed before the sweep (see :func:`solver.sparsegpt_solve`); on by default
    (it lowered 4-bit per-row perplexity by 15 % on smollm2-135m, bench/README.md). Pruning
    without quantization keeps the columns in their order, as SparseGPT does.
    true_sequential: each group of layers of a block (q/k/v, o, gate/up, down) takes its
    Hessian from the block with the groups before it already solved, as GPTQ's
    ``--true-sequential`` does (a partial forward of the block per group); off, every group's
    Hessian comes from the block as it was, in one forward, as SparseGPT's reference does.
    ``None`` (the default): on when quantizing (it lowered 4-bit per-row perplexity by 4 % on
    smollm2-135m, bench/README.md), off when only pruning (the reference's results).
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
    # 8 × 2048 tokens give block densities within 0.0075 (mean 0.002) of 32 × 2048's on
    # smollm2-135m at density 0.5, for a quarter of the dense pass (bench/README.md)
    owl_samples: int | None = 8
    exact_update: bool = False
    reconstruct: bool = False
    reconstruct_steps: int = 20
    reconstruct_lr: float = 1e-4
    reconstruct_targets: str = "dense-inputs"
    reconstruct_parts: str = "block"
    mixed: MixedPrecisionConfig | None = None
    act_order: bool = True
    true_sequential: bool | None = None

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
        if self.owl_samples is not None and self.owl_samples < 1:
            raise ValueError(f"owl_samples must be >= 1 (or None: all), got {self.owl_samples}")
        if self.reconstruct and (self.reconstruct_steps < 1 or not self.reconstruct_lr > 0):
            raise ValueError(f"reconstruct_steps must be >= 1 and reconstruct_lr > 0, "
                             f"got {self.reconstruct_steps}, {self.reconstruct_lr}")
        if self.reconstruct_targets not in RECONSTRUCT_TARGETS:
            raise ValueError(f"reconstruct_targets must be one of {RECONSTRUCT_TARGETS}, "
                             f"got {self.reconstruct_targets!r}")
        if self.reconstruct_parts not in RECONSTRUCT_PARTS:
            raise ValueError(f"reconstruct_parts must be one of {RECONSTRUCT_PARTS}, "
                             f"got {self.reconstruct_parts!r}")
        if (self.mixed is not None or self.bit_allocator is not None) and self.quant is None:
            raise ValueError("mixed precision (mixed / bit_allocator) needs quant (the grid: groupsize, sym)")
        if self.mixed is not None and self.quant is not None:
            self.mixed.unit_for(self.quant.groupsize)  # "group" needs a groupsize
            self.mixed.error_model_for(self.quant.groupsize)  # "rounding" needs one too
        if self.mixed is not None and self.bit_allocator is not None:
            raise ValueError("give mixed (a budget) or bit_allocator (an explicit allocator), not both")
        if self.bit_allocator is not None and not isinstance(self.bit_allocator, BitAllocator):
            raise ValueError("bit_allocator must be a mixed_precision.BitAllocator (__call__, refit, "
                             "widths, stats); wrap a plain function in mixed_precision.FixedWidths")
        if self.blocksize % self.mask_blocksize and self.mask_blocksize % self.blocksize:
            raise ValueError(f"one of B={self.blocksize} and Bs={self.mask_blocksize} must divide the other")

    @property
    def sequential_groups(self) -> bool:
        """Whether true-sequential applies: as set, or (``None``) when quantizing."""
        return self.quant is not None if self.true_sequential is None else bool(self.true_sequential)

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
    # one row per block: block, params, density_target (and reconstruct_error_before/_after,
    # Σ‖block(x) − y‖² / Σ‖y‖² on the first 4 calibration batches, with reconstruct)
    blocks: pd.DataFrame | None = None
    block_densities: list[float] | None = None  # per-block densities used (OWL or given)
    owl: bool = False
    exact_update: bool = False
    reconstruct: bool = False

    def row(self) -> dict:
        """The result-row keys this run adds (DESIGN §4): owl, block_densities, exact_update,
        reconstruct."""
        return {"owl": self.owl, "block_densities": self.block_densities,
                "exact_update": self.exact_update, "reconstruct": self.reconstruct}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def prune_setting_keys(config: PruneConfig) -> dict:
    """The result-row keys (DESIGN §4) of what ``config`` asks of every layer: the method, the
    pattern, the quantization grid and budget, the solver's settings, OWL and reconstruction.

    Quantization-only keys are None for a run that does not quantize. Keys of options added
    after the first results (true-sequential, the clipping search, the reconstruction targets
    and parts) appear only when set away from their old behaviour, so earlier rows stay
    comparable; OWL's and reconstruction's own settings appear only when those are on.
    """
    quant, mixed = config.quant, config.mixed
    bits = quant.bits if quant is not None and mixed is None else None
    row = {
        "method": config.method, "nm": nm_text(config.nm),
        "wbits": int(bits) if bits is not None and not torch.is_tensor(bits) else None,
        "groupsize": quant.groupsize if quant is not None else None,
        "sym": bool(quant.sym) if quant is not None else None,
        "act_order": bool(config.act_order) if quant is not None else None,
        "target_avg_bits": mixed.target_avg_bits if mixed else None,
        "bit_method": mixed.method if mixed else None,
        "mixed_unit": mixed.unit_for(quant.groupsize) if mixed else None,
        "error_model": mixed.error_model_for(quant.groupsize) if mixed else None,
        "percdamp": config.percdamp, "blocksize": config.blocksize, "mask_blocksize": config.mask_blocksize,
        "owl": config.owl, "exact_update": config.exact_update, "reconstruct": config.reconstruct,
    }
    if config.sequential_groups:
        row["true_sequential"] = True
    if quant is not None and quant.mse:
        row["mse"] = True
    if config.owl:
        row.update(owl_lambda=config.owl_lambda, owl_m=config.owl_m, owl_samples=config.owl_samples)
    if config.reconstruct:
        row.update(reconstruct_steps=config.reconstruct_steps, reconstruct_lr=config.reconstruct_lr)
        defaults = PruneConfig.__dataclass_fields__
        for key in ("reconstruct_targets", "reconstruct_parts"):
            if getattr(config, key) != defaults[key].default:
                row[key] = getattr(config, key)
    return row


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

    ``config.owl``: the per-block densities come from the outlier ratios of the *dense* model
    (one forward pass of the calibration through the blocks before pruning, as OWL defines
    them), with parameter-weighted mean exactly ``config.density``. ``config.reconstruct``:
    after its layers are solved, each block is fitted to the dense block's outputs
    (:mod:`reconstruct`), and the next block's inputs come from the fitted block.
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
    if config.owl and config.block_densities is not None:
        raise ValueError("give owl (densities from outlier ratios) or block_densities, not both")
    if config.mixed is not None:  # one allocator per run: it keeps the widths and their stats
        config = replace(config, mixed=None, bit_allocator=build_allocator(
            config.mixed, config.quant, config.density, config.nm, config.percdamp, config.mask_blocksize))
    needs_data = (config.method != "magnitude" or config.owl or config.exact_update
                  or config.reconstruct)
    # Wanda needs only ‖x_j‖ (diag H) — unless mixed precision or the exact update want full Hessians
    wanda_only = config.method == "wanda" and config.bit_allocator is None and not config.exact_update
    if needs_data and (calibration is None or calibration.ndim != 2):
        raise ValueError("calibration must be token ids [samples, seqlen] for every method but plain "
                         "magnitude (and for owl, exact_update, reconstruct)")

    if config.owl:
        ratios = outlier_ratios(model, calibration[:config.owl_samples], config.owl_m, device, progress,
                                config.calibration_batch_size, offload_activations)
        params = block_params(model)
        densities = owl_densities(ratios, config.density, config.owl_lambda, params)
        achieved = sum(d * n for d, n in zip(densities, params)) / sum(params)
        assert abs(achieved - config.density) < 1e-6, (achieved, config.density)
        config = replace(config, block_densities=densities)

    rows, block_rows, masks, grids = [], [], {}, {}
    solver_seconds = 0.0
    dense_inputs = None  # the dense model's own block inputs (reconstruction targets from them)
    steps = replay_blocks(model, calibration if needs_data else None, device, storage,
                          config.calibration_batch_size, progress, f"{config.method} blocks")
    for step in steps:
        index, block, inputs, kwargs = step.index, step.block, step.inputs, step.kwargs
        groups = adapter.linear_groups(block)
        parts = residual_writers(groups) if config.reconstruct_parts == "sublayers" else []
        if not config.shared_hessians:  # the reference behaviour: one Hessian per layer
            groups = [[layer] for group in groups for layer in group]
        density = config.density_of_block(index)

        accumulators: dict[int, HessianAccumulator] = {}
        targets = part_targets = None
        if needs_data:
            hooked = {}
            for g, group in enumerate(groups):
                layer = group[0][1]
                accumulators[g] = HessianAccumulator(
                    layer.in_features, device, diagonal_only=wanda_only,
                    name=f"{adapter.blocks_path}.{index}.{group[0][0]}")
                if g == 0 or not config.sequential_groups:
                    hooked[layer] = accumulators[g]
            from_pruned = config.reconstruct and config.reconstruct_targets == "pruned-inputs"
            if from_pruned:  # pass 1: Hessians, and the block's outputs as targets
                with _capture(parts, storage) as captured, _accumulating(hooked):
                    targets, part_targets = run_inputs(step), captured
            else:  # pass 1: Hessians only, each forward stopped once the last hooked layer has its input
                _accumulate_inputs(step, hooked)
            if config.reconstruct and config.reconstruct_targets == "dense-inputs":
                if dense_inputs is None:
                    dense_inputs = list(inputs)
                with _capture(parts, storage) as captured:  # the dense block on the dense model's inputs
                    dense_inputs = run_inputs(step, dense_inputs)
                targets, part_targets = dense_inputs, captured

        t0 = time.perf_counter()
        for g, group in enumerate(groups):
            names = [f"{adapter.blocks_path}.{index}.{n}" for n, _ in group]
            if needs_data and config.sequential_groups and g > 0:  # inputs from the solved groups
                forward_start = time.perf_counter()
                _accumulate_inputs(step, {group[0][1]: accumulators[g]})
                t0 += time.perf_counter() - forward_start  # a forward, not solver time
            hessian = accumulators[g].hessian if needs_data else None
            with warnings.catch_warnings():  # counted per layer below, reported once per run
                warnings.simplefilter("ignore", EmptyRowsWarning)
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
                    # rows that had a weight and keep none: their outputs are the bias alone
                    "empty_rows": int((~mask.any(1)).sum()),
                    "loss": loss, "seconds": secs,
                })
        solver_seconds += time.perf_counter() - t0
        del accumulators

        layers = [m for group in groups for _, m in group]
        block_row = {"block": index, "params": sum(m.weight.numel() for m in layers),
                     "density_target": density if config.nm is None else config.nm[0] / config.nm[1]}
        if config.reconstruct:
            by_name = dict(zip([f"{adapter.blocks_path}.{index}.{n}" for g in groups for n, _ in g], layers))
            rec = reconstruct_block(
                block, inputs, targets, kwargs,
                {by_name[n].weight: masks[n] for n in by_name},
                config.reconstruct_steps, config.reconstruct_lr, device, parts or None, part_targets,
                frozen={m.weight for m in layers} if config.quant is not None else None)
            step.outputs = [o.to(step.storage) for o in rec.outputs]
            block_row.update(reconstruct_error_before=rec.error_before,
                             reconstruct_error_after=rec.error_after)
            del targets, part_targets, rec
        block_rows.append(block_row)

    table = pd.DataFrame(rows)
    if len(table) and table["empty_rows"].any():
        hit = table[table["empty_rows"] > 0]
        warnings.warn(f"{len(hit)} of {len(table)} pruned layers have rows that keep no weight "
                      f"({int(hit['empty_rows'].sum())} rows; their outputs are zeroed): see the "
                      "layer table's empty_rows column", EmptyRowsWarning, stacklevel=3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    used = None if config.block_densities is None else [float(d) for d in config.block_densities]
    return PruneResult(table, masks, grids, time.perf_counter() - start, solver_seconds,
                       peak, getattr(config.bit_allocator, "stats", None), blocks=pd.DataFrame(block_rows),
                       block_densities=used,
                       owl=config.owl, exact_update=config.exact_update, reconstruct=config.reconstruct)


class _InputsSeen(Exception):
    """Raised by the hook of :func:`_accumulate_inputs` once every hooked layer has its input."""


def _accumulate_inputs(step, accumulators: dict[nn.Module, HessianAccumulator]) -> None:
    """Add each layer's input on every calibration batch of the block to its accumulator;
    each forward stops once every layer has had its input (the rest of the block, e.g. the
    MLP's down projection when it is the last layer, is not run)."""
    seen: set[nn.Module] = set()

    def stop_when_all_seen(layer):
        seen.add(layer)
        if len(seen) == len(accumulators):
            raise _InputsSeen

    with _accumulating(accumulators, stop_when_all_seen):
        for x in step.inputs:
            seen.clear()
            try:
                run_block(step.block, x.to(step.device), step.kwargs[x.shape[0]])
            except _InputsSeen:
                pass


@contextmanager
def _accumulating(accumulators: dict[nn.Module, HessianAccumulator], then=None):
    """While open, each layer's input goes to its accumulator (then ``then(layer)``)."""
    def hook(layer, inp):
        accumulators[layer].add(inp[0])
        if then is not None:
            then(layer)

    handles = [layer.register_forward_pre_hook(hook) for layer in accumulators]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _capture(modules: list[nn.Module], storage: torch.device):
    """Collect, per forward of the block, the outputs of ``modules`` (one list per call of the
    first module): ``captured[i][p]`` is module p's output in the i-th block run."""
    captured: list[list[torch.Tensor]] = []

    def hook(index):
        def record(_m, _inp, out):
            if index == 0:
                captured.append([])
            captured[-1].append(out.detach().to(storage))
        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _solve_group(config, names, layers, hessian, density, accumulator):
    """Solve the layers of one input group; writes the weights and returns, per layer,
    (mask, grid, loss, seconds)."""
    if config.method == "admm" or config.exact_update:
        return _solve_exact(config, names, layers, hessian, density, accumulator)
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


def _solve_exact(config, names, layers, hessian, density, accumulator):
    """``admm``, or any method's mask followed by the exact update, on the stacked weights of
    one input group (rows are independent: stacking changes nothing but the speed). With
    ``quant`` the kept weights are then quantized by the GPTQ sweep on the fixed mask.
    Writes the weights; returns per layer (mask, grid, loss, seconds), loss being the group's
    ``½ Σ (ŵ − w)ᵀ(H + λI)(ŵ − w)`` (plus the sweep's own loss when quantized) split evenly."""
    t0 = time.perf_counter()
    prior = config.prior_masks or {}
    weight = torch.cat([layer.weight for layer in layers]).float()
    prior_mask = None
    if any(n in prior for n in names):
        prior_mask = torch.cat([
            prior.get(n, torch.ones_like(layer.weight, dtype=torch.bool)).to(weight.device)
            for n, layer in zip(names, layers)])
    segments = [layer.out_features for layer in layers]
    start = None
    if config.method == "admm":
        res = admm_prune(weight, hessian, density, config.nm, segments, prior_mask, config.percdamp,
                         tol=EXACT_TOL)
        mask, start = res.mask, res.weight  # already the exact update: the solve below checks it
    elif config.method == "sparsegpt":
        res = sparsegpt_solve(weight, hessian, density, config.nm, None, config.blocksize,
                              config.mask_blocksize, config.percdamp, segments=segments,
                              prior_mask=prior_mask, name="+".join(names))
        mask, start = res.mask, res.weight
    else:  # each layer's own mask (magnitude compares within a matrix)
        chunks = prior_mask.split(segments) if prior_mask is not None else [None] * len(layers)
        mask = torch.cat([
            wanda_mask(layer.weight, accumulator.column_norms(), density, config.nm, p, name=n)
            if config.method == "wanda" else magnitude_mask(layer.weight, density, config.nm, p, name=n)
            for n, layer, p in zip(names, layers, chunks)])
    mask = mask & (torch.diagonal(hessian) != 0)[None, :].to(mask.device)  # dead inputs are zeroed
    new = exact_update(weight, hessian, mask, config.percdamp, start=start, tol=EXACT_TOL)
    delta = new - weight
    damped = hessian + config.percdamp * torch.diagonal(hessian).mean() * torch.eye(
        hessian.shape[0], device=hessian.device)
    loss = float(((delta @ damped) * delta).sum() / 2)
    grid = None
    if config.quant is not None:  # the GPTQ sweep with the mask fixed (density 1 of the allowed)
        res = _sparsegpt(replace(config, nm=None), names, layers, new, hessian, 1.0, mask)
        new, grid, loss = res.weight, res.grid, loss + res.loss
    secs = (time.perf_counter() - t0) / len(layers)
    out, begin = [], 0
    for layer in layers:
        stop = begin + layer.out_features
        layer.weight.copy_(new[begin:stop])
        part = None
        if grid is not None:
            part = QuantGrid(grid.scale[begin:stop], grid.zero[begin:stop], grid.bits[begin:stop],
                             grid.groupsize)
        out.append((mask[begin:stop], part, loss / len(layers), secs))
        begin = stop
    return out


def _sparsegpt(config, names, layers, weight, hessian, density, prior_mask):
    """SparseGPT on ``weight``: one layer's, or the stacked weights of ``layers`` sharing one
    Hessian (each keeping its own mask selection). With mixed precision and pruning the
    widths are re-planned once on the mask the first solve chose (:func:`_refit_quant`)."""
    segments = [layer.out_features for layer in layers] if len(layers) > 1 else None

    def solve(quant):
        return sparsegpt_solve(weight, hessian, density, config.nm, quant, config.blocksize,
                               config.mask_blocksize, config.percdamp, segments=segments,
                               prior_mask=prior_mask, name="+".join(names),
                               act_order=config.act_order and quant is not None)

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
