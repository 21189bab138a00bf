"""Pictures for the folder and its card: the sweep's signals against the language weight (PNG, headless)."""

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


def sweep_plot(rows: list[dict], chosen: str | None, path: Path, *, title: str) -> Path:
    """A 2 x 2 PNG: each panel one signal against w, a line per method, the parents as dashed reference lines,
    the chosen candidate ringed. `rows` are sweep rows (`rule.Row.to_dict`)."""
    # matplotlib takes ~0.5 s to import and is needed only here; Agg draws without a display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)
