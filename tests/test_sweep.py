"""The sweep: plan arithmetic, the dry run, and a NaN on one rank. The real Tune sweep tracked in MLflow (killed,
resumed, run again) is exercised end to end in ``test_driver.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.stages.search.sweep import plan, trial_config


def sweep_config(out: Path, *sets: str) -> Config:
    return load_config(None, [f"output_dir={out}", *sets])


def test_plan_counts_trials_resources_and_concurrency(tmp_path) -> None:
    cfg = sweep_config(tmp_path)  # defaults: 2 seeds × 2 spaces, 0.5 + 1 × 0.5 CPUs per trial
    p = plan(cfg, {"CPU": 2})
    assert [t.key for t in p.trials] == [
        "seed=0,space=dcpnas_3x3",
        "seed=0,space=dcpnas",
        "seed=1,space=dcpnas_3x3",
        "seed=1,space=dcpnas",
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
    assert "trials: 4" in out and "seed=1,space=dcpnas)" in out  # the last trial: not the dcpnas_3x3 one
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
    from pipeline.runtime.collectives import all_reduce_mean
    from pipeline.stages.search.worker import ddp

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


GRID = "sweep.grid={search.lam: [5.0e-3, 0], search.decoupled: [true, false]}"


def test_override_axes_multiply_the_trials_with_canonical_keys(tmp_path) -> None:
    cfg = sweep_config(tmp_path, "sweep.seeds=[0]", "sweep.spaces=[dcpnas_3x3]", GRID)
    keys = [t.key for t in plan(cfg, {"CPU": 2}).trials]
    assert keys == [
        "seed=0,space=dcpnas_3x3,search.decoupled=true,search.lam=0.005",
        "seed=0,space=dcpnas_3x3,search.decoupled=false,search.lam=0.005",
        "seed=0,space=dcpnas_3x3,search.decoupled=true,search.lam=0.0",  # lam: 0 read as the float field holds it
        "seed=0,space=dcpnas_3x3,search.decoupled=false,search.lam=0.0",
    ]
    # variants × grid; a variant wins over the grid for its key; equal override sets run once
    mixed = sweep_config(
        tmp_path,
        "sweep.seeds=[0, 1]",
        "sweep.spaces=[dcpnas_3x3]",
        "sweep.grid={search.lam: [0.005]}",
        "sweep.variants=[{}, {search.lam: 0}, {search.lam: 0.0}, {search.mu: 0.5}]",
    )
    trials = plan(mixed, {"CPU": 2}).trials
    assert [t.overrides_text for t in trials[:3]] == [
        "search.lam=0.005",
        "search.lam=0.0",
        "search.lam=0.005,search.mu=0.5",
    ]
    assert len(trials) == 6 and len({t.train_name for t in trials}) == 6
    assert all(t.train_name.replace("-", "").replace("_", "").isalnum() for t in trials)  # directory-safe
    t = trials[2]
    assert t.tags == {
        "override.search.lam": "0.005",
        "override.search.mu": "0.5",
        "overrides": "search.lam=0.005,search.mu=0.5",
    }
    s = trial_config(mixed, t).search
    assert (s.seed, s.space, s.lam, s.mu) == (0, "dcpnas_3x3", 0.005, 0.5)
    plain = plan(sweep_config(tmp_path), {"CPU": 2}).trials[0]  # no overrides: key, Train name and tags as before
    assert (plain.key, plain.train_name, plain.tags) == ("seed=0,space=dcpnas_3x3", "search-seed0-dcpnas_3x3", {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.grid={search.lamm: [1]}", "search.lamm: Extra inputs are not permitted"),
        ("sweep.variants=[{search.lam: x}]", "search.lam: Input should be a valid number"),
        ("sweep.grid={search.discrepancy: [l3]}", "search.discrepancy: 'l3' is not one of fro, l1, cos"),
        ("sweep.variants=[{search.lam.x: 1}]", "sweep override search.lam.x: 'lam' is a value, not a section"),
        ("sweep.grid={search.seed: [1, 2]}", "'search.seed': seeds and spaces are the sweep.seeds / sweep.spaces"),
        ("sweep.variants=[{search.space: dcpnas}]", "'search.space': seeds and spaces are the sweep.seeds"),
        ("sweep.grid={data.batch_size: [32]}", "'data.batch_size': only search.* keys vary per trial"),
        ("sweep.grid={search.lam: []}", "sweep.grid.search.lam: give at least one value"),
        ("sweep.grid={search.lam: 0}", "sweep.grid.search.lam: Input should be a valid list"),
    ],
)
def test_a_bad_override_fails_before_anything_runs_naming_its_key(tmp_path, capsys, override, message) -> None:
    rc = main(["sweep", "--set", f"output_dir={tmp_path}", "--set", override, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()
