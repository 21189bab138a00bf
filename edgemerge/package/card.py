"""The model card (README.md): Hugging Face front matter, what the model is, recipe, formula, evaluation per
file and how to run it."""

from __future__ import annotations

from typing import Any

import yaml

from .. import __version__
from ..files import human_bytes
from ..public import public_recipe, public_ref
from ..recipe import Recipe
from ..sources import is_local
from .info import PackageInfo

CARD = "README.md"
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


def front_matter(p: PackageInfo) -> dict[str, Any]:
    """Hugging Face model card metadata."""
    r = p.recipe
    fm: dict[str, Any] = {"language": list(dict.fromkeys(r.lang_codes))}
    fm["license"] = r.license or "other"
    base_models = _hf_ids([r.instruct] + [lang.model for lang in r.languages] + [r.base], p.inputs)
    if base_models:
        fm["base_model"] = base_models
        fm["base_model_relation"] = "merge"
    fm["tags"] = ["merge", "gguf", "edgemerge"] + (["demo"] if p.demo else [])
    fm["pipeline_tag"] = "text-generation"
    fm["library_name"] = "gguf"
    return fm


def formula(r: Recipe) -> str:
    terms = " + ".join(f"{lang.weight:g} · (W_{lang.code} − W_base)" for lang in r.languages)
    return f"W = W_instruct + {terms}"


def _size(n: int) -> str:

    return human_bytes(n)


def _recipe_yaml(r: Recipe) -> dict[str, Any]:
    data = public_recipe(r)
    data["eval"] = {k: v for k, v in data["eval"].items() if v is not None}
    return data


def model_card(p: PackageInfo) -> str:
    """README.md: front matter, what it is, recipe, formula, evaluation per file, how to run it."""
    r = p.recipe
    fm = yaml.safe_dump(front_matter(p), sort_keys=False, allow_unicode=True).strip()
    instruct, base = public_ref(r.instruct, r.root), public_ref(r.base, r.root)
    models = {lang.code: public_ref(lang.model, r.root) for lang in r.languages}
    out = [f"---\n{fm}\n---", "", f"# {r.name}", ""]
    if p.demo:
        out += [DEMO_NOTE, ""]
    if r.description and not p.demo:
        out += [r.description, ""]
    langs = ", ".join(r.lang_codes)
    out += [
        (
            f"An offline assistant for **{langs}**: `{instruct}` with the language vector of "
            + ", ".join(f"`{models[lang.code]}`" for lang in r.languages)
            + f", merged by edgemerge {__version__} and shipped as GGUF for llama.cpp, Ollama and LM Studio."
        ),
        "",
        "## Merge",
        "",
        (
            f'Method `{r.method}` ("Merge and Conquer", arXiv 2603.28263), computed per tensor in float32 and '
            f"stored as {r.dtype}:"
        ),
        "",
        f"    {formula(r)}"
        if r.method == "task_arithmetic"
        else f"    method {r.method}, options {r.options}",
        "",
        "| role | model | weight |",
        "| --- | --- | --- |",
        f"| instruct | `{instruct}` | 1 |",
        f"| base | `{base}` | −Σ w |",
    ]
    out += [f"| language {lang.code} | `{models[lang.code]}` | {lang.weight:g} |" for lang in r.languages]
    out += [
        "",
        "Recipe:",
        "",
        "```yaml",
        yaml.safe_dump(_recipe_yaml(r), sort_keys=False, allow_unicode=True).strip(),
        "```",
        "",
    ]
    out += ["## Files", "", "| file | size |", "| --- | --- |"]
    for name in p.ggufs:
        path = p.out / name
        out.append(f"| `{name}` | {_size(path.stat().st_size) if path.exists() else '?'} |")
    out += [""]
    out += ["## Evaluation", ""]
    if not p.eval_markdown:
        out += ["Not evaluated (built with `--skip-eval`).", ""]
    else:
        out += [
            f"Measured by llama.cpp on a CPU with edgemerge's built-in {p.lang} prompts and text"
            + (" (quick set)" if any(e.get("quick") for e in p.evals.values()) else "")
            + ". Gates from the recipe:"
            + (
                " " + ", ".join(f"{k} {v:g}" for k, v in r.eval.model_dump(exclude_none=True).items())
                or " none"
            )
            + ".",
            "",
        ]
        for name, md in p.eval_markdown.items():
            out += [md.strip(), ""]
            failed = p.gate_failures.get(name)
            out += [f"Gates failed: {'; '.join(failed)}" if failed else "Gates: passed.", ""]
        for role, rep in p.parent_evals.items():
            out += [f"For comparison, the {role} model alone:", "", rep["markdown"].strip(), ""]
    q = p.modelfile_gguf
    out += [
        "## Run it",
        "",
        "llama.cpp:",
        "",
        "```bash",
        f"llama-cli -m {q} -cnv",
        f"llama-server -m {q} --port 8080",
        "```",
        "",
        "Ollama (the Modelfile sets the chat template, stop tokens and a system prompt in the target language):",
        "",
        "```bash",
        f"ollama create {r.name.lower()} -f Modelfile",
        f"ollama run {r.name.lower()}",
        "```",
        "",
        f"LM Studio: `lms import {q}` (or copy the file into LM Studio's models folder) and pick it in the chat tab.",
        "",
        "edgemerge itself: `edgemerge chat " + q + f" --lang {p.lang}`.",
        "",
        "## Provenance",
        "",
        (
            "`manifest.json` lists every file with its size and sha256, the recipe, the input models with their "
            "revisions and file hashes, the tool versions and the time each build stage took; `eval.json` holds "
            "the full evaluation reports, answers included."
        ),
        "",
    ]
    if r.license:
        out += [
            f"Licence: `{r.license}`, inherited from the merged models; read their terms before sharing.",
            "",
        ]
    return "\n".join(out)
