"""`sweep`: many candidate merges (method x weight), each merged to GGUF, quantized to a cheap evaluation type,
scored by evaluate/signals.py and deleted; the parents scored the same way; one chosen by the recipe's rule.

Every candidate is a cached stage of the sweep's folder (state.json in its work area, as a build's): its key is
the candidate's merge fields, the inputs' revisions and hashes, the evaluation type and the probe's tokens, and
its output is its scores (JSON), so an interrupted or widened sweep redoes only what is new. A task needs only
the probe and the inputs: tasks are independent (`run_tasks` runs them here, one after another: each merge
already uses the disk and the cores fully).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import __version__
from ..build.options import plan_space_item, threads_for
from ..build.run import input_provenance, input_stamps, llama_cpp_version
from ..build.state import (
    StageEvent,
    Stages,
    build_lock,
    check_out_path,
    mark_finished,
    mark_unfinished,
    prepare_out,
    stage_key,
)
from ..errors import EdgemergeError
from ..evaluate.prompts import load_prompts
from ..evaluate.signals import Probe, Signals, make_probe, measure
from ..files import atomic_output, free_bytes, human_bytes, remove_file
from ..memory_plan import plan_file
from ..merge.backends import resolve_backend_name
from ..package.plots import sweep_plot
from ..pipeline import check_inputs, export_hf, merge_to_gguf
from ..progress import Progress
from ..quantize import check_quant, quant_file_name, quantize
from ..recipe import HIGH_WEIGHT, Recipe, SweepRule, parse_recipe
from ..resources import memory_limit
from ..sources import local_inputs, resolve_recipe
from .rule import Choice, Row, choose

EXECUTORS = ("local",)
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_PNG = "sweep.png"
SPACE_MARGIN = 64 * 1024**2


@dataclass
class SweepOptions:
    """How to sweep (the recipe's `sweep` block says what, these override it)."""

    out: Path | None = None  # default dist/<recipe name>-sweep
    weights: list[float] | None = None
    methods: list[str] | None = None
    lang: str | None = None  # default the recipe's first language
    eval_quant: str = "Q8_0"
    fast: bool = False  # no greedy answers: perplexities and teacher-forced answers only
    keep: bool = False  # keep each candidate's evaluation GGUF under OUT/candidates
    text: Path | None = None  # held-out target-language text (default: the built-in sample)
    backend: str = "auto"
    threads: int | None = None
    force: bool = False
    executor: str = "local"


@dataclass
class Candidate:
    name: str
    method: str
    weight: float


@dataclass
class SweepResult:
    out: Path
    recipe: Recipe
    lang: str
    rule: SweepRule
    rows: list[Row]
    choice: Choice
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        return table(self.rows, self.choice)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "name": self.recipe.name,
            "lang": self.lang,
            "rule": self.rule.model_dump(),
            "rows": [r.to_dict() for r in self.rows],
            "choice": self.choice.to_dict(),
            "files": [f.name for f in self.files],
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Task:
    """One independent unit of a sweep: a stage name, its key, the JSON file it writes and the work."""

    name: str
    key: str
    output: Path
    run: Callable[[], Signals]


def candidates(rule: SweepRule) -> list[Candidate]:
    """The grid: every method with every weight, in the rule's order."""
    return [Candidate(f"{m}-{w:g}", m, w) for m in rule.methods for w in rule.weights]


def sweep_rule(recipe: Recipe, options: SweepOptions) -> SweepRule:
    """The recipe's sweep block with --weights and --methods applied (validated like the YAML)."""
    data = recipe.sweep.model_dump()
    if options.weights is not None:
        data["weights"] = list(options.weights)
    if options.methods is not None:
        data["methods"] = list(options.methods)
    try:
        return SweepRule.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EdgemergeError(f"sweep {where}: {first['msg'].removeprefix('Value error, ')}") from None


def candidate_recipe(recipe: Recipe, c: Candidate, *, name: str | None = None) -> Recipe:
    """The recipe with the candidate's method and one weight for every language (named `name`, default
    <recipe>-<candidate>); another method than the recipe's starts from its own default options (the recipe's
    belong to its method)."""
    data = recipe.to_yaml_dict()
    data["name"] = name or f"{recipe.name}-{c.name}"
    if c.method != recipe.method:
        data["method"], data["options"] = c.method, {}
    for lang in data["languages"]:
        lang["weight"] = c.weight
    out = parse_recipe(data, source=recipe.name, root=recipe.root)
    out.file = recipe.file
    return out


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise EdgemergeError(
            f"unknown executor {executor!r}; this version runs sweeps with: {', '.join(EXECUTORS)}"
        )


def run_tasks(tasks: list[Task], stages: Stages, executor: str) -> dict[str, Signals]:
    """Run (or find cached) every task; the seam where another executor could spread them over machines."""
    check_executor(executor)
    out = {}
    for t in tasks:
        out[t.name] = _cached_task(t, stages)
    return out


def _cached_task(t: Task, stages: Stages) -> Signals:
    def work() -> None:
        s = t.run()
        with atomic_output(t.output, force=True) as tmp:
            tmp.write_text(json.dumps(s.to_dict()), encoding="utf-8")

    stages.run(t.name, t.key, [t.output], work)
    return Signals.from_dict(json.loads(t.output.read_text(encoding="utf-8")))


def sweep(
    recipe: Recipe,
    options: SweepOptions | None = None,
    *,
    progress: Progress | None = None,
    on_stage: Callable[[StageEvent], None] | None = None,
) -> SweepResult:
    """Score every candidate and the parents (module docstring) and choose one by the recipe's rule."""
    t0 = time.perf_counter()
    options = options or SweepOptions()
    rule = sweep_rule(recipe, options)
    eval_quant = check_quant(options.eval_quant)
    backend = resolve_backend_name(options.backend)
    lang = options.lang or recipe.lang_codes[0]
    load_prompts(lang)  # an unknown language fails before any work
    check_executor(options.executor)
    warnings = [
        f"weight {w:g} is above {HIGH_WEIGHT:g}: task arithmetic usually collapses there (the paper, the miniature)"
        for w in rule.weights
        if w > HIGH_WEIGHT
    ]
    out = Path(options.out or Path("dist") / f"{recipe.name}-sweep")
    check_out_path(out, local_inputs(recipe))
    with build_lock(out):
        state = prepare_out(out, f"{recipe.name}-sweep", force=options.force)
        stages = Stages(state, on_stage, progress)
        sources = resolve_recipe(recipe, progress)
        check_out_path(out, sources.paths())
        report = check_inputs(sources)
        inputs, stamps = input_provenance(sources), input_stamps(sources)
        llama = llama_cpp_version()
        threads = threads_for(options.threads).n
        work = state.work / "sweep"
        kept = out / "candidates"

        # one candidate's files at a time (its F16 and its evaluation quant), plus every kept quant
        one = plan_space_item(report.n_params, "F16") + plan_space_item(report.n_params, eval_quant)
        grid = candidates(rule)
        kept_bytes = plan_space_item(report.n_params, eval_quant) * (len(grid) + 1 + len(recipe.languages))
        need = one + (kept_bytes if options.keep else 0) + SPACE_MARGIN
        free = free_bytes(out)
        if free < need:
            raise EdgemergeError(
                f"not enough disk space at {out}: the sweep needs {human_bytes(need)} (one candidate's F16 and "
                f"{eval_quant} at a time{', and every kept ' + eval_quant if options.keep else ''}); "
                f"{human_bytes(free)} free. Free some space or choose another --out"
            )
        state.save()
        mark_unfinished(out, f"{recipe.name}-sweep")

        def evaluated(name: str, make_float: Callable[[Path], Any], probe: Probe) -> Signals:
            """Make the float GGUF, quantize it, drop the float file, score the quant, drop it unless kept."""
            work.mkdir(parents=True, exist_ok=True)
            f16 = work / quant_file_name(name, "F16")
            q = (kept if options.keep else work) / quant_file_name(name, eval_quant)
            try:
                make_float(f16)
                quantize(f16, eval_quant, q, threads=threads, force=True, progress=progress)
                remove_file(f16)
                planned = plan_file(q, memory_limit())
                return measure(
                    q,
                    probe,
                    chat=not options.fast,
                    n_threads=threads,
                    batch=planned.batch,
                    skip_chat=None if planned.fits else planned.note,
                    progress=progress,
                )
            finally:
                remove_file(f16)
                if not options.keep:
                    remove_file(q)

        # the probe: the instruct model's tokens of the held-out text and reference answers
        probe_file = state.work / "probe.json"
        text_key = None if options.text is None else _file_stamp(options.text)
        probe_key = stage_key("probe", __version__, inputs["instruct"], stamps["instruct"], lang, text_key)

        def make_probe_file() -> None:
            work.mkdir(parents=True, exist_ok=True)
            f16 = work / quant_file_name("probe", "F16")
            try:
                export_hf(sources.instruct.path, f16, outtype="f16", force=True, progress=progress)
                probe = make_probe(f16, lang, text=options.text, n_threads=threads)
            finally:
                remove_file(f16)
            with atomic_output(probe_file, force=True) as tmp:
                tmp.write_text(json.dumps(probe.to_dict()), encoding="utf-8")

        stages.run("probe", probe_key, [probe_file], make_probe_file)
        probe = Probe.from_dict(_read(probe_file))
        common = (__version__, eval_quant, probe.key(), options.fast, llama)

        tasks = [
            Task(
                "parent instruct",
                stage_key("parent", inputs["instruct"], stamps["instruct"], *common),
                work / "instruct.json",
                lambda: evaluated(
                    "instruct", lambda f: export_hf(sources.instruct.path, f, force=True), probe
                ),
            )
        ]
        for code, src in zip(sources.codes, sources.languages):
            tasks.append(
                Task(
                    f"parent {code}",
                    stage_key("parent", inputs[code], stamps[code], *common),
                    work / f"lang-{code}.json",
                    lambda src=src, code=code: evaluated(
                        f"lang-{code}", lambda f: export_hf(src.path, f, force=True), probe
                    ),
                )
            )
        by_name = {}
        for c in grid:
            r = candidate_recipe(recipe, c)
            by_name[c.name] = c
            tasks.append(
                Task(
                    f"candidate {c.name}",
                    stage_key("candidate", r.merge_dict(), inputs, stamps, backend, *common),
                    work / f"{c.name}.json",
                    lambda r=r, c=c: evaluated(
                        c.name,
                        lambda f: merge_to_gguf(
                            r,
                            f,
                            backend=backend,
                            force=True,
                            progress=progress,
                            sources=sources,
                            report=report,
                        ),
                        probe,
                    ),
                )
            )
        scored = run_tasks(tasks, stages, options.executor)

        rows = [Row("instruct", "instruct", scored["parent instruct"])]
        rows += [Row(code, "language", scored[f"parent {code}"]) for code in sources.codes]
        rows += [
            Row(name, "candidate", scored[f"candidate {name}"], c.method, c.weight)
            for name, c in by_name.items()
        ]
        choice = choose(rows, rule)
        result = SweepResult(out, recipe, lang, rule, rows, choice, [], warnings)
        result.files = _write_outputs(result)
        mark_finished(out, f"{recipe.name}-sweep")
    result.seconds = time.perf_counter() - t0
    return result


def _write_outputs(r: SweepResult) -> list[Path]:
    """sweep.json (every score, the rule, the choice), sweep.md (the table) and sweep.png (the plot)."""
    files = []
    data = r.to_dict()
    data["files"] = [SWEEP_JSON, SWEEP_MD, SWEEP_PNG]
    for name, text in (
        (SWEEP_JSON, json.dumps(data, indent=2, ensure_ascii=False) + "\n"),
        (SWEEP_MD, r.table() + "\n\n" + r.choice.reason + "\n"),
    ):
        with atomic_output(r.out / name, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        files.append(r.out / name)
    title = (
        f"{r.recipe.name}: sweep in {r.lang} (chosen: {r.choice.chosen.name if r.choice.chosen else 'none'})"
    )
    sweep_plot([row.to_dict() for row in r.rows], r.choice.chosen.name if r.choice.chosen else None,
               r.out / SWEEP_PNG, title=title)  # fmt: skip
    files.append(r.out / SWEEP_PNG)
    return files


COLUMNS = (
    ("answer_ppl", "answer ppl", "{:.2f}"),
    ("answer_ppl_en", "answer ppl en", "{:.2f}"),
    ("english_retention", "en retention", "{:.2f}"),
    ("eot_prob_en", "eot en", "{:.2f}"),
    ("eot_ratio", "eot ratio", "{:.2f}"),
    ("ppl", "ppl", "{:.2f}"),
    ("ppl_en", "ppl en", "{:.2f}"),
    ("language_fidelity", "lang fidelity", "{:.2f}"),
    ("instruction_following", "instr following", "{:.2f}"),
    ("stop_rate", "stop rate", "{:.2f}"),
)


def table(rows: list[Row], choice: Choice) -> str:
    """The sweep as a Markdown table: parents first, then every candidate; the chosen one in bold, the
    rejected ones with their reason."""
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " | verdict |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for r in rows:
        cells, verdict = row_cells(r, choice)
        if verdict == "chosen":
            lines.append(f"| **{r.name}** | " + " | ".join(cells) + " | **chosen** |")
        else:
            lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def row_cells(r: Row, choice: Choice) -> tuple[list[str], str]:
    """One row's COLUMNS as text and its verdict: parent, chosen, the rejection reasons, or eligible."""
    values = {**r.signals.to_dict(), **choice.derived.get(r.name, {})}
    cells = ["n/a" if values.get(k) is None else fmt.format(values[k]) for k, _, fmt in COLUMNS]
    if r.role != "candidate":
        return cells, "parent"
    if choice.chosen is not None and r.name == choice.chosen.name:
        return cells, "chosen"
    return cells, "; ".join(choice.rejected.get(r.name, ["eligible"]))


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _file_stamp(path: Path) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
