"""The PyTorch backend (CPU, one intra-op thread: see TorchBackend)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

_OUT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TorchBackend:
    name = "torch"

    def __init__(self):
        # pieces are cache-sized (tensors.stream.BLOCK_ELEMENTS): waking a thread pool per op costs more than the
        # op, and the other cores read ahead and write (measured: README, performance)
        torch.set_num_threads(1)

    def from_numpy(self, a: np.ndarray) -> torch.Tensor:
        if a.dtype == ml_dtypes.bfloat16:
            # torch has no numpy bfloat16: reinterpret the bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(a).float()

    def mask_from_numpy(self, m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(m)

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()

    def where(self, cond, a, b) -> torch.Tensor:
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.tensor(a, dtype=torch.float32)
        return torch.where(cond, a, b)

    def sum(self, x: torch.Tensor) -> float:
        return float(x.sum(dtype=torch.float64))

    def count(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def true_after(self, mask: torch.Tensor, skip: int) -> torch.Tensor:
        where = mask.reshape(-1).nonzero().squeeze(1)  # only the True entries: few next to the tensor
        out = torch.zeros_like(mask)
        out.view(-1)[where[skip:]] = True
        return out

    def all_finite(self, x: torch.Tensor) -> bool:
        # a finite sum proves every entry finite in one read-only pass (isfinite(x).all() was a tenth of a
        # merge's time); only a non-finite sum, possibly an overflow of large finite values, needs the full test
        return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())

    def to_numpy(self, x: torch.Tensor, dtype: str) -> np.ndarray:
        y = x.to(_OUT[dtype]).contiguous()
        if dtype == "bfloat16":
            return y.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return y.numpy()
