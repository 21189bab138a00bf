"""Cheap, low-variance signals of one merge candidate (the sweep's scores), measured by llama.cpp on its GGUF.

A `Probe` holds the token ids every candidate is scored on, made once from the instruct model's GGUF (every
candidate and parent shares its vocabulary; the language model may lack a chat template), so all rows of a
sweep are measured on the same tokens. With A the reference answers of `answers.jsonl`, each question rendered
by the chat template as one user turn (teacher forcing):

    ppl, ppl_en                perplexity.py on held-out text of the target language / of English
    answer_ppl, answer_ppl_en  exp( -(1/N) * sum_j log p(a_j | prompt, a_<j) ) over the N answer tokens of A
    eot_prob, eot_prob_en      mean over A of sum_{e in EOG} p(e | prompt, answer): the model knows the turn is over
    language_fidelity, instruction_following, stop_rate   answers.py, from greedy answers (unless `chat` is off)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..progress import task
from ..runtime import Model, log_softmax
from .answers import answer_prompts, scores
from .perplexity import DEFAULT_CTX, Chunks, make_chunks, perplexity
from .prompts import load_answers, load_prompts, read_passages, sample_text

SIGNALS_VERSION = 1  # part of every cached score's key: bump when a signal's definition changes
ENGLISH = "en"
PROBE_CTX = 2048
CHAT_TOKENS = (
    128  # greedy answer length for the chat metrics: a sweep compares candidates, it does not ship one
)


@dataclass
class TextProbe:
    tokens: list[int]
    ctx: int
    n_chunks: int

    def chunks(self) -> Chunks:
        return Chunks(self.tokens, self.ctx, self.n_chunks)


@dataclass
class Probe:
    """What every candidate is scored on, as token ids (JSON-serialisable: a task can travel to another machine)."""

    lang: str
    text: TextProbe
    text_en: TextProbe
    answers: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids)
    answers_en: list[tuple[list[int], list[int]]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        return cls(
            lang=d["lang"],
            text=TextProbe(**d["text"]),
            text_en=TextProbe(**d["text_en"]),
            answers=[(list(p), list(a)) for p, a in d["answers"]],
            answers_en=[(list(p), list(a)) for p, a in d["answers_en"]],
        )

    def key(self) -> str:
        """sha256 of the probe's tokens and the signals' version: the cache key part that says what was measured."""
        blob = json.dumps([SIGNALS_VERSION, self.to_dict()], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@dataclass
class Signals:
    ppl: float
    ppl_en: float
    answer_ppl: float
    answer_ppl_en: float
    eot_prob: float
    eot_prob_en: float
    language_fidelity: float | None = None
    instruction_following: float | None = None
    stop_rate: float | None = None
    chat_note: str | None = None  # why the chat metrics are missing
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Signals:
        return cls(**d)


def make_probe(
    instruct_gguf: Path,
    lang: str,
    *,
    text: Path | None = None,
    answers: list | None = None,
    n_threads: int | None = None,
) -> Probe:
    """Tokenize the held-out text (`text` or the built-in sample) and the reference answers of `lang` and of
    English with the instruct model's GGUF (tokenizer and chat template only: no logits are computed)."""
    passages = read_passages(text) if text is not None else sample_text(lang)
    with closing(Model(instruct_gguf, n_ctx=PROBE_CTX, n_threads=n_threads)) as m:
        c = make_chunks(m, passages, DEFAULT_CTX)
        c_en = make_chunks(m, sample_text(ENGLISH), DEFAULT_CTX)
        pairs = answers if answers is not None else load_answers(lang)
        return Probe(
            lang=lang,
            text=TextProbe(c.tokens, c.ctx, c.n_chunks),
            text_en=TextProbe(c_en.tokens, c_en.ctx, c_en.n_chunks),
            answers=_answer_tokens(m, pairs),
            answers_en=_answer_tokens(m, load_answers(ENGLISH)),
        )


def _answer_tokens(m: Model, pairs: list) -> list[tuple[list[int], list[int]]]:
    out = []
    for a in pairs:
        prompt = m.chat_tokens([{"role": "user", "content": a.question}])
        out.append((prompt, m.tokenize(a.answer, add_special=False)))
    return out


def eog_tokens(m: Model) -> np.ndarray:
    """Every end-of-generation token of the vocabulary (llama.cpp's llama_vocab_is_eog)."""
    return np.asarray([t for t in range(m.n_vocab) if m.is_eog(t)], dtype=np.int64)


def answer_scores(m: Model, pairs: list[tuple[list[int], list[int]]], eog: np.ndarray) -> tuple[float, float]:
    """(answer perplexity, mean end-of-turn probability) of the reference answers (module docstring); a pair
    longer than the context is left out."""
    total, count, p_end = 0.0, 0, []
    for prompt, answer in pairs:
        ids = prompt + answer
        if len(ids) > m.n_ctx or not answer:
            continue
        first = len(prompt) - 1
        logp = log_softmax(m.logits(ids, first))  # rows first .. len(ids)-1: the answer, then what follows it
        total -= float(logp[np.arange(len(answer)), answer].sum())
        count += len(answer)
        p_end.append(float(np.exp(logp[-1][eog]).sum()) if len(eog) else 0.0)
    if count == 0:
        return math.nan, math.nan
    return math.exp(total / count), float(np.mean(p_end))


def measure(
    model_path: Path,
    probe: Probe,
    *,
    chat: bool = True,
    n_threads: int | None = None,
    batch: int | None = None,
    skip_chat: str | None = None,
    progress=None,
) -> Signals:
    """The signals of one GGUF on `probe` (module docstring); one model in memory."""
    t0 = time.perf_counter()
    name = Path(model_path).name
    with task(progress, f"loading {name}", None):
        m = Model(model_path, n_ctx=PROBE_CTX, n_threads=n_threads)
    with closing(m):
        ppl = perplexity(
            m, probe.text.chunks(), progress, label=f"{name}: perplexity {probe.lang}"
        ).perplexity
        ppl_en = perplexity(m, probe.text_en.chunks(), progress, label=f"{name}: perplexity en").perplexity
        eog = eog_tokens(m)
        with task(progress, f"{name}: reference answers", None):
            a_ppl, eot = answer_scores(m, probe.answers, eog)
            a_ppl_en, eot_en = answer_scores(m, probe.answers_en, eog)
        s = Signals(ppl, ppl_en, a_ppl, a_ppl_en, eot, eot_en)
        if not chat:
            s.chat_note = "not measured (--fast)"
        elif skip_chat is not None:
            s.chat_note = skip_chat
        elif m.chat_template is None:
            s.chat_note = "no chat template in this file"
        else:
            prompts = load_prompts(probe.lang)
            responses = answer_prompts(
                m,
                prompts,
                probe.lang,
                max_tokens=CHAT_TOKENS,
                progress=progress,
                n_seq=min(batch or 16, len(prompts)),
            )
            c = scores(responses, probe.lang)
            s.language_fidelity, s.instruction_following, s.stop_rate = (
                c.language_fidelity,
                c.instruction_following,
                c.stop_rate,
            )
    s.seconds = round(time.perf_counter() - t0, 2)
    return s
