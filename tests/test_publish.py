"""`edgemerge publish` through huggingface_hub's real upload code against the local stand-in for the hub's HTTP
API (tests/fake_hub.py): what is uploaded (byte for byte, read back with snapshot_download), what an interrupted
upload sends again, what a dry run touches, the one-line errors; and llama.cpp's split format for files above the
hub's per-file limit (gguf/split.py), loaded by llama.cpp itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgemerge.build import BuildOptions, build
from edgemerge.gguf.inspect import read_gguf
from edgemerge.gguf.split import split_gguf
from edgemerge.recipe import load_recipe

from .fake_hub import FakeHub
from .llama_tools import need_tool

TOKEN, USER = "hf_test_write_token", "alice"
REPO = f"{USER}/tiny-eu"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(build_family, tmp_path_factory) -> Path:
    """A finished build folder (GGUFs from llama.cpp, card, Modelfile, manifest), made once; tests copy it."""
    out = tmp_path_factory.mktemp("publish-build") / "tiny-eu"
    build(
        load_recipe(build_family["recipe"]),
        BuildOptions(out=out, quants=["Q8_0"], imatrix="none", skip_eval=True),
    )
    return out


@pytest.fixture
def folder(built, tmp_path) -> Path:
    dst = tmp_path / "tiny-eu"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture
def hub(tmp_path):
    server = FakeHub(storage=tmp_path / "hub", tokens={TOKEN: USER})
    yield server
    server.close()


def _env(hub: FakeHub, tmp_path: Path, **overrides: str) -> dict[str, str]:
    return {**os.environ, **hub.env(tmp_path / "cache"), "HF_TOKEN": TOKEN, **overrides}


def run_cli(hub: FakeHub, tmp_path: Path, *args, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from edgemerge.cli import main; main()", *map(str, args)]
    return subprocess.run(
        cmd, check=False, env=_env(hub, tmp_path, **env), capture_output=True, text=True, timeout=300
    )


def run_py(hub: FakeHub, tmp_path: Path, code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=_env(hub, tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def download(hub: FakeHub, tmp_path: Path, repo: str = REPO) -> Path:
    """The repo as huggingface_hub downloads it from the stand-in."""
    dest = tmp_path / "downloaded"
    code = f"from huggingface_hub import snapshot_download as s; print(s({repo!r}, local_dir={str(dest)!r}))"
    return Path(run_py(hub, tmp_path, code))


def _uploaded_names(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.is_file())


def test_publish_uploads_every_listed_file_byte_identical(folder, hub, tmp_path):
    (folder / "notes.txt").write_text("mine, not the build's\n")
    card_before = (folder / "README.md").read_text(encoding="utf-8")
    assert "-hf <user>/tiny-eu:" in card_before and "Replace `<user>/tiny-eu` below" in card_before

    done = run_cli(hub, tmp_path, "publish", folder, "--repo", REPO, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    m = _manifest(folder)
    listed = [f["name"] for f in m["files"]]
    assert [f["name"] for f in result["files"]] == listed + ["manifest.json"]
    assert result["not_uploaded"] == ["notes.txt"] and result["card_filled"] is True
    assert "warning:" in done.stderr and "notes.txt" in done.stderr
    assert hub.private == {REPO: False}

    # the hub holds exactly the manifest's files, each with the manifest's sha256, and the manifest itself
    dest = download(hub, tmp_path)
    assert _uploaded_names(dest) == sorted(listed + ["manifest.json"])  # no marker, no notes.txt
    for f in m["files"]:
        assert _sha256(dest / f["name"]) == f["sha256"], f["name"]
    assert (dest / "manifest.json").read_bytes() == (folder / "manifest.json").read_bytes()
    assert m["repo"] == REPO
    assert hub.lfs[REPO] == {n for n in listed if n.endswith(".gguf")}  # weights as LFS objects, as the hub

    # the card names the repo now, parses as the hub parses it, and lost only the placeholder
    from huggingface_hub import ModelCard

    card = (dest / "README.md").read_text(encoding="utf-8")
    tag = m["recommended"]["type"]
    assert f"llama-cli -hf {REPO}:{tag} -cnv" in card and f"ollama run hf.co/{REPO}:{tag}" in card
    assert "<user>" not in card and "Replace `" not in card
    assert ModelCard(card).data.to_dict() == ModelCard(card_before).data.to_dict()
    assert card.replace(REPO, "<user>/tiny-eu") == card_before.replace("\n" + _note() + "\n", "")

    # published again: nothing new is sent, and the folder is not touched
    puts = len(hub.uploaded())
    again = run_cli(hub, tmp_path, "publish", folder, "--repo", REPO, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["card_filled"] is False and len(hub.uploaded()) == puts
    assert _manifest(folder) == m


def _note() -> str:
    from edgemerge.package.card import PLACEHOLDER_NOTE, repo_placeholder

    return PLACEHOLDER_NOTE.format(repo=repo_placeholder("tiny-eu"))


def test_an_interrupted_publish_sends_only_what_is_missing(folder, hub, tmp_path):
    """huggingface_hub without hf_xet: one commit at the end, LFS objects before it. Cut after one of the two
    (F16, Q8_0), the second run sends only the object the hub does not have (its LFS batch answer), then commits
    everything."""
    hub.fail_puts_after = 1
    first = run_cli(hub, tmp_path, "publish", folder, "--repo", REPO)
    assert first.returncode == 2, first.stderr
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[-1].startswith(
        f"error: cannot publish to {REPO}: the hub refused a file upload (403)"
    ), lines
    assert "run the same command again: it resumes" in lines[-1] and "Traceback" not in first.stderr
    stored = list(hub.puts)
    assert len(stored) == 1 and _uploaded_names(hub.repos[REPO]) == []  # nothing committed

    hub.fail_puts_after = None
    before = len(hub.uploaded())
    second = run_cli(hub, tmp_path, "publish", folder, "--repo", REPO)
    assert second.returncode == 0, second.stderr
    m = _manifest(folder)
    objects = {f["sha256"] for f in m["files"] if f["name"].endswith(".gguf")}
    resent = hub.uploaded()[before:]
    assert len(objects) == 2 and sorted(resent) == sorted(objects - set(stored))
    dest = download(hub, tmp_path)
    for f in m["files"]:
        assert _sha256(dest / f["name"]) == f["sha256"], f["name"]


def test_dry_run_lists_the_files_and_touches_nothing(folder, hub, tmp_path):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    done = run_cli(
        hub, tmp_path, "publish", folder, "--repo", REPO, "--dry-run", HF_TOKEN=""
    )  # no token needed
    assert done.returncode == 0, done.stderr
    assert hub.requests == []
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    listed = [f["name"] for f in _manifest(folder)["files"]] + ["manifest.json"]
    for name in listed:
        assert name in done.stdout
    assert f"would upload to {REPO}" in done.stdout and "nothing was written or sent" in done.stdout
    assert f"README.md: the card's commands would name {REPO}" in done.stdout


def _closed_port() -> str:
    with socket.socket() as s:  # a port nothing listens on: the hub cannot be reached there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no token", "no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
        ("offline", "HF_HUB_OFFLINE is set, and publishing needs the hub: unset HF_HUB_OFFLINE"),
        ("not user/name", "--repo 'tiny-eu' is not a hub repo id; give user/name (or org/name)"),
        ("three parts", "--repo 'a/b/c' is not a hub repo id"),
        ("no manifest", "has no manifest.json, so it is not a finished edgemerge build"),
        ("changed file", "Modelfile changed after the build"),
        ("missing file", "Modelfile is listed in manifest.json but missing from"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, monkeypatch, cli, case, expected):
    """Refused before the hub is asked (in-process: huggingface_hub reads the token and HF_HUB_OFFLINE then)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port())  # asked anyway, it would fail otherwise
    repo = REPO
    if case == "no token":
        monkeypatch.setenv("HF_TOKEN", "")
    elif case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case == "not user/name":
        repo = "tiny-eu"
    elif case == "three parts":
        repo = "a/b/c"
    elif case == "no manifest":
        (folder / "manifest.json").unlink()
    elif case == "changed file":
        with open(folder / "Modelfile", "a") as f:
            f.write("PARAMETER temperature 0.1\n")
    elif case == "missing file":
        (folder / "Modelfile").unlink()
    before = sorted(p.name for p in folder.iterdir())
    code, out, err = cli("publish", folder, "--repo", repo)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error: ") and expected in lines[0], lines
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad token", f"cannot publish to {REPO}: the hub refused your token (401)"),
        ("no hub", f"cannot publish to {REPO}: the hub cannot be reached"),
        ("not yours", "cannot publish to bob/tiny-eu: your token may not write there (403)"),
    ],
)
def test_hub_refusals_are_one_line_and_exit_2(folder, hub, tmp_path, case, expected):
    repo, env = REPO, {}
    if case == "bad token":
        env["HF_TOKEN"] = "hf_not_a_token"
    elif case == "no hub":
        env["HF_ENDPOINT"] = _closed_port()
    elif case == "not yours":
        repo = "bob/tiny-eu"
    done = run_cli(hub, tmp_path, "publish", folder, "--repo", repo, **env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    sent = [r for r in hub.requests if "/preupload/" in r or "/commit/" in r or r.startswith("PUT ")]
    assert sent == [] and hub.puts == []  # refused before any file went


def test_split_is_llama_cpp_format_and_loads_in_llama_cpp(built, tmp_path):
    """Shards of at most max_bytes of tensor data, named and keyed as llama-gguf-split writes them; every key on
    the first, every tensor's bytes unchanged; llama.cpp loads the set from the first shard and computes the same
    logits as from the whole file."""
    from edgemerge.runtime import Model

    src = built / "tiny-eu-Q8_0.gguf"
    whole = read_gguf(src)
    max_bytes = sum(t.nbytes for t in whole.tensors) // 3 + 1
    shards = split_gguf(src, max_bytes, tmp_path)
    n = len(shards)
    assert n >= 3 and [p.name for p in shards] == [
        f"tiny-eu-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shards)  # no leftovers
    parts = [read_gguf(p) for p in shards]
    for i, part in enumerate(parts):
        assert (part.kv["split.no"], part.kv["split.count"], part.kv["split.tensors.count"]) == (
            i,
            n,
            len(whole.tensors),
        )
        assert sum(t.nbytes for t in part.tensors) <= max_bytes or len(part.tensors) == 1
    first = {k: v for k, v in parts[0].kv.items() if not k.startswith("split.")}
    assert first == whole.kv
    assert all(set(p.kv) == {"split.no", "split.count", "split.tensors.count"} for p in parts[1:])
    got = {t.name: (t, p.path) for p in parts for t in p.tensors}
    assert list(got) == [t.name for t in whole.tensors]
    with open(src, "rb") as f:
        data = f.read()
    for t in whole.tensors:
        s, path = got[t.name]
        assert (s.type, s.shape) == (t.type, t.shape)
        with open(path, "rb") as f:
            f.seek(s.offset)
            assert f.read(s.nbytes) == data[t.offset : t.offset + t.nbytes], t.name

    with Model(src, n_ctx=64, n_threads=1) as m:
        tokens = m.tokenize("Kaixo, zer moduz zaude gaur?")
        want = m.logits(tokens)
    with Model(shards[0], n_ctx=64, n_threads=1) as m:
        got_logits = m.logits(tokens)
    np.testing.assert_array_equal(got_logits, want)


def test_split_matches_llama_gguf_split_byte_for_byte(built, tmp_path):
    """The same shards, byte for byte, as llama.cpp's own `llama-gguf-split --split --split-max-size 1M`."""
    tool = need_tool("llama-gguf-split")
    src = built / "tiny-eu-F16.gguf"
    ours = split_gguf(src, 1_000_000, tmp_path / "ours")
    (tmp_path / "theirs").mkdir()
    done = subprocess.run(
        [str(tool), "--split", "--split-max-size", "1M", str(src), str(tmp_path / "theirs" / src.stem)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    theirs = sorted((tmp_path / "theirs").iterdir())
    assert len(ours) >= 3 and [p.name for p in theirs] == [p.name for p in ours]
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes(), a.name


_PUBLISH_WITH_LIMIT = """
import json
from edgemerge.publish import publish
r = publish({folder!r}, {repo!r}, file_limit={limit}, split_bytes={split})
print(json.dumps(r.to_dict()))
"""


def test_a_file_above_the_hub_limit_goes_up_as_shards(folder, hub, tmp_path):
    """With the per-file limit lowered below the F16 file only: it is split (once, recorded in the manifest with
    its shards' hashes) and its shards are uploaded in its place; every other file goes up as it is."""
    m0 = _manifest(folder)
    sizes = {f["name"]: f["size"] for f in m0["files"]}
    f16 = "tiny-eu-F16.gguf"
    limit = max(s for n, s in sizes.items() if n != f16)
    assert sizes[f16] > limit
    split = read_gguf(folder / f16)
    split_bytes = sum(t.nbytes for t in split.tensors) // 2 + 1
    code = _PUBLISH_WITH_LIMIT.format(folder=str(folder), repo=REPO, limit=limit, split=split_bytes)
    result = json.loads(run_py(hub, tmp_path, code))
    shards = result["split"][f16]
    assert len(shards) >= 2 and shards[0] == "tiny-eu-F16-00001-of-" + f"{len(shards):05d}.gguf"

    m = _manifest(folder)
    assert next(f for f in m["files"] if f["name"] == f16)["uploaded_as"] == shards
    dest = download(hub, tmp_path)
    assert f16 not in _uploaded_names(dest) and set(shards) <= set(_uploaded_names(dest))
    for s in m["shards"]:
        assert s["split_of"] == f16 and _sha256(dest / s["name"]) == s["sha256"] == _sha256(
            folder / s["name"]
        )
    for f in m["files"]:
        if f["name"] != f16:
            assert _sha256(dest / f["name"]) == f["sha256"]
    assert yaml.safe_load((dest / "README.md").read_text().split("---\n")[1])["tags"][:2] == ["merge", "gguf"]

    # run again: the shards are checked against the manifest, not written again
    mtimes = [(folder / s).stat().st_mtime_ns for s in shards]
    run_py(hub, tmp_path, code)
    assert [(folder / s).stat().st_mtime_ns for s in shards] == mtimes
