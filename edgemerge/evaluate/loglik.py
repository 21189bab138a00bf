"""Log-likelihoods of continuations of a context through llama.cpp: the context is decoded once and each
continuation continues it from the cache (`Model.continuations`); a benchmark's questions are scored several
per llama_decode, each in its own sequences (`Model.continuations_many`).

    ll(c) = Σ_i log p(c_i | context, c_<i)        (float64 log-softmax of llama.cpp's logits)

Tokens as lm-evaluation-harness makes them (`_encode_pair`): trailing whitespace of the context moves to the
front of the continuation, the context is tokenized alone (with BOS when the vocabulary asks for it) and the
continuation's tokens are those of context + continuation after the context's own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from ..runtime import Model, log_softmax
from .harness import Request


def encode_pair(
    model: Model, context: str, continuations: list[str], *, special: bool = False
) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each continuation's tokens, as lm-eval's _encode_pair makes them; `special`:
    special-token text is parsed (a context rendered by a chat template)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    ctx = model.tokenize(context, parse_special=special)
    return ctx, [model.tokenize(context + c, parse_special=special)[len(ctx) :] for c in continuations]


def encode_request(model: Model, req: Request) -> tuple[list[int], list[list[int]]]:
    """A question's tokens: its plain-text context, or its turns rendered by the model's chat template."""
    if req.messages is None:
        return encode_pair(model, req.context, req.continuations)
    return encode_pair(model, model.chat_prompt(req.messages), req.continuations, special=True)


def continuation_logliks(model: Model, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """ll of each continuation after `ctx` (an empty continuation: 0, the empty sum, as in lm-eval)."""
    return _logliks(*model.continuations(ctx, conts), conts)


def continuation_logliks_many(
    model: Model, pairs: Iterable[tuple[list[int], list[list[int]]]], n_seq: int, n_ctx_seq: int
) -> Iterator[list[float]]:
    """`continuation_logliks` of each (context, continuations) in order, several questions per llama_decode
    (`Model.continuations_many`, `n_seq` sequences of `n_ctx_seq` tokens)."""
    pending: deque[list[list[int]]] = deque()

    def feed() -> Iterator[tuple[list[int], list[list[int]]]]:
        for ctx, conts in pairs:
            pending.append(conts)
            yield ctx, conts

    for last, rows in model.continuations_many(feed(), n_seq, n_ctx_seq):
        yield _logliks(last, rows, pending.popleft())


def _logliks(last: np.ndarray, rows: list[np.ndarray], conts: list[list[int]]) -> list[float]:
    out = []
    for cont, r in zip(conts, rows):
        if not cont:
            out.append(0.0)
            continue
        scored = np.vstack([last[None, :], r])
        out.append(float(log_softmax(scored)[np.arange(len(cont)), cont].sum()))
    return out
