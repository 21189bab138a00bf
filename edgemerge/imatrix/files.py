"""Importance matrices (imatrix) in the file formats of the pinned llama.cpp, and the weights its quantizer
derives from them.

An imatrix holds, per matrix weight of a model, the sum over calibration tokens of each input column's
squared activation (`in_sum2`) and how many tokens were summed (`counts`; one per expert for a stacked MoE
weight). llama.cpp's `tools/imatrix/imatrix.cpp` writes it, `common/imatrix-loader.cpp` reads it:

- GGUF (llama-imatrix's default): keys `general.type` = "imatrix", `imatrix.datasets` (array of strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (uint32); per weight NAME, in sorted name order, the F32
  tensors `NAME.in_sum2` (ggml shape [n_cols, n_mat]) and `NAME.counts` ([1, n_mat]), no architecture key.
- legacy .dat (`--output-format dat`, still read): int32 entry count; per entry int32 name length, the name,
  int32 ncall, int32 value count, the float32 values (already divided by the count and multiplied by ncall);
  then, optionally, int32 chunk count, int32 dataset name length, the dataset name.

An imatrix file is untrusted input: every length and count is checked against the bytes in the file, types
and values are checked, and a bad file is one EdgemergeError line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np

from ..errors import EdgemergeError
from ..files import atomic_output
from ..gguf.inspect import MAX_NAME, GGUFInfo, read_gguf
from ..limits import shown, shown_path

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
# the largest MoE imatrix (DeepSeek-V3: 58 layers x 256 experts x ~16K columns) is about 1 GB
MAX_IMATRIX_BYTES = 4 << 30
_MAX_COUNT = 1 << 53  # token counts are integers stored as float32; beyond this they are not counts
_HINT = "compute it with llama-imatrix (or re-download it)"


class Entry(NamedTuple):
    """One weight's statistics, flat as llama.cpp keeps them: `sums` float32 [n_mat * n_cols] (expert-major),
    `counts` int64 [n_mat] (a legacy file: [ncall], and `sums` already normalized)."""

    sums: np.ndarray
    counts: np.ndarray


@dataclass
class Imatrix:
    entries: dict[str, Entry]  # weight name (e.g. "blk.0.attn_q.weight") -> its statistics
    datasets: list[str] = field(
        default_factory=list
    )  # the calibration text files, as llama-imatrix names them
    chunk_count: int = 0
    chunk_size: int = 0  # tokens per chunk (0 in a legacy file)
    legacy: bool = False  # read from the legacy .dat format

    def columns(self, name: str) -> int:
        """Input columns of entry `name` (a legacy entry does not say how its values split into experts)."""
        e = self.entries[name]
        return e.sums.size // (1 if self.legacy else e.counts.size)


def importance(entry: Entry, *, legacy: bool = False) -> np.ndarray:
    """The weights llama-quantize hands to `llama_model_quantize` for one entry (its `load_imatrix`), float32:

        GGUF:    w[j * n_cols + i] = in_sum2[j * n_cols + i] / counts[j]   if counts[j] > 0, else 1
        legacy:  w[i] = values[i] / ncall                                  if ncall > 0, else values[i]

    (j: expert, i: input column), divided in float32 as llama.cpp does: the mean squared activation per column.
    """
    sums = np.asarray(entry.sums, dtype=np.float32)
    counts = np.asarray(entry.counts, dtype=np.int64).astype(np.float32)  # C++: (float) int64_t
    if legacy:
        ncall = counts[0] if counts.size else np.float32(0)
        return sums / ncall if ncall > 0 else sums.copy()
    rows = sums.reshape(counts.size, -1)
    out = np.ones_like(rows)
    live = counts > 0
    out[live] = rows[live] / counts[live, None]
    return out.reshape(-1)


def read_imatrix(path: Path) -> Imatrix:
    """Read an imatrix file, GGUF or legacy .dat (as llama.cpp's loader: a file that does not start with
    "GGUF" is read as legacy); a damaged or foreign file is a one-line EdgemergeError."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise EdgemergeError(f"imatrix {shown_path(path)} {what}; give the file llama-imatrix wrote")
    size = path.stat().st_size
    if size > MAX_IMATRIX_BYTES:
        raise EdgemergeError(
            f"imatrix {shown_path(path)} is {size} bytes, more than any model's importance matrix "
            f"({MAX_IMATRIX_BYTES}); give the file llama-imatrix wrote"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    data = path.read_bytes()
    try:
        return _read_legacy(data)
    except _Bad as e:
        raise EdgemergeError(
            f"{shown_path(path)} is not an importance matrix llama.cpp reads (not GGUF; as a legacy .dat "
            f"imatrix: {e}); {_HINT}"
        ) from None


class _Bad(ValueError):
    """What is wrong inside an imatrix file."""


def _read_gguf(path: Path) -> Imatrix:
    info = read_gguf(path)  # bounded header parse; truncation is caught there
    try:
        return _from_gguf(info)
    except _Bad as e:
        raise EdgemergeError(
            f"imatrix {shown_path(path)} is damaged or not an imatrix: {e}; {_HINT}"
        ) from None


def _from_gguf(info: GGUFInfo) -> Imatrix:
    kv, types = info.kv, info.types
    kind = kv.get("general.type")
    if kind is not None and kind != "imatrix":
        raise _Bad(f"general.type is {shown(kind)}, not 'imatrix' (a model is not an imatrix)")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in kv]
    if missing:  # llama-quantize refuses such a file too ("missing imatrix metadata")
        raise _Bad(f"it lacks the key {missing[0]}")
    if types[KEY_DATASETS] != (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING):
        raise _Bad(f"{KEY_DATASETS} must be an array of strings")
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if types[key] != (gguf.GGUFValueType.UINT32,):  # llama.cpp asserts uint32 (it aborts otherwise)
            raise _Bad(f"{key} must be a uint32, not {types[key][0].name.lower()}")
        if kv[key] >= 1 << 31:  # llama.cpp keeps them in an int32
            raise _Bad(f"{key} is {kv[key]}, above 2**31 - 1")
    pairs: dict[str, list] = {}
    for t in info.tensors:
        for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name.removesuffix(suffix), [None, None])[slot] = t
    if not pairs:
        raise _Bad(f"it has no {SUM_SUFFIX} tensors")
    raw = info.tensor_bytes()
    entries: dict[str, Entry] = {}
    for name in sorted(pairs):
        sums_t, counts_t = pairs[name]
        if sums_t is None or counts_t is None:
            raise _Bad(
                f"{shown(name)} has {'no' if sums_t is None else 'a'} {SUM_SUFFIX} and "
                f"{'no' if counts_t is None else 'a'} {COUNT_SUFFIX} tensor (it needs both)"
            )
        for t in (sums_t, counts_t):
            if t.type != "F32":
                raise _Bad(f"tensor {shown(t.name)} is {t.type}; imatrix tensors are F32")
        sums = raw[sums_t.name].view(np.float32).copy()
        counts_f = raw[counts_t.name].view(np.float32)
        if counts_f.size == 0 or sums.size == 0 or sums.size % counts_f.size:
            raise _Bad(
                f"{shown(name)} has {sums.size} sums for {counts_f.size} counts (a multiple is needed)"
            )
        if not np.all(np.isfinite(counts_f)) or np.any(counts_f < 0) or np.any(counts_f > _MAX_COUNT):
            raise _Bad(f"{shown(name)} has a token count that is negative, not finite or above 2**53")
        # llama.cpp rounds each count with lround (half away from zero), exact in float64 for a float32
        counts = np.floor(counts_f.astype(np.float64) + 0.5).astype(np.int64)
        _check_sums(name, sums)
        entries[name] = Entry(sums, counts)
    return Imatrix(
        entries,
        list(kv[KEY_DATASETS]),
        int(kv[KEY_CHUNK_COUNT]),
        int(kv[KEY_CHUNK_SIZE]),
    )


