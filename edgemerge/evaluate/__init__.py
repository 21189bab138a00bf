"""Sanity evaluation of a GGUF in the target language, run by llama.cpp (llama-cpp-python) on a CPU.

`evaluate()` measures perplexity on target-language text (llama.cpp's chunking, perplexity.py), answers the
built-in prompts greedily through the GGUF's chat template (language fidelity, instruction following, clean
stops: answers.py), and optionally multiple-choice accuracy (mc.py) and drift against a reference GGUF (drift.py).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import EdgemergeError
from ..memory_plan import plan_file
from ..progress import task
from ..resources import memory_limit
from ..runtime import Model, check_gguf
from .answers import answer_prompts, scores
from .bench import BENCH_CTX, family_rows, prepare_tasks, run_tasks, settings_for
from .drift import DriftMeter, reference_chunks
from .mc import evaluate_mc, load_mc
from .perplexity import DEFAULT_CTX, make_chunks, perplexity
from .prompts import available_languages, language_info, load_prompts, read_passages, sample_text
from .reference import StoredReference, reference_writer
from .report import EvalReport

DEFAULT_MAX_TOKENS = 256
QUICK_MAX_TOKENS = 64
QUICK_CHUNKS = 1
QUICK_MC = 50
CHAT_CTX = 2048
ANSWER_BATCH = 16  # parallel answers: past ~16, a 2-core CPU gains little more (tools/bench_eval.py)


def evaluate(
    model: Path,
    lang: str | None,
    *,
    ref: Path | None = None,
    ref_logits: Path | None = None,
    save_logits: Path | None = None,
    text: Path | None = None,
    mc: Path | None = None,
    quick: bool = False,
    progress=None,
    n_threads: int | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    mc_limit: int | None = None,
    system: str | None = None,
    batch: int | None = None,
    skip_chat: str | None = None,
    inputs: list[Path | None] | None = None,
    tasks: list[str] | None = None,
    fewshot: int | None = None,
    limit: int | None = None,
    data: Path | None = None,
    chat_template: bool = False,
) -> EvalReport:
    """Evaluate `model` in `lang` (see the module docstring); inputs are checked before any model is loaded.

    Drift: against `ref` (a GGUF: its pass runs first, alone, and its log-probabilities are stored in a
    temporary file) or `ref_logits` (a file stored before, by `save_logits` or llama-perplexity
    --kl-divergence-base). One model is in memory at a time. `save_logits`: store this model's log-probabilities
    over the perplexity chunks (a file that is not one of `inputs`).
    `quick`: the prompts marked quick (6 per language), `max_tokens` 64, one perplexity chunk, 50 MC questions.
    `system`: a system prompt for the chat turns (default none: the prompt's own language is the only cue).
    `batch`: answers decoded in parallel (default 16). `skip_chat`: a reason not to answer the prompts (a file
    too large for this machine's memory): the chat metrics are then n/a and the report says why.
    `tasks`: benchmarks in lm-evaluation-harness's format (bench.py) with their data under `data`, `fewshot`
    examples (default: each task's own) and the first `limit` questions of each; `chat_template`: through the
    model's chat template, few-shot examples as turns (lm-eval's --apply_chat_template --fewshot_as_multiturn).
    Without `lang`, only they run.
    """

    t0 = time.perf_counter()
    if ref is not None and ref_logits is not None:
        raise EdgemergeError("give either --ref (a GGUF) or --ref-logits (a stored file), not both")
    if lang is None and not tasks:
        raise EdgemergeError("give --lang (the language to evaluate in) or --task (a benchmark), or both")
    if lang is None and (
        ref is not None or ref_logits is not None or save_logits is not None or mc is not None
    ):
        raise EdgemergeError(
            "--ref, --ref-logits, --save-logits and --mc need --lang (the perplexity text's language)"
        )
    check_gguf(model)
    if ref is not None:
        check_gguf(ref)
    prompts = (
        load_prompts(lang, quick=quick) if lang is not None else []
    )  # fails first for an unknown language
    passages = [] if lang is None else read_passages(text) if text is not None else sample_text(lang)
    if mc is not None:
        load_mc(mc)
    bench = prepare_tasks(tasks, data, fewshot) if tasks else []
    stored = StoredReference(ref_logits) if ref_logits is not None else None
    if stored is not None and ctx is not None and ctx != stored.header.n_ctx:
        stored.close()
        raise EdgemergeError(
            f"--ctx {ctx} differs from the chunks of {stored.header.n_ctx} tokens the reference logits were "
            "computed with; leave --ctx out"
        )
    max_tokens = max_tokens or (QUICK_MAX_TOKENS if quick else DEFAULT_MAX_TOKENS)
    report = EvalReport(model=Path(model).name, lang=lang, quick=quick, max_tokens=max_tokens)
    if batch is None and skip_chat is None:  # the largest batch (at most 16) whose KV cache fits the memory
        planned = plan_file(Path(model), memory_limit())
        batch = planned.batch
        report.memory_note = None if planned.fits else planned.note
    max_chunks = QUICK_CHUNKS if quick else None
    with contextlib.ExitStack() as stack:
        if stored is not None:
            stack.callback(stored.close)
        if ref is not None:  # the reference's pass first, alone; what the comparison needs goes to a file
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgemerge-ref-")))
            with task(progress, f"loading {Path(ref).name}", None):
                r = Model(ref, n_ctx=CHAT_CTX, n_threads=n_threads)
            with contextlib.closing(r):
                chunks = make_chunks(r, passages, ctx or DEFAULT_CTX, max_chunks=max_chunks)
                _scored(r, chunks, progress, f"reference {Path(ref).name}", None, tmp / "ref.logits", [])
            stored = StoredReference(tmp / "ref.logits")
            stack.callback(stored.close)

        with task(progress, f"loading {Path(model).name}", None):
            m = Model(model, n_ctx=max(CHAT_CTX, BENCH_CTX) if bench else CHAT_CTX, n_threads=n_threads)
        stack.callback(m.close)
        report.threads = m.threads
        if lang is None:
            _benchmarks(m, report, bench, fewshot, limit, progress, chat_template)
            report.seconds = round(time.perf_counter() - t0, 2)
            return report
        m.check_chat_template()  # a broken template fails now, not after the perplexity run
        t1 = time.perf_counter()
        if stored is not None:
            tokens = m.tokenize("\n".join(passages), add_special=True)
            chunks = reference_chunks(m, stored, tokens, max_chunks=max_chunks)
        else:
            chunks = make_chunks(m, passages, ctx or DEFAULT_CTX, max_chunks=max_chunks)
        meter = DriftMeter(stored) if stored is not None else None
        label = "perplexity and drift" if meter is not None else "perplexity"
        p = _scored(m, chunks, progress, label, meter, save_logits, inputs or [])
        if meter is not None:
            d = meter.result()
            report.ref = Path(ref).name if ref is not None else Path(ref_logits).name
            report.ref_perplexity, report.ppl_ratio = d.ref_perplexity, d.ppl_ratio
            report.kld_mean, report.kld_max, report.top1_agreement = d.kld_mean, d.kld_max, d.top1_agreement
        report.perplexity, report.tokens = p.perplexity, p.tokens
        report.ppl_ctx, report.ppl_chunks = chunks.ctx, chunks.n_chunks
        report.ppl_seconds = round(time.perf_counter() - t1, 2)

        if m.chat_template is not None and skip_chat is not None:
            report.chat_skipped = skip_chat
        elif m.chat_template is not None:
            report.chat_template = True
            report.answer_batch = min(batch or ANSWER_BATCH, len(prompts))
            t2 = time.perf_counter()
            report.responses = answer_prompts(
                m,
                prompts,
                lang,
                max_tokens=max_tokens,
                system=system,
                progress=progress,
                n_seq=report.answer_batch,
            )
            report.answer_seconds = round(time.perf_counter() - t2, 2)
            s = scores(report.responses, lang)
            report.language_fidelity, report.stop_rate = s.language_fidelity, s.stop_rate
            report.instruction_following, report.instruction_checks = (
                s.instruction_following,
                s.instruction_checks,
            )

        if mc is not None:
            res = evaluate_mc(m, mc, limit=mc_limit or (QUICK_MC if quick else None), progress=progress)
            report.mc_file, report.mc_accuracy, report.mc_questions = res.file, res.accuracy, res.questions
        if bench:
            _benchmarks(m, report, bench, fewshot, limit, progress, chat_template)
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _benchmarks(
    m: Model, report: EvalReport, bench, fewshot: int | None, limit: int | None, progress, chat: bool
) -> None:
    """Run the prepared benchmarks on `m` and put their rows and settings in `report`."""
    t = time.perf_counter()
    results = run_tasks(m, bench, limit, progress, chat)
    report.benchmarks = [r.row() for r in results]
    families = family_rows(results)
    for fam in families:  # a family's line before its subsets' lines
        first = next(i for i, b in enumerate(report.benchmarks) if b["family"] == fam["task"])
        report.benchmarks.insert(first, fam)
    report.bench_settings = asdict(settings_for(bench, fewshot, limit, chat))
    report.bench_seconds = round(time.perf_counter() - t, 2)


def _scored(model, chunks, progress, label: str, meter, save: Path | None, inputs: list[Path | None]):
    """The perplexity pass of `model` over `chunks`: each chunk compared by `meter` (drift.DriftMeter) when
    given, and its log-probabilities stored in `save` (reference.py) when given, a file written once the pass
    is complete and never one of `inputs`."""

    with contextlib.ExitStack() as stack:
        write = None
        if save is not None:
            args = (save, chunks.ctx, model.n_vocab, chunks.tokens, chunks.n_chunks)
            write = stack.enter_context(reference_writer(*args, inputs=inputs))

        def on_chunk(i, logits, targets):
            if meter is not None:
                meter(i, logits, targets)
            if write is not None:
                write(logits, targets)

        return perplexity(model, chunks, progress, on_chunk=on_chunk, label=label)


__all__ = ["EvalReport", "available_languages", "evaluate", "language_info", "load_prompts", "sample_text"]
