"""A two-node Ray cluster on loopback (head 127.0.0.2, worker 127.0.0.3) for multi-node tests and local job runs.

Usage: ``python cluster/local_cluster.py start|stop|status|env [--dir DIR] ...`` or, from Python/tests,
``with LocalCluster(dir) as c: ...`` (``c.address``, ``c.dashboard_url``, ``c.env``, ``c.auth_headers()``).
``c.kill_worker_node()`` / ``c.restart_worker_node()`` crash and bring back the worker node alone.

Why it looks like this (docs/stack.md §3):

* Ray rewrites a ``127.0.0.1`` node IP to the machine's outside address, so the nodes use 127.0.0.2/.3, which it
  keeps; two raylets on one host need their own ``--temp-dir`` and dashboard-agent port; every other port is either
  picked free here or left to Ray's random choice, so parallel clusters (parallel test sessions) do not collide.
* Ray 2.60 token auth is kept on: a fresh token file (0600) under DIR is given to both nodes through
  ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``; a node or client without it fails to authenticate. Nothing is
  written to ``~/.ray/auth_token``, which would silently switch other people's local clusters to token auth.
* ``ray stop`` kills every Ray process on the machine. Instead, every process started here inherits a per-cluster
  marker variable (``DCPNAS_LOCAL_CLUSTER_ID``); ``stop`` signals only processes carrying it (and their children).
  The marker survives re-parenting to init and the new sessions Ray gives job drivers, and is unique per cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

MARKER = "DCPNAS_LOCAL_CLUSTER_ID"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
DEFAULT_DIR = Path(tempfile.gettempdir()) / f"dcpnas-ray-{os.getuid()}"
# Variables from the caller's shell that would point the nodes at another cluster or another token
# (RAY_AUTH_TOKEN beats RAY_AUTH_TOKEN_PATH), or forbid worker nodes (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
_NODE_ENV_DROP = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on all interfaces (GCS and raylets bind 0.0.0.0), held open until all are picked."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_processes(cluster_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries this cluster's marker, plus all their descendants.

    Descendants are included for anything that scrubs its environment; other users' processes are unreadable and
    skipped, as are zombies (already dead).
    """
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == cluster_id:
                found[p.pid] = p
        except psutil.Error:
            continue
    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(found.values())


def terminate(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM, wait up to ``grace_s``, SIGKILL the rest; returns the processes still running after that.

    SIGKILL is needed: GCS, raylets and runtime-env agents outlive SIGTERM by >10 s here (docs/stack.md §2.4).
    psutil checks the PID's creation time before signalling, so a reused PID is never hit.
    """
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p for p in alive if not _is_zombie(p)]  # dead; only an unreaped exit status is left


def _is_zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one recorded (same creation time), else None."""
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - create_time) < 0.01 else None
    except psutil.Error:
        return None


