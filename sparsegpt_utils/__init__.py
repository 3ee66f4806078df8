"""sparsegpt_utils: SparseGPT pruning, quantization and evaluation for causal LMs.

density = fraction of weights kept; sparsity = 1 - density.
"""

import warnings

from ._version import __version__, versions  # noqa: E402

# tqdm.auto's notice that ipywidgets is absent depends on the machine, not on the run
warnings.filterwarnings("ignore", message="IProgress not found")

from .data import calibration_windows, eval_tokens, load_text  # noqa: E402
from .evaluate import density_report, overall_density, perplexity  # noqa: E402
from .models import get_adapter, load_model, pruned_linears  # noqa: E402
from .prune import PruneConfig, PruneResult, prune_model  # noqa: E402
from .quant import QuantGrid, QuantSpec  # noqa: E402
from .save_utils import (  # noqa: E402
    CheckpointError,
    checkpoint_bytes,
    dense_fp16_bytes,
    export_dense,
    load_masked_model_single,
    load_pruned,
    save_pruned,
)
from .solver import HessianAccumulator, magnitude_mask, sparsegpt_solve, wanda_mask  # noqa: E402

__all__ = [
    "calibration_windows", "eval_tokens", "load_text", "density_report", "overall_density",
    "perplexity", "get_adapter", "load_model", "pruned_linears", "PruneConfig", "PruneResult",
    "prune_model", "QuantGrid", "QuantSpec", "HessianAccumulator", "magnitude_mask",
    "sparsegpt_solve", "wanda_mask", "save_pruned", "load_pruned", "load_masked_model_single",
    "export_dense", "checkpoint_bytes", "dense_fp16_bytes", "CheckpointError", "__version__",
    "versions",
]
