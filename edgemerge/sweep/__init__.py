"""`sweep`: choose the language weight (and method) by measurement (run.py), by a documented rule (rule.py);
`build --weight auto` sweeps first, then builds the chosen candidate (auto.py)."""

from .auto import build_auto, sweep_out
from .rule import Choice, Row, choose, english_retention
from .run import SWEEP_JSON, SWEEP_MD, SWEEP_PNG, Candidate, SweepOptions, SweepResult, candidates, sweep

__all__ = [
    "SWEEP_JSON",
    "SWEEP_MD",
    "SWEEP_PNG",
    "Candidate",
    "Choice",
    "Row",
    "SweepOptions",
    "SweepResult",
    "build_auto",
    "candidates",
    "choose",
    "english_retention",
    "sweep",
    "sweep_out",
]
