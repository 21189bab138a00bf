"""`build --weight auto`: sweep the recipe's grid, then build the chosen candidate, its sweep in the card."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..build import BuildOptions, BuildResult, Plan, StageEvent, build
from ..errors import GateFailed
from ..progress import Progress
from ..recipe import Recipe
from .run import SWEEP_MD, SWEEP_PNG, Candidate, SweepOptions, SweepResult, candidate_recipe, sweep


def sweep_out(recipe: Recipe, options: BuildOptions) -> Path:
    """The sweep's folder beside the build's: dist/<name> -> dist/<name>-sweep."""
    out = Path(options.out or Path("dist") / recipe.name)
    return out.with_name(out.name + "-sweep")


def build_auto(
    recipe: Recipe,
    options: BuildOptions,
    sweep_options: SweepOptions | None = None,
    *,
    progress: Progress | None = None,
    on_stage: Callable[[StageEvent], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> tuple[SweepResult, BuildResult]:
    """Sweep (its folder `sweep_out` unless given), then build the chosen method and weight; GateFailed (exit 3)
    when no candidate meets the recipe's sweep thresholds, before anything is built."""
    base = SweepOptions(
        out=sweep_out(recipe, options),
        methods=[options.method] if options.method else None,
        lang=options.lang,
        backend=options.backend,
        threads=options.threads,
        force=options.force,
    )
    s = sweep(recipe, sweep_options or base, progress=progress, on_stage=on_stage)
    c = s.choice
    if c.chosen is None:
        raise GateFailed(
            f"--weight auto: {c.reason}; every score is in {s.out / SWEEP_MD}: relax the recipe's sweep thresholds "
            "or give --weight"
        )
    assert c.chosen.method is not None and c.chosen.weight is not None
    chosen = candidate_recipe(
        recipe, Candidate(c.chosen.name, c.chosen.method, c.chosen.weight), name=recipe.name
    )
    info = {"markdown": s.table(), "reason": c.reason, "plot": str(s.out / SWEEP_PNG), "lang": s.lang}
    opts = dataclasses.replace(options, weights=None, method=None, sweep=info)
    return s, build(chosen, opts, progress=progress, on_stage=on_stage, on_plan=on_plan)
