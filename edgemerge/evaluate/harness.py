"""lm-evaluation-harness's multiple-choice protocol (0.4.13, lm_eval/api/task.py, samplers.py, metrics.py) on
our task files: documents, prompts, few-shot examples, requests and scores, without a model.

Written by hand because lm-eval itself is a large optional dependency (datasets, evaluate, scikit-learn, ...);
tests/test_bench_harness.py checks every step below against lm-eval's own objects when it is installed.

- Documents: the eval split (test, else validation) and the few-shot split, each record checked against the
  task file's `fields`, then filtered by `keep_docs` (lm-eval's process_docs); `--limit N`: the first N.
- Templates: Jinja with StrictUndefined and keep_trailing_newline, as lm-eval's utils.apply_template. A
  template that is a field name gives the field; doc_to_choice's rendering is read with ast.literal_eval.
- Few-shot examples (ContextSampler): one random.Random(1234) per task, advanced once per document in order:
  rnd.sample(pool, n + 1) without the document itself when the few-shot split is the eval split (resampled
  from the pool without it when that leaves fewer than n), rnd.sample(pool, n) otherwise; `first_n`: the first
  n of the pool (without the document).
- Context: Σ_shots (text + target_delimiter + answer + fewshot_delimiter) + text; the continuations are
  target_delimiter + choice.
- Scores: acc = [argmax_i ll_i = gold]; acc_norm = [argmax_i ll_i / len(choice_i) = gold], len in characters
  (lm-eval's completion_len; its acc_bytes divides by UTF-8 bytes); mc2 = Σ_true p_i / Σ_all p_i with
  p_i = exp(ll_i), the true answers being those before the first label 0.
- Standard error: of a task, sqrt(Σ(x - x̄)² / (n - 1)) / sqrt(n) (lm-eval's mean_stderr); of a size-weighted
  group, sqrt(Σ (n_i - 1) se_i² n_i / (Σ n_i - k) / Σ n_i) (pooled_sample_stderr).
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgemergeError
from ..limits import shown
from .records import read_records
from .taskfile import DEFAULT_SEED, Task, TaskSpec


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, string, count=count)  # lm-eval's one custom filter


# the task files are ours, the data a stranger's: the sandbox keeps any template away from Python internals
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


@dataclass(frozen=True)
class Doc:
    record: dict[str, Any]
    where: str  # file and line, for messages


@dataclass(frozen=True)
class Request:
    """One question as lm-eval asks it: the context, the continuations, the gold answer."""

    index: int  # position among the task's eval documents
    doc: Doc
    context: str
    continuations: list[str]
    choices: list[str]
    gold: int | str
    messages: list[dict[str, str]] | None = None  # with the chat template: the turns the context renders


_TYPES = {"str": str, "int": int}


def _field_error(spec_field: str, want: str, value: Any) -> str | None:
    if want.startswith("list["):
        inner = _TYPES[want[5:-1]]
        if not isinstance(value, list) or not all(
            isinstance(x, inner) and not isinstance(x, bool) for x in value
        ):
            return f"field {spec_field} must be a list of {want[5:-1]}s, got {shown(value)}"
        return None
    if not isinstance(value, _TYPES[want]) or isinstance(value, bool):
        return (
            f"field {spec_field} must be {'a string' if want == 'str' else 'an integer'}, got {shown(value)}"
        )
    return None


def check_record(spec: TaskSpec, record: Any, where: str) -> None:
    """The record has every field of the task file, of the declared type (else the field is named)."""
    if not isinstance(record, dict):
        raise EdgemergeError(f"{where}: expected a JSON object per question, got {shown(record)}")
    for path, want in spec.fields.items():
        value: Any = record
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                raise EdgemergeError(
                    f"{where}: field {path} is missing (task {spec.task} needs {', '.join(spec.fields)})"
                )
            value = value[part]
        err = _field_error(path, want, value)
        if err:
            raise EdgemergeError(f"{where}: {err}")


class Prompter:
    """A task's templates, compiled once: doc_to_text, doc_to_choice, doc_to_target and keep_docs."""

    def __init__(self, spec: TaskSpec, name: str | None = None):
        self.spec, self.name = spec, name or spec.task
        self.fields = {p.split(".")[0] for p in spec.fields}
        self._t = {
            k: _ENV.from_string(v)
            for k, v in (
                ("text", spec.doc_to_text),
                ("choice", spec.doc_to_choice),
                ("target", spec.doc_to_target),
                ("keep", spec.keep_docs),
            )
            if isinstance(v, str) and v not in self.fields
        }

    def _render(self, key: str, doc: Doc) -> str:
        try:
            return self._t[key].render(**doc.record)
        except jinja2.TemplateError as e:  # a record the template cannot read (e.g. too few candidates)
            raise EdgemergeError(f"{doc.where}: task {self.name} cannot read it: {e}") from None

    def keep(self, doc: Doc) -> bool:
        return self.spec.keep_docs is None or self._render("keep", doc) == "True"

    def text(self, doc: Doc) -> str:
        if self.spec.doc_to_text in self.fields:
            return doc.record[self.spec.doc_to_text]
        return self._render("text", doc)

    def choices(self, doc: Doc) -> list[str]:
        c = self.spec.doc_to_choice
        if isinstance(c, list):
            return list(c)
        if c in self.fields:
            return list(doc.record[c])
        try:
            out = ast.literal_eval(self._render("choice", doc))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise EdgemergeError(
                f"{doc.where}: the answer choices of task {self.name} are not a list"
            ) from None
        if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
            raise EdgemergeError(f"{doc.where}: the answer choices of task {self.name} are not strings")
        return out

    def target(self, doc: Doc) -> int | str:
        t = self.spec.doc_to_target
        if isinstance(t, int):
            return t
        if t in self.fields:
            return doc.record[t]
        s = self._render("target", doc)
        return ast.literal_eval(s) if s.isdigit() else s

    def answer(self, doc: Doc) -> str | None:
        """A few-shot example's answer as lm-eval's build_qa_turn takes it: the choice an integer target points
        at, a string target itself; None for an empty target (the example is then its text alone)."""
        a = self.target(doc)
        if a == "":
            return None
        return self.choices(doc)[a] if isinstance(a, int) else a

    def shot(self, doc: Doc, target_delimiter: str, fewshot_delimiter: str) -> str:
        """A few-shot example as plain text: the text, then the delimiter, answer and few-shot delimiter."""
        a = self.answer(doc)
        return self.text(doc) if a is None else self.text(doc) + target_delimiter + a + fewshot_delimiter


