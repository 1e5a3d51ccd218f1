"""``dcpnas report``: the comparison dashboard of a sweep, as static HTML + PNG logged to its parent run.

The MLflow UI is the live view of single runs; this page answers the questions across runs:
which space wins over seeds (mean ± std), what the genotypes look like side by side, which
retrained networks are on the accuracy/OPs Pareto front, and what the search and retraining cost.
Everything is read from the tracking store (the run tree of docs/tracking.md), so the report can
be rebuilt at any time; stages that have not run render as "not run". See docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.report_html import NOT_RUN
from pipeline.report_html import esc as _e
from pipeline.report_html import fmt as _fmt
from pipeline.report_html import fmt_stat as _fmt_stat
from pipeline.report_html import hours as _hours
from pipeline.report_html import img as _img
from pipeline.report_html import na as _na
from pipeline.report_html import row as _row
from pipeline.report_html import save_figure as _save
from pipeline.report_html import table as _table
from pipeline.report_html import td as _td

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TrackingContext

REPORT_ARTIFACT_DIR = "report"
SEARCH_COLUMNS = (
    ("child/val_acc", "child val acc"),
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
SEARCH_CURVES = ("child/val_acc", "parent/val_acc", "alpha_entropy", "skip_normal")
RETRAIN_CURVES = ("teacher/loss", "step1/top1", "step2/top1", "step2/top5")
GENOTYPE_IMAGES = ("normal.png", "reduce.png", "alpha_history.png")
# Resource params per stage, tried in order: a run's own params first, then the sweep run's config.
RESOURCE_PREFIXES = {"search": ("sweep",), "retrain": ("retrain",), "eval": ("eval", "retrain")}


# ---- numbers -------------------------------------------------------------------------------------
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


def _seed_order(seed: str) -> tuple[int, str]:
    """Numeric seeds in numeric order (tags are strings: "10" after "9")."""
    return (len(seed), seed) if seed.isdigit() else (1 << 30, seed)


def _sum(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) if xs else None


# ---- collection ----------------------------------------------------------------------------------
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


def _history(client: MlflowClient, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per-step values; an epoch logged twice (re-run after a resume) keeps its latest value."""
    out = {}
    for key in keys:
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        if latest:
            out[key] = [(step, v) for step, (_, v) in sorted(latest.items())]
    return out


def _children(ctx: TrackingContext, run_id: str, stage: str) -> list[dict[str, Any]]:
    from pipeline import tracking

    return [r for r in tracking.search_trials(ctx, run_id) if r["tags"].get("stage") == stage]


def retrains_under(
    ctx: TrackingContext, client: MlflowClient, search_run_id: str, sweep_params: Mapping[str, str], now_ms: int
) -> list[Retrain]:
    out = []
    for run in _children(ctx, search_run_id, "retrain"):
        evals = [e for e in _children(ctx, run["run_id"], "eval") if e["status"] == "FINISHED"]
        ev = evals[-1] if evals else None
        metrics = dict(run["metrics"])
        if ev is not None:
            metrics.update({k: ev["metrics"][k] for k in ("top1", "top5") if k in ev["metrics"]})
        cost = run_cost(run, {**sweep_params, **run["params"]}, RESOURCE_PREFIXES["retrain"], now_ms)
        eval_cost = run_cost(ev, {**sweep_params, **ev["params"]}, RESOURCE_PREFIXES["eval"], now_ms) if ev else None
        history = _history(client, run["run_id"], RETRAIN_CURVES)
        out.append(Retrain(run, ev, metrics, cost, eval_cost, history))
    return out


