"""Compact checkpoints: the names of :mod:`sparsegpt_utils.checkpoint` (save, load, manifest,
export) under their older module name. The layer code itself is :mod:`sparsegpt_utils.codec`."""

from __future__ import annotations

from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_bytes,
    dense_fp16_bytes,
    export_checkpoint,
    export_dense,
    load_masked_model_single,
    load_pruned,
    push_to_hub,
    read_manifest,
    save_pruned,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_pruned",
    "load_pruned",
    "load_masked_model_single",
    "read_manifest",
    "export_dense",
    "export_checkpoint",
    "push_to_hub",
    "checkpoint_bytes",
    "dense_fp16_bytes",
]
