"""Array backends for the merge: the small interface the methods are written against.

A backend turns numpy arrays read from safetensors into float32 arrays of its framework, does the arithmetic
(operators `+ - * /`, comparisons and `& | ~` work on its arrays directly) and rounds the result once to the
output dtype on the way back to numpy. `torch` runs everywhere; `mlx` uses Apple-silicon GPUs (and has CPU wheels
for Linux, which is how CI checks it gives the same results).
"""

from __future__ import annotations

import platform
from typing import Any, Protocol

import numpy as np

from ...errors import EdgemergeError

BACKENDS = ("auto", "torch", "mlx")

Array = Any  # a torch.Tensor or an mlx.core.array


class Backend(Protocol):
    name: str

    def from_numpy(self, a: np.ndarray) -> Array:
        """A float32 array with the values of `a` (float32, float16 or ml_dtypes.bfloat16), owned by the caller:
        methods update it in place (`x -= y`, which torch does in place and mlx as a new array), so it may
        share memory with `a` only because the caller gives `a` up."""
        ...

    def mask_from_numpy(self, m: np.ndarray) -> Array:
        """A boolean array from a numpy bool array."""
        ...

    def abs(self, x: Array) -> Array: ...

    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        """Elementwise `a if cond else b`, float32."""
        ...

    def sum(self, x: Array) -> float:
        """Sum of all elements, accumulated in float64, as a Python float."""
        ...

    def count(self, mask: Array) -> int:
        """Number of True elements."""
        ...

    def true_after(self, mask: Array, skip: int) -> Array:
        """`mask` with its first `skip` True entries (row-major order) set to False."""
        ...

    def all_finite(self, x: Array) -> bool:
        """No NaN or Inf in `x`."""
        ...

    def to_numpy(self, x: Array, dtype: str) -> np.ndarray:
        """Round the float32 `x` to `dtype` (bfloat16 | float16 | float32; round-to-nearest-even) as numpy."""
        ...


def mlx_available() -> bool:
    try:
        # mlx is optional (Apple silicon)
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend_name(name: str) -> str:
    """`auto` -> `mlx` on Apple silicon with mlx installed, else `torch`; other names are checked."""
    if name not in BACKENDS:
        raise EdgemergeError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "mlx" if apple and mlx_available() else "torch"
    if name == "mlx" and not mlx_available():
        raise EdgemergeError(
            'the MLX backend needs mlx: install it with pip install -e ".[mlx]" (or pass --backend torch)'
        )
    return name


def get_backend(name: str = "torch") -> Backend:
    """The backend called `name` (auto | torch | mlx), ready to use."""
    name = resolve_backend_name(name)
    if name == "mlx":
        from .mlx import MLXBackend

        return MLXBackend()
    # torch is heavy to import (seconds): loaded only where its arithmetic is needed
    from .torch import TorchBackend

    return TorchBackend()
