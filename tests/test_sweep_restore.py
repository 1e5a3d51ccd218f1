"""``dcpnas sweep`` killed mid-sweep (driver and process group, SIGKILL) and re-run: the Tune experiment and the
trials' Ray Train checkpoints are restored, and MLflow ends with exactly one FINISHED nested run per trial."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_local_cluster import lc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRIALS = {"seed=0,space=dcpnas_3x3": "search-seed0-dcpnas_3x3", "seed=1,space=dcpnas_3x3": "search-seed1-dcpnas_3x3"}
SETS = [
    "name=restoretest",
    "data.batch_size=32",
    "data.weight_fraction=0.05",
    "data.arch_fraction=0.05",
    "search.init_channels=4",
    "search.layers=3",
    "search.epochs=2",  # a checkpoint after the warm-up epoch, then one epoch with architecture steps
    "search.warmup_epochs=1",
    "search.arch_lr=0.01",
    "sweep.seeds=[0,1]",
    "sweep.spaces=[dcpnas_3x3]",
    "sweep.num_cpus=2",
    "sweep.max_failures=0",
]


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """The local Ray's temp dir (``RAY_TMPDIR``): short for its unix sockets, and not the shared /tmp/ray."""
    d = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sweep(out: Path, db: str, ray_tmp: Path, marker: str, log: Path) -> subprocess.Popen:
    """``dcpnas sweep`` in its own process group; it and everything it starts (Ray, the MLflow server) inherit
    ``marker`` in their environment, which is how the test finds exactly this run's processes afterwards."""
    cmd = [str(Path(sys.executable).parent / "dcpnas"), "sweep"]
    for s in [f"output_dir={out}", f"tracking.uri={db}", *SETS]:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp), **{lc.MARKER: marker})
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def kill_run(proc: subprocess.Popen, marker: str) -> int:
    """SIGKILL the driver's process group, then every process of that run left behind (Ray's GCS, raylet, agents
    and workers, the MLflow server live in other sessions); returns how many orphans there were."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = lc.cluster_processes(marker)
    assert lc.terminate(orphans, 2.0) == []
    assert lc.cluster_processes(marker) == []
    return len(orphans)


def test_sweep_killed_mid_run_resumes_with_one_finished_run_per_trial(tmp_path: Path, ray_tmp: Path) -> None:
    import mlflow

    from pipeline import tracking

    db = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    trials_dir = tmp_path / "restoretest" / "ray" / "trials"
    first = sweep(tmp_path, db, ray_tmp, marker := uuid.uuid4().hex, tmp_path / "first.log")
    t0 = time.monotonic()
    try:
        # a Train checkpoint manager snapshot is written once a reported checkpoint is registered
        while not (done := {p.parent.name for p in trials_dir.glob("*/checkpoint_manager_snapshot.json")}):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() - t0 < 300, "no trial checkpoint within 300 s"
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before it could be killed"
    finally:
        orphans = kill_run(first, marker)
    print(f"killed after {time.monotonic() - t0:.1f} s with checkpoints of {sorted(done)}; {orphans} orphans")
    assert orphans > 0  # the kill did leave Ray/MLflow processes behind, and they were found

    t0 = time.monotonic()
    second = sweep(tmp_path, db, ray_tmp, marker := uuid.uuid4().hex, tmp_path / "second.log")
    try:
        rc = second.wait(timeout=600)
    finally:
        if second.poll() is None:
            kill_run(second, marker)
        lc.terminate(lc.cluster_processes(marker), 2.0)  # ray.shutdown() may leave an agent behind
    log = (tmp_path / "second.log").read_text()
    print(f"re-run: {time.monotonic() - t0:.1f} s")
    assert rc == 0, log[-4000:]
    assert "resuming Tune experiment" in log

    ctx = tracking.prepare(db, "restoretest")
    mlflow.set_tracking_uri(db)
    runs = mlflow.search_runs([ctx.experiment_id], output_format="list")
    sweeps = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    searches = mlflow.search_runs([ctx.experiment_id], "tags.stage = 'search'", output_format="list")
    assert len(runs) == 1 + len(TRIALS)  # nothing else was created: no duplicate parent or trial run
    assert sorted(r.data.tags[tracking.TRIAL_KEY_TAG] for r in searches) == sorted(TRIALS)  # one run per trial
    for r in searches:
        assert r.info.status == "FINISHED", r.data.tags
        assert r.data.tags[tracking.PARENT_TAG] == sweeps[0].info.run_id
        genotype, _ = tracking.find_genotype(ctx, r.info.run_id)
        assert genotype.hash == r.data.tags["genotype_hash"]
        files = {f.path for f in mlflow.MlflowClient(db).list_artifacts(r.info.run_id, "genotype")}
        assert "genotype/genotype.json" in files
        # a trial checkpointed before the kill resumed from it: epoch 0 was not run (and logged) again
        epochs = [m.step for m in mlflow.MlflowClient(db).get_metric_history(r.info.run_id, "epoch")]
        if TRIALS[r.data.tags[tracking.TRIAL_KEY_TAG]] in done:
            assert sorted(epochs) == [0, 1], epochs
