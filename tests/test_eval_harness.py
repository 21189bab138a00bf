"""lm-evaluation-harness's protocol without a model (evaluate/harness.py, taskfile.py): the prompts, few-shot
examples, continuations and scores our task files give, checked against lm-eval's own Task objects and metric
functions when lm-eval is installed, and the bad-input messages."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.bench import batch_shape, bench_fingerprint, prepare_tasks
from edgemerge.evaluate.harness import Doc, Prompter, mean_stderr, pooled_stderr, requests, score
from edgemerge.evaluate.taskfile import all_task_names, known_tasks, load_spec, resolve_tasks

from .shared import need_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from lm_eval_parity import lm_eval_task

# a task of each kind, the shots and questions compared with lm-eval
PARITY = [
    ("eus_trivia", 5, 40),
    ("eus_exams_eu_ejadministrari", 5, 40),
    ("eus_exams_eu_osakidetza1e", 0, 10),
    ("truthfulqa-multi_mc1_eu", 5, 20),
    ("truthfulqa-multi_mc2_gl", 3, 20),
]


def test_task_files_load_and_name_lm_evals_tasks():
    assert known_tasks() == ["eus_exams_eu", "eus_trivia", "truthfulqa-multi_mc1", "truthfulqa-multi_mc2"]
    names = all_task_names()
    assert len([n for n in names if n.startswith("eus_exams_eu_")]) == 29  # as lm-eval 0.4.13's subset files
    assert {"truthfulqa-multi_mc1_eu", "truthfulqa-multi_mc2_en", "eus_exams_eu_osakidetza7e"} <= set(names)
    for name in known_tasks():
        assert load_spec(name).task == name


def test_eus_trivia_prompt_is_the_one_lm_evals_utils_writes():
    """utils.doc_to_text of lm-eval's eus_trivia: 'Galdera: q' then 'X: candidate' per letter, 'Erantzuna:'."""
    p = Prompter(load_spec("eus_trivia"))
    doc = Doc({"question": "Zein?", "candidates": ["bat", "bi", "hiru"], "answer": 2}, "x")
    assert p.text(doc) == "Galdera: Zein?\nA: bat\nB: bi\nC: hiru\nErantzuna:"
    assert p.choices(doc) == ["A", "B", "C"]
    assert p.target(doc) == 2
    assert p.shot(doc, " ", "\n\n") == "Galdera: Zein?\nA: bat\nB: bi\nC: hiru\nErantzuna: C\n\n"


def test_scores_and_standard_errors():
    spec = load_spec("eus_exams_eu")
    p = Prompter(spec)
    doc = Doc({"question": "q", "candidates": ["a", "b", "c", "d"], "answer": 1}, "x")
    (req,) = list(requests(_docs(spec, [doc]), p, 0))
    assert req.context == "Galdera: q\nA: a\nB: b\nC: c\nD: d\nErantzuna:"
    assert req.continuations == [" A", " B", " C", " D"]
    assert score(spec, req, [-3.0, -1.0, -2.0, -5.0]) == {"acc": 1.0, "acc_norm": 1.0}
    assert score(spec, req, [-0.5, -1.0, -2.0, -5.0]) == {"acc": 0.0, "acc_norm": 0.0}
    xs = [1.0, 0.0, 1.0, 1.0]
    assert mean_stderr(xs) == pytest.approx(np.std(xs, ddof=1) / 2)
    assert mean_stderr([1.0]) is None
    # two groups: the pooled variance Σ (n_i - 1) var_i / (N - k), over N
    a, b = [1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0]
    assert pooled_stderr([mean_stderr(a), mean_stderr(b)], [3, 5]) == pytest.approx(
        math.sqrt(((2 * np.var(a, ddof=1) + 4 * np.var(b, ddof=1)) / 6) / 8)
    )


def test_mc2_is_the_probability_mass_of_the_true_answers():
    spec = load_spec("truthfulqa-multi_mc2")
    rec = {"question": "q", "mc2_targets": {"choices": ["t1", "t2", "f1"], "labels": [1, 1, 0]}}
    rec["mc1_targets"] = rec["mc2_targets"]
    (req,) = list(requests(_docs(spec, [Doc(rec, "x")]), Prompter(spec), 0))
    assert req.context == "Q: q\nA:" and req.continuations == [" t1", " t2", " f1"]
    lls = [math.log(0.2), math.log(0.3), math.log(0.1)]
    assert score(spec, req, lls)["acc"] == pytest.approx(0.5 / 0.6)


