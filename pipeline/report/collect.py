"""What the report reads, all through the tracking package: a sweep run, its search trials with their
metric histories and costs, the retrain runs under each (with their latest eval), the genotype images."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcpnas.genotype import Genotype
from dcpnas.visualize import plot_cell
from pipeline import tracking
from pipeline.errors import UserError
from pipeline.progress.board import Log
from pipeline.report.model import (
    GENOTYPE_IMAGES,
    RESOURCE_PREFIXES,
    RETRAIN_CURVES,
    SEARCH_CURVES,
    Retrain,
    Trial,
    run_cost,
    seed_order,
)
from pipeline.tracking import TrackingContext


def _children(ctx: TrackingContext, run_id: str, stage: str) -> list[dict[str, Any]]:
    return [r for r in tracking.child_runs(ctx, run_id) if r["tags"].get("stage") == stage]


def retrains_under(
    ctx: TrackingContext, search_run_id: str, sweep_params: Mapping[str, str], now_ms: int
) -> list[Retrain]:
    """The retrain runs under a search run (or a sweep run: random baselines), each with its latest eval."""
    out = []
    for run in _children(ctx, search_run_id, "retrain"):
        evals = [e for e in _children(ctx, run["run_id"], "eval") if e["status"] == "FINISHED"]
        ev = evals[-1] if evals else None
        metrics = dict(run["metrics"])
        if ev is not None:
            metrics.update({k: ev["metrics"][k] for k in ("top1", "top5") if k in ev["metrics"]})
        cost = run_cost(run, {**sweep_params, **run["params"]}, RESOURCE_PREFIXES["retrain"], now_ms)
        eval_cost = run_cost(ev, {**sweep_params, **ev["params"]}, RESOURCE_PREFIXES["eval"], now_ms) if ev else None
        history = tracking.metric_history(ctx, run["run_id"], RETRAIN_CURVES)
        out.append(Retrain(run, ev, metrics, cost, eval_cost, history))
    return out


def genotype_images(ctx: TrackingContext, trial: Trial, out_dir: Path) -> None:
    """Copy the search run's logged genotype PNGs into the report, drawing the cells from
    ``genotype.json`` when only the JSON was logged."""
    run_id = trial.run["run_id"]
    rel = Path("genotypes") / tracking.slug(f"{trial.space}-seed{trial.seed}-{run_id[:8]}")  # tags are free text
    dest = out_dir / rel
    with tempfile.TemporaryDirectory() as tmp:
        src = tracking.download_artifact_dir(ctx, run_id, tracking.GENOTYPE_DIR, tmp)
        if src is None:
            return
        dest.mkdir(parents=True, exist_ok=True)
        for name in GENOTYPE_IMAGES:
            if (src / name).exists():
                shutil.copyfile(src / name, dest / name)
        if (src / "genotype.json").exists() and not all((dest / f"{c}.png").exists() for c in ("normal", "reduce")):
            genotype = Genotype.load(src / "genotype.json")
            for cell in ("normal", "reduce"):
                plot_cell(genotype, cell, dest / f"{cell}.png")
    trial.images = {name: (rel / name).as_posix() for name in GENOTYPE_IMAGES if (dest / name).exists()}


def collect(ctx: TrackingContext, sweep_run_id: str) -> tuple[dict[str, Any], list[Trial]]:
    """The sweep run (a plain run dict) and its search trials with histories, costs and retrains."""
    sweep = tracking.get_run(ctx, sweep_run_id)
    now_ms = int(time.time() * 1000)
    params = sweep["params"]
    trials = []
    for run in _children(ctx, sweep_run_id, "search"):
        history = tracking.metric_history(ctx, run["run_id"], (*SEARCH_CURVES, "epoch_seconds"))
        cost = run_cost(run, {**params, **run["params"]}, RESOURCE_PREFIXES["search"], now_ms)
        trials.append(Trial(run, history, cost, retrains_under(ctx, run["run_id"], params, now_ms)))
    return sweep, sorted(trials, key=lambda t: (t.space, seed_order(t.seed)))


def find_sweep_run(ctx: TrackingContext, config_hash: str | None = None, log: Log = print) -> str:
    """The sweep run (``stage=sweep``) with this config hash, else the latest one in the experiment.

    The fallback matters: the sweep logs the config it ran, which may differ from the loaded one
    (e.g. the digits source rewritten to the shards it converted), so its hash need not match.
    """
    runs = tracking.runs_of_stage(ctx, "sweep")
    if not runs:
        raise UserError(f"no sweep run in experiment '{ctx.experiment_name}'; run `dcpnas sweep` first")
    exact = [r for r in runs if r["tags"].get("config_hash") == config_hash]
    if not exact:
        log(f"no sweep run with config hash {str(config_hash)[:12]}; using the latest sweep run {runs[0]['run_id']}")
    return (exact or runs)[0]["run_id"]
