"""Multiple choice by log-likelihood: both file formats, the shared-prefix scoring, format errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.mc import PROMPT, MCItem, choice_logliks, evaluate_mc, load_mc
from edgemerge.runtime import Model, log_softmax

from .shared import need_shared

# Questions a TinyStories model cannot miss: one candidate is its own greedy continuation, the other noise.
EASY = [
    ("Once upon a time, there was a little", ["girl named Lily.", "xq zv brk qq."], 0),
    ("Lily went to the", ["vzz kq jjx.", "park to play."], 1),
]


@pytest.fixture(scope="module")
def stories():
    m = Model(need_shared("models", "stories260K", "stories260K.gguf"), n_ctx=512, n_threads=1)
    yield m
    m.close()


def test_both_formats_on_questions_with_an_obvious_answer(stories, tmp_path):
    tqa = tmp_path / "validation.json"
    tqa.write_text(
        json.dumps(
            [
                {"question": q, "mc1_targets": {"choices": c, "labels": [int(i == a) for i in range(len(c))]}}
                for q, c, a in EASY
            ]
        )
    )
    eus = tmp_path / "trivia.jsonl"
    eus.write_text("\n".join(json.dumps({"question": q, "candidates": c, "answer": a}) for q, c, a in EASY))
    assert load_mc(tqa) == load_mc(eus) == [MCItem(q, c, a) for q, c, a in EASY]
    for f in (tqa, eus):
        r = evaluate_mc(stories, f)
        assert (r.accuracy, r.questions) == (1.0, 2)


def test_shared_prefix_scoring_equals_full_sequences(stories):
    """The prompt is decoded once and each candidate continues it from the cache; scoring each whole
    sequence from scratch must give the same log-likelihoods."""
    item = load_mc(need_shared("bench", "truthfulqa_multi", "en", "validation.json"))[3]
    prompt = PROMPT.format(question=item.question)
    n = len(stories.tokenize(prompt))
    expected = []
    for choice in item.choices:
        full = stories.tokenize(prompt + " " + choice)
        lp = log_softmax(stories.logits(full, n - 1))
        # row j holds the distribution after position n - 1 + j, i.e. over the token at n + j
        expected.append(sum(lp[j, full[n + j]] for j in range(len(full) - n)))
    assert np.allclose(choice_logliks(stories, item), expected, atol=1e-3)


def test_real_files_load_and_score(stories):
    tqa = load_mc(need_shared("bench", "truthfulqa_multi", "eu", "validation.json"))
    assert len(tqa) == 817 and all(0 <= x.answer < len(x.choices) for x in tqa)
    trivia = load_mc(need_shared("bench", "eustrivia", "eus_trivia_test.jsonl"))
    assert len(trivia) == 1715  # one line holds U+2028 inside a string: not a line break in JSON Lines
    r = evaluate_mc(stories, need_shared("bench", "truthfulqa_multi", "eu", "validation.json"), limit=10)
    assert r.questions == 10 and 0.0 <= r.accuracy <= 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "Zer?", "options": ["a", "b"]}\n', "missing field(s) candidates, answer"),
        ('[{"prompt": "x"}]', "missing field(s) question, candidates, answer"),
        ('{"question": "Zer?", "candidates": ["a", "b"], "answer": 5}', "answer must be the index"),
        ("question,answer\n", "not JSON"),
        ("", "has no questions"),
    ],
)
def test_unknown_formats_name_what_is_missing(tmp_path, content, message):
    f = tmp_path / "mc.jsonl"
    f.write_text(content)
    with pytest.raises(EdgemergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_mc(f)


def test_questions_longer_than_the_context_are_truncated_on_the_left():
    m = Model(need_shared("models", "stories260K", "stories260K.gguf"), n_ctx=64, n_threads=1)
    try:
        long_q = "Once upon a time, there was a little girl named Lily. " * 10 + "Lily went to the"
        ll = choice_logliks(m, MCItem(long_q, ["park to play.", "vzz kq jjx."], 0))
        assert len(m.tokenize(PROMPT.format(question=long_q))) > 64 and ll[0] > ll[1]
    finally:
        m.close()