class LocalCluster:
    """A Ray head and one worker node on two loopback IPs, started with ``ray start`` and stopped by PID.

    After ``start()`` (or entering the context): ``address`` (GCS ``ip:port`` for ``ray.init``), ``dashboard_url``
    (Jobs REST API / dashboard on 127.0.0.1), ``token_path`` (None with ``auth="disabled"``), ``env`` (variables a
    client process needs: RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH,
    RAY_USAGE_STATS_ENABLED), ``processes`` (pid, create_time, name of everything started), ``state_path``.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] = DEFAULT_DIR,
        *,
        head_ip: str = "127.0.0.2",
        worker_ip: str = "127.0.0.3",
        cpus_per_node: int = 1,
        port: int | None = None,
        dashboard_port: int | None = None,
        auth: str = "token",
        object_store_mb: int = 256,
        timeout_s: float = 120.0,
        grace_s: float = 3.0,
    ) -> None:
        if auth not in ("token", "disabled"):
            raise ValueError(f"auth must be 'token' or 'disabled', got {auth!r}")
        if "127.0.0.1" in (head_ip, worker_ip):
            raise ValueError("Ray rewrites node IP 127.0.0.1 to the outside address; use e.g. 127.0.0.2 / 127.0.0.3")
        self.dir = Path(dir).resolve()
        self.head_ip, self.worker_ip = head_ip, worker_ip
        self.cpus_per_node, self.object_store_mb = cpus_per_node, object_store_mb
        self.port, self.dashboard_port = port, dashboard_port
        self.auth, self.timeout_s, self.grace_s = auth, timeout_s, grace_s
        self.cluster_id = ""
        self.processes: list[dict[str, Any]] = []

    # -- derived attributes ------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def token_path(self) -> Path | None:
        return self.dir / TOKEN_FILE if self.auth == "token" else None

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def pids(self) -> list[int]:
        return [p["pid"] for p in self.processes]

    @property
    def env(self) -> dict[str, str]:
        """What a client (``ray.init()``, ``ray job``, ``JobSubmissionClient()``, ``dcpnas submit``) needs."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": self.auth,
        }
        if self.token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        return env

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard / Jobs REST API (401 without a token, 403 with a wrong one)."""
        if self.token_path is None:
            return {}
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        """Start head then worker, wait for 2 alive nodes, record every process; on any failure stop what started.

        On a loaded machine a raylet can miss ``ray start``'s fixed 30 s registration wait ("The current node timed
        out during startup", seen on the head while a test suite ran beside it): then the cluster is started once
        more from scratch, on fresh ports where none were given.
        """
        if self.state_path.exists():
            raise RuntimeError(f"{self.state_path} exists: a cluster may be running there; stop it first")
        given = self.port, self.dashboard_port
        try:
            return self._start_once()
        except (RuntimeError, TimeoutError):  # the failed attempt is stopped already
            self.port, self.dashboard_port = given
            return self._start_once()

    def _start_once(self) -> LocalCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        gcs, dash, client, head_agent = free_ports(4)
        self.port = self.port or gcs
        self.dashboard_port = self.dashboard_port or dash
        self.cluster_id = uuid.uuid4().hex
        if self.token_path is not None:
            self._write_token(self.token_path)
        # State goes to disk before anything starts, so `stop` finds the marker even after a crash mid-start.
        self._write_state()
        head_args = [
            "--head",
            f"--node-ip-address={self.head_ip}",
            f"--port={self.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={head_agent}",
            f"--temp-dir={self.dir / 'head'}",
            *self._common_args(),
        ]
        try:
            head = self._ray_start("head", head_args)
            # The worker only needs the GCS; joining while the head still brings up its dashboard saves ~10 s.
            self._wait_for_gcs(head)
            worker = self._ray_start("worker", self._worker_args())
            for name, proc in (("head", head), ("worker", worker)):
                self._check_started(name, proc)
            self._wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise
        self.processes = [
            {"pid": p.pid, "create_time": p.create_time(), "name": p.name()} for p in cluster_processes(self.cluster_id)
        ]
        self._write_state()
        return self

    def stop(self) -> list[int]:
        """Kill this cluster's processes (recorded ones and any spawned since), remove state and token; returns PIDs.

        Raises (keeping the state file for a retry) if a marked process survives SIGKILL.
        """
        targets = {p.pid: p for p in cluster_processes(self.cluster_id)} if self.cluster_id else {}
        for rec in self.processes:
            if (p := _same_process(rec["pid"], rec["create_time"])) is not None:
                targets.setdefault(p.pid, p)
        survivors = terminate(list(targets.values()), self.grace_s)
        # A raylet may have forked a worker between the scan and its own death: sweep until nothing marked is left.
        for _ in range(3):
            rest = cluster_processes(self.cluster_id) if self.cluster_id else []
            if not rest:
                break
            targets.update((p.pid, p) for p in rest)
            survivors = terminate(rest, 1.0)
        if survivors:
            raise RuntimeError(f"processes survived SIGKILL: {sorted(p.pid for p in survivors)}")
        self.state_path.unlink(missing_ok=True)
        if self.token_path is not None:
            self.token_path.unlink(missing_ok=True)
        return sorted(targets)

    def kill_worker_node(self) -> list[int]:
        """SIGKILL the worker node's processes only (a node crash); the head and its workers keep running.

        The worker node's processes are this cluster's marked processes that name its temp dir on their command line
        (raylet, log monitor, agents, Ray workers), plus their descendants. Returns their PIDs.
        """
        node_dir = str(self.dir / "worker")
        targets: dict[int, psutil.Process] = {}
        for p in cluster_processes(self.cluster_id):
            try:
                if any(node_dir in arg for arg in p.cmdline()):
                    targets[p.pid] = p
                    targets.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                continue
        for p in targets.values():
            try:
                p.kill()
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(list(targets.values()), timeout=5)
        if survivors := [p.pid for p in alive if not _is_zombie(p)]:
            raise RuntimeError(f"worker-node processes survived SIGKILL: {sorted(survivors)}")
        return sorted(targets)

    def restart_worker_node(self) -> None:
        """Start the worker node again (after ``kill_worker_node``), once GCS has marked the old one dead.

        Waiting for the death first keeps the count unambiguous: two ALIVE nodes then means the new one joined.
        On a loaded machine the new raylet can miss ``ray start``'s fixed 30 s registration wait: then its
        half-started processes are killed and it is started once more.
        """
        self._wait_for_nodes(1, exact=True)
        for attempt in range(2):
            try:
                self._check_started("worker", self._ray_start("worker", self._worker_args()))
                break
            except RuntimeError:
                if attempt:
                    raise
                self.kill_worker_node()
        self._wait_for_nodes(2)
        self.processes = [
            {"pid": p.pid, "create_time": p.create_time(), "name": p.name()} for p in cluster_processes(self.cluster_id)
        ]
        self._write_state()

    def status(self) -> dict[str, Any]:
        """Recorded processes still alive and the nodes GCS reports (via the dashboard's state API)."""
        alive = [r["pid"] for r in self.processes if _same_process(r["pid"], r["create_time"]) is not None]
        try:
            nodes = [{"ip": n["node_ip"], "state": n["state"]} for n in self._nodes()]
        except (OSError, ValueError) as e:  # URLError is an OSError; a non-JSON reply a ValueError
            nodes = [{"error": str(e)}]
        return {**self._state(), "alive_pids": alive, "nodes": nodes}

    @classmethod
    def load(cls, dir: str | os.PathLike[str] = DEFAULT_DIR) -> LocalCluster:
        """The cluster recorded in ``dir`` (for ``stop``/``status`` from another process)."""
        state = json.loads((Path(dir) / STATE_FILE).read_text())
        c = cls(
            dir,
            head_ip=state["head_ip"],
            worker_ip=state["worker_ip"],
            cpus_per_node=state["cpus_per_node"],
            port=state["port"],
            dashboard_port=state["dashboard_port"],
            auth=state["auth"],
            object_store_mb=state["object_store_mb"],
        )
        c.cluster_id, c.processes = state["cluster_id"], state["processes"]
        return c

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _write_token(path: Path) -> None:
        """A fresh 256-bit token, created 0600 from the start (never world-readable, not even briefly)."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))

    def _state(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "dir": str(self.dir),
            "head_ip": self.head_ip,
            "worker_ip": self.worker_ip,
            "cpus_per_node": self.cpus_per_node,
            "object_store_mb": self.object_store_mb,
            "port": self.port,
            "dashboard_port": self.dashboard_port,
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "auth": self.auth,
            "token_path": str(self.token_path) if self.token_path else None,
            "temp_dirs": [str(self.dir / "head"), str(self.dir / "worker")],
            "env": self.env,
            "processes": self.processes,
        }

    def _write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        tmp.replace(self.state_path)

    def _node_env(self) -> dict[str, str]:
        """The caller's env minus stray Ray settings, plus auth, the marker and this interpreter's bin dir on PATH.

        PATH matters for jobs: an entrypoint ``python ...`` otherwise finds a Python without Ray.
        """
        env = {k: v for k, v in os.environ.items() if k not in _NODE_ENV_DROP}
        env.update({k: v for k, v in self.env.items() if k.startswith("RAY_AUTH") or k == "RAY_USAGE_STATS_ENABLED"})
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env[MARKER] = self.cluster_id
        return env

    def _common_args(self) -> list[str]:
        return [
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            "--min-worker-port=0",  # 0/0: workers bind OS-chosen ports instead of sharing Ray's fixed 10002-19999
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]

    def _worker_args(self) -> list[str]:
        """``ray start`` arguments of the worker node; fresh free agent ports on every (re)start.

        Given ports, the raylet need not wait for its agents to write theirs to files: under load the dashboard
        agent's imports outlast that wait (~17 s), and the raylet aborts ("Timed out waiting for file
        .../metrics_agent_port_<node>").
        """
        listen, grpc, metrics, runtime_env = free_ports(4)
        return [
            f"--address={self.address}",
            f"--node-ip-address={self.worker_ip}",
            f"--dashboard-agent-listen-port={listen}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--temp-dir={self.dir / 'worker'}",
            *self._common_args(),
        ]

    def _ray_start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Launch ``ray start`` in its own session (a Ctrl-C in the caller's terminal does not reach the cluster)."""
        with (self.dir / f"{name}.log").open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", *args],
                env=self._node_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _check_started(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait for ``ray start`` to return; raise with the end of its log if it failed or hung."""
        try:
            rc = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc != 0:
            log = self.dir / f"{name}.log"
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"`ray start` for the {name} node exited {rc}; end of {log}:\n{tail}")

    def _wait_for_gcs(self, head: subprocess.Popen[bytes]) -> None:
        """Until the head's GCS port accepts connections (or its ``ray start`` ends, e.g. on an error)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection((self.head_ip, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)

    def _nodes(self) -> list[dict[str, Any]]:
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes", headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def _wait_for_nodes(self, n: int, exact: bool = False) -> None:
        """Until GCS reports at least ``n`` (``exact``: exactly ``n``) alive nodes."""
        deadline = time.monotonic() + self.timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                alive = [x for x in self._nodes() if x["state"] == "ALIVE"]
                if len(alive) == n or (len(alive) > n and not exact):
                    return
                last = f"{len(alive)} alive node(s)"
            except (OSError, ValueError, KeyError) as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"cluster did not reach {n} alive nodes within {self.timeout_s}s (last: {last})")


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in [
        ("start", "start head + worker node, wait for both, write DIR/cluster.json"),
        ("stop", "kill exactly this cluster's processes, remove the state"),
        ("status", "print the state, live PIDs and nodes as JSON (exit 1 unless 2 nodes are alive)"),
        ("env", 'print `export` lines for a client shell: eval "$(python cluster/local_cluster.py env)"'),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state, token, logs (default {DEFAULT_DIR})")
        if name == "start":
            p.add_argument("--head-ip", default="127.0.0.2")
            p.add_argument("--worker-ip", default="127.0.0.3")
            p.add_argument("--cpus-per-node", type=int, default=1)
            p.add_argument("--port", type=int, help="GCS port (default: a free one)")
            p.add_argument("--dashboard-port", type=int, help="dashboard / Jobs API port on 127.0.0.1 (default: free)")
            p.add_argument("--auth", choices=["token", "disabled"], default="token")
            p.add_argument("--object-store-mb", type=int, default=256)
            p.add_argument("--timeout", type=float, default=120.0, help="seconds for each start step")
        if name == "stop":
            p.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL")
    args = ap.parse_args(argv)

    if args.cmd == "start":
        c = LocalCluster(
            args.dir,
            head_ip=args.head_ip,
            worker_ip=args.worker_ip,
            cpus_per_node=args.cpus_per_node,
            port=args.port,
            dashboard_port=args.dashboard_port,
            auth=args.auth,
            object_store_mb=args.object_store_mb,
            timeout_s=args.timeout,
        )
        try:
            c.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"Ray cluster up: GCS {c.address}, dashboard {c.dashboard_url}, {len(c.pids)} processes")
        print(f"state: {c.state_path}\nclient environment:\n{_exports(c.env)}")
        return 0
    if not (args.dir / STATE_FILE).exists():
        print(f"no cluster recorded in {args.dir}", file=sys.stderr)
        return 0 if args.cmd == "stop" else 1
    c = LocalCluster.load(args.dir)
    if args.cmd == "stop":
        c.grace_s = args.grace
        print(f"stopped {len(c.stop())} processes")
        return 0
    if args.cmd == "env":
        print(_exports(c.env))
        return 0
    st = c.status()
    print(json.dumps(st, indent=2))
    return 0 if sum(n.get("state") == "ALIVE" for n in st["nodes"]) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
