"""Read-only views of a GGUF file: key/values, tensor infos, raw tensor bytes, validation, and a diff.

We parse the header here rather than with gguf-py's `GGUFReader` because that reader builds a numpy view per
array element: 20 s for one 128k-token vocabulary, which would dominate `quantize`'s input check. The format
constants (value types, block sizes) are gguf-py's.

A GGUF is untrusted input: every string length, array count, key and tensor count is checked against the
bytes left in the file before it is allocated or looped over, and the keys read before llama.cpp loads the
file (alignment, architecture, context length, token ids) must have the types llama.cpp asserts. Other readers
(gguf-py's GGUFReader, llama.cpp) only ever see a file this one accepted.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import EdgemergeError
from ..limits import shown

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
    # key -> its value type, and an array's element type: (GGUFValueType,) or (ARRAY, element type)
    types: dict[str, tuple[gguf.GGUFValueType, ...]] = field(default_factory=dict)

    def tensor_bytes(self) -> dict[str, np.ndarray]:
        """name -> the tensor's raw bytes (memory-mapped, read-only)."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return {t.name: mm[t.offset : t.offset + t.nbytes] for t in self.tensors}


_T = gguf.GGUFValueType
_INTEGERS = frozenset({_T.UINT8, _T.INT8, _T.UINT16, _T.INT16, _T.UINT32, _T.INT32, _T.UINT64, _T.INT64})
MAX_ARRAY_DEPTH = 4  # arrays of arrays: llama.cpp reads none nested at all; a deeper claim is hostile
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_LIST = 1 << 22  # numeric array elements returned as a list (a vocabulary's scores: at most ~256K)
MAX_STRINGS = 1 << 24  # strings or arrays in one array (a vocabulary: at most a few hundred thousand)
MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses longer tensor names (with the terminating NUL, 63)
# smallest encoding of one element of each type: a count times this must fit the bytes left
_MIN_BYTES = {**{t: struct.calcsize("<" + f) for t, f in _SCALARS.items()}, _T.STRING: 8, _T.ARRAY: 12}


class _Damaged(ValueError):
    """The header says something the file cannot hold."""


