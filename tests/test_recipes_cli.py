"""`edgemerge recipes`: list, show and copy the bundled recipes; a bundled recipe with an unset model says how
to fill it in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from edgemerge.recipe import (
    BUNDLED_DIR,
    EXAMPLES_DIR,
    bundled_recipes,
    example_recipes,
    load_recipe,
    recipe_for_languages,
    recipe_summaries,
)


def test_list_says_which_recipes_can_be_built(cli):
    code, out, _ = cli("recipes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and sorted(n for n, r in rows.items() if not r["example"]) == bundled_recipes()
    assert sorted(n for n, r in rows.items() if r["example"]) == example_recipes()
    for name, r in rows.items():
        recipe = load_recipe(name)
        assert r["languages"] == recipe.lang_codes
        assert r["missing"] == [lang.code for lang in recipe.languages if lang.model is None]
    assert any(not r["missing"] for r in rows.values()) and any(r["missing"] for r in rows.values())
    code, out, _ = cli("recipes")
    # the table (at its full width when piped: nothing cut)
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


def test_examples_are_listed_shown_and_built_by_name_but_never_picked_by_lang(cli):
    """The paper's other methods at its settings: one example each, every model set, listed in a table of
    their own, shown and found by name; --lang gl still picks the bundled task-arithmetic recipe."""
    methods = {load_recipe(n).method: n for n in example_recipes()}
    assert {"della", "slerp", "nearswap"} <= set(methods)
    assert load_recipe(methods["della"]).options == {"density": 0.5, "epsilon": 0.1, "lambda": 1.0, "seed": 0}
    assert load_recipe(methods["slerp"]).options == load_recipe(methods["nearswap"]).options == {"t": 0.5}
    for name in example_recipes():
        r = load_recipe(name)
        assert r.name == name and all(lang.model for lang in r.languages) and r.file.parent == EXAMPLES_DIR
        assert recipe_for_languages(r.lang_codes) in bundled_recipes()
    code, out, _ = cli("recipes", "show", methods["slerp"])
    assert code == 0 and out == (EXAMPLES_DIR / f"{methods['slerp']}.yaml").read_text(encoding="utf-8")
    code, out, _ = cli("recipes")
    assert code == 0 and "examples" in out and "nearswap" in out


def test_the_bundled_recipes_have_one_place_in_the_package():
    """edgemerge/recipes/ is a folder of the package (what pip installs and `recipes copy` reads); the top-level
    recipes/ of the house layout is a link to it, not a second copy that editing would not change."""
    repo = Path(__file__).resolve().parents[1]
    assert (
        BUNDLED_DIR == repo / "edgemerge" / "recipes"
        and BUNDLED_DIR.is_dir()
        and not BUNDLED_DIR.is_symlink()
    )
    top = repo / "recipes"
    assert not top.exists() or (top.is_symlink() and top.resolve() == BUNDLED_DIR.resolve())
    assert len(bundled_recipes()) >= 10


def test_an_unknown_lang_lists_the_codes_and_their_recipes(cli, tmp_path):
    code, _, err = cli("build", "--lang", "xx", "--out", tmp_path / "o", "--skip-eval")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    err = " ".join(err.split())
    summaries = {r["name"]: r for r in recipe_summaries()}
    for name, r in summaries.items():  # each recipe under its language code(s), * where a model is not set
        assert f"{name}{'*' if r['missing'] else ''}" in err
    for codes in ("ca (", "es (", "eu (", "gl (", "eu,ca,gl,es ("):
        assert codes in err
    assert "--recipe my-recipe.yaml" in err and not (tmp_path / "o").exists()


def test_the_readme_s_lang_examples_pick_a_recipe_that_can_be_built():
    """Every `edgemerge build --lang X` line of the README names languages a bundled recipe with all its models
    covers (the others say what to do in words, not as a command that fails)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    langs = re.findall(r"edgemerge build (?:[^\n`#]*? )?--lang ([\w,]+)(?![^\n`#]*--demo)", readme)
    assert "eu" in langs
    for codes in langs:
        recipe = load_recipe(recipe_for_languages(codes.split(",")))
        assert all(lang.model for lang in recipe.languages), codes
