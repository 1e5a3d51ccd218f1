"""Retrain step: the DeepSpeed engine vs plain DDP on the same 1-bit network and batch (issue 5).

Both engines are the ones ``pipeline/stages/retrain/stage.py`` trains with (``DeepSpeedEngine``,
``DDPEngine``): same network (same initial weights), same AdamW, same loss (cross-entropy plus the
reconstruction term), same input. Each rank times the two steps round-robin (one of each per round,
order alternating), so load drift on a shared machine hits both alike. Reports median step time per
engine, the DeepSpeed/DDP ratio (goal <= 1.05) and images/s at the benchmarked width.

    python bench/retrain.py                      # DCP-NAS-S (ImageNet macro, C=48, 10 cells), 2 gloo ranks
    python bench/retrain.py --quick              # a tiny CIFAR-macro network, for the smoke test
    python bench/retrain.py --device cuda --bf16 --size l --image-size 224 --batch 64   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from bench.search_step import machine  # noqa: E402
from dcpnas.network import SIZES  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_network  # noqa: E402
from pipeline.stages.retrain.engines import DDPEngine, DeepSpeedEngine  # noqa: E402
from pipeline.stages.retrain.plan import plan_steps  # noqa: E402
from pipeline.stages.retrain.worker import distill_loss  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if args.quick:
        net = ["retrain.network=cifar", "retrain.init_channels=8", "retrain.layers=3"]
    else:
        c, layers = SIZES["imagenet"][args.size]
        net = ["retrain.network=imagenet", f"retrain.init_channels={c}", f"retrain.layers={layers}"]
    cfg = load_config(
        None,
        [
            *net,
            f"retrain.workers={world}",
            f"retrain.batch_size={args.batch * world}",
            f"retrain.zero_stage={args.zero}",
            f"retrain.bf16={str(args.bf16).lower()}",
            "retrain.teacher=none",
            "retrain.steps=[binary_all]",
        ],
    )
    step = plan_steps(cfg)[0]
    engines = {}
    for name in ("ddp", "deepspeed"):
        torch.manual_seed(0)
        model = build_network(cfg, load_genotype(), "binary_all", 1000 if not args.quick else 10).to(device)
        engines[name] = (
            DeepSpeedEngine(model, cfg, step, args.batch, args.bf16)
            if name == "deepspeed"
            else DDPEngine(model, step, device, args.bf16)
        )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10 if args.quick else 1000, (args.batch,), generator=g).to(device)
    mu = cfg.retrain.reconstruction_weight
    samples: dict[str, list[float]] = {n: [] for n in engines}
    for r in range(args.warmup + args.repeats):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            dist.barrier()
            _sync(device)
            t = time.perf_counter()
            engine.backward_step(distill_loss(engine(x), y, None, 0.0, engine.module, mu))
            _sync(device)
            dist.barrier()
            if r >= args.warmup:
                samples[name].append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text(json.dumps(samples))
    dist.destroy_process_group()


def load_genotype() -> Any:
    from dcpnas.genotype import load_genotype as load

    return load("ddpnas_mcn_2")


def summarize(samples: dict[str, list[float]], batch: int, world: int) -> dict[str, Any]:
    med = {n: statistics.median(v) for n, v in samples.items()}
    paired = [d / p for d, p in zip(samples["deepspeed"], samples["ddp"])]
    return {
        "median_s": med,
        "ratio_deepspeed_over_ddp": med["deepspeed"] / med["ddp"],
        "paired_ratio_median": statistics.median(paired),
        "images_per_s": {n: batch * world / m for n, m in med.items()},
        "goal_met": med["deepspeed"] / med["ddp"] <= 1.05,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="s", choices=sorted(SIZES["imagenet"]))
    ap.add_argument("--image-size", type=int, default=112, help="224 is the ImageNet size; 112 keeps CPU runs short")
    ap.add_argument("--batch", type=int, default=8, help="per rank")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny network and input (smoke test)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.image_size, args.batch, args.repeats = 8, 4, 2
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    info = {**machine(), "load_before": os.getloadavg()}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-retrain-{os.getpid()}.json"
    mp.spawn(_rank, args=(args.workers, args, _free_port(), str(tmp)), nprocs=args.workers, join=True)
    samples = json.loads(tmp.read_text())
    tmp.unlink()
    info["load_after"] = os.getloadavg()
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "samples": samples,
        "summary": summarize(samples, args.batch, args.workers),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
