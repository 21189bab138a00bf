"""The shippable folder: model card (README.md), Ollama Modelfile, eval.json and manifest.json.

Everything is derived from the built GGUF files (chat template, BOS/EOS/EOT tokens read from their metadata),
the instruct model's generation settings, the recipe and the evaluation reports; the manifest is written last
and lists every other file of the folder with its size and sha256.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .chat_format import ChatFormat, derive_chat_format
from .errors import EdgemergeError
from .files import atomic_output, human_bytes
from .gguf.inspect import kv
from .hashes import sha256_file
from .public import public_inputs, public_recipe, public_ref
from .recipe import Recipe
from .sources import is_local

MANIFEST = "manifest.json"
EVAL_JSON = "eval.json"
MODELFILE = "Modelfile"
CARD = "README.md"
DEMO_NOTE = (
    "**Demo build.** These models are tiny (a few million parameters, trained for seconds by "
    "`edgemerge build --demo`) and their answers are meaningless: the folder shows what a real build produces."
)


@dataclass
class PackageInfo:
    """What the package step needs to know about a finished build."""

    recipe: Recipe
    out: Path
    lang: str
    ggufs: list[str]  # shipped GGUF file names, the unquantized one first
    inputs: dict[str, dict]  # role -> {"ref", "revision", "files"}
    instruct_dir: Path | None = None  # generation_config.json gives the extra EOS ids
    evals: dict[str, dict] = field(default_factory=dict)  # file name -> EvalReport.to_dict()
    eval_markdown: dict[str, str] = field(default_factory=dict)  # file name -> EvalReport.to_markdown()
    gate_failures: dict[str, list[str]] = field(default_factory=dict)
    parent_evals: dict[str, dict] = field(default_factory=dict)  # e.g. {"instruct": report dict}
    stages: dict[str, dict] = field(default_factory=dict)  # stage name -> {"seconds", "cached"}
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256 already known (big files)
    backend: str | None = None
    demo: bool = False

    @property
    def modelfile_gguf(self) -> str:
        """The file Ollama runs: the first requested quantization (recipe order), else the unquantized file."""
        return self.ggufs[1] if len(self.ggufs) > 1 else self.ggufs[0]


@dataclass
class ChatInfo:
    """Chat-relevant metadata of a GGUF: template, BOS and every end-of-generation token."""

    template: str | None
    bos: str
    stops: list[str]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def chat_info(gguf_path: Path, instruct_dir: Path | None = None) -> ChatInfo:
    """Template, BOS and stop tokens: the GGUF's EOS/EOT/EOM ids plus the instruct model's
    generation_config.json `eos_token_id` list (chat models often stop on several tokens)."""

    meta = kv(gguf_path)
    get = meta.get

    tokens = get("tokenizer.ggml.tokens") or []
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        ids += _ids(get(f"tokenizer.ggml.{key}"))
    if instruct_dir is not None and (instruct_dir / "generation_config.json").exists():
        gen = json.loads((instruct_dir / "generation_config.json").read_text(encoding="utf-8"))
        ids += _ids(gen.get("eos_token_id"))
    stops = []
    for i in ids:
        if 0 <= i < len(tokens) and tokens[i] not in stops:
            stops.append(tokens[i])
    bos_id = get("tokenizer.ggml.bos_token_id")
    bos = tokens[bos_id] if bos_id is not None and 0 <= bos_id < len(tokens) else ""
    return ChatInfo(template=get("tokenizer.chat_template"), bos=bos, stops=stops)


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile(gguf_name: str, info: ChatInfo, system: str | None) -> tuple[str, str | None]:
    """The Ollama Modelfile text, and a warning when the chat template has no Ollama equivalent.

    TEMPLATE renders what the GGUF's chat template renders for any conversation ending with a user turn
    (checked by re-rendering, see chat_format); one `PARAMETER stop` per EOS/EOT token.
    """
    lines = [f"FROM ./{gguf_name}", ""]
    warning = None
    fmt: ChatFormat | None = None
    if info.template:
        try:
            fmt = derive_chat_format(info.template, bos=info.bos, eos=info.stops[0] if info.stops else "")
            go_template = fmt.to_go_template()
        except EdgemergeError as e:
            fmt = None
            warning = f"{e.message}; Ollama will fall back to its own template detection"
    else:
        warning = "the GGUF has no chat template; Ollama will use a plain prompt"
    if fmt is not None:
        lines += [f'TEMPLATE """{go_template}"""', ""]
        if fmt.system_prefix is None and system:
            system = None
            warning = "the chat template has no system role, so the Modelfile has no SYSTEM line"
    if system:
        if '"""' in system:
            raise EdgemergeError('the system prompt cannot contain """ (Ollama Modelfile quoting)')
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {_quote(s)}" for s in info.stops]
    return "\n".join(lines) + "\n", warning


