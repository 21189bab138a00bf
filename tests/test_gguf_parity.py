"""Byte parity with llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python sdist)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemerge.gguf.inspect import diff_tensors, read_gguf
from edgemerge.pipeline import export_hf

from .arch_fixtures import ARCH_SPECS

_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's converter for the installed llama-cpp-python, fetched once into the user cache."""
    spec = importlib.util.spec_from_file_location("fetch_converter", _ROOT / "tools" / "fetch_converter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.fetch() / "convert_hf_to_gguf.py"
    except (RuntimeError, OSError) as e:  # no network / no sdist for this version
        pytest.skip(f"llama.cpp's converter could not be fetched: {e}")


def _convert(converter: Path, model: Path, out: Path, outtype: str, args: tuple[str, ...] = ()) -> Path:
    r = subprocess.run(
        [sys.executable, str(converter), str(model), "--outfile", str(out), "--outtype", outtype, *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _vocab_keys(kv: dict) -> dict:
    return {k: v for k, v in kv.items() if k.startswith("tokenizer.")}


def _arch_keys(kv: dict) -> dict:
    arch = kv["general.architecture"]
    return {k: v for k, v in kv.items() if k.startswith(f"{arch}.")}


@pytest.mark.parametrize(
    ("arch", "outtype"),
    [(name, out) for name, spec in ARCH_SPECS.items() for out in (spec.parity_outtype, *spec.more_parity)],
)
def test_same_bytes_as_convert_hf_to_gguf(
    arch, outtype, arch_models, f32_ggufs, qwen3_q8_0, converter, tmp_path
):
    """Every tensor byte-identical; vocabulary, special tokens, chat template and hyper-parameters equal."""
    theirs = _convert(
        converter, arch_models[arch], tmp_path / "theirs.gguf", outtype, ARCH_SPECS[arch].converter_args
    )
    ours = (
        f32_ggufs[arch] if outtype == "f32" else qwen3_q8_0 if (arch, outtype) == ("qwen3", "q8_0") else None
    )
    if ours is None:
        ours = export_hf(arch_models[arch], tmp_path / "ours.gguf", outtype=outtype)
    assert diff_tensors(ours, theirs) == []
    a, b = read_gguf(ours).kv, read_gguf(theirs).kv
    assert _vocab_keys(a) == _vocab_keys(b)
    assert _arch_keys(a) == _arch_keys(b)
    assert a["general.file_type"] == b["general.file_type"]
    assert len(read_gguf(ours).tensors) > 10
