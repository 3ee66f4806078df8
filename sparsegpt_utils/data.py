"""Text sources, calibration windows and the evaluation token stream (DESIGN §3, §5).

A text source is a name (``wikitext2``, ``wikitext2-valid``, ``ptb``, ``c4``, ``stdlib``) or
a path to a text file. A name is resolved in this order: the ``SPARSEGPT_DATA_DIR``
directory, then the Hugging Face hub. ``stdlib`` is text every Python install carries (the
docstrings of the standard library): a stand-in for tests and demos where no data is at hand.

With ``fallback=True`` (notebooks, :mod:`experiment`), a named source found in neither place
is replaced by ``stdlib`` and the :class:`TextSource` says so in one line (``note``); the
library and the command line default to ``fallback=False``: a missing source is an error.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .paths import data_dir as _default_data_dir_policy

__all__ = [
    "TEXT_SOURCES",
    "FALLBACK_SOURCE",
    "DataNotFoundError",
    "TextSourceError",
    "DataFallbackWarning",
    "TextSource",
    "resolve_text",
    "load_text",
    "tokenize_text",
    "calibration_text",
    "eval_text",
    "calibration_windows",
    "calibration_windows_from_ids",
    "calibration_windows_from_documents",
    "eval_tokens",
    "stdlib_text",
    "default_data_dir",
    "hub_unavailable",
    "text_available",
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
FALLBACK_SOURCE = "stdlib"
# C4's evaluation text, as the SparseGPT repository builds it: the first 1100 validation documents
C4_EVAL_DOCUMENTS = 1100
_TITLES = {"wikitext2": "WikiText-2", "wikitext2-valid": "WikiText-2", "ptb": "PTB", "c4": "C4"}


class DataNotFoundError(FileNotFoundError):
    """A text source found nowhere (path, ``SPARSEGPT_DATA_DIR``, hub)."""


class TextSourceError(ValueError):
    """A text file that exists but cannot be used: binary, not UTF-8, empty, or (``.json.gz``)
    not JSON lines with a ``text`` field. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{path}: {reason}")


class DataFallbackWarning(UserWarning):
    """A named source was replaced by ``stdlib`` text (``fallback=True``)."""


@dataclass(frozen=True)
class TextSource:
    """The text of one source and split, and where it came from.

    ``requested``: the source asked for; ``used``: the source whose text this is (``stdlib``
    after a fallback); ``note``: one line saying what was replaced and why (None when nothing
    was); ``documents``: C4's documents, one string each (None for a plain text)."""

    requested: str
    used: str
    split: str
    text: str = field(repr=False)
    documents: tuple[str, ...] | None = field(default=None, repr=False)
    note: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.used != self.requested


def default_data_dir() -> Path | None:
    """The offline data folder (:func:`sparsegpt_utils.paths.data_dir`)."""
    return _default_data_dir_policy()


@functools.lru_cache(maxsize=4)
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


# ----------------------------------------------------------------------------- reading files

def _c4_text(documents: list[str], split: str) -> tuple[str, tuple[str, ...] | None]:
    """(text, documents) of C4: the training documents (sampled one at a time), or the
    SparseGPT repository's evaluation text (the first 1100 validation documents, space-joined)."""
    if split == "train":
        return "\n\n".join(documents), tuple(documents)
    return " ".join(documents[:C4_EVAL_DOCUMENTS]), None


def _read_documents(path: Path) -> list[str]:
    """The ``text`` fields of a ``.json.gz`` file of JSON lines (C4's format)."""
    import gzip
    import json

    documents = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    documents.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise TextSourceError(path, f"line {number} is not a JSON object with a 'text' "
                                                f"field ({type(err).__name__})") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise TextSourceError(path, f"not a readable gzip file ({err})") from None
    except UnicodeDecodeError as err:
        raise TextSourceError(path, f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                    f"{err.start} of a line)") from None
    if not documents:
        raise TextSourceError(path, "no documents (an empty file)")
    return documents


