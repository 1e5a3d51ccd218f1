"""The one TorchTrainer of the pipeline: a search trial and a retrain step are both a group of DDP
workers that report checkpoints and restart from the last one on failure."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Ray Train's controller takes one report per worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s)
# and a worker's report blocks while its previous one waits (a queue of one): reports closer than that stall
# training. Measured on 2 cores: a 6-step retrain epoch took 10 s at 2 s and 1 s at 0.2 s (docs/stack.md §2.5).
POLL_INTERVAL_S = "0.25"
# Set by ``ray_session`` before it starts a local Ray (inherited by every process of that Ray): such a Ray
# ends with its driver, placement groups included.
LOCAL_RAY_ENV = "DCPNAS_LOCAL_RAY"


@dataclass(frozen=True)
class Workers:
    """The worker group of one fit: ranks and what each reserves (``gpus`` 0: CPU ranks over gloo)."""

    count: int
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def bundle(self) -> dict[str, float]:
        """One rank's request as Ray Train takes it (no GPU key for CPU ranks)."""
        return {"CPU": self.cpus} | ({"GPU": self.gpus} if self.gpus > 0 else {})

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Every rank's request as the resource checks count it (CPU and GPU always named)."""
        return [{"CPU": self.cpus, "GPU": self.gpus}] * self.count


def fit_workers(
    worker: Callable[[Any], None],
    task: Any,
    workers: Workers,
    *,
    name: str,
    storage_path: str,
    max_failures: int,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run (or resume: the same ``name`` + ``storage_path``) ``worker(task)`` on every rank; returns the
    Ray Train result. ``callbacks``: Ray Train callbacks (progress, Tune reporting).

    Ray Train hands the poll interval from this process's environment to its controller and workers; a
    value the user exported wins."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)
    use_gpu = workers.gpus > 0
    trainer = lean_trainer(os.environ.get(LOCAL_RAY_ENV) == "1")(
        worker,
        train_loop_config=task,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=use_gpu, resources_per_worker=workers.bundle),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks) or None,
        ),
    )
    return trainer.fit()


@lru_cache
def lean_trainer(local: bool) -> type:
    """``TorchTrainer`` without the helper actors our fits never use, each a Python process of ~2 s CPU per
    fit (docs/stack.md §2.7): Ray Data's shard manager (no Ray Dataset is ever passed) and, on a local Ray,
    the placement-group cleaner (a local Ray ends with its driver). Ray Train 2.55-2.60 builds both in
    ``_create_default_callbacks``; ``tests/test_trainer.py`` fails if a Ray upgrade renames them."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if local else (DatasetsCallback,)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return LeanTorchTrainer
