"""`edgemerge build`: recipe -> merged GGUF -> quants -> eval -> a folder ready to upload (or the offline demo)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from ..build import BuildOptions, StageEvent, check_options, choose_recipe
from ..build import build as run_build
from ..build.ladder import COLUMNS as LADDER_COLUMNS
from ..build.ladder import Budget, row_cells
from ..errors import EdgemergeError, GateFailed
from ..files import human_bytes
from ..limits import MAX_THREADS, check_count, parse_size
from ..package import LADDER_PLOT
from ..package.info import modelfile_gguf
from ..progress import make_progress
from ..sweep import build_auto
from .common import app, console, err_console, examples, listed, numbers, print_json

DEMO_WARNING = (
    "[bold]Offline demo.[/bold] edgemerge generates a tiny model family itself (base, instruct and a language "
    "model: a few million parameters, trained for seconds) and runs every real stage on it: merge, GGUF, "
    "llama.cpp quantize, llama.cpp eval, packaging. The models are tiny and their answers meaningless; the "
    "gates are reported but do not fail the demo."
)


def quant_budget(quant: list[str] | None, max_size: str | None, max_ram: str | None) -> Budget | None:
    """--quant auto's budget (None without auto); a size flag without auto, or a malformed size, is refused."""
    if listed(quant, "--quant") != ["auto"]:
        given = [flag for flag, v in (("--max-size", max_size), ("--max-ram", max_ram)) if v is not None]
        if given:
            raise EdgemergeError(
                f"{' and '.join(given)}: a budget for --quant auto; add --quant auto or leave it out"
            )
        return None
    return Budget(
        max_size=None if max_size is None else parse_size("--max-size", max_size),
        max_ram=None if max_ram is None else parse_size("--max-ram", max_ram),
    )


def _weights(values: list[str] | None) -> list[float] | None:
    if values and ",".join(values).strip().lower() == "auto":
        return None  # build --weight auto: the sweep chooses
    return numbers(values, "--weight")


def _o(*flags: str, help: str, metavar: str | None = None):
    return typer.Option(*flags, help=help, metavar=metavar)


