"""Stages wait for an autoscaler to add the nodes they need (scale_up_wait_s) instead of failing at once."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.runtime.resources import cluster_resources, fits, total
from pipeline.stages.retrain.plan import check_resources, worker_bundles
from pipeline.stages.search.sweep import plan, trial_bundles


def test_bundles_are_what_the_checks_count() -> None:
    cfg = load_config(None, ["sweep.workers=2", "sweep.cpus_per_worker=4", "sweep.gpus_per_worker=1"])
    assert trial_bundles(cfg.sweep) == [{"CPU": 0.5}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert total(trial_bundles(cfg.sweep)) == {"CPU": 8.5, "GPU": 2.0}
    assert fits(trial_bundles(cfg.sweep), {"CPU": 8.5, "GPU": 2.0})
    assert not fits(trial_bundles(cfg.sweep), {"CPU": 100.0})  # the autoscaled GPU nodes are not up yet
    with pytest.raises(UserError, match="the cluster has 100 CPUs and 0 GPUs: it can never run"):
        plan(cfg, {"CPU": 100.0})
    r = load_config(None, ["retrain.workers=2", "retrain.batch_size=64", "retrain.gpus_per_worker=1"])
    assert total(worker_bundles(r)) == {"CPU": 2.0, "GPU": 2.0}
    with pytest.raises(UserError, match="scale_up_wait_s: Input should be greater than or equal to 0"):
        load_config(None, ["scale_up_wait_s=-1"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_stage_waits_for_new_nodes_and_fails_with_the_numbers_when_none_come() -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(None, ["retrain.workers=2", "retrain.batch_size=64", "retrain.cpus_per_worker=1"])
        bundles = worker_bundles(cfg)
        lines: list[str] = []
        # No wait: the check fails at once, naming what is missing.
        with pytest.raises(UserError, match=r"retrain needs 2 CPU .* but the cluster has 1"):
            check_resources(cfg, cluster_resources(bundles, 0.0, lines.append))
        assert lines == []
        # Nobody adds a node: the wait ends at its limit and the check fails the same way.
        t0 = time.monotonic()
        with pytest.raises(UserError, match="but the cluster has 1"):
            check_resources(cfg, cluster_resources(bundles, 2.0, lines.append, poll_s=0.5))
        assert 2.0 <= time.monotonic() - t0 < 20
        assert "asking the autoscaler for 2 CPU, waiting up to 2 s" in lines[0]
        # A node joins while the stage waits (what the autoscaler does): the check passes without using the limit.
        # (The stage waits on a thread: Ray starts nodes from the main thread only.)
        result: dict[str, float] = {}
        t0 = time.monotonic()
        waiter = threading.Thread(target=lambda: result.update(cluster_resources(bundles, 120.0, lines.append, 0.5)))
        waiter.start()
        time.sleep(1.0)
        cluster.add_node(num_cpus=2)
        waiter.join(timeout=120)
        check_resources(cfg, result)
        assert result["CPU"] == 3 and time.monotonic() - t0 < 60
        assert lines[-1] == "the cluster has 3 CPUs and 0 GPUs"
    finally:
        ray.shutdown()
        cluster.shutdown()
