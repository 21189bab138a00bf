"""Sanity evaluation of a GGUF in the target language, run by llama.cpp (llama-cpp-python) on a CPU.

`evaluate()` measures perplexity on target-language text (llama.cpp's chunking, perplexity.py), answers the
built-in prompts greedily through the GGUF's chat template (language fidelity, instruction following, clean
stops: answers.py), and optionally multiple-choice accuracy (mc.py) and drift against a reference GGUF (drift.py).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..progress import task
from .prompts import available_languages, language_info, load_prompts, read_passages, sample_text
from .report import EvalReport

DEFAULT_MAX_TOKENS = 256
QUICK_MAX_TOKENS = 64
QUICK_CHUNKS = 1
QUICK_MC = 50
CHAT_CTX = 2048


def evaluate(
    model: Path,
    lang: str,
    *,
    ref: Path | None = None,
    text: Path | None = None,
    mc: Path | None = None,
    quick: bool = False,
    progress=None,
    n_threads: int | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    mc_limit: int | None = None,
    system: str | None = None,
) -> EvalReport:
    """Evaluate `model` in `lang` (see the module docstring); inputs are checked before any model is loaded.

    `quick`: the prompts marked quick (6 per language), `max_tokens` 64, one perplexity chunk, 50 MC questions.
    `system`: a system prompt for the chat turns (default none: the prompt's own language is the only cue).
    """
    from .answers import answer_prompts, scores
    from .drift import drift
    from .mc import evaluate_mc, load_mc
    from .perplexity import DEFAULT_CTX, make_chunks, perplexity
    from .runner import Model, check_gguf

    t0 = time.perf_counter()
    check_gguf(model)
    if ref is not None:
        check_gguf(ref)
    prompts = load_prompts(lang, quick=quick)  # fails first for an unknown language
    passages = read_passages(text) if text is not None else sample_text(lang)
    if mc is not None:
        load_mc(mc)
    max_tokens = max_tokens or (QUICK_MAX_TOKENS if quick else DEFAULT_MAX_TOKENS)
    report = EvalReport(model=Path(model).name, lang=lang, quick=quick, max_tokens=max_tokens)

    with task(progress, f"loading {Path(model).name}", None):
        m = Model(model, n_ctx=CHAT_CTX, n_threads=n_threads)
    with contextlib.closing(m):
        m.check_chat_template()  # a broken template fails now, not after the perplexity run
        chunks = make_chunks(m, passages, ctx or DEFAULT_CTX, max_chunks=QUICK_CHUNKS if quick else None)
        report.ppl_ctx, report.ppl_chunks = chunks.ctx, chunks.n_chunks
        if ref is not None:
            with task(progress, f"loading {Path(ref).name}", None):
                r = Model(ref, n_ctx=CHAT_CTX, n_threads=n_threads)
            with contextlib.closing(r):
                d = drift(m, r, chunks, progress)
            report.ref = Path(ref).name
            report.perplexity, report.tokens = d.perplexity, d.tokens
            report.ref_perplexity, report.ppl_ratio = d.ref_perplexity, d.ppl_ratio
            report.kld_mean, report.kld_max, report.top1_agreement = d.kld_mean, d.kld_max, d.top1_agreement
        else:
            p = perplexity(m, chunks, progress)
            report.perplexity, report.tokens = p.perplexity, p.tokens

        if m.chat_template is not None:
            report.chat_template = True
            report.responses = answer_prompts(
                m, prompts, lang, max_tokens=max_tokens, system=system, progress=progress
            )
            s = scores(report.responses, lang)
            report.language_fidelity, report.stop_rate = s.language_fidelity, s.stop_rate
            report.instruction_following, report.instruction_checks = (
                s.instruction_following,
                s.instruction_checks,
            )

        if mc is not None:
            res = evaluate_mc(m, mc, limit=mc_limit or (QUICK_MC if quick else None), progress=progress)
            report.mc_file, report.mc_accuracy, report.mc_questions = res.file, res.accuracy, res.questions
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


__all__ = ["EvalReport", "available_languages", "evaluate", "language_info", "load_prompts", "sample_text"]
