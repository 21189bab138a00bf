"""The junction of merge and GGUF: recipe -> Hugging Face folder (`merge_to_hf`), recipe -> one GGUF file
(`merge_to_gguf`, fused: no folder in between) and Hugging Face folder -> GGUF (`export_hf`).

Merge and GGUF never import each other; this module puts them together. Every path runs its checks before
writing anything, streams into a sink inside a temporary sibling of the output and renames it only on success.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import yaml

from . import __version__
from .check import CompatReport, check_compat, check_config_tensors, check_inherited_files
from .errors import EdgemergeError
from .files import atomic_output, ensure_free_space
from .gguf.arch import left_out_of_gguf
from .gguf.metadata import GGUFMetadata, Lineage
from .gguf.sink import GGUFSink
from .limits import shown
from .merge.engine import MergeStats, merge_into
from .merge.methods import get_method
from .model_json import check_model_json, read_tokenizer_json
from .progress import Progress
from .public import public_inputs, public_recipe, public_ref
from .recipe import Recipe
from .sources import RecipeSources, is_local, resolve_recipe
from .tensors.safetensors import read_model
from .tensors.sinks import SafetensorsSink
from .tensors.spec import ModelTensors, TensorSpec
from .tensors.stream import copy_into
from .trust import refuse_custom_code

# Files of the instruct model that travel with the merge: tokenizer, chat template, generation settings (EOS
# ids: a merged chat model that never stops is the classic merge bug) and the licence terms.
INSTRUCT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
INSTRUCT_GLOBS = ("*.tiktoken", "LICENSE*", "USE_POLICY*", "NOTICE*")
PROVENANCE_FILE = "edgemerge.json"
SPACE_MARGIN = 64 * 1024**2


def _with_dtype(recipe: Recipe, dtype: str | None) -> Recipe:
    if dtype is None or dtype == recipe.dtype:
        return recipe
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EdgemergeError(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    out = recipe.model_copy(update={"dtype": dtype})
    out.root = recipe.root
    return out


def check_inputs(sources: RecipeSources) -> CompatReport:
    """The compatibility check of a merge's inputs, told which tensors the instruct model's family leaves out of
    a GGUF: those are outside the merge (check.check_compat's `outside`), so a released Qwen3.5 instruct
    model with its multi-token-prediction block merges with a language model saved without it, and a vision
    tower goes to the Hugging Face output as the instruct model's."""
    return check_compat(sources, outside=left_out_of_gguf(sources.instruct.path))


def output_bytes(report: CompatReport, dtype: str) -> int:
    """Size of the merged weights in `dtype`."""
    width = 4 if dtype == "float32" else 2
    return report.n_params * width


def provenance(recipe: Recipe, sources: RecipeSources, stats: MergeStats) -> dict:
    """What was merged from what: recipe, input ids, revisions and file hashes (see `sources`), method options."""
    return {
        "edgemerge": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "name": recipe.method,
            "title": get_method(recipe.method).title,
            "paper": get_method(recipe.method).paper,
        },
        "recipe": public_recipe(recipe, merge_only=True),
        "merge": stats.to_dict(),
        "inputs": public_inputs({role: src.provenance() for role, src in sources.named()}, recipe.root),
    }


def without_local_name(data: dict) -> dict:
    """`data` without the `_name_or_path` / `name_or_path` transformers records when saving from a local folder
    (a path of the user's machine; a hub id is kept)."""
    out = dict(data)
    for key in ("_name_or_path", "name_or_path"):
        value = out.get(key)
        if isinstance(value, str) and value and is_local(value):
            del out[key]
    return out


def write_model_files(out_dir: Path, instruct_dir: Path, config: dict, dtype: str) -> None:
    """config.json (dtype set to the output dtype) and the instruct model's tokenizer/template/licence files."""
    config = without_local_name(dict(config))
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = {n for n in INSTRUCT_FILES if (instruct_dir / n).is_file()}
    for pattern in INSTRUCT_GLOBS:
        names |= {p.name for p in instruct_dir.glob(pattern) if p.is_file()}
    for name in sorted(names):
        shutil.copyfile(instruct_dir / name, out_dir / name)
    tok_cfg = out_dir / "tokenizer_config.json"
    if tok_cfg.is_file():  # validated by the check: a JSON object
        data = json.loads(tok_cfg.read_text(encoding="utf-8"))
        public = without_local_name(data) if isinstance(data, dict) else data
        if public != data:
            tok_cfg.write_text(json.dumps(public, indent=2, ensure_ascii=False) + "\n")
    extra = instruct_dir / "additional_chat_templates"
    if extra.is_dir():
        shutil.copytree(extra, out_dir / extra.name)


