"""Quantization through llama.cpp: same bytes as its quantizer called directly, files load and generate,
bad inputs fail in one line with nothing at the output path."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemerge.cli import main
from edgemerge.demo import DATA_DIR
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.inspect import diff_tensors, kv, read_gguf, tensors
from edgemerge.imatrix import importance, read_imatrix, write_imatrix
from edgemerge.quantize import (
    KEY_IMATRIX_CHUNKS,
    KEY_IMATRIX_DATASET,
    KEY_IMATRIX_ENTRIES,
    KEY_IMATRIX_FILE,
    NEEDS_IMATRIX,
    NOT_OFFERED,
    last_line,
    output_name,
    quant_types,
    quantize,
    run_quantizer,
    uses_imatrix,
)

from .llama_tools import need_tool
from .reference_llama import reference_llama

pytest.importorskip("llama_cpp")

TEXT = "Gaur goizean mendira joan gara eta eguraldi ederra izan dugu. The weather was fine and we walked for hours."


@pytest.fixture(scope="module")
def quantized(f32_ggufs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    src = f32_ggufs["qwen3"]
    return {q: quantize(src, q, root / output_name(src, q)) for q in ("Q4_K_M", "Q8_0")}


def _direct_llama_cpp_quantize(src: Path, dst: Path, ftype: int, *, ok: bool = True) -> int:
    """llama.cpp's quantizer with its default parameters, in a fresh process (what llama-quantize does); its
    exit code (`ok`: it must succeed)."""
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
    assert r.returncode == 0 or not ok, r.stderr[-2000:]
    return r.returncode


def test_same_bytes_as_llama_cpp_quantizer(quantized, f32_ggufs, tmp_path):
    theirs = tmp_path / "theirs.gguf"
    _direct_llama_cpp_quantize(f32_ggufs["qwen3"], theirs, quant_types()["Q4_K_M"])
    assert quantized["Q4_K_M"].read_bytes() == theirs.read_bytes()
    types = {t.name: t.type for t in tensors(quantized["Q4_K_M"])}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert kv(quantized["Q4_K_M"])["general.file_type"] == quant_types()["Q4_K_M"]


def test_quantized_files_load_and_generate(quantized, f32_ggufs):

    def logits(path: Path) -> tuple[np.ndarray, list[int]]:
        llm = reference_llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
        ids = llm.tokenize(TEXT.encode())
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)]), llm

    ref, _ = logits(f32_ggufs["qwen3"])
    q8, llm = logits(quantized["Q8_0"])
    # random-weight fixtures keep about 0.95 top-1 agreement at Q8_0 (near-tied logits); the bar is lower
    assert np.mean(ref.argmax(-1) == q8.argmax(-1)) >= 0.8
    assert quantized["Q8_0"].stat().st_size < f32_ggufs["qwen3"].stat().st_size / 3
    for path in quantized.values():
        llm = reference_llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        out = llm("Kaixo", max_tokens=8, temperature=0.0, top_k=1)
        assert out["usage"]["completion_tokens"] > 0


def test_types_not_offered_are_those_llama_cpp_or_gguf_py_cannot_handle(f32_ggufs, tmp_path):
    """NVFP4: llama.cpp's quantizer refuses it; Q2_0: it writes the file but gguf-py cannot read it back."""
    import llama_cpp

    assert set(NOT_OFFERED) == {"NVFP4", "Q2_0"}
    src = f32_ggufs["qwen3"]
    assert _direct_llama_cpp_quantize(src, tmp_path / "n.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_NVFP4, ok=False)
    assert _direct_llama_cpp_quantize(src, tmp_path / "q.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_0) == 0
    with pytest.raises(EdgemergeError, match="unknown type 42"):
        read_gguf(tmp_path / "q.gguf")
    for name in NOT_OFFERED:
        assert name not in quant_types()
        with pytest.raises(EdgemergeError, match=f"unknown quantization type '{name}'"):
            quantize(src, name, tmp_path / "y.gguf")


def test_llama_cpp_s_reason_reaches_the_caller(f32_ggufs, tmp_path):
    """The quantizer child's log (errors only) is read: its last line says why llama.cpp failed."""
    import llama_cpp

    rc, said = run_quantizer(f32_ggufs["qwen3"], tmp_path / "x.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_NVFP4, 1)
    assert rc != 0 and said == "failed to quantize: invalid output file type 39"
    assert last_line("a: one\n\nllama_x: two \n") == "two" and last_line("") == ""


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


# --- with an importance matrix ---


@pytest.fixture(scope="module")
def imatrices(f32_ggufs, random_imatrix, tmp_path_factory) -> dict[str, Path]:
    """Two random imatrices of the qwen3 fixture (every block weight), "a" and "b"."""
    root = tmp_path_factory.mktemp("imatrices")
    src = f32_ggufs["qwen3"]
    return {
        k: write_imatrix(root / f"{k}.imatrix.gguf", random_imatrix(src, seed))
        for k, seed in (("a", 1), ("b", 2))
    }


@pytest.fixture(scope="module")
def with_imatrix(f32_ggufs, imatrices, tmp_path_factory):
    """`made(quant, "a" | "b")`: the qwen3 fixture quantized with that imatrix (made once: IQ2 types take
    seconds each, most of it llama.cpp building its grids)."""
    root = tmp_path_factory.mktemp("quant-imatrix")
    done: dict[tuple[str, str], Path] = {}

    def made(quant: str, which: str) -> Path:
        if (quant, which) not in done:
            out = root / f"{quant}-{which}.gguf"
            done[quant, which] = quantize(f32_ggufs["qwen3"], quant, out, imatrix=imatrices[which])
        return done[quant, which]

    return made


@pytest.mark.parametrize("quant", sorted(NEEDS_IMATRIX))
def test_llama_cpp_refuses_these_types_without_an_imatrix(quant, f32_ggufs, tmp_path):
    """NEEDS_IMATRIX is llama.cpp's own list: its quantizer fails on each of them without an imatrix."""
    assert (
        _direct_llama_cpp_quantize(f32_ggufs["qwen3"], tmp_path / "x.gguf", quant_types()[quant], ok=False)
        != 0
    )
    with pytest.raises(
        EdgemergeError, match=rf"{quant} needs an importance matrix: compute one \(edgemerge imatrix"
    ):
        quantize(f32_ggufs["qwen3"], quant, tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("quant", ["IQ2_M", "IQ3_XXS", "Q2_K_S"])
def test_imatrix_quants_are_made_with_the_imatrix(quant, with_imatrix, imatrices):

    a, b = with_imatrix(quant, "a"), with_imatrix(quant, "b")
    changed = diff_tensors(a, b)  # the imatrix is used: another one moves the quantized blocks
    assert changed and all(line.startswith("blk.") and "bytes differ" in line for line in changed)
    meta = kv(a)
    assert meta["general.file_type"] == quant_types()[quant]
    assert meta[KEY_IMATRIX_FILE] == str(imatrices["a"])
    assert meta[KEY_IMATRIX_DATASET] == "calibration-1.txt"
    assert meta[KEY_IMATRIX_ENTRIES] == len(read_imatrix(imatrices["a"]).entries)
    assert meta[KEY_IMATRIX_CHUNKS] == 4
    llm = reference_llama(str(a), n_ctx=128, n_threads=2, verbose=False)
    assert llm("Kaixo", max_tokens=4, temperature=0.0, top_k=1)["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("quant", ["IQ2_M", "Q2_K_S"])
def test_same_imatrix_same_bytes(quant, with_imatrix, f32_ggufs, imatrices, tmp_path):
    again = quantize(f32_ggufs["qwen3"], quant, tmp_path / "again.gguf", imatrix=imatrices["a"], threads=1)
    assert again.read_bytes() == with_imatrix(quant, "a").read_bytes()  # whatever the thread count


def test_imatrix_changes_a_k_quant(quantized, f32_ggufs, imatrices, tmp_path):
    """An imatrix is used for every type, not only those that need one."""
    out = quantize(f32_ggufs["qwen3"], "Q4_K_M", tmp_path / "q.gguf", imatrix=imatrices["a"])
    assert diff_tensors(quantized["Q4_K_M"], out)


@pytest.mark.parametrize(
    "quant", ["Q8_0", "TQ1_0", "TQ2_0", "Q1_0", "Q4_0", "Q5_1", "Q6_K", "IQ4_NL", "Q3_K_M"]
)
def test_uses_imatrix_says_which_types_an_imatrix_changes(quant, f32_ggufs, imatrices, tmp_path):
    """uses_imatrix is what llama.cpp does: with an imatrix, the tensors of exactly those types change (the
    quantize.imatrix.* keys are written either way)."""
    src = f32_ggufs["qwen3"]
    plain = quantize(src, quant, tmp_path / "plain.gguf")
    calibrated = quantize(src, quant, tmp_path / "calibrated.gguf", imatrix=imatrices["a"])
    assert bool(diff_tensors(plain, calibrated)) == uses_imatrix(quant)


def test_legacy_dat_imatrix_quantizes_like_the_gguf(with_imatrix, f32_ggufs, imatrices, tmp_path):
    """A legacy .dat file holding the same weights (values w with ncall 1) gives the same tensors."""
    imx = read_imatrix(imatrices["a"])
    dat = tmp_path / "a.dat"
    with dat.open("wb") as f:
        f.write(struct.pack("<i", len(imx.entries)))
        for name in sorted(imx.entries):
            w = importance(imx.entries[name])
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 1, w.size))
            f.write(w.astype("<f4").tobytes())
        f.write(struct.pack("<ii", 4, 6) + b"eu.txt")
    from_dat = quantize(f32_ggufs["qwen3"], "Q2_K_S", tmp_path / "d.gguf", imatrix=dat)
    assert diff_tensors(with_imatrix("Q2_K_S", "a"), from_dat) == []
    assert kv(from_dat)[KEY_IMATRIX_DATASET] == "eu.txt"
    # and as llama.cpp's own tool reads it (when built)
    tool = need_tool("llama-quantize")
    theirs = _llama_quantize(tool, f32_ggufs["qwen3"], tmp_path / "theirs.gguf", "Q2_K_S", dat)
    assert from_dat.read_bytes() == theirs.read_bytes()


def test_cli_imatrix_errors_and_success(f32_ggufs, imatrices, random_imatrix, with_imatrix, tmp_path, cli):
    src = f32_ggufs["qwen3"]
    out = tmp_path / "out"
    code, _, err = cli("quantize", src, "-q", "IQ2_M", "--out-dir", out)
    assert (
        code == 2
        and "IQ2_M needs an importance matrix: compute one (edgemerge imatrix MODEL.gguf --lang LANG)" in err
    )
    assert len(err.strip().splitlines()) == 1
    other = random_imatrix(src, 3)
    other.entries["blk.2.attn_q.weight"] = other.entries.pop("blk.1.attn_q.weight")  # as from a deeper model
    other_file = write_imatrix(tmp_path / "other.imatrix.gguf", other)
    code, _, err = cli(
        "quantize", src, "-q", "IQ2_M", "-q", "Q4_K_M", "--imatrix", other_file, "--out-dir", out
    )
    assert code == 2 and "'blk.2.attn_q.weight', a tensor the model lacks" in err
    wide = random_imatrix(src, 3)
    wide.entries["blk.0.ffn_up.weight"] = wide.entries["blk.0.ffn_down.weight"]  # 512 columns, the model 256
    wide_file = write_imatrix(tmp_path / "wide.imatrix.gguf", wide)
    code, _, err = cli("quantize", src, "-q", "IQ2_M", "--imatrix", wide_file, "--out-dir", out)
    assert code == 2 and "blk.0.ffn_up.weight takes 256 columns" in err and "has 512 columns" in err
    cut = tmp_path / "cut.imatrix.gguf"
    cut.write_bytes(imatrices["a"].read_bytes()[:-100])
    code, _, err = cli("quantize", src, "-q", "IQ2_M", "--imatrix", cut, "--out-dir", out)
    assert code == 2 and "truncated" in err
    assert not out.exists()  # nothing written by any refusal
    code, stdout, _ = cli(
        "quantize", src, "-q", "Q2_K_S", "--imatrix", imatrices["a"], "--out-dir", out, "--json"
    )
    assert code == 0 and json.loads(stdout)["imatrix"] == str(imatrices["a"])
    assert (out / output_name(src, "Q2_K_S")).read_bytes() == with_imatrix("Q2_K_S", "a").read_bytes()


def _llama_quantize(tool: Path, src: Path, dst: Path, quant: str, imatrix: Path) -> Path:
    r = subprocess.run(
        [str(tool), "--imatrix", str(imatrix), str(src), str(dst), quant, "2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


@pytest.mark.parametrize("quant", ["IQ2_M", "IQ3_XXS", "Q3_K_M"])
def test_same_bytes_as_llama_quantize_with_imatrix(quant, with_imatrix, f32_ggufs, imatrices, tmp_path):
    """llama.cpp's own tool with --imatrix (built from the vendored sources) writes the bytes we write."""
    tool = need_tool("llama-quantize")
    ours = with_imatrix(quant, "a")
    theirs = _llama_quantize(tool, f32_ggufs["qwen3"], tmp_path / "theirs.gguf", quant, imatrices["a"])
    assert diff_tensors(ours, theirs) == []
    assert kv(ours) == kv(theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_llama_imatrix_file_quantizes_as_llama_quantize(f32_ggufs, tmp_path):
    """An imatrix computed by llama-imatrix: edgemerge quantize --imatrix gives llama-quantize's bytes."""
    imatrix_tool, quantize_tool = need_tool("llama-imatrix"), need_tool("llama-quantize")
    src = f32_ggufs["qwen3"]
    text = tmp_path / "eu.txt"
    text.write_text((DATA_DIR / "eu.txt").read_text(encoding="utf-8") * 4, encoding="utf-8")
    imx = tmp_path / "eu.imatrix.gguf"
    cmd = [str(imatrix_tool), "-m", str(src), "-f", str(text), "-o", str(imx), "-c", "64", "--chunks", "4"]
    r = subprocess.run([*cmd, "-t", "2"], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = quantize(src, "Q2_K_S", tmp_path / "ours.gguf", imatrix=imx)
    theirs = _llama_quantize(quantize_tool, src, tmp_path / "theirs.gguf", "Q2_K_S", imx)
    assert ours.read_bytes() == theirs.read_bytes()
    assert kv(ours)[KEY_IMATRIX_DATASET] == str(text) and kv(ours)[KEY_IMATRIX_CHUNKS] == 4
