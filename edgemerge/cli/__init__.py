"""The `edgemerge` command: a thin typer shell over the library.

Exit codes: 0 success, 1 internal error (a bug: please report it with --debug output), 2 bad input
(the message says what to fix), 3 an evaluation gate failed, 130 interrupted, 141 the reader of standard output
went away (`edgemerge langid f | head -1`: silent, as coreutils die of SIGPIPE).
Each command lives in its own module in this package and registers itself on `app`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import signal
import sys

import typer
from rich.markup import escape

from ..errors import EdgemergeError, one_line
from .common import app, err_console

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "common":
        importlib.import_module(f"{__name__}.{_mod.name}")


# Failures of the machine, not of edgemerge: one line and what to do, like bad input (exit 2)
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free some space or write to another disk (--out)",
    errno.EDQUOT: "free some space or write to another disk (--out)",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the disk is read-only: write to another one (--out)",
}


def _stdout_gone() -> None:
    """Point standard output at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; turns user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # without standalone mode typer returns the code of an exit instead of raising it, and turns Ctrl-C
        # (KeyboardInterrupt) into the exit code 130
        code = app(args=args, prog_name="edgemerge", standalone_mode=False)
        sys.stdout.flush()  # inside the try: a closed pipe is seen here, not at the interpreter's exit
    except BrokenPipeError:  # `| head -1` closed the pipe: stop quietly, like coreutils on SIGPIPE
        _stdout_gone()
        sys.exit(128 + signal.SIGPIPE)
    except SystemExit as e:  # typer turns a closed pipe (EPIPE) into a silent exit 1: make it the same 141
        if isinstance(e.__context__, OSError) and e.__context__.errno == errno.EPIPE:
            _stdout_gone()
            sys.exit(128 + signal.SIGPIPE)
        raise
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except typer.TyperException as e:  # usage errors (typer's own copy of click's): usage line + message
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except EdgemergeError as e:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(e.message)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: say so in one line unless --debug
        if debug:
            raise
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRORS:
            where = f" ({e.filename})" if e.filename else ""
            message = f"{e.strerror}{where}; {_ENVIRONMENT_ERRORS[e.errno]}"
            err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        err_console.print(
            f"[red]internal error:[/red] {type(e).__name__}: {escape(one_line(str(e)))} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if code == 130:
        err_console.print("[red]interrupted[/red]")
    if isinstance(code, int) and code:
        sys.exit(code)
