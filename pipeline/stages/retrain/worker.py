"""One retrain step as a Ray Train worker group: the step's network (initialised from the previous step's
model file), KD from the teacher's model file, the DeepSpeed or DDP engine, a checkpoint per epoch.

The Ray touch points are the numbered blocks of ``retrain_worker``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.binary import reconstruction_loss
from dcpnas.genotype import Genotype
from dcpnas.losses import soft_target_ce
from dcpnas.network import inherit_weights, model_file, network_from_file
from pipeline import tracking
from pipeline.config import Config
from pipeline.data.streams import device_batches, held_out_stream, train_stream
from pipeline.models import MODEL_FILE, build_network, check_classes, evaluate, read_model
from pipeline.progress.board import every, position
from pipeline.runtime.collectives import all_reduce_sum, worker_device
from pipeline.runtime.trainer import fit_workers
from pipeline.stages.retrain.engines import DDPEngine, DeepSpeedEngine
from pipeline.stages.retrain.plan import Step, cosine_lr, retrain_workers, use_bf16
from pipeline.tracking import TrackingContext
from pipeline.tracking.dashboard import system_metrics


@dataclass(frozen=True)
class ModelRef:
    """A model file a step reads (the previous step's model, the teacher), checked against its hash."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class RetrainTask:
    """What every rank of one retrain step gets. ``stop_after``: epochs to run in this attempt (tests resume)."""

    config: dict[str, Any]
    step: Step
    genotype: dict[str, Any]
    num_classes: int
    init: ModelRef | None = None
    teacher: ModelRef | None = None
    tracking: TrackingContext | None = None
    run_id: str | None = None
    stop_after: int | None = None


def distill_loss(
    logits: Tensor, y: Tensor, teacher_probs: Tensor | None, label_weight: float, model: nn.Module, mu: float
) -> Tensor:
    logits = logits.float()
    loss = F.cross_entropy(logits, y) if teacher_probs is None else soft_target_ce(logits, teacher_probs)
    if teacher_probs is not None and label_weight:
        loss = loss + label_weight * F.cross_entropy(logits, y)
    return loss + mu * reconstruction_loss(model) if mu else loss


def retrain_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: one rank of one retrain step (``loop_config["task"]``, a :class:`RetrainTask`)."""
    import ray.train

    task: RetrainTask = loop_config["task"]
    cfg, step = Config.model_validate(task.config), task.step
    torch.set_num_threads(max(cfg.threads, 1))
    # 1. context: this rank and the world
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    logs = task.tracking is not None and task.run_id is not None and rank == 0
    # 2. data: each rank streams its own slice of the shards
    train = train_stream(cfg, rank, world)
    held_out = held_out_stream(cfg, cfg.retrain.batch_size // world, rank, world)
    # 3. model: the step's network, initialised from the previous step's artifact; the engine
    torch.manual_seed(cfg.retrain.seed)
    model = build_network(cfg, Genotype.from_dict(task.genotype), step.stage, task.num_classes)
    if task.init:
        inherit_weights(model, read_model(task.init.uri, task.init.sha256)["state_dict"])
    model.to(device)
    teacher = None
    if step.distill:
        content = read_model(task.teacher.uri, task.teacher.sha256)
        check_classes(content, task.num_classes, f"teacher {task.teacher.uri}")
        teacher = network_from_file(content).to(device).eval().requires_grad_(False)
    bf16 = use_bf16(cfg.retrain.bf16, device.type == "cuda")
    micro = cfg.retrain.batch_size // world
    engine = (
        DeepSpeedEngine(model, cfg, step, micro, bf16)
        if cfg.retrain.engine == "deepspeed"
        else DDPEngine(model, step, device, bf16)
    )
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()  # 4. resume from the last reported checkpoint, if any
    if task.init and checkpoint is None:  # how much of the previous step survives this stage (all ranks)
        init_top1 = evaluate(engine.module, device_batches(cfg, held_out, device), device)["top1"]
        if logs and not tracking.logged_steps(task.tracking, task.run_id, f"{step.name}/init_top1"):
            tracking.log_epoch(task.tracking, task.run_id, {f"{step.name}/init_top1": init_top1}, step=0)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = engine.load(d)
        start, history = int(state["epoch"]) + 1, list(state["history"])
    mu = cfg.retrain.reconstruction_weight if step.stage == "binary_all" else 0.0
    logged = tracking.logged_steps(task.tracking, task.run_id, f"{step.name}/epoch_seconds") if logs else set()
    stop_at = start + task.stop_after if task.stop_after else step.epochs
    steps, units = len(train), len(train) * step.epochs

    with system_metrics(task.tracking.uri if logs else "", task.run_id if logs else None):
        for epoch in range(start, min(step.epochs, stop_at)):
            lr = cosine_lr(step.lr, cfg.retrain.min_lr, epoch, step.epochs)
            engine.set_lr(lr)
            train.set_epoch(epoch)
            torch.manual_seed(cfg.retrain.seed * 1000 + epoch)
            t0, losses, seen = time.perf_counter(), [], 0
            for i, (x, y) in enumerate(device_batches(cfg, train, device)):
                if i and i % every(steps) == 0:  # 5. report progress within an epoch (no checkpoint), all ranks
                    ray.train.report(position(epoch, step.epochs, epoch * steps + i, units, step.name, i, steps))
                probs = None
                if teacher is not None:
                    with torch.no_grad():
                        probs = torch.softmax(teacher(x).float(), dim=-1)
                loss = distill_loss(engine(x), y, probs, cfg.retrain.label_weight, engine.module, mu)
                engine.backward_step(loss)
                losses.append(loss.item())
                seen += len(y)
            seconds = time.perf_counter() - t0
            metrics = {
                f"{step.name}/{k}": v
                for k, v in evaluate(engine.module, device_batches(cfg, held_out, device), device).items()
            }
            mean_loss = all_reduce_sum(torch.tensor([sum(losses), len(losses), seen], dtype=torch.float64))
            metrics.update(
                {
                    "epoch": epoch,
                    f"{step.name}/loss": mean_loss[0].item() / max(mean_loss[1].item(), 1),
                    f"{step.name}/lr": lr,
                    f"{step.name}/images_per_s": mean_loss[2].item() / seconds,
                    f"{step.name}/epoch_seconds": seconds,
                }
            )
            before = history[-1][f"{step.name}/train_seconds"] if history else 0.0
            metrics[f"{step.name}/train_seconds"] = before + seconds
            history.append(metrics)
            if logs and epoch not in logged:  # an epoch re-run after a restart is logged once
                tracking.log_epoch(task.tracking, task.run_id, metrics, step=epoch)
            # 6. report the epoch: metrics and a checkpoint with every rank's state (DeepSpeed: one ZeRO shard per rank)
            with tempfile.TemporaryDirectory() as tmp:
                engine.save(tmp, {"epoch": epoch, "history": history})
                if rank == 0:
                    torch.save(model_file(engine.module), Path(tmp) / MODEL_FILE)
                progress = position(epoch, step.epochs, (epoch + 1) * steps, units, step.name, steps, steps)
                ray.train.report(
                    {**metrics, "step_losses": losses, **progress}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                )


def fit_step(
    cfg: Config,
    step: Step,
    genotype: Genotype,
    num_classes: int,
    storage_path: str,
    name: str,
    *,
    init: ModelRef | None = None,
    teacher: ModelRef | None = None,
    tracking: TrackingContext | None = None,
    run_id: str | None = None,
    stop_after: int | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run (or resume: same ``name`` + ``storage_path``) one step; returns the Ray Train result.
    ``callbacks``: Ray Train callbacks, e.g. :func:`pipeline.progress.tune.train_progress`'s."""
    r = cfg.retrain
    task = RetrainTask(
        cfg.resolved(), step, genotype.to_dict(), num_classes, init, teacher, tracking, run_id, stop_after
    )
    return fit_workers(
        retrain_worker, {"task": task}, retrain_workers(cfg), name=name,
        storage_path=storage_path, max_failures=0 if stop_after else r.max_failures, callbacks=callbacks,
    )  # fmt: skip
