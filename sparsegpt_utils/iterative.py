"""Iterative pruning: prune → fine-tune → prune further, with masks that only shrink.

At each step of the schedule (densities = fraction of weights KEPT, falling), the model is
pruned again on the *current* model with the previous step's masks as prior masks (a weight
once pruned stays pruned), then fine-tuned for ``train_steps × num_epochs`` optimizer steps
with its masks kept (``finetune``), distilling from the dense teacher. Each finished step is
a checkpoint folder ``step_XX`` written atomically, carrying its history row; a re-run resumes
after the last finished step and never rewrites a finished one.

Every setting of ``config.prune`` (method, quantization, damping, block sizes, OWL, exact
update, reconstruction, mixed precision) applies at every level; only the density changes.
OWL's outlier ratios are measured once, on the dense model, so that every block's density
falls from level to level and masks that only shrink can always reach it. An N:M pattern is
the schedule's last level: the levels before it are unstructured, at the densities before
``N/M``, and the last level keeps at most N of every M weights. With quantization, each level
prunes and quantizes, fine-tunes in full precision, then rounds the kept weights back onto that
level's grids: ``ppl_finetuned`` and the saved step are the quantized model.

Training text never overlaps evaluation text: training windows come from the training source
(its ``train`` split, or a file), minus a held-out tail used for validation; evaluation is on
the evaluation source's ``test`` split, and an overlap check refuses a training text that
contains evaluation text.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .data import (
    FALLBACK_SOURCE,
    LOCAL_FILES,
    TextSource,
    calibration_windows_from_ids,
    eval_text,
    eval_tokens,
    resolve_text,
    tokenize_text,
)
from .evaluate import density_report, overall_density, perplexity
from .finetune import FinetuneConfig, current_masks, finetune, split_train_validation
from .mixed_precision import MixedPrecisionConfig
from .models import load_model, pruned_linears
from .owl import block_params, outlier_ratios, owl_densities
from .prune import PruneConfig, prune_model, prune_setting_keys
from .quant import QuantSpec
from .results import atomic_dir, remove_stale_temps, write_csv_atomic, write_json_atomic
from .save_utils import load_masked_model_single, save_pruned
from .solver import check_density

__all__ = [
    "IterativeConfig",
    "cubic_schedule",
    "run_iterative",
    "training_text",
    "training_source",
    "check_no_overlap",
    "prune_config_from_dict",
    "round_to_grids",
]


def cubic_schedule(final_density: float, steps: int, initial_density: float = 1.0) -> list[float]:
    """Zhu & Gupta's cubic schedule in sparsity, as densities (fraction KEPT) after each of
    ``steps`` steps: ``s_t = s_f + (s_i − s_f)(1 − t/n)³``; the last is ``final_density``."""
    check_density(final_density, "final_density")
    check_density(initial_density, "initial_density")
    if steps < 1:
        raise ValueError(f"steps (cubic schedule steps) must be >= 1, got {steps}")
    s_i, s_f = 1 - initial_density, 1 - final_density
    return [round(1 - (s_f + (s_i - s_f) * (1 - t / steps) ** 3), 6) for t in range(1, steps + 1)]


# settings that only a schedule may set, per level
_PER_LEVEL = ("density", "block_densities", "prior_masks")


def prune_config_from_dict(d: dict) -> PruneConfig:
    """A :class:`PruneConfig` from its ``asdict`` form (as saved in a run's ``config.json``)."""
    d = dict(d)
    if isinstance(d.get("quant"), dict):
        d["quant"] = QuantSpec(**d["quant"])
    if isinstance(d.get("mixed"), dict):
        d["mixed"] = MixedPrecisionConfig(**d["mixed"])
    if isinstance(d.get("nm"), list):
        d["nm"] = tuple(d["nm"])
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"prune: unknown PruneConfig fields {unknown}")
    return PruneConfig(**d)


