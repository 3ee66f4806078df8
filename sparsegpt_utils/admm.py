"""The exact weight update for a fixed mask, and ADMM pruning with a gradually tightened mask
(Boža, 2024, "Fast and Optimal Weight Update for Pruned Large Language Models").

Tensors only, on the device of the tensors given, in float32. Conventions as in solver.py:
``weight`` [rows, columns], ``hessian`` = 2XXᵀ/n [columns, columns], ``mask`` bool, True = kept.

The layer's problem is ``min ‖(W − Ŵ)X‖²`` with Ŵ zero outside the mask, i.e. per row
``min (ŵ − w)ᵀ H (ŵ − w)``: rows are independent, so a stacked group of layers sharing one
Hessian (q/k/v) is solved as one matrix. H is damped as in SparseGPT (``λ = percdamp ·
mean(diag H)``) and both problems are solved in coordinates where diag H = 1 (columns scaled
by ``sqrt(H_jj)``): there ``|w_j|`` is the Wanda score ``|w_j|·‖x_j‖`` and the system is well
scaled. The masked least squares are solved by conjugate gradients on all rows at once:
matrix products only, no per-row factorization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .solver import SolveResult, check_density, nm_mask, parse_nm, prune_lowest

__all__ = ["exact_update", "admm_prune", "masked_least_squares"]


def _scaled_problem(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float):
    """(W·s, H/(s sᵀ), s, dead): the damped problem with unit diagonal, in float32."""
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {list(hessian.shape)}")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diagonal(H)))
    s = torch.sqrt(torch.diagonal(H))
    H /= s[:, None] * s[None, :]
    return W * s[None, :], H, s, dead


def masked_least_squares(target: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                         start: torch.Tensor | None = None, tol: float = 2e-6,
                         max_iterations: int = 200) -> torch.Tensor:
    """Per row r: ``x_S = H_SS⁻¹ b_S`` on the row's kept set S (``mask[r]``), zero elsewhere.

    ``target`` b [rows, cols], ``hessian`` H [cols, cols] positive definite with unit
    diagonal (so plain conjugate gradients are Jacobi-preconditioned). All rows iterate
    together, one [rows, cols] × [cols, cols] product per iteration, from ``start`` (default
    zero), until every row's residual ‖b_S − H_SS x_S‖ is below ``tol`` × ‖b_S‖ or after
    ``max_iterations``."""
    mask = mask.to(target.device, torch.bool)
    x = torch.zeros_like(target) if start is None else start.to(target.dtype) * mask
    b = target * mask
    r = b - (x @ hessian) * mask
    p = r.clone()
    rs = (r * r).sum(1)
    limit = (tol * b.norm(dim=1)) ** 2
    for _ in range(max_iterations):
        if bool((rs <= limit).all()):
            break
        Ap = (p @ hessian) * mask
        alpha = rs / (p * Ap).sum(1).clamp_min(torch.finfo(x.dtype).tiny)
        x += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        rs_new = (r * r).sum(1)
        p = r + (rs_new / rs.clamp_min(torch.finfo(x.dtype).tiny))[:, None] * p
        rs = rs_new
    return x * mask


@torch.no_grad()
def exact_update(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                 percdamp: float = 0.01, start: torch.Tensor | None = None,
                 tol: float = 2e-6) -> torch.Tensor:
    """The weights that minimise the layer's output error for a fixed ``mask``: per row,
    ``ŵ = argmin (ŵ − w)ᵀ (H + λI) (ŵ − w)`` over ŵ zero outside the row's kept set.
    ``start``: a first guess (e.g. the weights another solver left for this mask; default the
    masked ``weight``); ``tol``: the solver's relative residual (:func:`masked_least_squares`;
    1e-3 already puts the output error within ~1e-5 of its minimum). Returns [rows, cols] in
    ``weight``'s dtype, exactly zero where
    ``~mask`` (and at dead inputs, ``H_jj = 0``)."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask must be {list(weight.shape)}, got {list(mask.shape)}")
    Wn, Hn, s, dead = _scaled_problem(weight, hessian, percdamp)
    mask = mask.to(Wn.device, torch.bool) & ~dead[None, :]
    first = Wn if start is None else start.to(Wn.device, torch.float32) * s[None, :]
    x = masked_least_squares(Wn @ Hn, Hn, mask, first, tol)
    return (x / s[None, :] * mask).to(weight.dtype)


