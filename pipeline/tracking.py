"""MLflow tracking: the run tree of a sweep, per-epoch metrics, genotype artifacts, registry hand-off.

Layout (architecture §3): one experiment per config name; a parent run per sweep; a nested run
per search trial, and retrain/eval runs nested under the search run that produced their
genotype; tags ``stage``, ``space``, ``seed``, ``config_hash``, ``genotype_hash``, ``git_sha``.

Every call goes through an explicit ``MlflowClient`` with explicit experiment and run ids:
``mlflow.set_experiment`` and the active-run globals export ``MLFLOW_EXPERIMENT_ID`` and misfile
concurrent runs into "Default" (docs/stack.md §4.2). Runs are found again by a ``run_key`` tag, so a
re-run or a resumed trial logs into the run it started instead of duplicating it.

Writers: the driver calls :func:`prepare` once (schema and experiment created under a file lock,
URI checked before any compute) and, when trials run in other processes, wraps the sweep in
:func:`serving`, which puts one ``mlflow server`` in front of a SQLite store as its only writer.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import dashboard
from pipeline.errors import UserError
from pipeline.retry import display_uri, retrying
from pipeline.tracking_server import enable_wal, local_server

if TYPE_CHECKING:  # dcpnas (torch) is imported where needed: processes that only log start in a second
    from torch import Tensor

    from dcpnas.genotype import Genotype
    from dcpnas.spaces import SearchSpace

T = TypeVar("T")
REQUIRED_TRIAL_TAGS = ("stage", "space", "seed")
RUN_KEY_TAG = "run_key"  # idempotency key: sha of what makes a run unique
TRIAL_KEY_TAG = "trial_key"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "failure_reason"
GENOTYPE_DIR = "genotype"
GENOTYPE_PARAM_PREFIX = "genotype."
PARENT_REF = "parent:"  # find_genotype("parent:<run id>"): the Parent genotype of a search run
PARENT_GENOTYPE_FILE = "genotype_parent.json"
PARENT_GENOTYPE_HASH_PARAM = "parent_genotype_hash"
GENOTYPE_HASH_PARAM = "genotype.hash"  # a param, so immutable: find_genotype checks the artifact against it
CONFIG_ARTIFACT = "config/resolved.yaml"
HEALTH_TIMEOUT_S = 3.0
RETRY_S = 300.0  # default bound of retried writes (tracking.retry_s)
REDACTED = "<redacted>"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_SECRET = re.compile(
    r"(?:^|[_\-])(?:token|tokens|password|passwd|secret|secrets|key|keys|apikey|credential|credentials)(?:$|[_\-])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TrackingContext:
    """What a process needs to log into the experiment; small and picklable for Ray workers."""

    uri: str
    experiment_id: str
    experiment_name: str
    artifact_location: str
    retry_s: float = RETRY_S  # how long a write is retried before it fails (pipeline.retry)


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
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # reachable; credentials are the MLflow client's business
            return
        reason = f"/health answered HTTP {e.code}"
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, refusals are OSErrors
        reason = str(getattr(e, "reason", e))
    raise UserError(
        f"MLflow tracking server {display_uri(uri)} is not reachable ({reason}); "
        "start it or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


@lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _retried(ctx: TrackingContext, what: str, fn: Callable[[], T]) -> T:
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
    client = _client(uri)
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


def _log_batch(
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
    _log_batch(client, run.info.run_id, tags=[RunTag(k, v) for k, v in str_tags.items()])
    return run.info.run_id


def start_sweep_run(
    ctx: TrackingContext, name: str, config: Mapping[str, Any], tags: Mapping[str, Any] | None = None
) -> str:
    """Open the parent run of a sweep (``config`` is ``Config.resolved()``); the same name and
    config hash return the same run, so an interrupted sweep re-run does not duplicate it."""
    from dcpnas.checkpoint import config_hash

    client = _client(ctx.uri)
    chash = config_hash(dict(config))
    key = _key("sweep", ctx.experiment_id, name, chash)
    all_tags = {"stage": "sweep", "git_sha": git_sha(), **(tags or {}), "config_hash": chash, RUN_KEY_TAG: key}
    clean = _scrub(config)

    def open_and_log() -> str:
        run_id = _open_run(client, ctx.experiment_id, key, name, all_tags)
        _log_batch(client, run_id, params=[Param(k, v) for k, v in _flatten(clean).items()])
        client.log_dict(run_id, {**clean, "config_hash": chash}, CONFIG_ARTIFACT)
        return run_id

    return _retried(ctx, f"opening sweep run '{name}'", open_and_log)


def start_trial_run(ctx: TrackingContext, parent_run_id: str, trial_key: str, tags: Mapping[str, Any]) -> str:
    """Open the nested run ``trial_key`` (e.g. ``"seed=0,space=dcpnas"``) under ``parent_run_id``.

    Also for retrain/eval runs, whose parent is the search run of their genotype. The child lives in
    the parent's experiment (the UI nests only there) and inherits ``config_hash`` and ``git_sha``
    unless given. The same parent and key return the same run: a resumed trial keeps its history.
    """
    missing = [t for t in REQUIRED_TRIAL_TAGS if t not in tags]
    if missing:
        raise ValueError(f"trial run '{trial_key}' needs tag(s) {', '.join(missing)}")
    client = _client(ctx.uri)
    key = _key("trial", parent_run_id, trial_key)

    def open_run() -> str:  # search + create as one unit: a retry finds the run a failed attempt created
        parent = client.get_run(parent_run_id)
        inherited = {k: parent.data.tags[k] for k in ("config_hash", "git_sha") if k in parent.data.tags}
        all_tags = {**inherited, **tags, TRIAL_KEY_TAG: trial_key, PARENT_TAG: parent_run_id, RUN_KEY_TAG: key}
        return _open_run(client, parent.info.experiment_id, key, trial_key, all_tags)

    return _retried(ctx, f"opening trial run '{trial_key}'", open_run)


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
    client = _client(ctx.uri)
    _retried(ctx, f"epoch {step} of run {run_id}", lambda: _log_batch(client, run_id, metrics=values, tags=tags))


def logged_steps(ctx: TrackingContext, run_id: str, key: str) -> set[int]:
    """Steps at which ``key`` was already logged. A worker that restarts from a checkpoint older than its
    last logged epoch (killed between logging and the checkpoint's commit) re-runs that epoch; it skips
    logging it again, so each epoch appears once in the run's history."""
    history = _retried(ctx, f"reading {key} of run {run_id}", lambda: _client(ctx.uri).get_metric_history(run_id, key))
    return {m.step for m in history}


def finish_run(ctx: TrackingContext, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """End a run; ``reason`` (e.g. why a trial diverged) goes into the ``failure_reason`` tag."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, not '{status}'")
    client = _client(ctx.uri)

    def finish() -> None:
        if reason:
            client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, status)

    _retried(ctx, f"ending run {run_id} as {status}", finish)


def search_trials(ctx: TrackingContext, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested directly under ``parent_run_id``, oldest first, as plain dicts for selection
    and reports: ``run_id``, ``name``, ``status``, ``start_time``, ``end_time``, ``artifact_uri``,
    ``tags`` (without ``mlflow.*``), ``params``, ``metrics`` (latest value of each)."""
    client = _client(ctx.uri)

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

    return _retried(ctx, f"reading the trials of run {parent_run_id}", search)


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
    """One run as the plain dict of :func:`search_trials`."""
    return _as_dict(_retried(ctx, f"reading run {run_id}", lambda: _client(ctx.uri).get_run(run_id)))


def log_params(ctx: TrackingContext, run_id: str, params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a (nested) mapping as flat params, secrets redacted; re-logging equal values is a no-op."""
    batch = [Param(k, v) for k, v in _flatten(_scrub(params), prefix).items()]
    _retried(ctx, f"params of run {run_id}", lambda: _log_batch(_client(ctx.uri), run_id, params=batch))


def download_artifact(ctx: TrackingContext, run_id: str, path: str, dest: str | Path) -> Path:
    """Fetch one artifact of a run into ``dest`` (a directory); returns the local file."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    try:
        return Path(_client(ctx.uri).download_artifacts(run_id, path, str(dest)))
    except MlflowException as e:
        raise UserError(f"artifact {path} of run {run_id}: {e.message}") from None


# ---- genotypes -----------------------------------------------------------------------------------
def log_genotype(
    ctx: TrackingContext,
    run_id: str,
    genotype: Genotype,
    alpha: Tensor | None = None,
    alpha_history: Sequence[Tensor] | None = None,
    space: SearchSpace | None = None,
) -> str:
    """Log the run's genotype (JSON, flat params, hash tag, cell diagrams, alpha plots); return its hash.

    A run holds one genotype: logging a different one raises before anything is overwritten.
    """
    from dcpnas.visualize import save_genotype_artifacts

    genotype.validate()
    client = _client(ctx.uri)
    h = genotype.hash
    logged = get_run(ctx, run_id)["params"].get(GENOTYPE_HASH_PARAM)
    if logged not in (None, h):
        raise ValueError(f"run {run_id} already holds genotype {logged[:12]}; log genotype {h[:12]} in a new run")
    params = {f"{GENOTYPE_PARAM_PREFIX}{k}": v for k, v in genotype.flat().items()} | {GENOTYPE_HASH_PARAM: h}
    with tempfile.TemporaryDirectory() as tmp:
        save_genotype_artifacts(genotype, tmp, alpha, alpha_history, space)

        def log() -> None:
            client.log_artifacts(run_id, tmp, GENOTYPE_DIR)
            batch = [Param(k, v) for k, v in params.items()]
            _log_batch(client, run_id, params=batch, tags=[RunTag("genotype_hash", h)])

        _retried(ctx, f"genotype of run {run_id}", log)
    return h


def log_parent_genotype(ctx: TrackingContext, run_id: str, genotype: Genotype) -> str:
    """Log the search's Parent genotype beside the Child's (``genotype/genotype_parent.json``, param
    ``parent_genotype_hash``); ``find_genotype("parent:<run id>")`` returns it."""
    genotype.validate()
    client = _client(ctx.uri)
    with tempfile.TemporaryDirectory() as tmp:
        genotype.save(Path(tmp) / PARENT_GENOTYPE_FILE)
        client.log_artifact(run_id, str(Path(tmp) / PARENT_GENOTYPE_FILE), GENOTYPE_DIR)
    _log_batch(client, run_id, params=[Param(PARENT_GENOTYPE_HASH_PARAM, genotype.hash)])
    return genotype.hash


def log_artifact(ctx: TrackingContext, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a local file (e.g. the search split) to a run."""
    _retried(
        ctx, f"artifact {path} of run {run_id}", lambda: _client(ctx.uri).log_artifact(run_id, str(path), artifact_path)
    )


def register_genotype(ctx: TrackingContext, run_id: str, name: str, alias: str) -> str:
    """Register the run's genotype as a model version (reused if this run already has one) and point
    ``alias`` at it; returns the version. Uses ``create_model_version``: in MLflow 3
    ``register_model("runs:/...")`` fails without a LoggedModel (docs/stack.md §4.1)."""
    client = _client(ctx.uri)
    run = client.get_run(run_id)
    h = run.data.params.get(GENOTYPE_HASH_PARAM)
    if h is None:
        raise UserError(f"run {run_id} has no logged genotype to register")
    try:
        client.create_registered_model(name, description="DCP-NAS genotypes (genotype/genotype.json)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = (
        existing[0]
        if existing
        else client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{GENOTYPE_DIR}",
            run_id=run_id,
            tags={"genotype_hash": h, "space": run.data.params.get(f"{GENOTYPE_PARAM_PREFIX}space", "")},
        )
    )
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def find_genotype(ctx: TrackingContext, ref: str) -> tuple[Genotype, str | None]:
    """The genotype behind ``ref`` and the run that logged it (None for files).

    ``ref``: a run id, ``parent:<run id>`` (that search's Parent genotype), ``models:/name@alias``,
    ``models:/name/version``, a JSON path or a built-in name. The artifact's hash must match the hash
    recorded when it was logged (and registered).
    """
    from dcpnas.genotype import Genotype, GenotypeError, load_genotype

    client = _client(ctx.uri)
    expected: dict[str, str | None] = {}
    artifact, hash_param = "genotype.json", GENOTYPE_HASH_PARAM
    try:
        if ref.startswith(PARENT_REF) and _RUN_ID.fullmatch(ref.removeprefix(PARENT_REF)):
            run_id = ref.removeprefix(PARENT_REF)
            artifact, hash_param = PARENT_GENOTYPE_FILE, PARENT_GENOTYPE_HASH_PARAM
        elif ref.startswith("models:/"):
            name, at, alias = ref.removeprefix("models:/").partition("@")
            if at:
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = name.rpartition("/")
                mv = client.get_model_version(name, number)
            run_id = mv.run_id
            expected["registered"] = mv.tags.get("genotype_hash")
        elif _RUN_ID.fullmatch(ref) and not Path(ref).exists():
            run_id = ref
        else:
            return load_genotype(ref), None
        expected["logged"] = client.get_run(run_id).data.params.get(hash_param)
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, f"{GENOTYPE_DIR}/{artifact}", tmp)
            genotype = Genotype.load(path).validate()
    except MlflowException as e:
        raise UserError(f"genotype {ref} at {display_uri(ctx.uri)}: {e.message}") from None
    except (GenotypeError, OSError) as e:
        raise UserError(f"genotype {ref}: {e}") from None
    for what, h in expected.items():
        if h is not None and h != genotype.hash:
            raise UserError(
                f"genotype {ref}: artifact of run {run_id} hashes to {genotype.hash[:12]}, "
                f"but {h[:12]} was {what}; the artifact was changed after logging"
            )
    return genotype, run_id


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
