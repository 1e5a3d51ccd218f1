"""The Ray side of live progress: a Tune ``Callback`` for sweeps, a Ray Train callback for retrain steps.

A retrain step is a bare Ray Train run; its callbacks live in the Train controller actor, so they
forward reports over a Ray queue that a driver thread shows on the :class:`~pipeline.progress.board.Board`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from pipeline.progress.board import Board


class TuneProgress(Callback):
    """Feeds a :class:`Board` from Tune's trial results; ``label(trial.config)`` names a trial.

    Tune pickles its callbacks with the experiment (and restores them with it), so the board is made
    when the experiment starts, never pickled."""

    def __init__(self, label: Callable[[dict[str, Any]], str]) -> None:
        self.label = label
        self.board: Board | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"label": self.label, "board": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._board().start(self.label(trial.config))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._board().beat()  # Tune's event loop turns several times a second

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._board().update(self.label(trial.config), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._board().finish(self.label(trial.config), "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._board().finish(self.label(trial.config), "failed (Tune retries it while sweep.max_failures allows)")

    def _board(self) -> Board:
        self.board = self.board or Board()
        return self.board


class _ToQueue(UserCallback):
    """Ray Train callback (runs in the Train controller): rank 0's report onto a Ray queue, under its row."""

    def __init__(self, queue: Any, name: str) -> None:
        self.queue, self.name = queue, name

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put((self.name, {k: v for k, v in metrics[0].items() if isinstance(v, int | float | str)}))


class TrainProgress:
    """Rows on one :class:`Board` for any number of Ray Train runs (retrain steps, side by side), fed by
    one Ray queue (an actor process) and one driver thread."""

    def __init__(self, queue: Any, board: Board) -> None:
        self.queue, self.board, self.lock = queue, board, threading.Lock()

    def pump(self, block: bool) -> bool:
        """Show one queued report (waiting up to 0.5 s when ``block``); False when there was none."""
        from queue import Empty

        with self.lock:
            try:
                name, result = self.queue.get(timeout=0.5) if block else self.queue.get_nowait()
            except Empty:
                return False
            self.board.update(name, result)
            return True

    @contextmanager
    def row(self, name: str) -> Iterator[UserCallback]:
        """The Ray Train callback of one run, shown as row ``name`` until the run returns."""
        self.board.start(name)
        ok = False
        try:
            yield _ToQueue(self.queue, name)
            ok = True
        finally:
            while self.pump(block=False):  # fit() returned: its reports are all queued; show them first
                pass
            self.board.finish(name, "finished" if ok else "failed")


@contextmanager
def train_progress(board: Board | None = None) -> Iterator[TrainProgress]:
    """A :class:`TrainProgress` whose driver thread shows the queued reports until the ``with`` ends."""
    from ray.util.queue import Queue

    progress = TrainProgress(Queue(actor_options={"num_cpus": 0}), board or Board())
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            if not progress.pump(block=True):
                progress.board.beat()  # Ray Train's workers start for tens of seconds before the first report

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=10)
        progress.queue.shutdown()
