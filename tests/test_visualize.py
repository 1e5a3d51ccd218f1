"""PNG writers: files exist, are PNGs with content, and refuse malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcpnas.genotype import load_genotype
from dcpnas.spaces import get_space
from dcpnas.visualize import plot_alpha_history, plot_alphas, plot_cell, plot_genotype

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path, min_bytes: int = 5000) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > min_bytes


@pytest.mark.parametrize("cell", ["normal", "reduce"])
def test_plot_cell(tmp_path: Path, cell: str) -> None:
    path = plot_cell(load_genotype("ddpnas_mcn_2"), cell, tmp_path / "sub" / f"{cell}.png")
    assert path == tmp_path / "sub" / f"{cell}.png" and _is_png(path)


def test_plot_cell_rejects_unknown_cell(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cell 'upsample'"):
        plot_cell(load_genotype("darts_v2"), "upsample", tmp_path / "x.png")


def test_plot_genotype(tmp_path: Path) -> None:
    assert _is_png(plot_genotype(load_genotype("darts_v2"), tmp_path / "g.png"))


def test_plot_alphas_and_history(tmp_path: Path) -> None:
    space = get_space("dcpnas")
    torch.manual_seed(0)
    history = [torch.randn(2, space.num_edges, space.num_ops) * t for t in range(5)]
    assert _is_png(plot_alphas(history[-1], space, tmp_path / "a.png"))
    assert _is_png(plot_alpha_history(history, space, tmp_path / "h.png"))


def test_alpha_plots_check_shapes(tmp_path: Path) -> None:
    space = get_space("dcpnas_3x3")
    with pytest.raises(ValueError, match=r"\(2, 14, 6\)"):
        plot_alphas(torch.zeros(2, 14, 8), space, tmp_path / "a.png")
    with pytest.raises(ValueError, match="empty"):
        plot_alpha_history([], space, tmp_path / "h.png")
