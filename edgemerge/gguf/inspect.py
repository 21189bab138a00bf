"""Read-only views of a GGUF file: key/values, tensor infos, raw tensor bytes, validation, and a diff.

We parse the header here rather than with gguf-py's `GGUFReader` because that reader builds a numpy view per
array element: 20 s for one 128k-token vocabulary, which would dominate `quantize`'s input check. The format
constants (value types, block sizes) are gguf-py's.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import EdgemergeError

_SCALARS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # GGMLQuantizationType name, e.g. "F16", "Q8_0"
    shape: tuple[int, ...]  # ggml order (innermost first), as llama.cpp prints it
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int

    def tensor_bytes(self) -> dict[str, np.ndarray]:
        """name -> the tensor's raw bytes (memory-mapped, read-only)."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return {t.name: mm[t.offset : t.offset + t.nbytes] for t in self.tensors}


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        s = self.buf[self.pos : self.pos + n]
        if len(s) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: gguf.GGUFValueType) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype, n = gguf.GGUFValueType(self.unpack("I")), self.unpack("Q")
            if etype in _SCALARS and etype != gguf.GGUFValueType.BOOL:
                dt = np.dtype("<" + _SCALARS[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        return self.unpack(_SCALARS[vtype])


def read_gguf(path: Path) -> GGUFInfo:
    """Parse a GGUF header and check the file holds all its tensor data; a bad file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise EdgemergeError(f"{path} does not exist; give a .gguf model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgemergeError(
                f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file"
            )
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                info = _parse(path, buf)
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise EdgemergeError(
                f"{path} is a damaged or truncated GGUF file ({e}); re-create or re-download it"
            ) from None
    end = max((t.offset + t.nbytes for t in info.tensors), default=info.data_offset)
    if end > size:
        raise EdgemergeError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}; re-create or re-download it"
        )
    return info


def _parse(path: Path, buf: mmap.mmap) -> GGUFInfo:
    c = _Cursor(buf)
    c.pos = 4
    version, n_tensors, n_kv = c.unpack("I"), c.unpack("Q"), c.unpack("Q")
    kv = {}
    for _ in range(n_kv):
        key = c.string()
        kv[key] = c.value(gguf.GGUFValueType(c.unpack("I")))
    raw = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.unpack("Q") for _ in range(c.unpack("I")))
        raw.append((name, dims, gguf.GGMLQuantizationType(c.unpack("I")), c.unpack("Q")))
    align = int(kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_offset = -(-c.pos // align) * align
    tensors = []
    for name, dims, qtype, offset in raw:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64))
        tensors.append(TensorInfo(name, qtype.name, dims, data_offset + offset, n // block * type_size))
    return GGUFInfo(path, version, kv, tensors, data_offset)


def kv(path: Path) -> dict[str, Any]:
    """All key/values of a GGUF file as plain Python values."""
    return read_gguf(path).kv


def tensors(path: Path) -> list[TensorInfo]:
    return read_gguf(path).tensors


def diff_tensors(a: Path, b: Path) -> list[str]:
    """Differences between the tensors of two GGUF files (names, types, shapes, bytes); empty when identical."""
    ia, ib = read_gguf(a), read_gguf(b)
    ta, tb = {t.name: t for t in ia.tensors}, {t.name: t for t in ib.tensors}
    out = [f"only in {a.name}: {n}" for n in sorted(set(ta) - set(tb))]
    out += [f"only in {b.name}: {n}" for n in sorted(set(tb) - set(ta))]
    da, db = ia.tensor_bytes(), ib.tensor_bytes()
    for n in sorted(set(ta) & set(tb)):
        if (ta[n].type, ta[n].shape) != (tb[n].type, tb[n].shape):
            out.append(f"{n}: {ta[n].type}{list(ta[n].shape)} vs {tb[n].type}{list(tb[n].shape)}")
        elif not np.array_equal(da[n], db[n]):
            out.append(f"{n}: {int(np.count_nonzero(da[n] != db[n]))} bytes differ")
    return out
