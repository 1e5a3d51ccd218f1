"""Retraining: a genotype's discrete 1-bit network trained step by step on DeepSpeed (spec §9).

Steps run in order, each a Ray Train ``TorchTrainer``: ``teacher`` (the real-valued network, when the
config asks the pipeline to train one), then the binarisation stages of ``retrain.steps`` (the
published recipe: ``binary_act``, then ``binary_all`` initialised from it), with the soft-target KD
loss from the teacher. Each step's final model is an MLflow artifact with its sha256; the next step
and the teacher reader get it from there (hash checked), never from a path in source code.

The Ray touch points are the numbered blocks in ``retrain_worker`` and ``fit_step``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.binary import reconstruction_loss
from dcpnas.genotype import Genotype
from dcpnas.losses import soft_target_ce
from dcpnas.network import create_network, inherit_weights, model_file, network_from_file
from pipeline.collectives import all_reduce_sum, worker_device
from pipeline.config import Config, add_config_arguments
from pipeline.data.shards import open_dataset
from pipeline.data.stream import ShardStream
from pipeline.data.transforms import TrainTransform
from pipeline.errors import UserError
from pipeline.eval_stage import (
    FINAL_STEP_TAG,
    MODEL_FILE,
    SHA_TAG,
    check_classes,
    device_batches,
    evaluate,
    held_out_stream,
    image_size,
    read_model,
    sha256_file,
)
from pipeline.resources import EPS, cluster_resources, total

STATE_FILE = "ddp_state.pt"  # the plain-DDP engine's optimizer + weights (DeepSpeed writes its own layout)
DS_TAG = "state"  # not "latest": DeepSpeed writes a file of that name next to the tag directory


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One training run of the retrain stage."""

    name: str  # teacher | step1 | step2 ...
    stage: str  # binarisation stage of the network (dcpnas.binary.Binarize.stage)
    epochs: int
    lr: float
    weight_decay: float
    distill: bool  # KD from the teacher (else cross-entropy on labels)
    init_from: str | None  # the step whose model initialises this one


def plan_steps(cfg: Config) -> list[Step]:
    """The steps ``cfg.retrain`` asks for, in order."""
    r = cfg.retrain
    steps = []
    if r.teacher == "train":
        steps.append(Step("teacher", "real", r.teacher_epochs, r.teacher_lr, r.step_weight_decay(0), False, None))
    prev = None
    for i, stage in enumerate(r.steps):
        name = f"step{i + 1}"
        steps.append(Step(name, stage, r.epochs, r.lr, r.step_weight_decay(i), r.teacher != "none", prev))
        prev = name
    return [s for s in steps if s.epochs > 0]


def cosine_lr(base: float, floor: float, epoch: int, epochs: int) -> float:
    """timm's per-epoch cosine without warm-up (spec §9.3): ``floor + (base - floor)(1 + cos(pi e / E)) / 2``."""
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * epoch / epochs))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as timm builds them: no decay for 1-D tensors (BN, PReLU, biases); 4-D scales decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def use_bf16(setting: bool | str, cuda: bool) -> bool:
    return cuda if setting == "auto" else bool(setting)


