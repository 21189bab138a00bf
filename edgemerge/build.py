"""`build`: recipe -> merged GGUF -> quantized GGUFs -> evaluation -> a folder ready to upload.

Stages are cached and resumable. Each stage has a key (sha256 of what determines its output: the recipe's
merge fields and the inputs' revisions/hashes for the merge, the merge key and the quant type for a quant, the
file's key and the eval settings for an eval); a finished stage is recorded with its key, its outputs (size,
mtime, sha256) and its time in the work area beside the output folder (`dist/.<name>.edgemerge/state.json`,
outside the folder so it uploads as is), rewritten atomically after every stage. A rerun skips every stage
whose key and outputs are unchanged, so an interrupted build (Ctrl-C, crash, power loss) restarts where it
stopped and a changed recipe redoes only what the change touches. Library calls write through
`atomic_output`, so partial files never carry a final name.

What a build may delete: the output folder and its work area carry edgemerge's marker (`files.MARKER`); only
a marked folder is ever treated as an earlier build, and only the files its state and manifest list (each path
resolved and kept inside the folder or its work area) are removed. The marker also says whether the build
finished: the card, Modelfile, eval.json and manifest are removed when a build starts changing the folder and
written again at its end, so they describe only a finished build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EdgemergeError
from .files import (
    atomic_output,
    check_path,
    clean_partials,
    contained,
    free_bytes,
    human_bytes,
    is_ours,
    lock_file,
    overlapping_input,
    read_marker,
    remove,
    remove_file,
    write_marker,
)
from .limits import shown_path
from .memory_plan import MemoryPlan, check_chat_possible, plan_memory, shape_from_config
from .package import CARD, EVAL_JSON, MANIFEST, MODELFILE, sha256_file
from .progress import Progress
from .recipe import Recipe
from .resources import Threads, default_threads, memory_limit
from .sources import local_inputs

WORK_SUFFIX = ".edgemerge"
WORK_PREFIX = "@work/"
STATE_FILE = "state.json"
STATE_VERSION = 1
PACKAGE_FILES = (CARD, MODELFILE, EVAL_JSON, MANIFEST)  # rewritten at the end of every build
SPACE_MARGIN = 64 * 1024**2
# Approximate bits per weight of llama.cpp's file types (from llama-quantize's table), for the disk plan only.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.3,
    "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q2_K": 3.0, "IQ4_NL": 4.5, "IQ4_XS": 4.3,
}  # fmt: skip


@dataclass
class BuildOptions:
    """How to build (the recipe says what)."""

    out: Path | None = None  # default dist/<recipe name>
    quants: list[str] | None = None  # default: the recipe's
    weights: list[float] | None = None  # override the language weights, recipe order
    method: str | None = None
    backend: str = "auto"
    outtype: str = "f16"  # the unquantized file: f16 or bf16
    lang: str | None = None  # evaluation language; default the recipe's first
    skip_eval: bool = False
    quick_eval: bool = False
    compare_parents: bool = False
    force: bool = False
    demo: bool = False
    threads: int | None = None
    eval_all: bool = False  # answer the prompts with every file, even one too large for the memory
    skip_chat_eval: bool = False  # perplexity and drift only


@dataclass
class StageRecord:
    name: str
    key: str
    outputs: dict[str, dict]  # path relative to out -> {"size", "mtime_ns", "sha256"}
    seconds: float
    cached: bool = False

    def to_state(self) -> dict:
        return {"key": self.key, "outputs": self.outputs, "seconds": self.seconds}


@dataclass
class StageEvent:
    """Sent to `on_stage` before (`done` False) and after (`done` True) every stage."""

    name: str
    done: bool
    record: StageRecord | None = None


@dataclass
class Plan:
    """Disk space the build still needs, per output."""

    items: dict[str, int]
    free: int
    memory: MemoryPlan | None = None

    @property
    def needed(self) -> int:
        return sum(self.items.values()) + (SPACE_MARGIN if self.items else 0)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.items.items()) or "nothing new to write"
        return f"needs {human_bytes(self.needed)} ({parts}); {human_bytes(self.free)} free"


@dataclass
class BuildResult:
    out: Path
    recipe: Recipe
    lang: str
    files: list[Path]
    stages: dict[str, StageRecord]
    evals: dict[str, Any] = field(default_factory=dict)  # file name -> EvalReport
    parent_evals: dict[str, Any] = field(default_factory=dict)
    gate_failures: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plan: Plan | None = None
    demo: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        manifest = json.loads((self.out / "manifest.json").read_text(encoding="utf-8"))
        return {
            "out": str(self.out),
            "name": self.recipe.name,
            "lang": self.lang,
            "demo": self.demo,
            "seconds": round(self.seconds, 2),
            "files": manifest["files"]
            + [{"name": "manifest.json", "size": (self.out / "manifest.json").stat().st_size}],
            "stages": {
                n: {"seconds": round(r.seconds, 3), "cached": r.cached} for n, r in self.stages.items()
            },
            "eval": {n: _summary(r.to_dict()) for n, r in self.evals.items()},
            "parents": {n: _summary(r.to_dict()) for n, r in self.parent_evals.items()},
            "gate_failures": self.gate_failures,
            "plan": None if self.plan is None else {"needed": self.plan.needed, "free": self.plan.free},
            "memory_plan": None
            if self.plan is None or self.plan.memory is None
            else self.plan.memory.to_dict(),
            "warnings": self.warnings,
        }


def _summary(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "responses"}


def stage_key(*parts: Any) -> str:
    """sha256 of the JSON of `parts`: what determines a stage's output."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def work_dir(out: Path) -> Path:
    """The build's work area, a hidden sibling of the output folder so the folder uploads as is:
    dist/name -> dist/.name.edgemerge (state.json, eval reports, the parent GGUF of --compare-parents)."""
    out = Path(out)
    return out.parent / f".{out.name}{WORK_SUFFIX}"


