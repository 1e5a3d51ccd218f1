"""The main job, ``dcpnas run``: data -> sweep -> select -> retrain -> eval -> report (architecture §2).

Every stage is idempotent: the sweep finds its MLflow runs and Tune experiment again, selection is a
pure function of the finished trials, a retrain skips steps whose model artifact (and hash) exist
and resumes the interrupted one from its checkpoint, and the report is rebuilt from MLflow.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from pipeline.config import Config
from pipeline.errors import UserError

SELECT_METRIC = "final/child/val_acc"  # the 1-bit Child supernet's held-out accuracy at the end of search
ILSVRC_ROWS = {"train": 1_281_167, "val": 50_000}  # projection fallback when the manifest cannot be read here
DIGITS_ROWS = {"train": 1433, "test": 364}  # the bundled digits' shards


def select(trials: list[dict[str, Any]], top_k: int, metric: str = SELECT_METRIC) -> list[dict[str, Any]]:
    """Finished trials, one per genotype hash (its best trial), best first; the first ``top_k``."""
    best: dict[str, dict[str, Any]] = {}
    for t in trials:
        h = t.get("genotype_hash")
        if t.get("status") != "FINISHED" or not h or t.get("diverged"):
            continue
        if h not in best or t.get(metric, -math.inf) > best[h].get(metric, -math.inf):
            best[h] = t
    ranked = sorted(best.values(), key=lambda t: (-t.get(metric, -math.inf), t["trial_key"]))
    return ranked[:top_k]


def _check_ray_address() -> None:
    """An unreachable ``RAY_ADDRESS`` fails in seconds with the address, not after Ray's long retries."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or address == "auto" or ("://" in address and not address.startswith("ray://")):
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise UserError(
            f"RAY_ADDRESS={address} is not reachable ({e}): start the cluster or unset RAY_ADDRESS"
        ) from None


def retrain_selected(cfg: Config, chosen: list[dict[str, Any]], log: Any) -> list[dict[str, Any]]:
    """Register the chosen genotypes and retrain each under its search run, then the random baselines."""
    from pipeline import tracking
    from pipeline.random_baselines import ORIGIN_TAG, retrain_baselines, sample_baselines
    from pipeline.resources import cluster_resources
    from pipeline.retrain_stage import check_resources, num_classes, preflight, retrain_genotype, worker_bundles
    from pipeline.sweep import _ray_init

    ctx = tracking.prepare(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, cfg.tracking.retry_s)
    genotypes = []
    for rank, t in enumerate(chosen, 1):
        version = tracking.register_genotype(ctx, t["run_id"], f"{cfg.name}-genotypes", f"rank{rank}")
        log(f"select: rank {rank} {t['trial_key']} genotype {t['genotype_hash'][:12]} -> model version {version}")
        genotype, _ = tracking.find_genotype(ctx, t["run_id"])
        preflight(cfg, genotype, num_classes(cfg))  # bad input stops here, before Ray starts
        genotypes.append(genotype)
    randoms = sample_baselines(cfg, genotypes, num_classes(cfg)) if cfg.retrain.random_baselines else []
    for g in randoms:  # drawn and checked before Ray starts, like the searched ones
        preflight(cfg, g, num_classes(cfg))
    started = _ray_init(cfg)
    try:
        check_resources(cfg, cluster_resources(worker_bundles(cfg), cfg.scale_up_wait_s, log))
        out = []
        with tracking.serving(ctx) as served:
            for t, genotype in zip(chosen, genotypes):
                tags = {"seed": t["seed"], ORIGIN_TAG: "search"}
                out.append({**retrain_genotype(cfg, served, genotype, t["run_id"], tags, log), ORIGIN_TAG: "search"})
            if randoms:
                log(f"random baselines: {', '.join(g.hash[:12] for g in randoms)} (seed {cfg.retrain.random_seed})")
                out += retrain_baselines(cfg, served, randoms, chosen[0]["sweep_run_id"], log)
        return out
    finally:
        if started:
            import ray

            ray.shutdown()


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """The whole pipeline for ``cfg``; returns the trials, the retrains and the report's path."""
    from pipeline import report, tracking
    from pipeline.random_baselines import check_capacity
    from pipeline.retrain_stage import run_retrain
    from pipeline.sweep import run_sweep, search_data

    t0 = time.perf_counter()
    # unreachable URI: fail now
    ctx = tracking.prepare(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, cfg.tracking.retry_s)
    _check_ray_address()
    check_capacity(cfg)  # too many random baselines for a space: say so before the sweep
    if cfg.retrain.genotype:  # a retrain-only config (e.g. imagenet-retrain-l.yaml)
        return {"trials": [], "retrains": [run_retrain(cfg, log=log)], "report": None}
    trials = run_sweep(cfg, log)
    chosen = select(trials, cfg.retrain.top_k)
    log(f"select: {len(chosen)} of {len(trials)} trials ({len({t.get('genotype_hash') for t in trials})} genotypes)")
    retrains = retrain_selected(search_data(cfg, log), chosen, log) if chosen else []
    sweep_run = trials[0]["sweep_run_id"]  # every trial summary names its sweep run
    index = report.build_report(ctx, sweep_run, cfg.run_dir() / "report")
    report.publish_report(ctx, sweep_run, index.parent)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return {"trials": trials, "retrains": retrains, "report": index, "sweep_run_id": sweep_run}


