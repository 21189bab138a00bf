"""What Qwen3.5 adds to the per-family proofs of test_gguf_parity, test_gguf_export and the fused merge: its
hybrid layers merged tensor by tensor and their pattern in the GGUF, the check comparing that pattern, the
instruct model's chat template and end-of-turn tokens through the fused merge into the GGUF and the Modelfile,
and what the export leaves out."""

from __future__ import annotations

import json
import shutil

import pytest

from edgemerge.check import check_compat
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import arch_for
from edgemerge.gguf.inspect import kv, tensors
from edgemerge.package import chat_info, modelfile, parse_modelfile_stops
from edgemerge.pipeline import merge_to_gguf
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe

from .arch_fixtures import ARCH_SPECS
from .models import chat_copy, write_recipe

QWEN35_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def hybrid_family(tmp_path_factory, families):
    """base, instruct (with Qwen3.5's chat template and end-of-turn ids) and eu, in the qwen35 fixture's shapes."""
    return chat_copy(
        families(ARCH_SPECS["qwen35"]), tmp_path_factory.mktemp("qwen35"), "Qwen3.5-4B.jinja", QWEN35_EOS
    )


@pytest.fixture(scope="module")
def fused(hybrid_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35-fused")
    recipe = load_recipe(write_recipe(root / "r.yaml", hybrid_family, {"eu": 0.8}))
    return merge_to_gguf(recipe, root / "fused.gguf", outtype="f16")


def test_the_layer_pattern_reaches_the_gguf(fused):
    """Layer 0 is a linear-attention block (ssm_* tensors, F32 conv kernel), layer 1 a full-attention one, and
    the GGUF says which is which."""
    keys = kv(fused)
    assert list(keys["qwen35.attention.recurrent_layers"]) == [True, False]
    names = {t.name: t for t in tensors(fused)}
    assert {
        "blk.0.ssm_a",
        "blk.0.ssm_conv1d.weight",
        "blk.0.attn_qkv.weight",
        "blk.0.attn_gate.weight",
    } <= set(names)
    assert {"blk.1.attn_q.weight", "blk.1.attn_k_norm.weight"} <= set(names)
    assert not any(n.startswith("blk.1.ssm") for n in names) and "blk.0.attn_q.weight" not in names
    assert names["blk.0.ssm_conv1d.weight"].type == "F32" and names["blk.0.ssm_out.weight"].type == "F16"


def test_chat_template_and_every_end_of_turn_token_reach_the_gguf_and_the_modelfile(fused, hybrid_family):
    from edgemerge.runtime import Model

    template = (hybrid_family["instruct"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert "<|im_start|>" in template and kv(fused)["tokenizer.chat_template"] == template
    text, _ = modelfile("m.gguf", chat_info(fused, hybrid_family["instruct"]), "Euskaraz erantzun.")
    assert {"<|im_end|>", "<|endoftext|>"} <= set(parse_modelfile_stops(text))
    with Model(fused, n_ctx=64, n_threads=1) as model:
        assert all(model.is_eog(i) for i in QWEN35_EOS)


def test_a_different_layer_pattern_is_named(hybrid_family, tmp_path):
    eu = shutil.copytree(hybrid_family["eu"], tmp_path / "eu")
    cfg = json.loads((eu / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "full_attention"]
    (eu / "config.json").write_text(json.dumps(cfg))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {**hybrid_family, "eu": eu}, {"eu": 1.0}))
    with pytest.raises(EdgemergeError) as e:
        check_compat(resolve_recipe(recipe))
    message = e.value.message
    assert "config layer_types[0] (the layer pattern: which layers use which attention)" in message
    assert "linear_attention in instruct" in message and "but full_attention in eu" in message


def test_the_mtp_block_is_left_out_and_a_bad_pattern_refused():
    qwen = arch_for({"architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 2})
    assert (
        qwen.gguf_name("mtp.fc.weight") is None and qwen.gguf_name("mtp.layers.0.mlp.up_proj.weight") is None
    )
    assert qwen.gguf_name("model.layers.0.linear_attn.dt_bias") == "blk.0.ssm_dt.bias"
    with pytest.raises(EdgemergeError, match="layer_types must name linear_attention or full_attention"):
        arch_for(
            {"architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 2, "layer_types": ["sliding"] * 2}
        )