@dataclass
class IterativeConfig:
    """One iterative run. ``densities``: fraction of weights KEPT after each step, strictly
    falling (sparsity = 1 − density); with ``cubic_steps`` > 0 they come from
    :func:`cubic_schedule` towards ``densities[-1]`` instead.

    ``prune``: how every level prunes (method, nm, quant, percdamp, blocksize, mask_blocksize,
    owl, owl_lambda, owl_m, exact_update, reconstruct, mixed, ...); its ``density`` is replaced
    by each level's. With ``prune.nm = (N, M)`` the last level applies the pattern:
    ``densities[-1]`` must be ``N/M`` and the levels before it are unstructured."""

    model: str = "smollm2-135m"
    densities: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2, 0.1])
    cubic_steps: int = 0
    prune: PruneConfig = field(default_factory=PruneConfig)
    # calibration: drawn from the training slice of ``train_source`` (SparseGPT's random offsets)
    calib_samples: int = 8
    calib_seqlen: int = 512
    seed: int = 0
    # fine-tuning
    train_source: str = "wikitext2-valid"
    val_tokens: int = 16384  # held-out tail of the training text, for validation
    train_steps: int = 10  # optimizer steps per epoch
    num_epochs: int = 1  # fine-tuning steps per schedule step = train_steps × num_epochs
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(kd_weight=1.0))
    # evaluation
    eval_source: str = "wikitext2"
    eval_windows: int | None = 8
    eval_seqlen: int = 2048
    device: str | None = None  # where blocks are pruned and the model trains (default: cpu / accelerator)
    # a named text found nowhere (data folder, hub) is replaced by the stdlib text (training on its
    # first 90%, evaluation on the rest when both are replaced), and the run says so
    fallback: bool = False

    def __post_init__(self):
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        if isinstance(self.prune, dict):
            self.prune = prune_config_from_dict(self.prune)
        if not isinstance(self.prune, PruneConfig):
            raise ValueError(f"prune must be a PruneConfig, got {type(self.prune).__name__}")
        self.densities = [check_density(d, "densities") for d in self.densities]
        if not self.densities:
            raise ValueError("densities must list at least one density (fraction kept)")
        if self.cubic_steps:
            self.densities = cubic_schedule(self.densities[-1], self.cubic_steps)
        if any(b >= a for a, b in zip(self.densities, self.densities[1:], strict=False)):
            raise ValueError(f"densities must fall strictly (fraction KEPT), got {self.densities}")
        if self.prune.block_densities is not None or self.prune.prior_masks is not None:
            raise ValueError("prune.block_densities and prune.prior_masks are set by the schedule per "
                             "level (OWL: prune.owl); leave them None")
        if self.prune.bit_allocator is not None:
            raise ValueError("prune.bit_allocator plans widths for one density; give prune.mixed (a bit "
                             "budget) instead: each level builds its own allocator from it")
        if self.prune.nm is not None:
            n, m = self.prune.nm
            if abs(self.densities[-1] - n / m) > 1e-6:
                raise ValueError(
                    f"with prune.nm={n}:{m} the schedule's last level is the N:M pattern: densities[-1] "
                    f"must be {n}/{m} = {n / m:g} (the levels before it unstructured, above it), "
                    f"got densities {self.densities}")
        for key in ("calib_samples", "calib_seqlen", "num_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.train_steps < 0 or self.val_tokens < 0:
            raise ValueError(f"train_steps and val_tokens must be >= 0, "
                             f"got {self.train_steps}, {self.val_tokens}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1 or None, got {self.eval_windows}")

    @property
    def steps_per_level(self) -> int:
        return self.train_steps * self.num_epochs

    def level_prune_config(self, level: int, block_densities=None, prior_masks=None) -> PruneConfig:
        """The :class:`PruneConfig` of schedule level ``level`` (1-based): ``prune`` with that
        level's density, its OWL block densities and the masks so far; N:M only at the last level."""
        density = self.densities[level - 1]
        last = level == len(self.densities)
        # OWL's per-block densities come from the schedule (ratios of the dense model), not from
        # prune_model re-measuring outliers on the pruned model
        return replace(self.prune, density=density, nm=self.prune.nm if last else None, owl=False,
                       block_densities=block_densities, prior_masks=prior_masks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IterativeConfig:
        """The config of a saved run (``config.json``). Runs saved before ``prune`` existed
        (``method``, ``owl``, ``owl_lambda``, ``owl_threshold`` at the top level) are read into
        ``prune``."""
        d = dict(d)
        prune = dict(d.pop("prune", None) or {})
        for old, new in (("method", "method"), ("owl", "owl"), ("owl_lambda", "owl_lambda"),
                         ("owl_threshold", "owl_m")):
            if old in d:
                prune[new] = d.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IterativeConfig fields {unknown}")
        return cls(**d, prune=prune_config_from_dict(prune))


# ----------------------------------------------------------------------------- data

def training_source(source: str, fallback: bool = False) -> TextSource:
    """The training text of ``source``: its ``train`` split (``validation`` for
    ``wikitext2-valid``, which is disjoint from WikiText-2 test), or the file at a path;
    ``fallback`` as in :func:`data.resolve_text`."""
    if source == FALLBACK_SOURCE:
        raise ValueError("train_source 'stdlib' is the stand-in evaluation text; give a file path instead")
    if source in LOCAL_FILES:
        split = "validation" if source == "wikitext2-valid" else "train"
        return resolve_text(source, split, fallback=fallback)
    return resolve_text(source)


def training_text(source: str) -> str:
    """The text of :func:`training_source` (no fallback)."""
    return training_source(source).text


def _disjoint_fallback(train: TextSource, evaluation: TextSource, eval_share: float = 0.1):
    """Both texts fell back to ``stdlib``: train on its first paragraphs, evaluate on the last
    ``eval_share`` of it, so that training never sees the evaluation text."""
    text = train.text
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - eval_share)))
    cut = cut if cut > 0 else int(len(text) * (1 - eval_share))
    return replace(train, text=text[:cut]), replace(evaluation, text=text[cut:].lstrip("\n"))