@dataclass
class TaskDocs:
    task: Task
    eval_docs: list[Doc]
    fewshot_docs: list[Doc]


def task_splits(task: Task) -> list[str]:
    """The splits a task reads: its eval split, then its few-shot split when that is another."""
    return [s for s in dict.fromkeys((task.eval_split, task.spec.fewshot_split)) if s]


def load_docs(task: Task, data: Path | dict[str, Path], prompter: Prompter) -> TaskDocs:
    """The task's eval and few-shot documents from the folder `data` (or the files of each split, fetched from
    the hub), checked and filtered (module docstring)."""
    spec = task.spec
    splits: dict[str, list[Doc]] = {}
    for split in task_splits(task):
        path = data[split] if isinstance(data, dict) else task.file(split, data)
        if not path.is_file():
            raise EdgemergeError(
                f"task {task.name} needs {path} (the {split} split of {spec.dataset_path}"
                f"{' ' + spec.dataset_name.format(subset=task.subset) if spec.dataset_name else ''} as JSON or "
                f"JSON Lines); give --data DIR with {spec.data_files[split].format(subset=task.subset or '')} in it"
            )
        docs = []
        for record, where in read_records(path, f"{task.name} {split} file"):
            check_record(spec, record, where)
            doc = Doc(record, where)
            if prompter.keep(doc):
                docs.append(doc)
        if not docs:
            raise EdgemergeError(f"{path}: no question of task {task.name} is left after its filter")
        splits[split] = docs
    return TaskDocs(
        task, splits[task.eval_split], splits.get(spec.fewshot_split, []) if spec.fewshot_split else []
    )


