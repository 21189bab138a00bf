"""What a build may delete and how it marks itself (edgemerge/build/state.py's state and output functions), on
hostile folders built on the fly: a foreign folder (even one with its own manifest.json) is never an earlier
build, paths from a planted state.json or manifest never reach outside the folder or its work area, --force
removes only what the earlier build listed, partials of dead processes are cleaned, an unfinished build carries
no card or manifest. The real builds at the end go through `edgemerge.cli.main` (issue 19 classes 2 and 8)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from edgemerge.build import (
    PACKAGE_FILES,
    BuildOptions,
    BuildState,
    Stages,
    build,
    drop_stale,
    mark_finished,
    mark_unfinished,
    prepare_out,
    work_dir,
)
from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.files import MARKER, read_marker, write_marker
from edgemerge.recipe import load_recipe

from .test_files import dead_pid, foreign_folder, snapshot

NAME = "tiny-eu"


def fake_build(out: Path, name: str = NAME) -> BuildState:
    """A finished build folder made by the library's own state functions (no model work): two GGUFs, an eval
    report in the work area, the package files, a manifest listing them."""
    state = prepare_out(out, name, force=False)
    mark_unfinished(out, name)
    stages = Stages(state)
    ggufs = {"merge": out / f"{name}-F16.gguf", "quantize Q8_0": out / f"{name}-Q8_0.gguf"}
    for stage, f in ggufs.items():
        stages.run(stage, f"key-{stage}", [f], lambda f=f: f.write_bytes(b"GGUF" + f.name.encode()))
    report = state.work / "eval" / "x.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    stages.run("eval x", "key-eval", [report], lambda: report.write_text("{}"))
    for n in PACKAGE_FILES:
        (out / n).write_text(n)
    files = [f.name for f in ggufs.values()] + list(PACKAGE_FILES[:-1])
    (out / "manifest.json").write_text(json.dumps({"name": name, "files": [{"name": n} for n in files]}))
    mark_finished(out, name)
    return state


def outside(tmp: Path) -> Path:
    """Files that no build under tmp/dist may touch."""
    d = tmp / "outside"
    (d / "deep").mkdir(parents=True)
    (d / "keep.txt").write_text("keep")
    (d / "deep" / "keep.gguf").write_bytes(b"GGUF keep")
    return d


# ---- a folder of other content is never an earlier build ---------------------------------------------------


def _foreign_with_manifest_of_this_name(t):
    d = foreign_folder(t / "dist" / NAME)
    (d / "manifest.json").write_text(json.dumps({"name": NAME, "files": [{"name": "index.html"}]}))
    return d


def _foreign_with_manifest(t):
    return foreign_folder(t / "dist" / NAME)


def _merge_folder(t):  # edgemerge wrote it, but it is a Hugging Face merge, not a build
    d = t / "dist" / NAME
    d.mkdir(parents=True)
    write_marker(d, "merge")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def _marker_link(t):
    real = t / "real"
    fake_build(real)
    d = foreign_folder(t / "dist" / NAME)
    (d / MARKER).symlink_to(real / MARKER)
    return d


def _marker_copied_without_marker(t):  # a finished build's files, its marker removed: not recognisable
    d = t / "dist" / NAME
    fake_build(d)
    (d / MARKER).unlink()
    shutil.rmtree(work_dir(d))
    return d


FOREIGN = [
    _foreign_with_manifest_of_this_name,
    _foreign_with_manifest,
    _merge_folder,
    _marker_link,
    _marker_copied_without_marker,
]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("make", FOREIGN, ids=[f.__name__[1:] for f in FOREIGN])
def test_a_folder_of_other_content_is_never_an_earlier_build(make, force, tmp_path):
    out = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(EdgemergeError, match="not an edgemerge build") as e:
        prepare_out(out, NAME, force=force)
    assert "\n" not in e.value.message
    assert snapshot(tmp_path) == before


def test_force_removes_only_what_the_earlier_build_listed(tmp_path):
    out = tmp_path / "dist" / NAME
    fake_build(out, "other-eu")
    (out / "notes.txt").write_text("the user's own notes")
    (out / "photos").mkdir()
    (out / "photos" / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(EdgemergeError, match=r"holds another build \(other-eu\).*--force"):
        prepare_out(out, NAME, force=False)
    state = prepare_out(out, NAME, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "notes.txt", "photos"])
    assert (out / "photos" / "a.jpg").read_bytes() == b"jpg"
    assert state.stages == {} and state.name == NAME
    assert read_marker(out)["name"] == NAME and read_marker(out)["finished"] is False


# ---- paths read from a planted state.json or manifest stay inside ------------------------------------------

ESCAPING = [
    ("absolute", lambda t: str(t / "outside" / "keep.txt")),
    ("absolute folder", lambda t: str(t / "outside")),
    ("dotdot", lambda t: "../../outside/keep.txt"),
    ("dotdot folder", lambda t: ".."),
    ("the folder itself", lambda t: "."),
    ("work dotdot", lambda t: "@work/../../outside/keep.txt"),
    ("work absolute", lambda t: "@work/" + str(t / "outside" / "keep.txt")),
    ("work itself", lambda t: "@work/"),
    ("symlink out", lambda t: "escape/keep.txt"),
    ("symlink to a folder", lambda t: "escape"),
    ("symlink to a file", lambda t: "filelink"),
]


def plant(out: Path, tmp: Path, rel: str) -> None:
    """A marked build folder whose state and manifest name `rel`, with symlinks leading outside."""
    fake_build(out)
    (out / "escape").symlink_to(tmp / "outside")
    (out / "filelink").symlink_to(tmp / "outside" / "keep.txt")
    state_file = work_dir(out) / "state.json"
    state = json.loads(state_file.read_text())
    meta = {"size": 4, "mtime_ns": 1, "sha256": "x"}
    for rec in state["stages"].values():
        rec["outputs"][rel] = meta
    state["stages"]["quantize Q2_X"] = {"key": "gone", "outputs": {rel: meta}, "seconds": 1.0}
    state_file.write_text(json.dumps(state))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] += [{"name": rel}, {"name": 7}, "junk"]
    (out / "manifest.json").write_text(json.dumps(manifest))


def _rebuild(out: Path) -> None:
    """A plain rebuild of every stage (no --force): each stage removes what it wrote last time."""
    state = BuildState(out)
    for name in list(state.stages):
        Stages(state).run(name, "new-key", [], lambda: None)


def _resume(out: Path) -> None:
    """A resume: finished() reads every recorded output (with the recorded key, so it gets that far)."""
    state = BuildState(out)
    assert not any(state.finished(n, rec["key"]) for n, rec in state.stages.items())


OPERATIONS = {
    "rebuild": _rebuild,
    "drop stale": lambda out: drop_stale(BuildState(out), {"merge"}),  # a quant dropped from the recipe
    "force": lambda out: prepare_out(out, "other-eu", force=True),  # --force, another recipe name
    "resume": _resume,
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize(("case", "rel"), ESCAPING, ids=[c[0] for c in ESCAPING])
def test_planted_paths_delete_nothing_outside(tmp_path, case, rel, operation):
    keep = outside(tmp_path)
    out = tmp_path / "dist" / NAME
    plant(out, tmp_path, rel(tmp_path))
    before = snapshot(keep)
    OPERATIONS[operation](out)
    assert snapshot(keep) == before
    assert out.is_dir() and (out / "escape").is_symlink()


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"version": 1, "name": NAME, "stages": []},
        {"version": 1, "name": NAME, "stages": {"merge": {"key": "k", "outputs": ["x"], "seconds": 1}}},
        {"version": 1, "name": NAME, "stages": {"merge": {"key": 1, "outputs": {}, "seconds": 1}}},
        {"version": 1, "name": 5, "stages": {}},
        {
            "version": 1,
            "name": NAME,
            "stages": {"m": {"key": "k", "outputs": {"a": {"size": "1"}}, "seconds": 1}},
        },
    ],
    ids=["list", "stages list", "outputs list", "key int", "name int", "size str"],
)
def test_a_state_of_the_wrong_shape_is_ignored(tmp_path, state):
    out = tmp_path / "dist" / NAME
    fake_build(out)
    (work_dir(out) / "state.json").write_text(json.dumps(state))
    loaded = BuildState(out)
    assert loaded.stages == {} and loaded.name is None
    prepare_out(out, NAME, force=True)  # nothing to trip on


@pytest.mark.parametrize("where", [".", "eval", "parents"], ids=["work area", "eval", "parents"])
def test_a_work_area_that_is_a_symlink_is_refused(tmp_path, where):
    keep = outside(tmp_path)
    out = tmp_path / "dist" / NAME
    out.mkdir(parents=True)
    (keep / "state.json").write_text(json.dumps({"version": 1, "name": NAME, "stages": {}}))
    if where == ".":
        work_dir(out).symlink_to(keep)
    else:
        work_dir(out).mkdir()
        (work_dir(out) / where).symlink_to(keep)
    before = snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(EdgemergeError, match="work area"):
            prepare_out(out, NAME, force=force)
    assert snapshot(tmp_path) == before


def test_a_work_area_edgemerge_did_not_make_is_never_deleted_whole(tmp_path):
    out = tmp_path / "dist" / NAME
    fake_build(out, "other-eu")
    work = work_dir(out)
    shutil.rmtree(work)
    (work / "notes").mkdir(parents=True)  # someone's own folder under that name, with a planted state
    (work / "notes" / "todo.txt").write_text("mine")
    (work / "state.json").write_text(json.dumps({"version": 1, "name": "other-eu", "stages": {}}))
    state = prepare_out(out, NAME, force=True)
    state.save()
    assert (work / "notes" / "todo.txt").read_text() == "mine"
    assert not (work / MARKER).exists()  # not marked as edgemerge's: a later --force still keeps it


# ---- leftovers and half states -----------------------------------------------------------------------------


def test_stale_partials_are_cleaned_live_ones_kept(tmp_path):
    out = tmp_path / "dist" / NAME
    state = fake_build(out)
    dead, live = dead_pid(), os.getppid()
    planted = {
        "stale": [
            out / f".{NAME}-Q8_0.gguf.partial-{dead}",
            state.work / f".state.json.partial-{dead}",
            state.work / "eval" / f".x.json.partial-{dead}",
        ],
        "kept": [out / f".{NAME}-Q4_K_M.gguf.partial-{live}", out / "sub" / f".x.partial-{dead}"],
    }
    for p in planted["stale"] + planted["kept"]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    prepare_out(out, NAME, force=False)
    assert not any(p.exists() for p in planted["stale"])
    assert all(p.exists() for p in planted["kept"])


def test_an_unfinished_build_has_no_card_or_manifest(tmp_path):
    out = tmp_path / "dist" / NAME
    fake_build(out)
    assert read_marker(out)["finished"] is True
    mark_unfinished(out, NAME)
    assert read_marker(out)["finished"] is False
    assert not any((out / n).exists() for n in PACKAGE_FILES)
    assert (out / f"{NAME}-F16.gguf").exists()  # the GGUFs stay: finished stages are reused


@pytest.fixture(scope="module")
def finished_build(build_family, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("outputs-build") / NAME
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # piped, as `| tee log`
        code = _main(["build", "--recipe", build_family["recipe"], "--out", out, "--skip-eval"])
    assert code == 0, stderr.getvalue()
    PIPED[out] = (stdout.getvalue(), stderr.getvalue())
    return out


PIPED: dict[Path, tuple[str, str]] = {}  # finished_build's output, as a pipe or a log file receives it


def test_piped_build_output_is_whole(finished_build):
    """Not a terminal: no line cut to 80 columns (every file name and the folder whole, no "…"), no progress
    bar printed at the end, the stage lines kept, and the disk plan's files apart from its spare margin."""
    out_text, err_text = PIPED[finished_build]
    files = json.loads((finished_build / "manifest.json").read_text())["files"]
    assert "…" not in out_text + err_text
    for f in files:
        assert f["name"] in out_text
    assert (
        str(finished_build) in out_text
        and f"edgemerge chat {finished_build / f'{NAME}-Q4_K_M.gguf'}" in out_text
    )
    assert "━" not in err_text and "ETA" not in err_text  # rich's bars: drawn on a terminal only
    assert "✓ merge" in err_text and "✓ quantize Q8_0" in err_text
    plan = re.search(
        r"disk plan: the build writes ([\d.]+) (\w+) \((.*?)\) and keeps 64.0 MB spare", err_text
    )
    assert plan is not None, err_text
    unit = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    parts = [float(v) * unit[u] for v, u in re.findall(r" ([\d.]+) (KB|MB|GB)", plan.group(3))]
    total = float(plan.group(1)) * unit[plan.group(2)]
    assert parts and abs(total - sum(parts)) <= 0.05 * unit[plan.group(2)] * (len(parts) + 1)


