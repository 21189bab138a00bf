"""Each merge method against an independent numpy computation of its formula (tests/merge_reference.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.merge.backends import get_backend
from edgemerge.merge.methods import (
    DEFAULT_METHOD,
    METHODS,
    dare_mask,
    get_method,
    option_interval,
    rank_at_least,
)

from .merge_reference import reference


class ArrayInputs:
    """TensorInputs over numpy arrays, whole or cut into row blocks."""

    def __init__(self, xp, name, instruct, base, langs, weights, pieces=(None,), position=0.0):
        self.xp, self.name, self.weights, self.pieces = xp, name, list(weights), list(pieces)
        self.position = position
        self.shape = tuple(base.shape)
        self._instruct, self._base, self._langs = instruct, base, langs

    def _get(self, a, rows):
        return self.xp.from_numpy(a if rows is None else np.ascontiguousarray(a[rows]))

    def instruct(self, rows=None):
        return self._get(self._instruct, rows)

    def base(self, rows=None):
        return self._get(self._base, rows)

    def language(self, i, rows=None):
        return self._get(self._langs[i], rows)


def merged(method, xp, inputs, opts):
    """The whole merged tensor as float32 numpy, assembled from the method's blocks."""
    out = np.empty(inputs.shape, np.float32)
    for rows, block in method.merge(xp, inputs, opts):
        out[slice(None) if rows is None else rows] = xp.to_numpy(block, "float32")
    return out


def bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def family(shape, n_langs=2, seed=0):
    """bf16 weights like a real family: many task-vector entries share a magnitude (ties matter)."""
    rng = np.random.default_rng(seed)
    base = bf16(rng.normal(0, 1, shape))
    models = [bf16(base.astype(np.float32) + rng.normal(0, 0.02, shape)) for _ in range(n_langs + 1)]
    return models[0], base, models[1:]


def run(method, opts, shape=(64, 48), weights=(0.6, 0.3), name="model.layers.0.mlp.up_proj.weight", xp=None):
    xp = xp or get_backend("torch")
    instruct, base, langs = family(shape, len(weights))
    m = get_method(method)
    got = merged(m, xp, ArrayInputs(xp, name, instruct, base, langs, weights), m.parse_options(opts))
    want = reference(method, name, instruct, base, langs, weights, opts)
    return got, want, (instruct, base, langs)


CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8}),
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.7, "rescale": True, "normalize": False}),
    ("dare_ties", {"density": 0.5, "seed": 7}),
    ("dare_linear", {"density": 0.3}),
    ("dare_linear", {"density": 0.3, "rescale": False}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.0}),
    ("della", {"density": 0.5, "epsilon": 0.1}),  # the paper's (lambda 1)
    ("della", {"density": 0.7, "epsilon": 0.25, "rescale": False, "lambda": 0.9, "seed": 5}),
    ("della_linear", {"density": 0.4, "epsilon": 0.0}),
    ("slerp", {"t": 0.5}),  # the paper's; these models are nearly colinear: lerp (test_slerp_* for the arc)
    ("slerp", {"t": [0.2, 0.9]}),
    ("nearswap", {"t": 0.5}),  # the paper's
    ("nearswap", {"t": 0.01}),
]


