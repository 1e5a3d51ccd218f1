"""PNG diagrams of cells and architecture weights, drawn with matplotlib only (no graphviz)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch
from torch import Tensor

from dcpnas.genotype import CELL_TYPES, Genotype
from dcpnas.spaces import SearchSpace

_OP_COLORS = {
    "skip_connect": "#2ca02c",
    "max_pool_3x3": "#1f77b4",
    "avg_pool_3x3": "#17becf",
    "sep_conv_3x3": "#d62728",
    "sep_conv_5x5": "#ff7f0e",
    "dil_conv_3x3": "#9467bd",
    "dil_conv_5x5": "#8c564b",
}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_cell(ax: Axes, genotype: Genotype, cell: str = "normal") -> None:
    """Draw one cell of ``genotype`` on ``ax`` as an arc diagram.

    States sit on a line (c_{k-2}, c_{k-1}, nodes 0.., c_{k}); every op edge is an arc above the
    line with its op name at the apex (two edges share an apex only if they join the same
    two states), and the concat into
    the output is drawn as grey arcs below it. Unlike a free graph layout this never overlaps.
    """
    if cell not in CELL_TYPES:
        raise ValueError(f"unknown cell '{cell}'; known: {', '.join(CELL_TYPES)}")
    edges, concat = getattr(genotype, cell), getattr(genotype, f"{cell}_concat")
    steps = len(edges) // 2
    out = steps + 2
    names = ["$c_{k-2}$", "$c_{k-1}$", *map(str, range(steps)), "$c_{k}$"]

    def arc(src: int, dst: int, color: str, above: bool) -> None:
        # arc3 puts the Bezier control point rad * span off the line; the apex is halfway there.
        rad = -1.0 if above else 0.6
        style = {"arrowstyle": "-|>", "mutation_scale": 12, "lw": 1.5, "shrinkA": 12, "shrinkB": 12, "zorder": 1}
        ax.add_patch(FancyArrowPatch((src, 0), (dst, 0), connectionstyle=f"arc3,rad={rad}", color=color, **style))

    def label(x: float, y: float, text: str, fontsize: int, bbox: dict) -> None:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, zorder=3, bbox=bbox)

    for k, (op, src) in enumerate(edges):
        dst, color = 2 + k // 2, _OP_COLORS.get(op, "black")
        arc(src, dst, color, above=True)
        label((src + dst) / 2, (dst - src) / 2, op, 8, {"boxstyle": "round,pad=0.15", "fc": "white", "ec": color})
    for node in concat:
        arc(node, out, "#999999", above=False)
    for i, name in enumerate(names):
        fc = "#a6cee3" if i < 2 else "#b2df8a" if i == out else "#fdbf6f"
        label(i, 0, name, 11, {"boxstyle": "round,pad=0.35", "fc": fc, "ec": "black"})
    ax.set_xlim(-0.7, out + 0.7)
    ax.set_ylim(-0.3 * (out - min(concat)) - 0.4, (out - 1) / 2 + 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{cell} cell ({genotype.space}, {genotype.hash[:8]})")


def plot_cell(genotype: Genotype, cell: str = "normal", path: str | Path = "cell.png") -> Path:
    fig, ax = plt.subplots(figsize=(11, 6))
    draw_cell(ax, genotype, cell)
    return _save(fig, path)


def plot_genotype(genotype: Genotype, path: str | Path = "genotype.png") -> Path:
    """Normal and reduction cell side by side, for comparing genotypes at a glance."""
    fig, axes = plt.subplots(1, 2, figsize=(20, 6))
    for ax, cell in zip(axes, CELL_TYPES):
        draw_cell(ax, genotype, cell)
    return _save(fig, path)


def _edge_labels(space: SearchSpace) -> list[str]:
    return [f"{src}->{dst}" for src, dst in space.edges()]


def _check_alpha(alpha: Tensor, space: SearchSpace) -> Tensor:
    if tuple(alpha.shape) != (2, space.num_edges, space.num_ops):
        raise ValueError(
            f"alpha has shape {tuple(alpha.shape)}, space '{space.name}' needs (2, {space.num_edges}, {space.num_ops})"
        )
    return torch.softmax(alpha.detach().double().cpu(), dim=-1)


def plot_alphas(alpha: Tensor, space: SearchSpace, path: str | Path = "alphas.png") -> Path:
    """Heatmap of softmax(alpha) per cell type: rows are edges (src->dst), columns the ops."""
    weights = _check_alpha(alpha, space)
    top = float(weights.max())
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.6 * space.num_ops, 0.45 * space.num_edges + 2), squeeze=False)
    for ax, cell, w in zip(axes[0], CELL_TYPES, weights):
        im = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
        ax.set_xticks(range(space.num_ops), space.ops, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(space.num_edges), _edge_labels(space), fontsize=8)
        for r, row in enumerate(w.tolist()):
            for c, v in enumerate(row):
                color = "white" if v < top / 2 else "black"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_title(f"{cell} cell: softmax(alpha)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_alpha_history(history: Sequence[Tensor], space: SearchSpace, path: str | Path = "alpha_history.png") -> Path:
    """Per-op softmax weight averaged over the edges, against the step (one panel per cell type)."""
    if not history:
        raise ValueError("alpha history is empty")
    means = torch.stack([_check_alpha(a, space).mean(dim=1) for a in history])  # [T, 2, M]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for c, (ax, cell) in enumerate(zip(axes, CELL_TYPES)):
        for m, op in enumerate(space.ops):
            ax.plot(
                range(len(history)),
                means[:, c, m].numpy(),
                label=op,
                color=_OP_COLORS.get(op, "black"),
                marker="o" if len(history) < 30 else None,
                ms=3,
            )
        ax.set_title(f"{cell} cell")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean softmax(alpha) over edges")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def save_genotype_artifacts(
    genotype: Genotype,
    out: str | Path,
    alpha: Tensor | None = None,
    alpha_history: Sequence[Tensor] | None = None,
    space: SearchSpace | None = None,
) -> dict[str, Path]:
    """The hand-off files of one search in ``out``: ``genotype.json``, both cell diagrams, and the
    alpha heatmap / history when given. One writer for the CLI's run directory and MLflow's artifacts."""
    from dcpnas.spaces import get_space

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = space or get_space(genotype.space)
    files = {"genotype": genotype.save(out / "genotype.json")}
    for cell in CELL_TYPES:
        files[cell] = plot_cell(genotype, cell, out / f"{cell}.png")
    if alpha is not None:
        files["alphas"] = plot_alphas(alpha, space, out / "alphas.png")
    if alpha_history is not None:
        files["alpha_history"] = plot_alpha_history(alpha_history, space, out / "alpha_history.png")
    return files
