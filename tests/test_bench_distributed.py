"""bench/distributed.py --quick: every launcher (torchrun, Ray Train with 2 and 1 workers) runs the search step and
the JSON holds the timings, the three goal ratios and the machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_scripts import load_bench

pytestmark = [pytest.mark.ray, pytest.mark.distributed, pytest.mark.slow]


bench = load_bench("distributed")


def test_quick_mode_writes_every_launch_and_goal(tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["config"]["quick"] is True and result["config"]["steps"] == 2
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert set(result["runs"]) == set(bench.LAUNCHES)
    for name in bench.LAUNCHES:
        (run,) = result["runs"][name]
        assert run["world"] == int(name[-1]) and run["batch"] == result["config"]["batch"]
        assert len(run["wall"]) == len(run["cpu"]) == 2 and min(run["wall"]) > 0
        # from the launcher's clock: the worker function starts after the launch, the first step after that
        assert 0 < run["worker_start_s"] < run["first_step_s"] < 600 and run["first_iter_s"] > 0
    goals = result["goals"]
    assert set(goals) == set(result["met"]) == set(bench.GOALS)
    ratios = [goals["ray_overhead"]["wall"], goals["ray_overhead"]["cpu"], goals["scaling"]["throughput_ratio"]]
    ratios += [*goals["ray_overhead"]["wall_per_round"], *goals["scaling"]["per_round"]]
    assert len(ratios) == 5 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert goals["cold_start_s"]["first_round"] == result["runs"]["ray_2"][0]["first_step_s"]
    assert result["ray_init_s"] > 0
