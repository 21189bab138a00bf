"""What a build is asked to do: its options, the recipe with the command line's overrides, and the disk plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgemergeError
from ..evaluate.prompts import load_prompts
from ..files import (
    free_bytes,
    human_bytes,
)
from ..memory_plan import MemoryPlan
from ..merge.backends import resolve_backend_name
from ..merge.methods import get_method
from ..quantize import check_quant
from ..recipe import Recipe, parse_recipe
from ..resources import Threads, default_threads
from .ladder import Budget

SPACE_MARGIN = 64 * 1024**2


# Approximate bits per weight of llama.cpp's file types (from llama-quantize's table), for the disk plan only.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.3,
    "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q2_K": 3.0, "Q2_K_S": 3.0, "IQ4_NL": 4.5, "IQ4_XS": 4.3, "IQ3_M": 3.7,
    "IQ3_S": 3.4, "IQ3_XS": 3.3, "IQ3_XXS": 3.1, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.3, "IQ2_XXS": 2.1,
    "IQ1_M": 1.8, "IQ1_S": 1.6, "TQ1_0": 1.7, "TQ2_0": 2.1,
}  # fmt: skip


@dataclass
class BuildOptions:
    """How to build (the recipe says what)."""

    out: Path | None = None  # default dist/<recipe name>
    quants: list[str] | None = None  # default: the recipe's
    weights: list[float] | None = None  # override the language weights, recipe order
    method: str | None = None
    imatrix: str | None = (
        None  # auto, none or a file (absolute or relative to the recipe); default: the recipe's
    )
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
    # the sweep that chose the method and weight (build --weight auto): {"markdown", "reason", "plot", "lang"}
    sweep: dict | None = None
    # build --quant auto: the budget the recipe's quant ladder is measured against (build/quant_auto.py)
    quant_auto: Budget | None = None


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
        """What the build writes, file by file, and the margin it keeps free besides (said apart: it is no file)."""
        if not self.items:
            return f"has nothing new to write; {human_bytes(self.free)} free"
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.items.items())
        return (
            f"writes {human_bytes(sum(self.items.values()))} ({parts}) and keeps {human_bytes(SPACE_MARGIN)} "
            f"spare; {human_bytes(self.free)} free"
        )


def apply_overrides(recipe: Recipe, options: BuildOptions) -> Recipe:
    """The recipe with --quant, --weight, --method and --imatrix applied (validated like the YAML)."""

    data = recipe.to_yaml_dict()
    if options.quants is not None:
        data["quants"] = list(options.quants)
    if options.method is not None:
        data["method"] = options.method
    if options.imatrix is not None:
        data["imatrix"] = options.imatrix
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
    out = parse_recipe(data, source=recipe.name, root=recipe.root)
    out.file = recipe.file  # still read from that file (messages name it)
    return out


def check_options(options: BuildOptions, *, lang: bool = True) -> str:
    """The flags that do not depend on the recipe, checked before any work (before the demo family is trained
    or a model downloaded): quant names, method, backend, output type, and with `lang` the evaluation language
    (the command line checks it only when --eval-lang names it: for --lang, the recipe's error says more).
    Returns the backend's resolved name."""
    if options.quants is not None:
        if options.quant_auto is not None:
            raise EdgemergeError(
                "--quant auto chooses one type by measurement: give auto or a list of types, not both"
            )
        check_quants(options.quants)
    if options.method is not None:
        get_method(options.method)
    backend = resolve_backend_name(options.backend)
    if options.outtype.lower() not in ("f16", "bf16"):
        raise EdgemergeError(f"unknown output type {options.outtype!r}; choose f16 or bf16")
    if lang and options.lang is not None and not options.skip_eval:
        load_prompts(options.lang)
    return backend


def check_quants(quants: list[str], *, imatrix: bool = True) -> list[str]:
    """Canonical, de-duplicated llama.cpp file type names; EdgemergeError for an unknown one (and for one that
    needs an importance matrix when the build has none)."""

    out = []
    for q in quants:
        name = check_quant(q.strip(), imatrix=imatrix)
        if name not in out:
            out.append(name)
    return out


def plan_space_item(n_params: int, ftype: str) -> int:
    """Bytes a file of `ftype` will take: n_params * bits_per_weight / 8."""
    return int(n_params * BITS_PER_WEIGHT.get(ftype.upper(), 8.5) / 8)


def plan_space(out: Path, n_params: int, todo: dict[str, str]) -> Plan:
    """Bytes each not-yet-built file will take (`plan_space_item`)."""
    return Plan(
        items={label: plan_space_item(n_params, t) for label, t in todo.items()}, free=free_bytes(out)
    )


def threads_for(given: int | None) -> Threads:
    """--threads, or the cores other programs leave idle now (`resources.default_threads`)."""
    if given is not None:
        return Threads(given, given, 0.0, "--threads")
    return default_threads()
