"""``dcpnas sweep``: a Ray Tune grid of searches (seeds x spaces x override sets), tracked in MLflow."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune sweep of searches (seeds x spaces), tracked in MLflow")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (trials, resources, concurrency) and exit")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.runtime.session import planned_resources
    from pipeline.stages.search.sweep import plan, run_sweep

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        print(plan(cfg, planned_resources(cfg)).describe())
        return 0
    for t in run_sweep(cfg):
        status = "diverged" if t.diverged else t.status
        print(f"{t.trial_key}: {status}  genotype {t.genotype_hash[:12]}  run {t.run_id}")
    return 0
