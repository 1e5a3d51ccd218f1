"""ShardStream: a deterministic, resumable, DDP-aware ``IterableDataset`` over Parquet shards.

Epoch plan (computed identically in every process from the manifest, no communication):

1. The read units are the (shard, row group) pairs, restricted to ``keys`` if given. With ``shuffle`` the
   units are permuted by (seed, epoch) and the concatenated row sequence is rotated by a random offset.
2. Rank ``r`` takes a contiguous slice of that sequence, so it reads only its own row groups. Training
   (``drop_last=True``) gives every rank ``N // (world_size * batch)`` full batches; the remainder
   (< world_size * batch rows) is dropped, and because the sequence is re-permuted and rotated each epoch,
   different rows are dropped each epoch. ``drop_last=False`` (evaluation) reads every row exactly once; rank
   sizes then differ by at most one row and batch counts by at most one, so aggregate eval metrics with one
   ``all_reduce`` after the loop, never with collectives per batch.
3. The rank's batches are split into contiguous runs, one per DataLoader worker; each worker reads its
   rows in order (``readahead`` row groups in flight on background threads) through a bounded shuffle
   buffer of ``shuffle_buffer`` rows, then decodes and transforms only the rows it emits.
4. Batches reach the consumer in the DataLoader's round-robin order over workers. The stream counts them,
   so ``state_dict()`` = (epoch, batches consumed). On ``load_state_dict`` each worker skips what it had
   already produced and the workers are rotated so the round-robin continues where it stopped: the resumed
   sequence equals the uninterrupted one, augmentations included (their RNG is seeded per batch).

Iterate the stream itself (it runs its own DataLoader when ``num_workers > 0``); wrapping it in another
DataLoader also works (``batch_size=None``, same ``num_workers``) but then ``state_dict()`` cannot count.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from fsspec.implementations.memory import MemoryFileSystem
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.data.shards import ShardDataset, ShardInfo
from pipeline.data.transforms import Transform, decode
from pipeline.errors import UserError

Row = tuple[str, int, bytes]


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Order in which positions 0..n-1, read in sequence, leave a shuffle buffer of ``size`` rows.

    The t-th emitted position is < size + t, so a reader holds at most ``size`` rows it has not emitted.
    """
    size = min(size, n)
    if size <= 1:
        return np.arange(n)
    buf = list(range(size))
    out = np.empty(n, dtype=np.int64)
    for t, (j, nxt) in enumerate(zip(rng.integers(0, size, n - size), range(size, n))):
        out[t], buf[j] = buf[j], nxt
    out[n - size :] = rng.permutation(buf)
    return out


def round_robin(counts: list[int]) -> np.ndarray:
    """Worker id of each batch in the order a DataLoader yields them (round robin, exhausted workers skipped)."""
    return np.array([w for t in range(max(counts, default=0)) for w, c in enumerate(counts) if t < c], np.int64)


