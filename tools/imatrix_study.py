"""Does target-language calibration help? Importance matrices in four flavours on a small trained model (issue 15).

    python tools/imatrix_study.py --out /tmp/imatrix-study [--train-minutes 12]

builds, deterministically on CPU:
  model     a Llama grown from scratch (hidden 256, FFN 768, 4 layers, 4 heads of 64: every weight row is a
            multiple of 256, so K- and I-quants apply to all of them) with stories260K's 512-piece SentencePiece
            tokenizer, trained on the real Basque and English text of ../shared/data/text/by_lang, every
            FLORES-200 line removed (devtest is the evaluation text, dev the bundled calibration text: neither
            is seen in training)
  F16       its GGUF, by edgemerge's export
  imatrices `edgemerge imatrix` (edgemerge.imatrix.make_imatrix, chunks of 512, every chunk the text gives):
            en (bundled FLORES dev English), eu (bundled FLORES dev Basque), mixed (eu --mix en)
  quants    Q4_K_M, IQ4_XS, Q3_K_M, IQ3_M, IQ2_M, Q2_K, each with no imatrix and with each of the three
            (IQ2_M needs one: its "none" cell is n/a)
then measures every quant through llama.cpp on held-out FLORES-200 devtest Basque and English: perplexity, and
the KL divergence from the F16 and top-1 agreement (edgemerge.evaluate: the F16's log-probabilities stored in
llama-perplexity's --kl-divergence-base format, each quant compared over the same chunks of 512 tokens).
Noise: the standard error of each mean over its chunks, and of the paired per-chunk differences between two
imatrices; and the imatrix's own noise floor, from two more imatrices per language computed on the two halves
of its bundled text (eu-a/eu-b, en-a/en-b: same language, other sentences). Writes OUT/results.json and
prints Markdown tables. The trained model is kept in OUT/model and reused while the training settings are
unchanged. Everything runs on one thread (--threads): about 11 minutes of training and 25 of the rest on a
2-core machine; a rerun gives the same numbers (on a CPU with AMX, edgemerge loads models without llama.cpp's
extra buffer types, edgemerge/cpu_buffers.py; elsewhere llama.cpp's repacked kernels may move the last digits).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgemerge.evaluate.drift import DriftMeter, reference_chunks
from edgemerge.evaluate.perplexity import make_chunks, perplexity
from edgemerge.evaluate.prompts import read_passages
from edgemerge.evaluate.reference import StoredReference, reference_writer
from edgemerge.gguf.inspect import read_gguf
from edgemerge.gguf.to_hf import write_tokenizer
from edgemerge.imatrix.collect import ImatrixOptions
from edgemerge.imatrix.make import make_imatrix
from edgemerge.imatrix.text import bundled_text
from edgemerge.pipeline import export_hf
from edgemerge.quantize import NEEDS_IMATRIX, quantize
from edgemerge.runtime import Model
from tools.miniature import shared_default, text_batches

QUANTS = ["Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ2_M", "Q2_K"]


@dataclass(frozen=True)
class Calibration:
    """One imatrix: `edgemerge imatrix --lang LANG [--mix M ...]` on the bundled text, or with `half` 0 or 1 on
    the first or second half of LANG's bundled lines alone (given as --text)."""

    lang: str
    mix: tuple[str, ...] = ()
    half: int | None = None


# name -> its calibration; None: quantized without an imatrix
IMATRICES: dict[str, Calibration | None] = {
    "none": None,
    "en": Calibration("en"),
    "eu": Calibration("eu"),
    "mixed": Calibration("eu", ("en",)),
    # the noise floor: two imatrices of one language from disjoint halves of its text
    "eu-a": Calibration("eu", half=0),
    "eu-b": Calibration("eu", half=1),
    "en-a": Calibration("en", half=0),
    "en-b": Calibration("en", half=1),
}
MAIN = ["none", "en", "eu", "mixed"]  # the columns of the main tables
HALVES = [("eu-a", "eu-b"), ("en-a", "en-b")]
EVAL_LANGS = ["eu", "en"]
TRAINING_VERSION = 1
VAL_EVERY = 20


