"""The generic adapter on tiny random models of every decoder-only family a user is likely to
prune, built from transformers' own config classes (no download): block replay reproduces the
model's hidden states, a SparseGPT prune reaches its density exactly, and the compact
checkpoint round trip is exact."""

import pytest
import torch
import transformers as tf

from sparsegpt_utils.evaluate import density_report
from sparsegpt_utils.models import (
    MatrixView,
    assemble_weight,
    capture_block_inputs,
    discover_input_groups,
    get_adapter,
    matrix_layout,
    parameter_masks,
    pruned_linears,
    run_block,
)
from sparsegpt_utils.prune import PruneConfig, prune_model

SEQ = 24  # longer than the sliding windows below, so that windowed layers see a different mask
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)
LLAMA_LIKE = dict(COMMON, intermediate_size=128, num_key_value_heads=2)

# family -> (config class, config kwargs, blocks path, fused or Conv1D modules, sliding window)
FAMILIES = {
    "llama": (tf.LlamaConfig, LLAMA_LIKE, "model.layers", {}, False),
    "mistral": (tf.MistralConfig, dict(LLAMA_LIKE, sliding_window=8), "model.layers", {}, True),
    "qwen2": (tf.Qwen2Config, dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=1), "model.layers", {}, True),
    "qwen3": (tf.Qwen3Config, dict(LLAMA_LIKE, head_dim=16), "model.layers", {}, False),
    "gemma": (tf.GemmaConfig, dict(LLAMA_LIKE, head_dim=16), "model.layers", {}, False),
    "gemma2": (tf.Gemma2Config, dict(LLAMA_LIKE, head_dim=16, sliding_window=8), "model.layers", {}, True),
    "phi3": (tf.Phi3Config, dict(LLAMA_LIKE, pad_token_id=0), "model.layers",
             {"self_attn.qkv_proj": ["q", "k", "v"], "mlp.gate_up_proj": ["gate", "up"]}, False),
    "olmo": (tf.OlmoConfig, dict(LLAMA_LIKE, pad_token_id=0), "model.layers", {}, False),
    "stablelm": (tf.StableLmConfig, LLAMA_LIKE, "model.layers", {}, False),
    "gpt_neox": (tf.GPTNeoXConfig, dict(COMMON, intermediate_size=128), "gpt_neox.layers",
                 {"attention.query_key_value": [f"{p}{h}" for h in range(4) for p in "qkv"]}, False),
    "gpt2": (tf.GPT2Config, dict(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=128),
             "transformer.h", {"attn.c_attn": ["q", "k", "v"], "attn.c_proj": [None],
                               "mlp.c_fc": [None], "mlp.c_proj": [None]}, False),
    "falcon": (tf.FalconConfig, dict(COMMON, new_decoder_architecture=True, num_kv_heads=2),
               "transformer.h", {"self_attention.query_key_value": ["q0", "k0", "v0", "q1", "k1", "v1"]},
               False),
    "falcon_mq": (tf.FalconConfig, dict(COMMON, multi_query=True, parallel_attn=True),
                  "transformer.h", {"self_attention.query_key_value": ["q", "k", "v"]}, False),
    "opt": (tf.OPTConfig, dict(COMMON, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1),
            "model.decoder.layers", {}, False),
}


def tiny(family: str, seed: int = 0):
    config_class, kwargs, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**kwargs)
    config._attn_implementation = "eager"  # masks, not is_causal flags, reach every block
    return tf.AutoModelForCausalLM.from_config(config).eval()


