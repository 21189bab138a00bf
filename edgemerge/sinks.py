"""Where merged tensors go. The merge engine streams into a `Sink` without knowing which one it feeds.

Contract: `open(specs)` receives every tensor's name, shape and dtype before any data and returns the order
in which the sink wants them (it writes headers first, then data in that order); `write(name, array)` is
called once per tensor in that order with a numpy array of dtype float32, float16 or ml_dtypes.bfloat16;
`close()` finishes the files. Sinks write into a temporary path the caller renames on success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the merge will produce it: Hugging Face name, shape, output dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16" | "float16" | "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * (4 if self.dtype == "float32" else 2)


class Sink(Protocol):
    def open(self, specs: list[TensorSpec]) -> list[str]:
        """Prepare the output for these tensors; return the names in the order they must be written."""
        ...

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor (dtype float32, float16 or ml_dtypes.bfloat16), in the order `open` returned."""
        ...

    def close(self) -> None:
        """Finish the output (flush, close files)."""
        ...
