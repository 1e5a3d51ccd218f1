"""The Ray session of a command: the one place that knows local Ray from a cluster.

A stage or job never calls ``ray.init`` itself: it runs inside :func:`ray_session`, which joins the Ray
this process already holds (a bench or a driver that started one for several commands), or
``RAY_ADDRESS`` (a cluster, ``dcpnas submit``), or starts a local Ray sized by ``sweep.num_cpus``, and
stops only what it started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.runtime.trainer import LOCAL_RAY_ENV


def check_ray_address() -> None:
    """An unreachable ``RAY_ADDRESS`` fails in seconds with the address, not after Ray's long retries."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or address == "auto" or ("://" in address and not address.startswith("ray://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise UserError(
            f"RAY_ADDRESS={address} is not reachable ({e}): start the cluster or unset RAY_ADDRESS"
        ) from None


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Ray for the body of the ``with``: the running one, ``RAY_ADDRESS``, or a local Ray (stopped after)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address := os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
    else:
        # No node of a local Ray can be preempted: Ray Train's preemption watcher would be one more actor
        # process per fit. The local raylet hands the setting to every process that calls fit() (docs/stack.md §2.6).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ[LOCAL_RAY_ENV] = "1"  # fit_workers leaves out the placement-group cleaner
        ray.init(
            num_cpus=cfg.sweep.num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.pop(LOCAL_RAY_ENV, None)


def planned_resources(cfg: Config) -> dict[str, float]:
    """What a dry run plans for: the running cluster at ``RAY_ADDRESS``, else this machine (starts no Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        with ray_session(cfg):
            return dict(ray.cluster_resources())
    return {"CPU": float(cfg.sweep.num_cpus or os.cpu_count() or 1), "GPU": 0.0}


def storage_path(cfg: Config) -> str:
    """Where Ray Train and Tune keep checkpoints and experiment state (shared storage on a cluster)."""
    return cfg.sweep.storage_path or str((cfg.run_dir() / "ray").resolve())
