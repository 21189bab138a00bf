"""`build --quant auto`: the recipe's quant ladder measured on the merged file, the choice by ladder.py.

After the merge:
1. sizes: llama.cpp's dry run sizes every type of the ladder without writing it (`quantize.quant_sizes`); the
   memory to run each is `resources.eval_memory` of one chat of RUN_CTX tokens. No type within the budget:
   one line naming the closest, exit 2 (before anything is quantized).
2. reference: the unquantized file's log-probabilities on held-out target-language text (the evaluation's
   text, never the calibration's), stored once in the work area (evaluate/reference.py).
3. the types that fit, smallest first: each quantized as the build quantizes (the `quantize TYPE` stage, with
   the importance matrix where the type uses one, computed before the first such type), its drift against the stored reference measured with one
   model in memory (evaluate/drift.py: KLD, top-1 agreement, perplexity ratio), its file deleted if it fails;
   the first that passes is the choice and stops the ladder.
Each score is a cached stage (`ladder TYPE`, keyed by the quant's key and the reference's), so a rerun
quantizes nothing it has measured. The table and the plot go to the card, the manifest and the summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import GateFailed
from ..evaluate import evaluate
from ..files import atomic_output
from ..package.plots import ladder_plot
from ..progress import Progress
from ..quantize import quant_sizes
from ..recipe import QuantAuto
from ..resources import ModelShape, eval_memory
from .ladder import Budget, LadderChoice, Rung, check_budget, choose_quant, gate_misses, ladder_table, order
from .options import plan_space_item
from .state import Stages, drop_stage, stage_key

RUN_CTX = 4096  # the chat a type's memory is planned for: one sequence of 4096 tokens
BUDGET_SLACK = 1.1  # before the merge the sizes are estimates (bits per weight): refuse only a clear miss
LADDER_PNG = "ladder.png"
DRIFT_ONLY = "quant ladder: perplexity and drift only"


@dataclass
class LadderResult:
    rungs: list[Rung]
    choice: LadderChoice
    gate: QuantAuto
    budget: Budget
    lang: str
    plot: Path

    def table(self) -> str:
        return ladder_table(self.rungs, self.choice)

    def to_dict(self) -> dict[str, Any]:
        """What the manifest and --json carry."""
        return {
            "lang": self.lang,
            "budget": {"max_size": self.budget.max_size, "max_ram": self.budget.max_ram, "ram_ctx": RUN_CTX},
            "gate": self.gate.model_dump(),
            "rungs": [r.to_dict() for r in sorted(self.rungs, key=lambda r: r.size)],
            "choice": self.choice.to_dict(),
        }

    def card(self) -> dict[str, Any]:
        """What the model card shows (package.PackageInfo.ladder)."""
        return {
            "markdown": self.table(),
            "reason": self.choice.reason,
            "plot": str(self.plot),
            "lang": self.lang,
            "ctx": RUN_CTX,
            "data": self.to_dict(),
        }


def run_memory(shape: ModelShape, size: int) -> int:
    """Bytes to run a file of `size` bytes for one chat of RUN_CTX tokens (weights, KV cache, buffers)."""
    return sum(eval_memory(replace(shape, file_bytes=size), n_seq=1, n_ctx_seq=RUN_CTX).values())


def estimated_fits(ladder: list[str], budget: Budget, shape: ModelShape, n_params: int) -> list[str]:
    """Before any work: the types the budget may allow by the bits-per-weight estimate, smallest first, with
    10% of slack for the estimate's error (the exact sizes come from llama.cpp after the merge); a budget no
    type can meet is refused here, naming the closest type by the estimate."""
    est = [
        Rung(q, plan_space_item(n_params, q), run_memory(shape, plan_space_item(n_params, q))) for q in ladder
    ]
    loose = Budget(*(None if b is None else int(b * BUDGET_SLACK) for b in (budget.max_size, budget.max_ram)))
    fits = order(est, loose)
    if not fits:
        check_budget(est, budget)  # raises: nothing fits the looser budget, so nothing fits this one
    return [r.quant for r in fits]


def run_ladder(
    stages: Stages,
    *,
    gate: QuantAuto,
    budget: Budget,
    merged: Path,
    merge_key: str,
    quant_files: dict[str, Path],
    quant_keys: dict[str, str],
    make: Callable[[str], None],
    shape: ModelShape,
    lang: str,
    quick: bool,
    threads: int | None,
    title: str,
    progress: Progress | None,
) -> LadderResult:
    """Measure the ladder (module docstring) and return the choice; GateFailed (exit 3) when no type within the
    budget passes the drift gate. `make(type)`: the build's `quantize TYPE` stage (writes quant_files[type])."""
    work = stages.state.work / "ladder"
    work.mkdir(parents=True, exist_ok=True)
    ladder = list(quant_files)
    sizes_file = work / "sizes.json"

    def size_all() -> None:
        sizes = quant_sizes(merged, ladder)
        with atomic_output(sizes_file, force=True) as tmp:
            tmp.write_text(json.dumps(sizes), encoding="utf-8")

    stages.run("ladder sizes", stage_key("ladder sizes", merge_key, ladder), [sizes_file], size_all)
    sizes = json.loads(sizes_file.read_text(encoding="utf-8"))
    rungs = [Rung(q, sizes[q], run_memory(shape, sizes[q])) for q in ladder]
    check_budget(rungs, budget)

    ref = work / "reference.logits"
    ref_key = stage_key("ladder reference", __version__, merge_key, lang, quick)

    def reference() -> None:
        evaluate(
            merged,
            lang,
            save_logits=ref,
            quick=quick,
            skip_chat=DRIFT_ONLY,
            n_threads=threads,
            progress=progress,
        )

    for r in order(rungs, budget):
        q, scores = r.quant, work / f"{r.quant}.json"

        def measure(q: str = q, scores: Path = scores) -> None:
            if "ladder reference" not in stages.records:  # once, before the first type measured
                stages.run("ladder reference", ref_key, [ref], reference)
            make(q)
            rep = evaluate(
                quant_files[q],
                lang,
                ref_logits=ref,
                quick=quick,
                skip_chat=DRIFT_ONLY,
                n_threads=threads,
                progress=progress,
            )
            data = {
                "size": quant_files[q].stat().st_size,
                "kld_mean": rep.kld_mean,
                "top1_agreement": rep.top1_agreement,
                "ppl_ratio": rep.ppl_ratio,
            }
            with atomic_output(scores, force=True) as tmp:
                tmp.write_text(json.dumps(data), encoding="utf-8")

        stages.run(f"ladder {q}", stage_key("ladder", quant_keys[q], ref_key), [scores], measure)
        data = json.loads(scores.read_text(encoding="utf-8"))
        r.size, r.ram = data["size"], run_memory(shape, data["size"])
        r.kld_mean, r.top1_agreement, r.ppl_ratio = (
            data["kld_mean"],
            data["top1_agreement"],
            data["ppl_ratio"],
        )
        if not gate_misses(r, gate) and r in order(rungs, budget):
            break
        drop_stage(stages.state, f"quantize {q}")  # a rejected type's file: one ladder file on disk at a time
    choice = choose_quant(rungs, gate, budget)
    plot = work / LADDER_PNG
    ladder_plot(
        [r.to_dict() for r in rungs],
        choice.chosen,
        plot,
        title=f"{title} (chosen: {choice.chosen or 'none'})",
        max_size=budget.max_size,
        max_kld=gate.max_kld_mean,
        min_top1=gate.min_top1_agreement,
    )
    result = LadderResult(rungs, choice, gate, budget, lang, plot)
    (work / "ladder.md").write_text(result.table() + "\n\n" + choice.reason + "\n", encoding="utf-8")
    if choice.chosen is None:
        raise GateFailed(
            f"--quant auto: {choice.reason}; every score is in {work / 'ladder.md'}: relax the recipe's "
            "quant_auto gate, raise the budget or give --quant"
        )
    return result
