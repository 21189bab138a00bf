"""A build's state and cache: the work area beside the output folder, the finished stages it records, and the
stage runner that skips what is done (see the package docstring for what a build may delete)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgemergeError
from ..files import (
    atomic_output,
    check_path,
    clean_partials,
    contained,
    is_ours,
    lock_file,
    overlapping_input,
    read_marker,
    remove,
    remove_file,
    write_marker,
)
from ..hashes import sha256_file
from ..limits import shown_path
from ..package import CARD, EVAL_JSON, LADDER_PLOT, MANIFEST, MODELFILE, SWEEP_PLOT
from ..progress import Progress

WORK_SUFFIX = ".edgemerge"


WORK_PREFIX = "@work/"


STATE_FILE = "state.json"


STATE_VERSION = 1


PACKAGE_FILES = (CARD, MODELFILE, EVAL_JSON, MANIFEST)  # rewritten at the end of every build


@dataclass
class StageRecord:
    name: str
    key: str
    outputs: dict[str, dict]  # path relative to out -> {"size", "mtime_ns", "sha256"}
    seconds: float
    cached: bool = False

    def to_state(self) -> dict:
        return {"key": self.key, "outputs": self.outputs, "seconds": self.seconds}


@dataclass
class StageEvent:
    """Sent to `on_stage` before (`done` False) and after (`done` True) every stage."""

    name: str
    done: bool
    record: StageRecord | None = None


def stage_key(*parts: Any) -> str:
    """sha256 of the JSON of `parts`: what determines a stage's output."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def work_dir(out: Path) -> Path:
    """The build's work area, a hidden sibling of the output folder so the folder uploads as is:
    dist/name -> dist/.name.edgemerge (state.json, eval reports, the parent GGUF of --compare-parents)."""
    out = Path(out)
    return out.parent / f".{out.name}{WORK_SUFFIX}"


class BuildState:
    """The finished stages of one output folder, kept in its work area (`work_dir`)."""

    def __init__(self, out: Path):
        self.out = out
        self.work = work_dir(out)
        self.path = self.work / STATE_FILE
        self.data: dict[str, Any] = {"version": STATE_VERSION, "name": None, "stages": {}}
        if self.work.is_dir() and not self.work.is_symlink() and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # a damaged state only costs a rebuild
                data = None
            if _valid_state(data):
                self.data = data

    def relative(self, path: Path) -> str:
        """How an output is recorded: relative to the output folder, or `@work/...` inside the work area
        (so a folder moved together with its work area keeps its finished stages)."""
        path = Path(path)
        if path.is_relative_to(self.work):
            return WORK_PREFIX + path.relative_to(self.work).as_posix()
        return path.relative_to(self.out).as_posix()

    def resolve(self, rel: str) -> Path | None:
        """Where a recorded output is; None when the record points outside the output folder and its work
        area (absolute, `..`, through a symlink): such a path is never read as an output nor deleted."""
        if rel.startswith(WORK_PREFIX):
            return contained(self.work, rel.removeprefix(WORK_PREFIX))
        return contained(self.out, rel)

    def remove_output(self, rel: str) -> None:
        """Delete a recorded output file (only inside the folder or work area; never a folder tree)."""
        path = self.resolve(rel)
        if path is not None:
            remove_file(path)

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        """Write the state atomically and durably (fsynced before the rename the resume logic trusts). A work
        area this build creates is marked as edgemerge's (only a marked one is ever deleted whole)."""
        if not self.work.exists() or (self.work.is_dir() and not any(self.work.iterdir())):
            self.work.mkdir(parents=True, exist_ok=True)
            write_marker(self.work, "work", build=self.out.name)
        with atomic_output(self.path, force=True) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2), encoding="utf-8")

    def finished(self, name: str, key: str) -> dict | None:
        """The record of `name` if it ran with `key` and its outputs are still as it left them."""
        rec = self.stages.get(name)
        if rec is None or rec["key"] != key:
            return None
        for rel, meta in rec["outputs"].items():
            p = self.resolve(rel)
            if p is None or not p.is_file():
                return None
            st = p.stat()
            if st.st_size != meta["size"] or st.st_mtime_ns != meta["mtime_ns"]:
                return None
        return rec


class Stages:
    """Runs stages against a BuildState: skip when finished with the same key, else run and record."""

    def __init__(
        self,
        state: BuildState,
        on_stage: Callable[[StageEvent], None] | None = None,
        progress: Progress | None = None,
    ):
        self.state = state
        self.progress = progress
        self.on_stage = on_stage or (lambda e: None)
        self.records: dict[str, StageRecord] = {}

    def run(
        self,
        name: str,
        key: str,
        outputs: list[Path],
        fn: Callable[[], Any],
        hashes: dict[Path, str] | None = None,
    ) -> StageRecord:
        """Run `fn` unless the state has this stage done with this key; record its outputs' size, mtime and
        sha256 (from `hashes`, which `fn` may fill while writing, else read back)."""
        rec = self.state.finished(name, key)
        if rec is not None:
            record = StageRecord(name, key, rec["outputs"], rec["seconds"], cached=True)
            self.records[name] = record
            self.on_stage(StageEvent(name, True, record))
            return record
        self.on_stage(StageEvent(name, False))
        old = self.state.stages.pop(name, None)
        if old is not None:  # what the stage wrote last time, under names it may not write again
            for rel in old["outputs"]:
                if self.state.resolve(rel) not in outputs:
                    self.state.remove_output(rel)
            self.state.save()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        outs = {}
        for p in outputs:
            st = p.stat()
            outs[self.state.relative(p)] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": (hashes or {}).get(p) or sha256_file(p, self.progress),
            }
        record = StageRecord(name, key, outs, seconds)
        self.state.stages[name] = record.to_state()
        self.state.save()
        self.records[name] = record
        self.on_stage(StageEvent(name, True, record))
        return record


