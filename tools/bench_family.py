"""Generated Llama model families for the benchmark: base, instruct and one language model per size.

Each family is a random Llama-architecture base (bf16, untied embeddings, a real 32k SentencePiece tokenizer)
plus an instruct model and a language model that are the base plus small seeded deltas, so the merge has real
task vectors. Weights are generated and written tensor by tensor (a 1B family never sits in memory): every
tensor's values come from a generator seeded by (tensor index, row block, role), so the three models are
written side by side in one pass.

    python tools/bench_family.py /tmp/edgemerge-bench 50m      # prints the family folder
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

ROLES = ("base", "instruct", "lang-eu")
BASE_STD = 0.02  # HF Llama init std for matrices
DELTA_STD = 0.002  # fine-tune deltas: about a tenth of the weights' spread
_BLOCK = 1 << 24  # elements generated at a time (64 MB of float32)

# Mistral-7B-Instruct-v0.1's chat template: a real template for a Llama-2-style SentencePiece vocabulary.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Size:
    """A Llama shape; parameter counts with the 32,000-token vocabulary are in `SIZES`' comments."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    ctx: int = 2048  # max_position_embeddings (the llama.cpp context the eval may use)


SIZES = {
    "50m": Size("50m", hidden=512, intermediate=1536, layers=6, heads=8, kv_heads=4),  # 52M
    "300m": Size("300m", hidden=1024, intermediate=2816, layers=20, heads=16, kv_heads=8),  # 302M
    "1b": Size(
        "1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4
    ),  # 1.10B (TinyLlama's shape)
    # the same with an 8192-token context: 5-shot eus_exams prompts need up to 2,663 tokens (tools/bench_tasks.py)
    "1b-8k": Size("1b-8k", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, ctx=8192),
}


def tensor_shapes(size: Size) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes, in the order transformers lists them."""
    h, i, hd = size.hidden, size.intermediate, size.hidden // size.heads
    kv = size.kv_heads * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (size.vocab, h))]
    for n in range(size.layers):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (size.vocab, h))]
    return out


def n_params(size: Size) -> int:
    """Sum over tensors of prod(shape)."""
    return sum(int(np.prod(s)) for _, s in tensor_shapes(size))


def _safetensors_header(shapes: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (u64 length + JSON, space-padded to 8 bytes) for bf16 tensors in this order."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js


def _blocks(tensor_index: int, shape: tuple[int, ...]):
    """Yield (base, instruct, lang) float32 blocks of one tensor, row block by row block.

    base = N(0, BASE_STD) for matrices, 1 + 0.1 N(0, 1) for norms; model_r = base + DELTA_STD N(0, 1) per role r.
    """
    n = int(np.prod(shape))
    for b, start in enumerate(range(0, n, _BLOCK)):
        m = min(_BLOCK, n - start)
        gens = [np.random.default_rng([tensor_index, b, r]) for r in range(len(ROLES))]
        base = gens[0].standard_normal(m, dtype=np.float32)
        if len(shape) == 1:
            base = 1.0 + 0.1 * base
        else:
            base *= BASE_STD
        yield [base] + [base + DELTA_STD * g.standard_normal(m, dtype=np.float32) for g in gens[1:]]


def tokenizer_files(spm_model: Path, out: Path) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.model kept, for llama.cpp's SentencePiece path)."""
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import LlamaTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(spm_model, tmp / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(tmp)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _config(size: Size) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.ctx,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["dtype"] = "bfloat16"
    return d


def default_tokenizer() -> Path | None:
    """The Llama-2-style 32k SentencePiece model in ../shared/data, when present."""
    env = os.environ.get("EDGEMERGE_SHARED_DATA")
    roots = [Path(env)] if env else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for r in roots:
        p = r / "tokenizers" / "mistral_sentencepiece" / "tokenizer.model.v1"
        if p.exists():
            return p
    return None


def make_family(root: Path, size: Size | str, tokenizer: Path | None = None) -> Path:
    """Write (or reuse) the family of `size` under root/<name>/: base/, instruct/, lang-eu/, recipe files.

    Returns the family folder. A family is reused when its `family.json` (written last) matches.
    """
    size = SIZES[size] if isinstance(size, str) else size
    tokenizer = tokenizer or default_tokenizer()
    if tokenizer is None or not Path(tokenizer).exists():
        raise SystemExit(
            "no SentencePiece tokenizer: pass --tokenizer PATH/tokenizer.model (a 32k Llama-2 vocab)"
        )
    fam = root / size.name
    # a family made before `ctx` existed is reused: the default context is left out of its stamp
    shape = {k: v for k, v in asdict(size).items() if k != "ctx" or v != 2048}
    stamp = {"size": shape, "base_std": BASE_STD, "delta_std": DELTA_STD, "format": 1}
    done = fam / "family.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return fam
    shutil.rmtree(fam, ignore_errors=True)
    fam.mkdir(parents=True)
    tok = tokenizer_files(Path(tokenizer), root / "tokenizer")
    config = _config(size)
    shapes = tensor_shapes(size)
    header = _safetensors_header(shapes)
    files = []
    for role in ROLES:
        d = fam / role
        d.mkdir()
        for f in tok.iterdir():
            shutil.copyfile(f, d / f.name)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        fh = open(d / "model.safetensors", "wb")  # noqa: SIM115 (three files written side by side)
        fh.write(header)
        files.append(fh)
    # Hand-written safetensors writer: the library's save_file needs every tensor in memory at once.
    try:
        for t, (_, shape) in enumerate(shapes):
            for blocks in _blocks(t, shape):
                for fh, arr in zip(files, blocks):
                    fh.write(arr.astype(ml_dtypes.bfloat16).tobytes())
    finally:
        for fh in files:
            fh.close()
    _write_recipes(fam)
    done.write_text(json.dumps(stamp))
    return fam


def _write_recipes(fam: Path) -> None:
    """The same merge for both routes: W = W_instruct + 1.0 (W_lang - W_base), bf16 output."""
    import yaml

    recipe = {
        "name": f"bench-{fam.name}-eu",
        "instruct": "instruct",
        "base": "base",
        "languages": [{"code": "eu", "model": "lang-eu", "weight": 1.0}],
        "method": "task_arithmetic",
        "dtype": "bfloat16",
        "quants": ["Q4_K_M"],
        "license": "apache-2.0",
    }
    (fam / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    # mergekit's task_arithmetic: base + sum_i w_i (M_i - base), so instruct at weight 1 gives the same formula.
    # No tokenizer_source: all three share the tokenizer, and mergekit then copies it as is.
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam / "base"),
        "models": [
            {"model": str(fam / "instruct"), "parameters": {"weight": 1.0}},
            {"model": str(fam / "lang-eu"), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    (fam / "mergekit.yaml").write_text(yaml.safe_dump(mk, sort_keys=False))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    print(make_family(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else None))
