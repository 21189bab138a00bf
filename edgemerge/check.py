"""Compatibility of a merge's inputs, checked before anything is written.

Instruct, base and language models must share the architecture, every tensor name and shape, the vocabulary
size and the tokenizer (token -> id map, merges, added tokens). A mismatch stops the merge with a message that
names the tensor or field and both values: nothing is truncated or skipped (silently cutting embeddings to the
smaller vocabulary is how merges turn into gibberish).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" so safetensors can hand out bf16 arrays)
from safetensors import SafetensorError, safe_open

from .errors import EdgemergeError
from .limits import shown
from .model_json import check_model_json, read_tokenizer_json
from .sinks import TensorSpec
from .sources import ModelSource, RecipeSources, weight_files

FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}


@dataclass
class ModelTensors:
    """Where each tensor of one model lives, with its shape and safetensors dtype."""

    label: str  # e.g. "instruct (meta-llama/Llama-3.1-8B-Instruct)"
    files: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


@dataclass
class CompatReport:
    """What the check found: the shared architecture, the tensors (in the instruct model's dtype) and where
    every input keeps them (`models`: instruct, base, then languages, in recipe order)."""

    architecture: str
    specs: list[TensorSpec]
    config: dict
    vocab_size: int | None
    models: list[ModelTensors]
    tied_embeddings: bool

    @property
    def n_params(self) -> int:
        return sum(_numel(s.shape) for s in self.specs)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_tensors(src: ModelSource, label: str) -> ModelTensors:
    """Names, shapes and dtypes of a model's tensors from its safetensors headers (memory-mapped, no data read)."""
    out = ModelTensors(label=label)
    files = weight_files(src.path)
    if not files:
        raise EdgemergeError(f"{label}: no .safetensors weights in {src.path}")
    for path in files:
        if not path.exists():
            raise EdgemergeError(f"{label}: {path.name} is named in the index but missing from {src.path}")
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(name)
                    if name in out.files:
                        raise EdgemergeError(
                            f"{label}: tensor {name} is stored twice ({out.files[name].name}, {path.name})"
                        )
                    out.files[name] = path
                    out.shapes[name] = tuple(sl.get_shape())
                    out.dtypes[name] = sl.get_dtype()
        except SafetensorError as e:
            raise EdgemergeError(
                f"{label}: {path} is unreadable or truncated ({e}); download it again"
            ) from None
        except OSError as e:
            raise EdgemergeError(f"{label}: cannot read {path} ({e})") from None
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


def check_compat(sources: RecipeSources) -> CompatReport:
    """Check that all inputs can be merged; raise EdgemergeError naming the first mismatch and both values."""
    named = [(f"{role} ({src.ref})", src) for role, src in sources.named()]
    configs = [check_model_json(src.path) for _, src in named]
    ref_label, ref_cfg = named[0][0], configs[0]
    arch = (ref_cfg.get("architectures") or [ref_cfg.get("model_type", "?")])[0]
    for (label, _), cfg in zip(named[1:], configs[1:]):
        for key in ("architectures", "model_type"):
            if cfg.get(key) != ref_cfg.get(key):
                raise EdgemergeError(
                    f"config {key}: {ref_cfg.get(key)} in {ref_label} but {cfg.get(key)} in {label}; "
                    "all models must share one architecture"
                )
        va, vb = _text_config(ref_cfg).get("vocab_size"), _text_config(cfg).get("vocab_size")
        if va != vb:
            raise EdgemergeError(
                f"config vocab_size: {va} in {ref_label} but {vb} in {label}; the models must share one "
                "vocabulary (edgemerge never truncates embeddings)"
            )

    models = [read_tensors(src, label) for label, src in named]
    ref = models[0]
    for m in models[1:]:
        missing = sorted(set(ref.files) - set(m.files))
        extra = sorted(set(m.files) - set(ref.files))
        if missing:
            raise EdgemergeError(
                f"tensor {missing[0]} is in {ref.label} but not in {m.label} ({len(missing)} missing)"
            )
        if extra:
            raise EdgemergeError(
                f"tensor {extra[0]} is in {m.label} but not in {ref.label} ({len(extra)} extra)"
            )
        for name, shape in ref.shapes.items():
            if m.shapes[name] != shape:
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

    specs = [TensorSpec(name, ref.shapes[name], FLOAT_DTYPES[ref.dtypes[name]]) for name in ref.files]
    tied = "lm_head.weight" not in ref.files and bool(_text_config(ref_cfg).get("tie_word_embeddings", False))
    return CompatReport(
        architecture=arch,
        specs=specs,
        config=ref_cfg,
        vocab_size=_text_config(ref_cfg).get("vocab_size"),
        models=models,
        tied_embeddings=tied,
    )
