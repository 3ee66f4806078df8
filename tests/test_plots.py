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
    assert list(table.columns) == ["model", "eval_protocol", "density", "magnitude", "sparsegpt"]
    assert list(table["density"]) == [1.0, 0.7, 0.5, 0.3]  # dense first, as in the paper
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
                       "ppl": [40.0, 60.0, 30.0], "density_achieved": [0.5, 0.5, 0.7],
                       "layer_density_min": [0.49, 0.49, 0.69], "layer_density_max": [0.51, 0.51, 0.71]})
    fig = plots.testing_figure(df)
    assert _lines(fig.axes[0]) == {"ptb": ([0.5], [60.0]), "wikitext2": ([0.5, 0.7], [40.0, 30.0])}
    assert "no checkpoints" in plots.testing_figure(pd.DataFrame()).axes[0].texts[0].get_text()


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
    assert list(table.columns[:3]) == ["model", "eval_protocol", "dense"]
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
