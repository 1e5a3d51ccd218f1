"""bench/gpu_check.py's CPU-only parts (projection, table, the no-GPU exit) and the OOM message."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench

from pipeline.runtime.gpu_memory import GIB, oom_message, requested_bytes

check = load_bench("gpu_check")


def test_projection_counts_warmup_architecture_and_evaluation() -> None:
    assert check.steps_per_phase(1_281_167, 0.1, 1024) == 125  # the ImageNet config, pairing "cycle"
    t = check.SearchTimes(parent_warm=0.5, child_warm=1.0, parent_arch=1.0, child_arch=2.0, eval_batch=0.25)
    # 35 x 125 x 1.5 + 15 x 125 x 3 + (49 x 10 + 49) x 0.25 seconds on each of 8 GPUs
    expected = (35 * 125 * 1.5 + 15 * 125 * 3.0 + (49 * 10 + 49) * 0.25) * 8 / 86400
    assert check.projected_gpu_days(t, 50, 35, 125, 8, 10, 49) == pytest.approx(expected, rel=1e-12)


def test_table_marks_failures_and_formats_numbers() -> None:
    rows = [check.Row("a", 1.23456, "s"), check.Row("b", "OOM", "", False, "per-GPU batch 8 does not fit")]
    assert check.table(rows).splitlines()[2:] == [
        "| a | 1.235 | s | yes |  |",
        "| b | OOM |  | NO | per-GPU batch 8 does not fit |",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_exits_at_once_without_a_gpu(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no CUDA device"):
        check.main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_oom_message_gives_the_peak_and_a_batch_that_fits() -> None:
    # 4 GiB of models, 128 samples took 120 GiB more: 0.9375 GiB each; 0.9 x 80 GiB - 4 GiB leaves room for 72
    msg = oom_message(128, 4 * GIB, 124 * GIB, 80 * GIB)
    assert msg == (
        "per-GPU batch 128 does not fit: the first step needed at least 124.00 GiB (4.00 GiB before it) "
        "of the GPU's 80.00 GiB; use a per-GPU batch of at most 72 (set data.batch_size accordingly, or add GPUs)"
    )
    assert "use a GPU with more memory" in oom_message(8, 79 * GIB, 80 * GIB, 80 * GIB)
    err = RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 79.1 GiB")
    assert requested_bytes(err) == int(1.5 * GIB) and requested_bytes(RuntimeError("other")) == 0
