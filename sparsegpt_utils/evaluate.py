"""Perplexity on the SparseGPT protocol (DESIGN §3) and the per-layer density report."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .models import model_seqlen, pruned_linears

__all__ = ["PerplexityResult", "perplexity", "density_report", "overall_density"]


@dataclass
class PerplexityResult:
    ppl: float
    windows: int  # windows evaluated
    total_windows: int  # windows the text has
    seqlen: int
    nll: list[float]  # mean negative log-likelihood per window (nats/token)

    def __str__(self) -> str:
        part = "" if self.windows == self.total_windows else (
            f" (first {self.windows} of {self.total_windows} windows)")
        return f"ppl {self.ppl:.3f} over {self.windows} × {self.seqlen} tokens{part}"


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, seqlen: int | None = None,
    max_windows: int | None = None, device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """``exp(mean_i nll_i)`` over non-overlapping windows of ``seqlen`` tokens of
    ``token_ids`` [1, n], the tail dropped; ``nll_i`` is window i's mean shifted
    cross-entropy. ``max_windows`` evaluates only the first windows (a quick run)."""
    seqlen = seqlen or model_seqlen(model)
    total = token_ids.numel() // seqlen
    if total == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows (eval windows) must be >= 1, got {max_windows}")
    windows = min(total, max_windows or total)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nlls = []
    ids = token_ids.flatten()
    for i in tqdm(range(windows), desc="perplexity", disable=not progress):
        batch = ids[i * seqlen:(i + 1) * seqlen][None].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(float(nll))
    model.train(was_training)
    return PerplexityResult(math.exp(sum(nlls) / len(nlls)), windows, total, seqlen, nlls)


def density_report(model: nn.Module) -> pd.DataFrame:
    """One row per pruned linear layer: shape, kept weights, density and sparsity
    (nonzero weights counted on the model as it is)."""
    rows = []
    for name, layer in pruned_linears(model).items():
        kept = int(torch.count_nonzero(layer.weight))
        n = layer.weight.numel()
        block = next(int(part) for part in name.split(".") if part.isdigit())
        rows.append({"layer": name, "block": block, "rows": layer.out_features,
                     "columns": layer.in_features, "params": n, "kept": kept,
                     "density": kept / n, "sparsity": 1 - kept / n})
    return pd.DataFrame(rows)


def overall_density(report: pd.DataFrame) -> float:
    """Kept fraction over all pruned layers (parameter-weighted)."""
    return float(report["kept"].sum() / report["params"].sum())
