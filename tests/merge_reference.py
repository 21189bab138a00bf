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


def uniforms(seed: int, name: str, model: int, n: int) -> np.ndarray:
    """n draws u ~ U[0,1) float32 from PCG64 seeded by (seed, first 8 bytes of sha256(name) LE, model)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key, model])))
    return rng.random(n, dtype=np.float32)


def dare_keep(seed: int, name: str, model: int, shape, density: float) -> np.ndarray:
    """u < density, u from `uniforms`."""
    return (uniforms(seed, name, model, int(np.prod(shape))) < density).reshape(shape)


def della_keep(
    seed: int, name: str, model: int, tau: np.ndarray, density: float, epsilon: float
) -> np.ndarray:
    """u < p per entry, u from `uniforms`; p = (density - epsilon) + 2 epsilon * rank / (m - 1) in float32, rank
    the entry's place in its row of m (a 1-D tensor is one row) sorted by |tau| then position; p = density
    for m = 1."""
    rows = np.abs(tau).reshape(1, -1) if tau.ndim < 2 else np.abs(tau)
    assert rows.ndim == 2
    m = rows.shape[1]
    position = np.broadcast_to(np.arange(m), rows.shape)
    order = np.lexsort((position, rows), axis=-1)  # by magnitude, then position
    rank = np.argsort(order, axis=-1).astype(np.float32)  # the inverse permutation
    if m == 1:
        p = np.full(rows.shape, density, np.float32)
    else:
        p = ((density - epsilon) + rank / np.float32(m - 1) * 2 * epsilon).astype(np.float32)
    return (uniforms(seed, name, model, tau.size).reshape(rows.shape) < p).reshape(tau.shape)


def slerp_reference(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit's slerp written out: the whole tensors normalized (unless their norm is <= 1e-8), lerp where
    the cosine's magnitude exceeds 0.9995, else sin((1 - t) theta) / sin theta v0 + sin(t theta) / sin theta v1."""
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = np.sum((a / na if na > 1e-8 else a) * (b / nb if nb > 1e-8 else b))
    if abs(cos) > 0.9995:
        return ((1 - t) * a + t * b).astype(np.float32)
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b).astype(
        np.float32
    )


def nearswap_reference(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit 0.1.5's nearswap: l = clip(t / max(|v0 - v1|, 1e-6), 0, 1); l v1 + (1 - l) v0."""
    lw = np.clip(np.float32(t) / np.maximum(np.abs(v0 - v1), np.float32(1e-6)), 0, 1)
    return (lw * v1 + (1 - lw) * v0).astype(np.float32)


def gradient(t, position: float, name: str = "") -> float:
    """A list-valued option at `position` in [0, 1]: linear between its neighbouring values; a list of
    {filter, value} conditions: the first whose filter is missing, "*" or in `name` (mergekit)."""
    if isinstance(t, list) and all(isinstance(c, dict) for c in t):
        match = next(c for c in t if c.get("filter") in (None, "*") or c["filter"] in name)
        return gradient(match["value"], position)
    if not isinstance(t, list):
        return t
    return float(np.interp(position * (len(t) - 1), np.arange(len(t)), t))


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
    "della": {"density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": True, "seed": 0},
    "della_linear": {"density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": True, "seed": 0},
}
SPARSIFY = {
    "ties": "magnitude",
    "dare_ties": "random",
    "dare_linear": "random",
    "breadcrumbs": "band",
    "della": "della",
    "della_linear": "della",
}
CONSENSUS = {"ties", "dare_ties", "della"}


def reference(
    method: str, name: str, instruct, base, langs, weights, options=None, position=0.0
) -> np.ndarray:
    """The merged float32 tensor by the formulas of edgemerge.merge.methods' docstring."""
    instruct, langs = np.asarray(instruct, np.float32), [np.asarray(x, np.float32) for x in langs]
    if method in ("slerp", "nearswap"):  # two models, no base
        t = gradient((options or {}).get("t", 0.5), position, name)
        return (slerp_reference if method == "slerp" else nearswap_reference)(t, instruct, langs[0])
    base = np.asarray(base, np.float32)
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
            elif kind == "della":
                keep = della_keep(o["seed"], name, i, tau, o["density"], o["epsilon"])
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
