"""Pure parts of the benchmark: medians, ratios, the F16 tensor comparison and the tables.

Kept apart from the runner so tests can check them without running mergekit or llama.cpp.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

PEER = "peer"
EDGEMERGE = "edgemerge"
FLOOR = "floor"

# stage names per route; "merge+export" is the part the two routes do differently
PEER_MERGE, PEER_CONVERT, QUANTIZE = "mergekit", "convert f16", "quantize q4_k_m"
EM_MERGE = "merge+export f16"
EM_BUILD = "build"
BUILD_PREFIX = "build: "  # the build's own stage split: shown, never added to totals
FLOOR_STAGE = "read inputs + write merged size"


@dataclass
class Stage:
    """One timed subprocess: wall seconds and peak resident memory of its process tree, in bytes."""

    name: str
    seconds: float
    peak_rss: int
    peak_anon: int = 0  # sampled peak of anonymous memory (RSS without mapped files)


@dataclass
class RouteRun:
    """One repetition of one route on one size."""

    route: str
    stages: list[Stage] = field(default_factory=list)

    def seconds(self, *names: str) -> float:
        """Sum of the named stages' wall times (all stages when no name is given)."""
        return sum(s.seconds for s in self.stages if not names or s.name in names)

    @property
    def peak_rss(self) -> int:
        """Stages run one after another, so the route's peak is the largest stage peak."""
        return max((s.peak_rss for s in self.stages), default=0)

    @property
    def peak_anon(self) -> int:
        return max((s.peak_anon for s in self.stages), default=0)


@dataclass
class Summary:
    """Medians over repetitions of one route: per stage, total, merge+export part; peak RSS (max over reps)."""

    route: str
    stages: dict[str, float]
    peaks: dict[str, int]
    anon: dict[str, int]
    total: float
    merge_export: float
    peak_rss: int
    peak_anon: int
    reps: int


def merge_export_stages(route: str) -> tuple[str, ...]:
    """The stages that turn the three input models into the merged F16 GGUF, each a whole process."""
    return {PEER: (PEER_MERGE, PEER_CONVERT), EDGEMERGE: (EM_MERGE,), FLOOR: (FLOOR_STAGE,)}[route]


def total_stages(route: str, names: list[str]) -> tuple[str, ...]:
    """The stages whose sum is the route's end-to-end time: for edgemerge the `build` process when it ran,
    else its merge and quantize processes; for the others every stage."""
    if route == EDGEMERGE:
        return (EM_BUILD,) if EM_BUILD in names else (EM_MERGE, QUANTIZE)
    return tuple(names)


def summarize(runs: list[RouteRun]) -> Summary:
    """Median of each stage, of the total and of the merge+export sum over repetitions; peak RSS is the max.

    Medians of sums are taken per repetition (median of (a_i + b_i)), not as sums of medians.
    """
    if not runs:
        raise ValueError("no runs to summarize")
    route = runs[0].route
    names = [s.name for s in runs[0].stages]
    stages = {n: statistics.median(r.seconds(n) for r in runs) for n in names}
    peaks = {n: max(s.peak_rss for r in runs for s in r.stages if s.name == n) for n in names}
    anon = {n: max(s.peak_anon for r in runs for s in r.stages if s.name == n) for n in names}
    me, tot = merge_export_stages(route), total_stages(route, names)
    return Summary(
        route=route,
        stages=stages,
        peaks=peaks,
        anon=anon,
        total=statistics.median(r.seconds(*tot) for r in runs),
        merge_export=statistics.median(r.seconds(*me) for r in runs),
        peak_rss=max(r.peak_rss for r in runs),
        peak_anon=max(r.peak_anon for r in runs),
        reps=len(runs),
    )


@dataclass
class Ratios:
    """speedup_merge_export = (mergekit + convert) / edgemerge merge+export; speedup_total = chain / edgemerge;
    floor_ratio = edgemerge merge+export / I/O floor (1.0 would be pure I/O)."""

    speedup_merge_export: float
    speedup_total: float
    floor_ratio: float


def ratios(peer: Summary, em: Summary, floor: Summary) -> Ratios:
    """The three ratios the targets are stated in (see `Ratios`)."""
    return Ratios(
        speedup_merge_export=peer.merge_export / em.merge_export,
        speedup_total=peer.total / em.total,
        floor_ratio=em.merge_export / floor.total,
    )


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of bfloat16 numbers at |x|: 2^(floor(log2 |x|) - 7), 8 significand bits; subnormal floor 2^-133."""
    ax = np.maximum(np.abs(x.astype(np.float32)), np.float32(2.0**-126))
    return np.ldexp(np.float32(1.0), np.floor(np.log2(ax)).astype(np.int32) - 7)


@dataclass
class TensorMatch:
    """Comparison of two routes' merged tensors (as float32), tensor by tensor."""

    tensors: int
    elements: int
    differing: int  # elements that are not equal
    max_steps: float  # largest max|a - b| / ulp_bf16(max|b|) over tensors: bf16 steps at the tensor's scale
    max_rel_rms: float  # largest ||a - b|| / ||b|| over tensors
    worst: str  # tensor holding max_steps
    missing: list[str]

    @property
    def ok(self) -> bool:
        """Same names and shapes, no element more than one bf16 step (at the tensor's largest magnitude) apart,
        and an RMS difference below bf16's unit roundoff 2^-8 in every tensor."""
        return not self.missing and self.max_steps <= 1.0 and self.max_rel_rms <= REL_RMS_TOL


