"""Random-genotype baselines (``retrain.random_baselines``): drawn before Ray starts, within the OPs window,
retrained with the searched genotype's recipe under the sweep run, found again on a re-run, and reported
side by side with the searched series. Bad input fails before any compute, saying why."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dcpnas.sampling import sample_genotype
from dcpnas.spaces import SearchSpace, get_space, register_space
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.stages.retrain.baselines import check_capacity, genotype_ops, sample_baselines

TOLERANCE = 0.05


def small_config(out: Path, *sets: str) -> Config:
    base = [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "sweep.spaces=[dcpnas_3x3]"]
    return load_config(None, [*base, "retrain.init_channels=8", "retrain.layers=3", *sets])


def test_too_many_baselines_for_a_space_fail_before_the_sweep(tmp_path) -> None:
    register_space(SearchSpace("one_genotype", ("skip_connect", "none"), steps=1))  # a single genotype
    cfg = small_config(tmp_path, "sweep.spaces=[dcpnas_3x3, one_genotype]", "retrain.random_baselines=1")
    with pytest.raises(UserError, match=r"space 'one_genotype' holds only 1 distinct genotype\(s\), and up to "):
        check_capacity(cfg)
    check_capacity(small_config(tmp_path, "retrain.random_baselines=1000"))  # dcpnas_3x3: 2.2e19 genotypes


def test_an_unreachable_ops_window_says_so(tmp_path) -> None:
    sets = ["retrain.random_baselines=1", "retrain.random_ops_tolerance=1e-12", "retrain.init_channels=4"]
    cfg = small_config(tmp_path, *sets)  # 100 draws, each one network built and counted
    searched = sample_genotype(get_space("dcpnas_3x3"), random.Random(3))
    ops = genotype_ops(cfg, searched, 10)
    with pytest.raises(
        UserError, match=rf"within retrain.random_ops_tolerance 1e-12 of .* {ops:,.0f} OPs: .* 100 draws"
    ):
        sample_baselines(cfg, [searched], 10)


@pytest.mark.slow
@pytest.mark.ray
def test_baselines_are_retrained_like_the_searched_genotype_and_reported(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.data.search_data import ensure_shards
    from pipeline.job import retrain_selected
    from pipeline.report.build import build_report
    from pipeline.stages.search.sweep import TrialSummary

    sets = ["retrain.random_baselines=2", f"retrain.random_ops_tolerance={TOLERANCE}", "retrain.teacher=none"]
    cfg = ensure_shards(small_config(tmp_path, *sets, "retrain.steps=[binary_all]", "retrain.epochs=1"), log=print)
    ctx = tracking.prepare(cfg.tracking.uri, cfg.name)
    searched = sample_genotype(get_space("dcpnas_3x3"), random.Random(3))  # stands in for a search's result
    sweep = tracking.open_sweep_run(ctx, "sweep", cfg.resolved())
    trial = tracking.open_child_run(
        ctx, sweep, "seed=0,space=dcpnas_3x3", {"stage": "search", "space": "dcpnas_3x3", "seed": 0}
    )
    tracking.log_genotype(ctx, trial, searched)
    tracking.finish_run(ctx, trial)
    chosen = [TrialSummary("t", 0, "dcpnas_3x3", "", sweep, trial, "FINISHED", searched.hash)]
    expected = [g.hash for g in sample_baselines(cfg, [searched], 10)]

    out = retrain_selected(cfg, chosen, print)
    assert [(r["origin"], r["genotype_hash"]) for r in out] == [("search", searched.hash)] + [
        ("random", h) for h in expected
    ]
    client = MlflowClient(cfg.tracking.uri)
    runs = {r["run_id"]: client.get_run(r["run_id"]) for r in out}
    recipe = {k: v for k, v in runs[out[0]["run_id"]].data.params.items() if k.startswith("retrain.")}
    assert runs[out[0]["run_id"]].data.params["genotype.hash"] == searched.hash  # every retrain run holds its genotype
    for r in out[1:]:  # under the sweep run, the searched genotype's recipe, OPs within the window
        run = runs[r["run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == sweep and run.info.status == "FINISHED"
        assert (run.data.tags["stage"], run.data.tags["origin"], run.data.params["genotype.hash"]) == (
            "retrain",
            "random",
            r["genotype_hash"],
        )
        assert {k: v for k, v in run.data.params.items() if k.startswith("retrain.")} == recipe
        assert abs(r["ops"] / out[0]["ops"] - 1) <= TOLERANCE and r["ops"] != out[0]["ops"]
    assert runs[out[0]["run_id"]].data.tags["mlflow.parentRunId"] == trial

    again = retrain_selected(cfg, chosen, print)  # found again: nothing retrained, no run added
    assert [r["run_id"] for r in again] == [r["run_id"] for r in out] and all(r["skipped"] for r in again)
    assert len(client.search_runs([ctx.experiment_id], max_results=100)) == 2 + 3 * 2  # + an eval per retrain

    page = build_report(ctx, sweep, tmp_path / "report").read_text()
    versus = json.loads((tmp_path / "report" / "summary.json").read_text())["searched_vs_random"]
    assert (versus["searched"]["n"], versus["random"]["n"]) == (1, 2) and versus["sentence"] in page
    tops = [r["top1"] for r in out]
    assert versus["diff"] == pytest.approx(tops[0] - (tops[1] + tops[2]) / 2)
