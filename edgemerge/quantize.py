"""Quantization by llama.cpp itself: `llama_model_quantize` through llama-cpp-python, one call per file type.

The settings are llama.cpp's defaults (`llama_model_quantize_default_params`, the same as running its
`llama-quantize` tool without options) with the file type and thread count set, so our files are the bytes
llama.cpp would write. File type names are llama.cpp's (`LLAMA_FTYPE_MOSTLY_Q4_K_M` -> "Q4_K_M").

With an importance matrix (`imatrix=`), it is handed over as llama-quantize's `--imatrix` does: the weights
of `imatrix.importance` in `llama_model_quantize_params.imatrix`, and the `quantize.imatrix.*` keys as
key/value overrides, in its order.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.progress import Progress

from .child import child_command
from .errors import EdgemergeError
from .files import atomic_output, ensure_free_space
from .gguf.inspect import read_gguf
from .imatrix import check_fits, importance, read_imatrix
from .limits import MAX_THREADS, check_count, shown
from .progress import task

# llama.cpp refuses these without an importance matrix: in every model some weights get IQ1_S, IQ1_M, IQ2_XXS,
# IQ2_XS, IQ2_S, IQ3_XXS, or Q2_K of a Q2_K_S file (llama-quant.cpp: llama_tensor_get_type, tensor_requires_imatrix)
NEEDS_IMATRIX = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
)
# file types whose every tensor is quantized without looking at an importance matrix (ggml-quants.c: their
# quantize_* functions ignore quant_weights; the float types are copied or converted): an imatrix changes nothing
IGNORES_IMATRIX = frozenset({"F32", "F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0", "Q1_0", "MXFP4_MOE"})
# file types llama.h names that edgemerge does not offer, and why
NOT_OFFERED = {
    "NVFP4": "the pinned llama.cpp's quantizer refuses it (invalid output file type)",
    "Q2_0": "gguf-py cannot read its tensors (ggml type 42): the file could be neither checked nor evaluated",
}
# what llama-quantize records of the imatrix it used (tools/quantize/quantize.cpp)
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
LOG_TAIL = 16  # pieces of llama.cpp's log the quantizer child keeps for its error message
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]: llama-quantize strncpy's 127 bytes
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
        if m and m.group(1) not in NOT_OFFERED:
            out[m.group(1)] = int(getattr(llama_cpp, attr))
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def check_quant(quant: str, *, imatrix: bool = False) -> str:
    """Canonical name of a llama.cpp file type; unknown names are a user error listing the valid ones, and a
    type that needs an importance matrix is refused unless one is given (`imatrix`)."""
    types = quant_types()
    if not types:
        raise EdgemergeError("llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.16,<0.4'")
    name = quant.upper().removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
    if name not in types:
        valid = ", ".join(n for n in types if n not in NEEDS_IMATRIX)
        more = ", ".join(n for n in types if n in NEEDS_IMATRIX)
        raise EdgemergeError(
            f"unknown quantization type {shown(quant)}; valid types: {valid}; with --imatrix also: {more}"
        )
    if name in NEEDS_IMATRIX and not imatrix:
        raise EdgemergeError(
            f"{name} needs an importance matrix: compute one (edgemerge imatrix MODEL.gguf --lang LANG) and "
            "pass it with --imatrix FILE, or choose a type without one, e.g. Q4_K_M, IQ4_XS or Q3_K_M"
        )
    return name


def uses_imatrix(quant: str) -> bool:
    """Whether an importance matrix changes the file of llama.cpp type `quant` (a canonical name)."""
    return quant not in IGNORES_IMATRIX


def check_imatrix(imatrix: Path, src: Path) -> None:
    """The importance matrix file `imatrix` is readable and was computed on the model `src` (a GGUF);
    otherwise one line naming what does not match."""
    check_fits(read_imatrix(imatrix), read_gguf(src), imatrix)


def quant_file_name(name: str, quant: str) -> str:
    """The file of model `name` as llama.cpp type `quant`: NAME-Q4_K_M.gguf, the hub's convention (llama.cpp's
    converter writes NAME-F16.gguf; bartowski's and Unsloth's repos, and `llama-cli -hf user/repo:Q4_K_M`, use
    the same dash before the type). Every command names its GGUFs this way."""
    return f"{name}-{quant}.gguf"


def output_name(src: Path, quant: str) -> str:
    """model-f16.gguf + Q4_K_M -> model-Q4_K_M.gguf (the float type suffix is replaced, not appended)."""
    stem = re.sub(r"[-_.](f32|f16|bf16)$", "", Path(src).stem, flags=re.IGNORECASE)
    return quant_file_name(stem, quant)


def quantize(
    src: Path,
    quant: str,
    dst: Path,
    *,
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    imatrix: Path | None = None,
    imatrix_name: str | None = None,
) -> Path:
    """Quantize the float GGUF `src` to llama.cpp file type `quant` (e.g. "Q4_K_M"), written to `dst`.

    Uses all cores unless `threads` is given. `imatrix`: an importance matrix file (GGUF or legacy .dat, as
    llama-imatrix writes them) computed on this model, used as llama-quantize --imatrix uses it; its path is
    recorded in the output as given, or as `imatrix_name` (a build records the file's name, not the user's
    folders). Nothing appears at `dst` unless llama.cpp finished writing it.
    """
    name = check_quant(quant, imatrix=imatrix is not None)
    check_count("--threads", threads, 1, MAX_THREADS)
    src, dst = Path(src), Path(dst)
    info = read_gguf(src)  # not a GGUF / truncated -> one-line error before llama.cpp sees it
    if imatrix is not None:
        check_fits(read_imatrix(imatrix), info, imatrix)  # another model's imatrix -> one line, no output
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

    inputs = [src, imatrix]
    with atomic_output(dst, force=force, inputs=inputs) as tmp, task(progress, f"{name} {dst.name}", None):
        nthread = threads or os.cpu_count() or 1
        rc, said = run_quantizer(src, tmp, quant_types()[name], nthread, imatrix, imatrix_name)
        if rc != 0 or not tmp.is_file():
            reason = f": {said}" if said else " (it gave no reason)"
            raise EdgemergeError(f"llama.cpp could not quantize {src} to {name}{reason}")
    return dst


def quant_sizes(src: Path, quants: list[str]) -> dict[str, int]:
    """Bytes the file of each llama.cpp type in `quants` (canonical names) would take, without writing it:
    llama.cpp's own dry run (`llama_model_quantize_params.dry_run`, llama-quantize --dry-run) picks each
    tensor's type as a real run would and logs the tensor data's size in MiB; the file is that plus the header,
    taken as the float file's (the same keys and tensor list: within a few KB, tested).

    The types that need an importance matrix are sized too (the dry run only warns)."""
    src = Path(src)
    info = read_gguf(src)
    if info.kv.get("general.file_type", 1) not in _FLOAT_FTYPES:
        raise EdgemergeError(
            f"{src} is already quantized; size the quants of the F16, BF16 or F32 GGUF instead"
        )
    names = [check_quant(q, imatrix=True) for q in quants]
    ftypes = [str(quant_types()[n]) for n in names]
    rc, out, err = _run_child(
        child_command("edgemerge.quantize", "_sizes_main", str(src), *ftypes), stdout=True
    )
    if rc != 0:
        raise EdgemergeError(
            f"llama.cpp could not size the quants of {src}: {last_line(err) or 'it gave no reason'}"
        )
    mib = json.loads(out.decode().strip().splitlines()[-1])  # the child's last line; llama.cpp logs elsewhere
    return {n: info.data_offset + round(mib[f] * 2**20) for n, f in zip(names, ftypes, strict=True)}


def _sizes_main(src: str, *ftypes: str) -> int:
    """The child of `quant_sizes`: one dry run per file type; prints {ftype: MiB of tensor data} as JSON."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import llama_cpp  # loads the llama.cpp library: only in this child

    said: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        said.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="edgemerge-dry-run-") as tmp:
        dst = os.path.join(tmp, "never-written.gguf")
        for ftype in ftypes:
            said.clear()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread, params.dry_run = int(ftype), 1, True
            rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
            m = re.search(r"quant size\s*=\s*([0-9.]+) MiB", "".join(said))
            if rc != 0 or m is None or os.path.exists(dst):
                print("".join(said[-LOG_TAIL:]) or f"dry run of file type {ftype} failed", file=sys.stderr)
                return 1
            sizes[ftype] = float(m.group(1))
    print(json.dumps(sizes))
    return 0


