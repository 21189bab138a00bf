"""What shipped files may say about where the inputs were: a hub id, or a local folder's name, never a path.

The GGUF metadata (`edgemerge.recipe`, lineage), the model card, the manifest and a merged folder's
`edgemerge.json` are made to be uploaded; an absolute path in them would publish the user's directory layout
(home folder, user name). The cache key and `state.json` (the work area, never shipped) keep the full paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?$")


def _local_path(ref: str, root: Path | None) -> Path:
    p = Path(ref).expanduser()
    return p if p.is_absolute() else (root or Path.cwd()) / p


def is_local(ref: str, root: Path | None = None) -> bool:
    """Whether `ref` names a local folder (the rule `sources.resolve` applies: an existing path, or anything
    that is not an `owner/name[@revision]` hub id)."""
    return ref.startswith((".", "/", "~")) or not _HF_ID.match(ref) or _local_path(ref, root).exists()


def public_ref(ref: str | None, root: Path | None = None) -> str | None:
    """A hub id as given; a local folder by its name only ("/home/me/models/llama-eu" -> "llama-eu")."""
    if not ref or not is_local(ref, root):
        return ref
    path = _local_path(ref, root)
    name = path.resolve().name if path.exists() else Path(ref).name
    return name or "local-model"


def public_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as written into shipped files: `to_yaml_dict()` with local model paths reduced to names."""
    data = recipe.to_yaml_dict()
    for key in ("instruct", "base"):
        data[key] = public_ref(data[key], recipe.root)
    for lang in data["languages"]:
        lang["model"] = public_ref(lang.get("model"), recipe.root)
    return data


def public_inputs(inputs: dict[str, dict], root: Path | None = None) -> dict[str, dict]:
    """Provenance of the inputs (role -> {"ref", "revision", "files"}) with local refs reduced to names."""
    return {
        role: {**v, "ref": public_ref(v.get("ref"), root)} if isinstance(v, dict) else v
        for role, v in inputs.items()
    }
