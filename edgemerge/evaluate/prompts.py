"""The built-in evaluation material, one folder per language under `data/<lang>/`:

- `sample.txt`: original text, one passage per line (perplexity and drift);
- `prompts.jsonl`: prompts with their verifiable constraints, `{"id", "prompt", "checks": [...]}`, optionally
  `"quick": true` (part of the --quick set) and `"langid": false` (the expected answer, JSON or one word, is
  too short to identify its language: left out of language fidelity);
- `lang.json`: `{"name", "english_name", "system"}` (the system prompt is written in the language);
- `answers.jsonl`: questions with a short reference answer, `{"id", "question", "answer"}`, the same ids in every
  language (written for edgemerge, aligned by translation): the sweep's teacher-forced answer signals.

Adding a language is adding such a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgemergeError
from ..limits import MAX_TEXT_BYTES, read_limited, shown
from . import checks

DATA_DIR = Path(__file__).resolve().parent / "data"
_FILES = ("sample.txt", "prompts.jsonl", "lang.json", "answers.jsonl")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    quick: bool = False
    langid: bool = True


def available_languages() -> list[str]:
    """Codes of the languages with a complete built-in prompt set."""
    return sorted(d.name for d in DATA_DIR.iterdir() if d.is_dir() and all((d / f).exists() for f in _FILES))


def _lang_dir(lang: str) -> Path:
    if lang not in available_languages():
        raise EdgemergeError(
            f"no built-in prompt set for language {shown(lang)}; available: {', '.join(available_languages())} "
            f"(add one as edgemerge/evaluate/data/{lang}/ with {', '.join(_FILES)})"
        )
    return DATA_DIR / lang


def language_info(lang: str) -> dict[str, str]:
    """The language's `lang.json`: name (in the language), english_name, system (a default system prompt)."""
    return json.loads((_lang_dir(lang) / "lang.json").read_text(encoding="utf-8"))


def load_prompts(lang: str, *, quick: bool = False) -> list[Prompt]:
    """The language's prompts (only those marked `quick` when `quick`), constraints validated."""
    path = _lang_dir(lang) / "prompts.jsonl"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            p = Prompt(
                id=rec["id"],
                prompt=rec["prompt"],
                checks=rec.get("checks", []),
                quick=rec.get("quick", False),
                langid=rec.get("langid", True),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise EdgemergeError(f"{where}: not a prompt record with id, prompt, checks ({e})") from None
        for spec in p.checks:
            checks.validate(spec, where)
        if p.quick or not quick:
            out.append(p)
    return out


@dataclass(frozen=True)
class Answer:
    id: str
    question: str
    answer: str


def load_answers(lang: str) -> list[Answer]:
    """The language's reference answers (`answers.jsonl`)."""
    return read_answers(_lang_dir(lang) / "answers.jsonl")


def read_answers(path: Path) -> list[Answer]:
    """Question/answer records of a JSON-lines file, `{"id", "question", "answer"}` per line."""
    path = Path(path)
    if not path.is_file():
        raise EdgemergeError(f"answers file {path} not found; give a JSON-lines file of id, question, answer")
    try:
        text = read_limited(path, MAX_TEXT_BYTES, "answers file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgemergeError(f"answers file {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            a = Answer(id=str(rec["id"]), question=rec["question"], answer=rec["answer"])
            if not (isinstance(a.question, str) and isinstance(a.answer, str) and a.question and a.answer):
                raise TypeError("question and answer must be non-empty strings")
        except (ValueError, KeyError, TypeError) as e:
            raise EdgemergeError(
                f"{path}:{n}: not an answer record with id, question, answer ({e})"
            ) from None
        out.append(a)
    if not out:
        raise EdgemergeError(f"answers file {path} holds no records; give one JSON object per line")
    return out


def sample_text(lang: str) -> list[str]:
    """The language's built-in sample passages."""
    return read_passages(_lang_dir(lang) / "sample.txt")


def read_passages(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one passage per line."""
    path = Path(path)
    if not path.is_file():
        raise EdgemergeError(f"text file {path} not found; give a UTF-8 file with one passage per line")
    try:
        text = read_limited(path, MAX_TEXT_BYTES, "text file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgemergeError(
            f"text file {path} is not UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8"
        ) from None
    passages = [line.strip() for line in text.splitlines() if line.strip()]
    if not passages:
        raise EdgemergeError(f"text file {path} is empty; give a UTF-8 file with one passage per line")
    return passages
