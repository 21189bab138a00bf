"""The model card (README.md): Hugging Face front matter, what the model is, recipe, formula, evaluation per
file and how to run it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
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
LADDER_PLOT = "ladder.png"  # the plot of the quant ladder that chose the type (build --quant auto)
TEMPLATE = Path(__file__).resolve().parent / "card_template.md"  # Jinja, rendered by ModelCard.from_template
REPO_PLACEHOLDER = "<user>/{name}"  # the hub id in the card's commands until `edgemerge publish` fills it in
PLACEHOLDER_NOTE = (
    "Replace `{repo}` below with the repo this folder is uploaded to "
    "(`edgemerge publish FOLDER --repo user/name` fills it in)."
)
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's, Ollama's and LM Studio's usual default of size against quality
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


def file_type(gguf_path: Path) -> str | None:
    """A GGUF's type as llama.cpp names it, from its general.file_type (F16, BF16, Q4_K_M, ...); None when the
    file is missing or does not say."""
    ftype = kv(gguf_path).get("general.file_type") if gguf_path.exists() else None
    if ftype is None:
        return None
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {ftype}"


def file_types(p: PackageInfo) -> dict[str, str | None]:
    """Each shipped GGUF's type (file_type)."""
    return {name: file_type(p.out / name) for name in p.ggufs}


def repo_placeholder(name: str) -> str:
    """The hub id the card's commands use until `edgemerge publish` fills in the real one."""
    return REPO_PLACEHOLDER.format(name=name)


def fill_repo(card: str, name: str, repo: str, old: str | None = None) -> str:
    """The card with the hub id `repo` in its commands, in place of the placeholder (or of `old`, the repo it was
    published to before); the note asking to replace the placeholder goes."""
    old = old or repo_placeholder(name)
    note = PLACEHOLDER_NOTE.format(repo=repo_placeholder(name))
    return card.replace(f"\n{note}\n", "").replace(old, repo)


def recommended(p: PackageInfo, types: dict[str, str | None]) -> tuple[str, str]:
    """(file, why): the smallest quantized file that passed the recipe's gates; without an evaluation, the
    Q4_K_M file (else the first quantized one); when no quantized file passed, the unquantized one if it did."""
    size = {n: (p.out / n).stat().st_size if (p.out / n).exists() else 0 for n in p.ggufs}
    quants = p.ggufs[1:]
    if not quants:
        return p.ggufs[0], "the only file of this build"
    if not p.evals and p.ladder is not None:  # --quant auto shipped one type
        return quants[0], "not evaluated (`--skip-eval`); the type the quant ladder chose (below)"
    if not p.evals:
        pick = next((n for n in quants if types.get(n) == DEFAULT_QUANT), quants[0])
        if types.get(pick) == DEFAULT_QUANT:
            return (
                pick,
                f"not evaluated (`--skip-eval`); {DEFAULT_QUANT} is llama.cpp's and Ollama's usual default",
            )
        return pick, "not evaluated (`--skip-eval`); the recipe's first quantization"
    passed = [n for n in p.ggufs if n in p.evals and not p.gate_failures.get(n)]
    if any(n in quants for n in passed):
        pick = min((n for n in passed if n in quants), key=lambda n: size[n])
        return pick, "the smallest file that passed every gate of the recipe (see Evaluation)"
    if p.ggufs[0] in passed:
        return p.ggufs[
            0
        ], "no quantized file passed the recipe's gates; the unquantized one did (see Evaluation)"
    pick = min(quants, key=lambda n: size[n])
    return pick, "no file passed the recipe's gates (see Evaluation): treat this build as an experiment"


def model_card(p: PackageInfo) -> str:
    """README.md: front matter, what it is, recipe, formula, evaluation per file, how to run it
    (card_template.md is the text; this gathers its values)."""
    from huggingface_hub import ModelCard  # see front_matter

    r = p.recipe
    files = []
    imx = p.imatrix
    types = file_types(p)
    for name in p.ggufs + ([p.shipped_imatrix] if p.shipped_imatrix else []):
        path = p.out / name
        made_with = "" if name == p.shipped_imatrix else ("yes" if imx and name in imx["files"] else "no")
        size = human_bytes(path.stat().st_size) if path.exists() else "?"
        kind = "importance matrix" if name == p.shipped_imatrix else (types[name] or "?")
        files.append({"name": name, "type": kind, "size": size, "imatrix": made_with})
    pick, why = recommended(p, types)
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
        stored=types[p.ggufs[0]] or "F16",
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
        prompts=max((len(e.get("responses") or []) for e in p.evals.values()), default=0),
        quick_tokens=max((e.get("max_tokens") or 0 for e in p.evals.values()), default=0),
        gates=", ".join(f"{k} {v:g}" for k, v in r.eval.thresholds().items()),
        parents=[{"role": role, "markdown": rep["markdown"].strip()} for role, rep in p.parent_evals.items()],
        lang=p.lang,
        gguf=p.modelfile_gguf,
        ollama_name=r.name.lower(),
        licence=r.license,
        sweep=None if p.sweep is None else {**p.sweep, "plot": SWEEP_PLOT},
        repo=repo_placeholder(r.name),
        placeholder_note=PLACEHOLDER_NOTE.format(repo=repo_placeholder(r.name)),
        recommended={"file": pick, "why": why, "tag": types[pick] or DEFAULT_QUANT},
        ladder=None if p.ladder is None else {**p.ladder, "plot": LADDER_PLOT},
    )
    return str(card)
