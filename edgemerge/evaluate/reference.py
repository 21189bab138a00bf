"""A reference model's log-probabilities stored on disk, in llama.cpp's own `llama-perplexity
--kl-divergence-base` file format, so that each quant is compared with its unquantized file without loading both.

File layout (little-endian, as tools/perplexity/perplexity.cpp writes and reads it):

    "_logits_"  n_ctx: uint32  n_vocab: int32  n_chunk: int32  tokens: int32[n_ctx * n_chunk]
    then for every chunk, for each of its n_ctx - 1 - n_ctx/2 scored positions, one record of
    nv = 2 * ((n_vocab + 1) // 2) + 4 uint16: float32 scale, float32 min_log_prob, n_vocab uint16 (+ padding)

Encoding of one position's logits x (llama.cpp's `log_softmax` with a uint16 output):

    max = max(x), lo = max(min(x), max - 16), lse = log(sum(exp(x - max)))
    scale = (max - lo) / 65535,  min_log_prob = lo - max - lse,  u_v = round((x_v - lo) / scale) (0 if x_v <= lo)
    log p_v = scale * u_v + min_log_prob

After the chunks, edgemerge appends a trailer that llama.cpp's reader never reaches (it reads what the header
describes): the exact -log p_ref(target) of every scored position as float32, then "_em_nll_". A file without
it (made by llama-perplexity) is read too; the reference's perplexity then comes from the records.

How exact: every token within 16 nats of the most likely one keeps its log-probability to within scale / 2
<= 16 / 65535 / 2 = 1.2e-4 nats; less likely tokens read as min_log_prob (<= -16). The KL divergence, as llama.cpp
computes it, sums only the tokens with log p_ref > -16 (each left out has p_ref < 1.2e-7); each KL term is then
within ~1.2e-4 nats of the one from live logits, and the reference's perplexity (from the trailer) is exact to
float32. The tests measure both on a real model.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgemergeError
from ..files import atomic_output
from ..limits import shown_path
from ..runtime import log_softmax
from .perplexity import nll

MAGIC = b"_logits_"
TRAILER = b"_em_nll_"
HEADER = struct.Struct("<8sIii")
LOG_RANGE = 16.0  # nats below the top logit that are kept (llama.cpp's)
MAX_VOCAB = 1 << 24
MAX_CTX = 1 << 24
_ROWS = 32  # positions converted at a time: float64 temporaries stay a few MB for any vocabulary


def record_len(n_vocab: int) -> int:
    """uint16 per position: the two float32 (4 uint16) and the vocabulary rounded up to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_positions(n_ctx: int) -> int:
    """Positions scored per chunk (perplexity.py: the second half, less the last position)."""
    return n_ctx - 1 - n_ctx // 2


def _row_blocks(n: int) -> Iterator[slice]:
    for i in range(0, n, _ROWS):
        yield slice(i, min(n, i + _ROWS))


def encode(logits: np.ndarray) -> np.ndarray:
    """Records (uint16, shape [n, record_len(n_vocab)]) of logits [n, n_vocab] (module docstring)."""
    n, n_vocab = logits.shape
    out = np.zeros((n, record_len(n_vocab)), np.uint16)
    for rows in _row_blocks(n):
        x = logits[rows].astype(np.float32)
        mx = x.max(axis=-1)
        lo = np.maximum(x.min(axis=-1), mx - np.float32(LOG_RANGE))
        lse = np.log(np.exp((x - mx[:, None]).astype(np.float64)).sum(axis=-1)).astype(np.float32)
        scale = ((mx - lo) / np.float32(65535)).astype(np.float32)
        head = np.stack([scale, (lo - mx - lse).astype(np.float32)], axis=1)
        out[rows, :4] = head.view(np.uint16)
        safe = np.where(scale > 0, scale, np.float32(1))[:, None]
        u = np.rint((x - lo[:, None]) / safe)  # llama.cpp's nearest_int: round half to even, as rint
        u = np.where((x > lo[:, None]) & (scale[:, None] > 0), u, 0)
        out[rows, 4 : 4 + n_vocab] = np.clip(u, 0, 65535).astype(np.uint16)
    return out


def decode(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """Reference log-probabilities (float64, [n, n_vocab]) back from records."""
    head = np.ascontiguousarray(records[:, :4]).view(np.float32)
    scale, min_lp = head[:, 0:1].astype(np.float64), head[:, 1:2].astype(np.float64)
    return scale * records[:, 4 : 4 + n_vocab].astype(np.float64) + min_lp


@dataclass
class Comparison:
    """Per scored position: KL(ref || model), whether the top tokens agree, and both models' -log p(target)."""

    kld: np.ndarray
    same_top: np.ndarray
    nll: np.ndarray
    nll_ref: np.ndarray


def compare(
    logits: np.ndarray, targets: np.ndarray, records: np.ndarray, nll_ref: np.ndarray | None = None
) -> Comparison:
    """The model's logits at the scored positions against the stored reference (llama.cpp's kl-divergence):

    KL = sum over v with log p_ref(v) > -16 of p_ref(v) * (log p_ref(v) - log q(v)), top-1 agreement on
    argmax q == argmax log p_ref, nll = -log q(target), nll_ref = -log p_ref(target) (from the records unless
    the exact values are given).
    """
    n, n_vocab = logits.shape
    parts: list[tuple[np.ndarray, ...]] = []
    for rows in _row_blocks(n):
        lq = log_softmax(logits[rows])
        lp = decode(records[rows], n_vocab)
        keep = lp > -LOG_RANGE
        kld = np.where(keep, np.exp(lp) * (lp - lq), 0.0).sum(axis=-1)
        idx = np.arange(rows.stop - rows.start)
        t = targets[rows]
        same = lq.argmax(axis=-1) == lp.argmax(axis=-1)
        parts.append((kld, same, -lq[idx, t], -lp[idx, t]))
    cat = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros(0)] * 4
    if nll_ref is not None:
        cat[3] = nll_ref
    return Comparison(*cat)


