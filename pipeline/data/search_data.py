"""What a search reads: the class-balanced weights/architecture split, the paired shard streams of a
rank, the demo's digits as shards (converted once) or in memory for the single-process search."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dcpnas.search import PHASES, Batch, TensorSearchData, pair_indices
from pipeline.config import Config
from pipeline.data.shards import open_dataset
from pipeline.data.splits import SearchSplit, balanced_split
from pipeline.data.stream import ShardStream
from pipeline.data.transforms import EvalTransform, TrainTransform, on_device
from pipeline.progress.board import Log


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


def ensure_shards(cfg: Config, log: Log = print) -> Config:
    """The config the trials read: ``digits`` without a URI → shards converted once into ``<run_dir>/data/shards``."""
    if cfg.data.source == "shards" or cfg.data.uri:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "shards"})})
    from pipeline.data.convert import Options, convert
    from pipeline.data.sources import digits

    out = (cfg.run_dir() / "data" / "shards").resolve()
    log(f"search data: digits shards at {out}")
    convert(digits(), str(out), Options(workers=1, progress=False))  # resumes, or returns the finished one
    tree = cfg.resolved()
    tree["data"].update(source="shards", uri=str(out))
    return Config.model_validate(tree)


def digits_search_data(cfg: Config) -> TensorSearchData:
    """The bundled digits as normalised float tensors, split held-out / weights / architecture."""
    import torch

    from dcpnas.search import TensorSearchData
    from pipeline.data.digits import load_digits_rgb
    from pipeline.data.splits import balanced_split

    images, labels = load_digits_rgb()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(labels)
    d = cfg.data
    rest = 1 - d.held_out_fraction
    fractions = {"held_out": d.held_out_fraction, "weights": rest * d.weight_fraction, "arch": rest * d.arch_fraction}
    split = balanced_split([str(i) for i in range(len(y))], labels.tolist(), fractions, d.split_seed)
    held, w, a = (torch.tensor([int(k) for k in split.parts[p]]) for p in fractions)
    parts = (x[w], y[w]), (x[a], y[a]), (x[held], y[held])
    return TensorSearchData(*parts, d.batch_size, cfg.search.seed, cfg.search.pairing)