def test_a_finished_bar_goes_away():
    from rich.console import Console

    from edgemerge.progress import make_progress, task

    screen = io.StringIO()
    with make_progress(Console(file=screen, force_terminal=True, width=100)) as progress:
        with task(progress, "first", 10) as advance:
            advance(10)
            assert [t.description for t in progress.tasks] == ["first"]
        with task(progress, "second", None):
            assert [t.description for t in progress.tasks] == ["second"]
        assert progress.tasks == []
    log = io.StringIO()  # not a terminal: the stage lines only, no bar at the end
    with make_progress(Console(file=log, force_terminal=False, width=100)) as progress:
        with task(progress, "quantize", 10) as advance:
            advance(10)
        progress.console.print("✓ quantize 1.0 s")
    assert log.getvalue() == "✓ quantize 1.0 s\n"


def _main(args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_an_interrupted_rebuild_does_not_look_finished(finished_build, build_family, tmp_path):
    out = tmp_path / NAME
    shutil.copytree(finished_build, out)
    shutil.copytree(work_dir(finished_build), work_dir(out))
    assert read_marker(out) == read_marker(finished_build) and read_marker(out)["finished"] is True
    old_quant = (out / f"{NAME}-Q8_0.gguf").read_bytes()

    def interrupt_after_merge(e):
        if e.done and e.name == "merge":
            raise KeyboardInterrupt

    recipe = load_recipe(build_family["recipe"])
    with pytest.raises(KeyboardInterrupt):  # a new weight: new F16, then killed before the quants
        build(recipe, BuildOptions(out=out, skip_eval=True, weights=[0.3]), on_stage=interrupt_after_merge)
    assert (out / f"{NAME}-Q8_0.gguf").read_bytes() == old_quant  # the old quant is still there...
    assert not any((out / n).exists() for n in PACKAGE_FILES)  # ...but no card or manifest describes it
    assert read_marker(out)["finished"] is False

    assert (
        _main(["build", "--recipe", build_family["recipe"], "--out", out, "--skip-eval", "--weight", "0.3"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["merge"]["cached"] and not manifest["stages"]["quantize Q8_0"]["cached"]
    assert manifest["recipe"]["languages"][0]["weight"] == 0.3
    assert read_marker(out)["finished"] is True


def test_build_with_a_planted_state_deletes_nothing_outside(finished_build, build_family, tmp_path):
    keep = outside(tmp_path)
    out = tmp_path / "dist" / NAME
    shutil.copytree(finished_build, out)
    shutil.copytree(work_dir(finished_build), work_dir(out))
    state_file = work_dir(out) / "state.json"
    state = json.loads(state_file.read_text())
    meta = {"size": 4, "mtime_ns": 1, "sha256": "x"}
    escapes = [str(keep / "keep.txt"), "../../outside/keep.txt", "@work/../outside/deep/keep.gguf", ".."]
    state["stages"]["quantize Q2_X"] = {"key": "k", "outputs": dict.fromkeys(escapes, meta), "seconds": 1}
    state["stages"]["merge"]["outputs"].update(dict.fromkeys(escapes, meta))
    state_file.write_text(json.dumps(state))
    before = snapshot(keep)
    recipe = yaml.safe_load(build_family["recipe"].read_text())
    assert recipe["name"] == NAME
    # no --force: the merge is redone (its record changed) and the planted quant stage is dropped
    assert _main(["build", "--recipe", build_family["recipe"], "--out", out, "--skip-eval"]) == 0
    assert snapshot(keep) == before
    assert json.loads((out / "manifest.json").read_text())["name"] == NAME
