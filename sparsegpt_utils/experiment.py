"""One pruning experiment end to end — load, calibrate, prune, evaluate, save, record — as
the command line and notebook 1 run it.

An :class:`Experiment` is composed of the pipeline's own configs: what to do to the weights
(:class:`~sparsegpt_utils.prune.PruneConfig`), the calibration text (:class:`CalibConfig`), the
evaluation (:class:`EvalConfig`) and where results go (:class:`OutputConfig`). Each config
checks itself when it is made, so a bad setting fails with a one-line message naming it before
any model loads. :meth:`Experiment.from_settings` builds one from a flat mapping of dotted
names (``"prune.percdamp"``, ``"calib.samples"``, ...): the command line's arguments and
notebook 1's parameters both go through it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import resource
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ._version import versions
from .data import (
    TEXT_SOURCES,
    DataFallbackWarning,
    TextSource,
    calibration_text,
    calibration_windows,
    eval_text,
    eval_tokens,
)
from .evaluate import density_report, overall_density, perplexity
from .mixed_precision import MixedPrecisionConfig
from .models import BUILTIN_MODELS, load_model, model_seqlen, resolve_dtype
from .prune import PruneConfig, PruneResult, prune_model, prune_setting_keys
from .quant import QuantSpec
from .results import append_csv_row, write_json_atomic
from .solver import nm_text
from .tasks import TasksUnavailableError, parse_tasks, task_row, zero_shot

__all__ = ["CalibConfig", "EvalConfig", "OutputConfig", "Experiment", "InputError", "run_experiment",
           "evaluate_model", "resolve_texts", "resolve_device", "prune_config_from_settings",
           "check_text_source", "check_nm_blocks", "loading", "peak_rss_mb", "nm_text"]


class InputError(ValueError):
    """An input that cannot be read: ``parameter`` (``model``, ``calib``, ``eval``,
    ``checkpoint``) names the setting, ``value`` the path or name given, ``reason`` what is wrong."""

    def __init__(self, parameter: str, value, reason: str):
        self.parameter, self.value = parameter, value
        self.reason = " ".join(line.strip() for line in str(reason).splitlines() if line.strip())
        super().__init__(f"{parameter} {value}: {self.reason}")


@contextlib.contextmanager
def loading(parameter: str, value) -> Iterator[None]:
    """Turn an error raised while reading ``value`` (an OSError, a ValueError such as a JSON or
    UTF-8 decoding error) into an :class:`InputError` naming ``parameter`` and ``value``."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError) as err:
        reason = str(err) or type(err).__name__
        path = getattr(err, "path", None)  # TextSourceError: "<path>: <reason>"
        if path is not None and reason.startswith(f"{path}: "):
            reason = reason[len(f"{path}: "):]
        raise InputError(parameter, value, reason) from err


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """``"auto"``: ``"cuda"`` when a GPU is present, else ``"cpu"``. An asked-for device must
    exist here; raises ValueError naming it otherwise."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is available here: "
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"here (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but MPS is not available here")
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return str(device)


def check_text_source(parameter: str, source: str) -> str:
    """A text source must be a known name or an existing file; raises :class:`InputError`
    naming ``parameter`` otherwise. (Its content is checked when it is read, before any model
    loads: :func:`run_experiment` reads the texts first.)"""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{parameter} must be one of {TEXT_SOURCES} or a text file path, got {source!r}")
    if source not in TEXT_SOURCES and not Path(source).expanduser().is_file():
        raise InputError(parameter, source, f"no such file, and not one of {TEXT_SOURCES}")
    return source


def _check_int(name: str, value, lo: int, none_means: str | None = None):
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        also = f" or None ({none_means})" if none_means else ""
        raise ValueError(f"{name} must be an integer >= {lo}{also}, got {value!r}")


@dataclass
class CalibConfig:
    """Calibration windows: ``samples`` windows of ``seqlen`` tokens from ``source`` (a name of
    :data:`~sparsegpt_utils.data.TEXT_SOURCES` or a text file), drawn with ``seed``.
    ``seqlen`` None: 2048 tokens, or the model's maximum if smaller. ``fallback``: where a
    named source is found nowhere (data folder, hub), calibrate on the ``stdlib`` text instead,
    saying so (the result records the text used)."""

    source: str = "c4"
    samples: int = 128
    seqlen: int | None = None
    seed: int = 0
    fallback: bool = False

    def __post_init__(self):
        check_text_source("calib", self.source)
        _check_int("calib_samples", self.samples, 1)
        _check_int("seqlen", self.seqlen, 2, "2048 or the model's maximum")
        _check_int("seed", self.seed, 0)


@dataclass
class EvalConfig:
    """Perplexity on ``source`` (None: no evaluation) over its first ``windows`` windows (None:
    all) of ``seqlen`` tokens (None: the calibration window); ``dense``: the dense model too;
    ``tasks``: zero-shot task names (lm-evaluation-harness; result keys ``acc_<task>``), over
    their first ``tasks_limit`` documents (None: all), with task YAML folders ``tasks_path``
    searched first; ``fallback`` as in :class:`CalibConfig`."""

    source: str | None = "wikitext2"
    windows: int | None = None
    seqlen: int | None = None
    dense: bool = False
    tasks: tuple[str, ...] = ()
    tasks_limit: int | None = None
    tasks_path: tuple[str, ...] = ()
    fallback: bool = False

    def __post_init__(self):
        if self.source is not None:
            check_text_source("eval", self.source)
        _check_int("eval_windows", self.windows, 1, "all windows")
        _check_int("eval_seqlen", self.seqlen, 2, "the calibration window")
        self.tasks = parse_tasks(self.tasks)
        _check_int("tasks_limit", self.tasks_limit, 1, "every document")
        self.tasks_path = (self.tasks_path,) if isinstance(self.tasks_path, (str, Path)) else \
            tuple(self.tasks_path or ())
        for folder in self.tasks_path:
            if not Path(folder).expanduser().is_dir():
                raise InputError("tasks_path", folder, "not a folder of task YAML files")
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise TasksUnavailableError("zero-shot tasks need lm-evaluation-harness: "
                                        "pip install 'sparsegpt-utils[lmeval]' (or pip install lm-eval)")


@dataclass
class OutputConfig:
    """Where a run's results go: ``save`` a checkpoint folder, ``json`` one result object,
    ``csv`` a table the result is appended to as one row (None: not written)."""

    save: str | None = None
    json: str | None = None
    csv: str | None = None

    def __post_init__(self):
        for name in ("save", "json", "csv"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"output {name} must be a path or None, got {value!r}")
            if value is not None:
                setattr(self, name, str(value))


def _check_model_name(model) -> None:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a built-in name, a local folder or a hub id, got {model!r}")
    if model in BUILTIN_MODELS or Path(model).expanduser().is_dir():
        return
    if "/" not in model or model.startswith(("/", ".", "~")):
        raise InputError("model", model, f"not a built-in ({', '.join(sorted(BUILTIN_MODELS))}), "
                                         "a local folder, or a hub id of the form org/name")


def check_nm_blocks(prune: PruneConfig) -> PruneConfig:
    """An N:M pattern is chosen every M columns inside the lazy-update block B, so B must be a
    multiple of M (checked before any model loads; the layer widths are checked when solving)."""
    nm = prune.nm
    if nm is not None and prune.blocksize % nm[1]:
        raise ValueError(f"nm {nm_text(nm)}: the lazy-update block B (blocksize={prune.blocksize}) must be "
                         f"a multiple of M={nm[1]}; give a blocksize (B) that is a multiple of {nm[1]}")
    return prune


# A flat setting's prefix -> the config it goes to (see Experiment.from_settings).
_SECTIONS = {"prune": PruneConfig, "calib": CalibConfig, "eval": EvalConfig, "output": OutputConfig,
             "quant": QuantSpec, "mixed": MixedPrecisionConfig}


@dataclass
class Experiment:
    """The parameters of one run (DESIGN §4). ``prune.density`` is the fraction of weights KEPT."""

    model: str = "smollm2-135m"
    prune: PruneConfig = field(default_factory=PruneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    device: str = "auto"
    dtype: str = "auto"
    offload_activations: bool = False  # keep calibration activations on the CPU between blocks
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the result as is

    def __post_init__(self):
        for name in ("prune", "calib", "eval", "output"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _SECTIONS[name](**value))
            elif not isinstance(value, _SECTIONS[name]):
                raise ValueError(f"{name} must be a {_SECTIONS[name].__name__}, got {type(value).__name__}")
        _check_model_name(self.model)
        resolve_dtype(self.dtype, resolve_device(self.device))
        check_nm_blocks(self.prune)

    @property
    def density(self) -> float | None:
        """Fraction of weights kept (None for an N:M pattern)."""
        return None if self.prune.nm else self.prune.density

    @classmethod
    def from_settings(cls, settings: Mapping) -> Experiment:
        """An experiment from flat settings: ``model``, ``device``, ``dtype``,
        ``offload_activations``, ``progress``, ``extra``, and ``<section>.<field>`` for the fields
        of ``prune`` (PruneConfig; also ``prune.sparsity`` = 1 − density), ``calib``, ``eval``,
        ``output``, ``quant`` (QuantSpec: ``quant.bits`` None means no quantization) and ``mixed``
        (MixedPrecisionConfig: ``mixed.target_avg_bits`` None means none; it quantizes at 4 bits
        per grid unless ``quant.bits`` says otherwise). An unknown name raises ValueError."""
        top = {f.name for f in fields(cls)} - set(_SECTIONS)
        parts: dict[str, dict] = {name: {} for name in _SECTIONS}
        plain = {}
        for key, value in settings.items():
            section, _, name = key.partition(".")
            if not name and key in top:
                plain[key] = value
            elif name and section in parts and (name in {f.name for f in fields(_SECTIONS[section])}
                                                or key == "prune.sparsity"):
                parts[section][name] = value
            else:
                raise ValueError(f"unknown setting {key!r}; known: {sorted(top)} and "
                                 f"<section>.<field> for sections {sorted(_SECTIONS)}")
        prune = prune_config_from_settings(
            {f"{k}.{n}": v for k in ("prune", "quant", "mixed") for n, v in parts[k].items()})
        return cls(prune=prune, calib=CalibConfig(**parts["calib"]),
                   eval=EvalConfig(**parts["eval"]), output=OutputConfig(**parts["output"]), **plain)


def prune_config_from_settings(settings: Mapping) -> PruneConfig:
    """A :class:`PruneConfig` from flat settings ``prune.<field>`` (also ``prune.sparsity`` =
    1 − density; a None density is the default), ``quant.<field>`` (``quant.bits`` None: no
    quantization) and ``mixed.<field>`` (``mixed.target_avg_bits`` None: no mixed precision;
    with it the base grid has 4 bits unless ``quant.bits`` says otherwise)."""
    parts: dict[str, dict] = {"prune": {}, "quant": {}, "mixed": {}}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if section not in parts:
            raise ValueError(f"unknown pruning setting {key!r}")
        parts[section][name] = value
    prune, quant, mixed = parts["prune"], parts["quant"], parts["mixed"]
    sparsity = prune.pop("sparsity", None)
    if sparsity is not None:
        if prune.get("density") is not None:
            raise ValueError("give density (fraction kept) or sparsity (fraction zeroed), not both")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of weights zeroed), got {sparsity!r}")
        prune["density"] = round(1 - float(sparsity), 12)
    if prune.get("density") is None:
        prune.pop("density", None)
    if mixed.get("target_avg_bits") is not None:
        prune["mixed"] = MixedPrecisionConfig(**mixed)
        quant["bits"] = quant.get("bits") or 4
    if quant.get("bits") is not None:
        prune["quant"] = QuantSpec(**quant)
    elif quant.get("groupsize") is not None:
        raise ValueError(f"groupsize ({quant['groupsize']}) needs wbits (quantization bits)")
    elif quant.get("sym"):
        raise ValueError("sym (symmetric grids) needs wbits (quantization bits)")
    elif quant.get("mse"):
        raise ValueError("mse (clipping search) needs wbits (quantization bits)")
    return check_nm_blocks(PruneConfig(**prune))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate_model(model, tokenizer, source: str | TextSource, windows: int | None, seqlen: int,
                   device=None, progress=True):
    """Perplexity of ``model`` on ``source`` (a name, a path or a resolved :class:`TextSource`)
    over its first ``windows`` windows of ``seqlen`` tokens."""
    with loading("eval", source.requested if isinstance(source, TextSource) else source):
        ids = eval_tokens(tokenizer, source, seqlen=seqlen)
    return perplexity(model, ids, seqlen=seqlen, max_windows=windows, device=device, progress=progress)


def resolve_texts(exp: Experiment) -> tuple[TextSource | None, TextSource | None]:
    """(calibration text, evaluation text) of ``exp``, read once, before any model loads; None
    where the run needs none. After a fallback, the text's ``note`` says what was replaced."""
    calib = evaluation = None
    p = exp.prune
    if p.method != "magnitude" or p.owl or p.exact_update or p.reconstruct:
        with loading("calib", exp.calib.source):
            calib = calibration_text(exp.calib.source, fallback=exp.calib.fallback)
    if exp.eval.source is not None:
        with loading("eval", exp.eval.source):
            evaluation = eval_text(exp.eval.source, fallback=exp.eval.fallback)
    return calib, evaluation


