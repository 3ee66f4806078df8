"""Shared Hessians: layers that read the same input, solved as one stacked matrix, give the
same masks and weights as solving them one by one."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.quant import QuantSpec
from sparsegpt_utils.solver import sparsegpt_solve
from tests.conftest import tiny_llama, tiny_opt


def _hessian(cols: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven scales, like a real layer's
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x * torch.rand(cols, generator=g).add(0.2)
    return 2 * x.T @ x / tokens


def _layers(rows: list[int], cols: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, cols, generator=g) * (0.5 + i) for i, r in enumerate(rows)]


def _solve_both(rows, cols, density, **kw):
    """(stacked result, list of one-by-one results) for layers of ``rows`` sharing one Hessian."""
    H = _hessian(cols)
    weights = _layers(rows, cols)
    stacked = sparsegpt_solve(torch.cat(weights), H, density, segments=rows, **kw)
    dens = density if isinstance(density, list) else [density] * len(rows)
    single = [sparsegpt_solve(w, H, d, **kw) for w, d in zip(weights, dens, strict=True)]
    return stacked, single


def _assert_same(stacked, single):
    start = 0
    for res in single:
        stop = start + res.weight.shape[0]
        assert torch.equal(stacked.mask[start:stop], res.mask)
        torch.testing.assert_close(stacked.weight[start:stop], res.weight, rtol=1e-5, atol=1e-6)
        start = stop
    assert start == stacked.weight.shape[0]


@pytest.mark.parametrize("rows", [[48, 16, 16], [40, 40]])
def test_unstructured_same_as_one_by_one(rows):
    stacked, single = _solve_both(rows, 96, 0.5, blocksize=32, mask_blocksize=32)
    _assert_same(stacked, single)
    # each segment meets its own density, not just the stack on average
    for res in single:
        assert res.mask.float().mean().item() == pytest.approx(0.5, abs=1e-9)


def test_per_segment_densities():
    rows, dens = [32, 16, 24], [0.3, 0.5, 0.8]
    stacked, single = _solve_both(rows, 64, dens, blocksize=32, mask_blocksize=16)
    _assert_same(stacked, single)
    start = 0
    for r, d in zip(rows, dens, strict=True):
        got = stacked.mask[start:start + r].float().mean().item()
        assert got == pytest.approx(d, abs=1 / (r * 16))  # rounding per mask block
        start += r


def test_nm_same_as_one_by_one():
    stacked, single = _solve_both([32, 32, 16], 64, 1.0, nm=(2, 4), blocksize=32)
    _assert_same(stacked, single)
    groups = stacked.mask.reshape(stacked.mask.shape[0], -1, 4).sum(-1)
    assert int(groups.max()) <= 2


@pytest.mark.parametrize("groupsize", [None, 16])
def test_quantized_same_as_one_by_one(groupsize):
    quant = QuantSpec(bits=4, groupsize=groupsize)
    stacked, single = _solve_both([24, 24], 64, 0.6, quant=quant, blocksize=32, mask_blocksize=32)
    _assert_same(stacked, single)
    start = 0
    for res in single:
        stop = start + res.weight.shape[0]
        torch.testing.assert_close(stacked.grid.scale[start:stop], res.grid.scale)
        torch.testing.assert_close(stacked.grid.zero[start:stop], res.grid.zero)
        start = stop


def test_segments_must_add_up():
    H = _hessian(32)
    with pytest.raises(ValueError, match="segments"):
        sparsegpt_solve(torch.randn(20, 32), H, 0.5, segments=[10, 5])


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
@pytest.mark.parametrize("extra", [{"density": 0.4}, {"nm": "2:4"},
                                   {"density": 0.5, "quant": QuantSpec(bits=4, groupsize=32)}],
                         ids=["unstructured", "2:4", "quantized"])
def test_prune_model_shared_equals_one_by_one(make, extra):
    model = make()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = model, copy.deepcopy(model)
    cfg = dict(blocksize=32, mask_blocksize=32, **extra)
    ra = prune_model(a, calib, PruneConfig(shared_hessians=True, **cfg), progress=False)
    rb = prune_model(b, calib, PruneConfig(shared_hessians=False, **cfg), progress=False)
    assert ra.masks.keys() == rb.masks.keys()
    assert any("k_proj" in n for n in ra.masks)  # a group of more than one layer was solved
    for name in ra.masks:
        assert torch.equal(ra.masks[name], rb.masks[name]), name
    la, lb = pruned_linears(a), pruned_linears(b)
    for name in la:
        torch.testing.assert_close(la[name].weight, lb[name].weight, rtol=1e-4, atol=1e-5, msg=name)
    # and the models compute the same thing
    ids = calib[:1]
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