def check_shots(docs: TaskDocs, shots: int) -> None:
    """Enough few-shot examples for `shots` (lm-eval draws one more from the eval split itself, to drop the
    question being asked)."""
    if shots == 0:
        return
    spec = docs.task.spec
    if spec.fewshot_split is None:
        raise EdgemergeError(f"task {docs.task.name} has no few-shot split; give --fewshot 0")
    same = spec.fewshot_split == spec.test_split
    need = shots + 1 if same and spec.fewshot_sampler == "default" else shots
    have = len(docs.fewshot_docs) - (1 if same and spec.fewshot_sampler == "first_n" else 0)
    if need > len(docs.fewshot_docs) or shots > have:
        most = len(docs.fewshot_docs) - 1 if same else len(docs.fewshot_docs)
        raise EdgemergeError(
            f"--fewshot {shots}: the {spec.fewshot_split} split of task {docs.task.name} holds "
            f"{len(docs.fewshot_docs)} questions{' (one is the question asked)' if same else ''}; "
            f"give --fewshot {most} or fewer"
        )


class Sampler:
    """lm-eval's few-shot sampler of one task (module docstring), seeded as its evaluator seeds it."""

    def __init__(self, spec: TaskSpec, pool: list[Doc], seed: int = DEFAULT_SEED):
        self.first_n = spec.fewshot_sampler == "first_n"
        self.exclude = spec.fewshot_split == spec.test_split
        self.pool = pool
        self.rnd = random.Random(seed)

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        pool = self.pool
        if self.first_n:
            return ([x for x in pool if x.record != doc.record] if self.exclude else pool)[:n]
        if not self.exclude:
            return self.rnd.sample(pool, n)
        res = [x for x in self.rnd.sample(pool, n + 1) if x.record != doc.record][:n]
        if len(res) < n:  # duplicates of the question were drawn
            res = self.rnd.sample([x for x in pool if x.record != doc.record], n)
        return res


def requests(
    docs: TaskDocs, prompter: Prompter, shots: int, limit: int | None = None, *, chat: bool = False
) -> Iterator[Request]:
    """The task's questions as lm-eval builds them, in order (the sampler advances once per question).

    `chat`: lm-eval's --apply_chat_template --fewshot_as_multiturn: each example a user turn (its text) and an
    assistant turn (its answer), the question a last user turn (`messages`, for the model's chat template), and
    the continuations the choices without the target delimiter."""
    spec = docs.task.spec
    sampler = Sampler(spec, docs.fewshot_docs)
    for i, doc in enumerate(docs.eval_docs[:limit]):
        shot_docs = sampler.sample(shots, doc)
        ctx = "".join(prompter.shot(s, spec.target_delimiter, spec.fewshot_delimiter) for s in shot_docs)
        ctx += prompter.text(doc)
        choices = prompter.choices(doc)
        delimiter, messages = spec.target_delimiter, None
        if chat:
            delimiter, messages = "", []
            for s in shot_docs:
                messages.append({"role": "user", "content": prompter.text(s)})
                a = prompter.answer(s)
                if a is not None:
                    messages.append({"role": "assistant", "content": a})
            messages.append({"role": "user", "content": prompter.text(doc)})
        conts = [delimiter + c for c in choices]
        yield Request(i, doc, ctx, conts, choices, prompter.target(doc), messages)


def score(spec: TaskSpec, req: Request, lls: list[float]) -> dict[str, float]:
    """The question's metrics from the continuations' log-likelihoods (module docstring)."""
    if spec.process_results == "mc2":
        labels = req.doc.record["mc2_targets"]["labels"]  # lm-eval's process_results_mc2 reads this field
        if 0 not in labels:
            raise EdgemergeError(f"{req.doc.where}: mc2 needs at least one false answer (a label 0)")
        split = list(labels).index(0)
        p = np.exp(np.array(lls, dtype=np.float64))
        return {"acc": float(np.sum(p[:split] / (np.sum(p[:split]) + np.sum(p[split:]))))}
    gold = req.gold
    if isinstance(gold, str):
        gold = req.choices.index(gold) if gold in req.choices else -100
    elif gold >= len(req.choices):
        gold = -100
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: as numpy divides in lm-eval
        pred_norm = int(np.argmax(np.array(lls) / np.array([float(len(c)) for c in req.choices])))
    out = {"acc": 1.0 if int(np.argmax(lls)) == gold else 0.0, "acc_norm": 1.0 if pred_norm == gold else 0.0}
    return {m: out[m] for m in spec.metric_list}


def mean_stderr(xs: list[float]) -> float | None:
    """lm-eval's mean_stderr (sample standard deviation over sqrt(n)); None for one question."""
    if len(xs) < 2:
        return None
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float | None:
    """lm-eval's pooled_sample_stderr of a size-weighted group."""
    if sum(sizes) - len(sizes) <= 0:
        return None
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))
