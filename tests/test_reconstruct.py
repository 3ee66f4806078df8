"""Block reconstruction: it lowers each block's output error and keeps every mask bit."""

import pytest
import torch

from sparsegpt_utils.models import capture_block_inputs, get_adapter, run_block
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.quant import QuantSpec
from sparsegpt_utils.reconstruct import reconstruct_block, relative_error, residual_writers
from sparsegpt_utils.solver import magnitude_mask
from tests.conftest import tiny_llama, tiny_opt

CALIB = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))


def pruned_first_block(make):
    """(block, inputs, dense targets, kwargs, masks): block 0 of a tiny model, magnitude-pruned."""
    model = make(layers=1)
    inputs, kwargs = capture_block_inputs(model, list(CALIB.split(2)))
    block = get_adapter(model).blocks(model)[0]
    with torch.no_grad():
        targets = [run_block(block, x, kwargs[x.shape[0]]) for x in inputs]
    masks = {}
    for group in get_adapter(model).linear_groups(block):
        for _, layer in group:
            mask = magnitude_mask(layer.weight, 0.3)
            with torch.no_grad():
                layer.weight.mul_(mask)
            masks[layer.weight] = mask
    return block, inputs, targets, kwargs, masks


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
@pytest.mark.parametrize("sublayers", [False, True])
def test_reconstruct_block_lowers_error_and_keeps_masks(make, sublayers):
    block, inputs, targets, kwargs, masks = pruned_first_block(make)
    parts = part_targets = None
    if sublayers:
        parts = residual_writers(get_adapter(make(layers=1)).linear_groups(block))
        assert len(parts) == 2  # attention output and MLP output projections
        part_targets = []
        for x in inputs:
            seen = []
            hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.detach())) for m in parts]
            with torch.no_grad():
                run_block(block, x, kwargs[x.shape[0]])
            for h in hooks:
                h.remove()
            part_targets.append([s * 1.05 for s in seen])  # targets a pruned block cannot meet
    with torch.no_grad():
        before = relative_error([run_block(block, x, kwargs[x.shape[0]]) for x in inputs], targets)
    res = reconstruct_block(block, inputs, targets, kwargs, masks, steps=30, lr=1e-3,
                            parts=parts, part_targets=part_targets)
    assert res.error_before == pytest.approx(before, rel=1e-5)
    if not sublayers:
        assert res.error_after < 0.9 * res.error_before
    assert res.error_after <= res.error_before
    with torch.no_grad():
        after = relative_error([run_block(block, x, kwargs[x.shape[0]]) for x in inputs], targets)
    assert after == pytest.approx(res.error_after, rel=1e-4)
    for weight, mask in masks.items():
        assert not weight[~mask].any()


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
@pytest.mark.parametrize("targets,parts", [("dense-inputs", "block"), ("pruned-inputs", "sublayers")])
def test_prune_model_reconstruct_every_block(make, targets, parts):
    model = make(layers=3)
    res = prune_model(model, CALIB, PruneConfig(
        method="sparsegpt", density=0.4, reconstruct=True, reconstruct_steps=10, reconstruct_lr=1e-3,
        reconstruct_targets=targets, reconstruct_parts=parts, calibration_batch_size=2), progress=False)
    blocks = res.blocks
    assert len(blocks) == 3 and res.reconstruct
    assert (blocks.reconstruct_error_after < blocks.reconstruct_error_before).all()
    for name, layer in get_adapter(model).blocks(model).named_modules():
        if isinstance(layer, torch.nn.Linear):
            key = f"{get_adapter(model).blocks_path}.{name}"
            assert not layer.weight[~res.masks[key]].any(), key


def test_reconstruct_keeps_quantized_weights_on_their_grid():
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    cfg = dict(method="sparsegpt", density=0.5, quant=QuantSpec(4), calibration_batch_size=2)
    prune_model(a, CALIB, PruneConfig(**cfg), progress=False)
    prune_model(b, CALIB, PruneConfig(**cfg, reconstruct=True, reconstruct_steps=5, reconstruct_lr=1e-3),
                progress=False)
    # block 0 saw the same inputs: its quantized weights are untouched; its norms were fitted
    la, lb = a.model.layers[0], b.model.layers[0]
    assert torch.equal(la.mlp.down_proj.weight, lb.mlp.down_proj.weight)
    assert not torch.equal(la.input_layernorm.weight, lb.input_layernorm.weight)


def test_reconstruct_errors_on_the_checked_batches():
    model = tiny_llama(layers=1)
    inputs, kwargs = capture_block_inputs(model, list(CALIB.split(1)))
    block = get_adapter(model).blocks(model)[0]
    with torch.no_grad():
        targets = [run_block(block, x, kwargs[x.shape[0]]) * 1.02 for x in inputs]
        before = relative_error([run_block(block, x, kwargs[1]) for x in inputs[:2]], targets[:2])
    masks = {}
    for group in get_adapter(model).linear_groups(block):
        for _, layer in group:
            masks[layer.weight] = magnitude_mask(layer.weight, 1.0)  # nothing pruned: errors from the targets
    res = reconstruct_block(block, inputs, targets, kwargs, masks, steps=8, lr=1e-3, error_batches=2)
    assert res.error_before == pytest.approx(before, rel=1e-5)
    assert len(res.outputs) == len(inputs)  # every batch's output, whatever was checked
    with torch.no_grad():
        after = relative_error([run_block(block, x, kwargs[1]) for x in inputs[:2]], targets[:2])
    assert after == pytest.approx(res.error_after, rel=1e-4) and res.error_after <= res.error_before
    with pytest.raises(ValueError, match="error_batches"):
        reconstruct_block(block, inputs, targets, kwargs, masks, error_batches=0)
