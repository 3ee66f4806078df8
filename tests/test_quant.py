"""Grids, round-to-nearest, joint (GPTQ) quantization, bit packing and the storage cost model."""

from __future__ import annotations

import pytest
import torch

from sparsegpt_utils.quant import (
    QuantGrid,
    QuantSpec,
    find_params,
    grid_storage_bits,
    pack_bits,
    quant_storage_bits,
    quantize,
    row_storage_bits,
    rtn_quantize,
    unpack_bits,
    width_map_bits,
)
from sparsegpt_utils.solver import sparsegpt_solve


def layer(rows=32, cols=256, seed=0, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales, as in a real layer
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ mix
    X = X * (0.2 + 2 * torch.rand(cols, generator=g))
    return W, X, 2 * X.T @ X / tokens


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("groupsize", [None, 64])
def test_rtn_error_positive_and_shrinking_with_bits(sym, groupsize):
    W, _, _ = layer()
    errs = []
    for b in range(2, 9):
        q, grid = rtn_quantize(W, QuantSpec(b, groupsize, sym))
        assert int(grid.bits.min()) == b
        # at most as many distinct values per grid as the width allows
        g = groupsize or W.shape[1]
        assert max(q[r, c:c + g].unique().numel() for r in range(4) for c in range(0, W.shape[1], g)) <= 2**b
        errs.append(float(((q - W) ** 2).sum()))
    assert all(e > 0 for e in errs)
    assert all(a > 1.5 * b for a, b in zip(errs[:-1], errs[1:], strict=True)), errs


def test_rtn_error_within_half_a_step():
    W, _, _ = layer()
    q, grid = rtn_quantize(W, QuantSpec(4))
    scale, _, _ = grid.expand(W.shape[1])
    assert bool(((q - W).abs() <= scale / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("groupsize", [None, 32])
def test_values_on_a_grid_come_back_exactly(groupsize, bits):
    rows, cols = 8, 128
    top = 2**bits - 1
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, top + 1, (rows, cols), generator=g)
    G = groupsize or cols
    codes[:, ::G] = 0  # every grid uses its whole range, so min–max finds the same grid
    codes[:, 1::G] = top
    zero = torch.randint(0, top + 1, (rows, cols // G), generator=g).float()
    scale = 2.0 ** -torch.randint(4, 9, (rows, cols // G), generator=g).float()  # exact in float
    idx = torch.arange(cols) // G
    W = scale[:, idx] * (codes.float() - zero[:, idx])
    q, grid = rtn_quantize(W, QuantSpec(bits, groupsize))
    assert torch.equal(q, W)
    assert torch.equal(grid.codes(W), codes)
    assert torch.equal(grid.dequantize(codes), W)
    # and the joint solver leaves a weight already on the grid untouched, in either sweep
    # order (uneven diag H: act-order really permutes the columns)
    H = torch.eye(cols) * torch.linspace(0.5, 3, cols).flip(0)[torch.randperm(cols, generator=g)] + 0.1
    for act_order in (False, True):
        res = sparsegpt_solve(W, H, 1.0, quant=QuantSpec(bits, groupsize), act_order=act_order)
        assert torch.equal(res.weight, W), act_order
        assert torch.equal(res.grid.scale, grid.scale) and torch.equal(res.grid.zero, grid.zero)


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("bits", [3, torch.tensor([2, 3, 4, 8] * 6)])
def test_static_groups_give_the_same_grids_in_either_order(density, bits):
    W, _, H = layer(rows=24, cols=256, seed=4)
    spec = QuantSpec(bits, 64)
    plain = sparsegpt_solve(W, H, density, quant=spec, static_groups=True)
    act = sparsegpt_solve(W, H, density, quant=spec, act_order=True)  # static groups by default
    _, rtn = rtn_quantize(W, spec)  # static grids are the round-to-nearest grids of the weights
    for res in (plain, act):
        assert torch.equal(res.grid.scale, rtn.scale) and torch.equal(res.grid.zero, rtn.zero)
        assert torch.equal(res.grid.bits, rtn.bits)
        # every kept weight lies on its group's grid, at its row's width; pruned ones are 0
        codes = res.grid.codes(res.weight)
        assert bool((codes <= 2 ** res.grid.bits[:, None] - 1).all())
        assert torch.equal(res.grid.dequantize(codes) * res.mask, res.weight)
        assert abs(res.mask.float().mean().item() - density) < 0.01
    assert not torch.equal(plain.weight, act.weight)  # the order did change the solve
    with pytest.raises(ValueError, match="static_groups"):
        sparsegpt_solve(W, H, density, quant=spec, act_order=True, static_groups=False)


def test_act_order_lowers_the_gptq_error_where_few_inputs_dominate():
    W, X, H = layer(rows=64, cols=256, seed=5)
    X = X * torch.where(torch.rand(256, generator=torch.Generator().manual_seed(0)) < 0.05, 20.0, 1.0)
    H = 2 * X.T @ X / X.shape[0]
    err = {}
    for act_order in (False, True):
        q = sparsegpt_solve(W, H, 1.0, quant=QuantSpec(3), act_order=act_order).weight
        err[act_order] = torch.linalg.norm(X @ (W - q).T).item()
    assert err[True] < 0.9 * err[False], err


def test_zero_is_exact_and_pruned_zeros_stay_zero():
    W, _, H = layer()
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    bits = torch.tensor([2, 3, 4, 6, 8] * 6 + [2, 3])
    for sym in (False, True):
        q, _ = rtn_quantize(W * mask, QuantSpec(bits, 64, sym))
        assert bool((q[~mask] == 0).all())
        res = sparsegpt_solve(W, H, 0.5, quant=QuantSpec(bits, 64, sym))
        assert bool((res.weight[~res.mask] == 0).all())
        assert abs(float(res.mask.float().mean()) - 0.5) < 1e-6
        # kept weights lie on their row's grid, within its width
        codes = res.grid.codes(res.weight)
        assert bool((codes <= (2 ** res.grid.bits[:, None] - 1)).all())
        assert torch.allclose(res.grid.dequantize(codes), res.weight, atol=1e-6)


def test_per_row_widths_match_uniform_rows():
    W, _, _ = layer()
    bits = torch.tensor([3] * 16 + [5] * 16)
    q, _ = rtn_quantize(W, QuantSpec(bits))
    assert torch.equal(q[:16], rtn_quantize(W[:16], QuantSpec(3))[0])
    assert torch.equal(q[16:], rtn_quantize(W[16:], QuantSpec(5))[0])


def test_mse_clipping_lowers_the_error_it_minimises():
    W, _, _ = layer()
    W[:, 0] *= 8  # outliers make clipping worthwhile
    bits = torch.full((W.shape[0],), 3)
    maxq = torch.full((W.shape[0], 1), 7.0)

    def err(mse):
        s, z = find_params(W, bits, mse=mse)
        return ((quantize(W, s, z, maxq) - W).abs() ** 2.4).sum(1)

    minmax, clipped = err(False), err(True)
    assert bool((clipped <= minmax + 1e-5).all()) and float(clipped.sum()) < 0.95 * float(minmax.sum())


def test_gptq_beats_rtn_on_output_error():
    W, X, H = layer()
    for bits in (3, 4):
        rtn, _ = rtn_quantize(W, QuantSpec(bits))
        gptq = sparsegpt_solve(W, H, 1.0, quant=QuantSpec(bits)).weight
        e_rtn = float(((X @ (W - rtn).T) ** 2).sum())
        e_gptq = float(((X @ (W - gptq).T) ** 2).sum())
        assert e_gptq < 0.8 * e_rtn, (bits, e_gptq, e_rtn)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (37, 11), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).view(37, 11), codes)
    with pytest.raises(ValueError, match="fit"):
        pack_bits(codes + 2**bits, bits)


def test_storage_bits_by_hand():
    # 2 rows x 10 columns, groups of 4 (3 grids per row), asymmetric, widths 2 and 8
    bits = torch.tensor([2, 8])
    dense = quant_storage_bits(2, 10, bits, groupsize=4)
    # values 10*2 + 10*8; scales 2*3*16; zero points 3*2 + 3*8; map ceil(log2 7) = 3 per row
    assert dense == 20 + 80 + 96 + 6 + 24 + 6
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :7] = True
    pruned = quant_storage_bits(2, 10, bits, groupsize=4, kept=mask)
    assert pruned == 3 * 2 + 7 * 8 + 20 + 96 + 6 + 24 + 6  # kept codes + 1-bit mask + metadata
    assert quant_storage_bits(2, 10, bits, groupsize=4, sym=True) == 20 + 80 + 96 + 6
    # uniform: no width map; per-row grid
    assert quant_storage_bits(3, 10, 4) == 3 * (40 + 16 + 4)
    assert width_map_bits(torch.tensor([3, 3])) == 0 and width_map_bits(torch.tensor([3, 4])) == 1
    assert width_map_bits(0, 2, 8) == 3
    assert row_storage_bits(4, 10, rows=2).tolist() == [60.0, 60.0]
    # a layer that keeps every weight stores no mask, however its kept counts are given
    for kept in (10, torch.tensor([10, 10]), torch.ones(2, 10, dtype=torch.bool)):
        assert quant_storage_bits(2, 10, 4, kept=kept) == 2 * 60
    assert quant_storage_bits(2, 10, 4, kept=torch.tensor([10, 9])) == 19 * 4 + 20 + 2 * 20
    with pytest.raises(ValueError, match="rows"):
        row_storage_bits(4, 10)


def test_storage_bits_matches_packed_codes():
    """The cost model counts what packing the codes per width actually takes (up to byte padding)."""
    W, _, H = layer(rows=24, cols=200)
    bits = torch.tensor([2, 3, 4, 6, 8, 3] * 4)
    res = sparsegpt_solve(W, H, 0.5, quant=QuantSpec(bits, 64))
    codes = res.grid.codes(res.weight)
    stored = res.mask.numel()  # the bitmap
    for b in bits.unique().tolist():
        rows = bits == b
        kept_codes = codes[rows][res.mask[rows]]
        stored += 8 * pack_bits(kept_codes, b).numel()
        stored += 8 * pack_bits(res.grid.zero[rows].long(), b).numel()
    stored += res.grid.scale.numel() * 16 + bits.numel() * width_map_bits(bits)
    model = grid_storage_bits(res.grid, W.shape[1], res.mask)
    assert model <= stored < model + 8 * 2 * bits.unique().numel()


def test_quantspec_rejects_bad_input():
    with pytest.raises(ValueError, match="wbits"):
        QuantSpec(0)
    with pytest.raises(ValueError, match="groupsize"):
        QuantSpec(4, 0)
    with pytest.raises(ValueError, match="rows"):
        QuantSpec(torch.tensor([4, 4])).row_bits(3)


def test_grid_expand_and_codes_shapes():
    grid = QuantGrid(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([4, 4]), 4)
    scale, zero, maxq = grid.expand(10)
    assert scale.shape == zero.shape == maxq.shape == (2, 10)
    assert grid.group_of_column(10).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_per_grid_widths_match_uniform_grids():
    # one width per grid [rows, n_groups]: each grid is the uniform grid of its width
    W, _, H = layer(rows=6, cols=96)
    widths = torch.tensor([[2, 3, 8]] * 3 + [[4, 4, 4]] * 3)
    q, grid = rtn_quantize(W, QuantSpec(widths, 32))
    assert torch.equal(grid.bits, widths) and torch.equal(grid.grid_bits(), widths)
    for b in (2, 3, 4, 8):
        ref, _ = rtn_quantize(W, QuantSpec(b, 32))
        sel = (widths == b).repeat_interleave(32, dim=1)
        assert torch.equal(q[sel], ref[sel])
    codes = grid.codes(q)
    assert bool((codes <= (2 ** widths - 1).repeat_interleave(32, dim=1)).all())
    res = sparsegpt_solve(W, H, quant=QuantSpec(widths, 32))
    assert torch.equal(res.grid.dequantize(res.grid.codes(res.weight)), res.weight)
    with pytest.raises(ValueError, match="grid_bits"):
        QuantSpec(widths, 32).row_bits(6)