def _read_text_file(path: Path) -> str:
    """A UTF-8 text file, CRLF → LF; refuses binary, non-UTF-8 and empty files."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise TextSourceError(path, "a folder, not a text file") from None
    except OSError as err:
        raise TextSourceError(path, f"cannot be read ({err.strerror or err})") from None
    if b"\x00" in data[:65536]:
        raise TextSourceError(path, "a binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(path, f"not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") \
            from None
    if not text.strip():
        raise TextSourceError(path, "an empty text file")
    return text.replace("\r\n", "\n")


def _read_local(path: Path, name: str | None, split: str) -> tuple[str, tuple[str, ...] | None]:
    if path.name.endswith(".json.gz"):
        documents = _read_documents(path)
        if name == "c4":
            return _c4_text(documents, split)
        return "\n\n".join(documents), tuple(documents)
    return _read_text_file(path), None


# ----------------------------------------------------------------------------- the hub

class _HubUnavailable(Exception):
    """The hub was not tried: offline by setting, unreachable, or no ``datasets`` package."""

    def __init__(self, short: str, detail: str):
        self.short = short
        super().__init__(detail)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why ``endpoint`` cannot be reached (one TCP connection, ``timeout`` seconds), or None."""
    import socket

    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or type(err).__name__}"


def _hub_precheck() -> bool:
    """Raise :class:`_HubUnavailable` when the hub cannot answer; True when offline mode is set
    (``datasets`` then reads its local cache only, which fails at once when empty)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise _HubUnavailable("no 'datasets' package", "the 'datasets' package is not installed") from None
    if _truthy("HF_DATASETS_OFFLINE") or _truthy("HF_HUB_OFFLINE"):
        return True
    # without offline mode, `datasets` retries an unreachable hub for half a minute: ask first
    why = _unreachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if why:
        raise _HubUnavailable("hub unreachable", f"unreachable ({why}); with a cached copy, set "
                                                 "HF_DATASETS_OFFLINE=1 to read it")
    return False


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub's data sets cannot be fetched now (offline mode set, the hub
    unreachable within 3 s, no ``datasets`` package), in a few words; None when they can."""
    try:
        offline = _hub_precheck()
    except _HubUnavailable as err:
        return str(err)
    return "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)" if offline else None


def text_available(source: str, split: str = "test", data_dir: str | Path | None = None) -> str | None:
    """Whether :func:`resolve_text` can read ``source`` now, without reading it: None when it
    is a file, ``stdlib``, a file in the data folder, or the hub can be asked; else one line
    saying why not."""
    if source == "stdlib" or Path(source).expanduser().is_file():
        return None
    if source not in LOCAL_FILES:
        return f"{source!r} is neither a file nor one of {TEXT_SOURCES}"
    folder = Path(data_dir) if data_dir else default_data_dir()
    rel = LOCAL_FILES[source].get(_split_of(source, split))
    if folder is not None and rel is not None and (folder / rel).is_file():
        return None
    why = hub_unavailable()
    if why is None:
        return None
    where = "SPARSEGPT_DATA_DIR unset" if folder is None else "not in SPARSEGPT_DATA_DIR"
    return f"{_title(source, _split_of(source, split))}: {where}, and the Hugging Face hub is {why}"


def _hub_text(name: str, split: str) -> tuple[str, tuple[str, ...] | None]:
    offline = _hub_precheck()
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows), None
        if name == "wikitext2-valid":
            return "\n\n".join(load_dataset("wikitext", "wikitext-2-v1", split="validation")["text"]), None
        if name == "ptb":
            return " ".join(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]), None
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            rows = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
            return _c4_text(list(rows), split)
    except Exception as err:
        if offline:
            raise _HubUnavailable("hub offline", f"offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) and "
                                                 f"not cached: {type(err).__name__}") from err
        raise
    raise ValueError(name)


# ----------------------------------------------------------------------------- resolving a source

def _split_of(source: str, split: str) -> str:
    """The split actually read: sources with one text (``wikitext2-valid``: WikiText-2 validation)
    read it whatever the split asked; C4 has no test split (its validation text serves)."""
    if source == "wikitext2-valid":
        return "validation"
    if source == "c4" and split == "test":
        return "validation"
    return split


def _title(source: str, split: str) -> str:
    return f"{_TITLES.get(source, repr(source))} {split}"


