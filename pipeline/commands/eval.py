"""``dcpnas eval``: top-1/top-5 and cost of a retrained model on the held-out split."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and cost of a retrained model on the held-out split")
    p.add_argument("--model", required=True, help="a retrain run id (MLflow) or a model file path/URI")
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.stages.eval import run_eval

    result = run_eval(load_config(args.config, args.set), args.model)
    for k, v in result.metrics.items():
        print(f"{k}: {v:.4f}" if k in ("top1", "top5") else f"{k}: {v:,.0f}" if v >= 100 else f"{k}: {v:g}")
    if result.eval_run_id:
        print(f"eval run: {result.eval_run_id}")
    return 0
