"""Report sections of an override sweep with random baselines, on a real SQLite MLflow store built with
``pipeline.tracking``: space darts × seeds 0, 1 × overrides {none, search.lam=0.0}; two searched genotypes
retrained, three random ones retrained under the sweep run (``origin=random``), one random retrain failed."""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any

import pytest

from pipeline import tracking
from pipeline.report.build import build_report
from pipeline.report.groups import compare

CHILD_ACC = {(0, ""): 0.5, (1, ""): 0.7, (0, "search.lam=0.0"): 0.4, (1, "search.lam=0.0"): 0.45}
SEARCHED = {(0, ""): (0.90, 1.0e8), (1, "search.lam=0.0"): (0.86, 1.2e8)}  # top-1, OPs
RANDOM = [(0.80, 0.9e8), (0.84, 1.1e8), (0.82, 1.3e8)]


def _retrain(ctx: tracking.TrackingContext, parent: str, key: str, top1: float, ops: float, **tags: Any) -> str:
    run = tracking.open_child_run(ctx, parent, key, {"stage": "retrain", "space": "darts", "seed": 0, **tags})
    tracking.log_epoch(ctx, run, {"top1": top1, "ops": ops}, step=0)
    tracking.finish_run(ctx, run)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ctx = tracking.prepare(uri, "groups-test")
    sweep = tracking.open_sweep_run(ctx, "sweep", {"name": "groups-test"}, {"seeds": "0,1"})
    for (seed, overrides), acc in CHILD_ACC.items():
        tags = {"stage": "search", "space": "darts", "seed": seed}
        if overrides:
            tags |= {"overrides": overrides, "override.search.lam": "0.0"}
        run = tracking.open_child_run(ctx, sweep, f"seed={seed},space=darts,{overrides}".rstrip(","), tags)
        tracking.log_epoch(ctx, run, {"child/val_acc": acc}, step=0)
        tracking.finish_run(ctx, run)
        if (seed, overrides) in SEARCHED:
            _retrain(ctx, run, "retrain:abc", *SEARCHED[(seed, overrides)], origin="search")
    for i, (top1, ops) in enumerate(RANDOM):
        _retrain(ctx, sweep, f"random:{i},retrain:abc", top1, ops, origin="random")
    failed = tracking.open_child_run(
        ctx, sweep, "random:9,retrain:abc", {"stage": "retrain", "space": "darts", "seed": 0, "origin": "random"}
    )
    tracking.finish_run(ctx, failed, "FAILED", reason="step1: killed")
    out = tmp_path_factory.mktemp("out") / "report"
    page = build_report(ctx, sweep, out).read_text()
    return {"out": out, "page": page, "summary": json.loads((out / "summary.json").read_text())}


def _cells(page: str, row_id: str) -> list[str]:
    m = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page)
    assert m, f"no row {row_id}"
    return re.findall(r"<td[^>]*>(.*?)</td>", m.group(1))


def test_trials_are_grouped_by_space_and_overrides_over_seeds(built: dict[str, Any]) -> None:
    groups = {(g["space"], g["overrides"]): g for g in built["summary"]["groups"]}
    assert sorted(groups) == [("darts", ""), ("darts", "search.lam=0.0")]
    lam0 = groups[("darts", "search.lam=0.0")]
    assert (lam0["trials"], lam0["finished"]) == (2, 2)
    accs = [0.4, 0.45]
    assert lam0["search"]["child/val_acc"] == {"n": 2, "mean": statistics.fmean(accs), "std": statistics.stdev(accs)}
    assert lam0["top1"] == {"n": 1, "mean": 0.86, "std": None}
    assert _cells(built["page"], "group-darts-search.lam=0.0")[:4] == [
        "darts",
        "search.lam=0.0",
        "2/2",
        "0.425 ± 0.03536",
    ]
    assert _cells(built["page"], "group-darts-")[:4] == ["darts", "(none)", "2/2", "0.6 ± 0.1414"]
    assert built["summary"]["spaces"]["darts"]["trials"] == 4  # random retrains are no search trials


def test_searched_and_random_series_side_by_side_with_the_difference(built: dict[str, Any]) -> None:
    c = built["summary"]["searched_vs_random"]
    searched, random = [0.90, 0.86], [0.80, 0.84, 0.82]  # the failed random retrain is left out
    assert c["searched"] == {"n": 2, "mean": statistics.fmean(searched), "std": statistics.stdev(searched)}
    assert c["random"]["n"] == 3 and c["random"]["mean"] == pytest.approx(0.82)
    se = math.sqrt(statistics.variance(searched) / 2 + statistics.variance(random) / 3)
    assert c["diff"] == pytest.approx(0.06) and c["spread"] == pytest.approx(se)
    sentence = f"searched − random = +6.00 ± {100 * se:.2f} pts top-1 (n=2 vs 3): more than twice its standard error"
    assert c["sentence"] == sentence and sentence in built["page"]
    assert _cells(built["page"], "series-random") == ["random", "3", "0.82 ± 0.02"]
    assert _cells(built["page"], "series-searched") == ["searched", "2", "0.88 ± 0.02828"]
    assert (built["out"] / "searched_vs_random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="searched_vs_random.png"' in built["page"]


def test_the_spread_of_a_single_run_series_borrows_the_other_variance() -> None:
    c = compare([0.9], [0.8, 0.84])
    assert c.spread == pytest.approx(math.sqrt(statistics.variance([0.8, 0.84]) * (1 + 1 / 2)))
    judged = ": a series of one run, too few to judge"
    assert c.sentence() == f"searched − random = +8.00 ± {100 * c.spread:.2f} pts top-1 (n=1 vs 2){judged}"
    assert compare([0.9], [0.8]).sentence().startswith("searched − random = +10.00 ± ? pts top-1 (n=1 vs 1): ")
    assert "not run" in compare([], [0.8]).sentence()
