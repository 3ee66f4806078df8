"""Decode speed of a pruned model with sparse (CSR) linear layers against the same weights dense.

For each density the model is pruned with per-matrix magnitude masks (speed depends only on
the density, not on which weights are kept, so magnitude masks stand in for SparseGPT's), then
timed as dense ``nn.Linear`` layers and after ``sparsify_for_inference``, the two interleaved
token by token in one process (medians over all decode steps of all repeats; the speedup is
the median of the per-step ratios). Agreement: the largest |Δ logit| over the prompt and
the dense model's continuation (one teacher-forced forward each), and the fraction of greedy
tokens the sparse model reproduces.

    PYTHONPATH=. .venv/bin/python bench/bench_inference.py                 # smollm2-135m, CPU
    PYTHONPATH=. .venv/bin/python bench/bench_inference.py --densities 0.1 --repeats 3
    PYTHONPATH=. .venv/bin/python bench/bench_inference.py --device cuda --nm 2:4   # GPU, untested here
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils.models import load_model  # noqa: E402
from sparsegpt_utils.prune import PruneConfig, prune_model  # noqa: E402
from sparsegpt_utils.results import write_json_atomic  # noqa: E402
from sparsegpt_utils.sparse_inference import inference_formats, sparsify_for_inference  # noqa: E402

PROMPT = ("The history of the city begins in the Roman period, when a small settlement grew up "
          "around the river crossing. In the centuries that followed,")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (needs the ``tabulate`` package), else as plain text."""
    try:
        return table.to_markdown(index=False)
    except ImportError:
        return table.to_string(index=False)


@torch.no_grad()
def paired_decode(models, ids: torch.Tensor, new_tokens: int) -> tuple[list[list[float]], list[torch.Tensor]]:
    """Greedy decoding with the KV cache, the models taking turns token by token (alternating
    which goes first) so that each pair of steps sees the same machine load. Returns the
    seconds of every decode step per model (the prompt's forward is not timed) and the
    generated ids [1, new_tokens] per model."""
    state = []
    for model in models:
        out = model(input_ids=ids, use_cache=True)
        state.append([out.past_key_values, out.logits[:, -1:].argmax(-1)])
    toks = [[s[1]] for s in state]
    times = [[] for _ in models]
    for step in range(new_tokens - 1):
        order = range(len(models)) if step % 2 == 0 else reversed(range(len(models)))
        for k in order:
            past, tok = state[k]
            _sync(ids.device)
            t0 = time.perf_counter()
            out = models[k](input_ids=tok, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(ids.device)
            times[k].append(time.perf_counter() - t0)
            state[k] = [out.past_key_values, nxt]
            toks[k].append(nxt)
    return times, [torch.cat(t, 1) for t in toks]


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    p.add_argument("--nm", default=None, help="N:M masks instead of densities (e.g. 2:4, for the GPU path)")
    p.add_argument("--max-density", type=float, default=0.3,
                   help="sparsify_for_inference threshold (layers at or below it become CSR)")
    p.add_argument("--force", action="store_true",
                   help="also time CSR at densities above --max-density (max_density=1)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: steadier timings on a shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the table as JSON records here")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    torch.set_num_threads(args.threads)

    base, tok = load_model(args.model, device=args.device)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(args.device)
    settings = [("nm", args.nm)] if args.nm else [("density", d) for d in args.densities]
    rows = []
    for kind, value in settings:
        dense = copy.deepcopy(base)
        cfg = PruneConfig(method="magnitude", nm=value) if kind == "nm" else \
            PruneConfig(method="magnitude", density=value)
        prune_model(dense, None, cfg, progress=False)
        variants = [("auto", args.max_density)]
        if args.force and kind == "density" and value > args.max_density:
            variants.append(("forced", 1.0))
        for label, threshold in variants:
            sparse = sparsify_for_inference(copy.deepcopy(dense), max_density=threshold)
            formats = inference_formats(sparse)["format"].value_counts().to_dict()
            paired_decode([dense, sparse], ids, 4)  # warm up
            dense_s, sparse_s = [], []
            for _ in range(args.repeats):
                (d_s, s_s), (dense_ids, sparse_ids) = paired_decode([dense, sparse], ids, args.new_tokens)
                dense_s += d_s
                sparse_s += s_s
            full = torch.cat([ids, dense_ids], 1)
            with torch.no_grad():
                diff = (dense(input_ids=full).logits - sparse(input_ids=full).logits).abs().max().item()
            d_med, s_med = 1 / statistics.median(dense_s), 1 / statistics.median(sparse_s)
            # per step pair: dense seconds / sparse seconds, median over all pairs
            speedup = statistics.median(d / s for d, s in zip(dense_s, sparse_s, strict=True))
            dens = 0.5 if kind == "nm" else value
            rows.append({
                "model": args.model, "masks": f"magnitude {value}" if kind == "nm" else "magnitude",
                "density": dens, "sparsity": 1 - dens, "max_density": threshold, "variant": label,
                "layers": ", ".join(f"{n} {f}" for f, n in formats.items()),
                "dense_tok_s": round(d_med, 2), "sparse_tok_s": round(s_med, 2),
                "speedup": round(speedup, 3),
                "max_abs_logit_diff": float(f"{diff:.3g}"),
                "greedy_agreement": float((sparse_ids == dense_ids).float().mean()),
                "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                "device": args.device,
            })
            print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
            del sparse
        del dense
    table = pd.DataFrame(rows)
    shown = ["density", "sparsity", "variant", "layers", "dense_tok_s", "sparse_tok_s", "speedup",
             "max_abs_logit_diff", "greedy_agreement"]
    print("\n" + markdown(table[shown]))
    if args.json:
        write_json_atomic(args.json, rows)
    return table


if __name__ == "__main__":
    main()
