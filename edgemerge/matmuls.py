"""Watching llama.cpp multiply by a model's weights: its graph scheduler's eval callback (`cb_eval` of
llama_context_params) shows us each weight multiplication's input activations, as llama-imatrix sees them.

llama-cpp-python exposes the callback's type but not `struct ggml_tensor`, so its layout (ggml.h of the pinned
llama.cpp) is declared here and checked against `ggml_nbytes` on the first tensor we read.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .cpu_buffers import ggml_library

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26
MIN_ROWS = 16  # llama-imatrix ignores multiplications of fewer activation rows (its collect_imatrix)


class _Tensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h)."""


_Tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(_Tensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


@functools.cache
def _ggml() -> Any:
    """ggml's base library with the functions read here declared."""
    lib = ggml_library("ggml-base")
    lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def weight_name(name: str) -> str:
    """llama-imatrix's filter_tensor_name: the part between the first two '#' when there is one."""
    if "#" in name:
        return name.split("#", 2)[1]
    return name


@dataclass(frozen=True)
class MatMul:
    """One multiplication by weight `weight` (shape `weight_shape`, ggml order ne0..ne3): the input
    activations `x`, float32 [ne3, ne2, ne1, ne0] (valid only during the call), and for a mixture-of-experts
    multiplication (MUL_MAT_ID) the chosen experts `expert_ids`, int32 [n_tokens, n_used]."""

    weight: str
    weight_shape: tuple[int, int, int, int]
    x: np.ndarray
    expert_ids: np.ndarray | None = None


class MatmulObserver:
    """The eval callback: `on_matmul(MatMul)` for each weight multiplication that llama-imatrix collects:
    every MUL_MAT_ID, and every MUL_MAT of F32 activations with at least 16 rows whose weight is a `blk.`
    tensor (or `output.weight` when `output`). An exception inside is kept in `error` (ctypes would print and
    drop it) and stops the graph; the caller raises it after llama_decode (`raise_error`)."""

    def __init__(self, on_matmul: Callable[[MatMul], None], *, output: bool = False):
        self.on_matmul, self.output = on_matmul, output
        self.error: BaseException | None = None
        self._ops: dict[int, str] = {}
        self._checked = False

    def _op(self, op: int) -> str:
        name = self._ops.get(op)
        if name is None:
            name = self._ops[op] = _ggml().ggml_op_name(op).decode()
        return name

    def __call__(self, ptr: int | None, ask: bool, user_data: int | None) -> bool:
        if self.error is not None or not ptr:
            return False
        try:
            t = ctypes.cast(ptr, ctypes.POINTER(_Tensor)).contents
            op = self._op(t.op)
            if op not in ("MUL_MAT", "MUL_MAT_ID"):
                return False
            w, a = t.src[0].contents, t.src[1].contents
            name = weight_name(w.name.decode("utf-8", errors="replace"))
            if ask:
                if op == "MUL_MAT_ID":
                    return True
                wanted = name.startswith("blk.") or (self.output and name == "output.weight")
                return a.ne[1] >= MIN_ROWS and a.type == GGML_TYPE_F32 and wanted
            ids = _read(t.src[2].contents, GGML_TYPE_I32, self) if op == "MUL_MAT_ID" else None
            x = _read(a, GGML_TYPE_F32, self)
            self.on_matmul(MatMul(name, tuple(w.ne), x, None if ids is None else ids[0, 0]))
            return True
        except BaseException as e:  # noqa: BLE001 - kept and raised by the caller after llama_decode
            self.error = e
            return False

    def raise_error(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e


def _read(t: _Tensor, dtype: int, observer: MatmulObserver) -> np.ndarray:
    """Tensor `t` as a numpy array [ne3, ne2, ne1, ne0] (a view of host memory, else a copy)."""
    lib = _ggml()
    if t.type != dtype:
        raise RuntimeError(f"tensor {t.name!r} has ggml type {t.type}, {dtype} was expected")
    nbytes = lib.ggml_nbytes(ctypes.addressof(t))
    if not observer._checked:  # the declared layout must be this llama.cpp's: ne and nb give ggml's own size
        size = 4 + sum((t.ne[i] - 1) * t.nb[i] for i in range(GGML_MAX_DIMS) if t.ne[i] > 0)
        if size != nbytes or t.nb[0] != 4:
            raise RuntimeError("struct ggml_tensor of this llama.cpp differs from the one edgemerge declares")
        observer._checked = True
    if lib.ggml_backend_buffer_is_host(t.buffer):
        flat = np.frombuffer((ctypes.c_char * nbytes).from_address(t.data), dtype=np.uint8)
    else:
        flat = np.empty(nbytes, dtype=np.uint8)
        lib.ggml_backend_tensor_get(ctypes.addressof(t), flat.ctypes.data, 0, nbytes)
    shape = tuple(int(t.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(GGML_MAX_DIMS)))
    kind = np.float32 if dtype == GGML_TYPE_F32 else np.int32
    return as_strided(flat.view(kind), shape=shape, strides=strides, writeable=False)
