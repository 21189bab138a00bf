"""HF -> GGUF export: llama.cpp reads our files and computes transformers' logits; tokenizers agree; metadata."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemerge.gguf.arch import REGISTRY
from edgemerge.gguf.inspect import kv, read_gguf, tensors
from edgemerge.gguf.metadata import RECIPE_KEY, GGUFMetadata, Lineage
from edgemerge.gguf.vocab import CHECK_TEXT
from edgemerge.pipeline import export_hf

from .arch_fixtures import ARCH_SPECS
from .reference_llama import reference_llama
from .shared import need_shared

ARCHS = list(ARCH_SPECS)
GGUF_ARCH = {name: gguf.MODEL_ARCH_NAMES[REGISTRY[spec.arch].model_arch] for name, spec in ARCH_SPECS.items()}
PROMPT = "Kaixo! Gaur goizean mendira joan gara, eta eguraldi ederra izan dugu. The weather was fine."


def _sentences(lang: str, n: int = 150) -> list[str]:
    lines = need_shared("text", "by_lang", f"{lang}.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in lines if s.strip()][:n]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, arch_models, f32_ggufs):
    """llama.cpp on our F32 file gives transformers' logits on the same ids (|diff| <= 2e-3). Its KV cache is
    F32 too, so the file is what is compared: Gemma 4's attention (unit-norm queries and keys, scale 1) turns the
    default F16 cache's rounding of the keys alone into logit differences of 4e-3."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(arch_models[arch])(PROMPT).input_ids
    f32 = llama_cpp.GGML_TYPE_F32
    llm = reference_llama(
        str(f32_ggufs[arch]), logits_all=True, n_ctx=256, n_threads=2, verbose=False, type_k=f32, type_v=f32
    )
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    model = AutoModelForCausalLM.from_pretrained(arch_models[arch], dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 2e-3
    assert np.abs(ref).max() > 0.05  # the comparison is not between two near-zero arrays


# one fixture per real vocabulary: a multimodal variant's tokenizer is its text fixture's (same files, same keys)
_ONE_PER_VOCAB = list(
    {s.tokenizer: n for n, s in reversed(ARCH_SPECS.items()) if s.tokenizer != "spm512"}.values()
)


@pytest.mark.parametrize("arch", _ONE_PER_VOCAB)
def test_tokenization_matches_reference_on_real_text(arch, arch_models, f32_ggufs):
    """llama.cpp's tokenizer from our GGUF splits real eu/ca/gl/es/en sentences like the model's own tokenizer:
    the HF tokenizer for BPE, the SentencePiece library on the real .model for SentencePiece (transformers 5's
    tokenizer converted from the .model splits runs of spaces differently from SentencePiece itself)."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    if arch == "mistral":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(arch_models[arch] / "tokenizer.model"))
        reference = lambda text: [sp.bos_id(), *sp.encode(text)]  # Mistral adds BOS
    elif arch.startswith("gemma4"):
        # Gemma 4's tokenizer adds no BOS (its chat template writes <bos>); the converter's GGUF says to add
        # one, as llama.cpp wants it (add_bos_token true): the split of the text itself is what must agree
        hf = AutoTokenizer.from_pretrained(arch_models[arch])
        reference = lambda text: [hf.bos_token_id, *hf(text).input_ids]
    else:
        hf = AutoTokenizer.from_pretrained(arch_models[arch])
        reference = lambda text: hf(text).input_ids
    llm = reference_llama(str(f32_ggufs[arch]), vocab_only=True, verbose=False)
    checked = 0
    for lang in ("eu", "ca", "gl", "es", "en"):
        for text in _sentences(lang):
            # add_bos=True means "add the special tokens the GGUF says to add", like HF's add_special_tokens
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == reference(text), (lang, text)
            checked += 1
    assert llm.tokenize(CHECK_TEXT.encode(), add_bos=True, special=False) == reference(CHECK_TEXT)
    assert checked >= 500


def test_keys_say_what_the_file_is(arch_models, f32_ggufs):
    for arch in ARCHS:
        keys = kv(f32_ggufs[arch])
        assert keys["general.architecture"] == GGUF_ARCH[arch]
        assert keys["general.file_type"] == gguf.LlamaFileType.ALL_F32
        assert (
            keys["general.name"].lower() == arch_models[arch].name
        )  # the folder name, title-cased by gguf-py
        cfg = json.loads((arch_models[arch] / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)  # a multimodal model's language model
        assert keys[f"{GGUF_ARCH[arch]}.block_count"] == cfg["num_hidden_layers"]
        assert len(keys["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    # the Qwen fixtures carry a chat template file: it lands in the GGUF verbatim
    template = (arch_models["qwen2"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert kv(f32_ggufs["qwen2"])["tokenizer.chat_template"] == template
    assert kv(f32_ggufs["llama"])["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv(f32_ggufs["qwen2"])["tokenizer.ggml.pre"] == "qwen2"
    assert kv(f32_ggufs["mistral"])["tokenizer.ggml.model"] == "llama"
    assert "rope_freqs.weight" in {t.name for t in tensors(f32_ggufs["llama31"])}
    assert "rope_freqs.weight" not in {t.name for t in tensors(f32_ggufs["mistral"])}


def test_llama32_is_tied_and_its_rope_freqs_are_transformers_llama3_scaling(arch_models, f32_ggufs):
    """Llama 3.2: no output.weight (llama.cpp reuses token_embd); rope_freqs, the factors llama.cpp divides its
    frequencies by, equal transformers' default / "llama3" inverse frequencies (factor 32, low 1, high 4)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    info = read_gguf(f32_ggufs["llama"])
    data = info.tensor_bytes()
    assert "output.weight" not in data and "token_embd.weight" in data
    assert info.kv["llama.attention.key_length"] == info.kv["llama.rope.dimension_count"] == 64
    template = (arch_models["llama"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert info.kv["tokenizer.chat_template"] == template

    config = AutoConfig.from_pretrained(arch_models["llama"])
    default = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0].numpy()
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config)[0].numpy()
    freqs = data["rope_freqs.weight"].view(np.float32)
    np.testing.assert_allclose(freqs, default / scaled, rtol=1e-5)
    assert freqs.min() == 1.0 and freqs.max() == 32.0 and ((freqs > 1) & (freqs < 32)).sum() >= 2


def test_tensor_types_follow_llama_cpp_rules(qwen3_q8_0):
    """q8_0: matrices Q8_0, norms (incl. Qwen3's per-head q/k norms) F32, as the converter decides."""
    infos = {t.name: t for t in tensors(qwen3_q8_0)}
    assert infos["blk.0.attn_q.weight"].type == "Q8_0"
    assert infos["blk.0.attn_q_norm.weight"].type == "F32"
    assert infos["blk.0.attn_norm.weight"].type == "F32"
    assert infos["token_embd.weight"].type == "Q8_0"
    assert "output.weight" not in infos  # tied embeddings: llama.cpp reuses token_embd
    assert kv(qwen3_q8_0)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_merge_metadata_lineage_and_recipe(arch_models, tmp_path):
    meta = GGUFMetadata(
        name="tiny-eu",
        languages=["eu"],
        license="apache-2.0",
        lineage=[
            Lineage("meta-llama/Llama-3.2-1B-Instruct", "instruct"),
            Lineage("meta-llama/Llama-3.2-1B", "base"),
            Lineage("HiTZ/latxa-llama-3.2-1b@v1.0", "language eu"),
            Lineage(str(tmp_path / "local-lm"), "base"),
        ],
        recipe_yaml="name: tiny-eu\nmethod: task_arithmetic\n",
    )
    out = export_hf(arch_models["mistral"], tmp_path / "m.gguf", outtype="f16", metadata=meta)
    keys = kv(out)
    assert keys["general.name"] == "tiny-eu"
    assert keys["general.languages"] == ["eu"]
    assert keys["general.license"] == "apache-2.0"
    assert keys["general.base_model.count"] == 4
    assert keys["general.base_model.0.organization"] == "meta-llama"
    assert keys["general.base_model.0.repo_url"] == "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct"
    assert keys["general.base_model.2.version"] == "v1.0"
    assert keys["general.base_model.3.name"] == "local-lm"
    assert keys[RECIPE_KEY].startswith("name: tiny-eu")


def test_stories260k_round_trip_keeps_greedy_output(tmp_path):
    """stories260K.gguf -> HF (to_hf) -> our export: llama.cpp's greedy continuation is unchanged."""
    pytest.importorskip("llama_cpp")
    from edgemerge.gguf.to_hf import gguf_to_hf

    seed = need_shared("models", "stories260K")
    hf = gguf_to_hf(seed / "stories260K.gguf", tmp_path / "hf", tokenizer_model=seed / "tok512.model")
    ours = export_hf(hf, tmp_path / "stories.gguf", outtype="f32")

    def greedy(path: Path) -> str:
        llm = reference_llama(str(path), n_ctx=128, n_threads=2, seed=0, verbose=False)
        return llm("Once upon a time", max_tokens=40, temperature=0.0, top_k=1)["choices"][0]["text"]

    before = greedy(seed / "stories260K.gguf")
    assert len(before.split()) > 10
    assert greedy(ours) == before


def _copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.unlink()  # a symlink to the fixture: replace, don't write through
    path.write_text(json.dumps(data))


def test_bad_inputs_fail_in_one_line_and_leave_nothing(arch_models, tmp_path, monkeypatch):
    from edgemerge.errors import EdgemergeError

    out = tmp_path / "out"
    out.mkdir()
    src = arch_models["qwen3"]

    other = _copy_model(src, tmp_path / "gpt2")
    _edit_json(other / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        EdgemergeError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"
    ):
        export_hf(other, out / "a.gguf")

    no_tok = _copy_model(src, tmp_path / "no-tok", skip=("tokenizer.json", "tokenizer.model"))
    with pytest.raises(EdgemergeError, match="no tokenizer"):
        export_hf(no_tok, out / "b.gguf")

    with pytest.raises(EdgemergeError, match="unknown GGUF outtype 'q4_k_m'"):
        export_hf(src, out / "c.gguf", outtype="q4_k_m")

    with pytest.raises(EdgemergeError, match="no .safetensors"):
        export_hf(_copy_model(src, tmp_path / "no-weights", skip=("model.safetensors",)), out / "d.gguf")

    import edgemerge.files

    with monkeypatch.context() as m:
        m.setattr(edgemerge.files, "free_bytes", lambda path: 1024)
        with pytest.raises(EdgemergeError, match="not enough disk space"):
            export_hf(src, out / "e.gguf")
    assert not list(out.iterdir())

    done = export_hf(src, out / "f.gguf", outtype="f16")
    with pytest.raises(EdgemergeError, match="already exists"):
        export_hf(src, done)


def test_unknown_bpe_pre_tokenizer_is_an_error(arch_models, tmp_path):
    """A byte-level BPE tokenizer whose check-string hash llama.cpp does not know: refuse, never default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from edgemerge.errors import EdgemergeError

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROMPT, CHECK_TEXT] * 5, trainer)
    model = _copy_model(
        arch_models["qwen3"], tmp_path / "odd-bpe", skip=("tokenizer.json", "tokenizer.model")
    )
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(EdgemergeError, match="unknown BPE pre-tokenizer"):
        export_hf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export(arch_models, tmp_path, capsys):
    from edgemerge.cli import main

    main(
        [
            "export",
            str(arch_models["mistral"]),
            "--out",
            str(tmp_path / "m.gguf"),
            "--outtype",
            "q8_0",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["architecture"] == "llama" and result["outtype"] == "q8_0"
    assert result["vocab"] == 32000 and (tmp_path / "m.gguf").stat().st_size == result["bytes"]
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--out", str(tmp_path / "n.gguf")])
    assert e.value.code == 2
    assert "config.json" in capsys.readouterr().err


def test_bf16_to_f16_encoding_equals_the_converters_for_every_bf16_value():
    """The sink's fast bf16 -> f16 path gives gguf-py's bytes (via float32) for all 65,280 finite bf16 values."""
    import warnings

    import ml_dtypes

    from edgemerge.gguf.sink import _encode

    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    every = every[np.isfinite(every.astype(np.float32))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on the values that overflow to inf
        ref = gguf.quants.quantize(every.astype(np.float32), gguf.GGMLQuantizationType.F16)
    got = _encode(every.reshape(255, 256), gguf.GGMLQuantizationType.F16)
    assert got.shape == (255, 256)
    assert np.array_equal(ref.view(np.uint16), got.reshape(-1).view(np.uint16))


def test_a_fresh_process_exports_bf16_weights(arch_models, tmp_path):
    """`edgemerge export` as its own process: nothing else has imported ml_dtypes there, and safetensors needs its
    bfloat16 to hand out bf16 arrays (a lazy import once left the CLI unable to read any bf16 checkpoint)."""
    import subprocess
    import sys

    from edgemerge.tensors.safetensors import read_model

    model = arch_models["qwen3"]
    assert set(read_model(model, "qwen3").dtypes.values()) == {"BF16"}
    out = tmp_path / "fresh.gguf"
    cli = [sys.executable, "-c", "from edgemerge.cli import main; main()"]
    r = subprocess.run(
        [*cli, "export", str(model), "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert kv(out)["general.architecture"] == "qwen3"