@dataclass
class Config:
    out: Path
    tokenizer: Path | None = field(
        default_factory=lambda: shared_default("models", "stories260K", "tok512.model")
    )
    train_text: list[Path] = field(
        default_factory=lambda: [
            p for p in (shared_default("text", "by_lang", f"{lang}.txt") for lang in ("eu", "en")) if p
        ]
    )
    held_out: list[Path] = field(
        default_factory=lambda: sorted(
            (shared_default("text", "flores200") or Path("/nonexistent")).glob("*")
        )
    )
    eval_eu: Path | None = field(
        default_factory=lambda: shared_default("text", "flores200", "eus_Latn.devtest")
    )
    eval_en: Path | None = field(
        default_factory=lambda: shared_default("text", "flores200", "eng_Latn.devtest")
    )
    hidden: int = 256
    ffn: int = 768
    layers: int = 4
    heads: int = 4
    steps: int = 550
    batch: int = 8
    seq: int = 512
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    lines_per_doc: int = 8  # consecutive lines per pretraining document (tools/miniature.py's text_batches)
    threads: int = 1  # one thread: beside another job on 2 cores, two threads run 5-10x slower (spin waits)
    train_minutes: float = 12.0  # safety stop before `steps` (a stopped run is not reproducible)
    ctx: int = 512  # tokens per imatrix chunk and per perplexity/KLD chunk (llama.cpp's defaults)
    force: bool = False


# Settings that do not change the trained model.
EVAL_ONLY = ("out", "eval_eu", "eval_en", "ctx", "force", "train_minutes")


# ---------------------------------------------------------------- training


def training_lines(paths: list[Path], held_out: list[Path]) -> list[str]:
    """Non-empty lines of `paths` (stripped), without any line that occurs in a `held_out` file."""
    held = {s.strip() for p in held_out for s in Path(p).read_text(encoding="utf-8").splitlines()}
    lines = []
    for p in paths:
        if "devtest" in Path(p).name:
            raise SystemExit(f"{p}: devtest files are held out for evaluation")
        lines += [s.strip() for s in Path(p).read_text(encoding="utf-8").splitlines() if s.strip()]
    return [s for s in lines if s not in held]


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then cosine decay to cfg.lr / 10 at cfg.steps:
    lr(s) = lr * (0.1 + 0.9 * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)


