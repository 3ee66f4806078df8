"""GPTQ with and without act-order on a real model: perplexity and real bits per weight.

One process: the model, calibration windows and evaluation tokens are loaded once, and every
configuration starts from the dense weights. A quick proxy of the act-order rows of the
quantization benchmark (the full protocol is 32 x 2048 calibration and evaluation windows):

    PYTHONPATH=. python bench/bench_act_order.py --calib-samples 16 --seqlen 512 --eval-windows 8
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from sparsegpt_utils.data import calibration_windows, eval_tokens
from sparsegpt_utils.evaluate import perplexity
from sparsegpt_utils.models import load_model, pruned_linears
from sparsegpt_utils.prune import PruneConfig, prune_model
from sparsegpt_utils.quant import QuantSpec, grid_storage_bits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--wbits", type=int, nargs="+", default=[4])
    p.add_argument("--groupsize", type=int, default=None, help="columns per grid (default: per row)")
    p.add_argument("--density", type=float, default=1.0)
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--csv", default=None, help="also write the table here")
    args = p.parse_args(argv)

    model, tok = load_model(args.model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, args.calib, args.calib_samples, args.seqlen, seed=0)
    ids = eval_tokens(tok, args.eval)
    print(f"{args.model}: calibration {args.calib_samples} x {args.seqlen} of {args.calib} (seed 0); "
          f"eval first {args.eval_windows} x {args.seqlen} windows of {args.eval}", flush=True)
    rows = []
    for bits in args.wbits:
        for act_order in (False, True):
            model.load_state_dict(dense)
            t0 = time.perf_counter()
            spec = QuantSpec(bits, args.groupsize)
            res = prune_model(model, calib, PruneConfig("sparsegpt", args.density, quant=spec,
                                                        act_order=act_order), progress=False)
            seconds = time.perf_counter() - t0
            layers = pruned_linears(model)
            stored = sum(grid_storage_bits(res.grids[n], layer.in_features,
                                           None if bool(res.masks[n].all()) else res.masks[n])
                         for n, layer in layers.items())
            params = sum(layer.weight.numel() for layer in layers.values())
            ppl = perplexity(model, ids, args.seqlen, args.eval_windows, progress=False).ppl
            rows.append({"model": args.model, "wbits": bits, "groupsize": args.groupsize or "row",
                         "density": args.density, "act_order": act_order, "avg_bits": stored / params,
                         "ppl": ppl, "prune_seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        from sparsegpt_utils.results import write_csv_atomic

        write_csv_atomic(args.csv, table)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
