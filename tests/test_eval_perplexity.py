"""Perplexity: llama.cpp's own figure for stories260K, and an independent computation from raw logits."""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.perplexity import make_chunks, perplexity
from edgemerge.runtime import Model

from .reference_llama import reference_llama
from .shared import need_shared


@pytest.fixture(scope="module")
def stories():
    m = Model(need_shared("models", "stories260K", "stories260K.gguf"), n_ctx=512, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def en_lines() -> list[str]:
    return need_shared("text", "by_lang", "en.txt").read_text(encoding="utf-8").splitlines()[:300]


def test_reproduces_llama_cpp_perplexity(stories, en_lines):
    """../shared/data/README.md: llama.cpp's perplexity tool gives about 67.8 on the first 300 lines of
    by_lang/en.txt with context 128. Same tokens, same chunking and the same llama.cpp forward pass give the
    same number up to float summation order, so the tolerance is the rounding of the published figure (0.05)."""
    chunks = make_chunks(stories, en_lines, 128, fit=False)
    r = perplexity(stories, chunks)
    assert (r.ctx, r.chunks, r.tokens) == (128, len(chunks.tokens) // 128, r.chunks * 63)
    assert r.perplexity == pytest.approx(67.8, abs=0.05)


def test_matches_independent_computation_from_raw_logits(en_lines):
    """The same definition written out with llama-cpp-python's high-level API (logits_all=True, Llama.eval,
    Llama.scores) and a per-token log-sum-exp in numpy: a different code path to the same logits."""

    path = need_shared("models", "stories260K", "stories260K.gguf")
    ctx = 64
    llm = reference_llama(
        model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=1, verbose=False
    )
    tokens = llm.tokenize("\n".join(en_lines[:16]).encode(), add_bos=True)
    n_chunks = len(tokens) // ctx
    nll = []
    for i in range(n_chunks):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        for pos in range(ctx // 2, ctx - 1):
            row = np.asarray(llm.scores[pos], dtype=np.float64)
            lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
            nll.append(lse - row[chunk[pos + 1]])
    llm.close()
    expected = float(np.exp(np.mean(nll)))

    m = Model(path, n_ctx=512, n_threads=1)
    try:
        r = perplexity(m, make_chunks(m, en_lines[:16], ctx, fit=False))
    finally:
        m.close()
    assert r.chunks == n_chunks and r.tokens == len(nll)
    assert r.perplexity == pytest.approx(expected, rel=1e-4)


def test_english_far_below_a_uniform_guess_and_basque_far_above(stories, en_lines):
    en = perplexity(stories, make_chunks(stories, en_lines[:100], 128)).perplexity
    eu_text = need_shared("text", "by_lang", "eu.txt").read_text(encoding="utf-8").splitlines()[:100]
    eu = perplexity(stories, make_chunks(stories, eu_text, 128)).perplexity
    assert en < 100  # far below 512, a uniform guess over the vocabulary
    assert eu > 512  # Basque is out of its training: worse than a uniform guess


def test_chunking_fits_short_text_and_rejects_too_little(stories):
    text = [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    ] * 3
    chunks = make_chunks(stories, text, 256)
    assert (
        len(chunks.tokens) < 2 * 256 and chunks.ctx == len(chunks.tokens) // 2 >= 16 and chunks.n_chunks == 2
    )
    with pytest.raises(EdgemergeError, match="only 3 tokens"):
        make_chunks(stories, ["Hi"], 256)
