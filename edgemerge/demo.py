"""The offline demo family: a tiny base, instruct and language model the project generates itself.

`edgemerge build --lang eu --demo` needs models but may not touch the network, so this module makes a family in
seconds: a SentencePiece tokenizer trained (fixed seed, one thread) on sentences shipped in `demo/data/`, wrapped
as a Hugging Face tokenizer with a ChatML chat template, and three tiny Llama models (hidden 256, so llama.cpp
k-quants apply) trained for a few seconds each:

    base      = random init, trained on English sentences
    instruct  = base, trained further on English chat turns (learns the template and to stop)
    lang      = base, trained further on sentences in the target language

The models are tiny and their answers meaningless; they exist to run every real stage of a build.
Generated files go to a cache folder (`~/.cache/edgemerge/demo`), never into the repository.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import yaml

from .errors import EdgemergeError
from .files import atomic_output
from .progress import Progress, task
from .recipe import Gates, Recipe, load_recipe, recipe_for_languages

DEMO_VERSION = 2
DATA_DIR = Path(__file__).resolve().parent / "demo" / "data"
EVAL_DATA_DIR = Path(__file__).resolve().parent / "evaluate" / "data"

# ChatML, as used by Qwen and many others: simple, and llama.cpp knows <|im_end|> as an end-of-turn token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class DemoSize:
    """Model and training sizes; the defaults keep generation near 10 s on a laptop CPU."""

    vocab: int = 1024
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    seq_len: int = 32
    batch: int = 8
    base_steps: int = 80
    instruct_steps: int = 70
    lang_steps: int = 60
    lr: float = 3e-3


@dataclass
class DemoFamily:
    root: Path
    recipe: Recipe
    lang: str


def demo_cache_dir() -> Path:
    """Where generated demo models live: $EDGEMERGE_CACHE/demo, else $XDG_CACHE_HOME/edgemerge/demo."""
    if os.environ.get("EDGEMERGE_CACHE"):
        return Path(os.environ["EDGEMERGE_CACHE"]) / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgemerge" / "demo"


def demo_languages() -> list[str]:
    """Languages the demo can build: those with demo sentences or an eval sample text."""
    codes = {p.stem for p in DATA_DIR.glob("*.txt") if p.stem != "en"}
    codes |= {p.parent.name for p in EVAL_DATA_DIR.glob("*/sample.txt") if p.parent.name != "en"}
    return sorted(codes)


def language_text(lang: str) -> list[str]:
    """Training sentences for the demo's language model: `demo/data/<lang>.txt`, else the eval sample text."""
    for p in (DATA_DIR / f"{lang}.txt", EVAL_DATA_DIR / lang / "sample.txt"):
        if p.exists():
            return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise EdgemergeError(
        f"the demo has no text in language {lang!r}; demo languages: {', '.join(demo_languages())}"
    )


