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
    Csr16Linear,
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


@pytest.mark.parametrize("cls", [BitmaskLinear, Csr16Linear], ids=["bitmask", "csr16"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(48, 40), (7, 33), (64, 576), (3, 1)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_fp16_sparse_linear_matches_float64_reference(cls, density, shape, tokens):
    w = _fp16_sparse(*shape, density)
    bias = torch.randn(shape[0])
    layer = cls.from_mask_values(w != 0, w[w != 0], bias)
    x = torch.randn(2, tokens, shape[1])
    ref = x.double() @ w.double().T + bias.double()
    # float32 sums of up to 576 products of size ~1: rounding grows with the length
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6 * max(shape[1], 10))
    assert torch.equal(layer.dense_weight(), w)  # the stored weight is exactly the input
    assert layer.density == pytest.approx((w != 0).float().mean().item())
    mask, values = layer.kept()
    assert torch.equal(mask, w != 0) and torch.equal(values.float(), w[w != 0])


@needs_kernels
@pytest.mark.parametrize("cls", [BitmaskLinear, Csr16Linear], ids=["bitmask", "csr16"])
def test_fp16_sparse_layer_follows_its_buffers(cls):
    """The kernel call binds the layer's buffers once; replacing or moving them binds again."""
    w1, w2 = _fp16_sparse(16, 64, 0.3, seed=1), _fp16_sparse(16, 64, 0.3, seed=2)
    layer = cls.from_mask_values(w1 != 0, w1[w1 != 0], torch.zeros(16))
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), x @ w1.T, rtol=1e-5, atol=1e-5)
    other = cls.from_mask_values(w2 != 0, w2[w2 != 0], torch.ones(16))
    for name, buf in other.named_buffers():
        setattr(layer, name, buf)
    torch.testing.assert_close(layer(x), x @ w2.T + 1, rtol=1e-5, atol=1e-5)
    layer.bias = None
    torch.testing.assert_close(layer(x), x @ w2.T, rtol=1e-5, atol=1e-5)
    layer.to(torch.float32)  # _apply: same numbers after a move
    torch.testing.assert_close(layer(x), x @ w2.T, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(layer)  # a copy of a layer that has run computes from its own buffers
    del layer, other
    torch.testing.assert_close(twin(x), x @ w2.T, rtol=1e-5, atol=1e-5)
    for buf in twin.buffers():
        buf.zero_()
    assert torch.equal(twin(x), torch.zeros(1, 16))


@pytest.mark.parametrize("grad", [False, True])
def test_half_linear_prompt_in_blocks_matches_float64(monkeypatch, grad):
    """Several tokens through an fp16 layer go block by block of output rows (a block smaller
    than the layer here, the last one partial), or through torch where a gradient is wanted."""
    monkeypatch.setattr(sparse_inference, "_HALF_BLOCK", 7 * 33)
    w = _fp16_sparse(50, 33, 1.0)
    layer = HalfLinear(w.half().view(torch.int16), torch.randn(50))
    x = torch.randn(2, 5, 33, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    ref = x.detach().double() @ w.double().T + layer.bias.double()
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    assert y.requires_grad == grad


def test_csr16_indexes_columns_past_32767():
    """Column indices are unsigned 16-bit: a layer 40000 wide computes with its last columns."""
    w = torch.zeros(3, 40000)
    w[0, 39999], w[1, 32768], w[1, 5], w[2, 40000 - 17:] = 2.0, -1.5, 0.25, 0.5
    layer = Csr16Linear.from_mask_values(w != 0, w[w != 0])
    x = torch.randn(40000)
    torch.testing.assert_close(layer(x[None]).double()[0], w.double() @ x.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.dense_weight(), w)
    with pytest.raises(ValueError, match="in_features must be <= 65536"):
        Csr16Linear.from_mask_values(torch.ones(1, 70000, dtype=torch.bool), torch.ones(70000))


@pytest.mark.parametrize("cls", [BitmaskLinear, Csr16Linear], ids=["bitmask", "csr16"])
def test_fp16_sparse_linear_without_the_compiled_kernels(monkeypatch, cls):
    """Where no C compiler is found, the same layer runs on torch's kernels, with the same result."""
    w = _fp16_sparse(40, 70, 0.3)
    layer = cls.from_mask_values(w != 0, w[w != 0])
    x = torch.randn(1, 70)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(layer.dense_weight(), w)
    torch.testing.assert_close(layer(x).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def _cpu_has(*flags):
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    words = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return all(f in words for f in flags)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler")
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_other_kernel_paths_agree_with_float64(tmp_path, isa):
    """The C code built for other CPUs — no CPU-specific instructions, or AVX2 without AVX-512 —
    gives the float64 reference's results, on rows of every length (empty, shorter and longer
    than a vector, with tails)."""
    if isa == "avx2" and not _cpu_has("avx2", "f16c", "fma"):
        pytest.skip("this CPU cannot run AVX2 code")
    lib = kernels.bind(kernels.compile_library(tmp_path / f"{isa}.so", isa=isa))
    assert lib.sgpt_isa() == {"portable": 0, "avx2": 1}[isa]
    for rows, cols, density in ((37, 100, 0.4), (19, 70, 0.05), (9, 130, 0.9)):
        w = _fp16_sparse(rows, cols, density, seed=cols)
        w[3] = 0  # an empty row
        bias = torch.randn(rows)
        bm = BitmaskLinear.from_mask_values(w != 0, w[w != 0], bias)
        cs = Csr16Linear.from_mask_values(w != 0, w[w != 0], bias)
        words = bm.masks.shape[1]
        x = torch.nn.functional.pad(torch.randn(cols), (0, 32 * words - cols))
        ref = x[:cols].double() @ w.double().T + bias.double()
        got = kernels.gemv(x, bm.masks, bm.values, bm.offsets, bias, rows, lib=lib)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        got = kernels.csr16_gemv(x[:cols].contiguous(), cs.idx, cs.vals, cs.offsets, bias, rows, lib=lib)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(kernels.decompress(bm.masks, bm.values, bm.offsets, rows, cols, lib=lib), w)
        assert torch.equal(kernels.csr16_decompress(cs.idx, cs.vals, cs.offsets, rows, cols, lib=lib), w)
        half = w.half().view(torch.int16)
        torch.testing.assert_close(kernels.half_gemv(x[:cols].contiguous(), half, lib=lib).double(),
                                   x[:cols].double() @ w.double().T, rtol=1e-5, atol=1e-5)


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


def test_auto_kernel_takes_fp16_formats_only_for_fp16_exact_weights():
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, measure=False)
    assert set(inference_formats(model)["format"]) == {"bitmask" if kernels.available() else "csr"}
    low = _magnitude_pruned(tiny_llama, 0.1)  # below CSR16_MAX_DENSITY: csr16
    sparsify_for_inference(low, measure=False)
    assert set(inference_formats(low)["format"]) == {"csr16" if kernels.available() else "csr"}
    raw = tiny_llama()  # float32 weights that fp16 cannot hold exactly
    prune_model(raw, None, PruneConfig(method="magnitude", density=0.3), progress=False)
    sparsify_for_inference(raw, measure=False)
    assert set(inference_formats(raw)["format"]) == {"csr"}


def _fake_step_seconds(monkeypatch, cost):
    """Time a model's step as the sum of ``cost(layer)`` over its decoder linear layers."""
    def fake(model, repeats=5):
        return sum(cost(layer) for *_, layer in sparse_inference._decoder_linears(model))

    monkeypatch.setattr(sparse_inference, "step_seconds", fake)


@needs_kernels
def test_bytes_read_per_format():
    w = _fp16_sparse(64, 96, 0.25, seed=4)
    kept, n = int((w != 0).sum()), w.numel()
    linear = nn.Linear(96, 64)
    assert sparse_inference.bytes_read(linear) == 4 * n
    assert sparse_inference.bytes_read(BitmaskLinear.from_mask_values(w != 0, w[w != 0])) == 2 * kept + n / 8
    assert sparse_inference.bytes_read(Csr16Linear.from_mask_values(w != 0, w[w != 0])) == 4 * kept
    assert sparse_inference.bytes_read(HalfLinear(w.half().view(torch.int16))) == 2 * n


def test_timing_noise_does_not_choose_more_memory_traffic(monkeypatch):
    """Formats within the noise margin of the fastest: the one reading the fewest bytes stays."""
    _fake_step_seconds(monkeypatch, lambda layer: 1.0 if isinstance(layer, (nn.Linear, HalfLinear)) else 1.01)
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, kernel="csr")  # CSR at density 0.3 reads 2.4 of dense's 4 bytes/weight
    assert (inference_formats(model)["format"] == "csr").all()
    _fake_step_seconds(monkeypatch, lambda layer: 1.0 if isinstance(layer, (nn.Linear, HalfLinear)) else 2.0)
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, kernel="csr")  # one group of 2 layers of 14: the step 7 % slower
    assert (inference_formats(model)["format"] == "dense").all()


