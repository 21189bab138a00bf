"""Qwen2 / Qwen2.5: llama.cpp architecture `qwen2` (biases on q/k/v, no rotary permutation)."""

from __future__ import annotations

import gguf

from .base import Arch, register


@register
class Qwen2Arch(Arch):
    title = "Qwen2 / Qwen2.5"
    hf_names = ("Qwen2ForCausalLM",)
    model_arch = gguf.MODEL_ARCH.QWEN2
    vocab_kinds = ("sentencepiece", "gpt2")
