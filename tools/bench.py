"""Benchmark edgemerge against today's tool chain on generated Llama families (50M, 300M, 1B parameters).

Routes, side by side on the same inputs, each stage a subprocess timed on the wall clock with the peak RSS of
its whole process tree (the kernel's ru_maxrss from wait4, and psutil's sampled sum over the tree when psutil
is installed; the larger is reported):
  peer       mergekit-yaml (task_arithmetic) -> llama.cpp convert_hf_to_gguf.py --outtype f16
             -> llama.cpp quantize Q4_K_M (llama_model_quantize, what llama-quantize calls)
  edgemerge  `edgemerge build --skip-eval` (F16 + Q4_K_M); or `edgemerge merge --gguf` + `edgemerge quantize`
  floor      read the three inputs once and write one file of the merged model's size
Before every route the inputs are read once (page cache warm for both) and dirty pages are flushed (os.sync).
Each route runs --reps times; medians are reported. Afterwards both routes' F16 tensors are compared.

    pip install -e ".[bench]"          # mergekit + psutil; the converter comes from tools/fetch_converter.py
    python tools/bench.py --sizes 50m,300m,1b --reps 3 [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_family import SIZES, make_family, n_params
from bench_stats import (
    BUILD_PREFIX,
    EDGEMERGE,
    EM_BUILD,
    EM_MERGE,
    FLOOR,
    FLOOR_STAGE,
    PEER,
    PEER_CONVERT,
    PEER_MERGE,
    QUANTIZE,
    RouteRun,
    Stage,
    TensorMatch,
    compare_tensors,
    format_tables,
    ratios,
    summarize,
)

INPUT_ROLES = ("base", "instruct", "lang-eu")
_EDGEMERGE = "from edgemerge.cli import main; main()"
_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = 0  # llama.cpp's default: all hardware threads, as llama-quantize
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""
# Read every input once and write the first `n` bytes read to one output: the least work any route must do.
_FLOOR = """
import sys
ins, out, n = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(1 << 24); mv = memoryview(buf)
with open(out, "wb") as w:
    for f in ins:
        with open(f, "rb", buffering=0) as r:
            while k := r.readinto(buf):
                m = min(k, n)
                if m:
                    w.write(mv[:m]); n -= m
