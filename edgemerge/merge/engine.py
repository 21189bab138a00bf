"""The streaming merge: a loop over tensor names, one tensor of every input at a time, into a sink.

Three threads overlap: one reads the next piece of input (`_Prefetch`), the merge loop does the arithmetic
(cache-sized blocks, one core with torch), and one encodes and writes the previous output
(`sinks.BackgroundSink`).
Tensors larger than BLOCK_ELEMENTS are merged in row blocks, so the float32 working set is bounded whatever
the tensor size; a sink that takes row blocks (`sinks.RowSink`) gets them as they come, otherwise the tensor
is assembled in the output dtype. Sparsifying methods first walk the blocks to fix their thresholds (see
methods.plan_sparsifier; DARE holds its keep-mask for the tensor, 1 byte per element). Every merged block is
checked for NaN/Inf and rounded once to the recipe's dtype before the sink sees it, so every sink receives
the same values.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from ..check import CompatReport, ModelTensors, check_compat
from ..errors import EdgemergeError
from ..memory import freed_blocks_kept
from ..progress import Progress, task
from ..recipe import Recipe
from ..sinks import BackgroundSink, Sink, TensorSpec
from ..sources import RecipeSources, safetensors_layout
from .backends import Array, get_backend
from .methods import get_method


@dataclass
class MergeStats:
    method: str
    backend: str
    dtype: str
    options: dict
    tensors: int = 0
    params: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    order: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("order")
        return d


_ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}

# 512K elements: 2 MB per float32 temporary, so a block's working set stays in the CPU caches. Measured on the
# 1B bench family (merge loop, 2 cores): 4M-element blocks 6.9 s and 0.66 GB peak RSS, 1M 4.3 s, 512K 4.0 s and
# 0.44 GB, 256K 4.2 s.
BLOCK_ELEMENTS = 1 << 19


class _Readers:
    """Open safetensors handles of every input file, reading one tensor or one block of rows on request."""

    def __init__(self, models: list[ModelTensors], stack: contextlib.ExitStack):
        self.models = models
        self.stack = stack
        self.handles: dict[Path, object] = {}
        self.layouts: dict[Path, tuple[int, dict]] = {}
        self.lock = threading.Lock()  # the prefetch thread and the merge loop both open files

    def _handle(self, path: Path):
        with self.lock:
            if path not in self.handles:
                # pread, not mmap: a memory map keeps every page it has served resident (and counted in RSS)
                # until the file is closed, so memory would grow with the model; pread buffers die with the tensor
                handle = safe_open(path, framework="numpy", backend="pread")
                self.handles[path] = self.stack.enter_context(handle)
            return self.handles[path]

    def _layout(self, path: Path) -> tuple[int, dict]:
        """Start of the data section and the header entries of one safetensors file (cached)."""
        with self.lock:
            if path not in self.layouts:
                self.layouts[path] = safetensors_layout(path)
            return self.layouts[path]

    def _rows(self, path: Path, name: str, rows: slice) -> np.ndarray:
        """Rows [start, stop) of a tensor, read as the one contiguous byte range they occupy.

        By hand because safetensors' get_slice reads row blocks about 10x slower than this (2.4 s against
        0.26 s for a 2.2 GB model, measured); the header is validated by `safetensors_layout` (and by safe_open
        in check): every tensor's bytes lie inside the file."""
        start, header = self._layout(path)
        entry = header[name]
        shape = entry["shape"]
        dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((rows.stop - rows.start, *shape[1:]), dtype=dtype)
        offset = start + entry["data_offsets"][0] + rows.start * row_bytes
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise EdgemergeError(f"{path} is truncated: tensor {name} ends past the end of the file")
        return out

    def load(self, piece: tuple[str, slice | None], indices: list[int]) -> dict[int, np.ndarray]:
        name, rows = piece
        out = {}
        for i in indices:
            path = self.models[i].files[name]
            out[i] = self._handle(path).get_tensor(name) if rows is None else self._rows(path, name, rows)
        return out


