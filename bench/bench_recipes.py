"""Extreme-sparsity recipes: perplexity against training tokens, per recipe, loss and learning rate.

    SPARSEGPT_DATA_DIR=../shared/data PYTHONPATH=. .venv/bin/python bench/bench_recipes.py \
        --densities 0.2,0.1 --recipes oneshot,iter4,cubic4 --losses kd,kd+sh,lm+kd --lrs 5e-5 \
        --steps 128 --eval-every 32 --eval-windows 32

Recipes (density = fraction KEPT, sparsity = 1 − density):
- ``oneshot``: prune once to the target density, then fine-tune ``--steps`` steps;
- ``iter4``: the schedule 0.5 → 0.3 → 0.2 → 0.1 (cut at the target), ``--steps`` split evenly
  over the levels, each level re-pruned on the current model (masks only shrink);
- ``cubicK``: a cubic schedule of K levels to the target (``iterative.cubic_schedule``);
- ``via<d>[/<d>...]``: the given densities, then the target (``via0.2`` at 0.1: 0.2 → 0.1), so a
  run at 0.1 also reports 0.2 after its first level's fine-tuning, at the time spent by then.
Losses: ``kd`` (token KL to the dense model), ``kd+sh`` (KL + SquareHead), ``lm+kd``.
Every level prunes with ``--method`` on ``--calib-samples`` × ``--calib-seqlen`` tokens of the
training text (a new draw per level), with ``--owl`` (``--owl-lambda``, ``--owl-m``: the block
densities, fixed once from the dense model) / ``--exact-update`` / ``--reconstruct``.
Training text: WikiText-2 validation (its last ``--val-tokens`` held out); evaluation: the first
``--eval-windows`` × ``--eval-seqlen`` windows of WikiText-2 test, every ``--eval-every`` steps
and at the end of each level. ``seconds`` counts pruning and training only (evaluations excluded).
Writes ``--out``.csv (one row per evaluation point, result-row keys, each written as measured)
and ``--out``.png/.svg. Rows already in ``--out``.csv stay: a run finished there with the same
settings is skipped, one that was killed starts over (its points are replaced).
``--plot-from a.csv,b.csv`` plots earlier outputs together instead (one evaluation protocol only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sparsegpt_utils.data import calibration_windows_from_ids, eval_tokens, tokenize_text  # noqa: E402
from sparsegpt_utils.evaluate import density_report, overall_density, perplexity  # noqa: E402
from sparsegpt_utils.finetune import LR_SCHEDULES, FinetuneConfig, finetune, split_train_validation  # noqa: E402
from sparsegpt_utils.iterative import check_no_overlap, cubic_schedule, training_text  # noqa: E402
from sparsegpt_utils.models import load_model  # noqa: E402
from sparsegpt_utils.owl import block_params, outlier_ratios, owl_densities  # noqa: E402
from sparsegpt_utils.plots import save_figure  # noqa: E402
from sparsegpt_utils.prune import METHODS, PruneConfig, prune_model  # noqa: E402
from sparsegpt_utils.results import write_csv_atomic  # noqa: E402

ITER4 = [0.5, 0.3, 0.2, 0.1]
LOSSES = {"kd": {"lm_weight": 0.0, "kd_weight": 1.0},
          "kd+sh": {"lm_weight": 0.0, "kd_weight": 1.0, "squarehead_weight": 1.0},
          "lm+kd": {"lm_weight": 1.0, "kd_weight": 1.0}}


def schedule(recipe: str, density: float) -> list[float]:
    """The densities (fraction KEPT) a recipe prunes to, ending at ``density``."""
    if recipe == "oneshot":
        return [density]
    if recipe == "iter4":
        return [d for d in ITER4 if d > density + 1e-9] + [density]
    if recipe.startswith("cubic") and recipe[5:].isdigit() and int(recipe[5:]) >= 1:
        return cubic_schedule(density, int(recipe[5:]))
    if recipe.startswith("via"):
        try:
            levels = [float(x) for x in recipe[3:].split("/")] + [density]
        except ValueError:
            levels = []
        if levels and all(1 > a > b > 0 for a, b in zip(levels, levels[1:])):
            return levels
        raise ValueError(f"--recipes: {recipe!r}: via<d>/<d>... needs densities in (0, 1) "
                         f"decreasing to the target {density}")
    raise ValueError(f"--recipes: {recipe!r} is not one of oneshot, iter4, cubicK (K >= 1), via<d>[/<d>...]")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="smollm2-135m")
    a("--densities", default="0.2,0.1", help="final densities (fraction KEPT), comma-separated")
    a("--recipes", default="oneshot,iter4,cubic4")
    a("--losses", default="kd,kd+sh,lm+kd", help=f"comma-separated, of {list(LOSSES)}")
    a("--lrs", default="5e-5", help="learning rates, comma-separated (a sweep)")
    a("--steps", type=int, default=128, help="fine-tuning steps per recipe, split evenly over its levels")
    a("--eval-every", type=int, default=32, help="evaluate every this many steps (and at each level's end)")
    a("--batch-size", type=int, default=2)
    a("--grad-accum", type=int, default=1)
    a("--seqlen", type=int, default=256)
    a("--warmup-steps", type=int, default=2)
    a("--lr-schedule", default="constant", choices=LR_SCHEDULES, help="after warm-up, within each level")
    a("--method", default="sparsegpt", choices=METHODS)
    a("--owl", action="store_true")
    a("--owl-lambda", type=float, default=PruneConfig.owl_lambda, help="OWL: spread of the block densities")
    a("--owl-m", type=float, default=PruneConfig.owl_m, help="OWL: outlier threshold, x the mean Wanda score")
    a("--exact-update", action="store_true")
    a("--reconstruct", action="store_true")
    a("--calib-samples", type=int, default=8)
    a("--calib-seqlen", type=int, default=512)
    a("--val-tokens", type=int, default=16384)
    a("--eval-windows", type=int, default=32)
    a("--eval-seqlen", type=int, default=2048)
    a("--adamw", default="default", choices=("default", "foreach", "fused"))
    a("--teacher-dtype", default="same", choices=("same", "bfloat16"))
    a("--mixed-precision", default="no", choices=("no", "bf16"))
    a("--device", default=None, help="default: cuda when available, else cpu")
    a("--threads", type=int, default=2)
    a("--seed", type=int, default=0)
    a("--out", default="results/bench_recipes")
    a("--skip-dense", action="store_true",
      help="do not evaluate the dense model (its row comes from another output, with --plot-from)")
    a("--plot-from", default=None, metavar="CSV[,CSV...]",
      help="run nothing: plot the rows of these earlier outputs together into --out.png/.svg "
           "(one curve per recipe, loss, learning rate and any other setting that differs)")
    args = p.parse_args(argv)

    def floats(name, text):
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            p.error(f"{name}: {text!r}: comma-separated numbers")

    args.density_list = floats("--densities", args.densities)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.loss_list = [x.strip() for x in args.losses.split(",") if x.strip()]
    args.lr_list = floats("--lrs", args.lrs)
    for name, values in (("--densities", args.density_list), ("--recipes", args.recipe_list),
                         ("--losses", args.loss_list), ("--lrs", args.lr_list)):
        if not values:
            p.error(f"{name}: give at least one value")
    if not all(0 < d < 1 for d in args.density_list):
        p.error(f"--densities: {args.densities!r}: fractions KEPT, each in (0, 1)")
    if not all(lr > 0 for lr in args.lr_list):
        p.error(f"--lrs: {args.lrs!r}: learning rates, each > 0")
    for r in args.recipe_list:
        for d in args.density_list:
            try:
                schedule(r, d)  # a bad recipe name fails here, before any long work
            except ValueError as e:
                p.error(str(e))
    bad = [x for x in args.loss_list if x not in LOSSES]
    if bad:
        p.error(f"--losses: {bad} not in {list(LOSSES)}")
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval-every must be >= 1")
    if not (args.owl_lambda >= 0 and args.owl_m > 0):
        p.error(f"--owl-lambda must be >= 0 and --owl-m > 0, got {args.owl_lambda:g}, {args.owl_m:g}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_from:
        table = pd.concat([pd.read_csv(f) for f in args.plot_from.split(",") if f.strip()], ignore_index=True)
        try:
            plot(table, args.out)
        except ValueError as e:
            raise SystemExit(f"--plot-from: {e}") from None
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dense, tok = load_model(args.model, dtype="float32")
    dense.to(device).eval().requires_grad_(False)
    text = training_text("wikitext2-valid")
    ev = eval_tokens(tok, "wikitext2")
    check_no_overlap(text, tok.decode(ev[0, :20000]))
    train_part, val_part = split_train_validation(tokenize_text(tok, text), args.val_tokens)
    params = block_params(dense)

    def ppl(m):
        return perplexity(m, ev, seqlen=args.eval_seqlen, max_windows=args.eval_windows, device=device,
                          progress=False).ppl

    ratios, owl_seconds = None, 0.0
    if args.owl:  # outlier ratios of the dense model, once: per-block densities then only fall
        t0 = time.perf_counter()
        calib = calibration_windows_from_ids(train_part, args.calib_samples, args.calib_seqlen, args.seed)
        ratios = outlier_ratios(dense, calib, args.owl_m, device, False)
        owl_seconds = time.perf_counter() - t0  # charged to every recipe's first level
    base = dict(model=args.model, method=args.method, owl=args.owl, **owl_settings(vars(args)),
                exact_update=args.exact_update,
                reconstruct=args.reconstruct, calib="wikitext2-valid", calib_samples=args.calib_samples,
                seqlen=args.calib_seqlen, seed=args.seed, eval="wikitext2", eval_windows=args.eval_windows,
                eval_seqlen=args.eval_seqlen, batch_size=args.batch_size * args.grad_accum,
                train_seqlen=args.seqlen, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                adamw=args.adamw, device=device.type, threads=args.threads)
    base["steps"] = args.steps
    out_csv = Path(f"{args.out}.csv")
    # rows already in --out stay: a finished run is skipped, an unfinished one (killed) starts over
    rows = pd.read_csv(out_csv).to_dict("records") if out_csv.is_file() else []

    def keep(row):  # every evaluation point is written as it is measured
        rows.append(row)
        write_csv_atomic(out_csv, pd.DataFrame(rows))

    if not args.skip_dense:
        if any(same_run(r, base, recipe="dense", method="dense") for r in rows):
            print(f"dense: already in {out_csv}", flush=True)
        else:
            keep({**base, "recipe": "dense", "family": "dense", "method": "dense", "loss": None,
                  "lr": None, "density": 1.0, "density_target": 1.0, "sparsity": 0.0, "ppl": ppl(dense),
                  "train_tokens": 0, "seconds": 0.0, "level": 0, "final": True})
            print(f"dense: {rows[-1]['ppl']:.2f}", flush=True)
    for density in args.density_list:
        for recipe in args.recipe_list:
            for loss in args.loss_list:
                for lr in args.lr_list:
                    run = dict(recipe=recipe, loss=loss, lr=lr, density_target=density)
                    if any(same_run(r, base, **run) and _as_text(r.get("final")) == "True" for r in rows):
                        print(f"{recipe} {loss} lr={lr:g} → {density}: already in {out_csv}, skipped",
                              flush=True)
                        continue
                    rows[:] = [r for r in rows if not same_run(r, base, **run)]  # a killed run's points
                    run_recipe(args, dense, train_part, val_part, ppl, params, ratios, device,
                               density, recipe, loss, lr, base, owl_seconds, on_row=keep)
    table = pd.DataFrame(rows)
    write_csv_atomic(out_csv, table)
    protocol = (table["eval"] == base["eval"]) & (table["eval_windows"] == base["eval_windows"]) & (
        table["eval_seqlen"] == base["eval_seqlen"])
    plot(table[protocol], args.out)  # rows of another protocol in the same file are not plotted
    final = table[table["final"].astype(bool) & protocol]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(final[["recipe", "loss", "lr", "density_target", "sparsity", "ppl", "train_tokens",
                     "seconds"]].round({"ppl": 2, "sparsity": 4, "seconds": 1}).to_string(index=False))


def _as_text(value) -> str:
    # CSV round trips turn 260 into 260.0 once a column has a gap: compare 260 and 260.0 as equal
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


# rows written before OWL's settings were options ran with these (then fixed) values
OWL_BEFORE_OPTIONS = {"owl_lambda": 0.08, "owl_m": 5.0}


def owl_settings(settings: dict) -> dict:
    """``owl_lambda`` and ``owl_m`` of a run with OWL, from its settings or its row (absent
    without OWL: they change nothing); a row from before they were options gets the values it
    ran with."""
    if _as_text(settings.get("owl")) != "True":
        return {}
    return {k: v if (v := settings.get(k)) is not None and not pd.isna(v) else before
            for k, before in OWL_BEFORE_OPTIONS.items()}


def same_run(row: dict, base: dict, **run) -> bool:
    """Whether ``row`` (from --out) was measured with the settings ``base`` and ``run``."""
    row = {**row, **owl_settings(row)}
    return all(_as_text(row.get(k)) == _as_text(v) for k, v in {**base, **run}.items())


def run_recipe(args, dense, train_part, val_part, ppl, params, ratios, device, density, recipe, loss, lr,
               base, owl_seconds, on_row) -> None:
    """One recipe at one final density: a row at every evaluation point (``seconds``: pruning and
    training so far, evaluations excluded), each passed to ``on_row`` as it is measured."""
    levels = schedule(recipe, density)
    per_level = [args.steps // len(levels) + (i < args.steps % len(levels)) for i in range(len(levels))]
    model = copy.deepcopy(dense).requires_grad_(True)
    family = f"{args.method}+finetune" if recipe == "oneshot" else "iterative"  # as sweep.add_family
    tag = f"{recipe} {loss} lr={lr:g} → {density}"
    masks, tokens, spent = None, 0, owl_seconds
    ft_base = FinetuneConfig(lr=lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             seqlen=args.seqlen, warmup_steps=args.warmup_steps, val_windows=0,
                             lr_schedule=args.lr_schedule,
                             adamw=args.adamw,
                             teacher_dtype=args.teacher_dtype, mixed_precision=args.mixed_precision,
                             **LOSSES[loss])
    tokens_per_step = args.batch_size * args.grad_accum * args.seqlen

    def record(level, level_density, at_tokens, final, m, measured=True):
        # inside fine-tuning the weights are parametrized (W * mask): the density is the level's
        achieved = overall_density(density_report(m)) if measured else level_density
        row = {**base, "recipe": recipe, "family": family, "loss": loss, "lr": lr, "density": level_density,
               "density_target": density, "density_achieved": achieved, "sparsity": 1 - level_density,
               "ppl": ppl(m), "train_tokens": at_tokens, "seconds": spent, "level": level, "final": final,
               "levels": "→".join(f"{d:g}" for d in levels)}
        print(f"{tag}: level {level} density {level_density:g}, {at_tokens} tokens, {spent / 60:.1f} min, "
              f"ppl {row['ppl']:.2f}", flush=True)
        on_row(row)

    for level, (d, steps) in enumerate(zip(levels, per_level, strict=True), start=1):
        t0 = time.perf_counter()
        calib = calibration_windows_from_ids(train_part, args.calib_samples, args.calib_seqlen,
                                             args.seed + level)
        block_densities = owl_densities(ratios, d, args.owl_lambda, params) if ratios else None
        config = PruneConfig(method=args.method, density=d, prior_masks=masks,
                             block_densities=block_densities, exact_update=args.exact_update,
                             reconstruct=args.reconstruct)
        masks = prune_model(model, calib, config, device=device, progress=False).masks
        spent += time.perf_counter() - t0
        record(level, d, tokens, False, model)  # after pruning, before this level's training
        if steps == 0:
            continue
        t_train = [time.perf_counter()]

        def callback(step, m, level=level, d=d, steps=steps):
            if step % args.eval_every == 0 and step < steps:
                nonlocal spent
                spent += time.perf_counter() - t_train[0]
                record(level, d, tokens + step * tokens_per_step, False, m, measured=False)
                t_train[0] = time.perf_counter()

        cfg = dataclasses.replace(ft_base, steps=steps, seed=args.seed + level)
        res = finetune(model, train_part, cfg, masks=masks, teacher=dense, val_ids=val_part, progress=False,
                       callback=callback)
        spent += time.perf_counter() - t_train[0]
        if not res.masks_kept:
            raise RuntimeError(f"{tag}: a pruned weight became nonzero during fine-tuning")
        tokens += res.tokens
        record(level, d, tokens, level == len(levels), model)


# what a curve's runs were asked to do besides recipe, loss and rate: curves differ in any of them
CURVE_SETTINGS = ("model", "method", "owl", "owl_lambda", "owl_m", "exact_update", "reconstruct", "calib",
                  "calib_samples", "seqlen", "seed", "batch_size", "train_seqlen", "lr_schedule",
                  "warmup_steps", "adamw", "device", "threads", "levels", "steps")


def plot(table: pd.DataFrame, out: str) -> None:
    """ppl (log) against training tokens, one panel per final density (with the points of runs
    that pass through it on the way lower), one line per recipe, loss, learning rate and any
    other setting that differs between the runs. All rows must share one evaluation protocol
    (``eval``, ``eval_windows``, ``eval_seqlen``): a mix is refused."""
    protocols = table[[c for c in ("eval", "eval_windows", "eval_seqlen") if c in table]].drop_duplicates()
    if len(protocols) > 1:
        raise ValueError(f"rows from different evaluation protocols, not plotted together:\n{protocols}")
    runs = table[table["recipe"] != "dense"]
    runs = pd.DataFrame([{**r, **owl_settings(r)} for r in runs.to_dict("records")], index=runs.index)
    densities = sorted(runs["density_target"].unique(), reverse=True)
    panels = max(1, len(densities))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    dense = table.loc[table["recipe"] == "dense", "ppl"]
    keys = ["recipe", "loss", "lr"]
    keys += [c for c in CURVE_SETTINGS if c in runs and runs[c].astype(str).nunique() > 1]
    for ax, d in zip(axes[0], densities, strict=False):
        # every run's points at this density: a recipe passing through it on its way lower shows
        # where it stood there, at the tokens it had spent by then
        sub = runs[(runs["density"] - d).abs() < 1e-9]
        for values, g in sub.groupby(keys, sort=True, dropna=False):
            recipe, loss, lr, *more = values
            g = g.sort_values(["train_tokens", "level"])
            extra = "".join(f", {k}={v}" for k, v in zip(keys[3:], more, strict=True) if not pd.isna(v))
            ax.plot(g["train_tokens"], g["ppl"], marker="o", ms=3,
                    label=f"{recipe}, {loss}, lr {lr:g}{extra} ({g['seconds'].max() / 60:.0f} min)")
        if len(dense):
            ax.axhline(float(dense.iloc[0]), color="k", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("perplexity (WikiText-2 test)")
        ax.set_title(f"density {d:g} (sparsity {1 - d:g})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, formats=("png", "svg"))
    plt.close(fig)


if __name__ == "__main__":
    main()
