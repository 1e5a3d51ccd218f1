"""The main job (``dcpnas run``): data -> sweep -> select -> retrain -> eval -> report; the only module
that composes stages.

Every stage is idempotent: the sweep finds its MLflow runs and Tune experiment again, selection is a
pure function of the finished trials, a retrain skips steps whose model artifact (and hash) exist
and resumes the interrupted one from its checkpoint, and the report is rebuilt from MLflow.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.search_data import ensure_shards
from pipeline.data.shards import open_dataset
from pipeline.errors import UserError
from pipeline.models import num_classes
from pipeline.names import ORIGIN_TAG, SELECT_METRIC
from pipeline.progress.board import Log
from pipeline.report.build import build_report, publish_report
from pipeline.runtime.resources import total
from pipeline.runtime.session import check_ray_address, planned_resources
from pipeline.stages.retrain.baselines import baseline_jobs, check_capacity, sample_baselines
from pipeline.stages.retrain.plan import plan_steps, preflight
from pipeline.stages.retrain.stage import RetrainJob, retrain_all, run_retrain
from pipeline.stages.search.projection import Clock, step_times
from pipeline.stages.search.sweep import TrialSummary, plan, run_sweep, trial_bundles

ILSVRC_ROWS = {"train": 1_281_167, "val": 50_000}  # projection fallback when the manifest cannot be read here
DIGITS_ROWS = {"train": 1433, "test": 364}  # the bundled digits' shards


def select(trials: list[TrialSummary], top_k: int, metric: str = SELECT_METRIC) -> list[TrialSummary]:
    """Finished trials, one per genotype hash (its best trial), best first; the first ``top_k``."""
    best: dict[str, TrialSummary] = {}

    def score(t: TrialSummary) -> float:
        return t.metrics.get(metric, -math.inf)

    for t in trials:
        if t.status != "FINISHED" or not t.genotype_hash or t.diverged:
            continue
        if t.genotype_hash not in best or score(t) > score(best[t.genotype_hash]):
            best[t.genotype_hash] = t
    return sorted(best.values(), key=lambda t: (-score(t), t.trial_key))[:top_k]


def retrain_selected(cfg: Config, chosen: list[TrialSummary], log: Log) -> list[dict[str, Any]]:
    """Register the chosen genotypes and retrain each under its search run, and the random baselines under
    the sweep run: side by side where the cluster holds several (``retrain.max_concurrent``)."""
    ctx = tracking.connect(cfg)
    genotypes = []
    for rank, t in enumerate(chosen, 1):
        version = tracking.register_genotype(ctx, t.run_id, f"{cfg.name}-genotypes", f"rank{rank}")
        log(f"select: rank {rank} {t.trial_key} genotype {t.genotype_hash[:12]} -> model version {version}")
        genotype, _ = tracking.find_genotype(ctx, t.run_id)
        preflight(cfg, genotype, num_classes(cfg))  # bad input stops here, before Ray starts
        genotypes.append(genotype)
    randoms = sample_baselines(cfg, genotypes, num_classes(cfg)) if cfg.retrain.random_baselines else []
    for g in randoms:  # drawn and checked before Ray starts, like the searched ones
        preflight(cfg, g, num_classes(cfg))
    jobs = [RetrainJob(g, t.run_id, {"seed": t.seed, ORIGIN_TAG: "search"}) for t, g in zip(chosen, genotypes)]
    if randoms:
        log(f"random baselines: {', '.join(g.hash[:12] for g in randoms)} (seed {cfg.retrain.random_seed})")
        jobs += baseline_jobs(cfg, randoms, chosen[0].sweep_run_id)
    out = retrain_all(cfg, ctx, lambda _: jobs, log)
    return [{**r, ORIGIN_TAG: j.tags[ORIGIN_TAG]} for r, j in zip(out, jobs)]


def run(cfg: Config, log: Log = print) -> dict[str, Any]:
    """The whole pipeline for ``cfg``; returns the trials, the retrains and the report's path."""
    t0 = time.perf_counter()
    # unreachable URI: fail now
    ctx = tracking.connect(cfg)
    check_ray_address()
    check_capacity(cfg)  # too many random baselines for a space: say so before the sweep
    if cfg.retrain.genotype:  # a retrain-only config (e.g. imagenet-retrain-l.yaml)
        return {"trials": [], "retrains": run_retrain(cfg, log=log), "report": None}
    trials = run_sweep(cfg, log)
    chosen = select(trials, cfg.retrain.top_k)
    log(f"select: {len(chosen)} of {len(trials)} trials ({len({t.genotype_hash for t in trials})} genotypes)")
    retrains = retrain_selected(ensure_shards(cfg, log), chosen, log) if chosen else []
    sweep_run = trials[0].sweep_run_id  # every trial summary names its sweep run
    index = build_report(ctx, sweep_run, cfg.run_dir() / "report")
    publish_report(ctx, sweep_run, index.parent)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return {"trials": trials, "retrains": retrains, "report": index, "sweep_run_id": sweep_run}


# ---- dry run: the resource plan and a projected cost ----------------------------------------------------------
def _rows(cfg: Config, split: str, assumed: int) -> tuple[int, str]:
    try:
        return open_dataset(cfg.data.uri).split(split).num_rows, "manifest"
    except Exception:  # any unreadable store (no credentials, no network): the stated assumption
        return assumed, f"ASSUMED ILSVRC-2012 {split} size: {cfg.data.uri} not readable here"


def dry_run(
    cfg: Config, step_seconds: float | None, price: float, log: Log = print, clock: Clock = time.perf_counter
) -> dict[str, Any]:
    """Print the sweep plan, the retrain plan and a projected cost; start nothing (``clock``: see ``measure``)."""
    try:
        p = plan(cfg, planned_resources(cfg))
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
    times = step_times(cfg, step_seconds, clock)
    d, s = cfg.data, cfg.search
    steps = math.floor(rows * d.weight_fraction / d.batch_size)
    eval_s = math.ceil(eval_rows / d.batch_size) * (times.eval_batch or 0.0)
    first = times.train_seconds(steps, warmup=s.warmup_epochs > 0)
    epochs = [times.train_seconds(steps, warmup=e < s.warmup_epochs) + eval_s for e in range(s.epochs)]
    trial_hours = sum(epochs) / 3600
    per_trial, unit = (p.gpus_per_trial, "GPU") if p.gpus_per_trial else (p.cpus_per_trial, "core")
    cost_hours = trial_hours * per_trial * len(p.trials)
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
        f"search cost: {cost_hours:.3g} {unit}-hours"
        + (f" ~ ${cost_hours * price:,.2f} at ${price:g}/{unit}-hour" if price else "")
    )
    r = cfg.retrain
    if r.top_k or r.genotype:
        chain = ", ".join(f"{st.name} ({st.stage}, {st.epochs} ep)" for st in plan_steps(cfg))
        log(f"retrain: {max(r.top_k, 1 if r.genotype else 0)} genotype(s) x [{chain}] on {r.workers} workers")
    return {"plan": p, "step_times": times, "first_epoch_train_s": first, "search_hours": cost_hours}
