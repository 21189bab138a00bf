"""`edgemerge langid`: the language of each line of a file (offline, py3langid)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EdgemergeError
from .common import app


@app.command()
def langid(
    file: Annotated[
        Path, typer.Argument(help="UTF-8 text file, one text per line ('-' reads standard input).")
    ],
    scores: Annotated[bool, typer.Option("--scores", help="Follow each code with its probability.")] = False,
    only: Annotated[
        str | None,
        typer.Option(
            "--only", help="Comma-separated ISO 639-1 codes to choose from (default: 29 common languages)."
        ),
    ] = None,
    all_languages: Annotated[
        bool, typer.Option("--all", help="Choose among all 97 languages the model knows.")
    ] = False,
) -> None:
    """Print, for each input line, the detected ISO 639-1 code (`und` for a line without letters).

    Useful to check a corpus before using it. Offline: the model ships with py3langid.
    """
    from ..evaluate.langid import COMMON_LANGUAGES, detect

    if str(file) == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        if not file.is_file():
            raise EdgemergeError(f"{file} not found; give a UTF-8 text file, one text per line")
        data = file.read_bytes()
        name = str(file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgemergeError(
            f"{name} is not UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8"
        ) from None
    candidates = (
        None
        if all_languages
        else (tuple(c.strip() for c in only.split(",") if c.strip()) if only else COMMON_LANGUAGES)
    )
    out = sys.stdout
    for line in text.split("\n")[: -1 if text.endswith("\n") else None]:
        d = detect(line, candidates)
        out.write(f"{d.lang}\t{d.confidence:.4f}\n" if scores else f"{d.lang}\n")
    out.flush()
