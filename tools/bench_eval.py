"""Benchmark the build's evaluation stage on the 1.1B bench family: the path before issue 12 against today's.

Phases (each a subprocess timed on the wall clock with the peak RSS of its process tree, `bench.run_stage`):
  baseline  the eval stage as the build ran it before: `edgemerge eval` of the F16 file, then of Q4_K_M and Q8_0
            each with `--ref F16` (the reference loaded beside the quant and recomputed per quant; answers
            generated one prompt at a time), from a git worktree of --baseline-rev
  new       today's code, the same three evaluations as today's build runs them: the F16 first (its
            log-probabilities stored with --save-logits), then each quant against the stored file
            (--ref-logits): one model in memory, answers decoded as parallel sequences
  build     `edgemerge build` of the family (F16 + Q4_K_M + Q8_0, default eval settings) from scratch, without a
            memory limit and then inside `laptop-sim` with a limit of the F16 file's size: a 1.1B model under
            2.2 GB stands for an 8B model (16 GB F16) on a 16 GB laptop
Results are kept per phase in WORK/bench-eval.json, so the phases can run one after another on an idle machine;
the tables compare what is there.

    python tools/bench_family.py /work/bench 1b      # the family (once)
    python tools/bench_eval.py /work/bench/1b --work /work/bench/eval --phases baseline,new,build
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import run_stage

REPO = Path(__file__).resolve().parent.parent
QUANTS = ("Q4_K_M", "Q8_0")
LANG = "eu"
LAPTOP_SIM = REPO.parent / "shared" / "tools" / "laptop-sim"
_EDGEMERGE = "from edgemerge.cli import main; main()"


def edgemerge(src: Path) -> list[str]:
    """The command that runs edgemerge from source tree `src` (the same venv for both trees)."""
    return ["env", f"PYTHONPATH={src}", sys.executable, "-c", _EDGEMERGE]


def baseline_tree(rev: str, work: Path) -> Path:
    """A git worktree of `rev` (made once)."""
    tree = work / f"baseline-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def files(dist: Path, name: str) -> dict[str, Path]:
    return {t: dist / f"{name}-{t}.gguf" for t in ("F16", *QUANTS)}


def report_figures(path: Path) -> dict:
    """What a phase keeps of an eval report: metrics, answer tokens and the report's own timings."""
    r = json.loads(path.read_text(encoding="utf-8"))
    keep = (
        "perplexity", "language_fidelity", "instruction_following", "stop_rate", "kld_mean", "top1_agreement",
        "ppl_ratio", "seconds", "answer_seconds", "answer_batch", "threads", "chat_skipped",
    )  # fmt: skip
    out = {k: r.get(k) for k in keep}
    out["report_seconds"] = out.pop("seconds")
    out["answer_tokens"] = sum(x["tokens"] for x in r.get("responses", []))
    out["answers"] = [x["answer"] for x in r.get("responses", [])]
    return out


def run_evals(tree: Path, ggufs: dict[str, Path], out: Path, log: Path, *, stored: bool) -> dict:
    """The build's eval stage as three `edgemerge eval` processes (stored: the new path's flags)."""
    out.mkdir(parents=True, exist_ok=True)
    ref_file = out / "F16.logits"
    res = {}
    for t, f in ggufs.items():
        cmd = [*edgemerge(tree), "eval", str(f), "--lang", LANG, "--report", str(out / f"{t}.json")]
        if t != "F16":
            cmd += ["--ref-logits", str(ref_file)] if stored else ["--ref", str(ggufs["F16"])]
        elif stored:
            cmd += ["--save-logits", str(ref_file)]
        st = run_stage(f"eval {t}", cmd, log)
        res[t] = report_figures(out / f"{t}.json")
        res[t] |= {"seconds": st.seconds, "peak_rss": st.peak_rss, "peak_anon": st.peak_anon}
        print(f"  eval {t}: {st.seconds:.0f} s, peak RSS {st.peak_rss / 2**30:.2f} GB", flush=True)
    return res


