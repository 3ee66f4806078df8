"""The solver against a plain float64 re-implementation of the paper's loop, and the
properties a user relies on (density, N:M, damping, dead inputs, baselines)."""

import warnings

import pytest
import torch

from sparsegpt_utils.quant import QuantSpec, find_params, quantize
from sparsegpt_utils.solver import (
    HessianAccumulator,
    magnitude_mask,
    parse_nm,
    prune_lowest,
    sparsegpt_solve,
    wanda_mask,
)


def reference_sparsegpt(W, H, density=1.0, nm=None, Bs=128, percdamp=0.01, quant=None):
    """Algorithm 1 of the paper in float64, column by column, no lazy batching: after each
    column every later column is updated at once. Mask selection every Bs columns (or per N:M
    group), grids per row before the loop or per group when the loop reaches it."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    kept = torch.ones(rows, cols, dtype=torch.bool)
    if quant is not None:
        bits = quant.row_bits(rows)
        maxq = (2**bits - 1).double()[:, None]
        if quant.groupsize is None:
            scale, zero = (t.double() for t in find_params(W.float(), bits))
    for j in range(cols):
        if nm is None and density < 1 and j % Bs == 0:
            score = W[:, j:j + Bs] ** 2 / torch.diag(Hinv)[j:j + Bs] ** 2
            k = round(score.numel() * (1 - density))
            idx = torch.argsort(score.flatten())[:k]
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[idx] = False
            kept[:, j:j + Bs] = block.view(score.shape)
        if nm is not None and j % nm[1] == 0:
            score = W[:, j:j + nm[1]] ** 2 / torch.diag(Hinv)[j:j + nm[1]] ** 2
            idx = torch.argsort(score, dim=1)[:, : nm[1] - nm[0]]
            kept[:, j:j + nm[1]].scatter_(1, idx, False)
        q = W[:, j] * kept[:, j]
        if quant is not None:
            if quant.groupsize and j % quant.groupsize == 0:
                g = W[:, j:j + quant.groupsize] * kept[:, j:j + quant.groupsize]
                scale, zero = (t.double() for t in find_params(g.float(), bits))
            q = quantize(q[:, None], scale, zero, maxq).flatten() * kept[:, j]
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        W[:, j] = q
    W *= ~dead[None, :]
    return W, kept & ~dead[None, :]


def random_layer(rows=48, cols=256, tokens=2048, seed=0, correlated=True, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g)
    if correlated:  # like real activations: uneven feature scales and a few shared directions
        X = X * torch.exp(spread * torch.randn(cols, generator=g))
        X = X + spread * torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g)
    acc = HessianAccumulator(cols)
    for chunk in X.split(512):
        acc.add(chunk)
    return W, acc.hessian, X


@pytest.mark.parametrize("density,nm,B,Bs", [
    (0.5, None, 128, 128), (0.3, None, 64, 32), (0.7, None, 32, 128), (1.0, (2, 4), 128, 128),
    (1.0, (4, 8), 64, 64),
])
def test_matches_float64_reference(density, nm, B, Bs):
    # mildly correlated inputs keep H well enough conditioned for float32 to agree to 1e-5
    W, H, _ = random_layer(spread=0.3)
    res = sparsegpt_solve(W, H, density, nm, blocksize=B, mask_blocksize=Bs)
    ref_w, ref_mask = reference_sparsegpt(W, H, density, nm, Bs)
    assert torch.equal(res.mask, ref_mask)
    assert torch.allclose(res.weight.double(), ref_w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("groupsize", [None, 64])
def test_joint_quantization_matches_reference(groupsize):
    W, H, _ = random_layer(rows=32, cols=128, seed=3, spread=0.3)
    spec = QuantSpec(bits=4, groupsize=groupsize)
    res = sparsegpt_solve(W, H, 0.5, quant=spec, blocksize=32, mask_blocksize=64)
    ref_w, ref_mask = reference_sparsegpt(W, H, 0.5, None, 64, quant=spec)
    assert torch.equal(res.mask, ref_mask)
    assert torch.allclose(res.weight.double(), ref_w, atol=1e-5, rtol=0)
    # every kept weight lies on its row's (group's) 4-bit grid, pruned ones are exactly 0
    codes = res.grid.codes(res.weight)
    assert int(codes.max()) <= 15
    assert torch.equal(res.grid.dequantize(codes) * res.mask, res.weight)
    assert torch.all(res.weight[~res.mask] == 0)


def output_error(W, W_hat, X):
    return torch.linalg.norm(X @ W.T - X @ W_hat.T).item()


@pytest.mark.parametrize("density,nm", [(0.5, None), (0.3, None), (1.0, (2, 4))])
def test_beats_wanda_and_magnitude(density, nm):
    W, H, X = random_layer(rows=64, cols=256, seed=1)
    acc_norm = torch.linalg.norm(X, dim=0)
    sgpt = sparsegpt_solve(W, H, density, nm).weight
    wanda = W * wanda_mask(W, acc_norm, density, nm)
    mag = W * magnitude_mask(W, density, nm)
    e_s, e_w, e_m = (output_error(W, w, X) for w in (sgpt, wanda, mag))
    assert e_s < e_w and e_s < e_m, (e_s, e_w, e_m)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.77])
def test_achieved_density(density):
    W, H, _ = random_layer(rows=40, cols=300, seed=2)  # 300 = two full mask blocks + a tail
    res = sparsegpt_solve(W, H, density, mask_blocksize=128, blocksize=128)
    for c in range(0, 300, 128):
        block = res.mask[:, c:c + 128]
        assert abs(block.sum().item() - density * block.numel()) <= 1
    assert torch.all(res.weight[~res.mask] == 0)
    assert torch.count_nonzero(res.weight) <= res.mask.sum()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_exact_per_group(n, m):
    W, H, _ = random_layer(rows=16, cols=128, seed=4)
    res = sparsegpt_solve(W, H, nm=(n, m))
    groups = res.mask.view(16, -1, m).sum(-1)
    assert torch.all(groups == n)
    for mask in (magnitude_mask(W, nm=(n, m)), wanda_mask(W, torch.ones(128), nm=(n, m))):
        assert torch.all(mask.view(16, -1, m).sum(-1) == n)


def test_density_one_changes_nothing():
    W, H, _ = random_layer(seed=5)
    res = sparsegpt_solve(W, H, 1.0)
    assert torch.equal(res.weight, W) and res.mask.all()
    assert torch.equal(W * magnitude_mask(W, 1.0), W)


def test_dead_inputs_are_zeroed_and_solved():
    W, H, _ = random_layer(rows=16, cols=64, seed=6)
    H[:, 5] = 0
    H[5, :] = 0
    res = sparsegpt_solve(W, H, 0.5, blocksize=32, mask_blocksize=32)
    assert torch.all(res.weight[:, 5] == 0) and not res.mask[:, 5].any()
    assert torch.isfinite(res.weight).all()


def test_cholesky_failure_retries_with_more_damping():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    x = torch.randn(4, 32, generator=g)
    H = 2 * x.T @ x / 4  # rank 4 of 32: singular, so undamped Cholesky fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sparsegpt_solve(W, H, 0.5, blocksize=32, mask_blocksize=32, percdamp=0.0)
    assert any("retrying" in str(w.message) for w in caught)
    assert res.damp > 0 and torch.isfinite(res.weight).all()


def test_hessian_is_running_mean_without_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 8, generator=g)
    pad = torch.ones(3, 10, dtype=torch.bool)
    pad[1, 7:] = False
    acc = HessianAccumulator(8)
    acc.add(x[:2], pad[:2])
    acc.add(x[2:], pad[2:])
    tokens = x[pad].double()
    expected = 2 * tokens.T @ tokens / tokens.shape[0]
    assert acc.tokens == int(pad.sum())
    assert torch.allclose(acc.hessian.double(), expected, atol=1e-5)
    assert torch.allclose(acc.column_norms().double(), tokens.norm(dim=0), atol=1e-4)
    diag = HessianAccumulator(8, diagonal_only=True)  # what Wanda accumulates
    diag.add(x[:2], pad[:2])
    diag.add(x[2:], pad[2:])
    assert diag.hessian.shape == (8,)
    assert torch.allclose(diag.column_norms(), acc.column_norms(), atol=1e-5)


def test_prior_mask_only_shrinks():
    W, H, _ = random_layer(rows=32, cols=128, seed=7)
    first = sparsegpt_solve(W, H, 0.5)
    second = sparsegpt_solve(first.weight, H, 0.3, prior_mask=first.mask)
    assert not (second.mask & ~first.mask).any()
    assert abs(second.mask.float().mean().item() - 0.3) < 0.01
    assert not (magnitude_mask(W, 0.3, prior_mask=first.mask) & ~first.mask).any()


@pytest.mark.parametrize("kwargs,match", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
    ({"nm": (4, 4)}, "N:M"), ({"nm": (2, 4), "blocksize": 6, "mask_blocksize": 6}, "divisible"),
    ({"blocksize": 48, "mask_blocksize": 32}, "divide"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    W, H, _ = random_layer(rows=4, cols=32, tokens=64)
    with pytest.raises(ValueError, match=match):
        sparsegpt_solve(W, H, **kwargs)
    with pytest.raises(ValueError, match="N:M"):
        parse_nm("3:2")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_or_hessian_refused_naming_the_layer(bad):
    W, H, _ = random_layer(rows=8, cols=32, tokens=256)
    W_bad = W.clone()
    W_bad[3, 7] = bad
    with pytest.raises(ValueError, match=r"layer blk\.0\.fc1.*weight.*non-finite"):
        sparsegpt_solve(W_bad, H, 0.5, blocksize=32, mask_blocksize=32, name="blk.0.fc1")
    H_bad = H.clone()
    H_bad[2, 2] = bad
    with pytest.raises(ValueError, match=r"layer blk\.0\.fc1.*Hessian.*non-finite"):
        sparsegpt_solve(W, H_bad, 0.5, blocksize=32, mask_blocksize=32, name="blk.0.fc1")
    with pytest.raises(ValueError, match="non-finite"):  # quantizing only, nothing pruned
        sparsegpt_solve(W_bad, H, 1.0, quant=QuantSpec(4), blocksize=32, mask_blocksize=32)
    for mask_of in (lambda w: magnitude_mask(w, 0.5, name="blk.0.fc1"),
                    lambda w: wanda_mask(w, torch.ones(32), 0.5, name="blk.0.fc1")):
        with pytest.raises(ValueError, match=r"blk\.0\.fc1.*non-finite"):
            mask_of(W_bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("diagonal_only", [False, True])
def test_non_finite_activations_refused_naming_the_layer(bad, diagonal_only):
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    x[1, 3, 5] = bad
    acc = HessianAccumulator(8, diagonal_only=diagonal_only, name="blk.1.q_proj")
    acc.add(x[:1])
    acc.add(x[1:])
    with pytest.raises(ValueError, match=r"layer blk\.1\.q_proj.*activations.*non-finite"):
        _ = acc.hessian
    with pytest.raises(ValueError, match=r"blk\.1\.q_proj"):
        acc.column_norms()


def test_no_calibration_token_refused_naming_the_layer():
    x = torch.randn(2, 16, 8)
    acc = HessianAccumulator(8, name="blk.0.k_proj")
    acc.add(x, torch.zeros(2, 16, dtype=torch.bool))  # an all-padding batch
    with pytest.raises(ValueError, match=r"layer blk\.0\.k_proj.*no calibration token.*padding"):
        _ = acc.hessian
    acc.add(x[:1])  # a later batch with real tokens makes it usable
    assert acc.tokens == 16 and torch.isfinite(acc.hessian).all()
    # a zero Hessian given to the solver directly is refused too (it would zero the layer)
    with pytest.raises(ValueError, match=r"layer blk\.0\.k_proj.*Hessian is zero"):
        sparsegpt_solve(torch.randn(4, 8), torch.zeros(8, 8), 0.5, blocksize=8, mask_blocksize=8,
                        name="blk.0.k_proj")


def test_rows_left_empty_are_warned_once_with_the_count():
    W, H, _ = random_layer(rows=8, cols=32, tokens=256)
    W[2] = 0  # a row with nothing to keep is not the density's doing
    for prune in (lambda: sparsegpt_solve(W, H, 0.01, blocksize=32, mask_blocksize=32, name="blk.0.fc2").mask,
                  lambda: wanda_mask(W, torch.ones(32), 0.01, name="blk.0.fc2"),
                  lambda: magnitude_mask(W, 0.01, name="blk.0.fc2")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = prune()
        emptied = int((~mask.any(1) & (W != 0).any(1)).sum())
        assert emptied >= 4  # 8 x 32 at density 0.01 keeps at most 3 weights
        empty = [w for w in caught if "keep no weight" in str(w.message)]
        assert len(empty) == 1, [str(w.message) for w in caught]
        msg = str(empty[0].message)
        assert "blk.0.fc2" in msg and f"{emptied} of 8 rows" in msg, msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegpt_solve(W, H, 0.5, blocksize=32, mask_blocksize=32)  # no row empties: silent


def test_one_mask_selector_breaks_ties_by_position():
    score = torch.tensor([[1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    assert prune_lowest(score, 3).tolist() == [[False, False, True, False], [True, True, True, True]]
    assert prune_lowest(score, 2, per_row=True).tolist() == [[False, True, True, False],
                                                             [False, False, True, True]]
    assert prune_lowest(score, 0).all() and not prune_lowest(score, 8).any()
    # Wanda compares within each row, with the same selector
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    kept = wanda_mask(W, torch.ones(40), 0.25)
    assert torch.equal(kept, prune_lowest(W.abs(), 30, per_row=True))
    assert torch.all(kept.sum(1) == 10)


def test_accumulating_never_waits_for_the_device(monkeypatch):
    # timing lives in bench/: add() neither synchronizes nor keeps a clock
    def no_sync(*_a, **_k):
        raise AssertionError("HessianAccumulator.add synchronized the device")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acc = HessianAccumulator(8, device, name="blk.0.q_proj")
    for _ in range(3):
        acc.add(torch.randn(4, 8, device=device))
    assert not hasattr(acc, "seconds") and acc.tokens == 12


@pytest.mark.parametrize("density,quant", [(0.5, None), (0.7, QuantSpec(4)), (1.0, QuantSpec(3))])
def test_act_order_is_the_reference_on_the_permuted_problem(density, quant):
    # act-order = the paper's loop on columns sorted by decreasing diag H, put back in place
    W, H, _ = random_layer(rows=32, cols=128, seed=8, spread=0.3)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(128))
    res = sparsegpt_solve(W, H, density, quant=quant, blocksize=32, mask_blocksize=64, act_order=True)
    ref_w, ref_mask = reference_sparsegpt(W[:, perm], H[perm][:, perm], density, None, 64, quant=quant)
    back = torch.argsort(perm)
    assert torch.equal(res.mask, ref_mask[:, back])
    assert torch.allclose(res.weight.double(), ref_w[:, back], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,m,quant", [(2, 4, None), (4, 8, QuantSpec(4, 32)), (1, 4, QuantSpec(3))])
def test_act_order_keeps_nm_groups_of_the_original_order(n, m, quant):
    W, H, X = random_layer(rows=16, cols=128, seed=9)
    res = sparsegpt_solve(W, H, nm=(n, m), quant=quant, blocksize=32, act_order=True)
    assert torch.all(res.mask.view(16, -1, m).sum(-1) == n)
    assert torch.all(res.weight[~res.mask] == 0) and torch.isfinite(res.weight).all()
    if quant is None:  # still a SparseGPT solve: better than the N:M baselines
        e_s = output_error(W, res.weight, X)
        assert e_s < output_error(W, W * magnitude_mask(W, nm=(n, m)), X)
        assert e_s < output_error(W, W * wanda_mask(W, torch.linalg.norm(X, dim=0), nm=(n, m)), X)


def test_act_order_respects_prior_masks_and_segments():
    W, H, _ = random_layer(rows=32, cols=128, seed=10)
    first = sparsegpt_solve(W, H, 0.5, act_order=True)
    second = sparsegpt_solve(first.weight, H, 0.3, prior_mask=first.mask, act_order=True)
    assert not (second.mask & ~first.mask).any()
    assert abs(second.mask.float().mean().item() - 0.3) < 0.01
    stacked = sparsegpt_solve(W, H, [0.5, 0.3], segments=[16, 16], act_order=True)
    for (r0, r1), d in (((0, 16), 0.5), ((16, 32), 0.3)):
        alone = sparsegpt_solve(W[r0:r1], H, d, act_order=True)
        assert torch.equal(stacked.mask[r0:r1], alone.mask)
        assert torch.allclose(stacked.weight[r0:r1], alone.weight, atol=1e-5)
