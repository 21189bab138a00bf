"""The streaming engine and merge_to_hf on tiny families: every method, sharded inputs and outputs, tied
embeddings, dtypes, the files that travel with the merge, and NaN detection."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import REGISTRY, arch_for, load_hparams
from edgemerge.merge.engine import merge_into
from edgemerge.pipeline import export_hf, gguf_metadata, merge_to_gguf, merge_to_hf
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe
from edgemerge.tensors import stream
from edgemerge.tensors.sinks import SafetensorsSink
from edgemerge.tensors.spec import TensorSpec

from .arch_fixtures import ARCH_SPECS
from .merge_reference import assert_rounded_once, reference
from .models import chat_copy, state_of, write_recipe

WEIGHTS = {"eu": 0.7, "ca": 0.4}


def read_out(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def states(merge_family):
    return {k: {n: t.numpy() for n, t in state_of(p).items()} for k, p in merge_family.items()}


def expected(method, opts, states, name, weights=WEIGHTS):
    return reference(
        method,
        name,
        states["instruct"][name],
        states["base"][name],
        [states[c][name] for c in weights],
        list(weights.values()),
        opts,
    )


# every method with options that make the sparsifying ones sparsify
METHODS = [
    ("task_arithmetic", {}),
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.6, "seed": 3}),
    ("dare_linear", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.02}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.6, "epsilon": 0.2, "seed": 2}),
]
# the two-model methods: the instruct model and one language model (eu)
TWO_MODELS = [
    ("slerp", {"t": 0.5}),
    ("slerp", {"t": [0.1, 0.9, 0.4]}),
    (
        "slerp",
        {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.8}, {"value": 0.3}]},
    ),
    ("nearswap", {"t": 0.005}),
]


def depth_of(name: str, n_layers: int = 2) -> float:
    """Layer i of n at i / (n - 1), the other tensors at 0 (mergekit's plan for a per-layer schedule)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (n_layers - 1) if m else 0.0


@pytest.mark.parametrize(("method", "opts"), METHODS)
def test_every_method_equals_its_formula_rounded_once(tmp_path, merge_family, states, method, opts):
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method=method, options=opts)
    )
    out = merge_to_hf(recipe, tmp_path / "out", backend="torch")
    merged = read_out(out)
    assert set(merged) == set(states["instruct"])
    for name, arr in merged.items():
        assert arr.dtype == ml_dtypes.bfloat16
        assert_rounded_once(arr, expected(method, opts, states, name))


@pytest.mark.parametrize(("method", "opts"), TWO_MODELS)
def test_two_model_methods_equal_their_formula_rounded_once(tmp_path, merge_family, states, method, opts):
    """slerp and nearswap read the schedule at each tensor's depth; the base model is never read."""
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0}, method=method, options=opts)
    )
    merged = read_out(merge_to_hf(recipe, tmp_path / "out", backend="torch"))
    assert set(merged) == set(states["instruct"])
    for name, arr in merged.items():
        want = reference(
            method,
            name,
            states["instruct"][name],
            None,
            [states["eu"][name]],
            [1.0],
            opts,
            position=depth_of(name),
        )
        assert_rounded_once(arr, want)


def test_shards_follow_the_tensor_order_a_tensor_over_the_limit_alone(tmp_path):
    """(huggingface_hub's planner would put `big` first and `c` beside `a` and `b`: see SafetensorsSink.)"""
    specs = [
        TensorSpec(n, (k,), "float16")
        for n, k in (("a", 300), ("b", 300), ("big", 5000), ("c", 300), ("d", 300))
    ]
    sink = SafetensorsSink(tmp_path, max_shard_bytes=2000)
    assert sink.open(specs) == ["a", "b", "big", "c", "d"]
    files = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 1, 2, 3, 3)]
    assert [files[n] for n in ("a", "b", "big", "c", "d")] == shards


