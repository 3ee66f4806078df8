"""Zero-shot task accuracy through lm-evaluation-harness (the optional ``lmeval`` extra).

The harness scores each multiple-choice answer by the model's log-likelihood of it and
reports ``acc`` (and ``acc_norm``, length-normalised) per task. A model in memory is
evaluated as it is — a pruned model needs no saving first. Result rows get one key per
task and metric: ``acc_<task>`` and ``acc_norm_<task>`` (fractions in [0, 1]).

This is not the package's perplexity protocol: the harness's own ``wikitext`` task measures
word perplexity over whole documents with rolling windows, a different number from
:func:`sparsegpt_utils.evaluate.perplexity` (DESIGN §3). Use ``--eval`` for perplexity.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["TasksUnavailableError", "parse_tasks", "zero_shot", "task_row"]

METRICS = ("acc", "acc_norm")


class TasksUnavailableError(ImportError):
    """lm-evaluation-harness is not installed."""


def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"arc_easy,hellaswag"`` or a list → a tuple of task names (empty for None / "")."""
    if tasks is None:
        return ()
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = tuple(t.strip() for t in items if t and t.strip())
    for name in names:
        if not all(c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"tasks must be comma-separated task names, got {name!r}")
    return names


def _require_harness():
    if importlib.util.find_spec("lm_eval") is None:
        raise TasksUnavailableError(
            "zero-shot tasks need lm-evaluation-harness: pip install 'sparsegpt-utils[lmeval]' "
            "(or pip install lm-eval)")
    import lm_eval

    return lm_eval


@torch.no_grad()
def zero_shot(model: nn.Module, tokenizer, tasks: str | Sequence[str], limit: int | None = None,
              batch_size: int = 1, task_paths: Sequence[str | Path] = (), device=None,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of ``model`` on each task: ``{task: {"acc": a, "acc_norm": b, "n": docs}}``.

    tasks: lm-evaluation-harness task names (``arc_easy``, ``hellaswag``, ...); the harness
    fetches their data sets from the hub, so offline only tasks whose data is local work
    (``task_paths``: folders of task YAML files, searched first).
    limit: evaluate only the first ``limit`` documents of each task (a quick run).
    """
    names = parse_tasks(tasks)
    if not names:
        raise ValueError("tasks must name at least one task, e.g. arc_easy,hellaswag")
    if limit is not None and limit < 1:
        raise ValueError(f"task limit must be >= 1 documents, got {limit}")
    lm_eval = _require_harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    manager = TaskManager(include_path=[str(p) for p in task_paths] or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: see `lm_eval --tasks list` for the names")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=0, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    scores = {}
    for name in names:
        raw = out["results"].get(name, {})
        entry = {m: float(raw[f"{m},none"]) for m in METRICS if f"{m},none" in raw}
        entry["n"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        scores[name] = entry
    return scores


def task_row(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Result-row keys from :func:`zero_shot`'s scores: ``acc_<task>``, ``acc_norm_<task>``."""
    row = {}
    for task, entry in scores.items():
        for metric in METRICS:
            if metric in entry:
                row[f"{metric}_{task}"] = entry[metric]
    return row
