"""Every command's outputs through `edgemerge.cli.main` (issue 19 classes 2, 7 and 8): --force never replaces
an input or a folder edgemerge did not write, reports never replace a folder, bad output paths exit 2 with one
line, a killed run's partial is removed by the next run (a live writer's is kept), a second concurrent writer
of one output is refused. The library rule itself is tested in tests/test_files.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgemerge.files import MARKER, output_lock, write_marker

from .shared import need_shared
from .test_files import dead_pid, foreign_folder, snapshot


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.strip().startswith("error: ") and err.strip().count("\n") == 0, (
        err
    )  # (build's progress: a blank)
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def family(build_family, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the tiny build family (tests here point outputs at its folders)."""
    root = tmp_path_factory.mktemp("outputs-family")
    for role in ("instruct", "base", "eu"):
        shutil.copytree(build_family[role], root / build_family[role].name)
    shutil.copy(build_family["recipe"], root / "recipe.yaml")
    return {
        "instruct": root / build_family["instruct"].name,
        "base": root / build_family["base"].name,
        "eu": root / build_family["eu"].name,
        "recipe": root / "recipe.yaml",
        "root": root,
    }


@pytest.fixture(scope="module")
def gguf(family, tmp_path_factory) -> Path:
    from edgemerge.pipeline import export_hf

    return export_hf(family["instruct"], tmp_path_factory.mktemp("outputs-gguf") / "instruct-f16.gguf")


def stories(tmp_path: Path) -> Path:
    dst = tmp_path / "in" / "stories-f32.gguf"
    dst.parent.mkdir()
    shutil.copy(need_shared("models", "stories260K", "stories260K.gguf"), dst)
    return dst


# ---- class 2: --force never replaces an input or a folder of other content --------------------------------


def _export_onto_input(f, t):
    return ["export", f["instruct"], "--out", f["instruct"], "--force"], "is the input"


def _export_into_input(f, t):
    return ["export", f["instruct"], "--out", f["instruct"] / "model.gguf", "--force"], "is inside the input"


def _export_onto_foreign(f, t):
    return ["export", f["instruct"], "--out", foreign_folder(t / "site"), "--force"], "did not write"


def _export_around_input(f, t):
    return ["export", f["instruct"], "--out", f["root"], "--force"], "contains the input"


def _merge_onto_instruct(f, t):
    return ["merge", f["recipe"], "--out", f["instruct"], "--force"], "is the input"


def _merge_gguf_onto_base(f, t):
    return ["merge", f["recipe"], "--gguf", f["base"], "--force"], "is the input"


def _merge_gguf_onto_foreign(f, t):
    return ["merge", f["recipe"], "--gguf", foreign_folder(t / "site"), "--force"], "did not write"


def _merge_onto_foreign(f, t):
    return ["merge", f["recipe"], "--out", foreign_folder(t / "site"), "--force"], "did not write"


def _build_onto_foreign(f, t):
    site = foreign_folder(t / "site")
    return [
        "build",
        "--recipe",
        f["recipe"],
        "--out",
        site,
        "--force",
        "--skip-eval",
    ], "not an edgemerge build"


def _build_onto_input(f, t):
    return ["build", "--recipe", f["recipe"], "--out", f["instruct"], "--force"], "is the input model"


def _build_onto_merge_folder(f, t):  # an edgemerge folder, but not a build: not an earlier build either
    d = t / "merged"
    d.mkdir()
    write_marker(d, "merge")
    (d / "model.safetensors").write_bytes(b"weights")
    return ["build", "--recipe", f["recipe"], "--out", d, "--force", "--skip-eval"], "not an edgemerge build"


def _eval_json_onto_folder(f, t):
    d = t / "dist"
    d.mkdir()
    (d / "model-Q8_0.gguf").write_bytes(b"GGUF model")
    return ["eval", t / "m.gguf", "--lang", "eu", "--report", d], "is a folder"


def _eval_markdown_onto_empty_folder(f, t):
    (t / "empty").mkdir()
    return ["eval", t / "m.gguf", "--lang", "eu", "--markdown", t / "empty"], "is a folder"


def _eval_json_onto_model(f, t):
    return ["eval", t / "m.gguf", "--lang", "eu", "--report", t / "m.gguf"], "is the input"


def _eval_markdown_onto_ref(f, t):
    (t / "ref.gguf").write_bytes(b"GGUF ref")
    args = ["eval", t / "m.gguf", "--lang", "eu", "--ref", t / "ref.gguf", "--markdown", t / "ref.gguf"]
    return args, "is the input"


def _merge_onto_recipe(f, t):  # the recipe is an input of merge too
    return ["merge", f["recipe"], "--out", f["recipe"], "--force"], "is the input"


def _merge_gguf_onto_recipe(f, t):
    return ["merge", f["recipe"], "--gguf", f["recipe"], "--force"], "is the input"


