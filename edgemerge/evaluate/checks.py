r"""Automatically verifiable instruction constraints in the style of IFEval (arXiv 2311.07911), as pure functions.

Each check takes the model's answer and the constraint's parameters and returns True when the answer satisfies
it. Checks are strict (IFEval's "strict" variant): the answer is used as generated, only stripped of surrounding
whitespace. Where IFEval has the same instruction, the definitions are IFEval's (lm-eval's
`lm_eval.tasks.ifeval`), except for the deliberate differences listed in the README ("Evaluate in your
language") and asserted in tests/test_ifeval_parity.py. Definitions shared by several checks:

- word: a run of letters, digits or underscores (IFEval's `\w+`, so "l'aigua" and "etxe-aurrean" are two words
  each and a lone dash is none), where a Catalan middle dot joins ("col·legi" is one word).
- bullet line: a line starting with "-", "*" or "•" followed by a space (a Markdown list item, or a bullet).
- numbered line: a line starting with digits followed by "." or ")" and a space.
- sentence: a maximal run of text ending in ".", "!", "?" or "…" (or the end of the answer).
- paragraph: a block of text separated from the next by one or more blank lines.
- quotation marks: straight "...", or the typographic pairs «...» and “...” (standard in eu, ca, gl, es).
"""

from __future__ import annotations

import inspect
import json
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from ..errors import EdgemergeError

_WORD = re.compile(r"\w+(?:·\w+)*")
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?…]+[\"'»”)]*(?=\s|$)")
_QUOTES = {('"', '"'), ("«", "»"), ("“", "”")}


def words(text: str) -> list[str]:
    """The words of `text` (see module docstring)."""
    return _WORD.findall(text)


def _norm(text: str) -> str:
    """Case-folded NFC text, so keyword matching ignores case but not accents."""
    return unicodedata.normalize("NFC", text).casefold()


def _count_keyword(text: str, keyword: str) -> int:
    """Occurrences of `keyword` starting at a word boundary, case-insensitively.

    Letters may follow it: a keyword is a stem, because Basque attaches case endings to words
    (itsasargia -> itsasargiaren) and plurals extend words in every language here.
    """
    return len(re.findall(r"(?<![^\W_])" + re.escape(_norm(keyword)), _norm(text)))


def max_words(answer: str, n: int) -> bool:
    """At most `n` words."""
    return len(words(answer)) <= n


def min_words(answer: str, n: int) -> bool:
    """At least `n` words."""
    return len(words(answer)) >= n


def bullets(answer: str, n: int) -> bool:
    """Exactly `n` bullet lines."""
    return len(_BULLET.findall(answer)) == n


def numbered(answer: str, n: int) -> bool:
    """Exactly `n` numbered lines."""
    return len(_NUMBERED.findall(answer)) == n


def keyword(answer: str, word: str, count: int = 1) -> bool:
    """`word` appears at least `count` times (case-insensitive, starting at a word boundary)."""
    return _count_keyword(answer, word) >= count


def forbidden(answer: str, word: str) -> bool:
    """`word` does not appear (same matching as `keyword`)."""
    return _count_keyword(answer, word) == 0


def lowercase(answer: str) -> bool:
    """No uppercase letter anywhere, and at least one cased letter (`str.islower`, as IFEval; in any language)."""
    return answer.islower()


def uppercase(answer: str) -> bool:
    """No lowercase letter anywhere, and at least one cased letter (`str.isupper`, as IFEval; in any language)."""
    return answer.isupper()


def _strip_fence(answer: str) -> str:
    """The answer without a surrounding ``` fence (opening ```, ```json, ```Json or ```JSON), as IFEval strips it."""
    a = answer.strip()
    for opening in ("```json", "```Json", "```JSON", "```"):
        if a.startswith(opening):
            a = a[len(opening) :]
            break
    return a.removesuffix("```").strip()


def json_object(answer: str, keys: list[str] | None = None) -> bool:
    """The whole answer (optionally inside one ``` fence) is a JSON object holding every key in `keys`."""
    try:
        data = json.loads(_strip_fence(answer))
    except ValueError:
        return False
    return isinstance(data, dict) and all(k in data for k in keys or [])


