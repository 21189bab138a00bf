"""The miniature reproduction (tools/miniature.py): a real trained family grown from stories260K, merged and
evaluated by edgemerge through llama.cpp. The test runs a reduced configuration (REDUCED below: fewer, smaller
training batches at a higher learning rate, and fewer evaluation lines) so that it fits the suite's budget;
the README's table comes from the tool's full defaults."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .shared import need_shared

ROOT = Path(__file__).resolve().parents[1]
# 150 AdamW steps of 8 x 128 tokens at lr 1e-3 (full: 300 steps of 16 x 256 at 3e-4); first 200 lines/questions
REDUCED = {
    "steps": 150,
    "batch": 8,
    "seq": 128,
    "lr": 1e-3,
    "eval_lines": 60,
    "gen_prompts": 12,
    "q8_lines": 30,
    "max_new_tokens": 64,
}


def _tool():
    """tools/miniature.py as a module (tools/ is not a package; dataclasses need it in sys.modules)."""
    name = "edgemerge_tools_miniature"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "miniature.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    need_shared("models", "stories260K", "stories260K.gguf")
    need_shared("bench", "truthfulqa_multi", "eu", "validation.json")
    need_shared("instruct", "rasbt_llms_from_scratch", "instruction-data.json")
    for name in ("eus_Latn.dev", "eus_Latn.devtest", "eng_Latn.devtest"):
        need_shared("text", "flores200", name)
    need_shared("text", "ud", "eu_bdt-dev.txt")
    pytest.importorskip("llama_cpp")
    tool = _tool()
    out = tmp_path_factory.mktemp("miniature")
    cfg = tool.Config(out=out, **REDUCED)
    results = tool.run(cfg)
    print("\n" + tool.table(results))
    return tool, out, results


def test_results_file_lists_every_model(miniature):
    tool, out, _results = miniature
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in on_disk] == tool.MODELS
    for r in on_disk:
        for key in (
            "ppl_eu",
            "ppl_en",
            "ans_ppl_en",
            "ans_ppl_qa_eu",
            "stop_rate",
            "q8_top1_agreement",
            "eot_prob_en",
        ):
            assert isinstance(r[key], float), (r["model"], key)


def test_a_merge_transfers_basque_and_keeps_instructions(miniature):
    """At least one merge with w <= 1 has ppl_eu <= 0.2x instruct's, ans_ppl_en <= 0.3x lang-eu's and
    ans_ppl_qa_eu <= 0.2x instruct's, all at once (issue 7)."""
    tool, _, results = miniature
    checks = tool.claims(results)
    for c in checks:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()})
    assert any(c["holds"] for c in checks)


def test_a_merge_meeting_the_claim_knows_when_a_turn_ends(miniature):
    """Instruction behaviour beyond perplexity: after a reference English answer, a merge that meets the claim
    still gives the end-of-turn token at least half the instruct model's probability (measured teacher-forced:
    at 260K parameters greedy answers fall into loops, so stop rates mostly measure the loops)."""
    tool, _, results = miniature
    by = {r["model"]: r for r in results}
    holding = [c["model"] for c in tool.claims(results) if c["holds"]]
    print({m: round(by[m]["eot_prob_en"], 3) for m in ["instruct", "lang-eu", *holding]})
    assert any(by[m]["eot_prob_en"] >= 0.5 * by["instruct"]["eot_prob_en"] for m in holding)


def test_training_did_what_it_says(miniature):
    """Sanity of the family the claim rests on: each fine-tune moved its own metric, the instruct model
    learned to stop."""
    _, _, results = miniature
    by = {r["model"]: r for r in results}
    assert by["lang-eu"]["ppl_eu"] < 0.1 * by["base"]["ppl_eu"]
    assert by["instruct"]["ans_ppl_en"] < 0.5 * by["base"]["ans_ppl_en"]
    assert by["instruct"]["stop_rate_en"] >= 0.5 > by["base"]["stop_rate_en"]


def test_base_round_trip_is_lossless(miniature):
    """GGUF -> Hugging Face -> GGUF: llama.cpp's greedy 40 tokens from "Once upon a time" are identical."""
    _, out, _ = miniature
    trip = json.loads((out / "summary.json").read_text())["round_trip"]
    print(f"\nseed: Once upon a time{trip['seed']}\nbase: Once upon a time{trip['base']}")
    assert trip["seed"].startswith(", there was a little girl named Lily")
    assert trip["base"] == trip["seed"]


def test_chat_template_renders_the_training_format(miniature):
    """llama.cpp's chat path (the GGUF's template) gives exactly the prompt tokens the instruct model was
    trained on."""
    from contextlib import closing

    from edgemerge.runtime import Model

    tool, out, _ = miniature
    cfg = tool.Config(out=out)
    sp = tool._sp(cfg)
    question = "Name a color of the sky.\nAnswer briefly."
    ids, start = tool.chat_example(sp, question, "Blue.")
    with closing(Model(out / "gguf" / "instruct.f16.gguf", n_ctx=128)) as m:
        assert m.chat_tokens([{"role": "user", "content": question}]) == ids[:start]
        assert m.tokenize("Blue.", add_special=False) + [m.llm.token_eos()] == ids[start:]


def test_the_sweep_chooses_a_merge_that_transfers_basque_and_keeps_english(miniature):
    """The sweep over task_arithmetic and linear at 0.5, 1.0, 1.5 (fast: no greedy answers, which loop at this
    scale) on the trained family: the candidate it chooses predicts Basque text at under 0.2x the instruct
    model's perplexity and keeps English answers (retention >= 0.5); ta-1 and ta-1.5, whose English collapses,
    are rejected."""
    from edgemerge.recipe import parse_recipe
    from edgemerge.sweep import SweepOptions, sweep

    tool, out, _ = miniature
    data = tool.recipe_dict("sweep", "task_arithmetic", 1.0, (out / "models").resolve())
    data["sweep"] = {"weights": [0.5, 1.0, 1.5], "methods": ["task_arithmetic", "linear"]}
    res = sweep(parse_recipe(data), SweepOptions(out=out / "sweep", threads=1, backend="torch", fast=True))
    print("\n" + res.table() + "\n" + res.choice.reason)
    chosen = res.choice.chosen
    by = {r.name: r.signals for r in res.rows}
    assert chosen is not None
    assert by[chosen.name].ppl < 0.2 * by["instruct"].ppl
    assert res.choice.derived[chosen.name]["english_retention"] >= 0.5
    for name in ("task_arithmetic-1", "task_arithmetic-1.5"):
        assert res.choice.rejected[name][0].startswith("english retention")
