"""The MLflow store and experiment: URIs checked before any compute, the experiment created once, the
client every tracking call uses, bounded retries, and the local server that makes a SQLite store safe
for concurrent writers.

Writers: the driver calls :func:`prepare` (or :func:`connect` with a config) once (schema and experiment
created under a file lock, URI checked before any compute) and, when trials run in other processes, wraps
the sweep in :func:`serving`, which puts one ``mlflow server`` in front of a SQLite store as its only writer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.tracking import dashboard
from pipeline.tracking.retry import display_uri, retrying
from pipeline.tracking.server import enable_wal, health_problem, local_server

if TYPE_CHECKING:
    from pipeline.config import Config

T = TypeVar("T")
HEALTH_TIMEOUT_S = 3.0
RETRY_S = 300.0  # default bound of retried writes (tracking.retry_s)


@dataclass(frozen=True)
class TrackingContext:
    """What a process needs to log into the experiment; small and picklable for Ray workers."""

    uri: str
    experiment_id: str
    experiment_name: str
    artifact_location: str
    retry_s: float = RETRY_S  # how long a write is retried before it fails (pipeline.tracking.retry)


# ---- URIs and reachability ---------------------------------------------------------------------
def resolve_uri(uri: str | None) -> str:
    """Explicit URI, else ``MLFLOW_TRACKING_URI``, else SQLite under ``./mlruns``; SQLite made absolute.

    Absolute because Ray workers run in other working directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    if urlsplit(uri).scheme == "sqlite":
        path, _, query = uri.removeprefix("sqlite:///").partition("?")
        if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
            raise UserError(f"tracking URI {uri}: use a SQLite file (sqlite:///path/mlflow.db), not memory")
        return f"sqlite:///{Path(path).resolve()}" + (f"?{query}" if query else "")
    return uri


def sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI."""
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


def artifacts_dir(uri: str) -> Path:
    """Where a SQLite store keeps its artifacts: ``artifacts/`` next to the database file."""
    return sqlite_path(uri).parent / "artifacts"


def _check_sqlite(uri: str) -> Path:
    db = sqlite_path(uri)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"tracking URI {uri}: cannot create {db.parent} ({e.strerror})") from None
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise UserError(f"tracking URI {uri}: {db if db.exists() else db.parent} is not writable")
    return db


def _check_health(uri: str) -> None:
    """Fail fast: MLflow's own HTTP client retries an unreachable server for minutes."""
    reason = health_problem(uri, HEALTH_TIMEOUT_S)
    if reason is None:
        return
    raise UserError(
        f"MLflow tracking server {display_uri(uri)} is not reachable ({reason}); "
        "start it or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


@lru_cache(maxsize=8)
def mlflow_client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def retried(ctx: TrackingContext, what: str, fn: Callable[[], T]) -> T:
    """``fn`` (one idempotent unit of work) retried through server hiccups for ``ctx.retry_s``."""
    return retrying(fn, what, ctx.uri, ctx.retry_s)


# ---- experiment ----------------------------------------------------------------------------------
def prepare(uri: str | None, experiment: str, retry_s: float = RETRY_S) -> TrackingContext:
    """Check the store, create schema and experiment once, and return the context for all writers.

    Called by the driver before any compute, so a bad URI or wrong credentials fail in seconds (not
    retried). On SQLite the schema creation runs under a file lock: several processes creating it at
    once crash (docs/stack.md §4.2); the file is put in WAL mode there. ``retry_s`` bounds the retries
    of every later write through the context.
    """
    uri = resolve_uri(uri)
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file"):
        raise UserError(
            f"tracking URI {uri}: the MLflow file store is deprecated; use sqlite:///path/mlflow.db or a server"
        )
    if scheme == "sqlite":
        db = _check_sqlite(uri)
        with FileLock(f"{db}.lock", timeout=300):
            ctx = _experiment(uri, experiment, (artifacts_dir(uri) / slug(experiment)).as_uri())
            enable_wal(db)
            return replace(ctx, retry_s=retry_s)
    if scheme in ("http", "https"):
        _check_health(uri)
    return replace(_experiment(uri, experiment, None), retry_s=retry_s)


def slug(name: str) -> str:
    """A file-name-safe form of a free-text name (experiment names, run tags)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def _experiment(uri: str, name: str, artifact_location: str | None) -> TrackingContext:
    client = mlflow_client(uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as e:  # another process created it first
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            exp = client.get_experiment_by_name(name)
    except MlflowException as e:
        raise UserError(f"MLflow at {display_uri(uri)}: {e.message}") from None
    if exp.lifecycle_stage != "active":
        raise UserError(
            f"experiment '{name}' at {display_uri(uri)} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or purge it (mlflow gc)"
        )
    dashboard.configure(client, exp.experiment_id, exp.tags)  # the UI opens it on the runs comparison
    return TrackingContext(uri, exp.experiment_id, name, exp.artifact_location)


# ---- run tree ------------------------------------------------------------------------------------


# ---- genotypes -----------------------------------------------------------------------------------


@contextmanager
def serving(ctx: TrackingContext, writers: int = 8) -> Iterator[TrackingContext]:
    """The context to hand to trial processes while they run.

    Over SQLite a local server becomes the store's single writer (and the live UI), sized for
    ``writers`` concurrent trials; a server URI is used as is. Use the yielded context in the driver
    too while it is open.
    """
    if urlsplit(ctx.uri).scheme != "sqlite":
        yield ctx
        return
    with local_server(ctx.uri, artifacts_dir(ctx.uri), writers=writers) as uri:
        yield replace(ctx, uri=uri)


def connect(cfg: Config) -> TrackingContext:
    """:func:`prepare` for a config: its store, its experiment (``Config.experiment``), its retry bound."""
    return prepare(cfg.tracking.uri, cfg.experiment, cfg.tracking.retry_s)


def existing_store(uri: str | None) -> str:
    """The resolved tracking URI, refusing a SQLite file that does not exist (nothing was tracked there)."""
    resolved = resolve_uri(uri)
    if urlsplit(resolved).scheme == "sqlite" and not sqlite_path(resolved).exists():
        raise UserError(f"no tracking store at {resolved}; run `dcpnas sweep` first or set tracking.uri")
    return resolved


def ui_experiment(uri: str, experiment: str) -> str:
    """The id of the experiment ``dcpnas ui`` opens, made to open on the runs comparison; ``UserError``
    when it has no runs yet."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or not client.search_runs([exp.experiment_id], max_results=1):
        raise UserError(
            f"experiment '{experiment}' at {display_uri(uri)} has no runs yet: make some with "
            "`dcpnas run` (the demo) or `dcpnas sweep` with this config, then run `dcpnas ui` again"
        )
    dashboard.configure(client, exp.experiment_id, exp.tags)  # experiments made before the view existed
    return exp.experiment_id