def pieces(spec: TensorSpec, blockwise: bool) -> list[slice | None]:
    """Row ranges of at most BLOCK_ELEMENTS elements (None: the whole tensor in one piece)."""
    numel = spec.nbytes // (4 if spec.dtype == "float32" else 2)
    if not blockwise or numel <= BLOCK_ELEMENTS or not spec.shape:
        return [None]
    row = numel // spec.shape[0]
    step = max(1, BLOCK_ELEMENTS // row)
    return [slice(a, min(a + step, spec.shape[0])) for a in range(0, spec.shape[0], step)]


class _Prefetch:
    """Reads pieces of the merge ahead of use in a background thread: while one piece is merged, the next one in
    `sequence` is read. Each array read ahead is served once; reads of anything else (sparsifiers' later passes
    over a tensor) go to disk when asked for. At most one piece waits besides the one being merged."""

    def __init__(self, readers: _Readers, sequence: list[tuple[str, slice | None]], indices, pool):
        self._readers, self._seq, self._indices, self._pool = readers, sequence, indices, pool
        self._next = 0
        self._ahead: dict[tuple[str, int | None], Future] = {}
        self._started: set[tuple[str, int | None]] = set()
        self._submit()

    def _submit(self) -> None:
        if self._next < len(self._seq):
            piece = self._seq[self._next]
            self._next += 1
            self._ahead[_key(*piece)] = self._pool.submit(self._readers.load, piece, self._indices)

    def take(self, name: str, rows: slice | None, i: int) -> np.ndarray | None:
        """Input `i`'s array of this piece if it was read ahead (and not served yet), else None."""
        key = _key(name, rows)
        future = self._ahead.get(key)
        if future is None:
            return None
        if key not in self._started:  # the merge reached this piece: read the next one meanwhile
            self._started.add(key)
            self._submit()
        arrays = future.result()
        array = arrays.pop(i, None)
        if not arrays:
            del self._ahead[key]
        return array

    def done(self, name: str) -> None:
        """Forget what was read ahead for a merged tensor and not used (inputs a method did not need)."""
        for key in [k for k in self._ahead if k[0] == name and k in self._started]:
            del self._ahead[key]


def _key(name: str, rows: slice | None) -> tuple[str, int | None]:
    return name, None if rows is None else rows.start


class _Inputs:
    """`TensorInputs` for one tensor: index 0 instruct, 1 base, 2.. the languages, from the read-ahead when it
    has them, else read when asked for."""

    def __init__(self, name, shape, weights, pieces, readers: _Readers, prefetch: _Prefetch, xp):
        self.name, self.shape, self.weights, self.pieces = name, shape, weights, pieces
        self._readers, self._prefetch, self._xp = readers, prefetch, xp

    def _get(self, i: int, rows: slice | None) -> Array:
        raw = self._prefetch.take(self.name, rows, i)
        if raw is None:
            raw = self._readers.load((self.name, rows), [i])[i]
        return self._xp.from_numpy(raw)  # the raw array goes as soon as the backend has its float32 copy

    def instruct(self, rows: slice | None = None) -> Array:
        return self._get(0, rows)

    def base(self, rows: slice | None = None) -> Array:
        return self._get(1, rows)

    def language(self, i: int, rows: slice | None = None) -> Array:
        return self._get(2 + i, rows)


def _non_finite_error(name: str, arrays: dict[int, np.ndarray], models: list[ModelTensors]) -> EdgemergeError:
    bad = [models[i].label for i, a in arrays.items() if not np.isfinite(a.astype(np.float32)).all()]
    where = (
        f"the input {', '.join(bad)} already holds NaN/Inf there" if bad else "check the weights and options"
    )
    return EdgemergeError(f"merged tensor {name} has NaN or Inf values: {where}")


class _TensorOut:
    """One tensor's blocks into the sink: row block by row block when the sink takes them (so the tensor is
    never held whole), else assembled and written whole."""

    def __init__(self, sink: BackgroundSink, spec: TensorSpec, parts: list[slice | None]):
        self.sink, self.spec = sink, spec
        self.by_rows = len(parts) > 1 and sink.takes_rows(spec.name)
        self.out: np.ndarray | None = None

    def add(self, rows: slice | None, block: np.ndarray) -> int:
        """Hand over one block (not to be modified afterwards); returns the bytes sent to the sink."""
        if self.by_rows:
            self.sink.write_rows(self.spec.name, rows, block)
            return block.nbytes
        if rows is None:
            self.out = block
        else:
            if self.out is None:
                self.out = np.empty(self.spec.shape, dtype=block.dtype)
            self.out[rows] = block
        return 0

    def finish(self) -> int:
        """Write an assembled tensor; returns the bytes sent to the sink."""
        if self.by_rows or self.out is None:
            return 0
        nbytes = self.out.nbytes
        self.sink.write(self.spec.name, self.out)
        self.out = None
        return nbytes


@contextlib.contextmanager
def _pipeline(
    sink: Sink, specs: list[TensorSpec], models: list[ModelTensors], indices: list[int], read_all_ahead: bool
) -> Iterator[tuple[BackgroundSink, list[str], _Readers, _Prefetch]]:
    """The three threads: `sink` opened behind a writer thread, the inputs behind a read-ahead thread (every
    piece, or with `read_all_ahead` False only tensors of one piece). Yields (sink, order, readers, prefetch);
    closes the sink at the end, or aborts it on any error."""
    by_name = {s.name: s for s in specs}
    sink = BackgroundSink(sink)
    try:
        order = list(sink.open(specs))
        if sorted(order) != sorted(by_name):
            raise AssertionError("sink.open must return every tensor name exactly once")
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            stack.enter_context(freed_blocks_kept())
            readers = _Readers(models, stack)
            sequence = [
                (name, rows)
                for name in order
                for rows in pieces(by_name[name], True)
                if read_all_ahead or rows is None
            ]
            yield sink, order, readers, _Prefetch(readers, sequence, indices, pool)
            sink.close()
    except BaseException:
        sink.abort()
        raise


def merge_into(
    recipe: Recipe,
    sources: RecipeSources,
    sink: Sink,
    *,
    backend: str = "torch",
    progress: Progress | None = None,
    report: CompatReport | None = None,
) -> MergeStats:
    """Merge every tensor of the recipe's inputs into `sink` (opened, written in its order, closed).

    The compatibility check runs first unless its `report` is given. Raises EdgemergeError on bad input or a
    non-finite merged tensor; the sink is then left unfinished for the caller to discard.
    """
    method = get_method(recipe.method)
    opts = method.parse_options(recipe.options)
    xp = get_backend(backend)
    report = report or check_compat(sources)
    specs = [TensorSpec(s.name, s.shape, recipe.dtype) for s in report.specs]
    by_name = {s.name: s for s in specs}
    weights = [lang.weight for lang in recipe.languages]
    indices = [0] + ([1] if method.uses_base else []) + [2 + i for i in range(len(weights))]
    stats = MergeStats(method=method.name, backend=xp.name, dtype=recipe.dtype, options=opts)
    start = time.perf_counter()
    total = sum(s.nbytes for s in specs)
    # single-pass methods read every piece once, in order: all of them are read ahead; sparsifiers walk a
    # tensor several times, so only tensors of one piece are
    pipeline = _pipeline(sink, specs, report.models, indices, read_all_ahead=method.sparsify is None)
    with (
        pipeline as (writer, order, readers, prefetch),
        task(progress, f"merge ({method.name}, {xp.name})", total) as advance,
    ):
        for name in order:
            spec = by_name[name]
            parts = pieces(spec, True)
            t = _Inputs(name, spec.shape, weights, parts, readers, prefetch, xp)
            out = _TensorOut(writer, spec, parts)
            for rows, merged in method.merge(xp, t, opts):
                if not xp.all_finite(merged):
                    raise _non_finite_error(name, readers.load((name, rows), indices), report.models)
                block = xp.to_numpy(merged, recipe.dtype)
                del merged
                advance(out.add(rows, block))
                del block
            del t
            prefetch.done(name)
            advance(out.finish())
            stats.tensors += 1
            stats.params += spec.nbytes // (4 if recipe.dtype == "float32" else 2)
            stats.bytes_out += spec.nbytes
    stats.order = order
    stats.seconds = time.perf_counter() - start
    return stats


def copy_into(
    model: ModelTensors, specs: list[TensorSpec], sink: Sink, *, progress: Progress | None = None, label: str
) -> None:
    """Stream one model's tensors, as stored, into `sink` (the GGUF export): the merge's reader, read-ahead and
    writer threads without the arithmetic, so large tensors pass in row blocks and memory stays flat."""
    total = sum(s.nbytes for s in specs)
    by_name = {s.name: s for s in specs}
    pipeline = _pipeline(sink, specs, [model], [0], read_all_ahead=True)
    with pipeline as (writer, order, readers, prefetch), task(progress, label, total) as advance:
        for name in order:
            parts = pieces(by_name[name], True)
            out = _TensorOut(writer, by_name[name], parts)
            for rows in parts:
                block = prefetch.take(name, rows, 0)
                advance(out.add(rows, block if block is not None else readers.load((name, rows), [0])[0]))
            advance(out.finish())
