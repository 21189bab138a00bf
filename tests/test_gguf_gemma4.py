"""What Gemma 4 adds to the per-family proofs of test_gguf_parity, test_gguf_export and the fused merge: its layer
pattern and per-layer sizes in the GGUF, the instruct model's chat template and end-of-turn tokens through the fused
merge into the GGUF and the Modelfile, the towers it leaves out, the check naming a Gemma 3 language model beside
a Gemma 4 instruct, and the checkpoints it refuses."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import arch_for
from edgemerge.gguf.inspect import kv, read_gguf, tensors
from edgemerge.package import chat_info, modelfile, parse_modelfile_stops
from edgemerge.pipeline import merge_to_gguf
from edgemerge.recipe import load_recipe

from .models import chat_instruct, compat_error, state_of, write_recipe

GEMMA4_EOS = [1, 106, 50]  # Gemma 4 -it's generation_config: <eos>, <turn|>, <|tool_response>
TEMPLATE = "google-gemma-4-31B-it.jinja"


@pytest.fixture(scope="module")
def gemma4_family(arch_models, tmp_path_factory):
    """base and eu: the session's gemma4 fixture; instruct: a copy of it with 31B-it's chat template and end-of-turn
    ids. One model, not three, with the real 262k vocabulary: the merge's arithmetic is proven for each family by
    test_merge_engine; here what counts is what flows from the instruct model into the fused GGUF (eu = base, so
    the merged weights are the instruct model's)."""
    model = arch_models["gemma4"]
    instruct = shutil.copytree(model, tmp_path_factory.mktemp("gemma4") / "instruct")
    return chat_instruct(
        {"base": model, "instruct": instruct, "eu": model}, template=TEMPLATE, eos=GEMMA4_EOS
    )


@pytest.fixture(scope="module")
def fused(gemma4_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4-fused")
    recipe = load_recipe(write_recipe(root / "r.yaml", gemma4_family, {"eu": 0.8}))
    return merge_to_gguf(recipe, root / "fused.gguf", outtype="f16")


def test_the_layer_pattern_and_per_layer_sizes_reach_the_gguf(fused):
    """Layer 0 slides (head 32, two KV heads), layer 1 attends to everything (head 64, one KV head whose K is
    also V: no attn_v); the full layer's RoPE turns 64 x 0.25 dims, the rest held still by rope_freqs."""
    info = read_gguf(fused)
    keys = info.kv
    assert list(keys["gemma4.attention.sliding_window_pattern"]) == [True, False]
    assert list(keys["gemma4.attention.head_count_kv"]) == [2, 1]
    assert keys["gemma4.attention.key_length"] == 64 and keys["gemma4.attention.key_length_swa"] == 32
    assert keys["gemma4.rope.dimension_count"] == 64 and keys["gemma4.rope.dimension_count_swa"] == 32
    assert keys["gemma4.rope.freq_base"] == 1e6 and keys["gemma4.rope.freq_base_swa"] == 1e4
    assert keys["tokenizer.ggml.model"] == "gemma4" and keys["tokenizer.ggml.add_bos_token"] is True
    names = {t.name: t for t in info.tensors}
    assert "blk.0.attn_v.weight" in names and "blk.1.attn_v.weight" not in names
    assert names["blk.0.attn_q.weight"].shape == (64, 2 * 32)  # GGUF order: (hidden, heads x head size)
    assert names["blk.1.attn_q.weight"].shape == (64, 2 * 64)
    assert names["blk.1.layer_output_scale.weight"].type == "F32"
    freqs = info.tensor_bytes()["rope_freqs.weight"].view(np.float32)
    assert list(freqs) == [1.0] * 8 + [np.float32(1e30)] * 24


def test_chat_template_and_every_end_of_turn_token_reach_the_gguf_and_the_modelfile(fused, gemma4_family):
    from edgemerge.runtime import Model

    template = (gemma4_family["instruct"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert "<|turn>" in template and kv(fused)["tokenizer.chat_template"] == template
    text, warning = modelfile("m.gguf", chat_info(fused, gemma4_family["instruct"]), "Euskaraz erantzun.")
    assert warning is None and 'TEMPLATE """' in text and "<|turn>user" in text and "SYSTEM" in text
    assert {"<eos>", "<turn|>", "<|tool_response>"} <= set(parse_modelfile_stops(text))
    with Model(fused, n_ctx=64, n_threads=1) as model:
        assert all(model.is_eog(i) for i in GEMMA4_EOS)


def test_a_gemma3_language_model_beside_a_gemma4_instruct_names_both_architectures(gemma4_family, tmp_path):
    message = compat_error(
        gemma4_family,
        tmp_path,
        lambda cfg: cfg.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text"),
    )
    assert "Gemma4ForCausalLM in instruct" in message and "Gemma3ForCausalLM in eu" in message
    assert message.count("\n") == 0


def test_a_layer_whose_tensors_do_not_fit_its_own_sizes_is_named(gemma4_family, tmp_path):
    """The check reads each layer's own sizes (the full layer's head of 64): a config that gives the full layers
    the sliding layers' head size no longer describes layer 1's query projection."""
    message = compat_error(
        gemma4_family, tmp_path, lambda cfg: cfg["per_layer_config"]["1"].update(head_dim=32)
    )
    assert "layers.1.self_attn.q_proj.weight has shape [128, 64]" in message and "of layer 1" in message


def test_the_towers_are_not_tensors_of_the_family():
    gemma = arch_for(
        {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "global_head_dim": 64,
            "rope_parameters": {
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25}
            },
        }
    )
    assert gemma.gguf_name("model.language_model.layers.1.layer_scalar") == "blk.1.layer_output_scale.weight"
    assert (
        gemma.gguf_name("model.language_model.embed_tokens_per_layer.weight") == "per_layer_token_embd.weight"
    )
    for name in (
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
        "model.audio_tower.layers.0.self_attn.per_dim_scale",
        "model.embed_vision.embedding_projection.weight",
        "model.embed_audio.embedding_projection.weight",
    ):
        assert gemma.gguf_name(name) is None, name


def test_the_vlm_fixture_has_towers_its_gguf_lacks(arch_models, f32_ggufs):
    """The gemma4_vlm entry really has vision and audio tensors to leave out (so the fused-merge test's "reads
    only what the family writes" is not vacuous for it): the GGUF holds the language model's tensors and
    rope_freqs, with E2B's per-layer embeddings and no k/v projections in the KV-sharing last layer."""
    names = set(state_of(arch_models["gemma4_vlm"]))
    towers = {n for n in names if n.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_"))}
    assert any("vision" in n for n in towers) and any("audio" in n for n in towers)
    written = {t.name: t for t in tensors(f32_ggufs["gemma4_vlm"])}
    assert len(written) == len(names - towers) + 1  # + rope_freqs
    per_layer = {"per_layer_token_embd.weight", "per_layer_model_proj.weight", "blk.2.inp_gate.weight"}
    assert per_layer <= set(written)
    assert "blk.2.attn_k.weight" not in written and written["blk.2.ffn_up.weight"].shape == (64, 256)
    keys = kv(f32_ggufs["gemma4_vlm"])
    assert (
        keys["gemma4.attention.shared_kv_layers"] == 1
        and keys["gemma4.embedding_length_per_layer_input"] == 8
    )
    assert list(keys["gemma4.feed_forward_length"]) == [128, 128, 256]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"enable_moe_block": True, "num_experts": 4}, "mixture of experts"),
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types must name"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "'proportional'"),
    ],
)
def test_checkpoints_llama_cpp_would_run_differently_are_refused(fields, needle):
    hparams = {
        "architectures": ["Gemma4ForCausalLM"],
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "global_head_dim": 64,
        **fields,
    }
    with pytest.raises(EdgemergeError, match=needle):
        arch_for(hparams)
