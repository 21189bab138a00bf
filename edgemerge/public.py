"""What shipped files may say about where the inputs were: a hub id, or a local folder's name, never a path.

The GGUF metadata (`edgemerge.recipe`, lineage), the model card, the manifest and a merged folder's
`edgemerge.json` are made to be uploaded; an absolute path in them would publish the user's directory layout
(home folder, user name). The cache key and `state.json` (the work area, never shipped) keep the full paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources import is_local, local_path, path_exists

if TYPE_CHECKING:
    from .recipe import Recipe


def public_ref(ref: str | None, root: Path | None = None) -> str | None:
    """A hub id as given; a local folder by its name only ("/home/me/models/llama-eu" -> "llama-eu")."""
    if not ref or not is_local(ref, root):
        return ref
    path = local_path(ref, root)
    name = path.resolve().name if path_exists(path) else Path(ref).name
    return name or "local-model"


def public_recipe(recipe: Recipe, *, merge_only: bool = False) -> dict[str, Any]:
    """The recipe as written into shipped files: `to_yaml_dict()` (or `merge_dict()`, for what the merge wrote:
    the merged model's metadata) with local model paths reduced to names."""
    data = recipe.merge_dict() if merge_only else recipe.to_yaml_dict()
    for key in ("instruct", "base"):
        data[key] = public_ref(data[key], recipe.root)
    for lang in data["languages"]:
        lang["model"] = public_ref(lang.get("model"), recipe.root)
    if data.get("imatrix") not in (None, "auto", "none"):
        data["imatrix"] = Path(data["imatrix"]).name  # a file, by its name (as the models)
    return data


def public_inputs(inputs: dict[str, dict], root: Path | None = None) -> dict[str, dict]:
    """Provenance of the inputs (role -> {"ref", "revision", "files"}) with local refs reduced to names."""
    return {
        role: {**v, "ref": public_ref(v.get("ref"), root)} if isinstance(v, dict) else v
        for role, v in inputs.items()
    }