@pytest.mark.parametrize(("method", "opts"), CASES)
@pytest.mark.parametrize("shape", [(64, 48), (48,)])
def test_method_matches_numpy_formula(method, opts, shape):
    got, want, _ = run(method, opts, shape=shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_negative_weight_and_ties_sign_election():
    got, want, _ = run("ties", {"density": 0.5}, weights=(0.8, -0.5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_is_the_paper_formula():
    """W = W_instruct + sum_i w_i (W_lang_i - W_base), multilingual (four vectors at 0.25)."""
    weights = (0.25, 0.25, 0.25, 0.25)
    got, _, (instruct, base, langs) = run("task_arithmetic", {}, weights=weights)
    b = base.astype(np.float32)
    paper = instruct.astype(np.float32) + sum(w * (x.astype(np.float32) - b) for w, x in zip(weights, langs))
    np.testing.assert_allclose(got, paper, rtol=1e-5, atol=1e-6)
    assert np.abs(got - instruct.astype(np.float32)).max() > 1e-3  # the language vectors did move the weights


def test_linear_is_the_papers_average():
    got, _, (instruct, _, langs) = run("linear", {}, weights=(1.0,))
    np.testing.assert_allclose(
        got, (instruct.astype(np.float32) + langs[0].astype(np.float32)) / 2, rtol=1e-6
    )


def test_sparsified_methods_drop_what_they_say():
    """ties at density 0.25 keeps a quarter of each task vector (before the consensus)."""
    xp = get_backend("torch")
    tau = xp.from_numpy(np.arange(100, dtype=np.float32) - 50)
    kept = xp.to_numpy(xp.where(rank_at_least(xp, xp.abs(tau), 75), 1.0, 0.0), "float32")
    assert kept.sum() == 25
    assert set(np.flatnonzero(kept)) == set(range(13)) | set(range(88, 100))  # |x| >= 38, ties by position


def test_rank_handles_ties_like_a_stable_sort():
    xp = get_backend("torch")
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, size=(30, 7)).astype(np.float32)  # only five distinct values
    order = np.argsort(a.ravel(), kind="stable")
    for r in (0, 1, 37, 105, 209, 210):
        want = np.zeros(a.size, bool)
        want[order[r:]] = True
        got = xp.to_numpy(xp.where(rank_at_least(xp, xp.from_numpy(a), r), 1.0, 0.0), "float32")
        assert (got.ravel() == want).all(), r


@pytest.mark.parametrize("kind", ["normal", "few values", "mostly zero", "subnormal and huge"])
def test_rank_cuts_stream_equals_a_partition_of_the_whole_tensor(kind):
    """The two-pass radix selection over uneven blocks gives the value and tie count a full partition gives."""
    from edgemerge.merge.methods import rank_cuts

    rng = np.random.default_rng(5)
    n = 50_000
    a = {
        "normal": np.abs(rng.normal(0, 0.002, n)),
        "few values": rng.integers(0, 4, n) * 0.25,
        "mostly zero": np.where(rng.random(n) < 0.9, 0.0, np.abs(rng.normal(0, 1, n))),
        "subnormal and huge": np.abs(rng.normal(0, 1, n)) * np.where(rng.random(n) < 0.5, 1e-40, 1e30),
    }[kind].astype(np.float32)
    cuts = np.cumsum([0, 7, 1000, 13, 20_000, 1, 28_979])
    blocks = [a[i:j] for i, j in itertools.pairwise(cuts)]
    ranks = [0, 1, 17, n // 3, n // 2, n - 1, n]
    got = rank_cuts(lambda: iter(blocks), ranks, n)
    part = np.sort(a)
    for r, cut in zip(ranks, got):
        if r in (0, n):
            assert (cut.all_in, cut.none_in) == (r == 0, r == n)
            continue
        assert np.float32(cut.v) == part[r], (kind, r)
        assert cut.skip == r - int(np.count_nonzero(a < part[r])), (kind, r)


def test_dare_seeded_reproducible_and_order_independent():
    a1, _, _ = run("dare_ties", {"density": 0.5, "seed": 1})
    a2, _, _ = run("dare_ties", {"density": 0.5, "seed": 1})
    b, _, _ = run("dare_ties", {"density": 0.5, "seed": 2})
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, b)
    m = dare_mask(1, "t.weight", 0, (300, 300), 0.3)
    assert abs(m.mean() - 0.3) < 0.01
    assert np.array_equal(m, dare_mask(1, "t.weight", 0, (300, 300), 0.3))
    assert not np.array_equal(m, dare_mask(1, "t.weight", 1, (300, 300), 0.3))  # each model its own mask
    assert not np.array_equal(m, dare_mask(1, "u.weight", 0, (300, 300), 0.3))  # each tensor its own mask


def test_dare_mask_chunks_equal_one_draw():
    """The mask is drawn in chunks; it equals one draw of the whole tensor from the documented seed."""
    from edgemerge.merge import methods

    from .merge_reference import dare_keep

    shape = (3 * methods._MASK_CHUNK // 1024 + 5, 1024)
    assert np.array_equal(dare_mask(0, "x", 2, shape, 0.5), dare_keep(0, "x", 2, shape, 0.5))


def test_defaults_follow_mergekit():
    opts = {name: m.parse_options({}) for name, m in METHODS.items()}
    assert opts["task_arithmetic"] == {"normalize": False, "lambda": 1.0}
    assert opts["linear"] == {"normalize": True}
    assert opts["ties"]["normalize"] is True and opts["ties"]["rescale"] is False
    assert opts["dare_ties"]["rescale"] is True and opts["dare_linear"]["normalize"] is False
    assert opts["breadcrumbs"]["gamma"] == 0.01 and opts["breadcrumbs"]["density"] == 1.0
    # mergekit: della normalizes, della_linear not, both rescale; epsilon 0.15; slerp/nearswap require t (here
    # the paper's 0.5)
    assert opts["della"] == {
        "density": 1.0,
        "epsilon": 0.15,
        "normalize": True,
        "rescale": True,
        "lambda": 1.0,
        "seed": 0,
    }
    assert opts["della_linear"] == {**opts["della"], "normalize": False}
    assert opts["slerp"] == opts["nearswap"] == {"t": 0.5}
    assert set(METHODS) == {
        "task_arithmetic",
        "linear",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "della",
        "della_linear",
        "slerp",
        "nearswap",
    }
    assert {n for n, m in METHODS.items() if m.two_models} == {"slerp", "nearswap"}


@pytest.mark.parametrize(
    ("method", "opts", "needle"),
    [
        # unknown key
        (
            "ties",
            {"epsilon": 0.1},
            "options.epsilon: unknown option of ties; valid options: density, normalize, rescale, lambda",
        ),
        ("task_arithmetic", {"density": 0.5}, "options.density: unknown option of task_arithmetic"),
        ("task_arithmetic", {"lambda_": 2}, "options.lambda_: unknown option"),  # the recipe's name is lambda
        # out of range, shown as given
        ("ties", {"density": 0}, "options.density: must be in (0, 1], got 0"),
        ("ties", {"density": 1.5}, "options.density: must be in (0, 1], got 1.5"),
        ("breadcrumbs", {"gamma": 1.0}, "options.gamma: must be in [0, 1), got 1.0"),
        ("breadcrumbs", {"gamma": -0.1}, "options.gamma: must be in [0, 1), got -0.1"),
        ("dare_linear", {"seed": -1}, "options.seed: must be in [0, 2**64), got -1"),
        ("dare_ties", {"seed": 2**64}, "options.seed: must be in [0, 2**64), got 18446744073709551616"),
        ("della", {"epsilon": 0.5}, "options.epsilon: must be in [0, 0.5), got 0.5"),
        # the pair: density +- epsilon inside (0, 1), as mergekit requires (unless nothing is dropped)
        (
            "della",
            {"density": 0.6, "epsilon": 0.45, "lambda": 1},
            "options.epsilon: density +- epsilon must stay inside (0, 1), got [0.15, 1.05] (density 0.6)",
        ),
        (
            "della",
            {"density": 0.1},
            "options.epsilon: density +- epsilon must stay inside (0, 1), got [-0.05, 0.25]",
        ),
        ("della_linear", {"density": 0.9, "epsilon": 0.1}, "options.epsilon: density +- epsilon must stay"),
        ("slerp", {"t": 1.5}, "options.t: must be in [0, 1], got 1.5"),
        ("slerp", {"t": -0.1}, "options.t: must be in [0, 1], got -0.1"),
        ("nearswap", {"t": 0}, "options.t: must be in (0, 1], got 0"),
        ("slerp", {"t": [0, 0.5, 2]}, "options.t: value 2 of the schedule must be in [0, 1], got 2"),
        ("slerp", {"t": []}, "options.t: must be a number or a list of 1 to 1024 numbers, got 0 values"),
        ("slerp", {"t": "0.5"}, "options.t: must be a finite number, got '0.5'"),
        (
            "nearswap",
            {"t": [0.5, None]},
            "options.t: value 1 of the schedule must be a finite number, got None",
        ),
        ("slerp", {"density": 0.5}, "options.density: unknown option of slerp; valid options: t"),
        # mergekit's conditions
        (
            "slerp",
            {"t": [{"filter": "mlp", "value": [0, 2]}]},
            "options.t: condition 0: value 1 of the schedule must be in [0, 1], got 2",
        ),
        (
            "slerp",
            {"t": [{"filter": "mlp"}]},
            "options.t: condition 0 must be a mapping of value and an optional",
        ),
        ("slerp", {"t": [{"value": 0.5, "when": 1}]}, "options.t: condition 0 must be a mapping of value"),
        ("slerp", {"t": [0.5, {"value": 0.5}]}, "options.t: condition 0 must be a mapping of value"),
        (
            "nearswap",
            {"t": {"filter": 3, "value": 0.1}},
            "options.t: condition 0: filter must be part of a tensor",
        ),
        ("nearswap", {"t": {"value": 0}}, "options.t: condition 0: must be in (0, 1], got 0"),
        # wrong type: each type takes only its own
        ("ties", {"normalize": "yes"}, "options.normalize: must be true or false, got 'yes'"),
        ("ties", {"rescale": 1}, "options.rescale: must be true or false, got 1"),
        ("ties", {"density": "0.5"}, "options.density: must be a finite number, got '0.5'"),
        ("task_arithmetic", {"lambda": True}, "options.lambda: must be a finite number, got True"),
        ("task_arithmetic", {"lambda": [1]}, "options.lambda: must be a finite number, got [1]"),
        ("dare_linear", {"seed": 1.0}, "options.seed: must be an integer, got 1.0"),
        ("dare_linear", {"seed": False}, "options.seed: must be an integer, got False"),
        # not finite: nan, inf, an integer beyond the float range
        ("task_arithmetic", {"lambda": float("nan")}, "options.lambda: must be a finite number, got nan"),
        ("ties", {"lambda": float("-inf")}, "options.lambda: must be a finite number, got -inf"),
        ("linear", {"normalize": 10**400}, "options.normalize: must be true or false, got <an integer of"),
        (
            "ties",
            {"density": 10**400},
            "options.density: must be a finite number, got <an integer of about 401",
        ),
    ],
)
def test_bad_options_name_the_option(method, opts, needle):
    with pytest.raises(EdgemergeError) as e:
        get_method(method).parse_options(opts)
    assert e.value.message.startswith(f"method {method}: options.")
    assert needle in e.value.message
    assert "\n" not in e.value.message


def test_every_bad_option_is_named_once():
    """All the bad options of one call are reported (three, then a count), the valid ones listed once."""
    opts = {"density": 2, "rescale": "no", "lambda": "x", "foo": 1, "bar": 2}
    with pytest.raises(EdgemergeError) as e:
        get_method("ties").parse_options(opts)
    msg = e.value.message
    assert msg == (
        "method ties: options.density: must be in (0, 1], got 2; options.rescale: must be true or false, "
        "got 'no'; options.lambda: must be a finite number, got 'x' (and 2 more)"
    )
    with pytest.raises(EdgemergeError) as e:
        get_method("linear").parse_options({"foo": 1, "bar": 2})
    assert (
        e.value.message.count("valid options: normalize") == 1
        and "options.bar: unknown option" in e.value.message
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_options_are_declared_once_per_method(name):
    """Each method's model: every option typed, with a default (resolved by parse_options in declaration
    order), a description and no other keys; the bounds are those the maths relies on."""
    m = METHODS[name]
    fields = m.options.model_fields
    assert m.options.model_config["extra"] == "forbid"
    assert list(m.parse_options({})) == m.option_names == [f.alias or n for n, f in fields.items()]
    schedule = (
        float | list[float] | list[dict[str, Any]]
    )  # slerp's and nearswap's t (number, list, conditions)
    for f in fields.values():
        assert f.description and f.annotation in (bool, float, int, schedule)
    intervals = {n: option_interval(f) for n, f in zip(m.option_names, fields.values())}
    assert intervals.get("density", "(0, 1]") == "(0, 1]" and intervals.get("gamma", "[0, 1)") == "[0, 1)"
    assert intervals.get("seed", "[0, 2**64)") == "[0, 2**64)"
    assert intervals.get("epsilon", "[0, 0.5)") == "[0, 0.5)"
    assert intervals.get("t", "[0, 1]") == ("(0, 1]" if name == "nearswap" else "[0, 1]")
    assert {n for n, i in intervals.items() if i} <= {"density", "gamma", "seed", "epsilon", "t"}
    # an int given for a float option resolves to a float (what MergeStats records, as before the models)
    names = dict(zip(m.option_names, fields.values()))
    given = {n: int(f.default) if isinstance(f.default, float) else f.default for n, f in names.items()}
    given = {n: v if v or names[n].annotation != schedule else 1 for n, v in given.items()}  # t > 0
    resolved = m.parse_options(given)
    types = {n: float if f.annotation == schedule else f.annotation for n, f in names.items()}
    assert {n: type(v) for n, v in resolved.items()} == types


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_the_declared_methods_and_options():
    """The README's method table and recipe example are written by hand: they must say what the registry
    declares (every method, its options in order with their defaults, the bounds)."""
    text = README.read_text(encoding="utf-8")
    assert f"method: {DEFAULT_METHOD}  " in text and "# " + " | ".join(METHODS) + "\n" in text
    table = text[text.index("| method | W = | options") :].split("\n\n")[0].splitlines()[2:]
    rows = {line.split("`")[1]: line for line in table}
    assert list(rows) == list(METHODS)
    for name, m in METHODS.items():
        cells = rows[name].split(" | ")
        defaults = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in m.parse_options({}).items())
        assert cells[-1].rstrip(" |") == defaults, name
        for n, f in zip(m.option_names, m.options.model_fields.values()):
            if option_interval(f):
                assert (
                    f"`{n}` in {option_interval(f)}" in text
                    or f"`{n}` an integer in {option_interval(f)}" in text
                )


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(
        EdgemergeError, match="unknown merge method 'nuslerp'; choose one of: task_arithmetic"
    ):
        get_method("nuslerp")


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_row_blocks_give_the_whole_tensor_result(method, opts):
    """Sparsification statistics are global: merging in uneven row blocks changes no bit."""
    xp = get_backend("torch")
    instruct, base, langs = family((64, 48))
    m = get_method(method)
    o = m.parse_options(opts)
    whole = merged(m, xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3]), o)
    blocks = [slice(0, 5), slice(5, 6), slice(6, 40), slice(40, 64)]
    parts = merged(m, xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3], blocks), o)
    assert np.array_equal(whole.view(np.uint32), parts.view(np.uint32))


