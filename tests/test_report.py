"""The sweep report and ``dcpnas ui`` against a real SQLite MLflow store built with ``pipeline.tracking``.

The store: spaces darts (DARTS V2 genotype) and dcpnas (DCP-NAS-L cell) × seeds 0, 1, plus a
diverged darts trial; both finished darts trials are retrained (seed 0 also evaluated), dcpnas is
not. Run end times are set explicitly so costs derived from wall time are exact.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import tracking
from pipeline.cli import main
from pipeline.commands import ui
from pipeline.errors import UserError
from pipeline.report.build import build_report, publish_report
from pipeline.report.collect import find_sweep_run
from pipeline.report.html import NOT_RUN
from pipeline.report.model import REPORT_ARTIFACT_DIR, pareto_front, run_cost

EXPERIMENT = "report-test"
CONFIG = {
    "name": EXPERIMENT,
    "sweep": {"workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0.5, "gpus_per_worker": 0},
    "retrain": {"workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0},
}
GENOTYPES = {"darts": "darts_v2", "dcpnas": "ddpnas_mcn_2"}
CHILD_ACC = {("darts", 0): [0.2, 0.4, 0.5], ("darts", 1): [0.3, 0.6, 0.7], ("dcpnas", 0): [0.1, 0.3, 0.45]}
CHILD_ACC[("dcpnas", 1)] = [0.2, 0.3, 0.65]
HOURS = {("darts", 0): 2.0, ("darts", 1): 1.0, ("darts", 2): 0.5, ("dcpnas", 1): 4.0}  # dcpnas 0 logs cost/*
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _end(client: MlflowClient, run_id: str, hours: float, status: str = "FINISHED") -> None:
    start = client.get_run(run_id).info.start_time
    client.set_terminated(run_id, status, end_time=start + int(hours * 3.6e6))


def _search_trial(ctx: tracking.TrackingContext, sweep: str, space: str, seed: int) -> str:
    from dcpnas.genotype import load_genotype
    from dcpnas.spaces import get_space

    client = MlflowClient(ctx.uri)
    run = tracking.open_child_run(
        ctx, sweep, f"seed={seed},space={space}", {"stage": "search", "space": space, "seed": seed}
    )
    for epoch, acc in enumerate(CHILD_ACC[(space, seed)]):
        metrics = {
            "child/val_acc": acc,
            "parent/val_acc": acc + 0.1,
            "alpha_entropy": 2.0 - 0.5 * epoch - 0.1 * seed,
            "skip_normal": epoch + seed,
            "skip_reduce": 1,
            "epoch_seconds": 60.0 * (seed + 1),
        }
        tracking.log_epoch(ctx, run, metrics, step=epoch)
    space_def = get_space(space)
    gen = torch.Generator().manual_seed(seed)
    history = [torch.randn(2, space_def.num_edges, space_def.num_ops, generator=gen) for _ in range(3)]
    genotype = load_genotype(GENOTYPES[space])
    if (space, seed) == ("dcpnas", 1):  # only the JSON, as a run logged without diagrams: the report draws them
        client.log_dict(run, genotype.to_dict(), f"{tracking.GENOTYPE_DIR}/genotype.json")
        client.set_tag(run, "genotype_hash", genotype.hash)
    else:
        tracking.log_genotype(ctx, run, genotype, alpha_history=history)
    if (space, seed) == ("dcpnas", 0):
        tracking.log_epoch(ctx, run, {"cost/core_hours": 0.25, "cost/gpu_hours": 0.0}, step=0)
        tracking.finish_run(ctx, run)
    else:
        _end(client, run, HOURS[(space, seed)])
    return run


def _retrain(ctx: tracking.TrackingContext, search_run: str, seed: int, top1: float, ops: float) -> str:
    run = tracking.open_child_run(ctx, search_run, "retrain", {"stage": "retrain", "space": "darts", "seed": seed})
    for epoch in range(2):
        curves = {"teacher/loss": 1.0 / (epoch + 1), "step1/top1": 0.5 + epoch / 10, "step2/top1": 0.6 + epoch / 10}
        tracking.log_epoch(ctx, run, {**curves, "step2/top5": 0.9, "step1/loss": 1.0, "step2/loss": 0.8}, step=epoch)
    final = {"top1": top1, "top5": 0.99, "params": 3.3e6, "binary_params": 3.0e6, "flops": 5e7, "bops": 3.2e9}
    tracking.log_epoch(ctx, run, {**final, "ops": ops, "memory_mbit": 4.5}, step=2)
    tracking.log_epoch(ctx, search_run, {"retrain/top1": top1, "retrain/ops": ops}, step=0)  # as retrain_genotype
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns' / 'mlflow.db'}"
    ctx = tracking.prepare(uri, EXPERIMENT)
    client = MlflowClient(uri)
    sweep = tracking.open_sweep_run(ctx, "sweep", CONFIG, {"seeds": "0,1"})
    runs = {(space, seed): _search_trial(ctx, sweep, space, seed) for space in GENOTYPES for seed in (0, 1)}
    diverged = tracking.open_child_run(
        ctx, sweep, "seed=2,space=darts", {"stage": "search", "space": "darts", "seed": 2}
    )
    tracking.log_epoch(ctx, diverged, {"child/val_acc": math.nan, "epoch_seconds": 60.0}, step=0)
    client.set_tag(diverged, tracking.FAILURE_TAG, "diverged: loss <nan> & 'inf'")
    _end(client, diverged, HOURS[("darts", 2)], "FAILED")

    r0 = _retrain(ctx, runs[("darts", 0)], 0, top1=0.88, ops=1.0e8)
    tracking.log_epoch(ctx, r0, {"cost/core_hours": 0.5, "cost/gpu_hours": 0.0}, step=2)
    tracking.finish_run(ctx, r0)
    ev = tracking.open_child_run(ctx, r0, "eval", {"stage": "eval", "space": "darts", "seed": 0})
    tracking.log_epoch(ctx, ev, {"top1": 0.91, "top5": 0.995, "num_examples": 360, "cost/core_hours": 0.1}, step=0)
    tracking.finish_run(ctx, ev)
    r1 = _retrain(ctx, runs[("darts", 1)], 1, top1=0.89, ops=2.0e8)
    _end(client, r1, 0.5)  # no cost/* metrics: 0.5 h × retrain.workers 2 × cpus_per_worker 1
    return {"uri": uri, "ctx": ctx, "sweep": sweep, "runs": runs, "retrains": (r0, r1), "eval": ev}


@pytest.fixture(scope="module")
def built(store: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out") / "report"
    index = build_report(store["ctx"], store["sweep"], out)
    publish_report(store["ctx"], store["sweep"], out)
    page = index.read_text()
    return {"out": out, "index": index, "page": page, "summary": json.loads((out / "summary.json").read_text())}


def _row(page: str, row_id: str) -> str:
    m = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page)
    assert m, f"no row {row_id}"
    return m.group(1)


def _cells(row: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_pareto_front_of_a_hand_made_case() -> None:
    points = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.6), (0.5, 0.4), (math.nan, 0.9), (1.0, 0.5)]
    assert pareto_front(points) == [True, True, False, False, True, False, True]
    assert pareto_front([]) == []


def test_search_statistics_are_mean_and_sample_std_over_finished_seeds(built: dict[str, Any]) -> None:
    darts = built["summary"]["spaces"]["darts"]
    finals = [CHILD_ACC[("darts", s)][-1] for s in (0, 1)]  # the diverged seed 2 is left out
    assert (darts["trials"], darts["finished"]) == (3, 2)
    assert darts["search"]["child/val_acc"] == {
        "n": 2,
        "mean": statistics.fmean(finals),
        "std": statistics.stdev(finals),
    }
    assert darts["search"]["search_minutes"]["mean"] == statistics.fmean([3 * 60 / 60, 3 * 120 / 60])
    row = _cells(_row(built["page"], "search-darts"))
    assert row[:3] == ["darts", "2/3", "0.6 ± 0.1414"]
    assert row[3] == "0.7 ± 0.1414"  # parent/val_acc = child + 0.1
    assert row[-1] == "4.5 ± 2.121"  # Σ epoch_seconds: 3 and 6 minutes
    dcpnas = _cells(_row(built["page"], "search-dcpnas"))
    assert dcpnas[2] == f"{statistics.fmean([0.45, 0.65]):.4g} ± {statistics.stdev([0.45, 0.65]):.4g}"


def test_retrain_prefers_eval_accuracy_and_missing_retrain_is_not_run(built: dict[str, Any]) -> None:
    darts = built["summary"]["spaces"]["darts"]["retrain"]
    assert darts["top1"] == {"n": 2, "mean": statistics.fmean([0.91, 0.89]), "std": statistics.stdev([0.91, 0.89])}
    row = _cells(_row(built["page"], "retrain-darts"))
    assert row[:4] == ["darts", "2", "0.9 ± 0.01414", "0.9925 ± 0.003536"]
    assert row[6] == "150M ± 70.71M"  # OPs
    assert built["summary"]["spaces"]["dcpnas"]["retrain"] is None
    assert _cells(_row(built["page"], "retrain-dcpnas")) == ["dcpnas", "0", NOT_RUN]
    assert _cells(_row(built["page"], "cost-dcpnas"))[-1] == NOT_RUN


def test_cost_from_metrics_else_wall_time_times_reserved_resources(built: dict[str, Any]) -> None:
    cost = {s: built["summary"]["spaces"][s]["cost"] for s in GENOTYPES}
    # search: (0.5 trial + 1 worker × 0.5) CPUs × (2 + 1 + 0.5) h; dcpnas: logged 0.25 + 4 h × 1 CPU
    assert cost["darts"]["search_core_hours"] == pytest.approx(3.5)
    assert cost["dcpnas"]["search_core_hours"] == pytest.approx(4.25)
    assert cost["darts"]["search_gpu_hours"] == 0
    # retrain: logged 0.5 + eval's logged 0.1 + 0.5 h × 2 workers × 1 CPU
    assert cost["darts"]["retrain_core_hours"] == pytest.approx(1.6)
    assert cost["dcpnas"]["retrain_core_hours"] is None
    assert _cells(_row(built["page"], "cost-darts"))[1:4] == ["3.5", "0", "1.6"]
    assert "2 h wall × 1 CPUs, 0 GPUs (sweep.*)" in built["page"]
    assert "0.5 h wall × 2 CPUs, 0 GPUs (retrain.*)" in built["page"]
    assert "logged cost/* metrics" in built["page"]


def test_run_cost_says_when_resources_are_unknown() -> None:
    run = {"metrics": {}, "start_time": 0, "end_time": 3_600_000}
    assert run_cost(run, {"sweep.workers": "2"}, ("sweep",), 0).core_hours is None
    unknown = run_cost(run, {}, ("eval", "retrain"), 0)
    assert (unknown.core_hours, unknown.how) == (
        None,
        "unknown: no cost/* metrics and no eval.workers or retrain.workers param",
    )


def test_pareto_membership_in_the_report(built: dict[str, Any], store: dict[str, Any]) -> None:
    points = {p["run_id"]: p for p in built["summary"]["pareto"]}
    r0, r1 = store["retrains"]
    assert points[r0]["front"] and points[r0]["top1"] == 0.91  # eval accuracy, fewer OPs
    assert not points[r1]["front"]
    assert built["page"].count('<tr class="front">') == 1


def test_pngs_are_valid_and_referenced_relatively(built: dict[str, Any]) -> None:
    out, page = built["out"], built["page"]
    srcs = re.findall(r'<img src="([^"]+)"', page)
    for name in ("pareto.png", "search_curves.png", "retrain_curves.png"):
        assert name in srcs
    genotype_pngs = [s for s in srcs if s.startswith("genotypes/")]
    # normal, reduce, alpha history of three trials; the JSON-only trial gets its cells drawn, no history
    assert len(genotype_pngs) == 3 * 3 + 2
    assert sum("dcpnas-seed1-" in s for s in genotype_pngs) == 2
    for src in srcs:
        path = (out / src).resolve()
        assert path.is_relative_to(out.resolve()) and path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as im:
            im.verify()
            assert min(im.size) > 100
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_failure_reason_is_escaped_and_genotype_missing_is_said(built: dict[str, Any]) -> None:
    page = built["page"]
    assert "FAILED: diverged: loss &lt;nan&gt; &amp; &#x27;inf&#x27;" in page
    assert "<nan>" not in page
    assert "no genotype logged (FAILED" in page


def test_report_is_logged_to_the_sweep_run(built: dict[str, Any], store: dict[str, Any]) -> None:
    client = MlflowClient(store["uri"])
    logged = {Path(a.path).name for a in client.list_artifacts(store["sweep"], REPORT_ARTIFACT_DIR)}
    assert {"index.html", "summary.json", "pareto.png", "search_curves.png", "genotypes"} <= logged
    html_path = client.download_artifacts(store["sweep"], "report/index.html", str(built["out"].parent / "dl"))
    assert Path(html_path).read_text() == built["page"]


def test_rebuild_replaces_a_report_but_refuses_other_directories(store: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.png").write_bytes(PNG_MAGIC)
    (out / "index.html").write_text("old")
    build_report(store["ctx"], store["sweep"], out)
    assert not (out / "stale.png").exists() and (out / "pareto.png").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="holds no report"):
        build_report(store["ctx"], store["sweep"], other)
    assert (other / "keep.txt").exists()


def test_cli_finds_the_sweep_by_config_hash_else_the_latest(store: dict[str, Any], tmp_path: Path) -> None:
    from dcpnas.checkpoint import config_hash

    ctx = store["ctx"]
    assert find_sweep_run(ctx, config_hash(CONFIG)) == store["sweep"]
    messages: list[str] = []
    later = tracking.open_sweep_run(ctx, "sweep", {**CONFIG, "name": "changed"})
    assert find_sweep_run(ctx, "0" * 64, log=messages.append) == later
    assert messages and later in messages[0]
    uri = store["uri"]
    args = ["report", "--set", f"tracking.uri={uri}", "--set", f"name={EXPERIMENT}", "--sweep-run", store["sweep"]]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert _row((tmp_path / "r" / "index.html").read_text(), "search-darts")
    missing = tmp_path / "none" / "mlflow.db"
    assert main(["report", "--set", f"tracking.uri=sqlite:///{missing}"]) == 2
    assert not missing.exists()


def test_only_loopback_hosts_count_as_private() -> None:
    assert all(ui.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(ui.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.org"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_stops_its_process_group(store: dict[str, Any]) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "ui", "--set", f"tracking.uri={store['uri']}"]
    cmd += ["--set", f"name={EXPERIMENT}", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("MLflow UI:" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        url = next(line for line in lines if "MLflow UI:" in line).split()[-1]
        assert (
            url == f"http://127.0.0.1:{port}/#/experiments/{store['ctx'].experiment_id}/runs?viewStateShareKey=dcpnas"
        )
        body = json.dumps({"experiment_ids": [store["ctx"].experiment_id], "max_results": 1000}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            found = {run["info"]["run_id"] for run in json.load(r)["runs"]}
        assert {store["sweep"], *store["runs"].values(), *store["retrains"], store["eval"]} <= found
        server = psutil.Process(proc.pid).children(recursive=True)
        listening = {c.laddr.ip for p in server for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        reader.join(10)
    assert rc == 0, "".join(lines)
    assert "MLflow UI stopped" in "".join(lines)
    _, alive = psutil.wait_procs(server, timeout=30)
    assert not alive
    with socket.socket() as s, pytest.raises(OSError):
        s.connect(("127.0.0.1", port))


def test_ui_refuses_a_store_without_runs_and_skips_a_busy_port(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare(uri, "empty")
    assert main(["ui", "--set", f"tracking.uri={uri}", "--set", "name=empty"]) == 2
    assert "experiment 'empty' at" in (err := capsys.readouterr().err) and "has no runs yet" in err
    assert "`dcpnas run`" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        assert taken < ui.free_port("127.0.0.1", taken) <= taken + ui.PORT_TRIES
        assert f"port {taken} is in use; serving on" in capsys.readouterr().out
        with pytest.raises(UserError, match=rf"ports {taken}-{taken} on 127.0.0.1 are all in use"):
            ui.free_port("127.0.0.1", taken, tries=1)


CHROMIUM = next((p for p in ("chromium", "chromium-browser", "google-chrome") if shutil.which(p)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
def test_ui_opens_on_the_runs_comparison_in_chromium(store: dict[str, Any], tmp_path) -> None:
    """What a person sees: the page `dcpnas ui` prints, rendered by headless Chromium, is the runs table
    with the comparison's columns and the trial runs as rows (screenshot: docs/img/ui-runs.png)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "ui", "--set", f"tracking.uri={store['uri']}"]
    cmd += ["--set", f"name={EXPERIMENT}", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = next(line for line in proc.stdout if line.startswith("MLflow UI:")).split()[-1]
        browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,900"]
        browser += ["--virtual-time-budget=30000", f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        shot = tmp_path / "ui-runs.png"
        subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    text = re.sub(r"<[^>]+>", " ", dom)
    for column in ("space", "seed", "genotype_hash", "child/val_acc", "retrain/top1", "retrain/ops"):
        assert column in text, column
    assert "seed=0,space=darts" in text and "seed=1,space=dcpnas" in text  # trial runs are rows
    assert shot.read_bytes().startswith(PNG_MAGIC)
    if os.environ.get("DCPNAS_UI_SCREENSHOT"):  # docs/img/ui-runs.png is made with this
        shutil.copy(shot, os.environ["DCPNAS_UI_SCREENSHOT"])
