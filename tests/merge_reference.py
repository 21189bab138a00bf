"""Independent numpy computations of the merge formulas (mergekit's definitions, stable tie-breaking), used to
check edgemerge's methods. Written from the formulas, sharing no code with edgemerge.merge."""

from __future__ import annotations

import hashlib

import numpy as np


def keep_top(a: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest |a|; equal magnitudes ordered by position (stable ascending sort)."""
    flat = np.abs(a).ravel()
    order = np.argsort(flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[flat.size - k :]] = True
    return keep.reshape(a.shape)


def keep_band(a: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: positions [n_bot, n - n_top) of the stable ascending sort of |a|."""
    n = a.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(a).ravel(), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[n_bot : n - n_top]] = True
    return keep.reshape(a.shape)


def dare_keep(seed: int, name: str, model: int, shape, density: float) -> np.ndarray:
    """u < density, u ~ U[0,1) float32 from PCG64 seeded by (seed, first 8 bytes of sha256(name) LE, model)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key, model])))
    return (rng.random(int(np.prod(shape)), dtype=np.float32) < density).reshape(shape)


def l1_rescaled(tau: np.ndarray, keep: np.ndarray) -> np.ndarray:
    masked = np.where(keep, tau, 0).astype(np.float32)
    before, after = np.abs(tau).sum(dtype=np.float64), np.abs(masked).sum(dtype=np.float64)
    if before < 1e-7 or after < 1e-7:
        return masked
    return (masked * (before / after)).astype(np.float32)


DEFAULTS = {
    "task_arithmetic": {"normalize": False},
    "ties": {"density": 1.0, "normalize": True, "rescale": False},
    "dare_ties": {"density": 1.0, "normalize": False, "rescale": True, "seed": 0},
    "dare_linear": {"density": 1.0, "normalize": False, "rescale": True, "seed": 0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False},
}
SPARSIFY = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random", "breadcrumbs": "band"}
CONSENSUS = {"ties", "dare_ties"}


def reference(method: str, name: str, instruct, base, langs, weights, options=None) -> np.ndarray:
    """The merged float32 tensor by the formulas of edgemerge.merge.methods' docstring."""
    instruct, base = np.asarray(instruct, np.float32), np.asarray(base, np.float32)
    langs = [np.asarray(x, np.float32) for x in langs]
    if method == "linear":
        normalize = (options or {}).get("normalize", True)
        acc = instruct + sum(w * x for w, x in zip(weights, langs))
        return acc / (1 + sum(weights)) if normalize else acc
    o = {**DEFAULTS[method], "lambda": 1.0, **(options or {})}
    ws = np.array([1.0] + list(weights), dtype=np.float32)
    taus = []
    for i, m in enumerate([instruct] + langs):
        tau = m - base
        kind = SPARSIFY.get(method)
        if kind and o["density"] < 1:
            if kind == "magnitude":
                keep = keep_top(tau, int(o["density"] * tau.size))
            elif kind == "band":
                keep = keep_band(tau, o["density"], o["gamma"])
            else:
                keep = dare_keep(o["seed"], name, i, tau.shape, o["density"])
            tau = l1_rescaled(tau, keep) if o["rescale"] else np.where(keep, tau, 0).astype(np.float32)
        taus.append(tau)
    wd = np.stack(taus) * ws.reshape(-1, *([1] * base.ndim))
    if method in CONSENSUS:
        elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(wd) == elected
        mixed = (wd * agree).sum(0)
        divisor = (ws.reshape(-1, *([1] * base.ndim)) * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = ws.sum() if abs(ws.sum()) >= 1e-8 else 1.0
    if o["normalize"]:
        mixed = mixed / divisor
    return (base + o["lambda"] * mixed).astype(np.float32)


def assert_rounded_once(out: np.ndarray, ref: np.ndarray, rel: float = 2e-6, atol: float = 1e-7) -> None:
    """`out` (bfloat16/float16) is the float32 `ref` rounded to nearest once. A float32 reference computed in
    another order differs in its last bits (relative noise; absolute where the inputs ~1e-2 cancel), which
    flips values sitting on a rounding midpoint: each value must be the rounding of some r' within
    delta = atol + rel*|r| of r, i.e. (rounding being monotonic) round(r - delta) <= out <= round(r + delta)."""
    r = np.asarray(ref, np.float32)
    o = out.astype(np.float32)
    delta = np.float32(atol) + np.float32(rel) * np.abs(r)
    lo = (r - delta).astype(out.dtype).astype(np.float32)
    hi = (r + delta).astype(out.dtype).astype(np.float32)
    ok = (lo <= o) & (o <= hi)
    assert ok.all(), f"{(~ok).sum()} of {ok.size} values are not the reference rounded once to {out.dtype}"
