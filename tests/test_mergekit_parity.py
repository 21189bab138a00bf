"""edgemerge's merges against mergekit itself (the definitions the README promises), run in-process on the
same tiny family. Skips when mergekit is not installed (it is in the dev extra).

DARE methods are not compared element-wise: mergekit draws its masks with torch's global RNG, edgemerge with
a per-tensor seeded numpy generator (same model on every backend and tensor order), so the masks differ by
design; their formula is checked against an independent numpy computation in test_merge_engine.py. DELLA is:
mergekit's own code runs with its one random call, torch.bernoulli(p), answered from edgemerge's uniforms for
that (tensor, model), so everything else (p from the ranks, rescale, consensus, lambda) is compared entry by
entry.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import yaml

from edgemerge.pipeline import merge_to_hf
from edgemerge.recipe import load_recipe

from .merge_reference import uniforms
from .models import state_of, write_recipe
from .test_merge_engine import WEIGHTS, read_out

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[dev]')")

BF16_EPS = 2.0**-7  # spacing of bfloat16 values relative to their magnitude (8 significant bits)
F32_FLOOR = 2.0**-20  # a few float32 ulps of the tensor's largest value: sums in another order differ by that


def run_mergekit(family, method: str, params: dict, out, *, base: bool = True) -> dict[str, np.ndarray]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    models = [{"model": str(family["instruct"]), "parameters": {"weight": 1.0, **params}}]
    models += [{"model": str(family[c]), "parameters": {"weight": w, **params}} for c, w in WEIGHTS.items()]
    config = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if base:
        config["base_model"] = str(family["base"])
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    return read_out(out)


def at_a_cut(taus: list[np.ndarray], method: str, params: dict) -> np.ndarray:
    """Entries whose |tau| equals the magnitude at a sparsification cut in any task vector: there the order
    of equal magnitudes decides what is kept (by position here, arbitrary in mergekit's unstable sort)."""
    amb = np.zeros(taus[0].shape, dtype=bool)
    if "density" not in params:
        return amb
    for tau in taus:
        mag = np.sort(np.abs(tau).ravel())
        n, keep = mag.size, int(params["density"] * mag.size)
        cuts = [n - keep]  # ties: the smallest kept magnitude
        if method == "breadcrumbs":
            n_top = int(params["gamma"] * n)
            cuts = [max(n - keep - n_top, 0), n - n_top]
        for c in cuts:
            if 0 < c < n:
                amb |= np.isin(np.abs(tau), mag[[c - 1, c]])
    return amb


def as_f32(a: np.ndarray) -> np.ndarray:
    return a.view(ml_dtypes.bfloat16).astype(np.float32) if a.dtype != np.float32 else a


def assert_within_a_bf16_step(ours, theirs, allowed=None) -> int:
    """Every entry within one bf16 step of mergekit's (plus a float32 floor), except where `allowed(name)`
    marks it; returns how many entries differ (all of them allowed)."""
    assert set(ours) == set(theirs)
    differ = 0
    for name in ours:
        a, b = as_f32(ours[name]), as_f32(theirs[name])
        assert a.shape == b.shape, name
        step = np.maximum(np.abs(a), np.abs(b)) * BF16_EPS + np.abs(b).max() * F32_FLOOR
        off = np.abs(a - b) > step
        ok = allowed(name) if allowed is not None else np.zeros(a.shape, bool)
        assert not (off & ~ok).any(), f"{name}: {(off & ~ok).mean():.4%} of entries differ from mergekit"
        differ += int(off.sum())
    return differ


@pytest.mark.parametrize(
    ("method", "params", "mergekit_method"),
    [
        ("task_arithmetic", {}, "task_arithmetic"),
        ("linear", {}, "linear"),
        ("ties", {"density": 0.5}, "ties"),
        ("breadcrumbs", {"density": 0.9, "gamma": 0.02}, "breadcrumbs"),
    ],
)
def test_same_tensors_as_mergekit(tmp_path, merge_family, method, params, mergekit_method):
    """Every entry within one bf16 step of mergekit's (the same float32 sums in another order, rounded once),
    except, for the sparsifying methods, entries whose magnitude ties with the one at the cut."""
    ours = read_out(
        merge_to_hf(
            load_recipe(
                write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method=method, options=params)
            ),
            tmp_path / "ours",
        )
    )
    theirs = run_mergekit(merge_family, mergekit_method, params, tmp_path / "mk", base=method != "linear")
    states = {k: state_of(v) for k, v in merge_family.items()}

    def ambiguous(name):
        taus = [states[m][name].numpy() - states["base"][name].numpy() for m in ("instruct", *WEIGHTS)]
        return at_a_cut(taus, method, params)

    assert_within_a_bf16_step(ours, theirs, ambiguous)
    excluded = sum(int(ambiguous(name).sum()) for name in ours)
    total = sum(a.size for a in ours.values())
    assert excluded < 0.05 * total  # the exception stays an exception
    print(f"{method}: equal to mergekit within one bf16 step; {excluded / total:.3%} entries tie at a cut")