def merge_to_hf(
    recipe: Recipe,
    out_dir: Path,
    *,
    backend: str = "torch",
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    sources: RecipeSources | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Merge into a Hugging Face model folder: sharded safetensors (+ index), config.json, the instruct model's
    tokenizer, chat template and generation_config.json, and `edgemerge.json` (provenance)."""
    out_dir = Path(out_dir)
    recipe = _with_dtype(recipe, dtype)
    sources = sources or resolve_recipe(recipe, progress)
    report = check_inputs(sources)
    ensure_free_space(out_dir.parent, output_bytes(report, recipe.dtype) + SPACE_MARGIN, "the merged model")
    with atomic_output(out_dir, force=force, inputs=sources.paths(), kind="merge") as tmp:
        sink = SafetensorsSink(
            tmp, max_shard_bytes=max_shard_bytes, metadata={"edgemerge_recipe": recipe.name}
        )
        stats = merge_into(recipe, sources, sink, backend=backend, progress=progress, report=report)
        write_model_files(tmp, sources.instruct.path, report.config, recipe.dtype)
        data = provenance(recipe, sources, stats)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def gguf_metadata(recipe: Recipe) -> GGUFMetadata:
    """The GGUF general.* metadata of a merge: name, languages, licence, lineage (instruct, base, then each
    language model) and the recipe as YAML, local paths reduced to folder names (public.py)."""

    def lineage_of(ref: str, role: str) -> Lineage:
        return Lineage(public_ref(ref, recipe.root), role, local=is_local(ref, recipe.root))

    lineage = [lineage_of(recipe.instruct, "instruct"), lineage_of(recipe.base, "base")]
    lineage += [lineage_of(lang.model, f"language {lang.code}") for lang in recipe.languages if lang.model]
    return GGUFMetadata(
        name=recipe.name,
        languages=recipe.lang_codes,
        license=recipe.license,
        description=recipe.description,
        lineage=lineage,
        recipe_yaml=yaml.safe_dump(
            public_recipe(recipe, merge_only=True), sort_keys=False, allow_unicode=True
        ),
        tags=["edgemerge", "merge", "language-vector"],
    )


def merge_to_gguf(
    recipe: Recipe,
    out_file: Path,
    *,
    outtype: str = "f16",
    backend: str = "torch",
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    sources: RecipeSources | None = None,
    report: CompatReport | None = None,
    hashes: dict[Path, str] | None = None,
) -> Path:
    """Merge straight into one GGUF file (no Hugging Face folder in between): the merged tensors are rounded
    to the recipe's dtype, then handed to the GGUF sink, so the file equals merge_to_hf + export_hf.
    `report`: the compatibility check already done on `sources`; `hashes`: filled with the file's sha256,
    computed while writing."""
    out_file = Path(out_file)
    recipe = _with_dtype(recipe, dtype)
    sources = sources or resolve_recipe(recipe, progress)
    report = report or check_inputs(sources)
    width = {"f32": 4, "f16": 2, "bf16": 2}.get(outtype.lower(), 2)
    ensure_free_space(out_file.parent, report.n_params * width + SPACE_MARGIN, "the GGUF file")
    with atomic_output(out_file, force=force, inputs=sources.paths()) as tmp:
        sink = GGUFSink(
            tmp,
            sources.instruct.path,
            outtype=outtype,
            metadata=gguf_metadata(recipe),
            sha256=hashes is not None,
        )
        merge_into(recipe, sources, sink, backend=backend, progress=progress, report=report)
    if hashes is not None:
        hashes[out_file] = sink.sha256
    return out_file


_EXPORT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def export_specs(model: ModelTensors) -> list[TensorSpec]:
    """The tensors of a checkpoint as stored; only float checkpoints (BF16/F16/F32) can be exported."""
    specs = []
    for name, dtype in model.dtypes.items():
        if dtype not in _EXPORT_DTYPES:
            raise EdgemergeError(
                f"tensor {shown(name)} in {model.files[name].name} is {dtype}; only float checkpoints "
                "(BF16/F16/F32) can be exported (dequantize the model first)"
            )
        specs.append(TensorSpec(name, model.shapes[name], _EXPORT_DTYPES[dtype]))
    return specs


def export_hf(
    hf_dir: Path,
    out_file: Path,
    *,
    outtype: str = "f16",
    metadata: GGUFMetadata | None = None,
    force: bool = False,
    progress: Progress | None = None,
    hashes: dict[Path, str] | None = None,
) -> Path:
    """Convert a Hugging Face model folder to one GGUF file (f32, f16, bf16 or q8_0), like llama.cpp's
    convert_hf_to_gguf.py; nothing appears at `out_file` unless the whole file was written. `hashes`: filled
    with the file's sha256, computed while writing (as `merge_to_gguf` does)."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if not hf_dir.is_dir():
        raise EdgemergeError(
            f"{hf_dir} is not a folder; give a Hugging Face model folder (config.json + weights)"
        )
    if not (hf_dir / "config.json").is_file():
        raise EdgemergeError(f"{hf_dir} has no config.json; give a Hugging Face model folder")
    config = check_model_json(hf_dir)
    read_tokenizer_json(hf_dir)
    refuse_custom_code(hf_dir)  # before any transformers call: nothing in the folder may run
    check_inherited_files(hf_dir, hf_dir.name)
    model = read_model(hf_dir, str(hf_dir))
    specs = export_specs(model)
    check_config_tensors(config, {s.name: s.shape for s in specs}, hf_dir.name)
    with atomic_output(out_file, force=force, inputs=[hf_dir]) as tmp:
        sink = GGUFSink(tmp, hf_dir, outtype=outtype, metadata=metadata, sha256=hashes is not None)
        copy_into(model, specs, sink, progress=progress, label=f"GGUF {out_file.name}")
    if hashes is not None:
        hashes[out_file] = sink.sha256
    return out_file
