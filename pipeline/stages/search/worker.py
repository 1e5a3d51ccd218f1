"""One search as a Ray Train worker group: DDP over the supernets' weights, explicit averaging of
architecture gradients, sharded streaming input, a checkpoint of the whole search per epoch.

The Ray touch points are the numbered blocks of ``search_worker``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dcpnas.checkpoint import load_checkpoint, save_checkpoint
from dcpnas.search import DCPNASSearch, DivergedError
from pipeline import tracking
from pipeline.config import Config
from pipeline.data.search_data import StreamSearchData
from pipeline.data.splits import SearchSplit
from pipeline.errors import UserError
from pipeline.progress.board import Ticking, phase_steps, search_position
from pipeline.runtime.collectives import all_reduce_mean, worker_device
from pipeline.runtime.gpu_memory import first_step_fits
from pipeline.runtime.trainer import Workers, fit_workers
from pipeline.tracking import TrackingContext
from pipeline.tracking.dashboard import system_metrics

CHECKPOINT_FILE = "search.pt"
ALPHA_HISTORY_FILE = "alpha_history.pt"  # only with tracking: the alphas of every epoch, for the history plot


@dataclass(frozen=True)
class SearchTask:
    """What every rank of one search gets: the resolved config, the split, where rank 0 logs (or None)."""

    config: dict[str, Any]
    split_uri: str
    tracking: TrackingContext | None = None
    run_id: str | None = None


def ddp(module: nn.Module) -> nn.Module:
    """DDP for weight steps; ``alpha`` (used detached there) is averaged explicitly in architecture steps.

    ``alpha`` is kept out of DDP's reducer by building DDP while it does not require a gradient (DDP
    registers only parameters that do), so no ``find_unused_parameters`` graph walk per iteration.
    DDP's ignore list (``_set_params_and_buffers_to_ignore_for_model``) fails its second iteration
    under torch 2.13.
    """
    alpha = module.get_parameter("alpha")
    alpha.requires_grad_(False)
    try:
        return nn.parallel.DistributedDataParallel(module)
    finally:
        alpha.requires_grad_(True)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def search_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: one DDP rank of one DCP-NAS search (``loop_config["task"]``, a :class:`SearchTask`).

    With ``task.tracking`` and ``task.run_id`` rank 0 logs every epoch and the final genotype into that
    MLflow run and finishes it; a divergence stops all ranks together, marks the run FAILED and ends the
    worker normally (so neither Ray Train nor Tune retries a deterministic failure).
    """
    import ray.train

    task: SearchTask = loop_config["task"]
    cfg = Config.model_validate(task.config)
    torch.set_num_threads(max(cfg.threads, 1))
    # 1. context: this rank and the world
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1
    tracking_ctx, run_id = task.tracking, task.run_id
    tracked = tracking_ctx is not None and run_id is not None
    logs = tracked and rank == 0  # one writer per run
    device = worker_device()
    # 2. data: each rank streams its own slice of the shards
    data = StreamSearchData.open(cfg, SearchSplit.load(task.split_uri), rank, world, device)
    # 3. model: both supernets on this rank's device, DDP for weight steps, explicit mean for architecture terms
    search = DCPNASSearch(
        cfg.search_config(),
        wrap=ddp if distributed else None,
        reduce_mean=all_reduce_mean if distributed else None,
        device=device,
    )
    steps, epochs = phase_steps(data), cfg.search.epochs

    def tick(epoch: int, phase: str, step: int) -> None:  # 4. report progress within an epoch (no checkpoint)
        ray.train.report(search_position(epoch, epochs, steps, phase, step))

    alpha_history: list[Tensor] = []
    logged = tracking.logged_steps(tracking_ctx, run_id, "epoch") if logs else set()
    checkpoint = ray.train.get_checkpoint()  # 5. resume from the last reported checkpoint, if any
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            search.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE))
            if tracked and (Path(d) / ALPHA_HISTORY_FILE).exists():
                alpha_history = list(torch.load(Path(d) / ALPHA_HISTORY_FILE, weights_only=True))

    def on_epoch_end(s: DCPNASSearch, metrics: dict[str, Any]) -> None:
        # 6. report the epoch: metrics from every rank, the checkpoint from rank 0 (states are identical)
        hashes = [None] * world
        if distributed:
            dist.all_gather_object(hashes, metrics["genotype_hash"])
        agree = not distributed or len(set(hashes)) == 1
        payload = {**numeric(metrics), "genotype_hash": metrics["genotype_hash"], "ranks_agree": agree}
        progress = search_position(int(metrics["epoch"]), epochs, steps, "child", steps)
        if tracked:
            alpha_history.append(s.child.alpha.detach().to("cpu", copy=True))
        if logs and int(metrics["epoch"]) not in logged:
            tracking.log_epoch(tracking_ctx, run_id, payload, step=int(metrics["epoch"]))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(s.state_dict(), Path(tmp) / CHECKPOINT_FILE)
                s.genotype().save(Path(tmp) / "genotype.json")
                if tracked:
                    torch.save(torch.stack(alpha_history), Path(tmp) / ALPHA_HISTORY_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(payload | progress, checkpoint=ckpt)
        if not agree:
            raise RuntimeError(f"ranks derived different genotypes at epoch {metrics['epoch']}: {hashes}")

    first = search.global_step
    try:
        with (
            first_step_fits(device, cfg.data.batch_size // world, lambda: search.global_step == first),
            system_metrics(tracking_ctx.uri if logs else "", run_id if logs else None),
        ):
            genotype = search.run(Ticking(data, steps, tick), on_epoch_end=on_epoch_end)
    except (DivergedError, UserError) as e:  # deterministic: divergence (every rank, same step) or no memory
        diverged = isinstance(e, DivergedError)
        reason = f"diverged: {e}" if diverged else str(e)
        if logs:
            tracking.finish_run(tracking_ctx, run_id, "FAILED", reason=reason)
        # 7. report a deterministic failure as a result, so no restart repeats it
        ray.train.report({"diverged": diverged, "failure_reason": reason, "epoch": search.epoch})
        return
    if logs:
        alpha = search.child.alpha.detach().cpu()
        tracking.log_genotype(
            tracking_ctx, run_id, genotype, alpha=alpha, alpha_history=alpha_history or None, space=search.space
        )
        tracking.log_parent_genotype(tracking_ctx, run_id, search.parent_genotype())
        tracking.finish_run(tracking_ctx, run_id, "FINISHED")


def fit_search(
    cfg: Config,
    split_uri: str,
    storage_path: str,
    name: str,
    workers: Workers,
    max_failures: int = 2,
    *,
    tracking: TrackingContext | None = None,
    run_id: str | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run (or resume, same ``name`` + ``storage_path``) one search on ``workers``; returns the Ray Train result.

    ``tracking`` + ``run_id``: rank 0 logs into that MLflow run (see ``search_worker``). ``callbacks``: Ray
    Train callbacks, e.g. ``TuneReportCallback`` in a sweep.
    """
    task = SearchTask(cfg.resolved(), split_uri, tracking, run_id)
    return fit_workers(
        search_worker, {"task": task}, workers, name=name, storage_path=storage_path, max_failures=max_failures,
        callbacks=callbacks,
    )  # fmt: skip
