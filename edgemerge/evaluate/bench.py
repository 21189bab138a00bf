"""Benchmarks in lm-evaluation-harness's format and units, scored by llama.cpp: `prepare_tasks` reads and checks
the task files and their data (before any model is loaded), `run_tasks` scores them on a loaded model.

Each question's context is decoded once and its answer choices continue it from the KV cache, several questions
per llama_decode, each in its own sequences (loglik.py); the prompts, few-shot examples and scores are lm-eval's
(harness.py). Per task: lm-eval's metric names (acc, acc_norm, with their _stderr) over the questions asked; per
family with `aggregate: size_weighted` also the size-weighted mean over its subsets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgemergeError
from ..hashes import sha256_file
from ..progress import task as progress_task
from ..runtime import KV_PAD, MAX_PARALLEL, Model
from .harness import (
    Prompter,
    Request,
    TaskDocs,
    check_shots,
    load_docs,
    mean_stderr,
    pooled_stderr,
    requests,
    score,
    task_splits,
)
from .hubdata import hub_files
from .loglik import continuation_logliks_many, encode_request
from .taskfile import DEFAULT_SEED, TASKS_DIR, Task, load_spec, missing_subsets, resolve_tasks

BENCH_CTX = 8192  # the longest prompt a benchmark may need (capped at the model's training context)
KV_CELLS = BENCH_CTX  # scoring several questions at once holds at most the KV cache of one such prompt


@dataclass
class PreparedTask:
    docs: TaskDocs
    prompter: Prompter
    shots: int
    files: dict[str, Path] = field(default_factory=dict)  # split -> the file read

    @property
    def name(self) -> str:
        return self.docs.task.name


@dataclass
class TaskResult:
    """One task's scores (lm-eval's names) and each question's chosen answer and log-likelihoods."""

    task: str
    family: str | None
    questions: int
    shots: int
    metrics: dict[str, float]
    stderrs: dict[str, float | None]
    predictions: list[int] = field(default_factory=list, repr=False)
    logliks: list[list[float]] = field(default_factory=list, repr=False)
    per_question: list[dict[str, float]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        """The task's line of the report: task, family, questions, shots, then each metric and its _stderr."""
        out: dict[str, Any] = {"task": self.task, "family": self.family, "questions": self.questions}
        out["shots"] = self.shots
        for m, v in self.metrics.items():
            out[m], out[f"{m}_stderr"] = v, self.stderrs[m]
        return out


@dataclass
class BenchSettings:
    """What the scores depend on besides the model, shown beside them."""

    fewshot: int | None  # --fewshot (None: each task's own default, lm-eval's)
    limit: int | None
    chat_template: bool = False
    seed: int = DEFAULT_SEED
    missing: dict[str, list[str]] = field(default_factory=dict)  # family -> subsets whose data was absent


def task_files(task: Task, data: Path | None) -> dict[str, Path]:
    """split -> the file of the task's split: under the folder `data`, or without one from the hub (hubdata.py)."""
    if data is None:
        return hub_files(task)
    return {split: task.file(split, data) for split in task_splits(task)}


def bench_fingerprint(names: list[str], data: Path | None) -> dict[str, str]:
    """sha256 of every task file and data file the tasks `names` read (under `data`, or from the hub): what
    their scores depend on besides the model and the settings, for a build's cache key (edited data or an
    edited task file runs the benchmarks again)."""
    folder = data if data is not None and Path(data).is_dir() else None
    out: dict[str, str] = {}
    for t in resolve_tasks(names, folder):
        out[f"task file {t.spec.task}"] = sha256_file(TASKS_DIR / f"{t.spec.task}.yaml")
        for split, path in task_files(t, data).items():
            out[f"{t.name} {split}"] = sha256_file(path) if path.is_file() else "absent"
    return out


def prepare_tasks(names: list[str], data: Path | None, fewshot: int | None) -> list[PreparedTask]:
    """The tasks `names` with their data under `data` (without it: fetched from the hub), every record checked
    and every task's few-shot split large enough (see harness.py); fails on the first problem with one line
    naming the file or the field."""
    tasks = resolve_tasks(
        names, data if data is not None and Path(data).is_dir() else None
    )  # unknown names first
    if data is not None and not Path(data).is_dir():
        raise EdgemergeError(
            f"the benchmarks' data folder {data} is not a folder (--data, or eval.data in a recipe)"
        )
    out = []
    for t in tasks:
        prompter = Prompter(t.spec, t.name)
        files = task_files(t, data)
        docs = load_docs(t, files, prompter)
        shots = t.spec.num_fewshot if t.spec.num_fewshot == 0 or fewshot is None else fewshot
        shots = shots or 0
        check_shots(docs, shots)
        out.append(PreparedTask(docs, prompter, shots, files))
    return out


def settings_for(
    prepared: list[PreparedTask], fewshot: int | None, limit: int | None, chat: bool = False
) -> BenchSettings:
    return BenchSettings(fewshot, limit, chat, missing=missing_subsets([p.docs.task for p in prepared]))


def check_context(
    model: Model, prepared: list[PreparedTask], limit: int | None, progress=None, chat: bool = False
) -> list[tuple[int, int]]:
    """Every question's prompt and longest answer fit the model's context, or one line says how many tokens the
    longest needs (the prompts are built and tokenized once here, before any is scored). Per task: the tokens
    its longest question needs and the most answers of two tokens or more a question has (`batch_shape`)."""
    total = sum(len(p.docs.eval_docs[:limit]) for p in prepared)
    shapes = []
    with progress_task(progress, "building prompts", total, unit="questions") as advance:
        for p in prepared:
            need, widest, where = 0, 1, ""
            for req in requests(p.docs, p.prompter, p.shots, limit, chat=chat):
                ctx, conts = encode_request(model, req)
                n = len(ctx) + max((len(c) for c in conts), default=0)
                widest = max(widest, sum(len(c) > 1 for c in conts))
                if n > need:
                    need, where = n, req.doc.where
                advance(1)
            if need > model.n_ctx:
                raise EdgemergeError(
                    f"task {p.name}: the {p.shots}-shot prompt of {where} and its longest answer need {need} "
                    f"tokens, more than the {model.n_ctx} of the model's context; give fewer --fewshot"
                )
            shapes.append((need, widest))
    return shapes


def batch_shape(need: int, widest: int) -> tuple[int, int]:
    """(sequences, tokens per sequence) of the context a task is scored in: every question fits a sequence
    (`need` tokens), as many sequences as KV_CELLS cells hold (at most MAX_PARALLEL), never fewer than the
    `widest` question's answers of two tokens or more (so its prompt is decoded once)."""
    cells = -(-need // KV_PAD) * KV_PAD  # what llama.cpp gives each sequence
    return min(MAX_PARALLEL, max(widest, KV_CELLS // cells, 1)), need


def run_task(
    model: Model,
    p: PreparedTask,
    limit: int | None,
    progress=None,
    chat: bool = False,
    shape: tuple[int, int] | None = None,
) -> TaskResult:
    """Score one task's first `limit` questions (all without it), several per llama_decode in a context of
    `shape` (`batch_shape`; default: the model's context, MAX_PARALLEL sequences); `chat`: through the model's
    chat template, few-shot examples as turns (harness.requests)."""
    spec = p.docs.task.spec
    res = TaskResult(p.name, p.docs.task.family, 0, p.shots, {}, {})
    n = len(p.docs.eval_docs[:limit])
    n_seq, n_ctx_seq = shape or (MAX_PARALLEL, model.n_ctx)
    asked: deque[Request] = deque()  # the questions handed to the model and not yet scored

    def pairs() -> Iterator[tuple[list[int], list[list[int]]]]:
        for req in requests(p.docs, p.prompter, p.shots, limit, chat=chat):
            asked.append(req)
            yield encode_request(model, req)

    with progress_task(progress, p.name, n, unit="questions") as advance:
        for lls in continuation_logliks_many(model, pairs(), n_seq, n_ctx_seq):
            req = asked.popleft()
            res.logliks.append(lls)
            res.predictions.append(max(range(len(lls)), key=lls.__getitem__))
            res.per_question.append(score(spec, req, lls))
            advance(1)
    res.questions = len(res.per_question)
    for m in res.per_question[0]:
        xs = [q[m] for q in res.per_question]
        res.metrics[m], res.stderrs[m] = sum(xs) / len(xs), mean_stderr(xs)
    return res


def run_tasks(
    model: Model, prepared: list[PreparedTask], limit: int | None, progress=None, chat: bool = False
) -> list[TaskResult]:
    """Check every prompt fits, then score each task in turn (`chat`: through the model's chat template)."""
    if chat and model.chat_template is None:
        raise EdgemergeError(
            f"--chat-template: {model.path.name} has no chat template (a base model?); leave --chat-template out"
        )
    shapes = check_context(model, prepared, limit, progress, chat)
    return [
        run_task(model, p, limit, progress, chat, batch_shape(*shape)) for p, shape in zip(prepared, shapes)
    ]


def family_rows(results: list[TaskResult]) -> list[dict[str, Any]]:
    """For each family whose task file says `aggregate: size_weighted`: the size-weighted mean of each metric
    over the subsets run and lm-eval's pooled standard error."""
    out = []
    for fam in dict.fromkeys(r.family for r in results if r.family):
        if load_spec(fam).aggregate != "size_weighted":
            continue
        subs = [r for r in results if r.family == fam]
        sizes = [r.questions for r in subs]
        row: dict[str, Any] = {"task": fam, "family": None, "questions": sum(sizes), "shots": subs[0].shots}
        for m in subs[0].metrics:
            row[m] = sum(r.metrics[m] * r.questions for r in subs) / sum(sizes)
            ses = [r.stderrs[m] for r in subs]
            row[f"{m}_stderr"] = None if None in ses else pooled_stderr(ses, sizes)  # type: ignore[arg-type]
        row["subsets"] = len(subs)
        out.append(row)
    return out
