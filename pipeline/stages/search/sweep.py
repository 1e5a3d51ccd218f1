"""The sweep: a Ray Tune grid of searches (seeds × spaces × override sets), each trial a
``TorchTrainer``, tracked in MLflow.

Order of a sweep (``run_sweep``): check the MLflow store (seconds, before any compute), make the
search data (digits shards when none are given) and the weights/arch split once, open or reopen
the parent sweep run, start (or join) Ray, then run or resume the Tune grid. Every trial opens its
nested MLflow run by trial key, so re-running a sweep reuses runs and skips finished trials.
See docs/search.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline import tracking
from pipeline.config import Config, SweepSection, apply_overrides, override_sets
from pipeline.data.search_data import ensure_shards, make_split
from pipeline.data.splits import SearchSplit
from pipeline.errors import UserError
from pipeline.names import FINAL
from pipeline.progress.board import Log
from pipeline.progress.tune import TuneProgress
from pipeline.runtime.resources import EPS, cluster_resources, fits, total
from pipeline.runtime.session import ray_session, storage_path
from pipeline.runtime.trainer import Workers
from pipeline.stages.search.worker import fit_search
from pipeline.tracking import TrackingContext


@dataclass(frozen=True)
class Trial:
    seed: int
    space: str
    overrides: tuple[tuple[str, str], ...] = ()  # sorted (dotted key, JSON value) of one override set

    @classmethod
    def of(cls, seed: int, space: str, overrides: dict[str, Any]) -> Trial:
        return cls(seed, space, tuple((k, json.dumps(v)) for k, v in sorted(overrides.items())))

    @property
    def overrides_text(self) -> str:
        """``search.decoupled=false,search.lam=0.0``: the ``overrides`` tag, "" without overrides."""
        return ",".join(f"{k}={v}" for k, v in self.overrides)

    @property
    def key(self) -> str:
        """The MLflow trial key (run name): ``seed=0,space=dcpnas_3x3`` then the overrides, if any."""
        return ",".join(filter(None, (f"seed={self.seed},space={self.space}", self.overrides_text)))

    @property
    def train_name(self) -> str:
        """The Ray Train run name under the sweep's storage (directory-safe; overrides as a short hash)."""
        base = f"search-seed{self.seed}-{self.space}"
        return f"{base}-o{hashlib.sha256(self.overrides_text.encode()).hexdigest()[:10]}" if self.overrides else base

    @property
    def tags(self) -> dict[str, str]:
        """One ``override.<key>`` tag per override plus the compact ``overrides`` column."""
        tags = {f"override.{k}": v for k, v in self.overrides}
        return {**tags, "overrides": self.overrides_text} if tags else {}


@dataclass(frozen=True)
class Plan:
    trials: list[Trial]
    workers: int
    cpus_per_trial: float
    gpus_per_trial: float
    cluster_cpus: float
    cluster_gpus: float
    max_concurrent: int

    def describe(self) -> str:
        lines = [
            f"trials: {len(self.trials)} ({', '.join(t.key for t in self.trials)})",
            f"workers per trial (DDP ranks): {self.workers}",
            f"CPUs per trial: {self.cpus_per_trial:g}  GPUs per trial: {self.gpus_per_trial:g}",
            f"cluster: {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs",
            f"max concurrent trials: {self.max_concurrent}",
        ]
        return "\n".join(lines)


def search_workers(s: SweepSection) -> Workers:
    """The worker group (DDP ranks) of every search trial."""
    return Workers(s.workers, s.cpus_per_worker, s.gpus_per_worker)


def trial_bundles(s: SweepSection) -> list[dict[str, float]]:
    """What one trial reserves: its Tune driver function, then one bundle per DDP rank."""
    return [{"CPU": s.trial_cpus}, *search_workers(s).bundles]


def plan(cfg: Config, resources: dict[str, float]) -> Plan:
    """Trials and how many fit at once; ``UserError`` when a single trial can never be scheduled."""
    s = cfg.sweep
    sets = override_sets(cfg)
    trials = [Trial.of(seed, space, o) for seed in s.seeds for space in s.spaces for o in sets]
    bundles = trial_bundles(s)
    need = total(bundles)
    cpus, gpus = need["CPU"], need["GPU"]
    have_cpu = float(resources.get("CPU", 0))
    have_gpu = float(resources.get("GPU", 0))
    if not fits(bundles, resources):
        raise UserError(
            f"one sweep trial needs {cpus:g} CPUs ({s.trial_cpus:g} + {s.workers} workers × {s.cpus_per_worker:g}) "
            f"and {gpus:g} GPUs ({s.workers} × {s.gpus_per_worker:g}), but the cluster has {have_cpu:g} CPUs and "
            f"{have_gpu:g} GPUs: it can never run; lower sweep.workers / sweep.cpus_per_worker / "
            "sweep.trial_cpus / sweep.gpus_per_worker or add nodes"
        )
    fit = math.floor(have_cpu / cpus + EPS)
    if gpus > 0:
        fit = min(fit, math.floor(have_gpu / gpus + EPS))
    return Plan(trials, s.workers, cpus, gpus, have_cpu, have_gpu, max(1, min(fit, len(trials))))


