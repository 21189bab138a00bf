"""Outputs, in one place: what a command may replace, atomic writes, partials, locks, disk-space checks.

The rule every command follows (`check_output`, applied again by `atomic_output` when it writes):
- an output path must be valid UTF-8, its parents folders (not a file, not a dangling symlink), and it must not
  be a dangling symlink itself;
- an output never equals, lies inside or contains an input of the same command (refused, --force or not);
- an existing *file* (or a symlink: only the link is replaced) is replaced only with --force;
- an existing *folder* is replaced only with --force and only when edgemerge wrote it (it carries the marker
  file `MARKER`, written into every folder edgemerge creates); a folder of other content is never replaced.
  An empty folder holds nothing to lose and is replaced without --force.
Writes go to a hidden sibling `.<name>.partial-<pid>`, fsynced, renamed over the final name, and the folder is
fsynced after the rename: a final name always holds a complete file. Partials whose process is gone are removed
by the next write of the same output. One writer per output at a time (an advisory lock beside it).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import filelock

from . import __version__
from .errors import EdgemergeError
from .limits import shown_path

MARKER = ".edgemerge-output"  # written into every folder edgemerge creates: "edgemerge wrote this folder"
LOCK_SUFFIX = ".edgemerge-lock"
_MARKER_MAX = 64 * 1024
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d{1,10})(?:-old)?$")
_INPUT_ENTRIES = 10_000  # a model folder has tens of files: a bound, not a limit met in practice
_NAME_MAX = 255 - len(".partial-4294967295-old") - 1  # room for the temporary name beside the final one


def temp_sibling(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder, so the rename is atomic)."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def check_path(path: Path, what: str = "output") -> None:
    """Refuse an output path that cannot be written as asked: not UTF-8, a dangling symlink, a name too long
    for its temporary sibling, or a parent that is a file or a dangling symlink."""
    path = Path(path)
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgemergeError(
            f"{what} path {shown_path(path)} is not valid UTF-8; choose a name in UTF-8"
        ) from None
    if "\x00" in text or path.name in ("", ".", ".."):
        raise EdgemergeError(
            f"{what} path {shown_path(path)} is not a usable file name; choose another {what}"
        )
    if len(path.name.encode("utf-8")) > _NAME_MAX:
        raise EdgemergeError(
            f"{what} name {shown_path(path.name, 60)} is too long ({len(path.name)} characters); choose a shorter one"
        )
    full = Path(os.path.abspath(path))
    if full.is_symlink() and not full.exists():
        raise EdgemergeError(
            f"{what} {shown_path(path)} is a symlink to a missing path ({shown_path(os.readlink(full), 60)}); remove the "
            f"link or choose another {what}"
        )
    for parent in full.parents:
        if parent.is_dir():
            break
        if parent.is_symlink() and not parent.exists():
            raise EdgemergeError(
                f"{what} {shown_path(path)}: {shown_path(parent)} is a symlink to a missing path; remove the link or choose "
                f"another {what}"
            )
        if parent.exists() or parent.is_symlink():
            raise EdgemergeError(
                f"{what} {shown_path(path)}: {shown_path(parent)} is a file, not a folder; choose another {what}"
            )


def _forms(path: Path) -> set[Path]:
    """A path as given (made absolute) and with its symlinks resolved: an overlap through either counts."""
    forms = {Path(os.path.abspath(path))}
    with contextlib.suppress(OSError, RuntimeError):
        forms.add(Path(path).resolve())
    return forms


def _input_forms(inp: Path) -> set[Path]:
    """`_forms` of an input, and for a folder also where its symlinked entries lead (a hub snapshot's files
    are links into the cache's blobs: those blobs are the input's bytes too)."""
    forms = _forms(inp)
    if inp.is_dir():
        with contextlib.suppress(OSError):
            for i, entry in enumerate(os.scandir(inp)):
                if i >= _INPUT_ENTRIES:
                    break
                if entry.is_symlink():
                    with contextlib.suppress(OSError, RuntimeError):
                        forms.add(Path(entry.path).resolve())
    return forms


def overlapping_input(final: Path, inputs: Iterable[Path | None]) -> tuple[Path, str] | None:
    """The first input that `final` equals, lies inside or contains, and how; None when there is none."""
    outs = _forms(final)
    for inp in inputs:
        if inp is None:
            continue
        for i in _input_forms(Path(inp)):
            for o in outs:
                if o == i:
                    return Path(inp), "is"
                if o.is_relative_to(i):
                    return Path(inp), "is inside"
                if i.is_relative_to(o):
                    return Path(inp), "contains"
    return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """What the marker of `folder` says (kind, and e.g. a build's name) when edgemerge wrote the folder; None
    otherwise (no marker, a symlink, too large, not edgemerge's JSON)."""
    marker = Path(folder) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > _MARKER_MAX:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("written_by") != "edgemerge"
        or not isinstance(data.get("kind"), str)
    ):
        return None
    return data


def is_ours(folder: Path, kind: str | None = None) -> bool:
    """Whether edgemerge wrote `folder` (a folder carrying the marker), of `kind` if given."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    data = read_marker(folder)
    return data is not None and (kind is None or data["kind"] == kind)


def write_marker(folder: Path, kind: str, **info: Any) -> None:
    """Mark `folder` as written by edgemerge (`kind`: what it is, e.g. "build", "merge"); durable."""

    data = {"written_by": "edgemerge", "version": __version__, "kind": kind, **info}
    write_durably(Path(folder) / MARKER, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_durably(path: Path, text: str) -> None:
    """Write a small text file atomically and durably (temporary sibling, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)


def check_output(
    final: Path, *, force: bool = False, inputs: Iterable[Path | None] = (), replace_dir: bool = True
) -> None:
    """Raise EdgemergeError unless the command may write `final` (the rule in the module docstring).
    `replace_dir` False: a folder at `final` is never replaced (reports are files)."""
    final = Path(final)
    check_path(final)
    hit = overlapping_input(final, inputs)
    if hit is not None:
        inp, how = hit
        raise EdgemergeError(
            f"output {shown_path(final)} {how} the input {shown_path(inp)}; choose an output outside the inputs"
        )
    if final.is_symlink():  # a live link (dangling ones are refused): replacing it leaves its target alone
        if not force:
            raise EdgemergeError(
                f"{shown_path(final)} already exists; choose another output or pass --force to replace it"
            )
        return
    if not final.exists():
        return
    if final.is_dir():
        if not replace_dir:
            raise EdgemergeError(f"{shown_path(final)} is a folder; give the path of a file to write")
        if not any(final.iterdir()):
            return
        if not is_ours(final):
            raise EdgemergeError(
                f"{shown_path(final)} is a folder edgemerge did not write; choose another output (--force replaces "
                "only files and folders edgemerge wrote)"
            )
    elif not final.is_file():
        raise EdgemergeError(f"{shown_path(final)} is not a regular file or folder; choose another output")
    if not force:
        raise EdgemergeError(
            f"{shown_path(final)} already exists; choose another output or pass --force to replace it"
        )


def prepare_output(
    final: Path, *, force: bool = False, inputs: Iterable[Path | None] = (), replace_dir: bool = True
) -> None:
    """Before a command writes `final`: remove the partials of `final` whose process is gone (even when the
    write is then refused, so a killed run's leftovers go with the next run), then `check_output`."""
    final = Path(final)
    check_path(final)
    clean_partials(final.parent, final.name)
    check_output(final, force=force, inputs=inputs, replace_dir=replace_dir)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts). Where it cannot be asked without
    side effects (Windows: os.kill would end it) every writer counts as alive: a partial is kept, never lost."""
    if os.name == "nt":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether `pid` has exited but not been reaped yet (Linux: state Z in /proc; elsewhere unknown: False)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("Z", "X")


def stale_partials(folder: Path, name: str | None = None) -> list[Path]:
    """Temporaries in `folder` (of the output `name`, or of any) left by processes that are gone; a live
    writer's are never listed, nor folders that are neither empty nor edgemerge's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob.escape(name)}.partial-*" if name is not None else ".*.partial-*"
    stale = []
    for p in folder.glob(pattern):
        m = _PARTIAL.match(p.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink() and any(p.iterdir()) and not is_ours(p):
            continue
        stale.append(p)
    return sorted(stale)


def clean_partials(folder: Path, name: str | None = None) -> list[Path]:
    """Remove `stale_partials(folder, name)`; returns what was removed."""
    stale = stale_partials(folder, name)
    for p in stale:
        remove(p)
    return stale


@contextlib.contextmanager
def output_lock(final: Path, message: str | None = None) -> Iterator[None]:
    """One writer of `final` at a time: `lock_file` on `.<name>.edgemerge-lock` beside it; EdgemergeError
    (`message`) when another process is writing it."""
    final = Path(final)
    busy = message or (
        f"another edgemerge process is writing {shown_path(final)} now; wait for it to finish or choose another output"
    )
    with lock_file(final.with_name(f".{final.name}{LOCK_SUFFIX}"), busy):
        yield


@contextlib.contextmanager
def lock_file(lock: Path, busy: str) -> Iterator[None]:
    """An advisory lock (flock, through filelock's UnixFileLock) on the file `lock`, created and removed
    afterwards; EdgemergeError(`busy`) when another holder has it: another process, or another call in this one
    (each call takes a fresh, non-singleton lock object, and filelock re-enters only the same object). No lock
    where flock is missing (Windows). The lock goes with its process: a killed writer holds none."""
    if not filelock.has_fcntl:
        yield
        return
    lock = Path(os.path.abspath(lock))
    made_parent = not lock.parent.exists()  # removed again if nothing else was put there
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = None
    for _ in range(3):  # a holder unlinking between filelock's open and its flock makes it give up: try again
        attempt = filelock.UnixFileLock(lock, timeout=0, is_singleton=False, fallback_to_soft=False)
        try:
            attempt.acquire()
        except filelock.Timeout:
            continue
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            raise EdgemergeError(
                f"cannot lock {shown_path(lock)}: its file system has no file locks (flock); write to a local disk"
            ) from None
        held = attempt
        break
    if held is None:
        raise EdgemergeError(busy)
    try:
        yield
    finally:
        # unlinked while still held: a contender that opened this inode finds it unlinked once it gets the flock
        # and gives up (filelock checks st_nlink), so no two holders ever sit on two inodes of one name
        lock.unlink(missing_ok=True)
        held.release()
        if made_parent:
            with contextlib.suppress(OSError):
                lock.parent.rmdir()


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation in `folder` durable (no-op where folders cannot be opened, i.e. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a tree (what a writer left in the page cache)."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    if path.is_dir():
        for root, _dirs, names in os.walk(path):
            for n in names:
                fsync_tree(Path(root) / n)
            fsync_dir(Path(root))


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` over `final` (a file, a symlink, nothing, or a folder the checks allowed replacing)."""
    if final.is_dir() and not final.is_symlink():
        # a folder cannot be renamed over: move it aside under a partial name (a crash here leaves a stale
        # partial the next run removes), then rename and remove the old one
        old = final.with_name(f".{final.name}.partial-{os.getpid()}-old")
        remove(old)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the old one back: the failed write changes nothing
            raise
        remove(old)
    elif tmp.is_dir() and (final.is_symlink() or final.exists()):
        final.unlink()  # a folder cannot be renamed over a file or a link either
        os.replace(tmp, final)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output(
    final: Path,
    *,
    force: bool = False,
    inputs: Iterable[Path | None] = (),
    kind: str | None = None,
    replace_dir: bool = True,
    locked: bool = False,
) -> Iterator[Path]:
    """Yield a temporary sibling path of `final`; on success fsync it and rename it to `final`.

    `check_output` decides whether `final` may be written (`force`, `inputs`, `replace_dir`). `kind`: the output
    is a folder: the temporary is created and marked as edgemerge's (`write_marker`) before it is yielded.
    Stale partials of `final` are removed first (`prepare_output`); the write holds `output_lock(final)`
    (`locked`: the caller already holds it). On any exception the temporary is removed and `final` is left as it was.
    """
    final = Path(final)
    inputs = list(inputs)
    prepare_output(final, force=force, inputs=inputs, replace_dir=replace_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if locked else output_lock(final):
        check_output(final, force=force, inputs=inputs, replace_dir=replace_dir)  # as it is now, locked
        tmp = temp_sibling(final)
        remove(tmp)
        try:
            if kind is not None:
                tmp.mkdir()
                write_marker(tmp, kind)
            yield tmp
            fsync_tree(tmp)
            _replace(tmp, final)
        except BaseException:
            remove(tmp)
            raise
        fsync_dir(final.parent)


def remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder tree if it exists. Only for paths edgemerge
    names itself (temporaries, checked outputs); paths read from a file go through `contained` and
    `remove_file`."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_file(path: Path) -> bool:
    """Remove a file or a symlink; never a folder (a recorded output is a file: a folder there is not ours)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    return False


def contained(base: Path, rel: Any) -> Path | None:
    """`base / rel` when `rel` (read from a state file or manifest) is a relative path that stays inside
    `base` once symlinks are resolved; None otherwise (absolute, `..`, a symlink out, not a string)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return None
    p = PurePosixPath(rel)
    if not p.parts or p.is_absolute() or ".." in p.parts or p.parts[0].endswith(":"):
        return None
    candidate = Path(base) / p
    try:
        root = Path(base).resolve()
        real = candidate.resolve()
    except (OSError, RuntimeError):
        return None
    if real == root or not real.is_relative_to(root):
        return None
    return candidate


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


def si_bytes(n: float) -> str:
    """Bytes in powers of 1000 (4.92 GB), as the Hugging Face hub and Ollama show file sizes and as --max-size
    5GB counts them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