def _merge_around_recipe(f, t):  # a folder edgemerge wrote, holding the recipe the merge reads
    d = t / "merged"
    d.mkdir()
    write_marker(d, "merge")
    recipe = shutil.copy(f["recipe"], d / "recipe.yaml")
    text = Path(recipe).read_text().replace("./", str(f["root"]) + "/")
    Path(recipe).write_text(text)
    return ["merge", recipe, "--out", d, "--force"], "contains the input"


def _eval_markdown_onto_gates_recipe(f, t):
    args = ["eval", t / "m.gguf", "--lang", "eu", "--recipe", f["recipe"], "--markdown", f["recipe"]]
    return args, "is the input"


def _quantize_onto_foreign(f, t):
    pytest.importorskip("llama_cpp")
    (t / "q").mkdir()
    foreign_folder(t / "q" / "m-Q8_0.gguf")
    return ["quantize", t / "m.gguf", "-q", "Q8_0", "--out-dir", t / "q", "--force"], "did not write"


NEVER_REPLACED = [
    _export_onto_input,
    _export_into_input,
    _export_onto_foreign,
    _export_around_input,
    _merge_onto_instruct,
    _merge_gguf_onto_base,
    _merge_gguf_onto_foreign,
    _merge_onto_foreign,
    _build_onto_foreign,
    _build_onto_input,
    _build_onto_merge_folder,
    _eval_json_onto_folder,
    _eval_markdown_onto_empty_folder,
    _eval_json_onto_model,
    _eval_markdown_onto_ref,
    _quantize_onto_foreign,
    _merge_onto_recipe,
    _merge_gguf_onto_recipe,
    _merge_around_recipe,
    _eval_markdown_onto_gates_recipe,
]


@pytest.mark.parametrize("case", NEVER_REPLACED, ids=[c.__name__[1:] for c in NEVER_REPLACED])
def test_force_never_replaces_an_input_or_a_folder_of_other_content(case, family, tmp_path, cli):
    (tmp_path / "m.gguf").write_bytes(
        b"GGUF model"
    )  # the eval and quantize input (refused before it is read)
    args, message = case(family, tmp_path)
    before = snapshot(family["root"]), snapshot(tmp_path)
    code, _, err = cli(*args)
    one_line_error(code, err, message)
    assert (snapshot(family["root"]), snapshot(tmp_path)) == before


def test_force_replaces_what_edgemerge_wrote(family, tmp_path, cli):
    out = tmp_path / "merged"
    code, _, err = cli("merge", family["recipe"], "--out", out)
    assert code == 0, err
    assert (out / MARKER).is_file()
    code, _, err = cli("export", out, "--out", out / "x.gguf", "--force")  # inside its input: refused
    one_line_error(code, err, "is inside the input")
    code, _, err = cli("merge", family["recipe"], "--gguf", out, "--force")  # an edgemerge folder: replaced
    assert code == 0, err
    assert out.is_file()
    code, _, err = cli("export", family["instruct"], "--out", out, "--force")  # a file: replaced
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---- class 7: output paths that cannot be written: exit 2, one line --------------------------------------


def _dangling(t):
    (t / "link.gguf").symlink_to(t / "nowhere" / "x.gguf")
    return t / "link.gguf", "missing path"


def _under_file(t):
    (t / "notes.txt").write_text("mine")
    return t / "notes.txt" / "x.gguf", "is a file, not a folder"


def _not_utf8(t):
    return t / os.fsdecode(b"caf\xe9.gguf"), "not valid UTF-8"


BAD_PATHS = [_dangling, _under_file, _not_utf8]
COMMANDS = {
    "export": lambda f, p: ["export", f["instruct"], "--out", p],
    "merge --gguf": lambda f, p: ["merge", f["recipe"], "--gguf", p],
    "merge --out": lambda f, p: ["merge", f["recipe"], "--out", p],
    "eval --report": lambda f, p: ["eval", f["root"] / "m.gguf", "--lang", "eu", "--report", p],
    "eval --markdown": lambda f, p: ["eval", f["root"] / "m.gguf", "--lang", "eu", "--markdown", p],
    "build": lambda f, p: ["build", "--recipe", f["recipe"], "--out", p, "--skip-eval"],
    "quantize --out-dir": lambda f, p: ["quantize", f["root"] / "m.gguf", "-q", "Q8_0", "--out-dir", p],
}


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[b.__name__[1:] for b in BAD_PATHS])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_output_paths_exit_2_with_one_line(command, bad, family, tmp_path, cli):
    if command in ("build", "quantize --out-dir"):
        pytest.importorskip("llama_cpp")  # both check their quant types first
    path, message = bad(tmp_path)
    before = snapshot(family["root"]), snapshot(tmp_path)
    code, _, err = cli(*COMMANDS[command](family, path))
    one_line_error(code, err, message)
    assert (snapshot(family["root"]), snapshot(tmp_path)) == before


# ---- class 8: partials of a killed run, concurrent writers -------------------------------------------------


