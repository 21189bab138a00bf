"""What the paper's benchmarks cost on a laptop: `edgemerge eval GGUF --task eus_trivia --task eus_exams_eu
--fewshot K --limit N --data DIR` timed per file and shot count, with an extrapolation to an 8B model.

Each run is a subprocess timed on the wall clock with the peak RSS of its process tree (`bench.run_stage`),
optionally inside `laptop-sim` with a memory limit (`--laptop-sim`: the size of the largest file given, the F16:
a 1.1B model under 2.2 GB stands for an 8B model, 16 GB F16, on a 16 GB laptop). Reported per run: questions,
tokens decoded (each question's prompt once, plus every answer token but the last of the answers of two tokens
or more, counted here with the eval's own prompts and tokenizer), the report's benchmark seconds
(`bench_seconds`: building the prompts and scoring), seconds per 100 questions, tokens per second, peak RSS.

8B extrapolation. Scoring decodes whole prompts in 512-token batches, and every prompt token passes through
every weight matrix of every layer, so the time per token scales with the parameters multiplied per token: all
but the token embedding (a lookup) and the output matrix (multiplied only where logits are asked: a prompt's last
token and the answers' tokens). For one quantization type the file's bytes per parameter are the same at 1B and
8B, so the bytes-read rule gives the same ratio; the measured F16 / Q4_K_M time ratio, printed beside their
bytes ratio (3.4x), says which one limits this CPU (near 1: compute; near 3.4: memory bandwidth). The estimate:

    seconds_8B = seconds per token (1B, same type) x (params_8B / params_1B) x tokens_8B

params_1B from the GGUF (every tensor but token_embd and output), params_8B `--params-8b` (default 6.98e9:
Llama-3.1-8B's 8.03e9 without its two 128,256 x 4,096 matrices), tokens_8B the same prompts tokenized by the
8B's vocabulary when `--vocab` gives one (a llama.cpp vocab GGUF: ggml-vocab-llama-bpe.gguf is Llama 3's), else
the 1B's count. Attention's own cost (growing with the prompt's length) is left out of the rule.

    python tools/bench_family.py /work/bench 1b-8k       # the 1B family with an 8192-token context
    edgemerge build --recipe /work/bench/1b-8k/recipe.yaml --quant Q4_K_M --skip-eval \\
        --out /work/bench/tasks/dist
    python tools/bench_tasks.py /work/bench/tasks/dist/*-F16.gguf /work/bench/tasks/dist/*-Q4_K_M.gguf \\
        --data /work/shared/data/bench --work /work/bench/tasks --laptop-sim \\
        --vocab /work/shared/data/tokenizers/llama.cpp-vocab/ggml-vocab-llama-bpe.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import run_stage

from edgemerge.evaluate.bench import prepare_tasks
from edgemerge.evaluate.harness import requests
from edgemerge.evaluate.loglik import encode_pair
from edgemerge.runtime import Model

REPO = Path(__file__).resolve().parent.parent
LAPTOP_SIM = REPO.parent / "shared" / "tools" / "laptop-sim"
PARAMS_8B = 8.03e9 - 2 * 128256 * 4096  # Llama-3.1-8B without its token embedding and output matrices
_EDGEMERGE = "from edgemerge.cli import main; main()"


class Vocab:
    """A vocabulary-only GGUF as the eval tokenizes (Model.tokenize's signature), to count another model's
    tokens for the same prompts."""

    def __init__(self, path: Path):
        import llama_cpp  # loads the llama.cpp library: only when a vocabulary is asked for

        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def n_params(path: Path) -> int:
    """Elements of every tensor of the GGUF but the token embedding and the output matrix."""
    skip = ("token_embd.weight", "output.weight")
    return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(str(path)).tensors if t.name not in skip)


def decoded_tokens(tokenizer, data: Path, tasks: list[str], shots: int, limit: int) -> tuple[int, int, int]:
    """(questions, tokens decoded, longest prompt + answer) of the run, with `tokenizer`'s tokens."""
    questions = tokens = longest = 0
    for p in prepare_tasks(tasks, data, shots):
        for req in requests(p.docs, p.prompter, p.shots, limit):
            ctx, conts = encode_pair(tokenizer, req.context, req.continuations)
            questions += 1
            tokens += len(ctx) + sum(max(0, len(c) - 1) for c in conts)
            longest = max(longest, len(ctx) + max(len(c) for c in conts))
    return questions, tokens, longest


def run(gguf_path: Path, shots: int, args, limit_bytes: int | None, log: Path) -> dict:
    report = args.work / f"{gguf_path.stem}-{shots}shot{'-laptop' if limit_bytes else ''}.json"
    cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-c", _EDGEMERGE, "eval", str(gguf_path)]
    for t in args.tasks:
        cmd += ["--task", t]
    cmd += [
        "--fewshot",
        str(shots),
        "--limit",
        str(args.limit),
        "--data",
        str(args.data),
        "--report",
        str(report),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if limit_bytes:
        cmd = [str(LAPTOP_SIM), str(limit_bytes), "--", *cmd]
    st = run_stage(f"eval {gguf_path.name} {shots}-shot", cmd, log)
    rep = json.loads(report.read_text(encoding="utf-8"))
    return {
        "file": gguf_path.name, "bytes": gguf_path.stat().st_size, "shots": shots, "limit": limit_bytes,
        "wall_seconds": st.seconds, "bench_seconds": rep["bench_seconds"], "peak_rss": st.peak_rss,
        "questions": sum(r["questions"] for r in rep["benchmarks"] if "subsets" not in r),  # not a family's
    }  # fmt: skip


def table(results: dict) -> str:
    out = [
        "| file | shots | memory limit | questions | tokens decoded | benchmark s | s / 100 q | tokens/s | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        lim = f"{r['limit'] / 2**30:.2f} GB" if r["limit"] else "none"
        out.append(
            f"| {r['file']} | {r['shots']} | {lim} | {r['questions']} | {r['tokens']:,} | {r['bench_seconds']:.1f} "
            f"| {100 * r['bench_seconds'] / r['questions']:.1f} | {r['tokens'] / r['bench_seconds']:.0f} "
            f"| {r['peak_rss'] / 2**30:.2f} GB |"
        )
    free = [r for r in results["runs"] if not r["limit"]]
    files = list(dict.fromkeys(r["file"] for r in free))
    by = {(r["file"], r["shots"]): r for r in free}
    for x in (r for r in free if len(files) > 1 and r["file"] == files[0]):
        y = by.get((files[1], x["shots"]))
        if y:
            out.append(
                f"\n{x['shots']}-shot: {x['file']} takes {x['bench_seconds'] / y['bench_seconds']:.2f}x the time of "
                f"{y['file']} for {x['bytes'] / y['bytes']:.2f}x the bytes (near 1: compute-bound)"
            )
    p8, p1 = results["params_8b"], results["params"]
    out.append(f"\n8B extrapolation (params {p8 / 1e9:.2f}B / {p1 / 1e9:.2f}B = {p8 / p1:.2f}x per token):")
    for r in free:
        per_token = r["bench_seconds"] / r["tokens"]
        t8 = r.get("tokens_8b") or r["tokens"]
        s8 = per_token * p8 / p1 * t8
        vocab = " by the 8B's vocabulary" if r.get("tokens_8b") else ""
        out.append(
            f"  {r['file']} {r['shots']}-shot: {100 * s8 / r['questions']:.0f} s per 100 questions ({t8:,} tokens"
            f"{vocab}, {s8 / 60:.1f} min for the {r['questions']} questions)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ggufs", type=Path, nargs="+", help="the 1B files (F16 first, then Q4_K_M)")
    ap.add_argument("--data", type=Path, required=True, help="the benchmarks' folder (../shared/data/bench)")
    ap.add_argument("--work", type=Path, required=True, help="reports, log and bench-tasks.json go here")
    ap.add_argument("--tasks", default="eus_trivia,eus_exams_eu")
    ap.add_argument("--shots", default="5,0")
    ap.add_argument("--limit", type=int, default=100, help="questions per task (each eus_exams subset)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--laptop-sim", nargs="?", const="f16", default=None, metavar="BYTES",
        help="also run inside laptop-sim with a limit of BYTES (default: the largest file's size, the F16's)",
    )  # fmt: skip
    ap.add_argument("--vocab", type=Path, default=None, help="the 8B's vocabulary GGUF, to count its tokens")
    ap.add_argument("--params-8b", type=float, default=PARAMS_8B)
    args = ap.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "bench-tasks.log"
    shots = [int(s) for s in args.shots.split(",")]
    counts = {}
    with Model(args.ggufs[0], n_ctx=8192, n_threads=1) as m:  # the eval's tokenizer (its context is not used)
        for k in shots:
            counts[k] = decoded_tokens(m, args.data, args.tasks, k, args.limit)
            if counts[k][2] > m.n_ctx:  # the eval would stop on it: say so and leave this shot count out
                print(f"  {k}-shot left out: a prompt needs {counts[k][2]} tokens, the model's context is "
                      f"{m.n_ctx} (the 1b-8k family has 8192)", flush=True)  # fmt: skip
                del counts[k]
    counts_8b = {}
    if args.vocab:
        v = Vocab(args.vocab)
        counts_8b = {k: decoded_tokens(v, args.data, args.tasks, k, args.limit)[1] for k in counts}
    results = {"params": n_params(args.ggufs[0]), "params_8b": args.params_8b, "runs": []}
    limit = None
    if args.laptop_sim:
        f16 = max(f.stat().st_size for f in args.ggufs)
        limit = f16 if args.laptop_sim == "f16" else int(float(args.laptop_sim))
    for f in args.ggufs:
        for k in counts:
            for lim in (None, limit) if limit else (None,):
                r = run(f, k, args, lim, log)
                r |= {"tokens": counts[k][1], "tokens_8b": counts_8b.get(k)}
                if r["questions"] != counts[k][0]:
                    raise SystemExit(
                        f"the report has {r['questions']} questions, {counts[k][0]} were counted"
                    )
                results["runs"].append(r)
                print(f"  {f.name} {k}-shot (limit {lim}): {r['bench_seconds']:.1f} s, {r['questions']} questions",
                      flush=True)  # fmt: skip
    results["at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["machine"] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    (args.work / "bench-tasks.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
