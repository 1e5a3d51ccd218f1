"""The two training engines of a retrain step behind one interface: DeepSpeed (ZeRO, bf16) and plain DDP;
each saves and loads its own checkpoint layout inside the Ray Train checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.stages.retrain.plan import Step, deepspeed_config, param_groups

STATE_FILE = "ddp_state.pt"  # the plain-DDP engine's optimizer + weights (DeepSpeed writes its own layout)


DS_TAG = "state"  # not "latest": DeepSpeed writes a file of that name next to the tag directory


class Engine:
    """What the loop needs from DeepSpeed or plain DDP: forward, backward + step, lr, checkpoint."""

    module: nn.Module

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def backward_step(self, loss: Tensor) -> None:
        raise NotImplementedError

    optimizer: torch.optim.Optimizer  # DeepSpeed's ZeRO wrapper exposes the base optimizer's param_groups

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self, directory: str) -> dict[str, Any]:
        raise NotImplementedError


class DeepSpeedEngine(Engine):
    """A real ``deepspeed.initialize`` engine: ZeRO stage and bf16 from config, our AdamW."""

    def __init__(self, model: nn.Module, cfg: Config, step: Step, micro_batch: int, bf16: bool) -> None:
        import deepspeed

        cuda = next(model.parameters()).is_cuda
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        optimizer = torch.optim.AdamW(param_groups(model, step.weight_decay), lr=step.lr, eps=1e-8)
        config = deepspeed_config(cfg, micro_batch, bf16, cuda)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.engine.module
        self.bf16 = bf16

    def __call__(self, x: Tensor) -> Tensor:
        return self.engine(x.to(torch.bfloat16) if self.bf16 else x)

    def backward_step(self, loss: Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(directory, tag=DS_TAG, client_state=client_state)  # every rank: its ZeRO shard

    def load(self, directory: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(directory, tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint '{DS_TAG}' in {directory}")
        return client_state


class DDPEngine(Engine):
    """The reference: torch DDP (or the bare module on one rank) with the same AdamW; bf16 by autocast."""

    def __init__(self, model: nn.Module, step: Step, device: torch.device, bf16: bool) -> None:
        self.module = model
        multi = dist.is_initialized() and dist.get_world_size() > 1
        self.net = nn.parallel.DistributedDataParallel(model) if multi else model
        self.optimizer = torch.optim.AdamW(param_groups(model, step.weight_decay), lr=step.lr, eps=1e-8)
        self.device, self.bf16 = device, bf16

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(x)

    def backward_step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:  # replicas are identical
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), **client_state}
            torch.save(state, Path(directory) / STATE_FILE)

    def load(self, directory: str) -> dict[str, Any]:
        state = torch.load(Path(directory) / STATE_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state