def trial_config(cfg: Config, trial: Trial) -> Config:
    overrides = {k: json.loads(v) for k, v in trial.overrides}
    return apply_overrides(cfg, {**overrides, "search.seed": trial.seed, "search.space": trial.space})


def _existing_trials(ctx: TrackingContext, parent: str) -> dict[str, dict[str, Any]]:
    return {t["tags"].get(tracking.TRIAL_KEY_TAG): t for t in tracking.child_runs(ctx, parent)}


@dataclass(frozen=True)
class TrialSummary:
    """One sweep trial as selection and the report see it: its MLflow search run and that run's last metrics."""

    trial_key: str
    seed: int
    space: str
    overrides: str
    sweep_run_id: str
    run_id: str | None = None  # None: the trial failed before it opened its run
    status: str = "ERROR"  # the run's: FINISHED | FAILED | RUNNING | KILLED; ERROR without a run
    genotype_hash: str = ""
    failure_reason: str = ""
    skipped: bool = False  # finished (or diverged) in an earlier run of the sweep: not run again
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.failure_reason.startswith("diverged")

    @classmethod
    def of(cls, trial: Trial, sweep_run_id: str, run: dict[str, Any] | None, skipped: bool = False,
           error: str = "") -> TrialSummary:  # fmt: skip
        base = cls(trial.key, trial.seed, trial.space, trial.overrides_text, sweep_run_id, failure_reason=error)
        if run is None:
            return base
        return replace(
            base, run_id=run["run_id"], status=run["status"], genotype_hash=run["tags"].get("genotype_hash", ""),
            failure_reason=run["tags"].get(tracking.FAILURE_TAG, "") or error, skipped=skipped,
            metrics=dict(run["metrics"]),
        )  # fmt: skip


def _trial_fn(params: dict[str, Any], run: dict[str, Any]) -> None:
    """Tune function trainable: one search (a ``TorchTrainer``) and its nested MLflow run.

    ``params`` (Tune's trial config, saved with the experiment): ``config``, ``seed``, ``space``,
    ``variant`` (an index into the config's ``override_sets``).
    ``run`` (``tune.with_parameters``, given anew on every start or restore): the tracking context
    (its served URI changes between runs), parent run id, split, storage.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = Config.model_validate(params["config"])
    ctx, parent = run["tracking"], run["parent_run_id"]
    trial = _trial(cfg, params)
    found = _existing_trials(ctx, parent).get(trial.key)
    if found is not None and (
        found["status"] == "FINISHED" or found["tags"].get(tracking.FAILURE_TAG, "").startswith("diverged")
    ):
        tune.report(
            _reported(TrialSummary.of(trial, parent, found, skipped=True))
        )  # finished, or diverged deterministically: keep it
        return
    tags = {"stage": "search", "space": trial.space, "seed": trial.seed, "split_sha256": run["split_sha256"]}
    tags.update(trial.tags)
    run_id = tracking.open_child_run(ctx, parent, trial.key, tags)
    searched = trial_config(cfg, trial)
    tracking.log_params(ctx, run_id, searched.search.model_dump(mode="json"), prefix="search.")  # overrides applied
    s = cfg.sweep
    result = fit_search(
        searched,
        run["split_uri"],
        run["storage_path"],
        trial.train_name,
        search_workers(s),
        s.max_failures,
        tracking=ctx,
        run_id=run_id,
        callbacks=[TuneReportCallback()],
    )
    if result.error is not None:
        tracking.finish_run(ctx, run_id, "FAILED", reason=f"error: {result.error}"[:4000])
        raise RuntimeError(f"trial {trial.key} failed") from result.error
    found = _existing_trials(ctx, parent)[trial.key]
    if found["status"] == "RUNNING":  # rank 0 normally finishes the run; never leave it open
        tracking.finish_run(ctx, run_id, "FINISHED")
        found = _existing_trials(ctx, parent)[trial.key]
    tune.report(_reported(TrialSummary.of(trial, parent, found)))


def _reported(summary: TrialSummary) -> dict[str, Any]:
    """A summary as Tune's last result of the trial (flat: the search metrics under ``final/``)."""
    flat = {k: v for k, v in asdict(summary).items() if k != "metrics"}
    return flat | {f"{FINAL}{k}": v for k, v in summary.metrics.items()} | {"diverged": summary.diverged}


