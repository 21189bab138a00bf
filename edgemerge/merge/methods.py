"""Merge methods: pure maths over one tensor, one definition each, written against the backend interface.

Every method sees the same task vectors: the instruct model is the task vector tau_0 = W_instruct - W_base at
weight w_0 = 1, and each language model i is tau_i = W_lang_i - W_base at its recipe weight w_i. Inputs arrive
as float32 arrays; the engine rounds the result once to the output dtype. The definitions follow mergekit
(arcee-ai/mergekit `generalized_task_arithmetic.py`, `sparsify.py`, `linear.py`) so a recipe means the same
thing here as in a mergekit config with one value per option for every model:

    task_arithmetic   W = W_base + lambda * sum_i w_i tau_i                       (/ sum_i w_i if normalize)
    linear            W = (W_instruct + sum_i w_i W_lang_i) / (1 + sum_i w_i)     (no division if not normalize)
    ties              tau_i -> magnitude(tau_i, density); sign consensus; W = W_base + lambda * mixed
    dare_linear       tau_i -> bernoulli(tau_i, density) rescaled; W = W_base + lambda * sum_i w_i tau_i
    dare_ties         dare masks + sign consensus
    breadcrumbs       tau_i -> drop the gamma largest and the smallest |tau| until `density` remain

Sign consensus (TIES, "sum" method): with d_i = w_i tau_i, the elected sign is s = +1 where sum_i d_i >= 0 else
-1; m_i = [sign(d_i) == s]; mixed = sum_i m_i d_i, divided by sum_i m_i w_i (1 where that is 0) if normalize.
Without consensus, normalize divides by sum_i w_i (1 where |sum| < 1e-8).

Ties among equal magnitudes are broken by position (a stable sort), where mergekit's unstable sort leaves them
arbitrary; that makes results reproducible and equal across backends.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import EdgemergeError
from .backends import Array, Backend


class TensorInputs(Protocol):
    """One tensor of every input model, loaded on demand as float32 backend arrays."""

    name: str
    weights: list[float]  # w_i of the language models, in recipe order

    def instruct(self) -> Array: ...

    def base(self) -> Array: ...

    def language(self, i: int) -> Array: ...


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    parse: Callable[[str, Any], Any]


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false, got {v!r}")
    return v


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _fraction(lo_open: bool, hi_open: bool) -> Callable[[str, Any], float]:
    def parse(name: str, v: Any) -> float:
        x = _number(name, v)
        if (x <= 0 if lo_open else x < 0) or (x >= 1 if hi_open else x > 1):
            lo, hi = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {v!r}")
        return x

    return parse


def _seed(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return v


def _opt_normalize(default: bool) -> Option:
    return Option("normalize", default, "divide the mixed task vector by the sum of the weights", _bool)


OPT_LAMBDA = Option("lambda", 1.0, "scale of the mixed task vector", _number)
OPT_DENSITY = Option(
    "density", 1.0, "fraction of each task vector kept (1.0 keeps all)", _fraction(True, False)
)
OPT_GAMMA = Option("gamma", 0.01, "fraction of the largest-magnitude entries removed", _fraction(False, True))
OPT_SEED = Option("seed", 0, "seed of the random DARE masks (same seed, same model)", _seed)


def _opt_rescale(default: bool) -> Option:
    return Option("rescale", default, "rescale each sparsified task vector to its original L1 norm", _bool)


# ---------------------------------------------------------------------------------------------- sparsification


def rank_at_least(xp: Backend, x: Array, r: int) -> Array:
    """Mask of the entries whose position in the stable ascending sort of flattened `x` is >= r.

    With v the r-th smallest value (0-based), the entries > v are kept, those < v dropped, and of the entries
    equal to v (they occupy positions n_lt .. n_lt+n_eq-1, in index order) the j-th is kept iff n_lt + j >= r.
    Needs no index sort: a k-th value, a count and `true_after` (the True entries after the first `skip`).
    """
    n = math.prod(x.shape)
    if r <= 0 or r >= n:
        return xp.mask_from_numpy(np.full(tuple(x.shape), r <= 0))
    v = xp.kth_smallest(x, r)
    eq = x == v
    skip = r - xp.count(x < v)
    return (x > v) | (eq if skip == 0 else xp.true_after(eq, skip))


def rescale_l1(xp: Backend, tau: Array, kept: Array, eps: float = 1e-7) -> Array:
    """tau * kept * (|tau|_1 / |tau * kept|_1), or just tau * kept when either norm is below eps (mergekit)."""
    masked = xp.where(kept, tau, 0.0)
    before = xp.sum(xp.abs(tau))
    after = xp.sum(xp.abs(masked))
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(xp: Backend, tau: Array, density: float, rescale: bool) -> Array:
    """Keep the k = floor(density * n) entries of largest |tau| (TIES trimming); optional L1 rescale.

    mergekit asserts k > 0; here a tensor too small to keep any entry loses its whole task vector.
    """
    if density >= 1:
        return tau
    n = math.prod(tau.shape)
    k = int(density * n)
    kept = rank_at_least(xp, xp.abs(tau), n - k)
    return rescale_l1(xp, tau, kept) if rescale else xp.where(kept, tau, 0.0)


def magnitude_outliers(xp: Backend, tau: Array, density: float, gamma: float, rescale: bool) -> Array:
    """Model Breadcrumbs: drop the n_top = floor(gamma n) largest |tau| and the n_bot smallest, keeping
    floor(density n) entries (n_bot = n - floor(density n) - n_top; if negative, fewer large ones are dropped).

    mergekit slices `indices[n_bot:-n_top]`, which keeps nothing when n_top == 0; here n_top == 0 keeps the top.
    """
    if density >= 1:
        return tau
    n = math.prod(tau.shape)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    a = xp.abs(tau)
    kept = rank_at_least(xp, a, n_bot) & ~rank_at_least(xp, a, n - n_top)
    return rescale_l1(xp, tau, kept) if rescale else xp.where(kept, tau, 0.0)


_MASK_CHUNK = 1 << 22


def dare_mask(seed: int, tensor: str, model: int, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Bernoulli(density) keep-mask: u < density with u ~ U[0, 1) float32 from numpy's PCG64 seeded by
    (seed, sha256(tensor name), model index). Generated on the host so every backend sees the same mask and the
    result does not depend on the order tensors are processed in; drawn in chunks to bound the float buffer."""
    name_key = int.from_bytes(hashlib.sha256(tensor.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, name_key, model])))
    n = math.prod(shape)
    out = np.empty(n, dtype=bool)
    for start in range(0, n, _MASK_CHUNK):
        stop = min(n, start + _MASK_CHUNK)
        np.less(rng.random(stop - start, dtype=np.float32), density, out=out[start:stop])
    return out.reshape(shape)


