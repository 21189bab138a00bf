"""Perplexity with llama.cpp's own chunking (tools/perplexity, `llama-perplexity -c N`).

The passages are joined with newlines and tokenized as one text, with BOS when the model's vocabulary adds one.
The tokens are cut into `n_chunks = n_tokens // ctx` chunks of exactly `ctx` tokens (the remainder is dropped).
Each chunk is evaluated from an empty context; its first token is replaced by BOS when the model adds BOS; only
the second half is scored: with first = ctx // 2, the logits at positions first .. ctx-2 predict the tokens at
first+1 .. ctx-1, so each chunk scores ctx - 1 - first tokens. Then

    PPL = exp( -(1/N) * sum_i log p(t_i | t_<i) )    over the N scored tokens of all chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import EdgemergeError
from ..progress import Progress, task
from ..runtime import Model, log_softmax

DEFAULT_CTX = 256
MIN_CTX = 16


@dataclass
class Chunks:
    tokens: list[int]
    ctx: int
    n_chunks: int

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored(self) -> int:
        return self.n_chunks * (self.ctx - 1 - self.first)


def make_chunks(
    model: Model,
    passages: list[str],
    ctx: int = DEFAULT_CTX,
    *,
    max_chunks: int | None = None,
    fit: bool = True,
) -> Chunks:
    """Tokenize the text and choose the chunking. With `fit`, `ctx` shrinks (not below 16) so that the text
    gives at least two chunks, and never exceeds the model's context or training context."""
    if ctx < MIN_CTX:
        raise EdgemergeError(f"a perplexity chunk of {ctx} tokens is too small: give at least {MIN_CTX}")
    room = min(model.n_ctx, model.n_ctx_train)
    if room < MIN_CTX:
        raise EdgemergeError(
            f"{model.path.name} has a context of {room} tokens; perplexity needs at least {MIN_CTX}"
        )
    tokens = model.tokenize("\n".join(passages), add_special=True)
    ctx = min(ctx, room)
    if fit and len(tokens) < 2 * ctx:
        ctx = max(MIN_CTX, len(tokens) // 2)
    n_chunks = len(tokens) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise EdgemergeError(
            f"the text has only {len(tokens)} tokens; perplexity needs at least {ctx} (give a longer --text)"
        )
    return Chunks(tokens, ctx, n_chunks)


def chunk_logits(model: Model, chunks: Chunks) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each chunk: (logits at positions first..ctx-2, the target tokens at first+1..ctx-1); several chunks
    per llama_decode when they fit its batch (`Model.logits_many`), as llama.cpp's perplexity tool does."""
    seqs = []
    for i in range(chunks.n_chunks):
        part = list(chunks.tokens[i * chunks.ctx : (i + 1) * chunks.ctx])
        if model.add_bos:
            part[0] = model.bos
        seqs.append(part)
    for part, logits in zip(seqs, model.logits_many(seqs, chunks.first)):
        yield logits[:-1], np.asarray(part[chunks.first + 1 :])


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, 32 rows at a time (float64 temporaries of a few MB)."""
    out = [
        -log_softmax(logits[i : i + 32])[np.arange(len(targets[i : i + 32])), targets[i : i + 32]]
        for i in range(0, len(targets), 32)
    ]
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens
    ctx: int
    chunks: int


def perplexity(
    model: Model,
    chunks: Chunks,
    progress=None,
    on_chunk: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    label: str = "perplexity",
) -> PerplexityResult:
    """Perplexity over `chunks` (module docstring); `on_chunk(i, logits, targets)` sees each chunk's logits."""
    total, count = 0.0, 0
    with task(progress, label, chunks.n_chunks, unit="chunks") as advance:
        for i, (logits, targets) in enumerate(chunk_logits(model, chunks)):
            total += float(nll(logits, targets).sum())
            count += len(targets)
            if on_chunk is not None:
                on_chunk(i, logits, targets)
            advance(1)
    return PerplexityResult(float(np.exp(total / count)), count, chunks.ctx, chunks.n_chunks)


__all__ = ["Chunks", "PerplexityResult", "Progress", "make_chunks", "perplexity"]