def starts_with(answer: str, phrase: str) -> bool:
    """The answer begins with `phrase` (case-insensitive)."""
    return _norm(answer.strip()).startswith(_norm(phrase))


def ends_with(answer: str, phrase: str) -> bool:
    """The answer ends with `phrase` (case-insensitive), nothing after it but closing quotation marks.

    Quotation marks around the answer are ignored, as IFEval ignores '"', so a quoted answer can meet both.
    """
    marks = "".join(m for pair in _QUOTES for m in pair)
    return _norm(answer.strip().strip(marks)).endswith(_norm(phrase.strip()))


def no_commas(answer: str) -> bool:
    """No comma at all."""
    return "," not in answer


def title(answer: str) -> bool:
    """A title wrapped in double angular brackets, e.g. <<The lost cat>>: something other than spaces inside."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", answer))


def quoted(answer: str) -> bool:
    """The whole answer is wrapped in double quotation marks ("...", «...» or “...”)."""
    a = answer.strip()
    return len(a) > 1 and (a[0], a[-1]) in _QUOTES


def paragraphs(answer: str, n: int) -> bool:
    """Exactly `n` paragraphs separated by blank lines."""
    blocks = [b for b in re.split(r"\n\s*\n", answer.strip()) if b.strip()]
    return len(blocks) == n


def lines(answer: str, n: int) -> bool:
    """Exactly `n` non-empty lines."""
    return len([x for x in answer.strip().splitlines() if x.strip()]) == n


def max_sentences(answer: str, n: int) -> bool:
    """At most `n` sentences."""
    a = answer.strip()
    count = len(_SENTENCE_END.findall(a))
    if a and not re.search(r"[.!?…][\"'»”)]*$", a):
        count += 1  # a last sentence without final punctuation
    return 0 < count <= n


def postscript(answer: str, marker: str = "P.S.") -> bool:
    """A postscript: a line starting with `marker`, after some text."""
    return re.search(r"\S\s*\n\s*" + re.escape(_norm(marker)), _norm(answer)) is not None


def one_of(answer: str, options: list[str]) -> bool:
    """The answer, without surrounding punctuation and case, is one of `options`."""
    a = _norm(answer.strip().strip(".!¡?¿\"'«»“” "))
    return a in {_norm(o) for o in options}


CHECKS: dict[str, Callable[..., bool]] = {
    "max_words": max_words,
    "min_words": min_words,
    "bullets": bullets,
    "numbered": numbered,
    "keyword": keyword,
    "forbidden": forbidden,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "json": json_object,
    "starts_with": starts_with,
    "ends_with": ends_with,
    "no_commas": no_commas,
    "title": title,
    "quoted": quoted,
    "paragraphs": paragraphs,
    "lines": lines,
    "max_sentences": max_sentences,
    "postscript": postscript,
    "one_of": one_of,
}


def validate(spec: dict[str, Any], where: str) -> None:
    """Fail with a clear message when a constraint is unknown or has wrong parameters."""

    kind = spec.get("type")
    if kind not in CHECKS:
        raise EdgemergeError(f"{where}: unknown check type {kind!r}; known: {', '.join(sorted(CHECKS))}")
    params = {k: v for k, v in spec.items() if k != "type"}
    try:
        inspect.signature(CHECKS[kind]).bind("", **params)
    except TypeError as e:
        raise EdgemergeError(f"{where}: check {kind!r}: {e}") from None


def run_check(answer: str, spec: dict[str, Any]) -> bool:
    """Apply one constraint {"type": name, **params} to an answer."""
    params = {k: v for k, v in spec.items() if k != "type"}
    return CHECKS[spec["type"]](answer, **params)


def describe(spec: dict[str, Any]) -> str:
    """A short label for a constraint, e.g. `max_words=40` or `keyword=itsasargia`."""
    params = [
        str(v) if not isinstance(v, list) else "|".join(map(str, v)) for k, v in spec.items() if k != "type"
    ]
    return spec["type"] + ("=" + ",".join(params) if params else "")
