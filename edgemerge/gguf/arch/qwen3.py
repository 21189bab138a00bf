"""Qwen3 (dense): llama.cpp architecture `qwen3` (q/k RMS norms per head, no q/k/v biases)."""

from __future__ import annotations

import gguf

from .qwen2 import Qwen2Arch


class Qwen3Arch(Qwen2Arch):
    hf_names = ("Qwen3ForCausalLM",)
    model_arch = gguf.MODEL_ARCH.QWEN3