def test_step_seconds_times_a_one_token_forward(monkeypatch):
    """The step timed is a one-token forward without cache: a warm-up call, then ``repeats``
    timed calls, and the fastest of them is returned."""
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        (tuple(kwargs["input_ids"].shape), kwargs["use_cache"])), with_kwargs=True)
    clock = iter([0.0, 3.0, 10.0, 11.5, 20.0, 22.0])  # timed calls of 3.0, 1.5 and 2.0 s
    monkeypatch.setattr(sparse_inference.time, "perf_counter", lambda: next(clock))
    assert sparse_inference.step_seconds(model, repeats=3) == 1.5
    assert calls == [((1, 1), False)] * 4


def test_measured_choice_keeps_the_faster_of_sparse_and_dense(monkeypatch):
    """With measure=True a layer becomes sparse only where its one-token product timed faster."""
    _fake_step_seconds(monkeypatch, lambda layer: 1.0 if isinstance(layer, (nn.Linear, HalfLinear))
                       else 0.5 if layer.in_features == 64 else 2.0)
    model = _magnitude_pruned(tiny_llama, 0.3)
    sparsify_for_inference(model, kernel="csr")
    formats = inference_formats(model).set_index("layer")["format"]
    wide = {n for n, m in pruned_linears(_magnitude_pruned(tiny_llama, 0.3)).items() if m.in_features == 64}
    assert {n for n, f in formats.items() if f == "csr"} == wide
    assert (formats.drop(index=list(wide)) == "dense").all()


