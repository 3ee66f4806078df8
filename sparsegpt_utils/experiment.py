"""One pruning experiment end to end — load, calibrate, prune, evaluate, save, record — as
the command line and notebook 1 run it. Every argument is checked before any long work."""

from __future__ import annotations

import copy
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._version import versions
from .data import TEXT_SOURCES, calibration_windows, eval_tokens
from .evaluate import density_report, overall_density, perplexity
from .models import BUILTIN_MODELS, load_model, model_seqlen
from .prune import METHODS, PruneConfig, PruneResult, prune_model
from .quant import QuantSpec
from .results import append_csv_row, write_json_atomic
from .solver import check_density, parse_nm

__all__ = ["Experiment", "run_experiment", "evaluate_model", "versions", "peak_rss_mb"]

BIT_METHODS = ("quantile", "budget")


@dataclass
class Experiment:
    """The parameters of one run (DESIGN §4). ``density`` is the fraction of weights KEPT."""

    model: str = "smollm2-135m"
    method: str = "sparsegpt"
    density: float | None = 0.5
    nm: str | None = None
    wbits: int | None = None
    groupsize: int | None = None
    target_avg_bits: float | None = None
    bit_method: str = "budget"
    calib: str = "c4"
    calib_samples: int = 128
    seqlen: int | None = None  # None: 2048, or the model's maximum if smaller
    seed: int = 0
    calibration_batch_size: int = 1
    percdamp: float = 0.01
    blocksize: int = 128
    mask_blocksize: int = 128
    eval: str | None = "wikitext2"
    eval_windows: int | None = None
    eval_dense: bool = False
    save: str | None = None
    json: str | None = None
    csv: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offload_activations: bool = False  # keep calibration activations on the CPU between blocks
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the result as is

    def validate(self) -> Experiment:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.nm is not None:
            parse_nm(self.nm)
        elif self.density is None:
            raise ValueError("give density (fraction kept, in (0, 1]) or nm (N:M)")
        else:
            check_density(self.density)
        if self.wbits is not None and not 2 <= int(self.wbits) <= 16:
            raise ValueError(f"wbits must be in [2, 16], got {self.wbits}")
        if self.groupsize is not None and (self.groupsize < 1 or self.wbits is None):
            raise ValueError(f"groupsize must be >= 1 and needs wbits, got {self.groupsize}")
        if self.target_avg_bits is not None:
            if not 2 <= self.target_avg_bits <= 8:
                raise ValueError(f"target_avg_bits must be in [2, 8], got {self.target_avg_bits}")
            if self.bit_method not in BIT_METHODS:
                raise ValueError(f"bit_method must be one of {BIT_METHODS}, got {self.bit_method!r}")
        for name, value, lo in (("calib_samples", self.calib_samples, 1), ("seed", self.seed, 0),
                                ("calibration_batch_size", self.calibration_batch_size, 1),
                                ("eval_windows", self.eval_windows, 1), ("seqlen", self.seqlen, 2)):
            if value is not None and (not isinstance(value, int) or value < lo):
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        for name, source in (("calib", self.calib), ("eval", self.eval)):
            if source is not None and source not in TEXT_SOURCES and not Path(source).expanduser().is_file():
                raise ValueError(f"{name} must be one of {TEXT_SOURCES} or an existing file, got {source!r}")
        if (self.model not in BUILTIN_MODELS and not Path(self.model).expanduser().is_dir()
                and "/" not in self.model):
            raise ValueError(
                f"model {self.model!r} is not a built-in ({sorted(BUILTIN_MODELS)}), a local folder, "
                "or a hub id of the form org/name"
            )
        PruneConfig(method=self.method, density=self.density or 1.0, nm=self.nm,
                    blocksize=self.blocksize, mask_blocksize=self.mask_blocksize,
                    percdamp=self.percdamp, calibration_batch_size=self.calibration_batch_size)
        return self


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_model(model, tokenizer, source: str, windows: int | None, seqlen: int,
                   device=None, progress=True):
    return perplexity(model, eval_tokens(tokenizer, source, seqlen=seqlen), seqlen=seqlen,
                      max_windows=windows, device=device, progress=progress)


