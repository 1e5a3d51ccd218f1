"""What the cluster can give a stage: its resources now or, on an autoscaling cluster, once the autoscaler
has added the nodes the stage asked for.

Stages check that their workers can ever be scheduled before anything starts (Ray would otherwise wait
forever). On a cluster that autoscales GPU nodes from zero that check used to fail at once ("the cluster
has 0 GPUs"); with ``scale_up_wait_s`` > 0 the stage first asks the autoscaler for its bundles
(``ray.autoscaler.sdk.request_resources``, Ray's public API for this), waits until they fit, and withdraws
the request, so it never keeps idle nodes alive: from then on the scheduled work itself holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

Bundle = dict[str, float]
EPS = 1e-9


def total(bundles: Sequence[Bundle]) -> Bundle:
    out: Bundle = {}
    for b in bundles:
        for kind, amount in b.items():
            out[kind] = out.get(kind, 0.0) + amount
    return out


def fits(bundles: Sequence[Bundle], resources: Bundle) -> bool:
    """Whether the cluster's totals cover the bundles' (the per-resource test the stages' checks apply)."""
    return all(amount <= float(resources.get(kind, 0.0)) + EPS for kind, amount in total(bundles).items())


def cluster_resources(
    bundles: Sequence[Bundle], scale_up_wait_s: float = 0.0, log: Callable[[str], None] = print, poll_s: float = 5.0
) -> Bundle:
    """``ray.cluster_resources()``; when ``bundles`` do not fit and ``scale_up_wait_s`` > 0, first ask the
    autoscaler for them and wait up to that long. Returns what the cluster has at the end: the caller's
    check then passes, or fails naming the numbers."""
    import ray

    have = dict(ray.cluster_resources())
    if scale_up_wait_s <= 0 or fits(bundles, have):
        return have
    from ray.autoscaler.sdk import request_resources

    need = ", ".join(f"{v:g} {k}" for k, v in total(bundles).items() if v)
    log(f"the cluster has {_describe(have)}; asking the autoscaler for {need}, waiting up to {scale_up_wait_s:g} s")
    request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in bundles])
    deadline = time.monotonic() + scale_up_wait_s
    try:
        while not fits(bundles, have) and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
            have = dict(ray.cluster_resources())
    finally:
        request_resources(bundles=[])  # withdraw: a standing request would keep idle nodes up
    log(f"the cluster has {_describe(have)}")
    return have


def _describe(resources: Bundle) -> str:
    return f"{resources.get('CPU', 0.0):g} CPUs and {resources.get('GPU', 0.0):g} GPUs"