class BuildState:
    """The finished stages of one output folder, kept in its work area (`work_dir`)."""

    def __init__(self, out: Path):
        self.out = out
        self.work = work_dir(out)
        self.path = self.work / STATE_FILE
        self.data: dict[str, Any] = {"version": STATE_VERSION, "name": None, "stages": {}}
        if self.work.is_dir() and not self.work.is_symlink() and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # a damaged state only costs a rebuild
                data = None
            if _valid_state(data):
                self.data = data

    def relative(self, path: Path) -> str:
        """How an output is recorded: relative to the output folder, or `@work/...` inside the work area
        (so a folder moved together with its work area keeps its finished stages)."""
        path = Path(path)
        if path.is_relative_to(self.work):
            return WORK_PREFIX + path.relative_to(self.work).as_posix()
        return path.relative_to(self.out).as_posix()

    def resolve(self, rel: str) -> Path | None:
        """Where a recorded output is; None when the record points outside the output folder and its work
        area (absolute, `..`, through a symlink): such a path is never read as an output nor deleted."""
        if rel.startswith(WORK_PREFIX):
            return contained(self.work, rel.removeprefix(WORK_PREFIX))
        return contained(self.out, rel)

    def remove_output(self, rel: str) -> None:
        """Delete a recorded output file (only inside the folder or work area; never a folder tree)."""
        path = self.resolve(rel)
        if path is not None:
            remove_file(path)

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        """Write the state atomically and durably (fsynced before the rename the resume logic trusts). A work
        area this build creates is marked as edgemerge's (only a marked one is ever deleted whole)."""
        if not self.work.exists() or (self.work.is_dir() and not any(self.work.iterdir())):
            self.work.mkdir(parents=True, exist_ok=True)
            write_marker(self.work, "work", build=self.out.name)
        with atomic_output(self.path, force=True) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2), encoding="utf-8")

    def finished(self, name: str, key: str) -> dict | None:
        """The record of `name` if it ran with `key` and its outputs are still as it left them."""
        rec = self.stages.get(name)
        if rec is None or rec["key"] != key:
            return None
        for rel, meta in rec["outputs"].items():
            p = self.resolve(rel)
            if p is None or not p.is_file():
                return None
            st = p.stat()
            if st.st_size != meta["size"] or st.st_mtime_ns != meta["mtime_ns"]:
                return None
        return rec


