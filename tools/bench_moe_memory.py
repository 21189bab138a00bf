"""Peak memory of a mixture-of-experts merge straight into GGUF, against a dense model with the same largest
tensor: the experts are merged one by one and written as slices of llama.cpp's stacked `ffn_*_exps`, so the
MoE merge should need no more memory than the dense one although it has several times the parameters.

Generates two families (base, instruct, one language model; bf16 safetensors; the real Qwen2 vocabulary, so
both share the largest tensor, the 151k-row embedding): a dense Qwen3 and a Qwen3 MoE with the same hidden size
and vocabulary. Each is merged with `edgemerge merge --gguf` (F16) in a fresh process; the kernel's peak
resident set size of that process is read with os.wait4. Prints a table.

    python tools/bench_moe_memory.py                       # 32 experts, 8 layers
    python tools/bench_moe_memory.py --experts 64 --dir /tmp/bench-moe
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import peak_rss, shared_data, write_model

from edgemerge.tensors.spec import TensorSpec

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 1024, 8, 16, 8, 64
DENSE_FF, EXPERT_FF, EXPERTS_USED = 3072, 768, 4


def qwen2_tokenizer(root: Path) -> Path:
    """The real Qwen2 vocabulary (llama.cpp's vocab GGUF) as a Hugging Face tokenizer folder (cached)."""
    out = root / "tokenizer"
    if not out.exists():
        from transformers import AutoTokenizer

        vocab = shared_data() / "tokenizers" / "llama.cpp-vocab"
        tok = AutoTokenizer.from_pretrained(vocab, gguf_file="ggml-vocab-qwen2.gguf")
        tok.save_pretrained(out.with_name("tokenizer.tmp"))
        out.with_name("tokenizer.tmp").rename(out)
    return out


def _mlp(prefix: str, ff: int) -> list[TensorSpec]:
    """A SwiGLU feed-forward block's three projections (a dense layer's, or one expert's), bf16."""
    shapes = (("gate_proj", (ff, HIDDEN)), ("up_proj", (ff, HIDDEN)), ("down_proj", (HIDDEN, ff)))
    return [TensorSpec(prefix + f"{proj}.weight", shape, "bfloat16") for proj, shape in shapes]


def specs_of(vocab: int, experts: int) -> list[TensorSpec]:
    """A Qwen3 (experts 0) or Qwen3 MoE checkpoint's tensors, bf16."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, HIDDEN), "bfloat16")]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (HIDDEN,), "bfloat16"),
            TensorSpec(p + "self_attn.q_proj.weight", (q, HIDDEN), "bfloat16"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, HIDDEN), "bfloat16"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, HIDDEN), "bfloat16"),
            TensorSpec(p + "self_attn.o_proj.weight", (HIDDEN, q), "bfloat16"),
            TensorSpec(p + "self_attn.q_norm.weight", (HEAD_DIM,), "bfloat16"),
            TensorSpec(p + "self_attn.k_norm.weight", (HEAD_DIM,), "bfloat16"),
            TensorSpec(p + "post_attention_layernorm.weight", (HIDDEN,), "bfloat16"),
        ]
        if experts == 0:
            specs += _mlp(p + "mlp.", DENSE_FF)
        else:
            specs.append(TensorSpec(p + "mlp.gate.weight", (experts, HIDDEN), "bfloat16"))
            for e in range(experts):
                specs += _mlp(p + f"mlp.experts.{e}.", EXPERT_FF)
    specs += [
        TensorSpec("model.norm.weight", (HIDDEN,), "bfloat16"),
        TensorSpec("lm_head.weight", (vocab, HIDDEN), "bfloat16"),
    ]
    return specs


def config_of(vocab: int, experts: int) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": DENSE_FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if experts:
        config.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            num_experts=experts,
            num_experts_per_tok=EXPERTS_USED,
            moe_intermediate_size=EXPERT_FF,
            norm_topk_prob=True,
        )
    return config


def make_family(root: Path, name: str, experts: int, tokenizer: Path) -> tuple[Path, list[TensorSpec]]:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    specs, config = specs_of(vocab, experts), config_of(vocab, experts)
    fam = root / name
    for role, seed in (("base", None), ("instruct", 1), ("lang-eu", 2)):
        write_model(fam / role, specs, config, seed, tokenizer)
    recipe = fam / "recipe.yaml"
    recipe.write_text(
        f"name: bench-{name}\ninstruct: ./instruct\nbase: ./base\n"
        "languages:\n  - {code: eu, model: ./lang-eu, weight: 1.0}\n"
    )
    return recipe, specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/edgemerge-bench-moe"))
    args = ap.parse_args()
    exe = [sys.executable, "-c", "from edgemerge.cli import main; main()"]
    tokenizer = qwen2_tokenizer(args.dir)
    rows = []
    for name, experts in (("dense", 0), (f"moe-{args.experts}", args.experts)):
        recipe, specs = make_family(args.dir, name, experts, tokenizer)
        out = args.dir / f"{name}.gguf"
        rss, seconds = peak_rss([*exe, "merge", str(recipe), "--gguf", str(out), "--force"])
        out.unlink(missing_ok=True)
        params = sum(s.nbytes // 2 for s in specs)
        largest = max(s.nbytes // 2 for s in specs)
        stack = max((s.nbytes // 2 * experts for s in specs if ".experts." in s.name), default=0)
        rows.append((name, params, largest, stack, rss, seconds))
        shutil.rmtree(args.dir / name)  # the next family needs the disk more than a rerun needs this one
    gb = 1024**3
    print(
        f"edgemerge merge --gguf (F16), task arithmetic, instruct + 1 language model, bf16 inputs, {HIDDEN=}"
    )
    print(
        f"| {'family':<8} | {'params':>8} | {'largest tensor (f32)':>20} | {'one expert stack (f32)':>22} | "
        f"{'peak RSS':>9} | {'time':>7} |"
    )
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 22}|{'-' * 24}|{'-' * 11}|{'-' * 9}|")
    for name, params, largest, stack, rss, seconds in rows:
        print(
            f"| {name:<8} | {params / 1e6:>7.0f}M | {largest * 4 / gb:>17.3f} GB | {stack * 4 / gb:>19.3f} GB | "
            f"{rss / gb:>6.2f} GB | {seconds:>5.1f} s |"
        )


if __name__ == "__main__":
    main()
