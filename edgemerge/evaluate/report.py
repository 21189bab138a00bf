"""The evaluation report: JSON (`to_dict`), a markdown table for model cards and a rich table for terminals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from .answers import Response


@dataclass
class EvalReport:
    model: str
    lang: str | None  # None: benchmarks only
    quick: bool = False
    perplexity: float | None = None
    tokens: int | None = None  # scored tokens of the perplexity text
    ppl_ctx: int | None = None
    ppl_chunks: int | None = None
    chat_template: bool = False
    language_fidelity: float | None = None
    instruction_following: float | None = None
    instruction_checks: float | None = None
    stop_rate: float | None = None
    max_tokens: int | None = None
    responses: list[Response] = field(default_factory=list)
    mc_file: str | None = None
    mc_accuracy: float | None = None
    mc_questions: int | None = None
    ref: str | None = None
    ref_perplexity: float | None = None
    kld_mean: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    ppl_ratio: float | None = None
    seconds: float | None = None
    ppl_seconds: float | None = None
    answer_seconds: float | None = None
    answer_batch: int | None = None  # answers decoded in parallel
    threads: int | None = None
    chat_skipped: str | None = None  # why the prompts were not answered (a file too large for the memory)
    memory_note: str | None = None  # answered although the file does not fit the memory: why it was slow
    # lm-eval-format benchmarks: one row per task and family (bench.TaskResult.row, bench.family_rows)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    bench_settings: dict[str, Any] | None = None  # shots, limit, chat template, seed, subsets without data
    bench_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "responses"}
        d["responses"] = [r.to_dict() for r in self.responses]
        if self.mc_file is None:
            for k in ("mc_file", "mc_accuracy", "mc_questions"):
                d.pop(k)
        if self.ref is None:
            for k in ("ref", "ref_perplexity", "kld_mean", "kld_max", "top1_agreement", "ppl_ratio"):
                d.pop(k)
        if not self.benchmarks:
            for k in ("benchmarks", "bench_settings", "bench_seconds"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        """The report back from `to_dict()` output (e.g. a cached JSON report); unknown keys are ignored."""
        fields = set(cls.__dataclass_fields__)
        resp_fields = set(Response.__dataclass_fields__)
        responses = [
            Response(**{k: v for k, v in r.items() if k in resp_fields}) for r in d.get("responses", [])
        ]
        return cls(**{k: v for k, v in d.items() if k in fields and k != "responses"}, responses=responses)

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, value, what it means) for the metrics measured; n/a for chat metrics of a base model;
        none when only benchmarks were run (`bench_rows`)."""
        if self.lang is None:
            return []

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        n = sum(r.langid_counted for r in self.responses)
        na = f" (skipped: {self.chat_skipped})" if self.chat_skipped else ""
        na = na or ("" if self.chat_template else " (no chat template)")
        rows = [
            (
                "perplexity",
                "n/a" if self.perplexity is None else f"{self.perplexity:.3f}",
                f"{self.tokens} tokens scored, chunks of {self.ppl_ctx}",
            ),
            ("language fidelity", pct(self.language_fidelity), f"answers in {self.lang}, of {n}{na}"),
            (
                "instruction following",
                pct(self.instruction_following),
                f"prompts with all constraints met{na}",
            ),
            (
                "stop rate",
                pct(self.stop_rate),
                f"answers ending on EOS/EOT within {self.max_tokens} tokens{na}",
            ),
        ]
        if self.mc_file is not None:
            rows.append(
                ("multiple choice", pct(self.mc_accuracy), f"{self.mc_questions} questions, log-likelihood")
            )
        if self.ref is not None:
            rows += [
                ("KLD vs ref", f"{self.kld_mean:.5f}", f"mean KL(ref ‖ model), max {self.kld_max:.4f}"),
                ("top-1 agreement", pct(self.top1_agreement), "same most likely next token as ref"),
                ("PPL ratio", f"{self.ppl_ratio:.4f}", f"ref perplexity {self.ref_perplexity:.3f}"),
            ]
        return rows

    def bench_caption(self) -> str:
        """The settings the benchmark scores depend on, in a line."""
        s = self.bench_settings or {}
        shots = "each task's default shots" if s.get("fewshot") is None else f"{s['fewshot']}-shot"
        parts = [
            "lm-evaluation-harness format",
            shots,
            "chat template" if s.get("chat_template") else "no chat template",
            f"limit {s['limit']} per task" if s.get("limit") else "all questions",
            f"few-shot seed {s.get('seed')}",
        ]
        missing = s.get("missing") or {}
        parts += [f"{fam} without {', '.join(subs)} (no data)" for fam, subs in missing.items()]
        return ", ".join(parts)

    def bench_rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(task, n-shot, metric, value, ± stderr, questions) per task and metric, as lm-eval's table."""
        out = []
        for b in self.benchmarks:
            name = b["task"] if b.get("family") is None else f" - {b['task']}"
            for m in ("acc", "acc_norm"):
                if m in b:
                    se = b.get(f"{m}_stderr")
                    stderr = "N/A" if se is None else f"{se:.4f}"
                    out.append((name, str(b["shots"]), m, f"{b[m]:.4f}", stderr, str(b["questions"])))
        return out

    def to_markdown(self) -> str:
        """A markdown table suitable for a model card. A quick report leaves instruction following out: on the
        quick set's few prompts, short answers meet length limits by being short, so it reads far above the full
        set's figure (a card must not show it as if it were that)."""
        lines = []
        rows = [r for r in self.rows() if not (self.quick and r[0] == "instruction following")]
        if rows:
            head = f"Evaluation of `{self.model}` in **{self.lang}**" + (" (quick set)" if self.quick else "")
            lines = [head, "", "| metric | value | notes |", "| --- | --- | --- |"]
            lines += [f"| {m} | {v} | {n} |" for m, v, n in rows]
        if self.benchmarks:
            lines += [""] if lines else []
            lines += [f"Benchmarks of `{self.model}` ({self.bench_caption()})", ""]
            lines += [
                "| task | n-shot | metric | value | stderr | questions |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += ["| " + " | ".join(r) + " |" for r in self.bench_rows()]
        return "\n".join(lines) + "\n"

    def to_table(self, title: str | None = None):
        """A rich table of the metrics (of the benchmarks when only they were run)."""
        if self.lang is None:
            return self.bench_table()
        table = Table(title=title or f"{self.model} · {self.lang}" + (" · quick" if self.quick else ""))
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("notes", style="dim")
        for row in self.rows():
            table.add_row(*row)
        return table

    def bench_table(self):
        """A rich table of the benchmarks, lm-eval's columns, the settings as its caption."""
        table = Table(title=f"{self.model} · benchmarks", caption=self.bench_caption())
        for col, justify in (("task", "left"), ("n-shot", "right"), ("metric", "left"), ("value", "right")):
            table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
        table.add_column("± stderr", justify="right", style="dim")
        table.add_column("questions", justify="right", style="dim")
        for row in self.bench_rows():
            table.add_row(*row)
        return table
