"""Model families we can write as GGUF. Each module of this package registers its family with `@register`;
importing the package imports every module, so adding a family is adding a file (llama.cpp's converter does the
same with `@ModelBase.register`, mlx-lm by finding `models/<model_type>.py`)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from ...errors import EdgemergeError
from ...limits import shown
from ...model_json import read_config
from .base import OUTTYPES, REGISTRY, Arch, check_outtype, load_hparams, register, text_hparams

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def families() -> list[type[Arch]]:
    """Every registered family, in the order of their names (the one list behind help texts and errors)."""
    return sorted(set(REGISTRY.values()), key=lambda fam: fam.title)


def family_table() -> str:
    """The README's table of families (Markdown), made from the registry: `python tools/family_table.py`
    writes it into the README, tests/test_gguf_arch.py keeps the two equal."""
    rows = ["| family | Hugging Face architectures | llama.cpp architecture |", "| --- | --- | --- |"]
    for fam in families():
        names = ", ".join(f"`{name}`" for name in fam.hf_names)
        if fam.note:
            names += f" ({fam.note})"
        rows.append(f"| {fam.title} | {names} | `{gguf.MODEL_ARCH_NAMES[fam.model_arch]}` |")
    return "\n".join(rows) + "\n"


def supported_names() -> str:
    """The Hugging Face architectures we convert, for help texts and messages: "A, B and C"."""
    names = sorted(REGISTRY)
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def arch_for(hparams: dict[str, Any]) -> Arch:
    """The family entry for a config.json (its `architectures[0]`); unsupported ones are a user error."""
    archs = hparams.get("architectures") or []
    name = archs[0] if archs else hparams.get("model_type", "<none>")
    if name not in REGISTRY:
        raise EdgemergeError(
            f"architecture {shown(name)} is not supported for GGUF export; supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name](hparams)


def left_out_of_gguf(model_dir: Path) -> Callable[[str], bool] | None:
    """Which tensors of a model folder its family leaves out of a GGUF (`Arch.keep` False: a vision tower, a
    multi-token-prediction block), as a predicate on tensor names; None when the folder's architecture has no
    family here or its config.json is unusable (the compatibility check then says what is wrong). Reads the
    raw config.json, so no transformers import for a check."""
    try:
        family = arch_for(text_hparams(read_config(model_dir)))
    except (EdgemergeError, TypeError, ValueError):  # e.g. a null count: no family, and the check goes on
        return None
    return lambda name: not family.keep(name)


__all__ = [
    "OUTTYPES",
    "REGISTRY",
    "Arch",
    "arch_for",
    "check_outtype",
    "families",
    "family_table",
    "left_out_of_gguf",
    "load_hparams",
    "register",
    "supported_names",
    "text_hparams",
]
