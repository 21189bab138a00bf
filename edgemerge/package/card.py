"""The model card (README.md): Hugging Face front matter, what the model is, recipe, formula, evaluation per
file and how to run it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .. import __version__
from ..files import human_bytes
from ..gguf.inspect import kv
from ..public import public_recipe, public_ref
from ..recipe import Recipe
from ..sources import is_local
from .info import PackageInfo

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

CARD = "README.md"
SWEEP_PLOT = "sweep.png"  # the plot of the sweep that chose the weight (build --weight auto)
TEMPLATE = Path(__file__).resolve().parent / "card_template.md"  # Jinja, rendered by ModelCard.from_template
DEMO_NOTE = (
    "**Demo build.** These models are tiny (a few million parameters, trained for seconds by "
    "`edgemerge build --demo`) and their answers are meaningless: the folder shows what a real build produces."
)


def _hf_ids(refs: list[str | None], inputs: dict[str, dict]) -> list[str]:
    """Hub ids among the refs: those resolved from the hub (a revision in `inputs`), else those that look like
    owner/name and are no local folder (when the inputs are unknown)."""
    resolved = {v["ref"]: v.get("revision") for v in inputs.values() if isinstance(v, dict) and "ref" in v}
    out = []
    for ref in refs:
        if not ref:
            continue
        if ref in resolved:
            hub = resolved[ref] is not None
        else:
            hub = not is_local(ref)
        rid = ref.split("@")[0]
        if hub and rid not in out:
            out.append(rid)
    return out


def front_matter(p: PackageInfo) -> ModelCardData:
    """Hugging Face model card metadata."""
    # huggingface_hub takes a third of a second to import: loaded when a card is made, not when the CLI starts
    from huggingface_hub import ModelCardData

    r = p.recipe
    base_models = _hf_ids([r.instruct] + [lang.model for lang in r.languages] + [r.base], p.inputs)
    return ModelCardData(
        language=list(dict.fromkeys(r.lang_codes)),
        license=r.license or "other",
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        tags=["merge", "gguf", "edgemerge"] + (["demo"] if p.demo else []),
        pipeline_tag="text-generation",
        library_name="gguf",
    )


def formula(r: Recipe) -> str:
    terms = " + ".join(f"{lang.weight:g} · (W_{lang.code} − W_base)" for lang in r.languages)
    return f"W = W_instruct + {terms}"


def _recipe_yaml(r: Recipe) -> dict[str, Any]:
    data = public_recipe(r)
    data["eval"] = {k: v for k, v in data["eval"].items() if v is not None}
    return data


def _float_type(gguf_path: Path) -> str:
    """The unquantized file's type as llama.cpp names it (its general.file_type), e.g. F16."""
    ftype = kv(gguf_path).get("general.file_type") if gguf_path.exists() else None
    return {0: "F32", 1: "F16", 32: "BF16"}.get(ftype, "F16" if ftype is None else f"file type {ftype}")


def model_card(p: PackageInfo) -> str:
    """README.md: front matter, what it is, recipe, formula, evaluation per file, how to run it
    (card_template.md is the text; this gathers its values)."""
    from huggingface_hub import ModelCard  # see front_matter

    r = p.recipe
    files = []
    imx = p.imatrix
    for name in p.ggufs + ([p.shipped_imatrix] if p.shipped_imatrix else []):
        path = p.out / name
        made_with = "" if name == p.shipped_imatrix else ("yes" if imx and name in imx["files"] else "no")
        size = human_bytes(path.stat().st_size) if path.exists() else "?"
        files.append({"name": name, "size": size, "imatrix": made_with})
    card = ModelCard.from_template(
        front_matter(p),
        template_path=str(TEMPLATE),
        name=r.name,
        demo_note=DEMO_NOTE if p.demo else None,
        description=r.description,
        langs=", ".join(r.lang_codes),
        instruct=public_ref(r.instruct, r.root),
        base=public_ref(r.base, r.root),
        languages=[
            {"code": lang.code, "model": public_ref(lang.model, r.root), "weight": f"{lang.weight:g}"}
            for lang in r.languages
        ],
        version=__version__,
        method=r.method,
        options=r.options,
        stored=_float_type(p.out / p.ggufs[0]),
        formula=formula(r) if r.method == "task_arithmetic" else None,
        recipe_yaml=yaml.safe_dump(_recipe_yaml(r), sort_keys=False, allow_unicode=True).strip(),
        files=files,
        imatrix=imx,
        imatrix_texts=", ".join(f"`{t}`" for t in imx["texts"]) if imx else "",
        evaluations=[
            {"markdown": md.strip(), "failed": p.gate_failures.get(name)}
            for name, md in p.eval_markdown.items()
        ],
        quick=any(e.get("quick") for e in p.evals.values()),
        gates=", ".join(f"{k} {v:g}" for k, v in r.eval.thresholds().items()),
        parents=[{"role": role, "markdown": rep["markdown"].strip()} for role, rep in p.parent_evals.items()],
        lang=p.lang,
        gguf=p.modelfile_gguf,
        ollama_name=r.name.lower(),
        licence=r.license,
        sweep=None if p.sweep is None else {**p.sweep, "plot": SWEEP_PLOT},
    )
    return str(card)
