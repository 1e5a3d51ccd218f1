"""``dcpnas report``: the comparison dashboard of a sweep (HTML + PNG), logged to its MLflow run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="comparison dashboard of a sweep (HTML + PNG), logged to its MLflow run")
    add_config_arguments(p)
    p.add_argument("--sweep-run", metavar="RUN_ID", help="the sweep's parent run (default: found from the config)")
    p.add_argument("--out", metavar="DIR", help="report directory (default: <output_dir>/<name>/report)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline import tracking
    from pipeline.report.build import build_report, publish_report
    from pipeline.report.collect import find_sweep_run
    from pipeline.report.model import REPORT_ARTIFACT_DIR

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial otherwise
    cfg = load_config(args.config, args.set)
    ctx = tracking.prepare(tracking.existing_store(cfg.tracking.uri), cfg.experiment)
    sweep_run_id = args.sweep_run or find_sweep_run(ctx, cfg.hash)
    out = Path(args.out) if args.out else cfg.run_dir() / "report"
    index = build_report(ctx, sweep_run_id, out)
    publish_report(ctx, sweep_run_id, out)
    print(f"report: {index.resolve()}")
    print(f"logged to sweep run {sweep_run_id} as {REPORT_ARTIFACT_DIR}/ (browse with `dcpnas ui`)")
    return 0