def plant_partials(final: Path) -> tuple[Path, Path]:
    """A killed run's partial (dead pid) and a live writer's (this test's parent process) beside `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = final.with_name(f".{final.name}.partial-{dead_pid()}")
    live = final.with_name(f".{final.name}.partial-{os.getppid()}")
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    return stale, live


def test_next_run_removes_a_killed_runs_partial_not_a_live_writers(family, gguf, tmp_path, cli):
    outputs = {
        "merge --out": (tmp_path / "hf", ["merge", family["recipe"], "--out", tmp_path / "hf"]),
        "merge --gguf": (tmp_path / "m.gguf", ["merge", family["recipe"], "--gguf", tmp_path / "m.gguf"]),
        "export": (tmp_path / "e.gguf", ["export", family["instruct"], "--out", tmp_path / "e.gguf"]),
    }
    stale_dir = tmp_path / f".hf.partial-{dead_pid()}"  # a killed merge --out: a marked folder
    stale_dir.mkdir()
    write_marker(stale_dir, "merge")
    (stale_dir / "model-00001.safetensors").write_bytes(b"half")
    for name, (final, args) in outputs.items():
        stale, live = plant_partials(final)
        code, _, err = cli(*args)
        assert code == 0, (name, err)
        assert final.exists() and not stale.exists() and live.read_bytes() == b"being written", name
    assert not stale_dir.exists()


@pytest.mark.parametrize(
    "command",
    [
        lambda f, out: ["merge", f["recipe"], "--gguf", out],
        lambda f, out: ["export", f["instruct"], "--out", out],
        lambda f, out: ["merge", f["recipe"], "--out", out],
    ],
    ids=["merge --gguf onto a file", "export onto a file", "merge --out onto a file"],
)
def test_a_refused_run_still_removes_a_killed_runs_partial(command, family, tmp_path, cli):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"an earlier output")
    stale, live = plant_partials(out)
    code, _, err = cli(*command(family, out))
    one_line_error(code, err)
    assert not stale.exists() and live.exists() and out.read_bytes() == b"an earlier output"


def test_quantize_and_eval_remove_a_killed_runs_partial(tmp_path, cli):
    pytest.importorskip("llama_cpp")
    src = stories(tmp_path)
    q = tmp_path / "in" / "stories-Q8_0.gguf"
    report = tmp_path / "r" / "report.json"
    partials = [plant_partials(q), plant_partials(report)]
    code, _, err = cli("quantize", src, "-q", "Q8_0")
    assert code == 0, err
    code, _, err = cli(
        "eval", q, "--lang", "en", "--quick", "--max-tokens", "4", "--threads", "1", "--report", report
    )
    assert code == 0, err
    assert q.is_file() and json.loads(report.read_text())["lang"] == "en"
    for stale, live in partials:
        assert not stale.exists() and live.exists()


def test_to_hf_removes_a_killed_runs_partial(tmp_path):
    from edgemerge.gguf.to_hf import gguf_to_hf

    seed = need_shared("models", "stories260K")
    out = tmp_path / "hf"
    stale, live = plant_partials(out)
    gguf_to_hf(seed / "stories260K.gguf", out, tokenizer_model=seed / "tok512.model")
    assert (out / "config.json").is_file() and (out / MARKER).is_file()
    assert not stale.exists() and live.exists()


def test_a_failed_eval_leaves_no_report_folder(tmp_path, cli):
    (tmp_path / "m.gguf").write_text("not a model")
    code, _, err = cli("eval", tmp_path / "m.gguf", "--lang", "eu", "--report", tmp_path / "new" / "r.json")
    one_line_error(code, err, "not a GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


WRITERS = {
    "export": lambda f, t: (t / "x.gguf", ["export", f["instruct"], "--out", t / "x.gguf"]),
    "merge --gguf": lambda f, t: (t / "x.gguf", ["merge", f["recipe"], "--gguf", t / "x.gguf", "--force"]),
    "merge --out": lambda f, t: (t / "hf", ["merge", f["recipe"], "--out", t / "hf"]),
    "eval --report": lambda f, t: (
        t / "r.json",
        ["eval", t / "m.gguf", "--lang", "eu", "--report", t / "r.json"],
    ),
    "quantize": lambda f, t: (t / "m-Q8_0.gguf", ["quantize", t / "m.gguf", "-q", "Q8_0"]),
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_second_concurrent_writer_is_refused(command, family, tmp_path, cli):
    if command == "quantize":
        pytest.importorskip("llama_cpp")
        shutil.copy(need_shared("models", "stories260K", "stories260K.gguf"), tmp_path / "m.gguf")
    else:
        (tmp_path / "m.gguf").write_bytes(b"GGUF model")
    final, args = WRITERS[command](family, tmp_path)
    with output_lock(final):  # the first writer, still writing
        before = snapshot(tmp_path)
        code, _, err = cli(*args)
        one_line_error(code, err, "another edgemerge process is writing")
        assert snapshot(tmp_path) == before


def test_a_second_concurrent_build_is_refused(family, tmp_path, cli):
    pytest.importorskip("llama_cpp")
    from edgemerge.build import build_lock

    out = tmp_path / "b"
    with build_lock(out):
        code, _, err = cli("build", "--recipe", family["recipe"], "--out", out, "--skip-eval")
        one_line_error(code, err, "another edgemerge build is writing")
    assert not out.exists()
