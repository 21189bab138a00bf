"""Gates: recipe thresholds (`eval:` section, `edgemerge.recipe.Gates`) applied to an evaluation report.

A gate whose metric was not measured (no --ref for drift gates, no chat template for chat gates) is skipped,
not failed: a scripted build evaluates its F16 without a reference and its quants with one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..errors import EdgemergeError
from ..recipe import Gates
from .report import EvalReport

# gate field -> (report metric, "min" or "max")
GATE_METRICS: dict[str, tuple[str, str]] = {
    "min_language_fidelity": ("language_fidelity", "min"),
    "min_stop_rate": ("stop_rate", "min"),
    "min_instruction_following": ("instruction_following", "min"),
    "max_perplexity": ("perplexity", "max"),
    "max_kld_mean": ("kld_mean", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "max_ppl_ratio": ("ppl_ratio", "max"),
}


@dataclass
class GateResult:
    gate: str
    metric: str
    threshold: float
    value: float | None
    passed: bool | None  # None: metric not measured, gate skipped

    def describe(self) -> str:
        op = ">=" if GATE_METRICS[self.gate][1] == "min" else "<="
        if self.value is None:
            return f"{self.metric} not measured ({self.gate} skipped)"
        return f"{self.metric} = {self.value:.4g}, needs {op} {self.threshold:g} ({self.gate})"


def gate_results(report: EvalReport, gates: Gates) -> list[GateResult]:
    """Every gate that is set, with its outcome."""
    out = []
    for gate, (metric, kind) in GATE_METRICS.items():
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        value = getattr(report, metric)
        passed = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        out.append(GateResult(gate, metric, threshold, value, passed))
    return out


def check_gates(report: EvalReport, gates: Gates) -> list[str]:
    """Descriptions of the failed gates (empty when all set gates pass or are skipped)."""
    return [r.describe() for r in gate_results(report, gates) if r.passed is False]


def gates_with(
    gates: Gates, overrides: dict[str, float | None], names: dict[str, str] | None = None
) -> Gates:
    """`gates` with the given thresholds replaced (None: keep the recipe's), validated like a recipe's eval:
    section (finite, fractions in [0, 1]); an error names the field as `names` calls it (the CLI's flags)."""
    try:
        return Gates.model_validate(
            {**gates.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise EdgemergeError(
            f"{(names or {}).get(field, field)}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
