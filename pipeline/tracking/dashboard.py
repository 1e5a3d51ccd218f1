"""The MLflow UI as the sweep's comparison view, and system metrics beside the curves (docs/report.md).

MLflow 3.17's UI picks an experiment's landing page from its ``mlflow.experimentKind`` tag: without it,
an experiment with no runs yet is inferred as GenAI and opens on the traces "Overview". Setting the kind
to ``custom_model_development`` opens the runs table. The table's columns, filter and order come from a
shared view: an experiment tag ``mlflow.sharedViewState.<key>`` holding the view as JSON, applied by the
UI when the URL carries ``?viewStateShareKey=<key>`` (what the UI's own "Share" button writes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline.names import CHILD_VAL_ACC

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
VIEW_KEY = "dcpnas"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
SYSTEM_METRICS_EVERY_S = 15.0  # psutil (and pynvml on GPUs) sampled in the logging process
# (kind, name) of the columns the comparison shows; retrain results are copied onto the search run
COLUMNS = [
    ("tags", "space"),
    ("tags", "seed"),
    ("tags", "overrides"),
    ("tags", "genotype_hash"),
    ("metrics", CHILD_VAL_ACC),
    ("metrics", "retrain/top1"),
    ("metrics", "retrain/ops"),
]


def view_state() -> dict[str, Any]:
    """The trial runs (the sweep's parent run filtered out, so they are rows, not collapsed children),
    best Child val acc first, with :data:`COLUMNS`."""
    return {
        "searchFilter": "tags.stage = 'search'",
        "orderByKey": f"metrics.`{CHILD_VAL_ACC}`",
        "orderByAsc": False,
        "runsHiddenMode": "SHOW_ALL",
        "selectedColumns": [f"{kind}.`{name}`" for kind, name in COLUMNS],
    }


def configure(client: Any, experiment_id: str, tags: Mapping[str, str]) -> None:
    """Give a new or existing experiment the runs-table kind and the comparison view (when they differ)."""
    wanted = {KIND_TAG: KIND, VIEW_TAG: json.dumps(view_state())}
    for k, v in wanted.items():
        if tags.get(k) != v:
            client.set_experiment_tag(experiment_id, k, v)


def experiment_url(base: str, experiment_id: str) -> str:
    """The page ``dcpnas ui`` opens: the experiment's runs table in the comparison view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


@contextmanager
def system_metrics(uri: str, run_id: str | None) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of this process's machine
    into ``run_id`` while the block runs, continuing the run's history on a restart; no-op without a run."""
    if run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_EVERY_S, resume_logging=True, tracking_uri=uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
