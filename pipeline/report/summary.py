"""The numbers of the page: per space, search and retrain statistics over seeds and the summed cost;
the finished retrains on or off the accuracy-vs-OPs front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.report.model import RETRAIN_COLUMNS, SEARCH_COLUMNS, Stat, Trial, pareto_front, sum_known


def _stats(rows: Sequence[Mapping[str, float]], columns: Sequence[tuple[str, str]]) -> dict[str, Stat | None]:
    return {k: Stat.of(r.get(k) for r in rows) for k, _ in columns}


def _pareto_points(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """Finished retrains with top-1 and OPs, each marked on/off the accuracy-vs-OPs front."""
    points = [
        {
            "run_id": r.run["run_id"],
            "space": t.space,
            "seed": t.seed,
            "ops": r.metrics["ops"],
            "top1": r.metrics["top1"],
        }
        for t in trials
        for r in t.retrains
        if r.finished and "ops" in r.metrics and "top1" in r.metrics
    ]
    for p, on in zip(points, pareto_front([(p["ops"], p["top1"]) for p in points])):
        p["front"] = on
    return points


def summarize(trials: Sequence[Trial]) -> dict[str, Any]:
    """Per space: search and retrain statistics over seeds (finished runs) and summed cost (all runs)."""
    spaces: dict[str, Any] = {}
    for space in sorted({t.space for t in trials}):
        ts = [t for t in trials if t.space == space]
        retrains = [r for t in ts for r in t.retrains]
        done = [r for r in retrains if r.finished]
        retrain_costs = [r.cost for r in retrains] + [r.eval_cost for r in retrains if r.eval_cost]
        spaces[space] = {
            "trials": len(ts),
            "finished": sum(t.finished for t in ts),
            "search": _stats([t.metrics for t in ts if t.finished], SEARCH_COLUMNS),
            "retrains": len(done),
            "retrain": _stats([r.metrics for r in done], RETRAIN_COLUMNS) if done else None,
            "cost": {
                "search_core_hours": sum_known(t.cost.core_hours for t in ts),
                "search_gpu_hours": sum_known(t.cost.gpu_hours for t in ts),
                "retrain_core_hours": sum_known(c.core_hours for c in retrain_costs) if retrains else None,
                "retrain_gpu_hours": sum_known(c.gpu_hours for c in retrain_costs) if retrains else None,
            },
        }
    return {"spaces": spaces, "pareto": _pareto_points(trials)}


def jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return {"n": value.n, "mean": value.mean, "std": value.std}
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
