"""Pictures for the folder and its card (PNG, headless): the sweep's signals against the language weight, the
quant ladder's drift against the file size."""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_output

# (signal, title, log scale, higher is better)
PANELS = (
    ("answer_ppl", "answers in the target language (perplexity)", True),
    ("answer_ppl_en", "English answers (perplexity)", True),
    ("eot_prob_en", "end-of-turn probability after an English answer", False),
    ("ppl", "target-language text (perplexity)", True),
)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (draws without a display)."""
    # matplotlib takes ~0.5 s to import and is needed only for the pictures
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def sweep_plot(rows: list[dict], chosen: str | None, path: Path, *, title: str) -> Path:
    """A 2 x 2 PNG: each panel one signal against w, a line per method, the parents as dashed reference lines,
    the chosen candidate ringed. `rows` are sweep rows (`rule.Row.to_dict`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["role"] == "candidate"))
    parents = [r for r in rows if r["role"] != "candidate"]
    for ax, (key, label, log) in zip(axes.flat, PANELS):
        for method in methods:
            pts = sorted(
                (r["weight"], r[key])
                for r in rows
                if r["role"] == "candidate" and r["method"] == method and _finite(r[key])
            )
            if pts:
                ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", label=method)
        for i, p in enumerate(parents):
            if _finite(p[key]):
                ax.axhline(p[key], linestyle="--", linewidth=1, color=f"C{len(methods) + i}", label=p["name"])
        pick = next((r for r in rows if r["name"] == chosen), None)
        if pick is not None and _finite(pick[key]):
            ax.plot([pick["weight"]], [pick[key]], marker="o", markersize=14, fillstyle="none", color="black",
                    linestyle="none", label=f"chosen: {chosen}")  # fmt: skip
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("language weight w")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def ladder_plot(
    rungs: list[dict],
    chosen: str | None,
    path: Path,
    *,
    title: str,
    max_size: int | None,
    max_kld: float | None,
    min_top1: float | None,
) -> Path:
    """Two panels against the file size: the mean KL divergence from the unquantized file (log scale) and the
    top-1 agreement, a labelled point per measured type, the chosen one ringed, the drift gate and the size
    budget as dashed lines; the types not measured (over budget, or larger than the choice) as grey ticks on the
    size axis. `rungs` are `ladder.Rung.to_dict()`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    measured = sorted((r for r in rungs if r["kld_mean"] is not None), key=lambda r: r["size"])
    others = [r for r in rungs if r["kld_mean"] is None]
    top = max([r["size"] for r in rungs] + [max_size or 0])
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)) if top >= s)
    panels = (
        ("kld_mean", "mean KL divergence from F16 (log)", max_kld, "max"),
        ("top1_agreement", "top-1 agreement with F16", min_top1, "min"),
    )
    for ax, (key, label, bound, side) in zip(axes, panels):
        xs = [r["size"] / scale for r in measured]
        ys = [max(r[key], 1e-6) if key == "kld_mean" else r[key] for r in measured]
        ax.plot(xs, ys, marker="o", color="C0", label="measured, smallest first")
        for i, (r, x, y) in enumerate(zip(measured, xs, ys)):  # labels above and below in turn: neighbours
            ax.annotate(
                r["quant"], (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -11), fontsize=8
            )
        pick = next(((x, y) for r, x, y in zip(measured, xs, ys) if r["quant"] == chosen), None)
        if pick is not None:
            ring = {"markersize": 14, "fillstyle": "none", "color": "black", "linestyle": "none"}
            ax.plot(*pick, marker="o", label=f"chosen: {chosen}", **ring)
        for r in others:
            at = (r["size"] / scale, 0)  # on the size axis, whatever the y scale
            axis = ax.get_xaxis_transform()
            ax.plot(*at, marker="|", markersize=12, color="grey", transform=axis, clip_on=False)
            ax.annotate(r["quant"], at, xycoords=axis, xytext=(2, 6), textcoords="offset points", fontsize=7,
                        color="grey", rotation=90)  # fmt: skip
        if bound is not None:
            ax.axhline(bound, linestyle="--", linewidth=1, color="C3", label=f"gate: {side} {bound:g}")
        if max_size is not None:
            ax.axvline(max_size / scale, linestyle=":", linewidth=1.5, color="C2",
                       label=f"--max-size {max_size / scale:.3g} {unit}")  # fmt: skip
        if key == "kld_mean":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(f"file size ({unit}); grey ticks: not measured")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)