class Stages:
    """Runs stages against a BuildState: skip when finished with the same key, else run and record."""

    def __init__(
        self,
        state: BuildState,
        on_stage: Callable[[StageEvent], None] | None = None,
        progress: Progress | None = None,
    ):
        self.state = state
        self.progress = progress
        self.on_stage = on_stage or (lambda e: None)
        self.records: dict[str, StageRecord] = {}

    def run(
        self,
        name: str,
        key: str,
        outputs: list[Path],
        fn: Callable[[], Any],
        hashes: dict[Path, str] | None = None,
    ) -> StageRecord:
        """Run `fn` unless the state has this stage done with this key; record its outputs' size, mtime and
        sha256 (from `hashes`, which `fn` may fill while writing, else read back)."""
        rec = self.state.finished(name, key)
        if rec is not None:
            record = StageRecord(name, key, rec["outputs"], rec["seconds"], cached=True)
            self.records[name] = record
            self.on_stage(StageEvent(name, True, record))
            return record
        self.on_stage(StageEvent(name, False))
        old = self.state.stages.pop(name, None)
        if old is not None:  # what the stage wrote last time, under names it may not write again
            for rel in old["outputs"]:
                if self.state.resolve(rel) not in outputs:
                    self.state.remove_output(rel)
            self.state.save()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        outs = {}
        for p in outputs:
            st = p.stat()
            outs[self.state.relative(p)] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": (hashes or {}).get(p) or sha256_file(p, self.progress),
            }
        record = StageRecord(name, key, outs, seconds)
        self.state.stages[name] = record.to_state()
        self.state.save()
        self.records[name] = record
        self.on_stage(StageEvent(name, True, record))
        return record


def apply_overrides(recipe: Recipe, options: BuildOptions) -> Recipe:
    """The recipe with --quant, --weight and --method applied (validated like the YAML)."""
    from .recipe import parse_recipe

    data = recipe.to_yaml_dict()
    if options.quants is not None:
        data["quants"] = list(options.quants)
    if options.method is not None:
        data["method"] = options.method
    if options.weights is not None:
        if len(options.weights) == 1:
            weights = options.weights * len(data["languages"])
        elif len(options.weights) == len(data["languages"]):
            weights = options.weights
        else:
            raise EdgemergeError(
                f"--weight: got {len(options.weights)} weights for {len(data['languages'])} languages; give one "
                "weight for all or one per language, in recipe order"
            )
        for lang, w in zip(data["languages"], weights):
            lang["weight"] = w
    return parse_recipe(data, source=recipe.name, root=recipe.root)


def check_quants(quants: list[str]) -> list[str]:
    """Canonical, de-duplicated llama.cpp file type names; EdgemergeError for an unknown one."""
    from .quantize import check_quant

    out = []
    for q in quants:
        name = check_quant(q.strip())
        if name not in out:
            out.append(name)
    return out


