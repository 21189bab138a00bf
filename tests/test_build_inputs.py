"""Issue 19 class 4: build's cache keys cannot collide. Every input (by role) and every change to its files is
in the merge key, so a changed model is merged again and the manifest lists every input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgemerge.build import BuildOptions, build
from edgemerge.cli import main
from edgemerge.recipe import load_recipe
from edgemerge.sources import SAMPLE


def _family(tmp_path: Path, build_family: dict, langs: tuple[str, ...] = ("eu",)) -> dict[str, Path]:
    """Copies of the build family's models (one language model per code, copies of `lang-eu`)."""
    out = {}
    for role, src in [("instruct", build_family["instruct"]), ("base", build_family["base"])] + [
        (code, build_family["eu"]) for code in langs
    ]:
        out[role] = tmp_path / "models" / role
        shutil.copytree(src, out[role])
    return out


def _recipe(tmp_path: Path, fam: dict[str, Path], langs: list[tuple[str, str]]) -> Path:
    data = {
        "name": "keys",
        "instruct": str(fam["instruct"]),
        "base": str(fam["base"]),
        "languages": [{"code": code, "model": str(fam[role]), "weight": 0.5} for code, role in langs],
        "quants": ["Q8_0"],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _flip_middle_byte(folder: Path) -> None:
    """Change one byte in the middle of the tensor data, size kept: outside what a sampled hash reads."""
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - header > 2 * SAMPLE + 2, "fixture too small for an edit outside the sampled regions"
    mid = header + (len(data) - header) // 2
    data[mid] ^= 0x40
    f.write_bytes(bytes(data))


def _edit_template(folder: Path) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


CHANGES = {
    "language weights edited in place": ("eu", _flip_middle_byte),
    "base weights edited in place": ("base", _flip_middle_byte),
    "instruct weights edited in place": ("instruct", _flip_middle_byte),
    "instruct chat template": ("instruct", _edit_template),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_input_is_merged_again(tmp_path, build_family, change):
    fam = _family(tmp_path, build_family)
    recipe = load_recipe(_recipe(tmp_path, fam, [("eu", "eu")]))
    out = tmp_path / "dist"
    first = build(recipe, BuildOptions(out=out, skip_eval=True))
    before = json.loads((out / "manifest.json").read_text())["files"][0]["sha256"]
    again = build(recipe, BuildOptions(out=out, skip_eval=True))
    assert again.stages["merge"].cached and not first.stages["merge"].cached
    role, edit = CHANGES[change]
    edit(fam[role])
    third = build(recipe, BuildOptions(out=out, skip_eval=True))
    assert not third.stages["merge"].cached and not third.stages["quantize Q8_0"].cached
    after = json.loads((out / "manifest.json").read_text())["files"][0]["sha256"]
    assert after != before


def test_every_language_is_its_own_input(tmp_path, build_family):
    fam = _family(tmp_path, build_family, langs=("eu", "ca"))
    recipe = load_recipe(_recipe(tmp_path, fam, [("eu", "eu"), ("ca", "ca")]))
    out = tmp_path / "dist"
    build(recipe, BuildOptions(out=out, skip_eval=True))
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert list(inputs) == ["instruct", "base", "eu", "ca"]
    _flip_middle_byte(fam["ca"])  # the second language only
    assert not build(recipe, BuildOptions(out=out, skip_eval=True)).stages["merge"].cached


@pytest.mark.parametrize(
    "langs",
    [[("eu", "eu"), ("eu", "ca")], [("eu", "eu"), ("ca", "ca"), ("eu", "ca")], [("eu", "eu"), ("eu", "eu")]],
)
def test_duplicate_codes_are_refused_before_any_work(tmp_path, build_family, capsys, langs):
    fam = _family(tmp_path, build_family, langs=("eu", "ca"))
    recipe = _recipe(tmp_path, fam, langs)
    out = tmp_path / "dist"
    with pytest.raises(SystemExit) as e:
        main(["build", "--recipe", str(recipe), "--out", str(out), "--skip-eval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "appears twice" in err and "languages" in err, err
    assert not out.exists()
