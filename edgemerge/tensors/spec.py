"""What a stream of tensors is made of: each tensor's name, shape and dtype, and where a model keeps them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the merge will produce it: Hugging Face name, shape, output dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16" | "float16" | "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "float32" else 2)


@dataclass
class ModelTensors:
    """Where each tensor of one model lives, with its shape and safetensors dtype."""

    label: str  # e.g. "instruct (meta-llama/Llama-3.1-8B-Instruct)"
    files: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