def parse_modelfile_stops(text: str) -> list[str]:
    """The `PARAMETER stop` values of a Modelfile (quoted JSON-style strings)."""
    return [json.loads(m) for m in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.MULTILINE)]


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


def _formula(r: Recipe) -> str:
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
        f"    {_formula(r)}"
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


def tool_versions() -> dict[str, str | None]:
    """Versions of edgemerge and the libraries that shaped the files (llama.cpp through llama-cpp-python)."""
    out: dict[str, str | None] = {"edgemerge": __version__, "python": platform.python_version()}
    for dist in ("llama-cpp-python", "gguf", "torch", "transformers", "safetensors", "mlx"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import llama_cpp

        # llama-cpp-python exposes no llama.cpp build number; the bundled ggml library's file name has its version
        for lib in sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*")):
            m = re.search(r"(\d+\.\d+\.\d+)", lib.name)
            if m:
                out["ggml"] = m.group(1)
        info = llama_cpp.llama_print_system_info()
        out["llama.cpp system_info"] = info.decode() if isinstance(info, bytes) else str(info)
    except Exception:  # noqa: BLE001 (llama.cpp missing or without this call: the version above still says which)
        out["llama.cpp system_info"] = None
    return out


def eval_json(p: PackageInfo) -> dict[str, Any]:
    return {
        "lang": p.lang,
        "gates": p.recipe.eval.model_dump(exclude_none=True),
        "files": p.evals,
        "gate_failures": p.gate_failures,
        "parents": {k: v["report"] for k, v in p.parent_evals.items()},
    }


def manifest(p: PackageInfo, files: list[Path]) -> dict[str, Any]:
    entries = []
    for f in files:
        sha = p.hashes.get(f.name) or sha256_file(f)
        entries.append({"name": f.name, "size": f.stat().st_size, "sha256": sha})
    return {
        "name": p.recipe.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "demo": p.demo,
        "lang": p.lang,
        "files": entries,
        "recipe": public_recipe(p.recipe),
        "formula": _formula(p.recipe) if p.recipe.method == "task_arithmetic" else None,
        "inputs": public_inputs(p.inputs, p.recipe.root),
        "backend": p.backend,
        "tools": tool_versions(),
        "stages": p.stages,
    }


def write_package(p: PackageInfo, *, system: str | None = None) -> tuple[list[Path], list[str]]:
    """Write README.md, Modelfile, eval.json, then manifest.json; return (files written, warnings)."""

    if system is None:
        try:
            from .evaluate.prompts import language_info

            system = language_info(p.lang)["system"]
        except EdgemergeError:
            system = None
    warnings = []
    info = chat_info(p.out / p.modelfile_gguf, p.instruct_dir)
    mf, warn = modelfile(p.modelfile_gguf, info, system)
    if warn:
        warnings.append(warn)
    texts = {
        CARD: model_card(p),
        MODELFILE: mf,
        EVAL_JSON: json.dumps(eval_json(p), indent=2, ensure_ascii=False, default=str) + "\n",
    }
    for name, text in texts.items():
        with atomic_output(p.out / name, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    files = [p.out / n for n in p.ggufs] + [p.out / n for n in texts]
    data = manifest(p, files)
    with atomic_output(p.out / MANIFEST, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return files + [p.out / MANIFEST], warnings
