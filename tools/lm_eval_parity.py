"""Our benchmark scores against lm-evaluation-harness itself, on one GGUF and the same local data.

lm-eval runs its own task files (its YAMLs and utils.py, pointed at the local JSON files) with its `gguf` model,
which asks llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) for echo + logprobs
completions of context + continuation; edgemerge runs the same tasks through `evaluate.bench`. Compared: per
question the chosen answer, per task acc / acc_norm (within 1e-6), and the log-likelihoods: lm-eval's gguf
model finds the continuation's tokens by the server's character offsets, and llama-cpp-python's offsets of a
SentencePiece vocabulary count the leading space of the first token, so the context's last token is counted
in the continuation too: the same constant for every answer of a question (no score changes; acc_norm of
unequal-length answers could). The log-likelihoods are compared as differences between a question's answers.

    python tools/lm_eval_parity.py MODEL.gguf --data ../shared/data/bench --task eus_trivia --fewshot 1 --limit 20

Needs: pip install lm-eval fastapi uvicorn sse-starlette pydantic-settings starlette-context
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemerge.evaluate.bench import prepare_tasks, run_tasks
from edgemerge.evaluate.taskfile import resolve_tasks
from edgemerge.runtime import Model

SERVER_START_SECONDS = 120
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")


def missing_requirements() -> str | None:
    """Why this comparison cannot run here (a package absent), or None."""
    import importlib.util

    for mod in ("lm_eval", *SERVER_MODULES):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install lm-eval fastapi uvicorn sse-starlette pydantic-settings starlette-context)"
    return None


def lm_eval_task(name: str, data: Path, shots: int, cache: Path):
    """lm-eval's own Task for `name` from its own YAML (and utils.py), reading our local files."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's TaskManager reads task files with

    (t,) = resolve_tasks([name], data)
    root = Path(lm_eval.__file__).parent / "tasks"
    folder = {"eus_trivia": "eus_trivia", "eus_exams_eu": "eus_exams"}.get(t.spec.task, "truthfulqa-multi")
    cfg = load_yaml(root / folder / f"{name}.yaml", resolve_func=True)
    files = {s: str(t.file(s, data)) for s in t.spec.data_files}

    def local_splits(
        **_,
    ):  # lm-eval's custom_dataset hook; one file per split (their schemas differ slightly)
        return datasets.DatasetDict(
            {
                s: datasets.load_dataset("json", data_files=f, split="train", cache_dir=str(cache))
                for s, f in files.items()
            }
        )

    cfg.update(dataset_path=None, dataset_name=None, dataset_kwargs=None, custom_dataset=local_splits)
    task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)  # lm-eval's evaluator: fewshot_random_seed=1234
    return task


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: Path, n_ctx: int, threads: int, log: Path):
    """llama-cpp-python's server on `model` (a child process), yielding its base URL; stopped on exit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx)]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--n_threads", str(threads), "--n_batch", "512"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:  # the server is up when it answers; each try waits on the socket, not on a timer
            if proc.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not answer within {SERVER_START_SECONDS} s"
                    ) from None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class TaskComparison:
    task: str
    questions: int
    same_choice: int  # questions where both chose the same answer
    metrics: dict[str, tuple[float, float]]  # metric -> (lm-eval, ours)
    max_ll_diff: float  # max |(ll_i - ll_0) lm-eval - (ll_i - ll_0) ours| over answers and questions
    offsets: list[float]  # per question, lm-eval's ll_0 - ours (the context token counted in)

    def agrees(self, tol: float = 1e-6) -> bool:
        return self.same_choice == self.questions and all(abs(a - b) <= tol for a, b in self.metrics.values())


def compare(
    model: Path,
    data: Path,
    tasks: list[tuple[str, int]],
    limit: int,
    work: Path,
    threads: int = 1,
    n_ctx: int = 2048,
) -> list[TaskComparison]:
    """Run lm-eval (gguf model, llama-cpp-python's server) and edgemerge on the same (task, shots) and compare
    the first `limit` questions of each; the metrics compared are the task's and their standard errors."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.gguf import GGUFLM
    from lm_eval.tasks import get_task_dict

    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = [n for n, _ in tasks]
    theirs_tasks = [lm_eval_task(n, data, k, work / "hf-cache") for n, k in tasks]
    with serve(model, n_ctx, threads, work / "server.log") as url:
        # bootstrap_iters > 0 turns lm-eval's standard errors on (acc's is its closed-form mean_stderr)
        theirs = evaluate(
            lm=GGUFLM(base_url=url), task_dict=get_task_dict(theirs_tasks), limit=limit, bootstrap_iters=1000
        )
    prepared = [prepare_tasks([n], data, k)[0] for n, k in tasks]
    with Model(model, n_ctx=n_ctx, n_threads=threads) as m:
        ours = run_tasks(m, prepared, limit)
    out = []
    for name, r in zip(names, ours):
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        lls = [[float(x[0][0]) for x in s["resps"]] for s in samples]
        res = theirs["results"][name]
        metrics = {m: (float(res[f"{m},none"]), r.metrics[m]) for m in r.metrics}
        metrics |= {f"{m}_stderr": (float(res[f"{m}_stderr,none"]), r.stderrs[m]) for m in r.metrics}
        same = sum(int(np.argmax(a)) == p for a, p in zip(lls, r.predictions))
        diffs = [np.abs((np.array(a) - a[0]) - (np.array(b) - b[0])).max() for a, b in zip(lls, r.logliks)]
        offsets = [a[0] - b[0] for a, b in zip(lls, r.logliks)]
        out.append(TaskComparison(name, len(samples), same, metrics, float(max(diffs)), offsets))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("lm-eval-parity"))
    args = ap.parse_args()
    why = missing_requirements()
    if why:
        sys.exit(why)
    tasks = [(t, args.fewshot) for t in args.task]
    rows = compare(args.model, args.data, tasks, args.limit, args.work, args.threads)
    for c in rows:
        print(
            json.dumps(
                {
                    "task": c.task,
                    "questions": c.questions,
                    "same_choice": c.same_choice,
                    "metrics": {k: {"lm_eval": a, "edgemerge": b} for k, (a, b) in c.metrics.items()},
                    "max_ll_difference_between_answers": c.max_ll_diff,
                    "ll_offset_range": [min(c.offsets), max(c.offsets)],
                    "agrees": c.agrees(),
                }
            )
        )
    sys.exit(0 if all(c.agrees() for c in rows) else 1)


if __name__ == "__main__":
    main()
