"""Qwen3.5 (dense): llama.cpp architecture `qwen35`, from `Qwen3_5ForCausalLM` or the language model inside
`Qwen3_5ForConditionalGeneration` (the class of the released checkpoints: config.json nests the text model's
settings under `text_config`, its tensors are `model.language_model.*` beside a vision tower `model.visual.*`).

A hybrid: most layers are linear-attention (Gated DeltaNet) blocks, every `full_attention_interval`-th one a
gated full-attention block (`layer_types` in config.json says which). Merging is tensor by tensor like any
other model; the export mirrors the converter's `Qwen3_5TextModel` (conversion/qwen.py, with `--no-mtp`):
- Qwen3.5's RMSNorm scales by (1 + w): every `*norm.weight` but the linear attention's gated norm gets w + 1;
- A_log becomes A = -exp(A_log), dt_bias becomes the `ssm_dt` bias, the conv1d kernel loses its middle axis;
- when there are more value heads than key heads, the value heads are reordered from grouped (by key head) to
  tiled order (in_proj_qkv's V rows, in_proj_z, in_proj_a/b, A_log, dt_bias, the conv1d's V channels and
  out_proj's columns), which is how llama.cpp broadcasts them;
- the linear attention's sizes as `ssm.*` keys, the layer pattern as `attention.recurrent_layers`, the rotary
  dimensions as head_dim x partial_rotary_factor with interleaved M-RoPE sections ([11, 11, 10, 0] when the
  config names none).
Left out of the GGUF, as the converter leaves them out of a text GGUF: the multi-token-prediction block
(`mtp.*`, as `--no-mtp` does: it only serves speculative decoding, and a language model saved by transformers
does not have it) and the vision tower (the converter writes it to a separate mmproj file; edgemerge does not).
A merge takes both from the instruct model unchanged into its Hugging Face output, so that folder still loads
as the instruct model's class (check.py, `outside`).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ...errors import EdgemergeError
from .base import Arch, register
from .gemma3 import add_one

_DEFAULT_MROPE_SECTION = [11, 11, 10, 0]  # the converter's default (_Qwen35MRopeMixin)
_LEFT_OUT = ("mtp.", "model.mtp.")  # the multi-token-prediction block (the converter accepts both prefixes)
_VISION = "visual."  # the vision tower's marker in the converter's TextModel.filter_tensors


@register
class Qwen35Arch(Arch):
    title = "Qwen3.5 (dense)"
    note = "text only: the vision tower and the multi-token-prediction block are left out"
    hf_names = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
    model_arch = gguf.MODEL_ARCH.QWEN35

    def __init__(self, hparams: dict[str, Any]):
        super().__init__(hparams)
        types = hparams.get("layer_types")
        if types is not None and (
            len(types) != self.block_count or not set(types) <= {"linear_attention", "full_attention"}
        ):
            raise EdgemergeError(
                f"config.json layer_types must name linear_attention or full_attention for each of the "
                f"{self.block_count} layers; restore the model's own config.json"
            )
        self.n_k = hparams.get("linear_num_key_heads", 0)
        self.n_v = hparams.get("linear_num_value_heads", 0)

    def keep(self, hf_name: str) -> bool:
        return super().keep(hf_name) and not hf_name.startswith(_LEFT_OUT) and _VISION not in hf_name

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.endswith(".dt_bias"):
            hf_name = hf_name.removesuffix(".dt_bias") + ".dt_proj.bias"
        return super().gguf_name(hf_name)

    def transforms(self, hf_name: str) -> bool:
        return hf_name.endswith(("norm.weight", ".A_log", ".conv1d.weight")) or (
            "linear_attn." in hf_name and self.n_k != self.n_v
        )

    def gguf_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if hf_name.endswith(".conv1d.weight"):
            return tuple(d for d in shape if d != 1)  # the converter's squeeze()
        return shape

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        # torch, as in the converter, so exp() rounds the same; its dtype rule too: float16 and float32 stay,
        # bfloat16 becomes float32 first
        import torch

        t = torch.from_numpy(
            np.ascontiguousarray(data if data.dtype in (np.float16, np.float32) else data.astype(np.float32))
        )
        if "linear_attn." in hf_name and self.n_k != self.n_v:
            t = self._tiled_v_heads(hf_name, t)
        if hf_name.endswith(".A_log"):
            t = -torch.exp(t)
        elif hf_name.endswith(".conv1d.weight"):
            t = t.squeeze()
        elif hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return add_one(t.numpy())
        return t.numpy()

    def _tiled_v_heads(self, hf_name: str, t: Any) -> Any:
        """Value heads from grouped order [K0: v0..v(r-1), K1: ...] to tiled [v0 of K0, v0 of K1, ...] along
        the axis that indexes them (the converter's `_reorder_v_heads`)."""
        import torch

        head_k = self.hparams["linear_key_head_dim"]
        head_v = self.hparams["linear_value_head_dim"]
        per_k = self.n_v // self.n_k

        def tiled(x: Any, dim: int, head_dim: int) -> Any:
            shape = list(x.shape)
            grouped = x.reshape(*shape[:dim], self.n_k, per_k, head_dim, *shape[dim + 1 :])
            return grouped.transpose(dim, dim + 1).contiguous().reshape(shape)

        if ".in_proj_qkv." in hf_name:
            qk = head_k * self.n_k * 2
            return torch.cat([t[:qk], tiled(t[qk:], 0, head_v)], dim=0)
        if ".in_proj_z." in hf_name:
            return tiled(t, 0, head_v)
        if ".in_proj_b." in hf_name or ".in_proj_a." in hf_name:
            return tiled(t, 0, 1)
        if hf_name.endswith((".A_log", ".dt_bias")):
            return tiled(t.unsqueeze(-1), 0, 1).squeeze(-1) if t.ndim == 1 else tiled(t, t.ndim - 1, 1)
        if ".conv1d" in hf_name:
            data = t.squeeze()
            qk = head_k * self.n_k * 2
            return torch.cat([data[:qk], tiled(data[qk:], 0, head_v)], dim=0)
        if ".out_proj." in hf_name:
            return tiled(t, 1, head_v)
        return t

    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        super().write_params(w, file_type)
        hp = self.hparams
        if (n_ff_exp := hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff_exp)
        if (n_ff_shexp := hp.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shexp)
        w.add_ssm_conv_kernel(hp["linear_conv_kernel_dim"])
        w.add_ssm_state_size(hp["linear_key_head_dim"])
        w.add_ssm_group_count(hp["linear_num_key_heads"])
        w.add_ssm_time_step_rank(hp["linear_num_value_heads"])
        w.add_ssm_inner_size(hp["linear_value_head_dim"] * hp["linear_num_value_heads"])
        if (types := hp.get("layer_types")) is not None:
            # gguf-py 0.19 (PyPI) has no add_recurrent_layers yet: its body, with the vendored gguf-py's key
            w.add_array(f"{self.name}.attention.recurrent_layers", [t == "linear_attention" for t in types])
        w.add_full_attention_interval(hp.get("full_attention_interval", 4))
        if (head_dim := hp.get("head_dim")) is None:
            head_dim = hp["hidden_size"] // hp["num_attention_heads"]
        w.add_rope_dimension_count(int(head_dim * self.rope_parameters.get("partial_rotary_factor", 0.25)))
        if "mrope_section" not in self.rope_parameters:
            w.add_rope_dimension_sections(_DEFAULT_MROPE_SECTION)
