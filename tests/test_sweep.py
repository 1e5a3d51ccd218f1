"""The sweep: plan arithmetic, the dry run, and a NaN on one rank. The real Tune sweep tracked in MLflow (killed,
resumed, run again) is exercised end to end in ``test_driver.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.sweep import plan


def sweep_config(out: Path, *sets: str) -> Config:
    return load_config(None, [f"output_dir={out}", *sets])


def test_plan_counts_trials_resources_and_concurrency(tmp_path) -> None:
    cfg = sweep_config(tmp_path)  # defaults: 2 seeds × 2 spaces, 0.5 + 1 × 0.5 CPUs per trial
    p = plan(cfg, {"CPU": 2})
    assert [t.key for t in p.trials] == [
        "seed=0,space=dcpnas_3x3",
        "seed=0,space=dcpnas_conv",
        "seed=1,space=dcpnas_3x3",
        "seed=1,space=dcpnas_conv",
    ]
    assert (p.cpus_per_trial, p.gpus_per_trial, p.max_concurrent) == (1.0, 0.0, 2)
    wide = sweep_config(tmp_path, "sweep.workers=2", "sweep.seeds=[0,1,2]", "sweep.spaces=[dcpnas]")
    p = plan(wide, {"CPU": 16})
    assert (len(p.trials), p.cpus_per_trial, p.max_concurrent) == (3, 1.5, 3)  # capped by the trial count
    gpu = sweep_config(tmp_path, "sweep.workers=2", "sweep.gpus_per_worker=1", "sweep.cpus_per_worker=1")
    p = plan(gpu, {"CPU": 64, "GPU": 4})
    assert (p.cpus_per_trial, p.gpus_per_trial, p.max_concurrent) == (2.5, 2.0, 2)  # GPUs bind first


def test_plan_refuses_a_trial_that_can_never_fit(tmp_path) -> None:
    cfg = sweep_config(tmp_path, "sweep.workers=2", "sweep.cpus_per_worker=1")
    with pytest.raises(UserError, match=r"needs 2.5 CPUs .* cluster has 2 CPUs"):
        plan(cfg, {"CPU": 2})
    gpu = sweep_config(tmp_path, "sweep.gpus_per_worker=1")
    with pytest.raises(UserError, match=r"1 GPUs .* 0 GPUs"):
        plan(gpu, {"CPU": 8})


def test_sweep_section_is_strict(tmp_path) -> None:
    with pytest.raises(UserError, match=r"sweep\.bogus"):
        sweep_config(tmp_path, "sweep.bogus=1")
    assert sweep_config(tmp_path).tracking.uri is None


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys) -> None:
    rc = main(["sweep", "--set", f"output_dir={tmp_path}", "--set", "sweep.num_cpus=2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trials: 4" in out and "seed=1,space=dcpnas_conv" in out
    assert "CPUs per trial: 1  GPUs per trial: 0" in out
    assert "max concurrent trials: 2" in out
    assert not (tmp_path / "demo").exists()  # no data, no Ray storage, no tracking store


def test_dry_run_reports_an_impossible_trial(tmp_path, capsys) -> None:
    sets = ["--set", f"output_dir={tmp_path}", "--set", "sweep.num_cpus=1", "--set", "sweep.workers=2"]
    rc = main(["sweep", *sets, "--dry-run"])
    assert rc == 2
    assert "can never run" in capsys.readouterr().err


def _diverge_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from dcpnas.search import DCPNASSearch, DivergedError
    from pipeline.collectives import all_reduce_mean
    from pipeline.search_stage import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, ["search.init_channels=4", "search.layers=3"])
    search = DCPNASSearch(cfg.search_config(), wrap=ddp, reduce_mean=all_reduce_mean)
    x = torch.randn(4, 3, 8, 8)
    scale = float("nan") if rank == 1 else 1.0  # only rank 1 sees a bad batch
    try:
        search._weight_step(
            "parent", search.parent, search.parent_fwd(x, alpha=search.parent.alpha.detach()).mean() * scale
        )
        search.check_finite()  # the loop's periodic check: one all-reduce, every rank raises
        outcome = "no error"
    except DivergedError as e:
        outcome = f"diverged: {e}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_diverge_rank, args=(2, port, str(tmp_path)), nprocs=2)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    # both ranks stop at the same check
    expected = "diverged: parent loss is not finite (on some rank, by epoch 0, parent phase step 0)"
    assert outcomes == [expected, expected], outcomes
