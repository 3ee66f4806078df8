"""Zero-shot accuracy through lm-evaluation-harness, offline, on the tiny task in tests/data/tasks."""

import json
from pathlib import Path

import pytest
import torch

from sparsegpt_utils.tasks import parse_tasks, task_row, zero_shot

pytest.importorskip("lm_eval", reason="the optional lmeval extra is not installed")

TASKS = Path(__file__).parent / "data" / "tasks"


def _reference_accuracy(model, tok, limit: int | None = None) -> tuple[float, float]:
    """acc and acc_norm by hand: the log-likelihood of ' ' + choice after the prompt, summed over
    the choice's tokens (acc_norm: divided by the choice's length in characters), argmax per question."""
    rows = [json.loads(line) for line in (TASKS / "tiny_mc" / "tiny_mc.jsonl").read_text().splitlines()]
    rows = rows[:limit]
    hits = hits_norm = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        ctx = tok(context).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tok(context + " " + choice).input_ids
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            ll = sum(float(logp[len(whole) - len(cont) - 1 + i, t]) for i, t in enumerate(cont))
            scores.append((ll, ll / len(choice)))
        hits += max(range(len(scores)), key=lambda i: scores[i][0]) == row["answer"]
        hits_norm += max(range(len(scores)), key=lambda i: scores[i][1]) == row["answer"]
    return hits / len(rows), hits_norm / len(rows)


def test_zero_shot_matches_a_hand_computed_loglikelihood_choice(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    scores = zero_shot(model, tok, "tiny_mc", task_paths=[TASKS])
    acc, acc_norm = _reference_accuracy(model, tok)
    assert scores["tiny_mc"]["n"] == 12
    assert scores["tiny_mc"]["acc"] == pytest.approx(acc)
    assert scores["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)
    assert task_row(scores) == {"acc_tiny_mc": scores["tiny_mc"]["acc"],
                                "acc_norm_tiny_mc": scores["tiny_mc"]["acc_norm"]}


def test_zero_shot_evaluates_the_model_as_it_is(tiny_model_dir):
    """A model changed in memory (here: every weight of the pruned layers zeroed) is scored as
    changed, with no save in between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegpt_utils.models import pruned_linears

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for layer in pruned_linears(model).values():
        layer.weight.data.zero_()
    scores = zero_shot(model, tok, ["tiny_mc"], task_paths=[TASKS], limit=6)
    acc, _ = _reference_accuracy(model, tok, limit=6)
    assert scores["tiny_mc"]["n"] == 6
    assert scores["tiny_mc"]["acc"] == pytest.approx(acc)


def test_bad_task_lists_are_refused_before_any_work(tiny_model_dir):
    assert parse_tasks("arc_easy, hellaswag,") == ("arc_easy", "hellaswag")
    assert parse_tasks(None) == ()
    with pytest.raises(ValueError, match="tasks must be comma-separated"):
        parse_tasks("arc_easy;rm -rf")
    with pytest.raises(ValueError, match="unknown task"):
        zero_shot(torch.nn.Linear(2, 2), None, "no_such_task_xyz", task_paths=[TASKS])
    with pytest.raises(ValueError, match="limit"):
        zero_shot(torch.nn.Linear(2, 2), None, "tiny_mc", limit=0)
