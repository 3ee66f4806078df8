"""Writes notebooks/3_Testing.ipynb (cells kept here so that diffs stay readable)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# 3 · Testing the saved models\n\n"
       "Loads every model that notebook 1 saved under `pruned_models/<model>_<method>_d<density>/` "
       "for the densities in `DENSITIES` (the fraction of weights **kept**; sparsity = 1 − density), "
       "measures its perplexity, checks that every pruned layer has the density it was asked for, "
       "and shows what the dense and the pruned models write for a few prompts. Density 1 without "
       "a saved folder is the dense model itself. Missing models are listed, not fatal.\n\n"
       "By default (`EVAL_AS_SAVED = True`) each model is measured as its own run measured it: on "
       "the text, windows and tokens per window recorded in its checkpoint, so the perplexities "
       "here are the ones notebook 1 printed. `EVAL_DATASETS` adds further texts (PTB, C4) on the "
       "same windows where they can be read. `EVAL_WINDOWS` and `token_length` (notebook 1's "
       "defaults) count only where a checkpoint records nothing, or for every model with "
       "`EVAL_AS_SAVED = False`. Writes one tidy table and a figure to `results/testing/`."),
    code("""# Parameters (papermill injects overrides after this cell).
model_name = "smollm2-135m"  # the model notebook 1 pruned: a hub id, a folder, or smollm2-135m
METHOD = "sparsegpt"  # sparsegpt | wanda | magnitude: which saved models to test
DENSITIES = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1]  # fraction of weights KEPT (1 = the dense model)
SPARSITIES = None  # older name of DENSITIES (its values are densities too); used when set
EVAL_AS_SAVED = True  # measure each model on the windows its own run used (recorded in the checkpoint)
EVAL_DATASETS = ["wikitext2", "ptb", "c4"]  # further texts; unreadable ones (offline, no file) are skipped
EVAL_WINDOWS = 8  # windows per text where a checkpoint records none (notebook 1's default); None = all
token_length = 256  # tokens per window, likewise (notebook 1's default); None = the model's maximum
TOLERANCE = 0.01  # a pruned layer's density may differ from the target by this much
PROMPTS = ["The capital of France is", "In 1905, Albert Einstein", "def fibonacci(n):"]
MAX_NEW_TOKENS = 24  # greedy continuation of each prompt, per model
TASKS = []  # zero-shot tasks (lm-evaluation-harness), e.g. ["arc_easy", "hellaswag"]; [] = none
TASKS_LIMIT = None  # the first N documents of each task (a quick look); None = all
TASKS_PATH = []  # folders of your own task YAML files, searched first
SHOW_PROGRESS = False  # progress bars (off: keeps saved outputs short)
PRUNED_DIR = None  # None: $SPARSEGPT_PRUNED_DIR, else <project>/pruned_models
RESULTS_DIR = None  # None: $SPARSEGPT_RESULTS_DIR, else <project>/results
RESULT_JSON = None  # set by `python -m sparsegpt_utils sweep`: where the result rows go"""),
    code("""from sparsegpt_utils.notebook import parse_list_parameter

# check the parameters before any long work
densities = [float(d) for d in parse_list_parameter("DENSITIES", SPARSITIES if SPARSITIES is not None
                                                    else DENSITIES)]
bad = [d for d in densities if not 0 < d <= 1]
if not densities or bad:
    raise ValueError(f"DENSITIES are densities (fraction kept), each in (0, 1]; got {densities!r}")
if METHOD not in ("sparsegpt", "wanda", "magnitude"):
    raise ValueError(f"METHOD must be one of sparsegpt, wanda, magnitude; got {METHOD!r}")
if EVAL_WINDOWS is not None and (not isinstance(EVAL_WINDOWS, int) or EVAL_WINDOWS < 1):
    raise ValueError(f"EVAL_WINDOWS must be a positive integer or None, got {EVAL_WINDOWS!r}")
if token_length is not None and (not isinstance(token_length, int) or token_length < 2):
    raise ValueError(f"token_length must be an integer >= 2 or None, got {token_length!r}")
if not 0 <= TOLERANCE < 1:
    raise ValueError(f"TOLERANCE must be in [0, 1), got {TOLERANCE!r}")


def text_list(name, value):  # one name, or a list (papermill may hand it over as a string)
    return [value] if isinstance(value, str) and not value.lstrip().startswith("[") else \
        parse_list_parameter(name, value)


EVAL_DATASETS = text_list("EVAL_DATASETS", EVAL_DATASETS)
PROMPTS = text_list("PROMPTS", PROMPTS)
TASKS, TASKS_PATH = text_list("TASKS", TASKS), text_list("TASKS_PATH", TASKS_PATH)
if TASKS_LIMIT is not None and (not isinstance(TASKS_LIMIT, int) or TASKS_LIMIT < 1):
    raise ValueError(f"TASKS_LIMIT must be a positive integer or None, got {TASKS_LIMIT!r}")
if not isinstance(MAX_NEW_TOKENS, int) or MAX_NEW_TOKENS < 1:
    raise ValueError(f"MAX_NEW_TOKENS must be a positive integer, got {MAX_NEW_TOKENS!r}")"""),
    code("""import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # plain-text progress bars are fine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pandas as pd
import torch
from transformers.utils import logging as transformers_logging

from sparsegpt_utils import evaluate, plots, results
from sparsegpt_utils.generation import generate_side_by_side
from sparsegpt_utils.models import load_model
from sparsegpt_utils.paths import pruned_dir, results_dir

if not SHOW_PROGRESS:
    transformers_logging.disable_progress_bar()  # no weight-loading progress bars in the outputs
torch.manual_seed(0)
pd.set_option("display.precision", 2)
pruned_root, results_root = pruned_dir(PRUNED_DIR), results_dir(RESULTS_DIR)"""),
    md("## Load and evaluate every saved model"),
    code("""evaluation = evaluate.evaluate_as_saved if EVAL_AS_SAVED else evaluate.evaluate_checkpoints
table, layers, notes = evaluation(
    model_name, METHOD, densities, root=pruned_root, sources=EVAL_DATASETS, eval_windows=EVAL_WINDOWS,
    seqlen=token_length, tolerance=TOLERANCE, progress=SHOW_PROGRESS)
for note in notes:
    print(note.replace(str(pruned_root), pruned_root.name))  # folder names, not machine paths
print(f"evaluated {table['density'].nunique() if len(table) else 0} of {len(densities)} densities")"""),
    code("""shown = ["density", "sparsity", "checkpoint", "eval", "eval_windows", "eval_seqlen", "ppl",
         "density_achieved", "layer_density_min", "layer_density_max", "layers_off"]
table[[c for c in shown if c in table]].round({"density_achieved": 4, "layer_density_min": 4,
                                               "layer_density_max": 4}) if len(table) else "no models to test\""""),
    md("## Per-layer density\n\n"
       "Every pruned layer (the linear layers of the decoder blocks) should be within `TOLERANCE` "
       "of its target."),
    code("""if len(layers):
    layers["off_by"] = (layers["density"] - layers["target_density"]).abs()
    for target, part in layers.groupby("target_density"):
        off = part[part["off_by"] > TOLERANCE]
        verdict = "all within" if off.empty else f"{len(off)} outside"
        print(f"density {target:g} (sparsity {1 - target:g}): {len(part)} layers, {verdict} ±{TOLERANCE:g} "
              f"(min {part['density'].min():.4f}, max {part['density'].max():.4f})")
        for name in off["layer"].head(10):
            print(f"   off target: {name}")"""),
    md("## What the models write\n\n"
       "Greedy continuations (no sampling) of each prompt by the dense model and each saved model."),
    code("""saved = evaluate.find_checkpoints(pruned_root, model_name, METHOD, [d for d in densities if d < 1])
models = {1.0: load_model(model_name, progress=SHOW_PROGRESS)}
for density, path in saved.items():
    if path is not None:
        models[density] = evaluate.load_checkpoint(path)
tokenizer = models[1.0][1]
names = {d: "dense" if d == 1.0 else f"density {d:g}" for d in models}
generations = generate_side_by_side({names[d]: net for d, (net, _) in models.items()}, tokenizer, PROMPTS,
                                    max_new_tokens=MAX_NEW_TOKENS)
with pd.option_context("display.max_colwidth", None):
    display(generations)"""),
    md("## Zero-shot accuracy\n\n"
       "With `TASKS` set, every model is scored by lm-evaluation-harness (its tasks fetch their "
       "data from the hub; `TASKS_PATH` adds local task folders) and the accuracies join the "
       "table above as `acc_<task>` / `acc_norm_<task>` columns. Its `wikitext` task measures a "
       "different perplexity (rolling windows, per word) from the one above."),
    code("""if TASKS:
    from sparsegpt_utils.tasks import task_row, zero_shot

    accuracy = pd.DataFrame([{"density": d, **task_row(zero_shot(net, tokenizer, TASKS, limit=TASKS_LIMIT,
                                                                 task_paths=TASKS_PATH))}
                             for d, (net, _) in models.items()])
    table = table.merge(accuracy, on="density", how="left") if len(table) else accuracy
    display(accuracy.assign(sparsity=1 - accuracy["density"]))
else:
    print("TASKS is empty: no zero-shot accuracy (e.g. TASKS = ['arc_easy', 'hellaswag'])")
del models"""),
    md("## Save the table and the figure"),
    code("""stem = results_root / "testing" / f"testing_{results.model_slug(model_name)}_{METHOD}"
results.write_csv_atomic(stem.with_suffix(".csv"), table)
if len(layers):
    results.write_csv_atomic(stem.with_name(stem.name + "_layers.csv"), layers)
results.write_csv_atomic(stem.with_name(stem.name + "_generations.csv"), generations)
saved_figures = plots.save_figure(plots.testing_figure(table), stem, formats=("png", "svg"))
print("saved", ", ".join(p.name for p in [stem.with_suffix(".csv"), *saved_figures]),
      f"in {results_root.name}/testing/")"""),
    code("""if RESULT_JSON:  # hand the rows to a sweep
    results.write_json_atomic(RESULT_JSON, table.to_dict(orient="records"))"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"}})
nb.cells[1].metadata["tags"] = ["parameters"]
# rounding-dependent output (see notebooks/nbval_sanitize.cfg): nbval runs it, does not compare it
for cell in nb.cells:
    if cell.source.startswith('saved = evaluate.find_checkpoints'):
        cell.metadata["tags"] = ["nbval-ignore-output"]
nbf.write(nb, "notebooks/3_Testing.ipynb")