def resolve_text(source: str, split: str = "test", data_dir: str | Path | None = None,
                 fallback: bool = False) -> TextSource:
    """The text of ``source`` (a name or a file path) for ``split``, and where it came from.

    A name is looked up in ``data_dir`` (default ``SPARSEGPT_DATA_DIR``), then on the hub; the
    hub is not asked when it is unreachable (a 3 s connection check) or offline mode is set.
    When neither has it: with ``fallback`` the ``stdlib`` text is returned, its ``note`` one
    line saying so; without, :class:`DataNotFoundError` names every place tried. A file path
    is never replaced. Unusable files raise :class:`TextSourceError` naming the path.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "stdlib":
        return TextSource(source, source, split, stdlib_text())
    path = Path(source).expanduser()
    if source not in LOCAL_FILES:
        if path.is_file():
            text, documents = _read_local(path, None, split)
            return TextSource(source, source, split, text, documents)
        if path.is_dir():
            raise TextSourceError(path, "a folder, not a text file")
        raise DataNotFoundError(
            f"text source {source!r} is neither a file nor one of {TEXT_SOURCES}"
        )
    split = _split_of(source, split)
    folder = Path(data_dir) if data_dir else default_data_dir()
    rel = LOCAL_FILES[source].get(split)
    tried = [f"a file path {source!r}: not a file"]
    if folder is not None and rel is not None:
        local = folder / rel
        if local.is_file():
            text, documents = _read_local(local, source, split)
            return TextSource(source, source, split, text, documents)
        tried.append(f"SPARSEGPT_DATA_DIR file {local}: missing")
        short = ["not in SPARSEGPT_DATA_DIR"]
    else:
        tried.append("SPARSEGPT_DATA_DIR: not set" if folder is None
                     else f"SPARSEGPT_DATA_DIR: no {split} file for {source!r}")
        short = ["SPARSEGPT_DATA_DIR unset" if folder is None else "not in SPARSEGPT_DATA_DIR"]
    try:
        text, documents = _hub_text(source, split)
        return TextSource(source, source, split, text, documents)
    except _HubUnavailable as err:
        tried.append(f"Hugging Face hub: {err}")
        short.append(err.short)
        cause = err
    except Exception as err:  # the dataset moved, a network error mid-download, ...
        detail = str(err).splitlines()[0] if str(err) else ""
        tried.append(f"Hugging Face hub: {type(err).__name__}: {detail}")
        short.append(f"hub: {type(err).__name__}")
        cause = err
    if not fallback:
        raise DataNotFoundError(
            f"no {split} text for {source!r}; tried:\n  " + "\n  ".join(tried)
        ) from cause
    note = (f"{_title(source, split)} not found ({', '.join(short)}): using {FALLBACK_SOURCE!r} text "
            f"instead — perplexities are not comparable with {_TITLES[source]} results")
    return TextSource(source, FALLBACK_SOURCE, split, stdlib_text(), note=note)


def load_text(source: str, split: str = "test", data_dir: str | Path | None = None) -> str:
    """The text of ``source`` (a name or a file path) for ``split`` (:func:`resolve_text`,
    no fallback).

    Raises :class:`DataNotFoundError` naming the path, the data directory and the hub when
    none of them has it, :class:`TextSourceError` for an unusable file.
    """
    return resolve_text(source, split, data_dir).text


def _calibration_split(source: str) -> str:
    # the train split where a named source has one (wikitext2-valid: its validation text)
    return "train" if source in LOCAL_FILES else "test"


def calibration_text(source: str, data_dir: str | Path | None = None, fallback: bool = False) -> TextSource:
    """The text calibration samples: a named source's ``train`` split (``wikitext2-valid``: its
    validation text), or the one text of a file or ``stdlib`` (:func:`resolve_text`)."""
    return resolve_text(source, _calibration_split(source), data_dir, fallback)


def eval_text(source: str, data_dir: str | Path | None = None, fallback: bool = False) -> TextSource:
    """The text perplexity is measured on: a source's ``test`` split (C4 and ``wikitext2-valid``:
    their validation text) (:func:`resolve_text`)."""
    return resolve_text(source, "test", data_dir, fallback)


def _resolved(source: str | TextSource, read, data_dir, fallback: bool) -> TextSource:
    if isinstance(source, TextSource):
        return source
    resolved = read(source, data_dir, fallback)
    if resolved.note:
        warnings.warn(resolved.note, DataFallbackWarning, stacklevel=3)
    return resolved


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, n] of the whole text, with the tokenizer's defaults."""
    return tokenizer(text, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- calibration

def _check_window_args(samples: int, seqlen: int) -> None:
    if samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {samples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")


def calibration_windows_from_ids(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0,
                                 label: str = "calibration text") -> torch.Tensor:
    """``samples`` windows [samples, seqlen] of the token stream ``ids`` [1, n] (or [n]) at
    random offsets, drawn as the SparseGPT repository draws them: ``random.seed(seed)``, then
    ``randint(0, n − seqlen − 1)`` per window. ``label`` names the text in errors."""
    _check_window_args(samples, seqlen)
    ids = ids.reshape(1, -1)
    if ids.shape[1] <= seqlen:
        raise ValueError(f"{label} has {ids.shape[1]} tokens; a window of seqlen={seqlen} needs more")
    random.seed(seed)
    return torch.cat([ids[:, i:i + seqlen] for i in
                      (random.randint(0, ids.shape[1] - seqlen - 1) for _ in range(samples))])


def calibration_windows_from_documents(tokenizer, documents, samples: int, seqlen: int, seed: int = 0,
                                       label: str = "calibration text") -> torch.Tensor:
    """C4's draw (the SparseGPT repository's): per window, random documents until one has more
    than ``seqlen`` tokens, then a random offset in it. Stops with a ValueError once every
    document has been seen too short, naming the longest."""
    _check_window_args(samples, seqlen)
    if not documents:
        raise ValueError(f"{label} has no documents")
    random.seed(seed)
    too_short: dict[int, int] = {}  # document index -> its token count (<= seqlen)
    windows = []
    for _ in range(samples):
        while True:
            if len(too_short) == len(documents):
                raise ValueError(
                    f"{label}: no document has more than seqlen={seqlen} tokens (the longest of "
                    f"{len(documents)} has {max(too_short.values())}); use a smaller seqlen or "
                    "another calibration source")
            i = random.randint(0, len(documents) - 1)
            if i in too_short:  # the draw still counts, so the random sequence is the reference's
                continue
            ids = tokenize_text(tokenizer, documents[i])
            if ids.shape[1] > seqlen:
                break
            too_short[i] = ids.shape[1]
        j = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, j:j + seqlen])
    return torch.cat(windows)