def run_experiment(exp: Experiment, model=None, tokenizer=None) -> tuple[dict, PruneResult, object]:
    """Run ``exp``; returns (result dict with the DESIGN §4 keys, PruneResult, pruned model).

    A loaded (model, tokenizer) may be passed in to be reused; it is copied, not changed.
    """
    exp.validate()
    device = _device(exp.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if model is None:
        model, tokenizer = load_model(exp.model, exp.dtype, device="cpu")
    model = copy.deepcopy(model)
    seqlen = exp.seqlen or model_seqlen(model)
    result = {
        "model": exp.model, "method": exp.method,
        "density": None if exp.nm else exp.density, "nm": exp.nm,
        "sparsity": None if exp.nm else round(1 - exp.density, 6),
        "wbits": exp.wbits, "groupsize": exp.groupsize,
        "target_avg_bits": exp.target_avg_bits,
        "bit_method": exp.bit_method if exp.target_avg_bits else None,
        "calib": exp.calib if exp.method != "magnitude" else None,
        "calib_samples": exp.calib_samples, "seqlen": seqlen, "seed": exp.seed,
        "percdamp": exp.percdamp, "blocksize": exp.blocksize, "mask_blocksize": exp.mask_blocksize,
        "eval": exp.eval, "eval_windows": None,
    }
    run_on = device if device == "cuda" else "cpu"
    if run_on == "cuda" and exp.eval:
        model.to(run_on)  # evaluation wants the whole model on the GPU; pruning does not
    if exp.eval and exp.eval_dense:
        dense = evaluate_model(model, tokenizer, exp.eval, exp.eval_windows, seqlen, run_on, exp.progress)
        result["ppl_dense"] = dense.ppl

    calib = None
    if exp.method != "magnitude":
        calib = calibration_windows(tokenizer, exp.calib, exp.calib_samples, seqlen, exp.seed)
    quant = QuantSpec(exp.wbits, exp.groupsize) if exp.wbits else None
    allocator = None
    if exp.target_avg_bits is not None:
        from .mixed_precision import MixedPrecisionAllocator

        allocator = MixedPrecisionAllocator(
            target_avg_bits=exp.target_avg_bits, method=exp.bit_method, groupsize=exp.groupsize,
            density=exp.density if exp.nm is None else parse_nm(exp.nm)[0] / parse_nm(exp.nm)[1])
        quant = quant or QuantSpec(4, exp.groupsize)
    config = PruneConfig(
        method=exp.method, density=exp.density or 1.0, nm=exp.nm, quant=quant,
        blocksize=exp.blocksize, mask_blocksize=exp.mask_blocksize, percdamp=exp.percdamp,
        calibration_batch_size=exp.calibration_batch_size, row_bits=allocator,
    )
    start = time.perf_counter()
    pruned = prune_model(model, calib, config, device=device, progress=exp.progress,
                         offload_activations=exp.offload_activations)
    result["prune_seconds"] = round(time.perf_counter() - start, 3)
    report = density_report(model)
    result["density_achieved"] = overall_density(report)
    result["sparsity_achieved"] = 1 - result["density_achieved"]

    if exp.eval:
        ppl = evaluate_model(model, tokenizer, exp.eval, exp.eval_windows, seqlen, run_on, exp.progress)
        result.update(ppl=ppl.ppl, eval_windows=ppl.windows, eval_windows_total=ppl.total_windows,
                      eval_seqlen=seqlen)
    model.to("cpu")

    size = _save_or_measure(model, tokenizer, pruned, exp, result)
    result.update(size)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_gpu_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                             if device == "cuda" else None)
    result["versions"] = versions()
    result.update(exp.extra)
    if exp.json:
        write_json_atomic(exp.json, result)
    if exp.csv:
        append_csv_row(exp.csv, result)
    return result, pruned, model


def _save_or_measure(model, tokenizer, pruned: PruneResult, exp: Experiment, result: dict) -> dict:
    """Save the compact checkpoint (or, for a quantized run without --save, write it to a
    temporary folder) so that size and bits per weight are measured on real files."""
    from .save_utils import dense_fp16_bytes, save_pruned

    out = {"size_bytes": None, "dense_size_bytes": dense_fp16_bytes(model), "avg_bits": None}
    # what the model is, not how this run went: timings and memory would make the size of the
    # same model differ from run to run
    volatile = {"prune_seconds", "peak_rss_mb", "peak_gpu_mb"}
    metadata = {k: v for k, v in result.items()
                if isinstance(v, (int, float, str, type(None))) and k not in volatile}
    if exp.save:
        manifest = save_pruned(model, exp.save, tokenizer, pruned.masks, pruned.grids or None, metadata,
                               progress=exp.progress)
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
