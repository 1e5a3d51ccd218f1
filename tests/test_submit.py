"""``dcpnas submit``: job-file checks, entrypoint rewriting, fast failure on a dead address, and real submissions to
the 2-node loopback cluster behind token auth (a job that succeeds, one that fails inside the cluster)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from pipeline.commands.submit import DEFAULT_ADDRESS, _runtime_env, build_entrypoint, load_job, resolve_address
from pipeline.errors import UserError

if TYPE_CHECKING:
    from local_cluster import LocalCluster  # cluster/local_cluster.py, loaded by conftest's `lc` fixture

ROOT = Path(__file__).resolve().parents[1]
DCPNAS = str(Path(sys.executable).parent / "dcpnas")


def dcpnas(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DCPNAS, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- entrypoint building -------------------------------------------------------------------------------------------
def test_config_replaces_the_positional_config_and_overrides_are_quoted() -> None:
    out = build_entrypoint(
        "dcpnas run configs/imagenet-search.yaml", "configs/demo.yaml", ["sweep.seeds=[0, 1]", "name=a b"]
    )
    assert out == "dcpnas run configs/demo.yaml --set 'sweep.seeds=[0, 1]' --set 'name=a b'"
    assert shlex.split(out) == [
        "dcpnas",
        "run",
        "configs/demo.yaml",
        "--set",
        "sweep.seeds=[0, 1]",
        "--set",
        "name=a b",
    ]


def test_config_replaces_a_config_option_or_is_inserted() -> None:
    assert build_entrypoint("dcpnas sweep --config a.yaml --dry-run", "b.yaml", []) == (
        "dcpnas sweep --config b.yaml --dry-run"
    )
    assert build_entrypoint("dcpnas sweep --config=a.yaml", "b c.yaml", []) == "dcpnas sweep '--config=b c.yaml'"
    assert build_entrypoint("dcpnas run --dry-run", "b.yaml", []) == "dcpnas run b.yaml --dry-run"


def test_without_config_the_entrypoint_is_kept_verbatim() -> None:
    cmd = "cd sub && dcpnas run x.yaml"
    assert build_entrypoint(cmd, None, []) == cmd
    assert build_entrypoint(cmd, None, ["a.b=1"]) == cmd + " --set a.b=1"


def test_bad_overrides_and_shell_entrypoints_are_refused_before_submission() -> None:
    with pytest.raises(UserError, match="key=value"):
        build_entrypoint("dcpnas run x.yaml", None, ["no-equals-sign"])
    with pytest.raises(UserError, match="plain"):
        build_entrypoint("cd sub && dcpnas run x.yaml", "y.yaml", [])


# -- job file --------------------------------------------------------------------------------------------------------
def test_the_repository_job_file_loads() -> None:
    spec = load_job(ROOT / "ray_job.yaml")
    assert spec.entrypoint.startswith("dcpnas run ")
    assert spec.runtime_env["working_dir"] == "."
    assert _runtime_env(spec, ROOT / "ray_job.yaml")["working_dir"] == str(ROOT)


@pytest.mark.parametrize(
    ("tree", "field"),
    [
        ({"entrypoint": "x", "entrypoint_num_cpu": 1}, "entrypoint_num_cpu"),  # misspelt key
        ({"runtime_env": {}}, "entrypoint"),  # missing
        ({"entrypoint": "x", "entrypoint_num_cpus": "many"}, "entrypoint_num_cpus"),
        ({"entrypoint": "x", "runtime_env": ["working_dir"]}, "runtime_env"),
    ],
)
def test_a_bad_job_file_names_the_field(tmp_path: Path, tree: dict, field: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError, match=rf"job file .*job\.yaml: {field}"):
        load_job(path)


def test_a_missing_working_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("entrypoint: x\nruntime_env: {working_dir: nowhere}\n")
    spec = load_job(tmp_path / "job.yaml")
    with pytest.raises(UserError, match=r"working_dir: .*nowhere is not a directory"):
        _runtime_env(spec, tmp_path / "job.yaml")
    remote = load_job(tmp_path / "job.yaml").model_copy(update={"runtime_env": {"working_dir": "s3://b/pkg.zip"}})
    assert _runtime_env(remote, tmp_path / "job.yaml")["working_dir"] == "s3://b/pkg.zip"


# -- address ---------------------------------------------------------------------------------------------------------
def test_address_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "10.0.0.2:8265/")
    assert resolve_address(None) == "http://10.0.0.2:8265"
    assert resolve_address("https://ray.example:443") == "https://ray.example:443"
    with pytest.raises(UserError, match="http"):
        resolve_address("ray://head:10001")


def test_an_unreachable_address_fails_fast_with_a_clear_message() -> None:
    with socket.socket() as s:  # bound, never listening: connections to it are refused, and nobody else can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        out = dcpnas("submit", "--address", f"http://127.0.0.1:{port}", "--set", "sweep.seeds=[0]", timeout=60)
        elapsed = time.monotonic() - t0
    assert out.returncode == 2
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert elapsed < 45  # the CLI's own imports dominate; no connection retries


# -- real submissions to the 2-node loopback cluster ------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.xdist_group("loopback-cluster")
@pytest.mark.timeout(900)
def test_submit_the_real_job_to_a_token_auth_cluster_and_report_a_failed_one(
    short_tmp: Path, loopback_cluster: LocalCluster
) -> None:
    # The repository's ray_job.yaml as users submit it, with the demo config shrunk through --config/--set; MLflow and
    # outputs go to this test's directory (the job's MLFLOW_TRACKING_URI names the cluster service, absent here).
    shrink = [
        f"output_dir={short_tmp / 'runs'}",
        f"tracking.uri=sqlite:///{short_tmp / 'mlflow.db'}",
        "sweep.seeds=[0]",
        "sweep.spaces=[dcpnas_3x3]",
        "search.epochs=1",
        "search.warmup_epochs=0",
        "retrain.top_k=0",  # retraining has its own tests; here the job's runs only need to reach MLflow
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"} | loopback_cluster.env
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"  # --address must win over the environment
    common = [
        "submit",
        "--address",
        loopback_cluster.dashboard_url,
        "--job",
        str(ROOT / "ray_job.yaml"),
        "--config",
        "configs/demo.yaml",
    ]

    # without the token the Jobs API refuses: a clear message naming the fix, no traceback
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    denied = dcpnas(*common, env=no_token, timeout=120)
    assert denied.returncode == 2 and "Traceback" not in denied.stderr, denied.stderr[-3000:]
    assert "wants the cluster's token: set RAY_AUTH_MODE=token" in denied.stderr

    ok = dcpnas(*common, *[a for item in shrink for a in ("--set", item)], env=env, timeout=840)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "submitted job raysubmit_" in ok.stdout and "SUCCEEDED" in ok.stdout
    assert "dcpnas run configs/demo.yaml --set" in ok.stdout
    assert "seed=0,space=dcpnas_3x3" in ok.stdout  # the followed logs: the sweep ran with our overrides
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{short_tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    stages = sorted((r.data.tags.get("stage"), r.info.status) for r in runs)
    assert stages == [("search", "FINISHED"), ("sweep", "FINISHED")], stages

    bad = dcpnas(*common, "--set", "search.no_such_field=1", env=env, timeout=300)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "no_such_field" in bad.stdout  # the driver's own error, streamed back
    assert "FAILED: Job entrypoint command failed with exit code 2" in bad.stderr
