"""ShardStream: exactly-once per epoch over ranks x workers, equal batch counts, determinism, exact resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest_data import encode, pixels, synthetic_dataset
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.shards import ShardWriter
from pipeline.data.stream import ShardStream, buffer_order, round_robin
from pipeline.data.transforms import EvalTransform, TrainTransform
from pipeline.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def keys_of(batches: list) -> list[list[str]]:
    return [list(b[2]) for b in batches]


def take(stream: ShardStream, k: int) -> list:
    """Consume k batches and stop early, like a job killed after k optimizer steps."""
    it = iter(stream)
    out = [next(it) for _ in range(k)]
    it.close()
    return out


@PROPERTY
@given(
    rows=st.integers(1, 60),
    shard_rows=st.integers(1, 20),
    group_rows=st.integers(1, 8),
    world=st.integers(1, 4),
    workers=st.integers(0, 3),
    batch=st.integers(1, 5),
    buffer=st.integers(1, 16),
    seed=st.integers(0, 2**20),
    drop_last=st.booleans(),
    cut=st.floats(0, 1),
)
def test_epoch_properties(rows, shard_rows, group_rows, world, workers, batch, buffer, seed, drop_last, cut):
    assume(not drop_last or rows >= world * batch)
    uri = synthetic_dataset(rows, shard_rows=shard_rows, row_group_rows=group_rows)

    def stream(rank: int) -> ShardStream:
        return ShardStream(
            uri,
            "train",
            batch_size=batch,
            rank=rank,
            world_size=world,
            num_workers=workers,
            seed=seed,
            shuffle_buffer=buffer,
            drop_last=drop_last,
            return_keys=True,
        )

    streams = [stream(r) for r in range(world)]
    epochs = []
    for epoch in (0, 1):
        for s in streams:
            s.set_epoch(epoch)
        per_rank = [keys_of(list(s)) for s in streams]
        flat = [k for r in per_rank for b in r for k in b]
        assert len(flat) == len(set(flat)), "a row was read twice in one epoch"
        assert [len(r) for r in per_rank] == [len(s) for s in streams]
        if drop_last:  # training: equal full batches everywhere, fewer than world*batch rows dropped
            assert {len(r) for r in per_rank} == {rows // (world * batch)}
            assert all(len(b) == batch for r in per_rank for b in r)
            assert 0 <= rows - len(flat) < world * batch
        else:  # evaluation: every row exactly once, ranks within one row of each other
            assert sorted(flat) == [f"k{i:05d}" for i in range(rows)]
            sizes = [sum(map(len, r)) for r in per_rank]
            assert max(sizes) - min(sizes) <= 1
        epochs.append(per_rank)
    if rows >= 20:
        assert epochs[0] != epochs[1], "two epochs gave the same order"

    streams[0].set_epoch(0)
    assert keys_of(list(streams[0])) == epochs[0][0], "the same (seed, epoch) must repeat exactly"

    rank = seed % world
    full = epochs[1][rank]
    k = round(cut * len(full))
    first = stream(rank)
    first.set_epoch(1)
    head = keys_of(take(first, k))
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == k
    resumed = stream(rank)
    resumed.load_state_dict(state)
    assert resumed.epoch == (1 if k < len(full) else 2)  # a finished epoch resumes at the next one
    rest = keys_of(list(resumed)) if k < len(full) else []
    assert head + rest == full, "resume lost, repeated or reordered batches"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(0, 300), size=st.integers(0, 64), seed=st.integers(0, 2**32 - 1))
def test_buffer_order_is_a_bounded_permutation(n, size, seed):
    order = buffer_order(n, size, np.random.default_rng(seed))
    assert sorted(order.tolist()) == list(range(n))
    assert all(p < max(size, 1) + t for t, p in enumerate(order.tolist())), "emitted a row not yet read"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 6), max_size=5))
def test_round_robin_matches_dataloader_order(counts):
    merged = round_robin(counts).tolist()
    assert sorted(merged) == sorted(w for w, c in enumerate(counts) for _ in range(c))
    for t in range(max(counts, default=0)):  # round t lists, in worker order, every worker with > t batches
        start = sum(min(c, t) for c in counts)
        assert merged[start : start + sum(c > t for c in counts)] == [w for w, c in enumerate(counts) if c > t]


def test_epochs_differ_and_drop_rotates():
    uri = synthetic_dataset(61, shard_rows=10, row_group_rows=4)
    s = ShardStream(uri, "train", batch_size=4, world_size=2, rank=0, return_keys=True)
    orders = [[k for b in keys_of(list(s)) for k in b] for _ in range(4)]  # each pass advances the epoch
    assert s.epoch == 4
    assert len({tuple(o) for o in orders}) == 4
    assert len(set().union(*orders)) > len(orders[0]), "the dropped remainder should change between epochs"


def test_set_epoch_keeps_a_resumed_position():
    uri = synthetic_dataset(30, shard_rows=10, row_group_rows=4)
    s = ShardStream(uri, "train", batch_size=3, return_keys=True)
    s.set_epoch(2)
    full = keys_of(list(s))
    resumed = ShardStream(uri, "train", batch_size=3, return_keys=True)
    resumed.load_state_dict({**s.state_dict(), "epoch": 2, "batch": 4})
    resumed.set_epoch(2)  # what a training loop does at the top of every epoch
    assert keys_of(list(resumed)) == full[4:]


def test_keys_filter_streams_only_that_part():
    uri = synthetic_dataset(40, shard_rows=7, row_group_rows=3)
    part = [f"k{i:05d}" for i in range(0, 40, 3)]
    s = ShardStream(uri, "train", batch_size=None, keys=part, drop_last=False, return_keys=True)
    assert len(s) == len(part)
    assert sorted(k for _, _, k in s) == part
    with pytest.raises(UserError, match="not in split 'train'"):
        ShardStream(uri, "train", batch_size=2, keys=["k00001", "nope"])


def test_too_few_rows_and_changed_settings_are_clear_errors():
    uri = synthetic_dataset(5)
    with pytest.raises(UserError, match="fewer than world_size x batch_size = 8"):
        ShardStream(uri, "train", batch_size=4, world_size=2, rank=1)
    state = ShardStream(uri, "train", batch_size=2).state_dict()
    with pytest.raises(UserError, match=r"settings changed.*batch_size"):
        ShardStream(uri, "train", batch_size=1).load_state_dict(state)


def test_transforms_give_float_batches_and_resume_repeats_augmentation():
    uri = f"memory://img-{os.getpid()}"
    images = [pixels(20, 14, i) for i in range(12)]
    with ShardWriter(uri, ["a", "b"], row_group_rows=5) as w:
        for i, arr in enumerate(images):
            w.add("train", f"{i:02d}", i % 2, encode(arr, "PNG"))
    train = TrainTransform(size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    s = ShardStream(uri, "train", batch_size=4, transform=train, num_workers=2, seed=3)
    batches = list(s)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16)] * 3
    assert all(x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0 for x, _ in batches)
    resumed = ShardStream(uri, "train", batch_size=4, transform=train, num_workers=2, seed=3)
    resumed.load_state_dict({**s.state_dict(), "epoch": 0, "batch": 1})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[1:], resumed, strict=True))

    raw = EvalTransform(16, crop_fraction=1.0, mean=(0, 0, 0), std=(1 / 255,) * 3)  # output = pixel values
    ev = ShardStream(uri, "train", batch_size=None, transform=raw, shuffle=False, drop_last=False, return_keys=True)
    for x, label, key in ev:  # PNG is lossless: decoding from the shard equals transforming the source pixels
        assert label == int(key) % 2
        assert torch.allclose(x, raw(Image.fromarray(images[int(key)])), atol=1e-4)


def _ddp_rank(rank: int, uri: str, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    s = ShardStream(uri, "train", batch_size=3, num_workers=1, return_keys=True)
    seen = []
    for _, labels, keys in s:  # a collective per batch hangs if ranks disagree on the batch count
        t = labels.sum().float()
        torch.distributed.all_reduce(t)
        seen += keys
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, (len(s), seen))
    if rank == 0:
        torch.save(gathered, out)
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_read_disjoint_equal_shares(tmp_path):
    uri = synthetic_dataset(50, shard_rows=9, uri=f"file://{tmp_path}/ds")  # spawned ranks cannot see memory://
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(_ddp_rank, args=(uri, port, str(tmp_path / "out.pt")), nprocs=2)
    (n0, keys0), (n1, keys1) = torch.load(tmp_path / "out.pt")
    assert n0 == n1 == 50 // 6 and len(keys0) == len(keys1) == 24
    assert not set(keys0) & set(keys1)
