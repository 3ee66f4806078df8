"""Run pruned linear layers as sparse matrices, and turn them back into dense ones.

Decoding one token reads every weight once, so on CPU it is bound by memory traffic. A pruned
layer whose weights are exactly fp16 (as in a model loaded from a compact checkpoint) becomes

- :class:`BitmaskLinear`: a 1-bit mask per weight + the kept values in fp16 (2 bytes per kept
  weight + 1/8 byte per weight), or
- :class:`Csr16Linear`: the kept values in fp16 with 16-bit column indices (4 bytes per kept
  weight, no work per pruned weight: the faster one at low density),

both multiplied by the C kernels of :mod:`sparsegpt_utils.kernels` for one token, and expanded
into a scratch matrix for torch's GEMM for several. Other weights use :class:`SparseLinear`
(torch's CSR kernels, float32). ``sparsify_for_inference`` times the model's one-token step with
each group of layers (same shape and density) in each format, dense included, and keeps the
fastest, so no model gets slower than dense; ``half_dense`` also reads ``lm_head`` and the layers
left dense from fp16 (:class:`HalfLinear`).

On CUDA, layers whose mask is 2:4 (at most 2 kept in every 4 consecutive input weights) can
instead keep ``nn.Linear`` with a ``torch.sparse.to_sparse_semi_structured`` weight (fp16 /
bf16, sparse tensor cores); layers that cannot be converted stay as they are.

``sparsify_for_inference(model)`` and ``densify(model)`` work in place and return the model;
``densify`` gives back exactly the weights that went in.
"""

from __future__ import annotations

import inspect
import statistics
import time
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import kernels
from .models import MatrixView, get_adapter, pruned_linears

__all__ = [
    "BitmaskLinear",
    "Csr16Linear",
    "bytes_read",
    "step_seconds",
    "HalfLinear",
    "SparseLinear",
    "sparsify_for_inference",
    "densify",
    "inference_formats",
    "is_nm_sparse",
    "keep_faster",
    "layer_from_kept",
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

    @classmethod
    @torch.no_grad()
    def from_mask_values(cls, mask: torch.Tensor, values: torch.Tensor,
                         bias: torch.Tensor | None = None) -> SparseLinear:
        """From a bool mask [out, in] (CPU) and the kept values in row-major order, as float32:
        no dense weight needed."""
        rows, cols = mask.shape
        counts = mask.sum(1, dtype=torch.int64)
        if int(counts.sum()) != values.numel():
            raise ValueError(f"mask keeps {int(counts.sum())} weights but {values.numel()} values were given")
        crow = torch.zeros(rows + 1, dtype=torch.int32)
        crow[1:] = counts.cumsum(0)
        col = torch.arange(cols, dtype=torch.int32).expand(rows, cols)[mask]  # row-major
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow, col, values.detach().reshape(-1).float(), size=(rows, cols),
                                          dtype=torch.float32, check_invariants=False)
        return cls(csr, None if bias is None else bias.detach().float().clone())

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


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] → int32 [rows, ceil(cols / 32)]: bit b of word w is column 32 w + b."""
    rows, cols = mask.shape
    words = -(-cols // 32)
    padded = np.zeros((rows, words * 32), dtype=bool)
    padded[:, :cols] = mask.cpu().numpy()
    packed = np.packbits(padded, axis=1, bitorder="little")  # [rows, words * 4] bytes
    return torch.from_numpy(packed.view("<u4").astype(np.uint32).view(np.int32).copy())


class _PackedLinear(nn.Module):
    """What the fp16 sparse layers share: one token (decoding) runs the layer's matrix-vector
    kernel (``_gemv``) straight on the input's memory, with as little Python around it as
    possible (a model calls some 200 of them per token); several tokens (a prompt) decompress the
    weight into a float32 scratch matrix shared by all layers and multiply with torch's GEMM: the
    same products as the dense layer."""

    in_features: int
    out_features: int
    offsets: torch.Tensor  # int64 [out + 1]: where each row's kept weights begin
    storage: str  # what extra_repr says of the format
    _kernel_call = None  # (x pointer, y pointer) -> None, bound to this layer's buffers

    @classmethod
    def from_mask_values(cls, mask: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        w = linear.weight.detach().cpu()
        mask = w != 0
        return cls.from_mask_values(mask, w[mask], linear.bias)

    @property
    def density(self) -> float:
        return int(self.offsets[-1]) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.3f}, values={self.storage}")

    def _bind_kernel(self):
        """The compiled kernel with this layer's buffers bound: a function of the input's and the
        output's data pointers (threads as torch's setting at the call)."""
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ... may move the buffers
        self._kernel_call = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # a copy (deepcopy, pickle) binds its own buffers
        state = dict(self.__dict__)
        state.pop("_kernel_call", None)
        return state

    def __setattr__(self, name, value):  # a buffer replaced: bind again
        super().__setattr__(name, value)
        if name in self.__dict__.get("_buffers", ()):
            self.__dict__["_kernel_call"] = None

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_call is None:
            self._kernel_call = self._bind_kernel()
        y = torch.empty(self.out_features)
        self._kernel_call(x.data_ptr(), y.data_ptr())
        return y

    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight.copy_(self.dense_weight())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dtype == torch.float32 and kernels.available():
            return self._gemv(x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        y = nn.functional.linear(x.reshape(-1, self.in_features).float(), _scratch_weight(self), self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)


def _fp16_values(values: torch.Tensor, what: str) -> torch.Tensor:
    """The kept values as fp16, refusing values that fp16 would change."""
    half = values.detach().reshape(-1).to(torch.float16)
    if not torch.equal(half.to(values.dtype), values.detach().reshape(-1)):
        raise ValueError(f"{what} layers store fp16 values: these weights are not exactly representable "
                         "in fp16 (load the model from its compact checkpoint, which stores fp16)")
    return half


def _row_offsets(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64 [rows + 1]: where each row's kept values begin; checks the value count."""
    counts = mask.sum(1, dtype=torch.int64)
    if int(counts.sum()) != values.numel():
        raise ValueError(f"mask keeps {int(counts.sum())} weights but {values.numel()} values were given")
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return offsets


