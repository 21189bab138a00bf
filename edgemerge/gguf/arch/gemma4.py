"""Gemma 4 (text, dense): llama.cpp architecture `gemma4`, from `Gemma4ForCausalLM` or the language model inside
`Gemma4ForConditionalGeneration`. The vision and audio towers and their embedders of the latter are left out (the
converter writes them to a separate mmproj file with --mmproj; edgemerge does not), so its GGUF is a text model.

Mirrors the converter's `Gemma4Model` (conversion/gemma.py, a `Gemma3Model` with these changes):
- Gemma4RMSNorm scales by w, not by 1 + w as Gemma 3's does: the norms are written as they are;
- sliding-window and full-attention layers differ: `attention.sliding_window_pattern` from layer_types; the full
  layers' head size (global_head_dim, or per_layer_config in transformers 5) as key/value_length, the sliding
  layers' head_dim as key/value_length_swa; per-layer KV head counts as an array when the full layers have their
  own (num_global_key_value_heads: Gemma 4 31B's full layers share one projection for K and V, so they have no
  v_proj and llama.cpp reuses K);
- RoPE: theta 1e6 on full layers, 1e4 (freq_base_swa) on sliding ones; the full layers' "proportional" RoPE
  rotates only head_dim x partial_rotary_factor dims, given to llama.cpp as a `rope_freqs` tensor of 1s for the
  rotated pairs and 1e30 (no rotation) for the rest, with rope.dimension_count the whole full head;
- the per-layer embeddings of E2B/E4B (`per_layer_token_embd`, `per_layer_model_proj`, per-layer gates and
  projections), the layers that reuse an earlier layer's KV (`attention.shared_kv_layers`; they have no k/v
  projections) and their double-wide MLPs (feed_forward_length per layer), and each layer's `layer_scalar` (as
  `layer_output_scale.weight`);
- the vocabulary: tokenizer.json's SentencePiece-style BPE as tokenizer model `gemma4` with its merges, the
  channel/tool-call tokens marked user-defined so the chat parser sees them, add_space_prefix false and
  add_bos_token true.
Gemma 3's fallbacks for keys a config leaves out and its final_logit_softcapping and sliding_window keys apply.
The mixture-of-experts checkpoints (26B-A4B: enable_moe_block) are refused: their experts come as one stacked
tensor per layer, which the streaming merge does not handle yet.
llama.cpp itself scales the embeddings by sqrt(hidden_size) and the per-layer ones by sqrt of their size, and
applies attention scale 1 and the value RMS norm, so none of that is in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import EdgemergeError
from ..vocab import SafeLlamaHfVocab, special_vocab
from .base import register
from .gemma3 import Gemma3Arch

# the markers of the converter's TextModel.filter_tensors that Gemma 4's vision and audio towers and their
# embedders (model.embed_vision., model.embed_audio.) carry
_MULTIMODAL = ("vision_", "audio_", "vision.", "audio.")
# tokens the converter marks user-defined so llama.cpp renders them and its chat parser can read them
_VISIBLE = {
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
}
_UNROTATED = 1e30  # a rope_freqs factor that divides a pair's frequency to nothing: that pair is not rotated


@register
class Gemma4Arch(Gemma3Arch):
    title = "Gemma 4"
    note = "dense, text only: the vision and audio towers are left out; MoE (26B-A4B) not yet"
    hf_names = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
    model_arch = gguf.MODEL_ARCH.GEMMA4
    vocab_kinds = ("llama_hf",)

    def __init__(self, hparams: dict[str, Any]):
        if hparams.get("enable_moe_block"):
            raise EdgemergeError(
                "this Gemma 4 checkpoint is a mixture of experts (enable_moe_block, e.g. gemma-4-26B-A4B): its "
                "experts are one stacked tensor per layer, which edgemerge cannot merge yet; use a dense Gemma 4 "
                "(31B, E4B, E2B)"
            )
        types = hparams.get("layer_types")
        if not isinstance(types, list) or not set(types) <= {"sliding_attention", "full_attention"}:
            raise EdgemergeError(
                "config.json layer_types must name sliding_attention or full_attention for each layer; restore "
                "the model's own config.json"
            )
        super().__init__(hparams)
        full = self.rope_parameters.get("full_attention", {})
        if full.get("rope_type") != "proportional":
            raise EdgemergeError(
                f"config.json rope_parameters.full_attention.rope_type is {full.get('rope_type')!r}; Gemma 4's full "
                "attention layers use 'proportional' (the only kind llama.cpp's gemma4 runs); restore the "
                "model's own config.json"
            )
        self.swa = [t == "sliding_attention" for t in types]
        self.head_dim_full = self._full_layer("head_dim", "global_head_dim")
        if self.head_dim_full is None:
            raise EdgemergeError(
                "config.json names no head size for the full-attention layers (global_head_dim)"
            )
        self.kv_full = self._full_layer("num_key_value_heads", "num_global_key_value_heads")

    def _full_layer(self, key: str, global_key: str) -> Any:
        """A full-attention layer's own value of `key`: config.json's `global_key`, else the per_layer_config of
        the first full-attention layer that sets it (transformers 5's form), as the converter looks it up."""
        if (value := self.hparams.get(global_key)) is not None:
            return value
        per_layer = self.hparams.get("per_layer_config") or {}
        for index, layer in per_layer.items() if isinstance(per_layer, dict) else ():
            full = str(index).isdecimal() and int(index) < len(self.swa) and not self.swa[int(index)]
            if full and isinstance(layer, dict) and key in layer:
                return layer[key]
        return None

    def keep(self, hf_name: str) -> bool:
        return super().keep(hf_name) and not any(m in hf_name for m in _MULTIMODAL)

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.endswith("layer_scalar"):  # a bare parameter: the converter names it `.weight` first
            hf_name += ".weight"
        return super().gguf_name(hf_name)

    def transforms(self, hf_name: str) -> bool:
        return False  # no norm shift (the converter's norm_shift is 0 for Gemma 4)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data

    def extra_tensors(self):
        """rope_freqs for the full layers' proportional RoPE: 1 for the head_dim x partial_rotary_factor / 2
        rotated pairs, 1e30 for the rest (the converter's generate_extra_tensors)."""
        factor = self.rope_parameters["full_attention"]["partial_rotary_factor"]
        rotated = int(self.head_dim_full * factor / 2)
        values = [1.0] * rotated + [_UNROTATED] * (int(self.head_dim_full / 2) - rotated)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.array(values, dtype=np.float32)

    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        hp = self.hparams
        head_dim_swa = hp["head_dim"]
        shared = hp.get("num_kv_shared_layers") or 0
        n_ff: Any = self.find(["intermediate_size"])
        if hp.get("use_double_wide_mlp"):
            n_ff = [n_ff if i < self.block_count - shared else 2 * n_ff for i in range(self.block_count)]
        kv: Any = hp["num_key_value_heads"]
        if self.kv_full is not None and kv is not None:
            kv = [kv if swa else self.kv_full for swa in self.swa]
        # the keys Gemma 4 states differently from Gemma 3 (full layers' head size, per-layer arrays), each
        # written once: the base class writes them from this view
        self.hparams = {
            **hp,
            "head_dim": self.head_dim_full,
            "num_key_value_heads": kv,
            "intermediate_size": n_ff,
        }
        try:
            super().write_params(w, file_type)
        finally:
            self.hparams = hp
        w.add_shared_kv_layers(shared)
        w.add_embedding_length_per_layer_input(hp.get("hidden_size_per_layer_input") or 0)
        w.add_sliding_window_pattern(self.swa)
        w.add_key_length_swa(head_dim_swa)
        w.add_value_length_swa(head_dim_swa)
        # "proportional": the whole head, rope_freqs leaves the rest unrotated; the sliding layers' factor is
        # looked up where the converter does, at the top of rope_parameters (1.0 unless set there)
        w.add_rope_dimension_count(int(self.head_dim_full))
        swa_factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        w.add_rope_dimension_count_swa(int(head_dim_swa * swa_factor))

    def write_vocab(self, w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> None:
        """The converter's Gemma4Model.set_vocab."""
        try:
            vocab = SafeLlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError) as e:
            raise EdgemergeError(
                f"{model_dir}: Gemma 4 needs its tokenizer.json (SentencePiece-style BPE with byte fallback): {e}"
            ) from None
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(gguf.TokenType.USER_DEFINED if text.decode() in _VISIBLE else kind)
        w.add_tokenizer_model("gemma4")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        sv = special_vocab(model_dir, load_merges=True)
        sv.add_special_token.pop("bos", None)  # written below, as the converter's last word on it
        sv.add_to_gguf(w, quiet=True)
        w.add_add_space_prefix(False)
        w.add_add_bos_token(True)
