"""Size and compute of a network: params, binary weights, FLOPs, BOPs, OPs and memory (method §9.5, §12).

Accounting (the paper's exact convention is unknown, method §11.12):

* params: every parameter except the auxiliary head's; ``binary_weights`` are the weight entries
  of convs with 1-bit weights, ``real_params`` the rest (stem, classifier, BN, PReLU, the betas).
* FLOPs: multiply-accumulates of real convs and linears, and of convs whose weights are binary but
  whose inputs are real (a binary weight times a real activation is still a float multiply-add).
* BOPs: multiply-accumulates of convs with binary weights *and* binary inputs (XNOR + popcount).
* OPs = BOPs / 64 + FLOPs (the Bi-Real / ReActNet convention).
* memory (Mbit) = binary weights x 1 bit + real params x 32 bit, in units of 10^6 bits.

Pooling, BN, PReLU and additions are not counted. Counts are per input sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dcpnas.binary import BinaryConv2d


@dataclass(frozen=True)
class Cost:
    params: int
    binary_weights: int
    real_params: int
    flops: int
    bops: int

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops

    @property
    def memory_mbit(self) -> float:
        return (self.binary_weights + 32 * self.real_params) / 1e6

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "ops": self.ops, "memory_mbit": self.memory_mbit}


def _binary_weight(m: nn.Module) -> bool:
    return isinstance(m, BinaryConv2d) and m.binary_weights


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(params, binary weights), auxiliary head excluded; needs no forward pass."""
    skip = {id(p) for n, p in model.named_parameters() if "auxiliary" in n}
    total = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    binary = sum(m.weight.numel() for n, m in model.named_modules() if _binary_weight(m) and id(m.weight) not in skip)
    return total, binary


@torch.no_grad()
def count_cost(model: nn.Module, input_size: tuple[int, ...] | None = None) -> Cost:
    """Measure ``model`` on a zero input of ``input_size`` (default: batch 1 at the network's own size).

    Runs in eval mode so the auxiliary head (training only) is not measured; restores the mode after.
    """
    if input_size is None:
        c_in = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        input_size = (1, c_in, model.input_size, model.input_size)
    macs = {"flops": 0, "bops": 0}

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            n = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            n = out.numel() * m.in_features
        binary = _binary_weight(m) and m.binary_input
        macs["bops" if binary else "flops"] += n

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    batch = input_size[0]
    params, binary = param_counts(model)
    return Cost(params, binary, params - binary, macs["flops"] // batch, macs["bops"] // batch)
