"""Python child processes that run one function of this copy of edgemerge.

Used where work must be stoppable or contained: llama.cpp's quantizer (no abort callback) and the chat-template
renderer (time and memory bounds). `-I` isolates the child (no user site-packages, no PYTHON* variables, no
current folder on the path), so nothing but this package and the standard environment is importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def child_command(module: str, function: str, *args: str) -> list[str]:
    """The argv of a child that runs `module.function(*args)` and exits with its return value."""
    code = (
        f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
        f"from {module} import {function}; sys.exit({function}(*sys.argv[1:]))"
    )
    return [sys.executable, "-I", "-c", code, *args]
