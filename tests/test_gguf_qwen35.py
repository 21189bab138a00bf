"""What Qwen3.5 adds to the per-family proofs of test_gguf_parity, test_gguf_export and the fused merge: its
hybrid layers merged tensor by tensor and their pattern in the GGUF, the check comparing that pattern, the
instruct model's chat template and end-of-turn tokens through the fused merge into the GGUF and the Modelfile,
what the export leaves out, and the released checkpoints' form (`Qwen3_5ForConditionalGeneration` with a
vision tower, an instruct model that keeps its multi-token-prediction block) merged with a language model."""

from __future__ import annotations

import json
import shutil

import pytest

from edgemerge.check import check_compat
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import arch_for, left_out_of_gguf
from edgemerge.gguf.inspect import kv, tensors
from edgemerge.package import chat_info, modelfile, parse_modelfile_stops
from edgemerge.pipeline import check_inputs, export_hf, gguf_metadata, merge_to_gguf, merge_to_hf
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe

from .arch_fixtures import ARCH_SPECS
from .models import chat_copy, compat_error, write_recipe

FULL_ATTENTION_LAYER = "layers.1."  # the released MTP block is one such layer

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
    message = compat_error(
        hybrid_family, tmp_path, lambda cfg: cfg.update(layer_types=["full_attention", "full_attention"])
    )
    assert "config layer_types[0] (the layer pattern: which layers use which attention)" in message
    assert "linear_attention in instruct" in message and "but full_attention in eu" in message


