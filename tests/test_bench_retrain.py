"""bench/retrain.py runs both engines on two gloo ranks and reports the ratio it is meant to measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_bench_times_deepspeed_against_ddp(tmp_path) -> None:
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "bench" / "retrain.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["summary"]
    assert set(result["samples"]) == {"ddp", "deepspeed"} and all(len(v) == 2 for v in result["samples"].values())
    assert s["ratio_deepspeed_over_ddp"] == pytest.approx(s["median_s"]["deepspeed"] / s["median_s"]["ddp"])
    assert s["images_per_s"]["ddp"] == pytest.approx(4 * 2 / s["median_s"]["ddp"])  # batch 4 per rank x 2 ranks
