"""Merge methods: pure maths over one tensor, one definition each, written against the backend interface.

Every method sees the same task vectors: the instruct model is the task vector tau_0 = W_instruct - W_base at
weight w_0 = 1, and each language model i is tau_i = W_lang_i - W_base at its recipe weight w_i. Inputs arrive
as float32 arrays; the engine rounds the result once to the output dtype. The definitions follow mergekit
(arcee-ai/mergekit `generalized_task_arithmetic.py`, `sparsify.py`, `linear.py`, `slerp.py`, `nearswap.py`) so a
recipe means the same thing here as in a mergekit config with one value per option for every model:

    task_arithmetic   W = W_base + lambda * sum_i w_i tau_i                       (/ sum_i w_i if normalize)
    linear            W = (W_instruct + sum_i w_i W_lang_i) / (1 + sum_i w_i)     (no division if not normalize)
    ties              tau_i -> keep the top `density` of |tau_i|; sign consensus; W = W_base + lambda * mixed
    dare_linear       tau_i -> random keep-mask (p = density), L1-rescaled; W = W_base + lambda * sum_i w_i tau_i
    dare_ties         dare masks + sign consensus
    breadcrumbs       tau_i -> drop the gamma largest and the smallest |tau| until `density` remain
    della             tau_i -> random keep-mask, p by |tau| rank in its row within density +- epsilon, L1-rescaled;
                      sign consensus (della_linear: none); W = W_base + lambda * mixed
    slerp             W = s0 W_instruct + s1 W_lang, spherical in the angle of the two whole tensors (`slerp`)
    nearswap          W = W_instruct + l (W_lang - W_instruct), l = clamp(t / |W_lang - W_instruct|, 0, 1)
(the sparsifications in detail: `Sparsifier`). slerp and nearswap take two models, no base: the instruct model
is what mergekit calls their `base_model` (the paper's scripts set it so) and the one language model the other.

Sign consensus (TIES, "sum" method): with d_i = w_i tau_i, the elected sign is s = +1 where sum_i d_i >= 0 else
-1; m_i = [sign(d_i) == s]; mixed = sum_i m_i d_i, divided by sum_i m_i w_i (1 where that is 0) if normalize.
Without consensus, normalize divides by sum_i w_i (1 where |sum| < 1e-8).

Ties among equal magnitudes are broken by position (a stable sort), where mergekit's unstable sort leaves them
arbitrary; that makes results reproducible and equal across backends.

Methods yield the merged tensor block by block (`TensorInputs.pieces`); a sparsifier (and slerp) first walks all
blocks to fix its global statistics, so the result does not depend on how the tensor is cut.

Each method declares its options as a pydantic model (`MethodOptions`: types, mergekit's defaults, bounds, a
description each); `METHODS` is the one list of methods, which the recipe validates its method and options by.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from ..errors import EdgemergeError
from ..limits import field_error, finite_number, shown
from .backends import Array, Backend


class TensorInputs(Protocol):
    """One tensor of every input model, read on demand as float32 backend arrays, whole or by row block.

    `pieces` are the row blocks (`None`: the whole tensor) a method walks through; a loader called with
    `rows` returns only those rows. Methods may walk the pieces several times (sparsification statistics)."""

    name: str
    shape: tuple[int, ...]
    weights: list[float]  # w_i of the language models, in recipe order
    pieces: list[slice | None]
    position: float  # depth in the model, 0 to 1, at which a per-layer schedule is read (`schedule_at`)

    def instruct(self, rows: slice | None = None) -> Array: ...

    def base(self, rows: slice | None = None) -> Array: ...

    def language(self, i: int, rows: slice | None = None) -> Array: ...


# ---------------------------------------------------------------------------------------------- sparsification


@dataclass
class RankCut:
    """Entries whose position in the stable ascending sort of the flattened |tau| is >= r.

    With v the r-th smallest value (0-based) and `skip` = r - #(values < v), an entry is in iff it is > v, or
    equal to v and not among the first `skip` entries equal to v in row-major order. v and skip come from two
    passes over the tensor's blocks (`rank_cuts`, on the host: the same on every backend). The entries equal to v
    are counted as blocks are first visited, which must be in order (the methods' passes are), so the mask is
    built one block at a time.
    """

    v: float
    skip: int
    all_in: bool = False
    none_in: bool = False
    eq_before: list[int] = field(default_factory=lambda: [0])  # entries == v in the blocks before block k

    def keep(self, xp: Backend, a: Array, k: int) -> Array:
        """The mask for block k, given its |tau| values `a`."""
        if self.all_in or self.none_in:
            return xp.mask_from_numpy(np.full(tuple(a.shape), self.all_in))
        eq = a == self.v
        if k == len(self.eq_before) - 1:  # first visit of block k
            self.eq_before.append(self.eq_before[k] + xp.count(eq))
        elif k >= len(self.eq_before):
            raise AssertionError(f"block {k} visited before block {len(self.eq_before) - 1}")
        local = self.skip - self.eq_before[k]
        if local <= 0:
            return (a > self.v) | eq
        return (a > self.v) | xp.true_after(eq, local)


_RADIX = 16
_BUCKETS = 1 << _RADIX


def rank_cuts(passes: Callable[[], Iterable[np.ndarray]], ranks: list[int], n: int) -> list[RankCut]:
    """RankCuts of n non-negative float32 magnitudes that `passes()` yields block by block (called twice).

    An exact radix selection: for non-negative floats the order of the uint32 bit patterns is the order of the
    values (NaN after +inf, where a sort puts it too), so a histogram of the high 16 bits finds the bucket holding
    each rank and a histogram of the low 16 bits inside that bucket finds the value and how many are below it.
    Two 65,536-entry tables instead of the tensor: a partition needs 4 bytes per element (2.1 GB for the
    embedding of an 8B model)."""
    inner = sorted({r for r in ranks if 0 < r < n})
    found: dict[int, RankCut] = {}
    if inner:
        high = np.zeros(_BUCKETS, np.int64)
        for block in passes():
            high += np.bincount(block.view(np.uint32) >> _RADIX, minlength=_BUCKETS)
        cum_high = np.cumsum(high)
        bucket = {r: int(np.searchsorted(cum_high, r, side="right")) for r in inner}
        low = {b: np.zeros(_BUCKETS, np.int64) for b in set(bucket.values())}
        for block in passes():
            bits = block.view(np.uint32)
            top = bits >> _RADIX
            for b, table in low.items():
                table += np.bincount(bits[top == b] & (_BUCKETS - 1), minlength=_BUCKETS)
        for r, b in bucket.items():
            below = int(cum_high[b - 1]) if b else 0
            cum_low = np.cumsum(low[b])
            c = int(np.searchsorted(cum_low, r - below, side="right"))
            below += int(cum_low[c - 1]) if c else 0
            v = np.array([(b << _RADIX) | c], dtype=np.uint32).view(np.float32)[0]
            found[r] = RankCut(float(v), r - below)
    return [found[r] if r in found else RankCut(0.0, 0, all_in=r <= 0, none_in=r >= n) for r in ranks]


def rank_at_least(xp: Backend, x: Array, r: int) -> Array:
    """Mask of the entries of a whole non-negative array whose stable ascending rank is >= r (see RankCut)."""
    flat = xp.to_numpy(x, "float32").reshape(-1)
    (cut,) = rank_cuts(lambda: [flat], [r], flat.size)
    return cut.keep(xp, x, 0)


_MASK_CHUNK = 1 << 22


def _generator(seed: int, tensor: str, model: int) -> np.random.Generator:
    """numpy's PCG64 seeded by (seed, first 8 bytes of sha256(tensor name) little-endian, model index): the
    random masks are drawn on the host, so every backend sees the same mask and the result does not depend on
    the order tensors are processed in."""
    name_key = int.from_bytes(hashlib.sha256(tensor.encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, name_key, model])))


def dare_mask(seed: int, tensor: str, model: int, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Bernoulli(density) keep-mask: u < density with u ~ U[0, 1) float32 from `_generator`, drawn in chunks
    to bound the float buffer."""
    rng = _generator(seed, tensor, model)
    n = math.prod(shape)
    out = np.empty(n, dtype=bool)
    for start in range(0, n, _MASK_CHUNK):
        stop = min(n, start + _MASK_CHUNK)
        np.less(rng.random(stop - start, dtype=np.float32), density, out=out[start:stop])
    return out.reshape(shape)


def row_ranks(rows: np.ndarray) -> np.ndarray:
    """The 0-based rank (float32) of each non-negative float32 entry in the stable ascending sort of its row
    (axis 1). Each entry gets one unique uint64 key, its bits (ordered as the values, NaN after inf) then its
    position, and the keys are sorted: numpy's vectorized sort of 64-bit integers is about 4x its stable
    argsort of floats (measured: 0.05 s against 0.2 s for 256 x 4096)."""
    lines = np.moveaxis(rows, 1, -1)
    m = lines.shape[-1]
    if m >= 1 << 32:  # positions no longer fit beside the bits
        order = np.argsort(lines, axis=-1, kind="stable")
    else:
        key = (lines.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(m, dtype=np.uint64)
        key.sort(axis=-1)
        order = (key & np.uint64(0xFFFFFFFF)).astype(np.intp)
        del key
    ranks = np.empty(lines.shape, np.float32)
    np.put_along_axis(ranks, order, np.arange(m, dtype=np.float32), axis=-1)
    return np.moveaxis(ranks, -1, 1)


def della_probs(mag: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """DELLA's keep probabilities for |tau| of whole rows (MagPrune, arXiv 2406.11617; mergekit's
    `della_magprune`): along axis 1 (a 1-D tensor is one row), the entry of 0-based rank r in the stable
    ascending sort of its row's m magnitudes (`row_ranks`) is kept with p = (density - epsilon) +
    2 epsilon r / (m - 1), in float32 as mergekit computes it. Large entries are kept more often; the mean stays
    `density`. A row of one entry (mergekit divides 0 by 0 there and fails) is kept with p = density."""
    rows = mag.reshape(1, -1) if mag.ndim < 2 else mag
    m = rows.shape[1]
    if m == 1:
        return np.full(mag.shape, density, np.float32)
    rank_norm = row_ranks(rows) / np.float32(m - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).astype(np.float32).reshape(mag.shape)


def _load(t: TensorInputs, index: int, rows: slice | None) -> Array:
    """Model `index` of the task vectors: 0 the instruct model, i + 1 language model i."""
    return t.instruct(rows) if index == 0 else t.language(index - 1, rows)


def _tau(t: TensorInputs, index: int, rows: slice | None) -> Array:
    """Task vector `index` (see `_load`) on these rows: its model minus the base."""
    return _load(t, index, rows) - t.base(rows)


@dataclass
class Sparsifier:
    """How one task vector is sparsified, decided from the whole tensor, applied block by block.

    magnitude (TIES):  keep the k = floor(density n) largest |tau| (mergekit asserts k > 0; here a tensor too
                       small to keep one entry loses its task vector).
    magnitude_outliers (Breadcrumbs): drop the n_top = floor(gamma n) largest and the n_bot smallest |tau|,
                       keeping floor(density n); if n_bot < 0, fewer large ones are dropped. mergekit slices
                       `[n_bot:-n_top]`, which keeps nothing when n_top == 0; here n_top == 0 keeps the top.
    random (DARE):     keep where dare_mask is True.
    della (DELLA):     keep where u < della_probs(|tau|) row by row, u ~ U[0, 1) float32 from `_generator` drawn
                       in row-major order (the whole tensor's draw, block by block).
    rescale:           tau * keep * (|tau|_1 / |tau * keep|_1), unless either norm is below 1e-7 (mergekit's
                       L1 `rescale`, default on for DARE, in place of the paper's 1/density).
    """

    cuts: list[RankCut] = field(default_factory=list)  # keep = cut0 and not cut1 (Breadcrumbs)
    mask: np.ndarray | None = None
    scale: float | None = None

    def keep(self, xp: Backend, tau: Array, k: int, rows: slice | None) -> Array:
        if self.mask is not None:
            return xp.mask_from_numpy(self.mask if rows is None else self.mask[rows])
        a = xp.abs(tau)
        kept = self.cuts[0].keep(xp, a, k)
        if len(self.cuts) > 1:
            kept = kept & ~self.cuts[1].keep(xp, a, k)
        return kept

    def apply(self, xp: Backend, tau: Array, k: int, rows: slice | None) -> Array:
        masked = xp.where(self.keep(xp, tau, k, rows), tau, 0.0)
        return masked if self.scale is None else masked * self.scale


def plan_sparsifier(
    xp: Backend, t: TensorInputs, opts: dict[str, Any], kind: str, index: int
) -> Sparsifier | None:
    """Walk the task vector's blocks to fix its sparsification (None: density 1, nothing dropped)."""
    density = opts["density"]
    if density >= 1:
        return None
    n = math.prod(t.shape)
    plan = Sparsifier()
    before, walks = 0.0, 0  # |tau|_1 for the rescale, summed block by block on the first walk over the tensor
    after = None  # |tau * keep|_1, when a walk already summed it
    if kind == "random":
        plan.mask = dare_mask(opts["seed"], t.name, index, tuple(t.shape), density)
    elif kind == "della":
        plan.mask, before, after = _della_mask(xp, t, opts, index)
        walks = 1
    else:
        if kind == "magnitude":
            ranks = [n - int(density * n)]
        else:
            target, n_top = int(density * n), int(opts["gamma"] * n)
            n_bot = n - target - n_top
            if n_bot < 0:
                n_top, n_bot = n_top + n_bot, 0
            ranks = [n_bot, n - n_top]

        def magnitudes() -> Iterator[np.ndarray]:
            nonlocal before, walks
            walks += 1
            for rows in t.pieces:
                mag = xp.abs(_tau(t, index, rows))
                if walks == 1 and opts["rescale"]:
                    before += xp.sum(mag)
                yield xp.to_numpy(mag, "float32").reshape(-1)

        plan.cuts = rank_cuts(magnitudes, ranks, n)
    if opts["rescale"]:
        if walks == 0:  # nothing walked yet (DARE's mask, or cuts at the ends that need no selection)
            before = sum(xp.sum(xp.abs(_tau(t, index, rows))) for rows in t.pieces)
        if after is None:
            after = 0.0
            for k, rows in enumerate(t.pieces):
                tau = _tau(t, index, rows)
                after += xp.sum(xp.abs(xp.where(plan.keep(xp, tau, k, rows), tau, 0.0)))
        if before >= 1e-7 and after >= 1e-7:
            plan.scale = before / after
    return plan


def _della_mask(
    xp: Backend, t: TensorInputs, opts: dict[str, Any], index: int
) -> tuple[np.ndarray, float, float]:
    """DELLA's keep-mask of task vector `index` (1 byte per entry, as DARE's), |tau|_1 and |tau * keep|_1, in
    one walk over the row blocks: ranks are taken within rows, so a block holds all it needs. A 1-D tensor is
    one row: cut into blocks (over BLOCK_ELEMENTS entries, none in these models) its |tau| are ranked whole."""
    rng: np.random.Generator | None = _generator(opts["seed"], t.name, index)
    density, epsilon = opts["density"], opts["epsilon"]
    mask = np.empty(t.shape, dtype=bool)
    if len(t.shape) < 2 and len(t.pieces) > 1:
        mag = np.concatenate([xp.to_numpy(xp.abs(_tau(t, index, rows)), "float32") for rows in t.pieces])
        mask[:] = rng.random(mag.shape, dtype=np.float32) < della_probs(mag, density, epsilon)
        del mag
        rng = None  # drawn
    before = after = 0.0
    for rows in t.pieces:
        mag = xp.abs(_tau(t, index, rows))
        part = Ellipsis if rows is None else rows
        if rng is not None:
            p = della_probs(xp.to_numpy(mag, "float32"), density, epsilon)
            mask[part] = rng.random(p.shape, dtype=np.float32) < p
        before += xp.sum(mag)
        after += xp.sum(xp.where(xp.mask_from_numpy(mask[part]), mag, 0.0))
    return mask, before, after


# ---------------------------------------------------------------------------------------------- methods

Blocks = Iterator[tuple[slice | None, Array]]


def generalized_task_arithmetic(
    xp: Backend, t: TensorInputs, opts: dict[str, Any], *, sparsify: str | None, consensus: bool
) -> Blocks:
    """W = W_base + lambda * mix(w_i * sparsify(tau_i)), block by block; see the module docstring for `mix`."""
    weights = [1.0, *t.weights]
    plans = [plan_sparsifier(xp, t, opts, sparsify, i) if sparsify else None for i in range(len(weights))]
    for k, rows in enumerate(t.pieces):
        base = t.base(rows)
        weighted: list[Array] = []
        mixed = None
        for index, w in enumerate(weights):
            d = _load(t, index, rows)  # a fresh array of ours: the updates below are in place where the
            d -= base  # backend allows it (torch), which spares a model-sized allocation per operation
            if plans[index] is not None:
                d = plans[index].apply(xp, d, k, rows)
            if w != 1.0:  # x * 1 == x exactly
                d *= w
            if consensus:
                weighted.append(d)
            elif mixed is None:
                mixed = d
            else:
                mixed += d
            del d
        if consensus:
            total = weighted[0]
            for other in weighted[1:]:
                total = total + other
            positive = total >= 0  # the elected sign: + where the sum is >= 0, else -
            del total
            divisor = None
            for w in weights:
                d = weighted.pop(0)  # let each weighted vector go as soon as it is mixed in
                keep = (positive & (d > 0)) | (
                    ~positive & (d < 0)
                )  # sign(d) == elected sign (0 never agrees)
                part = xp.where(keep, d, 0.0)
                del d
                if mixed is None:
                    mixed = part
                else:
                    mixed += part
                if opts["normalize"]:
                    wpart = xp.where(keep, w, 0.0)
                    divisor = wpart if divisor is None else divisor + wpart
                    del wpart
                del keep, part
            del positive
            if opts["normalize"]:
                divisor = xp.where(divisor == 0, 1.0, divisor)
                mixed /= divisor
                del divisor
        elif opts["normalize"]:
            total_w = sum(weights)
            mixed /= 1.0 if abs(total_w) < 1e-8 else total_w
        if opts["lambda"] != 1:
            mixed *= opts["lambda"]
        mixed += base
        yield rows, mixed


def linear(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Blocks:
    """W = (W_instruct + sum_i w_i W_lang_i) / (1 + sum_i w_i); without normalize, no division."""
    total = 1.0 + sum(t.weights)
    if opts["normalize"] and abs(total) < 1e-8:
        raise EdgemergeError("linear merge: 1 + sum of the language weights is 0; change the weights")
    for rows in t.pieces:
        acc = t.instruct(rows)  # ours: updated in place (see generalized_task_arithmetic)
        for i, w in enumerate(t.weights):
            x = t.language(i, rows)
            if w != 1.0:
                x *= w
            acc += x
            del x
        if opts["normalize"]:
            acc /= total
        yield rows, acc


def schedule_at(t: float | list[Any], position: float, name: str = "") -> float:
    """A per-layer schedule read at `position` (0 to 1) for tensor `name` as mergekit reads a parameter: a
    number is itself; a list of numbers (a "gradient") is read at x = position * (n - 1), linear between
    t[floor(x)] and the next; a list of conditions gives the value of the first whose filter is None, "*" or
    part of `name`."""
    if isinstance(t, list) and t and isinstance(t[0], dict):
        for c in t:
            if c["filter"] in (None, "*") or c["filter"] in name:
                return schedule_at(c["value"], position)
        raise EdgemergeError(
            f"options.t: no condition's filter matches tensor {name}; end the list with a value without a filter"
        )
    if not isinstance(t, list):
        return t
    scaled = position * (len(t) - 1)
    i0 = math.floor(scaled)
    i1 = min(len(t) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * t[i0] + frac * t[i1]


SLERP_COLINEAR = 0.9995  # mergekit's DOT_THRESHOLD: above it, lerp
NORM_EPS = 1e-8  # mergekit's: a tensor of smaller L2 norm is not normalized


def slerp_coefficients(t: float, sq0: float, sq1: float, dot: float) -> tuple[float, float]:
    """(s0, s1) of W = s0 v0 + s1 v1 from the whole tensors' |v0|^2, |v1|^2 and v0 . v1 (mergekit's `slerp`,
    which normalizes each tensor as a whole): with c = v0 . v1 / (|v0| |v1|) (a norm <= 1e-8 taken as 1),
    theta = arccos c, s0 = sin(theta - t theta) / sin theta and s1 = sin(t theta) / sin theta; where |c| > 0.9995
    the two are nearly colinear and it is lerp, s0 = 1 - t, s1 = t."""
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    c = dot / ((n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0))
    if abs(c) > SLERP_COLINEAR:
        return 1 - t, t
    theta = math.acos(c)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def slerp(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Blocks:
    """W = s0 W_instruct + s1 W_lang (`slerp_coefficients`, t from `schedule_at`): the instruct model is v0
    (t = 0 gives it back), the language model v1. A first walk over the row blocks sums the squares and the
    dot product that the angle needs (float64; mergekit 0.1.5 sums float32 chunks: the coefficients agree to
    float32 rounding), so no block is held longer than its arithmetic."""
    at = schedule_at(opts["t"], t.position, t.name)
    sq0 = sq1 = dot = 0.0
    for rows in t.pieces:
        v0, v1 = t.instruct(rows), t.language(0, rows)
        sq0 += xp.sum(v0 * v0)
        sq1 += xp.sum(v1 * v1)
        dot += xp.sum(v0 * v1)
        del v0, v1
    s0, s1 = slerp_coefficients(at, sq0, sq1, dot)
    for rows in t.pieces:
        out = t.instruct(rows)  # ours: scaled in place (see generalized_task_arithmetic)
        out *= s0
        v1 = t.language(0, rows)
        v1 *= s1
        out += v1
        del v1
        yield rows, out


NEARSWAP_MIN_DIFF = 1e-6  # mergekit's floor on |W_lang - W_instruct| (l = 1 there for any t >= 1e-6)


def nearswap(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Blocks:
    """W = l W_lang + (1 - l) W_instruct per entry, l = min(1, t / max(|W_lang - W_instruct|, 1e-6)) (mergekit's
    `nearswap`, its base_model the instruct model): entries closer than t take the language model's value,
    farther ones move the distance t towards it."""
    at = schedule_at(opts["t"], t.position, t.name)
    for rows in t.pieces:
        v0, v1 = t.instruct(rows), t.language(0, rows)
        diff = xp.abs(v0 - v1)
        diff = xp.where(diff < NEARSWAP_MIN_DIFF, NEARSWAP_MIN_DIFF, diff)
        weight = xp.where(diff > at, at / diff, 1.0)
        del diff
        yield rows, weight * v1 + (1 - weight) * v0


# ---------------------------------------------------------------------------------------------- options
# One pydantic model per method declares its options (mergekit's defaults, bounds, a description each). The
# recipe validates `options` against it when it loads; the engine records `parse_options`'s dict of all of them.


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {shown(v)}")  # noqa: TRY004 (pydantic reports ValueError only)
    return v


def _number(v: Any) -> float:
    return finite_number("", v, want="a finite number")


def _integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be an integer, got {shown(v)}")  # noqa: TRY004 (pydantic reports ValueError only)
    return v


# YAML gives bools, ints and floats: each type takes only its own (a string "0.5" or `yes` is refused, 1 is no bool)
Flag = Annotated[bool, BeforeValidator(_flag)]
Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]


MAX_SCHEDULE = 1024  # values in a per-layer schedule (models have at most a few hundred layers)


@dataclass(frozen=True)
class Interval:
    """Bounds of a number or of every value of a schedule (read by `option_interval` as pydantic's are)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, x: float, v: Any) -> float:
        ok = (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )
        if not ok:
            raise ValueError(f"must be in {_interval(self.__dict__)}, got {shown(v)}")
        return x


MAX_FILTER = 256  # characters of a condition's filter (a fragment of a tensor name)


def _schedule(bounds: Interval) -> Any:
    """A number, a list of numbers read per layer (`schedule_at`), each within `bounds`, or mergekit's
    conditions: a list of {filter, value} (a value one of the former), the first whose filter is part of the
    tensor's name, or that has none, applying."""

    def numbers(v: Any, where: str) -> float | list[float]:
        if not isinstance(v, list):
            try:
                return bounds.check(_number(v), v)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
        if not 1 <= len(v) <= MAX_SCHEDULE:
            raise ValueError(
                f"{where}must be a number or a list of 1 to {MAX_SCHEDULE} numbers, got {len(v)} values"
            )
        out = []
        for i, x in enumerate(v):
            try:
                out.append(bounds.check(_number(x), x))
            except ValueError as e:
                raise ValueError(f"{where}value {i} of the schedule {e}") from None
        return out

    def conditions(v: list[Any]) -> list[dict[str, Any]]:
        if len(v) > MAX_SCHEDULE:
            raise ValueError(f"at most {MAX_SCHEDULE} conditions, got {len(v)}")
        out = []
        for i, c in enumerate(v):
            if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
                raise ValueError(
                    f"condition {i} must be a mapping of value and an optional filter, got {shown(c)}"
                )
            f = c.get("filter")
            if f is not None and (not isinstance(f, str) or len(f) > MAX_FILTER):
                raise ValueError(
                    f"condition {i}: filter must be part of a tensor name (at most {MAX_FILTER} characters), "
                    f"got {shown(f)}"
                )
            out.append({"filter": f, "value": numbers(c["value"], f"condition {i}: ")})
        return out

    def check(v: Any) -> float | list[float] | list[dict[str, Any]]:
        if isinstance(v, dict):
            return conditions([v])
        if isinstance(v, list) and any(isinstance(c, dict) for c in v):
            return conditions(v)
        return numbers(v, "")

    return Annotated[float | list[float] | list[dict[str, Any]], BeforeValidator(check), bounds]


UnitSchedule = _schedule(Interval(ge=0, le=1))
PositiveUnitSchedule = _schedule(Interval(gt=0, le=1))


def _normalize(default: bool) -> Any:
    return Field(default, description="divide the mixed task vector by the sum of the weights")


def _rescale(default: bool) -> Any:
    return Field(default, description="rescale each sparsified task vector to its original L1 norm")


def _lambda() -> Any:
    return Field(1.0, alias="lambda", description="scale of the mixed task vector")


def _density() -> Any:
    return Field(1.0, gt=0, le=1, description="fraction of each task vector kept (1.0 keeps all)")


def _seed(what: str) -> Any:
    return Field(0, ge=0, lt=2**64, description=f"seed of the random {what} masks (same seed, same model)")


class MethodOptions(BaseModel):
    """The options of one method: typed fields with defaults, bounds and a description; no others allowed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskArithmeticOptions(MethodOptions):
    """task_arithmetic: W = W_base + lambda * sum_i w_i tau_i (divided by sum_i w_i if normalize)."""

    normalize: Flag = _normalize(False)
    lambda_: Number = _lambda()


class LinearOptions(MethodOptions):
    """linear: W = (W_instruct + sum_i w_i W_lang_i) / (1 + sum_i w_i) (no division unless normalize)."""

    normalize: Flag = _normalize(True)


class TiesOptions(MethodOptions):
    """ties: the top `density` of each |tau_i| kept, sign consensus, scaled by lambda."""

    density: Number = _density()
    normalize: Flag = _normalize(True)
    rescale: Flag = _rescale(False)
    lambda_: Number = _lambda()


class DareOptions(MethodOptions):
    """dare_ties and dare_linear: random keep-masks (p = density, from `seed`), L1-rescaled."""

    density: Number = _density()
    normalize: Flag = _normalize(False)
    rescale: Flag = _rescale(True)
    lambda_: Number = _lambda()
    seed: Integer = _seed("DARE")


class DellaOptions(MethodOptions):
    """della: DELLA's magnitude-ranked random keep-masks (`della_probs`), sign consensus, L1-rescaled."""

    density: Number = _density()
    epsilon: Number = Field(
        0.15, ge=0, lt=0.5, description="keep probabilities spread over density +- epsilon by magnitude rank"
    )
    normalize: Flag = _normalize(True)
    rescale: Flag = _rescale(True)
    lambda_: Number = _lambda()
    seed: Integer = _seed("DELLA")

    @model_validator(mode="after")
    def _band(self) -> DellaOptions:
        # mergekit refuses the same pairs (della_magprune), but only once it reaches the first tensor
        lo, hi = self.density - self.epsilon, self.density + self.epsilon
        if self.density < 1 and (hi >= 1 or lo <= 0):
            raise field_error(
                ("epsilon",),
                f"density +- epsilon must stay inside (0, 1), got [{lo:g}, {hi:g}] (density {self.density:g}); "
                "lower epsilon",
            )
        return self


class DellaLinearOptions(DellaOptions):
    """della_linear: DELLA's keep-masks, L1-rescaled, summed without sign consensus."""

    normalize: Flag = _normalize(False)


class SlerpOptions(MethodOptions):
    """slerp: spherical interpolation from the instruct model (t = 0) to the language model (t = 1)."""

    t: UnitSchedule = Field(
        0.5, description="from the instruct model (0) to the language model (1); a list: per layer"
    )


class NearSwapOptions(MethodOptions):
    """nearswap: entries of the two models closer than t take the language model's value."""

    t: PositiveUnitSchedule = Field(
        0.5, description="distance under which an entry takes the language model's value; a list: per layer"
    )


class BreadcrumbsOptions(MethodOptions):
    """breadcrumbs: the `gamma` largest and the smallest |tau_i| dropped until `density` remain."""

    density: Number = _density()
    gamma: Number = Field(0.01, ge=0, lt=1, description="fraction of the largest-magnitude entries removed")
    normalize: Flag = _normalize(False)
    rescale: Flag = _rescale(False)
    lambda_: Number = _lambda()


def _bound(x: float) -> str:
    if isinstance(x, int) and x > 2**32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return str(x) if isinstance(x, int) else f"{x:g}"


def option_interval(info: FieldInfo) -> str | None:
    """A declared option's bounds as an interval, e.g. (0, 1] for Field(gt=0, le=1); None if it has none."""
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    return _interval(bounds) if bounds else None


def _interval(bounds: dict[str, Any]) -> str:
    bounds = {k: v for k, v in bounds.items() if v is not None}  # an Interval has all four
    lo = next((f"{o}{_bound(bounds[k])}" for k, o in (("gt", "("), ("ge", "[")) if k in bounds), "(-inf")
    hi = next((f"{_bound(bounds[k])}{c}" for k, c in (("lt", ")"), ("le", "]")) if k in bounds), "inf)")
    return f"{lo}, {hi}"


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its options model, its paper and its one definition."""

    name: str
    title: str
    paper: str
    options: type[MethodOptions]
    fn: Callable[[Backend, TensorInputs, dict[str, Any]], Blocks]
    uses_base: bool = True
    sparsify: str | None = None
    # the instruct model and one language model, no weights (mergekit's two-model methods)
    two_models: bool = False
    # reads each piece once, in order (slerp's first walk sums the whole tensor, as sparsifiers plan theirs)
    single_pass: bool = True

    @property
    def option_names(self) -> list[str]:
        """The options' names as a recipe writes them, in declaration order."""
        return [f.alias or name for name, f in self.options.model_fields.items()]

    def validate_options(self, given: dict[str, Any] | None) -> MethodOptions:
        """The typed options; otherwise a pydantic ValidationError at each bad option's name, its message
        worded as the recipe's other errors (`must be in (0, 1], got 1.5`, `unknown option of ties; valid
        options: ...`; the valid ones listed at the first unknown one only)."""
        given = given or {}
        try:
            return self.options.model_validate(given)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            first_unknown = next(
                (i for i, err in enumerate(errors) if err["type"] == "extra_forbidden"), None
            )
            house = [self._house(err, given, i == first_unknown) for i, err in enumerate(errors)]
            raise ValidationError.from_exception_data(e.title, house) from None

    def _house(self, err: ErrorDetails, given: Any, list_valid: bool) -> InitErrorDetails:
        """One pydantic error of the options model, reworded (a value out of bounds shown as given: pydantic
        reports the converted one, 0.0 for a 0)."""
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            valid = ", ".join(self.option_names) or "none"
            msg = f"unknown option of {self.name}; valid options: {valid}" if list_valid else "unknown option"
        elif kind in _BOUND_ERRORS:
            name = err["loc"][0]
            info = next(f for n, f in self.options.model_fields.items() if (f.alias or n) == name)
            value = given.get(name, value)
            msg = f"must be in {option_interval(info)}, got {shown(value)}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        # the message travels as context: a template would read braces in it (a dict input) as placeholders
        return {
            "type": PydanticCustomError("option", "{message}", {"message": msg}),
            "loc": err["loc"],
            "input": value,
        }

    def parse_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """All options by their recipe names, defaults filled in (what the merge records in MergeStats and
        provenance); an unknown or invalid option is an EdgemergeError naming it."""
        try:
            opts = self.validate_options(given)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
            parts = [f"options.{'.'.join(_clip(p) for p in err['loc'])}: {err['msg']}" for err in errors[:3]]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise EdgemergeError(f"method {self.name}: " + "; ".join(parts) + more) from None
        return opts.model_dump(by_alias=True)

    def merge(self, xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Blocks:
        """The merged float32 tensor, one (rows, array) per piece of `t.pieces` (`opts` from `parse_options`)."""
        return self.fn(xp, t, opts)


def _clip(part: Any, n: int = 40) -> str:
    text = part if isinstance(part, str) else shown(part, n)
    return text if len(text) <= n else text[: n - 3] + "..."


def _gta(sparsify: str | None, consensus: bool):
    def fn(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Blocks:
        return generalized_task_arithmetic(xp, t, opts, sparsify=sparsify, consensus=consensus)

    return fn


DEFAULT_METHOD = "task_arithmetic"  # the paper's

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "task_arithmetic",
            "Task Arithmetic (the paper's default)",
            "https://arxiv.org/abs/2212.04089",
            TaskArithmeticOptions,
            _gta(None, False),
        ),
        MergeMethod(
            "linear",
            "Linear (weighted average of instruct and language models)",
            "https://arxiv.org/abs/2203.05482",
            LinearOptions,
            linear,
            uses_base=False,
        ),
        MergeMethod(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            TiesOptions,
            _gta("magnitude", True),
            sparsify="magnitude",
            single_pass=False,
        ),
        MergeMethod(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            DareOptions,
            _gta("random", True),
            sparsify="random",
            single_pass=False,
        ),
        MergeMethod(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            DareOptions,
            _gta("random", False),
            sparsify="random",
            single_pass=False,
        ),
        MergeMethod(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            BreadcrumbsOptions,
            _gta("magnitude_outliers", False),
            sparsify="magnitude_outliers",
            single_pass=False,
        ),
        MergeMethod(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            DellaOptions,
            _gta("della", True),
            sparsify="della",
            single_pass=False,
        ),
        MergeMethod(
            "della_linear",
            "Linear DELLA",
            "https://arxiv.org/abs/2406.11617",
            DellaLinearOptions,
            _gta("della", False),
            sparsify="della",
            single_pass=False,
        ),
        MergeMethod(
            "slerp",
            "SLERP (spherical interpolation of the instruct and the language model)",
            "https://dl.acm.org/doi/10.1145/325165.325242",
            SlerpOptions,
            slerp,
            uses_base=False,
            two_models=True,
            single_pass=False,
        ),
        MergeMethod(
            "nearswap",
            "NearSwap (the language model's value where the two are near)",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            NearSwapOptions,
            nearswap,
            uses_base=False,
            two_models=True,
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name is an EdgemergeError listing the valid ones."""
    if name not in METHODS:
        raise EdgemergeError(f"unknown merge method {shown(name)}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
