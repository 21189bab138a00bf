"""Chat metrics from greedy answers to the built-in prompts: language fidelity, instruction following and
clean stops.

    language_fidelity      = share of answers whose detected language is the target, over the prompts whose
                             answers are long enough to identify (not those marked "langid": false)
    instruction_following  = share of prompts whose constraints all hold (IFEval's prompt-level strict accuracy)
    instruction_checks     = share of single constraints that hold (IFEval's instruction-level strict accuracy)
    stop_rate              = share of answers that ended on an end-of-generation token before the token limit
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..progress import task
from ..runtime import Model
from . import checks as checks_mod
from .langid import COMMON_LANGUAGES, detect
from .prompts import Prompt


@dataclass
class Response:
    id: str
    prompt: str
    answer: str
    detected_lang: str
    lang_confidence: float
    stopped: bool
    tokens: int
    checks: dict[str, bool] = field(default_factory=dict)
    langid_counted: bool = True

    @property
    def checks_passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "answer": self.answer,
            "detected_lang": self.detected_lang,
            "langid_counted": self.langid_counted,
            "lang_confidence": self.lang_confidence,
            "stopped": self.stopped,
            "tokens": self.tokens,
            "checks": self.checks,
            "checks_passed": self.checks_passed,
        }


@dataclass
class ChatScores:
    language_fidelity: float | None
    instruction_following: float
    instruction_checks: float
    stop_rate: float


def score_answer(
    prompt: Prompt, answer: str, lang: str, *, stopped: bool = True, tokens: int = 0
) -> Response:
    """Judge one answer: its language (among the common languages and `lang`) and each of its constraints."""
    det = detect(answer, tuple(dict.fromkeys((*COMMON_LANGUAGES, lang))))
    results = {checks_mod.describe(c): checks_mod.run_check(answer, c) for c in prompt.checks}
    return Response(
        prompt.id, prompt.prompt, answer, det.lang, det.confidence, stopped, tokens, results, prompt.langid
    )


def scores(responses: list[Response], lang: str) -> ChatScores:
    """The four chat metrics over `responses` (module docstring)."""
    n = len(responses)
    n_checks = sum(len(r.checks) for r in responses)
    counted = [r for r in responses if r.langid_counted]
    return ChatScores(
        language_fidelity=sum(r.detected_lang == lang for r in counted) / len(counted) if counted else None,
        instruction_following=sum(r.checks_passed for r in responses) / n,
        instruction_checks=sum(sum(r.checks.values()) for r in responses) / n_checks if n_checks else 1.0,
        stop_rate=sum(r.stopped for r in responses) / n,
    )


def answer_prompts(
    model: Model,
    prompts: list[Prompt],
    lang: str,
    *,
    max_tokens: int,
    system: str | None = None,
    progress=None,
    n_seq: int = 1,
) -> list[Response]:
    """Greedy answers through the GGUF's chat template, one user turn each (plus `system` when given),
    decoded as up to `n_seq` parallel sequences (`Model.generate_many`)."""
    turns = [
        model.chat_tokens(
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": p.prompt}]
        )
        for p in prompts
    ]
    with task(
        progress, f"answering prompts ({min(n_seq, len(prompts))} at a time)", len(prompts), unit="prompts"
    ) as advance:
        gens = model.generate_many(turns, max_tokens, n_seq=n_seq, on_done=lambda i, g: advance(1))
    return [
        score_answer(p, g.text.strip(), lang, stopped=g.stopped, tokens=g.tokens)
        for p, g in zip(prompts, gens)
    ]
