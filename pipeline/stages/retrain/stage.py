"""The retrain stage: a genotype's discrete 1-bit network trained step by step (method §9), tracked in MLflow.

Steps run in order (``plan.plan_steps``), each a Ray Train worker group (``worker.fit_step``): ``teacher``
(the real-valued network, when the config asks the pipeline to train one), then the binarisation stages of
``retrain.steps`` (the published recipe: ``binary_act``, then ``binary_all`` initialised from it), with the
soft-target KD loss from the teacher. Each step's final model is an MLflow artifact with its sha256; the
next step and the teacher reader get it from there (hash checked), never from a path in source code.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from dcpnas.genotype import Genotype
from pipeline import tracking
from pipeline.config import Config
from pipeline.data.search_data import ensure_shards
from pipeline.errors import UserError
from pipeline.models import FINAL_STEP_TAG, MODEL_FILE, SHA_TAG, evaluate_file, num_classes, read_model, sha256_file
from pipeline.names import ORIGIN_TAG, TEACHER_STEP
from pipeline.progress.board import Log
from pipeline.progress.tune import TrainProgress, train_progress
from pipeline.runtime.resources import cluster_resources
from pipeline.runtime.session import ray_session, storage_path
from pipeline.stages.retrain.plan import (
    Step,
    check_resources,
    compute_hours,
    plan_steps,
    preflight,
    retrain_key,
    retrain_slots,
    worker_bundles,
)
from pipeline.stages.retrain.worker import ModelRef, fit_step
from pipeline.tracking import TrackingContext


def _step_model(ctx: TrackingContext, run_id: str, step: str, storage: str) -> ModelRef:
    """A finished step's model, fetched from its MLflow artifact into ``storage`` (where every node reads
    it); its sha256 is the one recorded when the step finished."""
    sha = tracking.get_run(ctx, run_id)["tags"].get(f"{SHA_TAG}.{step}")
    if sha is None:
        raise UserError(f"retrain run {run_id} has no finished {step} model")
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifact(ctx, run_id, f"{step}/{MODEL_FILE}", tmp)
        uri = f"{storage.rstrip('/')}/inputs/{step}-{sha[:12]}.pt"
        with fsspec.open(uri, "wb", auto_mkdir=True) as out:
            out.write(local.read_bytes())
    if sha256_file(uri) != sha:
        raise UserError(f"{step} model of run {run_id} does not hash to the recorded {sha[:12]}")
    return ModelRef(uri, sha)


def _publish_step(ctx: TrackingContext, run_id: str, step: Step, result: Any) -> None:
    """Log the step's final model as an artifact with its hash, and the step's compute time."""
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_FILE
        local.write_bytes((Path(d) / MODEL_FILE).read_bytes())
        sha = sha256_file(str(local))
        tracking.log_artifact(ctx, run_id, local, step.name)
    seconds = float(result.metrics.get(f"{step.name}/train_seconds", 0.0))
    tracking.log_epoch(ctx, run_id, {f"{SHA_TAG}.{step.name}": sha, f"cost/{step.name}_seconds": seconds}, step=0)


@dataclass(frozen=True)
class RetrainJob:
    """One genotype to retrain and where its run lives: nested under ``parent_run_id`` (the genotype's
    search run, or the sweep / retrain run for one that no search found), tagged ``tags``, found again by
    ``key`` (default: ``retrain_key``; a parent that holds several genotypes keys each by its hash)."""

    genotype: Genotype
    parent_run_id: str
    tags: Mapping[str, Any]
    key: str | None = None


def retrain_genotype(
    cfg: Config,
    ctx: TrackingContext,
    job: RetrainJob,
    progress: TrainProgress,
    log: Log = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Retrain one genotype inside an open tracking context (a served URI when workers log).

    Finished steps (model artifact + hash tag) are skipped, the interrupted one resumes from its Ray
    Train checkpoint. The run holds its genotype (``dcpnas retrain --genotype RUN`` works on it). Returns
    the run id and its final metrics.
    """
    genotype, parent_run_id = job.genotype, job.parent_run_id
    recipe = retrain_key(cfg)
    key = job.key or recipe
    for t in tracking.child_runs(ctx, parent_run_id):
        if t["tags"].get(tracking.TRIAL_KEY_TAG) == key and t["status"] == "FINISHED" and FINAL_STEP_TAG in t["tags"]:
            log(f"retrain {genotype.hash[:12]}: finished in run {t['run_id']}, skipped")
            return {"run_id": t["run_id"], "genotype_hash": genotype.hash, "skipped": True, **t["metrics"]}
    classes = num_classes(cfg)  # the caller ran preflight() before starting Ray
    run_id = tracking.open_child_run(
        ctx,
        parent_run_id,
        key,
        {
            "space": genotype.space,
            "seed": cfg.retrain.seed,
            **job.tags,
            "stage": "retrain",
            "genotype_hash": genotype.hash,
        },
    )
    tracking.log_genotype(ctx, run_id, genotype)  # raises if the run found by the key holds another genotype
    tracking.log_params(ctx, run_id, cfg.retrain.model_dump(mode="json"), prefix="retrain.")
    storage = f"{storage_path(cfg).rstrip('/')}/retrain/{genotype.hash[:12]}-{recipe.split(':')[1]}"
    done = tracking.get_run(ctx, run_id)["tags"]
    teacher = None
    if cfg.retrain.teacher not in ("train", "none"):
        teacher = ModelRef(cfg.retrain.teacher, sha256_file(cfg.retrain.teacher))
    steps = plan_steps(cfg)
    for step in steps:
        if f"{SHA_TAG}.{step.name}" in done:
            log(f"retrain {genotype.hash[:12]}: {step.name} already finished, skipped")
        else:
            log(f"retrain {genotype.hash[:12]}: {step.name} ({step.stage}, {step.epochs} epochs)")
            init = _step_model(ctx, run_id, step.init_from, storage) if step.init_from else None
            try:
                with progress.row(f"retrain {genotype.hash[:12]} {step.name}") as shown:
                    result = fit_step(
                        cfg,
                        step,
                        genotype,
                        classes,
                        storage,
                        step.name,
                        init=init,
                        teacher=teacher,
                        tracking=ctx,
                        run_id=run_id,
                        stop_after=stop_after,
                        callbacks=[shown],
                    )
            except Exception as e:  # Ray Train raises the workers' error once its retries are spent
                tracking.finish_run(ctx, run_id, "FAILED", reason=f"{step.name}: {e}"[:4000])
                raise
            if stop_after is not None and int(result.metrics.get("epoch", -1)) + 1 < step.epochs:
                return {"run_id": run_id, "interrupted": step.name}
            _publish_step(ctx, run_id, step, result)
        if step.name == TEACHER_STEP:
            teacher = _step_model(ctx, run_id, TEACHER_STEP, storage)
    final = steps[-1].name
    with tempfile.TemporaryDirectory() as tmp:
        content = read_model(str(tracking.download_artifact(ctx, run_id, f"{final}/{MODEL_FILE}", tmp)))
    metrics = evaluate_file(cfg, content, classes)
    seconds = sum(
        v
        for k, v in tracking.get_run(ctx, run_id)["metrics"].items()
        if k.startswith("cost/") and k.endswith("_seconds")
    )
    metrics.update(compute_hours(cfg, seconds))
    tracking.log_epoch(ctx, run_id, {**metrics, FINAL_STEP_TAG: final}, step=0)
    run = tracking.get_run(ctx, run_id)
    eval_id = tracking.log_eval_run(ctx, run, metrics, f"eval:{cfg.data.eval_split}")
    tracking.finish_run(ctx, run_id, "FINISHED")
    # the search run's row in the comparison view carries its genotype's retrained result
    tracking.log_epoch(ctx, parent_run_id, {"retrain/top1": metrics["top1"], "retrain/ops": metrics["ops"]}, step=0)
    return {"run_id": run_id, "eval_run_id": eval_id, "genotype_hash": genotype.hash, **metrics}