def run_quantizer(
    src: Path,
    dst: Path,
    ftype: int,
    nthread: int,
    imatrix: Path | None = None,
    imatrix_name: str | None = None,
) -> tuple[int, str]:
    """`llama_model_quantize` with llama.cpp's default parameters, in a child process; its return code and the
    last line llama.cpp logged (only errors are logged: the reason it failed).

    llama.cpp's quantizer has no abort callback and a Ctrl-C raised in its log callback is lost (see
    interrupts.py), so it runs where it can be stopped: on Ctrl-C (or any exception) the child is killed at
    once and the KeyboardInterrupt goes on to the caller, whose atomic_output removes the partial file.
    The child reads the `imatrix` file itself (its arrays must live through the call, in its memory)."""
    extra = () if imatrix is None else (str(imatrix), imatrix_name or str(imatrix))
    argv = child_command(
        "edgemerge.quantize", "_quantizer_main", str(src), str(dst), str(ftype), str(nthread), *extra
    )
    rc, _, err = _run_child(argv)
    return rc, last_line(err)


def _run_child(argv: list[str], *, stdout: bool = False) -> tuple[int, bytes, str]:
    """Run a child to its end: its return code, stdout (when captured) and stderr; on Ctrl-C (or any exception)
    it is killed at once and the exception goes on."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if stdout else None, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc.returncode, out or b"", err.decode("utf-8", errors="replace")


def last_line(log: str) -> str:
    """The last non-empty line of llama.cpp's log without the function name it starts with, at most 300
    characters ("llama_model_quantize: failed to quantize: X" -> "failed to quantize: X")."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return re.sub(r"^\w+: ", "", lines[-1])[:300] if lines else ""