def _valid_state(data: Any) -> bool:
    """Whether `data` has the shape of a state file (a planted or damaged one is ignored: it costs a rebuild)."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return False
    if not isinstance(data.get("name"), str | None) or not isinstance(data.get("stages"), dict):
        return False
    for rec in data["stages"].values():
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            return False
        if not isinstance(rec.get("seconds"), int | float) or not isinstance(rec.get("outputs"), dict):
            return False
        for rel, meta in rec["outputs"].items():
            if not isinstance(rel, str) or not isinstance(meta, dict):
                return False
            if not all(isinstance(meta.get(k), int) for k in ("size", "mtime_ns")):
                return False
            if not isinstance(meta.get("sha256"), str):
                return False
    return True


def check_out_path(out: Path, inputs: list[Path]) -> None:
    """The output folder and its work area can be written and are none of the inputs (nor inside or around
    one): refused before anything is locked, written or deleted."""
    check_path(out, "--out")
    for p in (out, work_dir(out)):
        hit = overlapping_input(p, inputs)
        if hit is not None:
            inp, how = hit
            raise EdgemergeError(
                f"--out {shown_path(p)} {how} the input model {shown_path(inp)}; choose an output folder outside the inputs"
            )


def prepare_out(out: Path, name: str, *, force: bool) -> BuildState:
    """Check the output folder (new, empty, or an earlier edgemerge build: the same to resume, another only
    with --force) and its work area, and clean partial files of dead processes (`mark_unfinished` marks the
    folder once the build is about to write into it)."""
    out = Path(out)
    work = work_dir(out)
    check_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise EdgemergeError(f"{shown_path(out)} is a file; give a folder for --out")
    for p in (work, work / "eval", work / "parents"):  # a link there would lead the build's writes elsewhere
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise EdgemergeError(
                f"{shown_path(p)} (in the build's work area) is a symlink or a file edgemerge did not make; move it "
                "away or choose another --out"
            )
    state = BuildState(out)
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None or marker["kind"] != "build":
            raise EdgemergeError(
                f"{shown_path(out)} holds files that are not an edgemerge build; choose another --out (--force "
                "replaces only an earlier edgemerge build, never other files)"
            )
        found = marker.get("name") or state.name
        if found != name and not force:
            raise EdgemergeError(
                f"{shown_path(out)} holds another build ({shown_path(str(found), 60)}); choose another --out or pass "
                "--force to replace it"
            )
        if force:
            _remove_build(out, state)
            write_marker(out, "build", name=name, finished=False)  # the folder is this build's from now on
            state = BuildState(out)
    for folder in (out, state.work, state.work / "eval", state.work / "parents"):
        clean_partials(folder)
    state.data["name"] = name
    return state


def mark_unfinished(out: Path, name: str) -> None:
    """Before a build changes its folder: the folder says it is unfinished and no card, Modelfile, eval.json
    or manifest stays to describe an earlier build (written again, for this one, when it finishes). Creates
    the folder: nothing is written into it before the checks and the disk plan have passed."""
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "build", name=name, finished=False)
    for n in PACKAGE_FILES:
        remove_file(out / n)


def mark_finished(out: Path, name: str) -> None:
    """After the package is written: the folder holds a finished build."""
    write_marker(out, "build", name=name, finished=True)


def _manifest(out: Path) -> dict[str, Any]:
    """A finished folder's manifest.json ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_files(out: Path) -> list[Path]:
    """The files a build's manifest lists, each kept inside `out` (other entries are ignored)."""
    files = _manifest(out).get("files")
    if not isinstance(files, list):
        return []
    paths = [contained(out, f.get("name")) for f in files if isinstance(f, dict)]
    return [p for p in paths if p is not None]


def _remove_build(out: Path, state: BuildState) -> None:
    """Delete what an earlier build wrote (its recorded outputs, the files its manifest lists, its package
    files, its work area when marked as edgemerge's), nothing else. Called only for a marked build folder."""
    for rec in state.stages.values():
        for rel in rec["outputs"]:
            state.remove_output(rel)
    for p in _manifest_files(out):
        remove_file(p)
    for n in PACKAGE_FILES:
        remove_file(out / n)
    work = work_dir(out)
    if is_ours(work, "work"):
        remove(work)
    else:
        remove_file(work / STATE_FILE)


def input_provenance(sources: Any) -> dict[str, dict]:
    """Every input's provenance (ref, revision, file fingerprints) by role, for the merge key and the manifest;
    two inputs under one role would make two models one entry of the key, so that is refused."""
    named = sources.named()
    inputs = {role: src.provenance() for role, src in named}
    if len(inputs) != len(named):
        roles = [role for role, _ in named]
        dup = next(r for r in roles if roles.count(r) > 1)
        raise EdgemergeError(f"two inputs of the recipe share the role {dup!r}; give each language code once")
    return inputs


def input_stamps(sources: Any) -> dict[str, dict[str, list[int]]]:
    """Size and mtime of every local input's weight files, by role, for the cache keys only (not shipped).

    A local safetensors file is fingerprinted by a sample (sources.py: its header and first and last MiB), which
    an in-place edit in the middle of a tensor would not change; such an edit does change the file's mtime, so
    the merge is redone. Hub files are named by their sha256 already."""
    out: dict[str, dict[str, list[int]]] = {}
    for role, src in sources.named():
        stamps: dict[str, list[int]] = {}
        if src.revision is None:
            for f in src.safetensors:
                st = f.stat()
                stamps[f.name] = [st.st_size, st.st_mtime_ns]
        out[role] = stamps
    return out


def plan_space_item(n_params: int, ftype: str) -> int:
    """Bytes a file of `ftype` will take: n_params * bits_per_weight / 8."""
    return int(n_params * BITS_PER_WEIGHT.get(ftype.upper(), 8.5) / 8)


