"""What every model family shares: hyper-parameters from config.json, tensor names via gguf-py's TensorNameMap,
and the per-tensor output type rule of llama.cpp's `convert_hf_to_gguf.py`.

A family module subclasses `Arch`, sets `title`, `hf_names` and `model_arch`, decorates the class with
`@register`, and overrides the hooks it needs, the counterparts of the converter's:
    keep(hf_name)                 filter_tensors: whether a checkpoint tensor goes into the GGUF at all
    gguf_name(hf_name)            the name mapping (gguf-py's TensorNameMap by default)
    gguf_shape(hf_name, shape)    and transform(hf_name, data), transforms(hf_name): modify_tensors
    stack_slot(hf_name)           which slice of a stacked GGUF tensor a tensor is (an MoE's experts: the
                                  converter's torch.stack of `experts.{e}.*` into `ffn_*_exps`)
    extra_tensors()               generate_extra_tensors (e.g. Llama 3 rope_freqs)
    write_params(w, file_type)    set_gguf_parameters
    write_vocab(w, dir, hparams)  set_vocab: write_vocab_extras(w, dir), then the vocabulary by `vocab_kinds`
Behaviour mirrors llama.cpp's converter (`conversion/` in the llama.cpp vendored by llama-cpp-python) so files
are byte-identical to its output.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ...errors import EdgemergeError
from ...model_json import read_config
from ...trust import load_config_dict
from ..vocab import write_vocab

# outtype name -> (file type written to general.file_type, tensor type for tensors that are not forced to F32)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}

# tensor kinds llama.cpp keeps in F32 whatever the outtype (the subset of the converter's list that
# can occur in the families we support; the rest are vision/audio/other recurrent tensors)
_ALWAYS_F32 = (
    gguf.MODEL_TENSOR.FFN_GATE_INP,
    gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    gguf.MODEL_TENSOR.POS_EMBD,
    gguf.MODEL_TENSOR.TOKEN_TYPES,
    gguf.MODEL_TENSOR.SSM_CONV1D,
)

# Hugging Face architecture name -> family; filled by `register` as the family modules are imported
REGISTRY: dict[str, type[Arch]] = {}

# one expert's tensor of a mixture-of-experts layer: `...mlp.experts.{e}.gate_proj.weight`
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_EXPERT_COUNT = ["num_local_experts", "num_experts", "n_routed_experts"]
# the converter's expert scoring functions that the installed gguf-py knows (0.19 lacks sqrtsoftplus)
_GATING = {
    name: getattr(gguf.ExpertGatingFuncType, name.upper())
    for name in ("sigmoid", "softmax", "sqrtsoftplus")
    if hasattr(gguf.ExpertGatingFuncType, name.upper())
}

# HF tensors llama.cpp does not use
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def check_outtype(outtype: str) -> str:
    """Normalise an outtype name; unknown names are a user error listing the valid ones."""
    key = outtype.lower()
    if key not in OUTTYPES:
        raise EdgemergeError(f"unknown GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    return key


def load_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json as llama.cpp's converter reads it: through transformers' AutoConfig (which fills in the
    defaults the file leaves out), falling back to the raw JSON; a nested `text_config` (a multimodal model's
    language model) is lifted to the top."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise EdgemergeError(f"{model_dir} has no config.json; give a Hugging Face model folder")
    raw = read_config(model_dir)  # shapes and bounds checked before transformers or the converter reads it
    try:  # a folder that carries code is refused inside, before transformers reads it
        hparams = load_config_dict(model_dir)
    except (
        ValueError,
        KeyError,
        OSError,
    ):  # e.g. unknown model_type: the raw file still names the architecture
        hparams = raw
    return text_hparams(hparams)


def text_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A config with its nested `text_config` (a multimodal model's language model) lifted to the top, as the
    converter's TextModel does."""
    if not isinstance(hparams.get("text_config"), dict):  # absent, or null as read_config allows
        return hparams
    text = hparams["text_config"]
    # the architecture is the top level's unless text_config names one (the converter's
    # get_model_architecture); transformers writes `architectures: null` into a nested text_config
    arch = text["architectures"] if text.get("architectures") is not None else hparams.get("architectures")
    return {**hparams, **text, "architectures": arch}