def _quantizer_main(
    src: str, dst: str, ftype: str, nthread: str, imatrix: str | None = None, imatrix_name: str | None = None
) -> int:
    """The child process of `run_quantizer`: SIGINT is the parent's business, and the child dies with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import llama_cpp

    # llama.cpp logs every tensor, and why it failed only at INFO level: keep its last lines, say them on failure
    recent: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)

    @llama_cpp.llama_log_callback
    def keep_recent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        recent.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep_recent, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    keep = None
    if imatrix is not None:
        try:
            keep = _imatrix_params(params, imatrix, imatrix_name or imatrix)
        except EdgemergeError as e:  # the file changed since the parent checked it
            print(f"error: {e.message}", file=sys.stderr)
            return 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    del keep  # the arrays llama.cpp read from
    if rc != 0:
        print("".join(recent), file=sys.stderr)
    return int(rc != 0)


def _imatrix_params(params, path: str, recorded: str) -> list:
    """Fill `params.imatrix` and `params.kv_overrides` as llama-quantize's main() does for `--imatrix path`:
    one {name, data, size} per entry and a {NULL, NULL, 0} terminator; the overrides quantize.imatrix.file
    (`recorded`),
    .dataset (the first dataset, if any), .entries_count and .chunks_count (if above 0), ended by an empty key.
    Returns the objects the pointers point into (they must outlive the call)."""
    import llama_cpp  # loads the llama.cpp library: only in the quantizer's child process

    imx = read_imatrix(Path(path))
    names = sorted(imx.entries)
    weights = [np.ascontiguousarray(importance(imx.entries[n], legacy=imx.legacy)) for n in names]
    data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()  # zeroed: the last one terminates
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        data[i].name = name.encode()
        data[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        data[i].size = w.size
    params.imatrix = data
    overrides: list[tuple[str, int | bytes]] = [(KEY_IMATRIX_FILE, os.fsencode(recorded)[:_KV_STR_MAX])]
    if imx.datasets:
        overrides.append((KEY_IMATRIX_DATASET, imx.datasets[0].encode()[:_KV_STR_MAX]))
    overrides.append((KEY_IMATRIX_ENTRIES, len(names)))
    if imx.chunk_count > 0:
        overrides.append((KEY_IMATRIX_CHUNKS, imx.chunk_count))
    kvo = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()  # the last one's empty key ends them
    for slot, (key, value) in zip(kvo, overrides, strict=False):  # kvo has one slot more
        slot.key = key.encode()
        if isinstance(value, bytes):
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            slot.value.val_str = value
        else:
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            slot.value.val_i64 = value
    params.kv_overrides = kvo
    return [data, weights, kvo]
