"""Distributed search cost: Ray Train against bare torchrun, cold start, and 1 vs 2 workers, in one run.

Every launch runs the same worker loop (``timed_steps``): a ``DCPNASSearch`` wrapped for DDP exactly as
``pipeline.stages.search.worker.search_worker`` wraps it (``ddp`` for weight steps, ``all_reduce_mean`` for architecture
terms; no wrapping with one rank), the architecture active (no warm-up), one thread per rank, and a fixed random
batch per rank. One iteration is a Parent step then a Child step (the two phases of a search epoch). Launches:

  torchrun_2   ``torchrun --nproc_per_node 2`` of this file (gloo), the reference
  ray_2        a Ray Train ``TorchTrainer``, 2 workers x 1 CPU (gloo), as ``fit_search`` configures it
  ray_1        the same with 1 worker (same per-rank batch)

They run round-robin (torchrun_2 ray_2 ray_1, ...) so load drifts hit all alike. Reported: (a) steady-state
iteration time, ray_2 / torchrun_2 (goal <= 1.03), in wall and per-rank CPU time; (b) cold start, from the
``TorchTrainer.fit()`` call to the first step starting on rank 0 (worker processes, process group, imports, both
supernets built; goal <= 10 s; the first round also pays for Ray's worker processes, later rounds find them warm),
with ``ray.init`` and torchrun's launch-to-first-step for comparison, and the first iteration's own time;
(c) throughput of ray_2 / ray_1 at the same per-rank batch (goal >= 1.8).

    .venv/bin/python bench/distributed.py [--rounds 3] [--steps 6] [--warmup 1] [--out results.json]
    .venv/bin/python bench/distributed.py --quick          # tiny config, one round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dcpnas.search import DCPNASSearch
from pipeline.config import Config, load_config
from pipeline.runtime.collectives import all_reduce_mean
from pipeline.stages.search.worker import ddp

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = ("torchrun_2", "ray_2", "ray_1")
GOALS = {"ray_overhead": 1.03, "cold_start_s": 10.0, "scaling": 1.8}
QUICK_SETS = ["search.init_channels=4", "search.layers=3"]


def timed_steps(task: dict[str, Any]) -> None:
    """The worker loop (any launcher): ``warmup`` + ``steps`` iterations; rank 0 writes the timings as JSON.

    ``task``: ``config`` (resolved), ``batch`` (per rank), ``warmup``, ``steps``, ``t_launch`` (launcher's
    ``time.time()`` when it started the workers, for the cold start), ``out`` (rank 0 writes the JSON there).
    """
    entered = time.time()
    cfg = Config.model_validate(task["config"])
    torch.set_num_threads(1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    kw = {"wrap": ddp, "reduce_mean": all_reduce_mean} if world > 1 else {}
    search = DCPNASSearch(cfg.search_config(), **kw)
    s, n = search.cfg, task["batch"]
    g = torch.Generator().manual_seed(rank)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, s.in_channels, cfg.data.image_size, cfg.data.image_size, generator=g)
        return x, torch.randint(0, s.num_classes, (n,), generator=g)

    wb, ab = batch(), batch()
    wall: list[float] = []
    cpu: list[float] = []
    first_iter_s, ready_at = 0.0, time.time()  # everything up to the first step is start-up cost
    for i in range(task["warmup"] + task["steps"]):
        w0, c0 = time.perf_counter(), time.process_time()
        search.parent_step(wb, ab)
        search.child_step(wb, ab)
        if i == 0:
            first_iter_s = time.perf_counter() - w0
        if i >= task["warmup"]:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    if world > 1:
        dist.barrier()
    if rank == 0:
        t = task["t_launch"]
        result = {"world": world, "batch": n, "wall": wall, "cpu": cpu, "worker_start_s": entered - t}
        result.update(first_step_s=ready_at - t, first_iter_s=first_iter_s)
        Path(task["out"]).write_text(json.dumps(result))


def run_ray(task: dict[str, Any], workers: int, storage: Path, name: str) -> dict[str, Any]:
    """One ``TorchTrainer`` launch, configured as ``stages.search.worker.fit_search`` does (gloo, 1 CPU/worker)."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if __name__ != "__main__":  # loaded by path (the smoke test): Ray's workers cannot import it, ship it by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        timed_steps,
        train_loop_config={**task, "t_launch": time.time()},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1.0}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train launch {name} failed") from result.error
    return json.loads(Path(task["out"]).read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(task: dict[str, Any], workers: int) -> dict[str, Any]:
    """``torchrun`` of this file in worker mode: the reference launch with no scheduler in between."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, "--worker"]
    task = {**task, "t_launch": time.time()}
    out = subprocess.run([*cmd, json.dumps(task)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"torchrun failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(Path(task["out"]).read_text())


def _worker_main(task_json: str) -> None:
    dist.init_process_group("gloo")
    try:
        timed_steps(json.loads(task_json))
    finally:
        dist.destroy_process_group()


def summarize(xs: list[float]) -> dict[str, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs)}


def _med(r: dict[str, Any], clock: str) -> float:
    return statistics.median(r[clock])


def analyse(runs: dict[str, list[dict[str, Any]]], ray_init_s: float) -> dict[str, Any]:
    """Per launch: pooled iteration times; the goal ratios from the pooled medians and per round.

    The launches of one round ran back to back, so a per-round ratio cancels most load drift between rounds;
    its spread says how far the pooled ratio can be trusted on a shared machine.
    """
    it = {
        clock: {name: summarize([x for r in rs for x in r[clock]]) for name, rs in runs.items()}
        for clock in ("wall", "cpu")
    }
    throughput = {name: rs[0]["world"] * rs[0]["batch"] / it["wall"][name]["median"] for name, rs in runs.items()}
    rounds = list(zip(runs["torchrun_2"], runs["ray_2"], runs["ray_1"]))
    cold = [r["first_step_s"] for r in runs["ray_2"]]
    goals = {
        "ray_overhead": {
            "wall": it["wall"]["ray_2"]["median"] / it["wall"]["torchrun_2"]["median"],
            "cpu": it["cpu"]["ray_2"]["median"] / it["cpu"]["torchrun_2"]["median"],
            "wall_per_round": [_med(ray2, "wall") / _med(tr, "wall") for tr, ray2, _ in rounds],
            "cpu_per_round": [_med(ray2, "cpu") / _med(tr, "cpu") for tr, ray2, _ in rounds],
        },
        "cold_start_s": {"first_round": cold[0], "later_rounds_median": statistics.median(cold[1:] or cold)},
        "scaling": {
            "throughput_ratio": throughput["ray_2"] / throughput["ray_1"],
            "per_round": [2 * _med(ray1, "wall") / _med(ray2, "wall") for _, ray2, ray1 in rounds],
        },
    }
    met = {
        "ray_overhead": goals["ray_overhead"]["wall"] <= GOALS["ray_overhead"],
        "cold_start_s": goals["cold_start_s"]["first_round"] <= GOALS["cold_start_s"],
        "scaling": goals["scaling"]["throughput_ratio"] >= GOALS["scaling"],
    }
    return {"iteration": it, "throughput": throughput, "goals": goals, "met": met, "ray_init_s": ray_init_s}


def markdown(a: dict[str, Any]) -> str:
    def seq(xs: list[float], fmt: str = ".1f") -> str:
        return ", ".join(f"{x:{fmt}}" for x in xs)

    lines = [
        "| launch | wall median s/iter | wall IQR | CPU median s/iter (rank 0) | samples/s | launch to worker fn s "
        "| launch to first step s | first iter s |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name in LAUNCHES:
        w, c, rs = a["iteration"]["wall"][name], a["iteration"]["cpu"][name], a["runs"][name]
        lines.append(
            f"| {name} | {w['median']:.3f} | {w['q3'] - w['q1']:.3f} | {c['median']:.3f} "
            f"| {a['throughput'][name]:.1f} | {seq([r['worker_start_s'] for r in rs])} "
            f"| {seq([r['first_step_s'] for r in rs])} | {seq([r['first_iter_s'] for r in rs])} |"
        )
    g, yn = a["goals"], {True: "yes", False: "no"}
    o, c, sc = g["ray_overhead"], g["cold_start_s"], g["scaling"]
    lines += [
        "",
        "| goal | measured (pooled medians; per round) | met |",
        "|---|---|---|",
        f"| (a) Ray Train / torchrun step time <= {GOALS['ray_overhead']} | wall {o['wall']:.3f} "
        f"({seq(o['wall_per_round'], '.2f')}); CPU {o['cpu']:.3f} ({seq(o['cpu_per_round'], '.2f')}) "
        f"| {yn[a['met']['ray_overhead']]} |",
        f"| (b) cold start to first step <= {GOALS['cold_start_s']:g} s | first round {c['first_round']:.1f} s, "
        f"later rounds {c['later_rounds_median']:.1f} s (ray.init {a['ray_init_s']:.1f} s before) "
        f"| {yn[a['met']['cold_start_s']]} |",
        f"| (c) 2 workers / 1 worker throughput >= {GOALS['scaling']} | {sc['throughput_ratio']:.2f} "
        f"({seq(sc['per_round'], '.2f')}) | {yn[a['met']['scaling']]} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo config")
    ap.add_argument("--batch", type=int, help="per-rank batch (default: the demo's global batch / 2)")
    ap.add_argument("--rounds", type=int, default=3, help="launches of each kind, round-robin")
    ap.add_argument("--steps", type=int, default=6, help="timed iterations per launch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--quick", action="store_true", help="tiny config, 1 round, 1+2 iterations: a smoke run")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.set, args.rounds, args.steps, args.warmup = [*QUICK_SETS, *args.set], 1, 2, 1
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
    cfg = load_config(None, ["search.warmup_epochs=0", *args.set])
    batch = args.batch or cfg.data.batch_size // 2
    sys.path.insert(0, str(ROOT / "bench"))
    from search_step import machine

    info = {**machine(), "load_before": os.getloadavg()}
    # before Ray starts: no token file in ~/.ray, no usage reporting (docs/stack.md §2.1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bd", dir="/tmp"))  # short: Ray's unix sockets live under it
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LAUNCHES}
    try:
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
        ray_init_s = time.perf_counter() - t0
        for r in range(args.rounds):
            for name in LAUNCHES:
                task = {"config": cfg.resolved(), "batch": batch, "warmup": args.warmup, "steps": args.steps}
                task["out"] = str(tmp / f"{name}-{r}.json")
                workers = int(name[-1])
                if name.startswith("torchrun"):
                    runs[name].append(run_torchrun(task, workers))
                else:
                    runs[name].append(run_ray(task, workers, tmp / "storage", f"{name}-{r}"))
                last = runs[name][-1]
                print(f"round {r} {name}: {statistics.median(last['wall']):.3f} s/iter", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    settings = {**vars(args), "out": str(args.out) if args.out else None, "batch": batch}
    result = {"config": settings, "search": cfg.resolved()["search"], "machine": info, "runs": runs}
    result.update(analyse(runs, ray_init_s))
    print(json.dumps({"config": settings, "machine": info}))
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker_main(sys.argv[2])
    else:
        main(sys.argv[1:])
