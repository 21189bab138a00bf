"""Computing an importance matrix in llama.cpp's own engine, as llama-imatrix does (tools/imatrix/imatrix.cpp).

Tokens: each calibration text is tokenized as one string, with BOS when the model's vocabulary adds one, and cut
into chunks of `chunk_size` tokens (the remainder is dropped); several texts take turns, chunk by chunk. Each
chunk is decoded from an empty KV cache with its first token replaced by BOS (when the model adds BOS) and every
position an output (so the last layer's feed-forward runs on every token). For every multiplication y = W x
that llama-imatrix collects (`matmuls.MatmulObserver`), over the activation rows x_t:

    dense W, matrix m of its ne2 x ne3 stack:   in_sum2[m * n_cols + i] += sum_t x_t[i]^2,   counts[0] += rows / n_mat
    experts (MUL_MAT_ID), expert e chosen for token t:   in_sum2[e * n_cols + i] += x_t[i]^2,   counts[e] += 1

summed here in float64 (llama-imatrix sums in float32, in its own order: the files agree to float32 rounding).
The file records chunk_count = max(counts) // chunk_size, chunk_size, and each text's name as a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgemergeError
from ..limits import check_count, shown
from ..matmuls import MatMul, MatmulObserver
from ..progress import Progress, task
from ..runtime import MIN_CTX, Model
from .files import Entry, Imatrix

DEFAULT_CHUNK = 512  # llama-imatrix's default context (-c)
DEFAULT_BATCH = 512  # tokens per llama_decode; llama-imatrix's -b is 2048, which needs 4x the logits buffer
MAX_CHUNKS = 1 << 20


@dataclass(frozen=True)
class Calibration:
    """A calibration text and the name its imatrix records for it (`imatrix.datasets`)."""

    name: str
    text: str


@dataclass(frozen=True)
class ImatrixOptions:
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk (llama-imatrix -c)
    chunks: int | None = None  # at most this many chunks in all (llama-imatrix --chunks); None: every chunk
    batch: int = DEFAULT_BATCH  # tokens per llama_decode (llama-imatrix -b)
    output: bool = False  # collect output.weight too (llama-imatrix --process-output)
    threads: int | None = None


class Sums:
    """Running statistics per weight: float64 sums [n_mat, n_cols] and int64 counts."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, mm: MatMul) -> None:
        """Add one multiplication's activations (the formulas of the module docstring)."""
        _, _, ne2, ne3 = mm.weight_shape
        x = mm.x  # [ne3', ne2', ne1', cols]
        cols = x.shape[-1]
        if mm.expert_ids is None:
            n_mat = ne2 * ne3
            acc = self._entry(mm.weight, n_mat, cols, 1)
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    m = (i3 % ne3) * ne2 + (i2 % ne2)
                    acc[m] += np.square(x[i3, i2]).sum(axis=0, dtype=np.float64)
            self.counts[mm.weight] += (x.shape[0] * x.shape[1] * x.shape[2]) // n_mat
        else:
            ids = mm.expert_ids  # [n_tokens, n_used]
            acc = self._entry(mm.weight, ne2, cols, ne2)
            if ids.size and (ids.min() < 0 or ids.max() >= ne2):
                raise RuntimeError(f"{mm.weight}: an expert id outside 0..{ne2 - 1}")
            for k in range(ids.shape[1]):
                rows = x[0, :, k % x.shape[2], :]  # [n_tokens, cols]: expert slot k of every token
                np.add.at(acc, ids[:, k], np.square(rows).astype(np.float64))
                self.counts[mm.weight] += np.bincount(ids[:, k], minlength=ne2)
        if not np.all(np.isfinite(acc)):
            raise EdgemergeError(
                f"llama.cpp computed non-finite activations for {shown(mm.weight)}: the model is broken "
                "(check it with edgemerge eval before calibrating it)"
            )

    def _entry(self, name: str, n_mat: int, cols: int, n_counts: int) -> np.ndarray:
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_mat, cols), np.float64)
            self.counts[name] = np.zeros(n_counts, np.int64)
        elif acc.shape != (n_mat, cols) or self.counts[name].size != n_counts:
            raise RuntimeError(f"{name} was multiplied with two different shapes")
        return acc

    def imatrix(self, datasets: list[str], chunk_size: int) -> Imatrix:
        entries = {
            n: Entry(self.sums[n].astype(np.float32).reshape(-1), self.counts[n].copy()) for n in self.sums
        }
        top = max((int(c.max()) for c in self.counts.values()), default=0)
        return Imatrix(entries, list(datasets), top // chunk_size, chunk_size)


def chunk_plan(token_lists: list[list[int]], chunk_size: int, chunks: int | None) -> list[tuple[int, int]]:
    """(text, chunk) pairs in decoding order: the texts take turns, chunk by chunk, up to `chunks` in all."""
    per_text = [len(t) // chunk_size for t in token_lists]
    plan = [(i, c) for c in range(max(per_text, default=0)) for i, n in enumerate(per_text) if c < n]
    return plan if chunks is None else plan[:chunks]


def compute_imatrix(
    model_path: Path,
    texts: list[Calibration],
    options: ImatrixOptions = ImatrixOptions(),
    *,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of `model_path` on `texts` (module docstring), computed by llama.cpp."""
    o = options
    check_count("--chunk-size", o.chunk_size, MIN_CTX, 1 << 20, " tokens")
    check_count("--chunks", o.chunks, 1, MAX_CHUNKS)
    check_count("--batch", o.batch, MIN_CTX, 1 << 20, " tokens")
    if not texts:
        raise EdgemergeError("no calibration text: give --lang with a bundled text or --text FILE")
    with Model(model_path, n_ctx=o.chunk_size, n_threads=o.threads) as model:
        if model.n_ctx < o.chunk_size:
            raise EdgemergeError(
                f"--chunk-size {o.chunk_size} is longer than {model_path.name}'s training context "
                f"({model.n_ctx} tokens); give at most {model.n_ctx}"
            )
        token_lists = [model.tokenize(t.text, add_special=True) for t in texts]
        for t, toks in zip(texts, token_lists, strict=True):
            if len(toks) < o.chunk_size:
                raise EdgemergeError(
                    f"calibration text {t.name} gives {len(toks)} tokens, fewer than one chunk of "
                    f"{o.chunk_size}; give a longer text or a smaller --chunk-size"
                )
        plan = chunk_plan(token_lists, o.chunk_size, o.chunks)
        n_seq = max(1, o.batch // o.chunk_size)
        n_batch = min(o.batch, n_seq * o.chunk_size)
        sums = Sums()
        observer = MatmulObserver(sums.add, output=o.output)
        ctx = model.observed_context(n_seq, o.chunk_size, n_batch, observer)
        try:
            with task(progress, "imatrix", total=len(plan), unit="chunks") as advance:
                for g in range(0, len(plan), n_seq):
                    group = plan[g : g + n_seq]
                    ctx.clear()
                    entries = []
                    for seq, (i, c) in enumerate(group):
                        part = token_lists[i][c * o.chunk_size : (c + 1) * o.chunk_size]
                        if model.add_bos:
                            part = [model.bos, *part[1:]]
                        entries += [(tok, pos, seq, True) for pos, tok in enumerate(part)]
                    try:
                        ctx.decode(entries, keep=False)
                    finally:
                        observer.raise_error()
                    advance(len(group))
        finally:
            ctx.close()
    if not sums.sums:
        raise EdgemergeError(
            f"llama.cpp multiplied no weight of {model_path.name} that an imatrix covers (no blk.* weights)"
        )
    used = sorted({i for i, _ in plan})
    return sums.imatrix([texts[i].name for i in used], o.chunk_size)
