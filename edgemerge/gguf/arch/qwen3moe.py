"""Qwen3 mixture-of-experts (Qwen3-30B-A3B, Qwen3-235B-A22B): llama.cpp architecture `qwen3moe`.

Each layer has a router (`mlp.gate`, kept in F32 as llama.cpp wants it) and `num_experts` experts with their
own gate/up/down projections, one Hugging Face tensor each (`mlp.experts.{e}.up_proj.weight`). llama.cpp
stores them stacked, one `ffn_{gate,up,down}_exps` tensor per layer: expert e is slice e of it (the base
class's `stack_slot`), and the GGUF sink writes the slices one after the other, so no stack is ever held.
Mirrors the converter's `Qwen3MoeModel` (conversion/qwen.py): byte-level BPE vocabulary only, the expert feed-
forward length as its own key.
"""

from __future__ import annotations

from typing import Any

import gguf

from ...errors import EdgemergeError
from .base import Arch, register


@register
class Qwen3MoeArch(Arch):
    title = "Qwen3 MoE"
    hf_names = ("Qwen3MoeForCausalLM",)
    model_arch = gguf.MODEL_ARCH.QWEN3MOE

    def __init__(self, hparams: dict[str, Any]):
        super().__init__(hparams)
        # llama.cpp's qwen3moe makes every layer a sparse one and always renormalises the top-k router weights
        if hparams.get("mlp_only_layers") or hparams.get("decoder_sparse_step", 1) != 1:
            raise EdgemergeError(
                "config.json makes some Qwen3 MoE layers dense (mlp_only_layers / decoder_sparse_step), which "
                "llama.cpp's qwen3moe cannot run; restore the model's own config.json"
            )
        if hparams.get("norm_topk_prob") is False:
            raise EdgemergeError(
                "config.json sets norm_topk_prob false, but llama.cpp's qwen3moe always renormalises the "
                "chosen experts' weights (the released Qwen3 MoE models set it true); restore the model's own "
                "config.json"
            )

    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        super().write_params(w, file_type)
        if (n_ff_exp := self.hparams.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff_exp)
        if (n_ff_shexp := self.hparams.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shexp)