def _settings_row(exp: Experiment, seqlen: int, calib: TextSource | None, evaluation: TextSource | None):
    """What the run was asked to do, as result-row keys (DESIGN §4); ``calib``/``eval`` name the
    texts actually used, ``calib_requested``/``eval_requested`` the ones asked for if they differ."""
    p = exp.prune
    row = {
        "model": exp.model, "method": p.method, "density": exp.density,
        "sparsity": None if p.nm else round(1 - p.density, 6),
        **prune_setting_keys(p),
        "calib": calib.used if calib else None,
        "calib_samples": exp.calib.samples, "seqlen": seqlen, "seed": exp.calib.seed,
        "eval": evaluation.used if evaluation else None, "eval_windows": None,
    }
    for key, text in (("calib", calib), ("eval", evaluation)):
        if text is not None and text.fell_back:
            row[f"{key}_requested"] = text.requested
    return row


def run_experiment(exp: Experiment, model=None, tokenizer=None,
                   texts: tuple[TextSource | None, TextSource | None] | None = None,
                   ) -> tuple[dict, PruneResult, object]:
    """Run ``exp``; returns (result dict with the DESIGN §4 keys, PruneResult, pruned model).

    A loaded (model, tokenizer) may be passed in to be reused; it is copied, not changed; so
    may the texts :func:`resolve_texts` read. The texts are read before the model loads;
    unreadable inputs raise :class:`InputError` naming the setting and the path.
    """
    device = resolve_device(exp.device)
    if texts is None:
        texts = resolve_texts(exp)
        for text in texts:
            if text is not None and text.note:
                warnings.warn(text.note, DataFallbackWarning, stacklevel=2)
    calib_text, evaluation = texts
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    if model is None:
        with loading("model", exp.model):
            model, tokenizer = load_model(exp.model, exp.dtype, device="cpu", progress=exp.progress)
    model = copy.deepcopy(model)
    seqlen = exp.calib.seqlen or model_seqlen(model)
    eval_seqlen = exp.eval.seqlen or seqlen
    result = _settings_row(exp, seqlen, calib_text, evaluation)
    run_on = device if device.startswith("cuda") else "cpu"
    if run_on != "cpu" and evaluation is not None:
        model.to(run_on)  # evaluation wants the whole model on the GPU; pruning does not
    if evaluation is not None and exp.eval.dense:
        dense = evaluate_model(model, tokenizer, evaluation, exp.eval.windows, eval_seqlen, run_on,
                               exp.progress)
        result["ppl_dense"] = dense.ppl

    calib = None
    if calib_text is not None:
        with loading("calib", exp.calib.source):
            calib = calibration_windows(tokenizer, calib_text, exp.calib.samples, seqlen, exp.calib.seed)
    start = time.perf_counter()
    pruned = prune_model(model, calib, exp.prune, device=device, progress=exp.progress,
                         offload_activations=exp.offload_activations)
    result["prune_seconds"] = round(time.perf_counter() - start, 3)
    result["density_achieved"] = overall_density(density_report(model))
    result["sparsity_achieved"] = 1 - result["density_achieved"]
    if getattr(pruned, "block_densities", None) is not None:
        result["block_densities"] = [float(d) for d in pruned.block_densities]

    if evaluation is not None:
        ppl = evaluate_model(model, tokenizer, evaluation, exp.eval.windows, eval_seqlen, run_on,
                             exp.progress)
        result.update(ppl=ppl.ppl, eval_windows=ppl.windows, eval_windows_total=ppl.total_windows,
                      eval_seqlen=eval_seqlen)
    if exp.eval.tasks:
        scores = zero_shot(model, tokenizer, exp.eval.tasks, limit=exp.eval.tasks_limit,
                           task_paths=exp.eval.tasks_path, device=run_on, seed=exp.calib.seed)
        result.update(task_row(scores))
    model.to("cpu")

    result.update(_save_or_measure(model, tokenizer, pruned, exp, result))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_gpu_mb"] = (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                             if device.startswith("cuda") else None)
    result["versions"] = versions()
    result.update(exp.extra)
    if exp.output.json:
        write_json_atomic(exp.output.json, result)
    if exp.output.csv:
        append_csv_row(exp.output.csv, result)
    return result, pruned, model


