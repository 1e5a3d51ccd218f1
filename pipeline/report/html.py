"""HTML and figure helpers of the report pages: escaped cells, tables, number formats (docs/report.md)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from pipeline.report.model import Stat

NOT_RUN = "not run"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(rel: str, alt: str, cls: str = "") -> str:
    css = f' class="{cls}"' if cls else ""
    return f'<img src="{esc(quote(rel))}" alt="{esc(alt)}"{css}>'


def fmt(x: float | None, like: float | None = None) -> str:
    """4 significant digits; M/G suffixes for counts (scaled like ``like``, so mean and std agree)."""
    if x is None or not math.isfinite(x):
        return "–"
    ref = abs(x if like is None else like)
    scale, unit = next(((s, u) for s, u in ((1e9, "G"), (1e6, "M")) if ref >= s), (1.0, ""))
    return f"{x / scale:.4g}{unit}"


def fmt_stat(s: Stat | None) -> str:
    if s is None:
        return "–"
    return fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {fmt(s.std, like=s.mean)}"


def hours(x: float | None, missing: str = "unknown") -> str:
    return missing if x is None else f"{x:.3g}"


def na(colspan: int = 1, text: str = NOT_RUN) -> str:
    span = f' colspan="{colspan}"' if colspan > 1 else ""
    return f'<td class="na"{span}>{esc(text)}</td>'


def row(cells: Iterable[str], attrs: str = "") -> str:
    return f"<tr{attrs}>{''.join(cells)}</tr>"


def td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{esc(value)}</td>' if cls else f"<td>{esc(value)}</td>"


def table(header: Sequence[str], rows: Sequence[str], left: int = 1) -> str:
    ths = "".join(f'<th class="l">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    return f"<table><tr>{ths}</tr>{''.join(rows)}</table>"


def save_figure(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name
