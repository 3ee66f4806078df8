"""Adapters, block replay, the sequential pipeline and perplexity, on tiny random models
(fast) and on the real smollm2-135m (slow)."""

import json

import pytest
import torch

from sparsegpt_utils.data import calibration_windows, eval_tokens
from sparsegpt_utils.evaluate import density_report, overall_density, perplexity
from sparsegpt_utils.models import (
    ModelNotFoundError,
    capture_block_inputs,
    get_adapter,
    load_model,
    pruned_linears,
    run_block,
)
from sparsegpt_utils.prune import PruneConfig, prune_model, prune_setting_keys
from sparsegpt_utils.quant import QuantSpec
from tests.conftest import tiny_llama, tiny_opt

CALIB = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))


def block_outputs(model, ids):
    """Each block's real output during an ordinary forward pass."""
    outs = []
    blocks = get_adapter(model).blocks(model)
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return outs


def assert_replay_matches(model, ids, batch_size, atol=1e-5):
    expected = block_outputs(model, ids)
    inputs, kwargs = capture_block_inputs(model, list(ids.split(batch_size)))
    hidden = torch.cat(inputs)
    for i, block in enumerate(get_adapter(model).blocks(model)):
        with torch.no_grad():
            outs = [run_block(block, x, kwargs[x.shape[0]]) for x in hidden.split(batch_size)]
        hidden = torch.cat(outs)
        assert torch.allclose(hidden, expected[i], atol=atol), f"block {i} differs"


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_block_replay_reproduces_model(make):
    model = make(layers=3)
    ids = torch.randint(3, 128, (4, 40), generator=torch.Generator().manual_seed(0))
    assert_replay_matches(model, ids, batch_size=2)


