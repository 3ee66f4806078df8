"""Decode and prefill speed of pruned models on CPU: sparse kernels against the same saved model dense.

For each setting (a density, or an N:M pattern) smollm2-135m is pruned with per-matrix
magnitude masks (speed depends on the density and the pattern, not on which weights are kept,
so magnitude masks stand in for SparseGPT's), saved as a compact checkpoint (fp16 values) and
loaded back twice: dense (float32 ``nn.Linear``, the baseline) and with
``sparsify_for_inference`` (each group of layers in the fastest of dense, bitmask and csr16, timed
in the model). Both run in this process, interleaved: decoding step by step (greedy, KV cache; tokens/s
= 1 / median step time) and a prompt of ``--prefill`` tokens (median of repeats). ``agreement``:
the fraction of greedy tokens the sparse model shares with the dense one.

The memory bound beside each speedup: one decoded token reads every weight once, so the ratio of
bytes read — dense float32 (4 bytes per weight) against the sparse model as built (bitmask: 2
bytes per kept weight + 1/8 byte per weight of mask; csr16: 4 bytes per kept weight; fp16: 2
bytes per weight; ``lm_head`` float32, or fp16 with ``half_dense``) — bounds the decode speedup
from above, before what the rest of the model costs (norms, attention, Python: the same for both).
Each setting runs with ``half_dense`` off and on: on, ``lm_head`` and any layer left dense are read
from fp16 (the compact checkpoint stores fp16, so the numbers are the same) — a gain from 16-bit
storage, not from sparsity, reported in its own rows.

    PYTHONPATH=. .venv/bin/python bench/bench_inference.py            # 0.5, 0.3, 0.1, 2:4; 1 and 2 threads
    PYTHONPATH=. .venv/bin/python bench/bench_inference.py --settings 0.5 --threads 1 --repeats 2
    PYTHONPATH=. .venv/bin/python bench/bench_inference.py --rest     # the step without its linear layers
    PYTHONPATH=. .venv/bin/python bench/bench_inference.py --builds   # AVX2 build against this CPU's
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils import kernels  # noqa: E402
from sparsegpt_utils.checkpoint import load_pruned, save_pruned  # noqa: E402
from sparsegpt_utils.models import load_model, pruned_linears  # noqa: E402
from sparsegpt_utils.prune import PruneConfig, prune_model  # noqa: E402
from sparsegpt_utils.results import write_csv_atomic  # noqa: E402
from sparsegpt_utils.sparse_inference import (  # noqa: E402
    bytes_read,
    compare_decoding,
    inference_formats,
    sparsify_for_inference,
)

PROMPT = ("The history of the city begins in the Roman period, when a small settlement grew up "
          "around the river crossing. In the centuries that followed,")


def bytes_per_token(dense_model, sparse_model) -> tuple[int, int]:
    """(dense float32 bytes, bytes of the sparse model as built) read per decoded token by the
    decoder's linear layers and ``lm_head`` (embeddings read one row, norms are negligible):
    float32 4 bytes per weight, fp16 2, bitmask 2 per kept weight + 1/8 per weight, csr16 4 per
    kept weight."""
    dense = 4 * sum(m.weight.numel() for m in pruned_linears(dense_model).values())
    dense += 4 * dense_model.get_output_embeddings().weight.numel()
    names = inference_formats(sparse_model)["layer"]
    sparse = sum(bytes_read(sparse_model.get_submodule(name)) for name in names)
    sparse += bytes_read(sparse_model.get_output_embeddings())
    return dense, round(sparse)


@torch.no_grad()
def prefill_seconds(dense, sparse, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    times = ([], [])
    for r in range(repeats):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (dense, sparse)[k](input_ids=ids, use_cache=False)
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


class _NoLinear(torch.nn.Module):
    """Stands in for a linear layer at no cost: zeros of the output's shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


@torch.no_grad()
def rest_of_model(base, prompt, threads: list[int], new_tokens: int) -> pd.DataFrame:
    """What a decoding step costs besides its linear layers (norms, rotary, attention, the KV
    cache, Python): the dense model against a copy whose decoder linear layers and ``lm_head``
    are stubs, interleaved. No kernel can remove this part: it caps the decode speedup at
    dense_ms / (rest_ms + linear time of the sparse model)."""
    stub = copy.deepcopy(base)
    for name, layer in [*pruned_linears(stub).items(), ("lm_head", stub.get_output_embeddings())]:
        parent, _, attr = name.rpartition(".")
        setattr(stub.get_submodule(parent) if parent else stub, attr, _NoLinear(layer.out_features))
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        run = compare_decoding(base, stub, prompt, new_tokens)
        dense_ms, rest_ms = 1e3 / run["dense_tokens_per_s"], 1e3 / run["sparse_tokens_per_s"]
        rows.append({"threads": t, "dense_ms_per_token": round(dense_ms, 2),
                     "rest_ms_per_token": round(rest_ms, 2), "rest_share": round(rest_ms / dense_ms, 3)})
    return pd.DataFrame(rows)


