"""Evaluation of a retrained model: top-1 / top-5 on the held-out split and its cost (params, FLOPs,
BOPs, OPs, memory in Mbit), from a model file or from the retrain run that logged it.

Model files (``dcpnas.network.model_file``) carry the network's spec next to its weights, so a file
alone rebuilds the network; they are read through fsspec with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from dcpnas.cost import count_cost
from dcpnas.network import network_from_file
from pipeline.collectives import all_reduce_sum
from pipeline.config import Config, add_config_arguments
from pipeline.data.stream import ShardStream
from pipeline.data.transforms import EvalTransform, on_device
from pipeline.errors import UserError

MODEL_FILE = "model.pt"
SHA_TAG = "model_sha256"  # tag model_sha256.<step> on a retrain run: the hash of its <step>/model.pt
FINAL_STEP_TAG = "final_step"  # on a retrain run: the step whose model is the result
_RUN_ID = re.compile(r"[0-9a-f]{32}")
Batch = tuple[Tensor, Tensor]


def sha256_file(uri: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_model(uri: str, sha256: str | None = None) -> dict[str, Any]:
    """A model file (any fsspec URI), hash-checked when ``sha256`` is given, loaded with weights_only."""
    try:
        with fsspec.open(uri, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"model file {uri}: {e}") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise UserError(f"model file {uri} does not hash to {sha256[:12]}: it changed after it was recorded")
    try:
        content = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError for foreign files
        raise UserError(f"model file {uri} cannot be read safely: {str(e).splitlines()[0]}") from None
    if not isinstance(content, dict) or "spec" not in content:
        raise UserError(f"{uri} is not a dcpnas model file (no network spec): write it with dcpnas.network.model_file")
    return content


def check_classes(content: dict[str, Any], num_classes: int, what: str) -> None:
    got = content["spec"].get("num_classes")
    if got != num_classes:
        raise UserError(f"{what} predicts {got} classes, but the data has {num_classes}")


def image_size(cfg: Config) -> int:
    return cfg.retrain.image_size or cfg.data.image_size


def held_out_stream(cfg: Config, batch_size: int, rank: int = 0, world: int = 1) -> ShardStream:
    """Every row of ``data.eval_split`` exactly once across ranks, centre crop (none for tiny images), as
    uint8 batches: pass them through ``device_batches``."""
    d = cfg.data
    size = image_size(cfg)
    return ShardStream(
        d.uri,
        d.eval_split,
        batch_size=batch_size,
        transform=EvalTransform(size, crop_fraction=1.0 if size <= 32 else 0.875, normalize=False),
        rank=rank,
        world_size=world,
        num_workers=d.loader_workers,
        shuffle=False,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


def device_batches(cfg: Config, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> Iterator[Batch]:
    """A stream's uint8 batches, normalised with ``data.mean``/``data.std`` on ``device``."""
    return on_device(batches, device, tuple(cfg.data.mean), tuple(cfg.data.std))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 over every held-out row; one all-reduce at the end (ranks may differ by one batch)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        logits = model(x.to(device, next(model.parameters()).dtype))
        y = y.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(), y.new_tensor(len(y))])
    model.train(was_training)
    counts = all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"top1": counts[0].item() / n, "top5": counts[1].item() / n, "num_examples": counts[2].item()}


def cost_metrics(model: nn.Module, size: int) -> dict[str, float]:
    """Params, binary weights, FLOPs, BOPs, OPs = BOPs/64 + FLOPs and memory (Mbit) at ``size`` x ``size`` input."""
    c_in = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    cost = count_cost(model.cpu(), (1, c_in, size, size))
    d = cost.as_dict()
    return {
        "params": d["params"],
        "binary_params": d["binary_weights"],
        "real_params": d["real_params"],
        "flops": d["flops"],
        "bops": d["bops"],
        "ops": d["ops"],
        "memory_mbit": d["memory_mbit"],
    }


def evaluate_file(cfg: Config, content: dict[str, Any], num_classes: int) -> dict[str, float]:
    """Held-out accuracy and cost of a model file's network, in this process."""
    check_classes(content, num_classes, "the model")
    model = network_from_file(content)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    stream = held_out_stream(cfg, cfg.retrain.batch_size // cfg.retrain.workers)
    metrics = evaluate(model.to(device), device_batches(cfg, stream, device), device)
    return {**metrics, **cost_metrics(model, image_size(cfg))}


def resolve_model(ctx: Any, ref: str, dest: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``ref``: a retrain run id (its final step's model artifact, hash-checked) or a model file URI.
    Returns the model file's content and the retrain run (None for files)."""
    from pipeline import tracking

    if not _RUN_ID.fullmatch(ref):
        return read_model(ref), None
    run = tracking.get_run(ctx, ref)
    step = run["tags"].get(FINAL_STEP_TAG)
    if run["tags"].get("stage") != "retrain" or step is None:
        raise UserError(f"run {ref} is not a finished retrain run (no {FINAL_STEP_TAG} tag)")
    local = tracking.download_artifact(ctx, ref, f"{step}/{MODEL_FILE}", dest)
    return read_model(str(local), run["tags"][f"{SHA_TAG}.{step}"]), run


def log_eval_run(ctx: Any, retrain_run: dict[str, Any], metrics: dict[str, float], key: str) -> str:
    """An ``eval`` run nested under the retrain run, carrying its tags (space, seed, genotype hash)."""
    from pipeline import tracking

    tags = {k: retrain_run["tags"][k] for k in ("space", "seed", "genotype_hash") if k in retrain_run["tags"]}
    run_id = tracking.start_trial_run(ctx, retrain_run["run_id"], key, {**tags, "stage": "eval"})
    tracking.log_epoch(ctx, run_id, metrics, step=0)
    tracking.finish_run(ctx, run_id, "FINISHED")
    return run_id


def run_eval(cfg: Config, ref: str, log: Any = print) -> dict[str, Any]:
    """``dcpnas eval``: evaluate a model file or a retrain run's model on ``data.eval_split``."""
    from pipeline import tracking
    from pipeline.retrain_stage import num_classes
    from pipeline.sweep import search_data

    ctx = tracking.prepare(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, cfg.tracking.retry_s)
    cfg = search_data(cfg, log)
    with tempfile.TemporaryDirectory() as tmp:
        content, run = resolve_model(ctx, ref, tmp)
    metrics = evaluate_file(cfg, content, num_classes(cfg))
    out: dict[str, Any] = {"metrics": metrics, "eval_run_id": None}
    if run is not None:
        out["eval_run_id"] = log_eval_run(ctx, run, metrics, f"eval:{cfg.data.uri}:{cfg.data.eval_split}")
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    result = run_eval(load_config(args.config, args.set), args.model)
    for k, v in result["metrics"].items():
        print(f"{k}: {v:.4f}" if k in ("top1", "top5") else f"{k}: {v:,.0f}" if v >= 100 else f"{k}: {v:g}")
    if result["eval_run_id"]:
        print(f"eval run: {result['eval_run_id']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and cost of a retrained model on the held-out split")
    p.add_argument("--model", required=True, help="a retrain run id (MLflow) or a model file path/URI")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_eval)