def check_no_overlap(train: str, evaluation: str, probes: int = 20, width: int = 200) -> None:
    """Raise ValueError when pieces of the evaluation text appear in the training text."""
    evaluation = evaluation.strip()
    if not evaluation:
        return
    step = max(1, (len(evaluation) - width) // probes)
    hits = sum(evaluation[i:i + width] in train for i in range(0, max(1, len(evaluation) - width), step))
    if hits:
        raise ValueError(f"train_source overlaps the evaluation text ({hits} of {probes} probes found "
                         "in it); "
                         "train on a train/validation split, never the test split")


# ----------------------------------------------------------------------------- checkpoints

def _save_step(model: nn.Module, directory: Path, masks: dict, row: dict, tokenizer=None,
               grids: dict | None = None) -> None:
    """Write a finished step atomically (:func:`results.atomic_dir`: a temporary folder swapped
    into place); an existing finished step is never replaced."""
    if directory.exists():
        raise FileExistsError(f"{directory} is a finished step; it is never overwritten")
    with atomic_dir(directory) as tmp:
        _write_checkpoint(model, tmp, masks, tokenizer, row, grids)
        write_json_atomic(tmp / "step.json", row)


def _write_checkpoint(model, folder: Path, masks, tokenizer, row, grids=None) -> None:
    # the model's own dtype: a resumed run continues from exactly these weights
    save_pruned(model, folder / "model", tokenizer=tokenizer, masks=masks, grids=grids, progress=False,
                dtype=next(model.parameters()).dtype,
                metadata={k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))})


@torch.no_grad()
def round_to_grids(model: nn.Module, grids: dict, masks: dict) -> None:
    """Put the kept weights of every quantized layer back on its grid (round to nearest code,
    clamped to the code range) after fine-tuning; pruned weights stay zero. ``grids``/``masks``:
    layer name (as in :func:`models.pruned_linears`) -> :class:`quant.QuantGrid` / bool mask."""
    layers = pruned_linears(model)
    for name, grid in grids.items():
        weight = layers[name].weight
        on_grid = grid.dequantize(grid.codes(weight.detach()))
        weight.copy_((on_grid * masks[name].to(on_grid.device)).to(weight.dtype))


def _load_step(model: nn.Module, folder: Path) -> None:
    """Load a finished step's weights into ``model`` (same architecture), in place."""
    load_masked_model_single(model, folder / "model")


def _finished_steps(run_dir: Path) -> list[dict]:
    rows = []
    for folder in sorted(run_dir.glob("step_*")):
        if folder.is_dir() and (folder / "step.json").is_file():
            rows.append(json.loads((folder / "step.json").read_text()))
    return sorted(rows, key=lambda r: r["step"])


# ----------------------------------------------------------------------------- the run

# one row per schedule step (step 0: the dense model); result-row keys are added after these
HISTORY_COLUMNS = ["step", "density_target", "density", "sparsity", "ppl_pruned", "ppl_finetuned",
                   "val_ppl_pruned", "val_ppl_finetuned", "finetune_steps", "train_tokens",
                   "masks_kept", "empty_rows", "prune_seconds", "finetune_seconds", "seconds"]