@app.command(
    epilog=examples(
        "edgemerge build --demo  # offline, a tiny generated model family",
        "edgemerge build --lang eu  # the bundled recipe qwen3-8b-eu",
        "edgemerge build --recipe my-eu.yaml -q Q4_K_M,Q5_K_M -q Q8_0 -o dist/mine",
        "edgemerge build --lang eu --weight auto  # sweep the weight first",
        "edgemerge build --lang eu --quant auto --max-size 5GB  # measured choice",
        "edgemerge build --lang eu --json > summary.json",
    )
)
def build(
    lang: Annotated[
        list[str] | None,
        _o(
            "--lang",
            "-l",
            help="Target language(s): eu picks its bundled recipe (edgemerge recipes lists them); several "
            "(eu,ca,gl,es) pick the multilingual one.",
            metavar="CODE[,CODE...]",
        ),
    ] = None,
    recipe: Annotated[str | None, _o("--recipe", help="A recipe YAML file or bundled recipe name.")] = None,
    quant: Annotated[
        list[str] | None,
        _o(
            "--quant",
            "-q",
            help="llama.cpp types to quantize to (default: the recipe's), e.g. Q4_K_M,Q8_0 or -q Q4_K_M -q Q8_0; "
            "auto: the smallest type of the recipe's quant ladder within --max-size/--max-ram whose drift from "
            "F16 on held-out target-language text passes the recipe's quant_auto gate.",
            metavar="TYPE[,TYPE...]|auto",
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        _o(
            "--max-size",
            help="With --quant auto: the largest file to ship, e.g. 5GB (10^9 bytes), 4.5GiB, 800MB.",
            metavar="SIZE",
        ),
    ] = None,
    max_ram: Annotated[
        str | None,
        _o(
            "--max-ram",
            help="With --quant auto: the memory the file may need to run one 4096-token chat (weights, KV cache, "
            "buffers), e.g. 8GB.",
            metavar="SIZE",
        ),
    ] = None,
    out: Annotated[Path | None, _o("--out", "-o", help="Output folder (default dist/<recipe name>).")] = None,
    weight: Annotated[
        list[str] | None,
        _o(
            "--weight",
            help="Language weight(s): one for all, or one per language in recipe order; auto: sweep the recipe's "
            "grid first and build the candidate its rule chooses (edgemerge sweep --help).",
            metavar="W[,W...]|auto",
        ),
    ] = None,
    method: Annotated[
        str | None, _o("--method", help="Merge method (default: the recipe's), e.g. ties.")
    ] = None,
    imatrix: Annotated[
        str | None,
        _o(
            "--imatrix",
            help="Importance matrix for the quants: auto (computed on the recipe's languages and English), none, "
            "or a file (default: the recipe's, auto).",
        ),
    ] = None,
    backend: Annotated[str, _o("--backend", help="Merge backend: auto, torch or mlx.")] = "auto",
    outtype: Annotated[str, _o("--outtype", help="Unquantized GGUF type: f16 or bf16.")] = "f16",
    eval_lang: Annotated[
        str | None, _o("--eval-lang", help="Evaluation language (default: the recipe's first).")
    ] = None,
    skip_eval: Annotated[bool, _o("--skip-eval", help="Build and package without evaluating.")] = False,
    quick_eval: Annotated[
        bool, _o("--quick-eval", help="The reduced eval set (under a minute per file).")
    ] = False,
    compare_parents: Annotated[
        bool,
        _o("--compare-parents", help="Also evaluate the instruct model alone, to show what the merge gains."),
    ] = False,
    force: Annotated[
        bool, _o("--force", help="Replace another build in the output folder, or rebuild every stage.")
    ] = False,
    demo: Annotated[
        bool, _o("--demo", help="Offline demo on a tiny generated model family (no network).")
    ] = False,
    eval_all: Annotated[
        bool,
        _o(
            "--eval-all", help="Answer the prompts with every file, even one too large for the memory (slow)."
        ),
    ] = False,
    skip_chat_eval: Annotated[
        bool, _o("--skip-chat-eval", help="Evaluate perplexity and drift only, no chat answers.")
    ] = False,
    threads: Annotated[
        int | None, _o("--threads", "-t", help="CPU threads for llama.cpp (default: the cores idle now).")
    ] = None,
    json_out: Annotated[bool, _o("--json", help="Print the build summary as JSON on stdout.")] = False,
) -> None:
    """Build a tested, shippable offline assistant: merge, GGUF, quantize, evaluate, package.

    Stages are cached: rerun the same command after an interruption and it resumes where it stopped.
    The files are named as on the hub: NAME-F16.gguf, NAME-Q4_K_M.gguf.
    """

    check_count("--threads", threads, 1, MAX_THREADS)
    codes = listed(lang, "--lang")
    budget = quant_budget(quant, max_size, max_ram)
    options = BuildOptions(
        out=out,
        quants=None if budget is not None else listed(quant, "--quant"),
        quant_auto=budget,
        weights=_weights(weight),
        method=method,
        imatrix=imatrix if imatrix in (None, "auto", "none") else str(Path(imatrix).expanduser().absolute()),
        backend=backend,
        outtype=outtype,
        lang=eval_lang or (codes[0] if codes and len(codes) == 1 else None),
        skip_eval=skip_eval,
        quick_eval=quick_eval,
        compare_parents=compare_parents,
        force=force,
        demo=demo,
        threads=threads,
        eval_all=eval_all,
        skip_chat_eval=skip_chat_eval,
    )
    check_options(
        options, lang=eval_lang is not None
    )  # a typo fails before the demo family is trained or a model downloaded
    progress = make_progress(err_console)
    family_seconds = 0.0
    if demo and recipe is None:
        if err_console.is_terminal:
            err_console.print(Panel(DEMO_WARNING, border_style="yellow"))
        else:  # a panel is as wide as the console: in a log, one plain paragraph
            err_console.print(DEMO_WARNING, soft_wrap=True)
        start = time.perf_counter()
        with progress:  # the demo family is trained on first use: show it
            r = choose_recipe(codes, recipe, demo=demo, progress=progress)
        family_seconds = time.perf_counter() - start
        err_console.print(
            f"[green]✓ demo family[/green] {family_seconds:.1f} s ({r.root}: generated once, then reused)",
            highlight=False,
        )
    else:
        r = choose_recipe(codes, recipe, demo=demo)

    def on_stage(e: StageEvent) -> None:
        if not e.done:
            progress.console.print(f"[bold]▶ {e.name}[/bold]", highlight=False)
        elif e.record is not None and e.record.cached:
            progress.console.print(f"[dim]↷ {e.name}: done earlier, reused[/dim]", highlight=False)
        elif e.record is not None:
            progress.console.print(f"[green]✓ {e.name}[/green] {e.record.seconds:.1f} s", highlight=False)

    def on_plan(plan) -> None:
        progress.console.print(f"disk plan: the build {plan.describe()}", highlight=False)
        if plan.memory is not None:
            lines = plan.memory.lines()
            progress.console.print("memory plan: " + "\n  ".join(lines), highlight=False)

    with progress:
        if weight and options.weights is None:  # --weight auto
            swept, result = build_auto(r, options, progress=progress, on_stage=on_stage, on_plan=on_plan)
            progress.console.print(
                f"sweep: {swept.choice.reason} (every score: {swept.out})", highlight=False
            )
        else:
            result = run_build(r, options, progress=progress, on_stage=on_stage, on_plan=on_plan)

    if json_out:
        print_json(result.to_dict())
    else:
        _print_summary(result, family_seconds)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if result.demo:
        err_console.print(
            "[yellow]Demo models are tiny and their answers meaningless; gates are reported, not enforced.[/yellow]"
        )
    elif result.gate_failures:
        failed = "; ".join(f"{f}: {', '.join(g)}" for f, g in result.gate_failures.items())
        raise GateFailed(
            f"evaluation gates failed ({failed}); the files are in {result.out} but miss the recipe's thresholds"
        )


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _print_summary(result, family_seconds: float = 0.0) -> None:
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("time", justify="right")
    stages.add_column("")
    for name, rec in result.stages.items():
        stages.add_row(name, f"{rec.seconds:.1f} s", "reused" if rec.cached else "")
    console.print(stages)

    files = Table(title=f"{result.out}" + (" (demo)" if result.demo else ""))
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("perplexity", justify="right")
    files.add_column("fidelity", justify="right")
    files.add_column("instructions", justify="right")
    files.add_column("stops", justify="right")
    files.add_column("KLD vs F16", justify="right")
    files.add_column("gates")
    evals = result.evals
    for f in result.files:
        rep = evals.get(f.name)
        if rep is None:
            files.add_row(f.name, human_bytes(f.stat().st_size), *[""] * 6)
            continue
        failed = result.gate_failures.get(f.name)
        gate = "[red]failed[/red]" if failed else "[green]passed[/green]"
        files.add_row(f.name, human_bytes(f.stat().st_size), *_metrics(rep), gate)
    for name, rep in result.parent_evals.items():
        files.add_row(f"{name} (parent, for comparison)", "", *_metrics(rep), "")
    console.print(files)
    if result.ladder is not None:
        _print_ladder(result.ladder)
    for f, failed in result.gate_failures.items():
        console.print(f"[red]gate failed[/red] {f}: " + "; ".join(failed), highlight=False)
    console.print(
        f"[bold]{result.out}[/bold] is ready: model card README.md, Modelfile, eval.json, manifest.json. "
        f"Built in {result.seconds:.0f} s{_before(family_seconds)}. Next:",
        highlight=False,
    )
    for line in next_steps(result):
        console.print(
            f"  {line}", highlight=False, markup=False, soft_wrap=True
        )  # commands to copy: unbroken


def _print_ladder(ladder) -> None:
    table = Table(title=f"quant ladder ({ladder.budget.describe()}; drift on held-out {ladder.lang} text)")
    for c in LADDER_COLUMNS:
        table.add_column(c, justify="left" if c in ("type", "verdict") else "right")
    for r in sorted(ladder.rungs, key=lambda r: r.size):
        cells = row_cells(r, ladder.choice)
        table.add_row(*cells, style="bold" if r.quant == ladder.choice.chosen else None)
    console.print(table)
    console.print(f"quant: {ladder.choice.reason} (plot: {LADDER_PLOT} in the folder)", highlight=False)


def _before(family_seconds: float) -> str:
    """The demo family's generation, which happens before the build and is not in its time."""
    return f", after {family_seconds:.0f} s generating the demo family" if family_seconds >= 1 else ""


def next_steps(result) -> list[str]:
    """The commands that use the folder: chat with the file the Modelfile runs, load it into Ollama, upload it."""
    ggufs = [f.name for f in result.files if f.suffix == ".gguf" and not f.name.endswith(".imatrix.gguf")]
    run = result.out / modelfile_gguf(ggufs)
    name = result.recipe.name.lower()
    return [
        f"edgemerge chat {run} --lang {result.lang}",
        f"ollama create {name} -f {result.out / 'Modelfile'} && ollama run {name}",
        f"edgemerge publish {result.out} --repo YOUR-NAME/{result.recipe.name}",
    ]


def _metrics(rep) -> list[str]:
    ppl = "n/a" if rep.perplexity is None else f"{rep.perplexity:.2f}"
    kld = getattr(rep, "kld_mean", None)
    return [
        ppl,
        _pct(rep.language_fidelity),
        _pct(rep.instruction_following),
        _pct(rep.stop_rate),
        "" if kld is None else f"{kld:.4f}",
    ]
