"""`edgemerge imatrix` as one library call: choose the calibration texts, check their language, compute the
importance matrix in llama.cpp and write it atomically (nothing at the output path on failure)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgemergeError
from ..files import prepare_output
from ..progress import Progress
from ..runtime import check_gguf
from .collect import Calibration, ImatrixOptions, compute_imatrix
from .files import Imatrix, write_imatrix
from .text import LanguageCheck, bundled_text, check_language, read_text


@dataclass
class ImatrixResult:
    output: Path
    imatrix: Imatrix
    texts: list[dict[str, str]]  # name and language of each text used, in order
    checks: list[LanguageCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def warnings(self) -> list[str]:
        return [c.warning() for c in self.checks if not c.ok]


def calibration_texts(lang: str, files: list[Path], mix: list[str]) -> list[tuple[Calibration, str]]:
    """(text, its expected language): the user's files (in `lang`) or else the bundled text of `lang`, then the
    bundled text of every `mix` language."""
    texts = [(read_text(f), lang) for f in files] or [(bundled_text(lang), lang)]
    for other in mix:
        if other == lang and not files:
            raise EdgemergeError(f"--mix {other} repeats --lang {lang}; mix in another language (e.g. en)")
        texts.append((bundled_text(other), other))
    return texts


def make_imatrix(
    model: Path,
    out: Path,
    *,
    lang: str,
    files: list[Path] | None = None,
    mix: list[str] | None = None,
    options: ImatrixOptions | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ImatrixResult:
    """Compute `model`'s importance matrix on calibration text in `lang` (module docstring) into `out`."""
    start = time.perf_counter()
    check_gguf(model)
    files = list(files or [])
    prepare_output(out, force=force, inputs=[model, *files])
    texts = calibration_texts(lang, files, list(mix or []))
    checks = [check_language(t, want) for t, want in texts]
    imx = compute_imatrix(model, [t for t, _ in texts], options or ImatrixOptions(), progress=progress)
    write_imatrix(out, imx, force=force)
    used = set(imx.datasets)
    return ImatrixResult(
        out,
        imx,
        [{"name": t.name, "lang": want} for t, want in texts if t.name in used],
        checks,
        time.perf_counter() - start,
    )
