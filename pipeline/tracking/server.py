"""The local ``mlflow server`` that ``tracking.serving`` puts in front of a SQLite store while trials run.

Sized for the sweep it serves (docs/tracking.md, "Sizing the local server"): MLflow runs its Flask app
under uvicorn, which hands each request to a thread (anyio: at most ``REQUEST_THREADS`` at once per
worker), and every request holds a SQLAlchemy connection. SQLAlchemy's default pool (5 + 10 overflow)
makes the 16th concurrent request wait 30 s and then fail with "QueuePool limit ... reached", so the
pool keeps one connection per expected writer and may grow to the thread limit: a request never waits
for a connection, only for SQLite's write lock (in WAL mode, readers do not block it).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

REQUEST_THREADS = 40  # anyio's default thread limit, which bounds concurrent requests per uvicorn worker
HEADROOM = 4  # the driver, a UI, a report reading while trials write


def pool_env(writers: int) -> dict[str, str]:
    """MLflow's SQLAlchemy pool settings for ``writers`` concurrent clients of one server worker."""
    size = min(writers + HEADROOM, REQUEST_THREADS)
    # MLflow passes max_overflow only when non-zero (0 would mean SQLAlchemy's 10): 1 keeps it explicit.
    return {
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(size),
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(max(REQUEST_THREADS - size, 1)),
    }


def enable_wal(db: Path) -> None:
    """Put the SQLite file in WAL mode (persistent, stored in the file): readers no longer block the writer
    and a commit appends instead of rewriting a journal. MLflow sets no journal mode of its own."""
    with sqlite3.connect(db, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")
    con.close()


def free_port(host: str, port: int) -> int:
    """``port`` if nothing listens there (0: any free one), so /health cannot answer from another server.

    SO_REUSEADDR as uvicorn uses it: a server restarted on its port is not refused for the connections its
    predecessor left in TIME_WAIT, while a live listener still is."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve MLflow on {host}:{port}: {e.strerror}") from None
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group, wait until every member is gone, SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the group leader, else it lingers as a zombie member
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def health_problem(uri: str, timeout_s: float) -> str | None:
    """None when the MLflow server at ``uri`` answers ``/health`` (401/403 count: it is up, credentials
    are the client's business), else why not. The one probe of the pipeline: stage start, server start, UI."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code in (401, 403) else f"/health answered HTTP {e.code}"
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, refusals are OSErrors
        return str(getattr(e, "reason", e))


def _wait_healthy(proc: subprocess.Popen, uri: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if health_problem(uri, 2.0) is None:
            return
        if time.monotonic() > deadline:
            raise UserError(f"mlflow server at {uri} not healthy after {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.25)
    raise UserError(f"mlflow server at {uri} exited with code {proc.returncode}; see {log_path}")


@contextmanager
def local_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = 120.0,
    writers: int = 8,
    app_name: str | None = None,
) -> Iterator[str]:
    """Run ``mlflow server --workers 1`` over ``backend_uri``, its pool sized for ``writers``; yield its URI.

    One worker: over SQLite, one process is the file's only writer. Binds ``host`` (loopback by default:
    without ``app_name="basic-auth"`` the server has no authentication). The server runs in its own
    process group, which is stopped and waited for on exit (teardown takes seconds). Its log is
    ``mlflow-server.log`` next to ``artifacts_dir``.
    """
    artifacts = Path(artifacts_dir).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    port = free_port(host, port)
    uri = f"http://{host}:{port}"
    log_path = artifacts.parent / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    cmd += ["--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1"]
    cmd += ["--app-name", app_name] if app_name else []
    # no job runner: 2 fewer processes; the pool sized unless the user set it
    env = {**pool_env(writers), **os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_healthy(proc, uri, timeout_s, log_path)
        yield uri
    finally:
        _stop_group(proc)
