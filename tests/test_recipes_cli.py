"""`edgemerge recipes`: list, show and copy the bundled recipes; a bundled recipe with an unset model says how
to fill it in."""

from __future__ import annotations

import json

import yaml

from edgemerge.recipe import BUNDLED_DIR, bundled_recipes, load_recipe


def test_list_says_which_recipes_can_be_built(cli):
    code, out, _ = cli("recipes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and sorted(rows) == bundled_recipes()
    for name, r in rows.items():
        recipe = load_recipe(name)
        assert r["languages"] == recipe.lang_codes
        assert r["missing"] == [lang.code for lang in recipe.languages if lang.model is None]
    assert any(not r["missing"] for r in rows.values()) and any(r["missing"] for r in rows.values())
    code, out, _ = cli("recipes")
    # the table (it wraps at 80 columns when piped)
    assert code == 0 and "qwen3-8b-eu" in out and "yes" in out


def test_show_prints_the_file_as_is_and_copy_starts_your_own(cli, tmp_path):
    name = bundled_recipes()[0]
    code, out, _ = cli("recipes", "show", name)
    assert code == 0 and out == (BUNDLED_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    dest = tmp_path / "mine.yaml"
    code, out, _ = cli("recipes", "copy", name, dest)
    assert code == 0 and dest.read_text(encoding="utf-8") == (BUNDLED_DIR / f"{name}.yaml").read_text("utf-8")
    assert yaml.safe_load(dest.read_text())["name"] == name
    code, _, err = cli("recipes", "copy", name, dest)  # an existing file is kept unless --force
    assert code == 2 and "--force" in err
    code, _, err = cli("recipes", "show", "nope")
    assert code == 2 and "no bundled recipe 'nope'" in err


def test_a_bundled_recipe_without_its_language_model_says_how_to_fill_it_in(cli, tmp_path):
    name = next(r for r in bundled_recipes() if any(lang.model is None for lang in load_recipe(r).languages))
    code, _, err = cli("build", "--recipe", name, "--out", tmp_path / "o", "--skip-eval")
    err = " ".join(err.split())
    assert code == 2 and f"{BUNDLED_DIR / name}.yaml" in err
    assert f"edgemerge recipes copy {name} my-recipe.yaml" in err and "--recipe my-recipe.yaml" in err
