"""The run tree: a parent run per sweep, nested runs per trial (and retrain/eval runs under the search run
of their genotype), per-epoch metrics, params, artifacts.

Layout: one experiment per config (``Config.experiment``); tags ``stage``, ``space``, ``seed``,
``config_hash``, ``genotype_hash``, ``git_sha``. Runs are found again by a ``run_key`` tag, so a re-run or a
resumed trial logs into the run it started instead of duplicating it. Every call goes through an explicit
``MlflowClient`` with explicit experiment and run ids (docs/stack.md §4.2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.tracking.retry import display_uri
from pipeline.tracking.store import TrackingContext, mlflow_client, retried

REQUIRED_TRIAL_TAGS = ("stage", "space", "seed")
RUN_KEY_TAG = "run_key"  # idempotency key: sha of what makes a run unique
TRIAL_KEY_TAG = "trial_key"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "failure_reason"
CONFIG_ARTIFACT = "config/resolved.yaml"
REDACTED = "<redacted>"
RUN_ID = re.compile(r"[0-9a-f]{32}")
_SECRET = re.compile(
    r"(?:^|[_\-])(?:token|tokens|password|passwd|secret|secrets|key|keys|apikey|credential|credentials)(?:$|[_\-])",
    re.IGNORECASE,
)


def is_run_id(ref: str) -> bool:
    """Whether ``ref`` has the form of an MLflow run id (32 hex digits)."""
    return RUN_ID.fullmatch(ref) is not None


@lru_cache(maxsize=1)
def git_sha() -> str:
    """``DCPNAS_GIT_SHA`` (set by whoever ships the code without ``.git``), else git, else "unknown"."""
    if sha := os.environ.get("DCPNAS_GIT_SHA"):
        return sha
    repo = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def _scrub(value: Any) -> Any:
    """Copy with secret-looking keys redacted and passwords removed from URIs."""
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return display_uri(value) if isinstance(value, str) else value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dot-keyed params; secret-looking keys are left out entirely."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if _is_secret(str(k)):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: Sequence[Metric] = (),
    params: Sequence[Param] = (),
    tags: Sequence[RunTag] = (),
) -> None:
    """``log_batch`` in chunks within MLflow's limits (1000 entities, 100 params/tags per request)."""
    n = max(math.ceil(len(metrics) / 800), math.ceil(len(params) / 100), math.ceil(len(tags) / 100))
    for i in range(n):
        client.log_batch(
            run_id, metrics[i * 800 : (i + 1) * 800], params[i * 100 : (i + 1) * 100], tags[i * 100 : (i + 1) * 100]
        )


