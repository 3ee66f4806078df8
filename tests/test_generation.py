"""Greedy generations side by side: each model's continuation is its own greedy argmax path."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsegpt_utils.generation import generate_side_by_side, greedy_continuations
from tests.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_pair(stdlib_text_cached):
    """(dense, pruned, tokenizer): a tiny Llama on a tiny tokenizer, and a copy with half of
    every decoder weight zeroed (the smallest magnitudes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(stdlib_text_cached)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id)
    dense = LlamaForCausalLM(cfg).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for layer in pruned.model.layers.modules():
            if isinstance(layer, torch.nn.Linear):
                w = layer.weight
                w[w.abs() <= w.abs().flatten().median()] = 0
    return dense, pruned, tok


def _reference(model, tok, prompt: str, new: int) -> str:
    """Greedy decoding by hand: the whole sequence re-run each step, argmax of the last logits."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_side_by_side_table_holds_each_models_greedy_continuation(tiny_pair):
    dense, pruned, tok = tiny_pair
    prompts = ["The module", "def main():"]
    table = generate_side_by_side({"dense": dense, "pruned": pruned}, tok, prompts, max_new_tokens=8)
    assert list(table.columns) == ["prompt", "dense", "pruned"] and list(table["prompt"]) == prompts
    for i, prompt in enumerate(prompts):
        assert table.loc[i, "dense"] == _reference(dense, tok, prompt, 8)
        assert table.loc[i, "pruned"] == _reference(pruned, tok, prompt, 8)
    assert list(table["dense"]) != list(table["pruned"])  # the pruned model is another model
    assert greedy_continuations(dense, tok, prompts, 8) == list(table["dense"])  # deterministic


def test_side_by_side_refuses_bad_input(tiny_pair):
    dense, _, tok = tiny_pair
    with pytest.raises(ValueError, match="models"):
        generate_side_by_side({}, tok, ["a"])
    with pytest.raises(ValueError, match="prompts"):
        generate_side_by_side({"dense": dense}, tok, "a single string")
    with pytest.raises(ValueError, match="prompts"):
        generate_side_by_side({"dense": dense}, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_side_by_side({"dense": dense}, tok, ["a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        generate_side_by_side({"prompt": dense}, tok, ["a"])