def run_mergekit_pair(family, method: str, t, out) -> dict[str, np.ndarray]:
    """mergekit's slerp/nearswap as the paper's scripts run them: the instruct model is base_model, the
    language model (eu) the other; t a global parameter (a list: mergekit's per-layer gradient)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {
        "merge_method": method,
        "base_model": str(family["instruct"]),
        "models": [{"model": str(family["instruct"])}, {"model": str(family["eu"])}],
        "parameters": {"t": t},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    return read_out(out)


@pytest.mark.parametrize(
    ("method", "t"),
    [
        ("slerp", 0.5),
        ("slerp", [0.1, 0.8, 0.3]),
        (
            "slerp",
            [
                {"filter": "self_attn", "value": [0, 1]},
                {"filter": "mlp", "value": [0.9, 0.2]},
                {"value": 0.4},
            ],
        ),
        ("nearswap", 0.5),
        ("nearswap", 0.005),
        ("nearswap", [0.002, 0.05]),
    ],
)
def test_two_model_methods_equal_mergekit(tmp_path, merge_family, method, t):
    """slerp and nearswap (the paper's t = 0.5, a mixing t, a per-layer schedule read as mergekit reads its
    gradients: layers at i / (n - 1), embeddings, final norm and head at 0): within one bf16 step everywhere."""
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0}, method=method, options={"t": t})
    ours = read_out(merge_to_hf(load_recipe(recipe), tmp_path / "ours"))
    theirs = run_mergekit_pair(merge_family, method, t, tmp_path / "mk")
    assert assert_within_a_bf16_step(ours, theirs) == 0
    states = {k: state_of(merge_family[k]) for k in ("instruct", "eu")}
    moved = sum(not np.array_equal(as_f32(ours[n]), states["instruct"][n].float().numpy()) for n in ours)
    # every tensor took something of the language model, but where the schedule gives t = 0 (the conditions
    # case: layer 0's four attention projections)
    conditions = isinstance(t, list) and isinstance(t[0], dict)
    assert moved == len(ours) - (4 if conditions else 0)


def test_slerp_fixture_takes_both_branches(merge_family):
    """The fixture's matrices are at an angle (their task vectors are as large as the shared base: the arc),
    its norms nearly colinear (lerp): the parity test above covers both of mergekit's branches."""
    from edgemerge.merge.methods import SLERP_COLINEAR

    a, b = state_of(merge_family["instruct"]), state_of(merge_family["eu"])
    cos = {
        n: float((a[n].double() * b[n].double()).sum() / (a[n].double().norm() * b[n].double().norm()))
        for n in a
    }
    assert any(abs(c) > SLERP_COLINEAR for c in cos.values())
    assert any(abs(c) < 0.99 for c in cos.values())


def run_mergekit_della(family, method, params, out, monkeypatch, *, stable: bool) -> dict[str, np.ndarray]:
    """mergekit's della with its one random call, torch.bernoulli(p), answered from edgemerge's uniforms u for
    that (tensor, model) (keep = u < p); with `stable`, its argsort of the magnitudes ranks equal ones by
    position as edgemerge does (mergekit's unstable sort leaves their order arbitrary)."""
    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge as GTA

    index = {str(family[m]): i for i, m in enumerate(("instruct", *WEIGHTS))}
    state: dict = {}
    merge_group, argsort = GTA.merge_group, torch.argsort

    def recording(self, group, /, **parameters):
        models = [index[str(e.id.model.path)] for e in group.non_base]
        state.update(name=group.metadata.name, models=models, k=0)
        return merge_group(self, group, **parameters)

    def bernoulli(p, *args, **kwargs):
        model = state["models"][state["k"]]
        state["k"] += 1
        u = torch.from_numpy(uniforms(0, state["name"], model, p.numel())).reshape(p.shape)
        return (u < p).to(p.dtype)

    with monkeypatch.context() as m:
        m.setattr(GTA, "merge_group", recording)
        m.setattr(torch, "bernoulli", bernoulli)
        if stable:
            m.setattr(torch, "argsort", lambda *a, **k: argsort(*a, **k, stable=True))
        return run_mergekit(family, method, params, out)


@pytest.mark.parametrize(
    ("method", "params"),
    [("della", {"density": 0.5, "epsilon": 0.1}), ("della_linear", {"density": 0.6, "epsilon": 0.2})],
)
def test_della_equals_mergekit_given_the_same_random_numbers(
    tmp_path, merge_family, monkeypatch, method, params
):
    """mergekit's own della_magprune given edgemerge's random numbers: p from the ranks, the masks, the L1
    rescale, the sign consensus and lambda agree entry by entry within one bf16 step once equal magnitudes in a
    row are ranked by position. With mergekit's unstable argsort, equal magnitudes (frequent: bf16 deltas
    repeat) may swap ranks, so a few p differ by a rank step, a few masks flip, and a flip moves the rescale
    of its whole tensor slightly: those entries are counted, and stay few."""
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method=method, options=params)
    ours = read_out(merge_to_hf(load_recipe(recipe), tmp_path / "ours"))
    stable = run_mergekit_della(merge_family, method, params, tmp_path / "mk", monkeypatch, stable=True)
    assert assert_within_a_bf16_step(ours, stable) == 0
    theirs = run_mergekit_della(merge_family, method, params, tmp_path / "mk2", monkeypatch, stable=False)
    differ = assert_within_a_bf16_step(ours, theirs, lambda name: np.ones(ours[name].shape, bool))
    total = sum(a.size for a in ours.values())
    assert differ < 0.01 * total
    print(
        f"{method}: equal to mergekit within one bf16 step; with its unstable sort {differ} of {total} differ"
    )