def run_iterative(
    config: IterativeConfig,
    run_dir: str | Path,
    model: nn.Module | None = None,
    tokenizer=None,
    train_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    results_csv: str | Path | None = None,
    accelerator=None,
    stop_after: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or resume) the schedule; returns the history (one row per step, step 0 = dense).

    ``model``/``tokenizer``: the dense starting model (default: ``load_model(config.model)``).
    ``train_ids`` [1, n] / ``eval_ids`` [1, m]: token streams that replace the sources
    (tests). ``run_dir`` holds ``config.json``, ``step_XX/`` checkpoints and ``history.csv``;
    ``results_csv`` gets a copy of the history; ``stop_after``: stop after that many
    schedule steps have finished (to test resuming)."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    accelerator = accelerator or Accelerator(mixed_precision=config.finetune.mixed_precision)
    main = accelerator.is_main_process
    device = torch.device(config.device) if config.device else accelerator.device
    _check_run_config(run_dir, config, main)

    # the texts are read (and refused, or replaced by the fallback) before the model loads
    train_src = None if train_ids is not None else training_source(config.train_source, config.fallback)
    eval_src = None if eval_ids is not None else eval_text(config.eval_source, fallback=config.fallback)
    if train_src is not None and eval_src is not None:
        if train_src.used == eval_src.used == FALLBACK_SOURCE:
            train_src, eval_src = _disjoint_fallback(train_src, eval_src)
        check_no_overlap(train_src.text, eval_src.text)
    for src in (train_src, eval_src):
        if src is not None and src.note and main:
            print(src.note)
    if model is None:
        model, tokenizer = load_model(config.model, dtype="float32", progress=progress)
    if train_ids is None:
        train_ids = tokenize_text(tokenizer, train_src.text)
    if eval_ids is None:
        eval_ids = eval_tokens(tokenizer, eval_src, seqlen=config.eval_seqlen)
    train_part, val_part = split_train_validation(train_ids, config.val_tokens)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if _needs_teacher(config) else None
    params = block_params(model)
    model.to(device)

    def ppl(m):
        return perplexity(m, eval_ids, seqlen=config.eval_seqlen, max_windows=config.eval_windows,
                          device=device, progress=False).ppl

    if main and run_dir.is_dir():
        remove_stale_temps(run_dir)  # the half-written step of an interrupted run
    done = _finished_steps(run_dir)
    ratios = None
    if config.prune.owl:  # on the dense model, once: densities then fall monotonically per block
        calib = calibration_windows_from_ids(train_part, config.calib_samples, config.calib_seqlen,
                                             config.seed, "training text")
        ratios = outlier_ratios(model, calib[:config.prune.owl_samples], config.prune.owl_m, device, progress)

    if done:
        _load_step(model, run_dir / f"step_{done[-1]['step']:02d}")
        history = [_dense_row(run_dir)] + done
        if main:
            print(f"resuming after step {done[-1]['step']} (density {done[-1]['density']:.4f})")
    else:
        dense_ppl = ppl(model) if main else float("nan")
        history = [{"step": 0, "density_target": 1.0, "density": 1.0, "sparsity": 0.0,
                    "ppl_pruned": dense_ppl, "ppl_finetuned": dense_ppl, "finetune_steps": 0,
                    "train_tokens": 0, "masks_kept": True, "empty_rows": 0,
                    "prune_seconds": 0.0, "finetune_seconds": 0.0, "seconds": 0.0}]
        if main:
            write_json_atomic(run_dir / "dense.json", history[0])
    masks = current_masks(model) if done else None
    ft_config = FinetuneConfig(**{**asdict(config.finetune), "steps": config.steps_per_level})

    for step, density in enumerate(config.densities, start=1):
        if step <= len(done):
            continue
        if stop_after is not None and step > stop_after:
            break
        t0 = time.perf_counter()
        calib = calibration_windows_from_ids(train_part, config.calib_samples, config.calib_seqlen,
                                             config.seed + step, "training text")
        block_densities = owl_densities(ratios, density, config.prune.owl_lambda, params) if ratios else None
        result = prune_model(model, calib, config.level_prune_config(step, block_densities, masks),
                             device=device, progress=progress)
        masks = result.masks
        t_prune = time.perf_counter() - t0
        ppl_pruned = ppl(model) if main else float("nan")
        # each level draws fresh training windows (a seed per step, like the calibration)
        level_config = FinetuneConfig(**{**asdict(ft_config), "seed": config.finetune.seed + step})
        ft = finetune(model, train_part, level_config, masks=masks, teacher=teacher, val_ids=val_part,
                      accelerator=accelerator, progress=progress)
        grids = result.grids or None
        if grids:  # fine-tuning moved the kept weights off the level's grids: round them back
            round_to_grids(model, grids, masks)
        # a kept weight that is zero now (quantized to 0) counts as pruned from here on, as it
        # does for a resumed run: zeros only grow from level to level
        masks = current_masks(model)
        achieved = overall_density(density_report(model))
        row = {"step": step, "density_target": density, "density": achieved, "sparsity": 1 - achieved,
               "ppl_pruned": ppl_pruned, "ppl_finetuned": ppl(model) if main else float("nan"),
               "val_ppl_pruned": _exp(ft.val_loss_before), "val_ppl_finetuned": _exp(ft.val_loss_after),
               "finetune_steps": ft_config.steps, "train_tokens": ft.tokens,
               "masks_kept": bool(ft.masks_kept),
               # rows of the pruned layers that keep no weight (their outputs are the bias)
               "empty_rows": int(sum(int((~m.any(1)).sum()) for m in masks.values())),
               "prune_seconds": t_prune, "finetune_seconds": ft.seconds, "seconds": time.perf_counter() - t0}
        if not ft.masks_kept:
            raise RuntimeError(f"step {step}: a pruned weight became nonzero during fine-tuning")
        if main:
            _save_step(model, run_dir / f"step_{step:02d}", masks, row, tokenizer, grids)
            print(f"step {step}: density {achieved:.4f} (sparsity {1 - achieved:.4f}), ppl after pruning "
                  f"{ppl_pruned:.2f}, after fine-tuning {row['ppl_finetuned']:.2f}, "
                  f"masks kept: {ft.masks_kept}")
        accelerator.wait_for_everyone()
        history.append(row)

    df = pd.DataFrame(history).reindex(columns=HISTORY_COLUMNS)
    # result-row keys (DESIGN §4), so results/ readers find the run beside one-shot ones
    df["ppl"] = df["ppl_finetuned"]
    df["density_achieved"] = df["density"]
    settings = {"model": config.model, "family": "iterative", **prune_setting_keys(config.prune),
                "calib": train_src.used if train_src else config.train_source,
                "calib_samples": config.calib_samples,
                "seqlen": config.calib_seqlen, "seed": config.seed,
                "eval": eval_src.used if eval_src else config.eval_source,
                "eval_windows": config.eval_windows, "eval_seqlen": config.eval_seqlen,
                "lr": config.finetune.lr, "kd_weight": config.finetune.kd_weight}
    for key, src in (("calib_requested", train_src), ("eval_requested", eval_src)):
        if src is not None and src.fell_back:
            settings[key] = src.requested
    for key, value in settings.items():
        df[key] = value
    if config.prune.nm is not None:  # the pattern belongs to the last level only
        df["nm"] = [settings["nm"] if s == len(config.densities) else None for s in df["step"]]
    if main:
        write_csv_atomic(run_dir / "history.csv", df)
        if results_csv is not None:
            write_csv_atomic(results_csv, df)
    return df


