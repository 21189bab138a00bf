"""Model sources: local folders, hub ids, provenance fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.sources import HF_ID, fingerprint, resolve, weight_files


def test_local_folder_relative_to_root(merge_family):
    root = merge_family["eu"].parent
    src = resolve("lang-eu", root)
    assert src.path == merge_family["eu"].resolve() and src.revision is None
    assert src.files["config.json"].startswith("sha256:")
    shards = [n for n in src.files if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(src.files[n].startswith("sampled-sha256:") for n in shards)
    assert src.safetensors == sorted(src.path / n for n in shards)


def test_fingerprint_follows_the_tensor_layout_not_the_path(tmp_path, merge_family):
    a = fingerprint(merge_family["eu"])
    copy = tmp_path / "copy"
    shutil.copytree(merge_family["eu"], copy)
    assert fingerprint(copy) == a
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(copy)["config.json"] != a["config.json"]
    other = fingerprint(merge_family["ca"])  # same layout, other weights
    assert all(other[n] != a[n] for n in a if n.endswith(".safetensors"))


def test_hub_cache_files_carry_the_hubs_sha256(tmp_path, tied_family):
    """In the hub cache a snapshot file is a symlink to a blob named by its sha256: that hash is recorded."""
    import hashlib

    blob = tmp_path / "blobs"
    blob.mkdir()
    data = (tied_family["eu"] / "model.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (blob / digest).write_bytes(data)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blob / digest)
    assert fingerprint(snap)["model.safetensors"] == f"sha256:{digest}"


def test_weight_files_prefer_the_index(tmp_path, tied_family):
    folder = tmp_path / "m"
    shutil.copytree(tied_family["eu"], folder)
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    assert weight_files(folder) == [folder / "model.safetensors"]


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("./nowhere", "no such folder"),
        ("not an id", "not a Hugging Face id"),
        ("a/b/c", "not a Hugging Face id"),
    ],
)
def test_bad_references(tmp_path, ref, needle):
    with pytest.raises(EdgemergeError, match=needle):
        resolve(ref, tmp_path)


def test_file_and_empty_folder(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(EdgemergeError, match="is a file"):
        resolve("f.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgemergeError, match="no config.json"):
        resolve("empty", tmp_path)


def test_hub_id_syntax():
    m = HF_ID.match("HiTZ/eu_Qwen3-8B-Base@0123abc")
    assert m["repo"] == "HiTZ/eu_Qwen3-8B-Base" and m["rev"] == "0123abc"
    assert HF_ID.match("meta-llama/Llama-3.1-8B-Instruct")["rev"] is None


def test_offline_hub_error_is_one_actionable_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgemergeError) as e:
        resolve("HiTZ/eu_Qwen3-8B-Base", tmp_path)
    msg = e.value.message
    assert "HiTZ/eu_Qwen3-8B-Base" in msg and "local folder" in msg and "\n" not in msg
