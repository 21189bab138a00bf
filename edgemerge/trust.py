"""Model folders are untrusted input: nothing in them may run code, and loading them never asks a question.

transformers runs Python files shipped with a model when its `config.json` or `tokenizer_config.json` has an
`auto_map` (and asks "Do you wish to run the custom code? [y/N]" on stdin when `trust_remote_code` is not
given). edgemerge refuses such folders before any transformers call (`refuse_custom_code`), passes
`trust_remote_code=False` and `local_files_only=True` on every call, and hides stdin during them (`no_stdin`),
so neither a hostile folder nor a `yes |` pipe can make a payload run.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EdgemergeError
from .limits import read_optional_object

# files transformers reads when it loads a config or a tokenizer from a folder
_CODE_FILES = ("config.json", "tokenizer_config.json")


def _builtin_tokenizer_class(name: str) -> bool:
    """Whether transformers itself defines the tokenizer class `name` (or its Fast variant)."""
    # transformers is heavy to import (seconds): loaded only when a tokenizer or config is read
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not name.isidentifier():
        return False
    for candidate in (name, name + "Fast"):
        try:
            cls = tokenizer_class_from_name(candidate)
        except Exception:  # noqa: BLE001 (any failure to find it means: not a built-in class)
            cls = None
        if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
            return cls.__module__.startswith("transformers.")
    return False


def custom_code_field(folder: Path) -> str | None:
    """The first field of `folder` that would make transformers load code from it ("config.json auto_map",
    "tokenizer_config.json tokenizer_class 'X'"), or None."""
    folder = Path(folder)
    for fname in _CODE_FILES:
        data = read_optional_object(folder / fname)
        if data is None:
            continue
        nested = [(f"{k}.", v) for k, v in data.items() if isinstance(v, dict)]
        for prefix, obj in [("", data), *nested]:
            if "auto_map" in obj:
                return f"{fname} {prefix}auto_map"
            if "custom_pipelines" in obj:
                return f"{fname} {prefix}custom_pipelines"
        cls = data.get("tokenizer_class")
        if cls is not None and (not isinstance(cls, str) or not _builtin_tokenizer_class(cls)):
            return f"{fname} tokenizer_class {str(cls)[:60]!r}"
    return None


def refuse_custom_code(folder: Path, label: str | None = None) -> None:
    """EdgemergeError naming the field when the model folder needs code of its own to load."""
    field = custom_code_field(folder)
    if field is not None:
        raise EdgemergeError(
            f"{label or Path(folder).name}: {field} asks to run code shipped with the model, which edgemerge "
            "never does; use a release of the model that loads with plain transformers classes"
        )


@contextlib.contextmanager
def no_stdin() -> Iterator[None]:
    """stdin reads as empty while a library call runs: no prompt can wait for (or be answered by) a pipe."""
    saved = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved


def load_tokenizer(folder: Path) -> Any:
    """transformers' AutoTokenizer for a local model folder, after refusing folders that carry code."""
    from transformers import AutoTokenizer

    refuse_custom_code(folder)
    with no_stdin():
        return AutoTokenizer.from_pretrained(Path(folder), trust_remote_code=False, local_files_only=True)


def load_config_dict(folder: Path) -> dict[str, Any]:
    """transformers' AutoConfig of a local model folder as a dict, after refusing folders that carry code."""
    from transformers import AutoConfig

    refuse_custom_code(folder)
    with no_stdin():
        return AutoConfig.from_pretrained(
            Path(folder), trust_remote_code=False, local_files_only=True
        ).to_dict()