def token_ids(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def test_adapter_finds_blocks_and_matrices(family):
    model = tiny(family)
    _, _, path, special, _ = FAMILIES[family]
    adapter = get_adapter(model)
    assert adapter.blocks_path == path
    assert len(adapter.blocks(model)) == 3
    layers = pruned_linears(model)
    for module, parts in special.items():
        for part in parts:
            name = f"{path}.1.{module}" + (f".{part}" if part else "")
            assert isinstance(layers[name], MatrixView), name
    # every matrix is a view into the model's parameters: the views cover each weight once
    covered = {}
    for layer in layers.values():
        w = layer.weight
        assert w.shape == (layer.out_features, layer.in_features)
        owner = layer.module if isinstance(layer, MatrixView) else layer
        covered[id(owner.weight)] = covered.get(id(owner.weight), 0) + w.numel()
    owners = {id(m.weight): m.weight.numel() for b in adapter.blocks(model) for m in b.modules()
              if id(getattr(m, "weight", None)) in covered}
    assert covered == owners


def test_block_replay_reproduces_hidden_states(family):
    """DESIGN §2 invariant: replaying the captured inputs block by block gives the model's own
    hidden states (sliding-window layers get their own masks)."""
    model = tiny(family)
    ids = token_ids(4)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    outs = []
    blocks = get_adapter(model).blocks(model)
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    inputs, kwargs = capture_block_inputs(model, list(ids.split(2)))
    assert torch.equal(torch.cat(inputs), states[0])
    hidden = inputs
    for i, block in enumerate(blocks):
        with torch.no_grad():
            hidden = [run_block(block, x, kwargs[x.shape[0]]) for x in hidden]
        torch.testing.assert_close(torch.cat(hidden), outs[i], rtol=1e-5, atol=1e-5)
        if i + 1 < len(blocks):  # the last hidden state is after the final norm
            torch.testing.assert_close(torch.cat(hidden), states[i + 1], rtol=1e-5, atol=1e-5)


def test_sliding_window_blocks_get_their_own_masks():
    model = tiny("gemma2")
    _, kwargs = capture_block_inputs(model, [token_ids(1)])
    blocks = get_adapter(model).blocks(model)
    masks = [kwargs[1].of(b)["attention_mask"] for b in blocks]
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2])


@pytest.fixture(scope="module")
def pruned(family):
    model = tiny(family)
    res = prune_model(model, token_ids(4, seed=1),
                      PruneConfig(density=0.5, blocksize=16, mask_blocksize=16, calibration_batch_size=2),
                      progress=False)
    return model, res


def test_sparsegpt_reaches_density_exactly(pruned):
    model, res = pruned
    report = density_report(model)
    layers = pruned_linears(model)
    assert set(report["layer"]) == set(layers) == set(res.masks)
    assert (report["kept"] * 2 == report["params"]).all()
    for name, layer in layers.items():
        assert torch.equal(layer.weight != 0, res.masks[name]), name


def test_checkpoint_round_trip_is_exact(pruned, tmp_path):
    """save_pruned -> load_pruned, and transformers' from_pretrained, give the pruned model's
    tensors exactly (fused and Conv1D parameters rebuilt from their matrices)."""
    from sparsegpt_utils.save_utils import load_pruned, save_pruned

    model, res = pruned
    save_pruned(model, tmp_path / "ckpt", masks=res.masks, dtype=torch.float32, progress=False)
    loaded, _ = load_pruned(tmp_path / "ckpt")
    via_transformers = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    own = model.state_dict()
    for back in (loaded.state_dict(), via_transformers.state_dict()):
        assert set(own) == set(back)
        for key, t in own.items():
            assert torch.equal(t, back[key]), key


def test_fused_parts_share_one_hessian_and_keep_their_own_density():
    """Phi-3's q/k/v and gate/up are one matrix each in the model: the parts share the input
    and each reaches the density on its own."""
    model = tiny("phi3")
    adapter = discover_input_groups(model)
    groups = [[n for n, _ in g] for g in adapter.linear_groups(adapter.blocks(model)[0])]
    assert groups == [["self_attn.qkv_proj.q", "self_attn.qkv_proj.k", "self_attn.qkv_proj.v"],
                      ["self_attn.o_proj"], ["mlp.gate_up_proj.gate", "mlp.gate_up_proj.up"],
                      ["mlp.down_proj"]]
    prune_model(model, token_ids(4, seed=1), PruneConfig(density=0.25, blocksize=16, mask_blocksize=16),
                progress=False)
    for name, layer in pruned_linears(model).items():
        assert layer.weight.ne(0).float().mean().item() == 0.25, name


