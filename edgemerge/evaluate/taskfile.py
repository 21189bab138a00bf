"""Benchmark task descriptions: one YAML file per benchmark under evaluate/data/tasks/, written as
lm-evaluation-harness (0.4.x) writes its task YAMLs (same keys, same Jinja templates), plus where the data sits
under `--data DIR` and the shape each record must have. Adding a benchmark adds a file, never code.

A file may describe a family of subsets (`subsets` and `subset_task`, e.g. eus_exams_eu_<subset>); `--task`
takes the family's name (every subset whose data is present) or one subset's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import EdgemergeError
from ..limits import shown

TASKS_DIR = Path(__file__).resolve().parent / "data" / "tasks"
FieldType = Literal["str", "int", "list[str]", "list[int]"]
DEFAULT_SEED = 1234  # lm-eval's fewshot_random_seed (lm_eval.defaults.DEFAULT_OTHER_SEED)


class TaskSpec(BaseModel):
    """One task file. The lm-eval keys keep lm-eval's meaning and defaults (TaskConfig, FewshotConfig)."""

    model_config = ConfigDict(extra="forbid")
    task: str
    lm_eval: str  # the lm-eval file this one mirrors
    dataset_path: str  # the hub dataset, named when its local file is missing
    dataset_name: str | None = None
    subsets: list[str] = Field(default_factory=list)
    subset_task: str | None = None  # the name of one subset's task, with {subset}
    data_files: dict[str, str]  # split -> file under --data ({subset} filled in)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    fewshot_sampler: Literal["default", "first_n"] = "default"
    output_type: Literal["multiple_choice"]
    fields: dict[str, FieldType]  # dotted path -> type each record must have
    keep_docs: str | None = None  # lm-eval's process_docs as a Jinja test: keep a record when it renders True
    doc_to_text: str
    doc_to_choice: str | list[str]
    doc_to_target: str | int
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    metric_list: list[Literal["acc", "acc_norm"]]
    process_results: Literal["mc2"] | None = None  # lm-eval's truthfulqa utils.process_results_mc2
    aggregate: Literal["size_weighted"] | None = None  # a family's score over its subsets


@dataclass(frozen=True)
class Task:
    """One task to run: a spec, and for a family one subset of it."""

    name: str
    spec: TaskSpec
    subset: str | None = None
    family: str | None = None  # the family name when run as part of it

    @property
    def eval_split(self) -> str:
        """lm-eval's eval_docs: the test split when the task has one, else the validation split."""
        return self.spec.test_split or self.spec.validation_split  # type: ignore[return-value]

    def file(self, split: str, data: Path) -> Path:
        return Path(data) / self.spec.data_files[split].format(subset=self.subset or "")


def known_tasks() -> list[str]:
    """The names of the task files (families and single tasks)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_spec(name: str) -> TaskSpec:
    """The task file `name` (a bundled, trusted file: plain yaml.safe_load)."""
    path = TASKS_DIR / f"{name}.yaml"
    try:
        return TaskSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as e:  # a broken bundled file is our bug: say which
        raise RuntimeError(f"task file {path}: {e}") from None


def _subset_names(spec: TaskSpec) -> dict[str, str]:
    return {spec.subset_task.format(subset=s): s for s in spec.subsets} if spec.subset_task else {}


def all_task_names() -> list[str]:
    """Every name --task takes: families, single tasks and each family's subsets."""
    names = []
    for fam in known_tasks():
        names.append(fam)
        names += list(_subset_names(load_spec(fam)))
    return names


def resolve_tasks(names: list[str], data: Path | None) -> list[Task]:
    """The tasks `names` ask for, in order, each once. A family runs the subsets whose data file is under
    `data` (all of them when `data` is None, so the missing file is named later); an unknown name lists the
    known ones."""
    families = known_tasks()
    out: list[Task] = []
    for name in names:
        if name in families:
            spec = load_spec(name)
            if not spec.subsets:
                out.append(Task(name, spec))
                continue
            subs = _subset_names(spec)
            present = [
                Task(t, spec, s, name)
                for t, s in subs.items()
                if data is None
                or Task(t, spec, s).file(spec.test_split or spec.validation_split, data).is_file()
            ]
            out += present or [Task(t, spec, s, name) for t, s in subs.items()]  # none present: name a file
            continue
        for fam in families:
            spec = load_spec(fam)
            subset = _subset_names(spec).get(name)
            if subset is not None:
                out.append(Task(name, spec, subset))
                break
        else:
            raise EdgemergeError(
                f"unknown task {shown(name)}; known tasks: {', '.join(families)} (or one subset of a family, "
                "e.g. eus_exams_eu_ejadministrari or truthfulqa-multi_mc1_eu: `edgemerge eval --help`)"
            )
    seen: set[str] = set()
    return [t for t in out if not (t.name in seen or seen.add(t.name))]


def missing_subsets(tasks: list[Task]) -> dict[str, list[str]]:
    """family -> its subsets not run (their data was not under --data)."""
    out: dict[str, list[str]] = {}
    for fam in {t.family for t in tasks if t.family}:
        spec = load_spec(fam)
        ran = {t.subset for t in tasks if t.family == fam}
        gone = [s for s in spec.subsets if s not in ran]
        if gone:
            out[fam] = gone
    return out
