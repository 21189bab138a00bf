"""The build's importance matrix: the recipe's `imatrix: auto | none | PATH` (or `build --imatrix`).

auto   computed once per build, after the merge, by llama.cpp (`imatrix.make`) on the bundled calibration text
       of the recipe's languages and English (the evaluation language first, English last: MIX; the texts
       take turns chunk by chunk), in chunks of min(512, training context) tokens; on the unquantized file, or
       on its Q8_0 when the unquantized file does not fit the memory (`plan_imatrix`).
       It ships in the folder as NAME.imatrix.gguf, so anyone can make other types from the same calibration
       with llama-quantize --imatrix.
none   no importance matrix; the types that need one (quantize.NEEDS_IMATRIX) are refused before any work.
PATH   the user's importance matrix file (GGUF or legacy .dat), checked against the merged model.

Every quant whose type uses an importance matrix (`quantize.uses_imatrix`) is made with it, and its cache key
includes the importance matrix's key; Q8_0 and the float types ignore one, so their files are not remade.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EdgemergeError
from ..files import remove_file
from ..hashes import sha256_file
from ..imatrix import read_imatrix
from ..imatrix.collect import DEFAULT_CHUNK, ImatrixOptions
from ..imatrix.make import make_imatrix
from ..imatrix.text import bundled_languages
from ..limits import shown_path
from ..progress import Progress
from ..quantize import NEEDS_IMATRIX, quantize, uses_imatrix
from ..recipe import Recipe
from ..resources import MemoryLimit, ModelShape, eval_memory, fits
from ..sources import local_path
from .state import stage_key

AUTO, NONE = "auto", "none"
# auto mixes English in: on the study's held-out text (README, tools/imatrix_study.py) a Basque-only matrix cost
# English 8-16% more KLD at 2 bits, a Basque+English one kept English within 1-3% of an English-only one and
# Basque within 4-6% of a Basque-only one (better than it at 3 bits)
MIX = ("en",)
SOURCE_QUANT = "Q8_0"  # computed on it when the unquantized file does not fit (Q8_0 ignores an imatrix)


@dataclass(frozen=True)
class ImatrixPlan:
    """What the build does about an importance matrix (module docstring)."""

    mode: str  # auto, none or file
    path: Path | None = None  # the file the quants use (auto: in the output folder)
    users: tuple[str, ...] = ()  # the quants made with it, recipe order
    langs: tuple[str, ...] = ()  # auto: the bundled texts' languages, the first the target
    chunk_size: int = DEFAULT_CHUNK
    source: str | None = None  # auto: the file type it is computed on (the unquantized one or SOURCE_QUANT)
    need: int = 0  # auto: bytes of memory for computing it on `source`
    key: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def computes(self) -> bool:
        return self.mode == AUTO and bool(self.users)


def auto_languages(codes: list[str], lang: str) -> tuple[tuple[str, ...], list[str]]:
    """The languages whose bundled text calibrates an auto imatrix (`lang` first, then the recipe's order, then
    MIX: English, which the instruct model must keep) and a warning for each recipe language without one."""
    have = set(bundled_languages())
    order = [lang] + [c for c in codes if c != lang] if lang in codes else list(codes)
    langs = tuple(c for c in order if c in have)
    if langs:
        langs += tuple(m for m in MIX if m not in langs and m in have)
    missing = [c for c in order if c not in have]
    warnings = [
        f"no bundled calibration text for {c}: the importance matrix is computed on {', '.join(langs)} only; "
        f"for {c}, compute one on your text (edgemerge imatrix --text) and give it as imatrix: PATH"
        for c in missing
        if langs
    ]
    return langs, warnings


def imatrix_mode(recipe: Recipe) -> str:
    """auto, none, or file (the recipe's imatrix names one)."""
    return recipe.imatrix if recipe.imatrix in (AUTO, NONE) else "file"


def check_choice(recipe: Recipe, quants: list[str]) -> str:
    """The mode of the recipe's imatrix (auto, none, file), checked before any work: with none, no type that
    needs one; a file must be a readable importance matrix (a relative path is the recipe folder's; --imatrix
    PATH is made absolute by the command line)."""
    mode = imatrix_mode(recipe)
    if mode == NONE:
        needing = [q for q in quants if q in NEEDS_IMATRIX]
        if needing:
            raise EdgemergeError(
                f"{', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} an importance matrix and the "
                "build has imatrix: none; use imatrix: auto (build --imatrix auto), give a file, or drop it"
            )
    elif mode == "file":
        path = local_path(recipe.imatrix, recipe.root)
        imx = read_imatrix(path)  # unreadable, truncated or not an imatrix: one line from the reader
        if not imx.entries:
            raise EdgemergeError(f"{shown_path(path)} holds no importance matrix entries; compute it again")
    return mode


def imatrix_need(shape: ModelShape, file_bytes: int, chunk_size: int) -> int:
    """Memory for computing an importance matrix on a file of `file_bytes`: one llama.cpp evaluation of one
    sequence of `chunk_size` tokens in one batch (`resources.eval_memory`, the weights included)."""
    parts = eval_memory(
        replace(shape, file_bytes=file_bytes), n_seq=1, n_ctx_seq=chunk_size, n_batch=chunk_size
    )
    return sum(parts.values())


def imatrix_file_bytes(shape: ModelShape) -> int:
    """About the size of an imatrix GGUF: float32 sums per input column of every layer's matrices (attention
    q, k, v and output, ffn gate and up: n_embd columns each; ffn down: n_ff), and a margin for its header."""
    return shape.n_layer * (6 * shape.n_embd + shape.n_ff) * 4 + (64 << 10)


def plan_imatrix(
    recipe: Recipe,
    quants: list[str],
    *,
    lang: str,
    shape: ModelShape,
    sizes: dict[str, int],
    limit: MemoryLimit,
    n_ctx_train: int | None,
    merge_key: str,
    out_file: Path,
    llama_version: str | None,
) -> ImatrixPlan:
    """The build's importance matrix (module docstring), once `check_choice` has passed; auto without bundled
    text in any recipe language is an EdgemergeError before any work.

    `sizes`: expected bytes of the unquantized file ("float") and of its SOURCE_QUANT ("source")."""
    mode = imatrix_mode(recipe)
    if mode == NONE:
        return ImatrixPlan(NONE)
    users = tuple(q for q in quants if uses_imatrix(q))
    if mode == "file":
        path = local_path(recipe.imatrix, recipe.root)
        # the quants record the file's name: it is part of the key with the content
        return ImatrixPlan("file", path, users, key=stage_key("imatrix file", path.name, sha256_file(path)))
    langs, warnings = auto_languages(recipe.lang_codes, lang)
    if not users:
        return ImatrixPlan(AUTO, warnings=warnings)
    if not langs:
        raise EdgemergeError(
            f"imatrix: auto needs bundled calibration text in one of the recipe's languages "
            f"({', '.join(recipe.lang_codes)}; bundled: {', '.join(bundled_languages())}); compute one on your "
            "text (edgemerge imatrix MODEL.gguf --lang LANG --text FILE) and give it as imatrix: PATH, or use "
            "imatrix: none"
        )
    chunk = min(DEFAULT_CHUNK, n_ctx_train or DEFAULT_CHUNK)
    need_float = imatrix_need(shape, sizes["float"], chunk)
    source, need = "float", need_float
    if not fits(need_float, limit):
        source, need = SOURCE_QUANT, imatrix_need(shape, sizes["source"], chunk)
    key = stage_key("imatrix", __version__, merge_key, langs, chunk, source, llama_version)
    return ImatrixPlan(AUTO, out_file, users, langs, chunk, source, need, key, warnings)


def compute_build_imatrix(
    plan: ImatrixPlan,
    merged: Path,
    source_file: Path | None,
    *,
    threads: int | None,
    progress: Progress | None,
) -> None:
    """The auto stage: the importance matrix of `merged` (or of `source_file`, its Q8_0, made here first when it
    does not exist yet and removed after) written to `plan.path`."""
    assert plan.path is not None and plan.langs
    model, made = merged, None
    if plan.source == SOURCE_QUANT:
        assert source_file is not None
        if not source_file.is_file():
            source_file.parent.mkdir(parents=True, exist_ok=True)
            made = quantize(merged, SOURCE_QUANT, source_file, threads=threads, force=True, progress=progress)
        model = source_file
    try:
        options = ImatrixOptions(chunk_size=plan.chunk_size, threads=threads)
        make_imatrix(
            model,
            plan.path,
            lang=plan.langs[0],
            mix=list(plan.langs[1:]),
            options=options,
            force=True,
            progress=progress,
        )
    finally:
        if made is not None:
            remove_file(made)


def calibration_info(plan: ImatrixPlan, computed_on: str | None, files: list[str]) -> dict[str, Any] | None:
    """What the card and manifest say about the importance matrix: its file, texts, chunks, the GGUF it was
    computed on and the quants made with it (their types and `files`); None when no quant used one."""
    if plan.path is None or not plan.users:
        return None
    imx = read_imatrix(plan.path)
    return {
        "file": plan.path.name,
        "mode": plan.mode,
        "texts": list(imx.datasets),
        "chunks": imx.chunk_count,
        "chunk_size": imx.chunk_size,
        "computed_on": computed_on,
        "quants": list(plan.users),
        "files": files,
    }