def _valid_state(data: Any) -> bool:
    """Whether `data` has the shape of a state file (a planted or damaged one is ignored: it costs a rebuild)."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return False
    if not isinstance(data.get("name"), str | None) or not isinstance(data.get("stages"), dict):
        return False
    for rec in data["stages"].values():
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            return False
        if not isinstance(rec.get("seconds"), int | float) or not isinstance(rec.get("outputs"), dict):
            return False
        for rel, meta in rec["outputs"].items():
            if not isinstance(rel, str) or not isinstance(meta, dict):
                return False
            if not all(isinstance(meta.get(k), int) for k in ("size", "mtime_ns")):
                return False
            if not isinstance(meta.get("sha256"), str):
                return False
    return True


def check_out_path(out: Path, inputs: list[Path]) -> None:
    """The output folder and its work area can be written and are none of the inputs (nor inside or around
    one): refused before anything is locked, written or deleted."""
    check_path(out, "--out")
    for p in (out, work_dir(out)):
        hit = overlapping_input(p, inputs)
        if hit is not None:
            inp, how = hit
            raise EdgemergeError(
                f"--out {shown_path(p)} {how} the input model {shown_path(inp)}; choose an output folder outside the inputs"
            )


def prepare_out(out: Path, name: str, *, force: bool) -> BuildState:
    """Check the output folder (new, empty, or an earlier edgemerge build: the same to resume, another only
    with --force) and its work area, and clean partial files of dead processes (`mark_unfinished` marks the
    folder once the build is about to write into it)."""
    out = Path(out)
    work = work_dir(out)
    check_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise EdgemergeError(f"{shown_path(out)} is a file; give a folder for --out")
    for p in (work, work / "eval", work / "parents"):  # a link there would lead the build's writes elsewhere
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise EdgemergeError(
                f"{shown_path(p)} (in the build's work area) is a symlink or a file edgemerge did not make; move it "
                "away or choose another --out"
            )
    state = BuildState(out)
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None or marker["kind"] != "build":
            raise EdgemergeError(
                f"{shown_path(out)} holds files that are not an edgemerge build; choose another --out (--force "
                "replaces only an earlier edgemerge build, never other files)"
            )
        found = marker.get("name") or state.name
        if found != name and not force:
            raise EdgemergeError(
                f"{shown_path(out)} holds another build ({shown_path(str(found), 60)}); choose another --out or pass "
                "--force to replace it"
            )
        if force:
            _remove_build(out, state)
            write_marker(out, "build", name=name, finished=False)  # the folder is this build's from now on
            state = BuildState(out)
    for folder in (out, state.work, state.work / "eval", state.work / "parents"):
        clean_partials(folder)
    state.data["name"] = name
    return state


def mark_unfinished(out: Path, name: str) -> None:
    """Before a build changes its folder: the folder says it is unfinished and no card, Modelfile, eval.json
    or manifest stays to describe an earlier build (written again, for this one, when it finishes). Creates
    the folder: nothing is written into it before the checks and the disk plan have passed."""
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "build", name=name, finished=False)
    for n in (*PACKAGE_FILES, SWEEP_PLOT, LADDER_PLOT):  # the plots belong to the card of an auto build
        remove_file(out / n)


def mark_finished(out: Path, name: str) -> None:
    """After the package is written: the folder holds a finished build."""
    write_marker(out, "build", name=name, finished=True)


def _manifest(out: Path) -> dict[str, Any]:
    """A finished folder's manifest.json ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_files(out: Path) -> list[Path]:
    """The files a build's manifest lists, each kept inside `out` (other entries are ignored)."""
    files = _manifest(out).get("files")
    if not isinstance(files, list):
        return []
    paths = [contained(out, f.get("name")) for f in files if isinstance(f, dict)]
    return [p for p in paths if p is not None]


def _remove_build(out: Path, state: BuildState) -> None:
    """Delete what an earlier build wrote (its recorded outputs, the files its manifest lists, its package
    files, its work area when marked as edgemerge's), nothing else. Called only for a marked build folder."""
    for rec in state.stages.values():
        for rel in rec["outputs"]:
            state.remove_output(rel)
    for p in _manifest_files(out):
        remove_file(p)
    for n in PACKAGE_FILES:
        remove_file(out / n)
    work = work_dir(out)
    if is_ours(work, "work"):
        remove(work)
    else:
        remove_file(work / STATE_FILE)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build per output folder at a time: an advisory lock on `.<name>.edgemerge.lock` beside it,
    removed afterwards (see `files.lock_file`)."""
    lock = out.parent / f".{out.name}{WORK_SUFFIX}.lock"
    busy = f"another edgemerge build is writing {shown_path(out)} now; wait for it to finish or choose another --out"
    with lock_file(lock, busy):
        yield


def drop_stale(state: BuildState, planned: set[str]) -> None:
    """Remove outputs of shipped-file stages the new plan no longer has (e.g. a quant dropped from the recipe)."""
    for name in list(state.stages):
        if name.startswith(("merge", "quantize", "imatrix")) and name not in planned:
            drop_stage(state, name)


def drop_stage(state: BuildState, name: str) -> None:
    """Remove a finished stage's outputs and its record (nothing when it has none)."""
    rec = state.stages.pop(name, None)
    if rec is not None:
        for rel in rec["outputs"]:
            state.remove_output(rel)
        state.save()
