"""Text sources, calibration windows and the evaluation token stream (DESIGN §3, §5).

A text source is a name (``wikitext2``, ``wikitext2-valid``, ``ptb``, ``c4``, ``stdlib``) or
a path to a text file. A name is resolved in this order: the ``SPARSEGPT_DATA_DIR``
directory, then the Hugging Face hub. ``stdlib`` is text every Python install carries (the
docstrings of the standard library): a stand-in for tests and demos where no data is at hand.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .paths import data_dir

__all__ = [
    "TEXT_SOURCES",
    "DataNotFoundError",
    "load_text",
    "tokenize_text",
    "calibration_windows",
    "eval_tokens",
    "stdlib_text",
    "default_data_dir",
]

# name -> split -> file under SPARSEGPT_DATA_DIR (CRLF normalised on read)
LOCAL_FILES = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "train": "wikitext-2-raw/wiki.train.raw",
                  "validation": "wikitext-2-raw/wiki.valid.raw"},
    "wikitext2-valid": {"validation": "wikitext-2/valid.txt", "train": "wikitext-2/valid.txt",
                        "test": "wikitext-2/valid.txt"},
    "ptb": {"test": "ptb/ptb.test.txt", "train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt"},
    "c4": {"train": "c4/c4-train.00000-of-01024.json.gz",
           "validation": "c4/c4-validation.00000-of-00008.json.gz"},
}
TEXT_SOURCES = sorted([*LOCAL_FILES, "stdlib"])
SPLITS = ("train", "validation", "test")


class DataNotFoundError(FileNotFoundError):
    pass


def default_data_dir() -> Path | None:
    """The offline data folder (:func:`sparsegpt_utils.paths.data_dir`)."""
    return data_dir()


def stdlib_text(max_chars: int = 1_500_000) -> str:
    """Docstrings of the standard library's source files, in a fixed order: English text that
    every Python install carries, for runs and tests with no data set at hand."""
    import ast
    import sysconfig

    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc)
                total += len(doc) + 2
        if total > max_chars:
            break
    if not parts:
        raise DataNotFoundError("no standard-library sources found for the 'stdlib' text source")
    return "\n\n".join(parts)[:max_chars]


def _hub_text(name: str, split: str) -> str:
    from datasets import load_dataset

    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return "\n\n".join(rows)
    if name == "wikitext2-valid":
        return "\n\n".join(load_dataset("wikitext", "wikitext-2-v1", split="validation")["text"])
    if name == "ptb":
        return " ".join(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
    if name == "c4":
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        if split not in files:
            raise ValueError("c4 has splits 'train' and 'validation'")
        rows = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
        # the SparseGPT repository's C4 evaluation text: the first 1100 validation documents
        return "\n\n".join(rows) if split == "train" else " ".join(rows[:1100])
    raise ValueError(name)


def _read_local(path: Path) -> str:
    if path.name.endswith(".json.gz"):
        import gzip
        import json

        with gzip.open(path, "rt", encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f)
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def load_text(source: str, split: str = "test", data_dir: str | Path | None = None) -> str:
    """The text of ``source`` (a name or a file path) for ``split``.

    Raises :class:`DataNotFoundError` naming the path, the data directory and the hub when
    none of them has it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "stdlib":
        return stdlib_text()
    path = Path(source).expanduser()
    if source not in LOCAL_FILES:
        if path.is_file():
            return _read_local(path)
        raise DataNotFoundError(
            f"text source {source!r} is neither a file nor one of {TEXT_SOURCES}"
        )
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    rel = LOCAL_FILES[source].get(split)
    tried = [f"a file path {source!r}: not a file"]
    if data_dir is not None and rel is not None:
        local = data_dir / rel
        if local.is_file():
            return _read_local(local)
        tried.append(f"SPARSEGPT_DATA_DIR file {local}: missing")
    else:
        tried.append("SPARSEGPT_DATA_DIR: not set" if data_dir is None
                     else f"SPARSEGPT_DATA_DIR: no {split} file for {source!r}")
    try:
        return _hub_text(source, split)
    except Exception as err:  # offline, or the dataset moved
        detail = str(err).splitlines()[0] if str(err) else ""
        tried.append(f"Hugging Face hub: {type(err).__name__}: {detail}")
        raise DataNotFoundError(
            f"no {split} text for {source!r}; tried:\n  " + "\n  ".join(tried)
        ) from err


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, n] of the whole text, with the tokenizer's defaults."""
    return tokenizer(text, return_tensors="pt").input_ids


def calibration_windows(
    tokenizer, source: str = "c4", samples: int = 128, seqlen: int = 2048, seed: int = 0,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """``samples`` windows [samples, seqlen] at random offsets, drawn as the SparseGPT
    repository draws them (``random.seed(seed)``; ``randint(0, n - seqlen - 1)``; for C4 a
    random document longer than ``seqlen`` first). Uses the ``train`` split where a source
    has one, else its only split."""
    if samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {samples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    split = "train"
    if source == "wikitext2-valid":
        split = "validation"
    elif source not in LOCAL_FILES:
        split = "test"  # a file or stdlib: the split is ignored
    text = load_text(source, split, data_dir)
    random.seed(seed)
    windows = []
    if source == "c4":
        docs = text.split("\n\n")
        while len(windows) < samples:
            ids = tokenize_text(tokenizer, docs[random.randint(0, len(docs) - 1)])
            if ids.shape[1] <= seqlen:
                continue
            i = random.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, i:i + seqlen])
        return torch.cat(windows)
    ids = tokenize_text(tokenizer, text)
    if ids.shape[1] <= seqlen + 1:
        raise ValueError(
            f"calibration text {source!r} has {ids.shape[1]} tokens, fewer than seqlen={seqlen} + 2"
        )
    for _ in range(samples):
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, i:i + seqlen])
    return torch.cat(windows)


def eval_tokens(tokenizer, source: str = "wikitext2", data_dir: str | Path | None = None,
                seqlen: int = 2048) -> torch.Tensor:
    """The evaluation token stream [1, n] of a source's test split (C4: its validation text,
    cut to 256 windows as the SparseGPT repository does)."""
    split = "validation" if source in ("c4", "wikitext2-valid") else "test"
    ids = tokenize_text(tokenizer, load_text(source, split, data_dir))
    if source == "c4":
        ids = ids[:, : 256 * seqlen]
    return ids