def bernoulli(xp: Backend, tau: Array, density: float, rescale: bool, key: tuple[int, str, int]) -> Array:
    """DARE: drop each entry with probability 1 - density (`dare_mask`); rescale to the original L1 norm
    (mergekit's `rescale`, default on for DARE, replaces the paper's 1/density)."""
    if density >= 1:
        return tau
    seed, name, model = key
    kept = xp.mask_from_numpy(dare_mask(seed, name, model, tuple(tau.shape), density))
    return rescale_l1(xp, tau, kept) if rescale else xp.where(kept, tau, 0.0)


# ---------------------------------------------------------------------------------------------- methods


def _task_vectors(t: TensorInputs) -> list[tuple[Callable[[], Array], float]]:
    """(loader, weight) of every task vector's model: the instruct at weight 1, then the languages."""
    return [(t.instruct, 1.0)] + [((lambda i=i: t.language(i)), w) for i, w in enumerate(t.weights)]


def generalized_task_arithmetic(
    xp: Backend, t: TensorInputs, opts: dict[str, Any], *, sparsify: str | None, consensus: bool
) -> Array:
    """W = W_base + lambda * mix(w_i * sparsify(tau_i)); see the module docstring for `mix`."""
    base = t.base()
    weighted: list[Array] = []
    mixed = None
    weights = []
    for index, (load, w) in enumerate(_task_vectors(t)):
        tau = load() - base
        if sparsify == "magnitude":
            tau = magnitude(xp, tau, opts["density"], opts["rescale"])
        elif sparsify == "random":
            tau = bernoulli(xp, tau, opts["density"], opts["rescale"], (opts["seed"], t.name, index))
        elif sparsify == "magnitude_outliers":
            tau = magnitude_outliers(xp, tau, opts["density"], opts["gamma"], opts["rescale"])
        d = tau * w
        del tau
        weights.append(w)
        if consensus:
            weighted.append(d)
        else:
            mixed = d if mixed is None else mixed + d
    if consensus:
        total = weighted[0]
        for other in weighted[1:]:
            total = total + other
        positive = total >= 0  # the elected sign: + where the sum is >= 0, else -
        del total, d
        divisor = None
        for w in weights:
            d = weighted.pop(0)  # let each weighted vector go as soon as it is mixed in
            keep = (positive & (d > 0)) | (~positive & (d < 0))  # sign(d) == elected sign (0 never agrees)
            part = xp.where(keep, d, 0.0)
            del d
            mixed = part if mixed is None else mixed + part
            if opts["normalize"]:
                wpart = xp.where(keep, w, 0.0)
                divisor = wpart if divisor is None else divisor + wpart
                del wpart
            del keep, part
        del positive
        if opts["normalize"]:
            divisor = xp.where(divisor == 0, 1.0, divisor)
            mixed = mixed / divisor
            del divisor
    elif opts["normalize"]:
        total_w = sum(weights)
        mixed = mixed / (1.0 if abs(total_w) < 1e-8 else total_w)
    if opts["lambda"] != 1:
        mixed = mixed * opts["lambda"]
    return base + mixed