def cold_cache() -> None:
    """Both builds start with nothing cached (laptop-sim does not charge pages cached before it started)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("  (cannot drop the page cache: not root; the builds start warm)", flush=True)


def run_build(family: Path, out: Path, log: Path, limit: int | None) -> dict:
    """A default build from scratch (F16 + Q4_K_M + Q8_0), optionally inside laptop-sim with `limit` bytes."""
    cmd = [*edgemerge(REPO), "build", "--recipe", str(family / "recipe.yaml"), "--quant", ",".join(QUANTS)]
    cmd += ["--out", str(out), "--force", "--json"]
    if limit is not None:
        cmd = [str(LAPTOP_SIM), str(limit), "--", *cmd]
    summary = out.parent / f"{out.name}.summary.json"
    cold_cache()
    t0 = time.perf_counter()
    with summary.open("wb") as so, log.open("ab") as se:
        proc = subprocess.run(cmd, check=False, stdout=so, stderr=se)
    seconds = time.perf_counter() - t0
    res = {"exit": proc.returncode, "seconds": seconds, "limit": limit}
    if proc.returncode == 0:
        res["summary"] = json.loads(summary.read_text(encoding="utf-8"))
    tail = log.read_text(errors="replace").splitlines()[-3:]
    res["laptop_sim"] = next((x for x in tail if x.startswith("laptop-sim:")), None)
    print(f"  build (limit {limit}): exit {proc.returncode}, {seconds:.0f} s", flush=True)
    return res


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def tables(results: dict) -> str:
    """Markdown: each eval of each path side by side, the eval stage's totals, and the builds."""
    out = []
    old, new = results.get("baseline", {}), results.get("new", {})
    if old or new:
        out += ["| file | path | eval s | answer tokens/s | peak RSS | perplexity | KLD | top-1 | answers as before |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for t in ("F16", *QUANTS):
            for label, res in (("before", old), ("now", new)):
                r = res.get(t)
                if not r:
                    continue
                tps = r["answer_tokens"] / (r.get("answer_seconds") or r["seconds"])
                same = ""
                if label == "now" and old.get(t) and r["answers"] and old[t]["answers"]:
                    k = sum(a == b for a, b in zip(r["answers"], old[t]["answers"]))
                    same = f"{k}/{len(r['answers'])}"
                kld = "" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}"
                top = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.1f}%"
                out.append(
                    f"| {t} | {label} | {r['seconds']:.0f} | {tps:.1f} | {gb(r['peak_rss'])} | "
                    f"{r['perplexity']:.1f} | {kld} | {top} | {same} |"
                )
        if old and new:
            a, b = (sum(x["seconds"] for x in res.values()) for res in (old, new))
            out.append(f"\neval stage (3 files): before {a:.0f} s, now {b:.0f} s: {a / b:.2f}x faster")
    for key in ("build", "build-laptop"):
        r = results.get(key)
        if r:
            mem = ((r.get("summary") or {}).get("memory_plan")) or {}
            lim = "none" if r["limit"] is None else gb(r["limit"])
            out.append(
                f"\n{key}: limit {lim}, exit {r['exit']}, {r['seconds']:.0f} s; {r.get('laptop_sim') or ''}"
            )
            stages = (r.get("summary") or {}).get("stages", {})
            out.append("  stages: " + ", ".join(f"{n} {v['seconds']:.0f} s" for n, v in stages.items()))
            for n, e in mem.get("evals", {}).items():
                out.append(f"  {n}: planned {gb(e['need'])}, " + ("answers" if e["chat"] else e["note"]))
    if results.get("build") and results.get("build-laptop"):
        a, b = results["build"]["seconds"], results["build-laptop"]["seconds"]
        out.append(f"\nlaptop limit / no limit: {b / a:.2f}x the time")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", type=Path, help="a bench family folder (tools/bench_family.py ROOT 1b)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--phases", default="baseline,new,build", help="comma-separated; 'report' prints only")
    ap.add_argument("--baseline-rev", default="ad027a3", help="the commit of the old eval path")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "bench-eval.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    log = work / "bench-eval.log"
    name = json.loads((args.family / "family.json").read_text()).get("name", "bench-1b") + "-eu"
    dist = work / "dist"
    for phase in args.phases.split(","):
        print(f"{phase}:", flush=True)
        if phase in ("baseline", "new") and not files(dist, name)["Q8_0"].exists():
            subprocess.run(
                [*edgemerge(REPO), "build", "--recipe", str(args.family / "recipe.yaml"), "--quant",
                 ",".join(QUANTS), "--skip-eval", "--out", str(dist)], check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        if phase == "baseline":
            tree = baseline_tree(args.baseline_rev, work)
            results[phase] = run_evals(tree, files(dist, name), work / phase, log, stored=False)
        elif phase == "new":
            results[phase] = run_evals(REPO, files(dist, name), work / phase, log, stored=True)
        elif phase == "report":
            continue
        elif phase == "build":
            f16 = files(dist, name)["F16"].stat().st_size
            results["build"] = run_build(args.family, work / "build-free", log, None)
            results["build-laptop"] = run_build(args.family, work / "build-laptop", log, f16)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        results[f"{phase}_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["machine"] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
        results_file.write_text(json.dumps(results, indent=2))
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