def _docs(spec, docs):
    from edgemerge.evaluate.harness import TaskDocs
    from edgemerge.evaluate.taskfile import Task

    return TaskDocs(Task(spec.task, spec), docs, docs)


# -- bad input ------------------------------------------------------------------------------------------------
def test_unknown_task_lists_the_known_ones():
    with pytest.raises(
        EdgemergeError, match="unknown task 'eus_trivium'; known tasks: eus_exams_eu, eus_trivia"
    ):
        resolve_tasks(["eus_trivium"], None)


def test_no_data_folder_offline_names_the_file_to_give(tmp_path, monkeypatch):
    """Without --data the files come from the hub (tests/test_eval_hubdata.py); offline and not in the cache,
    one line names the dataset and the file to give with --data."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        EdgemergeError,
        match=r"task eus_trivia needs HiTZ/EusTrivia from the Hugging Face hub: it is not in the cache .* and "
        r"HF_HUB_OFFLINE is set; .* give --data DIR with eustrivia/eus_trivia_test.jsonl in it",
    ):
        prepare_tasks(["eus_trivia"], None, 5)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(EdgemergeError, match=r"needs .*eusexams_eu/eus_exams_eu_ejadministrari_test.jsonl"):
        prepare_tasks(["eus_exams_eu_ejadministrari"], tmp_path, 5)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 0}, "field candidates is missing"),
        ({"question": "q", "candidates": "a b", "answer": 0}, "field candidates must be a list of strs"),
        ({"question": "q", "candidates": ["a", "b"], "answer": "A"}, "field answer must be an integer"),
        ({"question": 7, "candidates": ["a", "b"], "answer": 0}, "field question must be a string"),
        (["q", "a"], "expected a JSON object per question"),
    ],
)
def test_data_of_the_wrong_shape_names_the_field(tmp_path, record, message):
    f = tmp_path / "eustrivia" / "eus_trivia_test.jsonl"
    f.parent.mkdir()
    good = {"question": "q", "candidates": ["a", "b"], "answer": 1}
    f.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(EdgemergeError, match=f"eus_trivia_test.jsonl:2: {message}"):
        prepare_tasks(["eus_trivia"], tmp_path, 0)


def test_a_template_that_cannot_read_a_record_says_where(tmp_path):
    f = tmp_path / "eusexams_eu" / "eus_exams_eu_ejadministrari_test.jsonl"
    f.parent.mkdir()
    f.write_text(
        json.dumps({"question": "q", "candidates": ["a", "b"], "answer": 1}) + "\n", encoding="utf-8"
    )
    (p,) = prepare_tasks(["eus_exams_eu_ejadministrari"], tmp_path, 0)
    with pytest.raises(
        EdgemergeError,
        match=r"_test.jsonl item 1: task eus_exams_eu_ejadministrari cannot read it: list object has no element 2",
    ):
        list(requests(p.docs, p.prompter, 0))


def test_more_shots_than_the_split_holds():
    data = need_shared("bench")
    with pytest.raises(
        EdgemergeError,
        match=r"--fewshot 7: the train split of task truthfulqa-multi_mc1_eu holds 6 "
        r"questions; give --fewshot 6 or fewer",
    ):
        prepare_tasks(["truthfulqa-multi_mc1_eu"], data, 7)


def test_a_family_runs_the_subsets_whose_data_is_there():
    data = need_shared("bench")
    prepared = prepare_tasks(["eus_exams_eu"], data, 5)
    assert len(prepared) == 28  # osakidetza7e is not in ../shared
    assert sum(len(p.docs.eval_docs) for p in prepared) == 13561


# -- against lm-eval itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "shots", "limit"), PARITY)
def test_prompts_and_scores_equal_lm_evals(name, shots, limit, tmp_path):
    """For each question: the same context and continuations as lm-eval's build_all_requests, and the same
    metrics from lm-eval's process_results and aggregation on the same (random) log-likelihoods."""
    data = need_shared("bench")
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    theirs = lm_eval_task(name, data, shots, tmp_path / "hf")
    theirs.build_all_requests(limit=limit)
    by_doc: dict[int, list] = {}
    for inst in theirs.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)

    (ours,) = prepare_tasks([name], data, shots)
    reqs = list(requests(ours.docs, ours.prompter, shots, limit))
    assert len(reqs) == len(by_doc) == limit
    rng = np.random.default_rng(0)
    from lm_eval.api.metrics import mean
    from lm_eval.api.metrics import mean_stderr as their_stderr

    per: dict[str, list[float]] = {}
    for req in reqs:
        insts = sorted(by_doc[req.index], key=lambda i: i.idx)
        assert [i.arguments for i in insts] == [(req.context, c) for c in req.continuations]
        lls = list(rng.normal(-5, 2, len(req.continuations)))
        want = theirs.process_results(insts[0].doc, [(x, False) for x in lls])
        got = score(ours.docs.task.spec, req, lls)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-12) for k in got)
        for k, v in got.items():
            per.setdefault(k, []).append(v)
    for k, xs in per.items():
        assert sum(xs) / len(xs) == pytest.approx(mean(xs), abs=1e-12)
        assert mean_stderr(xs) == pytest.approx(their_stderr(xs), abs=1e-12)