# mergekit computes in bf16 (deltas, their sum, the result: each rounded) and edgemerge in f32 rounded once, so
# elements near zero differ by many of their own ulps while staying within one step at the tensor's scale.
# Measured at 50M: 0.25 steps and 1.7e-4 relative RMS; a language weight off by 10% gives 2.2 steps and 1e-2.
REL_RMS_TOL = 2.0**-8


def compare_tensors(a: Iterable[tuple[str, np.ndarray]], b: dict[str, np.ndarray]) -> TensorMatch:
    """Compare tensors of route A with route B's by name.

    Per tensor: steps = max|a - b| / ulp_bf16(max|b|), rel_rms = ||a - b||_2 / ||b||_2.
    """
    seen: set[str] = set()
    tensors = elements = differing = 0
    max_steps = max_rms = 0.0
    worst, missing = "", []
    for name, x in a:
        seen.add(name)
        if name not in b:
            missing.append(name)
            continue
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(b[name], dtype=np.float32)
        if x.shape != y.shape:
            missing.append(f"{name} (shape {x.shape} vs {y.shape})")
            continue
        diff = x - y
        tensors += 1
        elements += x.size
        differing += int(np.count_nonzero(diff))
        scale = float(np.max(np.abs(y), initial=0.0))
        steps = float(np.max(np.abs(diff), initial=0.0)) / float(bf16_ulp(np.float32(scale)))
        norm = float(np.linalg.norm(y.ravel()))
        max_rms = max(max_rms, float(np.linalg.norm(diff.ravel())) / norm if norm else 0.0)
        if not worst or steps > max_steps:
            max_steps, worst = steps, name
    missing += [n for n in b if n not in seen]
    return TensorMatch(tensors, elements, differing, max_steps, max_rms, worst, missing)


def _mem(rss: int, anon: int) -> str:
    """Peak RSS, and in brackets its anonymous part (without memory-mapped files)."""
    return f"{rss / 1e9:.2f} GB ({anon / 1e9:.2f})"


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.1f} s"


def format_tables(results: list[dict]) -> str:
    """Markdown tables: per size and route the median stage times, total and peak RSS; then the ratios.

    Each result is {"size", "params", "summaries": {route: Summary}, "ratios": Ratios, "match": TensorMatch|None}.
    """
    lines = [
        "| size | route | merge | export | quantize Q4_K_M | other | total | peak RSS (anonymous) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = f"{r['size']} ({r['params'] / 1e9:.2f}B)"
        s = r["summaries"]
        if PEER in s:
            p = s[PEER]
            lines.append(
                f"| {label} | mergekit -> convert_hf_to_gguf.py -> quantize | {_s(p.stages.get(PEER_MERGE))} | "
                f"{_s(p.stages.get(PEER_CONVERT))} | {_s(p.stages.get(QUANTIZE))} | | **{_s(p.total)}** | "
                f"{_mem(p.peak_rss, p.peak_anon)} |"
            )
        if EDGEMERGE in s:
            e = s[EDGEMERGE]
            lines.append(
                f"| {label} | edgemerge merge --gguf (own process) | {_s(e.stages.get(EM_MERGE))} fused | | | | "
                f"{_s(e.stages.get(EM_MERGE))} | {_mem(e.peaks[EM_MERGE], e.anon[EM_MERGE])} |"
            )
            if EM_BUILD in e.stages:
                b = {
                    k.removeprefix(BUILD_PREFIX): v for k, v in e.stages.items() if k.startswith(BUILD_PREFIX)
                }
                quant = sum(v for k, v in b.items() if k.startswith("quantize"))
                other = sum(v for k, v in b.items() if k != "merge" and not k.startswith("quantize"))
                lines.append(
                    f"| {label} | edgemerge build --skip-eval | {_s(b.get('merge'))} fused | | {_s(quant)} | "
                    f"{_s(other)} | **{_s(e.total)}** | {_mem(e.peaks[EM_BUILD], e.anon[EM_BUILD])} |"
                )
            else:
                lines.append(
                    f"| {label} | edgemerge quantize | | | {_s(e.stages.get(QUANTIZE))} | | **{_s(e.total)}** | "
                    f"{_mem(e.peaks[QUANTIZE], e.anon[QUANTIZE])} |"
                )
        if FLOOR in s:
            f = s[FLOOR]
            lines.append(
                f"| {label} | I/O floor: read the 3 inputs, write 1 | | | | | {_s(f.total)} | {_mem(f.peak_rss, f.peak_anon)} |"
            )
    lines += [
        "",
        (
            "| size | merge+export speedup (target >= 3x) | end-to-end speedup (>= 1.4x) | "
            "merge+export / I/O floor (<= 5x) | edgemerge peak RSS, anonymous (< 1.5 GB) | F16 tensors match |"
        ),
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        q, m, s = r.get("ratios"), r.get("match"), r["summaries"]
        if q is None:
            continue
        match = (
            "not checked"
            if m is None
            else (
                f"{'yes' if m.ok else 'NO'}: {m.tensors} tensors, {m.differing / max(m.elements, 1):.1%} of values "
                f"differ, by <= {m.max_steps:.2f} bf16 step, rel. RMS {m.max_rel_rms:.1e}"
            )
        )
        lines.append(
            f"| {r['size']} | {q.speedup_merge_export:.2f}x | {q.speedup_total:.2f}x | {q.floor_ratio:.1f}x | "
            f"{_mem(s[EDGEMERGE].peak_rss, s[EDGEMERGE].peak_anon)} | {match} |"
        )
    return "\n".join(lines)
