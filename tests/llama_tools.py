"""The one way tests reach llama.cpp's own tools (llama-imatrix, llama-quantize, llama-perplexity, llama-gguf-split).

They are built by `python tools/build_llama_tools.py` (minutes of compiling), never by a test: a test that needs
one calls `need_tool(name)` and skips, saying how to build them, when they are absent.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from types import ModuleType

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "build_llama_tools.py"


@functools.cache
def builder() -> ModuleType:
    """tools/build_llama_tools.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_llama_tools", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def need_tool(name: str) -> Path:
    """Path of llama.cpp's `name` built for the installed llama-cpp-python; skips the calling test when absent."""
    try:
        path = builder().tool_path(name)
    except PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed, so there is no llama.cpp version to build tools for")
    if path is None:
        pytest.skip(f"llama.cpp's {name} is not built: run python tools/build_llama_tools.py")
    return path