class _Cursor:
    """Reads GGUF header values; every claimed length or count is checked against the bytes left in the file
    before anything is allocated or looped over, so a count of 2**60 fails at once."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Damaged(f"{what} claims {n} bytes, {self.left()} are left in the file")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, "a value")
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str = "a string") -> str:
        n = self.unpack("Q")
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def vtype(self, what: str) -> gguf.GGUFValueType:
        code = self.unpack("I")
        try:
            return gguf.GGUFValueType(code)
        except ValueError:
            raise _Damaged(f"{what} has the unknown value type {code}") from None

    def value(self, vtype: gguf.GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == _T.STRING:
            return self.string(what)
        if vtype == _T.ARRAY:
            etype, n = self.vtype(what), self.unpack("Q")
            if etype == _T.ARRAY and depth >= MAX_ARRAY_DEPTH:
                raise _Damaged(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            self.need(n * _MIN_BYTES[etype], f"{what} (an array of {n} values)")
            if etype in _SCALARS:
                dt = np.dtype("<" + _SCALARS[etype]) if etype != _T.BOOL else np.dtype(np.uint8)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                arr = arr.astype(bool) if etype == _T.BOOL else arr
                # a Python list costs 8-32 bytes per element: beyond MAX_LIST, keep the numbers as an array
                return arr.tolist() if n <= MAX_LIST else arr.copy()
            if n > MAX_STRINGS:
                raise _Damaged(f"{what} claims {n} values; no GGUF field holds more than {MAX_STRINGS}")
            return [self.value(etype, what, depth + 1) for _ in range(n)]
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
                f"{path} is a damaged or truncated GGUF file ({str(e)[:200]}); re-create or re-download it"
            ) from None
    end = max((t.offset + t.nbytes for t in info.tensors), default=0)  # no tensors, no (padded) data section
    if end > size:
        raise EdgemergeError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}; re-create or re-download it"
        )
    return info


def _check_types(kv: dict[str, Any], types: dict[str, tuple]) -> None:
    """The keys edgemerge and llama.cpp read before loading must have the type llama.cpp asserts (a wrong type
    there aborts llama.cpp, or makes our own reading fail) and a usable value."""

    def want(key: str, kind: str) -> None:
        raise _Damaged(f"{key} must be {kind}, it is {_describe(types[key])} {shown(kv[key])}")

    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if types["general.alignment"] != (_T.UINT32,) or a == 0 or a & (a - 1):
            want("general.alignment", "a uint32 power of two")
    for key in ("general.architecture", "general.name", "tokenizer.chat_template", "tokenizer.ggml.model"):
        if key in kv and types[key] != (_T.STRING,):
            want(key, "a string")
    if "general.file_type" in kv and types["general.file_type"][0] not in _INTEGERS:
        want("general.file_type", "an integer")
    arch = kv.get("general.architecture")
    ctx = f"{arch}.context_length"
    if ctx in kv and (types[ctx][0] not in _INTEGERS or not 0 < kv[ctx] < 1 << 32):
        want(ctx, "a positive integer (the training context in tokens)")
    for key in (f"{arch}.block_count", f"{arch}.embedding_length"):
        if key in kv and types[key][0] not in _INTEGERS:
            want(key, "an integer")
    if "tokenizer.ggml.tokens" in kv and types["tokenizer.ggml.tokens"] != (_T.ARRAY, _T.STRING):
        want("tokenizer.ggml.tokens", "an array of strings")
    for key, t in types.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and t[0] not in _INTEGERS:
            want(key, "an integer token id")


def _describe(t: tuple) -> str:
    return "an array of " + t[1].name if t[0] == _T.ARRAY else "a " + t[0].name.lower()


def _parse(path: Path, buf: mmap.mmap) -> GGUFInfo:
    c = _Cursor(buf)
    c.pos = 4
    version, n_tensors, n_kv = c.unpack("I"), c.unpack("Q"), c.unpack("Q")
    if version not in (2, 3):
        raise _Damaged(f"GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)")
    c.need(n_kv * (8 + 4 + 1), f"{n_kv} key/values")  # key length, type, smallest value
    kv: dict[str, Any] = {}
    types: dict[str, tuple] = {}
    for _ in range(n_kv):
        key = c.string("a key")
        if key in kv:
            raise _Damaged(f"key {shown(key)} appears twice")
        vtype = c.vtype(f"key {shown(key)}")
        start = c.pos
        kv[key] = c.value(vtype, f"key {shown(key)}")
        types[key] = (vtype, _T(struct.unpack_from("<I", buf, start)[0])) if vtype == _T.ARRAY else (vtype,)
    _check_types(kv, types)
    c.need(n_tensors * (8 + 4 + 4 + 8), f"{n_tensors} tensor infos")  # name length, n_dims, type, offset
    raw = []
    names = set()
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        if len(name.encode()) >= MAX_NAME or name in names:
            why = "appears twice" if name in names else f"is longer than llama.cpp's {MAX_NAME - 1} bytes"
            raise _Damaged(f"tensor name {shown(name)} {why}")
        names.add(name)
        n_dims = c.unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Damaged(f"tensor {shown(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(c.unpack("Q") for _ in range(n_dims))
        code = c.unpack("I")
        try:
            qtype = gguf.GGMLQuantizationType(code)
        except ValueError:
            raise _Damaged(f"tensor {shown(name)} has the unknown type {code}") from None
        raw.append((name, dims, qtype, c.unpack("Q")))
    align = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_offset = -(-c.pos // align) * align
    tensors = []
    for name, dims, qtype, offset in raw:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if dims[0] % block or offset % align:
            raise _Damaged(
                f"tensor {name} is misaligned (row of {dims[0]} in blocks of {block}, offset {offset})"
            )
        tensors.append(TensorInfo(name, qtype.name, dims, data_offset + offset, n // block * type_size))
    return GGUFInfo(path, version, kv, tensors, data_offset, types)


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
