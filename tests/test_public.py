"""Issue 19 class 9: shipped files (GGUF metadata, model card, manifest, eval.json, a merged folder's
edgemerge.json) name inputs by hub id or local folder name, never by a path of the user's machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgemerge.build import BuildOptions, build
from edgemerge.gguf.inspect import kv
from edgemerge.pipeline import merge_to_gguf, merge_to_hf
from edgemerge.public import public_ref
from edgemerge.recipe import load_recipe


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("HiTZ/Latxa-Llama-3.1-8B@abc123", "HiTZ/Latxa-Llama-3.1-8B@abc123"),
        ("{root}/models/llama-eu", "llama-eu"),
        ("{root}/models/llama-eu/", "llama-eu"),
        ("./models/llama-eu", "llama-eu"),
        ("models/llama-eu", "llama-eu"),  # looks like owner/name but is a local folder
        ("sub/../models/llama-eu", "llama-eu"),
        (".", "recipes"),
        ("~/llama-eu", "llama-eu"),
    ],
)
def test_public_ref(tmp_path, monkeypatch, ref, expected):
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / "recipes"  # the recipe's folder: relative refs resolve against it
    for folder in (root / "models" / "llama-eu", root / "sub", tmp_path / "llama-eu"):
        folder.mkdir(parents=True)
    ref = ref.format(root=root)
    assert public_ref(ref, root) == expected


def _private_strings(*paths: Path) -> list[bytes]:
    """What must not appear in any shipped byte: the given folders (as given and resolved) and the home dir."""
    out = set()
    for p in paths:
        out |= {str(p).encode(), str(Path(p).resolve()).encode()}
    home = Path.home()
    if len(home.parts) > 1:
        out.add(str(home).encode())
    return sorted(out)


def _assert_private(folder_or_file: Path, secrets: list[bytes]) -> None:
    files = (
        [folder_or_file]
        if folder_or_file.is_file()
        else [p for p in folder_or_file.rglob("*") if p.is_file()]
    )
    assert files
    for f in files:
        data = f.read_bytes()
        for s in secrets:
            assert s not in data, f"{f.name} contains {s.decode()}"


def _family_recipe(tmp_path: Path, family: dict, style: str) -> Path:
    """The build family's models copied under tmp_path and a recipe naming them in `style`."""
    models = tmp_path / "my-models"
    for role in ("instruct", "base", "eu"):
        shutil.copytree(family[role], models / role)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    refs = {
        "absolute": {r: str(models / r) for r in ("instruct", "base", "eu")},
        "relative": {r: f"../my-models/{r}" for r in ("instruct", "base", "eu")},
        "home": {r: f"~/my-models/{r}" for r in ("instruct", "base", "eu")},
    }[style]
    data = {
        "name": "tiny-eu",
        "instruct": refs["instruct"],
        "base": refs["base"],
        "languages": [{"code": "eu", "model": refs["eu"], "weight": 0.8}],
        "quants": ["Q8_0"],
        "license": "apache-2.0",
    }
    path = recipes / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("style", "evaluate"), [("absolute", True), ("relative", False), ("home", False)])
def test_build_ships_no_local_path(tmp_path, build_family, monkeypatch, style, evaluate):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(_family_recipe(tmp_path, build_family, style))
    out = tmp_path / "dist" / "tiny-eu"
    build(recipe, BuildOptions(out=out, skip_eval=not evaluate, quick_eval=True))
    secrets = _private_strings(tmp_path, build_family["instruct"].parent)
    _assert_private(out, secrets)
    meta = kv(out / "tiny-eu-F16.gguf")
    shipped = yaml.safe_load(meta["edgemerge.recipe"])
    assert (shipped["instruct"], shipped["languages"][0]["model"]) == ("instruct", "eu")
    assert meta["general.base_model.0.name"] == "instruct"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`instruct`" in card and "my-models" not in card


def test_merges_ship_no_local_path(tmp_path, build_family, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(_family_recipe(tmp_path, build_family, "absolute"))
    instruct = Path(recipe.instruct)
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        data = json.loads((instruct / name).read_text())  # what older transformers saved from a local folder
        data[key] = str(instruct)
        (instruct / name).write_text(json.dumps(data))
    secrets = _private_strings(tmp_path, build_family["instruct"].parent)
    _assert_private(merge_to_gguf(recipe, tmp_path / "out" / "m.gguf"), secrets)
    _assert_private(merge_to_hf(recipe, tmp_path / "out" / "hf"), secrets)
