"""The retrain plan: the steps a config asks for, their schedules and optimiser groups, the DeepSpeed config,
what the workers reserve, and the checks that must stop a retrain before any compute."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from dcpnas.genotype import Genotype
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.models import build_network, check_classes, read_model
from pipeline.names import TEACHER_STEP, step_name
from pipeline.runtime.resources import EPS, total
from pipeline.runtime.trainer import Workers


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
        steps.append(Step(TEACHER_STEP, "real", r.teacher_epochs, r.teacher_lr, r.step_weight_decay(0), False, None))
    prev = None
    for i, stage in enumerate(r.steps):
        name = step_name(i)
        steps.append(Step(name, stage, r.epochs, r.lr, r.step_weight_decay(i), r.teacher != "none", prev))
        prev = name
    return [s for s in steps if s.epochs > 0]


def cosine_lr(base: float, floor: float, epoch: int, epochs: int) -> float:
    """timm's per-epoch cosine without warm-up (method §9.3): ``floor + (base - floor)(1 + cos(pi e / E)) / 2``."""
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


def preflight(cfg: Config, genotype: Genotype, classes: int) -> None:
    """Errors that must stop a retrain before any compute: wrong space, impossible network, bad teacher, hardware."""
    r = cfg.retrain
    try:
        build_network(cfg, genotype, r.steps[-1], classes)
    except (ValueError, KeyError) as e:
        raise UserError(f"genotype {genotype.hash[:12]} ({genotype.space}) cannot build retrain.network: {e}") from None
    if r.teacher not in ("train", "none"):
        check_classes(read_model(r.teacher), classes, f"teacher {r.teacher}")


def retrain_workers(cfg: Config) -> Workers:
    """The worker group of every retrain step."""
    r = cfg.retrain
    return Workers(r.workers, r.cpus_per_worker, r.gpus_per_worker)


def worker_bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per retrain worker (what its Ray Train worker group reserves)."""
    return retrain_workers(cfg).bundles


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


def retrain_slots(cfg: Config, resources: dict[str, float]) -> int:
    """How many retrains' worker groups the cluster holds at once, at most ``retrain.max_concurrent``."""
    fits = min(
        math.floor((float(resources.get(kind, 0.0)) + EPS) / amount)
        for kind, amount in total(worker_bundles(cfg)).items()
        if amount > 0
    )
    cap = cfg.retrain.max_concurrent
    return max(1, min(fits, cap) if cap else fits)


def retrain_key(cfg: Config) -> str:
    """What makes two retrains of one genotype the same: the retrain recipe and the data."""
    from dcpnas.checkpoint import config_hash

    schedule = {"max_concurrent"}  # how many run at once changes no retrain
    recipe = {
        "retrain": cfg.retrain.model_dump(mode="json", exclude=schedule),
        "data": cfg.data.model_dump(mode="json"),
    }
    return f"retrain:{config_hash(recipe)[:12]}"


def compute_hours(cfg: Config, seconds: float) -> dict[str, float]:
    r = cfg.retrain
    return {
        "cost/core_hours": seconds * r.workers * r.cpus_per_worker / 3600,
        "cost/gpu_hours": seconds * r.workers * r.gpus_per_worker / 3600,
    }
