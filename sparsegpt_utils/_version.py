"""The package version, and the versions a result row records."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "versions"]


def versions() -> dict[str, str]:
    """torch, transformers, this package and Python: what a result or a checkpoint records."""
    import platform

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "sparsegpt_utils": __version__, "python": platform.python_version()}
