"""Quantization by llama.cpp itself: `llama_model_quantize` through llama-cpp-python, one call per file type.

The settings are llama.cpp's defaults (`llama_model_quantize_default_params`, the same as running its
`llama-quantize` tool without options) with the file type and thread count set, so our files are the bytes
llama.cpp would write. File type names are llama.cpp's (`LLAMA_FTYPE_MOSTLY_Q4_K_M` -> "Q4_K_M").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from rich.progress import Progress

from .child import child_command
from .errors import EdgemergeError
from .files import atomic_output, ensure_free_space
from .gguf.inspect import read_gguf
from .limits import MAX_THREADS, check_count, shown
from .progress import task

# llama.cpp's llama-quantize refuses these without an importance matrix (edgemerge does not compute one)
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
# float file types a GGUF can be quantized from (llama.cpp would need allow_requantize otherwise)
_FLOAT_FTYPES = {0: "F32", 1: "F16", 32: "BF16"}


@functools.cache
def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name, read from llama-cpp-python's LLAMA_FTYPE_* constants ({} when
    llama-cpp-python is missing: `check_quant` says so)."""
    # llama_cpp loads the llama.cpp library: only when a quant type is checked or a model quantized
    try:
        import llama_cpp
    except ImportError:
        return {}

    out = {}
    for attr in dir(llama_cpp):
        m = re.fullmatch(r"LLAMA_FTYPE_(?:MOSTLY_|ALL_)(\w+)", attr)
        if m:
            out[m.group(1)] = int(getattr(llama_cpp, attr))
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def check_quant(quant: str) -> str:
    """Canonical name of a llama.cpp file type; unknown names are a user error listing the valid ones."""
    types = quant_types()
    if not types:
        raise EdgemergeError("llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.16,<0.4'")
    name = quant.upper().removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
    if name not in types:
        valid = ", ".join(n for n in types if n not in NEEDS_IMATRIX)
        raise EdgemergeError(f"unknown quantization type {shown(quant)}; valid types: {valid}")
    if name in NEEDS_IMATRIX:
        raise EdgemergeError(
            f"{name} needs an importance matrix, which edgemerge does not compute; choose e.g. Q4_K_M, IQ4_XS or Q3_K_M"
        )
    return name


def output_name(src: Path, quant: str) -> str:
    """model-f16.gguf + Q4_K_M -> model-Q4_K_M.gguf (the float type suffix is replaced, not appended)."""
    stem = re.sub(r"[-_.](f32|f16|bf16)$", "", Path(src).stem, flags=re.IGNORECASE)
    return f"{stem}-{quant}.gguf"


def quantize(
    src: Path,
    quant: str,
    dst: Path,
    *,
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Quantize the float GGUF `src` to llama.cpp file type `quant` (e.g. "Q4_K_M"), written to `dst`.

    Uses all cores unless `threads` is given. Nothing appears at `dst` unless llama.cpp finished writing it.
    """
    name = check_quant(quant)
    check_count("--threads", threads, 1, MAX_THREADS)
    src, dst = Path(src), Path(dst)
    info = read_gguf(src)  # not a GGUF / truncated -> one-line error before llama.cpp sees it
    src_type = info.kv.get("general.file_type")
    if src_type is not None and src_type not in _FLOAT_FTYPES:
        raise EdgemergeError(
            f"{src} is already quantized (file type {src_type}); quantize from the F16, BF16 or F32 GGUF instead"
        )
    if src.resolve() == dst.resolve():
        raise EdgemergeError(f"output {dst} is the input file; choose another output name")
    size = src.stat().st_size
    # quantized output is smaller than its float input, except F32 from a 16-bit input (twice the size)
    ensure_free_space(dst.parent, size * (2 if name == "F32" else 1), f"the {name} file {dst.name}")

    with atomic_output(dst, force=force, inputs=[src]) as tmp, task(progress, f"{name} {dst.name}", None):
        rc = run_quantizer(src, tmp, quant_types()[name], threads or os.cpu_count() or 1)
        if rc != 0 or not tmp.is_file():
            raise EdgemergeError(f"llama.cpp could not quantize {src} to {name} (see its message above)")
    return dst


def run_quantizer(src: Path, dst: Path, ftype: int, nthread: int) -> int:
    """`llama_model_quantize` with llama.cpp's default parameters, in a child process; its return code.

    llama.cpp's quantizer has no abort callback and a Ctrl-C raised in its log callback is lost (see
    interrupts.py), so it runs where it can be stopped: on Ctrl-C (or any exception) the child is killed at
    once and the KeyboardInterrupt goes on to the caller, whose atomic_output removes the partial file."""
    argv = child_command(
        "edgemerge.quantize", "_quantizer_main", str(src), str(dst), str(ftype), str(nthread)
    )
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _quantizer_main(src: str, dst: str, ftype: str, nthread: str) -> int:
    """The child process of `run_quantizer`: SIGINT is the parent's business, and the child dies with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every tensor; keep errors only
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0)