def test_pooled_stderr_is_lm_evals():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.api.metrics import pooled_sample_stderr

    assert pooled_stderr([0.05, 0.02, 0.1], [30, 200, 11]) == pytest.approx(
        float(pooled_sample_stderr([0.05, 0.02, 0.1], [30, 200, 11])), abs=1e-15
    )


@pytest.mark.parametrize(
    ("name", "shots", "limit"), [("eus_trivia", 3, 10), ("truthfulqa-multi_mc2_eu", 2, 5)]
)
def test_chat_turns_equal_lm_evals(name, shots, limit, tmp_path):
    """--chat-template: the same turns lm-eval hands the chat template with --apply_chat_template
    --fewshot_as_multiturn, and the same continuations (no target delimiter)."""
    data = need_shared("bench")
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    theirs = lm_eval_task(name, data, shots, tmp_path / "hf")

    def template(messages, add_generation_prompt):  # shows what lm-eval would render
        assert add_generation_prompt
        return json.dumps(messages)

    theirs.build_all_requests(
        limit=limit, apply_chat_template=True, fewshot_as_multiturn=True, chat_template=template
    )
    (ours,) = prepare_tasks([name], data, shots)
    reqs = list(requests(ours.docs, ours.prompter, shots, limit, chat=True))
    assert len(reqs) == limit
    for req in reqs:
        insts = sorted((i for i in theirs.instances if i.doc_id == req.index), key=lambda i: i.idx)
        assert [json.loads(i.arguments[0]) for i in insts] == [req.messages] * len(insts)
        assert [i.arguments[1] for i in insts] == req.continuations == req.choices
        assert [m["role"] for m in req.messages] == ["user", "assistant"] * shots + ["user"]


def test_the_fingerprint_holds_the_task_files_and_the_data_files_contents(tmp_path):
    """bench_fingerprint (a build's eval key): the sha256 of each task file and each data file read."""
    f = tmp_path / "eustrivia" / "eus_trivia_test.jsonl"
    f.parent.mkdir()
    f.write_text(
        json.dumps({"question": "q", "candidates": ["a", "b"], "answer": 1}) + "\n", encoding="utf-8"
    )
    before = bench_fingerprint(["eus_trivia"], tmp_path)
    task_file = Path(__file__).resolve().parents[1] / "edgemerge/evaluate/data/tasks/eus_trivia.yaml"
    assert before == {
        "task file eus_trivia": hashlib.sha256(task_file.read_bytes()).hexdigest(),
        "eus_trivia test": hashlib.sha256(f.read_bytes()).hexdigest(),
    }
    f.write_text(
        json.dumps({"question": "Q", "candidates": ["a", "b"], "answer": 1}) + "\n", encoding="utf-8"
    )
    assert bench_fingerprint(["eus_trivia"], tmp_path)["eus_trivia test"] != before["eus_trivia test"]


def test_the_batched_context_holds_at_most_one_longest_prompts_kv_cache():
    """batch_shape: as many sequences as 8192 KV cells hold (each padded to 256 cells), at most 16, never fewer
    than the widest question's long answers."""
    assert batch_shape(100, 1) == (16, 100)  # 0-shot: a full decode of questions
    assert batch_shape(800, 1) == (8, 800)  # 8 x 1024 cells
    assert batch_shape(2385, 4) == (
        4,
        2385,
    )  # 5-shot with four long answers: 4 x 2560 cells, as one at a time
    assert batch_shape(2385, 1) == (3, 2385) and batch_shape(8000, 1) == (1, 8000)
