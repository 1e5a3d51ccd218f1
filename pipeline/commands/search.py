"""``dcpnas search``: one DCP-NAS search in this process (CPU or one GPU), no Ray."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run one DCP-NAS search in this process (CPU or one GPU)")
    add_config_arguments(p)
    p.add_argument("--out", help="output root (default: the config's output_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.stages.search.local import run_search

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg = cfg.model_copy(update={"output_dir": args.out})
    result = run_search(cfg, resume=not args.fresh)
    print(result["genotype"].describe())
    return 0
