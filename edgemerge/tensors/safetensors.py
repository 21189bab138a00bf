"""Reading safetensors checkpoints: headers (bounded and validated before any library sees them), the shard
index, the table of a model's tensors, and row blocks read straight from the file.

One reader for every room: the check, the GGUF export and the streaming loop all take a model's tensors from
`read_model` and their data from `Readers` (stream.py), which reads rows with `read_rows`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import EdgemergeError
from ..limits import MAX_SAFETENSORS_HEADER, read_json_object, shown
from .spec import ModelTensors


def numpy_dtype(st_dtype: str) -> np.dtype:
    """The numpy dtype of a float safetensors dtype (BF16 is ml_dtypes' bfloat16)."""
    if st_dtype == "BF16":
        # ml_dtypes takes most of a second to import: loaded only when tensor data is read
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[st_dtype])


def open_for_reading(path: Path):
    """A safetensors handle that hands out numpy arrays, bf16 ones included, read with pread."""
    numpy_dtype("BF16")  # safetensors' numpy arrays of bf16 need ml_dtypes' bfloat16 registered
    # pread, not mmap: a memory map keeps every page it has served resident (and counted in RSS) until the
    # file is closed, so memory would grow with the model; pread buffers die with the tensor
    return safe_open(path, framework="numpy", backend="pread")


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (raises EdgemergeError when the file cannot hold one). The claimed
    length is checked against MAX_SAFETENSORS_HEADER and the file's size before anything is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise EdgemergeError(f"{path} is truncated (no safetensors header); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER:
            raise EdgemergeError(
                f"{path} is not a safetensors file (its header claims {n} bytes, more than the format's "
                f"{MAX_SAFETENSORS_HEADER}); download it again"
            )
        if n > size - 8:
            raise EdgemergeError(
                f"{path} is truncated (header of {n} bytes in a {size}-byte file); download it again"
            )
        return f.read(n)


# bytes per element of the safetensors dtypes (sub-byte and exotic types are left to the library's check)
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_safetensors_header(raw: bytes, path: Path, data_size: int) -> dict[str, dict]:
    """The tensor entries of a safetensors header, checked to be what the format says: a JSON object of
    {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}} (plus an optional string map
    `__metadata__`), every tensor's bytes inside the data section and of the size its shape and dtype imply."""

    def bad(why: str) -> EdgemergeError:
        return EdgemergeError(f"{path} is unreadable or truncated ({why}); download it again")

    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not a map of strings")
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {shown(name)} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise bad(f"tensor {shown(name)} has a malformed dtype or shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise bad(f"tensor {shown(name)} has malformed data_offsets")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise bad(f"tensor {shown(name)} lies outside the file's {data_size} data bytes")
        need = math.prod(shape) * _ST_ITEMSIZE.get(dtype, 0)  # Python ints: a hostile shape cannot overflow
        if dtype in _ST_ITEMSIZE and need != end - begin:
            raise bad(f"tensor {shown(name)} has {end - begin} bytes, its shape and dtype need {need}")
    return header


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """Start of the data section and the validated tensor entries of a safetensors file."""
    raw = safetensors_header(path)
    start = 8 + len(raw)
    return start, parse_safetensors_header(raw, path, path.stat().st_size - start)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model: those its index names, else model.safetensors, else all of them
    (repos such as Mistral's also hold a `consolidated.safetensors` copy that must not be read twice)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / n for n in index_weight_files(index)]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def index_weight_files(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` names, checked: its weight_map is an object of
    tensor name -> plain file name (no folder part: shards sit beside the index) ending in .safetensors."""
    weight_map = read_json_object(index).get("weight_map", {})
    if not isinstance(weight_map, dict):
        raise EdgemergeError(
            f"{index}: weight_map must be an object of tensor name -> shard file, got a "
            f"{type(weight_map).__name__}; restore the file from the model's source"
        )
    names = set()
    for name in weight_map.values():
        if not (isinstance(name, str) and name.endswith(".safetensors") and name.isprintable()) or (
            Path(name).name != name
        ):
            raise EdgemergeError(
                f"{index}: weight_map values must be shard file names such as model-00001-of-00002.safetensors, "
                f"got {shown(name)}"
            )
        names.add(name)
    return sorted(names)


def read_model(folder: Path, label: str) -> ModelTensors:
    """Names, shapes and dtypes of a model's tensors from its safetensors headers (no data read). Each file's
    header is checked by `safetensors_layout` first, then opened by the safetensors library, whose own checks
    every later read relies on."""
    out = ModelTensors(label=label)
    files = weight_files(folder)
    if not files:
        hint = " (it has PyTorch .bin weights: save it with safetensors)" if any(folder.glob("*.bin")) else ""
        raise EdgemergeError(f"{label}: no .safetensors weights in {folder}{hint}")
    for path in files:
        if not path.exists():
            raise EdgemergeError(f"{label}: {path.name} is named in the index but missing from {folder}")
        try:
            _, header = safetensors_layout(path)
            with safe_open(path, framework="numpy"):
                pass
        except SafetensorError as e:
            raise EdgemergeError(
                f"{label}: {path} is unreadable or truncated ({e}); download it again"
            ) from None
        except OSError as e:
            raise EdgemergeError(f"{label}: cannot read {path} ({e})") from None
        for name in sorted(header):  # the library's order (safe_open's keys())
            entry = header[name]
            if name in out.files:
                raise EdgemergeError(
                    f"{label}: tensor {name} is stored twice ({out.files[name].name}, {path.name})"
                )
            out.files[name] = path
            out.shapes[name] = tuple(entry["shape"])
            out.dtypes[name] = entry["dtype"]
    return out


def read_rows(path: Path, layout: tuple[int, dict], name: str, rows: slice) -> np.ndarray:
    """Rows [start, stop) of a tensor, read as the one contiguous byte range they occupy.

    By hand because safetensors' get_slice reads row blocks far slower than one read; `layout` (from
    `safetensors_layout`) has been validated: every tensor's bytes lie inside the file."""
    start, header = layout
    entry = header[name]
    shape = entry["shape"]
    dtype = numpy_dtype(entry["dtype"])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    out = np.empty((rows.stop - rows.start, *shape[1:]), dtype=dtype)
    offset = start + entry["data_offsets"][0] + rows.start * row_bytes
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise EdgemergeError(f"{path} is truncated: tensor {name} ends past the end of the file")
    return out
