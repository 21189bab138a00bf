"""The build's memory plan: which file answers the prompts, in batches of how many, and which stands for which;
and in a real build of the tiny family under a smaller memory than its F16 needs."""

from __future__ import annotations

import json

import pytest

from edgemerge.build import BuildOptions, build
from edgemerge.errors import EdgemergeError
from edgemerge.memory_plan import (
    CHAT_SEQ_CTX,
    chat_need,
    check_chat_possible,
    plan_evals,
    plan_memory,
    shape_from_config,
)
from edgemerge.recipe import load_recipe
from edgemerge.resources import MemoryLimit, Threads

GB = 1 << 30
# Llama-3.1-8B's config.json (the numbers that size its KV cache and buffers)
LLAMA_8B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
SIZES_8B = {"m-F16.gguf": 16_060_000_000, "m-Q8_0.gguf": 8_540_000_000, "m-Q4_K_M.gguf": 4_920_000_000}


def limit(n: int) -> MemoryLimit:
    return MemoryLimit(bytes=n, ram=64 * GB, cgroup=n, source="cgroup limit (test)")


def test_shape_from_config_sizes_the_kv_cache():
    s = shape_from_config(LLAMA_8B, 1)
    assert s.kv_bytes_per_token == 32 * 8 * (128 + 128) * 2 == 131072  # llama.cpp's f16 K and V
    assert s.largest_tensor_elements == 128256 * 4096
    with pytest.raises(EdgemergeError, match="vocab_size must be a positive integer"):
        shape_from_config({**LLAMA_8B, "vocab_size": "many"}, 1)


def test_an_8b_build_on_a_16_gb_laptop():
    shape = shape_from_config(LLAMA_8B, 0)
    planned = plan_evals(shape, SIZES_8B, limit(16 * GB))
    f16, q8, q4 = (planned[n] for n in SIZES_8B)
    assert not f16.chat and f16.stand_in == "m-Q8_0.gguf" and "m-Q8_0.gguf stand for it" in f16.skip_reason
    assert f16.need < 2 * GB  # scored from disk: no weights counted
    assert q8.chat and q4.chat and q8.batch == q4.batch == 16 and q8.skip_reason is None
    assert q8.need == chat_need(
        shape.__class__(**{**shape.__dict__, "file_bytes": SIZES_8B["m-Q8_0.gguf"]}), 16
    )
    kv16 = 16 * CHAT_SEQ_CTX * 131072
    assert q8.need > SIZES_8B["m-Q8_0.gguf"] + kv16  # weights, KV cache and more


def test_the_batch_shrinks_before_a_file_is_given_up():
    shape = shape_from_config(LLAMA_8B, 0)
    q8 = SIZES_8B["m-Q8_0.gguf"]
    s = shape.__class__(**{**shape.__dict__, "file_bytes": q8})
    between = (chat_need(s, 4) + chat_need(s, 8)) / 2 / 0.9  # room for a batch of 4, not 8
    planned = plan_evals(shape, {"m-Q8_0.gguf": q8}, limit(int(between)))
    assert planned["m-Q8_0.gguf"].chat and planned["m-Q8_0.gguf"].batch == 4


def test_nothing_fits_stops_unless_asked():
    shape = shape_from_config(LLAMA_8B, 0)
    small = limit(4 * GB)
    planned = plan_evals(shape, SIZES_8B, small)
    assert not any(f.chat for f in planned.values()) and planned["m-F16.gguf"].stand_in is None
    with pytest.raises(EdgemergeError, match="--skip-chat-eval .* --eval-all .* --skip-eval") as e:
        check_chat_possible(planned, small)
    assert "\n" not in str(e.value) and "m-Q4_K_M.gguf" in str(e.value)
    check_chat_possible(plan_evals(shape, SIZES_8B, small, skip_chat=True), small)  # no error
    forced = plan_evals(shape, SIZES_8B, small, eval_all=True)
    assert all(f.chat for f in forced.values())


def test_plan_lines_name_every_stage():
    shape = shape_from_config(LLAMA_8B, 0)
    plan = plan_memory(
        shape, SIZES_8B, ["Q8_0", "Q4_K_M"], limit(16 * GB), Threads(2, 2, 0.0, "2 physical cores, idle"),
        n_inputs=3,
    )  # fmt: skip
    text = "\n".join(plan.lines())
    assert "16.0 GB usable (cgroup limit (test); RAM 64.0 GB), llama.cpp threads 2" in text
    for stage in ("merge", "quantize Q8_0", "quantize Q4_K_M", "eval m-F16.gguf", "eval m-Q4_K_M.gguf"):
        assert stage in text
    assert json.loads(json.dumps(plan.to_dict()))["evals"]["m-F16.gguf"]["stand_in"] == "m-Q8_0.gguf"


def test_a_build_whose_f16_does_not_fit(build_family, tmp_path, monkeypatch):
    """The tiny family under a memory that holds its quants for answering but not its F16: the F16 is scored
    (perplexity, and its log-probabilities stored for the quants' drift) without answers; Q8_0 stands for it."""
    import edgemerge.build.run as b

    recipe = load_recipe(build_family["recipe"])
    seen = {}

    def plan_then_limit(shape, sizes, *a, **k):
        # a limit between what the F16 and the Q8_0 need to answer, from the build's own estimates
        f16, q8 = (next(v for n, v in sizes.items() if n.endswith(t)) for t in ("-F16.gguf", "-Q8_0.gguf"))
        s = lambda n: shape.__class__(**{**shape.__dict__, "file_bytes": n})
        lim = limit(int((chat_need(s(f16), 1) + chat_need(s(q8), 1)) / 2 / 0.9))
        seen["limit"] = lim
        return plan_memory(shape, sizes, *a[:1], lim, *a[2:], **k)

    monkeypatch.setattr(b, "plan_memory", plan_then_limit)
    result = build(recipe, BuildOptions(out=tmp_path / "out", quick_eval=True, quants=["Q8_0", "Q4_K_M"]))
    f16, q8, q4 = (result.evals[f"tiny-eu-{t}.gguf"] for t in ("F16", "Q8_0", "Q4_K_M"))
    assert f16.responses == [] and "tiny-eu-Q8_0.gguf stand for it" in f16.chat_skipped
    assert f16.perplexity > 1 and f16.language_fidelity is None
    planned = result.plan.memory.evals
    assert q8.responses and q4.responses and q8.answer_batch == planned["tiny-eu-Q8_0.gguf"].batch >= 1
    assert q4.kld_mean > q8.kld_mean >= -1e-4 and q8.ref == "tiny-eu-F16.gguf.logits"
    memory = result.to_dict()["memory_plan"]
    assert memory["usable"] == seen["limit"].bytes and not memory["evals"]["tiny-eu-F16.gguf"]["chat"]
    card = (result.out / "README.md").read_text(encoding="utf-8")
    assert "skipped: too large to answer from memory" in card


def test_no_file_can_answer_stops_the_build_before_any_work(build_family, tmp_path, monkeypatch, cli):
    import edgemerge.build.run as b

    monkeypatch.setattr(b, "memory_limit", lambda: limit(100 << 20))  # less than any eval needs
    out = tmp_path / "out"
    code, _, err = cli("build", "--recipe", build_family["recipe"], "--out", out, "--quick-eval")
    assert code == 2 and "no file of this build fits the memory" in err and "--skip-chat-eval" in err, err
    assert err.count("\n") <= 2 and not out.exists()