def test_views_write_through_and_assemble():
    model = tiny("gpt2")
    layers = pruned_linears(model)
    q = layers["transformer.h.0.attn.c_attn.q"]
    with torch.no_grad():
        q.weight.zero_()
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, 3 * out]
    assert not c_attn[:, :64].any() and c_attn[:, 64:].all()
    parts = [(matrix_layout(layers[f"transformer.h.0.attn.c_attn.{p}"]),
              layers[f"transformer.h.0.attn.c_attn.{p}"].weight) for p in "vqk"]
    assert torch.equal(assemble_weight(parts), c_attn)
    with pytest.raises(ValueError, match="cover"):
        assemble_weight(parts[:2])


def test_unknown_fused_layout_is_refused_up_front():
    model = tiny("phi3")
    model.config.model_type = "phi3-variant"
    with pytest.raises(ValueError, match="qkv_proj.*fused"):
        get_adapter(model)
    with pytest.raises(ValueError, match="qkv_proj.*fused"):
        prune_model(model, token_ids(2), PruneConfig(), progress=False)


def test_parameter_masks_are_in_each_modules_own_layout():
    model = tiny("gpt2")
    layers = pruned_linears(model)
    names = ["transformer.h.0.attn.c_attn.k", "transformer.h.0.mlp.c_fc"]
    masks = {n: torch.rand(layers[n].weight.shape, generator=torch.Generator().manual_seed(i)) > 0.5
             for i, n in enumerate(names)}
    (attn, attn_mask), (fc, fc_mask) = parameter_masks(model, masks)
    assert attn is model.transformer.h[0].attn.c_attn and fc is model.transformer.h[0].mlp.c_fc
    assert torch.equal(attn_mask[:, 64:128], masks[names[0]].t())  # Conv1D weight is [in, out]
    assert attn_mask[:, :64].all() and attn_mask[:, 128:].all()
    assert torch.equal(fc_mask, masks[names[1]].t())


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_sparse_inference_converts_fused_layers(family):
    """A fused matrix becomes one sparse layer holding all its parts: the same logits."""
    from sparsegpt_utils.sparse_inference import inference_formats, sparsify_for_inference

    model = tiny(family)
    prune_model(model, token_ids(4, seed=1), PruneConfig(density=0.3, blocksize=16, mask_blocksize=16),
                progress=False)
    ids = token_ids(2, seed=5)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    sparsify_for_inference(model, kernel="csr", measure=False)
    assert (inference_formats(model)["format"] == "csr").all()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_sparse_inference_refuses_conv1d_up_front():
    from sparsegpt_utils.sparse_inference import sparsify_for_inference

    model = tiny("gpt2")
    with pytest.raises(ValueError, match="Conv1D"):
        sparsify_for_inference(model, kernel="csr", measure=False)
    assert all(type(m).__name__ == "Conv1D" for m in model.transformer.h[0].mlp.children()
               if hasattr(m, "weight"))


@pytest.mark.parametrize("config,match", [
    (lambda: tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), "query_key_value.*fused"),
    (lambda: tf.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=2),
     "experts.*not the weight of an nn.Linear"),
])
def test_layouts_the_adapter_cannot_split_are_named(config, match):
    model = tf.AutoModelForCausalLM.from_config(config())
    with pytest.raises(ValueError, match=match):
        get_adapter(model)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_finetuning_keeps_the_masks_of_fused_and_conv1d_matrices(family):
    """Masked fine-tuning of a model whose pruned matrices are parts of one parameter (GPT-2's
    Conv1D c_attn, Phi-3's qkv_proj): every pruned weight stays zero, the kept ones move."""
    from sparsegpt_utils.finetune import FinetuneConfig, current_masks, finetune

    model = tiny(family)
    prune_model(model, token_ids(4, seed=1), PruneConfig(density=0.5, blocksize=16, mask_blocksize=16),
                progress=False)
    masks = current_masks(model)
    before = {n: layer.weight.detach().clone() for n, layer in pruned_linears(model).items()}
    result = finetune(model, torch.randint(0, 128, (1, 4096), generator=torch.Generator().manual_seed(3)),
                      FinetuneConfig(steps=3, lr=1e-3, batch_size=2, seqlen=32, val_windows=1),
                      masks=masks, progress=False)
    assert result.masks_kept
    for name, layer in pruned_linears(model).items():
        w = layer.weight.detach()
        assert not w[~masks[name]].any(), name
        assert not torch.equal(w, before[name]), name
