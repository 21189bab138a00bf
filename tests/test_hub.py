"""The real hub code path (huggingface_hub's snapshot_download inside edgemerge.sources) against a local stand-in
for the hub's HTTP API (tests/fake_hub.py): what is downloaded, what is recorded, what is reused, what fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from edgemerge.files import human_bytes
from edgemerge.pipeline import merge_to_hf
from edgemerge.recipe import load_recipe

from .fake_hub import FakeHub
from .models import write_recipe
from .test_merge_engine import WEIGHTS, read_out

ORG = "edgemerge-test"


@pytest.fixture
def hub(tmp_path, merge_family):
    """The merge family on the fake hub, each repo with files edgemerge must not fetch: pickled weights, a
    consolidated copy of the weights (as Mistral repos have) and a README."""
    repos = {}
    for role, folder in merge_family.items():
        repo = tmp_path / "repos" / role
        shutil.copytree(folder, repo)
        (repo / "pytorch_model.bin").write_bytes(b"pickled weights must never be downloaded")
        shutil.copyfile(next(repo.glob("model-*.safetensors")), repo / "consolidated.safetensors")
        (repo / "README.md").write_text("# a model card\n")
        repos[f"{ORG}/{role}"] = repo
    server = FakeHub(repos)
    yield server
    server.close()


def run_cli(hub: FakeHub, cache, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **hub.env(cache)}
    cmd = [sys.executable, "-c", "from edgemerge.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)


def test_merge_from_the_hub_fetches_only_the_weights_it_needs(tmp_path, hub, merge_family):
    ids = {role: f"{ORG}/{role}" for role in merge_family}
    recipe = write_recipe(tmp_path / "hub.yaml", ids, WEIGHTS)
    cache, out = tmp_path / "cache", tmp_path / "merged"

    done = run_cli(hub, cache, "merge", recipe, "--out", out)
    assert done.returncode == 0, done.stderr

    # same tensors as merging the local folders
    local = merge_to_hf(
        load_recipe(write_recipe(tmp_path / "local.yaml", merge_family, WEIGHTS)), tmp_path / "l"
    )
    got, want = read_out(out), read_out(local)
    assert set(got) == set(want)
    assert all(np.array_equal(got[k].view(np.uint16), want[k].view(np.uint16)) for k in want)

    # only config/tokenizer files and the shards the index names; never pickles, copies or the card
    fetched = hub.fetched()
    shards = {p.name for p in merge_family["instruct"].glob("model-*.safetensors")}
    assert {f for f in fetched if f.endswith(".safetensors")} == shards
    assert not any(f.endswith(".bin") or f.startswith(("consolidated", "README")) for f in fetched)
    assert fetched.count("config.json") == 4  # once per model: base, instruct, eu, ca

    # provenance: the commit that was merged and the hub's sha256 of every weight file
    inputs = json.loads((out / "edgemerge.json").read_text())["inputs"]
    assert inputs["instruct"]["revision"] == hub.commits[f"{ORG}/instruct"]
    for name in shards:
        data = (merge_family["instruct"] / name).read_bytes()
        assert inputs["instruct"]["files"][name] == f"sha256:{hashlib.sha256(data).hexdigest()}"

    # a second merge reuses the cache: no file is downloaded again
    before = len(hub.fetched())
    again = run_cli(hub, cache, "merge", recipe, "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert hub.fetched()[before:] == []


def test_a_missing_hub_repo_is_one_line_and_exit_2(tmp_path, hub, merge_family):
    ids = {role: f"{ORG}/{role}" for role in merge_family} | {"eu": f"{ORG}/no-such-model"}
    recipe = write_recipe(tmp_path / "hub.yaml", ids, WEIGHTS)
    done = run_cli(hub, tmp_path / "cache", "merge", recipe, "--out", tmp_path / "merged")
    assert done.returncode == 2, done.stderr
    # above it: huggingface_hub's own progress bars for the models that did download
    last = done.stderr.strip().splitlines()[-1]
    # the recipe that asked for it first (with its file), then the hub's answer about the model
    assert last.startswith(
        f"error: recipe tiny ({recipe}): cannot get edgemerge-test/no-such-model from the "
    ), last
    assert "local folder" in last and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == [last]
    assert not (tmp_path / "merged").exists()


_MESSAGES = """
import json
from edgemerge.errors import EdgemergeError
from edgemerge.sources import resolve
out = {{}}
for ref in {refs!r}:
    try:
        resolve(ref)
        out[ref] = None
    except EdgemergeError as e:
        out[ref] = e.message
