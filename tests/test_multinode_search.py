"""One search on the 2-node loopback cluster: the DDP ranks spread over both nodes, and a search whose worker node
dies after the first epoch checkpoint resumes from it once the node is back and ends with the uninterrupted run's
genotype (CPU, fixed seed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from local_cluster import LocalCluster  # cluster/local_cluster.py, loaded by conftest's `lc` fixture

    from pipeline.config import Config

pytestmark = [pytest.mark.ray, pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("loopback-cluster")]
ROOT = Path(__file__).resolve().parents[1]

# The search's driver, run as its own process with the cluster's client env (token auth is read at start-up).
# The callback runs in the Train controller (pinned to the driver's node, the head): it appends every report and
# every worker failure to an events file, which the test polls to time the kill and reads to check the resume.
DRIVER = """
import hashlib, json, sys, time
import ray
from ray.train import UserCallback
from ray.util.state import list_actors

from dcpnas.checkpoint import load_checkpoint
from pipeline.config import Config
from pipeline.runtime.trainer import Workers
from pipeline.stages.search.worker import CHECKPOINT_FILE, fit_search

args = json.loads(sys.argv[1])


class Events(UserCallback):
    def __init__(self, path):
        self.path = path

    def _write(self, event):
        with open(self.path, "a") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\\n")

    def after_report(self, run_context, metrics, checkpoint):
        self._write({"epochs": [m.get("epoch") for m in metrics], "checkpoint": checkpoint is not None})

    def after_exception(self, run_context, worker_exceptions):
        self._write({"failed_ranks": sorted(worker_exceptions)})


ray.init(_node_ip_address=args["head_ip"], log_to_driver=False)  # the driver (and so the controller) on the head
result = fit_search(
    Config.model_validate(args["config"]), args["split_uri"], args["storage"], args["name"],
    Workers(2, 1.0), max_failures=2, callbacks=[Events(args["events"])],
)
node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
job = ray.get_runtime_context().get_job_id()
workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job)], limit=100)
with result.checkpoint.as_directory() as d:
    alpha = load_checkpoint(f"{d}/{CHECKPOINT_FILE}")["child"]["alpha"]
print("RESULT " + json.dumps({
    "alpha_sha256": hashlib.sha256(alpha.numpy().tobytes()).hexdigest(),
    "error": None if result.error is None else str(result.error),
    "metrics": result.metrics,
    "worker_ips": sorted(node_ip[w.node_id] for w in workers),
}))
"""


def start_driver(c: LocalCluster, cfg_tree: dict, split_uri: str, storage: Path, name: str) -> subprocess.Popen:
    events = storage / f"{name}.events.jsonl"
    args = {
        "config": cfg_tree,
        "split_uri": split_uri,
        "storage": str(storage),
        "name": name,
        "events": str(events),
        "head_ip": c.head_ip,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | c.env
    # a restarted worker group waits for the worker node to come back: allow it longer than the 60 s default
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "300"
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(driver: subprocess.Popen, timeout: float = 300) -> dict:
    out, _ = driver.communicate(timeout=timeout)
    assert driver.returncode == 0, out[-4000:]
    line = next(x for x in reversed(out.splitlines()) if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def read_events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_search_spans_both_nodes_and_resumes_after_the_worker_node_dies(
    loopback_cluster: LocalCluster,
    digits_shards: str,
    stage_config: Callable[..., Config],
    tmp_path: Path,
) -> None:
    from dcpnas.search import DCPNASSearch
    from pipeline.config import Config
    from pipeline.data.search_data import make_split

    # 2 epochs: a warm-up epoch (weights only), the crash, then an epoch with architecture steps; 2 batches a phase
    tree = stage_config(digits_shards, tmp_path, epochs=2, warmup_epochs=1).resolved()
    tree["data"].update(weight_fraction=0.05, arch_fraction=0.05)
    cfg = Config.model_validate(tree)
    split_uri = str(tmp_path / "split.json")
    make_split(cfg).save(split_uri)
    storage = tmp_path / "ray"

    # 1. uninterrupted: one DDP rank per node (1 CPU each), all epochs, ranks agree
    t0 = time.monotonic()
    clean = finish(start_driver(loopback_cluster, cfg.resolved(), split_uri, storage, "clean"))
    print(f"uninterrupted 2-node search: {time.monotonic() - t0:.1f} s")
    assert clean["error"] is None
    assert clean["metrics"]["epoch"] == 1 and clean["metrics"]["ranks_agree"] is True
    assert clean["worker_ips"] == [loopback_cluster.head_ip, loopback_cluster.worker_ip]
    # epoch reports carry a checkpoint; the within-epoch progress reports in between do not
    assert [e["epochs"] for e in read_events(storage / "clean.events.jsonl") if e.get("checkpoint")] == [[0, 0], [1, 1]]

    # 2. the worker node dies once the first epoch checkpoint is persisted, and comes back
    t0 = time.monotonic()
    driver = start_driver(loopback_cluster, cfg.resolved(), split_uri, storage, "killed")
    events_path = storage / "killed.events.jsonl"
    try:
        while not any(e.get("checkpoint") for e in read_events(events_path)):
            assert driver.poll() is None, driver.communicate()[0][-4000:]
            assert time.monotonic() - t0 < 240, "no checkpoint reported"
            time.sleep(0.2)
        killed = loopback_cluster.kill_worker_node()
        reported_before_kill = [e["epochs"] for e in read_events(events_path) if e.get("checkpoint")]
        assert killed and reported_before_kill == [[0, 0]], "the kill came later than intended"
        loopback_cluster.restart_worker_node()
        resumed = finish(driver)
    finally:
        if driver.poll() is None:
            driver.kill()
    print(f"search with a worker-node crash: {time.monotonic() - t0:.1f} s, killed {len(killed)} processes")

    assert resumed["error"] is None
    events = read_events(events_path)
    epochs = [e["epochs"] for e in events if e.get("checkpoint")]
    # each epoch reported once: the restarted workers continued from the checkpoint instead of starting at epoch 0
    assert epochs == [[0, 0], [1, 1]], events
    failed_at = next(i for i, e in enumerate(events) if "failed_ranks" in e)
    assert 0 < failed_at < len(events) - 1, events  # the failure fell between the first and the last report
    # two worker groups (before and after the crash), each spread over both nodes
    assert resumed["worker_ips"] == [loopback_cluster.head_ip] * 2 + [loopback_cluster.worker_ip] * 2
    assert resumed["metrics"]["epoch"] == 1 and resumed["metrics"]["ranks_agree"] is True
    assert resumed["metrics"]["genotype_hash"] == clean["metrics"]["genotype_hash"]
    # bitwise-equal final alphas, and they did move in the architecture epoch (the equality is not trivial)
    assert resumed["alpha_sha256"] == clean["alpha_sha256"]
    initial = DCPNASSearch(cfg.search_config()).child.alpha.detach()
    assert clean["alpha_sha256"] != hashlib.sha256(initial.numpy().tobytes()).hexdigest()
