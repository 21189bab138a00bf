"""The streaming loop under merge and export: every tensor of the inputs read once, in the sink's order, in
pieces of bounded size, through three threads.

One thread reads the next piece ahead (`Prefetch`), the caller's loop works on the current one (the merge's
arithmetic, or nothing for an export), and one thread encodes and writes the previous output
(`sinks.BackgroundSink`). Tensors larger than BLOCK_ELEMENTS come in row blocks (`pieces`), so the working set
is bounded whatever the tensor size; a sink that takes row blocks (`sinks.RowSink`) gets them as they come,
otherwise `TensorOut` assembles the tensor in the output dtype.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..memory import freed_blocks_kept
from ..progress import Progress, task
from .safetensors import open_for_reading, read_rows, safetensors_layout
from .sinks import BackgroundSink, Sink
from .spec import ModelTensors, TensorSpec

# 512K elements: 2 MB per float32 temporary, so a block's working set stays in the CPU caches (block sizes
# measured in the README's performance section)
BLOCK_ELEMENTS = 1 << 19


class Readers:
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
                self.handles[path] = self.stack.enter_context(open_for_reading(path))
            return self.handles[path]

    def _layout(self, path: Path) -> tuple[int, dict]:
        """Start of the data section and the header entries of one safetensors file (cached)."""
        with self.lock:
            if path not in self.layouts:
                self.layouts[path] = safetensors_layout(path)
            return self.layouts[path]

    def load(self, piece: tuple[str, slice | None], indices: list[int]) -> dict[int, np.ndarray]:
        name, rows = piece
        out = {}
        for i in indices:
            path = self.models[i].files[name]
            out[i] = (
                self._handle(path).get_tensor(name)
                if rows is None
                else read_rows(path, self._layout(path), name, rows)
            )
        return out


def pieces(spec: TensorSpec, blockwise: bool) -> list[slice | None]:
    """Row ranges of at most BLOCK_ELEMENTS elements (None: the whole tensor in one piece)."""
    numel = spec.nbytes // (4 if spec.dtype == "float32" else 2)
    if not blockwise or numel <= BLOCK_ELEMENTS or not spec.shape:
        return [None]
    row = numel // spec.shape[0]
    step = max(1, BLOCK_ELEMENTS // row)
    return [slice(a, min(a + step, spec.shape[0])) for a in range(0, spec.shape[0], step)]


class Prefetch:
    """Reads pieces of the merge ahead of use in a background thread: while one piece is merged, the next one in
    `sequence` is read. Each array read ahead is served once; reads of anything else (sparsifiers' later passes
    over a tensor) go to disk when asked for. At most one piece waits besides the one being merged. Tensors
    named in `first_only` are read from the first of `indices` only."""

    def __init__(
        self,
        readers: Readers,
        sequence: list[tuple[str, slice | None]],
        indices: list[int],
        pool,
        first_only: frozenset[str] = frozenset(),
    ):
        self._readers, self._seq, self._indices, self._pool = readers, sequence, indices, pool
        self._first_only = first_only
        self._next = 0
        self._ahead: dict[tuple[str, int | None], Future] = {}
        self._started: set[tuple[str, int | None]] = set()
        self._submit()

    def _submit(self) -> None:
        if self._next < len(self._seq):
            piece = self._seq[self._next]
            self._next += 1
            indices = self._indices[:1] if piece[0] in self._first_only else self._indices
            self._ahead[piece_key(*piece)] = self._pool.submit(self._readers.load, piece, indices)

    def take(self, name: str, rows: slice | None, i: int) -> np.ndarray | None:
        """Input `i`'s array of this piece if it was read ahead (and not served yet), else None."""
        key = piece_key(name, rows)
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


def piece_key(name: str, rows: slice | None) -> tuple[str, int | None]:
    return name, None if rows is None else rows.start


class TensorOut:
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
def streaming(
    sink: Sink,
    specs: list[TensorSpec],
    models: list[ModelTensors],
    indices: list[int],
    read_all_ahead: bool,
    first_only: frozenset[str] = frozenset(),
) -> Iterator[tuple[BackgroundSink, list[str], Readers, Prefetch]]:
    """The three threads: `sink` opened behind a writer thread, the inputs behind a read-ahead thread (every
    piece, or with `read_all_ahead` False only tensors of one piece; the tensors of `first_only` from the
    first of `indices` only: the merge's tensors outside the language model). Yields (sink, order, readers, prefetch):
    `order` is the names the sink wants, in its order (the others are not read). Closes the sink at the end,
    or aborts it on any error."""
    by_name = {s.name: s for s in specs}
    sink = BackgroundSink(sink)
    try:
        order = list(sink.open(specs))
        if len(set(order)) != len(order) or not set(order) <= set(by_name):
            raise AssertionError("sink.open must return tensor names of the specs, each at most once")
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            stack.enter_context(freed_blocks_kept())
            readers = Readers(models, stack)
            sequence = [
                (name, rows)
                for name in order
                for rows in pieces(by_name[name], True)
                if read_all_ahead or rows is None
            ]
            yield sink, order, readers, Prefetch(readers, sequence, indices, pool, first_only)
            sink.close()
    except BaseException:
        sink.abort()
        raise


def copy_into(
    model: ModelTensors, specs: list[TensorSpec], sink: Sink, *, progress: Progress | None = None, label: str
) -> None:
    """Stream one model's tensors, as stored, into `sink` (the GGUF export): the streaming loop without
    arithmetic, so large tensors pass in row blocks and memory stays flat."""
    total = sum(s.nbytes for s in specs)
    by_name = {s.name: s for s in specs}
    pipeline = streaming(sink, specs, [model], [0], read_all_ahead=True)
    with pipeline as (writer, order, readers, prefetch), task(progress, label, total) as advance:
        for name in order:
            parts = pieces(by_name[name], True)
            out = TensorOut(writer, by_name[name], parts)
            for rows in parts:
                block = prefetch.take(name, rows, 0)
                advance(out.add(rows, block if block is not None else readers.load((name, rows), [0])[0]))
            advance(out.finish())
