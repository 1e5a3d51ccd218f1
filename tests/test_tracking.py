"""MLflow tracking against real stores: SQLite in tmp dirs and a real ``mlflow server`` on loopback.

torch-backed imports (Config, genotypes) stay inside the tests that need them, so the spawned
writer processes import only MLflow and start fast.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from bench_scripts import load_bench
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.errors import UserError

load = load_bench("tracking_load")
WRITERS = 32

SIX_TAGS = ("stage", "space", "seed", "config_hash", "genotype_hash", "git_sha")
CONFIG = {"name": "t", "data": {"batch_size": 8}, "search": {"epochs": 2, "seed": 0, "space": "dcpnas"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module (schema creation is the slow part); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns' / 'mlflow.db'}"


def _trial_tags(seed: int) -> dict[str, object]:
    return {"stage": "search", "space": "dcpnas", "seed": seed}


# ---- prepare -------------------------------------------------------------------------------------
def _prepare_in_child(uri: str, barrier: Any, out: Any) -> None:
    barrier.wait()  # all four hit the fresh DB at once
    try:
        out.put(tracking.prepare(uri, "race").experiment_id)
    except Exception as e:
        out.put(f"error: {e!r}")


@pytest.mark.slow
def test_prepare_on_a_fresh_db_from_four_processes(tmp_path: Path) -> None:
    mp = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    barrier, out = mp.Barrier(4), mp.Queue()
    procs = [mp.Process(target=_prepare_in_child, args=(uri, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(set(ids)) == 1 and not ids[0].startswith("error"), ids
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert sorted(names) == ["Default", "race"]


def test_prepare_makes_sqlite_absolute_and_artifacts_local(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = tracking.prepare(store, "paths")
    assert ctx == tracking.prepare(store, "paths")
    db = Path(store.removeprefix("sqlite:///"))
    assert ctx.uri == f"sqlite:///{db}" and ctx.artifact_location == (db.parent / "artifacts" / "paths").as_uri()
    monkeypatch.chdir(db.parent.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None) == f"sqlite:///{db}"
    assert tracking.resolve_uri("sqlite:///mlruns/mlflow.db") == f"sqlite:///{db}"
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"http://127\.0\.0\.1:9 is not reachable"):
        tracking.prepare("http://127.0.0.1:9", "never")
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:///tmp/mlruns", "file store"),
        ("./mlruns", "file store"),
        ("sqlite:///:memory:", "not memory"),
        ("sqlite:///{tmp}/a_file/mlruns/mlflow.db", "cannot create"),
    ],
)
def test_unusable_uris_are_user_errors(tmp_path: Path, uri: str, message: str) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(UserError, match=message):
        tracking.prepare(uri.format(tmp=tmp_path), "never")


# ---- run tree ------------------------------------------------------------------------------------
def test_sweep_and_trial_runs_are_tagged_and_reused(store: str) -> None:
    from pipeline.config import Config

    ctx = tracking.prepare(store, "tree")
    cfg = Config()
    parent = tracking.open_sweep_run(ctx, "sweep", cfg.resolved(), {"space": "dcpnas", "seed": "0,1"})
    trials = [tracking.open_child_run(ctx, parent, f"seed={s},space=dcpnas", _trial_tags(s)) for s in (0, 1)]
    tracking.log_epoch(ctx, trials[0], {"parent/loss": 2.5, "child/val_acc": 0.25, "genotype_hash": "abc"}, step=0)
    tracking.log_epoch(ctx, trials[0], {"parent/loss": 2.0, "child/val_acc": 0.5, "genotype_hash": "def"}, step=1)

    # re-running the same config (an interrupted sweep) reuses every run
    assert tracking.open_sweep_run(ctx, "sweep", cfg.resolved(), {"space": "dcpnas", "seed": "0,1"}) == parent
    assert [tracking.open_child_run(ctx, parent, f"seed={s},space=dcpnas", _trial_tags(s)) for s in (0, 1)] == trials
    other = tracking.open_sweep_run(ctx, "sweep", Config(threads=1).resolved())
    assert other != parent

    client = MlflowClient(ctx.uri)
    runs = client.search_runs([ctx.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, other, *trials])
    p = client.get_run(parent)
    assert p.data.tags["stage"] == "sweep" and p.data.tags["config_hash"] == cfg.hash
    assert p.data.tags["git_sha"] == tracking.git_sha() != ""
    assert p.data.params["search.epochs"] == json.dumps(cfg.search.epochs)
    saved = yaml.safe_load(Path(client.download_artifacts(parent, tracking.CONFIG_ARTIFACT)).read_text())
    assert saved["config_hash"] == cfg.hash and saved["search"] == cfg.resolved()["search"]

    t0 = client.get_run(trials[0])
    assert {k: t0.data.tags[k] for k in SIX_TAGS} == {
        "stage": "search",
        "space": "dcpnas",
        "seed": "0",
        "config_hash": cfg.hash,
        "genotype_hash": "def",
        "git_sha": p.data.tags["git_sha"],
    }
    assert t0.data.tags["mlflow.parentRunId"] == parent and t0.info.run_name == "seed=0,space=dcpnas"
    history = client.get_metric_history(trials[0], "child/val_acc")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5)]
    # what a restarted worker reads to log a re-run epoch once
    assert tracking.logged_steps(ctx, trials[0], "child/val_acc") == {0, 1}
    assert tracking.logged_steps(ctx, trials[1], "child/val_acc") == set()
    listed = tracking.child_runs(ctx, parent)
    assert [t["run_id"] for t in listed] == trials and listed[0]["metrics"]["parent/loss"] == 2.0
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ


def test_trial_needs_the_contract_tags_and_numeric_metrics(store: str) -> None:
    ctx = tracking.prepare(store, "contract")
    parent = tracking.open_sweep_run(ctx, "sweep", CONFIG)
    with pytest.raises(ValueError, match="needs tag"):
        tracking.open_child_run(ctx, parent, "seed=0", {"stage": "search", "seed": 0})
    run = tracking.open_child_run(ctx, parent, "seed=0", _trial_tags(0))
    with pytest.raises(TypeError, match="metric 'alphas'"):
        tracking.log_epoch(ctx, run, {"alphas": [1.0, 2.0]}, step=0)


def test_secrets_stay_out_of_params_and_config_artifact(store: str) -> None:
    ctx = tracking.prepare(store, "secrets")
    config = {
        "name": "x",
        "tracking": {"uri": "http://bob:hunter2@mlflow:5000", "api_token": "tok-123"},
        "aws": {"secret_access_key": "sk-456", "region": "eu"},
        "data": {"batch_size": 8},
    }
    run = tracking.open_sweep_run(ctx, "sweep", config)
    client = MlflowClient(ctx.uri)
    params = client.get_run(run).data.params
    assert params["data.batch_size"] == "8" and params["aws.region"] == "eu"
    assert params["tracking.uri"] == "http://bob:***@mlflow:5000"
    assert not any(s in k or s in v for k, v in params.items() for s in ("token", "secret", "hunter2", "tok-", "sk-"))
    text = Path(client.download_artifacts(run, tracking.CONFIG_ARTIFACT)).read_text()
    assert tracking.REDACTED in text and not any(s in text for s in ("hunter2", "tok-123", "sk-456"))


def test_diverged_trial_records_its_reason_and_resumes_into_the_same_run(store: str) -> None:
    ctx = tracking.prepare(store, "diverge")
    parent = tracking.open_sweep_run(ctx, "sweep", CONFIG)
    bad = tracking.open_child_run(ctx, parent, "seed=0", _trial_tags(0))
    good = tracking.open_child_run(ctx, parent, "seed=1", _trial_tags(1))
    tracking.log_epoch(ctx, bad, {"child/loss": float("nan")}, step=3)
    tracking.finish_run(ctx, bad, "FAILED", reason="diverged: child loss is nan at epoch 3 step 7")
    tracking.finish_run(ctx, good)

    by_key = {t["tags"]["trial_key"]: t for t in tracking.child_runs(ctx, parent)}
    assert by_key["seed=0"]["status"] == "FAILED" and by_key["seed=1"]["status"] == "FINISHED"
    assert by_key["seed=0"]["tags"][tracking.FAILURE_TAG].startswith("diverged: child loss is nan")
    assert tracking.FAILURE_TAG not in by_key["seed=1"]["tags"]
    assert by_key["seed=0"]["metrics"]["child/loss"] != by_key["seed=0"]["metrics"]["child/loss"]  # NaN kept

    # a retry continues the same run: running again, old reason cleared, history kept
    assert tracking.open_child_run(ctx, parent, "seed=0", _trial_tags(0)) == bad
    run = MlflowClient(ctx.uri).get_run(bad)
    assert run.info.status == "RUNNING" and tracking.FAILURE_TAG not in run.data.tags
    assert "child/loss" in run.data.metrics
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.finish_run(ctx, bad, "DONE")


# ---- genotypes -----------------------------------------------------------------------------------
def test_genotype_artifacts_round_trip_by_run_alias_and_file(store: str, tmp_path: Path) -> None:
    import torch

    from dcpnas.genotype import load_genotype
    from dcpnas.spaces import get_space

    ctx = tracking.prepare(store, "genotypes")
    parent = tracking.open_sweep_run(ctx, "sweep", CONFIG)
    run = tracking.open_child_run(ctx, parent, "seed=0", _trial_tags(0))
    genotype, space = load_genotype("ddpnas_mcn_2"), get_space("dcpnas")
    torch.manual_seed(0)
    history = [torch.randn(2, space.num_edges, space.num_ops) for _ in range(3)]
    assert tracking.log_genotype(ctx, run, genotype, alpha=history[-1], alpha_history=history) == genotype.hash

    client = MlflowClient(ctx.uri)
    files = {Path(a.path).name: a.file_size for a in client.list_artifacts(run, tracking.GENOTYPE_DIR)}
    assert set(files) == {"genotype.json", "normal.png", "reduce.png", "alphas.png", "alpha_history.png"}
    assert min(files.values()) > 200
    data = client.get_run(run).data
    assert data.tags["genotype_hash"] == genotype.hash and data.params["genotype.hash"] == genotype.hash
    assert {k: data.params[f"genotype.{k}"] for k in genotype.flat()} == genotype.flat()

    assert tracking.find_genotype(ctx, run) == (genotype, run)
    assert tracking.register_genotype(ctx, run, "dcpnas-genotype", "best") == "1"
    assert tracking.register_genotype(ctx, run, "dcpnas-genotype", "champion") == "1"  # same run: same version
    assert tracking.find_genotype(ctx, "models:/dcpnas-genotype@champion") == (genotype, run)
    assert tracking.find_genotype(ctx, "models:/dcpnas-genotype/1") == (genotype, run)
    assert tracking.find_genotype(ctx, str(genotype.save(tmp_path / "g.json"))) == (genotype, None)
    assert tracking.find_genotype(ctx, "darts_v2") == (load_genotype("darts_v2"), None)

    other = load_genotype("darts_v2")
    with pytest.raises(UserError, match=r"genotype_parent\.json"):  # no Parent genotype logged yet
        tracking.find_genotype(ctx, f"parent:{run}")
    parent_genotype = load_genotype("tangent_1")
    assert tracking.log_parent_genotype(ctx, run, parent_genotype) == parent_genotype.hash != genotype.hash
    assert client.get_run(run).data.params["parent_genotype_hash"] == parent_genotype.hash
    assert tracking.find_genotype(ctx, f"parent:{run}") == (parent_genotype, run)
    assert tracking.find_genotype(ctx, run) == (genotype, run)  # the Child's genotype is untouched
    with pytest.raises(ValueError, match="already holds genotype"):
        tracking.log_genotype(ctx, run, other)
    assert tracking.find_genotype(ctx, run)[0] == genotype  # nothing was overwritten

    artifact = Path(client.get_run(run).info.artifact_uri.removeprefix("file://")) / "genotype" / "genotype.json"
    other.save(artifact)  # an edit behind MLflow's back
    with pytest.raises(UserError, match="changed after logging"):
        tracking.find_genotype(ctx, "models:/dcpnas-genotype@best")
    with pytest.raises(UserError, match=r"0{32}"):
        tracking.find_genotype(ctx, "0" * 32)
    no_genotype = tracking.open_child_run(ctx, parent, "seed=1", _trial_tags(1))
    with pytest.raises(UserError, match="no logged genotype"):
        tracking.register_genotype(ctx, no_genotype, "dcpnas-genotype", "best")


# ---- one writer: a local server ------------------------------------------------------------------
def test_local_server_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = tracking.local_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", port=port)
        with pytest.raises(UserError, match=f"cannot serve MLflow on 127.0.0.1:{port}"), server:
            pass


@pytest.mark.slow
def test_local_server_serialises_concurrent_writers(tmp_path: Path) -> None:
    from dcpnas.genotype import load_genotype

    fresh = tracking.prepare(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "embedded")
    with tracking.serving(fresh, writers=WRITERS) as served:
        assert served.uri.startswith("http://127.0.0.1:") and served.experiment_id == fresh.experiment_id
        port = int(served.uri.rsplit(":", 1)[1])
        (server,) = [p for p in psutil.Process().children() if {"mlflow", "server"} <= set(p.cmdline())]
        tree = [server, *server.children(recursive=True)]
        sockets = [c for p in tree for c in p.net_connections("inet")]
        assert {(c.laddr.ip, c.laddr.port) for c in sockets if c.status == "LISTEN"} == {("127.0.0.1", port)}

        ctx = tracking.prepare(served.uri, "concurrent")  # a new experiment, created over HTTP by the driver
        with tracking.serving(ctx) as same:
            assert same is ctx  # a server URI is already the single writer
        parent = tracking.open_sweep_run(ctx, "sweep", CONFIG)
        # 32 trial processes x 20 epochs x 20 metrics at once (the load that exhausted MLflow's default pool)
        errors, _, messages = load.wait_writers(load.start_writers(ctx, parent, WRITERS, 20))
        assert (errors, messages) == (0, [])
        assert load.count_points(tracking.sqlite_path(fresh.uri), parent, WRITERS, 20) == (0, 0)  # lost, duplicated

        trials = tracking.child_runs(ctx, parent)
        assert sorted(int(t["tags"]["seed"]) for t in trials) == list(range(WRITERS))
        last = {t["tags"]["seed"]: t["metrics"]["m00"] for t in trials if t["status"] == "FINISHED"}
        assert last == {str(i): load.epoch_metrics(i, 19)["m00"] for i in range(WRITERS)}
        client = MlflowClient(ctx.uri)
        assert client.search_runs(["0"]) == []  # nothing misfiled into Default
        assert ctx.artifact_location.startswith("mlflow-artifacts:")  # artifacts go through the server
        genotype = load_genotype("darts_v2")
        tracking.log_genotype(ctx, trials[0]["run_id"], genotype)
        assert tracking.find_genotype(ctx, trials[0]["run_id"]) == (genotype, trials[0]["run_id"])

    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