def plan_space(out: Path, n_params: int, todo: dict[str, str]) -> Plan:
    """Bytes each not-yet-built file will take (`plan_space_item`)."""
    return Plan(
        items={label: plan_space_item(n_params, t) for label, t in todo.items()}, free=free_bytes(out)
    )


def _threads(given: int | None) -> Threads:
    """--threads, or the cores other programs leave idle now (`resources.default_threads`)."""
    if given is not None:
        return Threads(given, given, 0.0, "--threads")
    return default_threads()


def build(
    recipe: Recipe,
    options: BuildOptions | None = None,
    *,
    progress: Progress | None = None,
    on_stage: Callable[[StageEvent], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> BuildResult:
    """Run every stage (see the module docstring) and return what was built; gates are reported in the result
    (`gate_failures`), not raised: the caller decides (the CLI exits 3 outside the demo)."""
    t_start = time.perf_counter()
    options = options or BuildOptions()
    recipe = apply_overrides(recipe, options)
    quants = check_quants(recipe.quants)
    lang = options.lang or recipe.lang_codes[0]
    from .merge.backends import resolve_backend_name

    backend = resolve_backend_name(options.backend)  # bad names fail before any work
    if options.outtype.lower() not in ("f16", "bf16"):
        raise EdgemergeError(f"unknown output type {options.outtype!r}; choose f16 or bf16")
    if not options.skip_eval:
        from .evaluate.prompts import load_prompts

        load_prompts(lang)  # an unknown evaluation language fails before any work
    out = Path(options.out or Path("dist") / recipe.name)
    check_out_path(out, local_inputs(recipe))  # before the lock file is made beside it
    with build_lock(out):
        return _build(recipe, options, out, quants, lang, backend, t_start, progress, on_stage, on_plan)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build per output folder at a time: an advisory lock on `.<name>.edgemerge.lock` beside it,
    removed afterwards (see `files.lock_file`)."""
    lock = out.parent / f".{out.name}{WORK_SUFFIX}.lock"
    busy = f"another edgemerge build is writing {shown_path(out)} now; wait for it to finish or choose another --out"
    with lock_file(lock, busy):
        yield


def _build(
    recipe: Recipe,
    options: BuildOptions,
    out: Path,
    quants: list[str],
    lang: str,
    backend: str,
    t_start: float,
    progress: Progress | None,
    on_stage: Callable[[StageEvent], None] | None,
    on_plan: Callable[[Plan], None] | None,
) -> BuildResult:
    from .check import check_compat
    from .sources import resolve_recipe

    state = prepare_out(out, recipe.name, force=options.force)  # local inputs: checked by build()
    stages = Stages(state, on_stage, progress)

    # Inputs: resolving downloads hub models (huggingface_hub shows its progress); the check reads headers only.
    sources = resolve_recipe(recipe, progress)
    check_out_path(out, sources.paths())  # hub models too, before any write
    report = check_compat(sources)
    inputs = input_provenance(sources)

    ftype = options.outtype.upper()
    merged = out / f"{recipe.name}.{ftype}.gguf"
    merge_fields = {k: v for k, v in recipe.to_yaml_dict().items() if k not in ("quants", "eval")}
    stamps = input_stamps(sources)
    merge_key = stage_key("merge", __version__, merge_fields, inputs, stamps, options.outtype.lower())
    quant_files = {q: out / f"{recipe.name}.{q}.gguf" for q in quants}
    quant_keys = {q: stage_key("quantize", merge_key, q, _llama_cpp_version()) for q in quants}
    parent_file = state.work / "parents" / f"instruct.{ftype}.gguf"
    parent_key = stage_key(
        "export", __version__, inputs["instruct"], stamps["instruct"], options.outtype.lower()
    )

    # Disk plan for everything not yet built, before writing anything large.
    todo = {}
    if state.finished("merge", merge_key) is None:
        todo[merged.name] = ftype
    for q in quants:
        if state.finished(f"quantize {q}", quant_keys[q]) is None:
            todo[quant_files[q].name] = q
    if options.compare_parents and state.finished("export instruct", parent_key) is None:
        todo["instruct (for --compare-parents)"] = ftype
    plan = plan_space(out, report.n_params, todo)
    if plan.free < plan.needed:
        raise EdgemergeError(
            f"not enough disk space at {out}: the build {plan.describe()}; free some space or choose another --out"
        )
    sizes = {
        f.name: f.stat().st_size if f.name not in todo and f.exists() else plan_space_item(report.n_params, t)
        for f, t in [(merged, ftype), *((quant_files[q], q) for q in quants)]
    }
    plan.memory = plan_memory(
        shape_from_config(report.config, 0),
        sizes,
        quants,
        memory_limit(),
        _threads(options.threads),
        n_inputs=len(report.models),
        eval_files=not options.skip_eval,
        eval_all=options.eval_all,
        skip_chat=options.skip_chat_eval,
    )
    if not options.skip_eval and not options.eval_all:
        check_chat_possible(plan.memory.evals, plan.memory.limit)
    threads = plan.memory.threads.n
    state.save()
    mark_unfinished(out, recipe.name)
    if on_plan:
        on_plan(plan)

    planned = {"merge"} | {f"quantize {q}" for q in quants}
    _drop_stale(state, planned)

    from .merge.run import merge_to_gguf

    hashes: dict[Path, str] = {}
    stages.run(
        "merge",
        merge_key,
        [merged],
        lambda: merge_to_gguf(
            recipe,
            merged,
            outtype=options.outtype.lower(),
            backend=backend,
            force=True,
            progress=progress,
            sources=sources,
            report=report,
            hashes=hashes,
        ),
        hashes,
    )
    for q in quants:
        stages.run(
            f"quantize {q}",
            quant_keys[q],
            [quant_files[q]],
            lambda q=q: _quantize(merged, q, quant_files[q], threads, progress),
        )

    ggufs = [merged] + [quant_files[q] for q in quants]
    result = BuildResult(
        out=out, recipe=recipe, lang=lang, files=[], stages=stages.records, plan=plan, demo=options.demo
    )
    if not options.skip_eval:
        file_keys = {merged.name: merge_key} | {quant_files[q].name: quant_keys[q] for q in quants}
        _evaluate_files(result, stages, ggufs, file_keys, options, plan.memory, progress)
        if options.compare_parents:
            parent = (parent_file, parent_key)
            _evaluate_parent(
                result, stages, sources.instruct.path, parent, options, plan.memory, progress, merged.name
            )
    _package(result, stages, ggufs, inputs, sources.instruct.path, backend, on_stage)
    result.seconds = time.perf_counter() - t_start
    return result


def _evaluate_files(
    result: BuildResult,
    stages: Stages,
    ggufs: list[Path],
    file_keys: dict[str, str],
    options: BuildOptions,
    memory: MemoryPlan,
    progress: Progress | None,
) -> None:
    """Evaluate every shipped file and check the recipe's gates: the unquantized file first, its
    log-probabilities stored in the work area; each quant then against the stored file (one model in memory).
    A file the memory plan finds too large answers no prompts (its report says which file stands for it)."""
    from .evaluate.gates import check_gates

    merged = ggufs[0]
    ref_logits = stages.state.work / "eval" / f"{merged.name}.logits"
    for f in ggufs:
        ref = (None, ref_logits) if f == merged else (ref_logits, None)
        rep = _eval_stage(stages, f.name, file_keys[f.name], f, result.lang, ref, options, memory, progress)
        result.evals[f.name] = rep
        failed = check_gates(rep, result.recipe.eval)
        if failed:
            result.gate_failures[f.name] = failed


def _evaluate_parent(
    result: BuildResult,
    stages: Stages,
    instruct_dir: Path,
    parent: tuple[Path, str],
    options: BuildOptions,
    memory: MemoryPlan,
    progress: Progress | None,
    plan_as: str,
) -> None:
    """--compare-parents: the instruct model alone, exported to GGUF in the work area and evaluated (with the
    memory decision of the unquantized file `plan_as`, its size)."""
    from .gguf.export import export_hf

    parent_file, parent_key = parent
    parent_file.parent.mkdir(parents=True, exist_ok=True)
    hashes: dict[Path, str] = {}
    stages.run(
        "export instruct",
        parent_key,
        [parent_file],
        lambda: export_hf(
            instruct_dir,
            parent_file,
            outtype=options.outtype.lower(),
            force=True,
            progress=progress,
            hashes=hashes,
        ),
        hashes,
    )
    result.parent_evals["instruct"] = _eval_stage(
        stages,
        "instruct",
        parent_key,
        parent_file,
        result.lang,
        (None, None),
        options,
        memory,
        progress,
        plan_as,
    )


def _package(
    result: BuildResult,
    stages: Stages,
    ggufs: list[Path],
    inputs: dict,
    instruct_dir: Path,
    backend: str,
    on_stage: Callable[[StageEvent], None] | None,
) -> None:
    """Write the model card, Modelfile, eval.json and manifest.json (always redone: it takes milliseconds)."""
    from .package import PackageInfo, write_package

    info = PackageInfo(
        recipe=result.recipe,
        out=result.out,
        lang=result.lang,
        ggufs=[f.name for f in ggufs],
        inputs=inputs,
        instruct_dir=instruct_dir,
        evals={n: r.to_dict() for n, r in result.evals.items()},
        eval_markdown={n: r.to_markdown() for n, r in result.evals.items()},
        gate_failures=result.gate_failures,
        parent_evals={
            n: {"report": r.to_dict(), "markdown": r.to_markdown()} for n, r in result.parent_evals.items()
        },
        stages={n: {"seconds": round(r.seconds, 3), "cached": r.cached} for n, r in stages.records.items()},
        hashes={
            Path(rel).name: meta["sha256"] for r in stages.records.values() for rel, meta in r.outputs.items()
        },
        backend=backend,
        demo=result.demo,
    )
    t0 = time.perf_counter()
    if on_stage:
        on_stage(StageEvent("package", False))
    result.files, result.warnings = write_package(info)
    mark_finished(result.out, result.recipe.name)
    record = StageRecord("package", "", {}, time.perf_counter() - t0)
    stages.records["package"] = record
    if on_stage:
        on_stage(StageEvent("package", True, record))


def _quantize(src: Path, quant: str, dst: Path, threads: int | None, progress: Progress | None) -> None:
    from .quantize import quantize

    remove_file(dst)  # a stale file from an earlier key: this stage is redoing it (a folder there is refused)
    quantize(src, quant, dst, threads=threads, progress=progress)


def _eval_stage(
    stages: Stages,
    label: str,
    file_key: str,
    model: Path,
    lang: str,
    ref: tuple[Path | None, Path | None],
    options: BuildOptions,
    memory: MemoryPlan,
    progress: Progress | None,
    plan_as: str | None = None,
):
    """Evaluate `model` as a cached stage; the report is kept as JSON. `ref` is (a stored reference to compare
    against, a file to store this model's log-probabilities in); `plan_as`: the planned file whose memory
    decision applies (the parent instruct GGUF has the unquantized file's size)."""
    from .evaluate import evaluate

    compare_to, save_to = ref
    planned = memory.evals.get(plan_as or model.name)
    skip_chat = planned.skip_reason if planned is not None else None
    batch = planned.batch if planned is not None and planned.chat else None
    out_json = stages.state.work / "eval" / f"{label}.json"
    key = stage_key(
        "eval", __version__, file_key, lang, options.quick_eval, compare_to is not None, skip_chat, batch
    )
    holder: dict[str, Any] = {}

    def run() -> None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        rep = evaluate(
            model,
            lang,
            ref_logits=compare_to,
            save_logits=save_to,
            quick=options.quick_eval,
            progress=progress,
            n_threads=memory.threads.n,
            batch=batch,
            skip_chat=skip_chat,
        )
        holder["report"] = rep
        with atomic_output(out_json, force=True) as tmp:
            tmp.write_text(json.dumps(rep.to_dict(), ensure_ascii=False, default=str), encoding="utf-8")

    stages.run(f"eval {label}", key, [out_json] + ([save_to] if save_to else []), run)
    if "report" in holder:
        return holder["report"]
    from .evaluate.report import EvalReport

    return EvalReport.from_dict(json.loads(out_json.read_text(encoding="utf-8")))


def _drop_stale(state: BuildState, planned: set[str]) -> None:
    """Remove outputs of shipped-file stages the new plan no longer has (e.g. a quant dropped from the recipe)."""
    changed = False
    for name in list(state.stages):
        if name.startswith(("merge", "quantize")) and name not in planned:
            for rel in state.stages[name]["outputs"]:
                state.remove_output(rel)
            del state.stages[name]
            changed = True
    if changed:
        state.save()


def _llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # noqa: BLE001 (not installed: quantize will say so)
        return None