def linear(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Array:
    """W = (W_instruct + sum_i w_i W_lang_i) / (1 + sum_i w_i); without normalize, no division."""
    acc = None
    for load, w in _task_vectors(t):
        term = load() * w if w != 1.0 else load()
        acc = term if acc is None else acc + term
    if opts["normalize"]:
        total = 1.0 + sum(t.weights)
        if abs(total) < 1e-8:
            raise EdgemergeError("linear merge: 1 + sum of the language weights is 0; change the weights")
        acc = acc / total
    return acc


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its options (with mergekit's defaults), its paper and its one definition."""

    name: str
    title: str
    paper: str
    options: tuple[Option, ...]
    fn: Callable[[Backend, TensorInputs, dict[str, Any]], Array]
    uses_base: bool = True
    sparsify: str | None = None

    def parse_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Options with defaults filled in; an unknown or invalid option is an EdgemergeError naming it."""
        given = dict(given or {})
        valid = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(valid))
        if unknown:
            names = ", ".join(valid) or "none"
            raise EdgemergeError(f"method {self.name}: unknown option {unknown[0]!r}; valid options: {names}")
        out = {}
        for name, opt in valid.items():
            if name in given:
                try:
                    out[name] = opt.parse(name, given[name])
                except (TypeError, ValueError) as e:
                    raise EdgemergeError(f"method {self.name}: option {e}") from None
            else:
                out[name] = opt.default
        return out

    def elementwise(self, opts: dict[str, Any]) -> bool:
        """True when each output element depends only on the same element of the inputs (no top-k, norms or
        tensor-keyed masks), so the engine may merge a tensor block by block."""
        return self.sparsify is None or opts.get("density", 1.0) >= 1

    def merge(self, xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Array:
        """The merged float32 tensor (`opts` from `parse_options`)."""
        return self.fn(xp, t, opts)


def _gta(sparsify: str | None, consensus: bool):
    def fn(xp: Backend, t: TensorInputs, opts: dict[str, Any]) -> Array:
        return generalized_task_arithmetic(xp, t, opts, sparsify=sparsify, consensus=consensus)

    return fn


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "task_arithmetic",
            "Task Arithmetic (the paper's default)",
            "https://arxiv.org/abs/2212.04089",
            (_opt_normalize(False), OPT_LAMBDA),
            _gta(None, False),
        ),
        MergeMethod(
            "linear",
            "Linear (weighted average of instruct and language models)",
            "https://arxiv.org/abs/2203.05482",
            (_opt_normalize(True),),
            linear,
            uses_base=False,
        ),
        MergeMethod(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            (OPT_DENSITY, _opt_normalize(True), _opt_rescale(False), OPT_LAMBDA),
            _gta("magnitude", True),
            sparsify="magnitude",
        ),
        MergeMethod(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            (OPT_DENSITY, _opt_normalize(False), _opt_rescale(True), OPT_LAMBDA, OPT_SEED),
            _gta("random", True),
            sparsify="random",
        ),
        MergeMethod(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            (OPT_DENSITY, _opt_normalize(False), _opt_rescale(True), OPT_LAMBDA, OPT_SEED),
            _gta("random", False),
            sparsify="random",
        ),
        MergeMethod(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            (OPT_DENSITY, OPT_GAMMA, _opt_normalize(False), _opt_rescale(False), OPT_LAMBDA),
            _gta("magnitude_outliers", False),
            sparsify="magnitude_outliers",
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name is an EdgemergeError listing the valid ones."""
    if name not in METHODS:
        raise EdgemergeError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
