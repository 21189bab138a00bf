"""llama.cpp's own command-line tools for parity tests, as `tools/build_llama_tools.py` builds them (from the
vendored llama.cpp of the installed llama-cpp-python, into ~/.cache/edgemerge/llama-tools-<version>/bin)."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest


def tools_dir() -> Path:
    root = Path(os.environ.get("EDGEMERGE_CACHE", Path.home() / ".cache" / "edgemerge"))
    return root / f"llama-tools-{version('llama-cpp-python')}"


def need_tool(name: str) -> Path:
    """The built binary `name` (e.g. "llama-quantize"); skips the calling test, with the reason, when absent."""
    p = tools_dir() / "bin" / name
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.skip(f"{name} is not built ({p} is absent): run python tools/build_llama_tools.py")
    return p
