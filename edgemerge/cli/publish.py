"""`edgemerge publish`: a build folder -> a Hugging Face hub model repo (thin shell over edgemerge.publish)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..files import human_bytes
from ..publish import publish as publish_folder
from .common import app, console, err_console, examples, live_progress, print_json


@app.command(
    epilog=examples(
        "edgemerge publish dist/qwen3-8b-eu --repo alice/qwen3-8b-eu --dry-run",
        "edgemerge publish dist/qwen3-8b-eu --repo alice/qwen3-8b-eu --private",
    )
)
def publish(
    folder: Annotated[Path, typer.Argument(help="The output folder of `edgemerge build`.", metavar="DIR")],
    repo: Annotated[
        str, typer.Option("--repo", help="The hub model repo, user/name (created when missing).")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (when it is new).")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the folder and list what would be uploaded; send nothing."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Upload a build folder to the Hugging Face hub, as `hf upload` would, after checking it.

    Uploads exactly what manifest.json lists, each file checked against its sha256 (a file changed after the
    build is refused), with the repo id filled into the model card's commands. A GGUF above the hub's 50 GB
    per-file limit goes up as llama.cpp split shards (NAME-00001-of-0000N.gguf). Run it again after an
    interruption: files already on the hub are not sent again. Needs a token with write access
    (`hf auth login` or HF_TOKEN).
    """
    with live_progress() as progress:
        result = publish_folder(folder, repo, private=private, dry_run=dry_run, progress=progress)
    if json_out:
        print_json(result.to_dict())
    else:
        _print_summary(result)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False, soft_wrap=True)


def _print_summary(result) -> None:
    title = f"{'would upload' if result.dry_run else 'uploaded'} to {result.repo}"
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in result.files:
        table.add_row(escape(f["name"]), "" if f["size"] is None else human_bytes(f["size"]))
    console.print(table)
    for name, shards in result.split.items():
        console.print(
            f"{escape(name)} is above the hub's 50 GB per-file limit: uploaded as {len(shards)} llama.cpp shards",
            highlight=False,
        )
    if result.card_filled:
        verb = "would name" if result.dry_run else "now name"
        console.print(f"README.md: the card's commands {verb} {escape(result.repo)}", highlight=False)
    if result.dry_run:
        console.print("dry run: nothing was written or sent", highlight=False)
        return
    tag = (result.recommended or {}).get("type") or "Q4_K_M"
    console.print(f"[bold]{result.url}[/bold] is ready. Try it:", highlight=False)
    for line in (f"llama-cli -hf {result.repo}:{tag} -cnv", f"ollama run hf.co/{result.repo}:{tag}"):
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
