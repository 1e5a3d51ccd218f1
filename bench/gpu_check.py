"""``make gpu-check``: what one GPU says about the ImageNet search, in one table (and JSON), < 8 minutes.

Rows: the ``gpu``-marked tests; a 1-GPU NCCL search under Ray Train; the search steps at the ImageNet
config's supernet and per-GPU batch (bf16 vs fp32 vs DARTS first order, the Child step with
``parent_outputs: replay``, peak memory at 224 px);
DCP-NAS-L retraining images/s in bf16; the projected GPU-days of the ImageNet search. Exits 2 at once
without a CUDA device.

    .venv/bin/python bench/gpu_check.py [--out gpu-check.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_CONFIG = ROOT / "configs" / "imagenet-search.yaml"
IMAGENET_TRAIN_ROWS = 1_281_167
IMAGENET_VAL_ROWS = 50_000


@dataclasses.dataclass
class Row:
    check: str
    value: float | str
    unit: str = ""
    ok: bool = True
    note: str = ""


@dataclasses.dataclass
class SearchTimes:
    """Seconds per step on one GPU at the per-GPU batch: warm-up (weights only) and architecture epochs."""

    parent_warm: float
    child_warm: float
    parent_arch: float
    child_arch: float
    eval_batch: float  # both supernets' forwards on one per-GPU held-out batch


def steps_per_phase(train_rows: int, weight_fraction: float, global_batch: int) -> int:
    """Pairing ``cycle``: a phase reads every full global batch of the weight split once."""
    return int(train_rows * weight_fraction) // global_batch


def projected_gpu_days(
    t: SearchTimes, epochs: int, warmup_epochs: int, steps: int, gpus: int, eval_batches: int, full_eval_batches: int
) -> float:
    """GPU-days of the search if every GPU steps as fast as the one measured (DDP overhead not counted)."""
    warm = warmup_epochs * steps * (t.parent_warm + t.child_warm)
    arch = (epochs - warmup_epochs) * steps * (t.parent_arch + t.child_arch)
    evaluation = ((epochs - 1) * eval_batches + full_eval_batches) * t.eval_batch
    return (warm + arch + evaluation) * gpus / 86400


def table(rows: list[Row]) -> str:
    lines = ["| check | value | unit | ok | note |", "|---|---:|---|---|---|"]
    for r in rows:
        value = f"{r.value:.4g}" if isinstance(r.value, float) else str(r.value)
        lines.append(f"| {r.check} | {value} | {r.unit} | {'yes' if r.ok else 'NO'} | {r.note} |")
    return "\n".join(lines)


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU")
    return torch.device("cuda", 0)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    times = []
    for r in range(warmup + repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_tests() -> Row:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m", "gpu", "tests"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    last = (p.stdout.strip().splitlines() or ["no output"])[-1]
    ok = p.returncode in (0, 5)  # 5: no test carries the mark
    return Row("gpu-marked tests", time.perf_counter() - t, "s", ok, last)


def ray_train_search(tmp: Path) -> Row:
    """One epoch (architecture on) of a tiny search on the digits, 1 NCCL rank under Ray Train."""
    import ray

    from pipeline.config import load_config
    from pipeline.data.convert import Options, convert
    from pipeline.data.search_data import make_split
    from pipeline.data.sources import digits
    from pipeline.runtime.trainer import Workers
    from pipeline.stages.search.worker import fit_search

    uri = str(tmp / "digits")
    convert(digits(), uri, Options(workers=1, progress=False))
    sets = [f"data.uri={uri}", "data.source=shards", "data.batch_size=64", "search.init_channels=8"]
    sets += ["search.layers=5", "search.epochs=1", "search.warmup_epochs=0", f"output_dir={tmp}"]
    cfg = load_config(None, sets)
    split = tmp / "split.json"
    make_split(cfg).save(str(split))
    t = time.perf_counter()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        result = fit_search(cfg, str(split), str(tmp / "ray"), "gpu-check", Workers(1, 1.0, 1.0), max_failures=0)
    finally:
        ray.shutdown()
    m = result.metrics or {}
    ok = result.error is None and not m.get("diverged") and "child/val_acc" in m
    return Row("Ray Train search, 1 GPU, NCCL (1 epoch)", time.perf_counter() - t, "s", ok, str(result.error or ""))


def search_steps(device: torch.device, repeats: int) -> tuple[list[Row], SearchTimes]:
    """The ImageNet config's supernets at its per-GPU batch and 224 px: step times and peak memory."""
    from bench.search_step import Darts
    from dcpnas.search import DCPNASSearch
    from pipeline.config import load_config
    from pipeline.runtime.gpu_memory import oom_message

    cfg = load_config(IMAGENET_CONFIG)
    base = dataclasses.replace(cfg.search_config(), epochs=2, warmup_epochs=0)
    batch = cfg.data.batch_size // cfg.sweep.workers
    g = torch.Generator().manual_seed(0)

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
        return x.to(device), torch.randint(0, base.num_classes, (batch,), generator=g).to(device)

    wb, ab = data(), data()
    rows: list[Row] = []

    def timed(name: str, search: DCPNASSearch, step: Callable[..., None]) -> float:
        w, a = search.layout(wb), search.layout(ab)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            with search.amp:
                s = median_seconds(lambda: step(w, a), repeats)
        except torch.cuda.OutOfMemoryError:
            peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
            rows.append(Row(name, "OOM", "", False, oom_message(batch, start, peak, total)))
            torch.cuda.empty_cache()
            return float("nan")
        peak = (torch.cuda.max_memory_allocated(device) - start) / 2**30
        rows.append(Row(name, s, "s/step", True, f"peak +{peak:.1f} GiB, batch {batch}, 224 px"))
        return s

    fp32 = DCPNASSearch(dataclasses.replace(base, bf16=False, channels_last=False), device=device)
    child_fp32 = timed("DCP-NAS child step (GGN), fp32", fp32, fp32.child_step)
    del fp32
    bf16 = DCPNASSearch(base, device=device)
    parent_arch = timed("DCP-NAS parent step, bf16", bf16, bf16.parent_step)
    child_arch = timed("DCP-NAS child step (GGN), bf16", bf16, bf16.child_step)
    bf16.epoch = 0
    bf16.cfg = dataclasses.replace(base, warmup_epochs=1)  # weight steps only, as in the warm-up epochs
    parent_warm = timed("DCP-NAS parent step, warm-up, bf16", bf16, bf16.parent_step)
    child_warm = timed("DCP-NAS child step, warm-up, bf16", bf16, bf16.child_step)
    with torch.no_grad(), bf16.amp:
        x = bf16.layout(wb)[0]
        eval_batch = median_seconds(lambda: (bf16.parent(x), bf16.child(x)), repeats)
    darts = Darts(base, second_order=False, device=device)
    with torch.autocast("cuda", torch.bfloat16):
        d1 = median_seconds(lambda: darts.step(wb, ab), repeats)
    rows.append(Row("DARTS 1st-order step, bf16", d1, "s/step"))
    rows.append(Row("bf16 speed-up of the child step", child_fp32 / child_arch, "x", child_fp32 > child_arch))
    rows.append(Row("child step (GGN) / DARTS 1st order, bf16", child_arch / d1, "x", child_arch / d1 <= 2.5))
    replay = DCPNASSearch(dataclasses.replace(base, parent_outputs="replay"), device=device)
    with replay.amp:  # the Parent step whose outputs every timed Child step 0 replays
        replay.parent_step(replay.layout(wb), replay.layout(ab))
    child_replay = timed("DCP-NAS child step (GGN), parent_outputs: replay, bf16", replay, replay.child_step)
    rows.append(Row("replayed child step / DARTS 1st order, bf16", child_replay / d1, "x", child_replay / d1 <= 2.0))
    return rows, SearchTimes(parent_warm, child_warm, parent_arch, child_arch, eval_batch)


