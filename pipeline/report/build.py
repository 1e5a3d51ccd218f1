"""The report of a sweep: collected from the tracking store, summarised, plotted, written as a static page
(``index.html``, ``summary.json``, PNGs) and logged to the sweep run as its ``report/`` artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.report.collect import collect, genotype_images
from pipeline.report.groups import random_retrains, sections
from pipeline.report.model import REPORT_ARTIFACT_DIR, RETRAIN_CURVES, SEARCH_CURVES
from pipeline.report.page import render_html
from pipeline.report.plots import plot_curves, plot_pareto, seed_styles, space_colors
from pipeline.report.summary import jsonable, summarize
from pipeline.tracking import TrackingContext
from pipeline.tracking.retry import display_uri


def _fresh_dir(out_dir: Path) -> None:
    """Empty ``out_dir`` for a new report, refusing to delete a directory that holds something else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "index.html").exists():
            raise UserError(f"{out_dir} is not empty and holds no report; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def build_report(ctx: TrackingContext, sweep_run_id: str, out_dir: Path) -> Path:
    """Write ``index.html``, ``summary.json`` and the PNGs of the sweep's report into ``out_dir``."""
    out_dir = Path(out_dir)
    sweep, trials = collect(ctx, sweep_run_id)
    _fresh_dir(out_dir)
    for t in trials:
        genotype_images(ctx, t, out_dir)
    summary = summarize(trials)
    colors, styles = space_colors(t.space for t in trials), seed_styles(trials)
    search_series = [(f"{t.space} s{t.seed}", colors[t.space], styles[t.seed], t.history) for t in trials]
    retrain_series = [
        (f"{t.space} s{t.seed}", colors[t.space], styles[t.seed], r.history) for t in trials for r in t.retrains
    ]
    plots = {
        "pareto": plot_pareto(summary["pareto"], colors, out_dir / "pareto.png"),
        "search_curves": plot_curves(search_series, SEARCH_CURVES, out_dir / "search_curves.png"),
        "retrain_curves": plot_curves(retrain_series, RETRAIN_CURVES, out_dir / "retrain_curves.png"),
    }
    extra, more = sections(trials, random_retrains(ctx, sweep), out_dir)
    (out_dir / "summary.json").write_text(
        json.dumps(
            {"sweep_run_id": sweep_run_id, "experiment": ctx.experiment_name, **jsonable({**summary, **more})},
            indent=2,
        )
    )
    index = out_dir / "index.html"
    page = render_html(sweep, ctx.experiment_name, display_uri(ctx.uri), trials, summary, plots, extra)
    index.write_text(page, encoding="utf-8")
    return index


def publish_report(ctx: TrackingContext, sweep_run_id: str, out_dir: Path) -> None:
    """Log the report directory as the sweep run's ``report/`` artifacts (browse it in ``dcpnas ui``)."""
    tracking.log_artifacts(ctx, sweep_run_id, out_dir, REPORT_ARTIFACT_DIR)
