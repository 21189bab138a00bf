"""Stored reference log-probabilities (llama.cpp's --kl-divergence-base format): the encoding against a
line-by-line transcription of llama.cpp's C code, how exact it is, and the file checks."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.drift import kl_divergence
from edgemerge.evaluate.reference import (
    HEADER,
    MAGIC,
    StoredReference,
    compare,
    decode,
    encode,
    record_len,
    reference_writer,
    scored_positions,
)


def llama_cpp_encode(row: np.ndarray) -> np.ndarray:
    """tools/perplexity/perplexity.cpp `log_softmax(n_vocab, logits, uint16_t * log_prob, tok)`, transcribed
    scalar by scalar in float32 (sum_exp in double, as there)."""
    f = np.float32
    max_logit, min_logit = f(row[0]), f(row[0])
    for x in row[1:]:
        max_logit, min_logit = max(max_logit, f(x)), min(min_logit, f(x))
    min_logit = max(min_logit, f(max_logit - f(16)))
    sum_exp = 0.0
    for x in row:
        sum_exp += float(np.exp(f(f(x) - max_logit), dtype=np.float32))
    log_sum_exp = f(math.log(sum_exp))
    min_log_prob = f(f(min_logit - max_logit) - log_sum_exp)
    scale = f(f(max_logit - min_logit) / f(65535))
    out = np.zeros(record_len(len(row)), np.uint16)
    out[:4] = np.array([scale, min_log_prob], np.float32).view(np.uint16)
    if scale:
        inv = f(1) / scale
        for i, x in enumerate(row):
            out[4 + i] = int(np.rint(f(inv * f(f(x) - min_logit)))) if f(x) > min_logit else 0
    return out


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 4, size=(40, 333)).astype(np.float32)  # an odd vocabulary: the record is padded
    x[0] = 0.0  # all equal: scale 0
    x[1, 5] = 60.0  # one token far above the rest: everything else below the 16-nat range
    return x


def test_encoding_equals_llama_cpp_code(logits):
    mine = encode(logits)
    assert mine.shape == (40, record_len(333)) == (40, 2 * 167 + 4)
    for r in range(len(logits)):
        theirs = llama_cpp_encode(logits[r])
        # the rounding of a value exactly between two steps may differ by one step in float32 vs our order
        assert np.abs(mine[r].astype(int) - theirs.astype(int))[4:].max() <= 1
        assert np.array_equal(mine[r, :4], theirs[:4]) or np.allclose(
            mine[r, :4].view(np.float32), theirs[:4].view(np.float32), rtol=1e-6
        )


def test_decoded_log_probs_are_within_half_a_step(logits):
    rec = encode(logits)
    lp = decode(rec, logits.shape[1])
    exact = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    exact -= np.log(np.exp(exact).sum(-1, keepdims=True))
    kept = logits >= logits.max(-1, keepdims=True) - 16
    step = 16 / 65535
    assert np.abs(lp - exact)[kept].max() <= step / 2 + 1e-5
    assert (lp[~kept] <= -16 + 1e-5).all()


def test_comparison_against_the_exact_kl_divergence(logits):
    rng = np.random.default_rng(8)
    ref = logits[2:]
    model = ref + rng.normal(0, 0.3, size=ref.shape).astype(np.float32)
    targets = rng.integers(0, ref.shape[1], size=len(ref))
    c = compare(model, targets, encode(ref))
    exact = kl_divergence(ref, model)
    assert np.abs(c.kld - exact).max() < 2e-4
    assert np.array_equal(c.same_top, model.argmax(-1) == ref.argmax(-1))
    lse = np.log(np.exp(ref.astype(np.float64) - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
    exact_nll = lse - ref[np.arange(len(ref)), targets]
    inside = exact_nll < 16  # targets in the stored range read back to within a step; below it, clipped
    assert (
        np.abs(c.nll_ref - exact_nll)[inside].max() < 2e-4
        and (c.nll_ref[~inside] <= exact_nll[~inside]).all()
    )
    same = compare(ref, targets, encode(ref))
    assert np.abs(same.kld).max() < 1.3e-4 and same.same_top.all()  # the stated bound: half a step


def _write(path, n_ctx=32, n_vocab=333, n_chunk=2, seed=0) -> tuple[list[int], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, n_vocab, size=n_ctx * n_chunk + 5).tolist()
    chunks = [rng.normal(size=(scored_positions(n_ctx), n_vocab)).astype(np.float32) for _ in range(n_chunk)]
    with reference_writer(path, n_ctx, n_vocab, tokens, n_chunk) as write:
        for c in chunks:
            write(c, rng.integers(0, n_vocab, size=len(c)))
    return tokens, chunks


def test_file_round_trip_has_llama_cpp_layout(tmp_path):
    path = tmp_path / "ref.logits"
    tokens, chunks = _write(path)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC and struct.unpack("<Iii", raw[8:20]) == (32, 333, 2)
    llama_cpp_size = 20 + 4 * 64 + 2 * scored_positions(32) * record_len(333) * 2
    assert len(raw) == llama_cpp_size + 4 * 2 * scored_positions(32) + 8 and raw.endswith(b"_em_nll_")
    s = StoredReference(path)
    try:
        assert s.tokens.tolist() == tokens[:64]
        for i, c in enumerate(chunks):
            assert np.array_equal(s.chunk(i), encode(c))
    finally:
        s.close()
    (tmp_path / "llama.logits").write_bytes(raw[:llama_cpp_size])  # as llama-perplexity writes it
    s = StoredReference(tmp_path / "llama.logits")
    try:
        assert s.chunk_nll(0) is None and np.array_equal(s.chunk(1), encode(chunks[1]))
    finally:
        s.close()


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        return bytes(raw[:-7])
    if how == "trailer cut":
        return bytes(raw[:-9])
    if how == "appended":
        return bytes(raw) + b"\0\0"
    if how == "magic":
        return b"_notlog_" + bytes(raw[8:])
    if how == "huge":
        return HEADER.pack(MAGIC, 1 << 30, 1 << 30, 1 << 30) + bytes(raw[20:])
    if how == "token":
        raw[20:24] = struct.pack("<i", 10_000)
        return bytes(raw)
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated or damaged"),
        ("trailer cut", "truncated or damaged"),
        ("appended", "truncated or damaged"),
        ("magic", "is not a reference-logits file"),
        ("empty", "is not a reference-logits file"),
        ("huge", "impossible header"),
        ("token", "outside its vocabulary"),
    ],
)
def test_damaged_files_are_refused_in_one_line(tmp_path, how, message):
    path = tmp_path / "ref.logits"
    _write(path)
    path.write_bytes(_damage(path, how))
    with pytest.raises(EdgemergeError, match=message) as e:
        StoredReference(path)
    assert "\n" not in str(e.value)


def test_an_unfinished_write_leaves_nothing(tmp_path):
    path = tmp_path / "ref.logits"
    with (
        pytest.raises(RuntimeError, match="1 of 2 chunks"),
        reference_writer(path, 32, 10, [1] * 70, 2) as write,
    ):
        write(np.zeros((scored_positions(32), 10), np.float32), np.zeros(scored_positions(32), int))
    assert list(tmp_path.iterdir()) == []
