"""Tiny Hugging Face model fixtures with random weights and real tokenizers.

Families share one random base; instruct and language models are the base plus small seeded deltas, so merges
have non-trivial task vectors. Hidden sizes are multiples of 256 so llama.cpp k-quants apply.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from edgemerge.check import check_compat
from edgemerge.errors import EdgemergeError
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe

from .shared import need_shared


@dataclass
class Spec:
    arch: str = "LlamaForCausalLM"
    # llama-bpe | llama3.1-bpe | qwen2 | qwen35 | gemma-4 | spm (Mistral v1 SentencePiece) | spm512
    tokenizer: str = "llama-bpe"
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    tie: bool = False
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)
    parity_outtype: str = "f32"  # what the byte-parity test converts it to (tests/arch_fixtures.py)
    more_parity: tuple[str, ...] = ()  # further outtypes the byte-parity test checks
    chat_template: str = ""  # a file of the shared llama.cpp-vocab/templates, saved as chat_template.jinja
    # a multimodal wrapper's own config keys (vision_config, ...): the fields above then make its text_config
    wrapper: dict | None = None
    norm_weight: float = 1.0  # a norm's stored weight at scale 1 (Gemma's RMSNorm scales by 1 + w: 0.0)
    unit_norms: tuple[str, ...] = ()  # 1-D weights stored at 1 whatever norm_weight says (a gated norm's)
    converter_args: tuple[str, ...] = ()  # options the byte-parity test gives llama.cpp's converter


def config_class(arch: str) -> type:
    """transformers' config class of an architecture name (the model class's own `config_class`)."""
    import transformers

    return getattr(transformers, arch).config_class


def built_once(path: Path, make: Callable[[Path], object]) -> Path:
    """`path` (a file or folder), made by `make(path)` once per test run: a lock beside it makes every other
    pytest-xdist worker wait for the first instead of building it again, and a `.done` marker written last tells
    a finished build from one a crashed worker left half-made (removed and made again)."""
    done = path.with_name(path.name + ".done")
    with FileLock(path.with_name(path.name + ".lock")):
        if not done.exists():
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
            make(path)
            done.touch()
    return path


def tokenizer_dir(kind: str, cache: Path) -> Path:
    """A saved Hugging Face tokenizer folder built from real shared vocabularies (cached per test run)."""
    return built_once(cache / f"tok-{kind}", lambda out: _save_tokenizer(kind, cache, out))


def _save_tokenizer(kind: str, cache: Path, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaTokenizer

    if kind == "llama3.1-bpe":
        shutil.copytree(tokenizer_dir("llama-bpe", cache), out)
        _as_released_llama31(out)
        return
    if kind == "spm":
        src = need_shared("tokenizers", "mistral_sentencepiece", "tokenizer.model.v1")
        out.mkdir(parents=True)
        shutil.copy(src, out / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(out)
    elif kind == "gemma-4":
        # AutoTokenizer would first build a config from the file, which its per-layer KV head counts break
        from transformers import GemmaTokenizer

        vocab = need_shared("tokenizers", "llama.cpp-vocab")
        tok = GemmaTokenizer.from_pretrained(vocab, gguf_file=f"ggml-vocab-{kind}.gguf")
    else:
        vocab = need_shared("tokenizers", "llama.cpp-vocab")
        tok = AutoTokenizer.from_pretrained(vocab, gguf_file=f"ggml-vocab-{kind}.gguf")
    tok.save_pretrained(out)
    if kind == "llama-bpe":
        _as_released_llama3(out)


def _as_released_llama3(folder: Path) -> None:
    """transformers' GGUF loader adds <|endoftext|> as id 128256 and drops Llama 3's BOS post-processor and
    ignore_merges; put them back so the fixture is the released Llama 3 tokenizer (128,256 tokens, BOS added),
    which is what llama.cpp's converter recognises as `llama-bpe` (without BOS it hashes as `smaug-bpe`)."""
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < 128256]
    tj["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    tj["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    bos,
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {
                    "<|begin_of_text|>": {
                        "id": "<|begin_of_text|>",
                        "ids": [128000],
                        "tokens": ["<|begin_of_text|>"],
                    }
                },
            },
        ],
    }
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.get("added_tokens_decoder", {}).pop("128256", None)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


