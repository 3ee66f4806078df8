"""Sparse inference: pruned layers as CSR matrices compute what the dense layers compute, and
convert back to exactly the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.sparse_inference import (
    SparseLinear,
    densify,
    inference_formats,
    is_nm_sparse,
    sparsify_for_inference,
)
from tests.conftest import tiny_llama, tiny_opt


def _sparse_linear(rows=48, cols=40, density=0.2, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight *= torch.rand(rows, cols) < density
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(40,), (1, 40), (3, 7, 40)])
def test_sparse_linear_matches_float64_reference(bias, shape):
    layer = _sparse_linear(bias=bias)
    sparse = SparseLinear.from_linear(layer)
    x = torch.randn(*shape)
    ref = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    out = sparse(x)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert sparse.density == pytest.approx(torch.count_nonzero(layer.weight).item() / layer.weight.numel())


def test_sparse_linear_round_trip_is_exact():
    layer = _sparse_linear()
    back = SparseLinear.from_linear(layer).to_linear()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)


def _magnitude_pruned(make, density):
    model = make()
    prune_model(model, None, PruneConfig(method="magnitude", density=density), progress=False)
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_model_outputs_unchanged_and_round_trip(make):
    model = _magnitude_pruned(make, 0.2)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = dense(input_ids=ids).logits

    assert sparsify_for_inference(model, max_density=0.3) is model
    formats = inference_formats(model)
    assert len(formats) == len(pruned_linears(dense))
    assert (formats["format"] == "csr").all()
    assert formats["density"].max() <= 0.3
    assert isinstance(model.lm_head, nn.Linear)  # never touched
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)

    assert densify(model) is model
    assert (inference_formats(model)["format"] == "dense").all()
    for (name, a), b in zip(pruned_linears(model).items(), pruned_linears(dense).values(), strict=True):
        assert type(a) is nn.Linear, name
        assert torch.equal(a.weight, b.weight), name


def test_threshold_decides_which_layers_convert():
    # a layer pruned to exactly the threshold converts, whatever the rounding of its kept count
    at = sparsify_for_inference(_magnitude_pruned(tiny_llama, 0.3), max_density=0.3)
    assert (inference_formats(at)["format"] == "csr").all()
    model = _magnitude_pruned(tiny_llama, 0.5)
    sparsify_for_inference(model, max_density=0.3)
    assert (inference_formats(model)["format"] == "dense").all()
    sparsify_for_inference(model, max_density=0.5)
    assert (inference_formats(model)["format"] == "csr").all()
    # sparsifying twice changes nothing
    sparsify_for_inference(model, max_density=1.0)
    assert (inference_formats(model)["format"] == "csr").all()


def test_cached_greedy_decoding_agrees():
    model = _magnitude_pruned(tiny_llama, 0.1)
    dense = copy.deepcopy(model)
    sparsify_for_inference(model)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), dense.generate(ids, **kw))


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.3", True])
def test_bad_max_density_is_refused(bad):
    with pytest.raises(ValueError, match="max_density"):
        sparsify_for_inference(tiny_llama(), max_density=bad)


def test_semi_structured_needs_cuda_and_half_needs_float():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            sparsify_for_inference(tiny_llama(), semi_structured=True)
    with pytest.raises(ValueError, match="float32"):
        sparsify_for_inference(tiny_llama().half())


def test_is_nm_sparse():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [1, 1, 0, 0, 0, 1, 1, 0]])
    assert is_nm_sparse(w, 2, 4)
    w[1, 2] = 5
    assert not is_nm_sparse(w, 2, 4)
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)  # width not a multiple of 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need a CUDA GPU")
def test_semi_structured_2_4_on_cuda():
    model = tiny_llama().half().cuda()
    prune_model(model, None, PruneConfig(method="magnitude", nm="2:4"), progress=False)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 64), device="cuda")
    sparsify_for_inference(model, semi_structured=True)
    assert (inference_formats(model)["format"] == "semi_structured_2:4").any()
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    densify(model)
    for a, b in zip(pruned_linears(model).values(), pruned_linears(dense).values(), strict=True):
        assert torch.equal(a.weight, b.weight)
