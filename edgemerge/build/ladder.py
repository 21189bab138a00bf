"""The quant ladder's choice (pure: sizes, budget and drift scores in; one choice and every verdict out).

    fits(r)   = size(r) <= max_size  and  ram(r) <= max_ram                  (each bound when given)
    passes(r) = kld_mean(r) <= max_kld_mean  and  top1(r) >= min_top1_agreement  (each when set)
    choice    = the smallest r (by size) that fits and passes

`order` lists the types that fit, smallest first: the build measures them in that order and stops at the
first that passes, which is the choice by definition; no assumption that drift falls as the size grows (it
does not strictly: IQ4_XS is smaller than Q4_K_S and often drifts less), and nothing larger is quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import EdgemergeError
from ..files import si_bytes
from ..recipe import QuantAuto


@dataclass(frozen=True)
class Budget:
    """What the chosen file must fit: its size on disk, the memory to run it (None: no bound)."""

    max_size: int | None = None
    max_ram: int | None = None

    def describe(self) -> str:
        parts = [
            f"{flag} {si_bytes(v)}"
            for flag, v in (("--max-size", self.max_size), ("--max-ram", self.max_ram))
            if v is not None
        ]
        return ", ".join(parts) or "no size or memory budget"


@dataclass
class Rung:
    """One type of the ladder: its size (llama.cpp's dry run, or the file once made), the memory to run it and,
    once measured, its drift against the unquantized file on held-out target-language text."""

    quant: str
    size: int
    ram: int
    kld_mean: float | None = None
    top1_agreement: float | None = None
    ppl_ratio: float | None = None

    @property
    def measured(self) -> bool:
        return self.kld_mean is not None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LadderChoice:
    chosen: str | None
    reason: str
    verdicts: dict[str, str] = field(default_factory=dict)  # type -> chosen, over budget, drift, not measured
    closest: str | None = None  # when nothing passes: the measured type that missed the gate by the least

    def to_dict(self) -> dict:
        return asdict(self)


def over_budget(r: Rung, budget: Budget) -> list[str]:
    """Each bound of `budget` that `r` exceeds, as text."""
    out = []
    if budget.max_size is not None and r.size > budget.max_size:
        out.append(f"size {si_bytes(r.size)} > {si_bytes(budget.max_size)}")
    if budget.max_ram is not None and r.ram > budget.max_ram:
        out.append(f"RAM {si_bytes(r.ram)} > {si_bytes(budget.max_ram)}")
    return out


def gate_misses(r: Rung, gate: QuantAuto) -> list[str]:
    """Each threshold of the drift gate the measured `r` misses, as text."""
    out = []
    if gate.max_kld_mean is not None and not (r.kld_mean is not None and r.kld_mean <= gate.max_kld_mean):
        out.append(f"KLD {_num(r.kld_mean)} > {gate.max_kld_mean:g}")
    if gate.min_top1_agreement is not None and not (
        r.top1_agreement is not None and r.top1_agreement >= gate.min_top1_agreement
    ):
        out.append(f"top-1 {_num(r.top1_agreement)} < {gate.min_top1_agreement:g}")
    return out


def order(rungs: list[Rung], budget: Budget) -> list[Rung]:
    """The types that fit the budget, smallest first (the order they are measured in)."""
    return sorted((r for r in rungs if not over_budget(r, budget)), key=lambda r: (r.size, r.quant))


def check_budget(rungs: list[Rung], budget: Budget) -> None:
    """EdgemergeError naming the closest type and its size when no type of the ladder fits the budget."""
    if order(rungs, budget):
        return

    def overshoot(r: Rung) -> float:
        parts = [(r.size, budget.max_size), (r.ram, budget.max_ram)]
        return max(v / bound for v, bound in parts if bound is not None)

    closest = min(rungs, key=overshoot)
    raise EdgemergeError(
        f"no type of the quant ladder fits {budget.describe()}: the closest, {closest.quant}, is "
        f"{si_bytes(closest.size)} and needs {si_bytes(closest.ram)} of memory to run; raise the budget or add a "
        "smaller type to the recipe's quant_auto.ladder (e.g. IQ2_M, with an importance matrix)"
    )


def _shortfall(r: Rung, gate: QuantAuto) -> float:
    """How far a measured type is from the gate (relative, summed over the thresholds it misses)."""
    gap = 0.0
    if gate.max_kld_mean is not None and r.kld_mean is not None:
        gap += max(0.0, r.kld_mean / gate.max_kld_mean - 1)
    if gate.min_top1_agreement is not None and r.top1_agreement is not None:
        gap += max(0.0, (gate.min_top1_agreement - r.top1_agreement) / max(gate.min_top1_agreement, 1e-9))
    return gap


def choose_quant(rungs: list[Rung], gate: QuantAuto, budget: Budget) -> LadderChoice:
    """The smallest measured type that fits and passes (module docstring), with a verdict for every type."""
    fitting = order(rungs, budget)
    passing = [r for r in fitting if r.measured and not gate_misses(r, gate)]
    chosen = passing[0] if passing else None
    verdicts = {}
    for r in sorted(rungs, key=lambda r: (r.size, r.quant)):
        over, misses = over_budget(r, budget), gate_misses(r, gate) if r.measured else []
        if over:
            verdicts[r.quant] = "over budget: " + ", ".join(over)
        elif chosen is not None and r.quant == chosen.quant:
            verdicts[r.quant] = "chosen"
        elif misses:
            verdicts[r.quant] = "drifts: " + ", ".join(misses)
        elif chosen is not None:
            verdicts[r.quant] = f"{'passes' if r.measured else 'not measured'}; {chosen.quant} is smaller"
        else:
            verdicts[r.quant] = "not measured"
    gate_text = _gate_text(gate)
    within = f" within {budget.describe()}" if budget.max_size or budget.max_ram else ""
    if chosen is None:
        measured = [r for r in fitting if r.measured]
        closest = min(measured, key=lambda r: (_shortfall(r, gate), r.size)) if measured else None
        why = (
            f"; the closest: {closest.quant} ({verdicts[closest.quant].removeprefix('drifts: ')})"
            if closest
            else ""
        )
        reason = f"no type{within} passes the drift gate ({gate_text}){why}"
        return LadderChoice(None, reason, verdicts, closest.quant if closest else None)
    reason = (
        f"{chosen.quant}: the smallest type{within} that passes the drift gate ({gate_text}): "
        f"{si_bytes(chosen.size)}, KLD {_num(chosen.kld_mean)}, top-1 {_num(chosen.top1_agreement)}"
    )
    return LadderChoice(chosen.quant, reason, verdicts)


def _gate_text(gate: QuantAuto) -> str:
    parts = []
    if gate.max_kld_mean is not None:
        parts.append(f"KLD <= {gate.max_kld_mean:g}")
    if gate.min_top1_agreement is not None:
        parts.append(f"top-1 >= {gate.min_top1_agreement:g}")
    return ", ".join(parts)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


COLUMNS = ("type", "size", "RAM to run", "KLD", "top-1", "PPL ratio", "verdict")


def row_cells(r: Rung, choice: LadderChoice) -> list[str]:
    """One type's row of the table (COLUMNS)."""
    cells = [r.quant, si_bytes(r.size), si_bytes(r.ram)]
    cells += [_num(r.kld_mean), _num(r.top1_agreement), _num(r.ppl_ratio), choice.verdicts.get(r.quant, "")]
    return cells


def ladder_table(rungs: list[Rung], choice: LadderChoice) -> str:
    """The whole ladder as a Markdown table, smallest first, the chosen type in bold."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in sorted(rungs, key=lambda r: (r.size, r.quant)):
        cells = row_cells(r, choice)
        if r.quant == choice.chosen:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