# the special tokens Llama 3.1 (and 3.2) named among Llama 3's reserved ones; the rest are renumbered after them
_LLAMA31_NAMED = {
    128004: "<|finetune_right_pad_id|>",
    128008: "<|eom_id|>",
    128010: "<|python_tag|>",
}


def _llama31_special(token_id: int, llama3_name: str) -> str:
    """Llama 3.1's name of a Llama 3 special token: the named ones, else reserved tokens numbered 0, 1, 2 (ids
    128002, 128003, 128005) and from 3 at id 128011; Llama 3's other names are unchanged."""
    if token_id in _LLAMA31_NAMED:
        return _LLAMA31_NAMED[token_id]
    if not llama3_name.startswith("<|reserved_special_token_"):
        return llama3_name
    index = {128002: 0, 128003: 1, 128005: 2}.get(token_id, token_id - 128008)
    return f"<|reserved_special_token_{index}|>"


def _as_released_llama31(folder: Path) -> None:
    """Llama 3's tokenizer folder made Llama 3.1/3.2's: the same merges and regular tokens, 3.1's special-token
    names (<|eom_id|> at 128008, which 3.x Instruct's generation_config lists as an EOS id)."""
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    names = {t["id"]: _llama31_special(t["id"], t["content"]) for t in tj["added_tokens"]}
    for t in tj["added_tokens"]:
        t["content"] = names[t["id"]]
    tj["model"]["vocab"] = {names.get(i, tok): i for tok, i in tj["model"]["vocab"].items()}
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _tokenizer(tok_dir: Path):
    """The tokenizer of `tok_dir`, loaded once for the models of a family in a row (2 s for a 152k vocabulary;
    saving it does not change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def make_model(
    out: Path,
    spec: Spec,
    tok_dir: Path,
    *,
    seed: int,
    base_state: dict | None = None,
    delta_scale: float = 0.02,
    shard_size: str | None = None,
) -> Path:
    """Write a tiny model to `out` (safetensors + config + tokenizer). With `base_state`, weights are
    base + delta_scale * N(0, 1) (seeded), like a fine-tune of that base."""
    import transformers

    tok = _tokenizer(tok_dir)
    vocab = len(tok)
    cfg_cls = config_class(spec.arch)
    kw = {
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": spec.tie,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "torch_dtype": spec.dtype,
    }
    kw.update(spec.extra)
    if spec.wrapper is None:
        config = cfg_cls(**kw)
    else:
        config = cfg_cls(text_config=kw, tie_word_embeddings=spec.tie, **spec.wrapper)
    config.architectures = [spec.arch]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.arch)(config)
    with torch.no_grad():
        if base_state is not None:
            g = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + delta_scale * torch.randn(p.shape, generator=g))
        else:
            # default init is std 0.02 everywhere; norms at 1 +- noise make the fixtures less degenerate
            g = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    scale = 1.0 if name.endswith(spec.unit_norms) and spec.unit_norms else spec.norm_weight
                    p.copy_(scale + 0.1 * torch.randn(p.shape, generator=g))
    model = model.to(getattr(torch, spec.dtype))
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    if (tok_dir / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
        # transformers 5 no longer saves the SentencePiece model; released SPM checkpoints ship it
        shutil.copy(tok_dir / "tokenizer.model", out / "tokenizer.model")
    if spec.chat_template:
        src = need_shared("tokenizers", "llama.cpp-vocab", "templates", spec.chat_template)
        shutil.copy(src, out / "chat_template.jinja")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def state_of(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved fixture as float32 (fixtures are tiny; production code never does this)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(f).items()})
    return state


def make_family(
    root: Path, spec: Spec, tok_dir: Path, langs: tuple[str, ...] = ("eu",), *, shard_size: str | None = None
) -> dict[str, Path]:
    """base, instruct and one language model per code, all sharing a random base."""
    import transformers

    paths = {"base": make_model(root / "base", spec, tok_dir, seed=1, shard_size=shard_size)}
    # the fixture's own class: AutoModelForCausalLM makes Qwen3.5's causal LM of a conditional-generation folder
    base = getattr(transformers, spec.arch).from_pretrained(paths["base"], torch_dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in base.named_parameters()}
    del base
    paths["instruct"] = make_model(
        root / "instruct", spec, tok_dir, seed=2, base_state=base_state, shard_size=shard_size
    )
    for i, code in enumerate(langs):
        paths[code] = make_model(
            root / f"lang-{code}", spec, tok_dir, seed=10 + i, base_state=base_state, shard_size=shard_size
        )
    return paths


def shared_family(
    cache: Path, spec: Spec, tok_dir: Path, langs: tuple[str, ...] = ("eu",)
) -> dict[str, Path]:
    """make_family's family of `spec`, built once per test run under `cache` (keyed by the spec, the tokenizer
    and the languages). Shared between tests and workers: read it; copy it to change it (`chat_copy`)."""
    key = sha256(repr((spec, tok_dir.name, langs)).encode()).hexdigest()[:16]
    root = built_once(cache / f"family-{key}", lambda out: make_family(out, spec, tok_dir, langs))
    return {"base": root / "base", "instruct": root / "instruct", **{c: root / f"lang-{c}" for c in langs}}


def chat_copy(family: dict[str, Path], root: Path, template: str, eos: list[int]) -> dict[str, Path]:
    """A copy of a (shared) family under `root` in which only the instruct model has a chat template, `template`,
    and the EOS list `eos` (chat_instruct): what make_family without a chat template then chat_instruct make."""
    copy = {k: Path(shutil.copytree(p, root / p.name)) for k, p in family.items()}
    for p in copy.values():
        (p / "chat_template.jinja").unlink(missing_ok=True)
    return chat_instruct(copy, template, eos)


def tiny_spm_tokenizer(cache: Path) -> Path:
    """llama2.c's 512-token SentencePiece tokenizer as a Hugging Face tokenizer folder (built in ~0.1 s): the
    cheap vocabulary for merge tests, where what matters is the weights, not the tokenizer."""

    def save(out: Path) -> None:
        from transformers import LlamaTokenizer

        src = need_shared("models", "stories260K", "tok512.model")
        out.mkdir(parents=True)
        shutil.copy(src, out / "tokenizer.model")
        LlamaTokenizer.from_pretrained(out).save_pretrained(out)

    return built_once(cache / "tok-spm512", save)


def chat_instruct(
    family: dict[str, Path],
    template: str = "meta-llama-Llama-3.1-8B-Instruct.jinja",
    eos: list[int] | None = None,
) -> dict[str, Path]:
    """Give the family's instruct model a real chat template and a multi-EOS generation_config (as Llama 3.1
    Instruct has), so merges can be checked to keep both."""
    src = need_shared("tokenizers", "llama.cpp-vocab", "templates", template)
    shutil.copy(src, family["instruct"] / "chat_template.jinja")
    gen = json.loads((family["instruct"] / "generation_config.json").read_text())
    gen["eos_token_id"] = eos or [2, 0]
    (family["instruct"] / "generation_config.json").write_text(json.dumps(gen))
    return family


def write_recipe(path: Path, family: dict[str, Path], weights: dict[str, float], **fields) -> Path:
    """A recipe YAML next to nothing in particular: models as absolute folders of `family`."""
    import yaml

    data = {
        "name": fields.pop("name", "tiny"),
        "instruct": str(family["instruct"]),
        "base": str(family["base"]),
        "languages": [{"code": c, "model": str(family[c]), "weight": w} for c, w in weights.items()],
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def compat_error(family: dict[str, Path], tmp_path: Path, edit: Callable[[dict], object]) -> str:
    """The check's message for `family` when a copy of eu has its config.json changed by `edit` (in place)."""
    eu = shutil.copytree(family["eu"], tmp_path / "eu")
    cfg = json.loads((eu / "config.json").read_text())
    edit(cfg)
    (eu / "config.json").write_text(json.dumps(cfg))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {**family, "eu": eu}, {"eu": 1.0}))
    with pytest.raises(EdgemergeError) as e:
        check_compat(resolve_recipe(recipe))
    return e.value.message
