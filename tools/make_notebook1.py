"""Writes notebooks/1_SparseGPT.ipynb (cells kept here so that diffs stay readable)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# 1 · SparseGPT in one shot\n\n"
       "Prune a causal LM with SparseGPT (or the magnitude / Wanda baselines), optionally "
       "quantizing the kept weights jointly, then measure WikiText-2 perplexity, the density of "
       "every pruned layer, and the size of the saved checkpoint.\n\n"
       "**density** = fraction of weights kept; **sparsity** = 1 − density. The defaults run "
       "offline on `smollm2-135m` in a few minutes on a CPU; the paper-scale setting is in the "
       "README. Every cell below the parameters only calls `sparsegpt_utils`."),
    code("""# Parameters (papermill injects overrides after this cell).
# DENSITIES: the fraction of weights KEPT (0.1 keeps 10%, i.e. 90% of the weights pruned);
# sparsity = 1 - density. Lists may also be given as strings: papermill -p DENSITIES "[0.5, 0.2]".
model_name = "smollm2-135m"     # hub id, local folder, or "smollm2-135m" (offline built-in)
METHOD = "sparsegpt"            # sparsegpt | wanda | magnitude | admm
COMPARE_WITH = ["wanda", "magnitude"]  # further methods run at each density, same settings ([]: none)
DENSITIES = [0.5, 0.3]          # fraction of weights KEPT, each in (0, 1]
NM = None                       # e.g. "2:4": N:M pattern instead of DENSITIES
calibration_size = 8            # calibration windows (paper: 128)
token_length = 256              # tokens per window, calibration and evaluation (paper: 2048)
calibration_batch_size = 4      # windows per forward pass while calibrating
percdamp = 0.01                 # Hessian damping, fraction of mean(diag H)
blocksize = 128                 # lazy update block B (columns)
mask_blocksize = 128            # mask selection block Bs (columns)
wbits = None                    # e.g. 4: quantize the kept weights jointly (GPTQ)
groupsize = None                # columns per quantization grid (None: one grid per row)
target_avg_bits = None          # e.g. 3.5: mixed precision, real bits per weight (2/3/4/6/8-bit grids)
bit_allocation_method = "budget"  # budget | quantile
mixed_unit = "auto"             # auto | group (a width per grid; needs groupsize) | row
act_order = True                # quantizing: sweep columns in decreasing diag(H) (static groups)
true_sequential = None          # each layer group's Hessian after the groups before it are solved (None: when quantizing)
OWL = False                     # OWL layer-wise densities (same global density)
EXACT_UPDATE = False            # the exact weight update for the chosen mask
RECONSTRUCT = False             # fit each pruned block to the dense block's outputs, masks kept
CALIB_SOURCE = "wikitext2-valid"  # c4 | wikitext2 | wikitext2-valid | ptb | stdlib | a file
EVAL_SOURCE = "wikitext2"       # wikitext2 | ptb | c4 | a file
EVAL_WINDOWS = 8                # None: the whole test set
FALLBACK_TEXT = True            # a source found nowhere (data folder, hub): use the stdlib text, and say so
SEED = 0
DEVICE = "auto"                 # auto | cpu | cuda
SAVE_MODELS = True              # compact checkpoints under PRUNED_DIR
PRUNED_DIR = None               # None: $SPARSEGPT_PRUNED_DIR, else <project>/pruned_models
RESULTS_CSV = None              # None: 1_SparseGPT.csv in $SPARSEGPT_RESULTS_DIR or <project>/results
RESULT_JSON = None              # a sweep sets this: the list of this notebook's result objects
SHOW_PROGRESS = False           # tqdm bars (off by default to keep saved outputs short)
# Older names, still accepted; when set (not None) they replace the name on the right.
SPARSENESS_LIST = None          # = DENSITIES: fraction of weights KEPT (not pruned), despite the name
SPARSITIES = None               # = DENSITIES: fraction of weights KEPT (not pruned), despite the name
EPSILON = None                  # = percdamp
B = None                        # = blocksize
Bs = None                       # = mask_blocksize
model_size = "125m"             # used only when model_name is None: facebook/opt-{model_size}"""),
    code("""import warnings

import pandas as pd
from sparsegpt_utils.notebook import experiments_from_parameters, run_sparsity_list
from sparsegpt_utils.paths import pruned_dir, results_dir
from sparsegpt_utils.solver import EmptyRowsWarning

warnings.simplefilter("ignore", EmptyRowsWarning)  # counted in the layer table's empty_rows column

pd.set_option("display.precision", 2)
runs = experiments_from_parameters(globals())  # every parameter is checked here, before the model loads
model_name, METHOD = runs[0].model, runs[0].prune.method
methods = list(dict.fromkeys(r.prune.method for r in runs))
print(f"{len(runs)} run(s) on {model_name}: {', '.join(methods)} at each setting")"""),
    md("## Prune, evaluate and save each setting\n\nThe dense model is evaluated once on the "
       "same windows; each run starts from a fresh copy of it."),
    code("""table, layer_reports = run_sparsity_list(
    runs, pruned_dir=pruned_dir(PRUNED_DIR) if SAVE_MODELS else None,
    results_csv=RESULTS_CSV or results_dir() / "1_SparseGPT.csv", result_json=RESULT_JSON)
table[["method", "density", "sparsity", "nm", "wbits", "calib", "eval", "density_achieved",
       "sparsity_achieved", "ppl_dense", "ppl", "avg_bits", "size_mb", "dense_size_mb"]]"""),
    md("## Methods compared at each setting\n\nPerplexity of every method at every density (or "
       "N:M pattern), all on the same calibration and evaluation windows."),
    code("""setting = table["nm"].fillna(table["density"].map("density {:g}".format)) if "nm" in table else \\
    table["density"].map("density {:g}".format)
compared = table.assign(setting=setting).pivot_table(index="setting", columns="method", values="ppl",
                                                     sort=False)[methods]
compared.insert(0, "dense", table["ppl_dense"].iloc[0])
compared"""),
    md("## Density of every pruned layer (the last run of `METHOD`)"),
    code("""last = [r for r, run in zip(layer_reports, runs) if run.prune.method == METHOD][-1]
print(f"density kept {last['kept'].sum() / last['params'].sum():.4f}, "
      f"sparsity {1 - last['kept'].sum() / last['params'].sum():.4f} over {len(last)} layers; "
      f"rows left with no weight: {last['empty_rows'].sum()} in {(last['empty_rows'] > 0).sum()} layers")
last.assign(layer=last["layer"].str.replace("model.", "", regex=False))[
    ["layer", "rows", "columns", "density", "sparsity", "empty_rows"]].head(14)"""),
    md("## Per-block density, the solver's loss per layer, perplexity per method\n\n"
       "The loss is what the solver minimises for each layer, ‖(W − Ŵ)X‖² over the calibration "
       "tokens (Wanda and magnitude have none)."),
    code("""import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for report, run in zip(layer_reports, runs):
    if run.prune.method != METHOD:
        continue
    label = f"{run.prune.nm[0]}:{run.prune.nm[1]}" if run.prune.nm else f"density {run.density:g}"
    report.groupby("block")["density"].mean().plot(ax=axes[0], marker="o", label=label)
    if report["loss"].notna().any():
        axes[1].plot(range(len(report)), report["loss"].clip(lower=1e-12), lw=0.8, label=label)
axes[0].set(xlabel="decoder block", ylabel="density (kept fraction)", title=f"{METHOD}: per-block density")
axes[0].legend()
axes[1].set(xlabel="pruned layer (model order)", ylabel="solver loss", yscale="log",
            title=f"{METHOD}: loss per layer")
if axes[1].lines:
    axes[1].legend()
for method, part in table.groupby("method", sort=False):
    axes[2].plot(part["density_achieved"], part["ppl"], marker="o", label=method)
axes[2].axhline(table["ppl_dense"].iloc[0], color="gray", ls="--", label="dense")
axes[2].set(xlabel="density (kept fraction)", ylabel=f"perplexity ({table['eval'].iloc[0]})",
            yscale="log", title=model_name)
axes[2].legend()
fig.tight_layout()"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"}})
nb.cells[1].metadata["tags"] = ["parameters"]
# rounding-dependent output (see notebooks/nbval_sanitize.cfg): nbval runs it, does not compare it
for cell in nb.cells:
    if cell.source.startswith('last = [r for r'):
        cell.metadata["tags"] = ["nbval-ignore-output"]
nbf.write(nb, "notebooks/1_SparseGPT.ipynb")
