"""Progress reporting for library calls: the CLI passes a rich Progress, Python callers may pass None."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich import get_console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .files import human_bytes


def make_progress(console=None, *, transient: bool = True) -> Progress:
    """A rich progress display with sizes, elapsed time and ETA, drawn only on a terminal.

    There it is transient: each bar goes away when its task ends (`task`) and the display when it stops, so only
    the lines printed through `progress.console` (the stages) stay on screen. In a pipe or a log file nothing is
    drawn (rich would print every bar once more at the end); `progress.console.print` still prints."""
    shown_on = console if console is not None else get_console()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not shown_on.is_terminal,
    )


@contextlib.contextmanager
def task(
    progress: Progress | None, description: str, total: float | None, *, unit: str = "bytes"
) -> Iterator[Callable[[float], None]]:
    """Open a progress task; yield `advance(amount)`. With no progress display, advancing does nothing."""
    if progress is None:
        yield lambda amount: None
        return

    def detail(done: float) -> str:
        if total is None:
            return ""
        if unit == "bytes":
            return f"{human_bytes(done)}/{human_bytes(total)}"
        return f"{int(done)}/{int(total)} {unit}"

    tid = progress.add_task(description, total=total, detail=detail(0))
    done = 0.0

    def advance(amount: float) -> None:
        nonlocal done
        done += amount
        progress.update(tid, advance=amount, detail=detail(done))

    try:
        yield advance
    finally:
        progress.remove_task(tid)  # a finished bar goes away: the display shows what is running


__all__ = ["DownloadColumn", "MofNCompleteColumn", "Progress", "make_progress", "task"]
