"""The retrain stage: a genotype's discrete 1-bit network trained step by step (method §9), tracked in MLflow.

Steps run in order (``plan.plan_steps``), each a Ray Train worker group (``worker.fit_step``): ``teacher``
(the real-valued network, when the config asks the pipeline to train one), then the binarisation stages of
``retrain.steps`` (the published recipe: ``binary_act``, then ``binary_all`` initialised from it), with the
soft-target KD loss from the teacher. Each step's final model is an MLflow artifact with its sha256; the
next step and the teacher reader get it from there (hash checked), never from a path in source code.
"""

from __future__ import annotations

import tempfile
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
from pipeline.progress.tune import train_progress
from pipeline.runtime.resources import cluster_resources
from pipeline.runtime.session import ray_session, storage_path
from pipeline.stages.retrain.plan import (
    Step,
    check_resources,
    compute_hours,
    plan_steps,
    preflight,
    retrain_key,
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


def retrain_genotype(
    cfg: Config,
    ctx: TrackingContext,
    genotype: Genotype,
    parent_run_id: str,
    tags: dict[str, Any],
    log: Log = print,
    stop_after: int | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Retrain one genotype inside an open tracking context (a served URI when workers log).

    The retrain run is nested under ``parent_run_id`` (the search run of the genotype, or the sweep
    run for a random baseline) and found again by ``key`` (default: ``retrain_key``): finished steps
    (model artifact + hash tag) are skipped, the interrupted one resumes from its Ray Train
    checkpoint. Returns the run id and its final metrics.
    """
    recipe = retrain_key(cfg)
    key = key or recipe
    for t in tracking.child_runs(ctx, parent_run_id):
        if t["tags"].get(tracking.TRIAL_KEY_TAG) == key and t["status"] == "FINISHED" and FINAL_STEP_TAG in t["tags"]:
            log(f"retrain {genotype.hash[:12]}: finished in run {t['run_id']}, skipped")
            return {"run_id": t["run_id"], "genotype_hash": genotype.hash, "skipped": True, **t["metrics"]}
    classes = num_classes(cfg)  # the caller ran preflight() before starting Ray
    run_id = tracking.open_child_run(
        ctx,
        parent_run_id,
        key,
        {"space": genotype.space, "seed": cfg.retrain.seed, **tags, "stage": "retrain", "genotype_hash": genotype.hash},
    )
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
                with train_progress(f"retrain {genotype.hash[:12]} {step.name}") as shown:
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


def run_retrain(cfg: Config, ref: str | None = None, log: Log = print, stop_after: int | None = None) -> dict[str, Any]:
    """``dcpnas retrain``: the genotype ``ref`` (run id, ``models:/name@alias``, JSON file, built-in
    name; default ``retrain.genotype``) retrained per ``cfg.retrain``, tracked in MLflow."""
    ref = ref or cfg.retrain.genotype
    if not ref:
        raise UserError("no genotype to retrain: pass --genotype REF or set retrain.genotype")
    # fails fast, before compute
    ctx = tracking.connect(cfg)
    genotype, search_run = tracking.find_genotype(ctx, ref)
    cfg = ensure_shards(cfg, log)
    preflight(cfg, genotype, num_classes(cfg))
    with ray_session(cfg):
        check_resources(cfg, cluster_resources(worker_bundles(cfg), cfg.scale_up_wait_s, log))
        with tracking.serving(ctx) as served:
            parent = search_run or tracking.open_sweep_run(served, "retrain", cfg.resolved(), {"genotype_ref": ref})
            seed = search_run and tracking.get_run(served, search_run)["tags"].get("seed")
            tags = {"seed": seed} if seed else {}  # the search seed that found the genotype
            key = None
            if ref.startswith(tracking.PARENT_REF):  # the search's Parent genotype, beside its Child's retrain
                tags[ORIGIN_TAG], key = "parent", f"{retrain_key(cfg)}:parent"
            elif search_run:
                tags[ORIGIN_TAG] = "search"
            return retrain_genotype(cfg, served, genotype, parent, tags, log, stop_after, key)
