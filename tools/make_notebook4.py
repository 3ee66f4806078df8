"""Writes notebooks/4_Paper_Results.ipynb (cells kept here so that diffs stay readable)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# 4 · Paper results\n\n"
       "Reads results only, runs no model. Two parts:\n\n"
       "1. **Your results**: the result rows of notebooks 1 and 2 (`results/*.csv` / `*.json`) and "
       "the finished sweep runs in `results/runs/`;\n"
       "2. **The repository's benchmarks**: `results/bench_prune.csv` (one-shot pruning), "
       "`results/bench_iterative.csv` (iterative pruning) and `results/bench_quant.csv` "
       "(quantization), made by the scripts in `bench/` (commands in `bench/README.md`).\n\n"
       "Each table holds one **protocol**: one evaluation (text, windows × tokens per window) and "
       "one calibration (text, windows × tokens, seed). A cell is one measured run: runs that "
       "differ in any setting get rows (or curves) of their own and are never averaged. "
       "Perplexities are comparable only within one evaluation protocol, so each gets its own "
       "panel. **density** = fraction of weights kept; **sparsity** = 1 − density. Figures and "
       "tables are saved under `results/paper/`."),
    code("""# Parameters (papermill injects overrides after this cell).
RESULTS_DIR = None        # None: $SPARSEGPT_RESULTS_DIR, else <project>/results
EVAL = "wikitext2"        # the evaluation text of "your results"; None: every text
SHOW_BENCHMARKS = True    # part 2: the repository's own benchmark results (results/bench_*.csv)
FORMATS = ["png"]         # figure formats: png, svg, pdf"""),
    code("""if isinstance(FORMATS, str):
    FORMATS = [FORMATS]
if not FORMATS or not set(FORMATS) <= {"png", "svg", "pdf"}:
    raise ValueError(f"FORMATS must be a non-empty list drawn from png, svg, pdf; got {FORMATS!r}")
if EVAL is not None and (not isinstance(EVAL, str) or not EVAL):
    raise ValueError(f"EVAL must name an evaluation text such as 'wikitext2', or be None; got {EVAL!r}")

import pandas as pd

from sparsegpt_utils import plots, sweep

pd.set_option("display.precision", 2)
results = sweep.results_dir(RESULTS_DIR)
out = results / "paper"


def show_tables(tables: dict, empty: str) -> None:
    \"\"\"Each protocol's table under its title; ``empty`` when there is none.\"\"\"
    if not tables:
        print(empty)
    for title, table in tables.items():
        print(title)
        display(table)"""),
    md("## 1 · Your results\n\n### What is there"),
    code("""df = sweep.load_results(results)
if EVAL is not None and "eval" in df:
    other = sorted(set(df["eval"].dropna()) - {EVAL})
    if other:
        print(f"showing eval={EVAL!r} only; also present: {other}")
    df = df[df["eval"].isna() | (df["eval"] == EVAL)]
print(f"{len(df)} result rows")
for family in plots.missing_families(df):
    print(f"no results for {family} yet")
if len(df):
    display(df.groupby(["model", "family"]).size().rename("rows").reset_index())"""),
    md("### Perplexity against density, one table per protocol"),
    code("""show_tables(plots.protocol_tables(df), "no unstructured, unquantized results yet: no table")
table = plots.ppl_table(df)
if len(table):
    sweep.write_csv_atomic(out / "ppl_vs_density.csv", table)"""),
    code("""for logy, name in [(False, "ppl_vs_density"), (True, "ppl_vs_density_log")]:
    saved = plots.save_figure(plots.ppl_vs_density(df, logy=logy), out / name, formats=FORMATS)"""),
    md("### Perplexity against bits per weight (quantization)"),
    code("""quantized = plots.quantized_tables(df)
show_tables(quantized, "no quantized results yet")
if quantized:
    sweep.write_csv_atomic(out / "bits_vs_ppl.csv", pd.concat(
        [t.assign(protocol=title) for title, t in quantized.items()], ignore_index=True))
saved = plots.save_figure(plots.bits_vs_ppl(df), out / "bits_vs_ppl", formats=FORMATS)"""),
    md("### Perplexity against size on disk"),
    code("""sized = df[pd.to_numeric(df["size_bytes"], errors="coerce").notna()] if "size_bytes" in df else df.iloc[0:0]
if len(sized):
    cols = [c for c in ["model", "family", "density", "sparsity", "wbits", "size_bytes", "dense_size_bytes", "ppl"]
            if c in sized]
    sweep.write_csv_atomic(out / "size_vs_ppl.csv", sized[cols])
    display(sized[cols].assign(size_mb=sized["size_bytes"] / 1e6, dense_mb=sized["dense_size_bytes"] / 1e6)
            .drop(columns=["size_bytes", "dense_size_bytes"]))
else:
    print("no results with a checkpoint size yet")
saved = plots.save_figure(plots.size_vs_ppl(df), out / "size_vs_ppl", formats=FORMATS)"""),
    md("## 2 · The repository's benchmarks\n\n"
       "Measured on `smollm2-135m` with the commands of `bench/README.md`. The one-shot and "
       "iterative benchmarks share an evaluation (32 windows × 2048 tokens of WikiText-2 test) but "
       "not a calibration (32 × 2048 and 8 × 512 windows): their rows stay apart. The "
       "quantization benchmark is a quicker protocol (16 × 512)."),
    code("""bench = plots.load_bench_results()
if not SHOW_BENCHMARKS:
    bench = bench.iloc[0:0]
if bench.empty:
    print("no benchmark results (results/bench_*.csv): the scripts in bench/ make them")
else:
    display(bench.groupby(["bench", "family"], sort=False).size().rename("rows").reset_index())"""),
    md("### Pruning: perplexity against density, one table per protocol"),
    code("""show_tables(plots.protocol_tables(bench), "no unstructured, unquantized benchmark rows")
structured = bench[bench["nm"].notna()] if "nm" in bench else bench.iloc[0:0]
if len(structured):
    print("N:M rows (not on the density curves):")
    cols = ["model", "method", "nm", "density_achieved", "sparsity_achieved", "calib_samples", "seqlen",
            "eval", "eval_windows", "ppl"]
    display(structured[[c for c in cols if c in structured]].reset_index(drop=True))
saved = plots.save_figure(plots.ppl_vs_density(bench, logy=True), out / "bench_ppl_vs_density",
                          formats=FORMATS)"""),
    md("### Quantization: perplexity against bits per weight"),
    code("""show_tables(plots.quantized_tables(bench), "no quantized benchmark rows")
saved = plots.save_figure(plots.bits_vs_ppl(bench), out / "bench_bits_vs_ppl", formats=FORMATS)"""),
    code("""sweep.write_csv_atomic(out / "all_results.csv", df)
if len(bench):
    sweep.write_csv_atomic(out / "bench_results.csv", bench)
print(f"saved in {results.name}/{out.name}/:",
      ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"}})
nb.cells[1].metadata["tags"] = ["parameters"]
nbf.write(nb, "notebooks/4_Paper_Results.ipynb")
