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
