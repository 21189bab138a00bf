"""Llama family (Llama 2/3.x, Mistral 7B): llama.cpp architecture `llama`.

Quirks: llama.cpp's rotary embedding pairs adjacent dimensions while Hugging Face's pairs the two halves of a
head, so q_proj/k_proj rows are permuted (the converter's `LlamaModel.permute`); Llama 3.1+ "llama3" RoPE
scaling becomes a `rope_freqs` tensor. Tied embeddings (Llama 3.2 1B/3B) need nothing: the checkpoint has no
lm_head, so there is no output.weight and llama.cpp reuses token_embd (an lm_head that is there is written, as
the converter does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from .base import Arch, register


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head reordered from halves [x0..x(d/2-1), y0..] to interleaved pairs [x0, y0, x1, y1, ...]:
    W.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(W.shape)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_PERMUTED = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")


@register
class LlamaArch(Arch):
    title = "Llama 2/3.x (incl. 3.2 1B/3B), Mistral"
    hf_names = ("LlamaForCausalLM", "MistralForCausalLM")
    model_arch = gguf.MODEL_ARCH.LLAMA
    # SentencePiece tokenizer.model first (Llama 2, Mistral), then an SPM-style tokenizer.json, then BPE (Llama 3)
    vocab_kinds = ("sentencepiece", "llama_hf", "gpt2")

    def transforms(self, hf_name: str) -> bool:
        return hf_name.endswith(_PERMUTED)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        n_head = self.find(["n_heads", "num_attention_heads"])
        n_kv = self.find(["n_kv_heads", "num_key_value_heads"])
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_qk(data, n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_qk(data, n_kv if n_kv is not None else n_head)
        return data

    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        super().write_params(w, file_type)
        w.add_vocab_size(self.hparams["vocab_size"])
        if (rope_dim := self.hparams.get("head_dim")) is None:
            rope_dim = self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)

    def write_vocab_extras(self, w: gguf.GGUFWriter, model_dir: Path) -> None:
        cfg = Path(model_dir) / "tokenizer_config.json"
        if cfg.is_file():
            prefix = json.loads(cfg.read_text(encoding="utf-8")).get("add_prefix_space")
            if prefix is not None:
                w.add_add_space_prefix(prefix)

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        if not rope or rope.get("rope_type", "").lower() != "llama3":
            return
        # torch, as in the converter, so the float32 rounding of the frequencies is the same
        import torch

        base = rope.get("rope_theta", 10000.0)
        if (dim := self.hparams.get("head_dim")) is None:
            dim = self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = rope.get("factor", 8.0)
        low = rope.get("low_freq_factor", 1.0)
        high = rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield name, torch.tensor(factors, dtype=torch.float32).numpy()
