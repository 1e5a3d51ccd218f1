"""``dcpnas run``: the whole pipeline (data, sweep, select, retrain, eval, report), or its dry run."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config
from pipeline.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: data, sweep, select, retrain, eval, report")
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="the same as --config CONFIG")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resource plan and projected cost, start nothing")
    p.add_argument("--step-seconds", type=float, help="dry run: use this measured search step time (e.g. on a GPU)")
    p.add_argument("--price", type=float, default=0.0, help="dry run: price per GPU-hour (or core-hour) for the cost")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.job import dry_run, run

    if args.config and args.config_file and args.config != args.config_file:
        raise UserError(f"two configs given ({args.config_file} and --config {args.config}): give one")
    path = args.config or args.config_file
    cfg = load_config(path, args.set)
    if args.dry_run:
        dry_run(cfg, args.step_seconds, args.price)
        return 0
    out = run(cfg)
    if out["report"] is not None:
        print(f"\nreport: {out['report'].resolve()}")
    for r in out["retrains"]:
        print(f"retrained {r['genotype_hash'][:12]}: top1 {r['top1']:.4f} (run {r['run_id']})")
    where = f" --config {path}" if path else ""
    print(f"MLflow UI: dcpnas ui{where}  (then open http://127.0.0.1:5000)")
    return 0
