"""manifest.json (every file of the folder with its size and sha256, the recipe, the inputs, the tool versions,
the stage times) and eval.json (the full evaluation reports)."""

from __future__ import annotations

import datetime as dt
import platform
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..hashes import sha256_file
from ..public import public_inputs, public_recipe
from .card import file_types, formula, recommended
from .info import PackageInfo

MANIFEST = "manifest.json"
EVAL_JSON = "eval.json"


def tool_versions() -> dict[str, str | None]:
    """Versions of edgemerge and the libraries that shaped the files (llama.cpp through llama-cpp-python)."""
    out: dict[str, str | None] = {"edgemerge": __version__, "python": platform.python_version()}
    for dist in ("llama-cpp-python", "gguf", "torch", "transformers", "safetensors", "mlx"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import llama_cpp

        # llama-cpp-python exposes no llama.cpp build number; the bundled ggml library's file name has its version
        for lib in sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*")):
            m = re.search(r"(\d+\.\d+\.\d+)", lib.name)
            if m:
                out["ggml"] = m.group(1)
        info = llama_cpp.llama_print_system_info()
        out["llama.cpp system_info"] = info.decode() if isinstance(info, bytes) else str(info)
    except Exception:  # noqa: BLE001 (llama.cpp missing or without this call: the version above still says which)
        out["llama.cpp system_info"] = None
    return out


def eval_json(p: PackageInfo) -> dict[str, Any]:
    return {
        "lang": p.lang,
        "gates": p.recipe.eval.thresholds(),
        "files": p.evals,
        "gate_failures": p.gate_failures,
        "parents": {k: v["report"] for k, v in p.parent_evals.items()},
    }


def _recommended(p: PackageInfo) -> dict[str, str | None]:
    types = file_types(p)
    pick, why = recommended(p, types)
    return {"file": pick, "type": types[pick], "why": why}


def manifest(p: PackageInfo, files: list[Path]) -> dict[str, Any]:
    entries = []
    calibrated = set(p.imatrix["files"]) if p.imatrix else set()
    for f in files:
        sha = p.hashes.get(f.name) or sha256_file(f)
        entry: dict[str, Any] = {"name": f.name, "size": f.stat().st_size, "sha256": sha}
        if f.name in p.ggufs:  # which importance matrix made it (None: made without one)
            entry["imatrix"] = p.imatrix["file"] if f.name in calibrated else None
        entries.append(entry)
    return {
        "name": p.recipe.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "demo": p.demo,
        "lang": p.lang,
        "files": entries,
        "recipe": public_recipe(p.recipe),
        "formula": formula(p.recipe) if p.recipe.method == "task_arithmetic" else None,
        "inputs": public_inputs(p.inputs, p.recipe.root),
        "imatrix": p.imatrix,
        "recommended": _recommended(p),
        "sweep": None if p.sweep is None else {"reason": p.sweep["reason"]},
        "quant_ladder": None if p.ladder is None else p.ladder["data"],
        "backend": p.backend,
        "tools": tool_versions(),
        "stages": p.stages,
    }