def test_hf_folder_is_complete_and_loads(tmp_path, merge_family, states):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0}))
    out = merge_to_hf(recipe, tmp_path / "out", max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in read_out(out).values())
    # the instruct model's tokenizer, chat template and EOS ids travel unchanged
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (merge_family["instruct"] / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    prov = json.loads((out / "edgemerge.json").read_text())
    assert prov["recipe"]["languages"][0]["weight"] == 1.0
    assert set(prov["inputs"]) == {"instruct", "base", "eu"}
    assert any(v.startswith("sampled-sha256:") for v in prov["inputs"]["eu"]["files"].values())
    assert prov["merge"]["method"] == "task_arithmetic" and prov["merge"]["tensors"] == len(states["base"])

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    got = dict(model.named_parameters())[name].detach().numpy()
    paper = states["instruct"][name] + (states["eu"][name] - states["base"][name])
    np.testing.assert_allclose(got, paper, rtol=2**-8, atol=1e-6)


def test_tied_embeddings_float16(tmp_path, tied_family):
    states = {k: {n: t.numpy() for n, t in state_of(p).items()} for k, p in tied_family.items()}
    assert "lm_head.weight" not in states["base"]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tied_family, {"eu": 0.5}, dtype="float16"))
    out = merge_to_hf(recipe, tmp_path / "out")
    merged = read_out(out)
    assert "lm_head.weight" not in merged and set(merged) == set(states["base"])
    for name, arr in merged.items():
        assert arr.dtype == np.float16
        assert_rounded_once(arr, expected("task_arithmetic", {}, states, name, {"eu": 0.5}))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    emb = model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(emb, merged["model.embed_tokens.weight"].astype(np.float32))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_float32_output_is_the_float32_computation(tmp_path, merge_family, states):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, dtype="float32"))
    out = merge_to_hf(recipe, tmp_path / "out", dtype="float32")
    for name, arr in read_out(out).items():
        assert arr.dtype == np.float32
        np.testing.assert_allclose(arr, expected("task_arithmetic", {}, states, name), rtol=1e-6, atol=1e-7)


class ReversedSink:
    """A sink that asks for the tensors in reverse order and keeps them (like a GGUF writer's own order)."""

    def __init__(self):
        self.got, self.closed = {}, False

    def open(self, specs: list[TensorSpec]) -> list[str]:
        self.specs = specs
        return [s.name for s in reversed(specs)]

    def write(self, name, array):
        self.got[name] = array

    def close(self):
        self.closed = True


def test_engine_follows_the_sink_order_with_identical_values(tmp_path, merge_family):
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method="dare_ties", options={"density": 0.5})
    )
    sources = resolve_recipe(recipe)
    sink = ReversedSink()
    stats = merge_into(recipe, sources, sink)
    assert sink.closed and stats.order == [s.name for s in reversed(sink.specs)]
    assert all(s.dtype == "bfloat16" for s in sink.specs)
    ref = read_out(merge_to_hf(recipe, tmp_path / "out", sources=sources))
    assert set(sink.got) == set(ref)
    for name, arr in ref.items():  # DARE masks do not depend on the order tensors are merged in
        assert np.array_equal(sink.got[name].view(np.uint16), arr.view(np.uint16)), name


class FailingSink(ReversedSink):
    """Fails on its third tensor, in the writer thread the engine runs sinks in."""

    aborted = False

    def write(self, name, array):
        if len(self.got) == 2:
            raise EdgemergeError(f"disk full while writing {name}")
        super().write(name, array)

    def abort(self):
        self.aborted = True


def test_an_error_in_the_sink_thread_stops_the_merge(tmp_path, merge_family):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS))
    sink = FailingSink()
    with pytest.raises(EdgemergeError, match="disk full while writing"):
        merge_into(recipe, resolve_recipe(recipe), sink)
    assert sink.aborted and not sink.closed and len(sink.got) == 2


def test_nan_in_an_input_is_an_error_naming_tensor_and_model(tmp_path, merge_family):
    from safetensors.numpy import save_file

    bad = tmp_path / "eu-nan"
    shutil.copytree(merge_family["eu"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.norm.weight"]
    with safe_open(shard, framework="numpy") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    family = dict(merge_family, eu=bad)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family, {"eu": 1.0}))
    with pytest.raises(EdgemergeError) as e:
        merge_to_hf(recipe, tmp_path / "out")
    assert "model.norm.weight" in e.value.message and "NaN" in e.value.message and "eu (" in e.value.message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5}),
        ("dare_ties", {"density": 0.6}),
        ("breadcrumbs", {"density": 0.9}),
    ],
)
def test_blockwise_merge_equals_whole_tensor_merge(tmp_path, merge_family, monkeypatch, method, opts):
    """Tensors above BLOCK_ELEMENTS are merged in row blocks (sparsifiers plan on the whole tensor first):
    the same bytes as merging whole tensors."""
    from edgemerge.tensors import stream

    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method=method, options=opts)
    )
    whole = read_out(merge_to_hf(recipe, tmp_path / "whole"))
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 5000)
    spec = TensorSpec("model.embed_tokens.weight", (512, 256), "bfloat16")
    assert len(stream.pieces(spec, True)) == 512 // (5000 // 256) + 1 and stream.pieces(spec, False) == [None]
    blocks = read_out(merge_to_hf(recipe, tmp_path / "blocks"))
    for name, arr in whole.items():
        assert np.array_equal(arr.view(np.uint16), blocks[name].view(np.uint16)), name


