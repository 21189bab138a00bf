"""Session-wide fixtures: tokenizer folders built once from the shared vocabularies, tiny model families."""

from __future__ import annotations

from pathlib import Path

import pytest

from .models import Spec, make_family, tokenizer_dir


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory, tok_cache) -> dict[str, Path]:
    """A tiny Llama-3-vocab family: base, instruct, eu."""
    root = tmp_path_factory.mktemp("llama-family")
    return make_family(root, Spec(), tokenizer_dir("llama-bpe", tok_cache))


@pytest.fixture(scope="session")
def spm512_tokenizer(tok_cache) -> Path:
    """A 512-token SentencePiece tokenizer folder (cheap vocabulary for merge tests)."""
    from .models import tiny_spm_tokenizer

    return tiny_spm_tokenizer(tok_cache)


@pytest.fixture(scope="session")
def merge_family(tmp_path_factory, spm512_tokenizer) -> dict[str, Path]:
    """Tiny Llama family (512-token vocab) sharded in ~256 KB files: base, instruct (with a Llama 3.1 chat
    template and EOS ids [2, 0]), eu, ca."""
    from .models import chat_instruct

    root = tmp_path_factory.mktemp("merge-family")
    return chat_instruct(make_family(root, Spec(), spm512_tokenizer, langs=("eu", "ca"), shard_size="300KB"))


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory, spm512_tokenizer) -> dict[str, Path]:
    """Tiny Qwen3 family with tied embeddings (no lm_head tensor), one safetensors file each: base, instruct, eu."""
    root = tmp_path_factory.mktemp("tied-family")
    spec = Spec(arch="Qwen3ForCausalLM", tie=True, extra={"head_dim": 64})
    return make_family(root, spec, spm512_tokenizer, langs=("eu",))
