"""Qwen3 (dense): llama.cpp architecture `qwen3` (q/k RMS norms per head, no q/k/v biases)."""

from __future__ import annotations

import gguf

from .base import register
from .qwen2 import Qwen2Arch


@register
class Qwen3Arch(Qwen2Arch):
    title = "Qwen3 (dense)"
    hf_names = ("Qwen3ForCausalLM",)
    model_arch = gguf.MODEL_ARCH.QWEN3
