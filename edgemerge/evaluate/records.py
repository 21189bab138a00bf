"""Evaluation data files as records: one JSON array of objects, or JSON Lines (one object per line), each record
with where it came from ("file item 3", "file:12") for error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EdgemergeError
from ..limits import MAX_MC_BYTES, read_limited


def read_records(path: Path, what: str) -> list[tuple[Any, str]]:
    """(record, where) for each record of `path` (at most MAX_MC_BYTES); `what` names the file in messages."""
    path = Path(path)
    if not path.is_file():
        raise EdgemergeError(f"{what} {path} not found")
    raw = read_limited(path, MAX_MC_BYTES, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EdgemergeError(f"{what} {path} is not UTF-8") from None
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
        out = [(r, f"{path} item {i + 1}") for i, r in enumerate(records)]
    except RecursionError:
        raise EdgemergeError(f"{what} {path}: JSON nested too deeply") from None
    except ValueError:
        out = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if line.strip():
                try:
                    out.append((json.loads(line), f"{path}:{n}"))
                except (ValueError, RecursionError):
                    raise EdgemergeError(
                        f"{path}:{n}: not JSON (expected one JSON array, or JSON Lines: one object per line)"
                    ) from None
    if not out:
        raise EdgemergeError(f"{what} {path} has no questions")
    return out
