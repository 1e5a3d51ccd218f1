"""What the report is made of: a trial and its retrains as read from the store, costs, statistics,
the Pareto front, and the columns and curves the page shows."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.names import (
    ALPHA_ENTROPY,
    CHILD_VAL_ACC,
    PARENT_VAL_ACC,
    SKIP_NORMAL,
    TEACHER_STEP,
    step_metric,
    step_name,
)

REPORT_ARTIFACT_DIR = "report"


SEARCH_COLUMNS = (
    (CHILD_VAL_ACC, "child val acc"),
    ("parent/val_acc", "parent val acc"),
    ("alpha_entropy", "alpha entropy"),
    ("skip_normal", "skips normal"),
    ("skip_reduce", "skips reduce"),
    ("search_minutes", "search time (min)"),
)


RETRAIN_COLUMNS = (
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("params", "params"),
    ("binary_params", "binary params"),
    ("ops", "OPs"),
    ("bops", "BOPs"),
    ("flops", "FLOPs"),
    ("memory_mbit", "memory (Mbit)"),
)


SEARCH_CURVES = (CHILD_VAL_ACC, PARENT_VAL_ACC, ALPHA_ENTROPY, SKIP_NORMAL)


RETRAIN_CURVES = (
    step_metric(TEACHER_STEP, "loss"),
    step_metric(step_name(0), "top1"),
    step_metric(step_name(1), "top1"),
    step_metric(step_name(1), "top5"),
)


GENOTYPE_IMAGES = ("normal.png", "reduce.png", "alpha_history.png")


# Resource params per stage, tried in order: a run's own params first, then the sweep run's config.
RESOURCE_PREFIXES = {"search": ("sweep",), "retrain": ("retrain",), "eval": ("eval", "retrain")}


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n-1; None for a single value) of the finite values."""

    n: int
    mean: float
    std: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        xs = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not xs:
            return None
        return cls(len(xs), statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None)


@dataclass(frozen=True)
class Cost:
    """Resource use of one run; ``how`` says where the numbers came from (shown in the page)."""

    core_hours: float | None
    gpu_hours: float | None
    how: str


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(cost, accuracy)`` points: True where no other point is at most as costly and at least
    as accurate while better in one of the two. Points with a NaN are never on the front."""
    ok = [not (math.isnan(c) or math.isnan(a)) for c, a in points]
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any(
            ok[j] and cj <= c and aj >= a and (cj < c or aj > a) for j, (cj, aj) in enumerate(points) if j != i
        )
        front.append(ok[i] and not dominated)
    return front


def _number(value: str | None) -> float | None:
    """A param as logged by tracking (JSON text) as a float; None when absent, null or not a number."""
    try:
        v = json.loads(value) if value is not None else None
    except json.JSONDecodeError:
        return None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def run_cost(run: Mapping[str, Any], params: Mapping[str, str], prefixes: Sequence[str], now_ms: int) -> Cost:
    """``cost/core_hours`` / ``cost/gpu_hours`` when the run logged them, else wall duration × the
    CPUs and GPUs its config reserved: ``workers × cpus_per_worker (+ trial_cpus)`` and
    ``workers × gpus_per_worker`` under the first prefix in ``params`` that has ``workers``."""
    m = run["metrics"]
    if "cost/core_hours" in m or "cost/gpu_hours" in m:
        return Cost(m.get("cost/core_hours"), m.get("cost/gpu_hours"), "logged cost/* metrics")
    hours = ((run["end_time"] or now_ms) - run["start_time"]) / 3.6e6
    for p in prefixes:
        workers = _number(params.get(f"{p}.workers"))
        if workers is None:
            continue
        cpus = _number(params.get(f"{p}.cpus_per_worker"))
        if cpus is None:
            return Cost(None, None, f"unknown: {p}.workers logged without {p}.cpus_per_worker")
        cores = workers * cpus + (_number(params.get(f"{p}.trial_cpus")) or 0.0)
        gpus = workers * (_number(params.get(f"{p}.gpus_per_worker")) or 0.0)
        running = ", still running" if run["end_time"] is None else ""
        return Cost(hours * cores, hours * gpus, f"{hours:.3g} h wall × {cores:g} CPUs, {gpus:g} GPUs ({p}.*{running})")
    return Cost(None, None, f"unknown: no cost/* metrics and no {' or '.join(f'{p}.workers' for p in prefixes)} param")


def seed_order(seed: str) -> tuple[int, str]:
    """Numeric seeds in numeric order (tags are strings: "10" after "9")."""
    return (len(seed), seed) if seed.isdigit() else (1 << 30, seed)


@dataclass
class Retrain:
    run: dict[str, Any]
    eval_run: dict[str, Any] | None
    metrics: dict[str, float]  # the retrain run's final metrics, top1/top5 from its eval when there is one
    cost: Cost
    eval_cost: Cost | None
    history: dict[str, list[tuple[int, float]]]

    @property
    def finished(self) -> bool:
        return self.run["status"] == "FINISHED"


@dataclass
class Trial:
    run: dict[str, Any]
    history: dict[str, list[tuple[int, float]]]
    cost: Cost
    retrains: list[Retrain]
    images: dict[str, str] = field(default_factory=dict)  # GENOTYPE_IMAGES name -> path relative to the report

    @property
    def space(self) -> str:
        return self.run["tags"].get("space", "?")

    @property
    def seed(self) -> str:
        return self.run["tags"].get("seed", "?")

    @property
    def finished(self) -> bool:
        return self.run["status"] == "FINISHED"

    @property
    def metrics(self) -> dict[str, float]:
        """Final search metrics plus ``search_minutes``: Σ epoch_seconds, else the run's wall time."""
        m = dict(self.run["metrics"])
        epochs = self.history.get("epoch_seconds")
        if epochs:
            m["search_minutes"] = sum(v for _, v in epochs) / 60
        elif self.run["end_time"] is not None:
            m["search_minutes"] = (self.run["end_time"] - self.run["start_time"]) / 6e4
        return m


def sum_known(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) if xs else None
