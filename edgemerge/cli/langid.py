"""`edgemerge langid`: the language of each line of a file (offline, py3langid)."""

from __future__ import annotations

import codecs
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from ..errors import EdgemergeError
from ..evaluate.langid import COMMON_LANGUAGES, detect
from .common import app, examples, listed

# a text's language shows in its first megabyte: the rest of a longer line is read past, never held
MAX_LINE_BYTES = 1 << 20


def _lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """The lines of `stream` without their newline, each cut to MAX_LINE_BYTES (memory stays bounded whatever
    the file holds); bytes that are not UTF-8 are an EdgemergeError giving their offset."""
    offset = 0
    while line := stream.readline(MAX_LINE_BYTES):
        start, head = offset, line
        offset += len(line)
        while not line.endswith(b"\n"):  # an over-long line: skip the rest of it
            line = stream.readline(MAX_LINE_BYTES)
            if not line:
                break
            offset += len(line)
        cut = len(head) == MAX_LINE_BYTES and not head.endswith(b"\n")
        try:  # a cut head may end inside a character: not final then
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=not cut)
        except UnicodeDecodeError as e:
            raise EdgemergeError(
                f"{name} is not UTF-8 (byte {start + e.start}); convert it, e.g. iconv -t UTF-8"
            ) from None
        yield text.removesuffix("\n")


@app.command(
    epilog=examples(
        "edgemerge langid corpus.txt | sort | uniq -c",
        "edgemerge langid corpus.txt --only eu,es,en --scores",
        "cat answers.txt | edgemerge langid -",
    )
)
def langid(
    file: Annotated[
        Path, typer.Argument(help="UTF-8 text file, one text per line ('-' reads standard input).")
    ],
    scores: Annotated[bool, typer.Option("--scores", help="Follow each code with its probability.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="ISO 639-1 codes to choose from, comma-separated or repeated (default: 29 common languages).",
            metavar="CODE[,CODE...]",
        ),
    ] = None,
    all_languages: Annotated[
        bool, typer.Option("--all", help="Choose among all 97 languages the model knows.")
    ] = False,
) -> None:
    """Print, for each input line, the detected ISO 639-1 code (`und` for a line without letters).

    Useful to check a corpus before using it. Offline: the model ships with py3langid.
    """

    if str(file) != "-" and not file.is_file():
        raise EdgemergeError(f"{file} not found; give a UTF-8 text file, one text per line")
    chosen = listed(only, "--only")
    candidates = None if all_languages else (tuple(chosen) if chosen else COMMON_LANGUAGES)
    out = sys.stdout
    with open(file, "rb") if str(file) != "-" else contextlib.nullcontext(sys.stdin.buffer) as stream:
        name = "standard input" if str(file) == "-" else str(file)
        for line in _lines(stream, name):
            d = detect(line, candidates)
            out.write(f"{d.lang}\t{d.confidence:.4f}\n" if scores else f"{d.lang}\n")
    out.flush()
