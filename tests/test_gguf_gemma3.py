"""What Gemma 3 adds to the per-family proofs of test_gguf_parity / test_gguf_export and the fused merge: its chat
template (no system role) through the GGUF into the Modelfile, the tensors it leaves out and the config it
refuses."""

from __future__ import annotations

import shutil

import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import arch_for
from edgemerge.gguf.inspect import tensors
from edgemerge.package import chat_info, modelfile, parse_modelfile_stops
from edgemerge.pipeline import export_hf

from .models import state_of
from .shared import need_shared


def test_modelfile_of_a_gemma3_gguf_has_no_system_line(arch_models, tmp_path):
    """Gemma's template (Gemma 2 and 3 share the turn format) raises on a system message: the GGUF carries it
    verbatim, and the Modelfile made from that GGUF renders it, drops the SYSTEM line and says why."""
    template = need_shared("tokenizers", "llama.cpp-vocab", "templates", "google-gemma-2-2b-it.jinja")
    model = shutil.copytree(arch_models["gemma3"], tmp_path / "gemma3")
    shutil.copy(template, model / "chat_template.jinja")
    gguf_file = export_hf(model, tmp_path / "g.gguf", outtype="f16")
    info = chat_info(gguf_file, model)
    assert info.template == template.read_text(encoding="utf-8")
    text, warning = modelfile("g.gguf", info, "Euskaraz erantzun.")
    assert 'TEMPLATE """' in text and "<start_of_turn>" in text
    assert "SYSTEM" not in text and "no system role" in warning
    assert parse_modelfile_stops(text) == ["</s>"]  # the stand-in vocabulary's EOS


def test_attn_logit_softcapping_is_refused():
    """Gemma 2's attention softcap in a Gemma 3 config: llama.cpp's gemma3 would silently ignore it (the
    converter stops on an assert)."""
    hparams = {"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2, "attn_logit_softcapping": 50.0}
    with pytest.raises(EdgemergeError, match="attn_logit_softcapping"):
        arch_for(hparams)


def test_a_vision_tower_is_not_a_tensor_of_the_family():
    gemma = arch_for({"architectures": ["Gemma3ForConditionalGeneration"], "num_hidden_layers": 2})
    assert gemma.gguf_name("language_model.model.layers.0.self_attn.q_proj.weight") == "blk.0.attn_q.weight"
    assert gemma.gguf_name("model.language_model.norm.weight") == "output_norm.weight"
    for name in (
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.mm_input_projection_weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ):
        assert gemma.gguf_name(name) is None, name


def test_the_vlm_fixture_has_a_vision_tower_its_gguf_lacks(arch_models, f32_ggufs):
    """The gemma3_vlm entry really has tensors to leave out (so the fused-merge test's "reads only what the
    family writes" is not vacuous for it): the GGUF holds exactly the language model's tensors."""
    names = set(state_of(arch_models["gemma3_vlm"]))
    vision = {n for n in names if n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert vision and len(tensors(f32_ggufs["gemma3_vlm"])) == len(names - vision)