class BitmaskLinear(_PackedLinear):
    """``y = x Wᵀ + b`` with ``W`` [out_features, in_features] stored as a bitmask of its kept
    weights (1 bit per weight) and their values in IEEE fp16, computed in float32.

    One token (decoding) runs the bitmask matrix-vector kernel of :mod:`sparsegpt_utils.kernels`,
    which reads 2 bytes per kept weight + 1/8 byte per weight instead of 4 bytes per weight.
    Several tokens (a prompt) decompress the weight into a float32 scratch matrix and multiply
    it with torch's GEMM: the same products as the dense layer. Weights must be exactly
    representable in fp16 (as in a model loaded from a compact checkpoint, which stores fp16);
    then the outputs equal the dense layer's up to float32 summation order.
    """

    storage = "fp16+bitmask"

    def __init__(self, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = masks.shape[0], in_features
        self.register_buffer("masks", masks)  # int32 [out, words]
        self.register_buffer("values", values)  # int16 (fp16 bits) [kept + 32]
        self.register_buffer("offsets", offsets)  # int64 [out + 1]
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_mask_values(cls, mask: torch.Tensor, values: torch.Tensor,
                         bias: torch.Tensor | None = None) -> BitmaskLinear:
        """From a bool mask [out, in] and the kept values in row-major order (any float dtype,
        exactly representable in fp16) — no dense weight needed."""
        offsets = _row_offsets(mask, values)
        half = _fp16_values(values, "bitmask")
        padded = torch.cat([half, torch.zeros(32, dtype=torch.float16)]).view(torch.int16)
        b = None if bias is None else bias.detach().float().clone()
        return cls(_pack_mask(mask), padded, offsets, mask.shape[1], b)

    @torch.no_grad()
    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a dense float32 [out, in] matrix."""
        if kernels.available():
            return kernels.decompress(self.masks, self.values, self.offsets, self.out_features,
                                      self.in_features, out)
        mask, values = self.kept()
        w = torch.zeros(self.out_features, self.in_features) if out is None else out.zero_()
        w[mask] = values.float()
        return w

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool mask [out, in], kept values as fp16 in row-major order)."""
        bits = torch.from_numpy(np.unpackbits(self.masks.numpy().view(np.uint8), axis=1, bitorder="little"))
        return bits[:, : self.in_features].bool(), self.values[: int(self.offsets[-1])].view(torch.float16)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        words = self.masks.shape[1]
        if words * 32 != self.in_features:  # the kernel reads x in whole words of 32
            x = nn.functional.pad(x, (0, words * 32 - self.in_features))
        return super()._gemv(x)

    def _bind_kernel(self):
        fn = kernels.load().bitmask_gemv
        ptrs = kernels.pointers(self.masks, self.values, self.offsets, self.bias)
        rows, words = self.out_features, self.masks.shape[1]
        return lambda x, y: fn(x, *ptrs, y, rows, words, torch.get_num_threads())



class Csr16Linear(_PackedLinear):
    """``y = x Wᵀ + b`` with ``W`` [out_features, in_features] stored row by row as the 16-bit
    column indices of its kept weights and their IEEE fp16 values, computed in float32.

    4 bytes per kept weight and no work per pruned one, where :class:`BitmaskLinear` reads
    2 bytes per kept weight + 1/8 byte per weight and works through every 32 weights: the faster
    of the two at low densities. Needs ``in_features`` <= 65536 and fp16-exact weights; the
    outputs equal the dense layer's up to float32 summation order.
    """

    storage = "fp16+uint16 columns"

    def __init__(self, idx: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = offsets.numel() - 1, in_features
        self.register_buffer("idx", idx)  # int16 (uint16 column bits) [kept + 16]
        self.register_buffer("vals", vals)  # int16 (fp16 bits) [kept + 16]
        self.register_buffer("offsets", offsets)  # int64 [out + 1]
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_mask_values(cls, mask: torch.Tensor, values: torch.Tensor,
                         bias: torch.Tensor | None = None) -> Csr16Linear:
        """From a bool mask [out, in] and the kept values in row-major order (any float dtype,
        exactly representable in fp16) — no dense weight needed."""
        rows, cols = mask.shape
        if cols > 2**16:
            raise ValueError(f"csr16 layers index columns with 16 bits: in_features must be <= 65536, "
                             f"got {cols}")
        offsets = _row_offsets(mask, values)
        half = _fp16_values(values, "csr16")
        cols_kept = torch.arange(cols, dtype=torch.int32).expand(rows, cols)[mask.cpu()]
        idx = torch.from_numpy(np.concatenate([cols_kept.numpy().astype(np.uint16),
                                               np.zeros(16, np.uint16)]).view(np.int16))
        vals = torch.cat([half, torch.zeros(16, dtype=torch.float16)]).view(torch.int16)
        b = None if bias is None else bias.detach().float().clone()
        return cls(idx, vals, offsets, cols, b)

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        kept = int(self.offsets[-1])
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.offsets.diff())
        return rows, self.idx[:kept].numpy().view(np.uint16).astype(np.int64)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool mask [out, in], kept values as fp16 in row-major order)."""
        rows, cols = self._positions()
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool)
        mask[rows, torch.from_numpy(cols)] = True
        return mask, self.vals[: int(self.offsets[-1])].view(torch.float16)

    @torch.no_grad()
    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a dense float32 [out, in] matrix."""
        if kernels.available():
            return kernels.csr16_decompress(self.idx, self.vals, self.offsets, self.out_features,
                                            self.in_features, out)
        rows, cols = self._positions()
        w = torch.zeros(self.out_features, self.in_features) if out is None else out.zero_()
        w[rows, torch.from_numpy(cols)] = self.vals[: int(self.offsets[-1])].view(torch.float16).float()
        return w

    def _bind_kernel(self):
        fn, ptrs = kernels.load().csr16_gemv, kernels.pointers(self.idx, self.vals, self.offsets, self.bias)
        rows = self.out_features
        return lambda x, y: fn(x, *ptrs, y, rows, torch.get_num_threads())



