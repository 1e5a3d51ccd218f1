"""bench/loader.py runs every loader of issue 3 on the same JPEGs and reports the ratios it is meant to measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_loader_bench_reports_every_loader_and_ratio(tmp_path) -> None:
    out = tmp_path / "loader.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loader.py"),
        "--images",
        "96",
        "--rounds",
        "1",
        "--size",
        "64",
        "--batch",
        "16",
    ]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    loaders = {"a", "a8"} | {f"{x}{w}" for x in "bcur" for w in (1, 2)}
    assert set(result["img_per_s"]) == loaders and all(v > 0 for v in result["img_per_s"].values())
    r = result["img_per_s"]
    assert result["ratios"]["r"]["efficiency"] == pytest.approx(r["r1"] / r["a8"])  # uint8 against its own ceiling
    assert result["ratios"]["c"]["scaling"] == pytest.approx(r["c2"] / r["c1"])
    assert "| (r) ShardStream, uint8 batches as shipped" in done.stdout