def _save_or_measure(model, tokenizer, pruned: PruneResult, exp: Experiment, result: dict) -> dict:
    """Save the compact checkpoint (or, for a quantized run without ``output.save``, write it
    to a temporary folder) so that size and bits per weight are measured on real files."""
    from .save_utils import dense_fp16_bytes, save_pruned

    out = {"size_bytes": None, "dense_size_bytes": dense_fp16_bytes(model), "avg_bits": None}
    # what the model is, not how this run went: timings and memory would make the size of the
    # same model differ from run to run
    volatile = {"prune_seconds", "peak_rss_mb", "peak_gpu_mb"}
    metadata = {k: v for k, v in result.items()
                if isinstance(v, (int, float, str, type(None))) and k not in volatile}
    if exp.output.save:
        manifest = save_pruned(model, exp.output.save, tokenizer, pruned.masks, pruned.grids or None,
                               metadata, progress=exp.progress)
    elif pruned.grids:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = save_pruned(model, Path(tmp) / "ckpt", tokenizer, pruned.masks, pruned.grids,
                                   metadata, progress=exp.progress)
    else:
        return out
    out["size_bytes"] = manifest.get("size_bytes")
    if pruned.grids:
        out["avg_bits"] = manifest.get("avg_bits")
    out["bits_per_weight"] = manifest.get("avg_bits")
    return out
