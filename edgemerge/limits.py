"""Bounds on untrusted input, in one place: how much of a file we read, how much of it an error message shows.

Recipes, model folders, GGUF and evaluation files come from strangers. Every parser checks a size or count
against these limits (or against the bytes the file really has) before it allocates or loops, so a small
hostile file fails at once, in little memory, with one short line.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from .errors import EdgemergeError

ECHO_CHARS = 80  # at most this much of an input value appears in an error message
MAX_RECIPE_BYTES = 256 * 1024  # a real recipe is about 1 KB
MAX_YAML_NODES = 10_000  # YAML nodes after alias expansion (a real recipe has about 50)
MAX_YAML_DEPTH = 32  # nesting levels (a real recipe has 4)
MAX_JSON_BYTES = 64 * 1024 * 1024  # config, index and tokenizer JSON (a 256K-token tokenizer.json is ~30 MB)
MAX_MC_BYTES = 64 * 1024 * 1024  # a multiple-choice file (TruthfulQA-multi is ~1 MB per language)
MAX_TEXT_BYTES = 64 * 1024 * 1024  # perplexity text: ~16M tokens, days of CPU at 256 tokens a chunk
# as the safetensors library (MAX_HEADER_SIZE): a header that claims more is refused before it is read
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_THREADS = 1024


class _ShortRepr(reprlib.Repr):
    """reprlib with a bound on the work too: huge integers are described, never converted to digits (Python
    refuses more than 4300 digits, and the conversion is quadratic below that)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, ECHO_CHARS, ECHO_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """A short, one-line repr of an input value for an error message (strings quoted, long ones cut)."""
    text = _REPR.repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def finite_number(name: str, v: Any, *, want: str = "a number") -> float:
    """A finite float from a parsed YAML/JSON number; ValueError naming `name` for a bool, a non-number (`want`:
    what the message asks for) or a value that is not finite (an integer beyond the float range is not). With
    `name` empty the message starts at "must be", for a caller whose error location names the value."""
    subject = f"{name} " if name else ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{subject}must be {want}, got {shown(v)}")  # noqa: TRY004 (pydantic reports ValueError only)
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"{subject}must be a finite number, got {shown(v)}")
    return x


def field_error(loc: tuple[str | int, ...], message: str) -> ValidationError:
    """A pydantic ValidationError at `loc`, for a check across fields in a model validator (pydantic puts a
    plain ValueError there at the top level, which names no field)."""
    error = PydanticCustomError("field", "{message}", {"message": message})
    return ValidationError.from_exception_data("field", [{"type": error, "loc": loc, "input": None}])


def shown_path(path: Path | str, limit: int = 120) -> str:
    """A path as it may appear in a message: printable (bytes that are not UTF-8 escaped), at most `limit`
    characters (the middle cut out)."""
    s = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    if len(s) > limit:
        half = limit // 2
        s = f"{s[:half]}...{s[-half:]}"
    return s


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file no larger than `limit`; anything else (a folder, a device, a pipe, a bigger
    file) is an EdgemergeError naming `what`. Reads at most `limit` + 1 bytes, whatever the file holds."""
    path = Path(path)
    try:
        if path.is_dir():
            raise EdgemergeError(f"{what} {path} is a folder; give a file")
        if not path.is_file():
            kind = "does not exist" if not path.exists() else "is not a regular file"
            raise EdgemergeError(f"{what} {path} {kind}; give a file")
        with open(path, "rb") as f:
            # read() of n bytes allocates n up front: ask for what the file has (and one more, to see growth)
            want = min(os.fstat(f.fileno()).st_size, limit) + 1
            data = f.read(want)
            if len(data) == want <= limit:  # it grew since: read on, still bounded
                data += f.read(limit + 1 - want)
    except OSError as e:
        raise EdgemergeError(f"cannot read {what} {path} ({e.strerror or e})") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise EdgemergeError(f"cannot read {what} {shown(str(path))} ({e})") from None
    if len(data) > limit:
        raise EdgemergeError(f"{what} {path} is larger than {limit} bytes; this cannot be a real one")
    return data


def present(path: Path) -> bool:
    """Whether an optional file of a model folder is there: False when absent, True for a regular file; an
    EdgemergeError for anything else at that name (a folder, a pipe that would block a reader, a device, a
    broken link), which readers downstream would trip on or hang at."""
    path = Path(path)
    if path.is_file():
        return True
    if not path.exists() and not path.is_symlink():
        return False
    kind = "a folder" if path.is_dir() else "a broken link" if not path.exists() else "not a regular file"
    raise EdgemergeError(
        f"{shown(path.name)} in {path.parent} is {kind}; restore the file from the model's source or remove it"
    )


def check_count(flag: str, value: int | None, low: int, high: int | None = None, why: str = "") -> None:
    """A numeric option within [low, high] (None: not given); otherwise one line naming the flag."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise EdgemergeError(f"{flag} {shown(value)}: must be {bound}{why}")


# Size units as the tools users know write them: KB/MB/GB/TB are powers of 1000 (the hf CLI's --max-shard-size,
# huggingface_hub's parse_size_to_int; llama.cpp's gguf-split takes 5G as 5 * 1000^3), KiB..TiB powers of 1024
# (IEC, what llama.cpp logs in MiB); hand-written because parse_size_to_int is private API and has no binary units
SIZE_UNITS = {"": 1, "B": 1} | {
    f"{p}{suffix}": base**i
    for i, p in enumerate("KMGT", 1)
    for suffix, base in (("", 1000), ("B", 1000), ("IB", 1024))
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(flag: str, text: str) -> int:
    """Bytes of a size such as 5GB (5 * 10^9), 800MB, 4.5GiB (4.5 * 2^30), 5G or 123 (bytes); anything else,
    zero included, is one line naming the flag."""
    m = _SIZE.fullmatch(text) if len(text) <= 40 else None
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[unit] < 1:
        raise EdgemergeError(
            f"{flag}: {shown(text)} is not a size; give a number and a unit, e.g. 5GB, 800MB or 4.5GiB "
            "(GB: 10^9 bytes, as the hf CLI counts; GiB: 2^30)"
        )
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of at most `limit` bytes; a broken, huge or too deeply nested file is an EdgemergeError
    naming it."""
    raw = read_limited(path, limit, "JSON file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise EdgemergeError(f"cannot read {path}: not UTF-8 (byte {e.start})") from None
    except ValueError as e:
        raise EdgemergeError(f"cannot read {path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise EdgemergeError(f"cannot read {path}: JSON nested too deeply") from None


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file that must hold an object ({...}), as config and tokenizer files do."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgemergeError(
            f"{path} is not a JSON object ({type(data).__name__} at the top level){what}; restore it from the "
            "model's source"
        )
    return data


def read_optional_object(path: Path) -> dict | None:
    """An optional JSON object file of a model folder (`present`, then `read_json_object`); None when absent."""
    return read_json_object(path) if present(path) else None
