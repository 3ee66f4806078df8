"""CPU kernels for sparse (bitmask and csr16) and 16-bit linear layers (``csrc/bitmask_linear.c``).

The C source is compiled once per machine with the system C compiler (``cc -O3 -march=native
-fopenmp``) into the cache folder (:func:`sparsegpt_utils.paths.cache_dir`) and called through
``ctypes`` with the tensors' data pointers: no build step at install time, and no toolchain
beyond a C compiler. Where none is found, :func:`load` returns None and the layers fall back to
torch's own kernels (decompress + matmul).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .paths import cache_dir
from .results import write_atomic

__all__ = ["load", "available", "build_error", "compile_library", "bind", "gemv", "decompress", "half_gemv",
           "csr16_gemv", "csr16_decompress", "isa", "pointers", "threads", "using", "ISA_FLAGS"]

SOURCE = Path(__file__).with_name("csrc") / "bitmask_linear.c"
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


# compiler flags per target: this CPU's own instructions, AVX2 (+ F16C, FMA) only, or none
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mf16c", "-mfma"], "portable": []}


def compile_library(target: Path, isa: str = "native") -> Path:
    """Compile the kernels into the shared library ``target`` (atomically) for ``isa``, a key of
    :data:`ISA_FLAGS`: ``"native"`` (what this CPU has), ``"avx2"`` (the AVX2 path even on an
    AVX-512 CPU, to test it), ``"portable"`` (no CPU-specific instructions)."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa must be one of {sorted(ISA_FLAGS)}, got {isa!r}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", "-fPIC", "-shared", *ISA_FLAGS[isa]]

    def build(tmp: str) -> None:
        for extra in (["-fopenmp"], []):  # OpenMP where the compiler has it
            proc = subprocess.run([cc, *flags, *extra, str(SOURCE), "-o", tmp], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode == 0:
                return
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")

    write_atomic(target, build)
    return target


def bind(path: str | Path) -> ctypes.CDLL:
    """Load a library built by :func:`compile_library` and declare its functions."""
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bitmask_gemv.argtypes = [p, p, p, p, p, p, i64, i64, i32]
    lib.bitmask_decompress.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.half_gemv.argtypes = [p, p, p, i64, i64, i32]
    lib.csr16_gemv.argtypes = [p, p, p, p, p, p, i64, i32]
    lib.csr16_decompress.argtypes = [p, p, p, p, i64, i64, i32]
    lib.sgpt_has_avx512.restype = i32
    lib.sgpt_isa.restype = i32
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot be built
    (:func:`build_error` says why). ``SPARSEGPT_NO_KERNELS=1`` turns them off."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("SPARSEGPT_NO_KERNELS"):
        _error = "turned off by SPARSEGPT_NO_KERNELS"
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"bitmask_linear-{key}.so"
    try:
        if not target.exists():
            compile_library(target)
        _lib = bind(target)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _error = str(err)
        return None
    return _lib


@contextlib.contextmanager
def using(lib: ctypes.CDLL):
    """Run the layers on ``lib`` (a library from :func:`bind`, e.g. the AVX2 or portable build)
    inside the ``with`` block: to compare builds in one process. Layers bind the library on
    their first call, so use fresh layers (or copies) per build."""
    global _lib, _tried
    saved = (_lib, _tried)
    _lib, _tried = lib, True
    try:
        yield lib
    finally:
        _lib, _tried = saved


def available() -> bool:
    return load() is not None


def build_error() -> str | None:
    load()
    return _error


def isa() -> str:
    """The code path the loaded kernels run: ``"avx512"``, ``"avx2"``, ``"portable"``, or
    ``"none"`` where they could not be built."""
    lib = load()
    return "none" if lib is None else ("portable", "avx2", "avx512")[lib.sgpt_isa()]


def threads() -> int:
    return torch.get_num_threads()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pointers(*tensors: torch.Tensor | None) -> tuple[int | None, ...]:
    """The data pointers of contiguous CPU tensors (None for None), to bind into a kernel call."""
    for t in tensors:
        if t is not None and not (t.device.type == "cpu" and t.is_contiguous()):
            raise ValueError("the kernels need contiguous CPU tensors")
    return tuple(_ptr(t) for t in tensors)


def gemv(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
         bias: torch.Tensor | None, rows: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W x (+ bias)`` for one token: x float32 [words·32] (zero-padded), masks int32
    [rows, words], values int16 (fp16 bits, padded), offsets int64 [rows + 1] → float32 [rows]."""
    y = torch.empty(rows, dtype=torch.float32)
    (lib or load()).bitmask_gemv(_ptr(x), _ptr(masks), _ptr(values), _ptr(offsets), _ptr(bias), _ptr(y),
                        rows, masks.shape[1], threads())
    return y


def decompress(masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, rows: int, cols: int,
               out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The dense float32 weight [rows, cols] (into ``out`` when given)."""
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.float32)
    (lib or load()).bitmask_decompress(_ptr(masks), _ptr(values), _ptr(offsets), _ptr(out), rows, cols,
                              masks.shape[1], threads())
    return out


def half_gemv(x: torch.Tensor, weight16: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W x`` for a dense fp16 weight [rows, cols] (int16 bits) and float32 x [cols]."""
    rows, cols = weight16.shape
    y = torch.empty(rows, dtype=torch.float32)
    (lib or load()).half_gemv(_ptr(x), _ptr(weight16), _ptr(y), rows, cols, threads())
    return y


def csr16_gemv(x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor,
               bias: torch.Tensor | None, rows: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W x (+ bias)`` for one token, W in csr16 form: x float32 [cols], idx int16 (uint16 column
    bits) and vals int16 (fp16 bits), both [kept + 16], offsets int64 [rows + 1] → float32 [rows]."""
    y = torch.empty(rows, dtype=torch.float32)
    (lib or load()).csr16_gemv(_ptr(x), _ptr(idx), _ptr(vals), _ptr(offsets), _ptr(bias), _ptr(y), rows,
                               threads())
    return y


def csr16_decompress(idx: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor, rows: int, cols: int,
                     out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The dense float32 weight [rows, cols] of a csr16 matrix (into ``out`` when given)."""
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.float32)
    (lib or load()).csr16_decompress(_ptr(idx), _ptr(vals), _ptr(offsets), _ptr(out), rows, cols, threads())
    return out
