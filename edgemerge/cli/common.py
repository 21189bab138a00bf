"""Shared pieces of the command line: the typer app, consoles, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperGroup, TyperOption

from .. import __version__
from ..errors import EdgemergeError
from ..limits import shown
from ..progress import Progress, make_progress

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT"}  # click's names for them


class _Option(TyperOption):
    """An option shown as click and llama.cpp show them: a switch with no value after it (typer 0.29 prints
    `<bool>`), a value by its metavar or its type in capitals (FILE, TEXT, INTEGER), not `<str>`."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        if self.is_flag:
            return None
        if self.metavar is not None:
            return self.metavar
        label = self.display_type(ctx).strip("<>").removeprefix("list[").removesuffix("]")  # repeatable: one
        return _TYPE_NAMES.get(label, label.upper())


class _Argument(TyperArgument):
    """An argument shown by its name, RECIPE (or [MODEL] when it may be left out), not `{RECIPE} <str>`."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


def _readable(command: Any) -> None:
    """Give every parameter of `command` and its subcommands the readable help of `_Option`/`_Argument`."""
    help_option = command.get_help_option(typer.Context(command))  # made once and cached by click
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if type(param) is TyperOption:
            param.__class__ = _Option
        elif type(param) is TyperArgument:
            param.__class__ = _Argument
    for sub in getattr(command, "commands", {}).values():
        _readable(sub)


def examples(*commands: str) -> str:
    """A command's --help epilog: its example command lines, one paragraph each (typer's rich help joins the
    lines of a paragraph)."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {escape(c)}" for c in commands)


class _Group(TyperGroup):
    """edgemerge's command group: typer builds it with every command in it, then their help is made readable
    (one place for all commands, instead of a `cls=` on each)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _readable(self)


app = typer.Typer(
    cls=_Group,
    name="edgemerge",
    help=(
        "Turn an English-centric instruct LLM into an offline assistant in your language: "
        "W = W_instruct + sum_i w_i (W_lang_i - W_base), written as GGUF, quantized and checked with llama.cpp.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 eval gate failed, 130 interrupted."
    ),
    epilog=examples(
        "edgemerge build --demo  # offline, a minute: every stage on a tiny model",
        "edgemerge recipes  # what --lang can build",
        "edgemerge build --lang eu",
        "edgemerge chat dist/qwen3-8b-eu/qwen3-8b-eu-Q4_K_M.gguf",
        "edgemerge COMMAND --help  # each command's options and examples",
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Results (tables, JSON) go to stdout; progress and messages to stderr so pipes stay clean.
# In a pipe or a file rich would fit tables into 80 columns and cut file names ("edgeme…"): there a line is as
# long as it needs (a table at its natural width), as `ls -l | cat` prints.
PIPE_WIDTH = 4096


def _console(stream) -> Console:
    return Console(file=None, stderr=stream is sys.stderr, width=None if stream.isatty() else PIPE_WIDTH)


console = _console(sys.stdout)
err_console = _console(sys.stderr)


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


def listed(values: list[str] | str | None, flag: str) -> list[str] | None:
    """The items of a list flag, given as repeats, commas or both (`-q Q4_K_M,Q5_K_M -q Q8_0`: three), None when
    the flag is not given; given with no item (`--quant ""`) it is refused rather than read as "not given" (the
    recipe's value would be used silently)."""
    if values is None or (not isinstance(values, str) and not values):
        return None
    given = [values] if isinstance(values, str) else list(values)
    items = [v.strip() for value in given for v in value.split(",") if v.strip()]
    if not items:
        raise EdgemergeError(
            f"{flag}: got {shown(','.join(given))}, no value; give at least one or leave the flag out"
        )
    return items


def numbers(values: list[str] | str | None, flag: str) -> list[float] | None:
    """The numbers of a list flag (`listed`), None when it is not given."""
    items = listed(values, flag)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise EdgemergeError(
            f"{flag}: {shown(','.join(items))} is not a number or a comma-separated list of numbers, e.g. 0.5,1.0"
        ) from None


MODEL_OPTION = typer.Option(
    "--model",
    "-m",
    help="The GGUF file, as llama.cpp's -m (instead of the MODEL argument).",
    show_default=False,
)


def the_model(argument: Path | None, option: Path | None, command: str) -> Path:
    """The model file given as the MODEL argument or as -m MODEL (llama.cpp's way), exactly once."""
    if argument is not None and option is not None:
        raise EdgemergeError(
            f"give the model once: edgemerge {command} MODEL or edgemerge {command} -m MODEL"
        )
    model = argument if argument is not None else option
    if model is None:
        raise EdgemergeError(f"give the GGUF file: edgemerge {command} MODEL.gguf (or -m MODEL.gguf)")
    return model


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
