"""`edgemerge imatrix`: an importance matrix computed by llama.cpp on target-language text (thin shell over
edgemerge.imatrix.make)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import EdgemergeError
from ..imatrix.collect import DEFAULT_BATCH, DEFAULT_CHUNK, ImatrixOptions
from ..imatrix.make import make_imatrix
from ..imatrix.text import bundled_languages
from .common import (
    MODEL_OPTION,
    app,
    console,
    err_console,
    examples,
    listed,
    live_progress,
    print_json,
    the_model,
)


@app.command(
    epilog=examples(
        "edgemerge imatrix model-F16.gguf --lang eu  # writes model-F16.imatrix.gguf",
        "edgemerge imatrix m-F16.gguf -l eu --mix en --chunks 200 -o eu-en.imatrix.gguf",
        "edgemerge quantize model-F16.gguf -q IQ3_M --imatrix model-F16.imatrix.gguf",
    )
)
def imatrix(
    model_arg: Annotated[
        Path | None,
        typer.Argument(
            help="GGUF to calibrate (F16/BF16/F32, or Q8_0 when F16 does not fit).",
            metavar="MODEL",
            show_default=False,
        ),
    ] = None,
    lang: Annotated[
        str | None,
        typer.Option(
            "--lang",
            "-l",
            help=f"Target language; its bundled text is used unless --text is given "
            f"(bundled: {', '.join(bundled_languages())}).",
        ),
    ] = None,
    text: Annotated[
        list[Path] | None,
        typer.Option("--text", "-f", help="Your own calibration text in --lang, UTF-8 (repeatable)."),
    ] = None,
    mix: Annotated[
        list[str] | None,
        typer.Option(
            "--mix",
            help="Also calibrate on the bundled text of these languages, e.g. en (comma-separated or repeated).",
            metavar="CODE[,CODE...]",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (default: MODEL.imatrix.gguf next to MODEL)."),
    ] = None,
    chunks: Annotated[
        int | None, typer.Option("--chunks", help="At most this many chunks (default: all the text gives).")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", "-c", help="Tokens per chunk (llama-imatrix -c).")
    ] = DEFAULT_CHUNK,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Tokens per llama_decode.")] = DEFAULT_BATCH,
    process_output: Annotated[
        bool, typer.Option("--process-output", help="Collect output.weight too (llama-imatrix's option).")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", help="Threads (default: idle cores).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    model_opt: Annotated[Path | None, MODEL_OPTION] = None,
) -> None:
    """Compute an importance matrix with llama.cpp's engine on text in the target language.

    Writes the GGUF imatrix format of llama-imatrix (its llama-quantize --imatrix reads it, and so does
    edgemerge quantize --imatrix). Chunks of --chunk-size tokens, each from an empty context, as llama-imatrix.
    """
    model = the_model(model_arg, model_opt, "imatrix")
    if lang is None:
        raise EdgemergeError(
            f"give the text's language: --lang eu (bundled text: {', '.join(bundled_languages())}; "
            "or --text FILE in that language)"
        )
    mix = listed(mix, "--mix")
    out = out or model.with_name(f"{model.stem}.imatrix.gguf")
    options = ImatrixOptions(
        chunk_size=chunk_size, chunks=chunks, batch=batch, output=process_output, threads=threads
    )
    with live_progress() as progress:
        result = make_imatrix(
            model, out, lang=lang, files=text, mix=mix, options=options, force=force, progress=progress
        )
    imx = result.imatrix
    for w in result.warnings:
        err_console.print(f"warning: {escape(w)}")
    if json_out:
        print_json(
            {
                "model": str(model),
                "output": str(out),
                "entries": len(imx.entries),
                "chunks": imx.chunk_count,
                "chunk_size": imx.chunk_size,
                "texts": result.texts,
                "warnings": result.warnings,
                "seconds": round(result.seconds, 2),
            }
        )
        return
    console.print(
        f"wrote {escape(str(out))}: {len(imx.entries)} weights, {imx.chunk_count} chunks of {imx.chunk_size} "
        f"tokens, in {result.seconds:.0f} s"
    )
    console.print(f"next: edgemerge quantize {escape(str(model))} -q IQ3_M --imatrix {escape(str(out))}")