@needs_kernels
def test_measured_choice_takes_the_fastest_of_dense_bitmask_and_csr16(monkeypatch):
    """"auto" with measure=True times dense, bitmask and csr16 and keeps the fastest of the three."""
    def cost(layer):
        fast = Csr16Linear if layer.in_features == 64 else BitmaskLinear
        return 1.0 if isinstance(layer, nn.Linear) else 0.2 if isinstance(layer, fast) else 3.0

    _fake_step_seconds(monkeypatch, cost)
    model = _magnitude_pruned(tiny_llama, 0.3)
    ref = model(torch.arange(6)[None]).logits
    sparsify_for_inference(model)
    formats = inference_formats(model).set_index("layer")["format"]
    wide = {n for n, m in pruned_linears(_magnitude_pruned(tiny_llama, 0.3)).items() if m.in_features == 64}
    assert {n for n, f in formats.items() if f == "csr16"} == wide
    assert (formats.drop(index=list(wide)) == "bitmask").all()
    torch.testing.assert_close(model(torch.arange(6)[None]).logits, ref, rtol=1e-4, atol=1e-4)


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


# --- load_pruned(sparse=True): sparse layers straight from the compact checkpoint ---------------

def _tiny_llama_odd_vocab():
    """A tiny Llama whose embedding [100, 64] has no pruned layer's shape, so that any float
    tensor shaped like a pruned weight seen during a load is one (the same for OPT below)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _tiny_opt_odd_vocab():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


SETTINGS = ["d0.5", "2:4", "d0.5+4bit", "d0.5+3/4bit"]  # the last: widths 3 / 4 by row, grids of 16


def _saved(tmp_path, make, setting, **save):
    from sparsegpt_utils.checkpoint import save_pruned
    from tests.test_save_utils import prune

    model = make()
    masks, grids = prune(model, setting)
    folder = tmp_path / "ck"
    save_pruned(model, folder, masks=masks, grids=grids, progress=False, **save)
    return folder


class _DenseWeightSpy:
    """Records every torch op (outside the model skeleton's construction, which makes only
    ``meta`` parameters) whose output is a float tensor, not on ``meta``, shaped like a pruned
    layer's weight: a dense weight of a pruned layer being built."""

    def __init__(self, shapes):
        from torch.utils._python_dispatch import TorchDispatchMode

        spy = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not spy.paused:
                    for t in out if isinstance(out, (tuple, list)) else (out,):
                        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" \
                                and tuple(t.shape) in shapes:
                            spy.hits.append((str(func), tuple(t.shape)))
                return out

        self.mode, self.paused, self.hits = Mode(), False, []


