"""The shard streams of retraining and evaluation: a rank's shuffled training stream, the held-out split read
exactly once across ranks, and their uint8 batches normalised on the device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.data.stream import ShardStream
from pipeline.data.transforms import EvalTransform, TrainTransform, on_device

Batch = tuple[Tensor, Tensor]


def image_size(cfg: Config) -> int:
    return cfg.retrain.image_size or cfg.data.image_size


def held_out_stream(cfg: Config, batch_size: int, rank: int = 0, world: int = 1) -> ShardStream:
    """Every row of ``data.eval_split`` exactly once across ranks, centre crop (none for tiny images), as
    uint8 batches: pass them through ``device_batches``."""
    d = cfg.data
    size = image_size(cfg)
    return ShardStream(
        d.uri,
        d.eval_split,
        batch_size=batch_size,
        transform=EvalTransform(size, crop_fraction=1.0 if size <= 32 else 0.875, normalize=False),
        rank=rank,
        world_size=world,
        num_workers=d.loader_workers,
        shuffle=False,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


def device_batches(cfg: Config, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> Iterator[Batch]:
    """A stream's uint8 batches, normalised with ``data.mean``/``data.std`` on ``device``."""
    return on_device(batches, device, tuple(cfg.data.mean), tuple(cfg.data.std))


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
