"""Live progress of searches and retrains (docs/progress.md).

Workers put ``progress/*`` fields (:func:`position`) into what they report, at every epoch end and every
few steps within an epoch (:class:`Ticking`). A :class:`Board` in the driver shows them: on a terminal
one tqdm bar per trial, refreshed in place (steps done, elapsed, ETA, the last key metrics); elsewhere
(CI, ``ray job logs``) one line per epoch per trial, plus a line for a trial quiet for ``heartbeat_s``,
so a log never sits silent for long. Tune's own reporters print whole tables on a timer, not a line per
trial and epoch; tqdm already renders a bar with elapsed and ETA, so the board only feeds it.

Sweeps feed the board from a Tune ``Callback``, retrain steps through a Ray queue
(``pipeline.progress.tune``); ``dcpnas search`` feeds it directly.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from pipeline.names import CHILD_VAL_ACC

PREFIX = "progress/"
TICKS_PER_PHASE = 10  # within-epoch reports per search phase / retrain epoch: ~20 per search epoch
HEARTBEAT_S = 30.0
# what a line shows of the last metrics: result key -> label
SHOWN = {
    "parent/val_acc": "parent val",
    CHILD_VAL_ACC: "child val",
    "alpha_entropy": "H(alpha)",
    "top1": "top-1",
    "images_per_s": "img/s",
}


def position(epoch: int, epochs: int, unit: int, units: int, stage: str, step: int, steps: int) -> dict[str, Any]:
    """The ``progress/*`` fields of one report: ``unit`` of ``units`` steps done in all, at ``stage``'s
    ``step`` of ``steps`` in epoch ``epoch`` (0-based) of ``epochs``."""
    return {
        f"{PREFIX}epoch": epoch,
        f"{PREFIX}epochs": epochs,
        f"{PREFIX}done": unit,
        f"{PREFIX}total": units,
        f"{PREFIX}stage": stage,
        f"{PREFIX}step": step,
        f"{PREFIX}steps": steps,
    }


def search_position(epoch: int, epochs: int, steps: int, phase: str, step: int) -> dict[str, Any]:
    """:func:`position` in a search: two phases of ``steps`` each per epoch (epoch end: child, ``steps``)."""
    from dcpnas.search import PHASES

    done = (2 * epoch + PHASES.index(phase)) * steps + step
    return position(epoch, epochs, done, 2 * epochs * steps, phase, step, steps)


def phase_steps(data: Any) -> int:
    """Paired steps per search phase under the data's pairing (in memory or shard streams)."""
    from dcpnas.search import phase_steps as steps_of

    return getattr(data, "steps", None) or steps_of(len(data.weights), len(data.arch), data.pairing)


def every(steps: int) -> int:
    """Steps between within-epoch reports; a step count, never a clock, so every rank reports together
    (a Ray Train report waits for all ranks)."""
    return max(1, steps // TICKS_PER_PHASE)


@dataclass
class Ticking:
    """Search data that calls ``tick(epoch, phase, step)`` every ``every(steps)`` steps of a phase, before
    handing out the next batch (``steps`` done so far); evaluation batches pass through."""

    data: Any
    steps: int
    tick: Callable[[int, str, int], None]

    def batches(self, epoch: int, phase: str, start: int = 0) -> Iterator[Any]:
        n = every(self.steps)
        for i, pair in enumerate(self.data.batches(epoch, phase, start), start):
            if i > start and i % n == 0:
                self.tick(epoch, phase, i)
            yield pair

    def eval_batches(self) -> Iterator[Any]:
        return self.data.eval_batches()


@dataclass
class _Row:
    started: float
    last_line: float  # when this row last printed a line (logs only)
    bar: tqdm | None = None
    first: tuple[float, int] | None = None  # (time, done) of the first report seen here: the ETA's base
    where: list[str] = field(default_factory=lambda: ["waiting for its first report"])
    metrics: dict[str, float] = field(default_factory=dict)
    active: bool = True


class Board:
    """Progress rows by trial name; see the module docstring."""

    def __init__(self, stream: TextIO | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.heartbeat_s = heartbeat_s
        self.rows: dict[str, _Row] = {}
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        """A trial started: a line, and a row that :meth:`beat` keeps alive until its first report."""
        with self.lock:
            now = time.monotonic()
            self.rows[name] = _Row(now, now)
            self._line(name, "started")

    def update(self, name: str, result: Mapping[str, Any]) -> None:
        if f"{PREFIX}done" not in result:
            return  # a trial's closing summary: the caller says how it ended
        with self.lock:
            now, done, total = time.monotonic(), int(result[f"{PREFIX}done"]), int(result[f"{PREFIX}total"])
            row = self.rows.setdefault(name, _Row(now, now - self.heartbeat_s))
            row.first = row.first or (now, done)
            for k, v in result.items():  # retrain metrics carry their step's name: "step1/top1"
                label = SHOWN.get(k) or SHOWN.get(k.partition("/")[2])
                if label and isinstance(v, int | float):
                    row.metrics[label] = float(v)
            epoch_end = result[f"{PREFIX}step"] == result[f"{PREFIX}steps"]
            row.where = [
                f"epoch {int(result[f'{PREFIX}epoch']) + 1}/{result[f'{PREFIX}epochs']}",
                f"{result[f'{PREFIX}stage']} {result[f'{PREFIX}step']}/{result[f'{PREFIX}steps']}",
                *(f"{k} {v:.3f}" if abs(v) < 10 else f"{k} {v:.0f}" for k, v in row.metrics.items()),
            ]
            if self.tty:
                if row.bar is None:
                    row.bar = tqdm(total=total, initial=done, desc=name, position=len(self.rows) - 1, file=self.stream)
                row.bar.n = done
                row.bar.set_postfix_str("  ".join(row.where), refresh=True)
                return
            t0, d0 = row.first
            eta = (now - t0) / (done - d0) * (total - done) if done > d0 else None
            row.where += [
                f"elapsed {tqdm.format_interval(now - t0)}",
                f"ETA {'?' if eta is None else tqdm.format_interval(eta)}",
            ]
            if epoch_end or now - row.last_line >= self.heartbeat_s:
                self._line(name, "  ".join(row.where))
                row.last_line = now

    def beat(self) -> None:
        """In a log, a line for every running trial quiet for ``heartbeat_s`` (its last position again)."""
        if self.tty:
            return
        with self.lock:
            now = time.monotonic()
            for name, row in self.rows.items():
                if row.active and now - row.last_line >= self.heartbeat_s:
                    self._line(name, f"{'  '.join(row.where)}  (running for {tqdm.format_interval(now - row.started)})")
                    row.last_line = now

    def finish(self, name: str, text: str) -> None:
        """A trial ended (``text``: finished, failed, ...): its bar closes, a line says how."""
        with self.lock:
            row = self.rows.get(name)
            if row is not None:
                row.active = False
                if row.bar is not None:
                    row.bar.close()
                    row.bar = None
            self._line(name, text)

    def _line(self, name: str, text: str) -> None:
        if self.tty:
            tqdm.write(f"[{name}] {text}", file=self.stream)
        else:
            print(f"[{name}] {text}", file=self.stream, flush=True)


Log = Callable[[str], None]  # where a stage's one-line messages go: print, or a test's list.append
