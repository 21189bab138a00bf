"""Compatibility of a merge's inputs, checked before anything is written.

Instruct, base and language models must share the architecture, every tensor name and shape, the vocabulary
size and the tokenizer (token -> id map, merges, added tokens). A mismatch stops the merge with a message that
names the tensor or field and both values: nothing is truncated or skipped (silently cutting embeddings to the
smaller vocabulary is how merges turn into gibberish).

Each model's config.json must describe the tensors it has (layer count, hidden size, heads, feed-forward and
vocabulary sizes), no folder may carry code of its own (`trust.refuse_custom_code`), and the files the output
inherits from the instruct model (generation_config.json, tokenizer_config.json, the chat template) are parsed
and their template rendered once (bounded) here, so none of them fails after the heavy work.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor

from .chat_format import ChatTemplateRaised, TemplateRenderer, render_template
from .errors import EdgemergeError
from .limits import MAX_JSON_BYTES, present, read_limited, read_optional_object, shown
from .model_json import check_model_json, read_tokenizer_json
from .model_json import check_tokenizer_config as check_tokenizer_fields
from .sources import ModelSource, RecipeSources
from .tensors.safetensors import read_model
from .tensors.spec import ModelTensors, TensorSpec
from .trust import refuse_custom_code

FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}


@dataclass
class CompatReport:
    """What the check found: the shared architecture, the tensors (in the instruct model's dtype) and where
    every input keeps them (`models`: instruct, base, then languages, in recipe order). `from_instruct`: the
    tensors outside the merged language model, which the merge copies from the instruct model unchanged;
    `note`: one line saying so ("" when there are none)."""

    architecture: str
    specs: list[TensorSpec]
    config: dict
    vocab_size: int | None
    models: list[ModelTensors]
    tied_embeddings: bool
    from_instruct: frozenset[str] = field(default_factory=frozenset)
    note: str = ""

    @property
    def n_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.specs)


def read_tensors(src: ModelSource, label: str) -> ModelTensors:
    """Names, shapes and dtypes of a model's tensors from its safetensors headers (no data read); only
    floating-point weights can be merged."""
    out = read_model(src.path, label)
    for name, dt in out.dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise EdgemergeError(
                f"{label}: tensor {name} has dtype {dt}; only floating-point weights (BF16, F16, F32) can be "
                "merged: use the unquantized release of this model"
            )
    return out


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def tokenizer_identity(folder: Path) -> dict[str, dict]:
    """What decides tokenization, per tokenizer file present, in a comparable form: from tokenizer.json the
    token -> id map, the BPE merges (either serialisation) and the added tokens; from a SentencePiece
    tokenizer.model its sha256. Empty when neither file exists."""
    out: dict[str, dict] = {}
    data = read_tokenizer_json(folder)  # shapes checked: the code below indexes it freely
    if data is not None:
        model = data.get("model") or {}
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []
        ]
        added = {int(t["id"]): t["content"] for t in data.get("added_tokens") or []}
        out["tokenizer.json"] = {"vocab": vocab, "merges": merges, "added": added}
    sp = folder / "tokenizer.model"
    if sp.exists():
        h = hashlib.sha256()
        with open(sp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out["tokenizer.model"] = {"sha256": h.hexdigest()}
    return out


def _compare_tokenizers(ref: dict[str, dict], other: dict[str, dict], ref_label: str, label: str) -> None:
    """Compare on tokenizer.json when both have it, else on tokenizer.model."""
    kind = next((k for k in ("tokenizer.json", "tokenizer.model") if k in ref and k in other), None)
    if kind is None:
        raise EdgemergeError(
            f"tokenizer: {ref_label} has {' + '.join(ref)} but {label} has {' + '.join(other)}; cannot check they "
            "are the same; add the matching tokenizer file to the model folder"
        )
    if kind == "tokenizer.model":
        if ref[kind]["sha256"] != other[kind]["sha256"]:
            raise EdgemergeError(f"tokenizer: tokenizer.model differs between {ref_label} and {label}")
        return
    ref, other = ref[kind], other[kind]
    a, b = ref["vocab"], other["vocab"]
    if len(a) != len(b):
        raise EdgemergeError(f"tokenizer: {len(a)} tokens in {ref_label} but {len(b)} in {label}")
    if a != b:
        inv_a, inv_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
        i = min(i for i in set(inv_a) | set(inv_b) if inv_a.get(i) != inv_b.get(i))
        raise EdgemergeError(
            f"tokenizer: token id {i} is {shown(inv_a.get(i))} in {ref_label} but {shown(inv_b.get(i))} in {label}"
        )
    if ref["added"] != other["added"]:
        ids = sorted(set(ref["added"]) | set(other["added"]))
        i = next(i for i in ids if ref["added"].get(i) != other["added"].get(i))
        raise EdgemergeError(
            f"tokenizer: added token id {i} is {shown(ref['added'].get(i))} in {ref_label} "
            f"but {shown(other['added'].get(i))} in {label}"
        )
    if ref["merges"] != other["merges"]:
        raise EdgemergeError(f"tokenizer: the BPE merges differ between {ref_label} and {label}")


def check_compat(sources: RecipeSources, outside: Callable[[str], bool] | None = None) -> CompatReport:
    """Check that all inputs can be merged; raise EdgemergeError naming the first mismatch and both values.

    `outside`: the tensors outside the language model the merge is about (what the family leaves out of its
    GGUF: a vision tower, a multi-token-prediction block; pipeline.check_inputs gives it). They are not compared
    and may be missing from any input: the instruct model's go to the output unchanged (`from_instruct`), those
    only other inputs have are dropped, and `note` says so in one line."""
    outside = outside or (lambda name: False)
    named = [(f"{role} ({src.ref})", src) for role, src in sources.named()]
    configs = [check_model_json(src.path) for _, src in named]
    for label, src in named:
        refuse_custom_code(src.path, label)
    check_inherited_files(sources.instruct.path, named[0][0])
    ref_label, ref_cfg = named[0][0], configs[0]
    arch = (ref_cfg.get("architectures") or [ref_cfg.get("model_type", "?")])[0]
    for (label, _), cfg in zip(named[1:], configs[1:]):
        for key in ("architectures", "model_type"):
            if cfg.get(key) != ref_cfg.get(key):
                raise EdgemergeError(
                    f"config {key}: {_shown_list(ref_cfg.get(key))} in {ref_label} but "
                    f"{_shown_list(cfg.get(key))} in {label}; all models must share one architecture (a "
                    "language model fine-tuned from another family or generation cannot be merged into this one)"
                )
        for aliases, what in _FAMILY_KEYS.items():
            (key, a), (_, b) = (_first_of(_text_config(c), aliases) for c in (ref_cfg, cfg))
            if a is not None and b is not None and a != b:  # absent: the family's default, or no such layers
                # a layer pattern: name its first odd entry
                if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                    key, a, b = f"{key}[{i}]", a[i], b[i]
                raise EdgemergeError(
                    f"config {key} ({what}): {_shown_list(a)} in {ref_label} but {_shown_list(b)} in {label}; "
                    "the models must come from one base model"
                )
        va, vb = _text_config(ref_cfg).get("vocab_size"), _text_config(cfg).get("vocab_size")
        if va != vb:
            raise EdgemergeError(
                f"config vocab_size: {va} in {ref_label} but {vb} in {label}; the models must share one "
                "vocabulary (edgemerge never truncates embeddings)"
            )

    models = [read_tensors(src, label) for label, src in named]
    for m, cfg in zip(models, configs):
        check_config_tensors(cfg, {n: s for n, s in m.shapes.items() if not outside(n)}, m.label)
    ref = models[0]
    for m in models[1:]:
        missing = sorted(n for n in set(ref.files) - set(m.files) if not outside(n))
        extra = sorted(n for n in set(m.files) - set(ref.files) if not outside(n))
        if missing:
            raise EdgemergeError(
                f"tensor {missing[0]} is in {ref.label} but not in {m.label} ({len(missing)} missing)"
            )
        if extra:
            raise EdgemergeError(
                f"tensor {extra[0]} is in {m.label} but not in {ref.label} ({len(extra)} extra)"
            )
        for name, shape in ref.shapes.items():
            if not outside(name) and m.shapes[name] != shape:
                raise EdgemergeError(
                    f"tensor {name}: shape {list(shape)} in {ref.label} but {list(m.shapes[name])} in {m.label}"
                )

    toks = [tokenizer_identity(src.path) for _, src in named]
    for (label, src), tok in zip(named, toks):
        if not tok:
            raise EdgemergeError(
                f"{label}: no tokenizer.json or tokenizer.model in {src.path}; the tokenizers cannot be compared"
            )
    for (label, _), tok in zip(named[1:], toks[1:]):
        _compare_tokenizers(toks[0], tok, ref_label, label)
    _check_token_ids(toks[0], _text_config(ref_cfg).get("vocab_size"), ref_label)

    specs = [TensorSpec(name, ref.shapes[name], FLOAT_DTYPES[ref.dtypes[name]]) for name in ref.files]
    tied = "lm_head.weight" not in ref.files and bool(_text_config(ref_cfg).get("tie_word_embeddings", False))
    return CompatReport(
        architecture=arch,
        specs=specs,
        config=ref_cfg,
        vocab_size=_text_config(ref_cfg).get("vocab_size"),
        models=models,
        tied_embeddings=tied,
        from_instruct=frozenset(n for n in ref.files if outside(n)),
        note=_outside_note(models, outside),
    )


def _outside_note(models: list[ModelTensors], outside: Callable[[str], bool]) -> str:
    """One line on the tensors outside the merged language model: the instruct model's, which inputs lack
    them, and the ones only other inputs have."""
    kept = [n for n in models[0].files if outside(n)]
    extra = sorted({n for m in models[1:] for n in m.files if outside(n) and n not in models[0].files})
    parts = [
        f"{m.label} lacks {len(miss)} ({_groups(miss)})"
        for m in models[1:]
        if (miss := [n for n in kept if n not in m.files])
    ]
    if kept:
        parts.insert(0, f"{len(kept)} tensors ({_groups(kept)}) are {models[0].label}'s, unchanged")
    if extra:
        parts.append(f"{len(extra)} ({_groups(extra)}) only other inputs have are dropped")
    if not parts:
        return ""
    return "not merged, left out of a GGUF: " + "; ".join(parts)


def _groups(names: list[str]) -> str:
    """Tensor names as the blocks they belong to: `mtp.*`, `model.visual.*`."""
    heads = set()
    for name in names:
        parts = name.split(".")
        i = next((i for i, p in enumerate(parts) if p != "model"), 0)
        heads.add(".".join(parts[: i + 1]) + ".*")
    return ", ".join(sorted(heads))


# config keys that give a family's models different tensors or a different layer structure: named before the
# tensor comparison, which would only name the first tensor that differs
_FAMILY_KEYS = {
    # transformers 5 saves Qwen3 MoE's num_experts as num_local_experts: the first of the names present counts
    (
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
    ): "the expert count of each mixture-of-experts layer",
    ("mlp_only_layers",): "the layers without experts",
    ("layer_types",): "the layer pattern: which layers use which attention",
}


def _first_of(cfg: dict, aliases: tuple[str, ...]) -> tuple[str, Any]:
    """(name, value) of the first of `aliases` that config.json sets (an empty list counts as unset)."""
    for key in aliases:
        if cfg.get(key) not in (None, []):
            return key, cfg[key]
    return aliases[0], None


def _shown_list(value: Any) -> str:
    """A config value for a message, cut to a readable length (a layer pattern can have 64 entries)."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_token_ids(tok: dict[str, dict], vocab_size: object, label: str) -> None:
    """Every token id of tokenizer.json must have an embedding row: the GGUF's vocabulary is cut at vocab_size,
    so a larger tokenizer would silently lose tokens."""
    if "tokenizer.json" not in tok or not isinstance(vocab_size, int):
        return
    ids = [
        i
        for i in (*tok["tokenizer.json"]["vocab"].values(), *tok["tokenizer.json"]["added"])
        if isinstance(i, int)
    ]
    if ids and max(ids) >= vocab_size:
        raise EdgemergeError(
            f"{label}: the tokenizer has token ids up to {max(ids)} but config.json vocab_size is {vocab_size} "
            "(no embedding row for them); use the tokenizer files released with these weights"
        )


# ---- config.json against the tensors -------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`...layers.N....`), None for the others (embeddings, norms, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _positive(cfg: dict, key: str, label: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise EdgemergeError(
            f"{label}: config.json {key} must be a positive integer, got {str(value)[:40]!r}"
        )
    return value


