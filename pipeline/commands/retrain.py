"""``dcpnas retrain``: retrain a genotype as a 1-bit network (two-step KD), tracked in MLflow."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="retrain genotypes as 1-bit networks (two-step KD on DeepSpeed)")
    p.add_argument(
        "--genotype",
        action="append",
        default=[],
        help="MLflow run id, parent:<run id>, models:/name@alias, JSON file or built-in name (default: "
        "retrain.genotype); repeat it to retrain several side by side where the cluster holds them",
    )
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.stages.retrain.stage import run_retrain

    for out in run_retrain(load_config(args.config, args.set), args.genotype):
        print(
            f"retrain run {out['run_id']} ({out['genotype_hash'][:12]}): top1 {out['top1']:.4f}  "
            f"top5 {out['top5']:.4f}  params {out['params']:,.0f} (binary {out['binary_params']:,.0f})  "
            f"OPs {out['ops']:,.0f}  memory {out['memory_mbit']:.2f} Mbit"
        )
    return 0
