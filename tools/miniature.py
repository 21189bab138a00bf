"""A miniature, real reproduction of the merge effect, grown from llama2.c's stories260K.

    python tools/miniature.py --out /tmp/mini

builds, deterministically on CPU:
  base      stories260K converted GGUF -> Hugging Face (edgemerge.gguf.to_hf)
  lang-eu   base continued-pretrained on Basque (UD Basque-BDT + FLORES-200 dev; never devtest)
  instruct  base fine-tuned on English instructions in the chat format "User: ...\\nAssistant: ...</s>"
then runs `edgemerge build` on a recipe per merge (task_arithmetic w = 0.5, 1.0, 1.5 and linear), and evaluates every model
through its GGUF file with llama.cpp on held-out data. Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The end-of-turn marker is the tokenizer's own </s> (id 2): a 512-piece vocabulary has no room for new tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MODELS = ["base", "instruct", "lang-eu", "ta-0.5", "ta-1.0", "ta-1.5", "linear"]
MERGES = {
    "ta-0.5": ("task_arithmetic", 0.5),
    "ta-1.0": ("task_arithmetic", 1.0),
    "ta-1.5": ("task_arithmetic", 1.5),
    "linear": ("linear", 1.0),  # (W_instruct + W_lang-eu) / 2
}


def chat_prompt(question: str) -> str:
    """The prompt CHAT_TEMPLATE renders for one user turn (without the leading <s>)."""
    return f"User: {question}\nAssistant:"


def shared_default(*parts: str) -> Path | None:
    root = Path(os.environ.get("EDGEMERGE_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = root.joinpath(*parts)
    return p if p.exists() else None


@dataclass
class Config:
    out: Path
    seed_gguf: Path | None = field(
        default_factory=lambda: shared_default("models", "stories260K", "stories260K.gguf")
    )
    tokenizer: Path | None = field(
        default_factory=lambda: shared_default("models", "stories260K", "tok512.model")
    )
    lang_text: list[Path] = field(
        default_factory=lambda: [
            p
            for p in (
                shared_default("text", "ud", "eu_bdt-dev.txt"),
                shared_default("text", "ud", "eu_bdt-test.txt"),
                shared_default("text", "flores200", "eus_Latn.dev"),
            )
            if p
        ]
    )
    instruct_data: Path | None = field(
        default_factory=lambda: shared_default("instruct", "rasbt_llms_from_scratch", "instruction-data.json")
    )
    eval_eu: Path | None = field(
        default_factory=lambda: shared_default("text", "flores200", "eus_Latn.devtest")
    )
    eval_en: Path | None = field(
        default_factory=lambda: shared_default("text", "flores200", "eng_Latn.devtest")
    )
    qa_eu: Path | None = field(
        default_factory=lambda: shared_default("bench", "truthfulqa_multi", "eu", "validation.json")
    )
    steps: int = 300
    batch: int = 16
    seq: int = 256
    lr: float = 3e-4
    seed: int = 0
    lines_per_doc: int = 8  # consecutive training lines per pretraining document
    threads: int = 1  # one thread: reproducible sums, and fastest on a shared 2-core machine
    held_out: int = 100  # last N instruction pairs: never trained on, used for ans_ppl_en and stop_rate_en
    eval_lines: int = 0  # 0 = every line / question of the evaluation files
    gen_prompts: int = 40  # greedy answers per language for stop rates
    q8_lines: int = 200  # Basque lines for the Q8_0 vs F16 agreement
    max_new_tokens: int = 96
    force: bool = False


# ---------------------------------------------------------------- data


def read_lines(paths: list[Path]) -> list[str]:
    lines: list[str] = []
    for p in paths:
        if "devtest" in Path(p).name:
            raise SystemExit(f"{p}: devtest files are held out for evaluation; train on dev/UD text only")
        lines += [s.strip() for s in Path(p).read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines


def instruction_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs; the question is the instruction plus its input on a new line."""
    pairs = []
    for ex in json.loads(Path(path).read_text(encoding="utf-8")):
        q = ex["instruction"].strip() + ("\n" + ex["input"].strip() if ex.get("input", "").strip() else "")
        pairs.append((q, ex["output"].strip()))
    return pairs