def _expect(
    shapes: dict[str, tuple[int, ...]], suffix: str, want: tuple[int | None, ...], what: str, label: str
):
    """Every tensor named `*{suffix}` must have shape `want` (None: any size on that axis)."""
    for name, shape in shapes.items():
        if not name.endswith(suffix):
            continue
        if len(shape) != len(want) or any(w is not None and w != d for w, d in zip(want, shape)):
            shown = [("?" if w is None else w) for w in want]
            raise EdgemergeError(
                f"{label}: tensor {name} has shape {list(shape)} but config.json {what} means {shown}; "
                "the config does not describe these weights (restore the model's own config.json)"
            )


def _language_model(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The tensors a multimodal model's text_config describes: its `language_model.` ones and lm_head, when the
    checkpoint names them so (a vision tower has layers and projections of its own sizes)."""
    text = {n: s for n, s in shapes.items() if "language_model." in n or n == "lm_head.weight"}
    return text if any("language_model." in n for n in text) else shapes


def check_config_tensors(cfg: dict, shapes: dict[str, tuple[int, ...]], label: str) -> None:
    """config.json's num_hidden_layers, hidden_size, attention heads, intermediate_size and vocab_size must
    match the tensors present: a GGUF written from a config that lies is one llama.cpp cannot load."""
    if not isinstance(cfg, dict):
        raise EdgemergeError(f"{label}: config.json is not a JSON object; restore it from the model's source")
    tc = _text_config(cfg) if isinstance(_text_config(cfg), dict) else cfg
    if tc is not cfg:
        shapes = _language_model(shapes)
    n_layers = _positive(tc, "num_hidden_layers", label)
    hidden = _positive(tc, "hidden_size", label)
    heads = _positive(tc, "num_attention_heads", label)
    kv_heads = _positive(tc, "num_key_value_heads", label) or heads
    inter = _positive(tc, "intermediate_size", label)
    vocab = _positive(tc, "vocab_size", label)
    head_dim = _positive(tc, "head_dim", label)
    _positive(
        tc, "max_position_embeddings", label
    )  # the GGUF's context length: 0 is a file llama.cpp refuses
    layers = sorted({i for name in shapes if (i := layer_of(name)) is not None})
    if n_layers is not None and layers != list(range(n_layers)):
        have = (
            f"layers 0-{layers[-1]}"
            if layers == list(range(len(layers))) and layers
            else f"{len(layers)} layers"
        )
        raise EdgemergeError(
            f"{label}: config.json num_hidden_layers is {n_layers} but the weights hold {have}; the config "
            "does not describe these weights (restore the model's own config.json, or download the missing shards)"
        )
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise EdgemergeError(
            f"{label}: config.json num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    if head_dim is None and hidden is not None and heads is not None:
        if hidden % heads:
            raise EdgemergeError(
                f"{label}: config.json hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    _expect(shapes, "embed_tokens.weight", (vocab, hidden), "vocab_size x hidden_size", label)
    _expect(shapes, "lm_head.weight", (vocab, hidden), "vocab_size x hidden_size", label)
    sizes = _layer_sizes(tc, n_layers, (head_dim, kv_heads, inter), label)
    if sizes is None:
        _expect_layer(shapes, tc, hidden, heads, (head_dim, kv_heads, inter), "", label)
    else:  # layers of their own sizes: each layer's tensors against its sizes
        by_layer: dict[int | None, dict[str, tuple[int, ...]]] = {}
        for name, shape in shapes.items():
            by_layer.setdefault(layer_of(name), {})[name] = shape
        for i, layer_sizes in enumerate(sizes):
            _expect_layer(by_layer.get(i, {}), tc, hidden, heads, layer_sizes, f" of layer {i}", label)
    _expect(shapes, "input_layernorm.weight", (hidden,), "hidden_size", label)
    _check_experts(tc, shapes, hidden, label)
    _expect(shapes, "model.norm.weight", (hidden,), "hidden_size", label)


def _expect_layer(
    shapes: dict[str, tuple[int, ...]],
    tc: dict,
    hidden: int | None,
    heads: int | None,
    sizes: tuple[int | None, int | None, int | None],
    where: str,
    label: str,
) -> None:
    """A decoder layer's attention and MLP projections against (head_dim, num_key_value_heads,
    intermediate_size); `where` names the layer when layers have sizes of their own."""
    head_dim, kv_heads, inter = sizes
    q = heads * head_dim if heads and head_dim else None
    kv = kv_heads * head_dim if kv_heads and head_dim else None
    if q and (tc.get("model_type") in _GATED_QUERY or tc.get("attn_output_gate")):
        # the query projection also makes the attention output's gate: twice the rows
        q_rows, q_what = 2 * q, "2 x num_attention_heads x head_dim, hidden_size"
    else:
        q_rows, q_what = q, "num_attention_heads x head_dim, hidden_size"
    for suffix, want, what in (
        ("self_attn.q_proj.weight", (q_rows, hidden), q_what),
        ("self_attn.k_proj.weight", (kv, hidden), "num_key_value_heads x head_dim, hidden_size"),
        ("self_attn.v_proj.weight", (kv, hidden), "num_key_value_heads x head_dim, hidden_size"),
        ("self_attn.o_proj.weight", (hidden, q), "hidden_size, num_attention_heads x head_dim"),
        ("mlp.gate_proj.weight", (inter, hidden), "intermediate_size x hidden_size"),
        ("mlp.up_proj.weight", (inter, hidden), "intermediate_size x hidden_size"),
        ("mlp.down_proj.weight", (hidden, inter), "hidden_size x intermediate_size"),
    ):
        _expect(shapes, suffix, want, what + where, label)


def _layer_sizes(
    tc: dict, n_layers: int | None, sizes: tuple[int | None, int | None, int | None], label: str
) -> list[tuple[int | None, int | None, int | None]] | None:
    """Each layer's (head_dim, num_key_value_heads, intermediate_size) when layers differ (Gemma 4: the
    full-attention layers' own head size and KV heads, from per_layer_config as transformers 5 saves them or
    global_head_dim / num_global_key_value_heads as released; double-wide MLPs in the layers that reuse an earlier
    layer's KV); None when every layer has the config's top-level sizes."""
    per_layer = tc.get("per_layer_config")
    types = tc.get("layer_types")
    if n_layers is None or not (per_layer or tc.get("global_head_dim") or tc.get("use_double_wide_mlp")):
        return None
    if per_layer is not None and not (
        isinstance(per_layer, dict) and all(isinstance(v, dict) for v in per_layer.values())
    ):
        raise EdgemergeError(f"{label}: config.json per_layer_config must map layer numbers to objects")
    head_dim, kv_heads, inter = sizes
    global_head = _positive(tc, "global_head_dim", label)
    global_kv = _positive(tc, "num_global_key_value_heads", label) if tc.get("attention_k_eq_v") else None
    shared = tc.get("num_kv_shared_layers") or 0
    out = []
    for i in range(n_layers):
        full = isinstance(types, list) and i < len(types) and types[i] == "full_attention"
        own = (per_layer or {}).get(str(i), {})
        hd = _positive(own, "head_dim", label) or (global_head if full else None) or head_dim
        kvh = _positive(own, "num_key_value_heads", label) or (global_kv if full else None) or kv_heads
        wide = tc.get("use_double_wide_mlp") and isinstance(shared, int) and i >= n_layers - shared
        out.append((hd, kvh, 2 * inter if wide and inter else inter))
    return out


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# families whose full-attention q_proj also makes the output gate (Qwen3-Next, Qwen3.5: attn_output_gate)
_GATED_QUERY = {"qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"}


def _check_experts(tc: dict, shapes: dict[str, tuple[int, ...]], hidden: int | None, label: str) -> None:
    """A mixture-of-experts model's routers and per-expert projections against num_experts and
    moe_intermediate_size (the GGUF stacks the experts by that count)."""
    count_key = next((k for k in ("num_experts", "num_local_experts") if k in tc), "num_experts")
    count = _positive(tc, count_key, label)
    inter = _positive(tc, "moe_intermediate_size", label)
    experts = {n: s for n, s in shapes.items() if _EXPERT.search(n)}
    if count is not None and (odd := next((n for n in experts if int(_EXPERT.search(n)[1]) >= count), None)):
        raise EdgemergeError(
            f"{label}: tensor {odd} belongs to an expert beyond config.json {count_key} {count}; the config does "
            "not describe these weights (restore the model's own config.json)"
        )
    if count is not None:  # every expert of a layer is there (llama.cpp stacks exactly `count` of them)
        present: dict[tuple[str, str], set[int]] = {}
        for name in experts:
            m = _EXPERT.search(name)
            present.setdefault((name[: m.start()], name[m.end() :]), set()).add(int(m[1]))
        for (head, tail), got in present.items():
            if len(got) != count:
                missing = min(set(range(count)) - got)
                raise EdgemergeError(
                    f"{label}: {head}.experts.{missing}.{tail} is missing ({count_key} is {count} and the other "
                    "experts of that layer are there); download the missing shards"
                )
    _expect(shapes, "mlp.gate.weight", (count, hidden), f"{count_key} x hidden_size", label)
    _expect(experts, ".gate_proj.weight", (inter, hidden), "moe_intermediate_size x hidden_size", label)
    _expect(experts, ".up_proj.weight", (inter, hidden), "moe_intermediate_size x hidden_size", label)
    _expect(experts, ".down_proj.weight", (hidden, inter), "hidden_size x moe_intermediate_size", label)


# ---- files the output inherits from the instruct model --------------------------------------------------------
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _bad(label: str, fname: str, key: str, expected: str, value: Any) -> EdgemergeError:
    return EdgemergeError(
        f"{label}: {fname} {key} must be {expected}, got {json.dumps(value)[:60]}; fix or restore {fname}"
    )


# sampling settings gguf-py copies from generation_config.json into general.sampling.* (an int32 or a float32
# each, `sequence` a string): a value it cannot pack would fail the export after the merge
_SAMPLING_INTS = ("top_k", "penalty_last_n", "mirostat")
_SAMPLING_FLOATS = (
    "top_p", "min_p", "xtc_probability", "xtc_threshold", "temperature", "penalty_repeat", "mirostat_tau",
    "mirostat_eta",
)  # fmt: skip
_FLOAT32_MAX = 3.4028234663852886e38


def _int32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31


def _float32(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and -_FLOAT32_MAX <= value <= _FLOAT32_MAX
    )


def check_generation_config(folder: Path, label: str) -> None:
    """generation_config.json, when present: a JSON object whose token ids are ids (an int or a list of ints)
    and whose sampling settings (copied into the GGUF) are numbers of the type the GGUF key holds."""
    fname = "generation_config.json"
    gen = read_optional_object(folder / fname) or {}
    for key in _TOKEN_ID_KEYS:
        value = gen.get(key)
        # any int32: some configs use -1 for "none" (package.chat_info skips ids outside the vocabulary)
        ok = value is None or _int32(value) or (isinstance(value, list) and all(map(_int32, value)))
        if not ok:
            raise _bad(label, fname, key, "a token id or a list of token ids", value)
    for keys, ok, expected in (
        (_SAMPLING_INTS, _int32, "a whole number (32-bit)"),
        (_SAMPLING_FLOATS, _float32, "a finite number"),
        (("sequence",), lambda v: isinstance(v, str), "a string"),
    ):
        for key in keys:
            if gen.get(key) is not None and not ok(gen[key]):
                raise _bad(label, fname, key, expected, gen[key])


def _special_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def chat_templates(folder: Path, label: str) -> dict[str, str]:
    """The chat templates a model folder ships, by where they come from ("tokenizer_config.json chat_template",
    "chat_template.jinja", ...); malformed fields are an EdgemergeError naming them."""
    out: dict[str, str] = {}
    sources: list[tuple[str, Any]] = []
    cfg = read_optional_object(folder / "tokenizer_config.json")
    if cfg and cfg.get("chat_template") is not None:
        sources.append(("tokenizer_config.json chat_template", cfg["chat_template"]))
    ctj = read_optional_object(folder / "chat_template.json")
    if ctj is not None:
        sources.append(("chat_template.json chat_template", ctj.get("chat_template")))
    for path in [
        folder / "chat_template.jinja",
        *sorted((folder / "additional_chat_templates").glob("*.jinja")),
    ]:
        if present(path):
            try:
                raw = read_limited(path, MAX_JSON_BYTES, "chat template")
                out[str(path.relative_to(folder))] = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EdgemergeError(f"{label}: cannot read {path.name} as UTF-8 text ({e})") from None
    for where, value in sources:
        if isinstance(value, str):
            out[where] = value
        elif (
            isinstance(value, list)
            and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in value
            )
            and any(t["name"] == "default" for t in value)  # the one chat uses (transformers also wants it)
        ):
            out.update({f"{where} {t['name']!r}": t["template"] for t in value})
        else:
            raise _bad(
                label,
                where.split()[0],
                "chat_template",
                "a string or a list of {name, template} with a 'default'",
                value,
            )
    return out


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, when present, with its fields checked (model_json.check_tokenizer_config: special
    tokens, add_*_token flags, added_tokens_decoder, the template's shape); {} when absent."""
    path = folder / "tokenizer_config.json"
    cfg = read_optional_object(path) or {}
    check_tokenizer_fields(cfg, path)
    return cfg


_CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "Kaixo!"}],
    [
        {"role": "user", "content": "Kaixo!"},
        {"role": "assistant", "content": "Kaixo, zer moduz?"},
        {"role": "user", "content": "Ondo."},
    ],
)
_SYSTEM_CONVERSATION = [{"role": "system", "content": "Lagun zara."}, {"role": "user", "content": "Kaixo!"}]


def check_chat_template(
    template: str, where: str, bos: str = "", eos: str = "", *, default: bool = True
) -> None:
    """Render the template once per kind of conversation, bounded in time, size and memory (chat_format): a
    syntax error, a sandbox violation or a runaway render is an EdgemergeError naming `where`, and so is an
    error on a plain user/assistant conversation for the `default` template (chat and evaluation use it).
    Any template may reject system messages (many do, by raising), and a named one (e.g. "tool_use", which
    wants tools) may reject plain conversations too."""
    with TemplateRenderer(template, label=f"chat template ({where})") as renderer:
        for gen in (True, False):
            for conv in _CHECK_CONVERSATIONS:
                try:
                    text = render_template(renderer, conv, add_generation_prompt=gen, bos=bos, eos=eos)
                except ChatTemplateRaised:
                    if default:
                        raise
                    continue
                if default and conv[-1]["content"] not in text:
                    raise EdgemergeError(
                        f"chat template ({where}): the prompt it renders leaves out the user's message; "
                        "restore the model's own chat template"
                    )
        try:
            render_template(renderer, _SYSTEM_CONVERSATION, add_generation_prompt=True, bos=bos, eos=eos)
        except ChatTemplateRaised:
            pass


