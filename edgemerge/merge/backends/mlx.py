"""The MLX backend: Apple-silicon GPU through unified memory (CPU wheels on Linux, used by CI).

MLX is lazy: results are computed when a value leaves the backend (`sum`, `count`, `to_numpy`, ...), so each
tensor's graph is evaluated before the engine moves to the next tensor and memory stays per-tensor.
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np

_OUT = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


class MLXBackend:
    name = "mlx"

    def from_numpy(self, a: np.ndarray) -> mx.array:
        if a.dtype == ml_dtypes.bfloat16:
            # mlx cannot read numpy's bfloat16 extension type: pass the bits and reinterpret
            return mx.array(a.view(np.uint16)).view(mx.bfloat16).astype(mx.float32)
        return mx.array(a).astype(mx.float32)

    def mask_from_numpy(self, m: np.ndarray) -> mx.array:
        return mx.array(m)

    def abs(self, x: mx.array) -> mx.array:
        return mx.abs(x)

    def where(self, cond, a, b) -> mx.array:
        return mx.where(cond, a, b).astype(mx.float32)

    def sum(self, x: mx.array) -> float:
        # float64 (CPU only in MLX) so both backends get the same norm, hence the same rescaled values
        return mx.sum(x.astype(mx.float64, stream=mx.cpu), stream=mx.cpu).item()

    def count(self, mask: mx.array) -> int:
        return int(mx.sum(mask.astype(mx.int64)).item())

    def true_after(self, mask: mx.array, skip: int) -> mx.array:
        # MLX has no nonzero (shapes must be static): a running count finds the entries past the first `skip`
        count = mx.cumsum(mask.reshape(-1).astype(mx.int32)).reshape(mask.shape)
        return mask & (count > skip)

    def all_finite(self, x: mx.array) -> bool:
        return bool(mx.all(mx.isfinite(x)).item())

    def to_numpy(self, x: mx.array, dtype: str) -> np.ndarray:
        y = x.astype(_OUT[dtype])
        if dtype == "bfloat16":
            return np.array(y.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(y)