def _open_run(client: MlflowClient, experiment_id: str, key: str, name: str, tags: Mapping[str, Any]) -> str:
    """The active run tagged ``run_key=key`` (oldest if several), reopened; else a new one."""
    found = client.search_runs(
        [experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'", order_by=["attributes.start_time ASC"], max_results=1
    )
    str_tags = {k: str(v) for k, v in tags.items()}
    if not found:
        return client.create_run(experiment_id, tags=str_tags, run_name=name).info.run_id
    run = found[0]
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    if FAILURE_TAG in run.data.tags:
        client.delete_tag(run.info.run_id, FAILURE_TAG)
    log_batch(client, run.info.run_id, tags=[RunTag(k, v) for k, v in str_tags.items()])
    return run.info.run_id


def open_sweep_run(
    ctx: TrackingContext, name: str, config: Mapping[str, Any], tags: Mapping[str, Any] | None = None
) -> str:
    """Open the parent run of a sweep (``config`` is ``Config.resolved()``); the same name and
    config hash return the same run, so an interrupted sweep re-run does not duplicate it."""
    from dcpnas.checkpoint import config_hash

    client = mlflow_client(ctx.uri)
    chash = config_hash(dict(config))
    key = _key("sweep", ctx.experiment_id, name, chash)
    all_tags = {"stage": "sweep", "git_sha": git_sha(), **(tags or {}), "config_hash": chash, RUN_KEY_TAG: key}
    clean = _scrub(config)

    def open_and_log() -> str:
        run_id = _open_run(client, ctx.experiment_id, key, name, all_tags)
        log_batch(client, run_id, params=[Param(k, v) for k, v in _flatten(clean).items()])
        client.log_dict(run_id, {**clean, "config_hash": chash}, CONFIG_ARTIFACT)
        return run_id

    return retried(ctx, f"opening sweep run '{name}'", open_and_log)


def open_child_run(ctx: TrackingContext, parent_run_id: str, trial_key: str, tags: Mapping[str, Any]) -> str:
    """Open the nested run ``trial_key`` (e.g. ``"seed=0,space=dcpnas"``) under ``parent_run_id``.

    Also for retrain/eval runs, whose parent is the search run of their genotype. The child lives in
    the parent's experiment (the UI nests only there) and inherits ``config_hash`` and ``git_sha``
    unless given. The same parent and key return the same run: a resumed trial keeps its history.
    """
    missing = [t for t in REQUIRED_TRIAL_TAGS if t not in tags]
    if missing:
        raise ValueError(f"trial run '{trial_key}' needs tag(s) {', '.join(missing)}")
    client = mlflow_client(ctx.uri)
    key = _key("trial", parent_run_id, trial_key)

    def open_run() -> str:  # search + create as one unit: a retry finds the run a failed attempt created
        parent = client.get_run(parent_run_id)
        inherited = {k: parent.data.tags[k] for k in ("config_hash", "git_sha") if k in parent.data.tags}
        all_tags = {**inherited, **tags, TRIAL_KEY_TAG: trial_key, PARENT_TAG: parent_run_id, RUN_KEY_TAG: key}
        return _open_run(client, parent.info.experiment_id, key, trial_key, all_tags)

    return retried(ctx, f"opening trial run '{trial_key}'", open_run)


def log_epoch(ctx: TrackingContext, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """One request per epoch: numbers (NaN included) become metrics at ``step``, strings tags."""
    now = int(time.time() * 1000)  # fixed before any retry: a resent metric is the same row, not a second one
    values, tags = [], []
    for k, v in metrics.items():
        if isinstance(v, str):
            tags.append(RunTag(k, v))
            continue
        try:
            values.append(Metric(k, float(v), now, step))
        except (TypeError, ValueError):
            raise TypeError(f"metric '{k}' must be a number or a string, got {type(v).__name__}") from None
    client = mlflow_client(ctx.uri)
    retried(ctx, f"epoch {step} of run {run_id}", lambda: log_batch(client, run_id, metrics=values, tags=tags))


def logged_steps(ctx: TrackingContext, run_id: str, key: str) -> set[int]:
    """Steps at which ``key`` was already logged. A worker that restarts from a checkpoint older than its
    last logged epoch (killed between logging and the checkpoint's commit) re-runs that epoch; it skips
    logging it again, so each epoch appears once in the run's history."""
    history = retried(
        ctx, f"reading {key} of run {run_id}", lambda: mlflow_client(ctx.uri).get_metric_history(run_id, key)
    )
    return {m.step for m in history}


def finish_run(ctx: TrackingContext, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """End a run; ``reason`` (e.g. why a trial diverged) goes into the ``failure_reason`` tag."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, not '{status}'")
    client = mlflow_client(ctx.uri)

    def finish() -> None:
        if reason:
            client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, status)

    retried(ctx, f"ending run {run_id} as {status}", finish)


def child_runs(ctx: TrackingContext, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested directly under ``parent_run_id``, oldest first, as plain dicts for selection
    and reports: ``run_id``, ``name``, ``status``, ``start_time``, ``end_time``, ``artifact_uri``,
    ``tags`` (without ``mlflow.*``), ``params``, ``metrics`` (latest value of each)."""
    client = mlflow_client(ctx.uri)

    def search() -> list[dict[str, Any]]:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        out, token = [], None
        while True:
            page = client.search_runs(
                [experiment_id],
                f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            out += [_as_dict(r) for r in page]
            token = page.token
            if not token:
                return out

    return retried(ctx, f"reading the trials of run {parent_run_id}", search)


def _as_dict(r: Any) -> dict[str, Any]:
    return {
        "run_id": r.info.run_id,
        "name": r.info.run_name,
        "status": r.info.status,
        "start_time": r.info.start_time,
        "end_time": r.info.end_time,
        "artifact_uri": r.info.artifact_uri,
        "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
    }


def get_run(ctx: TrackingContext, run_id: str) -> dict[str, Any]:
    """One run as the plain dict of :func:`child_runs`."""
    return _as_dict(retried(ctx, f"reading run {run_id}", lambda: mlflow_client(ctx.uri).get_run(run_id)))


def log_params(ctx: TrackingContext, run_id: str, params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a (nested) mapping as flat params, secrets redacted; re-logging equal values is a no-op."""
    batch = [Param(k, v) for k, v in _flatten(_scrub(params), prefix).items()]
    retried(ctx, f"params of run {run_id}", lambda: log_batch(mlflow_client(ctx.uri), run_id, params=batch))


def download_artifact(ctx: TrackingContext, run_id: str, path: str, dest: str | Path) -> Path:
    """Fetch one artifact of a run into ``dest`` (a directory); returns the local file."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow_client(ctx.uri).download_artifacts(run_id, path, str(dest)))
    except MlflowException as e:
        raise UserError(f"artifact {path} of run {run_id}: {e.message}") from None


def log_artifact(ctx: TrackingContext, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a local file (e.g. the search split) to a run."""
    retried(
        ctx,
        f"artifact {path} of run {run_id}",
        lambda: mlflow_client(ctx.uri).log_artifact(run_id, str(path), artifact_path),
    )


def log_eval_run(ctx: TrackingContext, retrain_run: dict[str, Any], metrics: dict[str, float], key: str) -> str:
    """An ``eval`` run nested under the retrain run, carrying its tags (space, seed, genotype hash)."""
    tags = {k: retrain_run["tags"][k] for k in ("space", "seed", "genotype_hash") if k in retrain_run["tags"]}
    run_id = open_child_run(ctx, retrain_run["run_id"], key, {**tags, "stage": "eval"})
    log_epoch(ctx, run_id, metrics, step=0)
    finish_run(ctx, run_id, "FINISHED")
    return run_id


def metric_history(ctx: TrackingContext, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per-step values of each of ``keys`` the run logged; an epoch logged twice (re-run after a resume)
    keeps its latest value."""
    client, out = mlflow_client(ctx.uri), {}
    for key in keys:
        latest: dict[int, tuple[int, float]] = {}
        for m in retried(ctx, f"reading {key} of run {run_id}", lambda key=key: client.get_metric_history(run_id, key)):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        if latest:
            out[key] = [(step, v) for step, (_, v) in sorted(latest.items())]
    return out


def download_artifact_dir(ctx: TrackingContext, run_id: str, path: str, dest: str | Path) -> Path | None:
    """The run's artifact directory ``path`` copied under ``dest``; None when the run has none there."""
    client = mlflow_client(ctx.uri)
    try:
        if not client.list_artifacts(run_id, path):
            return None
        return Path(client.download_artifacts(run_id, path, str(dest)))
    except (MlflowException, OSError):
        return None


def log_artifacts(ctx: TrackingContext, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Attach a local directory (e.g. the report) to a run under ``artifact_path``."""
    client = mlflow_client(ctx.uri)
    retried(
        ctx,
        f"artifacts {local_dir} of run {run_id}",
        lambda: client.log_artifacts(run_id, str(local_dir), artifact_path),
    )


def runs_of_stage(ctx: TrackingContext, stage: str, max_results: int = 200) -> list[dict[str, Any]]:
    """The experiment's runs tagged ``stage=<stage>``, newest first, as the plain dicts of :func:`get_run`."""
    client = mlflow_client(ctx.uri)
    found = retried(
        ctx,
        f"listing {stage} runs",
        lambda: client.search_runs(
            [ctx.experiment_id], f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"],
            max_results=max_results,
        ),
    )  # fmt: skip
    return [_as_dict(r) for r in found]