def test_fused_gguf_equals_merge_then_export(tmp_path, merge_family):
    """merge_to_gguf (no Hugging Face folder in between) writes the same bytes as merge_to_hf + export_hf."""
    import hashlib

    from edgemerge.pipeline import export_hf, gguf_metadata, merge_to_gguf

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml", merge_family, WEIGHTS, method="dare_linear", options={"density": 0.7}
        )
    )
    hashes = {}
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf", hashes=hashes)
    two_step = export_hf(
        merge_to_hf(recipe, tmp_path / "hf"),
        tmp_path / "two.gguf",
        metadata=gguf_metadata(recipe),
        hashes=hashes,
    )
    assert hashlib.sha256(fused.read_bytes()).digest() == hashlib.sha256(two_step.read_bytes()).digest()
    digest = hashlib.sha256(fused.read_bytes()).hexdigest()
    assert hashes == {fused: digest, two_step: digest}  # both hashed while writing

    import gguf

    reader = gguf.GGUFReader(fused)
    assert reader.fields["general.name"].contents() == "tiny"
    assert len(reader.tensors) == len(read_out(tmp_path / "hf"))


# qwen35_vlm's fused merge (its 152k vocabulary) is proven with its vision tower and mtp.* block present in
# tests/test_gguf_qwen35.py (the released class)
@pytest.mark.parametrize("arch", [n for n in ARCH_SPECS if n != "qwen35_vlm"])
def test_fused_gguf_equals_merge_then_export_for_every_family(arch, tmp_path, families, monkeypatch):
    """Each family of the fixture table (its shapes, with the 512-token vocabulary where the family reads a
    SentencePiece one: a tokenizer.model, or a tokenizer.json of that kind as Gemma 4's; else its own) in its
    parity outtype: the fused file has the bytes of merge_to_hf + export_hf, and the fused merge reads only the
    tensors the family writes."""
    spec = ARCH_SPECS[arch]
    if {"sentencepiece", "llama_hf"} & set(REGISTRY[spec.arch].vocab_kinds):
        spec = dataclasses.replace(spec, tokenizer="spm512")
    family = families(spec)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family, {"eu": 0.7}))
    hf = merge_to_hf(recipe, tmp_path / "hf")
    two_step = export_hf(
        hf, tmp_path / "two.gguf", outtype=spec.parity_outtype, metadata=gguf_metadata(recipe)
    )
    read = set()
    load = stream.Readers.load

    def spy(self, piece, indices):
        read.add(piece[0])
        return load(self, piece, indices)

    monkeypatch.setattr(stream.Readers, "load", spy)
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf", outtype=spec.parity_outtype)
    assert fused.read_bytes() == two_step.read_bytes()
    family_arch = arch_for(load_hparams(hf))
    merged = set(read_out(hf))
    # what the family leaves out (a Gemma 3 vision tower) is in the merged folder, not read for the GGUF
    assert read == {n for n in merged if family_arch.gguf_name(n) is not None}


@pytest.mark.parametrize(
    ("method", "opts", "outtype"),
    [("task_arithmetic", {}, "f16"), ("ties", {"density": 0.5}, "f16"), ("linear", {}, "q8_0")],
)
def test_fused_gguf_by_row_blocks_equals_whole_tensors(
    tmp_path, merge_family, monkeypatch, method, opts, outtype
):
    """With small blocks the GGUF sink gets most tensors as row blocks (all but the permuted q/k projections,
    which it takes whole), read ahead one by one (task arithmetic) or planned first (ties), stored as f16 or
    quantized row by row (q8_0): the same bytes as exporting the merged folder."""
    from edgemerge.gguf.sink import GGUFSink
    from edgemerge.pipeline import export_hf, gguf_metadata, merge_to_gguf
    from edgemerge.tensors import stream

    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", merge_family, WEIGHTS, method=method, options=opts)
    )
    two_step = export_hf(
        merge_to_hf(recipe, tmp_path / "hf"),
        tmp_path / "two.gguf",
        outtype=outtype,
        metadata=gguf_metadata(recipe),
    )
    rows, whole = [], []
    monkeypatch.setattr(GGUFSink, "write_rows", _spy(GGUFSink.write_rows, rows))
    monkeypatch.setattr(GGUFSink, "write", _spy(GGUFSink.write, whole))
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 5000)
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf", outtype=outtype)
    assert fused.read_bytes() == two_step.read_bytes()
    assert {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"} <= set(rows)
    assert "model.layers.0.self_attn.q_proj.weight" in whole and not set(rows) & set(whole)


def _spy(fn, calls):
    def spy(self, name, *args):
        calls.append(name)
        return fn(self, name, *args)

    return spy


def test_fused_gguf_ignores_the_instruct_model_card(tmp_path, merge_family):
    """The instruct model's README card describes the instruct model, not the merge: the fused file (which reads
    config and tokenizer from the instruct folder) must not pick up its tags or name, so it stays equal to the
    two-step file (whose merged folder has no card)."""
    import shutil

    from edgemerge.gguf.inspect import kv
    from edgemerge.pipeline import export_hf, gguf_metadata, merge_to_gguf

    family = {k: shutil.copytree(v, tmp_path / "family" / k) for k, v in merge_family.items()}
    (family["instruct"] / "README.md").write_text(
        "---\nlicense: other\ntags: [instruct-card-tag]\nbase_model: someone/else\n---\n# Some Instruct Model\n"
    )
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family, WEIGHTS))
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf")
    two_step = export_hf(
        merge_to_hf(recipe, tmp_path / "hf"), tmp_path / "two.gguf", metadata=gguf_metadata(recipe)
    )
    assert fused.read_bytes() == two_step.read_bytes()
    assert "instruct-card-tag" not in str(kv(fused).get("general.tags"))