def test_della_keeps_large_entries_more_often_within_the_band():
    """p runs linearly with the rank in each row from density - epsilon to density + epsilon: the kept share
    of each rank decile follows it, the overall share is density, and rows are ranked apart."""
    from edgemerge.merge.methods import della_probs

    rng = np.random.default_rng(0)
    mag = np.abs(rng.normal(0, 1, (400, 1000))).astype(np.float32)
    mag[1] *= 1000  # another row's scale changes nothing in this row's ranks
    p = della_probs(mag, 0.5, 0.1)
    row = np.sort(p[0])
    assert row[0] == np.float32(0.4) and row[-1] == np.float32(0.6)
    np.testing.assert_allclose(np.diff(row.astype(np.float64)), 0.2 / 999, atol=1e-7)  # float32 steps
    assert np.array_equal(np.argsort(p[0], kind="stable"), np.argsort(mag[0], kind="stable"))
    assert np.array_equal(np.sort(p[1]), row)
    assert abs(p.mean() - 0.5) < 1e-6
    xp = get_backend("torch")
    tau = rng.normal(0, 1, (400, 1000)).astype(np.float32)
    zero = np.zeros_like(tau)
    opts = get_method("della_linear").parse_options({"density": 0.5, "epsilon": 0.1, "rescale": False})
    ((_, block),) = get_method("della_linear").merge(xp, ArrayInputs(xp, "w", tau, zero, [zero], [0.0]), opts)
    kept = xp.to_numpy(block, "float32") != 0
    assert abs(kept.mean() - 0.5) < 0.005
    deciles = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1) // 100
    shares = [kept[deciles == d].mean() for d in range(10)]
    np.testing.assert_allclose(shares, 0.4 + 0.2 * (np.arange(10) * 100 + 49.5) / 999, atol=0.01)


