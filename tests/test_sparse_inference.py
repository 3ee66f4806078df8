"""Sparse inference: pruned layers as bitmask + fp16 or CSR matrices compute what the dense layers
compute, and convert back to exactly the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsegpt_utils import kernels, sparse_inference
from sparsegpt_utils.models import pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.sparse_inference import (
    BitmaskLinear,
    HalfLinear,
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
    for p in model.parameters():  # as loaded from a compact checkpoint: fp16 values in float32
        p.data = p.data.half().float()
    return model


needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no C compiler: {kernels.build_error()}")


def _fp16_sparse(rows, cols, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).half().float()
    return w * (torch.rand(rows, cols, generator=g) < density)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(48, 40), (7, 33), (64, 576), (3, 1)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_bitmask_linear_matches_float64_reference(density, shape, tokens):
    w = _fp16_sparse(*shape, density)
    bias = torch.randn(shape[0])
    layer = BitmaskLinear.from_mask_values(w != 0, w[w != 0], bias)
    x = torch.randn(2, tokens, shape[1])
    ref = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dense_weight(), w)  # the stored weight is exactly the input
    assert layer.density == pytest.approx((w != 0).float().mean().item())


def test_bitmask_linear_without_the_compiled_kernels(monkeypatch):
    """Where no C compiler is found, the same layer runs on torch's kernels, with the same result."""
    w = _fp16_sparse(40, 70, 0.3)
    layer = BitmaskLinear.from_mask_values(w != 0, w[w != 0])
    x = torch.randn(1, 70)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(layer.dense_weight(), w)
    torch.testing.assert_close(layer(x).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler")
def test_portable_kernel_path_agrees_with_the_native_one(tmp_path):
    """The C code without CPU-specific instructions (what a machine without AVX-512 runs) gives
    the native build's results."""
    portable = kernels.bind(kernels.compile_library(tmp_path / "portable.so", native=False))
    assert portable.sgpt_has_avx512() == 0
    w = _fp16_sparse(37, 100, 0.4, seed=3)
    layer = BitmaskLinear.from_mask_values(w != 0, w[w != 0], torch.randn(37))
    x = torch.nn.functional.pad(torch.randn(100), (0, 28))
    ref = x[:100].double() @ w.double().T + layer.bias.double()
    got = kernels.gemv(x, layer.masks, layer.values, layer.offsets, layer.bias, 37, lib=portable)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    dense = kernels.decompress(layer.masks, layer.values, layer.offsets, 37, 100, lib=portable)
    assert torch.equal(dense, w)
    half = w.half().view(torch.int16)
    torch.testing.assert_close(kernels.half_gemv(x[:100].contiguous(), half, lib=portable).double(),
                               x[:100].double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_bitmask_needs_fp16_exact_weights():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="fp16"):
        BitmaskLinear.from_mask_values(w != 0, w[w != 0])
    with pytest.raises(ValueError, match="values were given"):
        BitmaskLinear.from_mask_values(torch.ones(8, 16, dtype=torch.bool), w.half().float()[:3])


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_model_outputs_unchanged_and_round_trip(make):
    model = _magnitude_pruned(make, 0.2)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = dense(input_ids=ids).logits

    assert sparsify_for_inference(model, kernel="csr", max_density=0.3, measure=False) is model
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
    kw = dict(kernel="csr", measure=False)
    at = sparsify_for_inference(_magnitude_pruned(tiny_llama, 0.3), max_density=0.3, **kw)
    assert (inference_formats(at)["format"] == "csr").all()
    model = _magnitude_pruned(tiny_llama, 0.5)
    sparsify_for_inference(model, max_density=0.3, **kw)
    assert (inference_formats(model)["format"] == "dense").all()
    sparsify_for_inference(model, max_density=0.5, **kw)
    assert (inference_formats(model)["format"] == "csr").all()
    # sparsifying twice changes nothing
    sparsify_for_inference(model, max_density=1.0, **kw)
    assert (inference_formats(model)["format"] == "csr").all()


@needs_kernels
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_bitmask_model_matches_dense_and_round_trips(make):
    model = _magnitude_pruned(make, 0.3)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    sparsify_for_inference(model, measure=False, half_dense=True)
    formats = inference_formats(model)
    assert (formats["format"] == "bitmask").all()
    assert isinstance(model.lm_head, HalfLinear)
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    densify(model)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, dense.lm_head.weight)
    for a, b in zip(pruned_linears(model).values(), pruned_linears(dense).values(), strict=True):
        assert type(a) is nn.Linear and torch.equal(a.weight, b.weight)


def test_auto_kernel_takes_bitmask_only_for_fp16_exact_weights():
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, measure=False)
    assert set(inference_formats(model)["format"]) == {"bitmask" if kernels.available() else "csr"}
    raw = tiny_llama()  # float32 weights that fp16 cannot hold exactly
    prune_model(raw, None, PruneConfig(method="magnitude", density=0.3), progress=False)
    sparsify_for_inference(raw, measure=False)
    assert set(inference_formats(raw)["format"]) == {"csr"}


def test_measured_choice_keeps_the_faster_of_sparse_and_dense(monkeypatch):
    """With measure=True a layer becomes sparse only where its one-token product timed faster."""
    def fake_seconds(layers, in_features, repeats=9, flush=None):
        sparse = 0.5 if in_features == 64 else 2.0
        return [1.0 if isinstance(layer, nn.Linear) else sparse for layer in layers]

    monkeypatch.setattr(sparse_inference, "decode_seconds", fake_seconds)
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, kernel="csr")
    formats = inference_formats(model).set_index("layer")["format"]
    wide = {n for n, m in pruned_linears(_magnitude_pruned(tiny_llama, 0.3)).items() if m.in_features == 64}
    assert {n for n, f in formats.items() if f == "csr"} == wide
    assert (formats.drop(index=list(wide)) == "dense").all()


def test_cached_greedy_decoding_agrees():
    model = _magnitude_pruned(tiny_llama, 0.1)
    dense = copy.deepcopy(model)
    sparsify_for_inference(model, measure=False, half_dense=True)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), dense.generate(ids, **kw))


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.3", True])
def test_bad_max_density_is_refused(bad):
    with pytest.raises(ValueError, match="max_density"):
        sparsify_for_inference(tiny_llama(), max_density=bad)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sparsify_for_inference(tiny_llama(), kernel="magic")


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
