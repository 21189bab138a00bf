"""Recipes: a typed description of what to merge, how, which quants to ship and which gates to pass.

A recipe is a YAML file validated by `Recipe`; errors name the bad field. Relative local paths in it resolve
against the recipe file's folder. Bundled recipes live in `recipes/` (installed with the package).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import EdgemergeError

MethodName = Literal["task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs"]
DType = Literal["bfloat16", "float16", "float32"]

BUNDLED_DIR = Path(__file__).resolve().parent / "recipes"


class Language(BaseModel):
    """One language model and its weight w_i in the merge."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="ISO 639-1 code of the language, e.g. eu")
    model: str | None = Field(description="HF repo id (owner/name[@revision]) or local folder")
    weight: float = 1.0

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z]{2,3}", v):
            raise ValueError(f"language code must be 2-3 lowercase letters (ISO 639), got {v!r}")
        return v

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"weight must be a number, got {v!r}")  # noqa: TRY004 (pydantic reports ValueError only)
        if not math.isfinite(float(v)):
            raise ValueError(f"weight must be a finite number, got {v!r}")
        return float(v)


class Gates(BaseModel):
    """Evaluation thresholds: a failed gate makes `eval`/`build` exit with code 3. None disables a gate."""

    model_config = ConfigDict(extra="forbid")
    min_language_fidelity: float | None = None
    min_stop_rate: float | None = None
    min_instruction_following: float | None = None
    max_perplexity: float | None = None
    max_kld_mean: float | None = None
    min_top1_agreement: float | None = None
    max_ppl_ratio: float | None = None


class Recipe(BaseModel):
    """W = W_instruct + sum_i w_i (W_lang_i - W_base), or another method over the same task vectors."""

    model_config = ConfigDict(extra="forbid")
    name: str
    instruct: str
    base: str
    languages: list[Language] = Field(min_length=1)
    method: MethodName = "task_arithmetic"
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: DType = "bfloat16"
    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M", "Q8_0"])
    license: str | None = None
    description: str | None = None
    eval: Gates = Field(default_factory=Gates)
    # Folder the recipe was read from: relative local paths resolve against it (not part of the YAML).
    root: Path | None = Field(default=None, exclude=True)

    @field_validator("languages")
    @classmethod
    def _unique_codes(cls, v: list[Language]) -> list[Language]:
        # a code names its input in the build's cache key and manifest: two with one code would collide
        seen: dict[str, int] = {}
        for i, lang in enumerate(v):
            if lang.code in seen:
                raise ValueError(
                    f"language code {lang.code!r} appears twice (languages.{seen[lang.code]} and languages.{i}); "
                    "give each language once (merge two models of one language before, or weight one of them)"
                )
            seen[lang.code] = i
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"name is used in file names: letters, digits, '.', '_' and '-' only, got {v!r}")
        return v

    @property
    def lang_codes(self) -> list[str]:
        return [lang.code for lang in self.languages]

    def to_yaml_dict(self) -> dict[str, Any]:
        """The recipe as written to provenance files and GGUF metadata."""
        return self.model_dump(mode="json", exclude={"root"})


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        parts.append(f"{loc}: {msg}")
    return f"recipe {source}: " + "; ".join(parts)


def parse_recipe(data: Any, *, source: str = "<recipe>", root: Path | None = None) -> Recipe:
    """Validate a recipe given as a mapping; errors name the bad field."""
    if not isinstance(data, dict):
        raise EdgemergeError(f"recipe {source}: expected a mapping of fields (name, instruct, base, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgemergeError(_format_validation_error(source, e)) from None
    recipe.root = root
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file, or a bundled recipe by name (e.g. `llama3.1-8b-eu`)."""
    p = Path(path)
    if not p.exists():
        bundled = BUNDLED_DIR / f"{path}.yaml"
        if bundled.exists():
            p = bundled
        else:
            raise EdgemergeError(
                f"recipe {path} not found: give a YAML file or one of the bundled recipes: "
                + ", ".join(bundled_recipes())
            )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EdgemergeError(f"recipe {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, source=str(p), root=p.resolve().parent)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with edgemerge."""
    return sorted(f.stem for f in BUNDLED_DIR.glob("*.yaml"))


def recipe_for_languages(codes: list[str]) -> str:
    """The bundled recipe name for `--lang` (one code, or several for the multilingual recipe)."""
    codes = sorted(set(codes))
    matches = []
    complete = {}
    for name in bundled_recipes():
        r = load_recipe(BUNDLED_DIR / f"{name}.yaml")
        if sorted(r.lang_codes) == codes:
            matches.append(name)
            complete[name] = all(lang.model for lang in r.languages)
    if not matches:
        raise EdgemergeError(
            f"no bundled recipe for language(s) {','.join(codes)}; bundled: {', '.join(bundled_recipes())} "
            "(or pass --recipe PATH)"
        )
    # Prefer recipes whose models are all public, then the default family (Llama 3.1).
    matches.sort(key=lambda n: (not complete[n], not n.startswith("llama"), n))
    return matches[0]
