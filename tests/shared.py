"""The one way tests reach ../shared/data: real test material that a user's clone does not have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CANDIDATES = [
    os.environ.get("EDGEMERGE_SHARED_DATA", ""),
    str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
]


def shared_data() -> Path | None:
    """The shared data folder, or None when absent (a user's clone)."""
    for c in _CANDIDATES:
        if c and (Path(c) / "README.md").exists():
            return Path(c)
    return None


def need_shared(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test, with the reason, when it is absent."""
    root = shared_data()
    if root is None:
        pytest.skip("../shared/data is absent (it exists only on the project's build machines)")
    p = root.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent from ../shared/data")
    return p
