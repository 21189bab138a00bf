"""The build's stage list: merge -> quantize -> evaluate -> package, each a cached stage (state.Stages)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EdgemergeError
from ..evaluate import evaluate
from ..evaluate.bench import bench_fingerprint, prepare_tasks
from ..evaluate.gates import check_gates
from ..evaluate.prompts import load_prompts
from ..evaluate.report import EvalReport
from ..files import (
    atomic_output,
    remove_file,
)
from ..memory_plan import MemoryPlan, check_chat_possible, plan_evals, plan_memory, shape_from_config
from ..package import PackageInfo, write_package
from ..pipeline import check_inputs, export_hf, merge_to_gguf
from ..progress import Progress
from ..quantize import quant_file_name, quantize
from ..recipe import Recipe
from ..resources import memory_limit
from ..sources import local_inputs, resolve_recipe
from .calibrate import (
    SOURCE_QUANT,
    ImatrixPlan,
    calibration_info,
    check_choice,
    compute_build_imatrix,
    imatrix_file_bytes,
    plan_imatrix,
)
from .options import (
    BuildOptions,
    Plan,
    apply_overrides,
    check_options,
    check_quants,
    plan_space,
    plan_space_item,
    threads_for,
)
from .quant_auto import LadderResult, estimated_fits, run_ladder
from .state import (
    StageEvent,
    StageRecord,
    Stages,
    build_lock,
    check_out_path,
    drop_stale,
    mark_finished,
    mark_unfinished,
    prepare_out,
    stage_key,
)
from .target import demo_options


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
    calibration: dict[str, Any] | None = None  # the importance matrix the quants were made with
    sweep: dict[str, Any] | None = None  # the sweep that chose the weight (BuildOptions.sweep)
    ladder: LadderResult | None = None  # the quant ladder that chose the type (build --quant auto)
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
            "imatrix": self.calibration,
            "quant_ladder": None if self.ladder is None else self.ladder.to_dict(),
            "plan": None if self.plan is None else {"needed": self.plan.needed, "free": self.plan.free},
            "memory_plan": None
            if self.plan is None or self.plan.memory is None
            else self.plan.memory.to_dict(),
            "warnings": self.warnings,
        }


def _summary(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "responses"}


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
    options = demo_options(options or BuildOptions())
    recipe = apply_overrides(recipe, options)
    # --quant auto: the ladder's types are planned (imatrix, cache keys) until it has chosen one
    quants = check_quants(recipe.quant_auto.ladder if options.quant_auto else recipe.quants)
    check_choice(recipe, quants)  # imatrix: none with a type that needs one, an unreadable file
    lang = options.lang or recipe.lang_codes[0]

    backend = check_options(options, lang=False)  # bad names fail before any work (the language just below)
    if not options.skip_eval:
        load_prompts(lang)  # an unknown evaluation language fails before any work
        if recipe.eval.tasks:  # unknown tasks, missing or misshapen data, too many shots: before any work too
            prepare_tasks(recipe.eval.tasks, bench_data(recipe), recipe.eval.fewshot)
    out = Path(options.out or Path("dist") / recipe.name)
    check_out_path(out, local_inputs(recipe))  # before the lock file is made beside it
    with build_lock(out):
        return _build(recipe, options, out, quants, lang, backend, t_start, progress, on_stage, on_plan)


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

    state = prepare_out(out, recipe.name, force=options.force)  # local inputs: checked by build()
    stages = Stages(state, on_stage, progress)

    # Inputs: resolving downloads hub models (huggingface_hub shows its progress); the check reads headers only.
    sources = resolve_recipe(recipe, progress)
    check_out_path(out, sources.paths())  # hub models too, before any write
    report = check_inputs(sources)
    inputs = input_provenance(sources)

    ftype = options.outtype.upper()
    merged = out / quant_file_name(recipe.name, ftype)
    merge_fields = recipe.merge_dict()
    stamps = input_stamps(sources)
    merge_key = stage_key("merge", __version__, merge_fields, inputs, stamps, options.outtype.lower())
    quant_files = {q: out / quant_file_name(recipe.name, q) for q in quants}
    limit = memory_limit()
    llama_version = llama_cpp_version()
    shape = shape_from_config(report.config, 0)
    source_file = quant_files.get(
        SOURCE_QUANT, state.work / "imatrix" / quant_file_name(recipe.name, SOURCE_QUANT)
    )
    imx = plan_imatrix(
        recipe,
        quants,
        lang=lang,
        shape=shape,
        sizes={
            "float": plan_space_item(report.n_params, ftype),
            "source": plan_space_item(report.n_params, SOURCE_QUANT),
        },
        limit=limit,
        n_ctx_train=_n_ctx_train(report.config),
        merge_key=merge_key,
        out_file=out / f"{recipe.name}.imatrix.gguf",
        llama_version=llama_version,
    )
    quant_keys = {
        q: stage_key("quantize", merge_key, q, llama_version, *([imx.key] if q in imx.users else []))
        for q in quants
    }
    parent_file = state.work / "parents" / quant_file_name("instruct", ftype)
    parent_key = stage_key(
        "export", __version__, inputs["instruct"], stamps["instruct"], options.outtype.lower()
    )

    auto = options.quant_auto
    # --quant auto: the types the budget may allow (a budget none can meet fails here, before any work)
    fits = estimated_fits(quants, auto, shape, report.n_params) if auto is not None else quants

    # Disk plan for everything not yet built, before writing anything large.
    todo = {}
    if state.finished("merge", merge_key) is None:
        todo[merged.name] = ftype
    for q in quants if auto is None else []:
        if state.finished(f"quantize {q}", quant_keys[q]) is None:
            todo[quant_files[q].name] = q
    if auto is not None:  # the ladder holds one quantized file at a time, at most the largest that may fit
        todo[f"{quant_file_name(recipe.name, '<type>')} (the quant ladder, one type at a time)"] = fits[-1]
    if options.compare_parents and state.finished("export instruct", parent_key) is None:
        todo["instruct (for --compare-parents)"] = ftype
    plan = plan_space(out, report.n_params, todo)
    if imx.computes and state.finished("imatrix", imx.key) is None:
        assert imx.path is not None
        plan.items[imx.path.name] = imatrix_file_bytes(shape)
        if imx.source == SOURCE_QUANT and SOURCE_QUANT not in quants:
            plan.items[f"{SOURCE_QUANT} for the importance matrix (removed after)"] = plan_space_item(
                report.n_params, SOURCE_QUANT
            )
    if plan.free < plan.needed:
        raise EdgemergeError(
            f"not enough disk space at {out}: the build {plan.describe()}; free some space or choose another --out"
        )
    planned_quants = quants if auto is None else fits[:1]  # auto: the smallest may be all that can answer
    sizes = {
        f.name: f.stat().st_size if f.name not in todo and f.exists() else plan_space_item(report.n_params, t)
        for f, t in [(merged, ftype), *((quant_files[q], q) for q in planned_quants)]
    }
    plan.memory = plan_memory(
        shape,
        sizes,
        planned_quants,
        limit,
        threads_for(options.threads),
        n_inputs=len(report.models),
        eval_files=not options.skip_eval,
        eval_all=options.eval_all,
        skip_chat=options.skip_chat_eval,
    )
    if imx.computes:  # on the Q8_0: the unquantized file does not fit with the calibration's buffers
        plan.memory.stages["imatrix" if imx.source == "float" else f"imatrix on {SOURCE_QUANT}"] = imx.need
    if not options.skip_eval and not options.eval_all:
        check_chat_possible(plan.memory.evals, plan.memory.limit)
    threads = plan.memory.threads.n
    state.save()
    mark_unfinished(out, recipe.name)
    if on_plan:
        on_plan(plan)

    planned = {"merge"} | {f"quantize {q}" for q in quants} | ({"imatrix"} if imx.computes else set())
    drop_stale(state, planned)

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
    ladder = None
    if auto is None:
        _calibrate_and_quantize(
            stages, imx, merged, source_file, quants, quant_files, quant_keys, threads, progress
        )
    else:

        def make(q: str) -> None:
            """A ladder type's quantize stage, the importance matrix first when it is the first type to use it
            (a rerun whose scores are all cached computes none)."""
            if q in imx.users and "imatrix" not in stages.records:
                _imatrix_stage(stages, imx, merged, source_file, threads, progress)
            _quant_stage(stages, imx, merged, q, quant_files, quant_keys, threads, progress)

        ladder = run_ladder(
            stages,
            gate=recipe.quant_auto,
            budget=auto,
            merged=merged,
            merge_key=merge_key,
            quant_files=quant_files,
            quant_keys=quant_keys,
            make=make,
            shape=shape,
            lang=lang,
            quick=options.quick_eval,
            threads=threads,
            title=f"{recipe.name}: quant ladder in {lang}",
            progress=progress,
        )
        chosen = ladder.choice.chosen
        assert chosen is not None  # run_ladder raised GateFailed otherwise
        # from here the build is the one of --quant CHOSEN: the other types' files and an unused matrix go
        quants = [chosen]
        recipe = recipe.model_copy(update={"quants": quants})  # the card and manifest show what was built
        if f"quantize {chosen}" not in stages.records:  # its score was cached, its file is gone
            make(chosen)
        imx = dataclasses.replace(imx, users=tuple(u for u in imx.users if u == chosen))
        if imx.computes and "imatrix" not in stages.records:  # the chosen type's matrix ships with it
            _imatrix_stage(stages, imx, merged, source_file, threads, progress)
        drop_stale(state, {"merge", f"quantize {chosen}"} | ({"imatrix"} if imx.computes else set()))
        made = {f.name: f.stat().st_size for f in (merged, quant_files[chosen])}
        plan.memory.evals = plan_evals(
            shape, made, limit, eval_all=options.eval_all, skip_chat=options.skip_chat_eval
        )

    ggufs = [merged] + [quant_files[q] for q in quants]
    result = BuildResult(
        out=out,
        recipe=recipe,
        lang=lang,
        files=[],
        stages=stages.records,
        plan=plan,
        demo=options.demo,
        sweep=options.sweep,
        ladder=ladder,
    )
    computed_on = merged.name if imx.source == "float" else quant_file_name(recipe.name, SOURCE_QUANT)
    result.calibration = calibration_info(
        imx, computed_on if imx.computes else None, [quant_files[q].name for q in imx.users]
    )
    result.warnings += imx.warnings
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


def _calibrate_and_quantize(
    stages: Stages,
    imx: ImatrixPlan,
    merged: Path,
    source_file: Path,
    quants: list[str],
    quant_files: dict[str, Path],
    quant_keys: dict[str, str],
    threads: int | None,
    progress: Progress | None,
) -> None:
    """Quantize: first the types that ignore an importance matrix (the Q8_0 an auto imatrix may be computed on
    among them), then the imatrix stage (auto), then the types made with it."""

    def run(q: str) -> None:
        _quant_stage(stages, imx, merged, q, quant_files, quant_keys, threads, progress)

    for q in quants:
        if q not in imx.users:
            run(q)
    if imx.computes:
        _imatrix_stage(stages, imx, merged, source_file, threads, progress)
    for q in imx.users:
        run(q)


def _quant_stage(
    stages: Stages,
    imx: ImatrixPlan,
    merged: Path,
    q: str,
    quant_files: dict[str, Path],
    quant_keys: dict[str, str],
    threads: int | None,
    progress: Progress | None,
) -> None:
    """The `quantize Q` stage: `merged` to type `q`, with the importance matrix when the type uses it."""
    with_imx = imx.path if q in imx.users else None
    stages.run(
        f"quantize {q}",
        quant_keys[q],
        [quant_files[q]],
        lambda: _quantize(merged, q, quant_files[q], threads, progress, with_imx),
    )


def _imatrix_stage(
    stages: Stages,
    imx: ImatrixPlan,
    merged: Path,
    source_file: Path,
    threads: int | None,
    progress: Progress | None,
) -> None:
    assert imx.path is not None and imx.key is not None
    stages.run(
        "imatrix",
        imx.key,
        [imx.path],
        lambda: compute_build_imatrix(imx, merged, source_file, threads=threads, progress=progress),
    )


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

    merged = ggufs[0]
    ref_logits = stages.state.work / "eval" / f"{merged.name}.logits"
    bench, fingerprint = recipe_bench_and_fingerprint(result.recipe)  # once: the same for every file
    for f in ggufs:
        ref = (None, ref_logits) if f == merged else (ref_logits, None)
        rep = _eval_stage(
            stages,
            f.name,
            file_keys[f.name],
            f,
            result.lang,
            ref,
            options,
            memory,
            progress,
            bench=bench,
            fingerprint=fingerprint,
        )
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
    bench, fingerprint = recipe_bench_and_fingerprint(result.recipe)
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
        bench=bench,
        fingerprint=fingerprint,
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
        imatrix=result.calibration,
        sweep=result.sweep,
        ladder=None if result.ladder is None else result.ladder.card(),
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


def _quantize(
    src: Path, quant: str, dst: Path, threads: int | None, progress: Progress | None, imatrix: Path | None
) -> None:

    remove_file(dst)  # a stale file from an earlier key: this stage is redoing it (a folder there is refused)
    # the file records the importance matrix by its name: the user's folders are not published
    name = None if imatrix is None else imatrix.name
    quantize(src, quant, dst, threads=threads, progress=progress, imatrix=imatrix, imatrix_name=name)


def _n_ctx_train(config: dict) -> int | None:
    """The training context of a Hugging Face config (None when it does not say)."""
    v = (config.get("text_config") or config).get("max_position_embeddings")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


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
    bench: dict[str, Any] | None = None,
    fingerprint: dict[str, str] | None = None,
):
    """Evaluate `model` as a cached stage; the report is kept as JSON. `ref` is (a stored reference to compare
    against, a file to store this model's log-probabilities in); `plan_as`: the planned file whose memory
    decision applies (the parent instruct GGUF has the unquantized file's size); `bench`, `fingerprint`: the
    recipe's benchmarks and their files' sha256 (`recipe_bench_and_fingerprint`)."""
    bench = bench or {}

    compare_to, save_to = ref
    planned = memory.evals.get(plan_as or model.name)
    skip_chat = planned.skip_reason if planned is not None else None
    batch = planned.batch if planned is not None and planned.chat else None
    out_json = stages.state.work / "eval" / f"{label}.json"
    key = stage_key(
        "eval",
        __version__,
        file_key,
        lang,
        options.quick_eval,
        compare_to is not None,
        skip_chat,
        batch,
        *([json.dumps(bench, default=str, sort_keys=True)] if bench else []),
        *([fingerprint] if fingerprint else []),  # the data's contents
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
            **bench,
        )
        holder["report"] = rep
        with atomic_output(out_json, force=True) as tmp:
            tmp.write_text(json.dumps(rep.to_dict(), ensure_ascii=False, default=str), encoding="utf-8")

    stages.run(f"eval {label}", key, [out_json] + ([save_to] if save_to else []), run)
    if "report" in holder:
        return holder["report"]

    return EvalReport.from_dict(json.loads(out_json.read_text(encoding="utf-8")))


def bench_data(recipe: Recipe) -> Path | None:
    """The recipe's eval.data folder, relative to the recipe's own folder."""
    data = recipe.eval.data
    if data is None:
        return None
    path = Path(data).expanduser()
    return path if path.is_absolute() or recipe.file is None else Path(recipe.file).parent / path


def recipe_bench(recipe: Recipe) -> dict[str, Any]:
    """evaluate()'s benchmark arguments from the recipe's eval: section (none without tasks)."""
    g = recipe.eval
    if not g.tasks:
        return {}
    bench = {"tasks": list(g.tasks), "fewshot": g.fewshot, "limit": g.limit, "data": bench_data(recipe)}
    return bench | {"chat_template": g.chat_template}


def recipe_bench_and_fingerprint(recipe: Recipe) -> tuple[dict[str, Any], dict[str, str] | None]:
    """`recipe_bench` and the sha256 of the files its tasks read (`bench_fingerprint`, for the eval stages'
    keys; None without tasks): hashed once per evaluation pass, not once per file."""
    bench = recipe_bench(recipe)
    return bench, (bench_fingerprint(bench["tasks"], bench["data"]) if bench else None)


def llama_cpp_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except Exception:  # noqa: BLE001 (not installed: quantize will say so)
        return None
