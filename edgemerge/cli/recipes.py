"""`edgemerge recipes`: the bundled recipes, listed, shown, or copied to start your own (thin shell over
edgemerge.recipe)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..files import atomic_output
from ..recipe import bundled_recipe_file, recipe_summaries
from .common import app, console, examples, print_json

EXAMPLES = examples(
    "edgemerge recipes",
    "edgemerge recipes show qwen3-8b-eu",
    "edgemerge recipes copy qwen3-8b-eu my-eu.yaml  # edit it, then:",
    "edgemerge build --recipe my-eu.yaml",
)
recipes_app = typer.Typer(
    help="The bundled recipes: list them, show one, copy one to start your own.",
    no_args_is_help=False,
    epilog=EXAMPLES,
    rich_markup_mode="rich",
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON on stdout.")] = False,
) -> None:
    """List the bundled recipes and the examples: languages, method, instruct model, whether every model is set."""
    if ctx.invoked_subcommand is not None:
        return
    rows = recipe_summaries(examples=True)
    if json_out:
        print_json(rows)
        return
    for example in (False, True):
        title = (
            "examples: the paper's other methods (--recipe NAME names one; --lang never picks one)"
            if example
            else "bundled recipes (edgemerge build --lang CODE picks one; --recipe NAME names one)"
        )
        table = Table(title=title)
        for col in ("name", "languages", "method", "instruct", "ready"):
            table.add_column(col)
        for r in rows:
            if r["example"] == example:
                ready = "yes" if not r["missing"] else f"no ({', '.join(r['missing'])} model not set)"
                table.add_row(r["name"], ",".join(r["languages"]), r["method"], r["instruct"], ready)
        console.print(table)


@recipes_app.command("show", epilog=examples("edgemerge recipes show qwen3-8b-eu > my-eu.yaml"))
def show(name: Annotated[str, typer.Argument(help="A bundled recipe's name, e.g. qwen3-8b-eu.")]) -> None:
    """Print a bundled (or example) recipe's YAML, comments included."""
    sys.stdout.write(bundled_recipe_file(name).read_text(encoding="utf-8"))  # as is: no wrapping, no markup


@recipes_app.command(
    "copy",
    epilog=examples(
        "edgemerge recipes copy qwen3-8b-eu my-eu.yaml  # edit it, then:",
        "edgemerge build --recipe my-eu.yaml",
    ),
)
def copy(
    name: Annotated[str, typer.Argument(help="A bundled recipe's name, e.g. llama3.1-8b-eu.")],
    dest: Annotated[Path, typer.Argument(help="The new recipe file.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Copy a bundled recipe to a file of your own, to edit and build with --recipe FILE."""
    text = bundled_recipe_file(name).read_text(encoding="utf-8")
    with atomic_output(dest, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    console.print(f"wrote {escape(str(dest))}: edit it, then edgemerge build --recipe {escape(str(dest))}")
