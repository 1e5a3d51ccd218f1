"""Orchestration of dcpnas: config, Ray stages, MLflow tracking.

MLflow settings every pipeline process gets before MLflow is imported (setdefault: a value the user
exported wins). See docs/tracking.md, "Telemetry" and "Transient failures".
"""

import os

MLFLOW_DEFAULTS = {
    # MLflow 3 sends usage telemetry from a client thread; off unless the user sets it to "false". The thread
    # also sets and pops an environment variable that concurrent request threads read (log_batch errors).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's own HTTP retries (urllib3: connect/read errors, 408/429/5xx) kept short (waits 0, 2, 4 s), so
    # the time-bounded retry of pipeline.tracking.retry decides how long a write waits (tracking.retry_s).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def apply_mlflow_defaults() -> None:
    """Set each of ``MLFLOW_DEFAULTS`` the environment does not already set (children inherit them)."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)


apply_mlflow_defaults()