class ShardStream(IterableDataset):
    """Stream one split (or the ``keys`` subset of it) as batches ``(images, labels[, keys])``.

    ``batch_size=None`` streams single samples instead. ``transform(img, rng)`` maps the opened PIL image
    to a tensor (see ``transforms``); without one the encoded bytes are yielded (e.g. for GPU decoding).
    ``rank``/``world_size`` default to the initialised ``torch.distributed`` group. Each complete pass
    advances ``epoch`` by one; ``set_epoch(e)`` (as with ``DistributedSampler``) jumps to epoch ``e``.
    """

    def __init__(
        self,
        data: str | ShardDataset,
        split: str,
        *,
        batch_size: int | None,
        transform: Transform | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        shuffle_buffer: int = 1024,
        readahead: int = 2,
        keys: Iterable[str] | None = None,
        return_keys: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.ds = data if isinstance(data, ShardDataset) else ShardDataset(data)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else torch.distributed.get_rank() if dist else 0
        self.world_size = world_size if world_size is not None else torch.distributed.get_world_size() if dist else 1
        self.split, self.batch_size, self.transform, self.num_workers = split, batch_size, transform, num_workers
        self.seed, self.shuffle, self.drop_last, self.shuffle_buffer = seed, shuffle, drop_last, shuffle_buffer
        self.readahead, self.return_keys, self.pin_memory = readahead, return_keys, pin_memory
        bad_batch = batch_size is not None and batch_size < 1
        if not 0 <= self.rank < self.world_size or min(seed, num_workers, readahead - 1) < 0 or bad_batch:
            settings = f"rank {self.rank} of {self.world_size}, seed {seed}, num_workers {num_workers}"
            raise ValueError(f"bad stream settings: {settings}, batch_size {batch_size}, readahead {readahead}")
        if num_workers and isinstance(self.ds.fs, MemoryFileSystem) and multiprocessing.get_start_method() != "fork":
            raise UserError(f"{self.ds.uri} is process-local (memory://): use num_workers=0 or a shared filesystem")
        self.shards: list[ShardInfo] = self.ds.split(split).shards
        groups = [(s, g, n) for s, shard in enumerate(self.shards) for g, n in enumerate(shard.row_groups)]
        self._unit_shard = np.array([s for s, _, _ in groups], np.int64)
        self._unit_group = np.array([g for _, g, _ in groups], np.int64)
        self._unit_start = np.cumsum([0] + [n for _, _, n in groups], dtype=np.int64)
        rows = np.arange(self._unit_start[-1]) if keys is None else self.ds.rows_for_keys(split, keys)
        self._unit_rows = np.split(rows, np.searchsorted(rows, self._unit_start[1:-1]))
        self.num_rows = len(rows)
        self.epoch = self._batch = 0
        if len(self) == 0 and drop_last:
            raise UserError(
                f"split {split!r} of {self.ds.uri} has {self.num_rows} rows, fewer than world_size x "
                f"batch_size = {self.world_size * (batch_size or 1)}: no full batch for any rank"
            )

    # ---- the plan -------------------------------------------------------------------------------------------
    @property
    def _step(self) -> int:
        return self.batch_size or 1

    def _rank_bounds(self) -> tuple[int, int]:
        n, world = self.num_rows, self.world_size
        if self.drop_last:
            per = n // (world * self._step) * self._step
            return self.rank * per, (self.rank + 1) * per
        return self.rank * n // world, (self.rank + 1) * n // world

    def __len__(self) -> int:
        """Batches (or samples) this rank yields per epoch; equal on all ranks when ``drop_last``."""
        lo, hi = self._rank_bounds()
        return -(-(hi - lo) // self._step)

    def _worker_batches(self) -> list[tuple[int, int]]:
        """[first, end) batch index of each worker's contiguous run (the first ``len % W`` get one more)."""
        nb, w = len(self), max(self.num_workers, 1)
        ends = np.cumsum([0] + [nb // w + (i < nb % w) for i in range(w)])
        return list(zip(ends[:-1].tolist(), ends[1:].tolist()))

    def _epoch_rows(self) -> np.ndarray:
        """This rank's global row ids in read order for the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._unit_rows)) if self.shuffle else range(len(self._unit_rows))
        seq = np.concatenate([self._unit_rows[u] for u in order] + [np.empty(0, np.int64)])
        if self.shuffle and len(seq):
            seq = np.roll(seq, -int(rng.integers(len(seq))))
        lo, hi = self._rank_bounds()
        return seq[lo:hi]

    # ---- position and resume -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch`` (each epoch has its own reproducible order).

        A no-op when already in ``epoch``, so a loop that calls it every epoch keeps a resumed mid-epoch position.
        """
        if epoch != self.epoch:
            self.epoch, self._batch = epoch, 0

    def _settings(self) -> dict[str, Any]:
        return {
            "dataset": self.ds.fingerprint,
            "split": self.split,
            "rows": self.num_rows,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches consumed so far (the same on every rank), plus the settings they depend on."""
        return {"epoch": self.epoch, "batch": self._batch, "settings": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` on the next iteration; the stream settings must be the ones it was saved with."""
        diff = {k: (v, state["settings"].get(k)) for k, v in self._settings().items() if state["settings"].get(k) != v}
        if diff:
            raise UserError(f"cannot resume the {self.split!r} stream: settings changed (now, saved): {diff}")
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        if self._batch >= len(self):
            self.epoch, self._batch = self.epoch + 1, 0

    # ---- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != max(self.num_workers, 1):
                raise RuntimeError(f"ShardStream planned for {self.num_workers} workers runs in {info.num_workers}")
            yield from self._worker(info.id)
            return
        if self.num_workers == 0:
            source: Iterable[Any] = self._worker(0)
        else:
            source = DataLoader(self, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for item in source:
            self._batch += 1
            yield item
        self.epoch, self._batch = self.epoch + 1, 0  # a completed pass moves on to the next epoch

    def _worker(self, physical: int) -> Iterator[Any]:
        """Yield the remaining batches of the worker run that DataLoader worker ``physical`` now serves."""
        runs = self._worker_batches()
        merged = round_robin([b - a for a, b in runs])
        done = np.bincount(merged[: self._batch], minlength=len(runs))
        turn = int(merged[self._batch]) if self._batch < len(merged) else 0
        w = (physical + turn) % len(runs)
        (first, end), step = runs[w], self._step
        rows = self._epoch_rows()[first * step : end * step]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, w])
        order = buffer_order(len(rows), self.shuffle_buffer, rng) if self.shuffle else np.arange(len(rows))
        skip = done[w] * step
        yield from self._emit(rows, order, skip, first + done[w])

    def _emit(self, rows: np.ndarray, order: np.ndarray, skip: int, batch_index: int) -> Iterator[Any]:
        """Read ``rows`` in order, ``readahead`` row groups ahead on threads; emit ``order[skip:]`` in batches."""
        pending = np.ones(len(rows), bool)
        pending[order[:skip]] = False
        unit = np.searchsorted(self._unit_start, rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(unit)) + 1
        todo = iter([(a, b) for a, b in zip([0, *cuts], [*cuts, len(rows)]) if pending[a:b].any()])
        files, frontier = _ShardFiles(self.ds), 0
        held: dict[int, Row] = {}
        inflight: deque[tuple[int, int, Future[list[Row]]]] = deque()
        with ThreadPoolExecutor(self.readahead) as pool:

            def fill() -> None:
                while len(inflight) < self.readahead and (seg := next(todo, None)) is not None:
                    a, b = seg
                    inflight.append((a, b, pool.submit(self._read, files, rows[a:b], int(unit[a]))))

            try:
                for start in range(skip, len(order), self._step):
                    batch = order[start : start + self._step]
                    while frontier <= batch.max():
                        fill()
                        a, b, fut = inflight.popleft()
                        held.update((p, r) for p, r in zip(range(a, b), fut.result()) if pending[p])
                        frontier = b
                    fill()
                    yield self._collate([held.pop(int(p)) for p in batch], batch_index)
                    batch_index += 1
            finally:
                for *_, fut in inflight:
                    fut.cancel()

    def _read(self, files: _ShardFiles, rows: np.ndarray, u: int) -> list[Row]:
        table = files.get(self.shards[self._unit_shard[u]]).read_row_group(
            int(self._unit_group[u]), columns=["key", "label", "image"], use_threads=False
        )
        local = rows - self._unit_start[u]
        contiguous = local[-1] - local[0] + 1 == len(local)  # the usual case: slice, no copy
        table = table.slice(int(local[0]), len(local)) if contiguous else table.take(local)
        return list(zip(*(table.column(c).to_pylist() for c in ("key", "label", "image"))))

    def _collate(self, rows: list[Row], batch_index: int) -> Any:
        keys, labels, images = zip(*rows)
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, batch_index])
            images = tuple(self.transform(decode(b), rng) for b in images)
        if self.batch_size is None:
            out: tuple[Any, ...] = (images[0], labels[0], keys[0])
        else:
            imgs = default_collate(list(images)) if self.transform is not None else list(images)
            out = (imgs, torch.tensor(labels, dtype=torch.int64), list(keys))
        return out if self.return_keys else out[:2]


class _ShardFiles:
    """Per-thread cache of open shards, so read-ahead threads never share a file position."""

    def __init__(self, dataset: ShardDataset, capacity: int = 4) -> None:
        self.dataset, self.capacity = dataset, capacity
        self._local = threading.local()

    def get(self, shard: ShardInfo) -> pq.ParquetFile:
        cache: OrderedDict[str, pq.ParquetFile] = self._local.__dict__.setdefault("cache", OrderedDict())
        if shard.path not in cache:
            if len(cache) >= self.capacity:
                cache.popitem(last=False)
            cache[shard.path] = self.dataset.open_shard(shard)
        return cache[shard.path]