@needs_kernels
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("make", [_tiny_llama_odd_vocab, _tiny_opt_odd_vocab], ids=["llama", "opt"])
@pytest.mark.parametrize("kernel", ["bitmask", "csr16"])
def test_sparse_load_matches_the_dense_load_without_a_dense_weight(tmp_path, monkeypatch, make, setting,
                                                                   kernel):
    from sparsegpt_utils import checkpoint

    folder = _saved(tmp_path, make, setting)
    dense, _ = checkpoint.load_pruned(folder, dtype=torch.float32)
    shapes = {tuple(m.weight.shape) for m in pruned_linears(dense).values()}
    assert (100, 64) not in shapes  # the embedding's shape

    def refuse(*args, **kwargs):
        raise AssertionError("a dense weight of a pruned layer was built")

    layer_cls = {"bitmask": BitmaskLinear, "csr16": Csr16Linear}[kernel]
    for cls in (BitmaskLinear, Csr16Linear, SparseLinear):
        monkeypatch.setattr(cls, "to_linear", refuse)
    for cls in (BitmaskLinear, Csr16Linear):
        monkeypatch.setattr(cls, "dense_weight", refuse)
    monkeypatch.setattr(checkpoint, "decode_layer", refuse)
    monkeypatch.setattr(checkpoint, "_read_state", refuse)
    spy = _DenseWeightSpy(shapes)
    build = checkpoint._build_skeleton

    def build_paused(*args, **kwargs):  # meta parameters only (created empty, moved at once)
        spy.paused = True
        try:
            return build(*args, **kwargs)
        finally:
            spy.paused = False

    monkeypatch.setattr(checkpoint, "_build_skeleton", build_paused)
    with spy.mode:
        model, _ = checkpoint.load_pruned(folder, sparse=True, kernel=kernel, measure=False)
    assert not spy.hits, spy.hits[:5]
    monkeypatch.undo()

    formats = inference_formats(model)
    assert set(formats["layer"]) == set(pruned_linears(dense)) and (formats["format"] == kernel).all()
    assert not any(p.device.type == "meta" for p in model.parameters())
    # exactly the layers sparsify_for_inference makes of the dense load
    ref = sparsify_for_inference(copy.deepcopy(dense), kernel=kernel, measure=False)
    for name in formats["layer"]:
        a, b = model.get_submodule(name), ref.get_submodule(name)
        assert isinstance(a, layer_cls) and isinstance(b, layer_cls), name
        for key in ("offsets", "bias", *(("masks", "values") if kernel == "bitmask" else ("idx", "vals"))):
            x, y = getattr(a, key), getattr(b, key)
            assert (x is None and y is None) or torch.equal(x, y), (name, key)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    prompt = ids[:1, :6]
    greedy = lambda m: [t for t, _ in sparse_inference.greedy_decode(m, prompt, 8)]
    assert greedy(model) == greedy(dense)


def test_sparse_load_of_float32_storage_uses_csr(tmp_path):
    """Values that fp16 cannot hold exactly become CSR layers (float32), with the same outputs."""
    from sparsegpt_utils.checkpoint import load_pruned

    folder = _saved(tmp_path, tiny_llama, "d0.5", dtype="float32")
    dense, _ = load_pruned(folder)
    model, _ = load_pruned(folder, sparse=True, measure=False)
    assert set(inference_formats(model)["format"]) == {"csr"}
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fp16"):
        load_pruned(folder, sparse=True, kernel="bitmask", measure=False) if kernels.available() \
            else BitmaskLinear.from_mask_values(torch.ones(1, 2, dtype=torch.bool), torch.tensor([0.1, 0.2]))


def test_sparse_load_keeps_sparsify_for_inference_choice(tmp_path, monkeypatch):
    """max_density and the measured choice decide as sparsify_for_inference does on the dense load."""
    from sparsegpt_utils.checkpoint import load_pruned

    _fake_step_seconds(monkeypatch, lambda layer: 1.0 if isinstance(layer, (nn.Linear, HalfLinear))
                       else 0.5 if layer.in_features == 64 else 2.0)
    folder = _saved(tmp_path, tiny_llama, "d0.5")
    for kw in (dict(kernel="csr"), dict(kernel="csr", max_density=0.3), dict(kernel="auto", half_dense=True)):
        model, _ = load_pruned(folder, sparse=True, **kw)
        ref = sparsify_for_inference(load_pruned(folder, dtype=torch.float32)[0], **kw)
        assert inference_formats(model).equals(inference_formats(ref)), kw
        assert type(model.lm_head) is type(ref.lm_head)
        counts = inference_formats(ref)["format"].value_counts().to_dict()
        assert model.sparse_load_report["formats"] == counts
    last = {"bitmask", "fp16"} if kernels.available() else {"csr", "dense"}
    assert set(inference_formats(model)["format"]) == last


