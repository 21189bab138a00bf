"""GGUFSink: the `Sink` that writes a GGUF file tensor by tensor.

`open(specs)` writes the header, every key/value and all tensor infos (sizes are known from the shapes) with
gguf-py's `GGUFWriter`; `write(name, array)` then appends one tensor's data and forgets it, and `write_rows`
appends a tensor the family does not permute block by block, so memory never holds more than one tensor.
An MoE layer's experts, one HF tensor each, are slices of one stacked GGUF tensor (`ffn_*_exps`): they come
one after the other and are appended in place, so no stack is ever assembled in memory.
gguf-py's `add_tensor` would keep every tensor in RAM until the end and its `write_tensor_data` takes a tensor
only whole, so the data section is written here with the same padding (and hashed on the way if asked).
Export and the fused merge both go through this class.

Per tensor: convert to float32 (as llama.cpp's converter does with bf16), apply the family's transform (e.g.
the Llama q/k permutation), then store it as the converter would (gguf-py's `quants.quantize`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import EdgemergeError
from ..files import ensure_free_space
from ..tensors.spec import TensorSpec
from .arch import OUTTYPES, Arch, arch_for, check_outtype, load_hparams
from .metadata import GGUFMetadata, write_metadata

_HEADER_ALLOWANCE = 64 * 1024**2  # vocab + tensor infos: generous bound for the free-space check


@dataclass
class _Slot:
    """Where one HF tensor goes: its GGUF tensor, its shape as it comes, the storage type, and whether it opens
    and closes that GGUF tensor (both, unless it is one slice of a stack such as an MoE's experts)."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    first: bool = True
    last: bool = True


class GGUFSink:
    """Write tensors of a Hugging Face model (`model_dir` gives config + tokenizer) into a GGUF at `path`."""

    def __init__(
        self,
        path: Path,
        model_dir: Path,
        *,
        outtype: str = "f16",
        metadata: GGUFMetadata | None = None,
        sha256: bool = False,
    ):
        """`sha256`: hash the file while writing it (`self.sha256` after close), which saves a second read of
        the file when its hash is wanted (a build's manifest) and costs a second of CPU per 2 GB otherwise."""
        self.path = Path(path)
        self.model_dir = Path(model_dir)
        self.outtype = check_outtype(outtype)
        self.metadata = metadata
        self.arch: Arch | None = None
        self.writer: gguf.GGUFWriter | None = None
        self._plan: dict[str, _Slot] = {}  # HF name -> where it goes
        self._order: list[str] = []
        self._next = 0
        self._rows: tuple[str, int] | None = None  # HF tensor written in row blocks: name, bytes written
        self._tensor: tuple[str, int, int] | None = None  # GGUF tensor being written: name, size, written
        self._file = None
        self._pos = 0
        self._hash = hashlib.sha256() if sha256 else None
        self.nbytes = 0

    # ---- Sink protocol -------------------------------------------------------------------------------
    def open(self, specs: list[TensorSpec]) -> list[str]:
        """Write header, key/values and tensor infos; return the HF tensor names in the order to write them."""
        hparams = load_hparams(self.model_dir)
        arch = self.arch = arch_for(hparams)
        file_type = OUTTYPES[self.outtype][0]
        stored = self._plan_tensors(arch, specs)
        extras = list(arch.extra_tensors())

        w = self.writer = gguf.GGUFWriter(path=None, arch=arch.name)
        for name, data in extras:
            qtype = arch.tensor_type(name, data.shape, self.outtype)
            w.add_tensor_info(
                name, data.shape, np.dtype(np.float32), _nbytes(data.shape, qtype), raw_dtype=qtype
            )
        for new, (shape, qtype) in stored.items():
            w.add_tensor_info(new, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        self.nbytes = sum(ti.nbytes for ti in w.tensors[0].values())
        ensure_free_space(
            self.path.parent, self.nbytes + _HEADER_ALLOWANCE, f"the GGUF file {self.path.name}"
        )

        w.add_type(gguf.GGUFType.MODEL)
        write_metadata(w, self.model_dir, self.metadata, *w.get_total_parameter_count())
        arch.write_params(w, file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.write_vocab(w, self.model_dir, hparams)

        w.write_header_to_file(path=self.path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # the data section is written here (gguf-py writes a tensor only whole): the same padding and bytes as
        # its write_tensor_data, hashed on the way if asked
        self._file = w.fout[0]
        self._file.flush()
        self._pos = self._file.tell()
        if self._hash is not None:
            with open(self.path, "rb") as f:
                self._hash.update(f.read(self._pos))
        for name, data in extras:
            self._write_whole(name, _encode(data, arch.tensor_type(name, data.shape, self.outtype)))
        return list(self._order)

    def _plan_tensors(
        self, arch: Arch, specs: list[TensorSpec]
    ) -> dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]:
        """Where each HF tensor goes (`self._plan`, `self._order`); returns GGUF name -> (stored shape, storage
        type), in file order. The slices of a stacked tensor (an MoE's experts) must all be there, of one
        shape; they are written one after the other, in the order of their index."""
        groups: dict[str, dict[int, TensorSpec]] = {}  # GGUF name -> slice index -> HF tensor
        counts: dict[str, int | None] = {}  # GGUF name -> slices of its stack (None: not stacked)
        for spec in specs:
            new = arch.gguf_name(spec.name)
            if new is None:
                continue
            index, count = arch.stack_slot(spec.name) or (0, None)
            members = groups.setdefault(new, {})
            if index in members or counts.setdefault(new, count) != count:
                other = members.get(index) or next(iter(members.values()))
                raise EdgemergeError(f"tensors {other.name!r} and {spec.name!r} both map to {new!r}")
            members[index] = spec
        out = {}
        for new in sorted(groups, key=_sort_key):
            members, count = groups[new], counts[new]
            first = members[min(members)]
            if count is not None and len(members) != count:
                missing = min(set(range(count)) - set(members))
                raise EdgemergeError(
                    f"{new}: {len(members)} of {count} experts present (expert {missing} missing beside "
                    f"{first.name!r}); the checkpoint is incomplete or config.json's expert count is wrong"
                )
            if odd := next((m for m in members.values() if tuple(m.shape) != tuple(first.shape)), None):
                raise EdgemergeError(
                    f"tensor {odd.name!r} has shape {tuple(odd.shape)} but {first.name!r} has "
                    f"{tuple(first.shape)}: the experts of one layer must share their shapes"
                )
            shape = arch.gguf_shape(first.name, tuple(first.shape))
            stored = shape if count is None else (count, *shape)
            qtype = arch.tensor_type(new, stored, self.outtype)
            for index in sorted(members):
                last = index == len(members) - 1
                self._plan[members[index].name] = _Slot(new, tuple(first.shape), qtype, index == 0, last)
                self._order.append(members[index].name)
            out[new] = (stored, qtype)
        return out

    def write(self, name: str, array: np.ndarray) -> None:
        """Append one tensor (float32, float16 or bfloat16), in the order `open` returned."""
        if self.writer is None or self.arch is None:
            raise RuntimeError("GGUFSink.write before open")
        self._check_next(name)
        slot = self._plan[name]
        if tuple(array.shape) != slot.shape:
            raise EdgemergeError(f"tensor {name!r} has shape {tuple(array.shape)}, announced {slot.shape}")
        self._start(slot)
        self._emit_into(_encode(self.arch.transform(name, array), slot.qtype))
        self._finish(slot)

    def _check_next(self, name: str) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"GGUFSink got tensor {name!r}, expected {expected!r}")

    def takes_rows(self, name: str) -> bool:
        """Tensors the family does not transform can come in row blocks: every GGUF type is stored row by row."""
        return self.arch is not None and not self.arch.transforms(name) and name in self._plan

    def write_rows(self, name: str, rows: slice, block: np.ndarray) -> None:
        """Rows [rows.start, rows.stop) of a tensor `takes_rows` accepts, in order."""
        if self.writer is None or self.arch is None:
            raise RuntimeError("GGUFSink.write_rows before open")
        slot = self._plan[name]
        if rows.start == 0:
            self._check_next(name)
            self._start(slot)
            self._rows = (name, 0)
        current, written = self._rows or ("", 0)
        if current != name or written != _nbytes((rows.start, *slot.shape[1:]), slot.qtype):
            raise RuntimeError(f"GGUFSink got rows {rows.start}:{rows.stop} of {name!r} out of order")
        if tuple(block.shape) != (rows.stop - rows.start, *slot.shape[1:]):
            raise EdgemergeError(
                f"tensor {name!r}: row block of shape {tuple(block.shape)}, announced {slot.shape}"
            )
        self._rows = (name, written + self._emit_into(_encode(block, slot.qtype)))
        if rows.stop == slot.shape[0]:
            self._rows = None
            self._finish(slot)

    def _start(self, slot: _Slot) -> None:
        """Begin the GGUF tensor an HF tensor opens (its first slice, or the whole of it)."""
        if slot.first:
            self._tensor = (slot.gguf_name, self._begin(slot.gguf_name), 0)
        elif self._tensor is None or self._tensor[0] != slot.gguf_name:
            raise RuntimeError(f"GGUFSink: a slice of {slot.gguf_name!r} before its first one")

    def _emit_into(self, data: np.ndarray) -> int:
        """Append to the GGUF tensor being written; returns the bytes."""
        new, nbytes, written = self._tensor
        n = self._emit(data)
        self._tensor = (new, nbytes, written + n)
        return n

    def _finish(self, slot: _Slot) -> None:
        """One HF tensor written: close its GGUF tensor if it was the last slice."""
        if slot.last:
            new, nbytes, written = self._tensor
            self._end(new, nbytes, written)
            self._tensor = None
        self._next += 1

    # ---- the data section ------------------------------------------------------------------------------
    def _write_whole(self, gguf_name: str, data: np.ndarray) -> None:
        nbytes = self._begin(gguf_name)
        self._end(gguf_name, nbytes, self._emit(data))

    def _begin(self, gguf_name: str) -> int:
        """Start the next tensor of the file (padding to the alignment); returns its announced size."""
        remaining = self.writer.tensors[0]  # gguf-py's tensor infos not yet written, in file order
        if next(iter(remaining), None) != gguf_name:
            raise RuntimeError(f"GGUFSink: {gguf_name!r} is not the next tensor of the file")
        self._pad(self._pos)
        return remaining.pop(gguf_name).nbytes

    def _end(self, gguf_name: str, nbytes: int, written: int) -> None:
        if written != nbytes:
            raise RuntimeError(f"GGUFSink: {gguf_name!r} has {written} bytes, announced {nbytes}")
        self._pad(nbytes)

    def _pad(self, n: int) -> None:
        pad = gguf.GGUFWriter.ggml_pad(n, self.writer.data_alignment) - n
        if pad:
            self._emit(np.zeros(pad, dtype=np.uint8))

    def _emit(self, data: np.ndarray) -> int:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self._file.write(raw.data)
        if self._hash is not None:
            self._hash.update(raw.data)
        self._pos += raw.nbytes
        return raw.nbytes

    @property
    def sha256(self) -> str:
        """sha256 of the whole file, once `close` has finished it (only if asked for when created)."""
        if self._hash is None or self.writer is not None or self._file is None:
            raise RuntimeError("GGUFSink.sha256 needs sha256=True and a closed file")
        return self._hash.hexdigest()

    def close(self) -> None:
        """Finish the file; fails if tensors announced in `open` were never written."""
        if self.writer is None:
            return
        missing = self._order[self._next :]
        self.writer.close()
        self.writer = None
        if missing:
            raise RuntimeError(
                f"GGUF file incomplete: {len(missing)} tensors not written (first: {missing[0]})"
            )

    def abort(self) -> None:
        """Close the file after a failure (the caller removes the partial output)."""
        if self.writer is not None and self.writer.fout is not None:
            for f in self.writer.fout:
                f.close()
        self.writer = None


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Bytes of one tensor as llama.cpp's converter stores it: float32 first, then gguf-py's quantize()."""
    if qtype == gguf.GGMLQuantizationType.F16 and data.dtype == np.float16:
        return np.ascontiguousarray(data)  # f16 -> f32 -> f16 is exact: skip the copy
    if qtype == gguf.GGMLQuantizationType.F16 and data.dtype.name == "bfloat16":  # ml_dtypes' type, by name
        # bf16 -> f32 is exact, so one rounding to f16 gives the same bytes; torch does it multi-threaded
        # without the float32 copy (numpy's path runs on one core)
        import torch

        bits = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
        return bits.view(torch.bfloat16).to(torch.float16).numpy().reshape(data.shape)
    data = np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Stored size: elements x type size / block size (gguf-py's GGML_QUANT_SIZES)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _sort_key(gguf_name: str) -> tuple[int, int, str]:
    """Embeddings first, then blocks in order, then output norm and head (the order llama.cpp lists them)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), gguf_name)
    return (2 if parts[0].startswith("output") else 0, 0, gguf_name)
