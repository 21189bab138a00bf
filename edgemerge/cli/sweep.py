"""`edgemerge sweep`: merge, quantize and score every candidate weight (and method), then choose by the recipe's rule."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..build import StageEvent
from ..errors import GateFailed
from ..limits import MAX_THREADS, check_count
from ..progress import make_progress
from ..recipe import load_recipe
from ..sweep import SWEEP_MD, SweepOptions
from ..sweep import sweep as run_sweep
from ..sweep.run import COLUMNS, row_cells
from .common import app, console, err_console, examples, listed, numbers, print_json


@app.command(
    epilog=examples(
        "edgemerge sweep my-recipe.yaml",
        "edgemerge sweep my-recipe.yaml --weights 0.25,0.5,1.0 --methods linear --fast",
        "edgemerge build --recipe my-recipe.yaml --weight auto  # sweep, then build",
    )
)
def sweep(
    recipe: Annotated[
        str, typer.Argument(help="A recipe YAML file or bundled recipe name.", metavar="RECIPE")
    ],
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights",
            help="Language weights to try, e.g. 0.25,0.5,0.75,1.0,1.25 (default: the recipe's sweep block).",
            metavar="W[,W...]",
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods",
            help="Merge methods to try, e.g. task_arithmetic,linear.",
            metavar="METHOD[,METHOD...]",
        ),
    ] = None,
    lang: Annotated[
        str | None, typer.Option("--lang", "-l", help="Target language (default: the recipe's first).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Sweep folder (default dist/<recipe name>-sweep).")
    ] = None,
    eval_quant: Annotated[
        str, typer.Option("--eval-quant", help="Type each candidate is scored as.")
    ] = "Q8_0",
    fast: Annotated[
        bool, typer.Option("--fast", help="Perplexities and reference answers only, no greedy answers.")
    ] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep each candidate's GGUF under OUT/candidates.")
    ] = False,
    text: Annotated[
        Path | None, typer.Option("--text", help="Held-out target-language text, one passage per line.")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="Merge backend: auto, torch or mlx.")] = "auto",
    executor: Annotated[
        str, typer.Option("--executor", help="Where candidates run: local (one after another).")
    ] = "local",
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-t", help="CPU threads for llama.cpp (default: the cores idle now)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Redo every candidate (default: reuse the scored ones).")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print every score and the choice as JSON on stdout.")
    ] = False,
) -> None:
    """Choose the language weight by measurement: every candidate merged to GGUF, quantized, scored with llama.cpp
    on held-out text and reference answers (target language and English), the parents beside them; the recipe's
    rule chooses (exit 3 when no candidate meets it). Writes sweep.json, sweep.md and sweep.png."""

    check_count("--threads", threads, 1, MAX_THREADS)
    options = SweepOptions(
        out=out,
        weights=numbers(weights, "--weights"),
        methods=listed(methods, "--methods"),
        lang=lang,
        eval_quant=eval_quant,
        fast=fast,
        keep=keep,
        text=text,
        backend=backend,
        threads=threads,
        force=force,
        executor=executor,
    )
    r = load_recipe(recipe)
    progress = make_progress(err_console)

    def on_stage(e: StageEvent) -> None:
        if e.done and e.record is not None:
            how = "reused" if e.record.cached else f"{e.record.seconds:.1f} s"
            progress.console.print(f"[green]✓ {e.name}[/green] {how}", highlight=False)

    with progress:
        result = run_sweep(r, options, progress=progress, on_stage=on_stage)
    if json_out:
        print_json(result.to_dict())
    else:
        _print(result)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if result.choice.chosen is None:
        raise GateFailed(f"{result.choice.reason}; every score is in {result.out / SWEEP_MD}")


def _print(result) -> None:
    t = Table(title=f"sweep of {result.recipe.name} in {result.lang}")
    t.add_column("model")
    for _, label, _fmt in COLUMNS:
        t.add_column(label, justify="right")
    t.add_column("verdict")
    for row in result.rows:
        cells, verdict = row_cells(row, result.choice)
        t.add_row(f"[bold]{row.name}[/bold]" if verdict == "chosen" else row.name, *cells, verdict)
    console.print(t)
    console.print(f"[bold]{result.choice.reason}[/bold]", highlight=False, soft_wrap=True)
    console.print(f"{result.out}: sweep.json, sweep.md, sweep.png. Next:", highlight=False)
    if result.choice.chosen is not None:
        c = result.choice.chosen
        recipe = result.recipe.file or result.recipe.name
        console.print(
            f"  edgemerge build --recipe {recipe} --method {c.method} --weight {c.weight:g}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