def _english() -> tuple[list[str], list[tuple[str, str]]]:
    sentences = (DATA_DIR / "en.txt").read_text(encoding="utf-8").splitlines()
    chats = []
    for line in (DATA_DIR / "chat_en.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            chats.append((item["q"], item["a"]))
    return [s for s in sentences if s.strip()], chats


def train_tokenizer(lines: list[str], out_dir: Path, vocab_size: int) -> Path:
    """Train a SentencePiece BPE model on `lines` (deterministic: fixed seed, one thread) and save it as a
    Hugging Face tokenizer folder with the ChatML template; EOS is <|im_end|>, as in chat models."""
    # transformers is heavy to import (seconds): loaded only when a tokenizer or config is read
    from transformers import LlamaTokenizer

    spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any text tokenizes, whatever the prompts contain
        character_coverage=1.0,
        split_digits=True,
        num_threads=1,
        user_defined_symbols=SPECIAL,
        hard_vocab_limit=False,  # a small corpus may not fill the vocabulary
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # tokenizer.model stays beside tokenizer.json: GGUF converters read the SentencePiece model directly.
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(out_dir)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return out_dir


def _chat_texts(chats: list[tuple[str, str]], system: str | None) -> list[str]:
    texts = []
    for i, (q, a) in enumerate(chats):
        msgs = []
        if system and i % 2 == 0:
            msgs.append({"role": "system", "content": system})
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        texts.append(_render(msgs))
    return texts


def _render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _new_model(tok_dir: Path, size: DemoSize, seed: int):
    # torch is heavy to import (seconds): loaded only where its arithmetic is needed
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def _train(model, tok, texts: list[str], steps: int, size: DemoSize, seed: int, advance: Callable) -> float:
    """A few steps of next-token training on random windows of the tokenized texts; returns the last loss."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids
    data = torch.tensor(ids)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    n = size.seq_len + 1
    for _ in range(steps):
        starts = [rng.randrange(0, max(1, len(data) - n)) for _ in range(size.batch)]
        batch = torch.stack([data[s : s + n] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        advance(1)
    model.eval()
    return float(loss.detach())


def _save(model, tok, out: Path, *, generation_eos: list[int]) -> None:
    import torch

    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tok.save_pretrained(out)
    shutil.copy(Path(tok.name_or_path) / "tokenizer.model", out / "tokenizer.model")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": generation_eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _train_family(
    out: Path,
    tok_dir: Path,
    lang: str,
    lang_lines: list[str],
    en_lines: list[str],
    chat_texts: list[str],
    size: DemoSize,
    progress: Progress | None,
) -> None:

    total = size.base_steps + size.instruct_steps + size.lang_steps
    with task(progress, "demo: training tiny models", total, unit="steps") as advance:
        base, tok = _new_model(tok_dir, size, seed=1)
        _train(base, tok, en_lines, size.base_steps, size, seed=1, advance=advance)
        _save(base, tok, out / "base", generation_eos=[tok.eos_token_id])
        base_state = copy.deepcopy(base.state_dict())  # after the bf16 round trip: exactly the saved base

        model = base
        _train(model, tok, chat_texts + en_lines[:10], size.instruct_steps, size, seed=2, advance=advance)
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")]
        _save(model, tok, out / "instruct", generation_eos=eos)

        model.load_state_dict(base_state)
        _train(model, tok, lang_lines, size.lang_steps, size, seed=3, advance=advance)
        _save(model, tok, out / f"lang-{lang}", generation_eos=[tok.eos_token_id])


def demo_gates(lang: str) -> Gates:
    """The gates of the bundled recipe for `lang` (reported by the demo, never failing it)."""
    try:
        return load_recipe(recipe_for_languages([lang], require_models=False)).eval
    except EdgemergeError:
        return Gates()


def generate_family(
    out: Path, lang: str, size: DemoSize = DemoSize(), progress: Progress | None = None
) -> None:
    """Write tokenizer/, base/, instruct/, lang-<lang>/ and recipe.yaml under `out`."""
    import torch

    lang_lines = language_text(lang)
    en_lines, chats = _english()
    system_en = "You are a helpful assistant."
    chat_texts = _chat_texts(chats, system_en)
    tok_dir = train_tokenizer(en_lines + lang_lines + chat_texts, out / "tokenizer", size.vocab)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar covers generation
    threads = torch.get_num_threads()
    # One thread: tiny matrices gain nothing from more, and contended threads make it many times slower.
    torch.set_num_threads(1)
    try:
        _train_family(out, tok_dir, lang, lang_lines, en_lines, chat_texts, size, progress)
    finally:
        torch.set_num_threads(threads)

    recipe = {
        "name": f"edgemerge-demo-{lang}",
        "description": (
            f"Offline demo: a tiny generated family (hidden {size.hidden}, {size.layers} layers); "
            "the models are tiny and their answers meaningless."
        ),
        "instruct": "./instruct",
        "base": "./base",
        "languages": [{"code": lang, "model": f"./lang-{lang}", "weight": 0.5}],
        "method": "task_arithmetic",
        "dtype": "bfloat16",
        "quants": ["Q4_K_M", "Q8_0"],
        "license": "apache-2.0",
        "eval": demo_gates(lang).model_dump(exclude_none=True),
    }
    (out / "recipe.yaml").write_text(
        yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    (out / "demo.json").write_text(json.dumps({"version": DEMO_VERSION, "lang": lang}))


def demo_family(
    lang: str = "eu", *, cache: Path | None = None, progress: Progress | None = None
) -> DemoFamily:
    """The demo family for `lang`, generated on first use (about 10 s) and cached afterwards."""
    root = (cache or demo_cache_dir()) / f"{lang}-v{DEMO_VERSION}"
    if not (root / "recipe.yaml").exists():
        language_text(lang)  # fail before any work when the language has no text
        with atomic_output(root, force=True, kind="demo") as tmp:
            generate_family(tmp, lang, progress=progress)
    recipe = load_recipe(root / "recipe.yaml")
    return DemoFamily(root=root, recipe=recipe, lang=lang)


__all__ = ["DemoFamily", "DemoSize", "demo_cache_dir", "demo_family", "generate_family"]
