"""The JSON files of a model folder (config, tokenizer), read with their shapes checked.

A model folder from the hub is untrusted input: `config.json` may be a list, a field may hold a string where a
count belongs, an added token may lack its id. Everything edgemerge, transformers or gguf-py reads from these
files is checked here first, so a malformed file is one line naming the file and the field (exit 2), not a
TypeError deep in a converter after minutes of work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EdgemergeError
from .limits import present, read_json_object, shown

# config.json counts (top level or text_config) and their upper bounds when present and not null: far above any
# released model, low enough that the converter's loops over them (one per layer, per vocabulary entry) and
# llama.cpp's 32-bit fields stay bounded
_LAYERS, _HEADS, _WIDTH = 1 << 12, 1 << 12, 1 << 20
_COUNTS = {
    "vocab_size": 1 << 21,
    "hidden_size": _WIDTH,
    "intermediate_size": _WIDTH,
    "head_dim": _WIDTH,
    "num_hidden_layers": _LAYERS,
    "n_layers": _LAYERS,
    "n_layer": _LAYERS,
    "num_layers": _LAYERS,
    "num_attention_heads": _HEADS,
    "num_key_value_heads": _HEADS,
    "n_heads": _HEADS,
    "n_kv_heads": _HEADS,
    "max_position_embeddings": (1 << 31) - 1,
}
_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "layer_norm_epsilon")
_FLAGS = ("tie_word_embeddings",)
_OBJECTS = ("rope_scaling", "rope_parameters")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id")
_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_TOKEN_FLAGS = ("add_bos_token", "add_eos_token", "add_prefix_space")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 1 << 31


def _bad(path: Path, field: str, want: str, got: Any) -> EdgemergeError:
    return EdgemergeError(
        f"{path}: {field} must be {want}, got {shown(got)}; restore the file from the model's source"
    )


def _config_fields(cfg: dict, path: Path, scope: str) -> None:
    for key, most in _COUNTS.items():
        v = cfg.get(key)
        if v is not None and not (_is_int(v) and 0 < v <= most):
            raise _bad(path, scope + key, f"a positive integer up to {most}", v)
    for key in _NUMBERS:
        v = cfg.get(key)
        if v is not None and not _is_number(v):
            raise _bad(path, scope + key, "a number", v)
    for key in _FLAGS:
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise _bad(path, scope + key, "true or false", v)
    for key in _OBJECTS:
        v = cfg.get(key)
        if v is not None and not isinstance(v, dict):
            raise _bad(path, scope + key, "an object", v)
    for key in _TOKEN_IDS:
        v = cfg.get(key)
        if v is not None and not (_is_id(v) or (isinstance(v, list) and all(map(_is_id, v)))):
            raise _bad(path, scope + key, "a token id or a list of token ids", v)
    arch = cfg.get("architectures")
    if arch is not None and not (
        isinstance(arch, list) and arch and all(isinstance(a, str) and 0 < len(a) <= 200 for a in arch)
    ):
        raise _bad(path, scope + "architectures", "a list of class names", arch)
    model_type = cfg.get("model_type")
    if model_type is not None and not (isinstance(model_type, str) and len(model_type) <= 200):
        raise _bad(path, scope + "model_type", "a name", model_type)


def read_config(folder: Path) -> dict:
    """`config.json` of a model folder: a JSON object whose known fields (counts, flags, names, token ids, a
    nested `text_config`) have the types transformers and llama.cpp's converter expect."""
    path = Path(folder) / "config.json"
    cfg = read_json_object(path)
    _config_fields(cfg, path, "")
    text = cfg.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise _bad(path, "text_config", "an object", text)
        _config_fields(text, path, "text_config.")
    return cfg


