"""Session-wide fixtures: tokenizer folders built once from the shared vocabularies, tiny model families.

The expensive ones (real-vocabulary tokenizers, `arch_models`, `f32_ggufs`, `families`) are built once per test
run in `run_dir`, which every pytest-xdist worker of the run shares (tests/models.py built_once): read them,
copy them to change them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemerge.cli import main

from .arch_fixtures import ARCH_SPECS
from .models import Spec, make_family, tokenizer_dir

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores: a llama.cpp thread that waits for a busy core spins (llama.cpp's own variable)
    os.environ.setdefault("LLAMA_ARG_THREADS", "1")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A folder of this test run shared by all its pytest-xdist workers (their base temp folders' parent; the base
    temp folder itself in one process): fixtures built there with `built_once` are built once per run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tok_cache(run_dir) -> Path:
    (run_dir / "tokenizers").mkdir(exist_ok=True)
    return run_dir / "tokenizers"


@pytest.fixture(scope="session")
def families(run_dir, tok_cache):
    """`families(spec)`: make_family's base, instruct and eu of a Spec with its own tokenizer, built once per test
    run (tests/models.py shared_family). Read-only: copy a family to change it (tests/models.py chat_copy)."""
    from .models import shared_family, tiny_spm_tokenizer

    (run_dir / "families").mkdir(exist_ok=True)

    def family(spec: Spec) -> dict[str, Path]:
        tok = (
            tiny_spm_tokenizer(tok_cache)
            if spec.tokenizer == "spm512"
            else tokenizer_dir(spec.tokenizer, tok_cache)
        )
        return shared_family(run_dir / "families", spec, tok)

    return family


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


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory) -> Path:
    """The demo's SentencePiece tokenizer (about 1,000 tokens, ChatML template, EOS <|im_end|>); no shared data."""
    from edgemerge.demo import DATA_DIR, train_tokenizer

    lines = []
    for name in ("en.txt", "eu.txt", "chat_en.jsonl"):
        lines += (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines, tmp_path_factory.mktemp("chatml-tok"), 1024)


@pytest.fixture(scope="session")
def build_family(tmp_path_factory, chatml_tokenizer) -> dict[str, Path]:
    """Tiny Llama family (ChatML, small vocab) and a recipe.yaml for it: base, instruct, eu, recipe."""
    import yaml

    root = tmp_path_factory.mktemp("build-family")
    fam = make_family(root, Spec(), chatml_tokenizer, langs=("eu",))
    recipe = {
        "name": "tiny-eu",
        "instruct": "./instruct",
        "base": "./base",
        "languages": [{"code": "eu", "model": "./lang-eu", "weight": 0.8}],
        "quants": ["Q4_K_M", "Q8_0"],
        "license": "apache-2.0",
        "eval": {"min_stop_rate": 0.0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return {**fam, "recipe": root / "recipe.yaml"}


class LazyDict(dict):
    """A dict that builds a missing entry on first access (tests that need one model don't build all)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = value = self._make(key)
        return value


@pytest.fixture(scope="session")
def arch_models(run_dir, tok_cache) -> dict[str, Path]:
    """One tiny model per GGUF-supported architecture (built on first use), with real tokenizers: llama
    (Llama 3 BPE), mistral (Mistral v1 SentencePiece .model), qwen2 (Qwen2 BPE, tied embeddings, chat
    template), qwen3 (tied, with the cheap 512-token SentencePiece vocabulary: its tokenizer path is qwen2's)
    and llama31 (Llama 3.1 RoPE scaling). Built once per test run, shared by all workers: read-only."""
    from .models import built_once, make_model, tiny_spm_tokenizer

    root = run_dir / "arch-models"
    root.mkdir(exist_ok=True)

    def build(name: str) -> Path:
        spec = ARCH_SPECS[name]
        kind = spec.tokenizer
        tok = tiny_spm_tokenizer(tok_cache) if kind == "spm512" else tokenizer_dir(kind, tok_cache)
        return built_once(root / name, lambda out: make_model(out, spec, tok, seed=3))

    return LazyDict(build)


@pytest.fixture(scope="session")
def f32_ggufs(run_dir, arch_models) -> dict[str, Path]:
    """Our F32 GGUF export of each `arch_models` entry (made on first use, once per test run: read-only)."""
    from edgemerge.pipeline import export_hf

    from .models import built_once

    root = run_dir / "f32-ggufs"
    root.mkdir(exist_ok=True)

    def export(name: str) -> Path:
        return built_once(
            root / f"{name}-f32.gguf", lambda out: export_hf(arch_models[name], out, outtype="f32")
        )

    return LazyDict(export)


@pytest.fixture(scope="session")
def qwen3_q8_0(run_dir, arch_models) -> Path:
    """Our Q8_0 GGUF export of the Qwen3 fixture (once per test run: read-only)."""
    from edgemerge.pipeline import export_hf

    from .models import built_once

    out = run_dir / "qwen3-q8_0.gguf"
    return built_once(out, lambda path: export_hf(arch_models["qwen3"], path, outtype="q8_0"))


@pytest.fixture
def cli(capsys):
    """`edgemerge ARGS...` in-process: (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def random_imatrix():
    """`make(model_gguf, seed) -> Imatrix`: random positive statistics for every matrix weight of a block
    (what llama-imatrix collects), one count per weight, as if computed on 4 chunks of 64 tokens."""
    import numpy as np

    from edgemerge.gguf.inspect import read_gguf
    from edgemerge.imatrix import Entry, Imatrix

    def make(model: Path, seed: int) -> Imatrix:
        rng = np.random.default_rng(seed)
        entries = {}
        for t in read_gguf(model).tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                count = int(rng.integers(64, 256))
                sums = (rng.lognormal(0.0, 1.0, t.shape[0]) * count).astype(np.float32)
                entries[t.name] = Entry(sums, np.array([count], dtype=np.int64))
        return Imatrix(entries, [f"calibration-{seed}.txt"], chunk_count=4, chunk_size=64)

    return make