def deepspeed_config(cfg: Config, micro_batch: int, bf16: bool, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config the engine gets: ZeRO stage and precision from ``cfg.retrain``; the
    optimizer is ours (torch AdamW with timm's groups), so DeepSpeed builds no JIT ops on CPU.

    On CPU, ZeRO's ``contiguous_gradients`` bucket is a fresh ``reduce_bucket_size`` allocation every
    step (page faults, then a copy of every gradient): it made the ZeRO-1 step 5-10 % slower than DDP's
    (docs/benchmarks/retrain.md), so CPU runs reduce the gradients where they are. GPUs keep the default.
    """
    r = cfg.retrain
    zero: dict[str, Any] = {"stage": r.zero_stage}
    if not cuda and r.zero_stage:
        zero["contiguous_gradients"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * r.workers,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_network(cfg: Config, genotype: Genotype, stage: str, num_classes: int) -> nn.Module:
    r = cfg.retrain
    return create_network(
        r.network,
        C=r.init_channels,
        num_classes=num_classes,
        layers=r.layers,
        genotype=genotype,
        stage=stage,
        style=r.style,
        binarize_depthwise_input=r.binarize_depthwise_input,
    )


# ---- data ---------------------------------------------------------------------------------------------
def train_stream(cfg: Config, rank: int, world: int) -> ShardStream:
    """This rank's training batches of ``data.split`` (random-resized crop, flip per config) as uint8 batches:
    pass them through ``device_batches``."""
    d, r = cfg.data, cfg.retrain
    transform = TrainTransform(image_size(cfg), scale=tuple(r.crop_scale or d.crop_scale), flip=d.flip, normalize=False)
    return ShardStream(
        d.uri,
        d.split,
        batch_size=r.batch_size // world,
        transform=transform,
        rank=rank,
        world_size=world,
        num_workers=d.loader_workers,
        seed=r.seed,
        pin_memory=torch.cuda.is_available(),
    )


# ---- engines --------------------------------------------------------------------------------------------
class Engine:
    """What the loop needs from DeepSpeed or plain DDP: forward, backward + step, lr, checkpoint."""

    module: nn.Module

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def backward_step(self, loss: Tensor) -> None:
        raise NotImplementedError

    optimizer: torch.optim.Optimizer  # DeepSpeed's ZeRO wrapper exposes the base optimizer's param_groups

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self, directory: str) -> dict[str, Any]:
        raise NotImplementedError


class DeepSpeedEngine(Engine):
    """A real ``deepspeed.initialize`` engine: ZeRO stage and bf16 from config, our AdamW."""

    def __init__(self, model: nn.Module, cfg: Config, step: Step, micro_batch: int, bf16: bool) -> None:
        import deepspeed

        cuda = next(model.parameters()).is_cuda
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        optimizer = torch.optim.AdamW(param_groups(model, step.weight_decay), lr=step.lr, eps=1e-8)
        config = deepspeed_config(cfg, micro_batch, bf16, cuda)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.engine.module
        self.bf16 = bf16

    def __call__(self, x: Tensor) -> Tensor:
        return self.engine(x.to(torch.bfloat16) if self.bf16 else x)

    def backward_step(self, loss: Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(directory, tag=DS_TAG, client_state=client_state)  # every rank: its ZeRO shard

    def load(self, directory: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(directory, tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint '{DS_TAG}' in {directory}")
        return client_state


class DDPEngine(Engine):
    """The reference: torch DDP (or the bare module on one rank) with the same AdamW; bf16 by autocast."""

    def __init__(self, model: nn.Module, step: Step, device: torch.device, bf16: bool) -> None:
        self.module = model
        multi = dist.is_initialized() and dist.get_world_size() > 1
        self.net = nn.parallel.DistributedDataParallel(model) if multi else model
        self.optimizer = torch.optim.AdamW(param_groups(model, step.weight_decay), lr=step.lr, eps=1e-8)
        self.device, self.bf16 = device, bf16

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(x)

    def backward_step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:  # replicas are identical
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), **client_state}
            torch.save(state, Path(directory) / STATE_FILE)

    def load(self, directory: str) -> dict[str, Any]:
        state = torch.load(Path(directory) / STATE_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state


# ---- the Ray Train worker --------------------------------------------------------------------------------
def _loss(
    logits: Tensor, y: Tensor, teacher_probs: Tensor | None, label_weight: float, model: nn.Module, mu: float
) -> Tensor:
    logits = logits.float()
    loss = F.cross_entropy(logits, y) if teacher_probs is None else soft_target_ce(logits, teacher_probs)
    if teacher_probs is not None and label_weight:
        loss = loss + label_weight * F.cross_entropy(logits, y)
    return loss + mu * reconstruction_loss(model) if mu else loss


def retrain_worker(task: dict[str, Any]) -> None:
    """Ray Train worker: one rank of one retrain step.

    ``task``: ``config`` (resolved), ``step`` (a ``Step`` as dict), ``genotype`` (dict),
    ``num_classes``, ``init`` / ``teacher`` (``{"uri", "sha256"}`` or None), optionally
    ``tracking`` + ``run_id`` (rank 0 logs per-epoch metrics there) and ``stop_after`` (epochs to
    run in this attempt before stopping, to test resume).
    """
    import ray.train

    from pipeline.dashboard import system_metrics
    from pipeline.progress import every, position

    cfg, step = Config.model_validate(task["config"]), Step(**task["step"])
    torch.set_num_threads(max(cfg.threads, 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    logs = task.get("tracking") is not None and task.get("run_id") is not None and rank == 0
    if logs:
        from pipeline import tracking

    # 1. data: each rank streams its own slice of the shards
    train = train_stream(cfg, rank, world)
    held_out = held_out_stream(cfg, cfg.retrain.batch_size // world, rank, world)
    # 2. model: the step's network, initialised from the previous step's artifact; the engine
    torch.manual_seed(cfg.retrain.seed)
    model = build_network(cfg, Genotype.from_dict(task["genotype"]), step.stage, task["num_classes"])
    if task.get("init"):
        inherit_weights(model, read_model(task["init"]["uri"], task["init"]["sha256"])["state_dict"])
    model.to(device)
    teacher = None
    if step.distill:
        content = read_model(task["teacher"]["uri"], task["teacher"]["sha256"])
        check_classes(content, task["num_classes"], f"teacher {task['teacher']['uri']}")
        teacher = network_from_file(content).to(device).eval().requires_grad_(False)
    bf16 = use_bf16(cfg.retrain.bf16, device.type == "cuda")
    micro = cfg.retrain.batch_size // world
    engine = (
        DeepSpeedEngine(model, cfg, step, micro, bf16)
        if cfg.retrain.engine == "deepspeed"
        else DDPEngine(model, step, device, bf16)
    )
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if task.get("init") and checkpoint is None:  # how much of the previous step survives this stage (all ranks)
        init_top1 = evaluate(engine.module, device_batches(cfg, held_out, device), device)["top1"]
        if logs and not tracking.logged_steps(task["tracking"], task["run_id"], f"{step.name}/init_top1"):
            tracking.log_epoch(task["tracking"], task["run_id"], {f"{step.name}/init_top1": init_top1}, step=0)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = engine.load(d)
        start, history = int(state["epoch"]) + 1, list(state["history"])
    mu = cfg.retrain.reconstruction_weight if step.stage == "binary_all" else 0.0
    logged = tracking.logged_steps(task["tracking"], task["run_id"], f"{step.name}/epoch_seconds") if logs else set()
    stop_at = start + task["stop_after"] if task.get("stop_after") else step.epochs
    steps, units = len(train), len(train) * step.epochs

    with system_metrics(task["tracking"].uri if logs else "", task["run_id"] if logs else None):
        for epoch in range(start, min(step.epochs, stop_at)):
            lr = cosine_lr(step.lr, cfg.retrain.min_lr, epoch, step.epochs)
            engine.set_lr(lr)
            train.set_epoch(epoch)
            torch.manual_seed(cfg.retrain.seed * 1000 + epoch)
            t0, losses, seen = time.perf_counter(), [], 0
            for i, (x, y) in enumerate(device_batches(cfg, train, device)):
                if i and i % every(steps) == 0:  # within-epoch progress (no checkpoint), on every rank together
                    ray.train.report(position(epoch, step.epochs, epoch * steps + i, units, step.name, i, steps))
                probs = None
                if teacher is not None:
                    with torch.no_grad():
                        probs = torch.softmax(teacher(x).float(), dim=-1)
                loss = _loss(engine(x), y, probs, cfg.retrain.label_weight, engine.module, mu)
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
                tracking.log_epoch(task["tracking"], task["run_id"], metrics, step=epoch)
            # 3. report: metrics and a checkpoint with every rank's state (DeepSpeed: one ZeRO shard per rank)
            with tempfile.TemporaryDirectory() as tmp:
                engine.save(tmp, {"epoch": epoch, "history": history})
                if rank == 0:
                    torch.save(model_file(engine.module), Path(tmp) / MODEL_FILE)
                progress = position(epoch, step.epochs, (epoch + 1) * steps, units, step.name, steps, steps)
                ray.train.report(
                    {**metrics, "step_losses": losses, **progress}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                )


# ---- the driver side --------------------------------------------------------------------------------------
def fit_step(
    cfg: Config,
    step: Step,
    genotype: Genotype,
    num_classes: int,
    storage_path: str,
    name: str,
    *,
    init: dict[str, str] | None = None,
    teacher: dict[str, str] | None = None,
    tracking: Any = None,
    run_id: str | None = None,
    stop_after: int | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run (or resume: same ``name`` + ``storage_path``) one step; returns the Ray Train result.
    ``callbacks``: Ray Train callbacks, e.g. :func:`pipeline.ray_progress.train_progress`'s."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.retrain
    use_gpu = r.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if use_gpu else {})
    task = {
        "config": cfg.resolved(),
        "step": asdict(step),
        "genotype": genotype.to_dict(),
        "num_classes": num_classes,
        "init": init,
        "teacher": teacher,
        "tracking": tracking,
        "run_id": run_id,
        "stop_after": stop_after,
    }
    # 4. fit: one worker per rank; failures restart from the last reported checkpoint
    trainer = TorchTrainer(
        retrain_worker,
        train_loop_config=task,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=0 if stop_after else r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()


def num_classes(cfg: Config) -> int:
    return len(open_dataset(cfg.data.uri).classes)


def preflight(cfg: Config, genotype: Genotype, classes: int) -> None:
    """Errors that must stop a retrain before any compute: wrong space, impossible network, bad teacher, hardware."""
    r = cfg.retrain
    try:
        build_network(cfg, genotype, r.steps[-1], classes)
    except (ValueError, KeyError) as e:
        raise UserError(f"genotype {genotype.hash[:12]} ({genotype.space}) cannot build retrain.network: {e}") from None
    if r.teacher not in ("train", "none"):
        check_classes(read_model(r.teacher), classes, f"teacher {r.teacher}")


def worker_bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per retrain worker (what its Ray Train worker group reserves)."""
    r = cfg.retrain
    return [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}] * r.workers


def check_resources(cfg: Config, resources: dict[str, float]) -> None:
    """The retrain's workers must fit the cluster (Ray would wait for them forever)."""
    r = cfg.retrain
    for kind, amount in total(worker_bundles(cfg)).items():
        have = float(resources.get(kind, 0.0))
        if amount > have + EPS:
            raise UserError(
                f"retrain needs {amount:g} {kind} ({r.workers} workers x {amount / r.workers:g}) but the cluster has "
                f"{have:g}: lower retrain.workers / retrain.{kind.lower()}s_per_worker or use a larger cluster"
            )


# ---- the whole stage: steps, artifacts, MLflow ------------------------------------------------------------
def _step_model(ctx: Any, run_id: str, step: str, storage: str) -> dict[str, str]:
    """A finished step's model, fetched from its MLflow artifact into ``storage`` (where every node reads
    it); its sha256 is the one recorded when the step finished."""
    from pipeline import tracking

    sha = tracking.get_run(ctx, run_id)["tags"].get(f"{SHA_TAG}.{step}")
    if sha is None:
        raise UserError(f"retrain run {run_id} has no finished {step} model")
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifact(ctx, run_id, f"{step}/{MODEL_FILE}", tmp)
        uri = f"{storage.rstrip('/')}/inputs/{step}-{sha[:12]}.pt"
        with fsspec.open(uri, "wb", auto_mkdir=True) as out:
            out.write(local.read_bytes())
    if sha256_file(uri) != sha:
        raise UserError(f"{step} model of run {run_id} does not hash to the recorded {sha[:12]}")
    return {"uri": uri, "sha256": sha}


def _publish_step(ctx: Any, run_id: str, step: Step, result: Any) -> None:
    """Log the step's final model as an artifact with its hash, and the step's compute time."""
    from pipeline import tracking

    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_FILE
        local.write_bytes((Path(d) / MODEL_FILE).read_bytes())
        sha = sha256_file(str(local))
        tracking.log_artifact(ctx, run_id, local, step.name)
    seconds = float(result.metrics.get(f"{step.name}/train_seconds", 0.0))
    tracking.log_epoch(ctx, run_id, {f"{SHA_TAG}.{step.name}": sha, f"cost/{step.name}_seconds": seconds}, step=0)


def retrain_key(cfg: Config) -> str:
    """What makes two retrains of one genotype the same: the retrain recipe and the data."""
    from dcpnas.checkpoint import config_hash

    recipe = {"retrain": cfg.retrain.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}
    return f"retrain:{config_hash(recipe)[:12]}"


def compute_hours(cfg: Config, seconds: float) -> dict[str, float]:
    r = cfg.retrain
    return {
        "cost/core_hours": seconds * r.workers * r.cpus_per_worker / 3600,
        "cost/gpu_hours": seconds * r.workers * r.gpus_per_worker / 3600,
    }


def retrain_genotype(
    cfg: Config,
    ctx: Any,
    genotype: Genotype,
    parent_run_id: str,
    tags: dict[str, Any],
    log: Any = print,
    stop_after: int | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Retrain one genotype inside an open tracking context (a served URI when workers log).

    The retrain run is nested under ``parent_run_id`` (the search run of the genotype, or the sweep
    run for a random baseline) and found again by ``key`` (default: ``retrain_key``): finished steps
    (model artifact + hash tag) are skipped, the interrupted one resumes from its Ray Train
    checkpoint. Returns the run id and its final metrics.
    """
    from pipeline import tracking
    from pipeline.ray_progress import train_progress
    from pipeline.sweep import storage_path

    recipe = retrain_key(cfg)
    key = key or recipe
    for t in tracking.search_trials(ctx, parent_run_id):
        if t["tags"].get(tracking.TRIAL_KEY_TAG) == key and t["status"] == "FINISHED" and FINAL_STEP_TAG in t["tags"]:
            log(f"retrain {genotype.hash[:12]}: finished in run {t['run_id']}, skipped")
            return {"run_id": t["run_id"], "genotype_hash": genotype.hash, "skipped": True, **t["metrics"]}
    classes = num_classes(cfg)  # the caller ran preflight() before starting Ray
    run_id = tracking.start_trial_run(
        ctx,
        parent_run_id,
        key,
        {"space": genotype.space, "seed": cfg.retrain.seed, **tags, "stage": "retrain", "genotype_hash": genotype.hash},
    )
    tracking.log_params(ctx, run_id, cfg.retrain.model_dump(mode="json"), prefix="retrain.")
    storage = f"{storage_path(cfg).rstrip('/')}/retrain/{genotype.hash[:12]}-{recipe.split(':')[1]}"
    done = tracking.get_run(ctx, run_id)["tags"]
    teacher = None
    if cfg.retrain.teacher not in ("train", "none"):
        teacher = {"uri": cfg.retrain.teacher, "sha256": sha256_file(cfg.retrain.teacher)}
    steps = plan_steps(cfg)
    for step in steps:
        if f"{SHA_TAG}.{step.name}" in done:
            log(f"retrain {genotype.hash[:12]}: {step.name} already finished, skipped")
        else:
            log(f"retrain {genotype.hash[:12]}: {step.name} ({step.stage}, {step.epochs} epochs)")
            init = _step_model(ctx, run_id, step.init_from, storage) if step.init_from else None
            try:
                with train_progress(f"retrain {genotype.hash[:12]} {step.name}") as shown:
                    result = fit_step(
                        cfg,
                        step,
                        genotype,
                        classes,
                        storage,
                        step.name,
                        init=init,
                        teacher=teacher,
                        tracking=ctx,
                        run_id=run_id,
                        stop_after=stop_after,
                        callbacks=[shown],
                    )
            except Exception as e:  # Ray Train raises the workers' error once its retries are spent
                tracking.finish_run(ctx, run_id, "FAILED", reason=f"{step.name}: {e}"[:4000])
                raise
            if stop_after is not None and int(result.metrics.get("epoch", -1)) + 1 < step.epochs:
                return {"run_id": run_id, "interrupted": step.name}
            _publish_step(ctx, run_id, step, result)
        if step.name == "teacher":
            teacher = _step_model(ctx, run_id, "teacher", storage)
    final = steps[-1].name
    with tempfile.TemporaryDirectory() as tmp:
        content = read_model(str(tracking.download_artifact(ctx, run_id, f"{final}/{MODEL_FILE}", tmp)))
    from pipeline.eval_stage import evaluate_file, log_eval_run

    metrics = evaluate_file(cfg, content, classes)
    seconds = sum(
        v
        for k, v in tracking.get_run(ctx, run_id)["metrics"].items()
        if k.startswith("cost/") and k.endswith("_seconds")
    )
    metrics.update(compute_hours(cfg, seconds))
    tracking.log_epoch(ctx, run_id, {**metrics, FINAL_STEP_TAG: final}, step=0)
    run = tracking.get_run(ctx, run_id)
    eval_id = log_eval_run(ctx, run, metrics, f"eval:{cfg.data.eval_split}")
    tracking.finish_run(ctx, run_id, "FINISHED")
    # the search run's row in the comparison view carries its genotype's retrained result
    tracking.log_epoch(ctx, parent_run_id, {"retrain/top1": metrics["top1"], "retrain/ops": metrics["ops"]}, step=0)
    return {"run_id": run_id, "eval_run_id": eval_id, "genotype_hash": genotype.hash, **metrics}


def run_retrain(cfg: Config, ref: str | None = None, log: Any = print, stop_after: int | None = None) -> dict[str, Any]:
    """``dcpnas retrain``: the genotype ``ref`` (run id, ``models:/name@alias``, JSON file, built-in
    name; default ``retrain.genotype``) retrained per ``cfg.retrain``, tracked in MLflow."""
    from pipeline import tracking
    from pipeline.sweep import _ray_init, search_data

    ref = ref or cfg.retrain.genotype
    if not ref:
        raise UserError("no genotype to retrain: pass --genotype REF or set retrain.genotype")
    # fails fast, before compute
    ctx = tracking.prepare(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, cfg.tracking.retry_s)
    genotype, search_run = tracking.find_genotype(ctx, ref)
    cfg = search_data(cfg, log)
    preflight(cfg, genotype, num_classes(cfg))
    started = _ray_init(cfg)
    try:
        check_resources(cfg, cluster_resources(worker_bundles(cfg), cfg.scale_up_wait_s, log))
        with tracking.serving(ctx) as served:
            parent = search_run or tracking.start_sweep_run(served, "retrain", cfg.resolved(), {"genotype_ref": ref})
            seed = search_run and tracking.get_run(served, search_run)["tags"].get("seed")
            tags = {"seed": seed} if seed else {}  # the search seed that found the genotype
            key = None
            if ref.startswith(tracking.PARENT_REF):  # the search's Parent genotype, beside its Child's retrain
                tags["origin"], key = "parent", f"{retrain_key(cfg)}:parent"
            elif search_run:
                tags["origin"] = "search"
            return retrain_genotype(cfg, served, genotype, parent, tags, log, stop_after, key)
    finally:
        if started:
            import ray

            ray.shutdown()


def _cmd_retrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    out = run_retrain(load_config(args.config, args.set), args.genotype)
    print(
        f"retrain run {out['run_id']}: top1 {out['top1']:.4f}  top5 {out['top5']:.4f}  "
        f"params {out['params']:,.0f} (binary {out['binary_params']:,.0f})  OPs {out['ops']:,.0f}  "
        f"memory {out['memory_mbit']:.2f} Mbit"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="retrain a genotype as a 1-bit network (two-step KD on DeepSpeed)")
    p.add_argument(
        "--genotype", help="MLflow run id, models:/name@alias, JSON file or built-in name (default: retrain.genotype)"
    )
    add_config_arguments(p)
    p.set_defaults(func=_cmd_retrain)
