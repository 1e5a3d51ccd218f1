"""bench/retrain.py runs both engines on two gloo ranks and reports the ratio it is meant to measure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_bench_times_deepspeed_against_ddp(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spec = importlib.util.spec_from_file_location("bench_retrain", ROOT / "bench" / "retrain.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_retrain"] = bench
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path / "r.json")])
    s = result["summary"]
    assert set(result["samples"]) == {"ddp", "deepspeed"} and all(len(v) == 2 for v in result["samples"].values())
    assert s["ratio_deepspeed_over_ddp"] == pytest.approx(s["median_s"]["deepspeed"] / s["median_s"]["ddp"])
    assert s["images_per_s"]["ddp"] == pytest.approx(4 * 2 / s["median_s"]["ddp"])  # batch 4 per rank x 2 ranks
    assert (tmp_path / "r.json").exists()