def _genotype_images(client: MlflowClient, trial: Trial, out_dir: Path) -> None:
    """Copy the search run's logged genotype PNGs into the report, drawing the cells from
    ``genotype.json`` when only the JSON was logged."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import GENOTYPE_DIR, slug

    run_id = trial.run["run_id"]
    rel = Path("genotypes") / slug(f"{trial.space}-seed{trial.seed}-{run_id[:8]}")  # tags are free text
    dest = out_dir / rel
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if not client.list_artifacts(run_id, GENOTYPE_DIR):
                return
            src = Path(client.download_artifacts(run_id, GENOTYPE_DIR, tmp))
        except (MlflowException, OSError):
            return
        dest.mkdir(parents=True, exist_ok=True)
        for name in GENOTYPE_IMAGES:
            if (src / name).exists():
                shutil.copyfile(src / name, dest / name)
        if (src / "genotype.json").exists() and not all((dest / f"{c}.png").exists() for c in ("normal", "reduce")):
            from dcpnas.genotype import Genotype
            from dcpnas.visualize import plot_cell

            genotype = Genotype.load(src / "genotype.json")
            for cell in ("normal", "reduce"):
                plot_cell(genotype, cell, dest / f"{cell}.png")
    trial.images = {name: (rel / name).as_posix() for name in GENOTYPE_IMAGES if (dest / name).exists()}


def collect(ctx: TrackingContext, sweep_run_id: str) -> tuple[Any, list[Trial]]:
    """The sweep run (an MLflow ``Run``) and its search trials with histories, costs and retrains."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.uri)
    try:
        sweep = client.get_run(sweep_run_id)
    except MlflowException as e:
        raise UserError(f"sweep run {sweep_run_id}: {e.message}") from None
    now_ms = int(time.time() * 1000)
    params = dict(sweep.data.params)
    trials = []
    for run in _children(ctx, sweep_run_id, "search"):
        history = _history(client, run["run_id"], (*SEARCH_CURVES, "epoch_seconds"))
        cost = run_cost(run, {**params, **run["params"]}, RESOURCE_PREFIXES["search"], now_ms)
        trials.append(Trial(run, history, cost, retrains_under(ctx, client, run["run_id"], params, now_ms)))
    return sweep, sorted(trials, key=lambda t: (t.space, _seed_order(t.seed)))


def find_sweep_run(ctx: TrackingContext, config_hash: str | None = None, log: Any = print) -> str:
    """The sweep run (``stage=sweep``) with this config hash, else the latest one in the experiment.

    The fallback matters: the sweep logs the config it ran, which may differ from the loaded one
    (e.g. the digits source rewritten to the shards it converted), so its hash need not match.
    """
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=ctx.uri).search_runs(
        [ctx.experiment_id], "tags.stage = 'sweep'", order_by=["attributes.start_time DESC"], max_results=200
    )
    if not runs:
        raise UserError(f"no sweep run in experiment '{ctx.experiment_name}'; run `dcpnas sweep` first")
    exact = [r for r in runs if r.data.tags.get("config_hash") == config_hash]
    if not exact:
        log(f"no sweep run with config hash {str(config_hash)[:12]}; using the latest sweep run {runs[0].info.run_id}")
    return (exact or runs)[0].info.run_id


