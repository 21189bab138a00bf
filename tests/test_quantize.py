"""Quantization through llama.cpp: same bytes as its quantizer called directly, files load and generate,
bad inputs fail in one line with nothing at the output path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.inspect import kv, tensors
from edgemerge.quantize import output_name, quant_types, quantize

pytest.importorskip("llama_cpp")

TEXT = "Gaur goizean mendira joan gara eta eguraldi ederra izan dugu. The weather was fine and we walked for hours."


@pytest.fixture(scope="module")
def quantized(f32_ggufs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    src = f32_ggufs["qwen3"]
    return {q: quantize(src, q, root / output_name(src, q)) for q in ("Q4_K_M", "Q8_0")}


def _direct_llama_cpp_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's quantizer with its default parameters, in a fresh process (what llama-quantize does)."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = int(sys.argv[3])\n"
        "p.nthread = 1\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst), str(ftype)], capture_output=True, check=False
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_same_bytes_as_llama_cpp_quantizer(quantized, f32_ggufs, tmp_path):
    theirs = tmp_path / "theirs.gguf"
    _direct_llama_cpp_quantize(f32_ggufs["qwen3"], theirs, quant_types()["Q4_K_M"])
    assert quantized["Q4_K_M"].read_bytes() == theirs.read_bytes()
    types = {t.name: t.type for t in tensors(quantized["Q4_K_M"])}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert kv(quantized["Q4_K_M"])["general.file_type"] == quant_types()["Q4_K_M"]


def test_quantized_files_load_and_generate(quantized, f32_ggufs):
    import llama_cpp

    def logits(path: Path) -> tuple[np.ndarray, list[int]]:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
        ids = llm.tokenize(TEXT.encode())
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)]), llm

    ref, _ = logits(f32_ggufs["qwen3"])
    q8, llm = logits(quantized["Q8_0"])
    # random-weight fixtures keep about 0.95 top-1 agreement at Q8_0 (near-tied logits); the bar is lower
    assert np.mean(ref.argmax(-1) == q8.argmax(-1)) >= 0.8
    assert quantized["Q8_0"].stat().st_size < f32_ggufs["qwen3"].stat().st_size / 3
    for path in quantized.values():
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        out = llm("Kaixo", max_tokens=8, temperature=0.0, top_k=1)
        assert out["usage"]["completion_tokens"] > 0


def test_output_name_replaces_float_suffix():
    assert output_name(Path("x/model-f16.gguf"), "Q4_K_M") == "model-Q4_K_M.gguf"
    assert output_name(Path("model.BF16.gguf"), "Q8_0") == "model-Q8_0.gguf"
    assert output_name(Path("model.gguf"), "Q6_K") == "model-Q6_K.gguf"


def test_unknown_type_lists_valid_ones(f32_ggufs, tmp_path):
    with pytest.raises(EdgemergeError, match="valid types: .*Q4_K_M.*IQ4_XS"):
        quantize(f32_ggufs["qwen3"], "Q4_K_XL", tmp_path / "x.gguf")
    with pytest.raises(EdgemergeError, match="importance matrix"):
        quantize(f32_ggufs["qwen3"], "IQ2_XXS", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_not_a_gguf_truncated_or_already_quantized(f32_ggufs, quantized, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(EdgemergeError, match="not a GGUF"):
        quantize(text, "Q8_0", tmp_path / "a.gguf")
    cut = tmp_path / "cut.gguf"
    with open(f32_ggufs["qwen3"], "rb") as f:
        cut.write_bytes(f.read(f32_ggufs["qwen3"].stat().st_size // 2))
    with pytest.raises(EdgemergeError, match="truncated"):
        quantize(cut, "Q8_0", tmp_path / "b.gguf")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(EdgemergeError, match="damaged or truncated"):
        quantize(header_only, "Q8_0", tmp_path / "c.gguf")
    with pytest.raises(EdgemergeError, match="already quantized"):
        quantize(quantized["Q8_0"], "Q4_K_M", tmp_path / "d.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "header.gguf", "notes.gguf"]


def test_no_disk_space_leaves_nothing(f32_ggufs, tmp_path, monkeypatch):
    import edgemerge.files

    monkeypatch.setattr(edgemerge.files, "free_bytes", lambda path: 1024)
    with pytest.raises(EdgemergeError, match="not enough disk space"):
        quantize(f32_ggufs["qwen3"], "Q8_0", tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_quantize_exit_codes(f32_ggufs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(f32_ggufs["qwen3"]), "--quant", "Q9_9", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown quantization type 'Q9_9'" in capsys.readouterr().err
    main(["quantize", str(f32_ggufs["qwen3"]), "-q", "Q8_0", "--out-dir", str(tmp_path), "--json"])
    assert '"quant": "Q8_0"' in capsys.readouterr().out
    assert (tmp_path / output_name(f32_ggufs["qwen3"], "Q8_0")).is_file()
    with pytest.raises(SystemExit) as e:  # exists: refuse without --force
        main(["quantize", str(f32_ggufs["qwen3"]), "-q", "Q8_0", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
