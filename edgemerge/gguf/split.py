"""Splitting a GGUF into shards in llama.cpp's split format, as `llama-gguf-split --split` writes them.

Shards are named `STEM-00001-of-0000N.gguf`; the first holds every key/value of the file, each holds
`split.no`, `split.count` and `split.tensors.count`, and llama.cpp (llama-cli, llama-server, `-hf`, Ollama)
loads the set from its first shard. gguf-py's `GGUFWriter` writes this format (what convert_hf_to_gguf.py's
`--split-max-size` uses); here it is fed from our bounded header reader and the file's memory map, so tensors
stream through one at a time and nothing holds the model, and its shards start where llama-gguf-split's would
(byte for byte: the test compares them when that tool is built). llama-cpp-python does not expose gguf-split.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import gguf
import numpy as np

from ..errors import EdgemergeError
from ..files import fsync_dir, remove
from ..progress import Progress, task
from .inspect import GGUFInfo, read_gguf

SPLIT_KEYS = (
    gguf.Keys.Split.LLM_KV_SPLIT_NO,
    gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
    gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
)


class _SplitWriter(gguf.GGUFWriter):
    """GGUFWriter with llama-gguf-split's order of the split keys: it sets split.count last (ggml moves a key it
    sets again to the end), so its files have split.no, split.tensors.count, split.count."""

    def add_shard_kv_data(self) -> None:
        super().add_shard_kv_data()
        for kv in self.kv_data:
            if gguf.Keys.Split.LLM_KV_SPLIT_COUNT in kv:
                kv[gguf.Keys.Split.LLM_KV_SPLIT_COUNT] = kv.pop(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)


def shard_name(stem: str, i: int, n: int) -> str:
    """llama.cpp's shard name (llama_split_path, gguf-py's SHARD_NAME_FORMAT): shard `i` of `n`, from 1."""
    return gguf.SHARD_NAME_FORMAT.format(stem, i, n)


def split_plan(info: GGUFInfo, max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, by llama-gguf-split's rule (`--split-max-size`): a new shard starts when the
    next tensor, padded to 32 bytes, would take the current one's padded tensor data above `max_bytes` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for t in info.tensors:
        n = gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t.name)
        size += n
    return shards


def shard_names(path: Path, max_bytes: int) -> list[str]:
    """The names `split_gguf(path, max_bytes)` writes (one: the file needs no split)."""
    plan = split_plan(read_gguf(path), max_bytes)
    if len(plan) == 1:
        return [Path(path).name]
    return [shard_name(Path(path).stem, i + 1, len(plan)) for i in range(len(plan))]


def split_gguf(path: Path, max_bytes: int, out_dir: Path, progress: Progress | None = None) -> list[Path]:
    """Write `path` as shards of at most `max_bytes` of tensor data each into `out_dir`; return their paths.
    The shards appear together, only when all are written (a hidden folder holds them until then)."""
    path = Path(path)
    info = read_gguf(path)
    if any(k in info.kv for k in SPLIT_KEYS):
        raise EdgemergeError(f"{path} is already a shard of a split GGUF; give the whole file")
    plan = split_plan(info, max_bytes)
    if len(plan) < 2:
        raise EdgemergeError(f"{path} fits in one shard of {max_bytes} bytes; it needs no split")
    names = [shard_name(path.stem, i + 1, len(plan)) for i in range(len(plan))]
    tmp = out_dir / f".{path.stem}.split-partial"
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_shards(info, plan, tmp / path.name, progress)
        written = sorted(p.name for p in tmp.iterdir())
        if written != names:  # gguf-py named them: they must be the ones planned (and announced)
            raise AssertionError(f"gguf-py wrote {written}, planned {names}")
        for name in names:
            (tmp / name).replace(out_dir / name)
        fsync_dir(out_dir)
    finally:
        remove(tmp)
    return [out_dir / n for n in names]


def _write_shards(info: GGUFInfo, plan: list[list[str]], path: Path, progress: Progress | None) -> None:
    arch = info.kv.get("general.architecture", "llama")
    w = _SplitWriter(path, arch)
    w.data_alignment = info.kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    for key, value in info.kv.items():
        if key == "general.architecture":  # the writer's first key already
            continue
        vtype, *sub = info.types[key]
        if sub and not isinstance(value, list):
            raise EdgemergeError(f"{info.path}: key {key} holds nested arrays, which this split cannot copy")
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    starts = {names[0] for names in plan[1:]}
    for t in info.tensors:
        if (
            t.name in starts
        ):  # GGUFWriter's own split_max_size counts unpadded sizes: shards start where the plan says
            w.tensors.append({})
        qtype = gguf.GGMLQuantizationType[t.type]
        # element shape in numpy order (the writer reverses it back to ggml order); the dtype only says "not bytes"
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(t.nbytes for t in info.tensors)
    with (
        open(info.path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        task(progress, f"split {info.path.name}", total) as advance,
    ):
        for t in info.tensors:
            w.write_tensor_data(np.frombuffer(buf, np.uint8, t.nbytes, t.offset))
            advance(t.nbytes)
    w.close()
