"""The sweep (edgemerge/sweep): the selection rule against its formulas, and real sweeps of the demo family
through llama.cpp (merge -> GGUF -> Q8_0 -> signals), cached and resumable, and `build --weight auto`."""

from __future__ import annotations

import json
import math

import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.signals import Signals
from edgemerge.recipe import SweepRule
from edgemerge.sweep import Row, SweepOptions, choose, english_retention, sweep

pytest.importorskip("llama_cpp")


def _row(name, role, a_en, eot_en, a, method=None, weight=None, ppl=10.0):
    return Row(name, role, Signals(ppl, 10.0, a, a_en, 0.5, eot_en), method, weight)


def test_english_retention_is_one_at_the_instruct_model_and_zero_at_the_language_model():
    assert english_retention(5.0, 5.0, 40.0) == pytest.approx(1.0)
    assert english_retention(40.0, 5.0, 40.0) == pytest.approx(0.0)
    # halfway in log space: sqrt(5 * 40)
    assert english_retention(math.sqrt(200.0), 5.0, 40.0) == pytest.approx(0.5)
    # a language model as good at English answers: the plain ratio
    assert english_retention(10.0, 5.0, 5.02) == pytest.approx(0.5)


def test_rule_chooses_the_best_target_answers_among_candidates_that_keep_english():
    rows = [
        _row("instruct", "instruct", 5.0, 0.8, 400.0),
        _row("eu", "language", 40.0, 0.01, 12.0),
        _row("ta-0.5", "candidate", 8.0, 0.7, 40.0, "task_arithmetic", 0.5),
        _row("ta-1", "candidate", 30.0, 0.7, 20.0, "task_arithmetic", 1.0),  # English lost
        _row("linear-1", "candidate", 7.0, 0.05, 25.0, "linear", 1.0),  # end of turn lost
        _row("ta-0.75", "candidate", 10.0, 0.6, 30.0, "task_arithmetic", 0.75),
    ]
    c = choose(rows, SweepRule())
    assert c.chosen.name == "ta-0.75"
    assert c.rejected["ta-1"][0].startswith("english retention 0.14 < 0.5")
    assert c.rejected["linear-1"][0].startswith("end-of-turn ratio 0.06 < 0.5")
    assert "ta-0.5" not in c.rejected
    # a threshold off: the best target-language answers win outright
    c = choose(rows, SweepRule(min_english_retention=None, min_eot_ratio=None))
    assert c.chosen.name == "ta-1"


def test_rule_names_the_closest_candidate_when_none_is_eligible():
    rows = [
        _row("instruct", "instruct", 5.0, 0.8, 400.0),
        _row("eu", "language", 40.0, 0.01, 12.0),
        _row("a", "candidate", 30.0, 0.7, 20.0, "task_arithmetic", 1.0),
        _row("b", "candidate", 13.0, 0.7, 25.0, "task_arithmetic", 0.9),
    ]
    c = choose(rows, SweepRule(min_english_retention=0.6))
    assert c.chosen is None and c.closest == "b"
    assert "closest: b (english retention 0.54 < 0.6)" in c.reason


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([], "non-empty list"),
        ([0.5, float("nan")], "finite"),
        ([-0.5], "must not be negative"),
    ],
)
def test_bad_weights_are_refused_before_any_work(tmp_path, weights, message):
    from edgemerge.recipe import parse_recipe

    r = parse_recipe(
        {"name": "x", "instruct": "a/b", "base": "a/c", "languages": [{"code": "eu", "model": "a/d"}]}
    )
    with pytest.raises(EdgemergeError, match=message):
        sweep(r, SweepOptions(out=tmp_path / "s", weights=weights))
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def demo_recipe():
    from edgemerge.demo import demo_family

    return demo_family("eu").recipe