_SCRATCH: dict[str, torch.Tensor] = {}


_HALF_BLOCK = 4 * 2**20  # weights per block of a HalfLinear's prompt product (16 MB in float32)


def _scratch(numel: int) -> torch.Tensor:
    """One float32 buffer shared by all sparse and fp16 layers (only one layer runs at a time),
    so that prompts cost no memory per layer."""
    buf = _SCRATCH.get("weight")
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH["weight"] = torch.empty(numel, dtype=torch.float32)
    return buf


def _scratch_weight(layer: _PackedLinear) -> torch.Tensor:
    """The layer's dense weight, in the shared scratch buffer."""
    need = layer.out_features * layer.in_features
    return layer.dense_weight(_scratch(need)[:need].view(layer.out_features, layer.in_features))


class HalfLinear(nn.Module):
    """A dense linear layer whose weight is stored in fp16 and computed in float32 (one token:
    the fp16 matrix-vector kernel, 2 bytes per weight instead of 4; several tokens: torch). For
    weights exactly representable in fp16, e.g. the ``lm_head`` of a model loaded from a compact
    checkpoint."""

    def __init__(self, weight16: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight16.shape
        self.register_buffer("weight16", weight16)  # int16 bits of fp16 [out, in]
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> HalfLinear:
        w = linear.weight.detach().cpu()
        half = w.to(torch.float16)
        if not torch.equal(half.to(w.dtype), w):
            raise ValueError("HalfLinear needs weights exactly representable in fp16")
        return cls(half.view(torch.int16).contiguous(),
                   None if linear.bias is None else linear.bias.detach().float().clone())

    @property
    def density(self) -> float:
        nonzero = (self.weight16 != 0) & (self.weight16 != -32768)  # +0.0 and -0.0
        return int(nonzero.sum()) / self.weight16.numel()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight.copy_(self.weight16.view(torch.float16).float())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 1 and kernels.available():
            y = kernels.half_gemv(x2[0].contiguous(), self.weight16)[None]
            if self.bias is not None:
                y = y + self.bias
        elif torch.is_grad_enabled() and x2.requires_grad:
            y = nn.functional.linear(x2, self.weight16.view(torch.float16).float(), self.bias)
        else:  # block by block of output rows through the shared scratch: no float32 copy of W
            y = torch.empty(x2.shape[0], self.out_features)
            w16 = self.weight16.view(torch.float16)
            step = max(1, _HALF_BLOCK // self.in_features)
            scratch = _scratch(min(step, self.out_features) * self.in_features)
            for r in range(0, self.out_features, step):
                n = min(step, self.out_features - r)
                w = scratch[: n * self.in_features].view(n, self.in_features)
                w.copy_(w16[r:r + n])
                y[:, r:r + n] = x2 @ w.T
            if self.bias is not None:
                y += self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive weights along the input dimension has at most
    ``n`` nonzeros (and the width is a multiple of ``m``)."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


SPARSE_TYPES = (SparseLinear, BitmaskLinear, Csr16Linear, HalfLinear)
KERNELS = ("auto", "bitmask", "csr16", "csr")
FORMATS = {"bitmask": BitmaskLinear, "csr16": Csr16Linear, "csr": SparseLinear}
# Without timing, "auto" takes csr16 for layers keeping at most this fraction and the bitmask
# above it. By bytes the two cross at 1/16 (4 d = 2 d + 1/8), but per-row work weighs more for
# the bitmask at low density: in decoding smollm2-135m they were about equal at density 0.1 and
# the bitmask clearly faster at 0.3 (bench/README.md).
CSR16_MAX_DENSITY = 0.15


def _decoder_linears(model: nn.Module):
    """(parent module, attribute name, full name, module) for every linear-like module of the
    decoder blocks (nn.Linear or a sparse layer)."""
    adapter = get_adapter(model)
    for i, block in enumerate(adapter.blocks(model)):
        for name, parent in block.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, (nn.Linear, *SPARSE_TYPES)):
                    full = f"{adapter.blocks_path}.{i}.{name + '.' if name else ''}{attr}"
                    yield parent, attr, full, child


def _is_semi_structured(t: torch.Tensor) -> bool:
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return cls is not None and isinstance(t, cls)


def _fp16_exact(w: torch.Tensor) -> bool:
    return bool(torch.equal(w.to(torch.float16).to(w.dtype), w))


@torch.no_grad()
def step_seconds(model: nn.Module, repeats: int = 5) -> float:
    """Seconds of the compute of one decoding step: a one-token forward pass of ``model`` (no
    cache; every weight is read once, as in decoding) — the fastest of ``repeats`` after a warm-up
    call, since other work on the machine can only slow it down."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return min(times)


def _is_candidate(kept: int, numel: int, max_density: float) -> bool:
    """The density rule: a layer may go sparse when it keeps at most ``max_density`` of its
    weights (within one weight: a pruned layer's kept count is a rounded fraction) and not all."""
    return not (kept > max_density * numel + 1 or kept == numel)


NOISE_MARGIN = 0.02  # of a step's time: what a format reading more memory must win by


def bytes_read(layer: nn.Module) -> float:
    """Bytes of weights one token's product with ``layer`` reads: float32 4 per weight, fp16 2,
    bitmask 2 per kept weight + 1/8 per weight, csr16 4 per kept weight, CSR 8 per kept weight."""
    n = layer.in_features * layer.out_features
    if isinstance(layer, BitmaskLinear):
        return 2 * layer.density * n + n / 8
    if isinstance(layer, Csr16Linear):
        return 4 * layer.density * n
    if isinstance(layer, SparseLinear):
        return 8 * layer.density * n
    if isinstance(layer, HalfLinear):
        return 2 * n
    return layer.weight.element_size() * n


class _Choice:
    """One layer's options: format → module, or a function that builds it (built when tried)."""

    def __init__(self, parent: nn.Module, attr: str, options: dict, key: tuple):
        self.parent, self.attr, self.options, self.key = parent, attr, options, key

    def use(self, fmt: str) -> None:
        option = self.options[fmt]
        if callable(option) and not isinstance(option, nn.Module):
            option = self.options[fmt] = option()
        setattr(self.parent, self.attr, option)

    def drop(self, fmt: str) -> None:
        if isinstance(self.options[fmt], nn.Module):
            self.options[fmt] = None  # free it: the choice is made


@torch.no_grad()
def _choose_in_model(model: nn.Module, choices: list[_Choice], measure: bool, rounds: int = 5) -> None:
    """Put each layer in its fastest format, measured in the model itself: layers of the same
    shape, density (to 1 place) and options form a group; the group's formats are tried in turn,
    ``rounds`` times, for all its layers at once, and the model's one-token step timed
    (:func:`step_seconds`), the rest of the model as chosen so far. Each format's step time is
    divided by that of the format reading the fewest bytes (:func:`bytes_read`) in the same
    round; the format with the lowest median ratio stays if it beats the lean one by more than
    :data:`NOISE_MARGIN`, else the lean one stays. Timing inside the model measures what decoding costs (each
    layer's weights arrive from memory while the model runs), which single layers timed from a
    flushed cache did not predict. ``measure`` False: every layer takes its first option."""
    for c in choices:
        c.use(next(iter(c.options)))
    if not measure:
        return
    groups: dict[tuple, list[_Choice]] = {}
    for c in choices:
        groups.setdefault(c.key, []).append(c)
    for members in groups.values():
        formats = list(members[0].options)
        if len(formats) < 2:
            continue
        # the formats take turns over several rounds, and each is compared with the format
        # reading the fewest bytes within the same round: a slow spell of the machine then
        # falls on both sides of a comparison; the median over the rounds decides
        times: dict[str, list[float]] = {fmt: [] for fmt in formats}
        for _ in range(rounds):
            for fmt in formats:
                for c in members:
                    c.use(fmt)
                times[fmt].append(step_seconds(model, repeats=3))
        lean = min(formats, key=lambda fmt: bytes_read(members[0].options[fmt]))
        ratio = {fmt: statistics.median(a / b for a, b in zip(t, times[lean])) for fmt, t in times.items()}
        winner = min(formats, key=ratio.get)
        # a format that reads more memory must win by a clear margin, not by the machine's noise
        if ratio[winner] > 1 - NOISE_MARGIN:
            winner = lean
        for c in members:
            c.use(winner)
            for fmt in formats:
                if fmt != winner:
                    c.drop(fmt)


def _check_choice_args(kernel: str, max_density) -> None:
    if isinstance(max_density, bool) or not isinstance(max_density, (int, float)) \
            or not 0 <= max_density <= 1:
        raise ValueError(f"max_density must be a number in [0, 1] (kept fraction), got {max_density!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel in ("bitmask", "csr16") and not kernels.available():
        raise ValueError(f"kernel={kernel!r} needs the compiled CPU kernels: {kernels.build_error()}")


def _candidates(kernel: str, fp16_exact: bool, density: float, cols: int, measure: bool) -> list[str]:
    """The sparse formats to consider for one layer, preferred first. "auto": bitmask and csr16
    where the kernels exist and the weights are exactly fp16 (both timed with ``measure``, else
    csr16 up to :data:`CSR16_MAX_DENSITY`, the bitmask above), else CSR."""
    if kernel != "auto":
        return [kernel]
    if not (kernels.available() and fp16_exact):
        return ["csr"]
    order = ["csr16", "bitmask"] if density <= CSR16_MAX_DENSITY else ["bitmask", "csr16"]
    if cols > 2**16:
        order.remove("csr16")
    return order if measure else order[:1]


@torch.no_grad()
def sparsify_for_inference(
    model: nn.Module, kernel: str = "auto", max_density: float = 1.0, measure: bool = True,
    half_dense: bool = False, semi_structured: bool | str = "auto",
) -> nn.Module:
    """Convert the pruned linear layers of ``model`` in place to sparse kernels; returns it.

    kernel: ``"bitmask"`` (fp16 values + a 1-bit mask, :class:`BitmaskLinear`), ``"csr16"``
        (fp16 values + 16-bit column indices, :class:`Csr16Linear`) — both need weights exactly
        representable in fp16, as a model loaded from a compact checkpoint has, and the compiled
        kernels —, ``"csr"`` (torch's CSR kernels on float32, :class:`SparseLinear`), or
        ``"auto"`` (bitmask or csr16 where possible — with ``measure`` the faster, else csr16 up
        to density :data:`CSR16_MAX_DENSITY` —, else CSR).
    max_density: only layers keeping at most this fraction are candidates; in [0, 1].
    measure: time one-token products of the dense layer and each sparse candidate, from a cold
        cache, and keep the fastest (layers of the same shape and density are timed once), so
        no layer gets slower; False converts every candidate layer.
    half_dense: also store the layers that stay dense, and ``lm_head``, in fp16 (computed in
        float32, :class:`HalfLinear`) where their weights are exactly fp16 — the same numbers,
        half the bytes read per token. This gain comes from 16-bit storage, not from sparsity.
    semi_structured: on CUDA, give 2:4 layers a ``to_sparse_semi_structured`` weight
        ("auto": when the model is on CUDA; True: required, an error without CUDA; False: never).
    Embeddings and norms stay as they are. ``inference_formats(model)`` lists what each layer became.
    """
    _check_choice_args(kernel, max_density)
    if semi_structured not in (True, False, "auto"):
        raise ValueError(f"semi_structured must be True, False or 'auto', got {semi_structured!r}")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if semi_structured is True and not (on_cuda and hasattr(torch.sparse, "to_sparse_semi_structured")):
        raise ValueError("semi_structured=True needs the model on a CUDA device (2:4 sparse tensor cores)")
    use_semi = semi_structured is True or (semi_structured == "auto" and on_cuda)
    conv1d = [n for n, m in pruned_linears(model).items() if isinstance(m, MatrixView) and m.transposed]
    if conv1d:
        raise ValueError(f"sparse inference converts nn.Linear layers; {len(conv1d)} pruned layers of this "
                         f"model are GPT-2 style Conv1D (weight [in, out]), e.g. {conv1d[0]}: not supported")
    layers = list(_decoder_linears(model))
    for _parent, _attr, name, layer in layers:
        w = layer.weight if isinstance(layer, nn.Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype not in (
                torch.float32, torch.float64):
            raise ValueError(f"{name}: sparse layers on CPU compute in float32; the model is {w.dtype}: "
                             "convert it with .float() first")

    if half_dense and kernels.available():
        _halve_dense_layers(model, blocks=False)  # lm_head first: the timings see the final model
    choices = []
    for parent, attr, name, layer in layers:
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
        if w.is_cuda:
            continue
        kept = torch.count_nonzero(w).item()
        if not _is_candidate(kept, w.numel(), max_density):
            continue
        formats = _candidates(kernel, _fp16_exact(w), kept / w.numel(), w.shape[1], measure)
        options = {formats[0]: FORMATS[formats[0]].from_linear(layer)}
        options.update({f: (lambda f=f, layer=layer: FORMATS[f].from_linear(layer)) for f in formats[1:]})
        options["dense"] = _dense_option(layer, half_dense)
        choices.append(_Choice(parent, attr, options, _group_key(w.shape, kept, options)))
    _choose_in_model(model, choices, measure)
    if half_dense and kernels.available():
        _halve_dense_layers(model)
    return model


def _group_key(shape, kept: int, options: dict) -> tuple:
    return tuple(shape), round(kept / (shape[0] * shape[1]), 1), tuple(options)


def _dense_option(layer: nn.Module, half_dense: bool):
    """The layer's dense form as decoding would run it — fp16 storage with ``half_dense`` where
    exact, else float32 — (built when tried)."""
    def build():
        dense = layer if isinstance(layer, nn.Linear) else layer.to_linear()
        if half_dense and kernels.available() and _fp16_exact(dense.weight.detach()):
            return HalfLinear.from_linear(dense)
        return dense
    return build


@torch.no_grad()
def layer_from_kept(mask: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None,
                    kernel: str = "auto", max_density: float = 1.0) -> nn.Module:
    """The inference layer for a pruned weight given as its bool mask [out, in] and kept values
    (row-major), by the rule of :func:`sparsify_for_inference` without the timing: a
    :class:`BitmaskLinear` or :class:`Csr16Linear` (``kernel`` "bitmask" / "csr16", or "auto"
    where the compiled kernels exist and the values are exactly fp16: csr16 up to density
    :data:`CSR16_MAX_DENSITY`) or a :class:`SparseLinear` ("csr", or "auto" otherwise), built
    with no dense weight; a dense float32 ``nn.Linear`` where the layer keeps more than
    ``max_density`` of its weights, or all of them. Zero values are dropped from the mask, as
    :func:`sparsify_for_inference` keeps the nonzero weights. Time the result against dense with
    :func:`keep_faster`."""
    _check_choice_args(kernel, max_density)
    rows, cols = mask.shape
    if values.numel() != int(mask.sum()):
        raise ValueError(f"mask keeps {int(mask.sum())} weights but {values.numel()} values were given")
    nonzero = values != 0
    if not bool(nonzero.all()):
        mask = mask.clone()
        mask[mask.clone()] = nonzero
        values = values[nonzero]
    if not _is_candidate(values.numel(), rows * cols, max_density):
        layer = nn.Linear(cols, rows, bias=bias is not None, device="meta")
        w = torch.zeros(rows, cols)
        w[mask] = values.float()
        layer.weight = nn.Parameter(w)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone())
        return layer
    fmt = _candidates(kernel, _fp16_exact(values), values.numel() / (rows * cols), cols, measure=False)[0]
    return FORMATS[fmt].from_mask_values(mask, values, bias)


@torch.no_grad()
def keep_faster(model: nn.Module, max_density: float = 1.0, measure: bool = True,
                half_dense: bool = False, kernel: str = "auto") -> nn.Module:
    """The choice of :func:`sparsify_for_inference` for a model whose pruned layers are sparse
    already (:class:`BitmaskLinear` / :class:`Csr16Linear` / :class:`SparseLinear`, e.g. from
    ``checkpoint.load_pruned(..., sparse=True)``): a layer keeping more than ``max_density`` (or
    all) of its weights becomes a dense ``nn.Linear`` again; with ``measure``, its one-token
    product is timed against its dense equivalent's and, for ``kernel`` "auto" and fp16 layers,
    against the other fp16 format (both built from the layer for the timing only, once per
    shape and density), and the fastest is kept; ``half_dense`` then stores the dense layers and
    ``lm_head`` in fp16 where exact (:class:`HalfLinear`). In place; returns the model."""
    _check_choice_args(kernel, max_density)
    if half_dense and kernels.available():
        _halve_dense_layers(model, blocks=False)  # lm_head first: the timings see the final model
    choices = []
    for parent, attr, _name, layer in list(_decoder_linears(model)):
        if not isinstance(layer, (BitmaskLinear, Csr16Linear, SparseLinear)):
            continue
        fmt = next(f for f, cls in FORMATS.items() if isinstance(layer, cls))
        numel = layer.in_features * layer.out_features
        kept = round(layer.density * numel)
        if not _is_candidate(kept, numel, max_density):
            setattr(parent, attr, layer.to_linear())
            continue
        options = {fmt: layer}
        if kernel == "auto" and fmt != "csr" and measure:
            other = _candidates("auto", True, kept / numel, layer.in_features, True)
            options.update({f: (lambda f=f, src=layer: FORMATS[f].from_mask_values(*src.kept(), src.bias))
                            for f in other if f != fmt})
        options["dense"] = _dense_option(layer, half_dense)
        shape = (layer.out_features, layer.in_features)
        choices.append(_Choice(parent, attr, options, _group_key(shape, kept, options)))
    _choose_in_model(model, choices, measure)
    if half_dense and kernels.available():
        _halve_dense_layers(model)
    return model


def _halve_dense_layers(model: nn.Module, blocks: bool = True) -> None:
    """Every dense nn.Linear of the blocks (``blocks``), and ``lm_head``, → :class:`HalfLinear`
    where exact."""
    targets = [(parent, attr, layer) for parent, attr, _n, layer in _decoder_linears(model)
               if blocks and isinstance(layer, nn.Linear) and not _is_semi_structured(layer.weight)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        targets.append((model, _output_attr(model, head), head))
    for parent, attr, layer in targets:
        if attr is not None and layer.weight.device.type == "cpu" and _fp16_exact(layer.weight.detach()):
            setattr(parent, attr, HalfLinear.from_linear(layer))


def _output_attr(model: nn.Module, head: nn.Module) -> str | None:
    for attr, child in model.named_children():
        if child is head:
            return attr
    return None


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify_for_inference` in place: every sparse or fp16 layer back to a dense
    ``nn.Linear`` with the same weights; returns the model."""
    for parent, attr, _name, layer in list(_decoder_linears(model)):
        if isinstance(layer, SPARSE_TYPES):
            setattr(parent, attr, layer.to_linear())
        elif _is_semi_structured(layer.weight):
            layer.weight = nn.Parameter(layer.weight.to_dense())
    for parent in [model, *model.modules()]:
        for attr, child in list(parent.named_children()):
            if isinstance(child, HalfLinear):
                setattr(parent, attr, child.to_linear())
    return model


def inference_formats(model: nn.Module) -> pd.DataFrame:
    """One row per decoder linear layer: its storage format (``dense``, ``fp16``, ``bitmask``,
    ``csr16``, ``csr``, ``semi_structured_2:4``), density and sparsity."""
    rows = []
    for parent, attr, name, layer in _decoder_linears(model):
        child = getattr(parent, attr)
        if isinstance(child, BitmaskLinear):
            fmt, density = "bitmask", child.density
        elif isinstance(child, Csr16Linear):
            fmt, density = "csr16", child.density
        elif isinstance(child, SparseLinear):
            fmt, density = "csr", child.density
        elif isinstance(child, HalfLinear):
            fmt, density = "fp16", child.density
        else:
            w = layer.weight
            semi = _is_semi_structured(w)
            fmt = "semi_structured_2:4" if semi else "dense"
            dense = w.to_dense() if semi else w
            density = torch.count_nonzero(dense).item() / dense.numel()
        rows.append({"layer": name, "format": fmt, "density": density, "sparsity": 1 - density})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# generation with a KV cache, and the `generate` command
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_decode(model: nn.Module, ids: torch.Tensor, max_new_tokens: int):
    """Greedy continuation of ``ids`` [1, n] with a KV cache, one step at a time: yields
    (token id, seconds) — the first step is the prompt (prefill), each later one a single token."""
    # transformers renamed the cache argument (past_key_values → cache) within version 5
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, step_ids = None, ids
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=step_ids, use_cache=True, **{key: past})
        token = int(out.logits[0, -1].argmax())
        seconds = time.perf_counter() - t0
        past = out.get("cache", None) if key == "cache" else out.past_key_values
        step_ids = torch.tensor([[token]])
        yield token, seconds


def compare_decoding(dense: nn.Module, sparse: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> dict:
    """Dense and sparse greedy decoding of the same prompt, interleaved step by step in this
    process (the order alternating), so that both see the same machine. Tokens per second are
    1 / median decode-step time (the prompt step excluded); ``speedup`` is their ratio;
    ``agreement`` is the fraction of positions where the two greedy tokens are the same."""
    gens = {"dense": greedy_decode(dense, ids, max_new_tokens),
            "sparse": greedy_decode(sparse, ids, max_new_tokens)}
    tokens = {k: [] for k in gens}
    seconds = {k: [] for k in gens}
    for step in range(max_new_tokens):
        for name in (("dense", "sparse") if step % 2 == 0 else ("sparse", "dense")):
            token, secs = next(gens[name])
            tokens[name].append(token)
            seconds[name].append(secs)
    decode = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in seconds.items()}
    same = sum(a == b for a, b in zip(tokens["dense"], tokens["sparse"]))
    return {"dense_tokens_per_s": 1 / decode["dense"], "sparse_tokens_per_s": 1 / decode["sparse"],
            "speedup": decode["dense"] / decode["sparse"], "agreement": same / max_new_tokens,
            "dense_prefill_s": seconds["dense"][0], "sparse_prefill_s": seconds["sparse"][0],
            "prompt_tokens": ids.shape[1], "new_tokens": max_new_tokens,
            "dense_tokens": tokens["dense"], "sparse_tokens": tokens["sparse"]}


def add_cli_arguments(parser) -> None:
    """``generate``: greedy generation from a compact checkpoint with sparse CPU kernels."""
    parser.add_argument("--checkpoint", required=True, help="folder written by prune --save")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (>= 1)")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also decode with the dense model, interleaved, and report both speeds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--kernel", default="auto", choices=KERNELS,
                        help="sparse format of the pruned layers")
    parser.add_argument("--half-dense", action="store_true",
                        help="also compute the dense layers and lm_head from fp16 storage")
    parser.add_argument("--json", help="write the result object to this file")


def cli_main(args) -> int:
    import json
    import resource

    from .checkpoint import load_pruned
    from .results import write_json_atomic

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    # the pruned layers are built sparse from their stored form: no dense copy of them is made
    sparse, tok = load_pruned(args.checkpoint, sparse=True, kernel=args.kernel, half_dense=args.half_dense)
    if tok is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: the checkpoint has no tokenizer for the prompt")
    load_report = sparse.sparse_load_report
    # the dense model to compare with comes from the ordinary (dense) load
    dense = load_pruned(args.checkpoint, dtype=torch.float32)[0] if args.compare_dense else None
    formats = inference_formats(sparse)["format"].value_counts().to_dict()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if dense is not None:
        result = compare_decoding(dense, sparse, ids, args.max_new_tokens)
        new = result.pop("sparse_tokens")
        dense_new = result.pop("dense_tokens")
        result["dense_text"] = tok.decode(dense_new, skip_special_tokens=True)
    else:
        steps = list(greedy_decode(sparse, ids, args.max_new_tokens))
        new = [t for t, _ in steps]
        decode = [s for _, s in steps[1:]] or [steps[0][1]]
        result = {"sparse_tokens_per_s": 1 / statistics.median(decode), "sparse_prefill_s": steps[0][1],
                  "prompt_tokens": ids.shape[1], "new_tokens": len(new)}
    result.update(text=tok.decode(new, skip_special_tokens=True), formats=formats,
                  threads=torch.get_num_threads(), checkpoint=str(args.checkpoint),
                  load_peak_rss_increase_mb=load_report["peak_rss_increase_mb"],
                  load_seconds=load_report["seconds"],
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps(result, indent=2, default=str))
    return 0
