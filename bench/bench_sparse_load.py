"""Peak memory of loading a compact checkpoint for CPU inference: dense against ``sparse=True``.

    PYTHONPATH=. .venv/bin/python bench/bench_sparse_load.py                 # density 0.5, 2 repeats
    PYTHONPATH=. .venv/bin/python bench/bench_sparse_load.py --density 0.3 --repeats 3

smollm2-135m is pruned with per-matrix magnitude masks (memory depends on the density, not on
which weights are kept) and saved with fp16 values. Each way of loading then runs in a fresh
process: after the imports the kernel's high-water mark is reset to the current RSS
(``/proc/self/clear_refs``), so ``peak_rise_mb`` is the peak resident memory the load itself
added (MB = 2**20 bytes). Variants:

- ``dense``: ``load_pruned(dir, dtype=float32)``, the baseline;
- ``dense+sparsify``: the dense load, then ``sparsify_for_inference`` (bitmask layers);
- ``sparse``: ``load_pruned(dir, sparse=True, measure=False)``: every pruned layer built as a
  bitmask layer from the file, no dense weight of a pruned layer ever made;
- ``sparse+measure``: ``load_pruned(dir, sparse=True)``: each group of layers (same shape and
  density) in the fastest of dense, bitmask and csr16, timed in the model's one-token step.

The bound beside them: what the loaded model itself holds (its parameters and buffers). Every
variant's greedy continuation of a prompt is compared with the dense load's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("dense", "dense+sparsify", "sparse", "sparse+measure")


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def measure(directory: str, variant: str) -> dict:
    """One load in this (fresh) process; the JSON line the parent reads."""
    import torch

    from sparsegpt_utils.checkpoint import load_pruned
    from sparsegpt_utils.sparse_inference import inference_formats, sparsify_for_inference

    torch.set_num_threads(1)
    rss0 = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    if variant in ("dense", "dense+sparsify"):
        model, tok = load_pruned(directory, dtype=torch.float32)
        if variant == "dense+sparsify":
            sparsify_for_inference(model, kernel="bitmask", measure=False)
    else:
        model, tok = load_pruned(directory, sparse=True, measure=variant == "sparse+measure")
    seconds = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    formats = inference_formats(model)["format"].value_counts()
    return {"variant": variant, "peak_rise_mb": (_kb("VmHWM") - rss0) / 1024,
            "model_mb": held / 2**20, "seconds": seconds, "greedy": greedy,
            "formats": " ".join(f"{k}×{v}" for k, v in formats.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.5, help="fraction of weights KEPT (default 0.5)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per variant (median)")
    p.add_argument("--csv", default=None, help="also write the table here")
    p.add_argument("--measure", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if not 0 < args.density < 1:
        p.error(f"--density must be in (0, 1), got {args.density}")

    import pandas as pd
    import torch

    from sparsegpt_utils.checkpoint import save_pruned
    from sparsegpt_utils.models import load_model, pruned_linears
    from sparsegpt_utils.results import write_csv_atomic
    from sparsegpt_utils.solver import magnitude_mask

    with tempfile.TemporaryDirectory(prefix="bench_sparse_load-") as work:
        folder = Path(work) / "ckpt"
        model, tok = load_model("smollm2-135m", progress=False)
        masks = {}
        with torch.no_grad():
            for name, layer in pruned_linears(model).items():
                masks[name] = magnitude_mask(layer.weight, args.density, name=name)
                layer.weight.mul_(masks[name])
        save_pruned(model, folder, tok, masks, progress=False)
        del model
        runs = []
        for _ in range(args.repeats):
            for variant in VARIANTS:  # interleaved, each in its own process
                out = subprocess.run([sys.executable, __file__, "--measure", str(folder), variant],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    df = pd.DataFrame(runs)
    reference = df[df["variant"] == "dense"]["greedy"].iloc[0]
    rows = []
    for variant in VARIANTS:
        part = df[df["variant"] == variant]
        rows.append({"variant": variant, "density": args.density, "sparsity": 1 - args.density,
                     "peak_rise_mb": statistics.median(part["peak_rise_mb"]),
                     "model_mb": part["model_mb"].iloc[0], "load_s": statistics.median(part["seconds"]),
                     "formats": part["formats"].iloc[0],
                     "same_greedy": all(g == reference for g in part["greedy"])})
    table = pd.DataFrame(rows)
    table["vs_dense"] = table["peak_rise_mb"] / table.loc[0, "peak_rise_mb"]
    print(table.round(2).to_string(index=False))
    if args.csv:
        write_csv_atomic(args.csv, table)


if __name__ == "__main__":
    main()
