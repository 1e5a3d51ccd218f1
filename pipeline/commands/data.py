"""``dcpnas data convert|inspect``. Module imports stay light: handlers import the data stack themselves."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.data.sources import Source

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'256MB', '1.5GiB', '20000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    return max(1, int(float(m.group(1)) * UNITS[m.group(2).lower()]))


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="convert image datasets to Parquet shards and inspect them")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard-size", type=parse_size, default="256MB", help="target shard size (default 256MB)")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes building shards")
    common.add_argument("--resize-short-side", type=int, metavar="N", help="re-encode images whose shorter side > N")
    common.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default 90)")
    common.add_argument("--seed", type=int, default=0, help="seed of the shuffle that assigns images to shards")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    convert = actions.add_parser("convert", help="convert a dataset (resumable: finished shards are kept)")
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    helps = {
        "imagenet": "ILSVRC-2012: SRC/train/<wnid>/*.JPEG, SRC/val foldered or flat with a label file",
        "imagefolder": "SRC/<class>/* or SRC/{train,val,test}/<class>/*",
        "cifar10": "SRC = cifar-10-batches-py (python batches) or its parent",
        "digits": "scikit-learn's bundled 8x8 digits (no SRC)",
        "fashion-mnist": "SRC (default /usr/share/datasets/fashion-mnist) holds the idx files, gzipped or not",
    }
    for name, text in helps.items():
        p = formats.add_parser(name, parents=[common], help=text, description=text)
        if name == "fashion-mnist":
            p.add_argument("src", nargs="?", help="folder of the idx files (default /usr/share/datasets/fashion-mnist)")
        elif name != "digits":
            p.add_argument("src", help="source folder (path or fsspec URI)")
        p.add_argument("out", help="output dataset URI (file://, memory://, s3://, gs://, or a path)")
        p.set_defaults(func=main_convert)
    formats.choices["imagenet"].add_argument(
        "--val-labels", metavar="PATH", help="LOC_val_solution.csv or the ILSVRC2012_devkit_t12 folder (flat val/)"
    )

    inspect = actions.add_parser("inspect", help="counts per split and class, skipped inputs, checksums")
    inspect.add_argument("uri", help="dataset URI")
    inspect.add_argument("--no-verify", dest="verify", action="store_false", help="skip re-hashing the shards")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=main_inspect)


def main_convert(args: argparse.Namespace) -> int:
    from pipeline.data.convert import Options, convert

    source = open_source(args.format, getattr(args, "src", None), getattr(args, "val_labels", None))
    opts = Options(
        shard_bytes=args.shard_size,
        workers=args.workers,
        resize_short_side=args.resize_short_side,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        progress=not args.quiet,
    )
    manifest = convert(source, args.out, opts)
    for name, s in manifest.splits.items():
        counts = f"{len(s.shards)} shards, {len(s.skipped)} skipped, {len(s.normalized)} re-encoded"
        print(f"{name}: {s.num_rows} rows in {counts}")
    print(f"done: {args.out} (check with `dcpnas data inspect {args.out}`)")
    return 0


def main_inspect(args: argparse.Namespace) -> int:
    from pipeline.data.shards import open_dataset

    ds = open_dataset(args.uri)
    m = ds.manifest
    if args.json:
        if args.verify:
            ds.verify()
        splits = {
            n: {"rows": s.num_rows, "bytes": sum(x.size for x in s.shards), **vars(s)} for n, s in m.splits.items()
        }
        report = {"uri": args.uri, "verified": args.verify, "classes": m.classes, "class_names": m.class_names}
        report |= {"source": m.source, "splits": splits}
        print(json.dumps(report, default=vars, indent=1))
        return 0
    print(f"{args.uri}: schema {m.schema_version}, {len(m.classes)} classes, source {m.source.get('format', '?')}")
    print(f"{'split':<10}{'rows':>10}{'shards':>8}{'MB':>10}{'skipped':>9}{'re-encoded':>11}")
    for n, s in m.splits.items():
        mb = sum(x.size for x in s.shards) / 1e6
        print(f"{n:<10}{s.num_rows:>10}{len(s.shards):>8}{mb:>10.1f}{len(s.skipped):>9}{len(s.normalized):>11}")
    names = list(m.splits)
    if len(m.classes) <= 50:
        labels = [f"{c} {n}" if n else c for c, n in zip(m.classes, m.class_names or [""] * len(m.classes))]
        width = max(24, *(len(x[:47]) + 1 for x in labels))
        print(f"\n{'class':<{width}}" + "".join(f"{n:>10}" for n in names))
        for c, label in enumerate(labels):
            print(f"{label[:47]:<{width}}" + "".join(f"{m.splits[n].class_counts[c]:>10}" for n in names))
    else:
        if m.class_names:
            print(f"class names: {sum(map(bool, m.class_names))} of {len(m.classes)} (all: --json)")
        for n in names:
            counts = m.splits[n].class_counts
            print(f"{n}: per class min {min(counts)}, max {max(counts)} (all counts: --json)")
    for n, s in m.splits.items():
        for kind, items in (("skipped", s.skipped), ("re-encoded", s.normalized)):
            for item in items:
                print(f"{kind} [{n}] {item['source']}: {item['reason']}")
    if args.verify:
        ds.verify(progress=True)
        print(f"checksums: all {sum(len(s.shards) for s in m.splits.values())} shards match the manifest")
    return 0


def open_source(fmt: str, src: str | None = None, val_labels: str | None = None) -> Source:
    """The source for a CLI format name; ``src`` is its path or URI (digits needs none; fashion-mnist has a default)."""
    from pipeline.data.idx import FASHION_MNIST_DIR, fashion_mnist
    from pipeline.data.sources import cifar10, digits, imagefolder, imagenet

    if fmt == "digits":
        return digits()
    if fmt == "fashion-mnist":
        return fashion_mnist(src or FASHION_MNIST_DIR)
    if src is None:
        raise UserError(f"format {fmt!r} needs a source path")
    if fmt == "imagenet":
        return imagenet(src, val_labels)
    return {"imagefolder": imagefolder, "cifar10": cifar10}[fmt](src)
