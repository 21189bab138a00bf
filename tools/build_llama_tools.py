"""Build llama.cpp's own command-line tools (llama-imatrix, llama-quantize, llama-perplexity, llama-gguf-split) for
parity tests.

They are built from the llama.cpp that the installed llama-cpp-python vendors: we download that version's
source distribution from PyPI with pip, extract vendor/llama.cpp into
`~/.cache/edgemerge/llama-tools-<version>/src` (`EDGEMERGE_CACHE` moves the root), build the three targets with
cmake (CPU only, Release, static libraries, 2 jobs) and copy them to `.../llama-tools-<version>/bin/`.
Needs cmake and a C++17 compiler; it takes minutes, so tests never call it: they skip until it has been run.

    python tools/build_llama_tools.py          # builds (if needed) and prints the bin folder
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-gguf-split")

_VENDOR = "vendor/llama.cpp/"
# top-level folders of vendor/llama.cpp the build never reads (vocabularies, docs, disabled targets)
_SKIP = ("models/", "docs/", "media/", "benches/", "examples/", "pocs/", "tests/", ".github/", ".git")

# standalone static build of the tools only; OpenSSL off because nothing here downloads (LLAMA_CURL is gone)
_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def tools_dir(version: str | None = None) -> Path:
    root = Path(os.environ.get("EDGEMERGE_CACHE", Path.home() / ".cache" / "edgemerge"))
    return root / f"llama-tools-{version or llama_cpp_version()}"


def tool_path(name: str, version: str | None = None) -> Path | None:
    """The built binary `name` (e.g. "llama-imatrix"), or None when the tools have not been built."""
    p = tools_dir(version) / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest)]
    r = subprocess.run([*cmd, f"llama-cpp-python=={version}"], check=False, capture_output=True, text=True)
    sdists = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode != 0 or not sdists:
        raise RuntimeError(f"pip download failed: {r.stderr.strip()[-500:]}")
    return sdists[0]


def _extract_source(version: str, src: Path) -> None:
    """vendor/llama.cpp of the sdist into `src`, written under a .partial name and renamed when complete."""
    staging = src.with_name(src.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download_sdist(version, Path(tmp))
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith(_VENDOR):
                    continue
                rel = parts[1][len(_VENDOR) :]
                if rel and not rel.startswith(_SKIP) and (m.isfile() or m.isdir()):
                    m.name = rel
                    tar.extract(m, staging, filter="data")
    if not (staging / "CMakeLists.txt").exists() or not (staging / "tools" / "imatrix").is_dir():
        raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp with tools/imatrix")
    staging.rename(src)


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}); full log: {log}\n" + "\n".join(tail))


def build(version: str | None = None, jobs: int = 2) -> Path:
    """Build the tools if they are not built yet; return the bin folder. Raises RuntimeError on failure.

    The bin folder appears only when every binary is in it (written as bin.partial, then renamed), and a lock
    file keeps two builds of the same version from running at once.
    """
    version = version or llama_cpp_version()
    root = tools_dir(version)
    bin_dir = root / "bin"
    if all(tool_path(t, version) for t in TOOLS):
        return bin_dir
    for prog in ("cmake", "c++"):
        if shutil.which(prog) is None:
            raise RuntimeError(f"{prog} is not installed: install cmake and a C++17 compiler, then run again")
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build finishes first; then we find its bin folder
        if all(tool_path(t, version) for t in TOOLS):
            return bin_dir
        src, build_dir, log = root / "src", root / "build", root / "build.log"
        if not (src / "CMakeLists.txt").exists():
            _extract_source(version, src)
        log.write_text("", encoding="utf-8")
        _run(["cmake", "-S", str(src), "-B", str(build_dir), *_CMAKE_OPTIONS], log)
        _run(
            ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
            log,
        )
        staging = root / "bin.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for t in TOOLS:
            found = build_dir / "bin" / t
            if not found.is_file():
                raise RuntimeError(f"the build finished but {found} is missing; full log: {log}")
            shutil.copy2(found, staging / t)
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging.rename(bin_dir)
    return bin_dir


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    ver = args[0] if args else None
    if not all(tool_path(t, ver) for t in TOOLS):
        print(f"building {', '.join(TOOLS)} (log: {tools_dir(ver) / 'build.log'})", file=sys.stderr)
    try:
        folder = build(ver)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(folder)
