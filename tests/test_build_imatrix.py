"""The build's importance matrix: recipe `imatrix: auto | none | PATH` and `build --imatrix` (build/calibrate.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgemerge.build import BuildOptions, build, work_dir
from edgemerge.build.calibrate import SOURCE_QUANT, auto_languages, imatrix_need, plan_imatrix
from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.inspect import kv
from edgemerge.imatrix.text import bundled_languages
from edgemerge.memory_plan import shape_from_config
from edgemerge.quantize import quantize
from edgemerge.recipe import load_recipe, parse_recipe
from edgemerge.resources import MemoryLimit

NAME = "tiny-eu"
F16, Q4, Q8 = f"{NAME}-F16.gguf", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf"
IMATRIX = f"{NAME}.imatrix.gguf"


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def auto_build(build_family, tmp_path_factory) -> Path:
    """imatrix: auto, Q4_K_M and IQ2_M (a type llama.cpp makes only with an importance matrix), no eval."""
    out = tmp_path_factory.mktemp("imx") / NAME
    build(
        load_recipe(build_family["recipe"]), BuildOptions(out=out, skip_eval=True, quants=["Q4_K_M", "IQ2_M"])
    )
    return out


def test_auto_makes_the_types_that_need_an_importance_matrix(auto_build):
    iq2 = kv(auto_build / f"{NAME}-IQ2_M.gguf")
    assert (
        iq2["general.file_type"] == 29 and iq2["quantize.imatrix.file"] == IMATRIX
    )  # LLAMA_FTYPE_MOSTLY_IQ2_M
    assert _manifest(auto_build)["imatrix"]["quants"] == ["Q4_K_M", "IQ2_M"]


def test_imatrix_none_quantizes_as_llama_cpp_does_without_one(build_family, auto_build, tmp_path):
    out = tmp_path / NAME
    build(
        load_recipe(build_family["recipe"]),
        BuildOptions(out=out, skip_eval=True, quants=["Q4_K_M"], imatrix="none"),
    )
    plain = quantize(out / F16, "Q4_K_M", tmp_path / "plain.gguf")
    assert (out / Q4).read_bytes() == plain.read_bytes()
    assert not (out / IMATRIX).exists() and _manifest(out)["imatrix"] is None
    assert "without an importance matrix" in (out / "README.md").read_text(encoding="utf-8")
    # the auto build's Q4_K_M differs from it in its tensors, not only in the quantize.imatrix.* keys
    assert _tensor_bytes(auto_build / Q4) != _tensor_bytes(out / Q4)


def test_imatrix_file_makes_the_same_bytes_as_auto(build_family, auto_build, tmp_path):
    given = tmp_path / "mine" / IMATRIX  # same file name: the quant records the name only
    given.parent.mkdir()
    shutil.copy(auto_build / IMATRIX, given)
    out = tmp_path / NAME
    main(
        [
            "build",
            "--recipe",
            str(build_family["recipe"]),
            "--out",
            str(out),
            "--quant",
            "Q4_K_M",
            "--skip-eval",
            "--imatrix",
            str(given),
        ]
    )
    assert (out / Q4).read_bytes() == (auto_build / Q4).read_bytes()
    assert not (out / IMATRIX).exists()  # a given file is not shipped: the card names it
    m = _manifest(out)
    assert m["imatrix"]["mode"] == "file" and m["imatrix"]["computed_on"] is None
    assert m["recipe"]["imatrix"] == IMATRIX  # by its name: the user's folders are not published
    assert str(tmp_path) not in (out / "README.md").read_text(encoding="utf-8")
    assert "given to the build" in (out / "README.md").read_text(encoding="utf-8")


def test_changing_the_imatrix_redoes_only_the_quants_that_use_it(build_family, tmp_path):
    recipe = load_recipe(build_family["recipe"])
    out = tmp_path / NAME
    build(recipe, BuildOptions(out=out, skip_eval=True, imatrix="none"))
    q8 = (out / Q8).stat().st_mtime_ns
    build(recipe, BuildOptions(out=out, skip_eval=True))
    stages = _manifest(out)["stages"]
    assert stages["merge"]["cached"] and stages["quantize Q8_0"]["cached"]
    assert not stages["imatrix"]["cached"] and not stages["quantize Q4_K_M"]["cached"]
    assert (out / Q8).stat().st_mtime_ns == q8
    assert kv(out / Q4)["quantize.imatrix.file"] == IMATRIX


def _limit_between(low: int, high: int) -> MemoryLimit:
    """A memory limit under which a need of `low` bytes fits (resources.fits: 0.9 of it) and `high` does not."""
    assert low < high
    usable = int((low + high) / 2 / 0.9)
    return MemoryLimit(usable, usable, usable, "cgroup limit (test)")


def test_computed_on_q8_0_when_the_f16_does_not_fit(build_family, tmp_path, monkeypatch):
    from edgemerge.build import run

    recipe = load_recipe(build_family["recipe"])
    config = json.loads((build_family["instruct"] / "config.json").read_text())
    shape = shape_from_config(config, 0)
    # the plan estimates file sizes from the parameter count; measure both needs the way the plan does
    from edgemerge.build.options import plan_space_item
    from edgemerge.check import check_compat
    from edgemerge.sources import resolve_recipe

    n_params = check_compat(resolve_recipe(recipe)).n_params
    need_f16 = imatrix_need(shape, plan_space_item(n_params, "F16"), 512)
    need_q8 = imatrix_need(shape, plan_space_item(n_params, SOURCE_QUANT), 512)
    monkeypatch.setattr(run, "memory_limit", lambda: _limit_between(need_q8, need_f16))

    out = tmp_path / NAME
    build(recipe, BuildOptions(out=out, skip_eval=True, quants=["Q4_K_M"]))
    m = _manifest(out)
    assert m["imatrix"]["computed_on"] == Q8 and m["stages"]["imatrix"]
    assert not (out / Q8).exists()  # made for the importance matrix, in the work area, and removed after
    assert not list(work_dir(out).rglob("*-Q8_0.gguf"))
    assert kv(out / Q4)["quantize.imatrix.file"] == IMATRIX


def test_bad_imatrix_choices_exit_2_before_any_work(build_family, tmp_path, capsys):
    truncated = tmp_path / "cut.imatrix.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    cases = [
        (["--imatrix", str(truncated)], "cut.imatrix.gguf"),
        (["--imatrix", str(tmp_path / "missing.gguf")], "missing.gguf"),
        (
            ["--imatrix", "none", "--quant", "IQ2_M"],
            "IQ2_M needs an importance matrix and the build has imatrix: none",
        ),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(SystemExit) as e:
            main(["build", "--recipe", str(build_family["recipe"]), "--out", str(out), "--skip-eval", *args])
        assert e.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert needle in err and "Traceback" not in err
        assert not out.exists()


def test_recipe_imatrix_field(build_family, tmp_path):
    data = yaml.safe_load(build_family["recipe"].read_text())
    assert load_recipe(build_family["recipe"]).imatrix == "auto"  # the default
    for bad in ("", "a\x00b", "x" * 5000):
        with pytest.raises(EdgemergeError, match="imatrix"):
            parse_recipe(data | {"imatrix": bad})
    r = parse_recipe(data | {"imatrix": "eu.imatrix.gguf"}, root=tmp_path)
    assert r.imatrix == "eu.imatrix.gguf"


def test_auto_languages_target_first_and_warn_for_those_without_text():
    assert "fr" not in bundled_languages()
    langs, warnings = auto_languages(["eu", "ca", "fr"], "ca")
    assert langs == ("ca", "eu", "en") and len(warnings) == 1
    assert "no bundled calibration text for fr" in warnings[0]
    assert auto_languages(["en", "eu"], "eu")[0] == ("eu", "en")  # English once, where the recipe puts it
    assert auto_languages(["fr"], "fr") == ((), [])


def test_auto_without_any_bundled_text_is_refused(build_family):
    data = yaml.safe_load(build_family["recipe"].read_text())
    data["languages"][0]["code"] = "fr"
    recipe = parse_recipe(data, root=build_family["recipe"].parent)
    config = json.loads((build_family["instruct"] / "config.json").read_text())
    shape = shape_from_config(config, 0)
    big = MemoryLimit(1 << 40, 1 << 40, None, "RAM")
    kwargs = {
        "lang": "fr",
        "shape": shape,
        "sizes": {"float": 1000, "source": 500},
        "limit": big,
        "n_ctx_train": 2048,
        "merge_key": "k",
        "out_file": Path("x.imatrix.gguf"),
        "llama_version": None,
    }
    with pytest.raises(EdgemergeError, match="imatrix: auto needs bundled calibration text"):
        plan_imatrix(recipe, ["Q4_K_M"], **kwargs)
    # only types that ignore an imatrix: nothing to compute, nothing refused
    assert not plan_imatrix(recipe, ["Q8_0"], **kwargs).computes
    # the training context bounds the chunk
    eu = parse_recipe(yaml.safe_load(build_family["recipe"].read_text()))
    plan = plan_imatrix(eu, ["Q4_K_M", "Q8_0"], **(kwargs | {"lang": "eu", "n_ctx_train": 128}))
    assert plan.computes and plan.chunk_size == 128 and plan.users == ("Q4_K_M",) and plan.source == "float"
    assert plan.need == imatrix_need(shape, 1000, 128)


def test_an_8b_build_on_a_16_gb_laptop_calibrates_on_q8_0(build_family):
    """Llama-3.1-8B's shape: its F16 (16 GB) does not fit 16 GB with the calibration's buffers, its Q8_0 does; on
    32 GB the F16 is used."""
    from .test_memory_plan import LLAMA_8B, SIZES_8B, limit

    recipe = load_recipe(build_family["recipe"])
    shape = shape_from_config(LLAMA_8B, 0)
    sizes = {"float": SIZES_8B["m-F16.gguf"], "source": SIZES_8B["m-Q8_0.gguf"]}
    common = {"lang": "eu", "shape": shape, "sizes": sizes, "n_ctx_train": 131072, "merge_key": "k"}
    common |= {"out_file": Path("m.imatrix.gguf"), "llama_version": None}
    laptop = plan_imatrix(recipe, ["Q4_K_M", "Q8_0"], limit=limit(16 << 30), **common)
    assert laptop.source == SOURCE_QUANT and laptop.need == imatrix_need(shape, sizes["source"], 512)
    assert 8.5e9 < laptop.need < 0.9 * (16 << 30)
    assert plan_imatrix(recipe, ["Q4_K_M"], limit=limit(32 << 30), **common).source == "float"
