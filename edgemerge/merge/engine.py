"""The streaming merge: a loop over tensor names, one tensor of every input at a time, into a sink.

The reading, read-ahead and writing threads are the tensor layer's (`tensors.stream`); this module adds the
arithmetic: per piece (cache-sized row blocks, one core with torch), the method's formula over the inputs.
Sparsifying methods first walk the blocks to fix their thresholds (see
methods.plan_sparsifier; DARE and DELLA hold their keep-mask for the tensor, 1 byte per element), slerp to sum
the norms its angle needs. Every merged block is
checked for NaN/Inf and rounded once to the recipe's dtype before the sink sees it, so every sink receives
the same values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..check import CompatReport, check_compat, layer_of
from ..errors import EdgemergeError
from ..progress import Progress, task
from ..recipe import Recipe
from ..sources import RecipeSources
from ..tensors.sinks import Sink
from ..tensors.spec import ModelTensors, TensorSpec
from ..tensors.stream import Prefetch, Readers, TensorOut, pieces, streaming
from .backends import Array, get_backend
from .methods import get_method

POSITION_OUTSIDE = 0.0  # mergekit 0.1.x reads the schedules of embeddings, final norm and head at t = 0


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


class _Inputs:
    """`TensorInputs` for one tensor: index 0 instruct, 1 base, 2.. the languages, from the read-ahead when it
    has them, else read when asked for."""

    def __init__(self, name, shape, weights, pieces, position, readers: Readers, prefetch: Prefetch, xp):
        self.name, self.shape, self.weights, self.pieces, self.position = (
            name,
            shape,
            weights,
            pieces,
            position,
        )
        self._readers, self._prefetch, self._xp = readers, prefetch, xp

    def _get(self, i: int, rows: slice | None) -> Array:
        raw = self._prefetch.take(self.name, rows, i)
        if raw is None:
            raw = self._readers.load((self.name, rows), [i])[i]
        return self._xp.from_numpy(raw)  # the raw array goes as soon as the backend has its float32 copy

    def instruct(self, rows: slice | None = None) -> Array:
        return self._get(0, rows)

    def base(self, rows: slice | None = None) -> Array:
        return self._get(1, rows)

    def language(self, i: int, rows: slice | None = None) -> Array:
        return self._get(2 + i, rows)


def depth(name: str, n_layers: int) -> float:
    """Where a tensor sits for a per-layer schedule, as mergekit plans a merge of whole models: layer i of n at
    i / (n - 1) (1 when there is one layer), the tensors outside the layers (embeddings, final norm, head) at
    POSITION_OUTSIDE."""
    i = layer_of(name)
    if i is None:
        return POSITION_OUTSIDE
    return min(1.0, i / (n_layers - 1)) if n_layers > 1 else 1.0


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

    The compatibility check runs first unless its `report` is given. The tensors outside the language model
    (`report.from_instruct`: a vision tower, a multi-token-prediction block) are the instruct model's,
    unchanged but for the output dtype. Raises EdgemergeError on bad input or a non-finite merged tensor; the
    sink is then left unfinished for the caller to discard.
    """
    method = get_method(recipe.method)
    opts = method.parse_options(recipe.options)
    xp = get_backend(backend)
    report = report or check_compat(sources)
    specs = [TensorSpec(s.name, s.shape, recipe.dtype) for s in report.specs]
    by_name = {s.name: s for s in specs}
    weights = [lang.weight for lang in recipe.languages]
    n_layers = 1 + max((i for s in specs if (i := layer_of(s.name)) is not None), default=0)
    indices = [0] + ([1] if method.uses_base else []) + [2 + i for i in range(len(weights))]
    stats = MergeStats(method=method.name, backend=xp.name, dtype=recipe.dtype, options=opts)
    start = time.perf_counter()
    total = sum(s.nbytes for s in specs)
    # single-pass methods read every piece once, in order: all of them are read ahead; sparsifiers (and slerp)
    # walk a tensor several times, so only tensors of one piece are
    pipeline = streaming(
        sink, specs, report.models, indices, method.single_pass, first_only=report.from_instruct
    )
    with (
        pipeline as (writer, order, readers, prefetch),
        task(progress, f"merge ({method.name}, {xp.name})", total) as advance,
    ):
        for name in order:
            spec = by_name[name]
            parts = pieces(spec, True)
            t = _Inputs(name, spec.shape, weights, parts, depth(name, n_layers), readers, prefetch, xp)
            out = TensorOut(writer, spec, parts)
            copied = name in report.from_instruct
            blocks = ((rows, t.instruct(rows)) for rows in parts) if copied else method.merge(xp, t, opts)
            for rows, merged in blocks:
                if not xp.all_finite(merged):
                    used = indices[:1] if copied else indices
                    raise _non_finite_error(name, readers.load((name, rows), used), report.models)
                block = xp.to_numpy(merged, recipe.dtype)
                del merged
                advance(out.add(rows, block))
                del block
            del t
            prefetch.done(name)
            advance(out.finish())
            stats.tensors += 1
            stats.params += spec.nbytes // (4 if recipe.dtype == "float32" else 2)
            stats.bytes_out += spec.nbytes
    stats.order = order
    stats.seconds = time.perf_counter() - start
    return stats