"""


class StageFailed(RuntimeError):
    pass


def _tree_pids(pid: int) -> list[int]:
    """The process and its descendants (psutil when installed, else the process alone)."""
    try:
        import psutil

    except ImportError:
        return [pid]
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def _status(pid: int) -> tuple[int, int, int]:
    """(resident, resident anonymous, peak resident) bytes of one process from /proc/<pid>/status. RssFile, the
    difference, is mostly memory-mapped input files: resident, but pages the kernel can drop."""
    fields = dict.fromkeys(("VmRSS", "RssAnon", "VmHWM"), 0)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"], fields["VmHWM"]


def run_stage(name: str, cmd: list[str], log: Path, *, stdout: Path | None = None) -> Stage:
    """Run one stage as a subprocess; wall time and peak RSS of its process tree (bytes).

    Every 20 ms: the sum of VmRSS over the tree (processes running at the same time) and each process's VmHWM
    (the kernel's own peak, so spikes between samples count); and wait4's exact ru_maxrss when it exceeds this
    process's own high-water mark (Linux carries the parent's mark into a forked child, so below it ru_maxrss
    says nothing about the child). The peak of anonymous memory (RssAnon: allocated, not mapped files) too.
    """
    own_hwm = _status(os.getpid())[2]
    os.sync()  # earlier routes' dirty pages must not be flushed on this stage's clock
    with open(log, "ab") as fh, open(stdout or os.devnull, "wb") as out:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out if stdout else fh, stderr=fh)
    peak, peak_anon, hwm, stop = [0], [0], {}, threading.Event()

    def sample() -> None:
        try:
            st = {p: _status(p) for p in _tree_pids(proc.pid)}
        except OSError:  # a process of the tree exited between listing and reading
            return
        peak[0] = max(peak[0], sum(r for r, _, _ in st.values()))
        peak_anon[0] = max(peak_anon[0], sum(a for _, a, _ in st.values()))
        for p, (_, _, h) in st.items():
            hwm[p] = max(hwm.get(p, 0), h)

    def poll() -> None:
        sample()
        while not stop.wait(0.02):
            sample()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stop.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise StageFailed(f"{name} failed (exit {proc.returncode}); see {log}")
    exact = usage.ru_maxrss * 1024 if usage.ru_maxrss * 1024 > own_hwm else 0
    return Stage(name, seconds, max(peak[0], exact, *hwm.values()), peak_anon[0])


def warm(paths: list[Path]) -> None:
    """Read every file once so both routes start with the same warm page cache."""
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def input_files(fam: Path) -> list[Path]:
    return sorted(p for role in INPUT_ROLES for p in (fam / role).iterdir() if p.is_file())


def _clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclasses.dataclass
class Tools:
    mergekit: list[str]
    converter: Path
    edgemerge_route: str  # build | steps


def find_tools(mergekit: str | None, converter: str | None, route: str) -> Tools:
    mk = mergekit or shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(mk).exists() and not shutil.which(mk):
        raise SystemExit(
            "mergekit-yaml not found: pip install -e '.[bench]' (or install mergekit in its own venv and pass "
            "--mergekit VENV/bin/mergekit-yaml)"
        )
    if converter:
        conv = Path(converter)
    else:
        from fetch_converter import fetch

        conv = fetch() / "convert_hf_to_gguf.py"
    if route == "auto":
        r = subprocess.run(
            [sys.executable, "-c", _EDGEMERGE, "build", "--help"], check=False, capture_output=True, text=True
        )
        route = "build" if r.returncode == 0 and "--skip-eval" in r.stdout else "steps"
    return Tools([mk], conv, route)


def peer_route(fam: Path, work: Path, tools: Tools, log: Path) -> tuple[RouteRun, Path]:
    """mergekit-yaml -> convert_hf_to_gguf.py --outtype f16 -> Q4_K_M; returns the run and the F16 path."""
    hf, f16, q4 = work / "peer-merged", work / "peer-F16.gguf", work / "peer-Q4_K_M.gguf"
    _clean(hf, f16, q4)
    run = RouteRun(PEER)
    run.stages.append(run_stage(PEER_MERGE, [*tools.mergekit, str(fam / "mergekit.yaml"), str(hf)], log))
    conv = [sys.executable, str(tools.converter), str(hf), "--outtype", "f16", "--outfile", str(f16)]
    run.stages.append(run_stage(PEER_CONVERT, conv, log))
    run.stages.append(run_stage(QUANTIZE, [sys.executable, "-c", _QUANTIZE, str(f16), str(q4)], log))
    _clean(hf, q4)
    return run, f16


def edgemerge_route(fam: Path, work: Path, tools: Tools, log: Path) -> tuple[RouteRun, Path]:
    """The fused `edgemerge merge --gguf` as its own process (the merge+export figure, start-up included like
    the peers'), then `edgemerge build --skip-eval` to F16 + Q4_K_M (the end-to-end figure), split into its
    stages by its --json summary. Without `build`: merge --gguf + quantize."""
    run = RouteRun(EDGEMERGE)
    recipe = str(fam / "recipe.yaml")
    f16, qdir, out = work / "em-F16.gguf", work / "em-quant", work / "em-build"
    _clean(f16, qdir, out, *work.glob(".em-build*"))  # and the build's cache beside its folder: no reuse
    merge = [
        sys.executable,
        "-c",
        _EDGEMERGE,
        "merge",
        recipe,
        "--gguf",
        str(f16),
        "--outtype",
        "f16",
        "--force",
    ]
    run.stages.append(run_stage(EM_MERGE, merge, log))
    if tools.edgemerge_route == "build":
        _clean(f16)
        cmd = [
            sys.executable,
            "-c",
            _EDGEMERGE,
            "build",
            "--recipe",
            recipe,
            "--quant",
            "Q4_K_M",
            "--skip-eval",
            "--out",
            str(out),
            "--force",
            "--json",
        ]
        summary = work / "build.json"
        stage = run_stage(EM_BUILD, cmd, log, stdout=summary)
        run.stages += [stage, *build_stages(json.loads(summary.read_text()), stage)]
        return run, next(out.glob("*-F16.gguf"))
    qdir.mkdir()
    quant = [
        sys.executable,
        "-c",
        _EDGEMERGE,
        "quantize",
        str(f16),
        "--quant",
        "Q4_K_M",
        "--out-dir",
        str(qdir),
    ]
    run.stages.append(run_stage(QUANTIZE, quant, log))
    _clean(qdir)
    return run, f16


def build_stages(summary: dict, build: Stage) -> list[Stage]:
    """The build's own per-stage times (its --json "stages"), as `build: <stage>` lines; `build: other` is the
    rest of its wall time (start-up, checks, output hashes, packaging)."""
    stages = [
        Stage(f"{BUILD_PREFIX}{k}", float(v["seconds"]), build.peak_rss, build.peak_anon)
        for k, v in summary.get("stages", {}).items()
        if not v.get("cached")
    ]
    rest = build.seconds - sum(s.seconds for s in stages)
    return [*stages, Stage(f"{BUILD_PREFIX}other", max(rest, 0.0), build.peak_rss, build.peak_anon)]


def floor_route(fam: Path, work: Path, log: Path) -> RouteRun:
    out = work / "floor.bin"
    _clean(out)
    size = (fam / "instruct" / "model.safetensors").stat().st_size
    ins = [str(fam / r / "model.safetensors") for r in INPUT_ROLES]
    stage = run_stage(FLOOR_STAGE, [sys.executable, "-c", _FLOOR, *ins, str(out), str(size)], log)
    _clean(out)
    return RouteRun(FLOOR, [stage])


def verify(peer_f16: Path, em_f16: Path) -> TensorMatch:
    """Both routes' merged F16 tensors, read with gguf-py's GGUFReader (memory-mapped), compared by name."""
    from gguf import GGUFReader

    a, b = GGUFReader(peer_f16), GGUFReader(em_f16)
    theirs = {t.name: t.data for t in b.tensors}
    return compare_tensors(((t.name, t.data) for t in a.tensors), theirs)


def verify_apart(peer_f16: Path, em_f16: Path) -> TensorMatch:
    """`verify` in a child process, so this process stays small (its memory would leak into later stages')."""
    code = (
        f"import sys, json, dataclasses; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import bench; print(json.dumps(dataclasses.asdict(bench.verify(*map(bench.Path, sys.argv[1:])))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(peer_f16), str(em_f16)], check=True, capture_output=True
    )
    return TensorMatch(**json.loads(r.stdout))


def profile_merge(fam: Path, work: Path, top: int = 25, near: list[str] | None = None) -> str:
    """Where `edgemerge merge --gguf` spends its time (one extra run, not timed).

    With py-spy (samples every thread at 100 Hz, idle ones too, so waits show): per thread, the functions by
    inclusive and by own samples.
    Without it: cProfile of the main thread (the prefetch thread is invisible to it).
    """
    f16 = work / "profile-F16.gguf"
    args = ["merge", str(fam / "recipe.yaml"), "--gguf", str(f16), "--outtype", "f16", "--force"]
    # py-spy on PATH, beside this python, or beside mergekit-yaml (a bench venv)
    dirs = [str(Path(p).parent) for p in [sys.executable, *(near or [])]]
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.pathsep.join(dirs))
    try:
        if spy:
            raw = work / "merge.pyspy.txt"
            cmd = [spy, "record", "-r", "100", "-f", "raw", "--threads", "--idle", "-o", str(raw), "--"]
            subprocess.run([*cmd, sys.executable, "-c", _EDGEMERGE, *args], check=True, capture_output=True)
            return summarize_pyspy(raw.read_text(), top)
        import io
        import pstats

        prof = work / "merge.prof"
        code = f"import cProfile, sys; from edgemerge.cli import main; sys.argv = ['edgemerge', *{args!r}]; "
        code += f"cProfile.run('main()', {str(prof)!r})"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        buf = io.StringIO()
        stats = pstats.Stats(str(prof), stream=buf)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        return buf.getvalue()
    finally:
        _clean(f16)


_WRAPPERS = ("typer/", "click/", "<frozen ", "threading.py", "concurrent/futures", "<module> (<string>)")


def summarize_pyspy(raw: str, top: int = 25) -> str:
    """Aggregate py-spy's raw output ("thread (tid): name;frame;...;frame count" lines) per thread: module
    loading, then each function's inclusive samples (it or its callees on the stack) and own samples (it is
    the innermost frame). Wrapper frames (CLI, import machinery, thread pool) are left out of the lists."""
    from collections import Counter

    incl: dict[str, Counter] = {}
    own: dict[str, Counter] = {}
    total: Counter = Counter()
    imports: Counter = Counter()
    label: dict[str, str] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        head, _, rest = stack.partition(";")
        tid, _, name = head.partition(": ")
        if name:
            label[tid] = name
        # drop line numbers; a sample without Python frames is native code (or interpreter start/exit)
        frames = [f.split(":")[0] + ")" if ":" in f else f for f in rest.split(";") if f] or ["(native)"]
        n = int(count)
        total[tid] += n
        if any(f.startswith("_find_and_load") for f in frames):
            imports[tid] += n
        kept = [f for f in frames if not any(w in f for w in _WRAPPERS)]
        incl.setdefault(tid, Counter()).update({f: n for f in set(kept)})
        own.setdefault(tid, Counter())[frames[-1]] += n
    out = []
    for tid, n in total.most_common():
        out.append(
            f"{label.get(tid, tid)}: {n} samples ({n / 100:.1f} s at 100 Hz), {imports[tid] / n:.1%} importing"
        )
        out.append("  inclusive:")
        out += [f"    {c / n:6.1%}  {f}" for f, c in incl[tid].most_common(top)]
        out.append("  own:")
        out += [f"    {c / n:6.1%}  {f}" for f, c in own[tid].most_common(top // 2)]
    return "\n".join(out)


def check_disk(root: Path, size: str) -> None:
    """Stop before starting when the family (3 models) and the outputs (about 5 models' worth) cannot fit."""
    model = n_params(SIZES[size]) * 2
    have = (root / size / "family.json").exists()
    needed = (0 if have else 3 * model) + 5 * model
    free = shutil.disk_usage(root).free
    if free < needed:
        raise SystemExit(
            f"{size}: needs {needed / 1e9:.1f} GB free under {root}, {free / 1e9:.1f} GB free (--root)"
        )


def bench_size(size: str, root: Path, tools: Tools, reps: int, routes: list[str], tokenizer: Path | None):
    check_disk(root, size)
    fam = make_family(root, size, tokenizer)
    work = root / f"work-{size}"
    work.mkdir(exist_ok=True)
    log = work / "bench.log"
    inputs = input_files(fam)
    runs: dict[str, list[RouteRun]] = {r: [] for r in routes}
    f16s: dict[str, Path] = {}
    for rep in range(reps):
        for route in routes:
            warm(inputs)
            print(f"[{size}] rep {rep + 1}/{reps}: {route}", file=sys.stderr, flush=True)
            if route == PEER:
                run, f16s[PEER] = peer_route(fam, work, tools, log)
            elif route == EDGEMERGE:
                run, f16s[EDGEMERGE] = edgemerge_route(fam, work, tools, log)
            else:
                run = floor_route(fam, work, log)
            runs[route].append(run)
    summaries = {r: summarize(v) for r, v in runs.items()}
    result = {"size": size, "params": n_params(SIZES[size]), "summaries": summaries, "runs": runs}
    if all(r in summaries for r in (PEER, EDGEMERGE, FLOOR)):
        result["ratios"] = ratios(summaries[PEER], summaries[EDGEMERGE], summaries[FLOOR])
    if PEER in f16s and EDGEMERGE in f16s:
        result["match"] = verify_apart(f16s[PEER], f16s[EDGEMERGE])
    for p in f16s.values():
        _clean(p)
    return result


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        d = dataclasses.asdict(x)
        if hasattr(x, "ok"):
            d["ok"] = x.ok
        return d
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50m,300m,1b", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--reps", type=int, default=3, help="repetitions per route (median reported)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/edgemerge-bench"), help="families and outputs")
    ap.add_argument("--routes", default=f"{FLOOR},{PEER},{EDGEMERGE}")
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece tokenizer.model (32k Llama-2 vocab)")
    ap.add_argument("--mergekit", help="mergekit-yaml executable (default: on PATH or beside python)")
    ap.add_argument("--converter", help="convert_hf_to_gguf.py (default: tools/fetch_converter.py)")
    ap.add_argument(
        "--edgemerge-route",
        choices=["auto", "build", "steps"],
        default="auto",
        help="end to end with `edgemerge build --skip-eval` (auto: when available) or merge --gguf + quantize",
    )
    ap.add_argument("--json", nargs="?", const="-", help="write results as JSON to this file ('-': stdout)")
    ap.add_argument(
        "--profile", action="store_true", help="profile edgemerge's merge+export on the largest size (py-spy)"
    )
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown size(s) {', '.join(bad)}; choose from {', '.join(SIZES)}")
    routes = [r.strip() for r in args.routes.split(",")]
    args.root.mkdir(parents=True, exist_ok=True)
    tools = find_tools(args.mergekit, args.converter, args.edgemerge_route)
    print(f"edgemerge route: {tools.edgemerge_route}; converter: {tools.converter}", file=sys.stderr)
    results = []
    for size in sizes:
        results.append(bench_size(size, args.root, tools, args.reps, routes, args.tokenizer))
        # after each size: the table so far on stderr, the JSON so far on disk (a long run can be cut short)
        print(format_tables(results), file=sys.stderr, flush=True)
        if args.json and args.json != "-":
            Path(args.json).write_text(json.dumps(_jsonable(results), indent=2))
    if args.json == "-":
        print(json.dumps(_jsonable(results), indent=2))
    else:
        print(format_tables(results))
    if args.profile:
        big = max(sizes, key=lambda s: n_params(SIZES[s]))
        print(f"profile of edgemerge merge --gguf, {big}:", file=sys.stderr)
        print(profile_merge(args.root / big, args.root / f"work-{big}", near=tools.mergekit), file=sys.stderr)
    ok = all(r.get("match") is None or r["match"].ok for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