def _trial(cfg: Config, params: dict[str, Any]) -> Trial:
    return Trial.of(int(params["seed"]), str(params["space"]), override_sets(cfg)[int(params.get("variant", 0))])


def _save_split(cfg: Config, log: Log) -> tuple[str, str]:
    split = make_split(cfg)
    path = (cfg.run_dir() / "split.json").resolve()
    if path.exists():
        try:
            if SearchSplit.load(str(path)).sha256 == split.sha256:
                return str(path), split.sha256
        except UserError:  # a damaged or modified split file is rewritten below
            pass
    h = split.save(str(path))
    log(f"split {h[:12]} -> {path}")
    return str(path), h


def run_sweep(cfg: Config, log: Log = print) -> list[TrialSummary]:
    """Run or resume the whole sweep; one summary per planned trial, in plan order."""
    ctx = tracking.connect(cfg)  # fails fast, before compute
    override_sets(cfg)  # a bad sweep override fails here, naming its key, before Ray starts
    with ray_session(cfg):
        # a trial that can never fit fails here, before any data work (after the autoscaler had its chance)
        p = plan(cfg, cluster_resources(trial_bundles(cfg.sweep), cfg.scale_up_wait_s, log))
        log(p.describe())
        cfg = ensure_shards(cfg, log)
        split_uri, split_sha = _save_split(cfg, log)
        storage = storage_path(cfg)
        with tracking.serving(ctx, writers=p.max_concurrent) as served:
            sweep_tags = {"seeds": ",".join(map(str, cfg.sweep.seeds)), "spaces": ",".join(cfg.sweep.spaces)}
            sweep_tags["split_sha256"] = split_sha
            parent = tracking.open_sweep_run(served, "sweep", cfg.resolved(), sweep_tags)
            tracking.log_artifact(served, parent, split_uri, "split")
            results = {r.get("trial_key"): r for r in _tune(cfg, p, served, parent, split_uri, split_sha, storage, log)}
            runs = _existing_trials(served, parent)
            out = [
                TrialSummary.of(t, parent, runs.get(t.key), bool(results.get(t.key, {}).get("skipped")),
                                results.get(t.key, {}).get("error", ""))
                for t in p.trials
            ]  # fmt: skip
            failed = [t.trial_key for t in out if t.status != "FINISHED" and not t.diverged]
            tracking.finish_run(served, parent, "FAILED" if failed else "FINISHED", reason=", ".join(failed) or None)
            return out


def trial_label(cfg: Config, params: dict[str, Any]) -> str:
    """A Tune trial's name on the progress board: its trial key (overrides included)."""
    return _trial(cfg, params).key


def _tune(
    cfg: Config, p: Plan, ctx: TrackingContext, parent: str, split_uri: str, split_sha: str, storage: str, log: Log
) -> list[dict[str, Any]]:
    from ray import tune

    run = {
        "tracking": ctx,
        "parent_run_id": parent,
        "split_uri": split_uri,
        "split_sha256": split_sha,
        "storage_path": f"{storage.rstrip('/')}/trials",
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, run=run), {"cpu": cfg.sweep.trial_cpus})
    name = f"sweep-{cfg.hash[:12]}"
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        log(f"resuming Tune experiment {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {
            "config": cfg.resolved(),
            "seed": tune.grid_search(list(cfg.sweep.seeds)),
            "space": tune.grid_search(list(cfg.sweep.spaces)),
            "variant": tune.grid_search(list(range(len(override_sets(cfg))))),
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=p.max_concurrent),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                verbose=0,  # Tune's tables replaced by one progress row per trial
                callbacks=[TuneProgress(functools.partial(trial_label, cfg))],
            ),
        )
    grid = tuner.fit()
    out = []
    for r in grid:
        m = dict(r.metrics or {})
        if r.error is not None:
            m.setdefault("status", "ERROR")
            m["error"] = str(r.error)
            m.setdefault("trial_key", _trial(cfg, r.config).key)
        out.append(m)
    return out
