"""Run pruned linear layers as sparse matrices, and turn them back into dense ones.

On CPU, a pruned layer whose density (kept fraction) is at most ``max_density`` becomes a
:class:`SparseLinear` holding its weight in CSR form (int32 indices) and multiplying with
``torch.sparse`` (MKL on x86). Decoding reads every weight once per token, so it is bound by
memory traffic: CSR moves 8 bytes per kept weight (value + column index) against 4 bytes per
weight dense. With the matrix-vector kernel, one-token decoding gained from density 0.5 down
on the machine measured (``bench/bench_inference.py``); the default threshold 0.3 also
covers inputs of several tokens, which use the slower sparse × dense kernel.

On CUDA, layers whose mask is 2:4 (at most 2 kept in every 4 consecutive input weights) can
instead keep ``nn.Linear`` with a ``torch.sparse.to_sparse_semi_structured`` weight (fp16 /
bf16, sparse tensor cores); layers that cannot be converted stay as they are.

``sparsify_for_inference(model)`` and ``densify(model)`` work in place and return the model;
``densify`` gives back exactly the weights that went in.
"""

from __future__ import annotations

import warnings

import pandas as pd
import torch
from torch import nn

from .models import get_adapter

__all__ = [
    "SparseLinear",
    "sparsify_for_inference",
    "densify",
    "inference_formats",
    "is_nm_sparse",
]


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` [out_features, in_features] stored as a CSR tensor.

    Inputs are [..., in_features] in the weight's dtype; outputs [..., out_features]. For
    inference only (no gradient flows into the weight).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.layout != torch.sparse_csr:
            raise ValueError(f"weight must be a sparse CSR tensor, got layout {weight.layout}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        w = linear.weight.detach()
        if w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"CSR layers on CPU need float32 or float64 weights, got {w.dtype}")
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
            # int32 indices: half the index traffic of int64, and MKL's fast path
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(),
                size=w.shape, dtype=w.dtype, device=w.device, check_invariants=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(csr, bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        w = self.weight
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=w.device, dtype=w.dtype)
        layer.weight.copy_(w.to_dense())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    @property
    def density(self) -> float:
        return self.weight.values().numel() / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)
        if x2.shape[0] == 1:  # one token (decoding): the sparse matrix-vector kernel, ~2x faster
            y = torch.mv(self.weight, x2[0])[None]
        else:  # CSR [out, in] @ dense [in, tokens]: the sparse operand must come first
            y = (self.weight @ x2.T.contiguous()).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.3f}")


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive weights along the input dimension has at most
    ``n`` nonzeros (and the width is a multiple of ``m``)."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def _decoder_linears(model: nn.Module):
    """(parent module, attribute name, full name, module) for every linear-like module of the
    decoder blocks (nn.Linear or SparseLinear)."""
    adapter = get_adapter(model)
    for i, block in enumerate(adapter.blocks(model)):
        for name, parent in block.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, (nn.Linear, SparseLinear)):
                    full = f"{adapter.blocks_path}.{i}.{name + '.' if name else ''}{attr}"
                    yield parent, attr, full, child


def _is_semi_structured(t: torch.Tensor) -> bool:
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return cls is not None and isinstance(t, cls)


@torch.no_grad()
def sparsify_for_inference(
    model: nn.Module, max_density: float = 0.3, semi_structured: bool | str = "auto",
) -> nn.Module:
    """Convert the pruned linear layers of ``model`` in place to sparse kernels; returns it.

    max_density: a layer whose kept fraction is at most this becomes a CSR
        :class:`SparseLinear` (dense layers are faster above it); in [0, 1].
    semi_structured: on CUDA, give 2:4 layers a ``to_sparse_semi_structured`` weight first
        ("auto": when the model is on CUDA; True: required, an error without CUDA; False: never).
        Untested without a GPU.
    Embeddings, norms and ``lm_head`` stay dense.
    """
    if isinstance(max_density, bool) or not isinstance(max_density, (int, float)) \
            or not 0 <= max_density <= 1:
        raise ValueError(f"max_density must be a number in [0, 1] (kept fraction), got {max_density!r}")
    if semi_structured not in (True, False, "auto"):
        raise ValueError(f"semi_structured must be True, False or 'auto', got {semi_structured!r}")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if semi_structured is True and not (on_cuda and hasattr(torch.sparse, "to_sparse_semi_structured")):
        raise ValueError("semi_structured=True needs the model on a CUDA device (2:4 sparse tensor cores)")
    use_semi = semi_structured is True or (semi_structured == "auto" and on_cuda)
    for _parent, _attr, name, layer in _decoder_linears(model):
        w = layer.weight
        if isinstance(layer, nn.Linear) and w.device.type == "cpu" and w.dtype not in (
                torch.float32, torch.float64):
            raise ValueError(f"{name}: CSR layers on CPU need float32 or float64 weights (torch.sparse "
                             f"has no {w.dtype} CPU kernel); convert the model with .float() first")

    for parent, attr, name, layer in list(_decoder_linears(model)):
        if not isinstance(layer, nn.Linear) or _is_semi_structured(layer.weight):
            continue
        w = layer.weight
        if use_semi and w.is_cuda and is_nm_sparse(w, 2, 4):
            try:
                layer.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach()),
                                            requires_grad=False)
                continue
            except (RuntimeError, ValueError, TypeError) as err:  # dtype or shape not supported
                warnings.warn(f"{name}: kept dense, 2:4 semi-structured conversion failed: {err}",
                              RuntimeWarning, stacklevel=2)
        # within one weight of max_density: a pruned layer's kept count is a rounded fraction
        if torch.count_nonzero(w).item() <= max_density * w.numel() + 1:
            setattr(parent, attr, SparseLinear.from_linear(layer))
    return model


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify_for_inference` in place: every sparse layer back to a dense
    ``nn.Linear`` with the same weights; returns the model."""
    for parent, attr, _name, layer in list(_decoder_linears(model)):
        if isinstance(layer, SparseLinear):
            setattr(parent, attr, layer.to_linear())
        elif _is_semi_structured(layer.weight):
            layer.weight = nn.Parameter(layer.weight.to_dense())
    return model


def inference_formats(model: nn.Module) -> pd.DataFrame:
    """One row per decoder linear layer: its storage format (``dense``, ``csr``,
    ``semi_structured_2:4``), density and sparsity."""
    rows = []
    for _parent, _attr, name, layer in _decoder_linears(model):
        if isinstance(layer, SparseLinear):
            fmt, density = "csr", layer.density
        else:
            w = layer.weight
            semi = _is_semi_structured(w)
            fmt = "semi_structured_2:4" if semi else "dense"
            dense = w.to_dense() if semi else w
            density = torch.count_nonzero(dense).item() / dense.numel()
        rows.append({"layer": name, "format": fmt, "density": density, "sparsity": 1 - density})
    return pd.DataFrame(rows)