def calibration_windows(
    tokenizer, source: str | TextSource = "c4", samples: int = 128, seqlen: int = 2048, seed: int = 0,
    data_dir: str | Path | None = None, fallback: bool = False,
) -> torch.Tensor:
    """``samples`` windows [samples, seqlen] at random offsets, drawn as the SparseGPT
    repository draws them (``random.seed(seed)``; ``randint(0, n - seqlen - 1)``; for C4 a
    random document longer than ``seqlen`` first), from :func:`calibration_text`.

    ``source``: a name, a path, or a :class:`TextSource` already resolved (its ``used`` text
    is sampled). ``fallback``: see :func:`resolve_text`; a fallback also warns
    (:class:`DataFallbackWarning`) — resolve first to record which text was used."""
    _check_window_args(samples, seqlen)
    text = _resolved(source, calibration_text, data_dir, fallback)
    label = f"calib {text.used!r}"
    if text.documents is not None:
        return calibration_windows_from_documents(tokenizer, text.documents, samples, seqlen, seed, label)
    return calibration_windows_from_ids(tokenize_text(tokenizer, text.text), samples, seqlen, seed, label)


# ----------------------------------------------------------------------------- evaluation

def eval_tokens(tokenizer, source: str | TextSource = "wikitext2", data_dir: str | Path | None = None,
                seqlen: int = 2048, fallback: bool = False) -> torch.Tensor:
    """The evaluation token stream [1, n] of a source's test split (C4: its validation text,
    cut to 256 windows as the SparseGPT repository does; ``wikitext2-valid``: its validation
    text). ``source`` and ``fallback`` as in :func:`calibration_windows`."""
    text = _resolved(source, eval_text, data_dir, fallback)
    ids = tokenize_text(tokenizer, text.text)
    if text.used == "c4":
        ids = ids[:, : 256 * seqlen]
    return ids