def _exp(x: float) -> float:
    return math.exp(x) if not math.isnan(x) else float("nan")


def _needs_teacher(config: IterativeConfig) -> bool:
    return config.finetune.kd_weight > 0 or config.finetune.squarehead_weight > 0


def _dense_row(run_dir: Path) -> dict:
    path = run_dir / "dense.json"
    return json.loads(path.read_text()) if path.is_file() else {"step": 0, "density": 1.0, "sparsity": 0.0}


def _as_json(obj) -> object:
    return json.loads(json.dumps(obj, default=str))


def _shaping_settings(saved: dict, run_dir: Path) -> dict:
    """The settings of a saved config that shape its finished steps, in today's layout."""
    try:
        config = IterativeConfig.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise ValueError(f"run_dir {run_dir} holds a config.json this version cannot read ({err}): "
                         "use another run_dir") from None
    return _as_json({"model": config.model, "train_source": config.train_source, "seed": config.seed,
                     "prune": asdict(config.prune)})


def _check_run_config(run_dir: Path, config: IterativeConfig, main: bool) -> None:
    """A resumed run must continue the same schedule: the finished steps' densities and the
    settings that shaped them must match (configs saved before ``prune`` existed are read too)."""
    path = run_dir / "config.json"
    now = _as_json(config.to_dict())
    if path.is_file():
        before = json.loads(path.read_text())
        done = len(_finished_steps(run_dir))
        if before.get("densities", [])[:done] != now["densities"][:done]:
            raise ValueError(f"run_dir {run_dir} holds a run with densities {before.get('densities')}; "
                             f"this config has {now['densities']}: use another run_dir")
        old, new = _shaping_settings(before, run_dir), _shaping_settings(now, run_dir)
        for key in old:
            if key == "prune":
                diff = {k: (v, new[key][k]) for k, v in old[key].items() if new[key][k] != v}
                if diff:
                    k, (was, is_) = next(iter(diff.items()))
                    raise ValueError(f"run_dir {run_dir} was run with prune.{k}={was!r}, now {is_!r}: "
                                     "use another run_dir")
            elif old[key] != new[key]:
                raise ValueError(f"run_dir {run_dir} was run with {key}={old[key]!r}, "
                                 f"now {new[key]!r}: use another run_dir")
    elif main:
        write_json_atomic(path, now)