def qa_pairs(path: Path) -> list[tuple[str, str]]:
    return [
        (ex["question"].strip(), ex["best_answer"].strip())
        for ex in json.loads(Path(path).read_text("utf-8"))
    ]


# ---------------------------------------------------------------- training


def _sp(cfg: Config):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(cfg.tokenizer))


def chat_example(sp, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of one chat turn and the index where the answer starts.

    <s> + "User: q\\nAssistant:" + " answer" + </s>: SentencePiece's dummy prefix gives the answer its space,
    exactly as llama.cpp tokenizes the prompt CHAT_TEMPLATE renders.
    """
    prompt = [sp.bos_id()] + sp.encode(chat_prompt(question))
    return prompt + sp.encode(answer) + [sp.eos_id()], len(prompt)


def text_batches(sp, lines: list[str], cfg: Config, rng: np.random.Generator):
    """Random windows of `seq` tokens from the stream <s> doc1 </s> <s> doc2 </s> ...; loss on every token.

    A document is `cfg.lines_per_doc` consecutive lines joined by spaces, closed by </s> as pretraining
    corpora pack documents. Without any </s> the language model learns that it never comes and its vector
    stops every merge from ending a turn; with a </s> after every sentence it ends every turn after one."""
    import torch

    n = cfg.lines_per_doc
    docs = [" ".join(lines[i : i + n]) for i in range(0, len(lines), n)]
    stream = np.concatenate(
        [np.array([sp.bos_id()] + sp.encode(d) + [sp.eos_id()], dtype=np.int64) for d in docs]
    )
    while True:
        starts = rng.integers(0, len(stream) - cfg.seq - 1, size=cfg.batch)
        x = torch.from_numpy(np.stack([stream[s : s + cfg.seq] for s in starts]))
        yield x, x.clone()


def chat_batches(sp, pairs: list[tuple[str, str]], cfg: Config, rng: np.random.Generator):
    """Batches of chat turns, right-padded; loss on the answer tokens and the end-of-turn </s> only."""
    import torch

    examples = [chat_example(sp, q, a) for q, a in pairs]
    while True:
        picked = [examples[i] for i in rng.integers(0, len(examples), size=cfg.batch)]
        width = min(cfg.seq, max(len(ids) for ids, _ in picked))
        x = torch.full((cfg.batch, width), sp.eos_id(), dtype=torch.long)
        y = torch.full((cfg.batch, width), -100, dtype=torch.long)
        for row, (ids, start) in enumerate(picked):
            ids = ids[:width]
            x[row, : len(ids)] = torch.tensor(ids)
            y[row, start : len(ids)] = torch.tensor(ids[start:])
        yield x, y


def _train_loop(base_dir: Path, batches, cfg: Config, label: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    losses = []
    t0 = time.time()
    for step in range(cfg.steps):
        x, y = next(batches)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            print(
                f"  {label} step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    return model, losses, time.time() - t0


def train(base_dir: Path, out_dir: Path, batches, cfg: Config, label: str) -> dict:
    """Fine-tune a copy of `base_dir` for cfg.steps AdamW steps (no weight decay: only what the data moves
    should move, so the task vector is the training signal alone). Returns the loss curve's ends."""
    import shutil

    import torch

    # process-wide torch settings, restored afterwards (the test suite runs this in-process)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        model, losses, seconds = _train_loop(base_dir, batches, cfg, label)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in base_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, tmp / f.name)
    shutil.copy(base_dir / "generation_config.json", tmp / "generation_config.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "seconds": seconds}


# ---------------------------------------------------------------- evaluation (llama.cpp on the GGUF files)


@dataclass
class EvalSets:
    eu_text: list[str]
    en_text: list[str]
    en_pairs: list[tuple[str, str]]  # held-out instruction pairs
    qa_eu: list[tuple[str, str]]

    @classmethod
    def load(cls, cfg: Config) -> EvalSets:
        n = cfg.eval_lines or None
        read = lambda p: [s.strip() for s in Path(p).read_text(encoding="utf-8").splitlines() if s.strip()][
            :n
        ]
        held = instruction_pairs(cfg.instruct_data)[-cfg.held_out :]
        return cls(read(cfg.eval_eu), read(cfg.eval_en), held[:n], qa_pairs(cfg.qa_eu)[:n])


def answer_perplexity(model, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """exp(mean -log p(answer token | prompt, earlier answer tokens)) over all answer tokens, the prompt
    rendered by the GGUF's own chat template, and the mean p(end-of-turn | prompt, whole answer).

    The end-of-turn token is not in the perplexity (a model that never saw the chat format is judged on the
    answer text alone); its probability after the reference answer says whether the model knows the turn is
    over, independently of where its own greedy answers wander."""
    from edgemerge.runtime import log_softmax

    total, count, p_end = 0.0, 0, []
    eot = model.llm.token_eos()
    for question, answer in pairs:
        prompt = model.chat_tokens([{"role": "user", "content": question}])
        target = model.tokenize(answer, add_special=False)
        ids = (prompt + target + [eot])[: model.n_ctx]
        first = len(prompt) - 1
        logp = log_softmax(model.logits(ids, first)[:-1])
        tgt = np.asarray(ids[first + 1 :])
        scored = logp[np.arange(len(tgt)), tgt]
        if ids[-1] == eot and len(prompt + target) < model.n_ctx:
            p_end.append(math.exp(scored[-1]))
            scored = scored[:-1]
        total -= float(scored.sum())
        count += len(scored)
    return math.exp(total / count), float(np.mean(p_end))


def text_perplexity(model, lines: list[str], ctx: int = 256) -> float:
    """llama.cpp's perplexity (chunks of `ctx` tokens, second halves scored) via edgemerge.evaluate."""
    from edgemerge.evaluate.perplexity import make_chunks, perplexity

    return perplexity(model, make_chunks(model, lines, ctx)).perplexity


def stop_rate(model, questions: list[str], max_new_tokens: int) -> tuple[float, float]:
    """Share of greedy answers (chat template, temperature 0) that end with the end-of-turn token, and the
    mean answer length in tokens (an empty answer also "stops")."""
    stopped = tokens = 0
    for q in questions:
        gen = model.generate(model.chat_tokens([{"role": "user", "content": q}]), max_new_tokens)
        stopped += gen.stopped
        tokens += gen.tokens
    return stopped / len(questions), tokens / len(questions)


def top1_agreement(ref, other, lines: list[str], ctx: int = 256) -> float:
    """Share of positions where two GGUFs of one model (F16, Q8_0) predict the same next token."""
    from edgemerge.evaluate.perplexity import chunk_logits, make_chunks

    chunks = make_chunks(ref, lines, ctx)
    same = total = 0
    for (a, _), (b, _) in zip(chunk_logits(ref, chunks), chunk_logits(other, chunks)):
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
    return same / total


def evaluate_gguf(f16: Path, q8: Path | None, sets: EvalSets, cfg: Config) -> dict:
    from edgemerge.runtime import Model

    out: dict = {}
    with closing(Model(f16, n_ctx=512, n_threads=cfg.threads)) as m:
        out["ppl_eu"] = text_perplexity(m, sets.eu_text)
        out["ppl_en"] = text_perplexity(m, sets.en_text)
        out["ans_ppl_en"], out["eot_prob_en"] = answer_perplexity(m, sets.en_pairs)
        out["ans_ppl_qa_eu"], out["eot_prob_qa_eu"] = answer_perplexity(m, sets.qa_eu)
        eu_questions = [q for q, _ in sets.qa_eu[: cfg.gen_prompts]]
        out["stop_rate"], out["answer_tokens"] = stop_rate(m, eu_questions, cfg.max_new_tokens)
        en_questions = [q for q, _ in sets.en_pairs[: cfg.gen_prompts]]
        out["stop_rate_en"], out["answer_tokens_en"] = stop_rate(m, en_questions, cfg.max_new_tokens)
        if q8 is not None:
            with closing(Model(q8, n_ctx=512, n_threads=cfg.threads)) as mq:
                out["q8_top1_agreement"] = top1_agreement(m, mq, sets.eu_text[: cfg.q8_lines])
    return out


def greedy_story(gguf_file: Path, tokens: int = 40) -> str:
    """llama.cpp's greedy continuation of "Once upon a time" (the round-trip check)."""
    from edgemerge.runtime import Model

    with closing(Model(gguf_file, n_ctx=128, n_threads=1)) as m:
        return m.generate(m.tokenize("Once upon a time"), tokens).text


# ---------------------------------------------------------------- pipeline


def _quantize(src: Path, dst: Path) -> Path:
    from edgemerge.quantize import quantize

    return quantize(src, "Q8_0", dst, threads=1, force=True)


def recipe_dict(name: str, method: str, weight: float, models: Path) -> dict:
    """One merge of the miniature family: W = W_instruct + w (W_lang-eu - W_base), or linear."""
    return {
        "name": f"mini-{name}",
        "instruct": str(models / "instruct"),
        "base": str(models / "base"),
        "languages": [{"code": "eu", "model": str(models / "lang-eu"), "weight": weight}],
        "method": method,
        "dtype": "float32",
        "quants": ["Q8_0"],
        "description": f"stories260K miniature: {name}",
    }


def build_models(cfg: Config) -> dict:
    """base, lang-eu and instruct Hugging Face folders under OUT/models (reused when already built with the
    same settings)."""
    from edgemerge.gguf.to_hf import gguf_to_hf

    models = cfg.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    stamp = models / "settings.json"
    settings = {k: str(v) for k, v in asdict(cfg).items() if k not in EVAL_ONLY}
    settings["version"] = str(TRAINING_VERSION)
    done = all((models / n / "config.json").exists() for n in ("base", "lang-eu", "instruct"))
    if not cfg.force and done and stamp.exists() and json.loads(stamp.read_text()) == settings:
        print("models: reusing", models)
        return json.loads((models / "training.json").read_text())
    stamp.unlink(missing_ok=True)
    gguf_to_hf(
        cfg.seed_gguf, models / "base", tokenizer_model=cfg.tokenizer, chat_template=CHAT_TEMPLATE, force=True
    )
    sp = _sp(cfg)
    lines = read_lines(cfg.lang_text)
    pairs = instruction_pairs(cfg.instruct_data)[: -cfg.held_out]
    training = {
        "lang-eu": train(
            models / "base",
            models / "lang-eu",
            text_batches(sp, lines, cfg, np.random.default_rng(cfg.seed + 1)),
            cfg,
            "lang-eu",
        ),
        "instruct": train(
            models / "base",
            models / "instruct",
            chat_batches(sp, pairs, cfg, np.random.default_rng(cfg.seed + 2)),
            cfg,
            "instruct",
        ),
    }
    (models / "training.json").write_text(json.dumps(training, indent=2))
    stamp.write_text(json.dumps(settings, indent=2))
    return training


def build_ggufs(cfg: Config) -> dict[str, tuple[Path, Path]]:
    """F16 and Q8_0 GGUF of every model: the family by edgemerge's export and quantizer, each merge by
    `edgemerge build` (merge -> F16 GGUF -> Q8_0, packaged; its own evaluation skipped: ours follows)."""
    import yaml

    from edgemerge.build import BuildOptions, build
    from edgemerge.pipeline import export_hf
    from edgemerge.recipe import load_recipe

    models, ggufs, recipes = cfg.out / "models", cfg.out / "gguf", cfg.out / "recipes"
    ggufs.mkdir(exist_ok=True)
    recipes.mkdir(exist_ok=True)
    files: dict[str, tuple[Path, Path]] = {}
    export_hf(models / "base", ggufs / "base.f32.gguf", outtype="f32", force=True)
    for name in ("base", "instruct", "lang-eu"):
        f16 = export_hf(models / name, ggufs / f"{name}.f16.gguf", outtype="f16", force=True)
        files[name] = (f16, _quantize(f16, ggufs / f"{name}-Q8_0.gguf"))
    for name, (method, weight) in MERGES.items():
        path = recipes / f"{name}.yaml"
        recipe = recipe_dict(name, method, weight, models.resolve())
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        options = BuildOptions(
            out=cfg.out / "builds" / name, skip_eval=True, threads=1, backend="torch", force=True
        )
        result = build(load_recipe(path), options)
        files[name] = (result.out / f"{recipe['name']}-F16.gguf", result.out / f"{recipe['name']}-Q8_0.gguf")
    return files


def run(cfg: Config) -> list[dict]:
    """Build the family, merge, evaluate; write OUT/results.json; return its entries."""
    import torch

    missing = [
        k
        for k in ("seed_gguf", "tokenizer", "instruct_data", "eval_eu", "eval_en", "qa_eu")
        if getattr(cfg, k) is None
    ]
    if missing or not cfg.lang_text:
        raise SystemExit(
            f"missing inputs: {', '.join(missing or ['lang_text'])} (pass them, or run where ../shared/data exists)"
        )
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    training = build_models(cfg)
    t_train = time.time() - t0
    files = build_ggufs(cfg)
    t_build = time.time() - t0 - t_train
    sets = EvalSets.load(cfg)
    results = []
    for name in MODELS:
        f16, q8 = files[name]
        entry = {"model": name, **evaluate_gguf(f16, q8, sets, cfg)}
        results.append(entry)
        print(
            "  " + name + " " + " ".join(f"{k}={v:.3g}" for k, v in entry.items() if k != "model"), flush=True
        )
    seed_story = greedy_story(cfg.seed_gguf)
    base_story = greedy_story(cfg.out / "gguf" / "base.f32.gguf")
    summary = {
        "results": results,
        "round_trip": {"seed": seed_story, "base": base_story, "identical": seed_story == base_story},
        "training": training,
        "settings": {k: str(v) for k, v in asdict(cfg).items()},
        "seconds": {"train": t_train, "build": t_build, "eval": time.time() - t0 - t_train - t_build},
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return results


# Settings that do not change the trained models (everything else in Config does, with TRAINING_VERSION).
EVAL_ONLY = (
    "out",
    "eval_eu",
    "eval_en",
    "qa_eu",
    "eval_lines",
    "gen_prompts",
    "q8_lines",
    "max_new_tokens",
    "force",
)
TRAINING_VERSION = 2
COLUMNS = [
    "ppl_eu",
    "ppl_en",
    "ans_ppl_en",
    "ans_ppl_qa_eu",
    "eot_prob_en",
    "stop_rate_en",
    "stop_rate",
    "answer_tokens",
    "q8_top1_agreement",
]


def table(results: list[dict]) -> str:
    """The results as a Markdown table (the README's "Does it work?" table)."""
    head = "| model | " + " | ".join(COLUMNS) + " |"
    rows = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for r in results:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append(
                "" if v is None else f"{v:.2f}" if c.startswith(("stop", "q8", "eot")) else f"{v:.1f}"
            )
        rows.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def claims(results: list[dict]) -> list[dict]:
    """The issue's claim for each merge with w <= 1: ppl_eu <= 0.2x instruct's, ans_ppl_en <= 0.3x lang-eu's,
    ans_ppl_qa_eu <= 0.2x instruct's (all three at once)."""
    by = {r["model"]: r for r in results}
    out = []
    for name in ("ta-0.5", "ta-1.0", "linear"):
        r = by[name]
        ratios = {
            "ppl_eu/instruct": r["ppl_eu"] / by["instruct"]["ppl_eu"],
            "ans_ppl_en/lang-eu": r["ans_ppl_en"] / by["lang-eu"]["ans_ppl_en"],
            "ans_ppl_qa_eu/instruct": r["ans_ppl_qa_eu"] / by["instruct"]["ans_ppl_qa_eu"],
        }
        limits = {"ppl_eu/instruct": 0.2, "ans_ppl_en/lang-eu": 0.3, "ans_ppl_qa_eu/instruct": 0.2}
        out.append({"model": name, **ratios, "holds": all(ratios[k] <= limits[k] for k in limits)})
    return out


def sweep_family(cfg: Config, plot: Path) -> str:
    """`edgemerge sweep` over the trained family (the README's grid), its plot copied to `plot`; returns the
    table and the reason for the choice."""
    import shutil

    from edgemerge.recipe import parse_recipe
    from edgemerge.sweep import SWEEP_PNG, SweepOptions, sweep

    data = recipe_dict("sweep", "task_arithmetic", 1.0, (cfg.out / "models").resolve())
    data["sweep"] = {"weights": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5], "methods": ["task_arithmetic", "linear"]}
    opts = SweepOptions(out=cfg.out / "sweep", threads=cfg.threads, backend="torch", fast=True)
    res = sweep(parse_recipe(data), opts)
    shutil.copyfile(res.out / SWEEP_PNG, plot)
    return res.table() + "\n\n" + res.choice.reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config(out=Path("."))
    p.add_argument("--out", type=Path, required=True, help="output folder (models, GGUFs, results.json)")
    p.add_argument("--seed-gguf", type=Path, default=d.seed_gguf, help="stories260K.gguf")
    p.add_argument(
        "--tokenizer", type=Path, default=d.tokenizer, help="its SentencePiece model (tok512.model)"
    )
    p.add_argument("--lang-text", type=Path, nargs="+", default=d.lang_text, help="Basque training text")
    p.add_argument("--instruct-data", type=Path, default=d.instruct_data, help="instruction-data.json")
    p.add_argument("--eval-eu", type=Path, default=d.eval_eu, help="held-out Basque text (FLORES devtest)")
    p.add_argument("--eval-en", type=Path, default=d.eval_en, help="held-out English text (FLORES devtest)")
    p.add_argument("--qa-eu", type=Path, default=d.qa_eu, help="TruthfulQA-eu validation.json")
    helps = {
        "steps": "AdamW steps per fine-tune",
        "batch": "sequences per step",
        "seq": "tokens per sequence",
        "seed": "random seed (data order)",
        "lines_per_doc": "Basque lines per pretraining document (closed by </s>)",
        "threads": "CPU threads for training and llama.cpp (results are reproducible for a given count)",
        "held_out": "last N instruction pairs kept out of training (ans_ppl_en, stop_rate_en)",
        "eval_lines": "evaluate on the first N lines/questions only (0 = all)",
        "gen_prompts": "greedy answers per language for the stop rates",
        "q8_lines": "Basque lines for the Q8_0 vs F16 top-1 agreement",
        "max_new_tokens": "token limit of a greedy answer",
    }
    for name, text in helps.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=getattr(d, name),
            help=f"{text} ({getattr(d, name)})",
        )
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate ({d.lr})")
    p.add_argument("--force", action="store_true", help="retrain even when OUT/models matches the settings")
    p.add_argument(
        "--sweep-plot",
        type=Path,
        help="also run `edgemerge sweep` (task_arithmetic and linear at 0.25 .. 1.5, --fast) on the family and "
        "copy its sweep.png here (the README's figure: tools/miniature-sweep.png)",
    )
    args = vars(p.parse_args(argv))
    plot = args.pop("sweep_plot")
    cfg = Config(**args)
    results = run(cfg)
    print(table(results))
    if plot is not None:
        print(sweep_family(cfg, plot))
    print("\nissue 7's claim, for each merge with w <= 1 (all three at once):")
    for c in claims(results):
        ratios = "  ".join(f"{k} {v:.3f}" for k, v in c.items() if k not in ("model", "holds"))
        print(f"  {c['model']:7} {ratios}  -> {'holds' if c['holds'] else 'does not hold'}")
    trip = json.loads((cfg.out / "summary.json").read_text())["round_trip"]
    print(
        f"round trip: base greedy text {'identical to' if trip['identical'] else 'DIFFERS from'} the seed GGUF's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
