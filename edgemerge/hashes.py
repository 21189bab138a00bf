"""File hashes: sha256 of a whole file, with a progress bar when the file is big enough to make people wait."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .progress import Progress, task

_SHOWN = 256 << 20  # files above this size get a progress bar (16 GB take about a minute)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """sha256 of a file, as hex."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        if progress is None or size <= _SHOWN:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        with task(progress, f"sha256 {Path(path).name}", size) as advance:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                advance(len(block))
        return h.hexdigest()
