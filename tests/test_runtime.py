"""The runner's own llama.cpp loop on the real stories260K model: greedy answers equal llama-cpp-python's
completion, batched answers equal sequential ones, several sequences per llama_decode give the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge import runtime as runner
from edgemerge.runtime import Model

from .reference_llama import reference_llama
from .test_eval_run import make_chat_gguf

STARTS = [
    "Once upon a time, there was a big red",
    "Tom and Sue went to the park and",
    "The cat",
    "One day, a little bird flew over the house of an old man who",
    "Mom said",
    "The sun was hot, so the children",
    "Lily had a toy",
]


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    return make_chat_gguf(tmp_path_factory.mktemp("chat") / "stories-chat.gguf")


@pytest.fixture(scope="module")
def model(chat_gguf):
    with Model(chat_gguf, n_ctx=512, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def prompts(model):
    return [model.tokenize(s) for s in STARTS]  # story starts: answers differ and end at "." (its EOS)


def test_greedy_answers_equal_llama_cpp_pythons_completion(chat_gguf, model, prompts):
    """llama-cpp-python's own greedy completion (temperature 0, no repetition penalty) on its own context."""
    llm = reference_llama(model_path=str(chat_gguf), n_ctx=512, n_threads=1, verbose=False)
    try:
        for p in prompts[:4]:
            for limit in (200, 5):
                out = llm.create_completion(p, max_tokens=limit, temperature=0.0, repeat_penalty=1.0)
                choice = out["choices"][0]
                g = model.generate(p, limit)
                assert g.text == choice["text"] and g.tokens == out["usage"]["completion_tokens"]
                assert g.stopped == (choice["finish_reason"] == "stop")
    finally:
        llm.close()


@pytest.mark.parametrize("n_seq", [2, 3, 7])
def test_batched_answers_equal_sequential_ones(model, prompts, n_seq, monkeypatch):
    """Continuous batching (more prompts than sequences for 2 and 3): every answer, in order, token for token.
    llama.cpp's batched kernels need not be bit-identical; on this F32 model they are (share: 7 of 7)."""
    alone = [model.generate(p, 10) for p in prompts]
    done: list[int] = []
    moves = []
    copy = runner.Context.copy_sequence
    monkeypatch.setattr(
        runner.Context, "copy_sequence", lambda self, a, b: moves.append((a, b)) or copy(self, a, b)
    )
    batched = model.generate_many(prompts, 10, n_seq=n_seq, on_done=lambda i, g: done.append(i))
    agree = sum(a.ids == b.ids for a, b in zip(alone, batched))
    assert agree == len(prompts), f"{agree} of {len(prompts)} answers agree"
    assert [(a.text, a.stopped, a.tokens) for a in alone] == [(b.text, b.stopped, b.tokens) for b in batched]
    assert sorted(done) == list(range(len(prompts)))
    assert all(a > b for a, b in moves) and (n_seq == 7 or moves)  # the running ids are kept 0..k-1
    assert any(g.stopped for g in alone) and any(not g.stopped for g in alone)  # both endings are exercised


def test_several_sequences_per_decode_give_the_same_logits(model, prompts):
    seqs = [(p * 48)[:48] for p in prompts]
    together = list(model.logits_many(seqs, 20))  # 512 // 48 = 10 sequences per llama_decode
    for s, t in zip(seqs, together):
        assert np.array_equal(model.logits(s, 20), t)


def test_stream_reuses_the_conversation_so_far(model):
    first = model.chat_tokens([{"role": "user", "content": "Tell me about the sea."}])
    items = list(model.stream(first, 30))
    turn = [
        {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": items[-1].text},
        {"role": "user", "content": "And the moon?"},
    ]
    second = model.chat_tokens(turn)
    streamed = list(model.stream(second, 30))
    assert "".join(streamed[:-1]) == streamed[-1].text == model.generate(second, 30).text