def retrain_all(
    cfg: Config,
    ctx: TrackingContext,
    jobs: Callable[[TrackingContext], list[RetrainJob]],
    log: Log = print,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Retrain the jobs that ``jobs(served context)`` names, in a Ray session, up to ``retrain_slots`` side by
    side (each its own worker group); results in job order. After a failure no further retrain starts;
    those running finish (their runs are in MLflow, a re-run skips them), then the first error is raised."""
    with ray_session(cfg):
        resources = cluster_resources(worker_bundles(cfg), cfg.scale_up_wait_s, log)
        check_resources(cfg, resources)
        slots = retrain_slots(cfg, resources)
        with tracking.serving(ctx, writers=slots) as served, train_progress() as progress:
            return _side_by_side(cfg, served, jobs(served), log, slots, stop_after, progress)


def _side_by_side(
    cfg: Config,
    ctx: TrackingContext,
    jobs: list[RetrainJob],
    log: Log,
    slots: int,
    stop_after: int | None,
    progress: TrainProgress,
) -> list[dict[str, Any]]:
    if slots <= 1 or len(jobs) <= 1:  # in this thread: Ray Train's Ctrl-C handler needs the main thread
        return [retrain_genotype(cfg, ctx, j, progress, log, stop_after) for j in jobs]
    failed = threading.Event()

    def one(job: RetrainJob) -> dict[str, Any] | None:
        if failed.is_set():
            return None
        try:
            return retrain_genotype(cfg, ctx, job, progress, log, stop_after)
        except BaseException:
            failed.set()
            raise

    width = min(slots, len(jobs))
    log(f"retrain: {len(jobs)} genotypes, {width} at a time")
    pool = ThreadPoolExecutor(width, thread_name_prefix="retrain")
    try:
        futures = [pool.submit(one, j) for j in jobs]
        wait(futures)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: leave now; the Ray session's end stops them
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        skipped = sum(1 for f in futures if f.exception() is None and f.result() is None)
        log(f"retrain: {len(errors)} of {len(jobs)} failed, {skipped} not started (a re-run resumes them)")
        raise errors[0]
    return [f.result() for f in futures]


def _job(cfg: Config, ctx: TrackingContext, ref: str, genotype: Genotype, run_id: str | None) -> RetrainJob:
    """Where ``dcpnas retrain --genotype ref`` retrains ``genotype`` (logged by ``run_id``, if any)."""
    run_tags = tracking.get_run(ctx, run_id)["tags"] if run_id else {}
    if run_tags.get("stage") != "search":  # a file, built-in name, retrain run: under the config's retrain run
        parent = tracking.open_sweep_run(ctx, "retrain", cfg.resolved())
        return RetrainJob(genotype, parent, {"genotype_ref": ref}, f"{genotype.hash[:12]},{retrain_key(cfg)}")
    search_run, seed = run_id, run_tags.get("seed")
    tags = {"seed": seed} if seed else {}  # the search seed that found the genotype
    if ref.startswith(tracking.PARENT_REF):  # the search's Parent genotype, beside its Child's retrain
        return RetrainJob(genotype, search_run, tags | {ORIGIN_TAG: "parent"}, f"{retrain_key(cfg)}:parent")
    return RetrainJob(genotype, search_run, tags | {ORIGIN_TAG: "search"})


def run_retrain(
    cfg: Config, refs: Sequence[str] = (), log: Log = print, stop_after: int | None = None
) -> list[dict[str, Any]]:
    """``dcpnas retrain``: the genotypes ``refs`` (run ids, ``parent:<run id>``, ``models:/name@alias``, JSON
    files, built-in names; default ``retrain.genotype``) retrained per ``cfg.retrain``, side by side where
    the cluster holds several, tracked in MLflow. A genotype of a search run nests under that run; any
    other under the config's ``retrain`` run, keyed by its hash."""
    refs = refs or ([cfg.retrain.genotype] if cfg.retrain.genotype else [])
    if not refs:
        raise UserError("no genotype to retrain: pass --genotype REF or set retrain.genotype")
    # fails fast, before compute
    ctx = tracking.connect(cfg)
    found = {ref: tracking.find_genotype(ctx, ref) for ref in refs}  # a ref given twice is read once
    cfg = ensure_shards(cfg, log)
    for genotype, _ in found.values():
        preflight(cfg, genotype, num_classes(cfg))

    def jobs(served: TrackingContext) -> list[RetrainJob]:
        # two refs to one genotype of one run (a run id and its registry alias) are one retrain
        unique = {}
        for ref, (genotype, run_id) in found.items():
            job = _job(cfg, served, ref, genotype, run_id)
            unique.setdefault((job.parent_run_id, job.key, genotype.hash), job)
        return list(unique.values())

    return retrain_all(cfg, ctx, jobs, log, stop_after)
