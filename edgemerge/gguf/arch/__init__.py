"""Model families we can write as GGUF. Adding a family = adding a module here and one line in `FAMILIES`."""

from __future__ import annotations

from typing import Any

from ...errors import EdgemergeError
from ...limits import shown
from .base import OUTTYPES, Arch, check_outtype, load_hparams
from .llama import LlamaArch
from .qwen2 import Qwen2Arch
from .qwen3 import Qwen3Arch

FAMILIES: tuple[type[Arch], ...] = (LlamaArch, Qwen2Arch, Qwen3Arch)
SUPPORTED: dict[str, type[Arch]] = {name: fam for fam in FAMILIES for name in fam.hf_names}


def arch_for(hparams: dict[str, Any]) -> Arch:
    """The family entry for a config.json (its `architectures[0]`); unsupported ones are a user error."""
    archs = hparams.get("architectures") or []
    name = archs[0] if archs else hparams.get("model_type", "<none>")
    if name not in SUPPORTED:
        raise EdgemergeError(
            f"architecture {shown(name)} is not supported for GGUF export; supported: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[name](hparams)


__all__ = ["OUTTYPES", "SUPPORTED", "Arch", "arch_for", "check_outtype", "load_hparams"]
