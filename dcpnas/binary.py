"""1-bit building blocks: sign with surrogate gradients and the scaled binary convolution.

Method §2.3 / Eqs. 4.22, 4.23, 4.35. Every surrogate also defines a forward-mode derivative
(``jvp``) equal to its backward one, so the GGN product J^T H J (method §5.2) uses the same
Jacobian in both directions and stays symmetric positive semidefinite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sign(x: Tensor) -> Tensor:
    # torch.sign maps 0 to 0, which is not a 1-bit value; map it to +1.
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def ste_grad(x: Tensor) -> Tensor:
    """Clipped straight-through derivative 1_{|x|<=1} (Eq. 4.35), for weights."""
    return (x.abs() <= 1).to(x.dtype)


def approx_sign_grad(x: Tensor) -> Tensor:
    """Bi-Real ApproxSign derivative: 2+2x on [-1,0), 2-2x on [0,1), 0 elsewhere, for activations."""
    return (2 - 2 * x.abs()) * (x.abs() < 1).to(x.dtype)


class _SurrogateSign(torch.autograd.Function):
    """sign(x) forward; backward and forward-mode derivative both multiply by ``surrogate(x)``."""

    @staticmethod
    def forward(ctx, x: Tensor, surrogate: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.surrogate = surrogate
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate(x), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _: None) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * ctx.surrogate(x)


def sign_ste(x: Tensor) -> Tensor:
    return _SurrogateSign.apply(x, ste_grad)


def approx_sign(x: Tensor) -> Tensor:
    return _SurrogateSign.apply(x, approx_sign_grad)


@dataclass(frozen=True)
class Binarize:
    """Which parts of the cell convolutions are 1-bit (method §2.3, §9.2).

    weights: binary weights in every cell conv (depthwise, pointwise, 1x1 preprocessing).
    activations: binary inputs to the pointwise 1x1 convs inside sep/dil ops (the repo's choice).
    depthwise_input: also binarize the depthwise convs' inputs (the book-faithful variant).
    """

    weights: bool = False
    activations: bool = False
    depthwise_input: bool = False

    @classmethod
    def stage(cls, name: str, depthwise_input: bool = False) -> Binarize:
        """Retraining stages: ``real``, ``binary_act`` (step 1) and ``binary_all`` (step 2)."""
        stages = {"real": (False, False), "binary_act": (False, True), "binary_all": (True, True)}
        if name not in stages:
            raise ValueError(f"unknown binarisation stage '{name}'; known: {', '.join(stages)}")
        w, a = stages[name]
        return cls(weights=w, activations=a, depthwise_input=depthwise_input and a)

    @property
    def any(self) -> bool:
        return self.weights or self.activations or self.depthwise_input


REAL = Binarize()
CHILD = Binarize(weights=True, activations=True)


class BinaryConv2d(nn.Conv2d):
    """Conv with weights beta * sign(w) (learnable per-channel beta) and optionally sign(input).

    Eq. 4.22: a_out = beta o (sign(a_in) (*) sign(w)), computed as a float conv. beta is
    initialised to mean|w_c| (XNOR) and trained by the loss and by mu * L_R (Eq. 4.23).
    """

    def __init__(self, *args, binary_weights: bool = True, binary_input: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.binary_weights = binary_weights
        self.binary_input = binary_input
        # Only binary weights have a scale; a real-weight conv with binary inputs (stage 1) has none,
        # so DDP never sees an unused parameter.
        beta = self.weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True).clone()
        self.beta = nn.Parameter(beta) if binary_weights else None

    def effective_weight(self) -> Tensor:
        return self.beta * sign_ste(self.weight) if self.binary_weights else self.weight

    def reconstruction_error(self) -> Tensor:
        """||w - beta o sign(w)||^2 with sign(w) held constant (method §3, Eqs. 4.23 and 4.34)."""
        if not self.binary_weights:
            return self.weight.new_zeros(())
        return (self.weight - self.beta * _sign(self.weight).detach()).pow(2).sum()

    def forward(self, x: Tensor) -> Tensor:
        if self.binary_input:
            x = approx_sign(x)
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv2d(
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    binary_weights: bool = False,
    binary_input: bool = False,
) -> nn.Conv2d:
    """A bias-free conv, binary when either flag is set (a real conv otherwise)."""
    if not (binary_weights or binary_input):
        return nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
    return BinaryConv2d(
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        bias=False,
        binary_weights=binary_weights,
        binary_input=binary_input,
    )


def reconstruction_loss(model: nn.Module) -> Tensor:
    """L_R summed over every binary-weight conv of ``model``."""
    terms = [m.reconstruction_error() for m in model.modules() if isinstance(m, BinaryConv2d)]
    if not terms:
        return next(model.parameters()).new_zeros(())
    return torch.stack(terms).sum()
