"""Compact checkpoint size and speed on smollm2-135m, against a dense fp16 save_pretrained.

For each setting the model (float32) is pruned with per-matrix magnitude masks, and for
``d0.5+4bit`` quantized round-to-nearest on one 4-bit asymmetric grid per row (size and speed
depend on the masks' density and structure and on the bit widths, not on how the weights were
chosen, so magnitude + RTN stand in for SparseGPT here). Each is saved with ``save_pruned``
(fp16 values) and loaded back with ``load_pruned`` and with transformers'
``AutoModelForCausalLM.from_pretrained`` (the registered quantizer); both loads are checked bit
for bit against the model cast to fp16. Baseline, same process: ``export_dense`` of the fp16 model and
``AutoModelForCausalLM.from_pretrained`` of that folder.

    PYTHONPATH=. .venv/bin/python bench/bench_checkpoint.py
    PYTHONPATH=. .venv/bin/python bench/bench_checkpoint.py --settings d0.1 --repeats 3

Columns: bits/weight over the pruned layers (every stored byte, DESIGN §1), checkpoint bytes
(whole folder: config, tokenizer, manifest), the ratio to the dense fp16 folder, and median
save / load seconds with their ratio to the dense baseline's, and from_pretrained seconds.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegpt_utils.checkpoint import (  # noqa: E402
    checkpoint_bytes,
    dense_fp16_bytes,
    export_dense,
    load_pruned,
    save_pruned,
)
from sparsegpt_utils.models import load_model, pruned_linears  # noqa: E402
from sparsegpt_utils.quant import QuantSpec, rtn_quantize  # noqa: E402
from sparsegpt_utils.results import write_csv_atomic  # noqa: E402
from sparsegpt_utils.solver import magnitude_mask  # noqa: E402

SETTINGS = {"d0.5": (0.5, None, None), "2:4": (None, (2, 4), None), "d0.1": (0.1, None, None),
            "d0.5+4bit": (0.5, None, 4)}


@torch.no_grad()
def prune(model, density, nm, wbits):
    masks, grids = {}, {}
    for name, layer in pruned_linears(model).items():
        mask = magnitude_mask(layer.weight, density or 1.0, nm)
        w = layer.weight * mask
        if wbits:
            w, grids[name] = rtn_quantize(w, QuantSpec(wbits))
            w = w * mask
        layer.weight.copy_(w)
        masks[name] = mask
    return masks, grids


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1, help="timed saves/loads per setting (median)")
    parser.add_argument("--csv", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base, tok = load_model(args.model, dtype=torch.float32)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint-"))
    try:
        half = copy.deepcopy(base).half()
        dense_dir = work / "dense"
        save_dense_s, _ = timed(lambda: export_dense(half, dense_dir, tok), args.repeats)
        load_dense_s, _ = timed(lambda: AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float16),
                                args.repeats)
        dense_bytes = checkpoint_bytes(dense_dir)
        half = None  # free it
        rows = [{"setting": "dense fp16 (save_pretrained)", "density": 1.0, "sparsity": 0.0,
                 "bits/weight": 16.0, "mask forms": "-", "bytes": dense_bytes, "vs dense": 1.0,
                 "save_s": save_dense_s, "load_s": load_dense_s, "save×": 1.0, "load×": 1.0,
                 "from_pretrained_s": load_dense_s, "exact": True}]
        print(f"dense fp16: {dense_bytes / 1e6:.1f} MB (tensor data {dense_fp16_bytes(base) / 1e6:.1f} MB), "
              f"save {save_dense_s:.2f} s, load {load_dense_s:.2f} s")
        for setting in args.settings:
            model = copy.deepcopy(base)
            masks, grids = prune(model, *SETTINGS[setting])
            ck = work / setting.replace(":", "-")
            save_s, manifest = timed(lambda: save_pruned(model, ck, tok, masks, grids, progress=False),
                                     args.repeats)
            load_s, (loaded, _) = timed(lambda: load_pruned(ck), args.repeats)
            hf_s, via_hf = timed(lambda: AutoModelForCausalLM.from_pretrained(ck), args.repeats)
            exact = same_weights(loaded, model.half()) and same_weights(via_hf, loaded)
            size = checkpoint_bytes(ck)
            forms = pd.Series([i["mask"] for i in manifest["layers"].values()]).value_counts()
            rows.append({"setting": setting, "density": round(manifest["density"], 4),
                         "sparsity": round(1 - manifest["density"], 4),
                         "bits/weight": round(manifest["avg_bits"], 3),
                         "mask forms": " ".join(f"{k}×{v}" for k, v in forms.items()),
                         "bytes": size, "vs dense": round(size / dense_bytes, 3),
                         "save_s": save_s, "load_s": load_s, "save×": save_s / save_dense_s,
                         "load×": load_s / load_dense_s, "from_pretrained_s": hf_s, "exact": exact})
            print(rows[-1])
            model = loaded = via_hf = None  # free them
        table = pd.DataFrame(rows)
        pd.set_option("display.width", 200)
        print(table.round({"save_s": 2, "load_s": 2, "save×": 2, "load×": 2, "from_pretrained_s": 2})
              .to_string(index=False))
        if args.csv:
            write_csv_atomic(args.csv, table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
