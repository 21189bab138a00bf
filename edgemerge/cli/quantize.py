"""`edgemerge quantize`: llama.cpp's quantizer, one output file per type (thin shell over edgemerge.quantize)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EdgemergeError
from ..files import human_bytes, prepare_output
from ..quantize import check_imatrix, check_quant, output_name
from ..quantize import quantize as run_quantize
from .common import MODEL_OPTION, app, console, examples, listed, live_progress, print_json, the_model


@app.command(
    epilog=examples(
        "edgemerge quantize model-F16.gguf -q Q4_K_M  # writes model-Q4_K_M.gguf",
        "edgemerge quantize model-F16.gguf -q Q4_K_M,Q5_K_M -q Q8_0 -o dist/",
        "edgemerge imatrix model-F16.gguf --lang eu  # then, calibrated:",
        "edgemerge quantize model-F16.gguf -q IQ3_M --imatrix model-F16.imatrix.gguf",
    )
)
def quantize(
    src: Annotated[
        Path | None, typer.Argument(help="Float GGUF to quantize (F16, BF16 or F32).", metavar="MODEL")
    ] = None,
    quant: Annotated[
        list[str] | None,
        typer.Option(
            "--quant",
            "-q",
            help="llama.cpp file types, e.g. Q4_K_M, Q5_K_M, Q6_K, Q8_0, IQ4_XS: comma-separated or repeated.",
            metavar="TYPE[,TYPE...]",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            "--out-dir",
            help="Folder for the outputs (default: next to the input).",
            metavar="DIR",
        ),
    ] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            "--imatrix",
            help="Importance matrix computed on this model (the .gguf llama-imatrix writes, or its legacy .dat); "
            "needed for IQ1_*, IQ2_*, IQ3_XXS, IQ3_XS and Q2_K_S.",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", help="Threads (default: all cores).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    model: Annotated[Path | None, MODEL_OPTION] = None,
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize, default settings).

    Writes NAME-<TYPE>.gguf per --quant (model-F16.gguf -> model-Q4_K_M.gguf: the hub's naming, as build's).
    Types (and the --imatrix file, against the model) are checked before any work starts; an unknown type
    lists the valid names.
    """

    src = the_model(src, model, "quantize")
    quants = listed(quant, "--quant")
    if quants is None:
        raise EdgemergeError(
            "give the types to make: -q Q4_K_M (several: -q Q4_K_M,Q8_0); edgemerge quantize --help"
        )
    names = [check_quant(q, imatrix=imatrix is not None) for q in quants]
    if len(set(names)) != len(names):
        raise EdgemergeError(f"--quant lists a type twice: {', '.join(quants)}")
    if imatrix is not None:
        check_imatrix(imatrix, src)
    folder = out_dir or src.parent
    for name in names:  # every output checked before the first file is written
        prepare_output(folder / output_name(src, name), force=force, inputs=[src, imatrix])
    src_size = src.stat().st_size if src.is_file() else 0
    rows = []
    with live_progress() as progress:
        for name in names:
            start = time.perf_counter()
            path = run_quantize(
                src,
                name,
                folder / output_name(src, name),
                threads=threads,
                force=force,
                progress=progress,
                imatrix=imatrix,
            )
            size = path.stat().st_size
            rows.append(
                {
                    "quant": name,
                    "output": str(path),
                    "bytes": size,
                    "ratio": round(size / src_size, 3) if src_size else None,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
    if json_out:
        print_json(
            {
                "input": str(src),
                "input_bytes": src_size,
                "imatrix": None if imatrix is None else str(imatrix),
                "outputs": rows,
            }
        )
        return
    table = Table(title=f"quantized {src.name} ({human_bytes(src_size)})")
    for col in ("type", "file", "size", "of input", "time"):
        table.add_column(col, justify="right" if col in ("size", "of input", "time") else "left")
    for r in rows:
        table.add_row(
            r["quant"],
            Path(r["output"]).name,
            human_bytes(r["bytes"]),
            f"{100 * (r['ratio'] or 0):.0f}%",
            f"{r['seconds']:.1f} s",
        )
    console.print(table)
