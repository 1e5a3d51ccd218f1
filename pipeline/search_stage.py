"""One search as a Ray Train ``TorchTrainer``: DDP over the supernets' weights, explicit averaging
of architecture gradients, sharded streaming input, a checkpoint of the whole search per epoch.

The Ray touch points are the numbered blocks in ``search_worker`` and ``fit_search``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dcpnas.checkpoint import load_checkpoint, save_checkpoint
from dcpnas.search import PHASES, Batch, DCPNASSearch, DivergedError, pair_indices
from pipeline.collectives import all_reduce_mean, worker_device
from pipeline.config import Config
from pipeline.data.shards import open_dataset
from pipeline.data.splits import SearchSplit, balanced_split
from pipeline.data.stream import ShardStream
from pipeline.data.transforms import EvalTransform, TrainTransform, on_device
from pipeline.errors import UserError
from pipeline.gpu_memory import first_step_fits

CHECKPOINT_FILE = "search.pt"
ALPHA_HISTORY_FILE = "alpha_history.pt"  # only with tracking: the alphas of every epoch, for the history plot


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


def make_split(cfg: Config) -> SearchSplit:
    """The class-balanced weights/arch split of the search data (identical for every trial)."""
    keys, labels = open_dataset(cfg.data.uri).index(cfg.data.split)
    d = cfg.data
    return balanced_split(
        list(keys), list(labels), {"weights": d.weight_fraction, "arch": d.arch_fraction}, d.split_seed, d.uri
    )


@dataclass
class StreamSearchData:
    """``SearchData`` over shard streams: paired weight/arch batches; the held-out split for evaluation."""

    weights: ShardStream
    arch: ShardStream
    held_out: ShardStream
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pairing: str = "cycle"

    @classmethod
    def open(
        cls, cfg: Config, split: SearchSplit, rank: int = 0, world_size: int = 1, device: torch.device | None = None
    ) -> StreamSearchData:
        """Workers ship uint8 images; they are normalised on ``device`` (default CPU) as they arrive."""
        d = cfg.data
        if d.batch_size % world_size:
            raise ValueError(
                f"data.batch_size {d.batch_size} is the global batch: it must divide by {world_size} workers"
            )
        device = device or torch.device("cpu")
        train = TrainTransform(d.image_size, scale=tuple(d.crop_scale), flip=d.flip, normalize=False)
        common = dict(
            batch_size=d.batch_size // world_size,
            rank=rank,
            world_size=world_size,
            num_workers=d.loader_workers,
            seed=cfg.search.seed,
            pin_memory=device.type == "cuda",
        )
        return cls(
            ShardStream(d.uri, d.split, transform=train, keys=split.parts["weights"], **common),
            ShardStream(d.uri, d.split, transform=train, keys=split.parts["arch"], **common),
            ShardStream(
                d.uri,
                d.eval_split,
                transform=EvalTransform(d.image_size, crop_fraction=1.0, normalize=False),
                shuffle=False,
                drop_last=False,
                **common,
            ),
            device,
            tuple(d.mean),
            tuple(d.std),
            cfg.search.pairing,
        )

    def batches(self, epoch: int, phase: str, start: int = 0) -> Iterator[tuple[Batch, Batch]]:
        # Each phase of each epoch reads its own order; equal batch counts on every rank (drop_last).
        # Pass p > 0 over the arch split (pairing "cycle") reads its own order, keyed p * 2**32 apart.
        key = 2 * epoch + PHASES.index(phase)
        self.weights.set_epoch(key)
        weights = on_device(self.weights, self.device, self.mean, self.std)
        arch: Iterator[Batch] = iter(())
        for i, j, rep in pair_indices(len(self.weights), len(self.arch), self.pairing):
            if j == 0:
                self.arch.set_epoch(key + (rep << 32))
                arch = on_device(self.arch, self.device, self.mean, self.std)
            pair = next(weights), next(arch)
            if i >= start:
                yield pair

    def eval_batches(self) -> Iterator[Batch]:
        # Unshuffled, so every epoch number reads the same order; a new one restarts after a bounded read.
        self.held_out.set_epoch(self.held_out.epoch + 1)
        yield from on_device(self.held_out, self.device, self.mean, self.std)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def search_worker(task: dict[str, Any]) -> None:
    """Ray Train worker: one DDP rank of one DCP-NAS search.

    ``task``: ``config`` (resolved), ``split_uri``; optionally ``tracking`` (a ``TrackingContext``)
    and ``run_id``: then rank 0 logs every epoch and the final genotype into that MLflow run and
    finishes it; a divergence stops all ranks together, marks the run FAILED and ends the worker
    normally (so neither Ray Train nor Tune retries a deterministic failure).
    """
    import ray.train

    from pipeline.dashboard import system_metrics
    from pipeline.progress import Ticking, phase_steps, search_position

    cfg = Config.model_validate(task["config"])
    torch.set_num_threads(max(cfg.threads, 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1
    tracking_ctx, run_id = task.get("tracking"), task.get("run_id")
    tracked = tracking_ctx is not None and run_id is not None
    logs = tracked and rank == 0  # one writer per run
    if logs:
        from pipeline import tracking

    device = worker_device()
    # 1. data: each rank streams its own slice of the shards
    data = StreamSearchData.open(cfg, SearchSplit.load(task["split_uri"]), rank, world, device)
    # 2. model: both supernets on this rank's device, DDP for weight steps, explicit mean for architecture terms
    search = DCPNASSearch(
        cfg.search_config(),
        wrap=ddp if distributed else None,
        reduce_mean=all_reduce_mean if distributed else None,
        device=device,
    )
    steps, epochs = phase_steps(data), cfg.search.epochs

    def tick(epoch: int, phase: str, step: int) -> None:  # within-epoch progress (no checkpoint)
        ray.train.report(search_position(epoch, epochs, steps, phase, step))

    alpha_history: list[Tensor] = []
    logged = tracking.logged_steps(tracking_ctx, run_id, "epoch") if logs else set()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            search.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE))
            if tracked and (Path(d) / ALPHA_HISTORY_FILE).exists():
                alpha_history = list(torch.load(Path(d) / ALPHA_HISTORY_FILE, weights_only=True))

    def on_epoch_end(s: DCPNASSearch, metrics: dict[str, Any]) -> None:
        # 3. report: metrics from every rank, the checkpoint from rank 0 (states are identical)
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
    workers: int,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    max_failures: int = 2,
    *,
    gpus_per_worker: float | None = None,
    tracking: Any = None,
    run_id: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run (or resume, same ``name`` + ``storage_path``) one search; returns the Ray Train result.

    ``tracking`` (a ``TrackingContext``) + ``run_id``: rank 0 logs into that MLflow run (see
    ``search_worker``). ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback`` in a sweep.
    ``gpus_per_worker``: fractional GPUs per rank when ``use_gpu`` (default 1).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
    # 4. fit: one worker per DDP rank; failures restart from the last reported checkpoint
    trainer = TorchTrainer(
        search_worker,
        train_loop_config={"config": cfg.resolved(), "split_uri": split_uri, "tracking": tracking, "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()
