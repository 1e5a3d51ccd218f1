"""Report sections for override sweeps and random baselines (docs/report.md).

* Per (space, overrides): a sweep with ``sweep.grid`` / ``sweep.variants`` gets one row per override
  set and space, mean ± std over seeds, so an ablation reads as rows side by side.
* Searched vs random: the retrains of searched genotypes against those of ``retrain.random_baselines``
  (runs tagged ``origin=random`` under the sweep run): top-1 of each series, the accuracy-vs-OPs plot
  of both, and the difference of the means with its standard error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.names import ORIGIN_TAG
from pipeline.report.collect import retrains_under
from pipeline.report.html import NOT_RUN, esc, fmt_stat, img, row, save_figure, table, td
from pipeline.report.model import SEARCH_COLUMNS, Retrain, Stat, Trial
from pipeline.tracking import TrackingContext

RANDOM = "random"


# ---- per (space, overrides) ---------------------------------------------------------------------
def group_rows(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """One row per (space, overrides tag): search and retrain statistics over the finished seeds."""
    keys = sorted({(t.space, t.run["tags"].get("overrides", "")) for t in trials})
    out = []
    for space, overrides in keys:
        ts = [t for t in trials if t.space == space and t.run["tags"].get("overrides", "") == overrides]
        done = [r for t in ts for r in t.retrains if r.finished]
        out.append(
            {
                "space": space,
                "overrides": overrides,
                "trials": len(ts),
                "finished": sum(t.finished for t in ts),
                "search": {k: Stat.of(t.metrics.get(k) for t in ts if t.finished) for k, _ in SEARCH_COLUMNS},
                "top1": Stat.of(r.metrics.get("top1") for r in done),
            }
        )
    return out


def groups_html(groups: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        row(
            [td(g["space"], "l"), td(g["overrides"] or "(none)", "l"), td(f"{g['finished']}/{g['trials']}")]
            + [td(fmt_stat(g["search"][k])) for k, _ in SEARCH_COLUMNS]
            + [td(fmt_stat(g["top1"]))],
            f' id="group-{esc(g["space"])}-{esc(g["overrides"])}"',
        )
        for g in groups
    ]
    header = ["space", "overrides", "finished/trials", *(h for _, h in SEARCH_COLUMNS), "retrain top-1"]
    return table(header, rows, left=2)


# ---- searched vs random -------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    searched: Stat | None
    random: Stat | None
    diff: float | None  # mean searched - mean random top-1
    spread: float | None  # standard error of ``diff``

    def sentence(self) -> str:
        if self.searched is None or self.random is None:
            return f"searched − random: {NOT_RUN} (needs a finished retrain in each series)"
        pm = "± ?" if self.spread is None else f"± {100 * self.spread:.2f}"
        out = f"searched − random = {100 * self.diff:+.2f} {pm} pts top-1 (n={self.searched.n} vs {self.random.n})"
        if min(self.searched.n, self.random.n) < 2:
            return out + ": a series of one run, too few to judge"
        beyond = abs(self.diff) > 2 * self.spread
        return out + f": {'more' if beyond else 'less'} than twice its standard error"


def compare(searched: Sequence[float], random: Sequence[float]) -> Comparison:
    """Difference of mean top-1 with Welch's standard error sqrt(s1²/n1 + s2²/n2); a series of one run
    borrows the other's variance (none when both have one run)."""
    s, r = Stat.of(searched), Stat.of(random)
    if s is None or r is None:
        return Comparison(s, r, None, None)
    var = [x.std**2 if x.std is not None else None for x in (s, r)]
    var = [v if v is not None else next((w for w in var if w is not None), None) for v in var]
    spread = None if None in var else math.sqrt(var[0] / s.n + var[1] / r.n)
    return Comparison(s, r, s.mean - r.mean, spread)


def random_retrains(ctx: TrackingContext, sweep: dict[str, Any]) -> list[Retrain]:
    """The random-baseline retrains: runs tagged ``origin=random`` directly under the sweep run (a run dict)."""
    now_ms = int(time.time() * 1000)
    found = retrains_under(ctx, sweep["run_id"], sweep["params"], now_ms)
    return [r for r in found if r.run["tags"].get(ORIGIN_TAG) == RANDOM]


def _points(retrains: Sequence[Retrain]) -> list[tuple[float, float]]:
    return [
        (r.metrics["ops"], r.metrics["top1"]) for r in retrains if r.finished and {"ops", "top1"} <= r.metrics.keys()
    ]


def plot_series(searched: Sequence[Retrain], random: Sequence[Retrain], path: Path) -> str | None:
    """Top-1 against OPs: searched genotypes as dots, random genotypes as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("searched", _points(searched), "o"), (RANDOM, _points(random), "x")]
    if not any(points for _, points, _ in series):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points, marker in series:
        if points:
            ax.scatter(*zip(*points), marker=marker, s=50, label=f"{label} (n={len(points)})")
    ax.set_xlabel("OPs = BOPs/64 + FLOPs")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def random_html(c: Comparison, plot: str | None) -> str:
    rows = [
        row([td(name, "l"), td(stat.n if stat else 0), td(fmt_stat(stat))], f' id="series-{name}"')
        for name, stat in (("searched", c.searched), (RANDOM, c.random))
    ]
    figure = img(plot, "top-1 against OPs, searched and random genotypes", "wide") if plot else ""
    return (
        "<p>Retrains of the searched genotypes against uniformly random genotypes of the same space, retrained "
        "with the same recipe (<code>retrain.random_baselines</code>). ± in the difference is the standard error "
        "of the difference of the means.</p>"
        + table(["series", "retrained", "top-1"], rows)
        + f'<p id="searched-vs-random"><b>{esc(c.sentence())}</b></p>'
        + figure
    )


def sections(trials: Sequence[Trial], random: Sequence[Retrain], out_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """The HTML of both sections (each only when it applies) and their summary for ``summary.json``."""
    body: list[str] = []
    summary: dict[str, Any] = {}
    if any(t.run["tags"].get("overrides") for t in trials):
        summary["groups"] = group_rows(trials)
        body += ["<h2>Search and retrain, per space and overrides</h2>", groups_html(summary["groups"])]
    if random:
        searched = [r for t in trials for r in t.retrains]
        c = compare(*([r.metrics.get("top1") for r in rs if r.finished] for rs in (searched, random)))
        plot = plot_series(searched, random, out_dir / "searched_vs_random.png")
        summary["searched_vs_random"] = {**c.__dict__, "sentence": c.sentence()}
        body += ["<h2>Searched vs random genotypes</h2>", random_html(c, plot)]
    return body, summary
