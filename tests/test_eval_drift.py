"""Drift against a stored reference on the real stories260K model (F32) and its Q4_K_M: the stored comparison
against the live two-model computation, one model in memory at a time, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgemerge import runtime
from edgemerge.errors import EdgemergeError
from edgemerge.evaluate import evaluate
from edgemerge.evaluate.drift import DriftMeter, kl_divergence, reference_chunks
from edgemerge.evaluate.perplexity import chunk_logits, make_chunks, perplexity
from edgemerge.evaluate.reference import StoredReference, reference_writer
from edgemerge.quantize import quantize
from edgemerge.runtime import Model

from .shared import need_shared


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f32 = need_shared("models", "stories260K", "stories260K.gguf")
    q4 = quantize(f32, "Q4_K_M", tmp_path_factory.mktemp("q") / "stories260K-Q4_K_M.gguf", threads=1)
    return f32, q4


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return need_shared("text", "by_lang", "en.txt").read_text(encoding="utf-8").splitlines()[:60]


def _store(model: Model, chunks, path: Path) -> Path:
    with reference_writer(path, chunks.ctx, model.n_vocab, chunks.tokens, chunks.n_chunks) as write:
        perplexity(model, chunks, on_chunk=lambda i, lg, t: write(lg, t))
    return path


@pytest.fixture(scope="module")
def stored_f32(files, lines, tmp_path_factory) -> Path:
    with Model(files[0], n_ctx=512, n_threads=1) as m:
        return _store(m, make_chunks(m, lines, 128, fit=False), tmp_path_factory.mktemp("r") / "f32.logits")


def _drift(path: Path, stored: Path, lines: list[str]):
    s = StoredReference(stored)
    try:
        with Model(path, n_ctx=512, n_threads=1) as m:
            chunks = reference_chunks(m, s, m.tokenize("\n".join(lines)), max_chunks=None)
            meter = DriftMeter(s)
            perplexity(m, chunks, on_chunk=meter)
            return meter.result()
    finally:
        s.close()


def test_kl_divergence_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 50)), rng.normal(size=(4, 50))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    assert np.allclose(kl_divergence(a, b), (p * np.log(p / q)).sum(-1))
    assert np.allclose(kl_divergence(a, a + 3.0), 0.0)  # shift invariance: same distribution


def test_model_against_its_own_stored_logits(files, stored_f32, lines):
    d = _drift(files[0], stored_f32, lines)
    assert abs(d.kld_mean) < 1.3e-4 and d.top1_agreement == 1.0
    assert d.ppl_ratio == pytest.approx(1.0, rel=1e-6)  # the trailer keeps the reference's exact -log p


def test_stored_comparison_equals_the_live_two_model_one(files, stored_f32, lines):
    """Both models' logits side by side (the old path, two models loaded) against the stored reference."""
    f32, q4 = (Model(p, n_ctx=512, n_threads=1) for p in files)
    with f32, q4:
        chunks = make_chunks(f32, lines, 128, fit=False)
        kl, same, nll_q, nll_f = [], 0, [], []
        for (lq, t), (lf, _) in zip(chunk_logits(q4, chunks), chunk_logits(f32, chunks)):
            kl.append(kl_divergence(lf, lq))
            same += int((lq.argmax(-1) == lf.argmax(-1)).sum())
            rows = np.arange(len(t))
            nll_q.append(-runtime.log_softmax(lq)[rows, t])
            nll_f.append(-runtime.log_softmax(lf)[rows, t])
    live_kld = float(np.concatenate(kl).mean())
    live_ratio = float(np.exp(np.concatenate(nll_q).mean() - np.concatenate(nll_f).mean()))
    d = _drift(q4.path, stored_f32, lines)
    assert 0.0 < live_kld < 0.5
    assert d.kld_mean == pytest.approx(live_kld, abs=1.3e-4, rel=1e-3)
    assert abs(d.top1_agreement * d.tokens - same) <= 1  # a near tie may flip within the stored precision
    assert d.ppl_ratio == pytest.approx(live_ratio, rel=1e-6) and d.tokens == chunks.scored


def test_other_text_or_vocabulary_is_refused(files, stored_f32, lines, tmp_path):
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    with pytest.raises(EdgemergeError, match="other tokens") as e:
        _drift(files[1], stored_f32, lines[1:])
    assert "\n" not in str(e.value)
    reader = gguf.GGUFReader(files[0], "r")
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    i, j = tokens.index(","), tokens.index("!")
    tokens[i], tokens[j] = tokens[j], tokens[i]  # same size, different vocabulary
    dst = tmp_path / "other-vocab.gguf"
    new = {
        "tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens, gguf.GGUFValueType.STRING)
    }
    copy_with_new_metadata(reader, gguf.GGUFWriter(dst, arch="llama"), new, [])
    with pytest.raises(EdgemergeError, match="different vocabulary"):
        _drift(dst, stored_f32, lines)


def test_eval_with_ref_holds_one_model_at_a_time_and_equals_the_stored_path(files, tmp_path, monkeypatch):
    open_now, most = [0], [0]
    init, close = Model.__init__, Model.close

    def counting_init(self, *a, **k):
        init(self, *a, **k)
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])

    def counting_close(self):
        open_now[0] -= 1
        close(self)

    monkeypatch.setattr(Model, "__init__", counting_init)
    monkeypatch.setattr(Model, "close", counting_close)
    f32, q4 = files
    live = evaluate(q4, "en", ref=f32, quick=True, n_threads=1)
    assert most[0] == 1 and open_now[0] == 0
    saved = tmp_path / "f32.logits"
    evaluate(f32, "en", save_logits=saved, quick=True, n_threads=1)
    stored = evaluate(q4, "en", ref_logits=saved, quick=True, n_threads=1)
    for k in ("perplexity", "ref_perplexity", "kld_mean", "kld_max", "top1_agreement", "ppl_ratio", "tokens"):
        assert getattr(live, k) == getattr(stored, k), k
    assert live.ref == "stories260K.gguf" and stored.ref == "f32.logits" and 0 < live.kld_mean < 1


def test_eval_command_stores_and_compares(files, tmp_path, cli):
    f32, q4 = files
    saved, report = tmp_path / "f32.logits", tmp_path / "q4.json"
    code, _, err = cli("eval", f32, "--lang", "en", "--quick", "--threads", "1", "--save-logits", saved)
    assert code == 0, err
    code, _, err = cli(
        "eval", q4, "--lang", "en", "--quick", "--threads", "1", "--ref-logits", saved, "--report", report
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["ref"] == "f32.logits" and 0 < data["kld_mean"] < 1 and data["threads"] == 1


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        ("truncate", [], "truncated or damaged"),
        (None, ["--ctx", "64"], "--ctx 64 differs from the chunks of 128"),
        (None, ["--lang", "eu"], "other tokens"),
        (None, ["--ref", "MODEL"], "either --ref"),
        (None, ["--save-logits", "MODEL"], "choose an output outside the inputs"),
    ],
)
def test_eval_command_refuses_a_bad_reference(files, stored_f32, tmp_path, cli, damage, extra, message):
    ref = tmp_path / "ref.logits"
    ref.write_bytes(stored_f32.read_bytes()[: -100 if damage else None])
    q4 = files[1]
    extra = [str(q4) if x == "MODEL" else x for x in extra]
    lang = [] if "--lang" in extra else ["--lang", "en"]
    report = tmp_path / "out.json"
    code, _, err = cli("eval", q4, *lang, "--threads", "1", "--ref-logits", ref, "--report", report, *extra)
    assert code == 2 and message in err, err
    assert err.count("\n") <= 2 and not report.exists()
