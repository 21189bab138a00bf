"""Where streamed tensors go. The streaming loop (`stream.py`) writes into a `Sink` without knowing which one it feeds.

Contract: `open(specs)` receives every tensor's name, shape and dtype before any data and returns the names it wants,
in the order it wants them (it writes headers first, then data in that order; a tensor it leaves out, such as a
vision tower in a text-only GGUF, is neither read nor merged); `write(name, array)` is
called once per tensor in that order with a numpy array of dtype float32, float16 or ml_dtypes.bfloat16;
`close()` finishes the files. Sinks write into a temporary path the caller renames on success. A sink that can
take a large tensor as consecutive row blocks says so per tensor (`RowSink`), so the merge never assembles it.
The streaming loop drives every sink through `BackgroundSink`, which runs its writes in a thread.
"""

from __future__ import annotations

import collections
import json
import struct
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from .spec import TensorSpec

PENDING_BYTES = 32 * 1024**2  # output that may wait for the writer thread (see BackgroundSink)


class Sink(Protocol):
    def open(self, specs: list[TensorSpec]) -> list[str]:
        """Prepare the output for these tensors; return the names in the order they must be written."""
        ...

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor (dtype float32, float16 or ml_dtypes.bfloat16), in the order `open` returned."""
        ...

    def close(self) -> None:
        """Finish the output (flush, close files)."""
        ...


class RowSink(Sink, Protocol):
    """A sink that can also take a large tensor as consecutive row blocks, so the merge never holds it whole."""

    def takes_rows(self, name: str) -> bool:
        """Whether tensor `name` may be written with `write_rows` (else it must come whole to `write`)."""
        ...

    def write_rows(self, name: str, rows: slice, block: np.ndarray) -> None:
        """Rows [rows.start, rows.stop) of a tensor; blocks come in order, from row 0 to the last row."""
        ...


class BackgroundSink:
    """Runs another sink's writes in a thread, so encoding and writing one piece overlap the merge of the next.

    Writing is the largest single cost of a merge once reads are cached (a quarter of a 1B merge, mostly the
    kernel throttling dirty pages, which no CPU work can speed up, but which other work can hide). The kernel
    throttles in bursts, so up to `pending_bytes` of output may wait (the README's performance section says how
    the default was chosen). A single larger tensor still passes alone. An error in the thread is raised by the next write or
    by `close`.
    """

    def __init__(self, sink: Sink, *, pending_bytes: int = PENDING_BYTES):
        self.sink = sink
        self.pending_bytes = pending_bytes
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def open(self, specs: list[TensorSpec]) -> list[str]:
        order = self.sink.open(specs)
        self._thread = threading.Thread(target=self._run, name="sink-writer", daemon=True)
        self._thread.start()
        return order

    def _put(self, item: tuple | None, nbytes: int = 0) -> None:
        with self._cond:
            while self._items and self._bytes + nbytes > self.pending_bytes:
                self._cond.wait()
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item, nbytes = self._items[0]
            if item is None:
                return
            if self._error is None:  # after a failure, drain without writing so producers never block
                try:
                    if len(item) == 2:
                        self.sink.write(*item)
                    else:
                        self.sink.write_rows(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the merge thread by write/close
                    self._error = e
            with self._cond:  # the item leaves the queue only once written: its memory counts until then
                self._items.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()
            del item

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, array: np.ndarray) -> None:
        """Queue one tensor; the caller must not modify `array` afterwards."""
        self._raise()
        self._put((name, array), array.nbytes)

    def takes_rows(self, name: str) -> bool:
        takes = getattr(self.sink, "takes_rows", None)
        return takes is not None and takes(name)

    def write_rows(self, name: str, rows: slice, block: np.ndarray) -> None:
        """Queue one row block (see RowSink); the caller must not modify `block` afterwards."""
        self._raise()
        self._put((name, rows, block), block.nbytes)

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None and thread.ident is not None:  # a Ctrl-C can land inside Thread.start()
            self._put(None)
            thread.join()

    def close(self) -> None:
        self._join()
        self._raise()
        self.sink.close()

    def abort(self) -> None:
        self._join()
        abort = getattr(self.sink, "abort", None)
        if abort is not None:
            abort()


# ---------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class SafetensorsSink:
    """Hugging Face shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (or a single
    `model.safetensors`), written as a stream: each shard's header is written from the specs up front, then
    tensor data as it arrives. Hand-written because safetensors' `save_file` needs the whole shard in memory;
    the format is simple: 8-byte little-endian header length, JSON header (space-padded to 8 bytes), raw data.
    Shards keep the tensor order, one over the limit alone: huggingface_hub's split_state_dict_into_shards_factory
    moves such a tensor ahead of the shard being filled, so the plan stays ours.
    """

    def __init__(
        self, out_dir, *, max_shard_bytes: int = 5 * 1024**3, metadata: dict[str, str] | None = None
    ):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._plan: list[tuple[str, list[TensorSpec]]] = []
        self._where: dict[str, int] = {}
        self._order: list[str] = []
        self._next = 0
        self._file = None
        self._shard = -1
        self._row = 0  # next row of a tensor being written in row blocks

    def open(self, specs: list[TensorSpec]) -> list[str]:
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if shards[-1] and size + s.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._plan = list(zip(names, shards))
        self._order = [s.name for s in specs]
        self._where = {s.name: i for i, (_, shard) in enumerate(self._plan) for s in shard}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": {s.name: names[self._where[s.name]] for s in specs},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self._order)

    def _start_shard(self, i: int) -> None:
        if self._file is not None:
            self._finish_shard()
        name, shard = self._plan[i]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for s in shard:
            header[s.name] = {
                "dtype": _ST_DTYPES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 (open across write calls)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i
        self._expected_end = 8 + len(raw) + offset

    def _finish_shard(self) -> None:
        pos = self._file.tell()
        self._file.close()
        self._file = None
        if pos != self._expected_end:
            raise AssertionError(
                f"shard {self._plan[self._shard][0]} ended at byte {pos}, header says {self._expected_end}"
            )

    def _spec(self, name: str) -> TensorSpec:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise AssertionError(f"SafetensorsSink.write({name!r}) out of order")
        return next(s for s in self._plan[self._where[name]][1] if s.name == name)

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._spec(name)
        if tuple(array.shape) != tuple(spec.shape) or str(array.dtype) != spec.dtype:
            raise AssertionError(
                f"{name}: got {array.dtype}{list(array.shape)}, expected {spec.dtype}{list(spec.shape)}"
            )
        self._append(name, array)
        self._next += 1

    def takes_rows(self, name: str) -> bool:
        return True  # rows are contiguous in the file

    def write_rows(self, name: str, rows: slice, block: np.ndarray) -> None:
        spec = self._spec(name)
        if (
            rows.start != self._row
            or tuple(block.shape) != (rows.stop - rows.start, *spec.shape[1:])
            or str(block.dtype) != spec.dtype
        ):
            raise AssertionError(f"{name}: rows {rows.start}:{rows.stop} out of order or of the wrong shape")
        self._append(name, block)
        self._row = rows.stop
        if self._row == spec.shape[0]:
            self._row = 0
            self._next += 1

    def _append(self, name: str, array: np.ndarray) -> None:
        i = self._where[name]
        if i != self._shard:
            self._start_shard(i)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        if self._file is not None:
            self._finish_shard()
        if self._next != len(self._order):
            raise AssertionError(f"SafetensorsSink closed after {self._next} of {len(self._order)} tensors")

    def abort(self) -> None:
        """Close the open file after a failure (the caller removes the partial output)."""
        if self._file is not None:
            self._file.close()
            self._file = None
