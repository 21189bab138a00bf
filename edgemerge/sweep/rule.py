"""The selection rule of a sweep (pure: rows of signals in, one choice and every reason out).

With A(x) the English answer perplexity of model x (evaluate/signals.py), I the instruct model and L the language
model best at English (the lowest A among the language parents):

    english_retention(c) = ln(A(L) / A(c)) / ln(A(L) / A(I))    1 = as good as the instruct model, 0 = as the
                                                                 language model; when A(L) <= 1.01 A(I) the
                                                                 language model is not worse and A(I) / A(c)
                                                                 is used instead
    eot_ratio(c)         = eot_prob_en(c) / eot_prob_en(I)      does c still know where an English turn ends

A candidate is eligible when every threshold of the recipe's `sweep` block holds (retention, eot ratio, and when
the chat metrics were measured: stop rate, language fidelity, instruction following); the choice is the eligible
candidate with the lowest target-language answer perplexity (ties: lower target-language text perplexity, then the
smaller weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..evaluate.signals import Signals
from ..recipe import SweepRule

CLOSE = 1.01  # the language model's English answers within 1% of the instruct model's: no span to measure in


@dataclass
class Row:
    name: str  # task_arithmetic-0.5, or the parent's role: instruct, eu
    role: str  # candidate | instruct | language
    signals: Signals
    method: str | None = None
    weight: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "method": self.method,
            "weight": self.weight,
            **self.signals.to_dict(),
        }


@dataclass
class Choice:
    chosen: Row | None
    reason: str
    derived: dict[str, dict[str, float | None]] = field(default_factory=dict)  # name -> retention, eot ratio
    rejected: dict[str, list[str]] = field(default_factory=dict)  # candidate name -> why not
    closest: str | None = None  # when nothing is eligible: the candidate that failed by the least

    def to_dict(self) -> dict:
        return {
            "chosen": None if self.chosen is None else self.chosen.name,
            "method": None if self.chosen is None else self.chosen.method,
            "weight": None if self.chosen is None else self.chosen.weight,
            "reason": self.reason,
            "derived": self.derived,
            "rejected": self.rejected,
            "closest": self.closest,
        }


def english_retention(a_cand: float, a_instruct: float, a_lang: float | None) -> float:
    """The share of the instruct model's English-answer advantage over the language model that `a_cand` keeps
    (module docstring)."""
    if a_lang is not None and a_lang > CLOSE * a_instruct:
        return math.log(a_lang / a_cand) / math.log(a_lang / a_instruct)
    return a_instruct / a_cand


def _shortfalls(row: Row, derived: dict[str, float | None], rule: SweepRule) -> list[tuple[str, float]]:
    """Each threshold `row` misses, with how far below it (relative), for the message and the closest row."""
    s = row.signals
    checks = [
        ("english retention", derived["english_retention"], rule.min_english_retention),
        ("end-of-turn ratio", derived["eot_ratio"], rule.min_eot_ratio),
        ("stop rate", s.stop_rate, rule.min_stop_rate),
        ("language fidelity", s.language_fidelity, rule.min_language_fidelity),
        ("instruction following", s.instruction_following, rule.min_instruction_following),
    ]
    out = []
    for label, value, minimum in checks:
        if minimum is None or value is None:
            continue
        if not math.isfinite(value) or value < minimum:
            gap = math.inf if not math.isfinite(value) else (minimum - value) / max(minimum, 1e-9)
            shown = "n/a" if not math.isfinite(value) else f"{value:.2f}"
            out.append((f"{label} {shown} < {minimum:g}", gap))
    if not math.isfinite(s.answer_ppl):
        out.append(("no answer perplexity", math.inf))
    return out


def choose(rows: list[Row], rule: SweepRule) -> Choice:
    """Apply the rule (module docstring) to the candidate rows, given the parent rows among `rows`."""
    instruct = next(r for r in rows if r.role == "instruct")
    langs = [
        r.signals.answer_ppl_en
        for r in rows
        if r.role == "language" and math.isfinite(r.signals.answer_ppl_en)
    ]
    a_lang = min(langs) if langs else None
    a_inst, eot_inst = instruct.signals.answer_ppl_en, instruct.signals.eot_prob_en
    derived: dict[str, dict[str, float | None]] = {}
    for r in rows:
        s = r.signals
        derived[r.name] = {
            "english_retention": english_retention(s.answer_ppl_en, a_inst, a_lang),
            "eot_ratio": s.eot_prob_en / eot_inst if eot_inst > 0 else None,
        }
    candidates = [r for r in rows if r.role == "candidate"]
    eligible, rejected, gaps = [], {}, {}
    for r in candidates:
        misses = _shortfalls(r, derived[r.name], rule)
        if misses:
            rejected[r.name] = [m for m, _ in misses]
            gaps[r.name] = sum(g for _, g in misses)
        else:
            eligible.append(r)
    if not eligible:
        closest = min(gaps, key=gaps.get) if gaps else None
        why = f"; closest: {closest} ({', '.join(rejected[closest])})" if closest else ""
        return Choice(
            None, f"no candidate meets the recipe's sweep thresholds{why}", derived, rejected, closest
        )
    best = min(eligible, key=lambda r: (r.signals.answer_ppl, r.signals.ppl, r.weight or 0.0))
    d = derived[best.name]
    reason = (
        f"{best.name}: the lowest target-language answer perplexity "
        f"{best.signals.answer_ppl:.3g} among {len(eligible)} of {len(candidates)} candidates that keep English "
        f"(retention {d['english_retention']:.2f}"
        + (f", end-of-turn ratio {d['eot_ratio']:.2f}" if d["eot_ratio"] is not None else "")
        + ")"
    )
    return Choice(best, reason, derived, rejected)
