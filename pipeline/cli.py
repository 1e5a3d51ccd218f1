"""The ``dcpnas`` command line: ``dcpnas X`` is ``pipeline/commands/X.py`` (its ``register`` adds the
subcommand, its ``main`` runs it). Command modules import their heavy dependencies inside ``main``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dcpnas.genotype import GenotypeError
from dcpnas.registry import UnknownNameError
from pipeline.errors import UserError

COMMANDS = ("run", "search", "sweep", "data", "genotype", "submit", "retrain", "eval", "report", "ui")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcpnas", description="DCP-NAS search and retraining of 1-bit CNNs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


# MLflow prints "View run ... at http://127.0.0.1:<port>" for the stage's server, gone when the stage ends,
# and a progress bar for every artifact read; Tune's new output engine prints an experiment banner and a
# TensorBoard hint even at verbose=0 (its old one honours verbose=0). The progress board and the closing
# lines say what matters.
QUIET = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def main(argv: Sequence[str] | None = None) -> int:
    for k, v in QUIET.items():  # before Ray starts, so its workers inherit them; an explicit setting wins
        os.environ.setdefault(k, v)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, GenotypeError, UnknownNameError) as e:
        print(f"dcpnas {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
