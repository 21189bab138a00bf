"""What Qwen3 MoE adds to the per-family proofs of test_gguf_parity, test_gguf_export and the fused merge: each
expert merged as its own tensor and written as one slice of the stacked `ffn_*_exps` (the sink never gets a
stack), the router kept in F32, the instruct model's chat template and end-of-turn tokens through the fused
merge into the GGUF and the Modelfile, and the mismatches the check names."""

from __future__ import annotations

import shutil

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy: safetensors.numpy reads the bf16 fixture
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgemerge.check import check_compat
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import arch_for
from edgemerge.gguf.inspect import kv, read_gguf
from edgemerge.gguf.sink import GGUFSink
from edgemerge.package import chat_info, modelfile, parse_modelfile_stops
from edgemerge.pipeline import export_hf, merge_to_gguf, merge_to_hf
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe
from edgemerge.tensors.spec import TensorSpec

from .arch_fixtures import ARCH_SPECS
from .models import chat_copy, compat_error, write_recipe

QWEN3_EOS = [151645, 151643]  # Qwen3's generation_config: <|im_end|>, <|endoftext|>
EXPERT = "model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory, families):
    """base, instruct (with Qwen3's chat template and end-of-turn ids) and eu, in the qwen3moe fixture's shapes."""
    return chat_copy(
        families(ARCH_SPECS["qwen3moe"]), tmp_path_factory.mktemp("moe"), "Qwen-Qwen3-0.6B.jinja", QWEN3_EOS
    )


@pytest.fixture(scope="module")
def fused(moe_family, tmp_path_factory):
    """The fused F16 merge, the HF merge beside it, and every array the GGUF sink was handed: (name, shape)."""
    root = tmp_path_factory.mktemp("moe-fused")
    recipe = load_recipe(write_recipe(root / "r.yaml", moe_family, {"eu": 0.8}))
    handed = []
    write, write_rows = GGUFSink.write, GGUFSink.write_rows

    def spy_write(sink, name, array):
        handed.append((name, array.shape))
        write(sink, name, array)

    def spy_rows(sink, name, rows, block):
        handed.append((name, block.shape))
        write_rows(sink, name, rows, block)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GGUFSink, "write", spy_write)
        mp.setattr(GGUFSink, "write_rows", spy_rows)
        out = merge_to_gguf(recipe, root / "fused.gguf", outtype="f16")
    return out, merge_to_hf(recipe, root / "hf"), handed


def test_experts_are_stacked_slice_by_slice(fused):
    """blk.N.ffn_{gate,up,down}_exps hold the merged experts in order (slice e = merged expert e, in F16); the
    router is F32; and every array handed to the sink was one expert, never a stack."""
    gguf_file, hf, handed = fused
    info = read_gguf(gguf_file)
    by_name = {t.name: t for t in info.tensors}
    merged = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    spec = ARCH_SPECS["qwen3moe"]
    n_exp, n_ff = spec.extra["num_experts"], spec.extra["moe_intermediate_size"]
    for layer in range(spec.layers):
        router = by_name[f"blk.{layer}.ffn_gate_inp.weight"]
        assert router.type == "F32" and router.shape == (spec.hidden, n_exp)
        for proj, gguf_proj in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            t = by_name[f"blk.{layer}.ffn_{gguf_proj}_exps.weight"]
            one = merged[EXPERT.format(layer=layer, e=0, proj=proj)].shape
            assert t.type == "F16" and t.shape == (*reversed(one), n_exp)
            with open(gguf_file, "rb") as f:
                f.seek(t.offset)
                stack = np.frombuffer(f.read(t.nbytes), dtype=np.float16).reshape(n_exp, *one)
            for e in range(n_exp):
                want = (
                    merged[EXPERT.format(layer=layer, e=e, proj=proj)].astype(np.float32).astype(np.float16)
                )
                assert np.array_equal(stack[e], want), (layer, proj, e)
    expert_arrays = [shape for name, shape in handed if ".experts." in name]
    assert len(expert_arrays) >= spec.layers * 3 * n_exp
    assert all(shape in {(n_ff, spec.hidden), (spec.hidden, n_ff)} for shape in expert_arrays)
    keys = info.kv
    assert keys["qwen3moe.expert_count"] == n_exp and keys["qwen3moe.expert_used_count"] == 2
    assert keys["qwen3moe.expert_feed_forward_length"] == n_ff


def test_chat_template_and_every_end_of_turn_token_reach_the_gguf_and_the_modelfile(fused, moe_family):
    from edgemerge.runtime import Model

    gguf_file, _, _ = fused
    template = (moe_family["instruct"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert "<|im_start|>" in template and kv(gguf_file)["tokenizer.chat_template"] == template
    info = chat_info(gguf_file, moe_family["instruct"])
    text, _ = modelfile("m.gguf", info, "Euskaraz erantzun.")
    assert {"<|im_end|>", "<|endoftext|>"} <= set(parse_modelfile_stops(text))
    with Model(gguf_file, n_ctx=64, n_threads=1) as model:
        assert all(model.is_eog(i) for i in QWEN3_EOS)


def test_a_different_expert_count_is_named(moe_family, tmp_path):
    def eight_experts(cfg):
        del cfg["num_local_experts"]  # transformers 5's name of it; the released checkpoints' is num_experts
        cfg["num_experts"] = 8

    message = compat_error(moe_family, tmp_path, eight_experts)
    assert "num_local_experts (the expert count of each mixture-of-experts layer): 4 in instruct" in message
    assert "but 8 in eu" in message and message.count("\n") == 0


def test_a_missing_expert_is_named_before_any_work(moe_family, tmp_path):
    """An expert absent from the checkpoint: the check names it, and so does a direct export (before it writes
    anything under the output name)."""
    eu = shutil.copytree(moe_family["eu"], tmp_path / "eu")
    state = load_file(eu / "model.safetensors")
    del state[EXPERT.format(layer=1, e=2, proj="up_proj")]
    save_file(state, eu / "model.safetensors", metadata={"format": "pt"})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {**moe_family, "eu": eu}, {"eu": 1.0}))
    with pytest.raises(EdgemergeError, match=r"model.layers.1.mlp.experts.2.up_proj.weight is missing"):
        check_compat(resolve_recipe(recipe))
    with pytest.raises(EdgemergeError, match=r"experts.2.up_proj.weight is missing"):
        export_hf(eu, tmp_path / "eu.gguf")
    assert not (tmp_path / "eu.gguf").exists()
    # the sink's own guard, for a caller that hands it the tensors without the check
    specs = [TensorSpec(name, array.shape, "bfloat16") for name, array in state.items()]
    with pytest.raises(EdgemergeError, match=r"blk.1.ffn_up_exps.weight: 3 of 4 experts present \(expert 2"):
        GGUFSink(tmp_path / "direct.gguf", eu).open(specs)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob false"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ],
)
def test_configs_llama_cpp_would_run_differently_are_refused(fields, needle):
    with pytest.raises(EdgemergeError, match=needle):
        arch_for({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, **fields})


def test_a_dense_language_model_beside_an_moe_instruct_names_both_architectures(moe_family, tmp_path):
    message = compat_error(
        moe_family, tmp_path, lambda cfg: cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    )
    assert "Qwen3MoeForCausalLM in instruct" in message and "Qwen3ForCausalLM in eu" in message
