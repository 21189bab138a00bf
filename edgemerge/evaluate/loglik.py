"""Log-likelihoods of continuations of one context through llama.cpp: the context is decoded once and each
continuation continues it from the cache (`Model.continuations`).

    ll(c) = Σ_i log p(c_i | context, c_<i)        (float64 log-softmax of llama.cpp's logits)

Tokens as lm-evaluation-harness makes them (`_encode_pair`): trailing whitespace of the context moves to the
front of the continuation, the context is tokenized alone (with BOS when the vocabulary asks for it) and the
continuation's tokens are those of context + continuation after the context's own.
"""

from __future__ import annotations

import numpy as np

from ..runtime import Model, log_softmax


def encode_pair(model: Model, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each continuation's tokens, as lm-eval's _encode_pair makes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    ctx = model.tokenize(context)
    return ctx, [model.tokenize(context + c)[len(ctx) :] for c in continuations]


def continuation_logliks(model: Model, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """ll of each continuation after `ctx` (an empty continuation: 0, the empty sum, as in lm-eval)."""
    last, rows = model.continuations(ctx, conts)
    out = []
    for cont, r in zip(conts, rows):
        if not cont:
            out.append(0.0)
            continue
        scored = np.vstack([last[None, :], r])
        out.append(float(log_softmax(scored)[np.arange(len(cont)), cont].sum()))
    return out