def _select(score: torch.Tensor, density: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep the highest scores: per row (density), or per N:M group."""
    if nm is not None:
        return nm_mask(score, *nm)
    return prune_lowest(score, round(score.shape[1] * (1 - density)), per_row=True)


@torch.no_grad()
def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    density: float | Sequence[float] = 0.5,
    nm: tuple[int, int] | str | None = None,
    segments: Sequence[int] | None = None,
    prior_mask: torch.Tensor | None = None,
    percdamp: float = 0.01,
    iterations: int = 20,
    ramp: int = 15,
    rho: float = 0.1,
    rho_growth: float = 1.2,
    tol: float = 2e-6,
) -> SolveResult:
    """Prune ``weight`` by ADMM with a gradually tightened mask, then the exact update.

    ADMM on ``min (w − w0)ᵀH(w − w0)`` subject to ``w = z``, z supported on the mask: the
    mask is re-chosen every iteration from ``|w + u|`` (scaled coordinates, per output row; N:M
    groups from the last ramp iteration), its density falling from 1 to ``density`` along the
    cubic schedule ``1 − (1 − density)(1 − (1 − t/ramp)³)`` over the first ``ramp`` iterations
    and held for the rest; ρ is multiplied by ``rho_growth`` every iteration. The final mask's
    weights are then the exact masked least-squares solution (:func:`exact_update`).
    ``segments``/``density`` per segment and ``prior_mask`` (True = may be kept; masks only
    shrink) as in :func:`solver.sparsegpt_solve`; ``tol`` as in :func:`exact_update`.
    ``loss`` is ``½ Σ (ŵ − w)ᵀ(H + λI)(ŵ − w)``.
    """
    rows, cols = weight.shape
    sizes = list(segments) if segments else [rows]
    if sum(sizes) != rows:
        raise ValueError(f"segments {sizes} do not add up to {rows} rows")
    ends = torch.tensor(sizes).cumsum(0).tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    densities = [density] * len(bounds) if isinstance(density, (int, float)) else list(density)
    if len(densities) != len(bounds):
        raise ValueError(f"got {len(densities)} densities for {len(bounds)} segments")
    densities = [check_density(d) for d in densities]
    nm = parse_nm(nm)
    if nm is not None:
        densities = [nm[0] / nm[1]] * len(bounds)
        if cols % nm[1]:
            raise ValueError(f"N:M needs the number of input columns ({cols}) divisible by M={nm[1]}")
    if not 1 <= ramp <= iterations:
        raise ValueError(f"ramp must be in [1, iterations={iterations}], got {ramp}")
    if not rho > 0 or not rho_growth >= 1:
        raise ValueError(f"rho must be > 0 and rho_growth >= 1, got {rho}, {rho_growth}")

    W0, H, s, dead = _scaled_problem(weight, hessian, percdamp)
    prior = None if prior_mask is None else prior_mask.to(W0.device, torch.bool)
    B = W0 @ H
    # One eigendecomposition serves every ρ: (H + ρI)⁻¹ = Q diag(1/(λ + ρ)) Qᵀ, so each
    # W-step is matrix products (no refactorization as ρ grows, no triangular solves).
    lam, Q = torch.linalg.eigh(H)
    W, U = W0.clone(), torch.zeros_like(W0)
    mask = torch.ones_like(W0, dtype=torch.bool)
    for t in range(1, iterations + 1):
        V = W + U
        score = V.abs()
        if prior is not None:  # weights pruned before go first and stay pruned
            score = torch.where(prior, score, -1.0)
        for (r0, r1), d in zip(bounds, densities, strict=True):
            step_density = 1 - (1 - d) * (1 - (1 - min(t, ramp) / ramp) ** 3)
            mask[r0:r1] = _select(score[r0:r1], step_density, nm if t >= ramp else None)
        if prior is not None:
            mask &= prior
        Z = V * mask
        U = V - Z
        if t == iterations:
            break
        rhs = B + rho * (Z - U)
        if rows >= cols:  # build the inverse once ([cols]³), then one product with the rows
            W = rhs @ ((Q / (lam + rho)) @ Q.T)
        else:
            W = ((rhs @ Q) / (lam + rho)) @ Q.T
        rho *= rho_growth
    mask &= ~dead[None, :]
    Wn = masked_least_squares(B, H, mask, Z, tol)
    D = Wn - W0
    loss = float(((D @ H) * D).sum() / 2)
    new = (Wn / s[None, :] * mask).to(weight.dtype)
    return SolveResult(new, mask, None, loss, percdamp)
