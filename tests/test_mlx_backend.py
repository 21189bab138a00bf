"""The MLX backend gives the torch backend's results: every method, the engine, and the fused GGUF file.
Skipped when mlx is not installed (it is an optional extra: pip install -e ".[mlx]")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason='mlx is not installed (pip install -e ".[mlx]")')

from edgemerge.merge.backends import get_backend
from edgemerge.merge.methods import get_method
from edgemerge.pipeline import merge_to_gguf, merge_to_hf
from edgemerge.recipe import load_recipe

from .merge_reference import assert_rounded_once, reference
from .models import write_recipe
from .test_merge_engine import METHODS, TWO_MODELS, read_out
from .test_merge_methods import CASES, ArrayInputs, family


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_each_method_on_mlx_matches_numpy_and_torch(method, opts):
    instruct, base, langs = family((64, 48))
    m = get_method(method)
    o = m.parse_options(opts)
    results = {}
    for name in ("torch", "mlx"):
        xp = get_backend(name)
        ((_, block),) = m.merge(xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3]), o)
        results[name] = (xp.to_numpy(block, "float32"), xp.to_numpy(block, "bfloat16"))
    want = reference(method, "w", instruct, base, langs, [0.6, 0.3], opts)
    np.testing.assert_allclose(results["mlx"][0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["mlx"][0], results["torch"][0], rtol=1e-6, atol=1e-7)
    assert_rounded_once(results["mlx"][1], results["torch"][0])


@pytest.mark.parametrize(("method", "opts"), METHODS + TWO_MODELS)
def test_engine_on_mlx_equals_torch_within_bf16_rounding(tmp_path, merge_family, method, opts):
    weights = {"eu": 1.0} if (method, opts) in TWO_MODELS else {"eu": 0.7, "ca": 0.4}
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, weights, method=method, options=opts)
    )
    exact = read_out(merge_to_hf(recipe, tmp_path / "torch32", backend="torch", dtype="float32"))
    got = read_out(merge_to_hf(recipe, tmp_path / "mlx", backend="mlx"))
    assert set(got) == set(exact)
    for name, arr in got.items():
        assert_rounded_once(arr, exact[name])


def test_fused_gguf_is_the_same_file_on_both_backends(tmp_path, merge_family):
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            merge_family,
            {"eu": 0.7, "ca": 0.4},
            method="dare_ties",
            options={"density": 0.5},
        )
    )
    files = [merge_to_gguf(recipe, tmp_path / f"{b}.gguf", backend=b) for b in ("torch", "mlx")]
    digests = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert len(digests) == 1


def test_auto_picks_mlx_on_apple_silicon(monkeypatch):
    import platform

    from edgemerge.merge.backends import resolve_backend_name

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert resolve_backend_name("auto") == "mlx"
    assert get_backend("auto").name == "mlx"
