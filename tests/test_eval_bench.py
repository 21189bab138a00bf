"""Benchmarks on a real model (llama.cpp, the TinyStories GGUF of ../shared): the shared-prefix log-likelihoods,
`edgemerge eval --task`, its report, and the context that is too small."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemerge.evaluate.bench import prepare_tasks, run_tasks
from edgemerge.evaluate.harness import requests
from edgemerge.evaluate.loglik import (
    continuation_logliks,
    continuation_logliks_many,
    encode_pair,
    encode_request,
)
from edgemerge.runtime import Context, Model, log_softmax

from .shared import need_shared


@pytest.fixture(scope="module")
def stories():
    m = Model(need_shared("models", "stories260K", "stories260K.gguf"), n_ctx=512, n_threads=1)
    yield m
    m.close()


def test_loglikelihoods_equal_whole_sequences_scored_from_scratch(stories):
    """The context is decoded once and each answer continues it from the cache; scoring context + answer from
    an empty cache, one sequence at a time, must give the same sums."""
    data = need_shared("bench")
    prepared = prepare_tasks(["truthfulqa-multi_mc1_en", "eus_trivia"], data, 1)
    results = run_tasks(stories, prepared, 3)
    for p, r in zip(prepared, results):
        for req, lls in zip(requests(p.docs, p.prompter, p.shots, 3), r.logliks):
            ctx, conts = encode_pair(stories, req.context, req.continuations)
            expected = []
            for cont in conts:
                full = ctx + cont
                lp = log_softmax(stories.logits(full, len(ctx) - 1))
                expected.append(sum(lp[j, full[len(ctx) + j]] for j in range(len(cont))))
            assert np.allclose(lls, expected, atol=1e-3)
            assert r.predictions[req.index] == int(np.argmax(lls))


def _one_at_a_time(model, p, limit):
    """Each question scored alone (`continuation_logliks`: one question's prompt per context)."""
    return [
        continuation_logliks(model, *encode_request(model, req))
        for req in requests(p.docs, p.prompter, p.shots, limit)
    ]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("model", ["stories260K", "qwen3"])
def test_several_questions_per_decode_score_as_one_at_a_time(model, f32_ggufs, monkeypatch):
    """The batched pass (several questions' prompts in one llama_decode, each question's answers continuing its
    own sequence) gives each question the log-likelihoods it gets alone, within llama.cpp's batch-size noise,
    and the same chosen answers: eus_trivia 0-shot (one-token answers with the fixtures' vocabularies: no
    continuation decoded; two tokens with stories260K's) and TruthfulQA-multi mc2 (long answers: the prompt's
    sequence copied per answer)."""
    data = need_shared("bench")
    path = (
        need_shared("models", "stories260K", "stories260K.gguf")
        if model == "stories260K"
        else f32_ggufs[model]
    )
    decodes: list[set[int]] = []  # the sequences of each Context.decode call of prompts (from position 0)
    real = Context.decode

    def watched(self, entries, **kw):
        if entries and min(pos for _t, pos, _s, _w in entries) == 0:
            decodes.append({seq for _t, _p, seq, _w in entries})
        return real(self, entries, **kw)

    prepared = prepare_tasks(["eus_trivia", "truthfulqa-multi_mc2_eu"], data, 0)
    with Model(path, n_ctx=512, n_threads=1) as m:
        monkeypatch.setattr(Context, "decode", watched)
        results = run_tasks(m, prepared, 20)
        batched = decodes[:]
        decodes.clear()
        worst = 0.0
        for p, r in zip(prepared, results):
            alone = _one_at_a_time(m, p, 20)
            assert r.predictions == [int(np.argmax(lls)) for lls in alone]
            worst = max(worst, _max_diff(r.logliks, alone))
        n_alone = len(decodes)
        # a question with more long answers than the context's sequences: split, its prompt decoded per part
        (p,) = prepared[1:]
        pairs = [encode_request(m, req) for req in requests(p.docs, p.prompter, 0, 6)]
        need = max(len(c) + max(len(x) for x in k) for c, k in pairs)
        split = list(continuation_logliks_many(m, iter(pairs), 3, need))
        worst = max(worst, _max_diff(split, _one_at_a_time(m, p, 6)))
    print(f"{model}: max |ll batched - ll alone| = {worst:.2e} nats")
    assert worst < 5e-5
    # the batched pass: several questions' prompts per decode (at most 16 sequences), far fewer prompt decodes
    print(f"{model}: {len(batched)} prompt decodes batched, {n_alone} one question at a time")
    assert n_alone == 40 and max(len(d) for d in batched) in range(5, 17) and len(batched) < 0.75 * n_alone


def test_eval_task_reports_lm_evals_metrics_with_the_settings(cli, tmp_path):
    model = need_shared("models", "stories260K", "stories260K.gguf")
    data = need_shared("bench")
    md = tmp_path / "card.md"
    args = ["eval", model, "--task", "eus_trivia", "--task", "truthfulqa-multi_mc2_eu", "--fewshot", "1"]
    code, out, err = cli(*args, "--limit", "4", "--data", data, "--json", "--markdown", md, "--threads", "1")
    assert code == 0, err
    report = json.loads(out)
    rows = {b["task"]: b for b in report["benchmarks"]}
    assert set(rows) == {"eus_trivia", "truthfulqa-multi_mc2_eu"}
    trivia = rows["eus_trivia"]
    assert trivia["questions"] == 4 and trivia["shots"] == 1
    assert set(trivia) == {
        "task",
        "family",
        "questions",
        "shots",
        "acc",
        "acc_stderr",
    }  # lm-eval's metric_list
    assert trivia["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert 0.0 < rows["truthfulqa-multi_mc2_eu"]["acc"] < 1.0
    assert report["bench_settings"] == {
        "fewshot": 1,
        "limit": 4,
        "chat_template": False,
        "seed": 1234,
        "missing": {},
    }
    assert "perplexity" not in md.read_text() and "| eus_trivia | 1 | acc |" in md.read_text()
    assert "lm-evaluation-harness format, 1-shot, no chat template, limit 4 per task" in md.read_text()


def test_a_family_reports_its_subsets_and_their_size_weighted_mean(cli, tmp_path):
    model = need_shared("models", "stories260K", "stories260K.gguf")
    data = tmp_path / "data"
    (data / "eusexams_eu").mkdir(parents=True)
    src = need_shared("bench", "eusexams_eu")
    for sub in ("ejadministrari", "osakidetza1e"):
        name = f"eus_exams_eu_{sub}_test.jsonl"
        (data / "eusexams_eu" / name).write_bytes((src / name).read_bytes())
    code, out, err = cli(
        "eval",
        model,
        "--task",
        "eus_exams_eu",
        "--limit",
        "3",
        "--data",
        data,
        "--json",
        "--threads",
        "1",
    )
    assert code == 0, err
    rows = json.loads(out)["benchmarks"]
    assert [r["task"] for r in rows] == [
        "eus_exams_eu",
        "eus_exams_eu_ejadministrari",
        "eus_exams_eu_osakidetza1e",
    ]
    fam, a, b = rows
    assert fam["questions"] == 6 and fam["subsets"] == 2
    assert fam["acc"] == pytest.approx((a["acc"] + b["acc"]) / 2)
    assert fam["acc_norm"] == pytest.approx((a["acc_norm"] + b["acc_norm"]) / 2)
    missing = json.loads(out)["bench_settings"]["missing"]["eus_exams_eu"]
    assert len(missing) == 27 and "osakidetza7e" in missing


def test_a_context_too_small_for_the_prompt_says_how_many_tokens_it_needs(cli, tmp_path):
    """stories260K's context is 2048 tokens: three long questions, two of them as examples, do not fit."""
    model = need_shared("models", "stories260K", "stories260K.gguf")
    f = tmp_path / "eustrivia" / "eus_trivia_test.jsonl"
    f.parent.mkdir()
    q = "Zein da Euskal Herriko mendirik garaiena? " * 40
    recs = [{"question": f"{i}. {q}", "candidates": ["a", "b"], "answer": 0} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    code, _out, err = cli(
        "eval", model, "--task", "eus_trivia", "--fewshot", "2", "--data", tmp_path, "--threads", "1"
    )
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (
        "task eus_trivia: the 2-shot prompt of " in err
        and "eus_trivia_test.jsonl:1 and its longest answer need" in err
    )
    assert "tokens, more than the 2048 of the model's context; give fewer --fewshot" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "eus_trivium"], "unknown task 'eus_trivium'; known tasks:"),
        (["--task", "eus_trivia"], "give --data DIR with eustrivia/eus_trivia_test.jsonl"),
        (
            ["--task", "truthfulqa-multi_mc1_eu", "--fewshot", "9", "--data", "{data}"],
            "--fewshot 9: the train split",
        ),
        (["--limit", "0", "--task", "eus_trivia"], "--limit 0: must be at least 1"),
        ([], "give --lang (the language to evaluate in) or --task"),
    ],
)
def test_bad_benchmark_input_is_one_line_and_exit_2(cli, args, message, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # without --data: the hub, never the network here
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = need_shared("models", "stories260K", "stories260K.gguf")
    data = need_shared("bench")
    code, _out, err = cli("eval", model, *[a.format(data=data) for a in args])
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_chat_template_scores_the_turns_rendered_by_the_gguf(f32_ggufs):
    """--chat-template on a GGUF with one (the Qwen2 fixture): the context is the template's rendering of the
    turns, and the answers' log-likelihoods equal whole sequences scored from scratch."""
    data = need_shared("bench")
    (p,) = prepare_tasks(["eus_trivia"], data, 1)
    with Model(f32_ggufs["qwen2"], n_ctx=2048, n_threads=1) as m:
        (r,) = run_tasks(m, [p], 2, chat=True)
        assert r.questions == 2
        for req, lls in zip(requests(p.docs, p.prompter, 1, 2, chat=True), r.logliks):
            ctx, conts = encode_request(m, req)
            prompt = m.chat_prompt(req.messages)
            assert (
                "<|im_start|>assistant" in prompt and req.continuations == ["A", "B", "C", "D"][: len(conts)]
            )
            # lm-eval's _encode_pair: the prompt's trailing newline moves to the continuation
            assert ctx == m.tokenize(prompt.rstrip(), parse_special=True)
            expected = []
            for cont in conts:
                lp = log_softmax(m.logits(ctx + cont, len(ctx) - 1))
                expected.append(sum(lp[j, cont[j]] for j in range(len(cont))))
            assert np.allclose(lls, expected, atol=1e-3)


def test_chat_template_on_a_model_without_one_is_one_line(cli):
    model = need_shared("models", "stories260K", "stories260K.gguf")
    data = need_shared("bench")
    args = ["--task", "eus_trivia", "--chat-template", "--limit", "2", "--data", data, "--threads", "1"]
    code, _out, err = cli("eval", model, *args)
    assert (
        code == 2
        and "stories260K.gguf has no chat template (a base model?); leave --chat-template out" in err
    )
