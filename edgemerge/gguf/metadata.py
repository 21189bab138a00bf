"""What a GGUF says about itself: name, languages, license, lineage (`general.base_model.N.*`) and the recipe.

Written through gguf-py's `Metadata.set_gguf_meta_model`, so the keys are the standard ones llama.cpp, Ollama
and the Hugging Face hub read. A merge's `GGUFMetadata` is made from its recipe by `pipeline.gguf_metadata`;
without one (a plain `export`), the fields come from the model folder's README model card, as llama.cpp's
converter does it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf

RECIPE_KEY = "edgemerge.recipe"


def is_repo_id(ref: str) -> bool:
    """Whether `ref` is a Hugging Face repo id of the form owner/name (huggingface_hub's own rule)."""
    # huggingface_hub takes a fifth of a second to import: only a merge's lineage needs this
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return ref.count("/") == 1


@dataclass
class Lineage:
    """One model the GGUF was made from: `ref` is an HF id (owner/name[@rev]) or a local folder."""

    ref: str
    role: str  # "instruct" | "base" | "language <code>"
    local: bool = False  # `ref` is a local folder (written by its name only, see public.py)

    def to_gguf(self) -> dict[str, str]:
        entry: dict[str, str] = {"description": self.role}
        if self.local or not is_repo_id(self.ref.partition("@")[0]):
            entry["name"] = Path(self.ref).name or self.ref
            return entry
        ref, _, revision = self.ref.partition("@")
        org, name = ref.split("/", 1)
        entry.update(name=name, organization=org, repo_url=f"https://huggingface.co/{ref}")
        if revision:
            entry["version"] = revision
        return entry


@dataclass
class GGUFMetadata:
    """Descriptive keys for a GGUF file (all optional)."""

    name: str | None = None
    languages: list[str] = field(default_factory=list)
    license: str | None = None
    description: str | None = None
    lineage: list[Lineage] = field(default_factory=list)
    recipe_yaml: str | None = None
    tags: list[str] = field(default_factory=list)

    def to_gguf_metadata(self, model_dir: Path, total_params: int) -> gguf.Metadata:
        """A gguf-py Metadata: our fields over what the model card in `model_dir` says.

        With a lineage (a merge), the card is not read: `model_dir` is then a parent's folder (fused path) or
        the merged folder (two-step path), and either card would describe another model; skipping it also
        keeps the fused and two-step files byte-identical."""
        card_dir = None if self.lineage else Path(model_dir)
        meta = gguf.Metadata.load(None, card_dir, self.name, total_params)
        if self.name:
            meta.name = self.name
            # the card's naming fields describe the source model, not this one
            meta.basename = meta.finetune = meta.version = None
        if self.languages:
            meta.languages = list(self.languages)
        if self.license:
            meta.license = self.license
        if self.description:
            meta.description = self.description
        if self.lineage:
            meta.base_models = [entry.to_gguf() for entry in self.lineage]
        if self.tags:
            meta.tags = list(dict.fromkeys([*(meta.tags or []), *self.tags]))
        return meta


def write_metadata(
    w: gguf.GGUFWriter,
    model_dir: Path,
    metadata: GGUFMetadata | None,
    total_params: int,
    shared: int = 0,
    expert: int = 0,
    experts: int = 0,
) -> None:
    """general.* keys (+ `edgemerge.recipe`), falling back to the model card and the folder name."""
    meta = (metadata or GGUFMetadata()).to_gguf_metadata(model_dir, total_params)
    if meta.name is None:
        meta.name = Path(model_dir).name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, shared, expert, experts)
    meta.set_gguf_meta_model(w)
    if metadata is not None and metadata.recipe_yaml:
        w.add_string(RECIPE_KEY, metadata.recipe_yaml)