def test_the_mtp_block_and_the_vision_tower_are_left_out_and_a_bad_pattern_refused():
    qwen = arch_for({"architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 2})
    assert (
        qwen.gguf_name("mtp.fc.weight") is None and qwen.gguf_name("mtp.layers.0.mlp.up_proj.weight") is None
    )
    assert qwen.gguf_name("model.layers.0.linear_attn.dt_bias") == "blk.0.ssm_dt.bias"
    released = arch_for({"architectures": ["Qwen3_5ForConditionalGeneration"], "num_hidden_layers": 2})
    assert (
        released.gguf_name("model.language_model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    )
    vision = ("model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.linear_fc1.weight")
    assert not any(released.keep(n) for n in (*vision, "mtp.fc.weight", "model.mtp.fc.weight"))
    with pytest.raises(EdgemergeError, match="layer_types must name linear_attention or full_attention"):
        arch_for(
            {"architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 2, "layer_types": ["sliding"] * 2}
        )


def with_mtp(model, tmp_path=None):
    """The model as Qwen3.5 is released: a multi-token-prediction block beside the language model (`mtp.fc`,
    its norms and one full-attention layer, here copies of the model's own tensors) and mtp_num_hidden_layers
    in config.json. In place, or on a copy under `tmp_path`."""
    import torch
    from safetensors.torch import load_file, save_file

    if tmp_path is not None:
        model = shutil.copytree(model, tmp_path / model.name)
    state = load_file(model / "model.safetensors")
    model_prefix = next(n for n in state if n.endswith("embed_tokens.weight")).removesuffix(
        "embed_tokens.weight"
    )
    layer = model_prefix + FULL_ATTENTION_LAYER
    hidden = state[model_prefix + "norm.weight"]
    mtp = {
        f"mtp.layers.0.{n.removeprefix(layer)}": t.clone() for n, t in state.items() if n.startswith(layer)
    }
    mtp |= {
        f"mtp.{n}.weight": hidden.clone() for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
    }
    mtp["mtp.fc.weight"] = torch.randn(
        hidden.shape[0], 2 * hidden.shape[0], generator=torch.Generator().manual_seed(0)
    ).to(hidden.dtype)
    save_file({**state, **mtp}, model / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    cfg.get("text_config", cfg)["mtp_num_hidden_layers"] = 1
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def released_family(tmp_path_factory, families):
    """base, instruct and eu in the released class (the qwen35_vlm fixture's shapes, with its vision tower); the
    instruct model keeps its MTP block, as the released instruct checkpoints do, the language model does not
    (transformers drops it when saving a fine-tune)."""
    root = tmp_path_factory.mktemp("qwen35-vlm")
    family = chat_copy(families(ARCH_SPECS["qwen35_vlm"]), root, "Qwen3.5-4B.jinja", QWEN35_EOS)
    with_mtp(family["instruct"])
    return family


@pytest.fixture(scope="module")
def released_merge(released_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35-vlm-merge")
    # ties walks each tensor twice (read from disk, not all read ahead): the other read path than the fused
    # merge test's task arithmetic in test_merge_engine
    recipe = write_recipe(
        root / "r.yaml", released_family, {"eu": 0.8}, method="ties", options={"density": 0.5}
    )
    recipe = load_recipe(recipe)
    return recipe, merge_to_hf(recipe, root / "hf")


def _tensors(model):
    from safetensors.torch import load_file

    return {n: t for f in sorted(model.glob("*.safetensors")) for n, t in load_file(f).items()}


def test_the_released_class_merges_its_language_model_and_keeps_the_instructs_vision_tower_and_mtp(
    released_family, released_merge
):
    """The Hugging Face output of a merge is the instruct model with its language model merged: the vision
    tower and the MTP block are the instruct model's, bit for bit, and the folder loads as
    Qwen3_5ForConditionalGeneration with no weight missing."""
    import torch
    import transformers

    _, hf = released_merge
    out, instruct = _tensors(hf), _tensors(released_family["instruct"])
    assert set(out) == set(instruct)
    kept = [n for n in out if n.startswith(("model.visual.", "mtp."))]
    assert len([n for n in kept if n.startswith("mtp.")]) == 15 and len(kept) > 30
    assert all(torch.equal(out[n], instruct[n]) for n in kept)
    text = [n for n in out if n.startswith("model.language_model.")]
    assert len(text) == 27 and all(not torch.equal(out[n], instruct[n]) for n in text)
    model, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(model.model.visual.pos_embed.weight, instruct["model.visual.pos_embed.weight"])


def test_the_released_class_fused_merge_is_merge_then_export_without_vision_or_mtp(
    released_family, released_merge, tmp_path
):
    """The GGUF of the merge holds the language model only (the converter's text GGUF): the fused file has the
    bytes of exporting the merged folder, which holds the vision tower and the MTP block."""
    recipe, hf = released_merge
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf", outtype="f16")
    two_step = export_hf(hf, tmp_path / "two.gguf", outtype="f16", metadata=gguf_metadata(recipe))
    assert fused.read_bytes() == two_step.read_bytes()
    names = {t.name for t in tensors(fused)}
    assert len(names) == len([n for n in _tensors(hf) if not n.startswith(("model.visual.", "mtp."))])
    assert {"blk.0.ssm_a", "blk.1.attn_q.weight", "output.weight"} <= names
    assert kv(fused)["qwen35.block_count"] == 2  # no nextn layer


def test_an_instruct_with_mtp_and_a_language_model_without_pass_the_check_saying_so(
    released_family, cli, tmp_path
):
    """The instruct model has mtp.* (base and eu do not): the plain check names the first such tensor; the
    merge's check (here through `edgemerge check`) leaves them out of the comparison, keeps them in the plan
    as the instruct model's and says in one line what it left out."""
    recipe = write_recipe(tmp_path / "r.yaml", released_family, {"eu": 1.0})
    with pytest.raises(EdgemergeError, match=r"tensor mtp\..* is in instruct .* but not in base"):
        check_compat(resolve_recipe(load_recipe(recipe)))
    code, out, err = cli("check", recipe)
    assert code == 0, err
    note = next(line for line in out.splitlines() if line.startswith("not merged"))
    assert note.startswith("not merged, left out of a GGUF: ")
    assert "tensors (model.visual.*, mtp.*) are instruct (" in note
    assert note.count("lacks 15 (mtp.*)") == 2  # base and eu
    assert "only other inputs have" not in note


def test_a_language_model_with_mtp_and_an_instruct_without_pass_the_check_and_drop_it(
    hybrid_family, tmp_path
):
    """The other direction, in the causal-LM class: eu keeps an MTP block the instruct model lacks. The check
    passes and says the block is dropped: the merge writes the instruct model's tensors only."""
    eu = with_mtp(hybrid_family["eu"], tmp_path)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {**hybrid_family, "eu": eu}, {"eu": 1.0}))
    sources = resolve_recipe(recipe)
    with pytest.raises(EdgemergeError, match=r"tensor mtp\..* is in eu .* but not in instruct"):
        check_compat(sources)
    report = check_inputs(sources)
    assert report.note == "not merged, left out of a GGUF: 15 (mtp.*) only other inputs have are dropped"
    assert report.from_instruct == frozenset()
    assert {s.name for s in report.specs} == set(_tensors(hybrid_family["instruct"]))


@pytest.mark.parametrize(
    "config",
    [
        {"text_config": None, "num_hidden_layers": None},
        {"text_config": {"num_hidden_layers": None}},
        {"text_config": {"num_hidden_layers": 2, "layer_types": "linear_attention"}},
        {"architectures": ["NotAModel"], "num_hidden_layers": 2},
        {"architectures": None, "num_hidden_layers": 2},
    ],
)
def test_what_a_family_leaves_out_is_read_from_config_json_and_an_odd_one_gives_none(config, tmp_path):
    """The merge's check asks the instruct model's family what it leaves out of the GGUF; a config.json it
    cannot make a family of gives no answer (the check then compares every tensor), never a traceback."""
    good = {"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {"num_hidden_layers": 2}}
    (tmp_path / "config.json").write_text(json.dumps(good))
    left_out = left_out_of_gguf(tmp_path)
    assert left_out("mtp.fc.weight") and left_out("model.visual.blocks.0.attn.qkv.weight")
    assert not left_out("model.language_model.layers.0.linear_attn.A_log") and not left_out("lm_head.weight")
    (tmp_path / "config.json").write_text(json.dumps({**good, **config}))
    assert left_out_of_gguf(tmp_path) is None
