"""Text sources: the offline fallback says what it replaced, real data is used where present,
sampling loops always end, unusable files are refused with their path."""

from __future__ import annotations

import gzip
import json
import random
import signal
import warnings

import pytest
import torch

from sparsegpt_utils import data
from sparsegpt_utils.data import (
    DataFallbackWarning,
    DataNotFoundError,
    TextSource,
    TextSourceError,
    calibration_text,
    calibration_windows,
    calibration_windows_from_ids,
    eval_text,
    eval_tokens,
    load_text,
    resolve_text,
)

WIKI_TEST = "wikitext-2-raw/wiki.test.raw"
C4_TRAIN = "c4/c4-train.00000-of-01024.json.gz"
C4_VALID = "c4/c4-validation.00000-of-00008.json.gz"


class WordTokenizer:
    """One token per whitespace-separated word (ids are word lengths): enough for sampling."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, return_tensors="pt"):
        return self._Out(torch.tensor([[len(w) for w in text.split()]], dtype=torch.long))


@pytest.fixture
def no_data(monkeypatch):
    """A fresh offline machine: no data folder, the hub in offline mode."""
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", "")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def deadline():
    """Fail (instead of hanging) when the code under test loops for more than 20 s."""
    def boom(*_):
        raise TimeoutError("did not finish within 20 s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _write_c4(path, documents):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc, "url": "x"}) + "\n")


# ----------------------------------------------------------------------------- fallback

def test_offline_without_data_falls_back_to_stdlib_and_says_so(no_data):
    for source, title in (("wikitext2", "WikiText-2 test"), ("wikitext2-valid", "WikiText-2 validation")):
        read = eval_text if source == "wikitext2" else calibration_text
        got = read(source, fallback=True)
        assert got.requested == source and got.used == "stdlib" and got.fell_back
        assert got.text == load_text("stdlib")
        note = got.note
        assert "\n" not in note and note.startswith(f"{title} not found")
        assert "SPARSEGPT_DATA_DIR unset" in note and "hub offline" in note
        assert "'stdlib'" in note and "not comparable with WikiText-2" in note
    # the library default: no fallback, an error naming every place tried
    with pytest.raises(DataNotFoundError, match="SPARSEGPT_DATA_DIR.*\n.*hub"):
        eval_text("wikitext2")
    with pytest.raises(DataNotFoundError):
        resolve_text("ptb", "test")


def test_a_file_path_is_never_replaced(no_data, tmp_path):
    with pytest.raises(DataNotFoundError, match="neither a file"):
        resolve_text(str(tmp_path / "missing.txt"), fallback=True)


def test_unreachable_hub_is_not_asked(monkeypatch, tmp_path, deadline):
    """Without offline mode, an unreachable hub is detected by one quick connection (no
    half-minute of retries inside `datasets`)."""
    import datasets

    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))  # an empty data folder
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    got = eval_text("wikitext2", fallback=True)
    assert got.used == "stdlib" and calls == []
    assert "(not in SPARSEGPT_DATA_DIR, hub unreachable)" in got.note
    with pytest.raises(DataNotFoundError, match="127.0.0.1:9"):
        eval_text("wikitext2")


def test_data_at_hand_is_used_unchanged(monkeypatch, tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / WIKI_TEST).write_bytes(b" = Title = \r\n\r\n Some text here .\r\n")
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    got = eval_text("wikitext2", fallback=True)
    assert got == TextSource("wikitext2", "wikitext2", "test", " = Title = \n\n Some text here .\n")
    assert got.note is None and not got.fell_back
    tok = WordTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        ids = eval_tokens(tok, "wikitext2", fallback=True)
    assert ids.tolist() == [[1, 5, 1, 4, 4, 4, 1]]


def test_functions_warn_on_fallback_and_take_a_resolved_source(no_data):
    tok = WordTokenizer()
    with pytest.warns(DataFallbackWarning, match="WikiText-2 validation not found"):
        a = calibration_windows(tok, "wikitext2-valid", samples=3, seqlen=16, seed=1, fallback=True)
    resolved = calibration_text("wikitext2-valid", fallback=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller already holds the note: no second warning
        b = calibration_windows(tok, resolved, samples=3, seqlen=16, seed=1)
        c = eval_tokens(tok, eval_text("wikitext2", fallback=True))
    assert torch.equal(a, b) and a.shape == (3, 16)
    assert torch.equal(c, tok(load_text("stdlib")).input_ids)


# ----------------------------------------------------------------------------- sampling

def test_stream_windows_are_the_reference_draw():
    ids = torch.arange(1000)[None]
    got = calibration_windows_from_ids(ids, samples=5, seqlen=32, seed=3)
    random.seed(3)
    starts = [random.randint(0, 1000 - 32 - 1) for _ in range(5)]
    assert torch.equal(got, torch.stack([torch.arange(s, s + 32) for s in starts]))
    with pytest.raises(ValueError, match="32 tokens; a window of seqlen=32"):
        calibration_windows_from_ids(torch.arange(32), samples=1, seqlen=32, label="text")


def test_c4_windows_are_the_reference_draw(monkeypatch, tmp_path):
    rng = random.Random(0)
    docs = [" ".join("w" * rng.randint(1, 9) for _ in range(rng.choice([5, 20, 80]))) for _ in range(40)]
    _write_c4(tmp_path / C4_TRAIN, docs)
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    tok = WordTokenizer()
    got = calibration_windows(tok, "c4", samples=6, seqlen=30, seed=2)
    random.seed(2)  # the SparseGPT repository's get_c4 loop
    ref = []
    for _ in range(6):
        while True:
            enc = tok(docs[random.randint(0, len(docs) - 1)]).input_ids
            if enc.shape[1] > 30:
                break
        i = random.randint(0, enc.shape[1] - 30 - 1)
        ref.append(enc[:, i:i + 30])
    assert torch.equal(got, torch.cat(ref))


def test_c4_with_no_document_longer_than_seqlen_stops(monkeypatch, tmp_path, deadline):
    _write_c4(tmp_path / C4_TRAIN, ["a b c", "one two three four five six seven", "x y"])
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"calib 'c4'.*seqlen=64.*3 has 7") as err:
        calibration_windows(WordTokenizer(), "c4", samples=4, seqlen=64)
    assert "\n" not in str(err.value)


def test_c4_evaluation_text_is_the_first_1100_documents(monkeypatch, tmp_path):
    _write_c4(tmp_path / C4_VALID, [f"doc{i}" for i in range(1105)])
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    got = eval_text("c4")
    assert got.split == "validation" and got.text == " ".join(f"doc{i}" for i in range(1100))


# ----------------------------------------------------------------------------- unusable files

@pytest.mark.parametrize("content, reason", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"caf\xe9 au lait", "not UTF-8"),
    (b"", "empty"),
    (b"  \n\r\n ", "empty"),
])
def test_unusable_text_file_is_refused_naming_the_path(tmp_path, content, reason):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    for read in (lambda: load_text(str(path)),
                 lambda: calibration_windows(WordTokenizer(), str(path), samples=1, seqlen=2)):
        with pytest.raises(TextSourceError, match=reason) as err:
            read()
        assert isinstance(err.value, ValueError) and err.value.path == path
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unusable_local_data_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    (tmp_path / "c4").mkdir()
    (tmp_path / C4_TRAIN).write_bytes(b"not gzip")
    with pytest.raises(TextSourceError, match="gzip"):
        calibration_text("c4", fallback=True)  # a broken file is an error, not a fallback
    _write_c4(tmp_path / C4_TRAIN, ["fine"])
    with gzip.open(tmp_path / C4_TRAIN, "at", encoding="utf-8") as f:
        f.write('{"url": "no text"}\n')
    with pytest.raises(TextSourceError, match="line 2 .*'text'"):
        calibration_text("c4")
    with pytest.raises(TextSourceError, match="folder"):
        load_text(str(tmp_path))


def test_stdlib_text_is_read_once():
    assert data.stdlib_text() is data.stdlib_text()


def test_availability_is_told_without_reading(no_data, monkeypatch, tmp_path):
    assert data.hub_unavailable().startswith("offline")
    why = data.text_available("wikitext2")
    assert why.startswith("WikiText-2 test: SPARSEGPT_DATA_DIR unset") and "hub is offline" in why
    assert data.text_available("stdlib") is None
    assert "neither a file" in data.text_available(str(tmp_path / "missing.txt"))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / WIKI_TEST).write_text("text")
    monkeypatch.setenv("SPARSEGPT_DATA_DIR", str(tmp_path))
    assert data.text_available("wikitext2") is None
    assert "not in SPARSEGPT_DATA_DIR" in data.text_available("ptb")
