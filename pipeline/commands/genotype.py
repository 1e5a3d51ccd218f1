"""``dcpnas genotype show|plot|cost REF``: inspect a genotype (JSON path or built-in name).

Module-level imports stay cheap: torch and matplotlib load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from dcpnas.genotype import Genotype

NETWORK_KINDS = ("cifar", "imagenet")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("genotype", help="show, plot or cost a genotype (JSON path or built-in name)")
    gsub = parser.add_subparsers(dest="genotype_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = gsub.add_parser(name, help=help)
        p.add_argument("ref", metavar="REF", help="genotype JSON file or built-in name (e.g. ddpnas_mcn_2, darts_v2)")
        return p

    show = action("show", "print the cells and the flat (MLflow) parameters")
    show.add_argument("--json", action="store_true", help="print JSON: genotype, hash and flat parameters")
    show.set_defaults(func=main_show)

    plot = action("plot", "write cell diagrams as PNG")
    plot.add_argument("--out", type=Path, default=Path("."), help="output directory (default: .)")
    plot.set_defaults(func=main_plot)

    cost = action("cost", "build the network and print params, binary weights, FLOPs, BOPs, OPs, memory")
    cost.add_argument("--network", choices=NETWORK_KINDS, default="imagenet")
    cost.add_argument("--size", choices=("s", "m", "l"), default="l", help="named width (default: l)")
    cost.add_argument("--channels", type=int, help="init channels C (overrides --size)")
    cost.add_argument("--layers", type=int, help="number of cells (overrides --size)")
    cost.add_argument("--stage", choices=("real", "binary_act", "binary_all"), default="binary_all")
    cost.add_argument("--style", choices=("bnn", "darts"), default="bnn")
    cost.add_argument("--num-classes", type=int, help="default: 1000 for imagenet, 10 for cifar")
    cost.add_argument("--input-size", type=int, help="input resolution (default: 224 imagenet, 32 cifar)")
    cost.add_argument("--json", action="store_true", help="print the counts as JSON")
    cost.set_defaults(func=main_cost)


def _load(ref: str) -> Genotype:
    from dcpnas.genotype import load_genotype

    return load_genotype(ref)


def main_show(args: argparse.Namespace) -> int:
    g = _load(args.ref)
    if args.json:
        print(json.dumps({"genotype": g.to_dict(), "hash": g.hash, "flat": g.flat()}, indent=2, sort_keys=True))
        return 0
    print(g.describe())
    print("flat parameters:")
    for key, value in g.flat().items():
        print(f"  {key} = {value}")
    return 0


def main_plot(args: argparse.Namespace) -> int:
    from dcpnas.visualize import plot_cell, plot_genotype

    g = _load(args.ref)
    name = Path(args.ref).stem
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a directory")
    paths = [plot_cell(g, cell, args.out / f"{name}_{cell}.png") for cell in ("normal", "reduce")]
    paths.append(plot_genotype(g, args.out / f"{name}.png"))
    for p in paths:
        print(p)
    return 0


def main_cost(args: argparse.Namespace) -> int:
    from dcpnas.cost import count_cost
    from dcpnas.network import SIZES, create_network

    g = _load(args.ref)
    C, layers = SIZES[args.network][args.size]
    C, layers = args.channels or C, args.layers or layers
    if C < 2 or layers < 1:
        raise UserError(f"--channels must be >= 2 and --layers >= 1 (got {C}, {layers})")
    num_classes = args.num_classes or (1000 if args.network == "imagenet" else 10)
    try:
        net = create_network(
            args.network, C=C, num_classes=num_classes, layers=layers, genotype=g, stage=args.stage, style=args.style
        )
    except ValueError as e:  # e.g. an odd width that factorized reduce cannot halve
        raise UserError(f"cannot build the network: {e}") from None
    size = args.input_size or net.input_size
    cost = count_cost(net, (1, 3, size, size))
    if args.json:
        print(
            json.dumps(
                {
                    "network": args.network,
                    "C": C,
                    "layers": layers,
                    "stage": args.stage,
                    "style": args.style,
                    "input_size": size,
                    **cost.as_dict(),
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{Path(args.ref).stem}: {args.network} C={C} layers={layers} stage={args.stage} style={args.style} "
        f"input={size}x{size}  (per image, auxiliary head excluded)"
    )
    rows = [
        ("params", f"{cost.params / 1e6:.3f} M"),
        ("binary weights", f"{cost.binary_weights / 1e6:.3f} M"),
        ("real params", f"{cost.real_params / 1e6:.3f} M"),
        ("FLOPs", f"{cost.flops / 1e9:.3f} G"),
        ("BOPs", f"{cost.bops / 1e9:.3f} G"),
        ("OPs (BOPs/64 + FLOPs)", f"{cost.ops / 1e9:.3f} G"),
        ("memory", f"{cost.memory_mbit:.2f} Mbit"),
    ]
    for key, value in rows:
        print(f"  {key:<22} {value}")
    return 0
