"""GGUF -> Hugging Face folder for Llama-architecture GGUFs (e.g. llama2.c's stories260K).

transformers can load some GGUFs itself, but its loader trips on a pad id of -1 (stories260K) and its
GGUF-loaded models cannot be saved as is; this path reads the file with gguf-py's `GGUFReader`, maps tensor
names back with gguf-py's `TensorNameMap`, undoes llama.cpp's q/k rotary permutation, and writes safetensors
shards, `config.json`, `generation_config.json` and a tokenizer (from the SentencePiece model the GGUF was
built from).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from gguf import MODEL_ARCH, GGUFReader, TensorNameMap
from gguf.quants import dequantize
from safetensors.numpy import save_file

from ..errors import EdgemergeError
from ..files import atomic_output
from ..trust import no_stdin
from .inspect import read_gguf

_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters of a Llama GGUF, as `config.json` wants them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` for q/k projections (rows = output features).

    llama.cpp stores each head's rotary pairs interleaved (x0, x1), (x2, x3), ... ; Hugging Face stores the
    first halves of the pairs then the second halves (`rotate_half`). With rows split as
    (head, d/2, 2): HF = swap the last two row axes -> (head, 2, d/2).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise EdgemergeError(
            f"cannot undo the rotary permutation: {rows} rows is not a multiple of 2 x {n_head} heads"
        )
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_shape(reader) -> LlamaShape:
    """Hyper-parameters of a Llama GGUF (fails with a clear message for other architectures)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise EdgemergeError(
            f"GGUF -> Hugging Face supports the llama architecture only, this file is {arch!r}"
        )
    names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != hidden // heads:
        raise EdgemergeError(
            f"partial rotary ({rope_dims} of {hidden // heads} head dims) has no Llama config.json equivalent"
        )

    def token_id(key: str) -> int | None:
        v = _field(reader, key)
        return None if v is None or int(v) >= 2**31 else int(v)  # -1 is stored as 2**32 - 1

    return LlamaShape(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
    )


def hf_names(n_blocks: int) -> dict[str, str]:
    """GGUF tensor name (without `.weight`) -> the Hugging Face `LlamaForCausalLM` name, from TensorNameMap."""

    tmap = TensorNameMap(MODEL_ARCH.LLAMA, n_blocks)
    out: dict[str, str] = {}
    for key, (_, gguf_name) in tmap.mapping.items():
        # TensorNameMap lists every family's spelling; LlamaForCausalLM's are the `model.*` ones and lm_head.
        if (key.startswith("model.") or key == "lm_head") and gguf_name not in out:
            out[gguf_name] = key
    return out


def _to_array(tensor) -> np.ndarray:
    """A GGUF tensor as a numpy array in Hugging Face orientation (rows = output features)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type.name
    if kind in _FLOAT_TYPES:
        return np.asarray(tensor.data).reshape(shape)

    return dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def check_sentencepiece(reader, tokenizer_model: Path) -> None:
    """The SentencePiece model must have exactly the GGUF's vocabulary (pieces in the same order)."""

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    if tokens != pieces:
        diff = next(
            (i for i, (a, b) in enumerate(zip(tokens, pieces)) if a != b), min(len(tokens), len(pieces))
        )
        raise EdgemergeError(
            f"{tokenizer_model} does not match the GGUF's vocabulary ({len(pieces)} vs {len(tokens)} tokens, "
            f"first difference at id {diff}); give the SentencePiece model the GGUF was converted from"
        )


def write_tokenizer(out: Path, tokenizer_model: Path, chat_template: str | None) -> None:
    """A Llama SentencePiece tokenizer folder: tokenizer.model (kept for GGUF export) + transformers' files."""
    # transformers is heavy to import (seconds): loaded only when a tokenizer or config is read
    from transformers import LlamaTokenizer

    shutil.copy(tokenizer_model, out / "tokenizer.model")
    with no_stdin():  # `out` is our own folder, but no library call may ever wait on stdin
        tok = LlamaTokenizer.from_pretrained(
            out, add_bos_token=True, add_eos_token=False, legacy=True, local_files_only=True
        )
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(out)


def gguf_to_hf(
    gguf_file: Path,
    out_dir: Path,
    *,
    tokenizer_model: Path,
    chat_template: str | None = None,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Convert a Llama GGUF to a Hugging Face folder loadable by `LlamaForCausalLM.from_pretrained`.

    Tensors keep their float dtype (F32 -> float32, F16 -> float16; quantized types are dequantized to
    float32). q/k projections are un-permuted (see `unpermute_rotary`). Shards of at most `shard_bytes` are
    written one at a time, so only one shard is held in memory.
    """

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise EdgemergeError(f"{gguf_file} not found: give the path of a .gguf file")
    read_gguf(gguf_file)  # bounded checks first: GGUFReader's work grows with the counts a header claims
    try:
        reader = GGUFReader(gguf_file)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise EdgemergeError(f"{gguf_file} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    shape = read_shape(reader)
    if not Path(tokenizer_model).is_file():
        raise EdgemergeError(
            f"tokenizer {tokenizer_model} not found: give the SentencePiece .model file the GGUF was converted from"
        )
    check_sentencepiece(reader, Path(tokenizer_model))
    names = hf_names(shape.num_hidden_layers)
    dtypes = {t.tensor_type.name for t in reader.tensors}
    torch_dtype = "float16" if dtypes <= {"F16"} else "float32"

    with atomic_output(out_dir, force=force, inputs=[gguf_file, Path(tokenizer_model)], kind="hf") as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        weight_map: dict[str, int] = {}
        written: list[str] = []

        def flush() -> None:
            nonlocal size
            if shards[-1]:
                idx = len(written)
                fname = f"model-{idx:05d}.safetensors"
                save_file(shards[-1], str(tmp / fname), metadata={"format": "pt"})
                written.append(fname)
                for k in shards[-1]:
                    weight_map[k] = idx
                shards[-1] = {}
                size = 0

        for t in reader.tensors:
            base, _, suffix = t.name.rpartition(".")
            hf = names.get(base)
            if hf is None or suffix != "weight":
                raise EdgemergeError(f"{gguf_file}: tensor {t.name} has no Llama Hugging Face equivalent")
            arr = _to_array(t)
            if base.endswith("attn_q"):
                arr = unpermute_rotary(arr, shape.num_attention_heads)
            elif base.endswith("attn_k"):
                arr = unpermute_rotary(arr, shape.num_key_value_heads)
            arr = np.ascontiguousarray(arr)
            if size and size + arr.nbytes > shard_bytes:
                flush()
            shards[-1][f"{hf}.weight"] = arr
            size += arr.nbytes
        flush()
        _write_index(tmp, written, weight_map)
        _write_config(tmp, shape, torch_dtype)
        write_tokenizer(tmp, Path(tokenizer_model), chat_template)
    return out_dir


def _write_index(folder: Path, files: list[str], weight_map: dict[str, int]) -> None:
    n = len(files)
    final = {
        f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        for i, f in enumerate(files)
    }
    for f, name in final.items():
        (folder / f).rename(folder / name)
    if n > 1:
        index = {"metadata": {}, "weight_map": {k: final[files[i]] for k, i in weight_map.items()}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(folder: Path, shape: LlamaShape, torch_dtype: str) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "initializer_range": 0.02,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "rope_scaling": None,
        **{k: v for k, v in shape.__dict__.items()},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": shape.bos_token_id, "eos_token_id": shape.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