@dataclass(frozen=True)
class RefHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def data_offset(self) -> int:
        return HEADER.size + 4 * self.n_ctx * self.n_chunk

    @property
    def chunk_bytes(self) -> int:
        return scored_positions(self.n_ctx) * record_len(self.n_vocab) * 2

    @property
    def file_size(self) -> int:
        """Without edgemerge's trailer (the size llama.cpp writes)."""
        return self.data_offset + self.n_chunk * self.chunk_bytes

    @property
    def trailer_size(self) -> int:
        return 4 * self.n_chunk * scored_positions(self.n_ctx) + len(TRAILER)


class StoredReference:
    """A reference file opened for reading: its header and tokens checked, chunks read one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        name = shown_path(self.path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise EdgemergeError(f"cannot read the reference logits {name}: {e.strerror or e}") from None
        try:
            size = os.fstat(self._f.fileno()).st_size
            raw = self._f.read(HEADER.size)
            if len(raw) < HEADER.size or raw[:8] != MAGIC:
                raise EdgemergeError(
                    f"{name} is not a reference-logits file (llama-perplexity --kl-divergence-base format); "
                    "make one with `edgemerge eval REF.gguf --save-logits FILE`"
                )
            _, n_ctx, n_vocab, n_chunk = HEADER.unpack(raw)
            if not (16 <= n_ctx <= MAX_CTX and 1 <= n_vocab <= MAX_VOCAB and 1 <= n_chunk <= size):
                raise EdgemergeError(
                    f"{name} has an impossible header (context {n_ctx}, vocabulary {n_vocab}, {n_chunk} chunks)"
                )
            h = self.header = RefHeader(n_ctx, n_vocab, n_chunk)
            self.nll_ref: np.ndarray | None = None
            if size == h.file_size + h.trailer_size:
                self._f.seek(size - len(TRAILER))
                if self._f.read(len(TRAILER)) == TRAILER:
                    self._f.seek(h.file_size)
                    self.nll_ref = np.fromfile(
                        self._f, dtype="<f4", count=(h.trailer_size - len(TRAILER)) // 4
                    )
            if size != h.file_size and self.nll_ref is None:
                raise EdgemergeError(
                    f"{name} is {size} bytes, but its header describes {h.file_size}: the file is "
                    "truncated or damaged; make it again with --save-logits"
                )
            self._f.seek(HEADER.size)
            self.tokens = np.fromfile(self._f, dtype="<i4", count=n_ctx * n_chunk)
            if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= n_vocab):
                raise EdgemergeError(f"{name} holds token ids outside its vocabulary of {n_vocab}")
        except BaseException:
            self._f.close()
            raise

    def chunk_nll(self, i: int) -> np.ndarray | None:
        """The exact -log p_ref(target) of chunk `i`'s positions, when the file has edgemerge's trailer."""
        if self.nll_ref is None:
            return None
        n = scored_positions(self.header.n_ctx)
        return self.nll_ref[i * n : (i + 1) * n].astype(np.float64)

    def chunk(self, i: int) -> np.ndarray:
        """The records of chunk `i` (uint16, [scored positions, record_len])."""
        h = self.header
        self._f.seek(h.data_offset + i * h.chunk_bytes)
        data = np.fromfile(self._f, dtype="<u2", count=h.chunk_bytes // 2)
        return data.reshape(scored_positions(h.n_ctx), record_len(h.n_vocab))

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def reference_writer(
    path: Path,
    n_ctx: int,
    n_vocab: int,
    tokens: list[int],
    n_chunk: int,
    *,
    inputs: Iterable[Path | None] = (),
    locked: bool = False,
):
    """Write a reference file atomically: yields `write(logits, targets)`, called once per chunk in order with
    the logits of its scored positions and the tokens they predict; the file appears under `path` only when every chunk was written (a file there is
    replaced, never a folder or one of `inputs`)."""
    out = atomic_output(Path(path), force=True, inputs=inputs, replace_dir=False, locked=locked)
    with out as tmp, open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, n_ctx, n_vocab, n_chunk))
        f.write(np.asarray(tokens[: n_ctx * n_chunk], dtype="<i4").tobytes())
        nlls: list[np.ndarray] = []

        def write(logits: np.ndarray, targets: np.ndarray) -> None:
            if logits.shape != (scored_positions(n_ctx), n_vocab) or len(targets) != len(logits):
                raise ValueError(f"chunk logits of shape {logits.shape}")
            f.write(encode(logits).astype("<u2").tobytes())
            nlls.append(nll(logits, targets))

        yield write
        if len(nlls) != n_chunk:
            raise RuntimeError(f"{len(nlls)} of {n_chunk} chunks written")
        f.write(np.concatenate(nlls).astype("<f4").tobytes() + TRAILER)
