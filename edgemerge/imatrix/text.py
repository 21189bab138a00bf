"""Calibration text: the bundled texts (one per language, licensed for redistribution, with attribution in
`data/sources.json`) and a user's own files, with a check of their language.

The bundled texts are FLORES-200 `dev` (eu, ca, en; never `devtest`, the held-out evaluation text) and
Universal Dependencies PUD (gl, es), all CC BY-SA: they ship inside the package under their own licence.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgemergeError
from ..evaluate.langid import COMMON_LANGUAGES, detect
from ..limits import read_limited, shown_path
from .collect import Calibration

DATA = Path(__file__).parent / "data"
MAX_TEXT_BYTES = 64 << 20  # a few hundred chunks of 512 tokens are under 2 MB of text
SAMPLE_LINES = 200  # lines of 5+ words whose language is identified
MIN_SHARE = 0.5  # below this share of sampled lines in the target language, the text is said to be another


@functools.cache
def sources() -> dict[str, dict[str, str]]:
    """Language code -> where its bundled text comes from: source, licence, url, by."""
    return json.loads((DATA / "sources.json").read_text(encoding="utf-8"))


def bundled_languages() -> list[str]:
    return sorted(sources())


def bundled_text(lang: str) -> Calibration:
    """The bundled calibration text of `lang`, named as its imatrix records it."""
    src = sources().get(lang)
    if src is None:
        raise EdgemergeError(
            f"there is no bundled calibration text for {lang!r} (there is for {', '.join(bundled_languages())}); "
            "give your own with --text FILE"
        )
    text = (DATA / f"{lang}.txt").read_text(encoding="utf-8")
    return Calibration(f"edgemerge:{lang} ({src['source']}, {src['licence']})", text)


def read_text(path: Path) -> Calibration:
    """A user's calibration text file (UTF-8, at most MAX_TEXT_BYTES), named by its path as llama-imatrix does."""
    raw = read_limited(Path(path), MAX_TEXT_BYTES, "calibration text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgemergeError(
            f"calibration text {shown_path(path)} is not UTF-8 (byte {e.start}); save it as UTF-8"
        ) from None
    return Calibration(str(path), text)


@dataclass(frozen=True)
class LanguageCheck:
    name: str
    lang: str | None  # the language most of its sampled lines are in (None: no line to judge)
    share: float  # the share of sampled lines in `expected`
    expected: str

    @property
    def ok(self) -> bool:
        return self.lang is None or self.share >= MIN_SHARE

    def warning(self) -> str:
        return (
            f"calibration text {self.name} reads as {self.lang}, not {self.expected} "
            f"({100 * self.share:.0f}% of sampled lines in {self.expected})"
        )


def check_language(text: Calibration, expected: str) -> LanguageCheck:
    """Identify the language of up to SAMPLE_LINES lines of 5+ words spread over the text (evaluate.langid)."""
    lines = [ln for ln in text.text.splitlines() if len(ln.split()) >= 5]
    step = max(1, len(lines) // SAMPLE_LINES)
    sample = lines[::step][:SAMPLE_LINES]
    if not sample:
        return LanguageCheck(text.name, None, 0.0, expected)
    found = [detect(ln, candidates=(*COMMON_LANGUAGES, expected)).lang for ln in sample]
    top = max(set(found), key=found.count)
    return LanguageCheck(text.name, top, found.count(expected) / len(found), expected)
