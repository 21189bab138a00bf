"""Offline language identification with py3langid (a maintained fork of langid.py; its model ships in the wheel).

py3langid knows 97 languages, among them eu, ca, gl, es, pt, fr, it and en. By default the choice is restricted
to `COMMON_LANGUAGES` (plus any code the caller adds): with all 97, short Catalan or Spanish answers are sometimes
labelled Occitan or Aragonese, which no assistant we evaluate answers in. Measured on the real sentences of 5+
words in ../shared/data/text (README, section "Evaluation"): 98.9% to 100% for each of eu, ca, gl, es, en.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from ..errors import EdgemergeError

COMMON_LANGUAGES: tuple[str, ...] = (
    "eu", "ca", "gl", "es", "pt", "fr", "it", "en", "de", "nl", "pl", "ro", "ru", "uk", "cs", "sv", "da", "no",
    "fi", "hu", "tr", "el", "zh", "ja", "ko", "ar", "hi", "id", "vi",
)  # fmt: skip
UNDETERMINED = "und"  # ISO 639-2 code for "undetermined": text with no letters at all
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Detection:
    lang: str
    confidence: float


@functools.lru_cache(maxsize=8)
def _identifier(candidates: tuple[str, ...] | None):

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if candidates:
        unknown = sorted(set(candidates) - set(ident.labels))
        if unknown:
            raise EdgemergeError(
                f"language identification does not know {', '.join(unknown)}; "
                f"known codes: {', '.join(sorted(ident.labels))}"
            )
        ident.set_languages(list(candidates))
    return ident


def known_languages() -> list[str]:
    """ISO 639-1 codes the identifier can output."""
    return sorted(_identifier(None).labels)


def detect(text: str, candidates: Iterable[str] | None = COMMON_LANGUAGES) -> Detection:
    """The most likely language of `text` among `candidates` (None: all 97) and its probability.

    The probability is py3langid's softmax over its naive-Bayes scores. Text without any letter gives `und`.
    """
    if not _LETTER.search(text):
        return Detection(UNDETERMINED, 0.0)
    key = tuple(sorted(set(candidates))) if candidates else None
    lang, conf = _identifier(key).classify(text)
    return Detection(lang, float(conf))
