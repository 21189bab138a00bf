"""Atomic outputs and disk-space checks: partial files never carry a final name."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import EdgemergeError


def temp_sibling(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder, so the rename is atomic)."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of `final` (file or folder); rename it to `final` on success.

    On any exception the temporary is removed and `final` is left as it was.
    """
    final = Path(final)
    if final.exists() and not force:
        if final.is_dir() and not any(final.iterdir()):
            pass
        else:
            raise EdgemergeError(
                f"{final} already exists; choose another output or pass --force to replace it"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if final.exists():
        remove(final)
    os.replace(tmp, final)


def remove(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Fail before writing when the disk holding `path` has less than `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise EdgemergeError(
            f"not enough disk space for {what}: need {human_bytes(needed)}, "
            f"{human_bytes(free)} free at {path}; free some space or choose another output folder"
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
