"""`edgemerge eval`: a thin shell over edgemerge.evaluate.evaluate and its gates."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EdgemergeError, GateFailed
from ..evaluate import evaluate, language_info
from ..evaluate.gates import gate_results, gates_with
from ..evaluate.perplexity import MIN_CTX
from ..files import atomic_output, output_lock, prepare_output
from ..limits import MAX_THREADS, check_count, shown_path
from ..progress import make_progress
from ..recipe import Gates, load_recipe
from .common import MODEL_OPTION, app, console, err_console, examples, listed, print_json, the_model

# gate field -> its flag (for messages about a bad threshold)
GATE_FLAGS = {
    "min_language_fidelity": "--min-fidelity",
    "min_stop_rate": "--min-stop-rate",
    "min_instruction_following": "--min-instructions",
    "max_perplexity": "--max-perplexity",
    "max_kld_mean": "--max-kld",
    "min_top1_agreement": "--min-top1",
    "max_ppl_ratio": "--max-ppl-ratio",
}
MAX_TOKENS = 1 << 16
MAX_BATCH = 256  # llama.cpp's limit on parallel sequences (LLAMA_MAX_SEQ)


def check_eval_numbers(
    ctx: int | None, mc_limit: int | None, max_tokens: int | None, threads: int | None
) -> None:
    """The numeric flags of `eval`, before any model is loaded (0 or a negative count is never meant)."""

    check_count("--ctx", ctx, MIN_CTX, 1 << 20, " (tokens per perplexity chunk, half of them scored)")
    check_count("--mc-limit", mc_limit, 1, why=" (the number of questions to score)")
    check_count("--max-tokens", max_tokens, 1, MAX_TOKENS)
    check_count("--threads", threads, 1, MAX_THREADS)


def _report_paths(report: Path | None, markdown: Path | None, inputs: list[Path | None]) -> list[Path]:
    """The report files to write, checked before the evaluation runs: a report replaces a file, never a folder
    and never an input of the evaluation."""
    reports = [p for p in (report, markdown) if p is not None]
    for p in reports:
        prepare_output(p, force=True, inputs=inputs, replace_dir=False)
    if len(reports) == 2 and Path(reports[0]).absolute() == Path(reports[1]).absolute():
        raise EdgemergeError(f"--report and --markdown both name {shown_path(reports[0])}; give two files")
    return reports


@contextlib.contextmanager
def _locked(reports: list[Path]):
    """Hold the reports' locks for the whole evaluation: a second eval writing the same report is refused at
    its start, not after minutes of work."""
    with contextlib.ExitStack() as stack:
        for p in reports:
            stack.enter_context(output_lock(p))
        yield


def _write_report(path: Path, text: str, inputs: list[Path | None]) -> None:
    """Write a report whose lock `_locked` holds."""
    with atomic_output(path, force=True, inputs=inputs, replace_dir=False, locked=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _opt(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Gates (exit code 3 when one fails)")


@app.command(
    "eval",
    epilog=examples(
        "edgemerge eval dist/m/m-Q4_K_M.gguf --lang eu --ref dist/m/m-F16.gguf",
        "edgemerge eval m-Q4_K_M.gguf -l eu --quick --json > eval.json",
        "edgemerge eval m-Q4_K_M.gguf -l eu -o eval.json --markdown eval.md",
        "edgemerge eval m-F16.gguf -l eu --save-logits m-F16.logits  # once",
        "edgemerge eval m-Q4_K_M.gguf -l eu --ref-logits m-F16.logits  # per quant",
        "edgemerge eval m.gguf --task eus_trivia,eus_exams_eu --fewshot 5 --data b/",
    ),
)
def eval_(
    model_arg: Annotated[
        Path | None, typer.Argument(help="The GGUF file to evaluate.", metavar="MODEL", show_default=False)
    ] = None,
    lang: Annotated[
        str | None,
        typer.Option(
            "--lang",
            "-l",
            help="Target language (ISO 639-1): eu, ca, gl, es, en. Leave out to run only --task.",
        ),
    ] = None,
    model_opt: Annotated[Path | None, MODEL_OPTION] = None,
    ref: Annotated[
        Path | None,
        typer.Option(
            "--ref", help="Reference GGUF (e.g. the F16 MODEL was quantized from): drift. Run first, alone."
        ),
    ] = None,
    ref_logits: Annotated[
        Path | None,
        typer.Option(
            "--ref-logits",
            help="Drift against log-probabilities stored before (--save-logits, or llama-perplexity "
            "--kl-divergence-base): the reference is not loaded at all.",
        ),
    ] = None,
    save_logits: Annotated[
        Path | None,
        typer.Option(
            "--save-logits",
            help="Store MODEL's log-probabilities over the perplexity text (llama.cpp's kl-divergence-base "
            "format, ~2 bytes per vocabulary entry per scored token), for later --ref-logits runs.",
        ),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option("--text", help="UTF-8 text for perplexity, one passage per line (default: built-in)."),
    ] = None,
    mc: Annotated[
        Path | None,
        typer.Option("--mc", help="Multiple-choice file: TruthfulQA-multi JSON or EusTrivia/EusExams JSONL."),
    ] = None,
    mc_limit: Annotated[
        int | None, typer.Option("--mc-limit", help="Score only the first N questions.")
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="A benchmark as lm-evaluation-harness defines it (repeats or commas for several): eus_trivia, eus_exams_eu "
            "(or one subset, eus_exams_eu_ejadministrari), truthfulqa-multi_mc1 / _mc2 (or _mc1_eu, ...).",
            rich_help_panel="Benchmarks (lm-evaluation-harness format)",
        ),
    ] = None,
    fewshot: Annotated[
        int | None,
        typer.Option(
            "--fewshot",
            help="Few-shot examples per question (lm-eval's --num_fewshot; default: the task's own, 0). "
            "The paper's tables are 5-shot.",
            rich_help_panel="Benchmarks (lm-evaluation-harness format)",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            help="Score only the first N questions of each task (lm-eval's --limit).",
            rich_help_panel="Benchmarks (lm-evaluation-harness format)",
        ),
    ] = None,
    chat_template: Annotated[
        bool,
        typer.Option(
            "--chat-template",
            help="Ask through the GGUF's chat template, few-shot examples as user/assistant turns (lm-eval's "
            "--apply_chat_template --fewshot_as_multiturn, as the paper ran its tables).",
            rich_help_panel="Benchmarks (lm-evaluation-harness format)",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Folder of the benchmarks' files, as README's 'Benchmarks' lays out (eustrivia/, "
            "eusexams_eu/, truthfulqa_multi/LANG/); without it they are fetched from the Hugging Face hub "
            "(the datasets lm-eval reads) into its cache.",
            rich_help_panel="Benchmarks (lm-evaluation-harness format)",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the full report (with every answer) as JSON on stdout.")
    ] = False,
    report_file: Annotated[
        Path | None,
        typer.Option(
            "--report", "-o", help="Also write the full report as JSON to this file.", metavar="FILE"
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option("--markdown", help="Write the metrics as a markdown table (for a model card)."),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Reduced run: 6 prompts, 64 tokens each, one text chunk, 50 MC questions."
        ),
    ] = False,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Token limit per answer (default 256).")
    ] = None,
    ctx: Annotated[
        int | None, typer.Option("--ctx", "-c", help="Perplexity chunk size in tokens (default 256).")
    ] = None,
    system: Annotated[
        bool, typer.Option("--system", help="Send the language's default system prompt with each prompt.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-t", help="CPU threads for llama.cpp (default: the idle cores)."),
    ] = None,
    batch: Annotated[
        int | None, typer.Option("--batch", help="Answers decoded in parallel (default 16).")
    ] = None,
    answers: Annotated[bool, typer.Option("--answers", help="Also print every prompt's answer.")] = False,
    recipe: Annotated[
        str | None,
        _opt("--recipe", "Take the gates from this recipe's eval: section (flags below override)."),
    ] = None,
    min_fidelity: Annotated[float | None, _opt("--min-fidelity", "Minimum language fidelity (0-1).")] = None,
    min_stop_rate: Annotated[float | None, _opt("--min-stop-rate", "Minimum stop rate (0-1).")] = None,
    min_instructions: Annotated[
        float | None, _opt("--min-instructions", "Minimum instruction following (0-1).")
    ] = None,
    max_perplexity: Annotated[float | None, _opt("--max-perplexity", "Maximum perplexity.")] = None,
    max_kld: Annotated[float | None, _opt("--max-kld", "Maximum mean KL divergence vs --ref.")] = None,
    min_top1: Annotated[float | None, _opt("--min-top1", "Minimum top-1 agreement with --ref (0-1).")] = None,
    max_ppl_ratio: Annotated[
        float | None, _opt("--max-ppl-ratio", "Maximum perplexity ratio vs --ref.")
    ] = None,
) -> None:
    """Evaluate a GGUF in the target language with llama.cpp, on this CPU.

    Perplexity on target-language text (llama.cpp's chunking), greedy answers through the GGUF's own chat
    template to built-in prompts in the language: language fidelity, instruction following (verifiable
    constraints) and the share of answers that stop cleanly on EOS/EOT. Optionally multiple choice (--mc) and
    quantization drift against a reference (--ref: KL divergence, top-1 agreement, perplexity ratio).
    A GGUF without a chat template (a base model) gets n/a for the chat metrics. One model is in memory at a time:
    with --ref, the reference runs first and its log-probabilities are kept in a temporary file.
    """

    model = the_model(model_arg, model_opt, "eval")
    tasks = listed(tasks, "--task")
    check_eval_numbers(ctx, mc_limit, max_tokens, threads)
    check_count("--fewshot", fewshot, 0, 1 << 16, " (few-shot examples per question)")
    check_count("--limit", limit, 1, why=" (the number of questions to score per task)")
    check_count("--batch", batch, 1, MAX_BATCH, " (answers decoded in parallel)")
    gates_recipe = load_recipe(recipe) if recipe else None
    gates = gates_recipe.eval if gates_recipe else Gates()
    overrides = {
        "min_language_fidelity": min_fidelity,
        "min_stop_rate": min_stop_rate,
        "min_instruction_following": min_instructions,
        "max_perplexity": max_perplexity,
        "max_kld_mean": max_kld,
        "min_top1_agreement": min_top1,
        "max_ppl_ratio": max_ppl_ratio,
    }
    gates = gates_with(gates, overrides, GATE_FLAGS)
    sys_prompt = language_info(lang)["system"] if system and lang is not None else None
    inputs = [model, ref, ref_logits, text, mc, gates_recipe.file if gates_recipe else None]
    reports = _report_paths(report_file, markdown, inputs)
    if save_logits is not None:
        prepare_output(save_logits, force=True, inputs=inputs + reports, replace_dir=False)

    # a display only on a terminal: in a pipe or a log, rich would leave a blank line before any error
    display = (
        make_progress(err_console, transient=True) if err_console.is_terminal else contextlib.nullcontext()
    )
    with _locked(reports), display as progress:
        report = evaluate(
            model,
            lang,
            ref=ref,
            ref_logits=ref_logits,
            save_logits=save_logits,
            inputs=inputs + reports,
            batch=batch,
            text=text,
            mc=mc,
            quick=quick,
            progress=progress,
            n_threads=threads,
            max_tokens=max_tokens,
            ctx=ctx,
            mc_limit=mc_limit,
            system=sys_prompt,
            tasks=tasks,
            fewshot=fewshot,
            limit=limit,
            data=data,
            chat_template=chat_template,
        )
    if report.memory_note:
        err_console.print(f"warning: {report.memory_note}", highlight=False)
    results = gate_results(report, gates)
    data = report.to_dict()
    data["gates"] = [
        {"gate": r.gate, "metric": r.metric, "threshold": r.threshold, "value": r.value, "passed": r.passed}
        for r in results
    ]

    if json_out:
        print_json(data)
    else:
        out = console
        if answers and report.responses:
            table = Table(title="answers")
            for col in ("id", "lang", "stop", "checks", "answer"):
                table.add_column(col, overflow="fold")
            for r in report.responses:
                failed = [k for k, v in r.checks.items() if not v]
                table.add_row(
                    r.id,
                    r.detected_lang,
                    "yes" if r.stopped else "no",
                    "ok" if not failed else "failed: " + ", ".join(failed),
                    r.answer,
                )
            out.print(table)
        out.print(report.to_table())
        if report.benchmarks and report.lang is not None:
            out.print(report.bench_table())
        if results:
            gt = Table(title="gates")
            gt.add_column("gate")
            gt.add_column("result")
            for r in results:
                verdict = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]skipped[/dim]"}
                gt.add_row(r.describe(), verdict[r.passed])
            out.print(gt)
    if report_file is not None:
        _write_report(report_file, json.dumps(data, indent=2, ensure_ascii=False) + "\n", inputs)
        err_console.print(f"report written to {shown_path(report_file)}", highlight=False)
    if markdown is not None:
        _write_report(markdown, report.to_markdown(), inputs)

    failed = [r.describe() for r in results if r.passed is False]
    if failed:
        raise GateFailed("evaluation gate(s) failed: " + "; ".join(failed))
