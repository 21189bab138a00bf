"""llama.cpp's own tools built by tools/build_llama_tools.py: they run, and come from the bindings' llama.cpp."""

from __future__ import annotations

import os
import subprocess

from .llama_tools import builder, need_tool


def test_built_tools_run_and_match_the_bindings_version():
    quantize = need_tool("llama-quantize")
    r = subprocess.run([quantize, "--help"], check=False, capture_output=True, text=True, timeout=60)
    # llama-quantize prints its usage and exits 1 on --help; the table of types shows it is the real tool
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("usage:") and " Q4_K_M " in r.stdout and " IQ2_XS " in r.stdout

    import llama_cpp  # heavy: loads libllama

    r = subprocess.run(
        [need_tool("llama-imatrix"), "--version"], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    # llama.cpp prints "version: <llama_version()> (build N, commit X)" to stderr
    assert f"version: {llama_cpp.llama_version().decode()} " in r.stderr + r.stdout


def _fake_bin(folder, names) -> None:
    folder.mkdir(parents=True)
    for n in names:
        (folder / n).write_text("#!/bin/sh\n")
        os.chmod(folder / n, 0o755)


def test_a_partial_build_never_looks_built_and_a_finished_one_is_not_rebuilt(tmp_path, monkeypatch):
    mod = builder()
    monkeypatch.setenv("EDGEMERGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "")  # no cmake or compiler: reaching the build step would raise
    root = tmp_path / "llama-tools-9.9.9"
    _fake_bin(root / "bin.partial", mod.TOOLS)
    assert mod.tools_dir("9.9.9") == root
    assert mod.tool_path("llama-imatrix", "9.9.9") is None
    (root / "bin.partial").rename(root / "bin")
    assert mod.tool_path("llama-imatrix", "9.9.9") == root / "bin" / "llama-imatrix"
    assert mod.build("9.9.9") == root / "bin"