# ---- summary -------------------------------------------------------------------------------------
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
                "search_core_hours": _sum(t.cost.core_hours for t in ts),
                "search_gpu_hours": _sum(t.cost.gpu_hours for t in ts),
                "retrain_core_hours": _sum(c.core_hours for c in retrain_costs) if retrains else None,
                "retrain_gpu_hours": _sum(c.gpu_hours for c in retrain_costs) if retrains else None,
            },
        }
    return {"spaces": spaces, "pareto": _pareto_points(trials)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return {"n": value.n, "mean": value.mean, "std": value.std}
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# ---- plots ---------------------------------------------------------------------------------------
def _colors(spaces: Iterable[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sorted(set(spaces)))}


def _plot_curves(series: Sequence[tuple[str, Any, str, Mapping]], keys: Sequence[str], path: Path) -> str | None:
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
    return _save(fig, path)


def _styles(trials: Sequence[Trial]) -> dict[str, str]:
    seeds = sorted({t.seed for t in trials}, key=_seed_order)
    return {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(seeds)}


def _plot_pareto(points: Sequence[Mapping[str, Any]], colors: Mapping[str, Any], path: Path) -> str | None:
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
    return _save(fig, path)


# ---- HTML ----------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } .l, td.na { text-align: left; } .na { color: #888; font-style: italic; }
tr.total td { font-weight: bold; } .front { background: #fff3c4; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figure img { max-width: 440px; border: 1px solid #ddd; } img.wide { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; } code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _search_table(summary: Mapping[str, Any]) -> str:
    rows = [
        _row(
            [_td(space, "l"), _td(f"{s['finished']}/{s['trials']}")]
            + [_td(_fmt_stat(s["search"][k])) for k, _ in SEARCH_COLUMNS],
            f' id="search-{_e(space)}"',
        )
        for space, s in summary["spaces"].items()
    ]
    return _table(["space", "finished/trials", *(h for _, h in SEARCH_COLUMNS)], rows)


def _retrain_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for space, s in summary["spaces"].items():
        cells = [_td(space, "l"), _td(s["retrains"])]
        if s["retrain"] is None:
            cells.append(_na(len(RETRAIN_COLUMNS)))
        else:
            cells += [_td(_fmt_stat(s["retrain"][k])) for k, _ in RETRAIN_COLUMNS]
        rows.append(_row(cells, f' id="retrain-{_e(space)}"'))
    return _table(["space", "retrained", *(h for _, h in RETRAIN_COLUMNS)], rows)


def _cost_table(summary: Mapping[str, Any]) -> str:
    keys = ("search_core_hours", "search_gpu_hours", "retrain_core_hours", "retrain_gpu_hours")
    rows = []
    for space, s in summary["spaces"].items():
        c = s["cost"]
        cells = [_td(_hours(c[k])) for k in keys[:2]]
        cells += [_td(_hours(c[k])) for k in keys[2:]] if s["retrains"] or c[keys[2]] is not None else [_na(2)]
        rows.append(_row([_td(space, "l"), *cells], f' id="cost-{_e(space)}"'))
    totals = [_sum(s["cost"][k] for s in summary["spaces"].values()) for k in keys]
    rows.append(_row([_td("all spaces", "l"), *(_td(_hours(t, "–")) for t in totals)], ' class="total"'))
    header = ["space", "search core-h", "search GPU-h", "retrain+eval core-h", "retrain+eval GPU-h"]
    return _table(header, rows)


def _status(run: Mapping[str, Any]) -> str:
    reason = run["tags"].get("failure_reason", "")
    return f"{run['status']}: {reason}" if reason else run["status"]


def _trials_table(trials: Sequence[Trial]) -> str:
    rows = []
    for t in trials:
        m = t.metrics
        retrain = f"{len(t.retrains)} run(s)" if t.retrains else NOT_RUN
        rows.append(
            _row(
                [
                    _td(t.space, "l"),
                    _td(t.seed, "l"),
                    _td(_status(t.run), "l"),
                    _td(t.run["tags"].get("genotype_hash", "")[:12], "l"),
                    _td(_fmt(m.get("child/val_acc"))),
                    _td(_fmt(m.get("search_minutes"))),
                    _td(_hours(t.cost.core_hours)),
                    _td(_hours(t.cost.gpu_hours)),
                    _td(t.cost.how, "l"),
                    _td(retrain, "l na" if not t.retrains else "l"),
                ]
            )
        )
    header = ["space", "seed", "status", "genotype", "child val acc", "search min", "core-h", "GPU-h", "cost from"]
    return _table([*header, "retrain"], rows, left=4)


def _retrains_table(trials: Sequence[Trial], front: set[str]) -> str:
    rows = []
    for t in trials:
        for r in t.retrains:
            m = r.metrics
            source = "eval" if r.eval_run and "top1" in r.eval_run["metrics"] else "retrain"
            cls = ' class="front"' if r.run["run_id"] in front else ""
            cells = [_td(t.space, "l"), _td(t.seed, "l"), _td(_status(r.run), "l"), _td(source, "l")]
            cells += [_td(_fmt(m.get(k))) for k in ("top1", "top5", "params", "ops", "memory_mbit")]
            costs = {"retrain": r.cost, **({"eval": r.eval_cost} if r.eval_cost else {})}
            cells += [_td(_hours(_sum(c.core_hours for c in costs.values())))]
            cells += [_td(_hours(_sum(c.gpu_hours for c in costs.values())))]
            cells.append(_td("; ".join(f"{stage}: {c.how}" for stage, c in costs.items()), "l"))
            rows.append(_row(cells, cls))
    if not rows:
        return f'<p class="na">{NOT_RUN}</p>'
    header = ["space", "seed", "status", "top-1 from", "top-1", "top-5", "params", "OPs", "memory (Mbit)"]
    return _table([*header, "core-h", "GPU-h", "cost from"], rows, left=4)


def _genotype_figures(trials: Sequence[Trial], names: Sequence[str]) -> str:
    parts = []
    for space in sorted({t.space for t in trials}):
        figs = []
        for t in (t for t in trials if t.space == space):
            caption = f"seed {t.seed} · {t.run['tags'].get('genotype_hash', '')[:12] or t.run['status']}"
            imgs = [_img(t.images[n], f"{n} of {space} seed {t.seed}") for n in names if n in t.images]
            body = "<br>".join(imgs) if imgs else f'<p class="na">no genotype logged ({_e(_status(t.run))})</p>'
            figs.append(f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append(f"<h3>{_e(space)}</h3><div>{''.join(figs)}</div>")
    return "".join(parts)


def render_html(
    sweep: Any,
    experiment: str,
    uri: str,
    trials: Sequence[Trial],
    summary: Mapping[str, Any],
    plots: Mapping[str, str | None],
    extra: Sequence[str] = (),
) -> str:
    """The page; every value is escaped and every image is a relative path inside the report directory."""

    def plot(name: str, alt: str) -> str:
        rel = plots.get(name)
        return _img(rel, alt, "wide") if rel else f'<p class="na">{NOT_RUN}</p>'

    tags = sweep.data.tags
    front = {p["run_id"] for p in summary["pareto"] if p["front"]}
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta = [
        ("experiment", experiment),
        ("sweep run", f"{sweep.info.run_name} ({sweep.info.run_id}), {sweep.info.status}"),
        ("config hash", tags.get("config_hash", "")),
        ("git", tags.get("git_sha", "")),
        ("tracking store", uri),
        ("generated", generated),
    ]
    body = [
        f"<h1>DCP-NAS sweep report: {_e(experiment)}</h1>",
        "<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in meta),
        "</table>",
        "<h2>Search, per space</h2>",
        "<p>Mean ± sample standard deviation (n−1) over the finished search trials (seeds) of each space, "
        "final epoch. Search time is the sum of the logged <code>epoch_seconds</code>.</p>",
        _search_table(summary),
        "<h2>Retrain and evaluation, per space</h2>",
        "<p>Finished retrain runs; top-1/top-5 come from the run's evaluation when there is one.</p>",
        _retrain_table(summary),
        "<h2>Cost</h2>",
        _cost_table(summary),
        "<p>Core-hours and GPU-hours per run are the run's <code>cost/core_hours</code> and "
        "<code>cost/gpu_hours</code> metrics when it logged them; otherwise the run's wall time (MLflow start to "
        "end) × the resources its config reserved: search trials <code>sweep.trial_cpus + sweep.workers × "
        "sweep.cpus_per_worker</code> CPUs and <code>sweep.workers × sweep.gpus_per_worker</code> GPUs; retrain "
        "runs <code>retrain.workers × retrain.cpus_per_worker</code> CPUs and <code>retrain.workers × "
        "retrain.gpus_per_worker</code> GPUs (the run's own params first, then the sweep's config); eval runs "
        "likewise with <code>eval.*</code>, else <code>retrain.*</code>. Reserved fractional CPUs count as "
        "reserved. The runs tables say which rule each run used.</p>",
        "<h2>Accuracy vs OPs</h2>",
        plot("pareto", "top-1 accuracy against OPs with the Pareto front"),
        *extra,
        "<h2>Search curves</h2>",
        plot("search_curves", "search metrics per epoch"),
        "<h2>Retrain curves</h2>",
        plot("retrain_curves", "retrain metrics per epoch"),
        "<h2>Genotypes</h2>",
        _genotype_figures(trials, ("normal.png", "reduce.png")),
        "<h2>Alpha evolution</h2>",
        "<p>Per-op softmax(alpha) averaged over the edges of each cell, per epoch.</p>",
        _genotype_figures(trials, ("alpha_history.png",)),
        "<h2>Search trials</h2>",
        _trials_table(trials) if trials else f'<p class="na">{NOT_RUN}</p>',
        "<h2>Retrain runs</h2>",
        "<p>Highlighted rows are on the accuracy-vs-OPs Pareto front.</p>",
        _retrains_table(trials, front),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(experiment)}: DCP-NAS report</title><style>{CSS}</style></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---- entry points --------------------------------------------------------------------------------
def _fresh_dir(out_dir: Path) -> None:
    """Empty ``out_dir`` for a new report, refusing to delete a directory that holds something else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "index.html").exists():
            raise UserError(f"{out_dir} is not empty and holds no report; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def build_report(ctx: TrackingContext, sweep_run_id: str, out_dir: Path) -> Path:
    """Write ``index.html``, ``summary.json`` and the PNGs of the sweep's report into ``out_dir``."""
    from mlflow.tracking import MlflowClient

    from pipeline import report_groups, tracking

    out_dir = Path(out_dir)
    sweep, trials = collect(ctx, sweep_run_id)
    _fresh_dir(out_dir)
    client = MlflowClient(tracking_uri=ctx.uri)
    for t in trials:
        _genotype_images(client, t, out_dir)
    summary = summarize(trials)
    colors, styles = _colors(t.space for t in trials), _styles(trials)
    search_series = [(f"{t.space} s{t.seed}", colors[t.space], styles[t.seed], t.history) for t in trials]
    retrain_series = [
        (f"{t.space} s{t.seed}", colors[t.space], styles[t.seed], r.history) for t in trials for r in t.retrains
    ]
    plots = {
        "pareto": _plot_pareto(summary["pareto"], colors, out_dir / "pareto.png"),
        "search_curves": _plot_curves(search_series, SEARCH_CURVES, out_dir / "search_curves.png"),
        "retrain_curves": _plot_curves(retrain_series, RETRAIN_CURVES, out_dir / "retrain_curves.png"),
    }
    extra, more = report_groups.sections(trials, report_groups.random_retrains(ctx, sweep), out_dir)
    (out_dir / "summary.json").write_text(
        json.dumps(
            {"sweep_run_id": sweep_run_id, "experiment": ctx.experiment_name, **_jsonable({**summary, **more})},
            indent=2,
        )
    )
    index = out_dir / "index.html"
    page = render_html(sweep, ctx.experiment_name, tracking.display_uri(ctx.uri), trials, summary, plots, extra)
    index.write_text(page, encoding="utf-8")
    return index


def publish_report(ctx: TrackingContext, sweep_run_id: str, out_dir: Path) -> None:
    """Log the report directory as the sweep run's ``report/`` artifacts (browse it in ``dcpnas ui``)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=ctx.uri).log_artifacts(sweep_run_id, str(out_dir), REPORT_ARTIFACT_DIR)


def existing_store(uri: str | None) -> str:
    """The resolved tracking URI, refusing a SQLite file that does not exist (nothing was tracked there)."""
    from pipeline import tracking

    resolved = tracking.resolve_uri(uri)
    if urlsplit(resolved).scheme == "sqlite" and not tracking.sqlite_path(resolved).exists():
        raise UserError(f"no tracking store at {resolved}; run `dcpnas sweep` first or set tracking.uri")
    return resolved


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline import tracking
    from pipeline.config import load_config

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial otherwise
    cfg = load_config(args.config, args.set)
    ctx = tracking.prepare(existing_store(cfg.tracking.uri), cfg.tracking.experiment or cfg.name)
    sweep_run_id = args.sweep_run or find_sweep_run(ctx, cfg.hash)
    out = Path(args.out) if args.out else cfg.run_dir() / "report"
    index = build_report(ctx, sweep_run_id, out)
    publish_report(ctx, sweep_run_id, out)
    print(f"report: {index.resolve()}")
    print(f"logged to sweep run {sweep_run_id} as {REPORT_ARTIFACT_DIR}/ (browse with `dcpnas ui`)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.config import add_config_arguments

    p = sub.add_parser("report", help="comparison dashboard of a sweep (HTML + PNG), logged to its MLflow run")
    add_config_arguments(p)
    p.add_argument("--sweep-run", metavar="RUN_ID", help="the sweep's parent run (default: found from the config)")
    p.add_argument("--out", metavar="DIR", help="report directory (default: <output_dir>/<name>/report)")
    p.set_defaults(func=_cmd_report)
