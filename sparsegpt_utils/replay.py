"""The one block-replay loop: capture the first block's inputs, then per block: hand the block
and its inputs to the caller, and replace the inputs by the block's outputs.

Used by the pruning pipeline (prune.py) and by the OWL outlier ratios (owl.py), so that both
walk the blocks in exactly the same way (devices, offloading, keyword arguments).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import capture_block_inputs, get_adapter, run_block

__all__ = ["BlockStep", "replay_blocks", "run_inputs"]


@dataclass
class BlockStep:
    """One block of the replay. ``inputs``: the block's inputs, one [batch, seq, d] tensor
    per calibration batch, kept on ``storage``; ``kwargs``: the keyword arguments by batch
    size. The caller may set ``outputs`` (same layout as ``inputs``) to the block's final
    outputs when it has computed them anyway; otherwise the loop runs the block again."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor]
    kwargs: dict[int, dict]
    device: torch.device
    storage: torch.device
    outputs: list[torch.Tensor] | None = None


def run_inputs(step: BlockStep, inputs: list[torch.Tensor] | None = None,
               block: nn.Module | None = None) -> list[torch.Tensor]:
    """``block`` (default the step's) on each of ``inputs`` (default the step's), outputs on
    ``step.storage``."""
    block = step.block if block is None else block
    inputs = step.inputs if inputs is None else inputs
    return [run_block(block, x.to(step.device), step.kwargs[x.shape[0]]).to(step.storage)
            for x in inputs]


@torch.no_grad()
def replay_blocks(
    model: nn.Module,
    calibration: torch.Tensor | None,
    device: torch.device,
    storage: torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "blocks",
) -> Iterator[BlockStep]:
    """Yield one :class:`BlockStep` per decoder block, in order, with the block on ``device``.

    ``calibration``: token ids [samples, seqlen], split into batches of ``batch_size``; None
    walks the blocks without data (``inputs`` empty). After the caller's turn the inputs are
    replaced, batch by batch, by the block's outputs (``step.outputs`` if set), so that the
    next block sees what this block, as the caller left it, produces; the block then goes back
    where it was. The last block is not replayed (nothing reads its outputs).
    """
    storage = device if storage is None else storage
    blocks = get_adapter(model).blocks(model)
    inputs, kwargs = [], {}
    if calibration is not None:
        inputs, kwargs = capture_block_inputs(model, list(calibration.split(batch_size)), device,
                                              storage=storage)
    for index, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        step = BlockStep(index, block, inputs, kwargs, device, storage)
        yield step
        if step.outputs is not None:
            inputs[:] = step.outputs
        elif index + 1 < len(blocks):
            for j, x in enumerate(inputs):  # in place: one set of activations alive at a time
                inputs[j] = run_block(block, x.to(device), kwargs[x.shape[0]]).to(storage)
        step.outputs = None
        block.to(home)
