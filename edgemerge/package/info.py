"""What the package step knows about a finished build (read by the card, the manifest and write_package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..recipe import Recipe


def modelfile_gguf(ggufs: list[str]) -> str:
    """The file Ollama runs, of a build's GGUFs (the unquantized one first): the first requested quantization
    (recipe order), else the unquantized file."""
    return ggufs[1] if len(ggufs) > 1 else ggufs[0]


@dataclass
class PackageInfo:
    """What the package step needs to know about a finished build."""

    recipe: Recipe
    out: Path
    lang: str
    ggufs: list[str]  # shipped GGUF file names, the unquantized one first
    inputs: dict[str, dict]  # role -> {"ref", "revision", "files"}
    instruct_dir: Path | None = None  # generation_config.json gives the extra EOS ids
    evals: dict[str, dict] = field(default_factory=dict)  # file name -> EvalReport.to_dict()
    eval_markdown: dict[str, str] = field(default_factory=dict)  # file name -> EvalReport.to_markdown()
    gate_failures: dict[str, list[str]] = field(default_factory=dict)
    parent_evals: dict[str, dict] = field(default_factory=dict)  # e.g. {"instruct": report dict}
    stages: dict[str, dict] = field(default_factory=dict)  # stage name -> {"seconds", "cached"}
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256 already known (big files)
    backend: str | None = None
    demo: bool = False
    imatrix: dict | None = None  # build.calibrate.calibration_info: the importance matrix of the quants
    sweep: dict | None = (
        None  # the sweep that chose the weight: {"markdown", "reason", "plot" (a PNG path), "lang"}
    )
    # the quant ladder that chose the type (build --quant auto): {"markdown", "reason", "plot" (a PNG path),
    # "lang", "ctx" (the context its memory column is for), "data" (the manifest's quant_ladder)}
    ladder: dict | None = None

    @property
    def shipped_imatrix(self) -> str | None:
        """The importance matrix file shipped in the folder (an auto one, computed by the build)."""
        return self.imatrix["file"] if self.imatrix and self.imatrix["mode"] == "auto" else None

    @property
    def modelfile_gguf(self) -> str:
        return modelfile_gguf(self.ggufs)