def _is_default(where: str) -> bool:
    """Whether the template found at `where` (see chat_templates) is the one chat and evaluation use."""
    return not where.startswith("additional_chat_templates") and (
        not where.endswith("'") or where.endswith("'default'")
    )


MAX_SENTENCEPIECE_BYTES = 64 * 1024**2  # real ones are 0.5-5 MB; the parser reads the whole file into memory


def check_sentencepiece(folder: Path, label: str) -> None:
    """tokenizer.model, when present, must be a SentencePiece model: the GGUF vocabulary is built from it, after
    the merge."""
    path = folder / "tokenizer.model"
    if not path.exists():
        return
    problem = None
    if not path.is_file():
        problem = "is not a regular file"
    elif path.stat().st_size > MAX_SENTENCEPIECE_BYTES:
        problem = f"is larger than {MAX_SENTENCEPIECE_BYTES // 1024**2} MB"
    else:
        try:
            SentencePieceProcessor().LoadFromFile(str(path))
        except (OSError, RuntimeError):
            problem = "is not a SentencePiece model"
    if problem:
        raise EdgemergeError(f"{label}: tokenizer.model {problem}; restore it from the model's source")


def check_inherited_files(folder: Path, label: str) -> None:
    """What a merge or an export copies from `folder` must be usable: generation_config.json,
    tokenizer_config.json, tokenizer.model and every chat template (rendered once)."""
    check_generation_config(folder, label)
    check_sentencepiece(folder, label)
    cfg = _tokenizer_config(folder)
    bos, eos = (_special_text(cfg.get(k)) or "" for k in ("bos_token", "eos_token"))
    for where, template in chat_templates(folder, label).items():
        check_chat_template(template, f"{label}: {where}", bos=bos, eos=eos, default=_is_default(where))