LLAMA32_EOS = [128001, 128008, 128009]  # Llama 3.2 Instruct's: <|end_of_text|>, <|eom_id|>, <|eot_id|>
LLAMA32_TEMPLATE = "meta-llama-Llama-3.2-3B-Instruct.jinja"


@pytest.fixture(scope="module")
def llama32_family(tmp_path_factory, families):
    """Tiny Llama 3.2 family (tests/arch_fixtures.py "llama": tied embeddings, llama3 RoPE factor 32, the
    Llama 3.1 vocabulary): base, instruct (alone with 3.2 Instruct's chat template and EOS list), eu."""
    root = tmp_path_factory.mktemp("llama32-family")
    return chat_copy(families(ARCH_SPECS["llama"]), root, LLAMA32_TEMPLATE, LLAMA32_EOS)


def test_fused_gguf_of_a_tied_llama32_family(tmp_path, llama32_family):
    """Llama 3.2 merged straight into a bf16 GGUF: the same bytes as merge_to_hf + export_hf, no output.weight
    (llama.cpp reuses token_embd), rope_freqs added, and the instruct model's chat template and EOS ids kept:
    llama.cpp ends generation on each id of its generation_config.json list."""
    from edgemerge.gguf.inspect import kv, tensors
    from edgemerge.pipeline import export_hf, gguf_metadata, merge_to_gguf
    from edgemerge.runtime import Model

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", llama32_family, {"eu": 0.6}))
    fused = merge_to_gguf(recipe, tmp_path / "fused.gguf", outtype="bf16")
    hf = merge_to_hf(recipe, tmp_path / "hf")
    two_step = export_hf(hf, tmp_path / "two.gguf", outtype="bf16", metadata=gguf_metadata(recipe))
    assert fused.read_bytes() == two_step.read_bytes()

    merged = read_out(hf)
    assert "lm_head.weight" not in merged
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    emb = "model.embed_tokens.weight"
    inputs = {}
    for k in ("instruct", "base", "eu"):
        with safe_open(llama32_family[k] / "model.safetensors", framework="numpy") as h:
            inputs[k] = h.get_tensor(emb)
    ref = reference("task_arithmetic", emb, inputs["instruct"], inputs["base"], [inputs["eu"]], [0.6])
    assert_rounded_once(merged[emb], ref)  # the one matrix that is both embedding and output head
    names = {t.name: t.type for t in tensors(fused)}
    assert "output.weight" not in names and names["token_embd.weight"] == "BF16"
    assert len(names) == len(merged) + 1 and "rope_freqs.weight" in names  # every merged tensor, rope_freqs

    template = (llama32_family["instruct"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert "<|start_header_id|>" in template and kv(fused)["tokenizer.chat_template"] == template
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == LLAMA32_EOS
    with Model(fused, n_ctx=64, n_threads=1) as model:
        assert all(model.is_eog(i) for i in LLAMA32_EOS)
        assert not model.is_eog(model.bos)


@pytest.mark.skipif(
    not __import__("sys").platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
    reason="mallopt tuning is for glibc only",
)
def test_glibc_accepts_the_malloc_thresholds():
    from edgemerge.memory import freed_blocks_kept

    with freed_blocks_kept() as applied:
        assert applied is True


def test_an_interrupt_inside_the_writer_threads_start_aborts_cleanly(tmp_path, monkeypatch):
    """Ctrl-C between creating the writer thread and its start: abort() must not try to join a thread that
    never ran (it raised "cannot join thread before it is started", an internal error instead of exit 130)."""
    import threading

    from edgemerge.tensors.sinks import BackgroundSink, SafetensorsSink

    def interrupted_start(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    sink = BackgroundSink(SafetensorsSink(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        sink.open([TensorSpec("w", (4, 4), "float32")])
    sink.abort()  # no RuntimeError