def register(cls: type[Arch]) -> type[Arch]:
    """Class decorator: make a family the converter for each of its `hf_names`."""
    for name in cls.hf_names:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise AssertionError(f"{name} is registered by both {REGISTRY[name].__name__} and {cls.__name__}")
        REGISTRY[name] = cls
    return cls


class Arch:
    """One model family: config keys -> GGUF keys, HF tensor names -> GGUF names, tensor transforms."""

    title: ClassVar[str] = ""  # the family as people name it, for tables and help ("Qwen2 / Qwen2.5")
    note: ClassVar[str] = ""  # what the README's family table says after the names ("text only: ...")
    hf_names: ClassVar[tuple[str, ...]] = ()
    model_arch: ClassVar[gguf.MODEL_ARCH]
    # vocabulary builders to try in order (see vocab.py): the first whose files exist wins
    vocab_kinds: ClassVar[tuple[str, ...]] = ("gpt2",)

    def __init__(self, hparams: dict[str, Any]):
        self.hparams = hparams
        self.block_count: int = self.find(["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.block_count)
        self.rope_parameters = _rope_parameters(hparams)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def find(self, keys: list[str], optional: bool = False) -> Any:
        """The first of `keys` present in config.json."""
        for k in keys:
            if k in self.hparams:
                return self.hparams[k]
        if optional:
            return None
        raise EdgemergeError(
            f"config.json lacks {keys[0]!r} (also looked for {keys[1:]}); is the model complete?"
        )

    # ---- tensors -------------------------------------------------------------------------------------
    def keep(self, hf_name: str) -> bool:
        """Whether a checkpoint tensor goes into the GGUF (False: llama.cpp does not use it)."""
        return not hf_name.endswith(_SKIP_SUFFIXES)

    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF name of an HF tensor via gguf-py's TensorNameMap; None for tensors `keep` leaves out."""
        if not self.keep(hf_name):
            return None
        name = _EXPERT.sub(".experts.", hf_name.replace("language_model.", ""), count=1)
        new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise EdgemergeError(
                f"tensor {hf_name!r} has no llama.cpp name for architecture {self.name}; "
                "the checkpoint is not a plain causal LM of this family"
            )
        return new

    def stack_slot(self, hf_name: str) -> tuple[int, int] | None:
        """(index, count) when the tensor is one slice of a stacked GGUF tensor, else None: expert e of an MoE
        layer is slice e of `ffn_{gate,up,down}_exps` (stacked along a new first axis, count = the experts).
        Written slice after slice, so no whole stack is ever in memory."""
        m = _EXPERT.search(hf_name)
        if m is None:
            return None
        count = self.find(_EXPERT_COUNT)
        index = int(m.group(1))
        if not 0 <= index < count:
            raise EdgemergeError(f"tensor {hf_name!r} is expert {index} but config.json has {count} experts")
        return index, count

    def gguf_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the tensor as `transform` returns it (the checkpoint's shape by default)."""
        return shape

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Reshape/permute a tensor the way llama.cpp expects it (identity by default)."""
        return data

    def transforms(self, hf_name: str) -> bool:
        """Whether `transform` may change this tensor (it then needs the whole tensor at once). A family that
        overrides `transform` without saying which tensors it touches is taken to touch all of them."""
        return type(self).transform is not Arch.transform

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp wants that the checkpoint does not have (e.g. Llama 3 rope_freqs)."""
        return iter(())

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
        """Storage type of one tensor, as `convert_hf_to_gguf.py` decides it:
        1-D tensors, norms and non-weights stay F32; the rest take the outtype; Q8_0 falls back to F16 when
        the row length is not a multiple of its block size (32)."""
        bid = next((int(p) for p in gguf_name.split(".") if p.isdecimal()), None)
        if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
            return gguf.GGMLQuantizationType.F32
        if not gguf_name.endswith(".weight") or any(self._is(gguf_name, k, bid) for k in _ALWAYS_F32):
            return gguf.GGMLQuantizationType.F32
        qtype = OUTTYPES[outtype][1]
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block != 0:
                return gguf.GGMLQuantizationType.F16
        return qtype

    def _is(self, name: str, key: gguf.MODEL_TENSOR, bid: int | None) -> bool:
        if key not in gguf.MODEL_TENSORS[self.model_arch]:
            return False
        key_name = gguf.TENSOR_NAMES[key]
        if "{bid}" in key_name:
            if bid is None:
                return False
            key_name = key_name.format(bid=bid)
        elif bid is not None:
            return False
        return name == key_name + ".weight"

    # ---- key/values ----------------------------------------------------------------------------------
    def write_params(self, w: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        """Hyper-parameter keys (`<arch>.block_count`, ...), as the converter's TextModel writes them."""
        w.add_block_count(self.block_count)
        n_ctx = self.find(
            [
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ],
            optional=True,
        )
        if n_ctx is not None:
            w.add_context_length(n_ctx)
        if (n_embd := self.find(["hidden_size", "n_embd", "dim"], optional=True)) is not None:
            w.add_embedding_length(n_embd)
        n_ff = self.find(
            [
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
            optional=True,
        )
        if n_ff is not None:
            w.add_feed_forward_length(n_ff)
        if (n_head := self.find(["num_attention_heads", "n_head", "n_heads"], optional=True)) is not None:
            w.add_head_count(n_head)
        if (n_head_kv := self.find(["num_key_value_heads", "n_kv_heads"], optional=True)) is not None:
            w.add_head_count_kv(n_head_kv)
        if self.hparams.get("is_causal") is False:
            w.add_causal_attention(False)

        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        rope_type = rope.get("rope_type")
        factor = rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if (v := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(v)
            if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(v)
            if (v := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(v)
            if (v := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(v)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if (sections := self.rope_parameters.get("mrope_section")) is not None:
            w.add_rope_dimension_sections([*sections, 0, 0, 0, 0][:4])  # padded to 4 as the converter does
        if (theta := rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (swa_theta := self.rope_parameters.get("sliding_attention", {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(swa_theta)
        if (eps := self.find(["rms_norm_eps", "norm_eps"], optional=True)) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (
            eps := self.find(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], optional=True)
        ) is not None:
            w.add_layer_norm_eps(eps)
        self.write_expert_params(w)
        if (head_dim := self.hparams.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(file_type)

    def write_expert_params(self, w: gguf.GGUFWriter) -> None:
        """Mixture-of-experts keys (expert count, experts per token, groups, gating function), as the
        converter's TextModel writes them for any config that has them."""
        if (n_experts := self.find(_EXPERT_COUNT, optional=True)) is not None:
            w.add_expert_count(n_experts)
        used = self.find(["num_experts_per_tok", "num_experts_per_token", "top_k_experts"], optional=True)
        if used is not None:
            w.add_expert_used_count(used)
        if (groups := self.hparams.get("n_group")) is not None:
            w.add_expert_group_count(groups)
        if (groups_used := self.hparams.get("topk_group")) is not None:
            w.add_expert_group_used_count(groups_used)
        score = self.find(
            ["score_function", "scoring_func", "score_func", "moe_router_activation",
             "moe_router_activation_func", "expert_selection_fn"],
            optional=True,
        )  # fmt: skip
        if score is not None:
            gating = _GATING.get(score)
            if gating is None:
                raise EdgemergeError(
                    f"config.json's expert scoring function {score!r} is not one llama.cpp knows "
                    f"({', '.join(_GATING)}); restore the model's own config.json"
                )
            w.add_expert_gating_func(gating)

    def write_vocab(self, w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> None:
        """The tokenizer keys (the converter's set_vocab): `write_vocab_extras`, then the vocabulary of the first
        of `vocab_kinds` whose files exist. A family with keys after the vocabulary extends this."""
        self.write_vocab_extras(w, model_dir)
        write_vocab(w, model_dir, hparams, self.vocab_kinds)

    def write_vocab_extras(self, w: gguf.GGUFWriter, model_dir: Path) -> None:
        """Family-specific tokenizer keys written before the vocabulary (none by default)."""


def _rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5's `rope_parameters` form, filled from older top-level keys."""
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})

    def first(keys: list[str]) -> Any:
        return next((hparams[k] for k in keys if k in hparams), None)

    theta = first(
        ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"]
    )
    local = first(
        ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"]
    )
    partial = first(["partial_rotary_factor", "rope_pct", "rope_percent"])
    orig = first(["original_max_position_embeddings"])
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and (t := rope.get("type")) is not None:
            rope["rope_type"] = t
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig is not None:
            rope["original_max_position_embeddings"] = orig
    return rope