# ---- dry run: the resource plan and a projected cost ----------------------------------------------------------
def _rows(cfg: Config, split: str, assumed: int) -> tuple[int, str]:
    from pipeline.data.shards import open_dataset

    try:
        return open_dataset(cfg.data.uri).split(split).num_rows, "manifest"
    except Exception:  # any unreadable store (no credentials, no network): the stated assumption
        return assumed, f"ASSUMED ILSVRC-2012 {split} size: {cfg.data.uri} not readable here"


def dry_run(cfg: Config, step_seconds: float | None, price: float, log: Any = print) -> dict[str, Any]:
    """Print the sweep plan, the retrain plan and a projected cost; start nothing."""
    from pipeline.projection import step_times
    from pipeline.resources import total
    from pipeline.retrain_stage import plan_steps
    from pipeline.sweep import _resources_without_compute, plan, trial_bundles

    try:
        p = plan(cfg, _resources_without_compute(cfg))
    except UserError as e:  # e.g. an ImageNet config planned on a laptop: project for the cluster it needs
        log(f"plan: {e}")
        p = plan(cfg, total(trial_bundles(cfg.sweep)))
        log("projected below for a cluster that fits one trial at a time:")
    log(p.describe())
    if cfg.data.source == "digits":
        (rows, source), (eval_rows, _) = (DIGITS_ROWS["train"], "digits"), (DIGITS_ROWS["test"], "digits")
    else:
        (rows, source), (eval_rows, _) = (
            _rows(cfg, cfg.data.split, ILSVRC_ROWS["train"]),
            _rows(cfg, cfg.data.eval_split, ILSVRC_ROWS["val"]),
        )
    times = step_times(cfg, step_seconds)
    d, s = cfg.data, cfg.search
    steps = math.floor(rows * d.weight_fraction / d.batch_size)
    eval_s = math.ceil(eval_rows / d.batch_size) * (times.eval_batch or 0.0)
    first = times.train_seconds(steps, warmup=s.warmup_epochs > 0)
    epochs = [times.train_seconds(steps, warmup=e < s.warmup_epochs) + eval_s for e in range(s.epochs)]
    trial_hours = sum(epochs) / 3600
    per_trial, unit = (p.gpus_per_trial, "GPU") if p.gpus_per_trial else (p.cpus_per_trial, "core")
    total = trial_hours * per_trial * len(p.trials)
    waves = math.ceil(len(p.trials) / p.max_concurrent)
    log(f"train rows: {rows:,} ({source}); steps per phase: {steps:,}; held-out rows: {eval_rows:,}")
    if times.eval_batch is not None:
        log(f"eval batch: {times.eval_batch:.3f} s; reading a batch pair: {times.load_pair:.3f} s")
    log(
        f"step times: parent {times.parent:.3f} s, child {times.child:.3f} s (warm-up epochs: "
        f"{times.warmup_parent:.3f} s, {times.warmup_child:.3f} s) ({times.how})"
    )
    evaluation = f"{eval_s:.1f} s evaluation" if times.eval_batch is not None else "evaluation not projected"
    log(f"epoch 1: {first:.1f} s training + {evaluation}")
    log(
        f"search: {trial_hours:.2f} h per trial x {len(p.trials)} trials in {waves} wave(s)"
        f" -> wall {trial_hours * waves:.2f} h"
    )
    log(
        f"search cost: {total:.3g} {unit}-hours"
        + (f" ~ ${total * price:,.2f} at ${price:g}/{unit}-hour" if price else "")
    )
    r = cfg.retrain
    if r.top_k or r.genotype:
        chain = ", ".join(f"{st.name} ({st.stage}, {st.epochs} ep)" for st in plan_steps(cfg))
        log(f"retrain: {max(r.top_k, 1 if r.genotype else 0)} genotype(s) x [{chain}] on {r.workers} workers")
    return {"plan": p, "step_times": times, "first_epoch_train_s": first, "search_hours": total}


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        dry_run(cfg, args.step_seconds, args.price)
        return 0
    out = run(cfg)
    if out["report"] is not None:
        print(f"\nreport: {out['report'].resolve()}")
    for r in out["retrains"]:
        print(f"retrained {r['genotype_hash'][:12]}: top1 {r['top1']:.4f} (run {r['run_id']})")
    where = f" --config {args.config}" if args.config else ""
    print(f"MLflow UI: dcpnas ui{where}  (then open http://127.0.0.1:5000)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: data, sweep, select, retrain, eval, report")
    p.add_argument("config", nargs="?", help="YAML config (default: the packaged demo on digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dry-run", action="store_true", help="print the resource plan and projected cost, start nothing")
    p.add_argument("--step-seconds", type=float, help="dry run: use this measured search step time (e.g. on a GPU)")
    p.add_argument("--price", type=float, default=0.0, help="dry run: price per GPU-hour (or core-hour) for the cost")
    p.set_defaults(func=_cmd_run)
