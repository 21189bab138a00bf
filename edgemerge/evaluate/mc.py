"""Multiple choice by log-likelihood: the model's answer is the candidate with the highest
sum_i log p(c_i | prompt, c_<i) (TruthfulQA's MC1 and lm-evaluation-harness's `acc`).

The prompt is "Q: {question}\nA:" and each candidate is scored as the continuation " {candidate}"; as in
lm-evaluation-harness, the continuation's tokens are those of prompt+continuation after the prompt's tokens.

Formats: TruthfulQA-multi JSON (a list of {"question", "mc1_targets": {"choices", "labels"}}, the correct
choice labelled 1) and EusTrivia/EusExams JSONL (one {"question", "candidates", "answer": index} per line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgemergeError
from ..limits import shown
from ..progress import task
from ..runtime import Model
from .loglik import continuation_logliks
from .records import read_records

PROMPT = "Q: {question}\nA:"


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: list[str]
    answer: int


@dataclass
class MCResult:
    accuracy: float
    questions: int
    file: str


MAX_CHOICES = 100
MAX_TEXT = 20_000  # characters of a question or a candidate


def _text(v: Any, what: str, where: str) -> str:
    if not isinstance(v, str):  # empty is allowed: real TruthfulQA-multi files hold a few empty choices
        raise EdgemergeError(f"{where}: {what} must be a string, got {shown(v)}")
    if len(v) > MAX_TEXT:
        raise EdgemergeError(f"{where}: {what} has {len(v)} characters, more than {MAX_TEXT}")
    return v


def _choices(v: Any, what: str, where: str) -> list[str]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CHOICES:
        n = f"{len(v)} items" if isinstance(v, list) else shown(v)
        raise EdgemergeError(f"{where}: {what} must be a list of 1 to {MAX_CHOICES} strings, got {n}")
    return [_text(c, f"{what}[{i}]", where) for i, c in enumerate(v)]


def _item(rec: Any, where: str) -> MCItem:
    """One question, its fields checked: a question, 1 to MAX_CHOICES candidate strings and exactly one
    correct answer (a TruthfulQA label 1, or an EusTrivia index in range)."""
    if not isinstance(rec, dict):
        raise EdgemergeError(f"{where}: expected a JSON object per question")
    if "mc1_targets" in rec:
        t = rec["mc1_targets"]
        if not isinstance(t, dict) or "choices" not in t or "labels" not in t or "question" not in rec:
            raise EdgemergeError(f"{where}: TruthfulQA format needs question and mc1_targets.choices/labels")
        choices = _choices(t["choices"], "mc1_targets.choices", where)
        labels = t["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) != len(choices)
            or any(isinstance(x, bool) or x not in (0, 1) for x in labels)
        ):
            raise EdgemergeError(
                f"{where}: mc1_targets.labels must be one 0 or 1 per choice, got {shown(labels)}"
            )
        if labels.count(1) != 1:
            raise EdgemergeError(
                f"{where}: mc1_targets.labels must mark exactly one correct choice with 1, got {shown(labels)}"
            )
        return MCItem(_text(rec["question"], "question", where), choices, labels.index(1))
    need = ["question", "candidates", "answer"]
    missing = [k for k in need if k not in rec]
    if missing:
        raise EdgemergeError(
            f"{where}: unknown multiple-choice format, missing field(s) {', '.join(missing)}; expected "
            "TruthfulQA-multi JSON (question, mc1_targets) or EusTrivia/EusExams JSONL (question, candidates, answer)"
        )
    choices = _choices(rec["candidates"], "candidates", where)
    ans = rec["answer"]
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise EdgemergeError(
            f"{where}: answer must be the index (0 to {len(choices) - 1}) of the right candidate, got {shown(ans)}"
        )
    return MCItem(_text(rec["question"], "question", where), choices, ans)


def load_mc(path: Path) -> list[MCItem]:
    """Read a multiple-choice file in one of the two formats (module docstring)."""
    return [_item(r, w) for r, w in read_records(path, "multiple-choice file")]


def choice_logliks(model: Model, item: MCItem) -> list[float]:
    """sum log p(candidate tokens | prompt) for each candidate; the prompt is decoded once and shared, the
    candidates decoded side by side (`Model.continuations`)."""
    prompt = PROMPT.format(question=item.question)
    ctx = model.tokenize(prompt)
    conts = [model.tokenize(prompt + " " + choice)[len(ctx) :] for choice in item.choices]
    room = model.n_ctx - max(len(c) for c in conts)
    if room < 1:
        raise EdgemergeError(f"a candidate of question {shown(item.question, 60)} does not fit the context")
    ctx = ctx[-room:]  # left truncation, as lm-evaluation-harness does, for questions longer than the context
    return [x if c else float("-inf") for x, c in zip(continuation_logliks(model, ctx, conts), conts)]


def evaluate_mc(model: Model, path: Path, *, limit: int | None = None, progress=None) -> MCResult:
    """Accuracy over the first `limit` questions of `path`."""
    items = load_mc(path)[:limit]
    correct = 0
    with task(progress, "multiple choice", len(items), unit="questions") as advance:
        for item in items:
            ll = choice_logliks(model, item)
            correct += int(int(np.argmax(ll)) == item.answer)
            advance(1)
    return MCResult(correct / len(items), len(items), str(path))
