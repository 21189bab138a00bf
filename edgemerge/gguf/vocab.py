"""Tokenizer -> GGUF keys: token list, scores, types, merges, special ids, add_bos/eos and the chat template.

Three builders, as in llama.cpp's `convert_hf_to_gguf.py`: `sentencepiece` (a `tokenizer.model`, Llama 2 /
Mistral), `llama_hf` (an SPM-style `tokenizer.json` without the .model, via gguf-py's `LlamaHfVocab`) and
`gpt2` (byte-level BPE from `tokenizer.json`, Llama 3 / Qwen). Special ids, merges and the chat template come
from gguf-py's `SpecialVocab`. For BPE, `tokenizer.ggml.pre` is found the way llama.cpp finds it: the sha256
of the token ids of a fixed check string, looked up in the converter's table (`pre_hashes.py`).
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
from sentencepiece import SentencePieceProcessor

from ..errors import EdgemergeError
from ..trust import load_tokenizer
from .pre_hashes import PRE_HASHES

# llama.cpp's check string (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids identify the pre-tokenizer
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sentencepiece piece types as llama.cpp numbers them (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = (
    gguf.TokenType.NORMAL,
    gguf.TokenType.UNKNOWN,
    gguf.TokenType.CONTROL,
    gguf.TokenType.USER_DEFINED,
    gguf.TokenType.UNUSED,
    gguf.TokenType.BYTE,
)


def pre_tokenizer(tokenizer: Any) -> str:
    """`tokenizer.ggml.pre` for a Hugging Face BPE tokenizer: sha256(str(ids of CHECK_TEXT)) -> name."""
    chkhsh = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if chkhsh not in PRE_HASHES:
        raise EdgemergeError(
            f"unknown BPE pre-tokenizer (check hash {chkhsh}): llama.cpp would not know how to split text for "
            "this tokenizer; use the tokenizer files of a released model llama.cpp supports"
        )
    return PRE_HASHES[chkhsh]


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def write_vocab(w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """Add the tokenizer keys of `model_dir` to the writer using the first builder in `kinds` that applies."""
    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        raise EdgemergeError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer files "
            "into that folder"
        )
    for kind in kinds:
        if kind == "sentencepiece" and (model_dir / "tokenizer.model").is_file():
            return _sentencepiece(w, model_dir, hparams)
        if kind == "llama_hf" and (model_dir / "tokenizer.json").is_file():
            try:
                vocab = SafeLlamaHfVocab(model_dir)
            except (FileNotFoundError, TypeError):  # a byte-level BPE tokenizer.json: next builder
                continue
            return _llama_hf(w, model_dir, vocab)
        if kind == "gpt2" and (model_dir / "tokenizer.json").is_file():
            return _gpt2(w, model_dir, hparams)
    raise EdgemergeError(f"{model_dir}: no usable tokenizer for this architecture (tried {', '.join(kinds)})")


def _gpt2(w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> None:
    """Byte-level BPE (the converter's get_vocab_base + _set_vocab_gpt2)."""
    tokenizer = load_tokenizer(model_dir)
    vocab = tokenizer.get_vocab()
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise EdgemergeError(
            f"{model_dir}: tokenizer has ids up to {max(vocab.values())} but config.json vocab_size is {vocab_size}"
        )
    pre = pre_tokenizer(tokenizer)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects control/user-defined tokens pre-normalized
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(_CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special_vocab(model_dir, load_merges=True).add_to_gguf(w, quiet=True)


def _sentencepiece(w: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> None:
    """SentencePiece `tokenizer.model` plus added tokens (the converter's _create_vocab_sentencepiece)."""

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise EdgemergeError(f"{model_dir / 'tokenizer.model'} is not a SentencePiece model ({e})") from None
    vocab_size = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [_UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = _NORMAL
        if sp.IsUnknown(i):
            kind = _UNKNOWN
        elif sp.IsControl(i):
            kind = _CONTROL
        elif sp.IsUnused(i):
            kind = _UNUSED
        elif sp.IsByte(i):
            kind = _BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind

    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, _USER_DEFINED
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        for key, data in cfg.get("added_tokens_decoder", {}).items():
            i = int(key)
            if i >= vocab_size:
                continue
            text = data["content"]
            if data.get("special") or _looks_special(text):
                types[i] = _CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = _USER_DEFINED
            scores[i], tokens[i] = -1000.0, text.encode("utf-8")

    _write_llama_vocab(w, model_dir, tokens, scores, types)


class SafeLlamaHfVocab(gguf.LlamaHfVocab):
    """gguf-py's LlamaHfVocab with its tokenizer loaded by `trust.load_tokenizer`: gguf-py's own __init__ calls
    AutoTokenizer without `trust_remote_code=False` (a prompt, then the folder's code on "y"). The body is
    gguf-py 0.19.0's __init__ with that one call replaced; the token methods are inherited unchanged."""

    def __init__(self, base_path: Path):
        fname_tokenizer = Path(base_path) / "tokenizer.json"
        with open(fname_tokenizer, encoding="utf-8") as f:  # FileNotFoundError: the caller's next builder
            tokenizer_json = json.load(f)
        tokenizer_model: dict[str, Any] = tokenizer_json["model"]
        is_llama3 = (
            tokenizer_model["type"] == "BPE"
            and tokenizer_model.get("ignore_merges", False)
            and not tokenizer_model.get("byte_fallback", True)
        )
        if is_llama3:
            raise TypeError("Llama 3 must be converted with BpeVocab")
        if (
            tokenizer_model["type"] != "BPE"
            or not tokenizer_model.get("byte_fallback", False)
            or tokenizer_json["decoder"]["type"] != "Sequence"
        ):
            raise FileNotFoundError("Cannot find Llama BPE tokenizer")
        self.tokenizer = load_tokenizer(Path(base_path))
        assert self.tokenizer.is_fast  # gguf-py's assumption: tokenizer.json is used
        self.added_tokens_list = []
        self.added_tokens_dict = {}
        self.added_tokens_ids = set()
        for tok, tokidx in sorted(self.tokenizer.get_added_vocab().items(), key=lambda x: x[1]):
            if tokidx >= self.tokenizer.vocab_size:
                self.added_tokens_list.append(tok)
                self.added_tokens_dict[tok] = tokidx
                self.added_tokens_ids.add(tokidx)
        self.specials = {tok: self.tokenizer.get_vocab()[tok] for tok in self.tokenizer.all_special_tokens}
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.vocab_size_base = self.tokenizer.vocab_size
        self.vocab_size = self.vocab_size_base + len(self.added_tokens_list)
        self.fname_tokenizer = fname_tokenizer


def _llama_hf(w: gguf.GGUFWriter, model_dir: Path, vocab: gguf.LlamaHfVocab) -> None:
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    _write_llama_vocab(w, model_dir, tokens, scores, types)


def _write_llama_vocab(
    w: gguf.GGUFWriter, model_dir: Path, tokens: list[bytes], scores: list[float], types: list[int]
) -> None:
    """The keys of a SentencePiece-style ("llama") vocabulary, then the special tokens."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special_vocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def special_vocab(model_dir: Path, **kwargs: Any) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab (special ids, merges, add_bos/eos, chat template), plus one rule of the newer
    gguf-py vendored in llama.cpp (llama-cpp-python 0.3.36) that gguf 0.19.0 on PyPI lacks: a byte-level
    post-processor means "add no BOS/EOS" unless its TemplateProcessing adds them, recorded as explicit
    `add_bos_token`/`add_eos_token` = false. Drop this once a newer gguf is released."""
    sv = gguf.SpecialVocab(model_dir, **kwargs)
    tj_path = Path(model_dir) / "tokenizer.json"
    if not tj_path.is_file():
        return sv
    post = json.loads(tj_path.read_text(encoding="utf-8")).get("post_processor") or {}
    procs = post.get("processors", [post])
    if not any(p.get("type") == "ByteLevel" for p in procs):
        return sv
    single = next((p.get("single", []) for p in procs if p.get("type") == "TemplateProcessing"), [])
    templated = {
        "bos": len(single) > 1 and "SpecialToken" in single[0],
        "eos": len(single) > 1 and "SpecialToken" in single[-1],
    }
    for typ, by_template in templated.items():
        if not by_template:
            sv.add_special_token[typ] = False
    return sv


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: some models mark control tokens as not special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )
