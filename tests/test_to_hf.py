"""GGUF -> Hugging Face: the converted stories260K gives llama.cpp's logits in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.to_hf import gguf_to_hf, unpermute_rotary

from .reference_llama import reference_llama
from .shared import need_shared

TEXT = "Once upon a time, there was a little dog named Max. He liked to run in the park with his ball."


@pytest.fixture(scope="session")
def stories_hf(tmp_path_factory) -> Path:
    seed = need_shared("models", "stories260K")
    out = tmp_path_factory.mktemp("stories-hf") / "base"
    return gguf_to_hf(seed / "stories260K.gguf", out, tokenizer_model=seed / "tok512.model")


def test_unpermute_inverts_the_export_permutation():
    """unpermute_rotary undoes edgemerge's HF -> GGUF q/k permutation (llama.cpp's LlamaModel.permute)."""
    from edgemerge.gguf.arch.llama import permute_qk

    w = np.arange(32 * 6, dtype=np.float32).reshape(32, 6)
    for heads in (1, 2, 4):
        assert np.array_equal(unpermute_rotary(permute_qk(w, heads), heads), w)
    assert not np.array_equal(unpermute_rotary(w, 4), w)


def test_stories260k_logits_match_llama_cpp(stories_hf):
    torch = pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = need_shared("models", "stories260K", "stories260K.gguf")
    config = json.loads((stories_hf / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 5, 4)

    tok = AutoTokenizer.from_pretrained(stories_hf)
    model = AutoModelForCausalLM.from_pretrained(stories_hf, dtype=torch.float32)
    ids = tok(TEXT).input_ids
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()

    llm = reference_llama(model_path=str(seed), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == ids
    llm.eval(ids)
    cpp_logits = np.array(llm.scores[: len(ids)])
    diff = np.abs(hf_logits - cpp_logits).max()
    print(
        f"max |logit difference| transformers vs llama.cpp: {diff:.4f} (logits up to {np.abs(cpp_logits).max():.1f})"
    )
    assert diff < 0.05
    assert (hf_logits.argmax(-1) == cpp_logits.argmax(-1)).all()


def test_wrong_tokenizer_is_refused(tmp_path):
    seed = need_shared("models", "stories260K", "stories260K.gguf")
    other = need_shared("tokenizers", "mistral_sentencepiece", "tokenizer.model.v1")
    with pytest.raises(EdgemergeError, match="does not match the GGUF's vocabulary"):
        gguf_to_hf(seed, tmp_path / "out", tokenizer_model=other)
    assert not (tmp_path / "out").exists()


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(EdgemergeError, match="not found"):
        gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out", tokenizer_model=tmp_path / "t.model")


def test_round_trip_through_export_keeps_every_tensor(stories_hf, tmp_path):
    """GGUF -> Hugging Face -> GGUF (edgemerge's F32 export): every tensor and the vocabulary are bit-identical."""
    from gguf import GGUFReader

    from edgemerge.pipeline import export_hf

    seed = GGUFReader(need_shared("models", "stories260K", "stories260K.gguf"))
    back = GGUFReader(export_hf(stories_hf, tmp_path / "back.gguf", outtype="f32"))
    seed_tensors = {t.name: np.asarray(t.data) for t in seed.tensors}
    assert sorted(seed_tensors) == sorted(t.name for t in back.tensors)
    for t in back.tensors:
        assert np.array_equal(np.asarray(t.data), seed_tensors[t.name]), t.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert back.fields[key].contents() == seed.fields[key].contents(), key


def test_small_shards_hold_the_same_tensors(stories_hf, tmp_path):
    """With a shard limit below the model size, several shards and an index are written, same tensors."""
    from safetensors.numpy import load_file

    seed = need_shared("models", "stories260K")
    out = gguf_to_hf(
        seed / "stories260K.gguf",
        tmp_path / "sharded",
        tokenizer_model=seed / "tok512.model",
        shard_bytes=300_000,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / f).is_file() for f in shards)
    whole = load_file(stories_hf / "model.safetensors")
    parts = {k: v for f in shards for k, v in load_file(out / f).items()}
    assert sorted(parts) == sorted(whole) == sorted(index["weight_map"])
    assert all(np.array_equal(parts[k], whole[k]) for k in whole)