@pytest.fixture(scope="module")
def swept(demo_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "demo-sweep"
    events = []
    res = sweep(
        demo_recipe,
        SweepOptions(out=out, weights=[0.5, 1.0], threads=1),
        on_stage=lambda e: events.append(e),
    )
    return res, events


def test_sweep_scores_every_candidate_and_parent_and_keeps_no_model_file(swept):
    res, _ = swept
    names = [r.name for r in res.rows]
    assert names == ["instruct", "eu", "task_arithmetic-0.5", "task_arithmetic-1", "linear-0.5", "linear-1"]
    for r in res.rows:
        s = r.signals
        for v in (s.ppl, s.ppl_en, s.answer_ppl, s.answer_ppl_en):
            assert math.isfinite(v) and v > 1.0, (r.name, s)
        assert 0.0 <= s.eot_prob_en <= 1.0 and 0.0 <= s.stop_rate <= 1.0
    # the language vector moves the signals: Basque text is better predicted by the merges than by instruct
    by = {r.name: r.signals for r in res.rows}
    assert by["task_arithmetic-1"].ppl < by["instruct"].ppl
    assert not list(res.out.parent.rglob("*.gguf"))  # every candidate's files deleted (no --keep)
    data = json.loads((res.out / "sweep.json").read_text())
    assert data["choice"]["chosen"] == (res.choice.chosen.name if res.choice.chosen else None)
    assert (res.out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| instruct |" in (res.out / "sweep.md").read_text()


def test_a_rerun_reuses_every_score_and_a_new_weight_adds_only_its_candidates(swept, demo_recipe):
    res, _ = swept
    events = []
    again = sweep(
        demo_recipe,
        SweepOptions(out=res.out, weights=[0.5, 1.0, 0.75], threads=1),
        on_stage=lambda e: events.append(e),
    )
    fresh = sorted(e.name for e in events if e.done and not e.record.cached)
    assert fresh == ["candidate linear-0.75", "candidate task_arithmetic-0.75"]
    old = {r.name: r.signals.to_dict() for r in res.rows}
    for r in again.rows:
        if r.name in old:
            assert r.signals.to_dict() == old[r.name]


def test_build_weight_auto_builds_the_chosen_candidate_and_shows_its_sweep(demo_recipe, tmp_path, cli):
    from edgemerge.build import BuildOptions
    from edgemerge.sweep import build_auto

    out = tmp_path / "demo"
    s, b = build_auto(
        demo_recipe,
        BuildOptions(out=out, threads=1, skip_eval=True, quants=["Q8_0"]),
        SweepOptions(
            out=tmp_path / "demo-sweep", weights=[0.5, 1.0], methods=["task_arithmetic"], threads=1, fast=True
        ),
    )
    assert s.choice.chosen is not None
    assert b.recipe.method == s.choice.chosen.method
    assert [lang.weight for lang in b.recipe.languages] == [s.choice.chosen.weight]
    card = (out / "README.md").read_text()
    assert "![signals against the language weight](sweep.png)" in card and s.choice.reason in card
    manifest = json.loads((out / "manifest.json").read_text())
    assert "sweep.png" in [f["name"] for f in manifest["files"]]
    assert manifest["sweep"]["reason"] == s.choice.reason


def test_sweep_cli_bad_input_is_one_line_exit_2(cli, tmp_path):
    code, _, err = cli("sweep", "no-such-recipe", "--weights", "0.5")
    assert code == 2 and "not found" in err
    code, _, err = cli("sweep", "llama3.1-8b-eu", "--weights", "a,b", "--out", tmp_path / "s")
    assert code == 2 and "not a number or a comma-separated list of numbers" in err
    code, _, err = cli("sweep", "llama3.1-8b-eu", "--methods", "nope", "--out", tmp_path / "s")
    assert code == 2 and "sweep methods: unknown merge method 'nope'" in err
    code, _, err = cli("sweep", "llama3.1-8b-eu", "--methods", "linear,slerp", "--out", tmp_path / "s")
    assert code == 2 and "sweep methods: slerp has no language weight to sweep" in err
    assert not (tmp_path / "s").exists()
