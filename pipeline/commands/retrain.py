"""``dcpnas retrain``: retrain a genotype as a 1-bit network (two-step KD), tracked in MLflow."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="retrain a genotype as a 1-bit network (two-step KD on DeepSpeed)")
    p.add_argument(
        "--genotype", help="MLflow run id, models:/name@alias, JSON file or built-in name (default: retrain.genotype)"
    )
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.stages.retrain.stage import run_retrain

    out = run_retrain(load_config(args.config, args.set), args.genotype)
    print(
        f"retrain run {out['run_id']}: top1 {out['top1']:.4f}  top5 {out['top5']:.4f}  "
        f"params {out['params']:,.0f} (binary {out['binary_params']:,.0f})  OPs {out['ops']:,.0f}  "
        f"memory {out['memory_mbit']:.2f} Mbit"
    )
    return 0