@pytest.mark.parametrize("make,family,groups", [
    (tiny_opt, "opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                       ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
    (tiny_llama, "llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                           ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
])
def test_adapter_finds_every_linear_layer(make, family, groups):
    """The generic adapter finds the blocks and, once the blocks have run, the input groups
    the hand-written OPT and Llama tables used to name (q/k/v and gate/up share one Hessian)."""
    model = make(layers=2)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.blocks_path == ("model.decoder.layers" if family == "opt" else "model.layers")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    capture_block_inputs(model, [ids])
    for block in adapter.blocks(model):
        found = adapter.linear_groups(block)
        assert [[n for n, _ in g] for g in found] == groups
    layers = pruned_linears(model)
    assert len(layers) == 2 * sum(map(len, groups))
    assert not any("lm_head" in n or "embed" in n for n in layers)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
@pytest.mark.parametrize("method,density,nm", [
    ("sparsegpt", 0.5, None), ("sparsegpt", 1.0, (2, 4)), ("wanda", 0.3, None), ("magnitude", 0.5, None),
])
def test_prune_model_reaches_density(make, method, density, nm):
    model = make(layers=2)
    calib = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    res = prune_model(model, calib, PruneConfig(method=method, density=density, nm=nm,
                                                calibration_batch_size=2), progress=False)
    report = density_report(model)
    target = nm[0] / nm[1] if nm else density
    assert abs(overall_density(report) - target) < 0.01
    assert report["density"].between(target - 0.02, target + 0.02).all()
    # the masks returned are the zero pattern of the weights
    for name, layer in pruned_linears(model).items():
        assert torch.equal(layer.weight != 0, res.masks[name] & (layer.weight != 0))
        assert not torch.any(layer.weight[~res.masks[name]])
    assert len(res.layers) == len(report)


def test_pruning_uses_pruned_inputs_of_earlier_blocks():
    """Sequential: the second block's Hessians come from the first block's pruned outputs,
    so pruning block 0 changes what block 1 becomes."""
    calib = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    prune_model(a, calib, PruneConfig(density=0.5), progress=False)
    prune_model(b, calib, PruneConfig(density=0.5, block_densities=[1.0, 0.5]), progress=False)
    wa = a.model.layers[1].mlp.down_proj.weight
    wb = b.model.layers[1].mlp.down_proj.weight
    assert not torch.allclose(wa, wb)


def test_perplexity_matches_manual_computation():
    model = tiny_llama(layers=1)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    res = perplexity(model, ids, seqlen=64, progress=False)
    assert res.windows == 3 and res.total_windows == 3  # tail of 8 tokens dropped
    nlls = []
    for i in range(3):
        w = ids[:, i * 64:(i + 1) * 64]
        with torch.no_grad():
            nlls.append(model(input_ids=w, labels=w).loss.item())
    assert res.ppl == pytest.approx(torch.tensor(nlls).mean().exp().item(), rel=1e-5)
    assert perplexity(model, ids, seqlen=64, max_windows=2, progress=False).windows == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"density": 0.0}, "density"), ({"density": 1.2}, "density"), ({"nm": "4:4"}, "N:M"),
    ({"method": "obs"}, "method"), ({"percdamp": -1}, "percdamp"),
    ({"calibration_batch_size": 0}, "calibration_batch_size"),
])
def test_bad_config_fails_fast(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_unknown_model_names_everything_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-org/no-such-model-xyz")
    text = str(err.value)
    assert "local directory" in text and "smollm2-135m" in text and "hub" in text


@pytest.mark.slow
def test_smollm2_block_replay(smollm2, calib_source):
    model, tok = smollm2
    ids = calibration_windows(tok, calib_source, samples=2, seqlen=128, seed=0)
    assert_replay_matches(model, ids, batch_size=1, atol=1e-4)


@pytest.mark.slow
def test_smollm2_perplexity_ordering(smollm2_copy, eval_source, calib_source):
    """ppl(dense) < ppl(SparseGPT 50%) < ppl(Wanda 50%) < ppl(magnitude 50%)."""
    import copy

    dense, tok = smollm2_copy
    calib = calibration_windows(tok, calib_source, samples=8, seqlen=256, seed=0)
    test = eval_tokens(tok, eval_source)
    ppl = {"dense": perplexity(dense, test, seqlen=256, max_windows=8, progress=False).ppl}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(dense)
        prune_model(model, calib, PruneConfig(method=method, density=0.5), progress=False)
        assert abs(overall_density(density_report(model)) - 0.5) < 0.005
        ppl[method] = perplexity(model, test, seqlen=256, max_windows=8, progress=False).ppl
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_offloaded_activations_give_the_same_prune(make):
    """Block inputs kept on the CPU between blocks (moved in one batch at a time) change
    nothing: same masks, same weights, every batch replayed in order. (On CPU the storage and
    the device coincide; the memory saving is checked on CUDA below.)"""
    calib = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    a, b = make(layers=2), make(layers=2)
    config = PruneConfig(density=0.5, calibration_batch_size=2)
    ra = prune_model(a, calib, config, progress=False)
    rb = prune_model(b, calib, config, progress=False, offload_activations=True)
    assert ra.masks.keys() == rb.masks.keys()
    for name in ra.masks:
        assert torch.equal(ra.masks[name], rb.masks[name]), name
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert ra.peak_gpu_mb is None  # only measured on CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_activations_lower_peak_gpu_memory():
    """On a GPU, offloading keeps the calibration activations off the device: a lower peak,
    and the same masks as keeping them there."""
    calib = torch.randint(3, 128, (64, 256), generator=torch.Generator().manual_seed(1))
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    config = PruneConfig(density=0.5, calibration_batch_size=8)
    ra = prune_model(a, calib, config, device="cuda", progress=False)
    rb = prune_model(b, calib, config, device="cuda", progress=False, offload_activations=True)
    assert rb.peak_gpu_mb < ra.peak_gpu_mb
    for name in ra.masks:
        assert torch.equal(ra.masks[name], rb.masks[name]), name


def test_half_precision_model_prunes_with_float32_hessians(monkeypatch):
    """A bfloat16 model runs its blocks (and keeps its activations) in bfloat16 while the
    Hessians are accumulated and solved in float32: exact densities, weights stay bfloat16,
    and the masks are nearly those of the float32 prune."""
    from sparsegpt_utils import solver

    seen = []
    solve = solver.sparsegpt_solve

    def spy(weight, hessian, *a, **k):
        seen.append((weight.dtype, hessian.dtype))
        return solve(weight, hessian, *a, **k)

    import sparsegpt_utils.prune as prune_mod
    monkeypatch.setattr(prune_mod, "sparsegpt_solve", spy)
    calib = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    half, full = tiny_llama(layers=2).to(torch.bfloat16), tiny_llama(layers=2)
    rh = prune_model(half, calib, PruneConfig(density=0.5), progress=False)
    assert seen and all(w == torch.bfloat16 and h == torch.float32 for w, h in seen)
    rf = prune_model(full, calib, PruneConfig(density=0.5), progress=False)
    report = density_report(half)
    assert report["density"].sub(0.5).abs().max() < 1e-3
    for name, layer in pruned_linears(half).items():
        assert layer.weight.dtype == torch.bfloat16
        assert torch.isfinite(layer.weight.float()).all()
        agree = (rh.masks[name] == rf.masks[name]).float().mean()
        assert agree > 0.9, (name, float(agree))


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_replay_blocks_reproduces_model(make):
    """The one replay loop (pruning and OWL): left unchanged, each block's inputs are the
    model's own hidden states."""
    from sparsegpt_utils.replay import replay_blocks

    model = make(layers=3)
    ids = torch.randint(3, 128, (4, 40), generator=torch.Generator().manual_seed(0))
    expected = block_outputs(model, ids)
    for step in replay_blocks(model, ids, torch.device("cpu"), batch_size=2, progress=False):
        if step.index:
            assert torch.allclose(torch.cat(step.inputs), expected[step.index - 1], atol=1e-5)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
@pytest.mark.parametrize("method,exact,nm", [
    ("admm", False, None), ("admm", False, (2, 4)), ("wanda", True, None), ("magnitude", True, (2, 4)),
    ("sparsegpt", True, None),
])
def test_admm_and_exact_update_in_prune_model(make, method, exact, nm):
    model = make(layers=2)
    res = prune_model(model, CALIB, PruneConfig(method=method, density=0.4, nm=nm, exact_update=exact,
                                                calibration_batch_size=2), progress=False)
    target = nm[0] / nm[1] if nm else 0.4
    assert overall_density(density_report(model)) == pytest.approx(target, abs=1 / 64)
    for name, layer in pruned_linears(model).items():
        assert not layer.weight[~res.masks[name]].any()
        if nm:
            assert (res.masks[name].reshape(layer.out_features, -1, 4).sum(2) == 2).all()
    assert res.row()["exact_update"] == exact and res.layers["loss"].notna().all()


def test_exact_update_lowers_layer_error_of_wanda_masks_and_quantizes_on_the_mask():
    from sparsegpt_utils.quant import QuantSpec

    a, b = tiny_llama(layers=1), tiny_llama(layers=1)
    ra = prune_model(a, CALIB, PruneConfig(method="wanda", density=0.5), progress=False)
    rb = prune_model(b, CALIB, PruneConfig(method="wanda", density=0.5, exact_update=True), progress=False)
    # block 0 sees the same inputs, so Wanda picks the same masks; the update only moves kept weights
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    c = tiny_llama(layers=1)
    rc = prune_model(c, CALIB, PruneConfig(method="admm", density=0.5, quant=QuantSpec(4)), progress=False)
    for name, layer in pruned_linears(c).items():
        grid = rc.grids[name]
        assert not layer.weight[~rc.masks[name]].any()
        q = torch.round(layer.weight / grid.scale + grid.zero)  # kept values lie on the grid
        assert torch.allclose((q - grid.zero) * grid.scale, layer.weight, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_admm_owl_reconstruct_compose(make):
    model = make(layers=3)
    config = PruneConfig(method="admm", density=0.3, owl=True, reconstruct=True, reconstruct_steps=4,
                         calibration_batch_size=2)
    res = prune_model(model, CALIB, config, progress=False)
    assert res.row() == {"owl": True, "block_densities": res.block_densities, "exact_update": False,
                         "reconstruct": True}
    assert overall_density(density_report(model)) == pytest.approx(0.3, abs=1 / 64)
    assert (res.blocks.reconstruct_error_after <= res.blocks.reconstruct_error_before).all()
    for name, layer in pruned_linears(model).items():
        assert not layer.weight[~res.masks[name]].any()


def test_rows_that_keep_nothing_are_counted_and_warned_once():
    """At a density where whole rows lose every weight, prune_model says so once per run (not
    once per layer) and the layer table counts them per layer."""
    import warnings

    from sparsegpt_utils.solver import EmptyRowsWarning
    from tests.conftest import tiny_opt

    model = tiny_opt()
    with torch.no_grad():  # rows 0..3 of every pruned layer are tiny: magnitude removes them first
        for layer in pruned_linears(model).values():
            layer.weight[:4] *= 1e-6
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = prune_model(model, None, PruneConfig(method="magnitude", density=0.5), progress=False)
    empty = [w for w in seen if issubclass(w.category, EmptyRowsWarning)]
    assert len(empty) == 1, [str(w.message) for w in empty]
    layers = len(pruned_linears(model))
    assert f"{layers} of {layers} pruned layers" in str(empty[0].message)
    assert (result.layers["empty_rows"] >= 4).all()
    report = density_report(model).set_index("layer")["empty_rows"]
    assert report.to_dict() == result.layers.set_index("layer")["empty_rows"].to_dict()
    for name, layer in pruned_linears(model).items():
        row = result.layers.set_index("layer").loc[name]
        assert row["empty_rows"] == int((~layer.weight.ne(0).any(1)).sum())


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("true_sequential", [False, True, None])  # None: on, as it quantizes
def test_true_sequential_hessians_come_from_the_solved_groups(monkeypatch, make, true_sequential):
    """With true_sequential each group's Hessian is that of its inputs in the block with the
    groups before it solved (what the final model's first block feeds it: nothing after a
    group changes its input); without it, every Hessian is that of the dense block."""
    import sparsegpt_utils.prune as prune_mod
    from sparsegpt_utils.solver import HessianAccumulator

    seen = {}
    solve_group = prune_mod._solve_group

    def spy(config, names, layers, hessian, *a):
        seen[names[0]] = hessian.clone()
        return solve_group(config, names, layers, hessian, *a)

    monkeypatch.setattr(prune_mod, "_solve_group", spy)
    calib = torch.randint(3, 128, (3, 32), generator=torch.Generator().manual_seed(2))
    model, dense = make(layers=1), make(layers=1)
    prune_model(model, calib, PruneConfig(density=0.5, quant=QuantSpec(4), true_sequential=true_sequential),
                progress=False)
    first = get_adapter(model).blocks_path + ".0."
    assert len(seen) == 4
    for name, hessian in seen.items():
        source = dense if true_sequential is False else model
        layer = dict(pruned_linears(source))[name]
        acc = HessianAccumulator(layer.in_features)
        handle = layer.register_forward_hook(lambda _m, inp, _out: acc.add(inp[0]))
        with torch.no_grad():
            for x in calib:
                source(x[None])
        handle.remove()
        assert name.startswith(first)
        torch.testing.assert_close(hessian, acc.hessian, rtol=1e-4, atol=1e-6)
    # the first group reads the block's input, the same either way; the later ones differ
    if true_sequential is not False:
        names = list(seen)
        dense_layers = dict(pruned_linears(dense))
        late = dense_layers[names[-1]]
        acc = HessianAccumulator(late.in_features)
        handle = late.register_forward_hook(lambda _m, inp, _out: acc.add(inp[0]))
        with torch.no_grad():
            for x in calib:
                dense(x[None])
        handle.remove()
        assert not torch.allclose(seen[names[-1]], acc.hessian, rtol=1e-3)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("quant", [None, QuantSpec(4)])  # one pass for all Hessians / true-sequential
def test_hessian_pass_stops_once_every_hooked_layer_has_its_input(make, quant):
    """The Hessian forwards end at the block's last pruned layer (the MLP's down projection
    when every group is hooked at once; the attention's input projections when true-sequential
    hooks one group at a time): its own product is never computed for a Hessian."""
    model = make(layers=1)  # the last block is not replayed: any call of its last layer is waste
    block = get_adapter(model).blocks(model)[0]
    last = get_adapter(model).linear_groups(block)[-1][0][1]
    lengths = []  # of each call's sequence
    last.register_forward_hook(lambda _m, inp, _out: lengths.append(inp[0].shape[-2]))
    calib = torch.randint(3, 128, (3, 32), generator=torch.Generator().manual_seed(2))
    result = prune_model(model, calib, PruneConfig(density=0.5, quant=quant), progress=False)
    # one call: the forward that records the blocks' arguments (once per batch size), none per batch
    assert lengths.count(32) == 1
    assert len(result.layers) == sum(len(g) for g in get_adapter(model).linear_groups(block))


def test_every_setting_that_changes_the_model_is_a_recorded_run_setting():
    """Result rows (one-shot and iterative alike) carry every pruning setting that changes the
    model, under names tables split on (RUN_SETTING_KEYS): two runs that differ in any of them
    are never one row. Options added later appear only when set, so older rows still match."""
    from sparsegpt_utils.mixed_precision import MixedPrecisionConfig
    from sparsegpt_utils.results import RUN_SETTING_KEYS

    base = dict(method="sparsegpt", density=0.5, owl=True, reconstruct=True)
    changes = [dict(method="admm"), dict(nm="2:4", owl=False), dict(percdamp=0.1), dict(blocksize=64),
               dict(mask_blocksize=64), dict(owl=False), dict(owl_lambda=0.2), dict(owl_m=7.0),
               dict(owl_samples=None), dict(exact_update=True), dict(reconstruct=False),
               dict(reconstruct_steps=5), dict(reconstruct_lr=1e-3),
               dict(reconstruct_targets="pruned-inputs"), dict(reconstruct_parts="sublayers"),
               dict(quant=QuantSpec(4)), dict(quant=QuantSpec(4, groupsize=32)),
               dict(quant=QuantSpec(4, sym=True)), dict(quant=QuantSpec(4, mse=True)),
               dict(quant=QuantSpec(4), act_order=False), dict(quant=QuantSpec(4), true_sequential=False),
               dict(quant=QuantSpec(4, groupsize=32), mixed=MixedPrecisionConfig(3.5)),
               dict(quant=QuantSpec(4, groupsize=32), mixed=MixedPrecisionConfig(3.5, unit="row")),
               dict(quant=QuantSpec(4, groupsize=32), mixed=MixedPrecisionConfig(3.5, error_model="range"))]
    seen = {}
    for change in [{}, *changes]:
        keys = prune_setting_keys(PruneConfig(**{**base, **change}))
        assert set(keys) <= set(RUN_SETTING_KEYS), set(keys) - set(RUN_SETTING_KEYS)
        text = json.dumps(keys, sort_keys=True, default=str)
        assert text not in seen, (change, seen.get(text))
        seen[text] = change
    old = prune_setting_keys(PruneConfig(density=0.5, reconstruct=True))
    assert "reconstruct_targets" not in old and "reconstruct_parts" not in old and "mse" not in old
