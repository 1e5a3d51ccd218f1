"""Tracking under load (issue 16): N writer processes log 20 metrics per epoch at once, with the project's own
tracking functions (``open_child_run``, ``log_epoch``, ``finish_run``), through

* ``serving``: the local server ``tracking.serving`` starts (one worker, pool sized for N, SQLite in WAL mode),
* ``standalone``: a plain ``mlflow server`` on 127.0.0.1 with MLflow's defaults (4 workers, default pool),

both over a fresh SQLite store. Reports the errors ``log_epoch`` raised (after the retries of
``pipeline.tracking.retry``), the points missing from the store and duplicated in it (read from the database: every
(run, metric, epoch) must be there exactly once), and points/s. Writers are forked from this process, which
imported only MLflow and ``pipeline.tracking``, so 64 of them start in a second.

    .venv/bin/python bench/tracking_load.py [--writers 8 32 64] [--epochs 20] [--modes serving standalone]
        [--journal wal|delete]

``--journal delete`` undoes ``prepare``'s WAL mode (SQLite's default rollback journal); exporting
``MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=5 MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=10`` gives ``serving`` MLflow's
default pool (exported values win over its sizing): the two ablations of docs/benchmarks/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.tracking.server import free_port

METRICS = 20
CONFIG = {"name": "load", "tracking": {"uri": None}}


@dataclass
class Writers:
    procs: list[Any]
    results: Any  # queue of (index, errors, first error)
    started: float


@dataclass
class Load:
    mode: str
    writers: int
    epochs: int
    errors: int
    lost: int
    duplicates: int
    seconds: float

    @property
    def points_per_s(self) -> float:
        return self.writers * self.epochs * METRICS / self.seconds


def epoch_metrics(index: int, step: int) -> dict[str, float]:
    return {f"m{k:02d}": index + step / 100 + k / 10_000 for k in range(METRICS)}


def write_trial(ctx: tracking.TrackingContext, parent: str, index: int, epochs: int, pause_s: float, out: Any) -> None:
    """One trial's writes; a failed ``log_epoch`` is counted and the trial goes on, as a sweep's would not."""
    run = tracking.open_child_run(ctx, parent, f"writer={index}", {"stage": "search", "space": "load", "seed": index})
    errors, first = 0, ""
    for step in range(epochs):
        try:
            tracking.log_epoch(ctx, run, epoch_metrics(index, step), step)
        except Exception as e:
            errors, first = errors + 1, first or repr(e)
        time.sleep(pause_s)
    tracking.finish_run(ctx, run)
    out.put((index, errors, first))


def start_writers(
    ctx: tracking.TrackingContext, parent: str, writers: int, epochs: int, pause_s: float = 0.0
) -> Writers:
    mp = multiprocessing.get_context("fork")
    out = mp.Queue()
    procs = [mp.Process(target=write_trial, args=(ctx, parent, i, epochs, pause_s, out)) for i in range(writers)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    return Writers(procs, out, started)


def wait_writers(w: Writers, timeout_s: float = 900.0) -> tuple[int, float, list[str]]:
    """(errors, seconds, messages); a writer that died (e.g. could not open its run) counts as one error."""
    results = []
    deadline = time.monotonic() + timeout_s
    while len(results) < len(w.procs) and time.monotonic() < deadline:
        try:
            results.append(w.results.get(timeout=1))
        except queue.Empty:  # a writer that died never reports
            if all(p.exitcode is not None for p in w.procs) and w.results.empty():
                break
    seconds = time.perf_counter() - w.started
    for p in w.procs:
        p.join(60)
    died = sum(p.exitcode != 0 for p in w.procs)
    return sum(r[1] for r in results) + died, seconds, [r[2] for r in results if r[2]]


def count_points(db: Path, parent: str, writers: int, epochs: int) -> tuple[int, int]:
    """(lost, duplicated) (run, metric, epoch) points of the writers under ``parent``, read from the database."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT r.name, m.key, m.step, COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId' AND t.value = ? "
            "GROUP BY r.name, m.key, m.step",
            (parent,),
        ).fetchall()
    con.close()
    present = {(name, key, step): n for name, key, step, n in rows}
    expected = {(f"writer={i}", f"m{k:02d}", s) for i in range(writers) for k in range(METRICS) for s in range(epochs)}
    return len(expected - set(present)), sum(n - 1 for n in present.values())


@contextmanager
def standalone(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A plain ``mlflow server`` with MLflow's defaults, on loopback."""
    port = free_port("127.0.0.1", 0)
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--artifacts-destination", str(artifacts)]
    with open(artifacts.parent / "standalone.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


def run_load(mode: str, writers: int, epochs: int, root: Path, journal: str = "wal") -> Load:
    ctx = tracking.prepare(f"sqlite:///{root / mode / str(writers) / 'mlflow.db'}", "load")
    db = tracking.sqlite_path(ctx.uri)
    with sqlite3.connect(db) as con:
        con.execute(f"PRAGMA journal_mode={journal}")
    con.close()
    server = tracking.serving(ctx, writers=writers) if mode == "serving" else None
    with server or standalone(ctx.uri, tracking.artifacts_dir(ctx.uri)) as served:
        served = served if isinstance(served, tracking.TrackingContext) else replace(ctx, uri=served)
        parent = tracking.open_sweep_run(served, "sweep", CONFIG)
        errors, seconds, messages = wait_writers(start_writers(served, parent, writers, epochs))
    lost, duplicates = count_points(db, parent, writers, epochs)
    if messages:
        print(f"  first errors: {messages[:3]}", flush=True)
    return Load(mode, writers, epochs, errors, lost, duplicates, seconds)


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "load1": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["serving", "standalone"], choices=["serving", "standalone"])
    ap.add_argument("--journal", default="wal", choices=["wal", "delete"])
    args = ap.parse_args()
    pool = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_SQLALCHEMYSTORE_")}
    print(json.dumps({**machine(), "journal": args.journal, **pool}), flush=True)
    print("| server | writers | epochs | errors | lost | duplicated | seconds | points/s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for n in args.writers:
                r = run_load(mode, n, args.epochs, Path(tmp), args.journal)
                print(
                    f"| {r.mode} | {r.writers} | {r.epochs} | {r.errors} | {r.lost} | {r.duplicates} "
                    f"| {r.seconds:.1f} | {r.points_per_s:.0f} |",
                    flush=True,
                )
                print(json.dumps(asdict(r)), file=sys.stderr, flush=True)
    print(json.dumps({"load1_after": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
