"""The main job: selection, the dry run, failing fast on bad addresses, and the demo pipeline end to end with the
driver killed mid-sweep and run again (every stage's MLflow runs, no duplicates, the report)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.job import select
from pipeline.stages.search.sweep import TrialSummary, plan, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def trial(key: str, h: str, acc: float, status: str = "FINISHED", diverged: bool = False) -> TrialSummary:
    reason = "diverged: loss is nan" if diverged else ""
    return TrialSummary(key, 0, "s", "", "sweep", f"run-{key}", status, h, reason, metrics={"child/val_acc": acc})


def test_select_dedupes_genotypes_and_ranks_by_child_accuracy() -> None:
    trials = [
        trial("a", "h1", 0.80),
        trial("b", "h2", 0.90),
        trial("c", "h1", 0.85),  # same genotype as a, better: a is dropped
        trial("d", "h3", 0.99, status="FAILED"),
        trial("e", "h4", 0.99, diverged=True),
        trial("f", "", 0.99),
    ]
    assert [t.trial_key for t in select(trials, 5)] == ["b", "c"]
    assert [t.trial_key for t in select(trials, 1)] == ["b"]
    assert select(trials, 0) == []


def test_dry_run_prints_plan_and_projected_cost(tmp_path, capsys) -> None:
    sets = ["--set", f"output_dir={tmp_path}", "--set", "sweep.num_cpus=2"]
    assert main(["run", *sets, "--dry-run", "--step-seconds", "0.5", "--price", "2"]) == 0
    out = capsys.readouterr().out
    assert "trials: 4" in out and "max concurrent trials: 2" in out
    # digits: 1437 train rows x 0.25 weight fraction / batch 64 = 5 steps; 4 epochs x 2 phases x 5 x 0.5 s = 20 s
    assert "steps per phase: 5" in out
    assert "search: 0.01 h per trial x 4 trials in 2 wave(s)" in out
    assert "search cost: 0.0222 core-hours ~ $0.04 at $2/core-hour" in out  # 4 trials x 1 CPU (0.5 + 0.5) x 20 s
    assert "teacher (real, 3 ep), step1 (binary_act, 4 ep), step2 (binary_all, 4 ep)" in out
    assert not (tmp_path / "demo").exists()  # started nothing


def test_dry_run_measures_the_steps_of_a_replaying_search(tmp_path, capsys) -> None:
    """The projection times each step several times at step 0: a replayed Parent step is recorded anew."""
    sets = [f"output_dir={tmp_path}", "sweep.num_cpus=2", "search.parent_outputs=replay", "search.init_channels=4"]
    assert main(["run", *(a for kv in sets for a in ("--set", kv)), "--dry-run"]) == 0
    assert "steps per phase: 5" in capsys.readouterr().out


def test_dry_run_of_a_gpu_config_without_a_gpu_states_its_assumptions(capsys) -> None:
    assert main(["run", str(ROOT / "configs" / "imagenet-search.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "projected below for a cluster that fits one trial at a time" in out  # not this 2-core machine
    assert "ASSUMED ILSVRC-2012 train size: s3://YOUR-BUCKET/imagenet not readable here" in out
    assert "ASSUMED 1 s per step: the config runs on GPUs and this machine has none, so nothing was measured" in out
    assert "evaluation not projected" in out
    # 50 epochs x 2 phases x 125 steps (1,281,167 x 0.1 / 1024) x 1 s = 3.47 h per trial; x 8 GPUs x 4 trials
    assert "search: 3.47 h per trial x 4 trials in 4 wave(s)" in out and "search cost: 111 GPU-hours" in out


def test_unreachable_addresses_fail_before_any_compute(tmp_path, capsys, monkeypatch) -> None:
    sets = ["--set", f"output_dir={tmp_path}"]
    assert main(["run", *sets, "--set", "tracking.uri=http://127.0.0.1:9"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert main(["run", *sets, "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]) == 2
    assert "RAY_ADDRESS=127.0.0.1:9 is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def kill_run(lc: ModuleType, proc: subprocess.Popen, marker: str) -> int:
    """SIGKILL the driver's process group, then every process of that run left behind (the local Ray's GCS,
    raylet, agents and workers and the MLflow server run in other sessions but carry ``marker``); returns
    how many orphans there were."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = lc.cluster_processes(marker)
    assert lc.terminate(orphans, 2.0) == []
    assert lc.cluster_processes(marker) == []
    return len(orphans)


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd`` with stdout and stderr into a pipe (not a terminal); its return code and its lines, each
    with the time it arrived."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [(time.monotonic(), "")], time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append((time.monotonic(), line.rstrip("\n")))
        if time.monotonic() > deadline:
            proc.kill()
    return proc.wait(), [*lines, (time.monotonic(), "")]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_pipeline_end_to_end_survives_a_killed_driver(tmp_path: Path, lc: ModuleType) -> None:
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    sets = [
        f"output_dir={out}",
        f"tracking.uri=sqlite:///{db}",
        "search.epochs=2",
        "search.warmup_epochs=1",
        "data.weight_fraction=0.2",
        "data.arch_fraction=0.2",
        "retrain.epochs=2",
        "retrain.teacher_epochs=1",
        # 2 trials, one per override set (an ablation), half the sweep time of the demo's 4
        "sweep.seeds=[0]",
        "sweep.spaces=[dcpnas_3x3]",
        "sweep.variants=[{}, {search.lam: 0}]",
    ]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", *(arg for s in sets for arg in ("--set", s))]
    ray_tmp = Path(tempfile.mkdtemp(prefix="e2e", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    first_marker, second_marker = uuid.uuid4().hex, uuid.uuid4().hex
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**env, lc.MARKER: first_marker},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    trials = out / "demo" / "ray" / "trials"
    deadline = time.time() + 600
    try:
        # Ray Train writes a checkpoint manager snapshot once a reported checkpoint is registered
        while not (checkpointed := {p.parent.name for p in trials.glob("search-*/checkpoint_manager_snapshot.json")}):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no search checkpoint within 10 minutes"
            time.sleep(0.5)
        assert first.poll() is None, "the run ended before it could be killed"
    finally:
        orphans = kill_run(lc, first, first_marker)
    assert orphans > 0  # the kill left Ray/MLflow processes in other sessions behind, and they were found
    try:
        rc, lines = run_timed(cmd, tmp_path, {**env, lc.MARKER: second_marker}, timeout_s=1800)
    finally:
        lc.terminate(lc.cluster_processes(second_marker), 2.0)  # ray.shutdown() may leave an agent behind
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = "\n".join(line for _, line in lines)
    (tmp_path / "second.log").write_text(output)
    assert rc == 0, output[-6000:]
    assert "report: " in output and "MLflow UI: dcpnas ui" in output
    assert "resuming Tune experiment" in output
    # progress as a log gets it (not a terminal): never silent for a minute; every epoch this run ran shown for
    # every trial; the only local link is the one to `dcpnas ui`
    gap, at = max((b[0] - a[0], i) for i, (a, b) in enumerate(itertools.pairwise(lines)))
    assert gap < 60, (gap, [line for _, line in lines[max(at - 3, 0) : at + 2]])
    train_names = {t.key: t.train_name for t in plan(load_config(None, sets), {"CPU": 2}).trials}
    # every trial runs epoch 2 here; epoch 1 too unless it resumed from its epoch-1 checkpoint, which a trial can
    # register between the snapshot above and the kill, so only epoch 2 is certain to be shown for every trial
    for key in train_names:
        line = rf"^\[{re.escape(key)}\] epoch 2/2  child (\d+)/\1  parent val [\d.]+  child val "
        assert re.search(line, output, re.M), key
    assert re.search(r"^\[retrain \w{12} step2\] epoch 2/2  step2 (\d+)/\1 .* top-1 [\d.]+  img/s", output, re.M)
    assert re.findall(r"https?://(?:127\.0\.0\.1|localhost)[:/][^\s)]*", output) == ["http://127.0.0.1:5000"]
    assert "Downloading artifacts" not in output

    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("stage"), []).append(r)
    # nothing created twice or lost across the kill
    assert {stage: len(rs) for stage, rs in by_stage.items()} == {"sweep": 1, "search": 2, "retrain": 1, "eval": 1}
    (sweep,), search = by_stage["sweep"], by_stage["search"]
    assert {r.data.tags["mlflow.parentRunId"] for r in search} == {sweep.info.run_id}
    keys = sorted(r.data.tags["trial_key"] for r in search)
    assert keys == ["seed=0,space=dcpnas_3x3", "seed=0,space=dcpnas_3x3,search.lam=0.0"]  # once each
    lam0 = next(r for r in search if r.data.tags["trial_key"].endswith("lam=0.0"))
    assert (lam0.data.tags["override.search.lam"], lam0.data.tags["overrides"]) == ("0.0", "search.lam=0.0")
    assert {r.data.params["search.lam"] for r in search} == {"0.0", "0.005"}  # the trial searched with it
    assert sweep.info.status == "FINISHED" and sweep.data.tags["split_sha256"]
    ctx = tracking.prepare(f"sqlite:///{db}", "demo")
    for r in search:
        assert r.info.status == "FINISHED" and r.data.tags["seed"] == "0" and "child/val_acc" in r.data.metrics
        assert r.data.tags["genotype_hash"] == r.data.params["genotype.hash"]
        genotype, run_id = tracking.find_genotype(ctx, r.info.run_id)  # what `dcpnas retrain --genotype RUN` reads
        assert run_id == r.info.run_id and genotype.hash == r.data.tags["genotype_hash"]
        assert genotype.space == r.data.tags["space"]
        names = {a.path for a in client.list_artifacts(r.info.run_id, "genotype")}
        assert {"genotype/genotype.json", "genotype/alpha_history.png", "genotype/alphas.png"} <= names
        if train_names[r.data.tags["trial_key"]] in checkpointed:  # resumed from its checkpoint: no epoch run twice
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "epoch")) == [0, 1]
    # the dry run's projection of the first (warm-up) epoch's training against what each trial's first epoch
    # cost, both in process CPU time: a busy box (the other test worker, the two trials sharing two cores) made
    # wall-time ratios range 0.37-0.92 here, CPU time is what the epoch costs on cores of its own
    from pipeline.job import dry_run

    projected = dry_run(load_config(None, sets), None, 0.0, log=lambda *_: None, clock=time.process_time)
    for r in search:
        (first,) = (m.value for m in client.get_metric_history(r.info.run_id, "epoch_cpu_seconds") if m.step == 0)
        assert 0.7 <= projected["first_epoch_train_s"] / first <= 1.3, (projected["first_epoch_train_s"], first)
    (retrain,) = by_stage["retrain"]  # top_k 1
    assert retrain.info.status == "FINISHED" and 0.1 < retrain.data.metrics["top1"] <= 1.0
    assert retrain.data.tags["origin"] == "search"
    assert {"step1/model.pt", "step2/model.pt", "teacher/model.pt"} <= {
        a.path for d in ("teacher", "step1", "step2") for a in client.list_artifacts(retrain.info.run_id, d)
    }
    assert retrain.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in search}
    (evaluated,) = by_stage["eval"]
    assert evaluated.data.tags["mlflow.parentRunId"] == retrain.info.run_id
    assert evaluated.data.metrics["num_examples"] == 364  # the digits test split: every held-out image once
    report = out / "demo" / "report"
    assert (report / "index.html").exists() and list(report.glob("*.png"))
    groups = json.loads((report / "summary.json").read_text())["groups"]  # the report groups by overrides
    assert [(g["overrides"], g["trials"]) for g in groups] == [("", 1), ("search.lam=0.0", 1)]
    assert "report/index.html" in {a.path for a in client.list_artifacts(sweep.info.run_id, "report")}

    # the finished sweep run once more: Tune restores the experiment, every trial is found in MLflow, nothing re-runs
    again = run_sweep(load_config(None, sets))
    assert sorted(r.run_id for r in again) == sorted(r.info.run_id for r in search)
    assert {r.trial_key: r.genotype_hash for r in again} == {
        r.data.tags["trial_key"]: r.data.tags["genotype_hash"] for r in search
    }
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == len(runs)
