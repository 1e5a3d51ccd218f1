"""cluster/local_cluster.py: a real 2-node Ray cluster on loopback runs tasks on both nodes and a job behind token
auth, and ``stop`` kills exactly its own processes while another Ray cluster on the machine keeps running."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

# Runs in a separate process with only the cluster's env: ray.init() and JobSubmissionClient() must find the cluster
# and authenticate from RAY_ADDRESS / RAY_API_SERVER_ADDRESS / RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH alone.
CLIENT = """
import json, sys
import ray
from ray.job_submission import JobSubmissionClient

ray.init(log_to_driver=False)

@ray.remote(num_cpus=0)
def ip():
    return ray.util.get_node_ip_address()

refs = [ip.options(resources={f"node:{a}": 0.01}).remote() for a in sys.argv[1:]]
print(json.dumps({"ips": ray.get(refs), "jobs": len(JobSubmissionClient().list_jobs())}))
"""


def http_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def gone(rec: dict) -> bool:
    """The recorded process no longer exists (or its PID now belongs to a different process)."""
    try:
        p = psutil.Process(rec["pid"])
        return abs(p.create_time() - rec["create_time"]) > 0.01 or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_decoy(lc: ModuleType, base: Path, decoy_id: str) -> tuple[subprocess.Popen[bytes], int]:
    """An unrelated single-node Ray head on 127.0.0.4 (no dashboard, auth off), tagged only so the test can clean up."""
    port, client, agent = lc.free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **{lc.MARKER: decoy_id})
    args = [
        "--head", "--node-ip-address=127.0.0.4", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0",
        "--max-worker-port=0", f"--object-store-memory={100 * 2**20}", f"--temp-dir={base / 'd'}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with (base / "decoy.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port


def test_rejects_loopback_127_0_0_1_and_unknown_auth(tmp_path: Path, lc: ModuleType) -> None:
    with pytest.raises(ValueError, match="rewrites"):
        lc.LocalCluster(tmp_path, worker_ip="127.0.0.1")
    with pytest.raises(ValueError, match="auth"):
        lc.LocalCluster(tmp_path, auth="none")
    assert len(set(lc.free_ports(5))) == 5


def test_a_start_that_misses_rays_registration_wait_is_retried_once_on_fresh_ports(
    tmp_path: Path, lc: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a loaded machine does to a start (the failed attempt stops its own processes): one retry, then
    the error."""
    seen: list[tuple[int | None, int | None]] = []

    def attempt(self: Any, fail: int) -> Any:
        seen.append((self.port, self.dashboard_port))
        if len(seen) <= fail:
            self.port, self.dashboard_port = 41000 + len(seen), 42000  # ports the failed attempt picked
            raise RuntimeError("`ray start` for the head node exited 1: The current node timed out during startup")
        return self

    monkeypatch.setattr(lc.LocalCluster, "_start_once", lambda self: attempt(self, 1))
    c = lc.LocalCluster(tmp_path / "c")
    assert c.start() is c and seen == [(None, None), (None, None)]  # the retry picks its own ports
    seen.clear()
    monkeypatch.setattr(lc.LocalCluster, "_start_once", lambda self: attempt(self, 2))
    with pytest.raises(RuntimeError, match="timed out during startup"):
        lc.LocalCluster(tmp_path / "d", port=6390).start()
    assert seen == [(6390, None), (6390, None)]  # a given port is kept


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.xdist_group("loopback-cluster")
@pytest.mark.timeout(300)
def test_two_node_cluster_tasks_auth_job_and_exact_stop(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, lc: ModuleType
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    decoy_id = uuid.uuid4().hex
    decoy, decoy_port = start_decoy(lc, short_tmp, decoy_id)
    decoy_procs: list[dict] = []
    c = lc.LocalCluster(short_tmp / "c", grace_s=2.0)
    try:
        c.start()
        assert decoy.wait(timeout=120) == 0, (short_tmp / "decoy.log").read_text()[-2000:]
        decoy_procs = [{"pid": p.pid, "create_time": p.create_time()} for p in lc.cluster_processes(decoy_id)]
        assert any(psutil.Process(r["pid"]).name() == "gcs_server" for r in decoy_procs)

        # state file, token file
        state = json.loads(c.state_path.read_text())
        assert state["address"] == c.address and c.address.startswith("127.0.0.2:")
        assert state["dashboard_url"] == c.dashboard_url and state["token_path"] == str(c.token_path)
        assert state["processes"] == c.processes and len(c.pids) >= 10
        assert stat.S_IMODE(c.token_path.stat().st_mode) == 0o600
        names = {p["name"] for p in c.processes}
        assert {"gcs_server", "raylet"} <= names

        # a client with only the cluster's env reaches both nodes and the Jobs API
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"} | c.env
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, "127.0.0.2", "127.0.0.3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        reply = json.loads(out.stdout.strip().splitlines()[-1])
        assert reply["ips"] == ["127.0.0.2", "127.0.0.3"]
        assert reply["jobs"] >= 1  # the authenticated listing includes the client's own driver

        # the dashboard / Jobs REST API on 127.0.0.1 demands the token
        jobs_url = f"{c.dashboard_url}/api/jobs/"
        assert c.dashboard_url.startswith("http://127.0.0.1:")
        assert http_status(jobs_url, {}) == 401
        assert http_status(jobs_url, {"Authorization": "Bearer wrong"}) == 403
        assert http_status(jobs_url, c.auth_headers()) == 200

        # a job: `python` on the nodes' PATH is this interpreter, and the driver joins the 2-node cluster
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they would override the address given below
            monkeypatch.delenv(var, raising=False)
        jobs = JobSubmissionClient(c.dashboard_url, headers=c.auth_headers())
        job_id = jobs.submit_job(
            entrypoint="python -c \"import ray; ray.init(); print('NODES', len(ray.nodes()))\"",
            entrypoint_num_cpus=0,
        )
        deadline = time.monotonic() + 90
        while (status := jobs.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, f"job still {status}"
            time.sleep(0.5)
        assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-2000:]
        assert "NODES 2" in jobs.get_job_logs(job_id)
    finally:
        try:
            killed = c.stop()
            decoy_hit = [r for r in decoy_procs if gone(r)]
            decoy_gcs_up = port_open("127.0.0.4", decoy_port)
        finally:
            lc.terminate(lc.cluster_processes(decoy_id), 2.0)
            decoy.wait(timeout=30)

    # stop: every recorded process is gone, nothing of this cluster survives, its state and token are removed ...
    assert set(c.pids) <= set(killed)
    assert [r for r in c.processes if not gone(r)] == []
    assert lc.cluster_processes(c.cluster_id) == []
    temp_dirs = (str(short_tmp / "c" / "head"), str(short_tmp / "c" / "worker"))
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if any(d in a for a in p.info["cmdline"] or () for d in temp_dirs)
    ]
    assert leftovers == []
    assert not c.state_path.exists() and not c.token_path.exists()
    # ... and the other Ray cluster was untouched: all its processes were alive right after our stop
    assert decoy_hit == [] and decoy_gcs_up
