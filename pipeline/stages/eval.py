"""The eval stage: top-1 / top-5 on the held-out split and the cost (params, FLOPs, BOPs, OPs, memory) of
a retrained model, from a model file or from the retrain run that logged it (then logged as an ``eval``
run nested under it)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.search_data import ensure_shards
from pipeline.errors import UserError
from pipeline.models import FINAL_STEP_TAG, MODEL_FILE, SHA_TAG, evaluate_file, num_classes, read_model
from pipeline.progress.board import Log


@dataclass(frozen=True)
class EvalResult:
    """What ``dcpnas eval`` reports: the metrics, and the eval run (None for a model file)."""

    metrics: dict[str, float]
    eval_run_id: str | None


def resolve_model(ctx: tracking.TrackingContext, ref: str, dest: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``ref``: a retrain run id (its final step's model artifact, hash-checked) or a model file URI.
    Returns the model file's content and the retrain run (None for files)."""
    if not tracking.is_run_id(ref):
        return read_model(ref), None
    run = tracking.get_run(ctx, ref)
    step = run["tags"].get(FINAL_STEP_TAG)
    if run["tags"].get("stage") != "retrain" or step is None:
        raise UserError(f"run {ref} is not a finished retrain run (no {FINAL_STEP_TAG} tag)")
    local = tracking.download_artifact(ctx, ref, f"{step}/{MODEL_FILE}", dest)
    return read_model(str(local), run["tags"][f"{SHA_TAG}.{step}"]), run


def run_eval(cfg: Config, ref: str, log: Log = print) -> EvalResult:
    """Evaluate a model file or a retrain run's model on ``data.eval_split``."""
    ctx = tracking.connect(cfg)
    cfg = ensure_shards(cfg, log)
    with tempfile.TemporaryDirectory() as tmp:
        content, run = resolve_model(ctx, ref, tmp)
    metrics = evaluate_file(cfg, content, num_classes(cfg))
    if run is None:
        return EvalResult(metrics, None)
    return EvalResult(metrics, tracking.log_eval_run(ctx, run, metrics, f"eval:{cfg.data.uri}:{cfg.data.eval_split}"))
