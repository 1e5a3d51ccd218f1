"""The report's figures: metric curves per run and the accuracy-vs-OPs Pareto plot (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.report.html import save_figure
from pipeline.report.model import Trial, seed_order


def space_colors(spaces: Iterable[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sorted(set(spaces)))}


def plot_curves(series: Sequence[tuple[str, Any, str, Mapping]], keys: Sequence[str], path: Path) -> str | None:
    """One panel per metric in ``keys`` that some run logged; a line per ``(label, color, style, history)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in keys if any(k in h for *_, h in series)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, color, style, history in series:
            if key in history:
                steps, values = zip(*history[key])
                ax.plot(steps, values, color=color, linestyle=style, marker="o", ms=3, label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def seed_styles(trials: Sequence[Trial]) -> dict[str, str]:
    seeds = sorted({t.seed for t in trials}, key=seed_order)
    return {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(seeds)}


def plot_pareto(points: Sequence[Mapping[str, Any]], colors: Mapping[str, Any], path: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for space in sorted({p["space"] for p in points}):
        ps = [p for p in points if p["space"] == space]
        ax.scatter([p["ops"] for p in ps], [p["top1"] for p in ps], color=colors[space], label=space, s=40, zorder=2)
    front = sorted((p for p in points if p["front"]), key=lambda p: p["ops"])
    ax.step([p["ops"] for p in front], [p["top1"] for p in front], where="post", color="black", lw=1, zorder=1)
    ring = {"s": 160, "facecolors": "none", "edgecolors": "black", "label": "Pareto front", "zorder": 3}
    ax.scatter([p["ops"] for p in front], [p["top1"] for p in front], **ring)
    for p in points:
        ax.annotate(f"seed {p['seed']}", (p["ops"], p["top1"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ops = [p["ops"] for p in points if p["ops"] > 0]
    if ops and max(ops) / min(ops) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("OPs = BOPs/64 + FLOPs")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