print(json.dumps(out))
"""


def test_hub_failures_say_what_to_do(tmp_path):
    """huggingface_hub's typed errors (gated, not found, no such revision, invalid id, offline, no network),
    each one line naming the model, with its own way out."""
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    gated, public = f"{ORG}/gated", f"{ORG}/public"
    hub = FakeHub({gated: folder, public: folder}, gated=(gated,))
    with socket.socket() as s:  # a port nothing listens on: the hub cannot be reached there
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        refs = [gated, f"{ORG}/missing", f"{public}@no-such-branch", f"{ORG}/bad-"]
        online = json.loads(run_py(hub, tmp_path / "cache", _MESSAGES.format(refs=refs)))
        offline = json.loads(
            run_py(hub, tmp_path / "cache", _MESSAGES.format(refs=[public]), HF_HUB_OFFLINE="1")
        )
        down = json.loads(
            run_py(hub, tmp_path / "cache", _MESSAGES.format(refs=[public]), HF_ENDPOINT=closed)
        )
    finally:
        hub.close()
    expected = {
        gated: ["the model is gated", f"{hub.url}/{gated}", "`hf auth login`"],
        f"{ORG}/missing": ["no such model, or a private one", "check the id"],
        f"{public}@no-such-branch": ["no revision 'no-such-branch'", "after the @"],
        f"{ORG}/bad-": ["is not a valid hub id", "check it"],
    }
    for ref, words in expected.items():
        _one_line_naming(online[ref], ref, words)
    _one_line_naming(offline[public], public, ["HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"])
    _one_line_naming(down[public], public, ["the hub cannot be reached", "check your network connection"])


def _one_line_naming(message: str | None, ref: str, words: list[str]) -> None:
    assert message is not None and "\n" not in message, message
    assert message.startswith(f"cannot get {ref} from the Hugging Face hub: "), message
    assert all(w in message for w in words), (words, message)


def run_py(hub: FakeHub, cache, code: str, **env_overrides: str) -> str:
    """Run `code` in a fresh process whose huggingface_hub talks to `hub` (its endpoint is read at import);
    returns what it printed."""
    env = {**os.environ, **hub.env(cache), **env_overrides}
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_downloads_are_checked_against_free_space_before_fetching(tmp_path, hub, merge_family):
    ids = {role: f"{ORG}/{role}" for role in merge_family}
    recipe = write_recipe(tmp_path / "hub.yaml", ids, WEIGHTS)
    cache = tmp_path / "cache"
    shards = [p for folder in merge_family.values() for p in folder.glob("model-*.safetensors")]
    weights = sum(p.stat().st_size for p in shards)
    refs = list(ids.values())

    # exactly the indexed shards of the four models, sized by the hub, before anything large is fetched
    need = run_py(hub, cache, f"from edgemerge.sources import check_download_space as c; print(c({refs!r}))")
    assert int(need) == weights
    assert not [f for f in hub.fetched() if f.endswith(".safetensors")]

    # a disk without room for them (the margin): one line naming the size, the cache and the way out
    small_disk = f"""
import edgemerge.sources as s
from edgemerge.errors import EdgemergeError
from edgemerge.recipe import load_recipe
s.free_bytes = lambda path: {weights}
try:
    s.resolve_recipe(load_recipe({str(recipe)!r}))
except EdgemergeError as e:
    print(e.message)
"""
    message = run_py(hub, cache, small_disk)
    assert message.startswith("not enough disk space to download the models:"), message
    assert human_bytes(weights) in message and str(cache) in message and "HF_HUB_CACHE" in message
    assert not [f for f in hub.fetched() if f.endswith(".safetensors")]

    # with room: downloaded, after which nothing is pending
    after = f"""
import edgemerge.sources as s
from edgemerge.recipe import load_recipe
print(s.resolve_recipe(load_recipe({str(recipe)!r})).instruct.revision, s.check_download_space({refs!r}))
"""
    revision, pending = run_py(hub, cache, after).split()
    assert revision == hub.commits[f"{ORG}/instruct"] and pending == "0"
    assert sorted(f for f in hub.fetched() if f.endswith(".safetensors")) == sorted(p.name for p in shards)

    # offline with everything cached: the sizes cannot be asked for, and are not needed
    offline = run_py(hub, cache, after.replace("load_recipe({", "load_recipe({"), HF_HUB_OFFLINE="1")
    assert offline.split() == [revision, "0"]


def test_network_reason_reads_the_socket_error_under_the_hub_s():
    """The raw chain (httpx's ConnectError over the socket's) becomes words, never its class names or errno."""
    from edgemerge.sources import network_reason

    def chained(inner: BaseException) -> Exception:
        try:
            try:
                raise inner
            except OSError as e:
                raise RuntimeError(f"ConnectError: {e}") from e
        except RuntimeError as outer:
            return outer

    assert "does not resolve: no network" in network_reason(
        chained(socket.gaierror(-2, "Name or service not known"))
    )
    assert "refused the connection" in network_reason(
        chained(ConnectionRefusedError(111, "Connection refused"))
    )
    assert "did not answer in time" in network_reason(chained(TimeoutError("timed out")))
    assert network_reason(RuntimeError("something else")).startswith("no connection to ")


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
def test_build_lang_offline_names_the_recipe_the_models_and_the_ways_out(tmp_path, offline):
    """`build --lang eu` with the hub out of reach (a port nothing listens on, or HF_HUB_OFFLINE) and an empty
    cache: one line naming the recipe chosen and its file, every model it would fetch, their size as far as the
    names tell, and what to do; no raw huggingface_hub or httpx error; nothing left at --out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cache, out = tmp_path / "cache", tmp_path / "dist"
    env = {**os.environ, "HF_ENDPOINT": closed, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_TOKEN": "", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"}  # fmt: skip
    cmd = [sys.executable, "-c", "from edgemerge.cli import main; main()", "build", "--lang", "eu",
           "--skip-eval", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: ") and err.count("\n") == 0, done.stderr
    recipe = load_recipe("qwen3-8b-eu")
    err = " ".join(err.split())
    assert f"recipe qwen3-8b-eu ({recipe.file})" in err
    for ref in (recipe.instruct, recipe.base, recipe.languages[0].model):
        assert ref in err
    assert f"about {human_bytes(3 * 2 * 8e9)} to download" in err and str(cache) in err
    assert "`hf auth login`" in err and "edgemerge recipes copy qwen3-8b-eu my-recipe.yaml" in err
    if offline:
        assert "HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE" in err
    else:
        assert "the hub cannot be reached (127.0.0.1:" in err and "refused the connection" in err
    for raw in ("LocalEntryNotFoundError", "ConnectError", "[Errno", "Traceback"):
        assert raw not in done.stderr
    assert not out.exists()
