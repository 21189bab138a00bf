"""Hugging Face folder -> GGUF through the same `GGUFSink` and streaming engine as the merge (`copy_into`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.progress import Progress

from ..errors import EdgemergeError
from ..files import atomic_output
from ..limits import shown
from ..model_json import check_model_json, read_tokenizer_json
from ..sinks import TensorSpec
from ..sources import index_weight_files, safetensors_layout
from .metadata import GGUFMetadata
from .sink import GGUFSink

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (from the shard index when there is one)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [hf_dir / f for f in index_weight_files(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise EdgemergeError(f"{hf_dir}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        hint = " (it has PyTorch .bin weights: save it with safetensors)" if any(hf_dir.glob("*.bin")) else ""
        raise EdgemergeError(f"{hf_dir} has no .safetensors weights{hint}")
    return files


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A safetensors file the library cannot read is a user error naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise EdgemergeError(f"{path} is unreadable or truncated ({e}); download it again") from None


def read_specs(files: list[Path]) -> tuple[list[TensorSpec], dict[str, Path]]:
    """Name, shape and dtype of every tensor (headers only), and the file holding each."""
    from safetensors import safe_open

    specs, where = [], {}
    for f in files:
        safetensors_layout(f)  # bounded header checks with one-line errors before the library opens it
        with _unreadable(f), safe_open(f, framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                sl = h.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _DTYPES:
                    raise EdgemergeError(
                        f"tensor {shown(name)} in {f.name} is {dtype}; only float checkpoints (BF16/F16/F32) can be "
                        "exported (dequantize the model first)"
                    )
                specs.append(TensorSpec(name, tuple(sl.get_shape()), _DTYPES[dtype]))
                where[name] = f
    return specs, where


def export_hf(
    hf_dir: Path,
    out_file: Path,
    *,
    outtype: str = "f16",
    metadata: GGUFMetadata | None = None,
    force: bool = False,
    progress: Progress | None = None,
    hashes: dict[Path, str] | None = None,
) -> Path:
    """Convert a Hugging Face model folder to one GGUF file (f32, f16, bf16 or q8_0), like llama.cpp's
    convert_hf_to_gguf.py; nothing appears at `out_file` unless the whole file was written. `hashes`: filled
    with the file's sha256, computed while writing (as `merge_to_gguf` does)."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if not hf_dir.is_dir():
        raise EdgemergeError(
            f"{hf_dir} is not a folder; give a Hugging Face model folder (config.json + weights)"
        )
    if not (hf_dir / "config.json").is_file():
        raise EdgemergeError(f"{hf_dir} has no config.json; give a Hugging Face model folder")
    config = check_model_json(hf_dir)
    read_tokenizer_json(hf_dir)
    from ..check import ModelTensors, check_config_tensors, check_inherited_files
    from ..merge.engine import copy_into
    from ..trust import refuse_custom_code

    refuse_custom_code(hf_dir)  # before any transformers call: nothing in the folder may run
    check_inherited_files(hf_dir, hf_dir.name)
    specs, where = read_specs(safetensors_files(hf_dir))
    check_config_tensors(config, {s.name: s.shape for s in specs}, hf_dir.name)
    model = ModelTensors(label=str(hf_dir), files=where)
    with atomic_output(out_file, force=force, inputs=[hf_dir]) as tmp:
        sink = GGUFSink(tmp, hf_dir, outtype=outtype, metadata=metadata, sha256=hashes is not None)
        copy_into(model, specs, sink, progress=progress, label=f"GGUF {out_file.name}")
    if hashes is not None:
        hashes[out_file] = sink.sha256
    return out_file