def _token_name(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


def check_tokenizer_json(data: dict, path: Path) -> None:
    """tokenizer.json: the model's vocab (token -> id, or Unigram [piece, score] pairs), merges (strings or
    pairs), added tokens (each with an integer id and a string content) and post-processor are well formed."""
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise _bad(path, "model", "an object", model)
    model = model or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        bad = next(((t, i) for t, i in vocab.items() if not _is_id(i)), None)
        if bad is not None:
            raise _bad(path, f"model.vocab[{shown(bad[0])}]", "a token id", bad[1])
    elif isinstance(vocab, list):
        for n, item in enumerate(vocab):
            if not (
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and _is_number(item[1])
            ):
                raise _bad(path, f"model.vocab[{n}]", "a [piece, score] pair", item)
    elif vocab is not None:
        raise _bad(path, "model.vocab", "an object or a list", vocab)
    merges = model.get("merges")
    if merges is not None:
        if not isinstance(merges, list):
            raise _bad(path, "model.merges", "a list", merges)
        for n, m in enumerate(merges):
            if not (
                isinstance(m, str)
                or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
            ):
                raise _bad(path, f"model.merges[{n}]", "a string or a pair of strings", m)
    added = data.get("added_tokens")
    if added is not None:
        if not isinstance(added, list):
            raise _bad(path, "added_tokens", "a list", added)
        for n, t in enumerate(added):
            if not isinstance(t, dict):
                raise _bad(path, f"added_tokens[{n}]", "an object", t)
            if not _is_id(t.get("id")):
                raise _bad(path, f"added_tokens[{n}].id", "a token id", t.get("id"))
            if not isinstance(t.get("content"), str):
                raise _bad(path, f"added_tokens[{n}].content", "a string", t.get("content"))
    post = data.get("post_processor")
    if post is not None:
        if not isinstance(post, dict):
            raise _bad(path, "post_processor", "an object", post)
        procs = post.get("processors")
        if procs is not None and not (isinstance(procs, list) and all(isinstance(p, dict) for p in procs)):
            raise _bad(path, "post_processor.processors", "a list of objects", procs)
        for p in procs or [post]:
            single = p.get("single")
            if single is not None and not (
                isinstance(single, list) and all(isinstance(x, dict) for x in single)
            ):
                raise _bad(path, "post_processor single", "a list of objects", single)


def check_tokenizer_config(data: dict, path: Path) -> None:
    """tokenizer_config.json: added_tokens_decoder (id -> {"content": ...}), the chat template (a string or a
    list of named templates), the special token names and the add_*_token flags."""
    decoder = data.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise _bad(path, "added_tokens_decoder", "an object of token id -> token", decoder)
        for key, tok in decoder.items():
            if not (key.isascii() and key.isdecimal() and len(key) <= 10):
                raise _bad(path, "an added_tokens_decoder key", "a token id", key)
            if not isinstance(tok, dict) or not isinstance(tok.get("content"), str):
                raise _bad(path, f"added_tokens_decoder[{key}]", 'an object with a string "content"', tok)
    template = data.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in template
    )
    if template is not None and not isinstance(template, str) and not named:
        raise _bad(path, "chat_template", "a string or a list of {name, template}", template)
    for key in _TOKEN_NAMES:
        if not _token_name(data.get(key)):
            raise _bad(path, key, 'a token string or an object with a string "content"', data.get(key))
    for key in _TOKEN_FLAGS:
        v = data.get(key)
        if v is not None and not isinstance(v, bool):
            raise _bad(path, key, "true or false", v)


def check_added_tokens(data: dict, path: Path) -> None:
    """added_tokens.json: token -> id."""
    for token, i in data.items():
        if not _is_id(i):
            raise _bad(path, f"the id of added token {shown(token)}", "a token id", i)


# the small tokenizer files (tokenizer.json, large, is checked where it is read: `read_tokenizer_json`)
_TOKENIZER_FILES = {"tokenizer_config.json": check_tokenizer_config, "added_tokens.json": check_added_tokens}


def read_tokenizer_json(folder: Path) -> dict | None:
    """tokenizer.json, checked (None when the folder has none)."""
    path = Path(folder) / "tokenizer.json"
    if not present(path):
        return None
    data = read_json_object(path)
    check_tokenizer_json(data, path)
    return data


def check_model_json(folder: Path) -> dict:
    """Check a model folder's config.json, tokenizer_config.json and added_tokens.json (those present); return
    the config."""
    cfg = read_config(folder)
    for name, check in _TOKENIZER_FILES.items():
        path = Path(folder) / name
        if present(path):
            check(read_json_object(path), path)
    return cfg
