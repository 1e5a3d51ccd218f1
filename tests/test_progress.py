"""Live progress: the lines a non-terminal log gets, the bars a terminal gets, the steps a search reports at."""

from __future__ import annotations

import io
import re

import torch

from dcpnas.search import TensorSearchData
from pipeline.progress.board import Board, Ticking, every, search_position


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_epoch_and_a_heartbeat_within_long_epochs() -> None:
    out = io.StringIO()
    board = Board(out, heartbeat_s=3600)
    board.update("seed=0", search_position(0, 2, 10, "parent", 5))  # first report: always a line
    board.update("seed=0", search_position(0, 2, 10, "child", 5))  # within the heartbeat: quiet
    board.update("seed=0", {"child/val_acc": 0.5, "parent/val_acc": 0.75} | search_position(0, 2, 10, "child", 10))
    board.update("seed=0", {"trial_key": "seed=0", "final/child/val_acc": 0.5})  # a closing summary: no line
    board.finish("seed=0", "finished")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("[seed=0] epoch 1/2  parent 5/10  elapsed 00:00  ETA ?")
    assert re.fullmatch(
        r"\[seed=0\] epoch 1/2  child 10/10  child val 0\.500  parent val 0\.750  elapsed 00:00  ETA 00:00", lines[1]
    ), lines[1]
    assert lines[2] == "[seed=0] finished"
    Board(out, heartbeat_s=0).update("r", search_position(1, 2, 10, "parent", 5))  # heartbeat 0: every report
    assert out.getvalue().splitlines()[-1].startswith("[r] epoch 2/2  parent 5/10")


def test_a_quiet_trial_gets_a_heartbeat_line_until_it_finishes() -> None:
    out = io.StringIO()
    board = Board(out, heartbeat_s=0)
    board.start("retrain teacher")  # workers starting: no report yet
    board.beat()
    board.update("retrain teacher", {"teacher/top1": 0.5} | search_position(0, 1, 4, "child", 4))
    board.beat()
    board.finish("retrain teacher", "finished")
    board.beat()  # a finished trial is quiet for good
    lines = [re.sub(r"\d\d:\d\d", "T", line) for line in out.getvalue().splitlines()]
    assert lines == [
        "[retrain teacher] started",
        "[retrain teacher] waiting for its first report  (running for T)",
        "[retrain teacher] epoch 1/1  child 4/4  top-1 0.500  elapsed T  ETA ?",
        "[retrain teacher] epoch 1/1  child 4/4  top-1 0.500  elapsed T  ETA ?  (running for T)",
        "[retrain teacher] finished",
    ]


def test_a_terminal_gets_a_bar_per_trial_at_its_position() -> None:
    out = Terminal()
    board = Board(out)
    board.update("a", search_position(1, 2, 10, "child", 5))  # resumed mid-run: the bar starts there
    board.update("b", {"step1/top1": 0.25, "step1/images_per_s": 812.0} | search_position(0, 2, 10, "parent", 1))
    assert board.rows["a"].bar.n == 35 and board.rows["a"].bar.total == 40 and board.rows["a"].bar.pos == 0
    assert "top-1 0.250  img/s 812" in str(board.rows["b"].bar) and board.rows["b"].bar.pos == -1
    board.finish("a", "finished")
    assert board.rows["a"].bar is None and "[a] finished" in out.getvalue()


def test_a_search_reports_every_tenth_of_a_phase_before_the_next_batch() -> None:
    x, y = torch.zeros(40, 1), torch.arange(40) % 2
    data = TensorSearchData((x, y), (x, y), (x, y), batch_size=2)  # 20 steps per phase
    ticks: list[tuple[int, str, int]] = []
    wrapped = Ticking(data, data.steps, lambda e, p, s: ticks.append((e, p, s)))
    assert every(20) == 2 and every(3) == 1
    assert sum(1 for _ in wrapped.batches(0, "parent")) == 20
    assert ticks == [(0, "parent", s) for s in range(2, 20, 2)]
    ticks.clear()
    assert sum(1 for _ in wrapped.batches(1, "child", start=13)) == 7  # resumed mid-phase
    assert ticks == [(1, "child", s) for s in (14, 16, 18)]
    assert search_position(1, 2, 20, "child", 14)["progress/done"] == 3 * 20 + 14
