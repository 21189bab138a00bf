"""Computing an importance matrix in llama.cpp (edgemerge.imatrix.collect): the statistics' formulas, the chunk
plan, llama-imatrix's own numbers on the same model, text and chunking, and the errors for bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.imatrix import read_imatrix
from edgemerge.imatrix.collect import Calibration, ImatrixOptions, Sums, chunk_plan, compute_imatrix
from edgemerge.imatrix.text import bundled_languages, bundled_text, check_language, read_text, sources
from edgemerge.matmuls import MatMul, weight_name

from .llama_tools import need_tool
from .shared import need_shared

pytest.importorskip("llama_cpp")


def test_dense_sums_are_the_squares_of_every_row_per_matrix():
    rng = np.random.default_rng(0)
    s = Sums()
    # a weight stacked 2 x 1 (ne2 = 2): activations [1, 2, 5 rows, 3 cols]; each i2 goes to its own matrix
    x = rng.normal(size=(1, 2, 5, 3)).astype(np.float32)
    s.add(MatMul("blk.0.w", (3, 4, 2, 1), x))
    s.add(MatMul("blk.0.w", (3, 4, 2, 1), x))
    sq = (x * x).astype(np.float64)  # squared in float32, as llama.cpp squares, then summed
    want = np.stack([2 * sq[0, m].sum(0) for m in range(2)])
    np.testing.assert_allclose(s.sums["blk.0.w"], want, rtol=1e-12)
    assert s.counts["blk.0.w"].tolist() == [10]  # one count per dense weight: rows / n_mat, twice
    # activations broadcast over a 2-D weight (ne2 = 1): every i2 lands in matrix 0
    s.add(MatMul("blk.1.w", (3, 4, 1, 1), x))
    np.testing.assert_allclose(s.sums["blk.1.w"][0], sq[0].sum((0, 1)), rtol=1e-12)
    assert s.counts["blk.1.w"].tolist() == [10]


def test_expert_sums_go_to_the_chosen_expert_of_each_token():
    rng = np.random.default_rng(1)
    n_tokens, n_used, cols, n_expert = 7, 2, 4, 3
    x = rng.normal(size=(1, n_tokens, n_used, cols)).astype(np.float32)
    ids = rng.integers(0, n_expert, size=(n_tokens, n_used)).astype(np.int32)
    s = Sums()
    s.add(MatMul("blk.0.ffn_up_exps.weight", (cols, 5, n_expert, 1), x, ids))
    want, counts = np.zeros((n_expert, cols)), np.zeros(n_expert, int)
    for t in range(n_tokens):  # llama-imatrix's loop: token t's slot k adds x[t, k]^2 to expert ids[t, k]
        for k in range(n_used):
            want[ids[t, k]] += (x[0, t, k] * x[0, t, k]).astype(np.float64)
            counts[ids[t, k]] += 1
    np.testing.assert_allclose(s.sums["blk.0.ffn_up_exps.weight"], want, rtol=1e-12)
    assert s.counts["blk.0.ffn_up_exps.weight"].tolist() == counts.tolist()
    with pytest.raises(RuntimeError, match="expert id"):
        s.add(MatMul("blk.0.ffn_up_exps.weight", (cols, 5, n_expert, 1), x, ids + n_expert))


def test_non_finite_activations_are_one_line():
    x = np.full((1, 1, 16, 2), np.inf, np.float32)
    with pytest.raises(EdgemergeError, match=r"non-finite activations for 'blk\.0\.w'.*broken"):
        Sums().add(MatMul("blk.0.w", (2, 2, 1, 1), x))


def test_weight_names_are_filtered_as_llama_imatrix_does():
    assert weight_name("blk.0.attn_q.weight") == "blk.0.attn_q.weight"
    assert weight_name("lora#blk.0.attn_q.weight#a") == "blk.0.attn_q.weight"
    assert weight_name("x#blk.1.ffn_up.weight") == "blk.1.ffn_up.weight"


def test_chunk_plan_takes_turns_and_stops_at_the_limit():
    tokens = [list(range(10)), list(range(25)), list(range(3))]
    assert chunk_plan(tokens, 5, None) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert chunk_plan(tokens, 5, 3) == [(0, 0), (1, 0), (0, 1)]
    assert chunk_plan([list(range(12))], 4, None) == [(0, 0), (0, 1), (0, 2)]  # llama-imatrix's chunks


def _llama_imatrix(tool, model, text, out, *, chunk, chunks, batch):
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(chunk)]
    # llama-cpp-python turns flash attention off (its Llama default); llama-imatrix must too, for the same sums
    cmd += ["--chunks", str(chunks), "-b", str(batch), "-t", "2", "-fa", "off"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return read_imatrix(out)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "batch"), [("qwen3", 256), ("llama", 64), ("gemma3", 256)])
def test_same_statistics_as_llama_imatrix(name, batch, f32_ggufs, tmp_path):
    """llama.cpp's own tool and ours, same F32 GGUF, text and chunking: every entry within 1e-4 relative."""
    tool = need_tool("llama-imatrix")
    model = f32_ggufs[name]
    text = tmp_path / "eu.txt"
    text.write_text(bundled_text("eu").text, encoding="utf-8")
    theirs = _llama_imatrix(tool, model, text, tmp_path / "theirs.gguf", chunk=64, chunks=6, batch=batch)
    ours = compute_imatrix(
        model, [Calibration(str(text), text.read_text(encoding="utf-8"))],
        ImatrixOptions(chunk_size=64, chunks=6, batch=batch, threads=2),
    )  # fmt: skip
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert len(ours.entries) >= 7  # every attention and feed-forward weight of every block
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (6, 64, [str(text)])
    assert (theirs.chunk_count, theirs.chunk_size, theirs.datasets) == (6, 64, [str(text)])
    for n, e in ours.entries.items():
        t = theirs.entries[n]
        assert e.counts.tolist() == t.counts.tolist() == [6 * 64], n
        np.testing.assert_allclose(e.sums, t.sums, rtol=1e-4, atol=0, err_msg=n)


