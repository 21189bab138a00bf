"""Gemma 3 (text): llama.cpp architecture `gemma3`, from `Gemma3ForCausalLM` or the language model inside
`Gemma3ForConditionalGeneration`. The vision tower and multimodal projector of the latter are left out (the
converter writes them to a separate mmproj file; edgemerge does not), so its GGUF is a text model.

Mirrors the converter's `Gemma3Model` (conversion/gemma.py):
- Gemma3RMSNorm scales by (1 + w) while llama.cpp's RMS norm scales by w: every `*norm.weight` gets w + 1;
- a SentencePiece vocabulary with add_space_prefix = false when there is a tokenizer.model, else byte-level BPE;
- its fallbacks for keys a config leaves out, a sliding window unless sliding_window_pattern is 1, and
  final_logit_softcapping when set; attn_logit_softcapping (Gemma 2's) must be absent.
One deliberate difference: without a tokenizer.model the converter cuts token_embd to tokenizer.json's vocab +
added tokens; where that cut changes anything, the embedding has fewer rows than the token list and llama.cpp
refuses the file ("token_embd.weight has wrong shape"), so every row is kept here. With a tokenizer.model (the
released checkpoints) the cut is a no-op: its vocabulary is padded to vocab_size.
llama.cpp itself scales the embeddings by sqrt(hidden_size), makes every 6th layer a global-attention layer and
scales queries by 1/sqrt(head_dim) (n_embd / n_head for 27B), so none of that is in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import EdgemergeError
from .base import Arch, register

# the converter's fallbacks for keys a Gemma 3 config may leave out (Gemma3Model.set_gguf_parameters)
_DEFAULTS = {
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
}
_GLOBAL_ROPE_THETA = 1_000_000.0
# the markers of the converter's TextModel.filter_tensors that Gemma 3's vision tower and projector carry
_MULTIMODAL = ("vision_", "projector.")


@register
class Gemma3Arch(Arch):
    title = "Gemma 3"
    note = "text only: the vision tower is left out"
    hf_names = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    model_arch = gguf.MODEL_ARCH.GEMMA3
    vocab_kinds = ("sentencepiece", "gpt2")

    def __init__(self, hparams: dict[str, Any]):
        if hparams.get("attn_logit_softcapping") is not None:
            raise EdgemergeError(
                "config.json sets attn_logit_softcapping, which Gemma 3 does not have (llama.cpp's gemma3 would "
                "ignore it); restore the model's own config.json"
            )
        # defaults under the config's keys: the base class then writes the converter's values, each key once
        super().__init__({**_DEFAULTS, **hparams})
        self.rope_parameters.get("full_attention", self.rope_parameters).setdefault(
            "rope_theta", _GLOBAL_ROPE_THETA
        )

    def keep(self, hf_name: str) -> bool:
        return super().keep(hf_name) and not any(m in hf_name for m in _MULTIMODAL)

    def transforms(self, hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        return add_one(data) if hf_name.endswith("norm.weight") else data

    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        super().write_params(w, file_type)
        if softcap := self.hparams.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(softcap)
        if self.hparams.get("sliding_window_pattern") != 1:
            w.add_sliding_window(self.find(["sliding_window"]))

    def write_vocab(self, w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> None:
        super().write_vocab(w, model_dir, hparams)
        if (Path(model_dir) / "tokenizer.model").is_file():
            w.add_add_space_prefix(False)  # after the vocabulary, where the converter writes it


def add_one(w: np.ndarray) -> np.ndarray:
    """w + 1 in the converter's precision: float16 stays float16 (the sum taken in float32 and rounded once,
    as torch adds on CPU); bfloat16 and float32 give float32."""
    if w.dtype == np.float16:
        return (w.astype(np.float32) + np.float32(1.0)).astype(np.float16)
    return w.astype(np.float32) + np.float32(1.0)
