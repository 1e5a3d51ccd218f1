"""Tracking that survives its server: telemetry off, bounded retries, a server restarted mid-writing,
credentials from MLflow's environment variables that never reach a run (docs/tracking.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import requests
from bench_scripts import load_bench
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

import pipeline
from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tracking.retry import TrackingUnavailable, is_transient
from pipeline.tracking.server import free_port

load = load_bench("tracking_load")
CONFIG = {"name": "t", "data": {"batch_size": 8}}


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that make MLflow (or pytest) disable telemetry by themselves."""
    drop = {"PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_telemetry_is_off_unless_the_user_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = "import pipeline.tracking, os; from mlflow.telemetry.client import get_telemetry_client as g; "
    probe += "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], g() is None)"
    out = subprocess.run([sys.executable, "-c", probe], env=_clean_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["true", "True"]  # MLflow's telemetry client never started
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    pipeline.apply_mlflow_defaults()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"  # the user's choice is kept


def test_a_write_failing_past_the_bound_names_the_server_and_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries off: only pipeline.tracking.retry
    port = free_port("127.0.0.1", 0)  # nothing listens there
    ctx = tracking.TrackingContext(f"http://bot:hunter2@127.0.0.1:{port}", "1", "x", "mlflow-artifacts:/1", 2.0)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as e:
        tracking.log_epoch(ctx, "0" * 32, {"loss": 1.0}, step=3)
    assert 2.0 <= time.monotonic() - t0 < 10
    message = str(e.value)
    assert message.startswith(f"MLflow at http://bot:***@127.0.0.1:{port}: epoch 3 of run {'0' * 32} still failing")
    assert "hunter2" not in message
    with pytest.raises(UserError, match=r"bot:\*\*\*@127\.0\.0\.1"):  # bad input fails at once, before compute
        tracking.prepare(ctx.uri, "x")


def test_retried_errors_are_the_transient_ones() -> None:
    def error(code: str, message: str = "x") -> RestException:  # as MLflow's client raises a server's answer
        return RestException({"error_code": code, "message": message})

    pool = "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    transient = [error("BAD_REQUEST", pool), error("TEMPORARILY_UNAVAILABLE", "database is locked")]
    transient += [error("INTERNAL_ERROR"), error("REQUEST_LIMIT_EXCEEDED"), requests.ConnectionError("refused")]
    assert all(map(is_transient, transient))
    final = ["BAD_REQUEST", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_DOES_NOT_EXIST"]
    assert not any(is_transient(error(code)) for code in final)


def _server_pid(port: int) -> int:
    (server,) = [
        p for p in psutil.Process().children() if {"mlflow", "server"} <= set(p.cmdline()) and str(port) in p.cmdline()
    ]
    return server.pid


@pytest.mark.slow
def test_writers_wait_out_a_server_restart_and_nothing_is_lost_or_doubled(tmp_path: Path) -> None:
    """4 trial processes x 16 epochs x 20 metrics; the server is SIGKILLed mid-writing and restarted on its port.

    Writer processes driven through ``local_server`` (what ``serving`` runs) rather than a Ray sweep: the
    restart must land while they write, which a sweep's start-up time would make a matter of luck."""
    writers, epochs = 4, 16
    ctx = tracking.prepare(f"sqlite:///{tmp_path / 'mlflow.db'}", "restart", retry_s=240)
    db, artifacts = tracking.sqlite_path(ctx.uri), tracking.artifacts_dir(ctx.uri)
    port = free_port("127.0.0.1", 0)
    with tracking.local_server(ctx.uri, artifacts, port=port, writers=writers) as uri:
        served = replace(ctx, uri=uri)
        parent = tracking.open_sweep_run(served, "sweep", CONFIG)
        w = load.start_writers(served, parent, writers, epochs, pause_s=0.3)
        total = writers * epochs * load.METRICS
        while (lost := load.count_points(db, parent, writers, epochs)[0]) > total - writers * load.METRICS:
            time.sleep(0.2)  # until about one epoch per writer is in
        os.killpg(_server_pid(port), signal.SIGKILL)
    assert lost > 0 and all(p.is_alive() for p in w.procs)  # killed mid-writing, the writers still running
    time.sleep(3)  # writes now fail: connection refused
    with tracking.local_server(ctx.uri, artifacts, port=port, writers=writers):
        errors, _, messages = load.wait_writers(w)
        trials = tracking.child_runs(served, parent)
    assert (errors, messages) == (0, [])
    assert load.count_points(db, parent, writers, epochs) == (0, 0)  # every epoch of every trial, exactly once
    assert sorted(t["name"] for t in trials) == [f"writer={i}" for i in range(writers)]  # no run opened twice
    assert {t["status"] for t in trials} == {"FINISHED"}


@pytest.mark.slow
def test_basic_auth_credentials_come_from_the_environment_and_never_reach_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.config import Config

    user, password = "dcpnas-bot-7f3", "Pw-9d2c41e8b7"
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n")
    for k, v in {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": "wrong-password-1",
    }.items():
        monkeypatch.setenv(k, v)
    store = tracking.prepare(f"sqlite:///{tmp_path / 'mlflow.db'}", "store")
    with tracking.local_server(store.uri, tmp_path / "artifacts", app_name="basic-auth") as uri:
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:  # a wrong password fails at once (no retry), naming the server
            tracking.prepare(uri, "auth")
        assert uri in str(e.value) and "wrong-password" not in str(e.value) and time.monotonic() - t0 < 10
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        ctx = tracking.prepare(uri, "auth")
        cfg = Config.model_validate({"name": "auth", "tracking": {"uri": uri}}).resolved()
        parent = tracking.open_sweep_run(ctx, "sweep", cfg)
        run = tracking.open_child_run(ctx, parent, "seed=0", {"stage": "search", "space": "dcpnas", "seed": 0})
        tracking.log_epoch(ctx, run, {"loss": 0.5, "phase": "child"}, step=0)
        tracking.log_params(ctx, run, {"search": {"epochs": 1}})
        tracking.finish_run(ctx, run)
        client = MlflowClient(uri)
        logged = [json.dumps([client.get_run(r).data.params, client.get_run(r).data.tags]) for r in (parent, run)]
        logged.append(Path(client.download_artifacts(parent, tracking.CONFIG_ARTIFACT, str(tmp_path))).read_text())
    assert "tracking.retry_s" in logged[0] and '"phase": "child"' in logged[1]  # we read what was logged
    assert not [text for text in logged if user in text or password in text]
