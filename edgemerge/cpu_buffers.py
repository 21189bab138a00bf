"""llama.cpp's extra CPU buffer types (weights repacked for the CPU's matrix instructions: CPU_REPACK, AMX, ...)
and the one edgemerge keeps out.

In the pinned llama.cpp, AMX's matrix multiplication crashes the process (SIGSEGV in ggml_backend_amx_mul_mat)
on any quantized model as soon as one batch holds more than 256 tokens: seen on a Xeon with amx_int8 for Q8_0,
Q6_K, Q5_K_M, Q4_K_M, Q4_0 and IQ4_XS, and reported upstream (llama.cpp issue 20824). Every perplexity, drift and
imatrix pass decodes 512 tokens at once. `llama_model_params.use_extra_bufts` is all or nothing, so where this
llama.cpp offers AMX, models load with no extra buffer type (repacking too); elsewhere llama.cpp's default stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type (ggml-backend.h)
# extra buffer types whose kernels crash in the pinned llama.cpp (module docstring)
BROKEN = frozenset({"AMX"})


@functools.cache
def ggml_library(name: str) -> ctypes.CDLL:
    """A ggml library llama-cpp-python ships ("ggml", "ggml-base"), the one its libllama links (already loaded,
    so the same instance); one CDLL per library, whose functions each caller declares."""
    import llama_cpp  # loads the llama.cpp libraries: only when a model runs
    from llama_cpp._ctypes_extensions import load_shared_library  # its platform rules for library names

    return load_shared_library(name, Path(llama_cpp.__file__).parent / "lib")


@functools.cache
def extra_buffer_types() -> tuple[str, ...]:
    """Names of the extra buffer types llama.cpp's CPU device offers on this machine, as llama-model.cpp finds
    them (the registry's `ggml_backend_dev_get_extra_bufts`)."""
    ggml, base = ggml_library("ggml"), ggml_library("ggml-base")
    ggml.ggml_backend_dev_by_type.argtypes, ggml.ggml_backend_dev_by_type.restype = (
        [ctypes.c_int],
        ctypes.c_void_p,
    )
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_buft_name.argtypes, base.ggml_backend_buft_name.restype = (
        [ctypes.c_void_p],
        ctypes.c_char_p,
    )
    dev = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        return ()
    reg = base.ggml_backend_dev_backend_reg(dev)
    fn = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return ()
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    names = []
    i = 0
    while bufts and bufts[i]:  # NULL-terminated
        names.append(base.ggml_backend_buft_name(bufts[i]).decode())
        i += 1
    return tuple(names)


def use_extra_buffers() -> bool:
    """Whether models may load into llama.cpp's extra CPU buffer types here (none of them is BROKEN)."""
    return not BROKEN.intersection(extra_buffer_types())


@contextlib.contextmanager
def model_params() -> Iterator[None]:
    """A `llama_cpp.Llama(...)` made inside loads with use_extra_bufts = `use_extra_buffers()`.

    llama-cpp-python's Llama has no argument for it: the default parameters it starts from are wrapped for the
    duration of the call (models are loaded from one thread)."""
    import llama_cpp.llama_cpp as low  # the module whose defaults Llama.__init__ reads

    if use_extra_buffers():
        yield
        return
    default = low.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        low.llama_model_default_params = default
