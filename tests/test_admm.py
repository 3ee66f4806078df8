"""The exact weight update and ADMM pruning, against a float64 closed form and SparseGPT."""

import pytest
import torch

from sparsegpt_utils.admm import admm_prune, exact_update
from sparsegpt_utils.solver import nm_mask, sparsegpt_solve


def correlated_layer(rows=48, cols=64, tokens=512, seed=0):
    """(W, X [tokens, cols], H = 2XᵀX/n) with strongly correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    base = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g)  # shared factors
    X = (base + 0.3 * torch.randn(tokens, cols, generator=g)) @ mix
    X *= torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.T @ X / tokens


def output_error(W, W_hat, X):
    return float(((W - W_hat).double() @ X.double().T).norm())


def closed_form(W, H, mask, percdamp=0.01):
    """Float64, row by row: w_S = argmin (w − w0)ᵀ (H + λI) (w − w0) with w = 0 off S."""
    W, H = W.double(), H.double()
    H = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = mask[r]
        out[r, S] = torch.linalg.solve(H[S][:, S], (H @ W[r])[S])
    return out


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_exact_update_matches_float64_closed_form(kind):
    W, X, H = correlated_layer()
    if kind == "2:4":
        mask = nm_mask(torch.rand(W.shape, generator=torch.Generator().manual_seed(3)), 2, 4)
    else:
        mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    new = exact_update(W, H, mask)
    ref = closed_form(W, H, mask)
    assert not new[~mask].any()
    rel = (new.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 1e-4


def test_exact_update_zeroes_dead_inputs():
    W, X, H = correlated_layer()
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    mask = torch.ones_like(W, dtype=torch.bool)
    mask[:, ::3] = False
    new = exact_update(W, H, mask)
    assert not new[:, 5].any() and not new[~mask].any()


@pytest.mark.parametrize("density,nm", [(0.5, None), (0.3, None), (1.0, (2, 4))])
def test_exact_update_never_worse_than_sparsegpt_on_its_mask(density, nm):
    for seed in range(3):
        W, X, H = correlated_layer(seed=seed)
        sg = sparsegpt_solve(W, H, density, nm)
        same_mask = sparsegpt_solve(W, H, 1.0, prior_mask=sg.mask)  # SparseGPT's update, mask given
        assert torch.equal(same_mask.mask, sg.mask)
        new = exact_update(W, H, sg.mask, start=sg.weight)
        assert output_error(W, new, X) <= output_error(W, same_mask.weight, X) * (1 + 1e-6)
        assert output_error(W, new, X) < output_error(W, sg.weight, X)


@pytest.mark.parametrize("density", [0.5, 0.3])
def test_admm_beats_sparsegpt_on_correlated_inputs(density):
    for seed in range(3):
        W, X, H = correlated_layer(seed=seed)
        res = admm_prune(W, H, density)
        sg = sparsegpt_solve(W, H, density)
        assert output_error(W, res.weight, X) < output_error(W, sg.weight, X)
        assert float(res.mask.float().mean()) == pytest.approx(density, abs=1 / W.shape[1])
        assert not res.weight[~res.mask].any()


def test_admm_patterns_segments_and_prior_mask():
    W, X, H = correlated_layer(rows=40)
    res = admm_prune(W, H, nm="2:4")
    assert (res.mask.reshape(40, -1, 4).sum(2) == 2).all()
    # stacked rows with their own densities: each segment keeps its own share per row
    stacked = admm_prune(W, H, [0.5, 0.25], segments=[24, 16])
    assert (stacked.mask[:24].sum(1) == 32).all() and (stacked.mask[24:].sum(1) == 16).all()
    prior = res.mask
    shrunk = admm_prune(W, H, 0.25, prior_mask=prior)
    assert not (shrunk.mask & ~prior).any()
    assert (shrunk.mask.sum(1) == 16).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"ramp": 0}, "ramp"), ({"rho": 0}, "rho"), ({"density": 0}, "density"), ({"segments": [3]}, "segments"),
])
def test_admm_bad_arguments(kwargs, match):
    W, X, H = correlated_layer(rows=8)
    with pytest.raises(ValueError, match=match):
        admm_prune(W, H, **{"density": 0.5, **kwargs})