def test_della_seeded_reproducible_and_block_independent():
    """The same seed gives the same model, another seed another; odd row lengths cut in uneven blocks draw
    the whole tensor's numbers (the generator's stream carries over between blocks)."""
    xp = get_backend("torch")
    instruct, base, langs = family((31, 37))
    m = get_method("della")
    o = m.parse_options({"density": 0.5, "epsilon": 0.1, "seed": 4})
    whole = merged(m, xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3]), o)
    blocks = [slice(0, 3), slice(3, 4), slice(4, 30), slice(30, 31)]
    parts = merged(m, xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3], blocks), o)
    assert np.array_equal(whole.view(np.uint32), parts.view(np.uint32))
    want = reference(
        "della", "w", instruct, base, langs, [0.6, 0.3], {"density": 0.5, "epsilon": 0.1, "seed": 4}
    )
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-6)
    other = merged(m, xp, ArrayInputs(xp, "w", instruct, base, langs, [0.6, 0.3]), {**o, "seed": 5})
    assert not np.array_equal(whole, other)


def test_della_one_row_in_blocks_is_ranked_whole():
    """A 1-D tensor is one row even when the engine cuts it into blocks."""
    xp = get_backend("torch")
    instruct, base, langs = family((1001,), n_langs=1)
    m = get_method("della")
    o = m.parse_options({"density": 0.5, "epsilon": 0.2})
    whole = merged(m, xp, ArrayInputs(xp, "n", instruct, base, langs, [1.0]), o)
    cut = [slice(0, 500), slice(500, 1001)]
    parts = merged(m, xp, ArrayInputs(xp, "n", instruct, base, langs, [1.0], cut), o)
    assert np.array_equal(whole, parts)
    np.testing.assert_allclose(
        whole, reference("della", "n", instruct, base, langs, [1.0], o), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("case", ["apart", "opposite", "colinear", "zero", "t=0", "t=1"])
def test_slerp_follows_the_arc_and_falls_back_to_lerp(case):
    """Against mergekit's formula written out in numpy: the arc for tensors at an angle, lerp for nearly
    colinear ones (either direction), a zero tensor left unnormalized; t = 0 and 1 give a model back."""
    rng = np.random.default_rng(1)
    v0 = bf16(rng.normal(0, 1, (40, 30)))
    v1 = {
        "apart": bf16(rng.normal(0, 2, (40, 30))),
        "opposite": bf16(-3 * v0.astype(np.float32) + rng.normal(0, 0.01, (40, 30))),
        "colinear": bf16(2 * v0.astype(np.float32) + rng.normal(0, 0.01, (40, 30))),
        "zero": bf16(np.zeros((40, 30))),
    }.get(case, bf16(rng.normal(0, 1, (40, 30))))
    t = {"t=0": 0.0, "t=1": 1.0}.get(case, 0.3)
    xp = get_backend("torch")
    m = get_method("slerp")
    blocks = [slice(0, 7), slice(7, 40)]
    got = merged(m, xp, ArrayInputs(xp, "w", v0, v0, [v1], [1.0], blocks), m.parse_options({"t": t}))
    np.testing.assert_allclose(
        got, reference("slerp", "w", v0, v0, [v1], [1.0], {"t": t}), rtol=1e-5, atol=1e-6
    )
    a, b = v0.astype(np.float32), v1.astype(np.float32)
    if case == "apart":  # on the arc: two unit vectors give a unit vector, where lerp falls short
        ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
        unit = merged(m, xp, ArrayInputs(xp, "w", ua, ua, [ub], [1.0]), {"t": t})
        assert abs(np.linalg.norm(unit) - 1) < 1e-5
        assert np.linalg.norm(0.7 * ua + 0.3 * ub) < 0.9
    if case in ("opposite", "colinear"):
        np.testing.assert_allclose(got, 0.7 * a + 0.3 * b, rtol=1e-5, atol=1e-6)
    if case == "t=0":
        assert np.array_equal(got, a)
    if case == "t=1":
        np.testing.assert_allclose(got, b, rtol=1e-6, atol=1e-7)


def test_schedules_are_read_per_layer_as_mergekit_reads_gradients():
    from edgemerge.merge.methods import schedule_at

    assert schedule_at(0.3, 0.7) == 0.3
    assert schedule_at([0.0, 1.0], 0.25) == 0.25
    assert schedule_at([0.0, 0.5, 0.3, 0.7, 1.0], 0.0) == 0.0
    assert schedule_at([0.0, 0.5, 0.3, 0.7, 1.0], 1.0) == 1.0
    assert abs(schedule_at([0.0, 0.5, 0.3, 0.7, 1.0], 0.375) - 0.4) < 1e-12  # halfway between 0.5 and 0.3
    assert schedule_at([0.8], 0.6) == 0.8
    # mergekit's conditions: the first whose filter is part of the name (or absent, or "*")
    conds = get_method("slerp").parse_options(
        {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}, {"value": 0.7}]}
    )["t"]
    assert schedule_at(conds, 0.25, "model.layers.1.self_attn.q_proj.weight") == 0.25
    assert schedule_at(conds, 0.25, "model.layers.1.mlp.up_proj.weight") == 0.2
    assert schedule_at(conds, 0.25, "model.norm.weight") == 0.7
    with pytest.raises(EdgemergeError, match="no condition's filter matches tensor model.norm.weight"):
        schedule_at(conds[:2], 0.0, "model.norm.weight")
    xp = get_backend("torch")
    instruct, base, langs = family((16, 8))
    for method in ("slerp", "nearswap"):
        m = get_method(method)
        for position in (0.0, 0.4, 1.0):
            inputs = ArrayInputs(xp, "w", instruct, base, langs, [1.0], position=position)
            got = merged(m, xp, inputs, m.parse_options({"t": [0.01, 0.9]}))
            want = reference(method, "w", instruct, base, langs, [1.0], {"t": [0.01, 0.9]}, position)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nearswap_takes_the_language_value_where_the_models_are_near():
    a = np.array([0.0, 1.0, 1.0, 2.0, -1.0], np.float32)
    b = np.array([0.0, 1.1, 1.5, 4.0, 1.0], np.float32)
    xp = get_backend("torch")
    m = get_method("nearswap")
    got = merged(m, xp, ArrayInputs(xp, "w", a, a, [b], [1.0]), {"t": 0.5})
    # |b - a| = 0, 0.1, 0.5, 2, 2: within t the language value; beyond, t/|b - a| of the way towards it
    np.testing.assert_allclose(got, [0.0, 1.1, 1.5, 2.5, -0.5], rtol=1e-6)


@pytest.mark.parametrize("shape", [(7, 300), (300,), (4, 9, 5)])
def test_row_ranks_are_a_stable_sort_within_rows(shape):
    """Ranks along axis 1 equal a stable argsort's, ties (few distinct values), zeros, inf and NaN included."""
    from edgemerge.merge.methods import row_ranks

    rng = np.random.default_rng(2)
    a = (rng.integers(0, 6, shape) * 0.125).astype(np.float32)
    a.flat[:3] = [np.inf, np.nan, 0.0]
    rows = a.reshape(1, -1) if a.ndim < 2 else a
    want = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
    assert np.array_equal(row_ranks(rows), want.astype(np.float32))
