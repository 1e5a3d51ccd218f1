"""Does the search search? DCP-NAS against its ablations, the binarised Parent, random genotypes and a
published cell, each retrained as a 1-bit network with the same recipe, on real data (Fashion-MNIST).

Everything runs through the product, in this process, as a user would type it (``pipeline.cli.main``):
``dcpnas data convert fashion-mnist`` on a class-balanced subset of the idx files, one ``dcpnas run`` whose
sweep holds the three searched arms as ``sweep.variants`` (full, ``search.lam: 0``, ``search.decoupled:
false``) x seeds and whose retrain stage adds ``retrain.random_baselines`` random genotypes, then ``dcpnas
retrain`` for every other trial's genotype, every full trial's Parent genotype (``parent:<run id>``) and the
published ``ddpnas_mcn_2`` cell. The table is built from the MLflow store alone (re-running the script
resumes: finished runs are found and skipped).

    python bench/search_quality.py --data /usr/share/datasets/fashion-mnist   # the full run, ~2 h on 2 cores
    python bench/search_quality.py --quick                                    # toy size on synthetic idx files
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from bench.search_step import machine  # noqa: E402
from pipeline import cli  # noqa: E402

FULL, NO_TANGENT, NO_DECOUPLED = "DCP-NAS", "lambda = 0", "decoupled off"
PARENT, RANDOM, REFERENCE = "binarised Parent", "random", "ddpnas_mcn_2"
ARMS = (FULL, NO_TANGENT, NO_DECOUPLED, PARENT, RANDOM, REFERENCE)
VARIANTS = [{}, {"search.lam": 0}, {"search.decoupled": False}]
SPACE = "dcpnas"  # the space of ddpnas_mcn_2, so the reference cell is a genotype of the searched space


@dataclass(frozen=True)
class Scale:
    """How big a run is: the data subset, resolution, widths and epochs (sized in docs/benchmarks/search_quality.md)."""

    train_per_class: int
    test_per_class: int
    image_size: int
    seeds: int
    randoms: int
    search_channels: int
    search_layers: int
    search_epochs: int
    warmup_epochs: int
    retrain_channels: int
    retrain_layers: int
    retrain_epochs: int
    teacher_epochs: int
    batch_size: int = 64
    search_fraction: float = 0.2  # of the train subset for weights, and as much for architecture steps
    retrain_workers: int = 2
    teacher: str = "train"
    steps: tuple[str, ...] = ("binary_act", "binary_all")
    # Ray CPU reservations (scheduling tokens, docs/stack.md §2.2): a trial's driver and each search worker,
    # each retrain worker. The quick run packs every trial and every retrain of a wave side by side.
    search_cpus: float = 0.5
    retrain_cpus: float = 1.0


FULL_SCALE = Scale(600, 200, 16, 2, 4, 8, 5, 4, 1, 16, 5, 3, 2)
QUICK = Scale(10, 3, 8, 1, 1, 4, 3, 1, 0, 4, 3, 1, 0, 16, 0.5, 1, "none", ("binary_all",), 1 / 3, 0.25)


# ---- data ------------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def subset_idx(src: str | None, dst: Path, scale: Scale) -> Path:
    """The first ``*_per_class`` images of each class from ``src`` (None: synthetic class-coded images)."""
    from pipeline.data.idx import read_idx

    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", scale.train_per_class), ("t10k", scale.test_per_class)):
        if src is None:  # learnable toy data: the class sets the mean brightness
            labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
            noise = rng.integers(0, 60, (len(labels), 28, 28))
            images = (noise + labels[:, None, None] * 20).astype(np.uint8)
        else:
            images = read_idx(src, f"{prefix}-images-idx3-ubyte", 3)
            labels = read_idx(src, f"{prefix}-labels-idx1-ubyte", 1)
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
            images, labels = images[keep], labels[keep]
        write_idx(dst / f"{prefix}-images-idx3-ubyte", images)
        write_idx(dst / f"{prefix}-labels-idx1-ubyte", labels)
    return dst


def write_config(out: Path, uri: str, scale: Scale) -> Path:
    """One config for every stage: the arms differ only by the sweep's variants."""
    config = {
        "name": "search-quality",
        "output_dir": str(out / "runs"),
        "threads": 1,
        "data": {
            "source": "shards",
            "uri": uri,
            "image_size": scale.image_size,
            "batch_size": scale.batch_size,
            "weight_fraction": scale.search_fraction,
            "arch_fraction": scale.search_fraction,
        },
        "search": {
            "space": SPACE,
            "init_channels": scale.search_channels,
            "layers": scale.search_layers,
            "epochs": scale.search_epochs,
            "warmup_epochs": scale.warmup_epochs,
            "parent_lr": 0.1,
            "child_lr": 0.03,  # as configs/demo.yaml: 0.01 leaves a small 1-bit Child near chance for epochs
            "arch_lr": 0.05,  # ~54 architecture steps: Adam moves an alpha by up to ~2.7, DARTS' 3e-4 x 19.5k steps ~6
        },
        "sweep": {
            "seeds": list(range(scale.seeds)),
            "spaces": [SPACE],
            "variants": VARIANTS,
            "trial_cpus": scale.search_cpus,
            "cpus_per_worker": scale.search_cpus,
        },
        "retrain": {
            "network": "cifar",
            "init_channels": scale.retrain_channels,
            "layers": scale.retrain_layers,
            "steps": list(scale.steps),
            "epochs": scale.retrain_epochs,
            "teacher": scale.teacher,
            "teacher_epochs": scale.teacher_epochs,
            "batch_size": scale.batch_size,
            "lr": 0.003,
            "teacher_lr": 0.003,
            "min_lr": 0.0001,
            "workers": scale.retrain_workers,
            "cpus_per_worker": scale.retrain_cpus,
            "top_k": 1,
            "random_baselines": scale.randoms,
            "random_seed": 0,
        },
        # no tracking.uri: the commands log to the one MLflow server run_arms serves (MLFLOW_TRACKING_URI)
        "tracking": {"experiment": "search-quality"},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dcpnas(*argv: str) -> None:
    """One ``dcpnas`` command, exactly as the console script runs it."""
    print("$ dcpnas " + " ".join(argv), flush=True)
    if cli.main(list(argv)) != 0:
        raise SystemExit(f"dcpnas {argv[0]} failed")


# ---- the table -------------------------------------------------------------------------------------------
def runs_of(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every run of the experiment as plain dicts: tags, metrics (latest), duration in hours."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = []
    for r in client.search_runs([exp.experiment_id], max_results=5000):
        hours = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 3.6e6
        out.append({"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags),
                    "metrics": dict(r.data.metrics), "hours": hours})  # fmt: skip
    return out


def search_arm(tags: dict[str, str]) -> str | None:
    """The arm of a search trial from its override tags (sweep.variants)."""
    if tags.get("override.search.lam") not in (None, "") and float(tags["override.search.lam"]) == 0:
        return NO_TANGENT
    if str(tags.get("override.search.decoupled", "")).lower() == "false":
        return NO_DECOUPLED
    return FULL if not any(k.startswith("override.") for k in tags) else None


def collect(runs: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the finished 1-bit retrains' top-1, OPs, core-hours; the searches' cost and final alpha entropy."""
    from dcpnas.genotype import load_genotype
    from pipeline.config import Config

    reference = load_genotype(REFERENCE).hash
    c = Config.model_validate(cfg)
    search_cores = c.sweep.workers * c.sweep.cpus_per_worker
    retrain_cores = c.retrain.workers * c.retrain.cpus_per_worker
    searches = {x["run_id"]: x for x in runs if x["tags"].get("stage") == "search" and x["status"] == "FINISHED"}
    arms: dict[str, dict[str, list[float]]] = {a: {"top1": [], "ops": [], "retrain_ch": [], "search_ch": [],
                                                   "entropy": []} for a in ARMS}  # fmt: skip
    for run in searches.values():
        arm = search_arm(run["tags"])
        if arm is not None:
            arms[arm]["search_ch"].append(run["hours"] * search_cores)
            arms[arm]["entropy"].append(run["metrics"].get("alpha_entropy", math.nan))
            if arm == FULL:
                arms[PARENT]["search_ch"].append(run["hours"] * search_cores)
    for run in runs:
        t = run["tags"]
        if t.get("stage") != "retrain" or run["status"] != "FINISHED" or "top1" not in run["metrics"]:
            continue
        search = searches.get(t.get("mlflow.parentRunId", ""))
        if t.get("origin") == "random":
            arm = RANDOM
        elif t.get("origin") == "parent":
            arm = PARENT
        elif search is not None:
            arm = search_arm(search["tags"])
        else:
            arm = REFERENCE if t.get("genotype_hash") == reference else None
        if arm is not None:
            arms[arm]["top1"].append(run["metrics"]["top1"])
            arms[arm]["ops"].append(run["metrics"].get("ops", math.nan))
            arms[arm]["retrain_ch"].append(run["hours"] * retrain_cores)
    return arms


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def verdicts(arms: dict[str, dict[str, list[float]]]) -> list[str]:
    """DCP-NAS against each other arm: the mean difference, and that difference over its standard error
    (Welch's t: |t| >= 2 is a difference the spread of these seeds does not explain)."""
    a = arms[FULL]["top1"]
    lines = []
    for other in ARMS[1:]:
        b = arms[other]["top1"]
        if not a or not b:
            lines.append(f"- DCP-NAS vs {other}: no finished retrains to compare ({len(a)} vs {len(b)})")
            continue
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        delta = ma - mb
        se = math.sqrt((0 if math.isnan(sa) else sa**2) / len(a) + (0 if math.isnan(sb) else sb**2) / len(b))
        t = delta / se if se > 0 else math.nan
        spread = "no spread to compare with" if math.isnan(t) else f"{t:+.2f} standard errors"
        if math.isnan(t):
            verdict = "cannot tell (one retrain per arm)"
        elif abs(t) < 2:
            verdict = "no clear difference"
        else:
            verdict = "DCP-NAS is better" if delta > 0 else "DCP-NAS is worse"
        lines.append(f"- DCP-NAS vs {other}: {verdict}: top-1 {100 * delta:+.2f} points, {spread}")
    return lines


def table(arms: dict[str, dict[str, list[float]]]) -> str:
    def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
        m, s = mean_std(xs)
        if math.isnan(m):
            return "—"
        return f"{m * scale:.{digits}f}" + ("" if math.isnan(s) else f" ± {s * scale:.{digits}f}")

    rows = ["| arm | n | top-1 % | OPs (M) | search core-h / genotype | retrain core-h / genotype | alpha entropy |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, v in arms.items():
        rows.append(
            f"| {name} | {len(v['top1'])} | {fmt(v['top1'], 100)} | {fmt(v['ops'], 1e-6, 1)} | "
            f"{fmt(v['search_ch'], 1, 3)} | {fmt(v['retrain_ch'], 1, 3)} | {fmt(v['entropy'], 1, 4)} |"
        )
    return "\n".join(rows)


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of the Fashion-MNIST idx files (default with --quick: synthetic)")
    p.add_argument("--quick", action="store_true", help="toy size (smoke test)")
    p.add_argument("--out", default="runs/search_quality", help="working folder (store, shards, results)")
    p.add_argument("--collect-only", action="store_true", help="build the table from the store in --out")
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL_SCALE
    if args.data is None and not args.quick:
        from pipeline.data.idx import FASHION_MNIST_DIR

        args.data = FASHION_MNIST_DIR
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = out / "config.yaml"
    if not args.collect_only:
        shards = out / "shards"
        if not (shards / "manifest.json").exists():
            idx = subset_idx(args.data, out / "idx", scale)
            dcpnas("data", "convert", "fashion-mnist", str(idx), str(shards), "--workers", "1", "--quiet")
        config = write_config(out, f"file://{shards}", scale)
        run_arms(config, store(out))
    cfg = yaml.safe_load(config.read_text())
    arms = collect(runs_of(store(out), cfg["tracking"]["experiment"]), cfg)
    result = {"scale": asdict(scale), "data": args.data or "synthetic", "machine": machine(), "arms": arms,
              "table": table(arms), "verdicts": verdicts(arms), "wall_s": time.perf_counter() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    (out / "search_quality.json").write_text(json.dumps(result, indent=1))
    (out / "search_quality.md").write_text(result["table"] + "\n\n" + "\n".join(result["verdicts"]) + "\n")
    print(result["table"] + "\n\n" + "\n".join(result["verdicts"]) + f"\n\nwall {result['wall_s']:.0f} s")
    return result


def store(out: Path) -> str:
    """The bench's MLflow store (SQLite in the working folder); the table is read from it."""
    return f"sqlite:///{out / 'mlflow.db'}"


def run_arms(config: Path, uri: str) -> None:
    """``dcpnas run`` (sweep of the searched arms, top-1 retrain, random baselines), then one ``dcpnas retrain``
    of every other trial's genotype, every full trial's Parent genotype and the reference cell, side by side.

    Both commands share one Ray and one MLflow server over the store ``uri``, as a team's server would be
    (``MLFLOW_TRACKING_URI``): a command given a server URI starts none of its own (docs/tracking.md)."""
    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.runtime.session import ray_session

    cfg = load_config(config)
    store = tracking.prepare(uri, cfg.experiment)  # schema and experiment, once, before the server
    server = tracking.serving(store)
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(server.__enter__)  # the server starts while Ray does: ~8 s instead of ~13
        try:
            with ray_session(cfg):
                arms_on(config, cfg.experiment, starting.result())
        finally:
            if starting.exception() is None:
                server.__exit__(None, None, None)


def arms_on(config: Path, experiment: str, ctx: Any) -> None:
    """:func:`run_arms`' two commands, against the served store ``ctx`` (a ``TrackingContext``)."""
    from pipeline import tracking

    os.environ["MLFLOW_TRACKING_URI"] = ctx.uri
    try:
        dcpnas("run", str(config))
        sweep = next(r for r in runs_of(ctx.uri, experiment) if r["tags"].get("mlflow.runName") == "sweep")
        refs = []
        for trial in tracking.child_runs(ctx, sweep["run_id"]):
            if trial["tags"].get("stage") != "search" or trial["status"] != "FINISHED":
                continue  # random baselines hang under the sweep run too
            refs.append(trial["run_id"])  # the top-1 trial's is found finished and skipped
            if search_arm(trial["tags"]) == FULL:
                refs.append(f"parent:{trial['run_id']}")
        dcpnas("retrain", "--config", str(config), *(a for r in [*refs, REFERENCE] for a in ("--genotype", r)))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


if __name__ == "__main__":
    main()
