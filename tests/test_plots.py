"""Figures and tables of notebook 4 / notebook 3: the right points on the right curves, and
clear notes instead of errors when results are absent."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sparsegpt_utils import plots  # noqa: E402
from sparsegpt_utils.sweep import add_family  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _results():
    rows = []
    for method, base in [("magnitude", 100.0), ("sparsegpt", 30.0)]:
        for d in (0.3, 0.5, 0.7):
            rows.append({"model": "m", "method": method, "density": d, "ppl": base / d, "eval": "wikitext2"})
    rows += [
        {"model": "m", "method": "sparsegpt", "density": 1.0, "ppl": 20.0, "eval": "wikitext2"},
        {"model": "m", "method": "sparsegpt", "density": 0.5, "ppl": 200.0, "eval": "wikitext2",
         "nm": "2:4"},  # N:M: not on the unstructured curve
        {"model": "m", "method": "sparsegpt", "density": 0.5, "ppl": 70.0, "eval": "wikitext2",
         "wbits": 4, "avg_bits": 2.5, "size_bytes": 3e6, "dense_size_bytes": 9e6},
        {"model": "m", "method": "magnitude", "density": 0.5, "ppl": 300.0, "eval": "wikitext2",
         "wbits": 3, "size_bytes": 2e6, "dense_size_bytes": 9e6},
    ]
    return add_family(pd.DataFrame(rows).assign(eval_windows=8, eval_seqlen=256))


def _lines(ax):
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_ppl_vs_density_draws_one_curve_per_family_ending_at_the_dense_model():
    fig = plots.ppl_vs_density(_results())
    lines = _lines(fig.axes[0])
    assert set(lines) == {"magnitude", "sparsegpt", "dense"}
    assert lines["sparsegpt"] == ([0.3, 0.5, 0.7, 1.0],
                                  [pytest.approx(100.0), 60.0, pytest.approx(30 / 0.7), 20.0])
    assert lines["magnitude"][0] == [0.3, 0.5, 0.7, 1.0] and lines["magnitude"][1][-1] == 20.0
    assert fig.axes[0].get_yscale() == "linear"
    assert plots.ppl_vs_density(_results(), logy=True).axes[0].get_yscale() == "log"


def test_ppl_vs_density_one_panel_per_model_and_a_note_when_empty():
    df = _results()
    two = pd.concat([df, df.assign(model="n", ppl=df["ppl"] * 2)], ignore_index=True)
    fig = plots.ppl_vs_density(two)
    assert [ax.get_title() for ax in fig.axes] == ["m · wikitext2, 8 × 256", "n · wikitext2, 8 × 256"]
    assert _lines(fig.axes[1])["sparsegpt"][1][-1] == 40.0
    empty = plots.ppl_vs_density(add_family(pd.DataFrame(columns=["model", "method", "density", "ppl"])))
    assert "no pruned results" in empty.axes[0].texts[0].get_text()


def test_missing_families_and_table():
    df = _results()
    assert plots.missing_families(df) == ["wanda", "sparsegpt+finetune", "iterative"]
    assert plots.missing_families(df.iloc[0:0]) == list(plots.FAMILIES)
    table = plots.ppl_table(df)
    assert list(table.columns) == ["model", "eval_protocol", "calib_protocol", "density", "sparsity",
                                   "magnitude", "sparsegpt"]
    assert list(table["density"]) == [1.0, 0.7, 0.5, 0.3]  # dense first, as in the paper
    assert list(table["sparsity"]) == [0.0, 0.3, 0.5, 0.7]
    assert table.set_index("density").loc[0.5, "sparsegpt"] == 60.0  # not the N:M or quantized row
    assert np.isnan(table.set_index("density").loc[1.0, "magnitude"])
    assert plots.ppl_table(df.iloc[0:0]).empty


def test_bits_and_size_figures_use_quantized_and_sized_rows():
    df = _results()
    ax = plots.bits_vs_ppl(df).axes[0]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert points == {"magnitude": [[3.0, 300.0]], "sparsegpt": [[2.5, 70.0]]}  # avg_bits, else wbits
    ax = plots.size_vs_ppl(df).axes[0]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert points == {"magnitude": [[2.0, 300.0]], "sparsegpt": [[3.0, 70.0]]}  # MB
    assert [ln.get_xdata()[0] for ln in ax.get_lines()] == [9.0]
    unquantized = df[df["wbits"].isna()].drop(columns=["wbits", "avg_bits", "size_bytes"])
    assert "no quantized results" in plots.bits_vs_ppl(unquantized).axes[0].texts[0].get_text()
    assert "no results with a saved" in plots.size_vs_ppl(unquantized).axes[0].texts[0].get_text()


def test_testing_figure_plots_each_source_and_the_density_check():
    df = pd.DataFrame({"density": [0.5, 0.5, 0.7], "eval": ["wikitext2", "ptb", "wikitext2"],
                       "eval_windows": 8, "eval_seqlen": 256,
                       "ppl": [40.0, 60.0, 30.0], "density_achieved": [0.5, 0.5, 0.7],
                       "layer_density_min": [0.49, 0.49, 0.69], "layer_density_max": [0.51, 0.51, 0.71]})
    fig = plots.testing_figure(df)
    assert _lines(fig.axes[0]) == {"ptb, 8 × 256": ([0.5], [60.0]),
                                   "wikitext2, 8 × 256": ([0.5, 0.7], [40.0, 30.0])}
    assert "no checkpoints" in plots.testing_figure(pd.DataFrame()).axes[0].texts[0].get_text()


def test_testing_figure_keeps_calibrations_apart_and_ends_at_the_dense_model():
    common = {"eval": "wikitext2", "eval_windows": 8, "eval_seqlen": 256, "calib": "c4", "seed": 0,
              "density_achieved": 0.5, "layer_density_min": 0.5, "layer_density_max": 0.5}
    df = pd.DataFrame([
        {**common, "density": 0.5, "ppl": 80.0, "calib_samples": 8, "seqlen": 256, "checkpoint": "a"},
        {**common, "density": 0.3, "ppl": 300.0, "calib_samples": 8, "seqlen": 256, "checkpoint": "b"},
        {**common, "density": 0.2, "ppl": 900.0, "calib_samples": 128, "seqlen": 2048, "checkpoint": "c"},
        {**common, "density": 1.0, "ppl": 38.0, "calib": None, "calib_samples": None, "seqlen": None,
         "seed": None, "checkpoint": "(dense model)"},
    ])
    lines = _lines(plots.testing_figure(df).axes[0])
    assert lines == {"wikitext2, 8 × 256 · calib c4, 8 × 256, seed 0": ([0.3, 0.5, 1.0], [300.0, 80.0, 38.0]),
                     "wikitext2, 8 × 256 · calib c4, 128 × 2048, seed 0": ([0.2, 1.0], [900.0, 38.0])}
    only_dense = _lines(plots.testing_figure(df.iloc[[3]]).axes[0])
    assert only_dense == {"wikitext2, 8 × 256": ([1.0], [38.0])}


def test_save_figure_writes_each_format_atomically_and_reproducibly(tmp_path):
    fig = plots.ppl_vs_density(_results())
    paths = plots.save_figure(fig, tmp_path / "sub" / "fig", formats=("png", "svg"))
    assert [p.name for p in paths] == ["fig.png", "fig.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in paths[1].read_bytes()[:500]
    first = paths[0].read_bytes()
    plots.save_figure(fig, tmp_path / "sub" / "fig")
    assert paths[0].read_bytes() == first  # no timestamps: an unchanged figure is an unchanged file
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.png", "fig.svg"]
    with pytest.raises(ValueError, match="png, svg, pdf"):
        plots.save_figure(fig, tmp_path / "x", formats=("jpg",))


def test_dense_perplexity_recorded_beside_pruned_runs_ends_curves_and_fills_the_table():
    df = _results()
    df = df[df["density"] < 1].assign(ppl_dense=20.0)
    lines = _lines(plots.ppl_vs_density(df).axes[0])
    assert lines["sparsegpt"][0][-1] == 1.0 and lines["sparsegpt"][1][-1] == 20.0
    table = plots.ppl_table(df).set_index("density")
    assert list(table.columns[:5]) == ["model", "eval_protocol", "calib_protocol", "sparsity", "dense"]
    assert table.loc[1.0, "dense"] == 20.0 and np.isnan(table.loc[1.0, "sparsegpt"])
    assert table.loc[0.5, "sparsegpt"] == 60.0


def test_eval_protocol_labels_windows_and_window_length():
    df = pd.DataFrame({"eval": ["wikitext2", "wikitext2", "ptb", None],
                       "eval_windows": [8, None, 2, 4], "eval_seqlen": [256, 2048, None, 128],
                       "seqlen": [128, 128, 512, 128]})
    assert list(plots.eval_protocol(df)) == ["wikitext2, 8 × 256", "wikitext2, all × 2048",
                                            "ptb, 2 × 512", "?, 4 × 128"]  # seqlen when no eval_seqlen


def test_rows_measured_on_different_windows_are_never_compared():
    # the same model and family measured twice: 8 × 256 windows and 2 × 512 windows
    a = _results()
    b = a.assign(eval_windows=2, eval_seqlen=512, ppl=a["ppl"] / 2)
    df = pd.concat([a, b], ignore_index=True)
    table = plots.ppl_table(df)
    assert set(table["eval_protocol"]) == {"wikitext2, 8 × 256", "wikitext2, 2 × 512"}
    cell = table.set_index(["eval_protocol", "density"])["sparsegpt"]
    assert cell[("wikitext2, 8 × 256", 0.5)] == 60.0 and cell[("wikitext2, 2 × 512", 0.5)] == 30.0
    assert cell[("wikitext2, 2 × 512", 1.0)] == 10.0  # each protocol keeps its own dense row
    fig = plots.ppl_vs_density(df)
    assert [ax.get_title() for ax in fig.axes] == ["m · wikitext2, 2 × 512", "m · wikitext2, 8 × 256"]
    assert _lines(fig.axes[0])["sparsegpt"][1] == [pytest.approx(50.0), 30.0, pytest.approx(15 / 0.7), 10.0]
    assert _lines(fig.axes[1])["sparsegpt"][1][-1] == 20.0


# ------------------------------------------------ rows of different settings are never merged

def _two_calibrations():
    """The benchmark case: SparseGPT at density 0.1 measured on the same 32 × 2048 windows after
    two calibrations (32 × 2048 and 8 × 512 windows): 7,188.78 and 3,980.82."""
    common = {"model": "smollm2-135m", "calib": "wikitext2-valid", "seed": 0, "eval": "wikitext2",
              "eval_windows": 32, "eval_seqlen": 2048}
    big, small = {"calib_samples": 32, "seqlen": 2048}, {"calib_samples": 8, "seqlen": 512}
    rows = [
        {**common, **big, "method": "dense", "density": 1.0, "ppl": 21.9},
        {**common, **big, "method": "sparsegpt", "density": 0.1, "ppl": 7188.78},
        {**common, **big, "method": "sparsegpt", "density": 0.5, "ppl": 41.46},
        {**common, **big, "method": "wanda", "density": 0.5, "ppl": 49.46},
        {**common, **small, "method": "sparsegpt", "density": 0.1, "ppl": 3980.82},
        {**common, **small, "method": "sparsegpt", "density": 0.2, "ppl": 893.68},
    ]
    return add_family(pd.DataFrame(rows))


def test_table_never_takes_the_median_of_rows_that_differ_in_calibration():
    table = plots.ppl_table(_two_calibrations())
    at = table[table["density"] == 0.1].set_index("calib_protocol")["sparsegpt"]
    assert dict(at) == {"wikitext2-valid, 32 × 2048, seed 0": 7188.78,
                        "wikitext2-valid, 8 × 512, seed 0": 3980.82}
    values = table.drop(columns=["density", "sparsity"]).select_dtypes("number").stack().dropna()
    assert not np.isclose(values, (7188.78 + 3980.82) / 2).any()  # the median nobody measured
    assert sorted(values) == sorted([21.9, 7188.78, 41.46, 49.46, 3980.82, 893.68])  # each row once
    tables = plots.protocol_tables(_two_calibrations())
    assert list(tables) == [
        "smollm2-135m · eval wikitext2, 32 × 2048 · calib wikitext2-valid, 32 × 2048, seed 0",
        "smollm2-135m · eval wikitext2, 32 × 2048 · calib wikitext2-valid, 8 × 512, seed 0"]
    first, second = tables.values()
    assert list(first.columns) == ["density", "sparsity", "dense", "wanda", "sparsegpt"]
    assert list(first["sparsegpt"].dropna()) == [41.46, 7188.78]
    assert list(second.columns) == ["density", "sparsity", "sparsegpt"]  # its own rows only
    assert list(second["sparsegpt"]) == [893.68, 3980.82]


def test_curves_never_join_rows_of_different_calibration():
    fig = plots.ppl_vs_density(_two_calibrations())
    assert len(fig.axes) == 1  # one evaluation protocol: one panel, where they are comparable
    lines = _lines(fig.axes[0])
    assert lines["sparsegpt · calib wikitext2-valid, 32 × 2048, seed 0"] == ([0.1, 0.5, 1.0],
                                                                              [7188.78, 41.46, 21.9])
    assert lines["sparsegpt · calib wikitext2-valid, 8 × 512, seed 0"] == ([0.1, 0.2, 1.0],
                                                                            [3980.82, 893.68, 21.9])
    assert "wanda · calib wikitext2-valid, 32 × 2048, seed 0" in lines


def test_any_other_differing_setting_gets_its_own_row_and_curve_and_duplicates_show_once():
    df = _results()
    other = df[(df["method"] == "sparsegpt") & df["wbits"].isna() & df["nm"].isna() & (df["density"] < 1)]
    df = pd.concat([df.assign(percdamp=0.01), other.assign(percdamp=0.1, ppl=other["ppl"] + 1),
                    df.iloc[[0]].assign(percdamp=0.01, ppl=999.0)],  # the same run recorded again
                   ignore_index=True)
    table = plots.ppl_table(df)
    assert "percdamp" in table.columns
    cells = table.set_index(["percdamp", "density"])["sparsegpt"]
    assert cells[("0.01", 0.5)] == 60.0 and cells[("0.1", 0.5)] == 61.0
    assert table.set_index(["percdamp", "density"])["magnitude"][("0.01", 0.3)] == 999.0  # the later record
    labels = set(_lines(plots.ppl_vs_density(df).axes[0]))
    assert labels == {"sparsegpt · percdamp=0.01", "sparsegpt · percdamp=0.1", "magnitude", "dense"}


def test_dense_perplexities_that_disagree_are_not_averaged():
    df = _results()
    df = df[df["density"] < 1]
    df = df.assign(ppl_dense=np.where(df["method"] == "sparsegpt", 20.0, 22.0))
    table = plots.ppl_table(df).set_index("density")
    assert 1.0 not in table.index or "dense" not in table  # 20 and 22 in one row: neither, no median
    lines = _lines(plots.ppl_vs_density(df).axes[0])
    assert lines["sparsegpt"][1][-1] == 20.0 and lines["magnitude"][1][-1] == 22.0  # each its own


def test_load_bench_results_reads_the_repositorys_benchmarks_by_protocol():
    df = plots.load_bench_results()
    assert set(df["bench"]) == {"one-shot pruning", "iterative pruning", "quantization"}
    known = df["density"].notna()  # an N:M row has none
    assert (df.loc[known, "sparsity"] == (1 - df.loc[known, "density"]).round(6)).all()
    quant = df[df["bench"] == "quantization"]
    assert set(quant["allocation"].dropna()) == {"budget", "quantile"}  # the CSV's `method`
    assert set(quant["method"]) == {"dense", "rtn", "sparsegpt"}
    gptq4 = quant[(quant["key"] == "d1.0-gptq4")].iloc[0]
    assert gptq4["wbits"] == 4 and pd.isna(gptq4["target_avg_bits"]) and gptq4["family"] == "GPTQ"
    tables = plots.protocol_tables(df)
    assert len(tables) >= 3  # 32 × 2048 after two calibrations, and the quantization protocol
    at01 = {title: t.set_index("density").loc[0.1, "sparsegpt"] for title, t in tables.items()
            if "sparsegpt" in t and 0.1 in set(t["density"])}
    assert sorted(round(v, 2) for v in at01.values()) == [3980.82, 7188.78]
    # the unquantized quantization-benchmark rows form their own protocol (16 × 512 windows)
    quant_table = next(t for title, t in tables.items() if "eval wikitext2, 16 × 512" in title)
    assert list(quant_table["density"]) == [1.0, 0.5]


def test_load_bench_results_with_no_or_some_files(tmp_path):
    empty = plots.load_bench_results(tmp_path)
    assert empty.empty and {"bench", "method", "density", "ppl", "family"} <= set(empty.columns)
    assert plots.ppl_table(empty).empty and plots.protocol_tables(empty) == {}
    assert "no pruned results" in plots.ppl_vs_density(empty).axes[0].texts[0].get_text()
    assert "no quantized" in plots.bits_vs_ppl(empty).axes[0].texts[0].get_text()
    _two_calibrations().to_csv(tmp_path / "bench_prune.csv", index=False)
    some = plots.load_bench_results(tmp_path)
    assert set(some["bench"]) == {"one-shot pruning"} and len(some) == 6


def test_bits_figure_splits_series_by_setting_and_panels_by_protocol():
    df = plots.load_bench_results()
    fig = plots.bits_vs_ppl(df[df["bench"] == "quantization"])
    assert len(fig.axes) == 1 and "16 × 512" in fig.axes[0].get_title()
    labels = {c.get_label() for c in fig.axes[0].collections}
    assert "GPTQ" in labels and "RTN" in labels
    assert {"GPTQ mixed · allocation=budget, importance=error",
            "GPTQ mixed · allocation=quantile, importance=five_factor"} <= labels


def test_quantized_tables_hold_every_quantized_row_once_per_protocol():
    df = plots.load_bench_results()
    tables = plots.quantized_tables(df)
    assert list(tables) == ["smollm2-135m · eval wikitext2, 16 × 512 · calib wikitext2-valid, 16 × 512, "
                            "seed 0"]
    table = next(iter(tables.values()))
    quant = pd.read_csv(plots.project_root() / "results" / "bench_quant.csv")
    measured = quant[quant["kind"] != "none"]
    assert len(table) == len(measured)  # each measured row, none merged
    assert sorted(table["ppl"]) == sorted(measured["ppl"])
    assert list(table["density"]) == sorted(table["density"], reverse=True)
    assert plots.quantized_tables(_results().iloc[0:0]) == {}
    small = plots.quantized_tables(_results())
    assert [sorted(t["ppl"]) for t in small.values()] == [[70.0, 300.0]]