def test_text_shorter_than_a_chunk_and_chunks_beyond_the_context(f32_ggufs):
    model = f32_ggufs["qwen3"]
    with pytest.raises(
        EdgemergeError, match=r"calibration text short\.txt gives \d+ tokens, fewer than one chunk"
    ):
        compute_imatrix(model, [Calibration("short.txt", "Kaixo mundua.")], ImatrixOptions(chunk_size=64))
    with pytest.raises(EdgemergeError, match="longer than .*training context"):
        compute_imatrix(model, [bundled_text("eu")], ImatrixOptions(chunk_size=1 << 19))
    with pytest.raises(EdgemergeError, match="--chunks 0: must be between 1"):
        compute_imatrix(model, [bundled_text("eu")], ImatrixOptions(chunks=0))


def test_cli_imatrix_then_quantize_an_imatrix_type(f32_ggufs, tmp_path, cli):
    model = f32_ggufs["qwen3"]
    out = tmp_path / "eu.imatrix.gguf"
    code, stdout, err = cli("imatrix", str(model), "--lang", "eu", "--mix", "en", "--chunk-size", "64",
                            "--chunks", "4", "--out", str(out), "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    imx = read_imatrix(out)
    assert report["output"] == str(out) and report["chunks"] == imx.chunk_count == 4
    assert imx.datasets == [bundled_text("eu").name, bundled_text("en").name]
    assert [t["lang"] for t in report["texts"]] == ["eu", "en"]
    code, _, err = cli(
        "quantize", str(model), "-q", "IQ2_M", "--imatrix", str(out), "--out-dir", str(tmp_path)
    )
    assert code == 0, err
    # the same output again is refused (nothing overwritten), and a text that is too short leaves nothing
    code, _, err = cli("imatrix", str(model), "--lang", "eu", "--chunks", "1", "--out", str(out))
    assert code == 2 and "exists" in err
    short = tmp_path / "short.txt"
    short.write_text("Kaixo.", encoding="utf-8")
    code, _, err = cli(
        "imatrix", str(model), "--lang", "eu", "--text", str(short), "--out", str(tmp_path / "x.gguf")
    )
    assert code == 2 and "fewer than one chunk" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("lang", bundled_languages())
def test_bundled_texts_are_in_their_language_and_say_their_licence(lang):
    text = bundled_text(lang)
    check = check_language(text, lang)
    assert check.ok and check.lang == lang and check.share >= 0.9, check
    assert sources()[lang]["licence"].startswith("CC BY") and "NC" not in sources()[lang]["licence"]
    assert lang in text.name and sources()[lang]["licence"] in text.name


def test_bundled_texts_are_not_the_held_out_evaluation_text():
    flores = need_shared("text", "flores200")
    for lang, code in (("eu", "eus"), ("ca", "cat"), ("en", "eng")):
        ours = set(bundled_text(lang).text.splitlines())
        assert ours == set((flores / f"{code}_Latn.dev").read_text(encoding="utf-8").splitlines())
        assert not ours & set((flores / f"{code}_Latn.devtest").read_text(encoding="utf-8").splitlines())


def test_a_text_in_another_language_is_said(tmp_path):
    check = check_language(bundled_text("es"), "eu")
    assert not check.ok and check.lang == "es" and check.share < 0.1
    assert (
        check.warning().startswith("calibration text edgemerge:es (")
        and "reads as es, not eu" in check.warning()
    )
    with pytest.raises(EdgemergeError, match="no bundled calibration text for 'xx'.*--text FILE"):
        bundled_text("xx")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"Kaixo, zer moduz? Ondo, eskerrik asko." + b"\xe9")
    with pytest.raises(EdgemergeError, match="is not UTF-8"):
        read_text(bad)
