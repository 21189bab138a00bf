"""The shippable folder: model card (README.md), Ollama Modelfile, eval.json and manifest.json.

Everything is derived from the built GGUF files (chat template, BOS/EOS/EOT tokens read from their metadata),
the instruct model's generation settings, the recipe and the evaluation reports; the manifest is written last
and lists every other file of the folder with its size and sha256. card.py, modelfile.py and manifest.py make
one file each. The function `modelfile` re-exported here shadows its module as an attribute of the package: reach
the module with `from edgemerge.package.modelfile import ...`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import EdgemergeError
from ..evaluate.prompts import language_info
from ..files import MARKER, atomic_output
from .card import CARD, DEMO_NOTE, LADDER_PLOT, SWEEP_PLOT, fill_repo, front_matter, model_card
from .info import PackageInfo
from .manifest import EVAL_JSON, MANIFEST, eval_json, tool_versions
from .manifest import manifest as manifest_data
from .modelfile import MODELFILE, ChatInfo, chat_info, modelfile, parse_modelfile_stops

__all__ = [
    "CARD",
    "DEMO_NOTE",
    "EVAL_JSON",
    "LADDER_PLOT",
    "MANIFEST",
    "MODELFILE",
    "SWEEP_PLOT",
    "ChatInfo",
    "PackageInfo",
    "chat_info",
    "fill_repo",
    "foreign_files",
    "front_matter",
    "model_card",
    "modelfile",
    "parse_modelfile_stops",
    "tool_versions",
    "write_package",
]


def write_package(p: PackageInfo, *, system: str | None = None) -> tuple[list[Path], list[str]]:
    """Write README.md, Modelfile, eval.json, then manifest.json; return (files written, warnings)."""

    if system is None:
        try:
            system = language_info(p.lang)["system"]
        except EdgemergeError:
            system = None
    warnings = []
    info = chat_info(p.out / p.modelfile_gguf, p.instruct_dir)
    mf, warn = modelfile(p.modelfile_gguf, info, system)
    if warn:
        warnings.append(warn)
    shipped = p.ggufs + ([p.shipped_imatrix] if p.shipped_imatrix else [])
    for info, name in ((p.sweep, SWEEP_PLOT), (p.ladder, LADDER_PLOT)):
        if info is not None:  # the plot travels with the card that shows it
            with atomic_output(p.out / name, force=True) as tmp:
                shutil.copyfile(info["plot"], tmp)
            shipped.append(name)
    texts = {
        CARD: model_card(p),
        MODELFILE: mf,
        EVAL_JSON: json.dumps(eval_json(p), indent=2, ensure_ascii=False, default=str) + "\n",
    }
    for name, text in texts.items():
        with atomic_output(p.out / name, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    files = [p.out / n for n in shipped] + [p.out / n for n in texts]
    data = manifest_data(p, files)
    with atomic_output(p.out / MANIFEST, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    files.append(p.out / MANIFEST)
    foreign = foreign_files(p.out, files)
    if foreign:
        warnings.append(
            f"{p.out} also holds {', '.join(foreign)}, which edgemerge did not write and manifest.json does not "
            "list: move them out before uploading the folder"
        )
    return files, warnings


def foreign_files(out: Path, files: list[Path]) -> list[str]:
    """Names in the folder `out` that are neither the build's `files` nor edgemerge's marker (a user's file kept
    by --force, which never deletes what it did not write)."""
    ours = {f.name for f in files} | {MARKER}
    return sorted(p.name for p in out.iterdir() if p.name not in ours)
