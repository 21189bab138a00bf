"""`edgemerge merge` and `edgemerge check`: thin shells over edgemerge.pipeline and edgemerge.check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EdgemergeError
from ..files import human_bytes, prepare_output
from ..merge.backends import resolve_backend_name
from ..merge.methods import get_method
from ..pipeline import check_inputs, merge_to_gguf, merge_to_hf
from ..recipe import load_recipe
from ..sources import local_inputs, resolve_recipe
from .common import app, console, examples, live_progress, print_json

RECIPE_HELP = "Recipe YAML file, or the name of a bundled recipe (e.g. qwen3-8b-eu)."


BACKEND_HELP = "Array backend: auto (MLX on Apple silicon if installed, else torch), torch or mlx."


@app.command(
    epilog=examples(
        "edgemerge merge my-recipe.yaml -o merged/  # a Hugging Face folder",
        "edgemerge merge my-recipe.yaml --gguf merged-F16.gguf  # one GGUF file",
        "edgemerge recipes copy qwen3-8b-eu my-recipe.yaml  # a recipe to start from",
    )
)
def merge(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (Hugging Face format).")
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf", help="Merge straight into this GGUF file instead (no Hugging Face folder in between)."
        ),
    ] = None,
    outtype: Annotated[
        str, typer.Option("--outtype", help="GGUF tensor type with --gguf: f16, bf16 or f32.")
    ] = "f16",
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the recipe's)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Merge the recipe's models: W = W_instruct + sum_i w_i (W_lang_i - W_base), or the recipe's method.

    With --out: a Hugging Face folder (sharded safetensors, config, the instruct model's tokenizer, chat template and generation_config, edgemerge.json provenance). With --gguf: one GGUF file, merged straight into it.

    The inputs are checked first; nothing appears at the output path unless the merge succeeds.
    """

    if (out is None) == (gguf is None):
        raise EdgemergeError(
            "give --out DIR (Hugging Face folder) or --gguf FILE (fused merge to GGUF), one of them"
        )
    r = load_recipe(recipe)
    # before resolving (downloading) models; the recipe file is an input too (--force must not replace it)
    prepare_output(out or gguf, force=force, inputs=[*local_inputs(r), r.file])
    backend = resolve_backend_name(backend)
    start = time.perf_counter()
    with live_progress() as progress:
        if out is not None:
            path = merge_to_hf(r, out, backend=backend, dtype=dtype, force=force, progress=progress)
        else:
            path = merge_to_gguf(
                r, gguf, outtype=outtype, backend=backend, dtype=dtype, force=force, progress=progress
            )
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()) if p.is_file())
    result = {
        "output": str(path),
        "format": "hf" if out is not None else "gguf",
        "recipe": r.name,
        "method": r.method,
        "languages": {lang.code: lang.weight for lang in r.languages},
        "dtype": dtype or r.dtype,
        "backend": backend,
        "bytes": size,
        "seconds": round(seconds, 2),
    }
    if json_out:
        print_json(result)
        return
    table = Table(title=f"merged {r.name}", show_header=False)
    for key in ("output", "method", "languages", "dtype", "backend"):
        table.add_row(key, str(result[key]))
    table.add_row("size", human_bytes(size))
    table.add_row("time", f"{seconds:.1f} s")
    console.print(table)


@app.command(epilog=examples("edgemerge check my-recipe.yaml", "edgemerge check qwen3-8b-eu --json"))
def check(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Check that a recipe's models can be merged: architecture, tensor names and shapes, vocabulary, tokenizer.

    Writes nothing; downloads hub models that are not cached yet.
    """

    r = load_recipe(recipe)
    opts = get_method(r.method).parse_options(r.options)
    with live_progress() as progress:
        sources = resolve_recipe(r, progress)
    report = check_inputs(sources)
    result = {
        "recipe": r.name,
        "compatible": True,
        "architecture": report.architecture,
        "tensors": len(report.specs),
        "params": report.n_params,
        "vocab_size": report.vocab_size,
        "tied_embeddings": report.tied_embeddings,
        "not_merged": report.note or None,  # tensors outside the language model (a vision tower, mtp.*)
        "method": r.method,
        "options": opts,
        "models": {
            role: {"ref": s.ref, "revision": s.revision, "path": str(s.path)} for role, s in sources.named()
        },
    }
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{r.name}: compatible ({report.architecture})")
    table.add_column("role")
    table.add_column("model")
    table.add_column("revision")
    table.add_column("weight", justify="right")
    weights = {lang.code: lang.weight for lang in r.languages}
    for role, s in sources.named():
        w = "1.0" if role == "instruct" else ("" if role == "base" else f"{weights[role]:g}")
        table.add_row(role, s.ref, s.revision or "local", w)
    console.print(table)
    console.print(
        f"{len(report.specs)} tensors, {report.n_params / 1e6:.1f} M parameters, vocabulary {report.vocab_size}, "
        f"method {r.method} {opts}"
    )
    if report.note:
        console.print(report.note, markup=False)
