"""The one rule for outputs (edgemerge/files.py), on hostile fixtures built on the fly: what may be replaced,
never an input nor a folder of other content, paths read from files kept inside their folder, bad output paths
refused with one line, stale partials of dead processes removed (never a live writer's), one writer at a time.

Issue 19 classes 2 (deleting what edgemerge did not write), 7 (output paths) and 8 (leftovers); the commands'
own cases through `edgemerge.cli.main` are in tests/test_outputs_cli.py."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import filelock
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.files import (
    MARKER,
    atomic_output,
    clean_partials,
    contained,
    is_ours,
    lock_file,
    output_lock,
    pid_alive,
    remove_file,
    temp_sibling,
    write_marker,
)
from edgemerge.limits import shown_path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders, the target for links): 'left intact' means
    an equal snapshot."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = os.readlink(p).encode()
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = None
    return out


def foreign_folder(p: Path) -> Path:
    """A folder of someone else's files (a web app's, with its own manifest.json)."""
    (p / "sub").mkdir(parents=True)
    (p / "index.html").write_text("<html>mine</html>")
    (p / "manifest.json").write_text(json.dumps({"name": "my-app", "files": [{"name": "index.html"}]}))
    (p / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    return p


def ours_folder(p: Path) -> Path:
    p.mkdir(parents=True)
    write_marker(p, "merge")
    (p / "model.safetensors").write_bytes(b"old")
    return p


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_exited_unreaped_writer_counts_as_gone():
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # it has exited; not reaped: a zombie, pid taken
    try:
        assert not pid_alive(proc.pid)
        assert pid_alive(os.getpid()) and not pid_alive(0)
    finally:
        proc.wait()


def write(final: Path, data: bytes = b"new", **kw) -> None:
    with atomic_output(final, **kw) as tmp:
        tmp.write_bytes(data)


# (case, setup(tmp) -> (final, inputs), kwargs, refused message or None for allowed)
def _file(tmp):
    (tmp / "out.gguf").write_bytes(b"old")
    return tmp / "out.gguf", []


def _foreign(tmp):
    return foreign_folder(tmp / "out"), []


def _ours(tmp):
    return ours_folder(tmp / "out"), []


def _empty(tmp):
    (tmp / "out").mkdir()
    return tmp / "out", []


def _input_is_output(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    return tmp / "model", [tmp / "model"]


def _input_is_ours(tmp):  # an edgemerge merge folder used as the input of an export: still an input
    return ours_folder(tmp / "model"), [tmp / "model"]


def _inside_input(tmp):
    (tmp / "model").mkdir()
    return tmp / "model" / "x.gguf", [tmp / "model"]


def _contains_input(tmp):
    (tmp / "d" / "model").mkdir(parents=True)
    (tmp / "d" / MARKER).write_text('{"written_by": "edgemerge", "kind": "merge"}')  # even a marked one
    return tmp / "d", [tmp / "d" / "model"]


def _link_to_input(tmp):
    (tmp / "m.gguf").write_bytes(b"model")
    (tmp / "link.gguf").symlink_to(tmp / "m.gguf")
    return tmp / "link.gguf", [tmp / "m.gguf"]


def _input_via_dotdot(tmp):
    (tmp / "model").mkdir()
    (tmp / "other").mkdir()
    return tmp / "other" / ".." / "model", [tmp / "model"]


def _hub_blob(tmp):  # a hub snapshot: its files are links into the cache's blobs, which are the input too
    (tmp / "blobs").mkdir()
    (tmp / "blobs" / "3f2a").write_bytes(b"weights")
    (tmp / "snapshot").mkdir()
    (tmp / "snapshot" / "model.safetensors").symlink_to(tmp / "blobs" / "3f2a")
    return tmp / "blobs" / "3f2a", [tmp / "snapshot"]


def _planted_marker_link(tmp):  # a marker that is a symlink to a real marker elsewhere is not ours
    real = ours_folder(tmp / "real")
    foreign_folder(tmp / "out")
    (tmp / "out" / MARKER).symlink_to(real / MARKER)
    return tmp / "out", []


def _marker_not_ours(tmp):  # a file of that name with other content is not edgemerge's marker
    foreign_folder(tmp / "out")
    (tmp / "out" / MARKER).write_text('{"kind": "merge"}')
    return tmp / "out", []


def _live_link(tmp):
    (tmp / "target.txt").write_bytes(b"target")
    (tmp / "out.gguf").symlink_to(tmp / "target.txt")
    return tmp / "out.gguf", []


REPLACE_CASES = [
    ("file without --force", _file, {}, "already exists"),
    ("file with --force", _file, {"force": True}, None),
    ("foreign folder without --force", _foreign, {}, "did not write"),
    ("foreign folder with --force", _foreign, {"force": True}, "did not write"),
    ("edgemerge folder without --force", _ours, {}, "already exists"),
    ("edgemerge folder with --force", _ours, {"force": True}, None),
    ("empty folder", _empty, {}, None),
    ("output is the input", _input_is_output, {"force": True}, "is the input"),
    ("output is an edgemerge-written input", _input_is_ours, {"force": True}, "is the input"),
    ("output inside the input", _inside_input, {"force": True}, "is inside the input"),
    ("output contains the input", _contains_input, {"force": True}, "contains the input"),
    ("output is a symlink to the input", _link_to_input, {"force": True}, "is the input"),
    ("output reaches the input through ..", _input_via_dotdot, {"force": True}, "is the input"),
    ("output is a hub snapshot's blob", _hub_blob, {"force": True}, "is the input"),
    ("marker is a symlink", _planted_marker_link, {"force": True}, "did not write"),
    ("marker of other content", _marker_not_ours, {"force": True}, "did not write"),
    ("report onto a folder", _ours, {"force": True, "replace_dir": False}, "is a folder"),
    ("report onto an empty folder", _empty, {"force": True, "replace_dir": False}, "is a folder"),
    ("live symlink without --force", _live_link, {}, "already exists"),
    ("live symlink with --force", _live_link, {"force": True}, None),
]


@pytest.mark.parametrize(("case", "setup", "kw", "refused"), REPLACE_CASES, ids=[c[0] for c in REPLACE_CASES])
def test_what_an_output_may_replace(tmp_path, case, setup, kw, refused):
    final, inputs = setup(tmp_path)
    others = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(final.name)}
    before = snapshot(tmp_path)
    if refused is not None:
        with pytest.raises(EdgemergeError, match=refused) as e:
            write(final, inputs=inputs, **kw)
        assert "\n" not in e.value.message
        assert snapshot(tmp_path) == before  # nothing deleted, nothing written, no partial or lock left
        return
    write(final, inputs=inputs, **kw)
    assert final.read_bytes() == b"new" and not final.is_symlink()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(final.name)} == others  # e.g. a link's target
    assert not [k for k in after if ".partial-" in k or k.endswith(".edgemerge-lock")]


def test_folder_outputs_carry_the_marker_and_replace_only_their_kind_of_owner(tmp_path):
    out = tmp_path / "merged"
    with atomic_output(out, kind="merge") as tmp:
        (tmp / "config.json").write_text("{}")
    assert is_ours(out, "merge") and (out / "config.json").exists()
    with atomic_output(out, kind="merge", force=True) as tmp:  # --force onto edgemerge's own folder works
        (tmp / "config.json").write_text('{"v": 2}')
    assert json.loads((out / "config.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


BAD_PATHS = [
    (
        "dangling symlink",
        lambda t: (t / "out.gguf").symlink_to(t / "missing") or t / "out.gguf",
        "missing path",
    ),
    ("under a file", lambda t: (t / "f").write_text("x") and t / "f" / "out.gguf", "is a file, not a folder"),
    ("deep under a file", lambda t: (t / "f").write_text("x") and t / "f" / "a" / "b.gguf", "is a file"),
    (
        "under a dangling symlink",
        lambda t: (t / "d").symlink_to(t / "gone") or t / "d" / "out.gguf",
        "symlink to a missing path",
    ),
    ("not UTF-8", lambda t: t / os.fsdecode(b"out\xff\xfe.gguf"), "not valid UTF-8"),
    ("name too long", lambda t: t / ("x" * 240 + ".gguf"), "too long"),
    ("a device", lambda t: Path("/dev/null"), "not a regular file"),
    ("the parent folder", lambda t: t / "sub" / "..", "not a usable file name"),
    ("the root", lambda t: Path("/"), "not a usable file name"),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD_PATHS, ids=[c[0] for c in BAD_PATHS])
def test_bad_output_paths_are_one_line_errors(tmp_path, case, make, message):
    final = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(EdgemergeError, match=message) as e:
        write(final, force=True)
    msg = e.value.message
    assert "\n" not in msg and len(msg) < 400
    msg.encode("utf-8")  # printable: no lone surrogates from the path
    assert snapshot(tmp_path) == before


def test_messages_show_a_short_printable_path():
    assert shown_path("a" * 1000).count("a") <= 120
    assert shown_path(os.fsdecode(b"x\xff")) == "x\\udcff"
    assert "\n" not in shown_path("a\nb")


ESCAPES = [
    ("absolute", lambda t: str(t / "outside" / "keep.txt")),
    ("dotdot", lambda t: "../outside/keep.txt"),
    ("dotdot inside", lambda t: "sub/../../outside/keep.txt"),
    ("symlinked folder", lambda t: "link/keep.txt"),
    ("symlinked file", lambda t: "filelink"),
    ("the folder itself", lambda t: "."),
    ("empty", lambda t: ""),
    ("not a string", lambda t: ["keep.txt"]),
    ("backslashes", lambda t: "..\\outside\\keep.txt"),
]


@pytest.mark.parametrize(("case", "rel"), ESCAPES, ids=[c[0] for c in ESCAPES])
def test_paths_read_from_files_stay_inside(tmp_path, case, rel):
    base = tmp_path / "out"
    (base / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    (base / "link").symlink_to(tmp_path / "outside")
    (base / "filelink").symlink_to(tmp_path / "outside" / "keep.txt")
    assert contained(base, rel(tmp_path)) is None
    assert contained(base, "sub/x.gguf") == base / "sub" / "x.gguf"


def test_remove_file_never_removes_a_tree(tmp_path):
    foreign_folder(tmp_path / "d")
    before = snapshot(tmp_path)
    assert remove_file(tmp_path / "d") is False
    assert snapshot(tmp_path) == before


def test_stale_partials_of_dead_processes_are_removed_never_a_live_writers(tmp_path):
    final = tmp_path / "m.gguf"
    dead, live = dead_pid(), os.getppid()
    stale_file = tmp_path / f".m.gguf.partial-{dead}"
    stale_file.write_bytes(b"half")
    stale_old = tmp_path / f".m.gguf.partial-{dead}-old"  # a folder moved aside when a crash came
    ours_folder(stale_old)
    live_file = tmp_path / f".m.gguf.partial-{live}"
    live_file.write_bytes(b"writing")
    foreign = foreign_folder(tmp_path / f".m.gguf.partial-{dead}-x")  # not our name pattern: kept
    other = tmp_path / f".other.gguf.partial-{dead}"  # another output's: not this write's business
    other.write_bytes(b"other")
    unmarked = foreign_folder(tmp_path / f".n.gguf.partial-{dead}")  # a folder that is not ours: kept
    write(final)
    assert final.read_bytes() == b"new"
    assert not stale_file.exists() and not stale_old.exists()
    assert live_file.read_bytes() == b"writing" and foreign.exists() and other.exists()
    assert clean_partials(tmp_path) == [other]  # the folder-wide clean (build's) takes the other output's
    assert unmarked.exists() and live_file.exists()


def test_failed_write_leaves_the_old_output_and_no_partial(tmp_path):
    final = tmp_path / "x.gguf"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(final, force=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    assert not temp_sibling(final).exists()


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    final = tmp_path / "x.gguf"
    with atomic_output(final) as tmp:
        tmp.write_bytes(b"first")
        with pytest.raises(EdgemergeError, match="another edgemerge process is writing"):
            write(final, force=True)
        # another process too (the lock is an OS lock, not a flag of this process)
        code = subprocess.run(
            [sys.executable, "-c", _SECOND_WRITER, str(final)],
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert code.returncode == 3, code.stderr
    assert final.read_bytes() == b"first"
    with output_lock(final):  # released, and no lock file left behind
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


@pytest.mark.skipif(not filelock.has_fcntl, reason="no flock here: lock_file takes no lock")
def test_one_holder_per_lock_within_this_process_too(tmp_path):
    """filelock re-enters a lock object it already holds; lock_file takes a fresh one per call, so a second call
    is refused like another process: nested, by another spelling of the path, from another thread."""
    lock = tmp_path / "made" / ".x.edgemerge-lock"
    (tmp_path / "alias").symlink_to("made", target_is_directory=True)
    refused = []

    def second(path: Path) -> None:
        try:
            with lock_file(path, "busy"):
                refused.append(False)
        except EdgemergeError as e:
            refused.append(e.message == "busy")

    with lock_file(lock, "busy"):
        assert lock.exists()
        second(lock)
        second(tmp_path / "alias" / lock.name)
        t = threading.Thread(target=second, args=(lock,))
        t.start()
        t.join(timeout=60)
    assert refused == [True, True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias"]  # the lock and the folder it made are gone


def test_a_holder_finishing_under_a_contender_leaves_one_holder(tmp_path, monkeypatch):
    """lock_file unlinks its file while still holding it: a contender that opened that inode gets the flock only
    after the unlink, sees it unlinked (filelock checks st_nlink) and takes a fresh file instead."""
    fcntl = pytest.importorskip("fcntl")
    unix = importlib.import_module(filelock.UnixFileLock.__module__)
    if not hasattr(unix, "lock_fd_nonblocking"):
        pytest.skip(
            f"filelock {filelock.__version__} flocks elsewhere; this test patches lock_fd_nonblocking"
        )
    lock = tmp_path / ".x.edgemerge-lock"
    real, flocks = unix.lock_fd_nonblocking, []
    holder = contextlib.ExitStack()
    holder.enter_context(lock_file(lock, "busy"))

    def flock(fd: int) -> bool:
        if not flocks:
            holder.close()  # the holder finishes between the contender's open and its flock
        flocks.append(os.fstat(fd).st_nlink)
        return real(fd)

    monkeypatch.setattr(unix, "lock_fd_nonblocking", flock)
    with lock_file(lock, "busy"):
        assert flocks[0] == 0 and flocks[-1] == 1  # the unlinked inode was not taken, the fresh file was
        with open(lock, "a") as f, pytest.raises(BlockingIOError):  # the file at the path is the one held
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock.exists()


_SECOND_WRITER = """
import sys
from pathlib import Path
from edgemerge.errors import EdgemergeError
from edgemerge.files import atomic_output
try:
    with atomic_output(Path(sys.argv[1]), force=True) as tmp:
        tmp.write_bytes(b"second")
except EdgemergeError as e:
    sys.exit(3 if "another edgemerge process is writing" in e.message else 4)
"""
