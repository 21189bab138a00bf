"""What to build, from the command line's choice: a bundled recipe for the languages, a recipe file, or the demo."""

from __future__ import annotations

import dataclasses
import os

from ..demo import demo_family, language_text
from ..errors import EdgemergeError
from ..progress import Progress
from ..recipe import Recipe, load_recipe, recipe_for_languages
from .options import BuildOptions


def choose_recipe(
    codes: list[str] | None, recipe: str | None, *, demo: bool = False, progress: Progress | None = None
) -> Recipe:
    """The recipe to build: the demo family's (generated, offline), a recipe file or bundled name (its languages
    must be `codes` when both are given), or the bundled recipe for `codes`."""
    if demo:
        if recipe is not None:
            raise EdgemergeError("--demo builds the generated demo family; drop --recipe (or drop --demo)")
        if codes is not None and len(codes) != 1:
            raise EdgemergeError(
                "--demo builds one language at a time; give --lang with one code, e.g. --lang eu"
            )
        code = codes[0] if codes else "eu"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the network: fail fast if touched
        language_text(code)
        return demo_family(code, progress=progress).recipe
    if recipe is not None:
        r = load_recipe(recipe)
        if codes is not None and sorted(set(codes)) != sorted(set(r.lang_codes)):
            raise EdgemergeError(
                f"--lang {','.join(codes)} does not match the recipe's languages ({','.join(r.lang_codes)}); "
                "drop one of them"
            )
        return r
    if codes is not None:
        return load_recipe(recipe_for_languages(codes))
    raise EdgemergeError("say what to build: --lang eu (bundled recipe), --recipe FILE, or --demo")


def demo_options(options: BuildOptions) -> BuildOptions:
    """A demo build evaluates on the quick set and beside the instruct model alone (the language vector's
    effect is the point of the demo)."""
    if not options.demo:
        return options
    return dataclasses.replace(options, quick_eval=True, compare_parents=True)