def _check_sums(name: str, sums: np.ndarray) -> None:
    """Sums of squares are finite and non-negative (llama.cpp refuses non-finite ones when quantizing)."""
    if not np.all(np.isfinite(sums)) or np.any(sums < 0):
        raise _Bad(f"{shown(name)} has a sum of squares that is negative or not finite")


def _read_legacy(data: bytes) -> Imatrix:
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n > len(data) - pos:
            raise _Bad(f"{what} needs {n} bytes, {len(data) - pos} are left")
        pos += n
        return data[pos - n : pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = int32("the entry count")
    # every entry takes at least 4 + 1 + 4 + 4 + 4 bytes: a count the file cannot hold is refused at once
    if n_entries < 1 or n_entries * 17 > len(data) - pos:
        raise _Bad(f"it claims {n_entries} entries in {len(data)} bytes")
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        n = int32(f"entry {i + 1}'s name length")
        if not 0 < n < MAX_NAME:
            raise _Bad(f"entry {i + 1}'s name is {n} bytes (a tensor name has 1 to {MAX_NAME - 1})")
        name = take(n, f"entry {i + 1}'s name").decode("utf-8", errors="replace")
        if name in entries:
            raise _Bad(f"{shown(name)} appears twice")
        ncall, nval = int32(f"{name}'s call count"), int32(f"{name}'s value count")
        if ncall < 0 or nval < 1:
            raise _Bad(f"{shown(name)} has {ncall} calls and {nval} values")
        sums = np.frombuffer(take(4 * nval, f"{name}'s {nval} values"), dtype="<f4").astype(np.float32)
        _check_sums(name, sums)
        entries[name] = Entry(sums, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos < len(data):  # the chunk count and dataset name are optional
        chunk_count = int32("the chunk count")
        n = int32("the dataset name length")
        if n < 0:
            raise _Bad(f"the dataset name length is {n}")
        if n:
            datasets.append(take(n, "the dataset name").decode("utf-8", errors="replace"))
    if pos != len(data):
        raise _Bad(f"{len(data) - pos} bytes follow its end")
    return Imatrix(entries, datasets, max(chunk_count, 0), 0, legacy=True)


def write_imatrix(path: Path, imatrix: Imatrix, *, force: bool = False) -> Path:
    """Write `imatrix` as llama-imatrix writes its GGUF (same keys in the same order, sorted entries, each
    NAME.in_sum2 then NAME.counts, F32, ggml's trimmed shapes), atomically through `files.atomic_output`."""
    if imatrix.legacy:
        raise EdgemergeError(
            "a legacy .dat imatrix holds normalized values, not sums: convert it with llama-imatrix "
            "--in-file FILE.dat -o FILE.gguf"
        )
    if not imatrix.datasets:  # gguf-py cannot write an empty array; llama-imatrix always names its text
        raise EdgemergeError("an imatrix must name the text it was computed on (datasets is empty)")
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")  # an empty name writes no general.architecture, as llama-imatrix
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, list(imatrix.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            sums, counts = imatrix.entries[name]
            n_mat = counts.size
            sums = np.ascontiguousarray(sums, dtype=np.float32)
            # ggml drops trailing dimensions of 1 (ggml_n_dims): a dense weight's tensors are 1-D
            w.add_tensor(name + SUM_SUFFIX, sums.reshape((n_mat, -1) if n_mat > 1 else (-1,)))
            w.add_tensor(
                name + COUNT_SUFFIX, counts.astype(np.float32).reshape((n_mat, 1) if n_mat > 1 else (1,))
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def check_fits(imatrix: Imatrix, model: GGUFInfo, imatrix_path: Path) -> None:
    """Every entry must name a weight of `model` with its size (llama-quantize's test: n_cols * n_mat ==
    ne[0] * ne[2]) and, in a GGUF imatrix, its input columns (ne[0]); otherwise the imatrix was computed on
    another model: one line naming the first weight that does not match."""
    weights = {t.name: t.shape for t in model.tensors}
    where = f"imatrix {shown_path(imatrix_path)} does not fit {shown_path(model.path)}"
    fix = "compute the imatrix on this model (llama-imatrix -m MODEL.gguf)"
    for name in sorted(imatrix.entries):
        shape = weights.get(name)
        if shape is None:
            raise EdgemergeError(
                f"{where}: it has an entry for {shown(name)}, a tensor the model lacks; {fix}"
            )
        size = shape[0] * (shape[2] if len(shape) > 2 else 1)
        entry = imatrix.entries[name]
        cols = imatrix.columns(name)
        if entry.sums.size != size or (not imatrix.legacy and cols != shape[0]):
            got = f"{entry.sums.size} values" if imatrix.legacy else f"{cols} columns x {entry.counts.size}"
            want = f"{size} values" if imatrix.legacy else f"{shape[0]} columns x {size // shape[0]}"
            raise EdgemergeError(f"{where}: {name} takes {want} in the model, the imatrix has {got}; {fix}")
