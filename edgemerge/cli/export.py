"""`edgemerge export`: a Hugging Face folder -> one GGUF file (thin shell over edgemerge.pipeline.export_hf)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..files import human_bytes
from ..gguf.arch import supported_names
from ..gguf.inspect import read_gguf
from ..pipeline import export_hf
from .common import app, console, examples, live_progress, print_json


@app.command(
    epilog=examples(
        "edgemerge export ./my-model -o my-model-F16.gguf",
        "edgemerge export ./my-model -o my-model-BF16.gguf --outtype bf16",
    )
    + f"\n\nArchitectures: {supported_names()}."
)
def export(
    hf_dir: Annotated[
        Path, typer.Argument(help="Hugging Face model folder (config.json, safetensors, tokenizer).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="GGUF file to write.")],
    outtype: Annotated[
        str,
        typer.Option(
            "--outtype", help="Tensor type: f32, f16, bf16 or q8_0 (norms stay F32, as in llama.cpp)."
        ),
    ] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Convert a Hugging Face model to GGUF, as llama.cpp's convert_hf_to_gguf.py does (same bytes).

    Keeps the vocabulary, special tokens, EOS settings and chat template. Tensors are streamed one at a time;
    nothing appears at --out unless it completes. Architectures: see below.
    """

    start = time.perf_counter()
    with live_progress() as progress:
        path = export_hf(hf_dir, out, outtype=outtype, force=force, progress=progress)
    seconds = time.perf_counter() - start
    info = read_gguf(path)
    result = {
        "output": str(path),
        "architecture": info.kv.get("general.architecture"),
        "name": info.kv.get("general.name"),
        "outtype": outtype.lower(),
        "tensors": len(info.tensors),
        "vocab": len(info.kv.get("tokenizer.ggml.tokens", [])),
        "chat_template": "tokenizer.chat_template" in info.kv,
        "bytes": path.stat().st_size,
        "seconds": round(seconds, 2),
    }
    if json_out:
        print_json(result)
        return
    table = Table(title=f"exported {hf_dir.name}", show_header=False)
    for key in ("output", "architecture", "outtype", "tensors", "vocab", "chat_template"):
        table.add_row(key, str(result[key]))
    table.add_row("size", human_bytes(result["bytes"]))
    table.add_row("time", f"{seconds:.1f} s")
    console.print(table)
