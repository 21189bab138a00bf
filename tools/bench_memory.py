"""Peak memory of `edgemerge merge` as the model grows: the streaming engine should stay flat.

Generates Llama-shaped families (base, instruct, one language model; bf16 safetensors, vocabulary 32,000 with
a real SentencePiece tokenizer) of growing size, merges each with `edgemerge merge` in a fresh process and
reads that process's peak resident set size from the kernel (os.wait4). Prints a table.

    python tools/bench_memory.py                      # 50M, 200M, 600M parameters, torch backend
    python tools/bench_memory.py --sizes 50M 1B --backend mlx --dir /tmp/bench-mem
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgemerge.tensors.sinks import SafetensorsSink
from edgemerge.tensors.spec import TensorSpec

VOCAB = 32000
# hidden, intermediate, layers: about 60M, 220M and 660M parameters with the 32k vocabulary
SHAPES = {"50M": (512, 1536, 8), "200M": (1024, 2816, 12), "600M": (1536, 4096, 20), "1B": (2048, 5632, 16)}
SPM = Path("tokenizers/mistral_sentencepiece/tokenizer.model.v1")
# the paper's settings; the other sparsifiers at density 0.5
OPTIONS = {
    "task_arithmetic": "{}",
    "linear": "{}",
    "della": "{density: 0.5, epsilon: 0.1}",
    "della_linear": "{density: 0.5, epsilon: 0.1}",
    "slerp": "{t: 0.5}",
    "nearswap": "{t: 0.5}",
}


def shared_data() -> Path:
    for c in (os.environ.get("EDGEMERGE_SHARED_DATA", ""), str(ROOT.parent / "shared" / "data")):
        if c and (Path(c) / SPM).exists():
            return Path(c)
    sys.exit("needs ../shared/data (the SentencePiece tokenizer) or EDGEMERGE_SHARED_DATA")


def llama_specs(hidden: int, inter: int, layers: int) -> list[TensorSpec]:
    kv = hidden // 4
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, hidden), "bfloat16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (hidden,), "bfloat16"),
            TensorSpec(p + "self_attn.q_proj.weight", (hidden, hidden), "bfloat16"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, hidden), "bfloat16"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, hidden), "bfloat16"),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, hidden), "bfloat16"),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), "bfloat16"),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, hidden), "bfloat16"),
            TensorSpec(p + "mlp.up_proj.weight", (inter, hidden), "bfloat16"),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, inter), "bfloat16"),
        ]
    specs += [
        TensorSpec("model.norm.weight", (hidden,), "bfloat16"),
        TensorSpec("lm_head.weight", (VOCAB, hidden), "bfloat16"),
    ]
    return specs


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def write_model(
    out: Path, specs: list[TensorSpec], config: dict, seed: int | None, tokenizer: Path | None = None
) -> None:
    """Base weights N(0, 0.02) per tensor name; with a seed, base + N(0, 0.002) (a fine-tune of it). The
    tokenizer: the files of the folder `tokenizer`, else the shared 32k SentencePiece model."""
    if (out / "config.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sink = SafetensorsSink(tmp, max_shard_bytes=1 << 30)
    for name in sink.open(specs):
        shape = next(s.shape for s in specs if s.name == name)
        w = _rng("base", name).standard_normal(shape, dtype=np.float32) * 0.02
        if len(shape) == 1:
            w += 1.0
        if seed is not None:
            w += _rng(seed, name).standard_normal(shape, dtype=np.float32) * 0.002
        sink.write(name, w.astype(ml_dtypes.bfloat16))
        del w
    sink.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is None:
        shutil.copy(shared_data() / SPM, tmp / "tokenizer.model")
    else:
        for f in tokenizer.iterdir():
            shutil.copy(f, tmp / f.name)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tmp.rename(out)


def make_family(root: Path, size: str, method: str = "task_arithmetic") -> tuple[Path, int, int]:
    hidden, inter, layers = SHAPES[size]
    specs = llama_specs(hidden, inter, layers)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 256,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fam = root / size
    for role, seed in (("base", None), ("instruct", 1), ("lang-eu", 2)):
        write_model(fam / role, specs, config, seed)
    recipe = fam / f"recipe-{method}.yaml"
    options = OPTIONS.get(method, "{density: 0.5}")
    recipe.write_text(
        f"name: bench-{size}\ninstruct: ./instruct\nbase: ./base\n"
        f"languages:\n  - {{code: eu, model: ./lang-eu, weight: 1.0}}\nmethod: {method}\noptions: {options}\n"
    )
    params = sum(int(np.prod(s.shape)) for s in specs)
    largest = max(int(np.prod(s.shape)) for s in specs)
    return recipe, params, largest


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Run `cmd`; return its peak RSS in bytes (kernel accounting of that process) and wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["50M", "200M", "600M"], choices=list(SHAPES))
    ap.add_argument("--backend", default="torch")
    ap.add_argument(
        "--method", default="task_arithmetic", help="at the paper's options (OPTIONS), else density 0.5"
    )
    ap.add_argument("--dir", type=Path, default=Path("/tmp/edgemerge-bench-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    exe = [sys.executable, "-c", "from edgemerge.cli import main; main()"]
    base_rss, _ = peak_rss([*exe, "check", "--help"])
    import_rss, _ = peak_rss([sys.executable, "-c", "import torch, edgemerge.merge.engine"])
    rows = []
    for size in args.sizes:
        recipe, params, largest = make_family(args.dir, size, args.method)
        out = args.dir / f"out-{size}"
        rss, seconds = peak_rss(
            [*exe, "merge", str(recipe), "--out", str(out), "--backend", args.backend, "--force"]
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        rows.append((size, params, params * 2, largest * 4, rss, seconds))
    gb = 1024**3
    print(
        f"edgemerge merge, backend {args.backend}, {args.method} (instruct + 1 language model), bf16 -> bf16"
    )
    print(f"process baseline: CLI {base_rss / gb:.2f} GB, torch + engine imported {import_rss / gb:.2f} GB")
    print(
        f"| {'family':<6} | {'params':>8} | {'model (bf16)':>12} | {'largest tensor (f32)':>20} | "
        f"{'peak RSS':>9} | {'time':>7} |"
    )
    print(f"|{'-' * 8}|{'-' * 10}|{'-' * 14}|{'-' * 22}|{'-' * 11}|{'-' * 9}|")
    for size, params, nbytes, largest, rss, seconds in rows:
        print(
            f"| {size:<6} | {params / 1e6:>7.0f}M | {nbytes / gb:>9.2f} GB | {largest / gb:>17.3f} GB | "
            f"{rss / gb:>6.2f} GB | {seconds:>5.1f} s |"
        )


if __name__ == "__main__":
    main()
