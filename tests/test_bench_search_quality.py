"""bench/search_quality.py: its table from a store built with ``pipeline.tracking`` (exact numbers), and the
``--quick`` run of the whole product path on synthetic idx files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench
from mlflow.tracking import MlflowClient

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]
bench = load_bench("search_quality")
CFG = {"sweep": {"workers": 1, "cpus_per_worker": 0.5}, "retrain": {"workers": 2, "cpus_per_worker": 1.0}}


def _end(client: MlflowClient, run_id: str, hours: float) -> None:
    start = client.get_run(run_id).info.start_time
    client.set_terminated(run_id, "FINISHED", end_time=start + int(hours * 3.6e6))


@pytest.mark.slow  # ~8 s CPU (the SQLite store's schema), more wall on a loaded box
def test_table_from_a_store(tmp_path: Path) -> None:
    """Two seeds of each searched arm (override tags as the sweep writes them), Parent and random retrains,
    the reference cell retrained from a file, a failed retrain that must not count."""
    from dcpnas.genotype import load_genotype

    ctx = tracking.prepare(f"sqlite:///{tmp_path / 'mlflow.db'}", "q")
    client = MlflowClient(ctx.uri)
    sweep = tracking.open_sweep_run(ctx, "sweep", {"name": "q"})
    top1 = {"": (0.80, 0.84), "search.lam=0": (0.70, 0.72), "search.decoupled=False": (0.79, 0.83)}

    def retrain(parent: str, key: str, acc: float, hours: float, **tags: str) -> None:
        run = tracking.open_child_run(ctx, parent, key, {"stage": "retrain", "space": "dcpnas", "seed": 0, **tags})
        tracking.log_epoch(ctx, run, {"top1": acc, "ops": 2e6 + 1e6 * acc}, step=0)
        _end(client, run, hours)

    for override, accs in top1.items():
        for seed, acc in enumerate(accs):
            tags = {"stage": "search", "space": "dcpnas", "seed": seed}
            if override:
                k, v = override.split("=")
                tags |= {"overrides": override, f"override.{k}": v}
            trial = tracking.open_child_run(ctx, sweep, f"seed={seed},{override}", tags)
            tracking.log_epoch(ctx, trial, {"alpha_entropy": 2.0 - 0.1 * seed - len(override) / 100}, step=0)
            _end(client, trial, 0.5 + seed)
            retrain(trial, "child", acc, 0.1)
            if not override:
                retrain(trial, "parent", acc - 0.1, 0.2, origin="parent")
    for i, acc in enumerate((0.5, 0.6, 0.7, 0.6)):
        retrain(sweep, f"random{i}", acc, 0.3, origin="random")
    loose = tracking.open_sweep_run(ctx, "retrain", {"name": "q", "x": 1})  # `dcpnas retrain` of a built-in cell
    retrain(loose, "ref", 0.9, 0.4, genotype_hash=load_genotype("ddpnas_mcn_2").hash, genotype_ref="ddpnas_mcn_2")
    failed = tracking.open_child_run(ctx, sweep, "broken", {"stage": "retrain", "space": "dcpnas", "seed": 0})
    tracking.log_epoch(ctx, failed, {"top1": 0.99}, step=0)
    client.set_terminated(failed, "FAILED")

    arms = bench.collect(bench.runs_of(ctx.uri, "q"), CFG)
    assert {a: sorted(v["top1"]) for a, v in arms.items()} == {
        bench.FULL: pytest.approx([0.80, 0.84]),
        bench.NO_TANGENT: pytest.approx([0.70, 0.72]),
        bench.NO_DECOUPLED: pytest.approx([0.79, 0.83]),
        bench.PARENT: pytest.approx([0.70, 0.74]),
        bench.RANDOM: pytest.approx([0.5, 0.6, 0.6, 0.7]),
        bench.REFERENCE: pytest.approx([0.9]),
    }, "the failed retrain is not counted"
    # core-hours: run duration x cores (search 1 x 0.5, retrain 2 x 1.0); the Parent arm pays the full searches
    assert sorted(arms[bench.FULL]["search_ch"]) == pytest.approx([0.25, 0.75])
    assert sorted(arms[bench.PARENT]["search_ch"]) == pytest.approx([0.25, 0.75])
    assert arms[bench.RANDOM]["search_ch"] == [] and arms[bench.RANDOM]["retrain_ch"] == pytest.approx([0.6] * 4)
    assert sorted(arms[bench.NO_TANGENT]["entropy"]) == pytest.approx([1.78, 1.88])

    text = bench.table(arms)
    assert "| DCP-NAS | 2 | 82.00 ± 2.83 | 2.8 ± 0.0 | 0.500 ± 0.354 | 0.200 ± 0.000 | 1.9500 ± 0.0707 |" in text
    assert "| ddpnas_mcn_2 | 1 | 90.00 | 2.9 | — | 0.800 | — |" in text
    lines = bench.verdicts(arms)
    # lambda = 0: +11 points over a standard error of sqrt(0.0283^2/2 + 0.0141^2/2) = 0.02236 -> 4.92
    assert lines[0] == "- DCP-NAS vs lambda = 0: DCP-NAS is better: top-1 +11.00 points, +4.92 standard errors"
    assert lines[1].startswith("- DCP-NAS vs decoupled off: no clear difference: top-1 +1.00 points")
    assert lines[3].startswith("- DCP-NAS vs random: DCP-NAS is better: top-1 +22.00 points")
    assert lines[4] == "- DCP-NAS vs ddpnas_mcn_2: DCP-NAS is worse: top-1 -8.00 points, -4.00 standard errors"


@pytest.mark.slow
def test_quick_bench_runs_every_arm_through_the_product(tmp_path: Path) -> None:
    out = tmp_path / "q"
    cmd = [sys.executable, str(ROOT / "bench" / "search_quality.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "search_quality.json").read_text())
    n = {arm: len(v["top1"]) for arm, v in result["arms"].items()}
    assert n == {bench.FULL: 1, bench.NO_TANGENT: 1, bench.NO_DECOUPLED: 1, bench.PARENT: 1, bench.RANDOM: 1,
                 bench.REFERENCE: 1}  # fmt: skip
    assert all(0 <= x <= 1 for v in result["arms"].values() for x in v["top1"])
    assert len(result["verdicts"]) == 5 and "| random | 1 |" in result["table"]