@torch.no_grad()
def other_builds(base, tok, prompt, new_tokens: int, repeats: int) -> pd.DataFrame:
    """Decode speedup of the kernels built for this CPU ("native") and for AVX2 only (what a CPU
    without AVX-512 runs), 1 thread, every pruned layer in one format (bitmask at density 0.5
    and 0.3, csr16 at 0.1), each against dense in the same process."""
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="sgpt-builds-"))
    builds = {isa: kernels.bind(kernels.compile_library(folder / f"{isa}.so", isa))
              for isa in ("native", "avx2")}
    rows = []
    for density, fmt in ((0.5, "bitmask"), (0.3, "bitmask"), (0.1, "csr16")):
        dense = _saved_and_loaded(base, tok, PruneConfig(method="magnitude", density=density))
        row = {"density": density, "sparsity": 1 - density, "format": fmt, "threads": 1}
        for isa, lib in builds.items():
            sparse = sparsify_for_inference(copy.deepcopy(dense), kernel=fmt, measure=False)
            with kernels.using(lib):  # the layers bind the library they first run on
                sparse(input_ids=prompt)
            runs = [compare_decoding(dense, sparse, prompt, new_tokens) for _ in range(repeats)]
            row[f"{isa}_speedup"] = round(statistics.median(r["speedup"] for r in runs), 3)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def _saved_and_loaded(base, tok, cfg: PruneConfig):
    """``base`` pruned by ``cfg``, saved as a compact checkpoint and loaded back dense (float32)."""
    model = copy.deepcopy(base)
    result = prune_model(model, None, cfg, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, Path(tmp) / "ckpt", tok, result.masks, progress=False)
        dense, _ = load_pruned(Path(tmp) / "ckpt", dtype=torch.float32)
    return dense


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", nargs="+", default=["0.5", "0.3", "0.1", "2:4"],
                   help="densities (fraction kept) or N:M patterns")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--half-dense", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="lm_head and the layers left dense from float32 ('off'), from fp16 ('on'), or both")
    p.add_argument("--out", default="results/bench_inference.csv")
    p.add_argument("--rest", action="store_true",
                   help="only time the model without its linear layers (results/bench_inference_rest.csv)")
    p.add_argument("--builds", action="store_true",
                   help="only compare the native and AVX2 kernel builds (results/bench_inference_builds.csv)")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.prefill < 2:
        p.error("--new-tokens and --prefill must be >= 2 and --repeats >= 1")

    base, tok = load_model(args.model)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    if args.builds:
        table = other_builds(base, tok, prompt, args.new_tokens, args.repeats)
        write_csv_atomic("results/bench_inference_builds.csv", table)
        return table
    if args.rest:
        table = rest_of_model(base, prompt, args.threads, args.new_tokens)
        write_csv_atomic("results/bench_inference_rest.csv", table)
        print(table.to_string(index=False))
        return table
    long_ids = torch.randint(0, base.config.vocab_size, (1, args.prefill),
                             generator=torch.Generator().manual_seed(0))
    rows = []
    for setting in args.settings:
        nm = setting if ":" in setting else None
        cfg = PruneConfig(method="magnitude", nm=nm, density=1.0 if nm else float(setting))
        dense = _saved_and_loaded(base, tok, cfg)
        density = 0.5 if nm else float(setting)
        for threads, half in [(t, h) for t in args.threads for h in args.half_dense]:
            torch.set_num_threads(threads)
            half_dense = half == "on"
            sparse = sparsify_for_inference(copy.deepcopy(dense), half_dense=half_dense)
            dense_bytes, sparse_bytes = bytes_per_token(dense, sparse)
            formats = inference_formats(sparse)["format"].value_counts().to_dict()
            compare_decoding(dense, sparse, prompt, 4)  # warm up
            runs = [compare_decoding(dense, sparse, prompt, args.new_tokens) for _ in range(args.repeats)]
            pre_dense, pre_sparse = prefill_seconds(dense, sparse, long_ids, args.repeats)
            row = {
                "model": args.model, "masks": "magnitude", "setting": setting, "density": density,
                "sparsity": 1 - density, "threads": threads, "half_dense": half_dense,
                "layers": ", ".join(f"{n} {f}" for f, n in sorted(formats.items())),
                "dense_tok_s": round(statistics.median(r["dense_tokens_per_s"] for r in runs), 2),
                "sparse_tok_s": round(statistics.median(r["sparse_tokens_per_s"] for r in runs), 2),
                "decode_speedup": round(statistics.median(r["speedup"] for r in runs), 3),
                "decode_bound": round(dense_bytes / sparse_bytes, 2),
                "dense_MB_per_token": round(dense_bytes / 1e6, 1),
                "sparse_MB_per_token": round(sparse_bytes / 1e6, 1),
                "agreement": min(r["agreement"] for r in runs),
                f"prefill{args.prefill}_dense_s": round(pre_dense, 3),
                f"prefill{args.prefill}_sparse_s": round(pre_sparse, 3),
                "prefill_speedup": round(pre_dense / pre_sparse, 3),
                "new_tokens": args.new_tokens, "repeats": args.repeats,
            }
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False), flush=True)
            del sparse
        del dense
    table = pd.DataFrame(rows)
    if args.out:
        write_csv_atomic(args.out, table)
    shown = ["setting", "sparsity", "threads", "half_dense", "dense_tok_s", "sparse_tok_s", "decode_speedup",
             "decode_bound", "prefill_speedup", "agreement", "layers"]
    try:
        print("\n" + table[shown].to_markdown(index=False))
    except ImportError:
        print("\n" + table[shown].to_string(index=False))
    return table


if __name__ == "__main__":
    main()
