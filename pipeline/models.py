"""The retrained network: built from a genotype for a retrain step, saved as a self-describing model file
(``dcpnas.network.model_file``: spec + weights, read back through fsspec with ``weights_only=True`` and
checked against its recorded hash), evaluated on the held-out split and costed (params, FLOPs, BOPs, OPs)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from dcpnas.cost import count_cost
from dcpnas.genotype import Genotype
from dcpnas.network import create_network, network_from_file
from pipeline.config import Config
from pipeline.data.shards import open_dataset
from pipeline.data.streams import device_batches, held_out_stream, image_size
from pipeline.errors import UserError
from pipeline.runtime.collectives import all_reduce_sum

MODEL_FILE = "model.pt"


SHA_TAG = "model_sha256"  # tag model_sha256.<step> on a retrain run: the hash of its <step>/model.pt


FINAL_STEP_TAG = "final_step"  # on a retrain run: the step whose model is the result


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


def build_network(cfg: Config, genotype: Genotype, stage: str, num_classes: int) -> nn.Module:
    r = cfg.retrain
    return create_network(
        r.network,
        C=r.init_channels,
        num_classes=num_classes,
        layers=r.layers,
        genotype=genotype,
        stage=stage,
        style=r.style,
        binarize_depthwise_input=r.binarize_depthwise_input,
    )


def num_classes(cfg: Config) -> int:
    return len(open_dataset(cfg.data.uri).classes)
