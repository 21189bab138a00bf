"""Drift against a reference GGUF: zero for a model against itself, positive for F32 against Q4_K_M."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from edgemerge.evaluate.drift import drift, kl_divergence
from edgemerge.evaluate.perplexity import make_chunks
from edgemerge.evaluate.runner import Model

from .shared import need_shared


def _q4_k_m(src: Path, dst: Path) -> Path:
    """Q4_K_M by llama.cpp's quantizer (edgemerge.quantize when present, else the llama.cpp call itself)."""
    try:
        from edgemerge.quantize import quantize
    except ImportError:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        return dst
    return quantize(src, "Q4_K_M", dst, threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    f32 = need_shared("models", "stories260K", "stories260K.gguf")
    q4 = _q4_k_m(f32, tmp_path_factory.mktemp("q") / "stories260K-Q4_K_M.gguf")
    ms = [Model(p, n_ctx=512, n_threads=1) for p in (f32, f32, q4)]
    yield ms
    for m in ms:
        m.close()


@pytest.fixture(scope="module")
def chunks(models):
    lines = need_shared("text", "by_lang", "en.txt").read_text(encoding="utf-8").splitlines()[:60]
    return make_chunks(models[0], lines, 128, fit=False)


def test_kl_divergence_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 50)), rng.normal(size=(4, 50))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    assert np.allclose(kl_divergence(a, b), (p * np.log(p / q)).sum(-1))
    assert np.allclose(kl_divergence(a, a + 3.0), 0.0)  # shift invariance: same distribution


def test_model_against_itself(models, chunks):
    f32, f32_again, _ = models
    d = drift(f32, f32_again, chunks)
    assert d.kld_mean == pytest.approx(0.0, abs=1e-9) and d.top1_agreement == 1.0 and d.ppl_ratio == 1.0
    assert d.tokens == chunks.scored


def test_f32_against_q4_k_m(models, chunks):
    f32, _, q4 = models
    d = drift(q4, f32, chunks)
    assert 0.0 < d.kld_mean < 0.5 and d.kld_max > d.kld_mean
    assert 0.8 < d.top1_agreement < 1.0
    assert d.ppl_ratio != 1.0 and d.ref_perplexity == pytest.approx(drift(f32, f32, chunks).perplexity)


def test_reference_with_another_vocabulary_is_refused(models, chunks, tmp_path):
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from edgemerge.errors import EdgemergeError

    src = need_shared("models", "stories260K", "stories260K.gguf")
    reader = gguf.GGUFReader(src, "r")
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    i, j = tokens.index(","), tokens.index("!")
    tokens[i], tokens[j] = tokens[j], tokens[i]  # same size, different vocabulary
    dst = tmp_path / "other-vocab.gguf"
    writer = gguf.GGUFWriter(dst, arch="llama")
    new = {
        "tokenizer.ggml.tokens": MetadataDetails(
            gguf.GGUFValueType.ARRAY, tokens, sub_type=gguf.GGUFValueType.STRING
        )
    }
    copy_with_new_metadata(reader, writer, new, [])
    other = Model(dst, n_ctx=512, n_threads=1)
    try:
        with pytest.raises(EdgemergeError, match="different vocabulary"):
            drift(models[0], other, chunks)
    finally:
        other.close()
