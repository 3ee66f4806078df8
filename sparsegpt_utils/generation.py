"""Greedy generations of several models side by side (e.g. the dense model and its pruned copies)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

__all__ = ["greedy_continuations", "generate_side_by_side"]


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[str],
                         max_new_tokens: int = 24) -> list[str]:
    """The greedy continuation of each prompt (at most ``max_new_tokens`` tokens, fewer where the
    model ends the text), decoded without the prompt. Deterministic: no sampling, and the
    model's own generation defaults (temperature, top-p, repetition penalty) are not used."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if
                              tokenizer.pad_token_id is not None else eos)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**encoded, generation_config=config)
        texts.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return texts


def generate_side_by_side(models: Mapping[str, nn.Module], tokenizer, prompts: Sequence[str],
                          max_new_tokens: int = 24) -> pd.DataFrame:
    """One row per prompt: the prompt and each model's greedy continuation
    (:func:`greedy_continuations`), one column per name of ``models`` (e.g. ``{"dense": model,
    "density 0.5": pruned}``); the models share ``tokenizer``."""
    if not models:
        raise ValueError("models must name at least one model, e.g. {'dense': model}")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if "prompt" in models:
        raise ValueError("'prompt' is the table's first column: name the models otherwise")
    table = pd.DataFrame({"prompt": list(prompts)})
    for name, model in models.items():
        table[name] = greedy_continuations(model, tokenizer, prompts, max_new_tokens)
    return table
