"""Shared pieces of the command line: the typer app, consoles, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from .. import __version__
from ..progress import Progress, make_progress

app = typer.Typer(
    name="edgemerge",
    help=(
        "Turn an English-centric instruct LLM into an offline assistant in your language: "
        "W = W_instruct + sum_i w_i (W_lang_i - W_base), written as GGUF, quantized and checked with llama.cpp.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 eval gate failed, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Results (tables, JSON) go to stdout; progress and messages to stderr so pipes stay clean.
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"edgemerge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """edgemerge: language-vector merges shipped as tested GGUF files."""


def print_json(data: Any) -> None:
    """Write `data` as JSON to stdout (machine-readable output for --json)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def live_progress() -> Iterator[Progress | None]:
    """A progress display on a terminal; none when stderr is a pipe or a file (keeps logs clean)."""
    if not err_console.is_terminal:
        yield None
        return
    with make_progress(err_console) as progress:
        yield progress