def retrain_throughput(device: torch.device, repeats: int) -> Row:
    """DCP-NAS-L (configs/imagenet-retrain-l.yaml's network) training images/s in bf16, 1 GPU, batch 64."""
    import torch.nn.functional as F

    from bench.retrain import load_genotype
    from pipeline.config import load_config
    from pipeline.models import build_network

    cfg = load_config(IMAGENET_CONFIG)
    model = build_network(cfg, load_genotype(), "binary_all", 1000).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    batch = cfg.retrain.batch_size // cfg.retrain.workers
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Row("DCP-NAS-L retrain, bf16", batch / median_seconds(step, repeats), "images/s", True, f"batch {batch}")


def projection_row(t: SearchTimes) -> Row:
    from pipeline.config import load_config

    cfg = load_config(IMAGENET_CONFIG)
    d, s, gpus = cfg.data, cfg.search, cfg.sweep.workers
    steps = steps_per_phase(IMAGENET_TRAIN_ROWS, d.weight_fraction, d.batch_size)
    full = -(-IMAGENET_VAL_ROWS // d.batch_size)
    days = projected_gpu_days(t, s.epochs, s.warmup_epochs, steps, gpus, s.eval_batches or full, full)
    note = f"{s.epochs} epochs ({s.warmup_epochs} warm-up) x 2 phases x {steps} steps on {gpus} GPUs, DDP cost excluded"
    return Row("projected ImageNet search", days, "GPU-days", True, note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = require_gpu()
    t0 = time.perf_counter()
    rows = [gpu_tests()]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(ray_train_search(Path(tmp)))
    torch.cuda.set_device(device)
    step_rows, times = search_steps(device, args.repeats)
    rows += step_rows
    rows.append(retrain_throughput(device, args.repeats))
    rows.append(projection_row(times))
    print(table(rows))
    gpu = torch.cuda.get_device_name(device)
    result = {"gpu": gpu, "torch": torch.__version__, "seconds": time.perf_counter() - t0}
    args.out.write_text(json.dumps({**result, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    print(f"{gpu}, {result['seconds']:.0f} s; JSON: {args.out}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
