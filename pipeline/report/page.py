"""The report page: meta, summary tables per space, cost, figures, trials and retrains, all escaped."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.names import CHILD_VAL_ACC
from pipeline.report.html import NOT_RUN, fmt_stat, hours, img, na, row, table, td
from pipeline.report.html import esc as _e
from pipeline.report.html import fmt as _fmt
from pipeline.report.model import RETRAIN_COLUMNS, SEARCH_COLUMNS, Trial, sum_known

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
        row(
            [td(space, "l"), td(f"{s['finished']}/{s['trials']}")]
            + [td(fmt_stat(s["search"][k])) for k, _ in SEARCH_COLUMNS],
            f' id="search-{_e(space)}"',
        )
        for space, s in summary["spaces"].items()
    ]
    return table(["space", "finished/trials", *(h for _, h in SEARCH_COLUMNS)], rows)


def _retrain_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for space, s in summary["spaces"].items():
        cells = [td(space, "l"), td(s["retrains"])]
        if s["retrain"] is None:
            cells.append(na(len(RETRAIN_COLUMNS)))
        else:
            cells += [td(fmt_stat(s["retrain"][k])) for k, _ in RETRAIN_COLUMNS]
        rows.append(row(cells, f' id="retrain-{_e(space)}"'))
    return table(["space", "retrained", *(h for _, h in RETRAIN_COLUMNS)], rows)


def _cost_table(summary: Mapping[str, Any]) -> str:
    keys = ("search_core_hours", "search_gpu_hours", "retrain_core_hours", "retrain_gpu_hours")
    rows = []
    for space, s in summary["spaces"].items():
        c = s["cost"]
        cells = [td(hours(c[k])) for k in keys[:2]]
        cells += [td(hours(c[k])) for k in keys[2:]] if s["retrains"] or c[keys[2]] is not None else [na(2)]
        rows.append(row([td(space, "l"), *cells], f' id="cost-{_e(space)}"'))
    totals = [sum_known(s["cost"][k] for s in summary["spaces"].values()) for k in keys]
    rows.append(row([td("all spaces", "l"), *(td(hours(t, "–")) for t in totals)], ' class="total"'))
    header = ["space", "search core-h", "search GPU-h", "retrain+eval core-h", "retrain+eval GPU-h"]
    return table(header, rows)


def _status(run: Mapping[str, Any]) -> str:
    reason = run["tags"].get("failure_reason", "")
    return f"{run['status']}: {reason}" if reason else run["status"]


def _trials_table(trials: Sequence[Trial]) -> str:
    rows = []
    for t in trials:
        m = t.metrics
        retrain = f"{len(t.retrains)} run(s)" if t.retrains else NOT_RUN
        rows.append(
            row(
                [
                    td(t.space, "l"),
                    td(t.seed, "l"),
                    td(_status(t.run), "l"),
                    td(t.run["tags"].get("genotype_hash", "")[:12], "l"),
                    td(_fmt(m.get(CHILD_VAL_ACC))),
                    td(_fmt(m.get("search_minutes"))),
                    td(hours(t.cost.core_hours)),
                    td(hours(t.cost.gpu_hours)),
                    td(t.cost.how, "l"),
                    td(retrain, "l na" if not t.retrains else "l"),
                ]
            )
        )
    header = ["space", "seed", "status", "genotype", "child val acc", "search min", "core-h", "GPU-h", "cost from"]
    return table([*header, "retrain"], rows, left=4)


def _retrains_table(trials: Sequence[Trial], front: set[str]) -> str:
    rows = []
    for t in trials:
        for r in t.retrains:
            m = r.metrics
            source = "eval" if r.eval_run and "top1" in r.eval_run["metrics"] else "retrain"
            cls = ' class="front"' if r.run["run_id"] in front else ""
            cells = [td(t.space, "l"), td(t.seed, "l"), td(_status(r.run), "l"), td(source, "l")]
            cells += [td(_fmt(m.get(k))) for k in ("top1", "top5", "params", "ops", "memory_mbit")]
            costs = {"retrain": r.cost, **({"eval": r.eval_cost} if r.eval_cost else {})}
            cells += [td(hours(sum_known(c.core_hours for c in costs.values())))]
            cells += [td(hours(sum_known(c.gpu_hours for c in costs.values())))]
            cells.append(td("; ".join(f"{stage}: {c.how}" for stage, c in costs.items()), "l"))
            rows.append(row(cells, cls))
    if not rows:
        return f'<p class="na">{NOT_RUN}</p>'
    header = ["space", "seed", "status", "top-1 from", "top-1", "top-5", "params", "OPs", "memory (Mbit)"]
    return table([*header, "core-h", "GPU-h", "cost from"], rows, left=4)


def _genotype_figures(trials: Sequence[Trial], names: Sequence[str]) -> str:
    parts = []
    for space in sorted({t.space for t in trials}):
        figs = []
        for t in (t for t in trials if t.space == space):
            caption = f"seed {t.seed} · {t.run['tags'].get('genotype_hash', '')[:12] or t.run['status']}"
            imgs = [img(t.images[n], f"{n} of {space} seed {t.seed}") for n in names if n in t.images]
            body = "<br>".join(imgs) if imgs else f'<p class="na">no genotype logged ({_e(_status(t.run))})</p>'
            figs.append(f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append(f"<h3>{_e(space)}</h3><div>{''.join(figs)}</div>")
    return "".join(parts)


def render_html(
    sweep: dict[str, Any],
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
        return img(rel, alt, "wide") if rel else f'<p class="na">{NOT_RUN}</p>'

    tags = sweep["tags"]
    front = {p["run_id"] for p in summary["pareto"] if p["front"]}
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta = [
        ("experiment", experiment),
        ("sweep run", f"{sweep['name']} ({sweep['run_id']}), {sweep['status']}"),
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
