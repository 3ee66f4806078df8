"""OWL per-block densities inside prune_model: from the dense model's outlier ratios, with
the global density met exactly, for every unstructured method."""

import copy

import pytest
import torch

from sparsegpt_utils.evaluate import density_report, overall_density
from sparsegpt_utils.owl import block_params, outlier_ratios, owl_densities
from sparsegpt_utils.prune import PruneConfig, prune_model
from tests.conftest import tiny_llama, tiny_opt

CALIB = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))


def test_owl_densities_average_exactly_to_the_target():
    g = torch.Generator().manual_seed(0)
    for density in (0.7, 0.5, 0.3, 0.1):
        ratios = torch.rand(12, generator=g).tolist()
        params = torch.randint(1, 1000, (12,), generator=g).tolist()
        d = owl_densities(ratios, density, 0.08, params)
        mean = sum(x * n for x, n in zip(d, params)) / sum(params)
        assert mean == pytest.approx(density, abs=1e-12)
        assert len(set(d)) > 1 and all(0 < x <= 1 for x in d)


@pytest.mark.parametrize("make,method", [(tiny_llama, "sparsegpt"), (tiny_llama, "wanda"),
                                         (tiny_llama, "magnitude"), (tiny_llama, "admm"), (tiny_opt, "admm")])
def test_owl_in_prune_model_meets_the_global_density(make, method):
    model = make(layers=3)
    dense = copy.deepcopy(model)
    res = prune_model(model, CALIB, PruneConfig(method=method, density=0.4, owl=True,
                                                calibration_batch_size=2), progress=False)
    params = block_params(model)
    d = res.block_densities
    assert res.owl and len(d) == 3 and len(set(d)) > 1
    assert sum(x * n for x, n in zip(d, params)) / sum(params) == pytest.approx(0.4, abs=1e-9)
    # the densities are OWL's on the dense model's activations
    expected = owl_densities(outlier_ratios(dense, CALIB, 5.0, progress=False), 0.4, 0.08, params)
    assert d == pytest.approx(expected, abs=1e-12)
    # the per-layer and per-block tables carry each block's density
    for block, target in enumerate(d):
        assert (res.layers[res.layers.block == block].density_target == target).all()
    assert res.blocks.density_target.tolist() == pytest.approx(d)
    # achieved: exact up to the rounding of a kept count per row (64 or 128 columns)
    assert overall_density(density_report(model)) == pytest.approx(0.4, abs=1 / 64)
    report = density_report(model)
    for block, target in enumerate(d):
        rows = report[report.layer.str.contains(f"layers.{block}.")]
        assert (rows.density - target).abs().max() < 1 / 32


def test_owl_lambda_zero_is_uniform_and_owl_refuses_nm_and_explicit_densities():
    model = tiny_llama(layers=2)
    res = prune_model(model, CALIB, PruneConfig(density=0.5, owl=True, owl_lambda=0.0), progress=False)
    assert res.block_densities == [0.5, 0.5]
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(nm="2:4", owl=True)
    with pytest.raises(ValueError, match="owl"):
        prune_model(model, CALIB, PruneConfig(owl=True, block_densities=[0.5, 0.5]), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, None, PruneConfig(method="magnitude", owl=True), progress=False)


def test_owl_ratios_come_from_the_first_owl_samples():
    model = tiny_llama(layers=3)
    dense = copy.deepcopy(model)
    res = prune_model(model, CALIB, PruneConfig(density=0.4, owl=True, owl_samples=2), progress=False)
    params = block_params(dense)
    first_two = owl_densities(outlier_ratios(dense, CALIB[:2], 5.0, progress=False), 0.4, 0.08, params)
    every = owl_densities(outlier_ratios(dense, CALIB, 5.0, progress=False), 0.4, 0.08, params)
    assert res.block_densities == pytest.approx(first_two, abs=1e-12)
    assert max(abs(a - b) for a, b in zip(first_two, every)) > 1e-6  # the samples were left out
    with pytest.raises(ValueError, match="owl_samples"):
        PruneConfig(owl=True, owl_samples=0)
