"""What a dry run projects a search to cost, from step times measured here (docs/pipeline.md, "Dry run").

Both phases are timed as a worker runs them: the configured ``threads`` (workers use at least one),
the per-worker batch, random input of the configured shape, each step warmed up once and then the
median of ``repeats``; before and after the warm-up epochs (the architecture steps start after them);
plus one held-out evaluation batch; and reading batch pairs as a worker does (for the demo's digits,
converted into process memory first). A config that asks for GPUs is not
measured on a machine without one: a CPU step says nothing about a GPU's, so the projection uses a
stated assumed step time instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config

MAX_BATCH = 64  # larger per-worker batches are timed at this size and scaled linearly (said in the output)
Clock = Callable[[], float]
ASSUMED_GPU_STEP_S = 1.0  # a round figure, not a measurement: what a GPU config projects without a GPU here


@dataclass(frozen=True)
class StepTimes:
    """Seconds per step of each phase (``warmup_*``: during the warm-up epochs) and per eval batch."""

    parent: float
    child: float
    warmup_parent: float
    warmup_child: float
    eval_batch: float | None  # None: not measured (given or assumed step times)
    how: str
    load_pair: float = 0.0  # reading one weights + one architecture batch (every step of both phases reads one)

    @classmethod
    def given(cls, seconds: float, how: str) -> StepTimes:
        return cls(seconds, seconds, seconds, seconds, None, how)

    def train_seconds(self, steps: int, warmup: bool) -> float:
        """One epoch's two phases of ``steps`` steps each (what a search logs as ``epoch_seconds``)."""
        compute = (self.warmup_parent + self.warmup_child) if warmup else (self.parent + self.child)
        return steps * (compute + 2 * self.load_pair)


def _median(fn: Callable[[], None], repeats: int, sync: Callable[[], None], clock: Clock) -> float:
    fn()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        sync()
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
    return statistics.median(times)


def load_pair_seconds(cfg: Config, repeats: int, clock: Clock) -> tuple[float, str]:
    """Median seconds to read one batch pair as a worker does (``StreamSearchData``: decode, crop, normalise);
    the demo's digits are converted into process memory first. 0 with the reason when the data is unreadable."""
    import uuid

    from pipeline.data.search_data import StreamSearchData, make_split

    if cfg.data.source == "digits" and not cfg.data.uri:
        from pipeline.data.convert import Options, convert
        from pipeline.data.sources import digits

        uri = f"memory://dcpnas-dry-run-{uuid.uuid4().hex}"
        convert(digits(), uri, Options(workers=1, progress=False))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"uri": uri, "source": "shards"})})
    try:
        data = StreamSearchData.open(cfg, make_split(cfg), world_size=cfg.sweep.workers)
        pairs = iter(data.batches(0, "parent"))
        seconds = _median(lambda: next(pairs), repeats, lambda: None, clock)  # its warm-up opens the shards
    except Exception as e:  # unreadable store, too few batches: project without it, and say so
        return 0.0, f"data loading not included ({cfg.data.uri} not read here: {type(e).__name__})"
    return seconds, "data loading included (median of batch pairs read here)"


def measure(cfg: Config, clock: Clock, repeats: int = 3) -> StepTimes:
    """Time both phases' steps and an eval batch of ``cfg``'s search here (see the module docstring).

    ``clock``: ``time.perf_counter`` for wall time; on a CPU, ``time.process_time`` gives what the steps
    cost on cores of their own even on a busy machine (compared with a search's ``epoch_cpu_seconds``).
    """
    import torch

    from dcpnas.search import DCPNASSearch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    per_worker = cfg.data.batch_size // cfg.sweep.workers
    batch = min(per_worker, MAX_BATCH)
    threads, before = max(cfg.threads, 1), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        search = DCPNASSearch(cfg.search_config(), device=device)
        size = cfg.data.image_size
        x = torch.randn(batch, cfg.search.in_channels, size, size, device=device)
        y = torch.randint(0, cfg.search.num_classes, (batch,), device=device)
        times = {}
        for warmup in (True, False):
            search.epoch = 0 if warmup else cfg.search.warmup_epochs
            for phase, step in (("parent", search.parent_step), ("child", search.child_step)):
                times[(warmup, phase)] = _median(lambda step=step: step((x, y), (x, y)), repeats, sync, clock)
        evaluate = _median(lambda: search.evaluate([(x, y)]), repeats, sync, clock)
        load, loading = load_pair_seconds(cfg, repeats, clock)
    finally:
        torch.set_num_threads(before)
    scale = per_worker / batch
    how = f"measured here on {device}, {threads} thread(s), batch {batch}, median of {repeats} after a warm-up"
    how += f", scaled x{scale:g} to the per-worker batch {per_worker}" if scale != 1 else ""
    return StepTimes(
        times[(False, "parent")] * scale,
        times[(False, "child")] * scale,
        times[(True, "parent")] * scale,
        times[(True, "child")] * scale,
        evaluate * scale,
        f"{how}; {loading}",
        load,
    )


def step_times(cfg: Config, step_seconds: float | None, clock: Clock) -> StepTimes:
    """``--step-seconds`` when given; else measured here, unless the config wants GPUs this machine lacks."""
    import torch

    if step_seconds is not None:
        return StepTimes.given(step_seconds, "given with --step-seconds")
    if cfg.sweep.gpus_per_worker > 0 and not torch.cuda.is_available():
        return StepTimes.given(
            ASSUMED_GPU_STEP_S,
            f"ASSUMED {ASSUMED_GPU_STEP_S:g} s per step: the config runs on GPUs and this machine has none, so "
            "nothing was measured; time a step on the cluster's GPU (bench/search_step.py) and pass --step-seconds",
        )
    return measure(cfg, clock)