def llama_config(cfg: Config):
    from transformers import LlamaConfig  # heavy: only when a model is trained

    return LlamaConfig(
        vocab_size=512,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=cfg.seq,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def _train_loop(cfg: Config, batches, val) -> tuple[object, dict]:
    """AdamW from a seeded random init; warm-up and cosine decay (a model from scratch needs both, unlike
    tools/miniature.py's fine-tunes at a constant rate). `val`: one fixed batch of validation text whose loss
    is printed every 100 steps (over-fitting shows as a rising validation loss)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []

    def validate(step: int) -> float:
        model.eval()
        with torch.no_grad():
            v = model(input_ids=val[0], labels=val[1]).loss.item()
        model.train()
        val_losses.append((step, v))
        return v

    t0 = time.time()
    stopped_early = False
    for step in range(cfg.steps):
        if time.time() - t0 > 60 * cfg.train_minutes:
            print(f"  stopping at step {step}: --train-minutes {cfg.train_minutes} reached", flush=True)
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, cfg)
        x, y = next(batches)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            print(
                f"  step {step + 1}/{cfg.steps} loss {loss.item():.3f} validation {validate(step + 1):.3f} "
                f"lr {learning_rate(step, cfg):.2e} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    if val_losses[-1][0] != len(losses):  # stopped by --train-minutes between two reports
        validate(len(losses))
    info = {
        "steps": len(losses),
        "stopped_early": stopped_early,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-20:])),
        "validation_loss": val_losses[-1][1],
        "validation_curve": val_losses,
        "seconds": time.time() - t0,
        "tokens_seen": len(losses) * cfg.batch * cfg.seq,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def train_model(cfg: Config) -> dict:
    """OUT/model: a Hugging Face folder (safetensors, config, tokenizer), reused when trained with the same
    settings. Returns the training summary."""
    import sentencepiece as spm
    import torch

    folder = cfg.out / "model"
    stamp = cfg.out / "model.settings.json"
    settings = {k: str(v) for k, v in asdict(cfg).items() if k not in EVAL_ONLY}
    settings["version"] = str(TRAINING_VERSION)
    if (
        not cfg.force
        and (folder / "config.json").exists()
        and stamp.exists()
        and json.loads(stamp.read_text())["settings"] == settings
    ):
        print("model: reusing", folder)
        return json.loads(stamp.read_text())["training"]
    stamp.unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(cfg.tokenizer))
    lines = training_lines(cfg.train_text, cfg.held_out)
    # every VAL_EVERY-th line is kept out of training to watch over-fitting
    val_lines, lines = lines[::VAL_EVERY], [s for i, s in enumerate(lines) if i % VAL_EVERY]
    print(
        f"training text: {len(lines)} lines, validation {len(val_lines)} (FLORES-200 lines removed)",
        flush=True,
    )
    # process-wide torch settings, restored afterwards
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        batches = text_batches(sp, lines, cfg, np.random.default_rng(cfg.seed + 1))
        val = next(text_batches(sp, val_lines, cfg, np.random.default_rng(cfg.seed + 2)))
        model, info = _train_loop(cfg, batches, val)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    info["lines"] = len(lines)
    info["tokens"] = sum(len(sp.encode(s)) for s in lines)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    write_tokenizer(tmp, cfg.tokenizer, None)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    stamp.write_text(json.dumps({"settings": settings, "training": info}, indent=2))
    return info


# ---------------------------------------------------------------- imatrices and quants


def half_text(text: str, half: int) -> str:
    """The first (0) or second (1) half of the text's lines, cut at the middle line."""
    lines = text.splitlines()
    mid = len(lines) // 2
    return "\n".join(lines[:mid] if half == 0 else lines[mid:]) + "\n"


def make_imatrices(f16: Path, cfg: Config) -> dict[str, dict]:
    """OUT/imatrix/NAME.imatrix.gguf for every imatrix flavour, by `edgemerge imatrix`'s library call."""
    folder = cfg.out / "imatrix"
    folder.mkdir(exist_ok=True)
    out = {}
    for name, c in IMATRICES.items():
        if c is None:
            continue
        path = folder / f"{name}.imatrix.gguf"
        files = []
        if c.half is not None:
            files = [folder / f"{name}.txt"]
            files[0].write_text(half_text(bundled_text(c.lang).text, c.half), encoding="utf-8")
        options = ImatrixOptions(chunk_size=cfg.ctx, threads=cfg.threads)
        r = make_imatrix(f16, path, lang=c.lang, files=files, mix=list(c.mix), options=options, force=True)
        out[name] = {
            "path": str(path),
            "chunks": r.imatrix.chunk_count,
            "texts": r.texts,
            "warnings": r.warnings,
            "seconds": r.seconds,
        }
        print(
            f"  imatrix {name}: {r.imatrix.chunk_count} chunks of {cfg.ctx} in {r.seconds:.0f} s", flush=True
        )
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor kind (blk.N. removed, e.g. "ffn_down.weight") -> the quant types it has in the file, joined."""
    kinds: dict[str, Counter] = {}
    for t in read_gguf(path).tensors:
        kind = t.name.split(".", 2)[2] if t.name.startswith("blk.") else t.name
        kinds.setdefault(kind, Counter())[t.type] += 1
    return {
        k: "+".join(f"{n}x{ty}" if n > 1 else ty for ty, n in sorted(c.items())) for k, c in kinds.items()
    }


def quantize_all(f16: Path, imatrices: dict[str, dict], cfg: Config) -> dict[tuple[str, str], Path | None]:
    """(quant, imatrix name) -> OUT/quants/model-QUANT-NAME.gguf (None where llama.cpp needs an imatrix)."""
    folder = cfg.out / "quants"
    folder.mkdir(exist_ok=True)
    files: dict[tuple[str, str], Path | None] = {}
    for q in QUANTS:
        for name in IMATRICES:
            if name == "none" and q in NEEDS_IMATRIX:
                files[q, name] = None
                continue
            imx = None if name == "none" else Path(imatrices[name]["path"])
            dst = folder / f"model-{q}-{name}.gguf"
            files[q, name] = quantize(f16, q, dst, threads=cfg.threads, force=True, imatrix=imx)
    return files


# ---------------------------------------------------------------- measurement


def save_reference(f16: Path, passages: list[str], path: Path, cfg: Config) -> float:
    """Store the F16's log-probabilities over the chunks of `passages` (llama-perplexity
    --kl-divergence-base's file); returns its perplexity."""
    with closing(Model(f16, n_ctx=cfg.ctx, n_threads=cfg.threads)) as m:
        chunks = make_chunks(m, passages, cfg.ctx, fit=False)
        args = (path, chunks.ctx, m.n_vocab, chunks.tokens, chunks.n_chunks)
        with reference_writer(*args, inputs=[f16]) as write:
            return perplexity(m, chunks, on_chunk=lambda i, lg, tg: write(lg, tg)).perplexity


def measure(gguf: Path, passages: list[str], ref: Path, cfg: Config) -> dict:
    """Perplexity, KL(F16 || quant) and top-1 agreement over the reference's chunks, with each chunk's mean KL
    and the standard error of the mean KL over chunks: se = std(chunk means) / sqrt(chunks)."""
    stored = StoredReference(ref)
    try:
        with closing(Model(gguf, n_ctx=cfg.ctx, n_threads=cfg.threads)) as m:
            tokens = m.tokenize("\n".join(passages), add_special=True)
            chunks = reference_chunks(m, stored, tokens, max_chunks=None)
            meter = DriftMeter(stored)
            p = perplexity(m, chunks, on_chunk=meter)
        d = meter.result()
    finally:
        stored.close()
    per_chunk = np.array([k.mean() for k in meter.kld])
    return {
        "ppl": p.perplexity,
        "kld": d.kld_mean,
        "kld_se": float(per_chunk.std(ddof=1) / math.sqrt(len(per_chunk))),
        "top1": d.top1_agreement,
        "tokens": d.tokens,
        "chunk_kld": per_chunk.tolist(),
    }


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of the per-chunk KL differences a - b (the same chunks, so paired)."""
    diff = np.asarray(a["chunk_kld"]) - np.asarray(b["chunk_kld"])
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


# ---------------------------------------------------------------- tables


def _cells(results: dict, q: str, key: str, fmt: str) -> list[str]:
    out = []
    for lang in EVAL_LANGS:
        for name in MAIN:
            r = results["measured"][lang].get(f"{q}/{name}")
            out.append("n/a" if r is None else format(r[key], fmt))
    return out


def tables(results: dict) -> str:
    """KLD, perplexity and top-1 tables (rows: quant; columns: eval language x imatrix), file sizes, and the
    paired differences eu - en and eu - none with their standard errors, and the noise floor: the difference
    between two imatrices of one language from the two halves of its text."""
    names = MAIN
    head = "| quant | " + " | ".join(f"{lang} {n}" for lang in EVAL_LANGS for n in names) + " |"
    sep = "|" + " --- |" * (1 + len(EVAL_LANGS) * len(names))
    parts = []
    for title, key, fmt in (
        ("Mean KLD vs F16 (nats) on FLORES-200 devtest", "kld", ".5f"),
        ("Perplexity on FLORES-200 devtest", "ppl", ".3f"),
        ("Top-1 agreement with F16", "top1", ".4f"),
    ):
        rows = [f"**{title}** (columns: eval language, imatrix)", "", head, sep]
        if key == "ppl":
            f16 = results["f16_ppl"]
            rows.append(
                "| F16 | " + " | ".join(f"{f16[lang]:.3f}" for lang in EVAL_LANGS for _ in names) + " |"
            )
        rows += [f"| {q} | " + " | ".join(_cells(results, q, key, fmt)) + " |" for q in QUANTS]
        parts.append("\n".join(rows))
    rows = [
        "**Paired KLD differences** (mean of per-chunk differences ± its standard error; "
        + "negative: the first imatrix is better)",
        "",
        "| quant | eu: eu-en | eu: eu-none | eu: mixed-en | en: eu-en | en: eu-none | en: mixed-en |",
        "|" + " --- |" * 7,
    ]
    for q in QUANTS:
        cells = []
        for lang in EVAL_LANGS:
            m = results["measured"][lang]
            for a, b in (("eu", "en"), ("eu", "none"), ("mixed", "en")):
                ra, rb = m.get(f"{q}/{a}"), m.get(f"{q}/{b}")
                if ra is None or rb is None:
                    cells.append("n/a")
                else:
                    d, se = paired(ra, rb)
                    cells.append(f"{d:+.5f} ± {se:.5f}")
        rows.append(f"| {q} | " + " | ".join(cells) + " |")
    parts.append("\n".join(rows))
    halves = [f"{lang}: {x}" for lang in EVAL_LANGS for a, b in HALVES for x in (a, b, f"{a} - {b}")]
    rows = [
        "**Noise floor**: KLD with imatrices from the two halves of one language's text, and their paired "
        + "difference (compare with the eu-en column above)",
        "",
        "| quant | " + " | ".join(halves) + " |",
        "|" + " --- |" * (1 + len(halves)),
    ]
    for q in QUANTS:
        cells = []
        for lang in EVAL_LANGS:
            m = results["measured"][lang]
            for a, b in HALVES:
                d, se = paired(m[f"{q}/{a}"], m[f"{q}/{b}"])
                cells += [
                    f"{m[f'{q}/{a}']['kld']:.5f}",
                    f"{m[f'{q}/{b}']['kld']:.5f}",
                    f"{d:+.5f} ± {se:.5f}",
                ]
        rows.append(f"| {q} | " + " | ".join(cells) + " |")
    parts.append("\n".join(rows))
    rows = [
        "**File sizes** (bytes; bits per weight over all tensors)",
        "",
        "| quant | " + " | ".join(names) + " |",
    ]
    rows.append("|" + " --- |" * (1 + len(names)))
    n_params = results["parameters"]
    f16_size = results["f16_bytes"]
    rows.append(f"| F16 | {f16_size} ({8 * f16_size / n_params:.2f}) |" + " |" * (len(names) - 1))
    for q in QUANTS:
        cells = []
        for name in names:
            s = results["sizes"].get(f"{q}/{name}")
            cells.append("n/a" if s is None else f"{s} ({8 * s / n_params:.2f})")
        rows.append(f"| {q} | " + " | ".join(cells) + " |")
    parts.append("\n".join(rows))
    types = results["tensor_types"]
    kinds = [k for k in types[f"{QUANTS[0]}/eu"] if not k.endswith("norm.weight")]  # norms stay F32
    rows = ["**Tensor types** (files with the eu imatrix; AxT: A of the 4 layers in type T)", ""]
    rows += ["| quant | " + " | ".join(kinds) + " |", "|" + " --- |" * (1 + len(kinds))]
    rows += [f"| {q} | " + " | ".join(types[f"{q}/eu"].get(k, "") for k in kinds) + " |" for q in QUANTS]
    parts.append("\n".join(rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- pipeline


def run(cfg: Config) -> dict:
    """Train (or reuse) the model, export, calibrate, quantize, measure; write OUT/results.json."""
    missing = [k for k in ("tokenizer", "eval_eu", "eval_en") if getattr(cfg, k) is None]
    if missing or not cfg.train_text or not cfg.held_out:
        raise SystemExit(
            f"missing inputs: {missing or ['train_text/held_out']} (run where ../shared/data exists)"
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    training = train_model(cfg)
    seconds = {"train": time.time() - t0}
    print(
        f"training: {training['steps']} steps, loss {training['first_loss']:.3f} -> {training['last_loss']:.3f}, "
        f"{training['seconds']:.0f} s",
        flush=True,
    )
    t = time.time()
    f16 = export_hf(cfg.out / "model", cfg.out / "model-F16.gguf", outtype="f16", force=True)
    imatrices = make_imatrices(f16, cfg)
    seconds["imatrix"] = time.time() - t
    t = time.time()
    files = quantize_all(f16, imatrices, cfg)
    seconds["quantize"] = time.time() - t
    t = time.time()
    texts = {"eu": read_passages(cfg.eval_eu), "en": read_passages(cfg.eval_en)}
    measured: dict[str, dict[str, dict]] = {}
    f16_ppl = {}
    for lang in EVAL_LANGS:
        ref = cfg.out / f"f16-{lang}.logits"
        f16_ppl[lang] = save_reference(f16, texts[lang], ref, cfg)
        measured[lang] = {}
        for (q, name), path in files.items():
            if path is None:
                continue
            r = measured[lang][f"{q}/{name}"] = measure(path, texts[lang], ref, cfg)
            print(
                f"  {lang} {q:7} {name:5} ppl {r['ppl']:.3f} kld {r['kld']:.4f} ± {r['kld_se']:.4f} "
                f"top1 {r['top1']:.4f}",
                flush=True,
            )
    seconds["measure"] = time.time() - t
    seconds["total"] = time.time() - t0
    results = {
        "training": training,
        "parameters": training["parameters"],
        "f16_bytes": f16.stat().st_size,
        "f16_ppl": f16_ppl,
        "imatrices": imatrices,
        "sizes": {f"{q}/{n}": p.stat().st_size for (q, n), p in files.items() if p is not None},
        "tensor_types": {f"{q}/{n}": tensor_types(p) for (q, n), p in files.items() if p is not None},
        "measured": measured,
        "settings": {k: str(v) for k, v in asdict(cfg).items()},
        "seconds": seconds,
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config(out=Path("."))
    p.add_argument("--out", type=Path, required=True, help="output folder (model, GGUFs, results.json)")
    p.add_argument("--tokenizer", type=Path, default=d.tokenizer, help="SentencePiece model (tok512.model)")
    p.add_argument("--train-text", type=Path, nargs="+", default=d.train_text, help="training text files")
    p.add_argument(
        "--held-out", type=Path, nargs="+", default=d.held_out, help="files whose lines are never trained on"
    )
    p.add_argument("--eval-eu", type=Path, default=d.eval_eu, help="held-out Basque text (FLORES devtest)")
    p.add_argument("--eval-en", type=Path, default=d.eval_en, help="held-out English text (FLORES devtest)")
    ints = {
        "steps": "AdamW steps",
        "batch": "sequences per step",
        "seq": "tokens per training sequence (also the model's context)",
        "warmup": "warm-up steps",
        "seed": "random seed (init and data order)",
        "threads": "CPU threads for training and llama.cpp",
        "ctx": "tokens per imatrix and perplexity chunk",
    }
    for name, text in ints.items():
        p.add_argument(f"--{name}", type=int, default=getattr(d, name), help=f"{text} ({getattr(d, name)})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr})")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=d.train_minutes,
        help=f"stop training after this many minutes even before --steps ({d.train_minutes})",
    )
    p.add_argument("--force", action="store_true", help="retrain even when OUT/model matches the settings")
    cfg = Config(**vars(p.parse_args(argv)))
    results = run(cfg)
    print()
    print(tables(results))
    t = results["training"]
    print(
        f"\nmodel: {t['parameters']} parameters; trained {t['steps']} steps ({t['tokens_seen']} tokens seen of "
        f"{t['tokens']} distinct) in {t['seconds']:.0f} s, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}"
    )
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
