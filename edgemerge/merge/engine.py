"""The streaming merge: a loop over tensor names, one tensor of every input at a time, into a sink.

Inputs are read through safetensors' memory-mapped `safe_open`; the next tensor is read in a background thread
while the current one is merged (torch/mlx use every core for the arithmetic). Peak memory is a few copies of
the largest tensor, whatever the model size. Every merged tensor is checked for NaN/Inf and rounded once to the
recipe's dtype before the sink sees it, so every sink receives the same values.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy "bfloat16" for safetensors)
import numpy as np
from safetensors import safe_open

from ..check import CompatReport, ModelTensors, check_compat
from ..errors import EdgemergeError
from ..progress import Progress, task
from ..recipe import Recipe
from ..sinks import Sink, TensorSpec
from ..sources import RecipeSources
from .backends import Array, Backend, get_backend
from .methods import get_method


@dataclass
class MergeStats:
    method: str
    backend: str
    dtype: str
    options: dict
    tensors: int = 0
    params: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    order: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("order")
        return d


class _Readers:
    """Open safetensors handles of every input file (memory-mapped), reading one tensor on request."""

    def __init__(self, models: list[ModelTensors], stack: contextlib.ExitStack):
        self.models = models
        self.stack = stack
        self.handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, framework="numpy"))
        return self.handles[path]

    def load(self, name: str, indices: list[int]) -> dict[int, np.ndarray]:
        return {i: self._handle(self.models[i].files[name]).get_tensor(name) for i in indices}


class _Inputs:
    """`TensorInputs` for one tensor: index 0 instruct, 1 base, 2.. the languages."""

    def __init__(self, name: str, weights: list[float], arrays: dict[int, np.ndarray], xp: Backend):
        self.name, self.weights, self._arrays, self._xp = name, weights, arrays, xp

    def instruct(self) -> Array:
        return self._xp.from_numpy(self._arrays[0])

    def base(self) -> Array:
        return self._xp.from_numpy(self._arrays[1])

    def language(self, i: int) -> Array:
        return self._xp.from_numpy(self._arrays[2 + i])


def _non_finite_error(name: str, arrays: dict[int, np.ndarray], models: list[ModelTensors]) -> EdgemergeError:
    bad = [models[i].label for i, a in arrays.items() if not np.isfinite(a.astype(np.float32)).all()]
    where = (
        f"the input {', '.join(bad)} already holds NaN/Inf there" if bad else "check the weights and options"
    )
    return EdgemergeError(f"merged tensor {name} has NaN or Inf values: {where}")


def merge_into(
    recipe: Recipe,
    sources: RecipeSources,
    sink: Sink,
    *,
    backend: str = "torch",
    progress: Progress | None = None,
    report: CompatReport | None = None,
) -> MergeStats:
    """Merge every tensor of the recipe's inputs into `sink` (opened, written in its order, closed).

    The compatibility check runs first unless its `report` is given. Raises EdgemergeError on bad input or a
    non-finite merged tensor; the sink is then left unfinished for the caller to discard.
    """
    method = get_method(recipe.method)
    opts = method.parse_options(recipe.options)
    xp = get_backend(backend)
    report = report or check_compat(sources)
    specs = [TensorSpec(s.name, s.shape, recipe.dtype) for s in report.specs]
    by_name = {s.name: s for s in specs}
    weights = [lang.weight for lang in recipe.languages]
    indices = [0] + ([1] if method.uses_base else []) + [2 + i for i in range(len(weights))]
    stats = MergeStats(method=method.name, backend=xp.name, dtype=recipe.dtype, options=opts)
    start = time.perf_counter()

    try:
        order = list(sink.open(specs))
        if sorted(order) != sorted(by_name):
            raise AssertionError("sink.open must return every tensor name exactly once")
        total = sum(by_name[n].nbytes for n in order)
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            readers = _Readers(report.models, stack)
            with task(progress, f"merge ({method.name}, {xp.name})", total) as advance:
                pending = pool.submit(readers.load, order[0], indices) if order else None
                for i, name in enumerate(order):
                    arrays = pending.result()
                    pending = pool.submit(readers.load, order[i + 1], indices) if i + 1 < len(order) else None
                    xp.begin_tensor(arrays[0].size)
                    merged = method.merge(xp, _Inputs(name, weights, arrays, xp), opts)
                    if not xp.all_finite(merged):
                        raise _non_finite_error(name, arrays, report.models)
                    out = xp.to_numpy(merged, recipe.dtype)
                    del merged, arrays
                    sink.write(name, out)
                    stats.tensors += 1
                    stats.params += out.size
                    stats.bytes_out += out.nbytes
                    advance(out.nbytes)
        sink.close()
    except BaseException:
        abort = getattr(sink, "abort", None)
        if abort is not None:
            abort()
        raise
    stats.order = order
    stats.seconds = time.perf_counter() - start
    return stats