def test_sparse_load_reports_its_peak_memory(tmp_path, monkeypatch):
    """The report holds the peak RSS increase of the load in MB: 64 MB touched during the load show."""
    from sparsegpt_utils.checkpoint import load_pruned

    folder = _saved(tmp_path, tiny_llama, "d0.5")
    model, _ = load_pruned(folder, sparse=True, measure=False)
    report = model.sparse_load_report
    assert {"peak_rss_increase_mb", "rss_before_mb", "peak_rss_method", "seconds", "formats"} <= report.keys()
    assert report["peak_rss_increase_mb"] >= 0 and report["seconds"] > 0
    assert sum(report["formats"].values()) == 14  # 7 matrices in each of 2 blocks

    keep_faster = sparse_inference.keep_faster

    def with_64mb(model, **kw):
        block = torch.ones(64 * 2**20 // 4)  # written: resident
        out = keep_faster(model, **kw)
        del block
        return out

    monkeypatch.setattr(sparse_inference, "keep_faster", with_64mb)
    model, _ = load_pruned(folder, sparse=True, measure=False)
    report = model.sparse_load_report
    if report["peak_rss_method"] == "VmHWM":  # the true peak (Linux)
        assert 60 <= report["peak_rss_increase_mb"] < 200, report
    else:  # a lower bound
        assert report["peak_rss_increase_mb"] >= 0


def test_sparse_load_refuses_what_it_cannot_build(tmp_path):
    from sparsegpt_utils.checkpoint import load_pruned

    folder = _saved(tmp_path, tiny_llama, "d0.5")
    with pytest.raises(ValueError, match="float32"):
        load_pruned(folder, sparse=True, dtype=torch.float16)
    with pytest.raises(ValueError, match="cpu"):
        load_pruned(folder, sparse=True, device="cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        load_pruned(folder, sparse=True, kernel="magic")


def test_decode_kept_gives_the_decoded_layer_at_its_slots():
    from sparsegpt_utils.codec import decode_kept, decode_layer, encode_layer
    from sparsegpt_utils.quant import QuantSpec, rtn_quantize
    from sparsegpt_utils.solver import magnitude_mask

    torch.manual_seed(0)
    cases = [("d0.5", None), ("2:4", None), ("d0.1", None), ("4bit", QuantSpec(4)),
             ("3/4bit", QuantSpec(torch.tensor([3, 4])[torch.arange(24) % 2], groupsize=16))]
    forms = set()
    for setting, spec in cases:
        w = torch.randn(24, 64)
        mask = magnitude_mask(w, 0.1 if setting == "d0.1" else 0.5, (2, 4) if setting == "2:4" else None)
        w, grid = (w * mask, None) if spec is None else rtn_quantize(w * mask, spec)
        tensors, info = encode_layer(w * mask, mask.numpy(), grid, torch.float16, setting)
        forms.add((info["mask"], info["values"]))
        weight = decode_layer(info, tensors, torch.float16)
        slots, values = decode_kept(info, tensors, torch.float16)
        assert slots.dtype == torch.bool and slots.shape == weight.shape and values.dtype == torch.float16
        assert torch.equal(weight[slots].view(torch.int16), values.view(torch.int16)), setting
        assert not weight[~slots].any(), setting
    assert {"bitmask", "nm", "rice"} <= {m for m, _ in forms} and ("bitmask", "codes") in forms


@needs_kernels
def test_generate_builds_the_sparse_model_from_the_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import json

    from transformers import AutoTokenizer, LlamaForCausalLM

    from sparsegpt_utils import checkpoint
    from sparsegpt_utils.cli import main
    from tests.test_save_utils import prune

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    masks, grids = prune(model, "d0.5")
    folder = tmp_path / "ck"
    checkpoint.save_pruned(model, folder, AutoTokenizer.from_pretrained(tiny_model_dir), masks=masks,
                           progress=False)
    calls = []
    load = checkpoint.load_pruned

    def spy(*args, **kwargs):
        calls.append(kwargs.get("sparse", False))
        return load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_pruned", spy)
    out = tmp_path / "g.json"
    code = main(["generate", "--checkpoint", str(folder), "--prompt", "def f(x):", "--max-new-tokens", "4",
                 "--compare-dense", "--kernel", "bitmask", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert calls == [True, False]  # the sparse model from the compact form, the dense one for comparison
    assert result["new_tokens"] == 4 and result["agreement"] == 1.0 and result["text"] == result["dense_text"]
    assert result["load_peak_rss_increase_mb"] >= 0
    assert set(result["formats"]) <= {"bitmask", "dense"}
